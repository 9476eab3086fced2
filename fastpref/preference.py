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
    HeadPass,
    LinearLogProbs,
    LogitTransform,
    PairGroups,
    PairProblem,
    TokenLayout,
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
class HeadOptions:
    """The options of the pass over the LM head that every fused loss takes (``PreferenceConfig``,
    ``fastpref.kto.KTOConfig``): validated once by ``HeadOptions.checked``."""

    ignore_index: int = -100
    mode: str = "auto"
    memory_budget: int | None = None
    backend: str = "auto"
    transform: LogitTransform = field(default_factory=LogitTransform)
    token_metrics: bool = False
    check_finite: bool = False
    gemm: str | None = None  # None: $FASTPREF_GEMM, else cublas (fastpref.ops.gemm_path)

    @staticmethod
    def checked(*, ignore_index: int = -100, mode: str = "auto", memory_budget: int | None = None,
                backend: str = "auto", temperature: float = 1.0, logit_scale: float = 1.0,
                softcap: float | None = None, token_metrics: bool = False, check_finite: bool = False,
                gemm: str | None = None) -> dict[str, object]:
        """The fields of ``HeadOptions`` from the user's arguments (``ValueError`` / ``TypeError`` naming a bad
        one)."""
        check_choice("mode", mode, MODES)
        check_choice("backend", backend, BACKENDS)
        check_gemm(gemm)
        check_transform(temperature, logit_scale, softcap)
        return dict(ignore_index=check_int("ignore_index", ignore_index), mode=mode,
                    memory_budget=check_memory_budget(memory_budget), backend=backend,
                    transform=LogitTransform(float(logit_scale), None if softcap is None else float(softcap),
                                             float(temperature)),
                    token_metrics=bool(token_metrics), check_finite=bool(check_finite), gemm=gemm)


@dataclass(frozen=True, kw_only=True)
class PreferenceConfig(HeadOptions):
    """Hyper-parameters of a fused preference loss (held by the modules of ``fastpref.modules``)."""

    loss: L.LossConfig

    @classmethod
    def create(cls, loss_type: str | list[str] | tuple[str, ...] = "sigmoid", *,
               loss_weights: list[float] | tuple[float, ...] | None = None, ignore_index: int = -100,
               mode: str = "auto", memory_budget: int | None = None, backend: str = "auto",
               temperature: float = 1.0, logit_scale: float = 1.0, softcap: float | None = None,
               token_metrics: bool = False, check_finite: bool = False, gemm: str | None = None,
               **hparams: float | bool) -> PreferenceConfig:
        """The validated config of ``fastpref.PreferenceLoss(loss_type, **options)`` (its docstring lists the
        options); ``hparams``: the formulas' (``beta``, ``label_smoothing``, ..., ``reference_free``: the fields
        of ``fastpref.losses.LossConfig``, which checks them)."""
        loss = L.LossConfig.create(loss_type, loss_weights, **hparams)
        options = HeadOptions.checked(ignore_index=ignore_index, mode=mode, memory_budget=memory_budget,
                                      backend=backend, temperature=temperature, logit_scale=logit_scale,
                                      softcap=softcap, token_metrics=token_metrics, check_finite=check_finite,
                                      gemm=gemm)
        if mode == "fast" and not loss.pair_separable:
            raise ValueError(f"mode: 'fast' needs a pair-separable loss; {list(loss.loss_types)} couples the batch "
                             "(aot / aot_unpaired sort over it); use mode='lean' or 'auto'")
        return cls(loss=loss, **options)


def _policy_batch(cfg: PreferenceConfig, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  bias: torch.Tensor | None, seq_ids: torch.Tensor | None, num_seqs: int | None, *,
                  token_metrics: bool, others: dict[str, torch.Tensor | None] | None = None,
                  shard: VocabShard | None = None) -> PolicyBatch:
    finite = [("hidden", hidden), ("weight", weight), ("bias", bias), *(others or {}).items()] \
        if cfg.check_finite else []
    return PolicyBatch.build(hidden, weight, labels, bias, seq_ids, num_seqs, ignore_index=cfg.ignore_index,
                             backend=cfg.backend, transform=cfg.transform, token_metrics=token_metrics, finite=finite,
                             gemm=cfg.gemm, shard=shard)


def fast_groups(options: HeadOptions, weight: torch.Tensor, head: HeadPass, layout: TokenLayout,
                num_pairs: int) -> tuple[PairGroups | None, int, int]:
    """Fast mode's groups of consecutive sequence pairs (None when one pair does not fit the budget), the budget
    and the logits' element size."""
    budget = options.memory_budget if options.memory_budget is not None else default_memory_budget(weight.device)
    elem = torch.empty((), dtype=head.compute_dtype).element_size()
    max_rows = budget // (weight.shape[0] * elem)
    preferred = preferred_group_rows(weight.shape[1], elem, weight.element_size())
    return plan_pair_groups(layout.host_offsets, num_pairs, max_rows, preferred), budget, elem


def choose_mode(options: HeadOptions, weight: torch.Tensor, head: HeadPass, layout: TokenLayout, num_pairs: int,
                needs_grad: bool, *, separable: str | None = None,
                unit: tuple[str, str] = ("one pair's", "the largest pair has")) -> tuple[str, PairGroups | None]:
    """The path of a call: ``forward`` without a gradient, ``fast`` when the loss is separable over pairs of
    sequences (``separable``: None, else why not) and one pair's logits fit the budget, else ``lean``;
    ``mode='fast'`` that cannot run raises naming the budget (``unit``: how the error names a pair)."""
    if not needs_grad:
        return "forward", None
    if options.mode == "lean":
        return "lean", None
    groups, budget, elem = fast_groups(options, weight, head, layout, num_pairs)
    if separable is None and groups is not None:
        return "fast", groups
    if options.mode == "fast":
        if separable is not None:
            raise ValueError(f"mode: 'fast' needs a pair-separable loss; {separable}; use mode='lean' or 'auto'")
        offs = layout.host_offsets
        largest = max(offs[2 * p + 2] - offs[2 * p] for p in range(num_pairs))
        vocab = weight.shape[0]
        raise ValueError(f"memory_budget: mode='fast' needs {unit[0]} logits in the budget: {unit[1]} "
                         f"{largest} scored tokens x vocabulary {vocab} x {elem} bytes = "
                         f"{largest * vocab * elem} bytes > memory_budget={budget}; raise memory_budget "
                         "or use mode='lean' / 'auto'")
    return "lean", None


def _not_separable(cfg: PreferenceConfig) -> str | None:
    return None if cfg.loss.pair_separable else (
        f"{list(cfg.loss.loss_types)} couples the batch (aot / aot_unpaired sort over it)")


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
    mode, groups = choose_mode(cfg, batch.weight, batch.head, batch.layout, batch.num_pairs, needs_grad,
                               separable=_not_separable(cfg))
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
    groups = fast_groups(cfg, batch.weight, batch.head, batch.layout, batch.num_pairs)[0] \
        if cfg.mode != "lean" and cfg.loss.pair_separable else None
    seq = score_sequences(hidden, weight, bias, batch.layout, batch.head, groups).seq_logps
    return torch.cat([seq[0::2], seq[1::2]])


__all__ = ["MODES", "PreferenceConfig", "PreferenceOutput", "forward", "score"]
