"""Preprocessing: map genes onto the reference list and normalize (paper appendix 1).

Usual order: ``aligned = scxtrimo.pp.align_genes(adata)`` then
``scxtrimo.pp.normalize(aligned)`` (log1p of counts per 10,000).
"""

from ._align import align_genes
from ._normalize import normalize

__all__ = ["align_genes", "normalize"]
