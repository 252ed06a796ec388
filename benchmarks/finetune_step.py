"""One fine-tuning step of tl.annotate, split three ways (issue: tl.annotate), run by hand.

A step of ``--cells`` cells (forward and backward through the classifier, the last
``--trainable`` encoder layers trainable, as in ``tl.annotate(freeze=k)``) is run

  * as one padded batch (cells sorted by length, the way ``sortish_batches`` groups them),
  * in parts within a token budget (``tl.annotate``'s gradient accumulation; ``--budgets``),
  * one cell per call,

each ``--repeats`` times, on pbmc3k cells (random, ~800 expressed reference genes) and on deep
CEL-seq2 cells of cellbench (~4,000-8,000). The gradients of every split are compared with the
padded batch's (they must agree to float precision: the split changes memory and speed only).

    python benchmarks/finetune_step.py
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

import scxtrimo
from scxtrimo.data._batching import csr_row_batch, token_budget_parts
from scxtrimo.tl._annotate import CellTypeClassifier, _collect, _set_trainable

SHARED = Path(os.environ.get("SCXTRIMO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def cells(name: str, n: int) -> ad.AnnData:
    if name == "pbmc3k":
        pb = scxtrimo.datasets.pbmc3k()
        return pb[np.sort(np.random.default_rng(0).permutation(pb.n_obs)[:n])].copy()
    cb = ad.read_h5ad(SHARED / "cellbench_lung_celllines" / "cellbench_lung_celllines.h5ad")
    return cb[cb.obs["batch"] == "sc_celseq2"][:n].copy()


def step(clf: CellTypeClassifier, X, parts: list[np.ndarray]) -> torch.Tensor:
    """Forward and backward of every part; the summed gradient of the trainable parameters."""
    clf.zero_grad(set_to_none=True)
    for part in parts:
        logits = clf(csr_row_batch(X, np.sort(part)))
        torch.nn.functional.cross_entropy(logits, torch.zeros(len(part), dtype=torch.long), reduction="sum").backward()
    return torch.cat([p.grad.flatten() for p in clf.parameters() if p.grad is not None])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="xtrimo-3m")
    ap.add_argument("--trainable", type=int, default=2, help="last k encoder layers trainable")
    ap.add_argument("--cells", type=int, nargs=2, default=[32, 6], metavar=("PBMC3K", "CELSEQ2"))
    ap.add_argument("--budgets", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="CSV of every timing")
    args = ap.parse_args()

    torch.manual_seed(0)
    clf = CellTypeClassifier(scxtrimo.models.load(args.model), ["a", "b"], args.trainable)
    _set_trainable(clf, args.trainable)
    clf.train()
    records = []
    for name, n in zip(("pbmc3k", "CEL-seq2"), args.cells):
        X, _ = _collect(cells(name, n), None)
        lengths = np.diff(X.indptr)
        rows = np.argsort(lengths, kind="stable")
        splits = {"one padded batch": [rows]}
        for budget in args.budgets:
            splits[f"parts <= {budget:,} tokens"] = token_budget_parts(rows, lengths, max_tokens=budget)
        splits["one cell per call"] = [rows[i : i + 1] for i in range(n)]
        reference = step(clf, X, splits["one padded batch"])
        for repeat in range(args.repeats):
            for label, parts in splits.items():
                t = time.perf_counter()
                grad = step(clf, X, parts)
                seconds = time.perf_counter() - t
                rel = float((grad - reference).abs().max() / reference.abs().max())
                records.append({"cells": name, "n": n, "tokens_mean": float(lengths.mean()), "split": label,
                                "calls": len(parts), "repeat": repeat, "seconds": seconds, "grad_max_rel_diff": rel})
                print(records[-1], flush=True)
    df = pd.DataFrame(records)
    if args.out:
        df.to_csv(args.out, index=False)
    summary = df.groupby(["cells", "split"], sort=False).agg(calls=("calls", "first"), seconds=("seconds", "median"),
                                                          grad_max_rel_diff=("grad_max_rel_diff", "max"))
    summary["vs padded"] = summary.groupby(level=0)["seconds"].transform("first") / summary["seconds"]
    print(summary.to_string(float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
