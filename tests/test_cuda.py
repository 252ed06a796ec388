"""CUDA code paths: bf16 embedding, real out-of-memory recovery, GPU training steps, keyed
randomness that does not depend on the device, activation checkpointing, DDP/FSDP with nccl.

Every test here is marked ``cuda`` and skipped where CUDA is absent (CI and the development
machines have no GPU). On a GPU machine, which has no anndata or scanpy, one command selects
them without ``tests/conftest.py`` (which imports anndata)::

    python -m pytest -m cuda --noconftest tests/test_cuda.py

``benchmarks/device.sh`` runs exactly that. ``SCXTRIMO_CUDA_TESTS_ON_CPU=1`` runs the tests that
do not need a GPU by nature on the CPU instead (a check of the tests themselves; the device
comparisons then compare the CPU with itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scxtrimo import N_GENES

pytestmark = pytest.mark.cuda

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
ON_CPU = bool(os.environ.get("SCXTRIMO_CUDA_TESTS_ON_CPU"))
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture
def dev() -> torch.device:
    if HAS_CUDA:
        return torch.device("cuda")
    if ON_CPU:
        return torch.device("cpu")
    pytest.skip("needs a CUDA device (SCXTRIMO_CUDA_TESTS_ON_CPU=1 runs it on the CPU)")


def tiny_config(**kw):
    from scxtrimo.models import XTrimoGeneConfig

    return XTrimoGeneConfig(name="tiny", enc_depth=2, enc_heads=2, enc_dim=32, enc_ff_mult=2, dec_depth=1,
                            dec_heads=2, dec_dim=32, dec_ff_mult=2, nb_features=16, **kw)


def counts_matrix(cells: int, seed: int = 0, lo: int = 200, hi: int = 1500) -> sp.csr_matrix:
    """``(cells, 19264)`` CSR float32 integer counts, ``lo`` to ``hi`` expressed genes per cell."""
    rng = np.random.default_rng(seed)
    indptr, indices, data = [0], [], []
    for _ in range(cells):
        n = int(rng.integers(lo, hi))
        indices.append(np.sort(rng.choice(N_GENES, size=n, replace=False)))
        data.append(rng.negative_binomial(2, 0.4, size=n).astype(np.float32) + 1)
        indptr.append(indptr[-1] + n)
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices).astype(np.int32), np.asarray(indptr)),
                         shape=(cells, N_GENES))


def log1p_rows(cells: int, seed: int = 0, **kw) -> sp.csr_matrix:
    C = counts_matrix(cells, seed, **kw)
    scale = np.repeat(1e4 / np.asarray(C.sum(1)).ravel(), np.diff(C.indptr))
    return sp.csr_matrix((np.log1p(C.data * scale).astype(np.float32), C.indices, C.indptr), shape=C.shape)


def synthetic_corpus(cells: int = 48, seed: int = 0):
    from scxtrimo.data._corpus import Corpus

    C = counts_matrix(cells, seed)
    split = np.zeros(cells, dtype=np.int8)
    split[-8:] = 1  # validation cells
    return Corpus(counts=C, total=np.asarray(C.sum(1), dtype=np.float64).ravel(), source=np.zeros(cells, np.int16),
                  sources=["synthetic"], label=np.full(cells, -1, np.int16), label_names=[], split=split,
                  obs_names=np.array([f"c{i}" for i in range(cells)]))


def counts_to_device(X: sp.csr_matrix, dev: torch.device) -> torch.Tensor:
    """scxtrimo's CSR -> dense counts on the device (``data._objective``; older trees: ``_train_corpus``, a pair)."""
    try:
        from scxtrimo.data._objective import counts_to_device as f
    except ImportError:
        from scxtrimo._train_corpus import counts_to_device as f
    out = f(X, dev)
    return out[0] if isinstance(out, tuple) else out


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ---- embedding -----------------------------------------------------------------------------
def test_embedding_bf16_on_gpu_matches_cpu_fp32(dev):
    """tl.embed's loop with the CUDA defaults (bf16 autocast, 262,144-token buckets) gives the
    bundled model's fp32 CPU embedding up to bf16 rounding."""
    from scxtrimo._inference import batch_cells, embed_matrix, token_budget
    from scxtrimo.models import load

    X = log1p_rows(40, lo=100, hi=2500) if dev.type == "cuda" else log1p_rows(10, lo=100, hi=800)
    rows = np.arange(X.shape[0])
    cpu = torch.device("cpu")
    model = load()  # the bundled default
    ref = embed_matrix(model, X, rows, "max", cpu, max_cells=batch_cells(cpu), max_tokens=token_budget(cpu))
    model = model.to(dev)
    got = embed_matrix(model, X, rows, "max", dev, max_cells=batch_cells(dev), max_tokens=token_budget(dev))
    assert got.dtype == np.float32 and got.shape == ref.shape and np.isfinite(got).all()
    assert cosine_rows(got, ref).min() > 0.995
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.05


