"""Device choice and mixed precision: CUDA with bf16 autocast when present, else CPU fp32."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` if available else ``cpu``; anything else is checked and returned.

    Raises
    ------
    ValueError
        If CUDA is asked for but not available.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but this torch has no CUDA device; use device='cpu' or 'auto'.")
    return dev


def autocast(device: torch.device):
    """bf16 autocast on CUDA (paper appendix 5: mixed precision); a no-op on CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
