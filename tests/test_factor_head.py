"""The factor-score term: least-squares scores on the gene embedding table, and the head that regresses them."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import scxtrimo
from conftest import DEFAULT
from scxtrimo.models import FactorScoreHead, factor_projection


@pytest.fixture(scope="module")
def table_and_values(pbmc3k_session):
    """The bundled model's gene rows and pbmc3k's log1p CP10k values on the reference genes."""
    model = scxtrimo.models.load(DEFAULT)
    rows = model.gene_embedding.weight.detach()[: model.config.n_genes]
    a = scxtrimo.pp.align_genes(pbmc3k_session, copy=True)
    scxtrimo.pp.normalize(a)
    X = torch.from_numpy(sp.csr_matrix(a.X).toarray().astype(np.float32))
    return rows, X, a.obs["cell_type"].astype(str).to_numpy()


def test_factor_projection_recovers_the_scores_of_cells_in_the_span(table_and_values):
    """x = c E^T is mapped back to c exactly (the real 19,264 x 128 table); a rank-deficient
    table still has a finite map (the ridge)."""
    rows, _, _ = table_and_values
    P = factor_projection(rows)
    assert P.shape == rows.shape and P.dtype == torch.float32
    c = torch.randn(6, rows.shape[1], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(((c.double() @ rows.double().T).float()) @ P, c, atol=2e-3, rtol=0)
    twice = torch.cat([rows[:, :4], rows[:, :4]], 1)  # two identical columns
    assert torch.isfinite(factor_projection(twice)).all()


def test_factor_scores_of_the_bundled_table_separate_pbmc3k_cell_types(table_and_values):
    """The teacher carries cell type: 10-nearest-neighbour label agreement of pbmc3k's factor
    scores is far above what the labels' frequencies give by chance."""
    rows, X, labels = table_and_values
    f = (X @ factor_projection(rows)).numpy()
    f = (f - f.mean(0)) / f.std(0)
    sq = (f * f).sum(1)
    d = sq[:, None] + sq[None, :] - 2 * f @ f.T  # squared distances, without a cells x cells x d array
    np.fill_diagonal(d, np.inf)
    nn = np.argpartition(d, 10, axis=1)[:, :10]
    agree = float((labels[nn] == labels[:, None]).mean())
    _, counts = np.unique(labels, return_counts=True)
    chance = float(((counts / counts.sum()) ** 2).sum())
    assert agree > 0.8 and agree > 2.5 * chance


def test_factor_head_standardizes_its_targets_and_starts_without_pull(table_and_values):
    """Targets of the fitting cells have mean 0 and overall sd 1; at the start (scale 0, shift 0)
    the loss is the targets' mean square per cell and gives the cells no gradient; cells equal to
    their targets (no rotation, scale 1) cost nothing."""
    rows, X, _ = table_and_values
    sample = X[:512]
    head = FactorScoreHead(rows, sample)
    t = head.targets(sample)
    assert t.shape == (512, rows.shape[1])
    assert float(t.mean(0).abs().max()) < 1e-4
    assert float(t.std()) == pytest.approx(1.0, rel=1e-3)
    cells = torch.randn(16, rows.shape[1], requires_grad=True)
    loss = head(cells, X[:16])
    assert loss.item() == pytest.approx(float(head.targets(X[:16]).pow(2).mean(-1).sum()), rel=1e-5)
    loss.backward()
    assert float(cells.grad.abs().max()) == 0.0
    with torch.no_grad():
        head.scale.fill_(1.0)
        head.rotation.weight = torch.eye(rows.shape[1])
    assert head(head.targets(X[:16]), X[:16]).item() < 1e-8


def test_align_finds_the_rotation_scale_and_shift_of_a_similar_geometry(table_and_values):
    """Embeddings that are a rotated, scaled, shifted copy of the targets are aligned to them
    exactly (orthogonal Procrustes), and the rotation stays orthogonal; alignment never raises
    the loss of the starting head."""
    rows, X, _ = table_and_values
    head = FactorScoreHead(rows, X[:512])
    t = head.targets(X[:512])
    q, _ = torch.linalg.qr(torch.randn(t.shape[1], t.shape[1], generator=torch.Generator().manual_seed(1)))
    cells = 0.3 * t @ q + 2.0
    before = head(cells, X[:512]).item() / 512
    after = head.align(cells, X[:512])
    assert after < 1e-6 < before
    assert float(head.scale) == pytest.approx(1 / 0.3, rel=1e-4)
    w = head.rotation.weight.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0]), atol=1e-4, rtol=0)
    noise = torch.randn(512, t.shape[1], generator=torch.Generator().manual_seed(2))
    fresh = FactorScoreHead(rows, X[:512])
    assert fresh.align(noise, X[:512]) <= fresh(noise, X[:512]).item() / 512 + 1e-6
