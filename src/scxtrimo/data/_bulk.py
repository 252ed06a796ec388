"""Model input blocks: single cells (log1p CP10k, depth tokens) or bulk samples (the authors' conventions).

Bulk RNA-seq (paper section 5.4.3; ``docs/scfoundation.md``, "Bulk RNA-seq"): the
values are taken as given, not turned back into counts; raw bulk counts are scaled to the
median total of all samples and ``log1p``'d, and the depth tokens are ``T = S`` computed from
the sample's own values.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import scipy.sparse as sp

from .._reference import N_GENES
from .._validation import check_finite_nonnegative
from ..pp._align import align_matrix
from ..pp._normalize import log1p_normalize, median_total
from ._depth import append_depth
from ._prepare import counts_rows, iter_log1p_blocks, log1p_rows

#: ``bulk=`` values of :func:`~scxtrimo.tl.embed` and :func:`~scxtrimo.tl.gene_embed` (the authors' bulk input).
BULK = ("counts", "normalized")

#: Median expressed reference genes below which ``bulk=`` input looks like single cells. Bulk
#: RNA-seq libraries express most of the 19,264 reference genes (typically over 10,000); the
#: shared single-cell sets have medians of about 600-5,000 (plate-based full-length protocols
#: reach the top of that range).
BULK_MIN_GENES = 5000


def check_bulk(bulk: str | None, total_counts_key: str | None) -> None:
    """Validate ``bulk=`` (``None``, ``"counts"`` or ``"normalized"``)."""
    if bulk is None:
        return
    if bulk not in BULK:
        raise ValueError(f"bulk={bulk!r}; choose None (single cells), 'counts' (raw bulk RNA-seq) or 'normalized' "
                         "(bulk values already normalized and log-transformed, used as given).")
    if total_counts_key is not None:
        raise ValueError("total_counts_key applies to single-cell input; with bulk= the depth tokens follow the "
                         "authors' bulk convention (T = S from the sample's own values).")


@contextmanager
def quiet_input_detection(bulk: str | None):
    """Bulk values are used as given: silence the 'is not raw counts' warning of the input check."""
    with warnings.catch_warnings():
        if bulk is not None:
            warnings.filterwarnings("ignore", message=r".* is not raw counts", category=UserWarning)
        yield


def warn_if_single_cells(expressed: np.ndarray, bulk: str, *, stacklevel: int = 2) -> None:
    """Warn when ``bulk=`` samples express as few genes as single cells do.

    ``expressed``: expressed reference genes per sample (of the first block read). ``bulk=``
    turns off the count checks and feeds the values as given (median-scaled, not CP10k; depth
    tokens ``T = S`` of the sample's own values), which puts single cells outside what the
    model saw in pretraining: a warning, since a shallow bulk library can be legitimate.
    """
    median = float(np.median(expressed)) if len(expressed) else 0.0
    if median < BULK_MIN_GENES:
        warnings.warn(f"bulk={bulk!r}, but the samples express a median of {median:,.0f} reference genes, as single "
                      f"cells do (bulk RNA-seq libraries express over {BULK_MIN_GENES:,}). For single-cell data "
                      "drop bulk= (cells are then normalized to log1p CP10k, with depth tokens from their counts).",
                      UserWarning, stacklevel=stacklevel)


def bulk_values(prep, start: int, stop: int, bulk: str) -> sp.csr_matrix:
    """Rows ``[start, stop)`` on the reference genes exactly as given (no count recovery), CSR float32.

    ``bulk="counts"`` reads what :func:`scxtrimo.tl.embed` reads for counts (``layers[layer]``
    or ``raw.X`` if named, else ``layers['counts']`` if present, else ``X``); ``"normalized"``
    reads ``layers[layer]`` or ``raw.X`` if named, else ``X``. Data prepared by
    :func:`scxtrimo.pp.normalize` give their ``layers['counts']`` or their ``X``.
    """
    if prep.kind == "prepared":
        return counts_rows(prep, start, stop) if bulk == "counts" else log1p_rows(prep, start, stop)
    if bulk == "counts" or prep.named:
        source, what = prep.matrix(), prep.what
    else:
        source, what = prep.adata.X, "adata.X"
    block = source[start:stop]
    check_finite_nonnegative(block, what=what)
    out = align_matrix(block, prep.mapping, N_GENES) if prep.mapping is not None else sp.csr_matrix(block, dtype=np.float32)
    out.eliminate_zeros()
    out.sort_indices()
    return out


def bulk_median(prep) -> float:
    """Median of the samples' totals over the reference genes (one streamed pass), float64."""
    step = prep.block_cells()
    totals = [np.asarray(bulk_values(prep, a, min(a + step, prep.adata.n_obs), "counts").sum(axis=1, dtype=np.float64)).ravel()
              for a in range(0, prep.adata.n_obs, step)]
    return median_total(np.concatenate(totals))


def bulk_blocks(prep, bulk: str, *, median: float | None, depth_tokens: bool) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """Yield ``(start, stop, X)``: model input of bulk samples, the authors' convention (spec 4 item 6).

    ``"counts"``: each sample scaled to ``median`` total, ``log1p``; ``T = S = log10`` of the
    sample's sum of those log values. ``"normalized"``: the values as given; ``T = S`` = their
    plain sum. T and S (non-positive ones left out) are appended when ``depth_tokens``.
    Warns (:func:`warn_if_single_cells`) when the first block's samples look like single cells.
    """
    step = prep.block_cells()
    for start in range(0, prep.adata.n_obs, step):
        stop = min(start + step, prep.adata.n_obs)
        V = bulk_values(prep, start, stop, bulk)
        if start == 0:
            warn_if_single_cells(np.diff(V.indptr), bulk, stacklevel=4)
        X = log1p_normalize(V, median) if bulk == "counts" else V
        if depth_tokens:
            sums = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()
            with np.errstate(divide="ignore"):
                depth = np.log10(sums) if bulk == "counts" else sums
            X = append_depth(X, depth, depth)
        yield start, stop, X


def model_input_blocks(prep, config, *, bulk: str | None, median: float | None, target_depth: float,
                       target_depth_mode: str, totals: np.ndarray | None) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """The blocks a model with ``config`` reads: single cells (log1p CP10k, depth tokens from
    ``target_depth``) or bulk samples (:func:`bulk_blocks`)."""
    if bulk is not None:
        return bulk_blocks(prep, bulk, median=median, depth_tokens=config.depth_tokens)
    depth = (float(target_depth), target_depth_mode) if config.depth_tokens else None
    return iter_log1p_blocks(prep, depth=depth, totals=totals)
