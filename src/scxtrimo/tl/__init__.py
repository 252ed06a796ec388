"""Tools: embed cells, pretrain models, annotate cell types, gene-context embeddings, evaluate clusterings.

Names are imported on first use, so that ``scxtrimo.tl._distributed`` (torch only) loads on a
machine without anndata or scanpy.
"""

from .._lazy import lazy_attributes as _lazy_attributes

_WHERE = {
    "embed": "_embed", "pretrain": "_pretrain", "annotate": "_annotate", "CellTypeClassifier": "_annotate",
    "evaluate_clustering": "_clustering", "gene_embed": "_gene_context",
}

__all__ = list(_WHERE)

__getattr__, __dir__ = _lazy_attributes(__name__, _WHERE, globals())
