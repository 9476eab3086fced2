"""``fastpref bench``: the DPO step (``--task``: also the KTO, SFT and GRPO heads) side by side with the
materialised reference and the peers."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..ops.backend import resolve_backend
from ..ops.gemm_path import requested
from ..utils.validation import data_device
from .cost_model import cost_table, task_cost_table
from .harness import BenchConfig, Row, run_bench
from .peers import GEMM_IMPLS, IMPL_NAMES
from .report import format_table, write_csv, write_plot
from .tasks import TASK_IMPL_NAMES
from .workload import BENCH_SHAPES, REGIMES, SHAPES, TASKS, parse_shape

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _device(text: str) -> str:
    """``cpu`` or ``cuda[:i]`` (an available one): the benchmark runs real work on real tensors."""
    try:
        data_device(text, cpu_or_cuda=True)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The options shared by ``fastpref bench`` and ``bench/gpu_suite.py``."""
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=None, metavar="SHAPE",
                   help=f"shape names ({', '.join(SHAPES)}) or PAIRSxTxHxV; default: 'cpu' on the CPU, the benchmark "
                        "shapes on CUDA")
    p.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES),
                   help="logit regimes (docs/benchmarks.md: always report both; one halves a run's time)")
    p.add_argument("--task", nargs="+", choices=TASKS, default=["dpo"], dest="trainer_tasks", metavar="TASK",
                   help="the trainers' heads to time, side by side with TRL 1.16's chunked head and Liger 0.8.5's "
                        f"loss ({', '.join(TASKS)}; default dpo: the DPO step and its forward-only log-probs, as "
                        "--tasks picks). kto, sft, grpo are opt-in: each adds about as much time as dpo")
    p.add_argument("--impls", nargs="+", choices=list(dict.fromkeys([*IMPL_NAMES, *GEMM_IMPLS, *TASK_IMPL_NAMES])),
                   default=None,
                   help="implementations (the GEMM_IMPLS force one GEMM path; the GPU suite adds them; on the CPU the "
                        "'-fused' kernels run only with FASTPREF_BACKEND=triton TRITON_INTERPRET=1, in the Triton "
                        "interpreter: minutes per row at the 'cpu' shape, about 2 CPU-minutes for the forward-only "
                        "one)")
    p.add_argument("--tasks", nargs="+", choices=("step", "logps"), default=["step", "logps"],
                   help="with --task dpo: step: full DPO step; logps: forward-only policy log-probs")
    p.add_argument("--device", type=_device, default=None, help="cpu | cuda[:i]; default: cuda when available")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="input dtype (the benchmark: bf16)")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed runs per measurement (median); default 3")
    p.add_argument("--no-check", action="store_true", help="skip the float64 check")
    liger = p.add_mutually_exclusive_group()
    liger.add_argument("--liger-compile", action="store_true",
                       help="run Liger as its default does, under torch.compile (the default on CUDA; on the CPU its "
                            "first compile took 107 s on a busy 2-core machine, cached after)")
    liger.add_argument("--liger-eager", action="store_true",
                       help="run Liger with compiled=False (the default on the CPU, labelled '(eager)')")
    p.add_argument("--csv", metavar="PATH", help="write every row to this CSV")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of time and peak memory")
    p.add_argument("--dry", action="store_true", help="tiny sizes, one timed run: checks that everything runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cost-model", action="store_true",
                   help="print the byte-and-FLOP model (predicted H100 times) for the shapes and exit")
    p.add_argument("--seed", type=int, default=0)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if args.dry:
        shapes = args.shapes or [SHAPES["tiny"]]
        repeats = args.repeats or 1
    else:
        shapes = args.shapes or ([SHAPES[n] for n in BENCH_SHAPES] if cuda else [SHAPES["cpu"]])
        repeats = args.repeats or 3
    # Liger eager on the CPU by default: its torch.compile there costs more than the rest of the run the first time
    # (about 2 minutes on a busy 2-core CPU). CUDA keeps Liger's default, compiled.
    liger_compiled = args.liger_compile or (cuda and not (args.liger_eager or args.dry))
    # --task dpo runs DPO's --tasks (step, logps); every other trainer's head is one row task of its own name
    tasks = [t for trainer in args.trainer_tasks for t in (args.tasks if trainer == "dpo" else [trainer])]
    impls = args.impls or list(dict.fromkeys([*IMPL_NAMES, *TASK_IMPL_NAMES]))
    return BenchConfig(
        shapes=shapes, regimes=args.regimes, impls=impls, tasks=list(dict.fromkeys(tasks)), device=device,
        dtype=_DTYPES[args.dtype], repeats=max(1, repeats), warmup=1, liger_compiled=liger_compiled,
        check=not args.no_check, progress=not args.no_progress, seed=args.seed,
    )


