"""tl.evaluate_clustering (appendix 4): bad labels, bad embeddings and unreachable cluster counts
are refused or reported, never scored as if they were fine."""

import numpy as np
import pytest
import scxtrimo
from scxtrimo.tl._clustering import pca_baseline


@pytest.fixture
def cells(pbmc3k):
    """600 pbmc3k cells with scanpy's PCA workflow (20 PCs) as ``obsm['E']``."""
    a = pbmc3k[:600].copy()
    a.obsm["E"] = pca_baseline(a, n_comps=20).obsm["X_pca"]
    return a


def _state(a):
    return {"uns": set(a.uns), "obs": set(a.obs.columns), "obsp": set(a.obsp)}


def test_real_types_score_well_above_shuffled_ones(cells):
    real = scxtrimo.tl.evaluate_clustering(cells, labels_key="cell_type", use_rep="E")
    rng = np.random.default_rng(0)
    cells.obs["shuffled"] = rng.permutation(cells.obs["cell_type"].to_numpy())
    shuffled = scxtrimo.tl.evaluate_clustering(cells, labels_key="shuffled", use_rep="E")
    assert real["n_clusters"] == cells.obs["cell_type"].nunique()
    assert real["ari"] > 0.4 and abs(shuffled["ari"]) < 0.05, (real, shuffled)
    assert cells.uns["xtrimo"]["clustering"]["E"]["ari"] == shuffled["ari"]


@pytest.mark.parametrize("labels", ["missing", "one type"])
def test_labels_without_two_types_are_refused(cells, labels):
    """All-missing labels once scored ARI 1.0: one cluster against 'no labels' is no result."""
    cells.obs["y"] = np.nan if labels == "missing" else "T cell"
    before = _state(cells)
    with pytest.raises(ValueError, match="at least two"):
        scxtrimo.tl.evaluate_clustering(cells, labels_key="y", use_rep="E")
    assert _state(cells) == before


@pytest.mark.parametrize("n", [1, 600])
def test_a_cluster_count_out_of_range_is_refused(cells, n):
    with pytest.raises(ValueError, match="n_clusters"):
        scxtrimo.tl.evaluate_clustering(cells, labels_key="cell_type", use_rep="E", n_clusters=n)


def test_a_non_finite_embedding_is_refused_before_anything_is_written(cells):
    cells.obsm["E"][[3, 7], 0] = np.nan
    before = _state(cells)
    with pytest.raises(ValueError, match="non-finite values in 2 cells"):
        scxtrimo.tl.evaluate_clustering(cells, labels_key="cell_type", use_rep="E")
    assert _state(cells) == before


def test_a_cluster_count_leiden_cannot_reach_is_reported(cells):
    with pytest.warns(UserWarning, match="not the 300 asked for"):
        scores = scxtrimo.tl.evaluate_clustering(cells, labels_key="cell_type", use_rep="E", n_clusters=300)
    assert scores["n_clusters"] < 300


def test_clusters_are_never_written_over_the_labels(cells):
    cells.obs["y"] = cells.obs["cell_type"]
    before = _state(cells)
    with pytest.raises(ValueError, match="key_added='y' is labels_key"):
        scxtrimo.tl.evaluate_clustering(cells, labels_key="y", use_rep="E", key_added="y")
    assert _state(cells) == before and (cells.obs["y"] == cells.obs["cell_type"]).all()


@pytest.mark.parametrize("n", [2.7, "3"])
def test_a_cluster_count_must_be_an_integer(cells, n):
    with pytest.raises(ValueError, match="n_clusters must be a positive integer"):
        scxtrimo.tl.evaluate_clustering(cells, labels_key="cell_type", use_rep="E", n_clusters=n)


def test_a_sparse_embedding_is_named(cells):
    import scipy.sparse as sp

    cells.obsm["S"] = sp.csr_matrix(cells.obsm["E"])
    with pytest.raises(TypeError, match="sparse"):
        scxtrimo.tl.evaluate_clustering(cells, labels_key="cell_type", use_rep="S")
