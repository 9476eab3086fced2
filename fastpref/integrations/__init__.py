"""Hugging Face and TRL integrations (imported lazily: nothing heavy happens at ``import fastpref``).

- ``fastpref.integrations.fused_head``: ``add_fused_lm_head``, the fused head inside a causal LM's forward.
- ``fastpref.integrations.hf``: ``FastPrefTrainer``, ``FastPrefTrainingArguments``, ``PreferenceCollator``
  (needs the ``hf`` extra: transformers, accelerate, peft).
- ``fastpref.integrations.trl``: ``FastPrefDPOConfig``, ``FastPrefDPOTrainer`` (needs the ``trl`` extra).
- ``fastpref.integrations.trl_kto``: ``FastPrefKTOConfig``, ``FastPrefKTOTrainer`` (needs the ``trl`` extra).
- ``fastpref.integrations.trl_head``: TRL 1.16's fused-head contract (``add_fused_lm_head``) through fastpref.
- ``fastpref.integrations.trl_trainers``: ``FastPrefSFTConfig`` / ``FastPrefGRPOConfig`` / ``FastPrefRLOOConfig``
  and their trainers: TRL's, with ``use_fastpref`` swapping in fastpref's head (needs the ``trl`` extra).
- ``fastpref.integrations.trainer_common``: what both trainers share.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("collator", "fused_head", "hf", "trainer_common", "trl", "trl_head", "trl_kto", "trl_trainers")

__all__ = list(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
