import numpy as np
import pytest
import torch

from scxtrimo.data import csr_row_batch, mask_values
from scxtrimo.models import CONFIGS, XTrimoGene
from scxtrimo.models._autobin import AutoDiscretization


@pytest.mark.parametrize("name,target", [("xtrimo-3m", 3e6), ("xtrimo-10m", 10e6), ("xtrimo-100m", 100e6)])
def test_parameter_count_matches_name(name, target):
    n = XTrimoGene(name).n_parameters()
    assert abs(n - target) / target <= 0.15, f"{name}: {n:,} parameters"


def test_configs_follow_table_2():
    c = CONFIGS
    assert (c["xtrimo-3m"].enc_depth, c["xtrimo-3m"].enc_heads, c["xtrimo-3m"].enc_dim) == (4, 2, 128)
    assert (c["xtrimo-3m"].dec_depth, c["xtrimo-3m"].dec_heads, c["xtrimo-3m"].dec_dim) == (2, 2, 128)
    assert (c["xtrimo-10m"].enc_depth, c["xtrimo-10m"].enc_heads, c["xtrimo-10m"].enc_dim) == (4, 8, 256)
    assert (c["xtrimo-10m"].dec_depth, c["xtrimo-10m"].dec_heads, c["xtrimo-10m"].dec_dim) == (2, 4, 256)
    assert (c["xtrimo-100m"].enc_depth, c["xtrimo-100m"].enc_heads, c["xtrimo-100m"].enc_dim) == (12, 12, 768)
    assert (c["xtrimo-100m"].dec_depth, c["xtrimo-100m"].dec_heads, c["xtrimo-100m"].dec_dim) == (6, 8, 512)
    assert all(cfg.n_genes == 19_264 and cfg.n_bins == 100 for cfg in c.values())


def test_autobin_weights_are_distributions_and_smooth():
    torch.manual_seed(0)
    ab = AutoDiscretization(100, 16)
    v = torch.linspace(0, 10, 201)
    w = ab.bin_weights(v)
    assert w.shape == (201, 100)
    assert torch.allclose(w.sum(-1), torch.ones(201), atol=1e-5)
    step = (w[1:] - w[:-1]).abs().sum(-1)  # neighbouring values: similar weights
    far = (w[-1] - w[0]).abs().sum()
    assert step.max() < far
    assert ab(v).shape == (201, 16)


def test_mask_and_pad_tokens_are_learned_vectors():
    m = XTrimoGene("xtrimo-3m")
    names = {n for n, _ in m.named_parameters()}
    assert {"mask_token", "pad_token"} <= names
    assert m.mask_token.shape == (128,) and m.pad_token.requires_grad


def test_encoder_ignores_padding(pbmc3k_prepared):
    """A cell embedded alone equals the same cell padded inside a batch of longer cells."""
    torch.manual_seed(0)
    m = XTrimoGene("xtrimo-3m").eval()
    X = pbmc3k_prepared.X
    lengths = np.diff(X.indptr)
    rows = np.array([int(np.argmin(lengths)), int(np.argmax(lengths)), 5])
    with torch.no_grad():
        together = m.embed_cells(csr_row_batch(X, rows))
        for i, r in enumerate(rows):
            alone = m.embed_cells(csr_row_batch(X, np.array([r])))
            torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=1e-4)


def test_forward_shapes_and_no_leak_from_masked_values(pbmc3k_prepared, tiny_config):
    """Predictions do not depend on the true values hidden under [MASK]."""
    torch.manual_seed(0)
    m = XTrimoGene(tiny_config).eval()
    values = torch.from_numpy(pbmc3k_prepared.X[:4].toarray())
    mb = mask_values(values, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = m(mb.inputs, mb.is_mask)
        tampered = values.clone()
        tampered[mb.is_mask] = 7.0  # what a leak would pick up
        pred2 = m(torch.where(mb.is_mask, tampered, mb.inputs), mb.is_mask)
    assert pred.shape == (4, 19_264)
    assert mb.is_mask.any()
    torch.testing.assert_close(pred, pred2)


def test_embedding_uses_encoder_only(pbmc3k_prepared):
    torch.manual_seed(0)
    m = XTrimoGene("xtrimo-3m").eval()
    batch = csr_row_batch(pbmc3k_prepared.X, np.arange(3))
    with torch.no_grad():
        before = m.embed_cells(batch)
        for p in m.decoder.parameters():
            p.data.normal_()
        after = m.embed_cells(batch)
    torch.testing.assert_close(before, after)
    assert before.shape == (3, 128)


def test_sampled_decoder_context(pbmc3k_prepared, tiny_config):
    """decoder_zeros keeps every target; covering all genes it equals the full decoder."""
    torch.manual_seed(0)
    m = XTrimoGene(tiny_config).eval()
    values = torch.from_numpy(pbmc3k_prepared.X[:3].toarray())
    mb = mask_values(values, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m(mb.inputs, mb.is_mask)
        everything = m(mb.inputs, mb.is_mask, keep=mb.target, decoder_zeros=19_264, generator=torch.Generator().manual_seed(1))
        sampled = m(mb.inputs, mb.is_mask, keep=mb.target, decoder_zeros=100, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(everything, full, atol=1e-5, rtol=1e-4)
    decoded = sampled != 0
    assert decoded[mb.target].all()  # every loss position is predicted
    width = int(((mb.inputs != 0) | mb.is_mask | mb.target).sum(1).max()) + 100
    assert (decoded.sum(1) == width).all()
