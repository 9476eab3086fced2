"""The benchmark commands cannot rot: ``fastpref bench --dry`` and ``bench/gpu_suite.py --dry`` run end to end on
the CPU and write the CSV; and the memory half of the CPU performance target, measured by the allocation tracker:
the PyTorch path's full DPO step holds at most half the reference's peak tracked bytes, and (lean, or fast under a
budget) no single allocation as large as the scored tokens x vocabulary logits. No timings are asserted."""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fastpref.benchmark import (
    CSV_COLUMNS,
    FastprefImpl,
    ReferenceImpl,
    Shape,
    make_workload,
    measure_peak,
)

ROOT = Path(__file__).resolve().parent.parent


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open() as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _check_rows(rows: list[dict[str, str]], regimes: tuple[str, ...] = ("uniform", "peaked")) -> None:
    by = {(r["shape"], r["regime"], r["task"], r["impl"]): r for r in rows}
    for regime in regimes:
        for task, impl in [("step", "fastpref-fast"), ("step", "fastpref-lean"), ("step", "reference"),
                           ("logps", "fastpref"), ("logps", "reference")]:
            r = by[("tiny", regime, task, impl)]
            assert r["status"] == "ok", r
            assert float(r["time_ms"]) > 0 and float(r["peak_bytes"]) > 0
            assert math.isfinite(float(r["max_err"])) and float(r["max_err"]) < 0.1
        cce = by[("tiny", regime, "step", "cce")]
        assert cce["status"] == "skipped" and "CUDA" in cce["note"]
    assert {r["status"] for r in rows} <= {"ok", "skipped"}, [r for r in rows if r["status"] not in ("ok", "skipped")]



class _Bar:
    """A stand-in for the harness's progress bar that records its total and its count."""

    def __init__(self, total):
        self.total, self.n = total, 0

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, s): ...

    def close(self): ...


def _fake_progress(monkeypatch, harness) -> list[_Bar]:
    """Replace the harness's progress bar; the bars it makes are appended to the returned list."""
    bars: list[_Bar] = []

    def make(total, enabled, desc):
        bars.append(_Bar(total))
        return bars[-1]

    monkeypatch.setattr(harness, "_progress", make)
    return bars

def test_fastpref_bench_dry(tmp_path, capsys):
    from fastpref.cli import main

    out_csv, out_png = tmp_path / "bench.csv", tmp_path / "bench.png"
    rc = main(["bench", "--dry", "--device", "cpu", "--no-progress", "--csv", str(out_csv), "--plot", str(out_png)])
    assert rc == 0
    columns, rows = _read(out_csv)
    assert tuple(columns) == CSV_COLUMNS
    _check_rows(rows)
    printed = capsys.readouterr().out
    assert "fastpref-fast" in printed and "reference" in printed and "skipped" in printed
    if importlib.util.find_spec("matplotlib") is not None:
        assert out_png.stat().st_size > 0


def _gpu_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "bench" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    return suite


def test_gpu_suite_dry(tmp_path, capsys):
    """The GPU suite's own code on the CPU: the fast-mode row (whose backward is single-use) is measured, the
    multi-group fast check runs, and the targets table comes last."""
    suite = _gpu_suite()
    # one regime: the other is exercised by test_fastpref_bench_dry, and CI time is precious
    rc = suite.main(["--dry", "--device", "cpu", "--no-progress", "--regimes", "peaked", "--out", str(tmp_path)])
    assert rc == 0
    (csv_path,) = tmp_path.glob("dry-*.csv")
    # --out holds the full log too (a device returns only the last 12,000 characters of output)
    (log_path,) = tmp_path.glob("dry-*.log")
    assert log_path.stem == csv_path.stem
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / f"{csv_path.stem}.png").stat().st_size > 0
    columns, rows = _read(csv_path)
    assert tuple(columns) == CSV_COLUMNS
    _check_rows(rows, regimes=("peaked",))
    fast = next(r for r in rows if (r["task"], r["impl"]) == ("step", "fastpref-fast"))
    assert float(fast["fwd_ms"]) > 0 and float(fast["bwd_ms"]) > 0
    # both GEMM paths side by side (the fused kernels under the interpreter here), checked and timed
    for task, impl in [("step", "fastpref-fast-cublas"), ("step", "fastpref-fast-fused"),
                       ("step", "fastpref-lean-fused"), ("logps", "fastpref-fused")]:
        row = next(r for r in rows if (r["task"], r["impl"]) == (task, impl))
        assert row["status"] == "ok" and float(row["time_ms"]) > 0, row
    # errors come from the float64 check phase, on a subset of the workload
    assert all("subset" in r["note"] for r in rows if r["status"] == "ok")
    printed = capsys.readouterr().out
    grouped = [line for line in printed.splitlines() if line.startswith("step   fastpref-fast-3groups")]
    assert grouped and "errors on a" in grouped[0] and "error " not in grouped[0].split("errors on a")[0]
    assert "GEMM paths (auto" in printed and any(line.split()[2:3] == ["fast"] for line in
                                                 printed.split("GEMM paths (auto")[1].splitlines()[2:4])
    tail = printed.strip().splitlines()
    assert tail[-1].startswith("targets ") and any("fast time / TRL" in line for line in tail[-8:])
    log = log_path.read_text()
    assert "float64 check (subset):" in log and "pre-flight" not in log  # --dry: no pre-flight unless asked
    assert log.strip().splitlines()[-1] == tail[-1] and all(line in log for line in printed.splitlines())


