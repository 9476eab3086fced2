"""Ahead-of-time compile of the fused-GEMM kernels (kernels/fused_gemm.py) for sm_80 and sm_90, without a GPU.

Records the launches the launchers really make on ``meta`` tensors at the benchmark shapes (n = 6144 / 24576 / 12288
scored rows, H = 4096 / 3584 / 2048, slab widths 10752 / 8192 / 32000 / 128256; bf16, fp16, fp32; with and without
softcap, entropy, top-1, bias, stored logits, d_bias, fp32 / compute-dtype outputs, accumulation; plus an odd row
count and an odd slab width for the masked K loops), plus every opt-in autotune candidate, dedupes them by
``LaunchRecord.key()`` (integer sizes enter a binary only through Triton's divisibility specialisation, so the shapes
collapse) and compiles each with ``kernels/aot.py`` for the target it was recorded for (the launchers pick configs per
target: ``fused_gemm.target_arch``): it must compile, with no spills, <= 255 registers, shared memory within the SM's
per-block limit and, on sm_90, its warpgroup MMAs not serialised by ptxas (C7515); and the SASS instructions per
iteration of each loop must stay within 10 % of the committed table (``fastpref/testing/sass_table.py``; its
docstring has the command that regenerates it).

Recording needs the real ``@triton.jit`` functions, not the interpreter's stand-ins (tests/conftest.py sets
TRITON_INTERPRET=1 on CPU-only machines), so the recording and compiling run in a child process without it:
``python -m tests.test_fused_gemm_aot`` (``--table`` prints the resource table). Compiled binaries are cached by
Triton under ~/.triton, so a rerun takes seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Shared memory per block, opt-in maximum: A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
MAX_REGISTERS = 255
ARCHS = (80, 90)
# (name, n, H, slab widths): llama3-8b-1k (lean slab 10752, fast mode's whole vocabulary), llama3-8b-4k and
# qwen2.5-7b-2k (8192-column lean slabs), small-1k (V = 32000 in one slab)
SHAPES = (("llama3-8b-1k", 6144, 4096, (10752, 128256)), ("llama3-8b-4k", 24576, 4096, (8192, 128256)),
          ("qwen2.5-7b-2k", 12288, 3584, (8192,)), ("small-1k", 12288, 2048, (32000,)))
# any scored-row count / vocabulary (bf16, fp32): EVEN_K off in grad_weight (K = rows) and grad_input (K = slab
# columns), and the fold's ragged-store config for stored logits of a slab width that is no multiple of 16
ODD_SHAPE = ("odd", 6143, 4096, (32001,))
FOLD_FLAGS = ("softcap", "bias", "entropy", "top1", "logits_out")
GRAD_FLAGS = ("softcap", "out_fp32", "accumulate", "d_bias")


def _ptxas_path() -> Path | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "backends" / "nvidia" / "bin" / "ptxas"


_PTXAS = _ptxas_path()
pytestmark = pytest.mark.skipif(_PTXAS is None or not _PTXAS.exists(),
                                reason=f"Triton's bundled ptxas is missing ({_PTXAS}): nothing to compile with")


def _flag_sets(names: tuple[str, ...], *, singles: bool) -> list[dict[str, bool]]:
    """All off, all on, and (``singles``) each flag alone."""
    sets = [dict.fromkeys(names, False), dict.fromkeys(names, True)]
    if singles:
        sets += [{n: n == on for n in names} for on in names]
    return sets


def _launch_all(fg, dtype, n: int, h_size: int, vs: int, fold_flags, grad_flags, config=None) -> None:
    """One launcher call per flag set on meta tensors of the given shape (recorded by the caller)."""
    import torch

    m = dict(device="meta")
    vec = lambda dt=torch.float32, size=n: torch.empty(size, dtype=dt, **m)
    hidden, weight = torch.empty(n, h_size, dtype=dtype, **m), torch.empty(vs, h_size, dtype=dtype, **m)
    logits = fg.logits_buffer(n, vs, dtype, "meta")  # rows padded to 16 bytes, as the launchers require
    for f in fold_flags:
        fg.linear_fold(hidden, weight, vec(dtype, vs) if f["bias"] else None, vec(torch.int64), vec(), vec(), vec(),
                       vec(), vec() if f["entropy"] else None, vec() if f["top1"] else None, vocab_start=vs,
                       logit_scale=1.0, softcap=30.0 if f["softcap"] else None, inv_temperature=1.0,
                       logits_out=logits if f["logits_out"] else None, config=config)
    for f in grad_flags:
        out_dtype = torch.float32 if f["out_fp32"] else dtype
        common = dict(vocab_start=vs, logit_scale=1.0, softcap=30.0 if f["softcap"] else None, inv_temperature=1.0,
                      accumulate=f["accumulate"], config=config)
        rows = (logits, vec(torch.int64), vec(), vec(), vec())
        fg.linear_grad_input(*rows, weight, torch.empty(n, h_size, dtype=out_dtype, **m), **common)
        fg.linear_grad_weight(*rows, hidden, torch.empty(vs, h_size, dtype=out_dtype, **m),
                              vec(out_dtype, vs) if f["d_bias"] else None, **common)


def record_all() -> tuple[list[tuple[object, int]], dict[str, int]]:
    """(the deduplicated (launch record, target arch) pairs, counts of what was recorded); runs without
    TRITON_INTERPRET. Each target's launches are recorded with its configs."""
    from fastpref.kernels import fused_gemm as fg

    unique: dict = {}
    counts: dict[str, int] = {}
    for arch in ARCHS:
        with fg.target_arch(arch):
            records, counts = _record_target(arch)
        for r in records:
            unique.setdefault((arch, r.key()), (r, arch))
    return list(unique.values()), counts


