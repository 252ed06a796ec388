import numpy as np
import pandas as pd
import pytest
import torch

import scxtrimo
from conftest import DEFAULT
from scxtrimo.data import MaskingConfig, ThinningConfig, cell_keys, sortish_batches
from scxtrimo.data._objective import masked_sse, training_batch
from scxtrimo.models import XTrimoGene
from scxtrimo.tl._pretrain import evaluate, split_cells


def test_training_steps_lower_the_masked_loss_on_real_cells(pbmc3k_prepared, tiny_config):
    torch.manual_seed(0)
    X = pbmc3k_prepared.layers["counts"][:16]
    model = XTrimoGene(tiny_config)
    before = evaluate(model, X, batch_size=8, masking=MaskingConfig(), device=torch.device("cpu"), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(12):
        counts = torch.from_numpy(X[(step % 2) * 8 : (step % 2) * 8 + 8].toarray())
        tb = training_batch(counts, cell_keys(0, step, np.arange(8)))
        loss = masked_sse(model(tb.inputs, tb.is_mask), tb) / tb.target.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    after = evaluate(model, X, batch_size=8, masking=MaskingConfig(), device=torch.device("cpu"), seed=0)
    assert after["mse"] < 0.7 * before["mse"], (before, after)


def test_split_is_96_2_2_and_deterministic():
    s = split_cells(10_000, random_state=0)
    assert [len(s[k]) for k in ("train", "validation", "test")] == [9_600, 200, 200]
    assert len(np.unique(np.concatenate(list(s.values())))) == 10_000
    s2 = split_cells(10_000, random_state=0)
    assert all(np.array_equal(s[k], s2[k]) for k in s)
    assert not np.array_equal(s["test"], split_cells(10_000, random_state=1)["test"])


def test_sortish_batches_group_similar_lengths(pbmc3k_prepared):
    lengths = np.diff(pbmc3k_prepared.X.indptr)
    batches = sortish_batches(lengths, 8, np.random.default_rng(0))
    assert len(np.unique(np.concatenate(batches))) == sum(len(b) for b in batches) >= len(lengths) - 8 * 64
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    rng = np.random.default_rng(0)
    random_spread = np.mean([np.ptp(lengths[rng.choice(len(lengths), 8)]) for _ in range(100)])
    assert spread < 0.5 * random_spread


def test_pretrain_api_history_and_checkpoint(pbmc3k, tiny_config, tmp_path):
    small = pbmc3k[:120].copy()
    X0 = small.X.copy()
    model, history = scxtrimo.tl.pretrain(small, config=tiny_config, max_steps=4, batch_size=4, eval_every=2,
                                          eval_cells=8, lr=1e-3, save_dir=tmp_path / "ck", progress=False)
    assert isinstance(history, pd.DataFrame)
    assert list(history["step"]) == [2, 4]
    assert {"train_mse", "val_mse", "val_pearson", "lr", "elapsed_s", "cells_seen"} <= set(history.columns)
    assert np.isfinite(history["val_mse"]).all()
    assert set(history.attrs["test"]) >= {"mse", "pearson"}
    assert model.metadata["split"]["train"] + model.metadata["split"]["validation"] + model.metadata["split"]["test"] == model.metadata["cells"]
    assert (small.X != X0).nnz == 0
    assert "pooling" not in model.metadata and model.default_pooling == "max"  # a new model: the paper's
    loaded = scxtrimo.models.load(tmp_path / "ck")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_pretrain_drops_low_quality_cells(pbmc3k, tiny_config):
    """Cells with <= 200 expressed reference genes are not trained on (appendix 1)."""
    small = pbmc3k[:60].copy()
    genes = scxtrimo.pp.align_genes(small).X
    expected = int((np.diff(genes.indptr) > 200).sum())
    model, _ = scxtrimo.tl.pretrain(small, config=tiny_config, max_steps=1, batch_size=4, eval_every=0,
                                    eval_cells=4, progress=False)
    assert model.metadata["cells"] == expected < 60 or model.metadata["cells"] == expected


def test_pretrain_refuses_data_without_qc_passing_cells(pbmc3k, tiny_config):
    with pytest.raises(ValueError, match="expressed reference genes"):
        scxtrimo.tl.pretrain(pbmc3k[:20], config=tiny_config, min_genes=10_000, max_steps=1, progress=False)


def test_pretrain_with_sampled_decoder_context(pbmc3k, tiny_config):
    small = pbmc3k[:80].copy()
    model, history = scxtrimo.tl.pretrain(small, config=tiny_config, max_steps=3, batch_size=4, eval_every=3,
                                          eval_cells=8, lr=1e-3, decoder_zeros=64, progress=False)
    assert model.metadata["decoder_zeros"] == 64
    assert np.isfinite(history["val_mse"]).all() and np.isfinite(history["train_mse"]).all()


def test_depth_aware_pretraining_trains_a_depth_token_model(pbmc3k, tiny_config):
    """tl.pretrain with thinning and a depth-token model: the masked loss falls and T/S are learned."""
    import dataclasses

    cfg = dataclasses.replace(tiny_config, name="tiny-depth", depth_tokens=True)
    small = pbmc3k[:100].copy()
    model, history = scxtrimo.tl.pretrain(small, config=cfg, max_steps=6, batch_size=8, eval_every=3, eval_cells=16,
                                          lr=3e-3, thinning=ThinningConfig(p_thin=1.0, min_total=0), progress=False)
    assert model.config.depth_tokens and model.metadata["thinning"]["p_thin"] == 1.0
    assert np.isfinite(history["val_mse"]).all()
    trained = model.gene_embedding.weight[-3:-1]  # the T and S rows receive gradient
    torch.manual_seed(0)
    fresh = XTrimoGene(cfg).gene_embedding.weight[-3:-1]
    assert not torch.allclose(trained.cpu(), fresh)
    scxtrimo.tl.embed(small[:20], model=model, pooling="all", progress=False)


def test_pretrain_continues_a_named_checkpoint(pbmc3k):
    """model=DEFAULT (a name) loads the bundled weights and continues them (adaptation to a data set);
    the bundled checkpoint itself is untouched, and the result keeps its pooling for tl.embed."""
    bundled = scxtrimo.models.load(DEFAULT)
    model, hist = scxtrimo.tl.pretrain(pbmc3k[:80].copy(), model=DEFAULT, max_steps=2, batch_size=8, lr=1e-3,
                                       eval_every=0, eval_cells=8, decoder_zeros=64, progress=False, device="cpu")
    assert model.config == bundled.config
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v.cpu(), bundled.state_dict()[k])]
    assert moved, "training did not change the weights"
    again = scxtrimo.models.load(DEFAULT)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in bundled.state_dict().items())
    assert len(hist) >= 1 and np.isfinite(hist["val_mse"]).all()
    assert bundled.default_pooling == "mean" and model.metadata["pooling"] == "mean"
    cells = pbmc3k[:12].copy()
    scxtrimo.tl.embed(cells, model=model, progress=False, device="cpu")
    assert cells.uns["xtrimo"]["params"]["pooling"] == "mean"


