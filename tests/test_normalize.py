"""scxtrimo.pp.normalize and the count recovery behind it, on real data (pbmc3k, cellbench)."""

from __future__ import annotations

import copy
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import scxtrimo
from scxtrimo.pp._normalize import is_xtrimo_normalized, log1p_normalize, to_counts


def _scanpy_log1p(a: ad.AnnData, target_sum: float = 1e4) -> ad.AnnData:
    out = a.copy()
    sc.pp.normalize_total(out, target_sum=target_sum)
    sc.pp.log1p(out)
    return out


def _scanpy_normalized(a: ad.AnnData) -> ad.AnnData:
    out = a.copy()
    sc.pp.normalize_total(out, target_sum=1e4)
    return out


def _same_sparse(A, B) -> bool:
    return A.shape == B.shape and (sp.csr_matrix(A) != sp.csr_matrix(B)).nnz == 0


def _assert_close(A, B, **kw) -> None:
    np.testing.assert_allclose(
        sp.csr_matrix(A).toarray(), sp.csr_matrix(B).toarray(), **({"rtol": 1e-6, "atol": 1e-6} | kw)
    )


@pytest.fixture(scope="module")
def pbmc3k_scanpy() -> ad.AnnData:
    """pbmc3k after scanpy's normalize_total(1e4) + log1p: the reference result."""
    return _scanpy_log1p(scxtrimo.datasets.pbmc3k())


# --------------------------------------------------------------------------------------------
# raw counts


def test_matches_scanpy(pbmc3k, pbmc3k_scanpy):
    raw_X = pbmc3k.X.copy()
    assert scxtrimo.pp.normalize(pbmc3k) is None
    assert sp.isspmatrix_csr(pbmc3k.X) and pbmc3k.X.dtype == np.float32
    _assert_close(pbmc3k.X, pbmc3k_scanpy.X)
    # each cell sums to 1e4 on the count scale
    sums = np.asarray(np.expm1(pbmc3k.X.astype(np.float64)).sum(axis=1)).ravel()
    np.testing.assert_allclose(sums, 1e4, rtol=1e-4)
    # the counts layer is the input, untouched
    assert _same_sparse(pbmc3k.layers["counts"], raw_X)
    assert pbmc3k.layers["counts"].dtype == np.float32
    # (obs['n_genes'] of the tutorial was computed before its gene filter, so not comparable)
    n_genes = np.asarray((raw_X > 0).sum(axis=1)).ravel()
    np.testing.assert_array_equal(pbmc3k.obs["xtrimo_n_genes"].to_numpy(), n_genes)
    assert pbmc3k.uns["xtrimo"]["normalize"] == {
        "target_sum": 1e4,
        "input_kind": "counts",
        "n_low_quality_cells": 0,
    }
    assert is_xtrimo_normalized(pbmc3k)


def test_no_warning_for_raw_counts(pbmc3k):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        scxtrimo.pp.normalize(pbmc3k)  # pbmc3k: all cells have > 200 genes, integer counts


def test_target_sum(pbmc3k):
    out = scxtrimo.pp.normalize(pbmc3k, target_sum=1e6, copy=True)
    _assert_close(out.X, _scanpy_log1p(pbmc3k, 1e6).X)
    assert out.uns["xtrimo"]["normalize"]["target_sum"] == 1e6
    with pytest.raises(ValueError, match="target_sum"):
        scxtrimo.pp.normalize(pbmc3k, target_sum=0)


def test_log1p_normalize_matches_scanpy(pbmc3k, pbmc3k_scanpy):
    got = log1p_normalize(pbmc3k.X)
    assert sp.isspmatrix_csr(got) and got.dtype == np.float32
    _assert_close(got, pbmc3k_scanpy.X)
    # dense input and a cell with zero total
    dense = pbmc3k.X[:50].toarray()
    dense[3] = 0
    out = log1p_normalize(dense)
    assert out[3].nnz == 0
    _assert_close(out[:3], pbmc3k_scanpy.X[:3])


# --------------------------------------------------------------------------------------------
# non-count input: detected, warned, same result


def test_log1p_input_detected(pbmc3k, pbmc3k_scanpy):
    logged = pbmc3k_scanpy.copy()
    assert "log1p" in logged.uns
    with pytest.warns(UserWarning, match="log1p"):
        scxtrimo.pp.normalize(logged)
    assert logged.uns["xtrimo"]["normalize"]["input_kind"] == "log1p"
    _assert_close(logged.X, pbmc3k_scanpy.X)
    # every pbmc3k cell has a gene with count 1, so the estimated counts are the real ones
    assert _same_sparse(logged.layers["counts"], pbmc3k.X)


