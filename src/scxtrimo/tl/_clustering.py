"""Cell clustering evaluation as in the paper's appendix 4: kNN graph, Leiden at a resolution
bisected to the number of labelled types, then ARI/NMI/homogeneity/completeness/silhouette."""

from __future__ import annotations

import warnings

import numpy as np
import scanpy as sc
import scipy.sparse as sp
from sklearn import metrics

from .._anndata import rna_modality, xtrimo_uns
from .._validation import check_embedding, check_positive


def leiden_n_clusters(
    adata, *, n_clusters: int, neighbors_key: str, key_added: str, random_state: int = 0,
    low: float = 0.01, high: float = 4.0, max_iter: int = 25,
) -> float:
    """Bisect the Leiden resolution until ``n_clusters`` clusters come out; return it.

    Clusters go into ``obs[key_added]``. If no resolution gives exactly ``n_clusters`` within
    ``max_iter`` steps, the last (closest) result is kept.
    """
    best = None
    for _ in range(max_iter):
        res = (low + high) / 2
        sc.tl.leiden(adata, resolution=res, neighbors_key=neighbors_key, key_added=key_added,
                     random_state=random_state, flavor="igraph", n_iterations=2, directed=False)
        k = adata.obs[key_added].nunique()
        if best is None or abs(k - n_clusters) < abs(best[1] - n_clusters):
            best = (res, k)
        if k == n_clusters:
            return res
        if k < n_clusters:
            low = res
        else:
            high = res
    sc.tl.leiden(adata, resolution=best[0], neighbors_key=neighbors_key, key_added=key_added,
                 random_state=random_state, flavor="igraph", n_iterations=2, directed=False)
    return best[0]


