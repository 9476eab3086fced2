"""fastpref.KTOLoss (trl 1.16's KTO losses from hidden states and the head) against a float64 materialised truth:
every loss type, fast and lean, every gradient, odd shapes, fp32 / bf16 / fp16 at logit std 10-30; the metrics
under TRL's names; the KL pass; reference equal to the policy; FLOPs; bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import fastpref
from fastpref import reference as R
from fastpref.testing import assert_within_torch_error, make_labels
from tests.helpers import PATH_IDS, PATHS

pytestmark = pytest.mark.usefixtures("one_thread")

LOSS_TYPES = list(fastpref.losses.UNPAIRED_LOSS_TYPES)


def make(batch=5, seq_len=11, hidden_size=13, vocab=97, dtype=torch.float32, scale=1.0, seed=0, bias=True):
    """Odd shapes; ``scale`` sets the logits' std (≈ scale · sqrt(H) · |w|, here ≈ scale)."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(batch, seq_len, hidden_size, generator=g) * scale).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden_size, generator=g) / hidden_size ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=g).to(dtype).requires_grad_() if bias else None
    y = make_labels(batch, seq_len, vocab, generator=g)
    ref_h = (h.detach().float() + 0.3 * scale * torch.randn(h.shape, generator=g)).to(dtype)
    kl_h = (torch.randn(batch, seq_len + 2, hidden_size, generator=g) * scale).to(dtype)
    kl_ref_h = (kl_h.float() + 0.5 * scale * torch.randn(kl_h.shape, generator=g)).to(dtype)
    kl_y = make_labels(batch, seq_len + 2, vocab, generator=g)
    desirable = torch.rand(batch, generator=g) < 0.6
    desirable[0], desirable[1] = True, False  # both kinds present
    return dict(h=h, w=w, b=b, y=y, ref_h=ref_h, kl_h=kl_h, kl_ref_h=kl_ref_h, kl_y=kl_y, d=desirable)


def truth(x, loss_type, *, dtype=torch.float64, beta=0.1, w_d=1.0, w_u=1.0):
    """TRL 1.16 KTOTrainer._compute_loss in its own order on materialised logits in ``dtype`` (float64: the
    truth; the inputs' dtype: plain torch). Returns (loss, kl, grads of h, w, b)."""
    h, w = x["h"].detach().to(dtype).requires_grad_(), x["w"].detach().to(dtype).requires_grad_()
    b = None if x["b"] is None else x["b"].detach().to(dtype).requires_grad_()
    bb = None if b is None else b.detach()
    lp = R.token_logps(h, w, x["y"], bias=b).sum(-1)
    with torch.no_grad():
        ref = R.token_logps(x["ref_h"].to(dtype), w.detach(), x["y"], bias=bb).sum(-1)
        kl_lp = R.token_logps(x["kl_h"].to(dtype), w.detach(), x["kl_y"], bias=bb).sum(-1)
        kl_ref = R.token_logps(x["kl_ref_h"].to(dtype), w.detach(), x["kl_y"], bias=bb).sum(-1)
    kl = (kl_lp - kl_ref).mean().clamp(min=0) if loss_type == "kto" else torch.zeros((), dtype=lp.dtype)
    ch, rj = x["d"].nonzero().view(-1), (~x["d"]).nonzero().view(-1)
    rc, rr = (lp - ref)[ch], (lp - ref)[rj]
    if loss_type == "kto":
        lc, lr = 1 - F.sigmoid(beta * (rc - kl)), 1 - F.sigmoid(beta * (kl - rr))
    else:
        lc, lr = 1 - F.sigmoid(beta * rc), F.sigmoid(beta * rr)
    loss = torch.cat((w_d * lc, w_u * lr)).nanmean()
    wrt = [t for t in (h, w, b) if t is not None]
    return loss, kl, torch.autograd.grad(loss, wrt), lp.detach(), ref


def ours(x, loss_type, mode, **kw):
    fn = fastpref.KTOLoss(loss_type, mode=mode, token_metrics=True, **kw)
    out = fn(x["h"], x["w"], x["y"], x["d"], ref_hidden=x["ref_h"], bias=x["b"], kl_hidden=x["kl_h"],
             kl_labels=x["kl_y"], kl_ref_hidden=x["kl_ref_h"])
    wrt = [t for t in (x["h"], x["w"], x["b"]) if t is not None]
    return out, torch.autograd.grad(out.loss, wrt)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("mode", ["fast", "lean"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)], ids=["w1", "w_unequal"])
