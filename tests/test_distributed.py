"""Data-parallel pretraining under torchrun (gloo, 2 CPU processes) equals one process.

Paper appendix 5: data parallelism with gradient accumulation, ZeRO-2 and activation
checkpointing. Each rank trains on a disjoint shard of every global batch and each cell's mask
depends only on (seed, step, position in the global batch), so the parameters after N steps
must match a single process with the same global batch up to float rounding.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import one_thread

import scxtrimo
from conftest import free_port, subprocess_env

STEPS = 3
RUN = dict(batch_size=8, lr=1e-4, eval_every=0, eval_cells=8, block_cells=32, random_state=0)
# AdamW divides by sqrt(v): a gradient that is exactly zero in exact arithmetic (the key part of
# the attention qkv bias: softmax is invariant to it) is float noise, and its update is
# lr * noise / eps. With lr 1e-4 that stays below 1e-5; everything else agrees to ~1e-7.
ATOL = 1e-5


def run_file(tmp_path, files, tiny_config, **extra):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"config": tiny_config.to_dict(), "data": [str(p) for p in files], **RUN, **extra}))
    return path


def torchrun(run, out, *flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "scxtrimo.cli", "pretrain", str(run), "--out", str(out),
           "--max-steps", str(STEPS), "--quiet", "--log-every", "1", *flags]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    losses = [float(line.split()[3]) for line in r.stdout.splitlines() if line.startswith("step ")]
    return losses, r.stdout


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return max(float((sa[k].float().cpu() - sb[k].float().cpu()).abs().max()) for k in sa if sa[k].is_floating_point())


@pytest.fixture(scope="module")
def single(pretrain_files, tiny_config):
    """The reference: one process, same global batch, same seed."""
    losses = []
    with one_thread():
        model, _ = scxtrimo.tl.pretrain([str(p) for p in pretrain_files], config=tiny_config, max_steps=STEPS,
                                        progress=False, callback=lambda i: losses.append(i["loss"]), **RUN)
    return model, losses


def test_ddp_two_processes_match_one_process(pretrain_files, tiny_config, single, tmp_path):
    run = run_file(tmp_path, pretrain_files, tiny_config)
    losses, stdout = torchrun(run, tmp_path / "ddp")
    assert "world size 2" in stdout
    ddp = scxtrimo.models.load(tmp_path / "ddp")
    assert ddp.metadata["world_size"] == 2 and ddp.metadata["strategy"] == "ddp"
    diff = max_abs_diff(ddp, single[0])
    print(f"DDP (2 x gloo) vs 1 process after {STEPS} steps: max |param diff| = {diff:.3g}")
    assert diff < ATOL
    np.testing.assert_allclose(losses, single[1], rtol=1e-5)  # the logged loss is the global batch's


def test_fsdp_with_accumulation_and_checkpointing_matches_one_process(pretrain_files, tiny_config, single, tmp_path):
    run = run_file(tmp_path, pretrain_files, tiny_config)
    losses, _ = torchrun(run, tmp_path / "fsdp", "--strategy", "fsdp", "--grad-accum-steps", "2",
                         "--activation-checkpointing")
    fsdp = scxtrimo.models.load(tmp_path / "fsdp")
    assert fsdp.metadata["strategy"] == "fsdp" and fsdp.metadata["grad_accum_steps"] == 2
    diff = max_abs_diff(fsdp, single[0])
    print(f"FSDP (2 x gloo, 2 micro-batches, checkpointing) vs 1 process: max |param diff| = {diff:.3g}")
    assert diff < ATOL
    np.testing.assert_allclose(losses, single[1], rtol=1e-5)


TERMS = dict(gene_lr_scale=0, cell_weight=1, factor_weight=2)


def test_cell_level_terms_under_fsdp_match_one_process(pretrain_files, tiny_config, tmp_path):
    """The cell-level terms' heads are replicated on every rank and their gradients averaged
    there; with the gene table frozen they also run under FSDP, and two ranks with 2
    micro-batches each make one process's update."""
    losses = []
    with one_thread():
        one, _ = scxtrimo.tl.pretrain([str(p) for p in pretrain_files], config=tiny_config, max_steps=STEPS,
                                      progress=False, callback=lambda i: losses.append(i["loss"]), **RUN, **TERMS)
    run = run_file(tmp_path, pretrain_files, tiny_config, **TERMS)
    fsdp_losses, _ = torchrun(run, tmp_path / "fsdp", "--strategy", "fsdp", "--grad-accum-steps", "2")
    fsdp = scxtrimo.models.load(tmp_path / "fsdp")
    assert fsdp.metadata["cell_terms"]["factor_weight"] == 2 and fsdp.metadata["strategy"] == "fsdp"
    diff = max_abs_diff(fsdp, one)
    print(f"FSDP with cell-level terms (2 x gloo, 2 micro-batches) vs 1 process: max |param diff| = {diff:.3g}")
    assert diff < ATOL
    assert torch.equal(fsdp.gene_embedding.weight, one.gene_embedding.weight.cpu())  # frozen on every rank
    np.testing.assert_allclose(fsdp_losses, losses, rtol=1e-5)


def test_accumulation_and_checkpointing_keep_the_update(pretrain_files, tiny_config, single):
    with one_thread():
        model, _ = scxtrimo.tl.pretrain([str(p) for p in pretrain_files], config=tiny_config, max_steps=STEPS,
                                        progress=False, grad_accum_steps=4, activation_checkpointing=True, **RUN)
    assert max_abs_diff(model, single[0]) < ATOL
    # the checkpointing overrides are gone afterwards
    assert "forward" not in model.encoder.blocks[0].__dict__


