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
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeAlias, cast

import array_api_compat

from .hyper import _float_step, resolve

__all__ = [
    "Schedule",
    "as_schedule",
    "bias_correction",
    "constant",
    "cosine",
    "cyclic",
    "exponential",
    "inverse_sqrt",
    "join",
    "linear",
    "onecycle",
    "piecewise_constant",
    "piecewise_interpolate",
    "polynomial",
    "product",
    "sgdr",
    "warmup",
    "wsd",
]

Schedule: TypeAlias = Callable[[int], float]


class _Scalar:
    """The few array-namespace functions the schedules use, for Python numbers.

    One formula then serves both Python steps and array steps: builtin ``min``/``max``/``if``
    would break under ``jax.jit``, and array functions would turn Python floats into arrays.
    """

    cos = staticmethod(math.cos)
    exp = staticmethod(math.exp)
    floor = staticmethod(math.floor)
    floor_divide = staticmethod(operator.floordiv)
    log = staticmethod(math.log)
    remainder = staticmethod(operator.mod)
    sqrt = staticmethod(math.sqrt)

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


def _refused(op: str, reflected: bool = False) -> Callable[[Any, Any], Any]:
    """The arithmetic method ``op`` of a schedule (its reflected one): the error that says a
    schedule is not a number (:meth:`_Record._not_a_number`)."""
    def method(self: _Record, other: Any) -> Any:
        return self._not_a_number(other, op, reflected=reflected)
    return method


class _Record:
    """What the schedules here share: a schedule is not a number, so arithmetic on one (a
    torch ``lr_scheduler`` scaling a group's ``lr`` that holds it) is an error that says so."""

    def _not_a_number(self, other: Any, op: str | None = None, reflected: bool = False) -> Any:
        """Raise for ``self <op> other`` (``other <op> self`` where ``reflected``; ``float()``
        where ``op`` is None)."""
        import sys

        # the torch scheduler doing the arithmetic, if one is: its frame's ``self`` (torch's
        # own classes, swa_utils' SWALR, a user's subclass in a module of their own)
        kinds = _torch_schedulers()
        frame: Any = sys._getframe(1)
        for _ in range(6 if kinds else 0):
            if frame is None:
                break
            obj = frame.f_locals.get("self")
            if isinstance(obj, kinds):
                name = type(obj).__name__
                who = (f"torch's {name}" if type(obj).__module__.startswith("torch.") else
                       f"the torch lr_scheduler {name}")
                raise TypeError(
                    f"{self!r} is a uniopt schedule, not a number ({who} is scaling it): a "
                    "param group's value is driven by a uniopt schedule or by a torch "
                    "lr_scheduler, not both; give the group a number for the torch scheduler, "
                    "or drop the scheduler (the HF Trainer makes one over every optimizer: "
                    "there, a number and its lr_scheduler_type)")
            frame = frame.f_back
        if op is None:  # float() of it
            raise TypeError(f"{self!r} is a uniopt schedule, not a number: its value at a step "
                            f"is {self!r}(step)")
        said = f"{self!r} is a uniopt schedule, not a number: no arithmetic is defined on it; "
        if not _is_number(other) and hasattr(other, "shape") and hasattr(other, "dtype"):
            raise TypeError(f"{said}{other!r} is an array{_ARRAY_HINT}")
        if op == "*" and (callable(other) or _is_number(other) and math.isfinite(other)):
            raise TypeError(f"{said}schedules.product({self!r}, {other!r}) is its product "
                            "with a number or another schedule")
        if (op == "/" and not reflected and _is_number(other) and math.isfinite(other)
                and other != 0 and math.isfinite(1 / other)):
            raise TypeError(f"{said}schedules.product({self!r}, {1 / other!r}) is its "
                            "quotient by that number")
        # (no record here adds, subtracts or raises to a power: a function of the step does)
        them = "other(s)" if callable(other) else repr(other)
        a, b = (them, "schedule(s)") if reflected else ("schedule(s)", them)
        named = "this one and other the other" if callable(other) else "this one"
        raise TypeError(f"{said}a schedule is any function of the step: lambda s: {a} {op} "
                        f"{b}, with schedule {named}, is the schedule meant")

    # takes a JAX step as the default float (hyper.resolve): exact under x64
    float_step: ClassVar[bool] = True

    __mul__, __rmul__ = _refused("*"), _refused("*", reflected=True)
    __truediv__, __rtruediv__ = _refused("/"), _refused("/", reflected=True)
    __add__, __radd__ = _refused("+"), _refused("+", reflected=True)
    __sub__, __rsub__ = _refused("-"), _refused("-", reflected=True)
    __pow__ = _refused("**")

    def __float__(self) -> float:
        # (ReduceLROnPlateau reads float(group["lr"]): float() of a schedule says the same)
        return cast(float, self._not_a_number(None))


