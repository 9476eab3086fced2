"""Liger-Kernel 0.8.5's ORPO (``liger_kernel/chunked_loss/orpo_loss.py``) on fastpref's fused kernels."""

from __future__ import annotations

from torch import Tensor

from ._base import Inputs, LigerModule, LigerSpec, run, validate, with_differences

_DIFFERENCES = (
    "``beta > 0`` is checked (Liger does not)",
    "log(1 − p̄) is evaluated as log(−expm1(lp̄)) near p̄ = 1, with lp̄ kept ≤ −eps, so a response the model is "
    "certain of gives a finite loss where Liger's ``log1p(-exp(lp̄))`` gives −inf",
)


def _spec(ignore_index: int, beta: float, compute_nll_loss: bool) -> LigerSpec:
    # Liger's ORPO keeps its base's average_log_prob=True and alpha=1.0
    return LigerSpec("orpo", "orpo", ignore_index=ignore_index, beta=beta, compute_nll_loss=bool(compute_nll_loss),
                     average_log_prob=True)


def liger_fused_linear_orpo(
    _input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    beta: float = 0.1,
    compute_nll_loss: bool = True,
    nll_target: Tensor | None = None,
    compiled: bool = True,
    chunk_size: int = 1,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Liger 0.8.5's ``liger_fused_linear_orpo`` (= ``LigerFusedLinearORPOFunction.apply``): the same arguments
    in the same order, and what ``LigerFusedLinearORPOLoss.forward`` returns."""
    spec = _spec(ignore_index, beta, compute_nll_loss)
    module, formula = validate(spec)
    return run(spec, module, formula, Inputs(_input, weight, target, bias, nll_target=nll_target, weight_name="weight"))


class LigerFusedLinearORPOFunction:
    """Liger 0.8.5's ``LigerFusedLinearORPOFunction`` as callers use it: ``.apply(...)`` is
    ``liger_fused_linear_orpo(...)``."""

    apply = staticmethod(liger_fused_linear_orpo)


@with_differences(*_DIFFERENCES)
class LigerFusedLinearORPOLoss(LigerModule):
    """Liger-Kernel 0.8.5's ``LigerFusedLinearORPOLoss`` (Hong et al. 2024), reference-free, on fastpref's
    kernels.

    ``forward(lin_weight, _input, target, bias=None, nll_target=None)`` returns ``(loss, (chosen_logps,
    rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards,
    log_odds_ratio, log_odds_chosen))`` with lp̄ the mean log-prob over each response's scored tokens,
    log_odds = (lp̄_w − lp̄_l) − (log(1 − e^lp̄_w) − log(1 − e^lp̄_l)) and the loss −β log σ(log_odds) averaged
    over the pairs, plus ``nll_loss`` (weight 1) when ``compute_nll_loss``: the mean NLL of the chosen rows'
    ``nll_target`` tokens (``target``'s when None; 0 without ``compute_nll_loss``). The logps are lp̄, rewards
    ``beta * lp̄``, ``log_odds_ratio`` and ``log_odds_chosen`` (0-dim) the batch means of log σ(log_odds) and of
    log_odds; the logits means (0-dim) cover every position of the half batch and the whole vocabulary.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        chunk_size: int = 1,
    ):
        super().__init__()
        self.ignore_index = ignore_index
        self.beta = beta
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.chunk_size = chunk_size
        self.runs()

    def spec(self) -> LigerSpec:
        return _spec(self.ignore_index, self.beta, self.compute_nll_loss)

    def forward(self, lin_weight: Tensor, _input: Tensor, target: Tensor, bias: Tensor | None = None,
                nll_target: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        return run(*self.runs(), Inputs(_input, lin_weight, target, bias, nll_target=nll_target))


__all__ = ["LigerFusedLinearORPOFunction", "LigerFusedLinearORPOLoss", "liger_fused_linear_orpo"]
