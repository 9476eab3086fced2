"""Unpaired preference losses on sequence log-probs: trl 1.16's ``KTOTrainer`` (pure torch, per sequence).

KTO (Ethayarajh et al. 2024, Eq. 7) scores each sequence on its own, labelled desirable or undesirable, against a
detached estimate z₀ of KL(π‖π_ref) taken from mismatched (prompt, completion) pairs. With ρ = lp − ref (sums over
the completion's tokens) and w_d / w_u the desirable / undesirable weights::

    kto:                desirable  w_d · (1 − σ(β(ρ − z₀)))       undesirable  w_u · (1 − σ(β(z₀ − ρ)))
    apo_zero_unpaired:  desirable  w_d · (1 − σ(βρ))              undesirable  w_u · σ(βρ)

    z₀ = max(0, mean(KL_logps − ref_KL_logps))      (``kl_estimate``; TRL averages it over ranks first)

The batch loss is the mean over all sequences (TRL concatenates the desirable then the undesirable losses and
takes the mean, which is order-free). Rewards are β·ρ, detached. Given z₀ (detached), every sequence's loss
depends on its own log-prob only: the loss is separable per sequence, so the fast path can form the gradients
during the forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..utils.validation import FP32_MAX, Interval, check_choice, check_number
from .formulas import check_hparam

UNPAIRED_LOSS_TYPES: tuple[str, ...] = ("kto", "apo_zero_unpaired")
# The KL estimate z₀ is read by these types only (TRL skips the KL pass for apo_zero_unpaired).
NEEDS_KL: frozenset[str] = frozenset({"kto"})
WEIGHT = Interval(0.0, FP32_MAX, high_closed=True, note="finite in fp32, the precision of the fused kernels")
# z0 given as a number: TRL clamps the estimate at 0, so a negative one is a caller's mistake
KL_RANGE = Interval(0.0, FP32_MAX, high_closed=True)


def _sequence_vector(name: str, t: object, like: Tensor | None = None) -> Tensor:
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 1:
        kind = f"tensor of dtype {t.dtype} and shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{name}: expected a floating-point tensor [B] of sequence log-prob sums, got {kind}")
    if like is not None and (t.shape != like.shape or t.device != like.device):
        raise ValueError(f"{name}: expected shape {tuple(like.shape)} on {like.device} (like policy_logps), got "
                         f"{tuple(t.shape)} on {t.device}")
    return t


def kl_estimate(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's z₀ from the mismatched pairs: ``max(0, mean(kl_logps − ref_kl_logps))``, detached (a 0-dim tensor).
    TRL gathers the mean over ranks before the clamp: a trainer passes the per-rank means through its own gather."""
    kl_logps = _sequence_vector("kl_logps", kl_logps)
    ref_kl_logps = _sequence_vector("ref_kl_logps", ref_kl_logps, kl_logps)
    return (kl_logps.detach().float() - ref_kl_logps.detach().float()).mean().clamp(min=0)


def kto(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl: Tensor | float | None = None, *,
        beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
        loss_type: str = "kto") -> tuple[Tensor, Tensor]:
    """Per-sequence KTO losses in batch order, as trl 1.16's ``KTOTrainer._compute_loss``.

    Args:
        policy_logps: [B] sums of the policy's completion log-probs. ref_logps: [B] the reference's, detached.
        desirable: [B] bool (TRL's ``label``): True for a desirable completion.
        kl: z₀, the detached KL estimate (``kl_estimate``; a 0-dim tensor or a float ≥ 0); required by ``kto``,
            ignored by ``apo_zero_unpaired``.
        beta: β > 0. desirable_weight, undesirable_weight: w_d, w_u ≥ 0. loss_type: ``"kto"`` or
            ``"apo_zero_unpaired"``.

    Returns:
        (losses [B], rewards [B]): the weighted per-sequence losses (batch loss = ``losses.mean()``) and β·ρ,
        detached.
    """
    loss_type = check_choice("loss_type", loss_type, UNPAIRED_LOSS_TYPES)
    beta = check_hparam("beta", beta)
    w_d = check_number("desirable_weight", desirable_weight, WEIGHT)
    w_u = check_number("undesirable_weight", undesirable_weight, WEIGHT)
    policy_logps = _sequence_vector("policy_logps", policy_logps)
    ref_logps = _sequence_vector("ref_logps", ref_logps, policy_logps)
    if not isinstance(desirable, Tensor) or desirable.dtype != torch.bool or desirable.shape != policy_logps.shape:
        seen = f"{desirable.dtype} {tuple(desirable.shape)}" if isinstance(desirable, Tensor) else type(desirable)
        raise TypeError(f"desirable: expected a bool tensor of shape {tuple(policy_logps.shape)}, got {seen}")
    rho = policy_logps - ref_logps.detach().to(policy_logps.dtype)
    if loss_type in NEEDS_KL:
        if kl is None:
            raise ValueError("kl: loss_type 'kto' needs the KL estimate z0 (fastpref.losses.kl_estimate), got None")
        if not isinstance(kl, Tensor):
            kl = torch.tensor(check_number("kl", kl, KL_RANGE))
        elif kl.numel() != 1:
            raise ValueError(f"kl: expected a scalar (0-dim or one element), got shape {tuple(kl.shape)}")
        z0 = kl.detach().reshape(()).to(rho)
        chosen = 1 - torch.sigmoid(beta * (rho - z0))
        rejected = 1 - torch.sigmoid(beta * (z0 - rho))
    else:
        chosen = 1 - torch.sigmoid(beta * rho)
        rejected = torch.sigmoid(beta * rho)
    desirable = desirable.to(rho.device)
    losses = torch.where(desirable, w_d * chosen, w_u * rejected)
    return losses, beta * rho.detach()


__all__ = ["KL_RANGE", "NEEDS_KL", "UNPAIRED_LOSS_TYPES", "WEIGHT", "kl_estimate", "kto"]
