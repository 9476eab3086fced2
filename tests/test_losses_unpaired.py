"""KTO's losses (trl 1.16 ``KTOTrainer._compute_loss``) on sequence log-probs: hand values, TRL's batch loss, the
KL estimate, gradients against float64 and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastpref


def _trl_batch_loss(lp, ref, label, kl_logps, ref_kl_logps, *, beta, w_d, w_u, loss_type):
    """trl 1.16's formula, written out in float64 in its own order: desirable losses first, then undesirable."""
    kl = (kl_logps - ref_kl_logps).mean().clamp(min=0) if loss_type == "kto" else torch.zeros(())
    ch, rj = label.nonzero().view(-1), (~label).nonzero().view(-1)
    rc, rr = (lp - ref)[ch], (lp - ref)[rj]
    if loss_type == "kto":
        lc, lr = 1 - F.sigmoid(beta * (rc - kl)), 1 - F.sigmoid(beta * (kl - rr))
    else:
        lc, lr = 1 - F.sigmoid(beta * rc), F.sigmoid(beta * rr)
    return torch.cat((w_d * lc, w_u * lr)).mean(), kl


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.75)], ids=["w1", "w_unequal"])
def test_matches_trl_batch_loss_and_gradients(loss_type, weights):
    g = torch.Generator().manual_seed(7)
    b = 9
    lp = (torch.randn(b, generator=g, dtype=torch.float64) * 30 - 80).requires_grad_()
    ref = torch.randn(b, generator=g, dtype=torch.float64) * 30 - 80
    label = torch.rand(b, generator=g) < 0.6
    kl_logps, ref_kl = torch.randn(b, generator=g, dtype=torch.float64) * 5 - 90, torch.randn(
        b, generator=g, dtype=torch.float64) * 5 - 95
    want, kl = _trl_batch_loss(lp, ref, label, kl_logps, ref_kl, beta=0.1, w_d=weights[0], w_u=weights[1],
                               loss_type=loss_type)
    (g_want,) = torch.autograd.grad(want, lp)
    z0 = fastpref.losses.kl_estimate(kl_logps.float(), ref_kl.float())
    if loss_type == "kto":  # TRL skips the KL pass for apo_zero_unpaired; z0 is then ignored
        assert z0.item() == pytest.approx(kl.item(), rel=1e-6)
    lp32 = lp.detach().float().requires_grad_()
    losses, rewards = fastpref.losses.kto(lp32, ref.float(), label, z0, beta=0.1, desirable_weight=weights[0],
                                          undesirable_weight=weights[1], loss_type=loss_type)
    assert losses.shape == (b,) and not rewards.requires_grad
    torch.testing.assert_close(rewards.double(), 0.1 * (lp - ref).detach(), rtol=1e-6, atol=1e-5)
    loss = losses.mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    (g_got,) = torch.autograd.grad(loss, lp32)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4, atol=1e-8)


def test_hand_values():
    # ρ = 2 (desirable), ρ = -1 (undesirable), z0 = 0.5, β = 1
    lp, ref = torch.tensor([2.0, -1.0]), torch.zeros(2)
    label = torch.tensor([True, False])
    losses, _ = fastpref.losses.kto(lp, ref, label, 0.5, beta=1.0)
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert losses.tolist() == pytest.approx([1 - sig(1.5), 1 - sig(1.5)])
    losses, _ = fastpref.losses.kto(lp, ref, label, None, beta=1.0, loss_type="apo_zero_unpaired")
    assert losses.tolist() == pytest.approx([1 - sig(2.0), sig(-1.0)])


def test_kl_estimate_is_clamped_and_detached():
    a = torch.tensor([-5.0, -6.0], requires_grad=True)
    z0 = fastpref.losses.kl_estimate(a, torch.tensor([-1.0, -1.0]))
    assert z0.item() == 0.0 and not z0.requires_grad


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(beta=0.0), "beta"),
    (dict(desirable_weight=-1.0), "desirable_weight"),
    (dict(undesirable_weight=float("nan")), "undesirable_weight"),
    (dict(loss_type="kto_pair"), "loss_type"),
    (dict(kl=None), "kl"),
    (dict(kl=-0.5), "kl"),
    (dict(kl=torch.zeros(2)), "kl"),
])
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(kl=0.1)
    args.update(kwargs)
    kl = args.pop("kl")
    with pytest.raises((ValueError, TypeError), match=match):
        fastpref.losses.kto(torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool), kl, **args)


def test_bad_tensors_name_the_argument():
    with pytest.raises(ValueError, match="ref_logps"):
        fastpref.losses.kto(torch.zeros(3), torch.zeros(4), torch.ones(3, dtype=torch.bool), 0.0)
    with pytest.raises(TypeError, match="desirable"):
        fastpref.losses.kto(torch.zeros(3), torch.zeros(3), torch.ones(3), 0.0)
    with pytest.raises(TypeError, match="policy_logps"):
        fastpref.losses.kto(torch.zeros(3, dtype=torch.long), torch.zeros(3), torch.ones(3, dtype=torch.bool), 0.0)