def _record_target(arch: int) -> tuple[list, dict[str, int]]:
    import torch
    from fastpref.kernels import fused_gemm as fg
    from fastpref.kernels.launch import jit_function, record_launches

    counts: dict[str, int] = {}
    os.environ.pop(fg.AUTOTUNE_ENV, None)
    with record_launches() as records:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            singles = dtype == torch.bfloat16
            fold, grad = _flag_sets(FOLD_FLAGS, singles=singles), _flag_sets(GRAD_FLAGS, singles=singles)
            for _, n, h_size, widths in SHAPES:
                for vs in widths:
                    _launch_all(fg, dtype, n, h_size, vs, fold, grad)
        _, n, h_size, (vs,) = ODD_SHAPE
        for dtype in (torch.bfloat16, torch.float32):
            _launch_all(fg, dtype, n, h_size, vs, _flag_sets(FOLD_FLAGS, singles=False)[1:],
                        _flag_sets(GRAD_FLAGS, singles=False)[1:])
    counts["default"] = len(records)
    # without the environment variable, every GEMM launch is its fixed default config (one record each)
    kinds = {"_linear_fold_kernel": "fold", "_linear_grad_input_kernel": "grad_input",
             "_linear_grad_weight_kernel": "grad_weight"}
    for r in records:
        if r.name in kinds:
            args = dict(zip(jit_function(r.kernel).arg_names, r.args))
            kw = dict(r.kwargs)
            dtype = args["p_hidden" if r.name != "_linear_grad_input_kernel" else "p_weight"].dtype
            ragged = kw.get("STORE_LOGITS", False) and args["n_cols"] % 16 != 0
            want = fg.default_config(kinds[r.name], dtype, ragged_store=ragged, arch=arch)
            assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"], kw["num_warps"], kw["num_stages"]) == (
                *_blocks(want), want.group_m, want.num_warps, want.num_stages), r.name
    os.environ[fg.AUTOTUNE_ENV] = "1"
    try:
        with record_launches() as tuned:
            for dtype in (torch.bfloat16, torch.float32):  # fp16 shares bf16's candidate list
                _, n, h_size, widths = SHAPES[0]
                _launch_all(fg, dtype, n, h_size, widths[0], _flag_sets(FOLD_FLAGS, singles=False)[1:],
                            _flag_sets(GRAD_FLAGS, singles=False)[1:])
    finally:
        os.environ.pop(fg.AUTOTUNE_ENV, None)
    counts["autotune"] = len(tuned)
    return [*records, *tuned], counts


