"""Liger-Kernel 0.8.5's DPO (``liger_kernel/chunked_loss/dpo_loss.py``) on fastpref's fused kernels."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from ._base import Inputs, LigerModule, LigerSpec, run, validate, with_differences

_DIFFERENCES = (
    "hyper-parameters are checked against the formulas' ranges: ``beta > 0``, ``label_smoothing`` in (0, 0.5] for "
    "exo_pair and [0, 0.5) for robust (unused by the other types, as in Liger), ``discopop_tau > 0`` for "
    "discopop, ``alpha`` finite in fp32 with ``compute_nll_loss``; where Liger raises, its own message comes first",
    "``ref_weight=None`` means the policy's head, detached (its bias too unless ``ref_bias`` is given), where "
    "Liger needs it",
    "``loss_type=\"ipo\"`` works: (h̄ − 1/(2β))² with h̄ length-normalised by the scored tokens (as TRL), with "
    "or without ``average_log_prob``; Liger raises ``NotImplementedError``",
)

# Liger 0.8.5's ``LigerFusedLinearDPOLoss._SUPPORTED_LOSS_TYPES``, plus IPO (which Liger refuses).
LIGER_DPO_LOSS_TYPES = frozenset({"sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                                  "apo_zero", "apo_down", "discopop"})
SUPPORTED_LOSS_TYPES = LIGER_DPO_LOSS_TYPES | {"ipo"}


def _spec(ignore_index: int, beta: float, alpha: float, compute_nll_loss: bool, use_ref_model: bool,
          average_log_prob: bool, loss_type: str, label_smoothing: float, discopop_tau: float) -> LigerSpec:
    return LigerSpec("dpo", loss_type, ignore_index=ignore_index, beta=beta, alpha=alpha,
                     compute_nll_loss=bool(compute_nll_loss), average_log_prob=bool(average_log_prob),
                     use_ref_model=bool(use_ref_model), label_smoothing=label_smoothing, discopop_tau=discopop_tau)


def liger_fused_linear_dpo(
    _input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ref_input: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    ignore_index: int = -100,
    beta: float = 0.1,
    compute_nll_loss: bool = False,
    compiled: bool = True,
    use_ref_model: bool = True,
    average_log_prob: bool = False,
    chunk_size: int = 1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    alpha: float = 1.0,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Liger 0.8.5's ``liger_fused_linear_dpo`` (= ``LigerFusedLinearDPOFunction.apply``): the same arguments
    in the same order, and what ``LigerFusedLinearDPOLoss.forward`` returns. The arguments are checked at each
    call, as Liger checks them in its forward.

    ``_input`` [B, T, H] (rows i and i + B/2 are pair i: chosen, rejected), ``weight`` [V, H], ``target``
    [B, T] (already shifted; ``ignore_index`` marks unscored positions), ``bias`` [V]; ``ref_input`` [B, T, H']
    with ``ref_weight`` [V, H'] / ``ref_bias`` the reference model's (read when ``use_ref_model``).
    """
    spec = _spec(ignore_index, beta, alpha, compute_nll_loss, use_ref_model, average_log_prob, loss_type,
                 label_smoothing, discopop_tau)
    module, formula = validate(spec, SUPPORTED_LOSS_TYPES)
    return run(spec, module, formula, Inputs(_input, weight, target, bias, ref_input, ref_weight, ref_bias,
                                         weight_name="weight"))


class LigerFusedLinearDPOFunction:
    """Liger 0.8.5's ``LigerFusedLinearDPOFunction`` as callers use it: ``.apply(...)`` is
    ``liger_fused_linear_dpo(...)`` (the gradients flow through fastpref's own autograd ops)."""

    apply = staticmethod(liger_fused_linear_dpo)


@with_differences(*_DIFFERENCES)
class LigerFusedLinearDPOLoss(LigerModule):
    """Liger-Kernel 0.8.5's ``LigerFusedLinearDPOLoss``, on fastpref's fused kernels.

    ``forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None)`` returns
    ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards,
    rejected_rewards))``: logps [B/2] are sums over the scored tokens (means with ``average_log_prob``),
    rewards ``beta * (logps - ref_logps)`` on the same scale (``beta * logps`` without ``use_ref_model``), the
    logits means (0-dim) are over every position of the half batch (ignored ones included) and the whole
    vocabulary, ``nll_loss`` (0-dim) is the chosen tokens' mean NLL (0 without ``compute_nll_loss``) and
    ``loss = mean over the pairs of the loss_type's formula + alpha * nll_loss``. ``_input`` [B, T, H] holds the
    chosen responses in its first half and the rejected ones in its second (pair i = rows i, i + B/2).
    """

    _SUPPORTED_LOSS_TYPES: ClassVar[frozenset[str]] = SUPPORTED_LOSS_TYPES

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
    ):
        super().__init__()
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.discopop_tau = discopop_tau
        self.runs()  # Liger raises for bad constructor arguments here, so does this

    def spec(self) -> LigerSpec:
        return _spec(self.ignore_index, self.beta, self.alpha, self.compute_nll_loss, self.use_ref_model,
                     self.average_log_prob, self.loss_type, self.label_smoothing, self.discopop_tau)

    def forward(self, lin_weight: Tensor, _input: Tensor, target: Tensor, bias: Tensor | None = None,
                ref_input: Tensor | None = None, ref_weight: Tensor | None = None,
                ref_bias: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        return run(*self.runs(), Inputs(_input, lin_weight, target, bias, ref_input, ref_weight, ref_bias))


__all__ = [
    "LIGER_DPO_LOSS_TYPES",
    "SUPPORTED_LOSS_TYPES",
    "LigerFusedLinearDPOFunction",
    "LigerFusedLinearDPOLoss",
    "liger_fused_linear_dpo",
]
