"""No compute on padding: length bucketing against packed (varlen) attention.

The same encoder weights (xtrimo-10m shape, 4 layers, width 256) run over the same real cells
(pbmc3k, log1p CP10k, their expressed genes) in these ways:

* ``per cell``: one cell per call, no padding at all (the authors' embedding loop), on the first
  ``--per-cell-cells`` cells; the same loop in fp32 is the reference of every path;
* ``bucketed``: cells sorted by length and cut to a token budget (``--budgets``), padded within
  a batch to the longest cell or to the width grid (``tl.embed``'s path on CUDA: a bounded set
  of batch shapes), and masked;
* ``one padded batch``: every cell padded to the longest (no bucketing);
* ``nested jagged``: ``torch.nested`` jagged tensors through SDPA (varlen, no padding), the
  cells in chunks of at most ``--nested-tokens`` tokens;
* ``per cell, torch.compile``: the per-cell loop with the encoder compiled (``dynamic=True``,
  as cell lengths vary; ``--no-compile`` skips it);
* ``FlexAttention packed``: cells concatenated into fixed-size packs with a block-diagonal
  (document) mask, ``torch.nn.attention.flex_attention`` under ``torch.compile``.

The packed paths (nested jagged, FlexAttention) start, like the bucketed ones, from the CSR
rows: their token embeddings are computed from all cells' concatenated genes and values inside
the timed region, and their max pooling is one segment reduction. Each way is checked against
the fp32 per-cell outputs (max |difference| of the max-pooled embeddings), timed on its first
pass (what new shapes cost: cuDNN attention builds a plan per batch shape on CUDA, compiled
paths compile) and as the best of ``--repeats`` later passes, and its padding share reported.
``--device cuda`` runs the same paths on a GPU under bf16 autocast (``tl.embed``'s CUDA
setting), where the nested-jagged path can use the fused varlen (flash) kernel. ``--corpus
runs/corpus.xtc`` reads pbmc3k from the packed corpus (no anndata needed, e.g. on a GPU
machine); ``--json`` writes the rows after each one (a run stopped at a time limit keeps them).

    python benchmarks/attention_packing.py --cells 128
    python benchmarks/attention_packing.py --device cuda --cells 2637 --corpus runs/corpus.xtc --no-compile \
        --per-cell-cells 200 --budgets 16384 65536 151552
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import scxtrimo.models
from scxtrimo._device import autocast
from scxtrimo.data._batching import csr_row_batch, length_batches, padding_fraction


def timed(fn, repeats: int, device: torch.device):
    """``fn``'s output and its best time over ``repeats`` calls after a first call, timed apart
    (``first``: what new shapes cost, e.g. cuDNN attention plans built per shape on CUDA)."""
    out, first, best = None, None, float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i == 0:
            first = time.perf_counter() - t
        else:
            best = min(best, time.perf_counter() - t)
    return out, best, first


def per_cell(model, X, device):
    return torch.cat([model.embed_cells(csr_row_batch(X, np.array([i])).to(device)).float() for i in range(X.shape[0])])


def bucketed(model, X, budget, device, grid: bool = False):
    """Length-bucketed batches (padded to the longest cell, or to the width grid as tl.embed on CUDA)."""
    lengths = np.diff(X.indptr)
    batches = length_batches(lengths, max_cells=256, max_tokens=budget, grid=grid)
    out = torch.empty(X.shape[0], model.embedding_dim, device=device)
    for rows in batches:
        out[torch.from_numpy(rows).to(device)] = model.embed_cells(csr_row_batch(X, rows, grid=grid).to(device)).float()
    return out, padding_fraction(lengths, batches, grid)


def flat_tokens(model, X, device):
    """Token embeddings of all cells of the CSR rows ``X``, concatenated: ``(T, d)``, and the
    ``(n + 1,)`` offsets of each cell's tokens (as the encoder's first layer sees them)."""
    genes = torch.from_numpy(X.indices.astype(np.int64)).to(device, non_blocking=True)
    values = torch.from_numpy(X.data.astype(np.float32)).to(device, non_blocking=True)
    offsets = torch.from_numpy(X.indptr.astype(np.int64) - int(X.indptr[0])).to(device, non_blocking=True)
    return model.value_embedding(values) + model.gene_embedding(genes), offsets


def token_chunks(indptr: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive cells ``[start, stop)`` of at most ``budget`` tokens each (a longer cell alone)."""
    chunks, start = [], 0
    n = len(indptr) - 1
    while start < n:
        stop = int(np.searchsorted(indptr, indptr[start] + budget, side="right")) - 1
        stop = min(max(stop, start + 1), n)
        chunks.append((start, stop))
        start = stop
    return chunks


