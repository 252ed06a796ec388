from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc

from .._anndata import rna_modality, xtrimo_uns
from .._validation import check_embedding
from ..tl._checkpoint import fingerprint

#: Fewest cells a kNN graph and a UMAP are computed for.
MIN_CELLS = 3


def _umap(emb: np.ndarray, *, obs_names: pd.Index, basis: str, key: str, n_neighbors: int, random_state: int):
    """kNN graph and UMAP of ``emb`` on a throw-away AnnData: ``(uns entry, obsp, umap)``."""
    tmp = ad.AnnData(obs=pd.DataFrame(index=obs_names), obsm={basis: emb})
    sc.pp.neighbors(tmp, n_neighbors=n_neighbors, use_rep=basis, key_added=key, random_state=random_state)
    umap = sc.tl.umap(tmp, neighbors_key=key, random_state=random_state, copy=True).obsm["X_umap"]
    return tmp.uns[key], dict(tmp.obsp), umap


def embedding(adata, *, color=None, basis: str = "X_xtrimo", n_neighbors: int = 15, random_state: int = 0,
              show: bool | None = None, save: str | None = None, **kwargs):
    """UMAP of an xTrimoGene embedding, computed through scanpy if missing or out of date.

    The kNN graph goes to ``uns['neighbors_<basis>']`` / ``obsp`` under that key and the UMAP to
    ``obsm['X_umap_<basis>']``, so a PCA-based ``X_umap`` and ``neighbors`` survive. The settings
    and a checksum of the embedding the UMAP was computed from are kept in
    ``uns['xtrimo']['umap'][basis]``: a later call reuses the UMAP only while the embedding,
    ``n_neighbors`` and ``random_state`` are the same (after :func:`scxtrimo.tl.embed` with other
    settings, or :func:`scxtrimo.tl.evaluate_clustering` with its own graph, it is recomputed).

    Parameters
    ----------
    adata
        AnnData (or MuData: its RNA modality) with ``obsm[basis]`` (n_obs x d).
    color
        ``obs`` columns or genes to color by, as in :func:`scanpy.pl.embedding`.
    basis
        ``obsm`` key of the embedding (default ``"X_xtrimo"``).
    n_neighbors
        Neighbours per cell of the kNN graph the UMAP is computed from (scanpy's default, 15).
    random_state
        Seed of the graph and of the UMAP layout.
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
    ValueError
        ``obsm[basis]`` has non-finite values; fewer than 3 cells.
    TypeError
        ``obsm[basis]`` is a sparse matrix.

    If the plot fails (an unknown ``color``, a bad keyword for scanpy), ``adata`` keeps the graph
    and UMAP it had before the call.
    """
    data = rna_modality(adata)
    if basis not in data.obsm:
        raise KeyError(f"obsm[{basis!r}] not found; run scxtrimo.tl.embed first.")
    emb = check_embedding(data.obsm[basis], basis)
    if data.n_obs < MIN_CELLS:
        raise ValueError(f"A UMAP needs at least {MIN_CELLS} cells; this AnnData has {data.n_obs}.")
    key, umap_key = f"neighbors_{basis}", f"X_umap_{basis}"
    record = {"n_neighbors": int(n_neighbors), "random_state": int(random_state), "checksum": fingerprint((emb,))}
    entry = data.uns.get("xtrimo")
    stored = entry.get("umap", {}).get(basis) if isinstance(entry, dict) else None
    if umap_key in data.obsm and stored == record:
        return sc.pl.embedding(data, basis=umap_key, color=color, show=show, save=save, **kwargs)

    graph, obsp, umap = _umap(emb, obs_names=data.obs_names, basis=basis, key=key, n_neighbors=n_neighbors,
                              random_state=random_state)
    saved = ({k: data.obsp[k] for k in obsp if k in data.obsp}, data.uns.get(key), data.obsm.get(umap_key),
             {**entry} if isinstance(entry, dict) else entry)
    data.uns[key] = graph
    for k, v in obsp.items():
        data.obsp[k] = v
    data.obsm[umap_key] = umap
    entry = xtrimo_uns(data)
    entry["umap"] = {**entry.get("umap", {}), basis: record}
    try:
        return sc.pl.embedding(data, basis=umap_key, color=color, show=show, save=save, **kwargs)
    except Exception:
        _restore(data, key=key, umap_key=umap_key, obsp_keys=list(obsp), saved=saved)
        raise


def _restore(data, *, key: str, umap_key: str, obsp_keys: list[str], saved) -> None:
    """Put back the graph, UMAP and ``uns['xtrimo']`` that :func:`embedding` replaced."""
    old_obsp, old_graph, old_umap, old_entry = saved
    for k in obsp_keys:
        if k in old_obsp:
            data.obsp[k] = old_obsp[k]
        else:
            del data.obsp[k]
    for mapping, k, old in ((data.uns, key, old_graph), (data.obsm, umap_key, old_umap), (data.uns, "xtrimo", old_entry)):
        if old is None:
            mapping.pop(k, None)
        else:
            mapping[k] = old
