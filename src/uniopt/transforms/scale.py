"""Multiplying the update by a number: a factor, a learning rate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import Elementwise
from ..hyper import NONNEG, Interval, hyper


class Factor(NamedTuple):
    factor: Any


def scale_kernel(xp, c, p, u):
    return (c.factor * u,)


@dataclass(frozen=True)
class scale(Elementwise):
    """``u <- factor * u``. ``scale(lr)`` ends most optimizers; ``factor`` may be a schedule.

    >>> import numpy as np, uniopt as uo
    >>> uo.update(uo.setup(uo.scale(0.5), [np.ones(2)]), [np.ones(2)], [np.ones(2)])[1]
    [array([0.5, 0.5])]
    """

    factor: Any = hyper(1.0, Interval(None))

    def coeffs(self, step: int) -> Factor:
        return Factor(factor=self.factor)

    kernel = staticmethod(scale_kernel)


@dataclass(frozen=True)
class scale_by_lr(Elementwise):
    """``u <- lr * u``: :class:`scale` for a learning rate, which must not be negative."""

    lr: Any = hyper(1e-3, NONNEG)
    makes_step: ClassVar[bool] = True

    def coeffs(self, step: int) -> Factor:
        return Factor(factor=self.lr)

    kernel = staticmethod(scale_kernel)
