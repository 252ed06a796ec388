"""scxtrimo.pp.align_genes and its building blocks, on real data (pbmc3k, cellbench)."""

from __future__ import annotations

import copy
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scxtrimo
from scxtrimo.pp import _align
from scxtrimo.pp._align import align_matrix, gene_mapping

REF = scxtrimo.reference_genes()
N_REF = len(REF)


def _column(X, j: int) -> np.ndarray:
    return np.asarray(X[:, j].todense()).ravel() if sp.issparse(X) else np.asarray(X[:, j]).ravel()


def _snapshot(a: ad.AnnData) -> dict:
    return {
        "X": a.X.copy(),
        "var": a.var.copy(),
        "var_names": a.var_names.copy(),
        "obs": a.obs.copy(),
        "uns": copy.deepcopy(dict(a.uns)),
        "obsm": {k: np.array(v, copy=True) for k, v in a.obsm.items()},
        "layers": sorted(a.layers.keys()),
    }


def _assert_same(a: ad.AnnData, snap: dict) -> None:
    assert (a.X != snap["X"]).nnz == 0 and a.X.dtype == snap["X"].dtype
    pd.testing.assert_frame_equal(a.var, snap["var"])
    assert a.var_names.equals(snap["var_names"])
    pd.testing.assert_frame_equal(a.obs, snap["obs"])
    assert sorted(a.uns.keys()) == sorted(snap["uns"].keys())
    assert a.uns["xtrimo"] == snap["uns"]["xtrimo"]
    for k, v in snap["obsm"].items():
        np.testing.assert_array_equal(a.obsm[k], v)
    assert sorted(a.layers.keys()) == snap["layers"]


@pytest.fixture(scope="module")
def pbmc3k_aligned() -> tuple[ad.AnnData, ad.AnnData]:
    raw = scxtrimo.datasets.pbmc3k()
    return raw, scxtrimo.pp.align_genes(raw)


# --------------------------------------------------------------------------------------------
# pbmc3k: the matching and the values


def test_pbmc3k_shape_and_match_count(pbmc3k_aligned):
    raw, out = pbmc3k_aligned
    assert out.shape == (2638, N_REF) == (2638, 19264)
    assert sp.isspmatrix_csr(out.X) and out.X.dtype == np.float32
    assert out.X.has_sorted_indices
    assert (out.X.data != 0).all()
    assert out.var_names.equals(pd.Index(REF.astype(str)))
    assert out.var["xtrimo_matched"].dtype == bool
    assert int(out.var["xtrimo_matched"].sum()) == 11_213
    rec = out.uns["xtrimo"]["align"]
    assert rec["n_input_genes"] == 13_714
    assert rec["n_matched"] == 11_213
    assert rec["fraction_matched"] == pytest.approx(11_213 / 19_264)
    assert rec["n_duplicates"] == 0
    assert out.obs_names.equals(raw.obs_names)
    pd.testing.assert_frame_equal(out.obs.drop(columns="xtrimo_kept_fraction"), raw.obs)


def test_pbmc3k_values_unchanged(pbmc3k_aligned):
    raw, out = pbmc3k_aligned
    for gene in ("CD3D", "MS4A1", "LYZ", "NKG7", "MT-CO1"):
        got = _column(out.X, REF.get_loc(gene))
        want = _column(raw.X, raw.var_names.get_loc(gene))
        np.testing.assert_array_equal(got, want)
        assert want.sum() > 0, gene
    # every matched column, all at once
    mapping = gene_mapping(raw.var_names, REF)
    a = out.X[:, mapping.dst].toarray()
    b = raw.X[:, mapping.src].toarray()
    np.testing.assert_array_equal(a, b)
    # unmatched reference entries are all zero (e.g. the MT-...__chrM duplicates, PCDHA@)
    unmatched = np.flatnonzero(~out.var["xtrimo_matched"].to_numpy())
    assert out.X[:, unmatched].nnz == 0
    assert out.var.loc["MT-ATP6", "xtrimo_matched"]
    assert not out.var.loc["MT-ATP6__chrM", "xtrimo_matched"]
    assert not out.var.loc["PCDHA@", "xtrimo_matched"]


