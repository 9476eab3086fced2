"""fastpref.compat's Liger-Kernel 0.8.5 drop-ins: signatures, error messages, work done, and life without Liger."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastpref import compat
from tests.test_compat import CLASS_NAMES, OURS, call_module, grads_of, make_batch

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
needs_liger = pytest.mark.skipif(not HAS_LIGER, reason="needs liger-kernel (dev extra)")
pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["dpo", "cpo", "simpo", "orpo"]


def _params(fn):
    return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]


@needs_liger
@pytest.mark.parametrize("family", FAMILIES)
def test_signatures_are_liger_0_8_5(family):
    import liger_kernel.chunked_loss as lk
    from liger_kernel.chunked_loss import functional as lf

    name = CLASS_NAMES[family]
    theirs_cls, ours_cls = getattr(lk, f"LigerFusedLinear{name}Loss"), OURS[family]
    assert _params(ours_cls.__init__) == _params(theirs_cls.__init__)
    assert [p[:2] for p in _params(ours_cls.forward)] == [p[:2] for p in _params(theirs_cls.forward)]
    # the functional API is Function.apply, whose arguments are those of Function.forward after ctx
    theirs_fn = getattr(lf, f"liger_fused_linear_{family}")
    forward = inspect.signature(theirs_fn.__self__.forward)
    expected = [(p.name, p.default) for p in forward.parameters.values()][1:]
    assert expected[0][0] == "_input"
    ours_fn = getattr(compat, f"liger_fused_linear_{family}")
    assert [p[:2] for p in _params(ours_fn)] == expected
    assert getattr(compat, f"LigerFusedLinear{name}Function").apply is ours_fn


# --------------------------------------------------------------------------------------------------------------
# Errors name the caller's arguments; where Liger raises, its own message comes first


def _call(family, entry, inputs, **kw):
    if entry == "module":
        return call_module(OURS[family](**kw), family, inputs)
    fn = getattr(compat, f"liger_fused_linear_{family}")
    x, w, y, b = inputs["x"], inputs["w"], inputs["y"], inputs["b"]
    if family == "dpo":
        return fn(x, w, y, b, inputs["ref_x"], inputs["ref_w"], inputs["ref_b"], **kw)
    if family == "orpo":
        kw = {"nll_target": inputs.get("nll_target"), **kw}
    return fn(x, w, y, b, **kw)


def _odd(inputs):
    """A batch of 3: what Liger's own tests pass as (3, 47, 31, 123)."""
    return {k: v[:3] if k in ("x", "y", "ref_x", "nll_target") else v for k, v in inputs.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("average_log_prob", [False, True], ids=["sum", "average"])
@pytest.mark.parametrize("entry", ["module", "function"])
def test_odd_batch_names_input(family, average_log_prob, entry):
    kw = {"average_log_prob": average_log_prob} if family in ("dpo", "cpo") else {}
    inputs = _odd(make_batch((4, 9, 16, 37)))
    with pytest.raises(ValueError, match=r"^_input: the batch must be even \(first half chosen, second half "
                                         r"rejected\): expected _input.shape\[0\] even and > 0, got 3 "):
        _call(family, entry, inputs, **kw)
    # a target that does not pair up with the input is named too
    inputs = make_batch((4, 9, 16, 37))
    inputs["y"] = inputs["y"][:3]
    with pytest.raises(ValueError, match=r"^target: expected shape \(4, 9\) \(_input.shape\[:-1\]; the batch must "
                                         r"be even: first half chosen, second half rejected\), got \(3, 9\)"):
        _call(family, entry, inputs, **kw)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("missing", ["x", "y"])
def test_missing_input_or_target_is_a_type_error_naming_it(family, missing):
    inputs = make_batch((4, 9, 16, 37))
    inputs[missing] = None
    name = {"x": "_input", "y": "target"}[missing]
    with pytest.raises(TypeError, match=rf"^{name}: expected a torch.Tensor, got NoneType"):
        _call(family, "module", inputs)


def _liger_message(fn) -> str:
    with pytest.raises(ValueError) as e:
        fn()
    return str(e.value)


@pytest.mark.parametrize("entry", ["module", "function"])
def test_unknown_loss_type_starts_with_liger_wording(entry):
    inputs = make_batch((4, 9, 16, 37))
    with pytest.raises(ValueError) as e:
        if entry == "module":
            compat.LigerFusedLinearDPOLoss(loss_type="dpo")
        else:
            _call("dpo", "function", inputs, loss_type="dpo")
    msg = str(e.value)
    supported = ", ".join(sorted(compat.dpo.SUPPORTED_LOSS_TYPES))
    assert msg.startswith(f"Unsupported loss_type: dpo. Supported types are: {supported} ")
    assert msg.endswith(f"(loss_type: expected one of {sorted(compat.dpo.SUPPORTED_LOSS_TYPES)}, got 'dpo')")


SMOOTHING_CASES = [
    ("exo_pair", 0.0, "label_smoothing must be > 0 for loss_type='exo_pair'. The EXO paper recommends 1e-3.",
     r"label_smoothing: expected a finite number in \(0, 0.5\] for loss_type 'exo_pair'.*got 0.0\)$"),
    ("exo_pair", -0.1, "label_smoothing must be > 0 for loss_type='exo_pair'. The EXO paper recommends 1e-3.",
     r"got -0.1\)$"),
    ("robust", 0.5, "label_smoothing must lie in [0.0, 0.5) for loss_type='robust'. Got 0.5.",
     r"label_smoothing: expected a finite number in \[0, 0.5\) for loss_type 'robust'.*got 0.5\)$"),
    ("robust", -0.2, "label_smoothing must lie in [0.0, 0.5) for loss_type='robust'. Got -0.2.", r"got -0.2\)$"),
]


@pytest.mark.parametrize(("loss_type", "eps", "liger_text", "detail"), SMOOTHING_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in SMOOTHING_CASES])
@pytest.mark.parametrize("entry", ["module", "function"])
def test_bad_label_smoothing_starts_with_liger_wording(loss_type, eps, liger_text, detail, entry):
    inputs = make_batch((4, 9, 16, 37))
    with pytest.raises(ValueError, match=detail) as e:
        if entry == "module":
            compat.LigerFusedLinearDPOLoss(loss_type=loss_type, label_smoothing=eps)
        else:
            _call("dpo", "function", inputs, loss_type=loss_type, label_smoothing=eps)
    assert str(e.value).startswith(liger_text + " (")
    if HAS_LIGER:  # the text is Liger's, verbatim
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        assert str(e.value).startswith(_liger_message(
            lambda: LigerFusedLinearDPOLoss(loss_type=loss_type, label_smoothing=eps)))
    if loss_type == "robust" and entry == "module":
        compat.LigerFusedLinearDPOLoss(loss_type="robust", label_smoothing=0.49)  # the range's inside is accepted


