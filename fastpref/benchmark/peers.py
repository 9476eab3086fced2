"""The implementations compared side by side: fastpref's fast and lean modes, the materialised reference
(``fastpref.reference``), TRL 1.16's ``ChunkedLogProbFunction``, Liger-Kernel 0.8.5's ``LigerFusedLinearDPOLoss``
and Cut-Cross-Entropy 25.1.1. Peers are imported lazily (``Impl.skip_reason``) and skipped with a note when
they are not installed."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .. import losses
from .workload import BETA, IGNORE_INDEX, Workload


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float = BETA) -> torch.Tensor:
    """TRL's sigmoid DPO loss (``fastpref.losses.sigmoid``, ε = 0), mean over pairs: the loss every peer and the
    reference share here."""
    return losses.sigmoid(chosen, rejected, ref_chosen, ref_rejected, beta=beta)[0].mean()



@dataclass
class StepOutput:
    """What one implementation's step returns: a differentiable scalar loss and the policy's log-probs as its task
    checks them (DPO: chosen then rejected sequence sums [2P]; GRPO: per token; None: the row exposes none)."""

    loss: torch.Tensor
    logps: torch.Tensor | None


class Impl:
    """One implementation of the workload. ``step`` is the grad-enabled forward of the DPO step (the harness
    calls ``loss.backward()``); ``logps`` the no-grad policy sequence log-prob sums [2P] (None: no such path)."""

    name = "impl"
    label = ""  # version / variant, for the table
    has_logps = True

    def skip_reason(self, device: torch.device) -> str | None:
        return None

    def step(self, w: Workload) -> StepOutput:
        raise NotImplementedError

    def logps(self, w: Workload) -> torch.Tensor:
        raise NotImplementedError

    def step_flops(self, w: Workload) -> int:
        """Matmul FLOPs of the step as this implementation runs it (its own algorithm, not the floor)."""
        raise NotImplementedError

    def logps_flops(self, w: Workload) -> int:
        return 2 * w.n_scored * w.shape.hidden * w.shape.vocab

    def fallback(self, w: Workload) -> str | None:
        """Why this implementation did not run as its row names it (a mark for the row), or None."""
        return None


def flops_unit(w: Workload, rows: int | None = None) -> int:
    """n·H·V for the workload's scored tokens (or for ``rows`` rows): a forward GEMM is 2 units."""
    return (w.n_scored if rows is None else rows) * w.shape.hidden * w.shape.vocab


