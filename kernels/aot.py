"""Ahead-of-time compilation of recorded launches for NVIDIA targets, without a GPU.

``compile_launch(record, arch)`` binds a ``LaunchRecord`` (``fastpref.kernels.launch``) exactly as Triton's JIT
binds a real launch — the same signature, constexprs and specialisation attributes (integer 1, divisibility by
16) — compiles it for ``sm_<arch>`` with Triton's bundled ptxas, and reads the cubin's resource usage with the
bundled ``cuobjdump``: registers per thread, spill (local) and stack bytes, shared memory. The compile test
(``tests/test_kernels_aot.py``) runs it over every launch the launchers produce at the benchmark shapes.

It reaches into ``triton.runtime.jit`` (``create_function_from_signature`` and ``JITFunction._pack_args``,
stable from Triton 3.3 to 3.9 at least); a Triton without them raises ``RuntimeError`` naming what is missing.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

from .launch import LaunchRecord, TensorArg, jit_function


@dataclass(frozen=True)
class Compiled:
    """What ptxas made of one specialisation for one target."""

    name: str
    arch: int
    num_warps: int
    registers: int  # per thread
    local_bytes: int  # spills (and other local memory) per thread
    stack_bytes: int
    shared_bytes: int  # static + Triton's dynamic shared memory
    ttir: str = ""  # the Triton IR, for structural checks

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.stack_bytes > 0

    @property
    def reductions_in_loops(self) -> int:
        """How many ``tt.reduce`` ops sit inside an ``scf.for`` body (by the printed IR's indentation)."""
        count, loop_indents = 0, []
        for line in self.ttir.splitlines():
            indent = len(line) - len(line.lstrip())
            body = line.strip()
            while loop_indents and indent <= loop_indents[-1] and body.startswith("}"):
                loop_indents.pop()
                break
            if "scf.for" in body:
                loop_indents.append(indent)
            elif loop_indents and '"tt.reduce"' in body:
                count += 1
        return count

    @property
    def no_reduce_in_loop(self) -> bool:
        return self.reductions_in_loops == 0


def _bind(record: LaunchRecord) -> tuple[Any, dict[str, Any], tuple[Any, ...]]:
    """(jit function, keyword arguments, positional arguments with stand-in tensors)."""
    args = tuple(a.stand_in() if isinstance(a, TensorArg) else a for a in record.args)
    return jit_function(record.kernel), dict(record.kwargs), args


def compile_launch(record: LaunchRecord, arch: int) -> Compiled:
    """Compile ``record`` for ``sm_<arch>`` (80, 90, ...) and report its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    try:
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:  # pragma: no cover - depends on the installed Triton
        raise RuntimeError(f"this Triton ({triton.__version__}) has no create_function_from_signature") from e
    fn, kwargs, args = _bind(record)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    source = ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(source, target=target, options=options.__dict__)
    usage = resource_usage(compiled.asm["cubin"])
    return Compiled(name=jit_function(record.kernel).__name__, arch=arch, num_warps=options.num_warps,
                    registers=usage["REG"], local_bytes=usage["LOCAL"], stack_bytes=usage["STACK"],
                    shared_bytes=max(usage["SHARED"], int(compiled.metadata.shared)), ttir=compiled.asm["ttir"])


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"Triton's bundled {name} is missing at {path}")
    return path


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``REG``, ``STACK``, ``SHARED``, ``LOCAL`` of the (single) function in a cubin, from ``cuobjdump``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), (int(g) for g in match.groups())))


__all__ = ["Compiled", "compile_launch", "resource_usage"]
