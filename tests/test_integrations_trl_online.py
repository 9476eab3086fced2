"""Fast mode of ``FastPrefGRPOTrainer`` / ``FastPrefRLOOTrainer`` (``fastpref_mode="auto"``, the default): TRL's
``_compute_loss`` runs while the head knows the loss it will feed (``trl_head.PredictedLoss``), the head's forward
forms that loss's gradient, and the backward checks it before using it.

Trainer level: flag on vs stock TRL 1.16, metric by metric over four SGD steps on a tiny offline Llama (TRL's own
seeded generation: both runs see the same completions), for every ``loss_type`` with the options that change the
formula; ``fastpref_head_paths`` shows that fast mode ran (or, where it must not, that it did not). FLOPs counted
at the trainer's step: lean − fast = 2·n·H·V for the policy. The check itself: a wrong prediction is recomputed,
counted and warned, and the result is still TRL's.
"""

from __future__ import annotations

import collections
import re
import warnings

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from fastpref.kernels.launch import count_flops  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from fastpref.integrations.trl_head import (  # noqa: E402
    PredictedLoss,
    _predicted_request,
    fused_head_fields,
    has_fastpref_head,
    prediction_scale,
)
from fastpref.integrations.trl_trainers import FastPrefGRPOConfig, FastPrefGRPOTrainer, grpo_step  # noqa: E402
from fastpref.losses.policy import Normalisation, PolicyLossConfig, PolicyStep, RlooStep, policy_loss, rloo_loss  # noqa: E402
from fastpref.ops import HeadPass, LogitTransform  # noqa: E402
from fastpref.ops.fast_token_loss import token_groups  # noqa: E402
from fastpref.ops.plan import DEFAULT_BUDGET_CAP  # noqa: E402
from fastpref.testing.toy import toy_llama  # noqa: E402
from fastpref.utils.memory import AllocationTracker  # noqa: E402
from tests.helpers import PATH_IDS, PATHS  # noqa: E402
from tests.test_integrations_trl_head import (  # noqa: E402
    ONLINE_METRICS,
    TRANSFORMS,
    _common,
    _logs,
    _online,
    _reference,
    _reward,
    toy_path,  # noqa: F401  (the fixture)
)

pytestmark = pytest.mark.usefixtures("one_thread")

# -- head level: the predicted loss's gradient against float64, every path and dtype ------------------------------

HEAD_LOSSES = {
    "dapo-beta": lambda: PolicyLossConfig(loss_type="dapo", beta=0.04),
    "grpo-entropy-delta": lambda: PolicyLossConfig(loss_type="grpo", entropy_coef=0.1, delta=1.2),
    "gspo-beta": lambda: PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence", beta=0.04),
    "rloo": lambda: None,
}
DTYPES = {"fp32-std10": (torch.float32, 10.0), "fp32-std30": (torch.float32, 30.0),
          "bf16-std20": (torch.bfloat16, 20.0), "fp16-std10": (torch.float16, 10.0)}


