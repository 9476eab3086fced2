"""The Triton kernels' own contracts beyond the float64 checks of the ops tests: 64-bit row offsets."""

from __future__ import annotations

import pytest
import torch

import fastpref
from fastpref.ops.plan import GiB
from tests.helpers import HAS_CUDA, HAS_TRITON


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (runs under the interpreter on the CPU)")
@pytest.mark.parametrize("kernel", ["fold", "grad"])
def test_kernels_use_int64_row_offsets(kernel):
    """A tile whose third row starts past 2^31 elements (huge row stride, 3 rows, untouched pages stay virtual):
    int32 offset arithmetic would wrap and read/write the wrong memory."""
    from fastpref.kernels import row_kernels as kernels

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
        row_max = values.float().amax(-1)
        log_sumexp = torch.logsumexp(values.float() - row_max[:, None], -1)
        grad_rows = torch.tensor([1.0, -2.0, 0.5])
        kernels.logit_grad_(tile, targets, row_max, log_sumexp, grad_rows, vocab_start=0, logit_scale=1.0, softcap=None,
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


def test_torch_row_ops_flush_subnormal_gradients():
    """Peaked logits (a std of ~30, as random heads give) make exp(z - lse) underflow to subnormals, which slow
    the CPU's gradient matmuls down 10x or more: the torch path's logits gradient holds none."""
    from fastpref.ops import LogitTransform
    from fastpref.ops.tile_ops import LogSumExp, TorchRowOps

    logits = 30.0 * torch.randn(16, 4096)
    targets = torch.randint(0, 4096, (16,))
    tile = logits.clone()
    lse = LogSumExp(torch.zeros(16), torch.logsumexp(logits, -1))  # lse = 0 + logsumexp
    TorchRowOps().grad_(tile, targets, lse, torch.full((16,), 0.01), 0, LogitTransform())
    tiny = torch.finfo(torch.float32).tiny
    assert not ((tile != 0) & (tile.abs() < tiny)).any()
    expected = 0.01 * (torch.nn.functional.one_hot(targets, 4096) - torch.softmax(logits, -1))
    torch.testing.assert_close(tile, expected, rtol=1e-5, atol=1e-30)
