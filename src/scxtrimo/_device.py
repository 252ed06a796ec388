"""Device choice and mixed precision: CUDA with bf16 autocast when present, else CPU fp32."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` if available else ``cpu``; anything else is checked and returned.

    Raises
    ------
    ValueError
        If CUDA is asked for but not available, or ``device`` is not a device name torch knows.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device torch knows; use 'auto', 'cpu', 'cuda' or 'cuda:<index>'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but this torch has no CUDA device; use device='cpu' or 'auto'.")
    return dev


#: Set inside :func:`full_precision`: :func:`autocast` is then a no-op on every device.
_FULL_PRECISION = False


@contextlib.contextmanager
def full_precision():
    """Within the block, :func:`autocast` does nothing on CUDA either, and TF32 matmuls are off:
    float32 throughout, as on the CPU. For comparisons across devices (a GPU run scored like a
    CPU one); the previous settings come back on exit."""
    global _FULL_PRECISION
    old = _FULL_PRECISION, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    _FULL_PRECISION = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        _FULL_PRECISION, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def autocast(device: torch.device):
    """bf16 autocast on CUDA (paper appendix 5: mixed precision); a no-op on CPU and inside
    :func:`full_precision`.

    On CUDA, TF32 matmuls and convolutions are allowed inside the block (the fp32 work autocast
    leaves, e.g. the loss) and the previous settings are restored on exit, so fp32 work
    elsewhere in the process keeps PyTorch's (or the user's) precision.
    """
    if device.type != "cuda" or _FULL_PRECISION:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
