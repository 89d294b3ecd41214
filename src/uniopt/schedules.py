"""Schedules: hyperparameter values as a function of the step.

A *schedule* is any callable ``step -> float``, where ``step`` is the number of updates already
applied: the first update sees ``schedule(0)``, exactly as in optax and
``torch.optim.lr_scheduler``. Any plain function or lambda is a schedule; the ones here are
small frozen dataclasses, so they are hashable, compare by value and print as the call that
built them.

Given a Python (or NumPy scalar) ``step`` they return a Python float. Given a 0-d NumPy or JAX
array they compute with that array's namespace and return an array, so they can be traced by
``jax.jit``; Python numbers are the priority, arrays are supported where it costs nothing.
Interpolations hit both ends exactly and never leave them, e.g. ``linear(a, a, n)`` is ``a``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import array_api_compat

__all__ = [
    "Schedule",
    "as_schedule",
    "constant",
    "cosine",
    "exponential",
    "join",
    "linear",
    "piecewise_constant",
    "warmup",
]

Schedule: TypeAlias = Callable[[int], float]


class _Scalar:
    """The few array-namespace functions the schedules use, for Python numbers.

    One formula then serves both Python steps and array steps: builtin ``min``/``max``/``if``
    would break under ``jax.jit``, and array functions would turn Python floats into arrays.
    """

    cos = staticmethod(math.cos)
    floor = staticmethod(math.floor)

    @staticmethod
    def clip(x: Any, lo: Any = None, hi: Any = None) -> Any:
        x = x if lo is None else max(x, lo)
        return x if hi is None else min(x, hi)

    @staticmethod
    def pow(x: float, y: float) -> float:
        try:
            return x**y
        except OverflowError:  # arrays give inf here; a clip at `end` may still bring it back
            return math.inf

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return a if cond else b


class _Record:
    """What the schedules here share: a schedule is not a number, so arithmetic on one (a
    torch ``lr_scheduler`` scaling a group's ``lr`` that holds it) is an error that says so."""

    def _not_a_number(self, other: Any) -> Any:
        import sys

        # the torch scheduler doing the arithmetic, if one is: its frame's ``self``
        frame: Any = sys._getframe(2)
        driver = ""
        for _ in range(4):
            if frame is None:
                break
            obj = frame.f_locals.get("self")
            if type(obj).__module__.startswith("torch.optim.lr_scheduler"):
                driver = f" (torch's {type(obj).__name__} is scaling it)"
                break
            frame = frame.f_back
        raise TypeError(
            f"{self!r} is a uniopt schedule, not a number{driver}: a param group's value is "
            "driven by a uniopt schedule or by a torch lr_scheduler, not both; give the group a "
            "number for the torch scheduler, or drop the scheduler"
        )

    __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _not_a_number
    __add__ = __radd__ = __sub__ = __rsub__ = __pow__ = _not_a_number


def _namespace(step: Any) -> Any:
    if isinstance(step, numbers.Real):
        return _Scalar
    return array_api_compat.array_namespace(step)


def _result(xp: Any, value: Any) -> Any:
    return float(value) if xp is _Scalar else value


def _lerp(xp: Any, a: float, b: float, t: Any) -> Any:
    # a + (b - a) * t is monotone in t and constant when a == b, but can miss b at t = 1 by an
    # ulp of a (1 + (1e-4 - 1) != 1e-4), on either side: pin t = 1 to b and clip to [a, b].
    return xp.clip(xp.where(t >= 1, b, a + (b - a) * t), min(a, b), max(a, b))


def _check_number(owner: str, name: str, value: object) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and math.isfinite(cast(float, value))):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")


