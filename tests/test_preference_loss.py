"""Fused preference losses vs a float64 materialised reference: every loss type, fast and lean, both backends."""

from __future__ import annotations

import pytest
import torch

import fastpref
from fastpref import losses as L
from fastpref import reference as ref
from tests.helpers import BACKENDS, PATH_IDS, PATHS, make_labels, rel_err

# Hyper-parameters that make every type well defined (exo_pair needs ε > 0).
HPARAMS = {
    "sigmoid": {"label_smoothing": 0.1},
    "robust": {"label_smoothing": 0.2},
    "exo_pair": {"label_smoothing": 1e-3},
    "aot": {"label_smoothing": 0.05},
}
BATCH_COUPLED = ("aot", "aot_unpaired")


def _batch(pairs=3, seq_len=23, hidden_size=24, vocab=157, *, dtype=torch.float32, with_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, seq_len, hidden_size, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(vocab, generator=g)).to(dtype).requires_grad_() if with_bias else None
    labels = make_labels(2 * pairs, seq_len, vocab, generator=g)
    ref_hidden = (hidden.detach() + 0.3 * torch.randn(hidden.shape, generator=g).to(dtype))
    refinement = 0.1 * torch.randn(pairs, generator=g)
    return hidden, weight, bias, labels, ref_hidden, refinement


def _float64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def _run_fast_or_lean(loss_type, mode, backend, hidden, weight, bias, labels, ref_hidden, refinement, **kw):
    loss_fn = fastpref.PreferenceLoss(loss_type, mode=mode, backend=backend, **HPARAMS.get(loss_type, {}), **kw)
    extra = {"refinement": refinement} if loss_type in L.NEEDS_REFINEMENT else {}
    if loss_type not in L.REFERENCE_FREE:
        extra["ref_hidden"] = ref_hidden
    out = loss_fn(hidden, weight, labels, bias=bias, **extra)
    grads = torch.autograd.grad(out.loss, [hidden, weight, bias])
    return out, grads


