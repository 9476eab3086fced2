"""JSONL in and out (one JSON object per line; blank lines ignored; ``"-"`` is stdin / stdout)."""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from .records import InvalidRecordError, Record, iter_source, json_problem

__all__ = ["read_jsonl", "write_jsonl"]


def read_jsonl(path: str | os.PathLike, *, allow_nan: bool = False) -> list[Record]:
    """All records of a JSONL file (UTF-8, an opening byte-order mark allowed, LF or CRLF line ends).

    A line that is not UTF-8, not valid JSON or not an object raises
    :class:`~fastpref.data.records.InvalidRecordError` naming ``<file>:<line>``, as does a value that could
    not be written back as standard JSON: ``NaN`` / ``Infinity`` (or a number beyond ±1.8e308, which reads as
    ``inf``), a lone surrogate (``"\\ud800"``), nesting deeper than
    :data:`~fastpref.data.records.MAX_JSON_DEPTH`. ``allow_nan=True`` accepts the non-finite numbers as
    Python's ``json`` does.
    """
    out = []
    for where, rec in iter_source(os.fspath(path), allow_nan=allow_nan):
        if isinstance(rec, InvalidRecordError):
            raise rec
        if not isinstance(rec, Mapping):
            raise InvalidRecordError(where, f"expected a JSON object, got {type(rec).__name__}")
        out.append(rec)
    return out


def _encode(records: Iterable[Mapping[str, Any]]) -> list[bytes]:
    """Every record as one UTF-8 JSON line, or an error naming the record and the field."""
    lines = []
    for i, rec in enumerate(records):
        try:
            lines.append((json.dumps(dict(rec), ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))
        except (ValueError, RecursionError) as e:  # NaN / inf, lone surrogates, int-string limit, depth
            raise InvalidRecordError(f"record {i}", json_problem(rec) or f"cannot be written as JSON ({e})") from e
        except TypeError as e:
            raise TypeError(f"record {i}: {e}") from e
    return lines


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> int:
    """Write records as JSONL (UTF-8, non-ASCII kept); returns the number written.

    Nothing is written unless every record can be: all lines are encoded first, and a non-finite float, a
    lone surrogate or a non-JSON value raises (``ValueError`` naming the record and the field, ``TypeError``
    for other types) before any byte reaches the file or stdout. A file appears complete or not at all
    (written to a temporary file beside it, then renamed over it); an existing file is overwritten as
    ``open(path, "w")`` would (its permission bits kept, a symlink followed to its target). An existing
    non-regular file (``/dev/null``, a named pipe) is written to directly. ``OSError`` names ``path``.
    """
    path = os.fspath(path)
    lines = _encode(records)
    if path == "-":
        sys.stdout.flush()
        out = getattr(sys.stdout, "buffer", None)  # bytes: JSONL is UTF-8 whatever the locale's encoding
        for line in lines:
            if out is None:
                sys.stdout.write(line.decode("utf-8"))
            else:
                out.write(line)
        (out or sys.stdout).flush()
        return len(lines)
    try:
        _write_file(lines, path)
    except OSError as e:
        # Name the output (not the temporary file) and say which part of the path is missing.
        directory = os.path.dirname(os.path.abspath(path))
        reason = e.strerror or str(e)
        if not os.path.isdir(directory):
            reason += f" (the directory {directory} does not exist)"
        raise type(e)(e.errno, reason, path) from e
    return len(lines)


def _write_file(lines: list[bytes], path: str) -> None:
    target = os.path.realpath(path)  # replace a symlink's target, not the link
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        # /dev/null, /dev/stdout, a FIFO: renaming a temporary file over it would replace the device itself.
        with open(target, "wb") as f:
            f.writelines(lines)
        return
    fd, tmp = tempfile.mkstemp(prefix=".fastpref-", suffix=".jsonl.tmp", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "wb") as f:
            if st is not None:
                mode = stat.S_IMODE(st.st_mode)  # overwriting keeps the file's mode, as open(path, "w") does
            else:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask  # mkstemp makes it private; give it the mode a plain open() would
            os.chmod(tmp, mode)
            f.writelines(lines)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
