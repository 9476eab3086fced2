"""TRL's SFT, GRPO and RLOO trainers with one flag, ``use_fastpref``, that puts fastpref's head in place of TRL's.

TRL 1.16 patches every trainer's LM head with ``trl.trainer.utils.add_fused_lm_head`` (log-probs, entropy,
top-1 hits from a chunked head). With ``use_fastpref=True`` the trainer patches its models (the policy, its base
model under PEFT, and the reference model) with ``fastpref.integrations.trl_head.add_fused_lm_head`` instead: the
same call and the same output fields, through fastpref's kernels. Everything else is TRL's: datasets, collators,
generation and rewards, losses and their normalisations, metrics. So SFT's per-token loss is fastpref's linear
cross-entropy (``-log_probs``, ``fastpref.linear_cross_entropy(reduction="none")``) under TRL's reduction (sum
over the scored tokens / ``num_items_in_batch``: packed sequences, completion-only and assistant-only masks as
TRL builds them), and its ``entropy`` / ``mean_token_accuracy`` come from the same kernel pass; in fast mode
(``fastpref_mode``) that pass also forms the loss's gradient. GRPO's and RLOO's fast mode runs TRL's own
``_compute_loss`` while the head knows the loss it will feed (``grpo_step`` / ``losses.policy.RlooStep``, read
from the trainer and the batch as TRL reads them; ``trl_head.PredictedLoss``): the head forms that loss's gradient
in its forward and checks it against the gradient TRL's loss sends before using it. With the flag off each class
*is* TRL's: no method is changed.

Supported TRL versions: those of the ``trl`` extra (``fastpref.integrations.trl.check_trl_version``).
"""

from __future__ import annotations

import collections
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .trl import check_trl_version

check_trl_version()

import trl.trainer.grpo_trainer as _grpo_module  # noqa: E402
import trl.trainer.rloo_trainer as _rloo_module  # noqa: E402
import trl.trainer.sft_trainer as _sft_module  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from ..losses.policy import Normalisation, PolicyLossConfig, PolicyStep, RlooStep  # noqa: E402
from ..ops.gemm_path import check_gemm  # noqa: E402
from ..utils.validation import check_choice, check_memory_budget  # noqa: E402
from .trl_head import GridLoss, PredictedLoss, predicting, record_path, swap_fused_head  # noqa: E402

_BACKENDS = ("auto", "triton", "torch")


def _check_head_config(args: Any) -> None:
    """The ``fastpref_*`` fields, when the config is built (a typo fails at once, flag on or off). Nothing else
    is refused: the head implements every field of TRL's contract, and the rest of the trainer is TRL's."""
    check_choice("fastpref_backend", args.fastpref_backend, _BACKENDS)
    check_gemm(args.fastpref_gemm, "fastpref_gemm")


@dataclass
class _HeadFlag:
    """The flag and knobs every head-swapping config adds to TRL's."""

    use_fastpref: bool = field(default=False, metadata={"help": "Use fastpref's fused LM head instead of TRL's."})
    fastpref_backend: str = field(default="auto", metadata={"help": "'auto', 'triton' or 'torch'."})
    fastpref_gemm: str | None = field(default=None, metadata={
        "help": "GEMM path: None ($FASTPREF_GEMM, else 'cublas'), 'cublas', or opt-in 'fused' / 'auto'."})

    def __post_init__(self) -> None:
        _check_head_config(self)
        super().__post_init__()  # type: ignore[misc]


@dataclass
class FastPrefSFTConfig(_HeadFlag, SFTConfig):
    """``trl.SFTConfig`` plus ``use_fastpref`` (fastpref's head in place of TRL's), ``fastpref_backend`` and
    ``fastpref_gemm`` (``fastpref.token_logps``'s ``backend`` / ``gemm``) and ``fastpref_mode``: ``"fast"`` forms
    the loss's gradient in the forward (6·n·H·V FLOPs instead of 8), ``"lean"`` recomputes the logits in the
    backward, ``"auto"`` (default) is fast for ``loss_type="nll"`` (a mean of ``-log_probs``) and lean for
    ``"dft"``, whose per-token weights fast mode cannot use. A bad value raises ``ValueError`` naming the field
    when the config is built."""

    fastpref_mode: str = field(default="auto", metadata={"help": "'auto', 'fast' or 'lean'."})

    def __post_init__(self) -> None:
        check_choice("fastpref_mode", self.fastpref_mode, ("auto", "fast", "lean"))
        super().__post_init__()


