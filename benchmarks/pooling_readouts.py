"""Other read-outs of one encoder pass: is mean pooling the best cell embedding of a checkpoint?

``tl.embed`` pools the encoder outputs ``h_g`` of a cell's expressed genes by their mean (the
bundled checkpoint's default) or maximum. The factor-score teacher of the bundled checkpoint is a
value-weighted *sum* over the same genes (``sum_g x_g e_g`` mapped by a fixed matrix), so this
script asks whether a read-out nearer to it clusters better. From one pass of the encoder over
each labelled set (the cells and protocol of ``embedding_quality.py``), with ``x_g`` the log1p
CP10k value and ``n`` the number of expressed genes:

* ``mean`` (``tl.embed``'s) and ``max``;
* ``wmean``: ``sum_g x_g h_g / sum_g x_g``; ``wsum``: ``sum_g x_g h_g``; ``sum``: ``sum_g h_g``;
* ``sqrtmean``: ``sum_g h_g / sqrt(n)`` (between the mean and the sum);
* ``l2mean``: the mean scaled to unit length (cosine geometry);
* ``teacher``: the checkpoint's gene-table factor scores (no encoder).

Each is scored with ``tl.evaluate_clustering`` (Leiden at the labelled number of types) for
every Leiden seed; the script prints one Markdown table of ARI (mean ± sd over seeds).

    python benchmarks/pooling_readouts.py --model xtrimo-3m --seeds 0 1 2 3 4 5 6 7 8 9 --subsample cellbench=400
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

import scxtrimo
from scxtrimo._inference import map_cells, token_budget
from scxtrimo.data._prepare import iter_log1p_blocks, prepare_input

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embedding_quality import benchmark_sets, score

READOUTS = ("mean", "max", "wmean", "wsum", "sum", "sqrtmean")


def readouts(model, batch) -> torch.Tensor:
    """``(B, len(READOUTS) * d)``: every read-out of one encoder pass over a token batch."""
    h = model.encode(batch)
    valid = batch.valid.unsqueeze(-1).to(h.dtype)
    weight = batch.values.unsqueeze(-1).to(h.dtype) * valid
    n = valid.sum(1)
    total = (h * valid).sum(1)
    weighted = (h * weight).sum(1)
    top = h.masked_fill(valid == 0, float("-inf")).amax(1)
    return torch.cat([total / n, top, weighted / weight.sum(1), weighted, total, total / n.sqrt()], dim=1)


def embeddings(model, adata) -> dict[str, np.ndarray]:
    """Read-out name -> ``(n_obs, d)`` float32, plus ``l2mean`` and ``teacher``."""
    if model.config.depth_tokens:
        raise ValueError("this benchmark reads out models without depth tokens (the bundled xtrimo-3m)")
    X = sp.vstack([b for _, _, b in iter_log1p_blocks(prepare_input(adata))], format="csr")
    dev = torch.device("cpu")
    d = model.embedding_width("mean")
    with torch.no_grad():
        out = map_cells(lambda b: readouts(model, b), X, np.arange(X.shape[0]), dev, width=len(READOUTS) * d,
                        max_cells=1, max_tokens=token_budget(dev, None, config=model.config))
    reps = {name: out[:, i * d:(i + 1) * d] for i, name in enumerate(READOUTS)}
    reps["l2mean"] = reps["mean"] / np.linalg.norm(reps["mean"], axis=1, keepdims=True)
    proj = scxtrimo.models.factor_projection(model.gene_embedding.weight[: model.config.n_genes]).numpy()
    reps["teacher"] = np.asarray(X @ proj, dtype=np.float32)
    return reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="xtrimo-3m", help="checkpoint name or folder (no depth tokens)")
    p.add_argument("--sets", nargs="*", default=None, help="labelled sets (default: all five)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)), help="Leiden seeds")
    p.add_argument("--subsample", nargs="*", default=["cellbench=400"], help="SET=N stratified samples")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)  # Leiden's "n clusters, not k" notes
    model = scxtrimo.models.load(args.model).eval()
    subsample = {k: int(v) for k, v in (s.split("=") for s in args.subsample)}
    table: dict[str, dict[str, list[float]]] = {}
    for name, (adata, batch_key) in benchmark_sets(args.sets, subsample=subsample).items():
        t = time.perf_counter()
        reps = embeddings(model, adata)
        print(f"{name}: {adata.n_obs} cells embedded in {time.perf_counter() - t:.0f} s", flush=True)
        for readout, rep in reps.items():
            table.setdefault(readout, {})[name] = [score(adata, rep, s, batch_key)["ari"] for s in args.seeds]
    sets = list(next(iter(table.values())))
    print(f"\n| ARI, Leiden seeds {args.seeds[0]}-{args.seeds[-1]} | " + " | ".join(sets) + " | mean |")
    print("|---" * (len(sets) + 2) + "|")
    for readout, per_set in table.items():
        cells = [f"{np.mean(v):.3f} ± {np.std(v):.3f}" for v in per_set.values()]
        print(f"| {readout} | " + " | ".join(cells) + f" | {np.mean([np.mean(v) for v in per_set.values()]):.3f} |")


if __name__ == "__main__":
    main()