def test_fp32_matches_float64(loss_type, mode, weights):
    x = make(scale=3.0, seed=hash((loss_type, mode)) % 100)
    out, grads = ours(x, loss_type, mode, desirable_weight=weights[0], undesirable_weight=weights[1], beta=0.2)
    assert out.mode == mode
    loss64, kl64, g64, lp64, ref64 = truth(x, loss_type, beta=0.2, w_d=weights[0], w_u=weights[1])
    assert out.loss.item() == pytest.approx(loss64.item(), rel=1e-5, abs=1e-7)
    assert out.kl.item() == pytest.approx(kl64.item(), rel=1e-4, abs=1e-5)
    torch.testing.assert_close(out.logps.double(), lp64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.rewards.double(), 0.2 * (lp64 - ref64), rtol=1e-4, atol=1e-5)
    for name, g, t in zip(("d_hidden", "d_weight", "d_bias"), grads, g64):
        torch.testing.assert_close(g.double(), t, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("mode", ["fast", "lean"])
@pytest.mark.parametrize(("dtype", "scale"), [(torch.bfloat16, 10.0), (torch.bfloat16, 30.0), (torch.float16, 10.0)],
                         ids=["bf16-std10", "bf16-std30", "fp16-std10"])
def test_low_precision_within_torch_error(loss_type, mode, dtype, scale):
    """Peaked logits: fastpref's error vs float64 within 2x plain torch's in the same dtype (+ small atol)."""
    x = make(batch=4, seq_len=9, hidden_size=16, vocab=131, dtype=dtype, scale=scale, seed=3)
    out, grads = ours(x, loss_type, mode, beta=0.05)
    loss64, _, g64, lp64, _ = truth(x, loss_type, beta=0.05)
    loss_p, _, g_p, lp_p, _ = truth(x, loss_type, dtype=dtype, beta=0.05)
    assert_within_torch_error("logps", out.logps, lp_p, lp64, atol=1e-5)
    assert_within_torch_error("loss", out.loss, loss_p, loss64, atol=1e-5)
    for name, g, p, t in zip(("d_hidden", "d_weight", "d_bias"), grads, g_p, g64):
        assert g.dtype == dtype
        assert_within_torch_error(name, g, p, t, atol=1e-4)


def test_metrics_have_trl_names_and_values():
    x = make(scale=2.0)
    out, _ = ours(x, "kto", "fast", beta=0.1)
    assert set(out.metrics) == set(fastpref.kto.KTO_METRICS)
    _, kl64, _, lp64, ref64 = truth(x, "kto")
    d = x["d"]
    rewards = 0.1 * (lp64 - ref64)
    want = {"rewards/chosen": rewards[d].mean(), "rewards/rejected": rewards[~d].mean(),
            "logps/chosen": lp64[d].mean(), "logps/rejected": lp64[~d].mean(), "kl": kl64}
    want["rewards/margins"] = want["rewards/chosen"] - want["rewards/rejected"]
    with torch.no_grad():
        z = R.logits(x["h"].double(), x["w"].double(), x["b"].double())
        mask = x["y"] != -100
        stats = R.token_statistics(z, x["y"])
        dm = d[:, None] & mask
        want["logits/chosen"] = stats.mean_logits[dm].mean()
        want["logits/rejected"] = stats.mean_logits[~d[:, None] & mask].mean()
        want["entropy"] = stats.entropy[mask].mean()
    for k, v in want.items():
        assert out.metrics[k].item() == pytest.approx(v.item(), rel=1e-4, abs=1e-5), k


@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_reference_equal_to_policy_gives_exactly_zero_rewards(mode):
    x = make(batch=6, scale=5.0)
    fn = fastpref.KTOLoss("apo_zero_unpaired", mode=mode)
    ref = fn.score(x["h"].detach(), x["w"].detach(), x["y"], bias=x["b"].detach())
    out = fn(x["h"], x["w"], x["y"], x["d"], ref, bias=x["b"])
    assert out.mode == mode
    assert (out.rewards == 0).all()
    out_h = fn(x["h"], x["w"], x["y"], x["d"], ref_hidden=x["h"].detach(), bias=x["b"])
    assert (out_h.rewards == 0).all()


def test_forward_only_and_given_kl():
    x = make(scale=2.0)
    fn = fastpref.KTOLoss("kto")
    with torch.no_grad():
        a = fn(x["h"], x["w"], x["y"], x["d"], ref_hidden=x["ref_h"], bias=x["b"], kl=0.25)
    assert a.mode == "forward" and a.kl.item() == 0.25
    b = fn(x["h"], x["w"], x["y"], x["d"], ref_hidden=x["ref_h"], bias=x["b"], kl=torch.tensor([0.25]))
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-6)
    losses, _ = fastpref.losses.kto(a.logps, a.ref_logps, x["d"], 0.25)
    torch.testing.assert_close(a.losses, losses)


