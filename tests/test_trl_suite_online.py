"""TRL's own GRPO / RLOO trainer tests (``tests/test_grpo_trainer.py``, ``tests/test_rloo_trainer.py``; the newest
snapshot of TRL's repository reachable here is 1.10.0.dev0, commit f2cd577, whose GRPO / RLOO config fields are
1.16's; the cases were run against the installed trl 1.16.0), ported offline with fast mode on: each training
case runs with stock TRL and with ``FastPref{GRPO,RLOO}Trainer``
(``use_fastpref=True``, the default ``fastpref_mode="auto"``) and every logged number must agree (rtol 1e-5,
1e-6 absolute), and ``fastpref_head_paths`` must say the head ran fast on every training micro-batch (or, where
TRL's loss needs every entropy first, lean: nothing predicted).

TRL's tests load tiny hub checkpoints (``trl-internal-testing/tiny-*``) and the ``zen`` datasets; here the models
are built from their configs at toy sizes (Llama, Cohere2 with a logit scale, Gemma2 tied and softcapped, Qwen3-MoE
and GPT-OSS with the router's auxiliary loss, GLM4-MoE, a 152k vocabulary) and the datasets in memory. Generation is
TRL's own, seeded (both runs see the same completions), or mocked where TRL's test mocks it. Cases TRL reaches only
through tools or vLLM (``tool_mask``, importance-sampling ratios, sampling log-probs) are fed to one training step;
the VLM cases are checked at model level (tiny LLaVA / Gemma3).

Not ported: vLLM (server / colocate, structured outputs, its weight sync), Liger (its Triton kernels fail under the
CPU interpreter; TRL 1.16 deprecates ``use_liger_kernel`` and no longer routes the loss through it), bitsandbytes /
``use_kernels`` (hub kernels, GPU), ``trust_remote_code`` and hub-only model / tokenizer ids, the trainer-level VLM
runs (hub processors and image datasets), tool calling and environments (need a tool-aware chat template / response
schema of a hub tokenizer; their ``tool_mask`` is covered), ``dataloader_num_workers`` and pure unit tests of TRL
helpers (entropy / off-policy masks, SAPO / gamma weights, rollout dispatch mocks), which never reach the head.
"""

from __future__ import annotations

import collections
import contextlib
import math
from unittest.mock import patch

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

from fastpref.integrations.trl_trainers import (  # noqa: E402
    FastPrefGRPOConfig,
    FastPrefGRPOTrainer,
    FastPrefRLOOConfig,
    FastPrefRLOOTrainer,
)
from fastpref.testing.toy import toy_llama, toy_preference_records  # noqa: E402
from tests.helpers import HAS_TRITON  # noqa: E402
from tests.test_integrations_trl_head import _common, _reward  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "_no_full_gc")


@pytest.fixture
def _no_full_gc(monkeypatch):
    """The end of ``Trainer.train`` frees memory with a full ``gc.collect()`` (accelerate's ``clear_device_cache``):
    most of a tiny run's time on CPU, and nothing to do with the numbers compared."""
    import accelerate.utils.memory as memory

    monkeypatch.setattr(memory, "clear_device_cache", lambda garbage_collection=False: None)

ONLINE = {"grpo": (GRPOConfig, GRPOTrainer, FastPrefGRPOConfig, FastPrefGRPOTrainer),
          "rloo": (RLOOConfig, RLOOTrainer, FastPrefRLOOConfig, FastPrefRLOOTrainer)}

# -- models: TRL's tiny test architectures, built from their configs ------------------------------------------------


