"""TRL integration: ``FastPrefDPOTrainer`` is trl's ``DPOTrainer`` with one flag, ``use_fastpref``.

``FastPrefDPOConfig(..., use_fastpref=True)`` keeps everything of TRL's trainer — its dataset pipeline and
collator, every reference path (``ref_model``, the PEFT adapter disabled or its ``"ref"`` copy,
``precompute_ref_log_probs``), ``loss_type`` / ``loss_weights``, gradient accumulation and the logged metric
names — and replaces the log-prob + loss computation by fastpref's fused kernels, run inside the policy's
forward (``fastpref.integrations.hf.add_fused_lm_head``). It adds ``sr_dpo`` / ``sr_ipo`` (Sr-DPO / Sr-IPO with
``refinement_lambda`` and ``refinement_prompt``) and packed batches (``padding_free=True``, which trl 1.16
ignores). With the flag off the trainer *is* ``trl.DPOTrainer``: no method of it is changed.

Supported TRL versions: those of the ``trl`` extra (``trl>=1.16,<1.17``); importing this module with any other
version raises ``ImportError``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

SUPPORTED_TRL = ("1.16", "1.17")  # [lower, upper): the range of the `trl` extra


def check_trl_version(version: str | None = None) -> str:
    """Raise ``ImportError`` unless ``version`` (default: the installed trl's) is in the supported range."""
    from packaging.version import Version

    if version is None:
        try:
            import trl
        except ImportError as e:
            raise ImportError("fastpref.integrations.trl needs TRL: pip install 'fastpref[trl]' "
                              f"(trl>={SUPPORTED_TRL[0]},<{SUPPORTED_TRL[1]})") from e
        version = trl.__version__
    low, high = (Version(v) for v in SUPPORTED_TRL)
    if not low <= Version(Version(version).base_version) < high:
        raise ImportError(
            f"fastpref.integrations.trl supports trl>={SUPPORTED_TRL[0]},<{SUPPORTED_TRL[1]} (the `trl` extra of "
            f"fastpref); found trl {version}. Install a supported version: pip install 'fastpref[trl]'")
    return version


check_trl_version()

from trl import DPOConfig, DPOTrainer  # noqa: E402

from ..losses import rewards  # noqa: E402
from .collator import PreferenceCollator  # noqa: E402
from .fused_head import FusedHeadOutput, add_fused_lm_head, is_patched  # noqa: E402
from .trainer_common import (  # noqa: E402
    REFINE_REF_KEYS,
    SR_LOSSES,
    SR_PROMPT,
    FastPrefFields,
    check_fastpref_fields,
    completion_labels,
    fused_reference_logps,
    gather_metrics,
    input_tokens,
    model_inputs,
    moe_aux_unsupported,
    packed_kwargs,
    raise_unsupported,
    reference_context,
    trainer_loss,
    unwrap_peft,
)

_REFINE_COLUMNS = ("refine_prompt_ids", "refine_chosen_ids", "refine_rejected_ids")


def unsupported_fused_fields(args: Any) -> list[str]:
    """The ``DPOConfig`` settings the fused path does not implement, as ``"field=value"`` strings."""
    bad = []
    if getattr(args, "ld_alpha", None) is not None:
        bad.append(f"ld_alpha={args.ld_alpha!r} (LD-DPO token weighting; use ld_alpha=None)")
    if getattr(args, "f_divergence_type", "reverse_kl") != "reverse_kl":
        bad.append(f"f_divergence_type={args.f_divergence_type!r} (f-DPO; use 'reverse_kl')")
    if getattr(args, "use_weighting", False):
        bad.append("use_weighting=True (WPO weights need log Σ p² per token; use use_weighting=False)")
    return bad + moe_aux_unsupported(args)


def _raise_unsupported(bad: list[str]) -> None:
    raise_unsupported("FastPrefDPOConfig", "DPOTrainer", bad)


@dataclass
class FastPrefDPOConfig(FastPrefFields, DPOConfig):
    """``trl.DPOConfig`` plus fastpref's flag and knobs.

    Args:
        use_fastpref: the one flag: fastpref's fused log-probs and loss (True) or trl's own path (False, default).
        refinement_lambda, refinement_prompt: λ and the prompt p of ``loss_type="sr_dpo"`` / ``"sr_ipo"``
            (None = the paper's prompt). These loss types need ``use_fastpref=True``.
        fastpref_mode, fastpref_memory_budget, fastpref_backend, fastpref_gemm: ``fastpref.PreferenceLoss``'s
            ``mode`` ("auto" / "fast" / "lean"), ``memory_budget`` (bytes of logits fast mode may hold), ``backend``
            and ``gemm`` (the GEMM path: None = ``$FASTPREF_GEMM``, else "cublas"; "fused" / "auto" opt-in). A
            bad value raises ``ValueError`` naming the field when the config is built.

    With ``use_fastpref=True``, ``padding_free=True`` packs every batch into one row (trl 1.16 falls back to
    padding), and ``ld_alpha``, a non-default ``f_divergence_type``, ``use_weighting`` and
    ``router_aux_loss_coef`` raise ``ValueError`` naming them.
    """

    refinement_lambda: float = field(default=0.5, metadata={"help": "λ of Sr-DPO / Sr-IPO."})
    refinement_prompt: str | None = field(default=None, metadata={"help": "p of Sr-DPO / Sr-IPO (None: paper's)."})

    def __post_init__(self) -> None:
        check_fastpref_fields(self)  # before TrainingArguments' set-up: a typo fails first, at once
        super().__post_init__()
        sr = [t for t in self.loss_type if t in SR_LOSSES]
        if sr and not self.use_fastpref:
            raise ValueError(f"loss_type: {sr} are fastpref's loss types (Sr-DPO / Sr-IPO); set use_fastpref=True")
        if self.use_fastpref:
            _raise_unsupported(unsupported_fused_fields(self))


class _RefineCollator:
    """Wrap a preference collator: also collate the p ⊕ x twins (``refine_*_ids`` columns) as ``refine_*``."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(examples)
        twins = [{"prompt_ids": e["refine_prompt_ids"], "chosen_ids": e["refine_chosen_ids"],
                  "rejected_ids": e["refine_rejected_ids"]} for e in examples]
        refine = self.base(twins)
        batch.update(refine_input_ids=refine["input_ids"], refine_attention_mask=refine["attention_mask"],
                     refine_completion_mask=refine["completion_mask"], refine_labels=completion_labels(refine))
        for key in REFINE_REF_KEYS:  # precomputed reference sums of the twins
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
        return batch


class FastPrefDPOTrainer(DPOTrainer):
    """trl 1.16's ``DPOTrainer`` whose log-probs and loss run through fastpref when ``args.use_fastpref``.

    Same constructor as ``trl.DPOTrainer``. With a plain ``DPOConfig`` or ``use_fastpref=False`` nothing differs
    from ``trl.DPOTrainer``. With the flag on: the policy (its base model under PEFT) and the reference model
    get fastpref's fused head; each step scores the reference by the forward-only kernel (or reads the
    precomputed sums) and runs the fused loss inside the policy's forward; metrics keep TRL's names and
    aggregation (entropy and mean_token_accuracy come from the same kernel pass).
    """

    _tag_names: ClassVar[list[str]] = ["trl", "dpo", "fastpref"]

    def __init__(self, model: Any, ref_model: Any | None = None, args: DPOConfig | None = None,
                 data_collator: Any | None = None, train_dataset: Any | None = None, eval_dataset: Any | None = None,
                 processing_class: Any | None = None, compute_metrics: Any | None = None,
                 callbacks: list | None = None, optimizers: tuple = (None, None),
                 quantization_config: Any | None = None, peft_config: Any | None = None) -> None:
        self.use_fastpref = bool(getattr(args, "use_fastpref", False))
        self.fastpref_loss = None
        self.refinement_prompt = None
        common = dict(model=model, ref_model=ref_model, args=args, data_collator=data_collator,
                      train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                      compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                      quantization_config=quantization_config, peft_config=peft_config)
        if not self.use_fastpref:
            super().__init__(**common)
            return
        _raise_unsupported(unsupported_fused_fields(args))
        if any(t in SR_LOSSES for t in args.loss_type):
            self.refinement_prompt = args.refinement_prompt or SR_PROMPT
        # trl 1.16 warns and ignores padding_free; fastpref packs, so keep it away from trl's check.
        packed = bool(args.padding_free)
        args.padding_free = False
        try:
            super().__init__(**common)
        finally:
            args.padding_free = packed
        if self._is_vision_dataset:
            raise ValueError("FastPrefDPOConfig(use_fastpref=True) supports text (language-model) datasets; this "
                             "one has images. Set use_fastpref=False for vision-language models.")
        if self.aux_loss_enabled:
            _raise_unsupported([f"router_aux_loss_coef={self.router_aux_loss_coef!r} (the MoE load-balancing loss "
                                "is on by this model's config; set router_aux_loss_coef=0.0)"])
        self.padding_free = packed
        if packed and data_collator is None:
            if self.refinement_prompt:
                raise ValueError("padding_free=True with sr_dpo / sr_ipo: the prompt-augmented batch is collated "
                                 "padded only; set padding_free=False")
            attn = getattr(unwrap_peft(self.accelerator.unwrap_model(self.model)).config, "_attn_implementation", "")
            self.data_collator = PreferenceCollator(
                pad_token_id=self._tokenizer.pad_token_id, max_length=args.max_length,
                truncation_mode=args.truncation_mode, padding_free=True, pad_to_multiple_of=args.pad_to_multiple_of,
                return_flash_attn_kwargs=(attn or "").startswith("flash"))
        if self.refinement_prompt:
            self.data_collator = _RefineCollator(self.data_collator)
        policy = unwrap_peft(self.accelerator.unwrap_model(self.model))
        add_fused_lm_head(policy, backend=args.fastpref_backend, gemm=args.fastpref_gemm)
        if self.ref_model is not None:
            add_fused_lm_head(unwrap_peft(self.accelerator.unwrap_model(self.ref_model)),
                              backend=args.fastpref_backend, gemm=args.fastpref_gemm)
        self.fastpref_loss = self._build_loss(policy)

    def _build_loss(self, policy: Any) -> Any:
        """The fused loss of ``self.args`` with ``policy``'s head transform (also used by the precompute pass that
        trl runs inside ``__init__``, before ``self.fastpref_loss`` exists)."""
        return trainer_loss(policy, self.args)

    # -- data --------------------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if not self.use_fastpref or self.refinement_prompt is None or _REFINE_COLUMNS[0] in prepared.column_names:
            return prepared
        return self._add_refine_columns(dataset, prepared, processing_class, args, dataset_name)

    def _add_refine_columns(self, raw: Any, prepared: Any, processing_class: Any, args: Any, name: str) -> Any:
        """Tokenize every record's p ⊕ x twin with TRL's own pipeline and attach its ids as ``refine_*`` columns."""
        from datasets import Dataset
        from trl.data_utils import extract_prompt

        from fastpref.data import sr_prompt

        if not isinstance(raw, Dataset):
            raise ValueError("sr_dpo / sr_ipo with FastPrefDPOTrainer need a map-style datasets.Dataset (the "
                             f"prompt-augmented twins are tokenized up front); got {type(raw).__name__}")
        p = self.refinement_prompt
        idx = "__fastpref_row"
        raw = raw.add_column(idx, list(range(len(raw))))
        main = prepared.add_column(idx, list(range(len(prepared)))) if idx not in prepared.column_names else prepared
        if len(prepared) != len(raw):
            # TRL drops examples whose prompt fills max_length: re-derive the kept rows' indices.
            main = super()._prepare_dataset(raw, processing_class, args, name)
        if "prompt" not in raw.column_names:
            raw = raw.map(extract_prompt)
        twins = raw.map(lambda ex: {"prompt": sr_prompt(ex["prompt"], p)})
        twins = super()._prepare_dataset(twins, processing_class, args, f"{name} (p ⊕ x)")
        by_row = {r: i for i, r in enumerate(twins[idx])}
        keep = [i for i, r in enumerate(main[idx]) if r in by_row]
        if len(keep) != len(main):
            main = main.select(keep)
        order = [by_row[r] for r in main[idx]]
        for col, src in zip(_REFINE_COLUMNS, ("prompt_ids", "chosen_ids", "rejected_ids")):
            main = main.add_column(col, [twins[src][i] for i in order])
        return main.remove_columns(idx)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.use_fastpref and self.refinement_prompt and self._signature_columns is not None:
            self._signature_columns = [*self._signature_columns, *_REFINE_COLUMNS, *REFINE_REF_KEYS]

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        """TRL's precompute, plus (Sr losses) the reference sums of the p ⊕ x twins as two more columns."""
        dataset = super()._precompute_ref_logps(dataset, name, batch_size)
        if not (self.use_fastpref and self.refinement_prompt) or REFINE_REF_KEYS[0] in dataset.column_names:
            return dataset
        from torch.utils.data import DataLoader

        twins = dataset.select_columns(list(_REFINE_COLUMNS)).rename_columns(
            dict(zip(_REFINE_COLUMNS, ("prompt_ids", "chosen_ids", "rejected_ids"))))
        loader = self.accelerator.prepare(DataLoader(twins, batch_size=batch_size, collate_fn=self.data_collator,
                                                     shuffle=False))
        model = self._precompute_engine or self.ref_model or self.model
        chosen, rejected = [], []
        for batch in loader:
            c, r = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
            chosen.append(c.cpu())
            rejected.append(r.cpu())
        for column, values in zip(REFINE_REF_KEYS, (chosen, rejected)):
            dataset = dataset.add_column(column, torch.cat(values).tolist())
        return dataset

    # -- reference ---------------------------------------------------------------------------------------------
    def _fused_reference(self, model: Any, batch: dict[str, Any], prefix: str = "") -> torch.Tensor:
        """Reference sums [2P] of a batch (or its ``refine_`` twin) through fastpref's forward-only kernel."""
        from trl.models.utils import disable_gradient_checkpointing

        base = unwrap_peft(self.accelerator.unwrap_model(model))
        if not is_patched(base):  # e.g. the precompute pass, which runs inside trl's __init__
            add_fused_lm_head(base, backend=self.args.fastpref_backend, gemm=self.args.fastpref_gemm)
        loss_fn = self.fastpref_loss if self.fastpref_loss is not None else self._build_loss(base)
        policy = self.accelerator.unwrap_model(self.model)
        # TRL prepared the reference model (its forward wrapped in the accelerator's autocast) before
        # add_fused_lm_head replaced that forward: run the fused reference under the same autocast as the policy
        # (bf16 mixed precision), or a reference equal to the policy would not score bit-identically.
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                reference_context(policy, self.ref_model), self.accelerator.autocast():
            return fused_reference_logps(model, batch, loss_fn, prefix)

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.use_fastpref:
            return super().compute_ref_log_probs(model, inputs)
        return self._fused_reference(model, inputs).chunk(2, dim=0)

    # -- loss --------------------------------------------------------------------------------------------------
    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        if not self.use_fastpref:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        labels = completion_labels(inputs)
        ref_model = self.ref_model if self.ref_model is not None else self.model
        if self.precompute_ref_logps:
            ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float()
        else:
            ref = self._fused_reference(ref_model, inputs)
        extra: dict[str, Any] = packed_kwargs(inputs)
        if self.refinement_prompt:
            if self.precompute_ref_logps:
                refine_ref = torch.cat([inputs[REFINE_REF_KEYS[0]], inputs[REFINE_REF_KEYS[1]]]).float()
            else:
                refine_ref = self._fused_reference(ref_model, inputs, "refine_")
            extra.update(refine_input_ids=inputs["refine_input_ids"],
                         refine_attention_mask=inputs["refine_attention_mask"], refine_labels=inputs["refine_labels"],
                         refine_ref_logps=refine_ref)
        outputs = model(**model_inputs(inputs), labels=labels, preference_loss=self.fastpref_loss, ref_logps=ref,
                        **extra)
        if not isinstance(outputs, FusedHeadOutput):
            raise RuntimeError("the policy's forward did not run fastpref's fused head (another patch replaced "
                               "model.forward after FastPrefDPOTrainer was built)")
        out = outputs.preference
        # The model output's loss, not out.loss: it is the same value, but ZeRO-3 replaced the output's tensors by
        # ones whose backward first re-gathers the head (the head's gradient is formed against its full shape).
        loss = outputs.loss
        self._log_fastpref_metrics(mode, out, inputs, ref)
        if return_outputs:
            warnings.warn("`return_outputs=True`, and the logits it passes to `compute_metrics`, are deprecated in "
                          "trl 1.16; the fused path builds no logits, so they are recomputed with an extra forward.",
                          FutureWarning, stacklevel=2)
            with torch.no_grad():
                outputs = model(**model_inputs(inputs))
        return (loss, outputs) if return_outputs else loss

    def _log_fastpref_metrics(self, mode: str, out: Any, inputs: dict[str, Any], ref: torch.Tensor) -> None:
        """trl 1.16's metrics with its aggregation (``trainer_common.gather_metrics``). Rewards are β·(logps − ref)
        from the reference TRL scored, for every loss type: fastpref's own rewards take ref = 0 for
        reference-free types (``sft``), which TRL does not."""
        ref_chosen, ref_rejected = ref.float().chunk(2)
        values, n_tokens = gather_metrics(self.accelerator, out, input_tokens(inputs),
                                          chosen_rewards=rewards(self.beta, out.chosen_logps, ref_chosen),
                                          rejected_rewards=rewards(self.beta, out.rejected_logps, ref_rejected))
        metrics = self._metrics[mode]
        for name, value in values.items():
            metrics[name].append(value)
        if mode == "train":
            self._total_train_tokens += int(n_tokens) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]


__all__ = ["FastPrefDPOConfig", "FastPrefDPOTrainer", "check_trl_version", "unsupported_fused_fields"]
