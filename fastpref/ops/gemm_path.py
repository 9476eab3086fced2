"""Which GEMMs a pass over the head runs: cuBLAS tiles with the Triton row kernels over them (``"cublas"``), or
the Triton GEMMs of ``fastpref.kernels.fused_gemm`` with the fold in the forward's epilogue and the gradient in
the backward's prologue (``"fused"``: fewer passes over the logits, but Triton's GEMMs against cuBLAS's).

The default is ``"cublas"``, the proven path: no GPU run has yet measured the fused kernels, and the cost model
predicts them slower at the benchmark shapes (``bench/NOTES.md``). ``"fused"`` and ``"auto"`` are opt-in, by
the ``gemm=`` argument or, where the argument is left at None, by ``$FASTPREF_GEMM`` (``auto``, ``fused`` or
``cublas``); an argument always wins over the variable.

``gemm="auto"`` picks per (device, dtype, H, vocabulary bucket), once, by timing both paths on that device at
those sizes — the first pass pays the fused kernels' compile (seconds, cached on disk by Triton afterwards), a
few milliseconds of timing and ~0.6 GB of transient buffers at H = 4096 — and keeps the faster. Off CUDA (the
interpreter, the PyTorch backend) auto means cublas: there is nothing to time there; ``gemm="fused"`` forces the
fused kernels (the tests do, under ``TRITON_INTERPRET=1``). A fused kernel that does not compile or runs out of
resources on the device falls back to cublas with a warning, never an error: the key is marked unusable, the
pass reruns on cublas, and ``fallbacks()`` reports the key and the reason.

Each path implements one protocol, ``GemmPath``, as ``tile_ops.RowOps`` does for the row work: fold a row block x
vocabulary slabs into ``RowStats`` (keeping the raw logits where asked), form the logits gradient, and the
gradient GEMMs w.r.t. the input and w.r.t. the weight and bias; ``combine`` / ``reduce_grad_input`` complete a row
set's statistics and dH over the whole vocabulary (nothing to do on one device; a vocabulary-sharded head's one
collective). The chunk loops of ``head_pass`` and ``fast_pair_loss`` call the protocol only: ``run`` picks the
implementation once per pass (``implementation``: the one switch) and holds the one fallback.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar

import torch

from .plan import TilePlan
from .tile_ops import LogitTransform, LogSumExp, RowGrad, RowOps, RowStats, row_ops

GEMM_PATHS = ("auto", "fused", "cublas")
GEMM_ENV = "FASTPREF_GEMM"
DEFAULT_GEMM = "cublas"  # until a GPU run has measured the fused kernels

Key = tuple[str, int | None, torch.dtype, int, int]
_UNUSABLE: dict[Key, str] = {}
_CHOICE: dict[Key, str] = {}
T = TypeVar("T")


def check_gemm(gemm: str | None, name: str = "gemm") -> str | None:
    """Validate a ``gemm=`` argument (``name``: what the caller calls it): None (the default) or one of
    ``GEMM_PATHS``."""
    if gemm is not None and gemm not in GEMM_PATHS:
        raise ValueError(f"{name}: expected one of {list(GEMM_PATHS)} or None (${GEMM_ENV}, else "
                         f"{DEFAULT_GEMM!r}), got {gemm!r}")
    return gemm


def requested(gemm: str | None) -> str:
    """The requested path: the argument; None: ``$FASTPREF_GEMM``, else ``DEFAULT_GEMM``."""
    value = check_gemm(gemm)
    if value is None:
        value = os.environ.get(GEMM_ENV) or DEFAULT_GEMM
        if value not in GEMM_PATHS:
            raise ValueError(f"{GEMM_ENV}: expected one of {list(GEMM_PATHS)}, got {value!r}")
    return value


def vocab_bucket(vocab: int) -> int:
    """Vocabulary sizes that time alike share a choice: rounded up to a power of two."""
    return 1 << max(vocab - 1, 0).bit_length()


def key_of(device: torch.device, dtype: torch.dtype, hidden: int, vocab: int) -> Key:
    return (device.type, device.index, dtype, hidden, vocab_bucket(vocab))


def resolve(gemm: str | None, backend: str, device: torch.device, dtype: torch.dtype, hidden: int,
            vocab: int) -> str:
    """``"fused"`` or ``"cublas"`` for a pass (see the module docstring)."""
    want = requested(gemm)
    if backend != "triton" or want == "cublas" or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return "cublas"
    key = key_of(device, dtype, hidden, vocab)
    if key in _UNUSABLE:
        return "cublas"
    if want == "fused":
        return "fused"
    if device.type != "cuda":
        return "cublas"
    if key not in _CHOICE:
        _CHOICE[key] = time_paths(device, dtype, hidden, vocab)
    return _CHOICE[key] if key not in _UNUSABLE else "cublas"


def usable(key: Key) -> bool:
    return key not in _UNUSABLE


@functools.cache
def fused_errors() -> tuple[type[BaseException], ...]:
    """What a fused kernel raises when it cannot run on a device (not a wrong result: those are bugs)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    return (OutOfResources, PTXASError, CompilationError)


