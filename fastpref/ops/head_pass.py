"""Tiled passes over the LM head, on either GEMM path (``fastpref.ops.gemm_path``).

``forward_stats`` computes, for the n scored rows ``source[index]``, the online log-sum-exp statistics of
``z = T(h @ W.T + b)`` (2·n·H·V FLOPs): on the cublas path tile by tile, a cuBLAS GEMM into a bounded tile that the
row ops of ``fastpref.ops.tile_ops`` then fold; on the fused path by ``linear_fold``, whose epilogue folds each
block (no tile). ``backward`` (lean mode) recomputes each tile with a cuBLAS GEMM and feeds it to the two gradient
GEMMs (6·n·H·V FLOPs): on the cublas path after turning it into the logits gradient in place, on the fused path
through ``linear_grad_input`` / ``linear_grad_weight``, which form the gradient in their prologue (no pass over the
tile between the GEMMs). The scored rows are gathered chunk by chunk from ``source`` (no [n, H] copy is saved for
backward) and dH is written straight into the rows of a [N, H] gradient. Nothing of size tokens x vocabulary is
allocated.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import gemm_path
from .backend import compute_dtype, resolve_backend
from .plan import TilePlan, default_tile_bytes, plan_tiles
from .tile_ops import LogitTransform, LogSumExp, RowStats, row_ops
from .vocab_shard import VocabShard, combine_stats_, reduce_grad_  # [tp hook] vocabulary-sharded head

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
    gemm: str = "cublas"  # resolved: "fused" | "cublas" (fastpref.ops.gemm_path)
    gemm_key: gemm_path.Key | None = None  # the fused path's (device, dtype, H, V bucket), for its fallback
    shard: VocabShard | None = None  # [tp hook] the head is this vocabulary shard (fastpref.ops.vocab_shard)

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
            shard=shard,  # [tp hook]
        )

    @property
    def fused(self) -> bool:
        """Whether this pass runs the fused GEMMs (``gemm == "fused"`` and they have not failed on the device)."""
        return self.gemm == "fused" and gemm_path.usable(self.gemm_key)

    def transform_kwargs(self) -> dict[str, float | None]:
        t = self.transform
        return {"logit_scale": t.logit_scale, "softcap": t.softcap, "inv_temperature": t.inv_temperature}

    def plan(self, n_rows: int, vocab: int) -> TilePlan:
        # The torch row ops hold ~3 fp32 copies of a tile; size the tile by its fp32 working set there.
        elem = 4 * 3 if self.backend == "torch" else torch.empty((), dtype=self.compute_dtype).element_size()
        return plan_tiles(n_rows, vocab, elem, self.tile_bytes)


def _slab(t: torch.Tensor | None, start: int, end: int, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t[start:end].to(dtype)


def kernel_operand(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` with unit stride along its last dimension (what the fused GEMMs load), copied only when it is not
    (a transposed weight, an expanded bias)."""
    if t is None or (t.stride(-1) == 1 and (t.dim() > 1 or t.is_contiguous())):
        return t
    return t.contiguous()


def unit_columns(t: torch.Tensor) -> bool:
    """Whether the fused GEMMs can read or write the matrix ``t`` as it is (unit stride along its rows)."""
    return t.shape[-1] <= 1 or t.stride(-1) == 1


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and equal strides along every dimension longer than 1 (the others are never stepped)."""
    return a.shape == b.shape and all(n <= 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def grad_buffer(like: torch.Tensor, dtype: torch.dtype, *, device: torch.device | None = None,
                unit_cols: bool = False) -> torch.Tensor:
    """An uninitialised gradient for ``like`` in the layout autograd gives it (``empty_like``'s: ``like``'s strides
    when it is dense, as for a ``.t()`` view of a stored [H, V] head, else contiguous) and ``dtype``; contiguous
    instead when the writer needs unit column stride (``unit_cols``: the fused GEMMs) and that layout lacks it —
    ``in_layout`` then copies it back once. ``device``: default ``like``'s (which may be a meta tensor)."""
    device = like.device if device is None else device
    out = torch.empty_like(like, dtype=dtype, device=device)
    return out if not unit_cols or unit_columns(out) else torch.empty(like.shape, device=device, dtype=dtype)


