"""Cell-type annotation benchmark (issue: tl.annotate), run by hand.

Side by side on identical stratified 8:1:1 splits, for several seeds:
  * scxtrimo fine-tuned (``tl.annotate``; its default warm start: the head is first trained as
    a linear probe, then encoder and head are fine-tuned), and optionally "scxtrimo fine-tuned
    (cold head)" (``warm_start=False``, a random head),
  * scxtrimo linear probe (``tl.annotate(freeze="all")``), and "scxtrimo linear probe (per
    batch)": ``tl.annotate(batch_key="run")``, each run standardized on its own (cellbench: the
    protocol run; the pbmc tasks: the data set),
  * logistic regression on PCA of log-normalized HVGs (fit on the training cells),
  * CellTypist trained on the same training cells (its default logistic regression, and its
    SGD mode; see ``celltypist_pred``).
Data: pbmc3k (8 types), cellbench cell lines (doublets excluded), a cross-platform
transfer on cellbench (train on one batch, predict the others), and a PBMC transfer ("pbmc
transfer": train on the FACS-sorted Zheng populations, predict pbmc3k, both on the five
coarse types they share: B, CD4 T, CD8 T, NK, monocyte; pbmc3k's dendritic cells and
megakaryocytes, absent from the sorted set, are left out).

Each data set is embedded once with the checkpoint (``tl.embed``); the linear probe reuses that
embedding for every seed (``use_rep``). Fine-tuning re-runs the encoder every epoch, so on a
CPU it is run only on the tasks in ``--finetune-tasks`` (default pbmc3k), training the last
``--finetune-freeze`` encoder layers (``none`` = all of them, the paper's protocol).

    python benchmarks/annotate.py --seeds 0 1 2 --out docs/benchmarks/annotate.csv
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from sklearn import metrics
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import scxtrimo
from scxtrimo.tl._annotate import stratified_split

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's modules, however the script is loaded

SHARED = Path(os.environ.get("SCXTRIMO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


# the coarse types the sorted populations and pbmc3k's tutorial labels share ("pbmc transfer")
SORTED_COARSE = {"bcells": "B", "nk": "NK", "monocytes": "monocyte", "memoryt": "CD4 T", "regulatoryt": "CD4 T",
                 "thelper": "CD4 T", "naivet": "CD4 T", "cytotoxict": "CD8 T", "naivecytotoxic": "CD8 T"}
PBMC3K_COARSE = {"B cells": "B", "NK cells": "NK", "CD14+ Monocytes": "monocyte", "FCGR3A+ Monocytes": "monocyte",
                 "CD4 T cells": "CD4 T", "CD8 T cells": "CD8 T"}


RUN = "run"  # the batch column of the per-batch probe: cellbench's protocol run, or the data set


def coarse(adata, mapping):
    """The cells of ``adata`` whose ``cell_type`` is in ``mapping``, relabelled in ``obs['coarse_type']``."""
    out = adata[adata.obs["cell_type"].astype(str).isin(mapping)].copy()
    out.obs["coarse_type"] = out.obs["cell_type"].astype(str).map(mapping).astype("category")
    return out


def scores(y, p) -> dict:
    present = sorted(set(y))
    return {"macro_f1": metrics.f1_score(y, p, labels=present, average="macro", zero_division=0),
            "macro_precision": metrics.precision_score(y, p, labels=present, average="macro", zero_division=0),
            "accuracy": metrics.accuracy_score(y, p)}


def lognorm(adata):
    out = adata.copy()
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


def pca_logreg(train, test, labels_key, seed):
    tr, te = lognorm(train), lognorm(test)
    sc.pp.highly_variable_genes(tr, n_top_genes=2000)
    genes = tr.var_names[tr.var["highly_variable"]].intersection(te.var_names)
    Xtr, Xte = tr[:, genes].X.toarray(), te[:, genes].X.toarray()
    scaler = StandardScaler().fit(Xtr)
    pca = PCA(50, random_state=seed).fit(np.clip(scaler.transform(Xtr), -10, 10))
    ztr, zte = (pca.transform(np.clip(scaler.transform(M), -10, 10)) for M in (Xtr, Xte))
    lr = LogisticRegression(max_iter=2000, class_weight="balanced").fit(ztr, train.obs[labels_key].astype(str))
    return lr.predict(zte)


def celltypist_pred(train, test, labels_key, seed, sgd: bool = True):
    """CellTypist trained on the training cells.

    CellTypist 1.7's default classifier (full-batch logistic regression) passes
    ``multi_class='ovr'``, which scikit-learn >= 1.8 removed. ``sgd=True`` runs CellTypist's own
    SGD logistic-regression mode (``use_SGD=True``, seeded); ``sgd=False`` runs its default
    pipeline (scaling, logistic regression with C=1) with scikit-learn's multinomial logistic
    regression in place of the removed one-vs-rest option.
    """
    import importlib

    import celltypist
    from sklearn.linear_model import LogisticRegression as SkLR

    class MultinomialLR(SkLR):  # accepts and drops the removed keyword
        def __init__(self, penalty="deprecated", *, C=1.0, solver="lbfgs", max_iter=100, n_jobs=None,
                     random_state=None, **removed):
            super().__init__(penalty=penalty, C=C, solver=solver, max_iter=max_iter, n_jobs=n_jobs,
                             random_state=random_state)

    ct_train = importlib.import_module("celltypist.train")  # the module; celltypist.train is the function
    tr, te = lognorm(train), lognorm(test)
    saved = ct_train.LogisticRegression
    ct_train.LogisticRegression = MultinomialLR
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extra = {"use_SGD": True, "random_state": seed} if sgd else {}
            model = celltypist.train(tr, labels=tr.obs[labels_key].astype(str).to_numpy(), genes=tr.var_names,
                                     check_expression=False, n_jobs=1, max_iter=1000, **extra)
            pred = celltypist.annotate(te, model=model, majority_voting=False)
    finally:
        ct_train.LogisticRegression = saved
    return pred.predicted_labels["predicted_labels"].astype(str).to_numpy()


def run_task(name, train_pool, test_pool, labels_key, seed, methods, args):
    """train_pool is split 8:1:1; test_pool None = use that split's test part. Both carry the
    checkpoint's embedding in obsm['X_xtrimo']."""
    y = train_pool.obs[labels_key].astype(str).to_numpy()
    split, _ = stratified_split(y, seed)
    fit_only = train_pool[split["train"]].copy()
    test = train_pool[split["test"]].copy() if test_pool is None else test_pool.copy()
    y_test = test.obs[labels_key].astype(str).to_numpy()
    rows = []
    for method in methods:
        extra = {}
        if method.startswith("scxtrimo fine-tuned") and name not in args.finetune_tasks:
            continue
        t = time.perf_counter()
        if method.startswith("scxtrimo"):
            probe = method.startswith("scxtrimo linear probe")
            batch_key = RUN if method == "scxtrimo linear probe (per batch)" else None
            pool = train_pool.copy()
            if probe:
                clf = scxtrimo.tl.annotate(pool, model=args.model, labels_key=labels_key, freeze="all", use_rep="X_xtrimo",
                                           batch_key=batch_key, pooling=args.pooling, random_state=seed, epochs=40,
                                           patience=6, progress=False)
            else:
                clf = scxtrimo.tl.annotate(pool, model=args.model, labels_key=labels_key, freeze=args.finetune_freeze,
                                           pooling=args.pooling, random_state=seed,
                                           epochs=args.epochs, patience=2, warm_start=not method.endswith("(cold head)"),
                                           lr=args.finetune_lr, head_lr=args.finetune_head_lr, progress=False)
            if test_pool is None:
                assert pool.uns["xtrimo"]["annotate"]["split_sizes"]["test"] == len(split["test"])
                pred = pool.obs["xtrimo_label"].astype(str).to_numpy()[split["test"]]
            else:
                scxtrimo.tl.annotate(test, model=clf, use_rep="X_xtrimo" if probe else None, batch_key=batch_key,
                                     progress=False)
                pred = test.obs["xtrimo_label"].astype(str).to_numpy()
            report = pool.uns["xtrimo"]["annotate"]
            extra = {"best_epoch": report["best_epoch"], "pooling": clf.pooling}
            if not probe:
                extra.update(lr=args.finetune_lr, head_lr=args.finetune_head_lr)
                # validation macro-F1: the warm-start probe's best, then each fine-tuning epoch
                hist = pd.DataFrame(report["history"])
                warm = hist.loc[hist["stage"] == "warm start", "val_macro_f1"]
                extra["val_f1_warm_start"] = warm.max() if len(warm) else float("nan")
                extra["val_f1_fine_tune"] = " ".join(f"{v:.3f}" for v in hist.loc[hist["stage"] == "fine-tune", "val_macro_f1"])
        elif method == "PCA + logistic regression":
            pred = pca_logreg(fit_only, test, labels_key, seed)
        elif method in ("CellTypist", "CellTypist (SGD)"):
            pred = celltypist_pred(fit_only, test, labels_key, seed, sgd=method == "CellTypist (SGD)")
        rows.append({"task": name, "method": method, "seed": seed, **scores(y_test, pred),
                     "n_train": len(split["train"]), "n_test": len(y_test), "seconds": time.perf_counter() - t, **extra})
        print(rows[-1], flush=True)
    return rows


