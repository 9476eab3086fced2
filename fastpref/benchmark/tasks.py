"""The other trainers' heads side by side: ``fastpref bench --task kto|sft|grpo`` (``dpo``: ``peers``).

Each task is a ``TaskSpec``: the loss a trainer computes from the policy's per-token log-probs (and the
reference's), the fields TRL 1.16's trainer asks its fused head for, and the FLOP floor. Every implementation of a
task produces the per-token log-probs its own way, then the task's loss — the same formula for the materialised
reference, TRL's chunked head and fastpref's lean head (``HeadImpl``) — or runs its own fused loss (fastpref's fast
KTO, Liger's chunked losses). GRPO's fast row tells fastpref's head the task's loss before the call, as
``FastPrefGRPOTrainer`` does (``FastprefPolicyImpl``). The float64 truth is the materialised reference in float64
(``task_truth``).

Adding an implementation of a task is one entry of ``TASK_IMPLS``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import losses
from ..losses.policy import Normalisation, PolicyLossConfig, PolicyStep, policy_loss
from .peers import Impl, StepOutput, TrlImpl, flops_unit, module_version
from .workload import BETA, IGNORE_INDEX, KTO_KL, Workload

GRPO_CONFIG = PolicyLossConfig()  # TRL 1.16's GRPOConfig defaults: loss_type "dapo", beta 0, epsilon 0.2


def _seq(tok: torch.Tensor) -> torch.Tensor:
    return tok.sum(-1)


def kto_task_loss(tok: torch.Tensor, ref: torch.Tensor | None, w: Workload) -> torch.Tensor:
    """TRL 1.16 ``KTOTrainer``'s ``kto`` loss (β = 0.1, unit weights), z₀ = ``KTO_KL``: mean over sequences."""
    assert ref is not None
    return losses.kto(_seq(tok), _seq(ref), w.desirable, KTO_KL, beta=BETA)[0].mean()


def sft_task_loss(tok: torch.Tensor, ref: torch.Tensor | None, w: Workload) -> torch.Tensor:
    """TRL 1.16 ``SFTTrainer``'s fused-head loss: −Σ log-probs / scored tokens."""
    return -tok.sum() / max(w.n_scored, 1)


def _grpo_norm(w: Workload) -> Normalisation:
    # one micro-batch, one process: dapo divides by the batch's completion tokens
    return Normalisation(num_items_in_batch=w.n_scored)


def grpo_task_loss(tok: torch.Tensor, ref: torch.Tensor | None, w: Workload) -> torch.Tensor:
    """TRL 1.16 ``GRPOTrainer``'s default loss (``fastpref.losses.policy``: ``dapo``, β = 0, old = current)."""
    return policy_loss(GRPO_CONFIG, tok, w.mask, w.advantages.to(tok.dtype), norm=_grpo_norm(w)).loss


def grpo_policy_step(w: Workload) -> PolicyStep:
    """``grpo_task_loss`` as the loss fastpref's head is told before the call (``trl_head.PredictedLoss``), what
    ``FastPrefGRPOTrainer`` builds from its batch: the same config, mask, advantages and normalisation."""
    return PolicyStep(GRPO_CONFIG, w.mask, w.advantages, _grpo_norm(w))


@dataclass(frozen=True)
class TaskSpec:
    """One trainer's head. ``loss(policy_tok, ref_tok, w)``: per-token log-probs [B, T] (0 where not scored) to
    the scalar loss; ``uses_ref``: the reference is scored (forward-only); ``per_token``: rows report and check
    per-token log-probs (else per-sequence sums); ``trl_fields``: what TRL 1.16's trainer asks its fused head for
    besides ``log_probs``; ``floor_units``: matmul FLOPs without recompute, in n·H·V."""

    name: str
    loss: Callable[[torch.Tensor, torch.Tensor | None, Workload], torch.Tensor]
    uses_ref: bool
    per_token: bool
    trl_fields: tuple[str, ...]
    floor_units: int

    def reported(self, tok: torch.Tensor) -> torch.Tensor:
        return tok.detach() if self.per_token else _seq(tok.detach())


