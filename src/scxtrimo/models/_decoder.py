"""Full-length Performer decoder (paper section 3.2), built on ``performer-pytorch``."""

from __future__ import annotations

import torch
from performer_pytorch import Performer
from performer_pytorch.performer_pytorch import FastAttention, linear_attention
from torch import nn


def softmax_features(x: torch.Tensor, projection: torch.Tensor, *, is_query: bool,
                     key_dims: tuple[int, ...] | None = (1, 2, 3)) -> torch.Tensor:
    """Positive random features of the softmax kernel, with the key maximum taken per cell.

    ``x``: ``(B, h, N, dh)`` queries or keys; ``projection``: ``(m, dh)`` random features.
    Features are ``m**-0.5 * (exp(u - |c x|^2 / 2 - M) + 1e-4)`` with ``u = (c x) P^T`` and
    ``c = dh**-0.25``. ``M`` is the maximum of ``u`` over the features of each query row, and
    for keys over everything one cell holds (every head, position and feature), so that a
    cell's features never depend on which cells share its batch (the authors' released model
    takes it over the whole key tensor, which for one cell is the same; ``key_dims=None`` does
    that for a whole batch, as the authors' batched mode). Returns ``(B, h, N, m)``.
    """
    c = x.shape[-1] ** -0.25
    u = torch.einsum("bhnd,md->bhnm", c * x, projection.type_as(x))  # (B, h, N, m)
    diag = (x * x).sum(-1, keepdim=True) * (c * c / 2.0)  # (B, h, N, 1)
    if is_query:
        top = u.amax(dim=-1, keepdim=True)
    else:
        top = u.amax() if key_dims is None else u.amax(dim=key_dims, keepdim=True)
    return projection.shape[0] ** -0.5 * (torch.exp(u - diag - top.detach()) + 1e-4)


class CellKeyFastAttention(FastAttention):
    """performer-pytorch's non-causal softmax-kernel attention with a per-cell key maximum."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = softmax_features(q, self.projection_matrix, is_query=True)
        k = softmax_features(k, self.projection_matrix, is_query=False)
        return linear_attention(q, k, v)


class Decoder(nn.Module):
    """Performer (linear-attention) stack over all genes, then LayerNorm.

    ``forward(x)``: ``(batch, n_genes, dim)`` -> ``(batch, n_genes, dim)``. Each layer is
    ``x + Attention(LN(x))`` then ``x + FFN(LN(x))`` with an exact-GELU feed-forward of
    ``ff_mult x dim``. The random feature projections are redrawn every 1,000 training calls
    (performer-pytorch's default) and are saved with the weights, so a loaded model reproduces
    its outputs exactly. ``key_max="cell"`` replaces performer-pytorch's per-head key maximum
    by a per-cell one (:func:`softmax_features`).
    """

    def __init__(self, dim: int, depth: int, heads: int, ff_mult: int, nb_features: int | None, dropout: float = 0.0,
                 *, dim_head: int | None = None, key_max: str = "head"):
        super().__init__()
        self.performer = Performer(
            dim=dim,
            depth=depth,
            heads=heads,
            dim_head=dim_head or dim // heads,
            ff_mult=ff_mult,
            nb_features=nb_features,
            ff_dropout=dropout,
            attn_dropout=dropout,
        )
        if key_max == "cell":
            for layer in self.performer.net.layers:
                attn = layer[0].fn
                old = attn.fast_attention
                new = CellKeyFastAttention(old.dim_heads, old.nb_features)
                new.projection_matrix.copy_(old.projection_matrix)
                attn.fast_attention = new
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.performer(x))
