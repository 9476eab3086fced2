"""Tile and pair-group plans at real sizes, in Python ints (no device needed)."""

from __future__ import annotations

import itertools

from fastpref.ops.plan import GiB, MiB, plan_tiles


def test_plan_tiles_bounded_at_real_sizes():
    """Chunking at the benchmark sizes and beyond 2^31 elements: every tile within its byte budget, Python ints."""
    for n_rows, vocab, elem, budget in [
        (6144, 128256, 2, 256 * MiB),
        (24576, 152064, 2, 256 * MiB),
        (3_000_000, 262144, 2, 256 * MiB),  # n * V ~ 7.9e11 > 2^31
        (17, 128256, 4, 1 * MiB),
        (1, 10, 4, 1),  # degenerate budget: one row of at most COL_MULTIPLE columns
    ]:
        plan = plan_tiles(n_rows, vocab, elem, budget)
        assert 1 <= plan.rows <= n_rows and 1 <= plan.cols <= vocab
        assert plan.bytes(elem) <= max(budget, min(vocab, 256) * elem)


def test_plan_pair_groups_respect_budget():
    from fastpref.ops.plan import plan_pair_groups

    lengths = [700, 650, 20, 900, 880, 30, 10, 5]  # pair order: c0 r0 c1 r1 ...
    offs = [0]
    for n in lengths:
        offs.append(offs[-1] + n)
    groups = plan_pair_groups(offs, 4, max_rows=2000)
    assert groups[0][0] == 0 and groups[-1][1] == 4
    assert all(a[1] == b[0] for a, b in itertools.pairwise(groups))
    assert all(offs[2 * e] - offs[2 * s] <= 2000 for s, e in groups)
    assert plan_pair_groups(offs, 4, max_rows=1700) is not None
    assert plan_pair_groups(offs, 4, max_rows=1779) is not None
    assert plan_pair_groups(offs, 4, max_rows=1000) is None  # pair 1 alone has 1780 tokens
    # At llama3-8b-4k: 4 pairs x 2 x 3072 scored tokens in 2 GiB of bf16 logits at V = 128256.
    offs = [3072 * i for i in range(9)]
    groups = plan_pair_groups(offs, 4, max_rows=2 * GiB // (128256 * 2))
    assert len(groups) == 4
