"""``fastpref bench --tp N``: the DPO step on a vocabulary-sharded head (tensor parallel over N gloo processes on
the CPU, one thread each) beside the same step on one process (one thread).

Every rank builds the same workload (``make_workload``, same seed), holds rows ``[r·⌈V/N⌉, ...)`` of the head as a
``Shard(0)`` DTensor (``fastpref.shard_head``: no gather, no copy) and runs ``DPOLoss`` forward + backward. Reported
per rank: the median time of the step (between barriers), the peak memory and the largest single allocation of
the tensors the step creates (``fastpref.utils.memory``; the head itself is an input), and the loss's difference
from the one-process run. On 2 CPU cores the times measure gloo and the host, not an NVLink GPU: the predicted
H100 cost of the collectives is in ``bench/NOTES.md``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from .workload import BETA, Shape, make_workload


@dataclass
class TpRow:
    tp: int
    rank: int
    mode: str
    seconds: float
    peak_bytes: int
    largest_bytes: int
    loss: float
    head_bytes: int  # this rank's rows of the head


def _step(w, weight, mode: str):
    import fastpref

    loss_fn = fastpref.DPOLoss(beta=BETA, mode=mode)
    w.hidden.grad = None
    out = loss_fn(w.hidden, weight, w.labels, ref_hidden=w.ref_hidden)
    out.loss.backward()
    return out


def _measure(w, weight, mode: str, repeats: int, barrier) -> tuple[float, int, int, float, str]:
    from ..utils.memory import peak_bytes

    out, peak, largest = peak_bytes(lambda: _step(w, weight, mode), w.device)
    times = []
    for _ in range(repeats):
        barrier()
        t0 = time.perf_counter()
        _step(w, weight, mode)
        barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak, largest or 0, float(out.loss.detach()), out.mode


def _worker(rank: int, world: int, port: int, shape: Shape, regime: str, dtype: torch.dtype, mode: str,
            repeats: int, seed: int, out_dir: str) -> None:
    import torch.distributed as dist

    from ..ops.vocab_shard import shard_head

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    w = make_workload(shape, regime, dtype=dtype, seed=seed)
    rows = -(-shape.vocab // world)
    start = rank * rows
    local = w.weight.detach()[start:start + rows].clone().requires_grad_(True)
    w.weight = None  # only the local rows stay alive
    weight = shard_head(local, vocab_start=start, vocab_size=shape.vocab)
    sec, peak, largest, loss, ran = _measure(w, weight, mode, repeats, dist.barrier)
    row = TpRow(world, rank, ran, sec, peak, largest, loss, local.numel() * local.element_size())
    torch.save(row.__dict__, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tp(shape: Shape, regime: str, *, tp: int, dtype: torch.dtype, mode: str = "auto", repeats: int = 3,
           seed: int = 0) -> list[TpRow]:
    """The one-process row (tp 1) and one row per rank of the ``tp``-process run."""
    import torch.multiprocessing as mp

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w = make_workload(shape, regime, dtype=dtype, seed=seed)
        sec, peak, largest, loss, ran = _measure(w, w.weight, mode, repeats, lambda: None)
        rows = [TpRow(1, 0, ran, sec, peak, largest, loss, w.weight.numel() * w.weight.element_size())]
        del w
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(tp, _free_port(), shape, regime, dtype, mode, repeats, seed, out),
                           nprocs=tp, join=True, start_method="spawn")
        rows += [TpRow(**torch.load(os.path.join(out, f"rank{r}.pt"))) for r in range(tp)]
    return rows


def format_tp(rows: list[TpRow], shape: Shape, regime: str, dtype: torch.dtype) -> str:
    base = rows[0]
    lines = [f"{shape.name} ({shape.pairs} pairs x {shape.seq_len} tokens, H {shape.hidden}, V {shape.vocab}), "
             f"{regime}, {str(dtype).removeprefix('torch.')}; CPU, gloo, 1 thread per process",
             f"{'tp':>3} {'rank':>4} {'mode':>5} {'time s':>8} {'peak MiB':>9} {'largest MiB':>11} {'head MiB':>9} "
             f"{'loss':>12} {'|loss - tp1|':>12}"]
    for r in rows:
        lines.append(f"{r.tp:>3} {r.rank:>4} {r.mode:>5} {r.seconds:>8.3f} {r.peak_bytes / 2**20:>9.1f} "
                     f"{r.largest_bytes / 2**20:>11.2f} {r.head_bytes / 2**20:>9.1f} {r.loss:>12.6f} "
                     f"{abs(r.loss - base.loss):>12.2e}")
    return "\n".join(lines)


__all__ = ["TpRow", "format_tp", "run_tp"]