def fallbacks() -> dict[Key, str]:
    """The keys ``(device type, index, compute dtype, H, vocabulary bucket)`` whose passes fell back from the fused
    kernels to cublas in this process, with the reason (``"OutOfResources: ..."``): a pass that asked for
    ``gemm="fused"`` (or whose auto choice was fused) ran on cublas exactly when its key is here."""
    return dict(_UNUSABLE)


def mark_unusable(key: Key, error: BaseException) -> None:
    """Remember that the fused kernels failed for ``key`` and say so once."""
    if key not in _UNUSABLE:
        _UNUSABLE[key] = f"{type(error).__name__}: {str(error)[:200]}"
        warnings.warn(f"fastpref: the fused GEMM kernels cannot run for {key} ({_UNUSABLE[key]}); falling back to "
                      "the cuBLAS + row-kernel path for these shapes", RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------------------------
# The GEMMs on cuBLAS, and the operand layouts the fused kernels read
# ---------------------------------------------------------------------------------------------------------------


def kernel_operand(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` with unit stride along its last dimension (what the fused GEMMs load), copied only when it is not
    (a transposed weight, an expanded bias)."""
    if t is None or (t.stride(-1) == 1 and (t.dim() > 1 or t.is_contiguous())):
        return t
    return t.contiguous()


def unit_columns(t: torch.Tensor) -> bool:
    """Whether the fused GEMMs can read or write the matrix ``t`` as it is (unit stride along its rows)."""
    return t.shape[-1] <= 1 or t.stride(-1) == 1


def grad_buffer(like: torch.Tensor, dtype: torch.dtype, *, device: torch.device | None = None,
                unit_cols: bool = False) -> torch.Tensor:
    """An uninitialised gradient for ``like`` in the layout autograd gives it (``empty_like``'s: ``like``'s strides
    when it is dense, as for a ``.t()`` view of a stored [H, V] head, else contiguous) and ``dtype``; contiguous
    instead when the writer needs unit column stride (``unit_cols``: the fused GEMMs) and that layout lacks it —
    ``head_pass.in_layout`` then copies it back once. ``device``: default ``like``'s (which may be a meta tensor)."""
    device = like.device if device is None else device
    out = torch.empty_like(like, dtype=dtype, device=device)
    return out if not unit_cols or unit_columns(out) else torch.empty(like.shape, device=device, dtype=dtype)


def project(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``out = h @ w.T (+ b)`` with one rounding to out's dtype (cuBLAS epilogue adds the bias)."""
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def probe_fp32_out_matmul(device: torch.device, addmm: Callable[..., torch.Tensor] = torch.addmm) -> bool:
    """Whether ``addmm(acc, a, b, beta=0 | 1, out_dtype=torch.float32, out=acc)`` accumulates bf16 products into
    an fp32 ``acc`` correctly on ``device``: tried once on 16 x 16 tensors. The op exists only for CUDA, from
    some torch 2.x on, and no release range of it was verified on a GPU here, so it is probed rather than
    assumed from the version; on any failure the caller upcasts instead (with a warning). The check of the
    values syncs once, on the first call per device."""
    try:
        a = torch.ones((16, 16), device=device, dtype=torch.bfloat16)
        acc = torch.full((16, 16), float("nan"), device=device, dtype=torch.float32)
        addmm(acc, a, a, beta=0, out_dtype=torch.float32, out=acc)  # beta=0 must ignore the NaN
        addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        ok = bool(torch.all(acc == 32.0))
    except (TypeError, RuntimeError, NotImplementedError) as e:
        warnings.warn(f"fastpref: torch.addmm(..., out_dtype=torch.float32) is not usable on {device} with torch "
                      f"{torch.__version__} ({type(e).__name__}: {str(e)[:120]}); gradients accumulate through fp32 "
                      "copies of the operands instead (slower, same values)", RuntimeWarning, stacklevel=2)
        return False
    if not ok:
        warnings.warn(f"fastpref: torch.addmm(..., out_dtype=torch.float32) gave wrong values on {device}; "
                      "gradients accumulate through fp32 copies of the operands instead", RuntimeWarning,
                      stacklevel=2)
    return ok


@functools.cache
def _fp32_out_matmul(device_type: str, index: int | None) -> bool:
    return device_type == "cuda" and probe_fp32_out_matmul(torch.device(device_type, index))


def fp32_out_matmul(device: torch.device) -> bool:
    """Whether this device takes the fp32-output matmul path of ``accumulate_mm`` (CUDA, probed once)."""
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return _fp32_out_matmul(device.type, index)


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, first: bool) -> None:
    """``acc (+)= a @ b`` with fp32 accumulation inside the matmul and in ``acc`` (fp32), without rounding
    ``a @ b`` to the inputs' dtype first where the device allows it (``fp32_out_matmul``). ``first``: ``acc``
    is overwritten (its content is never read, so it may be uninitialised). A column-major ``acc`` (the
    gradient of a transposed head keeps its layout) is written as ``acc.T (+)= b.T @ a.T``: row-major for the
    matmul, no copy."""
    if not unit_columns(acc) and acc.stride(0) == 1:
        return accumulate_mm(acc.t(), b.t(), a.t(), first=first)
    if acc.dtype == a.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
        return
    if acc.dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16) and fp32_out_matmul(acc.device):
        torch.addmm(acc, a, b, beta=0 if first else 1, out_dtype=torch.float32, out=acc)
        return
    prod = torch.mm(a.to(acc.dtype), b.to(acc.dtype))
    if first:
        acc.copy_(prod)
    else:
        acc.add_(prod)


# ---------------------------------------------------------------------------------------------------------------
# The protocol and its two implementations
# ---------------------------------------------------------------------------------------------------------------

Slabs = list[tuple[int, int]]


class GemmPath(Protocol):
    """The GEMMs of one pass over the head, on one path. ``weight`` [V, H] / ``bias`` [V] are this head's (cast slab
    by slab to the compute dtype inside), ``vocab_start`` / ``slabs`` count its rows, ``targets`` are global ids.

    The gradient of a row block: ``grad_`` turns kept raw logits into what the gradient GEMMs read (returns
    whether it rewrote the tile), then ``grad_input`` / ``grad_weight``. The bias gradient is added exactly once
    per row block, by ``grad_`` or by ``grad_weight`` (pass ``d_bias`` to both); a path whose ``bias_with_weight``
    forms it with dW only runs where dW is wanted too (``implementation``)."""

    name: ClassVar[str]
    bias_with_weight: ClassVar[bool]

    def fold_plan(self, tiles: TilePlan, n_rows: int, weight: torch.Tensor) -> TilePlan:
        """Row block and slab width of a forward-only pass (``tiles``: the bounded logits tile's plan)."""
        ...

    def buffer(self, rows: int, cols: int, device: torch.device, *, keep: bool) -> torch.Tensor | None:
        """A [rows, cols] logits buffer in the compute dtype: where ``fold`` keeps the logits (``keep``) or, on a
        path that needs one, its GEMM output; None when the path needs none."""
        ...

    def operand(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A weight or bias slab as this path's gradient GEMMs read it."""
        ...

    def fold(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
             stats: RowStats, *, tile: torch.Tensor | None, slabs: Slabs, fold_cols: int) -> None:
        """Fold ``T(h @ W[v0:v1].T + b)`` of each slab into ``stats``; ``tile`` (from ``buffer``) covers the slabs'
        columns; ``fold_cols``: column chunk of a row fold over a tile."""
        ...

    def combine(self, stats: RowStats) -> None:
        """Complete statistics folded over this head's whole vocabulary (a sharded head: across the shards)."""
        ...

    def grad_(self, tile: torch.Tensor, grad: RowGrad, *, vocab_start: int = 0, d_bias: torch.Tensor | None = None,
              cols: int | None = None) -> bool:
        """Turn a row block's kept raw logits into what the gradient GEMMs read (G in place and the bias gradient,
        on a path that forms them so); returns whether the tile now holds G. ``cols``: column chunk of a row op."""
        ...

    def grad_input(self, tile: torch.Tensor, grad: RowGrad, weight: torch.Tensor, out: torch.Tensor, *,
                   vocab_start: int = 0, accumulate: bool) -> None:
        """``out (+)= G @ weight`` (``weight``: from ``operand``)."""
        ...

    def reduce_grad_input(self, out: torch.Tensor) -> None:
        """Complete dH rows summed over this head's whole vocabulary (a sharded head: across the shards)."""
        ...

    def grad_weight(self, tile: torch.Tensor, grad: RowGrad, rows: torch.Tensor, out: torch.Tensor,
                    d_bias: torch.Tensor | None, *, vocab_start: int = 0, accumulate: bool,
                    scale: torch.Tensor | None = None, formed: bool = True) -> None:
        """``out (+)= G.T @ rows`` (and the bias gradient, see the class docstring); ``scale``: G times an
        upstream scale; ``formed``: what ``grad_`` of the path that kept the tile returned."""
        ...

    def out_dtype(self, want: torch.dtype) -> torch.dtype:
        """The dtype the gradient GEMMs write for a gradient wanted in ``want`` (else fp32, converted after)."""
        ...

    def can_write(self, t: torch.Tensor) -> bool:
        """Whether the gradient GEMMs write into ``t`` as it is (dtype and layout)."""
        ...

    def grad_input_dtype(self, want: torch.dtype) -> torch.dtype:
        """The dtype ``grad_input`` accumulates dH rows in for a dH wanted in ``want`` (else fp32, converted after
        ``reduce_grad_input``): ``out_dtype``, or fp32 where the rows are still to be summed across devices."""
        ...

    def grad_buffer(self, like: torch.Tensor, dtype: torch.dtype, *,
                    device: torch.device | None = None) -> torch.Tensor:
        """``grad_buffer`` in a layout the gradient GEMMs write."""
        ...


@dataclass(frozen=True)
class _OneDevice:
    """What both single-device paths share: the pass's transform, compute dtype and row-op backend."""

    transform: LogitTransform
    compute_dtype: torch.dtype
    backend: str  # resolved: "triton" | "torch"

    def _cast(self, t: torch.Tensor | None, v0: int, v1: int) -> torch.Tensor | None:
        return None if t is None else t[v0:v1].to(self.compute_dtype)

    def combine(self, stats: RowStats) -> None:
        pass

    def reduce_grad_input(self, out: torch.Tensor) -> None:
        pass

    def grad_input_dtype(self, want: torch.dtype) -> torch.dtype:
        return self.out_dtype(want)  # type: ignore[attr-defined]  # each path defines out_dtype


@dataclass(frozen=True)
class CublasPath(_OneDevice):
    """cuBLAS GEMMs into bounded tiles, with the row ops of ``tile_ops`` over each tile: the fold reads a tile the
    GEMM wrote, ``grad_`` rewrites it in place into G, which both gradient GEMMs then read."""

    name: ClassVar[str] = "cublas"
    bias_with_weight: ClassVar[bool] = False

    @property
    def rows(self) -> RowOps:
        return row_ops(self.backend)

    def fold_plan(self, tiles: TilePlan, n_rows: int, weight: torch.Tensor) -> TilePlan:
        return tiles

    def buffer(self, rows: int, cols: int, device: torch.device, *, keep: bool) -> torch.Tensor:
        return torch.empty((rows, cols), device=device, dtype=self.compute_dtype)

    def operand(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return t

    def fold(self, h, weight, bias, targets, stats, *, tile, slabs, fold_cols) -> None:
        base = slabs[0][0] if slabs else 0
        width = slabs[-1][1] - base if slabs else 0
        for v0, v1 in slabs:  # every slab's GEMM first, then the row folds over the tile
            project(tile[:, v0 - base : v1 - base], h, self._cast(weight, v0, v1), self._cast(bias, v0, v1))
        step = max(fold_cols, 1)
        for c0 in range(0, width, step):
            self.rows.fold(tile[:, c0 : c0 + step], targets, stats, base + c0, self.transform)

    def grad_(self, tile, grad, *, vocab_start=0, d_bias=None, cols=None) -> bool:
        step = max(tile.shape[1] if cols is None else cols, 1)
        for c0 in range(0, tile.shape[1], step):
            self.rows.grad_(tile[:, c0 : c0 + step], grad.targets, grad.lse, grad.grad_rows, vocab_start + c0,
                            self.transform, grad.entropy)
        if d_bias is not None:
            d_bias.add_(tile.sum(0, dtype=torch.float32))
        return True

    def grad_input(self, tile, grad, weight, out, *, vocab_start=0, accumulate) -> None:
        accumulate_mm(out, tile, weight, first=not accumulate)

    def grad_weight(self, tile, grad, rows, out, d_bias, *, vocab_start=0, accumulate, scale=None,
                    formed=True) -> None:
        if not formed:  # raw logits kept by another path: form G (and the bias gradient) with the scale in it
            self.grad_(tile, grad if scale is None else grad.scaled(scale), vocab_start=vocab_start, d_bias=d_bias)
        elif scale is not None:
            rows = rows * scale  # the scale in the small [t, H] operand: fp32 math, one rounding to h's dtype
        accumulate_mm(out, tile.t(), rows, first=not accumulate)

    def out_dtype(self, want: torch.dtype) -> torch.dtype:
        return want

    def can_write(self, t: torch.Tensor) -> bool:
        return True

    def grad_buffer(self, like, dtype, *, device=None) -> torch.Tensor:
        return grad_buffer(like, dtype, device=device)


@dataclass(frozen=True)
class FusedPath(_OneDevice):
    """The Triton GEMMs of ``fastpref.kernels.fused_gemm``: the fold in ``linear_fold``'s epilogue (the logits stored
    only where kept), G formed in the gradient GEMMs' prologue from the kept raw logits (``grad_`` does nothing)."""

    name: ClassVar[str] = "fused"
    bias_with_weight: ClassVar[bool] = True  # linear_grad_weight forms the bias gradient beside dW

    def fold_plan(self, tiles: TilePlan, n_rows: int, weight: torch.Tensor) -> TilePlan:
        # every row at once (no tile to bound); the whole vocabulary when the weight is already in the compute
        # dtype (one launch), else slabs of the tile plan's width, each cast on its own
        vocab = weight.shape[0]
        return TilePlan(rows=n_rows, cols=vocab if weight.dtype == self.compute_dtype else tiles.cols)

    def buffer(self, rows: int, cols: int, device: torch.device, *, keep: bool) -> torch.Tensor | None:
        from ..kernels import fused_gemm

        # rows aligned for the prologue GEMMs; nothing when the logits are not kept
        return fused_gemm.logits_buffer(rows, cols, self.compute_dtype, device) if keep else None

    def operand(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return kernel_operand(t)

    def fold(self, h, weight, bias, targets, stats, *, tile, slabs, fold_cols) -> None:
        from ..kernels import fused_gemm

        base = slabs[0][0] if slabs else 0
        for v0, v1 in slabs:
            fused_gemm.linear_fold(h, kernel_operand(self._cast(weight, v0, v1)),
                                   kernel_operand(self._cast(bias, v0, v1)), targets, *stats, vocab_start=v0,
                                   logits_out=None if tile is None else tile[:, v0 - base : v1 - base],
                                   **self.transform.kwargs())

    def grad_(self, tile, grad, *, vocab_start=0, d_bias=None, cols=None) -> bool:
        return False

    @staticmethod
    def _check(grad: RowGrad) -> None:
        # the prologues form c·(onehot - p) only: an entropy term must never be dropped silently
        if grad.entropy is not None:
            raise ValueError("grad.entropy: the fused GEMM path forms no entropy gradient; a pass that needs one "
                             "runs on cublas (gemm_path.implementation(..., entropy_grad=True))")

    def grad_input(self, tile, grad, weight, out, *, vocab_start=0, accumulate) -> None:
        from ..kernels import fused_gemm

        self._check(grad)
        fused_gemm.linear_grad_input(tile, grad.targets, *grad.lse, grad.grad_rows, weight, out,
                                     vocab_start=vocab_start, accumulate=accumulate, **self.transform.kwargs())

    def grad_weight(self, tile, grad, rows, out, d_bias, *, vocab_start=0, accumulate, scale=None,
                    formed=True) -> None:
        from ..kernels import fused_gemm

        self._check(grad)
        grad = grad if scale is None else grad.scaled(scale)  # the scale in the per-row factor c
        fused_gemm.linear_grad_weight(tile, grad.targets, *grad.lse, grad.grad_rows, rows, out, d_bias,
                                      vocab_start=vocab_start, accumulate=accumulate, **self.transform.kwargs())

    def out_dtype(self, want: torch.dtype) -> torch.dtype:
        return want if want in (torch.float32, self.compute_dtype) else torch.float32

    def can_write(self, t: torch.Tensor) -> bool:
        return t.dtype == self.out_dtype(t.dtype) and unit_columns(t)

    def grad_buffer(self, like, dtype, *, device=None) -> torch.Tensor:
        return grad_buffer(like, dtype, device=device, unit_cols=True)


# ---------------------------------------------------------------------------------------------------------------
# The switch and the fallback
# ---------------------------------------------------------------------------------------------------------------


class PassParams(Protocol):
    """What the switch reads of a pass (``head_pass.HeadPass``)."""

    transform: LogitTransform
    compute_dtype: torch.dtype
    backend: str
    gemm: str
    gemm_key: Key | None
    tile_bytes: int
    shard: Shard | None  # the head is a vocabulary shard (``vocab_shard.VocabShard``); None: the whole head


class Shard(Protocol):
    """A vocabulary-sharded head as the switch sees it (``fastpref.ops.vocab_shard.VocabShard``)."""

    def path(self, inner: GemmPath, tile_bytes: int) -> GemmPath:
        """``inner`` with the shard's collectives in ``combine`` / ``reduce_grad_input``."""
        ...


def implementation(cfg: PassParams, *, bias_without_weight: bool = False, entropy_grad: bool = False) -> GemmPath:
    """The path a pass runs: the fused GEMMs where ``cfg.gemm`` resolved to them, they have not failed for its key,
    and they can form what the pass needs (the bias gradient comes with dW there; no entropy gradient: the
    prologues form ``c·(onehot - p)`` only); else cublas. On a vocabulary shard, that path wrapped with the
    shard's collectives (``vocab_shard.ShardedPath``)."""
    fused = (cfg.gemm == "fused" and usable(cfg.gemm_key) and not bias_without_weight  # FusedPath.bias_with_weight
             and not entropy_grad)
    path = (FusedPath if fused else CublasPath)(cfg.transform, cfg.compute_dtype, cfg.backend)
    return path if cfg.shard is None else cfg.shard.path(path, cfg.tile_bytes)


def run(cfg: PassParams, pass_fn: Callable[[GemmPath], T], *, bias_without_weight: bool = False,
        entropy_grad: bool = False) -> T:
    """``pass_fn(path)`` on the pass's path; if a fused kernel cannot run on the device, the key is marked unusable
    (a ``RuntimeWarning``, ``fallbacks()``) and the whole pass reruns on cublas. ``pass_fn`` must start afresh
    (its own buffers and statistics): the failed attempt may have left its outputs half written. ``entropy_grad``:
    the pass forms an entropy gradient (cublas only)."""
    path = implementation(cfg, bias_without_weight=bias_without_weight, entropy_grad=entropy_grad)
    if path.name == CublasPath.name:
        return pass_fn(path)
    try:
        return pass_fn(path)
    except fused_errors() as e:
        mark_unusable(cfg.gemm_key, e)
        return pass_fn(implementation(cfg))


def elapsed_ms(fn: Callable[[], None], device: torch.device) -> float:
    """Wall time of one call: CUDA events on a CUDA device, the host clock elsewhere (the interpreter tests)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_paths(device: torch.device, dtype: torch.dtype, hidden: int, vocab: int, *, rows: int = 4096,
               max_cols: int = 32768, repeats: int = 5) -> str:
    """Time one forward fold and one backward's gradient GEMMs of each path at (``rows``, this H, up to
    ``max_cols`` vocabulary columns) on ``device``; the faster path wins (ties: cublas). A fused kernel that
    cannot run marks the key unusable."""
    from ..kernels import fused_gemm
    from ..kernels.launch import device_guard

    cols = min(vocab, max_cols)
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(rows, hidden, device=device, generator=gen).to(dtype)
    w = (torch.randn(cols, hidden, device=device, generator=gen) / hidden**0.5).to(dtype)
    targets = torch.randint(0, cols, (rows,), device=device, generator=gen)
    zeros = torch.zeros(rows, device=device)  # the row max and log-sum-exp: any values time alike
    grad = RowGrad(targets, LogSumExp(zeros, zeros), torch.full((rows,), 1e-3, device=device))
    tile = fused_gemm.logits_buffer(rows, cols, dtype, device)
    dh = torch.empty(rows, hidden, device=device, dtype=torch.float32)
    dw = torch.empty(cols, hidden, device=device, dtype=dtype)

    def step(path: GemmPath) -> Callable[[], None]:
        def once() -> None:
            path.fold(h, w, None, targets, RowStats.empty(rows, device), tile=tile, slabs=[(0, cols)], fold_cols=cols)
            formed = path.grad_(tile, grad)
            path.grad_input(tile, grad, w, dh, accumulate=False)
            path.grad_weight(tile, grad, h, dw, None, accumulate=False, formed=formed)

        return once

    def median_ms(fn: Callable[[], None]) -> float:
        fn()  # compile / heuristics
        return statistics.median(elapsed_ms(fn, device) for _ in range(repeats))

    transform = LogitTransform()
    with device_guard(device):
        try:
            fused_ms = median_ms(step(FusedPath(transform, dtype, "triton")))
        except fused_errors() as e:
            mark_unusable(key_of(device, dtype, hidden, vocab), e)
            return "cublas"
        return "fused" if fused_ms < median_ms(step(CublasPath(transform, dtype, "triton"))) else "cublas"


__all__ = ["DEFAULT_GEMM", "GEMM_ENV", "GEMM_PATHS", "CublasPath", "FusedPath", "GemmPath", "accumulate_mm",
           "check_gemm", "elapsed_ms", "fallbacks", "fused_errors", "grad_buffer", "implementation", "kernel_operand",
           "key_of", "mark_unusable", "project", "requested", "resolve", "run", "time_paths", "unit_columns", "usable",
           "vocab_bucket"]
