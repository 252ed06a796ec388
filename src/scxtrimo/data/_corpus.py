"""A compact pretraining corpus: every cell's reference-gene counts in one small file.

The file (``*.xtc``) is an lzma-compressed NumPy ``.npz`` archive (no pickled objects) holding,
for ``n`` cells that passed quality control:

* ``indptr`` ``(n + 1,)`` int64 and ``gene_delta`` ``(nnz,)`` uint16: the CSR structure on the
  19,264 reference genes, each cell's gene indices delta-coded (first index as is, then the
  gap to the previous one), which makes them very compressible;
* ``counts`` ``(nnz,)`` uint16: the raw counts (values above 65,535 clipped; ``n_clipped``
  says how many);
* ``total`` ``(n,)`` float64: each cell's total count over the reference genes, before any
  clipping (the depth ``T`` of depth-aware pretraining);
* ``source`` ``(n,)`` int16 codes into ``sources`` (the data set each cell came from),
  ``label`` ``(n,)`` int16 codes into ``label_names`` (``obs['cell_type']`` where the data set
  has one, else -1), ``obs_names`` and ``split`` ``(n,)`` int8: 0 train, 1 validation,
  2 test, a seeded hash of (data set, cell name) in the proportions 96:2:2 (paper appendix 1);
* ``format``: the format version, ``min_genes`` and ``n_clipped``.

Reading needs NumPy and SciPy only (no anndata), so the file can travel to a GPU machine
beside the repository. :func:`pack_corpus` writes it from ``.h5ad`` files;
``scxtrimo corpus OUT.xtc IN.h5ad ...`` does the same from the command line.
"""

from __future__ import annotations

import io
import lzma
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .._paths import check_h5ad_files, check_output_file
from .._validation import check_positive

FORMAT = 1
MIN_GENES = 201  # paper appendix 1: cells with more than 200 expressed genes
SPLIT_NAMES = ("train", "validation", "test")


@dataclass
class Corpus:
    """Cells of a packed corpus (:func:`load_corpus`).

    counts : ``(n, 19264)`` CSR float32 raw counts on the reference genes (sorted indices).
    total : ``(n,)`` float64 total counts. source, label, split : ``(n,)`` integer codes.
    sources, label_names : names of the codes. obs_names : ``(n,)`` cell names.
    """

    counts: sp.csr_matrix
    total: np.ndarray
    source: np.ndarray
    sources: list[str]
    label: np.ndarray
    label_names: list[str]
    split: np.ndarray
    obs_names: np.ndarray
    n_clipped: int = 0

    def __len__(self) -> int:
        return self.counts.shape[0]

    def rows(self, part: str | None = None, *, source: str | None = None) -> np.ndarray:
        """Indices of the cells of a split part (``"train"``, ...) and/or of one data set."""
        keep = np.ones(len(self), dtype=bool)
        if part is not None:
            if part not in SPLIT_NAMES:
                raise ValueError(f"No split part {part!r}; the parts are {', '.join(map(repr, SPLIT_NAMES))}.")
            keep &= self.split == SPLIT_NAMES.index(part)
        if source is not None:
            if source not in self.sources:
                raise KeyError(f"No data set {source!r} in this corpus; it holds {self.sources}.")
            keep &= self.source == self.sources.index(source)
        return np.flatnonzero(keep)

    def model_input(self, rows: np.ndarray, *, depth: tuple[float, str] | None = None) -> sp.csr_matrix:
        """log1p CP10k CSR float32 of cells ``rows`` (plus T and S columns with ``depth = (value, mode)``).

        The total of each cell is its stored ``total``; with ``depth``, ``S = log10(total)``
        and ``T`` follows :func:`scxtrimo.data._depth.target_depth`.
        """
        from ._depth import append_depth, target_depth

        C = self.counts[rows]
        tot = self.total[rows]
        scale = np.divide(1e4, tot, out=np.zeros_like(tot), where=tot > 0)
        X = sp.csr_matrix((np.log1p(C.data.astype(np.float64) * np.repeat(scale, np.diff(C.indptr))).astype(np.float32),
                           C.indices, C.indptr), shape=C.shape)
        if depth is None:
            return X
        with np.errstate(divide="ignore"):
            return append_depth(X, target_depth(tot, *depth), np.log10(tot))

    def describe(self) -> list[dict]:
        """Cells, non-zeros and split sizes per data set."""
        nnz = np.diff(self.counts.indptr)
        out = []
        for i, name in enumerate(self.sources):
            sel = self.source == i
            out.append({"source": name, "cells": int(sel.sum()), "nnz": int(nnz[sel].sum()),
                        **{p: int((self.split[sel] == k).sum()) for k, p in enumerate(SPLIT_NAMES)}})
        return out


