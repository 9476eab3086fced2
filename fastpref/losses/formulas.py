"""Preference losses on sequence log-probs: one function per loss type, unreduced per pair (pure torch).

Every function has the form ``f(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
ref_rejected_logps=None, *, beta=0.1, <its hyper-parameters>, chosen_lengths=None, rejected_lengths=None)``
and returns ``(losses [P], chosen_rewards [P], rejected_rewards [P])``; the batch loss is ``losses.mean()``.

Notation (README "Losses"): ``lp`` are per-pair **sums** of token log-probs, ``ref`` the reference
sums (0 when None or when the type is reference-free), ρ = lp − ref, h = ρ_w − ρ_l (w = chosen, l = rejected),
n = number of scored tokens of a response clamped to ≥ 1, x̄ = x / n, σ the logistic function. Rewards are
``β · (lp − ref)`` on the sums, detached, for every type (trl 1.16 logs them so).

The formulas are trl 1.16's ``DPOTrainer._compute_loss`` (reverse-KL scores, no WPO weighting, no
``ld_alpha``) with fastpref's additions (cDPO smoothing on ``sigmoid``, Sr-DPO / Sr-IPO) and the CPO / ORPO
trainers' ``simpo``, ``cpo`` and ``orpo``. Degenerate inputs never give NaN/inf where TRL would: a response
with no scored token (sum 0, length 0) is normalised by 1, ORPO's log(1 − p̄) sees p̄ ≤ 1 − eps, the NLL
denominator is clamped to ≥ 1 token, and DiscoPOP's exp(−βh) is capped below the dtype's overflow (where its
weight σ(βh/τ) is 0 anyway).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils.validation import FP32_MAX, Interval, check_number

LossResult = tuple[Tensor, Tensor, Tensor]
_F = TypeVar("_F", bound=Callable[..., LossResult])

LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sr_dpo", "sr_ipo", "simpo", "cpo", "orpo", "sft",
)
PAIR_SEPARABLE: frozenset[str] = frozenset(LOSS_TYPES) - {"aot", "aot_unpaired"}
REFERENCE_FREE: frozenset[str] = frozenset({"simpo", "cpo", "orpo", "sft"})
NLL_TYPES: frozenset[str] = frozenset({"sft", "cpo", "orpo"})
NEEDS_LENGTHS: frozenset[str] = frozenset({"ipo", "sr_ipo", "sigmoid_norm", "simpo"}) | NLL_TYPES
NEEDS_REFINEMENT: frozenset[str] = frozenset({"sr_dpo", "sr_ipo"})


# --------------------------------------------------------------------------------------------------------------
# Hyper-parameter ranges (one table, shared by the functions and by ``LossConfig``)


_BIG = FP32_MAX  # every hyper-parameter is finite in fp32, the precision of the fused losses
HPARAM_RANGES: dict[str, Interval] = {
    "beta": Interval(0.0, _BIG, low_closed=False, high_closed=True),
    "refinement_lambda": Interval(0.0, _BIG, high_closed=True,
                                  note="the weight λ of the refinement term; 0 gives DPO / IPO"),
    "simpo_gamma": Interval(0.0, _BIG, high_closed=True, note="SimPO's target reward margin γ"),
    "discopop_tau": Interval(0.0, _BIG, low_closed=False, high_closed=True, note="DiscoPOP's temperature τ"),
    "cpo_alpha": Interval(0.0, _BIG, high_closed=True, note="the weight of CPO's NLL term"),
    # label_smoothing when no loss type of the list reads it (TRL ignores it then)
    "label_smoothing": Interval(0.0, 1.0),
}
# label_smoothing ε per loss type that reads it. robust: TRL and Liger check [0, 0.5) (it divides by 1 − 2ε);
# exo_pair: TRL and Liger require ε > 0 (it takes log ε); ε > 0.5 would prefer the rejected response.
SMOOTHING_RANGES: dict[str, Interval] = {
    "sigmoid": Interval(0.0, 0.5, high_closed=True, note="cDPO: the probability that a label is flipped"),
    "robust": Interval(0.0, 0.5, note="rDPO divides by 1 - 2ε"),
    "exo_pair": Interval(0.0, 0.5, low_closed=False, high_closed=True,
                         note="EXO takes log ε; the paper recommends 1e-3"),
    "aot": Interval(0.0, 0.5, high_closed=True),
    "aot_unpaired": Interval(0.0, 0.5, high_closed=True),
    "simpo": Interval(0.0, 0.5, high_closed=True),
    "cpo": Interval(0.0, 0.5, high_closed=True),
}


def check_hparam(name: str, value: object, loss_type: str | None = None) -> float:
    """``value`` as a float after checking it against its range (``label_smoothing``: the range of
    ``loss_type``); ``TypeError`` / ``ValueError`` naming the argument, the value and the range."""
    allowed = SMOOTHING_RANGES.get(loss_type, HPARAM_RANGES[name]) if name == "label_smoothing" else (
        HPARAM_RANGES[name])
    where = f" for loss_type {loss_type!r}" if name == "label_smoothing" and loss_type is not None else ""
    return check_number(name, value, allowed, where=where)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------
# Validated inputs. The public functions below check their arguments; ``LossConfig`` checks its
# hyper-parameters once, and ``pair_losses`` then runs the implementations (``_IMPLEMENTATIONS``) unchecked —
# the fused kernels call it once per pair group.


def _describe(t: object) -> str:
    return f"tensor of dtype {t.dtype} and shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def _check_logps(lp_w: object, lp_l: object) -> None:
    for name, t in (("policy_chosen_logps", lp_w), ("policy_rejected_logps", lp_l)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 1:
            raise TypeError(f"{name}: expected a floating-point tensor [P] of sequence log-prob sums, got "
                            f"{_describe(t)}")
    if lp_l.shape != lp_w.shape or lp_l.device != lp_w.device:
        raise ValueError(f"policy_rejected_logps: expected shape {tuple(lp_w.shape)} on {lp_w.device} (like "
                         f"policy_chosen_logps), got {tuple(lp_l.shape)} on {lp_l.device}")


def _pair_vector(name: str, t: object, like: Tensor, *, integral: bool = False) -> Tensor:
    """A per-pair tensor: [P] (or 0-dim, broadcast) on ``like``'s device, returned in ``like``'s dtype."""
    ok_dtype = isinstance(t, Tensor) and (t.is_floating_point() or (integral and not t.is_complex()
                                                                    and t.dtype != torch.bool))
    if not ok_dtype:
        kind = "an integer or floating-point" if integral else "a floating-point"
        raise TypeError(f"{name}: expected {kind} tensor [{like.shape[0]}], got {_describe(t)}")
    if t.dim() not in (0, 1) or (t.dim() == 1 and t.shape != like.shape) or t.device != like.device:
        raise ValueError(f"{name}: expected shape [{like.shape[0]}] on {like.device}, got {tuple(t.shape)} on "
                         f"{t.device}")
    return t.to(like.dtype).expand_as(like)


class _Pair(NamedTuple):
    beta: float
    lp_w: Tensor  # policy sums
    lp_l: Tensor
    rho_w: Tensor  # ρ_w = lp_w − ref_w
    rho_l: Tensor
    chosen_rewards: Tensor  # β ρ_w, detached
    rejected_rewards: Tensor
    ref_w: Tensor | None  # the detached reference sums (None: 0)
    ref_l: Tensor | None


def rewards(beta: float, logps: Tensor, ref_logps: Tensor | None) -> Tensor:
    """The logged rewards β·(lp − ref), detached (ref = 0 when None): the one home of the formula (the losses, the
    outputs' metrics, the trainers' and the Liger drop-ins' rewards all read it)."""
    lp = logps.detach()
    return beta * (lp if ref_logps is None else lp - ref_logps.detach().to(lp.dtype))


def _make_pair(loss_type: str, lp_w: Tensor, lp_l: Tensor, ref_w: Tensor | None, ref_l: Tensor | None,
               beta: float) -> _Pair:
    """Log-ratios and rewards of well-formed inputs; the reference is 0 when None or when ``loss_type`` is
    reference-free."""
    if loss_type in REFERENCE_FREE or ref_w is None or ref_l is None:
        ref_w = ref_l = None
        rho_w, rho_l = lp_w, lp_l
    else:
        ref_w, ref_l = ref_w.detach(), ref_l.detach()
        rho_w, rho_l = lp_w - ref_w, lp_l - ref_l
    return _Pair(beta, lp_w, lp_l, rho_w, rho_l, rewards(beta, lp_w, ref_w), rewards(beta, lp_l, ref_l), ref_w, ref_l)


def _checked_pair(loss_type: str, lp_w: object, lp_l: object, ref_w: object, ref_l: object,
                  beta: object) -> _Pair:
    beta = check_hparam("beta", beta)
    _check_logps(lp_w, lp_l)
    if loss_type not in REFERENCE_FREE and ref_w is not None and ref_l is not None:
        ref_w = _pair_vector("ref_chosen_logps", ref_w, lp_w)
        ref_l = _pair_vector("ref_rejected_logps", ref_l, lp_l)
    return _make_pair(loss_type, lp_w, lp_l, ref_w, ref_l, beta)  # type: ignore[arg-type]


def _checked_lengths(loss_type: str, name: str, t: Tensor | None, like: Tensor) -> Tensor:
    """Scored-token counts as ``like``'s dtype, unclamped."""
    if t is None:
        what = loss_type if loss_type.startswith("loss_type") else f"loss_type {loss_type!r}"
        raise ValueError(f"{name}: {what} needs the number of scored tokens of each response "
                         f"(a tensor [{like.shape[0]}]), got None")
    return _pair_vector(name, t, like, integral=True)


def _checked_shift(loss_type: str, refinement: Tensor | None, refinement_lambda: float, like: Tensor) -> Tensor | None:
    """λ·sg[Δ], or None when λ = 0 (so that λ = 0 runs exactly the DPO / IPO ops)."""
    lam = check_hparam("refinement_lambda", refinement_lambda)
    if refinement is None:
        if lam == 0.0:
            return None
        raise ValueError(f"refinement: loss_type {loss_type!r} with refinement_lambda={lam!r} needs the refinement "
                         f"margin Δ (a tensor [{like.shape[0]}]), got None")
    delta = _pair_vector("refinement", refinement, like)
    return _shift(delta, lam)


def _shift(delta: Tensor | None, lam: float) -> Tensor | None:
    # stop-gradient: sg[Δ]
    return None if lam == 0.0 or delta is None else lam * delta.detach()


def _check_nll_scale(nll_scale: object) -> None:
    if not isinstance(nll_scale, (Real, Tensor)) or isinstance(nll_scale, bool):
        raise TypeError(f"nll_scale: expected a number or a tensor (P / Σ chosen tokens), got "
                        f"{type(nll_scale).__name__}")


def _default_nll_scale(chosen_lengths: Tensor) -> Tensor:
    """P / max(Σ n_w, 1) from the unclamped chosen lengths (TRL's token count)."""
    return chosen_lengths.shape[0] / chosen_lengths.sum().clamp(min=1.0)


class _Terms(NamedTuple):
    """What an implementation reads besides the pair: the lengths clamped ≥ 1 (None when not needed), the
    refinement shift λ·sg[Δ] (None when λ = 0), the NLL scale P / Σ n_w and the hyper-parameters."""

    n_w: Tensor | None = None
    n_l: Tensor | None = None
    shift: Tensor | None = None
    nll_scale: float | Tensor | None = None
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    cpo_alpha: float = 1.0


def _neg_logsigmoid_smoothed(z: Tensor, eps: float) -> Tensor:
    """−(1 − ε) log σ(z) − ε log σ(−z): the cDPO / conservative form; exactly −log σ(z) at ε = 0."""
    if eps == 0.0:
        return -F.logsigmoid(z)
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def _normalised_margin(p: _Pair, t: _Terms) -> Tensor:
    """h̄ = ρ_w / n_w − ρ_l / n_l (TRL's IPO / sigmoid_norm; the reference shares the policy's lengths)."""
    return p.rho_w / t.n_w - p.rho_l / t.n_l


def _nll(p: _Pair, t: _Terms) -> Tensor:
    """Per-pair share of the batch NLL −Σ lp_w / Σ n_w: ``−lp_w · nll_scale``."""
    return -p.rho_w * t.nll_scale


# --------------------------------------------------------------------------------------------------------------
# The formulas (trl 1.16 DPOTrainer._compute_loss, and the CPO / ORPO trainers), on validated inputs


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, branching at −log 2 (Mächler 2012), as TRL's ORPO trainer."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _exo_pair(p: _Pair, t: _Terms) -> Tensor:
    eps = t.label_smoothing
    z = p.beta * (p.rho_w - p.rho_l)
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps))