TASK_SPECS: dict[str, TaskSpec] = {s.name: s for s in (
    TaskSpec("kto", kto_task_loss, True, False, ("entropy", "mean_logits"), 8),
    TaskSpec("sft", sft_task_loss, False, False, ("entropy", "is_top1"), 6),
    TaskSpec("grpo", grpo_task_loss, False, True, ("entropy",), 6),
)}


@dataclass
class TaskTruth:
    """float64 results of a task's step (the fields ``checks.step_errors`` reads)."""

    loss: torch.Tensor
    logps: torch.Tensor
    d_hidden: torch.Tensor
    d_weight: torch.Tensor
    mean_token_logp: float


def task_truth(spec: TaskSpec, w: Workload) -> TaskTruth:
    """The materialised reference on float64 copies of the workload."""
    from .. import reference

    h = w.hidden.detach().double().requires_grad_()
    W = w.weight.detach().double().requires_grad_()
    with torch.autocast(w.device.type, enabled=False):
        tok = reference.token_logps(h, W, w.labels)
        ref = None
        if spec.uses_ref:
            with torch.no_grad():
                ref = reference.token_logps(w.ref_hidden.double(), W.detach(), w.labels)
        loss = spec.loss(tok, ref, w)
        loss.backward()
    mean = float(tok.detach().sum()) / max(w.n_scored, 1)
    return TaskTruth(loss.detach(), spec.reported(tok), h.grad, W.grad, mean)


class HeadImpl(Impl):
    """A head that gives per-token log-probs, then the task's own loss on them (``TaskSpec.loss``)."""

    has_logps = False  # the forward-only row is DPO's (``--tasks logps``)
    policy_units = 8  # matmul FLOPs of the policy in n·H·V (recompute in the backward)

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec

    def token_logps(self, hidden: torch.Tensor, weight: torch.Tensor, w: Workload) -> torch.Tensor:
        raise NotImplementedError

    def step(self, w: Workload) -> StepOutput:
        tok = self.token_logps(w.hidden, w.weight, w)
        ref = None
        if self.spec.uses_ref:
            with torch.no_grad():
                ref = self.token_logps(w.ref_hidden, w.weight.detach(), w)
        return StepOutput(self.spec.loss(tok, ref, w), self.spec.reported(tok))

    def step_flops(self, w: Workload) -> int:
        return (self.policy_units + 2 * self.spec.uses_ref) * flops_unit(w)


class TaskReferenceImpl(HeadImpl):
    """``fastpref.reference``: the whole ``[B·T, V]`` logits (log-probs only: no metric fields)."""

    name = "reference"
    label = "materialised torch"

    def token_logps(self, hidden: torch.Tensor, weight: torch.Tensor, w: Workload) -> torch.Tensor:
        from .. import reference

        return reference.token_logps(hidden, weight, w.labels)

    def step_flops(self, w: Workload) -> int:
        return (6 + 2 * self.spec.uses_ref) * flops_unit(w, w.shape.batch * w.shape.seq_len)


class TaskTrlImpl(HeadImpl, TrlImpl):
    """TRL 1.16's ``ChunkedLogProbFunction`` on the valid rows with the fields its trainer requests, then TRL's
    loss of the task (``fastpref.losses``: checked against TRL's own in the tests of those losses)."""

    name = "trl"

    def __init__(self, spec: TaskSpec) -> None:
        HeadImpl.__init__(self, spec)
        TrlImpl.__init__(self)

    def token_logps(self, hidden: torch.Tensor, weight: torch.Tensor, w: Workload) -> torch.Tensor:
        fields = self.spec.trl_fields if torch.is_grad_enabled() else ()
        lp = self._fn.apply(hidden[w.mask], weight, None, w.labels[w.mask], 1.0, self.CHUNK, None, 1.0, fields)[0]
        return lp.new_zeros(w.mask.shape).masked_scatter(w.mask, lp)