def _head_batch(dtype, std, rows=3, length=9, window=6, h=24, v=301, seed=0):
    """A TRL head call's inputs: hidden [B, L, H], labels [B, L] scored in the last ``window`` columns (the
    completion) up to random padding, and the loss's old / reference log-probs near the exact ones."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, length, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * std / h ** 0.5).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype)
    labels = torch.randint(0, v, (rows, length), generator=g)
    labels[:, : length - window] = -100
    labels[0, -2:] = -100  # padding after an early EOS
    mask = (labels[:, -window:] != -100).long()
    adv = torch.randn(rows, generator=g)
    noise = torch.randn(2, rows, window, generator=g)
    return hidden, weight, bias, labels, mask, adv, noise


def _head_loss(name, fields, mask, adv, old, ref):
    """TRL's loss of the head's fields (their last T columns)."""
    t = mask.shape[1]
    lp, ent = fields[0][:, -t:], fields[1][:, -t:]
    cfg = HEAD_LOSSES[name]()
    if cfg is None:
        return rloo_loss(lp, (old * mask).sum(1), mask, adv)
    norm = Normalisation(num_items_in_batch=float(mask.sum()))
    return policy_loss(cfg, lp, mask, adv, norm=norm, entropies=ent, old_logps=old, ref_logps=ref).loss


def _step(name, mask, adv, old, ref):
    cfg = HEAD_LOSSES[name]()
    if cfg is None:
        return RlooStep(mask, (old * mask).sum(1), adv)
    return PolicyStep(cfg, mask, adv, Normalisation(num_items_in_batch=float(mask.sum())), old_logps=old,
                      ref_logps=ref if cfg.beta else None)


# every loss and dtype on the PyTorch path; bf16 on each Triton path (the interpreter is slow) for the policy losses
HEAD_GRID = [pytest.param(loss, dtype_std, path, id=f"{path_id}-{dtype_std}-{loss}")
             for path, path_id in zip(PATHS, PATH_IDS) for dtype_std in DTYPES for loss in HEAD_LOSSES
             if path[0] == "torch" or (dtype_std == "bf16-std20" and loss != "rloo")]


@pytest.mark.parametrize("loss,dtype_std,path", HEAD_GRID)
def test_predicted_loss_gradient_matches_float64(loss, dtype_std, path):
    """The fast pass's gradient of TRL's loss (formed in the forward, used after the check) against float64
    materialised logits, at logit std 10-30 with a softcapped, scaled, tempered transform, odd shapes, row groups
    that split sequences (or keep them whole): as close to lean mode's (the recompute) as half the plain same-dtype
    path's error, and within 2x the error of the plain path or of lean mode (RLOO's exp(Σ log p) turns one
    rounding of a sum into the whole gradient's error: which of two same-dtype paths errs more is chance)."""
    backend, gemm = path
    dtype, std = DTYPES[dtype_std]
    t = TRANSFORMS["T0.7-softcap30-scale1.3"]
    hidden, weight, bias, labels, mask, adv, noise = _head_batch(dtype, std)
    h64, w64, b64 = (x.double().requires_grad_() for x in (hidden, weight, bias))
    flat = labels.reshape(-1)
    exact = [x.reshape(labels.shape) for x in _reference(h64.reshape(-1, h64.shape[-1]), w64, b64, flat,
                                                         dtype=torch.float64, **t)]
    window = mask.shape[1]
    old = (exact[0][:, -window:].detach() + 0.3 * noise[0].double()) * mask
    ref = (exact[0][:, -window:].detach() + 0.3 * noise[1].double()) * mask
    truth = torch.autograd.grad(_head_loss(loss, exact, mask, adv.double(), old, ref), (h64, w64, b64))
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    plain_fields = [x.reshape(labels.shape) for x in _reference(leaves[0].reshape(-1, leaves[0].shape[-1]),
                                                                leaves[1], leaves[2], flat, dtype=dtype, **t)]
    old32, ref32 = old.float(), ref.float()
    plain = torch.autograd.grad(_head_loss(loss, plain_fields, mask, adv, old32, ref32), leaves)
    predicted = PredictedLoss(_step(loss, mask, adv, old32, ref32))
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    rows_per_group = 5 if not predicted.loss.whole_sequences else 6  # split sequences where the loss allows
    fields = fused_head_fields(*leaves, labels, outputs=("log_probs", "entropy"), backend=backend, gemm=gemm,
                               memory_budget=rows_per_group * weight.shape[0] * 4, predicted=predicted, **t)
    got = torch.autograd.grad(_head_loss(loss, fields, mask, adv, old32, ref32), leaves)
    assert predicted.paths == collections.Counter(fast=1)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    fields = fused_head_fields(*leaves, labels, outputs=("log_probs", "entropy"), backend=backend, gemm=gemm, **t)
    lean = torch.autograd.grad(_head_loss(loss, fields, mask, adv, old32, ref32), leaves)
    for name, x, e, p, r in zip("hwb", got, truth, plain, lean):
        assert x.dtype == dtype
        err, base, lean_err = ((y.double() - e).norm().item() for y in (x, p, r))
        atol = 1e-6 * e.norm().item() + 1e-30
        assert (x.double() - r.double()).norm().item() <= 0.5 * base + atol, (name, err, base, lean_err)
        assert err <= 2 * max(base, lean_err) + atol, (name, err, base, lean_err)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_predicted_loss_flops_are_6nhv_fast_and_8nhv_lean(path):
    """The head's matmul FLOPs for the policy with the gradient (FlopCounterMode, plus the Triton launches'
    own count): fast mode 6·n·H·V (one group: the in-place ``addmm_`` of several groups' dW is not counted),
    lean 8·n·H·V; n = the scored completion tokens."""
    backend, gemm = path
    hidden, weight, bias, labels, mask, adv, noise = _head_batch(torch.float32, 3.0)
    n, (vocab, h) = int((labels != -100).sum()), weight.shape
    step = PolicyStep(PolicyLossConfig(loss_type="dapo", beta=0.04), mask, adv,
                      Normalisation(num_items_in_batch=float(mask.sum())), old_logps=-noise[0].abs(),
                      ref_logps=-noise[1].abs())
    counts = {}
    for mode in ("fast", "lean"):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        predicted = PredictedLoss(step) if mode == "fast" else None
        with FlopCounterMode(display=False) as counter, count_flops() as triton_flops:
            fields = fused_head_fields(*leaves, labels, outputs=("log_probs", "entropy"), backend=backend,
                                       gemm=gemm, predicted=predicted)
            t = mask.shape[1]
            loss = policy_loss(step.cfg, fields[0][:, -t:], mask, adv, norm=step.norm, old_logps=step.old_logps,
                               ref_logps=step.ref_logps).loss
            loss.backward()
        counts[mode] = counter.get_total_flops() + sum(triton_flops.values())
    assert counts == {"fast": 6 * n * h * vocab, "lean": 8 * n * h * vocab}


