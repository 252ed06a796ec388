"""Pretrain xTrimoGene on the packed corpus for a fixed number of minutes, in one device call.

Runs where scanpy and anndata are absent (a lent GPU machine): it needs torch, NumPy, SciPy,
scikit-learn, safetensors and performer-pytorch (carried as wheels there). Usage::

    # once, here: pack every broad-coverage shared data set (about 32 MB)
    scxtrimo corpus runs/corpus.xtc ../shared/data/*/*.h5ad --exclude gasperini papalexi

    # here: a new model whose gene embedding starts from the corpus's co-expression (the SVD
    # takes about 140 s for xtrimo-10m on two cores, better not spent on the device)
    python scripts/train_device.py init --corpus runs/corpus.xtc --config xtrimo-10m --depth-tokens \\
        --out runs/init-10m

    # train (on the device: OUT=$OUT; here: any folder); without --init a new model is built
    # there (its gene embedding by --gene-init, co-expression by default)
    python scripts/train_device.py train --corpus runs/corpus.xtc --out $OUT --minutes 8 \\
        --init runs/init-10m --batch-size 64

    # here, after the call: turn the returned files into a checkpoint folder
    python scripts/train_device.py merge FILES_AT runs/xtrimo-10m-gpu

``train`` writes into ``--out``: ``config.json`` and ``model-*.safetensors`` (the weights in
float16, cut into files of at most 15 MiB: the device tool returns files of at most 16 MiB),
``history.csv`` (masked-value MSE / Pearson r on validation cells over time, plain and thinned),
``result.json`` (throughput: cells/s, encoder tokens/s, FLOPs per cell, MFU; the pbmc3k
embedding score; the settings) and ``log.txt``. The weights are rewritten at every evaluation,
so a run stopped at its time limit still returns its latest model. The pbmc3k score here is
k-means at the 8 labelled types (scikit-learn: there is no Leiden on the device); the
appendix-4 Leiden protocol runs here afterwards (``benchmarks/embedding_quality.py``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a plain checkout, no install

from safetensors.torch import load_file, save_file  # noqa: E402

from scxtrimo._inference import batch_cells, embed_matrix, token_budget  # noqa: E402
from scxtrimo._train_corpus import CorpusTrainConfig, train_corpus  # noqa: E402
from scxtrimo.data._corpus import load_corpus  # noqa: E402
from scxtrimo.data._depth import ThinningConfig  # noqa: E402
from scxtrimo.data._masking import MaskingConfig  # noqa: E402
from scxtrimo.models._config import XTrimoGeneConfig, get_config  # noqa: E402
from scxtrimo.models._gene_init import init_gene_embedding  # noqa: E402
from scxtrimo.models._io import canonical_state  # noqa: E402
from scxtrimo.models._xtrimogene import POOLINGS, XTrimoGene  # noqa: E402

SHARD_BYTES = 15 * 2**20


def save_sharded(model: XTrimoGene, out: Path, *, metadata: dict) -> list[Path]:
    """float16 weights in ``model-<k>.safetensors`` files of at most 15 MiB, plus ``config.json``."""
    state = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()).contiguous()
             for k, v in canonical_state(model).items()}
    shards, current, size = [], {}, 0
    for k in sorted(state, key=lambda k: -state[k].numel() * state[k].element_size()):
        nbytes = state[k].numel() * state[k].element_size()
        if current and size + nbytes > SHARD_BYTES - (1 << 16):
            shards.append(current)
            current, size = {}, 0
        if nbytes > SHARD_BYTES - (1 << 16):  # one tensor above the limit: split its rows
            t = state[k]
            per = max(1, (SHARD_BYTES - (1 << 16)) // max(1, t[0].numel() * t.element_size()))
            for i, start in enumerate(range(0, t.shape[0], per)):
                shards.append({f"{k}@@{i}": t[start : start + per].clone()})
            continue
        current[k] = state[k]
        size += nbytes
    if current:
        shards.append(current)
    paths = []
    for i, shard in enumerate(shards):
        p = out / f"model-{i + 1}.safetensors"
        tmp = out / f".model-{i + 1}.tmp"
        save_file(shard, str(tmp))
        os.replace(tmp, p)
        paths.append(p)
    for stale in out.glob("model-*.safetensors"):
        if stale not in paths:
            stale.unlink()
    (out / "config.json").write_text(json.dumps({**model.config.to_dict(), "metadata": metadata}, indent=2) + "\n")
    return paths


def load_sharded(folder: Path) -> XTrimoGene:
    """The model saved by :func:`save_sharded` (float32)."""
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("format_version", None)
    meta = raw.pop("metadata", {})
    model = XTrimoGene(XTrimoGeneConfig.from_dict(raw))
    parts: dict[str, list] = {}
    state = {}
    for p in sorted(folder.glob("model-*.safetensors")):
        for k, v in load_file(str(p)).items():
            if "@@" in k:
                name, i = k.split("@@")
                parts.setdefault(name, []).append((int(i), v))
            else:
                state[k] = v
    for name, pieces in parts.items():
        state[name] = torch.cat([v for _, v in sorted(pieces, key=lambda x: x[0])])
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    own = canonical_state(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not fit config.json (missing {missing[:5]}, unexpected {unexpected[:5]}).")
    model.load_state_dict(state, strict=False)
    model.metadata = meta
    return model


def pbmc3k_score(model: XTrimoGene, corpus, device: torch.device, *, seeds=(0, 1, 2), max_cells: int | None = None) -> dict:
    """k-means ARI/NMI of pbmc3k embeddings at the labelled number of types, per pooling and depth.

    ``max_cells`` limits the cells scored (a CPU smoke run); the same cells every time.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    if "pbmc3k" not in corpus.sources:
        return {}
    rows = corpus.rows(source="pbmc3k")
    rows = rows[corpus.label[rows] >= 0][:max_cells]
    labels = corpus.label[rows]
    k = len(np.unique(labels))
    out = {}
    variants = [("max", None)]
    if model.config.depth_tokens:
        variants = [(p, d) for p in POOLINGS for d in ((4.0, "fixed"), (0.0, "offset"))]
    else:
        variants = [(p, None) for p in ("max", "mean")]
    model.eval()
    for pooling, depth in variants:
        X = corpus.model_input(rows, depth=depth)
        emb = embed_matrix(model, X, np.arange(len(rows)), pooling, device, max_cells=batch_cells(device),
                           max_tokens=token_budget(device, config=model.config))
        emb = (emb - emb.mean(0)) / (emb.std(0) + 1e-6)
        fits = [KMeans(k, n_init=10, random_state=s).fit_predict(emb) for s in seeds]
        ari = [adjusted_rand_score(labels, f) for f in fits]
        nmi = [normalized_mutual_info_score(labels, f) for f in fits]
        name = pooling if depth is None else f"{pooling}/T={'4' if depth[1] == 'fixed' else 'S'}"
        out[name] = {"kmeans_ari": float(np.mean(ari)), "kmeans_nmi": float(np.mean(nmi))}
    model.train()
    return out


