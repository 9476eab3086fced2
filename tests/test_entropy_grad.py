"""The entropy term of the row gradient (GRPO's entropy bonus) and the precise entropy accumulator, on every path:
float64 references with every gradient at odd shapes, bf16 at realistic logit scales bounded by the materialised
plain-torch error, and the fused GEMM path's refusal (it forms no entropy gradient: the pass runs on cublas)."""

from __future__ import annotations

import pytest
import torch

from fastpref.ops import gemm_path
from fastpref.ops.head_pass import HeadPass, backward, finalize_stats, forward_stats
from fastpref.ops.tile_ops import EntropyGrad, LogitTransform, LogSumExp, RowGrad
from tests.helpers import PATH_IDS, PATHS, assert_within_torch_error, rel_err

TRANSFORMS = {"plain": LogitTransform(), "capped": LogitTransform(logit_scale=0.9, softcap=40.0, temperature=0.7)}


def _inputs(n, hidden, vocab, dtype, *, std, offset=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n + 2, hidden, generator=gen)  # two rows never scored
    w = torch.randn(vocab, hidden, generator=gen) * (std / hidden**0.5)
    b = torch.randn(vocab, generator=gen) + offset
    index = torch.randperm(n + 2, generator=gen)[:n]
    targets = torch.randint(0, vocab, (n,), generator=gen)
    return h.to(dtype), w.to(dtype), b.to(dtype), index, targets


def _z(h, w, b, index, t: LogitTransform, dtype):
    """The transformed logits of the scored rows, with the logits rounded to ``dtype`` as the tiles hold them."""
    y = (h[index].to(dtype) @ w.to(dtype).T + b.to(dtype)).to(dtype).double() * t.logit_scale
    if t.softcap is not None:
        y = t.softcap * torch.tanh(y / t.softcap)
    return y / t.temperature


def _entropy(z):
    logp = torch.log_softmax(z, -1)
    return -(logp.exp() * logp).sum(-1)


def _cfg(h, w, backend, gemm, transform, tile_bytes=None):
    return HeadPass.for_inputs(h, w, backend=backend, transform=transform, with_entropy=True, gemm=gemm,
                               tile_bytes=tile_bytes)


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
def test_entropy_is_precise_on_peaked_rows_with_large_logits(backend, gemm):
    """Peaked rows (logit std 30) shifted by +3000: ``lse - E[z]`` would cancel at |z|·2⁻²⁴ ≈ 2e-4, far above
    these rows' entropies; the accumulator of Σ e·(z - max) keeps them within 2x plain torch's fp32 error."""
    h, w, b, index, targets = _inputs(9, 16, 37, torch.float32, std=30.0, offset=3000.0)
    cfg = _cfg(h, w, backend, gemm, LogitTransform(), tile_bytes=8 * 16 * 4 * 3)  # several column chunks
    ent = finalize_stats(forward_stats(h, index, w, b, targets, cfg), w.shape[0])[2].entropy
    z = _z(h, w, b, index, LogitTransform(), torch.float32)
    truth = _entropy(z)
    plain = _entropy(z.float())
    assert truth.max() < 1.0  # peaked
    assert_within_torch_error("entropy", ent.double(), plain.double(), truth, atol=1e-6)