class FastprefHeadImpl(HeadImpl):
    """fastpref's TRL fused-head contract (``integrations.trl_head.fused_head_fields``, the head of
    ``FastPref{SFT,GRPO,RLOO}Trainer``) in ``mode``, with the fields TRL's trainer requests."""

    def __init__(self, spec: TaskSpec, mode: str, backend: str = "auto") -> None:
        import fastpref

        super().__init__(spec)
        self.mode, self.backend = mode, backend
        self.name = f"fastpref-{mode}"
        self.label = f"fastpref {fastpref.__version__} (trl_head)"
        self.policy_units = 6 if mode == "fast" else 8

    def token_logps(self, hidden: torch.Tensor, weight: torch.Tensor, w: Workload) -> torch.Tensor:
        from ..integrations.trl_head import fused_head_fields

        fields = ("log_probs", *self.spec.trl_fields) if torch.is_grad_enabled() else ("log_probs",)
        return fused_head_fields(hidden, weight, None, w.labels, outputs=fields, backend=self.backend,
                                 mode=self.mode)[0]


class FastprefPolicyImpl(FastprefHeadImpl):
    """fastpref's TRL head in fast mode as ``FastPrefGRPOTrainer`` runs it: told the task's loss before the call
    (``PredictedLoss(grpo_policy_step(w))``), the head forms that loss's gradient in the forward (6·n·H·V) and the
    backward uses it when the upstream gradient is the predicted one times a scalar, else recomputes (lean).

    Each differentiable step's ``PredictedLoss.paths`` is kept (``paths``: their sum): a step whose backward did not
    take "fast" marks the row (``fallback``: its times and errors are another path's), and ``step_flops`` counts the
    path the latest step took. A prediction that missed pays the fast forward and the lean recompute: 10 units with
    one row group (the last group's dW GEMM waits for the backward, which then does not run it), up to 12 with many
    (counted as 10: the row groups are the op's plan)."""

    PATH_UNITS: ClassVar[dict[str, int]] = {"fast": 6, "lean": 8, "recomputed": 10}
    WHY: ClassVar[dict[str, str]] = {
        "lean": "lean (no fast pass: a group's logits over the memory budget, or labels off the loss's grid)",
        "recomputed": "recomputed (the upstream gradient was not the predicted loss's)",
        "none": "no path recorded (no backward through the head)"}

    def __init__(self, spec: TaskSpec, backend: str = "auto", memory_budget: int | None = None) -> None:
        super().__init__(spec, "fast", backend)
        self.memory_budget = memory_budget
        self.label += ", loss predicted"
        self._steps: list[Counter] = []

    def policy_step(self, w: Workload) -> PolicyStep:
        return grpo_policy_step(w)

    @property
    def paths(self) -> Counter:
        """How the gradient of every differentiable step so far was formed (``trl_head.PATHS``)."""
        return sum(self._steps, Counter())

    def token_logps(self, hidden: torch.Tensor, weight: torch.Tensor, w: Workload) -> torch.Tensor:
        from ..integrations.trl_head import PredictedLoss, fused_head_fields

        predicted = None
        if torch.is_grad_enabled():
            predicted = PredictedLoss(self.policy_step(w))
            self._steps.append(predicted.paths)  # filled by the head's backward
        fields = ("log_probs", *self.spec.trl_fields) if predicted is not None else ("log_probs",)
        return fused_head_fields(hidden, weight, None, w.labels, outputs=fields, backend=self.backend, mode="fast",
                                 memory_budget=self.memory_budget, predicted=predicted)[0]

    def fallback(self, w: Workload) -> str | None:
        other = {p for c in self._steps for p in c if p != "fast"}
        if not all(self._steps):
            other.add("none")
        return "fallback: " + ", ".join(self.WHY[p] for p in sorted(other)) if other else None

    def step_flops(self, w: Workload) -> int:
        # one path per step; before any step, the path the row is named for
        last = next(iter(self._steps[-1]), "lean") if self._steps else "fast"
        return self.PATH_UNITS[last] * flops_unit(w)