def build_model(args, corpus, log=print) -> XTrimoGene:
    """The model a run starts from: ``--init``'s weights, or a new one (``--config``,
    ``--depth-tokens``, ``--gene-init`` from the corpus's training cells)."""
    if getattr(args, "init", None):
        init = Path(args.init)
        if (init / "model.safetensors").is_file():
            from scxtrimo.models._io import load

            model = load(init)
        else:
            model = load_sharded(init)
        mass = getattr(args, "decoder_zero_mass", None)
        if mass is not None:  # read at each forward: the same weights, no rebuild
            model.config = dataclasses.replace(model.config, decoder_zero_mass=mass)
        return model
    torch.manual_seed(args.seed)
    cfg = get_config(args.config)
    overrides = {"depth_tokens": args.depth_tokens, "decoder_zero_mass": getattr(args, "decoder_zero_mass", None)}
    if args.nb_features is not None:
        overrides["nb_features"] = args.nb_features
    cfg = XTrimoGeneConfig.from_dict({**cfg.to_dict(), **overrides})
    model = XTrimoGene(cfg)
    if args.gene_init == "coexpression":
        t = time.perf_counter()
        n = init_gene_embedding(model, corpus.model_input(corpus.rows("train")), value_scale=args.value_scale,
                                random_state=args.seed)
        log(f"gene embedding: {n} genes from co-expression of the training cells ({time.perf_counter() - t:.1f} s)")
        model.metadata = {"gene_init": "coexpression", "value_scale": args.value_scale}
    return model


