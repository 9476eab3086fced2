"""Liger-Kernel 0.8.5's GRPO (``liger_kernel/chunked_loss/grpo_loss.py``, ``fused_linear_ppo.py``) on fastpref's ops.

Liger's definition, for B completions of T positions (``attention_mask`` m [B, T], ``advantages`` A [B]): the
policy's per-token log-probs ``lp = log_softmax((_input @ weight.T + bias) / temperature).gather(selected_token_ids)``,
the old policy's ``old`` (``lp.detach()`` when not given) and the reference's ``ref`` (``ref_per_token_logps``, else
scored from ``ref_input`` with the reference head; ``lp.detach()`` without ``use_ref_model``) give the per-token
loss ℓ_bt of ``loss_type`` — TRL 1.16's (``fastpref.losses.policy.per_token_losses``, which computes it here)::

    r  = exp(lp − old)                                  (token level)  or  exp(Σ_t m·(lp − old) / Σ_t m)  (sequence)
    ℓ  = −min(min(r, δ)·A, clip(r, 1−ε_low, 1+ε_high)·A)      grpo, bnpo, dr_grpo, dapo, luspo
       = −sg(min(r, ε_high))·A·lp                              cispo
       = −σ(τ(r − 1))·4/τ·A                                    sapo (τ by the sign of A)
       = −sg(φ_b)·A·lp                                         vespo (TRL's gamma weights)
    ℓ ← ℓ·vllm_is_ratio (not vespo: folded into φ) + β·(exp(ref − lp) − (ref − lp) − 1)·(r if use_bias_correction_kl)

reduced as Liger reduces it::

    grpo, sapo:          Σ_b (Σ_t ℓ·m / max(Σ_t m, 1)) / B
    bnpo:                Σ ℓ·m / max(Σ m, 1)
    dr_grpo:             Σ ℓ·m / (B · max_completion_length)
    dapo, cispo, vespo:  Σ ℓ·m / max(N / world_size, 1)     N = num_items_in_batch, else Σ m over every rank
    luspo:               Σ_bt ℓ_bt · Σ_t' m_bt' / (B · T_ℓ)   T_ℓ = ℓ.shape[1]: 1 or T, masked positions included

and returned as ``(loss, metrics)``: ``metrics`` is ``(kl_mean, clip_ratio)`` (``(clip_ratio,)`` when β = 0), both
0-dim fp32 over the masked tokens: the mean KL term (bias-corrected when asked) and the fraction of tokens whose
ratio is clipped in the direction of their advantage (r beyond ε_high for cispo; 0 for sapo and vespo).

Where Liger differs from TRL 1.16 (``fastpref.losses.policy.policy_loss``), the drop-in follows Liger: luspo with a
per-token ℓ (token-level importance sampling, β > 0, per-token vLLM ratios) is weighted by the sequence length over
every position, padding included (TRL masks, Σ_bt ℓ·m / B); the dapo normaliser is clamped after the division by
the world size (TRL before); there is no accumulation scaling, entropy bonus or off-policy mask (TRL's trainer adds
them); ``use_bias_correction_kl`` defaults to False (TRL: True).

The log-probs come from ``fastpref.token_logps`` (lean: logits recomputed tile by tile in the backward; nothing of
size tokens x vocabulary), on the positions that enter the loss only (those with m ≠ 0, or every position for
luspo's per-token ℓ). liger-kernel need not be installed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..functional import token_logps
from ..losses.policy import Normalisation, PolicyLossConfig, per_token_losses, token_weights
from ..utils.validation import FINITE, POSITIVE, TEMPERATURE, check_int, check_number
from ._base import _bullets, caller_names

LIGER_GRPO_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence")
_TOKEN_LEVEL_ONLY = ("cispo", "sapo", "vespo")  # Liger refuses sequence-level importance sampling for these
_GLOBAL_NORMALISER = ("dapo", "cispo", "vespo")
_UNSCORED = -100  # the label of positions outside the loss (token_logps gives them 0, no gradient)

_DIFFERENCES = (
    "``beta >= 0``, finite ``epsilon_low`` / ``epsilon_high`` / VESPO shapes, positive SAPO temperatures and "
    "``delta`` and a ``temperature`` whose inverse is finite in fp32 are checked at every call (the module's "
    "constructor also checks what Liger's does, with Liger's message first); a bad tensor raises a ``ValueError`` "
    "/ ``TypeError`` naming Liger's argument (Liger asserts, or fails inside its kernels)",
    "positions with ``attention_mask == 0`` are not scored (Liger scores them and multiplies by 0), except for "
    "luspo's per-token losses, which Liger weights over every position; so a NaN old / reference log-prob on "
    "padding does not reach the loss, and ``selected_token_ids`` there may be any value",
    "``ref_weight=None`` with ``ref_input`` means the policy's head, detached (its bias too unless ``ref_bias`` "
    "is given), where Liger needs it; the reference is not scored when ``beta == 0`` (its log-probs are unused)",
    "``compiled`` and ``chunk_size`` are accepted and unused: fastpref sizes its tiles by a memory budget and "
    "needs no ``torch.compile``",
)


@dataclass(frozen=True)
class GRPOSpec:
    """Liger's GRPO hyper-parameters as its constructor (or function) received them."""

    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: str = "dapo"
    max_completion_length: int | None = None
    importance_sampling_level: str = "token"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    temperature: float = 1.0
    use_ref_model: bool = True
    delta: float | None = None
    use_bias_correction_kl: bool = False
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0


