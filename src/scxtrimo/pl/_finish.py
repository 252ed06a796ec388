from __future__ import annotations

import matplotlib.pyplot as plt


def finish(fig, axes, *, show: bool | None, save):
    """Lay out ``fig``, write it to ``save`` if given, show it if asked; return ``axes`` unless shown."""
    fig.tight_layout()
    if save:
        fig.savefig(save, dpi=150)
    if show:
        plt.show()
    return None if show else axes
