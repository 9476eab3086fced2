"""What ``FastPrefTrainer`` (transformers) and ``FastPrefDPOTrainer`` (TRL) share: the loss they build, the
reference's context and fused scoring, labels from completion masks, and TRL's metrics with their cross-rank
aggregation."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.recipes import SR_DPO_PROMPT
from ..ops.backend import BACKENDS
from ..ops.gemm_path import check_gemm
from ..outputs import PAIR_METRICS, TOKEN_SUM_KEYS, pair_metric_values, token_metrics
from ..preference import MODES
from ..utils.validation import check_choice
from .fused_head import head_transform

SR_LOSSES = ("sr_dpo", "sr_ipo")
#: The fixed prompt p of Sr-DPO / Sr-IPO (Yu et al. 2024), put before the query to build p ⊕ x.
SR_PROMPT = SR_DPO_PROMPT
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
REFINE_REF_KEYS = ("ref_refine_chosen_logps", "ref_refine_rejected_logps")
# Batch keys that are not model inputs.
_NON_MODEL_KEYS = {"completion_mask", "labels", "seq_ids", "num_seqs", *REF_KEYS, *REFINE_REF_KEYS}


def build_preference_loss(model: Any, loss_type: list[str] | str = "sigmoid", **options: Any) -> Any:
    """A ``fastpref.PreferenceLoss(loss_type, **options)`` with the model head's logit transform
    (``head_transform``) and, unless ``options`` say otherwise, the token statistics TRL logs."""
    from fastpref import PreferenceLoss

    types = list(loss_type) if not isinstance(loss_type, str) else [loss_type]
    options.setdefault("token_metrics", True)
    return PreferenceLoss(types if len(types) > 1 else types[0], **options, **head_transform(model))


#: ``PreferenceLoss`` options read from a trainer's arguments, under the arguments' field names (shared by
#: ``FastPrefTrainingArguments`` and ``FastPrefDPOConfig``; a field an argument class lacks keeps the default).
TRAINER_FIELDS = {"loss_type": "loss_type", "beta": "beta", "label_smoothing": "label_smoothing",
                  "loss_weights": "loss_weights", "refinement_lambda": "refinement_lambda",
                  "simpo_gamma": "simpo_gamma", "discopop_tau": "discopop_tau", "mode": "fastpref_mode",
                  "memory_budget": "fastpref_memory_budget", "backend": "fastpref_backend", "gemm": "fastpref_gemm"}


def trainer_loss(model: Any, args: Any) -> Any:
    """The trainer's ``PreferenceLoss``: ``build_preference_loss`` with the options of ``args``."""
    return build_preference_loss(model, **{k: getattr(args, f) for k, f in TRAINER_FIELDS.items() if hasattr(args, f)})


@dataclass
class FastPrefFields:
    """The flag and knobs every fastpref trainer config adds (a mixin before the trainer's own config class):
    ``use_fastpref``, and the loss's ``mode``, ``memory_budget``, ``backend`` and ``gemm`` as ``fastpref_*``
    (checked by ``check_fastpref_fields`` when the config is built)."""

    use_fastpref: bool = field(default=False, metadata={"help": "Use fastpref's fused log-probs and loss."})
    fastpref_mode: str = field(default="auto", metadata={"help": "'auto', 'fast' or 'lean'."})
    fastpref_memory_budget: int | None = field(default=None, metadata={"help": "Bytes of logits fast mode may hold."})
    fastpref_backend: str = field(default="auto", metadata={"help": "'auto', 'triton' or 'torch'."})
    fastpref_gemm: str | None = field(default=None, metadata={
        "help": "GEMM path: None ($FASTPREF_GEMM, else 'cublas'), 'cublas', or opt-in 'fused' / 'auto'."})


def moe_aux_unsupported(args: Any) -> list[str]:
    """``router_aux_loss_coef`` (the MoE load-balancing loss), which the fused paths do not add."""
    if getattr(args, "router_aux_loss_coef", None):
        return [f"router_aux_loss_coef={args.router_aux_loss_coef!r} (the MoE load-balancing loss; set it to 0.0)"]
    return []


