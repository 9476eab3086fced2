"""Autograd ops over the Triton kernels, with the exact chunked PyTorch path beside them.

Knows nothing of the loss formulas: fast mode's op receives the per-pair loss as a callable.
"""

from .backend import compute_dtype, resolve_backend
from .fast_pair_loss import FastResult, PairProblem, fast_pair_loss, grouped_sequence_logps
from .fast_token_loss import TokenProblem, TokenResult, fast_token_loss, token_groups
from .head_pass import HeadPass, LinearLogProbs, TokenStats, finalize_stats
from .layout import TokenLayout, build_layout, interleave_pairs, segment_sum, sum_by_id
from .linear_logps import ScoredTokens, flat_rows, scatter_tokens, score_labels, score_tokens
from .plan import PairGroups, plan_pair_groups
from .tile_ops import EntropyGrad, LogitTransform, RowGrad, RowOps, RowStats

__all__ = [
    "EntropyGrad",
    "FastResult",
    "HeadPass",
    "LinearLogProbs",
    "LogitTransform",
    "PairGroups",
    "PairProblem",
    "RowGrad",
    "RowOps",
    "RowStats",
    "ScoredTokens",
    "TokenLayout",
    "TokenProblem",
    "TokenResult",
    "TokenStats",
    "build_layout",
    "compute_dtype",
    "fast_pair_loss",
    "fast_token_loss",
    "finalize_stats",
    "flat_rows",
    "grouped_sequence_logps",
    "interleave_pairs",
    "plan_pair_groups",
    "resolve_backend",
    "scatter_tokens",
    "score_labels",
    "score_tokens",
    "segment_sum",
    "sum_by_id",
    "token_groups",
]
