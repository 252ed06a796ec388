"""Depth tokens T and S, binomial thinning and the depth-aware training batch (real pbmc3k counts)."""

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import scxtrimo
from scxtrimo.data import MaskingConfig, cell_keys
from scxtrimo.data._depth import (
    ThinningConfig,
    append_depth,
    capture_efficiencies,
    depth_aware_inputs,
    log1p_cp10k,
    target_depth,
    thin_counts,
    thinning_fractions,
)
from scxtrimo.data._objective import training_batch
from scxtrimo.data._prepare import counts_rows, prepare_input
from scxtrimo.models import XTrimoGene, XTrimoGeneConfig

N = scxtrimo.N_GENES


@pytest.fixture(scope="module")
def counts(pbmc3k_session) -> torch.Tensor:
    """(24, 19264) raw counts of real pbmc3k cells on the reference genes."""
    C = counts_rows(prepare_input(pbmc3k_session), 0, 24)
    return torch.from_numpy(C.toarray())


@pytest.fixture(scope="module")
def depth_config(tiny_config):
    return dataclasses.replace(tiny_config, name="tiny-depth", depth_tokens=True)


def test_thinned_counts_are_integers_at_most_the_original_and_binomial(counts):
    keys = cell_keys(0, 0, np.arange(counts.shape[0]))
    f = torch.full((counts.shape[0],), 0.3)
    thin = thin_counts(counts, f, keys)
    assert thin.dtype == counts.dtype and torch.equal(thin, thin.round())
    assert bool((thin <= counts).all()) and bool((thin >= 0).all())
    assert bool((thin[counts == 0] == 0).all())
    kept = thin.sum() / counts.sum()  # ~ 180,000 reads: the kept share is 0.3 within a few 1e-3
    assert abs(float(kept) - 0.3) < 0.01
    # per-gene binomial variance: sum over entries of c f (1 - f) against the squared deviations
    dev = ((thin - 0.3 * counts) ** 2).sum() / (counts * 0.3 * 0.7).sum()
    assert 0.9 < float(dev) < 1.1


def test_thinning_depends_only_on_the_cells_own_key(counts):
    keys = cell_keys(7, 3, np.arange(counts.shape[0]))
    f = torch.linspace(0.1, 0.9, counts.shape[0])
    whole = thin_counts(counts, f, keys)
    order = torch.randperm(counts.shape[0], generator=torch.Generator().manual_seed(0))
    shuffled = thin_counts(counts[order], f[order], keys[order])
    assert torch.equal(shuffled, whole[order])
    alone = thin_counts(counts[5:6], f[5:6], keys[5:6])
    assert torch.equal(alone, whole[5:6])


def test_capture_efficiencies_are_half_normal_in_log_space_and_keyed(counts):
    keys = torch.arange(2000, dtype=torch.int64).repeat_interleave(50)
    cols = torch.arange(50, dtype=torch.int64).repeat(2000)
    e = capture_efficiencies(keys, cols, 0.7)
    assert bool((e > 0).all()) and bool((e <= 1).all())
    z = -torch.log(e) / 0.7  # |N(0, 1)|: mean sqrt(2 / pi) = 0.798, E z^2 = 1
    assert abs(float(z.mean()) - 0.798) < 0.02 and abs(float((z ** 2).mean()) - 1.0) < 0.03
    assert torch.equal(capture_efficiencies(keys.flip(0), cols.flip(0), 0.7), e.flip(0))
    # thinning with capture: each gene's expected kept share is f * e, read by read
    ckeys = cell_keys(0, 0, np.arange(counts.shape[0]))
    f = torch.full((counts.shape[0],), 0.8)
    thin = thin_counts(counts, f, ckeys, capture_sd=0.7)
    assert torch.equal(thin, thin.round()) and bool((thin <= counts).all())
    rows, gcols = counts.nonzero(as_tuple=True)
    p = 0.8 * capture_efficiencies(ckeys[rows], gcols, 0.7)
    c = counts[rows, gcols].double()
    assert abs(float(thin[rows, gcols].sum() / (c * p).sum()) - 1.0) < 0.01
    dev = ((thin[rows, gcols] - c * p) ** 2).sum() / (c * p * (1 - p)).sum()
    assert 0.9 < float(dev) < 1.1
    assert torch.equal(thin_counts(counts, f, ckeys, capture_sd=0.0), thin_counts(counts, f, ckeys))
    with pytest.raises(ValueError, match="capture_sd"):
        ThinningConfig(capture_sd=-0.5)


