"""The authors' released architecture (xTrimoGene-100M, scFoundation) at its real shapes, random weights.

Measures, each in its own process (clean peak RSS):

* ``embed``: ``tl.embed(pooling="all")`` (length-bucketed batches, inference mode) on pbmc3k cells;
* ``authors``: the authors' one-cell path re-implemented with the module they use: the dense
  19,266-long input per cell, its positive entries gathered, value + gene embedding, torch's
  ``nn.TransformerEncoderLayer`` (post-norm, ReLU) x 12 and the final LayerNorm, one cell per
  forward pass, fp32, "all" pooling (S, T, max and mean over genes);
* ``gene``: ``tl.gene_embed`` (encoder + the full-length Performer decoder, one cell per pass).

The configuration is built from a config in the authors' file format
(:func:`scxtrimo.models._scfoundation.config_from_entries`), so the shapes are those the released
file implies; no weights are downloaded. Both cell paths run the same weights and must agree.

    python benchmarks/scfoundation_100m.py --cells 16 --gene-cells 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def released_config():
    from scxtrimo.models._scfoundation import config_from_entries

    flat = {"model": "mae_autobin", "seq_len": 19_266, "bin_num": 100, "bin_alpha": 1.0,
            "encoder": {"hidden_dim": 768, "depth": 12, "heads": 12, "module_type": "transformer"},
            "decoder": {"hidden_dim": 512, "depth": 6, "heads": 8, "dim_head": 64, "module_type": "performer"}}
    return config_from_entries(flat, name="scfoundation-100m-random")


def model():
    import torch

    from scxtrimo.models import XTrimoGene

    torch.manual_seed(0)
    return XTrimoGene(released_config()).eval()


def cells(n: int):
    import scxtrimo

    return scxtrimo.datasets.pbmc3k()[:n].copy()


def authors_path(net, adata):
    """One cell per forward pass through torch's TransformerEncoderLayer, as the authors run it."""
    import numpy as np
    import torch
    from torch import nn

    from scxtrimo.data._prepare import iter_log1p_blocks, prepare_input

    cfg = net.config
    layers = []
    for block in net.encoder.blocks:
        layer = nn.TransformerEncoderLayer(cfg.enc_dim, cfg.enc_heads, dim_feedforward=cfg.enc_ff_mult * cfg.enc_dim,
                                           dropout=0.0, batch_first=True, norm_first=False)
        layer.load_state_dict({"self_attn.in_proj_weight": block.qkv.weight, "self_attn.in_proj_bias": block.qkv.bias,
                               "self_attn.out_proj.weight": block.out.weight, "self_attn.out_proj.bias": block.out.bias,
                               "linear1.weight": block.ff[0].weight, "linear1.bias": block.ff[0].bias,
                               "linear2.weight": block.ff[3].weight, "linear2.bias": block.ff[3].bias,
                               "norm1.weight": block.norm1.weight, "norm1.bias": block.norm1.bias,
                               "norm2.weight": block.norm2.weight, "norm2.bias": block.norm2.bias},
                              assign=True)  # share the tensors: one copy of the weights, as in the authors' run
        layers.append(layer.eval())
    out = []
    n = cfg.n_genes
    for _, _, X in iter_log1p_blocks(prepare_input(adata), depth=(4.0, "fixed")):
        for i in range(X.shape[0]):
            with torch.no_grad():
                vec = torch.from_numpy(X[i].toarray()[0])  # the dense 19,266-long input
                idx = torch.nonzero(vec > 0).ravel()
                x = (net.value_embedding(vec[idx]) + net.gene_embedding.weight[idx])[None]
                for layer in layers:
                    x = layer(x, src_key_padding_mask=torch.zeros(1, len(idx), dtype=torch.bool))
                h = net.encoder.norm(x)[0]
                genes = h[idx < n]
                out.append(torch.cat([h[-1], h[-2], genes.max(0).values, genes.mean(0)]).numpy())
    return np.stack(out)


def run_phase(phase: str, n: int, threads: int) -> dict:
    import numpy as np
    import torch

    import scxtrimo

    torch.set_num_threads(threads)
    net = model()
    adata = cells(n)
    t = time.perf_counter()
    if phase == "embed":
        scxtrimo.tl.embed(adata, model=net, pooling="all", progress=False)
        result = adata.obsm["X_xtrimo"]
    elif phase == "authors":
        result = authors_path(net, adata)
    else:
        scxtrimo.tl.gene_embed(adata, model=net, genes=["CD3E", "MS4A1", "LYZ"], progress=False)
        result = adata.obsm["X_xtrimo_gene"].reshape(n, -1)
    dt = time.perf_counter() - t
    np.save(f"/tmp/scf100m_{phase}.npy", result)
    return {"phase": phase, "cells": n, "seconds": dt, "cells_per_s": n / dt,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "genes_per_cell": float(np.mean(np.diff(scxtrimo.pp.align_genes(adata, copy=True).X.indptr)))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=16, help="cells for the two cell-embedding paths")
    p.add_argument("--gene-cells", type=int, default=2, help="cells for gene_embed (slow on CPU)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        n = args.gene_cells if args.phase == "gene" else args.cells
        print(json.dumps(run_phase(args.phase, n, args.threads)))
        return
    rows = []
    for phase in ("embed", "authors", "gene"):
        out = subprocess.run([sys.executable, __file__, "--phase", phase, "--cells", str(args.cells),
                              "--gene-cells", str(args.gene_cells), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    import numpy as np

    a, b = np.load("/tmp/scf100m_embed.npy"), np.load("/tmp/scf100m_authors.npy")
    print(f"max |tl.embed - authors' path| = {np.abs(a - b).max():.2e} over {a.shape}")
    base = next(r for r in rows if r["phase"] == "authors")
    for r in rows:
        print(f"{r['phase']:>8}: {r['cells_per_s']:.3f} cells/s ({r['seconds']:.1f} s for {r['cells']} cells, "
              f"{r['genes_per_cell']:.0f} genes/cell), peak RSS {r['peak_rss_mb']:.0f} MB"
              + (f", {r['cells_per_s'] / base['cells_per_s']:.2f}x the authors' path" if r["phase"] == "embed" else ""))


if __name__ == "__main__":
    main()
