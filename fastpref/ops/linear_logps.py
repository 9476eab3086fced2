"""The scored tokens of a batch and their per-token log-probs, through ``head_pass.LinearLogProbs`` (lean mode's
op: forward statistics only, the logits recomputed tile by tile in backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .head_pass import HeadPass, LinearLogProbs, TokenStats
from .layout import TokenLayout, build_layout
from .vocab_shard import localize


@dataclass(frozen=True)
class ScoredTokens:
    """The scored tokens of a batch, their log-probs (differentiable) and token statistics."""

    layout: TokenLayout
    logps: torch.Tensor
    stats: TokenStats


def flat_rows(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` [..., H] as the [N, H] source the scored rows are gathered from (a view when contiguous)."""
    return hidden.reshape(-1, hidden.shape[-1])


def score_tokens(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: TokenLayout,
                 cfg: HeadPass) -> ScoredTokens:
    """Run ``LinearLogProbs`` on the scored tokens ``layout`` of ``hidden`` [..., H]."""
    logps, stats = LinearLogProbs.apply(flat_rows(hidden), weight, bias, layout, cfg)
    return ScoredTokens(layout=layout, logps=logps, stats=stats)


def score_labels(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                 cfg: HeadPass, *, ignore_index: int, seq_ids: torch.Tensor | None = None,
                 num_seqs: int = 1, check_finite: bool = False) -> ScoredTokens:
    """Compact the scored tokens of ``labels`` (the call's one host sync) and score them; ``check_finite``:
    the inputs' values must be finite (counted in the same sync)."""
    finite = [(n, t.detach()) for n, t in (("hidden", hidden), ("weight", weight), ("bias", bias)) if t is not None]
    layout = build_layout(labels.reshape(-1), ignore_index=ignore_index, vocab_size=cfg.vocab_size(weight),
                          seq_ids=None if seq_ids is None else seq_ids.reshape(-1), num_seqs=num_seqs,
                          finite=finite if check_finite else ())
    layout = localize(layout, cfg.shard)  # a vocabulary shard: global target ids -> its own rows
    return score_tokens(hidden, weight, bias, layout, cfg)


def scatter_tokens(values: torch.Tensor, layout: TokenLayout, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Put per-scored-row ``values`` [n] back at their token positions (0 elsewhere), differentiably."""
    out = values.new_zeros(layout.num_tokens)
    return out.index_put((layout.index,), values).reshape(shape)
