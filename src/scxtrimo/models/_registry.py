"""Checkpoints by name: bundled ones, and downloadable ones fetched and verified by pooch.

A downloadable checkpoint is a base URL plus the sha256 of each of its three files. Files land
in a cache folder (``$SCXTRIMO_CACHE`` if set, else the platform cache, e.g.
``~/.cache/scxtrimo``) and are reused offline; a file whose hash differs is refused.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

CACHE_ENV = "SCXTRIMO_CACHE"
FILES = ("config.json", "model.safetensors", "genes.txt")
_SHA256 = re.compile("[0-9a-f]{64}")


@dataclass(frozen=True)
class RemoteCheckpoint:
    """Where a named checkpoint lives: ``base_url`` + ``<file>``, with each file's sha256."""

    name: str
    base_url: str
    sha256: dict = field(default_factory=dict)

    def __post_init__(self):
        name = self.name
        if not isinstance(name, str) or name in ("", ".") or any(s in name for s in ("/", "\\", "..")):
            raise ValueError(f"Checkpoint name {name!r} cannot name its cache folder: give a non-empty name "
                             "without '/', '\\' or '..'.")
        missing, unknown = set(FILES) - set(self.sha256), set(self.sha256) - set(FILES)
        if missing or unknown:
            raise ValueError(f"Checkpoint {name!r}: give the sha256 of each of {list(FILES)}; none given for "
                             f"{sorted(missing)}, unknown files {sorted(unknown)}.")
        object.__setattr__(self, "sha256", {f: _digest(name, f, self.sha256[f]) for f in FILES})


def _digest(name: str, fname: str, value) -> str:
    """``value`` as 64 lower-case hex digits (upper case and a ``sha256:`` prefix are accepted)."""
    digest = value.lower().removeprefix("sha256:") if isinstance(value, str) else ""
    if not _SHA256.fullmatch(digest):
        raise ValueError(f"Checkpoint {name!r}: the sha256 of {fname} is {value!r}; give its 64 hex digits "
                         f"(as `sha256sum {fname}` prints them; a 'sha256:' prefix is accepted).")
    return digest


#: Downloadable checkpoints (name -> RemoteCheckpoint). Published models are added here.
REMOTE: dict[str, RemoteCheckpoint] = {}


def cache_dir() -> Path:
    """The download cache: ``$SCXTRIMO_CACHE`` or the platform's user cache folder.

    Returns
    -------
    pathlib.Path
        The folder (not created here); each registered checkpoint is downloaded into
        ``cache_dir() / name``.
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    import pooch

    return Path(pooch.os_cache("scxtrimo"))


def register(name: str, base_url: str, sha256: dict) -> RemoteCheckpoint:
    """Make ``scxtrimo.models.load(name)`` download ``base_url/<file>`` for the three files.

    Parameters
    ----------
    name
        The name :func:`scxtrimo.models.load` takes; also the cache folder's name.
    base_url
        Where the files are: ``base_url/config.json``, ``base_url/model.safetensors``, ``base_url/genes.txt``.
    sha256
        File name -> sha256 (64 hex digits; upper case and a ``sha256:`` prefix are accepted) for
        exactly those three files.

    Returns
    -------
    RemoteCheckpoint
        The registry entry (``name``, ``base_url``, ``sha256``: the checked, lower-case hashes).

    Raises
    ------
    ValueError
        ``name`` is a bundled checkpoint's, empty, or holds ``/``, ``\\`` or ``..``; a file's sha256
        is missing or not 64 hex digits; ``sha256`` names other files. Nothing is registered then.

    Warns
    -----
    UserWarning
        ``name`` was registered before with another location or hashes (the new entry replaces it).
    """
    from ._io import BUNDLED

    if name in BUNDLED:
        raise ValueError(f"{name!r} is a checkpoint bundled with scxtrimo; register the download under another name.")
    entry = RemoteCheckpoint(name, base_url.rstrip("/") + "/", dict(sha256))
    if name in REMOTE and REMOTE[name] != entry:
        warnings.warn(f"register({name!r}) replaces the download registered under that name before "
                      f"({REMOTE[name].base_url}).", UserWarning, stacklevel=2)
    REMOTE[name] = entry
    return entry


def fetch(name: str, *, progress: bool = False) -> Path:
    """Download (or reuse from the cache) a registered checkpoint; return its folder.

    Raises
    ------
    ValueError
        A downloaded or cached file whose sha256 differs from the registry's (the bad file is
        deleted, so the next call downloads it again).
    """
    import pooch

    entry = REMOTE[name]
    folder = cache_dir() / name
    for fname in FILES:
        try:
            pooch.retrieve(
                url=entry.base_url + fname,
                known_hash=f"sha256:{entry.sha256[fname]}",
                fname=fname,
                path=folder,
                progressbar=progress,
            )
        except ValueError as err:  # pooch: hash mismatch
            (folder / fname).unlink(missing_ok=True)
            raise ValueError(
                f"Checkpoint {name!r}: {fname} does not match its registered sha256 and was deleted "
                f"({err}). The download was corrupted or the server holds another file; try again."
            ) from None
    return folder
