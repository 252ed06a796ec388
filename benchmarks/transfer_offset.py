"""What limits the linear probe's cross-platform transfer: a per-platform offset in the embedding.

The two transfer tasks of ``benchmarks/annotate.py`` (cellbench Drop-seq -> the CEL-seq2 runs;
FACS-sorted PBMC -> pbmc3k on five coarse types), each embedded once with ``tl.embed``'s
defaults, and a logistic regression (scikit-learn, all training cells, no seed involved) on
the embedding standardized three ways:

  * with the training cells' mean and sd, as ``tl.CellTypeClassifier`` does;
  * each batch (cellbench: protocol run; pbmc: data set) with its own mean and sd;
  * each batch centred on its own mean, scaled by the training cells' sd.

Own-batch standardization removes an offset shared by all cells of a batch; it assumes each
batch holds a similar mix of cell types (the cellbench runs do; pbmc3k and the sorted
populations do not). Macro-F1 on the query cells.

    python benchmarks/transfer_offset.py [--model xtrimo-3m] [--out docs/benchmarks/transfer_offset.csv]
"""

from __future__ import annotations

import argparse

import anndata as ad
import numpy as np
import pandas as pd
from annotate import PBMC3K_COARSE, SHARED, SORTED_COARSE, coarse, scores
from sklearn.linear_model import LogisticRegression

import scxtrimo
from scxtrimo.tl._annotate import _batch_standardize, _moments


def standardized(E: np.ndarray, batches: np.ndarray, train: np.ndarray, how: str) -> np.ndarray:
    """``E`` standardized with the training cells' statistics (``"train"``), each batch's own
    (``"batch"``), or centred per batch and scaled by the training cells' sd (``"centre"``)."""
    mean_train, sd_train = _moments(E[train])  # what tl.CellTypeClassifier stores
    if how == "train":
        return (E - mean_train) / sd_train
    if how == "batch":  # what tl.annotate(batch_key=...) applies
        return _batch_standardize(E, batches)
    out = np.empty(E.shape, dtype=np.float32)
    for b in np.unique(batches):
        m = batches == b
        out[m] = (E[m] - E[m].mean(0)) / sd_train
    return out


def tasks(model: str) -> dict:
    """``name -> (embedding, labels, batches, training mask)`` of the two transfer tasks."""
    cb = ad.read_h5ad(SHARED / "cellbench_lung_celllines" / "cellbench_lung_celllines.h5ad")
    cb = cb[cb.obs["cell_type"] != "doublet"].copy()
    cb = cb[cb.obs["cell_type"].isin(set(cb.obs.loc[cb.obs["batch"] == "sc_dropseq", "cell_type"]))].copy()
    ref = coarse(ad.read_h5ad(SHARED / "zheng2017_sorted_pbmc_mudan" / "zheng2017_sorted_pbmc_mudan.h5ad"),
                 SORTED_COARSE)
    query = coarse(scxtrimo.datasets.pbmc3k(), PBMC3K_COARSE)
    for adata in (cb, ref, query):
        scxtrimo.tl.embed(adata, model=model, progress=False)
    batch = cb.obs["batch"].astype(str).to_numpy()
    pbmc = np.r_[np.zeros(ref.n_obs, bool), np.ones(query.n_obs, bool)]
    return {
        "cellbench transfer (Drop-seq -> CEL-seq2)": (
            cb.obsm["X_xtrimo"], cb.obs["cell_type"].astype(str).to_numpy(), batch, batch == "sc_dropseq"),
        "pbmc transfer (sorted PBMC -> pbmc3k)": (
            np.r_[ref.obsm["X_xtrimo"], query.obsm["X_xtrimo"]],
            np.r_[ref.obs["coarse_type"].astype(str), query.obs["coarse_type"].astype(str)],
            np.where(pbmc, "pbmc3k", "sorted"), ~pbmc),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="xtrimo-3m")
    ap.add_argument("--out", default="docs/benchmarks/transfer_offset.csv")
    args = ap.parse_args()
    rows = []
    for task, (E, y, batches, train) in tasks(args.model).items():
        E = np.asarray(E, dtype=np.float64)
        for how, name in (("train", "training cells' mean and sd (tl.annotate)"),
                          ("batch", "each batch its own mean and sd"),
                          ("centre", "each batch centred on its own mean")):
            Z = standardized(E, batches, train, how)
            pred = LogisticRegression(max_iter=3000).fit(Z[train], y[train]).predict(Z[~train])
            rows.append({"task": task, "standardization": name, **scores(y[~train], pred)})
            print(rows[-1], flush=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
