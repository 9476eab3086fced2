"""The ahead-of-time compile's readers, on fixed text (no compile): loops in SASS by their back edges, ptxas's
C7515 advisory, and the SASS table's 10 % rule and report (``fastpref/testing/sass_table.py``)."""

from __future__ import annotations

import json

import pytest
from fastpref.kernels.aot import Compiled, loop_sizes

from fastpref.testing import sass_table

# nvdisasm -c layout: an outer loop (.L_x_1) around an inner one (.L_x_2) with a forward branch inside it, a second
# back edge to the inner head, and the trap loop that ends every kernel
SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/                   MOV R3, RZ ;
.L_x_2:
        /*0030*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0040*/              @P0 BRA `(.L_x_3) ;
        /*0050*/                   MUFU.EX2 R4, R4 ;
.L_x_3:
        /*0060*/              @!P1 BRA `(.L_x_2) ;
        /*0070*/                   FADD R5, R5, R4 ;
        /*0080*/              @P2 BRA `(.L_x_2) ;
        /*0090*/                   MUFU.EX2 R6, R6 ;
        /*00a0*/              @!P3 BRA `(.L_x_1) ;
        /*00b0*/                   EXIT ;
.L_x_4:
        /*00c0*/                   BRA `(.L_x_4);
"""


def test_loop_sizes_counts_each_body_once_without_its_nested_loops():
    # inner: 0x30..0x80 = 6 instructions (both sides of its branch, up to its last back edge);
    # outer: 0x10..0xa0 = 10, less the inner 6 = 4
    assert loop_sizes(SASS) == (4, 6)
    assert loop_sizes("        /*0000*/                   EXIT ;\n") == ()


def test_c7515_is_read_from_ptxas_info_lines():
    log = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
           "non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline "
           "stage in the function '_linear_grad_weight_kernel'\nptxas info    : Used 182 registers, used 1 barriers\n")
    c = Compiled("k", 90, 8, 182, 0, 0, 0, ptxas_log=log)
    assert c.wgmma_serialized and len(c.ptxas_warnings) == 1
    clean = Compiled("k", 90, 8, 182, 0, 0, 0, ptxas_log=log.splitlines()[1])
    assert not clean.wgmma_serialized and clean.ptxas_warnings == []


def test_regressions_over_10pc_structure_changes_and_new_entries_fail():
    before = {"sm_90": {"a": [100], "b": [50, 200], "c": [10], "gone": [1]}}
    now = {"sm_90": {"a": [110], "b": [56, 150], "c": [10, 4], "new": [7]}}
    rows = sass_table.regressions(before, now)
    assert [(r[0], r[4]) for r in rows] == [("b", "+12%"), ("c", "loop structure changed"), ("new", "not in the table")]
    assert sass_table.regressions(before, {"sm_90": {"a": [90]}}) == []  # improvements pass
    text = sass_table.report(rows, "3.9.0")
    cells = [[c.strip() for c in line.split(" | ")] for line in text.splitlines() if " | " in line]
    assert cells[0] == ["kernel / specialisation", "arch", "before", "now", "change"]
    assert ["b", "sm_90", "50/200", "56/150", "+12%"] in cells and "FASTPREF_UPDATE_SASS" in text


def test_update_mode_rewrites_only_its_section_and_version(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    sass_table.update("row_kernels", "3.6.0", {"sm_80": {"k": [5]}}, path)
    sass_table.update("fused_gemm", "3.9.0", {"sm_90": {"g": [9]}}, path)
    sass_table.update("row_kernels", "3.9.0", {"sm_80": {"k": [6]}}, path)
    table = json.loads(path.read_text())
    assert table == {"fused_gemm": {"3.9.0": {"sm_90": {"g": [9]}}},
                     "row_kernels": {"3.6.0": {"sm_80": {"k": [5]}}, "3.9.0": {"sm_80": {"k": [6]}}}}
    assert sass_table.committed("row_kernels", "3.10.0", path) is None
    monkeypatch.setattr(sass_table, "TABLE", path)  # check() reads and writes this file, not the committed one
    monkeypatch.setenv(sass_table.UPDATE_ENV, "1")
    assert sass_table.check("row_kernels", "3.9.0", {"sm_80": {"k": [60]}}) is None  # rewritten, not judged
    monkeypatch.delenv(sass_table.UPDATE_ENV)
    assert sass_table.check("row_kernels", "3.9.0", {"sm_80": {"k": [60]}}) is None
    assert "+20%" in sass_table.check("row_kernels", "3.9.0", {"sm_80": {"k": [72]}})
    with pytest.raises(LookupError, match=r"3\.10\.0"):
        sass_table.check("row_kernels", "3.10.0", {"sm_80": {"k": [1]}})
    assert json.loads(path.read_text())["row_kernels"]["3.9.0"] == {"sm_80": {"k": [60]}}
