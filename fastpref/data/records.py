"""Record plumbing shared by the data recipes: sources, validation, prompt editing, statistics.

Records follow TRL's preference format: ``prompt``, ``chosen``, ``rejected`` (+ ``score_chosen``,
``score_rejected`` where scores exist). A prompt is text (``str``) or chat messages (a list of
``{"role", "content"}`` dicts); a response is text or a list of (assistant) messages. Prompt and responses of
one output record always share the format (text responses are wrapped as assistant messages when the prompt
is chat messages), as TRL requires.

Sources are plain iterables of dicts, a Hugging Face ``datasets.Dataset`` or a JSONL path. Malformed records
raise :class:`InvalidRecordError` naming the record (``record 3``) or, for JSONL, the file and line
(``data.jsonl:4``) — or, with ``errors="skip"``, are counted and listed in :class:`RecipeStats`; nothing is
dropped silently.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from ..utils.validation import describe, is_long_int

Message: TypeAlias = Mapping[str, Any]
Prompt: TypeAlias = str | list[dict[str, Any]]
Response: TypeAlias = str | list[dict[str, Any]]
Record: TypeAlias = dict[str, Any]
#: A recipe source: records in memory, a ``datasets.Dataset``, or the path of a JSONL file.
Source: TypeAlias = Iterable[Mapping[str, Any]] | str | os.PathLike

_ERRORS = ("raise", "skip")


class InvalidRecordError(ValueError):
    """A malformed input record. ``where`` is ``"record <i>"`` (0-based) or ``"<file>:<line>"``."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


@dataclass
class RecipeStats:
    """What a recipe read, wrote and skipped.

    ``skipped`` maps a reason to a count of candidate pairs not emitted (e.g. ``below_threshold``, ``ties``,
    ``identical``, ``duplicate``) or, for ``fewer_than_2_responses``, of well-formed records that cannot
    give a pair; ``invalid`` lists the messages of malformed records skipped under ``errors="skip"`` (with
    ``errors="raise"`` the first one raises instead).
    """

    recipe: str
    records_in: int = 0
    records_out: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    invalid: list[str] = field(default_factory=list)

    def skip(self, reason: str, count: int = 1) -> None:
        if count:
            self.skipped[reason] = self.skipped.get(reason, 0) + count

    def summary(self) -> str:
        """One line: ``rs-dpo: 10 records in, 23 out; skipped: 12 below_threshold; 0 invalid``."""
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return (
            f"{self.recipe}: {self.records_in} records in, {self.records_out} out; "
            f"skipped: {skipped}; {len(self.invalid)} invalid"
        )


# ----------------------------------------------------------------------------------------------- sources


def is_dataset(obj: Any) -> bool:
    """True for a ``datasets.Dataset`` (checked without importing ``datasets``)."""
    mod = sys.modules.get("datasets")
    return mod is not None and isinstance(obj, mod.Dataset)


