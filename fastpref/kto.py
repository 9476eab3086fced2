"""KTO on the LM head: trl 1.16's ``KTOTrainer`` losses from hidden states and the LM head, without the logits.

``kto_loss`` scores a batch of B completions (each labelled desirable or undesirable), its reference and, for
``loss_type="kto"``, the KL estimate z₀ from the mismatched (prompt, completion) pairs, and evaluates
``fastpref.losses.kto`` per sequence. Given the detached z₀ the loss is separable per sequence, so the fast path
of ``fastpref.ops`` runs it unchanged: consecutive sequences (2i, 2i + 1) play the role of a "pair" (an odd batch
gets one empty sequence, which scores no token and weighs 0), the "pair loss" is the two sequences' losses, and
the gradients are formed during the forward (6·n·H·V FLOPs for the policy). Lean mode recomputes in the backward
(8·n·H·V); the reference and the KL pass (policy and reference) are forward-only (2·n·H·V each, no graph).

Metrics carry trl 1.16's ``KTOTrainer`` names: ``kl``, ``rewards/{chosen,rejected,margins}``,
``logps/{chosen,rejected}``, ``logits/{chosen,rejected}`` and, with ``token_metrics``, ``entropy``. TRL logs the
chosen (rejected) metrics only when the batch has a desirable (undesirable) completion; here they are 0 then,
and ``token_sums`` holds the counts and sums behind every metric for exact aggregation across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from . import losses as L
from .inputs import HeadBatch, check_batch_vector, check_device
from .ops import (
    HeadPass,
    LinearLogProbs,
    PairGroups,
    PairProblem,
    TokenLayout,
    TokenStats,
    build_layout,
    fast_pair_loss,
    segment_sum,
)
from .ops.vocab_shard import whole_head
from .outputs import token_sums
from .preference import HeadOptions, choose_mode, fast_groups
from .scoring import score_sequences
from .utils.compile import eager_op
from .utils.validation import (
    check_choice,
    check_head_inputs,
    check_number,
)

#: trl 1.16 ``KTOTrainer``'s logged loss metrics (besides ``loss``, ``grad_norm``, ``num_tokens``).
KTO_METRICS = ("kl", "rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected", "rewards/margins",
               "logits/chosen", "logits/rejected", "entropy")
#: Keys of ``KTOOutput.token_sums`` besides those of ``fastpref.outputs.token_sums``.
SEQUENCE_SUM_KEYS = ("chosen_seqs", "rejected_seqs", "chosen_reward_sum", "rejected_reward_sum", "chosen_logp_sum",
                     "rejected_logp_sum")


@dataclass(frozen=True)
class KTOConfig(HeadOptions):
    """Validated hyper-parameters of a fused KTO loss (held by ``KTOLoss``)."""

    loss_type: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @property
    def needs_kl(self) -> bool:
        return self.loss_type in L.unpaired.NEEDS_KL

    def formula(self) -> dict[str, object]:
        return {"beta": self.beta, "desirable_weight": self.desirable_weight,
                "undesirable_weight": self.undesirable_weight, "loss_type": self.loss_type}


@dataclass(frozen=True)
class KTOOutput:
    """What ``KTOLoss`` returns; per-sequence tensors are ``[B]`` in batch order, fp32, detached except ``loss``.

    ``losses``: the weighted per-sequence losses (``loss`` is their mean over the batch, as TRL's); ``logps`` /
    ``ref_logps``: sums over the scored tokens; ``rewards``: β·(logps − ref_logps); ``kl``: the z₀ the loss used
    (0 for ``apo_zero_unpaired``, as TRL logs it); ``metrics``: 0-dim tensors under TRL's names; ``token_sums``:
    the raw sums and counts behind them; ``mode``: the path that ran (``fast``, ``lean`` or ``forward``).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    logps: torch.Tensor
    ref_logps: torch.Tensor
    rewards: torch.Tensor
    desirable: torch.Tensor
    kl: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    token_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    mode: str = "lean"


@dataclass(frozen=True)
class _Batch(HeadBatch):
    """A KTO call's ``HeadBatch``: the scored tokens of ``S`` sequences (B rows, plus one empty sequence for an
    odd B)."""

    batch: int


def _rows_layout(labels: torch.Tensor, vocab: int, ignore_index: int, num_seqs: int,
                 finite: list[tuple[str, torch.Tensor]]) -> TokenLayout:
    """Row r of ``labels`` [B, T] is sequence r of ``num_seqs`` (≥ B); the call's one host sync."""
    rows, length = labels.shape
    seq_ids = torch.arange(rows, device=labels.device).repeat_interleave(length)
    return build_layout(labels.reshape(-1), ignore_index=ignore_index, vocab_size=vocab, seq_ids=seq_ids,
                        num_seqs=num_seqs, finite=finite)


def _policy(cfg: KTOConfig, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
            bias: torch.Tensor | None, finite: dict[str, torch.Tensor | None], *, token_metrics: bool) -> _Batch:
    check_head_inputs(hidden, weight, labels, bias)
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected [B, T, H] (one completion per row), got shape {tuple(hidden.shape)}")
    batch = hidden.shape[0]
    if batch == 0:
        raise ValueError(f"hidden: expected at least one sequence, got shape {tuple(hidden.shape)}")
    checked = [(n, t.detach()) for n, t in finite.items() if isinstance(t, torch.Tensor)] if cfg.check_finite else []
    for name, t in checked:
        check_device(name, t, hidden.device)
    layout = _rows_layout(labels, weight.shape[0], cfg.ignore_index, batch + batch % 2, checked)
    head = HeadPass.for_inputs(hidden, weight, backend=cfg.backend, transform=cfg.transform,
                               with_entropy=token_metrics, with_top1=token_metrics, gemm=cfg.gemm)
    return _Batch(hidden, weight, bias, labels, layout, head, batch)


def _groups(cfg: KTOConfig, b: _Batch) -> tuple[PairGroups | None, int, int]:
    """Groups of consecutive sequence pairs whose logits fit the memory budget (None if one pair does not)."""
    return fast_groups(cfg, b.weight, b.head, b.layout, b.layout.num_seqs // 2)


def _sums_only(head: HeadPass) -> HeadPass:
    return replace(head, with_entropy=False, with_top1=False)


def _padded(values: torch.Tensor, size: int) -> torch.Tensor:
    return values if values.shape[0] == size else torch.cat([values, values.new_zeros(size - values.shape[0])])


def _reference(b: _Batch, ref_logps: torch.Tensor | None, ref_hidden: torch.Tensor | None,
               ref_weight: torch.Tensor | None, ref_bias: torch.Tensor | None,
               groups: PairGroups | None) -> torch.Tensor:
    """Reference sums [S] (0 for the padding sequence): given, or scored forward-only exactly as the policy is
    (the fast path's groups), so a reference equal to the policy gives rewards of exactly 0, as TRL's."""
    if (ref_logps is None) == (ref_hidden is None):
        raise ValueError("ref_logps / ref_hidden: give exactly one of them (the reference's [B] sums, or its hidden "
                         f"states [B, T, H']), got {'both' if ref_logps is not None else 'neither'}")
    size = b.layout.num_seqs
    if ref_logps is not None:
        return _padded(check_batch_vector("ref_logps", ref_logps, b.batch, b.hidden.device), size)
    if ref_weight is None:  # the policy's frozen head (its bias too unless ref_bias is given)
        ref_weight, ref_bias = b.weight, b.bias if ref_bias is None else ref_bias
    # the labels are the policy's: a ref_hidden whose (B, T) differs is named by the labels' shape check
    check_head_inputs(ref_hidden, ref_weight, b.labels, ref_bias, hidden_name="ref_hidden", weight_name="ref_weight",
                      bias_name="ref_bias")
    if ref_weight.shape[0] != b.weight.shape[0]:
        raise ValueError(f"ref_weight: expected the policy's vocabulary {b.weight.shape[0]} rows, got shape "
                         f"{tuple(ref_weight.shape)}")
    bias = None if ref_bias is None else ref_bias.detach()
    return score_sequences(ref_hidden, ref_weight.detach(), bias, b.layout, _sums_only(b.head), groups).seq_logps


def _kl(cfg: KTOConfig, b: _Batch, kl: torch.Tensor | float | None, kl_hidden: torch.Tensor | None,
        kl_labels: torch.Tensor | None, kl_ref_hidden: torch.Tensor | None, kl_ref_logps: torch.Tensor | None,
        ref_weight: torch.Tensor | None, ref_bias: torch.Tensor | None) -> torch.Tensor:
    """z₀ (0-dim fp32, detached): given as ``kl``, or ``kl_estimate`` of the mismatched batch scored forward-only
    by the policy (``kl_hidden``, ``kl_labels``) and the reference (``kl_ref_hidden`` or ``kl_ref_logps``)."""
    device = b.hidden.device
    if not cfg.needs_kl:
        return torch.zeros((), device=device)
    if kl is not None and kl_hidden is not None:
        raise ValueError("kl / kl_hidden: give the KL estimate z0 or the mismatched batch it is estimated from, "
                         "not both")
    if kl is not None:
        if isinstance(kl, torch.Tensor):
            if not kl.is_floating_point() or kl.numel() != 1:
                raise ValueError(f"kl: expected a floating-point scalar tensor (0-dim or one element), got "
                                 f"{kl.dtype} of shape {tuple(kl.shape)}")
            return kl.detach().reshape(()).float().to(device)
        z0 = check_number("kl", kl, L.unpaired.KL_RANGE, where=" (z0 = max(0, mean KL log-ratio))")
        return torch.tensor(z0, device=device)
    if kl_hidden is None or kl_labels is None:
        raise ValueError("kl: loss_type 'kto' needs the KL estimate z0: pass kl (e.g. fastpref.losses.kl_estimate of "
                         "the mismatched pairs' sums) or kl_hidden and kl_labels (the mismatched batch, scored here "
                         "forward-only) with kl_ref_hidden or kl_ref_logps")
    with torch.no_grad():
        check_head_inputs(kl_hidden, b.weight, kl_labels, b.bias, hidden_name="kl_hidden", labels_name="kl_labels")
        if kl_hidden.dim() != 3:
            raise ValueError(f"kl_hidden: expected [B', T', H], got shape {tuple(kl_hidden.shape)}")
        layout = _rows_layout(kl_labels, b.weight.shape[0], cfg.ignore_index, kl_hidden.shape[0], [])
        head = _sums_only(HeadPass.for_inputs(kl_hidden, b.weight, backend=cfg.backend, transform=cfg.transform,
                                              gemm=cfg.gemm))
        bias = None if b.bias is None else b.bias.detach()
        policy = score_sequences(kl_hidden, b.weight.detach(), bias, layout, head).seq_logps
        if (kl_ref_logps is None) == (kl_ref_hidden is None):
            raise ValueError("kl_ref_logps / kl_ref_hidden: give exactly one of them with kl_hidden (the reference's "
                             "sums or hidden states on the mismatched batch)")
        if kl_ref_logps is not None:
            ref = check_batch_vector("kl_ref_logps", kl_ref_logps, kl_hidden.shape[0], device)
        else:
            if ref_weight is None:
                ref_weight, ref_bias = b.weight, b.bias if ref_bias is None else ref_bias
            if tuple(kl_ref_hidden.shape[:-1]) != tuple(kl_hidden.shape[:-1]):
                raise ValueError(f"kl_ref_hidden: expected (B', T') = {tuple(kl_hidden.shape[:-1])} (those of "
                                 f"kl_hidden), got shape {tuple(kl_ref_hidden.shape)}")
            ref = score_sequences(kl_ref_hidden, ref_weight.detach(), None if ref_bias is None else ref_bias.detach(),
                                  layout, head).seq_logps
        return L.kl_estimate(policy, ref)


def _metrics(cfg: KTOConfig, seq: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor,
             stats: TokenStats, layout: TokenLayout) -> tuple[torch.Tensor, dict[str, torch.Tensor],
                                                              dict[str, torch.Tensor]]:
    """Rewards [B], TRL's metrics and the sums behind them (no host sync)."""
    with torch.no_grad():
        batch = desirable.shape[0]
        lp = seq.detach()[:batch]
        rewards = cfg.beta * (lp - ref[:batch])
        d = desirable.float()
        u = 1.0 - d
        padded = _padded(desirable, layout.num_seqs)
        sums = token_sums(stats, padded.index_select(0, layout.seq))
        sums.update({
            "chosen_seqs": d.sum(), "rejected_seqs": u.sum(),
            "chosen_reward_sum": (rewards * d).nansum(), "rejected_reward_sum": (rewards * u).nansum(),
            "chosen_logp_sum": (lp * d).nansum(), "rejected_logp_sum": (lp * u).nansum(),
        })
        nc, nr = sums["chosen_seqs"].clamp(min=1), sums["rejected_seqs"].clamp(min=1)
        metrics = {
            "kl": z0,
            "rewards/chosen": sums["chosen_reward_sum"] / nc,
            "logps/chosen": sums["chosen_logp_sum"] / nc,
            "rewards/rejected": sums["rejected_reward_sum"] / nr,
            "logps/rejected": sums["rejected_logp_sum"] / nr,
            "logits/chosen": sums["chosen_logit_sum"] / sums["chosen_tokens"].clamp(min=1),
            "logits/rejected": sums["rejected_logit_sum"] / sums["rejected_tokens"].clamp(min=1),
        }
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        if "entropy_sum" in sums:
            metrics["entropy"] = sums["entropy_sum"] / sums["scored_tokens"].clamp(min=1)
    return rewards, metrics, sums


def _desirable(desirable: object, batch: int, device: torch.device) -> torch.Tensor:
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool or tuple(desirable.shape) != (batch,):
        seen = f"{desirable.dtype} of shape {tuple(desirable.shape)}" if isinstance(desirable, torch.Tensor) \
            else type(desirable).__name__
        raise TypeError(f"desirable: expected a bool tensor of shape [{batch}] (True: a desirable completion, TRL's "
                        f"label), got {seen}")
    return desirable.to(device)


def kto_loss(
    cfg: KTOConfig,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    desirable: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    kl: torch.Tensor | float | None = None,
    kl_hidden: torch.Tensor | None = None,
    kl_labels: torch.Tensor | None = None,
    kl_ref_hidden: torch.Tensor | None = None,
    kl_ref_logps: torch.Tensor | None = None,
) -> KTOOutput:
    """See ``KTOLoss.forward``."""
    hidden, weight, bias = whole_head(hidden, weight, bias, who="KTOLoss")
    if ref_weight is not None:
        ref_hidden, ref_weight, ref_bias = whole_head(ref_hidden, ref_weight, ref_bias, who="KTOLoss (ref_weight)")
    finite = {"hidden": hidden, "weight": weight, "bias": bias, "ref_logps": ref_logps, "ref_hidden": ref_hidden,
              "ref_weight": ref_weight, "ref_bias": ref_bias}
    b = _policy(cfg, hidden, weight, labels, bias, finite, token_metrics=cfg.token_metrics)
    desirable = _desirable(desirable, b.batch, hidden.device)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    mode, groups = choose_mode(cfg, b.weight, b.head, b.layout, b.layout.num_seqs // 2, needs_grad,
                               unit=("two sequences'", "the largest two have"))
    ref = _reference(b, ref_logps, ref_hidden, ref_weight, ref_bias, groups)
    z0 = _kl(cfg, b, kl, kl_hidden, kl_labels, kl_ref_hidden, kl_ref_logps, ref_weight, ref_bias)
    size = b.layout.num_seqs
    wanted = _padded(desirable, size)
    real = _padded(torch.ones(b.batch, device=hidden.device), size)  # 0 weighs the odd batch's empty sequence
    formula = cfg.formula()

    def per_sequence(lp: torch.Tensor, seqs: slice) -> torch.Tensor:
        losses, _ = L.kto(lp, ref[seqs], wanted[seqs], z0, **formula)
        return losses * real[seqs]

    if mode == "fast":
        scale = (size // 2) / b.batch  # the op averages over pairs; TRL over sequences

        def pair_loss(first: torch.Tensor, second: torch.Tensor, pairs: slice) -> torch.Tensor:
            lp = torch.stack([first, second], 1).reshape(-1)
            per_seq = per_sequence(lp, slice(2 * pairs.start, 2 * pairs.stop))
            return (per_seq[0::2] + per_seq[1::2]) * scale

        loss, fast = fast_pair_loss(b.source, weight, bias, PairProblem(b.layout, groups, pair_loss, b.head))
        seq, stats = fast.seq_logps, fast.stats
        with torch.no_grad():
            losses = per_sequence(seq, slice(0, size))
    elif mode == "lean":
        tok, stats = LinearLogProbs.apply(b.source, weight, bias, b.layout, b.head)
        seq = segment_sum(tok, b.layout.offsets)
        losses = per_sequence(seq, slice(0, size))
        loss = losses.sum() / b.batch
    else:
        scored = score_sequences(hidden, weight, bias, b.layout, b.head)
        seq, stats = scored.seq_logps, scored.stats
        losses = per_sequence(seq, slice(0, size))
        loss = losses.sum() / b.batch
    rewards, metrics, sums = _metrics(cfg, seq, ref, desirable, z0, stats, b.layout)
    return KTOOutput(loss=loss, losses=losses.detach()[: b.batch], logps=seq.detach()[: b.batch],
                     ref_logps=ref[: b.batch], rewards=rewards, desirable=desirable, kl=z0, metrics=metrics,
                     token_sums=sums, mode=mode)


@torch.no_grad()
def kto_score(cfg: KTOConfig, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sequence sums ``[B]``, forward-only, scored exactly as ``kto_loss`` scores the policy in training (the fast
    path's groups when it would run fast): a reference equal to the policy gives rewards of exactly 0."""
    hidden, weight, bias = whole_head(hidden, weight, bias, who="KTOLoss.score")
    b = _policy(cfg, hidden, weight, labels, bias, {"hidden": hidden, "weight": weight, "bias": bias},
                token_metrics=False)
    groups = _groups(cfg, b)[0] if cfg.mode != "lean" else None
    return score_sequences(hidden, weight, bias, b.layout, b.head, groups).seq_logps[: b.batch]


class KTOLoss(nn.Module):
    """Fused KTO loss (trl 1.16 ``KTOTrainer``'s ``kto`` and ``apo_zero_unpaired``) from hidden states and the head.

    Args:
        loss_type: ``"kto"`` (Ethayarajh et al. 2024, Eq. 7, against the KL estimate z₀) or
            ``"apo_zero_unpaired"`` (no KL term): ``fastpref.losses.UNPAIRED_LOSS_TYPES``.
        beta: β > 0. desirable_weight, undesirable_weight: TRL's w_d, w_u ≥ 0.
        ignore_index, mode, memory_budget, backend, temperature, logit_scale, softcap, gemm, check_finite: as
            ``fastpref.PreferenceLoss`` (fast mode pairs consecutive sequences; ``memory_budget`` must hold the
            logits of two of them).
        token_metrics: also compute ``entropy`` (TRL's metric) in the kernels' pass.

    ``forward(hidden, weight, labels, desirable, ref_logps=None, *, bias=None, ref_hidden=None, ref_weight=None,
    ref_bias=None, kl=None, kl_hidden=None, kl_labels=None, kl_ref_hidden=None, kl_ref_logps=None) -> KTOOutput``:
    ``hidden [B, T, H]``, ``labels [B, T]`` (already shifted, ``ignore_index`` outside the completion),
    ``desirable [B]`` bool (TRL's ``label``). The reference: ``ref_logps [B]`` sums or ``ref_hidden``
    (+ ``ref_weight`` / ``ref_bias``, default the policy's head, detached), scored under no-grad. ``kto`` needs
    z₀: ``kl`` (a detached scalar, e.g. ``fastpref.losses.kl_estimate`` of sums a trainer gathered over ranks), or
    the mismatched batch ``kl_hidden`` / ``kl_labels`` with ``kl_ref_hidden`` or ``kl_ref_logps``, from which
    z₀ = max(0, mean(policy − reference)) is scored here forward-only.
    """

    def __init__(self, loss_type: str = "kto", *, beta: float = 0.1, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0, ignore_index: int = -100, mode: str = "auto",
                 memory_budget: int | None = None, backend: str = "auto", temperature: float = 1.0,
                 logit_scale: float = 1.0, softcap: float | None = None, token_metrics: bool = False,
                 check_finite: bool = False, gemm: str | None = None) -> None:
        super().__init__()
        loss_type = check_choice("loss_type", loss_type, L.UNPAIRED_LOSS_TYPES)
        beta = L.formulas.check_hparam("beta", beta)
        w_d = check_number("desirable_weight", desirable_weight, L.unpaired.WEIGHT)
        w_u = check_number("undesirable_weight", undesirable_weight, L.unpaired.WEIGHT)
        options = HeadOptions.checked(ignore_index=ignore_index, mode=mode, memory_budget=memory_budget,
                                      backend=backend, temperature=temperature, logit_scale=logit_scale,
                                      softcap=softcap, token_metrics=token_metrics, check_finite=check_finite,
                                      gemm=gemm)
        self.config = KTOConfig(loss_type=loss_type, beta=beta, desirable_weight=w_d, undesirable_weight=w_u,
                                **options)

    @property
    def beta(self) -> float:
        return self.config.beta

    @eager_op
    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, desirable: torch.Tensor,
                ref_logps: torch.Tensor | None = None, *, bias: torch.Tensor | None = None,
                ref_hidden: torch.Tensor | None = None, ref_weight: torch.Tensor | None = None,
                ref_bias: torch.Tensor | None = None, kl: torch.Tensor | float | None = None,
                kl_hidden: torch.Tensor | None = None, kl_labels: torch.Tensor | None = None,
                kl_ref_hidden: torch.Tensor | None = None, kl_ref_logps: torch.Tensor | None = None) -> KTOOutput:
        return kto_loss(self.config, hidden, weight, labels, desirable, ref_logps, bias=bias, ref_hidden=ref_hidden,
                        ref_weight=ref_weight, ref_bias=ref_bias, kl=kl, kl_hidden=kl_hidden, kl_labels=kl_labels,
                        kl_ref_hidden=kl_ref_hidden, kl_ref_logps=kl_ref_logps)

    @eager_op
    def score(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """Reference (or KL-pass) sequence sums ``[B]``, forward-only (2·n·H·V FLOPs), scored exactly as this loss
        scores the policy in training: a reference equal to the policy gives rewards of exactly 0, as in TRL."""
        return kto_score(self.config, hidden, weight, labels, bias=bias)

    def bind(self, desirable: torch.Tensor, kl: torch.Tensor | float | None = None) -> BoundKTOLoss:
        """This loss with the batch's ``desirable`` labels and z₀ fixed, callable as a ``PreferenceLoss`` is
        (``(hidden, weight, labels, ref_logps, bias=...)``): what ``add_fused_lm_head``'s ``preference_loss=``
        runs inside the model's forward."""
        return BoundKTOLoss(self, desirable, kl)

    def extra_repr(self) -> str:
        c = self.config
        return f"loss_type={c.loss_type!r}, beta={c.beta}, mode={c.mode!r}, backend={c.backend!r}, gemm={c.gemm!r}"


class BoundKTOLoss:
    """``KTOLoss`` with one batch's labels and z₀ bound (see ``KTOLoss.bind``)."""

    def __init__(self, loss: KTOLoss, desirable: torch.Tensor, kl: torch.Tensor | float | None) -> None:
        self.loss, self.desirable, self.kl = loss, desirable, kl

    @property
    def config(self) -> KTOConfig:
        return self.loss.config

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 ref_logps: torch.Tensor | None = None, *, bias: torch.Tensor | None = None,
                 refinement: torch.Tensor | None = None, **kwargs: torch.Tensor | None) -> KTOOutput:
        if refinement is not None or any(v is not None for v in kwargs.values()):
            given = ["refinement"] * (refinement is not None) + [k for k, v in kwargs.items() if v is not None]
            raise ValueError(f"{given}: KTO has no refinement term and scores padded rows only")
        return self.loss(hidden, weight, labels, self.desirable, ref_logps, bias=bias, kl=self.kl)

    def score(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
              bias: torch.Tensor | None = None, **kwargs: torch.Tensor | None) -> torch.Tensor:
        if any(v is not None for v in kwargs.values()):
            raise ValueError(f"{[k for k, v in kwargs.items() if v is not None]}: KTO scores padded rows only")
        return self.loss.score(hidden, weight, labels, bias=bias)


__all__ = ["KTO_METRICS", "SEQUENCE_SUM_KEYS", "BoundKTOLoss", "KTOConfig", "KTOLoss", "KTOOutput", "kto_loss",
           "kto_score"]
