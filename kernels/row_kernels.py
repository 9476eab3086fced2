"""Row-wise Triton kernels that turn tiles of LM-head logits into log-prob statistics and gradients.

The matmuls around them run in cuBLAS on bounded ``[tokens, vocab]`` tiles (each tile does reach memory: the
GEMM writes it and these kernels read it); these kernels do the row-wise work on each tile, so the full
``[tokens, vocab]`` logits never exist at once. Equivalent torch code for a
tile ``y = h @ W[v0:v1].T (+ b[v0:v1])`` of raw logits::

    z = y.float() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature

    # fold_logsumexp: online log-sum-exp statistics over vocabulary chunks
    m_new = torch.maximum(m, z.amax(-1)); s = s * exp(m - m_new) + exp(z - m_new[:, None]).sum(-1)
    target_logit = z.gather(-1, targets - v0)          # where the target falls in this chunk
    logit_sum += z.sum(-1)                              # -> mean logit (TRL's logits/chosen)
    ent_acc = (ent_acc + s_old * (m - m_new)) * exp(m - m_new) + (exp(z - m_new) * (z - m_new)).sum(-1)  # HAS_ENTROPY
    max_before_target = max(max_before_target, z[:, :targets - v0].max())  # HAS_TOP1

    # logit_grad, in place: d(sum_t g_t * logp_t)/dy, the log-sum-exp given as lse = m + log(s)
    p = exp((z - m[:, None]) - log(s)[:, None]); y[:] = g[:, None] * (onehot(targets) - p) * dz/dy
    y -= e[:, None] * p * (log(p) + H[:, None]) * dz/dy   # entropy_grad e and entropies H given: d(Σ e·H)/dy

Nothing is stored between the forward and the backward but O(tokens) statistics (m, log s); the backward of
the lean path recomputes each tile, the fused fast path keeps one pair group's tile.

Every exponent is a difference of logits formed before any scaling: ``exp2((z - m)·log2e)``, never
``exp2(z·log2e - m·log2e)``, which loses |z|·2⁻²⁴ in the exponent (up to 4 % of a probability at |z| ≈ 1e6);
and the log-sum-exp stays in two parts, the row max and log s, for the same reason (one fp32 lse = m + log s is
rounded at |z|·2⁻²⁴). ``exp2`` is what the GPU's ex2 instruction computes; ``exp`` is lowered to it times log2e.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch

LOG2E = tl.constexpr(1.4426950408889634)

# One block size per kernel, chosen for the H100 rows of 32k-152k columns; the interpreter uses the same.
FOLD_BLOCK_V = 2048
GRAD_BLOCK_V = 2048
FOLD_NUM_WARPS = 8
GRAD_NUM_WARPS = 8


@triton.jit
def _transform(y, logit_scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    # z = softcap * tanh(y * logit_scale / softcap) / temperature, in fp32; tanh(x) = 2 sigmoid(2x) - 1
    z = y * logit_scale
    if HAS_SOFTCAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)
    return z * inv_temperature


@triton.heuristics(
    {
        "HAS_SOFTCAP": lambda args: args["softcap"] > 0,
    }
)
@triton.jit
def _fold_logsumexp_kernel(
    p_tile,
    stride_tile,
    p_targets,
    p_max,
    p_sumexp,
    p_target_logit,
    p_logit_sum,
    p_entropy_acc,
    p_max_before_target,
    vocab_start,
    n_cols,
    logit_scale,
    softcap,
    inv_temperature,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_TOP1: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Fold one vocabulary chunk of one row's logits into its running statistics (one program per row).

    Each lane keeps its own running max / sum-exp (and entropy, top-1) across the column blocks, rescaled
    lane-wise as an online softmax does; the block-wide reductions happen once, after the loop, and merge the
    chunk into the row's running statistics of the earlier chunks."""
    row = tl.program_id(0).to(tl.int64)
    p_row = p_tile + row * stride_tile
    local_target = tl.load(p_targets + row) - vocab_start
    v_max = tl.full([BLOCK_V], -float("inf"), tl.float32)
    v_sum = tl.zeros([BLOCK_V], tl.float32)
    v_zsum = tl.zeros([BLOCK_V], tl.float32)
    v_ent = tl.zeros([BLOCK_V], tl.float32)
    v_before = tl.full([BLOCK_V], -float("inf"), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        o_v = start + tl.arange(0, BLOCK_V)
        m_v = o_v < n_cols
        b_y = tl.load(p_row + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_z = _transform(b_y, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
        v_zsum += tl.where(m_v, b_z, 0.0)
        if HAS_TOP1:
            # argmax takes the first maximum, so a tie with an earlier token is not a top-1 hit
            v_before = tl.maximum(v_before, tl.where(m_v & (o_v < local_target), b_z, -float("inf")))
        new_max = tl.maximum(v_max, tl.where(m_v, b_z, -float("inf")))
        # lanes that have seen no column yet stay at (max -inf, sum 0): shift by 0 there, never by -inf
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)
        rescale = tl.exp2((v_max - shift) * LOG2E)
        b_e = tl.where(m_v, tl.exp2((b_z - shift) * LOG2E), 0.0)
        if HAS_ENTROPY:
            # Σ e·(z - max), relative to the lane's running max: the old sum moves by s·(m_old - m_new) (a lane
            # with nothing summed has s = 0 and m_old = -inf: the floor keeps 0·(-inf) out). b_e = 0 off the row.
            v_ent = (v_ent + v_sum * tl.maximum(v_max - shift, -3.0e38)) * rescale + b_e * (b_z - shift)
        v_sum = v_sum * rescale + b_e
        v_max = new_max
    # one reduction per statistic, then the merge with the running statistics of the earlier chunks
    chunk_max = tl.max(v_max, axis=0)
    lane_scale = tl.where(v_max == -float("inf"), 0.0, tl.exp2((v_max - chunk_max) * LOG2E))
    chunk_sum = tl.sum(v_sum * lane_scale, axis=0)
    b_max = tl.load(p_max + row)
    new_max = tl.maximum(b_max, chunk_max)
    old_scale = tl.exp2((b_max - new_max) * LOG2E)  # b_max = -inf on the first chunk: 0
    chunk_scale = tl.exp2((chunk_max - new_max) * LOG2E)
    if HAS_ENTROPY:
        # each lane's, the chunk's and the earlier chunks' sums moved to the new max (0 where nothing was summed)
        lane_ent = v_ent + v_sum * tl.where(v_sum > 0.0, v_max - chunk_max, 0.0)
        chunk_ent = tl.sum(lane_ent * lane_scale, axis=0) + chunk_sum * (chunk_max - new_max)
        b_sum = tl.load(p_sumexp + row)
        b_ent = tl.load(p_entropy_acc + row) + b_sum * tl.where(b_sum > 0.0, b_max - new_max, 0.0)
        tl.store(p_entropy_acc + row, b_ent * old_scale + chunk_ent * chunk_scale)
    tl.store(p_max + row, new_max)
    tl.store(p_sumexp + row, tl.load(p_sumexp + row) * old_scale + chunk_sum * chunk_scale)
    tl.store(p_logit_sum + row, tl.load(p_logit_sum + row) + tl.sum(v_zsum, axis=0))
    if HAS_TOP1:
        tl.store(p_max_before_target + row, tl.maximum(tl.load(p_max_before_target + row), tl.max(v_before, axis=0)))
    if (local_target >= 0) & (local_target < n_cols):
        b_t = tl.load(p_row + local_target).to(tl.float32)
        tl.store(p_target_logit + row, _transform(b_t, logit_scale, softcap, inv_temperature, HAS_SOFTCAP))


@triton.heuristics(
    {
        "HAS_SOFTCAP": lambda args: args["softcap"] > 0,
        "HAS_ENTROPY": lambda args: args["p_entropy_grad"] is not None,
    }
)
@triton.jit
def _logit_grad_kernel(
    p_tile,
    stride_tile,
    p_targets,
    p_max,
    p_logsumexp,
    p_grad,
    p_entropy_grad,
    p_entropy,
    vocab_start,
    n_cols,
    logit_scale,
    softcap,
    inv_temperature,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Overwrite a tile of raw logits with g * (onehot(target) - softmax) * dz/dy (grid: rows x column blocks);
    with HAS_ENTROPY, plus the entropy term -e * p * (log p + H) * dz/dy (e, H per row)."""
    row = tl.program_id(0).to(tl.int64)
    o_v = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    m_v = o_v < n_cols
    p_row = p_tile + row * stride_tile + o_v
    b_y = tl.load(p_row, mask=m_v, other=0.0).to(tl.float32) * logit_scale
    if HAS_SOFTCAP:
        b_tanh = 2.0 * tl.sigmoid(2.0 * b_y / softcap) - 1.0
        b_z = softcap * b_tanh * inv_temperature
    else:
        b_z = b_y * inv_temperature
    # (z - m) first: exact where the logits are large, then log s (in [0, log V]) in log2 units
    b_p = tl.exp2((b_z - tl.load(p_max + row)) * LOG2E - tl.load(p_logsumexp + row) * LOG2E)
    b_g = tl.load(p_grad + row)
    is_target = (o_v + vocab_start) == tl.load(p_targets + row)
    b_dy = b_g * (is_target.to(tl.float32) - b_p) * (inv_temperature * logit_scale)
    if HAS_ENTROPY:
        # log p as the softmax's exponent: (z - m) first, then log s (exact at large logits)
        b_logp = (b_z - tl.load(p_max + row)) - tl.load(p_logsumexp + row)
        b_ent = tl.load(p_entropy_grad + row) * (b_logp + tl.load(p_entropy + row))
        b_dy -= b_ent * b_p * (inv_temperature * logit_scale)
    if HAS_SOFTCAP:
        b_dy = b_dy * (1.0 - b_tanh * b_tanh)
    tl.store(p_row, b_dy.to(p_tile.dtype.element_ty), mask=m_v)


def _check_tile(tile: torch.Tensor, *rows: torch.Tensor) -> None:
    if tile.dim() != 2 or tile.stride(1) != 1:
        raise ValueError(f"tile: expected a 2-D tensor with unit column stride, got shape {tuple(tile.shape)} "
                         f"and strides {tile.stride()}")
    for r in rows:
        if r.shape != (tile.shape[0],) or not r.is_contiguous() or r.device != tile.device:
            raise ValueError(f"row statistics: expected contiguous [{tile.shape[0]}] tensors on {tile.device}, "
                             f"got shape {tuple(r.shape)} on {r.device}")


def fold_logsumexp(
    tile: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    row_sumexp: torch.Tensor,
    target_logit: torch.Tensor,
    logit_sum: torch.Tensor,
    entropy_acc: torch.Tensor | None,
    max_before_target: torch.Tensor | None,
    *,
    vocab_start: int,
    logit_scale: float,
    softcap: float | None,
    inv_temperature: float,
) -> None:
    """Fold ``tile`` (raw logits of vocabulary columns ``vocab_start:vocab_start + tile.shape[1]``) into the
    fp32 per-row statistics, in place. ``entropy_acc`` / ``max_before_target`` are optional extras."""
    n_rows, n_cols = tile.shape
    _check_tile(tile, targets, row_max, row_sumexp, target_logit, logit_sum)
    if n_rows == 0 or n_cols == 0:
        return
    has_entropy, has_top1 = entropy_acc is not None, max_before_target is not None
    launch(
        _fold_logsumexp_kernel,
        (n_rows,),
        tile,
        tile.stride(0),
        targets,
        row_max,
        row_sumexp,
        target_logit,
        logit_sum,
        entropy_acc if has_entropy else row_sumexp,
        max_before_target if has_top1 else row_max,
        vocab_start,
        n_cols,
        float(logit_scale),
        float(softcap) if softcap is not None else 0.0,
        float(inv_temperature),
        HAS_ENTROPY=has_entropy,
        HAS_TOP1=has_top1,
        BLOCK_V=FOLD_BLOCK_V,
        num_warps=FOLD_NUM_WARPS,
    )


def logit_grad_(
    tile: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    log_sumexp: torch.Tensor,
    grad_rows: torch.Tensor,
    entropy_grad: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    *,
    vocab_start: int,
    logit_scale: float,
    softcap: float | None,
    inv_temperature: float,
) -> torch.Tensor:
    """Overwrite ``tile`` with the gradient of ``sum_r grad_rows[r] * logp_r (+ entropy_grad[r] * H_r)`` w.r.t. its
    raw logits, the rows' log-sum-exp given in two parts, ``row_max + log_sumexp``, and their entropies ``entropy``
    where ``entropy_grad`` is given (fp32 [rows] each)."""
    n_rows, n_cols = tile.shape
    if (entropy_grad is None) != (entropy is None):
        raise ValueError("entropy_grad, entropy: expected both or neither, got "
                         f"{'entropy_grad' if entropy is None else 'entropy'} alone")
    extra = () if entropy is None else (entropy_grad, entropy)
    _check_tile(tile, targets, row_max, log_sumexp, grad_rows, *extra)
    if n_rows == 0 or n_cols == 0:
        return tile
    grid = (n_rows, triton.cdiv(n_cols, GRAD_BLOCK_V))
    launch(
        _logit_grad_kernel,
        grid,
        tile,
        tile.stride(0),
        targets,
        row_max,
        log_sumexp,
        grad_rows,
        entropy_grad,
        entropy,
        vocab_start,
        n_cols,
        float(logit_scale),
        float(softcap) if softcap is not None else 0.0,
        float(inv_temperature),
        BLOCK_V=GRAD_BLOCK_V,
        num_warps=GRAD_NUM_WARPS,
    )
    return tile