def test_thinning_fractions_follow_the_config(counts):
    keys = cell_keys(0, 0, np.arange(4000))
    totals = torch.full((4000,), 5000.0)
    f = thinning_fractions(totals, keys, ThinningConfig(p_thin=0.5, min_fraction=0.05))
    thinned = f < 1
    assert 0.45 < float(thinned.float().mean()) < 0.55
    assert abs(float(f[thinned].mean()) - 0.5) < 0.02  # Beta(2, 2) has mean 0.5 and variance 0.05
    assert abs(float(f[thinned].var()) - 0.05) < 0.01 and float(f.min()) >= 0.05
    shallow = thinning_fractions(torch.full((100,), 999.0), keys[:100], ThinningConfig(p_thin=1.0))
    assert bool((shallow == 1).all())


def test_depth_aware_inputs_thin_the_input_and_keep_real_targets(counts):
    keys = cell_keys(1, 0, np.arange(counts.shape[0]))
    observed, target, depth = depth_aware_inputs(counts, keys, ThinningConfig(p_thin=1.0, min_total=0))
    expected, total = log1p_cp10k(counts)
    assert torch.allclose(target, expected)
    T, S = depth[:, 0].double(), depth[:, 1].double()
    assert torch.allclose(T, torch.log10(total), atol=1e-6) and bool((S <= T + 1e-6).all()) and bool((S < T).any())
    # the observed values are log1p CP10k of counts whose total is 10**S
    assert bool(((observed > 0) <= (counts > 0)).all())
    assert bool(((observed > 0).sum(1) < (counts > 0).sum(1)).all())
    unthinned = depth_aware_inputs(counts, keys, ThinningConfig(p_thin=0.0))
    assert torch.equal(unthinned[0], unthinned[1]) and torch.equal(unthinned[2][:, 0], unthinned[2][:, 1])


def test_append_depth_stores_only_positive_tokens():
    X = sp.csr_matrix(np.array([[0, 1.5, 0], [2.0, 0, 0], [0, 0, 1.0]], dtype=np.float32))
    out = append_depth(X, T=np.array([4.0, 4.0, 0.0]), S=np.array([3.2, 0.0, -np.inf]))
    assert out.shape == (3, 5)
    np.testing.assert_allclose(out.toarray()[:, 3:], [[4.0, 3.2], [4.0, 0.0], [0.0, 0.0]], rtol=1e-6)
    assert out.nnz == 3 + 3  # three genes, T twice, S once
    np.testing.assert_allclose(target_depth(np.array([100.0, 1e4]), 2.0, "scale"), [np.log10(200), np.log10(2e4)])
    np.testing.assert_allclose(target_depth(np.array([100.0]), 0.5, "offset"), [2.5])
    with pytest.raises(ValueError, match="target-depth mode"):
        target_depth(np.array([1.0]), 1.0, "bogus")


def test_training_batch_masks_genes_never_depth_tokens(counts):
    keys = cell_keys(0, 5, np.arange(counts.shape[0]))
    tb = training_batch(counts, keys, thinning=ThinningConfig(p_thin=1.0, min_total=0), depth_tokens=True)
    b = counts.shape[0]
    assert tb.inputs.shape == (b, N + 2) and tb.is_mask.shape == (b, N + 2) and tb.target.shape == (b, N)
    assert not bool(tb.is_mask[:, N:].any()) and bool((tb.inputs[:, N:] > 0).all())
    assert bool((tb.inputs[:, N] >= tb.inputs[:, N + 1]).all())  # T >= S
    assert torch.equal(tb.keep[:, :N], tb.target) and not bool(tb.keep[:, N:].any())
    # with thinning some targets are genes the thinned cell lost but the real cell expresses
    lost = tb.target & (tb.inputs[:, :N] == 0) & ~tb.is_mask[:, :N] & (tb.values > 0)
    hidden = tb.target & (tb.values > 0)
    assert bool(hidden.any()) and bool(lost.any())
    plain = training_batch(counts, keys, depth_tokens=False)
    assert plain.inputs.shape == (b, N)