def _torch_schedulers() -> tuple[type, ...]:
    """torch's scheduler classes, where torch is imported (not imported here): every
    ``lr_scheduler`` derives from ``LRScheduler`` (``ReduceLROnPlateau`` too since torch 2.2,
    ``_LRScheduler`` before 2.0)."""
    import sys

    found = sys.modules.get("torch.optim.lr_scheduler")
    return tuple(c for c in (getattr(found, n, None) for n in
                             ("LRScheduler", "_LRScheduler", "ReduceLROnPlateau"))
                 if isinstance(c, type))


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _namespace(step: Any) -> Any:
    if isinstance(step, numbers.Real):
        return _Scalar
    return array_api_compat.array_namespace(step)


def _result(xp: Any, value: Any) -> Any:
    return float(value) if xp is _Scalar else value


def _lerp(xp: Any, a: float, b: Any, t: Any) -> Any:
    # a + (b - a) * t is monotone in t and constant when a == b, but can miss b at t = 1 by an
    # ulp of a (1 + (1e-4 - 1) != 1e-4), on either side: pin t = 1 to b and clip to [a, b].
    # (b may be an array: a function's value, traced under jax.jit; torch's minimum takes no
    # Python numbers)
    lo, hi = ((min(a, b), max(a, b)) if xp is _Scalar or isinstance(b, numbers.Real)
              else (xp.minimum(a, b), xp.maximum(a, b)))
    return xp.clip(xp.where(t >= 1, b, a + (b - a) * t), lo, hi)


# Stairs, cycles, phases and ends are decided by comparing the step with whole numbers, never by
# a rounded quotient: under jax.jit XLA divides by a constant as a multiply by its rounded
# reciprocal, so 41 / 41 is 1 - 2**-24 in float32 (an end missed by an ulp) and 41 // 41 is 0
# (a stair one update late).


def _fraction(xp: Any, k: Any, n: int) -> Any:
    """``k / n`` for ``0 <= k <= n``, exactly 1 at ``k = n`` (where ``_lerp`` pins its end)."""
    return xp.where(k >= n, 1.0, k / n)


def _floor_div(xp: Any, s: Any, n: int) -> Any:
    """``floor(s / n)`` for ``s >= 0``, exact for any ``s`` its type holds exactly: the rounded
    quotient's floor, corrected by one where a multiply-compare says it is off."""
    q = xp.floor(s / n)
    return xp.where(q * n > s, q - 1, xp.where((q + 1) * n <= s, q + 1, q))




# why an array is no schedule's number, and what to write instead (a sweep's or a
# meta-gradient's peak lr under jax.vmap or jax.grad is a traced array)
_ARRAY_HINT = (": a schedule's numbers are Python numbers, fixed when it is made (it is data, "
               "saved as such, and part of a jitted step's structure); for a peak that is an "
               "array (traced under jax.vmap or jax.grad), scale a schedule of 1: "
               "lambda step: peak * cosine(1.0, steps=...)(step)")


def _check_number(owner: str, name: str, value: object) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and math.isfinite(cast(float, value))):
        hint = _ARRAY_HINT if hasattr(value, "shape") and hasattr(value, "dtype") else ""
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}{hint}")


