import numpy as np
import torch

from scxtrimo.data import MaskingConfig, mask_values


def _batch(pbmc3k_prepared, n=64):
    return torch.from_numpy(pbmc3k_prepared.X[:n].toarray())


def test_masking_ratios_on_real_cells(pbmc3k_prepared):
    values = _batch(pbmc3k_prepared)
    mb = mask_values(values, generator=torch.Generator().manual_seed(0))
    nz = values != 0
    per_cell_nz = (mb.target & nz).sum(1).float() / nz.sum(1).float()
    # ~30% of expressed genes are targets (section 4.2, appendix Fig. 3)
    assert torch.allclose(per_cell_nz, torch.full_like(per_cell_nz, 0.3), atol=0.01)
    # about as many zeros as non-zeros (appendix Table 1: ~540 zeros per ~600 non-zeros)
    ratio = (mb.target & ~nz).sum(1).float() / (mb.target & nz).sum(1).float()
    assert torch.allclose(ratio, torch.full_like(ratio, 0.9), atol=0.02)
    # of all zeros that is a small share (~3% of ~18,000 in the paper)
    zero_share = ((mb.target & ~nz).sum() / (~nz).sum()).item()
    assert 0.005 < zero_share < 0.05


def test_replacement_shares_80_10_10(pbmc3k_prepared):
    values = _batch(pbmc3k_prepared, 128)
    mb = mask_values(values, generator=torch.Generator().manual_seed(1))
    n = mb.target.sum().item()
    share_mask = (mb.is_mask.sum().item()) / n
    changed = mb.target & ~mb.is_mask & (mb.inputs != mb.values)
    assert abs(share_mask - 0.8) < 0.02
    # random replacements are at most 10% (a random draw can equal the true value)
    assert 0.05 < changed.sum().item() / n <= 0.11
    assert not mb.is_mask[~mb.target].any()


def test_masked_values_are_hidden_and_encoder_keeps_a_token(pbmc3k_prepared):
    values = _batch(pbmc3k_prepared)
    mb = mask_values(values, MaskingConfig(nonzero_ratio=0.99), generator=torch.Generator().manual_seed(0))
    assert (mb.inputs[mb.is_mask] == 0).all()
    visible = (mb.inputs != 0) & ~mb.is_mask
    assert visible.any(1).all()
    torch.testing.assert_close(mb.values, values)


def test_masking_is_seeded(pbmc3k_prepared):
    values = _batch(pbmc3k_prepared, 8)
    a = mask_values(values, generator=torch.Generator().manual_seed(3))
    b = mask_values(values, generator=torch.Generator().manual_seed(3))
    c = mask_values(values, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.target, b.target) and torch.equal(a.inputs, b.inputs)
    assert not torch.equal(a.target, c.target)
    assert np.isclose(a.target.float().mean().item(), c.target.float().mean().item(), atol=1e-3)
