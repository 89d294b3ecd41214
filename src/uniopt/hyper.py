"""Hyperparameters: a number or a schedule, resolved in exactly one place.

A hyperparameter field of a rule holds either a number or a *schedule* (any callable
``step -> float``). Rules never see a schedule: :func:`resolve` turns every field into a plain
number for the current step, and the same validation that guards the constructor guards the
value a schedule produced, so a schedule that goes negative fails before anything is updated.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np

Schedule: TypeAlias = Callable[[int], float]
Hyper: TypeAlias = "float | Schedule"


@dataclass(frozen=True)
class Interval:
    """The valid range of a hyperparameter; ``None`` means unbounded on that side."""

    lo: float | None = 0.0
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: float) -> bool:
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return not (self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi)))

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


NONNEG = Interval()
UNIT_OPEN = Interval(0.0, 1.0, hi_open=True)  # betas, momentum-like decays: 1 would never forget
UNIT = Interval(0.0, 1.0)
POSITIVE = Interval(0.0, lo_open=True)


def hyper(default: Any = dataclasses.MISSING, valid: Interval = NONNEG) -> Any:
    """A dataclass field that is a hyperparameter (a number or a schedule) with a valid range."""
    return dataclasses.field(default=default, metadata={"hyper": valid})


def is_schedule(h: object) -> bool:
    return callable(h)


def _traced(value: object) -> bool:
    """Whether ``value`` is a JAX tracer (a hyperparameter computed inside ``jax.jit``)."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(value, jax.core.Tracer)


def check(owner: str, name: str, value: object, valid: Interval, where: str = "") -> float:
    """``value`` as a Python float, or a TypeError/ValueError naming ``owner``, ``name``, the
    value and ``where`` it came from.

    Python floats keep float32 arrays float32 where a NumPy float64 scalar would promote them,
    so every number is normalised here, once."""
    if _traced(value):
        return value  # type: ignore[return-value]  # under jax.jit: no value to check yet
    zero_d = getattr(value, "shape", None) == () and getattr(value, "dtype", None) is not None
    if zero_d and np.dtype(str(value.dtype)).kind in "fiu":  # type: ignore[attr-defined]
        value = value.item()  # type: ignore[attr-defined]  # a 0-d NumPy/torch/JAX number
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number or a schedule, got {value!r}{where}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{owner}: {name} must be finite, got {value!r}{where}")
    if x not in valid:
        raise ValueError(f"{owner}: {name} must be {valid}, got {value!r}{where}")
    return x


def resolve(h: Any, step: int) -> Any:
    """The value of hyperparameter ``h`` for the update that follows ``step`` applied updates.

    Numbers pass through; schedules are called with ``step``; tuples (``betas``) resolve
    element-wise. This is the only place a schedule is ever evaluated.
    """
    if isinstance(h, tuple):
        return tuple(resolve(x, step) for x in h)
    if callable(h):
        return h(step)
    return h