def _check_positive(owner: str, name: str, value: object) -> None:
    _check_number(owner, name, value)
    if cast(float, value) <= 0:
        raise ValueError(f"{owner}: {name} must be positive, got {value!r}")


def _check_choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(repr, choices))}, got "
                         f"{value!r}")


def _check_flag(owner: str, name: str, value: object) -> None:
    # (a string "false" is true to Python: staircase="false" ran the staircase)
    if not (isinstance(value, bool) or type(value).__module__ == "numpy"
            and type(value).__name__ in ("bool", "bool_")):  # (NumPy's True_ too)
        raise ValueError(f"{owner}: {name} must be True or False, got {value!r}")


def _check_mapping(owner: str, value: object) -> None:
    if not isinstance(value, Mapping):
        raise ValueError(f"{owner}: boundaries_and_values must be a dict of boundary: value, "
                         f"got {value!r}")


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
        t = _fraction(xp, xp.clip(step, 0, self.steps), self.steps)
        return _result(xp, _lerp(xp, self.init, self.end, t))


@dataclass(frozen=True)
class cosine(_Record):
    """Cosine decay from ``init`` to ``floor`` over ``steps`` updates, then ``floor``.

    ``value(s) = floor + (init - floor) * ((1 + cos(pi * min(s, steps) / steps)) / 2) ** exponent``

    ``floor`` is an absolute value, unlike optax.cosine_decay_schedule's ``alpha`` (a fraction
    of ``init``: ``alpha = floor / init``); ``exponent`` is optax's. It equals torch's
    CosineAnnealingLR with ``T_max=steps, eta_min=floor`` up to ``steps``; torch then rises
    again, this holds ``floor`` (``sgdr`` restarts instead).

    >>> from uniopt import schedules
    >>> schedules.cosine(1.0, steps=10)(5)
    0.5
    >>> schedules.cosine(1.0, steps=10, floor=0.1)(10)
    0.1
    """

    init: float
    steps: int
    floor: float = 0.0
    exponent: float = 1.0

    def __post_init__(self) -> None:
        _check_number("cosine", "init", self.init)
        _check_count("cosine", "steps", self.steps)
        _check_number("cosine", "floor", self.floor)
        _check_positive("cosine", "exponent", self.exponent)

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        k = xp.clip(step, 0, self.steps)
        decay = 0.5 * (1 + xp.cos(math.pi * k / self.steps))
        # (at the end, under jax.jit, the cosine's argument is an ulp off pi: 0 only by the
        # cosine's flatness there)
        decay = xp.where(k >= self.steps, 0.0, decay)
        if self.exponent != 1:
            decay = xp.pow(xp.clip(decay, 0), self.exponent)  # a base a hair below 0: nan
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
        _check_flag("exponential", "staircase", self.staircase)
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
        s = xp.clip(step, 0)
        p = _floor_div(xp, s, self.steps) if self.staircase else s / self.steps
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
        _check_mapping("piecewise_constant", self.boundaries_and_values)
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
        object.__setattr__(self, "then", _to_schedule("warmup", "then", self.then))

    # the count as given (a JAX state's integer), handed on by hyper.resolve as it hands a
    # count: a uniopt record takes it as the default float, a function of yours the integer
    float_step: ClassVar[bool] = False

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        then = cast(Schedule, self.then)  # made a schedule in __post_init__
        if xp is _Scalar and step >= self.steps:
            return float(then(step - self.steps))  # don't call `then` on negative steps
        ramp = _lerp(xp, self.init, resolve(then, 0), _float_step(step) / max(self.steps, 1))
        if xp is _Scalar:
            return float(ramp)
        return cast(float, xp.where(step < self.steps, ramp, resolve(then, step - self.steps)))


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
        object.__setattr__(self, "schedules", tuple(_to_schedule("join", f"schedules[{i}]", s)
                                                    for i, s in enumerate(scheds)))
        object.__setattr__(self, "boundaries", bounds)

    float_step: ClassVar[bool] = False  # (the count as given: see warmup's)

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        scheds = cast("tuple[Schedule, ...]", self.schedules)  # normalised in __post_init__
        if xp is _Scalar:  # only the active schedule is called: none sees a negative step
            i = bisect.bisect_right(self.boundaries, step)
            return float(scheds[i](step - (self.boundaries[i - 1] if i else 0)))
        # arrays can't branch: like optax, every piece is evaluated (some on negative steps)
        value: Any = resolve(scheds[0], step)
        for b, sched in zip(self.boundaries, scheds[1:], strict=True):
            value = xp.where(step < b, value, resolve(sched, step - b))
        return cast(float, value)


