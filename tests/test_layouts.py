"""Any layout ``torch.matmul`` accepts: a head stored [H, V] and passed as ``W.t()``, sliced and expanded heads and
biases, non-contiguous hidden states — on every path (backend x GEMM path, fast / lean, the core ops, the compat
drop-ins). The gradients on the leaves match plain torch autograd on the same views: values (against float64)
and layout (shape and strides, e.g. a transposed head's gradient in the stored [H, V] layout)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import fastpref
from fastpref.ops import gemm_path
from tests.helpers import HAS_TRITON, PATH_IDS, PATHS, assert_within_torch_error, make_labels

B, T, H, V = 4, 7, 24, 45
BETA = 2.0


def _stored(kind: str, g: torch.Generator) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The stored head (a leaf) and the view of it passed as ``weight`` [V, H]."""
    return {
        "transposed": (torch.randn(H, V, generator=g), lambda w: w.t()),
        "row_slice": (torch.randn(V + 9, H, generator=g), lambda w: w[:V]),
        "column_step": (torch.randn(V, 2 * H, generator=g), lambda w: w[:, ::2]),
        "expanded_rows": (torch.randn(1, H, generator=g), lambda w: w.expand(V, H)),
        "expanded_columns": (torch.randn(V, 1, generator=g), lambda w: w.expand(V, H)),
    }[kind]


def _stored_hidden(kind: str, g: torch.Generator) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The stored hidden states and the [B, T, H] view passed as ``hidden``."""
    return {
        "contiguous": (torch.randn(B, T, H, generator=g), lambda h: h),
        "permuted": (torch.randn(H, B, T, generator=g), lambda h: h.permute(1, 2, 0)),  # [B*T, H] column-major
        "column_step": (torch.randn(B, T, 2 * H, generator=g), lambda h: h[..., 1::2]),
        "time_major": (torch.randn(T, B, H, generator=g), lambda h: h.transpose(0, 1)),
    }[kind]


def _stored_bias(kind: str, g: torch.Generator) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    return {
        "expanded": (torch.randn(1, generator=g), lambda b: b.expand(V)),  # stride 0
        "step": (torch.randn(2 * V, generator=g), lambda b: b[::2]),
        "offset": (torch.randn(V + 5, generator=g), lambda b: b[5:]),
    }[kind]


# every weight layout meets a hidden and a bias layout; each of those meets several weight layouts
LAYOUTS = [
    ("transposed", "permuted", "step"),
    ("transposed", "contiguous", "expanded"),
    ("row_slice", "column_step", "expanded"),
    ("column_step", "time_major", "offset"),
    ("expanded_rows", "permuted", "offset"),
    ("expanded_columns", "column_step", "step"),
]


def _inputs(layout: tuple[str, str, str], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    (w, view_w), (h, view_h), (b, view_b) = (_stored(layout[0], g), _stored_hidden(layout[1], g),
                                             _stored_bias(layout[2], g))
    w = w / 4
    labels = make_labels(B, T, V, generator=g)
    labels[:, -1] = torch.randint(0, V, (B,), generator=g)  # every sequence keeps a scored token
    upstream = torch.randn(B, T, generator=g)  # a generic direction for the per-token outputs
    ref = torch.randn(B, generator=g) * 5
    return (h, w, b), lambda ts: (view_h(ts[0]), view_w(ts[1]), view_b(ts[2])), labels, upstream, ref


def _plain_token_logps(h, w, b, labels):
    logps = torch.log_softmax(h @ w.t() + b, -1)
    picked = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (labels != -100)


def _dpo(seq: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    margin = seq if ref is None else seq - ref
    return -F.logsigmoid(BETA * (margin[: B // 2] - margin[B // 2 :])).mean()


def _plain(entry: str, h, w, b, labels, upstream, ref) -> torch.Tensor:
    tok = _plain_token_logps(h, w, b, labels)
    if entry == "token_logps":
        return (tok * upstream).sum()
    if entry == "sequence_logps":
        return (tok.sum(1) * upstream[:, 0]).sum()
    if entry == "linear_cross_entropy":
        return -tok.sum() / (labels != -100).sum()
    return _dpo(tok.sum(1), None if entry == "compat" else ref)


def _ours(entry: str, h, w, b, labels, upstream, ref, backend: str, gemm: str, monkeypatch) -> torch.Tensor:
    kw = dict(backend=backend, gemm=gemm)
    if entry == "token_logps":
        return (fastpref.token_logps(h, w, labels, bias=b, **kw) * upstream).sum()
    if entry == "sequence_logps":
        return (fastpref.sequence_logps(h, w, labels, bias=b, **kw) * upstream[:, 0]).sum()
    if entry == "linear_cross_entropy":
        return fastpref.linear_cross_entropy(h, w, labels, bias=b, **kw)
    if entry == "compat":  # the drop-ins take the path from the environment
        from fastpref.compat import LigerFusedLinearDPOLoss

        monkeypatch.setenv("FASTPREF_BACKEND", backend)
        monkeypatch.setenv(gemm_path.GEMM_ENV, gemm)
        return LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False)(w, h, labels, b)[0]
    mode = entry.split("-")[1]
    out = fastpref.DPOLoss(beta=BETA, mode=mode, **kw)(h, w, labels, ref_logps=ref, bias=b)
    assert out.mode == mode
    return out.loss


def _leaf_grads(fn, stored, views, dtype=None):
    leaves = [(t if dtype is None else t.to(dtype)).clone().requires_grad_() for t in stored]
    loss = fn(*views(leaves))
    return loss.detach(), torch.autograd.grad(loss, leaves)


# The three autograd ops (token_logps: LinearLogProbs; DPO fast: FastPairLoss; DPO lean) meet every layout; the
# thin entry points over them (sequence sums, cross-entropy, the Liger drop-in) the transposed heads.
CASES = [(entry, layout) for entry in ("token_logps", "dpo-fast", "dpo-lean") for layout in LAYOUTS] + [
    (entry, layout) for entry in ("sequence_logps", "linear_cross_entropy", "compat") for layout in LAYOUTS[:2]]
CASE_IDS = [f"{entry}-{'-'.join(layout)}" for entry, layout in CASES]


@pytest.fixture(autouse=True)
def _fresh_gemm_choices():
    gemm_path._UNUSABLE.clear()
    yield
    gemm_path._UNUSABLE.clear()


def _assert_like_plain(name: str, ours: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, *,
                       factor: float = 2.0) -> None:
    """Same shape and strides as plain torch's gradient; within ``factor`` x plain torch's error of float64, plus
    1e-5 on the scale of 1 (an expanded head's or bias's true gradient is 0 by the softmax's shift invariance:
    both errors are then the fp32 rounding of sums that cancel, ~100 terms here)."""
    assert ours.shape == plain.shape and ours.stride() == plain.stride(), (
        f"{name}: shape {tuple(ours.shape)} strides {ours.stride()}; plain torch gives {tuple(plain.shape)} "
        f"strides {plain.stride()}")
    scale = max(float(truth.norm()), 1.0)
    err, err_plain = (float((t.double() - truth).norm()) / scale for t in (ours, plain))
    assert err <= factor * err_plain + 1e-5, f"{name}: error {err:.3e} > {factor} x plain torch's {err_plain:.3e}"


class _no_fallback:
    """The fused path must run as asked: a fallback to cuBLAS (with its warning) would hide a layout error."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        assert not gemm_path._UNUSABLE, gemm_path._UNUSABLE
        return False


