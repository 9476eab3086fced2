"""TRL integration: ``FastPrefKTOTrainer`` is trl's ``KTOTrainer`` with one flag, ``use_fastpref``.

``FastPrefKTOConfig(..., use_fastpref=True)`` keeps everything of TRL's trainer — its dataset pipeline (unpairing,
the KL completions rotated within each batch), collator, every reference path (``ref_model``, the PEFT adapter
disabled or its ``"ref"`` copy, ``precompute_ref_log_probs``), ``loss_type``, the desirable / undesirable weights,
gradient accumulation and the logged metric names — and computes the log-probs and the loss with fastpref's
``KTOLoss`` from the last hidden states, inside the policy's forward
(``fastpref.integrations.fused_head.add_fused_lm_head``): the KL pass and the reference forward-only, the policy
in fast mode (gradients formed during the forward) when two sequences' logits fit the memory budget. With the
flag off the trainer *is* ``trl.KTOTrainer``: no method of it is changed.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .trl import check_trl_version

check_trl_version()

from trl import KTOConfig, KTOTrainer  # noqa: E402

from ..kto import KTOLoss  # noqa: E402
from .fused_head import FusedHeadOutput, add_fused_lm_head, head_transform, is_patched  # noqa: E402
from .trainer_common import (  # noqa: E402
    FastPrefFields,
    check_fastpref_fields,
    moe_aux_unsupported,
    raise_unsupported,
    reference_context,
    unwrap_peft,
)

# Batch keys that are not the model's inputs (trl 1.16 KTOTrainer._compute_loss's own list, plus "label").
_NON_MODEL_KEYS = {"completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "KL_token_type_ids",
                   "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps"}
# The order of the gathered sums behind the metrics (one gather, one host sync per step).
_SUM_KEYS = ("entropy_sum", "scored_tokens", "chosen_logit_sum", "chosen_tokens", "rejected_logit_sum",
             "rejected_tokens", "chosen_seqs", "rejected_seqs", "chosen_reward_sum", "chosen_logp_sum",
             "rejected_reward_sum", "rejected_logp_sum")


def unsupported_fused_fields(args: Any) -> list[str]:
    """The ``KTOConfig`` settings the fused path does not implement, as ``"field=value"`` strings."""
    return moe_aux_unsupported(args)


def _raise_unsupported(bad: list[str]) -> None:
    raise_unsupported("FastPrefKTOConfig", "KTOTrainer", bad)


@dataclass
class FastPrefKTOConfig(FastPrefFields, KTOConfig):
    """``trl.KTOConfig`` plus fastpref's flag and knobs.

    Args:
        use_fastpref: the one flag: fastpref's fused log-probs and KTO loss (True) or trl's own path (False,
            default).
        fastpref_mode, fastpref_memory_budget, fastpref_backend, fastpref_gemm: ``fastpref.KTOLoss``'s ``mode``
            ("auto" / "fast" / "lean"), ``memory_budget`` (bytes of logits fast mode may hold), ``backend`` and
            ``gemm``. A bad value raises ``ValueError`` naming the field when the config is built.

    With ``use_fastpref=True``, ``router_aux_loss_coef`` (an MoE auxiliary loss) raises ``ValueError`` naming it;
    so do, when the trainer is built, a vision dataset, an MoE model whose config turns the auxiliary loss on and
    a prompt-learning PEFT adapter (virtual tokens).
    """

    def __post_init__(self) -> None:
        check_fastpref_fields(self)
        super().__post_init__()
        if self.use_fastpref:
            _raise_unsupported(unsupported_fused_fields(self))


class FastPrefKTOTrainer(KTOTrainer):
    """trl 1.16's ``KTOTrainer`` whose log-probs and loss run through fastpref when ``args.use_fastpref``.

    Same constructor as ``trl.KTOTrainer``. With a plain ``KTOConfig`` or ``use_fastpref=False`` nothing differs
    from ``trl.KTOTrainer``. With the flag on, each step scores the mismatched KL batch (policy and reference) and
    the reference forward-only through the fused head, gathers z₀ over ranks as TRL does, and runs
    ``fastpref.KTOLoss`` inside the policy's forward; the metrics keep TRL's names and aggregation (``entropy``
    and ``logits/*`` come from the same kernel pass).
    """

    _tag_names: ClassVar[list[str]] = ["trl", "kto", "fastpref"]

    def __init__(self, model: Any, ref_model: Any | None = None, args: KTOConfig | None = None,
                 data_collator: Any | None = None, train_dataset: Any | None = None, eval_dataset: Any | None = None,
                 processing_class: Any | None = None, compute_metrics: Any | None = None,
                 callbacks: list | None = None, optimizers: tuple = (None, None),
                 quantization_config: Any | None = None, peft_config: Any | None = None) -> None:
        self.use_fastpref = bool(getattr(args, "use_fastpref", False))
        self.fastpref_loss: KTOLoss | None = None
        common = dict(model=model, ref_model=ref_model, args=args, data_collator=data_collator,
                      train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                      compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                      quantization_config=quantization_config, peft_config=peft_config)
        if not self.use_fastpref:
            super().__init__(**common)
            return
        _raise_unsupported(unsupported_fused_fields(args))
        configs = [peft_config, *getattr(model, "peft_config", {}).values()]
        if any(getattr(c, "is_prompt_learning", False) for c in configs):
            raise ValueError("peft_config: a prompt-learning adapter (virtual tokens) is not supported with "
                             "use_fastpref=True (the fused head scores the backbone's positions only); use LoRA-like "
                             "adapters or use_fastpref=False")
        super().__init__(**common)
        if self._is_vision_dataset:
            raise ValueError("FastPrefKTOConfig(use_fastpref=True) supports text (language-model) datasets; this "
                             "one has images. Set use_fastpref=False for vision-language models.")
        if self.aux_loss_enabled:
            _raise_unsupported([f"router_aux_loss_coef={self.router_aux_loss_coef!r} (the MoE load-balancing loss "
                                "is on by this model's config; set router_aux_loss_coef=0.0)"])
        policy = unwrap_peft(self.accelerator.unwrap_model(self.model))
        self._patch(policy)
        if self.ref_model is not None:
            self._patch(unwrap_peft(self.accelerator.unwrap_model(self.ref_model)))
        self.fastpref_loss = self._build_loss(policy)

    def _patch(self, base: Any) -> None:
        add_fused_lm_head(base, backend=self.args.fastpref_backend, gemm=self.args.fastpref_gemm)

    def _build_loss(self, policy: Any) -> KTOLoss:
        """The fused loss of ``self.args`` with ``policy``'s head transform (also used by the precompute pass that
        trl runs inside ``__init__``, before ``self.fastpref_loss`` exists)."""
        a = self.args
        return KTOLoss(a.loss_type, beta=a.beta, desirable_weight=a.desirable_weight,
                       undesirable_weight=a.undesirable_weight, mode=a.fastpref_mode,
                       memory_budget=a.fastpref_memory_budget, backend=a.fastpref_backend, gemm=a.fastpref_gemm,
                       token_metrics=True, **head_transform(policy))

    # -- forward-only scoring (reference, KL pass, precompute) -----------------------------------------------------
    def _score(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
               reference: bool) -> torch.Tensor:
        """Sequence sums [B] through the fused head, under no-grad, scored as the loss scores the policy (a
        reference equal to the policy gives rewards of exactly 0). ``reference``: in the reference's context
        (its own model, or the PEFT policy with the "ref" adapter or none), gradient checkpointing off, as TRL."""
        from trl.models.utils import disable_gradient_checkpointing

        base = unwrap_peft(self.accelerator.unwrap_model(model))
        if not is_patched(base):  # e.g. the precompute pass, which runs inside trl's __init__
            self._patch(base)
        loss_fn = self.fastpref_loss if self.fastpref_loss is not None else self._build_loss(base)
        policy = self.accelerator.unwrap_model(self.model)
        context = contextlib.ExitStack()
        if reference:
            context.enter_context(disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs))
            context.enter_context(reference_context(policy, self.ref_model))
        # The reference was prepared (its forward wrapped in the accelerator's autocast) before the fused head
        # replaced that forward: score under the policy's autocast, or a reference equal to it would differ.
        with torch.no_grad(), context, self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, preference_loss=loss_fn,
                        score_only=True)
        return out.sequence_logps.float()

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.use_fastpref:
            return super().compute_ref_log_probs(model, inputs)
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        logps = self._score(model, inputs["input_ids"], inputs["attention_mask"], labels, reference=True)
        kl_logps = None
        if self.calculate_KL:
            kl_labels = inputs["KL_input_ids"].masked_fill(inputs["KL_completion_mask"] == 0, -100)
            kl_logps = self._score(model, inputs["KL_input_ids"], inputs["KL_attention_mask"], kl_labels,
                                   reference=True)
        return logps, kl_logps

    # -- loss -------------------------------------------------------------------------------------------------------
    def _kl_estimate(self, model: Any, ref_model: Any, batch: dict[str, Any]) -> torch.Tensor | None:
        """z₀ as TRL forms it: the per-rank mean of (policy − reference) KL sums, gathered, averaged, clamped."""
        if not self.calculate_KL:
            return None
        kl_labels = batch["KL_input_ids"].masked_fill(batch["KL_completion_mask"] == 0, -100)
        ids, mask = batch["KL_input_ids"], batch["KL_attention_mask"]
        kl_logps = self._score(model, ids, mask, kl_labels, reference=False)
        if self.precompute_ref_logps:
            ref_kl = batch["ref_KL_logps"].float()
        else:
            ref_kl = self._score(ref_model, ids, mask, kl_labels, reference=True)
        kl = (kl_logps - ref_kl).mean().detach()
        return self.accelerator.gather_for_metrics(kl).mean().clamp(min=0)

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        if not self.use_fastpref:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        desirable = torch.as_tensor(batch["label"], dtype=torch.bool, device=device)
        ref_model = self.ref_model if self.ref_model is not None else self.model
        kl = self._kl_estimate(model, ref_model, batch)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        if self.precompute_ref_logps:
            ref = batch["ref_logps"].float()
        else:
            ref = self._score(ref_model, batch["input_ids"], batch["attention_mask"], labels, reference=True)
        model_kwargs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
        outputs = model(**model_kwargs, labels=labels, preference_loss=self.fastpref_loss.bind(desirable, kl),
                        ref_logps=ref)
        if not isinstance(outputs, FusedHeadOutput):
            raise RuntimeError("the policy's forward did not run fastpref's fused head (another patch replaced "
                               "model.forward after FastPrefKTOTrainer was built)")
        self._log_fastpref_metrics(mode, outputs.preference, batch)
        loss = outputs.loss  # the model output's (ZeRO-3 re-gathers the head in its backward)
        if return_outputs:
            warnings.warn("`return_outputs=True`, and the logits it passes to `compute_metrics`, are deprecated in "
                          "trl 1.16; the fused path builds no logits, so they are recomputed with an extra forward.",
                          FutureWarning, stacklevel=2)
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _log_fastpref_metrics(self, mode: str, out: Any, batch: dict[str, Any]) -> None:
        """trl 1.16 KTOTrainer's metrics with its aggregation: sums gathered over ranks, divided by gathered
        counts; the chosen (rejected) metrics only when some rank had a desirable (undesirable) completion."""
        s = out.token_sums
        vec = torch.stack([s[k].float() for k in _SUM_KEYS] + [batch["attention_mask"].sum().float()])
        totals = self.accelerator.gather_for_metrics(vec.unsqueeze(0)).reshape(-1, vec.shape[0]).sum(0)
        values = torch.cat([totals, out.kl.reshape(1).float()]).tolist()  # the one host sync
        t, kl = dict(zip((*_SUM_KEYS, "input_tokens"), values[:-1])), values[-1]
        metrics = self._metrics[mode]
        metrics["kl"].append(kl)
        metrics["entropy"].append(t["entropy_sum"] / t["scored_tokens"] if t["scored_tokens"] > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += int(t["input_tokens"]) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if t["chosen_tokens"] > 0:
            metrics["logits/chosen"].append(t["chosen_logit_sum"] / t["chosen_tokens"])
        if t["rejected_tokens"] > 0:
            metrics["logits/rejected"].append(t["rejected_logit_sum"] / t["rejected_tokens"])
        if t["chosen_seqs"] > 0:
            metrics["rewards/chosen"].append(t["chosen_reward_sum"] / t["chosen_seqs"])
            metrics["logps/chosen"].append(t["chosen_logp_sum"] / t["chosen_seqs"])
        if t["rejected_seqs"] > 0:
            metrics["rewards/rejected"].append(t["rejected_reward_sum"] / t["rejected_seqs"])
            metrics["logps/rejected"].append(t["rejected_logp_sum"] / t["rejected_seqs"])
        if t["chosen_seqs"] > 0 and t["rejected_seqs"] > 0:
            metrics["rewards/margins"].append(metrics["rewards/chosen"][-1] - metrics["rewards/rejected"][-1])


__all__ = ["FastPrefKTOConfig", "FastPrefKTOTrainer", "unsupported_fused_fields"]
