"""How much the authors' batched decoder mode changes gene-context outputs (issue 15, item 1).

The released Performer subtracts one key maximum taken over the whole key tensor of a pass. One
cell per pass (the authors' ``gene`` mode, and scxtrimo always) makes that maximum the cell's own;
the authors' ``gene_batch`` mode shares it across the cells of a pass, so a cell's outputs depend
on its batch mates. This script runs ``XTrimoGene.gene_context`` on the same pbmc3k cells with the
per-cell maximum (scxtrimo) and with one maximum per batch (the authors' batched mode, patched in
here only) and prints the differences. The architecture is the released one (post-norm ReLU
encoder, depth tokens, output LayerNorm, ``key_max="cell"``) at a width and depth chosen on the
command line, with random weights: the size on the real weights depends on how far their key
maxima spread between cells, so it runs with the model's initialization and with larger
(``--weights unit``) weights.

    python benchmarks/key_max_batching.py --cells 12 [--weights unit]
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import numpy as np
import torch


def model(args):
    from scxtrimo.models import XTrimoGene
    from scxtrimo.models._scfoundation import config_from_entries

    flat = {"model": "mae_autobin", "seq_len": 19_266, "bin_num": 100, "bin_alpha": 1.0,
            "encoder": {"hidden_dim": args.enc, "depth": args.enc_layers, "heads": 4, "module_type": "transformer"},
            "decoder": {"hidden_dim": args.dec, "depth": args.dec_layers, "heads": 4, "dim_head": args.dec // 4,
                        "module_type": "performer"}}
    torch.manual_seed(args.seed)
    net = XTrimoGene(config_from_entries(flat, name="released-architecture-random")).eval()
    if args.weights == "unit":  # larger activations, as trained weights tend to have
        with torch.no_grad():
            for mod in net.modules():
                if isinstance(mod, torch.nn.Embedding):
                    mod.weight.normal_()
                elif isinstance(mod, torch.nn.Linear):
                    mod.weight.normal_(std=mod.weight.shape[1] ** -0.5)
    return net


def inputs(n_cells: int) -> torch.Tensor:
    """The first pbmc3k cells as the authors' input: log1p CP10k, T = 4, S = log10(total)."""
    import pandas as pd

    import scxtrimo

    ad = scxtrimo.datasets.pbmc3k()[:n_cells]
    counts = (pd.DataFrame(ad.X.toarray(), columns=ad.var_names)
              .reindex(columns=scxtrimo.reference_genes(), fill_value=0).to_numpy(np.float64))
    total = counts.sum(1)
    x = np.log1p(1e4 * counts / total[:, None])
    vec = np.concatenate([x, np.full((n_cells, 1), 4.0), np.log10(total)[:, None]], axis=1)
    return torch.from_numpy(vec.astype(np.float32))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=12)
    p.add_argument("--enc", type=int, default=64)
    p.add_argument("--enc-layers", type=int, default=2)
    p.add_argument("--dec", type=int, default=32)
    p.add_argument("--dec-layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=("init", "unit"), default="init",
                   help="init: the model's initialization; unit: N(0, 1) embeddings, N(0, 1/fan_in) linear weights")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import scxtrimo.models._decoder as dec

    net, vec = model(args), inputs(args.cells)
    with torch.no_grad():
        own_states, own_pred = net.gene_context(vec)  # per-cell maximum: batch-independent
        one_states, _ = net.gene_context(vec[:1])
        per_cell = dec.softmax_features
        dec.softmax_features = partial(per_cell, key_dims=None)  # one maximum per pass
        try:
            shared_states, shared_pred = net.gene_context(vec)
        finally:
            dec.softmax_features = per_cell

    def diff(a, b):
        return {"max_abs": float((a - b).abs().max()), "rel_l2": float((a - b).norm() / b.norm())}

    out = {
        "cells": args.cells,
        "weights": args.weights,
        "dims": {"enc": args.enc, "enc_layers": args.enc_layers, "dec": args.dec, "dec_layers": args.dec_layers},
        "scxtrimo_batched_vs_one_cell": diff(own_states[:1], one_states),
        "authors_batched_vs_one_cell_states": diff(shared_states, own_states),
        "authors_batched_vs_one_cell_prediction": diff(shared_pred, own_pred),
        "prediction_pearson": float(np.corrcoef(shared_pred.ravel(), own_pred.ravel())[0, 1]),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
