"""What the tests' parametrisation depends on (installed packages, devices); the builders and error measures
are ``fastpref.testing``'s, shared with the benchmarks."""

from __future__ import annotations

import importlib.util

import torch

from fastpref.testing import assert_within_torch_error, make_labels, rel_err

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
# Backends every kernel test runs: the PyTorch path, and the Triton kernels (interpreter on the CPU).
BACKENDS = ["torch", "triton"] if HAS_TRITON else ["torch"]

__all__ = ["BACKENDS", "HAS_CUDA", "HAS_TRITON", "assert_within_torch_error", "make_labels", "rel_err"]
