"""Distributed training on the CPU (gloo, 2 processes of 1 thread each): every engine agrees with one process
and with stock TRL.

- module level (workers spawned with ``torch.multiprocessing``): the fused preference forward under
  ``DistributedDataParallel``, under FSDP2 (``fully_shard``, fast and lean modes) and inside a plain DeepSpeed
  ZeRO-3 engine, each rank holding half of the pairs, gives the gradients of one process on the whole batch;
- trainer level, launched as users launch them (``tests/dist_train.py``, configs in ``tests/dist_configs/``):
  ``FastPrefDPOTrainer(use_fastpref=True)`` trains three steps under DDP (``torchrun``), DDP over a two-node
  ``torchrun`` on 127.0.0.1, FSDP2 (``accelerate launch`` with an FSDP2 config), DeepSpeed ZeRO-3
  (``TrainingArguments(deepspeed=...)`` under ``torchrun``, and ``accelerate launch`` with a ZeRO-3 config; the
  reference model a ZeRO-3 engine too), and ``FastPrefTrainer`` under ZeRO-3; every logged metric of every step
  equals, to fp32 rounding, stock trl 1.16 ``DPOTrainer`` in one process and the fused trainer in one process;
- online, one launch per engine (DDP, ZeRO-3 with the head partitioned between steps, FSDP2) training stock TRL
  and ``FastPref{GRPO,RLOO}Trainer(use_fastpref=True)`` one after the other: every logged metric within 1e-5 of
  stock TRL under the same launch, every rank's head gradient formed in the forward.

CPU-only shims (documented in tests/dist_train.py and the README's "Many GPUs"): accelerate 1.16 applies its
FSDP plugin only on accelerator device types, so the FSDP2 run turns accelerate's ``MULTI_CPU`` state into
``FSDP`` (``--cpu-fsdp-shim``); ``TrainingArguments(deepspeed=...)`` gets no backend on a machine without an
accelerator, so that run builds accelerate's DeepSpeed state over gloo first and lets the arguments reuse it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, args: tuple, timeout: float = 240.0) -> None:
    """Run ``fn(rank, *args)`` in WORLD processes; fail (not hang) if they do not finish in ``timeout`` s."""
    ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers did not finish within {timeout} s")


def _exit_worker() -> None:
    """Leave a worker whose results are saved without running interpreter/C++ teardown: gloo's destructors can
    still race its background threads after a barrier and abort the process ("terminate called without an
    active exception", seen in about one run in ten on 2 busy cores), which would fail an otherwise passing
    test. Exit code 0 is what ``torch.multiprocessing`` checks."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _env(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------ module level: DDP, FSDP2
def _module_case():
    """Model (patched), loss, a padded batch of 4 pairs and reference sums — identical in every process."""
    from fastpref.integrations.collator import PreferenceCollator
    from fastpref.integrations.fused_head import add_fused_lm_head
    from fastpref.integrations.hf import build_preference_loss
    from fastpref.testing.toy import toy_llama, toy_preference_records, toy_tokenizer

    tok = toy_tokenizer()
    model = add_fused_lm_head(toy_llama(tok, hidden_size=32, num_layers=2, seed=3))
    batch = PreferenceCollator(tok)(toy_preference_records(4, seed=7))
    ref = torch.linspace(-40.0, -10.0, 8)
    return model, build_preference_loss(model, "sigmoid", beta=0.5), batch, ref


def _shard(batch: dict, ref: torch.Tensor, rank: int, world: int) -> tuple[dict, torch.Tensor]:
    """Rank ``rank``'s pairs: rows i and i + P of its pair range (the pair layout is kept per rank)."""
    pairs = batch["input_ids"].shape[0] // 2
    per = pairs // world
    idx = list(range(rank * per, (rank + 1) * per))
    rows = torch.tensor(idx + [pairs + i for i in idx])
    return {k: v[rows] for k, v in batch.items() if isinstance(v, torch.Tensor)}, ref[rows]


def _loss(model, loss_fn, batch: dict, ref: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                preference_loss=loss_fn, ref_logps=ref)
    return out.loss


def _module_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    _env(rank, port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, loss_fn, batch, ref = _module_case()
        shard, ref_shard = _shard(batch, ref, rank, WORLD)
        ddp = DistributedDataParallel(model)
        _loss(ddp, loss_fn, shard, ref_shard).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters()}, os.path.join(out_dir, "ddp.pt"))

        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:  # pragma: no cover - torch < 2.6
            torch.save({"error": repr(e)}, os.path.join(out_dir, "fsdp.pt"))
            return
        from fastpref.integrations.hf import build_preference_loss

        results = {}
        for mode in ("fast", "lean"):  # gradients formed in the forward / recomputed in the backward
            model, _, batch, ref = _module_case()
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            _loss(model, build_preference_loss(model, "sigmoid", beta=0.5, mode=mode), shard, ref_shard).backward()
            # full_tensor() is a collective: every rank calls it.
            results[mode] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "fsdp.pt"))
        _zero3_module_grads(rank, shard, ref_shard, out_dir)
        # Every rank done with every collective before teardown: a peer that leaves while gloo still has work
        # in flight aborts the other ("terminate called without an active exception").
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    _exit_worker()


