"""Command line: ``scxtrimo embed IN.h5ad OUT.h5ad``, ``scxtrimo demo``, ``scxtrimo pretrain``, ``scxtrimo corpus``
and ``scxtrimo convert models.ckpt OUT_DIR`` (the authors' released weights into a checkpoint folder).

``scxtrimo embed`` and ``scxtrimo pretrain`` work alone and under ``torchrun --nproc_per_node=N -m scxtrimo.cli
embed|pretrain ...`` (sharded embedding, see :func:`scxtrimo.tl.embed`; data-parallel training, see
:func:`scxtrimo.tl.pretrain`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import typing
from functools import partial
from pathlib import Path

from ._bundled import DEFAULT_CHECKPOINT


def _read_h5ad(path):
    """``anndata.read_h5ad``, with an error that names the file when it is not an .h5ad file."""
    import anndata as ad

    from ._paths import check_h5ad_files

    check_h5ad_files(path)
    return ad.read_h5ad(path)


def _embed(args) -> int:
    from . import tl
    from ._paths import check_output_file, write_h5ad_atomic

    check_output_file(args.output)
    adata = _read_h5ad(args.input)
    t = time.perf_counter()
    tl.embed(adata, model=args.model, batch_size=args.batch_size, device=args.device, pooling=args.pooling,
             key_added=args.key_added, gene_symbols=args.gene_symbols, layer=args.layer, use_raw=args.use_raw,
             target_depth=args.target_depth,
             target_depth_mode=args.target_depth_mode, bulk=args.bulk)
    dt = time.perf_counter() - t
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun every rank holds the result; one writes
        return 0
    write_h5ad_atomic(adata, args.output, compression="gzip")  # OUT may be IN
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
    from ._paths import check_output_dir

    check_output_dir(args.out_dir)
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
    "block_cells": "block_cells", "gene_symbols": "gene_symbols", "layer": "layer", "use_raw": "use_raw", "resume": "resume", "resume_from": "resume_from",
    "min_genes": "min_genes", "model": "model",
}


def read_run_config(path: str | Path) -> dict:
    """Read a pretraining run file: YAML (``.yaml``/``.yml``) or JSON, a mapping whose keys are
    :func:`scxtrimo.tl.pretrain` keyword names (all but ``callback`` and ``progress``) plus ``data``
    (a path or a list of paths). ``model`` names a checkpoint to continue (a name such as
    ``xtrimo-3m`` or a folder).

    Values are checked against ``tl.pretrain``'s annotations before any data is read. A string
    that reads as a number is taken as one where a number is expected: PyYAML (YAML 1.1) reads
    ``1e-4`` (no dot) as a string. ``config`` may be a configuration name or a mapping of
    :class:`~scxtrimo.models.XTrimoGeneConfig` fields that override a preset: the preset its
    ``name`` names, else ``"xtrimo-3m"``. The result is named after the preset and the fields
    that differ from it (``{dropout: 0.1}``: ``"xtrimo-3m+dropout=0.1"``), or keeps a ``name``
    that is not a preset's. ``masking`` and ``thinning`` are mappings of
    :class:`~scxtrimo.data.MaskingConfig` and :class:`~scxtrimo.data.ThinningConfig` fields.

    Returns
    -------
    dict
        ``tl.pretrain`` keyword arguments (``config``, ``masking``, ``thinning`` as objects) and ``data``.

    Raises
    ------
    ValueError
        The file is not valid YAML / JSON or not a mapping; keys that are not ``tl.pretrain``
        parameters; a value of the wrong type (the error names the key); a ``config``,
        ``masking`` or ``thinning`` mapping with unknown or invalid fields; a ``model`` that is
        not a string.
    """
    import inspect
    import json

    import yaml

    from . import tl
    from .data import MaskingConfig, ThinningConfig

    path = Path(path)
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"{path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a mapping of tl.pretrain keyword names to values.")
    known = set(inspect.signature(tl.pretrain).parameters) - {"callback", "progress"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; valid keys are the tl.pretrain parameters {sorted(known)}.")
    hints = typing.get_type_hints(tl.pretrain)
    kw = {key: _run_value(path, key, value, hints.get(key, object)) for key, value in raw.items()}
    data = kw.get("data", [])  # or from --data
    if not (isinstance(data, str) or isinstance(data, list) and all(isinstance(d, str) for d in data)):
        raise ValueError(f"{path}: `data` must be an .h5ad path or a list of them, got {data!r}.")
    if "model" in kw and not (kw["model"] is None or isinstance(kw["model"], str)):
        raise ValueError(f"{path}: `model` must be a checkpoint name or folder to continue (e.g. {DEFAULT_CHECKPOINT}), "
                         f"got {kw['model']!r}.")
    if "config" in kw and not isinstance(kw["config"], str):
        kw["config"] = _run_model_config(path, kw["config"])
    for key, cls in (("masking", MaskingConfig), ("thinning", ThinningConfig)):
        if kw.get(key) is not None:
            kw[key] = _run_build(path, key, kw[key], partial(cls, **_run_fields(path, key, cls, kw[key])))
    return kw


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", os.PathLike: "a path",
          type(None): "null"}


def _run_value(path, key: str, value, hint):
    """A run-file value as its annotation ``hint`` asks (int, float, bool, str, or these or ``None``).

    Other annotations (``data``, ``config``, ``masking``, ``thinning``) are checked by the caller.
    """
    kinds = set(typing.get_args(hint)) or {hint}
    if not kinds <= set(_KINDS):
        return value
    if (value is None and type(None) in kinds or isinstance(value, bool) and bool in kinds
            or isinstance(value, str) and kinds & {str, os.PathLike}):
        return value
    if kinds & {int, float} and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            number = None
        if float in kinds and number is not None:
            return number
        if int in kinds and number is not None and float(number).is_integer():
            return int(number)
    wanted = " or ".join(_KINDS[k] for k in _KINDS if k in kinds)
    raise ValueError(f"{path}: `{key}` must be {wanted}, got {value!r}.")


def _run_fields(path, key: str, cls, value) -> dict:
    """The fields of a run-file mapping for the dataclass ``cls``, each as its annotation asks."""
    if not isinstance(value, dict):
        raise ValueError(f"{path}: `{key}` must be a mapping of {cls.__name__} fields, got {value!r}.")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"{path}: `{key}` has unknown fields {unknown}; {cls.__name__} has {names}.")
    hints = typing.get_type_hints(cls)
    return {name: _run_value(path, f"{key}.{name}", v, hints[name]) for name, v in value.items()}


def _run_build(path, key: str, value, build):
    """``build()``, with its errors naming the run file, the key and its ``value``."""
    try:
        return build()
    except (TypeError, ValueError, ZeroDivisionError) as err:
        raise ValueError(f"{path}: `{key}` {value} is not valid: {err}") from None


def _run_model_config(path, value):
    """A ``config:`` mapping as a model configuration: a preset with the mapping's fields in place."""
    from .models._config import CONFIGS, XTrimoGeneConfig

    if not isinstance(value, dict):
        raise ValueError(f"{path}: `config` must be a configuration name or a mapping of XTrimoGeneConfig fields, "
                         f"got {value!r}.")
    fields = _run_fields(path, "config", XTrimoGeneConfig, value)
    name = fields.get("name", "xtrimo-3m")
    base = CONFIGS.get(name, CONFIGS["xtrimo-3m"])
    changed = [f"{k}={v}" for k, v in fields.items() if k != "name" and getattr(base, k) != v]
    if name in CONFIGS and changed:  # the preset's name alone would misdescribe the model
        fields["name"] = f"{name}+{','.join(changed)}"
    # dataclasses.replace checks the result as XTrimoGeneConfig(...) would (e.g. enc_heads=0: modulo by zero)
    return _run_build(path, "config", value, partial(dataclasses.replace, base, **fields))


