"""The inputs of one preference-loss call, validated once at the boundary, as small frozen dataclasses.

- ``PolicyBatch``: the policy's hidden states, LM head and labels, and its scored tokens in *pair order*
  (sequence 2i chosen, 2i + 1 rejected; built in the call's one host sync).
- ``ReferenceInputs``: the reference — precomputed sums ``[B]`` or the reference model's hidden states and head.
- ``RefinementInputs``: Sr-DPO / Sr-IPO's refinement margin — precomputed ``[B/2]``, or the prompt-augmented
  (p ⊕ x) batch and its reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .ops import HeadPass, LogitTransform, TokenLayout, build_layout, flat_rows
from .ops.vocab_shard import VocabShard, localize
from .utils.validation import check_head_inputs, check_seq_ids


def pair_order(batch_values: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """[2P] in batch layout (chosen first half) -> pair order (chosen 2i, rejected 2i + 1)."""
    return torch.stack([batch_values[:num_pairs], batch_values[num_pairs:]], dim=1).reshape(-1)


def check_batch_vector(name: str, t: object, size: int, device: torch.device) -> torch.Tensor:
    """A detached fp32 copy of a floating-point tensor of shape ``[size]`` on ``device``."""
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor of shape [{size}], got "
                        f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
    if tuple(t.shape) != (size,):
        raise ValueError(f"{name}: expected shape [{size}], got {tuple(t.shape)}")
    check_device(name, t, device)
    return t.detach().float()


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of hidden), got {t.device}")


def check_same_shape(name: str, t: object, like: torch.Tensor, like_name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)} (that of {like_name}), got {tuple(t.shape)}")
    return t


def pair_layout(labels: torch.Tensor, vocab: int, seq_ids: torch.Tensor | None, num_pairs: int,
                ignore_index: int, finite: Sequence[tuple[str, torch.Tensor]] = ()) -> TokenLayout:
    """The scored tokens of a batch in pair order (row ``r`` of a [B, T] batch is sequence ``r``)."""
    if seq_ids is None:
        batch, seq_len = labels.shape
        seq_ids = torch.arange(batch, device=labels.device).repeat_interleave(seq_len)
    # the ids are range-checked in the batch layout, then remapped (a bad id must not land on another sequence)
    return build_layout(labels.reshape(-1), ignore_index=ignore_index, vocab_size=vocab, seq_ids=seq_ids.reshape(-1),
                        num_seqs=2 * num_pairs, pair_order=True, finite=finite)


def _num_pairs(hidden: torch.Tensor, num_seqs: int | None) -> int:
    n_seqs = hidden.shape[0] if num_seqs is None else int(num_seqs)
    if n_seqs % 2:
        what = "hidden.shape[0]" if num_seqs is None else "num_seqs"
        raise ValueError(f"{what}: expected an even number of sequences (first half chosen, second half rejected), "
                         f"got {n_seqs}")
    return n_seqs // 2


@dataclass(frozen=True)
class HeadBatch:
    """The policy side of a call: ``hidden`` [B, T, H] (or packed [N, H]), the head, the labels, and the scored
    tokens with the parameters of the pass over the head."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    layout: TokenLayout
    head: HeadPass

    @property
    def source(self) -> torch.Tensor:
        """The [N, H] rows the scored tokens are gathered from."""
        return flat_rows(self.hidden)

    @property
    def device(self) -> torch.device:
        return self.hidden.device