def _reference_grads(h, w, b, index, targets, g, e, t: LogitTransform, dtype):
    """Gradients of Σ g·logp + e·H through the materialised logits in ``dtype`` (float64: the truth)."""
    leaves = [x.detach().to(dtype).requires_grad_(True) for x in (h, w, b)]
    hh, ww, bb = leaves
    y = (hh[index] @ ww.T + bb).float() if dtype != torch.float64 else hh[index] @ ww.T + bb
    y = y * t.logit_scale
    if t.softcap is not None:
        y = t.softcap * torch.tanh(y / t.softcap)
    logp_all = torch.log_softmax(y / t.temperature, -1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    loss = (g.to(logp.dtype) * logp + e.to(ent.dtype) * ent).sum()
    return [x.double() for x in torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("transform", list(TRANSFORMS), ids=list(TRANSFORMS))
@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize(("dtype", "std"), [(torch.float32, 3.0), (torch.bfloat16, 10.0), (torch.bfloat16, 30.0),
                                           (torch.float16, 10.0), (torch.float16, 30.0)],
                         ids=["fp32", "bf16-std10", "bf16-std30", "fp16-std10", "fp16-std30"])
def test_entropy_gradient_matches_float64(backend, gemm, transform, dtype, std):
    """``head_pass.backward`` with an entropy term: every gradient against float64 at odd shapes (several row and
    vocabulary tiles), within 2x the materialised torch path's error in the same dtype. The fused path runs the
    pass on cublas (its prologues form no entropy term)."""
    t = TRANSFORMS[transform]
    n, hidden, vocab = 11, 24, 45
    h, w, b, index, targets = _inputs(n, hidden, vocab, dtype, std=std, seed=1)
    gen = torch.Generator().manual_seed(2)
    g, e = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    cfg = _cfg(h, w, backend, gemm, t, tile_bytes=5 * 16 * 4 * 3 if backend == "torch" else 5 * 16 * 2)
    lse, _, stats = finalize_stats(forward_stats(h, index, w, b, targets, cfg), vocab)
    got = backward(h, index, w, b, targets, lse, g, cfg, need_hidden=True, need_weight=True, need_bias=True,
                   entropy=EntropyGrad(e, stats.entropy))
    truth = _reference_grads(h, w, b, index, targets, g.double(), e.double(), t, torch.float64)
    plain = _reference_grads(h, w, b, index, targets, g, e, t, dtype)
    for name, x, p, ref in zip(("d_hidden", "d_weight", "d_bias"), got, plain, truth):
        assert x.dtype == dtype
        assert_within_torch_error(name, x.double(), p, ref, atol=1e-5 if dtype == torch.float32 else 2e-3)


def test_entropy_gradient_fails_without_its_term():
    """The test above can fail: dropping the entropy term (e ignored) is far outside the bound."""
    h, w, b, index, targets = _inputs(7, 8, 19, torch.float32, std=3.0)
    g, e = torch.zeros(7), torch.ones(7)
    cfg = _cfg(h, w, "torch", None, LogitTransform())
    lse, _, stats = finalize_stats(forward_stats(h, index, w, b, targets, cfg), 19)
    with_e = backward(h, index, w, b, targets, lse, g, cfg, need_hidden=True, need_weight=False, need_bias=False,
                      entropy=EntropyGrad(e, stats.entropy))[0]
    truth = _reference_grads(h, w, b, index, targets, g.double(), e.double(), LogitTransform(), torch.float64)[0]
    assert rel_err(with_e.double(), truth) < 1e-5
    assert rel_err(torch.zeros_like(truth), truth) == pytest.approx(1.0)


def test_fused_path_refuses_an_entropy_gradient():
    """The switch sends a pass with an entropy gradient to cublas; the fused path itself raises rather than
    dropping the term."""
    cfg = HeadPass(transform=LogitTransform(), compute_dtype=torch.float32, backend="triton", tile_bytes=1 << 20,
                   gemm="fused", gemm_key=("cpu", None, torch.float32, 8, 16))
    assert gemm_path.implementation(cfg).name == "fused"
    assert gemm_path.implementation(cfg, entropy_grad=True).name == "cublas"
    zeros = torch.zeros(3)
    grad = RowGrad(torch.zeros(3, dtype=torch.long), LogSumExp(zeros, zeros), zeros, EntropyGrad(zeros, zeros))
    fused = gemm_path.FusedPath(LogitTransform(), torch.float32, "triton")
    with pytest.raises(ValueError, match=r"grad\.entropy: the fused GEMM path forms no entropy gradient"):
        fused.grad_input(torch.zeros(3, 16), grad, torch.zeros(16, 8), torch.zeros(3, 8), accumulate=False)
    with pytest.raises(ValueError, match=r"grad\.entropy"):
        fused.grad_weight(torch.zeros(3, 16), grad, torch.zeros(3, 8), torch.zeros(16, 8), None, accumulate=False)
