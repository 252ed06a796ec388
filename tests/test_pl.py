"""Each plot rendered to PNG on real data, with its content checked."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

import scxtrimo


@pytest.fixture(scope="module")
def bundled():
    return scxtrimo.models.load("xtrimo-3m")


def _png_ok(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_autobin_stacks_one_band_per_bin(bundled, tmp_path):
    ax = scxtrimo.pl.autobin(bundled, show=False, save=tmp_path / "autobin.png")
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == bundled.config.n_bins == 100
    assert ax.get_xlabel().startswith("expression value") and ax.get_ylim() == (0, 1)
    _png_ok(tmp_path / "autobin.png")
    plt.close("all")


def test_loss_curves(tmp_path):
    history = pd.DataFrame({"step": [100, 200, 300], "train_mse": [1.2, 0.9, 0.8],
                            "val_mse": [1.1, 0.95, 0.85], "val_pearson": [0.3, 0.5, 0.6]})
    ax = scxtrimo.pl.loss(history, show=False, save=tmp_path / "loss.png")
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["train MSE", "validation MSE"]
    np.testing.assert_array_equal(ax.get_lines()[1].get_ydata(), [1.1, 0.95, 0.85])
    _png_ok(tmp_path / "loss.png")
    with pytest.raises(KeyError, match="history"):
        scxtrimo.pl.loss(pd.DataFrame({"x": [1]}), show=False)
    plt.close("all")


def test_embedding_umap_keeps_pca_results(bundled, pbmc3k, tmp_path):
    small = pbmc3k[:300].copy()
    small.obsm["X_umap"] = np.zeros((300, 2))
    scxtrimo.tl.embed(small, model=bundled, progress=False)
    ax = scxtrimo.pl.embedding(small, color="cell_type", show=False)
    ax.figure.savefig(tmp_path / "umap.png")
    _png_ok(tmp_path / "umap.png")
    assert small.obsm["X_umap_X_xtrimo"].shape == (300, 2)
    assert (small.obsm["X_umap"] == 0).all() and "neighbors" not in small.uns
    offsets = ax.collections[0].get_offsets()
    assert len(offsets) == 300
    legend_texts = {t.get_text() for t in ax.get_legend().get_texts()} if ax.get_legend() else {t.get_text() for t in ax.texts}
    assert set(small.obs["cell_type"].astype(str)) <= legend_texts
    plt.close("all")


def test_recovery_panels(bundled, pbmc3k, tmp_path):
    axes = scxtrimo.pl.recovery(bundled, pbmc3k[:16].copy(), n_cells=16, show=False, save=tmp_path / "rec.png")
    assert len(axes) == 2
    assert axes[0].get_xlabel().startswith("true value") and "r = " in axes[0].get_title()
    assert len(axes[1].get_lines()[0].get_xdata()) == 4
    _png_ok(tmp_path / "rec.png")
    plt.close("all")


@pytest.mark.parametrize("values", [[0.0, 1.0, float("nan")], [-1.0, 0.0, 2.0]])
def test_autobin_refuses_values_that_are_not_log1p_cp10k(bundled, values):
    with pytest.raises(ValueError, match="finite and non-negative"):
        scxtrimo.pl.autobin(bundled, values, show=False)


def test_recovery_needs_at_least_one_cell(bundled, pbmc3k):
    with pytest.raises(ValueError, match="n_cells"):
        scxtrimo.pl.recovery(bundled, pbmc3k, n_cells=0, show=False)