@dataclass(frozen=True)
class polynomial(_Record):
    """``init`` to ``end`` along a power of the remaining fraction, then ``end``.

    ``value(s) = end + (init - end) * (1 - min(s, steps) / steps) ** power``

    optax.polynomial_schedule (its ``transition_begin=b`` is ``join([init, polynomial(...)],
    [b])``); torch's PolynomialLR is ``polynomial(lr, 0.0, total_iters, power)``.

    >>> from uniopt import schedules
    >>> s = schedules.polynomial(1.0, 0.0, steps=4, power=2)
    >>> [s(k) for k in range(6)]
    [1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]
    """

    init: float
    end: float
    steps: int
    power: float = 1.0

    def __post_init__(self) -> None:
        _check_number("polynomial", "init", self.init)
        _check_number("polynomial", "end", self.end)
        _check_count("polynomial", "steps", self.steps)
        _check_positive("polynomial", "power", self.power)

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        # (steps - s) / steps, not 1 - s / steps: no cancellation near the end, where it would
        # cost ~steps ulps of the value (torch's and optax's last values), nor a hair below 0
        # under jax.jit (an fma; optax's pow then gives nan)
        left = _fraction(xp, self.steps - xp.clip(step, 0, self.steps), self.steps)
        return _result(xp, _lerp(xp, self.end, self.init, xp.pow(left, self.power)))


_Kind: TypeAlias = Literal["linear", "cosine"]


@dataclass(frozen=True)
class piecewise_interpolate(_Record):
    """Through ``(0, init)`` and each ``(boundary, value)``, linearly or along a half cosine.

    Between knots ``(a, u)`` and ``(b, v)``, with ``p = (s - a) / (b - a)``:
    ``linear``: ``u + (v - u) * p``; ``cosine``: ``v + (u - v) * (1 + cos(pi * p)) / 2``. After the
    last knot, its value. Boundaries may be fractional (torch's OneCycleLR puts its peak at
    ``pct_start * total_steps - 1``); one at 0 replaces ``init``.

    Values are *set*, as in ``piecewise_constant``: optax.piecewise_interpolate_schedule takes
    scales instead, the value at each boundary being ``init`` times the product of the scales
    so far.

    >>> from uniopt import schedules
    >>> s = schedules.piecewise_interpolate(1.0, {4: 0.2, 8: 0.1})
    >>> [s(k) for k in range(0, 11, 2)]
    [1.0, 0.6, 0.2, 0.15000000000000002, 0.1, 0.1]
    >>> schedules.piecewise_interpolate(1.0, {4: 0.0}, kind="cosine")(1)
    0.8535533905932737
    """

    init: float
    boundaries_and_values: Mapping[float, float]
    kind: _Kind = "linear"

    def __post_init__(self) -> None:
        _check_number("piecewise_interpolate", "init", self.init)
        _check_mapping("piecewise_interpolate", self.boundaries_and_values)
        for b, v in self.boundaries_and_values.items():
            _check_number("piecewise_interpolate", "each boundary", b)
            if b < 0:
                raise ValueError(
                    f"piecewise_interpolate: each boundary must be non-negative, got {b!r}"
                )
            _check_number("piecewise_interpolate", f"the value at boundary {b}", v)
        _check_choice("piecewise_interpolate", "kind", self.kind, ("linear", "cosine"))
        object.__setattr__(
            self, "boundaries_and_values", dict(sorted(self.boundaries_and_values.items()))
        )

    def __hash__(self) -> int:
        return hash((self.init, tuple(self.boundaries_and_values.items()), self.kind))

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        s = xp.clip(step, 0)
        knots = [(0, self.init), *self.boundaries_and_values.items()]
        value: Any = knots[-1][1]
        # from the last piece back, so the first piece that has not ended wins
        for (a, u), (b, v) in reversed(list(itertools.pairwise(knots))):
            if b == a:
                continue  # a knot at 0: no piece before it
            p = (s - a) / (b - a)
            if self.kind == "linear":
                piece = _lerp(xp, u, v, p)
            else:
                piece = _lerp(xp, v, u, 0.5 * (1 + xp.cos(math.pi * p)))
            value = xp.where(s < b, piece, value)
        return _result(xp, value)