def split_codes(source: str, obs_names: Sequence[str], random_state: int = 0,
                fractions: Sequence[float] = (0.96, 0.02, 0.02)) -> np.ndarray:
    """``(n,)`` int8 split codes (0 train, 1 validation, 2 test) from a seeded hash of each name."""
    from hashlib import blake2b

    u = np.array([
        int.from_bytes(blake2b(f"{random_state}\0{source}\0{name}".encode(), digest_size=8).digest(), "little") / 2**64
        for name in obs_names
    ])
    return np.where(u < fractions[0], 0, np.where(u < fractions[0] + fractions[1], 1, 2)).astype(np.int8)


def _delta_encode(X: sp.csr_matrix) -> np.ndarray:
    d = X.indices.astype(np.int64).copy()
    d[1:] -= X.indices[:-1]
    starts = X.indptr[:-1][np.diff(X.indptr) > 0]
    d[starts] = X.indices[starts]
    return d.astype(np.uint16)


def _delta_decode(indptr: np.ndarray, delta: np.ndarray) -> np.ndarray:
    d = delta.astype(np.int64)
    starts = indptr[:-1][np.diff(indptr) > 0]
    # cumulative sum restarted at each row: subtract the running total before the row's start
    csum = np.cumsum(d)
    base = np.zeros_like(d)
    base[starts] = csum[starts] - d[starts]
    return (csum - np.maximum.accumulate(base)).astype(np.int32)