def _pretrain_kwargs(raw: dict) -> dict:
    kw = dict(raw)
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
    e.add_argument("--model", default=DEFAULT_CHECKPOINT,
                   help=f"checkpoint name or folder (default: {DEFAULT_CHECKPOINT}, bundled)")
    e.add_argument("--batch-size", type=int, default=None, help="most cells per batch (default: 1 on CPU, 256 on CUDA)")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.add_argument("--pooling", default=None, choices=["max", "mean", "all"],
                   help="default: the checkpoint's own choice (the model card says which), else max")
    e.add_argument("--target-depth", type=float, default=4.0, help="depth-token models: the target depth T (default 4)")
    e.add_argument("--target-depth-mode", default="fixed", choices=["fixed", "scale", "offset"])
    e.add_argument("--bulk", default=None, choices=["counts", "normalized"],
                   help="bulk RNA-seq samples with the authors' conventions (see scxtrimo.tl.embed)")
    e.add_argument("--key-added", default="X_xtrimo")
    e.add_argument("--gene-symbols", default=None, help="var column with gene symbols if var_names are not symbols")
    e.add_argument("--layer", default=None,
                   help="layers key of the counts to read (default: layers['counts'] if present, else X)")
    e.add_argument("--use-raw", action="store_true", help="read the counts from raw.X (genes: raw.var)")
    e.set_defaults(func=_embed)

    d = sub.add_parser("demo", help="embed the bundled PBMC 3k, cluster, compare with PCA, save a UMAP")
    d.add_argument("--out-dir", default="scxtrimo_demo")
    d.add_argument("--model", default=DEFAULT_CHECKPOINT)
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
    t.add_argument("--model", default=None,
                   help=f"continue this checkpoint (a name such as {DEFAULT_CHECKPOINT}, or a folder) instead of a new model")
    t.add_argument("--out", "--save-dir", dest="out", default=None,
                   help="save_dir: model files, history.csv and train_state.pt")
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
    t.add_argument("--layer", default=None, help="layers key of the counts (default: layers['counts'] if present, else X)")
    t.add_argument("--use-raw", action="store_true", default=None, help="read the counts from raw.X (genes: raw.var)")
    t.add_argument("--device", default=None, help="auto, cpu or cuda")
    t.add_argument("--seed", "--random-state", dest="seed", type=int, default=None, help="random_state")
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
    c.add_argument("--seed", "--random-state", dest="seed", type=int, default=0, help="random_state: seeds the 96:2:2 split")
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
    except (ValueError, KeyError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
        print(f"scxtrimo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
