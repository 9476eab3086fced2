"""The kernel launches the ops really make at the benchmark shapes, recorded on ``meta`` tensors, and their
ahead-of-time compilation for sm_80 / sm_90 (``tests/test_kernels_aot.py``), each target's launches recorded with
its own configs (``fused_gemm.target_arch``).

Every pass over the head runs as in training — the forward statistics and the lean backward
(``ops.head_pass``), the fast path with its pair groups and its backward (``ops.fast_pair_loss``), the grouped
reference scoring — with ``fastpref.kernels.launch.record_launches`` on, so each launch is recorded instead of
run: nothing is hand-listed, and no GPU (nor any memory: the tensors are ``meta``) is needed. The layout of the
scored tokens is built on the CPU from the benchmark workload's labels, as the one host sync would.

Run it as ``python -m fastpref.testing.launch_sites`` (without ``TRITON_INTERPRET``: the interpreter replaces the
``@triton.jit`` functions the compiler needs) for a JSON report of every specialisation and its resources.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import asdict

import torch

from .. import losses as L
from ..benchmark.cost_model import fast_groups
from ..benchmark.workload import BENCH_SHAPES, IGNORE_INDEX, SHAPES, Shape
from ..inputs import pair_layout
from ..kernels import fused_gemm
from ..kernels.launch import LaunchRecord, record_launches
from ..ops import HeadPass, LogitTransform, PairProblem, TokenLayout, grouped_sequence_logps
from ..ops import head_pass as passes
from ..ops.fast_pair_loss import fast_forward
from ..ops.gemm_path import key_of
from ..ops.plan import CUDA_TILE_BYTES
from ..ops.tile_ops import EntropyGrad

GEMMS = ("cublas", "fused")


def _meta_layout(shape: Shape, prompt_frac: float = 0.25) -> TokenLayout:
    """The benchmark workload's scored tokens in pair order, with the device tensors moved to ``meta``."""
    labels = torch.zeros(shape.batch, shape.seq_len, dtype=torch.int64)
    labels[:, : int(shape.seq_len * prompt_frac)] = IGNORE_INDEX
    layout = pair_layout(labels, shape.vocab, None, shape.pairs, IGNORE_INDEX)
    meta = {k: getattr(layout, k).to("meta") for k in ("index", "targets", "seq", "offsets")}
    return TokenLayout(host_offsets=layout.host_offsets, num_tokens=layout.num_tokens, **meta)


def record_shape(shape: Shape, dtype: torch.dtype, *, token_metrics: bool, softcap: float | None,
                 gemm: str = "cublas") -> list[LaunchRecord]:
    """Every launch of one training step's passes at ``shape`` (compute dtype ``dtype``) on GEMM path ``gemm``."""
    layout = _meta_layout(shape)
    n = layout.num_scored
    cfg = HeadPass(LogitTransform(softcap=softcap), dtype, "triton", CUDA_TILE_BYTES, token_metrics, token_metrics,
                   gemm=gemm, gemm_key=key_of(torch.device("meta"), dtype, shape.hidden, shape.vocab))
    source = torch.empty(shape.batch * shape.seq_len, shape.hidden, dtype=dtype, device="meta")
    weight = torch.empty(shape.vocab, shape.hidden, dtype=dtype, device="meta")
    groups = fast_groups(shape, elem=torch.empty((), dtype=dtype).element_size())
    config = L.LossConfig.create("sigmoid")
    ref = torch.zeros(2 * shape.pairs, device="meta")

    def pair_loss(chosen: torch.Tensor, rejected: torch.Tensor, pairs: slice) -> torch.Tensor:
        return L.pair_losses(config, chosen, rejected, ref[0::2][pairs], ref[1::2][pairs])[0]

    with record_launches() as records:
        stats = passes.forward_stats(source, layout.index, weight, None, layout.targets, cfg)  # lean / forward
        passes.backward(source, layout.index, weight, None, layout.targets, stats.lse(),
                        torch.empty(n, device="meta"), cfg, need_hidden=True, need_weight=True, need_bias=False)
        if token_metrics:  # GRPO's entropy bonus: the lean backward with the entropy term (the cublas path's)
            passes.backward(source, layout.index, weight, None, layout.targets, stats.lse(),
                            torch.empty(n, device="meta"), cfg, need_hidden=True, need_weight=True, need_bias=False,
                            entropy=EntropyGrad(torch.empty(n, device="meta"), torch.empty(n, device="meta")))
        grouped_sequence_logps(source, weight, None, layout, groups, cfg)  # the reference of a fast step
        _, _, pending = fast_forward(source, weight, None, PairProblem(layout, groups, pair_loss, cfg),
                                      (True, True, False))
        pending.finish(torch.ones((), device="meta"))
    return records


def benchmark_launches(shapes: Iterable[str] = BENCH_SHAPES,
                       dtypes: Iterable[torch.dtype] = (torch.bfloat16, torch.float16), *,
                       arch: int = fused_gemm.DEFAULT_ARCH) -> list[LaunchRecord]:
    """The distinct specialisations (``LaunchRecord.key``) launched at the benchmark shapes on both GEMM paths for
    target ``sm_<arch>`` (the fused GEMMs' configs depend on it): bf16 (the benchmark) and fp16, with and without the
    token statistics of the trainers' metrics, with and without a softcap (Gemma's heads)."""
    with fused_gemm.target_arch(arch):
        return _benchmark_launches(shapes, dtypes)


def _benchmark_launches(shapes: Iterable[str], dtypes: Iterable[torch.dtype]) -> list[LaunchRecord]:
    unique: dict[tuple, LaunchRecord] = {}
    for name in shapes:
        for dtype in dtypes:
            for token_metrics in (False, True):
                for softcap in (None, 30.0):
                    for gemm in GEMMS:
                        for record in record_shape(SHAPES[name], dtype, token_metrics=token_metrics,
                                                   softcap=softcap, gemm=gemm):
                            unique.setdefault(record.key(), record)
    return list(unique.values())


def main(argv: list[str] | None = None) -> int:
    from ..kernels.aot import compile_launch

    p = argparse.ArgumentParser(prog="python -m fastpref.testing.launch_sites", description=__doc__)
    p.add_argument("--shapes", nargs="+", default=list(BENCH_SHAPES))
    p.add_argument("--archs", nargs="+", type=int, default=[80, 90])
    args = p.parse_args(argv)
    import triton

    report = []
    for arch in args.archs:
        for record in benchmark_launches(args.shapes, arch=arch):
            compiled = compile_launch(record, arch)
            entry = asdict(compiled)
            entry["spills"] = compiled.spills
            entry["no_reduce_in_loop"] = compiled.no_reduce_in_loop
            entry["ptxas_warnings"] = compiled.ptxas_warnings
            entry["wgmma_serialized"] = compiled.wgmma_serialized
            entry["meta"] = {k: v for k, v in record.kwargs}
            entry["dtypes"] = [str(a.dtype).replace("torch.", "") for a in record.args if hasattr(a, "dtype")]
            entry["spec"] = " ".join([compiled.name, "/".join(sorted(set(entry["dtypes"]))),
                                      *(f"{k}={v}" for k, v in sorted(entry["meta"].items()))])
            entry["triton"] = triton.__version__
            del entry["ttir"], entry["ptxas_log"]
            report.append(entry)
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