def read_task_set(name: str) -> ad.AnnData:
    """A data set as the tasks read it: ``"pbmc3k"``, ``"annotate_zheng_mudan"`` (the sorted
    reference of the pbmc transfer, every cell) or ``"annotate_cellbench"`` (doublets dropped)."""
    if name == "pbmc3k":
        adata = scxtrimo.datasets.pbmc3k()
        adata.obs[RUN] = "pbmc3k"
    elif name == "annotate_zheng_mudan":
        adata = ad.read_h5ad(SHARED / "zheng2017_sorted_pbmc_mudan" / "zheng2017_sorted_pbmc_mudan.h5ad")
        adata.obs[RUN] = "sorted"  # one batch: its own "batch" column is the sorted population, a cell type
    elif name == "annotate_cellbench":
        adata = ad.read_h5ad(SHARED / "cellbench_lung_celllines" / "cellbench_lung_celllines.h5ad")
        adata = adata[adata.obs["cell_type"] != "doublet"].copy()
        adata.obs[RUN] = adata.obs["batch"]
    else:
        raise ValueError(f"unknown data set {name!r}")
    return adata


def cached_embedding(adata, name: str, model, pooling: str, cache: Path | None) -> bool:
    """Put the embedding ``benchmarks/device_eval.py`` computed on the GPU machine (unpacked into
    ``cache``) into ``obsm['X_xtrimo']``, as ``tl.embed(adata, model=model, pooling=pooling)``
    computes it (equal on this CPU to the last bit); ``False`` when the cache lacks it."""
    if cache is None:
        return False
    from pooled_variants import cache_name, default_variant

    path = cache / f"{cache_name(name, adata.n_obs, model.checkpoint_sha256)}.npz"
    variant = default_variant(model, pooling)
    if not path.exists():
        return False
    with np.load(path) as emb:
        if variant not in emb.files:
            return False
        adata.obsm["X_xtrimo"] = emb[variant]
    adata.uns["xtrimo"] = {"params": {"key_added": "X_xtrimo", "sha256": model.checkpoint_sha256, "pooling": pooling,
                                      "source": str(path)}}
    print(f"{name}: the embedding from {path}", flush=True)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs (early stopping, patience 2)")
    ap.add_argument("--finetune-freeze", default="2", help="'none' (whole encoder) or k: train the last k layers")
    ap.add_argument("--finetune-tasks", nargs="*", default=["pbmc3k"])
    defaults = inspect.signature(scxtrimo.tl.annotate).parameters  # the benchmark follows tl.annotate's rates
    ap.add_argument("--finetune-lr", type=float, default=defaults["lr"].default,
                    help="encoder learning rate when fine-tuning (default: tl.annotate's)")
    ap.add_argument("--finetune-head-lr", type=float, default=defaults["head_lr"].default,
                    help="head learning rate when fine-tuning, also the warm-start probe's (default: tl.annotate's)")
    ap.add_argument("--methods", nargs="+", default=["scxtrimo fine-tuned", "scxtrimo linear probe",
                                                     "scxtrimo linear probe (per batch)", "PCA + logistic regression",
                                                     "CellTypist", "CellTypist (SGD)"])
    tasks = ["pbmc3k", "cellbench", "cellbench transfer", "pbmc transfer"]
    ap.add_argument("--tasks", nargs="+", choices=tasks, default=tasks)
    ap.add_argument("--transfer-train", default="sc_dropseq", help="batch to train on (predicted on all other batches)")
    ap.add_argument("--out", default="docs/benchmarks/annotate.csv")
    ap.add_argument("--model", default="xtrimo-3m",
                    help="checkpoint to embed with and fine-tune (a registry name or a folder; default the bundled one)")
    ap.add_argument("--embedding-cache", type=Path, default=None,
                    help="take the linear probe's embeddings from this folder where it has them "
                         "(benchmarks/device_eval.py unpack: computed on the GPU machine) instead of tl.embed")
    ap.add_argument("--pooling", default=None, choices=["max", "mean", "all"],
                    help="pooling of the embedding and of fine-tuning (default: the checkpoint's own, "
                         "XTrimoGene.default_pooling; a scripts/train_device.py merge of a run that started from a new "
                         "model has none: max)")
    args = ap.parse_args()
    args.finetune_freeze = args.finetune_freeze if args.finetune_freeze in ("none", "all") else int(args.finetune_freeze)
    model = scxtrimo.models.load(args.model)  # loaded once; tl.annotate fine-tunes a copy
    args.pooling = args.pooling or model.default_pooling
    print(f"checkpoint {args.model} (sha256 {model.checkpoint_sha256}), pooling {args.pooling}", flush=True)
    args.model = model

    pbmc, cb, sorted_ref = None, None, None

    def embed(adata, name: str) -> None:
        if any(m.startswith("scxtrimo linear probe") for m in args.methods):
            if not cached_embedding(adata, name, args.model, args.pooling, args.embedding_cache):
                scxtrimo.tl.embed(adata, model=args.model, pooling=args.pooling)

    rows = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        if task in ("pbmc3k", "pbmc transfer") and pbmc is None:
            pbmc = read_task_set("pbmc3k")
            embed(pbmc, "pbmc3k")
        if task == "pbmc transfer" and sorted_ref is None:
            sorted_ref = read_task_set("annotate_zheng_mudan")
            embed(sorted_ref, "annotate_zheng_mudan")
        if task.startswith("cellbench") and cb is None:
            cb = read_task_set("annotate_cellbench")
            cached = cached_embedding(cb, "annotate_cellbench", args.model, args.pooling, args.embedding_cache)
            if "cellbench" not in args.tasks:  # the transfer alone: embed only its training and test cells
                src_types = set(cb.obs.loc[cb.obs["batch"] == args.transfer_train, "cell_type"])
                cb = cb[cb.obs["cell_type"].isin(src_types)].copy()
            if not cached:
                embed(cb, "annotate_cellbench")
        for seed in args.seeds:
            if task == "pbmc3k":
                rows += run_task(task, pbmc, None, "cell_type", seed, args.methods, args)
            elif task == "cellbench":
                rows += run_task(task, cb, None, "cell_type", seed, args.methods, args)
            elif task == "pbmc transfer":
                rows += run_task(task, coarse(sorted_ref, SORTED_COARSE), coarse(pbmc, PBMC3K_COARSE), "coarse_type",
                                 seed, args.methods, args)
            else:  # cellbench transfer
                src = cb[cb.obs["batch"] == args.transfer_train].copy()
                dst = cb[cb.obs["batch"] != args.transfer_train].copy()
                dst = dst[dst.obs["cell_type"].isin(set(src.obs["cell_type"]))].copy()
                rows += run_task(task, src, dst, "cell_type", seed, args.methods, args)
            df = pd.DataFrame(rows)  # written after every task and seed, so a long run keeps what it finished
            df.to_csv(args.out, index=False)
    summary = df.groupby(["task", "method"])[["macro_f1", "macro_precision", "accuracy", "seconds"]].agg(["mean", "std"])
    print(summary.round(4).to_string())


if __name__ == "__main__":
    main()
