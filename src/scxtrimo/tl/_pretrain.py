"""Masked-value pretraining of xTrimoGene on one process (paper section 4, appendix 5)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from .._anndata import rna_modality
from .._device import autocast, resolve_device
from ..data._batching import sortish_batches
from ..data._masking import MaskingConfig, mask_values
from ..data._prepare import iter_log1p_blocks, prepare_input
from ..models._config import XTrimoGeneConfig
from ..models._xtrimogene import XTrimoGene

MIN_GENES = 201  # appendix 1: keep cells with more than 200 expressed genes
SPLIT = (0.96, 0.02, 0.02)


def _as_list(data) -> list:
    if isinstance(data, (str, os.PathLike, ad.AnnData)) or hasattr(data, "mod"):
        return [data]
    return list(data)


def collect_cells(data, *, gene_symbols: str | None = None, min_genes: int = MIN_GENES) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """Stack every input's log1p CP10k cells (reference genes) that pass QC.

    Returns the CSR float32 matrix and a table of ``source`` (input index or file name) and
    ``obs_name`` per kept cell.
    """
    blocks, rows = [], []
    for i, item in enumerate(_as_list(data)):
        label = str(item) if isinstance(item, (str, os.PathLike)) else f"input{i}"
        adata = ad.read_h5ad(item, backed="r") if isinstance(item, (str, os.PathLike)) else rna_modality(item)
        prep = prepare_input(adata, gene_symbols=gene_symbols)
        for start, stop, X in iter_log1p_blocks(prep):
            keep = np.diff(X.indptr) >= min_genes
            blocks.append(X[keep])
            rows.append(pd.DataFrame({"source": label, "obs_name": np.asarray(adata.obs_names[start:stop])[keep]}))
        if getattr(adata, "isbacked", False):
            adata.file.close()
    if not blocks or sum(b.shape[0] for b in blocks) == 0:
        raise ValueError(f"No cell has at least {min_genes} expressed reference genes; nothing to pretrain on.")
    return sp.vstack(blocks, format="csr"), pd.concat(rows, ignore_index=True)


def split_cells(n: int, random_state: int = 0, fractions: Sequence[float] = SPLIT) -> dict[str, np.ndarray]:
    """Deterministic 96:2:2 train/validation/test split of ``n`` cells (appendix 1)."""
    order = np.random.default_rng(random_state).permutation(n)
    n_val = max(1, int(round(fractions[1] * n))) if n >= 3 else 0
    n_test = max(1, int(round(fractions[2] * n))) if n >= 3 else 0
    return {
        "validation": np.sort(order[:n_val]),
        "test": np.sort(order[n_val : n_val + n_test]),
        "train": order[n_val + n_test :],
    }


def lr_factor(step: int, warmup: int, progress: float, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` as ``progress`` -> 1."""
    if step < warmup:
        return (step + 1) / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def masked_loss(pred: torch.Tensor, values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between predicted and true values at the masked positions (section 4.1)."""
    return torch.nn.functional.mse_loss(pred[target].float(), values[target].float())


@torch.no_grad()
def evaluate(model: XTrimoGene, X: sp.csr_matrix, *, batch_size: int, masking: MaskingConfig, device: torch.device, seed: int = 0) -> dict:
    """Masked-position MSE and Pearson r on ``X`` with fixed (seeded) masks."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    preds, trues = [], []
    for start in range(0, X.shape[0], batch_size):
        values = torch.from_numpy(X[start : start + batch_size].toarray()).to(device)
        mb = mask_values(values, masking, generator=gen)
        with autocast(device):
            pred = model(mb.inputs, mb.is_mask)
        preds.append(pred[mb.target].float().cpu())
        trues.append(mb.values[mb.target].float().cpu())
    model.train(was_training)
    p, t = torch.cat(preds).numpy(), torch.cat(trues).numpy()
    r = float(np.corrcoef(p, t)[0, 1]) if p.size > 1 and p.std() > 0 and t.std() > 0 else float("nan")
    return {"mse": float(np.mean((p - t) ** 2)), "pearson": r, "n_targets": int(p.size)}


def pretrain(
    data,
    *,
    config: str | XTrimoGeneConfig = "xtrimo-3m",
    model: XTrimoGene | None = None,
    epochs: float = 1.0,
    max_steps: int | None = None,
    max_time: float | None = None,
    batch_size: int = 8,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup_steps: int | None = None,
    grad_clip: float = 1.0,
    masking: MaskingConfig | None = None,
    eval_every: int = 200,
    eval_cells: int = 256,
    min_genes: int = MIN_GENES,
    gene_symbols: str | None = None,
    device: str = "auto",
    random_state: int = 0,
    save_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[XTrimoGene, pd.DataFrame]:
    """Pretrain xTrimoGene by regressing masked expression values (paper section 4).

    Cells are aligned to the 19,264 reference genes and normalized to log1p CP10k on the fly,
    cells with fewer than ``min_genes`` expressed reference genes are dropped (appendix 1 keeps
    cells with more than 200), and the rest are split 96:2:2 into train / validation / test
    with ``random_state``. Each step masks ~30% of every cell's expressed genes and about as
    many unexpressed ones (80% [MASK], 10% random value, 10% unchanged; section 4.2, appendix
    6) and minimizes the MSE at those positions. AdamW with linear warm-up and cosine decay to
    10% of ``lr``, gradient clipping; bf16 autocast on CUDA, fp32 on CPU.

    Parameters
    ----------
    data
        AnnData (raw counts, or prepared with :func:`scxtrimo.pp.normalize`), MuData (its RNA
        modality), a path to an ``.h5ad`` file, or a list of these. Not modified.
    config
        Architecture for a new model: ``"xtrimo-3m"``, ``"xtrimo-10m"``, ``"xtrimo-100m"`` or a
        :class:`~scxtrimo.models.XTrimoGeneConfig`. Ignored when ``model`` is given.
    model
        Continue training this model instead of starting from random weights.
    epochs, max_steps, max_time
        Stop after ``epochs`` passes over the training cells, ``max_steps`` optimizer steps, or
        ``max_time`` seconds of wall time, whichever comes first.
    batch_size
        Cells per step.
    lr, weight_decay, warmup_steps, grad_clip
        AdamW settings (the authors': lr 1e-4, no weight decay, clipping at 1.0). Warm-up
        defaults to 5% of the planned steps, at most 1,000.
    masking
        Masking ratios, :class:`~scxtrimo.data.MaskingConfig`.
    eval_every, eval_cells
        Every ``eval_every`` steps (and at the end), evaluate on up to ``eval_cells`` validation
        cells with fixed masks.
    device
        ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
    random_state
        Seeds the split, the initialization, the batch order and the masks.
    save_dir
        If given, the model is saved there (``model.save``) at every evaluation and at the end.

    Returns
    -------
    model : XTrimoGene
        The trained model (eval mode, on ``device``), with ``model.metadata`` describing the run.
    history : pandas.DataFrame
        One row per evaluation: ``step``, ``epoch``, ``cells_seen``, ``lr``, ``elapsed_s``,
        ``train_mse`` (mean since the last evaluation), ``val_mse``, ``val_pearson`` (masked
        positions). ``history.attrs['test']`` holds the final test-split metrics.

    Raises
    ------
    ValueError
        No cell passes QC; the alignment and validation errors of :func:`scxtrimo.pp.align_genes`.
    """
    dev = resolve_device(device)
    masking = masking or MaskingConfig()
    torch.manual_seed(random_state)
    X, cells = collect_cells(data, gene_symbols=gene_symbols, min_genes=min_genes)
    split = split_cells(X.shape[0], random_state)
    X_train, X_val, X_test = (X[split[k]] for k in ("train", "validation", "test"))
    X_val = X_val[:eval_cells]
    if model is None:
        model = XTrimoGene(config)
    model = model.to(dev).train()

    steps_per_epoch = max(1, X_train.shape[0] // batch_size)
    total = int(math.ceil(epochs * steps_per_epoch))
    if max_steps is not None:
        total = min(total, max_steps)
    warmup = warmup_steps if warmup_steps is not None else max(1, min(1000, total // 20))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(random_state)
    gen = torch.Generator(device=dev).manual_seed(random_state)
    lengths = np.diff(X_train.indptr)

    history, running = [], []
    t0 = time.perf_counter()
    step, epoch, batches = 0, 0, sortish_batches(lengths, batch_size, rng)

    def record(final: bool = False):
        metrics = evaluate(model, X_val, batch_size=batch_size, masking=masking, device=dev, seed=random_state)
        history.append({
            "step": step, "epoch": step / steps_per_epoch, "cells_seen": step * batch_size,
            "lr": opt.param_groups[0]["lr"], "elapsed_s": time.perf_counter() - t0,
            "train_mse": float(np.mean(running)) if running else float("nan"),
            "val_mse": metrics["mse"], "val_pearson": metrics["pearson"],
        })
        running.clear()
        if save_dir is not None:
            model.metadata = _metadata(model, X, split, step, batch_size, lr, t0, dev, history, masking)
            model.save(save_dir, metadata=model.metadata)

    bar = tqdm(total=total, desc="pretrain", unit="step", disable=not progress)
    while step < total:
        elapsed = time.perf_counter() - t0
        if max_time is not None and elapsed > max_time:
            break
        if not batches:
            epoch += 1
            batches = sortish_batches(lengths, batch_size, rng)
        rows = np.sort(batches.pop())
        progress = max((step - warmup) / max(1, total - warmup), elapsed / max_time if max_time else 0.0)
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, warmup, progress)
        values = torch.from_numpy(X_train[rows].toarray()).to(dev, non_blocking=True)
        mb = mask_values(values, masking, generator=gen)
        with autocast(dev):
            pred = model(mb.inputs, mb.is_mask)
        loss = masked_loss(pred, mb.values, mb.target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        step += 1
        running.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{running[-1]:.3f}")
        if eval_every and step % eval_every == 0:
            record()
    bar.close()
    if not history or history[-1]["step"] != step:
        record(final=True)
    test = evaluate(model, X_test, batch_size=batch_size, masking=masking, device=dev, seed=random_state + 1)
    hist = pd.DataFrame(history)
    hist.attrs["test"] = test
    model.metadata = _metadata(model, X, split, step, batch_size, lr, t0, dev, history, masking) | {"test": test}
    if save_dir is not None:
        model.save(save_dir, metadata=model.metadata)
    return model.eval(), hist


def _metadata(model, X, split, step, batch_size, lr, t0, dev, history, masking) -> dict:
    last = history[-1] if history else {}
    return {
        "cells": int(X.shape[0]),
        "split": {k: int(len(v)) for k, v in split.items()},
        "steps": int(step),
        "batch_size": int(batch_size),
        "cells_seen": int(step * batch_size),
        "lr": float(lr),
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "masking": masking.__dict__,
        "val_mse": last.get("val_mse"),
        "val_pearson": last.get("val_pearson"),
    }
