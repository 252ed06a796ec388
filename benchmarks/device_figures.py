"""Issue 16's GPU figures in one process: embedding speed, peak memory, pretraining MFU.

Runs where anndata and scanpy are absent (the lent GPU machine; ``benchmarks/device.sh`` calls
it): cells come from the packed corpus (``scxtrimo corpus``, NumPy/SciPy only), embedding runs
``tl.embed``'s loop (``scxtrimo._inference.embed_matrix``: the same length-bucketed batches,
inference mode, bf16 autocast and CUDA defaults) and a training step is the one of
``scxtrimo._train_corpus`` (the GPU pretraining loop of ``scripts/train_device.py``). Models
have random weights (seed 0).

* **shapes** (first, so that its cold passes are the process's first encoder calls): xtrimo-10m
  over ``--shape-cells`` cells of the largest corpus set other than pbmc3k, the first pass and
  later passes of ``tl.embed``'s loop, batches padded tightly or to the width grid (CUDA's
  default), under torch's default attention kernel (cuDNN on an H100/H200: a plan per new batch
  shape) and under the memory-efficient kernel alone.
* **embed**: xtrimo-10m and xtrimo-100m over every pbmc3k cell (log1p CP10k from the corpus's
  counts; that normalization is timed, as ``tl.embed`` times its own), median cells/s of
  ``--repeats`` passes after one first pass (timed on its own: the cost of new batch shapes);
  the loop alone at the other ``--embed-budgets`` and with a bfloat16 copy of the model, autocast
  off (a candidate, with its cosine to the autocast embedding); the same model's authors' path (one cell at a
  time, fp32, the dense 19,266-long input per cell: ``embed_throughput.authors_embed``) on the
  first ``--authors-cells`` cells in the same process; speed-up; MFU (encoder FLOPs of the real
  tokens, ``embed_throughput.encoder_flops``); agreement of the two embeddings (cosine).
* **memory**: xtrimo-100m over cells cut to exactly ``--memory-genes`` of their own expressed
  genes (the deepest corpus cells; real values kept): peak allocated and reserved GPU memory
  (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``, the weights included, the CUDA
  context not) at the default token budget, smaller budgets, one cell per batch, and on the
  authors' path.
* **pretrain**: full training steps as ``train_corpus`` runs them (CSR counts to the device,
  keyed thinning and masking, bf16 autocast, the paper's full-length decoder over all 19,264
  genes, masked MSE, backward, gradient clipping, fused AdamW) on the corpus's training cells in
  length-sorted batches; time per step from CUDA events (``--warmup`` untimed steps first);
  FLOPs of each timed step's forward and backward from ``torch.utils.flop_counter`` on the same
  batch; MFU against the GPU's dense bf16 peak from its data sheet (and against the bf16
  matmul rate measured in the same run); for ``--compile-decoder`` models (xtrimo-10m), the
  same steps again with the decoder compiled (``nn.Module.compile``), its first step timed apart.

Every figure names the GPU. Where one misses its target, a ``torch.profiler`` summary (the top
kernels and operators by GPU time, and how busy the GPU was) goes into ``profiles.txt``.

    python benchmarks/device_figures.py --corpus runs/corpus.xtc --out "$OUT"                  # GPU
    python benchmarks/device_figures.py --corpus runs/corpus.xtc --out runs/device_smoke --smoke  # CPU, tiny
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a plain checkout, no install

from embed_throughput import authors_embed, encoder_flops, peak_flops  # noqa: E402

from scxtrimo._device import autocast  # noqa: E402
from scxtrimo._inference import batch_cells, embed_matrix, token_budget  # noqa: E402
from scxtrimo.data._batching import length_batches, sortish_batches  # noqa: E402
from scxtrimo.data._corpus import load_corpus  # noqa: E402
from scxtrimo.data._depth import ThinningConfig  # noqa: E402
from scxtrimo.data._masking import MaskingConfig, cell_keys  # noqa: E402
from scxtrimo.data._objective import masked_sse, training_batch  # noqa: E402
from scxtrimo.models import XTrimoGene  # noqa: E402

#: Dense bf16 tensor-core peaks (NVIDIA data sheets, without sparsity), matched in this order
#: against ``torch.cuda.get_device_name``.
DATASHEET_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                  ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12))

#: The issue's targets: (id, what, model, comparison, threshold).
TARGETS = (
    ("embed_10m_cells_per_s", "xtrimo-10m embedding, pbmc3k cells, cells/s", ">=", 20_000),
    ("embed_100m_cells_per_s", "xtrimo-100m embedding, pbmc3k cells, cells/s", ">=", 2_000),
    ("embed_10m_speedup", "xtrimo-10m embedding, speed-up over the authors' one-cell fp32 path", ">=", 100),
    ("embed_100m_speedup", "xtrimo-100m embedding, speed-up over the authors' one-cell fp32 path", ">=", 100),
    ("memory_100m_gb", "xtrimo-100m embedding at 2,000 expressed genes, peak GPU memory (GB, tl.embed defaults)",
     "<", 2.0),
    ("pretrain_10m_mfu", "xtrimo-10m pretraining step, full-length decoder, bf16: MFU", ">=", 0.40),
    ("pretrain_100m_mfu", "xtrimo-100m pretraining step, full-length decoder, bf16: MFU", ">=", 0.40),
)

LOG = print


def log(msg: str) -> None:
    LOG(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def dense_counts(X: sp.csr_matrix, dev: torch.device) -> torch.Tensor:
    """The training loop's CSR -> dense counts on the device: scxtrimo's ``counts_to_device``
    (``scxtrimo.data._objective``; older trees: ``scxtrimo._train_corpus``, returning a pair)."""
    try:
        from scxtrimo.data._objective import counts_to_device
    except ImportError:
        from scxtrimo._train_corpus import counts_to_device
    out = counts_to_device(X, dev)
    return out[0] if isinstance(out, tuple) else out


def datasheet_peak(name: str | None) -> float | None:
    return next((v for k, v in DATASHEET_BF16 if name and k in name), None)


def gpu_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


class Marks:
    """Time points on the device's timeline: CUDA events on a GPU, the host clock on the CPU."""

    def __init__(self, dev: torch.device):
        self.dev, self.points = dev, []

    def mark(self) -> None:
        if self.dev.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.points.append(e)
        else:
            self.points.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds between consecutive marks (waits for the last one)."""
        if self.dev.type == "cuda":
            self.points[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.points, self.points[1:])]
        return list(np.diff(self.points))


def timed(fn, dev: torch.device) -> tuple[object, float]:
    m = Marks(dev)
    m.mark()
    out = fn()
    m.mark()
    return out, m.seconds()[0]


def peak_memory(dev: torch.device) -> dict:
    if dev.type != "cuda":
        return {"peak_allocated_gb": None, "peak_reserved_gb": None}
    return {"peak_allocated_gb": torch.cuda.max_memory_allocated(dev) / 1e9,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(dev) / 1e9}


def build(name: str, dev: torch.device) -> XTrimoGene:
    """A randomly initialized model (seed 0), created on ``dev`` directly (a 100M model's CPU
    initialization takes seconds)."""
    torch.manual_seed(0)
    try:
        with torch.device(dev):
            return XTrimoGene(name).to(dev)
    except Exception:  # an initializer without a kernel on this device
        torch.manual_seed(0)
        return XTrimoGene(name).to(dev)


# ---- profiles -------------------------------------------------------------------------------
PROFILES: list[str] = []


def profile(label: str, fn, dev: torch.device, *, memory: bool = False, rows: int = 25) -> None:
    """Run ``fn`` under torch.profiler; keep the top operators/kernels table for ``profiles.txt``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync(dev)
    t = time.perf_counter()
    try:
        with tprofile(activities=acts, profile_memory=memory, record_shapes=False) as prof:
            fn()
            sync(dev)
    except Exception as e:  # a profile must never cost the figures
        PROFILES.append(f"==== {label}\nprofiler failed: {type(e).__name__}: {e}\n")
        return
    wall = time.perf_counter() - t
    ka = prof.key_averages()
    if dev.type == "cuda":
        from torch.autograd import DeviceType

        # kernels, copies and memsets (device events), as the table's "Self CUDA time total"
        busy = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in ka
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) / 1e6
        head = (f"wall {wall * 1e3:.1f} ms (profiler on), GPU kernels {busy * 1e3:.1f} ms: GPU busy {busy / wall:.0%}; "
                f"{gpu_name(dev)}")
        keys = ("self_device_memory_usage", "self_cuda_memory_usage") if memory else \
            ("self_device_time_total", "self_cuda_time_total")
    else:
        head = f"wall {wall * 1e3:.1f} ms (profiler on), CPU only"
        keys = ("self_cpu_memory_usage",) if memory else ("self_cpu_time_total",)
    table = None
    for key in keys:
        try:
            table = ka.table(sort_by=key, row_limit=rows, max_name_column_width=70)
            break
        except Exception:  # a sort key this torch does not know
            continue
    PROFILES.append(f"==== {label}\n{head}\n{table or ka.table(row_limit=rows)}\n")


