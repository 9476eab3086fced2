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


# ------------------------------------------------------------------------------ the losses at the edges


def _pairs(pairs=2, seq_len=6, hidden_size=8, vocab=300):
    hidden = torch.randn(2 * pairs, seq_len, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size) / 3
    labels = torch.randint(0, vocab, (2 * pairs, seq_len))
    labels[:, 0] = -100
    return hidden, weight, labels


def test_losses_reject_packed_seq_ids_beyond_num_seqs():
    """A packed id >= num_seqs must not be remapped onto another sequence (pair order is 2*(id % P) + (id >= P)):
    the range is checked in the batch layout first, by the loss and by score() alike."""
    hidden, weight, labels = _pairs()
    flat_h, flat_y = hidden.detach().reshape(-1, 8), labels.reshape(-1)
    seq_ids = torch.arange(4).repeat_interleave(6)
    seq_ids[-1] = 7  # would map to pair 1's rejected sequence
    loss_fn = fastpref.DPOLoss()
    with pytest.raises(ValueError, match=r"seq_ids: values must be -1 .* num_seqs=4\); found 7 at position 23"):
        loss_fn(flat_h, weight, flat_y, torch.zeros(4), seq_ids=seq_ids, num_seqs=4)
    with pytest.raises(ValueError, match=r"seq_ids: values must be -1 .* found 7"):
        loss_fn.score(flat_h, weight, flat_y, seq_ids=seq_ids, num_seqs=4)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_small_integer_labels_are_read_as_int64(dtype):
    """uint8 / int8 labels: compared as int64, so ignore_index (-100) never wraps onto a real token (156 for
    uint8) and the range error is about the real vocabulary."""
    hidden, weight, labels = _pairs(vocab=300)
    labels = labels.clamp(max=120)
    labels[:, 0] = 0 if dtype == torch.uint8 else -100
    loss_fn = fastpref.DPOLoss(reference_free=True)
    want = loss_fn(hidden, weight, labels.long())
    got = loss_fn(hidden, weight, labels.to(dtype))
    torch.testing.assert_close(got.chosen_logps, want.chosen_logps)
    torch.testing.assert_close(fastpref.sequence_logps(hidden, weight, labels.to(dtype)),
                               fastpref.sequence_logps(hidden, weight, labels.long()))
    if dtype == torch.uint8:  # token 156 is a real token of a 300-word vocabulary, never "ignored"
        labels[0, 1] = 156
        with_156 = fastpref.token_logps(hidden, weight, labels.to(torch.uint8))
        assert with_156[0, 1] != 0
    small_vocab = torch.randn(100, 8)
    labels_big = labels % 100
    labels_big[0, 2] = 110
    with pytest.raises(ValueError, match=r"labels: values must be in \[0, vocab_size=100\) .* found 110"):
        fastpref.sequence_logps(hidden, small_vocab, labels_big.to(dtype))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"temperature": 1e-40}, r"temperature: expected .* \(temperature and 1/temperature finite in fp32\), got 1e-40"),
    ({"logit_scale": 1e39}, r"logit_scale: expected a finite number in \[-3\.403e\+38, 3\.403e\+38\]"),
    ({"beta": 1e300}, r"beta: expected a finite number in \(0, 3\.403e\+38\], got 1e\+300"),
    ({"softcap": 1e39}, r"softcap: expected"),
], ids=["temperature-1e-40", "logit_scale-1e39", "beta-1e300", "softcap-1e39"])
def test_hyper_parameters_that_overflow_fp32_raise(kwargs, match):
    """Host scalars are checked at no sync cost: a value that becomes inf in the fp32 kernels (and then NaN) is a
    ValueError at construction."""
    with pytest.raises(ValueError, match=match):
        fastpref.DPOLoss(**kwargs)


