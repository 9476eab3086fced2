"""TRL 1.16's fused-head contract (``trl.trainer.utils.add_fused_lm_head``) through fastpref's kernels.

``add_fused_lm_head(model, temperature, cast_lm_head_to_fp32, outputs)`` has TRL's signature and semantics:
afterwards ``model(..., labels=labels, fused_lm_head=True)`` (or pre-shifted ``shift_labels``, as passed under
context / sequence parallelism) returns TRL's own ``FusedCausalLMOutput`` — ``loss``, ``log_probs``, and on request
``entropy``, ``log_sum_sq_probs``, ``mean_logits``, ``is_top1``, plus ``label_mask`` and the MoE ``aux_loss`` —
each zero where the label is -100; any other call is the original forward (generation unchanged). Only the scored
positions are projected, in bounded tiles: no ``[tokens, vocab]`` logits.

Gradients: ``log_probs`` and ``entropy`` (GRPO's entropy bonus) through fastpref's recompute backward
(``head_pass.backward``; the row ops form ``dH/dz_j = -p_j (log p_j + H)`` beside the log-prob's term, with the
forward's H, precise on peaked rows: ``RowStats.entropy_acc``). ``log_sum_sq_probs``,
``mean_logits`` and ``is_top1`` carry no gradient, as in TRL.

Fast mode: the forward also forms the gradient of a loss of the fields through ``ops.fast_token_loss`` (row groups
of logits within the memory budget, turned into their gradient in place) — of ``Σ log_probs`` with
``mode="fast"`` (SFT), or of a loss known before the call (``PredictedLoss``, set by ``predicting``: GRPO's and
RLOO's, ``fastpref.losses.policy``). The backward uses it, scaled, when the upstream gradient is the predicted one
times a scalar (``prediction_scale``: a mean over tokens for SFT; the Trainer's accumulation division or a loss
scaler); otherwise it recomputes as lean mode does (so does a batch whose rows do not fit the budget): the
gradient returned is always the upstream gradient's. The module runs no tile loop of its own: the passes are the
ops'.

``log_sum_sq_probs`` is composed from the ops' log-sum-exp: ``log Σ p² = lse(2z) - 2·lse(z)``, the second
log-sum-exp a forward-only pass at half the temperature (z/(T/2) = 2·z/T exactly in floating point), so it costs
one more 2·n·H·V forward when requested (TRL folds it into the same pass).

``swap_fused_head(module)`` swaps this function for TRL's inside one trainer module while its ``__init__`` runs
(the ``use_fastpref`` flag of ``fastpref.integrations.trl_trainers``).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import contextvars
import dataclasses
import functools
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..ops import HeadPass, LogitTransform, build_layout, finalize_stats, flat_rows, scatter_tokens
from ..ops import head_pass as _head_pass_ops
from ..ops.backend import autocast_off
from ..ops.fast_token_loss import TokenLoss, TokenProblem, token_forward, token_groups
from ..ops.layout import TokenLayout
from ..ops.tile_ops import EntropyGrad, LogSumExp
from ..ops.vocab_shard import whole_head
from ..utils.validation import check_choice, check_memory_budget
from .fused_head import _check_whole_vocabulary, _full, _gathered_head, head_transform

_PATCH_ATTR = "_fastpref_trl_head"  # marks the patched forward (``has_fastpref_head``)
# TRL's per-token fields, in the order of ``ChunkedLogProbFunction``'s outputs after ``log_probs``
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
FIELDS = ("log_probs", *OPTIONAL_OUTPUTS)
MODES = ("lean", "fast")


def check_outputs(outputs: tuple[str, ...]) -> tuple[str, ...]:
    """``outputs`` as TRL's ``add_fused_lm_head`` takes it: a tuple of names among ``FIELDS``."""
    if isinstance(outputs, str) or not all(isinstance(o, str) for o in outputs):
        raise TypeError(f"outputs: expected a tuple of field names among {list(FIELDS)}, got {outputs!r}")
    for name in outputs:
        check_choice("outputs", name, FIELDS)
    return tuple(outputs)


