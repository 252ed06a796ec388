import anndata as ad
import numpy as np
import pytest

import scxtrimo
from conftest import DEFAULT, DEFAULT_CONFIG
from scxtrimo.cli import main


def test_cli_embed_round_trip(pbmc3k, tmp_path, capsys):
    src, dst = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    pbmc3k[:100].copy().write_h5ad(src)
    assert main(["embed", str(src), str(dst)]) == 0
    out = ad.read_h5ad(dst)
    assert out.obsm["X_xtrimo"].shape == (100, DEFAULT_CONFIG.enc_dim)
    assert out.uns["xtrimo"]["params"]["model"] == DEFAULT
    direct = pbmc3k[:100].copy()
    scxtrimo.tl.embed(direct, progress=False)
    np.testing.assert_array_equal(out.obsm["X_xtrimo"], direct.obsm["X_xtrimo"])
    assert "embedded 100 cells" in capsys.readouterr().out


def test_cli_reports_bad_input(pbmc3k, tmp_path, capsys):
    src = tmp_path / "mouse.h5ad"
    mouse = pbmc3k[:20].copy()
    mouse.var_names = [g.capitalize() for g in mouse.var_names]
    mouse.write_h5ad(src)
    assert main(["embed", str(src), str(tmp_path / "o.h5ad")]) == 2
    assert "error" in capsys.readouterr().err
    human = tmp_path / "human.h5ad"
    pbmc3k[:20].copy().write_h5ad(human)
    assert main(["embed", str(human), str(tmp_path / "o.h5ad"), "--layer", "spliced"]) == 2
    assert "layer='spliced' is not in adata.layers" in capsys.readouterr().err
    assert not (tmp_path / "o.h5ad").exists()


def test_cli_embed_use_raw(pbmc3k, tmp_path):
    """--use-raw reads raw.X: the same embedding as the counts in X."""
    cells = pbmc3k[:30].copy()
    direct = cells.copy()
    scxtrimo.tl.embed(direct, progress=False)
    cells.raw = cells.copy()
    cells.X = cells.X * 0.0
    cells.write_h5ad(tmp_path / "in.h5ad")
    assert main(["embed", str(tmp_path / "in.h5ad"), str(tmp_path / "out.h5ad"), "--use-raw"]) == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.uns["xtrimo"]["params"]["source"] == "raw.X"
    np.testing.assert_allclose(out.obsm["X_xtrimo"], direct.obsm["X_xtrimo"], atol=1e-6)


def test_cli_names_a_file_that_is_not_h5ad(tmp_path, capsys):
    src = tmp_path / "counts.csv"
    src.write_text("gene,cell1\nCD3E,4\n")
    assert main(["embed", str(src), str(tmp_path / "o.h5ad")]) == 2
    err = capsys.readouterr().err
    assert f"could not read {str(src)!r} as an .h5ad file" in err and "Traceback" not in err
    assert main(["embed", str(tmp_path / "missing.h5ad"), str(tmp_path / "o.h5ad")]) == 2
    assert "missing.h5ad' does not exist" in capsys.readouterr().err


def test_cli_refuses_an_output_folder_that_does_not_exist_before_embedding(pbmc3k, tmp_path, capsys):
    src = tmp_path / "in.h5ad"
    pbmc3k[:5].copy().write_h5ad(src)
    dst = tmp_path / "no" / "such" / "out.h5ad"
    assert main(["embed", str(src), str(dst)]) == 2
    captured = capsys.readouterr()
    assert "the folder of the output" in captured.err and "embedded" not in captured.out
    assert not dst.parent.exists()