def in_layout(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``grad`` in the dtype and the layout autograd gives ``like``'s gradient (``grad_buffer``'s), copied only
    when it is not already (``like`` may be a meta tensor: only its metadata is read)."""
    want = torch.empty_like(like, device="meta")
    if grad.dtype == like.dtype and same_layout(grad, want):
        return grad
    return torch.empty_like(like, device=grad.device).copy_(grad)


def project(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``out = h @ w.T (+ b)`` with one rounding to out's dtype (cuBLAS epilogue adds the bias)."""
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def probe_fp32_out_matmul(device: torch.device, addmm: Callable[..., torch.Tensor] = torch.addmm) -> bool:
    """Whether ``addmm(acc, a, b, beta=0 | 1, out_dtype=torch.float32, out=acc)`` accumulates bf16 products into
    an fp32 ``acc`` correctly on ``device``: tried once on 16 x 16 tensors. The op exists only for CUDA, from
    some torch 2.x on, and no release range of it was verified on a GPU here, so it is probed rather than
    assumed from the version; on any failure the caller upcasts instead (with a warning). The check of the
    values syncs once, on the first call per device."""
    try:
        a = torch.ones((16, 16), device=device, dtype=torch.bfloat16)
        acc = torch.full((16, 16), float("nan"), device=device, dtype=torch.float32)
        addmm(acc, a, a, beta=0, out_dtype=torch.float32, out=acc)  # beta=0 must ignore the NaN
        addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        ok = bool(torch.all(acc == 32.0))
    except (TypeError, RuntimeError, NotImplementedError) as e:
        warnings.warn(f"fastpref: torch.addmm(..., out_dtype=torch.float32) is not usable on {device} with torch "
                      f"{torch.__version__} ({type(e).__name__}: {str(e)[:120]}); gradients accumulate through fp32 "
                      "copies of the operands instead (slower, same values)", RuntimeWarning, stacklevel=2)
        return False
    if not ok:
        warnings.warn(f"fastpref: torch.addmm(..., out_dtype=torch.float32) gave wrong values on {device}; "
                      "gradients accumulate through fp32 copies of the operands instead", RuntimeWarning,
                      stacklevel=2)
    return ok


@functools.cache
def _fp32_out_matmul(device_type: str, index: int | None) -> bool:
    return device_type == "cuda" and probe_fp32_out_matmul(torch.device(device_type, index))


def fp32_out_matmul(device: torch.device) -> bool:
    """Whether this device takes the fp32-output matmul path of ``accumulate_mm`` (CUDA, probed once)."""
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return _fp32_out_matmul(device.type, index)


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, first: bool) -> None:
    """``acc (+)= a @ b`` with fp32 accumulation inside the matmul and in ``acc`` (fp32), without rounding
    ``a @ b`` to the inputs' dtype first where the device allows it (``fp32_out_matmul``). ``first``: ``acc``
    is overwritten (its content is never read, so it may be uninitialised). A column-major ``acc`` (the
    gradient of a transposed head keeps its layout) is written as ``acc.T (+)= b.T @ a.T``: row-major for the
    matmul, no copy."""
    if not unit_columns(acc) and acc.stride(0) == 1:
        return accumulate_mm(acc.t(), b.t(), a.t(), first=first)
    if acc.dtype == a.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
        return
    if acc.dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16) and fp32_out_matmul(acc.device):
        torch.addmm(acc, a, b, beta=0 if first else 1, out_dtype=torch.float32, out=acc)
        return
    prod = torch.mm(a.to(acc.dtype), b.to(acc.dtype))
    if first:
        acc.copy_(prod)
    else:
        acc.add_(prod)


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
    args = (source, index, weight, bias, targets, cfg)
    if cfg.fused:
        stats = gemm_path.with_fallback(cfg.gemm_key, lambda: _forward_stats_fused(*args),
                                        lambda: _forward_stats_tiles(*args))
    else:
        stats = _forward_stats_tiles(*args)
    combine_stats_(stats, cfg.shard)  # [tp hook] the global statistics of a vocabulary shard's fold
    return stats


