"""Embedding throughput and peak memory: scxtrimo's tl.embed against the authors' path.

The reference path is re-implemented here as the authors' embedding code runs it: one cell at a
time, fp32, the full 19,266-long input vector (19,264 genes + 2 depth slots) built densely for
every cell, its non-zero entries gathered into the encoder input, encoder, max pooling.
scxtrimo's path is ``tl.embed`` (length-bucketed batches, inference mode, streaming blocks).
Both run the same weights; each measurement runs in its own process so peak RSS is clean.

    python benchmarks/embed_throughput.py --models xtrimo-3m xtrimo-10m xtrimo-100m

Without anndata (a GPU machine), ``--corpus runs/corpus.xtc`` reads the same cells from the packed
corpus (``scxtrimo corpus``) and times ``tl.embed``'s loop (``scxtrimo._inference.embed_matrix``,
the same length-bucketed batches and defaults) after the corpus's log1p CP10k normalization:

    python benchmarks/embed_throughput.py --device cuda --corpus runs/corpus.xtc --cells 2637 200

MFU = useful encoder FLOPs (real tokens only, no padding; ``encoder_flops``) per second over the
peak fp32 matmul rate measured on the same machine in the same run (``peak_flops``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("SCXTRIMO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def corpus_cells(corpus, dataset: str, n: int) -> np.ndarray:
    """Rows of the packed corpus for ``dataset`` (``"pbmc3k"`` or ``"cellbench_celseq2"``), the first ``n``."""
    if dataset == "pbmc3k":
        rows = corpus.rows(source="pbmc3k")
    else:
        rows = corpus.rows(source="cellbench_lung_celllines")
        rows = rows[np.char.startswith(corpus.obs_names[rows].astype(str), "sc_celseq2")]
    return rows[:n]


def authors_embed(model, X, device) -> np.ndarray:
    """The authors' embedding loop: one cell at a time, fp32 (no TF32), the dense 19,266-long input
    (genes + 2 depth slots) built for every cell, its non-zero entries gathered, encoder, max pooling.

    ``X``: log1p CSR rows on the reference genes. Returns ``(n, d)`` float32.
    """
    import torch

    from scxtrimo.data import TokenBatch

    dev = torch.device(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 as the authors ran it (torch's default)
    emb = np.empty((X.shape[0], model.embedding_dim), dtype=np.float32)
    try:
        with torch.no_grad():
            for i in range(X.shape[0]):
                full = torch.zeros(19_266, dtype=torch.float32)  # genes + 2 depth slots
                row = X[i]
                full[torch.from_numpy(row.indices.astype(np.int64))] = torch.from_numpy(row.data)
                full = full.to(dev)
                genes = torch.nonzero(full[:19_264] > 0).squeeze(1)
                batch = TokenBatch(genes[None], full[genes][None], torch.ones(1, len(genes), dtype=torch.bool, device=dev))
                emb[i] = model.embed_cells(batch).cpu().numpy()[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return emb


def load_cells(dataset: str, n: int):
    import anndata as ad

    import scxtrimo

    if dataset == "pbmc3k":
        adata = scxtrimo.datasets.pbmc3k()
    else:
        adata = ad.read_h5ad(SHARED / "cellbench_lung_celllines" / "cellbench_lung_celllines.h5ad")
        adata = adata[adata.obs["batch"].astype(str).str.startswith("sc_celseq2")].copy()
    return adata[: min(n, adata.n_obs)].copy()


def encoder_flops(config, lengths: np.ndarray) -> float:
    """Forward FLOPs of auto-discretization + encoder for cells with ``lengths`` expressed genes.

    Per layer and cell of length L: 2L(4d^2 + 2d*ff) for the projections and feed-forward, plus
    4L^2 d for the two attention products; auto-discretization 2L(b + b^2 + b*d).
    """
    L = lengths.astype(np.float64)
    d, ff, b = config.enc_dim, config.enc_ff_mult * config.enc_dim, config.n_bins
    per_layer = 2 * L * (4 * d * d + 2 * d * ff) + 4 * L * L * d
    return float((config.enc_depth * per_layer + 2 * L * (b + b * b + b * d)).sum())


def peak_flops(n: int = 2048, repeats: int = 10, device: str = "cpu", dtype=None) -> float:
    """Sustained matmul FLOP/s of this device (square n x n products; fp32 unless ``dtype``)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    best = 0.0
    for _ in range(4):  # best of 4 rounds; the first warms up
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - t))
    return best


