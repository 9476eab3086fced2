"""The plain materialised-logits implementation (what users do today): the one reference of the package.

Tests and benchmarks compare fastpref against it, the float64 ground truth runs it on float64 inputs, and the
trainers' flag-off path (``use_fastpref=False``) runs the model's own logits through it. It holds the full
``[tokens, vocab]`` logits. Logits are computed in the compute dtype (autocast dtype if on, else the hidden
states' dtype), then upcast to at least fp32 before the log-softmax, as TRL's non-fused path does; float64
inputs stay float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .ops import sum_by_id


def logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """``softcap * tanh((hidden @ weight.T + bias) * logit_scale / softcap) / temperature``, at least fp32."""
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else hidden.dtype
    with torch.autocast(hidden.device.type, enabled=False):
        y = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    z = y.to(torch.promote_types(y.dtype, torch.float32)) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def log_probs(z: torch.Tensor) -> torch.Tensor:
    """``log_softmax(z)`` over the vocabulary, at least fp32."""
    return torch.log_softmax(z.to(torch.promote_types(z.dtype, torch.float32)), dim=-1)


def gather_logps(logp: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """``logp.gather(labels)``, 0 where ``labels == ignore_index``."""
    mask = labels != ignore_index
    return logp.gather(-1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1) * mask


def logps_from_logits(z: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """``log_softmax(z).gather(labels)`` (at least fp32), 0 where ``labels == ignore_index``."""
    return gather_logps(log_probs(z), labels, ignore_index=ignore_index)


@dataclass(frozen=True)
class TokenStatistics:
    """Per position, detached: the mean logit over the vocabulary (TRL's ``logits/*``), the entropy of the
    softmax and whether the label is the arg-max (``mean_token_accuracy``)."""

    mean_logits: torch.Tensor
    entropy: torch.Tensor
    is_top1: torch.Tensor


@torch.no_grad()
def token_statistics(z: torch.Tensor, labels: torch.Tensor, logp: torch.Tensor | None = None) -> TokenStatistics:
    """The statistics of logits ``z``; ``logp``: their ``log_probs`` when already computed (not recomputed)."""
    logp = log_probs(z) if logp is None else logp
    mean = z.mean(-1, dtype=torch.promote_types(z.dtype, torch.float32))
    return TokenStatistics(mean, -(logp.exp() * logp).sum(-1), z.argmax(-1) == labels)


def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Materialised ``log_softmax(logits).gather(labels)``, 0 where ``labels == ignore_index``."""
    z = logits(hidden, weight, bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    return logps_from_logits(z, labels, ignore_index=ignore_index)


def sequence_sums(tok: torch.Tensor, mask: torch.Tensor, seq_ids: torch.Tensor | None,
                  num_seqs: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of per-token values and the scored-token counts: by row (``seq_ids`` None), or by
    sequence id (packed; ids < 0 are not scored)."""
    if seq_ids is None:
        return tok.sum(-1), mask.sum(-1)
    if num_seqs is None:
        raise ValueError("num_seqs: required with seq_ids (the number of packed sequences), got None")
    valid = mask & (seq_ids >= 0)
    ids = torch.where(valid, seq_ids, -1)
    return sum_by_id(tok * valid, ids, num_seqs), sum_by_id(valid.to(tok.dtype), ids, num_seqs)


def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    average: bool = False,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Per-sequence sums (or means over scored tokens) of ``token_logps``; packed with ``seq_ids``/``num_seqs``."""
    tok = token_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature,
                      logit_scale=logit_scale, softcap=softcap)
    sums, counts = sequence_sums(tok, labels != ignore_index, seq_ids, num_seqs)
    if average:
        return sums / counts.clamp(min=1)
    return sums


def mean_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    **transform: float | None,
) -> torch.Tensor:
    """Mean over the vocabulary of the transformed logits, per token (TRL's ``logits/*`` metrics)."""
    return logits(hidden, weight, bias, **transform).mean(-1)


def preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    *,
    loss_type: str | list[str] = "sigmoid",
    loss_weights: list[float] | None = None,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    refinement: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    **hparams: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Materialised preference loss on ``[B, T, H]`` (rows i and i + B/2 are pair i) with the formulas of
    ``fastpref.losses``: returns (loss, per-pair losses, chosen_logps, rejected_logps)."""
    from . import losses

    cfg = losses.LossConfig.create(loss_type, loss_weights, **hparams)
    transform = dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    logps = sequence_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index, **transform)
    if ref_logps is None and ref_hidden is not None:
        with torch.no_grad():
            if ref_weight is None:  # the policy's head, frozen (bias included)
                ref_weight, ref_bias = weight.detach(), bias if ref_bias is None else ref_bias
            ref_logps = sequence_logps(ref_hidden, ref_weight, labels, bias=ref_bias, ignore_index=ignore_index,
                                       **transform)
    lengths = (labels != ignore_index).sum(-1).to(logps.dtype)
    terms = losses.pair_terms(cfg, ref_logps, lengths, like=logps)
    pairs = labels.shape[0] // 2
    per_pair = terms.loss(cfg, logps[:pairs], logps[pairs:], refinement=refinement)
    return per_pair.mean(), per_pair, logps[:pairs], logps[pairs:]
