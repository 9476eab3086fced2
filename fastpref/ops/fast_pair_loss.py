"""Fast mode (``mode="fast"``) of the preference loss: the gradients are formed during the forward, one pair group
at a time.

For a pair-separable loss, pair i's loss is known as soon as its chosen and rejected tokens are scored, so the
logits of one group of pairs are computed once, kept (bounded by the memory budget), turned into their
gradient in place and fed to the two gradient matmuls — no logits recompute in backward. Per group of
t tokens: ``logits = h @ W.T`` (2·t·H·V), row statistics, sequence sums, the per-pair loss and its
derivative ``c = dL/dlogp`` by autograd on the tiny loss callable, ``logits <- c·(onehot - softmax)·dz/dy``,
``dH = G @ W`` and ``dW += G.T @ h`` (4·t·H·V).

The upstream gradient s (1, or gradient accumulation's 1/k, ...) is only known in the backward. To fold it in
without a pass over dW, the last group's dW GEMM waits for the backward and takes ``s·h`` (a [t, H] operand) —
with one group, the usual case, dW is written exactly once. The backward scales the small stored pieces (the dH
rows, the bias gradient, and dW of earlier groups when there are several) by s. dH needs the weight and runs in
the forward, so ZeRO-3's gathered head is only needed there.

Tokens are ordered pair by pair (chosen then rejected, see ``layout.interleave_pairs``) so a group of pairs is one
contiguous range of scored rows. The op never imports the loss formulas: it receives ``pair_loss``. The GEMMs run on
the pass's ``gemm_path.GemmPath``, chosen once per pass: the loops below never ask which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import gemm_path
from .backend import autocast_off
from .gemm_path import GemmPath
from .head_pass import HeadPass, TokenStats, finalize_stats, gather, in_layout
from .layout import TokenLayout, segment_sum
from .plan import MAX_GROUPS_DIRECT_DW, PairGroups
from .tile_ops import RowGrad, RowStats

# pair_loss(chosen_logps [g], rejected_logps [g], pairs: slice) -> per-pair losses [g] whose mean over all
# num_pairs pairs is the loss; pure per pair for the pairs in the slice.
PairLoss = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]


@dataclass(frozen=True)
class PairProblem:
    """What the fast path needs besides the differentiable tensors: the scored rows in pair order, the pair
    groups, the per-pair loss and the pass parameters."""

    layout: TokenLayout
    groups: PairGroups
    pair_loss: PairLoss
    cfg: HeadPass

    @property
    def num_pairs(self) -> int:
        return self.layout.num_seqs // 2


@dataclass(frozen=True)
class FastResult:
    """Fast mode's detached results beside the loss."""

    seq_logps: torch.Tensor  # [2P] fp32, pair order
    losses: torch.Tensor  # [P] fp32
    stats: TokenStats  # per scored row


class FastPairLoss(torch.autograd.Function):
    """``source`` [N, H] (scored rows ``problem.layout.index``), ``weight`` [V, H], ``bias`` [V] | None
    -> ``(loss, FastResult)``."""

    @staticmethod
    def forward(ctx, source, weight, bias, problem: PairProblem):  # type: ignore[override]
        with autocast_off(source.device.type):
            loss, result, pending = fast_forward(source, weight, bias, problem, ctx.needs_input_grad[:3])
        # Plain references, not save_for_backward: the backward finishes and scales them in place (no second
        # dW-sized buffer) and so can run once; a second backward raises instead of returning wrong values.
        ctx.pending = pending
        return loss, result

    @staticmethod
    def backward(ctx, grad_loss, _result):  # type: ignore[override]
        return finish_backward(ctx, grad_loss)


