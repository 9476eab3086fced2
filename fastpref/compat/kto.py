"""Liger-Kernel 0.8.5's KTO (``liger_kernel/chunked_loss/kto_loss.py``) on fastpref's fused kernels.

Liger's definition, for a batch of B completions labelled by ``preference_labels`` (True: desirable), with
``lp`` the per-sequence log-prob sums (means with ``average_log_prob``), ρ = lp − ref_lp (ρ = lp without
``use_ref_model``) and m = ±1 by label::

    loss = Σ_i (1 − σ(β·(ρ_i − kl)·m_i)) / B        (kl given: trl's ``kto`` with z₀ = kl, unclamped)
    loss = Σ_i (1 − σ(β·ρ_i·m_i)) / B               (kl None: trl's ``apo_zero_unpaired``)

returned as ``(loss, (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum,
chosen_rewards_sum, rejected_rewards_sum))``, every auxiliary a 0-dim sum over the desirable (undesirable) rows:
the logits sums over every position of those rows (ignored ones included) and the whole vocabulary, the rewards
β·ρ. On sums the loss is ``fastpref.KTOLoss`` (fast mode: gradients formed during the forward, 6·n·H·V); on means
(``average_log_prob=True``) ``fastpref.sequence_logps`` and the formula on top (lean).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import losses as L
from ..functional import sequence_logps
from ..kto import KTOLoss
from ..losses.formulas import check_hparam
from ..utils.validation import check_int
from ._base import _COMMON_DIFFERENCES, _bullets, caller_names

_DIFFERENCES = (
    "``beta > 0`` is checked (a ``ValueError`` naming it); ``kl`` must be a scalar tensor (0-dim or one "
    "element), as every chunk of Liger's reads it whole",
    "``ref_weight=None`` with ``use_ref_model=True`` means the policy's head, detached (its bias too unless "
    "``ref_bias`` is given), where Liger needs it; ``preference_labels`` must be a bool tensor [B] (Liger fails "
    "inside its kernel otherwise)",
)
# The batch-layout item of the shared differences is about paired losses: KTO takes any batch size.
_SHARED = tuple(d for d in _COMMON_DIFFERENCES if "odd batch" not in d)


def _check(_input: object, target: object, preference_labels: object, ref_input: object, use_ref: bool) -> None:
    for name, t in (("_input", _input), ("target", target), ("preference_labels", preference_labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if _input.dim() != 3 or _input.shape[0] == 0:
        raise ValueError(f"_input: expected [B, T, H] with B > 0 (one completion per row), got shape "
                         f"{tuple(_input.shape)}")
    if preference_labels.dtype != torch.bool or tuple(preference_labels.shape) != (_input.shape[0],):
        raise TypeError(f"preference_labels: expected a bool tensor of shape [{_input.shape[0]}] (True: desirable), "
                        f"got {preference_labels.dtype} of shape {tuple(preference_labels.shape)}")
    if use_ref and not isinstance(ref_input, Tensor):
        raise ValueError("ref_input: use_ref_model=True needs the reference model's hidden states [B, T, H'], got "
                         f"{type(ref_input).__name__} (or construct with use_ref_model=False)")


def _kl(kl: object) -> Tensor | None:
    if kl is None:
        return None
    if not isinstance(kl, Tensor) or not kl.is_floating_point() or kl.numel() != 1:
        seen = f"{kl.dtype} of shape {tuple(kl.shape)}" if isinstance(kl, Tensor) else type(kl).__name__
        raise ValueError(f"kl: expected None or a floating-point scalar tensor (0-dim or one element), got {seen}")
    return kl.detach().reshape(()).float()


def _logits_sum(rows: Tensor, w_sum: Tensor, b_sum: Tensor | None) -> Tensor:
    """Σ over ``rows`` [r, T, H] and the vocabulary of ``h @ W.T + b`` without the logits: (Σ h) · (Σ_v w_v) +
    r·T·Σ_v b_v, in fp64 (the sum cancels heavily), returned fp32."""
    flat = rows.detach().reshape(-1, rows.shape[-1])
    total = flat.sum(0, dtype=torch.float64) @ w_sum
    if b_sum is not None:
        total = total + flat.shape[0] * b_sum
    return total.float()


def liger_fused_linear_kto(
    _input: Tensor,
    weight: Tensor,
    target: Tensor,
    preference_labels: Tensor,
    bias: Tensor | None = None,
    ref_input: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    kl: Tensor | None = None,
    ignore_index: int = -100,
    beta: float = 0.1,
    compiled: bool = True,
    use_ref_model: bool = True,
    average_log_prob: bool = False,
    chunk_size: int = 1,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Liger 0.8.5's ``liger_fused_linear_kto`` (= ``LigerFusedLinearKTOFunction.apply``): the same arguments in
    the same order, and what ``LigerFusedLinearKTOLoss.forward`` returns (see the module docstring).

    ``_input`` [B, T, H], ``weight`` [V, H], ``target`` [B, T] (already shifted; ``ignore_index`` marks unscored
    positions), ``preference_labels`` [B] bool, ``bias`` [V]; ``ref_input`` [B, T, H'] with ``ref_weight`` /
    ``ref_bias`` the reference model's (read when ``use_ref_model``); ``kl`` a detached scalar or None.
    """
    return _run(_input, weight, target, preference_labels, bias, ref_input, ref_weight, ref_bias, kl, ignore_index,
                beta, use_ref_model, average_log_prob, "weight")


