"""The harness: float64 check, memory run and timing of every (shape, regime, task, implementation), on the same
tensors in one process; the rows it returns are what ``report`` prints and writes.

Peak memory: CUDA's ``max_memory_allocated`` minus the inputs; elsewhere the ``AllocationTracker`` of
``fastpref.utils.memory`` (live bytes of the tensors made inside the step — gradients included, inputs not).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .checks import ERR_ATOL, ERR_FACTOR, ERROR_KEYS, Truth, float64_truth, rel_err, step_errors
from .peers import IMPL_NAMES, Impl, flops_unit, implementations, module_version, version
from .tasks import TASK_IMPL_NAMES, TASK_SPECS, TaskTruth, task_implementations, task_truth
from .workload import REGIMES, Shape, Workload, make_workload


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int, int | None]:
    """(result, peak bytes above the inputs, largest single allocation) — see ``fastpref.utils.memory``."""
    from ..utils.memory import peak_bytes

    return peak_bytes(fn, device)


class Clock:
    """Times work on one device; the only part of the harness that differs between the CPU and CUDA.

    ``mark()`` returns a point in time in the device's order of execution: ``time.perf_counter()`` on the CPU
    (its ops run synchronously), a recorded CUDA event on CUDA (the host does not wait, so marking does not
    change what is measured). ``seconds(a, b)`` reads the interval after ``finish()`` (one synchronisation for a
    whole set of runs). ``before_run()`` evicts the L2 cache on CUDA (a 256 MiB write, as
    ``triton.testing.do_bench`` does), so no run starts with the previous run's data cached."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._flush = torch.empty(64 << 20, dtype=torch.int32, device=device) if device.type == "cuda" else None

    def before_run(self) -> None:
        if self._flush is not None:
            self._flush.zero_()

    def mark(self) -> Any:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))  # the workload's device, not the current one
            return event
        return time.perf_counter()

    def finish(self) -> None:
        synchronize(self.device)

    def seconds(self, start: Any, end: Any) -> float:
        if self.device.type == "cuda":
            return start.elapsed_time(end) / 1e3
        return end - start


def time_step_once(impl: Impl, w: Workload, clock: Clock) -> tuple[Any, Any, Any]:
    """One run of the step on a fresh graph (fast mode's backward is single-use: never re-run a backward):
    ``.grad`` cleared, then marks before the forward, between forward and backward, and after the backward."""
    w.zero_grad()
    clock.before_run()
    t0 = clock.mark()
    out = impl.step(w)
    t1 = clock.mark()
    out.loss.backward()
    t2 = clock.mark()
    del out
    return t0, t1, t2


def time_split(impl: Impl, w: Workload, repeats: int, clock: Clock | None = None) -> tuple[float, float]:
    """Median (forward, backward) seconds of ``repeats`` runs of the step."""
    clock = clock or Clock(w.device)
    marks = [time_step_once(impl, w, clock) for _ in range(repeats)]
    clock.finish()
    w.zero_grad()
    return (statistics.median(clock.seconds(a, b) for a, b, _ in marks),
            statistics.median(clock.seconds(b, c) for _, b, c in marks))


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, clock: Clock | None = None) -> float:
    """Median seconds of ``fn()``."""
    clock = clock or Clock(device)
    marks = []
    for _ in range(repeats):
        clock.before_run()
        start = clock.mark()
        fn()
        marks.append((start, clock.mark()))
    clock.finish()
    return statistics.median(clock.seconds(a, b) for a, b in marks)


