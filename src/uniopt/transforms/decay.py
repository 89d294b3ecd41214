"""Weight decay: adding the parameter to the update."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from ..base import Elementwise, Transform
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

    def steady(self) -> int | None:
        return 0

    def coeffs(self, step: int) -> Decay:
        return Decay(wd=self.wd)

    @staticmethod
    def kernel(xp, c, p, u):  # torch's grad.add(param, alpha=wd): one fused multiply-add
        return (fma(c.wd, p, u),)


@dataclass(frozen=True)
class sign_decay(Elementwise):
    """``u <- u + wd * sign(p)``: L1 regularisation's subgradient, ``wd * sum(|p|)`` added to
    the loss (Optimisers.jl's ``SignDecay(λ)``, whose default λ is 1e-3). ``sign(0) = 0``.

    >>> import numpy as np, uniopt as uo
    >>> p = [np.array([2.0, 0.0, -0.5])]
    >>> uo.update(uo.setup(uo.sign_decay(0.1), p), p, [np.zeros(3)])[1]
    [array([ 1.9,  0. , -0.4])]
    """

    real_only = True

    wd: Any = hyper(0.0, NONNEG)
    uses_params = True

    def steady(self) -> int | None:
        return 0

    def coeffs(self, step: int) -> Decay:
        return Decay(wd=self.wd)

    @staticmethod
    def kernel(xp, c, p, u):
        return (u + c.wd * xp.sign(p),)


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

    def steady(self) -> int | None:
        return 0

    def coeffs(self, step: int) -> LrDecay:
        lr_wd = self.lr * self.wd
        return LrDecay(lr_wd=lr_wd, keep=1.0 - lr_wd)

    @staticmethod
    def kernel(xp, c, p, u):
        return (fma(c.lr_wd, p, u),)

    @staticmethod
    def finish(xp, c, p, u):  # last: torch's order, the decay first, then the block's step
        return p * c.keep - u


DECAY_FORMS = ("l2", "decoupled")


def check_decay_form(owner: str, form: Any) -> None:
    if form not in DECAY_FORMS:
        raise ValueError(f"{owner}: decay_form must be one of "
                         f"{', '.join(map(repr, DECAY_FORMS))}, got {form!r}")


def decayed(steps: tuple[Transform, ...], lr: Any, wd: Any, form: str, on: bool) -> tuple[
        Transform, ...]:
    """A rule's ``steps`` with its weight decay: ``form="l2"``, torch's ``g <- g + wd*p`` before
    them; ``"decoupled"``, keras 3's ``p <- p - p*wd*lr`` before the step (every keras
    optimizer's ``_apply_weight_decay``, at the step's lr), written as
    :class:`decoupled_weight_decay` last: ``p*(1 - lr*wd) - u``, the same up to rounding, since
    the step does not read ``p``."""
    if not on:
        return steps
    if form == "decoupled":
        return (*steps, decoupled_weight_decay(lr=lr, wd=wd))
    return (weight_decay(wd=wd), *steps)
