"""Stochastic gradient descent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import Rule, Transform
from ..hyper import NONNEG, UNIT, hyper
from ..transforms.decay import weight_decay
from ..transforms.momentum import check_nesterov, trace
from ..transforms.scale import scale_by_lr


@dataclass(frozen=True)
class sgd(Rule):
    """Stochastic gradient descent with torch's momentum, dampening and Nesterov.

    ``g <- g + weight_decay*p``; with momentum ``b <- momentum*b + (1-dampening)*g`` (``b = g``
    on the first update) and ``g <- b`` (Nesterov: ``g + momentum*b``); ``p <- p - lr*g``.
    The momentum buffer exists only if ``momentum`` is non-zero or a schedule at set-up.

    >>> import numpy as np, uniopt as uo
    >>> p = {"w": np.array([1.0, -2.0])}
    >>> state = uo.setup(uo.sgd(lr=0.1, momentum=0.9), p)
    >>> state, p = uo.update(state, p, {"w": np.array([1.0, 1.0])})
    >>> p["w"]
    array([ 0.9, -2.1])
    """

    lr: Any = hyper(1e-3, NONNEG)
    momentum: Any = hyper(0.0, NONNEG)
    dampening: Any = hyper(0.0, UNIT)
    weight_decay: Any = hyper(0.0, NONNEG)
    nesterov: bool = False

    optional: ClassVar[tuple[str, ...]] = ("weight_decay", "momentum")

    def check(self) -> None:
        check_nesterov(self.name, self.nesterov, self.momentum, self.dampening)

    def parts(self) -> tuple[Transform, ...]:
        return (
            *([weight_decay(wd=self.weight_decay)] if self.on("weight_decay") else []),
            *([trace(momentum=self.momentum, dampening=self.dampening, nesterov=self.nesterov)]
              if self.on("momentum") else []),
            scale_by_lr(lr=self.lr),
        )
