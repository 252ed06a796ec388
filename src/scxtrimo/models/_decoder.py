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


class WeightedFastAttention(FastAttention):
    """performer-pytorch's non-causal softmax-kernel attention, with a choice of key maximum and
    optional per-token key weights.

    ``key_max="head"`` takes the key maximum per cell and head (performer-pytorch's own
    computation, used as is when no weights are set); ``"cell"`` per cell over every head,
    position and feature (:func:`softmax_features`). ``key_weight``, when set (``(B, 1, N, 1)``,
    by :meth:`Decoder.forward`), multiplies each key's features: a token of weight ``w`` counts
    in every query's attention sums as ``w`` copies of itself.
    """

    def __init__(self, dim_heads: int, nb_features: int, key_max: str = "head"):
        super().__init__(dim_heads, nb_features)
        self.key_dims = (1, 2, 3) if key_max == "cell" else (2, 3)
        self.key_weight: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.key_weight is None and self.key_dims == (2, 3):
            return super().forward(q, k, v)
        q = softmax_features(q, self.projection_matrix, is_query=True)
        k = softmax_features(k, self.projection_matrix, is_query=False, key_dims=self.key_dims)
        if self.key_weight is not None:
            k = k * self.key_weight.to(k.dtype)
        return linear_attention(q, k, v)


class Decoder(nn.Module):
    """Performer (linear-attention) stack over all genes, then LayerNorm.

    ``forward(x)``: ``(batch, n_genes, dim)`` -> ``(batch, n_genes, dim)``. Each layer is
    ``x + Attention(LN(x))`` then ``x + FFN(LN(x))`` with an exact-GELU feed-forward of
    ``ff_mult x dim``. The random feature projections are saved with the weights, so a loaded
    model reproduces its outputs exactly; ``redraw_interval`` training calls redraw them
    (performer-pytorch's default is 1,000), ``None`` keeps them fixed. ``key_max="cell"``
    replaces performer-pytorch's per-head key maximum by a per-cell one (:func:`softmax_features`).
    """

    def __init__(self, dim: int, depth: int, heads: int, ff_mult: int, nb_features: int | None, dropout: float = 0.0,
                 *, dim_head: int | None = None, key_max: str = "head", redraw_interval: int | None = None):
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
            feature_redraw_interval=redraw_interval,
        )
        for layer in self.performer.net.layers:
            attn = layer[0].fn
            old = attn.fast_attention
            new = WeightedFastAttention(old.dim_heads, old.nb_features, key_max)
            new.projection_matrix.copy_(old.projection_matrix)
            attn.fast_attention = new
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, key_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B, N, dim)``; ``key_weight``: optional ``(B, N)`` weight of each token as a key
        (:class:`WeightedFastAttention`; ``None``: every token counts once)."""
        if key_weight is None:
            return self.norm(self.performer(x))
        attentions = [m for m in self.modules() if isinstance(m, WeightedFastAttention)]
        for attn in attentions:
            attn.key_weight = key_weight[:, None, :, None]
        try:
            return self.norm(self.performer(x))
        finally:
            for attn in attentions:
                attn.key_weight = None
