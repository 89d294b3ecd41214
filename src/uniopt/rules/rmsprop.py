from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import Elementwise, Rule, ema_sq, lerp
from ..hyper import NONNEG, UNIT, hyper
from ..transforms import scale_by_lr, trace, weight_decay


@dataclass(frozen=True)
class scale_by_rms(Elementwise):
    """``v <- alpha*v + (1-alpha)*u^2``; ``u <- u/(sqrt(v) + eps)`` (eps outside the root)."""

    alpha: Any = hyper(0.99, UNIT)
    eps: Any = hyper(1e-8, NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("square_avg",)

    def coeffs(self, step: int) -> tuple[float, ...]:
        return (self.alpha, self.one_minus("alpha"), self.eps)

    @staticmethod
    def kernel(xp, c, p, u, v):
        v = ema_sq(v, u, c[0], c[1])
        return u / (xp.sqrt(v) + c[2]), v


@dataclass(frozen=True)
class scale_by_centered_rms(scale_by_rms):
    """As :class:`scale_by_rms` with the variance ``v - gbar^2``, ``gbar`` the mean of ``u``."""

    slots: ClassVar[tuple[str, ...]] = ("square_avg", "grad_avg")

    @staticmethod
    def kernel(xp, c, p, u, v, gbar):
        v = ema_sq(v, u, c[0], c[1])
        gbar = lerp(gbar, u, c[1])
        return u / (xp.sqrt(v - gbar * gbar) + c[2]), v, gbar


@dataclass(frozen=True)
class rmsprop(Rule):
    """RMSprop (Hinton, 2012) as torch writes it: eps outside the square root.

    ``g <- g + weight_decay*p``; ``v <- alpha*v + (1-alpha)*g^2``; ``d = g/(sqrt(v) + eps)``
    (centered: ``sqrt(v - gbar^2)``); with momentum ``b <- momentum*b + d``, ``d <- b``;
    ``p <- p - lr*d``. TensorFlow/keras/optax put eps inside the root; see CONVENTIONS.
    """

    lr: Any = hyper(1e-2, NONNEG)
    alpha: Any = hyper(0.99, UNIT)
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    momentum: Any = hyper(0.0, NONNEG)
    centered: bool = False

    optional: ClassVar[tuple[str, ...]] = ("weight_decay", "momentum")

    def parts(self) -> tuple[Elementwise, ...]:
        rms = scale_by_centered_rms if self.centered else scale_by_rms
        return (
            *([weight_decay(self.weight_decay)] if self.on("weight_decay") else []),
            rms(self.alpha, self.eps),
            *([trace(self.momentum)] if self.on("momentum") else []),
            scale_by_lr(self.lr),
        )