def test_arguments_liger_accepts_but_the_formulas_do_not():
    with pytest.raises(ValueError, match=r"^beta: expected a finite number in \(0, 3\.403e\+38\], got 0"):
        compat.LigerFusedLinearDPOLoss(beta=0)
    with pytest.raises(ValueError, match=r"^label_smoothing: .*\[0, 0.5\] for loss_type 'cpo'.*got 0.7"):
        compat.LigerFusedLinearCPOLoss(label_smoothing=0.7)
    with pytest.raises(ValueError, match=r"^gamma: .*got -1.0"):
        compat.LigerFusedLinearSimPOLoss(gamma=-1.0)
    with pytest.raises(TypeError, match=r"^ignore_index: expected an int, got 1.5"):
        compat.LigerFusedLinearORPOLoss(ignore_index=1.5)
    # Liger's sigmoid ignores label_smoothing (no cDPO), so does the drop-in, whatever its value
    compat.LigerFusedLinearDPOLoss(loss_type="sigmoid", label_smoothing=3.0)


# Each float hyper-parameter of each drop-in, with a loss type that reads it (Liger's argument names).
_HPARAMS = [(family, name, kw) for family, names in (
    ("dpo", {"beta": {}, "alpha": {"compute_nll_loss": True}, "label_smoothing": {"loss_type": "robust"},
             "discopop_tau": {"loss_type": "discopop"}}),
    ("dpo", {"alpha": {"compute_nll_loss": True, "average_log_prob": True, "loss_type": "hinge"}}),  # lean run
    ("cpo", {"beta": {}, "alpha": {"compute_nll_loss": True}, "label_smoothing": {}}),
    ("simpo", {"beta": {}, "alpha": {"compute_nll_loss": True}, "label_smoothing": {}, "gamma": {}}),
    ("orpo", {"beta": {}}),
) for name, kw in names.items()]


@pytest.mark.parametrize("entry", ["module", "function"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e39, None, "0.1"],
                         ids=["nan", "inf", "-inf", "beyond-fp32", "None", "str"])