def _truth(loss_type, hidden, weight, bias, labels, ref_hidden, refinement):
    h64, w64, b64 = _float64(hidden, weight, bias)
    loss, per_pair, chosen, rejected = ref.preference_loss(
        h64, w64, labels, loss_type=loss_type, bias=b64, ref_hidden=ref_hidden.double(),
        refinement=refinement.double() if loss_type in L.NEEDS_REFINEMENT
        else None, **HPARAMS.get(loss_type, {}))
    grads = torch.autograd.grad(loss, [h64, w64, b64])
    return loss, per_pair, chosen, rejected, grads


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("loss_type", sorted(L.LOSS_TYPES))
def test_every_loss_type_matches_float64(loss_type, backend, gemm):
    """fp32 inputs: loss, per-pair losses, logps and the grads of hidden, weight, bias within 1e-5 (norm-wise)
    of the float64 materialised reference, in every mode the type allows; fast and lean agree."""
    batch = _batch()
    t_loss, t_pairs, t_chosen, t_rejected, t_grads = _truth(loss_type, *batch)
    modes = ["lean"] if loss_type in BATCH_COUPLED else ["fast", "lean"]
    results = {}
    for mode in modes:
        out, grads = _run_fast_or_lean(loss_type, mode, backend, *batch, gemm=gemm)
        assert out.mode == mode
        assert rel_err(out.loss, t_loss) <= 1e-5, mode
        assert rel_err(out.losses, t_pairs) <= 1e-5, mode
        assert rel_err(out.chosen_logps, t_chosen) <= 1e-5 and rel_err(out.rejected_logps, t_rejected) <= 1e-5
        for name, g, t in zip(("hidden", "weight", "bias"), grads, t_grads):
            assert rel_err(g, t) <= 1e-5 or (t.norm() == 0 and g.norm() == 0), f"{mode} d{name}"
        results[mode] = grads
    if len(results) == 2:
        for g_fast, g_lean in zip(results["fast"], results["lean"]):
            assert rel_err(g_fast, g_lean) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_inputs_get_no_gradient(backend):
    hidden, weight, bias, labels, ref_hidden, _ = _batch()
    ref_hidden = ref_hidden.clone().requires_grad_()
    ref_weight = weight.detach().clone().requires_grad_()
    for mode in ("fast", "lean"):
        out = fastpref.DPOLoss(mode=mode, backend=backend)(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden,
                                                            ref_weight=ref_weight)
        out.loss.backward()
        assert ref_hidden.grad is None and ref_weight.grad is None
        assert hidden.grad is not None and weight.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_precomputed_reference_equals_reference_hidden(backend):
    hidden, weight, bias, labels, ref_hidden, _ = _batch()
    loss_fn = fastpref.DPOLoss(backend=backend)
    live = loss_fn(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden)
    ref_logps = fastpref.sequence_logps(ref_hidden, weight.detach(), labels, bias=bias.detach(), backend=backend)
    pre = loss_fn(hidden, weight, labels, ref_logps, bias=bias)
    torch.testing.assert_close(pre.loss, live.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pre.chosen_rewards, live.chosen_rewards, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", [("sr_dpo", "sigmoid"), ("sr_ipo", "ipo")], ids=["sr_dpo", "sr_ipo"])
def test_lambda_zero_reproduces_dpo_and_ipo(backend, pair):
    sr, base = pair
    hidden, weight, bias, labels, ref_hidden, refinement = _batch()
    for mode in ("fast", "lean"):
        a = fastpref.PreferenceLoss(sr, refinement_lambda=0.0, mode=mode, backend=backend)(
            hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, refinement=refinement)
        b = fastpref.PreferenceLoss(base, mode=mode, backend=backend)(hidden, weight, labels, bias=bias,
                                                                       ref_hidden=ref_hidden)
        assert torch.equal(a.loss, b.loss) and torch.equal(a.losses, b.losses)
        ga = torch.autograd.grad(a.loss, [hidden, weight])
        gb = torch.autograd.grad(b.loss, [hidden, weight])
        for x, y in zip(ga, gb):
            assert torch.equal(x, y)


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("loss_type", ["sr_dpo", "sr_ipo"])
def test_refinement_from_augmented_batch_equals_precomputed(backend, gemm, loss_type):
    """Δ computed inside from the p ⊕ x batch (policy and reference, forward-only, no grad) equals Δ given."""
    hidden, weight, bias, labels, ref_hidden, _ = _batch()
    g = torch.Generator().manual_seed(5)
    refine_hidden = torch.randn(6, 31, 24, generator=g)
    refine_ref_hidden = refine_hidden + 0.2 * torch.randn(refine_hidden.shape, generator=g)
    refine_labels = make_labels(6, 31, 157, prompt_frac=0.45, generator=g)
    beta = 0.1
    with torch.no_grad():
        pol = ref.sequence_logps(refine_hidden.double(), weight.double(), refine_labels, bias=bias.double())
        rf = ref.sequence_logps(refine_ref_hidden.double(), weight.double(), refine_labels, bias=bias.double())
        ratio = pol - rf
        if loss_type == "sr_ipo":
            ratio = ratio / (refine_labels != -100).sum(-1).clamp(min=1)
        delta = (beta * (ratio[:3] - ratio[3:])).float()
    loss_fn = fastpref.PreferenceLoss(loss_type, beta=beta, refinement_lambda=0.7, backend=backend, gemm=gemm)
    inside = loss_fn(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, refine_hidden=refine_hidden,
                     refine_labels=refine_labels, refine_ref_hidden=refine_ref_hidden)
    given = loss_fn(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, refinement=delta)
    torch.testing.assert_close(inside.loss, given.loss, rtol=1e-5, atol=1e-6)
    gi = torch.autograd.grad(inside.loss, hidden)[0]
    gg = torch.autograd.grad(given.loss, hidden)[0]
    assert rel_err(gi, gg) <= 1e-5


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_gradient_accumulation_is_exact(backend, gemm, mode):
    """Two half batches, each loss scaled by 1/2, summed, equal one batch (sigmoid is a mean over pairs)."""
    hidden, weight, bias, labels, ref_hidden, _ = _batch(pairs=4)
    loss_fn = fastpref.DPOLoss(mode=mode, backend=backend, gemm=gemm)
    full = torch.autograd.grad(loss_fn(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden).loss,
                               [hidden, weight, bias])
    halves = [torch.zeros_like(t) for t in (hidden, weight, bias)]
    for idx in (torch.tensor([0, 1, 4, 5]), torch.tensor([2, 3, 6, 7])):
        h = hidden.detach()[idx].requires_grad_()
        out = loss_fn(h, weight, labels[idx], bias=bias, ref_hidden=ref_hidden[idx])
        gh, gw, gb = torch.autograd.grad(0.5 * out.loss, [h, weight, bias])
        halves[0][idx] += gh
        halves[1] += gw
        halves[2] += gb
    for a, b in zip(halves, full):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
def test_upstream_gradient_scaling_fast_mode(backend, gemm):
    hidden, weight, bias, labels, ref_hidden, _ = _batch()
    loss_fn = fastpref.IPOLoss(mode="fast", backend=backend, gemm=gemm)
    g1 = torch.autograd.grad(loss_fn(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden).loss,
                             [hidden, weight, bias])
    out = loss_fn(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden)
    g3 = torch.autograd.grad(-3.0 * out.loss, [hidden, weight, bias], retain_graph=True)
    for a, b in zip(g1, g3):
        # the last dW GEMM takes s·h instead of scaling dW afterwards: equal up to fp32 rounding (norm-wise)
        assert rel_err(b, -3.0 * a) <= 1e-6
    with pytest.raises(RuntimeError, match=r"backpropagating through it twice .* needs mode='lean'"):
        torch.autograd.grad(out.loss, [hidden, weight, bias])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_free(backend):
    hidden, weight, bias, labels, _, _ = _batch()
    out = fastpref.DPOLoss(reference_free=True, backend=backend)(hidden, weight, labels, bias=bias)
    chosen, rejected = out.chosen_logps, out.rejected_logps
    expected = -torch.nn.functional.logsigmoid(0.1 * (chosen - rejected)).mean()
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, 0.1 * chosen)


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
def test_packed_pairs_equal_padded(backend, gemm):
    hidden, weight, bias, labels, ref_hidden, _ = _batch()
    padded = fastpref.DPOLoss(backend=backend, gemm=gemm)(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden)
    g_pad = torch.autograd.grad(padded.loss, [hidden, weight])
    flat_h = hidden.detach().reshape(-1, 24).requires_grad_()
    seq_ids = torch.arange(6).repeat_interleave(23)
    perm = torch.randperm(flat_h.shape[0])
    packed = fastpref.DPOLoss(backend=backend, gemm=gemm)(
        flat_h[perm], weight, labels.reshape(-1)[perm], bias=bias, ref_hidden=ref_hidden.reshape(-1, 24)[perm],
        seq_ids=seq_ids[perm], num_seqs=6)
    g_pack = torch.autograd.grad(packed.loss, [flat_h, weight])
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
    assert rel_err(g_pack[0], g_pad[0].reshape(-1, 24)) <= 1e-5 and rel_err(g_pack[1], g_pad[1]) <= 1e-5


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
def test_metrics_match_reference_and_trl_names(backend, gemm):
    hidden, weight, bias, labels, ref_hidden, _ = _batch()
    out = fastpref.DPOLoss(backend=backend, gemm=gemm, token_metrics=True)(hidden, weight, labels, bias=bias,
                                                                 ref_hidden=ref_hidden)
    z = ref.logits(hidden.double(), weight.double(), bias.double())
    mask = labels != -100
    chosen_mask, rejected_mask = mask.clone(), mask.clone()
    chosen_mask[3:], rejected_mask[:3] = False, False
    m = out.metrics
    torch.testing.assert_close(m["logits/chosen"].double(), z.mean(-1)[chosen_mask].mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["logits/rejected"].double(), z.mean(-1)[rejected_mask].mean(), rtol=1e-5, atol=1e-6)
    logp = torch.log_softmax(z, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(m["entropy"].double(), entropy[mask].mean(), rtol=1e-5, atol=1e-6)
    top1 = (z.argmax(-1) == labels)[chosen_mask].double().mean()
    torch.testing.assert_close(m["mean_token_accuracy"].double(), top1)
    cr, rr = out.chosen_rewards, out.rejected_rewards
    assert m["rewards/accuracies"] == (cr > rr).float().mean()
    torch.testing.assert_close(m["rewards/margins"], (cr - rr).mean())
    torch.testing.assert_close(m["logps/chosen"], out.chosen_logps.mean())
    assert set(m) >= {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                      "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_choice(backend):
    hidden, weight, bias, labels, ref_hidden, _ = _batch()
    kw = dict(bias=bias, ref_hidden=ref_hidden)
    assert fastpref.DPOLoss(backend=backend)(hidden, weight, labels, **kw).mode == "fast"
    with torch.no_grad():
        assert fastpref.DPOLoss(backend=backend)(hidden, weight, labels, **kw).mode == "forward"
    assert fastpref.PreferenceLoss("aot", backend=backend)(hidden, weight, labels, **kw).mode == "lean"
    tiny = fastpref.DPOLoss(backend=backend, memory_budget=1024)
    assert tiny(hidden, weight, labels, **kw).mode == "lean"
    with pytest.raises(ValueError, match=r"memory_budget: mode='fast' needs one pair's logits in the budget"):
        fastpref.DPOLoss(backend=backend, memory_budget=1024, mode="fast")(hidden, weight, labels, **kw)


def test_explicit_fast_mode_on_batch_coupled_loss_raises():
    for loss_type in BATCH_COUPLED:
        with pytest.raises(ValueError, match=r"mode: 'fast' needs a pair-separable loss"):
            fastpref.PreferenceLoss(loss_type, mode="fast")


def test_bad_arguments_raise_clear_errors():
    hidden, weight, _, labels, ref_hidden, _ = _batch()
    with pytest.raises(ValueError, match=r"even number of sequences.*got 5"):
        fastpref.DPOLoss()(hidden[:5], weight, labels[:5], ref_hidden=ref_hidden[:5])
    with pytest.raises(ValueError, match=r"ref_logps: loss_type \['sigmoid'\] needs the reference log-probs"):
        fastpref.DPOLoss()(hidden, weight, labels)
    with pytest.raises(ValueError, match=r"ref_logps: expected shape \[6\], got \(3,\)"):
        fastpref.DPOLoss()(hidden, weight, labels, torch.zeros(3))
    with pytest.raises(ValueError, match=r"refinement: loss_type \['sr_dpo'\] needs the refinement margin"):
        fastpref.SrDPOLoss()(hidden, weight, labels, ref_hidden=ref_hidden)
    with pytest.raises(ValueError, match=r"only used by sr_dpo and sr_ipo"):
        fastpref.DPOLoss()(hidden, weight, labels, ref_hidden=ref_hidden, refinement=torch.zeros(3))
    with pytest.raises(ValueError, match=r"mode: expected one of \['auto', 'fast', 'lean'\], got 'quick'"):
        fastpref.DPOLoss(mode="quick")
    with pytest.raises(ValueError, match=r"memory_budget: expected a positive int"):
        fastpref.DPOLoss(memory_budget=-1)
    with pytest.raises(ValueError, match=r"ref_hidden: expected shape"):
        fastpref.DPOLoss()(hidden, weight, labels, ref_hidden=ref_hidden[:, :3])
    with pytest.raises(ValueError, match=r"loss_type"):
        fastpref.PreferenceLoss("dpo")
    for bad_beta in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"beta"):
            fastpref.DPOLoss(beta=bad_beta)
    with pytest.raises(ValueError, match=r"label_smoothing"):
        fastpref.PreferenceLoss("robust", label_smoothing=0.5)


@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_all_ignored_pair_is_finite(mode):
    hidden, weight, bias, labels, ref_hidden, _ = _batch()
    labels[1] = -100
    labels[4] = -100
    for loss_type in ("sigmoid", "ipo", "orpo", "simpo", "sigmoid_norm"):
        out = fastpref.PreferenceLoss(loss_type, mode=mode)(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden)
        grads = torch.autograd.grad(out.loss, [hidden, weight])
        assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads), loss_type
        assert out.chosen_logps[1] == 0 and out.rejected_logps[1] == 0


