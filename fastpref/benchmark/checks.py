"""Correctness before timing: the float64 truth of the step (``fastpref.reference`` on float64 copies of the
same tensors) and each implementation's norm-wise relative errors against it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..utils.numerics import rel_err
from .peers import StepOutput, dpo_loss
from .workload import Workload


@dataclass
class Truth:
    """float64 results of the step on the same tensors (reference implementation upcast to float64)."""

    loss: torch.Tensor
    logps: torch.Tensor  # [2P]: chosen then rejected
    d_hidden: torch.Tensor
    d_weight: torch.Tensor
    mean_token_logp: float


def float64_truth(w: Workload) -> Truth:
    from .. import reference

    p = w.shape.pairs
    h = w.hidden.detach().double().requires_grad_()
    W = w.weight.detach().double().requires_grad_()
    with torch.autocast(w.device.type, enabled=False):
        lp = reference.sequence_logps(h, W, w.labels)
        with torch.no_grad():
            ref = reference.sequence_logps(w.ref_hidden.double(), W.detach(), w.labels)
        loss = dpo_loss(lp[:p], lp[p:], ref[:p], ref[p:])
        loss.backward()
    mean = float(lp.detach().sum()) / max(w.n_scored, 1)
    return Truth(loss.detach(), lp.detach(), h.grad, W.grad, mean)


def step_errors(out: StepOutput, w: Workload, truth: Truth) -> dict[str, float]:
    return {
        "err_loss": rel_err(out.loss, truth.loss),
        "err_logps": math.nan if out.logps is None else rel_err(out.logps, truth.logps),
        "err_dhidden": rel_err(w.hidden.grad, truth.d_hidden),
        "err_dweight": rel_err(w.weight.grad, truth.d_weight),
    }


ERROR_KEYS = ("err_loss", "err_logps", "err_dhidden", "err_dweight")
# fastpref's error bound: 2x the materialised torch path's error in the same dtype plus this (relative) allowance.
ERR_FACTOR, ERR_ATOL = 2.0, 1e-6


__all__ = ["ERROR_KEYS", "ERR_ATOL", "ERR_FACTOR", "Truth", "float64_truth", "rel_err", "step_errors"]
