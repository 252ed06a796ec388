"""Biased masking of zero and non-zero expression values (paper section 4.2, appendix 6)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch

from .._validation import check_positive


def check_fraction(name: str, value, *, zero: bool = True) -> None:
    """Raise ``ValueError`` unless ``value`` is a number in ``[0, 1]`` (``(0, 1]`` without ``zero``)."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and (0 <= value if zero else 0 < value) and value <= 1
    if not ok:
        raise ValueError(f"{name} must be a number in {'[' if zero else '('}0, 1], got {value!r}.")


@dataclass(frozen=True)
class MaskingConfig:
    """How many positions to mask, and what they are replaced with.

    Per cell, ``nonzero_ratio`` of the expressed genes are chosen, and as many unexpressed genes
    (``zero_to_nonzero`` times that number, capped by the zeros available), so that zero and
    non-zero targets come in about equal numbers: the paper's ~600 of ~2,000 non-zero and ~540
    of ~18,000 zero positions. Of the chosen positions, ``p_mask`` become [MASK], ``p_random``
    get a random expression value drawn from the batch, and the rest keep their value (the
    authors' released 80/10/10). At least one expressed gene always stays visible to the encoder.

    ``max_visible`` (keyed masking only; ``None`` by default, as in the paper) bounds the
    encoder's work on deep cells: when more expressed genes than that would stay visible, the
    surplus (drawn among all visible genes, random-value ones included) also becomes [MASK]
    targets, so the encoder sees at most ``max_visible`` genes.

    Raises
    ------
    ValueError
        ``nonzero_ratio`` outside ``(0, 1]``; ``p_mask`` or ``p_random`` outside ``[0, 1]``, or
        their sum above 1; ``zero_to_nonzero`` negative or not finite; ``max_visible`` not a
        positive integer or ``None``.
    """

    nonzero_ratio: float = 0.3
    zero_to_nonzero: float = 0.9
    p_mask: float = 0.8
    p_random: float = 0.1
    max_visible: int | None = None

    def __post_init__(self):
        check_fraction("MaskingConfig.nonzero_ratio", self.nonzero_ratio, zero=False)
        check_fraction("MaskingConfig.p_mask", self.p_mask)
        check_fraction("MaskingConfig.p_random", self.p_random)
        if self.p_mask + self.p_random > 1 + 1e-9:
            raise ValueError(f"MaskingConfig.p_mask + p_random must be at most 1 (the rest of the chosen positions "
                             f"keep their value), got {self.p_mask} + {self.p_random}.")
        if not (isinstance(self.zero_to_nonzero, Real) and math.isfinite(self.zero_to_nonzero)
                and self.zero_to_nonzero >= 0):
            raise ValueError(f"MaskingConfig.zero_to_nonzero must be a number >= 0, got {self.zero_to_nonzero!r}.")
        check_positive("MaskingConfig.max_visible", self.max_visible, integer=True, optional=True)


@dataclass
class MaskedBatch:
    """A batch after masking; all tensors ``(B, n_genes)``.

    values : float, the true log1p values (the regression targets).
    inputs : float, what the model sees: random values at ``random`` positions, true values elsewhere.
    target : bool, positions the loss is computed on (all chosen positions).
    is_mask : bool, positions replaced by the [MASK] embedding.
    """

    values: torch.Tensor
    inputs: torch.Tensor
    target: torch.Tensor
    is_mask: torch.Tensor


