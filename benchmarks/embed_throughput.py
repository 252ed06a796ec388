"""Embedding throughput and peak memory: scxtrimo's tl.embed against the authors' path.

The reference path is re-implemented here as the authors' embedding code runs it: one cell at a
time, fp32, the full 19,266-long input vector (19,264 genes + 2 depth slots) built densely for
every cell, its non-zero entries gathered into the encoder input, encoder, max pooling.
scxtrimo's path is ``tl.embed`` (length-bucketed batches, inference mode, streaming blocks).
Both run the same weights; each measurement runs in its own process so peak RSS is clean.

    python benchmarks/embed_throughput.py --models xtrimo-10m xtrimo-100m --cells 200
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


def load_cells(dataset: str, n: int):
    import anndata as ad

    import scxtrimo

    if dataset == "pbmc3k":
        adata = scxtrimo.datasets.pbmc3k()
    else:
        adata = ad.read_h5ad(SHARED / "cellbench_lung_celllines" / "cellbench_lung_celllines.h5ad")
        adata = adata[adata.obs["batch"].astype(str).str.startswith("sc_celseq2")].copy()
    return adata[: min(n, adata.n_obs)].copy()


def worker(method: str, model_name: str, dataset: str, n: int) -> dict:
    import torch

    import scxtrimo
    from scxtrimo.data import TokenBatch
    from scxtrimo.data._prepare import iter_log1p_blocks, prepare_input

    torch.manual_seed(0)
    model = scxtrimo.models.XTrimoGene(model_name).eval()
    adata = load_cells(dataset, n)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if method == "scxtrimo":
        scxtrimo.tl.embed(adata, model=model, progress=False)
        emb = adata.obsm["X_xtrimo"]
    else:
        X = next(iter_log1p_blocks(prepare_input(adata), block_cells=adata.n_obs))[2]
        emb = np.empty((adata.n_obs, model.embedding_dim), dtype=np.float32)
        with torch.no_grad():
            for i in range(adata.n_obs):
                full = torch.zeros(19_266, dtype=torch.float32)  # genes + 2 depth slots
                row = X[i]
                full[torch.from_numpy(row.indices.astype(np.int64))] = torch.from_numpy(row.data)
                genes = torch.nonzero(full[:19_264] > 0).squeeze(1)
                batch = TokenBatch(genes[None], full[genes][None], torch.ones(1, len(genes), dtype=torch.bool))
                emb[i] = model.embed_cells(batch).numpy()[0]
    dt = time.perf_counter() - t
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tokens = int(np.diff(X.indptr).sum()) if method != "scxtrimo" else int((adata.X > 0).sum())
    return {"method": method, "model": model_name, "dataset": dataset, "cells": adata.n_obs,
            "seconds": dt, "cells_per_s": adata.n_obs / dt, "peak_rss_mb": rss1 / 1024,
            "rss_growth_mb": (rss1 - rss0) / 1024, "emb_checksum": float(np.abs(emb).sum()), "tokens": tokens,
            "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["xtrimo-10m", "xtrimo-100m"])
    ap.add_argument("--datasets", nargs="+", default=["pbmc3k", "cellbench_celseq2"])
    ap.add_argument("--cells", type=int, default=200)
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, model, dataset, n = args.worker
        print(json.dumps(worker(method, model, dataset, int(n))))
        return
    rows = []
    for model in args.models:
        for dataset in args.datasets:
            pair = {}
            for method in ("authors", "scxtrimo"):
                out = subprocess.run([sys.executable, __file__, "--worker", method, model, dataset, str(args.cells)],
                                     capture_output=True, text=True, check=True)
                pair[method] = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(pair[method])
            speedup = pair["scxtrimo"]["cells_per_s"] / pair["authors"]["cells_per_s"]
            print(f"{model:12s} {dataset:18s} authors {pair['authors']['cells_per_s']:7.2f} cells/s "
                  f"({pair['authors']['peak_rss_mb']:.0f} MB)  scxtrimo {pair['scxtrimo']['cells_per_s']:7.2f} cells/s "
                  f"({pair['scxtrimo']['peak_rss_mb']:.0f} MB)  speed-up {speedup:.2f}x", flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
