"""Biased masking of zero and non-zero expression values (paper section 4.2, appendix 6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskingConfig:
    """How many positions to mask, and what they are replaced with.

    Per cell, ``nonzero_ratio`` of the expressed genes are chosen, and as many unexpressed genes
    (``zero_to_nonzero`` times that number, capped by the zeros available), so that zero and
    non-zero targets come in about equal numbers: the paper's ~600 of ~2,000 non-zero and ~540
    of ~18,000 zero positions. Of the chosen positions, ``p_mask`` become [MASK], ``p_random``
    get a random expression value drawn from the batch, and the rest keep their value (the
    authors' released 80/10/10). At least one expressed gene always stays visible to the encoder.
    """

    nonzero_ratio: float = 0.3
    zero_to_nonzero: float = 0.9
    p_mask: float = 0.8
    p_random: float = 0.1


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
    # a [MASK] position carries no value; zero it so it can never leak into the encoder
    inputs = inputs.masked_fill(is_mask, 0.0)
    # keep at least one visible expressed gene per cell for the encoder
    visible = (inputs != 0) & ~is_mask
    starved = ~visible.any(1) & nonzero.any(1)
    if bool(starved.any()):
        first = (nonzero & starved.unsqueeze(1)).float().argmax(1)
        rows = starved.nonzero(as_tuple=True)[0]
        is_mask[rows, first[rows]] = False
        target[rows, first[rows]] = False
        inputs[rows, first[rows]] = values[rows, first[rows]]
    return MaskedBatch(values=values, inputs=inputs, target=target, is_mask=is_mask)
