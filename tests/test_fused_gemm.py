"""Fused GEMM kernels of kernels/fused_gemm.py under the interpreter, against float64 truth materialised from the
same inputs: odd shapes (tails on every dimension), several vocabulary splits, two consecutive slabs, every logit
transform, bias, entropy / top-1 statistics, stored logits, both gradient GEMMs with and without accumulation.
Outputs are poisoned with NaN before each launch so unwritten elements show."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from tests.helpers import HAS_TRITON, assert_within_torch_error, rel_err

pytestmark = [pytest.mark.skipif(not HAS_TRITON, reason="needs triton (runs under the interpreter on the CPU)"),
              pytest.mark.interpreter]

if HAS_TRITON:
    from fastpref.kernels import fused_gemm as fg
    from fastpref.kernels.row_kernels import fold_logsumexp

    # interpreter-sized blocks (tl.dot needs >= 16 on every side)
    TINY = fg.GemmConfig(16, 16, 16, group_m=2, num_warps=4, num_stages=1)
    WIDE = fg.GemmConfig(16, 32, 16, group_m=1, num_warps=4, num_stages=1)
else:  # pragma: no cover
    TINY = WIDE = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The interpreter on CPU-only machines (tests/conftest.py), the compiled kernels where there is a CUDA device.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _on_device():
    # a context, not set_default_device: restoring a default device leaves its TorchFunctionMode installed for
    # every later test of the process (it re-dispatches Tensor methods: tests/test_gpu_readiness.py's counter)
    with torch.device(DEVICE):
        yield


def _cpu_randn(*shape, g):
    """Seeded inputs: drawn on the CPU (a CPU generator), then moved to the device."""
    return torch.randn(*shape, generator=g, device="cpu").to(DEVICE)
# n, H and the second slab's width multiples of no block size, the first slab's a multiple of 16 but not of 32 (slabs
# start at multiples of 16: aligned logits rows)
N, H, V = 37, 45, 150
SLABS = ((0, 80), (80, 150))


@dataclass(frozen=True)
class Transform:
    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def kwargs(self) -> dict:
        return dict(logit_scale=self.logit_scale, softcap=self.softcap, inv_temperature=1.0 / self.temperature)

    def z(self, y: torch.Tensor) -> torch.Tensor:
        z = y * self.logit_scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z / self.temperature

    def dz_dy(self, y: torch.Tensor) -> torch.Tensor:
        d = torch.full_like(y, self.logit_scale / self.temperature)
        if self.softcap is not None:
            d = d * (1 - torch.tanh(y * self.logit_scale / self.softcap) ** 2)
        return d


PLAIN = Transform()
CAPPED = Transform(logit_scale=1.3, softcap=4.0, temperature=0.7)


def _inputs(n=N, hidden=H, vocab=V, dtype=torch.float32, *, bias=True, seed=0):
    """h, W, b in ``dtype`` (logits of O(3)) and int64 targets: random ids, a few ignored rows (-100) and a few rows
    whose target is the row's argmax (top-1 hits)."""
    g = torch.Generator().manual_seed(seed)
    h = _cpu_randn(n, hidden, g=g).to(dtype)
    w = (2.0 * _cpu_randn(vocab, hidden, g=g) / hidden**0.5).to(dtype)
    b = (0.5 * _cpu_randn(vocab, g=g)).to(dtype) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g, device="cpu").to(DEVICE)
    targets[[i for i in (3, 17) if i < n]] = -100
    y = _y64(h, w, b)
    top = y.argmax(1)
    targets[::5] = top[::5]
    return h, w, b, targets


def _y64(h, w, b):
    y = h.double() @ w.double().T
    return y if b is None else y + b.double()


def _stats(n, *, entropy=True, top1=True):
    """Fresh running statistics; target_logit is poisoned (rows whose target no slab holds keep NaN)."""
    return dict(row_max=torch.full((n,), -math.inf), row_sumexp=torch.zeros(n), target_logit=torch.full((n,), math.nan),
                logit_sum=torch.zeros(n), entropy_acc=torch.zeros(n) if entropy else None,
                max_before_target=torch.full((n,), -math.inf) if top1 else None)


def _fold(h, w, b, targets, tr, *, slabs=SLABS, entropy=True, top1=True, config=TINY, num_splits=None,
          logits_out=None):
    st = _stats(h.shape[0], entropy=entropy, top1=top1)
    for v0, v1 in slabs:
        fg.linear_fold(h, w[v0:v1], None if b is None else b[v0:v1], targets, **st, vocab_start=v0, **tr.kwargs(),
                       logits_out=None if logits_out is None else logits_out[:, v0:v1], config=config,
                       num_splits=num_splits)
    return st


def _outputs(st, targets, vocab):
    """Derived per-row outputs (as fastpref.ops.linear_logps.finalize_stats forms them), valid rows only."""
    valid = targets >= 0
    lse = st["row_max"] + st["row_sumexp"].log()
    out = dict(lse=lse, logp=(st["target_logit"] - lse)[valid], mean=st["logit_sum"] / vocab)
    if st["entropy_acc"] is not None:
        out["entropy"] = st["row_sumexp"].log() - st["entropy_acc"] / st["row_sumexp"]
    if st["max_before_target"] is not None:
        t = st["target_logit"]
        out["top1"] = ((t >= st["row_max"]) & (t > st["max_before_target"]))[valid]
    return out


