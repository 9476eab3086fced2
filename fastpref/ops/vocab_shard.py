"""A vocabulary-sharded LM head (tensor parallel): each rank scores its slice of the vocabulary.

A vocabulary shard is a slab of the head with an offset. Every rank of the group holds the same tokens (hidden
states and global target ids) and rows ``[start, start + size)`` of the head. Each rank folds its slab into
``RowStats`` with the targets shifted into its slab (``localize``: a target outside it is "in another chunk",
exactly as for a slab of the unsharded loops), then ONE collective combines the O(tokens) statistics
(``combine_stats_``: all-gather ``[world, k, rows]``, merged in rank order on every rank — deterministic, and
the same bits on every rank). The loss follows from the global statistics; the backward forms the local logits
gradient with the global log-sum-exp and all-reduces dH once (``reduce_grad_``); dW and the bias gradient stay
local. Fast mode keeps its single pass: a pair group's statistics are combined before its gradient is formed.

The collectives live in the GEMM protocol's hooks: a pass over a shard runs ``ShardedPath``, the path
``gemm_path.implementation`` chose (cublas or fused) with ``combine`` / ``reduce_grad_input`` filled in and fp32
gradient outputs; the chunk loops of ``head_pass`` and ``fast_pair_loss`` are the single-device ones.

Two ways in, one descriptor (``VocabShard``):

- a DTensor head sharded over the vocabulary (``Shard(0)`` on a 1-D mesh: torch ``parallelize_module`` with
  ``ColwiseParallel`` on ``lm_head``, transformers' ``tp_plan``): ``resolve_head`` takes its local shard
  (``to_local``, differentiable; the head is never gathered);
- the Megatron convention, a plain local shard with its offset and group: ``shard_head(local, vocab_start=...,
  vocab_size=..., group=...)`` wraps it as such a DTensor (no copy, no communication).

A plain tensor obtained with ``DTensor.to_local()`` and passed as if it were the whole head is refused
(``resolve_head``): it would be scored as a whole vocabulary, a silently wrong log-softmax.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .gemm_path import fp32_out_matmul
from .layout import TokenLayout
from .plan import plan_tiles
from .tile_ops import RowStats

# the order of the statistics in the combined [k, rows] block (the optional ones last, when present)
_STAT_FIELDS = ("row_max", "row_sumexp", "target_logit", "logit_sum", "entropy_acc", "max_before_target")


@dataclass(frozen=True, eq=False)
class VocabShard:
    """Rows ``[start, start + size)`` of a ``vocab_size``-row head, held by rank ``rank`` of ``group``
    (``world`` ranks; ``None``: the default group)."""

    start: int
    size: int
    vocab_size: int
    group: Any
    rank: int
    world: int

    def localize(self, layout: TokenLayout) -> TokenLayout:
        """``layout`` with its (global) targets shifted into this shard's slab: a target outside it is in
        another chunk for the fold and the gradient (target logit 0 here, no one-hot term)."""
        return replace(layout, targets=layout.targets - self.start)

    def combine_stats_(self, stats: RowStats) -> None:
        """Merge every rank's statistics of the same rows into the global ones, in place (one all-gather of
        ``[k, rows]`` fp32, merged in rank order: bit-identical on every rank and from run to run)."""
        import torch.distributed as dist

        fields = [f for f in _STAT_FIELDS if getattr(stats, f) is not None]
        local = torch.stack([getattr(stats, f) for f in fields])
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=self.group)
        got = dict(zip(fields, torch.stack(parts).unbind(1)))  # field -> [world, rows]
        row_max = got["row_max"].amax(0)  # exact, order-free
        # exp(m_r - M) rescales rank r's sums to the global max; -inf - -inf (a row of -inf logits) reads 0
        rescale = torch.exp(got["row_max"] - row_max).nan_to_num_(nan=0.0)
        sums = got["row_sumexp"]
        if "entropy_acc" in got:
            # rank r holds sum(e (z - m_r)) with e = exp(z - m_r); relative to the global max M that sum moves by
            # s_r (m_r - M) before the rescale (0 where the rank saw no finite logit), as the fold's own update
            total = torch.zeros_like(row_max)
            for r in range(self.world):  # fixed order
                moved = torch.where(sums[r] > 0, got["row_max"][r] - row_max, 0.0) * sums[r]
                total.add_((got["entropy_acc"][r] + moved) * rescale[r])
            stats.entropy_acc.copy_(total)
        total = torch.zeros_like(row_max)
        for r in range(self.world):  # fixed order
            total.add_(sums[r] * rescale[r])
        stats.row_sumexp.copy_(total)
        target = torch.zeros_like(row_max)
        logit_sum = torch.zeros_like(row_max)
        for r in range(self.world):
            target.add_(got["target_logit"][r])  # one rank owns each target; the others add exact zeros
            logit_sum.add_(got["logit_sum"][r])
        stats.target_logit.copy_(target)
        stats.logit_sum.copy_(logit_sum)  # finalize_stats divides it by the global vocabulary (global_vocab)
        if "max_before_target" in got:
            stats.max_before_target.copy_(got["max_before_target"].amax(0))
        stats.row_max.copy_(row_max)

    def path(self, inner: Any, tile_bytes: int) -> Any:
        """The GEMM path of a pass over this shard: ``inner`` (the single-device path the switch chose) with the
        shard's collectives (``ShardedPath``); a one-rank shard is the whole head."""
        return inner if self.world == 1 else ShardedPath(inner, self, tile_bytes)

    def reduce_grad_(self, grad: torch.Tensor) -> None:
        """Sum the ranks' partial input gradients (each ``G_local @ W_local``) in place: the one all-reduce of
        the backward (its result is the same on every rank, as the input is replicated)."""
        import torch.distributed as dist

        dist.all_reduce(grad, group=self.group)


