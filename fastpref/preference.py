"""The fused preference loss: path choice and the run (the modules of ``fastpref.modules`` call this).

``forward`` validates the call's inputs once (``fastpref.inputs``), takes the reference and refinement
sums (given, or scored under no-grad by ``fastpref.scoring``), evaluates the formulas of ``fastpref.losses`` and
returns a ``PreferenceOutput`` (``fastpref.outputs``). Paths (``mode``):

- ``forward``: grad disabled (or nothing requires grad): 2·n·H·V FLOPs, O(tokens) memory.
- ``fast``: pair-separable loss and one pair group's logits fit ``memory_budget``: gradients are formed during
  the forward (``fastpref.ops.fast_pair_loss``), 6·n·H·V FLOPs, at most ``memory_budget`` bytes of logits.
- ``lean``: recompute in backward (``fastpref.ops.head_pass``), 8·n·H·V FLOPs, O(tokens + one tile) memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from . import losses as L
from .inputs import PolicyBatch, ReferenceInputs, RefinementInputs
from .ops import (
    LinearLogProbs,
    LogitTransform,
    PairGroups,
    PairProblem,
    fast_pair_loss,
    plan_pair_groups,
    segment_sum,
)
from .ops.backend import BACKENDS
from .ops.gemm_path import check_gemm
from .ops.plan import default_memory_budget, preferred_group_rows
from .ops.vocab_shard import VocabShard, resolve_head, resolve_reference
from .outputs import PreferenceOutput, build_output, token_sums
from .scoring import score_reference, score_refinement, score_sequences
from .utils.validation import check_choice, check_int, check_memory_budget, check_transform

MODES = ("auto", "fast", "lean")


@dataclass(frozen=True)
class PreferenceConfig:
    """Hyper-parameters of a fused preference loss (held by the modules of ``fastpref.modules``)."""

    loss: L.LossConfig
    ignore_index: int = -100
    mode: str = "auto"
    memory_budget: int | None = None
    backend: str = "auto"
    transform: LogitTransform = field(default_factory=LogitTransform)
    token_metrics: bool = False
    check_finite: bool = False
    gemm: str | None = None  # None: $FASTPREF_GEMM, else cublas (fastpref.ops.gemm_path)

    @classmethod
    def create(
        cls,
        loss_type: str | list[str] | tuple[str, ...] = "sigmoid",
        *,
        loss_weights: list[float] | tuple[float, ...] | None = None,
        ignore_index: int = -100,
        mode: str = "auto",
        memory_budget: int | None = None,
        backend: str = "auto",
        temperature: float = 1.0,
        logit_scale: float = 1.0,
        softcap: float | None = None,
        token_metrics: bool = False,
        check_finite: bool = False,
        gemm: str | None = None,
        **hparams: float | bool,
    ) -> PreferenceConfig:
        """The validated config of ``fastpref.PreferenceLoss(loss_type, **options)`` (its docstring lists the
        options); ``hparams``: the formulas' (``beta``, ``label_smoothing``, ..., ``reference_free``: the fields
        of ``fastpref.losses.LossConfig``, which checks them)."""
        loss = L.LossConfig.create(loss_type, loss_weights, **hparams)
        check_choice("mode", mode, MODES)
        if mode == "fast" and not loss.pair_separable:
            raise ValueError(f"mode: 'fast' needs a pair-separable loss; {list(loss.loss_types)} couples the batch "
                             "(aot / aot_unpaired sort over it); use mode='lean' or 'auto'")
        check_choice("backend", backend, BACKENDS)
        check_gemm(gemm)
        check_transform(temperature, logit_scale, softcap)
        ignore_index = check_int("ignore_index", ignore_index)
        check_memory_budget(memory_budget)
        transform = LogitTransform(float(logit_scale), None if softcap is None else float(softcap),
                                   float(temperature))
        return cls(loss=loss, ignore_index=ignore_index, mode=mode,
                   memory_budget=memory_budget, backend=backend, transform=transform,
                   token_metrics=bool(token_metrics), check_finite=bool(check_finite), gemm=gemm)


def _policy_batch(cfg: PreferenceConfig, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  bias: torch.Tensor | None, seq_ids: torch.Tensor | None, num_seqs: int | None, *,
                  token_metrics: bool, others: dict[str, torch.Tensor | None] | None = None,
                  shard: VocabShard | None = None) -> PolicyBatch:
    finite = [("hidden", hidden), ("weight", weight), ("bias", bias), *(others or {}).items()] \
        if cfg.check_finite else []
    return PolicyBatch.build(hidden, weight, labels, bias, seq_ids, num_seqs, ignore_index=cfg.ignore_index,
                             backend=cfg.backend, transform=cfg.transform, token_metrics=token_metrics, finite=finite,
                             gemm=cfg.gemm, shard=shard)


def _fast_groups(cfg: PreferenceConfig, batch: PolicyBatch) -> tuple[PairGroups | None, int, int]:
    """The fast path's pair groups (None when a pair does not fit the budget), the budget and the element size."""
    budget = cfg.memory_budget if cfg.memory_budget is not None else default_memory_budget(batch.weight.device)
    elem = torch.empty((), dtype=batch.head.compute_dtype).element_size()
    max_rows = budget // (batch.weight.shape[0] * elem)
    preferred = preferred_group_rows(batch.weight.shape[1], elem, batch.weight.element_size())
    return plan_pair_groups(batch.layout.host_offsets, batch.num_pairs, max_rows, preferred), budget, elem


