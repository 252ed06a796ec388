from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from ._finish import finish
from ._model import plotted_model
from ..models._xtrimogene import XTrimoGene


def autobin(model: XTrimoGene, values=None, *, ax=None, cmap: str = "viridis", show: bool | None = None, save: str | None = None):
    """Auto-discretization bin weights across expression values, stacked (paper appendix Fig. 1).

    For each value the auto-discretization block (section 3.3) gives a weight vector over its
    ``b`` bins (100 in the paper) that sums to 1. A trained block changes these weights smoothly
    between close values and clearly between distant ones.

    Parameters
    ----------
    model
        An :class:`~scxtrimo.models.XTrimoGene`, e.g. ``scxtrimo.models.load("xtrimo-3m")``, or a
        checkpoint name or folder.
    values
        1-d array of log1p CP10k values (drawn in increasing order); default ``np.linspace(0, 10, 200)``.
    ax
        Axes to draw on; a new figure if ``None`` (a given figure's layout is left alone).
    cmap
        Matplotlib colormap name for the bins, from the lowest bin to the highest.
    show, save
        ``show=False`` returns the axes; ``save`` is a file path to write the figure to.

    Returns
    -------
    The matplotlib axes when ``show=False``, else ``None``. One filled band per bin.

    Raises
    ------
    ValueError
        ``values`` is empty, not 1-d, or holds negative or non-finite numbers (log1p CP10k
        values are finite and non-negative).
    """
    values = np.linspace(0, 10, 200) if values is None else np.asarray(values, dtype=np.float32)
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all() or (values < 0).any():
        raise ValueError("values must be a non-empty 1-d array of log1p CP10k values, finite and non-negative; "
                         f"got shape {values.shape}, min {np.nanmin(values) if values.size else None}, "
                         f"{int((~np.isfinite(values)).sum())} non-finite.")
    values = np.sort(values)
    model = plotted_model(model)
    with torch.no_grad():
        param = next(model.value_embedding.parameters())
        w = model.value_embedding.bin_weights(torch.as_tensor(values, dtype=param.dtype, device=param.device)).float().cpu().numpy()
    own = ax is None
    if own:
        _, ax = plt.subplots(figsize=(6, 3.5))
    colors = plt.get_cmap(cmap)(np.linspace(0, 1, w.shape[1]))
    ax.stackplot(values, w.T, colors=colors, linewidth=0)
    ax.set_xlim(values.min(), values.max())
    ax.set_ylim(0, 1)
    ax.set_xlabel("expression value (log1p CP10k)")
    ax.set_ylabel("bin weight (stacked)")
    ax.set_title(f"auto-discretization, {w.shape[1]} bins")
    return finish(ax.figure, ax, show=show, save=save, layout=own)
