"""Every path, mode and dtype against float64, at realistic logit scales: the public DPO loss with a bias, its
gradients of hidden, weight and bias (the log-probs and the loss for forward-only scoring) within 2x the error of
the materialised PyTorch path in the same dtype. Plus the two cases that single out how the softmax's statistics
are formed: one bf16 token whose probabilities round to (1, 0), and fp32 logits of about 1e6."""

from __future__ import annotations

import functools

import pytest
import torch

import fastpref
from fastpref import reference as ref
from tests.helpers import PATH_IDS, PATHS, assert_within_torch_error, make_labels

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# logit std of h @ W.T (h ~ N(0, 1)); "peaked": std 3 plus one column 20 above the rest, the target of about half
# the tokens (probabilities within 1e-6 of 1, where 1 - p is all the gradient there is)
SCALES = ("std1", "std10", "std30", "peaked")
PEAK = 11
# tiny odd shapes: 2 pairs, 6 tokens, H = 29, V = 97 (tails on every block of every kernel)
PAIRS, SEQ, HIDDEN, VOCAB = 2, 6, 29, 97
# relative-error allowance on top of 2x torch's (torch's own fp32 error is ~1e-7). fp32 needs 5e-6 for lean mode on
# the fused path: its backward recomputes the logits with cuBLAS, whose fp32 sums run in another order than the
# fused fold's, so the statistics and the recomputed logits differ by the accumulation's rounding (3.4e-6 on dH at
# std 30 here; in 16 bits the rounding to the dtype absorbs it)
ATOL = {torch.float32: 5e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@functools.cache
def _batch(dtype: torch.dtype, scale: str) -> tuple[torch.Tensor, ...]:
    """(hidden, weight, bias, labels, ref_hidden), leaves in ``dtype``; shared by every path of a (dtype, scale)."""
    g = torch.Generator().manual_seed(SCALES.index(scale))
    std = {"std1": 1.0, "std10": 10.0, "std30": 30.0, "peaked": 3.0}[scale]
    hidden = torch.randn(2 * PAIRS, SEQ, HIDDEN, generator=g)
    weight = std * torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN**0.5
    bias = 0.1 * std * torch.randn(VOCAB, generator=g)
    labels = make_labels(2 * PAIRS, SEQ, VOCAB, prompt_frac=0.3, generator=g)
    if scale == "peaked":
        bias[PEAK] += 20.0
        labels = torch.where((labels >= 0) & (torch.rand(labels.shape, generator=g) < 0.5), PEAK, labels)
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=g)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels, ref_hidden.to(dtype)


