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


def masked_tiny(prepared, config, n_cells):
    """An untrained tiny model in eval mode, the first ``n_cells`` pbmc3k cells and their masks."""
    torch.manual_seed(0)
    m = XTrimoGene(config).eval()
    values = torch.from_numpy(prepared.X[:n_cells].toarray())
    return m, values, mask_values(values, generator=torch.Generator().manual_seed(0))


def test_forward_shapes_and_no_leak_from_masked_values(pbmc3k_prepared, tiny_config):
    """Predictions do not depend on the true values hidden under [MASK]."""
    m, values, mb = masked_tiny(pbmc3k_prepared, tiny_config, 4)
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
    m, _, mb = masked_tiny(pbmc3k_prepared, tiny_config, 3)
    with torch.no_grad():
        full = m(mb.inputs, mb.is_mask)
        everything = m(mb.inputs, mb.is_mask, keep=mb.target, decoder_zeros=19_264, generator=torch.Generator().manual_seed(1))
        sampled = m(mb.inputs, mb.is_mask, keep=mb.target, decoder_zeros=100, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(everything, full, atol=1e-5, rtol=1e-4)
    decoded = sampled != 0
    assert decoded[mb.target].all()  # every loss position is predicted
    width = int(((mb.inputs != 0) | mb.is_mask | mb.target).sum(1).max()) + 100
    assert (decoded.sum(1) == width).all()


def test_forward_returns_the_mean_pooled_embedding_of_the_corrupted_cell(pbmc3k_prepared, tiny_config):
    """return_cells adds the "mean" pooling of the visible tokens and leaves the predictions as they
    were; pooled_visible gives the same cells from the encoder alone."""
    from scxtrimo.data._batching import select_tokens

    m, _, mb = masked_tiny(pbmc3k_prepared, tiny_config, 4)
    with torch.no_grad():
        plain = m(mb.inputs, mb.is_mask)
        pred, cells = m(mb.inputs, mb.is_mask, return_cells=True)
        tokens, _ = select_tokens((mb.inputs != 0) & ~mb.is_mask, mb.inputs)
        expected = m.embed_cells(tokens, pooling="mean")
        encoder_only = m.pooled_visible(mb.inputs, mb.is_mask)
    torch.testing.assert_close(pred, plain)
    assert cells.shape == (4, tiny_config.enc_dim)
    torch.testing.assert_close(cells, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(encoder_only, cells)


def test_cell_expression_head_reads_out_targets_in_order(tiny_config):
    """The head starts at its gene biases (no pull on the encoder), predicts in the order of
    ``values[target]`` and, once its projection moves, is bilinear in cell and gene embeddings."""
    from scxtrimo.models import CellExpressionHead

    torch.manual_seed(0)
    d, n = tiny_config.enc_dim, tiny_config.n_genes
    head = CellExpressionHead(d, n)
    cells, genes = torch.randn(3, d), torch.randn(n + 2, d)
    target = torch.zeros(3, n, dtype=torch.bool)
    target[0, [5, 9]] = True
    target[2, [1, 700, 19_000]] = True
    with torch.no_grad():
        head.gene_bias.copy_(torch.arange(n, dtype=torch.float32))
        start = head(cells, genes, target)
        torch.testing.assert_close(start, torch.tensor([5.0, 9.0, 1.0, 700.0, 19_000.0]))
        head.proj.weight.copy_(torch.eye(d))
        moved = head(cells, genes, target)
    assert moved.shape == (5,)
    torch.testing.assert_close(moved[3], cells[2] @ genes[700] + 700.0)


def test_cell_expression_head_dot_readout_uses_the_cell_embedding_itself(tiny_config):
    """readout="dot" has one scale (0 at the start) and no map: s <c, e_g> + b_g."""
    from scxtrimo.models import CellExpressionHead

    torch.manual_seed(0)
    d, n = tiny_config.enc_dim, tiny_config.n_genes
    head = CellExpressionHead(d, n, readout="dot")
    assert {name for name, _ in head.named_parameters()} == {"gene_bias", "scale"}
    cells, genes = torch.randn(2, d), torch.randn(n, d)
    target = torch.zeros(2, n, dtype=torch.bool)
    target[1, [3, 4]] = True
    with torch.no_grad():
        assert head(cells, genes, target).abs().max() == 0
        head.scale.fill_(2.0)
        torch.testing.assert_close(head(cells, genes, target), 2 * genes[[3, 4]] @ cells[1])
    with pytest.raises(ValueError, match="readout must be one of"):
        CellExpressionHead(d, n, readout="mlp")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("enc_heads", 0, "enc_heads must be a positive integer"),  # was a ZeroDivisionError
    ("dec_dim", 128.0, "dec_dim must be a positive integer"),
    ("enc_depth", -1, "enc_depth must be a positive integer"),
    ("n_bins", 0, "n_bins must be a positive integer"),
    ("nb_features", 0, "nb_features must be a positive integer"),
    ("dropout", 1.0, "dropout must be a number in \\[0, 1\\)"),
    ("autobin_alpha", float("nan"), "autobin_alpha must be a positive number"),
])
def test_impossible_configurations_are_refused(field, value, message):
    import dataclasses

    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CONFIGS["xtrimo-3m"], **{field: value})