def _liger_first(liger: str, check: Callable[..., object], *args: object, **kwargs: object) -> None:
    """``check(*args, **kwargs)``, its error re-raised with Liger's message in front (callers match on it)."""
    try:
        check(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{liger} ({e})") from e


def check_constructor(spec: GRPOSpec) -> None:
    """What Liger's ``LigerFusedLinearGRPOLoss.__init__`` refuses, with its message first."""
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
        value = getattr(spec, name)
        _liger_first(f"{name} must be positive, got {value}", check_number, name, value, POSITIVE)
    _liger_first(f"delta must be positive, got {spec.delta}", check_number, "delta", spec.delta, POSITIVE,
                 allow_none=True)


def policy_config(spec: GRPOSpec) -> PolicyLossConfig:
    """``spec`` checked (Liger's message first where Liger raises) as the config of ``per_token_losses``."""
    lt, level = spec.loss_type, spec.importance_sampling_level
    if not isinstance(lt, str) or lt not in LIGER_GRPO_LOSS_TYPES:
        raise ValueError(f"Unknown loss type: {lt} (loss_type: expected one of {list(LIGER_GRPO_LOSS_TYPES)}, got "
                         f"{lt!r})")
    if not isinstance(level, str) or level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"Unknown importance sampling level: {level}. Possible values are 'token' and 'sequence'. "
                         f"(importance_sampling_level: expected one of {list(IMPORTANCE_SAMPLING_LEVELS)}, got "
                         f"{level!r})")
    if level == "sequence" and lt in _TOKEN_LEVEL_ONLY:
        raise ValueError(f"Sequence-level importance sampling is not supported for loss_type='{lt}'. Use "
                         "importance_sampling_level='token' instead. (importance_sampling_level: expected 'token' "
                         f"for loss_type {lt!r}, got 'sequence')")
    if lt == "dr_grpo":
        if spec.max_completion_length is None:
            raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo' (max_completion_length: "
                             "expected an int >= 1, got None)")
        check_int("max_completion_length", spec.max_completion_length, low=1)
    check_number("temperature", spec.temperature, TEMPERATURE)
    check_number("epsilon_high", spec.epsilon_high, FINITE)  # None is TRL's "same as epsilon_low", not Liger's
    if not isinstance(spec.use_bias_correction_kl, bool):
        raise TypeError(f"use_bias_correction_kl: expected a bool, got {spec.use_bias_correction_kl!r}")
    # ℓ is the same clipped surrogate for every clipped type: luspo's (which TRL's config ties to sequence level
    # and Liger does not) is computed as grpo's; the reduction below is Liger's own
    return PolicyLossConfig(
        loss_type="grpo" if lt == "luspo" else lt, beta=spec.beta, epsilon_low=spec.epsilon_low,
        epsilon_high=spec.epsilon_high, delta=spec.delta, importance_sampling_level=level,
        use_bias_correction_kl=spec.use_bias_correction_kl, sapo_temperature_pos=spec.sapo_temperature_pos,
        sapo_temperature_neg=spec.sapo_temperature_neg, vespo_k_pos=spec.vespo_k_pos,
        vespo_lambda_pos=spec.vespo_lambda_pos, vespo_k_neg=spec.vespo_k_neg, vespo_lambda_neg=spec.vespo_lambda_neg,
        max_completion_length=spec.max_completion_length)


