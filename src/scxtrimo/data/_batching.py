"""The data path to the encoder: expressed genes of each cell, padded into length buckets.

The encoder only ever sees a cell's non-zero genes (paper appendix 2). Cells are grouped by
their number of expressed genes so that a batch wastes little compute on [PAD] tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

#: Padded widths on the grid of :func:`grid_width`: this many widths per doubling of length
#: (so at most 12.5% of a batch's width is grid padding), and no step below ``MIN_GRID_STEP``.
GRID_STEPS_PER_OCTAVE = 8
MIN_GRID_STEP = 16
#: Whether encoder batches are padded to the width grid, by device type. On CUDA a bounded set
#: of batch shapes lets per-shape kernel plans (cuDNN attention's graphs) be reused; on the CPU
#: the extra padding would only cost (one unpadded cell per call is fastest there).
GRID_WIDTHS = {"cpu": False, "cuda": True}


class TokenBatch(NamedTuple):
    """Padded encoder input for ``B`` cells of at most ``L`` expressed genes.

    genes : ``(B, L)`` int64 reference gene index (0 at padding).
    values : ``(B, L)`` float32 log1p CP10k expression (0 at padding).
    valid : ``(B, L)`` bool, True at real tokens, False at [PAD].
    """

    genes: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "TokenBatch":
        return TokenBatch(*(t.to(device, non_blocking=non_blocking) for t in self))

    @property
    def n_tokens(self) -> int:
        return int(self.valid.sum())


def grid_width(longest: int) -> int:
    """The padded width of a batch whose longest cell has ``longest`` tokens, on a fixed grid.

    ``longest`` rounded up to a multiple of ``2 ** (floor(log2(longest)) - 3)`` (at least
    ``MIN_GRID_STEP``): 8 widths per doubling, e.g. 780 -> 832, 1,025 -> 1,152, 100 -> 112.
    Batches then come in a bounded set of shapes, whatever the cells' lengths, so that kernels
    that are planned per shape (cuDNN attention builds a graph for every new one, hundreds of
    milliseconds each) are planned once per grid width instead of once per batch.
    """
    n = max(int(longest), 1)
    octave = n.bit_length() - 1  # floor(log2(n))
    step = max(MIN_GRID_STEP, 1 << max(octave - (GRID_STEPS_PER_OCTAVE.bit_length() - 1), 0))
    return -(-n // step) * step


def padded_width(longest: int, grid: bool = False) -> int:
    """The width of a batch whose longest cell has ``longest`` tokens: that (at least 1), or with
    ``grid`` its :func:`grid_width`."""
    n = max(int(longest), 1)
    return grid_width(n) if grid else n


def on_grid(device: torch.device) -> bool:
    """Whether encoder batches on ``device`` are padded to the width grid (``GRID_WIDTHS``)."""
    return GRID_WIDTHS.get(device.type, False)


def csr_row_batch(X: sp.csr_matrix, rows: np.ndarray, *, grid: bool = False) -> TokenBatch:
    """Pad the stored (non-zero) entries of ``X[rows]`` into a :class:`TokenBatch`.

    ``X`` must be CSR with sorted indices, explicit zeros removed; each row's genes stay in
    reference order. The batch is as wide as its longest row, or with ``grid`` as
    :func:`grid_width` of it (the extra positions are [PAD], as any padding).

    Raises
    ------
    TypeError
        ``X`` is not CSR (a CSC matrix's column pointers would be read as rows).
    """
    if getattr(X, "format", None) != "csr":
        raise TypeError(f"X must be a CSR matrix (scipy.sparse.csr_matrix), got {type(X).__name__}"
                        f"{' in ' + X.format + ' format' if hasattr(X, 'format') else ''}; convert it with .tocsr().")
    indptr = X.indptr
    starts = indptr[rows].astype(np.int64)
    lengths = (indptr[rows + 1] - indptr[rows]).astype(np.int64)
    n, width = len(rows), padded_width(lengths.max(initial=0), grid)
    row_of = np.repeat(np.arange(n), lengths)
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    col_of = np.arange(row_of.size) - offsets
    src = np.repeat(starts, lengths) + col_of
    genes = np.zeros((n, width), dtype=np.int64)
    values = np.zeros((n, width), dtype=np.float32)
    valid = np.zeros((n, width), dtype=bool)
    genes[row_of, col_of] = X.indices[src]
    values[row_of, col_of] = X.data[src]
    valid[row_of, col_of] = True
    return TokenBatch(torch.from_numpy(genes), torch.from_numpy(values), torch.from_numpy(valid))


def select_tokens(selected: torch.Tensor, values: torch.Tensor, *,
                  grid: bool = False) -> tuple[TokenBatch, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Gather the ``selected`` positions of dense ``(B, n)`` ``values`` into a TokenBatch.

    Returns the batch and ``(rows, cols, pos)``: for every selected entry its cell, its gene and
    its position in the padded sequence, to scatter encoder outputs back to full length. With
    ``grid`` the batch is padded to :func:`grid_width` of its longest cell.
    """
    rows, cols = selected.nonzero(as_tuple=True)
    lengths = selected.sum(1)
    width = padded_width(lengths.max() if lengths.numel() else 0, grid)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    b = selected.shape[0]
    genes = torch.zeros(b, width, dtype=torch.long, device=values.device)
    vals = torch.zeros(b, width, dtype=values.dtype, device=values.device)
    valid = torch.zeros(b, width, dtype=torch.bool, device=values.device)
    genes[rows, pos] = cols
    vals[rows, pos] = values[rows, cols]
    valid[rows, pos] = True
    return TokenBatch(genes, vals, valid), (rows, cols, pos)


def length_batches(lengths: np.ndarray, *, max_cells: int, max_tokens: int, grid: bool = False) -> list[np.ndarray]:
    """Group cells of similar length: batches of row indices, longest-first order inside.

    Cells are sorted by length (stable, so the grouping is deterministic) and cut greedily so
    that ``cells x longest length <= max_tokens`` and ``cells <= max_cells``. A single cell
    longer than ``max_tokens`` gets a batch of its own. With ``grid`` the longest length is
    counted as its :func:`grid_width` (the batches' padded width under ``csr_row_batch(...,
    grid=True)``), so that the padded batches keep to ``max_tokens``.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = padded_width(lengths[order[start]], grid)
        size = max(1, min(max_cells, max_tokens // longest))
        batches.append(order[start : start + size])
        start += size
    return batches


def token_budget_parts(rows: np.ndarray, lengths: np.ndarray, *, max_tokens: int) -> list[np.ndarray]:
    """Split one training step's ``rows`` into parts of at most ``max_tokens`` tokens.

    ``lengths`` holds every row's number of expressed genes (indexed by row). Parts are
    :func:`length_batches` of the step's cells (no cap on cells), each keeping the order the
    cells have in ``rows``; a cell longer than the budget is a part of its own.
    """
    return [rows[np.sort(b)] for b in length_batches(lengths[rows], max_cells=len(rows), max_tokens=max_tokens)]


class TokenBudgetSplit:
    """The parts of training steps under a token budget that can be lowered (CUDA out-of-memory).

    ``split(rows)`` is :func:`token_budget_parts` of ``rows`` at the current ``max_tokens``;
    ``split.shrink()`` halves the budget for this and every later step and returns False when
    there is nothing left to split (every part is already one cell).
    """

    def __init__(self, lengths: np.ndarray, *, max_tokens: int):
        self.lengths = np.asarray(lengths)
        self.max_tokens = int(max_tokens)
        # two cells cost at least twice the shortest length: below that every part is one cell
        self._one_cell_budget = 2 * max(int(self.lengths.min()) if self.lengths.size else 1, 1)

    def __call__(self, rows: np.ndarray) -> list[np.ndarray]:
        return token_budget_parts(rows, self.lengths, max_tokens=self.max_tokens)

    def shrink(self) -> bool:
        if self.max_tokens < self._one_cell_budget:
            return False
        self.max_tokens //= 2
        return True


def padding_fraction(lengths: np.ndarray, batches: list[np.ndarray], grid: bool = False) -> float:
    """Share of encoder tokens that are [PAD] under a given batching (padded tightly, or with
    ``grid`` to the width grid)."""
    real = sum(int(lengths[b].sum()) for b in batches)
    total = sum(len(b) * padded_width(lengths[b].max(), grid) for b in batches)
    return 1.0 - real / total if total else 0.0


def sortish_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, chunk_batches: int = 64, drop_last: bool = True) -> list[np.ndarray]:
    """One epoch of shuffled batches whose cells have similar numbers of expressed genes.

    Cells are shuffled, cut into chunks of ``chunk_batches`` batches, sorted by length inside
    each chunk and cut into batches; the batch order is shuffled again. Deep cells (thousands
    of genes) then no longer pad a whole batch of shallow ones. ``drop_last`` drops each chunk's
    incomplete last batch (training steps of equal size).
    """
    order = rng.permutation(len(lengths))
    batches = []
    span = batch_size * chunk_batches
    for start in range(0, len(order), span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        stop = len(chunk) - batch_size + 1 if drop_last else len(chunk)
        batches += [chunk[i : i + batch_size] for i in range(0, stop, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]
