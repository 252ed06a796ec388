"""Data-parallel training steps across the GPUs of one machine (nccl), against one process.

Every rank builds the same small model (seed 0) and the same global batch of synthetic cells
(keyed masking, the paper's full-length decoder), takes its shard and runs one SGD step wrapped
by ``scxtrimo.tl._distributed.wrap_model`` with ``strategy="ddp"`` and with ``"fsdp"`` (FSDP2
``fully_shard``, ZeRO-2 style); the full parameters after the step are compared with the same
step computed without any wrapper (the mean of the shards' losses) on every rank. fp32 and no
TF32, so the tolerance is tight. Rank 0 writes a JSON report.

    python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/device_ddp.py --out ddp.json
    python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/device_ddp.py --device cpu  # gloo smoke

``scxtrimo.tl._distributed`` needs torch only (``scxtrimo.tl`` imports its tools lazily), so
this runs on the GPU machine, which has no anndata.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a plain checkout, no install


def synthetic_values(cells: int, seed: int = 1) -> torch.Tensor:
    """``(cells, 19264)`` log1p-like values with 200-800 expressed genes per cell."""
    from scxtrimo import N_GENES

    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(cells, N_GENES)
    for i in range(cells):
        n = int(torch.randint(200, 800, (1,), generator=g))
        idx = torch.randperm(N_GENES, generator=g)[:n]
        out[i, idx] = torch.rand(n, generator=g) * 4 + 0.1
    return out


def shard_loss(model, values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    from scxtrimo.data._masking import mask_values_keyed

    mb = mask_values_keyed(values, keys=keys)
    pred = model(mb.inputs, mb.is_mask)
    return torch.nn.functional.mse_loss(pred[mb.target], mb.values[mb.target])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="JSON report (rank 0)")
    ap.add_argument("--cells-per-rank", type=int, default=2)
    ap.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"])
    args = ap.parse_args(argv)
    from scxtrimo.tl import _distributed as D
    from scxtrimo.models import XTrimoGene, XTrimoGeneConfig

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ctx, dev = D.init_distributed(args.device)
    if ctx.world_size < 2:
        raise SystemExit("run under torchrun with --nproc_per_node >= 2")
    import torch.distributed as dist

    cfg = XTrimoGeneConfig(name="ddp-check", enc_depth=2, enc_heads=2, enc_dim=64, enc_ff_mult=2,
                           dec_depth=2, dec_heads=2, dec_dim=64, dec_ff_mult=2, nb_features=32)
    torch.manual_seed(0)
    base = XTrimoGene(cfg).to(dev).train()
    w, b = ctx.world_size, args.cells_per_rank
    values = synthetic_values(w * b).to(dev)
    from scxtrimo.data._masking import cell_keys

    keys = cell_keys(0, 0, range(w * b), device=dev)
    mine = slice(ctx.rank * b, (ctx.rank + 1) * b)

    # the reference: no wrapper, the mean of every shard's loss, one SGD step (on every rank)
    ref = copy.deepcopy(base)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    sum(shard_loss(ref, values[r * b : (r + 1) * b], keys[r * b : (r + 1) * b]) for r in range(w)).div(w).backward()
    opt.step()
    want = D.full_model_state(ref, "ddp", D.DistContext())
    base_state = D.full_model_state(base, "ddp", D.DistContext())

    report = {"world_size": w, "backend": dist.get_backend(), "device": str(dev),
              "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if dev.type == "cuda" else [],
              "torch": torch.__version__}
    for strategy in args.strategies:
        t = time.perf_counter()
        try:
            model = copy.deepcopy(base)
            wrapped = D.wrap_model(model, strategy, ctx, dev)
            opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
            shard_loss(wrapped, values[mine], keys[mine]).backward()
            opt.step()
            got = D.full_model_state(model if strategy == "ddp" else wrapped, strategy, ctx, all_ranks=True)
            # float tensors: parameters and the Performer's projections (its integer call counter
            # differs: the reference ran one forward per shard)
            floats = [k for k in want if want[k].is_floating_point()]
            diff = max(float((got[k].float() - want[k].float()).abs().max()) for k in floats)
            moved = max(float((want[k].float() - base_state[k].float()).abs().max()) for k in floats)
            missing = sorted(set(want) ^ set(got))
            d = torch.tensor([diff], device=dev if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(d, op=dist.ReduceOp.MAX)
            report[strategy] = {"max_abs_diff": float(d), "step_size": moved,
                                "ok": bool(float(d) < 1e-5 and moved > 1e-4 and not missing),
                                "keys_differ": missing[:5], "seconds": time.perf_counter() - t}
        except Exception as e:  # reported, not raised: the other strategy still runs
            report[strategy] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}
        dist.barrier()
    if ctx.rank == 0:
        text = json.dumps(report, indent=1)
        print(text, flush=True)
        if args.out:
            Path(args.out).write_text(text + "\n")
    ok = all(report[s].get("ok") for s in args.strategies)
    ctx.shutdown()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