@pytest.mark.parametrize("loss", ["dapo-beta", "gspo-beta", "grpo-entropy-delta"])
def test_predicted_loss_allocates_nothing_tokens_by_vocab(loss):
    """Fast mode for GRPO's loss: beside the gradients, only the budgeted buffer of kept logits (and its row-op
    temporaries) is of size rows x vocabulary, far below the logits; sequence-level losses keep sequences whole
    within the same budget."""
    rows, length, window, h, vocab = 8, 160, 150, 16, 32768
    hidden, weight, bias, labels, mask, adv, noise = _head_batch(torch.float32, 3.0, rows=rows, length=length,
                                                                 window=window, h=h, v=vocab)
    leaves = [x.requires_grad_() for x in (hidden, weight, bias)]
    predicted = PredictedLoss(_step(loss, mask, adv, -noise[0].abs(), -noise[1].abs()))
    budget = window * vocab * 4  # one completion's fp32 logits per group
    with AllocationTracker(device="cpu") as mem:
        fields = fused_head_fields(*leaves, labels, outputs=("log_probs", "entropy"), backend="torch",
                                   memory_budget=budget, predicted=predicted)
        _head_loss(loss, fields, mask, adv, -noise[0].abs(), -noise[1].abs()).backward()
    assert predicted.paths == collections.Counter(fast=1)
    logits_bytes = int(mask.sum()) * vocab * 4
    grads = 2 * sum(x.numel() for x in leaves) * 4
    assert mem.largest_bytes <= max(budget, weight.numel() * 4), mem.largest
    assert mem.peak_bytes <= grads + 3 * budget < logits_bytes / 2, mem.summary()


# The metrics TRL logs that read the per-token log-probs, beside ONLINE_METRICS
LOSS_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
                "clip_ratio/high_max", "cispo_clip_ratio", "vespo/phi_seq_mean", "policy_loss", "entropy_coef")


def _compare(kind, tok, path, rtol=1e-5, **kw):
    """Stock TRL and the flag on with the same seed; the flag-on trainer (after training) and both logs."""
    want = _logs(_online(kind, None, tok, path, **kw))
    trainer = _online(kind, True, tok, path, **kw)
    assert has_fastpref_head(trainer.model)
    got = _logs(trainer)
    _assert_steps(got, want, rtol)
    return trainer, got, want


