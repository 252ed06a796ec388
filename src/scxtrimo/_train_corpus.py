"""Time-boxed pretraining on a packed corpus, sized for one GPU call (or a CPU background run).

The loop behind ``scripts/train_device.py``: it needs torch, NumPy and SciPy only (plus
performer-pytorch for the decoder), so it runs on a GPU machine that has no scanpy or anndata.
Batches are cells of similar length (few [PAD] tokens), moved to the device as CSR pieces and
made dense there; thinning, masking and depth tokens are per-cell keyed
(:func:`~scxtrimo.data._objective.training_batch`); bf16 autocast and fused AdamW on CUDA; the
learning rate warms up and then follows a cosine over the time budget.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ._device import autocast
from ._oom import retry_on_oom
from .data._batching import sortish_batches
from .data._corpus import Corpus
from .data._depth import ThinningConfig
from .data._masking import MaskingConfig, cell_keys, keyed_uniform
from .data._objective import counts_to_device, evaluate_masked, lr_factor, masked_sse, training_batch, view_contrast
from ._cell_terms import HEAD_LR_SCALE, CellTerms, CellTermsConfig, stat_rows
from .models._xtrimogene import XTrimoGene

#: Dense bf16 peak of the GPUs the training run is sized for (NVIDIA's data sheets), for MFU;
#: the first name contained in the device's name wins (more specific names first).
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class CorpusTrainConfig:
    """Settings of :func:`train_corpus` (what ``scripts/train_device.py`` exposes)."""

    minutes: float = 8.0
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    decoder_zeros: int | None = None
    thinning: ThinningConfig | None = field(default_factory=ThinningConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    eval_every_s: float = 60.0
    eval_cells: int = 256
    random_state: int = 0
    max_steps: int | None = None
    gene_lr_scale: float = 1.0
    """Learning-rate multiplier of the gene embedding table (0 freezes it): a co-expression start
    (:func:`~scxtrimo.models.init_gene_embedding`) can keep its structure while the encoder learns."""
    cell_weight: float = 0.0
    """Weight of the cell-level term (0: off, the paper's objective alone): a
    :class:`~scxtrimo.models.CellExpressionHead` predicts the real values at the masked targets
    from the mean-pooled encoder outputs of the corrupted cell; its MSE, times this weight, is
    added to the masked-regression MSE. The head is trained alongside and then discarded."""
    cell_readout: str = "bilinear"
    """The head's read-out (:class:`~scxtrimo.models.CellExpressionHead`): ``"bilinear"`` or ``"dot"``."""
    cell_head_lr_scale: float = HEAD_LR_SCALE
    """Learning-rate multiplier of the heads (:data:`~scxtrimo._cell_terms.HEAD_LR_SCALE`)."""
    contrast_weight: float = 0.0
    """Weight of a contrastive term (0: off): each cell is corrupted a second time (its own
    masking and thinning keys), both views are mean-pooled by the encoder, and
    :func:`~scxtrimo.data._objective.view_contrast` (InfoNCE over the cells of a micro-batch)
    times this weight is added to the loss. It asks the embedding ``tl.embed`` returns to tell
    cells apart, which neither masked regression nor the cell term does. Not in the paper."""
    contrast_temperature: float = 0.1
    """Temperature of the contrastive term's cosine similarities."""
    factor_weight: float = 0.0
    """Weight of the factor-score term (0: off): a :class:`~scxtrimo.models.FactorScoreHead`
    asks the mean-pooled encoder output of the corrupted cell, up to a learned rotation, scale
    and shift (set in closed form on 512 training cells before the first step), for the real
    cell's least-squares scores on the gene embedding table as it was when training
    started (freeze the table with ``gene_lr_scale=0``); its MSE over the factors, averaged over
    cells, times this weight, is added to the loss. Trained at ``cell_head_lr_scale``. Not in
    the paper."""
    compile_decoder: bool = False
    """Compile the Performer decoder (``nn.Module.compile``, torch inductor; the weights' names
    are unchanged). The first steps then include the compilation."""


def param_groups(model: XTrimoGene, gene_lr_scale: float, head: nn.Module | None = None,
                 head_lr_scale: float = 1.0) -> list[dict]:
    """AdamW parameter groups: the gene embedding table with ``lr_scale=gene_lr_scale`` (left out
    when 0, so that it stays exactly as it is), a training ``head`` with ``lr_scale=head_lr_scale``,
    everything else with ``lr_scale=1``."""
    if gene_lr_scale < 0:
        raise ValueError(f"gene_lr_scale must be >= 0 (0 freezes the gene embedding); got {gene_lr_scale}.")
    gene = model.gene_embedding.weight
    rest = [p for p in model.parameters() if p is not gene]
    groups = [{"params": rest, "lr_scale": 1.0}]
    if head is not None:
        groups.append({"params": list(head.parameters()), "lr_scale": float(head_lr_scale)})
    if gene_lr_scale > 0:
        groups.append({"params": [gene], "lr_scale": float(gene_lr_scale)})
    return groups


@contextmanager
def gene_table_training(model: XTrimoGene, trained: bool):
    """Within the block, the gene embedding table requires a gradient only if ``trained`` (frozen:
    no gradient and none in the clipping norm); afterwards it is as it was. The table is looked
    up again on exit, so a parameter that FSDP replaced inside the block is the one restored."""
    before = model.gene_embedding.weight.requires_grad
    model.gene_embedding.weight.requires_grad_(trained)
    try:
        yield
    finally:
        model.gene_embedding.weight.requires_grad_(before)


def step_flops(model: XTrimoGene, counts: torch.Tensor, totals: torch.Tensor, cfg: CorpusTrainConfig) -> float:
    """FLOPs of one forward + backward pass on ``counts`` (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    keys = cell_keys(cfg.random_state, 0, np.arange(counts.shape[0]), device=counts.device)
    tb = training_batch(counts, keys, masking=cfg.masking, thinning=cfg.thinning,
                        depth_tokens=model.config.depth_tokens, totals=totals)
    with FlopCounterMode(display=False) as fc:
        with autocast(counts.device):
            pred = model(tb.inputs, tb.is_mask, keep=tb.keep, decoder_zeros=cfg.decoder_zeros,
                         zero_scores=torch.rand(tb.inputs.shape, device=counts.device))
        masked_sse(pred, tb).backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known GPU, else ``None`` (no MFU is reported on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class _MicroBatches:
    """Pieces a step is cut into (gradient accumulation); doubled when CUDA runs out of memory."""

    def __init__(self):
        self.count = 1

    def double(self, cells: int) -> bool:
        if self.count >= cells:
            return False
        self.count = min(2 * self.count, cells)
        return True


def _step(model, opt, corpus: Corpus, part: np.ndarray, step: int, cfg: CorpusTrainConfig, device: torch.device,
          pieces: int, terms: CellTerms | None = None) -> tuple[dict[str, float], int]:
    """One optimizer step on the cells ``part`` in ``pieces`` micro-batches.

    Returns the losses by history column (``train_mse``, the masked MSE; ``train_cell_mse`` and
    ``train_factor_mse``, the cell-level terms of ``terms`` that are on; ``train_contrast``,
    with ``cfg.contrast_weight``) and the number of encoder tokens. The contrastive term
    compares the cells of one micro-batch, so unlike the rest it depends on ``pieces``.

    Every cell's thinning and masks come from its key (seed, step, position in the batch), so
    the update does not depend on ``pieces`` (up to float rounding).
    """
    opt.zero_grad(set_to_none=True)
    contrast = cfg.contrast_weight > 0
    pooled = terms is not None or contrast
    batches = []
    for pos in np.array_split(np.arange(len(part)), pieces):
        counts = counts_to_device(corpus.counts[part[pos]], device)
        totals = torch.from_numpy(corpus.total[part[pos]]).to(device, non_blocking=True)
        view = lambda keys: training_batch(counts, keys, masking=cfg.masking, thinning=cfg.thinning,  # noqa: E731
                                           depth_tokens=model.config.depth_tokens, totals=totals)
        keys = cell_keys(cfg.random_state, step, pos, device=device)
        # the second view's keys: the same cells at positions no batch reaches (bit 31 set)
        second = view(cell_keys(cfg.random_state, step, pos | (1 << 31), device=device)) if contrast else None
        batches.append((keys, view(keys), second, len(pos) / len(part)))
    n_t = sum(tb.target.sum() for _, tb, _, _ in batches).clamp(min=1)
    sse_total, tokens = torch.zeros((), device=device), 0
    term_totals = {"cell": torch.zeros((), device=device), "factor": torch.zeros((), device=device)}
    contrast_total = torch.zeros((), device=device)
    for keys, tb, second, share in batches:
        with autocast(device):
            out = model(tb.inputs, tb.is_mask, keep=tb.keep, decoder_zeros=cfg.decoder_zeros,
                        zero_scores=keyed_uniform(keys, tb.inputs.shape[1]) if cfg.decoder_zeros else None,
                        return_cells=pooled)
            other = model.pooled_visible(second.inputs, second.is_mask) if contrast else None
        pred, cells = out if pooled else (out, None)
        sse = masked_sse(pred, tb)
        loss = sse / n_t
        if terms is not None:
            term_sse = terms.losses(cells, model.gene_embedding.weight, tb)
            loss = loss + terms.weighted(term_sse, n_t, len(part))
            for k, v in term_sse.items():
                term_totals[k] += v.detach()
        if contrast:
            nce = view_contrast(cells, other, cfg.contrast_temperature)
            loss = loss + cfg.contrast_weight * share * nce
            contrast_total += share * nce.detach()
        loss.backward()
        sse_total += sse.detach()
        tokens += int(((tb.inputs != 0) & ~tb.is_mask).sum())
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    if terms is not None:  # clipped on their own: their gradients must not shrink the model's step
        for h in terms.children():
            torch.nn.utils.clip_grad_norm_(h.parameters(), cfg.grad_clip)
    opt.step()
    losses = {"train_mse": float(sse_total / n_t)}
    if terms is not None and terms.head is not None:
        losses["train_cell_mse"] = float(term_totals["cell"] / n_t)
    if terms is not None and terms.factor is not None:
        losses["train_factor_mse"] = float(term_totals["factor"] / len(part))
    if contrast:
        losses["train_contrast"] = float(contrast_total)
    return losses, tokens


def train_corpus(model: XTrimoGene, corpus: Corpus, cfg: CorpusTrainConfig, *, device: torch.device,
                 on_eval=None, log=print) -> dict:
    """Pretrain ``model`` in place on the training cells of ``corpus`` for ``cfg.minutes``.

    Parameters
    ----------
    model
        The model to train (moved to ``device``); a config with depth tokens gets T and S.
    corpus
        A packed corpus (:func:`~scxtrimo.data.load_corpus`); its split decides training
        and validation cells.
    cfg
        :class:`CorpusTrainConfig`.
    device
        Where to train; CUDA runs in bf16 autocast with fused AdamW and TF32.
    on_eval
        Called with the history list after every evaluation (e.g. to save the model).
    log
        Where progress lines go.

    Returns
    -------
    dict
        ``history`` (list of dicts: step, cells_seen, elapsed_s, lr, train_mse, val_mse,
        val_pearson, val_thinned_mse, val_thinned_pearson; train_cell_mse with ``cfg.cell_weight``,
        train_factor_mse with ``cfg.factor_weight``, train_contrast with ``cfg.contrast_weight``) and ``throughput`` (cells/s,
        encoder tokens/s, FLOPs per cell, MFU where the GPU's peak is known, steps, cells seen,
        training seconds excluding evaluations).
    """
    with gene_table_training(model, cfg.gene_lr_scale > 0):
        return _train(model, corpus, cfg, device=device, on_eval=on_eval, log=log)


def _train(model: XTrimoGene, corpus: Corpus, cfg: CorpusTrainConfig, *, device: torch.device, on_eval, log) -> dict:
    model.to(device).train()
    if cfg.compile_decoder:
        model.decoder.compile()
    rows = corpus.rows("train")
    val = corpus.rows("validation")[: cfg.eval_cells]
    lengths = np.diff(corpus.counts.indptr)
    fused = device.type == "cuda"
    if cfg.contrast_weight < 0:
        raise ValueError(f"contrast_weight must be >= 0 (0: no contrastive term); got {cfg.contrast_weight}.")
    term_cfg = CellTermsConfig(cfg.cell_weight, cfg.cell_readout, cfg.factor_weight)
    terms = None
    if term_cfg.active:
        stats = corpus.counts[rows[stat_rows(len(rows))]] if term_cfg.factor_weight > 0 else None  # every set
        terms = CellTerms(model, term_cfg, stat_counts=stats, device=device, log=log)
    opt = torch.optim.AdamW(param_groups(model, cfg.gene_lr_scale, terms, cfg.cell_head_lr_scale), lr=cfg.lr,
                            weight_decay=cfg.weight_decay, fused=fused)
    budget = cfg.minutes * 60.0
    t0 = time.perf_counter()
    eval_s = 0.0
    history, running = [], {}  # running: the steps' losses since the last evaluation, by history column
    step, cells, tokens, epoch = 0, 0, 0, 0
    flops_per_cell = None
    next_eval = cfg.eval_every_s

    def record():
        nonlocal eval_s
        t = time.perf_counter()
        kw = dict(device=device, batch_size=min(cfg.batch_size, 64), masking=cfg.masking,
                  decoder_zeros=cfg.decoder_zeros)
        X_val, t_val = corpus.counts[val], corpus.total[val]
        plain = evaluate_masked(model, X_val, totals=t_val, thinning=None, seed=12345, **kw)
        thinned = evaluate_masked(model, X_val, totals=t_val, thinning=cfg.thinning or ThinningConfig(), seed=12345, **kw)
        eval_s += time.perf_counter() - t
        history.append({
            "step": step, "cells_seen": cells, "elapsed_s": round(time.perf_counter() - t0, 1),
            "lr": opt.param_groups[0]["lr"], "train_mse": float(np.mean(running.pop("train_mse", [np.nan]))),
            "val_mse": plain["mse"], "val_pearson": plain["pearson"],
            "val_thinned_mse": thinned["mse"], "val_thinned_pearson": thinned["pearson"],
        })
        history[-1].update({k: float(np.mean(v)) for k, v in running.items()})  # the extra terms' columns
        running.clear()
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in history[-1].items()))
        if on_eval is not None:
            on_eval(history)

    micro = _MicroBatches()
    done = False
    while not done:
        rng = np.random.default_rng([cfg.random_state, epoch])
        for b in sortish_batches(lengths[rows], cfg.batch_size, rng):
            elapsed = time.perf_counter() - t0
            if elapsed > budget or (cfg.max_steps is not None and step >= cfg.max_steps):
                done = True
                break
            part = rows[b]
            if flops_per_cell is None:
                counts = counts_to_device(corpus.counts[part], device)
                totals = torch.from_numpy(corpus.total[part]).to(device, non_blocking=True)
                flops_per_cell = retry_on_oom(lambda: step_flops(model, counts, totals, cfg),
                                              lambda: False, what="train_corpus FLOP count") / len(part)
                del counts, totals
            for group in opt.param_groups:
                group["lr"] = cfg.lr * group["lr_scale"] * lr_factor(step, cfg.warmup_steps, elapsed / budget)
            losses, n_tok = retry_on_oom(
                lambda: _step(model, opt, corpus, part, step, cfg, device, micro.count, terms),
                lambda: micro.double(len(part)), what="train_corpus")
            step += 1
            cells += len(part)
            tokens += n_tok
            for k, v in losses.items():
                running.setdefault(k, []).append(v)
            if time.perf_counter() - t0 - eval_s >= next_eval:
                record()
                next_eval += cfg.eval_every_s
        epoch += 1
    if not history or history[-1]["step"] != step:
        record()
    train_s = time.perf_counter() - t0 - eval_s
    peak = peak_flops(device)
    cps = cells / max(train_s, 1e-9)
    return {
        "history": history,
        "throughput": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "steps": step, "cells_seen": cells, "epochs": cells / max(1, len(rows)), "train_s": round(train_s, 1),
            "eval_s": round(eval_s, 1), "cells_per_s": cps, "encoder_tokens_per_s": tokens / max(train_s, 1e-9),
            "flops_per_cell": flops_per_cell, "achieved_flops": (flops_per_cell or 0) * cps,
            "mfu": (flops_per_cell or 0) * cps / peak if peak else None,
            "train_cells": int(len(rows)), "val_cells": int(len(val)), "batch_size": cfg.batch_size,
            "minutes": cfg.minutes, "threads": torch.get_num_threads(), "micro_batches": micro.count,
            "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        },
    }