def _truth_outputs(z, targets):
    valid = targets >= 0
    lse = torch.logsumexp(z, 1)
    logp = z.gather(1, targets.clamp(min=0)[:, None])[:, 0] - lse
    out = dict(lse=lse, logp=logp[valid], mean=z.mean(1), entropy=lse - (torch.softmax(z, 1) * z).sum(1),
               top1=(z.argmax(1) == targets)[valid])
    before = torch.stack([z[i, : max(int(t), 0)].max() if t > 0 else torch.tensor(-math.inf, dtype=z.dtype)
                          for i, t in enumerate(targets)])
    return out, before


FOLD_CASES = {
    # id: dtype, transform, bias, entropy, top1, H, config, num_splits
    "fp32-plain": ("fp32", PLAIN, False, False, False, H, TINY, None),
    "fp32-all-2splits": ("fp32", CAPPED, True, True, True, H, WIDE, 2),
    "bf16-all-autosplit": ("bf16", CAPPED, True, True, True, H, TINY, None),
    "bf16-evenK-1split": ("bf16", PLAIN, False, True, True, 48, WIDE, 1),
    "fp16-all-3splits": ("fp16", CAPPED, True, True, True, H, TINY, 3),
}


@pytest.mark.parametrize("case", list(FOLD_CASES), ids=list(FOLD_CASES))
def test_linear_fold_matches_float64(case):
    dtype_name, tr, bias, entropy, top1, hidden, config, splits = FOLD_CASES[case]
    dtype = DTYPES[dtype_name]
    h, w, b, targets = _inputs(hidden=hidden, dtype=dtype, bias=bias)
    st = _fold(h, w, b, targets, tr, entropy=entropy, top1=top1, config=config, num_splits=splits)
    ours = _outputs(st, targets, V)
    truth, _ = _truth_outputs(tr.z(_y64(h, w, b)), targets)
    # plain torch in the same dtype: the logits tile rounded to the dtype, then fp32 row statistics
    y_plain = (h @ w.T if b is None else torch.addmm(b, h, w.T)).float()
    plain, _ = _truth_outputs(tr.z(y_plain), targets)
    for name in ("lse", "logp", "mean") + (("entropy",) if entropy else ()):
        assert_within_torch_error(name, ours[name], plain[name], truth[name])
    valid = targets >= 0
    assert torch.isfinite(st["target_logit"][valid]).all()
    assert torch.isnan(st["target_logit"][~valid]).all(), "rows with an ignored target must stay untouched"
    # the fold reads the logits rounded to the compute dtype, as the plain tile holds them (a tie of the fp32
    # accumulator can round the other way: one unit of the dtype)
    z_plain = tr.z(y_plain.double())
    tol = dict(rtol={torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype], atol=1e-5)
    torch.testing.assert_close(st["row_max"].double(), z_plain.amax(1), **tol)
    if top1:
        plain_out, before_plain = _truth_outputs(z_plain, targets)
        assert torch.equal(ours["top1"], plain_out["top1"])  # ties in 16 bits: the first maximum, as argmax
        assert ours["top1"].sum() >= 5  # the planted argmax targets
        got = st["max_before_target"].double()
        assert torch.equal(torch.isinf(got), torch.isinf(before_plain))
        finite = torch.isfinite(before_plain)
        torch.testing.assert_close(got[finite], before_plain[finite], **tol)


def test_linear_fold_is_fold_logsumexp_of_the_projection():
    """Every statistic, in place, as the row kernel gives it on the materialised fp32 tile (kernels/row_kernels.py)."""
    h, w, b, targets = _inputs(dtype=torch.float32)
    ours = _fold(h, w, b, targets, CAPPED, config=WIDE, num_splits=2)
    row = _stats(N)
    for v0, v1 in SLABS:
        tile = torch.addmm(b[v0:v1], h, w[v0:v1].T)
        fold_logsumexp(tile, targets, *row.values(), vocab_start=v0, **CAPPED.kwargs())
    for name in row:  # fp32 rounding apart (the sums run in another order over 150 terms of |z| <= 4)
        torch.testing.assert_close(ours[name], row[name], rtol=1e-5, atol=5e-5, equal_nan=True, msg=name)


def test_linear_fold_slab_order_does_not_matter():
    """Slabs folded last to first give the same statistics: a slab never touches a row whose target lies in another
    slab (a later one included), the online log-sum-exp merges in any order."""
    h, w, b, targets = _inputs(dtype=torch.float32)
    forward = _fold(h, w, b, targets, CAPPED, config=WIDE)
    backward = _fold(h, w, b, targets, CAPPED, slabs=SLABS[::-1], config=WIDE)
    for name in ("row_max", "target_logit", "max_before_target"):
        assert torch.equal(forward[name].nan_to_num(7.0), backward[name].nan_to_num(7.0)), name
    for name in ("row_sumexp", "logit_sum", "entropy_acc"):
        torch.testing.assert_close(backward[name], forward[name], rtol=1e-5, atol=5e-5)


def test_linear_fold_split_count_changes_only_the_merge_order():
    """The per-split partials merge into the same statistics: the max and the target logit (one accumulator each)
    bit for bit, the sums up to fp32 rounding."""
    h, w, b, targets = _inputs(dtype=torch.bfloat16)
    runs = [_fold(h, w, b, targets, CAPPED, config=TINY, num_splits=s) for s in (1, 2, 5)]
    for other in runs[1:]:
        for name in ("row_max", "target_logit", "max_before_target"):
            assert torch.equal(runs[0][name].nan_to_num(7.0), other[name].nan_to_num(7.0)), name
        for name in ("row_sumexp", "logit_sum", "entropy_acc"):
            torch.testing.assert_close(other[name], runs[0][name], rtol=1e-5, atol=1e-5)


