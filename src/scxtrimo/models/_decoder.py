"""Full-length Performer decoder (paper section 3.2), built on ``performer-pytorch``."""

from __future__ import annotations

import torch
from performer_pytorch import Performer
from torch import nn


class Decoder(nn.Module):
    """Performer (linear-attention) stack over all genes, then LayerNorm.

    ``forward(x)``: ``(batch, n_genes, dim)`` -> ``(batch, n_genes, dim)``. The random feature
    projections are redrawn every 1,000 training calls (performer-pytorch's default) and are
    saved with the weights, so a loaded model reproduces its outputs exactly.
    """

    def __init__(self, dim: int, depth: int, heads: int, ff_mult: int, nb_features: int | None, dropout: float = 0.0):
        super().__init__()
        self.performer = Performer(
            dim=dim,
            depth=depth,
            heads=heads,
            dim_head=dim // heads,
            ff_mult=ff_mult,
            nb_features=nb_features,
            ff_dropout=dropout,
            attn_dropout=dropout,
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.performer(x))