def segment_max(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Max over each cell's rows of the flat ``(T, d)`` ``x`` -> ``(n, d)`` float32."""
    return torch.segment_reduce(x.float(), "max", offsets=offsets, axis=0)


def block_forward(block, x, attend):
    """One EncoderBlock on a (B, L, d) tensor (dense, or nested jagged) with a custom attention
    ``attend(q, k, v)`` on ``(B, heads, L, d_head)`` queries, keys and values."""

    def attention(h):
        # (nested tensors on CPU: only the math kernel exists, and it needs contiguous chunks)
        q, k, v = (t.unflatten(-1, (block.heads, -1)).transpose(1, 2)
                   for t in (c if c.is_cuda else c.contiguous() for c in block.qkv(h).chunk(3, dim=-1)))
        return block.out(attend(q, k, v).transpose(1, 2).flatten(-2))

    if block.norm_first:
        x = x + attention(block.norm1(x))
        return x + block.ff(block.norm2(x))
    x = block.norm1(x + attention(x))
    return block.norm2(x + block.ff(x))


def nested(model, X, device, budget: int):
    """The encoder over nested jagged tensors (no padding), ``budget`` tokens per call."""
    out = torch.empty(X.shape[0], model.embedding_dim, device=device)
    for start, stop in token_chunks(X.indptr, budget):
        x, offsets = flat_tokens(model, X[start:stop], device)
        x = torch.nested.nested_tensor_from_jagged(x, offsets)
        for block in model.encoder.blocks:
            x = block_forward(block, x, F.scaled_dot_product_attention)
        out[start:stop] = segment_max(model.encoder.norm(x).values(), offsets)
    return out


def flex_packed(model, X, device, compiled, pack: int):
    """Cells packed greedily (in their order) into sequences of exactly ``pack`` tokens (static
    shape: one compilation), attention restricted to each cell by a block-diagonal
    FlexAttention mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    x_all, offsets = flat_tokens(model, X, device)
    out = torch.empty(X.shape[0], model.embedding_dim, device=device)
    indptr = X.indptr - X.indptr[0]
    for start, stop in token_chunks(indptr, pack):
        t0, t1 = int(indptr[start]), int(indptr[stop])
        used = t1 - t0
        if used > pack:
            raise ValueError(f"a cell of {used} tokens does not fit a pack of {pack}; raise --pack")
        lengths = torch.from_numpy(np.diff(indptr[start : stop + 1])).to(device)
        doc = torch.full((pack,), -1, dtype=torch.long, device=device)
        doc[:used] = torch.repeat_interleave(torch.arange(stop - start, device=device), lengths)

        def same_cell(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

        mask = create_block_mask(same_cell, None, None, pack, pack, device=device)
        x = torch.zeros(1, pack, x_all.shape[-1], device=device, dtype=x_all.dtype)
        x[0, :used] = x_all[t0:t1]
        for block in model.encoder.blocks:
            x = block_forward(block, x, lambda q, k, v: compiled(q, k, v, block_mask=mask))
        out[start:stop] = segment_max(model.encoder.norm(x)[0, :used], offsets[start : stop + 1] - offsets[start])
    return out


def load_pbmc3k(n: int, corpus_path: str | None):
    """log1p CP10k CSR rows of the first ``n`` pbmc3k cells (from the corpus, or the bundled file)."""
    if corpus_path:
        from scxtrimo.data._corpus import load_corpus

        corpus = load_corpus(corpus_path)
        return corpus.model_input(corpus.rows(source="pbmc3k")[:n])
    import scxtrimo
    from scxtrimo.data._prepare import iter_log1p_blocks, prepare_input

    adata = scxtrimo.datasets.pbmc3k()[:n].copy()
    return next(iter_log1p_blocks(prepare_input(adata), block_cells=adata.n_obs))[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="xtrimo-10m")
    ap.add_argument("--cells", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--per-cell-repeats", type=int, default=None, help="repeats of the per-cell rows (default --repeats)")
    ap.add_argument("--pack", type=int, default=8_192, help="tokens per FlexAttention pack")
    ap.add_argument("--nested-tokens", type=int, default=262_144, help="most tokens per nested-jagged call")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 autocast as in tl.embed)")
    ap.add_argument("--corpus", default=None, help="read pbmc3k from this packed corpus (no anndata needed)")
    ap.add_argument("--no-compile", action="store_true", help="skip the per-cell torch.compile row")
    ap.add_argument("--per-cell-cells", type=int, default=None,
                    help="cells of the per-cell rows, the reference of every max abs diff (default: all; on CUDA "
                         "each new length is a new cuDNN attention plan, so keep it small there)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[4_096, 16_384, 262_144],
                    help="token budgets of the bucketed rows (each tight and on the width grid)")
    ap.add_argument("--json", default=None, help="also write the rows and the verdict here (after every row)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = scxtrimo.models.XTrimoGene(args.model).eval().to(dev)
    X = load_pbmc3k(args.cells, args.corpus)
    lengths = np.diff(X.indptr)
    k = min(args.per_cell_cells or X.shape[0], X.shape[0])
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    print(f"{X.shape[0]} pbmc3k cells, {lengths.sum():,} tokens (median {int(np.median(lengths))}, "
          f"max {lengths.max()}), {args.model}, {gpu or dev}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; per-cell rows on the first {k} cells\n", flush=True)
    rows, errors = [], {}

    def write():
        if args.json:
            Path(args.json).write_text(json.dumps({
                "model": args.model, "cells": int(X.shape[0]), "tokens": int(lengths.sum()), "device": str(dev),
                "gpu": gpu, "torch": torch.__version__, "python": platform.python_version(), "repeats": args.repeats,
                "per_cell_cells": k, "pack": args.pack, "nested_tokens": args.nested_tokens, "rows": rows,
                "errors": errors, "verdict": compare(rows)}, indent=1, default=float) + "\n")

    def add(name, kind, t, pad, diff, first=None, note=None, cells=None):
        cells = cells or X.shape[0]
        tokens = lengths[:cells].sum()
        rows.append({"path": name, "kind": kind, "cells": cells, "seconds": t, "cells_per_s": cells / t,
                     "tokens_per_s": float(tokens / t), "first_seconds": first,
                     "first_cells_per_s": cells / first if first else None, "padding": pad, "max_abs_diff": diff,
                     "note": note})
        print(f"{name}: {cells / t:,.1f} cells/s (first pass {cells / first if first else float('nan'):,.1f}), "
              f"padding {pad:.1%}, max abs diff {diff:.2g}", flush=True)
        write()

    def failed(name, kind, e):
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        errors[name] = msg
        add(name, kind, float("nan"), float("nan"), float("nan"), note=msg)
        print(f"{name} unavailable here: {msg}", flush=True)

    def diff(out):
        return float((out[:k] - ref).abs().max())

    with torch.inference_mode(), autocast(dev):
        per_cell_repeats = args.per_cell_repeats or args.repeats
        with torch.autocast(dev.type, enabled=False):  # the fp32 reference (no per-shape kernel plans)
            ref = per_cell(model, X[:k], dev)
        for budget in args.budgets:
            for grid in (False, True):
                (out, pad), t, first = timed(lambda: bucketed(model, X, budget, dev, grid), args.repeats, dev)
                add(f"bucketed, {budget:,} tokens/batch{', width grid' if grid else ''}", "bucketed", t, pad,
                    diff(out), first)
        out, t, first = timed(lambda: per_cell(model, X[:k], dev), per_cell_repeats, dev)
        add("per cell (batch 1)", "per cell", t, 0.0, diff(out), first, cells=k)
        (out, pad), t, first = timed(
            lambda: bucketed(model, X[np.random.default_rng(0).permutation(X.shape[0])], 10**9, dev), args.repeats, dev)
        add("one padded batch", "padded", t, pad, float("nan"), first)
    name = f"nested jagged SDPA, {args.nested_tokens:,} tokens/call"
    try:
        with torch.no_grad(), autocast(dev):
            out, t, first = timed(lambda: nested(model, X, dev, args.nested_tokens), args.repeats, dev)
        add(name, "packed", t, 0.0, diff(out), first)
    except Exception as e:  # no CPU kernel ("No viable backend"), unsupported op, ...
        failed(name, "packed", e)
    if not args.no_compile:
        encoder = model.encoder
        try:
            model.encoder = torch.compile(encoder, dynamic=True)
            with torch.no_grad(), autocast(dev):
                out, t, first = timed(lambda: per_cell(model, X[:k], dev), per_cell_repeats, dev)
            add(f"per cell, torch.compile (first pass {first:.0f} s, compilation included)", "per cell", t, 0.0,
                diff(out), first, cells=k)
        except Exception as e:
            failed("per cell, torch.compile", "per cell", e)
        finally:
            model.encoder = encoder
    try:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention)
        with torch.no_grad(), autocast(dev):
            out, t, first = timed(lambda: flex_packed(model, X, dev, compiled, args.pack), args.repeats, dev)
        n_packs = len(token_chunks(X.indptr, args.pack))
        add(f"FlexAttention, packs of {args.pack:,} tokens (first pass {first:.0f} s, compilation included)", "packed",
            t, max(0.0, 1 - lengths.sum() / (n_packs * args.pack)), diff(out), first)
    except Exception as e:  # no C++ toolchain, unsupported device, ...
        failed("FlexAttention packed", "packed", e)

    print("\n| path | cells | seconds | cells/s | first pass cells/s | real tokens/s | padding | max abs diff vs fp32 per cell |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['cells']} | {r['seconds']:.3f} | {r['cells_per_s']:,.1f} | "
              f"{r['first_cells_per_s'] or float('nan'):,.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['padding']:.1%} | {r['max_abs_diff']:.2g} |")
    verdict = compare(rows)
    if verdict:
        print(f"\n{verdict['text']}")
    write()


def compare(rows: list[dict]) -> dict | None:
    """Fastest length-bucketed row against the fastest packed (varlen) row: which wins, by how much."""
    ok = [r for r in rows if np.isfinite(r["seconds"])]
    best = {k: min((r for r in ok if r["kind"] == k), key=lambda r: r["seconds"], default=None)
            for k in ("bucketed", "packed")}
    if best["bucketed"] is None or best["packed"] is None:
        return None
    b, p = best["bucketed"], best["packed"]
    win, lose = (b, p) if b["seconds"] <= p["seconds"] else (p, b)
    ratio = lose["seconds"] / win["seconds"]
    return {"winner": win["kind"], "winner_path": win["path"], "loser_path": lose["path"], "speedup": ratio,
            "bucketed_cells_per_s": b["cells_per_s"], "packed_cells_per_s": p["cells_per_s"],
            "text": f"{win['kind']} wins: {win['path']} {win['cells_per_s']:,.0f} cells/s against "
                    f"{lose['path']} {lose['cells_per_s']:,.0f} cells/s ({ratio:.2f}x)"}


if __name__ == "__main__":
    main()
