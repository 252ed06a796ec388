"""Each plot rendered to PNG on real data, with its content checked."""

import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import PolyCollection

import scxtrimo
from conftest import DEFAULT


@pytest.fixture(scope="module")
def bundled():
    return scxtrimo.models.load(DEFAULT)


@pytest.fixture(scope="module")
def tiny(tiny_config):
    """Random weights of a small architecture, for what does not depend on the weights (a
    checkpoint's full-length decoder costs seconds per cell on a CPU)."""
    torch.manual_seed(0)
    return scxtrimo.models.XTrimoGene(tiny_config).eval()


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
    """The bundled checkpoint on 6 real cells (its full-length decoder costs seconds per cell): the
    masked values are recovered (the 3m: r = 0.774 here), in 4 sparsity groups."""
    axes = scxtrimo.pl.recovery(pbmc3k[:6].copy(), model=bundled, n_cells=6, show=False, save=tmp_path / "rec.png")
    assert len(axes) == 2
    assert axes[0].get_xlabel().startswith("true value")
    assert float(re.search(r"r = (-?[0-9.]+)", axes[0].get_title()).group(1)) > 0.6, axes[0].get_title()
    assert len(axes[1].get_lines()[0].get_xdata()) == 4
    _png_ok(tmp_path / "rec.png")
    plt.close("all")


def test_recovery_reads_the_counts_from_a_named_layer(tiny, pbmc3k):
    axes = scxtrimo.pl.recovery(pbmc3k[:6].copy(), model=tiny, n_cells=6, show=False)
    moved = pbmc3k[:6].copy()
    moved.layers["raw"], moved.X = moved.X.copy(), moved.X * 0  # the counts in a named layer: the same cells
    with pytest.raises(KeyError, match="layer='counts' is not in adata.layers"):
        scxtrimo.pl.recovery(moved, model=tiny, n_cells=6, layer="counts", show=False)
    same = scxtrimo.pl.recovery(moved, model=tiny, n_cells=6, layer="raw", show=False)
    assert same[0].get_title() == axes[0].get_title() and "r = " in same[0].get_title()
    plt.close("all")


@pytest.mark.parametrize("values", [[0.0, 1.0, float("nan")], [-1.0, 0.0, 2.0]])
def test_autobin_refuses_values_that_are_not_log1p_cp10k(bundled, values):
    with pytest.raises(ValueError, match="finite and non-negative"):
        scxtrimo.pl.autobin(bundled, values, show=False)


def test_recovery_needs_at_least_one_cell(bundled, pbmc3k):
    with pytest.raises(ValueError, match="n_cells"):
        scxtrimo.pl.recovery(pbmc3k, model=bundled, n_cells=0, show=False)


# ---------------------------------------------------------------------------------------------
# the UMAP follows the embedding; a failed plot leaves the AnnData as it was


@pytest.fixture
def embedded(pbmc3k_embedded):
    """200 pbmc3k cells with tl.embed's defaults (the session's embedding, those rows)."""
    return pbmc3k_embedded[:200].copy()


def test_embedding_recomputes_the_umap_when_the_embedding_or_settings_change(bundled, embedded):
    scxtrimo.pl.embedding(embedded, show=False)
    first = embedded.obsm["X_umap_X_xtrimo"].copy()
    scxtrimo.pl.embedding(embedded, show=False)  # nothing changed: the stored UMAP is reused
    np.testing.assert_array_equal(embedded.obsm["X_umap_X_xtrimo"], first)
    scxtrimo.tl.embed(embedded, model=bundled, pooling="max", progress=False)
    scxtrimo.pl.embedding(embedded, show=False)  # a new embedding: a new UMAP
    second = embedded.obsm["X_umap_X_xtrimo"].copy()
    assert not np.array_equal(second, first)
    scxtrimo.pl.embedding(embedded, n_neighbors=5, show=False)  # new settings: a new graph and UMAP
    assert embedded.uns["neighbors_X_xtrimo"]["params"]["n_neighbors"] == 5
    assert not np.array_equal(embedded.obsm["X_umap_X_xtrimo"], second)
    # evaluate_clustering's graph under the same key (3 neighbours) is not reused for the UMAP
    embedded.obsm["X_umap_X_xtrimo"] = second
    scxtrimo.tl.evaluate_clustering(embedded, labels_key="cell_type", n_neighbors=3)
    scxtrimo.pl.embedding(embedded, show=False)
    assert embedded.uns["neighbors_X_xtrimo"]["params"]["n_neighbors"] == 15
    np.testing.assert_array_equal(embedded.obsm["X_umap_X_xtrimo"], second)
    plt.close("all")


def _everything(a):
    return ({k: np.asarray(v).copy() for k, v in a.obsm.items()}, sorted(a.uns), sorted(a.obsp))


def _same(a, b):
    assert a[1:] == b[1:] and a[0].keys() == b[0].keys()
    for k in a[0]:
        np.testing.assert_array_equal(a[0][k], b[0][k])


@pytest.mark.parametrize("kwargs", [{"color": "not_a_column"}, {"components": "1,3"}])
def test_a_failed_embedding_plot_writes_nothing(embedded, kwargs):
    before = _everything(embedded)
    with pytest.raises((KeyError, IndexError, ValueError)):
        scxtrimo.pl.embedding(embedded, show=False, **kwargs)
    _same(_everything(embedded), before)
    plt.close("all")