def pack_corpus(paths: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, *,
                min_genes: int = MIN_GENES, labels_key: str | None = "cell_type", random_state: int = 0,
                preset: int = 6, progress: bool = True) -> dict:
    """Pack the cells of ``.h5ad`` files into one compact corpus file.

    Each file is read in backed mode, block by block; genes are mapped onto the 19,264
    reference genes (:func:`scxtrimo.pp.align_genes`'s matching), log1p or normalized input
    is turned back into counts, and cells with fewer than ``min_genes`` expressed reference
    genes are dropped (paper appendix 1 keeps cells with more than 200).

    Parameters
    ----------
    paths
        ``.h5ad`` files of single-cell counts (gene symbols as ``var_names``), or one such file.
        Each file once; their names (without ``.h5ad``) name the data sets, so they must differ.
    out
        The file to write (``.xtc`` by convention); written atomically (a failed call leaves no
        file behind). Its folder must exist.
    min_genes
        Keep cells with at least this many expressed reference genes.
    labels_key
        ``obs`` column stored as each cell's label where a file has it (files without it are
        unlabelled, ``-1``; a ``UserWarning`` when no file has it). ``None``: no labels.
    random_state
        Seeds the 96:2:2 split (a hash of file stem and cell name).
    preset
        lzma compression preset (0-9).
    progress
        Print one line per file.

    Returns
    -------
    dict
        ``cells``, ``nnz``, ``bytes`` (file size), ``n_clipped`` and per-source rows.

    Raises
    ------
    ValueError
        No input; a file given twice or two files of the same name; an input that is not an
        ``.h5ad`` (HDF5) file; ``min_genes`` not a positive integer; ``preset`` not an integer
        from 0 to 9; no cell passes QC; the alignment and validation errors of
        :func:`scxtrimo.pp.align_genes` (e.g. too few genes match).
    FileNotFoundError
        An input does not exist, or the folder of ``out`` does not.
    IsADirectoryError
        ``out`` is a folder.
    """
    import anndata as ad

    from ._prepare import counts_rows, prepare_input

    paths = check_h5ad_files(paths)
    stems = [p.stem for p in paths]
    twin = next((stem for stem in stems if stems.count(stem) > 1), None)
    if twin is not None:
        raise ValueError(f"inputs {[str(p) for p in paths if p.stem == twin]} share the name {twin!r}, which names "
                         "their data set in the corpus (Corpus.sources, rows(source=...)) and seeds its split; "
                         "rename the files apart.")
    check_positive("min_genes", min_genes, integer=True)
    if not isinstance(preset, (int, np.integer)) or isinstance(preset, bool) or not 0 <= preset <= 9:
        raise ValueError(f"preset must be an integer from 0 to 9 (the lzma compression preset), got {preset!r}.")
    check_output_file(out)
    blocks, totals, sources, labels, label_names, names, splits = [], [], [], [], [], [], []
    labelled = False
    for i, path in enumerate(paths):
        adata = ad.read_h5ad(path, backed="r")
        try:
            prep = prepare_input(adata)
            lab = adata.obs[labels_key].astype(str).to_numpy() if labels_key in adata.obs else None
            labelled = labelled or lab is not None
            for start in range(0, adata.n_obs, prep.block_cells()):
                stop = min(start + prep.block_cells(), adata.n_obs)
                C = counts_rows(prep, start, stop)
                C.sum_duplicates()
                C.sort_indices()
                keep = np.flatnonzero(np.diff(C.indptr) >= min_genes)
                C = C[keep]
                if np.any(C.data != np.round(C.data)):
                    C.data = np.round(C.data)  # estimated counts from normalized input
                blocks.append(C)
                totals.append(np.asarray(C.sum(axis=1), dtype=np.float64).ravel())
                sources.append(np.full(len(keep), i, dtype=np.int16))
                obs = np.asarray(adata.obs_names[start:stop])[keep].astype(str)
                names.append(obs)
                splits.append(split_codes(path.stem, obs, random_state))
                if lab is None:
                    labels.append(np.full(len(keep), -1, dtype=np.int16))
                else:
                    codes = []
                    for name in lab[start:stop][keep]:
                        if name not in label_names:
                            label_names.append(name)
                        codes.append(label_names.index(name))
                    labels.append(np.asarray(codes, dtype=np.int16))
        finally:
            adata.file.close()
        if progress:
            print(f"{path.stem}: {sum(len(s) for s in sources if s.size and s[0] == i)} cells kept", flush=True)
    if labels_key is not None and not labelled:
        warnings.warn(f"labels_key {labels_key!r} is a column of no input's obs, so the corpus has no labels; "
                      "pass the right column (or labels_key=None).", UserWarning, stacklevel=2)
    X = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, 0))
    if X.shape[0] == 0:
        raise ValueError(f"No cell has at least {min_genes} expressed reference genes; nothing to pack.")
    n_clipped = int((X.data > np.iinfo(np.uint16).max).sum())
    arrays = {
        "indptr": X.indptr.astype(np.int64),
        "gene_delta": _delta_encode(X),
        "counts": np.minimum(X.data, np.iinfo(np.uint16).max).astype(np.uint16),
        "total": np.concatenate(totals),
        "source": np.concatenate(sources),
        "sources": np.asarray(stems),
        "label": np.concatenate(labels),
        "label_names": np.asarray(label_names if label_names else [""]),
        "obs_names": np.concatenate(names),
        "split": np.concatenate(splits),
        "format": np.asarray([FORMAT, min_genes, n_clipped], dtype=np.int64),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_bytes(lzma.compress(buf.getvalue(), preset=int(preset)))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    corpus = _from_arrays(arrays)
    return {"cells": len(corpus), "nnz": int(X.nnz), "bytes": out.stat().st_size, "n_clipped": n_clipped,
            "sources": corpus.describe()}


def _from_arrays(a) -> Corpus:
    indptr = np.asarray(a["indptr"], dtype=np.int64)
    indices = _delta_decode(indptr, np.asarray(a["gene_delta"]))
    from .._reference import N_GENES

    X = sp.csr_matrix((np.asarray(a["counts"]).astype(np.float32), indices, indptr), shape=(len(indptr) - 1, N_GENES))
    fmt = np.asarray(a["format"])
    names = [str(x) for x in np.asarray(a["label_names"])]
    return Corpus(counts=X, total=np.asarray(a["total"], dtype=np.float64), source=np.asarray(a["source"]),
                  sources=[str(x) for x in np.asarray(a["sources"])], label=np.asarray(a["label"]),
                  label_names=names if names != [""] else [], split=np.asarray(a["split"]),
                  obs_names=np.asarray(a["obs_names"]), n_clipped=int(fmt[2]))


def load_corpus(path: str | os.PathLike) -> Corpus:
    """Read a corpus written by :func:`pack_corpus` (NumPy and SciPy only; no pickles).

    Raises
    ------
    ValueError
        The file is not an scxtrimo corpus, or of a newer format.
    """
    raw = Path(path).read_bytes()
    try:
        data = np.load(io.BytesIO(lzma.decompress(raw)), allow_pickle=False)
    except (lzma.LZMAError, ValueError, OSError) as err:
        raise ValueError(f"{path} is not an scxtrimo corpus (an lzma-compressed .npz): {err}") from None
    with data:
        if "format" not in data.files or int(data["format"][0]) > FORMAT:
            raise ValueError(f"{path} is not an scxtrimo corpus of format <= {FORMAT}; update scxtrimo.")
        return _from_arrays({k: data[k] for k in data.files})