def _leaves(*tensors: torch.Tensor, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _plain(batch, dtype: torch.dtype | None, *, grad: bool):
    """The materialised reference (fastpref.reference) in the batch's dtype, or float64: (loss, chosen, rejected),
    and the gradients of hidden, weight and bias when ``grad``."""
    hidden, weight, bias, labels, ref_hidden = batch
    h, w, b = _leaves(hidden, weight, bias, dtype=dtype)
    rh = ref_hidden.to(dtype or ref_hidden.dtype)
    loss, _, chosen, rejected = ref.preference_loss(h, w, labels, loss_type="sigmoid", bias=b, ref_hidden=rh)
    grads = torch.autograd.grad(loss, [h, w, b]) if grad else None
    return (loss.detach(), chosen.detach(), rejected.detach()), grads


@functools.cache
def _references(dtype: torch.dtype, scale: str, grad: bool):
    batch = _batch(dtype, scale)
    return _plain(batch, None, grad=grad), _plain(batch, torch.float64, grad=grad)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("mode", ["fast", "lean", "forward"])
@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
def test_within_twice_torch_error(backend, gemm, mode, dtype, scale):
    dt = DTYPES[dtype]
    hidden, weight, bias, labels, ref_hidden = _batch(dt, scale)
    h, w, b = _leaves(hidden, weight, bias)
    loss_fn = fastpref.DPOLoss(mode="auto" if mode == "forward" else mode, backend=backend, gemm=gemm)
    grad = mode != "forward"
    with torch.set_grad_enabled(grad):
        out = loss_fn(h, w, labels, bias=b, ref_hidden=ref_hidden)
    assert out.mode == mode
    (p_vals, p_grads), (t_vals, t_grads) = _references(dt, scale, grad)
    ours = (out.loss.detach(), out.chosen_logps, out.rejected_logps)
    for name, x, p, t in zip(("loss", "chosen_logps", "rejected_logps"), ours, p_vals, t_vals):
        assert_within_torch_error(name, x, p, t, atol=ATOL[dt])
    if grad:
        for name, x, p, t in zip(("hidden", "weight", "bias"), torch.autograd.grad(out.loss, [h, w, b]), p_grads,
                                 t_grads):
            assert x.dtype == dt and torch.isfinite(x).all(), name
            assert_within_torch_error(f"d{name}", x, p, t, atol=ATOL[dt])


def _pair_case(hidden, weight, labels, mode, backend, gemm):
    """DPO on one pair with zero reference log-probs and a zero bias: fastpref's (log-probs, grads of h, W, b), the
    plain path's in the same dtype and float64's."""
    bias = torch.zeros(weight.shape[0], dtype=hidden.dtype)
    ref_logps = torch.zeros(2)
    results = []
    for impl, dtype in ((fastpref, None), (ref, None), (ref, torch.float64)):
        h, w, b = _leaves(hidden, weight, bias, dtype=dtype)
        grad = mode != "forward"
        with torch.set_grad_enabled(grad):
            if impl is fastpref:
                loss_fn = fastpref.DPOLoss(mode="auto" if mode == "forward" else mode, backend=backend, gemm=gemm)
                out = loss_fn(h, w, labels, ref_logps, bias=b)
                loss, logps = out.loss, torch.cat([out.chosen_logps, out.rejected_logps])
            else:
                loss, _, chosen, rejected = ref.preference_loss(h, w, labels, ref_logps.to(h.dtype), bias=b)
                logps = torch.cat([chosen, rejected])
        results.append((logps.detach(), torch.autograd.grad(loss, [h, w, b]) if grad else ()))
    return results


@pytest.mark.parametrize("mode", ["fast", "lean"])
@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
def test_one_token_whose_probability_rounds_to_one(backend, gemm, mode):
    """H = 1, V = 2, bf16: the chosen token's logits (22, 0) give p = 1 - 3e-10, so d logp/dh = 7·(1 - p) is 2e-9;
    plain bf16 gives 0 (fp32 p rounds to 1). A softmax formed from statistics of other values than the logits the
    gradient reads gave -0.110 (p = exp(22 - lse) = 1.016)."""
    hidden = torch.tensor([[[3.140625]], [[-1.0]]], dtype=torch.bfloat16)
    weight = torch.tensor([[7.0], [0.0]], dtype=torch.bfloat16)
    labels = torch.tensor([[0], [1]])
    (_, ours), (_, plain), (_, truth) = _pair_case(hidden, weight, labels, mode, backend, gemm)
    for name, x, p, t in zip(("hidden", "weight", "bias"), ours, plain, truth):
        err, err_plain = (x.double() - t).abs().max().item(), (p.double() - t).abs().max().item()
        assert err <= 2 * err_plain + 1e-6, f"d{name}: error {err:.3e}, plain bf16 {err_plain:.3e}"


@pytest.mark.parametrize("mode", ["fast", "lean", "forward"])
@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
def test_fp32_logits_of_a_million(backend, gemm, mode):
    """fp32 logits (1e6, 1e6 - 1) and (-1e6, -1e6 - 1): log-probs and gradients as exact as PyTorch's
    log_softmax (p = 0.26894 for the second token). One fp32 lse = 1e6 + 0.31326 rounds to 1e6 + 0.3125 (p =
    0.26915); exp2(z·log2e - lse·log2e) loses more (0.27263)."""
    hidden = torch.tensor([[[1e6, 1.0]], [[-1e6, 1.0]]])
    weight = torch.tensor([[1.0, 0.0], [1.0, -1.0]])
    labels = torch.tensor([[0], [1]])
    (lp, ours), (lp_plain, plain), (lp_truth, truth) = _pair_case(hidden, weight, labels, mode, backend, gemm)
    assert_within_torch_error("logps", lp, lp_plain, lp_truth, atol=1e-7)
    for name, x, p, t in zip(("hidden", "weight", "bias"), ours, plain, truth):
        assert_within_torch_error(f"d{name}", x, p, t, atol=1e-7)


@pytest.mark.parametrize("mode", ["fast", "lean"])
@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
def test_fp16_logits_past_the_range_are_not_silent(backend, gemm, mode):
    """A logit past fp16's 65504 is inf in the fp16 logits on every path: the loss is not finite, as PyTorch's. (A
    fold of the fp32 accumulator gave a finite loss while the gradient read the inf: NaN gradients only.)"""
    hidden = torch.tensor([[[300.0, 1.0]], [[300.0, 1.0]]], dtype=torch.float16)
    weight = torch.tensor([[250.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float16)
    labels = torch.tensor([[1], [2]])
    (lp, _), (lp_plain, _), _ = _pair_case(hidden, weight, labels, mode, backend, gemm)
    assert not torch.isfinite(lp_plain).any()
    assert not torch.isfinite(lp).any()
