"""``fastpref data ...`` on hostile input and outputs. Every malformed line ends as ``<file>:<line>: <what>`` (exit 1,
nothing written) or, with --skip-invalid, a counted skip, never a traceback; the output never replaces the input;
stdout receives nothing unless the command succeeds; overwriting an existing output is reported."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import stat
import sys
import tempfile
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpref.data import InvalidRecordError, read_jsonl, rejection_sampling_pairs, write_jsonl
from fastpref.data.cli import add_data_parser

# rewards 2 and 0: sigma(2) = 0.881 > 0.85, so each sample gives exactly one pair.
SAMPLE = {"prompt": "Q", "responses": ["a", "b"], "rewards": [2.0, 0.0], "id": "s"}
GOOD = json.dumps(SAMPLE).encode()


def _cli(argv):
    parser = argparse.ArgumentParser(prog="fastpref")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _line(**fields):
    """A JSONL line of SAMPLE with ``fields`` replaced by raw JSON text (which json.dumps could not write)."""
    text = json.dumps({**SAMPLE, **{k: f"@{k}@" for k in fields}})
    for key, raw in fields.items():
        text = text.replace(f'"@{key}@"', raw)
    return text.encode("utf-8", "surrogatepass")


# ------------------------------------------------------------------------------------ malformed lines

MALFORMED = [
    pytest.param(_line(meta="NaN"), "field 'meta' must be a finite number, got nan", id="nan-literal"),
    pytest.param(_line(meta='{"x": [1, Infinity]}'), "field 'meta.x[1]' must be a finite number, got inf",
                 id="infinity-nested"),
    pytest.param(_line(rewards="[-Infinity, 0]"), "field 'rewards[0]' must be a finite number, got -inf",
                 id="minus-infinity-reward"),
    pytest.param(_line(meta="1e400"), "field 'meta' must be a finite number, got inf", id="float-overflow-to-inf"),
    pytest.param(_line(rewards=f"[{10**400}, 0]"),
                 "field 'rewards[0]' must be a finite number, got an integer of about 401 digits",
                 id="int-reward-10e400"),
    pytest.param(_line(meta="1" * 5000), "invalid JSON (an integer with more than 4300 digits)",
                 id="int-beyond-int-string-limit"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "invalid JSON (nested more than 100 levels deep)",
                 id="nesting-beyond-recursion-limit"),
    pytest.param(_line(meta="[" * 150 + "]" * 150),  # the path to the 101st level, cut at 60 characters
                 f"field '{('meta' + '[0]' * 99)[:57]}...' is nested more than 100 levels deep",
                 id="nesting-that-parses-but-is-too-deep"),
    pytest.param(_line(prompt='"Q\\ud800"'), "field 'prompt' contains the lone surrogate '\\ud800'",
                 id="lone-surrogate-escape"),
    pytest.param(GOOD[:-1] + b', "\\udfff": 1}', "a field name contains the lone surrogate '\\udfff'",
                 id="lone-surrogate-in-key"),
    pytest.param(GOOD.replace(b'"Q"', b'"Q\xff"'), "not valid UTF-8 text (byte 0xff at byte 14 of the line)",
                 id="non-utf8-byte"),
    pytest.param(b"\xef\xbb\xbf" + GOOD, "invalid JSON (a byte-order mark, U+FEFF, opens the line",
                 id="bom-after-the-first-line"),
    pytest.param(GOOD.replace(b'"Q"', b'"Q\x00"'), "invalid JSON (Invalid control character", id="raw-nul-byte"),
    pytest.param(b"[1, 2]", "expected a record (a JSON object / dict), got list", id="top-level-array"),
    pytest.param(b"null", "expected a record (a JSON object / dict), got NoneType", id="top-level-null"),
    pytest.param(b'"text"', "expected a record (a JSON object / dict), got str", id="top-level-string"),
    pytest.param(b"NaN", "the value must be a finite number, got nan", id="top-level-nan"),
    pytest.param(GOOD[:-1], "invalid JSON (Expecting ',' delimiter", id="truncated"),
]


@pytest.mark.parametrize(("line", "message"), MALFORMED)
def test_malformed_line_is_an_error_with_its_line_or_a_counted_skip(tmp_path, capsys, line, message):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(GOOD + b"\n" + line + b"\n" + GOOD + b"\n")
    dst.write_bytes(b"previous output\n")
    assert _cli(["data", "rs-dpo", str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert f"fastpref data rs-dpo: error: {src}:2: {message}" in err
    assert dst.read_bytes() == b"previous output\n"  # a failed command changes nothing
    assert _cli(["data", "rs-dpo", str(src), str(dst), "--skip-invalid"]) == 0
    err = capsys.readouterr().err
    assert f"skipped invalid record: {src}:2: {message}" in err
    assert "rs-dpo: 3 records in, 2 out; skipped: none; 1 invalid" in err
    assert read_jsonl(dst) == rejection_sampling_pairs([SAMPLE, SAMPLE])


ACCEPTED = [
    pytest.param(b"\xef\xbb\xbf" + GOOD + b"\n" + GOOD + b"\n", [SAMPLE, SAMPLE], id="bom-opening-the-file"),
    pytest.param(GOOD + b"\r\n" + GOOD + b"\r\n", [SAMPLE, SAMPLE], id="crlf"),
    pytest.param(b"\n  \r\n" + GOOD + b"\n\t\n" + GOOD, [SAMPLE, SAMPLE], id="blank-lines-no-final-newline"),
    pytest.param(_line(meta='"\\u0000 \\u00e9 \\u2028 \\ud83d\\ude00"'), [{**SAMPLE, "meta": "\x00 é \u2028 😀"}],
                 id="nul-escape-and-astral-pair"),
    pytest.param(_line(meta=f"[1e-400, {10**300}, -0.0]", rewards="[1e308, -1e308]"),
                 [{**SAMPLE, "meta": [0.0, 10**300, -0.0], "rewards": [1e308, -1e308]}], id="extreme-finite-numbers"),
    pytest.param(_line(meta="[" * 99 + "]" * 99), [{**SAMPLE, "meta": json.loads("[" * 99 + "]" * 99)}],
                 id="nesting-at-the-limit"),
    pytest.param(b"", [], id="empty-file"),
]


@pytest.mark.parametrize(("data", "records"), ACCEPTED)
def test_unusual_but_valid_input_is_read(tmp_path, capsys, data, records):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(data)
    assert _cli(["data", "rs-dpo", str(src), str(dst)]) == 0
    assert read_jsonl(dst) == rejection_sampling_pairs(records)  # \u0000, U+2028, big ints: written back exactly
    assert f"rs-dpo: {len(records)} records in, {len(records)} out; skipped: none; 0 invalid" in capsys.readouterr().err


def test_read_jsonl_checks_values_where_read_and_allow_nan_keeps_the_old_reading(tmp_path):
    path = tmp_path / "nan.jsonl"
    path.write_bytes(b'{"x": 1}\n{"x": [0, NaN]}\n')
    with pytest.raises(InvalidRecordError, match=rf"^{re.escape(str(path))}:2: field 'x\[1\]' must be a finite number"):
        read_jsonl(path)
    out = read_jsonl(path, allow_nan=True)
    assert out[0] == {"x": 1} and math.isnan(out[1]["x"][1])


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_no_input_line_gives_a_traceback(data):
    """Random lines (records with fields replaced by arbitrary JSON, NaN, huge ints, surrogates, raw bytes) through
    every recipe: exit 0 or a ``<file>:<line>:`` error with nothing written; --skip-invalid always finishes."""
    leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4),
                     st.sampled_from([10**400, "\ud800", math.nan, -math.inf]))
    value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.sampled_from(["role", "content", "type", "text"]), inner, max_size=3),
                         max_leaves=8)
    base = {"prompt": "Q", "chosen": "A", "rejected": "B", "score_chosen": 2, "score_rejected": 1,
            "responses": ["a", "b"], "rewards": [1.0, 0.0], "control": "C", "treatment": "T", "negative": "N",
            "negative_prompt": "P"}
    lines = []
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["record", "value", "bytes"]))
        if kind == "bytes":
            lines.append(data.draw(st.binary(max_size=12)).replace(b"\n", b" "))
            continue
        if kind == "record":
            rec = {k: v for k, v in base.items() if data.draw(st.booleans()) or k == "prompt"}
            for key in data.draw(st.lists(st.sampled_from(sorted(base)), max_size=3)):
                rec[key] = data.draw(value)
        else:
            rec = data.draw(value)
        lines.append(json.dumps(rec).encode("utf-8", "surrogatepass"))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in.jsonl")
        with open(src, "wb") as f:
            f.write(b"\n".join(lines) + b"\n")
        for recipe in ("rs-dpo", "counterfactual", "reward-augment", "sr-augment"):
            for skip in ([], ["--skip-invalid"]):
                dst = os.path.join(tmp, f"{recipe}{len(skip)}.jsonl")
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    rc = _cli(["data", recipe, src, dst, *skip])
                if rc == 0:
                    read_jsonl(dst)  # what was written is valid, standard JSONL
                else:
                    assert rc == 1 and not skip and not os.path.exists(dst)
                    assert re.search(rf"error: {re.escape(src)}:\d+: ", err.getvalue()), err.getvalue()


# --------------------------------------------------------------------------------------------- stdout


def test_stdout_receives_nothing_when_the_command_fails(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(GOOD + b"\n" + GOOD + b"\n" + _line(meta="NaN") + b"\n")
    assert _cli(["data", "rs-dpo", str(src), "-"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and f"{src}:3: field 'meta' must be a finite number, got nan" in err
    assert _cli(["data", "rs-dpo", str(src), "-", "--skip-invalid"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == rejection_sampling_pairs([SAMPLE, SAMPLE])
    assert "overwrote" not in err


def test_write_jsonl_writes_nothing_unless_every_record_can_be_written(tmp_path, capsys):
    with pytest.raises(InvalidRecordError, match=r"^record 1: field 'x\.y' must be a finite number, got nan"):
        write_jsonl([{"x": 1}, {"x": {"y": math.nan}}], "-")
    with pytest.raises(InvalidRecordError, match=r"^record 1: field 'a' contains the lone surrogate '\\ud800'"):
        write_jsonl([{"a": "ok"}, {"a": "\ud800"}], "-")
    with pytest.raises(TypeError, match=r"^record 0: Object of type object is not JSON serializable"):
        write_jsonl([{"a": object()}], tmp_path / "out.jsonl")
    assert capsys.readouterr().out == "" and not (tmp_path / "out.jsonl").exists()


def test_stdin_and_stdout_are_never_the_same_file(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(GOOD + b"\n\xff\n" + GOOD + b"\n")))
    assert _cli(["data", "rs-dpo", "-", "-", "--skip-invalid"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == rejection_sampling_pairs([SAMPLE, SAMPLE])
    assert "skipped invalid record: <stdin>:2: not valid UTF-8 text (byte 0xff at byte 1 of the line)" in err
    # A text-only stdin (no .buffer, as some harnesses install): same rules on the decoded lines.
    text = "\ufeff" + GOOD.decode() + "\n" + json.dumps({**SAMPLE, "id": "\ud800"}, ensure_ascii=False) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    assert _cli(["data", "rs-dpo", "-", "-", "--skip-invalid"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == rejection_sampling_pairs([SAMPLE])
    assert "skipped invalid record: <stdin>:2: field 'id' contains the lone surrogate '\\ud800'" in err


# ---------------------------------------------------------------------------------- output == input

EXTRA_ARGS = {
    "rs-dpo": [],
    "counterfactual": [],
    "reward-augment": [],
    "sr-augment": [],
    # Checked before the model is loaded (a missing model would be an error of its own after).
    "sample": ["--model", "no/such-model"],
    "counterfactual-generate": ["--model", "no/such-model", "--desired", "d", "--undesired", "u"],
}


@pytest.mark.parametrize("alias", ["same-path", "dot-relative-vs-absolute", "symlink-output", "symlink-input",
                                   "hard-link"])
@pytest.mark.parametrize("recipe", sorted(EXTRA_ARGS))
def test_output_that_is_the_input_file_is_refused(tmp_path, monkeypatch, capsys, recipe, alias):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "data.jsonl"
    src.write_bytes(GOOD + b"\n")
    if alias == "same-path":
        inp, out = "data.jsonl", "data.jsonl"
    elif alias == "dot-relative-vs-absolute":
        inp, out = "./data.jsonl", str(src)
    elif alias == "symlink-output":
        os.symlink(src, tmp_path / "link.jsonl")
        inp, out = "data.jsonl", "link.jsonl"
    elif alias == "symlink-input":
        os.symlink(src, tmp_path / "link.jsonl")
        inp, out = "link.jsonl", str(src)
    else:
        os.link(src, tmp_path / "hard.jsonl")
        inp, out = str(src), "hard.jsonl"
    before = sorted(os.listdir(tmp_path))
    assert _cli(["data", recipe, inp, out, *EXTRA_ARGS[recipe]]) == 1
    err = capsys.readouterr().err
    assert f"fastpref data {recipe}: error: the output {out} is the same file as the input {inp}: refusing" in err
    assert src.read_bytes() == GOOD + b"\n" and sorted(os.listdir(tmp_path)) == before


def test_output_that_is_the_template_file_is_refused(tmp_path, capsys):
    src, template = tmp_path / "in.jsonl", tmp_path / "goal.txt"
    write_jsonl([{"prompt": "x", "chosen": "a", "rejected": "b", "score_chosen": 2, "score_rejected": 1}], src)
    template.write_text("Aim for {score}.\n")
    assert _cli(["data", "reward-augment", str(src), str(template), "--template-file", str(template)]) == 1
    assert f"the output {template} is the same file as the --template-file {template}" in capsys.readouterr().err
    assert template.read_text() == "Aim for {score}.\n"


def test_template_file_that_is_not_utf8_names_the_file(tmp_path, capsys):
    src, template = tmp_path / "in.jsonl", tmp_path / "goal.txt"
    write_jsonl([{"prompt": "x", "chosen": "a", "rejected": "b", "score_chosen": 2, "score_rejected": 1}], src)
    template.write_bytes(b"Aim for {score}\xff.\n")
    assert _cli(["data", "reward-augment", str(src), str(tmp_path / "o.jsonl"), "--template-file", str(template)]) == 1
    assert f"error: --template-file {template}: not valid UTF-8 text (byte 0xff at byte 16)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- output paths


def test_missing_output_directory_names_the_output(tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "missing" / "out.jsonl"
    src.write_bytes(GOOD + b"\n")
    assert _cli(["data", "rs-dpo", str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert (f"fastpref data rs-dpo: error: {dst}: No such file or directory (the directory {dst.parent} does not "
            "exist)") in err and ".fastpref-" not in err
    assert _cli(["data", "rs-dpo", str(src), str(tmp_path)]) == 1
    assert f"error: {tmp_path}: Is a directory" in capsys.readouterr().err
    # The library names the output too.
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        write_jsonl([SAMPLE], dst)
    assert info.value.filename == str(dst) and ".fastpref-" not in str(info.value)


def test_missing_input_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert _cli(["data", "rs-dpo", str(missing), str(tmp_path / "o.jsonl")]) == 1
    assert capsys.readouterr().err == f"fastpref data rs-dpo: error: {missing}: No such file or directory\n"


def test_existing_output_is_overwritten_and_reported(tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(GOOD + b"\n")
    dst.write_text("old\n")
    os.chmod(dst, 0o640)
    assert _cli(["data", "rs-dpo", str(src), str(dst)]) == 0
    err = capsys.readouterr().err
    assert f"rs-dpo: overwrote the existing {dst}" in err
    assert read_jsonl(dst) == rejection_sampling_pairs([SAMPLE])
    assert stat.S_IMODE(os.stat(dst).st_mode) == 0o640  # as open(path, "w") keeps the mode
    fresh = tmp_path / "fresh.jsonl"
    assert _cli(["data", "rs-dpo", str(src), str(fresh)]) == 0
    assert "overwrote" not in capsys.readouterr().err
    # Through a symlink: the target is replaced and the link stays a link.
    link = tmp_path / "link.jsonl"
    os.symlink(fresh, link)
    fresh.write_text("old\n")
    assert _cli(["data", "rs-dpo", str(src), str(link)]) == 0
    assert link.is_symlink() and read_jsonl(fresh) == rejection_sampling_pairs([SAMPLE])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.jsonl", "in.jsonl", "link.jsonl", "out.jsonl"]


def test_non_regular_output_is_written_to_not_replaced(tmp_path, capsys):
    src, fifo = tmp_path / "in.jsonl", tmp_path / "pipe"
    src.write_bytes(GOOD + b"\n")
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    assert _cli(["data", "rs-dpo", str(src), str(fifo)]) == 0
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # renaming a temporary file over it would have replaced the pipe
    assert [json.loads(line) for line in received[0].splitlines()] == rejection_sampling_pairs([SAMPLE])
    assert "overwrote" not in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["sample", "counterfactual-generate"])
@pytest.mark.parametrize(("device", "match"), [
    pytest.param("meta", r"expected a device that holds data .* got 'meta'", id="meta"),
    pytest.param("bogus", r"expected a torch device such as cpu or cuda\[:i\], got 'bogus'", id="bogus"),
    pytest.param("cuda", r"expected an available device, got 'cuda': cuda is not available here", id="no-cuda",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_model_commands_refuse_a_device_without_data_as_bench_does(tmp_path, capsys, recipe, device, match):
    """Refused while the arguments are parsed (exit 2, the usage), before a model is loaded or a prompt read."""
    with pytest.raises(SystemExit) as exit_info:
        _cli(["data", recipe, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), *EXTRA_ARGS[recipe],
              "--device", device])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device: " in err and re.search(match, err), err