def _blocks(c) -> tuple[int, int, int]:
    return c.block_m, c.block_n, c.block_k


_RECORDS: list = []


def _compile(index: int) -> dict:
    from fastpref.kernels.aot import compile_launch

    r, arch = _RECORDS[index]
    c = compile_launch(r, arch)
    kw = dict(r.kwargs)
    dtypes = sorted({str(a.dtype).replace("torch.", "") for a in r.args if hasattr(a, "dtype")})
    flags = sorted(k for k, v in kw.items() if k.isupper() and v is True)
    blocks = [kw.get("BLOCK_M"), kw.get("BLOCK_N"), kw.get("BLOCK_K")]
    spec = " ".join([c.name, "/".join(dtypes), "x".join(map(str, blocks)) if blocks[0] else f"block{kw.get('BLOCK')}",
                     f"w{c.num_warps}s{kw.get('num_stages')}g{kw.get('GROUP_M')}", "+".join(flags) or "-"])
    return dict(name=c.name, arch=arch, registers=c.registers, spills=c.spills, local=c.local_bytes,
                stack=c.stack_bytes, shared=c.shared_bytes, num_warps=c.num_warps, num_stages=kw.get("num_stages"),
                blocks=blocks, group_m=kw.get("GROUP_M"), dtypes=dtypes, flags=flags, spec=spec,
                loops=list(c.sass_loops), ptxas_warnings=c.ptxas_warnings, wgmma_serialized=c.wgmma_serialized)


def main(argv: list[str]) -> int:
    """Worker: record each target's launches, dedupe, compile (2 processes), print one JSON line each."""
    import concurrent.futures
    import multiprocessing

    import triton

    records, counts = record_all()
    _RECORDS[:] = records
    print(json.dumps({"counts": counts, "unique": len(records), "triton": triton.__version__}), flush=True)
    workers = max(1, min(2, os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_compile, range(len(records))))
    for res in results:
        print(json.dumps(res), flush=True)
    if "--table" in argv:
        print("| kernel | dtypes | flags | blocks | warps | stages | sm | regs | spill B | smem B | wgmma "
              "| SASS/iter |", file=sys.stderr)
        for res in sorted(results, key=lambda r: (r["name"], r["dtypes"], r["blocks"], r["flags"], r["arch"])):
            print(f"| {res['name']} | {'/'.join(res['dtypes'])} | {' '.join(res['flags'])} | "
                  f"{'x'.join(map(str, res['blocks']))} | {res['num_warps']} | {res['num_stages']} | {res['arch']} | "
                  f"{res['registers']} | {res['local'] + res['stack']} | {res['shared']} | "
                  f"{'serialised' if res['wgmma_serialized'] else '-'} | {'/'.join(map(str, res['loops']))} |",
                  file=sys.stderr)
    return 0


