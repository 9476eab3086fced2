"""Fused preference loss, fast path: the gradients are formed during the forward, one pair group at a time.

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
contiguous range of scored rows. The op never imports the loss formulas: it receives ``pair_loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from . import gemm_path
from .backend import autocast_off
from .head_pass import (
    HeadPass,
    accumulate_mm,
    fp32_out_matmul,
    gather,
    grad_buffer,
    in_layout,
    kernel_operand,
    project,
)
from .layout import TokenLayout, segment_sum
from .linear_logps import TokenStats, finalize_stats
from .plan import MAX_GROUPS_DIRECT_DW, PairGroups
from .tile_ops import LogSumExp, RowStats, row_ops
from .vocab_shard import combine_stats_, global_vocab, reduce_grad_  # [tp hook] vocabulary-sharded head

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
class FusedResult:
    """The fast path's detached results beside the loss."""

    seq_logps: torch.Tensor  # [2P] fp32, pair order
    losses: torch.Tensor  # [P] fp32
    stats: TokenStats  # per scored row


class FusedPairLoss(torch.autograd.Function):
    """``source`` [N, H] (scored rows ``problem.layout.index``), ``weight`` [V, H], ``bias`` [V] | None
    -> ``(loss, FusedResult)``."""

    @staticmethod
    def forward(ctx, source, weight, bias, problem: PairProblem):  # type: ignore[override]
        need = ctx.needs_input_grad[:3]
        cfg = problem.cfg
        cublas = replace(problem, cfg=replace(cfg, gemm="cublas"))
        if cfg.fused and need[2] and bias is not None and not need[1]:
            problem = cublas  # the fused gradient-weight GEMM forms the bias gradient beside dW
        with autocast_off(source.device.type):
            if problem.cfg.fused:
                loss, result, pending = gemm_path.with_fallback(
                    cfg.gemm_key, lambda: _fused_forward(source, weight, bias, problem, need),
                    lambda: _fused_forward(source, weight, bias, cublas, need))
            else:
                loss, result, pending = _fused_forward(source, weight, bias, problem, need)
        # Plain references, not save_for_backward: the backward finishes and scales them in place (no second
        # dW-sized buffer) and so can run once; a second backward raises instead of returning wrong values.
        ctx.pending = pending
        return loss, result

    @staticmethod
    def backward(ctx, grad_loss, _result):  # type: ignore[override]
        pending, ctx.pending = ctx.pending, None
        if pending is None:
            raise RuntimeError("fastpref fast mode: the gradients formed during the forward were already handed "
                               "to a first backward of this loss; backpropagating through it twice "
                               "(retain_graph=True) needs mode='lean'")
        if grad_loss is None:
            return None, None, None, None
        with autocast_off(grad_loss.device.type):
            d_source, d_weight, d_bias = pending.finish(grad_loss)
        return d_source, d_weight, d_bias, None