def _forward_stats_tiles(source, index, weight, bias, targets, cfg: HeadPass) -> RowStats:
    n, vocab = index.numel(), weight.shape[0]
    stats = RowStats.empty(n, source.device, with_entropy=cfg.with_entropy, with_top1=cfg.with_top1)
    ops = row_ops(cfg.backend)
    plan = cfg.plan(n, vocab)
    buf = torch.empty((plan.rows, plan.cols), device=source.device, dtype=cfg.compute_dtype)
    for t0 in range(0, n, plan.rows):
        t1 = min(t0 + plan.rows, n)
        h = gather(source, index, t0, t1, cfg.compute_dtype)
        for v0 in range(0, vocab, plan.cols):
            v1 = min(v0 + plan.cols, vocab)
            w, b = _slab(weight, v0, v1, cfg.compute_dtype), _slab(bias, v0, v1, cfg.compute_dtype)
            tile = project(buf[: t1 - t0, : v1 - v0], h, w, b)
            ops.fold(tile, targets[t0:t1], stats.rows(t0, t1), v0, cfg.transform)
    return stats


def fused_slabs(weight: torch.Tensor, cfg: HeadPass, n_rows: int) -> list[tuple[int, int]]:
    """The fused path's vocabulary slabs: the whole vocabulary when the weight is already in the compute dtype
    (one launch), else slabs of the tile plan's width, each cast on its own."""
    vocab = weight.shape[0]
    width = vocab if weight.dtype == cfg.compute_dtype else cfg.plan(max(n_rows, 1), vocab).cols
    return [(v0, min(v0 + width, vocab)) for v0 in range(0, vocab, max(width, 1))]


