"""The benchmark workload: one training step on the LM head at the shapes of ``docs/benchmarks.md``, in two logit
regimes (near-uniform, as random weights give, and peaked, like a trained model on its own data).

The same tensors serve every trainer's task (``TASKS``): DPO pairs sequence p with p + P; KTO labels the first P
sequences desirable and the last P undesirable, with z₀ = ``KTO_KL`` given (a trainer's KL pass is forward-only
and the same for every head); SFT is the mean cross-entropy over the scored tokens; GRPO is TRL 1.16's default
(``dapo``, β = 0, one iteration: the old policy is the current one, detached) with ``advantages`` per sequence."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
BETA = 0.1
REGIMES = ("uniform", "peaked")
#: The trainers' heads ``fastpref bench --task`` times (``dpo``: the default, as before).
TASKS = ("dpo", "kto", "sft", "grpo")
KTO_KL = 0.05  # z₀ of the KTO task: a detached scalar, as a trainer passes it after its forward-only KL pass


@dataclass(frozen=True)
class Shape:
    """``pairs`` chosen/rejected pairs of ``seq_len`` tokens (batch 2·pairs), hidden size, vocabulary."""

    name: str
    pairs: int
    seq_len: int
    hidden: int
    vocab: int

    @property
    def batch(self) -> int:
        return 2 * self.pairs

    def scored_tokens(self, prompt_frac: float = 0.25) -> int:
        return self.batch * (self.seq_len - int(self.seq_len * prompt_frac))


# The benchmark shapes (docs/benchmarks.md), a CPU-sized one and a tiny one for dry runs and CI.
SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("llama3-8b-1k", 4, 1024, 4096, 128256),
    Shape("llama3-8b-4k", 4, 4096, 4096, 128256),
    Shape("qwen2.5-7b-2k", 4, 2048, 3584, 152064),
    Shape("small-1k", 8, 1024, 2048, 32000),
    Shape("cpu", 2, 256, 512, 32000),
    Shape("tiny", 2, 48, 64, 1000),
)}
BENCH_SHAPES = ("llama3-8b-1k", "llama3-8b-4k", "qwen2.5-7b-2k", "small-1k")


def parse_shape(spec: str) -> Shape:
    """A name of ``SHAPES`` or ``PAIRSxTxHxV`` (e.g. ``2x256x512x32000``)."""
    if spec in SHAPES:
        return SHAPES[spec]
    parts = spec.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"shape: expected one of {sorted(SHAPES)} or PAIRSxTxHxV, got {spec!r}")
    pairs, seq_len, hidden, vocab = (int(p) for p in parts)
    return Shape(spec, pairs, seq_len, hidden, vocab)


@dataclass
class Workload:
    """The tensors of one DPO step, shared by every implementation. ``hidden`` and ``weight`` require grad."""

    shape: Shape
    regime: str
    hidden: torch.Tensor  # [2P, T, H]
    ref_hidden: torch.Tensor  # [2P, T, H], no grad
    weight: torch.Tensor  # [V, H]
    labels: torch.Tensor  # [2P, T] int64, already shifted; the prompt is IGNORE_INDEX
    mask: torch.Tensor  # labels != IGNORE_INDEX
    n_scored: int

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    def zero_grad(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None

    @property
    def desirable(self) -> torch.Tensor:
        """KTO's labels [2P]: the first P sequences desirable (DPO's chosen), the last P undesirable."""
        return torch.arange(self.shape.batch, device=self.device) < self.shape.pairs

    @property
    def advantages(self) -> torch.Tensor:
        """GRPO's per-sequence advantages [2P], fp32: a fixed function of the batch index (both signs, |A| ≤ 1.5;
        a ``subset`` has its own, shared by its float64 truth and its rows)."""
        i = torch.arange(self.shape.batch, device=self.device, dtype=torch.float32)
        return 1.5 * torch.sin(2.3 * i + 0.7)

    def input_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.ref_hidden, self.weight, self.labels,
                                                         self.mask))

    def subset(self, pairs: int, seq_len: int) -> Workload:
        """The first ``pairs`` pairs truncated to ``seq_len`` tokens (same weight): for float64 checks at real H, V."""
        p = self.shape.pairs
        rows = torch.cat([torch.arange(pairs), p + torch.arange(pairs)]).to(self.device)
        hidden = self.hidden.detach().index_select(0, rows)[:, :seq_len].contiguous().requires_grad_()
        ref_hidden = self.ref_hidden.index_select(0, rows)[:, :seq_len].contiguous()
        labels = self.labels.index_select(0, rows)[:, :seq_len].contiguous()
        weight = self.weight.detach().clone().requires_grad_()
        mask = labels != IGNORE_INDEX
        shape = Shape(f"{self.shape.name}[{pairs}x{seq_len}]", pairs, labels.shape[1], self.shape.hidden,
                      self.shape.vocab)
        return Workload(shape, self.regime, hidden, ref_hidden, weight, labels, mask, int(mask.sum()))


def make_workload(shape: Shape, regime: str, *, dtype: torch.dtype = torch.bfloat16,
                  device: str | torch.device = "cpu", seed: int = 0, prompt_frac: float = 0.25) -> Workload:
    """The workload of ``docs/benchmarks.md``: ``W = randn(V, H) / sqrt(H)``, the first ``prompt_frac`` of every
    sequence ignored.

    - ``uniform``: ``hidden = 0.5 * randn`` (near-uniform softmax, what random weights give);
    - ``peaked``: ``hidden = 14 W[label] + 3 Σ W[8 random tokens] + 2 randn`` (mean token log-prob ≈ −1 at
      V = 128k, like a trained model on its own data).
    The reference hidden states are the policy's plus ``0.1 * randn``. Built in fp32, then cast to ``dtype``.
    """
    if regime not in REGIMES:
        raise ValueError(f"regime: expected one of {list(REGIMES)}, got {regime!r}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    B, T, H, V = shape.batch, shape.seq_len, shape.hidden, shape.vocab

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device)

    def randint(*size: int) -> torch.Tensor:
        return torch.randint(0, V, size, generator=gen, device=device)

    weight32 = randn(V, H) / math.sqrt(H)
    labels = randint(B, T)
    labels[:, : int(T * prompt_frac)] = IGNORE_INDEX
    if regime == "uniform":
        hidden32 = 0.5 * randn(B, T, H)
    else:
        # Prompt positions predict some token too: a random one (their logits are never scored).
        target = torch.where(labels == IGNORE_INDEX, randint(B, T), labels)
        hidden32 = 14.0 * weight32[target]
        for _ in range(8):  # one [B, T, H] gather at a time: 8 at once is 4 GiB at llama3-8b-4k
            hidden32 += 3.0 * weight32[randint(B, T)]
        hidden32 += 2.0 * randn(B, T, H)
    ref32 = hidden32 + 0.1 * randn(B, T, H)
    mask = labels != IGNORE_INDEX
    return Workload(
        shape=shape, regime=regime,
        hidden=hidden32.to(dtype).requires_grad_(),
        ref_hidden=ref32.to(dtype),
        weight=weight32.to(dtype).requires_grad_(),
        labels=labels, mask=mask, n_scored=int(mask.sum()),
    )


__all__ = ["BENCH_SHAPES", "BETA", "IGNORE_INDEX", "KTO_KL", "REGIMES", "SHAPES", "TASKS", "Shape", "Workload",
           "make_workload", "parse_shape"]
