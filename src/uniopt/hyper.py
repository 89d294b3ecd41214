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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Interval:
    """The valid range of a hyperparameter; ``None`` means unbounded on that side."""

    lo: float | None = 0.0
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    # whole numbers only (a count): :func:`check_integer` checks them
    integer: bool = False

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
POSITIVE = Interval(lo_open=True)
UNIT_OPEN = Interval(0.0, 1.0, hi_open=True)  # betas, momentum-like decays: 1 would never forget
UNIT = Interval(0.0, 1.0)


def hyper(default: Any = dataclasses.MISSING, valid: Interval = NONNEG) -> Any:
    """A dataclass field that is a hyperparameter (a number or a schedule) with a valid range."""
    return dataclasses.field(default=default, metadata={"hyper": valid})


SCALAR_DTYPES = ("float64", "float32")


def did_you_mean(name: str, known: Any) -> str:
    """``"; did you mean 'x'?"`` with the names of ``known`` closest to a misspelled ``name``,
    or ``""``: every message that refuses an unknown name ends so."""
    import difflib

    near = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(map(repr, near))}?" if near else ""


def with_article(word: str) -> str:
    """``word`` after its indefinite article: "an int", "a float"."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def round_scalar(x: Any, dtype: str) -> Any:
    """A host number as torch keeps it in a 0-d tensor of ``dtype`` (its default dtype: float32
    unless set to float64), read back as a Python float; a traced number as it is."""
    if dtype == "float32" and isinstance(x, float):
        return float(np.float32(x))
    return x


def check_scalar_dtype(owner: str, dtype: Any) -> None:
    if dtype not in SCALAR_DTYPES:
        raise ValueError(f"{owner}: scalar_dtype must be one of "
                         f"{', '.join(map(repr, SCALAR_DTYPES))}, got {dtype!r}")


def static(default: Any, valid: Interval) -> Any:
    """A dataclass field that is a fixed number (not schedulable), e.g. an initial value."""
    return dataclasses.field(default=default, metadata={"static": valid})


# a hyperparameter's place in its record: the field's name, or (name, index) in a tuple (betas)
Key = str | tuple[str, int]


@dataclass(frozen=True)
class Complemented:
    """A number that came out of a JAX state, with ``1 - value`` as the host computed it.

    Under ``jax.jit`` without x64 a hyperparameter is a float32 tracer, where ``1 - 0.999``
    keeps two digits; the complement computed in double before the number went in travels
    beside it. Pairs exist only between a rule rebuilt from a JAX state and the parts it makes
    (:meth:`uniopt.Transform.at` takes them apart): a rule's ``parts()`` passes its numbers
    through untouched, so each part receives the pair of the value it was given."""

    value: Any
    one_minus: Any
    # known not to be 0 (HostFacts.nonzero)
    nonzero: bool = False


@dataclass(frozen=True)
class HostFacts:
    """What the host knew of a record's numbers when they went into a JAX state: each number's
    complement ``1 - x`` in double precision, which optional blocks exist (inside ``jax.jit`` a
    traced value cannot be compared with 0), and which numbers of a resolved record are known
    not to be 0 (:meth:`uniopt.Transform.nonzero`)."""

    complements: Mapping[Key, Any]
    on: frozenset[str] | None = None
    # numbers (by field name) that drive an optional block the host kept for a value it saw
    # was not 0: a jitted step is compiled for the block, so the value stays non-zero there
    # (an adjust to 0 is a new skeleton, a new compilation)
    nonzero: frozenset[str] = frozenset()


class DeviceNumber:
    """A hyperparameter of a state that came out of ``jax.jit``: element ``index`` of the one
    array that carries all of the state's numbers (and their complements) through the jitted
    step. Nothing is read from the device until the number is used on the host (``float(x)``,
    an eager step, :func:`uniopt.adjust`); the next jitted step takes the array as it is."""

    __slots__ = ("array", "index")

    def __init__(self, array: Any, index: int) -> None:
        self.array, self.index = array, index

    def read(self) -> Any:
        """The number, as a 0-d array of the array's library (one device operation)."""
        return self.array[self.index]

    def __float__(self) -> float:
        return float(self.read())

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        return np.asarray(self.read(), dtype=dtype)

    def __jax_array__(self) -> Any:
        return self.read()

    def __repr__(self) -> str:
        try:
            return repr(float(self))
        except Exception:  # a state mapped to other leaves (None, ShapeDtypeStruct) holds none
            return f"{type(self.array).__name__}[{self.index}]"


def on_host(x: Any) -> Any:
    """``x``, with a :class:`DeviceNumber` replaced by its value."""
    return x.read() if isinstance(x, DeviceNumber) else x


