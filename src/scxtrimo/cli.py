"""Command line: ``scxtrimo embed IN.h5ad OUT.h5ad``, ``scxtrimo demo``, ``scxtrimo pretrain``, ``scxtrimo corpus``
and ``scxtrimo convert models.ckpt OUT_DIR`` (the authors' released weights into a checkpoint folder).

``scxtrimo embed`` and ``scxtrimo pretrain`` work alone and under ``torchrun --nproc_per_node=N -m scxtrimo.cli
embed|pretrain ...`` (sharded embedding, see :func:`scxtrimo.tl.embed`; data-parallel training, see
:func:`scxtrimo.tl.pretrain`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _read_h5ad(path):
    """``anndata.read_h5ad``, with an error that names the file when it is not an .h5ad file."""
    import anndata as ad

    if not Path(path).is_file():
        raise FileNotFoundError(f"input {str(path)!r} does not exist (or is not a file).")
    try:
        return ad.read_h5ad(path)
    except OSError as err:
        raise ValueError(f"could not read {str(path)!r} as an .h5ad file ({err}). Convert it first, e.g. "
                         "with scanpy.read_10x_h5 / read_10x_mtx / read_loom and .write_h5ad().") from err


def _check_writable(path) -> None:
    """Refuse an output path whose folder does not exist, before any work is done."""
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise FileNotFoundError(f"the folder of the output {str(path)!r} does not exist; create {str(folder)!r} first.")


def _embed(args) -> int:
    from . import tl

    _check_writable(args.output)
    adata = _read_h5ad(args.input)
    t = time.perf_counter()
    tl.embed(adata, model=args.model, batch_size=args.batch_size, device=args.device, pooling=args.pooling,
             key_added=args.key_added, gene_symbols=args.gene_symbols, target_depth=args.target_depth,
             target_depth_mode=args.target_depth_mode, bulk=args.bulk)
    dt = time.perf_counter() - t
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun every rank holds the result; one writes
        return 0
    adata.write_h5ad(args.output, compression="gzip")
    print(f"embedded {adata.n_obs} cells into obsm[{args.key_added!r}] "
          f"({adata.obsm[args.key_added].shape[1]} dims) in {dt:.1f} s -> {args.output}")
    return 0


def _demo(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    from . import datasets, pl, tl
    from .tl._clustering import pca_baseline

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adata = datasets.pbmc3k()
    print(f"pbmc3k: {adata.n_obs} cells x {adata.n_vars} genes, {adata.obs['cell_type'].nunique()} labelled types")
    t = time.perf_counter()
    tl.embed(adata, model=args.model, device=args.device, progress=not args.quiet)
    dt = time.perf_counter() - t
    params = adata.uns["xtrimo"]["params"]
    print(f"embedded with {params['model']} ({params['n_genes_matched']} reference genes matched) "
          f"in {dt:.1f} s: {adata.n_obs / dt:.0f} cells/s on {params['device']}")
    xs = tl.evaluate_clustering(adata, labels_key="cell_type", use_rep="X_xtrimo")
    base = pca_baseline(adata)
    ps = tl.evaluate_clustering(base, labels_key="cell_type", use_rep="X_pca")
    print("\nLeiden clustering at the number of labelled types (paper appendix 4):")
    print(f"{'embedding':<22}{'ARI':>7}{'NMI':>7}{'HOMO':>7}{'CP':>7}{'SIL':>7}")
    for name, s in (("xTrimoGene (X_xtrimo)", xs), ("PCA baseline (X_pca)", ps)):
        print(f"{name:<22}{s['ari']:7.3f}{s['nmi']:7.3f}{s['homogeneity']:7.3f}{s['completeness']:7.3f}{s['silhouette']:7.3f}")
    ax = pl.embedding(adata, color=["cell_type", "leiden_X_xtrimo"], show=False, wspace=0.5)
    fig = (ax[0] if isinstance(ax, list) else ax).figure
    png = out / "pbmc3k_xtrimo_umap.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"\nUMAP saved to {png}")
    if args.save_h5ad:
        adata.write_h5ad(out / "pbmc3k_xtrimo.h5ad", compression="gzip")
    sc.settings.verbosity = 1
    return 0


# flags of `scxtrimo pretrain` -> tl.pretrain keyword names (None: not given on the command line)
_PRETRAIN_FLAGS = {
    "data": "data", "config": "config", "out": "save_dir", "max_steps": "max_steps", "epochs": "epochs",
    "max_time": "max_time", "batch_size": "batch_size", "lr": "lr", "weight_decay": "weight_decay",
    "warmup_steps": "warmup_steps", "grad_clip": "grad_clip", "grad_accum_steps": "grad_accum_steps",
    "strategy": "strategy", "activation_checkpointing": "activation_checkpointing", "save_every": "save_every",
    "eval_every": "eval_every", "eval_cells": "eval_cells", "device": "device", "seed": "random_state",
    "block_cells": "block_cells", "gene_symbols": "gene_symbols", "resume": "resume", "resume_from": "resume_from",
    "min_genes": "min_genes",
}


def read_run_config(path: str | Path) -> dict:
    """Read a pretraining run file: YAML (``.yaml``/``.yml``) or JSON, a mapping whose keys are
    :func:`scxtrimo.tl.pretrain` keyword names plus ``data`` (a path or a list of paths).

    ``config`` may be a configuration name or a mapping of
    :class:`~scxtrimo.models.XTrimoGeneConfig` fields; ``masking`` and ``thinning`` mappings of
    :class:`~scxtrimo.data.MaskingConfig` and :class:`~scxtrimo.data.ThinningConfig` fields.

    Raises
    ------
    ValueError
        The file is not a mapping, or has keys that are not ``tl.pretrain`` parameters.
    """
    import inspect
    import json

    from . import tl

    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".json":
        raw = json.loads(text)
    else:
        import yaml

        raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a mapping of tl.pretrain keyword names to values.")
    known = set(inspect.signature(tl.pretrain).parameters) - {"model", "callback", "progress"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; valid keys are the tl.pretrain parameters {sorted(known)}.")
    return raw


def _pretrain_kwargs(raw: dict) -> dict:
    from .data import MaskingConfig, ThinningConfig
    from .models import XTrimoGeneConfig

    kw = dict(raw)
    if isinstance(kw.get("config"), dict):
        kw["config"] = XTrimoGeneConfig.from_dict(kw["config"])
    if isinstance(kw.get("masking"), dict):
        kw["masking"] = MaskingConfig(**kw["masking"])
    if isinstance(kw.get("thinning"), dict):
        kw["thinning"] = ThinningConfig(**kw["thinning"])
    if isinstance(kw.get("data"), (str, Path)):
        kw["data"] = [kw["data"]]
    return kw


def _pretrain(args) -> int:
    import os

    from . import tl

    raw = read_run_config(args.run_config) if args.run_config else {}
    for flag, key in _PRETRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None and value is not False:
            raw[key] = value
    if not raw.get("data"):
        raise ValueError("no input: give .h5ad files with --data (or `data:` in the run file).")
    kw = _pretrain_kwargs(raw)
    data = kw.pop("data")
    rank = int(os.environ.get("RANK", "0"))
    log_every = args.log_every

    def log(info: dict) -> None:
        if log_every and info["step"] % log_every == 0:
            print(f"step {info['step']} loss {info['loss']:.5f} lr {info['lr']:.3g} "
                  f"elapsed {info['elapsed_s']:.1f}s", flush=True)

    model, history = tl.pretrain(data, progress=not args.quiet, callback=log, **kw)
    if rank == 0:
        last = history.iloc[-1]
        test = history.attrs.get("test", {})
        where = f" -> {kw['save_dir']}" if kw.get("save_dir") else ""
        print(f"pretrained {model.config.name} for {int(last['step'])} steps on {model.metadata['cells']} cells "
              f"(world size {model.metadata['world_size']}): val MSE {last['val_mse']:.4f}, "
              f"test MSE {test.get('mse', float('nan')):.4f}{where}", flush=True)
    return 0


def _corpus(args) -> int:
    from .data._corpus import pack_corpus

    paths = [p for p in args.inputs if not any(x in Path(p).name for x in args.exclude)]
    if not paths:
        raise ValueError("No input file is left after --exclude.")
    info = pack_corpus(paths, args.output, min_genes=args.min_genes, labels_key=args.labels_key,
                       random_state=args.seed, progress=not args.quiet)
    print(f"packed {info['cells']} cells ({info['nnz']} non-zeros, {info['n_clipped']} counts clipped at 65,535) "
          f"from {len(paths)} files into {args.output}: {info['bytes'] / 2**20:.1f} MiB")
    for row in info["sources"]:
        print(f"  {row['source']}: {row['cells']} cells (train {row['train']}, validation {row['validation']}, "
              f"test {row['test']})")
    return 0


def _convert(args) -> int:
    import torch

    from .models import load

    t = time.perf_counter()
    model = load(args.checkpoint, part=args.part)
    folder = model.save(args.output, dtype=torch.float16 if args.float16 else torch.float32, metadata=model.metadata)
    print(f"converted sub-model {args.part!r} of {args.checkpoint} (sha256 {model.checkpoint_sha256[:12]}..., "
          f"{model.n_parameters():,} parameters) into {folder} in {time.perf_counter() - t:.1f} s. "
          f"Load it with scxtrimo.models.load({str(folder)!r}).")
    print("The weights are under the scFoundation License (non-commercial research use only): do not "
          "redistribute the converted folder.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(prog="scxtrimo", description="xTrimoGene cell embeddings for AnnData files.")
    p.add_argument("--version", action="version", version=f"scxtrimo {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("embed", help="embed the cells of an .h5ad file into obsm['X_xtrimo']; works under torchrun",
                       description="Embed the cells of an .h5ad file. Sharded over processes: "
                                   "torchrun --nproc_per_node=N -m scxtrimo.cli embed IN OUT (rank 0 writes OUT).")
    e.add_argument("input", help="input .h5ad: raw counts (or normalized) with gene symbols")
    e.add_argument("output", help="output .h5ad (the input plus the embedding)")
    e.add_argument("--model", default="xtrimo-3m", help="checkpoint name or folder (default: xtrimo-3m, bundled)")
    e.add_argument("--batch-size", type=int, default=None, help="most cells per batch (default: 1 on CPU, 256 on CUDA)")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.add_argument("--pooling", default=None, choices=["max", "mean", "all"],
                   help="default: the checkpoint's own choice (the bundled xtrimo-3m: mean), else max")
    e.add_argument("--target-depth", type=float, default=4.0, help="depth-token models: the target depth T (default 4)")
    e.add_argument("--target-depth-mode", default="fixed", choices=["fixed", "scale", "offset"])
    e.add_argument("--bulk", default=None, choices=["counts", "normalized"],
                   help="bulk RNA-seq samples with the authors' conventions (see scxtrimo.tl.embed)")
    e.add_argument("--key-added", default="X_xtrimo")
    e.add_argument("--gene-symbols", default=None, help="var column with gene symbols if var_names are not symbols")
    e.set_defaults(func=_embed)

    d = sub.add_parser("demo", help="embed the bundled PBMC 3k, cluster, compare with PCA, save a UMAP")
    d.add_argument("--out-dir", default="scxtrimo_demo")
    d.add_argument("--model", default="xtrimo-3m")
    d.add_argument("--device", default="auto")
    d.add_argument("--save-h5ad", action="store_true", help="also write the embedded AnnData")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_demo)

    t = sub.add_parser(
        "pretrain", help="pretrain xTrimoGene on .h5ad files (streamed); works under torchrun",
        description="Pretrain xTrimoGene (scxtrimo.tl.pretrain). Settings come from RUN_CONFIG (YAML or JSON, "
                    "keys = tl.pretrain keyword names plus `data`) and/or the flags below; flags win. "
                    "Data-parallel: torchrun --nproc_per_node=N -m scxtrimo.cli pretrain ...",
    )
    t.add_argument("run_config", nargs="?", default=None, help="YAML/JSON run file (optional)")
    t.add_argument("--data", nargs="+", default=None, help=".h5ad files (streamed in blocks)")
    t.add_argument("--config", default=None, help="architecture: xtrimo-3m, xtrimo-10m or xtrimo-100m")
    t.add_argument("--out", default=None, help="save_dir: model files, history.csv and train_state.pt")
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--epochs", type=float, default=None)
    t.add_argument("--max-time", type=float, default=None, help="seconds")
    t.add_argument("--batch-size", type=int, default=None, help="global batch (all ranks, all micro-batches)")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--warmup-steps", type=int, default=None)
    t.add_argument("--grad-clip", type=float, default=None)
    t.add_argument("--grad-accum-steps", type=int, default=None)
    t.add_argument("--strategy", default=None, choices=["auto", "ddp", "fsdp"])
    t.add_argument("--activation-checkpointing", action="store_true", default=None)
    t.add_argument("--save-every", type=int, default=None)
    t.add_argument("--eval-every", type=int, default=None)
    t.add_argument("--eval-cells", type=int, default=None)
    t.add_argument("--min-genes", type=int, default=None)
    t.add_argument("--block-cells", type=int, default=None)
    t.add_argument("--gene-symbols", default=None)
    t.add_argument("--device", default=None, help="auto, cpu or cuda")
    t.add_argument("--seed", type=int, default=None, help="random_state")
    t.add_argument("--resume", action="store_true", default=None, help="continue from OUT/train_state.pt")
    t.add_argument("--resume-from", default=None, help="continue from this train_state.pt (file or folder)")
    t.add_argument("--log-every", type=int, default=0, help="print a line every N steps (rank 0)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_pretrain)

    c = sub.add_parser("corpus", help="pack .h5ad files into one compact pretraining corpus (.xtc)",
                       description="Pack the cells of .h5ad files (aligned to the reference genes, more than 200 "
                                   "expressed genes) into one lzma-compressed corpus that scripts/train_device.py "
                                   "reads without anndata.")
    c.add_argument("output", help="the corpus file to write (.xtc)")
    c.add_argument("inputs", nargs="+", help=".h5ad files of counts with gene symbols")
    c.add_argument("--exclude", nargs="*", default=[], help="skip inputs whose file name contains any of these")
    c.add_argument("--min-genes", type=int, default=201)
    c.add_argument("--labels-key", default="cell_type")
    c.add_argument("--seed", type=int, default=0, help="seeds the 96:2:2 split")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_corpus)

    v = sub.add_parser("convert", help="convert the authors' scFoundation models.ckpt into an scxtrimo checkpoint folder",
                       description="Read one sub-model of the authors' released xTrimoGene-100M file (models.ckpt, "
                                   "restricted unpickling, every tensor checked) and write it as an scxtrimo checkpoint "
                                   "folder (config.json, model.safetensors, genes.txt), so the pickle is read once.")
    v.add_argument("checkpoint", help="the authors' models.ckpt")
    v.add_argument("output", help="the folder to write")
    v.add_argument("--part", default="cell", choices=["cell", "rde", "gene"],
                   help="cell (cell embeddings, default), rde (read-depth enhancement) or gene (gene-context embeddings)")
    v.add_argument("--float16", action="store_true", help="store the weights as float16 (half the size)")
    v.set_defaults(func=_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"scxtrimo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