# ------------------------------------------------------------------------------------------------ the GEMM path
@dataclass(frozen=True)
class ShardedPath:
    """A GEMM path (``gemm_path.GemmPath``) over a vocabulary shard: the single-device path ``inner`` (cublas or
    fused) does the GEMMs and the row work on the local rows; this adds the shard's two collectives in the
    protocol's hooks — ``combine`` (the all-gather merge of the statistics) and ``reduce_grad_input`` (the
    all-reduce of dH) — and answers fp32 for dH (``grad_input_dtype``): the ranks' partial dH are summed in fp32
    and rounded once, as one device rounds once; dW and the bias gradient, local, are the inner path's.
    ``gemm_path.implementation`` wraps the chosen path in this when the pass's head is a shard, so the loops run
    unchanged."""

    inner: Any  # GemmPath
    shard: VocabShard
    tile_bytes: int  # bounds the fp32 operand copies of ``grad_input`` where the matmul upcasts (see there)

    @property
    def name(self) -> str:  # the inner path's: the fallback in gemm_path.run reads it
        return self.inner.name

    @property
    def bias_with_weight(self) -> bool:
        return self.inner.bias_with_weight

    def fold_plan(self, tiles, n_rows, weight):
        return self.inner.fold_plan(tiles, n_rows, weight)

    def buffer(self, rows, cols, device, *, keep):
        return self.inner.buffer(rows, cols, device, keep=keep)

    def operand(self, t):
        return self.inner.operand(t)

    def fold(self, h, weight, bias, targets, stats, *, tile, slabs, fold_cols) -> None:
        self.inner.fold(h, weight, bias, targets, stats, tile=tile, slabs=slabs, fold_cols=fold_cols)

    def combine(self, stats: RowStats) -> None:
        self.shard.combine_stats_(stats)

    def grad_(self, tile, grad, *, vocab_start=0, d_bias=None, cols=None) -> bool:
        return self.inner.grad_(tile, grad, vocab_start=vocab_start, d_bias=d_bias, cols=cols)

    def grad_input(self, tile, grad, weight, out, *, vocab_start=0, accumulate) -> None:
        # the fp32 dH of a low-precision tile: where cuBLAS's matmul cannot write fp32 itself (the CPU, a GPU
        # without it) ``accumulate_mm`` upcasts both operands, so it goes slab by slab: fp32 copies of a tile slab
        # and a weight slab beside the product, ~3 fp32 values per element of the slab within the tile budget
        step = tile.shape[1]
        if self.inner.name == "cublas" and out.dtype != tile.dtype and not fp32_out_matmul(out.device):
            step = plan_tiles(max(tile.shape[0], weight.shape[1]), tile.shape[1], 3 * 4, self.tile_bytes).cols
        for c0 in range(0, tile.shape[1], max(step, 1)):
            c1 = min(c0 + step, tile.shape[1])
            self.inner.grad_input(tile[:, c0:c1], grad, weight[c0:c1], out, vocab_start=vocab_start + c0,
                                  accumulate=accumulate or c0 > 0)

    def reduce_grad_input(self, out: torch.Tensor) -> None:
        self.shard.reduce_grad_(out)

    def grad_weight(self, tile, grad, rows, out, d_bias, *, vocab_start=0, accumulate, scale=None,
                    formed=True) -> None:
        self.inner.grad_weight(tile, grad, rows, out, d_bias, vocab_start=vocab_start, accumulate=accumulate,
                               scale=scale, formed=formed)

    def out_dtype(self, want: torch.dtype) -> torch.dtype:
        return self.inner.out_dtype(want)

    def can_write(self, t: torch.Tensor) -> bool:
        return self.inner.can_write(t)

    def grad_input_dtype(self, want: torch.dtype) -> torch.dtype:
        return torch.float32  # the ranks' partial dH are summed in fp32, then rounded once

    def grad_buffer(self, like, dtype, *, device=None):
        return self.inner.grad_buffer(like, dtype, device=device)


