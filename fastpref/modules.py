"""Drop-in ``nn.Module`` losses. They only hold and validate hyper-parameters; ``fastpref.preference`` runs them."""

from __future__ import annotations

import torch
from torch import nn

from . import losses as L
from . import preference
from .ops import LogitTransform
from .ops.backend import BACKENDS
from .ops.gemm_path import check_gemm
from .outputs import PreferenceOutput
from .preference import MODES, PreferenceConfig
from .utils.compile import eager_op
from .utils.validation import check_choice, check_int, check_transform


def _memory_budget(memory_budget: object) -> int | None:
    if memory_budget is None:
        return None
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget <= 0:
        raise ValueError(f"memory_budget: expected a positive int (bytes) or None, got {memory_budget!r}")
    return memory_budget


class PreferenceLoss(nn.Module):
    """Fused preference loss from hidden states and the LM head (DPO, IPO, Sr-DPO, Sr-IPO and TRL's family).

    Args:
        loss_type: one of ``fastpref.losses.LOSS_TYPES`` or a list of them, mixed with ``loss_weights`` (TRL).
        beta, label_smoothing, refinement_lambda, simpo_gamma, discopop_tau, cpo_alpha: the formulas'
            hyper-parameters (see ``fastpref.losses``).
        ignore_index: label of unscored (prompt / padding) positions.
        reference_free: treat the reference log-probs as 0 (no reference model needed).
        mode: ``"auto"`` (forward-only without grad; fast when pair-separable and one pair group's logits fit
            ``memory_budget``; else lean), ``"fast"`` (gradients formed during the forward, no recompute) or
            ``"lean"`` (recompute in backward, least memory).
        memory_budget: bytes of logits fast mode may hold; None = min(2 GiB, a quarter of free device memory).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.
        temperature, logit_scale, softcap: logit transform ``softcap * tanh(y * scale / softcap) / temperature``.
        token_metrics: also compute ``entropy`` and ``mean_token_accuracy`` in the kernels' pass.
        gemm: the GEMM path (``fastpref.ops.gemm_path``). None (default): ``$FASTPREF_GEMM``, else ``"cublas"``
            (cuBLAS tiles and Triton row kernels, the proven path). Opt-in, until a GPU run has measured them:
            ``"fused"`` (Triton GEMMs with the fold in their epilogue and the gradient in their prologue; a kernel
            that cannot run on the device falls back to cublas with a ``RuntimeWarning``, reported by
            ``gemm_path.fallbacks()``) and ``"auto"`` (per device and shape, the faster of the two, timed on the
            first call). Only the Triton backend has the fused kernels.
        check_finite: raise ``ValueError`` when the hidden states, the head or a given reference / refinement hold
            NaN or inf (counted in the call's one host sync; a pass over each tensor). Off by default: values
            are not inspected and non-finite inputs propagate to the loss, as in PyTorch.

    ``forward(hidden, weight, labels, ref_logps=None, *, bias=None, ref_hidden=None, ref_weight=None,
    ref_bias=None, seq_ids=None, num_seqs=None, refinement=None, refine_hidden=None, refine_labels=None,
    refine_ref_hidden=None, refine_ref_logps=None) -> PreferenceOutput``: ``hidden [B, T, H]`` and
    ``labels [B, T]`` (already shifted; rows ``i`` and ``i + B/2`` are pair ``i``: chosen, rejected), or packed
    ``hidden [N, H]``, ``labels [N]``, ``seq_ids [N]``, ``num_seqs``. ``ref_logps [B]`` (sums) or ``ref_hidden``
    (+ ``ref_weight``, default ``weight.detach()``) give the reference. Sr-DPO / Sr-IPO take ``refinement [B/2]``
    or the prompt-augmented batch (``refine_hidden``, ``refine_labels`` and the reference's
    ``refine_ref_hidden`` / ``refine_ref_logps``).
    """

    def __init__(
        self,
        loss_type: str | list[str] | tuple[str, ...] = "sigmoid",
        *,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        loss_weights: list[float] | tuple[float, ...] | None = None,
        refinement_lambda: float = 0.5,
        simpo_gamma: float = 0.5,
        discopop_tau: float = 0.05,
        cpo_alpha: float = 1.0,
        ignore_index: int = -100,
        reference_free: bool = False,
        mode: str = "auto",
        memory_budget: int | None = None,
        backend: str = "auto",
        temperature: float = 1.0,
        logit_scale: float = 1.0,
        softcap: float | None = None,
        token_metrics: bool = False,
        check_finite: bool = False,
        gemm: str | None = None,
    ) -> None:
        super().__init__()
        loss = L.LossConfig.create(
            loss_type, loss_weights, beta=beta, label_smoothing=label_smoothing,
            refinement_lambda=refinement_lambda, simpo_gamma=simpo_gamma, discopop_tau=discopop_tau,
            cpo_alpha=cpo_alpha, reference_free=reference_free,
        )
        check_choice("mode", mode, MODES)
        if mode == "fast" and not loss.pair_separable:
            raise ValueError(f"mode: 'fast' needs a pair-separable loss; {list(loss.loss_types)} couples the batch "
                             "(aot / aot_unpaired sort over it); use mode='lean' or 'auto'")
        check_choice("backend", backend, BACKENDS)
        check_gemm(gemm)
        check_transform(temperature, logit_scale, softcap)
        self.config = PreferenceConfig(
            loss=loss,
            ignore_index=check_int("ignore_index", ignore_index),
            mode=mode,
            memory_budget=_memory_budget(memory_budget),
            backend=backend,
            transform=LogitTransform(float(logit_scale), None if softcap is None else float(softcap),
                                     float(temperature)),
            token_metrics=bool(token_metrics),
            check_finite=bool(check_finite),
            gemm=gemm,
        )

    @property
    def beta(self) -> float:
        return self.config.loss.beta

    @eager_op
    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ref_logps: torch.Tensor | None = None,
        *,
        bias: torch.Tensor | None = None,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        num_seqs: int | None = None,
        refinement: torch.Tensor | None = None,
        refine_hidden: torch.Tensor | None = None,
        refine_labels: torch.Tensor | None = None,
        refine_ref_hidden: torch.Tensor | None = None,
        refine_ref_logps: torch.Tensor | None = None,
    ) -> PreferenceOutput:
        return preference.preference_loss(
            self.config, hidden, weight, labels, ref_logps, bias=bias, ref_hidden=ref_hidden,
            ref_weight=ref_weight, ref_bias=ref_bias, seq_ids=seq_ids, num_seqs=num_seqs, refinement=refinement,
            refine_hidden=refine_hidden, refine_labels=refine_labels, refine_ref_hidden=refine_ref_hidden,
            refine_ref_logps=refine_ref_logps,
        )

    @eager_op
    def score(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        num_seqs: int | None = None,
    ) -> torch.Tensor:
        """Reference (or evaluation) sequence log-prob sums ``[B]`` in the batch layout, forward-only (2·n·H·V
        FLOPs), scored exactly as this loss scores the policy in training: a reference model equal to the
        policy gives rewards of exactly 0, as in TRL. Pass them to ``forward`` as ``ref_logps``."""
        return preference.score(self.config, hidden, weight, labels, bias=bias, seq_ids=seq_ids, num_seqs=num_seqs)

    def extra_repr(self) -> str:
        c = self.config
        return (f"loss_type={list(c.loss.loss_types)}, beta={c.loss.beta}, mode={c.mode!r}, "
                f"backend={c.backend!r}, gemm={c.gemm!r}")


