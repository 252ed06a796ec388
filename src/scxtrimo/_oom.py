"""Recovery from CUDA out-of-memory errors: smaller pieces instead of a failed call.

Two forms, one for each kind of work:

* :func:`halve_rows_on_oom` (inference: embedding, prediction): a batch of rows that runs out of
  memory is split in two halves, each run on its own, and their outputs concatenated. A single
  row that still runs out of memory raises.
* :func:`retry_on_oom` (training: one optimizer step): the whole step is run again after
  ``shrink()`` made its pieces smaller (a lower token budget, more gradient-accumulation
  micro-batches), because a failed backward pass may already have added part of its gradient.
  The caller's step must therefore start from zeroed gradients. ``shrink()`` returns False when
  nothing can be made smaller; then the error is raised.

The retry runs *after* the ``except`` block has ended: the exception's traceback references the
failed call's frames and with them its activations, so retrying inside the handler would run
with that memory still held.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")


def _free() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def halve_rows_on_oom(run: Callable[[np.ndarray], T], rows: np.ndarray, *,
                      cat: Callable[[list[T]], T] = np.concatenate) -> T:
    """``run(rows)``; on CUDA out-of-memory, ``run`` on each half of ``rows``, joined by ``cat``
    (recursively). ``cat`` is ``np.concatenate`` for arrays, ``torch.cat`` for tensors."""
    try:
        return run(rows)
    except torch.cuda.OutOfMemoryError:
        if len(rows) == 1:
            raise
    _free()
    half = len(rows) // 2
    return cat([halve_rows_on_oom(run, rows[:half], cat=cat), halve_rows_on_oom(run, rows[half:], cat=cat)])


def retry_on_oom(step: Callable[[], T], shrink: Callable[[], bool], *, what: str) -> T:
    """``step()``; on CUDA out-of-memory, ``shrink()`` and run the step again, until it fits.

    ``what`` names the work for the warning, e.g. ``"tl.annotate fine-tuning"``.

    Raises
    ------
    torch.cuda.OutOfMemoryError
        When the step runs out of memory and ``shrink()`` returns False (nothing left to split).
    """
    while True:
        try:
            return step()
        except torch.cuda.OutOfMemoryError:
            if not shrink():
                raise
        _free()
        warnings.warn(f"{what}: CUDA ran out of memory; the step is split into smaller pieces and run again.",
                      RuntimeWarning, stacklevel=2)