def test_linear_fold_top1_ties_take_the_first_maximum():
    """Two identical vocabulary rows give bit-identical logits (same accumulator order): a target on the second
    copy is not a top-1 hit (argmax takes the first), one on the first is — across slabs and across blocks."""
    h, w, _, _ = _inputs(dtype=torch.bfloat16, bias=False)
    u = torch.randn(H)
    h = (h.float() + 2 * u).bfloat16()
    for j in (10, 12, 100):  # 10 and 12 share a block of the first slab, 100 lies in the second slab
        w[j] = (0.5 * u).bfloat16()
    targets = torch.tensor([(10, 12, 100)[i % 3] for i in range(N)])
    st = _fold(h, w, None, targets, PLAIN, config=TINY)
    top1 = _outputs(st, targets, V)["top1"]
    z = _y64(h, w, None)
    assert (z.argmax(1) == 10).all(), "the duplicated rows must be every row's maximum for this test"
    assert torch.equal(top1, targets == 10)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_linear_fold_logits_out(dtype):
    """The raw y = h @ W.T + b rounded to the compute dtype, written into column views of a wider buffer (row
    stride > Vs): every slab element written, the padding untouched."""
    dtype = DTYPES[dtype]
    h, w, b, targets = _inputs(dtype=dtype)
    buf = fg.logits_buffer(N, V + 8, dtype).fill_(math.nan)
    _fold(h, w, b, targets, PLAIN, config=WIDE, logits_out=buf[:, :V])
    assert torch.isnan(buf[:, V:]).all()
    got, y = buf[:, :V].double(), _y64(h, w, b)
    assert torch.isfinite(got).all()
    # one rounding of the fp32 accumulator: unit roundoff of the dtype, plus the fp32 accumulation error
    u = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    assert ((got - y).abs() <= u * y.abs() + 1e-5 * y.abs().max()).all()
    plain = torch.addmm(b, h, w.T)
    assert_within_torch_error("logits_out", got, plain, y)


