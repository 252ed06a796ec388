"""Embedding-quality benchmark (issue: a pretrained model whose embeddings beat PCA), run by hand.

The paper's clustering protocol (appendix 4, ``scxtrimo.tl.evaluate_clustering``: kNN graph,
Leiden with the resolution bisected to the number of labelled types, ARI / NMI / homogeneity /
completeness / silhouette), plus ``depth_r2`` (how much of the embedding two depth numbers per
cell explain linearly), on every labelled shared data set, for several Leiden seeds:

* pbmc3k (8 types);
* Zheng 2017 FACS-sorted PBMC, fastTopics subsample (10 types) and MUDAN subsample (9 types;
  the 127 cells it shares with the fastTopics set are dropped from it);
* cellbench lung cell lines (5 lines, doublets dropped; 5 protocols: batch mixing is scored
  too, as the batch silhouette within cell types and the batch entropy of kNN neighbourhoods);
* crc_scmetalink (15 colorectal tumour and normal types; a 4,210-gene metabolic panel).

Rows: every candidate checkpoint with each pooling (``max``, ``mean``, and for models with
depth tokens ``all``, each with the target depth T = 4 and T = S), the same architecture with
random weights, each checkpoint's gene-table factor scores (``--baselines factors``: the
least-squares scores of the cells' log1p CP10k on the model's gene embedding rows,
``scxtrimo.models.factor_projection``; a linear read-out with no encoder, the teacher of the
factor-score term), scanpy's PCA workflow (2,000 HVGs, 50 PCs: ``tl._clustering.pca_baseline``),
and scVI (scvi-tools, defaults: 2,000 ``seurat_v3`` HVGs on counts, 10 latent dimensions,
trained per data set, once by default (``--scvi-seeds``), its latent scored with every Leiden
seed; installed by the ``benchmark`` extra). With ``--adapt-minutes M``, every checkpoint is also
scored after continuing its pretraining on each set for M minutes (``tl.pretrain(adata,
model=...)``, the set's own training split), the counterpart of scVI's per-set training.

    python benchmarks/embedding_quality.py --models xtrimo-3m runs/ckpt_abl_depth runs/ckpt_abl_plain \\
        --subsample cellbench=400 --out docs/benchmarks/embedding_quality.csv

(``--subsample cellbench=400``: a stratified sample of the deep cell-line cells, the same for
every method; on a 2-core CPU one embedding pass over all 1,070 takes about 18 minutes.)

Embeddings are cached under ``--cache`` (default runs/embq_cache), keyed by checkpoint sha256,
so reruns only recompute what changed. Prints a summary table (mean over seeds) in Markdown.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from sklearn import metrics
from sklearn.linear_model import LinearRegression
from sklearn.neighbors import NearestNeighbors

import scxtrimo
from scxtrimo.data import ThinningConfig, cell_keys, thin_counts
from scxtrimo.data._prepare import iter_log1p_blocks, prepare_input
from scxtrimo.tl._clustering import pca_baseline

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's modules, however the script is loaded
from pooled_variants import cache_name, depths, variants  # noqa: E402

SHARED = Path(os.environ.get("SCXTRIMO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# Zheng sorted runs: fastTopics suffix -> MUDAN prefix (the same 10x run)
_ZHENG_RUNS = {"b_cells": "bcells", "cd14_monocytes": "monocytes", "cd4_t_helper": "thelper", "cd56_nk": "nk",
               "cytotoxic_t": "cytotoxict", "memory_t": "memoryt", "naive_cytotoxic": "naivecytotoxic",
               "naive_t": "naivet", "regulatory_t": "regulatoryt"}


def _read(name: str) -> ad.AnnData:
    return ad.read_h5ad(SHARED / name / f"{name}.h5ad")


def _zheng_key_fasttopics(n: str) -> str:
    bc, run = re.match(r"([ACGT]{14}-1)-(.+)", n).groups()
    return f"{_ZHENG_RUNS.get(run, run)}|{bc}"


def _zheng_key_mudan(n: str) -> str:
    run, bc = re.match(r"(.*?)([ACGT]{14}-1)$", n).groups()
    return f"{run}|{bc}"


def stratified_sample(adata: ad.AnnData, n: int, keys: list[str], seed: int = 0) -> ad.AnnData:
    """About ``n`` cells, the same share of every stratum of ``obs[keys]`` (seeded)."""
    if n >= adata.n_obs:
        return adata
    rng = np.random.default_rng(seed)
    groups = adata.obs.groupby(keys, observed=True).indices
    take = [rng.choice(idx, max(1, round(len(idx) * n / adata.n_obs)), replace=False) for idx in groups.values()]
    return adata[np.sort(np.concatenate(take))].copy()


def datasets() -> dict[str, tuple[ad.AnnData, str | None]]:
    """name -> (AnnData of raw counts with obs['cell_type'], batch column or None)."""
    out = {}
    out["pbmc3k"] = (scxtrimo.datasets.pbmc3k(), None)
    ft = _read("zheng2017_sorted_pbmc_fasttopics")
    out["zheng_fasttopics"] = (ft, None)
    mu = _read("zheng2017_sorted_pbmc_mudan")
    shared = {_zheng_key_fasttopics(n) for n in ft.obs_names}
    keep = np.array([_zheng_key_mudan(n) not in shared for n in mu.obs_names])
    print(f"zheng_mudan: dropping {int((~keep).sum())} cells shared with zheng_fasttopics")
    out["zheng_mudan"] = (mu[keep].copy(), None)
    cb = _read("cellbench_lung_celllines")
    out["cellbench"] = (cb[cb.obs["cell_type"] != "doublet"].copy(), "batch")
    out["crc"] = (_read("crc_scmetalink_2850"), None)
    for name, (a, _) in out.items():
        a.obs["cell_type"] = a.obs["cell_type"].astype(str).astype("category")
        nz = np.asarray((a.X > 0).sum(1)).ravel()
        if (nz == 0).any():
            out[name] = (a[nz > 0].copy(), out[name][1])
    return out


def benchmark_sets(names: list[str] | None = None, *, subsample: dict[str, int] | None = None,
                   max_cells: int | None = None, thin: float = 0.0) -> dict[str, tuple[ad.AnnData, str | None]]:
    """The cells every method is scored on: set name -> (AnnData of raw counts, batch column or
    None), after ``--max-cells`` (the first cells), ``--subsample`` (a stratified sample) and
    ``--thin-to`` (names then ``SET@N``). Embeddings are cached by set name and cell count."""
    out = {}
    for set_name, (adata, batch_key) in datasets().items():
        if names and set_name not in names:
            continue
        if max_cells:
            adata = adata[:max_cells].copy()
        if set_name in (subsample or {}):
            adata = stratified_sample(adata, subsample[set_name], ["cell_type"] + ([batch_key] if batch_key else []))
            print(f"{set_name}: a stratified sample of {adata.n_obs} cells", flush=True)
        if thin:
            adata = thin_to(adata, thin)
            set_name = f"{set_name}@{thin:g}"
        out[set_name] = (adata, batch_key)
    return out


def embed_variants(model, adata, device) -> dict[str, np.ndarray]:
    """{variant name: (n_obs, width)} for every pooling (and target depth) of ``model``
    (:mod:`pooled_variants`; the model input from scxtrimo's own path, :func:`iter_log1p_blocks`)."""
    prep = prepare_input(adata)
    inputs = {depth: sp.vstack([b for _, _, b in iter_log1p_blocks(prep, depth=depth)], format="csr")
              for depth in depths(model)}
    return variants(model, inputs, device)


def factor_scores(model, adata) -> np.ndarray:
    """``(n_obs, d)`` least-squares scores of the cells' log1p CP10k (the model's own input path,
    :func:`iter_log1p_blocks`) on the model's gene rows."""
    proj = scxtrimo.models.factor_projection(model.gene_embedding.weight[: model.config.n_genes]).numpy()
    return np.vstack([X @ proj for _, _, X in iter_log1p_blocks(prepare_input(adata))])


def thin_to(adata: ad.AnnData, total: float, seed: int = 0, block: int = 256) -> ad.AnnData:
    """Every cell's counts binomially thinned to at most ``total`` (``scxtrimo.data.thin_counts``,
    keyed by ``seed`` and the cell's row; cells left empty dropped)."""
    X = sp.csr_matrix(adata.X)
    frac = torch.from_numpy(np.minimum(1.0, total / np.maximum(np.asarray(X.sum(1)).ravel(), 1.0)))
    keys = cell_keys(seed, 0, np.arange(X.shape[0]))
    parts = [sp.csr_matrix(thin_counts(torch.from_numpy(X[i : i + block].toarray()), frac[i : i + block],
                                       keys[i : i + block]).numpy())
             for i in range(0, X.shape[0], block)]
    Y = sp.vstack(parts, format="csr")
    keep = np.diff(Y.indptr) > 0
    return ad.AnnData(Y[keep], obs=adata.obs[keep].copy(), var=adata.var.copy())


#: ``--adapt-objective``: tl.pretrain settings on top of masked regression. "bundled" is the
#: bundled xtrimo-3m's own objective (frozen gene table, cell and factor-score terms, 80% thinned).
ADAPT_OBJECTIVES = {
    "paper": {},
    "bundled": dict(gene_lr_scale=0, cell_weight=1, cell_readout="dot", factor_weight=2,
                    thinning=ThinningConfig(p_thin=0.8)),
}


def adapt(model, adata, minutes: float, decoder_zeros: int, device, objective: str = "paper"):
    """A copy of ``model`` whose pretraining continued on ``adata`` for ``minutes`` with
    ``objective`` (:data:`ADAPT_OBJECTIVES`; the data set's own 96% training split; the embedding
    then covers every cell, as scVI's does)."""
    net, _ = scxtrimo.tl.pretrain(adata, model=copy.deepcopy(model).cpu(), epochs=1000, max_time=60 * minutes,
                                  batch_size=16, lr=3e-4, warmup_steps=20, eval_every=0, eval_cells=64,
                                  decoder_zeros=decoder_zeros or None, progress=False, device=device.type,
                                  random_state=0, **ADAPT_OBJECTIVES[objective])
    return net.eval()


def model_labels(names: list[str]) -> list[str]:
    """Row labels for ``--models``: a checkpoint folder's name, a registry name as given.

    Where two folders share a name (``runs/a/ckpt`` and ``runs/b/ckpt``), both are labelled with
    the path as given, so that neither model's rows replace the other's. Naming one checkpoint
    twice is an error.
    """
    if len(set(names)) < len(names):
        raise SystemExit(f"--models names a checkpoint more than once: {names}")
    short = [Path(m).name if Path(m).is_dir() else m for m in names]
    return [s if short.count(s) == 1 else str(m) for s, m in zip(short, names)]


def batch_mixing(emb: np.ndarray, batch: np.ndarray, labels: np.ndarray, k: int = 30) -> dict:
    """Batch silhouette within cell types (1 - |s|, scib's batch ASW) and kNN batch entropy (0-1)."""
    asw = []
    for c in np.unique(labels):
        sel = labels == c
        if len(np.unique(batch[sel])) > 1 and sel.sum() > 2:
            s = metrics.silhouette_samples(emb[sel], batch[sel])
            asw.append(np.mean(1 - np.abs(s)))
    idx = NearestNeighbors(n_neighbors=k + 1).fit(emb).kneighbors(emb, return_distance=False)[:, 1:]
    cats, codes = np.unique(batch, return_inverse=True)
    ent = []
    for row in codes[idx]:
        p = np.bincount(row, minlength=len(cats)) / k
        p = p[p > 0]
        ent.append(-(p * np.log(p)).sum() / np.log(len(cats)))
    return {"batch_asw": float(np.mean(asw)) if asw else float("nan"), "batch_entropy": float(np.mean(ent))}


def scvi_latent(adata, seed: int) -> np.ndarray:
    import scanpy as sc
    import scvi

    scvi.settings.seed = seed
    a = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.filter_genes(a, min_cells=3)  # seurat_v3's loess fails on (nearly) all-zero genes
        sc.pp.highly_variable_genes(a, n_top_genes=min(2000, a.n_vars), flavor="seurat_v3", subset=True)
        scvi.model.SCVI.setup_anndata(a)
        m = scvi.model.SCVI(a)
        m.train(enable_progress_bar=False)
    return m.get_latent_representation()


def depth_features(adata) -> np.ndarray:
    """``(n_obs, 2)``: log expressed genes and log total counts of every cell."""
    X = sp.csr_matrix(adata.X)
    return np.c_[np.log1p(np.diff(X.indptr)), np.log1p(np.asarray(X.sum(1)).ravel())]


def depth_r2(depth: np.ndarray, rep: np.ndarray) -> float:
    """R² of a linear fit of the embedding on :func:`depth_features` (0: no sequencing-depth
    signal; PCA of log-normalized HVGs is near 0.03)."""
    return float(LinearRegression().fit(depth, rep).score(depth, rep))


def score(adata, rep: np.ndarray, seed: int, batch_key: str | None, depth: np.ndarray | None = None) -> dict:
    a = ad.AnnData(obs=adata.obs[["cell_type"] + ([batch_key] if batch_key else [])].copy())
    a.obsm["E"] = np.asarray(rep, dtype=np.float32)
    s = scxtrimo.tl.evaluate_clustering(a, labels_key="cell_type", use_rep="E", random_state=seed)
    s = {k: s[k] for k in ("ari", "nmi", "homogeneity", "completeness", "silhouette")}
    s["depth_r2"] = depth_r2(depth_features(adata) if depth is None else depth, a.obsm["E"])
    if batch_key:
        s |= batch_mixing(a.obsm["E"], a.obs[batch_key].astype(str).to_numpy(), a.obs["cell_type"].astype(str).to_numpy())
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["xtrimo-3m"], help="checkpoint names or folders")
    ap.add_argument("--seeds", nargs="+", type=int, default=list(range(10)),
                    help="Leiden seeds (default 0-9: some sets' scores are bimodal across seeds, and three "
                         "cannot separate checkpoints closer than about 0.02; each seed costs seconds per "
                         "embedding, the embedding itself is computed once)")
    ap.add_argument("--sets", nargs="*", default=None, help="subset of data sets (default: all)")
    ap.add_argument("--baselines", nargs="*", default=["random", "factors", "pca", "scvi"])
    ap.add_argument("--scvi-seeds", nargs="+", type=int, default=[0],
                    help="scVI trainings per set (each scored with every Leiden seed); one takes minutes on a CPU")
    ap.add_argument("--max-cells", type=int, default=None, help="first N cells of each set (smoke runs)")
    ap.add_argument("--subsample", nargs="*", default=[], metavar="SET=N",
                    help="a stratified sample (cell type x batch) of N cells of SET, the same for every method")
    ap.add_argument("--out", default="docs/benchmarks/embedding_quality.csv")
    ap.add_argument("--cache", default="runs/embq_cache")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--thin-to", type=float, default=0.0,
                    help="first thin every cell binomially to at most this many counts (seeded; data sets named SET@N)")
    ap.add_argument("--adapt-minutes", type=float, default=0.0,
                    help="also score every checkpoint after continuing its pretraining on each set for this many "
                         "minutes (tl.pretrain(adata, model=...), batch 16, lr 3e-4, the bundled run's decoder context)")
    ap.add_argument("--adapt-objective", choices=sorted(ADAPT_OBJECTIVES), default="paper",
                    help="the adaptation's objective: the paper's masked regression, or the bundled model's own "
                         "(frozen gene table, cell and factor-score terms, 80%% of the cells thinned)")
    ap.add_argument("--adapt-decoder-zeros", type=int, default=1024,
                    help="decoder_zeros of the adaptation (0: the full-length decoder)")
    ap.add_argument("--summarize", action="store_true", help="only print the tables of an existing --out CSV")
    args = ap.parse_args()
    if args.summarize:
        summarize(pd.read_csv(args.out))
        return

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    sub = {k: int(v) for k, v in (x.split("=") for x in args.subsample)}
    sets = benchmark_sets(args.sets, subsample=sub, max_cells=args.max_cells, thin=args.thin_to)
    rows = []
    out = Path(args.out)

    def emit(**row):
        rows.append(row)
        pd.DataFrame(rows).to_csv(out, index=False)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    models = [(label, scxtrimo.models.load(m)) for label, m in zip(model_labels(args.models), args.models)]
    if "random" in args.baselines and models:
        torch.manual_seed(0)
        rnd = scxtrimo.models.XTrimoGene(models[0][1].config).eval()
        rnd.checkpoint_sha256 = f"random-{models[0][1].config.name}-{models[0][1].config.depth_tokens}"
        models.append(("random weights", rnd))

    for set_name, (adata, batch_key) in sets.items():
        n = adata.n_obs
        depth = depth_features(adata)
        reps: dict[str, np.ndarray] = {}
        for label, net in models:
            key = cache / f"{cache_name(set_name, n, net.checkpoint_sha256 or label)}.npz"
            if key.exists():
                variants = dict(np.load(key))
            else:
                t = time.perf_counter()
                variants = embed_variants(net, adata, dev)
                np.savez(key, **variants)
                print(f"{set_name}: embedded with {label} in {time.perf_counter() - t:.0f} s", flush=True)
            for v, e in variants.items():
                reps[f"{label} [{v}]"] = e
            if "factors" in args.baselines and not label.startswith("random"):
                reps[f"{label} gene-table factor scores (linear, no encoder)"] = factor_scores(net, adata)
            if args.adapt_minutes and not label.startswith("random"):
                tag = f"adapted {args.adapt_minutes:g} min" + (
                    f" ({args.adapt_objective} objective)" if args.adapt_objective != "paper" else "")
                key = key.with_name(key.stem + f"_adapt{args.adapt_minutes:g}m_dz{args.adapt_decoder_zeros}"
                                    + ("" if args.adapt_objective == "paper" else f"_{args.adapt_objective}") + ".npz")
                if key.exists():
                    variants = dict(np.load(key))
                else:
                    t = time.perf_counter()
                    variants = embed_variants(adapt(net, adata, args.adapt_minutes, args.adapt_decoder_zeros, dev,
                                                    args.adapt_objective), adata, dev)
                    np.savez(key, **variants)
                    print(f"{set_name}: {label} {tag} and embedded in {time.perf_counter() - t:.0f} s", flush=True)
                for v, e in variants.items():
                    reps[f"{label} {tag} [{v}]"] = e
        if "pca" in args.baselines:
            reps["PCA (2,000 HVGs, 50 PCs)"] = pca_baseline(adata).obsm["X_pca"]
        for rep_name, e in reps.items():
            for seed in args.seeds:
                emit(dataset=set_name, method=rep_name, seed=seed, cells=n, **score(adata, e, seed, batch_key, depth))
        if "scvi" in args.baselines:
            for train_seed in args.scvi_seeds:
                key = cache / f"{set_name}_{n}_scvi_{train_seed}.npy"
                if key.exists():
                    z = np.load(key)
                else:
                    t = time.perf_counter()
                    z = scvi_latent(adata, train_seed)
                    np.save(key, z)
                    print(f"{set_name}: scVI seed {train_seed} trained in {time.perf_counter() - t:.0f} s", flush=True)
                for seed in args.seeds:
                    emit(dataset=set_name, method="scVI (defaults)", seed=seed, scvi_seed=train_seed, cells=n,
                         **score(adata, z, seed, batch_key, depth))

    summarize(pd.DataFrame(rows))


def summarize(df: pd.DataFrame) -> None:
    """Markdown tables: ARI and NMI per data set (mean over seeds, with the spread), batch mixing."""
    for metric in ("ari", "nmi"):
        mean = df.groupby(["method", "dataset"], sort=False)[metric].mean().unstack("dataset")
        sd = df.groupby(["method", "dataset"], sort=False)[metric].std().unstack("dataset")
        table = mean.round(3).astype(str) + " ± " + sd.round(3).astype(str)
        table["mean"] = mean.mean(1).round(3)
        print(f"\n{metric.upper()}, mean ± sd over seeds:\n")
        print(table.to_markdown())
    if "batch_asw" in df:
        mix = df.dropna(subset=["batch_asw"]).groupby("method", sort=False)[["ari", "batch_asw", "batch_entropy"]].mean()
        print("\nBatch mixing (cellbench, 5 protocols; higher is better mixed):\n")
        print(mix.round(3).to_markdown())


if __name__ == "__main__":
    main()
