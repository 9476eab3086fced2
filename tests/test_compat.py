"""fastpref.compat's Liger-Kernel 0.8.5 drop-ins against Liger's own modules (run on the CPU) and a float64 truth.

The grid follows Liger's own ``test/chunked_loss/test_{dpo,cpo,simpo,orpo}_loss.py`` (dtype fp32/bf16, several
B/T/H/V, bias and reference bias on/off, ``ignore_index`` / ``beta`` pairs, ``compute_nll_loss``,
``average_log_prob``, every supported ``loss_type``), at tiny sizes and with even batches (an odd batch raises
here, see ``tests/test_compat_api.py``). Each output and gradient is compared with float64 truth computed from
materialised logits by Liger's definitions (written out below): fp32 within a tight tolerance (and close to
Liger's own result), bf16 within 2x Liger's own error plus a small atol — or 2x plain torch's (the same
definitions on bf16 logits), where a tiny sample's rounding happens to favour Liger.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from fastpref import compat
from fastpref import reference as ref
from tests.helpers import rel_err

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny sizes: a second OpenMP thread only adds contention
needs_liger = pytest.mark.skipif(not HAS_LIGER, reason="needs liger-kernel (dev extra)")

LIGER_DPO_TYPES = sorted(compat.dpo.LIGER_DPO_LOSS_TYPES)
SHAPES = [(2, 9, 16, 37), (4, 17, 31, 123), (6, 8, 24, 64)]  # (B, T, H, V), B even
IGNORE_BETA = [(-100, 0.1), (42, 0.2)]  # Liger's pairs
OUT_NAMES = {
    "dpo": ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean", "nll_loss",
            "chosen_rewards", "rejected_rewards"),
    "orpo": ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean", "nll_loss",
             "chosen_rewards", "rejected_rewards", "log_odds_ratio", "log_odds_chosen"),
}
OUT_NAMES["cpo"] = OUT_NAMES["simpo"] = OUT_NAMES["dpo"]


# --------------------------------------------------------------------------------------------------------------
# Inputs as Liger's tests build them (randn hidden states and heads, half the positions ignored at random)


def make_batch(shape, dtype=torch.float32, *, bias=True, ref_bias=True, ignore_index=-100, nll_target=False,
               seed=0):
    batch, seq_len, hidden, vocab = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g).to(dtype)

    x = randn(batch, seq_len, hidden).requires_grad_()
    w = randn(vocab, hidden).requires_grad_()
    b = randn(vocab).requires_grad_() if bias else None
    y = torch.randint(0, vocab, (batch, seq_len), generator=g)
    y.view(-1)[torch.randint(0, batch * seq_len, (batch * seq_len // 2,), generator=g)] = ignore_index
    y[:, 0] = torch.randint(0, vocab, (batch,), generator=g)  # every row keeps a scored token (Liger: NaN else)
    batch_inputs = dict(x=x, w=w, b=b, y=y, ref_x=randn(batch, seq_len, hidden), ref_w=randn(vocab, hidden),
                        ref_b=randn(vocab) if ref_bias else None)
    if nll_target:
        nt = torch.randint(0, vocab, (batch, seq_len), generator=g)
        nt[:, : seq_len // 3] = ignore_index
        batch_inputs["nll_target"] = nt
    return batch_inputs


# --------------------------------------------------------------------------------------------------------------
# Liger 0.8.5's definitions in float64 on materialised logits (liger_kernel/chunked_loss/*_loss.py)


def _dpo_formula(loss_type, lr_w, lr_l, beta, eps, tau):
    """Per-pair loss of Liger's DPO variants on the log-ratios lr = lp - ref_lp."""
    z = beta * (lr_w - lr_l)
    logsig = F.logsigmoid
    return {
        "sigmoid": lambda: -logsig(z),
        "hinge": lambda: torch.relu(1 - z),
        "exo_pair": lambda: torch.sigmoid(z) * (logsig(z) - math.log1p(-eps))
        + torch.sigmoid(-z) * (logsig(-z) - math.log(eps)),
        "nca_pair": lambda: -logsig(beta * lr_w) - 0.5 * logsig(-beta * lr_w) - 0.5 * logsig(-beta * lr_l),
        "robust": lambda: (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps),
        "bco_pair": lambda: -logsig(beta * lr_w) - logsig(-beta * lr_l),
        "sppo_hard": lambda: (lr_w - 0.5 / beta) ** 2 + (lr_l + 0.5 / beta) ** 2,
        "apo_zero": lambda: 1 - torch.sigmoid(beta * lr_w) + torch.sigmoid(beta * lr_l),
        "apo_down": lambda: torch.sigmoid(beta * lr_w) + 1 - torch.sigmoid(z),
        "discopop": lambda: -logsig(z) * (1 - torch.sigmoid(z / tau)) + torch.exp(-z) * torch.sigmoid(z / tau),
    }[loss_type]()