def test_gpu_suite_targets_say_when_none_was_measured():
    """A run of task rows only (``--task grpo``) measures no DPO target: neither met nor missed."""
    suite = _gpu_suite()
    row = types.SimpleNamespace(shape="small-1k", regime="peaked", task="grpo", impl="fastpref-fast", status="ok",
                                time_ms=1.0, peak_bytes=1, x_floor=1.0, max_err=0.0, err_bound=1.0)
    text, met = suite.targets_table([row])
    assert met is None and text.splitlines()[0].startswith("shape")


# --------------------------------------------------------------------------------------------------------------
# Bad outputs and environment are refused before any work; a fastpref row that errors fails the run


def _no_run(*args, **kwargs):
    raise AssertionError("the benchmark ran: the bad input should have been refused before any work")


def _output_cases(tmp_path: Path) -> dict[str, list[str]]:
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("x")
    return {
        "csv-is-a-dir": ["--csv", str(tmp_path / "a-dir")],
        "plot-is-a-dir": ["--plot", str(tmp_path / "a-dir")],
        "csv-under-a-file": ["--csv", str(tmp_path / "a-file" / "r.csv")],
        "csv-names-a-dir": ["--csv", str(tmp_path / "new") + "/"],
        "csv-is-the-plot": ["--csv", str(tmp_path / "r.out"), "--plot", str(tmp_path / "r.out")],
    }


@pytest.mark.parametrize("case", ["csv-is-a-dir", "plot-is-a-dir", "csv-under-a-file", "csv-names-a-dir",
                                  "csv-is-the-plot"])
