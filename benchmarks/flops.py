"""Paper Table 1, reproduced: forward+backward FLOPs per cell at ~10M parameters.

Counts matrix-multiplication FLOPs with ``torch.utils.flop_counter`` on the meta device (shapes
only, nothing is computed), for
  * a full-length Transformer encoder over all 19,264 genes (full attention, SDPA),
  * an encoder-only Performer over all genes (scBERT-style; performer-pytorch),
  * xTrimoGene-10M: encoder over the unmasked expressed genes, Performer decoder over all genes.
The cell follows appendix Table 1: 2,000 expressed genes, 600 of them masked, so the encoder
sees 1,400 tokens.

    python benchmarks/flops.py            # prints a markdown table
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from scxtrimo import N_GENES
from scxtrimo.models import XTrimoGene
from scxtrimo.models._decoder import Decoder
from scxtrimo.models._encoder import Encoder

PAPER = {"Transformer": 9.86e12, "Performer": 1.06e12, "xTrimoGene": 3.35e11}


def count(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def n_params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def full_length(kind: str, dim: int, depth: int, heads: int, n: int) -> tuple[int, int]:
    """A gene-embedding + encoder-only model over all ``n`` genes."""
    emb = nn.Embedding(N_GENES, dim)
    body = Encoder(dim, depth, heads, 4) if kind == "Transformer" else Decoder(dim, depth, heads, 4, None).eval()
    head = nn.Linear(dim, 1)
    params = n_params(emb, body, head)
    body, head = body.to("meta"), head.to("meta")
    x = torch.randn(1, n, dim, device="meta", requires_grad=True)
    return params, count(lambda: head(body(x)).sum().backward())


def xtrimogene(config: str, n: int, encoder_tokens: int) -> tuple[int, int]:
    model = XTrimoGene(config).eval()
    params = model.n_parameters()
    cfg = model.config
    model = model.to("meta")
    e = torch.randn(1, encoder_tokens, cfg.enc_dim, device="meta", requires_grad=True)
    d = torch.randn(1, n, cfg.enc_dim, device="meta", requires_grad=True)

    def step():  # the matmul-bearing path of XTrimoGene.forward: encoder, W_p, decoder, head
        h = model.encoder(e)
        y = model.head(model.decoder(model.decoder_proj(d + h.sum() * 0)))
        y.sum().backward()

    return params, count(step)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--expressed", type=int, default=2000)
    ap.add_argument("--mask-ratio", type=float, default=0.3)
    args = ap.parse_args()
    n = N_GENES
    m = int(round(args.expressed * (1 - args.mask_ratio)))
    rows = {
        "Transformer": full_length("Transformer", 256, 6, 8, n),
        "Performer": full_length("Performer", 256, 6, 8, n),
        "xTrimoGene": xtrimogene("xtrimo-10m", n, m),
    }
    base = rows["Transformer"][1]
    print(f"Forward+backward matmul FLOPs per cell, {n:,} genes, {args.expressed:,} expressed, encoder sees {m:,} tokens\n")
    print("| model | parameters | FLOPs (ours) | share of Transformer | FLOPs (paper Table 1) | share (paper) |")
    print("|---|---|---|---|---|---|")
    for name, (p, f) in rows.items():
        print(f"| {name} | {p / 1e6:.2f}M | {f:.3g} | {100 * f / base:.2f}% | {PAPER[name]:.3g} | {100 * PAPER[name] / PAPER['Transformer']:.2f}% |")


if __name__ == "__main__":
    main()