def test_log1p_input_detected_without_uns_marker(pbmc3k, pbmc3k_scanpy):
    logged = pbmc3k_scanpy.copy()
    del logged.uns["log1p"]
    with pytest.warns(UserWarning, match="log1p-transformed"):
        scxtrimo.pp.normalize(logged)
    assert logged.uns["xtrimo"]["normalize"]["input_kind"] == "log1p"
    _assert_close(logged.X, pbmc3k_scanpy.X)
    assert _same_sparse(logged.layers["counts"], pbmc3k.X)


def test_log1p_of_raw_counts_detected(pbmc3k):
    logged = pbmc3k.copy()
    sc.pp.log1p(logged)  # no normalize_total first
    del logged.uns["log1p"]
    counts, kind = _quiet_to_counts(logged.X)
    assert kind == "log1p"
    assert _same_sparse(counts, pbmc3k.X)


def test_log1p_base_respected(pbmc3k):
    logged = pbmc3k.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged, base=2)
    with pytest.warns(UserWarning):
        counts, kind = to_counts(logged.X, uns=logged.uns)
    assert kind == "log1p"
    assert _same_sparse(counts, pbmc3k.X)


def test_normalized_input_detected(pbmc3k, pbmc3k_scanpy):
    normed = _scanpy_normalized(pbmc3k)
    with pytest.warns(UserWarning, match="normalized"):
        scxtrimo.pp.normalize(normed)
    assert normed.uns["xtrimo"]["normalize"]["input_kind"] == "normalized"
    _assert_close(normed.X, pbmc3k_scanpy.X)
    assert _same_sparse(normed.layers["counts"], pbmc3k.X)


def test_globally_scaled_input(pbmc3k, pbmc3k_scanpy):
    """The appendix's case: one scale for the whole matrix. Same log1p CP10k result."""
    scaled = pbmc3k.copy()
    scaled.X = (pbmc3k.X * np.float32(0.37)).astype(np.float32)
    with pytest.warns(UserWarning, match="smallest non-zero"):
        scxtrimo.pp.normalize(scaled)
    _assert_close(scaled.X, pbmc3k_scanpy.X)


def test_deep_cells_log1p_round_trip(cellbench):
    """cellbench CEL-seq2 cells are deep (thousands of genes, large counts): still exact."""
    logged = _scanpy_log1p(cellbench)
    counts, kind = _quiet_to_counts(logged.X, uns=logged.uns)
    assert kind == "log1p"
    rows = np.flatnonzero(_row_min(cellbench.X) == 1)  # cells whose smallest count is 1
    assert rows.size > 0.9 * cellbench.n_obs
    assert _same_sparse(counts[rows], cellbench.X[rows])
    _assert_close(log1p_normalize(counts), logged.X)


def test_pbmc68k_reduced_low_precision_log_data():
    """scanpy's pbmc68k_reduced keeps log1p values at reduced precision in .raw: still log1p."""
    pb = sc.datasets.pbmc68k_reduced()
    with pytest.warns(UserWarning, match="log1p-transformed"):
        counts, kind = to_counts(pb.raw.X)
    assert kind == "log1p"
    v = counts.data.astype(np.float64)
    assert v.min() == 1.0
    assert (np.abs(v - np.rint(v)) <= 0.01 * v).all()  # whole counts up to the stored precision
    # within each cell the stored values (after expm1) are one scale factor times these counts
    stored = sp.csr_matrix(pb.raw.X, dtype=np.float32)
    stored.eliminate_zeros()
    assert (stored.indices == counts.indices).all()
    ratio = np.expm1(stored.data.astype(np.float64)) / v
    rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    per_cell = pd.Series(ratio).groupby(rows)
    assert (per_cell.std().fillna(0) / per_cell.mean()).max() < 5e-3


def _row_min(X) -> np.ndarray:
    """Smallest non-zero value per row, computed independently of the package."""
    X = sp.csr_matrix(X)
    out = np.zeros(X.shape[0])
    for i in range(X.shape[0]):
        row = X.data[X.indptr[i] : X.indptr[i + 1]]
        row = row[row > 0]
        out[i] = row.min() if row.size else 0
    return out


