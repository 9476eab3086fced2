"""The byte-and-FLOP model of ``bench/NOTES.md`` (``fastpref.benchmark.cost_model``): calibrated against the
peers' measured H100 memory (docs/benchmarks.md), and built from the same plans the code runs."""

from __future__ import annotations

import pytest

from fastpref.benchmark import BENCH_SHAPES, SHAPES, cost_model

# The peers' measured peak memory (GiB) on one H100, docs/benchmarks.md: (materialised torch, TRL 1.16).
MEASURED_PEAKS = {"llama3-8b-1k": (11.74, 3.37), "llama3-8b-4k": (46.97, 3.94), "qwen2.5-7b-2k": (27.84, 3.63),
                  "small-1k": (5.86, 0.80)}


@pytest.mark.parametrize("name", BENCH_SHAPES)
def test_peer_memory_model_is_calibrated(name):
    """The model's peak memory of the materialised reference and of TRL lands within 15 % of their measured
    peaks: the model's byte accounting is what the fastpref predictions rest on."""
    ref_gib, trl_gib = MEASURED_PEAKS[name]
    for path, measured in (("reference", ref_gib), ("trl", trl_gib)):
        model = cost_model(SHAPES[name], path).peak_bytes / 2**30
        assert abs(model / measured - 1) < 0.15, (name, path, model, measured)


@pytest.mark.parametrize("task", ["kto", "sft", "grpo"])
def test_task_model_counts_the_flops_each_row_runs(task):
    """The other trainers' model (``task_cost``) and the benchmark rows count the same matmul FLOPs for every
    path: fast 6·n·H·V for the policy, lean and TRL's chunked head 8 (recompute), +2 for KTO's reference; the
    materialised reference and Liger on every position, Liger's GRPO at 8 of which 4 in fp32 GEMMs."""
    import torch

    from fastpref.benchmark import make_workload
    from fastpref.benchmark.cost_model import TASK_COST_PATHS, task_cost
    from fastpref.benchmark.tasks import task_implementations

    shape = SHAPES["tiny"]
    w = make_workload(shape, "uniform", dtype=torch.float32)
    impls = {i.name: i for i in task_implementations(task)}
    n, N = shape.scored_tokens(), shape.batch * shape.seq_len
    unit, all_positions = n * shape.hidden * shape.vocab, N * shape.hidden * shape.vocab
    ref = 2 * (task == "kto")
    expected = {"fastpref-fast": (6 + ref) * unit, "fastpref-lean": (8 + ref) * unit, "trl": (8 + ref) * unit,
                "reference": (6 + ref) * all_positions,
                "liger": (8 if task == "grpo" else 6 + ref) * all_positions}
    for path in TASK_COST_PATHS[task]:
        cost = task_cost(shape, task, path)
        assert cost.flops == expected[path] == impls[path].step_flops(w), (task, path)
    assert task_cost(shape, task, "liger").fp32_flops == (4 * all_positions if task == "grpo" else 0)