def _sum_of_logps(logps: torch.Tensor, _entropy: torch.Tensor | None, _rows: slice) -> torch.Tensor:
    """Fast mode's loss: Σ log_probs (the upstream gradient, uniform for a mean over tokens, scales it)."""
    return logps.sum()


class GridLoss(Protocol):
    """A loss of per-token log-probs (and entropies) on a [B, T] grid of completion tokens, known before they are:
    ``fastpref.losses.policy.PolicyStep`` (GRPO) and ``RlooStep``. ``rows_loss`` is the loss restricted to the
    tokens ``(b, t)``, all in sequences ``seqs``; summed over a partition of the scored tokens it is the loss
    (parts of whole sequences where ``whole_sequences``). ``entropy``: it differentiates the entropies."""

    whole_sequences: bool
    entropy: bool
    mask: torch.Tensor  # [B, T]

    def rows_loss(self, logps: torch.Tensor, entropies: torch.Tensor | None, b: torch.Tensor, t: torch.Tensor,
                  seqs: slice) -> torch.Tensor: ...


PATHS = ("fast", "recomputed", "lean")


@dataclass
class PredictedLoss:
    """The loss of the next differentiable fused-head call, known before the call (``predicting``): fast mode
    forms its gradient in the forward (``ops.fast_token_loss``). ``loss`` is on the grid of the call's last T label
    columns (TRL's ``logits_to_keep``; T = ``loss.mask.shape[1]``).

    The backward checks the prediction: when the upstream gradient of the log-probs and entropies is the predicted
    one times a scalar (the Trainer's accumulation division, a loss scaler; within ``PREDICTION_RTOL`` of its
    largest element) the forward's gradients are used, scaled; otherwise the head is recomputed as lean mode does,
    from the upstream gradient itself, so a loss that is not the predicted one still gets its exact gradient.
    ``paths`` counts how each call's gradient was formed (``PATHS``): "fast"; "recomputed" (the prediction did not
    match); "lean" (no fast pass: a sequence longer than the memory budget allows, or a call of another shape).
    The first fallback of a counter warns."""

    loss: GridLoss
    paths: collections.Counter = field(default_factory=collections.Counter)

    def record(self, path: str, why: str = "") -> None:
        record_path(self.paths, path, why)


def record_path(paths: collections.Counter, path: str, why: str = "") -> None:
    """Count how a call's gradient was formed (``PATHS``); the first fallback a counter sees warns, naming why."""
    paths[path] += 1
    if path != "fast" and paths["recomputed"] + paths["lean"] == 1:
        warnings.warn(f"fastpref: the fused head ran {path} instead of fast mode ({why}); counted in "
                      "`paths` (FastPref{GRPO,RLOO}Trainer.fastpref_head_paths)", RuntimeWarning, stacklevel=3)


PREDICTION_RTOL = 1e-5
_PREDICTED: contextvars.ContextVar[PredictedLoss | None] = contextvars.ContextVar("fastpref_predicted_loss",
                                                                                  default=None)


@contextlib.contextmanager
def predicting(predicted: PredictedLoss | None) -> Iterator[None]:
    """Within the block, the first differentiable call of a patched head (``add_fused_lm_head``) runs fast mode for
    ``predicted`` (None: nothing predicted)."""
    token = _PREDICTED.set(predicted)
    try:
        yield
    finally:
        _PREDICTED.reset(token)


def _take_prediction() -> PredictedLoss | None:
    predicted = _PREDICTED.get()
    if predicted is not None and torch.is_grad_enabled():
        _PREDICTED.set(None)  # one call: a second differentiable call in the block is not the predicted one
        return predicted
    return None


@dataclass(frozen=True)
class FastRequest:
    """What fast mode forms in the forward: the gradient of ``token_loss`` (``ops.fast_token_loss.TokenLoss``) for
    the inputs ``needs`` (source, weight, bias), its row groups kept to whole sequences where asked, and where
    it was predicted from (``predicted``, None for SFT's ``Σ log_probs``)."""

    needs: tuple[bool, bool, bool]
    token_loss: TokenLoss
    whole_sequences: bool = False
    entropy: bool = False
    predicted: PredictedLoss | None = None