def check_output_path(flag: str, path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """Refuse, before any work, an output the run could not write at its end: an existing directory where a
    file is written (or the reverse), a path under a file, or one that is not writable. Missing directories
    are fine (the writers create them)."""
    p = Path(path)
    what = "a directory" if directory else "a file"
    if not directory and str(path).endswith(("/", os.sep)):
        raise ValueError(f"{flag}: expected the path of a file to write, got {str(path)!r} (a directory name)")
    if p.exists():
        if p.is_dir() != directory:
            raise ValueError(f"{flag}: expected {what} to write, got {str(path)!r}, which is "
                             f"{'not a directory' if directory else 'an existing directory'}")
        if not os.access(p, os.W_OK):
            raise ValueError(f"{flag}: {str(path)!r} is not writable")
        return
    parent = next(a for a in p.absolute().parents if a.exists())
    if not parent.is_dir():
        raise ValueError(f"{flag}: cannot create {str(path)!r}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot create {str(path)!r}: the directory {parent} is not writable")


def check_outputs(csv: str | None, plot: str | None) -> None:
    """``--csv`` and ``--plot`` (see ``check_output_path``), and not one file for both."""
    for flag, path in (("--csv", csv), ("--plot", plot)):
        if path is not None:
            check_output_path(flag, path)
    if csv is not None and plot is not None and Path(csv).absolute() == Path(plot).absolute():
        raise ValueError(f"--plot: expected another file than --csv, got {plot!r} for both")
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        print("--plot: matplotlib is not installed (pip install 'fastpref[bench]'); no plot will be written",
              file=sys.stderr)


def check_environment(device: str | None) -> None:
    """``$FASTPREF_GEMM`` and ``$FASTPREF_BACKEND``, read by every fastpref row: a bad value would make each of
    them an error row after the whole run."""
    requested(None)
    resolve_backend(None, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))


def fastpref_failures(rows: list[Row]) -> list[Row]:
    """fastpref's rows outside their error bound (FAIL) or that raised (error): the run's exit status is 1."""
    return [r for r in rows if r.impl.startswith("fastpref") and r.status in ("FAIL", "error")]


def _tp_main(args: argparse.Namespace) -> int:
    """``--tp N``: the DPO step on a head sharded over N gloo processes beside one process (fastpref only)."""
    from .tp import format_tp, run_tp

    if (args.device or "cpu") != "cpu":
        print("fastpref bench: error: --tp runs on the CPU over gloo; got --device " + args.device, file=sys.stderr)
        return 2
    shapes = args.shapes or [SHAPES["tiny" if args.dry else "cpu"]]
    for shape in shapes:
        for regime in args.regimes:
            rows = run_tp(shape, regime, tp=args.tp, dtype=_DTYPES[args.dtype], repeats=args.repeats or
                          (1 if args.dry else 3), seed=args.seed)
            print(format_tp(rows, shape, regime, _DTYPES[args.dtype]) + "\n")
    return 0


def _bench_main(args: argparse.Namespace) -> int:
    if args.cost_model:
        for task in args.trainer_tasks:
            print(cost_table(args.shapes) if task == "dpo" else task_cost_table(task, args.shapes))
        return 0
    if getattr(args, "tp", None):
        return _tp_main(args)
    try:
        check_outputs(args.csv, args.plot)
        check_environment(args.device)
    except ValueError as e:
        print(f"fastpref bench: error: {e}", file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    t0 = time.perf_counter()
    rows = run_bench(cfg)
    print(format_table(rows))
    print(f"\n{len(rows)} rows in {time.perf_counter() - t0:.1f} s")
    if args.csv:
        print(f"CSV: {write_csv(rows, args.csv)}")
    if args.plot:
        path = write_plot(rows, args.plot)
        if path is not None:
            print(f"plot: {path}")
    failed = fastpref_failures(rows)
    if failed:
        print(f"\n{len(failed)} fastpref row(s) failed their check or errored: exit 1", file=sys.stderr)
    return 1 if failed else 0  # only fastpref's rows are held to a bound: a peer's FAIL or error is a result


def add_bench_parser(subparsers: Any) -> None:
    """Add ``bench`` to the ``fastpref`` command's sub-commands (``fastpref/cli.py``)."""
    p = subparsers.add_parser(
        "bench", help="time and measure the DPO step vs the materialised reference and the peers",
        description=(__doc__ or "").strip() + " Each implementation is checked against float64 first; prints a "
                    "table of time, peak memory and error.",
    )
    add_bench_arguments(p)
    p.add_argument("--tp", type=_positive_int, default=None, metavar="N",
                   help="tensor parallel: the DPO step with the head sharded over the vocabulary on N gloo processes "
                        "(CPU), per-rank time and memory beside one process (fastpref only; bench/NOTES.md)")
    p.set_defaults(func=_bench_main)


__all__ = ["add_bench_arguments", "add_bench_parser", "check_environment", "check_output_path", "check_outputs",
           "config_from_args", "fastpref_failures"]