@pytest.mark.parametrize("where", ["hidden", "weight", "ref_logps", "ref_hidden", "refinement"])
def test_check_finite_names_the_non_finite_input(where):
    """Tensor values are not inspected by default (NaN propagates, as in PyTorch); check_finite=True counts
    NaN / inf in every given tensor within the call's one host sync and names the argument."""
    hidden, weight, labels = _pairs()
    kwargs = {"ref_logps": torch.zeros(4)} if where != "ref_hidden" else {"ref_hidden": hidden.detach().clone()}
    loss_type = "sr_dpo" if where == "refinement" else "sigmoid"
    if loss_type == "sr_dpo":
        kwargs["refinement"] = torch.zeros(2)
    values = {"hidden": hidden, "weight": weight, **kwargs}
    poisoned = values[where].detach().clone()
    if poisoned.dim() == 3:
        poisoned[0, 2, 1] = float("nan")  # a scored position (position 0 is the prompt)
    else:
        poisoned.view(-1)[1] = float("nan") if where != "weight" else float("inf")
    values[where] = poisoned.requires_grad_(where == "hidden")
    args = {k: v for k, v in values.items() if k not in ("hidden", "weight")}
    out = fastpref.PreferenceLoss(loss_type)(values["hidden"], values["weight"], labels, **args)
    assert not torch.isfinite(out.loss)  # the default: propagated, as PyTorch does
    with pytest.raises(ValueError, match=rf"^{where}: expected finite values \(check_finite=True\), got 1 NaN or inf"):
        fastpref.PreferenceLoss(loss_type, check_finite=True)(values["hidden"], values["weight"], labels, **args)
    clean = fastpref.PreferenceLoss(loss_type, check_finite=True)(hidden, weight, labels,
                                                                  **{k: v for k, v in kwargs.items()})
    assert torch.isfinite(clean.loss)


@pytest.mark.parametrize("where", ["ref_logps", "ref_hidden", "refinement"])
@pytest.mark.parametrize("check_finite", [False, True])
def test_a_meta_reference_is_named_with_or_without_check_finite(where, check_finite):
    """check_finite counts NaN / inf on hidden's device in the one host sync: a given tensor on another device
    (here meta, which holds no data to count) is named there, as the reference's own checks name it."""
    hidden, weight, labels = _pairs()
    meta = {"ref_logps": torch.empty(4, device="meta"), "ref_hidden": torch.empty(hidden.shape, device="meta"),
            "refinement": torch.empty(2, device="meta")}
    kwargs = {where: meta[where]}
    if where == "refinement":
        kwargs["ref_logps"] = torch.zeros(4)
    loss = fastpref.PreferenceLoss("sr_dpo" if where == "refinement" else "sigmoid", check_finite=check_finite)
    with pytest.raises(ValueError, match=rf"^{where}: expected a tensor (on cpu|with data).* got .*meta"):
        loss(hidden, weight, labels, **kwargs)


def test_check_finite_in_the_core_ops():
    hidden, weight, labels = _pairs()
    bad = weight.clone()
    bad[3, 2] = float("-inf")
    with pytest.raises(ValueError, match=r"^weight: expected finite values"):
        fastpref.sequence_logps(hidden, bad, labels, check_finite=True)
    assert torch.isfinite(fastpref.sequence_logps(hidden, weight, labels, check_finite=True)).all()


def test_fp16_logits_beyond_fp16_range_behave_as_the_materialised_fp16_path():
    """fp16 inputs: the cuBLAS path's logits tile is fp16, as in PyTorch's own fp16 matmul, so logits beyond
    ±65504 overflow exactly where the materialised fp16 path's do (documented in the README); in range, both are
    finite."""
    from fastpref import reference as ref

    hidden = torch.full((2, 3, 4), 200.0, dtype=torch.float16)
    weight = torch.full((10, 4), 100.0, dtype=torch.float16)  # logits 80000 > 65504
    labels = torch.randint(0, 10, (2, 3))
    ours = fastpref.sequence_logps(hidden, weight, labels, backend="torch")
    theirs = ref.sequence_logps(hidden, weight, labels)
    assert torch.isfinite(ours).all() == torch.isfinite(theirs).all()
    small = fastpref.sequence_logps(hidden / 100, weight / 100, labels, backend="torch")
    assert torch.isfinite(small).all()


def test_meta_tensors_get_a_clear_error():
    h, w, y = (t.to("meta") for t in _ok())
    for call in (lambda: fastpref.sequence_logps(h, w, y), lambda: fastpref.DPOLoss(reference_free=True)(h, w, y)):
        with pytest.raises(ValueError, match=r"hidden: expected a tensor with data .* got one on the meta device"):
            call()


@pytest.mark.parametrize(("args", "match"), [
    (["--device", "meta"], r"--device: expected cpu or cuda\[:i\], got 'meta'"),
    (["--repeats", "0"], r"--repeats: expected a positive integer, got '0'"),
    (["--repeats", "-2"], r"--repeats: expected a positive integer, got '-2'"),
])
def test_bench_cli_rejects_bad_arguments(args, match, capsys):
    from fastpref.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args])
    assert exit_info.value.code == 2
    import re

    assert re.search(match, capsys.readouterr().err)