# ---- embedding ------------------------------------------------------------------------------
def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def embed_figures(corpus, name: str, dev: torch.device, *, cells: int | None, repeats: int, authors_cells: int,
                  peaks: dict, budgets: list[int] = ()) -> dict:
    rows = corpus.rows(source="pbmc3k")[:cells]
    model = build(name, dev).eval()
    X = corpus.model_input(rows)
    lengths = np.diff(X.indptr)
    idx = np.arange(len(rows))
    cells_b, budget = batch_cells(dev), token_budget(dev, config=model.config)

    def loop(X):
        return embed_matrix(model, X, idx[: X.shape[0]], "max", dev, max_cells=cells_b, max_tokens=budget)

    def end_to_end():  # as tl.embed: normalization + the length-bucketed loop
        return loop(corpus.model_input(rows))

    free(dev)
    # the first pass, timed: cuBLAS handles, kernel choice and cuDNN attention plans for every new
    # batch shape (what a user's first tl.embed call in a process pays)
    emb, first = timed(end_to_end, dev)
    e2e = [timed(end_to_end, dev)[1] for _ in range(repeats)]
    only = [timed(lambda: loop(X), dev)[1] for _ in range(repeats)]
    mem = peak_memory(dev)
    bf16 = pure_bf16_loop(model, X, idx, dev, cells_b, budget, repeats, emb)
    other = {}
    for b in budgets:  # the loop at other token budgets (one untimed pass first: their own shapes)
        if b == budget:
            continue
        embed_matrix(model, X, idx, "max", dev, max_cells=cells_b, max_tokens=b)
        t_b = [timed(lambda: embed_matrix(model, X, idx, "max", dev, max_cells=cells_b, max_tokens=b), dev)[1]
               for _ in range(repeats)]
        other[str(b)] = len(rows) / float(np.median(t_b))
    k = min(authors_cells, len(rows))
    authors_embed(model, corpus.model_input(rows[:2]), dev)  # warm-up
    emb_a, t_a = timed(lambda: authors_embed(model, corpus.model_input(rows[:k]), dev), dev)
    cos = cosine_rows(emb[:k], emb_a)
    flops = encoder_flops(model.config, lengths)
    t = float(np.median(e2e))
    out = {
        "model": name, "gpu": gpu_name(dev), "cells": len(rows), "tokens": int(lengths.sum()),
        "mean_genes": float(lengths.mean()), "max_cells": cells_b, "max_tokens": budget,
        "batches": len(length_batches(lengths, max_cells=cells_b, max_tokens=budget)), "repeats": repeats,
        "first_pass_seconds": first, "first_pass_cells_per_s": len(rows) / first,
        "seconds": e2e, "cells_per_s": len(rows) / t, "cells_per_s_best": len(rows) / min(e2e),
        "loop_seconds": only, "loop_cells_per_s": len(rows) / float(np.median(only)),
        "loop_cells_per_s_at_budget": other, "pure_bf16": bf16,
        "authors_cells": k, "authors_seconds": t_a, "authors_cells_per_s": k / t_a,
        "speedup": (len(rows) / t) / (k / t_a),
        "encoder_tflop_per_s": flops / t / 1e12,
        "mfu": flops / t / peaks["datasheet"] if peaks["datasheet"] else None,
        "mfu_vs_measured_matmul": flops / t / peaks["measured"],
        "cosine_to_authors_min": float(cos.min()), "cosine_to_authors_mean": float(cos.mean()),
        **mem,
    }
    log(f"embed {name} on {out['gpu']}: {out['cells_per_s']:,.0f} cells/s end to end ({out['loop_cells_per_s']:,.0f} "
        f"the loop alone, first pass {out['first_pass_cells_per_s']:,.0f}, other budgets {other}, pure bf16 "
        f"{bf16['loop_cells_per_s']:,.0f} at cosine >= {bf16['cosine_to_autocast_min']:.4f}), authors {out['authors_cells_per_s']:,.1f} cells/s, speed-up {out['speedup']:.1f}x, "
        f"{out['encoder_tflop_per_s']:.1f} TFLOP/s, peak {mem['peak_allocated_gb']} GB, cosine >= {cos.min():.4f}")
    out["_profile"] = lambda: profile(f"embed {name}: one tl.embed-equivalent pass over {len(rows)} pbmc3k cells",
                                      end_to_end, dev)
    return out, model