def iter_source(source: Source, *, allow_nan: bool = False) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)``; for JSONL a malformed line yields an :class:`InvalidRecordError` as record.

    A JSONL line is malformed when it is not UTF-8, not JSON, or fails :func:`json_problem` (non-finite
    numbers unless ``allow_nan``, lone surrogates, nesting beyond :data:`MAX_JSON_DEPTH`), so every field is
    checked where it is read and the error names the line. Blank lines are skipped (they still count as lines).
    """
    if isinstance(source, (str, os.PathLike)):
        yield from _iter_jsonl(os.fspath(source), allow_nan=allow_nan)
        return
    if isinstance(source, Mapping):
        raise TypeError(f"records must be an iterable of dicts, a datasets.Dataset or a JSONL path; got one dict "
                        f"(keys {sorted(source)}): wrap it in a list")
    if not isinstance(source, Iterable):
        raise TypeError(f"records must be an iterable of dicts, a datasets.Dataset or a JSONL path; "
                        f"got {type(source).__name__}")
    for i, rec in enumerate(source):
        yield f"record {i}", rec


#: Deepest nesting accepted in a JSONL record. Preference records are a few levels deep (chat messages with
#: content parts: 5); a cap far below Python's recursion limit keeps every later step (copies, comparisons,
#: ``json.dumps`` at write time) from hitting a RecursionError on a record that happened to parse.
MAX_JSON_DEPTH = 100

_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _describe(path: str, limit: int = 60) -> str:
    if not path:
        return "the value"
    short = path if len(path) <= limit else path[: limit - 3] + "..."  # deep nesting: 'meta[0][0][0]...'
    return f"value {short!r}" if path.startswith("[") else f"field {short!r}"


def json_problem(value: Any, *, allow_nan: bool = False, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why ``value`` (a parsed JSON record) cannot round-trip through standard UTF-8 JSON, or ``None``.

    Finds, in document order, a non-finite float (``NaN`` / ``Infinity`` literals, or numbers beyond
    ±1.8e308, which Python's ``json`` reads as ``inf``) unless ``allow_nan``, a lone surrogate in a string or
    key (``"\\ud800"`` is valid JSON syntax but no Unicode text, so it cannot be written as UTF-8), or
    containers nested deeper than ``max_depth``. The reason names the field (``field 'meta.scores[2]'``).
    Iterative, so depth costs no Python stack.
    """
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            bad = _LONE_SURROGATE.search(item)
            if bad is not None:
                return (f"{_describe(path)} contains the lone surrogate {bad.group()!r} (not Unicode text; it cannot "
                        "be written as UTF-8)")
        elif isinstance(item, float):
            if not allow_nan and not math.isfinite(item):
                return (f"{_describe(path)} must be a finite number, got {item!r} (standard JSON has no NaN or "
                        "Infinity; numbers beyond ±1.8e308 read as inf)")
        elif isinstance(item, (Mapping, list, tuple)):
            if depth > max_depth:
                return f"{_describe(path)} is nested more than {max_depth} levels deep"
            if isinstance(item, Mapping):
                children = []
                for key, child in item.items():
                    key = str(key)
                    bad = _LONE_SURROGATE.search(key)
                    if bad is not None:
                        inside = f" in {_describe(path)}" if path else ""
                        return (f"a field name{inside} contains the lone surrogate {bad.group()!r} (not Unicode "
                                "text; it cannot be written as UTF-8)")
                    children.append((child, f"{path}.{key}" if path else key, depth + 1))
            else:
                children = [(child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item)]
            stack.extend(reversed(children))  # popped in document order
    return None


_BLANK = object()  # a blank line (a line reading "null" is a record, a malformed one)

# A lone surrogate can only come from a \uD800-\uDFFF escape: strict UTF-8 decoding never yields one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class _LineParser:
    """``json.loads`` for JSONL lines that notes whether a line may hold what :func:`json_problem` refuses.

    The full walk costs about as much as the parse, so it runs only on lines that may need it: a non-finite
    number was parsed (the hooks see every ``NaN`` / ``Infinity`` token and every float), a surrogate escape
    occurs, or there are more brackets than :data:`MAX_JSON_DEPTH`.
    """

    def __init__(self, allow_nan: bool) -> None:
        self.allow_nan = allow_nan
        self.non_finite = False
        self._decoder = json.JSONDecoder(parse_float=self._float, parse_constant=self._constant)

    def _float(self, text: str) -> float:
        value = float(text)
        if not math.isfinite(value):  # 1e400
            self.non_finite = True
        return value

    def _constant(self, text: str) -> float:  # "NaN", "Infinity", "-Infinity"
        self.non_finite = True
        return float(text)

    def __call__(self, raw: bytes | str, where: str, *, first: bool) -> Any:
        """One line -> the parsed value, ``_BLANK``, or an :class:`InvalidRecordError` (returned, not raised)."""
        if isinstance(raw, bytes):
            try:
                # A UTF-8 byte-order mark may open the file (Windows tools write one); json.loads(bytes) allows it.
                line = raw.decode("utf-8-sig" if first else "utf-8")
            except UnicodeDecodeError as e:
                offset = e.start + len(raw) - len(e.object)  # utf-8-sig reports offsets past the BOM
                return InvalidRecordError(where, f"not valid UTF-8 text (byte 0x{raw[offset]:02x} at byte "
                                          f"{offset + 1} of the line)")
        else:
            line = raw.removeprefix("\ufeff") if first else raw
        if not line.strip():
            return _BLANK
        if line.startswith("\ufeff"):  # files concatenated with `cat`: one BOM per part
            return InvalidRecordError(where, "invalid JSON (a byte-order mark, U+FEFF, opens the line; only the "
                                      "first line of a file may have one)")
        self.non_finite = False
        try:
            rec = self._decoder.decode(line)
        except json.JSONDecodeError as e:
            return InvalidRecordError(where, f"invalid JSON ({e.msg} at column {e.colno})")
        except RecursionError:  # the decoder recurses per level; the record would be refused below anyway
            return InvalidRecordError(where, f"invalid JSON (nested more than {MAX_JSON_DEPTH} levels deep)")
        except ValueError as e:  # int("1" * 5000): Python's integer-string conversion limit
            if "integer string conversion" in str(e):
                return InvalidRecordError(where, f"invalid JSON (an integer with more than "
                                          f"{sys.get_int_max_str_digits()} digits)")
            return InvalidRecordError(where, f"invalid JSON ({e})")
        suspect = (
            (self.non_finite and not self.allow_nan)
            or _SURROGATE_ESCAPE.search(line) is not None
            or (not isinstance(raw, bytes) and _LONE_SURROGATE.search(line) is not None)
            or line.count("[") + line.count("{") > MAX_JSON_DEPTH
        )
        problem = json_problem(rec, allow_nan=self.allow_nan) if suspect else None
        return rec if problem is None else InvalidRecordError(where, problem)