def prediction_scale(grad_logps: torch.Tensor | None, grad_entropy: torch.Tensor | None, coef: torch.Tensor,
                     ent_coef: torch.Tensor | None, rtol: float = PREDICTION_RTOL) -> torch.Tensor | None:
    """The scalar s with (grad_logps, grad_entropy) = s·(coef, ent_coef) within ``rtol`` of the largest upstream
    element (a missing tensor reads as zeros), as a 0-dim fp32 tensor; None when there is none. One host sync."""
    def both(x: torch.Tensor | None, y: torch.Tensor | None) -> list[torch.Tensor]:
        return [] if x is None and y is None else [(torch.zeros_like(y) if x is None else x).double()]
    a = torch.cat(both(grad_logps, coef) + both(grad_entropy, ent_coef))
    p = torch.cat(both(coef, grad_logps) + both(ent_coef, grad_entropy))
    if a.numel() == 0:
        return torch.zeros((), device=coef.device)
    pp = (p * p).sum()
    s = torch.where(pp > 0, (a * p).sum() / pp.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    if not bool((a - s * p).abs().max() <= rtol * a.abs().max()):
        return None
    return s.float()


class HeadFields(torch.autograd.Function):
    """``source`` [N, H], ``weight`` [V, H], ``bias`` [V] | None, the scored rows ``layout`` and the pass ``cfg``
    -> TRL's per-row fields ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` [n] (``None`` where
    not requested). ``log_probs`` and ``entropy`` are differentiable. ``fast``: fast mode's request (None: lean)."""

    @staticmethod
    def forward(ctx, source, weight, bias, layout, cfg: HeadPass, outputs: tuple[str, ...],  # type: ignore[override]
                fast: FastRequest | None = None, memory_budget: int | None = None):
        ctx.set_materialize_grads(False)  # an entropy used only for logging sends no gradient: skip its term
        ctx.pending, ctx.fast = None, fast
        with autocast_off(source.device.type), _gathered_head(weight, bias):
            vocab = weight.shape[0]  # read once gathered (a ZeRO-3 partition reads 0 rows)
            groups = None if fast is None else token_groups(layout, weight, cfg, memory_budget=memory_budget,
                                                            whole_sequences=fast.whole_sequences)
            if fast is not None and groups is None and fast.predicted is not None:
                fast.predicted.record("lean", "a sequence's logits exceed the memory budget")
            if groups is not None:
                # fast: the gradient of the request's loss formed in the forward, scaled in the backward
                problem = TokenProblem(layout, groups, fast.token_loss, cfg, entropy=fast.entropy)
                _, result, ctx.pending = token_forward(source, weight, bias, problem, fast.needs)
                lse, logps, token_stats = result.lse, result.logps, result.stats
                ctx.predicted_grads = (result.grad_logps, result.grad_entropy)
            else:
                stats = _head_pass_ops.forward_stats(source, layout.index, weight, bias, layout.targets, cfg)
                lse, logps, token_stats = finalize_stats(stats, vocab)
            sq = None
            if "log_sum_sq_probs" in outputs:
                # lse(2z) - 2 lse(z), each in its two parts (row maxima exactly 2x apart, see the module doc)
                t = cfg.transform
                half = dataclasses.replace(cfg, transform=LogitTransform(t.logit_scale, t.softcap, t.temperature / 2),
                                           with_entropy=False, with_top1=False)
                lse2 = _head_pass_ops.forward_stats(source, layout.index, weight, bias, layout.targets, half).lse()
                sq = (lse2.row_max - 2 * lse.row_max) + (lse2.log_sumexp - 2 * lse.log_sumexp)
        entropy = token_stats.entropy if "entropy" in outputs else None
        mean = token_stats.mean_logits if "mean_logits" in outputs else None
        top1 = token_stats.is_top1 if "is_top1" in outputs else None
        # the entropies' gradient dH/dz = -p·(log p + H) reads H (precise on peaked rows: RowStats.entropy_acc)
        ctx.save_for_backward(source, weight, bias, *lse, token_stats.entropy)
        ctx.layout, ctx.cfg = layout, cfg
        ctx.mark_non_differentiable(*(x for x in (sq, mean, top1) if x is not None))
        return logps, entropy, sq, mean, top1

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, *_):  # type: ignore[override]
        source, weight, bias, row_max, log_sumexp, entropy = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        none = (None,) * 5  # layout, cfg, outputs, fast_needs, memory_budget
        if (grad_logps is None and grad_entropy is None) or not any(needs):
            return (None, None, None, *none)
        layout, cfg = ctx.layout, ctx.cfg
        pending, ctx.pending = ctx.pending, None
        if pending is not None:
            scale = prediction_scale(grad_logps, grad_entropy, *ctx.predicted_grads)
            if ctx.fast.predicted is not None:
                ctx.fast.predicted.record("fast" if scale is not None else "recomputed",
                                          "the loss's gradient is not the predicted loss's")
            if scale is not None:
                with autocast_off(source.device.type):
                    return (*pending.finish(scale), *none)
        # lean: recompute (no fast pass, or an upstream gradient that is not the fast pass's times a scalar)
        lse = LogSumExp(row_max, log_sumexp)
        g = torch.zeros_like(row_max) if grad_logps is None else grad_logps.float().contiguous()
        # ZeRO-3 re-partitions the head after the forward: gather it again for the recompute, as TRL does
        with autocast_off(source.device.type), _gathered_head(weight, bias):
            ent = None if grad_entropy is None else EntropyGrad(grad_entropy.float().contiguous(), entropy)
            grads = _head_pass_ops.backward(source, layout.index, weight, bias, layout.targets, lse, g, cfg,
                                            need_hidden=needs[0], need_weight=needs[1], need_bias=needs[2],
                                            entropy=ent)
        return (*grads, *none)


