"""What the decoder's context does to masked-value recovery: random-feature redraws and the zero mass.

Two measurements on one checkpoint, with the same keyed masks for every variant (log1p CP10k):

* ``--redraws K``: the corpus's first validation cells, decoded as in training's validation
  (``--decoder-zeros`` sampled unexpressed genes), with the checkpoint's own random features and
  after each of K redraws of them (seeds 0..K-1), as performer-pytorch does every 1,000
  training passes by default.
* ``--zero-mass``: the corpus's first test cells, decoded over all 19,264 genes, with the
  checkpoint's weights under each ``XTrimoGeneConfig.decoder_zero_mass`` (``none``: every token
  counts once, the paper's decoder).

    python benchmarks/decoder_context.py --model runs/proj/ckpt_f2 --cells 128 --redraws 2 \\
        --zero-mass none 1024 1536
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="xtrimo-3m")
    p.add_argument("--corpus", default="runs/corpus.xtc")
    p.add_argument("--cells", type=int, default=128)
    p.add_argument("--decoder-zeros", type=int, default=1024, help="sampled context of the redraw measurement")
    p.add_argument("--redraws", type=int, default=2)
    p.add_argument("--zero-mass", nargs="*", default=["none", "1024"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from scxtrimo.data._corpus import load_corpus
    from scxtrimo.data._objective import evaluate_masked
    from scxtrimo.models import load
    from scxtrimo.models._decoder import WeightedFastAttention

    corpus = load_corpus(args.corpus)
    base = load(args.model)
    cpu = torch.device("cpu")

    def report(**row) -> None:
        print(json.dumps({"model": args.model, **row}), flush=True)

    val = corpus.rows("validation")[: args.cells]
    kw = {"device": cpu, "batch_size": 16, "totals": corpus.total[val], "decoder_zeros": args.decoder_zeros, "seed": 12345}
    if args.redraws:
        model = copy.deepcopy(base)  # redrawn below; the zero-mass runs keep the checkpoint's features
        report(cells="validation", features="the checkpoint's", **evaluate_masked(model, corpus.counts[val], **kw))
        for seed in range(args.redraws):
            torch.manual_seed(seed)
            for m in model.modules():
                if isinstance(m, WeightedFastAttention):
                    m.redraw_projection_matrix(cpu)
            report(cells="validation", features=f"redrawn (seed {seed})", **evaluate_masked(model, corpus.counts[val], **kw))

    test = corpus.rows("test")[: args.cells]
    for mass in [None if z == "none" else int(z) for z in args.zero_mass]:
        base.config = dataclasses.replace(base.config, decoder_zero_mass=mass)  # read at each forward
        r = evaluate_masked(base, corpus.counts[test], device=cpu, batch_size=8, seed=7, totals=corpus.total[test])
        report(cells="test", decoder="all genes", zero_mass=mass, **r)


if __name__ == "__main__":
    main()