def _check_count(owner: str, name: str, value: object, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not (ok and cast(int, value) >= (0 if allow_zero else 1)):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{owner}: {name} must be a {kind} integer, got {value!r}")


@dataclass(frozen=True)
class constant(_Record):
    """Always ``value``.

    >>> from uniopt import schedules
    >>> schedules.constant(0.1)(1000)
    0.1
    """

    value: float

    def __post_init__(self) -> None:
        _check_number("constant", "value", self.value)

    def __call__(self, step: int) -> float:
        return float(self.value)


@dataclass(frozen=True)
class linear(_Record):
    """``init`` to ``end`` linearly over ``steps`` updates, then ``end`` (optax.linear_schedule).

    ``value(s) = init + (end - init) * min(s, steps) / steps``

    >>> from uniopt import schedules
    >>> s = schedules.linear(1.0, 0.0, steps=4)
    >>> [s(k) for k in range(6)]
    [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """

    init: float
    end: float
    steps: int

    def __post_init__(self) -> None:
        _check_number("linear", "init", self.init)
        _check_number("linear", "end", self.end)
        _check_count("linear", "steps", self.steps)

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        return _result(
            xp, _lerp(xp, self.init, self.end, xp.clip(step, 0, self.steps) / self.steps)
        )


@dataclass(frozen=True)
class cosine(_Record):
    """Cosine decay from ``init`` to ``floor`` over ``steps`` updates, then ``floor``.

    ``value(s) = floor + (init - floor) * (1 + cos(pi * min(s, steps) / steps)) / 2``

    ``floor`` is an absolute value, unlike optax.cosine_decay_schedule's ``alpha`` (a fraction
    of ``init``: ``alpha = floor / init``). It equals torch's CosineAnnealingLR with
    ``T_max=steps, eta_min=floor`` up to ``steps``; torch then rises again, this holds ``floor``.

    >>> from uniopt import schedules
    >>> schedules.cosine(1.0, steps=10)(5)
    0.5
    >>> schedules.cosine(1.0, steps=10, floor=0.1)(10)
    0.1
    """

    init: float
    steps: int
    floor: float = 0.0

    def __post_init__(self) -> None:
        _check_number("cosine", "init", self.init)
        _check_count("cosine", "steps", self.steps)
        _check_number("cosine", "floor", self.floor)

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        decay = 0.5 * (1 + xp.cos(math.pi * xp.clip(step, 0, self.steps) / self.steps))
        return _result(xp, _lerp(xp, self.floor, self.init, decay))


@dataclass(frozen=True)
class exponential(_Record):
    """``init * rate ** (s / steps)``, or ``rate ** floor(s / steps)`` with ``staircase``.

    With ``end``, the value is clipped at ``end``: a lower bound when ``rate < 1``, an upper bound
    otherwise (optax.exponential_decay's ``end_value``). torch's ExponentialLR is
    ``steps=1``; StepLR is ``staircase=True, steps=step_size, rate=gamma``.

    >>> from uniopt import schedules
    >>> schedules.exponential(1.0, rate=0.5, steps=2)(3)
    0.3535533905932738
    >>> schedules.exponential(1.0, rate=0.5, steps=2, staircase=True)(3)
    0.5
    >>> schedules.exponential(1.0, rate=0.5, end=0.4)(3)
    0.4
    """

    init: float
    rate: float
    steps: int = 1
    staircase: bool = False
    end: float | None = None

    def __post_init__(self) -> None:
        _check_number("exponential", "init", self.init)
        _check_number("exponential", "rate", self.rate)
        if self.rate <= 0:
            raise ValueError(f"exponential: rate must be positive, got {self.rate!r}")
        _check_count("exponential", "steps", self.steps)
        if self.end is not None:
            _check_number("exponential", "end", self.end)
            # an `end` on the wrong side of `init` would replace the whole schedule by `end`
            if self.rate < 1 and self.end > self.init:
                raise ValueError(
                    f"exponential: end must be <= init={self.init!r} when rate < 1 (a lower "
                    f"bound), got {self.end!r}"
                )
            if self.rate >= 1 and self.end < self.init:
                raise ValueError(
                    f"exponential: end must be >= init={self.init!r} when rate >= 1 (an upper "
                    f"bound), got {self.end!r}"
                )

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        p = xp.clip(step, 0) / self.steps
        if self.staircase:
            p = xp.floor(p)
        value = self.init * xp.pow(self.rate, p)
        if self.end is not None:
            value = xp.clip(value, self.end) if self.rate < 1 else xp.clip(value, None, self.end)
        return _result(xp, value)


@dataclass(frozen=True)
class piecewise_constant(_Record):
    """``init`` until the first boundary; from step ``b`` on, ``boundaries_and_values[b]``.

    The values are *set*, not multiplied: optax.piecewise_constant_schedule takes scales that
    multiply the running value instead. torch's MultiStepLR is
    ``{m: init * gamma ** (i + 1) for i, m in enumerate(milestones)}``.

    >>> from uniopt import schedules
    >>> s = schedules.piecewise_constant(0.1, {10: 0.01, 20: 0.001})
    >>> s(9), s(10), s(25)
    (0.1, 0.01, 0.001)
    """

    init: float
    boundaries_and_values: Mapping[int, float]

    def __post_init__(self) -> None:
        _check_number("piecewise_constant", "init", self.init)
        for b, v in self.boundaries_and_values.items():
            _check_count("piecewise_constant", "each boundary", b, allow_zero=True)
            _check_number("piecewise_constant", f"the value at boundary {b}", v)
        # sorted, so the last boundary passed wins; a copy, so the caller can't mutate it
        object.__setattr__(
            self, "boundaries_and_values", dict(sorted(self.boundaries_and_values.items()))
        )

    def __hash__(self) -> int:
        return hash((self.init, tuple(self.boundaries_and_values.items())))

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        value: Any = self.init
        for b, v in self.boundaries_and_values.items():
            value = xp.where(step >= b, v, value)
        return _result(xp, value)


@dataclass(frozen=True)
class warmup(_Record):
    """Linear warm-up from ``init`` to ``then(0)`` over ``steps`` updates, then ``then(s - steps)``.

    ``value(s) = init + (then(0) - init) * s / steps`` for ``s < steps``, else ``then(s - steps)``.
    ``then`` is any schedule, or a number meaning a constant. ``steps=0`` is just ``then``.
    optax's ``warmup_cosine_decay_schedule(init, peak, w, decay_steps, end)`` is
    ``warmup(w, cosine(peak, decay_steps - w, floor=end), init)``.

    >>> from uniopt import schedules
    >>> s = schedules.warmup(4, then=schedules.cosine(1.0, steps=10))
    >>> [s(k) for k in (0, 2, 4, 9, 14)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """

    steps: int
    then: Schedule | float
    init: float = 0.0

    def __post_init__(self) -> None:
        _check_count("warmup", "steps", self.steps, allow_zero=True)
        _check_number("warmup", "init", self.init)
        object.__setattr__(self, "then", as_schedule(self.then))

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        then = cast(Schedule, self.then)  # made a schedule in __post_init__
        if xp is _Scalar and step >= self.steps:
            return float(then(step - self.steps))  # don't call `then` on negative steps
        ramp = _lerp(xp, self.init, then(0), step / max(self.steps, 1))
        if xp is _Scalar:
            return float(ramp)
        return cast(float, xp.where(step < self.steps, ramp, then(step - self.steps)))


@dataclass(frozen=True)
class join(_Record):
    """``schedules[i]`` between ``boundaries[i-1]`` and ``boundaries[i]`` (optax.join_schedules).

    ``value(s) = schedules[i](s - start_i)`` where ``i`` is the number of boundaries ``<= s``,
    ``start_0 = 0`` and ``start_i = boundaries[i-1]``: each schedule starts from its own step 0.
    Numbers in ``schedules`` mean constants.

    >>> from uniopt import schedules
    >>> s = schedules.join([1.0, schedules.linear(1.0, 0.0, steps=10)], boundaries=[5])
    >>> s(4), s(5), s(10), s(100)
    (1.0, 1.0, 0.5, 0.0)
    """

    schedules: Sequence[Schedule | float]
    boundaries: Sequence[int]

    def __post_init__(self) -> None:
        scheds, bounds = tuple(self.schedules), tuple(self.boundaries)
        if len(scheds) != len(bounds) + 1:
            raise ValueError(
                f"join: needs len(boundaries) + 1 schedules, got {len(scheds)} schedules "
                f"and boundaries={list(bounds)!r}"
            )
        for b in bounds:
            _check_count("join", "each boundary", b, allow_zero=True)
        if any(b >= c for b, c in itertools.pairwise(bounds)):
            raise ValueError(f"join: boundaries must be strictly increasing, got {list(bounds)!r}")
        object.__setattr__(self, "schedules", tuple(as_schedule(s) for s in scheds))
        object.__setattr__(self, "boundaries", bounds)

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        scheds = cast("tuple[Schedule, ...]", self.schedules)  # normalised in __post_init__
        if xp is _Scalar:  # only the active schedule is called: none sees a negative step
            i = bisect.bisect_right(self.boundaries, step)
            return float(scheds[i](step - (self.boundaries[i - 1] if i else 0)))
        # arrays can't branch: like optax, every piece is evaluated (some on negative steps)
        value: Any = scheds[0](step)
        for b, sched in zip(self.boundaries, scheds[1:], strict=True):
            value = xp.where(step < b, value, sched(step - b))
        return cast(float, value)


def as_schedule(x: Schedule | float) -> Schedule:
    """A number becomes ``constant(x)``; a callable is already a schedule; anything else fails.

    >>> from uniopt import schedules
    >>> schedules.as_schedule(0.1)
    constant(value=0.1)
    >>> schedules.as_schedule(lambda step: 0.5**step)(3)
    0.125
    """
    if callable(x):
        return x
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return constant(x)
    raise TypeError(f"as_schedule: expected a number or a callable step -> float, got {x!r}")
