"""Backend choice: Triton on CUDA, the exact chunked PyTorch path elsewhere; forced Triton on the CPU needs the
interpreter (``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Map ``"auto" | "triton" | "torch"`` (or ``$FASTPREF_BACKEND`` when ``backend`` is None/"auto") to the
    backend that runs: ``"triton"`` or ``"torch"``."""
    requested = backend if backend not in (None, "auto") else os.environ.get("FASTPREF_BACKEND", "auto") or "auto"
    if requested not in BACKENDS:
        source = "backend" if backend not in (None, "auto") else "FASTPREF_BACKEND"
        raise ValueError(f"{source}: expected one of {list(BACKENDS)}, got {requested!r}")
    if requested == "torch":
        return "torch"
    usable = triton_available() and (device.type == "cuda" or interpreter_enabled())
    if requested == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the `triton` package, which is not installed")
        if not usable:
            raise ValueError(f"backend='triton' needs a CUDA device or TRITON_INTERPRET=1 for {device.type} tensors; "
                             "use backend='torch' (or 'auto') there")
        return "triton"
    return "triton" if triton_available() and device.type == "cuda" else "torch"


def _autocast_available(device_type: str) -> bool:
    available = getattr(torch.amp, "is_autocast_available", None)
    return device_type in ("cpu", "cuda") if available is None else available(device_type)


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """TRL's rule: the autocast dtype when autocast is on for the hidden states' device, else their dtype."""
    device_type = hidden.device.type
    if _autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, enabled=False)`` where the device type has autocast (not ``meta``): the chunk
    loops cast explicitly, in the compute dtype chosen once at the boundary."""
    if _autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
