"""The core ops: per-token and per-sequence log-probs, and linear cross-entropy, from hidden states and the
LM head without materialising the ``[tokens, vocab]`` logits."""

from __future__ import annotations

import torch

from .ops import HeadPass, LogitTransform, scatter_tokens, score_labels, segment_sum
from .ops.gemm_path import check_gemm
from .ops.vocab_shard import VocabShard, resolve_head
from .utils.compile import eager_op
from .utils.validation import check_choice, check_head_inputs, check_int, check_seq_ids, check_transform


def _head_pass(hidden: torch.Tensor, weight: torch.Tensor, backend: str, temperature: float, logit_scale: float,
               softcap: float | None, gemm: str | None, shard: VocabShard | None = None) -> HeadPass:
    check_transform(temperature, logit_scale, softcap)
    check_gemm(gemm)
    transform = LogitTransform(float(logit_scale), None if softcap is None else float(softcap), float(temperature))
    return HeadPass.for_inputs(hidden, weight, backend=backend, transform=transform, gemm=gemm, shard=shard)


@eager_op
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
    backend: str = "auto",
    gemm: str | None = None,
    check_finite: bool = False,
) -> torch.Tensor:
    """Per-token log-probs ``log_softmax(T(hidden @ weight.T + bias)).gather(-1, labels)``.

    Args:
        hidden: ``[B, T, H]`` or ``[N, H]`` last hidden states (any float dtype).
        weight: ``[V, H]`` LM-head weight; ``bias``: optional ``[V]``.
        labels: int ``[B, T]`` / ``[N]``, already shifted; ``ignore_index`` marks unscored positions.
        temperature, logit_scale, softcap: ``z = softcap * tanh(y * logit_scale / softcap) / temperature``.
        backend: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` or ``"torch"``.
        gemm: the GEMM path (``fastpref.ops.gemm_path``; Triton backend only): None (default:
            ``$FASTPREF_GEMM``, else ``"cublas"``), ``"cublas"``, or the opt-in ``"fused"`` / ``"auto"``.
        check_finite: raise ``ValueError`` on NaN / inf in hidden, weight or bias (in the one host sync).
            Off by default: non-finite inputs propagate, as in PyTorch.

    Returns:
        fp32 tensor shaped like ``labels``, 0 where ignored; differentiable w.r.t. hidden, weight and bias.
    """
    hidden, weight, bias, shard = resolve_head(hidden, weight, bias)  # a vocabulary-sharded DTensor head: local
    check_head_inputs(hidden, weight, labels, bias)
    check_int("ignore_index", ignore_index)
    cfg = _head_pass(hidden, weight, backend, temperature, logit_scale, softcap, gemm, shard)
    scored = score_labels(hidden, weight, bias, labels, cfg, ignore_index=ignore_index, check_finite=check_finite)
    return scatter_tokens(scored.logps, scored.layout, labels.shape)


@eager_op
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
    backend: str = "auto",
    gemm: str | None = None,
    check_finite: bool = False,
) -> torch.Tensor:
    """Per-sequence sums (or, with ``average=True``, means over the scored tokens) of the token log-probs.

    Row layout: ``hidden [B, T, H]``, ``labels [B, T]`` -> ``[B]``. Packed layout: ``hidden [N, H]``,
    ``labels [N]``, ``seq_ids [N]`` (sequence of each token, -1 = not scored) and ``num_seqs`` -> ``[num_seqs]``.
    A sequence with no scored token gets 0. fp32, differentiable w.r.t. hidden, weight and bias. The other
    arguments as in ``token_logps``; ``gemm``: None (default: ``$FASTPREF_GEMM``, else ``"cublas"``),
    ``"cublas"``, or the opt-in ``"fused"`` / ``"auto"``.
    """
    hidden, weight, bias, shard = resolve_head(hidden, weight, bias)  # a vocabulary-sharded DTensor head: local
    check_head_inputs(hidden, weight, labels, bias)
    check_int("ignore_index", ignore_index)
    check_seq_ids(hidden, seq_ids, num_seqs)
    if seq_ids is None and hidden.dim() == 2:
        raise ValueError(f"hidden: [N, H] input {tuple(hidden.shape)} without seq_ids is per-token only; pass "
                         "seq_ids and num_seqs for packed sequences, or use [B, T, H]")
    cfg = _head_pass(hidden, weight, backend, temperature, logit_scale, softcap, gemm, shard)
    if seq_ids is None:
        batch, seq_len = labels.shape
        row_ids = torch.arange(batch, device=labels.device).repeat_interleave(seq_len)
        scored = score_labels(hidden, weight, bias, labels, cfg, ignore_index=ignore_index, seq_ids=row_ids,
                              num_seqs=batch, check_finite=check_finite)
    else:
        scored = score_labels(hidden, weight, bias, labels, cfg, ignore_index=ignore_index, seq_ids=seq_ids,
                              num_seqs=int(num_seqs), check_finite=check_finite)
    sums = segment_sum(scored.logps, scored.layout.offsets)
    if average:
        return sums / scored.layout.lengths.clamp(min=1).float()
    return sums


@eager_op
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    backend: str = "auto",
    gemm: str | None = None,
    check_finite: bool = False,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` without the logits (SFT).

    ``reduction``: ``"mean"`` over the scored tokens (0 when there are none, instead of NaN), ``"sum"``, or
    ``"none"`` (shaped like ``labels``, 0 where ignored). fp32. The other arguments as in ``token_logps``;
    ``gemm``: None (default: ``$FASTPREF_GEMM``, else ``"cublas"``), ``"cublas"``, or the opt-in ``"fused"`` /
    ``"auto"``.
    """
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    nll = -token_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature,
                       logit_scale=logit_scale, softcap=softcap, backend=backend, gemm=gemm,
                       check_finite=check_finite)
    if reduction == "none":
        return nll
    total = nll.sum()
    if reduction == "sum":
        return total
    return total / (labels.long() != ignore_index).sum().clamp(min=1)