def _assert_steps(got, want, rtol=1e-5):
    """Every step's metrics among ONLINE_METRICS and LOSS_METRICS (a step that reuses a generation logs no
    rewards) equal within ``rtol`` (and 1e-6 absolute)."""
    assert len(got) == len(want) == 4
    for step, (g, w) in enumerate(zip(got, want)):
        keys = [k for k in (*ONLINE_METRICS, *LOSS_METRICS) if k in w]
        assert [k for k in (*ONLINE_METRICS, *LOSS_METRICS) if k in g] == keys, step
        for key in keys:  # None: TRL logs no number where every value was NaN (nothing scored)
            assert (g[key] is None) if w[key] is None else g[key] == pytest.approx(w[key], rel=rtol, abs=1e-6), (
                step, key, g[key], w[key])


def _micro_batches(trainer):
    return trainer.state.global_step * trainer.args.gradient_accumulation_steps


# Every loss type, with two gradient steps per generation (num_iterations=2: the old policy's log-probs differ from
# the current ones, so the ratios, clipping, δ, the off-policy mask and VESPO's weights are exercised), β > 0 and
# β = 0, gradient accumulation, and the entropy bonus (static and adaptive).
GRPO_CASES = {
    "grpo-beta-entropy": dict(loss_type="grpo", beta=0.1, entropy_coef=0.5, num_iterations=2),
    "bnpo-delta": dict(loss_type="bnpo", beta=0.0, delta=1.05, num_iterations=2),
    "dr_grpo-accum": dict(loss_type="dr_grpo", beta=0.0, gradient_accumulation_steps=2,
                          per_device_train_batch_size=2),
    "dapo-beta-accum": dict(loss_type="dapo", beta=0.1, num_iterations=2, gradient_accumulation_steps=2,
                            per_device_train_batch_size=2),
    "dapo-gspo": dict(loss_type="dapo", importance_sampling_level="sequence", num_iterations=2),
    "grpo-gspo-beta": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.1, num_iterations=2),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.1, num_iterations=2),
    "cispo": dict(loss_type="cispo", epsilon_high=0.05, num_iterations=2),
    "sapo": dict(loss_type="sapo", beta=0.1, num_iterations=2),
    "vespo": dict(loss_type="vespo", num_iterations=2),
    "off_policy_mask": dict(loss_type="dapo", off_policy_mask_threshold=0.0, num_iterations=2),
    "no_bias_correction": dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=False, num_iterations=2),
    "steps_per_generation": dict(loss_type="dapo", beta=0.1, steps_per_generation=2, per_device_train_batch_size=2),
    "cast_lm_head_to_fp32": dict(loss_type="grpo", beta=0.1, cast_lm_head_to_fp32=True, num_iterations=2),
    "mask_truncated": dict(loss_type="dapo", mask_truncated_completions=True),  # all truncated: nothing scored
    "adaptive_entropy": dict(loss_type="dapo", use_adaptive_entropy=True, entropy_coef=0.5, entropy_target=6.0,
                             gradient_accumulation_steps=2, per_device_train_batch_size=2),
}


def _assert_gradients_flow(logs, case):
    """Every step trained on something: a step whose ratios are all clipped (or whose tokens are all masked) has
    no gradient, and would compare nothing."""
    if case != "mask_truncated":  # all completions truncated: nothing is scored, by design
        assert all(step["grad_norm"] > 1e-3 for step in logs), [step["grad_norm"] for step in logs]


# Losses that exponentiate a sum of a sequence's log-probs (VESPO's φ(Σ log w), RLOO's exp(Σ lp − old) off the
# first iteration) turn the fp32 rounding of the log-probs — fastpref's head's and TRL's chunked head's differ by
# an ulp — into ~1e-4 of the loss. There the flag-on run is checked to 2e-4 of stock TRL, and equal to lean mode:
# fast mode itself adds nothing.
SENSITIVE_RTOL = 2e-4


