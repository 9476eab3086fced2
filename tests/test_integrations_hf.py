"""Hugging Face integration: the fused head inside the model's forward, the collator, FastPrefTrainer.

Tiny random models built from configs and an in-process tokenizer (nothing downloaded). The ground truth is
the model's own materialised logits in fp32; fused results must match within fp32 round-off.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastpref.integrations.collator import PreferenceCollator, tokenize_preference
from fastpref.integrations.fused_head import add_fused_lm_head, head_transform, is_patched
from fastpref.integrations.hf import (
    FastPrefTrainer,
    FastPrefTrainingArguments,
    build_preference_loss,
    materialised_logps,
    shifted_sequence_ids,
)
from fastpref.testing.toy import toy_llama, toy_preference_records

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread per test worker


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def materialised_token_logps(model, ids, labels, **kw) -> torch.Tensor:
    logits = model(ids, **kw).logits.float()
    target = labels[:, 1:]
    mask = target != -100
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * mask


def random_batch(vocab: int, rows: int = 4, width: int = 11, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, vocab, (rows, width), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 8:] = -100
    return ids, labels


# ---------------------------------------------------------------------------------------------------- fused head
def _gemma2(vocab: int):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0,
                       attn_implementation="eager")
    return Gemma2ForCausalLM(cfg)


def _cohere(vocab: int):
    from transformers import CohereConfig, CohereForCausalLM

    cfg = CohereConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, logit_scale=0.25)
    return CohereForCausalLM(cfg)


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "gemma2-softcap", "cohere-logit-scale"])
def test_return_logps_matches_model_logits(tok, arch):
    vocab = len(tok)
    model = {
        "llama": lambda: toy_llama(tok, hidden_size=32, num_layers=1),
        "llama-tied": lambda: toy_llama(tok, hidden_size=32, num_layers=1, tie_word_embeddings=True),
        "gemma2-softcap": lambda: _gemma2(vocab),
        "cohere-logit-scale": lambda: _cohere(vocab),
    }[arch]()
    ids, labels = random_batch(vocab)
    want = materialised_token_logps(model, ids, labels)
    add_fused_lm_head(model)
    assert is_patched(model)
    out = model(ids, labels=labels, return_logps=True)
    assert out.token_logps.shape == (4, 10) and out.token_logps.dtype == torch.float32
    assert rel(out.token_logps, want) < 1e-6
    assert (out.token_logps[labels[:, 1:] == -100] == 0).all()
    torch.testing.assert_close(out.sequence_logps, want.sum(-1), rtol=1e-6, atol=1e-5)
    # shift_labels (pre-shifted, as under context parallelism) scores every position it is given.
    shifted = model(ids, shift_labels=torch.cat([labels[:, 1:], torch.full((4, 1), -100)], 1), return_logps=True)
    torch.testing.assert_close(shifted.token_logps[:, :-1], out.token_logps)


def test_head_transform_read_from_config(tok):
    assert head_transform(_gemma2(len(tok))) == {"logit_scale": 1.0, "softcap": 3.0}
    assert head_transform(_cohere(len(tok))) == {"logit_scale": 0.25, "softcap": None}
    assert head_transform(toy_llama(tok, hidden_size=32, num_layers=1)) == {"logit_scale": 1.0, "softcap": None}


def test_plain_forward_and_generation_unchanged(tok):
    model = toy_llama(tok, hidden_size=32, num_layers=1)
    ids, labels = random_batch(len(tok))
    before = model(ids, labels=labels)
    gen_before = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False)
    add_fused_lm_head(model)
    add_fused_lm_head(model)  # idempotent
    after = model(ids, labels=labels)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.loss, after.loss)
    assert torch.equal(gen_before, model.generate(ids[:, :5], max_new_tokens=4, do_sample=False))
    with pytest.raises(TypeError, match="seq_ids"):
        model(ids, seq_ids=torch.zeros_like(ids))


def test_deepcopy_of_patched_model_is_independent(tok):
    model = add_fused_lm_head(toy_llama(tok, hidden_size=32, num_layers=1))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2.0)
    ids, labels = random_batch(len(tok))
    assert not torch.equal(twin(ids).logits, model(ids).logits)
    assert not torch.equal(twin(ids, labels=labels, return_logps=True).token_logps,
                           model(ids, labels=labels, return_logps=True).token_logps)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["plain", "tied", "checkpointing", "lean"])
def test_preference_forward_loss_and_grads_match_materialised(tok, variant):
    """The whole fused loss inside the forward equals the materialised-logits loss, gradients included, with tied
    embeddings (the head's gradient adds to the embedding's) and with gradient checkpointing."""
    model = toy_llama(tok, hidden_size=32, num_layers=2, tie_word_embeddings=variant == "tied")
    model.train()
    if variant == "checkpointing":
        model.gradient_checkpointing_enable({"use_reentrant": False})
    ids, labels = random_batch(len(tok))
    ref = torch.randn(4, generator=torch.Generator().manual_seed(1)) - 20.0
    loss_fn = build_preference_loss(model, "sigmoid", beta=0.5, mode="lean" if variant == "lean" else "auto")

    ref_model = copy.deepcopy(model)
    seq = shifted_sequence_ids({}, labels)
    policy = materialised_logps(ref_model(ids).logits, labels, seq, 4)
    from fastpref.integrations.hf import materialised_preference_output

    want = materialised_preference_output(loss_fn, policy, ref, None)
    want.loss.backward()
    add_fused_lm_head(model)
    out = model(ids, labels=labels, preference_loss=loss_fn, ref_logps=ref)
    out.loss.backward()
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    for key in ("rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen",
                "entropy", "mean_token_accuracy"):
        torch.testing.assert_close(out.preference.metrics[key], want.metrics[key], rtol=1e-5, atol=1e-6)
    got, expected = _grads(model), _grads(ref_model)
    assert got.keys() == expected.keys()
    for name in expected:
        assert rel(got[name], expected[name]) < 1e-5, name


def test_preference_forward_rejects_mismatched_transform(tok):
    model = add_fused_lm_head(_gemma2(len(tok)))
    ids, labels = random_batch(len(tok))
    from fastpref import DPOLoss

    with pytest.raises(ValueError, match="head_transform"):
        model(ids, labels=labels, preference_loss=DPOLoss(), ref_logps=torch.zeros(4))


def test_packed_forward_equals_padded(tok):
    """One packed row (position ids restart per sequence, sdpa's block mask) gives the padded batch's loss,
    metrics and gradients."""
    records = toy_preference_records(3, seed=3)
    padded = PreferenceCollator(tok)(records)
    packed = PreferenceCollator(tok, padding_free=True)(records)
    assert packed["input_ids"].shape[0] == 1 and packed["num_seqs"] == 6
    model = add_fused_lm_head(toy_llama(tok, hidden_size=32, num_layers=2))
    twin = copy.deepcopy(model)
    loss_fn = build_preference_loss(model, "ipo", beta=0.3)
    ref = torch.linspace(-30, -10, 6)
    a = model(padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"],
              preference_loss=loss_fn, ref_logps=ref)
    b = twin(packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"],
             seq_ids=packed["seq_ids"], num_seqs=packed["num_seqs"], preference_loss=loss_fn, ref_logps=ref)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.preference.chosen_logps, a.preference.chosen_logps, rtol=1e-5, atol=1e-5)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert rel(q.grad, p.grad) < 1e-4, name
    # return_logps on the packed row gives the same per-sequence sums.
    seq_sums = twin(packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"],
                    seq_ids=packed["seq_ids"], num_seqs=6, return_logps=True).sequence_logps
    torch.testing.assert_close(seq_sums, a.preference.chosen_logps.new_tensor(
        [*a.preference.chosen_logps.tolist(), *a.preference.rejected_logps.tolist()]), rtol=1e-5, atol=1e-4)


def test_return_logps_packed_sums_are_deterministic_segment_sums(tok):
    """return_logps on a packed row sums per sequence without index_add (float atomics on CUDA: reruns would
    differ): the sorted fp64 segment sum of fastpref.ops.sum_by_id."""
    from torch.utils._python_dispatch import TorchDispatchMode

    records = toy_preference_records(3, seed=4)
    packed = PreferenceCollator(tok, padding_free=True)(records)
    model = add_fused_lm_head(toy_llama(tok, hidden_size=32, num_layers=1))
    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func._overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Ops():
        out = model(packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"],
                    seq_ids=packed["seq_ids"], num_seqs=6, return_logps=True)
    assert not [op for op in seen if op.startswith("index_add")]
    ids = packed["seq_ids"][..., 1:].reshape(-1)
    tok_logps = out.token_logps.reshape(-1).double()
    want = torch.stack([tok_logps[ids == s].sum() for s in range(6)])
    torch.testing.assert_close(out.sequence_logps.double(), want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- collator
def test_padded_collator_matches_trl(tok):
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    records = toy_preference_records(5, seed=2)
    toks = [tokenize_preference(r, tok) for r in records]
    ours = PreferenceCollator(tok, max_length=12)(records)
    theirs = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=12)(toks)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    assert torch.equal(ours["labels"], ours["input_ids"].masked_fill(ours["completion_mask"] == 0, -100))


def test_collator_chat_records_and_packed_layout(tok):
    records = toy_preference_records(2, conversational=True)
    toks = tokenize_preference(records[0], tok)
    assert tok.decode(toks["prompt_ids"]).endswith("<|assistant|>")
    packed = PreferenceCollator(tok, padding_free=True, pad_to_multiple_of=8, return_flash_attn_kwargs=True)(records)
    n = packed["input_ids"].shape[1]
    assert n % 8 == 0 and packed["cu_seq_lens_q"][-1] == n
    seq = packed["seq_ids"][0]
    starts = torch.nonzero(packed["position_ids"][0] == 0).flatten()
    assert (packed["labels"][0, starts] == -100).all()  # no token is predicted across a sequence boundary
    assert set(seq.tolist()) <= {-1, 0, 1, 2, 3}
    with pytest.raises(ValueError, match="prompt"):
        PreferenceCollator(tok)([{"chosen": "a", "rejected": "b"}])


# ---------------------------------------------------------------------------------------------------- trainer
def _train(tok, records, *, steps: int = 3, model=None, ref_model=None, **kw):
    model = model if model is not None else toy_llama(tok, hidden_size=32, num_layers=2)
    kw.setdefault("per_device_train_batch_size", 4)
    args = FastPrefTrainingArguments(output_dir="/tmp/fastpref-test-hf", max_steps=steps, logging_steps=1,
                                     report_to=[], learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                                     save_strategy="no", use_cpu=True, seed=0, data_seed=0, **kw)
    trainer = FastPrefTrainer(model, args, ref_model=ref_model, train_dataset=records, processing_class=tok)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h], model, trainer


METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
           "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy", "num_tokens", "grad_norm")


def assert_logs_close(got: list[dict], want: list[dict], *, rtol: float = 2e-5, skip_first_accuracy: bool = False):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        for key in METRICS:
            assert g[key] == pytest.approx(w[key], rel=rtol, abs=1e-6), (step, key)
        # At step 0 the policy *is* the reference: TRL's rewards are exactly 0 (accuracy 0), ours ±1 ulp.
        if step or not skip_first_accuracy:
            assert g["rewards/accuracies"] == w["rewards/accuracies"], (step, "rewards/accuracies")


def assert_params_close(a, b, tol: float = 1e-5):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert rel(q, p) < tol, name


@pytest.fixture(scope="module")
def records():
    return toy_preference_records(16, seed=0)


@pytest.fixture(scope="module")
def materialised_run(tok, records):
    return _train(tok, records, use_fastpref=False)


def test_trainer_flag_on_equals_materialised(tok, records, materialised_run):
    want, want_model, _ = materialised_run
    got, model, trainer = _train(tok, records, use_fastpref=True)
    assert trainer.ref_model is not None  # a frozen copy of the initial policy
    assert_logs_close(got, want)
    assert_params_close(model, want_model)
    assert set(METRICS) | {"rewards/accuracies"} <= set(got[0])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "materialised"])
def test_trainer_bf16_separate_reference_gives_zero_rewards_at_step_0(tok, records, fused):
    """bf16 mixed precision with a separate reference model equal to the policy: the reference is scored under
    the same autocast as the policy, so the first step's rewards are exactly 0 and the loss ln 2."""
    model = toy_llama(tok, hidden_size=32, num_layers=2)
    logs, _, _ = _train(tok, records, steps=1, model=model, ref_model=copy.deepcopy(model), bf16=True,
                        use_fastpref=fused)
    assert logs[0]["rewards/chosen"] == 0.0 and logs[0]["rewards/rejected"] == 0.0, logs[0]
    assert logs[0]["rewards/accuracies"] == 0.0 and logs[0]["loss"] == pytest.approx(0.6931, abs=1e-4)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "materialised"])