def evaluate_clustering(
    adata,
    *,
    labels_key: str,
    use_rep: str = "X_xtrimo",
    n_clusters: int | None = None,
    n_neighbors: int = 15,
    key_added: str | None = None,
    random_state: int = 0,
) -> dict:
    """Cluster an embedding with Leiden and score the clusters against known labels.

    The paper's protocol (appendix 4): a kNN graph on ``obsm[use_rep]``, Leiden with the
    resolution bisected until it gives as many clusters as there are labels, then ARI, NMI,
    homogeneity, completeness, and the silhouette of the embedding under the found clusters.

    Parameters
    ----------
    adata
        AnnData (or MuData: its RNA modality) with ``obsm[use_rep]`` and ``obs[labels_key]``.
    labels_key
        ``obs`` column with the reference labels (cells with missing labels are ignored in the
        scores).
    use_rep
        ``obsm`` key of the embedding, e.g. ``"X_xtrimo"`` or ``"X_pca"``.
    n_clusters
        Target cluster count; defaults to the number of distinct labels.
    n_neighbors
        Neighbours per cell in the kNN graph (scanpy's default, 15).
    key_added
        ``obs`` column for the clusters; defaults to ``f"leiden_{use_rep}"``. The kNN graph is
        stored under ``neighbors_key=f"neighbors_{use_rep}"`` so other graphs stay intact.
    random_state
        Seed of the kNN graph and of Leiden; Leiden's result, and so the scores, change with it
        (report several seeds).

    Returns
    -------
    dict
        ``ari``, ``nmi``, ``homogeneity``, ``completeness``, ``silhouette``, ``resolution``,
        ``n_clusters`` (the clusters found). Also stored in
        ``uns['xtrimo']['clustering'][use_rep]``; the clusters go to ``obs[key_added]``
        (categorical of cluster numbers as strings, scanpy's Leiden output), its settings to
        ``uns[key_added]``, and the kNN graph to ``obsp['neighbors_<use_rep>_connectivities']``,
        ``obsp['neighbors_<use_rep>_distances']`` and ``uns['neighbors_<use_rep>']``.

    Raises
    ------
    KeyError
        ``obsm[use_rep]`` or ``obs[labels_key]`` does not exist.
    ValueError
        The labelled cells hold fewer than two types (a single cluster would score a perfect,
        meaningless 1.0); ``n_clusters`` is below 2 or not below the number of labelled cells;
        ``n_neighbors`` is not an integer of at least 2; ``n_clusters`` is not an integer;
        ``key_added`` equals ``labels_key``; the embedding has non-finite values. ``adata`` is
        unchanged when these are raised.
    TypeError
        ``obsm[use_rep]`` is a sparse matrix.

    Warns
    -----
    UserWarning
        No Leiden resolution between 0.01 and 4 gives ``n_clusters`` clusters; the closest
        count is scored (and returned as ``n_clusters``).
    """
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, (int, np.integer)) or n_neighbors < 2:
        raise ValueError(f"n_neighbors must be an integer of at least 2 (each cell counts as its own first "
                         f"neighbour), got {n_neighbors!r}.")
    data = rna_modality(adata)
    if use_rep not in data.obsm:
        raise KeyError(f"obsm[{use_rep!r}] not found; run scxtrimo.tl.embed (or sc.pp.pca) first.")
    if labels_key not in data.obs:
        raise KeyError(f"obs[{labels_key!r}] not found; available columns: {list(data.obs.columns)}.")
    labels = data.obs[labels_key]
    n_labelled, n_types = int(labels.notna().sum()), int(labels.dropna().nunique())
    if n_types < 2:
        raise ValueError(f"obs[{labels_key!r}] has {n_types} type(s) among its {n_labelled} labelled cells "
                         f"(of {data.n_obs}); clustering scores need at least two types. Pass a column with "
                         "the cell types as labels_key.")
    check_positive("n_clusters", n_clusters, integer=True, optional=True)
    n_clusters = n_types if n_clusters is None else int(n_clusters)
    if not 2 <= n_clusters < n_labelled:
        raise ValueError(f"n_clusters={n_clusters} is out of range: it must be at least 2 and below the "
                         f"{n_labelled} labelled cells (default: the {n_types} labelled types).")
    emb = check_embedding(data.obsm[use_rep], use_rep)
    key_added = key_added or f"leiden_{use_rep}"
    if key_added == labels_key:
        raise ValueError(f"key_added={key_added!r} is labels_key: the clusters would overwrite the labels they are "
                         "scored against. Pass another key_added (default: 'leiden_<use_rep>').")
    neighbors_key = f"neighbors_{use_rep}"
    sc.pp.neighbors(data, n_neighbors=n_neighbors, use_rep=use_rep, key_added=neighbors_key, random_state=random_state)
    res = leiden_n_clusters(data, n_clusters=n_clusters, neighbors_key=neighbors_key, key_added=key_added, random_state=random_state)
    found = int(data.obs[key_added].nunique())
    if found != n_clusters:
        warnings.warn(f"Leiden gave {found} clusters, not the {n_clusters} asked for, at any resolution tried "
                      f"(closest: {res:.3g}); the scores compare {found} clusters with the labels.", stacklevel=2)
    ok = labels.notna().to_numpy()
    y, c = labels.to_numpy()[ok].astype(str), data.obs[key_added].to_numpy()[ok].astype(str)
    emb = emb[ok]
    scores = {
        "ari": float(metrics.adjusted_rand_score(y, c)),
        "nmi": float(metrics.normalized_mutual_info_score(y, c)),
        "homogeneity": float(metrics.homogeneity_score(y, c)),
        "completeness": float(metrics.completeness_score(y, c)),
        "silhouette": float(metrics.silhouette_score(emb, c)) if len(set(c)) > 1 else float("nan"),
        "resolution": float(res),
        "n_clusters": found,
    }
    xtrimo_uns(data).setdefault("clustering", {})[use_rep] = scores
    return scores


def pca_baseline(adata, *, n_top_genes: int = 2000, n_comps: int = 50, random_state: int = 0):
    """The scanpy PCA workflow on raw counts, into ``obsm['X_pca']`` of a copy.

    ``normalize_total`` (1e4), ``log1p``, 2,000 highly variable genes, ``scale`` (max 10),
    50-component PCA: the standard baseline the paper's clustering compares against.
    """
    base = rna_modality(adata).copy()
    sc.pp.normalize_total(base, target_sum=1e4)
    sc.pp.log1p(base)
    sc.pp.highly_variable_genes(base, n_top_genes=n_top_genes, subset=True)
    if sp.issparse(base.X):  # scaling zero-centres, which densifies anyway: do it explicitly
        base.X = base.X.toarray()
    sc.pp.scale(base, max_value=10)
    sc.pp.pca(base, n_comps=n_comps, random_state=random_state)
    return base