def test_pbmc3k_row_sums_and_kept_fraction(pbmc3k_aligned):
    raw, out = pbmc3k_aligned
    in_ref = raw.var_names.isin(REF)
    want = np.asarray(raw.X[:, np.flatnonzero(in_ref)].sum(axis=1, dtype=np.float64)).ravel()
    got = np.asarray(out.X.sum(axis=1, dtype=np.float64)).ravel()
    np.testing.assert_array_equal(got, want)
    total = np.asarray(raw.X.sum(axis=1, dtype=np.float64)).ravel()
    np.testing.assert_array_equal(total, raw.obs["n_counts"].to_numpy(dtype=np.float64))
    frac = out.obs["xtrimo_kept_fraction"].to_numpy()
    assert ((frac > 0) & (frac <= 1)).all()
    np.testing.assert_allclose(frac, want / total, rtol=1e-12)
    rec = out.uns["xtrimo"]["align"]
    assert rec["kept_fraction_median"] == pytest.approx(np.median(frac))
    assert rec["kept_fraction_min"] == pytest.approx(frac.min())
    assert 0.5 < rec["kept_fraction_min"] < rec["kept_fraction_median"] < 1


def test_align_matrix_formats_and_row_blocks(pbmc3k_aligned):
    raw, out = pbmc3k_aligned
    mapping = gene_mapping(raw.var_names, REF)
    block = slice(100, 400)
    want = out.X[block]
    for X in (raw.X[block], raw.X[block].tocsc(), raw.X[block].toarray(), raw.X[block].astype(np.int64)):
        got = align_matrix(X, mapping, N_REF)
        assert sp.isspmatrix_csr(got) and got.dtype == np.float32 and got.has_sorted_indices
        assert got.shape == (300, N_REF)
        assert (got != want).nnz == 0
    with pytest.raises(ValueError, match="columns"):
        align_matrix(raw.X[:, :100], mapping, N_REF)


def test_zero_total_cell_gets_zero_kept_fraction(pbmc3k):
    sub = pbmc3k[:5].copy()
    X = sub.X.tolil()
    X[2, :] = 0
    sub.X = X.tocsr()
    out = scxtrimo.pp.align_genes(sub)
    frac = out.obs["xtrimo_kept_fraction"].to_numpy()
    assert frac[2] == 0.0 and (frac[[0, 1, 3, 4]] > 0).all()


# --------------------------------------------------------------------------------------------
# cellbench: Ensembl IDs and gene_symbols=


def test_cellbench_symbols_match(cellbench):
    out = scxtrimo.pp.align_genes(cellbench)
    n = out.uns["xtrimo"]["align"]["n_matched"]
    assert n > 14_000, f"cellbench matched only {n} reference genes"
    assert n == 14_823  # data README
    assert out.shape == (1408, N_REF)
    np.testing.assert_array_equal(
        np.asarray(out.X.sum(axis=1)).ravel(),
        np.asarray(cellbench.X[:, np.flatnonzero(cellbench.var_names.isin(REF))].sum(axis=1)).ravel(),
    )


def test_cellbench_ensembl_ids_need_gene_symbols(cellbench):
    by_id = ad.AnnData(
        X=cellbench.X,
        obs=cellbench.obs.copy(),
        var=pd.DataFrame(
            {"symbol": cellbench.var_names.to_numpy()},
            index=pd.Index(cellbench.var["gene_id"].astype(str).to_numpy()),
        ),
    )
    with pytest.raises(ValueError, match=r"gene_symbols='symbol'") as err:
        scxtrimo.pp.align_genes(by_id)
    assert "Ensembl" in str(err.value)
    # without a symbol column the message still says how to fix it
    no_col = ad.AnnData(X=cellbench.X, var=pd.DataFrame(index=by_id.var_names))
    with pytest.raises(ValueError, match="gene_symbols"):
        scxtrimo.pp.align_genes(no_col)

    out = scxtrimo.pp.align_genes(by_id, gene_symbols="symbol")
    ref_out = scxtrimo.pp.align_genes(cellbench)
    assert out.uns["xtrimo"]["align"]["n_matched"] == 14_823
    assert (out.X != ref_out.X).nnz == 0
    with pytest.raises(KeyError, match="not a column"):
        scxtrimo.pp.align_genes(by_id, gene_symbols="gene_name")


