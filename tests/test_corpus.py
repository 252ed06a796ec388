"""The packed corpus (scxtrimo corpus / data._corpus) and the device training script, on real cells."""

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import scxtrimo
from scxtrimo.data import load_corpus, pack_corpus
from scxtrimo.data._corpus import _delta_decode, _delta_encode
from scxtrimo.data._prepare import counts_rows, depth_rows, prepare_input

from conftest import REPO, read_shared, subprocess_env


@pytest.fixture(scope="module")
def packed(tmp_path_factory, pbmc3k_session):
    """pbmc3k (300 cells, one below QC) + 40 deep cellbench cells packed into one corpus."""
    folder = tmp_path_factory.mktemp("corpus")
    a = pbmc3k_session[:300].copy()
    cb = read_shared("cellbench_lung_celllines")[:40].copy()
    paths = [folder / "pbmc3k.h5ad", folder / "cellbench.h5ad"]
    a.write_h5ad(paths[0])
    cb.write_h5ad(paths[1])
    info = pack_corpus(paths, folder / "c.xtc", progress=False)
    return folder, paths, info, (a, cb)


def test_delta_coding_round_trips():
    X = sp.random(50, 19264, density=0.05, format="csr", random_state=0)
    X[3] = 0
    X.eliminate_zeros()
    X.sort_indices()
    np.testing.assert_array_equal(_delta_decode(X.indptr, _delta_encode(X)), X.indices)


def test_packing_round_trips_counts_totals_labels(packed):
    folder, paths, info, (a, cb) = packed
    c = load_corpus(folder / "c.xtc")
    assert c.sources == ["pbmc3k", "cellbench"] and info["cells"] == len(c) and info["n_clipped"] == 0
    for i, adata in enumerate((a, cb)):
        C = counts_rows(prepare_input(adata), 0, adata.n_obs)
        keep = np.diff(C.indptr) >= 201
        rows = c.rows(source=c.sources[i])
        assert len(rows) == keep.sum()
        mine = c.counts[rows]
        mine.sort_indices()
        ref = sp.csr_matrix(C[keep], dtype=np.float32)
        ref.sort_indices()
        assert (mine != ref).nnz == 0  # exact integers on the reference genes
        np.testing.assert_array_equal(c.total[rows], np.asarray(ref.sum(1)).ravel())
        names = [c.label_names[k] for k in c.label[rows]]
        assert names == list(adata.obs["cell_type"].astype(str)[keep])
        assert list(c.obs_names[rows]) == list(adata.obs_names[keep])
    assert len(c) == sum(len(c.rows(source=s)) for s in c.sources)
    assert set(np.unique(c.split)) <= {0, 1, 2} and (c.split == 0).mean() > 0.85
    again = pack_corpus(paths, folder / "c2.xtc", progress=False)
    assert np.array_equal(load_corpus(folder / "c2.xtc").split, c.split) and again["bytes"] == info["bytes"]


def test_model_input_matches_the_anndata_path(packed):
    folder, _, _, (a, _) = packed
    c = load_corpus(folder / "c.xtc")
    rows = c.rows(source="pbmc3k")[:20]
    prep = prepare_input(a)
    ref = depth_rows(prep, 0, 20, (4.0, "fixed"))
    got = c.model_input(rows, depth=(4.0, "fixed"))
    np.testing.assert_allclose(got.toarray(), ref.toarray(), rtol=1e-6, atol=1e-6)


def test_a_file_that_is_not_a_corpus_is_refused(tmp_path):
    bad = tmp_path / "x.xtc"
    bad.write_bytes(b"not lzma")
    with pytest.raises(ValueError, match="not an scxtrimo corpus"):
        load_corpus(bad)


def test_cli_packs_with_exclusions(packed, tmp_path):
    _, paths, _, _ = packed
    from scxtrimo.cli import main

    assert main(["corpus", str(tmp_path / "o.xtc"), *map(str, paths), "--exclude", "cellbench", "--quiet"]) == 0
    assert load_corpus(tmp_path / "o.xtc").sources == ["pbmc3k"]