def _arch(name: str, tok) -> torch.nn.Module:
    import transformers as tf

    if name == "llama":
        return toy_llama(tok, hidden_size=32, num_layers=2)
    if name == "llama-152k":  # tiny-Qwen2's vocabulary width: the head's row groups at a realistic V
        return toy_llama(tok, hidden_size=16, num_layers=1, vocab_size=151_936)
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    config_cls, model_cls, kw = {
        "cohere2": (tf.Cohere2Config, tf.Cohere2ForCausalLM, dict(logit_scale=0.5, sliding_window=4)),  # tied
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,  # tied, softcapped logits
                   dict(head_dim=8, final_logit_softcapping=5.0, sliding_window=4)),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=8)),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,  # the router's aux loss (aux_loss_enabled)
                      dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8,
                           router_aux_loss_coef=0.05)),
        "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM,
                    dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=4,
                         router_aux_loss_coef=0.05)),
        "glm4_moe": (tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM,
                     dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8,
                          first_k_dense_replace=1, n_group=1, topk_group=1)),
    }[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model_cls(config_cls(**common, **kw))


@pytest.fixture(scope="module")
def arch_path(tmp_path_factory, tok):
    """A saved checkpoint per architecture (TRL loads the policy and, with beta > 0, the reference from it)."""
    paths = {}

    def get(name: str, dtype: torch.dtype = torch.float32) -> str:
        key = (name, dtype)
        if key not in paths:
            path = tmp_path_factory.mktemp(f"{name}-{str(dtype)[6:]}")
            _arch(name, tok).to(dtype).save_pretrained(path)
            paths[key] = str(path)
        return paths[key]

    return get


def _prompts(n: int = 12, conversational: bool = False, **extra_columns) -> datasets.Dataset:
    records = toy_preference_records(n, seed=0, conversational=conversational)
    rows = [{"prompt": r["prompt"], **{k: v[i % len(v)] for k, v in extra_columns.items()}}
            for i, r in enumerate(records)]
    return datasets.Dataset.from_list(rows)


# -- the comparison -------------------------------------------------------------------------------------------------

_NOT_COMPARED = ("runtime", "per_second", "step_time", "time")  # wall-clock numbers


def _train(kind, flag, tok, model, *, reward_funcs=_reward, data=None, peft_config=None, train=True,
           trainer_kw=None, backend="torch", **kw):
    """One run: stock TRL (``flag=False``) or the flag on, from ``model`` (a path or a factory of a fresh model)."""
    cfg_cls, tr_cls, fp_cfg, fp_tr = ONLINE[kind]
    # RLOO's sequence ratios move ~50x faster: a smaller step keeps a second iteration's ratios unclipped
    args = _common(**{"learning_rate": 0.05 if kind == "grpo" else 0.001, "num_generations": 3,
                      "per_device_train_batch_size": 3, "max_completion_length": 8, "max_steps": 2, **kw})
    config = fp_cfg(**args, use_fastpref=True, fastpref_backend=backend) if flag else cfg_cls(**args)
    if not isinstance(model, str):
        with torch.random.fork_rng(devices=[]):  # the same adapter initialisation in both runs
            torch.manual_seed(0)
            model = model()
    trainer = (fp_tr if flag else tr_cls)(
        model, reward_funcs=reward_funcs, args=config,
        train_dataset=_prompts() if data is None else data, processing_class=tok, peft_config=peft_config,
        **(trainer_kw or {}))
    if train:
        trainer.train()
    return trainer


def _numbers(trainer):
    return [{k: v for k, v in h.items() if not any(s in k for s in _NOT_COMPARED) and isinstance(v, (int, float))}
            for h in trainer.state.log_history]


def _assert_same_logs(got, want, rtol=1e-5):
    """Every logged number (losses, grad norms, entropies, KL, clip ratios, rewards, lengths, eval metrics) equal."""
    got, want = _numbers(got), _numbers(want)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert sorted(g) == sorted(w), i
        for key, value in w.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(g[key]), (i, key, g[key], value)
            else:
                assert g[key] == pytest.approx(value, rel=rtol, abs=1e-6), (i, key, g[key], value)


def _compare_near_float64(kind, tok, arch, **kw):
    """Where stock TRL's own fp32 numbers drift visibly (RLOO's second iteration: ``exp(Σ log p - Σ log p_old)``
    with Σ log p ≈ -40 rounds by ~1e-6, and its loss is a near-cancelling mean): each logged number of the flag-on
    run within rtol 1e-5 of stock TRL's, or within twice stock TRL's own distance to a float64 run of stock TRL.
    (Policy from a model object: beta = 0, TRL's float64 config is refused by its dtype check.)"""
    exact, want, got = (_train(kind, flag, tok, lambda dtype=dtype: _arch(arch, tok).to(dtype), **kw)
                        for flag, dtype in ((False, torch.float64), (False, torch.float32), (True, torch.float32)))
    assert len(_numbers(got)) == len(_numbers(want)) == len(_numbers(exact))
    for i, (e, w, g) in enumerate(zip(_numbers(exact), _numbers(want), _numbers(got))):
        assert sorted(g) == sorted(w) == sorted(e), i
        for key in w:
            near_trl = abs(g[key] - w[key]) <= 1e-5 * abs(w[key]) + 1e-6
            near_exact = abs(g[key] - e[key]) <= 2 * abs(w[key] - e[key]) + 1e-6 * abs(e[key]) + 1e-9
            assert near_trl or near_exact, (i, key, g[key], w[key], e[key])
    norms = [h["grad_norm"] for h in want.state.log_history if "grad_norm" in h]
    assert norms and min(norms) > 0, norms
    return got, want


def _assert_fast(trainer, **expected):
    """``fastpref_head_paths``: fast on each training micro-batch (the default), or ``expected``."""
    micro_batches = trainer.state.global_step * trainer.args.gradient_accumulation_steps
    assert trainer.fastpref_head_paths == collections.Counter(expected or {"fast": micro_batches})


def _compare(kind, tok, model, rtol=1e-5, zero_gradient=False, **kw):
    """Stock TRL and the flag on, every logged number equal; a gradient to compare (unless ``zero_gradient``)."""
    want = _train(kind, False, tok, model, **{k: v for k, v in kw.items() if k != "backend"})
    got = _train(kind, True, tok, model, **kw)
    _assert_same_logs(got, want, rtol)
    norms = [h["grad_norm"] for h in want.state.log_history if "grad_norm" in h]
    assert norms and (max(norms) == 0 if zero_gradient else min(norms) > 0), norms
    return got, want


# -- TRL's configuration cases, on the toy Llama ----------------------------------------------------------------------
# (name in TRL's test file -> the config it trains with; TRL's batch 3 x 3 generations, odd on purpose)
GRPO_CONFIGS = {
    # test_train_loss_types (gradient_accumulation_steps=2 "to test that DAPO can operate with accumulated batch")
    **{f"loss_types-{t}": dict(loss_type=t, gradient_accumulation_steps=2,
                               **({"importance_sampling_level": "sequence"} if t == "luspo" else {}))
       for t in ("bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")},
    "multiple_iterations": dict(num_iterations=2),
    "beta_non_zero": dict(beta=0.1),
    "pad_to_multiple_of": dict(pad_to_multiple_of=8, beta=0.1),
    "off_policy_mask": dict(off_policy_mask_threshold=0.5, num_iterations=2),
    "bias_correction_kl-delta_clipping": dict(beta=0.1, use_bias_correction_kl=True, delta=2.0, num_iterations=2),
    "static_entropy": dict(entropy_coef=0.1),
    "adaptive_entropy": dict(entropy_coef=0.1, use_adaptive_entropy=True, entropy_target=1.0),
    "adaptive_entropy_gradient_accumulation": dict(entropy_coef=0.01, use_adaptive_entropy=True, entropy_target=15.0,
                                                   entropy_coef_delta=0.005, gradient_accumulation_steps=2),
    # test_entropy_bonus_scale (grpo, dr_grpo, dapo, luspo; dapo is static_entropy), with accumulation here
    **{f"entropy_bonus_scale-{t}": dict(loss_type=t, entropy_coef=0.5, max_completion_length=16,
                                        gradient_accumulation_steps=2,
                                        **({"importance_sampling_level": "sequence"} if t == "luspo" else {}))
       for t in ("grpo", "dr_grpo", "luspo")},
    # test_train_scale_rewards: False / "none" and True / "group" are the same setting; rewards only change advantages
    **{f"scale_rewards-{s}": dict(scale_rewards=s) for s in (False, "batch")},
    "sequence_importance_sampling": dict(importance_sampling_level="sequence", num_iterations=2),
    "num_generations_larger_than_batch_size": dict(num_generations=6, gradient_accumulation_steps=2),
    # test_prepare_input_called_with_correct_data: a generation reused over steps and iterations, unshuffled
    "steps_per_generation-iterations": dict(gradient_accumulation_steps=3, steps_per_generation=4, num_generations=4,
                                            per_device_train_batch_size=2, num_iterations=2, shuffle_dataset=False,
                                            max_steps=2),
    # test_train_with_generation_kwargs / _additional_generation_kwargs (generation only)
    "generation_kwargs": dict(generation_kwargs={"top_k": 5}, top_p=0.9, min_p=0.01, repetition_penalty=1.1),
    "temperature-beta": dict(temperature=0.7, beta=0.1, num_iterations=2),  # the head's T on policy and reference
    "reentrant_checkpointing": dict(gradient_checkpointing_kwargs={"use_reentrant": True}, beta=0.1),
    "mask_truncated_all_masked": dict(mask_truncated_completions=True, loss_type="dapo", zero_gradient=True),
    "sync_ref_model": dict(beta=0.1, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5,
                           max_steps=3),
}


@pytest.mark.parametrize("case", list(GRPO_CONFIGS))
def test_grpo_trl_config_cases(tok, arch_path, case):
    got, _ = _compare("grpo", tok, arch_path("llama"), **GRPO_CONFIGS[case])
    _assert_fast(got)


def test_grpo_entropy_filter_runs_lean(tok, arch_path):
    """test_train_with_entropy_filter (top_entropy_quantile < 1): TRL's loss needs every entropy before any
    gradient, so "auto" predicts nothing and the head runs lean (recompute in the backward): TRL's numbers."""
    got, _ = _compare("grpo", tok, arch_path("llama"), top_entropy_quantile=0.2)
    assert got.fastpref_head_paths == collections.Counter()


RLOO_CONFIGS = {
    "default": dict(),
    "beta_zero": dict(beta=0.0),
    "pad_to_multiple_of": dict(pad_to_multiple_of=8),
    "normalized_advantages": dict(normalize_advantages=True),
    "clipped_rewards": dict(reward_clip_range=(-1.0, 1.0)),
    "num_generations_larger_than_batch_size": dict(num_generations=6, gradient_accumulation_steps=2),
    "mask_truncated_all_masked": dict(mask_truncated_completions=True, zero_gradient=True),
    "sync_ref_model": dict(beta=0.1, sync_ref_model=True, ref_model_sync_steps=1, max_steps=3),
}


@pytest.mark.parametrize("case", list(RLOO_CONFIGS))
def test_rloo_trl_config_cases(tok, arch_path, case):
    got, _ = _compare("rloo", tok, arch_path("llama"), **RLOO_CONFIGS[case])
    _assert_fast(got)


@pytest.mark.parametrize("kw", [dict(), dict(mocked=True, mask_truncated_completions=True)])
def test_rloo_multiple_iterations_near_float64(tok, kw):
    """test_train_multiple_iterations (and test_train_with_mask_truncated_completions, its mocked generate, over two
    iterations) for RLOO: a ratio away from 1 and unclipped on the second step (see ``_compare_near_float64``)."""
    kw = dict(kw, num_iterations=2, beta=0.0)
    mocked = kw.pop("mocked", False)
    generate = patch("transformers.generation.utils.GenerationMixin.generate", side_effect=_fake_generate(tok))
    with generate if mocked else contextlib.nullcontext():
        got, _ = _compare_near_float64("rloo", tok, "llama", **kw)
    _assert_fast(got)


# -- test_train's architectures (and test_train_with_cast_lm_head_to_fp32's) ----------------------------------------
def _ids_reward(completion_ids, **_):
    return [float(sum(ids) % 7) for ids in completion_ids]


ARCHS = {
    "cohere2": dict(beta=0.1),  # logit scale, tied embeddings
    "gemma2": dict(beta=0.1, num_iterations=2),  # final-logit softcap, tied embeddings
    "qwen3_moe": dict(beta=0.1),  # MoE: TRL adds the router's aux loss (no gradient through the head)
    "gpt_oss": dict(),
    "glm4_moe": dict(),
    "llama-152k": dict(reward_funcs=_ids_reward),  # tokens past the tokenizer's decode to nothing
}


@pytest.mark.parametrize("kind,arch", [*(("grpo", a) for a in ARCHS), ("rloo", "gemma2"), ("rloo", "qwen3_moe")])
def test_trl_architectures(tok, arch_path, kind, arch):
    got, want = _compare(kind, tok, arch_path(arch), **ARCHS[arch])
    _assert_fast(got)
    if arch in ("qwen3_moe", "gpt_oss"):
        assert any("aux_loss" in h for h in want.state.log_history)


# fastpref_backend="auto" picks Triton on a GPU: a few of the cases above on the Triton kernels (the interpreter here)
TRITON_CASES = {
    "grpo-gemma2-beta-entropy": ("grpo", "gemma2", dict(beta=0.1, num_iterations=2, entropy_coef=0.1)),
    "grpo-qwen3_moe-luspo-accum": ("grpo", "qwen3_moe", dict(loss_type="luspo", importance_sampling_level="sequence",
                                                             gradient_accumulation_steps=2)),
    "rloo-cohere2": ("rloo", "cohere2", dict()),
}


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_trl_cases_on_the_triton_kernels(tok, arch_path, case):
    kind, arch, kw = TRITON_CASES[case]
    got, _ = _compare(kind, tok, arch_path(arch), backend="triton", **kw)
    _assert_fast(got)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_grpo_modules_to_save_lm_head_on_the_triton_kernels(tok):
    """The head trained (dW formed in the forward by the Triton kernels)."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    got, _ = _compare("grpo", tok, lambda: _arch("llama", tok), backend="triton", beta=0.1,
                      peft_config=LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    _assert_fast(got)


@pytest.mark.parametrize("arch", ["qwen3", "gemma2"])
def test_grpo_cast_lm_head_to_fp32_on_a_bf16_checkpoint(tok, arch_path, arch):
    """As TRL's test: the hub checkpoints are bf16 (loaded as such), the head cast to fp32."""
    got, _ = _compare("grpo", tok, arch_path(arch, torch.bfloat16), cast_lm_head_to_fp32=True, beta=0.1)
    assert got.model.get_output_embeddings().weight.dtype == torch.float32
    _assert_fast(got)


# -- PEFT: test_train_peft_config / _peft_model / _moe_peft_model / _peft_with_gradient_checkpointing, and the
# head-related PEFT checks of TRL's liger tests (modules_to_save=["lm_head"], prompt learning, an adapter on lm_head)
def _peft_cases():
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig

    return {
        "lora-default": dict(peft_config=LoraConfig()),
        "lora-beta": dict(peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), beta=0.1,
                          num_iterations=2),
        # the head itself trained (a copy of lm_head, ModulesToSaveWrapper): dW formed in the forward as well
        "modules_to_save-lm_head": dict(peft_config=LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]),
                                        beta=0.1),
        "prompt_tuning": dict(peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
        # stock TRL 1.16 with prefix tuning crashes in generation under gradient checkpointing (its default): off
        "prefix_tuning": dict(peft_config=PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                              gradient_checkpointing=False),
        "lora-no_gradient_checkpointing": dict(peft_config=LoraConfig(), gradient_checkpointing=False),
        "dora": dict(peft_config=LoraConfig(use_dora=True, target_modules=["q_proj", "v_proj"])),
        # tied embeddings (the head's weight) with an adapter on them, or a trained copy of them
        "gemma2-lora-embed_tokens": dict(arch="gemma2", peft_config=LoraConfig(target_modules=["q_proj",
                                                                                            "embed_tokens"])),
        "gemma2-modules_to_save-embed_tokens": dict(arch="gemma2", peft_config=LoraConfig(
            target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    }


PEFT_CASES = [*(("grpo", c) for c in ("lora-default", "lora-beta", "modules_to_save-lm_head", "prompt_tuning",
                                        "prefix_tuning", "lora-no_gradient_checkpointing", "dora",
                                        "gemma2-lora-embed_tokens", "gemma2-modules_to_save-embed_tokens")),
              *(("rloo", c) for c in ("lora-default", "modules_to_save-lm_head", "prompt_tuning"))]


@pytest.mark.parametrize("kind,case", PEFT_CASES)
def test_trl_peft_cases(tok, kind, case):
    pytest.importorskip("peft")
    kw = dict(_peft_cases()[case])
    arch = kw.pop("arch", "llama")
    got, want = _compare(kind, tok, lambda: _arch(arch, tok), **kw)
    _assert_fast(got)
    trained = {n for n, p in got.model.named_parameters() if p.requires_grad}
    if case == "modules_to_save-lm_head":
        assert any("lm_head" in n for n in trained)
    for (n, p), (_, q) in zip(got.model.named_parameters(), want.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)  # the same update (and adapters) after training


def test_grpo_peft_model_passed_in_and_moe_target_parameters(tok):
    """test_train_peft_model (a PeftModel passed in) and test_train_moe_peft_model (LoRA on GPT-OSS's expert
    parameters); beta > 0: TRL 1.16 scores the reference with a frozen "ref" copy of the adapter (peft >= 0.20)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    got, _ = _compare("grpo", tok, lambda: get_peft_model(_arch("llama", tok), LoraConfig()), beta=0.1)
    _assert_fast(got)
    lora = LoraConfig(target_parameters=["mlp.experts.down_proj", "mlp.experts.gate_up_proj"])
    got, _ = _compare("grpo", tok, lambda: get_peft_model(_arch("gpt_oss", tok), lora), beta=0.1)
    _assert_fast(got)


@pytest.mark.parametrize("kind", list(ONLINE))
def test_lora_on_lm_head_is_refused_as_trl_refuses_it(tok, arch_path, kind):
    pytest.importorskip("peft")
    from peft import LoraConfig

    errors = []
    for flag in (False, True):
        with pytest.raises(ValueError) as err:
            _train(kind, flag, tok, arch_path("llama"), train=False,
                   peft_config=LoraConfig(target_modules=["q_proj", "lm_head"]))
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "lm_head" in errors[0]


# -- rewards: test_train_different_reward_model, _reward_func_*, _multiple_reward_funcs*, _mixed_*, weights ---------
def _len_reward(completions, **_):
    return [float(len(c)) for c in completions]


def _letters_reward(completions, **_):
    return [float(len(set(c if isinstance(c, str) else c[0]["content"]))) for c in completions]


async def _async_reward(completions, **_):
    return [float(len(set(c))) for c in completions]


def _none_reward(completions, **_):
    return [None] * len(completions)


def _column_reward(completions, some_values, **_):
    return [float(abs(len(c) - v)) for c, v in zip(completions, some_values, strict=True)]


def _state_reward(completions, trainer_state=None, **_):
    assert trainer_state is not None
    return [float(len(c) + trainer_state.global_step) for c in completions]


def _logging_reward(completions, log_metric=None, log_extra=None, **_):
    log_metric("custom_accuracy", 0.75)
    log_extra("test_column", [c[:5] for c in completions])
    return [float(len(c)) for c in completions]


def _const(value):
    def reward(completions, **_):
        return [value] * len(completions)
    reward.__name__ = f"constant_reward_{value}"
    return reward


def _reward_model(tok):
    from transformers import LlamaForSequenceClassification

    config = toy_llama(tok, hidden_size=16, num_layers=1).config
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # rewards spread as a trained model's (a random one's differ by ~1e-3: ill-conditioned)
        model.score.weight.mul_(100.0)
    return model


REWARD_CASES = {
    "reward_model-conversational": lambda tok: dict(reward_funcs=_reward_model(tok), data=_prompts(conversational=True),
                                                    trainer_kw=dict(reward_processing_classes=tok)),
    "reward_func-conversational": lambda tok: dict(reward_funcs=_letters_reward, data=_prompts(conversational=True)),
    "multiple_reward_funcs-weights": lambda tok: dict(reward_funcs=[_len_reward, _reward], reward_weights=[0.3, 1.0]),
    "sync_and_async": lambda tok: dict(reward_funcs=[_len_reward, _const(1.0), _async_reward]),
    "with_None_output": lambda tok: dict(reward_funcs=[_len_reward, _none_reward]),
    "mixed_model_and_func": lambda tok: dict(reward_funcs=[_reward, _reward_model(tok)],
                                             trainer_kw=dict(reward_processing_classes=[None, tok])),
    "additional_column-trainer_state": lambda tok: dict(reward_funcs=[_column_reward, _state_reward],
                                                        data=_prompts(some_values=list(range(12)))),
    "log_metric-log_extra": lambda tok: dict(reward_funcs=_logging_reward, log_completions=True),
    "normalize_then_sum": lambda tok: dict(reward_funcs=[_len_reward, _reward],
                                           multi_objective_aggregation="normalize_then_sum"),
    # constant rewards: every advantage 0, the predicted gradient (and TRL's) exactly 0
    "constant_rewards-weights": lambda tok: dict(reward_funcs=[_const(1.0), _const(0.0)], reward_weights=[0.7, 0.3],
                                                 multi_objective_aggregation="sum_then_normalize",
                                                 zero_gradient=True),
}


# rewards only change the advantages: RLOO on three of them
@pytest.mark.parametrize("kind,case", [*(("grpo", c) for c in REWARD_CASES), *(
    ("rloo", c) for c in ("reward_model-conversational", "multiple_reward_funcs-weights", "with_None_output"))])
def test_trl_reward_cases(tok, arch_path, kind, case):
    kw = REWARD_CASES[case](tok)
    if kind == "rloo":
        kw.pop("multi_objective_aggregation", None)
    got, want = _compare(kind, tok, arch_path("llama"), **kw)
    _assert_fast(got)
    if case == "constant_rewards-weights":
        assert want.state.log_history[-2]["reward"] == pytest.approx(0.7)


# -- evaluation: test_train_with_eval, _num_generations_eval, _eval_on_start -----------------------------------------
@pytest.mark.parametrize("kind,kw", [
    ("grpo", dict(loss_type="grpo", eval_on_start=True)),
    ("grpo", dict(num_generations_eval=1, beta=0.1)),
    ("rloo", dict(num_generations_eval=1, beta=0.1)),
])
def test_trl_train_with_eval(tok, arch_path, kind, kw):
    """Evaluation computes TRL's loss without a gradient: nothing predicted there (the paths count training only)."""
    got, want = _compare(kind, tok, arch_path("llama"), eval_strategy="steps", eval_steps=1,
                         per_device_eval_batch_size=3, trainer_kw=dict(eval_dataset=_prompts(6)), **kw)
    assert any("eval_loss" in h for h in want.state.log_history)
    _assert_fast(got)


def test_grpo_iterable_dataset(tok, arch_path):
    got, _ = _compare("grpo", tok, arch_path("llama"), data=_prompts().to_iterable_dataset())
    assert got.args.accelerator_config.dispatch_batches is False
    _assert_fast(got)


# -- test_train_with_mask_truncated_completions: TRL mocks generate (one truncated completion, one that stops early,
# one whose EOS is the last allowed token) ---------------------------------------------------------------------------
def _fake_generate(tok):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    patterns = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17],  # truncated
                             [20, 21, 22, eos, pad, pad, pad, pad],  # stops early
                             [30, 31, 32, 33, 34, 35, 36, eos]])  # EOS just within the limit

    def generate(input_ids=None, **_):
        rows = patterns[torch.arange(input_ids.shape[0]) % len(patterns)]
        return torch.cat([input_ids, rows.to(input_ids.device)], dim=1)

    return generate


