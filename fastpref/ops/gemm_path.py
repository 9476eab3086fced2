"""Which GEMMs a pass over the head runs: cuBLAS tiles with the Triton row kernels over them (``"cublas"``), or
the Triton GEMMs of ``fastpref.kernels.fused_gemm`` with the fold in the forward's epilogue and the gradient in
the backward's prologue (``"fused"``: fewer passes over the logits, but Triton's GEMMs against cuBLAS's).

The default is ``"cublas"``, the proven path: no GPU run has yet measured the fused kernels, and the cost model
predicts them slower at the benchmark shapes (``bench/NOTES.md``). ``"fused"`` and ``"auto"`` are opt-in, by
the ``gemm=`` argument or, where the argument is left at None, by ``$FASTPREF_GEMM`` (``auto``, ``fused`` or
``cublas``); an argument always wins over the variable.

``gemm="auto"`` picks per (device, dtype, H, vocabulary bucket), once, by timing both paths on that device at
those sizes — the first pass pays the fused kernels' compile (seconds, cached on disk by Triton afterwards), a
few milliseconds of timing and ~0.6 GB of transient buffers at H = 4096 — and keeps the faster. Off CUDA (the
interpreter, the PyTorch backend) auto means cublas: there is nothing to time there; ``gemm="fused"`` forces the
fused kernels (the tests do, under ``TRITON_INTERPRET=1``). A fused kernel that does not compile or runs out of
resources on the device falls back to cublas with a warning, never an error: the key is marked unusable, the
pass reruns on cublas, and ``fallbacks()`` reports the key and the reason.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

GEMM_PATHS = ("auto", "fused", "cublas")
GEMM_ENV = "FASTPREF_GEMM"
DEFAULT_GEMM = "cublas"  # until a GPU run has measured the fused kernels

Key = tuple[str, int | None, torch.dtype, int, int]
_UNUSABLE: dict[Key, str] = {}
_CHOICE: dict[Key, str] = {}


def check_gemm(gemm: str | None, name: str = "gemm") -> str | None:
    """Validate a ``gemm=`` argument (``name``: what the caller calls it): None (the default) or one of
    ``GEMM_PATHS``."""
    if gemm is not None and gemm not in GEMM_PATHS:
        raise ValueError(f"{name}: expected one of {list(GEMM_PATHS)} or None (${GEMM_ENV}, else "
                         f"{DEFAULT_GEMM!r}), got {gemm!r}")
    return gemm


def requested(gemm: str | None) -> str:
    """The requested path: the argument; None: ``$FASTPREF_GEMM``, else ``DEFAULT_GEMM``."""
    value = check_gemm(gemm)
    if value is None:
        value = os.environ.get(GEMM_ENV) or DEFAULT_GEMM
        if value not in GEMM_PATHS:
            raise ValueError(f"{GEMM_ENV}: expected one of {list(GEMM_PATHS)}, got {value!r}")
    return value


def vocab_bucket(vocab: int) -> int:
    """Vocabulary sizes that time alike share a choice: rounded up to a power of two."""
    return 1 << max(vocab - 1, 0).bit_length()


def key_of(device: torch.device, dtype: torch.dtype, hidden: int, vocab: int) -> Key:
    return (device.type, device.index, dtype, hidden, vocab_bucket(vocab))


def resolve(gemm: str | None, backend: str, device: torch.device, dtype: torch.dtype, hidden: int,
            vocab: int) -> str:
    """``"fused"`` or ``"cublas"`` for a pass (see the module docstring)."""
    want = requested(gemm)
    if backend != "triton" or want == "cublas" or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return "cublas"
    key = key_of(device, dtype, hidden, vocab)
    if key in _UNUSABLE:
        return "cublas"
    if want == "fused":
        return "fused"
    if device.type != "cuda":
        return "cublas"
    if key not in _CHOICE:
        _CHOICE[key] = time_paths(device, dtype, hidden, vocab)
    return _CHOICE[key] if key not in _UNUSABLE else "cublas"


def usable(key: Key) -> bool:
    return key not in _UNUSABLE


@functools.cache
def fused_errors() -> tuple[type[BaseException], ...]:
    """What a fused kernel raises when it cannot run on a device (not a wrong result: those are bugs)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    return (OutOfResources, PTXASError, CompilationError)


def fallbacks() -> dict[Key, str]:
    """The keys ``(device type, index, compute dtype, H, vocabulary bucket)`` whose passes fell back from the fused
    kernels to cublas in this process, with the reason (``"OutOfResources: ..."``): a pass that asked for
    ``gemm="fused"`` (or whose auto choice was fused) ran on cublas exactly when its key is here."""
    return dict(_UNUSABLE)


