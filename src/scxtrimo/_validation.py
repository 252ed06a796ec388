"""Checks on expression matrices, with errors that name the problem and the fix."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def matrix_values(X) -> np.ndarray:
    """The stored values of a dense or sparse matrix as a flat array (no copy for sparse)."""
    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X).ravel()


def check_finite_nonnegative(X, *, what: str = "adata.X") -> None:
    """Raise ``ValueError`` if ``X`` has negative, NaN or infinite values.

    Scaled (z-scored) data, the usual cause of negative values, cannot be turned back into
    counts; the fix is to pass the raw counts (often in ``adata.raw`` or ``adata.layers``).
    """
    values = matrix_values(X)
    if values.size == 0:
        return
    if not np.isfinite(values).all():
        n_bad = int((~np.isfinite(values)).sum())
        raise ValueError(
            f"{what} has {n_bad} NaN or infinite values. Expression must be finite counts; "
            "remove or impute them before calling scxtrimo."
        )
    if values.min() < 0:
        n_neg = int((values < 0).sum())
        if np.issubdtype(values.dtype, np.signedinteger) and values.dtype.itemsize < 4:
            raise ValueError(
                f"{what} is {values.dtype} and has {n_neg} negative values: counts too large for {values.dtype} "
                "overflow and wrap round to negative numbers. Store counts as float32 or int32."
            )
        raise ValueError(
            f"{what} has {n_neg} negative values (minimum {values.min():.3g}): it looks scaled or "
            "batch-corrected. scxtrimo needs raw counts (or library-size normalized values); pass "
            "them, e.g. from `adata.raw.to_adata()` or a `layers['counts']` layer."
        )


def is_integer_valued(X, *, tol: float = 1e-3) -> bool:
    """True if every stored value is within ``tol`` of an integer."""
    values = matrix_values(X)
    if values.size == 0:
        return True
    return bool(np.all(np.abs(values - np.rint(values)) <= tol))


def check_positive(name: str, value, *, integer: bool = False, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number above zero (of an integer type if ``integer``).

    ``optional`` allows ``None`` (the caller's default). Used for batch sizes, token budgets,
    epochs, patience and learning rates, where zero or a negative number would otherwise be
    read as "use the default" or train nothing, without a word.
    """
    if value is None and optional:
        return
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    number = isinstance(value, kinds) and not isinstance(value, bool)
    if not number or not np.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        extra = " (or None for the default)" if optional else ""
        raise ValueError(f"{name} must be {kind}{extra}, got {value!r}.")


def check_embedding(emb, key: str) -> np.ndarray:
    """``obsm[key]`` as a dense array; ``TypeError`` if sparse, ``ValueError`` naming the cells if not finite.

    An embedding is dense; a sparse one is usually a count matrix stored by mistake. Non-finite rows
    would make scanpy's kNN graph fail deep inside scikit-learn, or Leiden score garbage.
    """
    if sp.issparse(emb):
        raise TypeError(f"obsm[{key!r}] is a sparse matrix; an embedding is dense (n_obs x d). Store "
                        "`.toarray()` of it if it is one, or pass the key of the embedding.")
    emb = np.asarray(emb)
    bad = ~np.isfinite(emb).all(axis=tuple(range(1, emb.ndim)))
    if bad.any():
        raise ValueError(f"obsm[{key!r}] has non-finite values in {int(bad.sum())} cells; recompute the "
                         "embedding, or drop those cells first.")
    return emb


def check_count(name: str, value, *, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer >= 0 (or ``None`` if ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0{' (or None)' if optional else ''}, got {value!r}.")
