"""Plots."""

from ._embedding import embedding
from ._loss import loss

__all__ = ["embedding", "loss"]