def test_grpo_mask_truncated_completions_with_mocked_generate(tok, arch_path):
    kw = dict(mask_truncated_completions=True, beta=0.1, num_iterations=2, loss_type="dapo")  # RLOO: above
    with patch("transformers.generation.utils.GenerationMixin.generate", side_effect=_fake_generate(tok)):
        got, want = _compare("grpo", tok, arch_path("llama"), **kw)
    assert want.state.log_history[0]["completions/clipped_ratio"] == pytest.approx(1 / 3)
    _assert_fast(got)


# -- what TRL's tests reach only through tools (tool_mask) or vLLM (importance_sampling_ratio, sampling log-probs):
# the training step's loss and gradient on one batch with those inputs, flag on vs stock ---------------------------
STEP_CASES = {
    "tool_mask": dict(loss_type="dapo", beta=0.1),
    "vllm_is-token": dict(loss_type="grpo", vllm=True),
    "vllm_is-sequence": dict(loss_type="grpo", importance_sampling_level="sequence", vllm=True, is_shape="sequence"),
    "vllm_is-off_policy_mask": dict(loss_type="dapo", off_policy_mask_threshold=0.05, vllm=True),
    "vespo-is_ratio": dict(loss_type="vespo"),
}


def _batch_with(trainer, case, **opts):
    """A training batch of ``trainer`` with old-policy log-probs and the case's extra inputs (fixed noise)."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    mask = inputs["completion_mask"]
    g = torch.Generator().manual_seed(0)
    noise = lambda: 0.2 * torch.randn(mask.shape, generator=g)
    with torch.no_grad():
        logps = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], mask], 1), mask.shape[1])[0]
    inputs["old_per_token_logps"] = logps + noise()
    if "beta" in opts or trainer.beta:
        inputs["ref_per_token_logps"] = logps + noise()
    if case == "tool_mask":  # tool-output tokens are in the completion but not trained on
        inputs["tool_mask"] = (torch.rand(mask.shape, generator=g) > 0.3).long()
    if case.startswith("vllm") or case.startswith("vespo"):
        shape = (mask.shape[0], 1) if opts.get("is_shape") == "sequence" else mask.shape
        inputs["importance_sampling_ratio"] = torch.exp(0.3 * torch.randn(shape, generator=g)).clamp(max=2.0)
        inputs["sampling_per_token_logps"] = logps + noise()
    return inputs


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_grpo_step_inputs_of_tools_and_vllm(tok, arch_path, case):
    opts = dict(STEP_CASES[case])
    vllm, is_shape = opts.pop("vllm", False), opts.pop("is_shape", None)
    results = []
    for flag in (False, True):
        trainer = _train("grpo", flag, tok, arch_path("llama"), train=False, **opts)
        inputs = _batch_with(trainer, case, is_shape=is_shape, **opts) if not results else results[0][2]
        if vllm:  # what TRL's vLLM path sets (after the batch: its generation is TRL's own here)
            trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, inputs))
    (want, want_grads, _), (got, got_grads, _) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert sorted(got_grads) == sorted(want_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert trainer.fastpref_head_paths == collections.Counter(fast=1)


def test_grpo_entropies_require_grad_as_trl_s(tok, arch_path):
    """test_entropy_bonus_flows_gradients: the entropies TRL's scoring returns carry a gradient exactly when stock
    TRL's do (TRL 1.16: with the bonus on and off)."""
    ids = torch.tensor([[7, 8, 9, 10, 11, 12, 13, 14]])
    seen = []
    for flag in (False, True):
        trainer = _train("grpo", flag, tok, arch_path("llama"), train=False, entropy_coef=0.1)
        for bonus in (True, False):
            trainer._entropy_bonus_enabled = bonus
            ent = trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids), 4,
                                                            compute_entropy=True)[1]
            seen.append(ent.requires_grad)
    assert seen[:2] == seen[2:]


