"""Hugging Face ``transformers`` integration: the fused LM head, a preference ``Trainer`` and its collator.

- ``add_fused_lm_head(model)``: the model's forward computes log-probs / the whole preference loss through
  fastpref's kernels, inside the module's forward (see ``fastpref.integrations.fused_head``).
- ``FastPrefTrainer`` / ``FastPrefTrainingArguments(use_fastpref=True, ...)``: DPO, IPO, Sr-DPO, Sr-IPO and
  TRL's loss family on ``transformers.Trainer``. ``use_fastpref=False`` (the default) runs the materialised
  reference path (the model's own logits, then the same formulas), so the flag is the only switch.
- ``PreferenceCollator``: prompt / chosen / rejected records (text, chat messages or token ids) -> batches,
  padded or packed.

Metrics are logged under trl 1.16's names: ``rewards/{chosen,rejected,accuracies,margins}``,
``logps/{chosen,rejected}``, ``logits/{chosen,rejected}``, ``entropy``, ``mean_token_accuracy``, ``num_tokens``.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from .. import reference as materialised
from ..losses import refinement_margin
from ..outputs import PreferenceOutput, build_output, token_sums
from .collator import PreferenceCollator, is_conversational, tokenize_preference
from .fused_head import FusedHeadOutput, add_fused_lm_head, head_transform, is_patched
from .trainer_common import (
    REF_KEYS,
    REFINE_REF_KEYS,
    SR_LOSSES,
    SR_PROMPT,
    FastPrefFields,
    build_preference_loss,
    check_fastpref_fields,
    disable_dropout,
    fused_reference_logps,
    gather_metrics,
    input_tokens,
    is_peft_model,
    model_inputs,
    packed_kwargs,
    prepare_reference,
    reference_context,
    trainer_loss,
    unwrap_peft,
)


@dataclass
class FastPrefTrainingArguments(FastPrefFields, TrainingArguments):
    """``TrainingArguments`` plus the preference-training knobs of ``FastPrefTrainer``.

    Args:
        use_fastpref: the one flag. True: the fused path (log-probs and the loss straight from the hidden states
            and the LM head, no logits). False (default): the materialised reference path.
        loss_type: a loss of ``fastpref.losses.LOSS_TYPES`` (``sigmoid``, ``ipo``, ``sr_dpo``, ``sr_ipo``,
            ``hinge``, ``robust``, ...) or a list mixed with ``loss_weights``.
        beta, label_smoothing, simpo_gamma, discopop_tau: the formulas' hyper-parameters (as trl 1.16).
        refinement_lambda, refinement_prompt: λ and the prompt p of Sr-DPO / Sr-IPO (None = the paper's prompt).
        max_length, truncation_mode: per-sequence truncation of prompt + completion (as trl 1.16).
        padding_free: pack the batch's sequences in one row (position ids restart per sequence).
        precompute_ref_log_probs: score the train / eval datasets with the reference once before training and
            drop the reference model.
        fastpref_mode, fastpref_memory_budget, fastpref_backend, fastpref_gemm: ``PreferenceLoss``'s ``mode``,
            ``memory_budget`` (bytes), ``backend`` and ``gemm`` (the GEMM path: None = ``$FASTPREF_GEMM``, else
            "cublas"; "fused" / "auto" opt-in); a bad value raises ``ValueError`` naming the field when the
            arguments are built.
        disable_dropout: zero every dropout in the policy and the reference (as trl 1.16).
    """

    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={"help": "Preference loss type(s)."})
    loss_weights: list[float] | None = field(default=None, metadata={"help": "Weights of mixed loss types."})
    beta: float = field(default=0.1, metadata={"help": "β: deviation from the reference (τ for IPO)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "cDPO / robust / EXO label smoothing ε."})
    refinement_lambda: float = field(default=0.5, metadata={"help": "λ of Sr-DPO / Sr-IPO."})
    refinement_prompt: str | None = field(default=None, metadata={"help": "p of Sr-DPO / Sr-IPO (None: paper's)."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "γ of SimPO."})
    discopop_tau: float = field(default=0.05, metadata={"help": "τ of DiscoPOP."})
    max_length: int | None = field(default=1024, metadata={"help": "Truncate prompt + completion to this."})
    truncation_mode: str = field(default="keep_start", metadata={"help": "'keep_start' or 'keep_end'."})
    padding_free: bool = field(default=False, metadata={"help": "Pack the batch in one row (no padding)."})
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "Score the data with the reference once."})
    disable_dropout: bool = field(default=True, metadata={"help": "Zero dropout in policy and reference."})
    # The records' text columns are the collator's input, not the model's: keep them.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the records' columns (collator input)."})

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_type = list(self.loss_type)
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights: expected {len(self.loss_type)} weights (one per loss_type "
                             f"{self.loss_type}), got {len(self.loss_weights)}")
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode: expected 'keep_start' or 'keep_end', got {self.truncation_mode!r}")
        check_fastpref_fields(self)
        super().__post_init__()


# --------------------------------------------------------------------------------------------------------------
# The flag-off path: the model's own logits through ``fastpref.reference`` and the same formulas and metrics
# --------------------------------------------------------------------------------------------------------------
def shifted_sequence_ids(batch: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
    """Sequence id of each shifted label position: the row index (padded) or ``seq_ids[..., 1:]`` (packed)."""
    if batch.get("seq_ids") is not None:
        return batch["seq_ids"][..., 1:]
    rows, width = labels.shape
    return torch.arange(rows, device=labels.device).unsqueeze(1).expand(rows, width - 1)


@dataclass(frozen=True)
class MaterialisedLogps:
    """Per-sequence sums and per-token statistics from materialised logits (flag off)."""

    seq_logps: torch.Tensor  # [S] (batch layout), differentiable
    lengths: torch.Tensor  # [S] scored tokens
    mask: torch.Tensor  # [.., T-1] bool, the scored positions
    seq: torch.Tensor  # [.., T-1] sequence id per position
    stats: materialised.TokenStatistics | None  # per position, detached


def materialised_logps(logits: torch.Tensor, labels: torch.Tensor, seq: torch.Tensor, num_seqs: int,
                       *, ignore_index: int = -100, with_stats: bool = True) -> MaterialisedLogps:
    """Log-probs of ``labels[..., 1:]`` under ``logits[..., :-1, :]`` (fp32 log-softmax, as TRL's non-fused path),
    summed per sequence, plus TRL's per-token metrics (entropy, mean logit, top-1 hit)."""
    z = logits[..., :-1, :]
    target = labels[..., 1:]
    mask = (target != ignore_index) & (seq >= 0)
    logp = materialised.log_probs(z)  # once: the log-probs and the statistics share it
    tok = materialised.gather_logps(logp, torch.where(mask, target, ignore_index), ignore_index=ignore_index)
    sums, lengths = materialised.sequence_sums(tok, mask, seq, num_seqs)
    stats = materialised.token_statistics(z, target, logp.detach()) if with_stats else None
    return MaterialisedLogps(sums, lengths, mask, seq, stats)


def materialised_preference_output(loss_fn: Any, policy: MaterialisedLogps, ref_logps: torch.Tensor | None,
                                   refinement: torch.Tensor | None) -> PreferenceOutput:
    """A ``fastpref.PreferenceOutput`` computed from materialised log-probs with the same formulas
    (``fastpref.losses.pair_losses``) and the same metrics builder as the fused path."""
    from fastpref import losses as L

    cfg = loss_fn.config.loss
    num_pairs = policy.seq_logps.shape[0] // 2
    chosen, rejected = policy.seq_logps[:num_pairs], policy.seq_logps[num_pairs:]
    ref = None if ref_logps is None or cfg.reference_free_only else ref_logps.float()  # TRL reads none for these
    terms = L.pair_terms(cfg, ref, policy.lengths, like=policy.seq_logps if ref is None else ref)
    per_pair = terms.loss(cfg, chosen, rejected, refinement=refinement)
    sums = token_sums(policy.stats, policy.seq < num_pairs, policy.mask)
    return build_output(loss=per_pair.sum() / max(num_pairs, 1), losses=per_pair, chosen_logps=chosen,
                        rejected_logps=rejected, ref_chosen=terms.ref_chosen, ref_rejected=terms.ref_rejected,
                        beta=cfg.beta, sums=sums, mode="materialised")


def model_sequence_logps(model: Any, batch: dict[str, Any], *, materialise: bool, prefix: str = "",
                         loss_fn: Any = None) -> torch.Tensor:
    """Per-sequence log-prob sums ``[S]`` (batch layout) of a batch's completions under ``model``: through the
    fused head (scored exactly as ``loss_fn`` scores the policy), or with ``materialise=True`` from the model's
    own logits. ``prefix="refine_"`` scores the p ⊕ x batch."""
    if not materialise:
        return fused_reference_logps(model, batch, loss_fn, prefix)
    labels = batch[prefix + "labels"]
    logits = model(**model_inputs(batch, prefix), use_cache=False).logits
    logits = logits[:, -labels.shape[1]:]
    seq = shifted_sequence_ids(batch if not prefix else {}, labels)
    num_seqs = batch.get("num_seqs") if not prefix else None
    n = num_seqs if num_seqs is not None else labels.shape[0]
    return materialised_logps(logits, labels, seq, n, with_stats=False).seq_logps


# --------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------
class FastPrefTrainer(Trainer):
    """Preference optimisation (DPO, IPO, Sr-DPO, Sr-IPO, TRL's loss family) on ``transformers.Trainer``.

    Datasets hold prompt / chosen / rejected records (text, chat messages or token ids; optionally
    ``ref_chosen_logps`` / ``ref_rejected_logps``), collated by ``PreferenceCollator``. The reference is, in
    order: the precomputed sums in the batch, ``ref_model``, the PEFT model with its ``"ref"`` adapter active
    (or its adapter disabled when it has none), or a frozen copy of the initial policy; reference-free losses need none.

    ``args.use_fastpref=True`` runs the fused path: the policy forward returns the loss from the hidden states
    and the LM head (``add_fused_lm_head``, inside the module's forward); the reference is scored by the
    forward-only kernel. ``False`` runs the model's own logits through the same formulas.
    """

    loss_is_scaled_for_ga = False  # the loss is a per-micro-batch mean; Trainer divides by the GA steps

    def __init__(
        self,
        model: Any,
        args: FastPrefTrainingArguments | None = None,
        ref_model: Any | None = None,
        data_collator: Any | None = None,
        train_dataset: Any | None = None,
        eval_dataset: Any | None = None,
        processing_class: Any | None = None,
        peft_config: Any | None = None,
        **kwargs: Any,
    ) -> None:
        args = args if args is not None else FastPrefTrainingArguments(output_dir="fastpref-trainer")
        if not isinstance(args, FastPrefTrainingArguments):
            raise TypeError(f"args: expected FastPrefTrainingArguments, got {type(args).__name__}")
        if ref_model is not None and ref_model is model:
            raise ValueError("ref_model: must not be the policy itself; omit it to use a frozen copy of the policy")
        sr = [t for t in args.loss_type if t in SR_LOSSES]
        self.refinement_prompt = (args.refinement_prompt or SR_PROMPT) if sr else None
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if args.use_fastpref:
            add_fused_lm_head(unwrap_peft(model), backend=args.fastpref_backend, gemm=args.fastpref_gemm)
        if is_peft_model(model) and args.gradient_checkpointing:
            model.enable_input_require_grads()
        self.loss_fn = trainer_loss(model, args)
        loss_cfg = self.loss_fn.config.loss
        self.reference_free = bool(loss_cfg.reference_free or loss_cfg.reference_free_only)
        if data_collator is None:
            attn = getattr(getattr(unwrap_peft(model), "config", None), "_attn_implementation", "") or ""
            data_collator = PreferenceCollator(
                tokenizer=processing_class, max_length=args.max_length, truncation_mode=args.truncation_mode,
                padding_free=args.padding_free, refinement_prompt=self.refinement_prompt,
                return_flash_attn_kwargs=args.padding_free and attn.startswith("flash"))
        precomputed = train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) > 0 \
            and all(k in train_dataset[0] for k in REF_KEYS)
        if ref_model is None and not (self.reference_free or is_peft_model(model) or
                                      (precomputed and not sr)):
            # The initial policy, frozen (a reference copy before any step; patched forward included).
            ref_model = copy.deepcopy(model)
        if ref_model is not None:
            ref_model.eval()
            ref_model.requires_grad_(False)
            if args.use_fastpref:
                add_fused_lm_head(unwrap_peft(ref_model), backend=args.fastpref_backend, gemm=args.fastpref_gemm)
        if args.disable_dropout:
            disable_dropout(model)
            if ref_model is not None:
                disable_dropout(ref_model)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self.ref_model = ref_model
        if self.ref_model is not None:
            self.ref_model = prepare_reference(self.accelerator, self.ref_model)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens = 0
        if args.precompute_ref_log_probs and not self.reference_free:
            self.train_dataset = self.precompute_reference(self.train_dataset)
            if self.eval_dataset is not None:
                evals = self.eval_dataset
                self.eval_dataset = ({k: self.precompute_reference(v) for k, v in evals.items()}
                                     if isinstance(evals, dict) else self.precompute_reference(evals))
            self.ref_model = None  # no longer needed: the sums (p ⊕ x ones included) travel with the records

    # -- reference -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Any], prefix: str = "") -> torch.Tensor | None:
        """Reference sums ``[S]`` (batch layout) of a batch, or of its p ⊕ x twin with ``prefix="refine_"``:
        precomputed in the batch when there, else scored by the reference model."""
        if self.reference_free:
            return None
        keys = REF_KEYS if not prefix else REFINE_REF_KEYS
        if all(k in batch for k in keys):
            return torch.cat([batch[keys[0]], batch[keys[1]]]).float()
        model = self.ref_model if self.ref_model is not None else self.model
        if self.ref_model is None and not is_peft_model(self.accelerator.unwrap_model(self.model)):
            raise ValueError("ref_model: this batch carries no precomputed reference log-probs and there is no "
                             "reference model; pass ref_model, or ref_chosen_logps / ref_rejected_logps columns")
        policy = self.accelerator.unwrap_model(self.model)
        with reference_context(policy, self.ref_model), self.compute_loss_context_manager():
            return model_sequence_logps(model, batch, materialise=not self.args.use_fastpref, prefix=prefix,
                                        loss_fn=self.loss_fn).float()

    def precompute_reference(self, dataset: Any, batch_size: int | None = None) -> Any:
        """``dataset`` with ``ref_chosen_logps`` / ``ref_rejected_logps`` (and, for Sr losses, the p ⊕ x ones)
        added: one pass of the reference. Lists of dicts and ``datasets.Dataset`` are supported."""
        batch_size = batch_size or self.args.per_device_eval_batch_size
        records = [dict(dataset[i]) for i in range(len(dataset))]
        columns: dict[str, list[float]] = defaultdict(list)
        device = self.accelerator.device
        for start in range(0, len(records), batch_size):
            chunk = [{k: v for k, v in r.items() if k not in REF_KEYS + REFINE_REF_KEYS}
                     for r in records[start : start + batch_size]]
            batch = self._prepare_inputs(self.data_collator(chunk))
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            prefixes = [("", REF_KEYS)] + ([("refine_", REFINE_REF_KEYS)] if self.refinement_prompt else [])
            for prefix, keys in prefixes:
                ref = self.reference_logps(batch, prefix).cpu()
                chosen, rejected = ref.chunk(2)
                columns[keys[0]] += chosen.tolist()
                columns[keys[1]] += rejected.tolist()
        if hasattr(dataset, "add_column"):
            for key, values in columns.items():
                if key in dataset.column_names:
                    dataset = dataset.remove_columns(key)
                dataset = dataset.add_column(key, values)
            return dataset
        return [{**r, **{k: v[i] for k, v in columns.items()}} for i, r in enumerate(records)]

    # -- loss --------------------------------------------------------------------------------------------------
    def preference_outputs(self, model: Any, batch: dict[str, Any]) -> Any:
        """The ``fastpref.PreferenceOutput`` of one batch (fused or materialised, per ``args.use_fastpref``)."""
        return self._loss_and_outputs(model, batch)[1]

    def _loss_and_outputs(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """The loss to differentiate and the ``PreferenceOutput`` of one batch. Fused, the loss is the model
        output's tensor (the same value as ``preference.loss``): ZeRO-3 replaced the output's tensors by ones
        whose backward first re-gathers the head, whose gradient is formed against its full shape."""
        ref = self.reference_logps(batch)
        refine_ref = self.reference_logps(batch, "refine_") if self.refinement_prompt else None
        labels = batch["labels"]
        if self.args.use_fastpref:
            extra: dict[str, Any] = packed_kwargs(batch)
            if self.refinement_prompt:
                extra.update(refine_input_ids=batch["refine_input_ids"],
                             refine_attention_mask=batch.get("refine_attention_mask"),
                             refine_labels=batch["refine_labels"], refine_ref_logps=refine_ref)
            out = model(**model_inputs(batch), labels=labels, preference_loss=self.loss_fn, ref_logps=ref, **extra)
            if not isinstance(out, FusedHeadOutput):
                raise RuntimeError("the model's forward did not run fastpref's fused head: add_fused_lm_head was "
                                   "undone (e.g. by another patch such as Liger's fused cross-entropy)")
            return out.loss, out.preference
        logits = model(**model_inputs(batch), use_cache=False).logits
        seq = shifted_sequence_ids(batch, labels)
        num_seqs = batch.get("num_seqs") or labels.shape[0]
        policy = materialised_logps(logits[:, -labels.shape[1]:], labels, seq, num_seqs)
        refinement = None
        if self.refinement_prompt:
            with torch.no_grad():
                r_logits = model(**model_inputs(batch, "refine_"), use_cache=False).logits
                r_labels = batch["refine_labels"]
                r_seq = shifted_sequence_ids({}, r_labels)
                r_pol = materialised_logps(r_logits[:, -r_labels.shape[1]:], r_labels, r_seq, r_labels.shape[0],
                                           with_stats=False)
            num_pairs = r_labels.shape[0] // 2
            r_ref = (None, None) if refine_ref is None else (refine_ref[:num_pairs], refine_ref[num_pairs:])
            refinement = refinement_margin(self.loss_fn.config.loss, r_pol.seq_logps[:num_pairs],
                                           r_pol.seq_logps[num_pairs:], *r_ref,
                                           chosen_lengths=r_pol.lengths[:num_pairs],
                                           rejected_lengths=r_pol.lengths[num_pairs:])
        out = materialised_preference_output(self.loss_fn, policy, ref, refinement)
        return out.loss, out

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        mode = "train" if self.model.training else "eval"
        loss, out = self._loss_and_outputs(model, inputs)
        self._record_metrics(mode, out, inputs)
        return (loss, out) if return_outputs else loss

    def _record_metrics(self, mode: str, out: Any, inputs: dict[str, Any]) -> None:
        """TRL's metrics, aggregated across ranks as TRL aggregates them (``trainer_common.gather_metrics``)."""
        values, n_tokens = gather_metrics(self.accelerator, out, input_tokens(inputs))
        metrics = self._metrics[mode]
        for name, value in values.items():
            metrics[name].append(value)
        if mode == "train":
            self._total_train_tokens += int(n_tokens)
        metrics["num_tokens"] = [float(self._total_train_tokens)]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        # No labels in Trainer's sense: always compute the preference loss (as trl's DPOTrainer does).
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["prompt", "chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids",
                                       *REF_KEYS, *REFINE_REF_KEYS]


__all__ = [
    "SR_PROMPT",
    "FastPrefTrainer",
    "FastPrefTrainingArguments",
    "FusedHeadOutput",
    "PreferenceCollator",
    "add_fused_lm_head",
    "build_preference_loss",
    "head_transform",
    "is_conversational",
    "is_patched",
    "materialised_logps",
    "tokenize_preference",
]
