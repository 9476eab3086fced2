"""``ops.fast_token_loss``: a loss of per-token log-probs and entropies with its gradients formed in the forward.
Every gradient against float64 at odd shapes (one group and several, on every path; the entropy term on cublas),
bf16 at logit std 10-30 within 2x the materialised torch error, the FLOPs (6·n·H·V) and the memory of an 8k-token
completion at a 152k vocabulary."""

from __future__ import annotations

import pytest
import torch
from fastpref.kernels.launch import count_flops
from torch.utils.flop_counter import FlopCounterMode

from fastpref.losses import policy as P
from fastpref.ops import HeadPass, LogitTransform, build_layout, flat_rows
from fastpref.ops.fast_token_loss import TokenProblem, fast_token_loss, plan_token_groups, token_groups
from fastpref.ops.plan import DEFAULT_BUDGET_CAP
from fastpref.utils.memory import AllocationTracker
from tests.helpers import PATH_IDS, PATHS, assert_within_torch_error

CFG = P.PolicyLossConfig(loss_type="grpo", beta=0.04, epsilon_low=0.2, epsilon_high=0.28, entropy_coef=0.1)
CAPPED = LogitTransform(logit_scale=0.9, softcap=40.0, temperature=0.7)


def _batch(dtype, *, std, batch=3, seq=7, hidden=24, vocab=45, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * (std / hidden**0.5)).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype)
    # completions sampled from the policy, as generation does; the sampler's and the reference's log-probs near
    # the policy's (ratios around 1: some clipped, some not)
    logp = torch.log_softmax(h.double() @ w.double().T + b.double(), -1)
    labels = torch.multinomial(logp.exp().reshape(-1, vocab), 1, generator=gen).reshape(batch, seq)
    token_logp = logp.gather(-1, labels[..., None]).squeeze(-1).float()
    old = token_logp + 0.2 * torch.randn(batch, seq, generator=gen)
    ref = token_logp + 0.2 * torch.randn(batch, seq, generator=gen)
    labels[0, :2] = -100
    labels[-1, 5:] = -100
    mask = (labels != -100).float()
    adv = torch.randn(batch, generator=gen)
    return h, w, b, labels, mask, old, ref, adv


def _policy(logps_bt, ent_bt, mask, old, ref, adv, cfg=CFG):
    """TRL's GRPO loss on [B, T] per-token log-probs and entropies (the truth's and plain torch's formula)."""
    return P.policy_loss(cfg, logps_bt, mask, adv, old_logps=old, ref_logps=ref, entropies=ent_bt).loss


def _token_loss(layout, mask, old, ref, adv, cfg=CFG):
    """The same loss as a sum of per-group terms on the flat scored rows (GRPO is separable per token once the
    token weights are known from the mask)."""
    weights = P.token_weights(cfg, mask).reshape(-1)[layout.index]
    old_r, ref_r = old.reshape(-1)[layout.index], ref.reshape(-1)[layout.index]
    adv_r = adv[:, None].expand_as(mask).reshape(-1)[layout.index]
    m = mask.reshape(-1)[layout.index]
    ent_w = cfg.entropy_coef / mask.sum().clamp(min=1.0)

    def token_loss(lp, ent, rows: slice):
        terms = P.per_token_losses(cfg, lp[None], m[rows][None], adv_r[rows][None], old_logps=old_r[rows][None],
                                   ref_logps=ref_r[rows][None])
        loss = (terms.loss[0] * weights[rows]).sum()
        return loss if ent is None else loss - ent_w * ent.sum()

    return token_loss


def _materialised(h, w, b, labels, mask, old, ref, adv, t: LogitTransform, dtype):
    leaves = [x.detach().to(dtype).requires_grad_(True) for x in (h, w, b)]
    hh, ww, bb = leaves
    y = hh @ ww.T + bb
    y = (y if dtype == torch.float64 else y.float()) * t.logit_scale
    if t.softcap is not None:
        y = t.softcap * torch.tanh(y / t.softcap)
    logp_all = torch.log_softmax(y / t.temperature, -1)
    lp = logp_all.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask.to(logp_all.dtype)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    loss = _policy(lp, ent, mask.to(lp.dtype), old.to(lp.dtype), ref.to(lp.dtype), adv.to(lp.dtype))
    return loss, [x.double() for x in torch.autograd.grad(loss, leaves)]


def _run(h, w, b, labels, mask, old, ref, adv, *, backend, gemm, transform, budget=None, entropy=True):
    hh, ww, bb = (x.detach().clone().requires_grad_(True) for x in (h, w, b))
    cfg = HeadPass.for_inputs(hh, ww, backend=backend, transform=transform, gemm=gemm, with_entropy=entropy)
    layout = build_layout(labels.reshape(-1), ignore_index=-100, vocab_size=w.shape[0])
    groups = token_groups(layout, ww, cfg, memory_budget=budget or (1 << 30))
    problem = TokenProblem(layout, groups, _token_loss(layout, mask, old, ref, adv), cfg, entropy=entropy)
    loss, result = fast_token_loss(flat_rows(hh), ww, bb, problem)
    loss.backward()
    return loss, result, groups, [x.grad.double() for x in (hh, ww, bb)]