# --------------------------------------------------------------------------------------------------------------
# Tensor checks, under Liger's argument names


def _tensor(name: str, t: object, *, required: bool = True) -> Tensor | None:
    if t is None and not required:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _check_shape(name: str, t: Tensor | None, expected: tuple[int, ...], what: str) -> None:
    if t is not None and tuple(t.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected} ({what}), got {tuple(t.shape)}")


@dataclass(frozen=True)
class Call:
    """One call's tensors with Liger's names (``weight_name``: ``lin_weight`` for the module, ``weight`` for the
    function, in error messages)."""

    _input: Tensor
    weight: Tensor
    selected_token_ids: Tensor
    attention_mask: Tensor
    advantages: Tensor
    bias: Tensor | None = None
    ref_per_token_logps: Tensor | None = None
    old_per_token_logps: Tensor | None = None
    ref_input: Tensor | None = None
    ref_weight: Tensor | None = None
    ref_bias: Tensor | None = None
    vllm_is_ratio: Tensor | None = None
    num_items_in_batch: object = None
    weight_name: str = "lin_weight"

    def check(self, use_ref: bool) -> None:
        """The layout Liger assumes: ``_input`` [B, T, H]; [B, T] ids, mask and log-probs; [B] advantages;
        ``vllm_is_ratio`` [B], [B, 1] or [B, T]. Dtypes and head shapes are ``token_logps``'s checks."""
        x = _tensor("_input", self._input)
        for name in ("selected_token_ids", "attention_mask", "advantages"):
            _tensor(name, getattr(self, name))
        for name in ("ref_per_token_logps", "old_per_token_logps", "ref_input", "vllm_is_ratio"):
            _tensor(name, getattr(self, name), required=False)
        if x.dim() != 3:
            raise ValueError(f"_input: expected [B, T, H] (one completion per row), got shape {tuple(x.shape)}")
        bt = tuple(x.shape[:2])
        _check_shape("selected_token_ids", self.selected_token_ids, bt, "_input.shape[:2]")
        _check_shape("attention_mask", self.attention_mask, bt, "_input.shape[:2]")
        _check_shape("advantages", self.advantages, bt[:1], "one advantage per completion")
        _check_shape("old_per_token_logps", self.old_per_token_logps, bt, "_input.shape[:2]")
        for name in ("advantages", "old_per_token_logps", "ref_per_token_logps", "vllm_is_ratio"):
            t = getattr(self, name)
            if t is not None and not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        r = self.vllm_is_ratio
        if r is not None and tuple(r.shape) not in (bt[:1], (bt[0], 1), bt):
            raise ValueError(f"vllm_is_ratio: expected shape ({bt[0]},), ({bt[0]}, 1) or {bt} (per completion or "
                             f"per token), got {tuple(r.shape)}")
        n = self.num_items_in_batch
        if isinstance(n, Tensor):
            if n.numel() != 1 or n.is_complex():
                raise ValueError(f"num_items_in_batch: expected a number or a one-element tensor, got a tensor of "
                                 f"shape {tuple(n.shape)}")
        elif n is not None:
            check_number("num_items_in_batch", n, FINITE)
        if use_ref:
            _check_shape("ref_per_token_logps", self.ref_per_token_logps, bt, "_input.shape[:2]")
            if self.ref_per_token_logps is None and self.ref_input is None:
                raise ValueError("If use_ref_model is True, ref_per_token_logps or ref_input must be provided "
                                 "(ref_per_token_logps / ref_input: expected a tensor, got None for both; or "
                                 "use_ref_model=False)")
            if self.ref_per_token_logps is None and (self.ref_input.dim() != 3 or
                                                     tuple(self.ref_input.shape[:2]) != bt):
                raise ValueError(f"ref_input: expected [B, T, H_ref] with (B, T) = {bt} (those of _input), got "
                                 f"shape {tuple(self.ref_input.shape)}")


