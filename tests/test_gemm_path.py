"""Choosing between the cuBLAS + row-kernel path and the fused Triton GEMMs: the request, the timed auto choice
(cached per device, dtype, H and vocabulary bucket), and the fallback when a fused kernel cannot run."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

import fastpref
from fastpref.ops import gemm_path
from tests.helpers import HAS_TRITON, make_labels, rel_err

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the fused kernels run under the interpreter)")


@pytest.fixture(autouse=True)
def _fresh_choices():
    gemm_path._UNUSABLE.clear()
    gemm_path._CHOICE.clear()
    yield
    gemm_path._UNUSABLE.clear()
    gemm_path._CHOICE.clear()


def test_requests_resolve(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    args = (torch.bfloat16, 4096, 128256)
    monkeypatch.delenv("FASTPREF_GEMM", raising=False)
    assert gemm_path.resolve("fused", "torch", cpu, *args) == "cublas"  # the PyTorch backend has no fused kernels
    assert gemm_path.resolve("cublas", "triton", cuda, *args) == "cublas"
    assert gemm_path.resolve("fused", "triton", cpu, *args) == "fused"
    assert gemm_path.resolve("auto", "triton", cpu, *args) == "cublas"  # nothing to time off CUDA
    monkeypatch.setenv("FASTPREF_GEMM", "fused")
    assert gemm_path.resolve(None, "triton", cpu, *args) == "fused"  # the variable opts the default call in
    assert gemm_path.resolve("cublas", "triton", cpu, *args) == "cublas"  # the argument wins over the variable
    assert gemm_path.resolve("auto", "triton", cpu, *args) == "cublas"
    monkeypatch.setenv("FASTPREF_GEMM", "fastest")
    with pytest.raises(ValueError, match=r"FASTPREF_GEMM: expected one of \['auto', 'fused', 'cublas'\]"):
        gemm_path.resolve(None, "triton", cpu, *args)
    with pytest.raises(ValueError, match=r"gemm: expected one of .*got 'fastest'"):
        fastpref.DPOLoss(gemm="fastest")


def _gemm_defaults():
    from fastpref.integrations.fused_head import FusedHeadSettings, add_fused_lm_head
    from fastpref.integrations.trainer_common import build_preference_loss
    from fastpref.preference import PreferenceConfig

    callables = [fastpref.token_logps, fastpref.sequence_logps, fastpref.linear_cross_entropy,
                 fastpref.PreferenceLoss.__init__, fastpref.DPOLoss.__init__, add_fused_lm_head,
                 build_preference_loss]
    defaults = {getattr(f, "__qualname__", str(f)): inspect.signature(f).parameters["gemm"].default
                for f in callables if "gemm" in inspect.signature(f).parameters}
    defaults["DPOLoss (its config)"] = fastpref.DPOLoss().config.gemm
    defaults["PreferenceConfig"] = PreferenceConfig.__dataclass_fields__["gemm"].default
    defaults["FusedHeadSettings"] = FusedHeadSettings().gemm
    for module, cls in (("fastpref.integrations.hf", "FastPrefTrainingArguments"),
                        ("fastpref.integrations.trl", "FastPrefDPOConfig")):
        try:
            args_cls = getattr(importlib.import_module(module), cls)
        except ImportError:  # transformers / trl not installed
            continue
        defaults[cls] = args_cls.__dataclass_fields__["fastpref_gemm"].default
    return defaults


def test_the_default_is_cublas_and_never_times_the_fused_kernels(monkeypatch):
    """Until a GPU run has measured the fused kernels, a call that does not ask for them (every public default)
    runs cublas: on CUDA nothing is timed and no fused kernel is compiled or launched."""
    from fastpref.kernels import fused_gemm

    monkeypatch.delenv("FASTPREF_GEMM", raising=False)
    defaults = _gemm_defaults()
    assert len(defaults) >= 9 and set(defaults.values()) == {None}, defaults

    def refuse(*args, **kwargs):
        raise AssertionError("the default path timed or ran a fused kernel")

    monkeypatch.setattr(gemm_path, "time_paths", refuse)
    for name in ("linear_fold", "linear_grad_input", "linear_grad_weight"):
        monkeypatch.setattr(fused_gemm, name, refuse)
    cuda = torch.device("cuda", 0)
    assert gemm_path.resolve(None, "triton", cuda, torch.bfloat16, 4096, 128256) == "cublas"
    assert gemm_path.requested(None) == gemm_path.DEFAULT_GEMM == "cublas"
    hidden, weight, labels = _batch()
    out = fastpref.DPOLoss(backend="triton")(hidden, weight, labels, ref_hidden=hidden.detach() + 0.1)
    out.loss.backward()
    fastpref.token_logps(hidden, weight, labels, backend="triton").sum().backward()


def test_auto_times_once_per_device_dtype_and_shape_bucket(monkeypatch):
    timed = []

    def fake_time(device, dtype, hidden, vocab):
        timed.append((dtype, hidden, vocab))
        return "fused" if hidden == 4096 else "cublas"

    monkeypatch.setattr(gemm_path, "time_paths", fake_time)
    cuda = torch.device("cuda", 0)
    assert gemm_path.resolve("auto", "triton", cuda, torch.bfloat16, 4096, 128256) == "fused"
    assert gemm_path.resolve("auto", "triton", cuda, torch.bfloat16, 4096, 131072) == "fused"  # same bucket
    assert gemm_path.resolve("auto", "triton", cuda, torch.bfloat16, 2048, 32000) == "cublas"
    assert len(timed) == 2
    with pytest.warns(RuntimeWarning, match="out of shared"):
        gemm_path.mark_unusable(gemm_path.key_of(cuda, torch.bfloat16, 4096, 128256), RuntimeError("out of shared"))
    assert gemm_path.resolve("fused", "triton", cuda, torch.bfloat16, 4096, 128256) == "cublas"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_timing_both_paths_runs_each_and_picks_one(dtype):
    """The auto choice's timing (CUDA events on a GPU, the host clock here): both paths run at the probe shapes
    and one of them is picked; nothing is marked unusable."""
    from fastpref.kernels.launch import record_launches

    cpu = torch.device("cpu")
    with record_launches() as launches:
        gemm_path.time_paths(cpu, dtype, 16, 40, rows=8, repeats=1)
    names = {r.name for r in launches}
    assert {"_linear_fold_kernel", "_linear_grad_input_kernel", "_linear_grad_weight_kernel"} <= names, names
    assert {"_fold_logsumexp_kernel", "_logit_grad_kernel"} <= names, names
    assert gemm_path.time_paths(cpu, dtype, 16, 40, rows=8, repeats=1) in ("fused", "cublas")
    assert not gemm_path._UNUSABLE
    assert gemm_path.elapsed_ms(lambda: None, cpu) >= 0


def _batch(pairs=2, seq_len=19, hidden_size=24, vocab=150):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2 * pairs, seq_len, hidden_size, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, generator=g) / 5).requires_grad_()
    labels = make_labels(2 * pairs, seq_len, vocab, generator=g)
    return hidden, weight, labels


def _out_of_resources(*args, **kwargs):
    from triton.runtime.errors import OutOfResources

    raise OutOfResources(300000, 232448, "shared memory")


@pytest.mark.parametrize("where", ["linear_fold", "linear_grad_input", "linear_grad_weight"])
@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_a_fused_kernel_that_cannot_run_falls_back_with_a_warning(monkeypatch, where, mode):
    """A fused kernel out of resources (or failing to compile) on the device: a warning, the cublas path for
    that pass and every later one at those shapes — and the same gradients."""
    from fastpref.kernels import fused_gemm

    hidden, weight, labels = _batch()
    ref_hidden = hidden.detach() + 0.1
    want = fastpref.DPOLoss(mode=mode, backend="triton", gemm="cublas")(hidden, weight, labels, ref_hidden=ref_hidden)
    want_grads = torch.autograd.grad(want.loss, [hidden, weight])
    monkeypatch.setattr(fused_gemm, where, _out_of_resources)
    loss_fn = fastpref.DPOLoss(mode=mode, backend="triton", gemm="fused")
    with pytest.warns(RuntimeWarning, match=r"fused GEMM kernels cannot run .*OutOfResources"):
        out = loss_fn(hidden, weight, labels, ref_hidden=ref_hidden)
        grads = torch.autograd.grad(out.loss, [hidden, weight])
    assert rel_err(out.loss, want.loss) <= 1e-6
    for g, w in zip(grads, want_grads):
        assert rel_err(g, w) <= 1e-5
    # the path that ran is inspectable, per key, with the reason; later passes at these shapes go to cublas
    key = gemm_path.key_of(hidden.device, torch.float32, hidden.shape[-1], weight.shape[0])
    assert list(gemm_path.fallbacks()) == [key] and gemm_path.fallbacks()[key].startswith("OutOfResources: ")
    assert gemm_path.resolve("fused", "triton", hidden.device, torch.float32, hidden.shape[-1],
                             weight.shape[0]) == "cublas"


def test_fused_path_runs_the_fused_kernels_only():
    """gemm="fused": the forward folds in linear_fold's epilogue and the gradients come from the prologue GEMMs;
    no row kernel runs (recorded launches)."""
    from fastpref.kernels.launch import record_launches

    hidden, weight, labels = _batch()
    with record_launches() as launches:
        fastpref.DPOLoss(mode="fast", backend="triton", gemm="fused")(hidden, weight, labels,
                                                                      ref_hidden=hidden.detach())
    names = {r.name for r in launches}
    assert names == {"_linear_fold_kernel", "_fold_combine_kernel", "_linear_grad_input_kernel"}, names


@pytest.mark.parametrize(("mode", "aten_units", "triton_units"), [("fast", 0, 8), ("lean", 2, 8)])
def test_fused_path_flops_by_kernel(mode, aten_units, triton_units):
    """The fused path's matmuls: fast mode's are all Triton GEMMs (8·n·H·V with a live reference's forward);
    lean mode's backward recomputes its logits with one cuBLAS GEMM (2·n·H·V: no epilogue is needed there, the
    row statistics are known) and forms the gradient in the Triton GEMMs' prologue."""
    from fastpref.kernels.launch import count_flops
    from torch.utils.flop_counter import FlopCounterMode

    hidden, weight, labels = _batch()
    unit = int((labels != -100).sum()) * hidden.shape[-1] * weight.shape[0]
    with FlopCounterMode(display=False) as aten, count_flops() as triton_flops:
        out = fastpref.DPOLoss(mode=mode, backend="triton", gemm="fused")(hidden, weight, labels,
                                                                         ref_hidden=hidden.detach() + 0.1)
        out.loss.backward()
    assert aten.get_total_flops() == aten_units * unit
    assert sum(triton_flops.values()) == triton_units * unit, dict(triton_flops)