def _iter_jsonl(path: str, *, allow_nan: bool = False) -> Iterator[tuple[str, Any]]:
    # Bytes, split on "\n" only (the JSON Lines rule; "\r" of CRLF is JSON whitespace): a line that is not
    # UTF-8 is then one malformed record with its line number instead of a decode error that ends the file.
    if path == "-":
        stream: Any = getattr(sys.stdin, "buffer", sys.stdin)
    else:
        stream = open(path, "rb")
    name = "<stdin>" if path == "-" else path
    parse = _LineParser(allow_nan)
    try:
        for lineno, raw in enumerate(stream, start=1):
            where = f"{name}:{lineno}"
            rec = parse(raw, where, first=lineno == 1)
            if rec is not _BLANK:
                yield where, rec
    finally:
        if path != "-":
            stream.close()


def run_recipe(
    name: str,
    source: Source,
    per_record: Callable[[Mapping[str, Any], str, RecipeStats], list[Record]],
    *,
    errors: str,
    return_stats: bool,
) -> Any:
    """Apply ``per_record`` to every record of ``source``; the result has the source's container type.

    A list for in-memory and JSONL sources, a ``datasets.Dataset`` for a Dataset. ``per_record`` validates
    before it touches ``stats`` so that a malformed record leaves no partial counts behind.
    """
    if errors not in _ERRORS:
        raise ValueError(f"errors must be one of {_ERRORS}, got {errors!r}")
    stats = RecipeStats(name)
    out: list[Record] = []
    for where, rec in iter_source(source):
        stats.records_in += 1
        try:
            if isinstance(rec, InvalidRecordError):
                raise rec
            if not isinstance(rec, Mapping):
                raise InvalidRecordError(where, f"expected a record (a JSON object / dict), got {type(rec).__name__}")
            out.extend(per_record(rec, where, stats))
        except InvalidRecordError as e:
            if errors == "raise":
                raise
            stats.invalid.append(str(e))
    stats.records_out = len(out)
    result: Any = out
    if is_dataset(source):
        result = sys.modules["datasets"].Dataset.from_list(out)
    return (result, stats) if return_stats else result


# ------------------------------------------------------------------------------------------- validation


def require(rec: Mapping[str, Any], name: str, where: str) -> Any:
    """``rec[name]``, or an :class:`InvalidRecordError` listing the fields present."""
    if name not in rec or rec[name] is None:
        present = ", ".join(map(str, rec)) or "none"
        raise InvalidRecordError(where, f"missing field {name!r} (fields present: {present})")
    return rec[name]


def is_messages(value: Any) -> bool:
    """True for a non-empty list of ``{"role", "content"}`` mappings."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)
    )


def check_text_or_messages(value: Any, name: str, where: str) -> Prompt:
    """Validate a prompt / response: a string or chat messages; returns a plain copy (lists of dicts)."""
    if isinstance(value, str):
        return value
    if is_messages(value):
        return [dict(m) for m in value]
    raise InvalidRecordError(
        where, f"field {name!r} must be text (str) or chat messages (a non-empty list of {{'role', 'content'}} dicts), "
        f"got {_short(value)}"
    )


def check_score(value: Any, name: str, where: str) -> float | int:
    """A finite real number (bool and strings rejected) within the float range; returned unchanged (ints
    stay ints)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRecordError(where, f"field {name!r} must be a finite number, got {_short(value)}")
    if isinstance(value, numbers.Integral) and abs(int(value)) > sys.float_info.max:  # float() would overflow
        raise InvalidRecordError(where, f"field {name!r} must be a finite number, got {_short(value)} (beyond the "
                                 "float range, ±1.8e308)")
    if not math.isfinite(float(value)):
        raise InvalidRecordError(where, f"field {name!r} must be a finite number, got {float(value)!r}")
    return value


