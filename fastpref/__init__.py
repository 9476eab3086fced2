"""fastpref: fused Triton kernels for preference optimisation that never materialise the [tokens, vocab] logits.

Core ops: ``token_logps``, ``sequence_logps``, ``linear_cross_entropy``. Losses: ``DPOLoss``, ``IPOLoss``,
``SrDPOLoss``, ``SrIPOLoss``, ``PreferenceLoss``; formulas on log-probs in ``fastpref.losses``. Hugging Face and
TRL integrations live in ``fastpref.integrations`` and data recipes in ``fastpref.data`` (imported lazily).
"""

from __future__ import annotations

import importlib
from typing import Any

from . import losses
from .functional import linear_cross_entropy, sequence_logps, token_logps
from .inputs import ReferenceInputs, RefinementInputs
from .kto import KTOLoss, KTOOutput
from .modules import DPOLoss, IPOLoss, PreferenceLoss, SrDPOLoss, SrIPOLoss
from .ops.vocab_shard import shard_head
from .outputs import PreferenceOutput

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("compat", "data", "integrations", "reference", "benchmark", "kernels", "testing")

__all__ = [
    "DPOLoss",
    "IPOLoss",
    "KTOLoss",
    "KTOOutput",
    "PreferenceLoss",
    "PreferenceOutput",
    "ReferenceInputs",
    "RefinementInputs",
    "SrDPOLoss",
    "SrIPOLoss",
    "__version__",
    "linear_cross_entropy",
    "losses",
    "sequence_logps",
    "shard_head",
    "token_logps",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
