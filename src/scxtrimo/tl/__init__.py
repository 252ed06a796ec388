"""Tools: embed cells, gene-context embeddings, pretrain models, annotate cell types, evaluate clusterings."""

from ._annotate import CellTypeClassifier, annotate
from ._clustering import evaluate_clustering
from ._embed import embed
from ._gene_context import gene_embed
from ._pretrain import pretrain

__all__ = ["embed", "gene_embed", "pretrain", "annotate", "CellTypeClassifier", "evaluate_clustering"]