class FastprefLceImpl(HeadImpl):
    """``fastpref.linear_cross_entropy`` (the public SFT op; no metric fields): ``reduction="none"``, then the mean
    over the scored tokens (the same passes as ``"mean"``; the row reports its sequence sums for the check)."""

    name = "fastpref-lce"

    def __init__(self, spec: TaskSpec, backend: str = "auto") -> None:
        import fastpref

        super().__init__(spec)
        self.backend = backend
        self.label = f"fastpref {fastpref.__version__} (linear_cross_entropy)"

    def step(self, w: Workload) -> StepOutput:
        import fastpref

        nll = fastpref.linear_cross_entropy(w.hidden, w.weight, w.labels, reduction="none", backend=self.backend)
        return StepOutput(self.spec.loss(-nll, None, w), -nll.detach().sum(-1))


class FastprefKtoImpl(Impl):
    """``fastpref.KTOLoss`` in ``mode`` with TRL's metric fields (``token_metrics``: entropy), z₀ given."""

    has_logps = False

    def __init__(self, mode: str, backend: str = "auto") -> None:
        import fastpref

        self.mode = mode
        self.name = f"fastpref-{mode}"
        self.label = f"fastpref {fastpref.__version__} (KTOLoss)"
        self._loss = fastpref.KTOLoss(beta=BETA, mode=mode, backend=backend, token_metrics=True)

    def step(self, w: Workload) -> StepOutput:
        out = self._loss(w.hidden, w.weight, w.labels, w.desirable, ref_hidden=w.ref_hidden, kl=KTO_KL)
        return StepOutput(out.loss, out.logps)

    def step_flops(self, w: Workload) -> int:
        return (8 if self.mode == "fast" else 10) * flops_unit(w)


def _liger(cls_name: str) -> tuple[Any, str | None]:
    try:
        import liger_kernel.chunked_loss as chunked
        import liger_kernel.transformers as transformers
    except Exception as e:
        return None, f"liger-kernel not importable ({type(e).__name__}: {e})"[:160]
    return getattr(chunked, cls_name, None) or getattr(transformers, cls_name), None


class LigerTaskImpl(Impl):
    """Liger-Kernel 0.8.5's fused loss of the task, on every position, gradients formed inside its forward:
    ``LigerFusedLinearKTOLoss`` (z₀ given; one sequence's logits per chunk, ``torch.func``),
    ``LigerFusedLinearGRPOLoss`` (``dapo``, β = 0; 4096-wide vocabulary chunks, recomputed for the gradients in
    fp32) or ``LigerFusedLinearCrossEntropyLoss`` (SFT; Triton kernels: CUDA only)."""

    name = "liger"
    has_logps = False
    CLASSES: ClassVar[dict[str, str]] = {"kto": "LigerFusedLinearKTOLoss", "sft": "LigerFusedLinearCrossEntropyLoss",
               "grpo": "LigerFusedLinearGRPOLoss"}

    def __init__(self, spec: TaskSpec, compiled: bool = True) -> None:
        self.spec, self.compiled = spec, compiled and spec.name != "sft"
        self.label = (f"Liger {module_version('liger_kernel', 'liger-kernel')}"
                      + ("" if self.compiled or spec.name == "sft" else " (eager)"))

    def skip_reason(self, device: torch.device) -> str | None:
        if self.spec.name == "sft" and device.type != "cuda":
            return "Liger's fused linear cross-entropy is a Triton kernel: CUDA only"
        cls, why = _liger(self.CLASSES[self.spec.name])
        if why is not None:
            return why
        if self.spec.name == "kto":
            self._loss = cls(beta=BETA, compiled=self.compiled, use_ref_model=True, ignore_index=IGNORE_INDEX)
        elif self.spec.name == "grpo":
            self._loss = cls(beta=GRPO_CONFIG.beta, compiled=self.compiled, use_ref_model=False,
                             loss_type=GRPO_CONFIG.loss_type, epsilon_low=GRPO_CONFIG.epsilon_low,
                             epsilon_high=GRPO_CONFIG.eps_high)
        else:
            self._loss = cls(ignore_index=IGNORE_INDEX)
        return None

    def step(self, w: Workload) -> StepOutput:
        H = w.shape.hidden
        if self.spec.name == "kto":
            kl = torch.tensor(KTO_KL, device=w.device)
            loss = self._loss(w.hidden, w.weight, w.labels, preference_labels=w.desirable, ref_input=w.ref_hidden,
                              ref_weight=w.weight.detach(), kl=kl)[0]
        elif self.spec.name == "grpo":
            loss = self._loss(w.hidden, w.weight, w.labels.clamp(min=0), w.mask.long(), w.advantages,
                              num_items_in_batch=w.n_scored)[0]
        else:
            loss = self._loss(w.weight, w.hidden.reshape(-1, H), w.labels.reshape(-1))
        return StepOutput(loss, None)

    def step_flops(self, w: Workload) -> int:
        # every position; KTO and SFT form the gradient in the forward (6), GRPO's selective log-prob function
        # recomputes the logits in its backward (8, the dH and dW GEMMs in fp32)
        policy = 8 if self.spec.name == "grpo" else 6
        return (policy + 2 * self.spec.uses_ref) * flops_unit(w, w.shape.batch * w.shape.seq_len)


