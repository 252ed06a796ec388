"""Real data, real checkpoint, real embedding: the bundled default checkpoint on pbmc3k."""

import numpy as np
import pytest

import scxtrimo
from conftest import DEFAULT


@pytest.fixture(scope="module")
def embedded(pbmc3k_embedded, pbmc3k_sixth):
    """pbmc3k embedded by the bundled checkpoint (``tl.embed`` defaults, the shared fixture), and
    a sixth of its cells also embedded by the same architecture with random weights."""
    adata = pbmc3k_embedded.copy()
    assert adata.uns["xtrimo"]["params"]["model"] == DEFAULT
    return adata, pbmc3k_sixth.copy()


def test_pretrained_beats_random_initialisation(embedded):
    adata, sixth = embedded
    trained = scxtrimo.tl.evaluate_clustering(adata, labels_key="cell_type", use_rep="X_xtrimo")
    assert trained["n_clusters"] == 8
    assert adata.uns["xtrimo"]["params"]["pooling"] == "mean"  # the checkpoint's default, as the floor was measured
    # the floor: measured 0.604 with this checkpoint (Leiden seed 0; seeds 0-2: 0.611 +- 0.014,
    # docs/benchmarks/embedding_quality.csv), less a margin for platform float differences
    assert trained["ari"] >= 0.55, trained
    assert adata.uns["xtrimo"]["clustering"]["X_xtrimo"]["ari"] == trained["ari"]
    # against random weights, on the same 440 cells (measured 0.505 against 0.035; seeds 0-2: 0.504-0.515
    # against 0.032-0.035)
    trained = scxtrimo.tl.evaluate_clustering(sixth, labels_key="cell_type", use_rep="X_xtrimo")
    random = scxtrimo.tl.evaluate_clustering(sixth, labels_key="cell_type", use_rep="X_random")
    assert trained["n_clusters"] == random["n_clusters"] == 8
    assert trained["ari"] > random["ari"] + 0.3, (trained, random)
    assert trained["nmi"] > random["nmi"], (trained, random)
    params = sixth.uns["xtrimo"]["params"]
    assert params["key_added"] == "X_random" and params["model"] == "untrained"
    # each key keeps the record of the call that made it
    by_key = sixth.uns["xtrimo"]["params_by_key"]
    assert by_key["X_random"] == params and by_key["X_xtrimo"]["model"] == DEFAULT


def test_embedding_is_informative(embedded):
    """Cells of one type lie closer together than cells of different types."""
    embedded = embedded[0]
    emb = embedded.obsm["X_xtrimo"]
    z = (emb - emb.mean(0)) / (emb.std(0) + 1e-6)
    labels = embedded.obs["cell_type"].to_numpy()
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(z), (2, 20_000))
    d = np.linalg.norm(z[i] - z[j], axis=1)
    same = labels[i] == labels[j]
    assert d[same].mean() < 0.9 * d[~same].mean()