def _nca_pair(p: _Pair, t: _Terms) -> Tensor:
    r_w, r_l = p.beta * p.rho_w, p.beta * p.rho_l
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def _robust(p: _Pair, t: _Terms) -> Tensor:
    eps = t.label_smoothing
    z = p.beta * (p.rho_w - p.rho_l)
    return (-(1 - eps) * F.logsigmoid(z) - (-eps * F.logsigmoid(-z))) / (1 - 2 * eps)


def _aot(p: _Pair, t: _Terms) -> Tensor:
    margin = p.lp_w - p.lp_l
    ref_margin = torch.zeros_like(margin) if p.ref_w is None else p.ref_w - p.ref_l
    d = torch.sort(margin, dim=0).values - torch.sort(ref_margin, dim=0).values
    return _neg_logsigmoid_smoothed(p.beta * d, t.label_smoothing)


def _aot_unpaired(p: _Pair, t: _Terms) -> Tensor:
    d = torch.sort(p.rho_w, dim=0).values - torch.sort(p.rho_l, dim=0).values
    return _neg_logsigmoid_smoothed(p.beta * d, t.label_smoothing)


def _discopop(p: _Pair, t: _Terms) -> Tensor:
    z = (p.rho_w - p.rho_l) * p.beta
    m = torch.sigmoid(z / t.discopop_tau)
    exp_cap = math.floor(math.log(torch.finfo(z.dtype).max))
    return -F.logsigmoid(z) * (1 - m) + torch.exp((-z).clamp(max=exp_cap)) * m