def pure_bf16_loop(model, X, idx, dev, max_cells: int, budget: int, repeats: int, ref: np.ndarray) -> dict:
    """The loop with a bfloat16 copy of the model and autocast off (LayerNorm, residual stream and
    value embedding in bf16 too, where autocast keeps them in float32): cells/s and the cosine to
    the autocast embedding ``ref``. A candidate for ``tl.embed`` on CUDA, measured only."""
    import copy

    from scxtrimo._inference import map_cells
    from scxtrimo.data._batching import TokenBatch

    m16 = copy.deepcopy(model).to(torch.bfloat16)

    def fn(batch):
        with torch.autocast(dev.type, enabled=False):
            return m16.embed_cells(TokenBatch(batch.genes, batch.values.to(torch.bfloat16), batch.valid), "max")

    def loop():
        return map_cells(fn, X, idx, dev, width=model.embedding_dim, max_cells=max_cells, max_tokens=budget)

    emb = loop()
    t = [timed(loop, dev)[1] for _ in range(repeats)]
    cos = cosine_rows(emb, ref)
    return {"loop_cells_per_s": len(idx) / float(np.median(t)), "cosine_to_autocast_min": float(cos.min()),
            "cosine_to_autocast_mean": float(cos.mean())}


# ---- batch shapes ---------------------------------------------------------------------------
def shape_figures(corpus, name: str, dev: torch.device, *, cells: int, repeats: int) -> dict:
    """The first (cold) and later (warm) passes of ``tl.embed``'s loop over cells of a data set
    this process has not embedded, with batches padded tightly or to the width grid
    (``data._batching.GRID_WIDTHS``), under torch's default attention kernel choice and under the
    memory-efficient kernel alone (no per-shape plans). On CUDA the default is cuDNN attention,
    which builds a plan for every new batch shape; the grid bounds the number of shapes."""
    import scxtrimo._inference as inference
    import scxtrimo.data._batching as batching
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sizes = {name: len(corpus.rows(source=name)) for name in corpus.sources if name != "pbmc3k"}
    other = max(sizes, key=sizes.get)
    rows = np.sort(np.random.default_rng(0).permutation(corpus.rows(source=other))[:cells])
    X = corpus.model_input(rows)
    lengths = np.diff(X.indptr)
    idx = np.arange(len(rows))
    model = build(name, dev).eval()
    mc, budget = batch_cells(dev), token_budget(dev, config=model.config)
    alternative = "EFFICIENT_ATTENTION" if dev.type == "cuda" else "MATH"
    runs, ref = [], None
    saved = batching.GRID_WIDTHS.get(dev.type, False)
    try:
        for backend in (None, alternative):
            for grid in (False, True):
                batching.GRID_WIDTHS[dev.type] = grid
                with sdpa_kernel([getattr(SDPBackend, backend)]) if backend else contextlib.nullcontext():
                    def loop():
                        return embed_matrix(model, X, idx, "max", dev, max_cells=mc, max_tokens=budget)

                    emb, cold = timed(loop, dev)
                    warm = [timed(loop, dev)[1] for _ in range(repeats)]
                batches = inference.device_batches(lengths, dev, max_cells=mc, max_tokens=budget)
                ref = emb if ref is None else ref
                runs.append({"grid": grid, "attention": backend or "default", "batches": len(batches),
                             "shapes": len({(len(b), batching.padded_width(lengths[b].max(), grid)) for b in batches}),
                             "padding": batching.padding_fraction(lengths, batches, grid),
                             "first_pass_s": cold, "warm_s": float(np.median(warm)),
                             "first_pass_cells_per_s": len(rows) / cold,
                             "warm_cells_per_s": len(rows) / float(np.median(warm)),
                             "cosine_to_first_min": float(cosine_rows(emb, ref).min())})
                log(f"shapes {name} on {gpu_name(dev)}: grid={grid} attention={backend or 'default'}: "
                    f"{runs[-1]['shapes']} shapes in {runs[-1]['batches']} batches, padding {runs[-1]['padding']:.1%}, "
                    f"first pass {cold:.2f} s, warm {runs[-1]['warm_s']:.3f} s")
    finally:
        batching.GRID_WIDTHS[dev.type] = saved
    return {"model": name, "gpu": gpu_name(dev), "source": other, "cells": len(rows),
            "mean_genes": float(lengths.mean()), "max_cells": mc, "max_tokens": budget, "runs": runs}


