"""Data-parallel training helpers for :func:`scxtrimo.tl.pretrain` (paper appendix 5).

The paper trained with data parallelism across GPUs, gradient accumulation, ZeRO stage 2 and
activation checkpointing for the large models. Here: ``torch.distributed`` process groups
(``torchrun``), DDP, FSDP2 (``fully_shard`` with ``reshard_after_forward=False``: gradients
and optimizer state sharded, parameters gathered for forward and backward, the ZeRO-2
equivalent), and ``torch.utils.checkpoint`` on encoder blocks and decoder layers.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from .._device import resolve_device
from ..models._encoder import EncoderBlock

STRATEGIES = ("auto", "ddp", "fsdp")
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistContext:
    """Where this process stands: rank, world size, and whether we own the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.broadcast(t, src=0)
        return t

    def shutdown(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
            self.owned = False


def launched_by_torchrun() -> bool:
    """True when the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) is set."""
    return all(k in os.environ for k in _TORCHRUN_ENV)


def init_distributed(device: str | torch.device = "auto") -> tuple[DistContext, torch.device]:
    """Join (or start) the process group and pick this rank's device.

    * A process group that is already initialized is used as it is (and left open).
    * Under ``torchrun`` with ``WORLD_SIZE > 1`` a group is initialized here (backend ``nccl``
      on CUDA, ``gloo`` on CPU) and destroyed by :meth:`DistContext.shutdown`.
    * Otherwise: one process, no group.

    On CUDA each rank uses ``cuda:LOCAL_RANK``.

    Raises
    ------
    ValueError
        The group's backend is ``nccl`` but the device is the CPU.
    """
    dev = resolve_device(device)
    if dist.is_available() and dist.is_initialized():
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), owned=False)
    elif dist.is_available() and launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        local = int(os.environ.get("LOCAL_RANK", 0))
        if dev.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), local, owned=True)
    else:
        return DistContext(), dev
    if dev.type == "cuda":
        dev = torch.device("cuda", ctx.local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    elif ctx.world_size > 1 and dist.get_backend() == "nccl":
        ctx.shutdown()
        raise ValueError("The process group uses the nccl backend, which needs CUDA, but the device is the CPU; "
                         "use backend='gloo' for CPU training or device='cuda'.")
    return ctx, dev


def check_strategy(strategy: str) -> str:
    """Validate ``strategy``; returns it lower-cased."""
    s = str(strategy).lower()
    if s not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; choose one of {STRATEGIES}.")
    return s


def _decoder_layers(model) -> list:
    return [f for pair in model.decoder.performer.net.layers for f in pair]


def _checkpointed(fn):
    def forward(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    forward._scxtrimo_checkpointed = True
    return forward


@contextlib.contextmanager
def activation_checkpointing(model, enabled: bool = True):
    """Recompute encoder blocks and decoder layers in the backward pass instead of storing
    their activations (appendix 5: activation checkpointing for large models).

    Each :class:`~scxtrimo.models._encoder.EncoderBlock` and each attention / feed-forward
    sub-layer of the Performer decoder runs under :func:`torch.utils.checkpoint.checkpoint`
    (non-reentrant, RNG state preserved) while gradients are enabled. The parameters, their
    names and the results do not change; the overrides are removed on exit.
    """
    targets = (list(model.encoder.blocks) + _decoder_layers(model)) if enabled else []
    for m in targets:
        m.forward = _checkpointed(m.forward)
    try:
        yield model
    finally:
        for m in targets:
            m.__dict__.pop("forward", None)


def wrap_model(model, strategy: str, ctx: DistContext, device: torch.device):
    """Wrap ``model`` for data-parallel training; returns the module to call in training.

    ``"auto"`` and ``"ddp"``: :class:`~torch.nn.parallel.DistributedDataParallel`. ``"fsdp"``:
    FSDP2 ``fully_shard`` on every encoder block, every decoder sub-layer and the root, with
    ``reshard_after_forward=False`` (ZeRO stage 2: gradients and optimizer state sharded).
    With one process the model is returned as it is.

    Raises
    ------
    RuntimeError
        torch refuses FSDP on this device / backend (the message says so and suggests DDP).
    """
    if ctx.world_size == 1:
        return model
    if strategy in ("auto", "ddp"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    try:
        from torch.distributed.fsdp import fully_shard

        for m in [*model.modules()]:
            if isinstance(m, EncoderBlock):
                fully_shard(m, reshard_after_forward=False)
        for m in _decoder_layers(model):
            fully_shard(m, reshard_after_forward=False)
        fully_shard(model, reshard_after_forward=False)
    except Exception as err:  # torch versions / backends without FSDP2 support
        raise RuntimeError(
            f"strategy='fsdp' failed on device {device} with backend {dist.get_backend()}: {err}. "
            "FSDP is meant for CUDA (nccl); use strategy='ddp' here."
        ) from err
    return model


def grad_sync(wrapped, strategy: str, ctx: DistContext, sync: bool):
    """Context for one micro-batch: gradients are all-reduced only when ``sync`` is True."""
    if ctx.world_size == 1:
        return contextlib.nullcontext()
    if strategy == "fsdp":
        wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else wrapped.no_sync()


def is_sharded(strategy: str, ctx: DistContext) -> bool:
    return strategy == "fsdp" and ctx.world_size > 1


def full_model_state(model, strategy: str, ctx: DistContext, *, all_ranks: bool = False) -> dict:
    """The full (unsharded) ``state_dict`` on the CPU, aliases of performer-pytorch removed.

    Collective under FSDP (every rank must call it); there only rank 0 receives the tensors
    unless ``all_ranks``.
    """
    from ..models._io import _ALIAS

    if is_sharded(strategy, ctx):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks))
        sd = {k: v.detach().cpu() for k, v in sd.items()}
    else:
        sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {k: v for k, v in sd.items() if _ALIAS not in k}


def load_model_state(model, state: dict) -> None:
    """Load a full state (as from :func:`full_model_state`) into an unwrapped model, strictly
    apart from performer-pytorch's alias entries."""
    from ..models._io import _ALIAS

    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if _ALIAS not in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"The training state does not fit this model: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}.")


def full_optimizer_state(model, opt, strategy: str, ctx: DistContext) -> dict:
    """Optimizer state keyed by parameter name (portable across strategies and world sizes)."""
    if is_sharded(strategy, ctx):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = [n for n, _ in model.named_parameters()]
    sd = opt.state_dict()
    state = {names[i]: {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in s.items()}
             for i, s in sd["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model, opt, state: dict, strategy: str, ctx: DistContext) -> None:
    """Inverse of :func:`full_optimizer_state`."""
    if is_sharded(strategy, ctx):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
        return
    index = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    unknown = [n for n in state["state"] if n not in index]
    if unknown:
        raise ValueError(f"The saved optimizer state names parameters this model lacks: {unknown[:5]}.")
    sd = {
        "state": {index[n]: s for n, s in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    }
    opt.load_state_dict(sd)
