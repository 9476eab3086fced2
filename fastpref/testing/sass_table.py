"""The committed table of SASS instructions per loop iteration of every compiled kernel specialisation
(``tests/data/sass_per_iteration.json``), so a kernel change is judged without a GPU.

The ahead-of-time compile tests (``tests/test_kernels_aot.py``: the row kernels; ``tests/test_fused_gemm_aot.py``:
the fused GEMMs) count, per specialisation and target, the static SASS instructions of each loop body
(``fastpref.kernels.aot.loop_sizes``) and compare them with the table: more than ``TOLERANCE`` (10 %) above the
table, a changed loop structure or a specialisation missing from it fails, printing one row per change (kernel,
specialisation, arch, before, now). The table holds one section per test (``row_kernels``, ``fused_gemm``), per
Triton version (the installed one and the GPU machine's 3.6 in ``.triton36``), per target (``sm_80``, ``sm_90``).

After a deliberate kernel change, regenerate it for both Triton versions with one command (the repository root)::

    FASTPREF_UPDATE_SASS=1 FASTPREF_TRITON36=$PWD/.triton36 .venv/bin/python -m pytest -n 0 -q -p no:cacheprovider \\
        tests/test_kernels_aot.py tests/test_fused_gemm_aot.py tests/test_gpu_readiness.py -k aot

and commit ``tests/data/sass_per_iteration.json`` with the change (``git diff`` shows what moved).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

UPDATE_ENV = "FASTPREF_UPDATE_SASS"
TABLE = Path(__file__).resolve().parents[2] / "tests" / "data" / "sass_per_iteration.json"
TOLERANCE = 0.10


def update_requested() -> bool:
    return os.environ.get(UPDATE_ENV, "0") not in ("", "0")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[dict]:
    """The table, read under an exclusive lock (the two compile tests may update it at once under xdist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / f"fastpref-{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = json.loads(path.read_text()) if path.exists() else {}
        yield table


def update(section: str, version: str, measured: dict[str, dict[str, list[int]]], path: Path | None = None) -> None:
    """Replace ``section``'s entries for Triton ``version`` with ``measured`` ({arch: {specialisation: loops}})."""
    path = TABLE if path is None else path
    with _locked(path) as table:
        table.setdefault(section, {})[version] = {arch: dict(sorted(m.items())) for arch, m in sorted(measured.items())}
        table[section] = dict(sorted(table[section].items()))
        path.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")


def committed(section: str, version: str, path: Path | None = None) -> dict[str, dict[str, list[int]]] | None:
    """``section``'s entries for Triton ``version``, or None when the table has none for it."""
    path = TABLE if path is None else path
    if not path.exists():
        return None
    return json.loads(path.read_text()).get(section, {}).get(version)


def regressions(before: dict[str, dict[str, list[int]]], now: dict[str, dict[str, list[int]]],
                tolerance: float = TOLERANCE) -> list[tuple[str, str, str, str, str]]:
    """(specialisation, arch, before, now, why) for every loop more than ``tolerance`` above the table, every
    changed loop structure and every specialisation the table lacks; improvements and dropped entries pass."""
    rows = []
    for arch in sorted(now):
        for spec, loops in sorted(now[arch].items()):
            old = before.get(arch, {}).get(spec)
            if old is None:
                rows.append((spec, arch, "-", _fmt(loops), "not in the table"))
            elif len(old) != len(loops):
                rows.append((spec, arch, _fmt(old), _fmt(loops), "loop structure changed"))
            elif any(n > o * (1 + tolerance) for o, n in zip(old, loops)):
                worst = max(n / o - 1 for o, n in zip(old, loops) if o)
                rows.append((spec, arch, _fmt(old), _fmt(loops), f"+{worst:.0%}"))
    return rows


def _fmt(loops: Iterable[int]) -> str:
    return "/".join(str(n) for n in loops) or "no loop"


def report(rows: list[tuple[str, str, str, str, str]], version: str) -> str:
    """A readable table of ``regressions``' rows, with the command that accepts them."""
    head = ("kernel / specialisation", "arch", "before", "now", "change")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return (f"SASS instructions per loop iteration (each loop of a kernel, outer to inner by address, nested loops "
            f"left out) under Triton {version} differ from {TABLE.relative_to(TABLE.parents[2])} by more than "
            f"{TOLERANCE:.0%}:\n" + "\n".join(lines) + "\nIf the change is meant, regenerate the table as "
            "fastpref/testing/sass_table.py says (FASTPREF_UPDATE_SASS=1) and commit it.")


def check(section: str, version: str, now: dict[str, dict[str, list[int]]]) -> str | None:
    """Compare with (or, under ``FASTPREF_UPDATE_SASS=1``, rewrite) the table. Returns the failure report, or
    None; raises LookupError when the table has no entries for this Triton version (nothing to judge against)."""
    if update_requested():
        update(section, version, now)
        return None
    before = committed(section, version)
    if before is None:
        raise LookupError(f"{TABLE.name} has no {section} entries for Triton {version}")
    rows = regressions(before, now)
    return report(rows, version) if rows else None


__all__ = ["TABLE", "TOLERANCE", "UPDATE_ENV", "check", "committed", "regressions", "report", "update",
           "update_requested"]
