"""Drop-in ``nn.Module`` losses. They only hold and validate hyper-parameters; ``fastpref.preference`` runs them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import preference
from .inputs import ReferenceInputs, RefinementInputs, call_inputs
from .outputs import PreferenceOutput
from .preference import PreferenceConfig
from .utils.compile import eager_op


class PreferenceLoss(nn.Module):
    """Fused preference loss from hidden states and the LM head (DPO, IPO, Sr-DPO, Sr-IPO and TRL's family).

    ``PreferenceLoss(loss_type="sigmoid", **options)``, every option by keyword (``PreferenceConfig.create``
    validates them into ``self.config``):

    Args:
        loss_type: one of ``fastpref.losses.LOSS_TYPES`` or a list of them, mixed with ``loss_weights`` (TRL).
        beta, label_smoothing, refinement_lambda, simpo_gamma, discopop_tau, cpo_alpha: the formulas'
            hyper-parameters (see ``fastpref.losses``; defaults 0.1, 0.0, 0.5, 0.5, 0.05, 1.0).
        ignore_index: label of unscored (prompt / padding) positions (default -100).
        reference_free: treat the reference log-probs as 0 (no reference model needed).
        mode: ``"auto"`` (default: forward-only without grad; fast when pair-separable and one pair group's logits
            fit ``memory_budget``; else lean), ``"fast"`` (gradients formed during the forward, no recompute) or
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
    """

    def __init__(self, loss_type: str | list[str] | tuple[str, ...] = "sigmoid", **options: Any) -> None:
        super().__init__()
        self.config = PreferenceConfig.create(loss_type, **options)

    @property
    def beta(self) -> float:
        return self.config.loss.beta

    @eager_op
    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        reference: ReferenceInputs | torch.Tensor | None = None,
        *,
        bias: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        num_seqs: int | None = None,
        refinement: RefinementInputs | torch.Tensor | None = None,
        **flat: torch.Tensor | None,
    ) -> PreferenceOutput:
        """The loss of a batch of pairs. ``hidden [B, T, H]`` and ``labels [B, T]`` (already shifted; rows ``i``
        and ``i + B/2`` are pair ``i``: chosen, rejected), or packed ``hidden [N, H]``, ``labels [N]``,
        ``seq_ids [N]``, ``num_seqs``.

        ``reference``: a ``ReferenceInputs`` (precomputed sums, or the reference model's hidden states and head,
        default ``weight.detach()``), or the sums ``ref_logps [B]`` as a tensor. Sr-DPO / Sr-IPO's
        ``refinement``: a ``RefinementInputs`` (precomputed Δ, or the prompt-augmented batch and its reference),
        or Δ ``[B/2]`` as a tensor. ``flat``: the same inputs as the flat keywords ``ref_logps``, ``ref_hidden``,
        ``ref_weight``, ``ref_bias``, ``refine_hidden``, ``refine_labels``, ``refine_ref_hidden``,
        ``refine_ref_logps`` (``fastpref.inputs.REFERENCE_KEYWORDS`` / ``REFINEMENT_KEYWORDS``)."""
        ref, refine = call_inputs(reference, refinement, **flat)
        return preference.forward(self.config, hidden, weight, labels, ref, refine, bias=bias, seq_ids=seq_ids,
                                  num_seqs=num_seqs)

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
        policy gives rewards of exactly 0, as in TRL. Pass them to ``forward`` as ``reference``."""
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