def _run(_input: Tensor, weight: Tensor, target: Tensor, preference_labels: Tensor, bias: Tensor | None,
         ref_input: Tensor | None, ref_weight: Tensor | None, ref_bias: Tensor | None, kl: Tensor | None,
         ignore_index: int, beta: float, use_ref_model: bool, average_log_prob: bool,
         _weight_name: str) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The call under Liger's argument names (``_weight_name``: ``lin_weight`` for the module)."""
    beta = check_hparam("beta", beta)
    ignore_index = check_int("ignore_index", ignore_index)
    use_ref = bool(use_ref_model)
    _check(_input, target, preference_labels, ref_input, use_ref)
    z0 = _kl(kl)
    loss_type = "apo_zero_unpaired" if z0 is None else "kto"
    fn = KTOLoss(loss_type, beta=beta, ignore_index=ignore_index)
    names = {"hidden": "_input", "weight": _weight_name, "labels": "target", "desirable": "preference_labels"}
    ref_names = {"hidden": "ref_input", "weight": "ref_weight" if ref_weight is not None else _weight_name,
                 "labels": "target", "bias": "ref_bias" if ref_bias is not None else "bias"}
    if ref_weight is None:
        ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
    lengths = (target != ignore_index).sum(-1).clamp(min=1).float()
    ref = None
    if use_ref:
        with caller_names(**ref_names), torch.no_grad():
            rb = None if ref_bias is None else ref_bias.detach()
            if average_log_prob:
                ref = sequence_logps(ref_input.detach(), ref_weight.detach(), target, bias=rb,
                                     ignore_index=ignore_index) / lengths.to(_input.device)
            else:
                ref = fn.score(ref_input.detach(), ref_weight.detach(), target, bias=rb)
    if ref is None:
        ref = torch.zeros(_input.shape[0], device=_input.device)
    if average_log_prob:  # the formula on means: no fastpref type for it, so the lean run
        with caller_names(**names):
            lp_g = sequence_logps(_input, weight, target, bias=bias, ignore_index=ignore_index, average=True)
            losses, _ = L.kto(lp_g, ref, preference_labels, z0, beta=beta, loss_type=loss_type)
        loss, lp = losses.mean(), lp_g.detach()
    else:
        with caller_names(**names):
            out = fn(_input, weight, target, preference_labels, ref, bias=bias, kl=z0)
        loss, lp = out.loss, out.logps
    with torch.no_grad():
        d = preference_labels.to(lp.device).float()
        rewards = beta * (lp - ref)
        w_sum = weight.detach().sum(0, dtype=torch.float64)
        b_sum = None if bias is None else bias.detach().sum(dtype=torch.float64)
        aux = ((lp * d).sum(), (lp * (1 - d)).sum(), _logits_sum(_input[preference_labels], w_sum, b_sum),
               _logits_sum(_input[~preference_labels], w_sum, b_sum), (rewards * d).sum(), (rewards * (1 - d)).sum())
    return loss, aux


class LigerFusedLinearKTOFunction:
    """Liger 0.8.5's ``LigerFusedLinearKTOFunction`` as callers use it: ``.apply(...)`` is
    ``liger_fused_linear_kto(...)`` (the gradients flow through fastpref's own autograd ops)."""

    apply = staticmethod(liger_fused_linear_kto)


class LigerFusedLinearKTOLoss(nn.Module):
    """Liger-Kernel 0.8.5's ``LigerFusedLinearKTOLoss``, on fastpref's fused kernels.

    ``forward(_input, lin_weight, target, bias=None, preference_labels=None, ref_input=None, ref_weight=None,
    ref_bias=None, kl=None)`` (Liger's order: ``_input`` first, unlike its DPO) returns ``(loss,
    (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum, chosen_rewards_sum,
    rejected_rewards_sum))``; see ``fastpref.compat.kto``. ``use_ref_model`` defaults to False, as Liger's.
    """

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compiled: bool = True,
                 use_ref_model: bool = False, average_log_prob: bool = False, chunk_size: int = 1):
        super().__init__()
        self.ignore_index = ignore_index
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size
        check_hparam("beta", beta)
        check_int("ignore_index", ignore_index)

    def forward(self, _input: Tensor, lin_weight: Tensor, target: Tensor, bias: Tensor | None = None,
                preference_labels: Tensor | None = None, ref_input: Tensor | None = None,
                ref_weight: Tensor | None = None, ref_bias: Tensor | None = None,
                kl: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        return _run(_input, lin_weight, target, preference_labels, bias, ref_input, ref_weight, ref_bias, kl,
                    self.ignore_index, self.beta, self.use_ref_model, self.average_log_prob, "lin_weight")


LigerFusedLinearKTOLoss.__doc__ = (f"{LigerFusedLinearKTOLoss.__doc__.rstrip()}\n\n    Differences from Liger 0.8.5 "
                                   f"(everything else is its definition):\n\n{_bullets((*_SHARED, *_DIFFERENCES))}\n")

__all__ = ["LigerFusedLinearKTOFunction", "LigerFusedLinearKTOLoss", "liger_fused_linear_kto"]
