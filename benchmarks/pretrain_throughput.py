"""Pretraining throughput and how its cost grows with the number of expressed genes.

Real deep cells (cellbench CEL-seq2, aligned to the 19,264 reference genes and log1p CP10k
normalized) are cut down to exactly ``n`` of their own expressed genes (a seeded random subset,
real values kept) for n = 250 ... 6,000. For each model and n, full training steps (biased
masking, forward, masked MSE, backward, AdamW) are timed at a fixed batch of cells, with the
paper's full-length decoder (all 19,264 genes) and with the sampled decoder context
(``decoder_zeros=1024``, the mode the bundled checkpoint was trained with).

Reported per step: cells/s, encoder tokens/s, decoder tokens/s, forward+backward FLOPs per cell
(``torch.utils.flop_counter`` on the meta device with the step's exact shapes) and MFU against
the machine's sustained fp32 matmul rate measured in the same run.

    python benchmarks/pretrain_throughput.py --plot docs/_static/pretrain_cost.png
    python benchmarks/pretrain_throughput.py --device cuda --corpus runs/corpus.xtc   # no anndata
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_throughput import SHARED, peak_flops  # noqa: E402

import scxtrimo  # noqa: E402
from scxtrimo import N_GENES  # noqa: E402
from scxtrimo.data import mask_values  # noqa: E402
from scxtrimo.data._masking import MaskingConfig  # noqa: E402
from flops import xtrimogene  # noqa: E402


def masked_loss(pred: torch.Tensor, values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE at the masked positions (``scxtrimo.tl._pretrain.masked_loss``, which imports anndata)."""
    return torch.nn.functional.mse_loss(pred[target].float(), values[target].float())


def deep_cells(min_genes: int, corpus_path: str | None = None):
    """log1p CP10k rows (csr, reference genes) of CEL-seq2 cells with >= min_genes expressed.

    ``corpus_path``: read them from a packed corpus (``scxtrimo corpus``; no anndata needed).
    """
    if corpus_path:
        from scxtrimo.data._corpus import load_corpus

        corpus = load_corpus(corpus_path)
        rows = corpus.rows(source="cellbench_lung_celllines")
        keep = np.char.startswith(corpus.obs_names[rows].astype(str), "sc_celseq2")
        if "doublet" in corpus.label_names:
            keep &= corpus.label[rows] != corpus.label_names.index("doublet")
        X = corpus.model_input(rows[keep])
        return X[np.flatnonzero(np.diff(X.indptr) >= min_genes)]
    import anndata as ad

    from scxtrimo.data._prepare import iter_log1p_blocks, prepare_input

    cb = ad.read_h5ad(SHARED / "cellbench_lung_celllines" / "cellbench_lung_celllines.h5ad")
    cb = cb[cb.obs["batch"].astype(str).str.startswith("sc_celseq2") & (cb.obs["cell_type"] != "doublet")].copy()
    X = next(iter_log1p_blocks(prepare_input(cb), block_cells=cb.n_obs))[2]
    return X[np.flatnonzero(np.diff(X.indptr) >= min_genes)]


def cut(X, n: int, cells: int, seed: int = 0) -> torch.Tensor:
    """Dense ``(cells, N_GENES)`` values keeping exactly ``n`` random expressed genes per cell."""
    rng = np.random.default_rng(seed)
    out = torch.zeros(cells, N_GENES)
    for i in range(cells):
        row = X[i % X.shape[0]]
        keep = rng.choice(row.nnz, size=n, replace=False)
        out[i, torch.from_numpy(row.indices[keep].astype(np.int64))] = torch.from_numpy(row.data[keep])
    return out


def step_flops(model_name: str, encoder_tokens: int, decoder_tokens: int) -> float:
    """Forward+backward FLOPs of one cell with these encoder/decoder lengths (meta device;
    ``flops.xtrimogene``: encoder, W_p, decoder, head)."""
    return float(xtrimogene(model_name, decoder_tokens, encoder_tokens)[1])