def test_trainer_packed_equals_padded(tok, records, materialised_run, fused):
    want, want_model, _ = materialised_run
    got, model, _ = _train(tok, records, use_fastpref=fused, padding_free=True)
    assert_logs_close(got, want, rtol=1e-4)
    assert_params_close(model, want_model, tol=1e-4)


def test_trainer_gradient_accumulation(tok, records, materialised_run):
    want, want_model, _ = materialised_run
    got, model, _ = _train(tok, records, use_fastpref=True, per_device_train_batch_size=2,
                           gradient_accumulation_steps=2)
    assert_params_close(model, want_model)
    assert [g["loss"] for g in got] == pytest.approx([w["loss"] for w in want], rel=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "sr_ipo"])
def test_trainer_precomputed_reference_equals_live(tok, records, loss_type):
    kw = dict(use_fastpref=True, loss_type=[loss_type], refinement_lambda=0.5)
    live, live_model, _ = _train(tok, records, **kw)
    pre, pre_model, trainer = _train(tok, records, precompute_ref_log_probs=True, **kw)
    assert trainer.ref_model is None and "ref_chosen_logps" in trainer.train_dataset[0]
    if loss_type == "sr_ipo":
        assert "ref_refine_chosen_logps" in trainer.train_dataset[0]
    assert_logs_close(pre, live, skip_first_accuracy=False)
    assert_params_close(pre_model, live_model, tol=1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "materialised"])
