"""Running a model over the rows of a log1p CSR matrix: length-bucketed batches, inference mode.

The one inference loop behind :func:`scxtrimo.tl.embed`, :func:`scxtrimo.tl.annotate`'s
predictions and the training scripts' evaluations. It needs torch, NumPy and SciPy only.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from ._device import autocast
from ._oom import halve_rows_on_oom
from ._validation import check_positive
from .data._batching import TokenBatch, csr_row_batch, length_batches, on_grid

#: Default encoder token budget per batch (cells x padded width), by device type; on CUDA the
#: most, for encoders narrow enough (``token_budget``).
MAX_TOKENS = {"cpu": 4_096, "cuda": 262_144}
#: GPU memory (bytes) the activations of a default CUDA batch may take; with xtrimo-100m's
#: 0.49 GB of float32 weights, tl.embed's peak stays near 1.7 GB (issue: below 2 GB at 2,000 genes).
ACTIVATION_BYTES = 1.25e9
#: Activation bytes per token and per unit of feed-forward width (``enc_dim x enc_ff_mult``, the
#: widest activation) of tl.embed under bf16 autocast, measured on an NVIDIA H200: 7.9 for
#: xtrimo-100m (peak 2.07 GB at 65,536 tokens, 0.88 GB at 16,384), 8.1 for xtrimo-10m.
BYTES_PER_FF_UNIT = 8
#: CUDA default budgets are multiples of this many tokens.
BUDGET_STEP = 4_096
#: Default most cells per encoder batch, by device type. On CPU one cell per call is fastest
#: (docs/benchmarks.md, "No compute on padding"): the encoder is compute-bound already at one
#: cell, and only an unpadded call runs SDPA's fused CPU kernel instead of the masked one.
BATCH_CELLS = {"cpu": 1, "cuda": 256}
#: Batches whose results wait on the device before one copy to the host, by device type (a copy
#: to the host waits for the device, so on CUDA the host prepares later batches meanwhile).
PENDING_BATCHES = {"cpu": 1, "cuda": 16}


def batch_cells(device: torch.device, batch_size: int | None = None) -> int:
    """``batch_size`` if given, else the default most cells per encoder batch for ``device``."""
    check_positive("batch_size", batch_size, integer=True, optional=True)
    return int(batch_size) if batch_size is not None else BATCH_CELLS.get(device.type, BATCH_CELLS["cpu"])


def device_batches(lengths: np.ndarray, device: torch.device, *, max_cells: int, max_tokens: int) -> list[np.ndarray]:
    """:func:`~scxtrimo.data._batching.length_batches` of cells of ``lengths`` tokens for ``device``
    (counting each batch's padded width on the grid where ``device`` pads to it)."""
    return length_batches(lengths, max_cells=max_cells, max_tokens=max_tokens, grid=on_grid(device))


def token_budget(device: torch.device, max_tokens: int | None = None, *, config=None) -> int:
    """``max_tokens`` if given, else the default encoder token budget for ``device``.

    With a model ``config`` on CUDA, the budget is what keeps a batch's activations within
    ``ACTIVATION_BYTES`` (``BYTES_PER_FF_UNIT`` bytes per token and feed-forward unit), rounded
    down to a multiple of ``BUDGET_STEP`` and at most ``MAX_TOKENS["cuda"]``: 262,144 tokens for
    xtrimo-3m, 151,552 for xtrimo-10m, 49,152 for xtrimo-100m and the authors' released 100M model.
    """
    check_positive("max_tokens", max_tokens, integer=True, optional=True)
    if max_tokens is not None:
        return int(max_tokens)
    budget = MAX_TOKENS.get(device.type, MAX_TOKENS["cpu"])
    if device.type == "cuda" and config is not None:
        fits = ACTIVATION_BYTES / (BYTES_PER_FF_UNIT * config.enc_dim * config.enc_ff_mult)
        budget = min(budget, max(BUDGET_STEP, int(fits) // BUDGET_STEP * BUDGET_STEP))
    return budget


def resolve_model(model, device: torch.device):
    """A checkpoint name, a checkpoint folder or an :class:`~scxtrimo.models.XTrimoGene`, on ``device`` in eval mode."""
    from .models._io import load
    from .models._xtrimogene import XTrimoGene

    if isinstance(model, XTrimoGene):
        return model.to(device).eval()
    return load(model, device=device)


def run_rows(fn: Callable[[TokenBatch], torch.Tensor], X, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """``fn`` on the cells ``X[rows]`` (log1p rows) as one batch, in inference mode: ``(n, k)``
    float32 on ``device``, not yet copied to the host (no synchronization).

    ``fn`` maps a :class:`TokenBatch` to an ``(n, k)`` tensor. On CUDA out-of-memory the rows are
    halved and retried.
    """

    def run(part: np.ndarray) -> torch.Tensor:
        batch = csr_row_batch(X, part, grid=on_grid(device)).to(device, non_blocking=True)
        with torch.inference_mode(), autocast(device):
            return fn(batch).float()

    return halve_rows_on_oom(run, rows, cat=torch.cat)


def apply_rows(fn: Callable[[TokenBatch], torch.Tensor], X, rows: np.ndarray, device: torch.device) -> np.ndarray:
    """:func:`run_rows` copied to the host: ``(n, k)`` float32 NumPy."""
    return run_rows(fn, X, rows, device).cpu().numpy()


class RowSink:
    """Results of row batches into ``out``, copied to the host every ``pending`` batches at once.

    Each copy to the host waits for the device. On CUDA the results of several batches stay on
    the GPU (``PENDING_BATCHES``) so that the host builds the next batches while the GPU works,
    and one copy brings them all back. ``add(rows, result)``: ``result`` is the ``(len(rows), k)``
    device tensor of the rows ``rows`` of ``out``; ``flush()`` writes what is pending.
    """

    def __init__(self, out: np.ndarray, device: torch.device, pending: int | None = None):
        self.out = out
        self.pending = pending or PENDING_BATCHES.get(device.type, 1)
        self._rows: list[np.ndarray] = []
        self._results: list[torch.Tensor] = []

    def add(self, rows: np.ndarray, result: torch.Tensor) -> None:
        self._rows.append(rows)
        self._results.append(result)
        if len(self._results) >= self.pending:
            self.flush()

    def flush(self) -> None:
        if self._results:
            self.out[np.concatenate(self._rows)] = torch.cat(self._results).cpu().numpy()
            self._rows, self._results = [], []


def map_cells(fn: Callable[[TokenBatch], torch.Tensor], X, rows: np.ndarray, device: torch.device, *, width: int,
              max_cells: int, max_tokens: int, pending: int | None = None) -> np.ndarray:
    """``(len(rows), width)`` float32: :func:`run_rows` over ``X[rows]`` in length-bucketed batches
    (results copied to the host every ``pending`` batches, see :class:`RowSink`)."""
    out = np.empty((len(rows), width), dtype=np.float32)
    sink = RowSink(out, device, pending)
    for b in device_batches(np.diff(X.indptr)[rows], device, max_cells=max_cells, max_tokens=max_tokens):
        b = np.sort(b)
        sink.add(b, run_rows(fn, X, rows[b], device))
    sink.flush()
    return out


def embed_matrix(model, X, rows: np.ndarray, pooling: str, device: torch.device, *, max_cells: int,
                 max_tokens: int) -> np.ndarray:
    """Embeddings ``(len(rows), d)`` of ``X[rows]`` (log1p rows), in length-bucketed batches."""
    return map_cells(partial(model.embed_cells, pooling=pooling), X, rows, device, width=model.embedding_width(pooling),
                     max_cells=max_cells, max_tokens=max_tokens)
