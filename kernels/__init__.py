"""Triton kernels and their launchers (installed as ``fastpref.kernels``; needs Triton).

No autograd and no Hugging Face here: ``fastpref.ops`` wraps these launchers. Every launch goes through
``launch.launch`` (device guard, recording for the ahead-of-time compile test).
"""

import sys as _sys


def _hand_over_the_name() -> None:
    """Imported as a top-level ``kernels`` (a checkout's root on ``sys.path``: ``python -m`` / ``-c`` run from
    it), this folder would shadow Hugging Face's ``kernels`` package, which transformers >= 5.25 imports at start.
    Give the name to that package, or fail as an environment without it would."""
    import importlib
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = _sys.path[:]
    _sys.path[:] = [p for p in saved if os.path.abspath(p or os.curdir) != root]
    del _sys.modules[__name__]
    try:
        importlib.import_module("kernels")  # the import that brought us here returns sys.modules["kernels"]
    finally:
        _sys.path[:] = saved


if __name__ == "kernels":
    _hand_over_the_name()
else:
    from .fused_gemm import GemmConfig, linear_fold, linear_grad_input, linear_grad_weight
    from .row_kernels import fold_logsumexp, logit_grad_

    __all__ = ["GemmConfig", "fold_logsumexp", "linear_fold", "linear_grad_input", "linear_grad_weight",
               "logit_grad_"]