def test_bound_loss_runs_inside_a_patched_model():
    """``KTOLoss.bind`` is what the fused head's ``preference_loss=`` takes (the trainer's path)."""
    from fastpref.integrations.fused_head import add_fused_lm_head
    from fastpref.testing.toy import toy_llama, toy_tokenizer

    tok = toy_tokenizer()
    model = add_fused_lm_head(toy_llama(tok, hidden_size=32))
    ids = torch.randint(0, len(tok), (3, 7))
    labels = ids.masked_fill(torch.arange(7) < 3, -100)
    fn = fastpref.KTOLoss("kto")
    desirable = torch.tensor([True, False, True])
    ref = model(input_ids=ids, labels=labels, preference_loss=fn.bind(desirable), score_only=True).sequence_logps
    out = model(input_ids=ids, labels=labels, preference_loss=fn.bind(desirable, kl=0.1), ref_logps=ref)
    assert (out.preference.rewards == 0).all()
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        lp = R.token_logps(hidden.double(), model.lm_head.weight.double(), labels[:, 1:]).sum(-1)
    losses, _ = fastpref.losses.kto(lp.float(), lp.float(), desirable, 0.1)
    assert out.loss.item() == pytest.approx(losses.mean().item(), rel=1e-5)


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize(("mode", "policy_units"), [("fast", 6), ("lean", 8)])
def test_flops(mode, policy_units):
    """Policy fwd+bwd 6·n·H·V (fast) / 8·n·H·V (lean); reference 2·n·H·V; the KL pass 2·n'·H·V twice."""
    x = make(batch=5, seq_len=12, hidden_size=16, vocab=200, bias=False)
    hidden_size, vocab = 16, 200
    unit = int((x["y"] != -100).sum()) * hidden_size * vocab
    kl_unit = int((x["kl_y"] != -100).sum()) * hidden_size * vocab
    fn = fastpref.KTOLoss("kto", mode=mode, backend="torch")

    def step():
        out = fn(x["h"], x["w"], x["y"], x["d"], ref_hidden=x["ref_h"], kl_hidden=x["kl_h"], kl_labels=x["kl_y"],
                 kl_ref_hidden=x["kl_ref_h"])
        assert out.mode == mode
        out.loss.backward()

    assert _count(step) == (policy_units + 2) * unit + 4 * kl_unit


def test_odd_batch_and_empty_sequence():
    x = make(batch=3, scale=2.0)
    x["y"][2] = -100  # nothing scored: log-prob 0, finite loss and no gradient for that row
    out, grads = ours(x, "kto", "fast")
    assert out.logps[2] == 0 and torch.isfinite(out.loss) and grads[0][2].abs().max() == 0
    loss64, *_ = truth(x, "kto")
    assert out.loss.item() == pytest.approx(loss64.item(), rel=1e-5)


