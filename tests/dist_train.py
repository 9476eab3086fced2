"""Three DPO steps on a tiny Llama, as users launch them: the worker of tests/test_integrations_distributed.py.

    python tests/dist_train.py --out logs.json [--trainer trl|trl-stock|hf|hf-stock]       # one process
    torchrun --nproc_per_node 2 tests/dist_train.py --out logs.json                          # DDP (gloo)
    torchrun --nproc_per_node 2 tests/dist_train.py --out logs.json --deepspeed tests/dist_configs/zero3.json
    accelerate launch --config_file tests/dist_configs/zero3.yaml tests/dist_train.py --out logs.json
    accelerate launch --config_file tests/dist_configs/fsdp2.yaml tests/dist_train.py --out logs.json --cpu-fsdp-shim

Rank 0 writes the logged metrics of every step (and how the policy and the reference were wrapped) to ``--out``
as JSON. The global batch is 4 pairs whatever the number of processes, so every launch sees the same data in the
same order. ``--trainer``: ``FastPrefDPOTrainer`` with the flag on (``trl``) or off (``trl-stock``: trl's own
``DPOTrainer``), ``FastPrefTrainer`` with the flag on (``hf``) or off (``hf-stock``).

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--trainer", default="trl", choices=["trl", "trl-stock", "hf", "hf-stock"])
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

    from datasets import Dataset

    from fastpref.testing.toy import toy_llama, toy_preference_records, toy_tokenizer

    tok = toy_tokenizer()
    records = toy_preference_records(16, seed=0)
    common = dict(output_dir=os.path.join(os.path.dirname(os.path.abspath(opts.out)), "trainer-out"),
                  max_steps=STEPS, logging_steps=1, report_to=[], learning_rate=0.5, optim="sgd",
                  lr_scheduler_type="constant", save_strategy="no", bf16=False, seed=0, data_seed=0,
                  per_device_train_batch_size=GLOBAL_BATCH // world, beta=0.5,
                  use_fastpref=not opts.trainer.endswith("-stock"), deepspeed=opts.deepspeed,
                  accelerator_config={"use_configured_state": True} if opts.deepspeed else None)
    if world > 1:
        # gloo: without it accelerate finds no backend for DeepSpeed on the CPU (and DDP would pick none)
        common.update(ddp_backend="gloo", use_cpu=os.environ.get("ACCELERATE_USE_DEEPSPEED") is None)
    model = toy_llama(tok, hidden_size=32, num_layers=2)
    ref_model = None if opts.no_ref_model else toy_llama(tok, hidden_size=32, num_layers=2)
    if tp_rank is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        for m in (model, ref_model):
            if m is not None:
                parallelize_module(m, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    if opts.trainer.startswith("trl"):
        from fastpref.integrations.trl import FastPrefDPOConfig, FastPrefDPOTrainer

        trainer = FastPrefDPOTrainer(model, ref_model=ref_model, args=FastPrefDPOConfig(**common),
                                     train_dataset=Dataset.from_list(records), processing_class=tok)
    else:
        from fastpref.integrations.hf import FastPrefTrainer, FastPrefTrainingArguments

        trainer = FastPrefTrainer(model, FastPrefTrainingArguments(**common), ref_model=ref_model,
                                  train_dataset=records, processing_class=tok)
    trainer.train()
    if trainer.accelerator.is_main_process and tp_rank in (None, 0):
        with open(opts.out, "w") as f:
            json.dump({"world": trainer.args.world_size, "wrapped": type(trainer.model_wrapped).__name__,
                       "ref": type(getattr(trainer, "ref_model", None)).__name__,
                       "distributed_type": str(trainer.accelerator.distributed_type),
                       "logs": [h for h in trainer.state.log_history if "loss" in h]}, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank done with every collective before teardown
    # Skip interpreter teardown: gloo's destructors can race its threads and abort an otherwise finished rank.
    os._exit(0)


if __name__ == "__main__":
    main()