# --------------------------------------------------------------------------------------------
# duplicates, bad names, bad values


def test_duplicate_symbols_are_summed_with_warning(pbmc3k):
    # Give a gene outside the reference list the symbol CD3D, as a symbol column would.
    symbols = pbmc3k.var_names.to_numpy().copy()
    # the donor: the most expressed gene outside the reference list, so the sum is visible
    outside = np.flatnonzero(~pbmc3k.var_names.isin(REF))
    donor = int(outside[np.argmax(np.asarray(pbmc3k.X[:, outside].sum(axis=0)).ravel())])
    symbols[donor] = "CD3D"
    pbmc3k.var["symbol"] = symbols
    with pytest.warns(UserWarning, match="CD3D"):
        out = scxtrimo.pp.align_genes(pbmc3k, gene_symbols="symbol")
    want = _column(pbmc3k.X, pbmc3k.var_names.get_loc("CD3D")) + _column(pbmc3k.X, donor)
    np.testing.assert_allclose(_column(out.X, REF.get_loc("CD3D")), want)
    assert out.uns["xtrimo"]["align"]["n_duplicates"] == 1
    assert out.uns["xtrimo"]["align"]["n_matched"] == 11_213


def test_mouse_like_symbols_error(pbmc3k):
    mouse = ad.AnnData(
        X=pbmc3k.X, var=pd.DataFrame(index=[s[:1] + s[1:].lower() for s in pbmc3k.var_names])
    )
    with pytest.raises(ValueError, match="mouse") as err:
        scxtrimo.pp.align_genes(mouse)
    msg = str(err.value)
    assert "orthologs" in msg and "Unmatched examples" in msg


def test_targeted_panel_warns_but_aligns(pbmc3k):
    panel_genes = np.flatnonzero(pbmc3k.var_names.isin(REF))[:300]
    panel = pbmc3k[:, panel_genes].copy()
    with pytest.warns(UserWarning, match="targeted gene panel"):
        out = scxtrimo.pp.align_genes(panel)
    assert out.uns["xtrimo"]["align"]["n_matched"] == 300


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_bad_values_error(pbmc3k, bad):
    X = pbmc3k.X.copy()
    X.data[10] = bad
    pbmc3k.X = X
    with pytest.raises(ValueError, match="negative|NaN"):
        scxtrimo.pp.align_genes(pbmc3k)


def test_bad_values_in_counts_layer_error():
    genes = REF[:2000]
    X = sp.random(20, 2000, density=0.1, format="csr", random_state=0, dtype=np.float32)
    counts = X.copy()
    counts.data[0] = -3
    a = ad.AnnData(X=X, var=pd.DataFrame(index=genes), layers={"counts": counts})
    with pytest.raises(ValueError, match=r"layers\['counts'\].*negative"):
        scxtrimo.pp.align_genes(a)


def test_gene_list_must_be_unique(pbmc3k):
    with pytest.raises(ValueError, match="unique"):
        scxtrimo.pp.align_genes(pbmc3k, gene_list=["CD3D", "CD3D", "LYZ"])


# --------------------------------------------------------------------------------------------
# object semantics


def test_input_not_modified(pbmc3k):
    pbmc3k.obsm["X_test"] = np.arange(pbmc3k.n_obs * 2, dtype=float).reshape(-1, 2)
    pbmc3k.uns["xtrimo"] = {"earlier": 1}
    snap = _snapshot(pbmc3k)
    out = scxtrimo.pp.align_genes(pbmc3k)
    _assert_same(pbmc3k, snap)
    assert "align" not in pbmc3k.uns["xtrimo"]
    assert out.uns["xtrimo"] == {"earlier": 1, "align": out.uns["xtrimo"]["align"]}
    # a failing call leaves it alone too
    with pytest.raises(ValueError):
        scxtrimo.pp.align_genes(pbmc3k, gene_list=[g.lower() for g in REF])
    with pytest.raises(KeyError):
        scxtrimo.pp.align_genes(pbmc3k, gene_symbols="nope")
    _assert_same(pbmc3k, snap)


