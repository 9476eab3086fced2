"""``fastpref.losses``: hand-worked values, exactness against Liger-Kernel 0.8.5 and trl 1.16 (their own code,
run on stubs), invariants (λ = 0, stop-gradient, pair slices, empty responses) and validation."""

from __future__ import annotations

import functools
import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from fastpref import losses as L

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

# Hyper-parameters that exercise every type's knobs (ε inside each type's range).
HPARAMS: dict[str, dict[str, float]] = {
    "sigmoid": {"label_smoothing": 0.1},
    "robust": {"label_smoothing": 0.2},
    "exo_pair": {"label_smoothing": 1e-3},
    "aot": {"label_smoothing": 0.05},
    "aot_unpaired": {"label_smoothing": 0.15},
    "discopop": {"discopop_tau": 0.3},
    "sr_dpo": {"refinement_lambda": 0.3},
    "sr_ipo": {"refinement_lambda": 1.0},
    "simpo": {"label_smoothing": 0.1, "simpo_gamma": 0.8},
    "cpo": {"label_smoothing": 0.05, "cpo_alpha": 0.7},
}
SEPARABLE = sorted(L.PAIR_SEPARABLE)


def _kwargs(loss_type: str, batch: dict[str, torch.Tensor]) -> dict[str, object]:
    """Keyword arguments of ``fastpref.losses.<loss_type>`` for a batch from ``_batch``."""
    kw: dict[str, object] = {"beta": batch["beta"], **HPARAMS.get(loss_type, {}),
                             "chosen_lengths": batch["n_w"], "rejected_lengths": batch["n_l"]}
    if loss_type in L.NEEDS_REFINEMENT:
        kw["refinement"] = batch["delta"]
    return kw


