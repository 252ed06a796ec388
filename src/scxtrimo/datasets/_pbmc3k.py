from __future__ import annotations

from importlib import resources

import anndata as ad


def pbmc3k() -> ad.AnnData:
    """2,638 peripheral blood mononuclear cells from a healthy donor (10x v1), with labels.

    The cells of the scanpy PBMC 3k tutorial, bundled so that everything runs offline.

    Returns
    -------
    anndata.AnnData
        2,638 cells x 13,714 genes. ``X``: raw UMI counts, CSR, float32. ``var_names``: gene
        symbols. ``obs['cell_type']``: the tutorial's 8 cell-type labels (categorical);
        the tutorial's QC columns ``obs['n_counts']`` (total UMIs), ``obs['n_genes']``
        (expressed genes, counted before the tutorial dropped genes seen in fewer than 3
        cells, so a few above the expressed genes of ``X``) and ``obs['percent_mito']`` (a
        fraction in [0, 1] despite its name); ``obs['batch']``. A new object on every call.

    Notes
    -----
    Counts were recovered exactly from the tutorial's stored log1p values (every cell's total
    equals ``obs['n_counts']``). 11,213 of the 13,714 genes match the 19,264-gene reference
    list exactly.
    """
    path = resources.files("scxtrimo.datasets").joinpath("pbmc3k.h5ad")
    with resources.as_file(path) as p:
        return ad.read_h5ad(p)
