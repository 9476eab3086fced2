"""Error measures shared by the benchmark's float64 checks and the tests (``fastpref.testing`` re-exports them)."""

from __future__ import annotations

import torch


def rel_err(x: torch.Tensor | None, truth: torch.Tensor) -> float:
    """Norm-wise relative error of ``x`` against ``truth``, computed in float64 (NaN when ``x`` is None: the
    implementation produced nothing); the absolute error when ``truth`` is all zeros."""
    if x is None:
        return float("nan")
    x, truth = x.detach().double(), truth.detach().double()
    denom = truth.norm().item()
    diff = (x - truth).norm().item()
    return diff if denom == 0 else diff / denom


__all__ = ["rel_err"]
