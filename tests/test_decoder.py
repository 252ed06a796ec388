"""The Performer decoder: fixed random features, per-token key weights, the decoder zero mass."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scxtrimo.models import XTrimoGene
from scxtrimo.models._decoder import WeightedFastAttention


def _projections(model: XTrimoGene) -> list[torch.Tensor]:
    return [m.projection_matrix.clone() for m in model.modules() if isinstance(m, WeightedFastAttention)]


@pytest.mark.parametrize("interval", [None, 3])
def test_random_features_stay_fixed_unless_a_redraw_interval_is_set(tiny_config, interval):
    torch.manual_seed(0)
    model = XTrimoGene(dataclasses.replace(tiny_config, feature_redraw_interval=interval)).train()
    before = _projections(model)
    x = torch.randn(2, 40, tiny_config.dec_dim)
    for _ in range(5):  # more training passes than the interval
        model.decoder(x)
    changed = [not torch.equal(a, b) for a, b in zip(before, _projections(model))]
    assert changed == [interval is not None] * len(before)


@pytest.mark.parametrize("key_max", ["head", "cell"])
def test_a_key_of_weight_two_counts_as_two_copies_of_its_token(tiny_config, key_max):
    torch.manual_seed(0)
    model = XTrimoGene(dataclasses.replace(tiny_config, key_max=key_max)).eval()
    x = torch.randn(2, 30, tiny_config.dec_dim) * 2
    doubled = torch.cat([x, x[:, 7:8]], 1)  # token 7 twice
    w = torch.ones(2, 30)
    w[:, 7] = 2.0
    with torch.no_grad():
        weighted = model.decoder(x, w)
        copied = model.decoder(doubled)[:, :30]
        plain = model.decoder(x)
    torch.testing.assert_close(weighted, copied, atol=1e-5, rtol=1e-5)
    assert (weighted - plain).abs().max() > 1e-3  # the weight changes the attention
    with torch.no_grad():  # no weights afterwards: the weights do not stay on the modules
        torch.testing.assert_close(model.decoder(x), plain)


def test_the_zero_mass_weights_unexpressed_genes_so_that_they_sum_to_it(tiny_config, pbmc3k_prepared):
    inputs = torch.from_numpy(pbmc3k_prepared.X[:3].toarray()).float()  # log1p CP10k, 19,264 genes
    is_mask = torch.zeros_like(inputs, dtype=torch.bool)
    is_mask[:, :500] = inputs[:, :500] > 0  # some masked expressed genes
    torch.manual_seed(0)
    plain = XTrimoGene(tiny_config).eval()
    zero = ~((inputs != 0) | is_mask)
    w = dataclasses.replace(tiny_config, decoder_zero_mass=700)
    weights = XTrimoGene(w)._zero_weights(zero)
    torch.testing.assert_close((weights * zero).sum(1), torch.full((3,), 700.0))
    assert bool((weights[~zero] == 1).all())
    # a zero mass equal to the cell's number of unexpressed genes is the unweighted decoder
    n_zero = int(zero[0].sum())
    same = XTrimoGene(dataclasses.replace(tiny_config, decoder_zero_mass=n_zero)).eval()
    same.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(same(inputs[:1], is_mask[:1]), plain(inputs[:1], is_mask[:1]), atol=1e-5, rtol=1e-4)
        light = XTrimoGene(w).eval()
        light.load_state_dict(plain.state_dict())
        assert (light(inputs[:1], is_mask[:1]) - plain(inputs[:1], is_mask[:1])).abs().max() > 1e-3


@pytest.mark.parametrize("field", ["feature_redraw_interval", "decoder_zero_mass"])
def test_bad_decoder_settings_are_refused(tiny_config, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(tiny_config, **{field: 0})


def test_a_compiled_decoder_keeps_its_weight_names_and_outputs(tiny_config):
    """``CorpusTrainConfig(compile_decoder=True)`` compiles the decoder in place (torch inductor):
    checkpoints keep their keys and the outputs stay those of the eager decoder."""
    torch.manual_seed(0)
    model = XTrimoGene(tiny_config).eval()
    keys = list(model.state_dict())
    x = torch.randn(2, 300, tiny_config.dec_dim)
    with torch.no_grad():
        eager = model.decoder(x)
        model.decoder.compile()
        assert list(model.state_dict()) == keys
        torch.testing.assert_close(model.decoder(x), eager, atol=1e-5, rtol=1e-5)
