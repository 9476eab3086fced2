"""Three DPO (or GRPO / RLOO) steps on a tiny Llama, as users launch them: the worker of
tests/test_integrations_distributed.py.

    python tests/dist_train.py --out logs.json [--trainer trl|trl-stock|hf|hf-stock|grpo|grpo-stock|rloo|rloo-stock]
    torchrun --nproc_per_node 2 tests/dist_train.py --out logs.json                          # DDP (gloo)
    torchrun --nproc_per_node 2 tests/dist_train.py --out logs.json --deepspeed tests/dist_configs/zero3.json
    accelerate launch --config_file tests/dist_configs/zero3.yaml tests/dist_train.py --out logs.json
    accelerate launch --config_file tests/dist_configs/fsdp2.yaml tests/dist_train.py --out logs.json --cpu-fsdp-shim

Rank 0 writes the logged metrics of every step (and how the policy and the reference were wrapped) to ``--out``
as JSON. The global batch is 4 pairs whatever the number of processes, so every launch sees the same data in the
same order. ``--trainer``: ``FastPrefDPOTrainer`` with the flag on (``trl``) or off (``trl-stock``: trl's own
``DPOTrainer``), ``FastPrefTrainer`` with the flag on (``hf``) or off (``hf-stock``).

Online (``grpo``, ``rloo``: ``FastPrefGRPOTrainer`` / ``FastPrefRLOOTrainer`` with the flag on, in fast mode;
``-stock``: trl's own ``GRPOTrainer`` / ``RLOOTrainer``): 4 completions of up to 6 tokens of one prompt per
process and step, sampled by TRL with the same seed in both (so flag on and stock see the same completions under
the same launch, not across launches: each process samples its own), a fixed reward, ``beta`` 0.1 (a reference
model, loaded from the policy's path as TRL does: rank 0 saves the toy model first), GRPO's
``loss_type="dapo"`` (its normaliser divides by the number of processes) and ``num_iterations=2`` (the second step
reuses the first's completions: importance ratios away from 1). A comma-separated ``--trainer`` list trains
them one after the other in the same processes; the JSON then maps each name to its run. A run also holds every
rank's ``fastpref_head_paths`` (``paths``) and the size of rank 0's head after training (``head_numel``).

CPU-only shims (a GPU run needs neither):
- ``--cpu-fsdp-shim``: accelerate 1.16 applies its FSDP plugin only for accelerator device types; on the CPU
  (``MULTI_CPU``) it silently runs DDP. The shim turns a ``MULTI_CPU`` state built with an FSDP plugin into an
  ``FSDP`` one, so ``accelerate launch`` with an FSDP2 config shards the model over gloo.
- ``--deepspeed CONFIG`` (``TrainingArguments(deepspeed=...)``): transformers passes accelerate no backend on that
  path, and without an accelerator accelerate then finds none and runs one process; the script first builds
  accelerate's DeepSpeed state over gloo and the arguments reuse it (``use_configured_state``).
- every multi-process run sets ``ddp_backend="gloo"`` (under ``accelerate launch`` with a ZeRO-3 config that is
  what gives accelerate a backend on the CPU); DeepSpeed runs skip its shared-memory collectives
  (``skip_deepspeed_shm``: they would be compiled first).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

STEPS = 3
GLOBAL_BATCH = 4
PREFERENCE = ("trl", "trl-stock", "hf", "hf-stock")
ONLINE = ("grpo", "grpo-stock", "rloo", "rloo-stock")


def cpu_fsdp_shim() -> None:
    """Let accelerate's FSDP plugin apply to a ``MULTI_CPU`` (gloo) run, as it does to ``MULTI_GPU`` ones."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = __init__


