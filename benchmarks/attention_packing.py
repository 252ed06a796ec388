"""No compute on padding: length bucketing against packed (varlen) attention.

The same encoder weights (xtrimo-10m shape, 4 layers, width 256) run over the same real cells
(pbmc3k, log1p CP10k, their expressed genes) in five ways:

* ``per cell``: one cell per call, no padding at all (the authors' embedding loop);
* ``bucketed``: cells sorted by length and cut to a token budget, padded within a batch and
  masked (``tl.embed``'s path), at the CPU and the CUDA default budgets;
* ``one padded batch``: every cell padded to the longest (no bucketing);
* ``nested jagged``: ``torch.nested`` jagged tensors through SDPA (varlen, no padding);
* ``per cell, torch.compile``: the per-cell loop with the encoder compiled (``dynamic=True``,
  as cell lengths vary; compilation time reported, not timed);
* ``FlexAttention packed``: cells concatenated into fixed-size packs with a block-diagonal
  (document) mask, ``torch.nn.attention.flex_attention`` under ``torch.compile``.

Each way is checked against the per-cell outputs (max |difference| of the max-pooled
embeddings), timed (best of ``--repeats``), and its padding share reported. ``--device cuda``
runs the same paths on a GPU under bf16 autocast (``tl.embed``'s CUDA setting), where the
nested-jagged path can use the fused varlen (flash) kernel.

    python benchmarks/attention_packing.py --cells 128
    python benchmarks/attention_packing.py --device cuda --cells 2638
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import scxtrimo
from scxtrimo._device import autocast
from scxtrimo.data._batching import csr_row_batch, length_batches, padding_fraction
from scxtrimo.data._prepare import iter_log1p_blocks, prepare_input


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


def embed_tokens(model, X, device):
    """Per-cell token embeddings (list of (L_i, d)) as the encoder's first layer sees them."""
    out = []
    for i in range(X.shape[0]):
        b = csr_row_batch(X, np.array([i])).to(device)
        out.append((model.value_embedding(b.values) + model.gene_embedding(b.genes))[0])
    return out


