"""Chunk sizes, pair groups and memory budgets: every buffer is bounded by a budget, never by tokens x vocabulary.

Pure functions of host integers (sizes, offsets, device properties), so every plan can be checked on the CPU at
real sizes.
"""

from __future__ import annotations

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


def default_tile_bytes(device: torch.device) -> int:
    return CUDA_TILE_BYTES if device.type == "cuda" else CPU_TILE_BYTES


def _available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_memory_budget(device: torch.device) -> int:
    """``memory_budget=None``: min(2 GiB, a quarter of the free device memory)."""
    free: int | None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = _available_host_bytes()
    return DEFAULT_BUDGET_CAP if free is None else min(DEFAULT_BUDGET_CAP, free // 4)


# Rows of logits a pair group aims for: enough for the GEMMs to run at full rate (M >= a few thousand), while
# the kept buffer (rows x V) stays well under the budget, so the fast path's peak is a fraction of a
# materialised batch's. A pair larger than this is a group of its own (up to the budget).
GROUP_ROWS = 4096


def plan_pair_groups(host_offsets: Sequence[int], num_pairs: int, max_rows: int,
                     preferred_rows: int = GROUP_ROWS) -> PairGroups | None:
    """Contiguous pair ranges with at most ``max_rows`` scored tokens each (None if one pair alone exceeds it),
    aiming at ``preferred_rows`` per group. ``host_offsets`` [2P + 1]: the scored tokens of sequence ``s`` (pair
    order: chosen 2i, rejected 2i + 1) are ``host_offsets[s]:host_offsets[s + 1]``.

    Host ints only: no device sync. Groups are balanced in tokens so the last one is not a sliver; a single pair
    larger than the aim is a group of its own.
    """
    offs = host_offsets
    pair_rows = [offs[2 * p + 2] - offs[2 * p] for p in range(num_pairs)]
    if any(r > max_rows for r in pair_rows):
        return None
    # Balanced groups of at most `target` rows (unless a single pair is larger), target <= max_rows.
    aim = max(1, min(max_rows, preferred_rows))
    target = -(-sum(pair_rows) // max(1, -(-sum(pair_rows) // aim)))
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
