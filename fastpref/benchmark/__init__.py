"""``fastpref bench``: the benchmark workload (``docs/benchmarks.md``) side by side with the materialised
reference and the peers.

One DPO step on the LM head (policy log-probs forward + backward, reference log-probs forward under no-grad,
sigmoid loss) and the forward-only log-probs, for every implementation that can run here, on the same tensors
in one process. Each is checked against a float64 run of the reference, then timed, and its peak memory
measured. ``--task kto sft grpo`` adds the other trainers' heads (``tasks``: their losses, truths and rows).
Layout: ``workload`` (shapes, regimes, tensors), ``peers`` (the implementations), ``checks`` (float64
truth and errors), ``harness`` (memory and timing, the runner), ``cost_model`` (the byte-and-FLOP model of
``bench/NOTES.md``), ``report`` (table, CSV, plot), ``cli``. ``bench/gpu_suite.py`` and
``bench/test_bench_ops.py`` reuse them.
"""

from .checks import ERROR_KEYS, Truth, float64_truth, rel_err, step_errors
from .cli import add_bench_arguments, add_bench_parser, config_from_args
from .cost_model import COST_PATHS, CostEstimate, cost_model, cost_table
from .harness import (
    CSV_COLUMNS,
    BenchConfig,
    Clock,
    Row,
    finalize_block,
    matmul_rate,
    measure_peak,
    run_bench,
    time_call,
    time_split,
)
from .peers import (
    CHECK_ONLY_IMPLS,
    GEMM_IMPLS,
    IMPL_NAMES,
    FastprefImpl,
    Impl,
    ReferenceImpl,
    StepOutput,
    dpo_loss,
    implementations,
)
from .report import format_table, read_csv, write_csv, write_plot
from .tasks import TASK_IMPLS, TASK_SPECS, TaskSpec, task_implementations, task_truth
from .workload import BENCH_SHAPES, REGIMES, SHAPES, TASKS, Shape, Workload, make_workload, parse_shape

__all__ = [
    "BENCH_SHAPES",
    "CHECK_ONLY_IMPLS",
    "COST_PATHS",
    "CSV_COLUMNS",
    "ERROR_KEYS",
    "GEMM_IMPLS",
    "IMPL_NAMES",
    "REGIMES",
    "SHAPES",
    "TASKS",
    "TASK_IMPLS",
    "TASK_SPECS",
    "BenchConfig",
    "Clock",
    "CostEstimate",
    "FastprefImpl",
    "Impl",
    "ReferenceImpl",
    "Row",
    "Shape",
    "StepOutput",
    "TaskSpec",
    "Truth",
    "Workload",
    "add_bench_arguments",
    "add_bench_parser",
    "config_from_args",
    "cost_model",
    "cost_table",
    "dpo_loss",
    "finalize_block",
    "float64_truth",
    "format_table",
    "implementations",
    "make_workload",
    "matmul_rate",
    "measure_peak",
    "parse_shape",
    "read_csv",
    "rel_err",
    "run_bench",
    "step_errors",
    "task_implementations",
    "task_truth",
    "time_call",
    "time_split",
    "write_csv",
    "write_plot",
]
