"""fastpref.compat's Liger-Kernel 0.8.5 KTO drop-in against Liger's own module (on the CPU) and a float64 truth.

The grid follows Liger's ``test/chunked_loss/test_kto_loss.py`` (fp32 / bf16, B/T/H/V with an odd batch, bias
and reference bias on/off, ``ignore_index`` / ``beta`` pairs (-100, 0.1) and (42, 0.2), ``kl = randn(1)``,
``use_ref_model=True``), at CPU sizes, plus ``kl=None``, ``use_ref_model=False`` and ``average_log_prob``. Every
output and gradient is compared as ``tests/test_compat.py`` does: fp32 within 2x Liger's own error (or a 1e-5
floor) and close to Liger's result; bf16 within 2x the larger of Liger's and plain torch's error + 2e-3.
"""

from __future__ import annotations

import importlib.util
import zlib

import pytest
import torch
import torch.nn.functional as F

from fastpref import compat
from fastpref import reference as R
from tests.helpers import rel_err
from tests.test_compat import _case_id, _params

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
needs_liger = pytest.mark.skipif(not HAS_LIGER, reason="needs liger-kernel (dev extra)")
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(3, 47, 31, 123), (4, 16, 24, 64), (2, 2, 8, 8)]  # Liger's random shape, a small even one, its tiny one
NAMES = ("chosen_logps_sum", "rejected_logps_sum", "chosen_logits_sum", "rejected_logits_sum", "chosen_rewards_sum",
         "rejected_rewards_sum")


