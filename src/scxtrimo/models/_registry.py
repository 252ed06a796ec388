"""Checkpoints by name: bundled ones, and downloadable ones fetched and verified by pooch.

A downloadable checkpoint is a base URL plus the sha256 of each of its three files. Files land
in a cache folder (``$SCXTRIMO_CACHE`` if set, else the platform cache, e.g.
``~/.cache/scxtrimo``) and are reused offline; a file whose hash differs is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CACHE_ENV = "SCXTRIMO_CACHE"
FILES = ("config.json", "model.safetensors", "genes.txt")


@dataclass(frozen=True)
class RemoteCheckpoint:
    """Where a named checkpoint lives: ``base_url`` + ``<file>``, with each file's sha256."""

    name: str
    base_url: str
    sha256: dict = field(default_factory=dict)

    def __post_init__(self):
        missing = set(FILES) - set(self.sha256)
        if missing:
            raise ValueError(f"Checkpoint {self.name!r}: no sha256 given for {sorted(missing)}.")


#: Downloadable checkpoints (name -> RemoteCheckpoint). Published models are added here.
REMOTE: dict[str, RemoteCheckpoint] = {}


def cache_dir() -> Path:
    """The download cache: ``$SCXTRIMO_CACHE`` or the platform's user cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    import pooch

    return Path(pooch.os_cache("scxtrimo"))


def register(name: str, base_url: str, sha256: dict) -> RemoteCheckpoint:
    """Make ``scxtrimo.models.load(name)`` download ``base_url/<file>`` for the three files."""
    entry = RemoteCheckpoint(name, base_url.rstrip("/") + "/", dict(sha256))
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