def test_trainer_sr_dpo_lambda_zero_equals_sigmoid(tok, records, materialised_run, fused):
    want, want_model, _ = materialised_run
    got, model, trainer = _train(tok, records, use_fastpref=fused, loss_type=["sr_dpo"], refinement_lambda=0.0)
    assert trainer.refinement_prompt and "Query:" in trainer.refinement_prompt
    assert_logs_close(got, want)
    assert_params_close(model, want_model)


def test_trainer_sr_dpo_refinement_moves_loss(tok, records, materialised_run):
    """λ > 0 actually uses the p ⊕ x batch: fused and materialised agree, and differ from DPO."""
    fused, fused_model, _ = _train(tok, records, steps=2, use_fastpref=True, loss_type=["sr_dpo"],
                                   refinement_lambda=1.0)
    plain, plain_model, _ = _train(tok, records, steps=2, use_fastpref=False, loss_type=["sr_dpo"],
                                   refinement_lambda=1.0)
    assert_logs_close(fused, plain)
    assert_params_close(fused_model, plain_model)
    dpo = materialised_run[0]
    assert abs(fused[1]["loss"] - dpo[1]["loss"]) > 1e-4


def test_trainer_peft_reference_is_adapter_disabled(tok, records):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          init_lora_weights=False)
    runs = {}
    for fused in (True, False):
        model = toy_llama(tok, hidden_size=32, num_layers=2)
        args = FastPrefTrainingArguments(output_dir="/tmp/fastpref-test-hf", max_steps=2, logging_steps=1,
                                         report_to=[], learning_rate=0.5, optim="sgd", save_strategy="no",
                                         use_cpu=True, per_device_train_batch_size=4, use_fastpref=fused)
        torch.manual_seed(0)
        trainer = FastPrefTrainer(model, args, train_dataset=records, processing_class=tok, peft_config=cfg)
        assert trainer.ref_model is None
        trainer.train()
        runs[fused] = [h for h in trainer.state.log_history if "loss" in h]
    # init_lora_weights=False: the adapter starts non-zero, so rewards are non-zero from step 0.
    assert runs[True][0]["rewards/margins"] != 0.0
    assert_logs_close(runs[True], runs[False], skip_first_accuracy=False)


