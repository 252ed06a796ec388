"""Bundled example data."""

from ._pbmc3k import pbmc3k

__all__ = ["pbmc3k"]
