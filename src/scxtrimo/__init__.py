"""scxtrimo: the xTrimoGene single-cell foundation model for AnnData and scanpy users.

Submodules follow scanpy: :mod:`scxtrimo.pp` (preprocessing), :mod:`scxtrimo.tl` (tools),
:mod:`scxtrimo.pl` (plots), plus :mod:`scxtrimo.models`, :mod:`scxtrimo.data` and
:mod:`scxtrimo.datasets`. Submodules are imported on first use, so that the model and its
training path (``scxtrimo.models``, ``scxtrimo.data``) work with torch, NumPy and SciPy alone,
e.g. on a GPU machine without scanpy or anndata.
"""

import importlib as _importlib

from ._reference import N_GENES as _N_GENES
from ._reference import reference_genes
from ._version import __version__

#: The number of genes in the xTrimoGene reference list (:func:`reference_genes`), the model's vocabulary (19,264).
N_GENES = _N_GENES

_SUBMODULES = ("pp", "tl", "pl", "models", "data", "datasets")

__all__ = [*_SUBMODULES, "reference_genes", "N_GENES", "__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'scxtrimo' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