def _zero3_module_grads(rank: int, shard: dict, ref_shard: torch.Tensor, out_dir: str) -> None:
    """A plain DeepSpeed ZeRO-3 engine around the patched model: ``engine.backward(engine(...).loss)``, then the
    full gradients (an all-gather of each parameter's partitions: every rank calls it)."""
    try:
        import deepspeed
    except ImportError as e:
        if rank == 0:
            torch.save({"error": repr(e)}, os.path.join(out_dir, "zero3.pt"))
        return
    from dist_train import skip_deepspeed_shm

    skip_deepspeed_shm()
    model, loss_fn, _, _ = _module_case()
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True}
    engine = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                  config=config)[0]
    engine.backward(_loss(engine, loss_fn, shard, ref_shard))
    grads = {n: deepspeed.utils.safe_get_full_grad(p) for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(grads, os.path.join(out_dir, "zero3.pt"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _once(tmp_path_factory, name: str, make) -> Path:
    """The folder ``name`` that ``make(folder)`` fills once per session, shared by pytest-xdist's workers (each
    would otherwise run every module fixture of its own: the launches here are the slow part of CI)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / name
    with FileLock(str(path) + ".lock"):  # a worker that needs it meanwhile waits instead of launching it again
        if not (path / "done").exists():
            path.mkdir(exist_ok=True)
            make(path)
            (path / "done").touch()
    return path


@pytest.fixture(scope="module")
def module_results(tmp_path_factory):
    out = _once(tmp_path_factory, "dist-module", lambda d: _spawn(_module_worker, (_free_port(), str(d))))
    model, loss_fn, batch, ref = _module_case()
    _loss(model, loss_fn, batch, ref).backward()
    single = {n: p.grad for n, p in model.named_parameters()}
    return single, torch.load(out / "ddp.pt"), torch.load(out / "fsdp.pt"), torch.load(out / "zero3.pt")


def test_ddp_gloo_gradients_match_single_process(module_results):
    single, ddp, _, _ = module_results
    assert single.keys() == ddp.keys()
    for name in single:
        assert _rel(ddp[name], single[name]) < 1e-5, name


def test_fsdp2_cpu_gradients_match_single_process(module_results):
    single, _, fsdp, _ = module_results
    if "error" in fsdp:
        pytest.skip(f"FSDP2 (fully_shard) cannot run on the CPU with this torch {torch.__version__}: "
                    f"{fsdp['error']} (covered by the GPU suite)")
    for mode in ("fast", "lean"):
        assert single.keys() == fsdp[mode].keys()
        for name in single:
            assert _rel(fsdp[mode][name], single[name]) < 1e-5, (mode, name)


def test_zero3_engine_gradients_match_single_process(module_results):
    """The fused loss inside a plain ZeRO-3 engine's forward: the head, partitioned to numel 0 outside its own
    module's forward, is gathered around the kernel and its gradient lands in its partitions."""
    single, _, _, zero3 = module_results
    if "error" in zero3:
        pytest.skip(f"deepspeed is not installed (pip install 'fastpref[distributed]'): {zero3['error']}")
    assert single.keys() == zero3.keys()
    for name in single:
        assert _rel(zero3[name].reshape(single[name].shape), single[name]) < 1e-5, name


def test_plain_local_vocabulary_shard_is_refused():
    """A head holding half of the vocabulary as a plain tensor (a shard without its process group) once gave a
    silently wrong loss, its log-softmax over the local rows only: it is refused, naming the rows and vocab."""
    model, loss_fn, batch, ref = _module_case()
    vocab = model.config.vocab_size
    with torch.no_grad():
        local = torch.nn.Linear(model.config.hidden_size, vocab // 2, bias=False)
        local.weight.copy_(model.lm_head.weight[: vocab // 2])
    model.lm_head = local
    # every target inside the local rows: the case that was silently wrong (out-of-range ids raised already)
    batch = dict(batch, labels=batch["labels"].masked_fill(batch["labels"] >= vocab // 2, -100))
    with pytest.raises(ValueError, match=rf"lm_head.weight: {vocab // 2} rows.*vocab_size {vocab}"):
        _loss(model, loss_fn, batch, ref)
    with pytest.raises(ValueError, match="vocabulary shard"):
        model(input_ids=batch["input_ids"], labels=batch["labels"], return_logps=True)


# ------------------------------------------------------------- trainer level: the launch paths users take
RUNNER = Path(__file__).with_name("dist_train.py")
CONFIGS = Path(__file__).with_name("dist_configs")
# Every value is fp32 arithmetic summed in another order: a few ulps of the log-probs (|logps| ~ 30 here, so
# ~4e-6) scaled by beta, and relative ulps of the rest.
TOL = dict(rel=1e-5, abs=1e-5)


def _launch(commands: list[list[str]], out: Path, timeout: float = 240.0) -> dict:
    """Run the launcher processes (one per node) at once; fail with their output unless all exit 0; the JSON
    that rank 0 wrote."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in commands]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"launch did not finish within {timeout} s: {commands}")
    for cmd, proc, text in zip(commands, procs, outputs):
        assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{text[-6000:]}"
    return json.loads(out.read_text())


def _run(tmp: Path, name: str, launcher: list[str], *args: str) -> dict:
    out = tmp / f"{name}.json"
    return _launch([[sys.executable, *launcher, str(RUNNER), "--out", str(out), *args]], out)


def _torchrun(nproc: int = WORLD) -> list[str]:
    return ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port())]


def _accelerate(config: str) -> list[str]:
    return ["-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config), "--main_process_port",
            str(_free_port())]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One-process runs, launched once per session and on demand: stock TRL, and each fused trainer."""
    cache: dict[str, dict] = {}

    def get(trainer: str) -> dict:
        if trainer not in cache:
            folder = _once(tmp_path_factory, f"dist-single-{trainer}",
                           lambda d: _run(d, trainer, [], "--trainer", trainer))
            cache[trainer] = json.loads((folder / f"{trainer}.json").read_text())
        return cache[trainer]

    return get


def _assert_same_logs(got: dict, want: dict, what: str) -> None:
    """Every logged metric of every step equal to fp32 rounding (the same steps and the same metric names)."""
    assert len(got["logs"]) == len(want["logs"]) == 3, what
    for step, (g, w) in enumerate(zip(got["logs"], want["logs"]), 1):
        assert g.keys() == w.keys(), (what, step, sorted(g.keys() ^ w.keys()))
        for key in w:
            assert g[key] == pytest.approx(w[key], **TOL), (what, step, key, g[key], w[key])


def _check(run: dict, single, trainer: str = "trl", wrapped: str = "", distributed_type: str = "") -> None:
    assert run["world"] == WORLD, run["world"]
    assert run["wrapped"].startswith(wrapped), run["wrapped"]
    assert run["distributed_type"] == f"DistributedType.{distributed_type}", run["distributed_type"]
    _assert_same_logs(run, single("trl-stock"), f"{trainer} on {WORLD} processes vs stock TRL on one")
    _assert_same_logs(run, single(trainer), f"{trainer} on {WORLD} processes vs {trainer} on one")


@pytest.mark.slow
def test_ddp_torchrun_trainer_matches_stock_trl_and_single_process(tmp_path, single):
    pytest.importorskip("trl")
    _check(_run(tmp_path, "ddp", _torchrun()), single, wrapped="DistributedDataParallel",
           distributed_type="MULTI_CPU")


@pytest.mark.slow
def test_two_node_torchrun_trainer_matches_stock_trl_and_single_process(tmp_path, single):
    """``--nnodes 2``: two launchers on 127.0.0.1, one process each (rank 1 on "node" 1)."""
    pytest.importorskip("trl")
    out = tmp_path / "two-node.json"
    port = str(_free_port())
    commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                 "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port, str(RUNNER),
                 "--out", str(out)] for node in range(2)]
    _check(_launch(commands, out), single, wrapped="DistributedDataParallel", distributed_type="MULTI_CPU")


@pytest.mark.slow
def test_fsdp2_accelerate_launch_trainer_matches_stock_trl_and_single_process(tmp_path, single):
    pytest.importorskip("trl")
    run = _run(tmp_path, "fsdp2", _accelerate("fsdp2.yaml"), "--cpu-fsdp-shim")
    _check(run, single, wrapped="FSDP", distributed_type="FSDP")
    assert run["ref"].startswith("FSDP"), run["ref"]  # the reference sharded too


@pytest.mark.slow
def test_zero3_trainer_args_deepspeed_matches_stock_trl_and_single_process(tmp_path, single):
    """``TrainingArguments(deepspeed="zero3.json")`` under ``torchrun``: the plain DeepSpeed engine. Before the
    fix the first backward failed in DeepSpeed's engine (``The size of tensor a (0) must match ...``): the
    trainer returned the fused result's loss instead of the model output's, whose backward re-gathers the head."""
    pytest.importorskip("trl")
    pytest.importorskip("deepspeed")
    run = _run(tmp_path, "zero3", _torchrun(), "--deepspeed", str(CONFIGS / "zero3.json"))
    _check(run, single, wrapped="DeepSpeedEngine", distributed_type="DEEPSPEED")
    assert run["ref"] == "DeepSpeedEngine", run["ref"]  # the fused reference under ZeRO-3


@pytest.mark.slow
def test_zero3_accelerate_launch_trainer_matches_stock_trl_and_single_process(tmp_path, single):
    pytest.importorskip("trl")
    pytest.importorskip("deepspeed")
    run = _run(tmp_path, "zero3-accelerate", _accelerate("zero3.yaml"))
    _check(run, single, wrapped="DeepSpeedEngine", distributed_type="DEEPSPEED")
    assert run["ref"] == "DeepSpeedEngine", run["ref"]


@pytest.mark.slow
def test_zero3_accelerate_launch_hf_trainer_matches_stock_trl_and_single_process(tmp_path, single):
    """``FastPrefTrainer`` (transformers ``Trainer``) under ZeRO-3, its reference a ZeRO-3 engine as TRL's."""
    pytest.importorskip("deepspeed")
    run = _run(tmp_path, "zero3-hf", _accelerate("zero3.yaml"), "--trainer", "hf")
    _check(run, single, trainer="hf", wrapped="DeepSpeedEngine", distributed_type="DEEPSPEED")
    assert run["ref"] == "DeepSpeedEngine", run["ref"]


# ------------------------------------------- trainer level, online: GRPO and RLOO fast mode vs stock TRL
# One launch per engine trains the four trainers one after the other (stock TRL first); each process samples its
# own completions, so a run is compared with stock TRL under the same launch (not with one process).
ONLINE_RUNS = "grpo-stock,grpo,rloo-stock,rloo"
ONLINE_LAUNCHES = {
    "ddp": (lambda: _torchrun(), (), "DistributedDataParallel", "MULTI_CPU"),
    # nothing persistent and every parameter released as soon as DeepSpeed may: the head is partitioned outside
    # its use (the default threshold keeps the toy model's small parameters whole)
    "zero3": (lambda: _torchrun(), ("--deepspeed", str(CONFIGS / "zero3_eager.json")), "DeepSpeedEngine",
              "DEEPSPEED"),
    "fsdp2": (lambda: _accelerate("fsdp2.yaml"), ("--cpu-fsdp-shim",), "FSDP", "FSDP"),
}
TIMINGS = {"step_time"}  # wall-clock metrics: not compared


@pytest.fixture(scope="module")
def online(tmp_path_factory):
    """The online launches, once per session and on demand (``ONLINE_LAUNCHES``): engine -> {trainer: run}."""
    cache: dict[str, dict] = {}

    def get(engine: str) -> dict:
        if engine not in cache:
            launcher, args, _, _ = ONLINE_LAUNCHES[engine]
            folder = _once(tmp_path_factory, f"dist-online-{engine}",
                           lambda d: _run(d, engine, launcher(), "--trainer", ONLINE_RUNS, *args))
            cache[engine] = json.loads((folder / f"{engine}.json").read_text())
        return cache[engine]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpo", "rloo"])
@pytest.mark.parametrize("engine", list(ONLINE_LAUNCHES))
def test_online_trainer_fast_mode_matches_stock_trl_under_each_engine(online, engine, kind):
    """``FastPref{GRPO,RLOO}Trainer(use_fastpref=True)`` on 2 processes (DDP under ``torchrun``; ZeRO-3 through
    ``TrainingArguments(deepspeed=...)``, the reference a ZeRO-3 engine too; FSDP2 under ``accelerate launch``):
    three steps of GRPO ``loss_type="dapo"`` (its normaliser divides by the number of processes) / RLOO with
    ``beta`` 0.1 and ``num_iterations=2``, every logged metric within 1e-5 of stock TRL under the same launch, and
    every micro-batch of every rank's head gradient formed in the forward (``fastpref_head_paths``: fast only).

    ZeRO-3 (``zero3_eager.json``: the head partitioned outside its use): fast mode's backward returns the dW
    [V, H] its forward formed, reading no weight (the head's own gather is the forward's). That is right because
    the head is whole when the gradient lands, as autograd's accumulation into the parameter needs in either mode:
    the fused head reads ``lm_head.weight`` inside the model's forward, so DeepSpeed registers it as an external
    parameter of the model, gathered again by the model's pre-backward hook and released after its backward.
    DeepSpeed then reduces dW into the partitions (grad_norm and the later steps see it)."""
    pytest.importorskip("trl")
    if engine == "zero3":
        pytest.importorskip("deepspeed")
    _, _, wrapped, distributed_type = ONLINE_LAUNCHES[engine]
    runs = online(engine)
    got, want = runs[kind], runs[f"{kind}-stock"]
    for run in (got, want):
        assert run["world"] == WORLD, run["world"]
        assert run["wrapped"].startswith(wrapped), run["wrapped"]
        assert run["distributed_type"] == f"DistributedType.{distributed_type}", run["distributed_type"]
    if engine == "zero3":
        assert got["ref"] == "DeepSpeedEngine", got["ref"]  # the fast head's reference under ZeRO-3 too
        assert got["head_numel"] == 0, got["head_numel"]  # partitioned between steps
    assert got["paths"] == [{"fast": 3}] * WORLD, got["paths"]  # one training micro-batch per rank and step
    assert want["paths"] == [{}] * WORLD, want["paths"]
    assert len(got["logs"]) == len(want["logs"]) == 3
    for step, (g, w) in enumerate(zip(got["logs"], want["logs"]), 1):
        assert g.keys() == w.keys(), (engine, kind, step, sorted(g.keys() ^ w.keys()))
        for key in w.keys() - TIMINGS:
            assert g[key] == pytest.approx(w[key], **TOL), (engine, kind, step, key, g[key], w[key])
    # something to compare: varied rewards, a gradient at every step, the reference engaged by the last step
    assert any(w["reward_std"] > 0 for w in want["logs"] if "reward_std" in w)
    assert all(w["grad_norm"] > 0 for w in want["logs"])
    assert want["logs"][-1]["kl"] > 0