@dataclass
class _PendingGrads:
    """The gradients the forward formed (unscaled), and the last group's dW GEMM left for the backward."""

    d_source: torch.Tensor | None
    d_weight: torch.Tensor | None  # dW of the earlier groups (None when there were none), or an fp32 accumulator
    d_bias: torch.Tensor | None  # fp32
    weight_like: torch.Tensor  # meta: the weight's dtype and layout, which dW is returned in
    bias_dtype: torch.dtype | None
    last_tile: torch.Tensor | None = None  # the last group's logits gradient G [t, V] (cublas), raw logits (fused)
    last_rows: torch.Tensor | None = None  # the last group's hidden rows h [t, H]
    # fused: what forms G in the GEMM's prologue (targets, lse, c per row) and the logit transform
    last_grad: tuple[torch.Tensor, LogSumExp, torch.Tensor] | None = None
    transform: dict | None = None
    key: gemm_path.Key | None = None

    def finish(self, scale: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Scale everything by the upstream gradient ``scale`` (0-dim): fp32 math inside each op, one rounding
        to the gradient's dtype; the last dW GEMM takes the scale in a small operand (``scale·h``, or ``scale·c``
        per row on the fused path), so dW itself is not re-read."""
        d_source = None if self.d_source is None else self.d_source.mul_(scale)
        fused = self.last_grad is not None
        if self.d_bias is not None:
            self.d_bias.mul_(scale)
        d_weight = None
        if self.last_tile is not None:
            earlier = self.d_weight
            if earlier is None:
                wd = self.weight_like.dtype
                dtype = wd if wd in (torch.float32, self.last_tile.dtype) or not fused else torch.float32
                d_weight = grad_buffer(self.weight_like, dtype, device=scale.device, unit_cols=fused)
            else:
                d_weight = earlier.mul_(scale)
            if fused:
                targets, lse, c_tok = self.last_grad
                try:
                    from ..kernels import fused_gemm

                    fused_gemm.linear_grad_weight(self.last_tile, targets, *lse, c_tok * scale, self.last_rows,
                                                  d_weight, self.d_bias, vocab_start=0, accumulate=earlier is not None,
                                                  **self.transform)
                except gemm_path.fused_errors() as e:  # form G with the row kernel, then cuBLAS
                    gemm_path.mark_unusable(self.key, e)
                    from .tile_ops import LogitTransform, row_ops

                    t = self.transform
                    transform = LogitTransform(t["logit_scale"], t["softcap"], 1.0 / t["inv_temperature"])
                    g = row_ops("triton").grad_(self.last_tile, targets, lse, c_tok * scale, 0, transform)
                    accumulate_mm(d_weight, g.t(), self.last_rows, first=earlier is None)
                    if self.d_bias is not None:
                        self.d_bias.add_(g.sum(0, dtype=torch.float32))
            else:
                rows = self.last_rows * scale  # fp32 math, one rounding to h's dtype
                accumulate_mm(d_weight, self.last_tile.t(), rows, first=earlier is None)
            d_weight = in_layout(d_weight, self.weight_like)
        elif self.d_weight is not None:  # the last group had no scored token (or nothing was scored at all)
            d_weight = in_layout(self.d_weight.mul_(scale), self.weight_like)
        d_bias = None if self.d_bias is None else self.d_bias.to(self.bias_dtype)
        self.last_tile = self.last_rows = self.last_grad = None
        return d_source, d_weight, d_bias


class _GroupedHead:
    """One pair group's logits and their row statistics; shared by the fast path and the reference pass that must
    match it bit for bit (same GEMM shapes, same column chunks, same sums). On the cublas path the group's logits
    are a GEMM's output tile, folded by the row ops; on the fused path ``linear_fold`` folds them in its epilogue
    and writes them only where they are kept (``keep``: the fast path's gradient GEMMs read them)."""

    def __init__(self, layout: TokenLayout, groups: PairGroups, weight: torch.Tensor, cfg: HeadPass, *,
                 keep: bool = True) -> None:
        self.layout, self.cfg = layout, cfg
        self.vocab = weight.shape[0]
        self.fused = cfg.fused
        offs = layout.host_offsets
        max_rows = max((offs[2 * e] - offs[2 * s] for s, e in groups), default=0)
        self.buf = None
        if max_rows and (keep or not self.fused):
            if self.fused:
                from ..kernels import fused_gemm

                self.buf = fused_gemm.logits_buffer(max_rows, self.vocab, cfg.compute_dtype, weight.device)
            else:
                self.buf = torch.empty((max_rows, self.vocab), device=weight.device, dtype=cfg.compute_dtype)
        # Column chunks for the row ops and for casting the weight: the whole row for Triton (one launch),
        # bounded fp32 temporaries for the torch ops.
        self.slab_cols = cfg.plan(max(max_rows, 1), self.vocab).cols
        self.op_cols = self.vocab if cfg.backend == "triton" else self.slab_cols
        self.ops = row_ops(cfg.backend)

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
        cd = self.cfg.compute_dtype
        offs = self.layout.host_offsets
        t0, t1 = offs[2 * p0], offs[2 * p1]
        h = gather(source, self.layout.index, t0, t1, cd)
        tile = self.buf[: t1 - t0] if self.buf is not None else None
        group_stats = stats.rows(t0, t1)
        targets = self.layout.targets[t0:t1]
        if self.fused:
            from ..kernels import fused_gemm

            for v0, v1 in self.weight_columns(weight):
                fused_gemm.linear_fold(
                    h, kernel_operand(weight[v0:v1].to(cd)),
                    kernel_operand(None if bias is None else bias[v0:v1].to(cd)), targets,
                    group_stats.row_max, group_stats.row_sumexp, group_stats.target_logit, group_stats.logit_sum,
                    group_stats.entropy_acc, group_stats.max_before_target, vocab_start=v0,
                    logits_out=None if tile is None else tile[:, v0:v1], **self.cfg.transform_kwargs())
        else:
            if tile is None:
                tile = source.new_empty((0, self.vocab), dtype=cd)
            for v0, v1 in self.weight_columns(weight):
                project(tile[:, v0:v1], h, weight[v0:v1].to(cd), None if bias is None else bias[v0:v1].to(cd))
            for v0, v1 in self.columns(self.op_cols):
                self.ops.fold(tile[:, v0:v1], targets, group_stats, v0, self.cfg.transform)
        combine_stats_(group_stats, self.cfg.shard)  # [tp hook] the group's global statistics
        lse = group_stats.lse()
        seg = self.layout.offsets[2 * p0 : 2 * p1 + 1] - t0
        return tile, h, lse, segment_sum(lse.log_probs(group_stats.target_logit), seg), seg


@torch.no_grad()
def grouped_sequence_logps(source: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           layout: TokenLayout, groups: PairGroups, cfg: HeadPass) -> tuple[torch.Tensor, TokenStats]:
    """Forward-only sequence sums [2P] (pair order) and token statistics, computed exactly as the fast path
    computes the policy's, so a reference equal to the policy gives bit-identical log-probs (rewards exactly 0,
    as in TRL)."""
    if cfg.fused:  # a fused kernel that cannot run here: cublas for this pass and the policy's (same key)
        return gemm_path.with_fallback(
            cfg.gemm_key, lambda: _grouped_sequence_logps(source, weight, bias, layout, groups, cfg),
            lambda: _grouped_sequence_logps(source, weight, bias, layout, groups, replace(cfg, gemm="cublas")))
    return _grouped_sequence_logps(source, weight, bias, layout, groups, cfg)


def _grouped_sequence_logps(source: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            layout: TokenLayout, groups: PairGroups, cfg: HeadPass) -> tuple[torch.Tensor, TokenStats]:
    num_pairs = groups[-1][1] if groups else 0
    head = _GroupedHead(layout, groups, weight, cfg, keep=False)  # fused: the logits never reach memory
    stats = RowStats.empty(layout.num_scored, source.device, with_entropy=cfg.with_entropy, with_top1=cfg.with_top1)
    seq = torch.zeros(2 * num_pairs, device=source.device, dtype=torch.float32)
    with autocast_off(source.device.type):
        for p0, p1 in groups:
            seq[2 * p0 : 2 * p1] = head.forward(p0, p1, source, weight, bias, stats)[3]
    return seq, finalize_stats(stats, global_vocab(weight, cfg.shard))[2]  # [tp hook]


def _fused_forward(source: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, problem: PairProblem,
                   need: tuple[bool, ...]) -> tuple[torch.Tensor, FusedResult, _PendingGrads]:
    need_hidden, need_weight, need_bias = need
    layout, groups, cfg, num_pairs = problem.layout, problem.groups, problem.cfg, problem.num_pairs
    dev = source.device
    vocab = weight.shape[0]
    cd = cfg.compute_dtype
    head = _GroupedHead(layout, groups, weight, cfg)
    stats = RowStats.empty(layout.num_scored, dev, with_entropy=cfg.with_entropy, with_top1=cfg.with_top1)
    seq_logps = torch.zeros(2 * num_pairs, device=dev, dtype=torch.float32)
    losses = torch.zeros(num_pairs, device=dev, dtype=torch.float32)
    pending = _PendingGrads(
        d_source=torch.zeros_like(source) if need_hidden else None,  # unscored rows get 0
        d_weight=None, d_bias=torch.zeros(vocab, device=dev, dtype=torch.float32) if need_bias and bias is not None
        else None, weight_like=torch.empty_like(weight, device="meta"),
        bias_dtype=None if bias is None else bias.dtype)
    if need_weight and (not groups or layout.num_scored == 0):
        pending.d_weight = torch.zeros_like(weight)
    # dW of the groups before the last: straight into a dW in its own dtype for up to MAX_GROUPS_DIRECT_DW
    # partial sums (one rounding each), else in an fp32 accumulator (one rounding at the end).
    dw_dtype = weight.dtype if len(groups) <= MAX_GROUPS_DIRECT_DW else torch.float32
    fused = head.fused
    if fused:
        from ..kernels import fused_gemm

        grad_kwargs = cfg.transform_kwargs()
        if dw_dtype not in (torch.float32, cd):  # the fused GEMMs write fp32 or the compute dtype
            dw_dtype = torch.float32
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
        targets = layout.targets[t0:t1]
        grad = (targets, lse, c_tok)
        # 3) cublas: logits -> G = c * (onehot - softmax) * dz/dy, in place (fused: G is formed in each gradient
        # GEMM's prologue from the kept raw logits, which are only read)
        if not fused:
            for v0, v1 in head.columns(head.op_cols):
                head.ops.grad_(tile[:, v0:v1], targets, lse, c_tok, v0, cfg.transform)
        # 4) the gradient GEMMs: the group's dH rows (one GEMM over the whole vocabulary, or fp32 over slabs of a
        # cast weight), written straight into the rows of the [N, H] gradient; dW, the last group's in backward
        if need_hidden:
            one_gemm = weight.dtype == cd and (not fused or source.dtype in (torch.float32, cd)) and (
                cfg.shard is None)  # [tp hook] a shard's partial dH is reduced in fp32
            dh = torch.empty((t1 - t0, weight.shape[1]), device=dev, dtype=source.dtype if one_gemm else torch.float32)
            # [tp hook] a shard's fp32 dH goes slab by slab where the matmul would upcast its operands (bounded copies)
            whole = weight.dtype == cd and (cfg.shard is None or fused or cd == torch.float32 or fp32_out_matmul(dev))
            columns = [(0, vocab)] if whole else head.columns(head.slab_cols)
            for v0, v1 in columns:
                w = weight[v0:v1].to(cd)
                if fused:
                    w = kernel_operand(w)
                    fused_gemm.linear_grad_input(tile[:, v0:v1], targets, *lse, c_tok, w, dh, vocab_start=v0,
                                                 accumulate=v0 > 0, **grad_kwargs)
                else:
                    accumulate_mm(dh, tile[:, v0:v1], w, first=v0 == 0)
            reduce_grad_(dh, cfg.shard)  # [tp hook] dH = sum over the vocabulary shards
            pending.d_source.index_copy_(0, layout.index[t0:t1], dh.to(source.dtype))
        if pending.d_bias is not None and not fused:
            pending.d_bias.add_(tile.sum(0, dtype=torch.float32))
        if need_weight:
            if i == len(groups) - 1:
                pending.last_tile, pending.last_rows = tile, h
                if fused:
                    pending.last_grad, pending.transform, pending.key = grad, grad_kwargs, cfg.gemm_key
            else:
                first = pending.d_weight is None
                if first:
                    pending.d_weight = grad_buffer(weight, dw_dtype, unit_cols=fused)
                if fused:  # dW and the bias gradient from G's prologue, the whole vocabulary in one GEMM
                    fused_gemm.linear_grad_weight(tile, targets, *lse, c_tok, h, pending.d_weight, pending.d_bias,
                                                  vocab_start=0, accumulate=not first, **grad_kwargs)
                else:
                    accumulate_mm(pending.d_weight, tile.t(), h, first=first)
    _, _, token_stats = finalize_stats(stats, global_vocab(weight, cfg.shard))  # [tp hook]
    loss = losses.sum() * inv_pairs
    if need_weight and pending.last_tile is None and pending.d_weight is None:
        pending.d_weight = torch.zeros_like(weight)  # no scored row reached a gradient GEMM
    return loss, FusedResult(seq_logps=seq_logps, losses=losses, stats=token_stats), pending


def fused_pair_loss(source: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    problem: PairProblem) -> tuple[torch.Tensor, FusedResult]:
    """Run the fast path on the scored rows ``problem.layout.index`` of ``source`` [N, H] (pair order); see the
    module docstring. Returns the differentiable scalar loss and the detached results."""
    return FusedPairLoss.apply(source, weight, bias, problem)
