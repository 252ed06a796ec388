"""Issue 14: score a device run's checkpoint on the GPU machine, so that the publish decision
waits for Leiden only (seconds per seed here), not for two and a half hours of CPU embedding.

Three steps:

``pack`` (here, once per corpus): where the cells the embedding-quality benchmark scores
(``embedding_quality.benchmark_sets``, with its ``--subsample cellbench=400``) and
``annotate.py``'s cellbench cells sit in the training corpus that travels anyway, plus the
counts of the few it lacks (0.25 MB, where the sets' own counts would take 10 MB of the 64 MiB a
call carries; NumPy only), checked to give exactly the model input the benchmark builds from
the AnnData::

    python benchmarks/device_eval.py pack --out runs/eval_sets.npz --corpus runs/corpus.xtc

``run`` (on the device, after ``scripts/train_device.py merge``; ``benchmarks/device.sh train``
does both when ``runs/eval_sets.npz`` travels): held-out masked-value recovery
(``masked_recovery.recovery_row``, 256 test cells of the corpus, full-length decoder) in float32
without TF32 (``scxtrimo._device.full_precision``: scored like the CPU rows), and the embeddings
of every set at ``tl.embed``'s target depth (``pooled_variants``; :data:`KEEP`): mean and max
pooling in float32, mean pooling once more under bf16 autocast (what ``tl.embed`` computes on a
GPU), into ``eq_embeddings-<k>.npz`` files of at most 15 MiB (two for xtrimo-10m: the call
returns at most 8 files); the recovery and the timings are merged into ``result.json``::

    python benchmarks/device_eval.py run --model /tmp/merged --sets runs/eval_sets.npz \\
        --corpus runs/corpus.xtc --out $OUT

``unpack`` (here, after ``scripts/train_device.py merge FILES_AT runs/NAME``): the float32
embeddings into embedding_quality's cache, under its keys, once the merged folder's sha256 is
checked to be the one the device embedded; prints how close bf16 came::

    python benchmarks/device_eval.py unpack FILES_AT/eq_embeddings-*.npz --model runs/NAME --cache runs/eq_cache
    python benchmarks/embedding_quality.py --models runs/NAME --subsample cellbench=400 --baselines factors pca \\
        --cache runs/eq_cache

(``unpack --precision bf16 --cache runs/eq_cache_bf16`` and the same scoring with that cache:
the clusters of ``tl.embed`` on a GPU against the float32 ones.)

``--smoke`` (``run``) limits each set to its first 4 cells and the recovery to 2 cells.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's modules, however the script is loaded

from pooled_variants import cache_name, default_variant, depths, variants  # noqa: E402

EMBEDDINGS = "eq_embeddings-{}.npz"  # numbered: each at most FILE_BYTES
#: The device returns at most 8 files of 16 MiB; the training call's own take 6. What is kept of
#: each set's embeddings (at tl.embed's target depth, T = 4) and how it is stored: the float32
#: mean pooling (the bundled checkpoint's, and the publish decision's) exactly; the max pooling
#: (the paper's) and the bf16 mean (tl.embed on a GPU) as float16 (relative rounding 5e-4).
#: xtrimo-10m: 12.1 + 6.0 + 6.0 MB for the five sets, plus 1.1 MB for annotate.py's cellbench.
KEEP = {("fp32", "mean"): np.float32, ("fp32", "max"): np.float16, ("bf16", "mean"): np.float16}
FILE_BYTES = 15 * 2**20
SUBSAMPLE = {"cellbench": 400}  # embedding_quality.py --subsample cellbench=400, as every table uses
#: the training corpus's source (file stem) of each benchmark set
SOURCES = {"pbmc3k": "pbmc3k", "zheng_fasttopics": "zheng2017_sorted_pbmc_fasttopics",
           "zheng_mudan": "zheng2017_sorted_pbmc_mudan", "cellbench": "cellbench_lung_celllines",
           "crc": "crc_scmetalink_2850"}
#: benchmarks/annotate.py's cellbench cells (all 1,070 non-doublets; the deep cells that make its
#: CPU embedding slow), as it reads them: the float32 mean pooling only. (Its pbmc3k cells are the
#: set above; its 2,140 sorted PBMC are shallow and take minutes here.)
ANNOTATE_SETS = {"annotate_cellbench": "cellbench_lung_celllines"}


def annotate_sets() -> dict:
    """name -> AnnData of the cells benchmarks/annotate.py embeds (besides pbmc3k)."""
    import annotate

    return {name: annotate.read_task_set(name) for name in ANNOTATE_SETS}


# ---- pack (here) -----------------------------------------------------------------------------
def corpus_sha256(path: str | Path) -> str:
    from scxtrimo.models._io import sha256_file

    return sha256_file(path)


def eval_sets(pack_path: str | Path, corpus, corpus_path: str | Path):
    """The benchmark's cells as a :class:`~scxtrimo.data._corpus.Corpus` (one source per data
    set, in the benchmark's order): rows of ``corpus`` (the training corpus, whose sha256 the pack
    names) and the pack's own counts of the cells the corpus lacks."""
    import scipy.sparse as sp

    from scxtrimo.data._corpus import Corpus

    with np.load(pack_path, allow_pickle=False) as a:
        if str(a["corpus_sha256"]) != corpus_sha256(corpus_path):
            raise ValueError(f"{pack_path} was packed against another corpus than {corpus_path}: pack it again "
                             "(python benchmarks/device_eval.py pack).")
        names = [str(x) for x in a["sets"]]
        blocks, obs, source = [], [], []
        for i, name in enumerate(names):
            rows = a[f"rows_{i}"]
            extra = sp.csr_matrix((a[f"extra_counts_{i}"], a[f"extra_indices_{i}"].astype(np.int32),
                                   a[f"extra_indptr_{i}"]), shape=(int((rows < 0).sum()), corpus.counts.shape[1]))
            order = np.empty(len(rows), dtype=np.int64)  # corpus rows first, then the extra cells
            order[rows >= 0] = np.arange(int((rows >= 0).sum()))
            order[rows < 0] = int((rows >= 0).sum()) + np.arange(extra.shape[0])
            both = sp.vstack([corpus.counts[rows[rows >= 0]], extra], format="csr")
            blocks.append(both[order])
            obs.append(a[f"obs_names_{i}"].astype(str))
            source.append(np.full(len(rows), i, dtype=np.int16))
    C = sp.vstack(blocks, format="csr")
    C.sort_indices()
    n = C.shape[0]
    return Corpus(counts=C, total=np.asarray(C.sum(axis=1), dtype=np.float64).ravel(), source=np.concatenate(source),
                  sources=names, label=np.full(n, -1, dtype=np.int16), label_names=[], split=np.zeros(n, dtype=np.int8),
                  obs_names=np.concatenate(obs))


