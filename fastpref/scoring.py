"""Forward-only scoring: the one function that turns hidden states into sequence log-prob sums without a graph.

``score_sequences`` serves the policy's forward-only path (evaluation), the reference model
(``score_reference``), the prompt-augmented batch of Sr-DPO / Sr-IPO (``score_refinement``, whose margin formula
is ``fastpref.losses.refinement_margin``) and ``PreferenceLoss.score``. With the fast path's pair groups it
scores exactly as the fast path scores the policy (same GEMM shapes, column chunks and sums), so a reference
equal to the policy gives bit-identical sums — rewards of exactly 0, as in TRL; without groups it scores tile
by tile as lean mode does. 2·n·H·V FLOPs, O(tokens) memory beyond one tile (or one pair group's buffer).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import losses as L
from .inputs import PolicyBatch, ReferenceInputs, RefinementInputs, check_batch_vector, pair_layout, pair_order
from .ops import (
    HeadPass,
    PairGroups,
    TokenLayout,
    TokenStats,
    finalize_stats,
    flat_rows,
    grouped_sequence_logps,
    segment_sum,
)
from .ops.backend import autocast_off
from .ops.head_pass import forward_stats
from .ops.vocab_shard import localize


@dataclass(frozen=True)
class ScoredSequences:
    """Sequence sums ``[S]`` in the layout's order (pair order for preference batches) and token statistics."""

    seq_logps: torch.Tensor
    stats: TokenStats


@torch.no_grad()
def score_sequences(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: TokenLayout,
                    head: HeadPass, groups: PairGroups | None = None) -> ScoredSequences:
    """Sequence log-prob sums of the scored tokens ``layout`` of ``hidden`` [..., H], forward-only."""
    source = flat_rows(hidden.detach())
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    if groups is not None:
        return ScoredSequences(*grouped_sequence_logps(source, weight, bias, layout, groups, head))
    with autocast_off(source.device.type):
        stats = forward_stats(source, layout.index, weight, bias, layout.targets, head)
    _, logps, token_stats = finalize_stats(stats, head.vocab_size(weight))
    return ScoredSequences(segment_sum(logps, layout.offsets), token_stats)


def _sums_only(head: HeadPass) -> HeadPass:
    """The pass without the optional token statistics (reference scoring needs the sums only)."""
    return replace(head, with_entropy=False, with_top1=False)


def score_reference(loss: L.LossConfig, batch: PolicyBatch, ref: ReferenceInputs,
                   groups: PairGroups | None) -> torch.Tensor:
    """Reference sums in pair order ([2P]); zeros with ``reference_free=True``. Reference-free loss types do not
    need them, but when given they are used for the logged rewards (β·(lp − ref), as TRL logs them). With the
    fast path's ``groups`` the reference is scored exactly as the fast path scores the policy."""
    if ref.logps is not None and ref.hidden is not None:
        raise ValueError("ref_logps / ref_hidden: give one of them, not both")
    if loss.reference_free or (loss.reference_free_only and not ref.given):
        return torch.zeros(2 * batch.num_pairs, device=batch.device)
    ref.check(batch)
    if ref.logps is not None:
        return pair_order(check_batch_vector("ref_logps", ref.logps, 2 * batch.num_pairs, batch.device),
                          batch.num_pairs)
    if ref.hidden is None:
        raise ValueError(f"ref_logps: loss_type {list(loss.loss_types)} needs the reference log-probs; pass "
                         "ref_logps ([B] sums) or ref_hidden (+ ref_weight), or set reference_free=True")
    weight, bias = ref.head_for(batch)
    return score_sequences(ref.hidden, weight, bias, batch.layout, _sums_only(batch.head), groups).seq_logps


def score_refinement(loss: L.LossConfig, batch: PolicyBatch, refine: RefinementInputs, ref: ReferenceInputs,
                      *, ignore_index: int) -> torch.Tensor | None:
    """Δ of Sr-DPO (β × margin) or Δ̄ of Sr-IPO (β × length-normalised margin), [P], stop-gradient: given, or
    scored here on the p ⊕ x batch (policy and reference, forward-only)."""
    refine.check(batch, loss.loss_types, loss.needs_refinement)
    if not loss.needs_refinement:
        return None
    if refine.given:
        return check_batch_vector("refinement", refine.refinement, batch.num_pairs, batch.device)
    shard = batch.head.shard
    layout = localize(pair_layout(refine.labels, batch.head.vocab_size(batch.weight), None, batch.num_pairs,
                                  ignore_index), shard)
    head = _sums_only(batch.head)
    policy = score_sequences(refine.hidden, batch.weight, batch.bias, layout, head).seq_logps
    if loss.reference_free or loss.reference_free_only:
        ref_sums = None
    elif refine.ref_logps is not None:
        ref_sums = pair_order(check_batch_vector("refine_ref_logps", refine.ref_logps, 2 * batch.num_pairs,
                                                 batch.device), batch.num_pairs)
    elif refine.ref_hidden is not None:
        weight, bias = ref.head_for(batch)
        ref_sums = score_sequences(refine.ref_hidden, weight, bias, layout, head).seq_logps
    else:
        raise ValueError("refine_ref_hidden: the reference's log-probs on the p ⊕ x batch are needed; pass "
                         "refine_ref_hidden or refine_ref_logps (or a precomputed refinement)")
    lengths = layout.lengths
    return L.refinement_margin(loss, policy[0::2], policy[1::2], None if ref_sums is None else ref_sums[0::2],
                               None if ref_sums is None else ref_sums[1::2], chosen_lengths=lengths[0::2],
                               rejected_lengths=lengths[1::2])


__all__ = ["ScoredSequences", "score_reference", "score_refinement", "score_sequences"]