def unpaired(x: Any) -> Any:
    """``x``, or the number of a :class:`Complemented` pair (a rule rebuilt from a JAX state
    holds its numbers so): for what takes the number alone, a slot's first value."""
    return x.value if isinstance(x, Complemented) else x


def has_schedule(v: Any) -> bool:
    """Whether hyperparameter value ``v`` (a number, a schedule or a tuple of them) schedules."""
    return any(callable(x) for x in v) if isinstance(v, tuple) else callable(v)


def _traced(value: object) -> bool:
    """Whether ``value`` is a JAX tracer (a hyperparameter computed inside ``jax.jit``)."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(value, jax.core.Tracer)


def _jax_array(value: object) -> bool:
    """Whether ``value`` is a JAX array, concrete or traced."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(value, jax.Array)


def plain_number(value: Any) -> Any:
    """``value``, or the Python number a 0-d NumPy/torch/JAX number (not a traced one) holds."""
    # (by the dtype's name: torch's "torch.float32" and bfloat16 are no NumPy dtypes)
    if getattr(value, "shape", None) == () and not _traced(value) and str(
            getattr(value, "dtype", "")).rsplit(".", 1)[-1].startswith(
            ("float", "bfloat", "int", "uint")):
        return value.item()
    return value


def check(owner: str, name: str, value: object, valid: Interval, where: str = "",
          schedulable: bool = True) -> float:
    """``value`` as a Python float, or a TypeError/ValueError naming ``owner``, ``name``, the
    value and ``where`` it came from.

    Python floats keep float32 arrays float32 where a NumPy float64 scalar would promote them,
    so every number is normalised here, once."""
    if valid.integer and not _traced(value):  # (a traced one is fixed at set-up: the engine's)
        below = None if valid.hi is None else int(valid.hi) + (not valid.hi_open)
        return check_integer(owner, name, value, int(valid.lo or 0) + valid.lo_open, below,
                             schedulable)
    # (a Python float, a schedule's or a param group's value, needs none of this)
    if type(value) is not float:
        if _traced(value):
            # a number computed inside jax.jit (a schedule's, or the state's): its value is
            # not known here, its shape and dtype are (an array of lr broadcast silently, even
            # into the params' shape)
            kind, shape = getattr(value, "dtype", None), getattr(value, "shape", None)
            if shape != () or kind is None or (kind.kind not in "fiu"
                                               and "float" not in str(kind)):
                raise TypeError(f"{owner}: {name} must be a number or a schedule, got a traced "
                                f"array of shape {shape} and dtype {kind}{where}")
            return value  # type: ignore[return-value]
        if isinstance(value, (Complemented, DeviceNumber)):
            # from a JAX state: checked before it went in
            return value  # type: ignore[return-value]
        if (getattr(value, "numel", lambda: 0)() == 1 and carries_derivative(value)
                and getattr(value, "is_floating_point", lambda: False)()):
            # a torch tensor that a differentiable step differentiates with respect to (a learned
            # lr) or that vmap sweeps: kept as it is, checked by its value where it has one (its
            # value without the graph: float() of the tensor itself warns; vmap's has none)
            try:
                number = float(value.detach())  # type: ignore[attr-defined]
            except RuntimeError:
                return value  # type: ignore[return-value]
            check(owner, name, number, valid, where)
            return value  # type: ignore[return-value]
        value = plain_number(value)
        if callable(value) and not schedulable:
            raise TypeError(f"{owner}: {name} must be a number, not a schedule (it takes none), "
                            f"got {value!r}{where}")
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            kinds = "a number or a schedule" if schedulable else "a number"
            raise TypeError(f"{owner}: {name} must be {kinds}, got {value!r}{where}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{owner}: {name} must be finite, got {value!r}{where}")
    if x not in valid:
        raise ValueError(f"{owner}: {name} must be {valid}, got {value!r}{where}")
    return x


def carries_derivative(x: Any) -> bool:
    """Whether ``x`` is a torch tensor that differentiation follows: reverse mode's
    ``requires_grad``, a torch.func transform's wrapper (grad, jvp, vmap) or forward mode's
    dual (``torch.autograd.forward_ad``). A hyperparameter that is one stays a tensor: as a
    number its derivative would be lost (0, silently)."""
    if getattr(x, "requires_grad", False):
        return True
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(x, torch.Tensor):
        return False
    functorch = getattr(torch._C, "_functorch", None)
    if functorch is not None and functorch.is_functorch_wrapped_tensor(x):
        return True
    forward = sys.modules.get("torch.autograd.forward_ad")
    return (forward is not None and forward._current_level >= 0
            and forward.unpack_dual(x).tangent is not None)


