"""Which tokens are scored, grouped by sequence: the one host sync of a call happens here.

Ignored tokens (``label == ignore_index`` or ``seq_id == -1``) are compacted away before any matmul, as TRL and
Cut-Cross-Entropy do, so they cost no FLOPs. The scored tokens are ordered by sequence (stable, so positions
keep their order), which makes every sequence a contiguous range and every pair group two ranges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    """Scored tokens of a flattened batch of ``num_tokens`` tokens, grouped by sequence.

    ``index[k]`` is the flat position of the k-th scored token and ``targets[k]`` its label; sequence ``s`` owns
    scored tokens ``offsets[s]:offsets[s + 1]`` (``host_offsets`` is the same on the host, for chunking without
    syncs).
    """

    index: torch.Tensor  # [n] int64
    targets: torch.Tensor  # [n] int64
    seq: torch.Tensor  # [n] int64, nondecreasing
    offsets: torch.Tensor  # [S + 1] int64, on the device
    host_offsets: tuple[int, ...]  # [S + 1]
    num_tokens: int

    @property
    def num_scored(self) -> int:
        return self.host_offsets[-1]

    @property
    def num_seqs(self) -> int:
        return len(self.host_offsets) - 1

    @property
    def lengths(self) -> torch.Tensor:
        """Scored tokens per sequence, int64 [S]."""
        return self.offsets[1:] - self.offsets[:-1]


def interleave_pairs(seq: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """Batch-layout sequence ids (i chosen, i + P rejected) -> pair order (2i chosen, 2i + 1 rejected).
    Negative ids (not scored) stay negative."""
    mapped = 2 * (seq % max(num_pairs, 1)) + (seq >= num_pairs).long()
    return torch.where(seq >= 0, mapped, seq)


def build_layout(
    labels: torch.Tensor,
    *,
    ignore_index: int,
    vocab_size: int,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int = 1,
    pair_order: bool = False,
    finite: Sequence[tuple[str, torch.Tensor]] = (),
) -> TokenLayout:
    """Compact and group the scored tokens of flat ``labels`` [N] (any integer dtype, read as int64), validating
    label and seq-id ranges in the same single host sync. Without ``seq_ids`` every scored token belongs to
    sequence 0. ``pair_order``: ``seq_ids`` are in the batch layout (i chosen, i + S/2 rejected) and the
    sequences are grouped in pair order (chosen 2i, rejected 2i + 1) — validated before the remapping.
    ``finite``: ``(name, tensor)`` pairs whose values must all be finite (``check_finite=True``), counted in the
    same transfer.

    The one host sync is a single device-to-host transfer of the range checks and the per-sequence offsets; the
    offsets are computed on the device (a sorted search, no ``bincount``, whose CUDA kernel syncs twice to size
    its output), so no host-to-device copy follows either.
    """
    labels = labels.long()  # int8 / uint8 labels would wrap ignore_index (-100 -> 156) in the comparisons below
    n_total = labels.numel()
    scored = labels != ignore_index
    if seq_ids is not None:
        seq_ids = seq_ids.to(torch.int64)
        bad_seq = (seq_ids < -1) | (seq_ids >= num_seqs)
        scored = scored & (seq_ids >= 0)
        ids = interleave_pairs(seq_ids, num_seqs // 2) if pair_order else seq_ids
        key = torch.where(scored, ids.clamp(0, max(num_seqs - 1, 0)), num_seqs)
    else:
        bad_seq = None
        key = torch.where(scored, 0, num_seqs)
    bad_label = scored & ((labels < 0) | (labels >= vocab_size))
    order = torch.argsort(key, stable=True)
    boundaries = torch.arange(num_seqs + 1, device=labels.device, dtype=key.dtype)
    offsets = torch.searchsorted(key.index_select(0, order), boundaries)  # [S + 1], offsets[S] = scored tokens
    checks = [bad_label.sum(), bad_seq.sum() if bad_seq is not None else bad_label.new_zeros(())]
    checks += [(~torch.isfinite(t)).sum().to(labels.device) for _, t in finite]
    host = torch.cat([torch.stack(checks), offsets]).tolist()  # the one host sync of the call
    n_bad_label, n_bad_seq = host[0], host[1]
    n_non_finite, host_offsets = host[2 : 2 + len(finite)], host[2 + len(finite):]
    for (name, t), count in zip(finite, n_non_finite):
        if count:
            raise ValueError(f"{name}: expected finite values (check_finite=True), got {count} NaN or inf among its "
                             f"{t.numel()} values")
    if n_bad_seq:
        first = int(bad_seq.nonzero()[0, 0])
        raise ValueError(f"seq_ids: values must be -1 (not scored) or in [0, num_seqs={num_seqs}); found "
                         f"{int(seq_ids[first])} at position {first} ({n_bad_seq} bad entries)")
    if n_bad_label:
        first = int(bad_label.nonzero()[0, 0])
        raise ValueError(f"labels: values must be in [0, vocab_size={vocab_size}) or equal to "
                         f"ignore_index={ignore_index}; found {int(labels[first])} at flat position {first} "
                         f"({n_bad_label} bad entries)")
    n = host_offsets[-1]
    order = order[:n]
    return TokenLayout(
        index=order,
        targets=labels.index_select(0, order),
        seq=key.index_select(0, order),
        offsets=offsets,
        host_offsets=tuple(host_offsets),
        num_tokens=n_total,
    )


def segment_sum(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-segment sums of ``values`` [n] over contiguous segments ``offsets`` [S + 1] -> [S] (fp32, or float64
    for float64 values).

    Differences of an fp64 prefix sum: deterministic (no atomics), O(n), and differentiable. The one segment
    sum of the package: ``sum_by_id`` sorts arbitrary ids into segments first.
    """
    prefix = torch.cat([values.new_zeros(1, dtype=torch.float64), torch.cumsum(values.double(), 0)])
    out_dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    return (prefix[offsets[1:]] - prefix[offsets[:-1]]).to(out_dtype)


def sum_by_id(values: torch.Tensor, ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """``out[s] = values[ids == s].sum()`` for ``s < num_segments`` (ids < 0 or >= num_segments are dropped),
    deterministically: a stable sort of the ids, then ``segment_sum`` (no ``index_add``, whose CUDA float
    atomics make reruns differ)."""
    values, ids = values.reshape(-1), ids.reshape(-1).long()
    key = torch.where((ids >= 0) & (ids < num_segments), ids, num_segments)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_segments + 1)[:num_segments]
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return segment_sum(values.index_select(0, order), offsets)
