"""Matmul FLOPs counted with ``FlopCounterMode`` (ATen matmuls) plus ``count_flops`` (the fused path's Triton
GEMMs): the core ops, the DPO step in each mode, forward-only scoring — equal on both GEMM paths — and the cost
model's FLOPs against the counted FLOPs of the code it models."""

from __future__ import annotations

import pytest
import torch
from fastpref.kernels.launch import count_flops
from torch.utils.flop_counter import FlopCounterMode

import fastpref
from tests.helpers import HAS_TRITON, PATH_IDS, PATHS, make_labels


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter, count_flops() as triton_flops:
        fn()
    return counter.get_total_flops() + sum(triton_flops.values())


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_core_op_flops(backend, gemm, with_bias):
    """Forward 2·n·H·V, forward + backward 8·n·H·V (recompute), for n scored tokens: ignored ones cost nothing."""
    batch, seq_len, hidden_size, vocab = 4, 24, 16, 300
    hidden = torch.randn(batch, seq_len, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    bias = torch.randn(vocab, requires_grad=True) if with_bias else None
    labels = make_labels(batch, seq_len, vocab, prompt_frac=0.5)
    n = int((labels != -100).sum())
    assert n < batch * seq_len
    unit = n * hidden_size * vocab

    def forward():
        with torch.no_grad():
            fastpref.sequence_logps(hidden, weight, labels, bias=bias, backend=backend, gemm=gemm)

    def step():
        fastpref.sequence_logps(hidden, weight, labels, bias=bias, backend=backend, gemm=gemm).sum().backward()

    assert _count(forward) == 2 * unit
    assert _count(step) == 8 * unit


def _dpo_batch(pairs=3, seq_len=20, hidden_size=16, vocab=400):
    hidden = torch.randn(2 * pairs, seq_len, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    labels = make_labels(2 * pairs, seq_len, vocab)
    ref_hidden = hidden.detach() + 0.1 * torch.randn(hidden.shape)
    return hidden, weight, labels, ref_hidden, int((labels != -100).sum()) * hidden_size * vocab


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize(("mode", "policy_units"), [("fast", 6), ("lean", 8)])
@pytest.mark.parametrize("reference", ["live", "precomputed"])
def test_dpo_step_flops(backend, gemm, mode, policy_units, reference):
    """Full DPO step: fast 6·n·H·V (policy) + 2·n·H·V (reference), lean 8 + 2; a precomputed reference costs 0."""
    hidden, weight, labels, ref_hidden, unit = _dpo_batch()
    if reference == "live":
        kwargs, ref_units = {"ref_hidden": ref_hidden}, 2
    else:
        kwargs, ref_units = {"ref_logps": torch.randn(hidden.shape[0])}, 0
    loss_fn = fastpref.DPOLoss(mode=mode, backend=backend, gemm=gemm)

    def step():
        out = loss_fn(hidden, weight, labels, **kwargs)
        assert out.mode == mode
        out.loss.backward()

    assert _count(step) == (policy_units + ref_units) * unit


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
def test_forward_only_flops(backend, gemm):
    """Evaluation / reference log-probs: 2·n·H·V for the policy under no-grad, whatever the mode."""
    hidden, weight, labels, _, unit = _dpo_batch()
    for mode in ("auto", "fast", "lean"):
        def forward(mode=mode):
            with torch.no_grad():
                out = fastpref.DPOLoss(mode=mode, backend=backend, gemm=gemm)(hidden, weight, labels,
                                                                              torch.zeros(6))
            assert out.mode == "forward"

        assert _count(forward) == 2 * unit


FUSED = pytest.mark.skipif(not HAS_TRITON, reason="the fused path's GEMMs are Triton kernels (interpreter here)")


@pytest.mark.parametrize("path", ["fastpref-fast", "fastpref-lean", "fastpref-logps", "reference",
                                  *(pytest.param(p, marks=FUSED) for p in
                                    ("fastpref-fast-fused", "fastpref-lean-fused", "fastpref-logps-fused"))])
def test_cost_model_flops_are_the_counted_flops(path):
    """The cost model's matmul FLOPs for a path are what the code it models runs (counted), at a small shape;
    on the fused paths also the split between cuBLAS (ATen) and Triton GEMMs."""
    from fastpref.benchmark import FastprefImpl, ReferenceImpl, Shape, cost_model, make_workload

    shape = Shape("cost-model", 2, 40, 32, 500)
    w = make_workload(shape, "uniform", dtype=torch.float32)
    mode = "lean" if path.startswith("fastpref-lean") else "fast"
    fused = path.endswith("-fused")
    impl = ReferenceImpl() if path == "reference" else FastprefImpl(
        mode, backend="triton" if fused else "auto", gemm="fused" if fused else "auto")

    def run():
        if path.startswith("fastpref-logps"):
            impl.logps(w)
        else:
            impl.step(w).loss.backward()

    with FlopCounterMode(display=False) as aten, count_flops() as triton_flops:
        run()
    model = cost_model(shape, path)
    assert aten.get_total_flops() + sum(triton_flops.values()) == model.flops
    assert sum(triton_flops.values()) == model.triton_flops
    w.zero_grad()