def test_cell_level_terms_keep_a_frozen_gene_table_and_report_their_losses(pbmc3k, tiny_config):
    """gene_lr_scale=0 keeps the gene table exactly as it started; cell_weight / factor_weight add
    the bundled model's cell-level terms: they change the update, their MSEs enter the history
    (the factor term's falls as it trains) and the run is recorded in the metadata."""
    small = pbmc3k[:160].copy()
    kw = dict(config=tiny_config, max_steps=12, batch_size=8, lr=1e-3, eval_every=4, eval_cells=16, progress=False,
              device="cpu", decoder_zeros=64, gene_lr_scale=0)
    plain, _ = scxtrimo.tl.pretrain(small, **kw)
    model, hist = scxtrimo.tl.pretrain(small, cell_weight=1, factor_weight=2, **kw)
    torch.manual_seed(0)
    start = XTrimoGene(tiny_config).gene_embedding.weight.detach()
    for m in (plain, model):
        assert torch.equal(m.gene_embedding.weight.detach().cpu(), start)
        assert m.gene_embedding.weight.requires_grad  # frozen only while training
    differs = [k for k, v in model.state_dict().items() if not torch.equal(v, plain.state_dict()[k])]
    assert differs, "the cell-level terms did not change the update"
    assert {"train_cell_mse", "train_factor_mse"} <= set(hist.columns)
    assert np.isfinite(hist[["train_cell_mse", "train_factor_mse"]].to_numpy()).all()
    assert hist["train_factor_mse"].iloc[-1] < hist["train_factor_mse"].iloc[0], hist
    assert model.metadata["cell_terms"] == {"cell_weight": 1.0, "cell_readout": "dot", "factor_weight": 2.0}
    assert model.metadata["gene_lr_scale"] == 0.0
    assert "cell_terms" not in plain.metadata