def _grad_inputs(n, hidden, vs, dtype, *, vocab_start, seed=1):
    """Stored logits of one slab [n, vs] (compute dtype), the full-vocabulary lse in fp32 (so softmax <= 1),
    targets inside and outside the slab (and ignored), grad_rows with a zero."""
    g = torch.Generator().manual_seed(seed)
    vocab = vocab_start + vs + 30
    h = _cpu_randn(n, hidden, g=g).to(dtype)
    w_full = (2.0 * _cpu_randn(vocab, hidden, g=g) / hidden**0.5).to(dtype)
    w = w_full[vocab_start : vocab_start + vs]
    y_full = (h.float() @ w_full.float().T).to(dtype)
    logits = fg.logits_buffer(n, vs, dtype).copy_(y_full[:, vocab_start : vocab_start + vs])
    targets = torch.randint(0, vocab, (n,), generator=g, device="cpu")
    targets[: n // 3] = vocab_start + torch.randint(0, vs, (n // 3,), generator=g, device="cpu")  # inside the slab
    targets[5] = -100
    targets = targets.to(DEVICE)
    grad_rows = _cpu_randn(n, g=g)
    grad_rows[7] = 0.0
    return h, w, logits, targets, grad_rows, y_full


def _g64(logits, targets, lse, grad_rows, tr, vocab_start):
    y = logits.double()
    local = targets - vocab_start
    onehot = torch.zeros_like(y)
    inside = (local >= 0) & (local < y.shape[1])
    onehot[inside.nonzero()[:, 0], local[inside]] = 1.0
    return grad_rows.double()[:, None] * (onehot - torch.exp(tr.z(y) - lse.double()[:, None])) * tr.dz_dy(y)


def _split(lse):
    """A full log-sum-exp as the gradient kernels take it, (row_max, log_sumexp) with lse = row_max + log_sumexp:
    here (0, lse), so the kernels form exp((z - 0) - lse)."""
    return torch.zeros_like(lse), lse


def _g_plain(logits, targets, lse, grad_rows, tr, vocab_start, dtype):
    """What the cuBLAS path multiplies: G in fp32 from the stored logits, rounded to the compute dtype."""
    return _g64(logits.float(), targets, lse, grad_rows, tr, vocab_start).float().to(dtype)


GRAD_CASES = {
    # id: dtype, transform, out dtype ("fp32" | "compute"), accumulate, (n, H, Vs), config
    "fp32-capped-out32": ("fp32", CAPPED, "fp32", False, (N, H, 70), TINY),
    "fp32-plain-out32-acc": ("fp32", PLAIN, "fp32", True, (N, H, 70), WIDE),
    "bf16-capped-out32-acc": ("bf16", CAPPED, "fp32", True, (N, H, 70), TINY),
    "bf16-plain-outbf16": ("bf16", PLAIN, "compute", False, (N, H, 70), WIDE),
    "bf16-capped-outbf16-acc": ("bf16", CAPPED, "compute", True, (N, H, 70), WIDE),
    "bf16-evenK": ("bf16", CAPPED, "fp32", False, (48, 32, 64), TINY),
    "fp16-capped-out32": ("fp16", CAPPED, "fp32", False, (N, H, 70), TINY),
    "fp16-plain-outfp16-acc": ("fp16", PLAIN, "compute", True, (N, H, 70), WIDE),
}


def _out(shape, dtype, out_kind, accumulate, seed):
    odt = torch.float32 if out_kind == "fp32" else dtype
    if accumulate:
        return _cpu_randn(*shape, g=torch.Generator().manual_seed(seed)).to(odt)
    return torch.full(shape, math.nan, dtype=odt)


@pytest.mark.parametrize("case", list(GRAD_CASES), ids=list(GRAD_CASES))
def test_linear_grad_input_matches_float64(case):
    dtype_name, tr, out_kind, accumulate, (n, hidden, vs), config = GRAD_CASES[case]
    dtype = DTYPES[dtype_name]
    v0 = 40
    _, w, logits, targets, grad_rows, y_full = _grad_inputs(n, hidden, vs, dtype, vocab_start=v0)
    lse = torch.logsumexp(tr.z(y_full.double()), 1).float()
    out = _out((n, hidden), dtype, out_kind, accumulate, seed=2)
    prev = out.double() if accumulate else 0.0
    before = logits.clone()
    got = fg.linear_grad_input(logits, targets, *_split(lse), grad_rows, w, out, vocab_start=v0, **tr.kwargs(),
                               accumulate=accumulate, config=config)
    assert got is out and torch.equal(logits, before), "logits are only read"
    truth = prev + _g64(logits, targets, lse, grad_rows, tr, v0) @ w.double()
    plain = (prev + _g_plain(logits, targets, lse, grad_rows, tr, v0, dtype).double() @ w.double()).to(out.dtype)
    assert torch.isfinite(out).all()
    assert_within_torch_error("dH", out, plain, truth)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-dbias", "dbias"])
@pytest.mark.parametrize("case", list(GRAD_CASES), ids=list(GRAD_CASES))
def test_linear_grad_weight_matches_float64(case, with_bias):
    dtype_name, tr, out_kind, accumulate, (n, hidden, vs), config = GRAD_CASES[case]
    dtype = DTYPES[dtype_name]
    v0 = 40
    h, _, logits, targets, grad_rows, y_full = _grad_inputs(n, hidden, vs, dtype, vocab_start=v0)
    lse = torch.logsumexp(tr.z(y_full.double()), 1).float()
    out = _out((vs, hidden), dtype, out_kind, accumulate, seed=3)
    d_bias = _out((vs,), dtype, out_kind, accumulate, seed=4) if with_bias else None
    prev = out.double() if accumulate else 0.0
    prev_b = d_bias.double() if (with_bias and accumulate) else 0.0
    fg.linear_grad_weight(logits, targets, *_split(lse), grad_rows, h, out, d_bias, vocab_start=v0, **tr.kwargs(),
                          accumulate=accumulate, config=config)
    g64 = _g64(logits, targets, lse, grad_rows, tr, v0)
    gp = _g_plain(logits, targets, lse, grad_rows, tr, v0, dtype).double()
    assert torch.isfinite(out).all()
    assert_within_torch_error("dW", out, (prev + gp.T @ h.double()).to(out.dtype), prev + g64.T @ h.double())
    if with_bias:
        assert torch.isfinite(d_bias).all()
        # d_bias sums the unrounded fp32 G: as accurate as fp32 summation, whatever the compute dtype
        truth_b = prev_b + g64.sum(0)
        plain_b = (prev_b + g64.float().sum(0).double()).to(d_bias.dtype)
        assert_within_torch_error("d_bias", d_bias, plain_b, truth_b)


def _fused_step(h, w, b, targets, grad_rows, tr, *, config=TINY):
    """Forward over the slabs keeping the logits, then both gradient GEMMs per slab (fast mode's sequence)."""
    n, vocab = h.shape[0], w.shape[0]
    logits = fg.logits_buffer(n, vocab, h.dtype).fill_(math.nan)
    st = _fold(h, w, b, targets, tr, config=config, logits_out=logits)
    lse = (st["row_max"], st["row_sumexp"].log())  # the two parts the passes hand over
    dh = torch.full((n, h.shape[1]), math.nan)
    dw = torch.full(w.shape, math.nan)
    db = torch.full((vocab,), math.nan)
    for v0, v1 in SLABS:
        fg.linear_grad_input(logits[:, v0:v1], targets, *lse, grad_rows, w[v0:v1], dh, vocab_start=v0,
                             **tr.kwargs(), accumulate=v0 > 0, config=config)
        fg.linear_grad_weight(logits[:, v0:v1], targets, *lse, grad_rows, h, dw[v0:v1], db[v0:v1], vocab_start=v0,
                              **tr.kwargs(), accumulate=False, config=config)
    return st, logits, dh, dw, db


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_forward_and_backward_match_float64_autograd(dtype):
    """Forward stats + stored logits + gradient GEMMs = d(sum g·logp)/d(h, W, b) of the materialised float64 model."""
    dtype = DTYPES[dtype]
    h, w, b, targets = _inputs(dtype=dtype)
    grad_rows = torch.randn(N) * (targets >= 0)
    _, _, dh, dw, db = _fused_step(h, w, b, targets, grad_rows, CAPPED)

    def grads(hh, ww, bb):
        hh, ww, bb = (t.detach().requires_grad_() for t in (hh, ww, bb))
        y = torch.addmm(bb, hh, ww.T)
        logp = torch.log_softmax(CAPPED.z(y.to(torch.promote_types(y.dtype, torch.float32))), -1)
        logp = logp.gather(1, targets.clamp(min=0)[:, None])[:, 0]
        (logp * grad_rows.to(logp.dtype)).sum().backward()
        return hh.grad, ww.grad, bb.grad

    truth = grads(h.double(), w.double(), b.double())
    plain = grads(h, w, b)
    for name, ours, p, t in zip(("dH", "dW", "db"), (dh, dw, db), plain, truth):
        assert torch.isfinite(ours).all(), name
        assert_within_torch_error(name, ours, p, t)


def test_fused_kernels_are_deterministic():
    """Two runs, bit-identical statistics, stored logits and gradients (no atomics; fixed merge order)."""
    h, w, b, targets = _inputs(20, dtype=torch.bfloat16)
    grad_rows = torch.randn(20) * (targets >= 0)
    first = _fused_step(h, w, b, targets, grad_rows, CAPPED)
    second = _fused_step(h, w, b, targets, grad_rows, CAPPED)
    for name in first[0]:
        if first[0][name] is not None:
            assert torch.equal(first[0][name].nan_to_num(7.0), second[0][name].nan_to_num(7.0)), name
    for a, c in zip(first[1:], second[1:]):
        assert torch.equal(a, c)


def _unique(configs):
    seen = []
    for c in configs:
        if c not in seen:
            seen.append(c)
    return seen


def _config_cases():
    cases = []
    for kind in ("fold", "grad_input", "grad_weight"):
        for dtype in (torch.bfloat16, torch.float32):
            ragged = [fg.RAGGED_STORE_CONFIGS[dtype]] if kind == "fold" else []
            shipped = [c for arch in fg.ARCHS
                       for c in (fg.DEFAULT_CONFIGS[arch][kind][dtype], *fg.AUTOTUNE_CONFIGS[arch][kind][dtype])]
            for c in _unique([*shipped, *ragged]):
                cases.append(pytest.param(kind, dtype, c, id=f"{kind}-{str(dtype)[6:]}-{c.block_m}x{c.block_n}x"
                                                             f"{c.block_k}w{c.num_warps}s{c.num_stages}g{c.group_m}"))
    return cases


@pytest.mark.parametrize(("kind", "dtype", "config"), _config_cases() if HAS_TRITON else [])
def test_every_shipped_config_is_correct(kind, dtype, config):
    """The default and every autotune candidate, blocks far larger than this problem (all tails masked)."""
    n, hidden, vs = 20, 40, 50
    h, w, b, targets = _inputs(n, hidden, vs, dtype)
    grad_rows = torch.randn(n)
    y = _y64(h, w, b)
    lse = torch.logsumexp(CAPPED.z(y), 1).float()
    if kind == "fold":
        logits = fg.logits_buffer(n, vs, dtype).fill_(math.nan)
        st = _fold(h, w, b, targets, CAPPED, slabs=((0, vs),), config=config, logits_out=logits)
        plain_y = torch.addmm(b, h, w.T)
        assert_within_torch_error("logits_out", logits, plain_y, y)
        # statistics of the logits rounded to the compute dtype (what the gradient reads back): those of the
        # materialised plain tile, to fp32 rounding
        ours, (plain, _) = _outputs(st, targets, vs), _truth_outputs(CAPPED.z(plain_y.double()), targets)
        for name in ("lse", "logp", "mean", "entropy"):
            assert rel_err(ours[name], plain[name]) < 1e-5, name
        assert torch.equal(ours["top1"], plain["top1"])
        return
    logits = fg.logits_buffer(n, vs, dtype).copy_(y)
    g64 = _g64(logits, targets, lse, grad_rows, CAPPED, 0)
    gp = _g_plain(logits, targets, lse, grad_rows, CAPPED, 0, dtype).double()
    if kind == "grad_input":
        out = torch.full((n, hidden), math.nan)
        fg.linear_grad_input(logits, targets, *_split(lse), grad_rows, w, out, vocab_start=0, **CAPPED.kwargs(),
                             accumulate=False, config=config)
        assert_within_torch_error("dH", out, gp @ w.double(), g64 @ w.double())
    else:
        out, db = torch.full((vs, hidden), math.nan), torch.full((vs,), math.nan)
        fg.linear_grad_weight(logits, targets, *_split(lse), grad_rows, h, out, db, vocab_start=0, **CAPPED.kwargs(),
                              accumulate=False, config=config)
        assert_within_torch_error("dW", out, gp.T @ h.double(), g64.T @ h.double())
        assert rel_err(db, g64.sum(0)) < 1e-5


def test_fold_splits_plans():
    """Split plans: whole aligned column ranges covering the slab, and a schedule close to perfect waves."""
    # llama3-8b-1k, one slab of the whole vocabulary: 48 row blocks, 1002 units of 128 columns, 132 SMs. 1..7 splits
    # give 36%, 73%, 55%, 73%, 91%, 73%, 84% of perfect waves; 8 splits of 126 units (384 programs in 3 waves) give
    # 24048 / (3·132·126) = 96% >= SPLIT_EFFICIENCY.
    assert fg.fold_splits(6144, 128256, 128, 128, 132) == (8, 126 * 128)
    for n, cols, block_m, align, sms in [(6144, 10752, 128, 128, 132), (24576, 128256, 128, 128, 132),
                                         (37, 70, 16, 16, 132), (12288, 32000, 64, 256, 108), (1, 5, 16, 16, 132)]:
        splits, split_cols = fg.fold_splits(n, cols, block_m, align, sms)
        assert split_cols % align == 0 and splits >= 1
        assert (splits - 1) * split_cols < cols <= splits * split_cols  # every split non-empty, all columns covered
    # a tiny problem (fewer programs than SMs) takes one block per split: the widest grid
    assert fg.fold_splits(37, 70, 16, 16, 132) == (5, 16)


def test_autotune_runs_only_when_asked(monkeypatch):
    """Without FASTPREF_AUTOTUNE the fixed default config is launched; with it, triton.autotune over every candidate
    (keyed on the binned sizes, restoring the outputs an accumulating launch reads); a forced config wins over both.
    tests/test_fused_gemm_aot.py records what the launchers really launch in both settings."""
    monkeypatch.delenv(fg.AUTOTUNE_ENV, raising=False)
    for kind in ("fold", "grad_input", "grad_weight"):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for arch in fg.ARCHS:
                kernel, meta, candidates = fg._select(kind, dtype, None, arch=arch)
                assert kernel is fg._KERNELS[kind] and meta == fg.DEFAULT_CONFIGS[arch][kind][dtype].meta()
                assert candidates == (fg.DEFAULT_CONFIGS[arch][kind][dtype],)
    monkeypatch.setenv(fg.AUTOTUNE_ENV, "1")
    kernel, meta, candidates = fg._select("grad_weight", torch.bfloat16, None, restore=("p_out", "p_dbias"))
    assert meta == {} and candidates == fg.AUTOTUNE_CONFIGS[fg.DEFAULT_ARCH]["grad_weight"][torch.bfloat16]
    assert kernel.keys == ["n_rows_bin", "n_cols", "hidden_size"] and kernel.restore_value == ["p_out", "p_dbias"]
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
            for c in kernel.configs] == [(c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages)
                                         for c in candidates]
    assert fg._select("fold", torch.float32, None)[0].fn is fg._KERNELS["fold"]
    forced = fg.GemmConfig(32, 64, 32)
    assert fg._select("fold", torch.bfloat16, forced) == (fg._KERNELS["fold"], forced.meta(), (forced,))
    monkeypatch.setenv(fg.AUTOTUNE_ENV, "0")
    assert not fg.autotune_enabled()


