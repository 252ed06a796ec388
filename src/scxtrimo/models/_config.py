"""Model configurations (paper appendix section 7, Table 2)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .._reference import N_GENES
from .._validation import check_positive

ACTIVATIONS = ("gelu", "relu")
KEY_MAX = ("head", "cell")


@dataclass(frozen=True)
class XTrimoGeneConfig:
    """Hyper-parameters of an xTrimoGene model.

    Depth, heads and width of encoder and decoder are appendix Table 2. The paper does not give
    feed-forward widths; ``enc_ff_mult``/``dec_ff_mult`` (hidden width = mult x dim) are chosen
    so that each model's total parameter count, gene embedding included, lands within 15% of
    its name (``tests/test_model.py`` checks this).

    Attributes
    ----------
    name
        The configuration's name (``"xtrimo-3m"``, ``"xtrimo-10m"``, ``"xtrimo-100m"``, or
        one of your own); recorded in checkpoints and in ``uns['xtrimo']['params']``.
    n_genes
        Vocabulary size: genes of the reference list (19,264).
    enc_depth, enc_heads, enc_dim
        Encoder blocks, attention heads and width (Table 2: 4 / 8 / 256 for xtrimo-10m,
        12 / 12 / 768 for xtrimo-100m); ``enc_dim`` is also the cell embedding's width.
        ``enc_dim`` must be divisible by ``enc_heads``.
    enc_ff_mult
        Encoder feed-forward hidden width as a multiple of ``enc_dim``.
    dec_depth, dec_heads, dec_dim
        Performer decoder blocks, attention heads and width (Table 2: 2 / 4 / 256 for
        xtrimo-10m, 6 / 8 / 512 for xtrimo-100m); ``dec_dim`` must be divisible by
        ``dec_heads``.
    dec_ff_mult
        Decoder feed-forward hidden width as a multiple of ``dec_dim``.
    dropout
        Dropout in encoder and decoder, in ``[0, 1)`` (0: none, as pretrained here).
    n_bins
        Auto-discretization bins ``b`` (section 3.3; 100 in the paper).
    autobin_alpha
        Mixing factor ``alpha`` of the auto-discretization residual (1.0 in the released model).
    nb_features
        Random features of the Performer decoder's softmax-kernel approximation; ``None`` uses
        performer-pytorch's default ``dim_head * ln(dim_head)`` (266 for 64-wide heads). The
        paper does not give it; ``xtrimo-3m`` uses 32, which halves its CPU training step.
    enc_norm_first
        Pre-LayerNorm encoder blocks (True, scxtrimo's default) or post-LayerNorm blocks
        (False, as in the authors' released model: ``x = LN(x + f(x))``).
    enc_activation
        Encoder feed-forward activation: ``"gelu"`` (exact) or ``"relu"`` (the released model).
    dec_dim_head
        Width of one decoder attention head; ``None`` means ``dec_dim // dec_heads``.
    out_norm
        A second LayerNorm between the decoder's own final LayerNorm and the ``d -> 1`` head
        (the released model has one).
    depth_tokens
        Two depth tokens after the genes (``../specs``: the authors' released model): ``T``
        (log10 of the target total count) at position ``n_genes`` and ``S`` (log10 of the
        input's total count) at ``n_genes + 1``, each with its own gene-embedding row and
        taking part in the encoder only when positive. The gene embedding then has
        ``n_genes + 3`` rows (genes, T, S and the authors' unused padding row).
    key_max
        Which maximum stabilizes the Performer's key features: ``"head"`` (per cell and head,
        performer-pytorch's choice) or ``"cell"`` (per cell over every head, position and
        feature: the released model's output for one cell, independent of its batch mates).
        Both are exact softmax-kernel features up to the ``1e-4`` floor the kernel adds.
    feature_redraw_interval
        Training forward passes between redraws of the decoder's random features; ``None``
        (default) keeps the features a model was built with. performer-pytorch redraws every
        1,000 passes; a redraw changes the attention a trained decoder relies on at once
        (one redraw of the 32 features of the ``xtrimo-3m`` pretrained on the CPU dropped its
        validation masked-value r from 0.81 to 0.71-0.72; in training it recovered only in
        part over the next hundred steps), so scxtrimo trains with fixed features.
    decoder_zero_mass
        ``None`` (default, the paper): every decoder token counts once in the attention. An
        int ``Z``: the tokens of a cell's unexpressed, unmasked genes (the value embedding of 0)
        together count as ``Z`` keys, each weighted ``Z / (number of them in the decoded
        set)``. A model pretrained with ``decoder_zeros=Z`` sampled zeros then sees the same
        zero mass when it decodes all 19,264 genes. Not in the paper.

    Raises
    ------
    ValueError
        A size that is not a positive integer; a width not divisible by its heads; ``dropout``
        outside ``[0, 1)``; an unknown ``enc_activation`` or ``key_max``;
        ``feature_redraw_interval`` or ``decoder_zero_mass`` neither ``None`` nor a positive
        integer.
    """

    name: str = "xtrimo-3m"
    n_genes: int = N_GENES
    enc_depth: int = 4
    enc_heads: int = 2
    enc_dim: int = 128
    enc_ff_mult: int = 2
    dec_depth: int = 2
    dec_heads: int = 2
    dec_dim: int = 128
    dec_ff_mult: int = 2
    n_bins: int = 100
    autobin_alpha: float = 1.0
    nb_features: int | None = None
    dropout: float = 0.0
    enc_norm_first: bool = True
    enc_activation: str = "gelu"
    dec_dim_head: int | None = None
    out_norm: bool = False
    depth_tokens: bool = False
    key_max: str = "head"
    feature_redraw_interval: int | None = None
    decoder_zero_mass: int | None = None

    def __post_init__(self):
        for field in ("n_genes", "enc_depth", "enc_heads", "enc_dim", "enc_ff_mult", "dec_depth", "dec_heads",
                      "dec_dim", "dec_ff_mult", "n_bins"):
            check_positive(field, getattr(self, field), integer=True)
        for field in ("nb_features", "dec_dim_head"):
            check_positive(field, getattr(self, field), integer=True, optional=True)
        check_positive("autobin_alpha", self.autobin_alpha)
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}.")
        for prefix in ("enc", "dec"):
            dim, heads = getattr(self, f"{prefix}_dim"), getattr(self, f"{prefix}_heads")
            if dim % heads:
                raise ValueError(f"{prefix}_dim={dim} is not divisible by {prefix}_heads={heads}.")
        if self.enc_activation not in ACTIVATIONS:
            raise ValueError(f"enc_activation={self.enc_activation!r}; choose one of {ACTIVATIONS}.")
        if self.key_max not in KEY_MAX:
            raise ValueError(f"key_max={self.key_max!r}; choose one of {KEY_MAX}.")
        for field in ("feature_redraw_interval", "decoder_zero_mass"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{field}={value!r}; use a positive integer or None.")

    @property
    def n_positions(self) -> int:
        """Length of a cell's full input: the genes, then T and S if ``depth_tokens``."""
        return self.n_genes + (2 if self.depth_tokens else 0)

    @property
    def n_embeddings(self) -> int:
        """Rows of the gene embedding: the genes, plus T, S and a padding row if ``depth_tokens``."""
        return self.n_genes + (3 if self.depth_tokens else 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> XTrimoGeneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown config fields {sorted(unknown)}; this checkpoint needs a newer scxtrimo.")
        return cls(**d)


# The named configurations (exported, and documented, as scxtrimo.models.CONFIGS).
CONFIGS: dict[str, XTrimoGeneConfig] = {
    "xtrimo-3m": XTrimoGeneConfig(
        name="xtrimo-3m", enc_depth=4, enc_heads=2, enc_dim=128, enc_ff_mult=2,
        dec_depth=2, dec_heads=2, dec_dim=128, dec_ff_mult=2, nb_features=32,
    ),
    "xtrimo-10m": XTrimoGeneConfig(
        name="xtrimo-10m", enc_depth=4, enc_heads=8, enc_dim=256, enc_ff_mult=4,
        dec_depth=2, dec_heads=4, dec_dim=256, dec_ff_mult=2,
    ),
    "xtrimo-100m": XTrimoGeneConfig(
        name="xtrimo-100m", enc_depth=12, enc_heads=12, enc_dim=768, enc_ff_mult=4,
        dec_depth=6, dec_heads=8, dec_dim=512, dec_ff_mult=2,
    ),
}


def get_config(config: str | XTrimoGeneConfig) -> XTrimoGeneConfig:
    """Look up a named configuration, or pass a config object through.

    Parameters
    ----------
    config
        A key of :data:`CONFIGS` (``"xtrimo-3m"``, ``"xtrimo-10m"``, ``"xtrimo-100m"``) or an
        :class:`XTrimoGeneConfig`, returned as it is.

    Returns
    -------
    XTrimoGeneConfig

    Raises
    ------
    ValueError
        ``config`` is not a known name.
    """
    if isinstance(config, XTrimoGeneConfig):
        return config
    try:
        return CONFIGS[config]
    except KeyError:
        raise ValueError(f"Unknown model configuration {config!r}; choose one of {sorted(CONFIGS)}.") from None