def test_max_visible_caps_what_the_encoder_sees(counts):
    keys = cell_keys(0, 0, np.arange(counts.shape[0]))
    tb = training_batch(counts, keys, masking=MaskingConfig(max_visible=100))
    visible = (tb.inputs != 0) & ~tb.is_mask
    assert int(visible.sum(1).max()) <= 100
    free = training_batch(counts, keys)
    assert int(((free.inputs != 0) & ~free.is_mask).sum(1).max()) > 300
    assert bool((tb.target | ~free.target).all())  # the cap only adds targets


def test_depth_tokens_enter_the_encoder_only_when_positive(depth_config, counts):
    torch.manual_seed(0)
    model = XTrimoGene(depth_config).eval()
    assert model.gene_embedding.num_embeddings == N + 3
    X = sp.csr_matrix(log1p_cp10k(counts[:3])[0].numpy())
    X = append_depth(X, T=np.array([4.0, 4.0, 0.0]), S=np.array([3.0, 0.0, 3.0]))
    from scxtrimo.data import csr_row_batch

    batch = csr_row_batch(X, np.arange(3))
    genes = [set(batch.genes[i][batch.valid[i]].tolist()) & {N, N + 1} for i in range(3)]
    assert genes == [{N, N + 1}, {N}, {N + 1}]
    with torch.no_grad():
        allp = model.embed_cells(csr_row_batch(X, np.arange(1)), "all")
        h = model.encode(csr_row_batch(X, np.arange(1)))[0]
        assert allp.shape == (1, 4 * depth_config.enc_dim)
        d = depth_config.enc_dim
        torch.testing.assert_close(allp[0, :d], h[-1])  # S is the last token
        torch.testing.assert_close(allp[0, d : 2 * d], h[-2])  # T before it
        torch.testing.assert_close(allp[0, 2 * d : 3 * d], h[:-2].amax(0))
        torch.testing.assert_close(allp[0, 3 * d :], h[:-2].mean(0))
        with pytest.raises(ValueError, match="both depth tokens"):
            model.embed_cells(csr_row_batch(X, np.arange(3)), "all")


def test_forward_with_depth_tokens_predicts_genes(depth_config, counts):
    torch.manual_seed(0)
    model = XTrimoGene(depth_config)
    keys = cell_keys(0, 0, np.arange(4))
    tb = training_batch(counts[:4], keys, thinning=ThinningConfig(), depth_tokens=True)
    pred = model(tb.inputs, tb.is_mask)
    assert pred.shape == (4, N)
    sub = model(tb.inputs, tb.is_mask, keep=tb.keep, decoder_zeros=64, generator=torch.Generator().manual_seed(0))
    assert sub.shape == (4, N) and bool((sub[tb.target] != 0).all())
    with pytest.raises(ValueError, match="columns"):
        model(tb.inputs[:, :N], tb.is_mask[:, :N])


def test_per_cell_key_maximum_makes_the_decoder_batch_independent(tiny_config):
    cfg = dataclasses.replace(tiny_config, key_max="cell")
    torch.manual_seed(0)
    model = XTrimoGene(cfg).eval()
    x = torch.randn(3, 50, cfg.dec_dim) * 3
    x[1] *= 5  # a cell with much larger keys than its batch mates
    with torch.no_grad():
        batched = model.decoder(x)
        alone = torch.cat([model.decoder(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_existing_configs_are_unchanged():
    cfg = XTrimoGeneConfig.from_dict(scxtrimo.models.get_config("xtrimo-3m").to_dict())
    assert not cfg.depth_tokens and cfg.enc_norm_first and cfg.key_max == "head" and cfg.n_positions == N
    with pytest.raises(ValueError, match="key_max"):
        dataclasses.replace(cfg, key_max="batch")