def onecycle(
    peak: float,
    steps: int,
    pct_start: float = 0.3,
    div: float = 25.0,
    final_div: float = 1e4,
    kind: _Kind = "cosine",
    three_phase: bool = False,
) -> piecewise_interpolate:
    """torch's OneCycleLR: ``peak / div`` up to ``peak``, then down to ``peak / div / final_div``.

    The peak is at step ``pct_start * steps - 1``, the end at ``steps - 1`` (the last of
    ``steps`` updates); ``three_phase`` comes back to ``peak / div`` at ``2 * (pct_start * steps
    - 1)`` first. The result is a ``piecewise_interpolate`` through those knots, which holds the
    last value where torch raises (past ``steps``). optax's cosine/linear_onecycle_schedule put
    their knots elsewhere (at ``int(pct_start * steps)`` and ``steps``): write them as
    ``piecewise_interpolate`` directly (the docs' Schedules page, docs/schedules.md).

    >>> from uniopt import schedules
    >>> s = schedules.onecycle(1.0, steps=10)
    >>> [round(s(k), 6) for k in (0, 1, 2, 9)]
    [0.04, 0.52, 1.0, 4e-06]
    """
    _check_number("onecycle", "peak", peak)
    _check_count("onecycle", "steps", steps)
    _check_positive("onecycle", "div", div)
    _check_positive("onecycle", "final_div", final_div)
    _check_number("onecycle", "pct_start", pct_start)
    _check_flag("onecycle", "three_phase", three_phase)
    _check_choice("onecycle", "kind", kind, ("linear", "cosine"))
    up = pct_start * steps - 1
    if up <= 0:
        raise ValueError(
            f"onecycle: the peak's step pct_start * steps - 1 must be positive, got {up!r} "
            f"(pct_start={pct_start!r}, steps={steps!r})"
        )
    last, name = (2 * up, "2 * (pct_start * steps - 1)") if three_phase else (up, "the peak's step")
    if last >= steps - 1:
        raise ValueError(
            f"onecycle: {name} must be below steps - 1 = {steps - 1}, got {last!r} "
            f"(pct_start={pct_start!r}, steps={steps!r})"
        )
    init = peak / div
    if not math.isfinite(init / final_div):  # (inf, or a nan from init = inf)
        raise ValueError(
            f"onecycle: peak / div / final_div must be finite, got {init / final_div!r} "
            f"(peak={peak!r}, div={div!r}, final_div={final_div!r})"
        )
    knots = {up: peak, 2 * up: init} if three_phase else {up: peak}
    return piecewise_interpolate(init, {**knots, steps - 1: init / final_div}, kind)