def global_vocab(weight: torch.Tensor, shard: VocabShard | None) -> int:
    """The vocabulary the targets index: the whole head's, not the local shard's."""
    return weight.shape[0] if shard is None else shard.vocab_size


def localize(layout: TokenLayout, shard: VocabShard | None) -> TokenLayout:
    return layout if shard is None else shard.localize(layout)


# -------------------------------------------------------------------------------------------- DTensor boundary
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_dtensor(t: object) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _from_to_local(t: torch.Tensor) -> bool:
    """Whether ``t`` is ``DTensor.to_local()`` of a head parameter sharded over its rows (a local shard as a plain
    tensor): read from the autograd graph, so only with grad; ``full_tensor()`` (redistributed first) passes."""
    fn = getattr(t, "grad_fn", None)
    if fn is None or type(fn).__name__ != "_ToTorchTensorBackward" or not fn.next_functions:
        return False
    source = getattr(fn.next_functions[0][0], "variable", None)  # AccumulateGrad of the DTensor parameter
    return is_dtensor(source) and t.dim() > 0 and source.shape[0] != t.shape[0]


def _shard_of(name: str, t: Any) -> tuple[VocabShard | None, bool]:
    """``(shard or None, replicated)`` of a DTensor; ValueError for any other placement."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(t.placements)
    if all(isinstance(p, Replicate) for p in placements):
        return None, True
    if t.device_mesh.ndim != 1 or len(placements) != 1 or not (isinstance(placements[0], Shard)
                                                               and placements[0].dim == 0):
        raise ValueError(f"{name}: a DTensor head must be sharded over the vocabulary on a 1-D mesh "
                         f"(placements (Shard(0),): tensor parallel, ColwiseParallel on lm_head), got placements "
                         f"{placements} on a {t.device_mesh.ndim}-D mesh; gather it (full_tensor()) or reshard it")
    mesh = t.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    vocab = t.shape[0]
    local = t.to_local().shape[0]
    chunk = -(-vocab // world)  # torch.chunk's split, which Shard(0) follows
    start = min(rank * chunk, vocab)
    if local != min(chunk, vocab - start):
        raise ValueError(f"{name}: rank {rank} holds {local} vocabulary rows; Shard(0) of {vocab} rows over {world} "
                         f"ranks gives it {min(chunk, vocab - start)}")
    if local == 0:
        raise ValueError(f"{name}: rank {rank} holds no vocabulary row ({vocab} rows over {world} ranks in chunks of "
                         f"{chunk}): uneven shards are supported, empty ones are not; use fewer ranks or pad the "
                         "vocabulary")
    return VocabShard(start, local, vocab, mesh.get_group(), rank, world), False


def _local_hidden(name: str, hidden: Any) -> Any:
    if is_dtensor(hidden):
        if not all(type(p).__name__ == "Replicate" for p in hidden.placements):
            raise ValueError(f"{name}: a DTensor of hidden states must be replicated over the tensor-parallel group "
                             f"(every rank scores the same tokens), got placements {tuple(hidden.placements)}")
        return hidden.to_local()
    return hidden


def _local_head(weight: Any, bias: Any, w_name: str, b_name: str) -> tuple[Any, Any, VocabShard | None]:
    if not is_dtensor(weight):
        if _from_to_local(weight):
            raise ValueError(f"{w_name}: a plain tensor taken from a DTensor with to_local() ({tuple(weight.shape)}) "
                             "is a vocabulary shard; scored as the whole head it gives a wrong log-softmax. Pass the "
                             "DTensor itself, or fastpref.shard_head(local, vocab_start=, vocab_size=, group=)")
        if is_dtensor(bias):
            raise ValueError(f"{b_name}: a DTensor bias with a plain (whole) weight; pass both as DTensors sharded "
                             "the same way, or both whole")
        return weight, bias, None
    shard, replicated = _shard_of(w_name, weight)
    if replicated:
        if is_dtensor(bias):
            if not all(type(p).__name__ == "Replicate" for p in bias.placements):
                raise ValueError(f"{b_name}: sharded ({tuple(bias.placements)}) while {w_name} is replicated")
            bias = bias.to_local()
        return weight.to_local(), bias, None
    if bias is not None:
        if not is_dtensor(bias):
            raise ValueError(f"{b_name}: a plain tensor {tuple(bias.shape)} beside a vocabulary-sharded {w_name}; "
                             "the bias must be sharded the same way (a DTensor with placements (Shard(0),) on the "
                             "weight's mesh)")
        b_shard = _shard_of(b_name, bias)[0] if tuple(bias.placements) == tuple(weight.placements) else None
        if b_shard is None or bias.device_mesh != weight.device_mesh or (b_shard.start, b_shard.size) != (
                shard.start, shard.size):
            raise ValueError(f"{b_name}: sharded as {tuple(bias.placements)} on {bias.device_mesh}, unlike {w_name} "
                             f"({tuple(weight.placements)} on {weight.device_mesh}); a bias must be sharded exactly "
                             "like its weight")
        bias = bias.to_local()
    return weight.to_local(), bias, shard


def resolve_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, VocabShard | None]:
    """``(hidden, weight, bias, shard)`` with every DTensor replaced by its local part, and the vocabulary shard
    the head is (None: a whole head). Nothing is gathered. Raises ``ValueError`` for a bias sharded unlike its
    weight, a placement other than ``Shard(0)`` / replicated, an empty shard, and a plain tensor taken by
    ``to_local()`` from a DTensor (a shard passed as a whole head: pass the DTensor, or use ``shard_head``)."""
    weight, bias, shard = _local_head(weight, bias, "weight", "bias")
    return _local_hidden("hidden", hidden), weight, bias, shard


def whole_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, who: str,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``resolve_head`` for a caller that scores whole heads only (``who``: its name, for the message): a
    replicated DTensor becomes its local copy; a vocabulary-sharded head is refused with a ``ValueError``."""
    hidden, local, bias, shard = resolve_head(hidden, weight, bias)
    if shard is not None:
        raise ValueError(f"weight: {who} does not take a vocabulary-sharded head yet (a DTensor with placements "
                         f"(Shard(0),): rows [{shard.start}, {shard.start + shard.size}) of {shard.vocab_size} on "
                         f"rank {shard.rank} of {shard.world}); pass the whole head (full_tensor()), or use the "
                         "preference losses and token_logps / sequence_logps, which score the local shard")
    return hidden, local, bias


