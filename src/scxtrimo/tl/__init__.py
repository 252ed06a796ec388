"""Tools: embed cells, pretrain models, annotate cell types, gene-context embeddings, evaluate clusterings.

Names are imported on first use, so that ``scxtrimo.tl._distributed`` (torch only) loads on a
machine without anndata or scanpy.
"""

import importlib

_WHERE = {
    "embed": "_embed", "pretrain": "_pretrain", "annotate": "_annotate", "CellTypeClassifier": "_annotate",
    "evaluate_clustering": "_clustering", "gene_embed": "_gene_context",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'scxtrimo.tl' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
