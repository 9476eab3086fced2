"""The GEMM paths behind one protocol (``gemm_path.GemmPath``): the loops of ``head_pass`` and ``fast_pair_loss``
never ask which path runs, a third implementation plugs in without touching them, and the import graph of
``fastpref.ops`` has one direction."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import tokenize
from pathlib import Path

import pytest
import torch

import fastpref
from fastpref.ops import gemm_path, head_pass, vocab_shard
from tests.helpers import make_labels

OPS = Path(fastpref.ops.__file__).parent
fast_pair_loss = importlib.import_module("fastpref.ops.fast_pair_loss")  # the package exports a function of that name
# What a loop would name to test the path itself (its name, its key, its kernels, its errors).
PATH_WORDS = {"fused", "cublas", "gemm", "gemm_key", "fused_gemm", "row_kernels", "fused_errors", "with_fallback",
              "CublasPath", "FusedPath", "shard", "ShardedPath", "VocabShard", "world"}
LOOPS = [head_pass.forward_stats, head_pass._forward_stats, head_pass.backward, head_pass._backward,
         fast_pair_loss.FastPairLoss, fast_pair_loss.fast_forward, fast_pair_loss._fast_forward,
         fast_pair_loss._GroupedHead, fast_pair_loss._PendingGrads, fast_pair_loss.grouped_sequence_logps,
         fast_pair_loss._grouped_sequence_logps]


def _relative_imports(module: str) -> set[str]:
    tree = ast.parse((OPS / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.update([node.module] if node.module else [a.name for a in node.names])
    return out


def test_ops_imports_have_one_direction():
    """gemm_path is below the passes: it imports neither head_pass nor fast mode (it used to import head_pass for
    its timing, which imports gemm_path)."""
    assert not _relative_imports("gemm_path") & {"head_pass", "fast_pair_loss", "linear_logps"}
    assert not _relative_imports("head_pass") & {"fast_pair_loss", "linear_logps"}
    assert not _relative_imports("tile_ops") & {"gemm_path", "head_pass", "fast_pair_loss", "linear_logps"}
    # the vocabulary shard is a path built on gemm_path; gemm_path knows it only as a protocol (Shard)
    assert not _relative_imports("gemm_path") & {"vocab_shard"}
    assert not _relative_imports("vocab_shard") & {"head_pass", "fast_pair_loss", "linear_logps"}


@pytest.mark.parametrize("loop", LOOPS, ids=lambda f: f.__qualname__)
def test_the_loops_never_ask_which_path_runs(loop):
    """No name or string of a GEMM path in the loops' code (comments and docstrings aside): they call the
    protocol, and ``gemm_path.run`` picks the implementation and holds the fallback."""
    tokens = tokenize.generate_tokens(io.StringIO(inspect.getsource(loop)).readline)
    words = {t.string.strip("'\"") for t in tokens if t.type in (tokenize.NAME, tokenize.STRING)}
    assert not words & PATH_WORDS, sorted(words & PATH_WORDS)


class _Recording:
    """A third implementation: every protocol call is recorded, then delegated to the path the switch chose."""

    name = "recording"

    def __init__(self, inner: gemm_path.GemmPath, calls: list[str]) -> None:
        self.inner, self.calls = inner, calls
        self.bias_with_weight = inner.bias_with_weight

    def __getattr__(self, attr: str):
        value = getattr(self.inner, attr)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            self.calls.append(attr)
            return value(*args, **kwargs)

        return call


def _step(mode: str, budget: int | None):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 19, 24, generator=g, requires_grad=True)
    weight = (torch.randn(150, 24, generator=g) / 5).requires_grad_()
    bias = (torch.randn(150, generator=g) / 5).requires_grad_()
    labels = make_labels(4, 19, 150, generator=g)
    out = fastpref.DPOLoss(mode=mode, backend="torch", memory_budget=budget)(hidden, weight, labels, bias=bias,
                                                                            ref_hidden=hidden.detach() + 0.1)
    grads = torch.autograd.grad(out.loss * 0.5, [hidden, weight, bias])  # an upstream scale, as accumulation's
    return out.loss.detach(), grads


@pytest.mark.parametrize(("mode", "budget"), [("fast", None), ("fast", 150 * 4 * 40), ("lean", None)],
                         ids=["fast", "fast-groups", "lean"])
def test_a_third_path_plugs_in_without_touching_the_loops(monkeypatch, mode, budget):
    """A path the loops have never seen (here: recording, then delegating) runs every pass of a training step —
    the reference scoring, the forward, the backward — with bit-identical results, through the protocol only."""
    want_loss, want_grads = _step(mode, budget)
    calls: list[str] = []
    chosen = gemm_path.implementation
    monkeypatch.setattr(gemm_path, "implementation", lambda cfg, **kw: _Recording(chosen(cfg, **kw), calls))
    loss, grads = _step(mode, budget)
    assert torch.equal(loss, want_loss)
    for got, want in zip(grads, want_grads):
        assert torch.equal(got, want)
    assert {"fold", "combine", "grad_", "grad_input", "reduce_grad_input", "grad_weight"} <= set(calls), set(calls)


class _OneRankShard(vocab_shard.VocabShard):
    """A 'shard' holding the whole vocabulary that claims two ranks, so the switch wraps the path in
    ``ShardedPath``; its collectives are recorded and do nothing (the sums over one rank)."""

    def combine_stats_(self, stats) -> None:
        self.group.append("combine")

    def reduce_grad_(self, grad) -> None:
        assert grad.dtype == torch.float32  # a shard's partial dH is summed in fp32
        self.group.append("reduce")


@pytest.mark.parametrize(("mode", "budget"), [("fast", None), ("fast", 150 * 4 * 40), ("lean", None)],
                         ids=["fast", "fast-groups", "lean"])
def test_the_shard_plugs_in_through_the_switch(monkeypatch, mode, budget):
    """A vocabulary-sharded head is the protocol's third implementation (``vocab_shard.ShardedPath``), chosen by
    ``gemm_path.implementation``: every pass of a step runs through it — the statistics combined once per fold,
    dH reduced once per backward (fast: per pair group) — with the loops unchanged and, on a whole-vocabulary
    'shard' (fp32), bit-identical results."""
    want_loss, want_grads = _step(mode, budget)
    calls: list[str] = []
    shard = _OneRankShard(0, 150, 150, calls, 0, 2)
    chosen = gemm_path.implementation
    paths = []

    def sharded(cfg, **kw):
        paths.append(chosen(dataclasses.replace(cfg, shard=shard), **kw))
        return paths[-1]

    monkeypatch.setattr(gemm_path, "implementation", sharded)
    loss, grads = _step(mode, budget)
    assert torch.equal(loss, want_loss)
    for got, want in zip(grads, want_grads):
        assert torch.equal(got, want)
    assert all(isinstance(p, vocab_shard.ShardedPath) for p in paths)
    assert "combine" in calls and "reduce" in calls, calls
