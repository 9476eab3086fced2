"""Tiled passes over the LM head, on either GEMM path (``fastpref.ops.gemm_path``).

``forward_stats`` computes, for the n scored rows ``source[index]``, the online log-sum-exp statistics of
``z = T(h @ W.T + b)`` (2·n·H·V FLOPs) in row blocks x vocabulary slabs planned by the path (``GemmPath.fold_plan``):
on the cublas path a cuBLAS GEMM into a bounded tile that the row ops then fold; on the fused path ``linear_fold``,
whose epilogue folds each block (every row at once, no tile). ``backward`` (lean mode) recomputes each tile with a
cuBLAS GEMM and feeds it to the two gradient GEMMs (6·n·H·V FLOPs): ``GemmPath.grad_`` turns it into the logits
gradient in place (cublas) or leaves it for the GEMMs' prologue (fused). The scored rows are gathered chunk by
chunk from ``source`` (no [n, H] copy is saved for backward) and dH is written straight into the rows of a [N, H]
gradient. Nothing of size tokens x vocabulary is allocated. The loops never ask which path runs.

``LinearLogProbs`` is lean mode's autograd op over the two: ``logps = log_softmax(T(h @ W.T + b).float(),
-1).gather(-1, targets)`` of the scored rows; saved for backward: the hidden states (no copy), the layout of the
scored rows, the weight and the per-row log-sum-exp (O(tokens)); 8·n·H·V FLOPs in all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import gemm_path
from .backend import autocast_off, compute_dtype, resolve_backend
from .gemm_path import GemmPath, project
from .gemm_path import accumulate_mm as accumulate_mm  # re-exported: the GEMM helpers' former home
from .gemm_path import fp32_out_matmul as fp32_out_matmul
from .gemm_path import probe_fp32_out_matmul as probe_fp32_out_matmul
from .layout import TokenLayout
from .plan import TilePlan, default_tile_bytes, plan_tiles
from .tile_ops import EntropyGrad, LogitTransform, LogSumExp, RowGrad, RowStats
from .vocab_shard import VocabShard, global_vocab

# The accumulation rule (docs/design.md): across chunks, an accumulator of the whole dW may take at most a handful
# of partial sums in its own dtype; beyond that, dW accumulates in fp32 one vocabulary slab at a time.
MAX_PARTIAL_SUMS = 4


@dataclass(frozen=True)
class HeadPass:
    """The parameters of one pass over the LM head besides the tensors (travels through autograd as one object,
    as Cut-Cross-Entropy's params dataclass does)."""

    transform: LogitTransform
    compute_dtype: torch.dtype
    backend: str  # resolved: "triton" | "torch"
    tile_bytes: int
    with_entropy: bool = False
    with_top1: bool = False
    gemm: str = "cublas"  # resolved: "fused" | "cublas"; the path itself: gemm_path.implementation / run
    gemm_key: gemm_path.Key | None = None  # the fused path's (device, dtype, H, V bucket), for its fallback
    shard: VocabShard | None = None  # the head is this vocabulary shard: the switch adds its collectives

    @classmethod
    def for_inputs(cls, hidden: torch.Tensor, weight: torch.Tensor, *, backend: str | None,
                   transform: LogitTransform, tile_bytes: int | None = None, with_entropy: bool = False,
                   with_top1: bool = False, gemm: str | None = None, shard: VocabShard | None = None) -> HeadPass:
        """The parameters for ``hidden``'s device and dtype (autocast included), the head's shape, a requested
        backend and GEMM path."""
        cd = compute_dtype(hidden)
        resolved = resolve_backend(backend, hidden.device)
        vocab, size = weight.shape[0], weight.shape[-1]
        return cls(
            transform=transform,
            compute_dtype=cd,
            backend=resolved,
            tile_bytes=tile_bytes if tile_bytes is not None else default_tile_bytes(hidden.device),
            with_entropy=with_entropy,
            with_top1=with_top1,
            gemm=gemm_path.resolve(gemm, resolved, hidden.device, cd, size, vocab),
            gemm_key=gemm_path.key_of(hidden.device, cd, size, vocab),
            shard=shard,
        )

    def vocab_size(self, weight: torch.Tensor) -> int:
        """The vocabulary the targets index and the statistics cover once combined: the whole head's (a shard's
        ``weight`` holds only its rows)."""
        return global_vocab(weight, self.shard)

    def plan(self, n_rows: int, vocab: int) -> TilePlan:
        # The torch row ops hold ~3 fp32 copies of a tile; size the tile by its fp32 working set there.
        elem = 4 * 3 if self.backend == "torch" else torch.empty((), dtype=self.compute_dtype).element_size()
        return plan_tiles(n_rows, vocab, elem, self.tile_bytes)


def _slab(t: torch.Tensor | None, start: int, end: int, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t[start:end].to(dtype)


def _cut(buf: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor | None:
    return None if buf is None else buf[:rows, :cols]


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and equal strides along every dimension longer than 1 (the others are never stepped)."""
    return a.shape == b.shape and all(n <= 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def in_layout(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``grad`` in the dtype and the layout autograd gives ``like``'s gradient (``gemm_path.grad_buffer``'s), copied
    only when it is not already (``like`` may be a meta tensor: only its metadata is read)."""
    want = torch.empty_like(like, device="meta")
    if grad.dtype == like.dtype and same_layout(grad, want):
        return grad
    return torch.empty_like(like, device=grad.device).copy_(grad)


def gather(source: torch.Tensor, index: torch.Tensor, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Scored rows ``start:end`` of ``source`` [N, H] in the compute dtype: gathered per chunk, so no [n, H] copy
    of the scored rows outlives a chunk."""
    return source.index_select(0, index[start:end]).to(dtype)


def forward_stats(source: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  targets: torch.Tensor, cfg: HeadPass) -> RowStats:
    """Online log-sum-exp statistics of the scored rows ``source[index]`` (``source`` [N, H], ``index`` [n])."""
    n, vocab = index.numel(), weight.shape[0]
    if n == 0 or vocab == 0:
        return RowStats.empty(n, source.device, with_entropy=cfg.with_entropy, with_top1=cfg.with_top1)
    return gemm_path.run(cfg, lambda path: _forward_stats(source, index, weight, bias, targets, cfg, path))


def _forward_stats(source, index, weight, bias, targets, cfg: HeadPass, path: GemmPath) -> RowStats:
    n, vocab = index.numel(), weight.shape[0]
    stats = RowStats.empty(n, source.device, with_entropy=cfg.with_entropy, with_top1=cfg.with_top1)
    plan = path.fold_plan(cfg.plan(n, vocab), n, weight)
    buf = path.buffer(plan.rows, plan.cols, source.device, keep=False)
    for t0 in range(0, n, plan.rows):
        t1 = min(t0 + plan.rows, n)
        h = gather(source, index, t0, t1, cfg.compute_dtype)
        for v0 in range(0, vocab, plan.cols):
            v1 = min(v0 + plan.cols, vocab)
            path.fold(h, weight, bias, targets[t0:t1], stats.rows(t0, t1), tile=_cut(buf, t1 - t0, v1 - v0),
                      slabs=[(v0, v1)], fold_cols=v1 - v0)
    path.combine(stats)
    return stats


def backward(
    source: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: LogSumExp,
    grad_rows: torch.Tensor,
    cfg: HeadPass,
    *,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    entropy: EntropyGrad | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_r grad_rows[r] * logp_r (+ entropy.coef[r] * H_r)`` w.r.t. ``source`` [N, H] (rows
    outside ``index`` get 0), weight [V, H] and bias [V], by recompute; each in its tensor's dtype. ``entropy``
    (per scored row): the entropy term, formed by the row ops (the pass runs on cublas).

    Vocabulary slabs are the outer loop: each slab of the weight is cast once, its dW sums over the row chunks
    (directly for up to ``MAX_PARTIAL_SUMS`` chunks, else in fp32 over one slab) and dH sums over the slabs in
    an fp32 [n, H] accumulator (O(tokens·H)).
    """
    args = (source, index, weight, bias, targets, lse, grad_rows, cfg)
    need = dict(need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias, entropy=entropy)
    return gemm_path.run(cfg, lambda path: _backward(*args, path, **need),
                         bias_without_weight=need_bias and bias is not None and not need_weight,
                         entropy_grad=entropy is not None)


def _backward(source, index, weight, bias, targets, lse, grad_rows, cfg: HeadPass, path: GemmPath, *,
              need_hidden: bool, need_weight: bool, need_bias: bool, entropy: EntropyGrad | None = None):
    n, vocab = index.numel(), weight.shape[0]
    dev = source.device
    nothing_scored = n == 0 or vocab == 0
    d_source = torch.zeros_like(source) if need_hidden else None  # unscored rows get 0
    # every slab of dW and of d_bias is written below (its first row chunk overwrites): no zero fill
    fill = torch.zeros_like if nothing_scored else torch.empty_like
    d_weight = fill(weight) if need_weight else None
    d_bias = fill(bias) if need_bias and bias is not None else None
    if nothing_scored or not (need_hidden or need_weight or d_bias is not None):
        return d_source, d_weight, d_bias
    plan = cfg.plan(n, vocab)
    n_slabs = -(-vocab // plan.cols)
    single_row_chunk = plan.rows >= n
    cd = cfg.compute_dtype
    # a gradient the path's GEMMs cannot write as it is (another dtype, or a transposed weight's layout, which dW
    # keeps as autograd does) goes through an fp32 buffer of one slab
    direct_dw = need_weight and -(-n // plan.rows) <= MAX_PARTIAL_SUMS and path.can_write(d_weight)
    # one row chunk: gather it once for every slab; several: per chunk and slab (cheap next to the GEMMs)
    rows = gather(source, index, 0, n, cd) if single_row_chunk else None
    if need_hidden:
        direct_dh = n_slabs == 1 and path.grad_input_dtype(source.dtype) == source.dtype
        dh_acc = torch.empty((n, source.shape[1]), device=dev, dtype=source.dtype if direct_dh else torch.float32)
    buf = path.buffer(plan.rows, plan.cols, dev, keep=True)
    for v0 in range(0, vocab, plan.cols):
        v1 = min(v0 + plan.cols, vocab)
        w, b = path.operand(_slab(weight, v0, v1, cd)), _slab(bias, v0, v1, cd)
        # dW of one slab sums over the row chunks: straight into dW for up to a handful of chunks (each GEMM
        # accumulates in fp32, one rounding per chunk), else in an fp32 buffer of one slab.
        if need_weight:
            dw_slab = d_weight[v0:v1] if direct_dw else torch.empty(
                (v1 - v0, weight.shape[1]), device=dev, dtype=torch.float32)
        db_slab = None if d_bias is None else torch.zeros((v1 - v0,), device=dev, dtype=torch.float32)
        for t0 in range(0, n, plan.rows):
            t1 = min(t0 + plan.rows, n)
            h = rows if rows is not None else gather(source, index, t0, t1, cd)
            tile = project(buf[: t1 - t0, : v1 - v0], h, w, b)  # the recompute: cuBLAS on both paths
            grad = RowGrad(targets[t0:t1], lse.rows(t0, t1), grad_rows[t0:t1],
                           None if entropy is None else entropy.rows(t0, t1))
            formed = path.grad_(tile, grad, vocab_start=v0, d_bias=db_slab)
            if need_hidden:
                path.grad_input(tile, grad, w, dh_acc[t0:t1], vocab_start=v0, accumulate=v0 > 0)
            if need_weight:
                path.grad_weight(tile, grad, h, dw_slab, db_slab, vocab_start=v0, accumulate=t0 > 0, formed=formed)
        if need_weight and not direct_dw:
            d_weight[v0:v1].copy_(dw_slab)
        if d_bias is not None:
            d_bias[v0:v1].copy_(db_slab)
    if need_hidden:
        path.reduce_grad_input(dh_acc)
        # scatter into dH's rows chunk by chunk: no second [n, H] temporary beside the accumulator
        for t0 in range(0, n, plan.rows):
            t1 = min(t0 + plan.rows, n)
            d_source.index_copy_(0, index[t0:t1], dh_acc[t0:t1].to(source.dtype))
    return d_source, d_weight, d_bias


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
    entropy = None if stats.entropy_acc is None else lse.log_sumexp - stats.entropy_acc / stats.row_sumexp
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
            stats = forward_stats(source, layout.index, weight, bias, layout.targets, cfg)
        lse, logps, token_stats = finalize_stats(stats, cfg.vocab_size(weight))
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
            d_source, d_weight, d_bias = backward(
                source, layout.index, weight, bias, layout.targets, LogSumExp(row_max, log_sumexp),
                grad_logps.float().contiguous(), ctx.cfg,
                need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
            )
        return d_source, d_weight, d_bias, None, None
