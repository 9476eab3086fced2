"""A graph break for torch.compile around fastpref's ops, without importing torch._dynamo at ``import fastpref``
(it costs about a second): the ops do a host sync and data-dependent chunking, so compiled code calls them eagerly."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def eager_op(fn: F) -> F:
    """``torch.compiler.disable(fn)``, applied at the first call rather than at import."""
    disabled: list[Callable] = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not disabled:
            import torch

            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return wrapper  # type: ignore[return-value]
