import numpy as np
import torch

from conftest import DEFAULT
from scxtrimo.data import csr_row_batch, length_batches, padding_fraction, select_tokens


def test_csr_row_batch_reproduces_rows(pbmc3k_prepared):
    X = pbmc3k_prepared.X
    rows = np.array([3, 0, 10])
    b = csr_row_batch(X, rows)
    lengths = np.diff(X.indptr)[rows]
    assert b.genes.shape == (3, lengths.max())
    assert b.valid.sum(1).tolist() == lengths.tolist()
    for i, r in enumerate(rows):
        dense = np.zeros(X.shape[1], dtype=np.float32)
        dense[b.genes[i][b.valid[i]].numpy()] = b.values[i][b.valid[i]].numpy()
        np.testing.assert_array_equal(dense, X[r].toarray().ravel())
        assert (np.diff(b.genes[i][b.valid[i]].numpy()) > 0).all()  # gene order kept


def test_length_batches_cover_every_cell_within_budget(pbmc3k_prepared):
    lengths = np.diff(pbmc3k_prepared.X.indptr)
    batches = length_batches(lengths, max_cells=64, max_tokens=16_384)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 64
        assert len(b) == 1 or len(b) * lengths[b].max() <= 16_384
    # bucketing keeps padding well under 10% of tokens on real cells (random order: far more)
    assert padding_fraction(lengths, batches) < 0.10
    rng = np.random.default_rng(0)
    naive = np.array_split(rng.permutation(len(lengths)), len(batches))
    assert padding_fraction(lengths, naive) > 0.2
    # tl.embed's CUDA defaults (256 cells, 262,144 tokens): 12 large batches, still under 10%
    from scxtrimo.tl._embed import BATCH_CELLS, MAX_TOKENS

    cuda = length_batches(lengths, max_cells=BATCH_CELLS["cuda"], max_tokens=MAX_TOKENS["cuda"])
    assert padding_fraction(lengths, cuda) < 0.10


def test_select_tokens_round_trip(pbmc3k_prepared):
    values = torch.from_numpy(pbmc3k_prepared.X[:5].toarray())
    sel = values > 1.0
    batch, (rows, cols, pos) = select_tokens(sel, values)
    assert batch.valid.sum().item() == sel.sum().item()
    back = torch.zeros_like(values)
    back[rows, cols] = batch.values[rows, pos]
    torch.testing.assert_close(back, values * sel)


def test_token_budget_parts_split_a_step_within_the_budget(pbmc3k_prepared):
    from scxtrimo.data._batching import token_budget_parts

    lengths = np.diff(pbmc3k_prepared.X.indptr)
    rows = np.random.default_rng(0).choice(pbmc3k_prepared.n_obs, 32, replace=False)
    parts = token_budget_parts(rows, lengths, max_tokens=4096)
    assert 1 < len(parts) < 32  # real pbmc3k cells (~800 genes): several cells per part
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.sort(rows))  # every cell once
    position = {r: i for i, r in enumerate(rows)}
    for part in parts:
        assert np.all(np.diff([position[r] for r in part]) > 0)  # in the step's order
        assert len(part) == 1 or len(part) * lengths[part].max() <= 4096
    assert [len(p) for p in token_budget_parts(rows, lengths, max_tokens=1)] == [1] * 32


def test_a_token_budget_split_shrinks_until_every_part_is_one_cell(pbmc3k_prepared):
    from scxtrimo.data._batching import TokenBudgetSplit

    lengths = np.diff(pbmc3k_prepared.X.indptr)
    rows = np.random.default_rng(0).choice(pbmc3k_prepared.n_obs, 32, replace=False)
    split = TokenBudgetSplit(lengths, max_tokens=262_144)
    counts = [len(split(rows))]
    while split.shrink():
        counts.append(len(split(rows)))
        np.testing.assert_array_equal(np.sort(np.concatenate(split(rows))), np.sort(rows))
    assert counts[0] == 1 and counts[-1] == 32  # one part for the whole step ... one cell per part
    assert counts == sorted(counts)  # a lower budget never makes fewer parts
    assert lengths.min() <= split.max_tokens < 2 * lengths.min()  # stops at the first budget of one cell per part


def test_default_token_budget_shrinks_for_wide_encoders_on_cuda():
    """Batches of wide encoders hold fewer tokens on CUDA, so activations stay within a fixed size
    (xtrimo-100m's peak measured on an H200: 2.07 GB at 65,536 tokens, 0.88 GB at 16,384)."""
    import torch

    from scxtrimo._inference import token_budget
    from scxtrimo.models import CONFIGS

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU
    assert [token_budget(cuda, config=CONFIGS[n]) for n in ("xtrimo-3m", "xtrimo-10m", "xtrimo-100m")] == [
        262_144, 151_552, 49_152]
    assert token_budget(cuda) == 262_144 and token_budget(cpu, config=CONFIGS["xtrimo-100m"]) == 4_096
    assert token_budget(cuda, 1_000, config=CONFIGS["xtrimo-100m"]) == 1_000


