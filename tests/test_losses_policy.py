"""fastpref.losses.policy against trl 1.16's own GRPOTrainer / RLOOTrainer loss code (run on a stub trainer that
feeds it fixed per-token log-probs), in float64, with every loss type and the options that change the formula."""

from __future__ import annotations

import collections
import itertools
import re
import types

import pytest
import torch

from fastpref.losses.policy import (
    GLOBAL_TOKEN_COUNT,
    POLICY_LOSS_TYPES,
    Normalisation,
    PolicyLossConfig,
    PolicyStep,
    RlooStep,
    policy_loss,
    rloo_loss,
    token_weights,
)

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
trl_rloo = pytest.importorskip("trl.trainer.rloo_trainer")


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, t):
        return t

    gather_for_metrics = gather

    def reduce(self, t, reduction="sum"):
        return t

    def pad_across_processes(self, t, dim=0, pad_index=0):
        return t


def _stub(cls, cfg: PolicyLossConfig, *, logps, entropies, accum: int, training: bool = True,
          top_entropy_quantile: float = 1.0):
    """An object with exactly the attributes trl's ``_compute_loss`` reads, returning fixed log-probs."""
    args = types.SimpleNamespace(
        use_bias_correction_kl=cfg.use_bias_correction_kl, delta=cfg.delta,
        sapo_temperature_pos=cfg.sapo_temperature_pos, sapo_temperature_neg=cfg.sapo_temperature_neg,
        vespo_k_pos=cfg.vespo_k_pos, vespo_lambda_pos=cfg.vespo_lambda_pos, vespo_k_neg=cfg.vespo_k_neg,
        vespo_lambda_neg=cfg.vespo_lambda_neg, steps_per_generation=2, entropy_target=0.0)
    stub = types.SimpleNamespace(
        loss_type=cfg.loss_type, beta=cfg.beta, epsilon_low=cfg.epsilon_low, epsilon_high=cfg.eps_high,
        importance_sampling_level=cfg.importance_sampling_level, top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=cfg.off_policy_mask_threshold, use_vllm=False,
        vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=training),
        current_gradient_accumulation_steps=accum, max_completion_length=cfg.max_completion_length,
        accelerator=_Accelerator(), _entropy_bonus_enabled=cfg.entropy_coef != 0.0,
        entropy_coef=cfg.entropy_coef, use_adaptive_entropy=False, aux_loss_enabled=False, args=args,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        get_off_policy_mask=getattr(cls, "get_off_policy_mask", None),
        get_gamma_weights=getattr(cls, "get_gamma_weights", None))
    stub.epsilon_high = cfg.eps_high
    stub._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropies, None)
    if hasattr(cls, "get_high_entropy_mask"):
        stub.get_high_entropy_mask = types.MethodType(cls.get_high_entropy_mask, stub)
    return stub


def _batch(b: int = 3, t: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    mask = (torch.rand(b, t, generator=g) > 0.25).to(torch.int64)
    mask[:, 0] = 1
    logps = -torch.rand(b, t, generator=g, **f64) * 3
    old = logps + 0.3 * torch.randn(b, t, generator=g, **f64)
    ref = logps + 0.5 * torch.randn(b, t, generator=g, **f64)
    adv = torch.randn(b, generator=g, **f64)
    ent = torch.rand(b, t, generator=g, **f64) * 2
    return mask, logps, old, ref, adv, ent


def _config(loss_type: str, **kw) -> PolicyLossConfig:
    level = "sequence" if loss_type == "luspo" else "token"
    return PolicyLossConfig(loss_type=loss_type, importance_sampling_level=kw.pop("level", level),
                            max_completion_length=7, epsilon_high=0.28, **kw)


CASES = [dict(), dict(beta=0.04), dict(beta=0.04, use_bias_correction_kl=False), dict(delta=1.5),
         dict(off_policy_mask_threshold=0.05), dict(entropy_coef=0.01),
         dict(beta=0.04, level="token", entropy_coef=0.01), dict(beta=0.04, level="sequence")]  # both levels


@pytest.mark.parametrize(("loss_type", "case"), list(itertools.product(POLICY_LOSS_TYPES, range(len(CASES)))))
@pytest.mark.parametrize("training", [True, False])
def test_loss_and_gradient_match_trl(loss_type: str, case: int, training: bool) -> None:
    mask, logps, old, ref, adv, ent = _batch(seed=case)
    cfg = _config(loss_type, **CASES[case])
    norm = Normalisation(grad_accum=3, num_items_in_batch=float(mask.sum() * 2), steps_per_generation=2,
                         training=training)
    inputs = {"prompt_ids": torch.zeros(3, 2, dtype=torch.long), "prompt_mask": torch.ones(3, 2),
              "completion_ids": torch.zeros_like(mask), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(norm.num_items_in_batch, dtype=torch.float64)}
    theirs_lp = logps.clone().requires_grad_()
    stub = _stub(trl_grpo.GRPOTrainer, cfg, logps=theirs_lp, entropies=ent, accum=3, training=training)
    expected = trl_grpo.GRPOTrainer._compute_loss(stub, None, inputs)
    (expected_grad,) = torch.autograd.grad(expected, theirs_lp)

    ours_lp = logps.clone().requires_grad_()
    out = policy_loss(cfg, ours_lp, mask, adv, norm=norm, entropies=ent, old_logps=old, ref_logps=ref)
    (grad,) = torch.autograd.grad(out.loss, ours_lp)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)
    if cfg.entropy_coef:
        assert out.policy_loss.item() == pytest.approx(stub._metrics["train" if training else "eval"]
                                                      ["policy_loss"][0], rel=1e-12)


