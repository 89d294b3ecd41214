from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import Elementwise, Rule, ema_sq
from ..hyper import NONNEG, UNIT, hyper
from ..transforms import scale_by_lr, weight_decay


@dataclass(frozen=True)
class scale_by_adadelta(Elementwise):
    """``v <- rho*v + (1-rho)*u^2``; ``d = sqrt(a + eps)/sqrt(v + eps) * u``;
    ``a <- rho*a + (1-rho)*d^2``; ``u <- d``."""

    rho: Any = hyper(0.9, UNIT)
    eps: Any = hyper(1e-6, NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("square_avg", "acc_delta")

    def coeffs(self, step: int) -> tuple[float, ...]:
        return (self.rho, self.one_minus("rho"), self.eps)

    @staticmethod
    def kernel(xp, c, p, u, v, a):
        v = ema_sq(v, u, c[0], c[1])
        d = xp.sqrt(a + c[2]) / xp.sqrt(v + c[2]) * u
        return d, v, ema_sq(a, d, c[0], c[1])


@dataclass(frozen=True)
class adadelta(Rule):
    """Adadelta (Zeiler, 2012) with torch's learning rate: ``p <- p - lr*d``.

    ``d`` as in :class:`scale_by_adadelta`, after ``g <- g + weight_decay*p``. The default
    ``lr=1.0`` is the paper's (and descends: optax 0.2.8's default does not; see CONVENTIONS).
    """

    lr: Any = hyper(1.0, NONNEG)
    rho: Any = hyper(0.9, UNIT)
    eps: Any = hyper(1e-6, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    def parts(self) -> tuple[Elementwise, ...]:
        return (
            *([weight_decay(self.weight_decay)] if self.on("weight_decay") else []),
            scale_by_adadelta(self.rho, self.eps),
            scale_by_lr(self.lr),
        )