def test_embedding_on_gpu_is_deterministic_and_independent_of_batching(dev):
    from scxtrimo._inference import embed_matrix

    torch.manual_seed(0)
    from scxtrimo.models import XTrimoGene

    model = XTrimoGene("xtrimo-10m").eval().to(dev)
    X = log1p_rows(64, seed=1, lo=50, hi=3000) if dev.type == "cuda" else log1p_rows(9, seed=1, lo=50, hi=400)
    rows = np.arange(X.shape[0])
    a = embed_matrix(model, X, rows, "max", dev, max_cells=256, max_tokens=262_144)
    b = embed_matrix(model, X, rows, "max", dev, max_cells=256, max_tokens=262_144)
    np.testing.assert_array_equal(a, b)
    one = embed_matrix(model, X, rows, "max", dev, max_cells=1, max_tokens=262_144)  # no padding at all
    assert cosine_rows(a, one).min() > 0.999
    sub = embed_matrix(model, X, rows[::3], "max", dev, max_cells=256, max_tokens=262_144)  # other batch mates
    assert cosine_rows(a[::3], sub).min() > 0.999


def test_grid_padded_gpu_batches_match_tight_ones(dev, monkeypatch):
    """CUDA pads batches to the width grid (bounded shapes for cuDNN's per-shape attention
    plans); the embeddings are those of tightly padded batches up to bf16 rounding."""
    import scxtrimo._inference as inference
    import scxtrimo.data._batching as batching
    from scxtrimo.models import XTrimoGene

    torch.manual_seed(0)
    model = XTrimoGene("xtrimo-10m").eval().to(dev)
    X = log1p_rows(48, seed=4, lo=50, hi=3000) if dev.type == "cuda" else log1p_rows(6, seed=4, lo=50, hi=400)
    rows = np.arange(X.shape[0])
    monkeypatch.setitem(batching.GRID_WIDTHS, dev.type, True)
    grid = inference.embed_matrix(model, X, rows, "max", dev, max_cells=256, max_tokens=262_144)
    monkeypatch.setitem(batching.GRID_WIDTHS, dev.type, False)
    tight = inference.embed_matrix(model, X, rows, "max", dev, max_cells=256, max_tokens=262_144)
    assert cosine_rows(grid, tight).min() > 0.999


def test_depth_token_pooling_all_on_gpu(dev):
    from scxtrimo._inference import embed_matrix
    from scxtrimo.data._depth import append_depth

    torch.manual_seed(0)
    from scxtrimo.models import XTrimoGene

    model = XTrimoGene(tiny_config(depth_tokens=True)).eval()
    X = log1p_rows(12, seed=2)
    X = append_depth(X, np.full(12, 4.0), np.full(12, 3.5))
    rows = np.arange(12)
    ref = embed_matrix(model, X, rows, "all", torch.device("cpu"), max_cells=1, max_tokens=4096)
    got = embed_matrix(model.to(dev), X, rows, "all", dev, max_cells=256, max_tokens=262_144)
    assert got.shape == (12, 4 * 32)
    assert cosine_rows(got, ref).min() > 0.99


@needs_cuda
def test_real_cuda_out_of_memory_halves_the_batch():
    """A genuine CUDA out-of-memory error (an allocation no GPU has: nothing is allocated) in a
    batch of more than two cells is recovered by halving; the memory is given back."""
    from scxtrimo._inference import apply_rows

    dev = torch.device("cuda")
    X = log1p_rows(8, seed=3)
    calls = []

    def fn(batch):
        calls.append(batch.genes.shape[0])
        if batch.genes.shape[0] > 2:
            torch.empty(1 << 46, dtype=torch.uint8, device=batch.genes.device)  # 64 TiB
        return (batch.values * batch.valid).sum(1, keepdim=True)

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = apply_rows(fn, X, np.arange(8), dev)
    np.testing.assert_allclose(out[:, 0], np.asarray(X.sum(1)).ravel(), rtol=1e-2)
    assert calls[0] == 8 and max(calls[1:]) <= 4 and sorted(calls)[:4] == [2, 2, 2, 2]
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before + (1 << 20)



@needs_cuda
def test_autocast_allows_tf32_only_inside_its_block():
    """bf16 autocast allows TF32 for the fp32 work inside it and restores the user's settings
    on exit, also after an error, so later fp32 work keeps its precision."""
    from scxtrimo._device import autocast

    dev = torch.device("cuda")
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with autocast(dev):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
            assert (torch.ones(4, 4, device=dev) @ torch.ones(4, 4, device=dev)).dtype == torch.bfloat16
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with pytest.raises(RuntimeError), autocast(dev):
            raise RuntimeError("inside")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@needs_cuda
