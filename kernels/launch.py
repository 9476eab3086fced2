"""Every kernel launch goes through ``launch``: on the tensors' own CUDA device, and recordable.

- Device guard: Triton launches on the *current* CUDA device and its current stream. A model split across
  GPUs (``device_map="auto"``) hands us tensors on ``cuda:1`` while ``cuda:0`` is current; launching there
  would read another device's addresses. ``launch`` enters ``torch.cuda.device(<the tensors' device>)`` first.
- Recording: inside ``record_launches()`` a launch is recorded (kernel, argument kinds, meta-parameters) and
  not run, so the ahead-of-time compile test can collect the specialisations the launchers really produce at
  benchmark shapes — on ``meta`` tensors, without a GPU — and compile each one for sm_80 / sm_90
  (``fastpref.kernels.aot``).
- FLOP counting: a launcher passes ``flops=`` (the matmul FLOPs its kernel does, 2·M·N·K per GEMM) and
  ``count_flops()`` adds them up per kernel, the Triton twin of ``torch.utils.flop_counter.FlopCounterMode``
  (which sees only ATen ops), so a step's counted FLOPs are the same on either GEMM path.
- Interpreter compatibility: Triton < 3.9's interpreter converts a runtime scalar to a Python int with
  ``int(array_of_one)``, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python
  scalars"): every ``range(0, n, BLOCK)`` over a runtime bound fails. ``launch`` applies Triton 3.9's own fix
  (squeeze first) to those interpreters, once.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Grid = tuple[int, ...] | Callable[[dict[str, Any]], tuple[int, ...]]


@dataclass(frozen=True)
class TensorArg:
    """What a kernel's specialisation sees of a tensor argument: its dtype and 16-byte alignment."""

    dtype: torch.dtype
    aligned: bool

    def stand_in(self) -> torch.Tensor:
        """A small CPU tensor with the same dtype and alignment (for binding a signature ahead of time)."""
        storage = torch.empty(64, dtype=self.dtype)
        return storage if self.aligned else storage[1:]


@dataclass(frozen=True)
class LaunchRecord:
    """One launch as its kernel's specialisation sees it (tensors reduced to ``TensorArg``)."""

    kernel: Any  # the @triton.jit function (wrappers already applied to ``kwargs``)
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        return jit_function(self.kernel).__name__

    @classmethod
    def capture(cls, kernel: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> list[LaunchRecord]:
        """The launch's records: its ``triton.heuristics`` evaluated into the meta-parameters, and one record per
        config of a ``triton.autotune`` wrapper (each config is a binary the autotuner may pick)."""

        def reduce(a: Any) -> Any:
            if isinstance(a, torch.Tensor):
                return TensorArg(a.dtype, a.device.type == "meta" or a.data_ptr() % 16 == 0)
            return a

        variants = [dict(kwargs)]
        k = kernel
        while hasattr(k, "fn") and not hasattr(k, "params"):  # the interpreter's functions end in a plain one
            configs = getattr(k, "configs", None)  # triton.autotune
            if configs is not None:
                variants = [{**v, **c.all_kwargs()} for v in variants for c in configs]
            values = getattr(k, "values", None)  # triton.heuristics
            if values is not None:
                for v in variants:
                    named = {**dict(zip(k.arg_names, args)), **v}
                    v.update({key: heuristic(named) for key, heuristic in values.items()})
            k = k.fn
        reduced = tuple(reduce(a) for a in args)
        return [cls(k, reduced, tuple(sorted(v.items()))) for v in variants]

    def key(self) -> tuple[Any, ...]:
        """Equal for launches that compile to the same binary: integers enter only through Triton's
        specialisation (equal to 1, divisible by 16), floats not at all."""

        def kind(a: Any) -> Any:
            if isinstance(a, bool) or a is None or isinstance(a, TensorArg):
                return a
            if isinstance(a, int):
                return ("int", a == 1, a % 16 == 0, -(2**31) <= a < 2**31)
            if isinstance(a, float):
                return "float"
            return a

        return (self.name, tuple(kind(a) for a in self.args), self.kwargs)


_recorders: list[list[LaunchRecord]] = []


@contextlib.contextmanager
def record_launches() -> Iterator[list[LaunchRecord]]:
    """Inside the block, launches are recorded into the yielded list instead of running."""
    records: list[LaunchRecord] = []
    _recorders.append(records)
    try:
        yield records
    finally:
        _recorders.remove(records)


def jit_function(kernel: Any) -> Any:
    """The ``@triton.jit`` function under ``triton.heuristics`` / ``triton.autotune`` wrappers."""
    while hasattr(kernel, "fn") and not hasattr(kernel, "params"):
        kernel = kernel.fn
    return kernel


def launch_device(args: Sequence[Any]) -> torch.device | None:
    """The device of the first tensor argument (the one the launch must run on)."""
    return next((a.device for a in args if isinstance(a, torch.Tensor)), None)


def device_guard(device: torch.device | None) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` for a CUDA device (Triton launches on the current one), else a null context."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


_flop_counters: list[collections.Counter[str]] = []


@contextlib.contextmanager
def count_flops() -> Iterator[collections.Counter[str]]:
    """Inside the block, the matmul FLOPs of every launch that runs, by kernel name."""
    counter: collections.Counter[str] = collections.Counter()
    _flop_counters.append(counter)
    try:
        yield counter
    finally:
        _flop_counters.remove(counter)


def launch(kernel: Any, grid: Grid, *args: Any, flops: int = 0, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)`` on the device of its tensors (or recorded, see ``record_launches``);
    ``flops``: the matmul FLOPs it does, for ``count_flops``."""
    if _recorders:
        _recorders[-1].extend(LaunchRecord.capture(kernel, args, kwargs))
        return
    for counter in _flop_counters:
        counter[jit_function(kernel).__name__] += flops
    if interpreter_enabled():
        _fix_interpreter_scalars()
    with device_guard(launch_device(args)):
        kernel[grid](*args, **kwargs)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _fix_interpreter_scalars() -> None:
    import numpy as np
    import triton
    from packaging.version import Version

    if Version(Version(triton.__version__).base_version) >= Version("3.9") or Version(np.__version__) < Version(
            "2.4"):
        return
    from triton.runtime import interpreter

    patch_lang = interpreter._patch_lang

    @functools.wraps(patch_lang)
    def patched(fn: Any) -> Any:
        scope = patch_lang(fn)
        # Triton 3.9's definition: the scalar is a one-element array; squeeze it to 0-d first.
        scope.set_attr(interpreter.tl.core.tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
        return scope

    interpreter._patch_lang = patched
