"""Core ops vs a float64 materialised ground truth: values and every gradient, both backends, odd shapes."""

from __future__ import annotations

import pytest
import torch

import fastpref
from fastpref import reference as ref
from tests.helpers import PATH_IDS, PATHS, assert_within_torch_error, make_labels, rel_err

TRANSFORMS = {
    "plain": {},
    "temp-scale": {"temperature": 0.7, "logit_scale": 1.3},
    "softcap": {"softcap": 4.0, "temperature": 1.5},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _inputs(batch, seq_len, hidden_size, vocab, dtype, *, with_bias=True, scale=1.0):
    hidden = (scale * torch.randn(batch, seq_len, hidden_size)).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(vocab)).to(dtype).requires_grad_() if with_bias else None
    labels = make_labels(batch, seq_len, vocab)
    return hidden, weight, bias, labels


def _grads(out, upstream, tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad((out.float() * upstream).sum(), tensors)


def _float64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("transform", list(TRANSFORMS), ids=list(TRANSFORMS))
@pytest.mark.parametrize("op", ["token", "sequence", "average"])
def test_fp32_matches_float64(backend, gemm, transform, op):
    """fp32: norm-wise relative error <= 1e-5 on values and on the grads of hidden, weight and bias."""
    hidden, weight, bias, labels = _inputs(3, 47, 31, 123, torch.float32)
    kw = dict(TRANSFORMS[transform])

    def run(mod, h, w, b, **extra):
        if op == "token":
            return mod.token_logps(h, w, labels, bias=b, **kw, **extra)
        return mod.sequence_logps(h, w, labels, bias=b, average=op == "average", **kw, **extra)

    out = run(fastpref, hidden, weight, bias, backend=backend, gemm=gemm)
    upstream = torch.randn(out.shape)
    grads = _grads(out, upstream, [hidden, weight, bias])
    h64, w64, b64 = _float64(hidden, weight, bias)
    truth = run(ref, h64, w64, b64)
    truth_grads = _grads(truth, upstream.double(), [h64, w64, b64])
    assert out.dtype == torch.float32 and out.shape == truth.shape
    assert rel_err(out, truth) <= 1e-5
    for name, g, t in zip(("hidden", "weight", "bias"), grads, truth_grads):
        assert rel_err(g, t) <= 1e-5, name
    if op == "token":
        assert torch.all(out[labels == -100] == 0)


def _assert_sequence_logps_within_twice_torch_error(backend, gemm, hidden, weight, bias, labels, out=None):
    """Values and grads vs float64 within 2x the materialised torch path's error in the inputs' dtype (``out``:
    fastpref's sums when computed otherwise than by ``fastpref.sequence_logps``)."""
    if out is None:
        out = fastpref.sequence_logps(hidden, weight, labels, bias=bias, backend=backend, gemm=gemm)
    plain = ref.sequence_logps(hidden, weight, labels, bias=bias)
    upstream = torch.randn(out.shape)
    grads = _grads(out, upstream, [hidden, weight, bias])
    plain_grads = _grads(plain, upstream, [hidden, weight, bias])
    h64, w64, b64 = _float64(hidden, weight, bias)
    truth = ref.sequence_logps(h64, w64, labels, bias=b64)
    truth_grads = _grads(truth, upstream.double(), [h64, w64, b64])
    assert out.dtype == torch.float32
    assert_within_torch_error("logps", out, plain, truth)
    for name, g, p, t in zip(("hidden", "weight", "bias"), grads, plain_grads, truth_grads):
        assert g.dtype == hidden.dtype, name
        assert_within_torch_error(name, g, p, t, atol=1e-3)


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_within_twice_torch_error(backend, gemm, dtype):
    """bf16 / fp16: fastpref's error vs float64 within 2x the materialised torch path's error in that dtype."""
    dt = DTYPES[dtype]
    _assert_sequence_logps_within_twice_torch_error(backend, gemm, *_inputs(2, 37, 48, 517, dt, scale=2.0))


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
def test_packed_seq_ids_equal_padded_rows(backend, gemm):
    """Packed [N, H] + seq_ids (shuffled token order, -1 entries) equals the row layout."""
    hidden, weight, bias, labels = _inputs(4, 13, 24, 77, torch.float32)
    rows = fastpref.sequence_logps(hidden, weight, labels, bias=bias, backend=backend, gemm=gemm)
    flat_h = hidden.detach().reshape(-1, 24).clone().requires_grad_()
    seq_ids = torch.arange(4).repeat_interleave(13)
    perm = torch.randperm(flat_h.shape[0])
    extra_h = torch.randn(5, 24)
    packed_h = torch.cat([flat_h[perm], extra_h])
    packed_labels = torch.cat([labels.reshape(-1)[perm], torch.randint(0, 77, (5,))])
    packed_ids = torch.cat([seq_ids[perm], torch.full((5,), -1)])
    packed = fastpref.sequence_logps(packed_h, weight, packed_labels, bias=bias, seq_ids=packed_ids, num_seqs=4,
                                     backend=backend, gemm=gemm)
    torch.testing.assert_close(packed, rows, rtol=1e-5, atol=1e-5)
    truth = ref.sequence_logps(packed_h.double(), weight.double(), packed_labels, bias=bias.double(),
                               seq_ids=packed_ids, num_seqs=4)
    assert rel_err(packed, truth) <= 1e-5
    (g_rows,) = torch.autograd.grad(rows.sum(), hidden)
    (g_packed,) = torch.autograd.grad(packed.sum(), flat_h)
    torch.testing.assert_close(g_packed, g_rows.reshape(-1, 24), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
def test_all_ignored_rows_give_zero_and_no_nan(backend, gemm):
    hidden, weight, bias, labels = _inputs(3, 9, 16, 50, torch.float32)
    labels[1] = -100
    seq = fastpref.sequence_logps(hidden, weight, labels, bias=bias, backend=backend, gemm=gemm)
    avg = fastpref.sequence_logps(hidden, weight, labels, bias=bias, average=True, backend=backend, gemm=gemm)
    assert seq[1] == 0 and avg[1] == 0
    (g,) = torch.autograd.grad((seq + avg).sum(), hidden)
    assert torch.isfinite(g).all() and torch.all(g[1] == 0)
    all_ignored = torch.full_like(labels, -100)
    out = fastpref.sequence_logps(hidden, weight, all_ignored, backend=backend, gemm=gemm)
    assert torch.all(out == 0)
    gh, gw = torch.autograd.grad(out.sum(), [hidden, weight])
    assert torch.all(gh == 0) and torch.all(gw == 0)


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=["B=0", "T=0"])
def test_empty_batch(backend, gemm, shape):
    hidden = torch.randn(*shape, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    labels = torch.zeros(shape, dtype=torch.long)
    tok = fastpref.token_logps(hidden, weight, labels, backend=backend, gemm=gemm)
    seq = fastpref.sequence_logps(hidden, weight, labels, backend=backend, gemm=gemm)
    assert tok.shape == shape and seq.shape == (shape[0],) and torch.all(seq == 0)
    gh, gw = torch.autograd.grad(tok.sum() + seq.sum(), [hidden, weight])
    assert gh.shape == hidden.shape and torch.all(gw == 0)


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
def test_non_contiguous_and_expanded_inputs(backend, gemm):
    base = torch.randn(2, 11, 40)
    hidden = base[:, :, ::2]  # non-contiguous [2, 11, 20]
    weight = torch.randn(20, 61).t()  # [61, 20], transposed storage
    bias = torch.randn(1).expand(61)  # stride 0
    labels = torch.randint(0, 61, (1, 11)).expand(2, 11)
    out = fastpref.sequence_logps(hidden, weight, labels, bias=bias, backend=backend, gemm=gemm)
    truth = ref.sequence_logps(hidden.double(), weight.double(), labels, bias=bias.double())
    assert rel_err(out, truth) <= 1e-5


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("autocast", [False, True], ids=["no-autocast", "autocast"])
def test_bf16_hidden_fp32_weight(backend, gemm, autocast):
    """The compute dtype (docs/design.md): the autocast dtype when on, else hidden's; the fp32 weight is cast chunk
    by chunk and its gradient comes back in fp32."""
    hidden = torch.randn(2, 19, 32).bfloat16().requires_grad_()
    weight = (torch.randn(300, 32) / 6).requires_grad_()
    labels = make_labels(2, 19, 300)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fastpref.sequence_logps(hidden, weight, labels, backend=backend, gemm=gemm)
        plain = ref.sequence_logps(hidden, weight, labels)
    gh, gw = torch.autograd.grad(out.sum(), [hidden, weight])
    ph, pw = torch.autograd.grad(plain.sum(), [hidden, weight])
    assert out.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    h64, w64 = _float64(hidden, weight)
    truth = ref.sequence_logps(h64, w64, labels)
    th, tw = torch.autograd.grad(truth.sum(), [h64, w64])
    assert_within_torch_error("logps", out, plain, truth)
    assert_within_torch_error("hidden", gh, ph, th, atol=1e-3)
    assert_within_torch_error("weight", gw, pw, tw, atol=1e-3)


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("hidden_size", [3584, 2304], ids=["H=3584", "H=2304"])
def test_hidden_size_not_power_of_two(backend, gemm, hidden_size):
    hidden = torch.randn(1, 5, hidden_size, requires_grad=True)
    weight = (torch.randn(130, hidden_size) / hidden_size**0.5).requires_grad_()
    labels = torch.randint(0, 130, (1, 5))
    out = fastpref.sequence_logps(hidden, weight, labels, backend=backend, gemm=gemm)
    truth = ref.sequence_logps(hidden.double(), weight.double(), labels)
    assert rel_err(out, truth) <= 1e-5


def _tiled_sequence_logps(hidden, weight, bias, labels, backend, gemm, tile_bytes):
    """``fastpref.sequence_logps`` through the ops layer with an explicit tile budget (``HeadPass.tile_bytes``)."""
    from fastpref.ops import HeadPass, LogitTransform, score_labels, segment_sum

    cfg = HeadPass.for_inputs(hidden, weight, backend=backend, gemm=gemm, transform=LogitTransform(),
                              tile_bytes=tile_bytes)
    batch, seq_len = labels.shape
    row_ids = torch.arange(batch).repeat_interleave(seq_len)
    scored = score_labels(hidden, weight, bias, labels, cfg, ignore_index=-100, seq_ids=row_ids, num_seqs=batch)
    return segment_sum(scored.logps, scored.layout.offsets), cfg


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
def test_many_tiles_match_one_tile(backend, gemm):
    """Tiny tile budget: many vocabulary slabs and row chunks (V not a multiple of any block) give the same
    values and grads as one tile, to fp32 rounding."""
    hidden, weight, bias, labels = _inputs(3, 29, 16, 1000, torch.float32)
    one = fastpref.sequence_logps(hidden, weight, labels, bias=bias, backend=backend, gemm=gemm)
    g_one = torch.autograd.grad(one.sum(), [hidden, weight, bias])
    many, cfg = _tiled_sequence_logps(hidden, weight, bias, labels, backend, gemm, tile_bytes=8192)
    plan = cfg.plan(70, 1000)
    assert plan.cols < 1000 and plan.rows < 70
    g_many = torch.autograd.grad(many.sum(), [hidden, weight, bias])
    torch.testing.assert_close(many, one, rtol=1e-6, atol=1e-5)
    for a, b in zip(g_many, g_one):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
def test_deterministic(backend, gemm):
    hidden, weight, bias, labels = _inputs(2, 17, 16, 90, torch.float32)
    outs = []
    for _ in range(2):
        out = fastpref.sequence_logps(hidden, weight, labels, bias=bias, backend=backend, gemm=gemm)
        outs.append((out, *torch.autograd.grad(out.sum(), [hidden, weight, bias])))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_matches_torch(backend, gemm, reduction):
    hidden, weight, bias, labels = _inputs(2, 21, 16, 99, torch.float32)
    out = fastpref.linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction, backend=backend,
                                        gemm=gemm)
    logits = hidden.double() @ weight.double().T + bias.double()
    truth = torch.nn.functional.cross_entropy(logits.reshape(-1, 99), labels.reshape(-1), reduction=reduction)
    if reduction == "none":
        truth = truth.reshape(labels.shape)
    assert rel_err(out, truth) <= 1e-5
    gh, gw = torch.autograd.grad(out.sum(), [hidden, weight])
    th, tw = torch.autograd.grad(truth.sum(), [hidden, weight])
    assert rel_err(gh, th) <= 1e-5 and rel_err(gw, tw) <= 1e-5


def test_linear_cross_entropy_all_ignored_mean_is_zero():
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    weight = torch.randn(10, 8)
    out = fastpref.linear_cross_entropy(hidden, weight, torch.full((2, 4), -100))
    assert out.item() == 0.0


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("row_chunks", [3, 8], ids=["few-row-chunks", "many-row-chunks"])
def test_bf16_chunked_accumulation_within_twice_torch_error(backend, gemm, row_chunks):
    """bf16 with tiny tiles: several vocabulary slabs and row chunks, so dW takes direct bf16 partial sums (up to
    MAX_PARTIAL_SUMS row chunks) or the fp32 slab buffer (more) and dH the fp32 accumulator; errors vs float64
    stay within 2x the materialised bf16 path's."""
    from fastpref.ops.head_pass import MAX_PARTIAL_SUMS

    hidden, weight, bias, labels = _inputs(4, 40, 32, 700, torch.bfloat16, scale=2.0)
    n = int((labels != -100).sum())
    elem = 12 if backend == "torch" else 2  # HeadPass.plan's working-set bytes per tile element
    tile_bytes = -(-n // row_chunks) * 256 * elem
    out, cfg = _tiled_sequence_logps(hidden, weight, bias, labels, backend, gemm, tile_bytes)
    plan = cfg.plan(n, 700)
    assert plan.cols < 700 and -(-n // plan.rows) == row_chunks
    assert (row_chunks <= MAX_PARTIAL_SUMS) == (row_chunks == 3)
    _assert_sequence_logps_within_twice_torch_error(backend, gemm, hidden, weight, bias, labels, out=out)