def resolve_reference(ref_hidden: torch.Tensor | None, ref_weight: torch.Tensor | None, ref_bias: torch.Tensor | None,
                      shard: VocabShard | None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """A reference model's hidden states and own head as local parts; its head must be sharded exactly as the
    policy's (``shard``): its statistics are combined by the same collective."""
    ref_hidden = _local_hidden("ref_hidden", ref_hidden)
    if ref_weight is None:
        if is_dtensor(ref_bias):
            raise ValueError("ref_bias: a DTensor reference bias needs its ref_weight (the reference head); the "
                             "policy's bias is used when ref_weight is not given")
        return ref_hidden, ref_weight, ref_bias
    ref_weight, ref_bias, ref_shard = _local_head(ref_weight, ref_bias, "ref_weight", "ref_bias")
    ours = None if shard is None else (shard.start, shard.size, shard.vocab_size)
    theirs = None if ref_shard is None else (ref_shard.start, ref_shard.size, ref_shard.vocab_size)
    if ours != theirs:
        raise ValueError(f"ref_weight: the reference head must be sharded like the policy's ((start, rows, V) = "
                         f"{ours}), got {theirs}")
    return ref_hidden, ref_weight, ref_bias


def shard_head(local: torch.Tensor, *, vocab_start: int, vocab_size: int, group: Any = None) -> torch.Tensor:
    """The Megatron convention as a DTensor: ``local`` holds rows ``[vocab_start, vocab_start + local.shape[0])``
    of a ``vocab_size``-row head (or bias), sharded over ``group`` (None: the default group) in rank order, as
    ``Shard(0)`` lays it out. No copy and no communication; differentiable (the gradient reaches ``local``).
    Pass the result as the weight (and bias) of any fastpref op, loss or trainer; targets stay global ids."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(local, torch.Tensor) or is_dtensor(local):
        raise TypeError(f"local: expected a plain torch.Tensor (this rank's rows), got {type(local).__name__}")
    if group is None:
        group = dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunk = -(-vocab_size // world)
    want = min(rank * chunk, vocab_size)
    if vocab_start != want or local.shape[0] != min(chunk, vocab_size - want):
        rows = min(chunk, vocab_size - want)
        raise ValueError(f"vocab_start: rank {rank} of {world} must hold rows [{want}, {want + rows}) of {vocab_size} "
                         "(contiguous shards in rank order, ceil(V / world) rows each, as Shard(0)), got "
                         f"[{vocab_start}, {vocab_start + local.shape[0]})")
    mesh = DeviceMesh.from_group(group, local.device.type)
    shape = torch.Size((vocab_size, *local.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


__all__ = ["ShardedPath", "VocabShard", "global_vocab", "is_dtensor", "localize", "resolve_head", "resolve_reference",
           "shard_head", "whole_head"]