def _forward_stats_fused(source, index, weight, bias, targets, cfg: HeadPass) -> RowStats:
    from ..kernels import fused_gemm

    n = index.numel()
    stats = RowStats.empty(n, source.device, with_entropy=cfg.with_entropy, with_top1=cfg.with_top1)
    h = gather(source, index, 0, n, cfg.compute_dtype)  # O(tokens x H): the fused GEMM takes every row at once
    for v0, v1 in fused_slabs(weight, cfg, n):
        fused_gemm.linear_fold(h, kernel_operand(weight[v0:v1].to(cfg.compute_dtype)),
                               kernel_operand(_slab(bias, v0, v1, cfg.compute_dtype)),
                               targets, stats.row_max, stats.row_sumexp, stats.target_logit, stats.logit_sum,
                               stats.entropy_acc, stats.max_before_target, vocab_start=v0, **cfg.transform_kwargs())
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
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_r grad_rows[r] * logp_r`` w.r.t. ``source`` [N, H] (rows outside ``index`` get 0),
    weight [V, H] and bias [V], by recompute; each in its tensor's dtype.

    Vocabulary slabs are the outer loop: each slab of the weight is cast once, its dW sums over the row chunks
    (directly for up to ``MAX_PARTIAL_SUMS`` chunks, else in fp32 over one slab) and dH sums over the slabs in
    an fp32 [n, H] accumulator (O(tokens·H)).
    """
    args = (source, index, weight, bias, targets, lse, grad_rows, cfg)
    need = dict(need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias)
    # the fused gradient-weight GEMM forms the bias gradient beside dW; a bias gradient without dW stays on cublas
    if cfg.fused and (need_weight or not (need_bias and bias is not None)):
        return gemm_path.with_fallback(cfg.gemm_key, lambda: _backward(*args, fused=True, **need),
                                       lambda: _backward(*args, fused=False, **need))
    return _backward(*args, fused=False, **need)


def _backward(source, index, weight, bias, targets, lse, grad_rows, cfg: HeadPass, *, fused: bool,
              need_hidden: bool, need_weight: bool, need_bias: bool):
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
    ops = row_ops(cfg.backend)
    plan = cfg.plan(n, vocab)
    n_slabs = -(-vocab // plan.cols)
    single_row_chunk = plan.rows >= n
    cd = cfg.compute_dtype
    # the fused GEMMs write fp32 or the compute dtype with unit column stride: another gradient dtype, or a
    # transposed weight's layout (which dW keeps, as autograd does), goes through an fp32 buffer of one slab
    writable = (torch.float32, cd) if fused else (weight.dtype, source.dtype)
    direct_dw = need_weight and -(-n // plan.rows) <= MAX_PARTIAL_SUMS and weight.dtype in writable and (
        not fused or unit_columns(d_weight))
    # one row chunk: gather it once for every slab; several: per chunk and slab (cheap next to the GEMMs)
    rows = gather(source, index, 0, n, cd) if single_row_chunk else None
    if need_hidden:
        direct_dh = n_slabs == 1 and source.dtype in writable and cfg.shard is None  # [tp hook] fp32 to reduce
        dh_acc = torch.empty((n, source.shape[1]), device=dev, dtype=source.dtype if direct_dh else torch.float32)
    if fused:
        from ..kernels import fused_gemm

        buf = fused_gemm.logits_buffer(plan.rows, plan.cols, cd, dev)  # rows aligned for the prologue GEMMs
        grad_kwargs = cfg.transform_kwargs()
    else:
        buf = torch.empty((plan.rows, plan.cols), device=dev, dtype=cd)
    for v0 in range(0, vocab, plan.cols):
        v1 = min(v0 + plan.cols, vocab)
        w, b = _slab(weight, v0, v1, cd), _slab(bias, v0, v1, cd)
        if fused:
            w = kernel_operand(w)
        # dW of one slab sums over the row chunks: straight into dW for up to a handful of chunks (each GEMM
        # accumulates in fp32, one rounding per chunk), else in an fp32 buffer of one slab.
        if need_weight:
            dw_slab = d_weight[v0:v1] if direct_dw else torch.empty(
                (v1 - v0, weight.shape[1]), device=dev, dtype=torch.float32)
        if d_bias is not None:
            db_slab = torch.zeros((v1 - v0,), device=dev, dtype=torch.float32)
        for t0 in range(0, n, plan.rows):
            t1 = min(t0 + plan.rows, n)
            h = rows if rows is not None else gather(source, index, t0, t1, cd)
            tile = project(buf[: t1 - t0, : v1 - v0], h, w, b)
            if fused:  # the gradient is formed in each GEMM's prologue from the raw logits
                g = (targets[t0:t1], *lse.rows(t0, t1), grad_rows[t0:t1])
                if need_hidden:
                    fused_gemm.linear_grad_input(tile, *g, w, dh_acc[t0:t1], vocab_start=v0, accumulate=v0 > 0,
                                                 **grad_kwargs)
                if need_weight:
                    fused_gemm.linear_grad_weight(tile, *g, h, dw_slab, None if d_bias is None else db_slab,
                                                  vocab_start=v0, accumulate=t0 > 0, **grad_kwargs)
                continue
            ops.grad_(tile, targets[t0:t1], lse.rows(t0, t1), grad_rows[t0:t1], v0, cfg.transform)
            if need_hidden:
                accumulate_mm(dh_acc[t0:t1], tile, w, first=v0 == 0)
            if need_weight:
                accumulate_mm(dw_slab, tile.t(), h, first=t0 == 0)
            if d_bias is not None:
                db_slab.add_(tile.sum(0, dtype=torch.float32))
        if need_weight and not direct_dw:
            d_weight[v0:v1].copy_(dw_slab)
        if d_bias is not None:
            d_bias[v0:v1].copy_(db_slab)
    if need_hidden:
        reduce_grad_(dh_acc, cfg.shard)  # [tp hook] dH = sum over the vocabulary shards
        # scatter into dH's rows chunk by chunk: no second [n, H] temporary beside the accumulator
        for t0 in range(0, n, plan.rows):
            t1 = min(t0 + plan.rows, n)
            d_source.index_copy_(0, index[t0:t1], dh_acc[t0:t1].to(source.dtype))
    return d_source, d_weight, d_bias