@dataclass(frozen=True)
class sgdr(_Record):
    """Cosine from ``init`` to ``floor`` over ``steps`` updates, restarting at ``init`` each time,
    every cycle ``mult`` (a whole number) times as long as the one before: SGDR (Loshchilov &
    Hutter, 2017).

    Cycle ``i`` starts at ``c_i = steps * (1 + mult + ... + mult**(i-1))`` and lasts
    ``T_i = steps * mult**i``; ``value(s) = floor + (init - floor) * (1 + cos(pi * (s - c_i) /
    T_i)) / 2``. torch's CosineAnnealingWarmRestarts with ``T_0=steps, T_mult=mult,
    eta_min=floor``. optax.sgdr_schedule joins a list of warm-up-cosine cycles: that is ``join``
    of ``warmup``s.

    >>> from uniopt import schedules
    >>> s = schedules.sgdr(1.0, steps=2, mult=2)
    >>> [s(k) for k in range(7)]
    [1.0, 0.5, 1.0, 0.8535533905932737, 0.5, 0.14644660940672627, 1.0]
    """

    init: float
    steps: int
    mult: int = 1
    floor: float = 0.0

    def __post_init__(self) -> None:
        _check_number("sgdr", "init", self.init)
        _check_count("sgdr", "steps", self.steps)
        _check_count("sgdr", "mult", self.mult)
        _check_number("sgdr", "floor", self.floor)

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        s, n, m = xp.clip(step, 0), self.steps, self.mult
        start: Any = 0
        length: Any = n
        if m == 1:
            start = s - xp.remainder(s, n)
        elif xp is _Scalar:
            # whole numbers (an infinite step walks none: it would never end)
            while s >= start + length and math.isfinite(s):
                start, length = start + length, length * m
        else:
            # the last restart up to the step, of every restart below 2**53 (past which no
            # float step is exact), each a float: an int32 step refuses a larger int
            restart = n
            while restart < 2**53:
                start = xp.where(s >= float(restart), float(restart), start)
                restart = restart * m + n
            length = (m - 1) * start + n  # n * m**i, a whole number as the start is
        decay = 0.5 * (1 + xp.cos(math.pi * (s - start) / length))
        return _result(xp, _lerp(xp, self.floor, self.init, decay))


@dataclass(frozen=True)
class cyclic(_Record):
    """Triangle waves between ``init`` and ``peak``: torch's CyclicLR (Smith, 2017).

    Each cycle rises over ``steps_up`` updates and falls over ``steps_down`` (default
    ``steps_up``). With ``x`` the fraction of the current rise or fall climbed, ``value(s) =
    init + (peak - init) * x * a``, where ``a`` is 1 (``triangular``), halves every cycle
    (``triangular2``: ``0.5 ** cycle``, from 0) or is ``gamma ** s`` (``exp_range``). The position
    in the cycle is an exact integer remainder. torch cycles momentum the other way round:
    that is ``cyclic(max_momentum, base_momentum, ...)``.

    >>> from uniopt import schedules
    >>> s = schedules.cyclic(0.0, 1.0, steps_up=2, mode="triangular2")
    >>> [s(k) for k in range(9)]
    [0.0, 0.5, 1.0, 0.5, 0.0, 0.25, 0.5, 0.25, 0.0]
    """

    init: float
    peak: float
    steps_up: int
    steps_down: int | None = None
    mode: Literal["triangular", "triangular2", "exp_range"] = "triangular"
    gamma: float = 1.0

    def __post_init__(self) -> None:
        _check_number("cyclic", "init", self.init)
        _check_number("cyclic", "peak", self.peak)
        _check_count("cyclic", "steps_up", self.steps_up)
        if self.steps_down is not None:
            _check_count("cyclic", "steps_down", self.steps_down)
        _check_choice("cyclic", "mode", self.mode, ("triangular", "triangular2", "exp_range"))
        _check_positive("cyclic", "gamma", self.gamma)
        if self.gamma != 1 and self.mode != "exp_range":
            raise ValueError(
                f"cyclic: gamma applies to mode='exp_range' only, got gamma={self.gamma!r} with "
                f"mode={self.mode!r}"
            )

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        up = self.steps_up
        down = up if self.steps_down is None else self.steps_down
        s = xp.clip(step, 0)
        at = xp.remainder(s, up + down)
        x = xp.where(at <= up, _fraction(xp, at, up), (up + down - at) / down)
        if self.mode == "triangular2":
            x = x * xp.pow(0.5, xp.floor_divide(s, up + down))
        elif self.mode == "exp_range":
            x = x * xp.pow(self.gamma, s)
        return _result(xp, _lerp(xp, self.init, self.peak, x))