@pytest.mark.slow
def test_cli_demo(tmp_path, capsys):
    assert main(["demo", "--out-dir", str(tmp_path), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "PCA baseline" in text and "xTrimoGene" in text
    assert (tmp_path / "pbmc3k_xtrimo_umap.png").stat().st_size > 10_000


def _one_line_error(capsys, *needles):
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err, captured.err
    for needle in needles:
        assert needle in captured.err, captured.err
    return captured


def test_cli_embed_refuses_an_output_that_is_a_folder_before_embedding(pbmc3k, tmp_path, capsys):
    src = tmp_path / "in.h5ad"
    pbmc3k[:5].copy().write_h5ad(src)
    (tmp_path / "out").mkdir()
    assert main(["embed", str(src), str(tmp_path / "out")]) == 2
    assert "embedded" not in _one_line_error(capsys, "is a folder").out


def test_cli_demo_refuses_an_out_dir_that_is_a_file(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("x")
    assert main(["demo", "--out-dir", str(taken), "--quiet"]) == 2
    assert "pbmc3k" not in _one_line_error(capsys, str(taken), "is a file, not a folder").out


def test_cli_pretrain_checks_out_and_data_before_training(pretrain_files, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("x")
    base = ["pretrain", "--data", *map(str, pretrain_files), "--max-steps", "1", "--batch-size", "4", "--quiet"]
    assert main([*base, "--out", str(taken)]) == 2
    assert "pretrained" not in _one_line_error(capsys, "is a file, not a folder").out
    csv = tmp_path / "counts.csv"
    csv.write_text("gene,cell1\nCD3E,4\n")
    assert main(["pretrain", "--data", str(csv), "--quiet"]) == 2
    _one_line_error(capsys, f"could not read {str(csv)!r} as an .h5ad file")


def test_run_file_numbers_written_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-4 as a string; AdamW then failed after the data had loaded."""
    from scxtrimo.cli import read_run_config

    run = tmp_path / "run.yaml"
    run.write_text("data: a.h5ad\nlr: 1e-4\nmax_time: 3E+2\nmax_steps: 1e3\nweight_decay: 0\nwarmup_steps: null\n")
    raw = read_run_config(run)
    assert raw["lr"] == 1e-4 and isinstance(raw["lr"], float)
    assert raw["max_time"] == 300.0 and raw["max_steps"] == 1000 and isinstance(raw["max_steps"], int)
    assert raw["weight_decay"] == 0 and raw["warmup_steps"] is None


@pytest.mark.parametrize(("text", "needles"), [
    ("lr: fast\n", ["`lr` must be a number", "'fast'"]),
    ("batch_size: 2.5\n", ["`batch_size` must be an integer", "2.5"]),
    ("activation_checkpointing: maybe\n", ["`activation_checkpointing` must be true or false"]),
    ("masking: {foo: 1}\n", ["`masking` has unknown fields ['foo']", "nonzero_ratio"]),
    ("masking: {p_mask: 2}\n", ["`masking`", "MaskingConfig.p_mask must be a number in [0, 1]"]),
    ("thinning: true\n", ["`thinning` must be a mapping of ThinningConfig fields", "True"]),
    ("config: {enc_heads: 0}\n", ["`config`", "enc_heads"]),
    ("config: {enc_heads: two}\n", ["`config.enc_heads` must be an integer"]),
    ("config: 5\n", ["`config` must be a configuration name or a mapping"]),
])
def test_run_file_values_of_the_wrong_type_name_the_key(tmp_path, capsys, text, needles):
    run = tmp_path / "run.yaml"
    run.write_text(f"data: {tmp_path / 'missing.h5ad'}\n{text}")  # refused before any data is looked at
    assert main(["pretrain", str(run), "--quiet"]) == 2
    _one_line_error(capsys, str(run), *needles)


@pytest.mark.parametrize(("text", "needles"), [
    ("data: 5\n", ["`data` must be an .h5ad path or a list of them", "5"]),
    ("data: [a.h5ad\nlr: 1\n", ["is not valid YAML (line 2"]),
])
def test_run_file_data_and_syntax_errors_are_one_line(tmp_path, capsys, text, needles):
    run = tmp_path / "run.yaml"
    run.write_text(text)
    assert main(["pretrain", str(run), "--quiet"]) == 2
    _one_line_error(capsys, str(run), *needles)


def test_run_file_config_mapping_overrides_a_preset_and_says_so(tmp_path):
    """A partial `config:` once built dataclass defaults (nb_features None) still named "xtrimo-3m"."""
    import dataclasses

    from scxtrimo.cli import read_run_config
    from scxtrimo.models._config import CONFIGS

    run = tmp_path / "run.yaml"

    def config(text):
        run.write_text(f"data: a.h5ad\nconfig: {text}\n")
        return read_run_config(run)["config"]

    assert config("{dropout: 0.1}") == dataclasses.replace(CONFIGS["xtrimo-3m"], dropout=0.1,
                                                            name="xtrimo-3m+dropout=0.1")
    assert config("{name: xtrimo-10m, dropout: 1e-1}") == dataclasses.replace(CONFIGS["xtrimo-10m"], dropout=0.1,
                                                                                name="xtrimo-10m+dropout=0.1")
    assert config("{name: xtrimo-10m, nb_features: null}") == CONFIGS["xtrimo-10m"]  # nothing changed
    mine = config("{name: mine, enc_depth: 2}")  # an own name: the default preset's other fields
    assert mine == dataclasses.replace(CONFIGS["xtrimo-3m"], name="mine", enc_depth=2)
    assert config("xtrimo-10m") == "xtrimo-10m"


def test_cli_embed_writes_atomically_so_a_failed_write_keeps_the_input(pbmc3k, tmp_path, monkeypatch, capsys):
    """OUT may be IN: a write that fails half-way must not leave a truncated file in its place."""
    import anndata as ad

    src = tmp_path / "cells.h5ad"
    pbmc3k[:30].copy().write_h5ad(src)
    before = src.read_bytes()

    def broken(self, filename, **kw):
        with open(filename, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken)
    with pytest.raises(OSError, match="disk full"):
        main(["embed", str(src), str(src)])
    assert src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad"]
    monkeypatch.undo()
    assert main(["embed", str(src), str(src)]) == 0
    assert ad.read_h5ad(src).obsm["X_xtrimo"].shape == (30, DEFAULT_CONFIG.enc_dim)


def test_run_file_and_flag_continue_a_named_checkpoint(pretrain_files, tmp_path, capsys):
    """`model:` (or --model) continues a checkpoint from the command line, as tl.pretrain(model=...) does."""
    import torch

    from scxtrimo.cli import read_run_config
    from scxtrimo.models import load

    run = tmp_path / "run.yaml"
    run.write_text(f"data: a.h5ad\nmodel: {DEFAULT}\n")
    assert read_run_config(run)["model"] == DEFAULT
    run.write_text(f"data: {tmp_path / 'missing.h5ad'}\nmodel: 5\n")
    assert main(["pretrain", str(run), "--quiet"]) == 2
    _one_line_error(capsys, "`model` must be a checkpoint name or folder", "5")

    out = tmp_path / "continued"
    run.write_text("decoder_zeros: 32\n")  # a run file's settings with the flags' (the decoder's context sampled)
    assert main(["pretrain", str(run), "--data", *map(str, pretrain_files), "--model", DEFAULT, "--max-steps", "1",
                 "--batch-size", "4", "--lr", "1e-5", "--eval-cells", "4", "--random-state", "3",
                 "--save-dir", str(out), "--quiet"]) == 0
    assert f"pretrained {DEFAULT_CONFIG.name} for 1 steps" in capsys.readouterr().out
    continued, bundled = load(out), load(DEFAULT)
    assert continued.metadata["pooling"] == bundled.metadata["pooling"]  # the recorded choice, not max by default
    for (name, a), b in zip(continued.state_dict().items(), bundled.state_dict().values()):
        if a.is_floating_point():  # one small step from the bundled weights, not a new model
            assert torch.allclose(a, b, atol=1e-3), name
    assert any(not torch.equal(a, b) for a, b in zip(continued.parameters(), bundled.parameters()))  # it trained
