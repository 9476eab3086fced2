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

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from fastpref.integrations.trl_head import (  # noqa: E402
    PredictedLoss,
    _predicted_request,
    has_fastpref_head,
    prediction_scale,
)
from fastpref.integrations.trl_trainers import FastPrefGRPOConfig, FastPrefGRPOTrainer, grpo_step  # noqa: E402
from fastpref.losses.policy import Normalisation, PolicyLossConfig, PolicyStep  # noqa: E402
from fastpref.ops import HeadPass, LogitTransform  # noqa: E402
from fastpref.ops.fast_token_loss import token_groups  # noqa: E402
from fastpref.ops.plan import DEFAULT_BUDGET_CAP  # noqa: E402
from fastpref.testing.toy import toy_llama  # noqa: E402
from tests.test_integrations_trl_head import (  # noqa: E402
    ONLINE_METRICS,
    _common,
    _logs,
    _online,
    _reward,
    toy_path,  # noqa: F401  (the fixture)
)

pytestmark = pytest.mark.usefixtures("one_thread")

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


@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_grpo_fast_mode_matches_stock_trl(tok, toy_path, case):  # noqa: F811
    trainer, _, _ = _compare("grpo", tok, toy_path, learning_rate=0.5, **GRPO_CASES[case])
    assert trainer.fastpref_head_paths == collections.Counter(fast=_micro_batches(trainer))


@pytest.mark.parametrize("kw", [dict(beta=0.1, num_iterations=2),
                                dict(beta=0.0, gradient_accumulation_steps=2, per_device_train_batch_size=2)])
def test_rloo_fast_mode_matches_stock_trl(tok, toy_path, kw):  # noqa: F811
    trainer, _, _ = _compare("rloo", tok, toy_path, learning_rate=0.5, **kw)
    assert trainer.fastpref_head_paths == collections.Counter(fast=_micro_batches(trainer))


def test_grpo_fast_mode_bf16_as_trl_runs_it(tok, toy_path):  # noqa: F811
    """bf16 mixed precision: fast mode's gradient is formed from the same bf16 logit tiles TRL's recompute reads;
    bounded by twice TRL's own bf16-vs-fp32 difference, per metric."""
    kw = dict(beta=0.1, num_iterations=2, learning_rate=0.5)
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
            learning_rate=0.5, num_generations=4, max_completion_length=6, beta=0.1, num_iterations=2), **extra)
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


def test_a_wrong_prediction_is_recomputed_counted_and_warned(tok, toy_path):  # noqa: F811
    kw = dict(beta=0.1, num_iterations=2, learning_rate=0.5)
    want = _logs(_online("grpo", None, tok, toy_path, **kw))
    trainer = _online("grpo", True, tok, toy_path, **kw)
    trainer.__class__ = _WrongPrediction
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _logs(trainer)
    _assert_steps(got, want)  # still TRL's gradient
    assert trainer.fastpref_head_paths == collections.Counter(recomputed=4)
    assert sum("ran recomputed instead of fast mode" in str(w.message) for w in caught) == 1  # once per trainer


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
    logits recomputed in lean's backward; n = the scored completion tokens), and lean = stock TRL's head."""
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
