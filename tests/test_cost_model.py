"""Performance you can verify without a GPU: matmul FLOPs counted by FlopCounterMode, chunk arithmetic at
real sizes in Python ints, and int64 offsets in the kernels."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastpref
from fastpref.ops.plan import GiB, MiB, plan_tiles
from tests.helpers import BACKENDS, HAS_CUDA, HAS_TRITON, make_labels


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_core_op_flops(backend, with_bias):
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
            fastpref.sequence_logps(hidden, weight, labels, bias=bias, backend=backend)

    def step():
        fastpref.sequence_logps(hidden, weight, labels, bias=bias, backend=backend).sum().backward()

    assert _count(forward) == 2 * unit
    assert _count(step) == 8 * unit


def test_plan_tiles_bounded_at_real_sizes():
    """Chunking at BENCH sizes and beyond 2^31 elements: every tile within its byte budget, Python ints."""
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


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (runs under the interpreter on the CPU)")
@pytest.mark.parametrize("kernel", ["fold", "grad"])
def test_kernels_use_int64_row_offsets(kernel):
    """A tile whose third row starts past 2^31 elements (huge row stride, 3 rows, untouched pages stay virtual):
    int32 offset arithmetic would wrap and read/write the wrong memory."""
    from fastpref import kernels

    stride, cols = 2**30 + 17, 300
    storage = torch.empty(2 * stride + cols, dtype=torch.bfloat16)
    tile = storage.as_strided((3, cols), (stride, 1))
    values = torch.randn(3, cols).bfloat16()
    tile.copy_(values)
    targets = torch.tensor([5, 100, 299])
    logp = torch.log_softmax(values.float(), -1)
    if kernel == "fold":
        row_max, row_sum = torch.full((3,), -float("inf")), torch.zeros(3)
        target_logit, logit_sum = torch.zeros(3), torch.zeros(3)
        kernels.fold_logsumexp(tile, targets, row_max, row_sum, target_logit, logit_sum, None, None, vocab_start=0,
                               logit_scale=1.0, softcap=None, inv_temperature=1.0)
        got = target_logit - (row_max + row_sum.log())
        torch.testing.assert_close(got, logp.gather(1, targets[:, None])[:, 0])
        torch.testing.assert_close(logit_sum, values.float().sum(-1))
    else:
        lse = torch.logsumexp(values.float(), -1)
        grad_rows = torch.tensor([1.0, -2.0, 0.5])
        kernels.logit_grad_(tile, targets, lse, grad_rows, vocab_start=0, logit_scale=1.0, softcap=None,
                            inv_temperature=1.0)
        onehot = torch.nn.functional.one_hot(targets, cols).float()
        expected = grad_rows[:, None] * (onehot - logp.exp())
        torch.testing.assert_close(tile.float(), expected, rtol=1e-2, atol=1e-2)  # bf16 rounding
    del storage


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="N·V > 2^31 at real size needs a CUDA device (the interpreter is far too "
                                         "slow); the CPU twin is test_kernels_use_int64_row_offsets")
def test_int64_offsets_at_real_size_gpu():
    vocab, hidden_size, n = 128256, 256, 17_000  # n * V = 2.18e9 > 2^31
    hidden = (0.5 * torch.randn(1, n, hidden_size, device="cuda")).bfloat16().requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device="cuda") / 16).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (1, n), device="cuda")
    loss_fn = fastpref.PreferenceLoss("sigmoid", mode="fast", memory_budget=8 * GiB, reference_free=True)
    h2 = torch.cat([hidden, hidden], 0).detach().requires_grad_()
    out = loss_fn(h2, weight, torch.cat([labels, labels], 0))
    out.loss.backward()
    seq = fastpref.sequence_logps(hidden, weight, labels)
    chunks = [fastpref.sequence_logps(hidden[:, i : i + 4096], weight, labels[:, i : i + 4096]) for i in
              range(0, n, 4096)]
    torch.testing.assert_close(seq, sum(chunks), rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(out.chosen_logps, seq, rtol=1e-4, atol=1e-2)
    assert torch.isfinite(h2.grad).all() and torch.isfinite(weight.grad).all()


def _dpo_batch(pairs=3, seq_len=20, hidden_size=16, vocab=400):
    hidden = torch.randn(2 * pairs, seq_len, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    labels = make_labels(2 * pairs, seq_len, vocab)
    ref_hidden = hidden.detach() + 0.1 * torch.randn(hidden.shape)
    return hidden, weight, labels, ref_hidden, int((labels != -100).sum()) * hidden_size * vocab


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("mode", "policy_units"), [("fast", 6), ("lean", 8)])
@pytest.mark.parametrize("reference", ["live", "precomputed"])
def test_dpo_step_flops(backend, mode, policy_units, reference):
    """Full DPO step: fast 6·n·H·V (policy) + 2·n·H·V (reference), lean 8 + 2; a precomputed reference costs 0."""
    hidden, weight, labels, ref_hidden, unit = _dpo_batch()
    if reference == "live":
        kwargs, ref_units = {"ref_hidden": ref_hidden}, 2
    else:
        kwargs, ref_units = {"ref_logps": torch.randn(hidden.shape[0])}, 0
    loss_fn = fastpref.DPOLoss(mode=mode, backend=backend)

    def step():
        out = loss_fn(hidden, weight, labels, **kwargs)
        assert out.mode == mode
        out.loss.backward()

    assert _count(step) == (policy_units + ref_units) * unit


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_only_flops(backend):
    """Evaluation / reference log-probs: 2·n·H·V for the policy under no-grad, whatever the mode."""
    hidden, weight, labels, _, unit = _dpo_batch()
    for mode in ("auto", "fast", "lean"):
        def forward(mode=mode):
            with torch.no_grad():
                out = fastpref.DPOLoss(mode=mode, backend=backend)(hidden, weight, labels, torch.zeros(6))
            assert out.mode == "forward"

        assert _count(forward) == 2 * unit
