"""What a first GPU run depends on, proven on the CPU: host syncs per step, launches on the tensors' device, the
fast path's traffic on dW, the fp32-output matmul gate, and the Triton version of the GPU machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastpref
from tests.helpers import BACKENDS, HAS_TRITON, assert_within_torch_error, make_labels, rel_err

ROOT = Path(__file__).resolve().parent.parent

# Ops that make the host wait for the device on CUDA: a scalar read, data-dependent output sizes, host data
# copied in (``torch.tensor(...)`` from Python values: a pageable host-to-device copy syncs the stream).
_SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.bincount", "aten.unique_dim",
             "aten._unique2", "aten.unique_consecutive", "aten.lift_fresh", "aten.is_nonzero"}


class SyncCounter(TorchDispatchMode):
    """Counts the host syncs of the ops run inside it (backward included): the ops above, boolean-mask indexing,
    ``repeat_interleave`` without ``output_size``, and ``Tensor.tolist``."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket._qualified_op_name.replace("::", ".")
        if name in _SYNC_OPS:
            self.syncs.append(name)
        elif name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            self.syncs.append(f"{name} (boolean mask)")
        elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None and len(args) < 3:
            self.syncs.append(name)
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter, depth = self, [0]

        def tolist(t, *a, **k):
            # one count per call: a TorchFunctionMode on the stack re-dispatches the method through this wrapper
            if depth[0] == 0:
                counter.syncs.append("Tensor.tolist")
            depth[0] += 1
            try:
                return counter._tolist(t, *a, **k)
            finally:
                depth[0] -= 1

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def _dpo_batch(pairs=3, seq_len=21, hidden_size=16, vocab=300, dtype=torch.float32):
    hidden = torch.randn(2 * pairs, seq_len, hidden_size).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).to(dtype).requires_grad_()
    labels = make_labels(2 * pairs, seq_len, vocab)
    return hidden, weight, labels, hidden.detach() + 0.1 * torch.randn(hidden.shape).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fast", "lean", "forward"])
@pytest.mark.parametrize("token_metrics", [False, True], ids=["plain", "token-metrics"])
def test_one_host_sync_per_dpo_step(backend, mode, token_metrics):
    """A whole DPO step (policy forward + backward, the reference scored from its hidden states, the loss and
    every metric) syncs the host exactly once: the layout's one transfer of range checks and offsets."""
    hidden, weight, labels, ref_hidden = _dpo_batch()
    loss_fn = fastpref.DPOLoss(mode="auto" if mode == "forward" else mode, backend=backend,
                               token_metrics=token_metrics)
    with SyncCounter() as counter:
        if mode == "forward":
            with torch.no_grad():
                out = loss_fn(hidden, weight, labels, ref_hidden=ref_hidden)
        else:
            out = loss_fn(hidden, weight, labels, ref_hidden=ref_hidden)
            out.loss.backward()
        assert out.mode == mode
        metrics = dict(out.metrics)
    assert counter.syncs == ["Tensor.tolist"], counter.syncs
    assert torch.isfinite(torch.stack(list(metrics.values()))).all()


def test_sync_counter_sees_the_syncs_it_counts():
    with SyncCounter() as counter:
        x = torch.arange(6)
        x[x > 2].sum().item()
        torch.tensor([1.0, 2.0]).tolist()
        torch.repeat_interleave(x, x)
    assert counter.syncs == ["aten.index (boolean mask)", "aten._local_scalar_dense", "aten.lift_fresh",
                             "Tensor.tolist", "aten.repeat_interleave"]
    with torch.device("cpu"), SyncCounter() as counter:  # a TorchFunctionMode re-dispatches the method
        x.tolist()
    assert counter.syncs == ["Tensor.tolist"]