def test_grid_widths_bound_the_padding_and_the_number_of_shapes():
    from scxtrimo.data._batching import grid_width

    n = np.arange(1, 20_001)
    w = np.array([grid_width(int(k)) for k in n])
    assert (w >= n).all() and (w % 16 == 0).all()
    assert ((w - n) / n)[n >= 128].max() < 0.125  # at most 12.5% padding above 128 tokens
    assert np.all(np.diff(w) >= 0)  # monotone: a longer cell never gets a narrower batch
    assert len(np.unique(w)) <= 70  # 8 widths per doubling: 66 shapes from 1 to 20,000 tokens
    assert [grid_width(k) for k in (100, 128, 129, 780, 1024, 1025)] == [112, 128, 144, 832, 1024, 1152]
    assert all(grid_width(int(u)) == u for u in np.unique(w))  # a width on the grid stays itself


def test_grid_batches_pad_with_pad_tokens_and_keep_to_the_budget(pbmc3k_prepared):
    from scxtrimo.data._batching import grid_width

    X = pbmc3k_prepared.X
    lengths = np.diff(X.indptr)
    rows = np.array([3, 0, 10])
    plain, grid = csr_row_batch(X, rows), csr_row_batch(X, rows, grid=True)
    assert grid.genes.shape == (3, grid_width(lengths[rows].max())) and grid.genes.shape[1] > plain.genes.shape[1]
    w = plain.genes.shape[1]
    for a, b in zip(plain, grid):  # the same tokens, then [PAD] only
        torch.testing.assert_close(b[:, :w], a)
    assert not grid.valid[:, w:].any() and (grid.genes[:, w:] == 0).all() and (grid.values[:, w:] == 0).all()
    batches = length_batches(lengths, max_cells=256, max_tokens=65_536, grid=True)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    widths = [grid_width(lengths[b].max()) for b in batches]
    assert all(len(b) * wd <= 65_536 for b, wd in zip(batches, widths))
    assert len(set(widths)) <= len(batches)
    tight = padding_fraction(lengths, batches)
    assert tight < padding_fraction(lengths, batches, grid=True) < tight + 0.125
    sel = torch.from_numpy(X[:5].toarray()) > 1.0
    tb, (r, c, pos) = select_tokens(sel, torch.from_numpy(X[:5].toarray()), grid=True)
    assert tb.valid.shape[1] == grid_width(int(sel.sum(1).max())) and tb.valid.sum() == sel.sum()


def test_grid_padding_leaves_embeddings_unchanged(pbmc3k_prepared):
    """Padding to the grid (CUDA's batches) only adds masked [PAD] keys: the same embeddings as
    the tightly padded batch, here on the CPU's masked kernel."""
    from scxtrimo.models import load

    model = load(DEFAULT)
    rows = np.array([5, 17, 40, 41])
    with torch.inference_mode():
        for pooling in ("max", "mean"):
            a = model.embed_cells(csr_row_batch(pbmc3k_prepared.X, rows), pooling)
            b = model.embed_cells(csr_row_batch(pbmc3k_prepared.X, rows, grid=True), pooling)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_only_cuda_pads_to_the_grid():
    from scxtrimo._inference import device_batches
    from scxtrimo.data._batching import on_grid

    assert on_grid(torch.device("cuda")) and not on_grid(torch.device("cpu"))
    lengths = np.array([129, 100, 90])  # 129 -> 144 on the grid: two cells fit 288 tokens only without it
    assert [len(b) for b in device_batches(lengths, torch.device("cpu"), max_cells=8, max_tokens=260)] == [2, 1]
    assert [len(b) for b in device_batches(lengths, torch.device("cuda"), max_cells=8, max_tokens=260)] == [1, 2]


def test_training_batches_follow_the_grid_setting(pbmc3k_prepared, monkeypatch):
    """The training forward's encoder batch (``select_tokens``) is padded to the grid where the
    device pads to it (CUDA by default; here the CPU switched on), with the same predictions
    (the bundled model's training inputs, depth tokens included where it has them)."""
    import scxtrimo.data._batching as batching
    from scxtrimo.data import cell_keys
    from scxtrimo.data._batching import grid_width
    from scxtrimo.data._objective import training_batch
    from scxtrimo.models import load

    model = load(DEFAULT).eval()
    counts = torch.from_numpy(pbmc3k_prepared.layers["counts"][:3].toarray())
    batch = training_batch(counts, cell_keys(0, 0, torch.arange(3)), depth_tokens=model.config.depth_tokens)
    with torch.no_grad():
        _, tight, _, visible = model._encode_visible(batch.inputs, batch.is_mask)
        ref = model(batch.inputs, batch.is_mask)
        monkeypatch.setitem(batching.GRID_WIDTHS, "cpu", True)
        _, grid, _, _ = model._encode_visible(batch.inputs, batch.is_mask)
        got = model(batch.inputs, batch.is_mask)
    longest = int(visible.sum(1).max())
    assert tight.valid.shape[1] == longest and grid.valid.shape[1] == grid_width(longest) > longest
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