def test_entropy_quantile_mask_matches_trl() -> None:
    mask, logps, old, _, adv, ent = _batch(seed=7)
    cfg = _config("grpo", entropy_coef=0.02)
    inputs = {"prompt_ids": torch.zeros(3, 2, dtype=torch.long), "prompt_mask": torch.ones(3, 2),
              "completion_ids": torch.zeros_like(mask), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old}
    stub = _stub(trl_grpo.GRPOTrainer, cfg, logps=logps, entropies=ent, accum=1, top_entropy_quantile=0.5)
    expected = trl_grpo.GRPOTrainer._compute_loss(stub, None, inputs)
    entropy_mask = stub.get_high_entropy_mask(ent, mask, 0.5)
    out = policy_loss(cfg, logps, mask, adv, entropies=ent, entropy_mask=entropy_mask, old_logps=old)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-14)


def test_weights_are_known_before_the_log_probs() -> None:
    """The separable form the fast path relies on: loss = Σ ℓ·w with w a function of the mask alone."""
    mask, logps, old, _, adv, _ = _batch(seed=3)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "luspo"):
        cfg = _config(loss_type)
        w = token_weights(cfg, mask, Normalisation(grad_accum=2))
        assert (w[mask == 0] == 0).all() and (w > 0).sum() == mask.sum()
        out = policy_loss(cfg, logps, mask, adv, norm=Normalisation(grad_accum=2), old_logps=old)
        torch.testing.assert_close(out.loss, (out.terms.loss.expand_as(w) * w).sum())


def test_rloo_matches_trl() -> None:
    mask, logps, old, _, adv, ent = _batch(seed=5)
    old_sums = (old * mask).sum(1)
    theirs_lp = logps.clone().requires_grad_()
    stub = _stub(trl_rloo.RLOOTrainer, _config("grpo"), logps=theirs_lp, entropies=ent, accum=1)
    inputs = {"prompt_ids": torch.zeros(3, 2, dtype=torch.long), "prompt_mask": torch.ones(3, 2),
              "completion_ids": torch.zeros_like(mask), "completion_mask": mask, "advantages": adv,
              "old_logps": old_sums}
    expected = trl_rloo.RLOOTrainer._compute_loss(stub, None, inputs)
    ours_lp = logps.clone().requires_grad_()
    loss = rloo_loss(ours_lp, old_sums, mask, adv, epsilon_low=0.2, epsilon_high=0.28)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(loss, ours_lp)[0], torch.autograd.grad(expected, theirs_lp)[0])