def test_device_script_trains_writes_outputs_and_merges(packed, tmp_path):
    """CPU smoke run of scripts/train_device.py: the same code path as a GPU run, a few steps."""
    folder = packed[0]
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "scripts" / "train_device.py"), "train", "--corpus", str(folder / "c.xtc"),
           "--out", str(out), "--config", "xtrimo-3m", "--depth-tokens", "--max-steps", "3", "--batch-size", "4",
           "--decoder-zeros", "256", "--max-visible", "256", "--eval-cells", "8", "--score-cells", "40",
           "--device", "cpu", "--minutes", "5"]
    subprocess.run(cmd, check=True, env=subprocess_env(), capture_output=True, timeout=600)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model-1.safetensors", "history.csv", "result.json", "log.txt"} <= files
    assert all(p.stat().st_size <= 15 * 2**20 for p in out.iterdir())
    result = json.loads((out / "result.json").read_text())
    tp = result["throughput"]
    assert tp["steps"] == 3 and tp["cells_seen"] == 12 and tp["cells_per_s"] > 0 and tp["flops_per_cell"] > 1e8
    assert set(result["pbmc3k"]) == {f"{p}/T={t}" for p in ("max", "mean", "all") for t in ("4", "S")}
    assert all(-1 <= v["kmeans_ari"] <= 1 for v in result["pbmc3k"].values())
    assert np.isfinite(result["final"]["val_mse"]) and result["metadata"]["cells_seen"] == 12
    # merge into a checkpoint folder that scxtrimo loads strictly and embeds with
    ckpt = tmp_path / "ckpt"
    subprocess.run([sys.executable, str(REPO / "scripts" / "train_device.py"), "merge", str(out), str(ckpt)],
                   check=True, env=subprocess_env(), capture_output=True, timeout=300)
    model = scxtrimo.models.load(ckpt)
    assert model.config.depth_tokens and model.metadata["cells_seen"] == 12
    assert model.metadata["gene_init"] == "coexpression"  # the script's default for a new model
    # continue from a checkpoint folder without --config: the run's record names the loaded model, not the
    # default; --decoder-zero-mass sets the loaded weights' decoder zero mass; the checkpoint's pooling carries
    # over (a continued checkpoint embeds as its start did)
    assert model.config.decoder_zero_mass is None and model.config.feature_redraw_interval is None
    assert model.default_pooling == "max"  # no pooling recorded: the paper's
    start = model.save(tmp_path / "start", metadata={**model.metadata, "pooling": "mean"})
    more = tmp_path / "more"
    subprocess.run([*cmd[:5], "--out", str(more), "--init", str(start), "--max-steps", "1", "--batch-size", "4",
                    "--eval-cells", "8", "--score-cells", "0", "--device", "cpu", "--minutes", "5",
                    "--decoder-zeros", "256", "--decoder-zero-mass", "256"],
                   check=True, env=subprocess_env(), capture_output=True, timeout=600)
    assert json.loads((more / "config.json").read_text())["decoder_zero_mass"] == 256
    meta = json.loads((more / "result.json").read_text())["metadata"]
    assert meta["cells_seen"] == 16 and meta["this_run"]["args"]["config"] == "xtrimo-3m"
    assert meta["this_run"]["args"]["depth_tokens"] is True and len(meta["history_before"]) == 1
    assert meta["pooling"] == "mean"
    merged = tmp_path / "merged"
    subprocess.run([sys.executable, str(REPO / "scripts" / "train_device.py"), "merge", str(more), str(merged)],
                   check=True, env=subprocess_env(), capture_output=True, timeout=300)
    assert scxtrimo.models.load(merged).default_pooling == "mean"
    adata = packed[3][0][:30].copy()
    scxtrimo.tl.embed(adata, model=model, pooling="all", progress=False)
    assert adata.obsm["X_xtrimo"].shape == (30, 4 * 128)
    assert adata.uns["xtrimo"]["params"]["target_depth"] == 4.0


def test_sharded_weights_round_trip(tmp_path, monkeypatch, tiny_config):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import train_device
    finally:
        sys.path.remove(str(REPO / "scripts"))
    monkeypatch.setattr(train_device, "SHARD_BYTES", 2**20 + 2**16 + 1)  # forces a row split of the gene embedding
    torch.manual_seed(0)
    model = scxtrimo.models.XTrimoGene(tiny_config)
    paths = train_device.save_sharded(model, tmp_path, metadata={"cells_seen": 5})
    assert len(paths) >= 3 and all(p.stat().st_size <= 2**20 + 2**17 for p in paths)
    back = train_device.load_sharded(tmp_path)
    for k, v in scxtrimo.models._io.canonical_state(model).items():
        ref = v.half().float() if v.is_floating_point() else v
        torch.testing.assert_close(back.state_dict()[k], ref, rtol=0, atol=0)
    assert back.metadata == {"cells_seen": 5}


