"""TRL 1.16's fused-head contract through fastpref (``fastpref.integrations.trl_head``) and the ``use_fastpref``
flag of the SFT / GRPO / RLOO trainers (``fastpref.integrations.trl_trainers``).

Head level: every field and gradient against float64 (error within 2x the materialised plain-torch path's in the
same dtype, plus a small atol) and against TRL's own ``ChunkedLogProbFunction``, at logit std 10-30, odd shapes,
fp32 and bf16. Model level: the patched forward against TRL's patched forward. Trainer level: flag on vs stock
TRL metric by metric over four SGD steps on a tiny offline Llama.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer, SFTConfig, SFTTrainer  # noqa: E402
from trl.kernels import ChunkedLogProbFunction  # noqa: E402
from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head  # noqa: E402

from fastpref.integrations.trl_head import (  # noqa: E402
    FIELDS,
    add_fused_lm_head,
    fused_head_fields,
    has_fastpref_head,
)
from fastpref.integrations.trl_trainers import (  # noqa: E402
    FastPrefGRPOConfig,
    FastPrefGRPOTrainer,
    FastPrefRLOOConfig,
    FastPrefRLOOTrainer,
    FastPrefSFTConfig,
    FastPrefSFTTrainer,
)
from fastpref.ops.plan import CPU_TILE_BYTES  # noqa: E402
from fastpref.testing.toy import toy_llama, toy_preference_records  # noqa: E402
from fastpref.utils.memory import AllocationTracker  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TRANSFORMS = {"plain": dict(temperature=1.0, softcap=None, logit_scale=1.0),
              "T0.7-softcap30-scale1.3": dict(temperature=0.7, softcap=30.0, logit_scale=1.3)}


# -- head level ------------------------------------------------------------------------------------------------

def _inputs(dtype, std, n=37, h=24, v=301, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * std / h ** 0.5).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    return hidden, weight, bias, labels


def _reference(hidden, weight, bias, labels, temperature, softcap, logit_scale, dtype):
    """TRL's fields from materialised logits: the product in ``dtype`` (float64 = the exact reference), the
    softmax math in fp32 (float64 for the reference)."""
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    y = (hidden.to(dtype) @ weight.to(dtype).t() + bias.to(dtype)).to(math_dtype) * logit_scale
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    z = y / temperature
    logp = torch.log_softmax(z, -1)
    safe = labels.clamp(min=0)
    log_probs = logp.gather(-1, safe[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1)
    sq = torch.logsumexp(2 * logp, -1)
    top1 = z.argmax(-1) == safe
    mask = labels != -100
    return tuple(torch.where(mask, x, torch.zeros_like(x)) for x in (log_probs, entropy, sq, z.mean(-1), top1))


def _leaves(dtype, std, **kw):
    return [t.clone().requires_grad_(t.is_floating_point() and i < 3) for i, t in enumerate(_inputs(dtype, std,
                                                                                                     **kw))]


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("dtype,std", [(torch.float32, 10.0), (torch.float32, 30.0), (torch.bfloat16, 20.0)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fields_and_gradients_match_float64(transform, dtype, std, backend):
    if backend == "triton" and (dtype != torch.float32 or std != 30.0):
        pytest.skip("the Triton interpreter is slow: one case")
    t = TRANSFORMS[transform]
    h, w, b, labels = _leaves(dtype, std)
    got = fused_head_fields(h, w, b, labels, outputs=FIELDS, backend=backend, **t)
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (h, w, b))
    exact = _reference(h64, w64, b64, labels, dtype=torch.float64, **t)
    plain = _reference(h, w, b, labels, dtype=dtype, **t)
    mask = labels != -100
    assert bool((exact[0][mask] < -5).any())  # peaked: some labels far from the top
    for name, g, p, e in zip(FIELDS, got, plain, exact):
        if name == "is_top1":
            assert torch.equal(g, e), name  # no near-ties at these scales
            continue
        err, base = (g.double() - e).abs().max().item(), (p.double() - e).abs().max().item()
        assert err <= 2 * base + 2e-5 * (1 + e.abs().max().item()), (name, err, base)
    # log_probs and entropy are differentiable (the entropy bonus); an upstream gradient on both, and on each
    gen = torch.Generator().manual_seed(1)
    up_lp, up_ent = torch.randn(labels.shape, generator=gen), torch.randn(labels.shape, generator=gen)
    for weights in ((True, True), (True, False), (False, True)):  # (False: no gradient reaches that field)
        def objective(lp, ent, weights=weights):
            terms = [(up.to(x.dtype) * x).sum() for up, x, on in ((up_lp, lp, weights[0]), (up_ent, ent, weights[1]))
                     if on]
            return sum(terms)

        gg = torch.autograd.grad(objective(got[0], got[1]), (h, w, b), retain_graph=True)
        ge = torch.autograd.grad(objective(exact[0], exact[1]), (h64, w64, b64), retain_graph=True)
        gp = torch.autograd.grad(objective(plain[0], plain[1]), (h, w, b), retain_graph=True)
        for name, x, y, z in zip("hwb", gg, ge, gp):
            assert x.dtype == y.dtype if dtype == torch.float64 else x.dtype == dtype
            err = (x.double() - y).norm().item()
            base = (z.double() - y).norm().item()
            assert err <= 2 * base + 1e-6 * y.norm().item() + 1e-30, (weights, name, err, base)


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fields_match_trl_chunked_logprob(transform, dtype):
    t = TRANSFORMS[transform]
    h, w, b, labels = _leaves(dtype, 20.0, n=53, h=40, v=517, seed=3)
    if dtype == torch.bfloat16:
        b = None  # TRL adds the bias after rounding the product to bf16, fastpref in the GEMM's epilogue: one ulp
    got = fused_head_fields(h, w, b, labels, outputs=FIELDS, backend="torch", **t)
    mask = labels != -100
    trl = ChunkedLogProbFunction.apply(h[mask], w, b, labels[mask], t["temperature"], 128, t["softcap"],
                                       t["logit_scale"], FIELDS)
    for name, g, r in zip(FIELDS, got, trl):
        assert bool((g[~mask] == 0).all()), name
        if name == "is_top1":
            assert torch.equal(g[mask], r), name
        else:
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            assert torch.allclose(g[mask], r.float(), atol=tol, rtol=tol), (name, (g[mask] - r).abs().max())
    up_lp, up_ent = torch.randn(mask.shape), torch.randn(mask.shape)
    leaves = [x for x in (h, w, b) if x is not None]
    ours = torch.autograd.grad((got[0] * up_lp).sum() + (got[1] * up_ent).sum(), leaves)
    theirs = torch.autograd.grad((trl[0] * up_lp[mask]).sum() + (trl[1] * up_ent[mask]).sum(), leaves)
    for name, x, y in zip("hwb", ours, theirs):
        rel = ((x.double() - y.double()).norm() / y.double().norm()).item()
        assert rel < (1e-5 if dtype == torch.float32 else 2e-2), (name, rel)


@pytest.mark.parametrize("dtype,backend", [(torch.float32, "torch"), (torch.bfloat16, "torch"),
                                           (torch.float32, "triton")])
def test_fast_mode_forms_the_mean_gradient_in_the_forward(dtype, backend, monkeypatch):
    import fastpref.integrations.trl_head as trl_head

    t = TRANSFORMS["T0.7-softcap30-scale1.3"]
    fast = _leaves(dtype, 20.0)
    lean = _leaves(dtype, 20.0)
    labels = fast[3]
    n = int((labels != -100).sum())
    lean_fields = fused_head_fields(*lean, outputs=FIELDS, backend="torch", **t)
    want = torch.autograd.grad(-lean_fields[0].sum() / n, lean[:3])
    calls = []
    original = trl_head._head_pass_ops.backward
    monkeypatch.setattr(trl_head._head_pass_ops, "backward", lambda *a, **k: calls.append(1) or original(*a, **k))
    fast_fields = fused_head_fields(*fast, outputs=FIELDS, backend=backend, mode="fast", **t)
    for name, a, b in zip(FIELDS, fast_fields, lean_fields):
        assert torch.equal(a, b) if name == "is_top1" else torch.allclose(a, b, atol=1e-5, rtol=1e-6), name
    got = torch.autograd.grad(-fast_fields[0].sum() / n, fast[:3])  # SFT's loss: the same weight on every token
    assert not calls  # no recompute: the gradient came from the forward
    for name, x, y in zip("hwb", got, want):
        rel = ((x.double() - y.double()).norm() / y.double().norm()).item()
        assert x.dtype == y.dtype and rel < (1e-5 if dtype == torch.float32 else 1e-2), (name, rel)


def test_fast_mode_recomputes_for_per_token_weights():
    # DFT-like weights (and an entropy bonus) cannot use the forward's unit gradient: the lean backward runs
    fast, lean = _leaves(torch.float32, 20.0), _leaves(torch.float32, 20.0)
    weights = torch.rand(fast[3].shape)
    for with_entropy in (False, True):
        ff = fused_head_fields(*fast, outputs=FIELDS, backend="torch", mode="fast")
        lf = fused_head_fields(*lean, outputs=FIELDS, backend="torch")
        extra = (lambda f: f[1].sum()) if with_entropy else (lambda f: 0.0)
        got = torch.autograd.grad((weights * ff[0]).sum() + extra(ff), fast[:3])
        want = torch.autograd.grad((weights * lf[0]).sum() + extra(lf), lean[:3])
        for x, y in zip(got, want):
            assert torch.allclose(x, y, atol=1e-6, rtol=1e-5)


def test_fields_not_requested_are_none_and_only_log_probs_costs():
    h, w, b, labels = _leaves(torch.float32, 10.0)
    got = fused_head_fields(h, w, b, labels, backend="torch")
    assert got[0] is not None and all(x is None for x in got[1:])
    with pytest.raises(ValueError, match="outputs"):
        fused_head_fields(h, w, b, labels, outputs=("log_probs", "logits"), backend="torch")


@pytest.mark.parametrize("mode", ["lean", "fast"])
def test_no_tokens_by_vocab_allocation(mode):
    n, hidden_size, vocab = 600, 16, 65536
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden_size, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden_size, generator=g) / 4).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    logits_bytes = n * vocab * 4
    with AllocationTracker(device="cpu") as mem:
        fields = fused_head_fields(h, w, None, labels, outputs=FIELDS, backend="torch", mode=mode,
                                   memory_budget=CPU_TILE_BYTES)  # fast mode's kept logits: one tile's worth
        if mode == "lean":
            (fields[0].sum() + fields[1].sum()).backward()  # the entropy-gradient pass
        else:
            (-fields[0].sum() / n).backward()  # the gradient formed in the forward, held until the backward
    grads = h.numel() * 4 + w.numel() * 4
    assert mem.largest_bytes <= max(2 * CPU_TILE_BYTES, w.numel() * 4), mem.largest
    assert mem.peak_bytes <= 2 * grads + 3 * CPU_TILE_BYTES < logits_bytes / 2, mem.summary()


# -- model level -----------------------------------------------------------------------------------------------

def _batch(tok, n=3, seed=0):
    records = toy_preference_records(n, seed=seed)
    enc = tok([r["prompt"] + r["chosen"] for r in records], padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    labels[:, :2] = -100
    return enc, labels


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.8, cast_lm_head_to_fp32=True)])
@pytest.mark.parametrize("shifted", [False, True])
def test_model_forward_matches_trl(tok, kw, shifted):
    ours = toy_llama(tok, hidden_size=32, num_layers=2)
    theirs = copy.deepcopy(ours)
    add_fused_lm_head(ours, outputs=FIELDS, backend="torch", **kw)
    trl_add_fused_lm_head(theirs, outputs=FIELDS, **kw)
    assert has_fastpref_head(ours) and not has_fastpref_head(theirs)
    enc, labels = _batch(tok)
    # pre-shifted as context parallelism passes them: one per position, the last one -100
    pre = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    call = dict(shift_labels=pre) if shifted else dict(labels=labels)
    a = ours(**enc, fused_lm_head=True, num_items_in_batch=7, **call)
    b = theirs(**enc, fused_lm_head=True, num_items_in_batch=7, **call)
    assert torch.equal(a.label_mask, b.label_mask)
    for name in ("loss", *FIELDS):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, name
        assert torch.allclose(x.float(), y.float(), atol=2e-5, rtol=1e-5), name
    ga = torch.autograd.grad(a.loss + a.entropy.sum(), list(ours.parameters()))
    gb = torch.autograd.grad(b.loss + b.entropy.sum(), list(theirs.parameters()))
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-4)


def test_all_masked_batch_is_a_differentiable_zero(tok):
    model = toy_llama(tok, hidden_size=32, num_layers=2)
    add_fused_lm_head(model, backend="torch")
    enc, labels = _batch(tok)
    out = model(**enc, labels=torch.full_like(labels, -100), fused_lm_head=True)
    assert out.loss.item() == 0.0 and bool((out.log_probs == 0).all())
    out.loss.backward()  # connected to the model, as TRL's masked_scatter keeps it
    assert all(p.grad is None or bool((p.grad == 0).all()) for p in model.parameters())


def test_generation_and_plain_forward_unchanged(tok):
    plain = toy_llama(tok, hidden_size=32, num_layers=2).eval()
    patched = copy.deepcopy(plain)
    add_fused_lm_head(patched, outputs=FIELDS)
    enc, labels = _batch(tok)
    assert torch.equal(plain(**enc, labels=labels).loss, patched(**enc, labels=labels).loss)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(plain.generate(**enc, **kw), patched.generate(**enc, **kw))


# -- trainers --------------------------------------------------------------------------------------------------

SFT_METRICS = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")


def _common(**kw):
    kw.setdefault("per_device_train_batch_size", 4)
    kw.setdefault("max_steps", 4)
    kw.setdefault("bf16", False)
    kw.setdefault("learning_rate", 0.5)
    return dict(output_dir="/tmp/fastpref-test-trl-head", logging_steps=1, report_to=[],
                optim="sgd", lr_scheduler_type="constant", save_strategy="no", use_cpu=True, seed=0, data_seed=0,
                **kw)


def _logs(trainer):
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def _assert_logs(got, want, keys, rtol):
    assert len(got) == len(want) == 4
    for step, (g, w) in enumerate(zip(got, want)):
        for key in keys:
            assert g[key] == pytest.approx(w[key], rel=rtol, abs=1e-6), (step, key, g[key], w[key])


@pytest.fixture(scope="module")
def sft_data():
    records = toy_preference_records(24, seed=0)
    return {
        "prompt_completion": datasets.Dataset.from_list(
            [{"prompt": r["prompt"], "completion": r["chosen"]} for r in records]),
        "text": datasets.Dataset.from_list([{"text": r["prompt"] + r["chosen"]} for r in records]),
        "messages": datasets.Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                                              {"role": "assistant", "content": r["chosen"]}]}
                                                for r in records]),
    }


# The toy template with {% generation %} around the assistant's turn, which assistant_only_loss needs
_TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|assistant|> ' }}{% generation %}"
    "{{ message['content'] + ' <eos> ' }}{% endgeneration %}{% else %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' <eos> ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def _sft(tok, data, flag, peft=False, fastpref_mode="auto", **kw):
    if kw.get("assistant_only_loss"):
        tok = copy.deepcopy(tok)
        tok.chat_template = _TRAINING_TEMPLATE
    cls = FastPrefSFTConfig if flag is not None else SFTConfig
    extra = {} if flag is None else dict(use_fastpref=flag, fastpref_backend="torch", fastpref_mode=fastpref_mode)
    cfg = cls(**_common(**kw), **extra)
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = (FastPrefSFTTrainer if flag is not None else SFTTrainer)(
        toy_llama(tok, hidden_size=32, num_layers=2), args=cfg, train_dataset=data, processing_class=tok,
        peft_config=peft_config)
    return trainer


SFT_CASES = {
    "completion_only": dict(data="prompt_completion"),
    "full_text": dict(data="text"),
    "grad_accum": dict(data="prompt_completion", per_device_train_batch_size=2, gradient_accumulation_steps=2),
    "packing_padding_free": dict(data="text", packing=True, padding_free=True, max_length=32,
                                 per_device_train_batch_size=2),
    "dft": dict(data="prompt_completion", loss_type="dft"),
    "assistant_only": dict(data="messages", assistant_only_loss=True),
    "peft": dict(data="prompt_completion", peft=True),
}


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_sft_flag_on_matches_stock_trl(tok, sft_data, case, monkeypatch):
    import fastpref.integrations.trl_head as trl_head

    kw = dict(SFT_CASES[case])
    data = sft_data[kw.pop("data")]
    want = _logs(_sft(tok, data, None, **kw))
    fast_passes = []
    original = trl_head.token_forward  # fast mode's pass (ops.fast_token_loss)
    monkeypatch.setattr(trl_head, "token_forward", lambda *a: fast_passes.append(1) or original(*a))
    trainer = _sft(tok, data, True, **kw)
    base = trainer.model.get_base_model() if kw.get("peft") else trainer.model
    assert has_fastpref_head(base)
    _assert_logs(_logs(trainer), want, SFT_METRICS, rtol=1e-5)
    assert bool(fast_passes) == (kw.get("loss_type", "nll") == "nll")  # fastpref_mode="auto": fast for the mean


@pytest.mark.parametrize("mode", ["lean", "fast"])
def test_sft_bf16_mixed_precision_as_trl_runs_it(tok, sft_data, mode):
    data = sft_data["prompt_completion"]
    want = _logs(_sft(tok, data, None, bf16=True))
    got = _logs(_sft(tok, data, True, bf16=True, fastpref_mode=mode))
    if mode == "lean":
        # the same bf16 logit tiles under autocast, folded and turned into gradients as TRL does: equal on this
        # CPU (1e-4 leaves room for another BLAS's bf16 GEMM)
        _assert_logs(got, want, SFT_METRICS, rtol=1e-4)
        return
    # fast mode rounds (onehot - p) to bf16 before the 1/num_items scale, TRL the scaled gradient: bf16 rounding
    # apart. Bound: twice TRL's own bf16-vs-fp32 difference.
    want32 = _logs(_sft(tok, data, None))
    for key in SFT_METRICS:
        noise = max(abs(w[key] - w32[key]) for w, w32 in zip(want, want32))
        for step, (g, w) in enumerate(zip(got, want)):
            assert abs(g[key] - w[key]) <= 2 * noise + 1e-5 * abs(w[key]), (step, key, g[key], w[key], noise)


def test_sft_flag_off_is_upstream_exactly(tok, sft_data):
    want = _logs(_sft(tok, sft_data["prompt_completion"], None))
    trainer = _sft(tok, sft_data["prompt_completion"], False)
    assert not has_fastpref_head(trainer.model)
    got = _logs(trainer)
    for g, w in zip(got, want):
        assert {k: g[k] for k in SFT_METRICS} == {k: w[k] for k in SFT_METRICS}


def _reward(completions, **_):
    # fixed and varied: completions of one prompt get different rewards, so the advantages are not all 0
    return [float(sum(map(ord, c)) % 7) for c in completions]


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory, tok):
    # GRPO / RLOO with beta > 0 load their reference model from the policy's path
    path = tmp_path_factory.mktemp("toy-llama")
    toy_llama(tok, hidden_size=32, num_layers=2).save_pretrained(path)
    return str(path)


ONLINE = {"grpo": (GRPOConfig, GRPOTrainer, FastPrefGRPOConfig, FastPrefGRPOTrainer),
          "rloo": (RLOOConfig, RLOOTrainer, FastPrefRLOOConfig, FastPrefRLOOTrainer)}
ONLINE_METRICS = ("loss", "grad_norm", "entropy", "kl", "reward", "reward_std", "num_tokens")


def _online(kind, flag, tok, path, **kw):
    cfg_cls, tr_cls, fp_cfg, fp_tr = ONLINE[kind]
    extra = {} if flag is None else dict(use_fastpref=flag, fastpref_backend="torch")
    common = _common(**{"learning_rate": 0.1, "num_generations": 4, "max_completion_length": 6, **kw})
    cfg = (fp_cfg if flag is not None else cfg_cls)(**common, **extra)
    data = datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in toy_preference_records(16, seed=0)])
    return (fp_tr if flag is not None else tr_cls)(path, reward_funcs=_reward, args=cfg, train_dataset=data,
                                                   processing_class=tok)


@pytest.mark.parametrize("kind,kw,rtol", [
    ("grpo", dict(beta=0.1, entropy_coef=1.0), 1e-5),  # KL to the reference and the entropy bonus (its gradient)
    ("grpo", dict(beta=0.0, loss_type="dr_grpo", gradient_accumulation_steps=2, per_device_train_batch_size=2),
     1e-5),
    ("grpo", dict(beta=0.1, bf16=True), 1e-4),  # bf16 mixed precision as TRL runs it: bf16 logit tiles on both
    ("rloo", dict(beta=0.1), 1e-5),
])
def test_online_flag_on_matches_stock_trl(tok, toy_path, kind, kw, rtol):
    # Generation is TRL's own (the original forward), seeded identically: both runs see the same completions.
    want = _logs(_online(kind, None, tok, toy_path, **kw))
    trainer = _online(kind, True, tok, toy_path, **kw)
    assert has_fastpref_head(trainer.model)
    if trainer.ref_model is not None:
        assert has_fastpref_head(trainer.ref_model)
    got = _logs(trainer)
    keys = [k for k in ONLINE_METRICS if k in want[0]]
    assert any(w["reward_std"] > 0 for w in want)
    _assert_logs(got, want, keys, rtol=rtol)


@pytest.mark.parametrize("cls", [FastPrefSFTConfig, FastPrefGRPOConfig, FastPrefRLOOConfig])
@pytest.mark.parametrize("field,value", [("fastpref_backend", "cuda"), ("fastpref_gemm", "cuBLAS"),
                                         ("fastpref_mode", "quick")])
def test_bad_fastpref_field_raises_naming_it(cls, field, value):
    with pytest.raises(ValueError, match=field):
        cls(output_dir="/tmp/fastpref-test-trl-head", use_cpu=True, report_to=[], use_fastpref=True,
            **{field: value})


@pytest.mark.parametrize("cls,base", [(FastPrefSFTConfig, SFTConfig), (FastPrefGRPOConfig, GRPOConfig),
                                      (FastPrefRLOOConfig, RLOOConfig)])
def test_configs_are_trl_configs_with_the_flag_off_by_default(cls, base):
    cfg = cls(output_dir="/tmp/fastpref-test-trl-head", use_cpu=True, report_to=[])
    assert isinstance(cfg, base) and cfg.use_fastpref is False


def test_swap_is_scoped_to_construction(tok, sft_data):
    import trl.trainer.sft_trainer as sft_module

    before = sft_module.add_fused_lm_head
    _sft(tok, sft_data["prompt_completion"], True)
    assert sft_module.add_fused_lm_head is before is trl_add_fused_lm_head


@pytest.mark.parametrize("kind", list(ONLINE))
@pytest.mark.parametrize("flag", [None, False, True])
def test_online_flag_swaps_policy_and_reference_heads(tok, toy_path, kind, flag):
    trainer = _online(kind, flag, tok, toy_path, beta=0.1)
    assert type(trainer).__name__.startswith("FastPref") == (flag is not None)
    for model in (trainer.model, trainer.ref_model):
        assert has_fastpref_head(model) == bool(flag)


def test_grpo_peft_matches_stock_trl(tok, toy_path):
    from peft import LoraConfig

    def run(flag):
        cfg_cls, tr_cls, fp_cfg, fp_tr = ONLINE["grpo"]
        extra = {} if flag is None else dict(use_fastpref=True, fastpref_backend="torch")
        cfg = (fp_cfg if flag else cfg_cls)(**_common(learning_rate=0.1, num_generations=4, max_completion_length=6,
                                                      beta=0.1), **extra)
        data = datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in toy_preference_records(16, seed=0)])
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        trainer = (fp_tr if flag else tr_cls)(toy_llama(tok, hidden_size=32, num_layers=2), reward_funcs=_reward,
                                              args=cfg, train_dataset=data, processing_class=tok, peft_config=lora)
        assert has_fastpref_head(trainer.model.get_base_model()) == bool(flag)
        return _logs(trainer)

    want = run(None)
    _assert_logs(run(True), want, [k for k in ONLINE_METRICS if k in want[0]], rtol=1e-5)


def test_moe_aux_loss_matches_trl(tok):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=True, router_aux_loss_coef=0.02, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    ours = MixtralForCausalLM(config)
    theirs = copy.deepcopy(ours)
    add_fused_lm_head(ours, backend="torch")
    trl_add_fused_lm_head(theirs)
    enc, labels = _batch(tok)
    a = ours(**enc, labels=labels, fused_lm_head=True)
    b = theirs(**enc, labels=labels, fused_lm_head=True)
    assert a.aux_loss is not None and torch.allclose(a.aux_loss, b.aux_loss)
    assert torch.allclose(a.loss, b.loss, atol=1e-6, rtol=1e-6)


def test_sft_evaluate_matches_stock_trl(tok, sft_data):
    evals = datasets.Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r["chosen"]} for r in toy_preference_records(6, seed=5)])

    def run(flag):
        trainer = _sft(tok, sft_data["prompt_completion"], flag)
        return trainer.evaluate(evals)

    want, got = run(None), run(True)
    for key in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