def _smoothed(z, eps):
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def liger_truth(family, kw, inputs, dtype=torch.float64):
    """``((loss, aux), (d_input, d_weight, d_bias))`` by Liger's definitions on materialised logits: the float64
    truth, or with ``dtype`` the inputs' own dtype, plain torch's result (logits in that dtype, then fp32)."""
    x64, w64 = (inputs[k].detach().to(dtype).requires_grad_() for k in ("x", "w"))
    b64 = None if inputs["b"] is None else inputs["b"].detach().to(dtype).requires_grad_()
    y, ig = inputs["y"], kw.get("ignore_index", -100)
    pairs = y.shape[0] // 2
    mask = y != ig
    tok = ref.token_logps(x64, w64, y, bias=b64, ignore_index=ig)
    n = mask.sum(-1).to(tok.dtype).clamp(min=1.0)  # fastpref's one difference: an empty sequence has log-prob 0
    means = kw.get("average_log_prob", family in ("simpo", "orpo"))
    lp = tok.sum(-1) / n if means else tok.sum(-1)
    beta = kw.get("beta", 0.1)
    aux_extra = ()
    if family == "dpo":
        if kw.get("use_ref_model", True):
            rb = inputs["ref_b"]
            ref_tok = ref.token_logps(inputs["ref_x"].to(dtype), inputs["ref_w"].to(dtype), y,
                                      bias=None if rb is None else rb.to(dtype), ignore_index=ig)
            ref_lp = ref_tok.sum(-1) / n if means else ref_tok.sum(-1)
        else:
            ref_lp = torch.zeros_like(lp)
        lr = lp - ref_lp
        per_pair = _dpo_formula(kw.get("loss_type", "sigmoid"), lr[:pairs], lr[pairs:], beta,
                                kw.get("label_smoothing", 0.0), kw.get("discopop_tau", 0.05))
        rewards = beta * lr
    elif family in ("cpo", "simpo"):
        gamma = kw.get("gamma", 0.5) if family == "simpo" else 0.0
        per_pair = _smoothed(beta * (lp[:pairs] - lp[pairs:]) - gamma, kw.get("label_smoothing", 0.0))
        rewards = beta * lp
    else:  # orpo
        top = lp.clamp(max=-torch.finfo(torch.float32).eps)  # fastpref keeps log(1 - p) finite at p = 1
        log_odds = (lp[:pairs] - lp[pairs:]) - (torch.log1p(-torch.exp(top[:pairs])) -
                                                 torch.log1p(-torch.exp(top[pairs:])))
        per_pair = -beta * F.logsigmoid(log_odds)
        rewards = beta * lp
        aux_extra = (F.logsigmoid(log_odds).mean(), log_odds.mean())
    nll_on = kw.get("compute_nll_loss", family != "dpo")
    nll_labels = inputs.get("nll_target") if family == "orpo" else None
    if nll_labels is None:
        nll = -tok[:pairs].sum() / mask[:pairs].sum()
    else:
        nll_tok = ref.token_logps(x64[:pairs], w64, nll_labels[:pairs], bias=b64, ignore_index=ig)
        nll = -nll_tok.sum() / (nll_labels[:pairs] != ig).sum()
    alpha = kw.get("alpha", 1.0)
    loss = per_pair.mean() + (alpha * nll if nll_on else 0.0)
    logits = ref.logits(x64, w64, b64)
    denom = pairs * y.shape[1] * w64.shape[0]
    aux = (lp[:pairs], lp[pairs:], logits[:pairs].sum() / denom, logits[pairs:].sum() / denom,
           nll if nll_on else torch.zeros((), dtype=tok.dtype), rewards[:pairs], rewards[pairs:], *aux_extra)
    wrt = [t for t in (x64, w64, b64) if t is not None]
    return (loss, tuple(a.detach() for a in aux)), torch.autograd.grad(loss, wrt)


# --------------------------------------------------------------------------------------------------------------
# Running both implementations


def _liger_module(family):
    import liger_kernel.chunked_loss as lk

    return {"dpo": lk.LigerFusedLinearDPOLoss, "cpo": lk.LigerFusedLinearCPOLoss,
            "simpo": lk.LigerFusedLinearSimPOLoss, "orpo": lk.LigerFusedLinearORPOLoss}[family]