def mark_unusable(key: Key, error: BaseException) -> None:
    """Remember that the fused kernels failed for ``key`` and say so once."""
    if key not in _UNUSABLE:
        _UNUSABLE[key] = f"{type(error).__name__}: {str(error)[:200]}"
        warnings.warn(f"fastpref: the fused GEMM kernels cannot run for {key} ({_UNUSABLE[key]}); falling back to "
                      "the cuBLAS + row-kernel path for these shapes", RuntimeWarning, stacklevel=3)


def with_fallback(key: Key, fused: Callable[[], Any], cublas: Callable[[], Any]) -> Any:
    """Run ``fused``; if its kernels cannot run here, mark ``key`` unusable and run ``cublas`` instead."""
    if not usable(key):
        return cublas()
    try:
        return fused()
    except fused_errors() as e:
        mark_unusable(key, e)
        return cublas()


def elapsed_ms(fn: Callable[[], None], device: torch.device) -> float:
    """Wall time of one call: CUDA events on a CUDA device, the host clock elsewhere (the interpreter tests)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_paths(device: torch.device, dtype: torch.dtype, hidden: int, vocab: int, *, rows: int = 4096,
               max_cols: int = 32768, repeats: int = 5) -> str:
    """Time one forward fold and one backward's gradient GEMMs of each path at (``rows``, this H, up to
    ``max_cols`` vocabulary columns) on ``device``; the faster path wins (ties: cublas). A fused kernel that
    cannot run marks the key unusable."""
    from ..kernels import fused_gemm, row_kernels
    from ..kernels.launch import device_guard
    from . import head_pass
    from .tile_ops import RowStats

    cols = min(vocab, max_cols)
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(rows, hidden, device=device, generator=gen).to(dtype)
    w = (torch.randn(cols, hidden, device=device, generator=gen) / hidden**0.5).to(dtype)
    targets = torch.randint(0, cols, (rows,), device=device, generator=gen)
    grad_rows = torch.full((rows,), 1e-3, device=device)
    zeros = torch.zeros(rows, device=device)  # the row max and log-sum-exp: any values time alike
    transform = dict(logit_scale=1.0, softcap=None, inv_temperature=1.0)
    tile = fused_gemm.logits_buffer(rows, cols, dtype, device)
    dh = torch.empty(rows, hidden, device=device, dtype=torch.float32)
    dw = torch.empty(cols, hidden, device=device, dtype=dtype)

    def cublas() -> None:
        s = RowStats.empty(rows, device)
        head_pass.project(tile, h, w, None)
        row_kernels.fold_logsumexp(tile, targets, s.row_max, s.row_sumexp, s.target_logit, s.logit_sum, None, None,
                                   vocab_start=0, **transform)
        row_kernels.logit_grad_(tile, targets, zeros, zeros, grad_rows, vocab_start=0, **transform)
        head_pass.accumulate_mm(dh, tile, w, first=True)
        head_pass.accumulate_mm(dw, tile.t(), h, first=True)

    def fused() -> None:
        s = RowStats.empty(rows, device)
        fused_gemm.linear_fold(h, w, None, targets, s.row_max, s.row_sumexp, s.target_logit, s.logit_sum, None,
                               None, vocab_start=0, logits_out=tile, **transform)
        fused_gemm.linear_grad_input(tile, targets, zeros, zeros, grad_rows, w, dh, vocab_start=0, accumulate=False,
                                     **transform)
        fused_gemm.linear_grad_weight(tile, targets, zeros, zeros, grad_rows, h, dw, vocab_start=0, accumulate=False,
                                      **transform)

    def median_ms(fn: Callable[[], None]) -> float:
        fn()  # compile / heuristics
        return statistics.median(elapsed_ms(fn, device) for _ in range(repeats))

    with device_guard(device):
        try:
            fused_ms = median_ms(fused)
        except fused_errors() as e:
            mark_unusable(key_of(device, dtype, hidden, vocab), e)
            return "cublas"
        return "fused" if fused_ms < median_ms(cublas) else "cublas"


__all__ = ["DEFAULT_GEMM", "GEMM_ENV", "GEMM_PATHS", "check_gemm", "elapsed_ms", "fallbacks", "fused_errors",
           "key_of", "mark_unusable", "requested", "resolve", "time_paths", "usable", "vocab_bucket",
           "with_fallback"]