def _sr_dpo(p: _Pair, t: _Terms) -> Tensor:
    z = p.beta * (p.rho_w - p.rho_l)
    if t.shift is not None:
        z = z - t.shift
    return -F.logsigmoid(z)


def _sr_ipo(p: _Pair, t: _Terms) -> Tensor:
    h = _normalised_margin(p, t)
    if t.shift is not None:
        h = h - t.shift
    return (h - 1 / (2 * p.beta)) ** 2


def _simpo(p: _Pair, t: _Terms) -> Tensor:
    z = p.beta * ((p.rho_w / t.n_w - p.rho_l / t.n_l) - t.simpo_gamma / p.beta)
    return _neg_logsigmoid_smoothed(z, t.label_smoothing)


def _cpo(p: _Pair, t: _Terms) -> Tensor:
    losses = _neg_logsigmoid_smoothed(p.beta * (p.rho_w - p.rho_l), t.label_smoothing)
    if t.cpo_alpha != 0.0:
        losses = losses + t.cpo_alpha * _nll(p, t)
    return losses


def orpo_log_odds(mean_w: Tensor, mean_l: Tensor) -> Tensor:
    """ORPO's log odds ratio of the mean token log-probs: log(p_w / (1 − p_w)) − log(p_l / (1 − p_l)), with the
    means kept ≤ −eps so that a mean of 0 stays finite."""
    top = -torch.finfo(mean_w.dtype).eps
    return (mean_w - mean_l) - (_log1mexp(mean_w.clamp(max=top)) - _log1mexp(mean_l.clamp(max=top)))


