"""Bad arguments to the public functions raise a clear error before anything is written.

Before these checks, ``batch_size=0`` silently meant "the default", a negative batch size or token
budget ran anyway, ``annotate(epochs=0)`` returned an untrained classifier and wrote its guesses,
and ``pretrain(epochs=-1)`` returned an untrained model. Each test also checks that the AnnData is
left as it was.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import scxtrimo
from scxtrimo._validation import check_positive


@pytest.fixture(scope="module")
def cells():
    """40 real pbmc3k cells (raw counts, gene symbols)."""
    return scxtrimo.datasets.pbmc3k()[:40].copy()


def _state(adata):
    return (sorted(adata.obsm), sorted(adata.obs.columns), sorted(adata.uns), sorted(adata.layers))


@pytest.mark.parametrize("value", [1, 3, 2.5, np.int64(4), 1e-4])
def test_check_positive_accepts_positive_numbers(value):
    check_positive("x", value)


@pytest.mark.parametrize("value", [0, -1, -0.5, float("nan"), float("inf"), True, "3", None])
def test_check_positive_refuses_the_rest(value):
    with pytest.raises(ValueError, match="x must be a positive number"):
        check_positive("x", value)


def test_check_positive_integer_and_optional():
    check_positive("n", None, integer=True, optional=True)
    check_positive("n", np.int32(4), integer=True)
    with pytest.raises(ValueError, match="n must be a positive integer, got 4.0"):
        check_positive("n", 4.0, integer=True)  # range(4.0) would fail later, deep in the training loop
    with pytest.raises(ValueError, match="n must be a positive integer \\(or None for the default\\), got 2.5"):
        check_positive("n", 2.5, integer=True, optional=True)


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": -3}, {"batch_size": 1.5},
                                    {"max_tokens": 0}, {"max_tokens": -5}])
def test_embed_refuses_non_positive_batches(cells, kwargs):
    adata = cells.copy()
    before = _state(adata)
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        scxtrimo.tl.embed(adata, progress=False, **kwargs)
    assert _state(adata) == before


def test_gene_embed_refuses_batch_size_zero(cells):
    adata = cells.copy()
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        scxtrimo.tl.gene_embed(adata, genes=["CD3E"], batch_size=0, progress=False)
    assert "X_xtrimo_gene" not in adata.obsm


def test_embed_names_a_missing_gene_symbols_column(cells):
    with pytest.raises(KeyError, match="gene_symbols='symbol' is not a column of adata.var"):
        scxtrimo.tl.embed(cells.copy(), gene_symbols="symbol", progress=False)


def test_embed_warns_about_summed_duplicates_like_align_genes(cells):
    """A reference symbol in two columns is summed on the fly exactly as pp.align_genes sums it, and both say so."""
    names = list(cells.var_names)
    names[names.index("LYZ")] = "CD3E"
    adata = cells[:12].copy()
    adata.var_names = names
    with pytest.warns(UserWarning, match="1 gene symbols occur in more than one column and were summed"):
        scxtrimo.tl.embed(adata, progress=False)
    with pytest.warns(UserWarning, match="were summed"):
        aligned = scxtrimo.pp.align_genes(adata)
    cd3e = scxtrimo.reference_genes().get_loc("CD3E")
    raw = cells[:12].copy()
    expected = raw[:, "CD3E"].X.toarray().ravel() + raw[:, "LYZ"].X.toarray().ravel()
    np.testing.assert_allclose(aligned.X[:, cd3e].toarray().ravel(), expected)
    scxtrimo.tl.embed(aligned, progress=False)
    np.testing.assert_allclose(adata.obsm["X_xtrimo"], aligned.obsm["X_xtrimo"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"patience": 0}, {"batch_size": -1}, {"lr": -1e-4},
                                    {"head_lr": 0.0}, {"epochs": 2.5}])
def test_annotate_refuses_a_schedule_that_trains_nothing(cells, kwargs):
    adata = cells.copy()
    before = _state(adata)
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be a positive"):
        scxtrimo.tl.annotate(adata, labels_key="cell_type", progress=False, **kwargs)
    assert _state(adata) == before


@pytest.mark.parametrize("kwargs", [{"epochs": -1}, {"epochs": 0}, {"max_steps": 0}, {"max_time": 0.0},
                                    {"max_time": float("nan")}])
def test_pretrain_refuses_a_budget_that_trains_nothing(cells, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be a positive"):
        scxtrimo.tl.pretrain(cells, progress=False, **kwargs)


@pytest.mark.parametrize("n_neighbors", [0, 1, 2.5])
def test_evaluate_clustering_refuses_too_few_neighbours(cells, n_neighbors):
    adata = cells.copy()
    adata.obsm["X_test"] = np.random.default_rng(0).normal(size=(adata.n_obs, 5)).astype(np.float32)
    before = _state(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing reaches scanpy or scikit-learn
        with pytest.raises(ValueError, match="n_neighbors must be an integer of at least 2"):
            scxtrimo.tl.evaluate_clustering(adata, labels_key="cell_type", use_rep="X_test", n_neighbors=n_neighbors)
    assert _state(adata) == before


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr": 0}, "lr must be a positive number"),  # AdamW at rate 0 returned the untrained model
    ({"grad_clip": 0}, "grad_clip must be a positive number"),  # clipped every gradient to zero
    ({"grad_clip": -1.0}, "grad_clip must be a positive number"),  # flipped the gradients: ascent
    ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
    ({"warmup_steps": 2.5}, "warmup_steps must be an integer >= 0"),
    ({"eval_cells": 0}, "eval_cells must be a positive integer"),  # an all-NaN validation history
    ({"min_genes": 0}, "min_genes must be a positive integer"),
    ({"min_genes": 2.5}, "min_genes must be a positive integer"),
    ({"random_state": -1}, "random_state must be an integer >= 0"),  # numpy's "expected non-negative integer"
    ({"batch_size": 2.5}, "batch_size must be a positive integer"),
])
def test_pretrain_refuses_settings_that_train_nothing_or_wrongly(cells, tmp_path, kwargs, message):
    seen = []
    with pytest.raises(ValueError, match=message):
        scxtrimo.tl.pretrain(cells, max_steps=1, eval_every=0, progress=False, callback=seen.append,
                             save_dir=tmp_path / "run", **{"batch_size": 4, "eval_cells": 4, **kwargs})
    assert seen == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"nonzero_ratio": 0.0}, "nonzero_ratio must be a number in \\(0, 1\\]"),
    ({"nonzero_ratio": 1.5}, "nonzero_ratio must be a number in \\(0, 1\\]"),
    ({"p_mask": -0.1}, "p_mask must be a number in \\[0, 1\\]"),
    ({"p_mask": 0.8, "p_random": 0.3}, "p_mask \\+ p_random must be at most 1"),
    ({"zero_to_nonzero": -1.0}, "zero_to_nonzero must be a number >= 0"),
    ({"max_visible": 0}, "max_visible must be a positive integer"),
])
def test_masking_config_refuses_impossible_ratios(kwargs, message):
    from scxtrimo.data import MaskingConfig

    with pytest.raises(ValueError, match=f"MaskingConfig.{message}"):
        MaskingConfig(**kwargs)


def test_masking_config_accepts_the_edges():
    from scxtrimo.data import MaskingConfig

    assert MaskingConfig(nonzero_ratio=1.0, p_mask=0.9, p_random=0.1, zero_to_nonzero=0.0).p_mask == 0.9
    assert MaskingConfig(p_mask=0.0, p_random=0.0, max_visible=5).max_visible == 5


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"p_thin": -0.1}, "p_thin must be a number in \\[0, 1\\]"),
    ({"p_thin": 1.2}, "p_thin must be a number in \\[0, 1\\]"),
    ({"min_fraction": 0.0}, "min_fraction must be a number in \\(0, 1\\]"),
    ({"min_fraction": -0.5}, "min_fraction must be a number in \\(0, 1\\]"),
    ({"min_fraction": 1.5}, "min_fraction must be a number in \\(0, 1\\]"),
])
def test_thinning_config_refuses_impossible_values(kwargs, message):
    from scxtrimo.data import ThinningConfig

    with pytest.raises(ValueError, match=f"ThinningConfig.{message}"):
        ThinningConfig(**kwargs)
    assert ThinningConfig(p_thin=0.0, min_fraction=1.0).p_thin == 0.0  # the edges are allowed


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"decoder_zeros": -50}, ValueError, "decoder_zeros must be a positive integer"),  # 21 targets never decoded
    ({"decoder_zeros": 2.5}, ValueError, "decoder_zeros must be a positive integer"),
    ({"cell_weight": float("inf")}, ValueError, "cell_weight must be a finite number >= 0"),  # a model of NaN
    ({"factor_weight": float("inf")}, ValueError, "factor_weight must be a finite number >= 0"),
    ({"thinning": 0.5}, TypeError, "thinning must be a ThinningConfig"),
    ({"masking": {"p_mask": 0.5}}, TypeError, "masking must be a MaskingConfig"),
    ({"config": {"enc_dim": 64}}, TypeError, "config must be a configuration name or an XTrimoGeneConfig"),
])
def test_pretrain_refuses_wrong_settings_before_training(cells, kwargs, error, message):
    seen = []
    with pytest.raises(error, match=message):
        scxtrimo.tl.pretrain(cells, max_steps=1, batch_size=4, eval_every=0, eval_cells=4, progress=False,
                             callback=seen.append, **kwargs)
    assert seen == []


def test_pretrain_points_a_packed_corpus_to_its_trainer(tmp_path):
    corpus = tmp_path / "c.xtc"
    corpus.write_bytes(b"\xfd7zXZ\x00 not really")
    with pytest.raises(ValueError, match="scripts/train_device.py"):
        scxtrimo.tl.pretrain(str(corpus), max_steps=1, progress=False)


def test_low_level_helpers_refuse_inputs_they_would_misread(cells):
    import scipy.sparse as sp
    import torch

    from scxtrimo.data import MaskingConfig, csr_row_batch
    from scxtrimo.data._masking import mask_values_keyed
    from scxtrimo.models import init_gene_embedding
    from scxtrimo.models import XTrimoGene

    X = sp.random(4, 10, density=0.5, format="csc", random_state=0, dtype=np.float32)
    with pytest.raises(TypeError, match="CSR"):
        csr_row_batch(X, np.arange(4))  # column pointers were read as rows
    values = torch.rand(3, 20)
    with pytest.raises(TypeError, match="integer keys"):
        mask_values_keyed(values, MaskingConfig(), keys=torch.rand(3))  # every key became 0: one mask for all
    aligned = scxtrimo.pp.align_genes(cells)
    scxtrimo.pp.normalize(aligned)
    model = XTrimoGene("xtrimo-3m")
    for kwargs in ({"std": 0.0}, {"std": -1.0}, {"value_scale": float("nan")}):
        with pytest.raises(ValueError, match="must be a positive number"):
            init_gene_embedding(model, aligned.X, **kwargs)