def skip_deepspeed_shm() -> None:
    """Gloo only: deepspeed 0.19 JIT-compiles its shared-memory CPU collectives (C++, once per machine, about four
    minutes of a CI run on 2 busy cores) when it starts its communication backend, unless that op is marked
    incompatible in ``deepspeed.ops.__compatible_ops__`` (the dict it consults; edits to it persist)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def cpu_deepspeed_shim() -> None:
    """Build the distributed state ``TrainingArguments(deepspeed=...)`` then reuses: DeepSpeed over gloo.
    transformers passes no backend to accelerate on that path, and on a machine without an accelerator accelerate
    then finds none and runs one process (``DistributedType.NO``)."""
    from accelerate.state import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]


def tp_head_shim() -> int:
    """Tensor parallel over every rank, data parallel over none: start the gloo group the head's mesh uses, then
    hide the launcher's variables from the trainer, so that it neither wraps the model in DDP nor splits the data
    (every tensor-parallel rank must see the same batch; accelerate's ``ParallelismConfig(tp_size=...)`` does this
    on GPUs only). Returns this process's rank."""
    torch.distributed.init_process_group("gloo")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "ROLE_WORLD_SIZE"):
        os.environ.pop(key, None)
    return torch.distributed.get_rank()


def preference_trainer(kind: str, common: dict, tok, no_ref_model: bool, tp_head: bool):
    """DPO: ``FastPrefDPOTrainer`` (``trl``, ``trl-stock``) or ``FastPrefTrainer`` (``hf``, ``hf-stock``)."""
    from datasets import Dataset

    from fastpref.testing.toy import toy_llama, toy_preference_records

    records = toy_preference_records(16, seed=0)
    model = toy_llama(tok, hidden_size=32, num_layers=2)
    ref_model = None if no_ref_model else toy_llama(tok, hidden_size=32, num_layers=2)
    if tp_head:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        for m in (model, ref_model):
            if m is not None:
                parallelize_module(m, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    if kind.startswith("trl"):
        from fastpref.integrations.trl import FastPrefDPOConfig, FastPrefDPOTrainer

        return FastPrefDPOTrainer(model, ref_model=ref_model, args=FastPrefDPOConfig(**common),
                                  train_dataset=Dataset.from_list(records), processing_class=tok)
    from fastpref.integrations.hf import FastPrefTrainer, FastPrefTrainingArguments

    return FastPrefTrainer(model, FastPrefTrainingArguments(**common), ref_model=ref_model,
                           train_dataset=records, processing_class=tok)


def rank_paths(paths: dict) -> list[dict]:
    """Every rank's ``fastpref_head_paths`` (an all-gather: every rank calls it)."""
    if not torch.distributed.is_initialized():
        return [dict(paths)]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, dict(paths))
    return gathered


def online_trainer(kind: str, common: dict, tok):
    """GRPO / RLOO on the toy model (see the module doc); ``common``: the DPO run's arguments, partly replaced."""
    import trl
    from datasets import Dataset

    from fastpref.integrations.trl_trainers import (
        FastPrefGRPOConfig,
        FastPrefGRPOTrainer,
        FastPrefRLOOConfig,
        FastPrefRLOOTrainer,
    )
    from fastpref.testing.toy import toy_llama, toy_preference_records

    common = dict(common)
    flag = common.pop("use_fastpref")
    common.update(per_device_train_batch_size=4, num_generations=4, max_completion_length=6, beta=0.1,
                  num_iterations=2, learning_rate=0.1)
    if kind.startswith("grpo"):
        common.update(loss_type="dapo")
        config, trainer_cls = ((FastPrefGRPOConfig, FastPrefGRPOTrainer) if flag else
                               (trl.GRPOConfig, trl.GRPOTrainer))
    else:
        common.update(learning_rate=0.01)  # its gradients are ~10x GRPO's: the 2nd step not all clipped
        config, trainer_cls = ((FastPrefRLOOConfig, FastPrefRLOOTrainer) if flag else
                               (trl.RLOOConfig, trl.RLOOTrainer))
    args = config(**common, **(dict(use_fastpref=True) if flag else {}))
    path = os.path.join(common["output_dir"], "toy-llama")  # TRL loads the reference from the policy's path
    with args.main_process_first(local=False, desc="saving the toy model"):  # only the main process writes
        if args.process_index == 0:
            toy_llama(tok, hidden_size=32, num_layers=2).save_pretrained(path)
    data = Dataset.from_list([{"prompt": r["prompt"]} for r in toy_preference_records(16, seed=0)])
    return trainer_cls(path, reward_funcs=online_reward, args=args, train_dataset=data, processing_class=tok)


