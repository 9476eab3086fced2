"""Fast mode for a loss of per-token log-probs (and entropies): the gradients are formed during the forward, one
bounded group of scored rows at a time.

Online policy losses (GRPO, RLOO, SFT's mean of ``-log p``: ``fastpref.losses.policy``) are sums over groups of
tokens whose terms each depend on the group's own log-probs and entropies only, once the token weights are known
from the masks. So per group of t scored rows: the logits once into the kept buffer (2·t·H·V, bounded by the
memory budget), their statistics, the per-token log-probs and entropies, the group's loss and its derivatives
``dL/dlogp`` and ``dL/dH`` by autograd on the small ``token_loss`` callable, the buffer turned into ``G = c·(onehot
- p) - e·p·(log p + H)`` (times dz/dy) in place and fed to the dH and dW GEMMs (4·t·H·V): 6·n·H·V FLOPs for the
policy, no recompute. The upstream gradient is folded in by the backward as in ``fast_pair_loss`` (whose group
helpers this op shares: ``_GroupedHead.fold_rows`` / ``group_grads``, ``_PendingGrads``).

Groups are contiguous ranges of scored rows: a token-separable loss may split a sequence across groups (an 8k-token
completion at a 152k vocabulary is two groups of the default 2 GiB budget); a loss that reads a whole sequence
(sequence-level importance ratios: GSPO, luspo, RLOO) asks for whole sequences (``whole_sequences=True``), and
where one sequence does not fit, ``plan_token_groups`` returns None and the caller runs lean mode
(``head_pass.LinearLogProbs``, 8·n·H·V). A loss that needs a batch-wide quantity of every token first (GRPO's
``top_entropy_quantile < 1``) is not a ``token_loss``: lean mode.

The entropy term is formed by the row ops, so a pass that differentiates the entropy runs on the cublas GEMM path
(``gemm_path.implementation(..., entropy_grad=True)``); one that does not runs on either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import gemm_path
from .backend import autocast_off
from .fast_pair_loss import _GroupedHead, _PendingGrads, finish_backward
from .gemm_path import GemmPath
from .head_pass import HeadPass, TokenStats, finalize_stats
from .layout import TokenLayout
from .plan import MAX_GROUPS_DIRECT_DW, default_memory_budget, plan_pair_groups, preferred_group_rows
from .tile_ops import EntropyGrad, LogSumExp, RowGrad, RowStats

# token_loss(logps [t], entropies [t] | None, rows: slice) -> the group's term of the loss (0-dim), differentiable
# in logps and entropies; ``rows``: the group's scored rows [t0, t1) in layout order. The loss is the sum of the
# groups' terms.
TokenLoss = Callable[[torch.Tensor, "torch.Tensor | None", slice], torch.Tensor]
RowGroups = list[tuple[int, int]]


def plan_token_groups(host_offsets: Sequence[int], max_rows: int, preferred_rows: int, *,
                      whole_sequences: bool) -> RowGroups | None:
    """Contiguous ranges ``(t0, t1)`` of scored rows with at most ``max_rows`` rows each, aiming at
    ``preferred_rows``: sequences kept whole where ``whole_sequences`` (None when one sequence alone exceeds
    ``max_rows``), else balanced row ranges. Host ints only."""
    total = host_offsets[-1]
    if not whole_sequences:
        count = -(-total // max(1, min(max_rows, preferred_rows)))
        if count > MAX_GROUPS_DIRECT_DW:
            count = max(MAX_GROUPS_DIRECT_DW, -(-total // max(1, max_rows)))
        step = -(-total // max(1, count))
        return [(t0, min(t0 + step, total)) for t0 in range(0, total, max(step, 1))]
    # each sequence as a "pair" with an empty second member: plan_pair_groups balances whole sequences
    offs = [host_offsets[0]]
    for o in host_offsets[1:]:
        offs += [o, o]
    seq_groups = plan_pair_groups(offs, len(host_offsets) - 1, max_rows, preferred_rows)
    if seq_groups is None:
        return None
    return [(host_offsets[s0], host_offsets[s1]) for s0, s1 in seq_groups if host_offsets[s1] > host_offsets[s0]]


def token_groups(layout: TokenLayout, weight: torch.Tensor, cfg: HeadPass, *, memory_budget: int | None = None,
                 whole_sequences: bool = False) -> RowGroups | None:
    """``plan_token_groups`` for ``layout``'s scored rows: the kept logits of one group (rows x V in the compute
    dtype) within ``memory_budget`` (None: the device's default, ``plan.default_memory_budget``)."""
    budget = memory_budget if memory_budget is not None else default_memory_budget(weight.device)
    elem = torch.empty((), dtype=cfg.compute_dtype).element_size()
    max_rows = budget // max(weight.shape[0] * elem, 1)
    if max_rows < 1:
        return None
    preferred = preferred_group_rows(weight.shape[1], elem, weight.element_size())
    return plan_token_groups(layout.host_offsets, max_rows, preferred, whole_sequences=whole_sequences)


@dataclass(frozen=True)
class TokenProblem:
    """What fast mode needs besides the differentiable tensors: the scored rows, their groups, the loss and the
    pass parameters. ``entropy``: ``token_loss`` reads the entropies (and may differentiate them)."""

    layout: TokenLayout
    groups: RowGroups
    token_loss: TokenLoss
    cfg: HeadPass
    entropy: bool = False


@dataclass(frozen=True)
class TokenResult:
    """Fast mode's detached per-row results beside the loss: log-probs and token statistics (``stats.entropy``
    where the problem reads entropies or the pass asked for them)."""

    logps: torch.Tensor  # [n] fp32, layout order
    stats: TokenStats
    lse: LogSumExp  # per row, for a recompute (a caller's lean fallback)
    # the coefficients the gradients were formed with: dL/dlogp [n] and dL/dH [n] (None: not read), fp32; 0 where
    # no gradient was formed
    grad_logps: torch.Tensor | None = None
    grad_entropy: torch.Tensor | None = None


class FastTokenLoss(torch.autograd.Function):
    """``source`` [N, H] (scored rows ``problem.layout.index``), ``weight`` [V, H], ``bias`` [V] | None
    -> ``(loss, TokenResult)``."""

    @staticmethod
    def forward(ctx, source, weight, bias, problem: TokenProblem):  # type: ignore[override]
        with autocast_off(source.device.type):
            loss, result, pending = token_forward(source, weight, bias, problem, ctx.needs_input_grad[:3])
        ctx.pending = pending  # finished and scaled in place by the backward (see FastPairLoss)
        return loss, result

    @staticmethod
    def backward(ctx, grad_loss, _result):  # type: ignore[override]
        return finish_backward(ctx, grad_loss)


def token_forward(source: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, problem: TokenProblem,
                  need: tuple[bool, ...]) -> tuple[torch.Tensor, TokenResult, _PendingGrads]:
    """``FastTokenLoss``'s forward without autograd (``need``: whether source, weight and bias want a gradient)."""
    need_weight, need_bias = need[1], need[2] and bias is not None
    return gemm_path.run(problem.cfg, lambda path: _token_forward(source, weight, bias, problem, need, path),
                         bias_without_weight=need_bias and not need_weight, entropy_grad=problem.entropy)


def _token_forward(source: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, problem: TokenProblem,
                   need: tuple[bool, ...], path: GemmPath) -> tuple[torch.Tensor, TokenResult, _PendingGrads]:
    need_hidden, need_weight, _ = need
    layout, groups, cfg = problem.layout, problem.groups, problem.cfg
    dev = source.device
    max_rows = max((t1 - t0 for t0, t1 in groups), default=0)
    head = _GroupedHead(layout, [], weight, cfg, path, max_rows=max_rows)
    with_entropy = cfg.with_entropy or problem.entropy
    stats = RowStats.empty(layout.num_scored, dev, with_entropy=with_entropy, with_top1=cfg.with_top1)
    pending = _PendingGrads.start(cfg, path, source, weight, bias, need, empty=not groups or layout.num_scored == 0)
    dw_dtype = path.out_dtype(weight.dtype if len(groups) <= MAX_GROUPS_DIRECT_DW else torch.float32)
    wants_grad = need_hidden or need_weight or pending.d_bias is not None
    loss = torch.zeros((), device=dev, dtype=torch.float32)
    coef = torch.zeros(layout.num_scored, device=dev, dtype=torch.float32)
    ent_coef = torch.zeros_like(coef) if problem.entropy else None
    for i, (t0, t1) in enumerate(groups):
        # 1) the group's logits, kept, their statistics, its log-probs and entropies
        tile, h, group_stats = head.fold_rows(t0, t1, source, weight, bias, stats)
        lse, logps, token_stats = finalize_stats(group_stats, cfg.vocab_size(weight))
        entropy = token_stats.entropy if problem.entropy else None
        # 2) the group's loss and dL/dlogp, dL/dH by autograd on the small callable
        with torch.enable_grad():
            lp = logps.detach().requires_grad_(True)
            ent = None if entropy is None else entropy.detach().requires_grad_(True)
            group_loss = problem.token_loss(lp, ent, slice(t0, t1))
            inputs = [lp] if ent is None else [lp, ent]
            grads = torch.autograd.grad(group_loss, inputs, allow_unused=True) if group_loss.requires_grad else (
                None,) * len(inputs)
        loss = loss + group_loss.detach().float()
        if not wants_grad or t1 == t0:
            continue
        c = torch.zeros_like(logps) if grads[0] is None else grads[0].detach().float().contiguous()
        coef[t0:t1] = c
        ent_grad = None
        if ent is not None:
            e = torch.zeros_like(logps) if grads[1] is None else grads[1].detach().float().contiguous()
            ent_coef[t0:t1] = e
            ent_grad = EntropyGrad(e, entropy)
        grad = RowGrad(layout.targets[t0:t1], lse, c, ent_grad)
        # 3) + 4) G in place, the group's dH rows, dW (the last group's in backward)
        head.group_grads(tile, grad, h, t0, t1, source, weight, pending, last=i == len(groups) - 1,
                         dw_dtype=dw_dtype, need_hidden=need_hidden, need_weight=need_weight)
    lse, logps, token_stats = finalize_stats(stats, cfg.vocab_size(weight))
    if need_weight and pending.last is None and pending.d_weight is None:
        pending.d_weight = torch.zeros_like(weight)  # no scored row reached a gradient GEMM
    return loss, TokenResult(logps=logps, stats=token_stats, lse=lse, grad_logps=coef, grad_entropy=ent_coef), pending


def fast_token_loss(source: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    problem: TokenProblem) -> tuple[torch.Tensor, TokenResult]:
    """Run fast mode on the scored rows ``problem.layout.index`` of ``source`` [N, H]; see the module docstring.
    Returns the differentiable scalar loss (the sum of the groups' terms) and the detached per-row results."""
    return FastTokenLoss.apply(source, weight, bias, problem)


__all__ = ["FastTokenLoss", "RowGroups", "TokenLoss", "TokenProblem", "TokenResult", "fast_token_loss",
           "plan_token_groups", "token_forward", "token_groups"]