def test_arguments_validation():
    with pytest.raises(ValueError, match="loss_weights"):
        FastPrefTrainingArguments(output_dir="/tmp/x", loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    args = FastPrefTrainingArguments(output_dir="/tmp/x", loss_type="ipo")
    assert args.loss_type == ["ipo"] and args.use_fastpref is False and args.remove_unused_columns is False


@pytest.mark.parametrize("field,value,expected", [
    ("fastpref_gemm", "cuBLAS", "'cublas'"), ("fastpref_gemm", "bogus", "'fused'"),
    ("fastpref_mode", "Fast", "'lean'"), ("fastpref_backend", "cuda", "'triton'"),
    ("fastpref_memory_budget", 0, "positive int")])
def test_bad_fastpref_field_raises_when_the_arguments_are_built(field, value, expected):
    with pytest.raises(ValueError, match=rf"^{field}: expected .*{expected}.*got {value!r}"):
        FastPrefTrainingArguments(output_dir="/tmp/x", use_cpu=True, report_to=[], **{field: value})


@pytest.mark.interpreter
def test_fused_head_triton_backend_under_interpreter(tok):
    """The backend choice reaches the kernels: Triton (interpreted on the CPU) gives the torch path's results."""
    pytest.importorskip("triton")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py on CPU-only machines)")
    ids, labels = random_batch(len(tok), rows=2, width=7)
    model = toy_llama(tok, hidden_size=32, num_layers=1)
    want = materialised_token_logps(model, ids, labels)
    add_fused_lm_head(model, backend="triton")
    got = model(ids, labels=labels, return_logps=True).token_logps
    assert rel(got, want) < 1e-5
    loss_fn = build_preference_loss(model, "sigmoid", beta=0.5, backend="triton")
    out = model(ids, labels=labels, preference_loss=loss_fn, ref_logps=torch.tensor([-30.0, -20.0]))
    out.loss.backward()
    assert model.lm_head.weight.grad is not None and torch.isfinite(model.lm_head.weight.grad).all()


