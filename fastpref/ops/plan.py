"""Chunk sizes, pair groups and memory budgets: every buffer is bounded by a budget, never by tokens x vocabulary.

Pure functions of host integers (sizes, offsets, device properties), so every plan can be checked on the CPU at
real sizes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Contiguous pair ranges [start, end) of the fast path, in pair order.
PairGroups = list[tuple[int, int]]

GiB = 1 << 30
MiB = 1 << 20

# Default working-set bound of one logits tile. On CUDA, half TRL's 4096 x 32768 bf16 tile: the GEMMs stay large
# (M = min(n, 8192), N >= 8192 at H = 4096) and lean mode's peak stays near the gradients' own size (each
# halving costs one more fp32 read-modify-write of the dH accumulator per extra slab, see bench/NOTES.md); on
# the CPU a smaller tile keeps the fp32 temporaries of the torch row ops in cache.
CUDA_TILE_BYTES = 128 * MiB
CPU_TILE_BYTES = 16 * MiB
# Rows per tile: more rows amortise the weight slab's reads, fewer keep the fp32 accumulators of one slab small.
MAX_TILE_ROWS = 8192
# Columns per tile are a multiple of this (whole Triton blocks), unless the vocabulary is smaller.
COL_MULTIPLE = 256
DEFAULT_BUDGET_CAP = 2 * GiB


@dataclass(frozen=True)
class TilePlan:
    rows: int
    cols: int

    def bytes(self, elem_bytes: int) -> int:
        return self.rows * self.cols * elem_bytes


def plan_tiles(n_rows: int, vocab: int, elem_bytes: int, tile_bytes: int, max_rows: int = MAX_TILE_ROWS) -> TilePlan:
    """Pick a ``[rows, cols]`` tile with ``rows * cols * elem_bytes <= tile_bytes`` (when the budget allows one
    row of ``COL_MULTIPLE`` columns). Python ints throughout, so no 32-bit overflow at any size."""
    if n_rows <= 0 or vocab <= 0:
        return TilePlan(rows=max(n_rows, 0), cols=max(vocab, 0))
    budget_elems = max(tile_bytes // elem_bytes, min(vocab, COL_MULTIPLE))
    rows = min(n_rows, max_rows)
    cols = min(vocab, max(1, budget_elems // rows))
    if cols < vocab:
        cols = max(COL_MULTIPLE, cols - cols % COL_MULTIPLE)
        cols = min(cols, vocab)
    rows = max(1, min(rows, budget_elems // cols))
    return TilePlan(rows=rows, cols=cols)


@dataclass(frozen=True)
class DeviceInfo:
    """What the plans read of a device: plain data, so every device-dependent decision is a pure function that
    can be checked on the CPU with another device's properties (``REFERENCE_DEVICES``)."""

    type: str  # "cuda", "cpu", ...
    name: str = ""
    total_memory: int = 0  # bytes
    capability: tuple[int, int] | None = None
    multiprocessors: int = 0

    @classmethod
    def of(cls, device: torch.device) -> DeviceInfo:
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            return cls("cuda", props.name, int(props.total_memory), (props.major, props.minor),
                       int(props.multi_processor_count))
        return cls(device.type, device.type, _available_host_bytes() or 0)


# The GPUs the plans are checked against on the CPU (tests/test_plan.py) and the cost model's H100.
REFERENCE_DEVICES: dict[str, DeviceInfo] = {
    "H100": DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", 85_029_158_912, (9, 0), 132),
    "H200": DeviceInfo("cuda", "NVIDIA H200", 150_058_434_560, (9, 0), 132),
    "A100": DeviceInfo("cuda", "NVIDIA A100-SXM4-80GB", 85_094_825_984, (8, 0), 108),
}


def tile_bytes_for(info: DeviceInfo) -> int:
    """Working-set bound of one logits tile on a device (see ``CUDA_TILE_BYTES``)."""
    return CUDA_TILE_BYTES if info.type == "cuda" else CPU_TILE_BYTES


def default_tile_bytes(device: torch.device) -> int:
    return tile_bytes_for(DeviceInfo(device.type))