def _orpo(p: _Pair, t: _Terms) -> Tensor:
    log_odds = orpo_log_odds(p.rho_w / t.n_w, p.rho_l / t.n_l)
    return -(p.beta * F.logsigmoid(log_odds)) + _nll(p, t)


_IMPLEMENTATIONS: dict[str, Callable[[_Pair, _Terms], Tensor]] = {
    "sigmoid": lambda p, t: _neg_logsigmoid_smoothed(p.beta * (p.rho_w - p.rho_l), t.label_smoothing),
    "hinge": lambda p, t: torch.relu(1 - p.beta * (p.rho_w - p.rho_l)),
    "ipo": lambda p, t: (_normalised_margin(p, t) - 1 / (2 * p.beta)) ** 2,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": lambda p, t: -F.logsigmoid(p.beta * p.rho_w) - F.logsigmoid(-(p.beta * p.rho_l)),
    "sppo_hard": lambda p, t: (p.rho_w - 0.5 / p.beta) ** 2 + (p.rho_l + 0.5 / p.beta) ** 2,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": lambda p, t: (1 - torch.sigmoid(p.beta * p.rho_w)) + torch.sigmoid(p.beta * p.rho_l),
    "apo_down": lambda p, t: torch.sigmoid(p.beta * p.rho_w) + (1 - torch.sigmoid(p.beta * (p.rho_w - p.rho_l))),
    "discopop": _discopop,
    "sigmoid_norm": lambda p, t: -F.logsigmoid(p.beta * _normalised_margin(p, t)),
    "sr_dpo": _sr_dpo,
    "sr_ipo": _sr_ipo,
    "simpo": _simpo,
    "cpo": _cpo,
    "orpo": _orpo,
    "sft": _nll,
}
# Types whose formula divides by the response lengths (n clamped ≥ 1).
NORMALISED: frozenset[str] = frozenset({"ipo", "sr_ipo", "sigmoid_norm", "simpo", "orpo"})