@dataclass(frozen=True)
class PolicyBatch(HeadBatch):
    """A preference call's ``HeadBatch``: the scored tokens in pair order (chosen 2i, rejected 2i+1)."""

    num_pairs: int

    @classmethod
    def build(cls, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
              seq_ids: torch.Tensor | None, num_seqs: int | None, *, ignore_index: int, backend: str,
              transform: LogitTransform, token_metrics: bool,
              finite: Sequence[tuple[str, torch.Tensor | None]] = (), gemm: str | None = None,
              shard: VocabShard | None = None) -> PolicyBatch:
        """Validate the batch and build its pair-ordered layout (the call's one host sync). ``finite``: tensors
        whose values must be finite, checked in the same sync (``check_finite=True``)."""
        check_head_inputs(hidden, weight, labels, bias)
        check_seq_ids(hidden, seq_ids, num_seqs)
        if seq_ids is None and hidden.dim() == 2:
            raise ValueError(f"hidden: [N, H] input {tuple(hidden.shape)} needs seq_ids and num_seqs (packed "
                             "pairs); or pass [B, T, H]")
        num_pairs = _num_pairs(hidden, num_seqs)
        head = HeadPass.for_inputs(hidden, weight, backend=backend, transform=transform, with_entropy=token_metrics,
                                   with_top1=token_metrics, gemm=gemm, shard=shard)
        checked = [(name, t.detach()) for name, t in finite if isinstance(t, torch.Tensor)]
        for name, t in checked:  # counted on hidden's device in the sync: a meta tensor has nothing to count
            check_device(name, t, hidden.device)
        layout = pair_layout(labels, head.vocab_size(weight), seq_ids, num_pairs, ignore_index, checked)
        layout = localize(layout, shard)  # a vocabulary shard scores global target ids in its slab
        return cls(hidden, weight, bias, labels, layout, head, num_pairs)


