"""TRL integration: FastPrefDPOTrainer with the flag on equals stock trl.DPOTrainer (loss, metrics, gradients)
within fp32 round-off; with the flag off it *is* trl.DPOTrainer (bit for bit).

Tiny random Llama, in-process tokenizer, a handful of SGD steps (SGD keeps parameter differences proportional to
gradient differences, which Adam's normalisation would amplify near zero gradients).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import DPOConfig, DPOTrainer  # noqa: E402

from fastpref.integrations.trl import (  # noqa: E402
    FastPrefDPOConfig,
    FastPrefDPOTrainer,
    check_trl_version,
    unsupported_fused_fields,
)
from fastpref.testing.toy import toy_llama, toy_preference_records  # noqa: E402

METRICS = ("loss", "grad_norm", "entropy", "num_tokens", "logits/chosen", "logits/rejected", "mean_token_accuracy",
           "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread per test worker


@pytest.fixture(scope="module")
def dataset():
    return datasets.Dataset.from_list(toy_preference_records(16, seed=0))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def config(cls, loss_type="sigmoid", **kw):
    kw.setdefault("label_smoothing", 0.1 if loss_type in ("robust",) else 0.0)
    kw.setdefault("per_device_train_batch_size", 4)
    kw.setdefault("max_steps", 3)
    kw.setdefault("bf16", False)
    return cls(output_dir="/tmp/fastpref-test-trl", logging_steps=1, report_to=[], learning_rate=0.5,
               optim="sgd", lr_scheduler_type="constant", save_strategy="no", use_cpu=True, seed=0,
               data_seed=0, loss_type=[loss_type] if isinstance(loss_type, str) else loss_type, **kw)


def build(cls, cfg, tok, dataset, *, with_ref=True, model=None, ref_seed=0, **kw):
    model = model if model is not None else toy_llama(tok, hidden_size=32, num_layers=2)
    # ref_seed=0: the initial policy (TRL's default reference); another seed gives non-zero log-ratios at once.
    ref = toy_llama(tok, hidden_size=32, num_layers=2, seed=ref_seed) if with_ref else None
    return cls(model, ref_model=ref, args=cfg, train_dataset=dataset, processing_class=tok, **kw)


def train(trainer):
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def assert_logs_close(got, want, *, rtol=2e-5):
    assert len(got) == len(want) > 0
    for step, (g, w) in enumerate(zip(got, want)):
        for key in METRICS:
            assert g[key] == pytest.approx(w[key], rel=rtol, abs=1e-6), (step, key, g[key], w[key])
        # Step 0 included: the policy *is* the reference there, TRL's rewards are exactly 0 and so are ours.
        assert g["rewards/accuracies"] == w["rewards/accuracies"], (step, "rewards/accuracies")


def assert_params_close(a, b, tol=1e-5):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert rel(p, q) < tol, name


@pytest.fixture(scope="module")
def stock_runs(tok, dataset):
    """trl.DPOTrainer, once per loss type, shared by the parity tests."""
    cache = {}

    def get(loss_type):
        if loss_type not in cache:
            trainer = build(DPOTrainer, config(DPOConfig, loss_type), tok, dataset)
            cache[loss_type] = (train(trainer), trainer.model)
        return cache[loss_type]

    return get


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_flag_on_matches_stock_trl(tok, dataset, stock_runs, loss_type):
    want, want_model = stock_runs(loss_type)
    trainer = build(FastPrefDPOTrainer, config(FastPrefDPOConfig, loss_type, use_fastpref=True), tok, dataset)
    calls = []
    trainer.fastpref_loss.register_forward_hook(lambda *_: calls.append(1))
    got = train(trainer)
    assert len(calls) == 3  # every step ran fastpref's fused loss
    assert_logs_close(got, want)
    assert_params_close(trainer.model, want_model)
    assert set(want[0]) == set(got[0])  # the same metric names, no more, no less


def test_evaluate_matches_stock_trl(tok, dataset):
    evals = datasets.Dataset.from_list(toy_preference_records(6, seed=5))
    kw = dict(eval_dataset=evals)
    stock = build(DPOTrainer, config(DPOConfig, per_device_eval_batch_size=4), tok, dataset, **kw).evaluate()
    ours = build(FastPrefDPOTrainer, config(FastPrefDPOConfig, use_fastpref=True, per_device_eval_batch_size=4),
                 tok, dataset, **kw).evaluate()
    assert set(ours) == set(stock)
    for key in stock:
        if "runtime" in key or "per_second" in key or key == "eval_rewards/accuracies":
            continue
        assert ours[key] == pytest.approx(stock[key], rel=2e-5, abs=1e-6), key


TRL_LOSS_TYPES = ["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_flag_on_gradients_match_stock_trl(tok, dataset, loss_type):
    smoothing = {"robust": 0.1, "exo_pair": 1e-3, "aot": 0.1}.get(loss_type, 0.0)
    stock = build(DPOTrainer, config(DPOConfig, loss_type, label_smoothing=smoothing), tok, dataset, ref_seed=1)
    ours = build(FastPrefDPOTrainer, config(FastPrefDPOConfig, loss_type, use_fastpref=True,
                                            label_smoothing=smoothing), tok, dataset, ref_seed=1)
    batch = stock._prepare_inputs(next(iter(stock.get_train_dataloader())))
    losses = []
    for trainer in (stock, ours):
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        losses.append(loss.item())
    # Same loss, metrics and gradients on every parameter (including the LM head and the embeddings).
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-7)
    for key, value in stock._metrics["train"].items():
        assert ours._metrics["train"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for (name, p), q in zip(stock.model.named_parameters(), ours.model.parameters()):
        assert rel(q.grad, p.grad) < 1e-5, name


def test_loss_weights_mix_matches_stock_trl(tok, dataset):
    """MPO-style mix (sigmoid + sft, weighted): fastpref's combined loss equals TRL's."""
    mix = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    stock = build(DPOTrainer, config(DPOConfig, **mix), tok, dataset)
    ours = build(FastPrefDPOTrainer, config(FastPrefDPOConfig, use_fastpref=True, **mix), tok, dataset)
    assert_logs_close(train(ours), train(stock))
    assert_params_close(ours.model, stock.model)


def test_gradient_accumulation_matches_stock_trl(tok, dataset, stock_runs):
    want, want_model = stock_runs("sigmoid")
    trainer = build(FastPrefDPOTrainer, config(FastPrefDPOConfig, use_fastpref=True, per_device_train_batch_size=2,
                                               gradient_accumulation_steps=2), tok, dataset)
    got = train(trainer)
    assert [g["loss"] for g in got] == pytest.approx([w["loss"] for w in want], rel=1e-5)
    assert_params_close(trainer.model, want_model)


def test_flag_off_is_upstream_exactly(tok, dataset, stock_runs):
    want, want_model = stock_runs("sigmoid")
    trainer = build(FastPrefDPOTrainer, config(FastPrefDPOConfig, "sigmoid"), tok, dataset)
    assert trainer.fastpref_loss is None
    got = train(trainer)
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if "runtime" not in k and "per_second" not in k} == \
            {k: v for k, v in w.items() if "runtime" not in k and "per_second" not in k}
    for p, q in zip(trainer.model.parameters(), want_model.parameters()):
        assert torch.equal(p, q)


def test_precomputed_reference_equals_live(tok, dataset):
    live = build(FastPrefDPOTrainer, config(FastPrefDPOConfig, use_fastpref=True), tok, dataset)
    pre = build(FastPrefDPOTrainer, config(FastPrefDPOConfig, use_fastpref=True, precompute_ref_log_probs=True),
                tok, dataset, with_ref=False)
    assert pre.ref_model is None and "ref_chosen_logps" in pre.train_dataset.column_names
    assert_logs_close(train(pre), train(live), rtol=1e-5)
    assert_params_close(pre.model, live.model, tol=1e-6)


def test_peft_reference_path_matches_stock(tok, dataset):
    peft = pytest.importorskip("peft")

    def lora():
        # Non-zero initial adapter: the policy differs from the adapter-disabled reference from step 0.
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                               init_lora_weights=False)

    stock = build(DPOTrainer, config(DPOConfig), tok, dataset, with_ref=False, peft_config=lora())
    ours = build(FastPrefDPOTrainer, config(FastPrefDPOConfig, use_fastpref=True), tok, dataset, with_ref=False,
                 peft_config=lora())
    assert ours.ref_model is None
    want, got = train(stock), train(ours)
    assert abs(want[0]["rewards/margins"]) > 1e-6
    assert_logs_close(got, want)
    assert want[0]["rewards/accuracies"] == got[0]["rewards/accuracies"]


def test_sr_dpo_lambda_zero_equals_sigmoid(tok, dataset, stock_runs):
    want, want_model = stock_runs("sigmoid")
    trainer = build(FastPrefDPOTrainer,
                    config(FastPrefDPOConfig, "sr_dpo", use_fastpref=True, refinement_lambda=0.0), tok, dataset)
    assert {"refine_prompt_ids", "refine_chosen_ids"} <= set(trainer.train_dataset.column_names)
    row = trainer.train_dataset[0]
    assert len(row["refine_prompt_ids"]) > len(row["prompt_ids"])  # p ⊕ x is longer than x
    assert row["refine_chosen_ids"] == row["chosen_ids"]
    got = train(trainer)
    assert_logs_close(got, want)
    assert_params_close(trainer.model, want_model)


def test_padding_free_equals_padded(tok, dataset, stock_runs):
    want, want_model = stock_runs("sigmoid")
    trainer = build(FastPrefDPOTrainer, config(FastPrefDPOConfig, use_fastpref=True, padding_free=True),
                    tok, dataset)
    assert trainer.padding_free and trainer.data_collator.padding_free
    got = train(trainer)
    assert_logs_close(got, want, rtol=1e-4)
    assert_params_close(trainer.model, want_model, tol=1e-4)


@pytest.mark.parametrize("field,value", [("ld_alpha", 0.5), ("f_divergence_type", "js_divergence"),
                                         ("use_weighting", True), ("router_aux_loss_coef", 0.01)])
def test_unsupported_fields_raise_naming_them(field, value):
    with pytest.raises(ValueError, match=field):
        config(FastPrefDPOConfig, use_fastpref=True, **{field: value})
    config(FastPrefDPOConfig, use_fastpref=False, **{field: value})  # trl's own path takes them


@pytest.mark.parametrize("field,value,expected", [
    ("fastpref_gemm", "cuBLAS", "'cublas'"), ("fastpref_gemm", "bogus", "'fused'"),
    ("fastpref_mode", "Fast", "'lean'"), ("fastpref_backend", "cuda", "'triton'"),
    ("fastpref_memory_budget", 0, "positive int")])
@pytest.mark.parametrize("use_fastpref", [True, False])
def test_bad_fastpref_field_raises_when_the_config_is_built(field, value, expected, use_fastpref):
    with pytest.raises(ValueError, match=rf"^{field}: expected .*{expected}.*got {value!r}"):
        config(FastPrefDPOConfig, use_fastpref=use_fastpref, **{field: value})


def test_sr_needs_the_flag():
    with pytest.raises(ValueError, match="use_fastpref=True"):
        config(FastPrefDPOConfig, "sr_dpo")
    assert unsupported_fused_fields(config(FastPrefDPOConfig, use_fastpref=True)) == []


def test_sr_ipo_precomputed_reference_equals_live(tok, dataset):
    """Sr-IPO with λ > 0: the p ⊕ x reference sums are precomputed too, and give the live run."""
    kw = dict(use_fastpref=True, refinement_lambda=0.5)
    live = build(FastPrefDPOTrainer, config(FastPrefDPOConfig, "sr_ipo", **kw), tok, dataset)
    pre = build(FastPrefDPOTrainer, config(FastPrefDPOConfig, "sr_ipo", precompute_ref_log_probs=True, **kw),
                tok, dataset, with_ref=False)
    assert {"ref_refine_chosen_logps", "ref_refine_rejected_logps"} <= set(pre.train_dataset.column_names)
    want, got = train(live), train(pre)
    assert_logs_close(got, want, rtol=1e-5)
    assert_params_close(pre.model, live.model, tol=1e-6)


def test_trl_version_range():
    assert check_trl_version("1.16.0") == "1.16.0"
    assert check_trl_version("1.16.3") == "1.16.3"
    for bad in ("1.15.2", "1.17.0", "1.17.0.dev0", "2.0.0"):
        with pytest.raises(ImportError, match=r"trl>=1.16,<1.17.*found trl " + bad.replace(".", r"\.")):
            check_trl_version(bad)


def test_generation_unchanged_after_patch(tok, dataset):
    trainer = build(FastPrefDPOTrainer, config(FastPrefDPOConfig, use_fastpref=True), tok, dataset)
    plain = copy.deepcopy(toy_llama(tok, hidden_size=32, num_layers=2)).eval()
    model = trainer.model.eval()
    ids = torch.tensor([[7, 8, 9, 10]])
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False),
                       plain.generate(ids, max_new_tokens=4, do_sample=False))


def test_bf16_mixed_precision_reference_matches_stock_trl(tok, dataset):
    """bf16 autocast (TRL's default mixed precision) with a separate reference model: TRL prepares the reference
    under the accelerator's autocast; fastpref's fused reference must run under it too, so at the first step (the
    reference equals the policy) the rewards are exactly 0 and the loss is ln 2, as in stock TRL."""
    kw = dict(bf16=True, max_steps=1)
    stock = train(build(DPOTrainer, config(DPOConfig, **kw), tok, dataset))
    ours = train(build(FastPrefDPOTrainer, config(FastPrefDPOConfig, use_fastpref=True, **kw), tok, dataset))
    for logs in (stock, ours):
        assert logs[0]["rewards/chosen"] == 0.0 and logs[0]["rewards/rejected"] == 0.0, logs[0]
        assert logs[0]["rewards/accuracies"] == 0.0 and logs[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    for key in ("logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy"):
        assert ours[0][key] == pytest.approx(stock[0][key], rel=2e-2, abs=1e-2), key
