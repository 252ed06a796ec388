"""Plots. Each returns its axes with ``show=False`` and writes a file with ``save=``."""

from ._autobin import autobin
from ._embedding import embedding
from ._loss import loss
from ._recovery import recovery

__all__ = ["embedding", "loss", "autobin", "recovery"]
