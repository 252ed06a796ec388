from __future__ import annotations

import os
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch

from .._device import autocast, resolve_device
from ..data._masking import cell_keys
from ..data._objective import counts_to_device, training_batch
from ..data._prepare import check_no_empty_cells, counts_rows, prepare_input
from ..models._xtrimogene import XTrimoGene
from .._anndata import rna_modality
from .._bundled import DEFAULT_CHECKPOINT
from .._validation import check_positive
from ._finish import finish
from ._model import plotted_model


def masked_recovery(adata, *, model: str | os.PathLike | XTrimoGene = DEFAULT_CHECKPOINT, n_cells: int = 256,
                    batch_size: int = 8, random_state: int = 0, device: str = "auto", sparsity_bins: int = 4,
                    layer: str | None = None, use_raw: bool = False) -> dict:
    """Predict masked values of real cells; Pearson r overall and by cell sparsity (section 5.3).

    Returns a dict with ``true`` and ``pred`` (masked non-zero targets), ``sparsity`` (per
    target: the cell's fraction of zero genes), ``pearson`` overall and ``by_sparsity`` (a list
    of ``(low, high, r, n)``). Cell ``i`` is masked with the key ``cell_keys(random_state, 0, i)``
    (pretraining's masking, section 4.2); a model with depth tokens gets ``T = S`` (the cell's
    own depth). Groups are half-open quantile ranges of the sparsity (the last closed), so each
    target is in exactly one; with few cells, repeated quantiles merge into fewer groups. The
    model is put back into its training mode afterwards (it stays on ``device``).
    """
    check_positive("n_cells", n_cells, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    check_positive("sparsity_bins", sparsity_bins, integer=True)
    if not hasattr(adata, "obs"):
        raise TypeError(f"adata must be an AnnData or MuData, not {type(adata).__name__}; the data come first, "
                        f"e.g. scxtrimo.pl.recovery(adata, model={DEFAULT_CHECKPOINT!r}).")
    model = plotted_model(model)
    dev = resolve_device(device)
    data = rna_modality(adata)
    prep = prepare_input(data, layer=layer, use_raw=use_raw)
    C = counts_rows(prep, 0, min(n_cells, data.n_obs))
    check_no_empty_cells(C, data.obs_names)
    was_training = model.training
    model = model.to(dev).eval()
    true, pred, sparsity = [], [], []
    try:
        with torch.no_grad():
            for s in range(0, C.shape[0], batch_size):
                part = C[s : s + batch_size]
                tb = training_batch(counts_to_device(part, dev), cell_keys(random_state, 0, np.arange(s, s + part.shape[0]), device=dev),
                                    depth_tokens=model.config.depth_tokens)
                values = tb.values
                with autocast(dev):
                    out = model(tb.inputs, tb.is_mask).float()
                keep = tb.target & (values != 0)
                zero_frac = 1 - (values != 0).float().mean(1, keepdim=True).expand_as(values)
                true.append(values[keep].cpu().numpy())
                pred.append(out[keep].cpu().numpy())
                sparsity.append(zero_frac[keep].cpu().numpy())
    finally:
        model.train(was_training)
    true, pred, sparsity = map(np.concatenate, (true, pred, sparsity))
    # half-open groups [lo, hi), the last one closed; repeated quantiles (few cells) merge into one group
    edges = np.unique(np.quantile(sparsity, np.linspace(0, 1, sparsity_bins + 1)))
    group = np.clip(np.searchsorted(edges, sparsity, side="right") - 1, 0, max(len(edges) - 2, 0))
    by = []
    for i, lo in enumerate(edges[:-1] if len(edges) > 1 else edges):
        hi = edges[i + 1] if len(edges) > 1 else lo
        m = group == i
        r = float(np.corrcoef(true[m], pred[m])[0, 1]) if m.sum() > 2 else float("nan")
        by.append((float(lo), float(hi), r, int(m.sum())))
    return {"true": true, "pred": pred, "sparsity": sparsity,
            "pearson": float(np.corrcoef(true, pred)[0, 1]), "by_sparsity": by}


def recovery(adata, *legacy, model: str | os.PathLike | XTrimoGene = DEFAULT_CHECKPOINT, n_cells: int = 256,
             random_state: int = 0, device: str = "auto", layer: str | None = None, use_raw: bool = False,
             show: bool | None = None,
             save: str | None = None):
    """Predicted against true masked values, and Pearson r by sparsity (paper Fig. 3A analogue).

    Masks real cells as in pretraining (section 4.2) and plots the model's predictions at the
    masked expressed genes. Two panels: a 2-d histogram of predicted vs true log1p CP10k values,
    and Pearson r for cells grouped by their fraction of zero genes. Nothing is written into
    ``adata``.

    Parameters
    ----------
    adata
        AnnData (or MuData: its RNA modality) with raw counts (or data prepared by
        :func:`scxtrimo.pp.normalize`); the first ``n_cells`` cells are used.
    model
        An :class:`~scxtrimo.models.XTrimoGene` (decoder included), or a checkpoint name or folder
        (default: the bundled :data:`scxtrimo.models.DEFAULT_CHECKPOINT`). The order of scxtrimo 0.1.0,
        ``recovery(model, adata)``, still works, with a ``FutureWarning``.
    n_cells
        How many cells to mask (at least 1).
    random_state
        Seed of the masks (cell ``i`` gets the key ``cell_keys(random_state, 0, i)``).
    device
        ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ...
    layer
        ``layers`` key of the counts to read, as in :func:`scxtrimo.tl.embed` (``None``:
        ``layers['counts']`` if present, else ``X``).
    use_raw
        Read the counts from ``adata.raw.X`` (genes: ``adata.raw.var``), as in :func:`scxtrimo.tl.embed`.
    show, save
        ``show=False`` returns the two axes; ``save`` is a file path to write the figure to.

    Returns
    -------
    ``[ax_scatter, ax_sparsity]`` when ``show=False``, else ``None``.

    Raises
    ------
    ValueError
        ``n_cells`` is not a positive integer; the genes do not match the reference list, the
        values are negative or non-finite, or a cell expresses no reference gene (as in
        :func:`scxtrimo.tl.embed`); ``use_raw=True`` without ``adata.raw`` or with ``layer``.
    TypeError
        ``model`` is not a model or a checkpoint name or folder; more than one extra positional
        argument, or one beside ``model=``.
    KeyError
        ``layer`` is not a key of ``layers``.
    """
    adata, model = legacy_model_first(adata, legacy, model)
    res = masked_recovery(adata, model=model, n_cells=n_cells, random_state=random_state, device=device, layer=layer,
                          use_raw=use_raw)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    top = float(max(res["true"].max(), res["pred"].max()))
    a1.hist2d(res["true"], res["pred"], bins=60, range=[[0, top], [0, top]], cmap="magma_r", cmin=1)
    a1.plot([0, top], [0, top], color="grey", lw=1, ls="--")
    a1.set_xlabel("true value (log1p CP10k)")
    a1.set_ylabel("predicted value")
    a1.set_title(f"masked expressed genes, r = {res['pearson']:.3f}")
    mids = [100 * (lo + hi) / 2 for lo, hi, _, _ in res["by_sparsity"]]
    a2.plot(mids, [r for _, _, r, _ in res["by_sparsity"]], marker="o")
    a2.set_xlabel("cell sparsity (% zero genes)")
    a2.set_ylabel("Pearson r")
    a2.set_title("recovery by sparsity")
    return finish(fig, [a1, a2], show=show, save=save)


def legacy_model_first(adata, legacy: tuple, model):
    """``(adata, model)`` from ``recovery(adata, model=...)`` or the older ``recovery(model, adata)``.

    The older order (a model, name or folder first, the data second) is swapped, with a
    ``FutureWarning``; anything else in ``legacy`` is a ``TypeError``.
    """
    if not legacy:
        return adata, model
    if len(legacy) > 1 or model != DEFAULT_CHECKPOINT or not hasattr(legacy[0], "obs") or hasattr(adata, "obs"):
        raise TypeError("recovery takes the data first and the model by keyword: "
                        f"scxtrimo.pl.recovery(adata, model={DEFAULT_CHECKPOINT!r}).")
    warnings.warn("scxtrimo.pl.recovery(model, adata) is the order of scxtrimo 0.1.0 and will stop working; "
                  "write scxtrimo.pl.recovery(adata, model=model).", FutureWarning, stacklevel=3)
    return legacy[0], adata
