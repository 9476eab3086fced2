"""fastpref.compat's Liger-Kernel 0.8.5 GRPO drop-in against Liger's own module (on the CPU) and a float64 truth.

The grid follows Liger's ``test/chunked_loss/test_grpo_loss.py::test_correctness`` (fp32 / bf16, bias on/off,
(β, ε_low, ε_high, temperature) = (0.1, 0.2, 0.2, 1.0) and (0, 0.1, 0.1, 2.0), the reference as log-probs, as
hidden states or absent, old log-probs given or not, every ``loss_type`` at both importance-sampling levels,
``delta`` None / 2.0), thinned as ``tests/test_compat.py`` thins its grids, at CPU sizes; its option tests
(``vllm_is_ratio`` in three shapes, ``use_bias_correction_kl``, ``num_items_in_batch``) follow. Where Liger's
grid skips a case that Liger computes (token-level luspo, ``delta`` with cispo / sapo / vespo) it runs here;
bf16 vespo is skipped as Liger skips it (φ = exp(log φ) amplifies the bf16 log-probs' rounding summed over the
sequence). Every output and gradient is bounded by 2x the larger of Liger's and plain torch's error against the
float64 truth (same dtype) plus a small atol, and in fp32 is close to Liger's result.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import zlib

import pytest
import torch

from fastpref import compat
from fastpref import reference as R
from fastpref.ops.plan import CPU_TILE_BYTES
from fastpref.utils.memory import AllocationTracker
from tests.helpers import rel_err
from tests.test_compat import _case_id, _cases

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
needs_liger = pytest.mark.skipif(not HAS_LIGER, reason="needs liger-kernel (dev extra)")
pytestmark = pytest.mark.usefixtures("one_thread")

LOSS_TYPES = ["bnpo", "grpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]  # Liger's grid order
SHAPES = [(3, 47, 31, 123), (4, 16, 24, 64), (2, 9, 16, 37)]  # Liger's random shape, two small ones
SETTINGS = [(0.1, 0.2, 0.2, 1.0), (0.0, 0.1, 0.1, 2.0)]  # Liger's (beta, epsilon_low, epsilon_high, temperature)
REFS = ["logps", "input", "none"]  # Liger's (use_ref_model, use_ref_per_token_logps): (T, T), (T, F), (F, F)
ATOL = {torch.float32: 1e-6, torch.bfloat16: 2e-3}
GRAD_NAMES = ("d_input", "d_weight", "d_bias")


# --------------------------------------------------------------------------------------------------------------
# Inputs as Liger's test builds them, and Liger 0.8.5's definition on materialised logits


def make(shape, dtype, *, bias=True, ref="input", old=True, temperature=1.0, seed=0):
    """Liger's inputs: randn hidden states and head, the reference head and hidden states 0.01 away, old and
    reference log-probs 0.01 from the policy's (float64), random padding, advantages of both signs."""
    batch, seq_len, hidden, vocab = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64)

    x, w, b = randn(batch, seq_len, hidden), randn(vocab, hidden), randn(vocab) if bias else None
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    lp = R.token_logps(x, w, ids, bias=b, temperature=temperature)
    mask = torch.ones(batch, seq_len)
    masked = int(torch.randint(1, batch * seq_len // 2, (1,), generator=g))
    mask.view(-1)[torch.randperm(batch * seq_len, generator=g)[:masked]] = 0
    adv = randn(batch).float()
    adv[0] = -adv[0].abs()
    adv[1] = adv[1].abs()
    leaf = lambda t: None if t is None else t.to(dtype).requires_grad_()
    return dict(x=leaf(x), w=leaf(w), b=leaf(b), ids=ids, mask=mask, adv=adv,
                ref_logps=(lp + 0.01 * randn(batch, seq_len)).float() if ref == "logps" else None,
                old_logps=(lp + 0.01 * randn(batch, seq_len)).float() if old else None,
                ref_x=(x + 0.01 * randn(batch, seq_len, hidden)).to(dtype) if ref == "input" else None,
                ref_w=(w + 0.01 * randn(vocab, hidden)).to(dtype),
                ref_b=None if b is None else (b + 0.01 * randn(vocab)).to(dtype))


def truth(inputs, kw, call_kw=None, dtype=torch.float64):
    """``((loss, metrics), grads)`` by Liger 0.8.5's definition (``grpo_loss.py``) on materialised logits: the
    float64 truth, or with ``dtype`` plain torch (logits in that dtype, log-softmax in fp32)."""
    call_kw = call_kw or {}
    x, w = (inputs[k].detach().to(dtype).requires_grad_() for k in ("x", "w"))
    b = None if inputs["b"] is None else inputs["b"].detach().to(dtype).requires_grad_()
    ids, temp, beta = inputs["ids"], kw.get("temperature", 1.0), kw.get("beta", 0.04)
    lp = R.token_logps(x, w, ids, bias=b, temperature=temp)
    f = lp.dtype
    m = inputs["mask"].to(f)
    if not kw.get("use_ref_model", True):
        ref = lp.detach()
    elif inputs["ref_logps"] is not None:
        ref = inputs["ref_logps"].to(f)
    else:
        with torch.no_grad():
            rb = inputs["ref_b"]
            ref = R.token_logps(inputs["ref_x"].to(dtype), inputs["ref_w"].to(dtype), ids,
                                bias=None if rb is None else rb.to(dtype), temperature=temp)
    old = lp.detach() if inputs["old_logps"] is None else inputs["old_logps"].to(f)
    log_ratio = lp - old
    if kw.get("importance_sampling_level", "token") == "token":
        log_iw = log_ratio
    else:
        log_iw = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    r = log_iw.exp()
    a = inputs["adv"].to(f).unsqueeze(1)
    el, eh, lt = kw.get("epsilon_low", 0.2), kw.get("epsilon_high", 0.2), kw.get("loss_type", "dapo")
    isr = call_kw.get("vllm_is_ratio")
    isr = None if isr is None else (isr.unsqueeze(-1) if isr.dim() == 1 else isr).to(f)
    none_clipped = torch.zeros_like(r, dtype=torch.bool)
    if lt == "cispo":
        loss_t, clipped = -r.clamp(max=eh).detach() * a * lp, (r > eh) & (a > 0)
    elif lt == "sapo":
        tau = torch.where(a > 0, kw.get("sapo_temperature_pos", 1.0), kw.get("sapo_temperature_neg", 1.05)).to(f)
        loss_t, clipped = -torch.sigmoid(tau * (r - 1)) * 4 / tau * a, none_clipped
    elif lt == "vespo":
        with torch.no_grad():
            seq = (log_ratio.clamp(-20, 20) * m).sum(-1, keepdim=True)
            if isr is not None:
                seq = seq + isr.log().clamp(math.log(1e-8), 20).sum(-1, keepdim=True)
            log_w = seq.clamp(math.log(1e-8), 20)
            k = torch.where(a >= 0, kw.get("vespo_k_pos", 2.0), kw.get("vespo_k_neg", 3.0)).to(f)
            lam = torch.where(a >= 0, kw.get("vespo_lambda_pos", 3.0), kw.get("vespo_lambda_neg", 2.0)).to(f)
            phi = (lam + k * log_w - lam * log_w.exp()).exp().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        loss_t, clipped = -phi * a * lp, none_clipped
    else:
        delta = kw.get("delta")
        capped = r if delta is None else r.clamp(max=delta)
        loss_t = -torch.min(capped * a, r.clamp(1 - el, 1 + eh) * a)
        clipped = ((r < 1 - el) & (a < 0)) | ((r > 1 + eh) & (a > 0))
    if isr is not None and lt != "vespo":
        loss_t = loss_t * isr
    if beta != 0.0:
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        if kw.get("use_bias_correction_kl", False):
            kl = kl * log_iw.exp()
        loss_t = loss_t + beta * kl
    n_b, batch = m.sum(-1), m.shape[0]
    if lt in ("grpo", "sapo"):
        loss = ((loss_t * m).sum(-1) / n_b.clamp(min=1.0)).sum() / batch
    elif lt == "bnpo":
        loss = (loss_t * m).sum() / m.sum().clamp(min=1.0)
    elif lt == "dr_grpo":
        loss = (loss_t * m).sum() / (batch * kw["max_completion_length"])
    elif lt == "luspo":
        loss = (loss_t * n_b.unsqueeze(-1)).sum() / (batch * loss_t.shape[1])
    else:
        n = call_kw.get("num_items_in_batch")
        loss = (loss_t * m).sum() / (m.sum() if n is None else torch.as_tensor(float(n), dtype=f)).clamp(min=1.0)
    tokens = m.sum().clamp(min=1.0)
    metrics = () if beta == 0.0 else ((kl * m).sum().detach() / tokens,)
    metrics = (*metrics, (clipped.expand_as(m) * m).sum() / tokens)
    wrt = [t for t in (x, w, b) if t is not None]
    return (loss.detach(), metrics), torch.autograd.grad(loss, wrt)


# --------------------------------------------------------------------------------------------------------------
# Running Liger and the drop-in side by side


def _args(inputs):
    """The module's positional arguments, in Liger's order."""
    return (inputs["x"], inputs["w"], inputs["ids"], inputs["mask"], inputs["adv"], inputs["b"], inputs["ref_logps"],
            inputs["old_logps"], inputs["ref_x"], inputs["ref_w"], inputs["ref_b"])


def _grads(loss, inputs):
    return torch.autograd.grad(loss, [inputs[k] for k in ("x", "w", "b") if inputs[k] is not None])


def compare(inputs, kw, dtype, call_kw=None):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    call_kw = call_kw or {}
    theirs = LigerFusedLinearGRPOLoss(compiled=False, **kw)(*_args(inputs), **call_kw)
    ours = compat.LigerFusedLinearGRPOLoss(**kw)(*_args(inputs), **call_kw)
    assert isinstance(ours, tuple) and len(ours) == 2 and isinstance(ours[1], tuple)
    assert len(ours[1]) == len(theirs[1]) == (1 if kw.get("beta", 0.04) == 0.0 else 2)
    (loss64, m64), g64 = truth(inputs, kw, call_kw)
    (loss_p, m_p), g_p = truth(inputs, kw, call_kw, dtype=dtype)
    rows = [("loss", ours[0], theirs[0], loss64, loss_p),
            *zip(("kl", "clip_ratio")[-len(m64):], ours[1], theirs[1], m64, m_p),
            *zip(GRAD_NAMES, _grads(ours[0], inputs), _grads(theirs[0], inputs), g64, g_p)]
    for name, a, t, t64, plain in rows:
        assert a.shape == t.shape and a.dtype == t.dtype, (name, a.shape, t.shape, a.dtype, t.dtype)
        assert torch.isfinite(a).all(), name
        e_ours, e_liger, e_plain = rel_err(a, t64), rel_err(t, t64), rel_err(plain, t64)
        assert e_ours <= 2 * max(e_liger, e_plain) + ATOL[dtype], (
            f"{name}: error {e_ours:.2e} > 2 x max(Liger {e_liger:.2e}, torch {e_plain:.2e}) + {ATOL[dtype]:g}")
        if dtype == torch.float32:
            torch.testing.assert_close(a, t, rtol=1e-4, atol=1e-5, msg=name)


def _liger_runs(case):
    """Liger refuses sequence-level importance sampling for cispo / sapo / vespo (see the error tests), and its
    grid skips bf16 vespo (exp(log φ) amplifies the log-probs' bf16 rounding)."""
    lt = case["loss_type"]
    if case["importance_sampling_level"] == "sequence" and lt in ("cispo", "sapo", "vespo"):
        return False
    return not (lt == "vespo" and case["dtype"] == torch.bfloat16)


GRID = [c for c in _cases({"loss_type": LOSS_TYPES, "importance_sampling_level": ["token", "sequence"],
                           "dtype": [torch.float32, torch.bfloat16]},
                          {"bias": [True, False], "setting": SETTINGS, "delta": [None, 2.0], "old": [True, False]},
                          {"ref": REFS, "shape": SHAPES}) if _liger_runs(c)]


def _grid_case(case):
    lt, level, dtype = case["loss_type"], case["importance_sampling_level"], case["dtype"]
    beta, eps_low, eps_high, temperature = case["setting"]
    kw = dict(beta=beta, epsilon_low=eps_low, epsilon_high=eps_high, temperature=temperature, loss_type=lt,
              importance_sampling_level=level, delta=case["delta"], use_ref_model=case["ref"] != "none",
              max_completion_length=case["shape"][1] if lt == "dr_grpo" else None)
    inputs = make(case["shape"], dtype, bias=case["bias"], ref=case["ref"], old=case["old"],
                  temperature=temperature, seed=zlib.crc32(_case_id(case).encode()) % 1000)
    return inputs, kw


@needs_liger
@pytest.mark.parametrize("case", GRID, ids=[_case_id(c) for c in GRID])
def test_grpo_matches_liger_on_its_grid(case):
    inputs, kw = _grid_case(case)
    compare(inputs, kw, case["dtype"])


@needs_liger
@pytest.mark.parametrize("loss_type", ["bnpo", "grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("ratio_shape", ["BT", "B1", "B"])
def test_vllm_is_ratio_matches_liger(loss_type, beta, ratio_shape):
    """Liger's ``test_correctness_with_vllm_is_ratio`` (its [B, T] ratio; here also [B, 1] and [B]), with
    luspo at sequence level, which Liger's test skips."""
    inputs = make((4, 32, 64, 128), torch.float32, bias=False, ref="none", old=True, seed=3)
    g = torch.Generator().manual_seed(4)
    size = {"BT": (4, 32), "B1": (4, 1), "B": (4,)}[ratio_shape]
    ratio = torch.rand(*size, generator=g) * 0.999 + 0.001
    level = "sequence" if loss_type == "luspo" else "token"
    compare(inputs, dict(beta=beta, loss_type=loss_type, use_ref_model=False, importance_sampling_level=level),
            torch.float32, dict(vllm_is_ratio=ratio))


@needs_liger
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo"])
@pytest.mark.parametrize("importance_sampling_level", ["token", "sequence"])
def test_bias_correction_kl_matches_liger(loss_type, importance_sampling_level):
    inputs = make(SHAPES[0], torch.float32, bias=False, ref="input", old=True, seed=6)
    inputs["old_logps"] = torch.randn(inputs["ids"].shape, generator=torch.Generator().manual_seed(7)) - 5
    compare(inputs, dict(beta=0.1, loss_type=loss_type, importance_sampling_level=importance_sampling_level,
                         use_bias_correction_kl=True), torch.float32)


@needs_liger
@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "vespo"])
@pytest.mark.parametrize("num_items", ["float", "tensor", "small"])
def test_num_items_in_batch_matches_liger(loss_type, num_items):
    inputs = make(SHAPES[0], torch.float32, bias=True, ref="none", old=True, seed=8)
    tokens = float(inputs["mask"].sum())
    n = {"float": 1.7 * tokens, "tensor": torch.tensor(2 * tokens), "small": 0.5}[num_items]  # 0.5: clamped to 1
    compare(inputs, dict(beta=0.0, loss_type=loss_type, use_ref_model=False), torch.float32,
            dict(num_items_in_batch=n))


@needs_liger
@pytest.mark.parametrize("kw", [
    dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=3.0),
    dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.0, vespo_lambda_neg=4.0),
    dict(loss_type="cispo", epsilon_high=1.01),
    dict(loss_type="dapo", epsilon_low=0.005, epsilon_high=0.01, delta=1.005, temperature=0.7),
    dict(loss_type="dr_grpo", max_completion_length=64, temperature=1.3, beta=0.5),
], ids=["sapo-temperatures", "vespo-shapes", "cispo-clipping", "dapo-delta-clipping", "dr_grpo-length"])
def test_other_hyper_parameters_match_liger(kw):
    """Values away from the defaults, with old log-probs far enough that clipping and ``delta`` bite."""
    inputs = make(SHAPES[0], torch.float32, bias=True, ref="input", old=True, seed=11,
                  temperature=kw.get("temperature", 1.0))
    inputs["old_logps"] = inputs["old_logps"] + 0.05 * torch.randn(inputs["ids"].shape)
    compare(inputs, kw, torch.float32)