# -- TestGRPOTrainerVLM: the trainers' VLM runs need a hub processor and image datasets; what the head sees of a
# vision-language model (pixel inputs through the backbone, the text config's head) is checked at model level -----
def _vlm(name: str, tok):
    import transformers as tf

    image_token = tok.convert_tokens_to_ids("<unk>")
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8)
    if name == "llava":
        config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**vision, patch_size=4, projection_dim=16),
                                text_config=tf.LlamaConfig(**text), image_token_index=image_token,
                                vision_feature_layer=-2, image_seq_length=4)
        model_cls = tf.LlavaForConditionalGeneration
    else:  # gemma3: tied, softcapped (the tiny hub checkpoint's text config caps at 30)
        config = tf.Gemma3Config(vision_config=tf.SiglipVisionConfig(**vision, patch_size=2),
                                 text_config=tf.Gemma3TextConfig(**text, head_dim=8, final_logit_softcapping=5.0,
                                                                 sliding_window=4),
                                 image_token_index=image_token, mm_tokens_per_image=4)
        model_cls = tf.Gemma3ForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(tok), (2, 14), generator=g)
    ids[:, 1:5] = image_token  # four image tokens per row, then text; the completion is the last 6 columns
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(2, 3, 8, 8, generator=g))
    if name == "gemma3":
        inputs["token_type_ids"] = (ids == image_token).long()
    return model, inputs