CLASS_NAMES = {"dpo": "DPO", "cpo": "CPO", "simpo": "SimPO", "orpo": "ORPO"}
OURS = {"dpo": compat.LigerFusedLinearDPOLoss, "cpo": compat.LigerFusedLinearCPOLoss,
        "simpo": compat.LigerFusedLinearSimPOLoss, "orpo": compat.LigerFusedLinearORPOLoss}


def call_module(module, family, inputs):
    args = [inputs["w"], inputs["x"], inputs["y"], inputs["b"]]
    if family == "dpo":
        args += [inputs["ref_x"], inputs["ref_w"], inputs["ref_b"]]
    elif family == "orpo":
        args.append(inputs.get("nll_target"))
    return module(*args)


def grads_of(loss, inputs):
    wrt = [inputs[k] for k in ("x", "w", "b") if inputs[k] is not None]
    return torch.autograd.grad(loss, wrt)


def _cancellation(name, truth, beta, t64):
    """‖β·lp‖ / ‖reward‖ (at least 1) for a reward output, 1 for everything else."""
    if not name.endswith("_rewards"):
        return 1.0
    lp = truth[name.replace("_rewards", "_logps")].double()
    return max(1.0, float(beta * lp.norm() / t64.double().norm().clamp(min=1e-30)))


def compare(family, kw, inputs, dtype):
    """Our outputs and gradients against Liger's and the float64 truth."""
    theirs = call_module(_liger_module(family)(compiled=False, **kw), family, inputs)
    g_theirs = grads_of(theirs[0], inputs)
    ours = call_module(OURS[family](**kw), family, inputs)
    g_ours = grads_of(ours[0], inputs)
    (loss64, aux64), g64 = liger_truth(family, kw, inputs)
    if dtype != torch.float32:
        (loss_p, aux_p), g_p = liger_truth(family, kw, inputs, dtype=dtype)
        plain = (loss_p, *aux_p, *g_p)
    names = OUT_NAMES[family]
    assert isinstance(ours, tuple) and len(ours) == 2 and len(ours[1]) == len(theirs[1]) == len(names)
    pairs = [("loss", ours[0], theirs[0], loss64), *zip(names, ours[1], theirs[1], aux64),
             *zip(("d_input", "d_weight", "d_bias"), g_ours, g_theirs, g64)]
    for i, (name, a, t, t64) in enumerate(pairs):
        assert a.shape == t.shape and a.dtype == t.dtype, (name, a.shape, t.shape, a.dtype, t.dtype)
        assert torch.isfinite(a).all(), name
        e_ours, e_liger = rel_err(a, t64), rel_err(t, t64)
        if dtype == torch.float32:
            # tight: fp32 rounding of the sums and of the GEMMs (H <= 31, V <= 123); a reward β·(lp − ref) inherits
            # the rounding of lp, so its floor is relative to β·lp where the difference cancels
            floor = 1e-5 * _cancellation(name, dict(zip(names, aux64)), kw.get("beta", 0.1), t64)
            assert e_ours <= max(2 * e_liger, floor), f"{name}: error {e_ours:.2e} (Liger {e_liger:.2e})"
            torch.testing.assert_close(a, t, rtol=1e-4, atol=1e-4, msg=name)
        else:
            # Liger's and plain torch's bf16 logits are the same roundings, yet on a handful of tokens one sample can
            # favour either (fastpref's equal plain torch's here): bound by the larger of the two
            e_plain = rel_err(plain[i], t64)
            assert e_ours <= 2 * max(e_liger, e_plain) + 2e-3, (
                f"{name}: error {e_ours:.2e} > 2 x max(Liger {e_liger:.2e}, torch {e_plain:.2e}) + 2e-3")


def _cases(full, half=None, cycle=None):
    """Liger's grid, thinned: every combination of the ``full`` factors, times the half of the combinations of
    the two-valued ``half`` factors with an even number of second values (every pair of them still meets in all
    four combinations), each case taking the next value of every ``cycle`` list (lengths prime to 2, so they do
    not alias with the two-valued factors)."""
    half, cycle = half or {}, cycle or {}
    half_combos = [c for c in itertools.product(*([0, 1] for _ in half)) if sum(c) % 2 == 0]
    i = 0
    for values in itertools.product(*full.values()):
        for bits in half_combos:
            case = dict(zip(full, values))
            case.update({k: v[b] for (k, v), b in zip(half.items(), bits)})
            case.update({k: v[i % len(v)] for k, v in cycle.items()})
            i += 1
            yield case