def _available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_budget_for(free_bytes: int | None, cached_free_bytes: int = 0) -> int:
    """``memory_budget=None``: min(2 GiB, a quarter of the free memory), where free memory counts what the
    device reports free plus what PyTorch's caching allocator holds reserved but unused (``cached_free_bytes``:
    free for our tensors too, and invisible to ``mem_get_info``)."""
    if free_bytes is None:
        return DEFAULT_BUDGET_CAP
    return min(DEFAULT_BUDGET_CAP, (free_bytes + max(cached_free_bytes, 0)) // 4)


@functools.cache
def _device_budget(device_type: str, index: int | None) -> int:
    if device_type == "cuda":
        device = torch.device("cuda", index)
        free, _ = torch.cuda.mem_get_info(device)
        cached_free = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return memory_budget_for(free, cached_free)
    return memory_budget_for(_available_host_bytes())


def default_memory_budget(device: torch.device) -> int:
    """The default budget of ``device``, read once per device and then kept: re-reading free memory on every call
    would let the group plan, the path and the summation order drift from step to step (and auto mode fall to
    lean while another allocation is momentarily live)."""
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return _device_budget(device.type, index)


# Pair groups of the fast path. The kept logits buffer (group rows x V) is bounded by the budget and by
# GROUP_TO_WEIGHT_GRAD x the weight gradient's own size: fast mode's peak is about buffer + dW, so this keeps it
# near 2.5 x dW, under TRL's fp32-accumulator peak (about 3.4 x dW at the benchmark shapes). Both scale with V,
# so the cap is GROUP_TO_WEIGHT_GRAD x H rows for bf16 logits and weight: 6144 at H = 4096, where
# llama3-8b-1k's 6144 scored rows make one group. Groups are never smaller than MIN_GROUP_ROWS (the GEMMs need
# a few thousand rows to run at full rate) unless the budget says so, and the plan prefers at most
# MAX_GROUPS_DIRECT_DW groups: each adds one rounding of dW in its own dtype; beyond that dW accumulates in fp32.
GROUP_TO_WEIGHT_GRAD = 1.5
MIN_GROUP_ROWS = 2048
MAX_GROUPS_DIRECT_DW = 4


def preferred_group_rows(hidden: int, logits_elem: int, weight_grad_elem: int) -> int:
    """Rows a pair group aims for: ``GROUP_TO_WEIGHT_GRAD`` x the weight gradient's bytes in rows of logits (V
    cancels), at least ``MIN_GROUP_ROWS``."""
    return max(MIN_GROUP_ROWS, int(GROUP_TO_WEIGHT_GRAD * hidden * weight_grad_elem / max(logits_elem, 1)))


def plan_pair_groups(host_offsets: Sequence[int], num_pairs: int, max_rows: int, preferred_rows: int,
                     max_groups: int = MAX_GROUPS_DIRECT_DW) -> PairGroups | None:
    """Contiguous pair ranges with at most ``max_rows`` scored tokens each (None if one pair alone exceeds it),
    aiming at ``preferred_rows`` per group, or at bigger groups (up to ``max_rows``) when the aim would make more
    than ``max_groups``. ``host_offsets`` [2P + 1]: the scored tokens of sequence ``s`` (pair order: chosen 2i,
    rejected 2i + 1) are ``host_offsets[s]:host_offsets[s + 1]``.

    Host ints only: no device sync. Groups are balanced in tokens so the last one is not a sliver; a single pair
    larger than the aim is a group of its own.
    """
    offs = host_offsets
    pair_rows = [offs[2 * p + 2] - offs[2 * p] for p in range(num_pairs)]
    if any(r > max_rows for r in pair_rows):
        return None
    total = sum(pair_rows)
    count = -(-total // max(1, min(max_rows, preferred_rows)))
    if count > max_groups:  # fewer, bigger groups within the budget rather than more roundings of dW
        count = max(max_groups, -(-total // max(1, max_rows)))
    target = -(-total // max(1, count))
    groups: PairGroups = []
    start, rows = 0, 0
    for p, r in enumerate(pair_rows):
        if p > start and rows + r > target:
            groups.append((start, p))
            start, rows = p, 0
        rows += r
    if num_pairs:
        groups.append((start, num_pairs))
    return groups
