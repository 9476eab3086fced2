"""Ahead-of-time compilation of every kernel specialisation the launchers produce at the benchmark shapes, for
sm_80 (A100) and sm_90 (H100 / H200), with Triton's bundled ptxas — no GPU needed.

The specialisations are recorded from the launch sites of both GEMM paths (``fastpref.testing.launch_sites``:
the ops run on ``meta`` tensors with launch recording on), not hand-listed. The compile runs in a subprocess without
``TRITON_INTERPRET`` (the interpreter replaces the ``@triton.jit`` functions the compiler needs).

Bounds, per compiled kernel:
- it compiles, with no spills (no local memory, no stack);
- every kernel at most 255 registers (the fused GEMMs' fold uses all of them with every feature on:
  ``tests/test_fused_gemm_aot.py`` compiles each launcher flag and autotune config on its own);
- the row kernels use at most 64 registers per thread: they are memory-bound and run 8 warps (256 threads) per
  program, so 64 registers x 256 threads x 4 programs fill the 64K-register file of an SM exactly: at most 64
  keeps at least 4 programs (1024 threads, 50 % occupancy) resident to hide the memory latency;
- shared memory within the SM's per-block limit (sm_80: 163 KiB, sm_90: 227 KiB);
- the fold kernel reduces across the block once per chunk, after its loop (no ``tt.reduce`` inside it);
- no ptxas warning or advisory (C7515, serialised warpgroup MMAs on sm_90, among them);
- the row kernels' SASS instructions per loop iteration within 10 % of ``tests/data/sass_per_iteration.json``
  (``fastpref/testing/sass_table.py``; the fused GEMMs' are checked by ``tests/test_fused_gemm_aot.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import HAS_TRITON

ROOT = Path(__file__).resolve().parent.parent
ROW_KERNEL_REGISTERS = 64
SHARED_LIMIT = {80: 166912, 90: 232448}


def _ptxas() -> Path | None:
    if not HAS_TRITON:
        return None
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.exists() else None


pytestmark = pytest.mark.skipif(_ptxas() is None, reason="needs triton with its bundled ptxas (NVIDIA backend)")


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-m", "fastpref.testing.launch_sites"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


ROW_KERNELS = ("_fold_logsumexp_kernel", "_logit_grad_kernel")
FUSED_KERNELS = ("_linear_fold_kernel", "_fold_combine_kernel", "_linear_grad_input_kernel",
                 "_linear_grad_weight_kernel")


def test_every_launch_compiles_for_sm80_and_sm90(compiled):
    """Both GEMM paths' launch sites: the row kernels of the cublas path, the fused GEMMs of the fused path."""
    names = {e["name"] for e in compiled}
    assert set(ROW_KERNELS) | set(FUSED_KERNELS) <= names, names
    for arch in (80, 90):
        variants = {(e["name"], e["dtypes"][0], tuple(sorted(e["meta"].items()))) for e in compiled
                    if e["arch"] == arch and e["name"] in ROW_KERNELS}
        # bf16 and fp16 tiles x (fold: token statistics x softcap; grad: softcap x entropy term)
        assert len(variants) == 2 * (4 + 4), variants
        fused = {e["name"] for e in compiled if e["arch"] == arch and e["name"] in FUSED_KERNELS}
        assert fused == set(FUSED_KERNELS), fused


def test_no_spills_and_registers_within_bound(compiled):
    for e in compiled:
        assert not e["spills"], e
        if e["name"] in ROW_KERNELS:
            assert e["registers"] <= ROW_KERNEL_REGISTERS, e
        assert e["registers"] <= 255, e


def test_shared_memory_within_the_sm_limit(compiled):
    for e in compiled:
        assert e["shared_bytes"] <= SHARED_LIMIT[e["arch"]], e


def test_fold_kernel_reduces_once_after_its_loop(compiled):
    folds = [e for e in compiled if e["name"] == "_fold_logsumexp_kernel"]
    assert folds and all(e["no_reduce_in_loop"] for e in folds)


def _known_advisory(e: dict, warning: str) -> bool:
    """The one advisory left, known and recorded in bench/NOTES.md: the sm_90 fused fold of fp16 logits that are
    stored for fast mode's gradient (C7514: the epilogue's fp16 rounding, which keeps the fold and the stored logits
    the same softmax, reads the accumulator inside the wgmma pipeline stage; every config tried — 3 or 4 stages, BK
    32 or 64, 4 or 8 warps, BN 64 or 128 — gives it, bf16 does not). Anything else fails."""
    return (e["name"] == "_linear_fold_kernel" and e["arch"] == 90 and e["spec"].split()[1].startswith("float16/")
            and e["meta"].get("STORE_LOGITS") is True and "(C7514)" in warning)


def test_no_ptxas_warnings_or_serialised_wgmma(compiled):
    bad = [f"{e['spec']} sm_{e['arch']}: {w}" for e in compiled for w in e["ptxas_warnings"]
           if not _known_advisory(e, w)]
    assert not bad, "\n".join(bad)
    # C7515 and every other serialisation, bar the known advisory above
    assert not any(e["wgmma_serialized"] and not all(_known_advisory(e, w) for w in e["ptxas_warnings"])
                   for e in compiled)


def test_row_kernel_sass_per_iteration_within_10pc_of_the_table(compiled):
    """FASTPREF_UPDATE_SASS=1 rewrites the table (fastpref/testing/sass_table.py has the command)."""
    from fastpref.testing import sass_table

    now: dict[str, dict[str, list[int]]] = {}
    for e in compiled:
        if e["name"] in ROW_KERNELS:
            now.setdefault(f"sm_{e['arch']}", {})[e["spec"]] = list(e["sass_loops"])
    assert now
    try:
        failure = sass_table.check("row_kernels", compiled[0]["triton"], now)
    except LookupError as e:
        pytest.skip(str(e))
    assert failure is None, failure
