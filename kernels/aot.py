"""Ahead-of-time compilation of recorded launches for NVIDIA targets, without a GPU.

``compile_launch(record, arch)`` binds a ``LaunchRecord`` (``fastpref.kernels.launch``) exactly as Triton's JIT
binds a real launch — the same signature, constexprs and specialisation attributes (integer 1, divisibility by
16) — compiles it for ``sm_<arch>`` with Triton's bundled ptxas, and reads from the result:

- the cubin's resource usage (bundled ``cuobjdump``): registers per thread, spill (local) and stack bytes, shared
  memory;
- ptxas's own messages (``-v`` info and its warnings, e.g. C7515 "wgmma.mma_async instructions are serialized"):
  Triton runs ptxas with ``-v`` into a log it deletes, printing it only under ``TRITON_DUMP_PTXAS_LOG``; the log is
  captured that way and kept beside the cached binary (``<name>.ptxas.log``), so a cache hit still has it;
- the SASS (bundled ``nvdisasm``): the static instruction count of each loop body, found by its back-edge branch
  (``sass_loops``).

The compile tests (``tests/test_kernels_aot.py``, ``tests/test_fused_gemm_aot.py``) run it over every launch the
launchers produce.

It reaches into ``triton.runtime.jit`` (``create_function_from_signature`` and ``JITFunction._pack_args``,
stable from Triton 3.3 to 3.9 at least); a Triton without them raises ``RuntimeError`` naming what is missing.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
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
    ptxas_log: str = ""  # ptxas's -v output, warnings included
    # static SASS instructions per iteration of each loop, in address order, each without its nested loops
    sass_loops: tuple[int, ...] = ()

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.stack_bytes > 0

    @property
    def ptxas_warnings(self) -> list[str]:
        """ptxas's warnings and numbered advisories: ``ptxas warning : ...`` lines and info lines carrying a code,
        e.g. ``ptxas info : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized ...``
        (printed as info, not as a warning, so ``-Werror`` would not catch it)."""
        return [line.strip() for line in self.ptxas_log.splitlines()
                if "warning" in line.lower() or _ADVISORY.search(line)]

    @property
    def wgmma_serialized(self) -> bool:
        """ptxas serialised the warpgroup MMAs (C7515): each waits for the previous one, no MMA overlaps the
        loads and the prologue's math."""
        return any("C7515" in w or "wgmma.mma_async instructions are serialized" in w for w in self.ptxas_warnings)

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


_ADVISORY = re.compile(r"\(C\d{4}\)")


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
    compiled, log = _compile_with_log(source, target, options.__dict__)
    cubin = compiled.asm["cubin"]
    usage = resource_usage(cubin)
    return Compiled(name=jit_function(record.kernel).__name__, arch=arch, num_warps=options.num_warps,
                    registers=usage["REG"], local_bytes=usage["LOCAL"], stack_bytes=usage["STACK"],
                    shared_bytes=max(usage["SHARED"], int(compiled.metadata.shared)), ttir=compiled.asm["ttir"],
                    ptxas_log=log, sass_loops=loop_sizes(disassemble(cubin)))


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _compile_with_log(source: Any, target: Any, options: dict[str, Any]) -> tuple[Any, str]:
    """(the compiled kernel, ptxas's log). ptxas only runs on a cache miss; its log is then stored in the kernel's
    cache directory, and a hit without a stored log (a binary cached by something else) is compiled again."""
    import triton
    from triton.runtime.cache import get_cache_manager

    for force in ("0", "1"):
        out = io.StringIO()
        with _env(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE=force), contextlib.redirect_stdout(out):
            compiled = triton.compile(source, target=target, options=options)
        cache = get_cache_manager(compiled.hash)
        name = f"{compiled.name}.ptxas.log"
        log = "\n".join(line for line in out.getvalue().splitlines() if "ptxas" in line or line.startswith(" "))
        if "ptxas" in log:  # compiled now: keep the log for the next cache hit
            cache.put(log, name, binary=False)
            return compiled, log
        stored = cache.get_file(name)
        if stored is not None:
            with open(stored) as f:
                return compiled, f.read()
    raise RuntimeError("ptxas printed no log under TRITON_DUMP_PTXAS_LOG=1")


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"Triton's bundled {name} is missing at {path}")
    return path


def disassemble(cubin: bytes) -> str:
    """The cubin's SASS, as Triton's bundled ``nvdisasm`` prints it (``/*addr*/ INSTR ;`` lines and labels)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout


_INSTR = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"^(?:@!?U?P\w+\s+)?BRA\b.*`\((\.L_x_\d+)\)")


def loop_sizes(sass: str) -> tuple[int, ...]:
    """Static instruction count of each loop body in ``sass`` (``nvdisasm`` output), in address order.

    A loop is a backward branch (``BRA`` to a label at or before it): its body runs from the label to the branch,
    both sides of any branch inside it counted. Several back edges to one label make one loop (the last one
    bounds it); each loop's count leaves out the loops nested in it, so an outer loop's count is its own work per
    iteration (the fold's epilogue around its K loop). The trap loop ending a kernel (a branch to itself) is no
    loop."""
    labels: dict[str, int] = {}
    pending: list[str] = []
    ends: dict[int, int] = {}  # loop head index -> index of its last back edge
    count = 0
    branches: list[tuple[int, str]] = []
    for line in sass.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            pending.append(label.group(1))
            continue
        instr = _INSTR.match(line)
        if instr is None:
            continue
        for name in pending:
            labels[name] = count
        pending.clear()
        branch = _BRANCH.match(instr.group(1))
        if branch:
            branches.append((count, branch.group(1)))
        count += 1
    for at, name in branches:
        head = labels.get(name)
        if head is not None and head < at:
            ends[head] = max(ends.get(head, at), at)
    loops = sorted(ends.items())
    sizes = []
    for head, end in loops:
        inner = [(h, e) for h, e in loops if head < h and e <= end]
        # only the outermost of the loops nested inside count against this one
        direct = [(h, e) for h, e in inner if not any(h2 < h and e <= e2 for h2, e2 in inner)]
        sizes.append(end - head + 1 - sum(e - h + 1 for h, e in direct))
    return tuple(sizes)


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


__all__ = ["Compiled", "compile_launch", "disassemble", "loop_sizes", "resource_usage"]
