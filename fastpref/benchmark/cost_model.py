"""The byte-and-FLOP model of every path (``bench/NOTES.md``): matmul FLOPs at the GPU's measured bf16 rate plus
the exposed HBM bytes of the memory-bound kernels between the GEMMs, and the peak memory above the inputs.

The fused paths (``*-fused``: ``kernels/fused_gemm.py``) have no exposed pass over the logits; what they pay
instead is Triton's GEMM rate against cuBLAS's (``TRITON_GEMM_EFFICIENCY``, an assumption until a GPU measures
it), the fold's epilogue (one program per SM: not overlapped) and the gradient GEMMs' prologue, which recomputes
``exp`` for every logit once per H block: hidden under the MMAs in ``ms`` (the design point: ~0.7 of the MMA
time per K step), serial in ``ms_serial_prologue`` (the bound if Triton does not overlap them)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..ops.plan import CUDA_TILE_BYTES
from .workload import BENCH_SHAPES, SHAPES, Shape

H100_BF16_FLOPS = 790e12  # the H100's measured bf16 matmul rate (docs/benchmarks.md)
H100_HBM_BYTES = 3.35e12  # H100 SXM HBM3 bandwidth
H100_FP32_FLOPS = 67e12  # H100 SXM dense FP32 without TF32 (torch's default for fp32 matmuls): Liger's GRPO gradients
# Assumptions for the fused paths, to be replaced by the GPU suite's measurements (bench/NOTES.md):
TRITON_GEMM_EFFICIENCY = 0.85  # Triton's non-persistent tl.dot GEMM against cuBLAS at these shapes
H100_ELEMENTWISE_RATE = 2.2e12  # prologue/epilogue elements per second: one exp (MUFU, 16/clk/SM) + ~6 FP32 ops
FUSED_PATHS = ("fastpref-fast-fused", "fastpref-lean-fused", "fastpref-logps-fused")
COST_PATHS = ("fastpref-fast", "fastpref-lean", "fastpref-logps", *FUSED_PATHS, "reference", "trl")


@dataclass(frozen=True)
class CostEstimate:
    """Byte-and-FLOP model of one path at one shape (bf16, CUDA).

    ``flops``: matmul FLOPs. ``exposed_bytes``: HBM traffic of the memory-bound kernels that run between the
    GEMMs (row kernels, casts, fills, fp32 accumulators outside a GEMM epilogue) and so add to the GEMM time;
    GEMM operand and epilogue traffic is counted as hidden under the GEMMs' compute. ``logit_passes``: how many
    times the logits (or their gradient) cross HBM, GEMM writes/reads included. ``peak_bytes``: memory above
    the inputs. ``ms``: flops / 790 TFLOP/s + exposed_bytes / 3.35 TB/s. Fused paths: ``triton_flops`` of the
    flops run in Triton GEMMs at ``TRITON_GEMM_EFFICIENCY`` of that rate, ``epilogue_elems`` (serial) and
    ``prologue_elems`` (hidden in ``ms``, serial in ``ms_serial_prologue``) at ``H100_ELEMENTWISE_RATE``.
    """

    path: str
    flops: float
    exposed_bytes: float
    logit_passes: str
    peak_bytes: float
    note: str = ""
    triton_flops: float = 0.0
    epilogue_elems: float = 0.0
    prologue_elems: float = 0.0
    fp32_flops: float = 0.0  # of ``flops``, those run as fp32 GEMMs (``H100_FP32_FLOPS``)

    @property
    def ms(self) -> float:
        gemm_s = ((self.flops - self.triton_flops - self.fp32_flops) / H100_BF16_FLOPS
                  + self.triton_flops / (H100_BF16_FLOPS * TRITON_GEMM_EFFICIENCY)
                  + self.fp32_flops / H100_FP32_FLOPS)
        return (gemm_s + self.epilogue_elems / H100_ELEMENTWISE_RATE + self.exposed_bytes / H100_HBM_BYTES) * 1e3

    @property
    def ms_serial_prologue(self) -> float:
        return self.ms + self.prologue_elems / H100_ELEMENTWISE_RATE * 1e3


def fast_groups(shape: Shape, *, prompt_frac: float = 0.25, memory_budget: int = 2 << 30,
                elem: int = 2) -> list[tuple[int, int]]:
    """The pair groups the fast path plans for the benchmark workload at ``shape`` (every sequence scores its
    last ``1 - prompt_frac`` tokens), with the code's own planner."""
    from ..ops.plan import plan_pair_groups, preferred_group_rows

    per_seq = shape.seq_len - int(shape.seq_len * prompt_frac)
    offsets = [per_seq * s for s in range(2 * shape.pairs + 1)]
    groups = plan_pair_groups(offsets, shape.pairs, memory_budget // (shape.vocab * elem),
                              preferred_group_rows(shape.hidden, elem, elem))
    if groups is None:
        raise ValueError(f"memory_budget: one pair of {shape.name} does not fit {memory_budget} bytes of logits")
    return groups


