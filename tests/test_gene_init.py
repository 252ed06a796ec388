"""Gene embeddings initialised from co-expression (scxtrimo.models.init_gene_embedding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scxtrimo
from scxtrimo.models import XTrimoGene, init_gene_embedding
from scxtrimo.models._gene_init import coexpression_loadings


@pytest.fixture(scope="module")
def loadings(pbmc3k_prepared):
    return coexpression_loadings(pbmc3k_prepared.X, 32, random_state=0)


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_coexpression_loadings_place_marker_genes_by_cell_type(pbmc3k_prepared, loadings):
    """B-cell markers sit together, away from T-cell and monocyte markers; components are orthogonal."""
    L, used = loadings
    assert L.shape == (19264, 32) and L.dtype == np.float32 and used.shape == (19264,)
    expressed = np.diff(pbmc3k_prepared.X.tocsc().indptr)
    np.testing.assert_array_equal(used, expressed >= 10)
    assert not L[~used].any()
    s = np.linalg.norm(L, axis=0)
    assert np.all(np.diff(s) <= 1e-3 * s[0])  # ordered by singular value
    V = L / s
    np.testing.assert_allclose(V.T @ V, np.eye(32), atol=1e-4)
    row = {g: L[i] for i, g in enumerate(pbmc3k_prepared.var_names) if g in {"CD79A", "MS4A1", "CD3E", "LYZ"}}
    assert _cos(row["CD79A"], row["MS4A1"]) > 0.8
    assert max(_cos(row["CD79A"], row["CD3E"]), _cos(row["CD79A"], row["LYZ"])) < 0.3


def test_coexpression_loadings_are_deterministic(pbmc3k_prepared, loadings):
    again, _ = coexpression_loadings(pbmc3k_prepared.X, 32, random_state=0)
    np.testing.assert_allclose(again, loadings[0], rtol=1e-4, atol=1e-5)


def test_too_few_cells_for_the_width_is_refused(pbmc3k_prepared):
    with pytest.raises(ValueError, match="more than 32 cells"):
        coexpression_loadings(pbmc3k_prepared.X[:20], 32)


def test_init_sets_the_used_rows_and_keeps_the_rest(pbmc3k_prepared, tiny_config):
    torch.manual_seed(0)
    model = XTrimoGene(tiny_config)
    before = model.gene_embedding.weight.detach().clone()
    table = model.value_embedding.table.weight.detach().clone()
    n = init_gene_embedding(model, pbmc3k_prepared.X)
    after = model.gene_embedding.weight.detach()
    changed = (after != before).any(1).numpy()
    assert n == changed.sum() > 5000
    assert after[torch.from_numpy(changed)].std().item() == pytest.approx(0.5, rel=1e-3)
    assert torch.equal(model.value_embedding.table.weight, table)  # value_scale=1: untouched
    init_gene_embedding(model, pbmc3k_prepared.X, value_scale=10.0)
    torch.testing.assert_close(model.value_embedding.table.weight, 10 * table)
    with pytest.raises(ValueError, match="reference genes"):
        init_gene_embedding(model, pbmc3k_prepared.X[:, :100])


def test_a_coexpression_initialised_model_clusters_cells_before_any_training(pbmc3k_prepared, pbmc3k_sixth):
    """The point of the initialisation: untrained xtrimo-3m, mean pooling, pbmc3k (Leiden at the
    labelled number of types): ARI far above the same network with random gene embeddings
    (``pbmc3k_sixth``'s ``X_random``: seed 0, as here before the initialisation)."""
    cells = pbmc3k_sixth.copy()  # 440 cells, all 8 types
    torch.manual_seed(0)
    model = XTrimoGene("xtrimo-3m").eval()
    init_gene_embedding(model, pbmc3k_prepared.X)
    scxtrimo.tl.embed(cells, model=model, pooling="mean", key_added="X_coexpression", progress=False, device="cpu")
    scores = {init: scxtrimo.tl.evaluate_clustering(cells, use_rep=f"X_{init}", labels_key="cell_type",
                                                    random_state=0)["ari"] for init in ("random", "coexpression")}
    assert scores["random"] < 0.15  # measured 0.04 (Leiden seeds 0-2: 0.022-0.036)
    assert scores["coexpression"] > 0.3  # measured 0.40 (seeds 0-2: 0.398-0.422; the table from pbmc3k alone)


def test_pretrain_starts_from_the_coexpression_table(pbmc3k, tiny_config, pretrain_files):
    model, _ = scxtrimo.tl.pretrain(pbmc3k[:300].copy(), config=tiny_config, gene_init="coexpression", max_steps=1,
                                    batch_size=4, lr=1e-6, eval_every=0, eval_cells=4, progress=False, device="cpu")
    assert model.metadata["gene_init"] == "coexpression"
    rows = model.gene_embedding.weight.detach()
    big = rows.abs().amax(1) > 0.2  # co-expression rows (sd 0.5) stand out from random ones (sd 0.02)
    assert 3000 < int(big.sum()) < 19264
    assert rows[big].std().item() == pytest.approx(0.5, rel=0.02)
    with pytest.raises(ValueError, match="streamed"):
        scxtrimo.tl.pretrain([str(p) for p in pretrain_files], config=tiny_config, gene_init="coexpression",
                             max_steps=1, progress=False)
    with pytest.raises(ValueError, match="Unknown gene_init"):
        scxtrimo.tl.pretrain(pbmc3k[:50], config=tiny_config, gene_init="gene2vec", max_steps=1, progress=False)
    with pytest.raises(ValueError, match="a new model"):  # not silently skipped (nor recorded) for a given model
        scxtrimo.tl.pretrain(pbmc3k[:50], model=model, gene_init="coexpression", max_steps=1, progress=False)
