"""Triton GEMMs of the LM head with the logits work fused in: the fold in the forward's epilogue, the gradient in
the backward's prologue.

The row kernels of ``fastpref.kernels.row_kernels`` need every logits tile ``y = h @ W[v0:v1].T (+ b)`` written
to memory by a cuBLAS GEMM first; here the GEMMs themselves do that work, so the logits make fewer (or no) round
trips through memory. Equivalent torch code for one vocabulary slab ``W_slab`` [Vs, H] (columns
``vocab_start ... vocab_start + Vs`` of the vocabulary), ``T`` the logit transform of ``kernels/row_kernels.py``::

    y = (h.float() @ W_slab.float().T + b_slab.float()).to(h.dtype).float()  # fp32 accumulation, one rounding
    z = T(y) = softcap * tanh(y * logit_scale / softcap) * inv_temperature      # softcap optional

    # linear_fold: the running fp32 row statistics of fold_logsumexp(project(h, W_slab, b_slab), ...), in place
    m_new = max(m, z.amax(-1)); s = s * exp(m - m_new) + exp(z - m_new[:, None]).sum(-1); m = m_new
    target_logit = z.gather(-1, targets - vocab_start)  # rows whose target lies in this slab; others untouched
    logit_sum += z.sum(-1); ent_acc = ent_acc * exp(m_old - m_new) + (exp(z - m_new) * z).sum(-1)
    max_before_target = max(max_before_target, z[:, :targets - vocab_start].max())
    logits_out[:] = y                                   # optional: what the cuBLAS tile would hold

    # linear_grad_input / linear_grad_weight, from stored raw logits y [n, Vs] (compute dtype, only read) and the
    # rows' log-sum-exp in two parts, lse = m + log s (row_max, log_sumexp)
    p = exp((T(y.float()) - m[:, None]) - log_s[:, None])
    G = grad_rows[:, None] * (onehot(targets - vocab_start) - p) * T'(y)
    out (+)= G.to(h.dtype) @ W_slab                     # [n, H]  (fp32 accumulation)
    out (+)= G.to(h.dtype).T @ h; d_bias (+)= G.sum(0)  # [Vs, H] and [Vs] (d_bias summed from the fp32 G)

The fold reads the accumulator rounded to the compute dtype, as the cuBLAS path's tile holds it, whether or not the
logits are stored: the statistics then describe exactly the logits that the gradient prologue reads back (stored by
this kernel in fast mode, recomputed by a cuBLAS GEMM in lean mode), so the softmax it forms sums to one, and a
forward-only pass (a reference model's) folds the same values as the policy's pass. Folding the fp32 accumulator
instead made exp(y_rounded - lse) sum to 1 ± the rounding: bf16 / fp16 gradients 3-6x the error of the
materialised path at logit std 10-30 (tests/test_gradient_grid.py), and a token whose probability is within the
rounding of 1 got a gradient of the rounding's size.
Exponents are differences of logits taken before any scaling, exp2((z - m)·log2e), and the backward gets the
log-sum-exp in two parts (m, log s), as in ``kernels/row_kernels.py``: exact where |z| is large.

Stored vs recomputed. The forward stores nothing of size tokens x vocabulary unless asked (``logits_out``, which
fast mode keeps for its gradient GEMMs); forward-only scoring never writes a logit. The backward reads the stored raw
logits and recomputes only the elementwise part (transform, softmax, one-hot) in each GEMM's prologue: the gradient
is never written, which removes the separate read-modify-write pass over the logits. The logits themselves are not
recomputed from ``h @ W.T`` inside the backward, as Cut-Cross-Entropy's fully fused backward does: fastpref promises
bit-identical reruns, so no float atomics, so one program must own each output block, and a dH block [BM, H] at
H = 4096 does not fit one program's registers. Every [BM, BK] logits block would then be recomputed (2·BM·BK·H
FLOPs) by each of the H / BLOCK_N programs that need it: H / BLOCK_N (16 at H = 4096) times the forward's GEMM,
against one read of the kept logits (n·Vs·2 bytes) per gradient GEMM here. What is repeated per H block is the
prologue's exp per logit (with a softcap two and a reciprocal); a wide BLOCK_N keeps its share small. It does not
overlap its own warpgroup's MMA on sm_90 (each gradient wgmma is waited for right after it: see the configs), only
the other warpgroup's.

Parallelism and determinism. ``linear_fold`` runs row blocks x vocabulary *splits*: each program walks its
contiguous range of BLOCK_N column blocks keeping the row statistics in registers, writes per-split partials
(fp32 [splits, n] each), and ``_fold_combine_kernel`` merges them into the running statistics in a fixed order.
The gradient GEMMs give every output block to one program with a sequential K loop. No atomics anywhere, so a
rerun is bit-identical.

Contract on stored logits: rows 16-byte aligned with a row stride divisible by 16 elements (``logits_buffer``
allocates such a buffer; slice it at multiples of 16 columns), so Triton can prove its vector accesses aligned.
Under ``TRITON_INTERPRET=1`` (CPU tensors) bf16 takes two emulated steps the interpreter gets wrong (``_dot``,
``_cast``); compiled binaries never contain them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .launch import launch

AUTOTUNE_ENV = "FASTPREF_AUTOTUNE"
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# H100 SXM / H200 (132 SMs) when the device cannot be asked (meta tensors, the interpreter): only the split count
# of the forward depends on it, never a compiled binary.
DEFAULT_NUM_SMS = 132
# A split plan within this fraction of a perfect wave schedule is good enough: fewer splits mean fewer partials.
SPLIT_EFFICIENCY = 0.95
COMBINE_BLOCK = 256
LOG2E = tl.constexpr(1.4426950408889634)
# Tail columns of the fold: below any logit for the max, exp2((NEG - m)·log2e) gives exactly 0 (no overflow in the
# product) and 0 · NEG = 0 in the entropy sum
# (-inf would give NaN there), so one [BM, BN] array is alive in the epilogue, not two.
NEG = tl.constexpr(-1.0e38)


@dataclass(frozen=True)
class GemmConfig:
    """Block sizes of one fused GEMM. ``block_m`` x ``block_n`` is a program's output block (fold: rows x
    vocabulary columns; grad-input: rows x hidden; grad-weight: vocabulary x hidden), ``block_k`` the reduction
    step, ``group_m`` the row-block swizzle for L2 reuse."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            # tl.dot needs every dimension >= 16 (and a power of two for the block)
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"GemmConfig.{name}: expected a power of two >= 16, got {v!r}")
        for name in ("group_m", "num_warps", "num_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"GemmConfig.{name}: expected a positive int, got {v!r}")

    def meta(self) -> dict[str, int]:
        """The kernel's meta-parameters (launch keywords)."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m,
                    num_warps=self.num_warps, num_stages=self.num_stages)

    def triton_config(self) -> triton.Config:
        return triton.Config(dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                                  GROUP_M=self.group_m), num_warps=self.num_warps, num_stages=self.num_stages)


# ---------------------------------------------------------------------------------------------------------------
# Default block configs, reasoned for H100 (sm_90: bf16/fp16 tl.dot -> wgmma, ~4096 dense FLOP and 16 ex2 per
# SM-cycle, 227 KiB of shared memory per block) and valid on A100 (sm_80: mma.sync, 163 KiB).
# tests/test_fused_gemm_aot.py compiles each for both targets with the installed Triton (3.6 and 3.9 checked): no
# spill, <= 255 registers, shared memory within the limit.
#
# Accounting for a config (BM, BN, BK, W warps, S stages), 16-bit inputs:
#   shared memory  S·(BM + BN)·BK·2 B of operand ring buffers (Triton on sm_80 allocates S - 1 of them);
#   registers      the fp32 accumulator, BM·BN·4 B / (32·W) per thread, alive through the K loop; plus, in the fold's
#                  epilogue, the [BM, BN] block transformed in place (z) and one [BM, BN] temporary at a time
#                  (exp(z - m)), six [BM] row statistics (2 rows per thread in wgmma's 16-row warp tiles, 4 under
#                  sm_80's), the stored-logits addresses; in the backward's prologue a [BM, BK] G block in fp32
#                  and in 16 bits.
#   L2 -> SM traffic: 2·BM·BN·BK FLOPs per (BM + BN)·BK·2 bytes, i.e. BM·BN/(BM + BN) FLOP/B; at ~30 B per SM-cycle
#                  of L2 bandwidth a tile needs ~128 FLOP/B to keep wgmma busy, so bigger tiles are faster.
# The two pull in opposite directions. 128 accumulator registers per thread (128x256 at 8 warps, cuBLAS's tile) left
# no room: every such config spilled 150-1000 B once the epilogue / prologue was added; 64 (128x128) is the largest
# that compiles clean, and only with the epilogue written for registers (the row's target column re-loaded per block,
# column-wise compares only in the blocks holding a target, softcap as one exp and one division).
#
# fold, 128x128x32, 8 warps (two warpgroups, each a 64x128 wgmma), 4 stages: 4·(128 + 128)·32·2 = 64 KiB; 64 FLOP/B;
# up to 255 registers with every feature on and no spill on either target (BK = 64 spilled 8-56 B on sm_80 under
# Triton 3.6: its mma.sync operand fragments scale with BK). The epilogue (sm_90, Triton 3.9, no softcap) is 1387
# SASS instructions per block outside the K loop for 64 logits per thread, ~22 per logit, with one MUFU.EX2 per logit
# (a softcap adds one more and a MUFU.RCP), against 2·H FLOPs of MMA per logit. Its K loop keeps one step's two
# wgmmas in flight (async) while the next step's loads land; 4 stages keep three K steps of loads in flight.
#
# grad_input / grad_weight, sm_80: 64x256x32, 8 warps (mma.sync), 4 stages: 4·(64 + 256)·32·2 = 80 KiB; 51 FLOP/B;
# up to 220 registers (Triton 3.9), no spill. The prologue's work is per logit and repeated once per BN-wide H
# block, while the MMA does 2·BN FLOPs per logit: BN = 256 keeps the prologue's share at half of 128x128's at the
# same accumulator size.
#
# grad_input / grad_weight, sm_90: 64x256x16, 8 warps (two warpgroups side by side along H, each a 64x128 wgmma),
# 4 stages: 4·(64 + 256)·16·2 = 40 KiB; 51 FLOP/B; 110-200 registers (Triton 3.9), no spill. BK = 16, one wgmma
# per K step: with BK = 32 (two k16 wgmmas per step, Triton issuing them async) ptxas serialises the warpgroup
# MMAs (C7515, "wgmma.mma_async instructions are serialized ..."): grad_weight for every tile and flag set tried
# (64x64 to 256x128, 4 or 8 warps, Triton 3.6 and 3.9), grad_input at 64x256x32 under Triton 3.6. Every BK = 16 tile
# tried compiled without it; 128x256x16 (85 FLOP/B) spills under Triton 3.6 (grad_input at 255 registers). At BK = 16
# Triton waits for each wgmma right after issuing it (pendings = 0), so a K step's prologue overlaps only the other
# warpgroup's MMA, not its own. The price: a K step is half as long, so the loop's fixed work is paid twice as often:
# 127 / 163 SASS instructions per 1024-logit step (Triton 3.6; grad_input accumulating, grad_weight plain) against 188 /
# 236 per 2048-logit step at BK = 32, ~35 % more per logit. Whether that beats serialised MMAs is for a GPU run to say.
# tests/test_fused_gemm_aot.py fails on C7515.
#
# GROUP_M: the programs resident at once (one per SM: the register use allows no second) share operand blocks
# through L2, so the swizzle decides how often the big operand streams from HBM. At llama3-8b-1k (n = 6144, H = 4096,
# V = 128256, 132 SMs): the fold (48 row blocks x 8 splits) with GROUP_M = 8 runs ~16 row blocks x 8 splits at once:
# W streams 48/16 = 3 times (3.2 GB) while those rows' hidden states (16 MiB) stay in L2. The gradient GEMMs
# (96 row / 2004 vocabulary blocks x 16 H blocks) with GROUP_M = 16 run 16 blocks x ~8 H blocks at once:
# the logits stream twice (3.2 GB) and W (or h) 6 times (6.3 GB), ~9.5 GB in all; GROUP_M = 8 would read the logits
# once but W 12 times (~14 GB); 32 is as good as 16.
#
# fp32 inputs: tl.dot(input_precision="ieee") is an FMA loop on the CUDA cores (no tensor cores, as torch's fp32
# matmul) whose operands sit in registers, each thread holding its rows of A and columns of B for the whole BK, so a
# small BK matters more than the tile (BK = 32 spilled once the K loop was masked): fold 64x64x16, gradients 128x64x16,
# 8 warps, 3 stages: 16 / 32 accumulator registers per thread, 24 / 36 KiB.
# ---------------------------------------------------------------------------------------------------------------
_FOLD_16 = GemmConfig(128, 128, 32, group_m=8, num_warps=8, num_stages=4)
_GRAD_16 = {80: GemmConfig(64, 256, 32, group_m=16, num_warps=8, num_stages=4),
            90: GemmConfig(64, 256, 16, group_m=16, num_warps=8, num_stages=4)}
_FOLD_32 = GemmConfig(64, 64, 16, group_m=8, num_warps=8, num_stages=3)
_GRAD_32 = GemmConfig(128, 64, 16, group_m=8, num_warps=8, num_stages=3)
# Targets: 90 (Hopper: wgmma) and 80 (every other: mma.sync on sm_80 / 86 / 89; untested on newer ones).
ARCHS = (80, 90)
# The target whose configs a launch on a non-CUDA device records (meta tensors, the interpreter): H100 / H200, as
# DEFAULT_NUM_SMS; ``target_arch`` changes it (the ahead-of-time compile records each target's launches).
DEFAULT_ARCH = 90
DEFAULT_CONFIGS: dict[int, dict[str, dict[torch.dtype, GemmConfig]]] = {
    arch: {kind: {torch.bfloat16: c16, torch.float16: c16, torch.float32: c32}
           for kind, c16, c32 in (("fold", _FOLD_16, _FOLD_32), ("grad_input", _GRAD_16[arch], _GRAD_32),
                                  ("grad_weight", _GRAD_16[arch], _GRAD_32))}
    for arch in ARCHS
}
# A fold that stores the logits of a slab whose width is not a multiple of 16 (an odd vocabulary's last slab): Triton
# cannot prove the ragged block's stores aligned, so each element gets its own 64-bit address, and the 128x128 fold
# then spills on sm_80 (8-40 B). Such launches take half the accumulator, 128x64x64 (96 KiB, 42 FLOP/B); fp32's
# default already has the room.
RAGGED_STORE_CONFIGS: dict[torch.dtype, GemmConfig] = {
    torch.bfloat16: GemmConfig(128, 64, 64, group_m=8, num_warps=8, num_stages=4),
    torch.float16: GemmConfig(128, 64, 64, group_m=8, num_warps=8, num_stages=4),
    torch.float32: _FOLD_32,
}
# Opt-in autotune candidates (FASTPREF_AUTOTUNE=1), the default first; each compiles without spills (and on sm_90
# without serialised wgmma) for its target (tests/test_fused_gemm_aot.py), also with masked K loops and ragged shapes.
_TUNE_FOLD_16 = (
    _FOLD_16,
    GemmConfig(128, 128, 32, group_m=8, num_warps=8, num_stages=3),
    GemmConfig(64, 128, 64, group_m=8, num_warps=8, num_stages=4),
    GemmConfig(128, 64, 64, group_m=8, num_warps=8, num_stages=4),
    GemmConfig(64, 128, 32, group_m=8, num_warps=8, num_stages=4),
)
_TUNE_GRAD_16 = {
    80: (
        _GRAD_16[80],
        GemmConfig(64, 256, 32, group_m=8, num_warps=8, num_stages=4),
        GemmConfig(64, 256, 32, group_m=16, num_warps=8, num_stages=3),
        GemmConfig(128, 128, 32, group_m=16, num_warps=8, num_stages=4),
    ),
    90: (  # BK = 16 only: see the default's note
        _GRAD_16[90],
        GemmConfig(64, 256, 16, group_m=8, num_warps=8, num_stages=4),
        GemmConfig(64, 256, 16, group_m=16, num_warps=8, num_stages=3),
        GemmConfig(128, 128, 16, group_m=16, num_warps=8, num_stages=4),
    ),
}
_TUNE_FOLD_32 = (
    _FOLD_32,
    GemmConfig(32, 64, 16, group_m=8, num_warps=4, num_stages=3),
)
_TUNE_GRAD_32 = (
    _GRAD_32,
    GemmConfig(64, 64, 16, group_m=8, num_warps=8, num_stages=3),
    GemmConfig(32, 64, 16, group_m=8, num_warps=4, num_stages=3),
)
AUTOTUNE_CONFIGS: dict[int, dict[str, dict[torch.dtype, tuple[GemmConfig, ...]]]] = {
    arch: {kind: {torch.bfloat16: t16, torch.float16: t16, torch.float32: t32}
           for kind, t16, t32 in (("fold", _TUNE_FOLD_16, _TUNE_FOLD_32),
                                  ("grad_input", _TUNE_GRAD_16[arch], _TUNE_GRAD_32),
                                  ("grad_weight", _TUNE_GRAD_16[arch], _TUNE_GRAD_32))}
    for arch in ARCHS
}
_AUTOTUNE_KEY = ["n_rows_bin", "n_cols", "hidden_size"]


_target = threading.local()


def config_arch(arch: int) -> int:
    """The config table a compute capability ``arch`` (``major·10 + minor``) takes: 90 for Hopper, 80 otherwise."""
    return 90 if arch // 10 == 9 else 80


@contextlib.contextmanager
def target_arch(arch: int) -> Iterator[None]:
    """Launches on non-CUDA tensors (``meta``: recording for the ahead-of-time compile) take ``sm_<arch>``'s configs
    instead of ``DEFAULT_ARCH``'s; CUDA launches always take their device's."""
    if isinstance(arch, bool) or not isinstance(arch, int) or arch < 10:
        raise ValueError(f"arch: expected a compute capability such as 80 or 90, got {arch!r}")
    old = getattr(_target, "arch", None)
    _target.arch = arch
    try:
        yield
    finally:
        _target.arch = old


def device_arch(device: torch.device) -> int:
    """The config table of ``device``: its compute capability on CUDA, else ``target_arch``'s or ``DEFAULT_ARCH``."""
    if device.type == "cuda":
        return config_arch(_cuda_arch(device.index if device.index is not None else torch.cuda.current_device()))
    arch = getattr(_target, "arch", None)
    return config_arch(DEFAULT_ARCH if arch is None else arch)


@functools.cache
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def autotune_enabled() -> bool:
    """``FASTPREF_AUTOTUNE=1`` turns the opt-in autotuning on (read at every launch); otherwise no autotune runs."""
    return os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(u):
    """(tanh u, 1 - tanh² u) in fp32 without cancellation: d = 2·sigmoid(-2|u|) = 1 - |tanh u| in (0, 1], so
    tanh u = sign(u)·(1 - d) and 1 - tanh² u = d·(2 - d); exp overflowing to inf gives d = 0 (saturation)."""
    d = 2.0 / (1.0 + tl.exp2(tl.abs(u) * (2.0 * LOG2E)))
    t = 1.0 - d
    return tl.where(u < 0, -t, t), d * (2.0 - d)


def _interpreted_bf16(t: torch.Tensor) -> bool:
    # CPU tensors only ever run under TRITON_INTERPRET=1, whose bf16 support differs from the GPU's in two places the
    # kernels depend on (see _dot, _cast); CUDA and meta tensors (the ahead-of-time compile) never set the flag.
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


@triton.jit
def _dot(a, b, acc, INTERPRET_BF16: tl.constexpr):
    """acc + a @ b with fp32 accumulation; fp32 operands in IEEE fp32 (torch's default, not TF32). The interpreter
    multiplies bf16 blocks as their raw uint16 bit patterns, so there (only) bf16 operands are widened first: bf16
    products are exact in fp32, so the result is the tensor cores' (exact products, fp32 sums)."""
    if INTERPRET_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """``x.to(dtype)``, fp32 -> bf16 rounded to nearest-even as the GPU's cvt.rn does. The interpreter truncates that
    cast, so there (only) it is done by hand on the bits: add 0x7FFF plus the lowest kept bit, drop 16 bits."""
    if INTERPRET_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return tl.where(x == x, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), x.to(dtype))  # NaN stays NaN
    else:
        return x.to(dtype)


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (row block, column block), GROUP_M row blocks at a time (Triton tutorial 03's L2 order)."""
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.heuristics(
    {
        "HAS_BIAS": lambda args: args["p_bias"] is not None,
        "HAS_SOFTCAP": lambda args: args["softcap"] > 0,
        "HAS_ENTROPY": lambda args: args["p_part_ent"] is not None,
        "HAS_TOP1": lambda args: args["p_part_before"] is not None,
        "STORE_LOGITS": lambda args: args["p_logits"] is not None,
        "EVEN_K": lambda args: args["hidden_size"] % args["BLOCK_K"] == 0,
        "INTERPRET_BF16": lambda args: _interpreted_bf16(args["p_hidden"]),
    }
)
@triton.jit(do_not_specialize=["n_rows_bin"])
def _linear_fold_kernel(
    p_hidden,  # [n, H], unit column stride
    p_weight,  # [Vs, H], unit column stride
    p_bias,  # [Vs] or None
    p_targets,  # [n] int64, global vocabulary ids
    p_target_logit,  # [n] fp32, written where the target lies in this slab
    p_part_max,  # [splits, n] fp32 partial statistics of each split
    p_part_sum,
    p_part_zsum,
    p_part_ent,  # or None
    p_part_before,  # or None
    p_logits,  # [n, Vs] compute dtype, unit column stride, or None
    stride_h,
    stride_w,
    stride_l,
    n_rows,
    n_cols,
    hidden_size,
    n_rows_bin,  # n rounded up to a power of two: the autotune key only
    vocab_start,
    n_splits,
    split_cols,  # columns per split, a multiple of BLOCK_N
    logit_scale,
    softcap,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_TOP1: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    EVEN_K: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One program: BLOCK_M rows x one vocabulary split. K loop over H per BLOCK_N block (fp32 accumulator), then
    the epilogue folds the block into the per-row statistics kept in registers across the split.

    Row indices are int64 (they multiply strides: n·Vs exceeds 2^31); column indices inside a slab are int32 and
    enter 64-bit pointers only as unit-stride offsets or through ``.to(tl.int64) * stride``; the per-element
    compares of the epilogue use int32 offsets relative to the block, and only run in the blocks that need them
    (the slab's tail block, blocks holding a target): a [BM, BN] column index alive across the K loop would cost
    BN/2 registers per thread."""
    pid_m, pid_s = _swizzle(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), n_splits, GROUP_M)
    o_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    m_m = o_m < n_rows
    o_k = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_N)
    col_lo = pid_s * split_cols
    col_hi = tl.minimum(col_lo + split_cols, n_cols)
    p_h_rows = p_hidden + o_m * stride_h
    p_l_rows = p_logits + o_m * stride_l if STORE_LOGITS else p_logits
    b_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_sum = tl.zeros([BLOCK_M], tl.float32)
    b_zsum = tl.zeros([BLOCK_M], tl.float32)
    if HAS_ENTROPY:
        b_ent = tl.zeros([BLOCK_M], tl.float32)
    if HAS_TOP1:
        b_before = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        o_n = n0 + cols
        m_n = o_n < n_cols
        p_w_cols = p_weight + o_n.to(tl.int64) * stride_w
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, hidden_size, BLOCK_K):
            if EVEN_K:
                m_a = m_m[:, None]
                m_b = m_n[None, :]
            else:
                m_a = m_m[:, None] & (k0 + o_k < hidden_size)[None, :]
                m_b = m_n[None, :] & (k0 + o_k < hidden_size)[:, None]
            b_h = tl.load(p_h_rows[:, None] + (k0 + o_k)[None, :], mask=m_a, other=0.0)  # [BM, BK]
            b_w = tl.load(p_w_cols[None, :] + (k0 + o_k)[:, None], mask=m_b, other=0.0)  # [BK, BN] = W.T block
            acc = _dot(b_h, b_w, acc, INTERPRET_BF16)
        if HAS_BIAS:
            acc += tl.load(p_bias + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        # ---- epilogue: the logits rounded to the compute dtype, as the cuBLAS tile and the stored logits hold them
        # (the gradient reads those: folding the unrounded accumulator would make its softmax not sum to one)
        # (rounded in place, in fp32 registers; the store's cast of a representable value is exact)
        acc = _cast(acc, p_hidden.dtype.element_ty, INTERPRET_BF16).to(tl.float32)
        if STORE_LOGITS:
            tl.store(p_l_rows[:, None] + o_n[None, :], acc.to(p_logits.dtype.element_ty),
                     mask=m_m[:, None] & m_n[None, :])
        # transform, fold into the row statistics
        if HAS_SOFTCAP:
            # softcap·tanh(z/softcap) = softcap - 2·softcap / (1 + exp(2z/softcap)): one exp and one division per
            # logit, saturating cleanly (exp -> inf gives softcap, -> 0 gives -softcap); absolute error ~softcap·1e-7.
            # (exp, not exp2 with the constants folded: that form spills 56 B on sm_80 at 128x128x32, 3 stages)
            z = acc * logit_scale
            z = softcap - (2.0 * softcap) / (1.0 + tl.exp(z * (2.0 / softcap)))
            z = z * inv_temperature
        else:
            # one multiply, the same as the gradient prologue's (its z - m must be exact at large logits)
            z = acc * (logit_scale * inv_temperature)
        if n0 + BLOCK_N > n_cols:  # the slab's last block: tail columns leave the sums
            valid = cols[None, :] < n_cols - n0
            block_zsum = tl.sum(tl.where(valid, z, 0.0), axis=1)
            z = tl.where(valid, z, NEG)
            block_max = tl.max(z, axis=1)
        else:
            block_zsum = tl.sum(z, axis=1)
            block_max = tl.max(z, axis=1)
        b_zsum += block_zsum
        # the target's column relative to this block, clamped into int32: -1 if before the block (or an ignored
        # row's negative id), >= n_valid if past the block's columns of this slab. Reloaded per block (an L1 hit)
        # rather than kept in registers across the K loop; column-wise compares only run in blocks holding a target.
        n_valid = tl.minimum(n_cols - n0, BLOCK_N)
        rel_t = tl.load(p_targets + o_m, mask=m_m, other=-1) - (vocab_start + n0)
        rel_t = tl.minimum(tl.maximum(rel_t, -1), BLOCK_N).to(tl.int32)
        if HAS_TOP1:
            # rows whose target lies past this block: all of the block is before it
            b_before = tl.maximum(b_before, tl.where(rel_t >= n_valid, block_max, float("-inf")))
        m_t = (rel_t >= 0) & (rel_t < n_valid) & m_m
        if tl.max(m_t.to(tl.int32), axis=0) > 0:
            # exactly one block of one program holds a row's target: it writes the target logit
            b_tgt = tl.sum(tl.where(cols[None, :] == rel_t[:, None], z, 0.0), axis=1)
            tl.store(p_target_logit + o_m, b_tgt, mask=m_t)
            if HAS_TOP1:
                # the first maximum wins argmax, so a tie with an earlier column is not a top-1 hit
                before = cols[None, :] < rel_t[:, None]  # rows past the block: all of it again (max is idempotent)
                b_before = tl.maximum(b_before, tl.max(tl.where(before, z, float("-inf")), axis=1))
        new_max = tl.maximum(b_max, block_max)
        # differences first, then the scale into exp2: z·log2e - m·log2e would lose |z|·2⁻²⁴ in the exponent
        rescale = tl.exp2((b_max - new_max) * LOG2E)
        e = tl.exp2((z - new_max[:, None]) * LOG2E)
        if HAS_ENTROPY:
            # Σ e·(z - max), relative to the running max as the sum is: the old sum moves by s·(m_old - m_new)
            block_sum = tl.sum(e, axis=1)
            block_ent = tl.sum(e * (z - new_max[:, None]), axis=1)
            b_ent = (b_ent + b_sum * tl.where(b_sum > 0.0, b_max - new_max, 0.0)) * rescale + block_ent
        else:
            block_sum = tl.sum(e, axis=1)
        b_sum = b_sum * rescale + block_sum
        b_max = new_max
    o_p = pid_s.to(tl.int64) * n_rows + o_m
    tl.store(p_part_max + o_p, b_max, mask=m_m)
    tl.store(p_part_sum + o_p, b_sum, mask=m_m)
    tl.store(p_part_zsum + o_p, b_zsum, mask=m_m)
    if HAS_ENTROPY:
        tl.store(p_part_ent + o_p, b_ent, mask=m_m)
    if HAS_TOP1:
        tl.store(p_part_before + o_p, b_before, mask=m_m)


@triton.heuristics(
    {
        "HAS_ENTROPY": lambda args: args["p_entropy_acc"] is not None,
        "HAS_TOP1": lambda args: args["p_max_before_target"] is not None,
    }
)
@triton.jit
def _fold_combine_kernel(
    p_max,
    p_sumexp,
    p_logit_sum,
    p_entropy_acc,
    p_max_before_target,
    p_part_max,
    p_part_sum,
    p_part_zsum,
    p_part_ent,
    p_part_before,
    n_rows,
    n_splits,
    HAS_ENTROPY: tl.constexpr,
    HAS_TOP1: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Merge the per-split partials into the running statistics, splits in order 0, 1, ... (deterministic)::

        M = max(m, part_max.amax(0)); s = s·exp(m - M) + (part_sum·exp(part_max - M)).sum(0)
        ent = (ent + s·(m - M))·exp(m - M) + ((part_ent + part_sum·(part_max - M))·exp(part_max - M)).sum(0)
        logit_sum += part_zsum.sum(0); max_before_target = max(max_before_target, part_before.amax(0))
    """
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m_o = o < n_rows
    b_max = tl.load(p_max + o, mask=m_o, other=0.0)
    new_max = b_max
    p_s = p_part_max + o  # split s at + s·n_rows: advanced as a 64-bit pointer
    for _ in range(0, n_splits):
        new_max = tl.maximum(new_max, tl.load(p_s, mask=m_o, other=0.0))
        p_s += n_rows
    rescale = tl.exp2((b_max - new_max) * LOG2E)  # a first slab's -inf running max gives 0
    b_sum = tl.load(p_sumexp + o, mask=m_o, other=0.0) * rescale
    b_zsum = tl.load(p_logit_sum + o, mask=m_o, other=0.0)
    p_pm, p_ps, p_pz = p_part_max + o, p_part_sum + o, p_part_zsum + o
    if HAS_ENTROPY:
        # Σ e·(z - max) moves with the max: + s·(m_old - M) (0 where nothing was summed yet)
        b_ent = tl.load(p_entropy_acc + o, mask=m_o, other=0.0) * rescale
        b_ent += b_sum * tl.where(b_sum > 0.0, b_max - new_max, 0.0)  # b_sum: already rescaled
        p_pe = p_part_ent + o
    if HAS_TOP1:
        b_before = tl.load(p_max_before_target + o, mask=m_o, other=0.0)
        p_pb = p_part_before + o
    for _ in range(0, n_splits):
        part_max = tl.load(p_pm, mask=m_o, other=0.0)
        r = tl.exp2((part_max - new_max) * LOG2E)
        part_sum = tl.load(p_ps, mask=m_o, other=0.0)
        b_sum += part_sum * r
        b_zsum += tl.load(p_pz, mask=m_o, other=0.0)
        p_pm += n_rows
        p_ps += n_rows
        p_pz += n_rows
        if HAS_ENTROPY:
            part_moved = part_sum * tl.where(part_sum > 0.0, part_max - new_max, 0.0)
            b_ent += (tl.load(p_pe, mask=m_o, other=0.0) + part_moved) * r
            p_pe += n_rows
        if HAS_TOP1:
            b_before = tl.maximum(b_before, tl.load(p_pb, mask=m_o, other=0.0))
            p_pb += n_rows
    tl.store(p_max + o, new_max, mask=m_o)
    tl.store(p_sumexp + o, b_sum, mask=m_o)
    tl.store(p_logit_sum + o, b_zsum, mask=m_o)
    if HAS_ENTROPY:
        tl.store(p_entropy_acc + o, b_ent, mask=m_o)
    if HAS_TOP1:
        tl.store(p_max_before_target + o, b_before, mask=m_o)


@triton.jit
def _logit_grad(b_y, b_m, b_ls2, b_gs, logit_scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """(-g·softmax·dz/dy, g·dz/dy) for a block of raw logits ``b_y`` (fp32), given the row vectors ``b_m`` (the row's
    max logit), ``b_ls2 = log(s)·log2(e)`` (lse = m + log s) and ``b_gs = g·logit_scale·inv_temperature``
    broadcast against the block; the caller adds the second term at the target (G = g·(onehot - softmax)·dz/dy)
    only in blocks that hold a target."""
    if HAS_SOFTCAP:
        t, dt = _tanh(b_y * (logit_scale / softcap))
        z = t * (softcap * inv_temperature)
        b_a = b_gs * dt
    else:
        z = b_y * (logit_scale * inv_temperature)  # the fold's multiply: z - m is exact where z is the max
        b_a = b_gs
    # exp(z - lse) = 2^((z - m)·log2e - log(s)·log2e): the difference before the scale, a sub + FMA + ex2 per logit
    p = tl.exp2((z - b_m) * LOG2E - b_ls2)
    return -(b_a * p), b_a


@triton.heuristics(
    {
        "HAS_SOFTCAP": lambda args: args["softcap"] > 0,
        "EVEN_K": lambda args: args["n_cols"] % args["BLOCK_K"] == 0,
        "INTERPRET_BF16": lambda args: _interpreted_bf16(args["p_weight"]),
    }
)
@triton.jit(do_not_specialize=["n_rows_bin"])
def _linear_grad_input_kernel(
    p_logits,  # [n, Vs] raw logits, compute dtype, unit column stride
    p_targets,  # [n] int64
    p_max,  # [n] fp32, the row's max logit m
    p_logsumexp,  # [n] fp32, log s: lse = m + log s
    p_grad,  # [n] fp32
    p_weight,  # [Vs, H] compute dtype, unit column stride
    p_out,  # [n, H] fp32 or compute dtype, unit column stride
    stride_l,
    stride_w,
    stride_o,
    n_rows,
    n_cols,
    hidden_size,
    n_rows_bin,
    vocab_start,
    logit_scale,
    softcap,
    inv_temperature,
    HAS_SOFTCAP: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    EVEN_K: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[BM rows, BN hidden] (+)= G @ W, G formed per [BM, BK] block of logits in the prologue (K = vocabulary)."""
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.cdiv(hidden_size, BLOCK_N), GROUP_M)
    o_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    m_m = o_m < n_rows
    o_h = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_h = o_h < hidden_size
    o_k = tl.arange(0, BLOCK_K)
    # the target's slab column, clamped into int32 (-1 / n_cols: no column of this slab)
    local_t = tl.minimum(tl.maximum(tl.load(p_targets + o_m, mask=m_m, other=-1) - vocab_start, -1), n_cols)
    local_t = local_t.to(tl.int32)
    b_m = tl.load(p_max + o_m, mask=m_m, other=0.0)[:, None]
    b_ls2 = (tl.load(p_logsumexp + o_m, mask=m_m, other=0.0) * LOG2E)[:, None]
    b_gs = (tl.load(p_grad + o_m, mask=m_m, other=0.0) * (logit_scale * inv_temperature))[:, None]
    p_l_rows = p_logits + o_m * stride_l
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        o_v = k0 + o_k
        if EVEN_K:
            m_y = m_m[:, None]
            m_w = m_h[None, :]
        else:
            m_y = m_m[:, None] & (o_v < n_cols)[None, :]
            m_w = (o_v < n_cols)[:, None] & m_h[None, :]
        b_y = tl.load(p_l_rows[:, None] + o_v[None, :], mask=m_y, other=0.0).to(tl.float32)
        b_g, b_a = _logit_grad(b_y, b_m, b_ls2, b_gs, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
        rel_t = local_t - k0  # the target's column in this block (int32)
        if tl.max(((rel_t >= 0) & (rel_t < BLOCK_K)).to(tl.int32), axis=0) > 0:
            b_g = tl.where(o_k[None, :] == rel_t[:, None], b_g + b_a, b_g)
        if not EVEN_K:
            b_g = tl.where(m_y, b_g, 0.0)
        b_w = tl.load(p_weight + o_v.to(tl.int64)[:, None] * stride_w + o_h[None, :], mask=m_w, other=0.0)
        # G rounded to the compute dtype, as the cuBLAS path multiplies it
        acc = _dot(_cast(b_g, p_weight.dtype.element_ty, INTERPRET_BF16), b_w, acc, INTERPRET_BF16)
    p_o = p_out + o_m[:, None] * stride_o + o_h[None, :]
    m_o = m_m[:, None] & m_h[None, :]
    if ACCUMULATE:
        acc += tl.load(p_o, mask=m_o, other=0.0).to(tl.float32)
    tl.store(p_o, _cast(acc, p_out.dtype.element_ty, INTERPRET_BF16), mask=m_o)


@triton.heuristics(
    {
        "HAS_SOFTCAP": lambda args: args["softcap"] > 0,
        "HAS_DBIAS": lambda args: args["p_dbias"] is not None,
        "EVEN_K": lambda args: args["n_rows"] % args["BLOCK_K"] == 0,
        "INTERPRET_BF16": lambda args: _interpreted_bf16(args["p_hidden"]),
    }
)
@triton.jit(do_not_specialize=["n_rows_bin"])
def _linear_grad_weight_kernel(
    p_logits,  # [n, Vs] raw logits, compute dtype, unit column stride
    p_targets,  # [n] int64
    p_max,  # [n] fp32
    p_logsumexp,  # [n] fp32
    p_grad,  # [n] fp32
    p_hidden,  # [n, H] compute dtype, unit column stride
    p_out,  # [Vs, H] fp32 or compute dtype, unit column stride
    p_dbias,  # [Vs] fp32 or compute dtype, or None
    stride_l,
    stride_h,
    stride_o,
    n_rows,
    n_cols,
    hidden_size,
    n_rows_bin,
    vocab_start,
    logit_scale,
    softcap,
    inv_temperature,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    EVEN_K: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[BM vocabulary, BN hidden] (+)= G.T @ h, G.T formed per [BM, BK] block of logits (K = token rows);
    the programs of the first H block also sum G over the rows into d_bias."""
    num_pid_n = tl.maximum(tl.cdiv(hidden_size, BLOCK_N), 1)  # one H block even at H = 0, for d_bias
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(n_cols, BLOCK_M), num_pid_n, GROUP_M)
    v0 = pid_m * BLOCK_M
    o_v = v0 + tl.arange(0, BLOCK_M)
    m_v = o_v < n_cols
    o_h = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_h = o_h < hidden_size
    o_k = tl.arange(0, BLOCK_K).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if HAS_DBIAS:
        b_db = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, n_rows, BLOCK_K):
        o_r = k0 + o_k  # token rows, int64: they multiply strides
        # row vectors along K; padded rows get g = 0, so their G column is 0
        if EVEN_K:
            b_t = tl.load(p_targets + o_r)
            b_m = tl.load(p_max + o_r)[None, :]
            b_ls2 = (tl.load(p_logsumexp + o_r) * LOG2E)[None, :]
            b_gs = (tl.load(p_grad + o_r) * (logit_scale * inv_temperature))[None, :]
            m_y = m_v[:, None]
            m_x = m_h[None, :]
        else:
            m_r = o_r < n_rows
            b_t = tl.load(p_targets + o_r, mask=m_r, other=-1)
            b_m = tl.load(p_max + o_r, mask=m_r, other=0.0)[None, :]
            b_ls2 = (tl.load(p_logsumexp + o_r, mask=m_r, other=0.0) * LOG2E)[None, :]
            b_gs = (tl.load(p_grad + o_r, mask=m_r, other=0.0) * (logit_scale * inv_temperature))[None, :]
            m_y = m_v[:, None] & m_r[None, :]
            m_x = m_r[:, None] & m_h[None, :]
        # the target's row of this vocabulary block, clamped into int32 (-1 / BLOCK_M: not in this block)
        rel_t = tl.minimum(tl.maximum(b_t - vocab_start - v0, -1), BLOCK_M).to(tl.int32)
        b_y = tl.load(p_logits + o_r[None, :] * stride_l + o_v[:, None], mask=m_y, other=0.0).to(tl.float32)
        b_gt, b_a = _logit_grad(b_y, b_m, b_ls2, b_gs, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)  # G.T
        if tl.max(((rel_t >= 0) & (rel_t < BLOCK_M)).to(tl.int32), axis=0) > 0:
            b_gt = tl.where(rows[:, None] == rel_t[None, :], b_gt + b_a, b_gt)
        if HAS_DBIAS:
            b_db += tl.sum(b_gt, axis=1)
        b_h = tl.load(p_hidden + o_r[:, None] * stride_h + o_h[None, :], mask=m_x, other=0.0)  # [BK, BN]
        acc = _dot(_cast(b_gt, p_hidden.dtype.element_ty, INTERPRET_BF16), b_h, acc, INTERPRET_BF16)
    p_o = p_out + o_v.to(tl.int64)[:, None] * stride_o + o_h[None, :]
    m_o = m_v[:, None] & m_h[None, :]
    if ACCUMULATE:
        acc += tl.load(p_o, mask=m_o, other=0.0).to(tl.float32)
    tl.store(p_o, _cast(acc, p_out.dtype.element_ty, INTERPRET_BF16), mask=m_o)
    if HAS_DBIAS:
        if pid_n == 0:
            if ACCUMULATE:
                b_db += tl.load(p_dbias + o_v, mask=m_v, other=0.0).to(tl.float32)
            tl.store(p_dbias + o_v, _cast(b_db, p_dbias.dtype.element_ty, INTERPRET_BF16), mask=m_v)


# ---------------------------------------------------------------------------------------------------------------
# Config selection
# ---------------------------------------------------------------------------------------------------------------

_KERNELS: dict[str, Any] = {
    "fold": _linear_fold_kernel,
    "grad_input": _linear_grad_input_kernel,
    "grad_weight": _linear_grad_weight_kernel,
}


@functools.cache
def _autotuned(kind: str, dtype: torch.dtype, restore: tuple[str, ...], arch: int = DEFAULT_ARCH) -> Any:
    """The ``triton.autotune`` wrapper of one kernel for one compute dtype and target (built once). ``restore``
    names the outputs an accumulating launch reads (each benchmark run must start from their original values)."""
    configs = [c.triton_config() for c in AUTOTUNE_CONFIGS[config_arch(arch)][kind][dtype]]
    return triton.autotune(configs=configs, key=_AUTOTUNE_KEY, restore_value=list(restore))(_KERNELS[kind])


def default_config(kind: str, dtype: torch.dtype, *, ragged_store: bool = False, arch: int = DEFAULT_ARCH
                   ) -> GemmConfig:
    """The fixed config of ``kind`` ("fold", "grad_input", "grad_weight") for ``dtype`` on ``sm_<arch>``;
    ``ragged_store``: a fold that stores logits of a slab whose width is not a multiple of 16 (see
    ``RAGGED_STORE_CONFIGS``)."""
    if ragged_store and kind == "fold":
        return RAGGED_STORE_CONFIGS[dtype]
    return DEFAULT_CONFIGS[config_arch(arch)][kind][dtype]


def _select(kind: str, dtype: torch.dtype, config: GemmConfig | None, restore: tuple[str, ...] = (), *,
            ragged_store: bool = False, arch: int = DEFAULT_ARCH) -> tuple[Any, dict[str, int], tuple[GemmConfig, ...]]:
    """(kernel, launch meta-parameters, the configs it may run with): a forced ``config``, else the autotuner
    when ``FASTPREF_AUTOTUNE=1``, else the fixed default of ``sm_<arch>``."""
    if config is not None:
        if not isinstance(config, GemmConfig):
            raise TypeError(f"config: expected a GemmConfig or None, got {type(config).__name__}")
        return _KERNELS[kind], config.meta(), (config,)
    if autotune_enabled():
        arch = config_arch(arch)
        return _autotuned(kind, dtype, restore, arch), {}, AUTOTUNE_CONFIGS[arch][kind][dtype]
    default = default_config(kind, dtype, ragged_store=ragged_store, arch=arch)
    return _KERNELS[kind], default.meta(), (default,)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_NUM_SMS


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=256)
def fold_splits(n_rows: int, n_cols: int, block_m: int, align: int, num_sms: int) -> tuple[int, int]:
    """(splits, columns per split) for ``linear_fold``: the fewest splits whose schedule is within
    ``SPLIT_EFFICIENCY`` of perfect, else the best one.

    Programs (row blocks x splits) of equal work run in waves of ``num_sms``; with ``c`` column units of ``align``
    columns and ``per`` units per split, the schedule's efficiency is ``m·c / (waves·num_sms·per)``.
    """
    m, c = -(-n_rows // block_m), -(-n_cols // align)
    best, best_eff = (1, c), -1.0
    for s in range(1, c + 1):
        per = -(-c // s)
        s_eff = -(-c // per)
        if s_eff != s:  # same plan as a smaller s
            continue
        waves = -(-(m * s) // num_sms)
        eff = (m * c) / (waves * num_sms * per)
        if eff > best_eff + 1e-12:
            best, best_eff = (s, per), eff
        if eff >= SPLIT_EFFICIENCY:
            best = (s, per)
            break
    return best[0], best[1] * align


# ---------------------------------------------------------------------------------------------------------------
# Validation of the raw tensors (shapes, strides, dtypes, devices): errors name the argument
# ---------------------------------------------------------------------------------------------------------------


def _tensor(name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _check_matrix(name: str, t: Any, shape: tuple[int | None, int | None], dtypes: tuple[torch.dtype, ...],
                  device: torch.device) -> torch.Tensor:
    """A 2-D tensor of ``shape`` (None = any) with unit column stride (rows may be strided)."""
    t = _tensor(name, t)
    if t.dim() != 2 or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name}: expected unit column stride (rows may be strided), got strides {t.stride()}")
    return t


# Stored logits are read and written with 16-byte vector accesses, which Triton only emits when it can prove the
# alignment: a 16-byte aligned data pointer and a row stride divisible by 16 elements (its integer specialisation).
# Otherwise every element gets its own 64-bit address, and those do not fit in registers beside the accumulator
# (the compile spills hundreds of bytes). ``logits_buffer`` allocates such a buffer.
ROW_STRIDE_MULTIPLE = 16


def logits_buffer(rows: int, cols: int, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """An uninitialised [rows, cols] logits buffer whose row stride is padded to a multiple of 16 elements (what
    ``linear_fold(logits_out=...)`` and the gradient GEMMs require); column slices starting at multiples of 16 stay
    aligned."""
    padded = -(-cols // ROW_STRIDE_MULTIPLE) * ROW_STRIDE_MULTIPLE
    return torch.empty((rows, padded), dtype=dtype, device=device)[:, :cols]


def _check_aligned_rows(name: str, t: torch.Tensor) -> None:
    rows_ok = t.shape[0] <= 1 or t.stride(0) % ROW_STRIDE_MULTIPLE == 0
    if t.numel() and (t.data_ptr() % 16 or not rows_ok):
        raise ValueError(f"{name}: expected aligned rows (a 16-byte aligned data pointer and a row stride divisible by "
                         f"{ROW_STRIDE_MULTIPLE} elements), got row stride {t.stride(0)} at address offset "
                         f"{t.data_ptr() % 16} B; allocate it with fastpref.kernels.fused_gemm.logits_buffer and slice "
                         f"columns at multiples of {ROW_STRIDE_MULTIPLE}")


def _check_vector(name: str, t: Any, n: int, dtypes: tuple[torch.dtype, ...], device: torch.device) -> torch.Tensor:
    t = _tensor(name, t)
    if t.shape != (n,):
        raise ValueError(f"{name}: expected shape [{n}], got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if n > 1 and t.stride(0) != 1:
        raise ValueError(f"{name}: expected a contiguous vector, got stride {t.stride(0)}")
    return t


def _check_transform(vocab_start: Any, logit_scale: Any, softcap: Any, inv_temperature: Any) -> tuple[int, float,
                                                                                                     float, float]:
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start: expected an int >= 0, got {vocab_start!r}")
    for name, v in (("logit_scale", logit_scale), ("inv_temperature", inv_temperature)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite float, got {v!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap: expected None or a finite float > 0, got {softcap!r}")
    return vocab_start, float(logit_scale), 0.0 if softcap is None else float(softcap), float(inv_temperature)


def _compute_dtype(name: str, t: Any) -> torch.dtype:
    t = _tensor(name, t)
    if t.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"{name}: expected a compute dtype (torch.bfloat16, torch.float16 or torch.float32), "
                        f"got {t.dtype}")
    return t.dtype


def _bin(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def linear_fold(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
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
    logits_out: torch.Tensor | None = None,
    config: GemmConfig | None = None,
    num_splits: int | None = None,
) -> None:
    """Fold the logits of one vocabulary slab, ``T(hidden @ weight.T + bias)``, into the running fp32 row
    statistics in place — ``fold_logsumexp(project(hidden, weight, bias), ...)`` of ``kernels/row_kernels.py``
    without the [n, Vs] tile (see the module docstring for the math).

    hidden [n, H] and weight [Vs, H] (columns ``vocab_start ... vocab_start + Vs`` of the vocabulary) in one compute
    dtype (bf16, fp16 or fp32), unit column stride; bias [Vs] (same dtype) or None; targets [n] int64 global ids;
    row_max, row_sumexp, target_logit, logit_sum, entropy_acc, max_before_target [n] fp32 (the last two optional).
    ``logits_out`` [n, Vs] (compute dtype, unit column stride, aligned rows: see ``logits_buffer``) also
    receives the raw ``hidden @ weight.T + bias`` rounded to the compute dtype. ``config`` forces a block config;
    ``num_splits`` forces the number of vocabulary splits (default: planned for the device's SM count,
    ``fold_splits``). Slab after slab, in any order, the statistics end as those of the whole vocabulary.
    """
    dtype = _compute_dtype("hidden", hidden)
    dev = hidden.device
    hidden = _check_matrix("hidden", hidden, (None, None), (dtype,), dev)
    n, h_size = hidden.shape
    weight = _check_matrix("weight", weight, (None, h_size), (dtype,), dev)
    vs = weight.shape[0]
    if bias is not None:
        _check_vector("bias", bias, vs, (dtype,), dev)
    _check_vector("targets", targets, n, (torch.int64,), dev)
    for name, t in (("row_max", row_max), ("row_sumexp", row_sumexp), ("target_logit", target_logit),
                    ("logit_sum", logit_sum)):
        _check_vector(name, t, n, (torch.float32,), dev)
    for name, t in (("entropy_acc", entropy_acc), ("max_before_target", max_before_target)):
        if t is not None:
            _check_vector(name, t, n, (torch.float32,), dev)
    if logits_out is not None:
        _check_matrix("logits_out", logits_out, (n, vs), (dtype,), dev)
        _check_aligned_rows("logits_out", logits_out)
    vocab_start, logit_scale, softcap_, inv_temperature = _check_transform(vocab_start, logit_scale, softcap,
                                                                           inv_temperature)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits: expected None or an int >= 1, got {num_splits!r}")
    if n == 0 or vs == 0:
        return
    kernel, meta, candidates = _select("fold", dtype, config,
                                       ragged_store=logits_out is not None and vs % ROW_STRIDE_MULTIPLE != 0,
                                       arch=device_arch(dev))
    # split boundaries fall on whole blocks of every config the launch may run with
    align = math.lcm(*(c.block_n for c in candidates))
    block_m = candidates[0].block_m
    if num_splits is None:
        splits, split_cols = fold_splits(n, vs, block_m, align, _num_sms(dev))
    else:
        units = -(-vs // align)
        per = -(-units // min(num_splits, units))
        splits, split_cols = -(-units // per), per * align
    f32 = dict(device=dev, dtype=torch.float32)
    parts = torch.empty((3 + (entropy_acc is not None) + (max_before_target is not None), splits, n), **f32)
    part_ent = parts[3] if entropy_acc is not None else None
    part_before = parts[-1] if max_before_target is not None else None

    def grid(m: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(n, m["BLOCK_M"]) * splits,)

    launch(
        kernel, grid,
        hidden, weight, bias, targets, target_logit,
        parts[0], parts[1], parts[2], part_ent, part_before, logits_out,
        hidden.stride(0), weight.stride(0), logits_out.stride(0) if logits_out is not None else 0,
        n, vs, h_size, _bin(n), vocab_start, splits, split_cols,
        logit_scale, softcap_, inv_temperature,
        flops=2 * n * vs * h_size, **meta,
    )
    launch(
        _fold_combine_kernel, (triton.cdiv(n, COMBINE_BLOCK),),
        row_max, row_sumexp, logit_sum, entropy_acc, max_before_target,
        parts[0], parts[1], parts[2], part_ent, part_before,
        n, splits,
        BLOCK=COMBINE_BLOCK, num_warps=4,
    )


def _check_grad_common(logits: Any, targets: Any, row_max: Any, log_sumexp: Any,
                       grad_rows: Any) -> tuple[torch.dtype, int, int]:
    dtype = _compute_dtype("logits", logits)
    dev = logits.device
    _check_matrix("logits", logits, (None, None), (dtype,), dev)
    _check_aligned_rows("logits", logits)
    n, vs = logits.shape
    _check_vector("targets", targets, n, (torch.int64,), dev)
    _check_vector("row_max", row_max, n, (torch.float32,), dev)
    _check_vector("log_sumexp", log_sumexp, n, (torch.float32,), dev)
    _check_vector("grad_rows", grad_rows, n, (torch.float32,), dev)
    return dtype, n, vs


def linear_grad_input(
    logits: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    log_sumexp: torch.Tensor,
    grad_rows: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    *,
    vocab_start: int,
    logit_scale: float,
    softcap: float | None,
    inv_temperature: float,
    accumulate: bool,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """``out (+)= G @ weight`` with ``G = grad_rows·(onehot(targets - vocab_start) - exp(T(logits) - lse))·T'``
    formed from the stored raw logits in the GEMM's prologue (``logits`` is only read), the rows' log-sum-exp given
    in two parts, ``lse = row_max + log_sumexp`` (the max logit and log Σ exp(z - row_max)).

    logits [n, Vs] raw ``h @ W_slab.T + b`` in the compute dtype (unit column stride, aligned rows: see
    ``logits_buffer``); targets [n] int64 global ids; row_max, log_sumexp, grad_rows [n] fp32; weight [Vs, H]
    compute dtype; out [n, H] fp32 (an accumulator across slabs) or the compute dtype, unit column stride.
    ``accumulate=True`` adds out's previous value in the epilogue (fp32 math, one rounding); ``False`` overwrites
    it. G is rounded to the compute dtype before the MMA. Returns ``out``.
    """
    dtype, n, vs = _check_grad_common(logits, targets, row_max, log_sumexp, grad_rows)
    dev = logits.device
    _check_matrix("weight", weight, (vs, None), (dtype,), dev)
    h_size = weight.shape[1]
    _check_matrix("out", out, (n, h_size), (torch.float32, dtype), dev)
    vocab_start, logit_scale, softcap_, inv_temperature = _check_transform(vocab_start, logit_scale, softcap,
                                                                           inv_temperature)
    if not isinstance(accumulate, bool):
        raise TypeError(f"accumulate: expected a bool, got {type(accumulate).__name__}")
    if n == 0 or h_size == 0:
        return out
    kernel, meta, _ = _select("grad_input", dtype, config, restore=("p_out",) if accumulate else (),
                              arch=device_arch(dev))

    def grid(m: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(n, m["BLOCK_M"]) * triton.cdiv(h_size, m["BLOCK_N"]),)

    launch(
        kernel, grid,
        logits, targets, row_max, log_sumexp, grad_rows, weight, out,
        logits.stride(0), weight.stride(0), out.stride(0),
        n, vs, h_size, _bin(n), vocab_start,
        logit_scale, softcap_, inv_temperature,
        ACCUMULATE=accumulate, flops=2 * n * vs * h_size, **meta,
    )
    return out


def linear_grad_weight(
    logits: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    log_sumexp: torch.Tensor,
    grad_rows: torch.Tensor,
    hidden: torch.Tensor,
    out: torch.Tensor,
    d_bias: torch.Tensor | None = None,
    *,
    vocab_start: int,
    logit_scale: float,
    softcap: float | None,
    inv_temperature: float,
    accumulate: bool,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """``out (+)= G.T @ hidden`` and, when given, ``d_bias (+)= G.sum(0)`` (summed in fp32 from the unrounded G),
    G as in ``linear_grad_input``, formed in the prologue from the stored raw logits.

    logits [n, Vs] compute dtype; hidden [n, H] compute dtype; out [Vs, H] and d_bias [Vs] fp32 or the compute
    dtype (unit column stride, contiguous d_bias). ``accumulate`` applies to both. Returns ``out``.
    """
    dtype, n, vs = _check_grad_common(logits, targets, row_max, log_sumexp, grad_rows)
    dev = logits.device
    _check_matrix("hidden", hidden, (n, None), (dtype,), dev)
    h_size = hidden.shape[1]
    _check_matrix("out", out, (vs, h_size), (torch.float32, dtype), dev)
    if d_bias is not None:
        _check_vector("d_bias", d_bias, vs, (torch.float32, dtype), dev)
    vocab_start, logit_scale, softcap_, inv_temperature = _check_transform(vocab_start, logit_scale, softcap,
                                                                           inv_temperature)
    if not isinstance(accumulate, bool):
        raise TypeError(f"accumulate: expected a bool, got {type(accumulate).__name__}")
    if vs == 0:
        return out
    restore = (("p_out", "p_dbias") if d_bias is not None else ("p_out",)) if accumulate else ()
    kernel, meta, _ = _select("grad_weight", dtype, config, restore=restore, arch=device_arch(dev))

    def grid(m: dict[str, Any]) -> tuple[int]:
        # at least one H block, so d_bias is written even when H = 0
        return (triton.cdiv(vs, m["BLOCK_M"]) * max(1, triton.cdiv(h_size, m["BLOCK_N"])),)

    launch(
        kernel, grid,
        logits, targets, row_max, log_sumexp, grad_rows, hidden, out, d_bias,
        logits.stride(0), hidden.stride(0), out.stride(0),
        n, vs, h_size, _bin(n), vocab_start,
        logit_scale, softcap_, inv_temperature,
        ACCUMULATE=accumulate, flops=2 * n * vs * h_size, **meta,
    )
    return out


__all__ = [
    "ARCHS",
    "AUTOTUNE_CONFIGS",
    "AUTOTUNE_ENV",
    "DEFAULT_ARCH",
    "DEFAULT_CONFIGS",
    "RAGGED_STORE_CONFIGS",
    "GemmConfig",
    "autotune_enabled",
    "config_arch",
    "default_config",
    "device_arch",
    "fold_splits",
    "linear_fold",
    "linear_grad_input",
    "linear_grad_weight",
    "logits_buffer",
    "target_arch",
]
