"""Triton kernels and their launchers (installed as ``fastpref.kernels``; needs Triton).

No autograd and no Hugging Face here: ``fastpref.ops`` wraps these launchers. Every launch goes through
``launch.launch`` (device guard, recording for the ahead-of-time compile test).
"""

from .fused_gemm import GemmConfig, linear_fold, linear_grad_input, linear_grad_weight
from .row_kernels import fold_logsumexp, logit_grad_

__all__ = ["GemmConfig", "fold_logsumexp", "linear_fold", "linear_grad_input", "linear_grad_weight", "logit_grad_"]