@pytest.mark.parametrize("budget", [None, 3 * 45 * 4], ids=["one-group", "groups-of-3-rows"])
@pytest.mark.parametrize("transform", [LogitTransform(), CAPPED], ids=["plain", "capped"])
@pytest.mark.parametrize(("backend", "gemm"), PATHS, ids=PATH_IDS)
def test_fast_token_loss_matches_float64_fp32(backend, gemm, transform, budget):
    """fp32: the loss and every gradient of TRL's GRPO loss (clipping, KL to the reference, entropy bonus) against
    float64 through the materialised logits; several groups split sequences and accumulate dW."""
    batch = _batch(torch.float32, std=3.0)
    loss, _, groups, got = _run(*batch, backend=backend, gemm=gemm, transform=transform, budget=budget)
    assert len(groups) == (1 if budget is None else 6)
    truth_loss, truth = _materialised(*batch, transform, torch.float64)
    plain_loss, plain = _materialised(*batch, transform, torch.float32)
    loss = loss.detach()
    assert abs(float(loss) - float(truth_loss)) <= 2 * abs(float(plain_loss) - float(truth_loss)) + 1e-6
    for name, x, p, ref in zip(("d_hidden", "d_weight", "d_bias"), got, plain, truth):
        assert_within_torch_error(name, x, p, ref, atol=2e-6)


@pytest.mark.parametrize("std", [10.0, 30.0])
@pytest.mark.parametrize(("backend", "gemm"), PATHS[:2], ids=PATH_IDS[:2])
def test_fast_token_loss_bf16_within_torch_error(backend, gemm, std):
    """bf16 at realistic logit scales: within 2x the materialised bf16 torch path's error."""
    batch = _batch(torch.bfloat16, std=std, seed=3)
    _, _, _, got = _run(*batch, backend=backend, gemm=gemm, transform=LogitTransform(), budget=4 * 45 * 2)
    _, truth = _materialised(*batch, LogitTransform(), torch.float64)
    _, plain = _materialised(*batch, LogitTransform(), torch.bfloat16)
    for name, x, p, ref in zip(("d_hidden", "d_weight", "d_bias"), got, plain, truth):
        assert_within_torch_error(name, x, p, ref, atol=2e-3)


def test_fast_token_loss_flops_are_6nhv():
    """Fast mode: one forward GEMM and the two gradient GEMMs per scored row, 6·n·H·V (lean would be 8). One
    group: FlopCounterMode does not count the in-place ``addmm_`` that accumulates dW over several groups."""
    h, w, b, labels, mask, old, ref, adv = _batch(torch.float32, std=3.0, batch=2, seq=9, hidden=16, vocab=300)
    n = int(mask.sum())
    with FlopCounterMode(display=False) as counter, count_flops() as triton_flops:
        _run(h, w, b, labels, mask, old, ref, adv, backend="torch", gemm=None, transform=LogitTransform())
    assert counter.get_total_flops() + sum(triton_flops.values()) == 6 * n * 16 * 300


def test_token_groups_of_an_8k_completion_at_152k_vocab_fit_the_default_budget():
    """An 8k-token completion at a 152k vocabulary (bf16 logits: 2.5 GB) runs fast in groups within the default
    budget's 2 GiB when the loss is token-separable; a whole-sequence loss cannot fit one sequence: lean."""
    vocab, tokens = 152064, 8192
    cfg = HeadPass(LogitTransform(), torch.bfloat16, "triton", 128 << 20)
    weight = torch.empty(vocab, 4096, dtype=torch.bfloat16, device="meta")

    class Layout:  # only the host offsets are read
        host_offsets = (0, tokens)

    groups = token_groups(Layout, weight, cfg, memory_budget=DEFAULT_BUDGET_CAP)
    assert groups is not None and groups[0][0] == 0 and groups[-1][1] == tokens
    assert all(t1 - t0 > 0 and (t1 - t0) * vocab * 2 <= DEFAULT_BUDGET_CAP for t0, t1 in groups)
    assert token_groups(Layout, weight, cfg, memory_budget=DEFAULT_BUDGET_CAP, whole_sequences=True) is None
    assert plan_token_groups((0, 3, 5, 9), 6, 6, whole_sequences=True) == [(0, 5), (5, 9)]
    assert plan_token_groups((0, 3, 5, 9), 7, 4, whole_sequences=False) == [(0, 3), (3, 6), (6, 9)]


def test_fast_token_loss_allocates_nothing_tokens_by_vocab():
    """Beside the gradients, only the budgeted logits buffer (and its fp32 row-op temporaries on the CPU) is of
    size rows x vocabulary: far below the materialised logits."""
    h, w, b, labels, mask, old, ref, adv = _batch(torch.float32, std=3.0, batch=4, seq=256, hidden=16, vocab=32768,
                                                  seed=5)
    n = int(mask.sum())
    budget = 32 * 32768 * 4  # 32 rows of fp32 logits per group
    with AllocationTracker(device="cpu") as mem:
        _run(h, w, b, labels, mask, old, ref, adv, backend="torch", gemm=None, transform=LogitTransform(),
             budget=budget)
    logits_bytes = n * 32768 * 4
    grads = 2 * (h.numel() + w.numel() + b.numel()) * 4
    assert mem.largest_bytes <= max(budget, w.numel() * 4), mem.largest
    assert mem.peak_bytes <= grads + 4 * budget < logits_bytes / 2, mem.summary()