def test_torch_compile_step_matches_eager():
    """A compiled training step calling the module runs (a clean graph break around the op) and matches eager."""
    hidden, weight, bias, labels, ref_hidden, _ = _batch()
    proj = torch.nn.Linear(24, 24)
    loss_fn = fastpref.DPOLoss(backend="torch")

    def step(x):
        out = loss_fn(proj(x), weight, labels, bias=bias, ref_hidden=ref_hidden)
        return out.loss * 2.0

    x = hidden.detach()
    eager = step(x)
    g_eager = torch.autograd.grad(eager, [proj.weight, weight])
    compiled = torch.compile(step, backend="eager")(x)
    g_comp = torch.autograd.grad(compiled, [proj.weight, weight])
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
def test_bf16_fast_and_lean_within_twice_torch_error(backend, gemm):
    """bf16: the fused loss and its grads vs float64 within 2x the materialised bf16 torch path's error."""
    from tests.helpers import assert_within_torch_error

    hidden, weight, bias, labels, ref_hidden, _ = _batch(pairs=2, seq_len=33, hidden_size=32, vocab=411,
                                                          dtype=torch.bfloat16)
    plain_loss, *_ = ref.preference_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden)
    plain = torch.autograd.grad(plain_loss, [hidden, weight, bias])
    h64, w64, b64 = _float64(hidden, weight, bias)
    t_loss, *_ = ref.preference_loss(h64, w64, labels, bias=b64, ref_hidden=ref_hidden.double())
    truth = torch.autograd.grad(t_loss, [h64, w64, b64])
    for mode in ("fast", "lean"):
        out = fastpref.DPOLoss(mode=mode, backend=backend, gemm=gemm)(hidden, weight, labels, bias=bias,
                                                                     ref_hidden=ref_hidden)
        grads = torch.autograd.grad(out.loss, [hidden, weight, bias])
        assert_within_torch_error(f"{mode} loss", out.loss, plain_loss, t_loss, atol=1e-4)
        for name, g, p, t in zip(("hidden", "weight", "bias"), grads, plain, truth):
            assert g.dtype == torch.bfloat16
            assert_within_torch_error(f"{mode} d{name}", g, p, t, atol=1e-3)


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_reference_equal_to_policy_gives_exactly_zero_rewards(backend, gemm, mode):
    """At step 0 of training the reference is the policy: rewards must be exactly 0 (TRL logs accuracy 0 there),
    so the reference pass scores tokens exactly as the policy pass does."""
    hidden, weight, bias, labels, _, _ = _batch()
    out = fastpref.DPOLoss(mode=mode, backend=backend, gemm=gemm)(hidden, weight, labels, bias=bias,
                                                        ref_hidden=hidden.detach())
    assert out.mode == mode
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)
    assert out.metrics["rewards/accuracies"] == 0


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("mode", ["auto", "lean"])
def test_score_gives_reference_sums_bit_identical_to_the_policy_pass(backend, gemm, mode):
    hidden, weight, bias, labels, _, _ = _batch()
    loss_fn = fastpref.DPOLoss(mode=mode, backend=backend, gemm=gemm)
    ref_logps = loss_fn.score(hidden, weight, labels, bias=bias)
    assert ref_logps.shape == (6,) and not ref_logps.requires_grad
    out = loss_fn(hidden, weight, labels, ref_logps, bias=bias)
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)
    truth = ref.sequence_logps(hidden.double(), weight.double(), labels, bias=bias.double())
    assert rel_err(ref_logps, truth) <= 1e-5