def matmul_rate(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int, repeats: int = 5) -> float:
    """Measured FLOP/s of ``[m, k] @ [k, n]`` in ``dtype`` (the rate the step's matmuls can reach here): the best
    of ``repeats`` runs (on a shared CPU, what it can do; on CUDA, the rate its clocks settle at)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(n, k, device=device, dtype=dtype)
    out = torch.mm(a, b.t())  # warm-up (oneDNN / cuBLAS heuristics)
    clock = Clock(device)
    seconds = min(time_call(lambda: torch.mm(a, b.t(), out=out), device, 1, clock) for _ in range(repeats))
    return 2.0 * m * k * n / seconds


@dataclass
class Row:
    """One CSV row: one implementation, one task (``step``: the full DPO step; ``logps``: forward-only; ``kto``,
    ``sft``, ``grpo``: that trainer's step, ``fastpref.benchmark.tasks``)."""

    shape: str
    regime: str
    task: str
    impl: str
    label: str = ""
    status: str = "ok"  # ok | skipped | error | FAIL (fastpref outside its error bound)
    note: str = ""
    dtype: str = ""
    device: str = ""
    pairs: int = 0
    seq_len: int = 0
    hidden: int = 0
    vocab: int = 0
    n_scored: int = 0
    time_ms: float = math.nan
    fwd_ms: float = math.nan
    bwd_ms: float = math.nan
    time_vs_ref: float = math.nan
    peak_bytes: float = math.nan
    largest_bytes: float = math.nan
    peak_vs_ref: float = math.nan
    err_loss: float = math.nan
    err_logps: float = math.nan
    err_dhidden: float = math.nan
    err_dweight: float = math.nan
    max_err: float = math.nan
    err_bound: float = math.nan
    flops: float = math.nan
    tflops: float = math.nan
    frac_of_mm: float = math.nan
    x_floor: float = math.nan
    mean_token_logp: float = math.nan
    mm_tflops: float = math.nan
    loadavg: float = math.nan  # 1-minute load average when the block started (a shared CPU skews timings)
    hardware: str = ""
    versions: str = ""
    commit: str = ""


CSV_COLUMNS = tuple(f.name for f in fields(Row))
# Row names only the other trainers' tasks have (DPO's ``implementations`` does not know them).
TASK_ONLY_IMPLS = tuple(n for n in TASK_IMPL_NAMES if n not in IMPL_NAMES)


@dataclass
class BenchConfig:
    """What to run. ``check_subset=(pairs, tokens)`` checks against float64 on that slice of each workload (the
    full size does not fit float64 logits on a GPU); None checks at full size, from the memory run itself.
    Timing is the same on every device (``Clock``): ``repeats`` rounds, each running every implementation's step
    once on a fresh graph, forward and backward timed apart; medians. ``clock`` replaces the device's clock
    (tests use it to watch the harness)."""

    shapes: Sequence[Shape]
    regimes: Sequence[str] = REGIMES
    impls: Sequence[str] | None = None  # None: every implementation of each task
    tasks: Sequence[str] = ("step", "logps")  # DPO's step and forward-only log-probs; "kto", "sft", "grpo"
    device: str = "cpu"
    dtype: torch.dtype = torch.bfloat16
    repeats: int = 3
    warmup: int = 1
    liger_compiled: bool = True
    backend: str = "auto"
    check: bool = True
    check_subset: tuple[int, int] | None = None
    measure: bool = True  # False: the float64 checks only (no memory run, no timing)
    clock: Clock | None = None
    progress: bool = True
    seed: int = 0


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def versions_string() -> str:
    parts = [f"python={platform.python_version()}", f"torch={torch.__version__}"]
    for dist in ("triton", "fastpref", "trl", "liger-kernel", "cut-cross-entropy", "transformers"):
        v = version(dist)
        if v is None and dist in ("trl", "liger-kernel", "cut-cross-entropy"):
            mod = {"trl": "trl", "liger-kernel": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy"}[dist]
            v = module_version(mod, dist)
        if v is not None:
            parts.append(f"{dist}={v}")
    return " ".join(parts)


def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return math.nan


def _progress(total: int, enabled: bool, desc: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; keep working without it anyway
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n: int = 1) -> None: ...
            def set_postfix_str(self, s: str) -> None: ...
            def close(self) -> None: ...
        return _Null()
    return tqdm(total=total, desc=desc, unit="run", leave=False, file=sys.stderr, dynamic_ncols=True)


def _finish_errors(row: Row, errors: dict[str, float], bound: dict[str, float] | None) -> None:
    for k, v in errors.items():
        setattr(row, k, v)
    vals = [v for v in errors.values() if not math.isnan(v)]
    row.max_err = max(vals) if vals else math.nan
    if bound is not None and row.impl.startswith("fastpref"):
        limits = {k: ERR_FACTOR * bound[k] + ERR_ATOL for k in errors if k in bound and not math.isnan(bound[k])}
        row.err_bound = max(limits.values()) if limits else math.nan
        over = [k for k, lim in limits.items() if math.isnan(errors[k]) or errors[k] > lim]
        if over:
            row.status = "FAIL"
            msg = "error over 2x torch's: " + ", ".join(over)
            if msg not in row.note:
                row.note = (row.note + "; " if row.note else "") + msg


DPO_TASKS = ("step", "logps")


@dataclass
class _Family:
    """The rows of one trainer's head: its row tasks, implementations, their skip reasons, and its float64 truth."""

    name: str
    tasks: list[str]
    impls: list[Impl]
    skips: dict[str, str | None]

    def truth(self, w: Workload) -> Truth | TaskTruth:
        return float64_truth(w) if self.name == "dpo" else task_truth(TASK_SPECS[self.name], w)

    def floor_units(self, task: str) -> int:
        # DPO: no recompute, policy 6 + reference 2; forward-only 2
        return {"step": 8, "logps": 2}.get(task) or TASK_SPECS[task].floor_units


def _families(cfg: BenchConfig, device: torch.device) -> list[_Family]:
    """``cfg.tasks`` grouped by trainer (DPO's ``step`` and ``logps`` share one truth and one set of rows);
    ``cfg.impls`` None: every implementation of each task, else the named ones a task has."""
    out: list[_Family] = []
    dpo_tasks = [t for t in cfg.tasks if t in DPO_TASKS]
    if dpo_tasks:
        names = IMPL_NAMES if cfg.impls is None else [n for n in cfg.impls if n not in TASK_ONLY_IMPLS]
        impls = implementations(names, device=device, liger_compiled=cfg.liger_compiled, backend=cfg.backend)
        out.append(_Family("dpo", dpo_tasks, impls, {}))
    for task in (t for t in cfg.tasks if t not in DPO_TASKS):
        if task not in TASK_SPECS:
            raise ValueError(f"task: expected one of {[*DPO_TASKS, *TASK_SPECS]}, got {task!r}")
        impls = task_implementations(task, None if cfg.impls is None else tuple(cfg.impls), backend=cfg.backend,
                                     liger_compiled=cfg.liger_compiled)
        out.append(_Family(task, [task], impls, {}))
    for fam in out:
        fam.skips = {impl.name: impl.skip_reason(device) for impl in fam.impls}
    return out


def run_bench(cfg: BenchConfig, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Run every (shape, regime, task, implementation) of ``cfg``; returns the rows (also passed to ``on_row``)."""
    device = torch.device(cfg.device)
    families = _families(cfg, device)
    meta = dict(hardware=hardware_name(device), versions=versions_string(), commit=git_commit())
    # One tick per run: each family's float64 truth, each checked run, then each timed run (the bulk of the time).
    runs = 0
    for fam in families:
        runnable = [i for i in fam.impls if fam.skips[i.name] is None]
        per_block = sum((t != "logps") + (t == "logps" and i.has_logps) for t in fam.tasks for i in runnable)
        runs += per_block * (1 + (cfg.repeats if cfg.measure else 0)) + cfg.check
    bar = _progress(len(cfg.shapes) * len(cfg.regimes) * runs, cfg.progress, "fastpref bench")
    rows: list[Row] = []
    try:
        for shape in cfg.shapes:
            for regime in cfg.regimes:
                bar.set_postfix_str(f"{shape.name}/{regime}: inputs")
                w = make_workload(shape, regime, dtype=cfg.dtype, device=device, seed=cfg.seed)
                mm = matmul_rate(device, cfg.dtype, min(w.n_scored, 4096), shape.hidden, min(shape.vocab, 32768))
                base = dict(shape=shape.name, regime=regime, dtype=str(cfg.dtype).replace("torch.", ""),
                            device=device.type, pairs=shape.pairs, seq_len=shape.seq_len, hidden=shape.hidden,
                            vocab=shape.vocab, n_scored=w.n_scored, mm_tflops=mm / 1e12, loadavg=_loadavg(),
                            **meta)
                for fam in families:
                    check = None
                    if cfg.check:
                        bar.set_postfix_str(f"{shape.name}/{regime}: {fam.name} float64 check")
                        cw = w if cfg.check_subset is None else w.subset(*cfg.check_subset)
                        check = (cw, fam.truth(cw))
                        bar.update()
                    for row in _run_block(cfg, w, fam, check, base, mm, bar):
                        rows.append(row)
                        if on_row is not None:
                            on_row(row)
                    del check
                del w
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        bar.close()
    return rows


def _run_block(cfg: BenchConfig, w: Workload, fam: _Family, check: tuple[Workload, Truth | TaskTruth] | None,
               base: dict[str, Any], mm_rate: float, bar: Any) -> list[Row]:
    """Per task: each implementation's float64 check and memory-measured run (which doubles as its warm-up), then
    the timings. A failing check is recorded before any timing of the block."""
    rows: list[Row] = []
    mean_lp = check[1].mean_token_logp if check is not None else math.nan
    impls, skips = fam.impls, fam.skips
    clock = cfg.clock or Clock(w.device)
    for task in fam.tasks:
        live: list[tuple[Impl, Row]] = []
        for impl in impls:
            if task == "logps" and not impl.has_logps:
                if impl.name == "liger" and skips[impl.name] is None:
                    rows.append(Row(task=task, impl=impl.name, label=impl.label, status="skipped",
                                    note="no forward-only path (its forward computes the gradients)",
                                    mean_token_logp=mean_lp, **base))
                continue
            row = Row(task=task, impl=impl.name if task != "logps" else impl.name.replace("-fast", ""),
                      label=impl.label, mean_token_logp=mean_lp, **base)
            rows.append(row)
            if skips[impl.name] is not None:
                row.status, row.note = "skipped", skips[impl.name] or ""
                continue
            bar.set_postfix_str(f"{w.shape.name}/{w.regime}: {task} {impl.name}")
            try:
                _checked_run(cfg, task, impl, w, check, row)
                _mark_fallback(row, impl, w)
                live.append((impl, row))
            except Exception as e:  # a peer that breaks here is a result, not a crash of the whole run
                row.status, row.note = "error", f"{type(e).__name__}: {e}"[:200]
                w.zero_grad()
                bar.update(cfg.repeats if cfg.measure else 0)  # the timed runs it will not have
            bar.update()
        _ratios_and_bounds(rows, check is not None)  # FAIL marks before timing
        bar.set_postfix_str(f"{w.shape.name}/{w.regime}: timing {task}")
        if not cfg.measure:
            continue
        _timed_rounds(cfg, task, live, w, fam.floor_units(task) * flops_unit(w) / mm_rate, mm_rate, clock, bar)
        for impl, row in live:
            _mark_fallback(row, impl, w)
    _ratios_and_bounds(rows, check is not None)
    return rows


def _mark_fallback(row: Row, impl: Impl, w: Workload) -> None:
    """A row that did not run as named (a forced fused row on cublas) says so first in its note: its errors and
    times are the fallback path's, not the fused kernels'."""
    mark = impl.fallback(w)
    if mark and not row.note.startswith(mark):
        row.note = mark + (f"; {row.note}" if row.note else "")


def _run_task(task: str, impl: Impl, w: Workload) -> Any:
    if task != "logps":
        out = impl.step(w)
        out.loss.backward()
        return out
    return impl.logps(w)


def _checked_run(cfg: BenchConfig, task: str, impl: Impl, w: Workload,
                 check: tuple[Workload, Truth | TaskTruth] | None,
                 row: Row) -> None:
    """Warm-up (only where it compiles), the float64 check, and one run under the memory measurement (the same
    run as the check when the check is at full size)."""
    warm = w if cfg.measure or check is None else check[0]  # check-only: warm up on the workload it runs
    for _ in range(cfg.warmup if getattr(impl, "compiled", False) else 0):
        warm.zero_grad()
        _run_task(task, impl, warm)
    if check is not None and (check[0] is not w or not cfg.measure):  # check-only at full size: run it here
        cw, truth = check
        cw.zero_grad()
        out = _run_task(task, impl, cw)
        _record_errors(row, task, out, cw, truth)
        cw.zero_grad()
        del out
        if cw is not w:
            row.note = f"errors on a {cw.shape.pairs}x{cw.shape.seq_len} subset"
    if not cfg.measure:
        return
    w.zero_grad()
    out, peak, largest = measure_peak(lambda: _run_task(task, impl, w), w.device)
    if check is not None and check[0] is w:
        _record_errors(row, task, out, w, check[1])
    row.peak_bytes, row.largest_bytes = float(peak), math.nan if largest is None else float(largest)
    w.zero_grad()
    del out
    if w.device.type == "cuda":
        torch.cuda.empty_cache()


def _record_errors(row: Row, task: str, out: Any, w: Workload, truth: Truth | TaskTruth) -> None:
    if task != "logps":
        for k, v in step_errors(out, w, truth).items():
            setattr(row, k, v)
    else:
        row.err_logps = rel_err(out, truth.logps)


def _timed_rounds(cfg: BenchConfig, task: str, live: list[tuple[Impl, Row]], w: Workload, floor: float,
                  mm_rate: float, clock: Clock, bar: Any) -> None:
    """``repeats`` rounds, each timing every implementation once (load drift, on a shared CPU or a GPU changing
    clocks, hits all alike); the same code on every device, only the ``clock`` differs."""
    fwd: dict[str, list[float]] = {impl.name: [] for impl, _ in live}
    bwd: dict[str, list[float]] = {impl.name: [] for impl, _ in live}
    for _ in range(cfg.repeats):
        for impl, row in live:
            if row.status != "error":
                try:
                    if task != "logps":
                        f, b = time_split(impl, w, 1, clock)
                    else:
                        f, b = time_call(lambda impl=impl: impl.logps(w), w.device, 1, clock), 0.0
                    fwd[impl.name].append(f)
                    bwd[impl.name].append(b)
                except Exception as e:
                    row.status, row.note = "error", f"{type(e).__name__}: {e}"[:200]
                    w.zero_grad()
            bar.update()
    for impl, row in live:
        if row.status == "error" or not fwd[impl.name]:
            continue
        total = statistics.median(f + b for f, b in zip(fwd[impl.name], bwd[impl.name]))
        row.time_ms = total * 1e3
        if task != "logps":
            row.fwd_ms = statistics.median(fwd[impl.name]) * 1e3
            row.bwd_ms = statistics.median(bwd[impl.name]) * 1e3
        flops = impl.step_flops(w) if task != "logps" else impl.logps_flops(w)
        _throughput(row, flops, total, floor, mm_rate)


def _throughput(row: Row, flops: int, seconds: float, floor: float, mm_rate: float) -> None:
    row.flops = float(flops)
    row.tflops = flops / seconds / 1e12
    row.frac_of_mm = flops / seconds / mm_rate
    row.x_floor = seconds / floor


def _ratios_and_bounds(rows: Sequence[Row], checked: bool) -> None:
    """Time and peak relative to the reference of the same task; fastpref's error bound from the reference's.
    ``rows``: one (shape, regime) block."""
    for task in {r.task for r in rows}:
        ref = next((r for r in rows if r.task == task and r.impl == "reference" and r.status == "ok"), None)
        bound = None
        if ref is not None and checked:
            bound = {k: getattr(ref, k) for k in ERROR_KEYS}
        for r in rows:
            if r.task != task or r.status not in ("ok", "FAIL"):
                continue
            if ref is not None:
                r.time_vs_ref = r.time_ms / ref.time_ms
                r.peak_vs_ref = r.peak_bytes / ref.peak_bytes if ref.peak_bytes else math.nan
            if checked:
                _finish_errors(r, {k: getattr(r, k) for k in ERROR_KEYS}, bound)


def finalize_block(rows: Sequence[Row], checked: bool = True) -> None:
    """Ratios to the reference and fastpref's error verdicts for rows of one (shape, regime) block (public for
    ``bench/gpu_suite.py``, which merges the errors of its check phase into its timing rows)."""
    _ratios_and_bounds(rows, checked)


__all__ = ["CSV_COLUMNS", "BenchConfig", "Clock", "Row", "finalize_block", "git_commit", "hardware_name", "matmul_rate",
           "measure_peak", "run_bench", "synchronize", "time_call", "time_split", "versions_string"]