@pytest.mark.parametrize("name", ["llava", "gemma3"])
def test_vlm_head_fast_mode_matches_trl_s_head(tok, name):
    """One GRPO loss (dapo, beta > 0, the entropy bonus) through a tiny LLaVA / Gemma3 (pixel inputs, tied softcapped
    head): fastpref's head in fast mode (formed in the forward, ``fast`` counted) against TRL's head, each against
    TRL's head in float64: every gradient within twice TRL's own fp32 error (deep in the vision tower, where the
    gradients reach 1e4, both err by ~1e-3)."""
    import copy

    from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head

    from fastpref.integrations.trl_head import PredictedLoss, add_fused_lm_head, predicting
    from fastpref.losses.policy import Normalisation, PolicyLossConfig, PolicyStep, policy_loss

    base, inputs = _vlm(name, tok)
    window = 6
    labels = inputs["input_ids"].clone()
    labels[:, :-window] = -100
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, window, dtype=torch.long)
    mask[0, -2:] = 0
    cfg = PolicyLossConfig(loss_type="dapo", beta=0.1, entropy_coef=0.1)
    old, ref = (-3.0 + 0.3 * torch.randn(2, window, generator=g) for _ in range(2))
    step = PolicyStep(cfg, mask, torch.tensor([1.0, -0.5]), Normalisation(num_items_in_batch=float(mask.sum())),
                      old_logps=old, ref_logps=ref)
    paths = collections.Counter()

    def run(head, dtype=torch.float32):
        model = copy.deepcopy(base).to(dtype)
        if head == "trl":
            trl_add_fused_lm_head(model, temperature=0.9, outputs=("log_probs", "entropy"))
        else:
            add_fused_lm_head(model, temperature=0.9, outputs=("log_probs", "entropy"), backend="torch")
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with predicting(PredictedLoss(step, paths) if head == "fast" else None):
            out = model(**cast, labels=labels, fused_lm_head=True)
        lp, ent = out.log_probs[:, -window:], out.entropy[:, -window:]
        loss = policy_loss(cfg, lp, mask, step.advantages, norm=step.norm, entropies=ent, old_logps=old.to(dtype),
                           ref_logps=ref.to(dtype)).loss
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        return [loss.detach(), lp.detach(), ent.detach(), *grads]

    exact, theirs, ours = run("trl", torch.float64), run("trl"), run("fast")
    assert paths == collections.Counter(fast=1)
    names = ["loss", "log_probs", "entropy", *(n for n, _ in base.named_parameters())]
    for name, e, t, o in zip(names, exact, theirs, ours):
        assert (e is None) == (t is None) == (o is None), name
        if e is not None:
            err, trl_err = ((x.double() - e).norm().item() for x in (o, t))
            assert err <= 2 * trl_err + 1e-6 * e.norm().item() + 1e-12, (name, err, trl_err)


