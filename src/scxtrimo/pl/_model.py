from __future__ import annotations

import os

from .._bundled import DEFAULT_CHECKPOINT
from ..models._io import load
from ..models._xtrimogene import XTrimoGene


def plotted_model(model) -> XTrimoGene:
    """The model a plot is drawn for: an :class:`~scxtrimo.models.XTrimoGene`, or a checkpoint name or folder
    (loaded); ``TypeError`` for anything else (e.g. an AnnData passed first, out of scanpy habit)."""
    if isinstance(model, XTrimoGene):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load(model)
    raise TypeError(f"model must be an XTrimoGene or a checkpoint name or folder (e.g. {DEFAULT_CHECKPOINT!r}), got "
                    f"{type(model).__name__}.")