# --------------------------------------------------------------------------------------------------------------
# The run


def _per_token_terms_are_wide(spec: GRPOSpec, call: Call) -> bool:
    """Whether ℓ is [B, T] rather than [B, 1] (luspo's reduction then runs over every position)."""
    r = call.vllm_is_ratio
    return (spec.importance_sampling_level == "token" or spec.beta != 0.0
            or (r is not None and r.dim() == 2 and r.shape[1] != 1))


def _scored_labels(call: Call, score_all: bool) -> tuple[Tensor, Tensor]:
    """(labels for ``token_logps``: the ids where scored, ``_UNSCORED`` elsewhere; the scored positions)."""
    ids = call.selected_token_ids
    scored = torch.ones_like(ids, dtype=torch.bool) if score_all else call.attention_mask != 0
    if bool((scored & (ids == _UNSCORED)).any()):  # token_logps would take it for an unscored position
        raise ValueError(f"selected_token_ids: expected ids in [0, vocab_size={call.weight.shape[0]}) where the "
                         f"loss reads them, got {_UNSCORED}")
    return torch.where(scored, ids, _UNSCORED), scored


def _reference(spec: GRPOSpec, call: Call, labels: Tensor, lp: Tensor) -> Tensor:
    """Reference per-token log-probs [B, T] (fp32, no grad): given, or scored from ``ref_input`` as the policy is
    (same temperature and positions); the policy's own (KL 0) without ``use_ref_model`` or with ``beta == 0``."""
    if spec.use_ref_model and call.ref_per_token_logps is not None and call.ref_input is not None:
        warnings.warn("Both ref_per_token_logps and ref_input are provided. Using ref_per_token_logps.",
                      stacklevel=3)
    if not spec.use_ref_model or spec.beta == 0.0:
        return lp.detach()
    if call.ref_per_token_logps is not None:
        return call.ref_per_token_logps.detach().float()
    ref_weight, ref_bias = call.ref_weight, call.ref_bias
    if ref_weight is None:
        ref_weight, ref_bias = call.weight, call.bias if ref_bias is None else ref_bias
    names = {"hidden": "ref_input", "weight": "ref_weight" if call.ref_weight is not None else call.weight_name,
             "labels": "selected_token_ids", "bias": "ref_bias" if call.ref_bias is not None else "bias"}
    with caller_names(**names), torch.no_grad():
        return token_logps(call.ref_input.detach(), ref_weight.detach(), labels,
                           bias=None if ref_bias is None else ref_bias.detach(), ignore_index=_UNSCORED,
                           temperature=spec.temperature)


def _dapo_normaliser(mask: Tensor, num_items_in_batch: object) -> Tensor:
    """Liger's per-process normaliser: ``num_items_in_batch`` (else the mask's sum over every rank) / world size,
    at least 1."""
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    if num_items_in_batch is not None:
        total = torch.as_tensor(num_items_in_batch, device=mask.device).detach().reshape(()).float()
    else:
        total = mask.sum()
        if distributed:
            total = total.clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (total / world).clamp(min=1.0)


def _reduce(spec: GRPOSpec, cfg: PolicyLossConfig, loss: Tensor, mask: Tensor, call: Call) -> Tensor:
    """Liger's reduction of the per-token losses ``loss`` ([B, T] or [B, 1]) to the scalar loss."""
    lt = spec.loss_type
    if lt == "luspo":  # every position, each weighted by its sequence's length
        return (loss * mask.sum(-1, keepdim=True)).sum() / (mask.shape[0] * loss.shape[1])
    if lt in _GLOBAL_NORMALISER:
        return (loss * mask).sum() / _dapo_normaliser(mask, call.num_items_in_batch)
    return (loss * token_weights(cfg, mask, Normalisation())).sum()  # grpo, sapo, bnpo, dr_grpo: TRL's = Liger's


