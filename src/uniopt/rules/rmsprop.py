"""RMSprop (Hinton, 2012) as torch writes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import Elementwise, Rule, Transform
from ..hyper import NONNEG, UNIT, hyper
from ..moments import ema_sq, fma, lerp
from ..transforms.decay import weight_decay
from ..transforms.momentum import trace
from ..transforms.scale import scale_by_lr


class RmsCoeffs(NamedTuple):
    alpha: Any
    one_minus_alpha: Any
    eps: Any
    lr: Any


@dataclass(frozen=True)
class scale_by_rms(Elementwise):
    """``v <- alpha*v + (1-alpha)*u^2``; ``u <- lr*u/(sqrt(v) + eps)`` (eps outside the root;
    ``lr`` 1: the direction alone), rounded as torch's ``addcdiv``: ``(lr*u)/den``."""

    alpha: Any = hyper(0.99, UNIT)
    eps: Any = hyper(1e-8, NONNEG)
    lr: Any = hyper(1.0, NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("square_avg",)

    def coeffs(self, step: int) -> RmsCoeffs:
        return RmsCoeffs(alpha=self.alpha, one_minus_alpha=self.one_minus("alpha"), eps=self.eps,
                         lr=self.lr)

    @staticmethod
    def kernel(xp, c, p, u, square_avg):
        square_avg = ema_sq(square_avg, u, c.alpha, c.one_minus_alpha)
        return (c.lr * u) / (xp.sqrt(square_avg) + c.eps), square_avg


@dataclass(frozen=True)
class scale_by_centered_rms(scale_by_rms):
    """As :class:`scale_by_rms` with the variance ``v - gbar^2``, ``gbar`` the mean of ``u``."""

    slots: ClassVar[tuple[str, ...]] = ("square_avg", "grad_avg")

    @staticmethod
    def kernel(xp, c, p, u, square_avg, grad_avg):
        square_avg = ema_sq(square_avg, u, c.alpha, c.one_minus_alpha)
        grad_avg = lerp(grad_avg, u, c.one_minus_alpha)
        # torch's square_avg.addcmul(grad_avg, grad_avg, value=-1): one fused multiply-add
        den = xp.sqrt(fma(-grad_avg, grad_avg, square_avg)) + c.eps
        return (c.lr * u) / den, square_avg, grad_avg


@dataclass(frozen=True)
class rmsprop(Rule):
    """RMSprop (Hinton, 2012) as torch writes it: eps outside the square root.

    ``g <- g + weight_decay*p``; ``v <- alpha*v + (1-alpha)*g^2``; ``d = g/(sqrt(v) + eps)``
    (centered: ``sqrt(v - gbar^2)``); with momentum ``b <- momentum*b + d``, ``d <- b``;
    ``p <- p - lr*d``. TensorFlow/keras/optax put eps inside the root (see the README's
    conventions table).
    """

    lr: Any = hyper(1e-2, NONNEG)
    alpha: Any = hyper(0.99, UNIT)
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    momentum: Any = hyper(0.0, NONNEG)
    centered: bool = False

    optional: ClassVar[tuple[str, ...]] = ("weight_decay", "momentum")

    def parts(self) -> tuple[Transform, ...]:
        rms = scale_by_centered_rms if self.centered else scale_by_rms
        decay = [weight_decay(wd=self.weight_decay)] if self.on("weight_decay") else []
        if not self.on("momentum"):  # torch's p.addcdiv_(g, den, value=-lr)
            return (*decay, rms(alpha=self.alpha, eps=self.eps, lr=self.lr))
        return (*decay, rms(alpha=self.alpha, eps=self.eps), trace(momentum=self.momentum),
                scale_by_lr(lr=self.lr))