def _choose(candidates: torch.Tensor, k: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Pick ``k[i]`` of the True positions of row ``i`` of ``candidates``, uniformly at random."""
    scores = torch.rand(candidates.shape, generator=generator, device=candidates.device)
    scores = scores.masked_fill(~candidates, 2.0)
    sorted_scores = scores.sort(dim=1).values
    kth = sorted_scores.gather(1, (k.clamp(min=1) - 1).unsqueeze(1))
    return (scores <= kth) & candidates & (k > 0).unsqueeze(1)


def mask_values(values: torch.Tensor, config: MaskingConfig = MaskingConfig(), *, generator: torch.Generator | None = None) -> MaskedBatch:
    """Choose targets and corrupt a dense ``(B, n_genes)`` batch of log1p expression.

    Parameters
    ----------
    values
        ``(B, n_genes)`` float32 log1p CP10k expression in reference gene order.
    config
        Ratios (:class:`MaskingConfig`).
    generator
        Seeded ``torch.Generator`` on ``values.device`` for reproducible masks.
    """
    nonzero = values != 0
    n_nonzero = nonzero.sum(1)
    k_nonzero = torch.minimum((n_nonzero.float() * config.nonzero_ratio).round().long(), (n_nonzero - 1).clamp(min=0))
    k_zero = torch.minimum(
        (k_nonzero.float() * config.zero_to_nonzero).round().long(), values.shape[1] - n_nonzero
    )
    target = _choose(nonzero, k_nonzero, generator) | _choose(~nonzero, k_zero, generator)

    u = torch.rand(values.shape, generator=generator, device=values.device)
    is_mask = target & (u < config.p_mask)
    is_random = target & (u >= config.p_mask) & (u < config.p_mask + config.p_random)
    inputs = values.clone()
    pool = values[nonzero]
    if pool.numel() and bool(is_random.any()):
        draw = torch.randint(pool.numel(), (int(is_random.sum()),), generator=generator, device=values.device)
        inputs[is_random] = pool[draw]
    return _finish(values, nonzero, target, is_mask, inputs)


def _finish(values, nonzero, target, is_mask, inputs) -> MaskedBatch:
    """Blank [MASK] positions and keep at least one visible expressed gene per cell."""
    # a [MASK] position carries no value; zero it so it can never leak into the encoder
    inputs = inputs.masked_fill(is_mask, 0.0)
    visible = (inputs != 0) & ~is_mask
    starved = ~visible.any(1) & nonzero.any(1)
    if bool(starved.any()):
        first = (nonzero & starved.unsqueeze(1)).float().argmax(1)
        rows = starved.nonzero(as_tuple=True)[0]
        is_mask[rows, first[rows]] = False
        target[rows, first[rows]] = False
        inputs[rows, first[rows]] = values[rows, first[rows]]
    return MaskedBatch(values=values, inputs=inputs, target=target, is_mask=is_mask)


# ---- keyed (counter-based) masking ---------------------------------------------------------
# Every random number is a hash of (cell key, gene, stream), so a cell's mask depends only on
# its key: the same on any rank, any device, in any batch composition, and after a resume.

_M32 = 0xFFFFFFFF
_WEYL = 0x9E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values in ``[0, 2**32)``.

    Two multiply-xorshift rounds; the multipliers are below ``2**31`` so no product leaves
    the int64 range (identical results on every device).
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def cell_keys(seed: int, step: int, positions, *, device=None) -> torch.Tensor:
    """Masking keys for the cells at ``positions`` of the global batch of optimizer ``step``.

    Parameters
    ----------
    seed
        The run's ``random_state``.
    step
        Optimizer step (0-based, counted over the whole run, so keys never repeat across epochs).
    positions
        ``(B,)`` positions of the cells in the global batch (0 .. global batch size - 1).
    device
        Device of the returned tensor.

    Returns
    -------
    torch.Tensor
        ``(B,)`` int64 keys in ``[0, 2**32)``, a pure function of ``(seed, step, position)``:
        the rank that holds a cell and the gradient-accumulation micro-batch it lands in do not
        change its mask (distributed training reproduces single-process training).
    """
    pos = torch.as_tensor(positions, dtype=torch.int64, device=device) & _M32
    k = _mix32(torch.tensor(int(seed) & _M32, dtype=torch.int64, device=device))
    k = _mix32(k ^ _mix32(torch.tensor(int(step) & _M32, dtype=torch.int64, device=device) ^ 0x5BD1E995))
    return _mix32(k ^ pos)


def _keyed_hash(keys: torch.Tensor, cols: torch.Tensor, stream: int) -> torch.Tensor:
    """Hashes in ``[0, 2**32)`` of (key, column, stream), broadcasting ``keys`` against ``cols``.

    SplitMix-style: a per-(key, stream) base advanced by a Weyl increment per column, then mixed.
    """
    base = _mix32(keys ^ _mix32(torch.tensor(stream, dtype=torch.int64, device=keys.device)))
    return _mix32((base + cols * _WEYL) & _M32)


def _uniform(h: torch.Tensor) -> torch.Tensor:
    """Hashes in ``[0, 2**32)`` -> float32 uniforms in ``[0, 1)`` (24 random bits, exact)."""
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def keyed_uniform(keys: torch.Tensor, n_genes: int, *, stream: int = 101) -> torch.Tensor:
    """``(B, n_genes)`` float32 uniforms in ``[0, 1)``, a pure function of each cell's key.

    ``stream`` separates independent uses of the same key (masking uses its own streams).
    """
    keys = keys.to(dtype=torch.int64) & _M32
    cols = torch.arange(n_genes, dtype=torch.int64, device=keys.device)
    return _uniform(_keyed_hash(keys[:, None], cols[None, :], stream))


def _choose_keyed(candidates: torch.Tensor, k: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The ``k[i]`` candidates of row ``i`` with the lowest (tie-free) integer scores."""
    k_max = int(k.max()) if k.numel() else 0
    if k_max == 0:
        return torch.zeros_like(candidates)
    s = scores.masked_fill(~candidates, torch.iinfo(torch.int64).max)
    lowest = s.topk(k_max, dim=1, largest=False, sorted=True).values  # much cheaper than a full sort
    kth = lowest.gather(1, (k.clamp(min=1) - 1).unsqueeze(1))
    return (s <= kth) & candidates & (k > 0).unsqueeze(1)


def mask_values_keyed(values: torch.Tensor, config: MaskingConfig = MaskingConfig(), *, keys: torch.Tensor) -> MaskedBatch:
    """Like :func:`mask_values`, but each cell's random choices come from its own key.

    The numbers of targets, the 80/10/10 split and the rule that one expressed gene stays
    visible are those of :func:`mask_values` (paper section 4.2, appendix 6). Differences: the
    random numbers are counter-based hashes of ``(key, gene)`` rather than draws from a
    generator, and a "random value" replacement is drawn from the same cell's expressed values
    (not from the whole batch), so that a cell's corruption never depends on which other cells
    share its batch. This is what makes data-parallel training (each rank holding a shard of
    the global batch) and gradient accumulation reproduce single-process training exactly.

    Parameters
    ----------
    values
        ``(B, n_genes)`` float log1p CP10k expression in reference gene order.
    config
        Ratios (:class:`MaskingConfig`).
    keys
        ``(B,)`` int64 per-cell keys in ``[0, 2**32)``, e.g. from :func:`cell_keys`.

    Returns
    -------
    MaskedBatch
    """
    b, n = values.shape
    if keys.shape != (b,):
        raise ValueError(f"keys must have shape ({b},), got {tuple(keys.shape)}.")
    if keys.dtype.is_floating_point or keys.dtype == torch.bool:
        raise TypeError(f"keys must be integer keys (int64, e.g. from cell_keys), got {keys.dtype}: floats in [0, 1) "
                        "would all become key 0, one mask for every cell.")
    keys = keys.to(device=values.device, dtype=torch.int64) & _M32
    nonzero = values != 0
    n_nonzero = nonzero.sum(1)
    k_nonzero = torch.minimum((n_nonzero.float() * config.nonzero_ratio).round().long(), (n_nonzero - 1).clamp(min=0))
    k_zero = torch.minimum((k_nonzero.float() * config.zero_to_nonzero).round().long(), n - n_nonzero)
    # expressed and unexpressed candidates are disjoint, so one score stream serves both;
    # appending the gene index makes the scores unique within a row (no ties at the k-th)
    genes = torch.arange(n, dtype=torch.int64, device=values.device)
    scores = (_keyed_hash(keys.unsqueeze(1), genes, 1) << 15) | genes
    target = _choose_keyed(nonzero, k_nonzero, scores) | _choose_keyed(~nonzero, k_zero, scores)

    # the remaining draws are needed at the targets only (a few percent of the positions)
    rows, cols = target.nonzero(as_tuple=True)
    u = _uniform(_keyed_hash(keys[rows], cols, 2))
    is_mask = torch.zeros_like(target)
    is_mask[rows, cols] = u < config.p_mask
    pick = (u >= config.p_mask) & (u < config.p_mask + config.p_random)
    inputs = values.clone()
    if bool(pick.any()):
        # a random value: the r-th expressed gene of the same cell, r uniform in [0, n_nonzero)
        r_rows, r_cols = rows[pick], cols[pick]
        n_nz = n_nonzero[r_rows]
        r = (_uniform(_keyed_hash(keys[r_rows], r_cols, 3)) * n_nz.to(torch.float32)).long()
        r = torch.minimum(r, (n_nz - 1).clamp(min=0))
        nz_cols = nonzero.nonzero(as_tuple=True)[1]  # row-major: each row's expressed genes in order
        offset = torch.cumsum(n_nonzero, 0) - n_nonzero
        inputs[r_rows, r_cols] = values[r_rows, nz_cols[offset[r_rows] + r]]
    if config.max_visible is not None:
        visible = (inputs != 0) & ~is_mask
        surplus = (visible.sum(1) - int(config.max_visible)).clamp(min=0)
        if bool((surplus > 0).any()):
            extra = _choose_keyed(visible, surplus, scores)
            is_mask, target = is_mask | extra, target | extra
    return _finish(values, nonzero, target, is_mask, inputs)
