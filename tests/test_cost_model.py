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
