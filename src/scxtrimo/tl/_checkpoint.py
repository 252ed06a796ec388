"""Training-state checkpoints of :func:`scxtrimo.tl.pretrain`: atomic writes, checked resumes.

``train_state.pt`` (next to the model files of ``model.save``) holds everything a run needs to
continue exactly: model weights, AdamW state, step and epoch, the data position, RNG states,
the history so far and the run's *signature* (the settings that shape the trajectory), which a
resume must match.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

TRAIN_STATE = "train_state.pt"
STATE_FORMAT = 1


def fingerprint(parts: Iterable) -> str:
    """A short digest of arrays (their bytes, dtype and shape) and strings, in order.

    Part of a run's signature, so that a resume on other cells of the same count (shuffled,
    changed, or another file under the same name) is refused instead of continuing on another
    split.
    """
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, str):
            h.update(b"s" + part.encode())
        else:
            a = np.ascontiguousarray(part)
            h.update(repr((a.dtype.str, a.shape)).encode())
            h.update(a.tobytes())
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, flushed and
    fsynced, then ``os.replace``-d over ``path`` (and the folder fsynced).

    A crash or an error at any point leaves either the old file or the new one, never a
    partial file; the temporary file is removed on error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def save_train_state(state: dict, folder: str | os.PathLike) -> Path:
    """Serialize ``state`` with :func:`torch.save` and write ``folder/train_state.pt`` atomically."""
    buf = io.BytesIO()
    torch.save({"format": STATE_FORMAT, **state}, buf)
    return atomic_write_bytes(buf.getvalue(), Path(folder) / TRAIN_STATE)


def state_path(resume_from: str | os.PathLike | None, save_dir: str | os.PathLike | None) -> Path:
    """The ``train_state.pt`` a resume reads: ``resume_from`` (file or folder) or ``save_dir``'s.

    Raises
    ------
    ValueError
        Neither is given, or there is no saved training state there.
    """
    if resume_from is None and save_dir is None:
        raise ValueError("resume=True needs save_dir (or resume_from=...) to find the training state.")
    p = Path(resume_from if resume_from is not None else save_dir)
    if p.is_dir() or p.suffix != ".pt":
        p = p / TRAIN_STATE
    if not p.is_file():
        raise ValueError(f"Cannot resume: no training state at {p}. Start the run without resume "
                         "(or with save_dir and save_every so that it leaves one).")
    return p


def load_train_state(path: str | os.PathLike) -> dict:
    """Load a ``train_state.pt`` onto the CPU (tensors and plain Python values only).

    Raises
    ------
    ValueError
        The file is not a readable scxtrimo training state.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable scxtrimo training state: {err}") from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an scxtrimo training state (format {STATE_FORMAT}).")
    return state


def check_signature(saved: dict, current: dict) -> None:
    """Refuse to resume a run whose trajectory-shaping settings differ from the saved ones.

    Raises
    ------
    ValueError
        Naming every setting that differs, with the saved and the current value.
    """
    keys = sorted(set(saved) | set(current))
    diff = [k for k in keys if saved.get(k) != current.get(k)]
    if diff:
        lines = "; ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in diff)
        raise ValueError(f"Cannot resume: this run's settings differ from the saved training state's ({lines}). "
                         "Resume with the same settings, or start a new run (model=... to start from its weights).")
