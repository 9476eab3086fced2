"""TRL integration: FastPrefKTOTrainer with the flag on equals stock trl 1.16 KTOTrainer metric by metric (and in
the trained parameters) within fp32 round-off, for every KTOConfig.loss_type, with a separate reference model and
with precomputed reference log-probs; with the flag off it *is* trl.KTOTrainer (bit for bit).

Tiny random Llama, in-process tokenizer, four SGD steps (SGD keeps parameter differences proportional to
gradient differences).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import KTOConfig, KTOTrainer  # noqa: E402

from fastpref.integrations.trl_kto import FastPrefKTOConfig, FastPrefKTOTrainer  # noqa: E402
from fastpref.testing.toy import toy_llama, toy_preference_records, toy_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

METRICS = ("loss", "grad_norm", "kl", "entropy", "num_tokens", "logits/chosen", "logits/rejected", "rewards/chosen",
           "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    """Unpaired records, desirable and undesirable mixed within every batch of 4."""
    rows = []
    for i, r in enumerate(toy_preference_records(16, seed=1)):
        good = i % 3 != 0
        rows.append({"prompt": r["prompt"], "completion": r["chosen"] if good else r["rejected"], "label": good})
    return datasets.Dataset.from_list(rows)


def config(cls, loss_type="kto", **kw):
    kw.setdefault("per_device_train_batch_size", 4)
    kw.setdefault("max_steps", 4)
    kw.setdefault("bf16", False)
    kw.setdefault("gradient_checkpointing", False)
    return cls(output_dir="/tmp/fastpref-test-trl-kto", logging_steps=1, report_to=[], learning_rate=0.5, optim="sgd",
               lr_scheduler_type="constant", save_strategy="no", use_cpu=True, seed=0, data_seed=0,
               loss_type=loss_type, desirable_weight=1.2, undesirable_weight=0.9,
               beta=0.2, **kw)


def run(cls, cfg, tok, dataset, *, ref_seed=1, peft=False):
    model = toy_llama(tok, hidden_size=32, num_layers=2)
    if peft:  # no reference model: TRL's reference is the policy with its adapter disabled
        from peft import LoraConfig

        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        trainer = cls(model, args=cfg, train_dataset=dataset, processing_class=tok, peft_config=lora)
        trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h], model
    # a peakier reference (larger init) scores the mismatched completions lower: z0 > 0, the KL term is live
    ref = toy_llama(tok, hidden_size=32, num_layers=2, seed=ref_seed, **({} if ref_seed == 0 else
                                                                         {"initializer_range": 0.1}))
    trainer = cls(model, ref_model=ref, args=cfg, train_dataset=dataset, processing_class=tok)
    assert trainer.accelerator.mixed_precision == ("bf16" if cfg.bf16 else "no")
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h], model


def assert_logs_close(got, want, rtol=1e-5):
    assert len(got) == len(want) == 4
    for step, (g, w) in enumerate(zip(got, want)):
        for key in METRICS:
            assert key in g and key in w, (step, key)
            assert g[key] == pytest.approx(w[key], rel=rtol, abs=1e-6), (step, key, g[key], w[key])


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("mode", ["auto", "lean"])
def test_flag_on_matches_stock_trl(tok, dataset, loss_type, mode):
    want, want_model = run(KTOTrainer, config(KTOConfig, loss_type), tok, dataset)
    got, got_model = run(FastPrefKTOTrainer, config(FastPrefKTOConfig, loss_type, use_fastpref=True,
                                                    fastpref_mode=mode), tok, dataset)
    assert_logs_close(got, want)
    if loss_type == "kto":
        assert any(h["kl"] > 0 for h in want)  # the KL term is exercised
    for (name, p), q in zip(got_model.named_parameters(), want_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_reference_equal_to_policy_gives_zero_rewards_at_step_0(tok, dataset):
    got, _ = run(FastPrefKTOTrainer, config(FastPrefKTOConfig, use_fastpref=True), tok, dataset, ref_seed=0)
    want, _ = run(KTOTrainer, config(KTOConfig), tok, dataset, ref_seed=0)
    assert got[0]["rewards/chosen"] == want[0]["rewards/chosen"] == 0.0
    assert got[0]["rewards/rejected"] == want[0]["rewards/rejected"] == 0.0
    assert_logs_close(got, want)


def test_precomputed_reference_matches_stock_trl(tok, dataset):
    want, _ = run(KTOTrainer, config(KTOConfig, precompute_ref_log_probs=True), tok, dataset)
    got, _ = run(FastPrefKTOTrainer, config(FastPrefKTOConfig, precompute_ref_log_probs=True, use_fastpref=True),
                 tok, dataset)
    assert_logs_close(got, want)


def test_gradient_accumulation_matches_stock_trl(tok, dataset):
    kw = dict(gradient_accumulation_steps=2, per_device_train_batch_size=2)
    want, _ = run(KTOTrainer, config(KTOConfig, **kw), tok, dataset)
    got, _ = run(FastPrefKTOTrainer, config(FastPrefKTOConfig, use_fastpref=True, **kw), tok, dataset)
    assert_logs_close(got, want)


def test_peft_matches_stock_trl(tok, dataset):
    pytest.importorskip("peft")
    want, _ = run(KTOTrainer, config(KTOConfig), tok, dataset, peft=True)
    got, _ = run(FastPrefKTOTrainer, config(FastPrefKTOConfig, use_fastpref=True), tok, dataset, peft=True)
    assert_logs_close(got, want)


def test_bf16_mixed_precision_matches_stock_trl(tok, dataset):
    """bf16 autocast as TRL runs it: step-0 rewards exactly 0 (reference = initial policy), as TRL's; the rest
    within 1e-5 (both score the same bf16 logits; measured: every metric within 1e-6 here)."""
    want, _ = run(KTOTrainer, config(KTOConfig, bf16=True), tok, dataset, ref_seed=0)
    got, _ = run(FastPrefKTOTrainer, config(FastPrefKTOConfig, bf16=True, use_fastpref=True), tok, dataset,
                 ref_seed=0)
    assert got[0]["rewards/chosen"] == want[0]["rewards/chosen"] == 0.0
    assert got[0]["rewards/rejected"] == want[0]["rewards/rejected"] == 0.0
    assert_logs_close(got, want)


def test_gradient_checkpointing_and_evaluate_match_stock_trl(tok, dataset):
    """KTOConfig's default gradient checkpointing on, then ``evaluate()`` (the loss under no-grad: forward only)."""
    results = []
    for cls, cfg_cls, kw in ((KTOTrainer, KTOConfig, {}), (FastPrefKTOTrainer, FastPrefKTOConfig,
                                                            {"use_fastpref": True})):
        cfg = config(cfg_cls, max_steps=2, gradient_checkpointing=True, **kw)
        model = toy_llama(tok, hidden_size=32, num_layers=2)
        ref = toy_llama(tok, hidden_size=32, num_layers=2, seed=1, initializer_range=0.1)
        trainer = cls(model, ref_model=ref, args=cfg, train_dataset=dataset, eval_dataset=dataset,
                      processing_class=tok)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        results.append((logs, trainer.evaluate()))
    (want, want_eval), (got, got_eval) = results
    for step, (g, w) in enumerate(zip(got, want)):
        for key in METRICS:
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (step, key)
    timing = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
    assert sorted(got_eval) == sorted(want_eval)
    for key in set(want_eval) - set(timing):
        assert got_eval[key] == pytest.approx(want_eval[key], rel=1e-5, abs=1e-6), key


def test_flag_off_is_trl(tok, dataset):
    want, _ = run(KTOTrainer, config(KTOConfig, max_steps=2), tok, dataset)
    got, _ = run(FastPrefKTOTrainer, config(FastPrefKTOConfig, max_steps=2), tok, dataset)
    strip = lambda logs: [{k: v for k, v in h.items() if k not in ("train_runtime",)} for h in logs]
    assert strip(got) == strip(want)


def test_unsupported_and_bad_fields_are_refused():
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        config(FastPrefKTOConfig, use_fastpref=True, router_aux_loss_coef=0.01)
    with pytest.raises(ValueError, match="fastpref_mode"):
        config(FastPrefKTOConfig, fastpref_mode="quick")
    with pytest.raises(ValueError, match="fastpref_memory_budget"):
        config(FastPrefKTOConfig, fastpref_memory_budget=-1)
    config(FastPrefKTOConfig, use_fastpref=False, router_aux_loss_coef=0.01)  # trl's own path: accepted