def test_cell_level_term_arguments_are_checked(pbmc3k, tiny_config):
    small = pbmc3k[:40].copy()
    kw = dict(config=tiny_config, max_steps=1, batch_size=4, eval_every=0, eval_cells=4, progress=False)
    for bad, match in (({"cell_weight": -1}, "cell_weight must be a finite number >= 0"),
                       ({"factor_weight": float("nan")}, "factor_weight must be a finite number >= 0"),
                       ({"cell_weight": 1, "cell_readout": "mlp"}, "cell_readout must be one of"),
                       ({"gene_lr_scale": -0.5}, "gene_lr_scale must be >= 0")):
        with pytest.raises(ValueError, match=match):
            scxtrimo.tl.pretrain(small, **kw, **bad)


@pytest.mark.parametrize("below", [False, True])
def test_pretrain_checks_save_dir_before_training(pbmc3k, tiny_config, tmp_path, below):
    """A save_dir that is a file (or lies inside one) failed with FileExistsError only after training."""
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    seen = []
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        scxtrimo.tl.pretrain(pbmc3k[:40].copy(), config=tiny_config, max_steps=1, batch_size=4, eval_every=0,
                             eval_cells=4, progress=False, callback=seen.append,
                             save_dir=blocker / "run" if below else blocker)
    assert seen == [] and blocker.read_text() == "not a folder"


def test_pretrain_refuses_no_input_a_file_given_twice_and_a_file_that_is_not_h5ad(pretrain_files, tiny_config,
                                                                                    tmp_path):
    kw = dict(config=tiny_config, max_steps=1, batch_size=4, eval_every=0, eval_cells=4, progress=False)
    with pytest.raises(ValueError, match="no input data"):
        scxtrimo.tl.pretrain([], **kw)
    a, b = pretrain_files
    same = a.parent / "." / a.name  # the same file under another spelling
    for streaming in (None, False):  # streamed and in memory
        with pytest.raises(ValueError, match="is given twice"):
            scxtrimo.tl.pretrain([a, b, str(same)], streaming=streaming, **kw)
    csv = tmp_path / "counts.csv"
    csv.write_text("gene,cell1\nCD3E,4\n")
    with pytest.raises(ValueError, match=f"could not read {str(csv)!r} as an .h5ad file"):
        scxtrimo.tl.pretrain([a, csv], **kw)
    with pytest.raises(FileNotFoundError, match="missing.h5ad' does not exist"):
        scxtrimo.tl.pretrain([a, tmp_path / "missing.h5ad"], **kw)


def test_config_given_beside_a_model_is_said_to_be_ignored(pbmc3k, tiny_config):
    small = pbmc3k[:40].copy()
    kw = dict(max_steps=1, batch_size=4, eval_every=0, eval_cells=4, progress=False, device="cpu")
    with pytest.warns(UserWarning, match="config=.*ignored"):
        model, _ = scxtrimo.tl.pretrain(small, model=scxtrimo.models.XTrimoGene(tiny_config), config="xtrimo-10m", **kw)
    assert model.config.enc_dim == tiny_config.enc_dim
    with pytest.warns(UserWarning, match="config=.*ignored"):  # a config object or mapping is named too
        scxtrimo.tl.pretrain(small, model=scxtrimo.models.XTrimoGene(tiny_config), config={"enc_depth": 2}, **kw)