@pytest.mark.parametrize(("entry", "layout"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
def test_gradients_on_the_leaves_match_plain_torch(backend, gemm, entry, layout, monkeypatch):
    stored, views, labels, upstream, ref = _inputs(layout)
    args = (labels, upstream, ref)
    with _no_fallback():
        loss, grads = _leaf_grads(lambda h, w, b: _ours(entry, h, w, b, *args, backend, gemm, monkeypatch),
                                  stored, views)
    loss_plain, plain = _leaf_grads(lambda h, w, b: _plain(entry, h, w, b, *args), stored, views)
    loss64, truth = _leaf_grads(lambda h, w, b: _plain(entry, h, w, b, *args), stored, views, torch.float64)
    assert_within_torch_error("loss", loss, loss_plain, loss64)
    for name, ours, p, t in zip(("hidden", "weight", "bias"), grads, plain, truth):
        _assert_like_plain(f"{name} ({layout})", ours, p, t)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the fused kernels run under the interpreter)")
@pytest.mark.parametrize("mode", ["fast", "lean"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_transposed_half_precision_head_on_the_fused_path(mode, dtype):
    """A [H, V] head in bf16 / fp16 passed as ``W.t()``: the fused GEMMs cannot write its gradient's layout, so
    it goes through a buffer and comes back in the leaf's layout with the values of the same head stored [V, H]
    (the fused path's accuracy in these dtypes is tests/test_fused_gemm.py's)."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(B, T, H, generator=g).to(dtype)
    w_hv = (torch.randn(H, V, generator=g) / 2).to(dtype)
    labels = make_labels(B, T, V, generator=g)
    labels[:, -1] = torch.randint(0, V, (B,), generator=g)
    ref = torch.randn(B, generator=g) * 5
    loss_fn = fastpref.DPOLoss(beta=BETA, mode=mode, backend="triton", gemm="fused")

    def grads(w_leaf, view):
        leaves = [h.clone().requires_grad_(), w_leaf.clone().requires_grad_()]
        with _no_fallback():
            return torch.autograd.grad(loss_fn(leaves[0], view(leaves[1]), labels, ref_logps=ref).loss, leaves)

    dh_t, dw_t = grads(w_hv, lambda w: w.t())
    dh, dw = grads(w_hv.t().contiguous(), lambda w: w)
    assert dw_t.shape == (H, V) and dw_t.stride() == (V, 1) and dw_t.dtype == dtype
    torch.testing.assert_close(dw_t, dw.t(), rtol=0, atol=0)
    torch.testing.assert_close(dh_t, dh, rtol=0, atol=0)
