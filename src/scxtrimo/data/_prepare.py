"""Turn any supported AnnData into log1p CP10k blocks over the reference genes, streaming.

This is the single input path of :func:`scxtrimo.tl.embed` and :func:`scxtrimo.tl.pretrain`:
it never modifies the user's AnnData and never holds more than one block of cells in a new
matrix, so backed (on-disk) AnnData works.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .._reference import reference_genes
from .._validation import check_finite_nonnegative
from ..pp._align import GeneMapping, align_matrix, gene_mapping
from ..pp._normalize import is_xtrimo_normalized, log1p_normalize, to_counts

BLOCK_CELLS = 10_000
DENSE_BLOCK_BYTES = 256 * 2**20  # a dense input block (cells x input genes, float32) stays under this


@dataclass(frozen=True)
class PreparedInput:
    """How an AnnData is read: which matrix, how its genes map, what its values are.

    source : ``"X"`` or ``"layers['counts']"``.
    mapping : gene mapping to the reference list, or ``None`` when the data is already aligned.
    kind : ``"counts"``, ``"log1p"``, ``"normalized"``, or ``"prepared"`` (log1p CP10k on the
        reference genes, as written by :func:`scxtrimo.pp.normalize` after ``align_genes``).
    n_matched : reference genes present in the input.
    """

    adata: ad.AnnData
    source: str
    mapping: GeneMapping | None
    kind: str
    n_matched: int

    def matrix(self):
        return self.adata.X if self.source == "X" else self.adata.layers["counts"]

    def block_cells(self) -> int:
        """Cells per streamed block: 10,000 for sparse input; fewer for a dense matrix, so that
        one block of it (``cells x n_vars`` float32) stays under 256 MB (at least 256 cells)."""
        M = self.matrix()
        if sp.issparse(M) or hasattr(M, "format"):  # in memory, or anndata's backed CSR/CSC dataset
            return BLOCK_CELLS
        return int(min(BLOCK_CELLS, max(256, DENSE_BLOCK_BYTES // (4 * max(1, self.adata.n_vars)))))


def _is_aligned(adata: ad.AnnData) -> bool:
    ref = reference_genes()
    return adata.n_vars == len(ref) and bool((adata.var_names == ref).all())


def prepare_input(adata: ad.AnnData, *, gene_symbols: str | None = None) -> PreparedInput:
    """Decide how to read ``adata``; raises the alignment/validation errors up front."""
    if adata.n_obs == 0:
        raise ValueError("The AnnData has no cells (n_obs == 0).")
    aligned = _is_aligned(adata) and gene_symbols is None
    if aligned and is_xtrimo_normalized(adata):
        return PreparedInput(adata, "X", None, "prepared", int(adata.uns["xtrimo"].get("align", {}).get("n_matched", len(reference_genes()))))
    source = "layers['counts']" if "counts" in adata.layers else "X"
    mapping = None
    n_matched = len(reference_genes())
    if not aligned:
        names = adata.var_names if gene_symbols is None else adata.var[gene_symbols]
        if gene_symbols is not None and gene_symbols not in adata.var:
            raise KeyError(f"gene_symbols={gene_symbols!r} is not a column of adata.var ({list(adata.var.columns)}).")
        mapping = gene_mapping(names, reference_genes(), var=adata.var)
        n_matched = mapping.n_matched
    prep = PreparedInput(adata, source, mapping, "counts", n_matched)
    first = prep.matrix()[: min(prep.block_cells(), adata.n_obs)]
    what = "adata.X" if source == "X" else "adata.layers['counts']"
    _, kind = to_counts(first, uns=adata.uns, what=what)
    return PreparedInput(adata, source, mapping, kind, n_matched)


def log1p_rows(prep: PreparedInput, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``[start, stop)`` of a prepared input as log1p CP10k on the reference genes.

    Parameters
    ----------
    prep
        From :func:`prepare_input`; its AnnData may be backed (only these rows are read).
    start, stop
        Row range, ``0 <= start <= stop <= n_obs``.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(stop - start, 19264)`` float32, sorted indices, no explicit zeros.
    """
    M = prep.matrix()
    n_ref = len(reference_genes())
    what = "adata.X" if prep.source == "X" else "adata.layers['counts']"
    block = M[start:stop]
    if prep.kind == "prepared":
        check_finite_nonnegative(block, what=what)
        out = sp.csr_matrix(block, dtype=np.float32)
        out.eliminate_zeros()
        out.sort_indices()
        return out
    if prep.mapping is not None:
        block = align_matrix(block, prep.mapping, n_ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # already warned once in prepare_input
        counts, _ = to_counts(block, kind=prep.kind, what=what, warn=False)
    return log1p_normalize(counts)


def iter_log1p_blocks(prep: PreparedInput, *, block_cells: int | None = None) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """Yield ``(start, stop, X)`` with ``X`` the log1p CP10k CSR float32 block on the 19,264 genes.

    ``block_cells`` defaults to :meth:`PreparedInput.block_cells` (bounded bytes per block).
    """
    block_cells = block_cells or prep.block_cells()
    for start in range(0, prep.adata.n_obs, block_cells):
        stop = min(start + block_cells, prep.adata.n_obs)
        yield start, stop, log1p_rows(prep, start, stop)


def check_no_empty_cells(X: sp.csr_matrix, obs_names, *, start: int = 0) -> None:
    """Raise ``ValueError`` if a row of the log1p block ``X`` has no expressed reference gene.

    ``obs_names`` are the AnnData's cell names; ``start`` is the block's first row in them.
    """
    empty = np.flatnonzero(np.diff(X.indptr) == 0)
    if empty.size:
        names = list(obs_names[start + empty[:5]])
        raise ValueError(
            f"{empty.size} cells (e.g. {names}) express none of the reference genes and cannot be "
            "used. Remove them first, e.g. `sc.pp.filter_cells(adata, min_genes=1)`."
        )
