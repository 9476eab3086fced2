"""Autograd op for per-token log-probs of the scored rows, straight from hidden states and the LM head.

``logps = log_softmax(T(h @ W.T + b).float(), -1).gather(-1, targets)`` for the n scored rows, computed by
``fastpref.ops.head_pass`` in bounded tiles. Saved for backward: the hidden states (no copy), the layout of
the scored rows, the weight and the per-row log-sum-exp (O(tokens)); the backward recomputes the logits tile
by tile (lean path, 8·n·H·V FLOPs in all).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import head_pass
from .backend import autocast_off
from .head_pass import HeadPass
from .layout import TokenLayout, build_layout
from .tile_ops import LogSumExp, RowStats
from .vocab_shard import global_vocab, localize


@dataclass(frozen=True)
class TokenStats:
    """Per scored row, fp32 ``[n]`` and detached: the mean logit (TRL's ``logits/*``), and the entropy and the
    top-1 hit (``mean_token_accuracy``) when the pass asked for them."""

    mean_logits: torch.Tensor
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


def finalize_stats(stats: RowStats, vocab: int) -> tuple[LogSumExp, torch.Tensor, TokenStats]:
    """``(lse in two parts, logps, token statistics)`` from the folded running statistics."""
    lse = stats.lse()
    logps = lse.log_probs(stats.target_logit)
    entropy = None if stats.entropy_acc is None else lse.total() - stats.entropy_acc / stats.row_sumexp
    is_top1 = None
    if stats.max_before_target is not None:
        is_top1 = (stats.target_logit >= stats.row_max) & (stats.target_logit > stats.max_before_target)
    return lse, logps, TokenStats(stats.logit_sum / max(vocab, 1), entropy, is_top1)


class LinearLogProbs(torch.autograd.Function):
    """``source`` [N, H], ``weight`` [V, H], ``bias`` [V] | None, the scored rows ``layout`` (``layout.index``,
    ``layout.targets``) and the pass parameters -> ``(logps [n], TokenStats)``. The gradient of ``source`` is 0
    outside ``layout.index``."""

    @staticmethod
    def forward(ctx, source, weight, bias, layout: TokenLayout, cfg: HeadPass):  # type: ignore[override]
        with autocast_off(source.device.type):
            stats = head_pass.forward_stats(source, layout.index, weight, bias, layout.targets, cfg)
        lse, logps, token_stats = finalize_stats(stats, global_vocab(weight, cfg.shard))  # [tp hook]
        ctx.save_for_backward(source, weight, bias, *lse)
        ctx.layout, ctx.cfg = layout, cfg
        return logps, token_stats

    @staticmethod
    def backward(ctx, grad_logps, _token_stats):  # type: ignore[override]
        source, weight, bias, row_max, log_sumexp = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if grad_logps is None:
            return None, None, None, None, None
        layout = ctx.layout
        with autocast_off(source.device.type):
            d_source, d_weight, d_bias = head_pass.backward(
                source, layout.index, weight, bias, layout.targets, LogSumExp(row_max, log_sumexp),
                grad_logps.float().contiguous(), ctx.cfg,
                need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
            )
        return d_source, d_weight, d_bias, None, None


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
    layout = build_layout(labels.reshape(-1), ignore_index=ignore_index, vocab_size=global_vocab(weight, cfg.shard),
                          seq_ids=None if seq_ids is None else seq_ids.reshape(-1), num_seqs=num_seqs,
                          finite=finite if check_finite else ())
    layout = localize(layout, cfg.shard)  # [tp hook] global target ids -> this shard's slab
    return score_tokens(hidden, weight, bias, layout, cfg)


def scatter_tokens(values: torch.Tensor, layout: TokenLayout, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Put per-scored-row ``values`` [n] back at their token positions (0 elsewhere), differentiably."""
    out = values.new_zeros(layout.num_tokens)
    return out.index_put((layout.index,), values).reshape(shape)