def _choose_mode(cfg: PreferenceConfig, batch: PolicyBatch, needs_grad: bool) -> tuple[str, PairGroups | None]:
    if not needs_grad:
        return "forward", None
    if cfg.mode == "lean":
        return "lean", None
    groups, budget, elem = _fast_groups(cfg, batch)
    if cfg.loss.pair_separable and groups is not None:
        return "fast", groups
    if cfg.mode == "fast":
        if not cfg.loss.pair_separable:
            raise ValueError(f"mode: 'fast' needs a pair-separable loss; {list(cfg.loss.loss_types)} couples the "
                             "batch (aot / aot_unpaired sort over it); use mode='lean' or 'auto'")
        offs = batch.layout.host_offsets
        largest = max(offs[2 * p + 2] - offs[2 * p] for p in range(batch.num_pairs))
        vocab = batch.weight.shape[0]
        raise ValueError(f"memory_budget: mode='fast' needs one pair's logits in the budget: the largest pair has "
                         f"{largest} scored tokens x vocabulary {vocab} x {elem} bytes = "
                         f"{largest * vocab * elem} bytes > memory_budget={budget}; raise memory_budget "
                         "or use mode='lean' / 'auto'")
    return "lean", None


def forward(cfg: PreferenceConfig, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
            reference: ReferenceInputs, refine: RefinementInputs, *, bias: torch.Tensor | None = None,
            seq_ids: torch.Tensor | None = None, num_seqs: int | None = None) -> PreferenceOutput:
    """The fused loss of one call (``fastpref.PreferenceLoss.forward`` builds ``reference`` / ``refine``)."""
    # a vocabulary-sharded head (DTensor): its local shard, never gathered (fastpref.ops.vocab_shard)
    hidden, weight, bias, shard = resolve_head(hidden, weight, bias)
    ref_hidden, ref_weight, ref_bias = resolve_reference(reference.hidden, reference.weight, reference.bias, shard)
    reference = replace(reference, hidden=ref_hidden, weight=ref_weight, bias=ref_bias)
    finite = {**reference.named(), **{k: v for k, v in refine.named().items() if k != "refine_labels"}}
    batch = _policy_batch(cfg, hidden, weight, labels, bias, seq_ids, num_seqs, token_metrics=cfg.token_metrics,
                          others=finite, shard=shard)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    mode, groups = _choose_mode(cfg, batch, needs_grad)
    ref = score_reference(cfg.loss, batch, reference, groups)
    delta = score_refinement(cfg.loss, batch, refine, reference, ignore_index=cfg.ignore_index)
    num_pairs = batch.num_pairs
    terms = L.pair_terms(cfg.loss, ref, batch.layout.lengths.float(), like=ref, pair_order=True)

    def pair_loss(chosen: torch.Tensor, rejected: torch.Tensor, pairs: slice) -> torch.Tensor:
        return terms.loss(cfg.loss, chosen, rejected, pairs, None if delta is None else delta[pairs])

    if mode == "fast":
        loss, fast = fast_pair_loss(batch.source, weight, bias, PairProblem(batch.layout, groups, pair_loss,
                                                                             batch.head))
        seq, per_pair, stats = fast.seq_logps, fast.losses.detach(), fast.stats
    else:
        if mode == "lean":
            tok, stats = LinearLogProbs.apply(batch.source, weight, bias, batch.layout, batch.head)
            seq = segment_sum(tok, batch.layout.offsets)
        else:
            scored = score_sequences(hidden, weight, bias, batch.layout, batch.head)
            seq, stats = scored.seq_logps, scored.stats
        per_pair = pair_loss(seq[0::2], seq[1::2], slice(0, num_pairs))
        loss = per_pair.sum() / max(num_pairs, 1)
    is_chosen = batch.layout.seq % 2 == 0
    return build_output(loss=loss, losses=per_pair, chosen_logps=seq[0::2], rejected_logps=seq[1::2],
                        ref_chosen=terms.ref_chosen, ref_rejected=terms.ref_rejected, beta=cfg.loss.beta,
                        sums=token_sums(stats, is_chosen), mode=mode)


@torch.no_grad()
def score(cfg: PreferenceConfig, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
          bias: torch.Tensor | None = None, seq_ids: torch.Tensor | None = None,
          num_seqs: int | None = None) -> torch.Tensor:
    """Sequence log-prob sums ``[B]`` (batch layout), forward-only, scored exactly as ``forward`` scores
    the policy in training: with the fast path's pair groups when it would run fast, else tile by tile. A
    reference model scored this way gives bit-identical sums when it equals the policy (rewards exactly 0)."""
    hidden, weight, bias, shard = resolve_head(hidden, weight, bias)
    batch = _policy_batch(cfg, hidden, weight, labels, bias, seq_ids, num_seqs, token_metrics=False, shard=shard)
    groups = _fast_groups(cfg, batch)[0] if cfg.mode != "lean" and cfg.loss.pair_separable else None
    seq = score_sequences(hidden, weight, bias, batch.layout, batch.head, groups).seq_logps
    return torch.cat([seq[0::2], seq[1::2]])


__all__ = ["MODES", "PreferenceConfig", "PreferenceOutput", "forward", "score"]