def test_trainer_fused_gemm_path_equals_materialised(tok, records, materialised_run):
    """``fastpref_gemm="fused"`` reaches the loss and the patched head (the Triton GEMMs, interpreted on the CPU):
    the same training run as the materialised path."""
    pytest.importorskip("triton")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py on CPU-only machines)")
    want, want_model, _ = materialised_run
    got, model, trainer = _train(tok, records, use_fastpref=True, fastpref_backend="triton", fastpref_gemm="fused")
    assert trainer.loss_fn.config.gemm == "fused"
    assert trainer.loss_fn.config.backend == "triton"
    assert_logs_close(got, want)
    assert_params_close(model, want_model)


def test_trainer_evaluate_and_datasets_precompute(tok):
    """``evaluate`` logs TRL's metrics under ``eval_``; datasets.Dataset inputs get the precomputed columns."""
    datasets = pytest.importorskip("datasets")
    train_ds = datasets.Dataset.from_list(toy_preference_records(8, seed=1))
    eval_ds = datasets.Dataset.from_list(toy_preference_records(6, seed=2, conversational=True))
    results = {}
    for fused in (True, False):
        args = FastPrefTrainingArguments(output_dir="/tmp/fastpref-test-hf", report_to=[], use_cpu=True,
                                         per_device_eval_batch_size=4, use_fastpref=fused,
                                         precompute_ref_log_probs=True, loss_type=["ipo"])
        trainer = FastPrefTrainer(toy_llama(tok, hidden_size=32, num_layers=1), args, train_dataset=train_ds,
                                  eval_dataset=eval_ds, processing_class=tok)
        assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(trainer.eval_dataset.column_names)
        results[fused] = trainer.evaluate()
    assert {"eval_loss", "eval_rewards/accuracies", "eval_logps/chosen", "eval_entropy",
            "eval_mean_token_accuracy"} <= set(results[True])
    for key, value in results[False].items():
        # Before any step the policy is the reference: exact ties on the materialised path, ±1 ulp when fused.
        if "runtime" not in key and "per_second" not in key and key != "eval_rewards/accuracies":
            assert results[True][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_token_accuracy_and_entropy_match_materialised(tok):
    """mean_token_accuracy / entropy from the kernel pass, on a batch where most targets are the model's top-1
    (a random model's accuracy is ~0, which would hide a broken top-1 test)."""
    model = toy_llama(tok, hidden_size=32, num_layers=1)
    ids, labels = random_batch(len(tok))
    with torch.no_grad():
        top1 = model(ids).logits.argmax(-1)  # the top-1 token after each position
    labels = labels.clone()
    hit = labels[:, 1:] != -100
    labels[:, 1:] = torch.where(hit, top1[:, :-1], labels[:, 1:])
    labels[0, 6] = (labels[0, 6] + 1) % len(tok)  # one miss in a chosen row
    loss_fn = build_preference_loss(model, "sigmoid", beta=0.5)
    policy = materialised_logps(model(ids).logits, labels, shifted_sequence_ids({}, labels), 4)
    from fastpref.integrations.hf import materialised_preference_output

    want = materialised_preference_output(loss_fn, policy, torch.zeros(4), None).metrics
    assert 0.5 < want["mean_token_accuracy"] < 1.0
    add_fused_lm_head(model)
    for grad in (True, False):  # fast path and forward-only path
        with torch.set_grad_enabled(grad):
            got = model(ids, labels=labels, preference_loss=loss_fn, ref_logps=torch.zeros(4)).preference.metrics
        torch.testing.assert_close(got["mean_token_accuracy"], want["mean_token_accuracy"])
        torch.testing.assert_close(got["entropy"], want["entropy"], rtol=1e-5, atol=1e-6)


def test_flag_off_log_probs_computed_once(tok):
    """The materialised path's log-probs and token statistics share one log-softmax over the vocabulary."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func._overloadpacket is torch.ops.aten._log_softmax
            return func(*args, **(kwargs or {}))

    ids, labels = random_batch(len(tok), rows=4, width=9)
    logits = toy_llama(tok, hidden_size=32, num_layers=1)(ids).logits
    with Count() as count:
        out = materialised_logps(logits, labels, shifted_sequence_ids({}, labels), 4)
    assert count.n == 1 and out.stats is not None


def test_fused_reference_needs_the_loss(tok):
    from fastpref.integrations.trainer_common import fused_reference_logps

    ids, labels = random_batch(len(tok), rows=2, width=7)
    model = add_fused_lm_head(toy_llama(tok, hidden_size=32, num_layers=1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with pytest.raises(ValueError, match=r"^loss_fn: .*got None"):
        fused_reference_logps(model, batch, None)