def fused_head_fields(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                      *, temperature: float = 1.0, logit_scale: float = 1.0, softcap: float | None = None,
                      outputs: tuple[str, ...] = ("log_probs",), backend: str = "auto", gemm: str | None = None,
                      mode: str = "lean", memory_budget: int | None = None,
                      predicted: PredictedLoss | None = None) -> tuple[torch.Tensor | None, ...]:
    """TRL's per-token fields of ``hidden`` [..., H] against already-shifted ``labels`` [...] (-100 = not scored):
    ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` shaped like ``labels``, 0 (False) where not
    scored, ``None`` for fields not in ``outputs`` (``log_probs`` is always computed). fp32 (``is_top1`` bool).
    The compute dtype follows autocast, as TRL's does.

    ``mode``: ``"lean"`` recomputes the logits in the backward (8·n·H·V FLOPs with the gradient); ``"fast"`` forms
    the gradient of ``Σ log_probs`` in the forward (6·n·H·V) and uses it when every scored row's upstream
    gradient is the same (a mean over tokens, as SFT's loss), else recomputes as lean (one host sync decides).
    Without a gradient to form (no grad mode, frozen inputs) both are the forward pass alone. ``memory_budget``:
    fast mode's bytes of kept logits (None: the device's default, as ``fastpref.DPOLoss``'s).

    ``predicted`` (any ``mode``): the loss these log-probs (and entropies) feed, known now (``PredictedLoss``; its
    grid is the last ``T`` columns of 2-D ``labels``): fast mode forms that loss's gradient in the forward, and the
    backward uses it when the upstream gradient matches."""
    hidden, weight, bias = whole_head(hidden, weight, bias, who="fused_head_fields (TRL's fused head)")
    outputs = check_outputs(outputs)
    check_choice("mode", mode, MODES)
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden's without H), got "
                         f"{tuple(labels.shape)}")
    transform = LogitTransform(float(logit_scale), None if softcap is None else float(softcap), float(temperature))
    cfg = HeadPass.for_inputs(hidden, weight, backend=backend, transform=transform, gemm=gemm,
                              with_entropy="entropy" in outputs, with_top1="is_top1" in outputs)
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    check_memory_budget(memory_budget)
    differentiable = torch.is_grad_enabled() and any(needs)
    layout, fast = None, None
    if predicted is not None and differentiable:
        layout, fast = _predicted_request(labels, weight.shape[0], predicted, needs)
    if layout is None:
        layout = build_layout(labels.reshape(-1), ignore_index=-100, vocab_size=weight.shape[0])
        fast = FastRequest(needs, _sum_of_logps) if mode == "fast" and differentiable else None
    rows = HeadFields.apply(flat_rows(hidden), weight, bias, layout, cfg, outputs, fast, memory_budget)
    return tuple(None if x is None else scatter_tokens(x, layout, labels.shape) for x in rows)


