"""tl.embed on input that looks right but is not: each case gave a silently different embedding
(or a deep error) before, and now gives the right embedding, a warning or a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import scxtrimo
from scxtrimo.models import XTrimoGene


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return XTrimoGene("xtrimo-3m").eval()


@pytest.fixture(scope="module")
def depth_model():
    import dataclasses

    torch.manual_seed(0)
    return XTrimoGene(dataclasses.replace(scxtrimo.models.CONFIGS["xtrimo-3m"], depth_tokens=True)).eval()


@pytest.fixture(scope="module")
def cells():
    return scxtrimo.datasets.pbmc3k()[:60].copy()


def _embed(adata, model, **kw):
    out = scxtrimo.tl.embed(adata, model=model, progress=False, copy=True, **kw)
    return out.obsm[kw.get("key_added", "X_xtrimo")]


@pytest.mark.parametrize("target_sum", [None, 1e6])
def test_normalize_to_another_target_is_not_taken_as_model_input(cells, model, target_sum):
    """pp.normalize(target_sum=None or 1e6) marks X as normalized, but its values are not log1p CP10k:
    embed read them as prepared input (max difference 0.9 from the raw-count embedding)."""
    expected = _embed(cells, model)
    b = scxtrimo.pp.align_genes(cells)
    scxtrimo.pp.normalize(b, target_sum=target_sum)
    np.testing.assert_allclose(_embed(b, model), expected, atol=1e-5)


def test_values_changed_after_normalize_are_not_taken_as_model_input(cells, model):
    expected = _embed(cells, model)
    b = scxtrimo.pp.align_genes(cells)
    scxtrimo.pp.normalize(b)
    b.X = b.layers["counts"].copy()  # raw counts put back into X by hand: the marker is stale
    np.testing.assert_allclose(_embed(b, model), expected, atol=1e-5)


def test_blocks_of_another_kind_than_the_first_are_refused(cells, model, monkeypatch):
    """The input kind is detected on the first block; log1p rows after raw ones were read as counts."""
    from scxtrimo.data import _prepare

    monkeypatch.setattr(_prepare, "BLOCK_CELLS", 30)
    mixed = cells.copy()
    X = mixed.X.tocsr().astype(np.float32)
    lower = X[30:].copy()
    lower.data = np.log1p(lower.data * 1e4 / np.repeat(np.asarray(lower.sum(1)).ravel(), np.diff(lower.indptr)))
    mixed.X = sp.vstack([X[:30], lower], format="csr")
    before = sorted(mixed.obsm)
    with pytest.raises(ValueError, match="cells 30-59.*not raw counts.*the first cells are"):
        scxtrimo.tl.embed(mixed, model=model, progress=False)
    assert sorted(mixed.obsm) == before


def test_gene_names_with_padding_or_another_case_are_named(cells, model):
    padded = cells.copy()
    padded.var_names = [n + " " if i % 2 else n for i, n in enumerate(padded.var_names)]
    with pytest.warns(UserWarning, match="surrounding spaces or another case"):
        scxtrimo.tl.embed(padded, model=model, progress=False)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target_depth": 0.0}, "target_depth must be a positive number"),  # T silently left out
    ({"target_depth": -1.0, "target_depth_mode": "scale"}, "target_depth must be a positive number"),
    ({"target_depth": "4"}, "target_depth must be a positive number"),
    ({"target_depth": True}, "target_depth must be a positive number"),
])
def test_target_depths_that_drop_the_t_token_are_refused(cells, depth_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        scxtrimo.tl.embed(cells.copy(), model=depth_model, progress=False, **kwargs)


def test_totals_of_at_most_one_are_refused(cells, depth_model):
    a = cells.copy()
    a.obs["total"] = 1.0
    with pytest.raises(ValueError, match="above 1"):
        scxtrimo.tl.embed(a, model=depth_model, total_counts_key="total", progress=False)


def test_prepared_input_with_duplicate_entries_is_summed(cells, model):
    b = scxtrimo.pp.align_genes(cells)
    scxtrimo.pp.normalize(b)
    expected = _embed(b, model)
    X = b.X.tocoo()
    half = X.data / 2  # the same matrix, every value stored as two halves
    b.X = sp.csr_matrix((np.concatenate([half, half]), (np.concatenate([X.row, X.row]), np.concatenate([X.col, X.col]))),
                        shape=X.shape)
    b.X.has_canonical_format = False
    np.testing.assert_allclose(_embed(b, model), expected, atol=1e-5)


@pytest.mark.parametrize("key", [None, "", 5])
def test_key_added_must_be_a_name(cells, model, key):
    a = cells.copy()
    with pytest.raises(ValueError, match="key_added must be a non-empty string"):
        scxtrimo.tl.embed(a, model=model, key_added=key, progress=False)
    assert "xtrimo" not in a.uns


def test_clear_errors_for_no_matrix_a_misspelt_device_and_a_backed_copy(cells, model, tmp_path):
    a = cells.copy()
    a.X = None
    with pytest.raises(ValueError, match="adata.X is None"):
        scxtrimo.tl.embed(a, model=model, progress=False)
    with pytest.raises(ValueError, match="device='gpu'"):
        scxtrimo.tl.embed(cells.copy(), model=model, device="gpu", progress=False)
    cells.write_h5ad(tmp_path / "c.h5ad")
    import anndata as ad

    backed = ad.read_h5ad(tmp_path / "c.h5ad", backed="r")
    with pytest.raises(ValueError, match="copy=False"):
        scxtrimo.tl.embed(backed, model=model, copy=True, progress=False)
    backed.file.close()


def test_overflowed_integer_counts_are_named(cells):
    a = cells[:10].copy()
    a.X = a.X.toarray().astype(np.int8)  # counts above 127 wrap round to negative numbers
    with pytest.raises(ValueError, match="int8.*overflow"):
        scxtrimo.tl.embed(a, progress=False)