def evaluate(loss_type: str, lp_w: Tensor, lp_l: Tensor, ref_w: Tensor | None, ref_l: Tensor | None, *,
             beta: float, chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
             refinement: Tensor | None = None, refinement_lambda: float = 0.0, nll_scale: float | Tensor | None = None,
             label_smoothing: float = 0.0, simpo_gamma: float = 0.5, discopop_tau: float = 0.05,
             cpo_alpha: float = 1.0) -> Tensor:
    """One type's per-pair losses on inputs that are already valid (``LossConfig`` checked the hyper-parameters;
    the caller passes [P] tensors of one dtype and device, the lengths a type needs, and ``nll_scale`` for the
    NLL types): no checks, so the fused kernels can call it once per pair group."""
    p = _make_pair(loss_type, lp_w, lp_l, ref_w, ref_l, beta)
    normalised = loss_type in NORMALISED
    terms = _Terms(
        n_w=chosen_lengths.to(lp_w.dtype).clamp(min=1.0) if normalised else None,
        n_l=rejected_lengths.to(lp_l.dtype).clamp(min=1.0) if normalised else None,
        shift=_shift(refinement, refinement_lambda) if loss_type in NEEDS_REFINEMENT else None,
        nll_scale=nll_scale, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, discopop_tau=discopop_tau,
        cpo_alpha=cpo_alpha)
    return _IMPLEMENTATIONS[loss_type](p, terms)


def check_pair_tensors(loss_types: list[str], lp_w: object, lp_l: object, ref_w: object, ref_l: object,
                       chosen_lengths: object, rejected_lengths: object, refinement: object, *,
                       need_lengths: bool) -> tuple[Tensor, ...]:
    """The per-pair tensors of ``pair_losses`` checked (metadata only: no device sync) and brought to the policy
    sums' dtype: ``(lp_w, lp_l, ref_w, ref_l, n_w, n_l, refinement)`` (lengths unclamped; None stays None)."""
    _check_logps(lp_w, lp_l)
    if ref_w is not None and ref_l is not None:
        ref_w = _pair_vector("ref_chosen_logps", ref_w, lp_w)  # type: ignore[arg-type]
        ref_l = _pair_vector("ref_rejected_logps", ref_l, lp_l)  # type: ignore[arg-type]
    what = f"loss_type {loss_types}"
    if need_lengths:
        chosen_lengths = _checked_lengths(what, "chosen_lengths", chosen_lengths, lp_w)  # type: ignore[arg-type]
        rejected_lengths = _checked_lengths(what, "rejected_lengths", rejected_lengths, lp_w)  # type: ignore
    if refinement is not None:
        refinement = _pair_vector("refinement", refinement, lp_w)  # type: ignore[arg-type]
    return lp_w, lp_l, ref_w, ref_l, chosen_lengths, rejected_lengths, refinement  # type: ignore[return-value]


def _checked(loss_type: str, lp_w: object, lp_l: object, ref_w: object, ref_l: object, *, beta: object,
             chosen_lengths: object, rejected_lengths: object, refinement: object = None,
             refinement_lambda: object = 0.0, nll_scale: object = None, **hparams: object) -> LossResult:
    """The public functions' path: every argument checked, then the implementation."""
    checked = {name: check_hparam(name, value, loss_type) for name, value in hparams.items()}
    p = _checked_pair(loss_type, lp_w, lp_l, ref_w, ref_l, beta)
    like = p.rho_w
    terms = _Terms(**checked)
    if loss_type in NORMALISED:
        n_w = _checked_lengths(loss_type, "chosen_lengths", chosen_lengths, like)  # type: ignore[arg-type]
        n_l = _checked_lengths(loss_type, "rejected_lengths", rejected_lengths, like)  # type: ignore[arg-type]
        terms = terms._replace(n_w=n_w.clamp(min=1.0), n_l=n_l.clamp(min=1.0))
    if loss_type in NEEDS_REFINEMENT:
        terms = terms._replace(shift=_checked_shift(loss_type, refinement, refinement_lambda, like))  # type: ignore
    if loss_type in NLL_TYPES and not (loss_type == "cpo" and terms.cpo_alpha == 0.0):
        if nll_scale is None:
            nll_scale = _default_nll_scale(
                _checked_lengths(loss_type, "chosen_lengths", chosen_lengths, like))  # type: ignore[arg-type]
        else:
            _check_nll_scale(nll_scale)
        terms = terms._replace(nll_scale=nll_scale)
    return _IMPLEMENTATIONS[loss_type](p, terms), p.chosen_rewards, p.rejected_rewards


