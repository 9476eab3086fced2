"""The generation side of fastpref.data end to end on a tiny random Llama and a tiny Llama reward model built
from configs (no download): sampling, scoring, RS-DPO pairing, counterfactual generations, the CLI."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from fastpref.data import (  # noqa: E402
    InvalidRecordError,
    counterfactual_generations,
    counterfactual_pairs,
    read_jsonl,
    rejection_sampling_pairs,
    rs_dpo_pipeline,
    sample_responses,
    score_responses,
    write_jsonl,
)
from fastpref.data.cli import add_data_parser  # noqa: E402

WORDS = "hello world what is two plus four five yes no the a cat dog sky blue why because story tell me rude kind"
SPECIAL = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
ROLES = ["<system>", "<user>", "<assistant>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def make_tokenizer():
    vocab = {tok: i for i, tok in enumerate(SPECIAL + ROLES + WORDS.split())}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_config(vocab_size, **kwargs):
    return transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def policy(tokenizer):
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(make_config(len(tokenizer))).eval()


@pytest.fixture(scope="module")
def reward_model(tokenizer):
    torch.manual_seed(2)
    return transformers.LlamaForSequenceClassification(make_config(len(tokenizer), num_labels=1)).eval()


PROMPTS = [
    {"prompt": "what is two plus two", "prompt_id": "q0"},
    {"prompt": [{"role": "user", "content": "tell me a story"}], "prompt_id": "q1"},
    {"prompt": "why is the sky blue", "prompt_id": "q2"},
]


def test_sample_responses_shapes_fields_and_seed(policy, tokenizer):
    kwargs = dict(num_samples=3, batch_size=2, max_new_tokens=4, seed=123, progress=False)
    samples = sample_responses(policy, tokenizer, PROMPTS, **kwargs)
    assert [s["prompt_id"] for s in samples] == ["q0", "q1", "q2"]
    assert [s["prompt"] for s in samples] == [p["prompt"] for p in PROMPTS]
    for s in samples:
        assert len(s["responses"]) == 3 and all(isinstance(r, str) for r in s["responses"])
        assert all(len(r.split()) <= 4 for r in s["responses"])
        assert not any(special in r for r in s["responses"] for special in ("[PAD]", "[BOS]"))
    assert sample_responses(policy, tokenizer, PROMPTS, **kwargs) == samples
    assert sample_responses(policy, tokenizer, PROMPTS, **{**kwargs, "seed": 7}) != samples
    # Bare prompts are accepted too.
    bare = sample_responses(policy, tokenizer, [p["prompt"] for p in PROMPTS], **kwargs)
    assert [s["responses"] for s in bare] == [s["responses"] for s in samples]


def test_batched_greedy_generation_matches_one_prompt_at_a_time(policy, tokenizer):
    # Prompts of different lengths in one batch: left padding and the attention mask must not change the output.
    greedy = dict(num_samples=1, do_sample=False, max_new_tokens=6, progress=False)
    batched = sample_responses(policy, tokenizer, PROMPTS, batch_size=3, **greedy)
    single = sample_responses(policy, tokenizer, PROMPTS, batch_size=1, **greedy)
    assert batched == single
    assert any(s["responses"][0] for s in batched)


def test_score_responses_with_a_reward_model_matches_unpadded_forward(reward_model, tokenizer):
    samples = [{"prompt": "what is two plus two", "responses": ["four", "five yes no the cat", "no"]},
               {"prompt": [{"role": "user", "content": "tell me"}], "responses": ["a story", "no"]}]
    scored = score_responses(samples, reward_model, tokenizer=tokenizer, batch_size=4, progress=False)
    one_by_one = score_responses(samples, reward_model, tokenizer=tokenizer, batch_size=1, progress=False)
    # Text: [BOS] + prompt tokens + response tokens; chat: the template's text, no [BOS].
    inputs = [
        [tokenizer("[BOS] what is two plus two " + r, add_special_tokens=False)["input_ids"]
         for r in samples[0]["responses"]],
        [tokenizer(f"<user> tell me <assistant> {r} ", add_special_tokens=False)["input_ids"]
         for r in samples[1]["responses"]],
    ]
    assert inputs[0][0] == [1, 9, 10, 11, 12, 11, 13]  # [BOS] what is two plus two four
    for rec, again, group in zip(scored, one_by_one, inputs):
        assert len(rec["rewards"]) == len(rec["responses"])
        with torch.no_grad():
            expected = [reward_model(torch.tensor([ids])).logits[0, 0].item() for ids in group]
        assert rec["rewards"] == pytest.approx(expected, abs=1e-5)
        assert again["rewards"] == pytest.approx(expected, abs=1e-5)
    assert len({r for rec in scored for r in rec["rewards"]}) == 5  # a random model separates them
    # A reward model without pad_token_id (HF refuses batches then): the tokenizer's is used for the call only.
    reward_model.config.pad_token_id = None
    try:
        assert score_responses(samples, reward_model, tokenizer=tokenizer, batch_size=4, progress=False) == scored
        assert reward_model.config.pad_token_id is None
    finally:
        reward_model.config.pad_token_id = 0
    assert "rewards" not in samples[0]  # inputs are not mutated


def test_score_responses_with_a_callable_and_bad_rewards():
    samples = [{"prompt": "p", "responses": ["a", "bbb", "cc"]}, {"prompt": "q", "responses": ["dddd"]}]
    calls = []

    def reward(prompts, responses):
        calls.append(len(responses))
        return [float(len(r)) for r in responses]

    scored = score_responses(samples, reward, batch_size=3, progress=False)
    assert [s["rewards"] for s in scored] == [[1.0, 3.0, 2.0], [4.0]] and calls == [3, 1]
    with pytest.raises(InvalidRecordError, match=r"record 1: the reward of responses\[0\] is not finite \(nan\)"):
        score_responses(samples, lambda p, r: [math.nan if x == "dddd" else 0.0 for x in r], progress=False)
    with pytest.raises(ValueError, match="reward callable returned 1 scores for a batch of 3 responses"):
        score_responses(samples, lambda p, r: [0.0], batch_size=3, progress=False)


def test_generation_argument_errors(policy, reward_model, tokenizer):
    with pytest.raises(ValueError, match="num_samples must be 1 with do_sample=False"):
        sample_responses(policy, tokenizer, ["hello"], num_samples=2, do_sample=False)
    with pytest.raises(ValueError, match=r"temperature: expected a finite number in \(0, inf\), got 0\.0"):
        sample_responses(policy, tokenizer, ["hello"], temperature=0.0)
    with pytest.raises(ValueError, match=r"top_p: expected a finite number in \(0, 1\], got 1\.5"):
        sample_responses(policy, tokenizer, ["hello"], top_p=1.5)
    with pytest.raises(ValueError, match="tokenizer must be given with a reward model"):
        score_responses([{"prompt": "a", "responses": ["b"]}], reward_model)
    plain = make_tokenizer()
    plain.chat_template = None
    with pytest.raises(InvalidRecordError, match="record 0: the prompt is chat messages but the tokenizer has no"):
        sample_responses(policy, plain, [[{"role": "user", "content": "hello"}]], progress=False)


def test_rs_dpo_pipeline_end_to_end(policy, reward_model, tokenizer):
    datasets = pytest.importorskip("datasets")
    pairs, stats = rs_dpo_pipeline(policy, tokenizer, PROMPTS, reward_model, reward_tokenizer=tokenizer,
                                   num_samples=4, tau=0.05, eta=0.6, max_new_tokens=5, seed=0, progress=False,
                                   return_stats=True)
    assert stats.records_in == 3 and stats.records_out == len(pairs) > 0
    assert stats.records_out + sum(stats.skipped.values()) == 3 * 6  # C(4, 2) candidate pairs per prompt
    for p in pairs:
        assert 1 / (1 + math.exp(-(p["score_chosen"] - p["score_rejected"]) / 0.05)) > 0.6
        assert p["prompt_id"] in {"q0", "q1", "q2"}
        assert isinstance(p["chosen"], list) == (p["prompt_id"] == "q1")  # chat prompt -> assistant turns
    # Same thing step by step, through a datasets.Dataset and a JSONL file.
    ds = datasets.Dataset.from_list(PROMPTS[::2])  # the text prompts (one prompt format per Dataset column)
    samples = sample_responses(policy, tokenizer, ds, num_samples=4, max_new_tokens=5, seed=0, progress=False)
    assert isinstance(samples, datasets.Dataset) and samples.column_names == ["prompt_id", "prompt", "responses"]
    scored = score_responses(samples, reward_model, tokenizer=tokenizer, progress=False)
    assert isinstance(scored, datasets.Dataset) and len(scored[0]["rewards"]) == 4
    assert rejection_sampling_pairs(scored, tau=0.05, eta=0.6).to_list() == rejection_sampling_pairs(
        scored.to_list(), tau=0.05, eta=0.6)


@pytest.mark.parametrize("as_system_message", [True, False], ids=["system", "prefix"])
def test_counterfactual_generations_feed_every_variant(policy, tokenizer, as_system_message):
    records = counterfactual_generations(policy, tokenizer, PROMPTS[:2], desired_instruction="be kind",
                                         undesired_instruction="be rude", as_system_message=as_system_message,
                                         max_new_tokens=4, progress=False)
    assert [r["prompt"] for r in records] == [p["prompt"] for p in PROMPTS[:2]]
    assert [r["prompt_id"] for r in records] == ["q0", "q1"]
    if as_system_message:
        assert records[0]["negative_prompt"] == [{"role": "system", "content": "be rude"},
                                                 {"role": "user", "content": "what is two plus two"}]
    else:
        assert records[0]["negative_prompt"] == "be rude\n\nwhat is two plus two"
        assert records[1]["negative_prompt"] == [{"role": "user", "content": "be rude\n\ntell me a story"}]
    # Greedy decoding: the control response is the plain prompt's greedy continuation.
    control = sample_responses(policy, tokenizer, PROMPTS[:2], num_samples=1, do_sample=False, max_new_tokens=4,
                               progress=False)
    assert [r["control"] for r in records] == [c["responses"][0] for c in control]
    for variant in ("enc", "dis", "contrastive", "instruction_negation"):
        out, stats = counterfactual_pairs(records, variant=variant, return_stats=True)
        assert len(out) + stats.skipped.get("identical", 0) == 2
        expected_prompt = "negative_prompt" if variant == "instruction_negation" else "prompt"
        assert all(o["prompt"] == r[expected_prompt] or o["prompt"] == [{"role": "user", "content": r[expected_prompt]}]
                   for o, r in zip(out, records))


def test_cli_sample_then_rs_dpo(tmp_path, policy, reward_model, tokenizer, capsys):
    policy.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    reward_model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    prompts, samples, pairs = tmp_path / "prompts.jsonl", tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
    write_jsonl(PROMPTS, prompts)
    parser = argparse.ArgumentParser(prog="fastpref")
    add_data_parser(parser.add_subparsers(dest="command", required=True))

    def run(argv):
        args = parser.parse_args(argv)
        return args.func(args)

    assert run(["data", "sample", str(prompts), str(samples), "--model", str(tmp_path / "policy"), "--reward-model",
                str(tmp_path / "rm"), "-k", "3", "--max-new-tokens", "4", "--seed", "0", "--device", "cpu",
                "--no-progress"]) == 0
    rows = read_jsonl(samples)
    assert [r["prompt_id"] for r in rows] == ["q0", "q1", "q2"]
    assert all(len(r["responses"]) == len(r["rewards"]) == 3 for r in rows)
    assert run(["data", "rs-dpo", str(samples), str(pairs), "--eta", "0.5"]) == 0
    assert read_jsonl(pairs) == rejection_sampling_pairs(rows, eta=0.5)
    err = capsys.readouterr().err
    assert "sample: 3 prompts, 3 responses each, sampled and scored" in err and "rs-dpo: 3 records in" in err


def test_cli_sample_with_a_reward_model_of_several_labels(tmp_path, policy, tokenizer, monkeypatch, capsys):
    """--reward-index picks the reward logit; without it (or out of range, or without --reward-model) the command
    stops before any sampling, naming the option."""
    import fastpref.data.generation as generation

    torch.manual_seed(3)
    two_labels = transformers.LlamaForSequenceClassification(make_config(len(tokenizer), num_labels=2)).eval()
    policy.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    two_labels.save_pretrained(tmp_path / "rm2")
    tokenizer.save_pretrained(tmp_path / "rm2")
    prompts, samples = tmp_path / "prompts.jsonl", tmp_path / "samples.jsonl"
    write_jsonl(PROMPTS, prompts)
    parser = argparse.ArgumentParser(prog="fastpref")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    base = ["data", "sample", str(prompts), str(samples), "--model", str(tmp_path / "policy"), "-k", "2",
            "--max-new-tokens", "3", "--seed", "0", "--device", "cpu", "--no-progress"]

    def run(*extra):
        args = parser.parse_args([*base, *extra])
        return args.func(args)

    sample = generation.sample_responses
    monkeypatch.setattr(generation, "sample_responses", lambda *a, **k: pytest.fail("sampled before the check"))
    for extra, message in [
        (["--reward-model", str(tmp_path / "rm2")], "--reward-index: required for the reward model"),
        (["--reward-model", str(tmp_path / "rm2"), "--reward-index", "2"], "--reward-index: expected 0 to 1"),
        (["--reward-model", str(tmp_path / "rm2"), "--reward-index", "-1"], "--reward-index: expected 0 to 1"),
        (["--reward-index", "0"], "--reward-index: only used with --reward-model"),
    ]:
        assert run(*extra) == 1
        err = capsys.readouterr().err
        assert f"fastpref data sample: error: {message}" in err, err
        assert not samples.exists()
    monkeypatch.setattr(generation, "sample_responses", sample)
    assert run("--reward-model", str(tmp_path / "rm2"), "--reward-index", "1") == 0
    rows = read_jsonl(samples)
    unscored = [{k: v for k, v in r.items() if k != "rewards"} for r in rows]
    want = score_responses(unscored, two_labels, tokenizer=tokenizer, reward_index=1, progress=False)
    assert [r["rewards"] for r in rows] == [r["rewards"] for r in want]
    other = score_responses(unscored, two_labels, tokenizer=tokenizer, reward_index=0, progress=False)
    assert [r["rewards"] for r in rows] != [r["rewards"] for r in other]