def _batch(pairs: int = 5, *, dtype: torch.dtype = torch.float32, seed: int = 0, beta: float = 0.2) -> dict:
    g = torch.Generator().manual_seed(seed)
    n_w = torch.randint(1, 9, (pairs,), generator=g)
    n_l = torch.randint(1, 9, (pairs,), generator=g)
    lp_w = -(torch.rand(pairs, generator=g, dtype=torch.float64) * 2 + 0.05) * n_w
    lp_l = -(torch.rand(pairs, generator=g, dtype=torch.float64) * 2 + 0.05) * n_l
    ref_w = lp_w + torch.randn(pairs, generator=g, dtype=torch.float64)
    ref_l = lp_l + torch.randn(pairs, generator=g, dtype=torch.float64)
    delta = 0.3 * torch.randn(pairs, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(dtype)
    return {"lp_w": cast(lp_w), "lp_l": cast(lp_l), "ref_w": cast(ref_w), "ref_l": cast(ref_l), "n_w": n_w,
            "n_l": n_l, "delta": cast(delta), "beta": beta}


def _call(loss_type: str, batch: dict, **over: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kw = {**_kwargs(loss_type, batch), **over}
    return getattr(L, loss_type)(batch["lp_w"], batch["lp_l"], batch["ref_w"], batch["ref_l"], **kw)


# ----------------------------------------------------------------------------------------------------------------
# Hand-worked values (plain python floats)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _smoothed(z: float, eps: float) -> float:
    return -(1 - eps) * _logsig(z) - eps * _logsig(-z)


def _log1mexp(x: float) -> float:
    return math.log(-math.expm1(x))


def _expected(loss_type: str, b: dict, hp: dict[str, float]) -> list[float]:
    """Per-pair loss worked out with python floats from the formulas of the README / trl 1.16."""
    beta, eps = b["beta"], hp.get("label_smoothing", 0.0)
    lw, ll, rw, rl, d = ([float(v) for v in b[k]] for k in ("lp_w", "lp_l", "ref_w", "ref_l", "delta"))
    pairs = len(lw)
    if loss_type == "aot":
        first, second = sorted(x - y for x, y in zip(lw, ll)), sorted(x - y for x, y in zip(rw, rl))
    elif loss_type == "aot_unpaired":
        first, second = sorted(x - y for x, y in zip(lw, rw)), sorted(x - y for x, y in zip(ll, rl))
    if loss_type in ("aot", "aot_unpaired"):
        return [_smoothed(beta * (x - y), eps) for x, y in zip(first, second)]
    nll_scale = pairs / max(sum(int(v) for v in b["n_w"]), 1)
    n_w, n_l = [max(int(v), 1) for v in b["n_w"]], [max(int(v), 1) for v in b["n_l"]]
    return [_expected_pair(loss_type, beta, hp, lw[i], ll[i], rw[i], rl[i], n_w[i], n_l[i], d[i], -lw[i] * nll_scale)
            for i in range(pairs)]


def _expected_pair(loss_type: str, beta: float, hp: dict[str, float], lw: float, ll: float, rw: float, rl: float,
                   nw: int, nl: int, d: float, nll: float) -> float:
    eps, lam, tau = hp.get("label_smoothing", 0.0), hp.get("refinement_lambda", 0.0), hp.get("discopop_tau", 0.05)
    gamma, alpha = hp.get("simpo_gamma", 0.5), hp.get("cpo_alpha", 1.0)
    a, c = lw - rw, ll - rl  # ρ_w, ρ_l
    z, hbar = beta * (a - c), a / nw - c / nl
    m = _sig(z / tau)
    pw, pl = lw / nw, ll / nl
    formulas = {
        "sigmoid": lambda: _smoothed(z, eps),
        "hinge": lambda: max(0.0, 1 - z),
        "ipo": lambda: (hbar - 1 / (2 * beta)) ** 2,
        "exo_pair": lambda: _sig(z) * (_logsig(z) - math.log(1 - eps)) + _sig(-z) * (_logsig(-z) - math.log(eps)),
        "nca_pair": lambda: -_logsig(beta * a) - 0.5 * _logsig(-beta * a) - 0.5 * _logsig(-beta * c),
        "robust": lambda: (-(1 - eps) * _logsig(z) + eps * _logsig(-z)) / (1 - 2 * eps),
        "bco_pair": lambda: -_logsig(beta * a) - _logsig(-beta * c),
        "sppo_hard": lambda: (a - 1 / (2 * beta)) ** 2 + (c + 1 / (2 * beta)) ** 2,
        "apo_zero": lambda: 1 - _sig(beta * a) + _sig(beta * c),
        "apo_down": lambda: _sig(beta * a) + 1 - _sig(z),
        "discopop": lambda: -_logsig(z) * (1 - m) + math.exp(-z) * m,
        "sigmoid_norm": lambda: -_logsig(beta * hbar),
        "sr_dpo": lambda: -_logsig(z - lam * d),
        "sr_ipo": lambda: (hbar - lam * d - 1 / (2 * beta)) ** 2,
        "simpo": lambda: _smoothed(beta * (pw - pl) - gamma, eps),
        "cpo": lambda: _smoothed(beta * (lw - ll), eps) + alpha * nll,
        "orpo": lambda: -beta * _logsig((pw - pl) - (_log1mexp(pw) - _log1mexp(pl))) + nll,
        "sft": lambda: nll,
    }
    return formulas[loss_type]()


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_hand_worked_values(loss_type):
    b = _batch(4, dtype=torch.float64, seed=1)
    losses, chosen_rewards, rejected_rewards = _call(loss_type, b)
    expected = torch.tensor(_expected(loss_type, b, HPARAMS.get(loss_type, {})), dtype=torch.float64)
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    ref_w, ref_l = (0.0, 0.0) if loss_type in L.REFERENCE_FREE else (b["ref_w"], b["ref_l"])
    torch.testing.assert_close(chosen_rewards, b["beta"] * (b["lp_w"] - ref_w), rtol=0, atol=0)
    torch.testing.assert_close(rejected_rewards, b["beta"] * (b["lp_l"] - ref_l), rtol=0, atol=0)
    assert not chosen_rewards.requires_grad and losses.dtype == torch.float64


LOG2 = math.log(2.0)
# At zero margins (policy = reference) with β = 0.1, the textbook values of each loss.
TEXTBOOK = {
    "sigmoid": LOG2, "hinge": 1.0, "ipo": 25.0, "nca_pair": 2 * LOG2, "robust": LOG2, "bco_pair": 2 * LOG2,
    "sppo_hard": 50.0, "aot": LOG2, "aot_unpaired": LOG2, "apo_zero": 1.0, "apo_down": 1.0,
    "discopop": 0.5 * LOG2 + 0.5, "sigmoid_norm": LOG2, "sr_dpo": LOG2, "sr_ipo": 25.0,
    "exo_pair": 0.5 * (-LOG2 - math.log1p(-0.25)) + 0.5 * (-LOG2 - math.log(0.25)),
}


@pytest.mark.parametrize("loss_type", sorted(TEXTBOOK))
def test_textbook_points(loss_type):
    lp = torch.tensor([-3.0, -8.0])
    kw = {"chosen_lengths": torch.tensor([2, 4]), "rejected_lengths": torch.tensor([2, 4])}
    if loss_type in ("robust", "exo_pair"):
        kw["label_smoothing"] = 0.25
    if loss_type in L.NEEDS_REFINEMENT:
        kw["refinement"] = torch.zeros(2)  # Δ = 0: the policy and the reference agree on the re-scored pair too
    losses, _, _ = getattr(L, loss_type)(lp, lp, lp, lp, beta=0.1, **kw)
    torch.testing.assert_close(losses, torch.full((2,), TEXTBOOK[loss_type]), rtol=1e-6, atol=1e-6)


def test_reference_free_points():
    # 2 pairs, chosen sums -8 over 4 tokens and -2 over 2: NLL = 10 / 6 per token on average.
    lp_w, lp_l = torch.tensor([-8.0, -2.0]), torch.tensor([-3.0, -2.0])
    n_w, n_l = torch.tensor([4, 2]), torch.tensor([1, 1])
    kw = {"chosen_lengths": n_w, "rejected_lengths": n_l}
    assert L.sft(lp_w, lp_l, **kw)[0].mean().item() == pytest.approx(10 / 6)
    # SimPO, β = 2, γ = 1: lp̄_w − lp̄_l = (-2 + 3, -1 + 2) = (1, 1); z = 2·1 − 1 = 1
    simpo_losses = L.simpo(lp_w, lp_l, beta=2.0, simpo_gamma=1.0, **kw)[0]
    torch.testing.assert_close(simpo_losses, torch.full((2,), math.log1p(math.exp(-1.0))))
    # CPO with α = 0: DPO on the sums without a reference
    cpo_losses = L.cpo(lp_w, lp_l, beta=1.0, cpo_alpha=0.0)[0]
    torch.testing.assert_close(cpo_losses, torch.tensor([math.log1p(math.exp(5.0)), LOG2]))


# ----------------------------------------------------------------------------------------------------------------
# Liger-Kernel 0.8.5: LigerFusedLinearDPOFunction.preference_loss_fn

LIGER_TYPES = ["sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
               "apo_down", "discopop"]


@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "no_ref"])
@pytest.mark.parametrize("loss_type", LIGER_TYPES)
def test_matches_liger(loss_type, with_ref):
    dpo = pytest.importorskip("liger_kernel.chunked_loss.dpo_loss")
    b = _batch(6, seed=2)
    hp = {"label_smoothing": 0.0, "discopop_tau": 0.05}
    if loss_type in ("robust", "exo_pair"):
        hp.update(HPARAMS[loss_type])
    if loss_type == "discopop":
        hp.update(HPARAMS[loss_type])
    refs = (b["ref_w"], b["ref_l"]) if with_ref else (None, None)
    loss, chosen_rewards, rejected_rewards = dpo.LigerFusedLinearDPOFunction.preference_loss_fn(
        b["lp_w"], b["lp_l"], torch.zeros(12, 3), *refs, beta=b["beta"], loss_type=loss_type, **hp)
    kw = {k: v for k, v in hp.items() if k in ("discopop_tau",) and loss_type == "discopop"}
    if loss_type in ("robust", "exo_pair"):
        kw["label_smoothing"] = hp["label_smoothing"]
    ours, ours_chosen, ours_rejected = getattr(L, loss_type)(b["lp_w"], b["lp_l"], *refs, beta=b["beta"], **kw)
    torch.testing.assert_close(ours.mean(), loss, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(ours_chosen, chosen_rewards, rtol=0, atol=0)
    torch.testing.assert_close(ours_rejected, rejected_rewards, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# trl 1.16 DPOTrainer._compute_loss, run unbound on a stub trainer and a stub model with known log-probs


class _StubModel:
    """What ``DPOTrainer._compute_loss`` reads from ``model(..., fused_lm_head=True)``: per-token log-probs of
    the shifted labels (0 where ignored), entropy, mean logits, top-1 flags."""

    training = True

    def __init__(self, token_logps: torch.Tensor):
        self.token_logps = token_logps

    def __call__(self, **_: object) -> SimpleNamespace:
        zeros = torch.zeros_like(self.token_logps)
        return SimpleNamespace(log_probs=self.token_logps, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros_like(zeros, dtype=torch.bool))


def _token_batch(pairs: int, seq_len: int = 9, *, seed: int = 0, dtype: torch.dtype = torch.float64):
    """Per-token log-probs [2P, T-1] and a completion mask [2P, T] (position 0 is prompt, random lengths ≥ 1)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 4, (2 * pairs,), generator=g)
    length = torch.randint(1, seq_len - 3, (2 * pairs,), generator=g)
    pos = torch.arange(seq_len)
    completion_mask = ((pos >= prompt[:, None]) & (pos < (prompt + length)[:, None])).long()
    shift = completion_mask[:, 1:]
    token_logps = (-torch.rand(2 * pairs, seq_len - 1, generator=g, dtype=torch.float64) * 3).to(dtype) * shift
    ref = token_logps.sum(1) + 0.5 * torch.randn(2 * pairs, generator=g, dtype=torch.float64).to(dtype)
    return token_logps, completion_mask, ref


def _trl_dpo_loss(loss_types: list[str], loss_weights: list[float], beta: float, label_smoothing: float,
                  discopop_tau: float, token_logps: torch.Tensor, completion_mask: torch.Tensor,
                  ref: torch.Tensor) -> tuple[torch.Tensor, dict]:
    from trl.trainer.dpo_trainer import DPOTrainer

    pairs = ref.shape[0] // 2
    identity = lambda t: t
    stub = SimpleNamespace(
        model=_StubModel(token_logps), accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity,
                                                                  gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=loss_types, loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref[:pairs],
              "ref_rejected_logps": ref[pairs:]}
    loss = DPOTrainer._compute_loss(stub, stub.model, inputs, False)
    return loss, stub._metrics["train"]


TRL_CASES = {
    "sigmoid": (["sigmoid"], None, 0.0),
    "hinge": (["hinge"], None, 0.0),
    "ipo": (["ipo"], None, 0.0),
    "exo_pair": (["exo_pair"], None, 1e-3),
    "nca_pair": (["nca_pair"], None, 0.0),
    "robust": (["robust"], None, 0.2),
    "bco_pair": (["bco_pair"], None, 0.0),
    "sppo_hard": (["sppo_hard"], None, 0.0),
    "aot": (["aot"], None, 0.1),
    "aot_unpaired": (["aot_unpaired"], None, 0.1),
    "apo_zero": (["apo_zero"], None, 0.0),
    "apo_down": (["apo_down"], None, 0.0),
    "discopop": (["discopop"], None, 0.0),
    "sft": (["sft"], None, 0.0),
    "sigmoid_norm": (["sigmoid_norm"], None, 0.0),
    "sigmoid+sft": (["sigmoid", "sft"], [1.0, 0.3], 0.0),
    "ipo+hinge+sigmoid_norm": (["ipo", "hinge", "sigmoid_norm"], [0.5, 1.0, 2.0], 0.0),
    "aot+bco_pair": (["aot", "bco_pair"], [1.5, -0.25], 0.05),
    "robust+exo_pair": (["robust", "exo_pair"], [1.0, 1.0], 0.1),
}


@pytest.mark.parametrize("case", sorted(TRL_CASES))
def test_matches_trl_dpo_trainer(case):
    pytest.importorskip("trl")
    loss_types, weights, eps = TRL_CASES[case]
    beta, tau = 0.3, 0.2
    token_logps, completion_mask, ref = _token_batch(6, seed=len(case))
    expected, metrics = _trl_dpo_loss(loss_types, weights or [1.0] * len(loss_types), beta, eps, tau, token_logps,
                                      completion_mask, ref)
    pairs = ref.shape[0] // 2
    logps, lengths = token_logps.sum(1), completion_mask[:, 1:].sum(1)
    cfg = L.LossConfig.create(loss_types, weights, beta=beta, label_smoothing=eps, discopop_tau=tau)
    losses, chosen_rewards, rejected_rewards = L.pair_losses(
        cfg, logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], chosen_lengths=lengths[:pairs],
        rejected_lengths=lengths[pairs:])
    # TRL's EXO takes log ε and log(1 − ε) of a float32 ε, even on float64 inputs
    tol = 1e-7 if "exo_pair" in loss_types else 1e-12
    torch.testing.assert_close(losses.mean(), expected, rtol=tol, atol=tol)
    if not cfg.reference_free_only:  # TRL logs β·(lp − ref) even for `sft` alone; fastpref has no reference then
        assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], rel=1e-12)
        assert rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], rel=1e-12)


def test_matches_trl_dpo_trainer_float32_bitwise():
    """Single-type losses follow TRL's op order: the fp32 batch loss is bit-identical for these types."""
    pytest.importorskip("trl")
    token_logps, completion_mask, ref = _token_batch(8, seed=7, dtype=torch.float32)
    logps, lengths = token_logps.sum(1), completion_mask[:, 1:].sum(1)
    for loss_type in ("sigmoid", "hinge", "ipo", "robust", "sppo_hard", "sigmoid_norm", "apo_down", "discopop"):
        eps = 0.2 if loss_type == "robust" else 0.0
        expected, _ = _trl_dpo_loss([loss_type], [1.0], 0.1, eps, 0.05, token_logps, completion_mask, ref)
        losses, _, _ = getattr(L, loss_type)(logps[:8], logps[8:], ref[:8], ref[8:], beta=0.1,
                                             chosen_lengths=lengths[:8], rejected_lengths=lengths[8:],
                                             **({"label_smoothing": eps} if eps else {}))
        assert torch.equal(losses.mean() * 1.0, expected), loss_type


# ----------------------------------------------------------------------------------------------------------------
# trl 1.16 CPO / ORPO trainers (trl.experimental), their concatenated_forward + loss + NLL on stub logits


def _pref_logits_batch(pairs: int = 4, seq_len: int = 10, vocab: int = 13, *, seed: int = 0):
    """Random logits [2P, T, V] and a TRL-style batch: labels -100 on the prompt and the padding; the attention
    mask covers the response only, so ORPO's NLL (over attended tokens) is the responses' NLL too."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2 * pairs, seq_len), generator=g)
    prompt = torch.randint(1, 4, (2 * pairs,), generator=g)
    length = torch.randint(1, seq_len - 4, (2 * pairs,), generator=g)
    pos = torch.arange(seq_len)
    response = (pos >= prompt[:, None]) & (pos < (prompt + length)[:, None])
    labels = ids.masked_fill(~response, -100)
    batch = {}
    for name, rows in (("chosen", slice(0, pairs)), ("rejected", slice(pairs, 2 * pairs))):
        batch[f"{name}_input_ids"] = ids[rows]
        batch[f"{name}_attention_mask"] = response[rows].long()
        batch[f"{name}_labels"] = labels[rows]
    logits = torch.randn(2 * pairs, seq_len, vocab, generator=g, dtype=torch.float64) * 2
    # what fastpref's kernels would give: sums of the shifted label log-probs and the scored-token counts
    shifted = labels[:, 1:]
    mask = shifted != -100
    tok = torch.log_softmax(logits[:, :-1], -1).gather(-1, shifted.clamp(min=0)[..., None])[..., 0] * mask
    return logits, batch, tok.sum(1), mask.sum(1)


def _trl_reference_free_loss(trainer_cls: type, logits: torch.Tensor, batch: dict, **attrs: object) -> torch.Tensor:
    cpu = torch.device("cpu")
    stub = SimpleNamespace(
        is_encoder_decoder=False, pad_token_id=0, padding_value=0, aux_loss_enabled=False, alpha=0.0,
        accelerator=SimpleNamespace(device=cpu, gather_for_metrics=lambda t: t),
        get_batch_logps=trainer_cls.get_batch_logps, concatenated_inputs=trainer_cls.concatenated_inputs, **attrs)
    for method in ("concatenated_forward", "cpo_loss", "odds_ratio_loss"):
        if hasattr(trainer_cls, method):
            setattr(stub, method, functools.partial(getattr(trainer_cls, method), stub))
    model = lambda *args, **kwargs: SimpleNamespace(logits=logits)
    loss, _ = trainer_cls.get_batch_loss_metrics(stub, model, batch)
    return loss


@pytest.mark.parametrize("case", ["sigmoid", "sigmoid_smoothed", "simpo", "simpo_smoothed", "simpo+nll",
                                  "alpha0"])
def test_matches_trl_cpo_trainer(case):
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    logits, batch, logps, lengths = _pref_logits_batch(seed=3)
    pairs = logps.shape[0] // 2
    beta, gamma = 0.4, 0.6
    eps = 0.1 if case.endswith("smoothed") else 0.0
    alpha = {"simpo": 0.0, "simpo_smoothed": 0.0, "simpo+nll": 0.8, "alpha0": 0.0}.get(case, 1.3)
    trl_type = "simpo" if case.startswith("simpo") else "sigmoid"
    expected = _trl_reference_free_loss(CPOTrainer, logits, batch, loss_type=trl_type, beta=beta,
                                        label_smoothing=eps, simpo_gamma=gamma, cpo_alpha=alpha)
    if trl_type == "simpo":
        types, weights = (["simpo", "sft"], [1.0, alpha]) if alpha else (["simpo"], None)
    else:
        types, weights = ["cpo"], None
    cfg = L.LossConfig.create(types, weights, beta=beta, label_smoothing=eps, simpo_gamma=gamma, cpo_alpha=alpha)
    losses, chosen_rewards, _ = L.pair_losses(cfg, logps[:pairs], logps[pairs:], None, None,
                                              chosen_lengths=lengths[:pairs], rejected_lengths=lengths[pairs:])
    torch.testing.assert_close(losses.mean(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, beta * logps[:pairs])


def test_matches_trl_orpo_trainer():
    pytest.importorskip("trl")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    logits, batch, logps, lengths = _pref_logits_batch(seed=4)
    pairs = logps.shape[0] // 2
    expected = _trl_reference_free_loss(ORPOTrainer, logits, batch, beta=0.25)
    losses, _, _ = L.orpo(logps[:pairs], logps[pairs:], beta=0.25, chosen_lengths=lengths[:pairs],
                          rejected_lengths=lengths[pairs:])
    # TRL's odds_ratio_loss casts the mean log-probs to float32 (its NLL stays float64)
    torch.testing.assert_close(losses.mean(), expected, rtol=1e-6, atol=1e-6)
    losses32, _, _ = L.orpo(logps[:pairs].float(), logps[pairs:].float(), beta=0.25, chosen_lengths=lengths[:pairs],
                            rejected_lengths=lengths[pairs:])
    torch.testing.assert_close(losses32.mean().double(), expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Invariants


@pytest.mark.parametrize("sr_type,base", [("sr_dpo", "sigmoid"), ("sr_ipo", "ipo")])
@pytest.mark.parametrize("given", [True, False], ids=["delta_given", "delta_none"])
def test_lambda_zero_is_dpo_ipo_bitwise(sr_type, base, given):
    b = _batch(9, seed=5)
    refinement = b["delta"] if given else None
    sr = _call(sr_type, b, refinement=refinement, refinement_lambda=0.0)
    plain = _call(base, b, label_smoothing=0.0) if base == "sigmoid" else _call(base, b)
    for x, y in zip(sr, plain):
        assert torch.equal(x, y)
    cfg_sr = L.LossConfig.create(sr_type, refinement_lambda=0.0)
    cfg_base = L.LossConfig.create(base)
    args = (b["lp_w"], b["lp_l"], b["ref_w"], b["ref_l"])
    lengths = {"chosen_lengths": b["n_w"], "rejected_lengths": b["n_l"]}
    assert torch.equal(L.pair_losses(cfg_sr, *args, refinement=refinement, **lengths)[0],
                       L.pair_losses(cfg_base, *args, **lengths)[0])


@pytest.mark.parametrize("sr_type", ["sr_dpo", "sr_ipo"])
def test_refinement_is_stop_gradient(sr_type):
    b = _batch(5, seed=6)
    lp_w = b["lp_w"].clone().requires_grad_()
    delta = b["delta"].clone().requires_grad_()
    losses, _, _ = getattr(L, sr_type)(lp_w, b["lp_l"], b["ref_w"], b["ref_l"], beta=0.2, refinement=delta,
                                       refinement_lambda=0.5, chosen_lengths=b["n_w"], rejected_lengths=b["n_l"])
    assert losses.requires_grad
    d_lp, d_delta = torch.autograd.grad(losses.sum(), [lp_w, delta], allow_unused=True)
    assert d_delta is None and torch.isfinite(d_lp).all()
    # the refinement does shift the loss
    plain, _, _ = getattr(L, sr_type)(lp_w, b["lp_l"], b["ref_w"], b["ref_l"], beta=0.2, refinement=delta,
                                      refinement_lambda=0.0, chosen_lengths=b["n_w"], rejected_lengths=b["n_l"])
    assert not torch.allclose(losses, plain)


def _config(loss_type: str) -> L.LossConfig:
    if loss_type == "mixed":
        return L.LossConfig.create(["sigmoid", "sft", "ipo", "orpo"], [1.0, 0.5, 0.1, 2.0], beta=0.2)
    return L.LossConfig.create(loss_type, beta=0.2, **HPARAMS.get(loss_type, {}))


@pytest.mark.parametrize("loss_type", [*SEPARABLE, "mixed"])
def test_pair_slices_match_the_batch(loss_type):
    b = _batch(11, seed=8)
    cfg = _config(loss_type)
    nll_scale = 11 / b["n_w"].sum().float()
    delta = b["delta"] if cfg.needs_refinement else None
    full = L.pair_losses(cfg, b["lp_w"], b["lp_l"], b["ref_w"], b["ref_l"], chosen_lengths=b["n_w"],
                         rejected_lengths=b["n_l"], refinement=delta, nll_scale=nll_scale)
    full_no_scale = L.pair_losses(cfg, b["lp_w"], b["lp_l"], b["ref_w"], b["ref_l"], chosen_lengths=b["n_w"],
                                  rejected_lengths=b["n_l"], refinement=delta)
    torch.testing.assert_close(full[0], full_no_scale[0], rtol=1e-6, atol=1e-7)
    for rows in (slice(0, 4), slice(4, 5), slice(5, 11)):
        part = L.pair_losses(cfg, b["lp_w"][rows], b["lp_l"][rows], b["ref_w"][rows], b["ref_l"][rows],
                             chosen_lengths=b["n_w"][rows], rejected_lengths=b["n_l"][rows],
                             refinement=None if delta is None else delta[rows], nll_scale=nll_scale)
        for x, y in zip(part, full):
            torch.testing.assert_close(x, y[rows], rtol=1e-6, atol=1e-7)


def test_batch_coupled_types_sort_the_batch():
    b = _batch(6, seed=9)
    assert not _config("aot").pair_separable and not _config("aot_unpaired").pair_separable
    order = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    for loss_type in ("aot", "aot_unpaired"):
        full = _call(loss_type, b)[0]
        shuffled = {k: v[order] if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        torch.testing.assert_close(_call(loss_type, shuffled)[0], full)  # invariant to the pair order


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_empty_responses_give_finite_losses_and_gradients(loss_type):
    b = _batch(4, seed=10)
    # pair 0: empty chosen, pair 1: empty rejected, pair 2: both empty (sum 0, length 0)
    for key_lp, key_n, rows in (("lp_w", "n_w", [0, 2]), ("lp_l", "n_l", [1, 2])):
        b[key_lp][rows] = 0.0
        b[key_n][rows] = 0
    b["ref_w"][[0, 2]] = 0.0
    b["ref_l"][[1, 2]] = 0.0
    lp_w, lp_l = b["lp_w"].clone().requires_grad_(), b["lp_l"].clone().requires_grad_()
    losses, _, _ = getattr(L, loss_type)(lp_w, lp_l, b["ref_w"], b["ref_l"], **_kwargs(loss_type, b))
    assert torch.isfinite(losses).all(), losses
    grads = torch.autograd.grad(losses.mean(), [lp_w, lp_l], allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_no_chosen_token_in_the_batch_gives_zero_nll():
    zero = torch.zeros(3)
    for loss_type in ("sft", "cpo", "orpo"):
        losses, _, _ = getattr(L, loss_type)(zero, zero, chosen_lengths=torch.zeros(3, dtype=torch.long),
                                             rejected_lengths=torch.zeros(3, dtype=torch.long))
        assert torch.isfinite(losses).all()
    assert torch.equal(L.sft(zero, zero, chosen_lengths=torch.zeros(3))[0], torch.zeros(3))


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_extreme_margins_give_finite_losses_and_gradients(loss_type):
    lp_w = torch.tensor([-1e4, -1e-9, -50.0, 0.0], requires_grad=True)
    lp_l = torch.tensor([-1e-9, -1e4, -1e3, 0.0], requires_grad=True)
    ref = torch.tensor([-20.0, -20.0, -20.0, -20.0])
    n = torch.tensor([100, 3, 40, 5])
    b = {"beta": 0.5, "n_w": n, "n_l": n, "delta": torch.tensor([1e3, -1e3, 0.0, 1.0])}
    losses, _, _ = getattr(L, loss_type)(lp_w, lp_l, ref, ref, **_kwargs(loss_type, b))
    assert torch.isfinite(losses).all(), losses
    grads = torch.autograd.grad(losses.sum(), [lp_w, lp_l], allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads), grads


def test_weighted_mix_is_the_weighted_sum():
    b = _batch(5, seed=11)
    cfg = L.LossConfig.create(["sigmoid", "hinge", "sft"], [0.5, 2.0, -1.0], beta=0.2, label_smoothing=0.1)
    lengths = {"chosen_lengths": b["n_w"], "rejected_lengths": b["n_l"]}
    mixed, chosen_rewards, _ = L.pair_losses(cfg, b["lp_w"], b["lp_l"], b["ref_w"], b["ref_l"], **lengths)
    parts = [_call("sigmoid", b, label_smoothing=0.1)[0], _call("hinge", b)[0], _call("sft", b)[0]]
    torch.testing.assert_close(mixed, 0.5 * parts[0] + 2.0 * parts[1] - parts[2])
    torch.testing.assert_close(chosen_rewards, 0.2 * (b["lp_w"] - b["ref_w"]))


def test_reference_free_config_zeroes_the_reference():
    b = _batch(5, seed=12)
    cfg = L.LossConfig.create("sigmoid", beta=0.2, reference_free=True)
    free, chosen_rewards, _ = L.pair_losses(cfg, b["lp_w"], b["lp_l"], b["ref_w"], b["ref_l"])
    zero = torch.zeros(5)
    assert torch.equal(free, L.sigmoid(b["lp_w"], b["lp_l"], zero, zero, beta=0.2)[0])
    assert torch.equal(chosen_rewards, 0.2 * b["lp_w"])
    assert torch.equal(free, L.pair_losses(cfg, b["lp_w"], b["lp_l"], None, None)[0])


def test_config_properties_and_metadata():
    assert set(L.LOSS_TYPES) == set(L.PAIR_SEPARABLE) | {"aot", "aot_unpaired"}
    assert len(L.LOSS_TYPES) == 20 and all(callable(getattr(L, name)) for name in L.LOSS_TYPES)
    assert L.REFERENCE_FREE == {"simpo", "cpo", "orpo", "sft"}
    assert L.NEEDS_REFINEMENT == {"sr_dpo", "sr_ipo"}
    assert {"ipo", "sr_ipo", "sigmoid_norm", "simpo", "orpo", "sft", "cpo"} == L.NEEDS_LENGTHS
    cfg = L.LossConfig.create(["ipo", "sr_dpo"], [1, 2], beta=1)
    assert cfg.loss_weights == (1.0, 2.0) and isinstance(cfg.beta, float) and cfg.pair_separable
    assert cfg.needs_lengths and cfg.needs_refinement and not cfg.reference_free_only
    assert L.LossConfig.create(["simpo", "sft"]).reference_free_only
    assert not L.LossConfig.create(["aot", "sigmoid"]).pair_separable
    with pytest.raises(Exception, match="cannot assign"):
        cfg.beta = 0.5  # frozen


# ----------------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("kwargs,error,match", [
    ({"loss_type": "dpo"}, ValueError, r"loss_type: expected one of \['sigmoid', 'hinge', .*'sft'\], got 'dpo'"),
    ({"loss_type": []}, TypeError, r"loss_type: expected .*non-empty"),
    ({"loss_type": "sigmoid", "beta": 0.0}, ValueError,
     r"beta: expected a finite number in \(0, 3\.403e\+38\], got 0.0"),
    ({"loss_type": "sigmoid", "beta": float("nan")}, ValueError, r"beta: .*got nan"),
    ({"loss_type": "sigmoid", "beta": "0.1"}, TypeError, r"beta: expected a real number, got str"),
    ({"loss_type": "sigmoid", "beta": True}, TypeError, r"beta: expected a real number, got bool"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, ValueError,
     r"label_smoothing: expected a finite number in \[0, 0.5\) for loss_type 'robust'.*got 0.5"),
    ({"loss_type": "exo_pair"}, ValueError, r"label_smoothing: .*\(0, 0.5\] for loss_type 'exo_pair'.*got 0.0"),
    ({"loss_type": "sigmoid", "label_smoothing": 0.6}, ValueError, r"label_smoothing: .*\[0, 0.5\].*'sigmoid'"),
    ({"loss_type": ["hinge", "aot"], "label_smoothing": -0.1}, ValueError, r"label_smoothing: .*got -0.1"),
    ({"loss_type": "sr_dpo", "refinement_lambda": -0.5}, ValueError, r"refinement_lambda: .*\[0, 3\.403e\+38\].*-0.5"),
    ({"loss_type": "sr_ipo", "refinement_lambda": float("inf")}, ValueError, r"refinement_lambda: .*got inf"),
    ({"loss_type": "discopop", "discopop_tau": 0}, ValueError, r"discopop_tau: .*\(0, 3\.403e\+38\].*got 0.0"),
    ({"loss_type": "simpo", "simpo_gamma": -1}, ValueError, r"simpo_gamma: .*got -1.0"),
    ({"loss_type": "cpo", "cpo_alpha": -1}, ValueError, r"cpo_alpha: .*got -1.0"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, ValueError,
     r"loss_weights: expected 2 weights \(one per loss_type \['sigmoid', 'sft'\]\), got 1"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, float("nan")]}, ValueError,
     r"loss_weights: expected finite numbers, got \[1.0, nan\]"),
    ({"loss_type": "sigmoid", "reference_free": 1}, TypeError, r"reference_free: expected a bool, got int"),
    ({"loss_type": "sigmoid", "temperature": 2.0}, TypeError, r"unexpected hyper-parameter\(s\) \['temperature'\]"),
], ids=lambda v: str(v)[:40] if not isinstance(v, type) else "")
def test_config_validation(kwargs, error, match):
    kwargs = dict(kwargs)
    loss_type, weights = kwargs.pop("loss_type"), kwargs.pop("loss_weights", None)
    with pytest.raises(error, match=match):
        L.LossConfig.create(loss_type, weights, **kwargs)


def test_function_validation():
    b = _batch(3)
    args = (b["lp_w"], b["lp_l"], b["ref_w"], b["ref_l"])
    with pytest.raises(ValueError, match=r"chosen_lengths: loss_type 'ipo' needs the number of scored tokens"):
        L.ipo(*args)
    with pytest.raises(ValueError, match=r"rejected_lengths: loss_type 'sigmoid_norm'"):
        L.sigmoid_norm(*args, chosen_lengths=b["n_w"])
    with pytest.raises(ValueError, match=r"chosen_lengths: loss_type 'sft'"):
        L.sft(*args)
    with pytest.raises(ValueError, match=r"refinement: loss_type 'sr_dpo' with refinement_lambda=0.5 needs"):
        L.sr_dpo(*args)
    with pytest.raises(ValueError, match=r"beta: expected a finite number in \(0, 3\.403e\+38\], got -0.1"):
        L.hinge(*args, beta=-0.1)
    with pytest.raises(ValueError, match=r"label_smoothing: .*for loss_type 'robust'"):
        L.robust(*args, label_smoothing=0.5)
    with pytest.raises(TypeError, match=r"policy_chosen_logps: expected a floating-point tensor \[P\]"):
        L.sigmoid([-1.0], b["lp_l"])
    with pytest.raises(TypeError, match=r"policy_rejected_logps: .*got tensor of dtype torch.int64"):
        L.sigmoid(b["lp_w"], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"policy_rejected_logps: expected shape \(3,\)"):
        L.sigmoid(b["lp_w"], b["lp_l"][:2])
    with pytest.raises(ValueError, match=r"ref_chosen_logps: expected shape \[3\]"):
        L.sigmoid(b["lp_w"], b["lp_l"], b["ref_w"][:2], b["ref_l"])
    with pytest.raises(TypeError, match=r"chosen_lengths: expected an integer or floating-point tensor"):
        L.ipo(*args, chosen_lengths=[1, 2, 3], rejected_lengths=b["n_l"])
    cfg = L.LossConfig.create("sigmoid")
    with pytest.raises(ValueError, match=r"ref_chosen_logps / ref_rejected_logps: loss_type \['sigmoid'\] needs"):
        L.pair_losses(cfg, b["lp_w"], b["lp_l"], None, None)
    with pytest.raises(ValueError, match=r"refinement: only read by sr_dpo and sr_ipo"):
        L.pair_losses(cfg, *args, refinement=b["delta"])
    with pytest.raises(TypeError, match=r"config: expected a fastpref.losses.LossConfig"):
        L.pair_losses({"loss_type": "sigmoid"}, *args)