def _partition(mask: torch.Tensor, whole_sequences: bool, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The mask's tokens (row-major) cut into random contiguous parts: at sequence boundaries only where asked."""
    b, t = mask.nonzero(as_tuple=True)
    g = torch.Generator().manual_seed(seed)
    if whole_sequences:
        cuts = torch.nonzero(b[1:] != b[:-1]).flatten() + 1
        starts = [0] + [int(k) for k in cuts if torch.rand((), generator=g) < 0.5]
    else:
        starts = sorted({0, *torch.randint(1, b.numel(), (3,), generator=g).tolist()})
    ends = [*starts[1:], b.numel()]
    return [(b[s:e], t[s:e]) for s, e in zip(starts, ends)]


@pytest.mark.parametrize(("loss_type", "case"), list(itertools.product(POLICY_LOSS_TYPES, range(len(CASES)))))
@pytest.mark.parametrize("advantage_shape", ["per_sequence", "per_token"])
def test_rows_loss_over_any_partition_is_the_loss(loss_type: str, case: int, advantage_shape: str) -> None:
    """Fast mode's form of the loss (``PolicyStep.rows_loss``, one row group at a time): the parts' values and
    gradients (log-probs and entropies) sum to ``policy_loss``'s, in float64, over random partitions."""
    mask, logps, old, ref, adv, ent = _batch(b=4, t=9, seed=case)
    if advantage_shape == "per_token":
        noise = torch.randn(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        adv = adv[:, None] + 0.1 * noise
    cfg = _config(loss_type, **CASES[case])
    norm = Normalisation(grad_accum=3, num_items_in_batch=float(mask.sum() * 2), steps_per_generation=2)
    is_ratio = torch.rand(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5
    inputs = dict(old_logps=old, ref_logps=ref, is_ratio=is_ratio)
    lp, en = logps.clone().requires_grad_(), ent.clone().requires_grad_()
    want = policy_loss(cfg, lp, mask, adv, norm=norm, entropies=en, **inputs).loss
    want_grads = torch.autograd.grad(want, [lp, en], allow_unused=True)
    step = PolicyStep(cfg, mask, adv, norm, **inputs)
    for seed in range(3):
        lp, en = logps.clone().requires_grad_(), ent.clone().requires_grad_()
        got = sum(step.rows_loss(lp[b, t], en[b, t], b, t, slice(int(b.min()), int(b.max()) + 1))
                  for b, t in _partition(mask, step.whole_sequences, seed))
        grads = torch.autograd.grad(got, [lp, en], allow_unused=True)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(torch.zeros_like(lp) if g is None else g,
                                       torch.zeros_like(lp) if w is None else w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_type", sorted(GLOBAL_TOKEN_COUNT))
def test_a_tensor_token_count_is_read_as_its_number(loss_type: str) -> None:
    """TRL's ``num_items_in_batch`` is a 0-dim tensor: used on its device (no host sync), the same weights."""
    mask = _batch(seed=6)[0]
    cfg = _config(loss_type)
    for training in (True, False):
        kw = dict(grad_accum=3, steps_per_generation=2, num_processes=2, training=training)
        number = token_weights(cfg, mask, Normalisation(num_items_in_batch=37.0, **kw), torch.float64)
        tensor = token_weights(cfg, mask, Normalisation(num_items_in_batch=torch.tensor(37), **kw), torch.float64)
        torch.testing.assert_close(tensor, number, rtol=1e-15, atol=0)


def test_rloo_rows_loss_over_whole_sequences_is_the_loss() -> None:
    mask, logps, old, _, adv, _ = _batch(b=5, t=6, seed=4)
    old_sums = (old * mask).sum(1)
    lp = logps.clone().requires_grad_()
    want = rloo_loss(lp, old_sums, mask, adv, epsilon_low=0.2, epsilon_high=0.28)
    (want_grad,) = torch.autograd.grad(want, lp)
    step = RlooStep(mask, old_sums, adv, 0.2, 0.28)
    lp = logps.clone().requires_grad_()
    got = sum(step.rows_loss(lp[b, t], None, b, t, slice(int(b.min()), int(b.max()) + 1))
              for b, t in _partition(mask, True, 0))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(got, lp)[0], want_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(loss_type="ppo"), "loss_type: expected one of"),
    (dict(loss_type="dr_grpo"), "max_completion_length: loss_type 'dr_grpo'"),
    (dict(beta=-0.1), "beta: expected a finite number in [0, inf)"),
    (dict(delta=0.0), "delta: expected a finite number in (0, inf)"),
    (dict(importance_sampling_level="token_mean"), "importance_sampling_level: expected one of"),
])
def test_bad_configs_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        PolicyLossConfig(**kwargs)


def test_missing_inputs_are_named() -> None:
    mask, logps, _, _, adv, _ = _batch()
    with pytest.raises(ValueError, match=re.escape("ref_logps: beta=0.1 > 0")):
        policy_loss(PolicyLossConfig(loss_type="grpo", beta=0.1), logps, mask, adv)
    with pytest.raises(ValueError, match=re.escape("num_items_in_batch: loss_type 'dapo'")):
        policy_loss(PolicyLossConfig(), logps, mask, adv)
    with pytest.raises(ValueError, match=re.escape("entropies: entropy_coef=0.1")):
        policy_loss(PolicyLossConfig(loss_type="grpo", entropy_coef=0.1), logps, mask, adv)