class FastprefImpl(Impl):
    """fastpref's ``DPOLoss`` in ``mode`` (``"fast"``, ``"lean"``, ``"auto"``) on GEMM path ``gemm`` (None: the
    default users get, ``$FASTPREF_GEMM`` else cublas; ``"cublas"`` / ``"fused"`` forced, for the side-by-side
    rows). ``groups``: fast mode with a memory budget that splits the workload into at least that many pair
    groups (the float64 check of dW summed over groups, at the real H and V)."""

    def __init__(self, mode: str, backend: str = "auto", memory_budget: int | None = None,
                 groups: int | None = None, gemm: str | None = None) -> None:
        import fastpref

        self.mode, self.backend, self.groups, self.gemm = mode, backend, groups, gemm
        self.name = (f"fastpref-{mode}" + (f"-{groups}groups" if groups else "")
                     + (f"-{gemm}" if gemm is not None else ""))
        self.label = f"fastpref {fastpref.__version__}"
        self._memory_budget = memory_budget
        self._losses: dict[int | None, Any] = {}
        self.has_logps = mode == "fast" and not groups  # one forward-only row, reported with the fast mode

    def skip_reason(self, device: torch.device) -> str | None:
        if self.gemm != "fused":
            return None
        if self.backend == "torch":
            return "the fused GEMMs are Triton kernels: backend='torch' has none"
        from ..ops.backend import interpreter_enabled, triton_available

        if not triton_available():
            return "the fused GEMMs need triton"
        if device.type != "cuda" and not interpreter_enabled():
            return "the fused GEMMs run compiled on CUDA (on the CPU only under TRITON_INTERPRET=1)"
        return None

    def fallback(self, w: Workload) -> str | None:
        """A forced fused row whose kernels fell back to cublas on this device at the workload's shapes: the
        row's mark (``"fallback: cublas (<reason>)"``), else None."""
        if self.gemm != "fused":
            return None
        from ..ops import gemm_path

        key = gemm_path.key_of(w.device, w.dtype, w.shape.hidden, w.shape.vocab)
        reason = gemm_path.fallbacks().get(key)
        return None if reason is None else f"fallback: cublas ({reason})"

    def _loss(self, w: Workload) -> Any:
        import fastpref

        budget = self._memory_budget
        if self.groups:
            # rows of logits of a group: at most a 1/groups share of the scored tokens, at least one pair's
            elem = torch.empty((), dtype=w.dtype).element_size()
            pair_rows = max(int(w.mask[p].sum() + w.mask[p + w.shape.pairs].sum()) for p in range(w.shape.pairs))
            budget = max(pair_rows, -(-w.n_scored // self.groups)) * w.shape.vocab * elem
        if budget not in self._losses:
            self._losses[budget] = fastpref.DPOLoss(beta=BETA, mode=self.mode, backend=self.backend,
                                                    memory_budget=budget, gemm=self.gemm)
        return self._losses[budget]

    def step(self, w: Workload) -> StepOutput:
        out = self._loss(w)(w.hidden, w.weight, w.labels, ref_hidden=w.ref_hidden)
        return StepOutput(out.loss, torch.cat([out.chosen_logps, out.rejected_logps]))

    def logps(self, w: Workload) -> torch.Tensor:
        import fastpref

        with torch.no_grad():
            return fastpref.sequence_logps(w.hidden, w.weight, w.labels, backend=self.backend, gemm=self.gemm)

    def step_flops(self, w: Workload) -> int:
        # policy 6 (fast: no recompute) or 8 (lean: recompute), reference forward 2
        return (8 if self.mode == "fast" else 10) * flops_unit(w)


class ReferenceImpl(Impl):
    """``fastpref.reference``: the whole ``[B·T, V]`` logits in the compute dtype, log-softmax in fp32."""

    name = "reference"
    label = "materialised torch"

    def step(self, w: Workload) -> StepOutput:
        from .. import reference

        p = w.shape.pairs
        lp = reference.sequence_logps(w.hidden, w.weight, w.labels)
        with torch.no_grad():
            ref = reference.sequence_logps(w.ref_hidden, w.weight.detach(), w.labels)
        return StepOutput(dpo_loss(lp[:p], lp[p:], ref[:p], ref[p:]), lp.detach())

    def logps(self, w: Workload) -> torch.Tensor:
        from .. import reference

        with torch.no_grad():
            return reference.sequence_logps(w.hidden, w.weight, w.labels)

    def step_flops(self, w: Workload) -> int:
        rows = w.shape.batch * w.shape.seq_len  # every position, ignored ones included
        return 8 * flops_unit(w, rows)

    def logps_flops(self, w: Workload) -> int:
        return 2 * flops_unit(w, w.shape.batch * w.shape.seq_len)


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def module_version(module: str, dist: str) -> str | None:
    """The version of an importable module, also when it sits on a ``--peers-path`` without dist-info."""
    v = version(dist)
    if v is not None:
        return v
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:
        return None


def _import_trl_chunked() -> Any:
    """TRL 1.16's ``ChunkedLogProbFunction``. Its backward imports ``trl.trainer.utils`` (pandas, accelerate,
    datasets) only for ``maybe_gather_lm_head_ctx``, a null context without DeepSpeed ZeRO-3; on a machine
    without those packages a stub with that one null context stands in (the kernel code is TRL's, untouched)."""
    mod = importlib.import_module("trl.kernels.chunked_logprob")
    try:
        if not all(importlib.util.find_spec(m) is not None for m in ("accelerate", "datasets", "pandas")):
            raise ImportError("trl.trainer.utils needs accelerate, datasets and pandas")
        importlib.import_module("trl.trainer.utils")  # what the backward imports anyway (~4 s, once)
    except ImportError:
        import contextlib
        import types

        stub = types.ModuleType("trl.trainer.utils")
        stub.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()  # type: ignore[attr-defined]
        stub.__fastpref_stub__ = True  # type: ignore[attr-defined]
        sys.modules["trl.trainer.utils"] = stub
    return mod


class TrlImpl(Impl):
    """TRL 1.16 ``ChunkedLogProbFunction`` on the valid rows (as its DPOTrainer does on CUDA), 32768-wide vocabulary
    tiles (its ``_CHUNKED_LOGPROB_CHUNK_SIZE``), ``mean_logits`` computed for the metrics as fastpref does."""

    name = "trl"
    CHUNK = 32768

    def __init__(self) -> None:
        self.label = f"TRL {module_version('trl', 'trl')}"

    def skip_reason(self, device: torch.device) -> str | None:
        try:
            self._fn = _import_trl_chunked().ChunkedLogProbFunction
        except Exception as e:  # not installed, or an import-time failure on this machine
            return f"trl not importable ({type(e).__name__}: {e})"[:160]
        v = module_version("trl", "trl")
        if v and v != "unknown" and not v.startswith("1.16"):
            self.label = f"TRL {v} (the benchmark anchors 1.16)"
        return None

    def _seq(self, hidden: torch.Tensor, weight: torch.Tensor, w: Workload,
             outputs: tuple[str, ...]) -> torch.Tensor:
        lp = self._fn.apply(hidden[w.mask], weight, None, w.labels[w.mask], 1.0, self.CHUNK, None, 1.0, outputs)[0]
        return lp.new_zeros(w.mask.shape).masked_scatter(w.mask, lp).sum(-1)

    def step(self, w: Workload) -> StepOutput:
        p = w.shape.pairs
        lp = self._seq(w.hidden, w.weight, w, ("mean_logits",))
        with torch.no_grad():
            ref = self._seq(w.ref_hidden, w.weight.detach(), w, ())
        return StepOutput(dpo_loss(lp[:p], lp[p:], ref[:p], ref[p:]), lp.detach())

    def logps(self, w: Workload) -> torch.Tensor:
        with torch.no_grad():
            return self._seq(w.hidden, w.weight, w, ())

    def step_flops(self, w: Workload) -> int:
        return 10 * flops_unit(w)  # policy 2 + recompute 2 + 4, reference 2


class LigerImpl(Impl):
    """Liger-Kernel 0.8.5 ``LigerFusedLinearDPOLoss`` (default ``chunk_size=1``: one pair per chunk; gradients
    formed during the forward by ``torch.func``; every position of the batch, ignored ones included)."""

    name = "liger"
    has_logps = False  # its forward already computes the gradients: no forward-only path

    def __init__(self, compiled: bool = True) -> None:
        self.compiled = compiled
        self.label = f"Liger {module_version('liger_kernel', 'liger-kernel')}" + ("" if compiled else " (eager)")

    def skip_reason(self, device: torch.device) -> str | None:
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        except Exception as e:
            return f"liger-kernel not importable ({type(e).__name__}: {e})"[:160]
        self._loss = LigerFusedLinearDPOLoss(beta=BETA, compiled=self.compiled, ignore_index=IGNORE_INDEX)
        return None

    def step(self, w: Workload) -> StepOutput:
        loss, aux = self._loss(w.weight, w.hidden, w.labels, ref_input=w.ref_hidden, ref_weight=w.weight.detach())
        return StepOutput(loss, torch.cat([aux[0], aux[1]]).detach())

    def step_flops(self, w: Workload) -> int:
        return 8 * flops_unit(w, w.shape.batch * w.shape.seq_len)  # 6 policy + 2 reference, on every position


class CceImpl(Impl):
    """Cut-Cross-Entropy 25.1.1 ``linear_cross_entropy(..., reduction="none")`` (its default gradient filtering:
    the regime-dependence docs/benchmarks.md exposes)."""

    name = "cce"

    def __init__(self) -> None:
        self.label = f"CCE {module_version('cut_cross_entropy', 'cut-cross-entropy')}"

    def skip_reason(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return "CCE's kernels are Triton-on-CUDA only (on the CPU it fails: '0 active drivers')"
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as e:
            return f"cut-cross-entropy not importable ({type(e).__name__}: {e})"[:160]
        self._fn = linear_cross_entropy
        return None

    def _seq(self, hidden: torch.Tensor, weight: torch.Tensor, w: Workload) -> torch.Tensor:
        nll = self._fn(hidden, weight, w.labels, ignore_index=IGNORE_INDEX, reduction="none")
        return -nll.float().sum(-1)

    def step(self, w: Workload) -> StepOutput:
        p = w.shape.pairs
        lp = self._seq(w.hidden, w.weight, w)
        with torch.no_grad():
            ref = self._seq(w.ref_hidden, w.weight.detach(), w)
        return StepOutput(dpo_loss(lp[:p], lp[p:], ref[:p], ref[p:]), lp.detach())

    def logps(self, w: Workload) -> torch.Tensor:
        with torch.no_grad():
            return self._seq(w.hidden, w.weight, w)

    def step_flops(self, w: Workload) -> int:
        return 10 * flops_unit(w)  # backward recomputes (before its gradient filtering skips tiles)


IMPL_NAMES = ("fastpref-fast", "fastpref-lean", "reference", "trl", "liger", "cce")
# Both GEMM paths forced, side by side with the auto choice (the GPU suite runs them by default).
GEMM_IMPLS = ("fastpref-fast-cublas", "fastpref-fast-fused", "fastpref-lean-cublas", "fastpref-lean-fused")
# Checked against float64 by the GPU suite, not timed: fast mode over several pair groups (dW summed over groups).
CHECK_ONLY_IMPLS = ("fastpref-fast-3groups",)


def implementations(names: Iterable[str] = IMPL_NAMES, *, device: torch.device, liger_compiled: bool = True,
                    backend: str = "auto") -> list[Impl]:
    """Implementation objects by name (peers are imported lazily, in ``skip_reason``)."""
    out: list[Impl] = []
    for name in names:
        if name == "fastpref-fast-3groups":
            out.append(FastprefImpl("fast", backend=backend, groups=3))
        elif name.startswith("fastpref-") and name in IMPL_NAMES:
            out.append(FastprefImpl(name.split("-", 1)[1], backend=backend))
        elif name in GEMM_IMPLS:
            _, mode, gemm = name.split("-")
            out.append(FastprefImpl(mode, backend=backend, gemm=gemm))
        elif name == "reference":
            out.append(ReferenceImpl())
        elif name == "trl":
            out.append(TrlImpl())
        elif name == "liger":
            out.append(LigerImpl(compiled=liger_compiled))
        elif name == "cce":
            out.append(CceImpl())
        else:
            raise ValueError(f"impl: expected one of {[*IMPL_NAMES, *GEMM_IMPLS, *CHECK_ONLY_IMPLS]}, got {name!r}")
    return out


__all__ = ["CHECK_ONLY_IMPLS", "GEMM_IMPLS", "IMPL_NAMES", "CceImpl", "FastprefImpl", "Impl", "LigerImpl",
           "ReferenceImpl", "StepOutput", "TrlImpl", "dpo_loss", "flops_unit", "implementations", "module_version",
           "version"]