def make(shape, dtype, *, bias, ref_bias, ignore_index, seed):
    batch, seq_len, hidden, vocab = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g).to(dtype)

    y = torch.randint(0, vocab, (batch, seq_len), generator=g)
    y.view(-1)[torch.randperm(batch * seq_len, generator=g)[: max(1, batch * seq_len // 3)]] = ignore_index
    y[:, 0] = torch.randint(0, vocab, (batch,), generator=g)  # every row scores a token (Liger's means: NaN else)
    labels = torch.zeros(batch, dtype=torch.bool)
    labels[torch.randperm(batch, generator=g)[: (batch + 1) // 2]] = True
    return dict(x=randn(batch, seq_len, hidden).requires_grad_(), w=randn(vocab, hidden).requires_grad_(),
                b=randn(vocab).requires_grad_() if bias else None, y=y, d=labels,
                ref_x=randn(batch, seq_len, hidden), ref_w=randn(vocab, hidden),
                ref_b=randn(vocab) if ref_bias else None, kl=randn(1))


def truth(inputs, kw, dtype=torch.float64):
    """Liger 0.8.5's KTO definition on materialised logits: float64, or plain torch in ``dtype``."""
    x, w = (inputs[k].detach().to(dtype).requires_grad_() for k in ("x", "w"))
    b = None if inputs["b"] is None else inputs["b"].detach().to(dtype).requires_grad_()
    y, d, ig, beta = inputs["y"], inputs["d"], kw["ignore_index"], kw["beta"]
    n = (y != ig).sum(-1).to(torch.float64 if dtype == torch.float64 else torch.float32)
    lp = R.token_logps(x, w, y, bias=b, ignore_index=ig).sum(-1)
    if kw["average_log_prob"]:
        lp = lp / n
    ratio = lp
    if kw["use_ref_model"]:
        rb = inputs["ref_b"]
        ref = R.token_logps(inputs["ref_x"].to(dtype), inputs["ref_w"].to(dtype), y,
                            bias=None if rb is None else rb.to(dtype), ignore_index=ig).sum(-1)
        ratio = lp - (ref / n if kw["average_log_prob"] else ref)
    m = torch.where(d, 1.0, -1.0).to(ratio.dtype)
    kl = kw["kl"]
    z = beta * (ratio - kl.to(ratio.dtype)) * m if kl is not None else beta * ratio * m
    # 1 − σ(z) written σ(−z): the same definition, but its gradient survives saturation (|z| ≈ 46 without a
    # reference here), where 1 − σ(z) rounds to 0 even in float64 and Liger's gradient vanishes
    loss = F.sigmoid(-z).sum() / y.shape[0]
    logits = R.logits(x, w, b).detach()
    rewards = beta * ratio.detach()
    aux = ((lp.detach() * d).sum(), (lp.detach() * ~d).sum(), logits[d].sum(), logits[~d].sum(), (rewards * d).sum(),
           (rewards * ~d).sum())
    wrt = [t for t in (x, w, b) if t is not None]
    return (loss.detach(), aux), torch.autograd.grad(loss, wrt)


def _module_args(inputs, kw):
    return (inputs["x"], inputs["w"], inputs["y"], inputs["b"], inputs["d"], inputs["ref_x"], inputs["ref_w"],
            inputs["ref_b"], kw["kl"])


def compare(inputs, kw, dtype):
    from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss

    ctor = dict(ignore_index=kw["ignore_index"], beta=kw["beta"], use_ref_model=kw["use_ref_model"],
                average_log_prob=kw["average_log_prob"])
    wrt = [inputs[k] for k in ("x", "w", "b") if inputs[k] is not None]
    theirs = LigerFusedLinearKTOLoss(compiled=False, **ctor)(*_module_args(inputs, kw))
    g_theirs = torch.autograd.grad(theirs[0], wrt)
    ours = compat.LigerFusedLinearKTOLoss(**ctor)(*_module_args(inputs, kw))
    g_ours = torch.autograd.grad(ours[0], wrt)
    (loss64, aux64), g64 = truth(inputs, kw)
    if dtype != torch.float32:
        (loss_p, aux_p), g_p = truth(inputs, kw, dtype=dtype)
        plain = (loss_p, *aux_p, *g_p)
    assert len(ours[1]) == len(theirs[1]) == len(NAMES)
    rows = [("loss", ours[0], theirs[0], loss64), *zip(NAMES, ours[1], theirs[1], aux64),
            *zip(("d_input", "d_weight", "d_bias"), g_ours, g_theirs, g64)]
    for i, (name, a, t, t64) in enumerate(rows):
        assert a.shape == t.shape and a.dtype == t.dtype, (name, a.shape, t.shape, a.dtype, t.dtype)
        assert torch.isfinite(a).all(), name
        e_ours, e_liger = rel_err(a, t64), rel_err(t, t64)
        if dtype == torch.float32:
            # a reward sum β·Σ(lp − ref) inherits lp's rounding: its floor is relative to β·Σ|lp|
            scale = 1.0
            if name.endswith("rewards_sum"):
                lp = aux64[NAMES.index(name.replace("rewards", "logps"))]
                scale = max(1.0, float(kw["beta"] * lp.abs() / t64.abs().clamp(min=1e-30)))
            assert e_ours <= max(2 * e_liger, 1e-5 * scale), f"{name}: error {e_ours:.2e} (Liger {e_liger:.2e})"
            torch.testing.assert_close(a, t, rtol=1e-4, atol=1e-4, msg=name)
        else:
            e_plain = rel_err(plain[i], t64)
            assert e_ours <= 2 * max(e_liger, e_plain) + 2e-3, (
                f"{name}: error {e_ours:.2e} > 2 x max(Liger {e_liger:.2e}, torch {e_plain:.2e}) + 2e-3")


@needs_liger
@_params({"dtype": [torch.float32, torch.bfloat16], "ignore_beta": [(-100, 0.1), (42, 0.2)]},
         {"bias": [True, False], "ref_bias": [True, False]}, {"shape": SHAPES})
def test_kto_matches_liger_on_its_grid(case):
    ignore_index, beta = case["ignore_beta"]
    inputs = make(case["shape"], case["dtype"], bias=case["bias"], ref_bias=case["ref_bias"],
                  ignore_index=ignore_index, seed=zlib.crc32(_case_id(case).encode()) % 1000)
    kw = dict(ignore_index=ignore_index, beta=beta, use_ref_model=True, average_log_prob=False, kl=inputs["kl"])
    compare(inputs, kw, case["dtype"])


@needs_liger
@pytest.mark.parametrize("use_ref_model", [True, False], ids=["ref", "no-ref"])
@pytest.mark.parametrize("average_log_prob", [False, True], ids=["sum", "average"])
@pytest.mark.parametrize("with_kl", [True, False], ids=["kl", "no-kl"])
def test_kto_options_match_liger(use_ref_model, average_log_prob, with_kl):
    inputs = make(SHAPES[0], torch.float32, bias=True, ref_bias=False, ignore_index=-100, seed=5)
    kw = dict(ignore_index=-100, beta=0.1, use_ref_model=use_ref_model, average_log_prob=average_log_prob,
              kl=inputs["kl"] if with_kl else None)
    compare(inputs, kw, torch.float32)


@needs_liger
@pytest.mark.parametrize("entry", ["function", "apply"])
def test_functional_api_matches_liger(entry):
    """Liger's ``Function.forward`` arguments in order, all positional, none at its default."""
    from liger_kernel.chunked_loss.functional import liger_fused_linear_kto

    inputs = make(SHAPES[0], torch.float32, bias=True, ref_bias=True, ignore_index=42, seed=9)
    args = (*_module_args(inputs, {"kl": inputs["kl"]}), 42, 0.3, False, True, False, 2)
    # Liger's module forward puts preference_labels after bias; its Function keeps it fourth
    args = (args[0], args[1], args[2], args[4], args[3], *args[5:])
    fn = compat.liger_fused_linear_kto if entry == "function" else compat.LigerFusedLinearKTOFunction.apply
    theirs, ours = liger_fused_linear_kto(*args), fn(*args)
    wrt = [inputs["x"], inputs["w"], inputs["b"]]
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    for name, a, t in zip(NAMES, ours[1], theirs[1]):
        torch.testing.assert_close(a, t, rtol=1e-4, atol=1e-4, msg=name)
    for a, t in zip(torch.autograd.grad(ours[0], wrt), torch.autograd.grad(theirs[0], wrt)):
        torch.testing.assert_close(a, t, rtol=1e-4, atol=1e-6)


@needs_liger
def test_signatures_are_liger_0_8_5():
    import inspect

    import liger_kernel.chunked_loss as lk
    from liger_kernel.chunked_loss import functional as lf

    def params(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(compat.LigerFusedLinearKTOLoss.__init__) == params(lk.LigerFusedLinearKTOLoss.__init__)
    assert params(compat.LigerFusedLinearKTOLoss.forward) == params(lk.LigerFusedLinearKTOLoss.forward)
    assert params(compat.liger_fused_linear_kto) == params(lf.liger_fused_linear_kto.__self__.forward)[1:]
    assert compat.LigerFusedLinearKTOFunction.apply is compat.liger_fused_linear_kto


def test_bad_input_names_liger_arguments():
    inputs = make(SHAPES[1], torch.float32, bias=False, ref_bias=False, ignore_index=-100, seed=1)
    loss = compat.LigerFusedLinearKTOLoss(use_ref_model=True)
    x, w, y, d = inputs["x"], inputs["w"], inputs["y"], inputs["d"]
    with pytest.raises(TypeError, match="preference_labels"):
        loss(x, w, y, None, d.float(), inputs["ref_x"])
    with pytest.raises(ValueError, match="ref_input"):
        loss(x, w, y, None, d)
    with pytest.raises(ValueError, match="kl"):
        loss(x, w, y, None, d, inputs["ref_x"], kl=torch.zeros(3))
    with pytest.raises(ValueError, match="target"):
        loss(x, w, y[:, :3], None, d, inputs["ref_x"])
    with pytest.raises(ValueError, match="lin_weight"):
        loss(x, w[:, :5], y, None, d, inputs["ref_x"])
    with pytest.raises(ValueError, match="beta"):
        compat.LigerFusedLinearKTOLoss(beta=0.0)