def check_real(owner: str, name: str, value: object, valid: Interval, none: str | None = None,
               schedulable: bool = False, why: str = "") -> Any:
    """A field of one number that is no hyperparameter (read at set-up, or one whose None means
    something): ``value`` as a Python float in ``valid``, or a TypeError/ValueError naming
    ``owner``, ``name`` and the value. ``none``: None is taken, and the words say what it stands
    for; ``schedulable``: a schedule is taken as it is; ``why``: the range's reason.

    Any real number is taken, as :func:`check` takes a hyperparameter: a NumPy scalar, a 0-d
    array (optax.inject_hyperparams hands every number back as one), not a bool or a string."""
    if (value is None and none is not None) or (schedulable and callable(value)) \
            or _traced(value):  # (a traced one is fixed at set-up: the engine's)
        return value
    value = plain_number(value)
    error: type[Exception] | None = None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        error = TypeError
    else:
        x = float(value)
        if math.isfinite(x) and x in valid:
            return x
        error = ValueError
    # (the message only when it raises: a rule's check runs at every scheduled step)
    kinds = [f"a number {valid}{why}"]
    if none is not None:
        kinds.insert(0, "None" + (f" ({none})" if none else ""))
    if schedulable:
        kinds.append("a schedule")
    what = ", ".join(kinds[:-1]) + " or " + kinds[-1] if len(kinds) > 1 else kinds[0]
    if callable(value):  # (as check's and check_integer's words)
        raise TypeError(f"{owner}: {name} must be {what}, not a schedule (it takes none), got "
                        f"{value!r}")
    raise error(f"{owner}: {name} must be {what}, got {value!r}")


def check_integer(owner: str, name: str, value: object, least: int = 0,
                  below: int | None = None, schedulable: bool = False) -> Any:
    """``value`` as a Python int in ``[least, below)`` (a schedule as it is, where
    ``schedulable``), or a TypeError/ValueError naming ``owner``, ``name`` and the value.

    Any ``numbers.Integral``, or a 0-d integer array, is taken (returned as the int it equals,
    so a record keeps one type whatever it was given); a bool or a float is refused, even a
    whole one (a count of 5.0 is a slip somewhere upstream)."""
    if type(value) is int and not (value < least or (below is not None and value >= below)):
        return value  # (the common case, checked at every step of a scheduled rule)

    def kinds() -> str:
        if below is None:
            valid = f">= {least}"
        else:  # (a seed's bound reads better as 2**32 than as its ten digits)
            top = f"2**{below.bit_length() - 1}" if below > 1 << 16 and not below & (
                below - 1) else str(below)
            valid = f"in [{least}, {top})"
        return f"an integer {valid}" + (" or a schedule" if schedulable else "")

    if callable(value):
        if schedulable:
            return value
        raise TypeError(f"{owner}: {name} must be {kinds()}, not a schedule (it takes none), "
                        f"got {value!r}")
    if (getattr(value, "shape", None) == () and "int" in str(getattr(value, "dtype", ""))
            and not _traced(value)):
        value = value.item()  # type: ignore[attr-defined]  # a 0-d NumPy/torch/JAX integer
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be {kinds()}, got {value!r}")
    n = int(value)
    if n < least or (below is not None and n >= below):
        raise ValueError(f"{owner}: {name} must be {kinds()}, got {value!r}")
    return n


def resolve(h: Any, step: int) -> Any:
    """The value of hyperparameter ``h`` for the update that follows ``step`` applied updates.

    Numbers pass through; schedules are called with ``step``; tuples (``betas``) resolve
    element-wise. This is the only place a schedule is ever evaluated.
    """
    if isinstance(h, tuple):
        return tuple(resolve(x, step) for x in h)
    if callable(h):
        # uniopt's schedules take a JAX step as the default float; any other callable gets the
        # count as optax hands it, an integer (a table indexed by it, ``count % 3``, the parity
        # of steps past 2**24 that float32 cannot tell apart)
        return h(_float_step(step) if getattr(h, "float_step", False) else step)
    return h


def _float_step(step: Any) -> Any:
    """A JAX step (an int32 array in the state) as the default float, for uniopt's schedules:
    their arithmetic on the integer would be float32 even under x64 (a linear schedule 3e-7
    off, an exponential 3e-6); a host step stays the Python int it is, exact in any
    arithmetic."""
    if isinstance(step, int) or not _jax_array(step):
        return step
    import jax.numpy as jnp

    return step.astype(jnp.result_type(float)) if jnp.issubdtype(step.dtype, jnp.integer) \
        else step