# -- rollout_func (TestGRPORolloutDispatch, the environments' path without vLLM): TRL takes the completions, their
# sampling log-probs and an ``env_mask`` (trained on as ``tool_mask``) from the function ------------------------------
def _rollout(tok):
    eos = tok.eos_token_id

    def rollout_func(prompts, trainer):
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "env_mask": []}
        for i, prompt in enumerate(prompts):
            ids = tok(prompt)["input_ids"]
            length = 3 + (i * 5 + len(ids)) % 6  # 3..8 tokens, some stopped by EOS
            completion = [7 + (i * 11 + 3 * j + len(ids)) % 150 for j in range(length)]
            if length < 8:
                completion[-1] = eos
            out["prompt_ids"].append(ids)
            out["completion_ids"].append(completion)
            out["logprobs"].append([-4.5 - 0.1 * ((i + j) % 5) for j in range(length)])
            out["env_mask"].append([0 if 1 <= j <= 2 else 1 for j in range(length)])  # an environment's reply
        return out

    return rollout_func


@pytest.mark.parametrize("kw", [dict(beta=0.1, num_iterations=2),
                                # drops a sequence; beta: the second step's ratios are all clipped
                                dict(off_policy_mask_threshold=0.4, loss_type="grpo", num_iterations=2,
                                     learning_rate=0.05, beta=0.1)])
