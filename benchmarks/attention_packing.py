"""No compute on padding: length bucketing against packed (varlen) attention.

The same encoder weights (xtrimo-10m shape, 4 layers, width 256) run over the same real cells
(pbmc3k, log1p CP10k, their expressed genes) in these ways:

* ``per cell``: one cell per call, no padding at all (the authors' embedding loop);
* ``bucketed``: cells sorted by length and cut to a token budget, padded within a batch and
  masked (``tl.embed``'s path), at the CPU and the CUDA default budgets;
* ``one padded batch``: every cell padded to the longest (no bucketing);
* ``nested jagged``: ``torch.nested`` jagged tensors through SDPA (varlen, no padding), the
  cells in chunks of at most ``--nested-tokens`` tokens;
* ``per cell, torch.compile``: the per-cell loop with the encoder compiled (``dynamic=True``,
  as cell lengths vary; compilation time reported, not timed; ``--no-compile`` skips it);
* ``FlexAttention packed``: cells concatenated into fixed-size packs with a block-diagonal
  (document) mask, ``torch.nn.attention.flex_attention`` under ``torch.compile``.

The packed paths (nested jagged, FlexAttention) start, like the bucketed ones, from the CSR
rows: their token embeddings are computed from all cells' concatenated genes and values inside
the timed region, and their max pooling is one segment reduction. Each way is checked against
the per-cell outputs (max |difference| of the max-pooled embeddings), timed (best of
``--repeats``), and its padding share reported. ``--device cuda`` runs the same paths on a GPU
under bf16 autocast (``tl.embed``'s CUDA setting), where the nested-jagged path can use the
fused varlen (flash) kernel. ``--corpus runs/corpus.xtc`` reads pbmc3k from the packed corpus
(no anndata needed, e.g. on a GPU machine); ``--json`` writes the rows.

    python benchmarks/attention_packing.py --cells 128
    python benchmarks/attention_packing.py --device cuda --cells 2637 --corpus runs/corpus.xtc --no-compile
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
    out, best = None, float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return out, best


def per_cell(model, X, device):
    return torch.cat([model.embed_cells(csr_row_batch(X, np.array([i])).to(device)).float() for i in range(X.shape[0])])


def bucketed(model, X, budget, device):
    batches = length_batches(np.diff(X.indptr), max_cells=256, max_tokens=budget)
    out = torch.empty(X.shape[0], model.embedding_dim, device=device)
    for rows in batches:
        out[torch.from_numpy(rows).to(device)] = model.embed_cells(csr_row_batch(X, rows).to(device)).float()
    return out, padding_fraction(np.diff(X.indptr), batches)


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
    ap.add_argument("--json", default=None, help="also write the rows and the verdict here")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = scxtrimo.models.XTrimoGene(args.model).eval().to(dev)
    X = load_pbmc3k(args.cells, args.corpus)
    lengths = np.diff(X.indptr)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    print(f"{X.shape[0]} pbmc3k cells, {lengths.sum():,} tokens (median {int(np.median(lengths))}, "
          f"max {lengths.max()}), {args.model}, {gpu or dev}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n", flush=True)
    rows, errors = [], {}

    def add(name, kind, t, pad, diff, note=None):
        rows.append({"path": name, "kind": kind, "seconds": t, "cells_per_s": X.shape[0] / t,
                     "tokens_per_s": float(lengths.sum() / t), "padding": pad, "max_abs_diff": diff, "note": note})

    def failed(name, kind, e):
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        errors[name] = msg
        add(name, kind, float("nan"), float("nan"), float("nan"), msg)
        print(f"{name} unavailable here: {msg}", flush=True)

    with torch.inference_mode(), autocast(dev):
        per_cell_repeats = args.per_cell_repeats or args.repeats
        per_cell(model, X[:4], dev)  # warm-up (cuBLAS handles, first kernels): not timed
        ref, t_ref = timed(lambda: per_cell(model, X, dev), per_cell_repeats, dev)
        add("per cell (batch 1)", "per cell", t_ref, 0.0, 0.0)
        for budget in (4_096, 16_384, 262_144):
            (out, pad), t = timed(lambda: bucketed(model, X, budget, dev), args.repeats, dev)
            add(f"bucketed, {budget:,} tokens/batch", "bucketed", t, pad, float((out - ref).abs().max()))
        (out, pad), t = timed(lambda: bucketed(model, X[np.random.default_rng(0).permutation(X.shape[0])], 10**9, dev),
                              args.repeats, dev)
        add("one padded batch", "padded", t, pad, float("nan"))
    name = f"nested jagged SDPA, {args.nested_tokens:,} tokens/call"
    try:
        with torch.no_grad(), autocast(dev):
            out, t = timed(lambda: nested(model, X, dev, args.nested_tokens), args.repeats, dev)
        add(name, "packed", t, 0.0, float((out - ref).abs().max()))
    except Exception as e:  # no CPU kernel ("No viable backend"), unsupported op, ...
        failed(name, "packed", e)
    if not args.no_compile:
        encoder = model.encoder
        try:
            model.encoder = torch.compile(encoder, dynamic=True)
            with torch.no_grad(), autocast(dev):
                t0 = time.perf_counter()
                per_cell(model, X[:2], dev)
                compile_s = time.perf_counter() - t0
                out, t = timed(lambda: per_cell(model, X, dev), per_cell_repeats, dev)
            add(f"per cell, torch.compile (compile {compile_s:.0f} s, not timed)", "per cell", t, 0.0,
                float((out - ref).abs().max()))
        except Exception as e:
            failed("per cell, torch.compile", "per cell", e)
        finally:
            model.encoder = encoder
    try:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention)
        with torch.no_grad(), autocast(dev):
            t0 = time.perf_counter()
            flex_packed(model, X[:2], dev, compiled, args.pack)
            compile_s = time.perf_counter() - t0
            out, t = timed(lambda: flex_packed(model, X, dev, compiled, args.pack), args.repeats, dev)
        n_packs = len(token_chunks(X.indptr, args.pack))
        add(f"FlexAttention, packs of {args.pack:,} tokens (compile {compile_s:.0f} s, not timed)", "packed", t,
            max(0.0, 1 - lengths.sum() / (n_packs * args.pack)), float((out - ref).abs().max()))
    except Exception as e:  # no C++ toolchain, unsupported device, ...
        failed("FlexAttention packed", "packed", e)

    print("| path | seconds | cells/s | real tokens/s | padding | max abs diff vs per cell |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['seconds']:.3f} | {r['cells_per_s']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['padding']:.1%} | {r['max_abs_diff']:.2g} |")
    verdict = compare(rows)
    if verdict:
        print(f"\n{verdict['text']}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "cells": int(X.shape[0]), "tokens": int(lengths.sum()), "device": str(dev),
            "gpu": gpu, "torch": torch.__version__, "python": platform.python_version(), "repeats": args.repeats,
            "pack": args.pack, "nested_tokens": args.nested_tokens, "rows": rows, "errors": errors,
            "verdict": verdict}, indent=1, default=float) + "\n")


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