def _doc(fn: _F) -> _F:
    """Append the arguments every loss function shares to its docstring."""
    fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n" + _ARGS_DOC
    return fn


_ARGS_DOC = """
    Args:
        policy_chosen_logps, policy_rejected_logps: [P] sums of the policy's token log-probs (fp32).
        ref_chosen_logps, ref_rejected_logps: [P] reference sums (or 0-dim), detached; None means 0
            (ignored by the reference-free types simpo, cpo, orpo, sft).
        beta: β > 0. chosen_lengths, rejected_lengths: [P] scored-token counts (int or float), clamped ≥ 1.

    Returns:
        (losses [P], chosen_rewards [P], rejected_rewards [P]); rewards are β·(lp − ref), detached.
    """


# --------------------------------------------------------------------------------------------------------------
# The public functions: DPO family (trl 1.16 DPOTrainer._compute_loss)


@_doc
def sigmoid(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
            ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, label_smoothing: float = 0.0,
            chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None) -> LossResult:
    """DPO (Rafailov et al. 2023, Eq. 7); cDPO (Mitchell 2023) with ``label_smoothing`` ε ∈ [0, 0.5]:
    −(1−ε) log σ(βh) − ε log σ(−βh). ε = 0 is trl 1.16's ``sigmoid``."""
    return _checked("sigmoid", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                    label_smoothing=label_smoothing)


@_doc
def hinge(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
          ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, chosen_lengths: Tensor | None = None,
          rejected_lengths: Tensor | None = None) -> LossResult:
    """SLiC hinge (Zhao et al. 2023): max(0, 1 − βh)."""
    return _checked("hinge", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)


@_doc
def ipo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, chosen_lengths: Tensor | None = None,
        rejected_lengths: Tensor | None = None) -> LossResult:
    """IPO (Azar et al. 2023, Eq. 17, β = τ): (h̄ − 1/(2β))², h̄ = ρ_w/n_w − ρ_l/n_l, length-normalised as
    TRL does (lengths required)."""
    return _checked("ipo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)


@_doc
def exo_pair(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
             ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, label_smoothing: float = 1e-3,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None) -> LossResult:
    """EXO-pref (Ji et al. 2024, Eq. 16): KL(q ‖ p) with q = (σ(βh), σ(−βh)), p = (1 − ε, ε), ε ∈ (0, 0.5]:
    σ(βh)(log σ(βh) − log(1−ε)) + σ(−βh)(log σ(−βh) − log ε)."""
    return _checked("exo_pair", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                    label_smoothing=label_smoothing)


@_doc
def nca_pair(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
             ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, chosen_lengths: Tensor | None = None,
             rejected_lengths: Tensor | None = None) -> LossResult:
    """NCA (Chen et al. 2024): −log σ(βρ_w) − ½ log σ(−βρ_w) − ½ log σ(−βρ_l)."""
    return _checked("nca_pair", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)


@_doc
def robust(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
           ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, label_smoothing: float = 0.0,
           chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None) -> LossResult:
    """rDPO (Chowdhury et al. 2024), flip rate ε ∈ [0, 0.5): [−(1−ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε)."""
    return _checked("robust", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                    label_smoothing=label_smoothing)


@_doc
def bco_pair(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
             ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, chosen_lengths: Tensor | None = None,
             rejected_lengths: Tensor | None = None) -> LossResult:
    """BCO on pairs (Jung et al. 2024) without the running reward mean δ (as trl 1.16):
    −log σ(βρ_w) − log σ(−βρ_l)."""
    return _checked("bco_pair", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)


@_doc
def sppo_hard(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
              ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, chosen_lengths: Tensor | None = None,
              rejected_lengths: Tensor | None = None) -> LossResult:
    """SPPO, hard-probability version (Wu et al. 2024, Eq. 4.7 with P = 1 / 0):
    (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²."""
    return _checked("sppo_hard", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)


@_doc
def aot(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, label_smoothing: float = 0.0,
        chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None) -> LossResult:
    """AOT, paired (Melnyk et al. 2024): d = sort(lp_w − lp_l) − sort(ref_w − ref_l) over the batch, then
    −(1−ε) log σ(βd) − ε log σ(−βd). Couples the batch (the sort): losses[i] is the i-th order statistic."""
    return _checked("aot", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                    label_smoothing=label_smoothing)


@_doc
def aot_unpaired(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
                 ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, label_smoothing: float = 0.0,
                 chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None) -> LossResult:
    """AOT, unpaired (Melnyk et al. 2024): d = sort(ρ_w) − sort(ρ_l) over the batch, then
    −(1−ε) log σ(βd) − ε log σ(−βd). Couples the batch (the sort)."""
    return _checked("aot_unpaired", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                    ref_rejected_logps, beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                    label_smoothing=label_smoothing)


@_doc
def apo_zero(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
             ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, chosen_lengths: Tensor | None = None,
             rejected_lengths: Tensor | None = None) -> LossResult:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): (1 − σ(βρ_w)) + σ(βρ_l)."""
    return _checked("apo_zero", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)


@_doc
def apo_down(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
             ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, chosen_lengths: Tensor | None = None,
             rejected_lengths: Tensor | None = None) -> LossResult:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): σ(βρ_w) + (1 − σ(βh))."""
    return _checked("apo_down", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)


