"""The xTrimoGene reference gene vocabulary (paper appendix 1).

19,264 HGNC protein-coding and mitochondrial gene symbols. The row order is the model's gene
order: row ``i`` of every gene-embedding table belongs to gene ``i`` of this list.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import pandas as pd

N_GENES = 19_264
_FILE = "OS_scRNA_gene_index.19264.tsv"


@lru_cache(maxsize=1)
def reference_genes() -> pd.Index:
    """Return the 19,264 reference gene symbols in model order.

    Returns
    -------
    pandas.Index
        ``str`` index of length 19,264, unique, in the order of the model's gene embedding.
    """
    with resources.files("scxtrimo._resources").joinpath(_FILE).open("r") as fh:
        table = pd.read_csv(fh, sep="\t")
    if list(table.columns) != ["gene_name", "index"] or len(table) != N_GENES:
        raise RuntimeError(f"The packaged gene list {_FILE} is corrupt; reinstall scxtrimo.")
    if not (table["index"].to_numpy() == range(N_GENES)).all():
        raise RuntimeError(f"The packaged gene list {_FILE} is out of order; reinstall scxtrimo.")
    genes = pd.Index(table["gene_name"].astype(str), name="gene_name")
    if not genes.is_unique:
        raise RuntimeError(f"The packaged gene list {_FILE} has duplicates; reinstall scxtrimo.")
    return genes