# ---- memory ---------------------------------------------------------------------------------
def cut_rows(X: sp.csr_matrix, n: int, rng: np.random.Generator) -> sp.csr_matrix:
    """Each row cut to exactly ``n`` of its stored entries (a random subset, values kept, sorted)."""
    indptr, indices, data = [0], [], []
    for i in range(X.shape[0]):
        s, e = X.indptr[i], X.indptr[i + 1]
        keep = np.sort(rng.choice(e - s, size=n, replace=False)) + s
        indices.append(X.indices[keep])
        data.append(X.data[keep])
        indptr.append(indptr[-1] + n)
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.asarray(indptr)), shape=X.shape)


def memory_figures(corpus, name: str, dev: torch.device, *, genes: int, cells: int, budgets: list[int],
                   authors_cells: int, model=None) -> dict:
    rng = np.random.default_rng(0)
    lengths = np.diff(corpus.counts.indptr)
    deep = np.flatnonzero(lengths >= genes)
    pick = np.sort(rng.permutation(deep)[:cells])
    X = cut_rows(corpus.model_input(pick), genes, rng)
    if model is None:
        model = build(name, dev).eval()
    idx = np.arange(X.shape[0])
    free(dev)
    weights = torch.cuda.memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
    default = token_budget(dev, config=model.config)
    settings = [("tl.embed defaults", batch_cells(dev), default)]
    settings += [(f"max_tokens={b:,}", batch_cells(dev), b) for b in budgets if b != default]
    settings += [("one cell per batch", 1, default)]
    runs = []
    for label, mc, mt in settings:
        embed_matrix(model, X[:2], idx[:2], "max", dev, max_cells=mc, max_tokens=mt)  # warm-up
        free(dev)
        _, t = timed(lambda: embed_matrix(model, X, idx, "max", dev, max_cells=mc, max_tokens=mt), dev)
        runs.append({"setting": label, "max_cells": mc, "max_tokens": mt, "cells_per_s": X.shape[0] / t,
                     **peak_memory(dev)})
    k = min(authors_cells, X.shape[0])
    free(dev)
    _, t = timed(lambda: authors_embed(model, X[:k], dev), dev)
    runs.append({"setting": "authors' path (one cell, fp32)", "max_cells": 1, "max_tokens": None,
                 "cells_per_s": k / t, **peak_memory(dev)})
    fits = [r for r in runs[:-1] if r["peak_allocated_gb"] is not None and r["peak_allocated_gb"] < 2.0]
    out = {"model": name, "gpu": gpu_name(dev), "genes": genes, "cells": int(X.shape[0]), "weights_gb": weights,
           "runs": runs, "default_peak_gb": runs[0]["peak_allocated_gb"],
           "fastest_setting_under_2gb": max(fits, key=lambda r: r["cells_per_s"])["setting"] if fits else None}
    for r in runs:
        log(f"memory {name} at {genes} genes on {out['gpu']}: {r['setting']:32s} peak allocated "
            f"{r['peak_allocated_gb']} GB, reserved {r['peak_reserved_gb']} GB, {r['cells_per_s']:,.1f} cells/s")

    def prof():
        profile(f"memory {name}: tl.embed defaults over {X.shape[0]} cells of {genes} genes (sorted by GPU memory)",
                lambda: embed_matrix(model, X, idx, "max", dev, max_cells=batch_cells(dev), max_tokens=default),
                dev, memory=True)

    out["_profile"] = prof
    return out


