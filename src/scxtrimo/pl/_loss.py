from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from ._finish import finish


def loss(history: pd.DataFrame, *, ax=None, show: bool | None = None, save: str | None = None):
    """Training and validation masked-value MSE against optimizer steps.

    Parameters
    ----------
    history
        The table returned by :func:`scxtrimo.tl.pretrain` (columns ``step``, ``train_mse``,
        ``val_mse``, ``val_pearson``).
    ax
        Axes to draw on; a new figure if ``None``.
    show, save
        ``show=False`` returns the axes; ``save`` is a file path to write the figure to.

    Returns
    -------
    The matplotlib axes when ``show=False``, else ``None``.

    Raises
    ------
    KeyError
        ``history`` lacks the ``step``, ``train_mse`` or ``val_mse`` column.
    """
    missing = {"step", "train_mse", "val_mse"} - set(history.columns)
    if missing:
        raise KeyError(f"history lacks columns {sorted(missing)}; pass the table from scxtrimo.tl.pretrain.")
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(history["step"], history["train_mse"], marker="o", label="train MSE")
    ax.plot(history["step"], history["val_mse"], marker="o", label="validation MSE")
    ax.set_xlabel("step")
    ax.set_ylabel("masked-value MSE (log1p CP10k)")
    if "val_pearson" in history:
        ax2 = ax.twinx()
        ax2.plot(history["step"], history["val_pearson"], color="grey", ls="--", label="validation Pearson r")
        ax2.set_ylabel("Pearson r")
    ax.legend(loc="upper right")
    return finish(ax.figure, ax, show=show, save=save)
