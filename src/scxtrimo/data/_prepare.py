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
from .._validation import check_finite_nonnegative, is_integer_valued, matrix_values
from ..pp._align import GeneMapping, align_matrix, gene_mapping, warn_duplicates
from ..pp._normalize import _LOG_MAX, is_xtrimo_normalized, log1p_normalize, to_counts
from ._depth import TARGET_SUM, append_depth, target_depth

BLOCK_CELLS = 10_000
_CHECK_ROWS = 2_000  # cells whose totals are checked before X is taken as the model's input
DENSE_BLOCK_BYTES = 256 * 2**20  # a dense input block (cells x input genes, float32) stays under this


@dataclass(frozen=True)
class PreparedInput:
    """How an AnnData is read: which matrix, how its genes map, what its values are.

    mapping : gene mapping to the reference list, or ``None`` when the data is already aligned.
    kind : ``"counts"``, ``"log1p"``, ``"normalized"``, or ``"prepared"`` (log1p CP10k on the
        reference genes, as written by :func:`scxtrimo.pp.normalize` after ``align_genes``).
    n_matched : reference genes present in the input.
    layer : the ``layers`` key read (``"counts"`` when present, or the layer the caller named),
        ``None`` for ``X`` (or ``raw.X``).
    named : whether the caller named the matrix (``layer=`` or ``use_raw=True``;
        ``bulk="normalized"`` then reads it too).
    use_raw : the matrix is ``adata.raw.X``, its genes ``adata.raw.var``.
    """

    adata: ad.AnnData
    mapping: GeneMapping | None
    kind: str
    n_matched: int
    layer: str | None = None
    named: bool = False
    use_raw: bool = False

    @property
    def source(self) -> str:
        """The matrix read, as ``uns['xtrimo']['params']`` records it: ``"X"``, ``"raw.X"`` or ``"layers['<name>']"``."""
        if self.use_raw:
            return "raw.X"
        return "X" if self.layer is None else f"layers[{self.layer!r}]"

    @property
    def what(self) -> str:
        """The matrix read, as error messages name it: ``"adata.X"``, ``"adata.raw.X"`` or ``"adata.layers['<name>']"``."""
        return f"adata.{self.source}"

    @property
    def var_names(self):
        """Gene names of :meth:`matrix`'s columns (``raw.var_names`` with ``use_raw``)."""
        return self.adata.raw.var_names if self.use_raw else self.adata.var_names

    @property
    def n_vars(self) -> int:
        """Columns of :meth:`matrix`."""
        return len(self.var_names)

    def matrix(self):
        if self.use_raw:
            return self.adata.raw.X
        return self.adata.X if self.layer is None else self.adata.layers[self.layer]

    def block_cells(self) -> int:
        """Cells per streamed block: 10,000 for sparse input; fewer for a dense matrix, so that
        one block of it (``cells x n_vars`` float32) stays under 256 MB (at least 256 cells)."""
        M = self.matrix()
        if sp.issparse(M) or hasattr(M, "format"):  # in memory, or anndata's backed CSR/CSC dataset
            return BLOCK_CELLS
        return int(min(BLOCK_CELLS, max(256, DENSE_BLOCK_BYTES // (4 * max(1, self.n_vars)))))


def _is_aligned(adata: ad.AnnData) -> bool:
    ref = reference_genes()
    return adata.n_vars == len(ref) and bool((adata.var_names == ref).all())


def _holds_log1p_cp10k(adata: ad.AnnData) -> bool:
    """Whether ``X`` of data marked by :func:`scxtrimo.pp.normalize` is log1p CP10k as the model takes it:
    the marker's ``target_sum`` is 10,000 and the first cells' ``expm1`` totals are 10,000.

    Not so after ``normalize(target_sum=None)`` (the median total) or when ``X`` was replaced since;
    such data are then read like any other (``layers['counts']`` first).
    """
    target = adata.uns["xtrimo"]["normalize"].get("target_sum")
    if target is None or not np.isclose(float(target), TARGET_SUM):
        return False
    X = adata.X[: min(_CHECK_ROWS, adata.n_obs)]
    if X is None:
        return False
    X = sp.csr_matrix(X, dtype=np.float64)
    if X.nnz and (not np.isfinite(X.data).all() or X.data.max() >= _LOG_MAX):
        return False
    sums = np.asarray(X.expm1().sum(axis=1)).ravel()
    sums = sums[np.diff(X.indptr) > 0]
    return bool(np.allclose(sums, TARGET_SUM, rtol=1e-2))


def check_source(adata: ad.AnnData, layer: str | None, use_raw: bool = False) -> None:
    """Check the caller's choice of matrix before anything is read or written.

    ``KeyError`` naming the layers there are if ``layer`` is given and not one of them;
    ``ValueError`` for ``use_raw`` with ``layer`` or without ``adata.raw``; ``TypeError`` for a
    ``use_raw`` that is not a bool.
    """
    if not isinstance(use_raw, (bool, np.bool_)):
        raise TypeError(f"use_raw must be True or False, got {use_raw!r}.")
    if use_raw and layer is not None:
        raise ValueError(f"Pass either layer={layer!r} or use_raw=True, not both: they name two different matrices.")
    if use_raw and adata.raw is None:
        raise ValueError("use_raw=True, but adata.raw is None. Leave use_raw=False to read layers['counts'] "
                         "(if present) or X, or name the layer that holds the counts (layer=...).")
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"layer={layer!r} is not in adata.layers (it has {list(adata.layers.keys())}); "
                       "name the layer that holds the counts, or leave layer=None to read layers['counts'] "
                       "if present, else X.")


def _raw_holds_counts(adata: ad.AnnData) -> bool:
    """Whether ``adata.raw`` is there and its first cells are non-negative whole numbers (raw counts)."""
    if adata.raw is None:
        return False
    try:
        first = adata.raw.X[: min(_CHECK_ROWS, adata.n_obs)]
    except Exception:  # noqa: BLE001 - an unreadable raw only loses the hint
        return False
    values = matrix_values(first)
    return values.size > 0 and bool(np.isfinite(values).all() and values.min() >= 0) and is_integer_valued(first)


def _raw_hint(adata: ad.AnnData, what: str) -> str:
    return (f"adata.raw holds raw counts: pass use_raw=True to read them instead of {what} "
            "(CELLxGENE and many published .h5ad files keep the counts there).")


def prepare_input(adata: ad.AnnData, *, gene_symbols: str | None = None, layer: str | None = None,
                  use_raw: bool = False) -> PreparedInput:
    """Decide how to read ``adata``; raises the alignment/validation errors up front.

    ``layer``: read ``adata.layers[layer]`` (raw counts, or normalized / log1p values turned back
    into counts); ``use_raw``: read ``adata.raw.X`` with the genes of ``adata.raw.var``; neither:
    ``layers['counts']`` if present, else ``X`` (or ``X`` as it is when
    :func:`scxtrimo.pp.normalize` prepared it for the model). When ``X`` is read, is not raw
    counts and ``adata.raw`` holds counts, the error or warning about ``X`` says to pass
    ``use_raw=True``.
    """
    if adata.n_obs == 0:
        raise ValueError("The AnnData has no cells (n_obs == 0).")
    check_source(adata, layer, use_raw)
    use_raw = bool(use_raw)
    var = adata.raw.var if use_raw else adata.var
    aligned = (not use_raw) and _is_aligned(adata) and gene_symbols is None
    if layer is None and aligned and is_xtrimo_normalized(adata) and _holds_log1p_cp10k(adata):
        return PreparedInput(adata, None, "prepared", int(adata.uns["xtrimo"].get("align", {}).get("n_matched", len(reference_genes()))))
    named = layer is not None or use_raw
    if layer is None and not use_raw:
        layer = "counts" if "counts" in adata.layers else None
    if layer is None and not use_raw and adata.X is None:
        raise ValueError("adata.X is None and there is no layers['counts']; put the expression matrix in X, "
                         "or name the matrix that holds it (layer=..., or use_raw=True for adata.raw.X).")
    mapping = None
    n_matched = len(reference_genes())
    if not aligned:
        if gene_symbols is not None and gene_symbols not in var:
            where = "adata.raw.var" if use_raw else "adata.var"
            raise KeyError(f"gene_symbols={gene_symbols!r} is not a column of {where} ({list(var.columns)}).")
        names = var.index if gene_symbols is None else var[gene_symbols]
        mapping = gene_mapping(names, reference_genes(), var=var)
        warn_duplicates(mapping, stacklevel=4)
        n_matched = mapping.n_matched
    prep = PreparedInput(adata, mapping, "counts", n_matched, layer, named, use_raw)
    first = prep.matrix()[: min(prep.block_cells(), adata.n_obs)]
    may_hint = not named and layer is None  # X is read: raw may hold the counts X is not
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, kind = to_counts(first, uns=adata.uns, what=prep.what)
    except ValueError as err:
        if may_hint and _raw_holds_counts(adata):
            raise ValueError(f"{err} {_raw_hint(adata, prep.what)}") from None
        raise
    hint = may_hint and kind != "counts" and _raw_holds_counts(adata)
    for w in caught:
        message = f"{w.message} {_raw_hint(adata, prep.what)}" if hint else w.message
        warnings.warn(message, w.category, stacklevel=3)
    return PreparedInput(adata, mapping, kind, n_matched, layer, named, use_raw)


def _check_same_kind(block, prep: PreparedInput, start: int, stop: int, what: str) -> None:
    """``ValueError`` if rows ``[start, stop)`` are not of the kind detected on the first cells
    (integer counts against log1p or normalized values): they would be read as the wrong kind."""
    if start == 0:
        return
    integer = is_integer_valued(block)
    if integer == (prep.kind == "counts") or matrix_values(block).size == 0:
        return
    this = "raw counts" if integer else "not raw counts"
    raise ValueError(f"cells {start}-{stop - 1} of {what} are {this}, but the first cells are {prep.kind} "
                     "(the kind is detected on the first cells and applies to all). Store one kind of value "
                     "for every cell, e.g. the raw counts.")


def counts_rows(prep: PreparedInput, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``[start, stop)`` of a prepared input as counts on the 19,264 reference genes.

    Raw counts are returned as they are (aligned); log1p or normalized input is turned back into
    counts (:func:`scxtrimo.pp._normalize.to_counts`). For data prepared by
    :func:`scxtrimo.pp.normalize` the counts are its ``layers['counts']``.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(stop - start, 19264)`` float32, no explicit zeros.

    Raises
    ------
    ValueError
        Prepared data without ``layers['counts']`` (the counts are unknown).
    """
    what = prep.what
    if prep.kind == "prepared":
        if "counts" not in prep.adata.layers:
            raise ValueError(
                "This data holds log1p values without layers['counts'], so its total counts are unknown; "
                "pass the raw counts (or keep layers['counts'] from scxtrimo.pp.normalize)."
            )
        block = prep.adata.layers["counts"][start:stop]
        check_finite_nonnegative(block, what="adata.layers['counts']")
        out = sp.csr_matrix(block, dtype=np.float32)
        out.eliminate_zeros()
        return out
    block = prep.matrix()[start:stop]
    _check_same_kind(block, prep, start, stop, what)
    if prep.mapping is not None:
        block = align_matrix(block, prep.mapping, len(reference_genes()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # already warned once in prepare_input
        counts, _ = to_counts(block, kind=prep.kind, what=what, warn=False)
    return counts


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
    if prep.kind == "prepared":
        block = prep.matrix()[start:stop]
        check_finite_nonnegative(block, what=prep.what)
        out = sp.csr_matrix(block, dtype=np.float32)
        out.sum_duplicates()  # a gene stored twice is one token with the summed value
        out.eliminate_zeros()
        out.sort_indices()
        return out
    return log1p_normalize(counts_rows(prep, start, stop))


def row_totals(prep: PreparedInput, start: int, stop: int) -> np.ndarray:
    """``(stop - start,)`` float64 total counts of rows ``[start, stop)`` over the reference genes."""
    return np.asarray(counts_rows(prep, start, stop).sum(axis=1), dtype=np.float64).ravel()


def depth_rows(prep: PreparedInput, start: int, stop: int, depth: tuple[float, str],
               totals: np.ndarray | None = None) -> sp.csr_matrix:
    """Rows ``[start, stop)`` as a model with depth tokens takes them: ``(n, 19264 + 2)`` CSR float32.

    Columns 0..19263 are log1p CP10k, then ``T`` (:func:`scxtrimo.data._depth.target_depth` of
    the total with ``depth = (value, mode)``) and ``S = log10(total)``; the total is the sum of
    the row's reference-gene counts, or ``totals[start:stop]`` when given (the authors' option
    for log-normalized input with known raw totals). A non-positive T or S is left out.
    """
    if prep.kind == "prepared" or totals is not None:
        X = log1p_rows(prep, start, stop)
        tot = totals[start:stop] if totals is not None else row_totals(prep, start, stop)
    else:
        C = counts_rows(prep, start, stop)
        X = log1p_normalize(C)
        tot = np.asarray(C.sum(axis=1), dtype=np.float64).ravel()
    with np.errstate(divide="ignore"):
        S = np.log10(np.asarray(tot, dtype=np.float64))
    return append_depth(X, target_depth(tot, *depth), S)


def iter_log1p_blocks(prep: PreparedInput, *, block_cells: int | None = None, depth: tuple[float, str] | None = None,
                      totals: np.ndarray | None = None) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """Yield ``(start, stop, X)`` with ``X`` the log1p CP10k CSR float32 block on the 19,264 genes.

    ``block_cells`` defaults to :meth:`PreparedInput.block_cells` (bounded bytes per block).
    With ``depth = (value, mode)`` the blocks carry the depth tokens too (:func:`depth_rows`).
    """
    block_cells = block_cells or prep.block_cells()
    for start in range(0, prep.adata.n_obs, block_cells):
        stop = min(start + block_cells, prep.adata.n_obs)
        if depth is None:
            yield start, stop, log1p_rows(prep, start, stop)
        else:
            yield start, stop, depth_rows(prep, start, stop, depth, totals)


def gene_token_counts(X: sp.csr_matrix, n_genes: int) -> np.ndarray:
    """Expressed reference genes per row of a model-input block (depth columns not counted)."""
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    return np.diff(X.indptr) - np.bincount(rows[X.indices >= n_genes], minlength=X.shape[0])


def check_no_empty_cells(X: sp.csr_matrix, obs_names, *, start: int = 0) -> None:
    """Raise ``ValueError`` if a row of the log1p block ``X`` has no expressed reference gene.

    ``obs_names`` are the AnnData's cell names; ``start`` is the block's first row in them.
    Depth-token columns (beyond the 19,264 genes) do not count as expressed genes.
    """
    empty = np.flatnonzero(gene_token_counts(X, len(reference_genes())) == 0)
    if empty.size:
        names = list(obs_names[start + empty[:5]])
        raise ValueError(
            f"{empty.size} cells (e.g. {names}) express none of the reference genes and cannot be "
            "used. Remove them first, e.g. `sc.pp.filter_cells(adata, min_genes=1)`."
        )