def check_list(value: Any, name: str, where: str) -> list[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise InvalidRecordError(where, f"field {name!r} must be a list, got {_short(value)}")
    return list(value)


def _short(value: Any, limit: int = 60) -> str:
    if is_long_int(value):
        return describe(value)
    text = repr(value)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(value).__name__} {text}"


# ------------------------------------------------------------------------------------------- prompts


def as_messages(value: Prompt, role: str) -> list[dict[str, Any]]:
    """Text becomes ``[{"role": role, "content": text}]``; messages are copied."""
    return [{"role": role, "content": value}] if isinstance(value, str) else [dict(m) for m in value]


def align_formats(prompt: Prompt, *responses: Response) -> tuple[Prompt, ...]:
    """Give prompt and responses one format: all text, or (if any is chat messages) all messages."""
    if isinstance(prompt, str) and all(isinstance(r, str) for r in responses):
        return (prompt, *responses)
    return (as_messages(prompt, "user"), *(as_messages(r, "assistant") for r in responses))


def _prepend_to_content(content: Any, text: str, separator: str, where: str) -> Any:
    if isinstance(content, str):
        return text + separator + content
    if isinstance(content, list):  # multimodal parts: [{"type": "text", "text": ...}, {"type": "image"}, ...]
        parts = [dict(p) if isinstance(p, Mapping) else p for p in content]
        if parts and isinstance(parts[0], dict) and parts[0].get("type") == "text":
            parts[0]["text"] = text + separator + str(parts[0].get("text") or "")
        else:
            parts.insert(0, {"type": "text", "text": text + separator.rstrip(" ")})
        return parts
    raise InvalidRecordError(where, f"message content must be a string or a list of parts, got {_short(content)}")


def prepend_to_first_user_turn(messages: Sequence[Message], text: str, separator: str,
                               where: str = "prompt") -> list[dict[str, Any]]:
    """Copy of ``messages`` with ``text + separator`` put before the content of the first user turn."""
    out = [dict(m) for m in messages]
    for m in out:
        if m.get("role") == "user":
            m["content"] = _prepend_to_content(m["content"], text, separator, where)
            return out
    roles = [m.get("role") for m in out]
    raise InvalidRecordError(where, f"the chat prompt has no user turn to prefix (roles: {roles})")


def add_instruction(prompt: Prompt, instruction: str, *, as_system_message: bool = True,
                    separator: str = "\n\n", where: str = "prompt") -> Prompt:
    """Put ``instruction`` in front of a prompt, as a system message or as a prefix.

    - ``as_system_message=True``: a system message carrying ``instruction`` goes first; a text prompt becomes
      ``[{"role": "system", ...}, {"role": "user", "content": prompt}]``. If the prompt already opens with a
      system message, the instruction is merged into it (``instruction + separator + existing``) rather than
      adding a second system message, which many chat templates reject.
    - ``as_system_message=False``: text prompts become ``instruction + separator + prompt``; chat prompts get
      the same prefix on their first user turn.
    """
    if as_system_message:
        messages = as_messages(prompt, "user")
        if messages and messages[0].get("role") == "system":
            messages[0]["content"] = _prepend_to_content(messages[0]["content"], instruction, separator, where)
            return messages
        return [{"role": "system", "content": instruction}, *messages]
    if isinstance(prompt, str):
        return instruction + separator + prompt
    return prepend_to_first_user_turn(prompt, instruction, separator, where)


def split_prompt(rec: Mapping[str, Any], where: str) -> tuple[Prompt, Response, Response]:
    """Return ``(prompt, chosen, rejected)`` of a preference record in explicit-prompt form, formats aligned.

    Like TRL's ``maybe_extract_prompt``: when the record has no prompt, or a text prompt while ``chosen`` /
    ``rejected`` are whole conversations (UltraFeedback-binarized), the prompt is the leading turns that
    ``chosen`` and ``rejected`` share, and they keep only their remaining turns.
    """
    chosen = check_text_or_messages(require(rec, "chosen", where), "chosen", where)
    rejected = check_text_or_messages(require(rec, "rejected", where), "rejected", where)
    prompt = rec.get("prompt")
    if isinstance(chosen, list) and isinstance(rejected, list) and (prompt is None or isinstance(prompt, str)):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n > 0:
            return chosen[:n], chosen[n:], rejected[n:]
    prompt = check_text_or_messages(require(rec, "prompt", where), "prompt", where)
    return align_formats(prompt, chosen, rejected)  # type: ignore[return-value]


def content_key(value: Any) -> str:
    """A hashable, order-stable key of a response / pair (for de-duplication)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