@needs_liger
@pytest.mark.parametrize("entry", ["function", "apply"])
def test_functional_api_matches_liger(entry):
    """Liger's ``Function.forward`` arguments in order, all positional, none at its default."""
    from liger_kernel.chunked_loss.functional import liger_fused_linear_grpo

    inputs = make(SHAPES[0], torch.float32, bias=True, ref="input", old=True, temperature=1.5, seed=9)
    ratio = torch.rand(3, 47, generator=torch.Generator().manual_seed(1)) + 0.5
    args = (*_args(inputs), 0.2, 0.15, 0.25, "grpo", 47, "sequence", 0.9, 1.2, 1.5, False, True, 2, ratio, 1.1,
            True, 1.9, 2.9, 3.1, 2.1, 100.0)
    fn = compat.liger_fused_linear_grpo if entry == "function" else compat.LigerFusedLinearGRPOFunction.apply
    theirs, ours = liger_fused_linear_grpo(*args), fn(*args)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    assert len(ours[1]) == len(theirs[1]) == 2
    for a, t in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, t, rtol=1e-5, atol=1e-6)
    for a, t in zip(_grads(ours[0], inputs), _grads(theirs[0], inputs)):
        torch.testing.assert_close(a, t, rtol=1e-4, atol=1e-6)


