"""The row-wise work on a logits tile, with a Triton implementation and a PyTorch one beside it.

Both implement the ``RowOps`` protocol (see ``fastpref.kernels.row_kernels`` for the math as torch code):
``fold`` folds a tile of raw logits into per-row online log-sum-exp statistics, and ``grad_`` overwrites a
tile with ``g * (onehot(target) - softmax) * dz/dy``, plus an entropy term ``-e * p * (log p + H) * dz/dy``
where per-row entropy coefficients ``e`` are given (``EntropyGrad``: GRPO's entropy bonus).
The chunk loops of ``fastpref.ops.head_pass`` and
``fastpref.ops.fast_pair_loss`` do not care which one runs.

The kernels' argument forms live here too, each converted once: ``LogitTransform`` (the user's triple;
``kwargs()`` is the launchers' ``logit_scale, softcap, inv_temperature``), ``RowStats`` (the six running
statistics, in the launchers' order: pass ``*stats``), ``LogSumExp`` (``*lse``) and ``RowGrad`` (what forms a row
block's logits gradient).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch


@dataclass(frozen=True)
class LogitTransform:
    """``z = softcap * tanh(y * logit_scale / softcap) / temperature`` (softcap optional), as TRL and HF apply it."""

    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature

    def kwargs(self) -> dict[str, float | None]:
        """The keywords every kernel launcher takes for the transform (the one conversion to the kernels' form)."""
        return {"logit_scale": self.logit_scale, "softcap": self.softcap, "inv_temperature": self.inv_temperature}


class LogSumExp(NamedTuple):
    """Per-row log-sum-exp in two fp32 parts, ``lse = row_max + log_sumexp`` with ``log_sumexp = log Σ exp(z -
    row_max)`` in [0, log V]. The softmax's exponent is formed as ``(z - row_max) - log_sumexp``, exact where the
    logits are large (one fp32 lse would be rounded at |z|·2⁻²⁴: 0.03 at |z| ≈ 1e6); ``log_probs`` likewise."""

    row_max: torch.Tensor
    log_sumexp: torch.Tensor

    def rows(self, start: int, end: int) -> LogSumExp:
        return LogSumExp(self.row_max[start:end], self.log_sumexp[start:end])

    def total(self) -> torch.Tensor:
        """``row_max + log_sumexp`` as one fp32 tensor (rounded; for statistics, not exponents)."""
        return self.row_max + self.log_sumexp

    def log_probs(self, z: torch.Tensor) -> torch.Tensor:
        """``z - lse`` of per-row logits ``z`` [rows]: ``(z - row_max) - log_sumexp``."""
        return (z - self.row_max) - self.log_sumexp


class RowStats(NamedTuple):
    """fp32 per-row running statistics of the online log-sum-exp (O(tokens), never O(tokens x vocab)), in the order
    the kernel launchers take them (``fold_logsumexp(tile, targets, *stats, ...)``). ``entropy_acc`` is
    ``Σ exp(z - row_max)·(z - row_max)``, relative to the running max like ``row_sumexp`` (so the entropy
    ``log row_sumexp - entropy_acc / row_sumexp`` never subtracts two numbers of the logits' size: ``lse - E[z]``
    would cancel at |z|·2⁻²⁴ on peaked rows)."""

    row_max: torch.Tensor
    row_sumexp: torch.Tensor
    target_logit: torch.Tensor
    logit_sum: torch.Tensor
    entropy_acc: torch.Tensor | None = None
    max_before_target: torch.Tensor | None = None

    @classmethod
    def empty(cls, n: int, device: torch.device, *, with_entropy: bool = False, with_top1: bool = False) -> RowStats:
        f32 = dict(device=device, dtype=torch.float32)
        return cls(
            row_max=torch.full((n,), -math.inf, **f32),
            row_sumexp=torch.zeros((n,), **f32),
            target_logit=torch.zeros((n,), **f32),
            logit_sum=torch.zeros((n,), **f32),
            entropy_acc=torch.zeros((n,), **f32) if with_entropy else None,
            max_before_target=torch.full((n,), -math.inf, **f32) if with_top1 else None,
        )

    def rows(self, start: int, end: int) -> RowStats:
        return RowStats(*(None if t is None else t[start:end] for t in self))

    def lse(self) -> LogSumExp:
        return LogSumExp(self.row_max, torch.log(self.row_sumexp))


class EntropyGrad(NamedTuple):
    """An entropy term of a row gradient: per-row coefficients ``coef`` [rows] of the rows' entropies ``H`` and the
    entropies themselves, ``value`` [rows] (fp32, as ``finalize_stats`` forms them): ``dH/dz_j = -p_j·(log p_j +
    H)``."""

    coef: torch.Tensor
    value: torch.Tensor

    def rows(self, start: int, end: int) -> EntropyGrad:
        return EntropyGrad(self.coef[start:end], self.value[start:end])


class RowGrad(NamedTuple):
    """What forms the gradient of ``sum_r grad_rows[r]·logp_r (+ entropy.coef[r]·H_r)`` w.r.t. a row block's raw
    logits, ``G = (grad_rows·(onehot(targets) - p) - e·p·(log p + H))·dz/dy`` (``targets``: global vocabulary ids;
    the entropy term only where ``entropy`` is given)."""

    targets: torch.Tensor
    lse: LogSumExp
    grad_rows: torch.Tensor
    entropy: EntropyGrad | None = None

    def scaled(self, scale: torch.Tensor) -> RowGrad:
        """The same gradient times an upstream scale (folded into the per-row factors)."""
        entropy = None if self.entropy is None else self.entropy._replace(coef=self.entropy.coef * scale)
        return self._replace(grad_rows=self.grad_rows * scale, entropy=entropy)


class RowOps(Protocol):
    """The two row operations on a tile of raw logits ``[rows, cols]`` (vocabulary columns from ``vocab_start``)."""

    name: str

    def fold(self, tile: torch.Tensor, targets: torch.Tensor, stats: RowStats, vocab_start: int,
             transform: LogitTransform) -> None:
        """Fold the tile into the running statistics ``stats`` (in place); the tile is left unchanged."""
        ...

    def grad_(self, tile: torch.Tensor, targets: torch.Tensor, lse: LogSumExp, grad_rows: torch.Tensor,
              vocab_start: int, transform: LogitTransform, entropy: EntropyGrad | None = None) -> torch.Tensor:
        """Overwrite the tile with the gradient of ``sum_r grad_rows[r] * logp_r (+ entropy.coef[r] * H_r)`` w.r.t.
        its raw logits."""
        ...


class TorchRowOps:
    """The row kernels as whole-tile torch ops (CPU, or any device without Triton).

    Few passes over the tile: ``logsumexp`` folds a chunk in one fused op on the logits shifted by the row max (in
    place on the fp32 working copy; one temporary when the tile itself is the fp32 logits, which the fold must leave
    intact), and the gradient is written in place when the tile is already fp32 (the CPU path's usual case).
    """

    name = "torch"

    @staticmethod
    def _transform(z: torch.Tensor, t: LogitTransform) -> torch.Tensor | None:
        """Apply the logit transform to fp32 ``z`` in place; returns tanh(...) when softcapping (for dz/dy)."""
        if t.logit_scale != 1.0:
            z.mul_(t.logit_scale)
        tanh = None
        if t.softcap is not None:
            tanh = z.div_(t.softcap).tanh_().clone()
            z.mul_(t.softcap)
        if t.temperature != 1.0:
            z.mul_(t.inv_temperature)
        return tanh

    @staticmethod
    def _is_identity(t: LogitTransform) -> bool:
        return t.logit_scale == 1.0 and t.softcap is None and t.temperature == 1.0

    def fold(self, tile: torch.Tensor, targets: torch.Tensor, stats: RowStats, vocab_start: int,
             transform: LogitTransform) -> None:
        n_rows, n_cols = tile.shape
        if n_rows == 0 or n_cols == 0:
            return
        # The tile must survive the fold (the fast path turns it into the gradient next): read it in place
        # when it already holds the fp32 logits, else work on a transformed fp32 copy.
        if tile.dtype == torch.float32 and self._is_identity(transform):
            z = tile
        else:
            z = tile.to(torch.float32, copy=True)
            self._transform(z, transform)
        stats.logit_sum.add_(z.sum(1))
        local = targets - vocab_start
        in_chunk = (local >= 0) & (local < n_cols)
        target_z = z.gather(1, local.clamp(0, n_cols - 1).unsqueeze(1)).squeeze(1)
        stats.target_logit.copy_(torch.where(in_chunk, target_z, stats.target_logit))
        if stats.max_before_target is not None:
            before = torch.arange(n_cols, device=z.device) < local.unsqueeze(1)
            chunk_before = z.masked_fill(~before, -math.inf).amax(1)
            torch.maximum(stats.max_before_target, chunk_before, out=stats.max_before_target)
        # row_max stays the largest logit (the top-1 test reads it), as in the Triton kernel
        new_max = torch.maximum(stats.row_max, z.amax(1))
        rescale = torch.exp(stats.row_max - new_max)
        # z - new_max before the exp (exact where |z| is large; logsumexp(z) - new_max would lose |z|·2⁻²⁴): in
        # place on the working copy, a temporary when z is the caller's tile
        shifted = z.sub_(new_max.unsqueeze(1)) if z is not tile else z - new_max.unsqueeze(1)
        chunk_sum = torch.logsumexp(shifted, 1).exp_()  # this chunk's sum of exp(z - new_max)
        if stats.entropy_acc is not None:
            # sum(e * (z - new_max)) with e = exp(z - new_max) = softmax_chunk(z) * chunk_sum; the running sum,
            # relative to the old max, moves by s_old * (m_old - new_max) (0 before the first chunk)
            chunk_ent = (torch.softmax(shifted, 1) * shifted).sum(1) * chunk_sum
            moved = torch.where(stats.row_sumexp > 0, stats.row_max - new_max, 0.0) * stats.row_sumexp
            stats.entropy_acc.add_(moved).mul_(rescale).add_(chunk_ent)
        stats.row_sumexp.mul_(rescale).add_(chunk_sum)
        stats.row_max.copy_(new_max)

    def grad_(self, tile: torch.Tensor, targets: torch.Tensor, lse: LogSumExp, grad_rows: torch.Tensor,
              vocab_start: int, transform: LogitTransform, entropy: EntropyGrad | None = None) -> torch.Tensor:
        n_rows, n_cols = tile.shape
        if n_rows == 0 or n_cols == 0:
            return tile
        z = tile if tile.dtype == torch.float32 else tile.to(torch.float32)
        tanh = self._transform(z, transform)
        scale = transform.inv_temperature * transform.logit_scale
        # -g * softmax * dz/dy (softmax = exp((z - row_max) - log_sumexp)), then + g * dz/dy at the target
        log_p = z.sub_(lse.row_max.unsqueeze(1)).sub_(lse.log_sumexp.unsqueeze(1))
        if entropy is None:
            g = log_p.exp_()
            g.mul_(grad_rows.unsqueeze(1) * -scale)
        else:
            # -p·(g + e·(log p + H)): the entropy term beside the log-prob's, one more fp32 temporary
            g = log_p.add(entropy.value.unsqueeze(1)).mul_(entropy.coef.unsqueeze(1)).add_(grad_rows.unsqueeze(1))
            g.mul_(log_p.exp_()).mul_(-scale)
        local = targets - vocab_start
        in_chunk = (local >= 0) & (local < n_cols)
        # + g·scale at the target (0 where the target is in another chunk): no boolean indexing, so no host sync
        at_target = (grad_rows * scale * in_chunk).unsqueeze(1)
        g.scatter_add_(1, local.clamp(0, n_cols - 1).unsqueeze(1), at_target)
        if tanh is not None:
            g.mul_(tanh.square_().neg_().add_(1.0))
        if g.device.type == "cpu":
            # Far-below-the-max probabilities times c underflow to subnormals, which the CPU's matmuls then
            # process 10x slower or worse; they are < 1.2e-38 of a gradient entry: flush them to 0.
            tiny = torch.finfo(torch.float32).tiny
            g.masked_fill_((g < tiny) & (g > -tiny), 0.0)
        if g is not tile:
            tile.copy_(g)
        return tile


class TritonRowOps:
    """The row kernels in Triton (CUDA, or the CPU under ``TRITON_INTERPRET=1``)."""

    name = "triton"

    def __init__(self) -> None:
        from ..kernels import row_kernels  # needs triton: imported only when this backend runs

        self._k = row_kernels

    def fold(self, tile: torch.Tensor, targets: torch.Tensor, stats: RowStats, vocab_start: int,
             transform: LogitTransform) -> None:
        self._k.fold_logsumexp(tile, targets, *stats, vocab_start=vocab_start, **transform.kwargs())

    def grad_(self, tile: torch.Tensor, targets: torch.Tensor, lse: LogSumExp, grad_rows: torch.Tensor,
              vocab_start: int, transform: LogitTransform, entropy: EntropyGrad | None = None) -> torch.Tensor:
        return self._k.logit_grad_(tile, targets, *lse, grad_rows, *(entropy or (None, None)),
                                   vocab_start=vocab_start, **transform.kwargs())


@functools.cache
def row_ops(backend: str) -> RowOps:
    """The row-op implementation of a resolved backend ("triton" or "torch"), built once."""
    return TritonRowOps() if backend == "triton" else TorchRowOps()
