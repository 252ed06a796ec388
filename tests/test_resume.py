"""Checkpoint and resume of tl.pretrain: a killed run resumes losing at most one save interval
and ends where the uninterrupted run ends; saves are atomic."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import one_thread

import scxtrimo
from conftest import DEFAULT, subprocess_env
from scxtrimo.tl._checkpoint import TRAIN_STATE, load_train_state, save_train_state

STEPS, SAVE_EVERY = 16, 2
RUN = dict(batch_size=4, lr=1e-3, eval_every=6, eval_cells=8, block_cells=32, random_state=0, save_every=SAVE_EVERY)


def _cli(run, out, *flags):
    return [sys.executable, "-m", "scxtrimo.cli", "pretrain", str(run), "--out", str(out), "--max-steps",
            str(STEPS), "--quiet", "--log-every", "1", *flags]


def _steps(text: str) -> list[int]:
    return [int(line.split()[1]) for line in text.splitlines() if line.startswith("step ")]


def test_killed_run_resumes_and_matches_the_uninterrupted_run(pretrain_files, tiny_config, tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"config": tiny_config.to_dict(), "data": [str(p) for p in pretrain_files], **RUN}))
    out = tmp_path / "killed"

    # 1. start, wait for the first save and a few more steps, then SIGKILL
    proc = subprocess.Popen(_cli(run, out), env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, deadline = [], time.monotonic() + 120
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                seen.append(int(line.split()[1]))
            if seen and seen[-1] >= SAVE_EVERY + 3 and (out / TRAIN_STATE).exists():
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "the run did not reach the kill point in time"
        else:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}")
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    executed = max(seen + _steps(rest))
    assert executed < STEPS

    # (a) the saved state loads; (b) at most one save interval is lost
    state = load_train_state(out / TRAIN_STATE)
    saved = state["step"]
    lost = executed - saved
    print(f"killed after step {executed}; last save at step {saved}; lost {lost} step(s) (save_every={SAVE_EVERY})")
    assert saved % SAVE_EVERY == 0 and 0 <= lost <= SAVE_EVERY
    assert scxtrimo.models.load(out).metadata["steps"] <= saved  # the model files load too

    # 2. resume to the end
    r = subprocess.run(_cli(run, out, "--resume"), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = _steps(r.stdout)
    assert resumed[0] == saved + 1 and resumed[-1] == STEPS

    # (c) the final parameters equal the uninterrupted run's
    kw = {k: v for k, v in RUN.items() if k != "save_every"}
    with one_thread():
        ref, ref_history = scxtrimo.tl.pretrain([str(p) for p in pretrain_files], config=tiny_config, max_steps=STEPS,
                                                progress=False, **kw)
    final = scxtrimo.models.load(out)
    sa, sb = final.state_dict(), ref.state_dict()
    diff = max(float((sa[k] - sb[k]).abs().max()) for k in sa if sa[k].is_floating_point())
    print(f"resumed vs uninterrupted after {STEPS} steps: max |param diff| = {diff:.3g}")
    assert diff <= 1e-6
    history = load_train_state(out / TRAIN_STATE)["history"]
    assert [h["step"] for h in history] == list(ref_history["step"]) == [6, 12, 16]
    for key in ("train_mse", "val_mse"):  # train_mse spans the kill: the running losses were saved too
        torch.testing.assert_close(torch.tensor([h[key] for h in history]), torch.tensor(list(ref_history[key])),
                                   rtol=1e-5, atol=1e-6, equal_nan=True)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_train_state({"step": 2, "weights": torch.arange(4.0)}, tmp_path)

    def crash(*args, **kwargs):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_train_state({"step": 4, "weights": torch.zeros(4)}, tmp_path)
    monkeypatch.undo()
    state = load_train_state(tmp_path / TRAIN_STATE)
    assert state["step"] == 2 and torch.equal(state["weights"], torch.arange(4.0))
    assert sorted(os.listdir(tmp_path)) == [TRAIN_STATE]  # no temporary file left behind


def test_resume_errors_are_clear(pbmc3k, tiny_config, tmp_path):
    small = pbmc3k[:60].copy()
    kw = dict(config=tiny_config, max_steps=2, batch_size=4, eval_every=0, eval_cells=4, progress=False)
    with pytest.raises(ValueError, match="no training state"):
        scxtrimo.tl.pretrain(small, save_dir=tmp_path / "none", resume=True, **kw)
    with pytest.raises(ValueError, match="needs save_dir"):
        scxtrimo.tl.pretrain(small, resume=True, **kw)
    scxtrimo.tl.pretrain(small, save_dir=tmp_path / "ck", save_every=1, **kw)
    with pytest.raises(ValueError, match=r"settings differ.*lr: saved 0\.0001, now 0\.002"):
        scxtrimo.tl.pretrain(small, save_dir=tmp_path / "ck", resume=True, **(kw | {"lr": 2e-3}))
    with pytest.raises(ValueError, match="settings differ.*config"):
        scxtrimo.tl.pretrain(small, save_dir=tmp_path / "ck", resume=True, **(kw | {"config": "xtrimo-3m"}))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / TRAIN_STATE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable scxtrimo training state"):
        scxtrimo.tl.pretrain(small, resume_from=tmp_path / "bad", **kw)
    # a finished run resumes to the same end point
    model, _ = scxtrimo.tl.pretrain(small, save_dir=tmp_path / "ck", resume=True, **kw)
    assert model.metadata["steps"] == 2


def test_a_continued_run_resumed_from_its_config_keeps_the_pooling(pbmc3k, tmp_path):
    """A run continuing the bundled weights (mean pooling) and resumed with config= instead of
    model= rebuilds the model from the configuration; it still records the pooling it started
    with, so tl.embed pools the result as before instead of falling back to max pooling."""
    small = pbmc3k[:60].copy()
    kw = dict(max_steps=2, batch_size=4, eval_every=0, eval_cells=4, decoder_zeros=32, progress=False,
              device="cpu", save_dir=tmp_path / "ck", save_every=1)
    first, _ = scxtrimo.tl.pretrain(small, model=DEFAULT, **kw)
    assert first.metadata["pooling"] == "mean"
    config = scxtrimo.models.load(DEFAULT).config
    resumed, _ = scxtrimo.tl.pretrain(small, config=config, resume=True, **kw)
    assert resumed.metadata["pooling"] == "mean" and resumed.default_pooling == "mean"
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in resumed.state_dict().items())


def test_a_resumed_run_keeps_the_record_of_its_gene_initialisation(pbmc3k, tiny_config, tmp_path):
    """A run started from the co-expression gene table and resumed without gene_init= (the
    default, random) still says so in its metadata; the table is not initialised again."""
    small = pbmc3k[:300].copy()
    kw = dict(config=tiny_config, max_steps=1, batch_size=4, eval_every=0, eval_cells=4, progress=False,
              device="cpu", save_dir=tmp_path / "ck", save_every=1)
    first, _ = scxtrimo.tl.pretrain(small, gene_init="coexpression", **kw)
    assert first.metadata["gene_init"] == "coexpression"
    resumed, _ = scxtrimo.tl.pretrain(small, resume=True, **kw)  # a finished run resumes to its end point
    assert resumed.metadata["gene_init"] == "coexpression" and resumed.metadata["steps"] == 1
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in resumed.state_dict().items())
    plain, _ = scxtrimo.tl.pretrain(small, **{**kw, "save_dir": tmp_path / "plain"})
    assert "gene_init" not in plain.metadata


def test_a_state_from_before_newer_settings_still_resumes(pbmc3k, tiny_config, tmp_path):
    """Settings added to scxtrimo later (masking.max_visible, depth tokens, ...) are absent from an
    older train_state.pt; their defaults reproduce the old run, so it resumes, and only a real
    difference is refused."""
    small = pbmc3k[:60].copy()
    kw = dict(config=tiny_config, max_steps=3, batch_size=4, eval_every=0, eval_cells=4, progress=False)
    scxtrimo.tl.pretrain(small, save_dir=tmp_path / "ck", save_every=1, **kw)
    path = tmp_path / "ck" / TRAIN_STATE
    state = load_train_state(path)
    del state["signature"]["masking"]["max_visible"]
    for key in ("depth_tokens", "key_max", "out_norm"):
        del state["signature"]["config"][key]
    del state["signature"]["thinning"]
    for key in ("gene_lr_scale", "cell_terms"):
        del state["signature"][key]
    state["running"] = [r["mse"] for r in state["running"]]  # running losses were plain floats
    save_train_state(state, tmp_path / "ck")
    model, _ = scxtrimo.tl.pretrain(small, save_dir=tmp_path / "ck", resume=True, **kw)
    assert model.metadata["steps"] == 3
    with pytest.raises(ValueError, match="settings differ.*max_visible"):
        scxtrimo.tl.pretrain(small, save_dir=tmp_path / "ck", resume=True,
                             masking=scxtrimo.data.MaskingConfig(max_visible=50), **kw)


def test_a_run_with_cell_level_terms_resumes_where_it_stopped(pbmc3k, tiny_config, tmp_path):
    """The heads of the cell-level terms, their statistics and their optimizer state are part of
    the training state: a run stopped after step 3 (last save at step 2) and resumed ends with
    the uninterrupted run's weights and history."""
    small = pbmc3k[:120].copy()
    kw = dict(config=tiny_config, max_steps=5, batch_size=8, lr=1e-3, eval_every=0, eval_cells=16, progress=False,
              save_every=2, decoder_zeros=64, gene_lr_scale=0, cell_weight=1, factor_weight=2, device="cpu")
    with one_thread():
        full, hist_full = scxtrimo.tl.pretrain(small, save_dir=tmp_path / "full", **kw)

        def stop(info):
            if info["step"] == 3:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            scxtrimo.tl.pretrain(small, save_dir=tmp_path / "cut", callback=stop, **kw)
        assert load_train_state(tmp_path / "cut" / TRAIN_STATE)["step"] == 2
        resumed, hist = scxtrimo.tl.pretrain(small, save_dir=tmp_path / "cut", resume=True, **kw)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)
    cols = ["train_mse", "train_cell_mse", "train_factor_mse", "val_mse"]
    np.testing.assert_allclose(hist[cols].to_numpy(), hist_full[cols].to_numpy(), rtol=1e-5)