def test_ragged_stored_slab_takes_the_light_config(monkeypatch):
    """Stored logits of a slab width that is no multiple of 16 launch RAGGED_STORE_CONFIGS (the default would spill
    on sm_80, tests/test_fused_gemm_aot.py); other folds the default."""
    monkeypatch.delenv(fg.AUTOTUNE_ENV, raising=False)
    launched = []
    monkeypatch.setattr(fg, "launch", lambda kernel, grid, *args, **kw: launched.append(kw))
    h, w, b, targets = _inputs(8, 16, 40, torch.bfloat16)
    for width, store in ((40, True), (32, True), (40, False)):
        st = _stats(8)
        out = fg.logits_buffer(8, width, torch.bfloat16) if store else None
        fg.linear_fold(h, w[:width], b[:width], targets, **st, vocab_start=0, **PLAIN.kwargs(), logits_out=out)
    ragged, default = fg.RAGGED_STORE_CONFIGS[torch.bfloat16], fg.DEFAULT_CONFIGS[fg.DEFAULT_ARCH]["fold"][
        torch.bfloat16]
    gemm = [kw["BLOCK_N"] for kw in launched if "BLOCK_M" in kw]
    assert gemm == [ragged.block_n, default.block_n, default.block_n]
    assert fg.default_config("fold", torch.float32, ragged_store=True) == fg.RAGGED_STORE_CONFIGS[torch.float32]
    assert fg.default_config("grad_input", torch.float32, ragged_store=True) == fg.DEFAULT_CONFIGS[fg.DEFAULT_ARCH][
        "grad_input"][torch.float32]


