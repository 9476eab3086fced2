"""Bad input: invalid inputs raise a clear ValueError/TypeError naming the argument, the value seen and
the value expected; valid edge cases give the right answer (see test_logps.py for those)."""

from __future__ import annotations

import pytest
import torch

import fastpref
from tests.helpers import BACKENDS, HAS_CUDA


def _ok():
    return torch.randn(2, 5, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 5))


CASES = {
    "hidden-rank": (lambda h, w, y: (h[0, 0], w, y[0, 0]), {}, ValueError, r"hidden: expected shape \[B, T, H\]"),
    "hidden-int": (lambda h, w, y: (h.long(), w, y), {}, TypeError, r"hidden: expected a floating-point .*int64"),
    "weight-int": (lambda h, w, y: (h, w.int(), y), {}, TypeError, r"weight: expected a floating-point .*int32"),
    "weight-rank": (lambda h, w, y: (h, w[0], y), {}, ValueError, r"weight: expected shape \[V, H\], got \(8,\)"),
    "H-mismatch": (lambda h, w, y: (h, w[:, :7], y), {}, ValueError,
                   r"weight: expected \[V, H\] with H = hidden.shape\[-1\] = 8, got shape \(11, 7\)"),
    "labels-float": (lambda h, w, y: (h, w, y.float()), {}, TypeError, r"labels: expected an integer tensor"),
    "labels-shape": (lambda h, w, y: (h, w, y[:, :4]), {}, ValueError, r"labels: expected shape \(2, 5\)"),
    "label-too-big": (lambda h, w, y: (h, w, y.index_fill(1, torch.tensor([3]), 11)), {}, ValueError,
                      r"labels: values must be in \[0, vocab_size=11\) or equal to ignore_index=-100; found 11"),
    "label-negative": (lambda h, w, y: (h, w, y.index_fill(1, torch.tensor([0]), -5)), {}, ValueError,
                       r"found -5"),
    "bias-shape": (lambda h, w, y: (h, w, y), {"bias": torch.randn(10)}, ValueError,
                   r"bias: expected shape \[V\] = \(11,\), got \(10,\)"),
    "temperature": (lambda h, w, y: (h, w, y), {"temperature": 0.0}, ValueError, r"temperature: expected a finite"),
    "softcap-nan": (lambda h, w, y: (h, w, y), {"softcap": float("nan")}, ValueError, r"softcap: expected"),
    "logit_scale-inf": (lambda h, w, y: (h, w, y), {"logit_scale": float("inf")}, ValueError, r"logit_scale"),
    "backend": (lambda h, w, y: (h, w, y), {"backend": "cuda"}, ValueError,
                r"backend: expected one of \['auto', 'triton', 'torch'\], got 'cuda'"),
    "ignore_index-float": (lambda h, w, y: (h, w, y), {"ignore_index": -100.0}, TypeError, r"ignore_index"),
    "hidden-not-tensor": (lambda h, w, y: (h.tolist(), w, y), {}, TypeError, r"hidden: expected a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("op", ["token_logps", "sequence_logps", "linear_cross_entropy"])
def test_invalid_inputs_raise_clear_errors(case, op):
    make, kwargs, exc, pattern = CASES[case]
    hidden, weight, labels = make(*_ok())
    with pytest.raises(exc, match=pattern):
        getattr(fastpref, op)(hidden, weight, labels, **kwargs)


def test_packed_inputs_validation():
    h, w = torch.randn(10, 8), torch.randn(11, 8)
    y = torch.randint(0, 11, (10,))
    with pytest.raises(ValueError, match=r"without seq_ids is per-token only"):
        fastpref.sequence_logps(h, w, y)
    with pytest.raises(ValueError, match=r"num_seqs: required with seq_ids"):
        fastpref.sequence_logps(h, w, y, seq_ids=torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"seq_ids: expected shape \[N\] = \(10,\), got \(9,\)"):
        fastpref.sequence_logps(h, w, y, seq_ids=torch.zeros(9, dtype=torch.long), num_seqs=2)
    with pytest.raises(ValueError, match=r"seq_ids: values must be -1 .* num_seqs=2\); found 2"):
        fastpref.sequence_logps(h, w, y, seq_ids=torch.full((10,), 2), num_seqs=2)
    with pytest.raises(TypeError, match=r"seq_ids: expected an integer tensor"):
        fastpref.sequence_logps(h, w, y, seq_ids=torch.zeros(10), num_seqs=2)
    with pytest.raises(ValueError, match=r"num_seqs: expected an int >= 0, got -1"):
        fastpref.sequence_logps(h, w, y, seq_ids=torch.zeros(10, dtype=torch.long), num_seqs=-1)
    with pytest.raises(ValueError, match=r"seq_ids: packed batches expect hidden of shape \[N, H\]"):
        fastpref.sequence_logps(h.view(2, 5, 8), w, y.view(2, 5), seq_ids=torch.zeros(10, dtype=torch.long),
                                num_seqs=1)


def test_ignored_labels_out_of_range_are_fine_and_custom_ignore_index():
    h, w, y = _ok()
    y[0, :2] = 7777  # a custom ignore_index
    out = fastpref.sequence_logps(h, w, y, ignore_index=7777)
    expected = fastpref.sequence_logps(h, w, y.masked_fill(y == 7777, -100))
    torch.testing.assert_close(out, expected)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, w, y = _ok()
    with pytest.raises(ValueError, match=r"backend='triton' needs a CUDA device or TRITON_INTERPRET=1"):
        fastpref.token_logps(h, w, y, backend="triton")


def test_environment_backend_switch(monkeypatch):
    h, w, y = _ok()
    monkeypatch.setenv("FASTPREF_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"FASTPREF_BACKEND: expected one of"):
        fastpref.token_logps(h, w, y)
    monkeypatch.setenv("FASTPREF_BACKEND", "torch")
    torch.testing.assert_close(fastpref.token_logps(h, w, y), fastpref.token_logps(h, w, y, backend="torch"))


@pytest.mark.skipif(not HAS_CUDA, reason="mixed CPU/CUDA devices need a CUDA device")
def test_mixed_devices_gpu():
    h, w, y = _ok()
    with pytest.raises(ValueError, match=r"weight: expected a tensor on cpu \(the device of hidden\), got cuda"):
        fastpref.token_logps(h, w.cuda(), y)


def test_mixed_devices_cpu_meta():
    """The CPU twin of the mixed-device check: a meta-device weight beside CPU hidden states."""
    h, w, y = _ok()
    with pytest.raises(ValueError, match=r"weight: expected a tensor on cpu \(the device of hidden\), got meta"):
        fastpref.token_logps(h, w.to("meta"), y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels_and_seq_ids_work(backend):
    h, w, y = _ok()
    expected = fastpref.sequence_logps(h, w, y, backend=backend)
    torch.testing.assert_close(fastpref.sequence_logps(h, w, y.int(), backend=backend), expected)
    packed = fastpref.sequence_logps(h.reshape(10, 8), w, y.reshape(10).int(), backend=backend,
                                     seq_ids=torch.arange(2, dtype=torch.int32).repeat_interleave(5), num_seqs=2)
    torch.testing.assert_close(packed, expected)
