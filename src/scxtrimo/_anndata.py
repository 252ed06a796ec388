"""Small AnnData/MuData utilities shared by the public API."""

from __future__ import annotations

from typing import Any

import anndata as ad

from ._version import __version__

UNS_KEY = "xtrimo"


def rna_modality(data: Any) -> ad.AnnData:
    """Return the AnnData to work on: ``data`` itself, or the RNA modality of a MuData.

    Raises
    ------
    TypeError
        If ``data`` is neither an AnnData nor a MuData.
    KeyError
        If a MuData has no ``'rna'`` (or ``'RNA'``, ``'gex'``) modality.
    """
    if isinstance(data, ad.AnnData):
        return data
    mod = getattr(data, "mod", None)
    if isinstance(mod, dict) or hasattr(mod, "keys"):
        for key in ("rna", "RNA", "gex", "GEX"):
            if key in mod:
                return mod[key]
        raise KeyError(
            f"This MuData has no RNA modality (found {list(mod.keys())}); pass the modality "
            "with gene expression directly, e.g. `mdata.mod['<name>']`."
        )
    raise TypeError(f"Expected an AnnData or a MuData, got {type(data).__name__}.")


def xtrimo_uns(adata: ad.AnnData) -> dict:
    """Return ``adata.uns['xtrimo']``, creating it if missing."""
    entry = adata.uns.get(UNS_KEY)
    if not isinstance(entry, dict):
        entry = {}
        adata.uns[UNS_KEY] = entry
    return entry


def package_version() -> str:
    return __version__
