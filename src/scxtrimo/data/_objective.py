"""One masked-regression training batch from raw counts (paper section 4; depth-aware variant).

The objective of pretraining in one place: counts are (optionally) thinned, normalized to
log1p CP10k, masked (:func:`~scxtrimo.data.mask_values_keyed`) and, for models with depth
tokens, extended by the T and S columns; the loss is the MSE at the masked genes against the
real cell's values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from .._device import autocast
from ._depth import ThinningConfig, depth_aware_inputs, depth_columns, log1p_cp10k
from ._masking import MaskingConfig, cell_keys, keyed_uniform, mask_values_keyed


@dataclass
class TrainingBatch:
    """Model inputs and regression targets of one batch.

    inputs : ``(B, n_positions)`` float32, what the model sees ([MASK] positions zeroed; T and S last).
    is_mask : ``(B, n_positions)`` bool, [MASK] positions (never a depth position).
    target : ``(B, n_genes)`` bool, positions the loss is computed on.
    values : ``(B, n_genes)`` float32, the real cell's log1p CP10k values (regression targets).
    """

    inputs: torch.Tensor
    is_mask: torch.Tensor
    target: torch.Tensor
    values: torch.Tensor

    @property
    def keep(self) -> torch.Tensor:
        """``target`` padded to ``(B, n_positions)`` (the predictions the decoder must make)."""
        extra = self.inputs.shape[1] - self.target.shape[1]
        if extra == 0:
            return self.target
        return torch.cat([self.target, self.target.new_zeros(self.target.shape[0], extra)], dim=1)


def training_batch(counts: torch.Tensor, keys: torch.Tensor, *, masking: MaskingConfig = MaskingConfig(),
                   thinning: ThinningConfig | None = None, depth_tokens: bool = False,
                   totals: torch.Tensor | None = None) -> TrainingBatch:
    """Build a :class:`TrainingBatch` from ``(B, n_genes)`` raw counts.

    Parameters
    ----------
    counts
        ``(B, n_genes)`` raw counts on the reference genes.
    keys
        ``(B,)`` int64 per-cell keys (:func:`~scxtrimo.data.cell_keys`): every random choice
        (thinning, masking) is a function of a cell's key.
    masking
        :class:`~scxtrimo.data.MaskingConfig`; targets are chosen among the genes the model sees
        (expressed and unexpressed in the observed, possibly thinned, cell).
    thinning
        ``None``: the model sees the real cell. A :class:`~scxtrimo.data.ThinningConfig`: the
        model sees a binomial thinning of it and regresses the real values (depth-aware
        pretraining).
    depth_tokens
        Append the T (real depth) and S (observed depth) columns.
    totals
        ``(B,)`` real total counts, when they differ from ``counts.sum(1)``.
    """
    if thinning is not None:
        observed, values, depth = depth_aware_inputs(counts, keys, thinning, totals=totals)
    else:
        values, total = log1p_cp10k(counts)
        if totals is not None:
            total = totals.to(torch.float64)
        observed = values
        log_total = torch.log10(total)
        depth = depth_columns(log_total, log_total)
    mb = mask_values_keyed(observed, masking, keys=keys)
    inputs, is_mask = mb.inputs, mb.is_mask
    if depth_tokens:
        inputs = torch.cat([inputs, depth.to(inputs.dtype)], dim=1)
        is_mask = torch.cat([is_mask, is_mask.new_zeros(is_mask.shape[0], 2)], dim=1)
    return TrainingBatch(inputs=inputs, is_mask=is_mask, target=mb.target, values=values)


def masked_sse(pred: torch.Tensor, batch: TrainingBatch) -> torch.Tensor:
    """Sum of squared errors at the masked positions (float32); divide by their number for the MSE."""
    return (pred[batch.target].float() - batch.values[batch.target].float()).pow(2).sum()


def view_contrast(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE between two views of the same cells (float32 scalar, mean over cells).

    ``a`` and ``b`` are ``(B, d)`` embeddings of the same ``B`` cells under two independent
    corruptions (masking and thinning). Each cell's two views must be nearer (cosine similarity
    over ``temperature``) than its view and any other cell's in the batch: cross-entropy of
    ``a @ b.T`` with the diagonal as the classes, averaged over both directions. Its value is
    ``log B`` when the embeddings carry no information, 0 at the optimum. Not in the xTrimoGene
    paper (SimCLR's objective, which CLEAR, Han et al. 2022, applied to single cells).
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"view_contrast needs two (B, d) tensors of one shape; got {tuple(a.shape)} and {tuple(b.shape)}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}.")
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    logits = a @ b.T / temperature
    labels = torch.arange(a.shape[0], device=a.device)
    ce = torch.nn.functional.cross_entropy
    return 0.5 * (ce(logits, labels) + ce(logits.T, labels))


def lr_factor(step: int, warmup: int, progress: float, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` as ``progress`` -> 1."""
    if step < warmup:
        return (step + 1) / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def counts_to_device(X: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    """``(B, n)`` CSR counts -> dense float32 ``(B, n)`` on ``device`` (built there from the CSR pieces)."""
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    r = torch.from_numpy(rows).to(device, non_blocking=True)
    c = torch.from_numpy(X.indices.astype(np.int64)).to(device, non_blocking=True)
    v = torch.from_numpy(np.asarray(X.data, dtype=np.float32)).to(device, non_blocking=True)
    dense = torch.zeros(X.shape, dtype=torch.float32, device=device)
    dense[r, c] = v
    return dense


@torch.no_grad()
def evaluate_masked(model, X: sp.csr_matrix, *, device: torch.device, batch_size: int,
                    masking: MaskingConfig = MaskingConfig(), thinning: ThinningConfig | None = None,
                    totals: np.ndarray | None = None, seed: int = 0, decoder_zeros: int | None = None) -> dict:
    """Masked-value MSE and Pearson r (log1p CP10k) on the cells of ``X`` with fixed masks.

    ``X`` holds raw counts on the reference genes, ``(n, 19264)`` CSR. Cell ``i`` is masked
    (and thinned, with ``thinning``) by the key ``cell_keys(seed, 0, i)``, so the score does not
    depend on ``batch_size``, except with ``decoder_zeros``: the decoded set of a batch is sized
    from its longest cell, so a cell's count of sampled unexpressed genes, and the score a little,
    depend on its batch mates (compare scores at one ``batch_size``). Returns ``mse``,
    ``pearson`` and ``n_targets``.
    """
    if X.shape[0] == 0:
        return {"mse": float("nan"), "pearson": float("nan"), "n_targets": 0}
    was = model.training
    model.eval()
    preds, trues = [], []
    for start in range(0, X.shape[0], batch_size):
        stop = min(start + batch_size, X.shape[0])
        counts = counts_to_device(X[start:stop], device)
        tot = None if totals is None else torch.as_tensor(np.asarray(totals[start:stop]), device=device)
        keys = cell_keys(seed, 0, np.arange(start, stop), device=device)
        tb = training_batch(counts, keys, masking=masking, thinning=thinning, depth_tokens=model.config.depth_tokens,
                            totals=tot)
        scores = keyed_uniform(keys, tb.inputs.shape[1]) if decoder_zeros is not None else None
        with autocast(device):
            pred = model(tb.inputs, tb.is_mask, keep=tb.keep, decoder_zeros=decoder_zeros, zero_scores=scores)
        preds.append(pred[tb.target].float().cpu())
        trues.append(tb.values[tb.target].float().cpu())
    model.train(was)
    p, t = torch.cat(preds).numpy(), torch.cat(trues).numpy()
    r = float(np.corrcoef(p, t)[0, 1]) if p.size > 1 and p.std() > 0 and t.std() > 0 else float("nan")
    return {"mse": float(np.mean((p - t) ** 2)), "pearson": r, "n_targets": int(p.size)}
