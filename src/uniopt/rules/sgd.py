from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import Elementwise, Rule
from ..hyper import NONNEG, UNIT, hyper
from ..transforms import scale_by_lr, trace, weight_decay


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

    def check(self) -> None:
        if self.nesterov and not callable(self.momentum) and not callable(self.dampening) and (
            self.momentum <= 0 or self.dampening != 0
        ):
            raise ValueError(
                "sgd: nesterov=True requires momentum > 0 and dampening = 0, "
                f"got momentum={self.momentum!r}, dampening={self.dampening!r}"
            )

    optional: ClassVar[tuple[str, ...]] = ("weight_decay", "momentum")

    def parts(self) -> tuple[Elementwise, ...]:
        return (
            *([weight_decay(self.weight_decay)] if self.on("weight_decay") else []),
            *([trace(self.momentum, self.dampening, self.nesterov)] if self.on("momentum") else []),
            scale_by_lr(self.lr),
        )
