"""pytest-benchmark suite for fastpref's micro-level ops (runs on the CPU; on CUDA too, Triton row kernels included).

Not part of the default ``pytest`` run (which collects ``tests/`` only). Run it with::

    python -m pytest bench --benchmark-only                          # all, default sizes
    python -m pytest bench --benchmark-only -k "fold or grad_"        # the row ops only
    python -m pytest bench --benchmark-only --benchmark-save=cpu      # keep a baseline (.benchmarks/)

Sizes are small enough that every case takes milliseconds on 2 CPU cores: the point is relative cost between
the pieces (matmul vs row ops vs layout) and regressions, not absolute speed — ``fastpref bench`` measures the
whole DPO step side by side. Inputs come from ``fastpref.benchmark.make_workload`` (the benchmark's regimes,
``docs/benchmarks.md``).
"""

from __future__ import annotations

import pytest
import torch

import fastpref
from fastpref import reference
from fastpref.benchmark import Shape, make_workload
from fastpref.ops import HeadPass, LogitTransform, RowStats, build_layout, flat_rows, head_pass, segment_sum
from fastpref.ops.tile_ops import LogSumExp, row_ops

pytest.importorskip("pytest_benchmark")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"] if DEVICE == "cuda" else ["torch"]
# 2 pairs x 128 tokens (192 scored), H 256, V 8192: tens of milliseconds per op on 2 cores.
SHAPE = Shape("bench-ops", 2, 128, 256, 8192)
TILE = (192, 2048)  # one logits tile: scored rows x one vocabulary slab


@pytest.fixture(scope="module", params=["uniform", "peaked"])
def workload(request):
    return make_workload(SHAPE, request.param, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32,
                         device=DEVICE)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _cfg(w, backend: str) -> HeadPass:
    return HeadPass.for_inputs(w.hidden, w.weight, backend=backend, transform=LogitTransform())


def _rows(w):
    """(layout, the scored rows [n, H], their targets [n])."""
    layout = build_layout(w.labels.reshape(-1), ignore_index=-100, vocab_size=SHAPE.vocab)
    rows = flat_rows(w.hidden.detach()).index_select(0, layout.index)
    return layout, rows, layout.targets


@pytest.mark.benchmark(group="layout")
def test_build_layout(benchmark, workload):
    flat = workload.labels.reshape(-1)
    benchmark(lambda: build_layout(flat, ignore_index=-100, vocab_size=SHAPE.vocab))


@pytest.mark.benchmark(group="layout")
def test_segment_sum(benchmark, workload):
    values = torch.randn(SHAPE.scored_tokens(), device=DEVICE)
    offsets = torch.tensor([0, 96, 192, 288, SHAPE.scored_tokens()], device=DEVICE)
    benchmark(lambda: segment_sum(values, offsets))


@pytest.mark.benchmark(group="row-ops")
@pytest.mark.parametrize("backend", BACKENDS)
def test_fold(benchmark, workload, backend):
    """Online log-sum-exp fold of one tile (the forward's row work)."""
    ops = row_ops(backend)
    _, rows, targets = _rows(workload)
    tile = (rows @ workload.weight.detach()[: TILE[1]].t()).contiguous()

    def run():
        stats = RowStats.empty(tile.shape[0], tile.device)
        ops.fold(tile, targets, stats, 0, LogitTransform())
        _sync()

    benchmark(run)


@pytest.mark.benchmark(group="row-ops")
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_(benchmark, workload, backend):
    """In-place logits -> c * (onehot - softmax) of one tile (the backward's row work)."""
    ops = row_ops(backend)
    _, rows, targets = _rows(workload)
    logits = (rows @ workload.weight.detach()[: TILE[1]].t()).contiguous()
    lse = LogSumExp(torch.zeros(rows.shape[0], device=DEVICE), torch.logsumexp(logits.float(), -1))
    grad_rows = torch.ones(rows.shape[0], device=DEVICE)
    tile = torch.empty_like(logits)

    def run():
        tile.copy_(logits)
        ops.grad_(tile, targets, lse, grad_rows, 0, LogitTransform())
        _sync()

    benchmark(run)


@pytest.mark.benchmark(group="matmul")
def test_tile_matmul(benchmark, workload):
    """The cuBLAS / oneDNN matmul of one tile, for scale against the row ops."""
    _, rows, _ = _rows(workload)
    w = workload.weight.detach()[: TILE[1]]
    out = torch.empty(rows.shape[0], TILE[1], device=DEVICE, dtype=rows.dtype)
    benchmark(lambda: (torch.mm(rows, w.t(), out=out), _sync()))


@pytest.mark.benchmark(group="head")
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_stats(benchmark, workload, backend):
    """Chunked forward over the whole vocabulary: 2·n·H·V FLOPs plus the folds."""
    cfg = _cfg(workload, backend)
    layout, _, targets = _rows(workload)
    source, weight = flat_rows(workload.hidden.detach()), workload.weight.detach()
    benchmark(lambda: (head_pass.forward_stats(source, layout.index, weight, None, targets, cfg), _sync()))


@pytest.mark.benchmark(group="head")
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_recompute(benchmark, workload, backend):
    """Lean backward: recompute + grad row op + the two gradient matmuls (6·n·H·V FLOPs)."""
    cfg = _cfg(workload, backend)
    layout, _, targets = _rows(workload)
    source, weight = flat_rows(workload.hidden.detach()), workload.weight.detach()
    lse = head_pass.forward_stats(source, layout.index, weight, None, targets, cfg).lse()
    grad_rows = torch.ones(targets.shape[0], device=DEVICE)
    benchmark(lambda: (head_pass.backward(source, layout.index, weight, None, targets, lse, grad_rows, cfg,
                                          need_hidden=True, need_weight=True, need_bias=False), _sync()))


@pytest.mark.benchmark(group="sequence_logps")
@pytest.mark.parametrize("impl", ["fastpref", "reference"])
def test_sequence_logps_forward(benchmark, workload, impl):
    fn = fastpref.sequence_logps if impl == "fastpref" else reference.sequence_logps

    def run():
        with torch.no_grad():
            fn(workload.hidden, workload.weight, workload.labels)
        _sync()

    benchmark(run)


@pytest.mark.benchmark(group="sequence_logps")
@pytest.mark.parametrize("impl", ["fastpref", "reference"])
def test_sequence_logps_forward_backward(benchmark, workload, impl):
    fn = fastpref.sequence_logps if impl == "fastpref" else reference.sequence_logps

    def run():
        workload.zero_grad()
        fn(workload.hidden, workload.weight, workload.labels).sum().backward()
        _sync()

    benchmark(run)
    workload.zero_grad()


@pytest.mark.benchmark(group="dpo-step")
@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_dpo_step(benchmark, workload, mode):
    """The whole fused DPO step (policy fwd+bwd, reference forward, loss) at the micro size."""
    loss_fn = fastpref.DPOLoss(beta=0.1, mode=mode)

    def run():
        workload.zero_grad()
        loss_fn(workload.hidden, workload.weight, workload.labels, ref_hidden=workload.ref_hidden).loss.backward()
        _sync()

    benchmark(run)
    workload.zero_grad()