# ---- pretraining ----------------------------------------------------------------------------
def pretrain_figures(corpus, name: str, dev: torch.device, *, batch_size: int, warmup: int, steps: int,
                     peaks: dict) -> dict:
    """Training steps of ``train_corpus`` (full-length decoder), timed with CUDA events; OOM halves the batch."""
    while True:
        try:
            return _pretrain(corpus, name, dev, batch_size=batch_size, warmup=warmup, steps=steps, peaks=peaks)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
        free(dev)
        log(f"pretrain {name}: out of memory at batch {batch_size}; halving")
        batch_size //= 2


def _pretrain(corpus, name, dev, *, batch_size, warmup, steps, peaks) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    free(dev)
    model = build(name, dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    masking, thinning = MaskingConfig(), ThinningConfig(p_thin=0.5)  # scripts/train_device.py's defaults
    rows = corpus.rows("train")
    lengths = np.diff(corpus.counts.indptr)
    batches = sortish_batches(lengths[rows], batch_size, np.random.default_rng([0, 0]))[: warmup + steps]

    def batch(i: int):
        part = rows[batches[i]]
        counts = dense_counts(corpus.counts[part], dev)
        totals = torch.from_numpy(corpus.total[part]).to(dev, non_blocking=True)
        keys = cell_keys(0, i, np.arange(len(part)), device=dev)
        return training_batch(counts, keys, masking=masking, thinning=thinning,
                              depth_tokens=model.config.depth_tokens, totals=totals)

    def forward_backward(tb):
        with autocast(dev):
            pred = model(tb.inputs, tb.is_mask, keep=tb.keep)  # decoder_zeros=None: all 19,264 genes
        loss = masked_sse(pred, tb) / tb.target.sum().clamp(min=1)
        loss.backward()
        return loss

    def step(i: int) -> float:
        tb = batch(i)
        opt.zero_grad(set_to_none=True)
        loss = forward_backward(tb)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())  # train_corpus reads the loss every step too

    for i in range(warmup):
        step(i)
    marks = Marks(dev)
    marks.mark()
    losses = []
    for i in range(warmup, warmup + steps):
        losses.append(step(i))
        marks.mark()
    times = marks.seconds()
    mem = peak_memory(dev)
    flops, enc_flops, enc_tokens = [], [], 0
    for i in range(warmup, warmup + steps):  # the same batches again, counted (not timed)
        tb = batch(i)
        with FlopCounterMode(display=False) as fc:
            forward_backward(tb)
        model.zero_grad(set_to_none=True)
        flops.append(fc.get_total_flops())
        counts = fc.get_flop_counts()
        enc_flops.append(sum(sum(v.values()) for k, v in counts.items() if k.endswith(".encoder")))
        enc_tokens += int(((tb.inputs != 0) & ~tb.is_mask).sum())
    cells = sum(len(batches[i]) for i in range(warmup, warmup + steps))
    total_t, total_f = float(np.sum(times)), float(np.sum(flops))
    achieved = total_f / total_t
    out = {
        "model": name, "gpu": gpu_name(dev), "decoder": "full (19,264 genes)",
        "precision": "bf16 autocast" if dev.type == "cuda" else "fp32",
        "batch_size": batch_size, "warmup_steps": warmup, "timed_steps": steps, "cells": cells,
        "step_seconds": times, "median_step_s": float(np.median(times)), "cells_per_s": cells / total_t,
        "encoder_tokens_per_s": enc_tokens / total_t, "flops_per_step": flops, "flops_per_cell": total_f / cells,
        "encoder_flop_share": float(np.sum(enc_flops)) / total_f if total_f else None,
        "achieved_tflop_per_s": achieved / 1e12,
        "mfu": achieved / peaks["datasheet"] if peaks["datasheet"] else None,
        "mfu_vs_measured_matmul": achieved / peaks["measured"], "losses": losses, **mem,
    }
    log(f"pretrain {name} on {out['gpu']}: batch {batch_size}, {out['median_step_s'] * 1e3:.1f} ms/step, "
        f"{out['cells_per_s']:,.1f} cells/s, {out['flops_per_cell']:.3g} FLOP/cell, {out['achieved_tflop_per_s']:.1f} "
        f"TFLOP/s, MFU {out['mfu'] if out['mfu'] is None else format(out['mfu'], '.1%')} "
        f"({out['mfu_vs_measured_matmul']:.1%} of the measured matmul rate), peak {mem['peak_allocated_gb']} GB")

    def prof():
        profile(f"pretrain {name}: 2 training steps, batch {batch_size}, full-length decoder",
                lambda: [step(warmup + i % steps) for i in range(2)], dev)

    def compiled():
        """The same timed steps with the decoder compiled (``nn.Module.compile``: inductor may fuse
        the Performer's element-wise feature-map chain); the first step, compilation included,
        timed apart."""
        model.decoder.compile()
        t0 = time.perf_counter()
        step(0)
        sync(dev)
        first = time.perf_counter() - t0
        for i in range(1, warmup):
            step(i)
        m = Marks(dev)
        m.mark()
        for i in range(warmup, warmup + steps):
            step(i)
            m.mark()
        t = m.seconds()
        res = {"first_step_s": first, "step_seconds": t, "median_step_s": float(np.median(t)),
               "cells_per_s": cells / float(np.sum(t)), "speedup": total_t / float(np.sum(t)),
               "mfu": total_f / float(np.sum(t)) / peaks["datasheet"] if peaks["datasheet"] else None}
        log(f"pretrain {name}, decoder compiled: first step {first:.1f} s, {res['median_step_s'] * 1e3:.1f} ms/step, "
            f"{res['cells_per_s']:,.1f} cells/s, {res['speedup']:.2f}x the eager steps")
        return res

    out["_profile"] = prof
    out["_compiled"] = compiled
    return out


