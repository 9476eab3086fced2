"""Builders and error measures for the tests (``rel_err`` lives in ``fastpref.utils.numerics``, where the
benchmark's float64 checks read it too)."""

from __future__ import annotations

import torch

from ..utils.numerics import rel_err


def mismatch(x: torch.Tensor | None, truth: torch.Tensor) -> str:
    """Where ``x`` differs from ``truth``, for a failing test's message: the worst element's index and both values,
    and the NaN / inf counts of each side (in float64)."""
    if x is None:
        return "no tensor produced"
    if x.shape != truth.shape:
        return f"shape {tuple(x.shape)} != expected {tuple(truth.shape)}"
    x, truth = x.detach().double().cpu(), truth.detach().double().cpu()
    counts = ", ".join(f"{label} nan={int(t.isnan().sum())} inf={int(t.isinf().sum())}"
                       for label, t in (("got", x), ("expected", truth)))
    if x.numel() == 0:
        return f"empty; {counts}"
    # NaN ranks worst, then inf, then the largest finite difference.
    diff = (x - truth).abs().nan_to_num(nan=float("inf"), posinf=torch.finfo(torch.float64).max)
    worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return f"worst at {list(worst)}: got {x[worst].item():.6g}, expected {truth[worst].item():.6g}; {counts}"


def assert_within_torch_error(name: str, fast: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor,
                              *, atol: float = 1e-6, factor: float = 2.0) -> None:
    """Cut-Cross-Entropy's test idea: fastpref's error vs float64 stays within ``factor`` x the error of plain
    torch in the same dtype, plus a small absolute allowance (on the relative scale)."""
    e_fast, e_plain = rel_err(fast, truth), rel_err(plain, truth)
    assert e_fast <= factor * e_plain + atol, (
        f"{name}: fastpref error {e_fast:.3e} > {factor} x torch {e_plain:.3e} + {atol} ({mismatch(fast, truth)})")


def make_labels(batch: int, seq_len: int, vocab: int, *, prompt_frac: float = 0.25, ignore_index: int = -100,
                generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """Random labels with the first ``prompt_frac`` of every row ignored (the prompt) and random padding."""
    labels = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    n_prompt = int(seq_len * prompt_frac)
    labels[:, :n_prompt] = ignore_index
    for r in range(batch):
        pad = int(torch.randint(0, max(1, seq_len // 4), (1,), generator=generator))
        if pad:
            labels[r, seq_len - pad :] = ignore_index
    return labels.to(device)


__all__ = ["assert_within_torch_error", "make_labels", "mismatch", "rel_err"]