@dataclass(frozen=True)
class ReferenceInputs:
    """The reference: ``logps`` ([B] sums, batch layout, precomputed), or the reference model's ``hidden``
    (shaped like the policy's) with its head (``weight`` default: the policy's, frozen, bias included)."""

    logps: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def given(self) -> bool:
        return self.logps is not None or self.hidden is not None

    def named(self) -> dict[str, torch.Tensor | None]:
        """The tensors under the call's keyword names (``ref_logps``, ...), for error messages and checks."""
        return {name: getattr(self, attr) for name, attr in REFERENCE_KEYWORDS.items()}

    def head_for(self, batch: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reference head (weight, bias), detached: its own, or the policy's frozen head."""
        if self.weight is None:
            bias = batch.bias if self.bias is None else self.bias
            return batch.weight.detach(), None if bias is None else bias.detach()
        return self.weight.detach(), None if self.bias is None else self.bias.detach()

    def check(self, batch: PolicyBatch) -> None:
        """Shapes, dtypes and devices of the given reference against the policy batch."""
        if self.logps is not None:
            check_batch_vector("ref_logps", self.logps, 2 * batch.num_pairs, batch.device)
        if self.hidden is None:
            return
        check_same_shape("ref_hidden", self.hidden, batch.hidden, "hidden")
        weight = batch.weight if self.weight is None else self.weight
        bias = self.bias if self.weight is not None or self.bias is not None else batch.bias
        check_head_inputs(self.hidden, weight, batch.labels, bias, hidden_name="ref_hidden",
                          weight_name="ref_weight", bias_name="ref_bias")
        if weight.shape[0] != batch.weight.shape[0]:
            raise ValueError(f"ref_weight: expected the policy's vocabulary size {batch.weight.shape[0]}, got "
                             f"shape {tuple(weight.shape)}")


@dataclass(frozen=True)
class RefinementInputs:
    """Sr-DPO / Sr-IPO's refinement margin: ``refinement`` ([B/2], precomputed), or the prompt-augmented batch
    ``hidden`` [B, T', H] / ``labels`` [B, T'] and its reference (``ref_hidden`` or ``ref_logps`` [B])."""

    refinement: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    ref_hidden: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None

    @property
    def given(self) -> bool:
        return self.refinement is not None

    @property
    def augmented(self) -> bool:
        return any(t is not None for t in (self.hidden, self.labels, self.ref_hidden, self.ref_logps))

    def named(self) -> dict[str, torch.Tensor | None]:
        """The tensors under the call's keyword names (``refinement``, ``refine_hidden``, ...)."""
        return {name: getattr(self, attr) for name, attr in REFINEMENT_KEYWORDS.items()}

    def check(self, batch: PolicyBatch, loss_types: tuple[str, ...], needs_refinement: bool) -> None:
        if not needs_refinement:
            if self.given or self.augmented:
                raise ValueError(f"refinement / refine_*: only used by sr_dpo and sr_ipo, got loss_type "
                                 f"{list(loss_types)}")
            return
        if self.given and self.augmented:
            raise ValueError("refinement / refine_hidden: give the precomputed refinement or the prompt-augmented "
                             "batch, not both")
        if self.given:
            check_batch_vector("refinement", self.refinement, batch.num_pairs, batch.device)
            return
        if self.hidden is None or self.labels is None:
            raise ValueError(f"refinement: loss_type {list(loss_types)} needs the refinement margin; pass "
                             "refinement ([B/2], detached) or refine_hidden and refine_labels (the p ⊕ x batch)")
        if {"sr_dpo", "sr_ipo"} <= set(loss_types):
            raise ValueError("refinement: sr_dpo and sr_ipo use different margins; mix them with precomputed "
                             "refinement in separate losses")
        check_head_inputs(self.hidden, batch.weight, self.labels, batch.bias, hidden_name="refine_hidden",
                          labels_name="refine_labels")
        if self.hidden.dim() != 3 or self.hidden.shape[0] != 2 * batch.num_pairs:
            raise ValueError(f"refine_hidden: expected [B, T', H] with B = {2 * batch.num_pairs} (the batch's rows), "
                             f"got {tuple(self.hidden.shape)}")
        if self.ref_logps is not None:
            check_batch_vector("refine_ref_logps", self.ref_logps, 2 * batch.num_pairs, batch.device)
        elif self.ref_hidden is not None:
            check_same_shape("refine_ref_hidden", self.ref_hidden, self.hidden, "refine_hidden")


#: The flat keyword arguments of a preference call (``PreferenceLoss.forward(..., ref_hidden=...)``) and the
#: fields of ``ReferenceInputs`` / ``RefinementInputs`` they fill.
REFERENCE_KEYWORDS = {"ref_logps": "logps", "ref_hidden": "hidden", "ref_weight": "weight", "ref_bias": "bias"}
REFINEMENT_KEYWORDS = {"refinement": "refinement", "refine_hidden": "hidden", "refine_labels": "labels",
                       "refine_ref_hidden": "ref_hidden", "refine_ref_logps": "ref_logps"}


def call_inputs(reference: ReferenceInputs | torch.Tensor | None = None,
                refinement: RefinementInputs | torch.Tensor | None = None,
                **flat: torch.Tensor | None) -> tuple[ReferenceInputs, RefinementInputs]:
    """The reference and refinement of one call, from the frozen dataclasses, from a tensor of sums
    (``reference``: ``ref_logps`` [B]; ``refinement``: Δ [B/2]) or from the flat keywords of
    ``REFERENCE_KEYWORDS`` / ``REFINEMENT_KEYWORDS`` (the README's ``ref_hidden=``, ``refine_labels=``, ...)."""
    unknown = sorted(set(flat) - set(REFERENCE_KEYWORDS) - set(REFINEMENT_KEYWORDS))
    if unknown:
        raise TypeError(f"{unknown[0]}: unexpected keyword argument; expected the reference / refinement as "
                        f"ReferenceInputs / RefinementInputs or one of {[*REFERENCE_KEYWORDS, *REFINEMENT_KEYWORDS]}")
    return (_dataclass_of(ReferenceInputs, REFERENCE_KEYWORDS, "ref_logps", reference, flat),
            _dataclass_of(RefinementInputs, REFINEMENT_KEYWORDS, "refinement", refinement, flat))


def _dataclass_of(cls: type, keywords: dict[str, str], tensor_name: str, given: object,
                  flat: dict[str, torch.Tensor | None]) -> ReferenceInputs | RefinementInputs:
    fields = {attr: flat[name] for name, attr in keywords.items() if flat.get(name) is not None}
    if isinstance(given, cls):
        if fields:
            raise ValueError(f"{sorted(k for k in keywords if flat.get(k) is not None)}: already given in the "
                             f"{cls.__name__} passed; give one or the other")
        return given
    if given is not None:  # a tensor of sums (checked, with its name, where it is read)
        if flat.get(tensor_name) is not None:
            raise TypeError(f"{tensor_name}: given twice (positionally and by keyword)")
        fields[keywords[tensor_name]] = given
    return cls(**fields)


__all__ = ["REFERENCE_KEYWORDS", "REFINEMENT_KEYWORDS", "PolicyBatch", "ReferenceInputs", "RefinementInputs",
           "call_inputs", "check_batch_vector", "check_device", "pair_layout", "pair_order"]