def test_full_precision_turns_autocast_off_and_restores_it():
    """Inside full_precision() autocast computes in float32 without TF32 (a GPU embedding scored
    like a CPU one); outside, and after an error inside, bf16 autocast is back."""
    from scxtrimo._device import autocast, full_precision

    dev = torch.device("cuda")
    a = torch.randn(64, 64, device=dev)
    with full_precision():
        with autocast(dev):
            assert (a @ a).dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
            torch.testing.assert_close(a @ a, (a.double() @ a.double()).float(), rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError), full_precision():
        raise RuntimeError("inside")
    with autocast(dev):
        assert (a @ a).dtype == torch.bfloat16


# ---- training ------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder_zeros,depth_tokens", [(None, False), (64, True)])
def test_corpus_training_steps_on_gpu(dev, decoder_zeros, depth_tokens):
    """train_corpus (scripts/train_device.py's loop): bf16 autocast, fused AdamW, keyed thinning
    and masking on the device, the full-length or the sampled decoder; losses finite, weights move,
    FLOPs counted, MFU reported on a known GPU."""
    from scxtrimo._train_corpus import CorpusTrainConfig, peak_flops, train_corpus
    from scxtrimo.models import XTrimoGene

    torch.manual_seed(0)
    model = XTrimoGene(tiny_config(depth_tokens=depth_tokens))
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    cfg = CorpusTrainConfig(minutes=5.0, batch_size=8, max_steps=3, eval_every_s=1e9, eval_cells=8, warmup_steps=1,
                            decoder_zeros=decoder_zeros)
    res = train_corpus(model, synthetic_corpus(), cfg, device=dev, log=lambda m: None)
    tp, last = res["throughput"], res["history"][-1]
    assert tp["steps"] == 3 and tp["cells_seen"] == 24
    assert np.isfinite(last["train_mse"]) and np.isfinite(last["val_mse"]) and np.isfinite(last["val_thinned_mse"])
    assert tp["flops_per_cell"] > 0
    moved = max(float((v - before[k].to(v.device)).abs().max()) for k, v in model.state_dict().items() if k in before)
    assert moved > 0
    assert next(model.parameters()).device.type == dev.type
    if dev.type == "cuda" and peak_flops(dev) is not None:
        assert 0 < tp["mfu"] < 1


@needs_cuda
def test_keyed_thinning_and_masking_do_not_depend_on_the_device():
    """The training batch of a cell is a function of its key: the same on the GPU as on the CPU
    (what makes GPU runs reproduce CPU runs and data-parallel runs reproduce one process)."""
    from scxtrimo.data._depth import ThinningConfig
    from scxtrimo.data._masking import cell_keys
    from scxtrimo.data._objective import training_batch

    C = counts_matrix(16, seed=4)
    batches = {}
    for d in ("cpu", "cuda"):
        dev = torch.device(d)
        counts = counts_to_device(C, dev)
        np.testing.assert_array_equal(counts.cpu().numpy(), C.toarray())
        keys = cell_keys(7, 3, np.arange(16), device=dev)
        batches[d] = training_batch(counts, keys, thinning=ThinningConfig(p_thin=1.0, min_total=0), depth_tokens=True)
    a, b = batches["cpu"], batches["cuda"]
    for name in ("is_mask", "target"):
        assert torch.equal(getattr(a, name), getattr(b, name).cpu()), name
    torch.testing.assert_close(a.inputs, b.inputs.cpu(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.values, b.values.cpu(), rtol=1e-6, atol=1e-6)


def test_activation_checkpointing_gives_the_same_gradients_on_gpu(dev):
    from scxtrimo.tl import _distributed as D
    from scxtrimo._device import autocast
    from scxtrimo.data._masking import cell_keys, mask_values_keyed
    from scxtrimo.models import XTrimoGene

    torch.manual_seed(0)
    model = XTrimoGene(tiny_config()).to(dev).train()
    values = torch.from_numpy(log1p_rows(4, seed=5).toarray()).to(dev)
    mb = mask_values_keyed(values, keys=cell_keys(0, 0, np.arange(4), device=dev))

    def grads(checkpointing: bool):
        model.zero_grad(set_to_none=True)
        with D.activation_checkpointing(model, checkpointing), autocast(dev):
            pred = model(mb.inputs, mb.is_mask)
        torch.nn.functional.mse_loss(pred[mb.target].float(), mb.values[mb.target]).backward()
        return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for k in plain:  # bf16 backward kernels may accumulate in another order: compare norms
        err = float((ckpt[k].float() - plain[k].float()).norm() / plain[k].float().norm().clamp(min=1e-12))
        assert err < 1e-2, (k, err)


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two or more CUDA devices")
def test_ddp_and_fsdp_with_nccl_match_one_process(tmp_path):
    """benchmarks/device_ddp.py under torchrun: a DDP and an FSDP2 step across the GPUs (nccl)
    equal the same step in one process."""
    n = min(torch.cuda.device_count(), 4)
    out = tmp_path / "ddp.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           str(REPO / "benchmarks" / "device_ddp.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["backend"] == "nccl" and report["world_size"] == n
    assert report["ddp"]["ok"] and report["fsdp"]["ok"], report
