"""``LossConfig`` (validated hyper-parameters of a possibly mixed loss), ``PairTerms`` (what every caller forms
before evaluating it: the reference split, the lengths, the NLL scale) and ``pair_losses`` (its per-pair value)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from numbers import Real

import torch
from torch import Tensor

from .formulas import (
    LOSS_TYPES,
    NEEDS_LENGTHS,
    NEEDS_REFINEMENT,
    NLL_TYPES,
    NORMALISED,
    PAIR_SEPARABLE,
    REFERENCE_FREE,
    SMOOTHING_RANGES,
    LossResult,
    check_hparam,
    check_pair_tensors,
    evaluate,
    rewards,
)


@dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of a preference loss: ``Σ_k loss_weights[k] × loss_types[k]`` (TRL's ``loss_type=[...]``
    with ``loss_weights``), validated on construction.

    ``beta`` β > 0; ``label_smoothing`` ε in the range of every listed type that reads it (sigmoid/cDPO, aot,
    aot_unpaired, simpo, cpo: [0, 0.5]; robust: [0, 0.5); exo_pair: (0, 0.5]); ``refinement_lambda`` λ ≥ 0;
    ``simpo_gamma`` γ ≥ 0; ``discopop_tau`` τ > 0; ``cpo_alpha`` ≥ 0; weights finite. ``reference_free``
    treats the reference log-probs as 0 for every type (TRL's former ``reference_free``).
    """

    loss_types: tuple[str, ...]
    loss_weights: tuple[float, ...]
    beta: float = 0.1
    label_smoothing: float = 0.0
    refinement_lambda: float = 0.5
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    cpo_alpha: float = 1.0
    reference_free: bool = False

    @classmethod
    def create(cls, loss_type: str | Sequence[str], loss_weights: Sequence[float] | None = None,
               **hparams: float | bool) -> LossConfig:
        """``LossConfig`` from one loss type or a list of them (weights default to 1 each) and keyword
        hyper-parameters (``beta``, ``label_smoothing``, ...); raises ``TypeError`` / ``ValueError`` naming the
        argument, the value seen and what was expected."""
        names = {f.name for f in fields(cls)} - {"loss_types", "loss_weights"}
        unknown = sorted(set(hparams) - names)
        if unknown:
            raise TypeError(f"LossConfig.create: unexpected hyper-parameter(s) {unknown}; expected some of "
                            f"{sorted(names)}")
        types = (loss_type,) if isinstance(loss_type, str) else loss_type
        if loss_weights is None and isinstance(types, Sequence):
            loss_weights = (1.0,) * len(types)
        return cls(types, loss_weights, **hparams)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        types = self.loss_types
        if isinstance(types, str) or not isinstance(types, Sequence) or not types:
            raise TypeError(f"loss_type: expected a loss type name or a non-empty list of them, got {types!r}")
        for name in types:
            if name not in LOSS_TYPES:
                raise ValueError(f"loss_type: expected one of {list(LOSS_TYPES)}, got {name!r}")
        weights = self.loss_weights
        if isinstance(weights, str) or not isinstance(weights, Sequence):
            raise TypeError(f"loss_weights: expected a list of {len(types)} numbers, got {weights!r}")
        if len(weights) != len(types):
            raise ValueError(f"loss_weights: expected {len(types)} weights (one per loss_type {list(types)}), got "
                             f"{len(weights)}: {list(weights)}")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(w):
                raise ValueError(f"loss_weights: expected finite numbers, got {list(weights)}")
        if not isinstance(self.reference_free, bool):
            raise TypeError(f"reference_free: expected a bool, got {type(self.reference_free).__name__} "
                            f"{self.reference_free!r}")
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("loss_types", tuple(types))
        set_("loss_weights", tuple(float(w) for w in weights))
        for name in ("beta", "label_smoothing", "refinement_lambda", "simpo_gamma", "discopop_tau", "cpo_alpha"):
            set_(name, check_hparam(name, getattr(self, name)))
        for name in dict.fromkeys(types):
            if name in SMOOTHING_RANGES:
                check_hparam("label_smoothing", self.label_smoothing, name)

    @property
    def pair_separable(self) -> bool:
        """Each pair's loss depends on that pair only (false for aot / aot_unpaired, which sort the batch)."""
        return all(name in PAIR_SEPARABLE for name in self.loss_types)

    @property
    def reference_free_only(self) -> bool:
        """Every listed type is reference-free (simpo, cpo, orpo, sft): no reference log-probs needed."""
        return all(name in REFERENCE_FREE for name in self.loss_types)

    @property
    def needs_lengths(self) -> bool:
        """Some listed type needs the scored-token counts of the responses."""
        return any(name in NEEDS_LENGTHS for name in self.loss_types)

    @property
    def needs_refinement(self) -> bool:
        """Some listed type is Sr-DPO / Sr-IPO and reads the refinement margin."""
        return any(name in NEEDS_REFINEMENT for name in self.loss_types)