class DPOLoss(PreferenceLoss):
    """DPO (Rafailov et al. 2023): −log σ(β h); cDPO with ``label_smoothing`` ε. Same forward as PreferenceLoss."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, **common) -> None:
        super().__init__("sigmoid", beta=beta, label_smoothing=label_smoothing, **common)


class IPOLoss(PreferenceLoss):
    """IPO (Azar et al. 2023): (h̄ − 1/(2β))², h̄ length-normalised by the scored response tokens (as TRL)."""

    def __init__(self, beta: float = 0.1, **common) -> None:
        super().__init__("ipo", beta=beta, **common)


class SrDPOLoss(PreferenceLoss):
    """Sr-DPO (Yu et al. 2024, quality-aware self-refinement): −log σ(β h − λ·sg[Δ])."""

    def __init__(self, beta: float = 0.1, refinement_lambda: float = 0.5, **common) -> None:
        super().__init__("sr_dpo", beta=beta, refinement_lambda=refinement_lambda, **common)


class SrIPOLoss(PreferenceLoss):
    """Sr-IPO (Yu et al. 2024): (h̄ − λ·sg[Δ̄] − 1/(2β))²."""

    def __init__(self, beta: float = 0.1, refinement_lambda: float = 0.5, **common) -> None:
        super().__init__("sr_ipo", beta=beta, refinement_lambda=refinement_lambda, **common)


__all__ = ["DPOLoss", "IPOLoss", "PreferenceLoss", "PreferenceOutput", "SrDPOLoss", "SrIPOLoss"]
