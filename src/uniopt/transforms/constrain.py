"""optax's small constraints and period blocks: parameters kept non-negative, NaNs in the
update zeroed, updates summed and applied every ``k`` steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..backend import namespace
from ..base import Elementwise
from ..hyper import check_integer
from ..moments import select
from .scale import NoCoefficients


@dataclass(frozen=True)
class keep_params_nonnegative(Elementwise):
    """``u <- p`` where ``p - u < 0``: the step lands on 0 instead of below it (optax's
    ``keep_params_nonnegative``, last in its chain). A parameter already negative is moved to 0.

    >>> import numpy as np, uniopt as uo
    >>> rule = uo.chain(uo.sgd(lr=1.0), uo.keep_params_nonnegative())
    >>> uo.update(uo.setup(rule, [np.array([1.0, 1.0])]), [np.array([1.0, 1.0])],
    ...           [np.array([0.5, 3.0])])[1]
    [array([0.5, 0. ])]
    """

    real_only: ClassVar[bool] = True
    uses_params: ClassVar[bool] = True
    reads_step: ClassVar[bool] = True

    def steady(self) -> int | None:
        return 0

    def coeffs(self, step: Any) -> NoCoefficients:
        return NoCoefficients()

    @staticmethod
    def kernel(xp, c, p, u):
        return (select(xp, p - u < 0, p, u),)


class Zero(NamedTuple):
    zero: Any


@dataclass(frozen=True)
class zero_nans(Elementwise):
    """``u <- 0`` where ``u`` is NaN, element by element (optax's ``zero_nans``, whose state
    also records, leaf by leaf, whether the last update held a NaN: this block keeps none).
    Infinities are kept; :func:`~uniopt.skip_nonfinite` skips a whole step instead. Real
    params only: optax zeroes a complex number with a NaN part whole, where a part taking
    complex numbers as pairs of reals would zero that part alone."""

    real_only: ClassVar[bool] = True

    def steady(self) -> int | None:
        return 0

    def coeffs(self, step: Any) -> Zero:
        return Zero(zero=0.0)

    @staticmethod
    def kernel(xp, c, p, u):
        return (select(xp, u != u, c.zero, u),)


class Every(NamedTuple):
    keep: Any  # 1 where the sum goes on (not the first step of a period), else 0
    emit: Any  # 1 at the last step of a period, else 0


@dataclass(frozen=True)
class apply_every(Elementwise):
    """The updates summed over ``k`` steps and applied at the last of them, 0 at the others
    (optax's ``apply_every``: ``a <- keep*a + u``, ``u <- emit*a``, in its products, so an
    infinite sum makes the next period's first step NaN as optax's does). Gradient
    accumulation *before* a rule is :func:`~uniopt.accumulate` (optax's ``MultiSteps``); this
    block sums what the rule before it makes. The period follows the state's step count."""

    k: int = 1
    slots: ClassVar[tuple[str, ...]] = ("grad_acc",)

    def check(self) -> None:
        object.__setattr__(self, "k", check_integer(self.name, "k", self.k, 1))

    def coeffs(self, step: Any) -> Every:
        at = step % self.k
        if isinstance(at, int):
            return Every(keep=float(at != 0), emit=float(at == self.k - 1))
        xp = namespace(at)  # a traced count, under jax.jit
        return Every(keep=xp.where(at != 0, 1.0, 0.0), emit=xp.where(at == self.k - 1, 1.0, 0.0))

    @staticmethod
    def kernel(xp, c, p, u, acc):
        acc = c.keep * acc + u
        return c.emit * acc, acc