def _check_against_lean(kind, tok, path, got, **kw):
    trainer = _online(kind, True, tok, path, **kw)
    trainer.args.fastpref_mode = "lean"
    lean = _logs(trainer)
    assert trainer.fastpref_head_paths == collections.Counter()
    _assert_steps(got, lean, rtol=1e-7)


@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_grpo_fast_mode_matches_stock_trl(tok, toy_path, case):  # noqa: F811
    kw = dict(learning_rate=0.05, **GRPO_CASES[case])
    sensitive = case == "vespo"
    trainer, got, _ = _compare("grpo", tok, toy_path, rtol=SENSITIVE_RTOL if sensitive else 1e-5, **kw)
    assert trainer.fastpref_head_paths == collections.Counter(fast=_micro_batches(trainer))
    _assert_gradients_flow(got, case)
    if sensitive:
        _check_against_lean("grpo", tok, toy_path, got, **kw)


@pytest.mark.parametrize("kw", [dict(beta=0.1, num_iterations=2),
                                dict(beta=0.0, gradient_accumulation_steps=2, per_device_train_batch_size=2)])
def test_rloo_fast_mode_matches_stock_trl(tok, toy_path, kw):  # noqa: F811
    kw = dict(learning_rate=0.01, **kw)
    sensitive = kw.get("num_iterations", 1) > 1
    trainer, got, _ = _compare("rloo", tok, toy_path, rtol=SENSITIVE_RTOL if sensitive else 1e-5, **kw)
    assert trainer.fastpref_head_paths == collections.Counter(fast=_micro_batches(trainer))
    _assert_gradients_flow(got, "rloo")
    if sensitive:
        _check_against_lean("rloo", tok, toy_path, got, **kw)


def test_grpo_fast_mode_bf16_as_trl_runs_it(tok, toy_path):  # noqa: F811
    """bf16 mixed precision: fast mode's gradient is formed from the same bf16 logit tiles TRL's recompute reads;
    bounded by twice TRL's own bf16-vs-fp32 difference, per metric."""
    kw = dict(beta=0.1, num_iterations=2, learning_rate=0.05)
    want = _logs(_online("grpo", None, tok, toy_path, bf16=True, **kw))
    want32 = _logs(_online("grpo", None, tok, toy_path, **kw))
    trainer = _online("grpo", True, tok, toy_path, bf16=True, **kw)
    got = _logs(trainer)
    assert trainer.fastpref_head_paths == collections.Counter(fast=4)
    for key in ("loss", "grad_norm", "entropy", "kl"):
        noise = max(abs(w[key] - w32[key]) for w, w32 in zip(want, want32))
        for step, (g, w) in enumerate(zip(got, want)):
            assert abs(g[key] - w[key]) <= 2 * noise + 1e-5 * abs(w[key]) + 1e-7, (step, key, g[key], w[key], noise)


def test_grpo_fast_mode_with_peft_matches_stock_trl(tok, toy_path):  # noqa: F811
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    def run(flag):
        extra = dict(use_fastpref=True, fastpref_backend="torch") if flag else {}
        cfg = (FastPrefGRPOConfig if flag else GRPOConfig)(**_common(
            learning_rate=0.05, num_generations=4, max_completion_length=6, beta=0.1, num_iterations=2), **extra)
        data = datasets.Dataset.from_list([{"prompt": p} for p in ("a b c", "b c d", "c d e", "d e f")] * 4)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        trainer = (FastPrefGRPOTrainer if flag else GRPOTrainer)(
            toy_llama(tok, hidden_size=32, num_layers=2), reward_funcs=_reward, args=cfg, train_dataset=data,
            processing_class=tok, peft_config=lora)
        return trainer, _logs(trainer)

    _, want = run(False)
    trainer, got = run(True)
    _assert_steps(got, want)
    assert trainer.fastpref_head_paths == collections.Counter(fast=4)  # the frozen head: dH only, formed in forward


