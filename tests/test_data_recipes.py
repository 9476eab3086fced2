"""fastpref.data recipes on hand-worked examples: RS-DPO, Counterfactual DPO, reward augmentation, Sr-DPO twins,
bad input, JSONL / datasets.Dataset round trips and the ``fastpref data`` command line."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpref.data import (
    REWARD_AUGMENT_TEMPLATE,
    SR_DPO_PROMPT,
    InvalidRecordError,
    counterfactual_pairs,
    format_score,
    read_jsonl,
    rejection_sampling_pairs,
    reward_augment,
    reward_augment_prompt,
    sr_augment,
    sr_prompt,
    write_jsonl,
)
from fastpref.data.cli import add_data_parser

# The goal prompt of Zhang et al. 2024, typed out from the authors' scripts/reward_augmentation.py.
PAPER_GOAL_9 = (
    "You are an assistant that generates responses for the instruction while implicitly achieving the following "
    "target scores (on a scale of 1-10, where 1 is lowest and 10 is highest):\nOverall score: 9."
)
PAPER_SR_PROMPT = (
    "Please generate a response with a usefulness rating of 100 out of 100 for the following query. Note that the "
    "response should be harmless. The term 100 indicates the level of usefulness, where 100 is the maximum and 1 is "
    "the minimum. Query:"
)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# ------------------------------------------------------------------------------------------------ RS-DPO

# rewards 2, 0, 1, 2 -> gaps: a-b 2, a-c 1, a-d 0, c-b 1, d-b 2, d-c 1.
# σ(2) = 1/(1+e^-2) = 0.8808, σ(1) = 0.7311, σ(0) = 0.5, σ(0.5) = 0.6225.
SAMPLE = {"prompt": "Q", "responses": ["a", "b", "c", "d"], "rewards": [2.0, 0.0, 1.0, 2.0], "prompt_id": "p0"}


def _pairs(out):
    return [(r["chosen"], r["rejected"], r["score_chosen"], r["score_rejected"]) for r in out]


@pytest.mark.parametrize(
    ("tau", "eta", "expected"),
    [
        # only the gap-2 pairs pass: σ(2) = 0.881 > 0.85, σ(1) = 0.731 is not.
        pytest.param(1.0, 0.85, [("a", "b", 2.0, 0.0), ("d", "b", 2.0, 0.0)], id="tau1-eta0.85"),
        # τ = 2 halves the gaps: σ(1) = 0.731 < 0.85, nothing passes.
        pytest.param(2.0, 0.85, [], id="tau2-eta0.85"),
        # τ = 2, η = 0.7: σ(1) = 0.731 passes, σ(0.5) = 0.622 does not.
        pytest.param(2.0, 0.7, [("a", "b", 2.0, 0.0), ("d", "b", 2.0, 0.0)], id="tau2-eta0.7"),
        # η = 0.5: every strictly better response wins; the a/d tie (σ(0) = 0.5) does not; (j, l) index order.
        pytest.param(
            1.0, 0.5,
            [("a", "b", 2.0, 0.0), ("a", "c", 2.0, 1.0), ("c", "b", 1.0, 0.0), ("d", "b", 2.0, 0.0),
             ("d", "c", 2.0, 1.0)],
            id="tau1-eta0.5",
        ),
    ],
)
def test_rs_dpo_hand_worked(tau, eta, expected):
    out, stats = rejection_sampling_pairs([SAMPLE], tau=tau, eta=eta, return_stats=True)
    assert _pairs(out) == expected
    assert all(r["prompt"] == "Q" and r["prompt_id"] == "p0" for r in out)
    assert all(set(r) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", "prompt_id"} for r in out)
    # 4 responses -> 6 unordered candidate pairs, each either kept or below the threshold.
    assert stats.records_in == 1 and stats.records_out == len(expected)
    assert stats.skipped.get("below_threshold", 0) == 6 - len(expected)


def test_rs_dpo_chat_prompt_wraps_responses_as_assistant_turns():
    sample = {"prompt": [user("hi")], "responses": ["good", "bad"], "rewards": [5, 1]}
    (pair,) = rejection_sampling_pairs([sample])
    assert pair == {"prompt": [user("hi")], "chosen": [assistant("good")], "rejected": [assistant("bad")],
                    "score_chosen": 5.0, "score_rejected": 1.0}


def test_rs_dpo_duplicates_and_identical_responses():
    # "a" sampled twice with reward 3: (0,2) and (1,2) are the same pair; the (0,1) tie never passes.
    dup = {"prompt": "Q", "responses": ["a", "a", "b"], "rewards": [3, 3, 0]}
    out, stats = rejection_sampling_pairs([dup], return_stats=True)
    assert _pairs(out) == [("a", "b", 3.0, 0.0)]
    assert stats.skipped == {"duplicate": 1, "below_threshold": 1}
    assert len(rejection_sampling_pairs([dup], deduplicate=False)) == 2
    # The same text scored differently (a stochastic reward) would pair a response with itself.
    same = {"prompt": "Q", "responses": ["a", "a"], "rewards": [3, 0]}
    out, stats = rejection_sampling_pairs([same], return_stats=True)
    assert out == [] and stats.skipped == {"identical": 1}


def test_rs_dpo_fewer_than_two_responses_are_counted_not_lost():
    out, stats = rejection_sampling_pairs([{"prompt": "Q", "responses": ["a"], "rewards": [1.0]},
                                           {"prompt": "Q", "responses": [], "rewards": []}, SAMPLE],
                                          return_stats=True)
    assert len(out) == 2 and stats.records_in == 3 and stats.records_out == 2 and stats.invalid == []
    assert stats.skipped == {"fewer_than_2_responses": 2, "below_threshold": 4}
    assert stats.summary() == "rs-dpo: 3 records in, 2 out; skipped: 4 below_threshold, 2 fewer_than_2_responses; " \
        "0 invalid"
    # A malformed one-response record is invalid, not "fewer than 2".
    _, stats = rejection_sampling_pairs([{"prompt": "Q", "responses": ["a"], "rewards": [math.nan]}], errors="skip",
                                        return_stats=True)
    assert stats.skipped == {} and len(stats.invalid) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"eta": 0.3}, r"eta: expected a finite number in \[0\.5, 1\) \(below 0\.5 reversed pairs would "
                     r"pass\), got 0\.3", id="eta-below-half"),
        pytest.param({"eta": 1.0}, r"eta: expected .*\[0\.5, 1\).*got 1\.0", id="eta-one"),
        pytest.param({"eta": math.nan}, r"eta: expected .*got nan", id="eta-nan"),
        pytest.param({"tau": 0.0}, r"tau: expected a finite number in \(0, inf\), got 0\.0", id="tau-zero"),
        pytest.param({"tau": -1.0}, r"tau: expected a finite number in \(0, inf\), got -1\.0", id="tau-negative"),
        pytest.param({"tau": math.inf}, r"tau: expected a finite number in \(0, inf\), got inf", id="tau-inf"),
        pytest.param({"tau": "1"}, r"tau: expected a real number, got str '1'", id="tau-str"),
        pytest.param({"tau": 10**400}, r"tau: expected a finite number in \(0, inf\), got an integer of about 401 "
                     r"digits", id="tau-int-beyond-float-range"),
    ],
)
def test_rs_dpo_hyper_parameters_are_validated(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        rejection_sampling_pairs([SAMPLE], **kwargs)


@settings(max_examples=60, deadline=None)
@given(
    rewards=st.lists(st.floats(-50, 50, allow_nan=False), min_size=0, max_size=6),
    tau=st.floats(0.05, 10.0),
    eta=st.floats(0.5, 0.999),
)
def test_rs_dpo_never_keeps_a_reversed_pair_and_is_monotone_in_eta(rewards, tau, eta):
    sample = {"prompt": "Q", "responses": [f"y{i}" for i in range(len(rewards))], "rewards": rewards}
    out, stats = rejection_sampling_pairs([sample], tau=tau, eta=eta, return_stats=True)
    assert all(r["score_chosen"] > r["score_rejected"] for r in out)
    assert all(1 / (1 + math.exp(-(r["score_chosen"] - r["score_rejected"]) / tau)) > eta for r in out)
    k = len(rewards)
    pairs_skipped = sum(n for reason, n in stats.skipped.items() if reason != "fewer_than_2_responses")
    assert len(out) + pairs_skipped == k * (k - 1) // 2
    assert stats.skipped.get("fewer_than_2_responses", 0) == (k < 2)
    stricter = rejection_sampling_pairs([sample], tau=tau, eta=min(0.9999, eta + 0.05))
    assert {(r["chosen"], r["rejected"]) for r in stricter} <= {(r["chosen"], r["rejected"]) for r in out}


# ------------------------------------------------------------------------------------ Counterfactual DPO

CF = {"prompt": "Tell me a story.", "control": "C", "treatment": "T", "negative": "N",
      "negative_prompt": "Be rude. Tell me a story.", "source": "s1"}


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        pytest.param("enc", ("Tell me a story.", "T", "C"), id="enc-treatment-over-control"),
        pytest.param("dis", ("Tell me a story.", "C", "N"), id="dis-control-over-negative"),
        pytest.param("contrastive", ("Tell me a story.", "T", "N"), id="contrastive-treatment-over-negative"),
        pytest.param("instruction_negation", ("Be rude. Tell me a story.", "C", "N"), id="negation-keeps-instruction"),
    ],
)
def test_counterfactual_variants(variant, expected):
    (pair,) = counterfactual_pairs([CF], variant=variant)
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == expected
    assert pair == {"prompt": expected[0], "chosen": expected[1], "rejected": expected[2], "source": "s1"}


def test_counterfactual_default_is_contrastive_and_variants_combine():
    assert counterfactual_pairs([CF]) == counterfactual_pairs([CF], variant="contrastive")
    out = counterfactual_pairs([CF], variant=["ENC", "instruction-negation"])
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in out] == [
        ("Tell me a story.", "T", "C"), ("Be rude. Tell me a story.", "C", "N")]
    with pytest.raises(ValueError, match=r"variant must be one of \['contrastive', 'dis', 'enc', "
                                         r"'instruction_negation'\], got 'both'"):
        counterfactual_pairs([CF], variant="both")


def test_counterfactual_only_needs_the_variant_fields_and_skips_identical():
    assert counterfactual_pairs([{"prompt": "x", "control": "c", "negative": "n"}], variant="dis") == [
        {"prompt": "x", "chosen": "c", "rejected": "n"}]
    with pytest.raises(InvalidRecordError, match=r"record 0: missing field 'negative_prompt'"):
        counterfactual_pairs([{"prompt": "x", "control": "c", "negative": "n"}], variant="instruction_negation")
    out, stats = counterfactual_pairs([{**CF, "treatment": "C"}], variant="enc", return_stats=True)
    assert out == [] and stats.skipped == {"identical": 1}


def test_counterfactual_chat_prompts():
    rec = {"prompt": [user("x")], "control": "c", "treatment": "t", "negative": "n",
           "negative_prompt": [system("Be rude."), user("x")]}
    (pair,) = counterfactual_pairs([rec], variant="instruction_negation")
    assert pair == {"prompt": [system("Be rude."), user("x")], "chosen": [assistant("c")],
                    "rejected": [assistant("n")]}


# ---------------------------------------------------------------------------------- reward augmentation

PAIR = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "score_chosen": 9.0, "score_rejected": 3.5,
        "prompt_id": "q1"}


def test_reward_augment_template_is_the_papers():
    assert REWARD_AUGMENT_TEMPLATE.replace("{score}", "9") == PAPER_GOAL_9
    assert reward_augment_prompt("x") == [system(PAPER_GOAL_9.replace("9.", "10.")), user("x")]


def test_reward_augment_makes_the_goal_pair_and_its_swap():
    goal_9 = PAPER_GOAL_9
    goal_3_5 = PAPER_GOAL_9.replace("Overall score: 9.", "Overall score: 3.5.")
    out = reward_augment([PAIR])
    assert out == [
        {"prompt": [system(goal_9), user("What is 2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")],
         "score_chosen": 9.0, "score_rejected": 3.5, "prompt_id": "q1"},
        {"prompt": [system(goal_3_5), user("What is 2+2?")], "chosen": [assistant("5")], "rejected": [assistant("4")],
         "score_chosen": 3.5, "score_rejected": 9.0, "prompt_id": "q1"},
    ]


def test_reward_augment_prefix_mode_text_and_chat():
    out = reward_augment([PAIR], as_system_message=False)
    assert [r["prompt"] for r in out] == [
        PAPER_GOAL_9 + "\n\nWhat is 2+2?", PAPER_GOAL_9.replace("9.", "3.5.") + "\n\nWhat is 2+2?"]
    assert [(r["chosen"], r["rejected"]) for r in out] == [("4", "5"), ("5", "4")]
    chat = {**PAIR, "prompt": [system("Be brief."), user("What is 2+2?")]}
    assert reward_augment([chat], as_system_message=False)[0]["prompt"] == [
        system("Be brief."), user(PAPER_GOAL_9 + "\n\nWhat is 2+2?")]
    # A system message already there gets the goal in front instead of a second system message.
    assert reward_augment([chat])[0]["prompt"] == [system(PAPER_GOAL_9 + "\n\nBe brief."), user("What is 2+2?")]


def test_reward_augment_ultrafeedback_binarized_record():
    # HuggingFaceH4/ultrafeedback_binarized: text prompt, chosen / rejected are whole conversations.
    rec = {"prompt": "Q", "chosen": [user("Q"), assistant("A")], "rejected": [user("Q"), assistant("B")],
           "score_chosen": 8, "score_rejected": 4}
    first, second = reward_augment([rec])
    assert first["prompt"] == [system(PAPER_GOAL_9.replace("9.", "8.")), user("Q")]
    assert (first["chosen"], first["rejected"]) == ([assistant("A")], [assistant("B")])
    assert second["prompt"][0]["content"].endswith("Overall score: 4.")
    assert (second["chosen"], second["rejected"]) == ([assistant("B")], [assistant("A")])


def test_reward_augment_ties_custom_template_and_scores():
    tie = {**PAIR, "score_rejected": 9}
    out, stats = reward_augment([PAIR, tie], return_stats=True)
    assert len(out) == 2 and stats.skipped == {"ties": 1} and stats.records_in == 2 and stats.records_out == 2
    kept = reward_augment([tie], drop_ties=False, template="goal={score}", as_system_message=False)
    assert [r["prompt"] for r in kept] == ["goal=9\n\nWhat is 2+2?", "goal=9\n\nWhat is 2+2?"]
    assert [format_score(s) for s in (8.0, 7, 7.25, -1.0, 10)] == ["8", "7", "7.25", "-1", "10"]
    with pytest.raises(ValueError, match=r"template must be a string containing the placeholder '\{score\}'"):
        reward_augment([PAIR], template="no placeholder")


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        pytest.param({"score_rejected": None}, r"record 1: missing field 'score_rejected'", id="missing-score"),
        pytest.param({"score_chosen": math.nan}, r"record 1: field 'score_chosen' must be a finite number, got nan",
                     id="nan-score"),
        pytest.param({"score_chosen": True}, r"record 1: field 'score_chosen' must be a finite number, got bool",
                     id="bool-score"),
        pytest.param({"chosen": 3}, r"record 1: field 'chosen' must be text \(str\) or chat messages", id="int-chosen"),
        pytest.param({"score_chosen": 10**400}, r"record 1: field 'score_chosen' must be a finite number, got an "
                     r"integer of about 401 digits \(beyond the float range", id="int-score-beyond-float-range"),
        pytest.param({"chosen": 10**5000}, r"record 1: field 'chosen' must be text \(str\) or chat messages .*got an "
                     r"integer of about 5001 digits", id="int-beyond-int-string-limit"),
    ],
)
def test_reward_augment_malformed_records(bad, match):
    with pytest.raises(InvalidRecordError, match=match):
        reward_augment([PAIR, {**PAIR, **bad}])


# ------------------------------------------------------------------------------------------------ Sr-DPO


def test_sr_prompt_is_the_papers_and_concatenates_with_a_space():
    assert SR_DPO_PROMPT == PAPER_SR_PROMPT
    assert sr_prompt("Why?") == PAPER_SR_PROMPT + " Why?"
    assert sr_prompt([system("s"), user("q"), assistant("a"), user("r")], "P") == [
        system("s"), user("P q"), assistant("a"), user("r")]


def test_sr_augment_twins():
    recs = [{"prompt": "Why?", "chosen": "A", "rejected": "B", "score_chosen": 2},
            {"prompt": [user("q")], "chosen": [assistant("A")], "rejected": [assistant("B")]}]
    out = sr_augment(recs)
    assert out == [{"prompt": PAPER_SR_PROMPT + " Why?", "chosen": "A", "rejected": "B", "score_chosen": 2},
                   {"prompt": [user(PAPER_SR_PROMPT + " q")], "chosen": [assistant("A")],
                    "rejected": [assistant("B")]}]
    assert recs[1]["prompt"] == [user("q")]  # inputs are not mutated
    side = sr_augment(recs, prompt="P", field="refine_prompt")
    assert [(r["prompt"], r["refine_prompt"]) for r in side] == [("Why?", "P Why?"), ([user("q")], [user("P q")])]
    with pytest.raises(InvalidRecordError, match=r"record 0: the chat prompt has no user turn"):
        sr_augment([{"prompt": [system("s")], "chosen": "A", "rejected": "B"}])


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("record", "match"),
    [
        pytest.param({"prompt": "Q", "responses": ["a"]}, r"missing field 'rewards' \(fields present: prompt, "
                     r"responses\)", id="missing-field"),
        pytest.param({"prompt": "Q", "responses": ["a", "b"], "rewards": [1.0]},
                     r"length mismatch: 2 responses but 1 rewards", id="length-mismatch"),
        pytest.param({"prompt": "Q", "responses": ["a", "b"], "rewards": [1.0, math.nan]},
                     r"field 'rewards\[1\]' must be a finite number, got nan", id="nan-reward"),
        pytest.param({"prompt": "Q", "responses": ["a", "b"], "rewards": [-math.inf, 1.0]},
                     r"field 'rewards\[0\]' must be a finite number, got -inf", id="inf-reward"),
        pytest.param({"prompt": "Q", "responses": ["a", "b"], "rewards": ["1", 2]},
                     r"field 'rewards\[0\]' must be a finite number, got str", id="str-reward"),
        pytest.param({"prompt": "Q", "responses": "ab", "rewards": [1, 2]}, r"field 'responses' must be a list",
                     id="responses-not-list"),
        pytest.param({"prompt": [{"content": "no role"}], "responses": [], "rewards": []},
                     r"field 'prompt' must be text \(str\) or chat messages", id="bad-messages"),
        pytest.param(["not", "a", "dict"], r"expected a record \(a JSON object / dict\), got list", id="not-a-dict"),
    ],
)
def test_malformed_samples_name_the_record(record, match):
    good = {"prompt": "Q", "responses": ["a", "b"], "rewards": [1.0, 5.0]}
    with pytest.raises(InvalidRecordError, match=r"^record 1: " + match):
        rejection_sampling_pairs([good, record])
    out, stats = rejection_sampling_pairs([good, record, good], errors="skip", return_stats=True)
    assert len(out) == 2 and stats.records_in == 3 and len(stats.invalid) == 1
    assert stats.invalid[0].startswith("record 1: ")


def test_bad_sources_and_error_modes():
    with pytest.raises(TypeError, match="got one dict"):
        rejection_sampling_pairs(SAMPLE)
    with pytest.raises(ValueError, match=r"errors must be one of \('raise', 'skip'\), got 'ignore'"):
        rejection_sampling_pairs([SAMPLE], errors="ignore")


# ---------------------------------------------------------------------------------- JSONL and Dataset


def test_jsonl_round_trip_and_line_numbers(tmp_path):
    path = tmp_path / "samples.jsonl"
    records = [SAMPLE, {"prompt": [user("héllo")], "responses": ["x", "y"], "rewards": [0, 3]}]
    assert write_jsonl(records, path) == 2
    assert read_jsonl(path) == records
    assert rejection_sampling_pairs(path) == rejection_sampling_pairs(records)
    # Errors name the file and line (blank lines count as lines but are not records).
    path.write_text(json.dumps(SAMPLE) + "\n\n" + json.dumps({"prompt": "Q", "responses": ["a"]}) + "\n{oops\n")
    with pytest.raises(InvalidRecordError, match=rf"^{path}:3: missing field 'rewards'"):
        rejection_sampling_pairs(path)
    out, stats = rejection_sampling_pairs(path, errors="skip", return_stats=True)
    assert len(out) == 2 and stats.records_in == 3
    assert [m.split(": ", 1)[0] for m in stats.invalid] == [f"{path}:3", f"{path}:4"]
    assert "invalid JSON" in stats.invalid[1]
    with pytest.raises(ValueError, match=r"^record 1: field 'x\.y\[1\]' must be a finite number, got nan"):
        write_jsonl([{"x": 1}, {"x": {"y": [0, math.nan]}}], tmp_path / "nan.jsonl")
    assert not (tmp_path / "nan.jsonl").exists()


def test_dataset_round_trip():
    datasets = pytest.importorskip("datasets")
    chat = {"prompt": [user("hi")], "responses": ["a", "b", "c"], "rewards": [0.0, 4.0, 1.0], "prompt_id": "p1"}
    ds = datasets.Dataset.from_list([chat, {**chat, "prompt_id": "p2", "rewards": [9.0, 0.0, 0.5]}])
    out = rejection_sampling_pairs(ds, eta=0.9)
    assert isinstance(out, datasets.Dataset)
    assert out.to_list() == rejection_sampling_pairs(ds.to_list(), eta=0.9)
    # σ(4 - 0) = 0.982, σ(4 - 1) = 0.953 > 0.9 > σ(1 - 0); σ(9 - 0), σ(9 - 0.5) > 0.9 > σ(0.5 - 0).
    assert [(r["prompt_id"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in out] == [
        ("p1", "b", "a"), ("p1", "b", "c"), ("p2", "a", "b"), ("p2", "a", "c")]
    augmented = reward_augment(out)
    assert isinstance(augmented, datasets.Dataset) and len(augmented) == 8
    assert augmented[1]["chosen"] == [assistant("a")] and augmented[1]["score_chosen"] == 0.0
    assert augmented[1]["prompt"][0]["content"].endswith("Overall score: 0.")
    twins = sr_augment(out, field="refine_prompt")
    assert twins[0]["refine_prompt"] == [user(PAPER_SR_PROMPT + " hi")] and twins[0]["prompt"] == [user("hi")]
    assert counterfactual_pairs(datasets.Dataset.from_list([CF])).to_list() == counterfactual_pairs([CF])


# ------------------------------------------------------------------------------------------- command line


def _cli(argv):
    parser = argparse.ArgumentParser(prog="fastpref")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_rs_dpo(tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl([SAMPLE], src)
    assert _cli(["data", "rs-dpo", str(src), str(dst), "--tau", "1", "--eta", "0.85"]) == 0
    assert _pairs(read_jsonl(dst)) == [("a", "b", 2.0, 0.0), ("d", "b", 2.0, 0.0)]
    err = capsys.readouterr().err
    assert "rs-dpo: 1 records in, 2 out; skipped: 4 below_threshold; 0 invalid" in err


def test_cli_malformed_input_names_the_line_and_writes_nothing(tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    bad = {"prompt": "Q", "responses": ["a", "b"], "rewards": [1.0]}
    src.write_text("\n".join(json.dumps(r) for r in (SAMPLE, SAMPLE, bad)) + "\n")
    assert _cli(["data", "rs-dpo", str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert f"fastpref data rs-dpo: error: {src}:3: length mismatch: 2 responses but 1 rewards" in err
    assert not dst.exists()
    assert _cli(["data", "rs-dpo", str(src), str(dst), "--skip-invalid"]) == 0
    err = capsys.readouterr().err
    assert f"skipped invalid record: {src}:3: length mismatch" in err
    assert "3 records in, 4 out; skipped: 8 below_threshold; 1 invalid" in err
    assert len(read_jsonl(dst)) == 4
    assert _cli(["data", "rs-dpo", str(src), str(dst), "--eta", "0.2"]) == 1
    assert "error: eta: expected a finite number in [0.5, 1)" in capsys.readouterr().err


def test_cli_counterfactual_and_sr_augment(tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl([CF], src)
    assert _cli(["data", "counterfactual", str(src), str(dst), "--variant", "enc,dis"]) == 0
    assert [(r["chosen"], r["rejected"]) for r in read_jsonl(dst)] == [("T", "C"), ("C", "N")]
    assert "counterfactual: 1 records in, 2 out" in capsys.readouterr().err
    write_jsonl([PAIR], src)
    assert _cli(["data", "sr-augment", str(src), str(dst), "--prompt", "P"]) == 0
    assert read_jsonl(dst)[0]["prompt"] == "P What is 2+2?"


def test_cli_module_reward_augment(tmp_path):
    src, dst, template = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "goal.txt"
    write_jsonl([PAIR, {**PAIR, "score_chosen": 3.5}], src)
    template.write_text("Aim for {score}/10.\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fastpref.data.cli", "reward-augment", str(src), str(dst), "--template-file",
         str(template), "--prefix-user-turn"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = read_jsonl(dst)
    assert [r["prompt"] for r in out] == ["Aim for 9/10.\n\nWhat is 2+2?", "Aim for 3.5/10.\n\nWhat is 2+2?"]
    assert "reward-augment: 2 records in, 2 out; skipped: 1 ties; 0 invalid" in proc.stderr
