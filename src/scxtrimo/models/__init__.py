"""The xTrimoGene model, its configurations and checkpoints."""

from ._cell_head import CellExpressionHead
from ._factor_head import FactorScoreHead, factor_projection
from ._config import CONFIGS, XTrimoGeneConfig, get_config
from ._gene_init import init_gene_embedding
from ._io import load
from ._registry import cache_dir, register
from ._xtrimogene import XTrimoGene

__all__ = ["XTrimoGene", "XTrimoGeneConfig", "CONFIGS", "get_config", "load", "register", "cache_dir", "init_gene_embedding",
           "CellExpressionHead",
           "FactorScoreHead", "factor_projection"]