@pytest.mark.parametrize(("family", "name", "kw"), _HPARAMS,
                         ids=[f"{f}-{n}{'-lean' if 'hinge' in str(k) else ''}" for f, n, k in _HPARAMS])
def test_bad_hyper_parameters_are_named_as_liger_names_them(family, name, kw, value, entry):
    """No internal name (loss_weights, simpo_gamma) in the message: the argument the caller passed, first."""
    inputs = make_batch((4, 5, 8, 11))
    with pytest.raises((TypeError, ValueError), match=rf"^{name}\b"):
        _call(family, entry, inputs, **kw, **{name: value})


def test_an_unused_alpha_is_not_checked_as_in_liger():
    inputs = make_batch((4, 5, 8, 11))
    for family in ("dpo", "cpo", "simpo"):
        loss = _call(family, "module", inputs, compute_nll_loss=False, alpha=float("nan"))[0]
        assert torch.isfinite(loss)


@pytest.mark.parametrize("entry", ["module", "function"])
def test_fastpref_errors_use_liger_argument_names(entry):
    inputs = make_batch((4, 9, 16, 37))
    bad = dict(inputs, y=inputs["y"].clone())
    bad["y"][0, 0] = 37  # = V
    with pytest.raises(ValueError, match=r"^target: values must be in \[0, vocab_size=37\)"):
        _call("dpo", entry, bad)
    weight_name = "lin_weight" if entry == "module" else "weight"
    bad = dict(inputs, w=inputs["w"][:, :5])
    with pytest.raises(ValueError, match=rf"^{weight_name}: expected \[V, H\] with H = _input.shape\[-1\] = 16"):
        _call("cpo", entry, bad)
    bad = dict(inputs, ref_x=inputs["ref_x"][:, :4])
    with pytest.raises(ValueError, match=r"^ref_input: expected a tensor \[B, T, H_ref\] with \(B, T\) = \(4, 9\)"):
        _call("dpo", entry, bad)
    bad = dict(inputs, ref_w=inputs["ref_w"][:, :5])
    with pytest.raises(ValueError, match=r"^ref_weight: expected \[V, H\] with H = ref_input.shape\[-1\] = 16"):
        _call("dpo", entry, bad)
    with pytest.raises(ValueError, match=r"^nll_target: expected shape \(4, 9\) \(that of target\), got \(4, 8\)"):
        _call("orpo", entry, dict(inputs, nll_target=inputs["y"][:, :8]))
    with pytest.raises(ValueError, match=r"^ref_input: use_ref_model=True needs"):
        compat.LigerFusedLinearDPOLoss()(inputs["w"], inputs["x"], inputs["y"])


# --------------------------------------------------------------------------------------------------------------
# Behaviour Liger users rely on


def test_hyper_parameters_are_read_at_each_call():
    inputs = make_batch((4, 9, 16, 37))
    module = compat.LigerFusedLinearDPOLoss(beta=0.1)
    module.beta, module.loss_type, module.average_log_prob = 0.3, "hinge", True
    got = call_module(module, "dpo", inputs)[0]
    fresh = call_module(compat.LigerFusedLinearDPOLoss(beta=0.3, loss_type="hinge", average_log_prob=True), "dpo",
                        inputs)[0]
    assert got.item() == fresh.item()
    module.loss_type = "dpo"
    with pytest.raises(ValueError, match=r"^Unsupported loss_type: dpo"):
        call_module(module, "dpo", inputs)


@pytest.mark.parametrize(("family", "kw"), [("dpo", {}), ("dpo", {"average_log_prob": True, "loss_type": "hinge"}),
                                            ("orpo", {"compute_nll_loss": False})], ids=["fused", "lean", "orpo-lean"])
def test_upstream_gradient_scales_the_gradients(family, kw):
    inputs = make_batch((4, 9, 16, 37))
    loss = call_module(OURS[family](**kw), family, inputs)[0]
    once = grads_of(loss, inputs)
    loss = call_module(OURS[family](**kw), family, inputs)[0]
    scaled = grads_of(-2.5 * loss, inputs)
    for a, b in zip(once, scaled):
        torch.testing.assert_close(b, -2.5 * a)


def test_reference_equal_to_policy_gives_zero_rewards():
    inputs = make_batch((4, 9, 16, 37))
    inputs.update(ref_x=inputs["x"].detach(), ref_w=inputs["w"].detach(), ref_b=inputs["b"].detach())
    for average in (False, True):
        loss, aux = call_module(compat.LigerFusedLinearDPOLoss(average_log_prob=average), "dpo", inputs)
        assert aux[5].abs().max() == 0 and aux[6].abs().max() == 0
        torch.testing.assert_close(loss.item(), 0.6931471805599453)  # log 2