def test_bench_refuses_an_output_it_could_not_write_before_any_work(case, tmp_path, monkeypatch, capsys):
    from fastpref.benchmark import cli as bench_cli
    from fastpref.cli import main

    monkeypatch.setattr(bench_cli, "run_bench", _no_run)
    args = _output_cases(tmp_path)[case]
    assert main(["bench", "--dry", "--device", "cpu", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    flag = "--plot" if case.startswith("plot") or case == "csv-is-the-plot" else "--csv"
    assert err.startswith(f"fastpref bench: error: {flag}: "), err


@pytest.mark.parametrize(("var", "value", "match"), [
    ("FASTPREF_GEMM", "bogus", r"FASTPREF_GEMM: expected one of \['auto', 'fused', 'cublas'\], got 'bogus'"),
    ("FASTPREF_GEMM", "cuBLAS", r"FASTPREF_GEMM: expected one of .*, got 'cuBLAS'"),
    ("FASTPREF_BACKEND", "cuda", r"FASTPREF_BACKEND: expected one of \['auto', 'triton', 'torch'\], got 'cuda'"),
])
def test_bench_refuses_a_bad_environment_before_any_work(var, value, match, monkeypatch, capsys):
    import re

    from fastpref.benchmark import cli as bench_cli
    from fastpref.cli import main

    monkeypatch.setattr(bench_cli, "run_bench", _no_run)
    monkeypatch.setenv(var, value)
    assert main(["bench", "--dry", "--device", "cpu", "--no-progress"]) == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize(("impl", "status", "rc"), [("fastpref-fast", "error", 1), ("fastpref", "error", 1),
                                                     ("fastpref-lean", "FAIL", 1), ("liger", "error", 0),
                                                     ("fastpref-fast", "skipped", 0)])
def test_bench_exit_status_counts_fastpref_rows_that_error(impl, status, rc, monkeypatch, capsys):
    from fastpref.benchmark import Row
    from fastpref.benchmark import cli as bench_cli
    from fastpref.cli import main

    rows = [Row(shape="tiny", regime="peaked", task="step", impl="reference"),
            Row(shape="tiny", regime="peaked", task="step", impl=impl, status=status, note="ValueError: boom")]
    monkeypatch.setattr(bench_cli, "run_bench", lambda cfg: rows)
    assert main(["bench", "--dry", "--device", "cpu", "--no-progress"]) == rc
    assert ("errored: exit 1" in capsys.readouterr().err) == bool(rc)


def test_gpu_suite_refuses_bad_outputs_and_environment_before_any_work(tmp_path, monkeypatch, capsys):
    import fastpref.benchmark

    suite = _gpu_suite()
    monkeypatch.setattr(fastpref.benchmark, "run_bench", _no_run)
    monkeypatch.setattr(suite, "run_preflight", _no_run)
    (tmp_path / "a-file").write_text("x")
    base = ["--dry", "--device", "cpu", "--no-progress"]
    assert suite.main([*base, "--out", str(tmp_path / "a-file")]) == 2
    assert "gpu_suite: error: --out: expected a directory to write" in capsys.readouterr().err
    assert suite.main([*base, "--out", str(tmp_path), "--csv", str(tmp_path)]) == 2
    assert "gpu_suite: error: --csv: " in capsys.readouterr().err
    monkeypatch.setenv("FASTPREF_GEMM", "bogus")
    assert suite.main([*base, "--out", str(tmp_path)]) == 2
    assert "gpu_suite: error: FASTPREF_GEMM: expected one of" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "a-file"]  # no log, no CSV


def test_gpu_suite_preflight_runs_the_compiled_kernel_tests_first(tmp_path, monkeypatch, capsys):
    """The pre-flight runs its tests in a pytest process of its own before anything is checked or timed: a
    failure stops the suite (exit 1) and is in the log; a pass lets it go on."""
    import fastpref.benchmark

    suite = _gpu_suite()
    assert all((ROOT / t).is_file() for t in suite.PREFLIGHT_TESTS)  # the compiled-kernel tests it names exist
    assert suite.PREFLIGHT_TESTS == ("tests/test_fused_gemm.py", "tests/test_kernels.py")
    failing, passing = tmp_path / "test_faulting_kernel.py", tmp_path / "test_good_kernel.py"
    failing.write_text("def test_kernel():\n    raise RuntimeError('CUDA error: an illegal memory access')\n")
    passing.write_text("def test_kernel():\n    pass\n")
    out = tmp_path / "out"
    base = ["--dry", "--device", "cpu", "--no-progress", "--out", str(out), "--preflight"]

    monkeypatch.setattr(fastpref.benchmark, "run_bench", _no_run)
    monkeypatch.setattr(suite, "PREFLIGHT_TESTS", (str(failing),))
    assert suite.main(base) == 1
    printed = capsys.readouterr().out
    assert "illegal memory access" in printed and "PRE-FLIGHT FAILED" in printed
    (log,) = out.glob("dry-*.log")
    assert "pre-flight: FAILED (exit 1" in log.read_text() and "PRE-FLIGHT FAILED" in log.read_text()
    assert not list(out.glob("*.csv"))

    monkeypatch.setattr(fastpref.benchmark, "run_bench", lambda cfg: [])
    monkeypatch.setattr(suite, "PREFLIGHT_TESTS", (str(passing),))
    assert suite.main([*base, "--check-only"]) == 0
    assert "pre-flight: passed (exit 0" in capsys.readouterr().out

    hanging = tmp_path / "test_hanging_kernel.py"
    hanging.write_text("import time\n\ndef test_kernel():\n    time.sleep(120)\n")
    assert not suite.run_preflight((str(hanging),), timeout_s=4)
    assert "pre-flight: FAILED (stopped after 4 s" in capsys.readouterr().out


def test_gpu_suite_stops_at_once_when_fastpref_is_not_installed():
    """A Python without fastpref installed (here: no site-packages at all) gets the install command, exit 2,
    before anything is imported or timed."""
    out = subprocess.run([sys.executable, "-S", str(ROOT / "bench" / "gpu_suite.py"), "--dry"], capture_output=True,
                         text=True, cwd=ROOT / "bench", timeout=60)
    assert out.returncode == 2
    assert "fastpref is not installed" in out.stderr and "--no-build-isolation --no-index -e ." in out.stderr


def _readme_setup_commands() -> list[str]:
    """The commands of the README's set-up block (the first ```bash block of "## Set up"), comments stripped."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Set up"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_setup_is_two_complete_commands():
    """Two commands, each complete from a fresh clone: one installs and runs the main job (``fastpref bench``),
    one installs and runs the test suite; torch's CPU build is a footnote, not a step."""
    commands = _readme_setup_commands()
    assert len(commands) == 2, commands
    bench, tests = commands
    assert bench.startswith("pip install -e ") and bench.endswith("&& fastpref bench"), bench
    assert tests.startswith("pip install -e \".[dev]\" && ") and "python -m pytest" in tests, tests
    assert not any(c.startswith("pip install torch") for c in commands)


def test_ci_runs_the_readme_test_command_verbatim():
    """.ci/run runs the README's test command as written (in a subshell, so that `set -e` stops on a failure
    inside its `&&` list), not a variant of it."""
    test_command = next(c for c in _readme_setup_commands() if "pytest" in c)
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert f"({test_command})" in lines, (test_command, lines)


def test_bench_cli_liger_eager_on_the_cpu_compiled_on_cuda():
    """The CPU default runs Liger eager (its compile is an opt-in flag there); both regimes everywhere; CUDA keeps
    Liger's torch.compile (the GPU suite's semantics)."""
    import argparse

    from fastpref.benchmark import add_bench_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    cpu = config_from_args(parser.parse_args(["--device", "cpu"]))
    assert list(cpu.regimes) == ["uniform", "peaked"] and not cpu.liger_compiled and cpu.repeats == 3 and cpu.check
    assert [s.name for s in cpu.shapes] == ["cpu"]
    assert config_from_args(parser.parse_args(["--device", "cpu", "--liger-compile"])).liger_compiled
    assert not config_from_args(parser.parse_args(["--device", "cpu", "--dry"])).liger_compiled
    with pytest.raises(SystemExit):
        parser.parse_args(["--liger-compile", "--liger-eager"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA defaults (CPU twin: the test above)")
def test_bench_cli_cuda_defaults_unchanged():
    import argparse

    from fastpref.benchmark import BENCH_SHAPES, REGIMES, add_bench_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--device", "cuda"]))
    assert tuple(cfg.regimes) == REGIMES and cfg.liger_compiled and [s.name for s in cfg.shapes] == list(BENCH_SHAPES)


def test_progress_bar_counts_every_run(monkeypatch):
    """The bar ticks for the float64 truth, each checked run and each timed run, and ends full: the timing, most
    of a CPU run, is not a silent stretch."""
    from fastpref.benchmark import BenchConfig, harness, run_bench
    from fastpref.benchmark.workload import SHAPES

    bars = _fake_progress(monkeypatch, harness)
    run_bench(BenchConfig(shapes=[SHAPES["tiny"]], regimes=["uniform"], impls=["fastpref-fast", "reference"],
                          tasks=["step", "logps"], repeats=2))
    (bar,) = bars
    assert bar.total == 1 + 4 * (1 + 2) and bar.n == bar.total  # truth + 4 (impl, task) x (check + 2 timed)


def test_harness_times_every_device_with_one_code_path():
    """The harness differs between devices only by its clock: with a clock that records its marks, the fast
    mode's step is timed from fresh graphs (one forward, one backward each) like every other implementation."""
    from fastpref.benchmark import BenchConfig, Clock, run_bench
    from fastpref.benchmark.workload import SHAPES

    class RecordingClock(Clock):
        def __init__(self):
            super().__init__(torch.device("cpu"))
            self.marks = 0

        def mark(self):
            self.marks += 1
            return super().mark()

    clock = RecordingClock()
    rows = run_bench(BenchConfig(shapes=[SHAPES["tiny"]], regimes=["uniform"], impls=["fastpref-fast", "reference"],
                                 tasks=["step"], repeats=2, check=False, clock=clock, progress=False))
    assert all(r.status == "ok" and r.time_ms > 0 and r.bwd_ms > 0 for r in rows), rows
    assert clock.marks == 2 * 2 * 3  # 2 rounds x 2 implementations x (before, between, after)


def test_check_only_at_full_size_checks():
    """``measure=False`` without a subset: the float64 check still runs on the workload itself (errors recorded,
    not NaN), and no timing or memory run happens."""
    from fastpref.benchmark import BenchConfig, run_bench
    from fastpref.benchmark.workload import SHAPES

    rows = run_bench(BenchConfig(shapes=[SHAPES["tiny"]], regimes=["uniform"], impls=["fastpref-fast", "reference"],
                                 tasks=["step"], check=True, measure=False, progress=False))
    assert rows and all(r.status == "ok" for r in rows), rows
    assert all(r.max_err == r.max_err and r.max_err < 1e-2 for r in rows), [r.max_err for r in rows]
    assert all(math.isnan(r.time_ms) and "subset" not in r.note for r in rows), rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records CUDA events (CPU twin: the harness tests above)")
def test_cuda_clock_records_on_the_workloads_device():
    from fastpref.benchmark import Clock

    device = torch.device("cuda", torch.cuda.device_count() - 1)
    clock = Clock(device)
    start = clock.mark()
    torch.ones(1 << 20, device=device).sum()
    end = clock.mark()
    clock.finish()
    assert clock.seconds(start, end) > 0


# 2 pairs x 128 tokens, tiny H, V = 32000: the logits (384 scored x 32000) dominate every other tensor.
MEMORY_SHAPE = Shape("logits-dominated", 2, 128, 32, 32000)


@pytest.fixture(scope="module")
def memory_workload():
    return make_workload(MEMORY_SHAPE, "peaked", dtype=torch.bfloat16)


def _step_peak(impl, w) -> tuple[int, int]:
    w.zero_grad()

    def run():
        impl.step(w).loss.backward()

    _, peak, largest = measure_peak(run, torch.device("cpu"))
    w.zero_grad()
    return peak, largest


@pytest.fixture(scope="module")
def reference_peak(memory_workload):
    return _step_peak(ReferenceImpl(), memory_workload)[0]


@pytest.mark.parametrize("mode", ["auto", "fast", "lean"])
def test_dpo_step_peak_at_most_half_the_reference(memory_workload, reference_peak, mode):
    """The CPU target's memory half: fastpref's whole DPO step (policy fwd+bwd, reference forward, loss; gradients
    included) peaks at <= 0.5 x the materialised reference's tracked bytes."""
    peak, _ = _step_peak(FastprefImpl(mode), memory_workload)
    assert peak <= 0.5 * reference_peak, f"{mode}: {peak / 2**20:.1f} MiB vs reference {reference_peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("mode", ["lean", "fast-one-pair-budget"])
def test_no_allocation_of_tokens_by_vocab(memory_workload, mode):
    """Lean mode, and fast mode under a budget of one pair's logits, never allocate the [scored tokens, V] logits
    (not even in bf16); the reference does (as fp32)."""
    w = memory_workload
    logits_bytes = w.n_scored * MEMORY_SHAPE.vocab * 2  # bf16: the smallest the logits could be held in
    if mode == "lean":
        impl = FastprefImpl("lean")
        bound = logits_bytes // 2
    else:
        budget = (w.n_scored // MEMORY_SHAPE.pairs) * MEMORY_SHAPE.vocab * 2
        impl = FastprefImpl("fast", memory_budget=budget)
        bound = budget
    _, largest = _step_peak(impl, w)
    assert largest <= bound < logits_bytes, f"{mode}: largest allocation {largest} B, bound {bound} B"
    _, ref_largest = _step_peak(ReferenceImpl(), w)
    assert ref_largest >= MEMORY_SHAPE.batch * MEMORY_SHAPE.seq_len * MEMORY_SHAPE.vocab * 2


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the fused rows need triton (interpreter)")
def test_a_fused_row_that_falls_back_says_so(monkeypatch):
    """A forced ``-fused`` row whose kernels cannot run on the device (here: ``linear_fold`` raises one of
    ``gemm_path.fused_errors()``) is marked ``fallback: cublas (<reason>)``, not timed silently as fused; the
    cublas row beside it is not marked."""
    from fastpref.kernels import fused_gemm
    from triton.runtime.errors import OutOfResources

    from fastpref.benchmark import BenchConfig, run_bench
    from fastpref.ops import gemm_path

    def out_of_resources(*args, **kwargs):
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(fused_gemm, "linear_fold", out_of_resources)
    monkeypatch.setattr(gemm_path, "_UNUSABLE", {})
    shape = Shape("tiny-fallback", 1, 16, 32, 200)
    with pytest.warns(RuntimeWarning, match="fused GEMM kernels cannot run"):
        rows = run_bench(BenchConfig(shapes=[shape], regimes=["uniform"], backend="triton", tasks=["step", "logps"],
                                     impls=["fastpref-fast-cublas", "fastpref-fast-fused"], repeats=1,
                                     check=False, progress=False))
    by = {(r.task, r.impl): r for r in rows}
    for key in [("step", "fastpref-fast-fused"), ("logps", "fastpref-fused")]:
        assert by[key].note.startswith("fallback: cublas (OutOfResources: "), by[key]
        assert by[key].status == "ok" and by[key].time_ms > 0
    assert "fallback" not in by[("step", "fastpref-fast-cublas")].note


def test_gemm_paths_table_never_reads_a_fallback_row_as_fused():
    """A forced fused row that fell back to cuBLAS timed cuBLAS: the GEMM-path table shows it as missing."""
    from fastpref.benchmark.harness import Row

    suite = _gpu_suite()

    def row(impl: str, ms: float, note: str = "") -> Row:
        r = Row(shape="s", regime="peaked", task="step", impl=impl, note=note)
        r.time_ms = ms
        return r

    rows = [row("fastpref-fast-cublas", 10.0), row("fastpref-fast", 10.5),
            row("fastpref-fast-fused", 10.1, "fallback: cublas (OutOfResources: shared memory)")]
    line = suite.gemm_paths_table(rows).splitlines()[1].split()
    assert line[3] == "10.00" and line[4] == "nan" and line[6] == "10.50", line
    rows[2].note = ""
    assert suite.gemm_paths_table(rows).splitlines()[1].split()[4] == "10.10"


# --- the other trainers' heads: fastpref bench --task kto|sft|grpo ---------------------------------------------------


def test_bench_task_flag_keeps_the_default_run_and_adds_the_trainers():
    """``--task dpo`` (the default) is today's run, DPO's step and forward-only rows; the other trainers' heads are
    opt-in row tasks of their own name, and ``--tasks`` still picks DPO's rows."""
    import argparse

    from fastpref.benchmark import add_bench_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)

    def tasks(*argv):
        return list(config_from_args(parser.parse_args(["--device", "cpu", *argv])).tasks)

    assert tasks() == ["step", "logps"]
    assert tasks("--task", "dpo", "kto") == ["step", "logps", "kto"]
    assert tasks("--task", "grpo", "sft", "--tasks", "step") == ["grpo", "sft"]
    assert tasks("--task", "dpo", "--tasks", "logps") == ["logps"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--task", "ppo"])


def test_bench_tasks_every_row_checked_against_float64(tmp_path, capsys):
    """``fastpref bench --task kto sft grpo --dry``: every implementation of each trainer's head runs, is timed and
    is checked against the float64 materialised reference (loss, log-probs where the row exposes them, dH, dW);
    fastpref's rows within 2x torch's error; Liger's loss and gradients match the same truth (it runs the same
    loss); Liger's cross-entropy kernel is CUDA only."""
    from fastpref.cli import main

    out_csv = tmp_path / "tasks.csv"
    rc = main(["bench", "--dry", "--device", "cpu", "--no-progress", "--regimes", "peaked", "--task", "kto", "sft",
               "grpo", "--csv", str(out_csv)])
    assert rc == 0
    _, rows = _read(out_csv)
    by = {(r["task"], r["impl"]): r for r in rows}
    expected = {"kto": ["fastpref-fast", "fastpref-lean", "reference", "trl", "liger"],
                "sft": ["fastpref-fast", "fastpref-lean", "fastpref-lce", "reference", "trl"],
                "grpo": ["fastpref-fast", "fastpref-lean", "reference", "trl", "liger"]}
    for task, impls in expected.items():
        for impl in impls:
            r = by[(task, impl)]
            assert r["status"] == "ok", r
            assert float(r["time_ms"]) > 0 and float(r["peak_bytes"]) > 0
            for key in ("err_loss", "err_dhidden", "err_dweight"):
                assert float(r[key]) < 0.05, (task, impl, key, r[key])
            if impl != "liger":  # Liger's losses return no per-sequence log-probs
                assert float(r["err_logps"]) < 0.05, (task, impl, r["err_logps"])
    assert by[("sft", "liger")]["status"] == "skipped" and "CUDA" in by[("sft", "liger")]["note"]
    assert "fallback" not in by[("grpo", "fastpref-fast")]["note"]  # its backward took the fast path
    assert not any(r["task"] in ("step", "logps") for r in rows)
    printed = capsys.readouterr().out
    assert "kto = policy fwd+bwd" in printed and "grpo = " in printed and "step = " not in printed


def test_task_truths_are_the_trainers_losses():
    """The float64 truths, independently: SFT's is torch's cross-entropy (mean over the scored tokens); GRPO's (dapo,
    β = 0, the old policy = the current one, so every ratio is 1) is −Σ A_b·|completion_b| / n, its gradient that
    of −Σ A_b·log-probs / n; KTO's loss is 1 − σ(β(ρ − z₀)) for a desirable sequence, 1 − σ(β(z₀ − ρ)) else."""
    import torch.nn.functional as F

    from fastpref import reference
    from fastpref.benchmark.tasks import TASK_SPECS, task_truth
    from fastpref.benchmark.workload import BETA, KTO_KL

    w = make_workload(Shape("t", 2, 9, 8, 37), "peaked", dtype=torch.float32)
    h, W = w.hidden.detach().double(), w.weight.detach().double()
    z = h @ W.T

    sft = task_truth(TASK_SPECS["sft"], w)
    torch.testing.assert_close(sft.loss, F.cross_entropy(z.reshape(-1, 37), w.labels.reshape(-1)))

    grpo = task_truth(TASK_SPECS["grpo"], w)
    A = w.advantages.double()
    torch.testing.assert_close(grpo.loss, -(A * w.mask.sum(-1)).sum() / w.n_scored)
    hh = h.clone().requires_grad_()
    tok = reference.token_logps(hh, W, w.labels)
    (-(A[:, None] * tok).sum() / w.n_scored).backward()
    torch.testing.assert_close(grpo.d_hidden, hh.grad)

    kto = task_truth(TASK_SPECS["kto"], w)
    rho = reference.sequence_logps(h, W, w.labels) - reference.sequence_logps(w.ref_hidden.double(), W, w.labels)
    sign = torch.where(w.desirable, 1.0, -1.0).double()
    torch.testing.assert_close(kto.loss, (1 - torch.sigmoid(BETA * sign * (rho - KTO_KL))).mean())


def test_progress_bar_counts_the_task_rows(monkeypatch):
    """With DPO's rows and a trainer's rows in one run, the bar counts each family's float64 truth and every run
    of both, and ends full."""
    from fastpref.benchmark import BenchConfig, harness, run_bench
    from fastpref.benchmark.workload import SHAPES

    bars = _fake_progress(monkeypatch, harness)
    rows = run_bench(BenchConfig(shapes=[SHAPES["tiny"]], regimes=["uniform"], impls=["fastpref-lean", "reference"],
                                 tasks=["step", "sft"], repeats=1))
    (bar,) = bars
    assert bar.total == 2 * (1 + 2 * (1 + 1)) and bar.n == bar.total  # per family: truth + 2 impls x (check + 1)
    assert [(r.task, r.impl) for r in rows] == [("step", "fastpref-lean"), ("step", "reference"),
                                                ("sft", "fastpref-lean"), ("sft", "reference")]


def _counted_step(impl, w):
    """``impl``'s step, forward and backward, and its matmul FLOPs as ``FlopCounterMode`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    w.zero_grad()
    with FlopCounterMode(display=False) as counter:
        out = impl.step(w)
        out.loss.backward()
    return out, counter.get_total_flops()


def test_grpo_fast_row_takes_the_fast_path_at_6nhv():
    """GRPO's fastpref-fast row is the TRL head told the task's loss before the call: its backward takes the fast
    path (the ``PredictedLoss`` counter) and its step counts 6·n·H·V matmul FLOPs (FlopCounterMode; one row group,
    so no in-place dW accumulation it would miss) against fastpref-lean's 8, each as its ``step_flops`` says;
    loss, per-token log-probs, dH and dW within 2x the materialised fp32 path's error of the float64 truth."""
    from collections import Counter

    from fastpref.benchmark.checks import ERR_ATOL, ERR_FACTOR, step_errors
    from fastpref.benchmark.tasks import TASK_SPECS, task_implementations, task_truth

    shape = Shape("grpo-flops", 2, 24, 16, 300)
    w = make_workload(shape, "peaked", dtype=torch.float32)
    impls = {i.name: i for i in task_implementations("grpo", ("fastpref-fast", "fastpref-lean", "reference"),
                                                     backend="torch")}
    truth = task_truth(TASK_SPECS["grpo"], w)
    unit = w.n_scored * shape.hidden * shape.vocab
    errors = {}
    for name, units in (("fastpref-fast", 6), ("fastpref-lean", 8), ("reference", None)):
        out, flops = _counted_step(impls[name], w)
        if units is not None:
            assert flops == units * unit == impls[name].step_flops(w), (name, flops / unit)
        errors[name] = step_errors(out, w, truth)
    assert impls["fastpref-fast"].paths == Counter(fast=1)
    assert impls["fastpref-fast"].fallback(w) is None
    for key, err in errors["fastpref-fast"].items():
        assert err <= ERR_FACTOR * errors["reference"][key] + ERR_ATOL, (key, err, errors["reference"][key])


@pytest.mark.parametrize("cause", ["memory_budget", "prediction"])
def test_grpo_fast_row_that_falls_back_says_so(cause, monkeypatch):
    """A fastpref-fast GRPO row whose backward did not take the fast path is not reported as fast: a memory budget
    below one row of logits (no fast pass: lean) or a predicted loss whose gradient is not the task's times a scalar
    (the prediction misses: recomputed) marks the row's note ``fallback: <path>``, and its FLOPs are the path's
    (lean 8; recomputed: the fast forward without the last group's dW, 4, then the recompute, 6; counted) — while
    its float64 check still passes (the fallback is exact)."""
    from fastpref.benchmark import BenchConfig, run_bench
    from fastpref.benchmark import tasks as tasks_mod
    from fastpref.losses.policy import PolicyStep

    made = []

    def make(spec, backend, compiled):
        if cause == "memory_budget":
            impl = tasks_mod.FastprefPolicyImpl(spec, backend, memory_budget=1)
        else:
            impl = tasks_mod.FastprefPolicyImpl(spec, backend)
            step = impl.policy_step
            # advantages A + 1: a loss whose gradient is no scalar multiple of the task's (A's are not all equal)
            impl.policy_step = lambda w: PolicyStep(step(w).cfg, w.mask, w.advantages + 1.0, step(w).norm)
        made.append(impl)
        return impl

    monkeypatch.setitem(tasks_mod.TASK_IMPLS, "grpo", {"fastpref-fast": make,
                                                       "reference": tasks_mod.TASK_IMPLS["grpo"]["reference"]})
    shape = Shape("grpo-fallback", 1, 16, 32, 200)
    with pytest.warns(RuntimeWarning, match="instead of fast mode"):
        rows = run_bench(BenchConfig(shapes=[shape], regimes=["peaked"], tasks=["grpo"], dtype=torch.float32,
                                     repeats=1, progress=False))
    fast = next(r for r in rows if r.impl == "fastpref-fast")
    path, units = {"memory_budget": ("lean", 8), "prediction": ("recomputed", 10)}[cause]
    assert fast.note.startswith(f"fallback: {path} ("), fast.note
    assert fast.note.count("fallback") == 1, fast.note
    assert fast.status == "ok" and fast.max_err < 1e-5, fast
    assert fast.flops == units * fast.n_scored * shape.hidden * shape.vocab
    (impl,) = made  # its FLOPs counted on one more step: what step_flops says for that path
    w = make_workload(shape, "peaked", dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="instead of fast mode"):
        _, flops = _counted_step(impl, w)
    assert flops == impl.step_flops(w) == fast.flops
