"""The fused LM head inside a Hugging Face causal LM's forward (``add_fused_lm_head``).

After ``add_fused_lm_head(model)``, the model's forward takes three extra modes, all of which run the backbone
and then fastpref's kernels on ``(last_hidden_state, lm_head.weight)`` — no ``[tokens, vocab]`` logits:

- ``model(input_ids, ..., labels=labels, return_logps=True)`` -> ``outputs.token_logps`` ``[B, T-1]``;
- ``model(..., labels=labels, preference_loss=loss_fn, ref_logps=...)`` -> the whole fused preference loss
  (``outputs.loss``, ``outputs.preference``, a ``fastpref.PreferenceOutput``);
- anything else -> the original forward, so generation and plain training are unchanged.

Everything runs inside the module's forward, so DDP's reducer, FSDP's unshard of the root module (which owns
the head) and DeepSpeed ZeRO-3 (gathered explicitly, as TRL does) all see the head's parameters used there.
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

_PATCH_ATTR = "_fastpref_fused_head"
_PREVIOUS_ATTR = "_fastpref_previous_forward"


@dataclass(frozen=True)
class FusedHeadSettings:
    """Logit transform of the model's head (read from its config, as TRL does), the requested backend and GEMM
    path."""

    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None
    backend: str = "auto"
    gemm: str | None = None

    def transform_kwargs(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "logit_scale": self.logit_scale, "softcap": self.softcap}


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_transform(model: Any) -> dict[str, Any]:
    """``{"logit_scale": ..., "softcap": ...}`` of a causal LM's output head, read from its config the way trl 1.16
    does (Gemma's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``, ...).

    Build the preference loss with these (``PreferenceLoss(..., **head_transform(model))``) so the fused path
    scores exactly what the model's own forward would.
    """
    cfg = _text_config(model)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    if scale is None:
        scale = getattr(cfg, "output_multiplier", None)
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = cfg.logits_scaling if getattr(cfg, "model_type", "") == "hyperclovax" else 1.0 / cfg.logits_scaling
    return {"logit_scale": 1.0 if scale is None else float(scale),
            "softcap": None if softcap is None else float(softcap)}


@dataclass
class FusedHeadOutput(ModelOutput):
    """Output of a model patched by ``add_fused_lm_head`` in one of its fused modes.

    Args:
        loss: with ``preference_loss``, the preference loss; with ``return_logps``, the mean negative
            log-likelihood of the scored tokens (divided by ``num_items_in_batch`` when given), as HF's loss.
            Backpropagate this tensor, not ``preference.loss`` (the same value): DeepSpeed ZeRO-3 replaces the
            output's tensors by ones whose backward first re-gathers the partitioned head.
        token_logps: ``[B, T-1]`` (``[B, T]`` with ``shift_labels``) fp32; entry t = log p(label of t + 1 | ≤ t),
            0 where that label is -100. Only with ``return_logps=True``.
        sequence_logps: ``[B]`` sums of ``token_logps`` per row, or ``[num_seqs]`` per packed sequence.
        preference: the ``fastpref.PreferenceOutput`` of ``preference_loss``.
        label_mask: ``[B, T-1]`` bool, the scored positions.
    """

    loss: torch.Tensor | None = None
    token_logps: torch.Tensor | None = None
    sequence_logps: torch.Tensor | None = None
    preference: Any = None
    label_mask: torch.Tensor | None = None


def is_patched(model: Any) -> bool:
    """Whether ``add_fused_lm_head`` has patched ``model``."""
    return getattr(model, _PATCH_ATTR, None) is not None


def _gathered_head(weight: torch.Tensor, bias: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """ZeRO-3 shards every parameter to numel 0 outside its owning module's forward; the head module is never
    called here, so gather its parameters for the kernel (a null context everywhere else)."""
    if not hasattr(weight, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed  # only reachable when the parameters are DeepSpeed's
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    todo = {id(p): p for p in (weight, bias) if p is not None and p.ds_status != ZeroParamStatus.AVAILABLE}
    return deepspeed.zero.GatheredParameters(list(todo.values())) if todo else contextlib.nullcontext()


def _is_zero3(weight: torch.Tensor) -> bool:
    return hasattr(weight, "ds_id")


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    # FSDP2 exposes sharded parameters as DTensors when the head is used outside its unshard window.
    if t is not None and type(t).__name__ == "DTensor":
        return t.full_tensor()
    return t


def _fsdp_sharded(*modules: Any) -> bool:
    """Whether the head's parameters are FSDP2's (sharded over the data-parallel ranks, whose tokens differ: the
    head is gathered); a DTensor head outside FSDP is tensor parallel and is scored on its local vocabulary shard
    (``fastpref.ops.vocab_shard``), never gathered."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return True
    return any(isinstance(m, FSDPModule) for m in modules)


def _shift(labels: torch.Tensor | None, shift_labels: torch.Tensor | None, what: str) -> tuple[torch.Tensor, bool]:
    if shift_labels is not None:
        return shift_labels, False
    if labels is None:
        raise ValueError(f"labels: {what} needs `labels` (unshifted, -100 = not scored) or `shift_labels`, got neither")
    return labels[..., 1:], True


def _shift_seq_ids(seq_ids: torch.Tensor | None, shifted: bool) -> torch.Tensor | None:
    if seq_ids is None:
        return None
    return seq_ids[..., 1:] if shifted else seq_ids


def _check_loss_transform(loss_fn: Any, settings: FusedHeadSettings) -> None:
    """The loss module carries its own logit transform; it must be the model's, or the fused loss would score a
    different distribution than the model's forward."""
    config = getattr(loss_fn, "config", None)
    transform = getattr(config, "transform", None)
    if transform is None:
        return
    want = (settings.logit_scale, settings.softcap, settings.temperature)
    got = (transform.logit_scale, transform.softcap, transform.temperature)
    if got != want:
        raise ValueError(
            "preference_loss: its logit transform (logit_scale, softcap, temperature) = "
            f"{got} differs from the model's {want}; build it with "
            "`PreferenceLoss(..., **fastpref.integrations.fused_head.head_transform(model))` (and the same "
            "temperature)")


def add_fused_lm_head(model: Any, *, temperature: float = 1.0, backend: str = "auto", gemm: str | None = None) -> Any:
    """Patch ``model.forward`` with fastpref's fused LM head (in place; returns ``model``). Idempotent.

    Afterwards, besides its usual arguments, the forward accepts:

    - ``return_logps=True`` with ``labels`` (unshifted, HF's convention) or ``shift_labels`` (already shifted):
      returns a ``FusedHeadOutput`` with ``token_logps`` ``[B, T-1]`` (entry t = log p(input_ids[t+1] | ≤ t),
      0 where ``labels[:, t+1] == -100``) and ``sequence_logps``.
    - ``preference_loss=loss_fn`` (a ``fastpref.PreferenceLoss``) with ``labels``, and optionally ``ref_logps``
      ``[B]`` (sums, batch layout), ``seq_ids`` / ``num_seqs`` (packed batches: ``input_ids [1, N]`` with
      ``position_ids``; ``seq_ids`` aligned with ``input_ids``), ``refinement`` ``[B/2]``, or the prompt-augmented
      batch of Sr-DPO / Sr-IPO (``refine_input_ids``, ``refine_attention_mask``, ``refine_labels``,
      ``refine_ref_logps``), whose backbone pass runs here under no-grad. Returns ``outputs.loss`` and
      ``outputs.preference``. With ``score_only=True`` it returns only ``outputs.sequence_logps`` ``[B]`` under
      no-grad, scored exactly as the loss scores the policy (``PreferenceLoss.score``): the reference pass.

    Any other call runs the original forward (generation unchanged). The backbone and the head are looked up on
    each call (PEFT and FSDP replace them after patching); patch the base model before wrapping it with PEFT, or
    patch ``peft_model.get_base_model()``. ``logit_scale`` and ``softcap`` come from the config
    (``head_transform``); ``temperature`` divides the logits; ``backend`` and ``gemm`` choose the kernels of
    ``return_logps`` (``fastpref.token_logps``; ``gemm``: None = ``$FASTPREF_GEMM``, else ``"cublas"``;
    ``"fused"`` / ``"auto"`` are opt-in).
    """
    settings = FusedHeadSettings(temperature=float(temperature), backend=backend, gemm=gemm, **head_transform(model))
    if is_patched(model):
        object.__setattr__(model, _PATCH_ATTR, settings)  # re-patching only updates the settings
        return model
    # An instance-level forward already there (e.g. TRL's own fused head) stays reachable. Kept as an attribute,
    # not in the closure, so `copy.deepcopy(model)` (a reference copy) delegates to its own forward.
    object.__setattr__(model, _PREVIOUS_ATTR, model.__dict__.get("forward"))

    # Keep the original signature: `generate` validates its model kwargs against it.
    @functools.wraps(type(model).forward)
    def _forward(self, *args, labels=None, shift_labels=None, return_logps=False, preference_loss=None,
                 ref_logps=None, seq_ids=None, num_seqs=None, refinement=None, refine_input_ids=None,
                 refine_attention_mask=None, refine_position_ids=None, refine_labels=None, refine_ref_logps=None,
                 num_items_in_batch=None, score_only=False, **kwargs):
        if not return_logps and preference_loss is None:
            extras = {"seq_ids": seq_ids, "num_seqs": num_seqs, "ref_logps": ref_logps, "refinement": refinement,
                      "refine_input_ids": refine_input_ids, "refine_labels": refine_labels}
            given = [k for k, v in extras.items() if v is not None]
            if given:
                raise TypeError(f"{given}: only meaningful with `preference_loss=` or `return_logps=True`")
            for key, value in (("labels", labels), ("shift_labels", shift_labels),
                               ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[key] = value
            previous = self.__dict__.get(_PREVIOUS_ATTR)
            if previous is None:
                return type(self).forward(self, *args, **kwargs)
            return previous(*args, **kwargs)
        head_settings: FusedHeadSettings = getattr(self, _PATCH_ATTR)
        if preference_loss is not None and score_only:
            return _score_forward(self, head_settings, args, kwargs, labels=labels, shift_labels=shift_labels,
                                  loss_fn=preference_loss, seq_ids=seq_ids, num_seqs=num_seqs)
        if preference_loss is not None:
            return _preference_forward(
                self, head_settings, args, kwargs, labels=labels, shift_labels=shift_labels,
                loss_fn=preference_loss, ref_logps=ref_logps, seq_ids=seq_ids, num_seqs=num_seqs,
                refinement=refinement, refine=(refine_input_ids, refine_attention_mask, refine_position_ids,
                                               refine_labels, refine_ref_logps),
            )
        return _logps_forward(self, head_settings, args, kwargs, labels=labels, shift_labels=shift_labels,
                              seq_ids=seq_ids, num_seqs=num_seqs, num_items_in_batch=num_items_in_batch)

    object.__setattr__(model, _PATCH_ATTR, settings)
    model.forward = types.MethodType(_forward, model)
    return model


def _backbone_hidden(model: Any, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    kwargs = dict(kwargs)
    kwargs["use_cache"] = False
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("return_dict", None)
    out = model.base_model(*args, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _check_whole_vocabulary(model: Any, weight: torch.Tensor) -> None:
    """A head with fewer rows than the config's vocabulary is a local shard of it (tensor parallel kept as a plain
    tensor): scored as a whole head it gives a silently wrong distribution, so refuse it."""
    vocab = getattr(_text_config(model), "vocab_size", None)
    if vocab is None or _is_zero3(weight) or weight.shape[0] >= vocab:  # ZeRO-3 partitions read numel 0
        return
    raise ValueError(
        f"lm_head.weight: {weight.shape[0]} rows, fewer than the config's vocab_size {vocab}: a vocabulary shard "
        "as a plain tensor would be scored as the whole head (a wrong log-softmax). fastpref needs the whole head "
        "here: keep the weight a DTensor (a Shard(0) head is scored on its local shard, never gathered) or unshard it")


def _head(model: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if _fsdp_sharded(model, head):
        weight, bias = _full(weight), _full(bias)
    _check_whole_vocabulary(model, weight)
    # With the model split across devices (device_map), the backbone may end on another device than the head.
    return weight, bias, hidden.to(weight.device)


def _head_inputs(model, args, kwargs, labels, shift_labels, what):
    """The backbone's hidden states aligned with the (shifted) targets, and the head weight and bias on their
    device: ``(hidden, target, weight, bias, shifted)``."""
    target, shifted = _shift(labels, shift_labels, what)
    hidden = _backbone_hidden(model, args, kwargs)
    if shifted:
        hidden = hidden[:, :-1]
    weight, bias, hidden = _head(model, hidden)
    return hidden, target.to(weight.device), weight, bias, shifted


def _logps_forward(model, settings, args, kwargs, *, labels, shift_labels, seq_ids, num_seqs, num_items_in_batch):
    from ..functional import token_logps
    from ..reference import sequence_sums

    hidden, target, weight, bias, shifted = _head_inputs(model, args, kwargs, labels, shift_labels,
                                                         "return_logps=True")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} after the shift (the backbone's output), "
                         f"got {tuple(target.shape)}")
    if _is_zero3(weight) and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        raise NotImplementedError(
            "return_logps=True with gradients under DeepSpeed ZeRO-3: the backward recomputes the logits from the "
            "head weight, which ZeRO-3 re-partitions after the forward. Train through preference_loss= (its fast "
            "mode forms the gradients during the forward), or call return_logps under torch.no_grad()")
    with _gathered_head(weight, bias):
        tok = token_logps(hidden, weight, target, bias=bias, backend=settings.backend, gemm=settings.gemm,
                          **settings.transform_kwargs())
    mask = target != -100
    seq_shifted = _shift_seq_ids(seq_ids, shifted)
    ids = None if seq_shifted is None else seq_shifted.to(tok.device).long()
    # packed: the deterministic per-id sums (no index_add float atomics)
    seq, _ = sequence_sums(tok, mask, ids, None if num_seqs is None else int(num_seqs))
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedHeadOutput(loss=-tok.sum() / denom, token_logps=tok, sequence_logps=seq, label_mask=mask)


def _loss_inputs(model, settings, args, kwargs, *, labels, shift_labels, loss_fn, seq_ids, num_seqs):
    """The backbone's hidden states, the shifted targets and the head, in the layout ``loss_fn`` takes:
    ``(hidden, weight, target, kwargs)`` with ``bias`` (and ``seq_ids`` / ``num_seqs`` for packed batches)."""
    _check_loss_transform(loss_fn, settings)
    hidden, target, weight, bias, shifted = _head_inputs(model, args, kwargs, labels, shift_labels,
                                                         "preference_loss")
    loss_kwargs: dict[str, Any] = {"bias": bias}
    seq_shifted = _shift_seq_ids(seq_ids, shifted)
    if seq_shifted is not None:
        # Packed: one row (or several) of concatenated sequences -> the [N, H] layout with sequence ids.
        hidden = hidden.reshape(-1, hidden.shape[-1])
        target = target.reshape(-1)
        loss_kwargs.update(seq_ids=seq_shifted.reshape(-1).to(weight.device), num_seqs=num_seqs)
    return hidden, weight, target, loss_kwargs


def _score_forward(model, settings, args, kwargs, *, labels, shift_labels, loss_fn, seq_ids, num_seqs):
    """Reference / evaluation sums [B] (batch layout) under no-grad, scored exactly as ``loss_fn`` scores the
    policy in training (``PreferenceLoss.score``): a reference equal to the policy gives rewards of exactly 0."""
    with torch.no_grad():
        hidden, weight, target, score_kwargs = _loss_inputs(
            model, settings, args, kwargs, labels=labels, shift_labels=shift_labels, loss_fn=loss_fn,
            seq_ids=seq_ids, num_seqs=num_seqs)
        with _gathered_head(weight, score_kwargs["bias"]):
            seq = loss_fn.score(hidden, weight, target, **score_kwargs)
    return FusedHeadOutput(sequence_logps=seq)


def _preference_forward(model, settings, args, kwargs, *, labels, shift_labels, loss_fn, ref_logps, seq_ids,
                        num_seqs, refinement, refine):
    hidden, weight, target, loss_kwargs = _loss_inputs(
        model, settings, args, kwargs, labels=labels, shift_labels=shift_labels, loss_fn=loss_fn, seq_ids=seq_ids,
        num_seqs=num_seqs)
    bias = loss_kwargs["bias"]
    loss_kwargs["refinement"] = refinement
    r_ids, r_mask, r_pos, r_labels, r_ref = refine
    if r_ids is not None:
        if "seq_ids" in loss_kwargs:
            raise ValueError("refine_input_ids: the prompt-augmented batch of Sr-DPO / Sr-IPO is only supported "
                             "with padded batches, not packed ones (seq_ids given)")
        if r_labels is None:
            raise ValueError("refine_labels: required with refine_input_ids (unshifted, -100 = not scored)")
        with torch.no_grad():  # the refinement margin is a stop-gradient term
            r_hidden = _backbone_hidden(model, (), {"input_ids": r_ids, "attention_mask": r_mask,
                                                    "position_ids": r_pos})
        loss_kwargs.update(refine_hidden=r_hidden[:, :-1].to(weight.device),
                           refine_labels=r_labels[:, 1:].to(weight.device), refine_ref_logps=r_ref)
    with _gathered_head(weight, bias):
        out = loss_fn(hidden, weight, target, ref_logps, **loss_kwargs)
    if _is_zero3(weight) and out.mode == "lean":
        raise NotImplementedError(
            "preference_loss ran in lean mode under DeepSpeed ZeRO-3, whose backward would recompute from a head "
            "weight ZeRO-3 has re-partitioned; use a pair-separable loss type with mode='fast' (or 'auto' with a "
            "memory_budget that fits one pair group's logits)")
    return FusedHeadOutput(loss=out.loss, preference=out)


__all__ = ["FusedHeadOutput", "FusedHeadSettings", "add_fused_lm_head", "head_transform", "is_patched"]