def _case_id(case):
    parts = []
    for key, value in case.items():
        if isinstance(value, bool):
            if value:
                parts.append(key)
        elif isinstance(value, torch.dtype):
            parts.append(str(value).replace("torch.", ""))
        elif isinstance(value, tuple):
            parts.append("x".join(map(str, value)))
        else:
            parts.append(f"{key}={value}")
    return "-".join(parts)


def _params(full, half=None, cycle=None):
    cases = list(_cases(full, half, cycle))
    return pytest.mark.parametrize("case", cases, ids=[_case_id(c) for c in cases])


MINOR = {"bias": [True, False], "ignore_beta": IGNORE_BETA, "compute_nll_loss": [True, False]}
DTYPES = [torch.float32, torch.bfloat16]
ALPHAS = [1.0, 0.5, -0.3, 0.0, 2.0]


def _run_case(family, case, kw):
    dtype = case["dtype"]
    ignore_index, beta = case["ignore_beta"]
    inputs = make_batch(case["shape"], dtype, bias=case["bias"], ref_bias=case.get("ref_bias", False),
                        ignore_index=ignore_index, nll_target=case.get("nll_target", False),
                        seed=zlib.crc32(_case_id(case).encode()) % 1000)
    compare(family, dict(kw, ignore_index=ignore_index, beta=beta, compute_nll_loss=case["compute_nll_loss"]),
            inputs, dtype)


@needs_liger
@_params({"loss_type": LIGER_DPO_TYPES, "average_log_prob": [False, True], "dtype": DTYPES},
         {**MINOR, "ref_bias": [True, False]}, {"shape": SHAPES})
def test_dpo_matches_liger(case):
    t = case["loss_type"]
    kw = dict(loss_type=t, alpha=0.7, average_log_prob=case["average_log_prob"],
              label_smoothing={"robust": 0.1, "exo_pair": 0.2}.get(t, 0.0))
    _run_case("dpo", case, kw)


@needs_liger
@pytest.mark.parametrize("loss_type", LIGER_DPO_TYPES)
@pytest.mark.parametrize("average_log_prob", [False, True], ids=["sum", "average"])
def test_dpo_without_reference_matches_liger(loss_type, average_log_prob):
    kw = dict(loss_type=loss_type, use_ref_model=False, average_log_prob=average_log_prob, compute_nll_loss=True,
              label_smoothing={"robust": 0.1, "exo_pair": 0.2}.get(loss_type, 0.0))
    compare("dpo", kw, make_batch(SHAPES[1]), torch.float32)


@needs_liger
@_params({"average_log_prob": [False, True], "dtype": DTYPES}, {**MINOR, "label_smoothing": [0.0, 0.1]},
         {"shape": SHAPES, "alpha": ALPHAS})
def test_cpo_matches_liger(case):
    kw = dict(alpha=case["alpha"], label_smoothing=case["label_smoothing"], average_log_prob=case["average_log_prob"])
    _run_case("cpo", case, kw)


@needs_liger
@_params({"gamma": [0.5, 1.0], "dtype": DTYPES}, {**MINOR, "label_smoothing": [0.0, 0.1]},
         {"shape": SHAPES, "alpha": ALPHAS})
def test_simpo_matches_liger(case):
    kw = dict(alpha=case["alpha"], label_smoothing=case["label_smoothing"], gamma=case["gamma"])
    _run_case("simpo", case, kw)


@needs_liger
@_params({"nll_target": [False, True], "dtype": DTYPES, **MINOR}, cycle={"shape": SHAPES})
def test_orpo_matches_liger(case):
    _run_case("orpo", case, {})


# --------------------------------------------------------------------------------------------------------------
# The functional API: Liger's argument order, every argument passed positionally


def _liger_functions():
    from liger_kernel.chunked_loss import functional as lf

    return {"dpo": lf.liger_fused_linear_dpo, "cpo": lf.liger_fused_linear_cpo, "simpo": lf.liger_fused_linear_simpo,
            "orpo": lf.liger_fused_linear_orpo}