def pair_losses(
    config: LossConfig,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    refinement: Tensor | None = None,
    nll_scale: float | Tensor | None = None,
) -> LossResult:
    """Per-pair loss Σ_k w_k × loss_k of ``config`` on [P] sequence log-prob sums; the batch loss is the mean.

    Rewards are β·(lp − ref) on the sums (ref = 0 with ``config.reference_free`` or a reference-free-only
    config), detached. For a pair-separable config every op is elementwise per pair, so evaluating a slice of
    the pairs (with the batch's ``nll_scale`` = P / Σ n_w) gives that slice of the full-batch result — the
    contract of the fused kernels, which call this per pair group.

    Args:
        config: the validated hyper-parameters.
        policy_chosen_logps, policy_rejected_logps: [P] policy sums.
        ref_chosen_logps, ref_rejected_logps: [P] reference sums; may be None only when the reference is unused.
        chosen_lengths, rejected_lengths: [P] scored-token counts (required by ``config.needs_lengths`` types).
        refinement: [P] Δ (sr_dpo) / Δ̄ (sr_ipo), stop-gradient; only for Sr types.
        nll_scale: the batch's P / Σ n_w for the NLL-carrying types (sft, cpo, orpo); from chosen_lengths if None.

    Returns:
        (losses [P], chosen_rewards [P], rejected_rewards [P]).
    """
    total, lp_w, lp_l, ref_w, ref_l = _pair_loss(config, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                 ref_rejected_logps, chosen_lengths=chosen_lengths,
                                                 rejected_lengths=rejected_lengths, refinement=refinement,
                                                 nll_scale=nll_scale)
    return total, rewards(config.beta, lp_w, ref_w), rewards(config.beta, lp_l, ref_l)


def _pair_loss(config: LossConfig, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
               ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None, *, chosen_lengths: Tensor | None,
               rejected_lengths: Tensor | None, refinement: Tensor | None,
               nll_scale: float | Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """``pair_losses``'s per-pair loss and its checked inputs (lp_w, lp_l, ref_w, ref_l), without the rewards."""
    if not isinstance(config, LossConfig):
        raise TypeError(f"config: expected a fastpref.losses.LossConfig, got {type(config).__name__}")
    # The hyper-parameters were checked when the config was built; only the tensors' metadata is checked here.
    ref_free = config.reference_free or config.reference_free_only
    if ref_free:
        ref_chosen_logps = ref_rejected_logps = None
    elif ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"ref_chosen_logps / ref_rejected_logps: loss_type {list(config.loss_types)} needs the "
                         "reference log-probs, got None (or set reference_free=True)")
    if refinement is not None and not config.needs_refinement:
        raise ValueError(f"refinement: only read by sr_dpo and sr_ipo, got loss_type {list(config.loss_types)}")
    if refinement is None and config.needs_refinement and config.refinement_lambda != 0.0:
        raise ValueError(f"refinement: loss_type {list(config.loss_types)} with refinement_lambda="
                         f"{config.refinement_lambda!r} needs the refinement margin Δ (a tensor [P]), got None")
    lengths_needed = any(name in NORMALISED for name in config.loss_types)
    nll_needed = any(name in NLL_TYPES and not (name == "cpo" and config.cpo_alpha == 0.0)
                     for name in config.loss_types)
    lp_w, lp_l, ref_w, ref_l, n_w, n_l, refinement = check_pair_tensors(
        list(config.loss_types), policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_lengths, rejected_lengths, refinement, need_lengths=lengths_needed or (nll_needed and nll_scale is None))
    if nll_needed and nll_scale is None:
        nll_scale = lp_w.shape[0] / n_w.sum().clamp(min=1.0)
    total = None
    for name, weight in zip(config.loss_types, config.loss_weights):
        losses = evaluate(
            name, lp_w, lp_l, ref_w, ref_l, beta=config.beta, chosen_lengths=n_w, rejected_lengths=n_l,
            refinement=refinement, refinement_lambda=config.refinement_lambda, nll_scale=nll_scale,
            label_smoothing=config.label_smoothing, simpo_gamma=config.simpo_gamma,
            discopop_tau=config.discopop_tau, cpo_alpha=config.cpo_alpha)
        total = losses * weight if total is None else total + losses * weight
    return total, lp_w, lp_l, ref_w, ref_l