def test_grpo_rollout_func_with_env_mask(tok, arch_path, kw, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    got, want = _compare("grpo", tok, arch_path("llama"), trainer_kw=dict(rollout_func=_rollout(tok)), **kw)
    assert all(h.get("reward_std", 1) > 0 and h["grad_norm"] > 0 for h in want.state.log_history if "loss" in h)
    _assert_fast(got)


# -- TRL's tests leave ``bf16`` unset: TRL's configs then turn bf16 mixed precision on (autocast, on CPU too) ------
@pytest.mark.parametrize("kind,kw", [("grpo", dict(gradient_accumulation_steps=2, beta=0.1, num_iterations=2)),
                                     ("rloo", dict(beta=0.1))])
def test_trl_default_bf16_mixed_precision(tok, arch_path, kind, kw):
    """Fast mode in every micro-batch under TRL's default bf16 autocast; each metric within twice stock TRL's own
    bf16-vs-fp32 difference (plus rtol 1e-5) of stock TRL's bf16 run."""
    want = _numbers(_train(kind, False, tok, arch_path("llama"), bf16=True, **kw))
    want32 = _numbers(_train(kind, False, tok, arch_path("llama"), **kw))
    got_trainer = _train(kind, True, tok, arch_path("llama"), bf16=True, **kw)
    _assert_fast(got_trainer)
    got = _numbers(got_trainer)
    assert len(got) == len(want) == len(want32)
    for i, (g, w, w32) in enumerate(zip(got, want, want32)):
        assert sorted(g) == sorted(w), i
        for key in ("loss", "grad_norm", "entropy", "kl"):
            if key in w:
                noise = abs(w[key] - w32[key])
                assert abs(g[key] - w[key]) <= 2 * noise + 1e-5 * abs(w[key]) + 1e-7, (i, key, g[key], w[key], noise)