def test_out_of_memory_steps_are_rerun_in_more_micro_batches(pretrain_files, tiny_config, single, monkeypatch):
    """A step that runs out of CUDA memory (simulated: 2 cells fit) is run again in twice as
    many micro-batches until it fits; masks are keyed per cell, so the update is the same."""
    from scxtrimo.models import XTrimoGene

    forward, widths = XTrimoGene.forward, []

    def small_device(self, inputs, *args, **kwargs):
        if self.training:  # training steps only (the final test-split evaluation runs in eval mode)
            if inputs.shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            widths.append(inputs.shape[0])
        return forward(self, inputs, *args, **kwargs)

    monkeypatch.setattr(XTrimoGene, "forward", small_device)
    with one_thread(), pytest.warns(RuntimeWarning, match="out of memory"):
        model, _ = scxtrimo.tl.pretrain([str(p) for p in pretrain_files], config=tiny_config, max_steps=STEPS,
                                        progress=False, **RUN)
    assert max(widths) == 2 and sum(widths) == STEPS * RUN["batch_size"]  # 8 cells a step, 2 per call
    assert max_abs_diff(model, single[0]) < ATOL


def test_bad_distributed_arguments_are_refused(pretrain_files, tiny_config):
    files = [str(p) for p in pretrain_files]
    with pytest.raises(ValueError, match="Unknown strategy"):
        scxtrimo.tl.pretrain(files, config=tiny_config, strategy="zero3", max_steps=1, progress=False)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        scxtrimo.tl.pretrain(files, config=tiny_config, batch_size=2, grad_accum_steps=4, max_steps=1, progress=False)
    with pytest.raises(ValueError, match="save_dir"):
        scxtrimo.tl.pretrain(files, config=tiny_config, save_every=2, max_steps=1, progress=False)


def test_keyed_masks_do_not_depend_on_the_batch(pbmc3k_prepared):
    """A cell's mask is a function of (seed, step, position in the global batch) only."""
    from scxtrimo.data import MaskingConfig, cell_keys, mask_values_keyed

    values = torch.from_numpy(pbmc3k_prepared.X[:16].toarray())
    keys = cell_keys(0, 7, np.arange(16))
    full = mask_values_keyed(values, keys=keys)
    for shard in (np.arange(0, 16, 2), np.arange(1, 16, 2), np.arange(5, 9)):  # ranks, micro-batches
        part = mask_values_keyed(values[shard], keys=keys[shard])
        for name in ("target", "is_mask", "inputs"):
            assert torch.equal(getattr(part, name), getattr(full, name)[shard])
    assert not torch.equal(mask_values_keyed(values, keys=cell_keys(0, 8, np.arange(16))).target, full.target)
    assert not torch.equal(mask_values_keyed(values, keys=cell_keys(1, 7, np.arange(16))).target, full.target)
    # the ratios of MaskingConfig (paper section 4.2, appendix 6)
    nz = values != 0
    cfg = MaskingConfig()
    share = (full.target & nz).sum(1) / nz.sum(1)
    assert torch.allclose(share, torch.full_like(share, cfg.nonzero_ratio), atol=0.01)
    ratio = (full.target & ~nz).sum() / (full.target & nz).sum()
    assert abs(float(ratio) - cfg.zero_to_nonzero) < 0.02
    assert abs(float(full.is_mask.sum() / full.target.sum()) - cfg.p_mask) < 0.03
    assert not (full.inputs[full.is_mask] != 0).any() and not (full.is_mask & ~full.target).any()
    # replacement values come from the same cell
    rows, cols = (full.target & ~full.is_mask & (full.inputs != values)).nonzero(as_tuple=True)
    assert rows.numel() > 0
    assert all(bool((values[r] == full.inputs[r, c]).any()) for r, c in zip(rows.tolist(), cols.tolist()))


def test_cli_run_file_yaml(tmp_path, tiny_config):
    from scxtrimo.cli import _pretrain_kwargs, read_run_config
    from scxtrimo.data import MaskingConfig, ThinningConfig
    from scxtrimo.models import XTrimoGeneConfig

    run = tmp_path / "run.yaml"
    cfg = "\n".join(f"  {k}: {'null' if v is None else v}" for k, v in tiny_config.to_dict().items())
    run.write_text(f"data: a.h5ad\nconfig:\n{cfg}\nbatch_size: 16\nmasking:\n  nonzero_ratio: 0.2\nstrategy: ddp\n"
                   "thinning:\n  p_thin: 0.8\ngene_lr_scale: 0\nfactor_weight: 2\n")
    kw = _pretrain_kwargs(read_run_config(run))
    assert kw["data"] == ["a.h5ad"] and kw["batch_size"] == 16 and kw["strategy"] == "ddp"
    assert kw["config"] == tiny_config and isinstance(kw["config"], XTrimoGeneConfig)
    assert kw["masking"] == MaskingConfig(nonzero_ratio=0.2)
    assert kw["thinning"] == ThinningConfig(p_thin=0.8) and kw["gene_lr_scale"] == 0 and kw["factor_weight"] == 2
    run.write_text("data: a.h5ad\nbatchsize: 16\n")
    with pytest.raises(ValueError, match="unknown keys \\['batchsize'\\]"):
        read_run_config(run)
