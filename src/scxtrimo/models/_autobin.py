"""Auto-discretization value embedding (paper section 3.3)."""

from __future__ import annotations

import torch
from torch import nn


class AutoDiscretization(nn.Module):
    """Embed continuous expression values as soft mixtures of ``n_bins`` learned bin vectors.

    For a scalar value ``v``: ``v1 = v w1`` (1 -> b), ``v2 = LeakyReLU(v1)``,
    ``v3 = w2 v2 + alpha v2`` (b -> b), ``v4 = softmax(v3)`` over the b bins and the embedding
    ``e = T v4`` with a learned look-up table ``T`` (d x b).

    Parameters
    ----------
    n_bins
        Number of bins ``b`` (100 in the paper).
    dim
        Embedding width ``d``.
    alpha
        Residual mixing factor (1.0 in the released model).
    """

    def __init__(self, n_bins: int, dim: int, alpha: float = 1.0):
        super().__init__()
        self.w1 = nn.Linear(1, n_bins)
        self.act = nn.LeakyReLU(0.1)
        self.w2 = nn.Linear(n_bins, n_bins)
        self.alpha = alpha
        self.table = nn.Linear(n_bins, dim, bias=False)

    def bin_weights(self, values: torch.Tensor) -> torch.Tensor:
        """Soft bin assignment ``v4``: ``(...,)`` float values -> ``(..., n_bins)`` summing to 1."""
        v2 = self.act(self.w1(values.unsqueeze(-1)))
        v3 = self.w2(v2) + self.alpha * v2
        return torch.softmax(v3, dim=-1)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """``(...,)`` log1p CP10k values -> ``(..., dim)`` embeddings."""
        return self.table(self.bin_weights(values))