def test_resume_refuses_other_cells_with_the_same_shape(pbmc3k, pretrain_files, tiny_config, tmp_path):
    """The saved state identified in-memory data by cell count and stored values, files by name and
    row count: the same cells shuffled, counts changed, or a file replaced by other cells under the
    same name resumed silently, on another split."""
    small = pbmc3k[:60].copy()
    kw = dict(config=tiny_config, max_steps=2, batch_size=4, eval_every=0, eval_cells=4, progress=False,
              save_every=1, device="cpu")
    scxtrimo.tl.pretrain(small, save_dir=tmp_path / "mem", **kw)
    shuffled = small[np.random.default_rng(0).permutation(60)].copy()
    more = small.copy()
    more.X = more.X.copy()
    more.X.data += 1
    for other in (shuffled, more):
        with pytest.raises(ValueError, match="settings differ.*data"):
            scxtrimo.tl.pretrain(other, save_dir=tmp_path / "mem", resume=True, **kw)
    model, _ = scxtrimo.tl.pretrain(small, save_dir=tmp_path / "mem", resume=True, **kw)  # the same cells resume
    assert model.metadata["steps"] == 2

    a, _ = pretrain_files
    copy = tmp_path / "files" / a.name
    copy.parent.mkdir()
    copy.write_bytes(a.read_bytes())
    skw = kw | dict(block_cells=32, streaming=True)
    scxtrimo.tl.pretrain([copy], save_dir=tmp_path / "stream", **skw)
    import anndata as ad

    old = ad.read_h5ad(copy)
    other = pbmc3k[1000 : 1000 + old.n_obs].copy()  # other cells, the same count, the same file name
    other.write_h5ad(copy)
    with pytest.raises(ValueError, match="settings differ.*data"):
        scxtrimo.tl.pretrain([copy], save_dir=tmp_path / "stream", resume=True, **skw)
