"""Test scaffolding, the layer above the package it tests (the benchmark included; nothing below imports it):
tensor builders and error measures (``tensors``; ``rel_err`` lives in ``fastpref.utils.numerics``), a tiny offline
Hugging Face model, tokenizer and preference data (``toy``, imported lazily: it needs transformers), the SASS
table and the kernel launches at the benchmark's shapes (``launch_sites``)."""

from __future__ import annotations

import importlib
from typing import Any

from .tensors import assert_within_torch_error, make_labels, mismatch, rel_err

_TOY = ("toy_llama", "toy_preference_records", "toy_tokenizer")

__all__ = ["assert_within_torch_error", "make_labels", "mismatch", "rel_err", *_TOY]


def __getattr__(name: str) -> Any:
    if name in _TOY or name == "toy":
        toy = importlib.import_module(f"{__name__}.toy")
        return toy if name == "toy" else getattr(toy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
