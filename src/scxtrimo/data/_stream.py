"""Batch sources for pretraining: in-memory cells, or .h5ad files streamed from disk (issue 4).

:class:`H5adCorpus` opens every file in backed mode and reads it in blocks of ``block_cells``
rows; each block is aligned to the 19,264 reference genes as raw counts on the
fly (``scxtrimo.data._prepare.counts_rows``; the training step normalizes) and quality-controlled (cells with more than
200 expressed reference genes, paper appendix 1). :class:`StreamBatches` walks the blocks in a
new shuffled order every epoch, shuffles the cells inside each block and cuts them into
length-sorted ("sortish") batches, so host memory holds one block plus fewer than a batch of
carried-over cells, whatever the corpus size. :class:`MemoryBatches` does the same for a CSR matrix already in memory.

Train / validation / test split (96:2:2, appendix 1)
    Each cell's part is decided by a seeded hash (SipHash, :func:`pandas.util.hash_array`) of
    the **file name** (base name, without folders) and the cell's **obs_name**: the same cell
    lands in the same part whatever the block size, the block order, the order of the file list
    or the folder the files live in. Proportions are 96:2:2 in expectation (each cell draws
    independently). Cells that share both file name and obs_name share their part.

Both batch sources are deterministic functions of ``(random_state, epoch)``: their complete
position is a few integers (plus, for streams, the identities of the fewer than a batch of
cells carried over between blocks), which :meth:`state_dict` returns and
:meth:`load_state_dict` restores, so that an interrupted run resumes on exactly the batches it
would have seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._batching import sortish_batches
from ._prepare import counts_rows, prepare_input

BLOCK_CELLS = 2048
SPLIT = (0.96, 0.02, 0.02)
PARTS = ("train", "validation", "test")


def split_labels(file_name: str, obs_names: Sequence[str], random_state: int = 0,
                 fractions: Sequence[float] = SPLIT) -> np.ndarray:
    """Assign cells to train (0), validation (1) or test (2) by a seeded hash.

    Parameters
    ----------
    file_name
        Name of the file the cells come from; only its base name is used.
    obs_names
        The cells' ``obs_names``.
    random_state
        Seed of the hash (a different seed gives an independent split).
    fractions
        Expected shares of train, validation and test (paper appendix 1: 96:2:2).

    Returns
    -------
    numpy.ndarray
        ``(n_cells,)`` int8 labels, a pure function of ``(random_state, base name, obs_name)``.
    """
    name = Path(str(file_name)).name
    keys = np.asarray([f"{name}\x1f{o}" for o in obs_names], dtype=object)
    if keys.size == 0:
        return np.zeros(0, dtype=np.int8)
    hash_key = f"scx{int(random_state) % 10**13:013d}"  # SipHash takes a 16-byte key
    h = pd.util.hash_array(keys, encoding="utf8", hash_key=hash_key)
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    f_train, f_val = float(fractions[0]), float(fractions[0]) + float(fractions[1])
    return np.where(u < f_train, 0, np.where(u < f_val, 1, 2)).astype(np.int8)


@dataclass
class CellBlock:
    """Cells read from a corpus, with their identities.

    X : ``(n, 19264)`` float32 CSR, raw counts on the reference genes (sorted indices).
    file : ``(n,)`` int64 index of the source file in the corpus.
    row : ``(n,)`` int64 row of the cell in its file.
    part : ``(n,)`` int8 split label (0 train, 1 validation, 2 test).
    """

    X: sp.csr_matrix
    file: np.ndarray
    row: np.ndarray
    part: np.ndarray

    def __len__(self) -> int:
        return self.X.shape[0]

    def take(self, idx) -> CellBlock:
        idx = np.asarray(idx, dtype=np.int64)
        return CellBlock(self.X[idx], self.file[idx], self.row[idx], self.part[idx])

    @property
    def ids(self) -> np.ndarray:
        """``(n, 2)`` int64 ``(file, row)`` pairs."""
        return np.stack([self.file, self.row], axis=1).astype(np.int64)

    @staticmethod
    def concat(blocks: Sequence[CellBlock]) -> CellBlock:
        blocks = [b for b in blocks if b is not None]
        return CellBlock(
            sp.vstack([b.X for b in blocks], format="csr") if blocks else sp.csr_matrix((0, 0), dtype=np.float32),
            np.concatenate([b.file for b in blocks]) if blocks else np.zeros(0, np.int64),
            np.concatenate([b.row for b in blocks]) if blocks else np.zeros(0, np.int64),
            np.concatenate([b.part for b in blocks]) if blocks else np.zeros(0, np.int8),
        )


class H5adCorpus:
    """A list of .h5ad files read in blocks, aligned, normalized and quality-controlled on the fly.

    Parameters
    ----------
    paths
        ``.h5ad`` files (raw counts or normalized, any gene set that matches the reference well
        enough; see :func:`scxtrimo.pp.align_genes`). Opened read-only in backed mode; only
        ``block_cells`` rows are in memory at a time.
    block_cells
        Rows read per block (default 2,048).
    gene_symbols
        ``var`` column with gene symbols, if ``var_names`` are not symbols (same for all files).
    layer
        ``layers`` key of the counts in every file (``None``: ``layers['counts']`` if present,
        else ``X``).
    use_raw
        Read every file's ``raw.X`` (genes: its ``raw.var``) instead.
    min_genes
        Keep cells with at least this many expressed reference genes (201: "more than 200").
    random_state
        Seeds the split hash and the block and cell order.
    fractions
        Train / validation / test shares.

    Attributes
    ----------
    blocks : list of ``(file index, start, stop)``
    peak_cells : int
        Largest number of cells this corpus and the batch sources reading it have held at once
        (instrumentation: rows of the block being read plus cells buffered between blocks).

    Raises
    ------
    FileNotFoundError
        A path does not exist.
    ValueError
        An empty file, or one whose genes match the reference too poorly (from
        ``scxtrimo.data._prepare.prepare_input``); ``block_cells < 1``.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], *, block_cells: int = BLOCK_CELLS,
                 gene_symbols: str | None = None, layer: str | None = None, use_raw: bool = False, min_genes: int = 201,
                 random_state: int = 0, fractions: Sequence[float] = SPLIT):
        if block_cells < 1:
            raise ValueError(f"block_cells must be at least 1, got {block_cells}.")
        self.paths = [Path(p) for p in paths]
        for p in self.paths:
            if not p.is_file():
                raise FileNotFoundError(f"No such .h5ad file: {p}")
        self.block_cells = int(block_cells)
        self.min_genes = int(min_genes)
        self.random_state = int(random_state)
        self.fractions = tuple(fractions)
        self._adatas = []
        self._preps = []
        try:
            for p in self.paths:
                adata = ad.read_h5ad(p, backed="r")
                self._adatas.append(adata)
                self._preps.append(prepare_input(adata, gene_symbols=gene_symbols, layer=layer, use_raw=use_raw))
        except Exception:
            self.close()
            raise
        self.n_obs = [a.n_obs for a in self._adatas]
        self.blocks = [(f, s, min(s + self.block_cells, n)) for f, n in enumerate(self.n_obs)
                       for s in range(0, n, self.block_cells)]
        self.held = 0
        self.peak_cells = 0
        self.counts: dict[str, int] | None = None

    # ---- instrumentation --------------------------------------------------------------
    def _hold(self, n: int) -> None:
        self.held = int(n)
        self.peak_cells = max(self.peak_cells, self.held)

    # ---- reading ------------------------------------------------------------------------
    def describe(self) -> list[tuple[str, int]]:
        """``(file name, n_obs)`` per file: identifies the corpus in a training state."""
        return [(p.name, n) for p, n in zip(self.paths, self.n_obs)]

    def names(self) -> Iterator[str]:
        """Each file's cell and gene names, joined (what :func:`~scxtrimo.tl._checkpoint.fingerprint`
        identifies the corpus by in a training state, beside :meth:`describe`)."""
        for a, prep in zip(self._adatas, self._preps):
            yield "\n".join(map(str, a.obs_names))
            yield "\n".join(map(str, prep.var_names))

    def _read(self, f: int, start: int, stop: int, buffered: int = 0) -> CellBlock:
        self._hold(buffered + (stop - start))
        X = counts_rows(self._preps[f], start, stop)
        X.sort_indices()
        names = np.asarray(self._adatas[f].obs_names[start:stop])
        keep = np.flatnonzero(np.diff(X.indptr) >= self.min_genes)
        part = split_labels(self.paths[f].name, names[keep], self.random_state, self.fractions)
        return CellBlock(X[keep], np.full(keep.size, f, np.int64), (start + keep).astype(np.int64), part)

    def read_block(self, i: int, buffered: int = 0) -> CellBlock:
        """The QC-passing cells of block ``i`` (all parts), in file order."""
        return self._read(*self.blocks[i], buffered=buffered)

    def spread_cells(self, n: int, *, part: str = "train", max_blocks: int = 8) -> sp.csr_matrix:
        """About ``n`` cells of ``part`` spread over the corpus: evenly spaced cells of at most
        ``max_blocks`` evenly spaced blocks (in file order), as ``(<= n, 19264)`` CSR counts.
        Reads those blocks once (a fraction of :meth:`scan`'s pass for a large corpus)."""
        code = PARTS.index(part)
        picks = np.unique(np.linspace(0, len(self.blocks) - 1, min(max_blocks, len(self.blocks))).astype(int))
        per, out = -(-n // len(picks)), []
        for i in picks:
            block = self.read_block(int(i))
            sel = np.flatnonzero(block.part == code)
            out.append(block.X[sel[np.linspace(0, sel.size - 1, min(per, sel.size)).astype(int)]])
        self._hold(0)
        return sp.vstack(out, format="csr")[:n]

    def read_ids(self, ids: np.ndarray, buffered: int = 0) -> CellBlock:
        """Cells given as ``(file, row)`` pairs, returned in the given order.

        Each block that holds one of them is read (one at a time) and the rows are picked out.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1, 2)
        if ids.shape[0] == 0:
            return CellBlock.concat([])
        pieces, where = [], []
        for f in np.unique(ids[:, 0]):
            rows = ids[ids[:, 0] == f, 1]
            for b in np.unique(rows // self.block_cells):
                start = int(b) * self.block_cells
                got = self._read(int(f), start, min(start + self.block_cells, self.n_obs[f]), buffered)
                pos = {int(r): i for i, r in enumerate(got.row)}
                want = rows[(rows // self.block_cells) == b]
                missing = [int(r) for r in want if int(r) not in pos]
                if missing:
                    raise ValueError(f"Cells {missing[:5]} of {self.paths[f].name} no longer pass QC; the file changed.")
                pieces.append(got.take([pos[int(r)] for r in want]))
                where += [(int(f), int(r)) for r in want]
        merged = CellBlock.concat(pieces)
        index = {key: i for i, key in enumerate(where)}
        return merged.take([index[(int(f), int(r))] for f, r in ids])

    def block_order(self, epoch: int) -> np.ndarray:
        """The shuffled block order of ``epoch`` (a function of ``random_state`` and ``epoch``)."""
        return np.random.default_rng([self.random_state, int(epoch), 0xB10C]).permutation(len(self.blocks))

    def iter_part(self, part: str = "train", *, epoch: int = 0, shuffle: bool = True) -> Iterator[CellBlock]:
        """Yield the cells of one part block by block.

        With ``shuffle`` the blocks come in :meth:`block_order` and the cells of each block in
        a seeded random order; otherwise in file order. Every QC-passing cell of the part comes
        exactly once.
        """
        code = PARTS.index(part)
        order = self.block_order(epoch) if shuffle else np.arange(len(self.blocks))
        for k, i in enumerate(order):
            block = self.read_block(int(i))
            sel = np.flatnonzero(block.part == code)
            if shuffle:
                sel = np.random.default_rng([self.random_state, int(epoch), int(k), 0xCE11]).permutation(sel)
            yield block.take(sel)

    def scan(self, eval_cells: int | None = None) -> tuple[dict[str, int], CellBlock, CellBlock]:
        """One pass in file order: count QC-passing cells per part and collect evaluation cells.

        Parameters
        ----------
        eval_cells
            Keep at most this many validation and this many test cells (the first ones in file
            order); ``None`` keeps all of them.

        Returns
        -------
        counts : dict
            ``{"cells", "train", "validation", "test"}`` numbers of QC-passing cells.
        validation, test : CellBlock
        """
        counts = dict.fromkeys(("cells", *PARTS), 0)
        keep = {1: [], 2: []}
        n_kept = {1: 0, 2: 0}
        for i in range(len(self.blocks)):
            block = self.read_block(i, buffered=n_kept[1] + n_kept[2])
            counts["cells"] += len(block)
            for code, part in enumerate(PARTS):
                sel = np.flatnonzero(block.part == code)
                counts[part] += sel.size
                if code and (eval_cells is None or n_kept[code] < eval_cells):
                    room = sel.size if eval_cells is None else eval_cells - n_kept[code]
                    keep[code].append(block.take(sel[:room]))
                    n_kept[code] += min(room, sel.size)
        self._hold(0)
        self.counts = counts
        return counts, CellBlock.concat(keep[1]), CellBlock.concat(keep[2])

    def close(self) -> None:
        """Close the backed files."""
        for a in self._adatas:
            try:
                a.file.close()
            except Exception:  # pragma: no cover - already closed
                pass
        self._adatas = []


class MemoryBatches:
    """Sortish batches of a CSR matrix in memory, reshuffled each epoch (drop-last).

    Parameters
    ----------
    X
        ``(n_cells, 19264)`` CSR raw counts (the training cells).
    batch_size
        Cells per (global) batch.
    random_state
        Epoch ``e`` uses the generator seeded with ``(random_state, e)``.
    """

    def __init__(self, X: sp.csr_matrix, batch_size: int, random_state: int = 0):
        if X.shape[0] < batch_size:
            raise ValueError(f"{X.shape[0]} training cells are fewer than batch_size={batch_size}.")
        self.X, self.batch_size, self.random_state = X, int(batch_size), int(random_state)
        self.lengths = np.diff(X.indptr)
        self.epoch, self.consumed = 0, 0
        self._batches = None

    def _plan(self):
        rng = np.random.default_rng([self.random_state, self.epoch])
        self._batches = sortish_batches(self.lengths, self.batch_size, rng)

    def next_batch(self) -> tuple[sp.csr_matrix, np.ndarray]:
        """The next batch: ``(X rows, row indices)``, rows in increasing order."""
        if self._batches is None:
            self._plan()
        if self.consumed >= len(self._batches):
            self.epoch, self.consumed = self.epoch + 1, 0
            self._plan()
        rows = np.sort(self._batches[self.consumed])
        self.consumed += 1
        return self.X[rows], rows

    def state_dict(self) -> dict:
        return {"kind": "memory", "epoch": int(self.epoch), "consumed": int(self.consumed)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "memory":
            raise ValueError("This training state was written for streamed input; resume it with the same .h5ad paths.")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._plan()


class StreamBatches:
    """Block-shuffled sortish batches of a corpus's training cells, read one block at a time.

    Each epoch walks the blocks in :meth:`H5adCorpus.block_order`; the training cells of a
    block are shuffled, appended to the (fewer than ``batch_size``) cells left over from the
    previous block, sorted by length (:func:`~scxtrimo.data.sortish_batches`, one chunk per
    block), cut into batches, and the batches of the block are shuffled; what does not fill a batch carries over to the next block. Leftovers at the end of
    an epoch are dropped, so each training cell is used at most once per epoch and all but
    fewer than ``batch_size`` of them exactly once. Memory: at most ``block_cells + batch_size - 1``
    cells (see :attr:`H5adCorpus.peak_cells`).

    Parameters
    ----------
    corpus
        An :class:`H5adCorpus`.
    batch_size
        Cells per (global) batch.
    random_state
        Seeds the within-block shuffles and groupings.
    """

    def __init__(self, corpus: H5adCorpus, batch_size: int, random_state: int = 0):
        self.corpus, self.batch_size, self.random_state = corpus, int(batch_size), int(random_state)
        self.epoch, self.block_pos, self.consumed = 0, 0, 0
        self._buffer: CellBlock | None = None
        self._batches: list[np.ndarray] = []
        self._leftover_in = np.zeros((0, 2), np.int64)  # ids of the carried-over cells of the buffer
        self._leftover_out: CellBlock | None = None
        self._epoch_batches = 0

    def _load(self, k: int, leftover: CellBlock | None) -> None:
        """Build the buffer of the ``k``-th block of the epoch's order."""
        order = self.corpus.block_order(self.epoch)
        self._buffer, self._batches = None, []  # release the previous buffer before reading
        n_left = 0 if leftover is None else len(leftover)
        block = self.corpus.read_block(int(order[k]), buffered=n_left)
        rng = np.random.default_rng([self.random_state, self.epoch, k, 0xBA7C])
        train = block.take(rng.permutation(np.flatnonzero(block.part == 0)))
        buffer = CellBlock.concat([leftover, train]) if n_left else train
        self.corpus._hold(len(buffer))
        self._leftover_in = np.zeros((0, 2), np.int64) if leftover is None else leftover.ids
        lengths = np.diff(buffer.X.indptr) if len(buffer) else np.zeros(0, np.int64)
        # one length-sorted chunk per buffer: fewer than batch_size cells are left over
        chunk = len(buffer) // self.batch_size + 1
        batches = sortish_batches(lengths, self.batch_size, rng, chunk_batches=chunk) if len(buffer) >= self.batch_size else []
        used = np.zeros(len(buffer), bool)
        for b in batches:
            used[b] = True
        self._leftover_out = buffer.take(np.flatnonzero(~used))
        self._buffer, self._batches, self.block_pos = buffer, batches, k + 1

    def next_batch(self) -> tuple[sp.csr_matrix, np.ndarray]:
        """The next batch: ``(X rows, (n, 2) ids)`` with ids the ``(file, row)`` of each cell."""
        n_blocks = len(self.corpus.blocks)
        while self.consumed >= len(self._batches):
            if self.block_pos >= n_blocks:  # epoch done: drop the leftovers, reshuffle
                if self._epoch_batches == 0:
                    raise ValueError(f"The training part has fewer than batch_size={self.batch_size} cells.")
                self.epoch, self.block_pos, self._epoch_batches = self.epoch + 1, 0, 0
                self._leftover_out = None
            self._load(self.block_pos, self._leftover_out)
            self.consumed = 0
        rows = np.sort(self._batches[self.consumed])
        self.consumed += 1
        self._epoch_batches += 1
        batch = self._buffer.take(rows)
        return batch.X, batch.ids

    def state_dict(self) -> dict:
        """Position: epoch, block (in the epoch's order), batches used, carried-over cell ids."""
        return {
            "kind": "stream", "epoch": int(self.epoch), "block_pos": int(self.block_pos),
            "consumed": int(self.consumed), "epoch_batches": int(self._epoch_batches),
            "leftover_in": self._leftover_in.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Rebuild the buffer the state was taken in (re-reading at most its block and the
        blocks of the carried-over cells) and skip the batches already used."""
        if state.get("kind") != "stream":
            raise ValueError("This training state was written for in-memory input; resume it with the same data.")
        self.epoch, self._epoch_batches = int(state["epoch"]), int(state["epoch_batches"])
        self.block_pos, self.consumed = int(state["block_pos"]), int(state["consumed"])
        self._batches, self._buffer, self._leftover_out = [], None, None
        if self.block_pos > 0:
            ids = np.asarray(state["leftover_in"], dtype=np.int64).reshape(-1, 2)
            leftover = self.corpus.read_ids(ids) if len(ids) else None
            consumed = self.consumed
            self._load(self.block_pos - 1, leftover)
            self.consumed = consumed
