"""Liger-Kernel 0.8.5's SimPO (``liger_kernel/chunked_loss/simpo_loss.py``) on fastpref's fused kernels."""

from __future__ import annotations

from torch import Tensor

from ._base import Inputs, LigerModule, LigerSpec, run, validate, with_differences

_DIFFERENCES = (
    "hyper-parameters are checked against the formulas' ranges: ``beta > 0``, ``label_smoothing`` in [0, 0.5], "
    "``gamma >= 0``, ``alpha`` finite in fp32 with ``compute_nll_loss`` (Liger checks none)",
)


def _spec(ignore_index: int, beta: float, alpha: float, label_smoothing: float, compute_nll_loss: bool,
          gamma: float) -> LigerSpec:
    # Liger's SimPO keeps its base's average_log_prob=True: lengths-normalised log-probs throughout
    return LigerSpec("simpo", "simpo", ignore_index=ignore_index, beta=beta, alpha=alpha,
                     compute_nll_loss=bool(compute_nll_loss), average_log_prob=True,
                     label_smoothing=label_smoothing, gamma=gamma)


def liger_fused_linear_simpo(
    _input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    compute_nll_loss: bool = False,
    compiled: bool = True,
    gamma: float = 0.5,
    chunk_size: int = 1,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Liger 0.8.5's ``liger_fused_linear_simpo`` (= ``LigerFusedLinearSimPOFunction.apply``): the same
    arguments in the same order (``compute_nll_loss`` defaults to False here, True in the module, as in Liger),
    and what ``LigerFusedLinearSimPOLoss.forward`` returns."""
    spec = _spec(ignore_index, beta, alpha, label_smoothing, compute_nll_loss, gamma)
    module, formula = validate(spec)
    return run(spec, module, formula, Inputs(_input, weight, target, bias, weight_name="weight"))


class LigerFusedLinearSimPOFunction:
    """Liger 0.8.5's ``LigerFusedLinearSimPOFunction`` as callers use it: ``.apply(...)`` is
    ``liger_fused_linear_simpo(...)``."""

    apply = staticmethod(liger_fused_linear_simpo)


@with_differences(*_DIFFERENCES)
class LigerFusedLinearSimPOLoss(LigerModule):
    """Liger-Kernel 0.8.5's ``LigerFusedLinearSimPOLoss`` (Meng et al. 2024), reference-free, on fastpref's
    kernels.

    ``forward(lin_weight, _input, target, bias=None)`` returns ``(loss, (chosen_logps, rejected_logps,
    chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards))`` with lp̄ the mean
    log-prob over each response's scored tokens, z = β(lp̄_w − lp̄_l) − γ and the loss
    −(1−ε) log σ(z) − ε log σ(−z) (ε = ``label_smoothing``, γ = ``gamma``), averaged over the pairs, plus
    ``alpha * nll_loss`` when ``compute_nll_loss`` (the chosen tokens' mean NLL; 0 otherwise). The logps are
    lp̄, rewards ``beta * lp̄``; the logits means (0-dim) cover every position of the half batch and the whole
    vocabulary.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        gamma: float = 0.5,
        chunk_size: int = 1,
    ):
        super().__init__()
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.label_smoothing = label_smoothing
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.gamma = gamma
        self.chunk_size = chunk_size
        self.runs()

    def spec(self) -> LigerSpec:
        return _spec(self.ignore_index, self.beta, self.alpha, self.label_smoothing, self.compute_nll_loss,
                     self.gamma)

    def forward(self, lin_weight: Tensor, _input: Tensor, target: Tensor,
                bias: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        return run(*self.runs(), Inputs(_input, lin_weight, target, bias))


__all__ = ["LigerFusedLinearSimPOFunction", "LigerFusedLinearSimPOLoss", "liger_fused_linear_simpo"]
