"""Peak-memory measurement: an allocation tracker for any device (the CPU has no allocator statistics) and the
CUDA allocator's own counters.

``AllocationTracker`` is a ``TorchDispatchMode`` that sees every aten op run inside it (autograd's backward
included: the engine carries the mode to its worker threads) and records the storages the op's outputs
created. A storage is new memory only if no input of the op shares it and it is not tracked already, so views,
reshapes, in-place and ``out=`` ops add nothing; its bytes are released when the storage dies (a weakref
callback on ``untyped_storage()``, which PyTorch keeps alive exactly as long as the C++ storage). The result is
the live/peak bytes of the tensors *created inside the scope* — inputs made before it are not counted, the
gradients it produces are — and the largest single allocation, which is what proves "no tensor of size
tokens x vocabulary".

What it cannot see: scratch memory a single native kernel allocates and frees internally (e.g. a matmul
workspace) never reaches the dispatcher, so the tracked peak is a lower bound of the allocator's; and ops that
bypass the dispatcher (``torch.from_numpy``) are invisible. ``torch.distributed._tools.mem_tracker.MemTracker``
also runs on the CPU, but it reports per-module categories, not the largest allocation or the op behind it.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

T = TypeVar("T")


@dataclass(frozen=True)
class Allocation:
    """One new storage seen by the tracker."""

    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    op: str


def _storage_key(storage: torch.UntypedStorage) -> int:
    # The C++ StorageImpl pointer: stable while the storage lives, shared by every view of it.
    return storage._cdata


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse / nested / functional wrappers have no plain storage
        return None


class AllocationTracker(TorchDispatchMode):
    """Live, peak and largest bytes of the tensors created inside the ``with`` block.

    Args:
        device: count only tensors on this device type (``"cpu"``, ``"cuda"``); None = every device but meta.
        record_min_bytes: keep an ``Allocation`` record (shape, dtype, op) of every new storage at least this
            large in ``allocations`` (None = keep none; the largest one is always kept).

    Attributes after (or during) the block: ``live_bytes``, ``peak_bytes``, ``largest`` (an ``Allocation`` or
    None), ``largest_bytes``, ``num_allocations``, ``total_allocated_bytes``, ``allocations``.

    Example::

        with AllocationTracker() as mem:
            loss = f(x); loss.backward()
        mem.peak_bytes, mem.largest_bytes
    """

    def __init__(self, device: str | torch.device | None = None, *, record_min_bytes: int | None = None) -> None:
        super().__init__()
        self.device_type = None if device is None else torch.device(device).type
        self.record_min_bytes = record_min_bytes
        self.live_bytes = 0
        self.peak_bytes = 0
        self.largest: Allocation | None = None
        self.num_allocations = 0
        self.total_allocated_bytes = 0
        self.allocations: list[Allocation] = []
        # key -> (bytes counted, weakref keeping the death callback alive)
        self._live: dict[int, tuple[int, weakref.ref]] = {}

    @property
    def largest_bytes(self) -> int:
        return 0 if self.largest is None else self.largest.nbytes

    def _counts(self, t: torch.Tensor) -> bool:
        if t.device.type == "meta":
            return False
        return self.device_type is None or t.device.type == self.device_type

    def _on_free(self, key: int, ref: weakref.ref) -> None:
        entry = self._live.get(key)
        if entry is not None and entry[1] is ref:
            del self._live[key]
            self.live_bytes -= entry[0]

    def _add(self, storage: torch.UntypedStorage, t: torch.Tensor, op: str) -> None:
        key = _storage_key(storage)
        nbytes = storage.nbytes()
        ref = weakref.ref(storage, lambda r, k=key: self._on_free(k, r))
        self._live[key] = (nbytes, ref)
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.num_allocations += 1
        self.total_allocated_bytes += nbytes
        record = None
        if nbytes > self.largest_bytes or (self.record_min_bytes is not None and nbytes >= self.record_min_bytes):
            record = Allocation(nbytes, tuple(t.shape), t.dtype, str(t.device), op)
        if record is not None and nbytes > self.largest_bytes:
            self.largest = record
        if record is not None and self.record_min_bytes is not None and nbytes >= self.record_min_bytes:
            self.allocations.append(record)

    def _resize(self, key: int, storage: torch.UntypedStorage) -> None:
        # A tracked storage grown in place (resize_, an out= tensor of the wrong size) holds more bytes now.
        counted, ref = self._live[key]
        nbytes = storage.nbytes()
        if nbytes != counted:
            self._live[key] = (nbytes, ref)
            self.live_bytes += nbytes - counted
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs: set[int] = set()
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                st = _storage(t)
                if st is not None:
                    inputs.add(_storage_key(st))
        op = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or not self._counts(t):
                continue
            st = _storage(t)
            if st is None:
                continue
            key = _storage_key(st)
            if key in self._live:
                self._resize(key, st)
            elif key not in inputs:  # a view / alias / in-place result of an input is not new memory
                self._add(st, t, op)
        return out

    def summary(self) -> str:
        big = self.largest
        where = "" if big is None else (
            f" (largest {big.nbytes / 2**20:.1f} MiB: {big.op} {list(big.shape)} {big.dtype})")
        return (f"peak {self.peak_bytes / 2**20:.1f} MiB, live {self.live_bytes / 2**20:.1f} MiB, "
                f"{self.num_allocations} allocations{where}")


def track_peak(fn: Callable[[], T], device: str | torch.device | None = None) -> tuple[T, AllocationTracker]:
    """Run ``fn()`` under an ``AllocationTracker``; returns (fn's result, the tracker). No ``gc.collect()`` first:
    garbage made before the call is not counted whenever it dies, and a full collection costs 0.2-1 s in a process
    that has imported transformers (``fastpref bench`` runs this once per implementation and task)."""
    with AllocationTracker(device) as tracker:
        result = fn()
    return result, tracker


# ---------------------------------------------------------------------------------------------------- CUDA


@contextmanager
def cuda_peak_scope(device: torch.device | int | None = None) -> Iterator[dict[str, int]]:
    """``max_memory_allocated`` during the block minus what was allocated when it started (the inputs).

    Empties the cache and resets the peak first (the benchmark's method, docs/benchmarks.md). Yields a dict
    filled on exit with ``peak_bytes`` (the increase over the start) and ``start_bytes``.
    """
    stats: dict[str, int] = {}
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    stats["start_bytes"] = start
    try:
        yield stats
    finally:
        torch.cuda.synchronize(device)
        stats["peak_bytes"] = torch.cuda.max_memory_allocated(device) - start


def peak_cuda_bytes(fn: Callable[[], Any], device: torch.device | int | None = None) -> tuple[Any, int]:
    """Run ``fn()``; returns (its result, peak CUDA bytes allocated above the level before the call)."""
    with cuda_peak_scope(device) as stats:
        result = fn()
    return result, stats["peak_bytes"]


def peak_bytes(fn: Callable[[], Any], device: torch.device | str, *,
               largest_on_cuda: bool = False) -> tuple[Any, int, int | None]:
    """Device-appropriate peak: (result, peak bytes above the level before the call, largest single allocation).

    CUDA uses the allocator's counters; the largest allocation there comes from an ``AllocationTracker`` run
    alongside only when ``largest_on_cuda`` (a dispatch mode makes ``torch.compile``d code re-trace, so it is off
    for benchmarks; None then). Elsewhere the ``AllocationTracker`` gives both.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not largest_on_cuda:
            with cuda_peak_scope(device) as stats:
                result = fn()
            return result, stats["peak_bytes"], None
        with AllocationTracker("cuda") as tracker, cuda_peak_scope(device) as stats:
            result = fn()
        return result, stats["peak_bytes"], tracker.largest_bytes
    result, tracker = track_peak(fn, device.type)
    return result, tracker.peak_bytes, tracker.largest_bytes


__all__ = ["Allocation", "AllocationTracker", "cuda_peak_scope", "peak_bytes", "peak_cuda_bytes", "track_peak"]
