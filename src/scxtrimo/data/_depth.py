"""Depth tokens and read-depth thinning (the authors' released model, ``specs`` sections 4-5).

A cell's model input with depth tokens is its 19,264 gene values followed by two numbers:
``T``, log10 of the total count the values stand for (the "target" depth), and ``S``, log10 of
the total count actually observed. In depth-aware pretraining the observed cell is a binomial
thinning of the real one: the encoder sees the thinned cell (``S`` = its total) and is asked
for the real cell's values at masked genes (``T`` = the real total), so that representations
stop depending on sequencing depth.

Every random number here is a counter-based hash of a per-cell key (as in
:func:`~scxtrimo.data.mask_values_keyed`): a cell's thinning never depends on its batch mates,
its rank or its micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from ._masking import _M32, _keyed_hash, _uniform, check_fraction

TARGET_SUM = 1e4
#: ``tl.embed``'s target-depth modes (the authors' "t", "f" and "a" options).
DEPTH_MODES = ("fixed", "scale", "offset")


@dataclass(frozen=True)
class ThinningConfig:
    """How often and how far cells are thinned in depth-aware pretraining.

    A cell whose total count is at least ``min_total`` is thinned with probability ``p_thin``
    to a fraction ``f`` of its reads, ``f ~ Beta(2, 2)`` clipped to ``[min_fraction, 1]``: each
    read is kept independently with probability ``f`` (binomial downsampling). Other cells
    are left as they are (then ``S = T``).

    ``capture_sd > 0`` also gives every thinned cell its own per-gene capture efficiencies
    (not in the paper; a platform-style augmentation): gene ``g`` keeps each read with
    probability ``f * exp(-capture_sd * |z_g|)``, ``z_g ~ N(0, 1)`` drawn per cell and gene.
    Protocols differ largely by such gene-specific capture (which genes are detected, and how
    strongly); the targets stay the real cell's, so the model is asked to see through it.
    Measured: one 35-minute CPU segment at ``capture_sd=0.7`` did not improve cross-platform
    transfer (``docs/benchmarks.md``, "Capture-efficiency augmentation").

    Raises
    ------
    ValueError
        ``capture_sd`` negative or not finite (efficiencies above 1 cannot be thinned to);
        ``p_thin`` outside ``[0, 1]``; ``min_fraction`` outside ``(0, 1]``.
    """

    p_thin: float = 0.5
    min_total: float = 1000.0
    min_fraction: float = 0.05
    capture_sd: float = 0.0

    def __post_init__(self):
        check_fraction("ThinningConfig.p_thin", self.p_thin)
        check_fraction("ThinningConfig.min_fraction", self.min_fraction, zero=False)
        if not (np.isfinite(self.capture_sd) and self.capture_sd >= 0):
            raise ValueError(f"ThinningConfig.capture_sd must be a finite number >= 0 (0: off), got {self.capture_sd!r}.")


def target_depth(totals: np.ndarray, value: float = 4.0, mode: str = "fixed") -> np.ndarray:
    """``T`` for cells of the given total counts (float64).

    ``mode="fixed"``: ``T = value`` (the authors' default 4, i.e. 10,000 reads);
    ``"scale"``: ``T = log10(total * value)``; ``"offset"``: ``T = log10(total) + value``
    (``value=0``: the observed depth, ``T = S``).
    """
    totals = np.asarray(totals, dtype=np.float64)
    if mode == "fixed":
        return np.full(totals.shape, float(value))
    with np.errstate(divide="ignore"):
        if mode == "scale":
            return np.log10(totals * float(value))
        if mode == "offset":
            return np.log10(totals) + float(value)
    raise ValueError(f"Unknown target-depth mode {mode!r}; choose one of {DEPTH_MODES}.")


def append_depth(X: sp.csr_matrix, T: np.ndarray, S: np.ndarray) -> sp.csr_matrix:
    """``(n, n_genes)`` CSR -> ``(n, n_genes + 2)`` CSR with columns T and S appended.

    Non-positive (or non-finite) T or S are left out, so that they are no encoder token,
    exactly as a zero gene is not. Values are stored as float32 (the model's input).
    """
    n, g = X.shape
    extra = np.stack([np.asarray(T, np.float64), np.asarray(S, np.float64)], axis=1)
    extra = np.where(np.isfinite(extra) & (extra > 0), extra, 0.0).astype(np.float32)
    D = sp.csr_matrix(extra)  # zeros are not stored
    out = sp.hstack([sp.csr_matrix(X, dtype=np.float32), D], format="csr")
    out.sort_indices()
    return out


def _median3(u1: torch.Tensor, u2: torch.Tensor, u3: torch.Tensor) -> torch.Tensor:
    """The median of three independent uniforms is Beta(2, 2)-distributed."""
    return torch.maximum(torch.minimum(u1, u2), torch.minimum(torch.maximum(u1, u2), u3))


def thinning_fractions(totals: torch.Tensor, keys: torch.Tensor, config: ThinningConfig = ThinningConfig()) -> torch.Tensor:
    """``(B,)`` float32 fraction of reads each cell keeps (1.0 for cells left as they are)."""
    keys = keys.to(torch.int64) & _M32
    u = [_uniform(_keyed_hash(keys, torch.zeros_like(keys), s)) for s in (11, 12, 13, 14)]
    f = _median3(u[0], u[1], u[2]).clamp(min=config.min_fraction)
    thin = (u[3] < config.p_thin) & (totals.to(torch.float32) >= config.min_total)
    return torch.where(thin, f, torch.ones_like(f))


def capture_efficiencies(keys: torch.Tensor, cols: torch.Tensor, capture_sd: float) -> torch.Tensor:
    """Per-(cell, gene) capture efficiencies ``exp(-capture_sd * |z|)`` in ``(0, 1]`` (float32).

    ``keys`` and ``cols`` are matching 1-D int64 tensors (a cell's key and a gene index per
    entry); ``z ~ N(0, 1)`` is a Box-Muller draw from two hashes of (key, gene), so a gene's
    efficiency in a cell never depends on the cell's batch mates or reads.
    """
    k = keys.to(torch.int64) & _M32
    u1 = _uniform(_keyed_hash(k, cols, 16)).clamp(min=1.0 / (1 << 24))
    u2 = _uniform(_keyed_hash(k, cols, 17))
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
    return torch.exp(-float(capture_sd) * z.abs())


def thin_counts(counts: torch.Tensor, fractions: torch.Tensor, keys: torch.Tensor, *,
                capture_sd: float = 0.0) -> torch.Tensor:
    """Binomial thinning of ``(B, n)`` integer counts: each read kept with its cell's probability.

    Exact: every read of every gene gets its own uniform, a hash of (cell key, gene, read
    index), so ``thin_counts(c)[i, g] ~ Binomial(c[i, g], fractions[i])`` independently. With
    ``capture_sd > 0`` the probability is ``fractions[i] * e[i, g]``, ``e`` from
    :func:`capture_efficiencies` (cells with ``fractions[i] == 1`` are thinned too: callers
    pass only the cells to thin). The result is integer-valued, at most ``counts`` and of the
    same dtype. Counts must be below ``2**16`` per entry (the packed corpus stores uint16).
    """
    rows, cols = counts.nonzero(as_tuple=True)
    c = counts[rows, cols].to(torch.int64)
    if c.numel() == 0:
        return counts.clone()
    if int(c.max()) >= 1 << 16:
        raise ValueError("thin_counts takes counts below 65,536 per gene and cell.")
    p = fractions.to(torch.float32)[rows]  # (entries,)
    if capture_sd > 0:
        p = p * capture_efficiencies(keys[rows], cols, capture_sd)
    entry = torch.repeat_interleave(torch.arange(c.numel(), device=c.device), c)  # (reads,)
    read = torch.arange(entry.numel(), device=c.device) - torch.repeat_interleave(torch.cumsum(c, 0) - c, c)
    k = (keys.to(torch.int64) & _M32)[rows[entry]]
    u = _uniform(_keyed_hash(k, (cols[entry] << 16) | read, 15))
    kept = (u < p[entry]).to(counts.dtype)
    out = torch.zeros_like(counts)
    out[rows, cols] = torch.zeros(c.numel(), dtype=counts.dtype, device=c.device).index_add_(0, entry, kept)
    return out


def log1p_cp10k(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, n)`` counts -> (log1p CP10k values ``(B, n)`` float32, totals ``(B,)`` float64)."""
    total = counts.to(torch.float64).sum(1)
    scale = torch.where(total > 0, TARGET_SUM / total.clamp(min=1e-12), torch.zeros_like(total))
    return torch.log1p(counts.to(torch.float64) * scale[:, None]).to(torch.float32), total


def depth_columns(T: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``(B, 2)`` float32 T and S columns; non-positive or non-finite entries become 0 (no token)."""
    d = torch.stack([T, S], dim=1).to(torch.float32)
    return torch.where(torch.isfinite(d) & (d > 0), d, torch.zeros_like(d))


def depth_aware_inputs(counts: torch.Tensor, keys: torch.Tensor, config: ThinningConfig = ThinningConfig(),
                       *, totals: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin a batch of cells and build the model's values (paper-style log1p CP10k, plus T and S).

    Parameters
    ----------
    counts
        ``(B, n_genes)`` raw counts on the reference genes (integers, any float or int dtype).
    keys
        ``(B,)`` int64 per-cell keys (:func:`~scxtrimo.data.cell_keys`).
    config
        :class:`ThinningConfig`.
    totals
        ``(B,)`` the cells' real total counts, if they differ from ``counts.sum(1)`` (they do
        not for cells packed by :mod:`scxtrimo.data._corpus`).

    Returns
    -------
    observed
        ``(B, n_genes)`` float32 log1p CP10k of the thinned counts (what the encoder may see).
    target
        ``(B, n_genes)`` float32 log1p CP10k of the real counts (the regression targets).
    depth
        ``(B, 2)`` float32 ``[T, S]`` = log10 of the real and of the thinned total.
    """
    target, total = log1p_cp10k(counts)
    if totals is not None:
        total = totals.to(torch.float64)
    f = thinning_fractions(total, keys, config)
    thinned = torch.where((f < 1)[:, None], thin_counts(counts, f, keys, capture_sd=config.capture_sd), counts)
    observed, seen = log1p_cp10k(thinned)
    seen = torch.where(f < 1, seen, total)
    return observed, target, depth_columns(torch.log10(total), torch.log10(seen))
