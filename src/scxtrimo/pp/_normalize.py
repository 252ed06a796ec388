"""Library-size normalization and log1p, with recovery of counts (paper appendix 1).

The model's input values are ``log1p`` of counts per 10,000 (CP10k), the scanpy standard:
``sc.pp.normalize_total(adata, target_sum=1e4); sc.pp.log1p(adata)``. Public data often come
already normalized or logged; the paper's rule for such data is to take the smallest non-zero
value as one count and rescale, so that they can be normalized like raw counts.
:func:`to_counts` recognises raw counts, log1p data and normalized data and returns
(estimated) counts; :func:`log1p_normalize` turns counts into the model's input scale. Both are
shared with the streaming embedder, which applies them one block of cells at a time.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp

from .._anndata import UNS_KEY, rna_modality
from .._validation import check_finite_nonnegative, check_positive, is_integer_valued

__all__ = ["normalize", "to_counts", "log1p_normalize", "median_total", "is_xtrimo_normalized"]

INPUT_KINDS = ("counts", "log1p", "normalized")

#: Cells with at most this many expressed genes fail the paper's QC (appendix 1: "> 200").
MIN_GENES_QC = 200
N_GENES_KEY = "xtrimo_n_genes"

_SAMPLE_ROWS = 2_000  # rows inspected when guessing what the input is
_SCALED_COUNT_SCORE = 0.9  # share of values that must be whole multiples of the cell's unit
_LOG_MAX = 20.0  # log1p data never exceeds this (log1p(1e8) ~ 18.4)
_ROW_SUM_CV = 1e-3  # expm1 row sums this constant mean "log1p of normalize_total"
_DETECT_REL_TOL = 2e-3  # relative tolerance of "whole multiple" when guessing the input kind


# --------------------------------------------------------------------------------------------
# helpers


def _near_integer(values: np.ndarray, rel: float = 1e-5) -> np.ndarray:
    """Element-wise: within ``2e-3 + rel * |v|`` of an integer.

    The default ``rel`` covers float32 round-off; detection uses a looser ``rel`` so that data
    stored with fewer digits (e.g. float16 or rounded values) are still recognised.
    """
    v = np.asarray(values, dtype=np.float64)
    return np.abs(v - np.rint(v)) <= 2e-3 + rel * np.abs(v)


def _row_min(X: sp.csr_matrix) -> np.ndarray:
    """Smallest stored value of each row (0 for empty rows); assumes no explicit zeros."""
    nnz = np.diff(X.indptr)
    out = np.zeros(X.shape[0], dtype=np.float64)
    rows = nnz > 0
    if rows.any():
        out[rows] = np.minimum.reduceat(X.data.astype(np.float64), X.indptr[:-1][rows])
    return out


def _row_sums(X) -> np.ndarray:
    return np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()


def _sample_rows(X: sp.csr_matrix) -> sp.csr_matrix:
    if X.shape[0] <= _SAMPLE_ROWS:
        return X
    idx = np.linspace(0, X.shape[0] - 1, _SAMPLE_ROWS).round().astype(np.int64)
    return X[idx]


def _with_data(X: sp.csr_matrix, data: np.ndarray) -> sp.csr_matrix:
    out = sp.csr_matrix(
        (np.asarray(data, dtype=np.float32), X.indices.copy(), X.indptr.copy()), shape=X.shape
    )
    out.eliminate_zeros()
    return out


def _ratios_to_row_min(X: sp.csr_matrix) -> np.ndarray:
    return X.data.astype(np.float64) / np.repeat(_row_min(X), np.diff(X.indptr))


def _scaled_count_score(X: sp.csr_matrix) -> float:
    """Share of values (beyond each cell's smallest) that are whole multiples of that smallest.

    Near 1 for library-size normalized counts (every value is count x per-cell factor); low for
    log1p data, whose ratios log1p(c·s)/log1p(s) are rarely whole numbers. NaN when no cell has
    a value above 1.5 times its smallest one (nothing to judge).
    """
    ratio = _ratios_to_row_min(X)
    ratio = ratio[ratio > 1.5]
    if ratio.size == 0:
        return float("nan")
    return float(_near_integer(ratio, rel=_DETECT_REL_TOL).mean())


def _constant_row_sums(X: sp.csr_matrix) -> bool:
    sums = _row_sums(X)
    sums = sums[sums > 0]
    if sums.size < 2:
        return False
    return bool(sums.std() / sums.mean() < _ROW_SUM_CV)


def _log_base(uns: Any) -> float | None:
    entry = uns.get("log1p") if uns is not None and hasattr(uns, "get") else None
    base = entry.get("base") if isinstance(entry, dict) else None
    return None if base is None else float(base)


def _expm1(X: sp.csr_matrix, base: float | None) -> sp.csr_matrix:
    data = X.data.astype(np.float64)
    if base is not None:
        data = data * np.log(base)
    with np.errstate(over="ignore"):
        data = np.expm1(data)
    if not np.isfinite(data).all() or (data.size and data.max() > np.finfo(np.float32).max):
        raise ValueError(f"Values up to {X.data.max():.4g} treated as log1p overflow when reverted: they are not "
                         "log-transformed. Pass raw counts, or the matrix without a stale `uns['log1p']` marker.")
    return _with_data(X, data)


def _detect(X: sp.csr_matrix, uns: Any) -> tuple[str, str]:
    """Guess what ``X`` holds; returns ``(kind, human-readable reason)``."""
    if X.nnz == 0 or is_integer_valued(X):
        return "counts", "integer values"
    stale = ""
    if uns is not None and hasattr(uns, "__contains__") and "log1p" in uns:
        top = X.data.max()
        if top < _LOG_MAX:
            return "log1p", "non-integer values and `uns['log1p']` (scanpy's log1p marker)"
        stale = f" (`uns['log1p']` ignored: values up to {top:.4g} are not logged)"
    kind, reason = _detect_from_values(X)
    return kind, reason + stale


def _detect_from_values(X: sp.csr_matrix) -> tuple[str, str]:
    """``'normalized'`` or ``'log1p'`` for non-integer ``X``, from its values alone."""
    sample = _sample_rows(X)
    score = _scaled_count_score(sample)
    if np.isnan(score) or score >= _SCALED_COUNT_SCORE:
        return "normalized", (
            "non-integer values that are whole multiples of each cell's smallest value "
            "(library-size normalized counts, not logged)"
        )
    if sample.data.max() < _LOG_MAX:
        E = _expm1(sample, None)
        e_score = _scaled_count_score(E)
        if (not np.isnan(e_score) and e_score >= _SCALED_COUNT_SCORE) or _constant_row_sums(E):
            return "log1p", (
                f"non-integer values below {_LOG_MAX:g} that become scaled counts after expm1 "
                "(log1p-transformed data)"
            )
    return "normalized", (
        "non-integer values that are neither counts, scaled counts nor log1p of scaled counts "
        "(e.g. denoised or ambient-corrected data); treated as normalized"
    )


def _rescale_per_cell(X: sp.csr_matrix) -> tuple[sp.csr_matrix, bool]:
    """Divide each row by its smallest non-zero value; snap to integers if all are whole."""
    data = _ratios_to_row_min(X)
    whole = bool(_near_integer(data).all())
    if whole:
        data = np.rint(data)
    return _with_data(X, data), whole


# --------------------------------------------------------------------------------------------
# internal API shared with tl.embed


def to_counts(
    X,
    *,
    uns: Any = None,
    kind: str | None = None,
    what: str = "adata.X",
    warn: bool = True,
) -> tuple[sp.csr_matrix, str]:
    """Return count-scale values for an expression matrix and say what the input was.

    Parameters
    ----------
    X
        ``(n_obs, n_genes)`` dense or sparse, non-negative and finite. Not modified.
    uns
        The AnnData's ``uns``; a ``'log1p'`` key (written by ``sc.pp.log1p``, with an optional
        ``'base'``) marks non-integer data as logged.
    kind
        Skip detection and treat ``X`` as ``'counts'``, ``'log1p'`` or ``'normalized'``. A
        streaming caller can detect on the first block and pass the result for the others, so
        that every block is handled alike.
    what
        Name of ``X`` in messages.
    warn
        Emit the ``UserWarning`` for non-count input.

    Returns
    -------
    counts : scipy.sparse.csr_matrix
        ``(n_obs, n_genes)`` ``float32``, no explicit zeros: the input itself for counts, else
        estimated counts.
    kind : str
        ``'counts'`` (integer-valued input), ``'log1p'`` (log1p-transformed input, detected from
        ``uns['log1p']`` or from values below 20 that are scaled counts after ``expm1``, or whose
        ``expm1`` row sums are constant) or ``'normalized'`` (other non-integer input).

    Notes
    -----
    Paper appendix 1 turns normalized data back into counts by taking the smallest non-zero
    value of the matrix as one count. Library-size normalization scales each cell by its own
    factor, so here each **cell's** smallest non-zero value is one count. For a matrix with one
    global scale the two rules agree up to that scale; and the final log1p CP10k values are the
    same under either rule, because normalizing each cell to ``target_sum`` removes any
    per-cell factor. log1p input is first reverted with ``expm1`` (``base**x - 1`` when
    ``uns['log1p']['base']`` is set); if that gives whole numbers they are the counts, otherwise
    the per-cell rule follows. Rescaled values that are all within round-off of integers are
    rounded.

    Raises
    ------
    ValueError
        ``X`` has negative, NaN or infinite values, or ``kind`` is not one of the three names.

    Warns
    -----
    UserWarning
        Whenever the input is not raw counts: what was detected and what was done.
    """
    if kind is not None and kind not in INPUT_KINDS:
        raise ValueError(f"kind must be one of {INPUT_KINDS} or None, got {kind!r}.")
    if np.issubdtype(X.dtype, np.signedinteger):  # before float32 hides it: negative values from an overflow
        check_finite_nonnegative(X, what=what)
    if sp.issparse(X):
        Xc = sp.csr_matrix(X, dtype=np.float32, copy=True)
    else:
        Xc = sp.csr_matrix(np.asarray(X, dtype=np.float32))
    check_finite_nonnegative(Xc, what=what)
    Xc.eliminate_zeros()
    if kind is None:
        kind, reason = _detect(Xc, uns)
    else:
        reason = f"kind={kind!r} given by the caller"

    if kind == "counts":
        return Xc, kind

    if kind == "log1p":
        E = _expm1(Xc, _log_base(uns))
        if bool(_near_integer(E.data).all()):
            counts = _with_data(E, np.rint(E.data.astype(np.float64)))
            action = "Reverted it with expm1, which gave whole counts."
        else:
            counts, whole = _rescale_per_cell(E)
            action = (
                "Reverted it with expm1, then took each cell's smallest non-zero value as 1 count "
                "(paper appendix 1)" + (", which gave whole counts." if whole else ".")
            )
    else:
        counts, whole = _rescale_per_cell(Xc)
        action = "Took each cell's smallest non-zero value as 1 count (paper appendix 1)" + (
            ", which gave whole counts." if whole else "."
        )
    if warn:
        warnings.warn(
            f"{what} is not raw counts: detected {reason}. {action} Normalization starts from "
            "these estimated counts; pass raw integer counts to skip this step.",
            UserWarning,
            stacklevel=2,
        )
    return counts, kind


def log1p_normalize(counts, target_sum: float = 1e4) -> sp.csr_matrix:
    """``log1p`` of counts scaled to ``target_sum`` per cell (the model's input values).

    Equal, to ``float32`` precision, to ``sc.pp.normalize_total(target_sum=target_sum)``
    followed by ``sc.pp.log1p``.

    Parameters
    ----------
    counts
        ``(n_obs, n_genes)`` non-negative counts, dense or sparse. Not modified.
    target_sum
        Total per cell after scaling (1e4: counts per 10,000).

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(n_obs, n_genes)`` ``float32``; cells with zero total stay zero.
    """
    C = sp.csr_matrix(counts, dtype=np.float32) if sp.issparse(counts) else sp.csr_matrix(
        np.asarray(counts, dtype=np.float32)
    )
    total = _row_sums(C)
    scale = np.zeros_like(total)
    np.divide(float(target_sum), total, out=scale, where=total > 0)
    data = np.log1p(C.data.astype(np.float64) * np.repeat(scale, np.diff(C.indptr)))
    return _with_data(C, data)


def median_total(totals) -> float:
    """The median of the positive per-cell (per-sample) totals, as float64.

    The target of scanpy's ``normalize_total(target_sum=None)``, which the authors' pipeline
    applies to raw bulk RNA-seq before ``log1p`` (``docs/scfoundation.md``,
    "Bulk RNA-seq"; paper section 5.4.3).

    Raises
    ------
    ValueError
        No total is positive.
    """
    totals = np.asarray(totals, dtype=np.float64).ravel()
    positive = totals[totals > 0]
    if positive.size == 0:
        raise ValueError("Every sample has a total of 0: there is no expression to normalize to the median total.")
    return float(np.median(positive))


def is_xtrimo_normalized(adata) -> bool:
    """True if :func:`normalize` has run on ``adata`` (or its RNA modality).

    Looks for the marker ``adata.uns['xtrimo']['normalize']``; then ``X`` holds log1p CP10k
    values and ``layers['counts']`` the counts.
    """
    entry = rna_modality(adata).uns.get(UNS_KEY)
    return isinstance(entry, dict) and "normalize" in entry


# --------------------------------------------------------------------------------------------
# public API


def normalize(
    adata,
    *,
    target_sum: float | None = 1e4,
    layer: str | None = None,
    copy: bool = False,
):
    """Normalize each cell to ``target_sum`` total counts and take ``log1p``.

    Implements the normalization of paper appendix 1 ("scRNA-seq data collection and
    processing"): library size to 10,000 per cell, then ``log1p``, as scanpy's
    ``normalize_total`` + ``log1p``. Input that is not raw counts is recognised and turned back
    into (estimated) counts first, the appendix's rule for normalized-only data (see
    :func:`~scxtrimo.pp._normalize.to_counts`). The appendix's quality control (keep cells with
    more than 200 expressed genes) is reported, not applied.

    Parameters
    ----------
    adata
        :class:`~anndata.AnnData` in memory, or a ``MuData`` (its RNA modality is normalized).
        ``X`` (or ``layers[layer]``), ``(n_obs, n_genes)``: raw counts, library-size normalized
        values or log1p-transformed values; non-negative and finite.
    target_sum
        Counts per cell after scaling; 1e4 gives log1p CP10k, the model's input scale.
        ``None``: the median of the cells' totals (scanpy's ``normalize_total`` convention),
        the authors' normalization of raw bulk RNA-seq (paper section 5.4.3; see also
        ``bulk=`` of :func:`scxtrimo.tl.embed`, which applies it on the fly).
    layer
        Read the input from ``adata.layers[layer]`` instead of ``X``. By default
        ``layers['counts']`` is read when present (as :func:`scxtrimo.tl.embed` reads it), else
        ``X``; another layer is refused while ``layers['counts']`` exists, as the counts written
        would replace it.
    copy
        Return a normalized copy instead of modifying ``adata`` (scanpy semantics). For a
        ``MuData``, the copy is a ``MuData``.

    Returns
    -------
    AnnData, MuData or None
        ``None`` if ``copy=False`` (``adata`` is modified), else the normalized copy. Written:

        - ``X``: log1p CP-``target_sum`` values, CSR ``float32``.
        - ``layers['counts']``: the counts the values were computed from (the input itself for
          raw counts, estimated counts otherwise), CSR ``float32``.
        - ``obs['xtrimo_n_genes']``: expressed (non-zero) genes per cell.
        - ``uns['xtrimo']['normalize']``: ``target_sum`` (the number used), ``input_kind``
          (``'counts'``, ``'log1p'`` or ``'normalized'``) and ``n_low_quality_cells`` (cells
          with at most 200 expressed genes); with ``target_sum=None`` also
          ``target_sum_rule='median'``.

    Raises
    ------
    ValueError
        Negative, NaN or infinite values; an all-zero matrix; a backed AnnData; a ``target_sum``
        that is not a positive number; ``layer`` other than ``'counts'`` while
        ``layers['counts']`` exists; values marked log1p by ``uns['log1p']`` that overflow when
        reverted; or data already normalized by this function (``uns['xtrimo']
        ['normalize']`` and ``layers['counts']`` present: pass ``layer='counts'`` to redo it).
        A failed call leaves ``adata`` unchanged.
    KeyError
        ``layer`` is not in ``adata.layers``.

    Warns
    -----
    UserWarning
        When the input is not raw counts (what was detected and done), and when cells have at
        most 200 expressed genes (suggesting ``sc.pp.filter_cells(adata, min_genes=201)``).

    Examples
    --------
    >>> import scxtrimo
    >>> adata = scxtrimo.pp.align_genes(scxtrimo.datasets.pbmc3k())
    >>> scxtrimo.pp.normalize(adata)
    >>> adata.uns["xtrimo"]["normalize"]["input_kind"]
    'counts'
    """
    data = rna_modality(adata)
    if data.isbacked:
        raise ValueError(
            "normalize writes X and layers, so it needs the data in memory: load it with "
            "`adata = adata.to_memory()`."
        )
    check_positive("target_sum", target_sum, optional=True)

    entry = data.uns.get(UNS_KEY)
    if layer is None and isinstance(entry, dict) and "normalize" in entry and "counts" in data.layers:
        raise ValueError(
            "This data was already normalized by scxtrimo.pp.normalize (X holds log1p values, "
            "layers['counts'] the counts). To redo it, pass `layer='counts'`."
        )
    if layer is None and "counts" in data.layers:  # the counts, as tl.embed reads them
        layer = "counts"
    if layer is None:
        src, what = data.X, "adata.X"
        if src is None:
            raise ValueError("adata.X is None; pass the layer that holds the data as `layer=`.")
    else:
        if layer not in data.layers:
            raise KeyError(f"layer={layer!r} is not in adata.layers ({list(data.layers.keys())}).")
        if layer != "counts" and "counts" in data.layers:
            raise ValueError(f"layers['counts'] already holds counts, and normalize would replace them with those of "
                             f"layers[{layer!r}]. Pass layer='counts', or remove or rename layers['counts'] first.")
        src, what = data.layers[layer], f"adata.layers[{layer!r}]"

    counts, kind = to_counts(src, uns=data.uns if layer is None else None, what=what)
    if counts.nnz == 0:
        raise ValueError(
            f"{what} is all zero: there is no expression to normalize. Check that the right "
            "matrix or layer was passed."
        )
    total = median_total(_row_sums(counts)) if target_sum is None else float(target_sum)
    X_norm = log1p_normalize(counts, total)
    n_genes = np.diff(counts.indptr).astype(np.int64)
    n_low = int((n_genes <= MIN_GENES_QC).sum())
    if n_low:
        warnings.warn(
            f"{n_low} of {data.n_obs} cells have at most {MIN_GENES_QC} expressed genes; the "
            "paper's quality control (appendix 1) keeps only cells with more. They were kept; "
            "remove them with `sc.pp.filter_cells(adata, min_genes=201)`.",
            UserWarning,
            stacklevel=2,
        )

    # Everything is computed: assign (to a copy if asked).
    container = adata.copy() if copy else adata
    target = rna_modality(container)
    target.X = X_norm
    target.layers["counts"] = counts
    target.obs[N_GENES_KEY] = n_genes
    new_entry = dict(target.uns.get(UNS_KEY)) if isinstance(target.uns.get(UNS_KEY), dict) else {}
    new_entry["normalize"] = {
        "target_sum": total,
        "input_kind": kind,
        "n_low_quality_cells": n_low,
        **({"target_sum_rule": "median"} if target_sum is None else {}),
    }
    target.uns[UNS_KEY] = new_entry
    return container if copy else None