@pytest.mark.parametrize("kw", [dict(top_entropy_quantile=0.5, entropy_coef=0.5), dict(fastpref_mode="lean")])
def test_lean_where_the_loss_needs_every_entropy_first_or_when_asked(tok, toy_path, kw):  # noqa: F811
    """``top_entropy_quantile < 1`` picks tokens by a batch-wide entropy quantile: "auto" runs lean (nothing
    predicted), still TRL's numbers; so does ``fastpref_mode="lean"``."""
    flag_kw = {k: v for k, v in kw.items() if k.startswith("fastpref_")}
    trl_kw = {k: v for k, v in kw.items() if k not in flag_kw}
    want = _logs(_online("grpo", None, tok, toy_path, beta=0.1, **trl_kw))
    trainer = _online("grpo", True, tok, toy_path, beta=0.1, **trl_kw)
    trainer.args.fastpref_mode = flag_kw.get("fastpref_mode", "auto")
    got = _logs(trainer)
    _assert_steps(got, want)
    assert trainer.fastpref_head_paths == collections.Counter()


def test_grpo_evaluate_matches_stock_trl(tok, toy_path):  # noqa: F811
    """Evaluation runs no gradient: nothing is predicted, TRL's numbers, before and after training."""
    evals = datasets.Dataset.from_list([{"prompt": p} for p in ("a b c", "b c d", "c d e", "d e f")])
    runs = []
    for flag in (None, True):
        trainer = _online("grpo", flag, tok, toy_path, beta=0.1, max_steps=2)
        before = trainer.evaluate(evals)
        trainer.train()
        runs.append((before, trainer.evaluate(evals)))
    assert trainer.fastpref_head_paths == collections.Counter(fast=2)
    for got, want in zip(runs[1], runs[0]):
        for key in ("eval_loss", "eval_entropy", "eval_kl", "eval_reward"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_fast_with_an_entropy_quantile_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=re.escape("top_entropy_quantile: fastpref_mode='fast'")):
        FastPrefGRPOConfig(output_dir="/tmp/fastpref-test-trl-online", use_cpu=True, report_to=[], use_fastpref=True,
                           fastpref_mode="fast", top_entropy_quantile=0.2)
    with pytest.raises(ValueError, match=re.escape("fastpref_memory_budget: expected a positive int")):
        FastPrefGRPOConfig(output_dir="/tmp/fastpref-test-trl-online", use_cpu=True, report_to=[],
                           fastpref_memory_budget=0)


class _WrongPrediction(FastPrefGRPOTrainer):
    """Predicts the wrong advantages (a subclass whose loss is not TRL's, as far as the head can tell)."""

    def _predicted_loss(self, inputs):
        step = grpo_step(self, inputs)
        return PolicyStep(step.cfg, step.mask, step.advantages.flip(0) + 1.0, step.norm, old_logps=step.old_logps,
                          ref_logps=step.ref_logps)


class _Unpredictable(FastPrefGRPOTrainer):
    """A batch the prediction cannot read (as a future TRL's might be)."""

    def _predicted_loss(self, inputs):
        raise KeyError("a field this reading of TRL does not know")


@pytest.mark.parametrize("cls,path,message", [
    (_WrongPrediction, "recomputed", "ran recomputed instead of fast mode (the loss's gradient is not the predicted"),
    (_Unpredictable, "lean", "ran lean instead of fast mode (the loss could not be predicted: KeyError"),
], ids=["wrong", "unpredictable"])
def test_a_wrong_or_failed_prediction_falls_back_counted_and_warned(tok, toy_path, cls, path, message):  # noqa: F811
    kw = dict(beta=0.1, num_iterations=2, learning_rate=0.05)
    want = _logs(_online("grpo", None, tok, toy_path, **kw))
    trainer = _online("grpo", True, tok, toy_path, **kw)
    trainer.__class__ = cls
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _logs(trainer)
    _assert_steps(got, want)  # still TRL's gradient
    assert trainer.fastpref_head_paths == collections.Counter({path: 4})
    assert sum(message in str(w.message) for w in caught) == 1  # once per trainer