def _clip_ratio(spec: GRPOSpec, ratio: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """The fraction of masked tokens whose ratio (before ``delta``) is clipped where its advantage pushes it."""
    adv = advantages.unsqueeze(1)
    if spec.loss_type in ("sapo", "vespo"):
        clipped = torch.zeros_like(ratio, dtype=torch.bool)
    elif spec.loss_type == "cispo":
        clipped = (ratio > spec.epsilon_high) & (adv > 0)
    else:
        clipped = ((ratio < 1 - spec.epsilon_low) & (adv < 0)) | ((ratio > 1 + spec.epsilon_high) & (adv > 0))
    return (clipped.expand_as(mask) * mask).sum() / mask.sum().clamp(min=1.0)


def run(spec: GRPOSpec, call: Call) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Liger's ``(loss, metrics)`` for ``spec`` on the call's tensors (see the module docstring)."""
    cfg = policy_config(spec)
    use_ref = bool(spec.use_ref_model)
    spec = replace(spec, use_ref_model=use_ref)
    call.check(use_ref)
    mask = call.attention_mask.detach().float()
    labels, scored = _scored_labels(call, spec.loss_type == "luspo" and _per_token_terms_are_wide(spec, call))
    with caller_names(hidden="_input", weight=call.weight_name, labels="selected_token_ids"):
        lp = token_logps(call._input, call.weight, labels, bias=call.bias, ignore_index=_UNSCORED,
                         temperature=spec.temperature)
    ref = _reference(spec, call, labels, lp)
    old = None if call.old_per_token_logps is None else call.old_per_token_logps.detach().float()
    # Unscored positions get lp = 0: give them old = ref = 0 too, so their (masked-out) terms stay finite
    zero = lp.new_zeros(())
    ref = torch.where(scored, ref, zero)
    old = None if old is None else torch.where(scored, old, zero)
    ratio_is = call.vllm_is_ratio
    if ratio_is is not None:
        ratio_is = ratio_is.detach().float()
        ratio_is = ratio_is.unsqueeze(-1) if ratio_is.dim() == 1 else ratio_is
    advantages = call.advantages.detach().float()
    terms = per_token_losses(cfg, lp, mask, advantages, old_logps=old, ref_logps=ref, is_ratio=ratio_is)
    loss = _reduce(spec, cfg, terms.loss, mask, call)
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1.0)
        metrics = () if terms.kl is None else ((terms.kl * mask).sum() / tokens,)
        metrics = (*metrics, _clip_ratio(spec, terms.ratio, advantages, mask))
    return loss, metrics


# --------------------------------------------------------------------------------------------------------------
# Liger's API


def liger_fused_linear_grpo(
    _input: Tensor,
    weight: Tensor,
    selected_token_ids: Tensor,
    attention_mask: Tensor,
    advantages: Tensor,
    bias: Tensor | None = None,
    ref_per_token_logps: Tensor | None = None,
    old_per_token_logps: Tensor | None = None,
    ref_input: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    beta: float = 0.04,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    importance_sampling_level: str = "token",
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    temperature: float = 1.0,
    compiled: bool = True,
    use_ref_model: bool = True,
    chunk_size: int = 1,
    vllm_is_ratio: Tensor | None = None,
    delta: float | None = None,
    use_bias_correction_kl: bool = False,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    num_items_in_batch: float | Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Liger 0.8.5's ``liger_fused_linear_grpo`` (= ``LigerFusedLinearGRPOFunction.apply``): the same arguments in
    the same order, and ``(loss, metrics)`` as ``LigerFusedLinearGRPOLoss.forward`` (see ``fastpref.compat.grpo``).

    ``_input`` [B, T, H] (the completions' last hidden states), ``weight`` [V, H], ``selected_token_ids`` [B, T]
    (the completion tokens), ``attention_mask`` [B, T] (the completion mask), ``advantages`` [B], ``bias`` [V];
    ``ref_per_token_logps`` / ``old_per_token_logps`` [B, T]; ``ref_input`` [B, T, H'] with ``ref_weight`` /
    ``ref_bias`` (read with ``use_ref_model`` when ``ref_per_token_logps`` is None); ``vllm_is_ratio`` [B], [B, 1]
    or [B, T]; ``num_items_in_batch`` the generation batch's completion tokens (dapo / cispo / vespo).
    """
    spec = GRPOSpec(beta, epsilon_low, epsilon_high, loss_type, max_completion_length, importance_sampling_level,
                    sapo_temperature_pos, sapo_temperature_neg, temperature, use_ref_model, delta,
                    use_bias_correction_kl, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
    return run(spec, Call(_input, weight, selected_token_ids, attention_mask, advantages, bias, ref_per_token_logps,
                          old_per_token_logps, ref_input, ref_weight, ref_bias, vllm_is_ratio, num_items_in_batch,
                          weight_name="weight"))


class LigerFusedLinearGRPOFunction:
    """Liger 0.8.5's ``LigerFusedLinearGRPOFunction`` as callers use it: ``.apply(...)`` is
    ``liger_fused_linear_grpo(...)`` (the gradients flow through fastpref's own autograd ops)."""

    apply = staticmethod(liger_fused_linear_grpo)


class LigerFusedLinearGRPOLoss(nn.Module):
    """Liger-Kernel 0.8.5's ``LigerFusedLinearGRPOLoss``, on fastpref's ops.

    ``forward(_input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
    ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
    vllm_is_ratio=None, num_items_in_batch=None)`` returns ``(loss, (kl_mean, clip_ratio))`` (``(clip_ratio,)``
    when ``beta == 0``): the definition, reductions and metrics of ``fastpref.compat.grpo``. The hyper-parameters
    are plain attributes, read at each call as Liger reads them.
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
    ):
        super().__init__()
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos = sapo_temperature_pos
        self.sapo_temperature_neg = sapo_temperature_neg
        self.temperature = temperature
        self.delta = delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.vespo_k_pos = vespo_k_pos
        self.vespo_lambda_pos = vespo_lambda_pos
        self.vespo_k_neg = vespo_k_neg
        self.vespo_lambda_neg = vespo_lambda_neg
        check_constructor(self.spec())

    def spec(self) -> GRPOSpec:
        return GRPOSpec(self.beta, self.epsilon_low, self.epsilon_high, self.loss_type, self.max_completion_length,
                        self.importance_sampling_level, self.sapo_temperature_pos, self.sapo_temperature_neg,
                        self.temperature, self.use_ref_model, self.delta, self.use_bias_correction_kl,
                        self.vespo_k_pos, self.vespo_lambda_pos, self.vespo_k_neg, self.vespo_lambda_neg)

    def forward(self, _input: Tensor, lin_weight: Tensor, selected_token_ids: Tensor, attention_mask: Tensor,
                advantages: Tensor, bias: Tensor | None = None, ref_per_token_logps: Tensor | None = None,
                old_per_token_logps: Tensor | None = None, ref_input: Tensor | None = None,
                ref_weight: Tensor | None = None, ref_bias: Tensor | None = None,
                vllm_is_ratio: Tensor | None = None,
                num_items_in_batch: float | Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        return run(self.spec(), Call(_input, lin_weight, selected_token_ids, attention_mask, advantages, bias,
                                     ref_per_token_logps, old_per_token_logps, ref_input, ref_weight, ref_bias,
                                     vllm_is_ratio, num_items_in_batch))


LigerFusedLinearGRPOLoss.__doc__ = (f"{LigerFusedLinearGRPOLoss.__doc__.rstrip()}\n\n    Differences from Liger 0.8.5 "
                                    f"(everything else is its definition):\n\n{_bullets(_DIFFERENCES)}\n")

__all__ = ["LIGER_GRPO_LOSS_TYPES", "LigerFusedLinearGRPOFunction", "LigerFusedLinearGRPOLoss",
           "liger_fused_linear_grpo"]
