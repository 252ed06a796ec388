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
        Axes to draw on; a new figure if ``None`` (a given figure's layout is left alone).
    show, save
        ``show=False`` returns the axes; ``save`` is a file path to write the figure to.

    Returns
    -------
    The matplotlib axes when ``show=False``, else ``None``.

    Raises
    ------
    KeyError
        ``history`` lacks the ``step``, ``train_mse`` or ``val_mse`` column.
    TypeError
        ``history`` is not a DataFrame (e.g. the ``(model, history)`` tuple itself).
    ValueError
        ``history`` has no rows.
    """
    if isinstance(history, tuple):
        raise TypeError("history is a tuple: tl.pretrain returns (model, history); unpack it first, "
                        "`model, history = scxtrimo.tl.pretrain(...)`, and pass the history.")
    if not isinstance(history, pd.DataFrame):
        raise TypeError(f"history must be the pandas DataFrame from scxtrimo.tl.pretrain, got {type(history).__name__}.")
    missing = {"step", "train_mse", "val_mse"} - set(history.columns)
    if missing:
        raise KeyError(f"history lacks columns {sorted(missing)}; pass the table from scxtrimo.tl.pretrain.")
    if history.empty:
        raise ValueError("history has no rows: the run recorded no evaluation (train longer, or evaluate more often).")
    own = ax is None
    if own:
        _, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(history["step"], history["train_mse"], marker="o", label="train MSE")
    ax.plot(history["step"], history["val_mse"], marker="o", label="validation MSE")
    ax.set_xlabel("step")
    ax.set_ylabel("masked-value MSE (log1p CP10k)")
    if "val_pearson" in history:
        ax2 = ax.twinx()
        ax2.plot(history["step"], history["val_pearson"], color="grey", ls="--", label="validation Pearson r")
        ax2.set_ylabel("Pearson r")
    lines = [*ax.get_lines(), *(ax2.get_lines() if "val_pearson" in history else [])]
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    return finish(ax.figure, ax, show=show, save=save, layout=own)