def raise_unsupported(config: str, trainer: str, bad: list[str]) -> None:
    """``ValueError`` naming each field of ``bad`` (``"field=value (why)"``) that ``config(use_fastpref=True)``
    cannot run."""
    if bad:
        raise ValueError(f"{config}(use_fastpref=True) does not support: " + "; ".join(bad)
                         + f". Change these fields or set use_fastpref=False to run trl's {trainer}.")


def check_fastpref_fields(args: Any) -> None:
    """The ``fastpref_*`` fields of ``FastPrefDPOConfig`` / ``FastPrefTrainingArguments``, checked when the
    config is built (a typo such as ``fastpref_gemm="cuBLAS"`` would otherwise surface only when the trainer
    builds its loss, or not at all with ``use_fastpref=False``)."""
    check_choice("fastpref_mode", args.fastpref_mode, MODES)
    check_choice("fastpref_backend", args.fastpref_backend, BACKENDS)
    check_gemm(args.fastpref_gemm, "fastpref_gemm")  # None: $FASTPREF_GEMM, else the default path
    budget = args.fastpref_memory_budget
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
        raise ValueError(f"fastpref_memory_budget: expected a positive int (bytes) or None, got {budget!r}")


def unwrap_peft(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (the one whose forward ``add_fused_lm_head`` patches)."""
    return model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model


def is_peft_model(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero the probability of every ``nn.Dropout`` (DPO's log-ratios assume deterministic forwards)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def model_inputs(batch: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The model's forward arguments in a collated batch (``refine_`` prefixed ones with ``prefix``)."""
    if prefix:
        keys = ("input_ids", "attention_mask", "position_ids")
        return {k: batch[prefix + k] for k in keys if batch.get(prefix + k) is not None}
    return {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS and not k.startswith("refine_")
            and not k.startswith("ref_")}


def completion_labels(batch: dict[str, Any], prefix: str = "") -> torch.Tensor:
    """Unshifted labels of a batch: its ``labels``, or ``input_ids`` with -100 outside ``completion_mask``
    (TRL's collator)."""
    labels = batch.get(prefix + "labels")
    if labels is None:
        labels = batch[prefix + "input_ids"].masked_fill(batch[prefix + "completion_mask"] == 0, -100)
    return labels


def packed_kwargs(batch: dict[str, Any]) -> dict[str, Any]:
    """``seq_ids`` / ``num_seqs`` of a packed batch, or nothing."""
    if batch.get("seq_ids") is None:
        return {}
    return {"seq_ids": batch["seq_ids"], "num_seqs": batch["num_seqs"]}


@contextlib.contextmanager
def reference_context(policy: Any, ref_model: Any) -> Iterator[None]:
    """Where the reference runs: its own model (a null context), or the PEFT policy with its ``"ref"`` adapter
    active (TRL's convention) or with every adapter disabled."""
    if ref_model is not None or not is_peft_model(policy):
        yield
        return
    if "ref" in getattr(policy, "peft_config", {}):
        previous = policy.active_adapter
        policy.set_adapter("ref")
        try:
            yield
        finally:
            policy.set_adapter(previous)
        return
    with policy.disable_adapter():
        yield


def fused_reference_logps(model: Any, batch: dict[str, Any], loss_fn: Any, prefix: str = "") -> torch.Tensor:
    """Reference sums ``[B]`` (batch layout) of a batch through the fused head, under no-grad: the training batch
    scored exactly as ``loss_fn`` scores the policy (``score_only=True``: bit-identical when the reference equals
    the policy), or its p ⊕ x twin (``prefix="refine_"``) by token log-probs."""
    if loss_fn is None and not prefix:
        raise ValueError("loss_fn: the fused reference of a training batch is scored as this loss scores the "
                         "policy; pass the trainer's fastpref.PreferenceLoss, got None")
    kwargs = model_inputs(batch, prefix)  # the fused head sets use_cache=False itself
    labels = completion_labels(batch, prefix)
    packed = packed_kwargs(batch) if not prefix else {}
    with torch.no_grad():
        if not prefix:
            return model(**kwargs, labels=labels, preference_loss=loss_fn, score_only=True, **packed).sequence_logps
        out = model(**kwargs, labels=labels, return_logps=True)
    # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens.
    return out.token_logps[:, -(labels.shape[1] - 1):].sum(-1)


def prepare_reference(accelerator: Any, ref_model: Any) -> Any:
    """The frozen reference placed as the policy is: under DeepSpeed ZeRO-3 an inference engine sharded like the
    policy (as trl 1.16 prepares its reference; the fused head gathers the head's weight for the kernel, under
    no-grad), below ZeRO-3 a replica, and otherwise accelerate's evaluation-mode preparation."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return accelerator.prepare_model(ref_model, evaluation_mode=True)
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):  # no optimizer for a frozen model
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if zero.get("stage", 0) != 3:
        zero["stage"] = 0
    engine = deepspeed.initialize(model=ref_model, config=config)[0]
    engine.eval()
    return engine


def gather_metrics(accelerator: Any, out: Any, n_tokens: torch.Tensor, *,
                   chosen_rewards: torch.Tensor | None = None,
                   rejected_rewards: torch.Tensor | None = None) -> tuple[dict[str, float], float]:
    """trl 1.16's metrics of one batch, aggregated across ranks as TRL does: pair metrics as means of the
    gathered per-pair values (``gather``), token metrics as gathered sums over gathered counts
    (``gather_for_metrics``); the formulas are ``fastpref.outputs``'s. Two gathers and one host sync in all.
    Returns the metrics and the gathered number of input tokens. ``chosen_rewards`` / ``rejected_rewards``
    replace the output's (TRL's own definition)."""
    chosen_rewards = out.chosen_rewards if chosen_rewards is None else chosen_rewards
    rejected_rewards = out.rejected_rewards if rejected_rewards is None else rejected_rewards
    per_pair = torch.stack(pair_metric_values(chosen_rewards, rejected_rewards, out.chosen_logps,
                                              out.rejected_logps), 1).float()
    s = out.token_sums
    keys = [k for k in TOKEN_SUM_KEYS if k in s]
    sums = torch.stack([*(s[k] for k in keys), n_tokens.to(s["chosen_tokens"])]).float()
    pair_means = accelerator.gather(per_pair.contiguous()).reshape(-1, per_pair.shape[1]).mean(0)
    totals = accelerator.gather_for_metrics(sums.unsqueeze(0)).reshape(-1, sums.shape[0]).sum(0)
    # float64, as the Python floats these were divided in before: the one formula, the same values
    gathered = token_metrics(dict(zip(keys, totals.double())))
    values = torch.cat([pair_means.double(), torch.stack(list(gathered.values())), totals[-1:].double()]).tolist()
    metrics = dict(zip([*PAIR_METRICS, *gathered], values))  # the one host sync
    return metrics, values[-1]


def input_tokens(batch: dict[str, Any]) -> torch.Tensor:
    """Tokens of a batch for ``num_tokens``: the attention mask's, or the packed tokens'."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return (batch["seq_ids"] >= 0).sum()


__all__ = [
    "PAIR_METRICS",
    "REFINE_REF_KEYS",
    "REF_KEYS",
    "SR_LOSSES",
    "SR_PROMPT",
    "TRAINER_FIELDS",
    "build_preference_loss",
    "completion_labels",
    "disable_dropout",
    "fused_reference_logps",
    "gather_metrics",
    "input_tokens",
    "is_peft_model",
    "model_inputs",
    "packed_kwargs",
    "prepare_reference",
    "reference_context",
    "trainer_loss",
    "unwrap_peft",
]