def cost_model(shape: Shape, path: str, *, prompt_frac: float = 0.25, tile_bytes: int = CUDA_TILE_BYTES,
               memory_budget: int = 2 << 30) -> CostEstimate:
    """The model behind ``bench/NOTES.md`` for ``path`` in ``COST_PATHS`` at ``shape`` (bf16 inputs and weight),
    built from the plans the code makes (``fast_groups``, ``plan_tiles``, the fused kernels' configs)."""
    if path in FUSED_PATHS:
        return _fused_cost(shape, path, prompt_frac=prompt_frac, tile_bytes=tile_bytes, memory_budget=memory_budget)
    from ..ops.head_pass import MAX_PARTIAL_SUMS
    from ..ops.plan import MAX_GROUPS_DIRECT_DW, plan_tiles

    e = 2
    n, N, H, V = shape.scored_tokens(prompt_frac), shape.batch * shape.seq_len, shape.hidden, shape.vocab
    nV, NV, VH, nH, NH = n * V, N * V, V * H, n * H, N * H
    unit = n * H * V
    # Around every fastpref path: gather the scored rows of hidden and ref_hidden (r+w), scatter dH into dhidden.
    rows_io = 2 * 2 * e * nH
    if path == "fastpref-logps":
        plan = plan_tiles(n, V, e, tile_bytes)
        return CostEstimate(path, 2 * unit, e * nV + 2 * e * nH, "GEMM write, fold read (2, 1 exposed)",
                            plan.bytes(e) + e * nH, f"tile {plan.rows}x{plan.cols}")
    if path == "fastpref-fast":
        groups = fast_groups(shape, prompt_frac=prompt_frac, memory_budget=memory_budget, elem=e)
        per_seq = shape.seq_len - int(shape.seq_len * prompt_frac)
        group_rows = [2 * per_seq * (p1 - p0) for p0, p1 in groups]
        buffer = max(group_rows) * V * e
        last_rows = group_rows[-1]
        exposed = (e * nV  # fold reads each group's logits
                   + 2 * e * nV  # grad kernel: read + write in place
                   + e * nV  # reference forward (same groups): fold read
                   + e * NH  # zero-filled dhidden
                   + 2 * e * nH  # each group's dH rows copied into dhidden
                   + 2 * e * NH  # backward: dhidden scaled by the upstream gradient (r + w)
                   + 2 * e * last_rows * H  # backward: the last group's rows scaled (s·h) for its dW GEMM
                   + rows_io)
        fp32_dw = len(groups) > MAX_GROUPS_DIRECT_DW
        if len(groups) > 1:  # backward: dW of the earlier groups scaled in place (r + w), in fp32 beyond the cap
            exposed += 2 * (4 if fp32_dw else e) * VH
        if fp32_dw:
            exposed += (4 + e) * VH  # the fp32 accumulator cast into dW
        dw_bytes = (4 if fp32_dw else e) * VH
        # forward: the kept buffer + dW of the earlier groups + dhidden + one group's rows; backward: the buffer
        # (kept for the last dW GEMM) + dW + dhidden + the last rows and their scaled copy
        forward_peak = buffer + (dw_bytes if len(groups) > 1 else 0) + e * NH + e * max(group_rows) * H
        backward_peak = buffer + dw_bytes + (e * VH if fp32_dw else 0) + e * NH + 2 * e * last_rows * H
        return CostEstimate(path, 8 * unit, exposed,
                            "policy: GEMM write, fold, grad r+w, dH GEMM, dW GEMM (6, 3 exposed); reference: GEMM "
                            "write, fold (2, 1 exposed)", max(forward_peak, backward_peak),
                            f"{len(groups)} pair group(s), {buffer / 2**30:.2f} GiB kept logits")
    if path == "fastpref-lean":
        plan = plan_tiles(n, V, e, tile_bytes)
        slabs, row_chunks = -(-V // plan.cols), -(-n // plan.rows)
        exposed = (e * nV + e * nV  # forward fold: policy and reference
                   + 2 * e * nV  # backward grad kernel r+w
                   + rows_io + e * NH  # gathers, zero-filled dhidden
                   + (slabs - 1) * 8 * nH  # fp32 dH accumulator: read-modify-write by every slab after the first
                   + (4 + e) * nH)  # the accumulator cast into dhidden's rows
        dw_slab = 4 * plan.cols * H if row_chunks > MAX_PARTIAL_SUMS else 0
        if row_chunks > 1:
            exposed += (slabs - 1) * 2 * e * nH  # rows re-gathered per slab
        if row_chunks > MAX_PARTIAL_SUMS:
            exposed += (4 + e) * VH  # the fp32 slabs copied into dW
        # backward: tile + dW + dhidden + the fp32 dH accumulator + an fp32 dW slab (+ the rows of one chunk)
        peak = plan.bytes(e) + e * VH + e * NH + 4 * nH + dw_slab + e * plan.rows * H
        return CostEstimate(path, 10 * unit, exposed,
                            "forward: GEMM write, fold; backward: recompute write, grad r+w, dH GEMM, dW GEMM; "
                            "reference: GEMM write, fold (9)",
                            peak, f"tile {plan.rows}x{plan.cols}: {slabs} slab(s) x {row_chunks} row chunk(s)")
    if path == "reference":
        # forward: logits (GEMM), .float() r2 w4, log_softmax r4 r4 w4 (two passes), gather; backward: zeros +
        # scatter 4, log_softmax_backward r4 r4 w4, .to(bf16) r4 w2, two GEMMs read 2; reference forward again.
        fwd = (2 + 4) + (4 + 4 + 4)
        bwd = 4 + (4 + 4 + 4) + (4 + 2)
        exposed = (fwd + bwd + fwd) * NV + e * VH
        peak = 12 * NV + e * VH + e * NH
        return CostEstimate(path, 8 * N * H * V, exposed, "about 24 (fp32 copies of every position's logits)",
                            peak, "all positions, prompt included")
    if path == "trl":
        chunk = 32768
        # (the fp32 dW read-modify-write of later token chunks is in the addmm epilogue: not exposed)
        exposed = (e * nV + 2 * e * nV + e * nV  # fold, backward kernel r+w, reference fold
                   + 4 * VH + (4 + e) * VH  # fp32 dW zeros, final .to(bf16)
                   + 4 * nH + (4 + e) * nH + rows_io + e * NH)
        peak = 4096 * chunk * e + 4 * VH + e * VH + 4 * nH + e * nH + e * NH + 2 * e * nH
        return CostEstimate(path, 10 * unit, exposed,
                            "forward: GEMM write, fold; backward: recompute write, kernel r+w, 2 GEMM reads; "
                            "reference: GEMM write, fold (9)", peak, "fp32 dW and dH accumulators")
    raise ValueError(f"path: expected one of {list(COST_PATHS)}, got {path!r}")


def _fused_cost(shape: Shape, path: str, *, prompt_frac: float, tile_bytes: int,
                memory_budget: int) -> CostEstimate:
    """A fused path from its cublas twin: the same plans (groups, tiles, accumulators), minus the exposed passes
    over the logits, plus the fold's split partials; the GEMMs that moved to Triton, their epilogue/prologue
    elements (``CostEstimate``)."""
    from ..kernels.fused_gemm import DEFAULT_NUM_SMS, default_config, fold_splits

    base = cost_model(shape, path.removesuffix("-fused"), prompt_frac=prompt_frac, tile_bytes=tile_bytes,
                      memory_budget=memory_budget)
    e = 2
    n, H, V = shape.scored_tokens(prompt_frac), shape.hidden, shape.vocab
    nV, unit = n * V, n * H * V
    fold = default_config("fold", torch.bfloat16)
    grad_h_blocks = -(-H // default_config("grad_input", torch.bfloat16).block_n)
    splits, _ = fold_splits(n, V, fold.block_m, 16, DEFAULT_NUM_SMS)
    partials = 2 * 4 * 3 * splits * n  # (max, sum-exp, logit sum) per split: written, read by the combine
    if path == "fastpref-logps-fused":
        return CostEstimate(path, base.flops, base.exposed_bytes - e * nV + partials,
                            "none: the fold is the GEMM's epilogue (0)", e * n * H + partials / 2,
                            f"{splits} vocabulary splits", triton_flops=2 * unit, epilogue_elems=nV)
    if path == "fastpref-fast-fused":
        # policy fold (the epilogue stores the kept logits), two prologue GEMMs; reference fold, nothing stored
        return CostEstimate(path, base.flops, base.exposed_bytes - 4 * e * nV + 2 * partials,
                            "policy: fold GEMM writes, dH and dW GEMMs read (3, 0 exposed); reference: none (0)",
                            base.peak_bytes + partials / 2, base.note, triton_flops=base.flops,
                            epilogue_elems=2 * nV, prologue_elems=2 * nV * grad_h_blocks)
    # lean: forward and reference folds in the epilogue; backward recompute on cuBLAS (writes the tile), the
    # gradient formed in the two Triton GEMMs' prologue (no grad pass)
    return CostEstimate(path, base.flops, base.exposed_bytes - 4 * e * nV + 2 * partials,
                        "forward: none; backward: recompute write, dH and dW GEMM reads; reference: none (3, 0 "
                        "exposed)", base.peak_bytes, base.note, triton_flops=base.flops - 2 * unit,
                        epilogue_elems=2 * nV, prologue_elems=2 * nV * grad_h_blocks)


def cost_table(shapes: Iterable[Shape] | None = None) -> str:
    """The model for every benchmark shape and path, as the markdown table of ``bench/NOTES.md``; predicted ms of
    a fused path as "prologue hidden (prologue serial)"."""
    from ..ops.backend import triton_available

    shapes = list(shapes) if shapes is not None else [SHAPES[n] for n in BENCH_SHAPES]
    # the fused paths' model reads the kernels' block configs (kernels/fused_gemm.py imports triton)
    paths = [p for p in COST_PATHS if triton_available() or p not in FUSED_PATHS]
    lines = ["| shape | path | matmul TFLOP | exposed GB | predicted H100 ms | x floor (8nHV) | peak GiB | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for shape in shapes:
        floor_ms = 8 * shape.scored_tokens() * shape.hidden * shape.vocab / H100_BF16_FLOPS * 1e3
        for path in paths:
            c = cost_model(shape, path)
            forward_only = path.startswith("fastpref-logps")
            ratio = c.ms / floor_ms if not forward_only else c.ms / (floor_ms / 4)
            ms = f"{c.ms:.1f}" + (f" ({c.ms_serial_prologue:.1f})" if c.prologue_elems else "")
            lines.append(f"| {shape.name} | {path} | {c.flops / 1e12:.1f} | {c.exposed_bytes / 1e9:.1f} | "
                         f"{ms} | {ratio:.2f}{' (of 2nHV)' if forward_only else ''} | "
                         f"{c.peak_bytes / 2**30:.2f} | {c.note} |")
    return "\n".join(lines)


# --- the other trainers' heads (``fastpref bench --task``): the DPO model's passes, less what a task does not run --

TASK_COST_PATHS: dict[str, tuple[str, ...]] = {
    "kto": ("fastpref-fast", "fastpref-lean", "reference", "trl", "liger"),
    "sft": ("fastpref-fast", "fastpref-lean", "reference", "trl", "liger"),
    "grpo": ("fastpref-fast", "fastpref-lean", "reference", "trl", "liger"),
}


def task_cost(shape: Shape, task: str, path: str, *, prompt_frac: float = 0.25) -> CostEstimate:
    """The model of ``path`` running ``task``'s head at ``shape`` (bf16), as ``bench/NOTES.md`` states it.

    fastpref, TRL and the materialised reference run the DPO model's passes (``cost_model``): KTO exactly those
    (its fast mode is the same op, consecutive sequences as pairs; policy and reference), SFT and GRPO without the
    reference forward (2·n·H·V and its fold read; the reference's: 2·N·H·V and its 18 bytes per logit). Liger
    0.8.5 on every position (N = B·T), from its code: KTO and SFT form the gradients in the forward (6·N·H·V), KTO
    one sequence per chunk (its bf16 dW read-modified-written once per sequence) with the reference's chunk forward,
    GRPO recomputes 4096-wide vocabulary chunks in its backward (8·N·H·V, the dH and dW GEMMs in fp32:
    ``CostEstimate.fp32_flops``; the weight cast to fp32 and the fp32 dW read-modified-written once per
    sequence)."""
    if path not in TASK_COST_PATHS.get(task, ()):
        raise ValueError(f"path: expected one of {list(TASK_COST_PATHS.get(task, ()))} for task {task!r}, got "
                         f"{path!r}")
    e = 2
    n, N, H, V = shape.scored_tokens(prompt_frac), shape.batch * shape.seq_len, shape.hidden, shape.vocab
    B = shape.batch
    nV, NV, VH = n * V, N * V, V * H
    if path == "liger":
        if task == "grpo":
            fp32_flops = 4 * N * H * V
            exposed = 44 * NV + B * 18 * VH  # fwd fp32 chunk + lse ~14 B/logit, bwd ~30; W→fp32 and fp32 dW per seq
            return CostEstimate(path, 8 * N * H * V, exposed, "forward: chunk write, fp32 copy, lse; backward: "
                                "recompute, fp32 exp and grad, two fp32 GEMMs (about 44 B per logit)",
                                4 * VH + 4 * N * H + 4 * 4096 * shape.seq_len * 3,
                                f"dH and dW GEMMs in fp32 ({fp32_flops / 1e12:.1f} TFLOP at 67 TFLOP/s)",
                                fp32_flops=fp32_flops)
        ref = task == "kto"
        exposed = (3 + ref) * e * NV + (B * 3 * e * VH if task == "kto" else 0)
        chunk = shape.seq_len if task == "kto" else min(N, 4096)
        return CostEstimate(path, (6 + 2 * ref) * N * H * V, exposed,
                            "compiled chunk: GEMM write, lse read, grad r+w; reference: GEMM write, read",
                            e * VH + e * N * H + 4 * chunk * V * 2,
                            "one sequence per chunk, bf16 dW r+w per chunk" if task == "kto" else "Triton CE kernel")
    base = cost_model(shape, path, prompt_frac=prompt_frac)
    if task == "kto":
        return base
    if path == "reference":
        return CostEstimate(path, base.flops - 2 * N * H * V, base.exposed_bytes - 18 * NV, base.logit_passes,
                            base.peak_bytes, base.note + "; no reference forward")
    note = ("row chunks over the whole vocabulary in one bounded buffer (trl_head), passes as the pair groups'"
            if path == "fastpref-fast" else base.note)
    return CostEstimate(path, base.flops - 2 * n * H * V, base.exposed_bytes - e * nV, base.logit_passes,
                        base.peak_bytes, note + "; no reference forward")


def task_cost_table(task: str, shapes: Iterable[Shape] | None = None) -> str:
    """``task_cost`` for every benchmark shape and path, with the predicted ratio to TRL's time (model vs model)."""
    shapes = list(shapes) if shapes is not None else [SHAPES[n] for n in BENCH_SHAPES]
    lines = [f"| shape | {task} path | matmul TFLOP | exposed GB | predicted H100 ms | x TRL | notes |",
             "|---|---|---|---|---|---|---|"]
    for shape in shapes:
        trl = task_cost(shape, task, "trl").ms
        for path in TASK_COST_PATHS[task]:
            c = task_cost(shape, task, path)
            lines.append(f"| {shape.name} | {path} | {c.flops / 1e12:.1f} | {c.exposed_bytes / 1e9:.1f} | {c.ms:.1f} | "
                         f"{c.ms / trl:.2f} | {c.note} |")
    return "\n".join(lines)


__all__ = ["COST_PATHS", "FUSED_PATHS", "H100_BF16_FLOPS", "H100_ELEMENTWISE_RATE", "H100_FP32_FLOPS", "H100_HBM_BYTES",
           "TASK_COST_PATHS", "TRITON_GEMM_EFFICIENCY", "CostEstimate", "cost_model", "cost_table", "fast_groups",
           "task_cost", "task_cost_table"]
