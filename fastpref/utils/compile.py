"""A graph break for torch.compile around fastpref's ops, without importing torch._dynamo outside of a compile
(the import costs 2-3 s of a first call on a 2-core CPU): the ops do a host sync and data-dependent chunking, so
compiled code calls them eagerly."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def eager_op(fn: F) -> F:
    """``torch.compiler.disable(fn)`` under a compile; a plain call of ``fn`` outside of one (Dynamo traces
    ``is_compiling()`` as True, so a compiled caller always reaches the disabled function)."""
    disabled: list[Callable] = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return wrapper  # type: ignore[return-value]
