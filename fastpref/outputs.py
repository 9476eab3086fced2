"""What a preference loss returns, and the one metrics builder (the fused path and the materialised HF path).

Metrics carry trl 1.16's names: ``rewards/{chosen,rejected,accuracies,margins}``, ``logps/{chosen,rejected}``,
``logits/{chosen,rejected}`` (mean logit over the scored tokens and the vocabulary) and, when the token
statistics were computed, ``entropy`` and ``mean_token_accuracy``. ``token_sums`` keeps the raw sums and counts
behind the token-level metrics so trainers can aggregate them exactly across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .losses import rewards
from .ops import TokenStats

#: Keys of ``PreferenceOutput.token_sums`` (the last three only with token statistics).
TOKEN_SUM_KEYS = ("chosen_logit_sum", "rejected_logit_sum", "chosen_tokens", "rejected_tokens", "entropy_sum",
                  "scored_tokens", "chosen_top1")


@dataclass(frozen=True)
class PreferenceOutput:
    """What a preference loss returns. Per-pair tensors are ``[P]`` (P = batch / 2), fp32.

    ``loss`` is differentiable; ``losses`` too in lean mode (detached in fast mode, whose gradients are formed
    during the forward). Log-probs are sums over the scored tokens; rewards are ``beta * (logps - ref_logps)``.
    ``metrics`` holds 0-dim detached tensors under TRL's names; ``token_sums`` the raw sums and counts behind
    the token-level metrics, for exact aggregation across ranks. ``mode`` is the path that ran.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    token_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    mode: str = "lean"


def token_sums(stats: TokenStats, is_chosen: torch.Tensor,
               scored: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The token sums of ``TOKEN_SUM_KEYS`` from per-token statistics ``stats`` and ``is_chosen`` (bool: the
    token belongs to a chosen response), all of one shape; ``scored`` (bool, same shape): the positions that
    count (default: all of them, as for the scored tokens of a layout). Weights, not boolean indexing: no host
    sync."""
    with torch.no_grad():
        weight = None if scored is None else scored.float()
        chosen = is_chosen.float() if weight is None else is_chosen.float() * weight
        rejected = (1.0 - is_chosen.float()) if weight is None else (1.0 - is_chosen.float()) * weight
        mean_logits = stats.mean_logits.detach()
        sums = {
            "chosen_logit_sum": (mean_logits * chosen).sum(),
            "rejected_logit_sum": (mean_logits * rejected).sum(),
            "chosen_tokens": chosen.sum(),
            "rejected_tokens": rejected.sum(),
        }
        if stats.entropy is not None and stats.is_top1 is not None:
            entropy = stats.entropy.detach()
            sums["entropy_sum"] = entropy.sum() if weight is None else (entropy * weight).sum()
            sums["scored_tokens"] = torch.full((), float(chosen.numel()), device=chosen.device) if weight is None \
                else weight.sum()
            sums["chosen_top1"] = (stats.is_top1.float() * chosen).sum()
    return sums


#: trl 1.16's per-pair metrics, in the order of ``pair_metric_values``: TRL logs the batch mean of each.
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")


def pair_metric_values(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                       rejected_logps: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The per-pair values [P] behind ``PAIR_METRICS`` (a metric is the mean of its values over the pairs)."""
    return (chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float(),
            chosen_rewards - rejected_rewards, chosen_logps, rejected_logps)


def token_metrics(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TRL's token-level metrics from the sums and counts of ``TOKEN_SUM_KEYS`` (one batch's, or the totals
    gathered over ranks): a mean is a sum over its count, 0 where the count is 0."""
    metrics = {
        "logits/chosen": sums["chosen_logit_sum"] / sums["chosen_tokens"].clamp(min=1),
        "logits/rejected": sums["rejected_logit_sum"] / sums["rejected_tokens"].clamp(min=1),
    }
    if "entropy_sum" in sums:
        metrics["entropy"] = sums["entropy_sum"] / sums["scored_tokens"].clamp(min=1)
        metrics["mean_token_accuracy"] = sums["chosen_top1"] / sums["chosen_tokens"].clamp(min=1)
    return metrics


def _mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean() if t.numel() else t.new_zeros(())


def build_output(*, loss: torch.Tensor, losses: torch.Tensor, chosen_logps: torch.Tensor,
                 rejected_logps: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
                 sums: dict[str, torch.Tensor], mode: str) -> PreferenceOutput:
    """Rewards β·(logps − ref) and TRL's metrics from per-pair sums and the token sums of ``token_sums``."""
    with torch.no_grad():
        chosen, rejected = chosen_logps.detach(), rejected_logps.detach()
        chosen_rewards, rejected_rewards = rewards(beta, chosen, ref_chosen), rewards(beta, rejected, ref_rejected)
        values = pair_metric_values(chosen_rewards, rejected_rewards, chosen, rejected)
        metrics = {name: _mean(v) for name, v in zip(PAIR_METRICS, values)}
        metrics.update(token_metrics(sums))
    return PreferenceOutput(loss=loss, losses=losses, chosen_logps=chosen, rejected_logps=rejected,
                            chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, metrics=metrics,
                            token_sums=sums, mode=mode)


__all__ = ["PAIR_METRICS", "TOKEN_SUM_KEYS", "PreferenceOutput", "build_output", "pair_metric_values", "token_metrics",
           "token_sums"]
