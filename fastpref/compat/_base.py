"""What the Liger-Kernel 0.8.5 drop-ins share: Liger's definitions, argument checks under Liger's names, the run.

Liger's chunked preference losses (``liger_kernel/chunked_loss/fused_linear_preference.py``) all compute, for a
batch whose first half holds the chosen responses and second half the rejected ones (pair i = rows i, i + B/2):

- per-sequence log-probs ``lp`` [B]: sums over the scored tokens, or means with ``average_log_prob``
  (SimPO and ORPO always average);
- the preference loss: the mean over the pairs of the family's formula on ``lp`` (and, for DPO, the reference's
  ``lp`` computed the same way under no-grad);
- ``nll = −Σ chosen-token log-probs / #chosen tokens`` (ORPO: of ``nll_target`` when given), and
  ``loss = preference loss + alpha * nll`` when ``compute_nll_loss`` (else ``nll`` is 0);
- the mean logit of each half over *every* position (ignored ones included) and the whole vocabulary;

and return ``(loss, (chosen_lp, rejected_lp, chosen_logits_mean, rejected_logits_mean, nll, *family_aux))``.

Two runs compute it without the ``[tokens, vocab]`` logits:

- **module**: one ``fastpref.PreferenceLoss`` with the fastpref loss type that is exactly the family's formula
  (``sigmoid`` on means is ``sigmoid_norm``, CPO on means is SimPO with γ = 0, ...) mixed with ``sft`` weighted
  by ``alpha``: its fast mode forms the gradients during the forward (6·n·H·V FLOPs for n scored tokens, no
  logits recompute), lean mode otherwise.
- **formula**: where no fastpref type matches (DPO's other types on means; ORPO without its NLL or with a separate
  ``nll_target``): ``fastpref.sequence_logps`` (2·n·H·V forward, 6·n·H·V backward) and the formula on top.

Both score the reference in the same way as the policy, so a reference equal to the policy gives rewards of
exactly 0 (as Liger does).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from .. import losses as L
from ..functional import linear_cross_entropy, sequence_logps
from ..losses.formulas import check_hparam
from ..modules import PreferenceLoss
from ..utils.validation import FP32, check_int, check_number

# fastpref's type for a DPO type evaluated on per-token means (Liger's ``average_log_prob=True``): sigmoid on
# means is the length-normalised sigmoid, and fastpref's IPO is length-normalised already. The other types have
# no fastpref counterpart on means and take the lean run.
_DPO_ON_MEANS = {"sigmoid": "sigmoid_norm", "ipo": "ipo"}
# DPO types that read label_smoothing / discopop_tau in Liger (its sigmoid has no cDPO smoothing).
_DPO_SMOOTHED = ("robust", "exo_pair")


@dataclass(frozen=True)
class LigerSpec:
    """The hyper-parameters of one Liger loss, as Liger's constructor or function received them.

    ``family`` is ``"dpo"``, ``"cpo"``, ``"simpo"`` or ``"orpo"``; ``loss_type`` the DPO variant (the family
    name otherwise); ``average_log_prob`` is True for SimPO and ORPO (Liger's base default, which they keep).
    """

    family: str
    loss_type: str
    ignore_index: int = -100
    beta: float = 0.1
    alpha: float = 1.0
    compute_nll_loss: bool = False
    average_log_prob: bool = False
    use_ref_model: bool = False
    label_smoothing: float = 0.0
    gamma: float = 0.5
    discopop_tau: float = 0.05


def _formula(spec: LigerSpec) -> tuple[str, dict[str, float | bool]]:
    """The fastpref loss type and hyper-parameters whose formula is the family's, for the formula run: DPO's type
    applied to the logps Liger's formula sees (sums, or means with unit lengths); the others on sums + lengths."""
    hp: dict[str, float | bool] = {"beta": spec.beta}
    if spec.family == "dpo":
        if spec.loss_type in _DPO_SMOOTHED:
            hp["label_smoothing"] = spec.label_smoothing
        if spec.loss_type == "discopop":
            hp["discopop_tau"] = spec.discopop_tau
        hp["reference_free"] = not spec.use_ref_model
        return spec.loss_type, hp
    if spec.family == "orpo":
        return "orpo", hp  # its NLL term is dropped in the formula run (nll_scale = 0) and added as Liger does
    hp["label_smoothing"] = spec.label_smoothing
    if spec.family == "simpo" or spec.average_log_prob:  # CPO on means is SimPO with no margin
        hp["simpo_gamma"] = spec.gamma if spec.family == "simpo" else 0.0
        return "simpo", hp
    hp["cpo_alpha"] = 0.0  # the NLL is the separate sft term, weighted by alpha (any sign, as Liger)
    return "cpo", hp


def _module_plan(spec: LigerSpec) -> tuple[list[str], list[float], dict[str, float | bool]] | None:
    """``PreferenceLoss(types, loss_weights=weights, **hp)`` computing the whole Liger loss, or None when no
    fastpref type is the family's formula (the formula run then)."""
    name, hp = _formula(spec)
    if spec.family == "dpo" and spec.average_log_prob:
        name = _DPO_ON_MEANS.get(name)
        if name is None:
            return None
    if spec.family == "orpo":
        # fastpref's orpo carries the NLL with weight 1, which is Liger's ORPO loss when it computes the NLL
        return (["orpo"], [1.0], hp) if spec.compute_nll_loss else None
    if spec.compute_nll_loss:
        return [name, "sft"], [1.0, float(spec.alpha)], hp
    return [name], [1.0], hp


# --------------------------------------------------------------------------------------------------------------
# Checks: Liger's wording where Liger raises, fastpref's argument / value / expectation after it


def _liger_dpo_error(spec: LigerSpec, supported: frozenset[str]) -> str | None:
    """The message Liger 0.8.5's DPO raises for these constructor arguments (``dpo_loss.py``), or None."""
    t, eps = spec.loss_type, spec.label_smoothing
    if not isinstance(t, str) or t not in supported:
        return f"Unsupported loss_type: {t}. Supported types are: {', '.join(sorted(supported))}"
    numeric = isinstance(eps, (int, float)) and not isinstance(eps, bool)
    if t == "exo_pair" and numeric and eps <= 0.0:
        return "label_smoothing must be > 0 for loss_type='exo_pair'. The EXO paper recommends 1e-3."
    if t == "robust" and numeric and not 0.0 <= eps < 0.5:
        return f"label_smoothing must lie in [0.0, 0.5) for loss_type='robust'. Got {eps}."
    return None


def validate(spec: LigerSpec, supported: frozenset[str] = frozenset()) -> tuple[PreferenceLoss | None, L.LossConfig]:
    """Check ``spec`` and build its runs: (the module run's loss or None, the formula run's config).

    Errors Liger raises start with Liger's own message (callers match on it), followed by fastpref's argument,
    value and expectation in parentheses; values Liger accepts but fastpref's formulas do not (``beta <= 0``, a
    smoothing outside the type's range, ``gamma < 0``, ...) raise fastpref's ``ValueError`` / ``TypeError``, which
    names the argument, the value and the range.
    """
    if spec.family == "dpo":
        liger = _liger_dpo_error(spec, supported)
        if liger is not None and liger.startswith("Unsupported"):
            raise ValueError(f"{liger} (loss_type: expected one of {sorted(supported)}, got {spec.loss_type!r})")
        if liger is not None:
            try:
                check_hparam("label_smoothing", spec.label_smoothing, spec.loss_type)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{liger} ({e})") from e
            raise ValueError(liger)  # fastpref's ranges lie inside Liger's: only if they are ever widened
    check_int("ignore_index", spec.ignore_index)
    if spec.compute_nll_loss and spec.family != "orpo":  # ORPO's NLL weight is fixed at 1; unused alphas unchecked
        check_number("alpha", spec.alpha, FP32, where=" (the weight of the NLL term with compute_nll_loss=True)")
    name, hp = _formula(spec)
    with caller_names(simpo_gamma="gamma"):  # SimPO's margin is Liger's gamma
        formula = L.LossConfig.create(name, **hp)
        plan = _module_plan(spec)
        module = None if plan is None else PreferenceLoss(plan[0], loss_weights=plan[1],
                                                          ignore_index=spec.ignore_index, **plan[2])
    return module, formula


def _shape(t: object) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def check_batch(_input: object, target: object, *, ref_input: object = None, use_ref: bool = False,
                nll_target: object = None) -> None:
    """The layout every Liger preference loss assumes, checked under Liger's argument names: ``_input``
    [B, T, H] with B even (first half chosen, second half rejected), ``target`` [B, T], ``ref_input`` [B, T, H']
    when the reference is used and ``nll_target`` [B, T] when given. Dtypes, devices and label values are
    fastpref's own checks (``caller_names`` renames them)."""
    for name, t, required in (("_input", _input, True), ("target", target, True),
                              ("ref_input", ref_input if use_ref else None, False), ("nll_target", nll_target, False)):
        if (required or t is not None) and not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if _input.dim() != 3:
        raise ValueError(f"_input: expected [B, T, H] (first half of the batch chosen, second half rejected), got "
                         f"shape {tuple(_input.shape)}")
    batch = _input.shape[0]
    if batch == 0 or batch % 2:
        raise ValueError(f"_input: the batch must be even (first half chosen, second half rejected): expected "
                         f"_input.shape[0] even and > 0, got {batch} (shape {tuple(_input.shape)})")
    expected = tuple(_input.shape[:2])
    if tuple(target.shape) != expected:
        raise ValueError(f"target: expected shape {expected} (_input.shape[:-1]; the batch must be even: first half "
                         f"chosen, second half rejected), got {_shape(target)}")
    if use_ref:
        if ref_input is None:
            raise ValueError("ref_input: use_ref_model=True needs the reference model's hidden states, got None "
                             "(or construct with use_ref_model=False)")
        if ref_input.dim() != 3 or tuple(ref_input.shape[:2]) != expected:
            raise ValueError(f"ref_input: expected a tensor [B, T, H_ref] with (B, T) = {expected} (those of "
                             f"_input), got shape {tuple(ref_input.shape)}")
    if nll_target is not None and tuple(nll_target.shape) != expected:
        raise ValueError(f"nll_target: expected shape {expected} (that of target), got {tuple(nll_target.shape)}")


@contextmanager
def caller_names(**names: str) -> Iterator[None]:
    """fastpref's boundary errors name its own arguments (``hidden``, ``weight``, ``labels``, ``bias``); re-raise
    them with the caller's names (``_input``, ``lin_weight``, ``target``, ...), the value and expectation kept."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    try:
        yield
    except (TypeError, ValueError) as e:
        message = str(e)
        renamed = pattern.sub(lambda m: names[m.group(1)], message)
        if renamed == message or type(e) not in (TypeError, ValueError):
            raise
        raise type(e)(renamed) from e


# --------------------------------------------------------------------------------------------------------------
# The run


def _raw_logit_means(x: Inputs, pairs: int) -> tuple[Tensor, Tensor]:
    """Means over the chosen and over the rejected rows [P, T, H] and the whole vocabulary of
    ``rows @ weight.T + bias``, without the logits: Σ_t Σ_v (h_t · w_v + b_v) = (Σ_t h_t) · (Σ_v w_v) +
    n_rows · Σ_v b_v, accumulated in fp64 (the sum cancels heavily; the weight is summed once), in fp32."""
    w_sum = x.weight.detach().sum(0, dtype=torch.float64)
    b_sum = None if x.bias is None else x.bias.detach().sum(dtype=torch.float64)
    per_logit = pairs * x._input.shape[1] * x.weight.shape[0]

    def mean(rows: Tensor) -> Tensor:
        flat = rows.detach().reshape(-1, rows.shape[-1])
        total = flat.sum(0, dtype=torch.float64) @ w_sum
        if b_sum is not None:
            total = total + flat.shape[0] * b_sum
        return (total / per_logit).float()

    return mean(x._input[:pairs]), mean(x._input[pairs:])


@dataclass(frozen=True)
class Inputs:
    """One call's tensors, with Liger's names for the error messages (``weight_name``: ``lin_weight`` for the
    modules, ``weight`` for the functions)."""

    _input: Tensor
    weight: Tensor
    target: Tensor
    bias: Tensor | None = None
    ref_input: Tensor | None = None
    ref_weight: Tensor | None = None
    ref_bias: Tensor | None = None
    nll_target: Tensor | None = None
    weight_name: str = "lin_weight"


def run(spec: LigerSpec, module: PreferenceLoss | None, formula: L.LossConfig,
        x: Inputs) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Liger's ``(loss, aux)`` for ``spec`` on the call's tensors (see the module docstring)."""
    check_batch(x._input, x.target, ref_input=x.ref_input, use_ref=spec.family == "dpo" and spec.use_ref_model,
                nll_target=x.nll_target)
    policy_names = {"hidden": "_input", "weight": x.weight_name, "labels": "target"}
    pairs = x._input.shape[0] // 2
    lengths = (x.target != spec.ignore_index).sum(-1).float()  # [B]; the one count both runs share
    chosen_tokens = lengths[:pairs].sum().clamp(min=1.0)
    module = module if x.nll_target is None else None  # a separate nll_target takes the formula run
    ref = _reference(spec, module, x)
    if module is not None:
        with caller_names(**policy_names):
            out = module(x._input, x.weight, x.target, ref, bias=x.bias)
        loss, sums = out.loss, torch.cat([out.chosen_logps, out.rejected_logps])
        nll = -sums[:pairs].sum() / chosen_tokens  # the module's loss holds it (sft / orpo) when it is computed
    else:
        with caller_names(**policy_names):
            sums_g = sequence_logps(x._input, x.weight, x.target, bias=x.bias, ignore_index=spec.ignore_index)
        loss = _formula_loss(spec, formula, sums_g, ref, lengths, pairs)
        nll = _nll(spec, x, sums_g, chosen_tokens, pairs) if spec.compute_nll_loss else None
        if nll is not None:
            loss = loss + spec.alpha * nll
        sums = sums_g.detach()
    if not spec.compute_nll_loss:
        nll = sums.new_zeros(())
    return loss, _aux(spec, x, sums, ref, lengths, nll.detach(), pairs)


def _reference(spec: LigerSpec, module: PreferenceLoss | None, x: Inputs) -> Tensor | None:
    """Reference sums [B] (DPO with ``use_ref_model``), under no-grad, scored as the run scores the policy. The
    reference head defaults to the policy's, detached (its bias too unless ``ref_bias`` is given)."""
    if spec.family != "dpo" or not spec.use_ref_model:
        return None
    ref_weight, ref_bias = x.ref_weight, x.ref_bias
    if ref_weight is None:
        ref_weight, ref_bias = x.weight, x.bias if ref_bias is None else ref_bias
    ref_bias = None if ref_bias is None else ref_bias.detach()
    names = {"hidden": "ref_input", "weight": "ref_weight" if x.ref_weight is not None else x.weight_name,
             "labels": "target", "bias": "ref_bias" if x.ref_bias is not None else "bias"}
    with caller_names(**names), torch.no_grad():
        if module is not None:
            return module.score(x.ref_input.detach(), ref_weight.detach(), x.target, bias=ref_bias)
        return sequence_logps(x.ref_input.detach(), ref_weight.detach(), x.target, bias=ref_bias,
                              ignore_index=spec.ignore_index)


def _means(spec: LigerSpec) -> bool:
    """Whether Liger's formula and outputs see per-token means rather than sums."""
    return spec.average_log_prob or spec.family in ("simpo", "orpo")


def _formula_loss(spec: LigerSpec, formula: L.LossConfig, sums: Tensor, ref: Tensor | None, lengths: Tensor,
                  pairs: int) -> Tensor:
    """The preference loss (mean over the pairs) from differentiable sums, by the fastpref formula of
    ``_formula``: DPO's on what Liger's formula sees (means with unit lengths, or sums), the others on sums."""
    if spec.family == "dpo" and spec.average_log_prob:
        denom = lengths.clamp(min=1.0)
        lp, ref, lengths = sums / denom, None if ref is None else ref / denom, torch.ones_like(lengths)
    else:
        lp = sums
    terms = L.pair_terms(formula, ref, lengths, like=lp.detach()).with_nll_scale(0.0)  # ORPO's NLL added apart
    return terms.loss(formula, lp[:pairs], lp[pairs:]).mean()


def _nll(spec: LigerSpec, x: Inputs, sums: Tensor, chosen_tokens: Tensor, pairs: int) -> Tensor:
    """Differentiable NLL of the chosen responses: of ``target`` from the sums, or of ORPO's ``nll_target`` by
    its own pass (mean over its scored chosen tokens, 0 when there are none)."""
    if x.nll_target is None:
        return -sums[:pairs].sum() / chosen_tokens
    with caller_names(hidden="_input", weight=x.weight_name, labels="nll_target"):
        return linear_cross_entropy(x._input[:pairs], x.weight, x.nll_target[:pairs], bias=x.bias,
                                    ignore_index=spec.ignore_index, reduction="mean")


def _aux(spec: LigerSpec, x: Inputs, sums: Tensor, ref: Tensor | None, lengths: Tensor, nll: Tensor,
         pairs: int) -> tuple[Tensor, ...]:
    """Liger's auxiliary outputs, detached fp32: logps [P] x 2, logits means (0-dim) x 2, nll (0-dim), rewards
    [P] x 2, and for ORPO the batch means of log σ(log-odds) and of the log-odds (0-dim)."""
    with torch.no_grad():
        denom = lengths.clamp(min=1.0)
        lp = sums / denom if _means(spec) else sums
        ref_lp = None if ref is None else (ref / denom if _means(spec) else ref)
        chosen_logits_mean, rejected_logits_mean = _raw_logit_means(x, pairs)
        rewards = L.rewards(spec.beta, lp, ref_lp)
        out = (lp[:pairs], lp[pairs:], chosen_logits_mean, rejected_logits_mean, nll.float(), rewards[:pairs],
               rewards[pairs:])
        if spec.family == "orpo":
            log_odds = L.orpo_log_odds(lp[:pairs], lp[pairs:])
            out = (*out, torch.nn.functional.logsigmoid(log_odds).mean(), log_odds.mean())
    return out


# --------------------------------------------------------------------------------------------------------------
# The modules' shared plumbing and documentation

_T = TypeVar("_T")

_COMMON_DIFFERENCES = (
    "a sequence with no scored token has log-prob 0 (sum and mean), so its loss, rewards and NLL stay finite, "
    "where Liger divides by zero and returns NaN",
    "an odd batch raises a ``ValueError`` naming ``_input`` (Liger pairs row i with row i + B // 2 and silently "
    "broadcasts the unpaired row); bad shapes, dtypes and labels raise errors naming Liger's arguments",
    "the auxiliary outputs are detached (Liger's carry no gradient either); the logits means are accumulated in "
    "fp64 from the hidden-state and weight sums, so no logits are formed for them",
    "``compiled`` and ``chunk_size`` are accepted and unused: fastpref sizes its tiles by a memory budget and "
    "needs no ``torch.compile``",
)


def _bullets(items: tuple[str, ...], width: int = 116) -> str:
    lines = []
    for k, item in enumerate(items):
        words, line = item.split(), "    -"
        for word in words:
            if len(line) + 1 + len(word) > width:
                lines.append(line)
                line = "     "
            line += " " + word
        lines.append(line + (";" if k < len(items) - 1 else "."))
    return "\n".join(lines)


def with_differences(*items: str) -> Callable[[_T], _T]:
    """Append "Differences from Liger 0.8.5" (the shared items, then the family's ``items``) to a docstring."""
    def deco(obj: _T) -> _T:
        text = _bullets((*_COMMON_DIFFERENCES, *items))
        obj.__doc__ = (f"{(obj.__doc__ or '').rstrip()}\n\n    Differences from Liger 0.8.5 (everything else is its "
                       f"definition):\n\n{text}\n")
        return obj
    return deco


class LigerModule(nn.Module):
    """Base of the drop-in modules: Liger's hyper-parameters live in plain attributes, read at every call as
    Liger reads them; the runs are rebuilt (and re-validated) only when those attributes changed."""

    def spec(self) -> LigerSpec:  # pragma: no cover - every drop-in overrides it
        raise NotImplementedError

    def runs(self) -> tuple[LigerSpec, PreferenceLoss | None, L.LossConfig]:
        spec = self.spec()
        cached = self.__dict__.get("_liger_runs")
        if cached is None or cached[0] != spec:
            cached = (spec, *validate(spec, getattr(self, "_SUPPORTED_LOSS_TYPES", frozenset())))
            self.__dict__["_liger_runs"] = cached  # not a registered submodule: state_dict stays Liger's (empty)
        return cached


__all__ = ["Inputs", "LigerModule", "LigerSpec", "caller_names", "check_batch", "run",
           "validate", "with_differences"]
