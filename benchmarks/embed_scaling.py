"""Embedding time and peak memory against the number of cells (10^3, 10^4, 10^5).

pbmc3k's real cells are replicated (cycled) to each size and written to an .h5ad file (raw
counts, gene symbols); each size is then embedded by ``tl.embed`` in a fresh process from the
file opened in backed mode (``anndata.read_h5ad(..., backed="r")``), so the input is never held
in memory. Reported: wall time, cells/s, the worker's peak resident memory (``VmHWM`` of
``/proc/self/status``, the high-water mark of its own address space) and its growth over the
baseline after imports, model load and opening the file. ``ru_maxrss`` is not used: Linux
carries it across ``exec``, so a worker would report its parent's peak (the parent held the
replicated matrix while writing it) when that is higher. Time should grow linearly with the
number of cells and memory should stay flat apart from the ``n_cells x d`` float32 output.

    python benchmarks/embed_scaling.py --sizes 1000 10000 100000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_replicated(n: int, path: Path) -> None:
    import anndata as ad

    import scxtrimo

    base = scxtrimo.datasets.pbmc3k()
    rows = np.arange(n) % base.n_obs
    out = ad.AnnData(base.X[rows], var=base.var[[]].copy())
    out.obs_names = [f"cell{i}" for i in range(n)]
    out.write_h5ad(path)


def peak_rss_mb() -> float:
    """High-water resident memory of this process's address space, in MB (Linux)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # other systems: best effort


def worker(path: str, model: str) -> dict:
    import anndata as ad
    import torch

    import scxtrimo
    from scxtrimo.models import load

    net = load(model)
    adata = ad.read_h5ad(path, backed="r")
    base = peak_rss_mb()
    t = time.perf_counter()
    scxtrimo.tl.embed(adata, model=net, progress=False)
    dt = time.perf_counter() - t
    peak = peak_rss_mb()
    emb = adata.obsm["X_xtrimo"]
    return {"cells": adata.n_obs, "seconds": dt, "cells_per_s": adata.n_obs / dt, "peak_rss_mb": peak,
            "rss_growth_mb": peak - base, "output_mb": emb.nbytes / 2**20,
            "threads": torch.get_num_threads(), "finite": bool(np.isfinite(emb).all())}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--model", default="xtrimo-3m")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            path = Path(tmp) / f"cells_{n}.h5ad"
            write_replicated(n, path)
            out = subprocess.run([sys.executable, __file__, "--worker", str(path), args.model],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            path.unlink()
            r = rows[-1]
            print(f"{n:>8,d} cells  {r['seconds']:8.1f} s  {r['cells_per_s']:6.1f} cells/s  peak RSS {r['peak_rss_mb']:6.0f} MB "
                  f"(growth {r['rss_growth_mb']:5.0f} MB, output {r['output_mb']:.1f} MB)", flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
