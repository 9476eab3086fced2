"""The error measures the tests report with: a failing comparison says where the tensors differ."""

from __future__ import annotations

import pytest
import torch

from fastpref.testing import assert_within_torch_error, mismatch, rel_err


def test_mismatch_names_the_worst_element_and_nonfinite_counts():
    truth = torch.zeros(3, 4, dtype=torch.float64)
    got = truth.clone()
    got[1, 2] = 0.5
    got[2, 0] = float("nan")
    got[0, 3] = float("inf")
    msg = mismatch(got, truth)
    # NaN ranks worst, then inf; counts are per side.
    assert msg.startswith("worst at [2, 0]: got nan, expected 0"), msg
    got[2, 0] = 0.0
    assert mismatch(got, truth).startswith("worst at [0, 3]: got inf, expected 0")
    assert "got nan=1 inf=1" in msg and "expected nan=0 inf=0" in msg, msg


def test_mismatch_reports_shape_and_missing_tensors():
    assert "shape (2,) != expected (3,)" in mismatch(torch.zeros(2), torch.zeros(3))
    assert mismatch(None, torch.zeros(3)) == "no tensor produced"


def test_finite_worst_element_is_located():
    truth = torch.arange(6.0).reshape(2, 3)
    got = truth.clone()
    got[1, 1] += 3.0
    assert mismatch(got, truth).startswith("worst at [1, 1]: got 7, expected 4")


def test_assert_within_torch_error_says_where():
    truth = torch.ones(5, dtype=torch.float64)
    plain = truth + 1e-4
    fast = truth.clone()
    fast[3] = 2.0
    with pytest.raises(AssertionError, match=r"worst at \[3\]"):
        assert_within_torch_error("x", fast, plain, truth)
    assert rel_err(plain, truth) < 1e-3
