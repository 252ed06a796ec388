"""Full-attention transformer encoder over the expressed, unmasked genes (paper section 3.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block; attention through torch ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int, ff_mult: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_mult * dim, dim)
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + F.dropout(self.out(a.transpose(1, 2).reshape(b, l, d)), self.dropout, self.training)
        return x + F.dropout(self.ff(self.norm2(x)), self.dropout, self.training)


class Encoder(nn.Module):
    """A stack of :class:`EncoderBlock` and a final LayerNorm.

    ``forward(x, key_padding)``: ``x`` is ``(batch, length, dim)``; ``key_padding`` is a bool
    ``(batch, length)`` tensor, True at real tokens and False at [PAD]. Padded keys are never
    attended to; every row must hold at least one real token.
    """

    def __init__(self, dim: int, depth: int, heads: int, ff_mult: int, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, ff_mult, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        attn_mask = None
        if key_padding is not None and not bool(key_padding.all()):
            attn_mask = key_padding[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.norm(x)
