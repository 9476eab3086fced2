"""Output: the human table, the CSV (GPU, versions and commit in every row) and a PNG plot."""

from __future__ import annotations

import csv
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from .harness import CSV_COLUMNS, Row


def _fmt(x: float, spec: str = ".1f", nan: str = "-") -> str:
    return nan if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _tflops(r: Row) -> str:
    if math.isnan(r.tflops):
        return "-"
    return f"{r.tflops:.3g} ({100 * r.frac_of_mm:.0f}%)"


TASK_LEGEND = {
    "step": "step = policy fwd+bwd + reference fwd + sigmoid DPO loss",
    "logps": "logps = forward-only policy log-probs",
    "kto": "kto = policy fwd+bwd + reference fwd + TRL's kto loss (z0 given), TRL's fields: entropy, mean logits",
    "sft": "sft = policy fwd+bwd, mean token NLL, TRL's fields: entropy, top-1 (fastpref-lce, reference, liger: "
           "the loss only)",
    "grpo": "grpo = policy fwd+bwd, TRL's default loss (dapo, beta 0), TRL's field: entropy (reference, liger: none)",
}


def format_table(rows: Sequence[Row]) -> str:
    """The human table: one block per (shape, regime), rows per task and implementation."""
    lines: list[str] = []
    blocks: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        blocks.setdefault((r.shape, r.regime), []).append(r)
    header = (f"{'task':<6} {'impl':<22} {'time ms':>9} {'fwd':>8} {'bwd':>8} {'x ref':>6} {'peak MiB':>9} "
              f"{'x ref':>6} {'largest':>8} {'max err':>9} {'x floor':>7} {'TFLOP/s (mm%)':>14}  note")
    for (shape, regime), block in blocks.items():
        r0 = block[0]
        lines.append("")
        lines.append(f"{shape} ({r0.pairs} pairs x {r0.seq_len} tokens, H {r0.hidden}, V {r0.vocab}; "
                     f"{r0.n_scored} scored) | {regime} (mean token log-prob {_fmt(r0.mean_token_logp, '.2f')}) | "
                     f"{r0.dtype} on {r0.device} | matmul {_fmt(r0.mm_tflops * 1e3, '.0f')} GFLOP/s | "
                     f"load {_fmt(r0.loadavg, '.1f')}")
        # the benchmark itself keeps torch's threads busy: only load beyond them is other work
        if r0.device == "cpu" and r0.loadavg > torch.get_num_threads() + 0.5:
            lines.append("  (the CPU was busy with other work: timings of many-small-op paths suffer most; rerun "
                         "on a quiet machine before comparing)")
        lines.append(header)
        lines.append("-" * len(header))
        for r in block:
            if r.status in ("skipped", "error"):
                lines.append(f"{r.task:<6} {r.impl:<22} {r.status:>9}  {r.note}")
                continue
            note = r.note if r.status == "ok" else f"{r.status}: {r.note}"
            lines.append(
                f"{r.task:<6} {r.impl:<22} {_fmt(r.time_ms):>9} {_fmt(r.fwd_ms):>8} {_fmt(r.bwd_ms):>8} "
                f"{_fmt(r.time_vs_ref, '.2f'):>6} {_fmt(r.peak_bytes / 2**20):>9} {_fmt(r.peak_vs_ref, '.2f'):>6} "
                f"{_fmt(r.largest_bytes / 2**20):>8} {_fmt(r.max_err, '.2e'):>9} {_fmt(r.x_floor, '.2f'):>7} "
                f"{_tflops(r):>14}  {note}")
    meta = rows[0] if rows else None
    if meta is not None:
        lines.append("")
        lines.append(f"hardware: {meta.hardware} | {meta.versions} | commit {meta.commit or '?'}")
        tasks = dict.fromkeys(r.task for r in rows)
        lines.append("; ".join(TASK_LEGEND[t] for t in tasks if t in TASK_LEGEND) + ". "
                     "peak = tracked bytes made inside the call (grads included, inputs not); largest = biggest "
                     "single allocation; max err = worst norm-wise relative error vs float64 (loss, logps, dH, dW); "
                     "x floor = time / (matmul FLOPs of the floor at the measured matmul rate); TFLOP/s = the "
                     "implementation's own matmul FLOPs / time, and as a share of the measured matmul rate.")
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(r).items()})
    return path


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    with Path(path).open() as f:
        return list(csv.DictReader(f))


def write_plot(rows: Sequence[Row], path: str | os.PathLike[str], title: str = "fastpref bench") -> Path | None:
    """Bar charts of time and peak memory per implementation, one column of panels per (shape, regime)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install 'fastpref[bench]'); no plot written", file=sys.stderr)
        return None
    ok = [r for r in rows if r.status in ("ok", "FAIL")]
    blocks = list(dict.fromkeys((r.shape, r.regime) for r in ok))
    if not blocks:
        return None
    fig, axes = plt.subplots(2, len(blocks), figsize=(3.6 * len(blocks) + 1, 6.5), squeeze=False)
    for j, (shape, regime) in enumerate(blocks):
        block = [r for r in ok if (r.shape, r.regime) == (shape, regime)]
        names = [f"{r.impl}\n{r.task}" for r in block]
        colors = ["tab:green" if r.impl.startswith("fastpref") else "tab:gray" if r.impl == "reference"
                  else "tab:blue" for r in block]
        axes[0][j].bar(names, [r.time_ms for r in block], color=colors)
        axes[0][j].set_title(f"{shape} / {regime}", fontsize=9)
        axes[1][j].bar(names, [r.peak_bytes / 2**20 for r in block], color=colors)
        for ax in (axes[0][j], axes[1][j]):
            ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    axes[0][0].set_ylabel("time (ms, median)")
    axes[1][0].set_ylabel("peak memory (MiB above inputs)")
    fig.suptitle(f"{title} — {ok[0].hardware}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["format_table", "read_csv", "write_csv", "write_plot"]
