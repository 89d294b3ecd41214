"""Weight decay: adding the parameter to the update."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from ..base import Elementwise
from ..hyper import NONNEG, hyper
from ..moments import fma


class Decay(NamedTuple):
    wd: Any


@dataclass(frozen=True)
class weight_decay(Elementwise):
    """``u <- u + wd * p``.

    At the head of a chain this is L2 regularisation, the same as adding ``wd/2 * sum(p**2)``
    to the loss: ``chain(weight_decay(wd), adam())`` is torch's ``Adam(weight_decay=wd)``, whose
    decay passes through the moments. Placed after a rule, it is decoupled decay scaled by what
    follows it: ``chain(adam(lr), weight_decay(wd))`` is Flux's ``p <- p - lr*A - wd*p``.
    """

    wd: Any = hyper(0.0, NONNEG)
    uses_params = True

    def coeffs(self, step: int) -> Decay:
        return Decay(wd=self.wd)

    @staticmethod
    def kernel(xp, c, p, u):  # torch's grad.add(param, alpha=wd): one fused multiply-add
        return (fma(c.wd, p, u),)


class LrDecay(NamedTuple):
    lr_wd: Any  # lr*wd, in double on the host
    keep: Any  # 1 - lr*wd, likewise: torch's p.mul_(1 - lr*wd)


@dataclass(frozen=True)
class decoupled_weight_decay(Elementwise):
    """``u <- u + lr*wd * p``: torch's decoupled decay ``p <- p*(1 - lr*wd)`` beside a block
    that applies the learning rate itself (NAdamW, RAdamW); ``lr`` and ``wd`` may be schedules."""

    lr: Any = hyper(1e-3, NONNEG)
    wd: Any = hyper(0.0, NONNEG)
    uses_params = True

    def coeffs(self, step: int) -> LrDecay:
        lr_wd = self.lr * self.wd
        return LrDecay(lr_wd=lr_wd, keep=1.0 - lr_wd)

    @staticmethod
    def kernel(xp, c, p, u):
        return (fma(c.lr_wd, p, u),)

    @staticmethod
    def finish(xp, c, p, u):  # last: torch's order, the decay first, then the block's step
        return p * c.keep - u