def online_reward(completions: list[str], **_) -> list[float]:
    """Fixed and varied: the completions of one prompt get different rewards (advantages not all 0)."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--trainer", default="trl",
                        help=f"one of {PREFERENCE + ONLINE}, or a comma-separated list of online ones")
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config for TrainingArguments")
    parser.add_argument("--cpu-fsdp-shim", action="store_true")
    parser.add_argument("--no-ref-model", action="store_true", help="hf: the trainer's frozen copy as reference")
    parser.add_argument("--tp-head", action="store_true",
                        help="tensor parallel LM head: ColwiseParallel on lm_head over every rank (see tp_head_shim)")
    opts = parser.parse_args()

    torch.set_num_threads(1)
    tp_rank = tp_head_shim() if opts.tp_head else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if opts.cpu_fsdp_shim:
        cpu_fsdp_shim()
    if opts.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        skip_deepspeed_shm()
    if opts.deepspeed:
        cpu_deepspeed_shim()

    from fastpref.testing.toy import toy_tokenizer

    tok = toy_tokenizer()
    common = dict(output_dir=os.path.join(os.path.dirname(os.path.abspath(opts.out)), "trainer-out"),
                  max_steps=STEPS, logging_steps=1, report_to=[], learning_rate=0.5, optim="sgd",
                  lr_scheduler_type="constant", save_strategy="no", bf16=False, seed=0, data_seed=0,
                  per_device_train_batch_size=GLOBAL_BATCH // world, beta=0.5, deepspeed=opts.deepspeed,
                  accelerator_config={"use_configured_state": True} if opts.deepspeed else None)
    if world > 1:
        # gloo: without it accelerate finds no backend for DeepSpeed on the CPU (and DDP would pick none)
        common.update(ddp_backend="gloo", use_cpu=os.environ.get("ACCELERATE_USE_DEEPSPEED") is None)
    names = opts.trainer.split(",")
    if not set(names) <= set(PREFERENCE + ONLINE) or (len(names) > 1 and not set(names) <= set(ONLINE)):
        parser.error(f"--trainer: expected one of {PREFERENCE + ONLINE} or a comma-separated list of {ONLINE}, "
                     f"got {opts.trainer!r}")
    runs = {}
    for i, name in enumerate(names):  # one after the other in these processes (each trainer seeds itself)
        if i:
            # accelerate refuses a second Accelerator with a DeepSpeed plugin: forget the first one's state (the
            # process group, in PartialState, stays)
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()
        common_run = dict(common, use_fastpref=not name.endswith("-stock"))
        if name in ONLINE:
            trainer = online_trainer(name, common_run, tok)
        else:
            trainer = preference_trainer(name, common_run, tok, opts.no_ref_model, tp_rank is not None)
        trainer.train()
        runs[name] = {"world": trainer.args.world_size, "wrapped": type(trainer.model_wrapped).__name__,
                      "ref": type(getattr(trainer, "ref_model", None)).__name__,
                      "distributed_type": str(trainer.accelerator.distributed_type),
                      "logs": [h for h in trainer.state.log_history if "loss" in h],
                      "paths": rank_paths(getattr(trainer, "fastpref_head_paths", {})),
                      # this rank's head outside the step: 0 where ZeRO-3 keeps it partitioned
                      "head_numel": trainer.accelerator.unwrap_model(trainer.model_wrapped)
                      .get_output_embeddings().weight.numel()}
    if trainer.accelerator.is_main_process and tp_rank in (None, 0):
        with open(opts.out, "w") as f:
            json.dump(runs if names[0] in ONLINE else runs[names[0]], f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank done with every collective before teardown
    # Skip interpreter teardown: gloo's destructors can race its threads and abort an otherwise finished rank.
    os._exit(0)


if __name__ == "__main__":
    main()