class _WriteCounter(TorchDispatchMode):
    """Ops that write a tensor of ``shape`` (outputs and in-place / out= targets; views and allocations aside)."""

    _SKIP: ClassVar[frozenset[str]] = frozenset({
        "aten.empty", "aten.empty_like", "aten.empty_strided", "aten.detach", "aten.t", "aten.view", "aten.alias",
        "aten.transpose", "aten.permute", "aten.expand", "aten._to_copy", "aten.slice", "aten.select",
        "aten.as_strided", "aten.unsqueeze", "aten.squeeze", "aten._unsafe_view", "aten.reshape"})

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape, self.writes = shape, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._overloadpacket._qualified_op_name.replace("::", ".")
        if name not in self._SKIP:
            results = out if isinstance(out, (tuple, list)) else [out]
            if any(isinstance(r, torch.Tensor) and r.shape == self.shape for r in results):
                self.writes.append(name)
        return out


def test_fast_mode_writes_dw_once():
    """One pair group: dW is written exactly once, by its GEMM (no zero fill first, no scaling pass after: the
    upstream gradient is folded into the GEMM's small operand), and it still scales exactly."""
    hidden, weight, labels, ref_hidden = _dpo_batch()
    loss_fn = fastpref.DPOLoss(mode="fast", backend="torch")
    with _WriteCounter(weight.shape) as counter:
        out = loss_fn(hidden, weight, labels, ref_hidden=ref_hidden)
        (0.5 * out.loss).backward()
    assert counter.writes == ["aten.mm"], counter.writes
    grad_fast = weight.grad.clone()
    weight.grad = None
    lean = fastpref.DPOLoss(mode="lean", backend="torch")(hidden, weight, labels, ref_hidden=ref_hidden)
    (0.5 * lean.loss).backward()
    assert rel_err(grad_fast, weight.grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_mode_beyond_the_direct_dw_cap_accumulates_in_fp32(backend):
    """A budget that forces more pair groups than MAX_GROUPS_DIRECT_DW: dW accumulates in fp32 (one rounding at
    the end, not one per group) and stays within 2x the materialised bf16 path's error."""
    from fastpref import reference as ref
    from fastpref.ops.plan import MAX_GROUPS_DIRECT_DW

    pairs, seq_len, vocab = 8, 24, 200
    hidden, weight, labels, ref_hidden = _dpo_batch(pairs, seq_len, 32, vocab, torch.bfloat16)
    labels[:, : seq_len // 4] = -100
    per_pair = int((labels[0] != -100).sum() + (labels[pairs] != -100).sum())
    largest = max(int((labels[p] != -100).sum() + (labels[p + pairs] != -100).sum()) for p in range(pairs))
    loss_fn = fastpref.DPOLoss(mode="fast", backend=backend, memory_budget=max(largest, per_pair) * vocab * 2)
    fp32_weight_shaped = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.shape == weight.shape and out.dtype == torch.float32:
                fp32_weight_shaped.append(func)
            return out

    with Watch():
        out = loss_fn(hidden, weight, labels, ref_hidden=ref_hidden)
    grads = torch.autograd.grad(out.loss, [hidden, weight])
    assert out.mode == "fast" and fp32_weight_shaped, "expected an fp32 dW accumulator"
    plain_loss, *_ = ref.preference_loss(hidden, weight, labels, ref_hidden=ref_hidden)
    plain = torch.autograd.grad(plain_loss, [hidden, weight])
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    t_loss, *_ = ref.preference_loss(h64, w64, labels, ref_hidden=ref_hidden.double())
    truth = torch.autograd.grad(t_loss, [h64, w64])
    for name, g, p, t in zip(("hidden", "weight"), grads, plain, truth):
        assert g.dtype == torch.bfloat16
        assert_within_torch_error(f"d{name}", g, p, t, atol=1e-3)
    assert MAX_GROUPS_DIRECT_DW < pairs


# ------------------------------------------------------------------------------------------ kernel launches


def test_every_kernel_launch_goes_through_the_device_guard():
    """Triton launches on the current CUDA device: every launch in kernels/ goes through launch.launch, which
    enters the tensors' device first (a model split across GPUs hands tensors on cuda:1)."""
    raw = re.compile(r"\b_\w*kernel\s*\[")
    for path in sorted((ROOT / "kernels").glob("*.py")):
        if path.name in ("launch.py", "aot.py"):
            continue
        assert not raw.search(path.read_text()), f"{path.name} launches a kernel without kernels.launch.launch"


def test_device_guard_enters_the_tensors_device():
    from fastpref.kernels.launch import device_guard, launch_device

    cuda1 = torch.device("cuda", 1)
    guard = device_guard(cuda1)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(device_guard(torch.device("cpu")), torch.cuda.device)
    assert launch_device([3, torch.empty(1, device="meta"), torch.empty(1)]) == torch.device("meta")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the launch path)")
def test_launch_runs_inside_the_guard(monkeypatch):
    from fastpref.kernels import launch as launch_mod

    entered = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: entered.append(("launched", grid))

    monkeypatch.setattr(launch_mod, "device_guard", Guard)
    launch_mod.launch(Kernel(), (4,), torch.empty(2, device="meta"), 7)
    assert entered == [torch.device("meta"), ("launched", (4,))]


# ---------------------------------------------------------------------------------- fp32-output matmul gate


def test_fp32_out_matmul_probe_and_fallback():
    """The fp32-output ``addmm`` is used only where a probe showed it works (CUDA), else the upcast fallback."""
    from fastpref.ops import head_pass

    def good(acc, a, b, *, beta=1, out_dtype=None, out=None):
        return out.copy_(beta * (acc if beta else 0) + a.float() @ b.float())

    def ignores_beta(acc, a, b, *, beta=1, out_dtype=None, out=None):
        return out.copy_(acc + a.float() @ b.float())  # propagates the NaN beta=0 must ignore

    def missing(*args, **kwargs):
        raise NotImplementedError("aten::addmm.dtype_out is not available here")

    cpu = torch.device("cpu")
    assert head_pass.probe_fp32_out_matmul(cpu, good)
    with pytest.warns(RuntimeWarning, match="gave wrong values"):
        assert not head_pass.probe_fp32_out_matmul(cpu, ignores_beta)
    with pytest.warns(RuntimeWarning, match="not usable"):
        assert not head_pass.probe_fp32_out_matmul(cpu, missing)
    assert not head_pass.fp32_out_matmul(cpu)  # no such kernel off CUDA: never probed there
    acc = torch.full((3, 5), float("nan"))
    a, b = torch.randn(3, 4).bfloat16(), torch.randn(4, 5).bfloat16()
    head_pass.accumulate_mm(acc, a, b, first=True)  # the fallback; `first` never reads acc (NaN here)
    head_pass.accumulate_mm(acc, a, b, first=False)
    torch.testing.assert_close(acc, 2 * (a.float() @ b.float()))


# --------------------------------------------------------------------------- the GPU machine's Triton (3.6)


_NEEDS_TRITON36 = pytest.mark.skipif(not os.environ.get("FASTPREF_TRITON36"), reason="set FASTPREF_TRITON36 to a "
                                     "`pip install --target` folder of triton==3.6.0 (the GPU machine's version; "
                                     ".ci/run does)")


def _pytest_under_triton36(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.environ["FASTPREF_TRITON36"] + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                             capture_output=True, text=True, cwd=ROOT)
    assert version.stdout.startswith("3.6"), version
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", *args],
                         env=env, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout
    return out


@_NEEDS_TRITON36
def test_interpreter_kernel_tests_pass_under_the_gpu_machines_triton():
    """The GPU image has Triton 3.6 and NumPy >= 2.4, whose interpreter cannot turn a runtime scalar into a loop
    bound (kernels/launch.py mends it): the kernel tests (row kernels and fused GEMMs) run there too."""
    _pytest_under_triton36("tests/test_kernels.py", "tests/test_logps.py", "tests/test_fused_gemm.py",
                           "tests/test_gemm_path.py", "-k", "triton or fused or linear or gemm or int64")


@_NEEDS_TRITON36
def test_aot_compiles_under_the_gpu_machines_triton():
    """The ahead-of-time compiles under Triton 3.6 (its own ptxas and code generation): no spills, no serialised
    wgmma, SASS per iteration against the table's 3.6 entries (FASTPREF_UPDATE_SASS=1 passes through and rewrites
    them)."""
    _pytest_under_triton36("tests/test_kernels_aot.py", "tests/test_fused_gemm_aot.py")