def measure(model_name: str, values: torch.Tensor, decoder_zeros, steps: int, device: str = "cpu") -> dict:
    from scxtrimo._device import autocast

    dev = torch.device(device)
    torch.manual_seed(0)
    model = scxtrimo.models.XTrimoGene(model_name).train().to(dev)
    values = values.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=dev).manual_seed(0)
    masking = MaskingConfig()
    times, enc_tokens, dec_tokens = [], 0, 0
    for i in range(steps + 1):  # the first step warms up and is not timed
        mb = mask_values(values, masking, generator=gen)
        t = time.perf_counter()
        with autocast(dev):  # bf16 on CUDA, as tl.pretrain
            pred = model(mb.inputs, mb.is_mask, keep=mb.target, decoder_zeros=decoder_zeros, generator=gen)
        loss = masked_loss(pred, mb.values, mb.target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
            expressed = mb.values > 0
            enc_tokens += int((expressed & ~mb.is_mask).sum())
            dec_tokens += N_GENES * len(values) if decoder_zeros is None else int(
                (expressed | mb.target).sum()) + decoder_zeros * len(values)
    dt = float(np.sum(times))
    cells = steps * len(values)
    return {"encoder_tokens": enc_tokens, "decoder_tokens": dec_tokens, "model": model_name, "decoder": "full" if decoder_zeros is None else f"zeros={decoder_zeros}",
            "expressed_genes": int((values[0] > 0).sum()), "batch": len(values), "seconds_per_step": dt / steps,
            "cells_per_s": cells / dt, "encoder_tokens_per_s": enc_tokens / dt, "decoder_tokens_per_s": dec_tokens / dt}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["xtrimo-3m", "xtrimo-10m"])
    ap.add_argument("--genes", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000, 6000])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--decoders", nargs="+", default=["full", "1024"], help="'full' and/or a decoder_zeros number")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast, MFU against the bf16 matmul peak)")
    ap.add_argument("--plot", default=None, help="write the cost-versus-genes plot here (PNG)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--replot", default=None, help="only redraw --plot from a --json file written before")
    ap.add_argument("--corpus", default=None, help="read the CEL-seq2 cells from this packed corpus (no anndata needed)")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        plot(saved["rows"], args.plot, saved["peak_gflop_per_s"] * 1e9)
        return

    peak = peak_flops() if args.device == "cpu" else peak_flops(8192, 20, "cuda", torch.bfloat16)
    print(f"peak {'fp32' if args.device == 'cpu' else 'bf16'} matmul: {peak / 1e9:.1f} GFLOP/s, "
          f"{torch.get_num_threads()} threads", flush=True)
    X = deep_cells(max(args.genes), args.corpus)
    print(f"{X.shape[0]} CEL-seq2 cells with >= {max(args.genes)} expressed reference genes", flush=True)
    rows = []
    for model_name in args.models:
        for n in args.genes:
            values = cut(X, n, args.batch_size)
            for dec in args.decoders:
                dz = None if dec == "full" else int(dec)
                row = measure(model_name, values, dz, args.steps, args.device)
                cells = args.steps * args.batch_size
                row["flops_per_cell"] = step_flops(model_name, round(row["encoder_tokens"] / cells),
                                                   round(row["decoder_tokens"] / cells))
                row["mfu"] = row["flops_per_cell"] * row["cells_per_s"] / peak
                rows.append(row)
                print(f"{model_name:11s} n={n:5d} decoder {row['decoder']:10s} {row['seconds_per_step']:7.2f} s/step "
                      f"{row['cells_per_s']:7.2f} cells/s  enc {row['encoder_tokens_per_s']:9.0f} tok/s  "
                      f"{row['flops_per_cell']:.3g} FLOP/cell  MFU {row['mfu']:.0%}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_gflop_per_s": peak / 1e9, "rows": rows}, indent=1))
    if args.plot:
        plot(rows, args.plot, peak)
    print(json.dumps(rows, indent=1))


def plot(rows: list[dict], path: str, peak: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({(r["model"], r["decoder"]) for r in rows}):
        sel = [r for r in rows if (r["model"], r["decoder"]) == key]
        x = [r["expressed_genes"] for r in sel]
        ax[0].plot(x, [1e3 / r["cells_per_s"] for r in sel], marker="o", label=f"{key[0]}, decoder {key[1]}")
        ax[1].plot(x, [r["flops_per_cell"] for r in sel], marker="o", label=f"{key[0]}, decoder {key[1]}")
    ax[0].set(xlabel="expressed genes per cell", ylabel="training time per cell (ms)", xscale="log", yscale="log",
              title=f"measured, 2-core CPU ({peak / 1e9:.0f} GFLOP/s fp32)")
    ax[1].set(xlabel="expressed genes per cell", ylabel="forward+backward FLOPs per cell", xscale="log", yscale="log",
              title="counted (torch.utils.flop_counter)")
    genes = sorted({r["expressed_genes"] for r in rows})
    for a in ax:
        a.grid(alpha=0.3)
        a.set_xticks(genes, [f"{g:,}" for g in genes], minor=False)
        a.set_xticks([], minor=True)
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