@needs_liger
def test_signatures_are_liger_0_8_5():
    import liger_kernel.chunked_loss as lk
    from liger_kernel.chunked_loss import functional as lf

    def params(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(compat.LigerFusedLinearGRPOLoss.__init__) == params(lk.LigerFusedLinearGRPOLoss.__init__)
    assert params(compat.LigerFusedLinearGRPOLoss.forward) == params(lk.LigerFusedLinearGRPOLoss.forward)
    assert params(compat.liger_fused_linear_grpo) == params(lf.liger_fused_linear_grpo.__self__.forward)[1:]
    assert compat.LigerFusedLinearGRPOFunction.apply is compat.liger_fused_linear_grpo


# --------------------------------------------------------------------------------------------------------------
# Behaviour that needs no Liger: the reference and padding handling, errors, memory


def test_upstream_gradient_scales_the_gradients():
    inputs = make(SHAPES[1], torch.float32, bias=True, ref="logps", seed=2)
    loss_fn = compat.LigerFusedLinearGRPOLoss(beta=0.1, loss_type="grpo")
    g1 = _grads(loss_fn(*_args(inputs))[0], inputs)
    g3 = _grads(-3.0 * loss_fn(*_args(inputs))[0], inputs)
    for a, b in zip(g1, g3):
        torch.testing.assert_close(b, -3.0 * a)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo"])
def test_padding_never_reaches_the_loss(loss_type):
    """NaN old / reference log-probs and invalid ids on padding leave the loss and gradients as they were
    (Liger scores padding and multiplies by 0: NaN there would poison its loss); luspo at sequence level with
    β = 0 reads no padded position either."""
    inputs = make(SHAPES[0], torch.float32, bias=False, ref="logps", old=True, seed=5)
    kw = dict(beta=0.1 if loss_type != "luspo" else 0.0, loss_type=loss_type,
              importance_sampling_level="sequence" if loss_type == "luspo" else "token")
    loss_fn = compat.LigerFusedLinearGRPOLoss(**kw)
    clean = loss_fn(*_args(inputs))
    pad = inputs["mask"] == 0
    dirty = dict(inputs, ids=inputs["ids"].masked_fill(pad, -100),
                 old_logps=inputs["old_logps"].masked_fill(pad, float("nan")),
                 ref_logps=inputs["ref_logps"].masked_fill(pad, float("nan")))
    out = loss_fn(*_args(dirty))
    torch.testing.assert_close(out[0], clean[0], rtol=0, atol=0)
    for a, b in zip(out[1], clean[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(_grads(out[0], inputs), _grads(clean[0], inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reference_equal_to_policy_gives_zero_kl_and_default_ref_weight():
    """``ref_input`` = the policy's hidden states with ``ref_weight=None`` (the policy's head): KL exactly 0."""
    inputs = make(SHAPES[0], torch.float32, bias=True, ref="input", seed=4)
    x = inputs["x"]
    loss, (kl, _) = compat.LigerFusedLinearGRPOLoss(beta=0.3)(x, inputs["w"], inputs["ids"], inputs["mask"],
                                                             inputs["adv"], inputs["b"], ref_input=x.detach(),
                                                             old_per_token_logps=inputs["old_logps"])
    assert kl.item() == 0.0
    loss0, _ = compat.LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)(*_args(dict(inputs, ref_x=None)))
    torch.testing.assert_close(loss, loss0)


def test_both_references_warn_and_use_the_log_probs():
    inputs = make(SHAPES[1], torch.float32, ref="logps", seed=3)
    ref_x = inputs["x"].detach() + 1.0
    loss_fn = compat.LigerFusedLinearGRPOLoss(beta=0.1)
    with pytest.warns(UserWarning, match="Using ref_per_token_logps"):
        both = loss_fn(*_args(dict(inputs, ref_x=ref_x)))
    torch.testing.assert_close(both[1], loss_fn(*_args(inputs))[1])


def _bad_calls(inputs):
    """(error, message pattern, tensors replaced, hyper-parameters) for calls that must fail."""
    x, w, ids, mask, adv = (inputs[k] for k in ("x", "w", "ids", "mask", "adv"))
    scored = mask != 0
    return [
        (ValueError, r"_input: expected \[B, T, H\]", dict(_input=x[0], selected_token_ids=ids[0],
                                                           attention_mask=mask[0]), {}),
        (ValueError, "selected_token_ids: expected shape", dict(selected_token_ids=ids[:, :3]), {}),
        (TypeError, "selected_token_ids", dict(selected_token_ids=ids.float()), {}),
        (ValueError, r"selected_token_ids: values must be in \[0, vocab_size",
         dict(selected_token_ids=ids.masked_fill(scored, 10_000)), {}),
        (ValueError, r"selected_token_ids: expected ids in \[0, vocab_size",
         dict(selected_token_ids=ids.masked_fill(scored, -100)), {}),
        (ValueError, "attention_mask: expected shape", dict(attention_mask=mask[:2]), {}),
        (ValueError, "advantages: expected shape", dict(advantages=adv[:, None]), {}),
        (TypeError, "advantages: expected a floating-point", dict(advantages=adv.long()), {}),
        (ValueError, r"weight: expected \[V, H\]", dict(weight=w[:, :5]), {}),
        (ValueError, "bias: expected shape", dict(bias=w[:-1, 0]), {}),
        (ValueError, "old_per_token_logps: expected shape", dict(old_per_token_logps=adv), {}),
        (ValueError, "ref_per_token_logps or ref_input must be provided", dict(ref_per_token_logps=None), {}),
        (ValueError, r"ref_input: expected \[B, T, H_ref\]", dict(ref_per_token_logps=None, ref_input=x[:, :2]), {}),
        (ValueError, r"ref_weight: expected \[V, H\]",
         dict(ref_per_token_logps=None, ref_input=x.detach(), ref_weight=w[:, :3]), {}),
        (ValueError, "vllm_is_ratio: expected shape", dict(vllm_is_ratio=mask[:, :2]), {}),
        (ValueError, "num_items_in_batch", dict(num_items_in_batch=mask), {}),
        (ValueError, r"^Unknown loss type: ppo \(loss_type", {}, dict(loss_type="ppo")),
        (ValueError, "^Unknown importance sampling level.*importance_sampling_level",
         {}, dict(importance_sampling_level="seq")),
        (ValueError, "^Sequence-level importance sampling is not supported for loss_type='sapo'",
         {}, dict(loss_type="sapo", importance_sampling_level="sequence")),
        (ValueError, "^max_completion_length must be provided", {}, dict(loss_type="dr_grpo")),
        (TypeError, "max_completion_length: expected an int", {}, dict(loss_type="dr_grpo", max_completion_length=4.0)),
        (ValueError, r"beta: expected a finite number in \[0", {}, dict(beta=-0.1)),
        (ValueError, "temperature: expected", {}, dict(temperature=0.0)),
        (TypeError, "epsilon_high: expected a real number", {}, dict(epsilon_high=None)),
        (ValueError, "delta: expected", {}, dict(delta=0.0)),
    ]


@pytest.mark.parametrize("entry", ["module", "function"])
def test_bad_input_names_liger_arguments(entry):
    inputs = make(SHAPES[1], torch.float32, bias=False, ref="logps", seed=1)
    base = dict(_input=inputs["x"], weight=inputs["w"], selected_token_ids=inputs["ids"],
                attention_mask=inputs["mask"], advantages=inputs["adv"], ref_per_token_logps=inputs["ref_logps"])
    for error, match, tensors, hp in _bad_calls(inputs):
        args, hp = dict(base, **tensors), {"loss_type": "grpo", **hp}
        with pytest.raises(error, match=match):
            if entry == "module":  # the module's weight is lin_weight (the pattern's "weight" matches inside it)
                args["lin_weight"] = args.pop("weight")
                compat.LigerFusedLinearGRPOLoss(**hp)(**args)
            else:
                compat.liger_fused_linear_grpo(**args, **hp)
    with pytest.raises(ValueError, match="lin_weight: expected"):
        compat.LigerFusedLinearGRPOLoss()(inputs["x"], inputs["w"][:, :5], inputs["ids"], inputs["mask"],
                                          inputs["adv"], ref_per_token_logps=inputs["ref_logps"])


@pytest.mark.parametrize("name, kw, liger_text", [
    ("sapo_temperature_pos", dict(sapo_temperature_pos=0.0), "sapo_temperature_pos must be positive, got 0.0"),
    ("sapo_temperature_neg", dict(sapo_temperature_neg=-1.0), "sapo_temperature_neg must be positive, got -1.0"),
    ("delta", dict(delta=-2.0), "delta must be positive, got -2.0"),
])
def test_constructor_refuses_what_liger_refuses(name, kw, liger_text):
    with pytest.raises(ValueError, match=f"^{liger_text} \\({name}: expected"):
        compat.LigerFusedLinearGRPOLoss(**kw)


def test_hyper_parameters_are_read_at_each_call():
    inputs = make(SHAPES[1], torch.float32, ref="logps", seed=12)
    loss_fn = compat.LigerFusedLinearGRPOLoss(loss_type="grpo")
    before = loss_fn(*_args(inputs))
    loss_fn.beta = 0.0
    after = loss_fn(*_args(inputs))
    assert len(before[1]) == 2 and len(after[1]) == 1
    loss_fn.loss_type = "nope"
    with pytest.raises(ValueError, match="Unknown loss type: nope"):
        loss_fn(*_args(inputs))


def test_class_docstring_states_the_differences():
    doc = " ".join(compat.LigerFusedLinearGRPOLoss.__doc__.split())
    assert "Differences from Liger 0.8.5" in doc
    assert "positions with ``attention_mask == 0`` are not scored" in doc


FLOP_CASES = [
    # kwargs, positions scored, (forward, backward) in units of n·H·V for the n positions scored
    (dict(beta=0.1, loss_type="grpo"), "mask", (4, 6)),  # policy 2 + reference 2; lean backward 6
    (dict(beta=0.0, loss_type="grpo"), "mask", (2, 6)),  # the reference is not scored when unused
    (dict(beta=0.1, loss_type="luspo", importance_sampling_level="sequence"), "all", (4, 6)),  # padding too
    (dict(beta=0.0, loss_type="luspo", importance_sampling_level="sequence"), "mask", (2, 6)),
]


@pytest.mark.parametrize(("kw", "scored", "expected"), FLOP_CASES, ids=["ref", "beta0", "luspo-kl", "luspo"])
def test_flops_count_the_scored_positions_only(kw, scored, expected):
    """Lean ``token_logps``: 2·n·H·V forward, 6·n·H·V backward (logits recomputed), n the positions that enter
    the loss (Liger scores every position, padding included)."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = make((4, 24, 16, 64), torch.float32, bias=False, ref="input", seed=13)
    inputs["mask"][:, 16:] = 0
    n = int(inputs["mask"].sum()) if scored == "mask" else inputs["mask"].numel()
    unit = n * 16 * 64
    with FlopCounterMode(display=False) as fwd:
        loss, _ = compat.LigerFusedLinearGRPOLoss(**kw)(*_args(inputs))
    with FlopCounterMode(display=False) as bwd:
        _grads(loss, inputs)
    assert abs(fwd.get_total_flops() / unit - expected[0]) < 0.01 * expected[0], fwd.get_total_flops() / unit
    assert abs(bwd.get_total_flops() / unit - expected[1]) < 0.01 * expected[1], bwd.get_total_flops() / unit


def test_step_never_allocates_tokens_by_vocab():
    """A GRPO step with the reference scored from hidden states: no allocation of size tokens x vocabulary
    (Liger 0.8.5's own peak is one [2048, 4096] chunk of logits per direction)."""
    batch, seq_len, hidden, vocab = 4, 128, 16, 65536
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq_len, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / 4).requires_grad_()
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    mask = torch.ones(batch, seq_len)
    mask[:, -17:] = 0
    adv = torch.randn(batch, generator=g)
    logits_bytes = int(mask.sum()) * vocab * 4
    loss_fn = compat.LigerFusedLinearGRPOLoss(beta=0.1, loss_type="grpo")
    with AllocationTracker(device="cpu") as mem:
        loss, _ = loss_fn(x, w, ids, mask, adv, ref_input=x.detach() + 0.01)
        loss.backward()
    grads = x.numel() * 4 + w.numel() * 4
    assert mem.largest_bytes <= max(CPU_TILE_BYTES, w.numel() * 4), mem.largest
    assert mem.peak_bytes <= 2 * grads + CPU_TILE_BYTES < logits_bytes / 4, mem.summary()
