"""TRL's SFT, GRPO and RLOO trainers with one flag, ``use_fastpref``, that puts fastpref's head in place of TRL's.

TRL 1.16 patches every trainer's LM head with ``trl.trainer.utils.add_fused_lm_head`` (log-probs, entropy,
top-1 hits from a chunked head). With ``use_fastpref=True`` the trainer patches its models (the policy, its base
model under PEFT, and the reference model) with ``fastpref.integrations.trl_head.add_fused_lm_head`` instead: the
same call and the same output fields, through fastpref's kernels. Everything else is TRL's: datasets, collators,
generation and rewards, losses and their normalisations, metrics. So SFT's per-token loss is fastpref's linear
cross-entropy (``-log_probs``, ``fastpref.linear_cross_entropy(reduction="none")``) under TRL's reduction (sum
over the scored tokens / ``num_items_in_batch``: packed sequences, completion-only and assistant-only masks as
TRL builds them), and its ``entropy`` / ``mean_token_accuracy`` come from the same kernel pass; in fast mode
(``fastpref_mode``, SFT only) that pass also forms the loss's gradient. With the flag off each class *is* TRL's:
no method is changed.

Supported TRL versions: those of the ``trl`` extra (``fastpref.integrations.trl.check_trl_version``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .trl import check_trl_version

check_trl_version()

import trl.trainer.grpo_trainer as _grpo_module  # noqa: E402
import trl.trainer.rloo_trainer as _rloo_module  # noqa: E402
import trl.trainer.sft_trainer as _sft_module  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from ..ops.gemm_path import check_gemm  # noqa: E402
from ..utils.validation import check_choice  # noqa: E402
from .trl_head import swap_fused_head  # noqa: E402

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
class FastPrefGRPOConfig(_HeadFlag, GRPOConfig):
    """``trl.GRPOConfig`` plus ``use_fastpref``, ``fastpref_backend`` and ``fastpref_gemm`` (as
    ``FastPrefSFTConfig``). Generation, rewards and the loss stay TRL's; the entropy bonus differentiates
    fastpref's entropy exactly."""


@dataclass
class FastPrefRLOOConfig(_HeadFlag, RLOOConfig):
    """``trl.RLOOConfig`` plus ``use_fastpref``, ``fastpref_backend`` and ``fastpref_gemm`` (as
    ``FastPrefSFTConfig``)."""


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
                             mode=self._head_mode(config)):
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


class FastPrefGRPOTrainer(_HeadSwap, GRPOTrainer):
    """``trl.GRPOTrainer`` (same constructor) whose fused head (policy and reference) is fastpref's when
    ``args.use_fastpref``."""

    _trl_module = _grpo_module
    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "fastpref"]


class FastPrefRLOOTrainer(_HeadSwap, RLOOTrainer):
    """``trl.RLOOTrainer`` (same constructor) whose fused head (policy and reference) is fastpref's when
    ``args.use_fastpref``."""

    _trl_module = _rloo_module
    _tag_names: ClassVar[list[str]] = ["trl", "rloo", "fastpref"]


__all__ = ["FastPrefGRPOConfig", "FastPrefGRPOTrainer", "FastPrefRLOOConfig", "FastPrefRLOOTrainer",
           "FastPrefSFTConfig", "FastPrefSFTTrainer"]
