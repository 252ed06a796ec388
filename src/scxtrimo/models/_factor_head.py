"""A training-only head that asks the pooled cell embedding for the cell's co-expression factor scores.

The gene embedding table, started from co-expression (:func:`~scxtrimo.models.init_gene_embedding`)
and frozen, is a factor model of expression: gene ``g`` has the loadings ``e_g``. The least-squares
scores of a cell on those factors, ``f = (E^T E)^{-1} E^T x`` for its log1p CP10k vector ``x`` over
all reference genes, are a fixed linear map of the cell (:func:`factor_projection`), and on the
shared labelled sets they cluster cell types better than scanpy's PCA workflow fitted on each set
(``docs/benchmarks.md``, "Factor scores of the gene table"). The cell-level term of
:class:`~scxtrimo.models.CellExpressionHead` asks for the same thing indirectly, through the few
masked genes of each step; this head asks for it directly: the mean-pooled encoder output of the
corrupted (masked, thinned) cell, up to a learned rotation, one learned scale and a shift, must
equal the real cell's standardized factor scores. Rotation, scale and shift leave every distance
ratio unchanged, so the geometry of the embedding ``tl.embed`` returns, what a kNN graph and Leiden
see, is what is trained, not its coordinates. Not in the xTrimoGene paper (a
distillation of a linear teacher into the encoder); the head is discarded after pretraining.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations


def factor_projection(gene_rows: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """``(n_genes, d)`` map ``P = E (E^T E + ridge * tr/d I)^{-1}`` from log1p CP10k to factor scores.

    Parameters
    ----------
    gene_rows
        ``(n_genes, d)`` gene embedding rows ``E`` (the reference genes only, no depth rows).
    ridge
        Relative ridge added to ``E^T E`` (times its mean diagonal) so that a rank-deficient table
        still has an inverse.

    Returns
    -------
    ``(n_genes, d)`` float32 on ``gene_rows``' device: ``x @ P`` are the least-squares scores of
    the cells ``x`` on the factors ``E``.
    """
    E = gene_rows.detach().double()
    G = E.T @ E
    G = G + ridge * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G, E.T).T.float()


class FactorScoreHead(nn.Module):
    """Regress standardized factor scores of the real cells from pooled cell embeddings, up to a
    rotation, a scale and a shift (learned; :meth:`align` sets them in closed form).

    Parameters
    ----------
    gene_rows
        ``(n_genes, d)`` gene embedding rows of the model at the start of training (the teacher;
        freeze the table, ``gene_lr_scale=0``, so that teacher and model agree).
    values
        ``(n, n_genes)`` log1p CP10k of some training cells: the targets are centred by their
        mean scores and divided by the scores' overall standard deviation, so that the term's
        MSE starts near 1 whatever the table's scale.
    """

    def __init__(self, gene_rows: torch.Tensor, values: torch.Tensor):
        super().__init__()
        proj = factor_projection(gene_rows)
        self.register_buffer("proj", proj, persistent=False)
        scores = values.float().to(proj.device) @ proj
        self.register_buffer("center", scores.mean(0), persistent=False)
        self.register_buffer("spread", (scores - scores.mean(0)).std().clamp(min=1e-12), persistent=False)
        d = proj.shape[1]
        self.rotation = parametrizations.orthogonal(nn.Linear(d, d, bias=False))
        self.scale = nn.Parameter(torch.zeros(()))
        self.shift = nn.Parameter(torch.zeros(d))

    @torch.no_grad()
    def align(self, cells: torch.Tensor, values: torch.Tensor) -> float:
        """Set rotation, scale and shift to their least-squares values (orthogonal Procrustes).

        ``cells``: ``(n, d)`` pooled embeddings; ``values``: ``(n, n_genes)`` log1p CP10k of the
        same cells. Call it once before training, so that the term pulls the encoder towards the
        targets' geometry from the first step. Returns the term's MSE after the alignment.
        """
        c = cells.float()
        t = self.targets(values)
        cc, tc = c - c.mean(0), t - t.mean(0)
        u, sig, vh = torch.linalg.svd(cc.T @ tc)
        rot = u @ vh  # (d, d): cells @ rot is nearest to the targets
        self.rotation.weight = rot.T  # nn.Linear computes x @ weight.T
        self.scale.fill_(float(sig.sum() / cc.pow(2).sum().clamp(min=1e-12)))
        self.shift.copy_(t.mean(0) - self.scale * (c.mean(0) @ rot))
        return float((self._predict(c) - t).pow(2).mean())

    def _predict(self, cells: torch.Tensor) -> torch.Tensor:
        return self.scale * self.rotation(cells.float()) + self.shift

    def targets(self, values: torch.Tensor) -> torch.Tensor:
        """``(B, d)`` standardized factor scores of ``(B, n_genes)`` log1p CP10k ``values``."""
        return (values.float() @ self.proj - self.center) / self.spread

    def forward(self, cells: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Sum over cells of the mean squared error over the ``d`` factors (float32 scalar).

        ``cells``: ``(B, d)`` pooled embeddings of the corrupted cells; ``values``: ``(B, n_genes)``
        log1p CP10k of the real cells. Before :meth:`align` it is ``B`` times about 1 (the scale
        starts at 0: no pull on the encoder until the head has found the direction).
        """
        return (self._predict(cells) - self.targets(values)).pow(2).mean(-1).sum()