def test_configs_follow_the_target_arch(monkeypatch):
    """Each target launches its own table: sm_90 (and any Hopper) the wgmma configs, everything else sm_80's; a
    non-CUDA launch the DEFAULT_ARCH's unless target_arch says otherwise (the ahead-of-time compile's recording)."""
    monkeypatch.delenv(fg.AUTOTUNE_ENV, raising=False)
    assert [fg.config_arch(a) for a in (80, 86, 89, 90, 100, 120)] == [80, 80, 80, 90, 80, 80]
    meta = torch.device("meta")
    assert fg.device_arch(meta) == fg.DEFAULT_ARCH
    launched = []
    monkeypatch.setattr(fg, "launch", lambda kernel, grid, *args, **kw: launched.append(kw))
    n, vs, hidden = 8, 32, 16
    logits, w = fg.logits_buffer(n, vs, torch.bfloat16, "meta"), torch.empty(vs, hidden, dtype=torch.bfloat16,
                                                                               device="meta")
    vec = dict(device="meta", dtype=torch.float32)
    for arch in (80, 90):
        with fg.target_arch(arch):
            assert fg.device_arch(meta) == arch
            fg.linear_grad_input(logits, torch.empty(n, dtype=torch.int64, device="meta"), torch.empty(n, **vec),
                                 torch.empty(n, **vec), torch.empty(n, **vec), w, torch.empty(n, hidden, **vec),
                                 vocab_start=0,
                                 logit_scale=1.0, softcap=None, inv_temperature=1.0, accumulate=False)
    assert fg.device_arch(meta) == fg.DEFAULT_ARCH
    assert [kw["BLOCK_K"] for kw in launched] == [fg.DEFAULT_CONFIGS[a]["grad_input"][torch.bfloat16].block_k
                                                  for a in (80, 90)]
    assert fg.DEFAULT_CONFIGS[80]["grad_input"][torch.bfloat16] != fg.DEFAULT_CONFIGS[90]["grad_input"][torch.bfloat16]
    with pytest.raises(ValueError, match="arch"):
        with fg.target_arch("sm_90"):
            pass