def _quiet_to_counts(X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return to_counts(X, **kw)


def test_to_counts_kind_override_and_inputs(pbmc3k, pbmc3k_scanpy):
    block = pbmc3k_scanpy.X[:200]
    counts, kind = _quiet_to_counts(block, kind="log1p")
    assert kind == "log1p" and _same_sparse(counts, pbmc3k.X[:200])
    counts, kind = to_counts(pbmc3k.X[:200].toarray())  # dense counts: no warning, same values
    assert kind == "counts" and _same_sparse(counts, pbmc3k.X[:200])
    with pytest.raises(ValueError, match="kind"):
        to_counts(block, kind="raw")
    # to_counts never writes into its input
    before = block.copy()
    _quiet_to_counts(block)
    assert _same_sparse(block, before)


# --------------------------------------------------------------------------------------------
# QC report


def test_low_quality_cells_reported(pbmc3k):
    panel = pbmc3k[:, :4000].copy()  # fewer genes, so some cells fall to <= 200
    n_low = int((np.asarray((panel.X > 0).sum(axis=1)).ravel() <= 200).sum())
    assert 0 < n_low < panel.n_obs
    with pytest.warns(UserWarning, match=r"min_genes=201") as rec:
        scxtrimo.pp.normalize(panel)
    assert any(f"{n_low} of {panel.n_obs} cells" in str(w.message) for w in rec)
    assert panel.uns["xtrimo"]["normalize"]["n_low_quality_cells"] == n_low
    assert panel.n_obs == pbmc3k.n_obs  # reported, not removed


# --------------------------------------------------------------------------------------------
# errors and object semantics


def test_twice_is_an_error(pbmc3k):
    scxtrimo.pp.normalize(pbmc3k)
    first = pbmc3k.X.copy()
    with pytest.raises(ValueError, match="already normalized.*layer='counts'"):
        scxtrimo.pp.normalize(pbmc3k)
    assert _same_sparse(pbmc3k.X, first)
    # the documented way to redo it gives the same result, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        scxtrimo.pp.normalize(pbmc3k, layer="counts")
    _assert_close(pbmc3k.X, first, rtol=0, atol=0)


def test_layer_argument(pbmc3k, pbmc3k_scanpy):
    a = pbmc3k_scanpy.copy()
    a.layers["raw"] = pbmc3k.X.copy()
    a.X = sp.csr_matrix(a.shape, dtype=np.float32)  # X unusable; the layer is read instead
    scxtrimo.pp.normalize(a, layer="raw")
    assert a.uns["xtrimo"]["normalize"]["input_kind"] == "counts"
    _assert_close(a.X, pbmc3k_scanpy.X)
    with pytest.raises(KeyError, match="spliced"):
        scxtrimo.pp.normalize(a, layer="spliced")


def _state(a: ad.AnnData) -> dict:
    return {
        "X": a.X.copy(),
        "layers": {k: v.copy() for k, v in a.layers.items()},
        "obs": a.obs.copy(),
        "uns": copy.deepcopy(dict(a.uns)),
    }


def _assert_state(a: ad.AnnData, s: dict) -> None:
    # element by element, NaN equal to NaN (the failing input may hold one)
    assert type(a.X) is type(s["X"]) and a.X.shape == s["X"].shape
    np.testing.assert_array_equal(a.X.indptr, s["X"].indptr)
    np.testing.assert_array_equal(a.X.indices, s["X"].indices)
    np.testing.assert_array_equal(a.X.data, s["X"].data)
    assert sorted(a.layers.keys()) == sorted(s["layers"])
    pd.testing.assert_frame_equal(a.obs, s["obs"])
    assert sorted(a.uns.keys()) == sorted(s["uns"].keys())


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_bad_values_error_and_leave_adata_untouched(pbmc3k, bad):
    X = pbmc3k.X.copy()
    X.data[5] = bad
    pbmc3k.X = X
    s = _state(pbmc3k)
    with pytest.raises(ValueError, match="negative|NaN"):
        scxtrimo.pp.normalize(pbmc3k)
    _assert_state(pbmc3k, s)
    assert "xtrimo" not in pbmc3k.uns and "xtrimo_n_genes" not in pbmc3k.obs


def test_all_zero_error():
    a = ad.AnnData(
        X=sp.csr_matrix((10, 50), dtype=np.float32),
        var=pd.DataFrame(index=scxtrimo.reference_genes()[:50]),
    )
    s = _state(a)
    with pytest.raises(ValueError, match="all zero"):
        scxtrimo.pp.normalize(a)
    _assert_state(a, s)


def test_copy_true_leaves_input(pbmc3k, pbmc3k_scanpy):
    s = _state(pbmc3k)
    out = scxtrimo.pp.normalize(pbmc3k, copy=True)
    assert isinstance(out, ad.AnnData) and out is not pbmc3k
    _assert_state(pbmc3k, s)
    assert not is_xtrimo_normalized(pbmc3k) and is_xtrimo_normalized(out)
    _assert_close(out.X, pbmc3k_scanpy.X)


def test_backed_is_refused(pbmc3k, tmp_path):
    path = tmp_path / "p.h5ad"
    pbmc3k.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        with pytest.raises(ValueError, match="to_memory"):
            scxtrimo.pp.normalize(backed)
    finally:
        backed.file.close()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_mudata_input(pbmc3k, pbmc3k_scanpy):
    md = pytest.importorskip("mudata")
    mdata = md.MuData({"rna": pbmc3k})
    copied = scxtrimo.pp.normalize(mdata, copy=True)
    assert isinstance(copied, md.MuData)
    assert not is_xtrimo_normalized(mdata) and is_xtrimo_normalized(copied)
    _assert_close(copied["rna"].X, pbmc3k_scanpy.X)
    assert scxtrimo.pp.normalize(mdata) is None
    assert is_xtrimo_normalized(mdata)
    _assert_close(mdata["rna"].X, pbmc3k_scanpy.X)


def test_align_then_normalize(pbmc3k):
    """The usual pipeline: aligned counts, then log1p CP10k over the reference genes."""
    aligned = scxtrimo.pp.align_genes(pbmc3k)
    with pytest.warns(UserWarning, match="200 expressed genes"):  # one cell drops to <= 200
        scxtrimo.pp.normalize(aligned)
    n_low = int((np.diff(aligned.layers["counts"].indptr) <= 200).sum())
    assert aligned.uns["xtrimo"]["normalize"]["n_low_quality_cells"] == n_low == 1
    assert aligned.uns["xtrimo"]["align"]["n_matched"] == 11_213
    sums = np.asarray(np.expm1(aligned.X.astype(np.float64)).sum(axis=1)).ravel()
    np.testing.assert_allclose(sums, 1e4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# markers and layers left by earlier work are checked against the values, never trusted blindly


def test_a_stale_log1p_marker_on_unlogged_values_is_not_trusted(pbmc3k, pbmc3k_scanpy):
    """``uns['log1p']`` left over from earlier work, X holding CP10k (not logged): expm1 of values
    up to 10^4 overflowed and wrote NaN into X and layers['counts']."""
    a = _scanpy_normalized(pbmc3k)
    a.uns["log1p"] = {"base": None}
    with pytest.warns(UserWarning, match="not raw counts"):
        scxtrimo.pp.normalize(a)
    assert np.isfinite(a.X.data).all() and np.isfinite(a.layers["counts"].data).all()
    assert a.uns["xtrimo"]["normalize"]["input_kind"] == "normalized"
    _assert_close(a.X, pbmc3k_scanpy.X)


def test_an_existing_counts_layer_is_read_not_overwritten(pbmc3k, pbmc3k_scanpy):
    """The usual scanpy set-up: counts in layers['counts'], log1p CP10k in X. The counts were
    replaced by estimates from X (a third of them, when each cell's smallest count is 3)."""
    a = pbmc3k.copy()
    a.X = (a.X * 3).tocsr()
    a.layers["counts"] = a.X.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    counts = a.layers["counts"].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # counts are read: nothing to warn about
        scxtrimo.pp.normalize(a)
    assert _same_sparse(a.layers["counts"], counts)
    _assert_close(a.X, pbmc3k_scanpy.X)
    b = pbmc3k.copy()
    b.layers["counts"] = b.X.copy()
    b.layers["spliced"] = b.X.copy()
    before = _state(b)
    with pytest.raises(ValueError, match="layers\\['counts'\\] already"):
        scxtrimo.pp.normalize(b, layer="spliced")
    _assert_state(b, before)


@pytest.mark.parametrize("target_sum", ["1e4", True, 0])
def test_target_sum_must_be_a_positive_number(pbmc3k, target_sum):
    with pytest.raises(ValueError, match="target_sum must be a positive number"):
        scxtrimo.pp.normalize(pbmc3k, target_sum=target_sum)


def test_normalize_then_align_does_not_pass_for_prepared_input(pbmc3k):
    """normalize before align_genes: X is log1p CP10k over the input genes, so after alignment its
    rows no longer sum to 10^4; the normalize marker travelled along and embed took X as it was."""
    from scxtrimo.data._prepare import prepare_input

    a = pbmc3k[:300].copy()
    scxtrimo.pp.normalize(a)
    b = scxtrimo.pp.align_genes(a)
    assert not is_xtrimo_normalized(b) and "align" in b.uns["xtrimo"]
    prep = prepare_input(b)
    assert prep.source == "layers['counts']" and prep.kind == "counts"
    scxtrimo.pp.normalize(b)  # reads the aligned counts
    sums = np.asarray(np.expm1(b.X.astype(np.float64)).sum(axis=1)).ravel()
    np.testing.assert_allclose(sums, 1e4, rtol=1e-4)
