"""A training-only head that asks the pooled cell embedding for the cell's expression.

Masked regression (paper section 4) trains the decoder to fill in genes from the encoder's
per-gene outputs; nothing in it asks the *pooled* cell embedding, the one ``tl.embed`` returns,
to hold the cell's expression profile, and measured at CPU scale it loses cluster structure as
it trains (``docs/benchmarks.md``, "Gene embeddings from co-expression"). This head adds that
request: from the mean of a corrupted cell's encoder outputs ``c`` it predicts the real cell's
value at each target gene ``g`` as ``<W c + w, e_g> + b_g`` (``e_g`` the model's gene embedding;
``readout="dot"``: ``s <c, e_g> + b_g`` with one learned scale ``s``, so that the geometry of ``c``
itself, the one Leiden sees, is what must predict expression),
a bilinear read-out in the spirit of scGPT's cell-embedding objective and of a factor model such
as PCA, which the cell embedding must beat. It is not in the xTrimoGene paper; the head is
discarded after pretraining and never enters a checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

#: How the cell embedding meets the gene embedding.
READOUTS = ("bilinear", "dot")


class CellExpressionHead(nn.Module):
    """Predict log1p CP10k values at chosen genes from pooled cell embeddings.

    Parameters
    ----------
    enc_dim
        Width ``d`` of the encoder outputs (and of the gene embedding).
    n_genes
        Number of reference genes (one bias per gene).
    readout
        ``"bilinear"`` (a learned ``d x d`` map of the cell embedding) or ``"dot"`` (a learned
        scale only). Both start at the gene biases alone (no pull on the encoder at step 0).

    Raises
    ------
    ValueError
        An unknown ``readout``.
    """

    def __init__(self, enc_dim: int, n_genes: int, readout: str = "bilinear"):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}; got {readout!r}.")
        self.readout = readout
        self.gene_bias = nn.Parameter(torch.zeros(n_genes))
        if readout == "bilinear":
            self.proj = nn.Linear(enc_dim, enc_dim)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, cells: torch.Tensor, gene_embedding: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Predictions at the ``target`` positions, in ``target.nonzero()`` order.

        Parameters
        ----------
        cells
            ``(B, d)`` pooled cell embeddings.
        gene_embedding
            ``(n_rows, d)`` gene embedding table (its first ``n_genes`` rows are the genes).
        target
            ``(B, n_genes)`` bool, where predictions are wanted.

        Returns
        -------
        ``(n_targets,)`` float32 predictions, ``n_targets = target.sum()``.
        """
        rows, cols = target.nonzero(as_tuple=True)
        q = self.proj(cells.float()) if self.readout == "bilinear" else self.scale * cells.float()
        return (q[rows] * gene_embedding[cols].float()).sum(-1) + self.gene_bias[cols]