# ---- targets --------------------------------------------------------------------------------
def verdicts(figures: dict, smoke: bool) -> list[dict]:
    def value(tid):
        e, p, m = figures.get("embed", {}), figures.get("pretrain", {}), figures.get("memory")
        return {
            "embed_10m_cells_per_s": lambda: e["xtrimo-10m"]["cells_per_s"],
            "embed_100m_cells_per_s": lambda: e["xtrimo-100m"]["cells_per_s"],
            "embed_10m_speedup": lambda: e["xtrimo-10m"]["speedup"],
            "embed_100m_speedup": lambda: e["xtrimo-100m"]["speedup"],
            "memory_100m_gb": lambda: m["default_peak_gb"] if m["model"] == "xtrimo-100m" else None,
            "pretrain_10m_mfu": lambda: p["xtrimo-10m"]["mfu"],
            "pretrain_100m_mfu": lambda: p["xtrimo-100m"]["mfu"],
        }[tid]()

    out = []
    for tid, what, op, threshold in TARGETS:
        try:
            v = value(tid)
        except (KeyError, TypeError):
            v = None
        met = None if v is None else (v >= threshold if op == ">=" else v < threshold)
        out.append({"id": tid, "what": what, "target": f"{op} {threshold:g}", "value": v, "met": met,
                    "gpu": figures["env"]["gpu"], "smoke": smoke})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="runs/corpus.xtc")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/device_smoke"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device (a CPU check of every code path)")
    ap.add_argument("--sections", nargs="+", default=["shapes", "memory", "embed", "pretrain"])
    ap.add_argument("--shape-model", default="xtrimo-10m")
    ap.add_argument("--shape-cells", type=int, default=4000, help="cells of the largest non-pbmc3k corpus set")
    ap.add_argument("--embed-budgets", type=int, nargs="+", default=[262_144, 65_536],
                    help="other token budgets timed for each embed model (the loop alone)")
    ap.add_argument("--embed-models", nargs="+", default=["xtrimo-10m", "xtrimo-100m"])
    ap.add_argument("--embed-cells", type=int, default=None, help="pbmc3k cells (default: all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--authors-cells", type=int, nargs="+", default=[300, 100], help="per embed model")
    ap.add_argument("--memory-model", default="xtrimo-100m")
    ap.add_argument("--memory-genes", type=int, default=2000)
    ap.add_argument("--memory-cells", type=int, default=256)
    ap.add_argument("--memory-budgets", type=int, nargs="+", default=[65_536, 16_384])
    ap.add_argument("--pretrain-models", nargs="+", default=["xtrimo-10m", "xtrimo-100m"])
    ap.add_argument("--pretrain-batch", type=int, nargs="+", default=[64, 8], help="per pretrain model")
    ap.add_argument("--compile-decoder", nargs="*", default=["xtrimo-10m"],
                    help="pretrain models also timed with the decoder compiled (after their eager figure)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-profiles", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:  # every code path at sizes a 2-core CPU runs in about a minute
        args.embed_models, args.embed_cells, args.repeats, args.authors_cells = ["xtrimo-3m"], 24, 1, [3]
        args.shape_model, args.shape_cells, args.embed_budgets = "xtrimo-3m", 12, [1024]
        args.memory_model, args.memory_genes, args.memory_cells, args.memory_budgets = "xtrimo-3m", 300, 6, [1024]
        args.pretrain_models, args.pretrain_batch, args.warmup, args.steps = ["xtrimo-3m"], [2], 1, 1
        args.compile_decoder = [m for m in args.compile_decoder if m in args.pretrain_models]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    env = {"device": str(dev), "gpu": gpu_name(dev), "gpus": torch.cuda.device_count() if dev.type == "cuda" else 0,
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "smoke": args.smoke}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(memory_gb=p.total_memory / 1e9, sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}")
        measured = peak_flops(8192, 20, "cuda", torch.bfloat16)
    else:
        measured = peak_flops(1024, 3)
    peaks = {"datasheet": datasheet_peak(env["gpu"]), "measured": measured}
    env.update(bf16_peak_datasheet_tflop_s=(peaks["datasheet"] or 0) / 1e12 or None,
               matmul_peak_measured_tflop_s=measured / 1e12,
               matmul_peak_measured_dtype="bf16 8192^3" if dev.type == "cuda" else "fp32 1024^3")
    log(f"{env['gpu']}: {json.dumps(env)}")
    tc = time.perf_counter()
    corpus = load_corpus(args.corpus)
    log(f"corpus {args.corpus}: {len(corpus)} cells, loaded in {time.perf_counter() - tc:.1f} s")
    figures = {"env": env, "shapes": None, "embed": {}, "pretrain": {}, "memory": None, "errors": {}}
    path = out / "figures.json"

    def write():
        clean = json.loads(json.dumps(figures, default=lambda o: None))
        clean["targets"] = verdicts(figures, args.smoke)
        clean["seconds"] = time.perf_counter() - t0
        path.write_text(json.dumps(clean, indent=1) + "\n")
        if PROFILES:  # after every section: a call stopped at its time limit keeps what it has
            (out / "profiles.txt").write_text(
                f"torch.profiler summaries of the figures that missed their targets ({env['gpu']}, "
                f"torch {torch.__version__})\n\n" + "\n".join(PROFILES))
        return clean

    def run(section: str, key: str, fn):
        try:
            return fn()
        except Exception as e:  # one failed figure must not cost the others
            import traceback

            traceback.print_exc()
            figures["errors"][f"{section} {key}"] = f"{type(e).__name__}: {e}"[:2000]
            log(f"{section} {key} FAILED: {type(e).__name__}: {str(e)[:300]}")
            free(dev)
            return None

    if "shapes" in args.sections:  # first: the cold passes must be this process's first encoder calls
        figures["shapes"] = run("shapes", args.shape_model, lambda: shape_figures(
            corpus, args.shape_model, dev, cells=args.shape_cells, repeats=args.repeats))
        write()
        free(dev)
    if "memory" in args.sections:
        r = run("memory", args.memory_model, lambda: memory_figures(
            corpus, args.memory_model, dev, genes=args.memory_genes, cells=args.memory_cells,
            budgets=args.memory_budgets, authors_cells=4))
        if r is not None:
            figures["memory"] = r
            prof = r.pop("_profile")
            if not (r["default_peak_gb"] is not None and r["default_peak_gb"] < 2.0) and not args.no_profiles:
                run("profile", "memory", prof)
            del prof
        write()
        free(dev)
    if "embed" in args.sections:
        for name, k in zip(args.embed_models, args.authors_cells * len(args.embed_models)):
            res = run("embed", name, lambda: embed_figures(corpus, name, dev, cells=args.embed_cells,
                                                           repeats=args.repeats, authors_cells=k, peaks=peaks,
                                                           budgets=args.embed_budgets))
            if res is not None:
                r, model = res
                figures["embed"][name] = r
                prof = r.pop("_profile")
                goal = 2_000 if "100m" in name else 20_000
                if (r["cells_per_s"] < goal or r["speedup"] < 100) and not args.no_profiles:
                    run("profile", name, prof)
                del model, prof, res
            write()
            free(dev)
    if "pretrain" in args.sections:
        compiled = []
        for name, b in zip(args.pretrain_models, args.pretrain_batch * len(args.pretrain_models)):
            r = run("pretrain", name, lambda: pretrain_figures(corpus, name, dev, batch_size=b, warmup=args.warmup,
                                                               steps=args.steps, peaks=peaks))
            if r is not None:
                figures["pretrain"][name] = r
                prof, comp = r.pop("_profile"), r.pop("_compiled")
                if (r["mfu"] or 0) < 0.40 and not args.no_profiles:
                    run("profile", name, prof)
                if name in args.compile_decoder:
                    compiled.append((name, r, comp))
                del prof, comp
            write()
            free(dev)
        for name, r, comp in compiled:  # last: a slow compilation must not cost the other figures
            r["compiled_decoder"] = run("pretrain", f"{name} compiled decoder", comp)
            write()
            free(dev)
        del compiled
    clean = write()
    log(f"done in {clean['seconds']:.0f} s; wrote {path}" + (f" and {out / 'profiles.txt'}" if PROFILES else ""))
    print("\n| target | value | goal | met | GPU |\n|---|---|---|---|---|")
    for v in clean["targets"]:
        val = "n/a" if v["value"] is None else (f"{v['value']:.1%}" if "mfu" in v["id"] else f"{v['value']:,.3g}")
        print(f"| {v['what']} | {val} | {v['target']} | {v['met']} | {v['gpu']} |")
    if figures["errors"]:
        print(f"errors: {json.dumps(figures['errors'])}")
        sys.exit(1)


if __name__ == "__main__":
    main()
