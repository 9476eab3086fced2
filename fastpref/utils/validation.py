"""The one validation dialect of the package: every error names the argument, the value seen and what was
expected (``"<name>: expected <what>, got <value>"``). Scalars (``check_int``, ``check_number`` with an
``Interval``, ``check_choice``) and the tensors at the public boundary of the LM-head ops."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _float_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {t.dtype}")
    return t


def _int_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor (int64), got {t.dtype}")
    return t


def _same_device(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of hidden), got {t.device}")


def check_head_inputs(
    hidden: object,
    weight: object,
    labels: object,
    bias: object = None,
    *,
    hidden_name: str = "hidden",
    weight_name: str = "weight",
    labels_name: str = "labels",
    bias_name: str = "bias",
) -> None:
    """hidden [B, T, H] or [N, H] float; weight [V, H] float; labels (int) shaped like hidden[..., 0]; bias [V]."""
    hidden = _float_tensor(hidden_name, hidden)
    weight = _float_tensor(weight_name, weight)
    labels = _int_tensor(labels_name, labels)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{hidden_name}: expected shape [B, T, H] or [N, H], got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{weight_name}: expected shape [V, H], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{weight_name}: expected [V, H] with H = {hidden_name}.shape[-1] = {hidden.shape[-1]}, "
                         f"got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{weight_name}: expected a vocabulary of at least one row, got shape {tuple(weight.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{labels_name}: expected shape {tuple(hidden.shape[:-1])} ({hidden_name}.shape[:-1]), "
                         f"got {tuple(labels.shape)}")
    if hidden.device.type == "meta":
        raise ValueError(f"{hidden_name}: expected a tensor with data (on cpu, cuda, ...), got one on the meta "
                         "device (the scored tokens are counted from the labels' values)")
    _same_device(weight_name, weight, hidden)
    _same_device(labels_name, labels, hidden)
    if bias is not None:
        bias = _float_tensor(bias_name, bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{bias_name}: expected shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        _same_device(bias_name, bias, hidden)


def check_seq_ids(hidden: torch.Tensor, seq_ids: object, num_seqs: object) -> None:
    """Packed layout: hidden [N, H] with seq_ids [N] (int) and num_seqs (int >= 0)."""
    if seq_ids is None:
        if num_seqs is not None:
            raise ValueError(f"num_seqs: only meaningful with seq_ids (packed batches), got num_seqs={num_seqs} "
                             "and seq_ids=None")
        return
    seq_ids = _int_tensor("seq_ids", seq_ids)
    if hidden.dim() != 2:
        raise ValueError(f"seq_ids: packed batches expect hidden of shape [N, H], got hidden "
                         f"{tuple(hidden.shape)}")
    if tuple(seq_ids.shape) != (hidden.shape[0],):
        raise ValueError(f"seq_ids: expected shape [N] = ({hidden.shape[0]},), got {tuple(seq_ids.shape)}")
    _same_device("seq_ids", seq_ids, hidden)
    if num_seqs is None:
        raise ValueError("num_seqs: required with seq_ids (the number of sequences, so no host sync is needed), "
                         "got None")
    check_int("num_seqs", num_seqs, low=0)


def check_int(name: str, value: object, *, low: int | None = None) -> int:
    """An int (not a bool) ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name}: expected an int, got {value!r} ({type(value).__name__})")
    if low is not None and value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value}")
    return int(value)


@dataclass(frozen=True)
class Interval:
    """A range of finite reals, printed in interval notation (``[0, 0.5)``); ``note`` says what it means."""

    low: float = -math.inf
    high: float = math.inf
    low_closed: bool = True
    high_closed: bool = False
    note: str = ""

    def __contains__(self, x: float) -> bool:
        above = x >= self.low if self.low_closed else x > self.low
        below = x <= self.high if self.high_closed else x < self.high
        return math.isfinite(x) and above and below

    def __str__(self) -> str:
        low = "(-inf" if self.low == -math.inf else f"{'[' if self.low_closed else '('}{self.low:.4g}"
        high = "inf)" if self.high == math.inf else f"{self.high:.4g}{']' if self.high_closed else ')'}"
        return f"{low}, {high}"


FINITE = Interval()
POSITIVE = Interval(0.0, low_closed=False)
# The fused paths compute in fp32: a hyper-parameter beyond its range would become inf there (and inf * 0 = NaN).
FP32_MAX = float(torch.finfo(torch.float32).max)
FP32 = Interval(-FP32_MAX, FP32_MAX, high_closed=True, note="finite in fp32, the precision of the fused kernels")
POSITIVE_FP32 = Interval(0.0, FP32_MAX, low_closed=False, high_closed=True,
                         note="finite in fp32, the precision of the fused kernels")
# 1 / temperature must be finite in fp32 too.
TEMPERATURE = Interval(1.0 / FP32_MAX, FP32_MAX, high_closed=True, note="temperature and 1/temperature finite in fp32")


def is_long_int(value: object) -> bool:
    """An integer too long to print (Python's int-string limit) or to read: ``describe`` says how long instead."""
    return isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200


def describe(value: object) -> str:
    """``repr(value)``, except for integers too long to print (Python's int-string limit) or to read."""
    if is_long_int(value):
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    return repr(value)


def check_number(name: str, value: object, allowed: Interval = FINITE, *, allow_none: bool = False,
                 where: str = "") -> float | None:
    """``value`` as a float after checking it is a real number (not a bool) in ``allowed``; ``TypeError`` /
    ``ValueError`` naming the argument, the value seen and the range (``where`` adds context such as
    ``" for loss_type 'robust'"``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {describe(value)}")
    note = f" ({allowed.note})" if allowed.note else ""
    try:
        v = float(value)
    except OverflowError:  # an int beyond the float range
        v = math.inf
    if v not in allowed:
        seen = describe(value) if isinstance(value, Integral) and not math.isfinite(v) else repr(v)
        raise ValueError(f"{name}: expected a finite number in {allowed}{where}{note}, got {seen}")
    return v


def check_transform(temperature: object, logit_scale: object, softcap: object) -> None:
    check_number("temperature", temperature, TEMPERATURE)
    check_number("logit_scale", logit_scale, FP32)
    check_number("softcap", softcap, POSITIVE_FP32, allow_none=True)


def data_device(text: str, *, cpu_or_cuda: bool = False) -> torch.device:
    """A command line's ``--device``: a torch device that holds data (not meta) and is available here;
    ``cpu_or_cuda`` admits those two types only. ``ValueError`` saying what was expected."""
    kind = "cpu or cuda[:i]" if cpu_or_cuda else "a torch device such as cpu or cuda[:i]"
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise ValueError(f"expected {kind}, got {text!r} ({e})") from None
    if cpu_or_cuda and device.type not in ("cpu", "cuda"):
        raise ValueError(f"expected cpu or cuda[:i], got {text!r} (meta and other devices hold no data)")
    if device.type == "meta":
        raise ValueError(f"expected a device that holds data (cpu, cuda[:i], ...), got {text!r} (meta tensors have "
                         "no values)")
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if backend is not None and hasattr(backend, "is_available") and not backend.is_available():
        raise ValueError(f"expected an available device, got {text!r}: {device.type} is not available here")
    return device


def check_choice(name: str, value: object, choices: tuple[str, ...] | list[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def check_memory_budget(memory_budget: object, name: str = "memory_budget") -> int | None:
    """A positive int of bytes, or None (the device's default budget)."""
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget <= 0):
        raise ValueError(f"{name}: expected a positive int (bytes) or None, got {memory_budget!r}")
    return memory_budget