# Per task, its implementations by row name (a factory of (spec, backend, liger_compiled)).
TASK_IMPLS: dict[str, dict[str, Callable[[TaskSpec, str, bool], Impl]]] = {
    "kto": {
        "fastpref-fast": lambda s, b, c: FastprefKtoImpl("fast", b),
        "fastpref-lean": lambda s, b, c: FastprefKtoImpl("lean", b),
        "reference": lambda s, b, c: TaskReferenceImpl(s),
        "trl": lambda s, b, c: TaskTrlImpl(s),
        "liger": lambda s, b, c: LigerTaskImpl(s, c),
    },
    "sft": {
        "fastpref-fast": lambda s, b, c: FastprefHeadImpl(s, "fast", b),
        "fastpref-lean": lambda s, b, c: FastprefHeadImpl(s, "lean", b),
        "fastpref-lce": lambda s, b, c: FastprefLceImpl(s, b),
        "reference": lambda s, b, c: TaskReferenceImpl(s),
        "trl": lambda s, b, c: TaskTrlImpl(s),
        "liger": lambda s, b, c: LigerTaskImpl(s, c),
    },
    "grpo": {
        "fastpref-fast": lambda s, b, c: FastprefPolicyImpl(s, b),
        "fastpref-lean": lambda s, b, c: FastprefHeadImpl(s, "lean", b),
        "reference": lambda s, b, c: TaskReferenceImpl(s),
        "trl": lambda s, b, c: TaskTrlImpl(s),
        "liger": lambda s, b, c: LigerTaskImpl(s, c),
    },
}
TASK_IMPL_NAMES = tuple(dict.fromkeys(n for impls in TASK_IMPLS.values() for n in impls))


def task_implementations(task: str, names: tuple[str, ...] | None = None, *, backend: str = "auto",
                         liger_compiled: bool = True) -> list[Impl]:
    """The implementations of ``task`` (those named in ``names`` when given; a name the task lacks is left out)."""
    spec = TASK_SPECS[task]
    return [make(spec, backend, liger_compiled) for name, make in TASK_IMPLS[task].items()
            if names is None or name in names]


__all__ = ["GRPO_CONFIG", "TASK_IMPLS", "TASK_IMPL_NAMES", "TASK_SPECS", "FastprefHeadImpl", "FastprefKtoImpl",
           "FastprefLceImpl", "FastprefPolicyImpl", "HeadImpl", "LigerTaskImpl", "TaskReferenceImpl", "TaskSpec",
           "TaskTrlImpl", "TaskTruth", "grpo_policy_step", "grpo_task_loss", "kto_task_loss", "sft_task_loss",
           "task_implementations", "task_truth"]
