"""Online policy losses on per-token log-probs: trl 1.16's ``GRPOTrainer`` and ``RLOOTrainer`` (pure torch).

A GRPO step scores each completion token t of sequence b under the policy (log-prob ``lp``), the policy that
sampled it (``old``; ``lp.detach()`` when there is one gradient step per generation) and optionally a reference
(``ref``). With advantages A_b, the importance weight r = exp(lp − old) (token level) or exp(mean_t(lp − old))
(sequence level), each ``loss_type`` gives a per-token loss ℓ_bt::

    grpo, bnpo, dr_grpo, dapo, luspo:  −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A)   (r first capped at δ if set)
    cispo:                             −sg(min(r, ε_high))·A·lp
    sapo:                              −σ(τ(r − 1))·4/τ·A                         (τ by the sign of A)
    vespo:                             −sg(φ(w_b))·A·lp                           (φ: TRL's gamma weighting)

plus β·KL_bt with KL_bt = exp(ref − lp) − (ref − lp) − 1 (times r with ``use_bias_correction_kl``). The loss
is Σ_bt ℓ_bt·w_bt with token weights w that say how ``loss_type`` normalises (``token_weights``: per sequence
then per batch for grpo / sapo, by the batch's token count for bnpo, by B·max_completion_length for dr_grpo, by
the generation batch's token count for dapo / cispo / vespo, per sequence sum for luspo), minus the entropy
bonus ``entropy_coef``·mean entropy.

Every weight is known from the completion mask before any log-prob is, and every ℓ_bt depends on its own
sequence's log-probs only: the loss is separable per sequence, so a fast path can form dL/dlp (and dL/dentropy)
for one group of sequences as soon as their log-probs are known. The exception is ``top_entropy_quantile < 1``
(a batch-wide entropy quantile picks the tokens), which needs every entropy first.

RLOO (``rloo_loss``) is the sequence-level case: r_b = exp(Σ_t lp − Σ_t old), the clipped surrogate, the mean
over sequences (TRL's Trainer divides by the accumulation steps).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from ..utils.validation import FINITE, POSITIVE, Interval, check_choice, check_int, check_number

POLICY_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
CLIPPED: frozenset[str] = frozenset({"grpo", "bnpo", "dr_grpo", "dapo", "luspo"})
# Normalised by the generation batch's token count (``num_items_in_batch``), not by this micro-batch's.
GLOBAL_TOKEN_COUNT: frozenset[str] = frozenset({"dapo", "cispo", "vespo"})
NON_NEGATIVE = Interval(0.0)
_LOG_CLAMP = math.log(1e-8)  # TRL's lower clamp of VESPO's log weights


@dataclass(frozen=True)
class PolicyLossConfig:
    """The hyper-parameters of ``GRPOConfig`` that shape the loss (TRL 1.16's names and defaults).

    ``epsilon_high=None`` means ``epsilon_low`` (TRL's ``epsilon_high`` defaults to ``epsilon``).
    ``max_completion_length`` is read by ``dr_grpo`` only.
    """

    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = True
    off_policy_mask_threshold: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    entropy_coef: float = 0.0
    max_completion_length: int | None = None

    def __post_init__(self) -> None:
        check_choice("loss_type", self.loss_type, POLICY_LOSS_TYPES)
        check_choice("importance_sampling_level", self.importance_sampling_level, ("token", "sequence"))
        check_number("beta", self.beta, NON_NEGATIVE)
        check_number("epsilon_low", self.epsilon_low, FINITE)
        check_number("epsilon_high", self.epsilon_high, FINITE, allow_none=True)
        check_number("delta", self.delta, POSITIVE, allow_none=True)
        check_number("off_policy_mask_threshold", self.off_policy_mask_threshold, FINITE, allow_none=True)
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            check_number(name, getattr(self, name), POSITIVE)
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_coef"):
            check_number(name, getattr(self, name), FINITE)
        if not isinstance(self.use_bias_correction_kl, bool):
            raise TypeError(f"use_bias_correction_kl: expected a bool, got {self.use_bias_correction_kl!r}")
        if self.loss_type == "dr_grpo":
            if self.max_completion_length is None:
                raise ValueError("max_completion_length: loss_type 'dr_grpo' normalises by B * "
                                 "max_completion_length; expected an int >= 1, got None")
            check_int("max_completion_length", self.max_completion_length, low=1)
        # luspo at token level and vespo at sequence level are allowed, as TRL allows them (it only warns)

    @property
    def eps_high(self) -> float:
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    @classmethod
    def from_trl(cls, args: Any) -> PolicyLossConfig:
        """From a trl ``GRPOConfig`` (``epsilon`` is TRL's name for ``epsilon_low``)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values["epsilon_low"] = args.epsilon
        return cls(**values)


@dataclass(frozen=True)
class Normalisation:
    """What the token weights divide by, besides the mask: the accumulation steps of the optimizer step
    (``grad_accum``; 1 in evaluation), and for dapo / cispo / vespo the generation batch's completion-token count
    ``num_items_in_batch`` over ``num_processes`` ranks and ``steps_per_generation`` micro-batches (a number, or
    TRL's 0-dim tensor, kept on its device: no host sync)."""

    grad_accum: int = 1
    num_items_in_batch: float | Tensor | None = None
    num_processes: int = 1
    steps_per_generation: int = 1
    training: bool = True


def token_weights(cfg: PolicyLossConfig, mask: Tensor, norm: Normalisation = Normalisation(),
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """[B, T] weights w with loss = Σ ℓ·w, as TRL's aggregation of ``loss_type`` (no gradient)."""
    m = mask.to(dtype)
    accum = norm.grad_accum if norm.training else 1
    lt = cfg.loss_type
    if lt in ("grpo", "sapo"):
        return m / m.sum(-1, keepdim=True).clamp(min=1.0) / (m.shape[0] * accum)
    if lt == "bnpo":
        return m / m.sum().clamp(min=1.0) / accum
    if lt == "dr_grpo":
        return m / (m.shape[0] * cfg.max_completion_length * accum)
    if lt == "luspo":
        return m / (m.shape[0] * accum)
    if norm.num_items_in_batch is None:
        raise ValueError(f"num_items_in_batch: loss_type {lt!r} normalises by the generation batch's completion "
                         "tokens; expected a number > 0, got None")
    items = norm.num_items_in_batch
    if isinstance(items, Tensor):
        normaliser = items.to(device=mask.device, dtype=dtype).clamp(min=1.0) / norm.num_processes
    else:
        normaliser = max(float(items), 1.0) / norm.num_processes
    if norm.training:
        normaliser = normaliser * norm.grad_accum / norm.steps_per_generation
    return m / normaliser


def _vespo_weights(cfg: PolicyLossConfig, advantages: Tensor, log_ratio: Tensor, mask: Tensor,
                   is_ratio: Tensor | None) -> Tensor:
    """TRL's gamma weights φ(w_b) = exp(λ + k·log w − λ·w), per sequence, detached."""
    seq_log_ratio = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
    if is_ratio is not None:
        seq_log_ratio = seq_log_ratio + is_ratio.log().clamp(_LOG_CLAMP, 20.0).sum(-1, keepdim=True)
    log_w = seq_log_ratio.clamp(_LOG_CLAMP, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, cfg.vespo_k_pos, cfg.vespo_k_neg)
    lam = torch.where(nonneg, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).clamp(min=1e-4)
    return (lam + k * log_w - lam * log_w.exp()).exp().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@dataclass
class PolicyTerms:
    """The per-token pieces of one call (shapes [B, T], or [B, 1] where the importance weight is per sequence)."""

    loss: Tensor             # ℓ_bt, before the token weights
    ratio: Tensor            # r (``coef_1`` before δ)
    kl: Tensor | None        # KL_bt (β > 0)


def per_token_losses(cfg: PolicyLossConfig, logps: Tensor, mask: Tensor, advantages: Tensor, *,
                     old_logps: Tensor | None = None, ref_logps: Tensor | None = None,
                     sampling_logps: Tensor | None = None, is_ratio: Tensor | None = None) -> PolicyTerms:
    """ℓ_bt of ``cfg.loss_type`` (see the module docstring) with TRL 1.16's clipping, off-policy mask,
    importance-sampling correction (``is_ratio``: vLLM's per-token ratio) and KL term; differentiable in ``logps``.

    Args:
        logps: [B, T] policy log-probs of the completion tokens. mask: [B, T] 0/1 completion mask.
        advantages: [B] or [B, T]. old_logps: [B, T], ``logps.detach()`` when None.
        ref_logps: [B, T], required when ``cfg.beta > 0``. sampling_logps: the sampler's log-probs for the
            off-policy mask (defaults to ``old_logps``).
    """
    m = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old
    if cfg.importance_sampling_level == "token":
        log_weight = log_ratio
    else:
        log_weight = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = log_weight.exp()
    kl = None
    if cfg.beta != 0.0:
        if ref_logps is None:
            raise ValueError(f"ref_logps: beta={cfg.beta} > 0 needs the reference's per-token log-probs, got None")
        d = ref_logps - logps
        kl = d.exp() - d - 1
        if cfg.use_bias_correction_kl:
            kl = kl * ratio
    lt = cfg.loss_type
    if lt == "cispo":
        loss = -ratio.clamp(max=cfg.eps_high).detach() * adv * logps
    elif lt in CLIPPED:
        clipped = ratio.clamp(1 - cfg.epsilon_low, 1 + cfg.eps_high)
        capped = ratio if cfg.delta is None else ratio.clamp(max=cfg.delta)
        loss = -torch.min(capped * adv, clipped * adv)
    elif lt == "sapo":
        tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    else:  # vespo
        with torch.no_grad():
            phi = _vespo_weights(cfg, adv, log_ratio.detach(), m, is_ratio)
        loss = -phi * adv * logps
    if cfg.off_policy_mask_threshold is not None:
        sampled = old if sampling_logps is None else sampling_logps
        seq_kl = ((sampled - logps.detach()).nan_to_num(nan=0.0) * m).sum(1, keepdim=True)
        keep = (adv >= 0) | (seq_kl / m.sum(1, keepdim=True).clamp(min=1.0) <= cfg.off_policy_mask_threshold)
        loss = loss * keep.to(m.dtype)
    if is_ratio is not None and lt != "vespo":
        loss = loss * is_ratio
    if kl is not None:
        loss = loss + cfg.beta * kl
    return PolicyTerms(loss=loss, ratio=ratio, kl=kl)


@dataclass
class PolicyLossOutput:
    loss: Tensor          # the value to backpropagate (scaled for accumulation as TRL does)
    policy_loss: Tensor   # TRL's ``policy_loss`` metric (detached; before the accumulation scaling)
    terms: PolicyTerms


def policy_loss(cfg: PolicyLossConfig, logps: Tensor, mask: Tensor, advantages: Tensor, *,
                norm: Normalisation = Normalisation(), entropies: Tensor | None = None,
                entropy_mask: Tensor | None = None, **inputs: Tensor | None) -> PolicyLossOutput:
    """TRL 1.16's ``GRPOTrainer`` loss on per-token log-probs: Σ ℓ·w (``token_weights``) minus the entropy bonus
    ``cfg.entropy_coef`` · (masked mean entropy / accumulation steps). ``entropy_mask`` (0/1, [B, T]) is the
    ``top_entropy_quantile`` selection; ``inputs`` go to ``per_token_losses``."""
    terms = per_token_losses(cfg, logps, mask, advantages, **inputs)
    effective = mask if entropy_mask is None else mask * entropy_mask
    weights = token_weights(cfg, mask, norm, terms.loss.dtype)
    if entropy_mask is not None:  # TRL masks ℓ by the entropy mask but normalises by the completion mask
        weights = weights * entropy_mask
    loss = (terms.loss * weights).sum()
    accum = norm.grad_accum if norm.training else 1
    per_call = loss.detach() * (accum if cfg.loss_type not in GLOBAL_TOKEN_COUNT else 1)
    if cfg.entropy_coef != 0.0:
        if entropies is None:
            raise ValueError(f"entropies: entropy_coef={cfg.entropy_coef} needs the per-token entropies, got None")
        e = effective.to(entropies.dtype)
        loss = loss - cfg.entropy_coef * (entropies * e).sum() / e.sum().clamp(min=1.0) / accum
    return PolicyLossOutput(loss=loss, policy_loss=per_call, terms=terms)


def rloo_loss(logps: Tensor, old_logps: Tensor, mask: Tensor, advantages: Tensor, *, epsilon_low: float = 0.2,
              epsilon_high: float | None = None) -> Tensor:
    """TRL 1.16's ``RLOOTrainer`` surrogate. ``logps`` [B, T] per-token, ``old_logps`` [B] the sampling policy's
    sequence sums, ``advantages`` [B]: r = exp(Σ_t lp·m − old), the mean over sequences of
    −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A) (unscaled: the Trainer divides by the accumulation steps)."""
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    ratio = ((logps * mask.to(logps.dtype)).sum(-1) - old_logps).exp()
    return -torch.min(ratio * advantages, ratio.clamp(1 - epsilon_low, 1 + eps_high) * advantages).mean()


def _rows(x: Tensor | None, seqs: slice) -> Tensor | None:
    return None if x is None else x[seqs]


def _grid(values: Tensor, base: Tensor, at: tuple[Tensor, Tensor]) -> Tensor:
    """``base`` [b, T] with ``values`` [n] put at ``at`` (differentiable in ``values``)."""
    return base.to(values.dtype).index_put(at, values)


@dataclass(frozen=True)
class PolicyStep:
    """One micro-batch of TRL 1.16's GRPO loss with everything but the policy's log-probs and entropies known: the
    completion ``mask`` [B, T], ``advantages`` ([B] or [B, T]), the normalisation and the old / reference / sampler
    log-probs and vLLM ratios (``per_token_losses``'s ``inputs``). ``cfg.entropy_coef`` is the coefficient this
    step applies (TRL's adaptive controller may set it to 0).

    ``rows_loss`` is the loss restricted to some of its tokens; summed over a partition of the scored tokens it is
    ``policy_loss(...).loss`` (without ``top_entropy_quantile``, whose mask needs every entropy first), so fast mode
    can form the gradient of one row group as soon as its log-probs are known. Where a term reads a whole sequence
    (``whole_sequences``), each part must hold whole sequences."""

    cfg: PolicyLossConfig
    mask: Tensor
    advantages: Tensor
    norm: Normalisation = Normalisation()
    old_logps: Tensor | None = None
    ref_logps: Tensor | None = None
    sampling_logps: Tensor | None = None
    is_ratio: Tensor | None = None

    @property
    def whole_sequences(self) -> bool:
        """A term reads a whole sequence: sequence-level importance weights, VESPO's weights, the off-policy mask."""
        cfg = self.cfg
        return (cfg.importance_sampling_level == "sequence" or cfg.loss_type == "vespo"
                or cfg.off_policy_mask_threshold is not None)

    @property
    def entropy(self) -> bool:
        """The loss differentiates the entropies (the entropy bonus)."""
        return self.cfg.entropy_coef != 0.0

    @functools.cached_property
    def weights(self) -> Tensor:
        """``token_weights`` in float64 (each part casts them to its loss's dtype)."""
        return token_weights(self.cfg, self.mask, self.norm, torch.float64)

    @functools.cached_property
    def entropy_tokens(self) -> Tensor:
        """The entropy bonus's denominator: the completion tokens (at least 1), on the device."""
        return self.mask.sum().double().clamp(min=1.0)

    def rows_loss(self, logps: Tensor, entropies: Tensor | None, b: Tensor, t: Tensor, seqs: slice) -> Tensor:
        """The loss's terms at the tokens ``(b[k], t[k])`` of the [B, T] grid, with log-probs ``logps`` [n] and
        entropies [n] (read when ``entropy``); every ``b`` lies in ``seqs``. 0-dim, differentiable."""
        cfg, mask = self.cfg, self.mask[seqs]
        at = (b - seqs.start, t)
        base = torch.zeros(mask.shape, device=logps.device) if self.old_logps is None else self.old_logps[seqs]
        grid = _grid(logps, base, at)  # tokens outside the rows hold their old log-prob (ratio 1): never NaN
        inside = torch.zeros(mask.shape, dtype=torch.bool, device=logps.device).index_put(
            at, torch.ones((), dtype=torch.bool, device=logps.device))
        terms = per_token_losses(cfg, grid, mask, self.advantages[seqs], old_logps=_rows(self.old_logps, seqs),
                                 ref_logps=_rows(self.ref_logps, seqs), sampling_logps=_rows(self.sampling_logps, seqs),
                                 is_ratio=_rows(self.is_ratio, seqs))
        loss = torch.where(inside, terms.loss * self.weights[seqs].to(terms.loss.dtype), 0.0).sum()
        if self.entropy:
            if entropies is None:
                raise ValueError(f"entropies: entropy_coef={cfg.entropy_coef} needs the per-token entropies, got None")
            accum = self.norm.grad_accum if self.norm.training else 1
            e = mask.to(entropies.dtype)
            bonus = torch.where(inside, _grid(entropies, torch.zeros_like(e), at) * e, 0.0).sum()
            loss = loss - cfg.entropy_coef * bonus / self.entropy_tokens.to(bonus.dtype) / accum
        return loss


@dataclass(frozen=True)
class RlooStep:
    """One micro-batch of TRL 1.16's RLOO loss (``rloo_loss``) with everything but the policy's log-probs known:
    ``rows_loss`` as ``PolicyStep``'s; every term reads a whole sequence."""

    mask: Tensor
    old_logps: Tensor
    advantages: Tensor
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    whole_sequences: bool = True
    entropy: bool = False

    def rows_loss(self, logps: Tensor, entropies: Tensor | None, b: Tensor, t: Tensor, seqs: slice) -> Tensor:
        """The mean over the batch restricted to the sequences ``seqs`` (all of whose tokens are in the rows)."""
        mask = self.mask[seqs]
        grid = _grid(logps, torch.zeros(mask.shape, device=logps.device), (b - seqs.start, t))
        part = rloo_loss(grid, self.old_logps[seqs], mask, self.advantages[seqs], epsilon_low=self.epsilon_low,
                         epsilon_high=self.epsilon_high)
        return part * ((seqs.stop - seqs.start) / self.mask.shape[0])
