"""Masked-value recovery on held-out cells (paper section 5.3): MSE and Pearson r, log1p CP10k.

The packed corpus's test cells (its hashed 2% split, never trained on by ``scripts/train_device.py``)
are masked as in pretraining (30% of the expressed genes and as many zeros times 0.9, keyed per
cell so that every model sees the same masks) and the model predicts the masked values; the
decoder runs over all 19,264 genes (``--decoder-zeros`` samples that many unmasked zeros instead,
as the training script's validation does). ``thinned``: the input is first thinned to a random
fraction of its reads (Beta(2, 2)), the targets stay the real cell's values.

    python benchmarks/masked_recovery.py --models xtrimo-3m runs/ckpt --corpus runs/corpus.xtc --cells 256

Caveat: the bundled xtrimo-3m was pretrained with ``tl.pretrain`` on its own split of the shared
sets, which may include some of these test cells.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def held_out_cells(corpus, cells: int):
    """``(rows, counts)``: the first ``cells`` cells of the corpus's test split."""
    test = corpus.rows("test")[:cells]
    return test, corpus.counts[test]


def recovery_row(model, corpus, *, cells: int = 256, seed: int = 7, decoder_zeros: int | None = None,
                 device: torch.device = torch.device("cpu")) -> dict:
    """MSE and Pearson r of ``model`` on the first ``cells`` test cells, plain and thinned."""
    from scxtrimo.data._depth import ThinningConfig
    from scxtrimo.data._objective import evaluate_masked

    test, X = held_out_cells(corpus, cells)
    kw = dict(device=device, batch_size=8, seed=seed, totals=corpus.total[test], decoder_zeros=decoder_zeros)
    t = time.perf_counter()
    plain = evaluate_masked(model, X, **kw)
    thinned = evaluate_masked(model, X, thinning=ThinningConfig(p_thin=1.0), **kw)
    return {"sha256": model.checkpoint_sha256, "cells_seen": (model.metadata or {}).get("cells_seen"),
            "cells": len(test), "decoder_zeros": decoder_zeros, "mse": plain["mse"], "pearson": plain["pearson"],
            "thinned_mse": thinned["mse"], "thinned_pearson": thinned["pearson"], "n_targets": plain["n_targets"],
            "seconds": round(time.perf_counter() - t, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["xtrimo-3m"])
    p.add_argument("--corpus", default="runs/corpus.xtc")
    p.add_argument("--cells", type=int, default=256, help="first N test cells")
    p.add_argument("--decoder-zeros", type=int, default=None)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from scxtrimo.data._corpus import load_corpus
    from scxtrimo.models import load

    corpus = load_corpus(args.corpus)
    rows = []
    for name in args.models:
        row = {"model": name, **recovery_row(load(name), corpus, cells=args.cells, seed=args.seed,
                                             decoder_zeros=args.decoder_zeros)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
