"""Full-attention transformer encoder over the expressed, unmasked genes (paper section 3.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class EncoderBlock(nn.Module):
    """Transformer block; attention through torch ``scaled_dot_product_attention``.

    ``norm_first=True``: ``x + f(LN(x))`` (pre-LayerNorm, scxtrimo's default);
    ``norm_first=False``: ``LN(x + f(x))`` (post-LayerNorm, the authors' released model and
    torch's ``TransformerEncoderLayer`` default). ``qkv`` holds the query, key and value
    projections stacked in that order, head ``h`` using rows ``h*dh .. (h+1)*dh - 1`` of each.
    """

    def __init__(self, dim: int, heads: int, ff_mult: int, dropout: float = 0.0, *, norm_first: bool = True,
                 activation: str = "gelu"):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_mult * dim), _ACTIVATIONS[activation](), nn.Dropout(dropout), nn.Linear(ff_mult * dim, dim)
        )

    def _attend(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, l, d = x.shape  # (B, L, d)
        q, k, v = self.qkv(x).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, dh)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return F.dropout(self.out(a.transpose(1, 2).reshape(b, l, d)), self.dropout, self.training)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        if self.norm_first:
            x = x + self._attend(self.norm1(x), attn_mask)
            return x + F.dropout(self.ff(self.norm2(x)), self.dropout, self.training)
        x = self.norm1(x + self._attend(x, attn_mask))
        return self.norm2(x + F.dropout(self.ff(x), self.dropout, self.training))


class Encoder(nn.Module):
    """A stack of :class:`EncoderBlock` and a final LayerNorm.

    ``forward(x, key_padding)``: ``x`` is ``(batch, length, dim)``; ``key_padding`` is a bool
    ``(batch, length)`` tensor, True at real tokens and False at [PAD]. Padded keys are never
    attended to; every row must hold at least one real token.
    """

    def __init__(self, dim: int, depth: int, heads: int, ff_mult: int, dropout: float = 0.0, *, norm_first: bool = True,
                 activation: str = "gelu"):
        super().__init__()
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, heads, ff_mult, dropout, norm_first=norm_first, activation=activation) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        attn_mask = None
        # Without padding the mask is dropped on the CPU (the fused kernel needs no mask). Asking
        # would wait for the GPU there, so on CUDA the mask is always passed.
        if key_padding is not None and (key_padding.device.type != "cpu" or not bool(key_padding.all())):
            attn_mask = key_padding[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.norm(x)