def block_forward(block, x, attend):
    """One EncoderBlock on a (1 or B, L, d) tensor with a custom attention ``attend(q, k, v)``."""
    b, l, d = x.shape
    q, k, v = block.qkv(block.norm1(x)).view(b, l, 3, block.heads, d // block.heads).permute(2, 0, 3, 1, 4)
    a = attend(q, k, v)
    x = x + block.out(a.transpose(1, 2).reshape(b, l, d))
    return x + block.ff(block.norm2(x))


def nested(model, tokens):
    x = torch.nested.nested_tensor(tokens, layout=torch.jagged)
    for block in model.encoder.blocks:
        h = block.norm1(x)
        q, k, v = (t.unflatten(-1, (block.heads, -1)).transpose(1, 2) for t in block.qkv(h).chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2)
        x = x + block.out(a)
        x = x + block.ff(block.norm2(x))
    x = model.encoder.norm(x)
    return torch.stack([t.amax(0) for t in x.unbind()]).float()


def flex_packed(model, tokens, compiled, pack: int):
    """Cells packed greedily into sequences of exactly ``pack`` tokens (static shape: one
    compilation), attention restricted to each cell by a block-diagonal FlexAttention mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    packs, cur, used = [], [], 0
    for i, t in enumerate(tokens):
        if used + len(t) > pack and cur:
            packs.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += len(t)
    packs.append(cur)
    device = tokens[0].device
    out = torch.empty(len(tokens), model.embedding_dim, device=device)
    for members in packs:
        lengths = torch.tensor([len(tokens[i]) for i in members])
        doc = torch.full((pack,), -1, dtype=torch.long)
        doc[: int(lengths.sum())] = torch.repeat_interleave(torch.arange(len(members)), lengths)
        doc = doc.to(device)

        def same_cell(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

        mask = create_block_mask(same_cell, None, None, pack, pack, device=device)
        x = torch.zeros(1, pack, model.embedding_dim, device=device, dtype=tokens[0].dtype)
        x[0, : int(lengths.sum())] = torch.cat([tokens[i] for i in members])
        for block in model.encoder.blocks:
            x = block_forward(block, x, lambda q, k, v: compiled(q, k, v, block_mask=mask))
        x = model.encoder.norm(x)[0, : int(lengths.sum())]
        out[torch.tensor(members, device=device)] = torch.stack([t.amax(0) for t in x.split(lengths.tolist())]).float()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="xtrimo-10m")
    ap.add_argument("--cells", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pack", type=int, default=8_192, help="tokens per FlexAttention pack")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 autocast as in tl.embed)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = scxtrimo.models.XTrimoGene(args.model).eval().to(dev)
    adata = scxtrimo.datasets.pbmc3k()[: args.cells].copy()
    X = next(iter_log1p_blocks(prepare_input(adata), block_cells=adata.n_obs))[2]
    lengths = np.diff(X.indptr)
    print(f"{X.shape[0]} pbmc3k cells, {lengths.sum():,} tokens (median {int(np.median(lengths))}, "
          f"max {lengths.max()}), {args.model}, {dev}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    rows = []
    with torch.inference_mode(), autocast(dev):
        ref, t_ref = timed(lambda: per_cell(model, X, dev), args.repeats, dev)
        rows.append(("per cell (batch 1)", t_ref, 0.0, 0.0))
        for budget in (4_096, 16_384, 262_144):
            (out, pad), t = timed(lambda: bucketed(model, X, budget, dev), args.repeats, dev)
            rows.append((f"bucketed, {budget:,} tokens/batch", t, pad, float((out - ref).abs().max())))
        (out, pad), t = timed(lambda: bucketed(model, X[np.random.default_rng(0).permutation(X.shape[0])], 10**9, dev),
                              args.repeats, dev)
        rows.append(("one padded batch", t, pad, float("nan")))
        tokens = embed_tokens(model, X, dev)
        try:
            out, t = timed(lambda: nested(model, tokens), args.repeats, dev)
            rows.append(("nested jagged SDPA", t, 0.0, float((out - ref).abs().max())))
        except (RuntimeError, NotImplementedError) as e:
            rows.append(("nested jagged SDPA", float("nan"), 0.0, float("nan")))
            print(f"nested jagged SDPA unavailable here: {str(e).splitlines()[0]}")
    try:
        encoder = model.encoder
        model.encoder = torch.compile(encoder, dynamic=True)
        with torch.no_grad(), autocast(dev):
            t0 = time.perf_counter()
            per_cell(model, X[:2], dev)
            compile_s = time.perf_counter() - t0
            out, t = timed(lambda: per_cell(model, X, dev), args.repeats, dev)
        rows.append((f"per cell, torch.compile (compile {compile_s:.0f} s, not timed)", t, 0.0,
                     float((out - ref).abs().max())))
    except Exception as e:
        rows.append(("per cell, torch.compile", float("nan"), 0.0, float("nan")))
        print(f"torch.compile unavailable here: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    finally:
        model.encoder = encoder
    try:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention)
        with torch.no_grad(), autocast(dev):
            t0 = time.perf_counter()
            flex_packed(model, tokens[:2], compiled, args.pack)
            compile_s = time.perf_counter() - t0
            out, t = timed(lambda: flex_packed(model, tokens, compiled, args.pack), args.repeats, dev)
        n_packs = -(-int(lengths.sum()) // args.pack)
        rows.append((f"FlexAttention, packs of {args.pack:,} tokens (compile {compile_s:.0f} s, not timed)", t,
                     max(0.0, 1 - lengths.sum() / (n_packs * args.pack)), float((out - ref).abs().max())))
    except Exception as e:  # no C++ toolchain, unsupported device, ...
        rows.append(("FlexAttention packed", float("nan"), 0.0, float("nan")))
        print(f"FlexAttention unavailable here: {type(e).__name__}: {str(e).splitlines()[0][:200]}")

    print("| path | seconds | cells/s | real tokens/s | padding | max abs diff vs per cell |")
    print("|---|---|---|---|---|---|")
    for name, t, pad, diff in rows:
        print(f"| {name} | {t:.2f} | {X.shape[0] / t:.1f} | {lengths.sum() / t:,.0f} | {pad:.1%} | {diff:.2g} |")


if __name__ == "__main__":
    main()
