"""Checks on input and output paths, made before any work is done, with errors that name the path."""

from __future__ import annotations

import os
from pathlib import Path


def check_h5ad_files(paths) -> list[Path]:
    """``paths`` (one path or a sequence of them) as a list, each an existing HDF5 file, none twice.

    Raises
    ------
    ValueError
        No path; a file that is not HDF5 (so not ``.h5ad``); one file given twice (its cells
        would count twice and could land in both the training and the test split).
    FileNotFoundError
        A path that does not exist or is not a file.
    """
    import h5py

    paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not paths:
        raise ValueError("no input data: give at least one .h5ad file.")
    seen: dict[Path, Path] = {}
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"input {str(path)!r} does not exist (or is not a file).")
        if not h5py.is_hdf5(path):
            raise ValueError(f"could not read {str(path)!r} as an .h5ad file (it is not HDF5). Convert it first, e.g. "
                             "with scanpy.read_10x_h5 / read_10x_mtx / read_loom and .write_h5ad().")
        first = seen.setdefault(path.resolve(), path)
        if first is not path:
            also = f" (also as {str(first)!r})" if first != path else ""
            raise ValueError(f"input {str(path)!r} is given twice{also}: its cells would count twice and could land "
                             "in both the training and the test split. Give each file once.")
    return paths


def check_output_file(path) -> None:
    """Refuse an output file whose folder does not exist, or that is a folder, before any work is done.

    Raises
    ------
    FileNotFoundError
        The folder of ``path`` does not exist.
    IsADirectoryError
        ``path`` is an existing folder.
    """
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise FileNotFoundError(f"the folder of the output {str(path)!r} does not exist; create {str(folder)!r} first.")
    if Path(path).is_dir():
        raise IsADirectoryError(f"the output {str(path)!r} is a folder; give the name of a file to write.")


def check_output_dir(path) -> None:
    """Refuse an output folder that is a file, or lies inside one, before any work is done.

    Raises
    ------
    NotADirectoryError
        ``path`` or the nearest of its parents that exists is not a folder.
    """
    path = Path(path)
    for where in (path, *path.parents):
        if where.exists():
            if not where.is_dir():
                raise NotADirectoryError(f"the output folder {str(path)!r} cannot be created: {str(where)!r} is a "
                                         "file, not a folder. Choose another folder.")
            return


def write_h5ad_atomic(adata, path, **kwargs) -> None:
    """``adata.write_h5ad(path, **kwargs)`` through a temporary file in the same folder, renamed at the end.

    A write that fails half-way leaves ``path`` as it was (which matters when ``path`` is the file the
    data were read from) and no temporary file behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        adata.write_h5ad(tmp, **kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