def test_empty_and_degenerate_sizes():
    """n = 0 or Vs = 0: the fold changes nothing; an empty K loop still writes (or keeps) the gradient; H = 0 still
    gives d_bias; the fold of H = 0 is the bias alone."""
    st = _stats(4)
    h, w, b, targets = _inputs(4, 16, 20, torch.float32)
    fg.linear_fold(h, w[:0], b[:0], targets, **st, vocab_start=0, **PLAIN.kwargs(), config=TINY)
    assert torch.isinf(st["row_max"]).all() and (st["row_sumexp"] == 0).all()
    lse, g = torch.zeros(4), torch.ones(4)
    out = torch.full((4, 16), math.nan)
    fg.linear_grad_input(torch.empty(4, 0), targets, *_split(lse), g, w[:0], out, vocab_start=0, **PLAIN.kwargs(),
                         accumulate=False, config=TINY)
    assert (out == 0).all()
    prev, prev_b = torch.randn(20, 16), torch.randn(20)
    out, db = prev.clone(), prev_b.clone()
    fg.linear_grad_weight(torch.empty(0, 20), targets[:0], *_split(lse[:0]), g[:0], h[:0], out, db, vocab_start=0,
                          **PLAIN.kwargs(), accumulate=True, config=TINY)
    assert torch.equal(out, prev) and torch.equal(db, prev_b)  # + 0
    fg.linear_grad_weight(torch.empty(0, 20), targets[:0], *_split(lse[:0]), g[:0], h[:0], out, db, vocab_start=0,
                          **PLAIN.kwargs(), accumulate=False, config=TINY)
    assert (out == 0).all() and (db == 0).all()
    # H = 0: the logits are the bias
    st = _stats(4)
    fg.linear_fold(h[:, :0], w[:, :0], b, targets, **st, vocab_start=0, **PLAIN.kwargs(), config=TINY)
    torch.testing.assert_close(st["row_max"] + st["row_sumexp"].log(), torch.logsumexp(b, 0).expand(4))
    logits = fg.logits_buffer(4, 20, torch.float32).copy_(b.expand(4, 20))
    lse = torch.logsumexp(logits, 1)
    db = torch.full((20,), math.nan)
    fg.linear_grad_weight(logits, targets, *_split(lse), g, h[:, :0], torch.empty(20, 0), db, vocab_start=0,
                          **PLAIN.kwargs(), accumulate=False, config=TINY)
    torch.testing.assert_close(db.double(), _g64(logits, targets, lse, g, PLAIN, 0).sum(0), rtol=1e-5, atol=1e-6)


def test_int64_offsets():
    """Every matrix a 3-row view whose third row starts past 2^31 elements (row stride 2^30 + 16, an int32 value):
    int32 offset arithmetic (row · stride) would wrap and read or write the wrong memory. One storage holds all of
    them side by side; the untouched pages stay virtual."""
    stride, hidden, vs = 2**30 + 16, 20, 24
    storage = torch.empty(2 * stride + 200, dtype=torch.bfloat16)

    def view(col, cols):
        return storage[col:].as_strided((3, cols), (stride, 1))

    h, w, logits, dh, dw = view(0, hidden), view(32, hidden), view(64, vs), view(96, hidden), view(128, hidden)
    g = torch.Generator().manual_seed(5)
    h.copy_(_cpu_randn(3, hidden, g=g))
    w.copy_(_cpu_randn(3, hidden, g=g) / 4)
    w_full = torch.cat([w, _cpu_randn(vs - 3, hidden, g=g).bfloat16() / 4])  # contiguous remainder
    targets = torch.tensor([1, 2, 0])
    st = _stats(3)
    fg.linear_fold(h, w, None, targets, **st, vocab_start=0, **PLAIN.kwargs(), logits_out=logits[:, :3],
                   config=TINY)
    y = _y64(h, w, None)
    torch.testing.assert_close(logits[:, :3].double(), y, rtol=2**-8, atol=1e-3)
    # the fold reads the logits rounded to bf16, the values it stored
    torch.testing.assert_close((st["row_max"] + st["row_sumexp"].log()).double(),
                               torch.logsumexp(logits[:, :3].double(), 1))
    # gradients: the stored logits (strided) are read, dH and dW (strided) are written
    logits.copy_((h.float() @ w_full.float().T).bfloat16())
    lse = torch.logsumexp(logits.float(), 1)
    grad_rows = torch.tensor([1.0, -2.0, 0.5])
    g64 = _g64(logits, targets, lse, grad_rows, PLAIN, 0)
    fg.linear_grad_input(logits, targets, *_split(lse), grad_rows, w_full, dh, vocab_start=0, **PLAIN.kwargs(),
                         accumulate=False, config=TINY)
    torch.testing.assert_close(dh.double(), g64 @ w_full.double(), rtol=2e-2, atol=2e-2)
    fg.linear_grad_weight(logits[:, :3], targets, *_split(lse), grad_rows, h, dw, None, vocab_start=0, **PLAIN.kwargs(),
                          accumulate=False, config=TINY)
    torch.testing.assert_close(dw.double(), g64[:, :3].T @ h.double(), rtol=2e-2, atol=2e-2)


def _cpu(*tensors):
    return [t.cpu() for t in tensors]