def write_pack(out: Path, corpus, corpus_path: str | Path, sets: dict) -> dict[str, int]:
    """Write ``sets`` (name -> ``(counts, obs_names, corpus source)``: CSR counts on the
    reference genes) into ``out`` as rows of ``corpus`` (read from ``corpus_path``) where it
    holds a cell of that name and source with the very same counts, else as the pack's own
    counts; returns the number of such cells per set."""
    arrays = {"sets": np.asarray(list(sets)), "corpus_sha256": np.asarray(corpus_sha256(corpus_path))}
    missing = {}
    for i, (name, (C, names, source)) in enumerate(sets.items()):
        C = C.tocsr(copy=True)
        C.sort_indices()
        in_source = corpus.rows(source=source) if source in corpus.sources else np.zeros(0, dtype=np.int64)
        where = dict(zip(corpus.obs_names[in_source], in_source))
        rows = np.full(len(names), -1, dtype=np.int64)
        for j, n in enumerate(names):
            r = where.get(n)
            if r is not None:
                a, b = corpus.counts[r], C[j]
                if np.array_equal(a.indices, b.indices) and np.array_equal(a.data, b.data):
                    rows[j] = r
        extra = C[np.flatnonzero(rows < 0)]
        arrays |= {f"rows_{i}": rows, f"obs_names_{i}": np.asarray(names, dtype=str),
                   f"extra_indptr_{i}": extra.indptr.astype(np.int64),
                   f"extra_indices_{i}": extra.indices.astype(np.uint16), f"extra_counts_{i}": extra.data.astype(np.float32)}
        missing[name] = int((rows < 0).sum())
    tmp = out.with_name(f".{out.name}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out)
    return missing


def pack(out: Path, corpus_path: str, subsample: dict[str, int]) -> dict:
    """Write the benchmark's cells into ``out`` (:func:`write_pack`), then check that they give
    the model input the benchmark computes."""
    import scipy.sparse as sp

    import embedding_quality as eq
    from pooled_variants import DEPTHS
    from scxtrimo.data._corpus import load_corpus
    from scxtrimo.data._prepare import counts_rows, iter_log1p_blocks, prepare_input

    sets = eq.benchmark_sets(subsample=subsample) | {name: (a, None) for name, a in annotate_sets().items()}
    sources = SOURCES | ANNOTATE_SETS
    counts = {name: (counts_rows(prepare_input(adata), 0, adata.n_obs), np.asarray(adata.obs_names, dtype=str),
                     sources[name]) for name, (adata, _) in sets.items()}
    corpus = load_corpus(corpus_path)
    for name, n in write_pack(out, corpus, corpus_path, counts).items():
        print(f"{name}: {sets[name][0].n_obs} cells, {n} not in the corpus", flush=True)
    packed = eval_sets(out, corpus, corpus_path)
    for name, (adata, _) in sets.items():
        rows = packed.rows(source=name)
        if list(packed.obs_names[rows]) != list(adata.obs_names.astype(str)):
            raise AssertionError(f"{name}: the packed cells are not the benchmark's")
        prep = prepare_input(adata)
        for depth in [None, *DEPTHS]:
            want = sp.vstack([b for _, _, b in iter_log1p_blocks(prep, depth=depth)], format="csr")
            got = packed.model_input(rows, depth=depth)
            want.sort_indices()
            got.sort_indices()
            if not (np.array_equal(want.indptr, got.indptr) and np.array_equal(want.indices, got.indices)):
                raise AssertionError(f"{name}, depth {depth}: other tokens than the benchmark's model input")
            err = float(np.abs(want.data - got.data).max()) if want.nnz else 0.0
            if err > 1e-5:
                raise AssertionError(f"{name}, depth {depth}: values differ from the benchmark's by up to {err}")
    print("every set gives the benchmark's model input (no depth tokens, T = 4, T = S)", flush=True)
    return {"bytes": out.stat().st_size, "cells": len(packed), "nnz": int(packed.counts.nnz)}


# ---- run (device) ----------------------------------------------------------------------------
def run(model_dir: str, sets_path: str, corpus_path: str, out: Path, *, smoke: bool = False) -> dict:
    """Recovery and embeddings of the checkpoint folder ``model_dir``; writes :data:`EMBEDDINGS`
    into ``out`` and merges a summary into ``out/result.json``."""
    from masked_recovery import recovery_row
    from scxtrimo._device import full_precision
    from scxtrimo.data._corpus import load_corpus
    from scxtrimo.models import load

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load(model_dir, device=dev)
    sha = model.checkpoint_sha256
    summary: dict = {"sha256": sha, "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"}
    corpus = load_corpus(corpus_path)
    sets = eval_sets(sets_path, corpus, corpus_path)
    t = time.perf_counter()
    with full_precision():
        summary["masked_recovery_fp32"] = recovery_row(model, corpus, cells=2 if smoke else 256, device=dev)
    print(f"masked recovery ({time.perf_counter() - t:.1f} s): {json.dumps(summary['masked_recovery_fp32'])}", flush=True)
    arrays, timing = {}, {}
    depth = depths(model)[0]  # tl.embed's default target depth (T = 4), or none
    for name in sets.sources:
        rows = sets.rows(source=name)[: 4 if smoke else None]
        inputs = {depth: sets.model_input(rows, depth=depth)}
        key = cache_name(name, len(rows), sha)
        keep = {("fp32", "mean"): np.float32} if name in ANNOTATE_SETS else KEEP
        for precision in sorted({p for p, _ in keep}, reverse=True):  # fp32 first
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            if precision == "fp32":
                with full_precision():
                    emb = variants(model, inputs, dev)
            else:
                emb = variants(model, inputs, dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            timing[f"{name} {precision}"] = round(time.perf_counter() - t, 2)
            arrays.update({f"{precision}|{key}|{default_variant(model, v)}": emb[default_variant(model, v)].astype(dtype)
                           for (p, v), dtype in keep.items() if p == precision})
        print(f"{name}: {len(rows)} cells embedded ({', '.join(f'{k.split()[-1]} {v} s' for k, v in timing.items() if k.startswith(name + ' '))})",
              flush=True)
    summary["embedding_files"] = [p.name for p in write_split(arrays, out)]
    summary["embedding_seconds"] = timing
    result = out / "result.json"
    merged = json.loads(result.read_text()) if result.exists() else {}
    result.write_text(json.dumps({**merged, "device_eval": summary}, indent=2, default=str) + "\n")
    return summary


def write_split(arrays: dict[str, np.ndarray], out: Path, limit: int = FILE_BYTES) -> list[Path]:
    """``arrays`` into ``out/eq_embeddings-<k>.npz`` files of at most ``limit`` bytes of array
    data each (an array larger than ``limit`` gets a file of its own), in key order."""
    files, current, size = [], {}, 0
    for k in sorted(arrays):
        if current and size + arrays[k].nbytes > limit:
            files.append(current)
            current, size = {}, 0
        current[k] = arrays[k]
        size += arrays[k].nbytes
    if current:
        files.append(current)
    paths = []
    for i, part in enumerate(files, 1):
        paths.append(out / EMBEDDINGS.format(i))
        np.savez(paths[-1], **part)
    if len(paths) > 2:
        print(f"warning: {len(paths)} embedding files; with the training call's 6 files only 2 come back", flush=True)
    return paths


# ---- unpack (here) ---------------------------------------------------------------------------
def unpack(npz: str | list[str], cache: Path, model_dir: str | None = None, precision: str = "fp32") -> list[Path]:
    """The ``precision`` (float32 or bf16) embeddings of the file(s) ``npz`` into ``cache`` as
    embedding_quality.py keys them, as float32 (bf16 ones belong in a cache of their own: same
    keys)."""
    by_key: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for path in [npz] if isinstance(npz, (str, Path)) else npz:
        with np.load(path) as data:
            for k in data.files:
                kind, key, variant = k.split("|")
                by_key.setdefault((kind, key), {})[variant] = data[k].astype(np.float32)
    if model_dir is not None:
        from scxtrimo.models import load

        sha = load(model_dir).checkpoint_sha256[:16]
        other = {key.rsplit("_", 1)[1] for _, key in by_key} - {sha}
        if other:
            raise ValueError(f"{npz} hold embeddings of the checkpoint {sorted(other)}, not of {model_dir} ({sha}): "
                             "merge the returned shards with scripts/train_device.py merge first.")
    cache.mkdir(parents=True, exist_ok=True)
    written = []
    for (kind, key), emb in sorted(by_key.items()):
        if kind != precision:
            continue
        path = cache / f"{key}.npz"
        np.savez(path, **emb)
        written.append(path)
        other = by_key.get(("bf16" if kind == "fp32" else "fp32", key), {})
        cos = {v: float(np.mean(np.sum(e * other[v], 1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(other[v], axis=1))))
               for v, e in emb.items() if v in other}
        print(f"{path}: {', '.join(emb)}; bf16 against fp32, mean cosine: "
              + ", ".join(f"{v} {c:.5f}" for v, c in cos.items()), flush=True)
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="pack the benchmark's cells (here)")
    p.add_argument("--out", default="runs/eval_sets.npz")
    p.add_argument("--corpus", default="runs/corpus.xtc")
    r = sub.add_parser("run", help="masked recovery and embeddings of a checkpoint folder (device)")
    r.add_argument("--model", required=True)
    r.add_argument("--sets", default="runs/eval_sets.npz")
    r.add_argument("--corpus", default="runs/corpus.xtc")
    r.add_argument("--out", required=True)
    r.add_argument("--smoke", action="store_true")
    u = sub.add_parser("unpack", help="the device's float32 embeddings into embedding_quality's cache (here)")
    u.add_argument("npz", nargs="+", help="the returned eq_embeddings-*.npz files")
    u.add_argument("--model", default=None, help="the merged checkpoint folder, whose sha256 must match")
    u.add_argument("--cache", default="runs/embq_cache")
    u.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="which embeddings (bf16: what tl.embed computes on a GPU; give them a cache of their own "
                        "and score them with embedding_quality.py --cache that folder)")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        print(json.dumps(pack(Path(args.out), args.corpus, SUBSAMPLE)))
    elif args.cmd == "run":
        run(args.model, args.sets, args.corpus, Path(args.out), smoke=args.smoke)
    else:
        unpack(args.npz, Path(args.cache), args.model, args.precision)


if __name__ == "__main__":
    main()