def test_embedding_refuses_non_finite_values_and_too_few_cells(embedded):
    bad = embedded.copy()
    bad.obsm["X_xtrimo"][[2, 5]] = np.nan
    with pytest.raises(ValueError, match="non-finite values in 2 cells"):
        scxtrimo.pl.embedding(bad, show=False)
    with pytest.raises(ValueError, match="at least 3 cells"):
        scxtrimo.pl.embedding(embedded[:2].copy(), show=False)
    assert "X_umap_X_xtrimo" not in bad.obsm


def test_recovery_counts_each_target_in_one_sparsity_group(tiny, pbmc3k):
    from scxtrimo.pl._recovery import masked_recovery

    for n in (1, 8):
        res = masked_recovery(pbmc3k[:8].copy(), model=tiny, n_cells=n, device="cpu")
        assert sum(b[3] for b in res["by_sparsity"]) == len(res["true"])
        lows = [b[0] for b in res["by_sparsity"]]
        assert lows == sorted(set(lows))  # no repeated (empty or duplicate) group


def test_recovery_checks_its_input_and_leaves_the_model_as_it_was(tiny, pbmc3k):
    tiny.train()
    try:
        scxtrimo.pl.recovery(pbmc3k[:4].copy(), model=tiny, n_cells=4, show=False)
        assert tiny.training
    finally:
        tiny.eval()
    with pytest.raises(ValueError, match="n_cells must be a positive integer"):
        scxtrimo.pl.recovery(pbmc3k[:4].copy(), model=tiny, n_cells=2.5, show=False)
    empty = pbmc3k[:4].copy()
    empty.X = empty.X * 0
    with pytest.raises(ValueError, match="express none of the reference genes"):
        scxtrimo.pl.recovery(empty, model=tiny, n_cells=4, show=False)
    plt.close("all")


def test_recovery_takes_the_data_first_and_the_older_order_with_a_warning(tiny, pbmc3k):
    """scanpy's convention, adata first; the 0.1.0 order (model, adata) gives the same figure."""
    small = pbmc3k[:6].copy()
    new = scxtrimo.pl.recovery(small, model=tiny, n_cells=6, show=False)
    with pytest.warns(FutureWarning, match=r"recovery\(adata, model=model\)"):
        old = scxtrimo.pl.recovery(tiny, small, n_cells=6, show=False)
    assert new[0].get_title() == old[0].get_title() and "r = " in new[0].get_title()
    with pytest.warns(FutureWarning):
        scxtrimo.pl.recovery(DEFAULT, small, n_cells=1, show=False)  # a checkpoint name first
    with pytest.raises(TypeError, match="data first"):
        scxtrimo.pl.recovery(small, tiny, n_cells=2, show=False)  # the model positional, second
    with pytest.raises(TypeError, match="data first"):
        scxtrimo.pl.recovery(tiny, small, model=tiny, n_cells=2, show=False)
    with pytest.raises(TypeError, match="adata must be an AnnData"):
        scxtrimo.pl.recovery(tiny, n_cells=2, show=False)
    assert list(small.obsm) == [] and "xtrimo" not in small.uns  # nothing written
    plt.close("all")


def test_autobin_sorts_values_and_takes_a_checkpoint_name(bundled):
    ax = scxtrimo.pl.autobin(DEFAULT, [5.0, 1.0, 3.0, 0.0], show=False)
    band = next(c for c in ax.collections if isinstance(c, PolyCollection))
    xs = band.get_paths()[0].vertices[:, 0]
    assert xs.min() == 0.0 and xs.max() == 5.0
    top = xs[: len(xs) // 2]
    assert (np.diff(top[np.isin(top, [0.0, 1.0, 3.0, 5.0])]) >= 0).all()
    with pytest.raises(TypeError, match="model"):
        scxtrimo.pl.autobin(scxtrimo.datasets.pbmc3k()[:2], show=False)
    plt.close("all")


def test_loss_names_a_pretrain_tuple_and_an_empty_history():
    good = pd.DataFrame({"step": [1], "train_mse": [1.0], "val_mse": [1.0]})
    with pytest.raises(TypeError, match=r"model, history = scxtrimo.tl.pretrain"):
        scxtrimo.pl.loss((None, good), show=False)
    with pytest.raises(ValueError, match="no rows"):
        scxtrimo.pl.loss(good.iloc[:0], show=False)
    plt.close("all")


def test_plots_on_the_users_axes_leave_the_users_layout_alone(bundled):
    history = pd.DataFrame({"step": [1, 2], "train_mse": [1.0, 0.9], "val_mse": [1.0, 0.95]})
    fig, (a1, a2) = plt.subplots(1, 2)
    fig.subplots_adjust(left=0.3, wspace=0.6)
    scxtrimo.pl.loss(history, ax=a1, show=False)
    scxtrimo.pl.autobin(bundled, ax=a2, show=False)
    assert fig.subplotpars.left == 0.3 and fig.subplotpars.wspace == 0.6
    plt.close("all")
