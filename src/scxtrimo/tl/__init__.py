"""Tools: embed cells, pretrain models."""

from ._pretrain import pretrain

__all__ = ["pretrain"]