def _predicted_request(labels: torch.Tensor, vocab: int, predicted: PredictedLoss,
                       needs: tuple[bool, bool, bool]) -> tuple[TokenLayout | None, FastRequest | None]:
    """The scored rows grouped by batch row and fast mode's request for ``predicted``'s loss, whose grid is the last
    T columns of ``labels`` [B, L]; ``(None, None)`` (counted as lean) where this call is not on that grid."""
    grid = tuple(predicted.loss.mask.shape)
    if labels.dim() != 2 or labels.shape[0] != grid[0] or labels.shape[1] < grid[1]:
        predicted.record("lean", f"labels of shape {tuple(labels.shape)} are not on the loss's grid {grid}")
        return None, None
    rows, cols = labels.shape
    seq_ids = torch.arange(rows, device=labels.device).repeat_interleave(cols)
    layout = build_layout(labels.reshape(-1), ignore_index=-100, vocab_size=vocab, seq_ids=seq_ids, num_seqs=rows)
    b = layout.index // cols
    t = layout.index % cols - (cols - grid[1])
    # TRL masks the prompt: a scored token there is not on the grid. One host sync, right after build_layout's, so
    # the device queue it waits for holds only these few small kernels.
    if layout.num_scored and int(t.min()) < 0:
        predicted.record("lean", "a scored token lies before the loss's grid")
        return None, None
    offsets = layout.host_offsets

    def token_loss(logps: torch.Tensor, entropies: torch.Tensor | None, part: slice) -> torch.Tensor:
        seqs = slice(bisect.bisect_right(offsets, part.start) - 1, bisect.bisect_right(offsets, part.stop - 1))
        return predicted.loss.rows_loss(logps, entropies, b[part], t[part], seqs)

    return layout, FastRequest(needs, token_loss, predicted.loss.whole_sequences, predicted.loss.entropy, predicted)


def _backbone_attr(model: Any) -> str:
    # As TRL: before transformers 5, vision-language models expose their language backbone as `model`
    import transformers
    from packaging.version import Version

    text_config = model.config.get_text_config()
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        return "model"
    return "base_model"


def _router_aux_loss(model: Any, text_config: Any, router_logits: Any, attention_mask: Any) -> torch.Tensor:
    """The MoE load-balancing loss as TRL's fused head computes it (Mixtral's function, the config's counts)."""
    import transformers
    from packaging.version import Version
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    version = Version(transformers.__version__)
    old = version < Version("5.0.0") or (
        text_config.model_type == "gpt_oss" and version < Version("5.6.0"))  # TRL's workaround of a config bug
    source = model if old else text_config
    return load_balancing_loss_func(router_logits, source.num_experts, source.num_experts_per_tok, attention_mask)