def test_mode_fast_refuses_a_budget_too_small():
    x = make()
    with pytest.raises(ValueError, match="memory_budget"):
        fastpref.KTOLoss("kto", mode="fast", memory_budget=64)(x["h"], x["w"], x["y"], x["d"], ref_hidden=x["ref_h"],
                                                               kl=0.0)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(loss_type="kto_pair"), "loss_type"),
    (dict(beta=0.0), "beta"),
    (dict(desirable_weight=-1.0), "desirable_weight"),
    (dict(undesirable_weight=float("inf")), "undesirable_weight"),
    (dict(mode="quick"), "mode"),
    (dict(memory_budget=0), "memory_budget"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastpref.KTOLoss(**kwargs)


def test_bad_call_arguments():
    x = make()
    fn = fastpref.KTOLoss("kto")
    call = dict(ref_hidden=x["ref_h"], kl=0.1)
    with pytest.raises(TypeError, match="desirable"):
        fn(x["h"], x["w"], x["y"], x["d"].float(), **call)
    with pytest.raises(TypeError, match="desirable"):
        fn(x["h"], x["w"], x["y"], x["d"][:3], **call)
    with pytest.raises(ValueError, match="kl"):
        fn(x["h"], x["w"], x["y"], x["d"], ref_hidden=x["ref_h"])
    with pytest.raises(ValueError, match="kl"):
        fn(x["h"], x["w"], x["y"], x["d"], ref_hidden=x["ref_h"], kl=-0.5)
    with pytest.raises(ValueError, match="kl"):
        fn(x["h"], x["w"], x["y"], x["d"], ref_hidden=x["ref_h"], kl=torch.zeros(2))
    with pytest.raises(ValueError, match="ref_logps / ref_hidden"):
        fn(x["h"], x["w"], x["y"], x["d"], kl=0.1)
    with pytest.raises(ValueError, match="ref_logps"):
        fn(x["h"], x["w"], x["y"], x["d"], torch.zeros(4), kl=0.1)
    with pytest.raises(ValueError, match="labels"):
        fn(x["h"], x["w"], x["y"], x["d"], ref_hidden=x["ref_h"][:, :4], kl=0.1)
    with pytest.raises(ValueError, match="hidden"):
        fn(x["h"].reshape(-1, x["h"].shape[-1]), x["w"], x["y"].reshape(-1), x["d"], ref_hidden=x["ref_h"], kl=0.1)
    with pytest.raises(ValueError, match="kl_ref"):
        fn(x["h"], x["w"], x["y"], x["d"], ref_hidden=x["ref_h"], kl_hidden=x["kl_h"], kl_labels=x["kl_y"])


@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_memory_nothing_tokens_by_vocab(mode):
    """A KTO step with its KL pass and reference allocates nothing of size tokens x vocabulary beyond fast mode's
    buffer (within ``memory_budget``): lean O(tokens·H + one tile), fast the budget on top."""
    from fastpref.ops.plan import CPU_TILE_BYTES, MiB
    from fastpref.utils.memory import AllocationTracker

    batch, seq_len, hidden_size, vocab = 5, 160, 16, 65536
    g = torch.Generator().manual_seed(0)
    h = torch.randn(batch, seq_len, hidden_size, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden_size, generator=g) / 4).requires_grad_()
    y, kl_y = (make_labels(batch, seq_len, vocab, generator=g) for _ in range(2))
    ref_h, kl_h, kl_ref_h = (torch.randn(batch, seq_len, hidden_size, generator=g) for _ in range(3))
    logits_bytes = int((y != -100).sum()) * vocab * 4
    assert logits_bytes > 100 * MiB
    budget = 64 * MiB
    fn = fastpref.KTOLoss("kto", mode=mode, memory_budget=budget, backend="torch")
    with AllocationTracker(device="cpu") as mem:
        out = fn(h, w, y, torch.tensor([True, False, True, True, False]), ref_hidden=ref_h, kl_hidden=kl_h,
                 kl_labels=kl_y, kl_ref_hidden=kl_ref_h)
        out.loss.backward()
    assert out.mode == mode
    grads = 2 * (h.numel() + w.numel()) * 4
    buffer = budget if mode == "fast" else 0
    assert mem.largest_bytes <= max(buffer, CPU_TILE_BYTES, w.numel() * 4), mem.largest
    assert mem.peak_bytes <= buffer + CPU_TILE_BYTES + grads < logits_bytes, mem.summary()


@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_every_gemm_path_matches_float64(backend, gemm, mode):
    """The Triton row kernels and the fused GEMMs (interpreted on the CPU) run the same KTO step."""
    x = make(batch=3, seq_len=6, hidden_size=8, vocab=40, scale=2.0, seed=11)
    out, grads = ours(x, "kto", mode, backend=backend, gemm=gemm)
    assert out.mode == mode
    loss64, _, g64, _, _ = truth(x, "kto")
    assert out.loss.item() == pytest.approx(loss64.item(), rel=1e-5, abs=1e-7)
    for name, g, t in zip(("d_hidden", "d_weight", "d_bias"), grads, g64):
        torch.testing.assert_close(g.double(), t, rtol=1e-4, atol=1e-7, msg=name)


def test_fast_mode_over_several_groups():
    """A budget of a few sequences' logits: fast mode runs group by group (odd batch: the empty sequence closes
    the last pair) and equals the float64 truth."""
    x = make(batch=7, seq_len=11, vocab=97, scale=2.0, seed=4)
    budget = 24 * 97 * 4  # about two sequences' logits in fp32
    out, grads = ours(x, "kto", "fast", memory_budget=budget)
    assert out.mode == "fast"
    groups = fastpref.kto._groups(fastpref.kto.KTOLoss("kto", memory_budget=budget).config,
                                  fastpref.kto._policy(fastpref.kto.KTOConfig(), x["h"], x["w"], x["y"], x["b"], {},
                                                       token_metrics=False))[0]
    assert groups is not None and len(groups) > 2
    loss64, _, g64, _, _ = truth(x, "kto")
    assert out.loss.item() == pytest.approx(loss64.item(), rel=1e-5)
    for name, g, t in zip(("d_hidden", "d_weight", "d_bias"), grads, g64):
        torch.testing.assert_close(g.double(), t, rtol=1e-4, atol=1e-7, msg=name)
