"""The xTrimoGene model, its configurations and checkpoints."""

from ._cell_head import CellExpressionHead
from ._factor_head import FactorScoreHead, factor_projection
from ._config import CONFIGS as _CONFIGS
from ._config import XTrimoGeneConfig, get_config
from ._gene_init import init_gene_embedding
from ._io import load
from ._registry import cache_dir, register
from ._xtrimogene import XTrimoGene

#: The named configurations (a dict of name to :class:`XTrimoGeneConfig`) of ``"xtrimo-10m"`` and
#: ``"xtrimo-100m"`` (appendix Table 2) and of the CPU-sized ``"xtrimo-3m"`` of the bundled checkpoint.
CONFIGS = _CONFIGS

__all__ = ["XTrimoGene", "XTrimoGeneConfig", "CONFIGS", "get_config", "load", "register", "cache_dir", "init_gene_embedding",
           "CellExpressionHead",
           "FactorScoreHead", "factor_projection"]