def test_prediction_scale():
    g = torch.Generator().manual_seed(0)
    c, e = torch.randn(50, generator=g), torch.randn(50, generator=g)
    s = prediction_scale(-0.25 * c, -0.25 * e, c, e)
    assert s is not None and s.item() == pytest.approx(-0.25, rel=1e-6)
    assert prediction_scale(3 * c, None, c, None).item() == pytest.approx(3.0, rel=1e-6)
    assert prediction_scale(3 * c * (1 + 1e-7 * torch.randn(50, generator=g)), None, c, None) is not None  # rounding
    assert prediction_scale(3 * c, 0.1 * e, c, None) is None  # an entropy gradient the prediction lacks
    assert prediction_scale(3 * c, None, c, e) is None  # a predicted entropy term the loss lacks
    assert prediction_scale(c * torch.linspace(1, 2, 50), None, c, None) is None  # per-row weights differ
    assert prediction_scale(torch.zeros(50), None, torch.zeros(50), None).item() == 0.0
    assert prediction_scale(c, None, torch.zeros(50), None) is None


def test_trainer_step_flops_fast_saves_one_logits_gemm(tok, toy_path):  # noqa: F811
    """One training micro-batch (TRL's compute_loss and its backward), counted: lean − fast = 2·n·H·V (the
    logits recomputed in lean's backward; n = the scored completion tokens)."""
    trainer = _online("grpo", True, tok, toy_path, beta=0.0)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    n = int(inputs["completion_mask"].sum())
    H, V = trainer.model.config.hidden_size, trainer.model.config.vocab_size

    def flops(mode):
        trainer.args.fastpref_mode = mode
        trainer.model.zero_grad()
        with FlopCounterMode(display=False) as counter:
            trainer.compute_loss(trainer.model, inputs).backward()
        return counter.get_total_flops()

    lean, fast = flops("lean"), flops("auto")
    assert lean - fast == 2 * n * H * V
    assert trainer.fastpref_head_paths == collections.Counter(fast=1)


def _eight_k(loss_type: str, level: str = "token"):
    """A TRL head call's labels for one 8k-token completion (after a 16-token prompt) and its loss."""
    prompt, tokens = 16, 8192
    labels = torch.randint(0, 152064, (1, prompt + tokens))
    labels[:, :prompt] = -100
    mask = torch.ones(1, tokens, dtype=torch.long)
    cfg = PolicyLossConfig(loss_type=loss_type, importance_sampling_level=level)
    step = PolicyStep(cfg, mask, torch.ones(1), Normalisation(num_items_in_batch=float(tokens)))
    return labels, PredictedLoss(step)


def test_an_8k_completion_at_152k_vocab_fits_the_default_budget():
    """GRPO's default loss (dapo, token level) on one 8k-token completion at a 152k vocabulary: fast mode's row
    groups each within the default budget (bf16 logits: 2.5 GB in all); a sequence-level ratio (GSPO) must see the
    whole sequence before any gradient, which does not fit: lean, counted."""
    weight = torch.empty(152064, 4096, dtype=torch.bfloat16, device="meta")
    cfg = HeadPass(LogitTransform(), torch.bfloat16, "triton", 128 << 20)
    labels, predicted = _eight_k("dapo")
    layout, fast = _predicted_request(labels, 152064, predicted, (True, True, False))
    groups = token_groups(layout, weight, cfg, memory_budget=DEFAULT_BUDGET_CAP,
                          whole_sequences=fast.whole_sequences)
    assert groups is not None and groups[0][0] == 0 and groups[-1][1] == 8192
    assert all((t1 - t0) * 152064 * 2 <= DEFAULT_BUDGET_CAP for t0, t1 in groups)
    labels, predicted = _eight_k("dapo", "sequence")
    layout, fast = _predicted_request(labels, 152064, predicted, (True, True, False))
    assert fast.whole_sequences
    assert token_groups(layout, weight, cfg, memory_budget=DEFAULT_BUDGET_CAP, whole_sequences=True) is None
