"""scxtrimo: the xTrimoGene single-cell foundation model for AnnData and scanpy users.

Submodules follow scanpy: :mod:`scxtrimo.pp` (preprocessing), :mod:`scxtrimo.tl` (tools),
:mod:`scxtrimo.pl` (plots), plus :mod:`scxtrimo.models`, :mod:`scxtrimo.data` and
:mod:`scxtrimo.datasets`.
"""

from . import data, datasets, models, pl, pp, tl
from ._reference import N_GENES, reference_genes
from ._version import __version__

__all__ = ["pp", "tl", "pl", "models", "data", "datasets", "reference_genes", "N_GENES", "__version__"]