@dataclass
class _OnlineFlag(_HeadFlag):
    """The online trainers' fast mode: ``fastpref_mode`` ``"auto"`` (default: fast where the loss allows it) /
    ``"fast"`` / ``"lean"``, and fast mode's ``fastpref_memory_budget`` (bytes of kept logits; None: the device's
    default, ``fastpref.ops.plan.default_memory_budget``)."""

    fastpref_mode: str = field(default="auto", metadata={"help": "'auto', 'fast' or 'lean'."})
    fastpref_memory_budget: int | None = field(default=None, metadata={
        "help": "Fast mode's bytes of kept logits (None: the device's default)."})

    def __post_init__(self) -> None:
        check_choice("fastpref_mode", self.fastpref_mode, ("auto", "fast", "lean"))
        check_memory_budget(self.fastpref_memory_budget, "fastpref_memory_budget")
        if self.fastpref_mode == "fast" and getattr(self, "top_entropy_quantile", 1.0) < 1.0:
            raise ValueError(
                f"top_entropy_quantile: fastpref_mode='fast' needs every token's loss term before any entropy is "
                f"known, but top_entropy_quantile={self.top_entropy_quantile} < 1 picks tokens by a batch-wide "
                "entropy quantile; expected 1.0, or fastpref_mode='auto' / 'lean' (lean mode)")
        super().__post_init__()


@dataclass
class FastPrefGRPOConfig(_OnlineFlag, GRPOConfig):
    """``trl.GRPOConfig`` plus ``use_fastpref``, ``fastpref_backend`` and ``fastpref_gemm`` (as
    ``FastPrefSFTConfig``) and ``fastpref_mode`` / ``fastpref_memory_budget``: in fast mode the gradient of TRL's
    loss (every ``loss_type``, the KL term, importance sampling, the off-policy mask, the entropy bonus) is formed
    in the head's forward, 6·n·H·V FLOPs for the policy instead of 8. ``"auto"`` runs lean where the loss needs
    every entropy first (``top_entropy_quantile < 1``). Generation and rewards stay TRL's."""


@dataclass
class FastPrefRLOOConfig(_OnlineFlag, RLOOConfig):
    """``trl.RLOOConfig`` plus the fields of ``FastPrefGRPOConfig`` (fast mode for RLOO's sequence-level loss)."""


