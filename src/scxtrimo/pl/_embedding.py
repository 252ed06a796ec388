from __future__ import annotations

import scanpy as sc

from .._anndata import rna_modality


def embedding(adata, *, color=None, basis: str = "X_xtrimo", n_neighbors: int = 15, random_state: int = 0,
              show: bool | None = None, save: str | None = None, **kwargs):
    """UMAP of an xTrimoGene embedding, computed through scanpy if missing.

    The kNN graph goes to ``uns['neighbors_<basis>']`` / ``obsp`` under that key and the UMAP to
    ``obsm['X_umap_<basis>']``, so a PCA-based ``X_umap`` and ``neighbors`` survive.

    Parameters
    ----------
    adata
        AnnData (or MuData: its RNA modality) with ``obsm[basis]`` (n_obs x d).
    color
        ``obs`` columns or genes to color by, as in :func:`scanpy.pl.embedding`.
    basis
        ``obsm`` key of the embedding (default ``"X_xtrimo"``).
    show, save
        As in scanpy: ``show=False`` returns the axes; ``save`` a file name (written by scanpy).
    **kwargs
        Passed to :func:`scanpy.pl.embedding`.

    Returns
    -------
    The matplotlib axes when ``show=False``, else ``None``.

    Raises
    ------
    KeyError
        ``obsm[basis]`` does not exist (run :func:`scxtrimo.tl.embed` first).
    """
    data = rna_modality(adata)
    if basis not in data.obsm:
        raise KeyError(f"obsm[{basis!r}] not found; run scxtrimo.tl.embed first.")
    key = f"neighbors_{basis}"
    umap_key = f"X_umap_{basis}"
    if umap_key not in data.obsm:
        if key not in data.uns:
            sc.pp.neighbors(data, n_neighbors=n_neighbors, use_rep=basis, key_added=key, random_state=random_state)
        umap = sc.tl.umap(data, neighbors_key=key, random_state=random_state, copy=True).obsm["X_umap"]
        data.obsm[umap_key] = umap
    return sc.pl.embedding(data, basis=umap_key, color=color, show=show, save=save, **kwargs)