def finish_backward(ctx, grad_loss: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """A fast-mode op's backward: the gradients its forward formed (``ctx.pending``), scaled by the upstream
    gradient, once; (d_source, d_weight, d_bias, None for the problem)."""
    pending, ctx.pending = ctx.pending, None
    if pending is None:
        raise RuntimeError("fastpref fast mode: the gradients formed during the forward were already handed "
                           "to a first backward of this loss; backpropagating through it twice "
                           "(retain_graph=True) needs mode='lean'")
    if grad_loss is None:
        return None, None, None, None
    with autocast_off(grad_loss.device.type):
        return (*pending.finish(grad_loss), None)


class LastGroup(NamedTuple):
    """The last group's kept logits (G on a path whose ``grad_`` formed it: ``formed``), what forms G, and its
    hidden rows h [t, H]: its dW GEMM waits for the upstream gradient."""

    tile: torch.Tensor
    grad: RowGrad
    rows: torch.Tensor
    formed: bool


@dataclass
class _PendingGrads:
    """The gradients the forward formed (unscaled), and the last group's dW GEMM left for the backward."""

    cfg: HeadPass
    path: GemmPath  # the path the forward ran on
    d_source: torch.Tensor | None
    d_weight: torch.Tensor | None  # dW of the earlier groups (None when there were none), or an fp32 accumulator
    d_bias: torch.Tensor | None  # fp32
    weight_like: torch.Tensor  # meta: the weight's dtype and layout, which dW is returned in
    bias_dtype: torch.dtype | None
    last: LastGroup | None = None

    @classmethod
    def start(cls, cfg: HeadPass, path: GemmPath, source: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None, need: tuple[bool, ...], *, empty: bool) -> _PendingGrads:
        """Nothing formed yet (``need``: whether source, weight and bias want a gradient; ``empty``: no scored row
        will reach a gradient GEMM, so dW is 0)."""
        need_hidden, need_weight, need_bias = need
        pending = cls(
            cfg=cfg, path=path,
            d_source=torch.zeros_like(source) if need_hidden else None,  # unscored rows get 0
            d_weight=None,
            d_bias=torch.zeros(weight.shape[0], device=source.device, dtype=torch.float32)
            if need_bias and bias is not None else None,
            weight_like=torch.empty_like(weight, device="meta"), bias_dtype=None if bias is None else bias.dtype)
        if need_weight and empty:
            pending.d_weight = torch.zeros_like(weight)
        return pending

    def finish(self, scale: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Scale everything by the upstream gradient ``scale`` (0-dim): fp32 math inside each op, one rounding
        to the gradient's dtype; the last dW GEMM takes the scale in a small operand (``scale·h``, or ``scale·c``
        per row), so dW itself is not re-read."""
        d_source = None if self.d_source is None else self.d_source.mul_(scale)
        if self.d_bias is not None:
            self.d_bias.mul_(scale)
        d_weight, last = None, self.last
        if last is not None:
            earlier = self.d_weight
            if earlier is None:
                dtype = self.path.out_dtype(self.weight_like.dtype)
                d_weight = self.path.grad_buffer(self.weight_like, dtype, device=scale.device)
            else:
                d_weight = earlier.mul_(scale)
            # a fused kernel that cannot run here: cublas forms G from the kept raw logits (formed=False) instead
            gemm_path.run(self.cfg, lambda path: path.grad_weight(
                last.tile, last.grad, last.rows, d_weight, self.d_bias, accumulate=earlier is not None, scale=scale,
                formed=last.formed), entropy_grad=last.grad.entropy is not None)
            d_weight = in_layout(d_weight, self.weight_like)
        elif self.d_weight is not None:  # the last group had no scored token (or nothing was scored at all)
            d_weight = in_layout(self.d_weight.mul_(scale), self.weight_like)
        d_bias = None if self.d_bias is None else self.d_bias.to(self.bias_dtype)
        self.last = None
        return d_source, d_weight, d_bias


class _GroupedHead:
    """One pair group's logits and their row statistics; shared by fast mode and the reference pass that must
    match it bit for bit (same GEMM shapes, same column chunks, same sums). The path folds them (cublas: a GEMM's
    output tile and the row ops; fused: ``linear_fold``'s epilogue) and keeps them in the buffer where asked
    (``keep``: fast mode's gradient GEMMs read them)."""

    def __init__(self, layout: TokenLayout, groups: PairGroups, weight: torch.Tensor, cfg: HeadPass, path: GemmPath,
                 *, keep: bool = True, max_rows: int | None = None) -> None:
        self.layout, self.cfg, self.path = layout, cfg, path
        self.vocab = weight.shape[0]
        offs = layout.host_offsets
        if max_rows is None:  # the largest pair group's scored rows (``fast_token_loss``: its row groups')
            max_rows = max((offs[2 * e] - offs[2 * s] for s, e in groups), default=0)
        self.buf = path.buffer(max_rows, self.vocab, weight.device, keep=keep)
        # Column chunks for the row ops and for casting the weight: the whole row for Triton (one launch),
        # bounded fp32 temporaries for the torch ops.
        self.slab_cols = cfg.plan(max(max_rows, 1), self.vocab).cols
        self.op_cols = self.vocab if cfg.backend == "triton" else self.slab_cols

    def columns(self, width: int) -> list[tuple[int, int]]:
        width = max(1, width)
        return [(v0, min(v0 + width, self.vocab)) for v0 in range(0, self.vocab, width)]

    def weight_columns(self, weight: torch.Tensor) -> list[tuple[int, int]]:
        """One GEMM when the weight is already in the compute dtype, else slab by slab (cast chunk by chunk)."""
        return self.columns(self.vocab if weight.dtype == self.cfg.compute_dtype else self.slab_cols)

    def forward(self, p0: int, p1: int, source: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stats: RowStats):
        """Logits of pairs [p0, p1) (kept in the buffer), folded into ``stats``; returns (logits or None, h, lse,
        seq sums, seg)."""
        offs = self.layout.host_offsets
        t0, t1 = offs[2 * p0], offs[2 * p1]
        tile, h, group_stats = self.fold_rows(t0, t1, source, weight, bias, stats)
        lse = group_stats.lse()
        seg = self.layout.offsets[2 * p0 : 2 * p1 + 1] - t0
        return tile, h, lse, segment_sum(lse.log_probs(group_stats.target_logit), seg), seg

    def fold_rows(self, t0: int, t1: int, source: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  stats: RowStats) -> tuple[torch.Tensor | None, torch.Tensor, RowStats]:
        """Logits of the scored rows [t0, t1) (kept in the buffer), folded into ``stats``; returns (logits or
        None, h, the rows' statistics)."""
        h = gather(source, self.layout.index, t0, t1, self.cfg.compute_dtype)
        tile = None if self.buf is None else self.buf[: t1 - t0]
        group_stats = stats.rows(t0, t1)
        self.path.fold(h, weight, bias, self.layout.targets[t0:t1], group_stats, tile=tile,
                       slabs=self.weight_columns(weight), fold_cols=self.op_cols)
        self.path.combine(group_stats)
        return tile, h, group_stats

    def group_grads(self, tile: torch.Tensor, grad: RowGrad, h: torch.Tensor, t0: int, t1: int,
                    source: torch.Tensor, weight: torch.Tensor, pending: _PendingGrads, *, last: bool,
                    dw_dtype: torch.dtype, need_hidden: bool, need_weight: bool) -> None:
        """One group's gradients from its kept logits: G (``path.grad_``, with the bias gradient), its dH rows (one
        GEMM over the whole vocabulary, or fp32 over slabs of a cast weight) written straight into the rows of the
        [N, H] gradient, and dW (the last group's left for the backward, ``pending.last``)."""
        path, cd, vocab, dev = self.path, self.cfg.compute_dtype, self.vocab, source.device
        # the kept logits -> what the gradient GEMMs read: G = c * (onehot - softmax) * dz/dy in place, with the
        # bias gradient (cublas), or nothing (fused: G is formed in each gradient GEMM's prologue)
        formed = path.grad_(tile, grad, d_bias=pending.d_bias, cols=self.op_cols)
        if need_hidden:
            one_gemm = weight.dtype == cd and path.grad_input_dtype(source.dtype) == source.dtype
            dh = torch.empty((t1 - t0, weight.shape[1]), device=dev, dtype=source.dtype if one_gemm else torch.float32)
            columns = [(0, vocab)] if weight.dtype == cd else self.columns(self.slab_cols)
            for v0, v1 in columns:
                path.grad_input(tile[:, v0:v1], grad, path.operand(weight[v0:v1].to(cd)), dh, vocab_start=v0,
                                accumulate=v0 > 0)
            path.reduce_grad_input(dh)
            pending.d_source.index_copy_(0, self.layout.index[t0:t1], dh.to(source.dtype))
        if need_weight:
            if last:
                pending.last = LastGroup(tile, grad, h, formed)
            else:
                first = pending.d_weight is None
                if first:
                    pending.d_weight = path.grad_buffer(weight, dw_dtype)
                path.grad_weight(tile, grad, h, pending.d_weight, pending.d_bias, accumulate=not first, formed=formed)


@torch.no_grad()
def grouped_sequence_logps(source: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           layout: TokenLayout, groups: PairGroups, cfg: HeadPass) -> tuple[torch.Tensor, TokenStats]:
    """Forward-only sequence sums [2P] (pair order) and token statistics, computed exactly as fast mode computes
    the policy's, so a reference equal to the policy gives bit-identical log-probs (rewards exactly 0, as in TRL).
    It shares the policy's GEMM path key: a fused kernel that cannot run moves both passes to cublas."""
    return gemm_path.run(cfg, lambda path: _grouped_sequence_logps(source, weight, bias, layout, groups, cfg, path))


def _grouped_sequence_logps(source: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            layout: TokenLayout, groups: PairGroups, cfg: HeadPass,
                            path: GemmPath) -> tuple[torch.Tensor, TokenStats]:
    num_pairs = groups[-1][1] if groups else 0
    head = _GroupedHead(layout, groups, weight, cfg, path, keep=False)  # fused: the logits never reach memory
    stats = RowStats.empty(layout.num_scored, source.device, with_entropy=cfg.with_entropy, with_top1=cfg.with_top1)
    seq = torch.zeros(2 * num_pairs, device=source.device, dtype=torch.float32)
    with autocast_off(source.device.type):
        for p0, p1 in groups:
            seq[2 * p0 : 2 * p1] = head.forward(p0, p1, source, weight, bias, stats)[3]
    return seq, finalize_stats(stats, cfg.vocab_size(weight))[2]


def fast_forward(source: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, problem: PairProblem,
                 need: tuple[bool, ...]) -> tuple[torch.Tensor, FastResult, _PendingGrads]:
    """``FastPairLoss``'s forward without autograd: the loss, the detached results and the gradients formed so far
    (``need``: whether source, weight and bias want a gradient; ``pending.finish(scale)`` completes them)."""
    need_weight, need_bias = need[1], need[2] and bias is not None
    return gemm_path.run(problem.cfg, lambda path: _fast_forward(source, weight, bias, problem, need, path),
                         bias_without_weight=need_bias and not need_weight)


def _fast_forward(source: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, problem: PairProblem,
                  need: tuple[bool, ...], path: GemmPath) -> tuple[torch.Tensor, FastResult, _PendingGrads]:
    need_hidden, need_weight, _ = need
    layout, groups, cfg, num_pairs = problem.layout, problem.groups, problem.cfg, problem.num_pairs
    dev = source.device
    head = _GroupedHead(layout, groups, weight, cfg, path)
    stats = RowStats.empty(layout.num_scored, dev, with_entropy=cfg.with_entropy, with_top1=cfg.with_top1)
    seq_logps = torch.zeros(2 * num_pairs, device=dev, dtype=torch.float32)
    losses = torch.zeros(num_pairs, device=dev, dtype=torch.float32)
    pending = _PendingGrads.start(cfg, path, source, weight, bias, need, empty=not groups or layout.num_scored == 0)
    # dW of the groups before the last: straight into a dW in its own dtype for up to MAX_GROUPS_DIRECT_DW
    # partial sums (one rounding each), else in an fp32 accumulator (one rounding at the end); in a dtype the
    # path's GEMMs write.
    dw_dtype = path.out_dtype(weight.dtype if len(groups) <= MAX_GROUPS_DIRECT_DW else torch.float32)
    offs = layout.host_offsets
    inv_pairs = 1.0 / max(num_pairs, 1)
    for i, (p0, p1) in enumerate(groups):
        t0, t1 = offs[2 * p0], offs[2 * p1]
        # 1) logits of the group, kept, and their statistics
        tile, h, lse, group_seq, seg = head.forward(p0, p1, source, weight, bias, stats)
        seq_logps[2 * p0 : 2 * p1] = group_seq
        # 2) the per-pair loss and its derivative by autograd on the small loss callable
        with torch.enable_grad():
            lp = group_seq.detach().requires_grad_(True)
            group_losses = problem.pair_loss(lp[0::2], lp[1::2], slice(p0, p1))
            (c_seq,) = torch.autograd.grad(group_losses.sum() * inv_pairs, lp, allow_unused=True)
        losses[p0:p1] = group_losses.detach()
        if c_seq is None:
            c_seq = torch.zeros_like(lp)
        if not (need_hidden or need_weight or pending.d_bias is not None) or t1 == t0:
            continue
        c_tok = torch.repeat_interleave(c_seq.detach(), seg[1:] - seg[:-1], output_size=t1 - t0).contiguous()
        grad = RowGrad(layout.targets[t0:t1], lse, c_tok)
        # 3) + 4) G from the kept logits, the group's dH rows, dW (the last group's in backward)
        head.group_grads(tile, grad, h, t0, t1, source, weight, pending, last=i == len(groups) - 1, dw_dtype=dw_dtype,
                         need_hidden=need_hidden, need_weight=need_weight)
    _, _, token_stats = finalize_stats(stats, cfg.vocab_size(weight))
    loss = losses.sum() * inv_pairs
    if need_weight and pending.last is None and pending.d_weight is None:
        pending.d_weight = torch.zeros_like(weight)  # no scored row reached a gradient GEMM
    return loss, FastResult(seq_logps=seq_logps, losses=losses, stats=token_stats), pending


def fast_pair_loss(source: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   problem: PairProblem) -> tuple[torch.Tensor, FastResult]:
    """Run fast mode on the scored rows ``problem.layout.index`` of ``source`` [N, H] (pair order); see the module
    docstring. Returns the differentiable scalar loss and the detached results."""
    return FastPairLoss.apply(source, weight, bias, problem)
