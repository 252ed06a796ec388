"""The xTrimoGene model, its configurations and checkpoints."""

from .._bundled import DEFAULT_CHECKPOINT as _DEFAULT_CHECKPOINT
from ._cell_head import CellExpressionHead
from ._factor_head import FactorScoreHead, factor_projection
from ._config import CONFIGS as _CONFIGS
from ._config import XTrimoGeneConfig, get_config
from ._gene_init import init_gene_embedding
from ._io import load
from ._registry import cache_dir, register
from ._xtrimogene import XTrimoGene

#: The named configurations (a dict of name to :class:`XTrimoGeneConfig`): ``"xtrimo-3m"``,
#: ``"xtrimo-10m"`` and ``"xtrimo-100m"`` of appendix Table 2 (the 3m with 32 random features in its
#: decoder, which halves its training step on a CPU).
CONFIGS = _CONFIGS

#: The name of the default checkpoint, bundled with the package: what :func:`load`,
#: :func:`scxtrimo.tl.embed`, :func:`scxtrimo.tl.annotate`, :func:`scxtrimo.tl.gene_embed`, the
#: model plots of :mod:`scxtrimo.pl` and the command line use when no model is given.
DEFAULT_CHECKPOINT = _DEFAULT_CHECKPOINT

__all__ = ["XTrimoGene", "XTrimoGeneConfig", "CONFIGS", "DEFAULT_CHECKPOINT", "get_config", "load", "register",
           "cache_dir", "init_gene_embedding", "CellExpressionHead", "FactorScoreHead", "factor_projection"]