@dataclass(frozen=True)
class wsd(_Record):
    """Warmup-stable-decay: ``init`` up to ``peak`` linearly over ``warmup`` updates, ``peak`` for
    ``stable`` more, then down to ``floor`` over ``decay`` updates, then ``floor``.

    With ``t = min(s - warmup - stable, decay) / decay`` in the decay phase, ``value(s) =
    floor + (peak - floor) * f(t)``, ``f`` by ``shape``: ``"1-sqrt"``: ``1 - sqrt(t)``, the
    cooldown Hägele et al. found best (Scaling Laws and Compute-Optimal Training Beyond Fixed
    Training Durations, 2024); ``"linear"``: ``1 - t``; ``"cosine"``: ``(1 + cos(pi t)) / 2``
    (the cooldown of ``cosine``). The schedule is MiniCPM's (Hu et al., 2024); transformers'
    get_wsd_schedule computes the same with ``min_lr_ratio = floor / peak = init / peak``.

    >>> from uniopt import schedules
    >>> s = schedules.wsd(1.0, warmup=2, stable=2, decay=4)
    >>> [s(k) for k in (0, 1, 2, 4, 5, 8, 9)]
    [0.0, 0.5, 1.0, 1.0, 0.5, 0.0, 0.0]
    """

    peak: float
    warmup: int
    stable: int
    decay: int
    floor: float = 0.0
    shape: Literal["1-sqrt", "linear", "cosine"] = "1-sqrt"
    init: float = 0.0

    def __post_init__(self) -> None:
        _check_number("wsd", "peak", self.peak)
        _check_count("wsd", "warmup", self.warmup, allow_zero=True)
        _check_count("wsd", "stable", self.stable, allow_zero=True)
        _check_count("wsd", "decay", self.decay)
        _check_number("wsd", "floor", self.floor)
        _check_choice("wsd", "shape", self.shape, ("1-sqrt", "linear", "cosine"))
        _check_number("wsd", "init", self.init)

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        k = xp.clip(step - self.warmup - self.stable, 0, self.decay)
        # 1 - t, exact near the end (as in polynomial)
        left = _fraction(xp, self.decay - k, self.decay)
        if self.shape == "1-sqrt":
            f = left / (1 + xp.sqrt(k / self.decay))  # 1 - sqrt(t) without its cancellation
        elif self.shape == "linear":
            f = left
        else:
            f = 0.5 * (1 + xp.cos(math.pi * k / self.decay))
        down = _lerp(xp, self.floor, self.peak, f)
        up = _lerp(xp, self.init, self.peak, xp.clip(step, 0) / max(self.warmup, 1))
        return _result(xp, xp.where(step < self.warmup, up, down))


@dataclass(frozen=True)
class inverse_sqrt(_Record):
    """``init / sqrt(1 + s / timescale)``: ``init`` at step 0, then decaying as ``1 / sqrt(s)``.

    After a warm-up, ``warmup(w, inverse_sqrt(peak, timescale=w))`` is ``peak * sqrt(w / s)``
    from step ``w`` on: fairseq's inverse_sqrt and transformers' get_inverse_sqrt_schedule
    (whose ``timescale`` is this one's, by default ``w``).

    >>> from uniopt import schedules
    >>> s = schedules.warmup(4, schedules.inverse_sqrt(1.0, timescale=4))
    >>> [s(k) for k in (0, 2, 4, 16)]
    [0.0, 0.5, 1.0, 0.5]
    """

    init: float
    timescale: float

    def __post_init__(self) -> None:
        _check_number("inverse_sqrt", "init", self.init)
        _check_positive("inverse_sqrt", "timescale", self.timescale)

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        # (a float sum: optax hands its int32 count, which step + an int timescale wrapped
        # near its end, to a NaN)
        scale = float(self.timescale)
        s = xp.clip(step, 0)
        # (1 at step 0 exactly, where init is: under jax.jit a quotient by the timescale is a
        # product with its rounded reciprocal)
        return _result(xp, self.init / xp.sqrt(xp.where(s > 0, (s + scale) / scale, 1.0)))