def _bad_fold_calls():  # built at collection, on the CPU: every call raises before any launch
    h, w, b, t = _cpu(*_inputs(4, 16, 20, torch.bfloat16))
    st = _stats(4)
    kw = dict(vocab_start=0, **PLAIN.kwargs())

    def call(**over):
        args = dict(hidden=h, weight=w, bias=b, targets=t, **st)
        args.update({k: v for k, v in over.items() if k in args})
        kwargs = {**kw, **{k: v for k, v in over.items() if k not in args}}
        return lambda: fg.linear_fold(**args, **kwargs)

    cases = [
        ("hidden-not-tensor", call(hidden=h.tolist()), TypeError, r"hidden: expected a torch.Tensor, got list"),
        ("hidden-fp64", call(hidden=h.double()), TypeError, r"hidden: expected a compute dtype .* got torch.float64"),
        ("weight-hidden-size", call(weight=w[:, :8]), ValueError, r"weight: expected shape \[\*, 16\], got \(20, 8\)"),
        ("weight-dtype", call(weight=w.half()), TypeError, r"weight: expected dtype torch.bfloat16, got torch.float16"),
        ("weight-strided", call(weight=w.T.contiguous().T), ValueError, r"weight: expected unit column stride"),
        ("bias-shape", call(bias=b[:5]), ValueError, r"bias: expected shape \[20\], got \(5,\)"),
        ("targets-int32", call(targets=t.int()), TypeError, r"targets: expected dtype torch.int64, got torch.int32"),
        ("row-max-fp16", call(row_max=st["row_max"].half()), TypeError, r"row_max: expected dtype torch.float32"),
        ("entropy-shape", call(entropy_acc=torch.zeros(3)), ValueError, r"entropy_acc: expected shape \[4\]"),
        ("logits-shape", call(logits_out=torch.empty(4, 19, dtype=torch.bfloat16)), ValueError,
         r"logits_out: expected shape \[4, 20\], got \(4, 19\)"),
        ("logits-device", call(logits_out=torch.empty(4, 20, dtype=torch.bfloat16, device="meta")), ValueError,
         r"logits_out: expected a tensor on \S+, got one on meta"),
        ("logits-unaligned", call(logits_out=torch.empty(4, 20, dtype=torch.bfloat16)), ValueError,
         r"logits_out: expected aligned rows .* divisible by 16 elements\), got row stride 20 "),
        ("softcap-zero", call(softcap=0.0), ValueError, r"softcap: expected None or a finite float > 0, got 0.0"),
        ("scale-inf", call(logit_scale=math.inf), ValueError, r"logit_scale: expected a finite float, got inf"),
        ("vocab-start", call(vocab_start=-1), ValueError, r"vocab_start: expected an int >= 0, got -1"),
        ("splits", call(num_splits=0), ValueError, r"num_splits: expected None or an int >= 1, got 0"),
        ("config-type", call(config=(16, 16, 16)), TypeError, r"config: expected a GemmConfig or None, got tuple"),
    ]
    return [pytest.param(*c[1:], id=c[0]) for c in cases]


def _bad_grad_calls():
    h, w, _, t = _inputs(4, 16, 32, torch.bfloat16, bias=False)
    h, w, t = _cpu(h, w, t)
    logits, lse, g = (h.float() @ w.float().T).bfloat16(), torch.zeros(4), torch.ones(4)
    kw = dict(vocab_start=0, **PLAIN.kwargs(), accumulate=False)
    rows = dict(logits=logits, targets=t, row_max=lse, log_sumexp=lse, grad_rows=g)
    gi = lambda **o: lambda: fg.linear_grad_input(**{**rows, "weight": w, "out": torch.empty(4, 16), **kw, **o})
    gw = lambda **o: lambda: fg.linear_grad_weight(**{**rows, "hidden": h, "out": torch.empty(32, 16), **kw, **o})
    cases = [
        ("gi-out-fp64", gi(out=torch.empty(4, 16, dtype=torch.float64)), TypeError,
         r"out: expected dtype torch.float32 or torch.bfloat16, got torch.float64"),
        ("gi-out-shape", gi(out=torch.empty(4, 15)), ValueError, r"out: expected shape \[4, 16\], got \(4, 15\)"),
        ("gi-weight-vocab", gi(weight=w[:19]), ValueError, r"weight: expected shape \[32, \*\], got \(19, 16\)"),
        ("gi-logits-unaligned", gi(logits=logits[:, 1:], weight=w[1:]), ValueError,
         r"logits: expected aligned rows .* fastpref.kernels.fused_gemm.logits_buffer"),
        ("gi-lse-dtype", gi(log_sumexp=lse.double()), TypeError,
         r"log_sumexp: expected dtype torch.float32, got torch.float64"),
        ("gw-max-shape", gw(row_max=lse[:3]), ValueError, r"row_max: expected shape \[4\], got \(3,\)"),
        ("gi-accumulate", gi(accumulate=1), TypeError, r"accumulate: expected a bool, got int"),
        ("gi-logits-fp64", gi(logits=logits.double()), TypeError, r"logits: expected a compute dtype"),
        ("gw-grad-shape", gw(grad_rows=g[:3]), ValueError, r"grad_rows: expected shape \[4\], got \(3,\)"),
        ("gw-hidden-rows", gw(hidden=h[:3]), ValueError, r"hidden: expected shape \[4, \*\], got \(3, 16\)"),
        ("gw-dbias-shape", gw(d_bias=torch.empty(19)), ValueError, r"d_bias: expected shape \[32\], got \(19,\)"),
        ("gw-dbias-noncontig", gw(d_bias=torch.empty(64)[::2]), ValueError, r"d_bias: expected a contiguous vector"),
        ("gw-softcap-nan", gw(softcap=math.nan), ValueError, r"softcap: expected None or a finite float > 0, got nan"),
    ]
    return [pytest.param(*c[1:], id=c[0]) for c in cases]


@pytest.mark.parametrize(("call", "exc", "match"), (_bad_fold_calls() + _bad_grad_calls()) if HAS_TRITON else [])
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_logits_buffer_rows_are_aligned(dtype):
    dtype = DTYPES[dtype]
    buf = fg.logits_buffer(5, 33, dtype)
    assert buf.shape == (5, 33) and buf.dtype == dtype
    assert buf.stride(0) >= 33 and buf.stride(0) % 16 == 0 and buf.data_ptr() % 16 == 0
    assert buf[:, 16:].data_ptr() % 16 == 0


@pytest.mark.parametrize(("field", "value"), [("block_m", 24), ("block_k", 8), ("num_warps", 0)])
def test_gemm_config_validates(field, value):
    kwargs = dict(block_m=16, block_n=16, block_k=16)
    kwargs[field] = value
    with pytest.raises(ValueError, match=rf"GemmConfig.{field}: expected .* got {value}"):
        fg.GemmConfig(**kwargs)