@_doc
def discopop(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
             ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, discopop_tau: float = 0.05,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None) -> LossResult:
    """DiscoPOP / log-ratio modulated loss (Chan Lu et al. 2024, Eq. 5), z = βh, m = σ(z/τ):
    −log σ(z)·(1 − m) + exp(−z)·m. exp's argument is capped at ⌊log(dtype max)⌋ (88 in fp32) so that z ≪ 0
    gives a finite loss where TRL gives inf·0 = NaN; m = 0 there, so finite values are unchanged."""
    return _checked("discopop", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                    discopop_tau=discopop_tau)


@_doc
def sigmoid_norm(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
                 ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, chosen_lengths: Tensor | None = None,
                 rejected_lengths: Tensor | None = None) -> LossResult:
    """Length-normalised DPO (trl 1.16 ``sigmoid_norm``): −log σ(β h̄), h̄ = ρ_w/n_w − ρ_l/n_l (lengths
    required)."""
    return _checked("sigmoid_norm", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                    ref_rejected_logps, beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)


# --------------------------------------------------------------------------------------------------------------
# Quality-aware self-refinement (Yu et al. 2024, Eq. 11-12)


@_doc
def sr_dpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
           ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, refinement: Tensor | None = None,
           refinement_lambda: float = 0.5, chosen_lengths: Tensor | None = None,
           rejected_lengths: Tensor | None = None) -> LossResult:
    """Sr-DPO (Yu et al. 2024, "Direct Alignment of Language Models via Quality-Aware Self-Refinement", Eq. 11):
    −log σ(βh − λ·sg[Δ]), ``refinement`` = Δ [P] including β (the DPO reward margin of the pair re-scored with
    the quality prompt), detached here; λ = ``refinement_lambda`` ≥ 0. λ = 0 runs exactly ``sigmoid``'s ops
    (Δ may then be None)."""
    return _checked("sr_dpo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                    refinement=refinement, refinement_lambda=refinement_lambda)


@_doc
def sr_ipo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
           ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, refinement: Tensor | None = None,
           refinement_lambda: float = 0.5, chosen_lengths: Tensor | None = None,
           rejected_lengths: Tensor | None = None) -> LossResult:
    """Sr-IPO (Yu et al. 2024, Eq. 12): (h̄ − λ·sg[Δ̄] − 1/(2β))², h̄ = ρ_w/n_w − ρ_l/n_l as in ``ipo``,
    ``refinement`` = Δ̄ [P] (β times the length-normalised refinement margin), detached here. λ = 0 runs
    exactly ``ipo``'s ops (Δ̄ may then be None). Lengths required."""
    return _checked("sr_ipo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                    refinement=refinement, refinement_lambda=refinement_lambda)


# --------------------------------------------------------------------------------------------------------------
# Reference-free: TRL's CPO / ORPO trainers, and the NLL (TRL's ``sft`` loss type)


@_doc
def simpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
          ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, label_smoothing: float = 0.0,
          simpo_gamma: float = 0.5, chosen_lengths: Tensor | None = None,
          rejected_lengths: Tensor | None = None) -> LossResult:
    """SimPO (Meng et al. 2024, Eq. 6), reference-free, with TRL's CPO-trainer smoothing ε:
    z = β(lp̄_w − lp̄_l − γ/β), −(1−ε) log σ(z) − ε log σ(−z), lp̄ = lp / n (lengths required). No NLL term
    (mix in ``sft`` for TRL's ``cpo_alpha``); rewards are β·lp on the sums (TRL's CPO logs β·lp̄)."""
    return _checked("simpo", policy_chosen_logps, policy_rejected_logps, None, None, beta=beta,
                    chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                    label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)