class _HeadSwap:
    """``__init__`` of a TRL trainer run with fastpref's head swapped in when ``args.use_fastpref``."""

    _trl_module: ClassVar[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        parent = type(self).__mro__[type(self).__mro__.index(_HeadSwap) + 1]
        bound = inspect.signature(parent.__init__).bind(self, *args, **kwargs)
        config = bound.arguments.get("args")
        self.use_fastpref = bool(getattr(config, "use_fastpref", False))
        if not self.use_fastpref:
            super().__init__(*args, **kwargs)
            return
        with swap_fused_head(self._trl_module, backend=config.fastpref_backend, gemm=config.fastpref_gemm,
                             mode=self._head_mode(config),
                             memory_budget=getattr(config, "fastpref_memory_budget", None)):
            super().__init__(*args, **kwargs)

    def _head_mode(self, config: Any) -> str:
        """The head's mode: lean (recompute in the backward) unless the trainer's loss allows fast mode."""
        return "lean"


class FastPrefSFTTrainer(_HeadSwap, SFTTrainer):
    """``trl.SFTTrainer`` (same constructor) whose fused head is fastpref's when ``args.use_fastpref``."""

    _trl_module = _sft_module
    _tag_names: ClassVar[list[str]] = ["trl", "sft", "fastpref"]

    def _head_mode(self, config: Any) -> str:
        # "fast" with dft stays correct (the backward sees per-token weights and recomputes) but wastes the pass
        if config.fastpref_mode == "auto":
            return "fast" if config.loss_type in ("nll", "chunked_nll") else "lean"
        return config.fastpref_mode


class _OnlineFast(_HeadSwap):
    """Fast mode of an online trainer: ``_compute_loss`` is TRL's, run while the head knows the loss it will feed
    (``trl_head.predicting``): the head's forward forms that loss's gradient, and its backward checks it against
    the gradient TRL's loss actually sends (recomputing, counted and warned, where they differ).
    ``fastpref_head_paths`` counts how each training step's head gradient was formed (``trl_head.PATHS``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.fastpref_head_paths: collections.Counter = collections.Counter()
        super().__init__(*args, **kwargs)

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Any:
        fast = self.use_fastpref and self.args.fastpref_mode != "lean" and torch.is_grad_enabled()  # not in eval
        try:
            loss = self._predicted_loss(inputs) if fast else None
        except (KeyError, TypeError, ValueError) as e:  # a batch or a config this reading of TRL does not know
            record_path(self.fastpref_head_paths, "lean", f"the loss could not be predicted: {e!r}")
            loss = None
        if loss is None:
            return super()._compute_loss(model, inputs)  # type: ignore[misc]
        with predicting(PredictedLoss(loss, self.fastpref_head_paths)):
            return super()._compute_loss(model, inputs)  # type: ignore[misc]

    def _predicted_loss(self, inputs: dict[str, Any]) -> GridLoss | None:
        raise NotImplementedError


class FastPrefGRPOTrainer(_OnlineFast, GRPOTrainer):
    """``trl.GRPOTrainer`` (same constructor) whose fused head (policy and reference) is fastpref's when
    ``args.use_fastpref``, in fast mode unless ``args.fastpref_mode`` says lean or ``top_entropy_quantile < 1``."""

    _trl_module = _grpo_module
    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "fastpref"]

    def _predicted_loss(self, inputs: dict[str, Any]) -> PolicyStep | None:
        return grpo_step(self, inputs)


class FastPrefRLOOTrainer(_OnlineFast, RLOOTrainer):
    """``trl.RLOOTrainer`` (same constructor) whose fused head (policy and reference) is fastpref's when
    ``args.use_fastpref``, in fast mode unless ``args.fastpref_mode`` says lean."""

    _trl_module = _rloo_module
    _tag_names: ClassVar[list[str]] = ["trl", "rloo", "fastpref"]

    def _predicted_loss(self, inputs: dict[str, Any]) -> RlooStep | None:
        return RlooStep(inputs["completion_mask"], inputs["old_logps"], inputs["advantages"],
                        epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high)


def grpo_step(trainer: Any, inputs: dict[str, Any]) -> PolicyStep | None:
    """The loss ``GRPOTrainer._compute_loss`` (TRL 1.16) will compute from this micro-batch's log-probs, read from
    the trainer and ``inputs`` as that method reads them; None when it needs every entropy first
    (``top_entropy_quantile < 1``)."""
    if trainer.top_entropy_quantile < 1.0:
        return None
    args = trainer.args
    coef = 0.0
    if trainer._entropy_bonus_enabled:  # TRL applies the coefficient of the end of the previous optimizer step
        adaptive_off = trainer.use_adaptive_entropy and trainer._last_world_entropy > args.entropy_target
        coef = 0.0 if adaptive_off else float(trainer.entropy_coef)
    cfg = PolicyLossConfig(
        loss_type=trainer.loss_type, beta=trainer.beta, epsilon_low=trainer.epsilon_low,
        epsilon_high=trainer.epsilon_high, delta=args.delta,
        importance_sampling_level=trainer.importance_sampling_level,
        use_bias_correction_kl=args.use_bias_correction_kl,
        off_policy_mask_threshold=trainer.off_policy_mask_threshold,
        sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
        vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg, entropy_coef=coef, max_completion_length=trainer.max_completion_length)
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    training = trainer.model.training
    norm = Normalisation(grad_accum=trainer.current_gradient_accumulation_steps if training else 1,
                         num_items_in_batch=inputs.get("num_items_in_batch"),
                         num_processes=trainer.accelerator.num_processes,
                         steps_per_generation=args.steps_per_generation, training=training)
    vllm_is = trainer.use_vllm and trainer.vllm_importance_sampling_correction
    is_ratio = inputs.get("importance_sampling_ratio") if vllm_is or cfg.loss_type == "vespo" else None
    old = inputs.get("old_per_token_logps")
    sampling = inputs.get("sampling_per_token_logps", old) if cfg.off_policy_mask_threshold is not None else None
    step = PolicyStep(cfg, mask, inputs["advantages"], norm, old_logps=old,
                      ref_logps=inputs.get("ref_per_token_logps") if cfg.beta != 0.0 else None,
                      sampling_logps=sampling, is_ratio=is_ratio)
    step.weights  # noqa: B018  (the normalisation's inputs checked now, before the forward)
    return step


__all__ = ["FastPrefGRPOConfig", "FastPrefGRPOTrainer", "FastPrefRLOOConfig", "FastPrefRLOOTrainer",
           "FastPrefSFTConfig", "FastPrefSFTTrainer", "grpo_step"]