def train(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.txt", "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t_load = time.perf_counter()
    corpus = load_corpus(args.corpus)
    log(f"corpus {args.corpus}: {len(corpus)} cells, {corpus.counts.nnz} non-zeros, loaded in {time.perf_counter() - t_load:.1f} s")
    model = build_model(args, corpus, log)
    args.config, args.depth_tokens = model.config.name, model.config.depth_tokens  # what --init loaded, in the run's record
    log(f"model {model.config.name} depth_tokens={model.config.depth_tokens} parameters={model.n_parameters():,} "
        f"init={args.init or 'random'} device={device}")
    thinning = ThinningConfig(p_thin=args.p_thin, capture_sd=args.capture_sd) if args.p_thin > 0 else None
    cfg = CorpusTrainConfig(minutes=args.minutes, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                            decoder_zeros=args.decoder_zeros, thinning=thinning, eval_every_s=args.eval_every_s,
                            eval_cells=args.eval_cells, random_state=args.seed, max_steps=args.max_steps,
                            masking=MaskingConfig(max_visible=args.max_visible), gene_lr_scale=args.gene_lr_scale,
                            cell_weight=args.cell_weight, cell_readout=args.cell_readout,
                            contrast_weight=args.contrast_weight, contrast_temperature=args.contrast_temperature,
                            factor_weight=args.factor_weight, compile_decoder=args.compile_decoder)
    prior = dict(model.metadata or {})
    seen_before = int(prior.get("cells_seen", 0))
    minutes_before = float(prior.get("minutes", prior.get("wall_time_s", 0.0) / 60))  # tl.pretrain records seconds

    def meta(history) -> dict:
        last = history[-1] if history else {}
        return {"cells_seen": seen_before + int(last.get("cells_seen", 0)),
                "minutes": round(minutes_before + float(last.get("elapsed_s", 0.0)) / 60, 2),
                "this_run": {"device": str(device), "corpus": Path(args.corpus).name, "args": vars(args)},
                "history_before": prior.get("history_before", []) + ([prior["this_run"]] if "this_run" in prior else []),
                "val_mse": last.get("val_mse"), "val_pearson": last.get("val_pearson"),
                **{k: prior[k] for k in ("gene_init", "value_scale", "pooling") if k in prior}}

    def on_eval(history) -> None:
        save_sharded(model, out, metadata=meta(history))
        with open(out / "history.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)

    res = train_corpus(model, corpus, cfg, device=device, on_eval=on_eval, log=log)
    tp = res["throughput"]
    log(f"trained {tp['steps']} steps, {tp['cells_seen']} cells ({tp['epochs']:.2f} epochs) in {tp['train_s']} s: "
        f"{tp['cells_per_s']:.1f} cells/s, MFU {tp['mfu']}")
    t = time.perf_counter()
    score = pbmc3k_score(model, corpus, device, max_cells=args.score_cells) if args.score_cells != 0 else {}
    log(f"pbmc3k k-means score ({time.perf_counter() - t:.1f} s): {json.dumps(score)}")
    result = {"throughput": tp, "pbmc3k": score, "final": res["history"][-1], "config": model.config.to_dict(),
              "metadata": meta(res["history"]), "torch": torch.__version__, "python": platform.python_version(),
              "host_cpu": platform.machine()}
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    logf.close()


def init(args) -> None:
    """A new model (``--config``, ``--depth-tokens``, ``--gene-init``) saved as a float16 checkpoint
    folder, so that a device call can start from it (``train --init``) without spending device
    time on the co-expression SVD (about 140 s for xtrimo-10m here)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args, load_corpus(args.corpus))
    folder = model.save(args.out, dtype=torch.float16, metadata=model.metadata)
    size = (Path(folder) / "model.safetensors").stat().st_size / 2**20
    print(f"wrote {args.out}: {model.config.name}, {model.n_parameters():,} parameters, {size:.1f} MiB")


def merge(args) -> None:
    model = load_sharded(Path(args.src))
    model.save(args.dest, metadata=model.metadata)
    print(f"wrote {args.dest}: {model.config.name}, {model.n_parameters():,} parameters")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train for --minutes and write the outputs into --out")
    i = sub.add_parser("init", help="write a new model (gene embedding initialised here) as a checkpoint folder --out")
    for p in (t, i):
        p.add_argument("--corpus", required=True)
        p.add_argument("--config", default="xtrimo-10m")
        p.add_argument("--depth-tokens", action="store_true", help="a new model with the T and S depth tokens")
        p.add_argument("--nb-features", type=int, default=None)
        p.add_argument("--decoder-zero-mass", type=int, default=None,
                       help="the model's decoder zero mass (XTrimoGeneConfig.decoder_zero_mass; with --init, the "
                            "loaded weights under that setting); usually --decoder-zeros")
        p.add_argument("--gene-init", choices=("random", "coexpression"), default="coexpression",
                       help="a new model's gene embedding: random, or co-expression coordinates of the training cells")
        p.add_argument("--value-scale", type=float, default=1.0,
                       help="with --gene-init coexpression: factor on the value embedding's table (init_gene_embedding)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=0)
    i.add_argument("--out", required=True)
    t.add_argument("--out", default=os.environ.get("OUT", "runs/device"))
    t.add_argument("--minutes", type=float, default=8.0)
    t.add_argument("--p-thin", type=float, default=0.5, help="share of cells thinned per step (0: no thinning)")
    t.add_argument("--capture-sd", type=float, default=0.0,
                   help="thinned cells also get per-gene capture efficiencies exp(-sd |z|) (ThinningConfig.capture_sd; 0: off)")
    t.add_argument("--init", default=None, help="continue from a checkpoint folder (or a folder of this script's shards)")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--gene-lr-scale", type=float, default=1.0,
                   help="learning-rate multiplier of the gene embedding (0 freezes it, keeping a co-expression start)")
    t.add_argument("--cell-weight", type=float, default=0.0,
                   help="weight of the cell-level term: the mean-pooled encoder output predicts the masked values (0: off)")
    t.add_argument("--cell-readout", choices=("bilinear", "dot"), default="bilinear",
                   help="the cell term's read-out: a learned map of the cell embedding, or a learned scale only")
    t.add_argument("--contrast-weight", type=float, default=0.0,
                   help="weight of a contrastive term between two corruptions of each cell (0: off)")
    t.add_argument("--contrast-temperature", type=float, default=0.1)
    t.add_argument("--factor-weight", type=float, default=0.0,
                   help="weight of the factor-score term: the mean-pooled encoder output regresses the real cell's "
                        "least-squares scores on the (frozen) gene embedding (0: off)")
    t.add_argument("--decoder-zeros", type=int, default=None)
    t.add_argument("--compile-decoder", action="store_true",
                   help="compile the Performer decoder (torch inductor); the first steps include the compilation")
    t.add_argument("--max-visible", type=int, default=None,
                   help="at most this many expressed genes visible to the encoder (the surplus is masked too)")
    t.add_argument("--eval-every-s", type=float, default=60.0)
    t.add_argument("--eval-cells", type=int, default=256)
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--score-cells", type=int, default=None, help="pbmc3k cells to score at the end (default all; 0: none)")
    t.add_argument("--device", default="auto")
    m = sub.add_parser("merge", help="turn a train --out folder into a checkpoint folder")
    m.add_argument("src")
    m.add_argument("dest")
    args = ap.parse_args(argv)
    {"train": train, "init": init, "merge": merge}[args.cmd](args)


if __name__ == "__main__":
    main()