def add_fused_lm_head(model: Any, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",), *, backend: str = "auto",
                      gemm: str | None = None, mode: str = "lean", memory_budget: int | None = None) -> None:
    """fastpref's drop-in for ``trl.trainer.utils.add_fused_lm_head`` (same arguments, same
    ``FusedCausalLMOutput``); ``backend`` and ``gemm`` choose fastpref's kernels (``fastpref.token_logps``'s),
    ``mode`` ``"lean"`` / ``"fast"`` and ``memory_budget`` as in ``fused_head_fields`` (fast pays off where the
    loss is a mean of ``-log_probs``: SFT). Within ``predicting(...)`` the first differentiable call runs fast mode
    for the predicted loss (GRPO, RLOO), whatever ``mode``.

    Patches ``model.forward`` in place: ``fused_lm_head=True`` with ``labels`` (unshifted) or ``shift_labels``
    (pre-shifted) and optional ``num_items_in_batch`` runs the backbone and fastpref's head; anything else is the
    original forward. Patch before wrapping with PEFT (or patch ``peft_model.get_base_model()``).
    """
    from trl.trainer.utils import FusedCausalLMOutput

    outputs = check_outputs(outputs)
    check_choice("backend", backend, ("auto", "triton", "torch"))
    check_choice("mode", mode, MODES)
    check_memory_budget(memory_budget)
    original_forward = model.forward
    text_config = model.config.get_text_config()
    transform = head_transform(model)
    backbone = _backbone_attr(model)

    @functools.wraps(type(model).forward)  # `generate` validates its model kwargs against this signature
    def _forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                 **kwargs):
        if not fused_lm_head:
            for key, value in (("labels", labels), ("shift_labels", shift_labels),
                               ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[key] = value
            return original_forward(*args, **kwargs)
        if labels is None and shift_labels is None:
            raise ValueError("labels: fused_lm_head=True needs `labels` (unshifted, -100 = not scored) or "
                             "`shift_labels` (pre-shifted), got neither")
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_outputs = getattr(self, backbone)(*args, **kwargs)
        if shift_labels is None:
            hidden, labels = backbone_outputs.last_hidden_state[:, :-1], labels[:, 1:]
        else:
            hidden, labels = backbone_outputs.last_hidden_state, shift_labels
        head = self.get_output_embeddings()  # looked up per call: PEFT and FSDP replace it after patching
        weight, bias = _full(head.weight), _full(getattr(head, "bias", None))
        _check_whole_vocabulary(self, weight)
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        autocast_ctx = contextlib.nullcontext()
        if cast_lm_head_to_fp32:
            hidden = hidden.float()
            autocast_ctx = torch.autocast(hidden.device.type, enabled=False)
        with autocast_ctx, _gathered_head(weight, bias):  # ZeRO-3: the whole head for the call, as TRL gathers it
            fields = fused_head_fields(hidden, weight, bias, labels, temperature=temperature, outputs=outputs,
                                       backend=backend, gemm=gemm, mode=mode, memory_budget=memory_budget,
                                       predicted=_take_prediction(), **transform)
        mask = labels != -100
        log_probs = fields[0]
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _router_aux_loss(self, text_config, backbone_outputs.router_logits,
                                        kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=fields[1], log_sum_sq_probs=fields[2],
                                   mean_logits=fields[3], is_top1=fields[4], label_mask=mask, aux_loss=aux_loss)

    setattr(_forward, _PATCH_ATTR, True)
    model.forward = types.MethodType(_forward, model)


def has_fastpref_head(model: Any) -> bool:
    """Whether ``model``'s forward is this module's fused head (its latest patch), possibly under wrappers that
    keep ``__wrapped__`` (accelerate's mixed-precision autocast of a prepared model)."""
    fn = getattr(model.__dict__.get("forward"), "__func__", None)
    while fn is not None:
        if getattr(fn, _PATCH_ATTR, False):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


@contextlib.contextmanager
def swap_fused_head(module: types.ModuleType, *, backend: str = "auto", gemm: str | None = None,
                    mode: str = "lean", memory_budget: int | None = None) -> Iterator[None]:
    """Within the block, ``module.add_fused_lm_head`` (a TRL trainer module's import of TRL's head) is fastpref's,
    with ``backend``, ``gemm`` and ``mode``; TRL's is restored on exit. The trainers call it only in
    ``__init__``."""
    previous = module.add_fused_lm_head
    module.add_fused_lm_head = functools.partial(add_fused_lm_head, backend=backend, gemm=gemm, mode=mode,
                                                 memory_budget=memory_budget)
    try:
        yield
    finally:
        module.add_fused_lm_head = previous


__all__ = ["FIELDS", "MODES", "PATHS", "PREDICTION_RTOL", "FastRequest", "GridLoss", "HeadFields", "PredictedLoss",
           "add_fused_lm_head", "check_outputs", "fused_head_fields", "has_fastpref_head", "predicting",
           "prediction_scale", "record_path", "swap_fused_head"]