def _positional_args(family, inputs):
    """All of Liger's ``Function.forward`` arguments in order, none at its default."""
    x, w, y, b = inputs["x"], inputs["w"], inputs["y"], inputs["b"]
    if family == "dpo":
        # ..., ignore_index, beta, compute_nll_loss, compiled, use_ref_model, average_log_prob, chunk_size,
        # loss_type, label_smoothing, discopop_tau, alpha
        return (x, w, y, b, inputs["ref_x"], inputs["ref_w"], inputs["ref_b"], 42, 0.3, True, False, True, True, 2,
                "robust", 0.15, 0.1, 0.6)
    if family == "cpo":  # ignore_index, beta, alpha, label_smoothing, compute_nll_loss, compiled, average_log_prob
        return (x, w, y, b, 42, 0.3, 0.6, 0.15, True, False, True, 2)
    if family == "simpo":  # ignore_index, beta, alpha, label_smoothing, compute_nll_loss, compiled, gamma
        return (x, w, y, b, 42, 0.3, 0.6, 0.15, True, False, 0.8, 2)
    return (x, w, y, b, 42, 0.3, True, inputs["nll_target"], False, 2)  # orpo


@needs_liger
@pytest.mark.parametrize("family", ["dpo", "cpo", "simpo", "orpo"])
@pytest.mark.parametrize("entry", ["function", "apply"])
def test_functional_api_matches_liger(family, entry):
    inputs = make_batch(SHAPES[1], ignore_index=42, nll_target=True)
    args = _positional_args(family, inputs)
    theirs = _liger_functions()[family](*args)
    fn = getattr(compat, f"liger_fused_linear_{family}")
    if entry == "apply":
        fn = getattr(compat, f"LigerFusedLinear{CLASS_NAMES[family]}Function").apply
    ours = fn(*args)
    g_theirs, g_ours = grads_of(theirs[0], inputs), grads_of(ours[0], inputs)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-4, atol=1e-4)
    assert len(ours[1]) == len(theirs[1])
    for name, a, t in zip(OUT_NAMES[family], ours[1], theirs[1]):
        torch.testing.assert_close(a, t, rtol=1e-4, atol=1e-4, msg=name)
    for a, t in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, t, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# The one intended difference in values: a sequence with no scored token


EMPTY_CASES = [("dpo", False), ("dpo", True), ("cpo", False), ("cpo", True), ("simpo", True), ("orpo", True)]


@pytest.mark.parametrize(("family", "average_log_prob"), EMPTY_CASES,
                         ids=[f"{f}-{'average' if a else 'sum'}" for f, a in EMPTY_CASES])  # SimPO, ORPO: means
def test_sequence_without_scored_tokens_gives_zero(family, average_log_prob):
    inputs = make_batch(SHAPES[1])
    inputs["y"][1] = -100  # chosen response of pair 1: nothing scored
    kw = {"average_log_prob": average_log_prob} if family in ("dpo", "cpo") else {}
    loss, aux = call_module(OURS[family](**kw), family, inputs)
    grads = grads_of(loss, inputs)
    assert aux[0][1] == 0 and all(torch.isfinite(t).all() for t in (loss, *aux, *grads))
    assert grads[0][1].abs().max() == 0  # the empty row gets no gradient
    (loss64, aux64), g64 = liger_truth(family, kw, inputs)  # Liger's definitions with that log-prob at 0
    for a, t in zip((loss, *aux, *grads), (loss64, *aux64, *g64)):
        torch.testing.assert_close(a.double(), t, rtol=1e-4, atol=1e-4)
    if HAS_LIGER:  # Liger divides the empty row's sum by its zero token count
        _, theirs = call_module(_liger_module(family)(compiled=False, **kw), family, inputs)
        assert torch.isnan(theirs[0][1]).item() == average_log_prob


def test_ipo_works_where_liger_refuses():
    inputs = make_batch(SHAPES[1], bias=False)
    if HAS_LIGER:
        with pytest.raises(ValueError, match="Unsupported loss_type: ipo"):
            _liger_module("dpo")(loss_type="ipo", compiled=False)
    for average in (False, True):
        loss, (chosen, *_rest) = compat.LigerFusedLinearDPOLoss(loss_type="ipo", average_log_prob=average)(
            inputs["w"], inputs["x"], inputs["y"], None, inputs["ref_x"], inputs["ref_w"])
        with torch.no_grad():
            n = (inputs["y"] != -100).sum(-1)
            lp = ref.sequence_logps(inputs["x"].double(), inputs["w"].double(), inputs["y"])
            ref_lp = ref.sequence_logps(inputs["ref_x"].double(), inputs["ref_w"].double(), inputs["y"])
            h = (lp - ref_lp) / n
            expected = ((h[:2] - h[2:] - 1 / (2 * 0.1)) ** 2).mean()
        torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(chosen.double(), (lp / n if average else lp)[:2], rtol=1e-5, atol=1e-4)