# --------------------------------------------------------------------------------------------------------------
# Work done: fastpref's forward is 2·n·H·V FLOPs (+ 2·n·H·V for the reference); its fused fast path forms the
# gradient of the logits during the forward and runs the dH GEMM there (2·n·H·V more) and the last group's dW
# GEMM in the backward (2·n·H·V); its lean path recomputes in backward (6·n·H·V).


def _flops(fn):
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, counter.get_total_flops()


FLOP_CASES = [
    # family, kwargs, (forward, backward) in units of n·H·V, with the reference's 2 in the forward
    ("dpo", {}, (6, 2)),
    ("dpo", {"average_log_prob": True}, (6, 2)),  # sigmoid on means is fused (sigmoid_norm)
    ("dpo", {"average_log_prob": True, "compute_nll_loss": True}, (6, 2)),
    ("dpo", {"average_log_prob": True, "loss_type": "ipo"}, (6, 2)),
    ("dpo", {"average_log_prob": True, "use_ref_model": False}, (4, 2)),
    ("dpo", {"average_log_prob": True, "loss_type": "hinge"}, (4, 6)),  # lean: no fastpref type on means
    ("cpo", {"average_log_prob": True}, (4, 2)),
    ("cpo", {}, (4, 2)),
    ("simpo", {}, (4, 2)),
    ("orpo", {}, (4, 2)),
    ("orpo", {"compute_nll_loss": False}, (2, 6)),
]


@pytest.mark.parametrize(("family", "kw", "expected"), FLOP_CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items()) or 'default'}"
                              for c in FLOP_CASES])
def test_flops_per_path(family, kw, expected):
    inputs = make_batch((4, 24, 16, 64))  # half the positions ignored: materialising would cost about twice
    inputs["y"][:, : inputs["y"].shape[1] // 3] = -100
    n = int((inputs["y"] != -100).sum())
    unit = n * 16 * 64
    (loss, _aux), forward = _flops(lambda: call_module(OURS[family](**kw), family, inputs))
    _, backward = _flops(lambda: grads_of(loss, inputs))
    # within 1 %: a few O(n·H + V·H) terms (the logits means' sums) are not GEMMs
    assert abs(forward / unit - expected[0]) < 0.01 * expected[0], f"forward {forward / unit:.3f} n·H·V"
    assert backward / unit <= expected[1] * 1.01 + 1e-9, f"backward {backward / unit:.3f} n·H·V"
    assert backward / unit >= expected[1] * 0.99, f"backward {backward / unit:.3f} n·H·V"


# --------------------------------------------------------------------------------------------------------------
# Life without Liger, and a light import


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          cwd="/").stdout.strip()


def test_import_fastpref_does_not_load_compat_or_liger():
    out = _run("import sys, fastpref\n"
               "print('fastpref.compat' in sys.modules, any(m.startswith('liger_kernel') for m in sys.modules))\n"
               "import fastpref.compat\n"
               "print(any(m.startswith('liger_kernel') for m in sys.modules))")
    assert out.splitlines() == ["False False", "False"]


def test_drop_ins_work_without_liger_installed():
    out = _run(
        "import sys\n"
        "sys.modules['liger_kernel'] = None  # import liger_kernel now raises ImportError\n"
        "import torch\n"
        "from fastpref.compat import LigerFusedLinearDPOLoss, liger_fused_linear_orpo\n"
        "x = torch.randn(2, 5, 8, requires_grad=True); w = torch.randn(11, 8, requires_grad=True)\n"
        "y = torch.randint(0, 11, (2, 5))\n"
        "loss, aux = LigerFusedLinearDPOLoss()(w, x, y, None, torch.randn(2, 5, 8))\n"
        "loss.backward()\n"
        "loss2, aux2 = liger_fused_linear_orpo(x, w, y)\n"
        "print(len(aux), len(aux2), bool(torch.isfinite(x.grad).all()))"
    )
    assert out == "7 9 True"


@pytest.mark.parametrize("family", FAMILIES)
def test_class_docstrings_state_the_differences(family):
    doc = OURS[family].__doc__
    assert "Differences from Liger 0.8.5" in doc
    assert "a sequence with no scored token has log-prob 0" in " ".join(doc.split())