@pytest.mark.parametrize("scale", [0.0, 0.1])
def test_gene_lr_scale_freezes_or_slows_the_gene_embedding(packed, tiny_config, scale):
    """gene_lr_scale=0 leaves the gene table bit-identical (and trainable again afterwards) while
    the encoder learns; a scale of 0.1 moves it about a tenth as far as the full rate does."""
    from scxtrimo._train_corpus import CorpusTrainConfig, train_corpus

    corpus = load_corpus(packed[0] / "c.xtc")

    def run(gene_lr_scale):
        torch.manual_seed(0)
        model = scxtrimo.models.XTrimoGene(tiny_config)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        cfg = CorpusTrainConfig(minutes=5.0, batch_size=8, max_steps=3, warmup_steps=1, eval_every_s=1e9,
                                eval_cells=8, lr=1e-3, gene_lr_scale=gene_lr_scale)
        train_corpus(model, corpus, cfg, device=torch.device("cpu"), log=lambda m: None)
        after = model.state_dict()
        return model, {k: float((after[k] - before[k]).abs().max()) for k in before}

    model, moved = run(scale)
    assert moved["encoder.blocks.0.qkv.weight"] > 0 and model.gene_embedding.weight.requires_grad
    if scale == 0:
        assert moved["gene_embedding.weight"] == 0.0
    else:
        _, full = run(1.0)
        assert 0 < moved["gene_embedding.weight"] < 0.2 * full["gene_embedding.weight"]


def test_gene_lr_scale_must_not_be_negative(tiny_config):
    from scxtrimo._train_corpus import param_groups

    with pytest.raises(ValueError, match="gene_lr_scale must be >= 0"):
        param_groups(scxtrimo.models.XTrimoGene(tiny_config), -1.0)


@pytest.mark.parametrize(("term", "column"), [("cell_weight", "train_cell_mse"), ("contrast_weight", "train_contrast"),
                                              ("factor_weight", "train_factor_mse")])
def test_an_extra_term_is_recorded_and_reaches_the_encoder(packed, tiny_config, term, column):
    """cell_weight > 0 trains a CellExpressionHead beside masked regression, contrast_weight > 0
    adds the contrastive term between two corruptions of each cell, factor_weight > 0 trains a
    FactorScoreHead on the gene table's factor scores: the term's loss is recorded,
    it changes the encoder's update (same seed, same cells and masks) and the model keeps
    exactly its own parameters (no head is saved); negative weights are refused."""
    from scxtrimo._train_corpus import CorpusTrainConfig, train_corpus

    corpus = load_corpus(packed[0] / "c.xtc")

    def run(weight, steps=3):
        torch.manual_seed(0)
        model = scxtrimo.models.XTrimoGene(tiny_config)
        cfg = CorpusTrainConfig(minutes=5.0, batch_size=8, max_steps=steps, warmup_steps=1, eval_every_s=1e9,
                                eval_cells=8, lr=1e-3, **{term: weight})
        res = train_corpus(model, corpus, cfg, device=torch.device("cpu"), log=lambda m: None)
        return model, res["history"][-1]

    plain, h0 = run(0.0)
    extra, h1 = run(1.0)
    assert column not in h0
    assert np.isfinite(h1[column]) and h1[column] > 0
    if term == "contrast_weight":  # InfoNCE over 8 cells starts near log 8 and cannot exceed it by much
        assert h1[column] < 2 * np.log(8)
    if term == "factor_weight":  # standardized targets, the head aligned before the first step: below 1 there
        assert run(1.0, steps=1)[1][column] < 1.0
    assert set(extra.state_dict()) == set(plain.state_dict())
    w0, w1 = plain.encoder.blocks[0].qkv.weight.detach(), extra.encoder.blocks[0].qkv.weight.detach()
    assert float((w1 - w0).abs().max()) > 1e-6
    with pytest.raises(ValueError, match=f"{term} must be (a finite number )?>= 0"):
        train_corpus(plain, corpus, CorpusTrainConfig(**{term: -1.0}), device=torch.device("cpu"), log=lambda m: None)


def test_view_contrast_is_log_b_without_information_and_near_zero_for_matching_views():
    """Symmetric InfoNCE: log B when all cells look alike, near 0 when each cell's two views
    agree and differ from the others', symmetric in its views; shapes and temperature checked."""
    from scxtrimo.data._objective import view_contrast

    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 64, generator=g)
    b = a + 0.05 * torch.randn(8, 64, generator=g)
    same = torch.ones(8, 64)
    assert float(view_contrast(same, same)) == pytest.approx(np.log(8), rel=1e-5)
    assert float(view_contrast(a, b, 0.05)) < 0.01
    assert float(view_contrast(a, b)) == pytest.approx(float(view_contrast(b, a)), rel=1e-6)
    assert float(view_contrast(a, b.roll(1, 0), 0.05)) > np.log(8)  # every cell paired with another's view
    with pytest.raises(ValueError, match="one shape"):
        view_contrast(a, b[:4])
    with pytest.raises(ValueError, match="temperature"):
        view_contrast(a, b, 0.0)