@dataclass(frozen=True)
class PairTerms:
    """What every caller of a loss forms the same way before evaluating it on [P] policy sums (the fused path, the
    materialised one, the HF flag-off trainer, the Liger drop-ins): the reference split into chosen / rejected,
    the scored-token counts, and the batch's NLL scale P / Σ n_w (sft, cpo, orpo). Built by ``pair_terms``."""

    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    nll_scale: float | Tensor

    def loss(self, config: LossConfig, chosen: Tensor, rejected: Tensor, pairs: slice = slice(None),
             refinement: Tensor | None = None) -> Tensor:
        """Per-pair loss [len(pairs)] of ``config`` on the policy sums of ``pairs`` (a slice of the batch's pairs:
        the fused kernels evaluate one pair group at a time with the batch's NLL scale)."""
        return _pair_loss(config, chosen, rejected, self.ref_chosen[pairs], self.ref_rejected[pairs],
                          chosen_lengths=self.chosen_lengths[pairs], rejected_lengths=self.rejected_lengths[pairs],
                          refinement=refinement, nll_scale=self.nll_scale)[0]

    def with_nll_scale(self, nll_scale: float | Tensor) -> PairTerms:
        return replace(self, nll_scale=nll_scale)


def pair_terms(config: LossConfig, ref: Tensor | None, lengths: Tensor, *, like: Tensor,
               pair_order: bool = False) -> PairTerms:
    """``PairTerms`` from [2P] per-sequence values: ``ref`` the reference sums (zeros like ``like`` [2P] when None or
    with ``reference_free=True``; else detached, in ``like``'s dtype) and ``lengths`` the scored-token counts, in
    the batch layout (chosen first half) or, with ``pair_order``, chosen 2i / rejected 2i + 1."""
    ref = torch.zeros_like(like) if ref is None or config.reference_free else ref.detach().to(like.dtype)
    if pair_order:
        (ref_c, ref_r), (n_w, n_l) = (ref[0::2], ref[1::2]), (lengths[0::2], lengths[1::2])
    else:
        pairs = like.shape[0] // 2
        (ref_c, ref_r), (n_w, n_l) = (ref[:pairs], ref[pairs:]), (lengths[:pairs], lengths[pairs:])
    return PairTerms(ref_c, ref_r, n_w, n_l, n_w.shape[0] / n_w.sum().clamp(min=1.0))


def refinement_margin(config: LossConfig, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                      ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None, *,
                      chosen_lengths: Tensor, rejected_lengths: Tensor) -> Tensor:
    """The refinement margin of Sr-DPO / Sr-IPO (Yu et al. 2024, Eq. 11-12) from the sums of the
    prompt-augmented (p ⊕ x) pairs, detached: Δ = β[(lp_w − ref_w) − (lp_l − ref_l)] for ``sr_dpo``, and Δ̄ with
    each log-ratio divided by its response length (clamped ≥ 1) for ``sr_ipo``. The reference is 0 for a
    reference-free config (or when not given)."""
    ratio_w, ratio_l = policy_chosen_logps.detach().float(), policy_rejected_logps.detach().float()
    if ref_chosen_logps is not None and ref_rejected_logps is not None and not (
            config.reference_free or config.reference_free_only):
        ratio_w = ratio_w - ref_chosen_logps.detach().float()
        ratio_l = ratio_l - ref_rejected_logps.detach().float()
    if "sr_ipo" in config.loss_types:
        ratio_w = ratio_w / chosen_lengths.clamp(min=1).float()
        ratio_l = ratio_l / rejected_lengths.clamp(min=1).float()
    return config.beta * (ratio_w - ratio_l)