@pytest.fixture(scope="module")
def compiled() -> tuple[dict, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", "tests.test_fused_gemm_aot"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"AOT worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return lines[0], lines[1:]


def test_every_specialisation_compiles_without_spills(compiled):
    _, results = compiled
    assert results
    bad = [r for r in results if r["spills"] or r["registers"] > MAX_REGISTERS or r["shared"] > SHARED_LIMIT[r["arch"]]]
    assert not bad, "over the limits:\n" + "\n".join(json.dumps(r) for r in bad)


def test_no_serialised_warpgroup_mma(compiled):
    """ptxas's C7515 ("wgmma.mma_async instructions are serialized"): each warpgroup MMA waits for the previous
    one, so nothing overlaps the MMAs; the sm_90 configs must avoid it (BK = 16 for the gradient GEMMs)."""
    _, results = compiled
    bad = [f"{r['spec']} sm_{r['arch']}: {r['ptxas_warnings']}" for r in results if r["wgmma_serialized"]]
    assert not bad, "serialised wgmma:\n" + "\n".join(bad)


def test_no_ptxas_warnings(compiled):
    _, results = compiled
    bad = [f"{r['spec']} sm_{r['arch']}: {w}" for r in results for w in r["ptxas_warnings"]]
    assert not bad, "\n".join(bad)


def test_sass_per_iteration_within_10pc_of_the_table(compiled):
    """Static SASS instructions per iteration of each loop, per specialisation and target, against
    tests/data/sass_per_iteration.json (FASTPREF_UPDATE_SASS=1 rewrites it: fastpref/testing/sass_table.py)."""
    from fastpref.testing import sass_table

    meta, results = compiled
    now: dict[str, dict[str, list[int]]] = {}
    for r in results:
        now.setdefault(f"sm_{r['arch']}", {})[r["spec"]] = r["loops"]
    try:
        failure = sass_table.check("fused_gemm", meta["triton"], now)
    except LookupError as e:
        pytest.skip(str(e))
    assert failure is None, failure


def test_records_cover_kernels_configs_and_features(compiled):
    """Every kernel, every shipped config (default and autotune candidates) for both targets, every feature flag."""
    import torch
    from fastpref.kernels import fused_gemm as fg

    meta, results = compiled
    assert {r["name"] for r in results} == {"_linear_fold_kernel", "_fold_combine_kernel",
                                            "_linear_grad_input_kernel", "_linear_grad_weight_kernel"}
    names = {"fold": "_linear_fold_kernel", "grad_input": "_linear_grad_input_kernel",
             "grad_weight": "_linear_grad_weight_kernel"}
    def compiled_for(name, config, arch, dtype=None):
        return any(r["name"] == name and r["arch"] == arch and r["blocks"] == list(_blocks(config))
                   and r["num_warps"] == config.num_warps and r["num_stages"] == config.num_stages
                   and r["group_m"] == config.group_m
                   and (dtype is None or str(dtype).replace("torch.", "") in r["dtypes"]) for r in results)

    for arch in ARCHS:
        for kind, name in names.items():
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                assert compiled_for(name, fg.DEFAULT_CONFIGS[arch][kind][dtype], arch, dtype), (arch, kind, dtype)
                for c in fg.AUTOTUNE_CONFIGS[arch][kind][dtype]:  # fp16 shares bf16's candidates
                    assert compiled_for(name, c, arch), (arch, kind, dtype, c)
        for dtype in (torch.bfloat16, torch.float32):
            assert compiled_for(names["fold"], fg.RAGGED_STORE_CONFIGS[dtype], arch, dtype), (arch, dtype)
    # each target compiles its own gradient configs: sm_90's never reach sm_80 and the other way round
    for r in results:
        if r["name"] in (names["grad_input"], names["grad_weight"]) and {"bfloat16", "float16"} & set(r["dtypes"]):
            own = [*fg.AUTOTUNE_CONFIGS[r["arch"]]["grad_input"][torch.bfloat16]]
            assert any(r["blocks"] == list(_blocks(c)) and r["num_stages"] == c.num_stages for c in own), r
    flags = {f for r in results for f in r["flags"]}
    assert {"HAS_BIAS", "HAS_SOFTCAP", "HAS_ENTROPY", "HAS_TOP1", "STORE_LOGITS", "HAS_DBIAS", "ACCUMULATE",
            "EVEN_K"} <= flags
    assert not any("INTERPRET_BF16" in r["flags"] for r in results), "GPU binaries never take the interpreter path"
    # the autotuned launches expand to every candidate: 3 GEMMs x candidates + combine, per flag set and dtype
    per_dtype = {d: sum(len(fg.AUTOTUNE_CONFIGS[ARCHS[-1]][k][d]) for k in names) + 1
                 for d in (torch.bfloat16, torch.float32)}
    assert meta["counts"]["autotune"] == sum(per_dtype.values())


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
