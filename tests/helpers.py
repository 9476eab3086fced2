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
# (backend, gemm) of the tests that run every path: the PyTorch path, the Triton row kernels over cuBLAS tiles, and
# the fused Triton GEMMs (fold in the epilogue, gradient in the prologue).
PATHS = [("torch", "cublas"), *([("triton", "cublas"), ("triton", "fused")] if HAS_TRITON else [])]
PATH_IDS = ["torch", "triton", "fused"][: len(PATHS)]

__all__ = ["BACKENDS", "HAS_CUDA", "HAS_TRITON", "PATHS", "PATH_IDS", "assert_within_torch_error", "make_labels",
           "rel_err"]
