from __future__ import annotations

import matplotlib.pyplot as plt


def finish(fig, axes, *, show: bool | None, save, layout: bool = True):
    """Lay out ``fig`` (only with ``layout``: not a figure the user passed axes of), write it to
    ``save`` if given, show it if asked; return ``axes`` unless shown."""
    if layout:
        fig.tight_layout()
    if save:
        fig.savefig(save, dpi=150)
    if show:
        plt.show()
    return None if show else axes