def test_copy_semantics(pbmc3k):
    pbmc3k.obsm["X_test"] = np.ones((pbmc3k.n_obs, 2))
    pbmc3k.uns["note"] = {"a": [1, 2]}
    shared = scxtrimo.pp.align_genes(pbmc3k)
    assert shared.obsm["X_test"] is pbmc3k.obsm["X_test"]
    assert shared.uns["note"] is pbmc3k.uns["note"]
    owned = scxtrimo.pp.align_genes(pbmc3k, copy=True)
    assert owned.obsm["X_test"] is not pbmc3k.obsm["X_test"]
    np.testing.assert_array_equal(owned.obsm["X_test"], pbmc3k.obsm["X_test"])
    owned.uns["note"]["a"].append(3)
    assert pbmc3k.uns["note"] == {"a": [1, 2]}


def test_counts_layer_is_aligned_too(pbmc3k):
    counts = pbmc3k.X.copy()
    pbmc3k.layers["counts"] = counts
    scale = 1e4 / np.asarray(counts.sum(axis=1)).ravel()
    pbmc3k.X = sp.csr_matrix(sp.diags(scale) @ counts, dtype=np.float32)
    out = scxtrimo.pp.align_genes(pbmc3k)
    ref = scxtrimo.pp.align_genes(ad.AnnData(X=counts, var=pbmc3k.var, obs=pbmc3k.obs))
    assert (out.layers["counts"] != ref.X).nnz == 0
    np.testing.assert_array_equal(
        out.obs["xtrimo_kept_fraction"].to_numpy(), ref.obs["xtrimo_kept_fraction"].to_numpy()
    )
    j = REF.get_loc("LYZ")
    np.testing.assert_array_equal(_column(out.X, j), _column(pbmc3k.X, pbmc3k.var_names.get_loc("LYZ")))


def test_backed_equals_in_memory(pbmc3k, tmp_path, monkeypatch):
    path = tmp_path / "pbmc3k.h5ad"
    pbmc3k.write_h5ad(path)
    mem = scxtrimo.pp.align_genes(pbmc3k)
    monkeypatch.setattr(_align, "_CHUNK_SIZE", 1000)  # three blocks
    backed = ad.read_h5ad(path, backed="r")
    try:
        out = scxtrimo.pp.align_genes(backed)
    finally:
        backed.file.close()
    assert not out.isbacked
    assert out.shape == mem.shape
    assert (out.X != mem.X).nnz == 0 and out.X.has_sorted_indices
    pd.testing.assert_frame_equal(out.obs, mem.obs)
    assert out.uns["xtrimo"]["align"] == mem.uns["xtrimo"]["align"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_mudata_input(pbmc3k):
    md = pytest.importorskip("mudata")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mdata = md.MuData({"rna": pbmc3k})
    out = scxtrimo.pp.align_genes(mdata)
    assert isinstance(out, ad.AnnData) and out.shape == (2638, N_REF)
    assert out.uns["xtrimo"]["align"]["n_matched"] == 11_213


def test_gene_mapping_fields(pbmc3k):
    m = gene_mapping(pbmc3k.var_names, REF)
    assert m.src.dtype == np.int64 and m.dst.dtype == np.int64 and m.src.size == m.dst.size == 11_213
    assert m.n_input_genes == 13_714 and m.n_matched == 11_213 and m.duplicates == []
    assert len(m.unmatched_examples) == 10
    assert not set(m.unmatched_examples) & set(REF)
    assert (REF[m.dst] == pbmc3k.var_names[m.src]).all()


def test_counts_in_a_layer_with_no_x_are_aligned(pbmc3k):
    a = pbmc3k[:50].copy()
    a.layers["counts"] = a.X.copy()
    a.X = None
    out = scxtrimo.pp.align_genes(a)
    assert out.X is None and out.layers["counts"].shape == (50, 19_264)
    expected = scxtrimo.pp.align_genes(pbmc3k[:50].copy()).X
    assert (out.layers["counts"] != expected).nnz == 0


@pytest.mark.parametrize("gene_list", [[], "CD3E"])
def test_an_empty_or_string_gene_list_is_refused(pbmc3k, gene_list):
    with pytest.raises((ValueError, TypeError), match="gene_list"):
        scxtrimo.pp.align_genes(pbmc3k, gene_list=gene_list)
