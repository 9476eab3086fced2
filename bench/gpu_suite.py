"""The GPU suite: every implementation checked against float64, then timed side by side at the benchmark shapes.

One call on a GPU machine with torch, triton, transformers and pytest (the peers carried as pure-Python wheels,
made once with ``python3 -m pip download --no-deps trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 -d
.whl``; ``.whl/`` is git-ignored, so it must be carried to the machine explicitly)::

    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . && \
    python3 -m pip install -q --no-deps --no-index --target .peers .whl/*.whl && \
    python3 bench/gpu_suite.py --peers-path .peers --shapes llama3-8b-1k --out DIR    # one shape per call

fastpref must be *installed* (that is what maps ``kernels/`` to ``fastpref.kernels``); with the repository only on
``PYTHONPATH`` the suite stops at once and says so. A pre-flight step first runs the compiled-kernel tests
(``PREFLIGHT_TESTS`` under pytest, compiled on CUDA) so that a faulting kernel is reported before any timed row and
the suite stops there (``--no-preflight`` skips it; ``--dry`` skips it unless ``--preflight``). Phase 1 checks every
implementation (loss, logps, dH, dW; forward-only logps) against float64 on a subset of each workload —
``--check-pairs`` pairs x ``--check-tokens`` tokens at the real H and V (the float64 logits of the whole batch do
not fit), fast mode also over three pair groups (``fastpref-fast-3groups``, so dW summed across groups is checked).
Phase 2 measures the peak memory and times the full step (forward and backward apart) and the forward-only log-probs
with the harness the CPU benchmark uses (``fastpref.benchmark.harness``: CUDA events are its only difference; every
run builds a fresh graph). The bf16 matmul rate is measured in the same run; each row reports achieved TFLOP/s, its
fraction of that rate and its time over the floor's. Results: a CSV (GPU, versions, commit in every row), a PNG and
the full log of the run (everything printed, the pre-flight's output and the float64 check table included) under
``--out`` (default ``bench/results/``), then the tables, and the targets of ``docs/benchmarks.md`` as measured
ratios, last. Every output path and ``$FASTPREF_GEMM`` / ``$FASTPREF_BACKEND`` are checked before any work. The exit
status is non-zero when the pre-flight or a fastpref row fails its check or errors.

``--task kto sft grpo`` (``fastpref bench``'s flag) adds the other trainers' heads, each row checked and timed the
same way (``--task dpo kto sft grpo`` keeps the DPO rows beside them).

``--dry`` runs the same code at tiny sizes (the CPU is fine): CI runs it through ``tests/test_benchmark.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import math
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
INSTALL_HINT = "python3 -m pip install --no-deps --no-build-isolation --no-index -e .  (from the repository root)"
# The compiled-kernel tests run before any timed row: a kernel that faults poisons the CUDA context of the process
# that launched it, so it is found in a pytest process of its own, and reported, before the suite launches it.
PREFLIGHT_TESTS = ("tests/test_fused_gemm.py", "tests/test_kernels.py")
PREFLIGHT_TIMEOUT_S = 420

# fast mode's time as a fraction of TRL 1.16's, per shape (docs/benchmarks.md)
FAST_VS_TRL = {"llama3-8b-1k": 0.65, "llama3-8b-4k": 0.70, "qwen2.5-7b-2k": 0.70, "small-1k": 0.75}
FAST_PEAK_VS_TRL = 0.8
LEAN_VS_TRL = 0.85
LEAN_PEAK_VS_CCE = 1.5
FORWARD_X_FLOOR = 1.15


def require_installed() -> str | None:
    """None when fastpref is installed in this Python; else why not and how to fix it (checked before anything
    else runs, so a lent machine is not spent on a suite whose every fastpref row would error)."""
    if importlib.util.find_spec("fastpref") is None:
        return f"fastpref is not installed in this Python ({sys.executable}): {INSTALL_HINT}"
    try:
        import fastpref.kernels  # noqa: F401  (needs triton; the package-dir mapping of an install)
    except ImportError as e:
        return (f"fastpref is importable but fastpref.kernels is not ({type(e).__name__}: {e}); the repository was "
                f"put on the path instead of installed, or triton is missing: {INSTALL_HINT}")
    return None


def build_parser() -> argparse.ArgumentParser:
    from fastpref.benchmark import add_bench_arguments

    p = argparse.ArgumentParser(prog="bench/gpu_suite.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(p)
    p.add_argument("--peers-path", action="append", default=[], metavar="DIR",
                   help="directory with the peers' packages (pip install --no-deps --target DIR), put first on "
                        "sys.path; repeatable")
    p.add_argument("--check-pairs", type=int, default=4,
                   help="pairs of the float64 check subset (several: the fast path's pair groups are exercised)")
    p.add_argument("--check-tokens", type=int, default=512, help="tokens per sequence of the float64 check subset")
    p.add_argument("--check-only", action="store_true", help="phase 1 only")
    p.add_argument("--no-gemm-paths", action="store_true",
                   help="skip the rows that force each GEMM path (fastpref-{fast,lean}-{cublas,fused})")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help="directory of the CSV, the PNG and the full log (default bench/results)")
    p.add_argument("--preflight", action=argparse.BooleanOptionalAction, default=None,
                   help="run the compiled-kernel tests first and stop if they fail (default: on CUDA, not with --dry)")
    p.add_argument("--preflight-timeout", type=float, default=PREFLIGHT_TIMEOUT_S, metavar="SECONDS",
                   help=f"stop the pre-flight tests after this long, which fails them (default {PREFLIGHT_TIMEOUT_S})")
    return p


class _Tee(io.TextIOBase):
    """A text stream writing to ``stream`` and to the log ``log`` (progress-bar redraws, which start with a
    carriage return, only to ``stream``)."""

    def __init__(self, stream: io.TextIOBase, log: io.TextIOBase) -> None:
        super().__init__()
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        if not text.startswith("\r"):
            self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


@contextlib.contextmanager
def tee_output(path: Path) -> Iterator[None]:
    """Everything printed to stdout and stderr inside the block also goes to the log file ``path``."""
    with path.open("w", encoding="utf-8") as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            yield
        except BaseException:  # the traceback Python prints after the block reaches the log too
            log.write(traceback.format_exc())
            raise
        finally:
            sys.stdout, sys.stderr = out, err


def run_preflight(tests: tuple[str, ...] | None = None, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> bool:
    """``python3 -m pytest -x -q`` on ``tests`` (default ``PREFLIGHT_TESTS``; paths from the repository root) in
    a process of its own, its output printed (so logged); True when every test passed."""
    tests = PREFLIGHT_TESTS if tests is None else tests
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    print(f"pre-flight: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout_s)
        output, verdict = done.stdout, f"exit {done.returncode}"
        ok = done.returncode == 0
    except subprocess.TimeoutExpired as e:
        output, verdict, ok = e.stdout or b"", f"stopped after {timeout_s:.0f} s", False
    print(output.decode("utf-8", "replace").rstrip())
    print(f"pre-flight: {'passed' if ok else 'FAILED'} ({verdict}, {time.perf_counter() - t0:.0f} s)", flush=True)
    return ok


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def _merge_errors(rows: list, checks: list) -> None:
    """Copy the check phase's errors and verdicts into the timing rows, then recompute each block's ratios."""
    from fastpref.benchmark import ERROR_KEYS, finalize_block

    by_key = {(c.shape, c.regime, c.task, c.impl): c for c in checks}
    for r in rows:
        c = by_key.get((r.shape, r.regime, r.task, r.impl))
        if c is None or c.status not in ("ok", "FAIL"):
            if c is not None and c.status == "error" and r.status == "ok":
                r.status, r.note = "error", f"check: {c.note}"
            continue
        for k in (*ERROR_KEYS, "mean_token_logp"):
            setattr(r, k, getattr(c, k))
        if c.note and c.note not in r.note:
            r.note = f"{c.note}; {r.note}" if r.note else c.note
    blocks: dict[tuple[str, str], list] = {}
    for r in rows:
        blocks.setdefault((r.shape, r.regime), []).append(r)
    for block in blocks.values():
        finalize_block(block, checked=True)


def targets_table(rows: list) -> tuple[str, bool | None]:
    """The targets of docs/benchmarks.md as measured ratios; (text, all met), None where no target was measured
    (a run of the other trainers' task rows only: their predictions are in bench/NOTES.md, not targets)."""
    lines = [f"{'shape':<14} {'regime':<8} {'target':<34} {'measured':>9} {'limit':>7}  verdict"]
    all_met, measured = True, 0

    def get(shape: str, regime: str, task: str, impl: str):
        return next((r for r in rows if (r.shape, r.regime, r.task, r.impl) == (shape, regime, task, impl)
                     and r.status in ("ok", "FAIL") and not math.isnan(r.time_ms)), None)

    def add(shape: str, regime: str, what: str, value: float | None, limit: float) -> None:
        nonlocal all_met, measured
        if value is None or math.isnan(value):
            lines.append(f"{shape:<14} {regime:<8} {what:<34} {'-':>9} {limit:>7.2f}  not measured")
            return
        ok = value <= limit
        all_met &= ok
        measured += 1
        lines.append(f"{shape:<14} {regime:<8} {what:<34} {value:>9.3f} {limit:>7.2f}  {'met' if ok else 'MISSED'}")

    for shape, regime in dict.fromkeys((r.shape, r.regime) for r in rows):
        fast, lean = get(shape, regime, "step", "fastpref-fast"), get(shape, regime, "step", "fastpref-lean")
        trl, cce = get(shape, regime, "step", "trl"), get(shape, regime, "step", "cce")
        if fast and trl:
            add(shape, regime, "fast time / TRL", fast.time_ms / trl.time_ms, FAST_VS_TRL.get(shape, 0.75))
            add(shape, regime, "fast peak / TRL", fast.peak_bytes / trl.peak_bytes, FAST_PEAK_VS_TRL)
        if lean and trl:
            add(shape, regime, "lean time / TRL", lean.time_ms / trl.time_ms, LEAN_VS_TRL)
        if lean and cce:
            add(shape, regime, "lean peak / CCE", lean.peak_bytes / cce.peak_bytes, LEAN_PEAK_VS_CCE)
        fwd = get(shape, regime, "logps", "fastpref")
        if fwd:
            peers = [r for r in rows if (r.shape, r.regime, r.task) == (shape, regime, "logps")
                     and r.impl != "fastpref" and r.status == "ok" and not math.isnan(r.time_ms)]
            if peers:
                best = min(peers, key=lambda r: r.time_ms)
                add(shape, regime, f"forward / fastest peer ({best.impl})", fwd.time_ms / best.time_ms, 1.0)
            add(shape, regime, "forward / floor at measured mm rate", fwd.x_floor, FORWARD_X_FLOOR)
        for r in rows:
            if (r.shape, r.regime) == (shape, regime) and r.impl.startswith("fastpref") and r.status == "FAIL":
                all_met = False
                lines.append(f"{shape:<14} {regime:<8} {r.task + ' ' + r.impl + ' error <= 2x torch':<34} "
                             f"{r.max_err:>9.2e} {r.err_bound:>7.1e}  MISSED")
    return "\n".join(lines), (all_met if measured else None)


def gemm_paths_table(rows: list) -> str:
    """Per shape and mode: the cublas and fused paths' step times, fused / cublas, and the default row's time. A
    fused row whose kernels fell back to cuBLAS timed cuBLAS: it counts as missing (NaN), never as fused."""
    lines = [f"{'shape':<14} {'regime':<8} {'mode':<5} {'cublas ms':>10} {'fused ms':>10} {'fused/cublas':>12} "
             f"{'default ms':>10}"]

    def ms(shape: str, regime: str, task: str, impl: str) -> float:
        r = next((r for r in rows if (r.shape, r.regime, r.task, r.impl) == (shape, regime, task, impl)
                  and r.status in ("ok", "FAIL") and not r.note.startswith("fallback:")), None)
        return r.time_ms if r is not None else math.nan

    for shape, regime in dict.fromkeys((r.shape, r.regime) for r in rows):
        for mode, task, stem in (("fast", "step", "fastpref-fast"), ("lean", "step", "fastpref-lean"),
                                 ("logps", "logps", "fastpref")):
            cublas, fused, auto = (ms(shape, regime, task, f"{stem}{suffix}") for suffix in ("-cublas", "-fused", ""))
            if math.isnan(cublas) and math.isnan(fused):
                continue
            lines.append(f"{shape:<14} {regime:<8} {mode:<5} {cublas:>10.2f} {fused:>10.2f} {fused / cublas:>12.3f} "
                         f"{auto:>10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    problem = require_installed()
    if problem is not None:
        print(f"gpu_suite: {problem}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    for path in reversed(args.peers_path):  # before any peer is imported
        sys.path.insert(0, str(Path(path).resolve()))

    import torch

    from fastpref.benchmark.cli import check_environment, check_output_path, check_outputs

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type != "cuda" and not args.dry:
        print("gpu_suite: no CUDA device; run with --dry for the tiny CPU smoke run", file=sys.stderr)
        return 2
    try:  # every output and the environment before any work: a lent machine's minutes are few
        check_output_path("--out", args.out, directory=True)
        check_outputs(args.csv, args.plot)
        check_environment(args.device)
    except ValueError as e:
        print(f"gpu_suite: error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    hw = _slug(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    name = f"{'dry-' if args.dry else ''}{hw}-{time.strftime('%Y%m%d-%H%M%S')}"
    log_path = args.out / f"{name}.log"
    with tee_output(log_path):
        print(f"log: {log_path}")
        return _run(args, name)


def _run(args: argparse.Namespace, name: str) -> int:
    from fastpref.benchmark import (
        BENCH_SHAPES,
        CHECK_ONLY_IMPLS,
        GEMM_IMPLS,
        SHAPES,
        config_from_args,
        format_table,
        run_bench,
        write_csv,
        write_plot,
    )
    from fastpref.benchmark.cli import fastpref_failures

    preflight = args.preflight if args.preflight is not None else not args.dry
    if preflight and not run_preflight(timeout_s=args.preflight_timeout):
        print("\nPRE-FLIGHT FAILED: a compiled-kernel test failed (output above); nothing was timed. Fix it, or "
              "rerun with --no-preflight to time anyway (a kernel that faults would poison this process's CUDA "
              "context and every row after it).")
        return 1
    cfg = config_from_args(args)
    if not args.no_gemm_paths:  # both GEMM paths side by side with the auto choice
        wanted = [i for i in GEMM_IMPLS if f"fastpref-{i.split('-')[1]}" in cfg.impls]
        cfg = dataclasses.replace(cfg, impls=list(dict.fromkeys([*cfg.impls, *wanted])))
    if not args.dry and args.shapes is None:
        cfg = dataclasses.replace(cfg, shapes=[SHAPES[n] for n in BENCH_SHAPES])
    subset = (args.check_pairs, args.check_tokens) if not args.dry else (min(args.check_pairs, 2), 32)
    t0 = time.perf_counter()

    # Phase 1: correctness first, on a subset (a failure outranks timings).
    check_impls = [*cfg.impls, *(i for i in CHECK_ONLY_IMPLS if "fastpref-fast" in cfg.impls)]
    checks = run_bench(dataclasses.replace(cfg, impls=check_impls, check=not args.no_check, check_subset=subset,
                                           measure=False))
    failed = fastpref_failures(checks)
    if args.check_only:
        print("float64 check (subset):")
        print(format_table(checks))
        print(f"\ncheck CSV: {write_csv(checks, args.out / f'{name}-check.csv')}")
        return 1 if failed else 0

    # Phase 2: peak memory and timings (errors merged in from phase 1).
    rows = run_bench(dataclasses.replace(cfg, check=False))
    _merge_errors(rows, checks)
    # the timing rows carry the checks' verdicts (_merge_errors): one line per row, check-only rows added
    failed = list({(r.shape, r.regime, r.task, r.impl): r for r in failed + fastpref_failures(rows)}.values())
    csv_path = write_csv(rows, args.csv or args.out / f"{name}.csv")
    png_path = write_plot(rows, args.plot or args.out / f"{name}.png", title="fastpref GPU suite")
    print("float64 check (subset):")
    print(format_table(checks))
    print("\ntimings and peak memory:")
    print(format_table(rows))
    print(f"\nCSV: {csv_path}\nPNG: {png_path}\n{len(rows)} rows in {time.perf_counter() - t0:.1f} s")
    if failed:
        print("\nFASTPREF FAILURES (they outrank every timing):")
        for r in failed:
            print(f"  {r.shape}/{r.regime} {r.task} {r.impl}: {r.status} {r.note}")
    print("\nGEMM paths (auto = the choice fastpref makes on this device):")
    print(gemm_paths_table(rows))
    targets, met = targets_table(rows)
    print("\nTargets (docs/benchmarks.md; ratios measured side by side in this run):")
    print(targets)
    verdict = "not measured in this run (no DPO step rows)" if met is None else "all met" if met else "NOT all met"
    print(f"targets {verdict}; exit {1 if failed else 0}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