def test_param_groups_give_the_head_its_own_rate(tiny_config):
    """Model parameters, head parameters and the gene table each land in exactly one group."""
    from scxtrimo._train_corpus import param_groups
    from scxtrimo.models import CellExpressionHead

    model = scxtrimo.models.XTrimoGene(tiny_config)
    head = CellExpressionHead(tiny_config.enc_dim, tiny_config.n_genes)
    groups = param_groups(model, 0.5, head, 100.0)
    assert [g["lr_scale"] for g in groups] == [1.0, 100.0, 0.5]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters())) + len(list(head.parameters()))
    assert groups[2]["params"] == [model.gene_embedding.weight]


def test_pack_corpus_checks_its_inputs_before_packing(pretrain_files, tmp_path, capsys):
    """No input, the same file twice, two files of one name, a bad preset or min_genes: refused
    before any file is packed (progress prints one line per packed file)."""
    import shutil

    a, b = pretrain_files
    twin = tmp_path / "other" / a.name
    twin.parent.mkdir()
    shutil.copy(a, twin)
    out = tmp_path / "c.xtc"
    for paths, kwargs, message in (
        ([], {}, "no input data"),
        ([a, b, a.parent / "." / a.name], {}, "is given twice"),
        ([a, twin], {}, "share the name 'a'"),
        ([a], {"preset": 12}, "preset must be an integer from 0 to 9"),
        ([a], {"min_genes": 0}, "min_genes must be a positive integer"),
    ):
        with pytest.raises(ValueError, match=message):
            pack_corpus(paths, out, **kwargs)
        assert capsys.readouterr().out == "" and not out.exists()


def test_pack_corpus_takes_one_path(pretrain_files, tmp_path):
    info = pack_corpus(str(pretrain_files[0]), tmp_path / "one.xtc", progress=False)
    c = load_corpus(tmp_path / "one.xtc")
    assert c.sources == ["a"] and info["cells"] == len(c) == len(c.rows(source="a")) > 0


def test_pack_corpus_checks_the_output_first_and_leaves_no_temporary_file(pretrain_files, tmp_path, capsys,
                                                                          monkeypatch):
    import scxtrimo.data._corpus as corpus_module

    with pytest.raises(FileNotFoundError, match="the folder of the output"):
        pack_corpus(pretrain_files, tmp_path / "missing" / "c.xtc")
    folder = tmp_path / "taken"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        pack_corpus(pretrain_files, folder)
    assert capsys.readouterr().out == ""  # nothing was packed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(corpus_module.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        pack_corpus(pretrain_files, tmp_path / "c.xtc", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # the temporary file is gone


def test_pack_corpus_warns_about_a_labels_key_no_input_has(pretrain_files, tmp_path):
    with pytest.warns(UserWarning, match="labels_key 'nope' is a column of no input's obs"):
        pack_corpus(pretrain_files, tmp_path / "c.xtc", labels_key="nope", progress=False)
    assert (load_corpus(tmp_path / "c.xtc").label == -1).all()


def test_cli_corpus_errors_are_one_line_and_come_before_packing(pretrain_files, tmp_path, capsys):
    from scxtrimo.cli import main

    csv = tmp_path / "counts.csv"
    csv.write_text("gene,cell1\nCD3E,4\n")
    (tmp_path / "taken").mkdir()
    for argv, message in (
        ([str(tmp_path / "o.xtc"), str(csv)], f"could not read {str(csv)!r} as an .h5ad file"),
        ([str(tmp_path / "no" / "o.xtc"), *map(str, pretrain_files)], "the folder of the output"),
        ([str(tmp_path / "taken"), *map(str, pretrain_files)], "is a folder"),
    ):
        assert main(["corpus", *argv]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and len(captured.err.strip().splitlines()) == 1
        assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counts.csv", "taken"]


def test_rows_names_an_unknown_split_part(packed):
    folder, *_ = packed
    c = load_corpus(folder / "c.xtc")
    assert len(c.rows("validation")) > 0
    with pytest.raises(ValueError, match="split part 'training'.*'train', 'validation', 'test'"):
        c.rows("training")
