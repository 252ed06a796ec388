"""Bad arguments to the public functions raise a clear error before anything is written.

Before these checks, ``batch_size=0`` silently meant "the default", a negative batch size or token
budget ran anyway, ``annotate(epochs=0)`` returned an untrained classifier and wrote its guesses,
and ``pretrain(epochs=-1)`` returned an untrained model. Each test also checks that the AnnData is
left as it was.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import scxtrimo
from scxtrimo._validation import check_positive


@pytest.fixture(scope="module")
def cells():
    """40 real pbmc3k cells (raw counts, gene symbols)."""
    return scxtrimo.datasets.pbmc3k()[:40].copy()


def _state(adata):
    return (sorted(adata.obsm), sorted(adata.obs.columns), sorted(adata.uns), sorted(adata.layers))


@pytest.mark.parametrize("value", [1, 3, 2.5, np.int64(4), 1e-4])
def test_check_positive_accepts_positive_numbers(value):
    check_positive("x", value)


@pytest.mark.parametrize("value", [0, -1, -0.5, float("nan"), float("inf"), True, "3", None])
def test_check_positive_refuses_the_rest(value):
    with pytest.raises(ValueError, match="x must be a positive number"):
        check_positive("x", value)


def test_check_positive_integer_and_optional():
    check_positive("n", None, integer=True, optional=True)
    check_positive("n", np.int32(4), integer=True)
    with pytest.raises(ValueError, match="n must be a positive integer, got 4.0"):
        check_positive("n", 4.0, integer=True)  # range(4.0) would fail later, deep in the training loop
    with pytest.raises(ValueError, match="n must be a positive integer \\(or None for the default\\), got 2.5"):
        check_positive("n", 2.5, integer=True, optional=True)


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": -3}, {"batch_size": 1.5},
                                    {"max_tokens": 0}, {"max_tokens": -5}])
def test_embed_refuses_non_positive_batches(cells, kwargs):
    adata = cells.copy()
    before = _state(adata)
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        scxtrimo.tl.embed(adata, progress=False, **kwargs)
    assert _state(adata) == before


def test_gene_embed_refuses_batch_size_zero(cells):
    adata = cells.copy()
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        scxtrimo.tl.gene_embed(adata, genes=["CD3E"], batch_size=0, progress=False)
    assert "X_xtrimo_gene" not in adata.obsm


def test_embed_names_a_missing_gene_symbols_column(cells):
    with pytest.raises(KeyError, match="gene_symbols='symbol' is not a column of adata.var"):
        scxtrimo.tl.embed(cells.copy(), gene_symbols="symbol", progress=False)


def test_embed_warns_about_summed_duplicates_like_align_genes(cells):
    """A reference symbol in two columns is summed on the fly exactly as pp.align_genes sums it, and both say so."""
    names = list(cells.var_names)
    names[names.index("LYZ")] = "CD3E"
    adata = cells[:12].copy()
    adata.var_names = names
    with pytest.warns(UserWarning, match="1 gene symbols occur in more than one column and were summed"):
        scxtrimo.tl.embed(adata, progress=False)
    with pytest.warns(UserWarning, match="were summed"):
        aligned = scxtrimo.pp.align_genes(adata)
    cd3e = scxtrimo.reference_genes().get_loc("CD3E")
    raw = cells[:12].copy()
    expected = raw[:, "CD3E"].X.toarray().ravel() + raw[:, "LYZ"].X.toarray().ravel()
    np.testing.assert_allclose(aligned.X[:, cd3e].toarray().ravel(), expected)
    scxtrimo.tl.embed(aligned, progress=False)
    np.testing.assert_allclose(adata.obsm["X_xtrimo"], aligned.obsm["X_xtrimo"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"patience": 0}, {"batch_size": -1}, {"lr": -1e-4},
                                    {"head_lr": 0.0}, {"epochs": 2.5}])
def test_annotate_refuses_a_schedule_that_trains_nothing(cells, kwargs):
    adata = cells.copy()
    before = _state(adata)
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be a positive"):
        scxtrimo.tl.annotate(adata, labels_key="cell_type", progress=False, **kwargs)
    assert _state(adata) == before


@pytest.mark.parametrize("kwargs", [{"epochs": -1}, {"epochs": 0}, {"max_steps": 0}, {"max_time": 0.0},
                                    {"max_time": float("nan")}])
def test_pretrain_refuses_a_budget_that_trains_nothing(cells, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be a positive"):
        scxtrimo.tl.pretrain(cells, progress=False, **kwargs)


@pytest.mark.parametrize("n_neighbors", [0, 1, 2.5])
def test_evaluate_clustering_refuses_too_few_neighbours(cells, n_neighbors):
    adata = cells.copy()
    adata.obsm["X_test"] = np.random.default_rng(0).normal(size=(adata.n_obs, 5)).astype(np.float32)
    before = _state(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing reaches scanpy or scikit-learn
        with pytest.raises(ValueError, match="n_neighbors must be an integer of at least 2"):
            scxtrimo.tl.evaluate_clustering(adata, labels_key="cell_type", use_rep="X_test", n_neighbors=n_neighbors)
    assert _state(adata) == before