@_doc
def cpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, label_smoothing: float = 0.0,
        cpo_alpha: float = 1.0, chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
        nll_scale: float | Tensor | None = None) -> LossResult:
    """CPO (Xu et al. 2024, Eq. 3 + NLL), reference-free: −(1−ε) log σ(β(lp_w − lp_l)) − ε log σ(−β(lp_w − lp_l))
    + α·NLL, with NLL_i = −lp_w,i · nll_scale (mean over the pairs = −Σ lp_w / Σ n_w, TRL's chosen-token cross
    entropy). Chosen lengths are required unless ``nll_scale`` is given (or α = 0)."""
    return _checked("cpo", policy_chosen_logps, policy_rejected_logps, None, None, beta=beta,
                    chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, nll_scale=nll_scale,
                    label_smoothing=label_smoothing, cpo_alpha=cpo_alpha)


@_doc
def orpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
         ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, chosen_lengths: Tensor | None = None,
         rejected_lengths: Tensor | None = None, nll_scale: float | Tensor | None = None) -> LossResult:
    """ORPO (Hong et al. 2024, Eq. 4-7), reference-free: −β log σ(log_odds) + NLL with
    log_odds = (lp̄_w − lp̄_l) − (log(1 − e^lp̄_w) − log(1 − e^lp̄_l)), lp̄ = lp / n (lengths required) and
    NLL_i = −lp_w,i · nll_scale as in ``cpo``. lp̄ is clamped to ≤ −eps(dtype) (fp32: −1.2e-7) inside the
    log(1 − e^x), so an empty or fully certain response gives a finite loss (TRL's log(0) = −inf)."""
    return _checked("orpo", policy_chosen_logps, policy_rejected_logps, None, None, beta=beta,
                    chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, nll_scale=nll_scale)


@_doc
def sft(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, chosen_lengths: Tensor | None = None,
        rejected_lengths: Tensor | None = None, nll_scale: float | Tensor | None = None) -> LossResult:
    """NLL of the chosen responses (trl 1.16 ``sft``): the batch loss −Σ_i lp_w,i / Σ_i n_w,i (mean over every
    scored chosen token) written per pair as −lp_w,i · nll_scale, ``nll_scale = P / max(Σ n_w, 1)`` from the
    unclamped ``chosen_lengths`` unless given (a group of pairs passes its batch's scale)."""
    return _checked("sft", policy_chosen_logps, policy_rejected_logps, None, None, beta=beta,
                    chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, nll_scale=nll_scale)


LOSS_FUNCTIONS = {
    "sigmoid": sigmoid, "hinge": hinge, "ipo": ipo, "exo_pair": exo_pair, "nca_pair": nca_pair, "robust": robust,
    "bco_pair": bco_pair, "sppo_hard": sppo_hard, "aot": aot, "aot_unpaired": aot_unpaired, "apo_zero": apo_zero,
    "apo_down": apo_down, "discopop": discopop, "sigmoid_norm": sigmoid_norm, "sr_dpo": sr_dpo, "sr_ipo": sr_ipo,
    "simpo": simpo, "cpo": cpo, "orpo": orpo, "sft": sft,
}
# The hyper-parameters (``LossConfig`` fields, besides beta) each function takes.
LOSS_HPARAMS: dict[str, tuple[str, ...]] = {
    **{name: () for name in LOSS_TYPES},
    **{name: ("label_smoothing",) for name in SMOOTHING_RANGES},
    "discopop": ("discopop_tau",),
    "sr_dpo": ("refinement_lambda",),
    "sr_ipo": ("refinement_lambda",),
    "simpo": ("label_smoothing", "simpo_gamma"),
    "cpo": ("label_smoothing", "cpo_alpha"),
}