@dataclass(frozen=True)
class product(_Record):
    """The product of ``factors`` (numbers or schedules) at each step.

    ``value(s) = f_1(s) * f_2(s) * ...``: torch's AdamW decay ``lr(t)*weight_decay`` as one
    schedule, e.g. for Flux's ``couple=false`` form (see :func:`uniopt.translate`).

    >>> from uniopt import schedules
    >>> s = schedules.product(schedules.linear(1.0, 0.0, steps=4), 0.1)
    >>> [round(s(k), 12) for k in range(5)]
    [0.1, 0.075, 0.05, 0.025, 0.0]
    """

    factors: Sequence[Schedule | float]

    def __init__(self, *factors: Schedule | float) -> None:
        if not factors:
            raise ValueError("product: needs at least one factor")
        for f in factors:
            if not callable(f):
                _check_number("product", "each factor", f)
        object.__setattr__(self, "factors", tuple(factors))

    def __repr__(self) -> str:
        return f"product({', '.join(map(repr, self.factors))})"

    float_step: ClassVar[bool] = False  # (the count as given: see warmup's)

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        value: Any = 1.0
        for f in self.factors:
            value = value * (resolve(f, step) if callable(f) else f)
        return _result(xp, value)


@dataclass(frozen=True)
class bias_correction(_Record):
    """``scale * (1 - beta**t) ** power`` at the update ``t = s + 1`` (``s`` updates applied).

    Adam's bias correction as a schedule. keras's "epsilon hat" ``eps_hat`` sits on the
    uncorrected ``sqrt(v)``, which is torch's ``eps`` on the corrected one at the value
    ``bias_correction(b2, -0.5, eps_hat)`` = ``eps_hat / sqrt(1 - b2**t)``.

    >>> from uniopt import schedules
    >>> s = schedules.bias_correction(0.5, power=-1.0, scale=3.0)
    >>> [s(k) for k in range(3)]
    [6.0, 4.0, 3.4285714285714284]
    """

    beta: float
    power: float = 1.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        _check_number("bias_correction", "beta", self.beta)
        if not 0 <= self.beta < 1:
            raise ValueError(f"bias_correction: beta must be in [0, 1), got {self.beta!r}")
        _check_number("bias_correction", "power", self.power)
        _check_number("bias_correction", "scale", self.scale)

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        # (step + 1.0: an int32 count, optax's, at its end wrapped step + 1)
        return _result(xp, self.scale * xp.pow(1.0 - xp.pow(self.beta, step + 1.0), self.power))


def as_schedule(x: Schedule | float) -> Schedule:
    """A number becomes ``constant(x)``; a callable is already a schedule; anything else fails.

    >>> from uniopt import schedules
    >>> schedules.as_schedule(0.1)
    constant(value=0.1)
    >>> schedules.as_schedule(lambda step: 0.5**step)(3)
    0.125
    """
    return _to_schedule("as_schedule", "x", x)


def _to_schedule(owner: str, name: str, x: Schedule | float) -> Schedule:
    """``as_schedule(x)``, its errors naming ``owner``'s field ``name`` (``join: schedules[0]``,
    not the helpers ``as_schedule`` or ``constant`` the caller never wrote)."""
    if callable(x):
        return x
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        _check_number(owner, name, x)
        return constant(x)
    hint = _ARRAY_HINT if hasattr(x, "shape") and hasattr(x, "dtype") else ""
    said = "expected" if owner == "as_schedule" else f"{name} must be"
    raise TypeError(f"{owner}: {said} a number or a callable step -> float, got {x!r}{hint}")