def worker(method: str, model_name: str, dataset: str, n: int, device: str = "cpu", corpus_path: str | None = None) -> dict:
    import torch

    import scxtrimo.models

    torch.manual_seed(0)
    dev = torch.device(device)
    model = scxtrimo.models.XTrimoGene(model_name).eval().to(dev)
    if corpus_path:  # no anndata: cells from the packed corpus, tl.embed's loop on its log1p rows
        from scxtrimo._inference import batch_cells, embed_matrix, token_budget
        from scxtrimo.data._corpus import load_corpus

        corpus = load_corpus(corpus_path)
        rows = corpus_cells(corpus, dataset, n)
        n_obs = len(rows)
        lengths = np.diff(corpus.model_input(rows).indptr)
    else:
        from scxtrimo.data._prepare import iter_log1p_blocks, prepare_input

        adata = load_cells(dataset, n)
        n_obs = adata.n_obs
        lengths = np.diff(next(iter_log1p_blocks(prepare_input(adata), block_cells=adata.n_obs))[2].indptr)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    if corpus_path:
        X = corpus.model_input(rows)  # timed, like tl.embed's normalization
        if method == "scxtrimo":
            emb = embed_matrix(model, X, np.arange(n_obs), "max", dev, max_cells=batch_cells(dev),
                               max_tokens=token_budget(dev, config=model.config))
        else:
            emb = authors_embed(model, X, dev)
    elif method == "scxtrimo":
        scxtrimo.tl.embed(adata, model=model, device=device, progress=False)
        emb = adata.obsm["X_xtrimo"]
    else:
        X = next(iter_log1p_blocks(prepare_input(adata), block_cells=adata.n_obs))[2]  # timed, like tl.embed's
        emb = authors_embed(model, X, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flops = encoder_flops(model.config, lengths)
    return {"method": method, "model": model_name, "dataset": dataset, "cells": n_obs,
            "seconds": dt, "cells_per_s": n_obs / dt, "peak_rss_mb": rss1 / 1024,
            "rss_growth_mb": (rss1 - rss0) / 1024, "emb_checksum": float(np.abs(emb).sum()),
            "tokens": int(lengths.sum()), "mean_genes": float(lengths.mean()), "gflop_per_s": flops / dt / 1e9,
            "threads": torch.get_num_threads(), "device": device,
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["xtrimo-10m", "xtrimo-100m"])
    ap.add_argument("--datasets", nargs="+", default=["pbmc3k", "cellbench_celseq2"])
    ap.add_argument("--cells", type=int, nargs="+", default=[300, 30],
                    help="cells per data set (one number, or one per data set)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (authors' path fp32, tl.embed bf16 autocast)")
    ap.add_argument("--corpus", default=None,
                    help="read the cells from this packed corpus (scxtrimo corpus; no anndata needed) and time "
                         "tl.embed's loop (embed_matrix) instead of tl.embed")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, model, dataset, n, device = args.worker
        print(json.dumps(worker(method, model, dataset, int(n), device, args.corpus)))
        return
    cells = dict(zip(args.datasets, args.cells * len(args.datasets) if len(args.cells) == 1 else args.cells))
    import torch

    # MFU reference: fp32 on CPU; on CUDA bf16 (what tl.embed runs; the authors' fp32 path is
    # measured against the same bf16 peak, so its MFU there is a lower bound)
    peak = peak_flops() if args.device == "cpu" else peak_flops(8192, 20, "cuda", torch.bfloat16)
    print(f"peak matmul ({args.device}): {peak / 1e9:.1f} GFLOP/s", flush=True)
    rows = []
    for model in args.models:
        for dataset in args.datasets:
            n = cells[dataset] if "100m" not in model else max(cells[dataset] // 5, 6)
            pair = {}
            for method in ("authors", "scxtrimo"):
                extra = ["--corpus", args.corpus] if args.corpus else []
                out = subprocess.run([sys.executable, __file__, "--worker", method, model, dataset, str(n), args.device,
                                      *extra], capture_output=True, text=True, check=True)
                pair[method] = json.loads(out.stdout.strip().splitlines()[-1])
                pair[method]["mfu"] = pair[method]["gflop_per_s"] * 1e9 / peak
                rows.append(pair[method])
            speedup = pair["scxtrimo"]["cells_per_s"] / pair["authors"]["cells_per_s"]
            mem = "peak_gpu_mb" if args.device != "cpu" else "peak_rss_mb"
            print(f"{model:12s} {dataset:18s} authors {pair['authors']['cells_per_s']:7.2f} cells/s "
                  f"({pair['authors'][mem]:.0f} MB, MFU {pair['authors']['mfu']:.0%})  scxtrimo {pair['scxtrimo']['cells_per_s']:7.2f} cells/s "
                  f"({pair['scxtrimo'][mem]:.0f} MB, MFU {pair['scxtrimo']['mfu']:.0%})  speed-up {speedup:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_gflop_per_s": peak / 1e9, "rows": rows}, indent=1))
    print(json.dumps({"peak_gflop_per_s": peak / 1e9, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
