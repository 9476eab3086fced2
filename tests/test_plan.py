"""Tile, pair-group and budget plans at real sizes, in Python ints: every CUDA-only decision is a pure function of
sizes and device properties, checked here with H100, H200 and A100 properties (no device needed)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastpref.benchmark import BENCH_SHAPES, SHAPES
from fastpref.benchmark.cost_model import fast_groups
from fastpref.ops import plan
from fastpref.ops.plan import (
    MAX_GROUPS_DIRECT_DW,
    REFERENCE_DEVICES,
    GiB,
    MiB,
    memory_budget_for,
    plan_pair_groups,
    plan_tiles,
    preferred_group_rows,
    tile_bytes_for,
)


def test_plan_tiles_bounded_at_real_sizes():
    """Chunking at the benchmark sizes and beyond 2^31 elements: every tile within its byte budget, Python ints."""
    for n_rows, vocab, elem, budget in [
        (6144, 128256, 2, 256 * MiB),
        (24576, 152064, 2, 256 * MiB),
        (3_000_000, 262144, 2, 256 * MiB),  # n * V ~ 7.9e11 > 2^31
        (17, 128256, 4, 1 * MiB),
        (1, 10, 4, 1),  # degenerate budget: one row of at most COL_MULTIPLE columns
    ]:
        tiles = plan_tiles(n_rows, vocab, elem, budget)
        assert 1 <= tiles.rows <= n_rows and 1 <= tiles.cols <= vocab
        assert tiles.bytes(elem) <= max(budget, min(vocab, 256) * elem)


def _offsets(lengths):
    offs = [0]
    for n in lengths:
        offs.append(offs[-1] + n)
    return offs


def test_plan_pair_groups_respect_budget():
    offs = _offsets([700, 650, 20, 900, 880, 30, 10, 5])  # pair order: c0 r0 c1 r1 ...
    groups = plan_pair_groups(offs, 4, max_rows=2000, preferred_rows=2000)
    assert groups[0][0] == 0 and groups[-1][1] == 4
    assert all(a[1] == b[0] for a, b in itertools.pairwise(groups))
    assert all(offs[2 * e] - offs[2 * s] <= 2000 for s, e in groups)
    assert plan_pair_groups(offs, 4, max_rows=1700, preferred_rows=4096) is not None
    assert plan_pair_groups(offs, 4, max_rows=1779, preferred_rows=4096) is not None
    assert plan_pair_groups(offs, 4, max_rows=1000, preferred_rows=4096) is None  # pair 1 alone has 1780 tokens


def test_pair_groups_prefer_few_groups_within_the_budget():
    """Groups as large as the aim allows (not a fixed row count): one group where the budget and the aim fit the
    whole batch; more than MAX_GROUPS_DIRECT_DW groups only when the budget forces them."""
    offs = _offsets([768] * 8)  # llama3-8b-1k: 4 pairs x 2 sequences x 768 scored tokens
    assert plan_pair_groups(offs, 4, max_rows=8372, preferred_rows=6144) == [(0, 4)]
    offs = _offsets([1] * 40)  # 20 tiny pairs with a small aim: capped at MAX_GROUPS_DIRECT_DW groups
    assert len(plan_pair_groups(offs, 20, max_rows=100, preferred_rows=2)) == MAX_GROUPS_DIRECT_DW
    assert len(plan_pair_groups(offs, 20, max_rows=4, preferred_rows=2)) == 10  # the budget forces 10


def test_preferred_group_rows_bound_the_buffer_by_the_weight_gradient():
    assert preferred_group_rows(4096, 2, 2) == 6144  # 1.5 x H for bf16 logits and a bf16 weight
    assert preferred_group_rows(4096, 2, 4) == 12288  # an fp32 master weight's gradient is twice as large
    assert preferred_group_rows(64, 4, 4) == plan.MIN_GROUP_ROWS  # tiny models: at least the GEMM-rate floor


@pytest.mark.parametrize("device", sorted(REFERENCE_DEVICES))
@pytest.mark.parametrize("shape", BENCH_SHAPES)
def test_fast_mode_plan_at_benchmark_shapes(device, shape):
    """On H100 / H200 / A100 with most of their memory free (the default budget is then its 2 GiB cap), fast
    mode runs at every benchmark shape, in at most MAX_GROUPS_DIRECT_DW groups; llama3-8b-1k is one group."""
    info = REFERENCE_DEVICES[device]
    budget = memory_budget_for(info.total_memory // 2)
    assert budget == 2 * GiB
    assert tile_bytes_for(info) == plan.CUDA_TILE_BYTES
    groups = fast_groups(SHAPES[shape], memory_budget=budget)
    assert 1 <= len(groups) <= MAX_GROUPS_DIRECT_DW
    if shape == "llama3-8b-1k":
        assert groups == [(0, 4)]


def test_budget_counts_the_allocators_free_reserve():
    assert memory_budget_for(4 * GiB, 0) == 1 * GiB
    assert memory_budget_for(2 * GiB, 2 * GiB) == 1 * GiB  # reserved-but-unused cache memory is free for us
    assert memory_budget_for(100 * GiB, 0) == 2 * GiB
    assert memory_budget_for(None) == 2 * GiB


def test_default_budget_is_read_once_per_device(monkeypatch):
    """The budget must not drift from step to step: it is read once per device, then kept."""
    free = [8 * GiB]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * GiB)
    plan._device_budget.cache_clear()
    try:
        first = plan.default_memory_budget(torch.device("cuda", 0))
        free[0] = 1 * GiB  # a transient allocation elsewhere
        assert plan.default_memory_budget(torch.device("cuda", 0)) == first == 2 * GiB
        free[0] = 2 * GiB
        assert plan.default_memory_budget(torch.device("cuda", 1)) == (2 * GiB + 1 * GiB) // 4  # its own reading
    finally:
        plan._device_budget.cache_clear()
