"""Sophia (Liu et al., 2023): a clipped, diagonally preconditioned momentum step.

Sophia divides its momentum by an EMA of a Hessian-diagonal estimate refreshed every few
steps. uniopt never differentiates (gradients come from anywhere), so the estimate is an input:
:func:`sophia_hessian` folds one into the state, computed by whatever the user differentiates
with. Sophia-H's is Hutchinson's ``r * (H r)`` for a random sign vector ``r`` (optax's
``hutchinson_estimator_diag_hessian``: ``jax.jvp(jax.grad(loss), (params,), (r,))``; torch's
``torch.func.jvp``); Sophia-G's is the Gauss-Newton-Bartlett estimate from sampled labels.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import Elementwise, Info, Rule, Transform
from ..hyper import NONNEG, UNIT_OPEN, Interval, hyper
from ..moments import bias_correction, lerp
from ..state import State
from ..transforms.decay import decayed
from ..transforms.scale import scale_by_lr
from ..tree import flatten


class SophiaCoeffs(NamedTuple):
    one_minus_b1: Any
    bc1: Any  # 1 - b1^t
    gamma: Any
    eps: Any
    clip: Any
    neg_clip: Any


@dataclass(frozen=True)
class scale_by_sophia(Elementwise):
    """Sophia's direction: ``m <- b1*m + (1-b1)*u``;
    ``u <- clip((m/(1-b1^t))/max(gamma*h, eps), -clip_threshold, clip_threshold)``, ``h`` the
    EMA of Hessian-diagonal estimates (slot ``hessian``, fed by :func:`sophia_hessian`;
    ``b2`` is its decay there). ``use_clipping=False``: no clipping (optax's
    ``clip_threshold=None``)."""

    b1: Any = hyper(0.965, UNIT_OPEN)
    b2: Any = hyper(0.99, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    gamma: Any = hyper(0.01, NONNEG)
    clip_threshold: Any = hyper(1.0, Interval(0.0, None, lo_open=True))
    use_clipping: bool = True
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "hessian")

    def coeffs(self, step: Any) -> SophiaCoeffs:
        c1 = self.one_minus("b1")
        bound = self.clip_threshold if self.use_clipping else math.inf
        return SophiaCoeffs(one_minus_b1=c1, bc1=bias_correction(self.b1, c1, step),
                            gamma=self.gamma, eps=self.eps, clip=bound, neg_clip=-bound)

    @staticmethod
    def kernel(xp, c, p, u, exp_avg, hessian):
        m = lerp(exp_avg, u, c.one_minus_b1)
        r = (m / c.bc1) / xp.maximum(c.gamma * hessian, c.eps)
        return xp.minimum(xp.maximum(r, c.neg_clip), c.clip), m, hessian


@dataclass(frozen=True)
class sophia(Rule):
    """Sophia (Liu et al., 2023) as ``optax.contrib.sophia`` writes it.

    ``m <- b1*m + (1-b1)*g``; ``p <- p - lr*(clip(m_hat/max(gamma*h, eps), c) + wd*p)``, with
    ``h <- b2*h + (1-b2)*d`` folded in by :func:`sophia_hessian` from an estimate ``d`` of the
    Hessian's diagonal, every ``k`` steps (optax's ``update_interval``, default 10: at the
    updates numbered 0, k, 2k, ..., after that update, from ``d`` computed at the params it
    started from). ``h`` starts at 0, so until the first estimate the step is
    ``lr*clip(m_hat/eps)``: a sign step where clipped.

    ``use_clipping=False`` is optax's ``clip_threshold=None``. Defaults are optax's
    (weight_decay 1e-4); optax requires a learning rate, ours is 1e-3. optax's ``verbose`` win
    rate is not offered.

    >>> import numpy as np, uniopt as uo
    >>> p = {"w": np.array([1.0, -2.0])}
    >>> state = uo.setup(uo.sophia(lr=0.1, weight_decay=0.0), p)
    >>> d = {"w": np.array([4.0, 100.0])}  # a Hessian-diagonal estimate at p
    >>> state, p = uo.update(state, p, {"w": np.array([2.0, -4.0])})
    >>> state = uo.sophia_hessian(state, d)
    >>> p["w"]  # h was 0: the first step is clipped to lr per coordinate
    array([ 0.9, -1.9])
    """

    lr: Any = hyper(1e-3, NONNEG)
    b1: Any = hyper(0.965, UNIT_OPEN)
    b2: Any = hyper(0.99, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(1e-4, NONNEG)
    gamma: Any = hyper(0.01, NONNEG)
    clip_threshold: Any = hyper(1.0, Interval(0.0, None, lo_open=True))
    use_clipping: bool = True

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="second-order",
        paper="Liu et al. (2023)",
        references=("optax.contrib.sophia",),
        # the generic problems feed no Hessian estimate: h stays 0, a clipped sign step
        example={"lr": 0.005, "weight_decay": 0.0},
        budget=1000,
    )

    def parts(self) -> tuple[Transform, ...]:
        direction = scale_by_sophia(b1=self.b1, b2=self.b2, eps=self.eps, gamma=self.gamma,
                                    clip_threshold=self.clip_threshold,
                                    use_clipping=self.use_clipping)
        return decayed((direction, scale_by_lr(lr=self.lr)), self.lr, self.weight_decay,
                       "decoupled", self.on("weight_decay"))


def sophia_hessian(state: State, diagonal: Any) -> State:
    """``state`` with Sophia's EMA ``h <- b2*h + (1-b2)*d`` of the Hessian-diagonal estimate
    ``diagonal`` (a tree shaped like the params, or a flat list in :func:`uniopt.trainables`
    order), ``b2`` as it is at the state's step. Pure: a new state. Every
    :class:`scale_by_sophia` part of the state's rule takes it.

    Raises ValueError where the rule has no such part or the estimate does not match."""
    keys = [(part, keys[1]) for part, keys in state.rule.keyed_parts
            if isinstance(part, scale_by_sophia)]
    if not keys:
        raise ValueError(f"sophia_hessian: the state's rule has no Sophia part: {state.rule!r}")
    leaves = diagonal if isinstance(diagonal, list) else flatten(diagonal)[0]
    slots = dict(state.slots)
    for part, key in keys:
        old = slots[key]
        if len(leaves) != len(old) or any(tuple(d.shape) != tuple(h.shape)
                                          for d, h in zip(leaves, old, strict=True)):
            raise ValueError(
                "sophia_hessian: the estimate must have the params' leaves and shapes: got "
                f"shapes {[tuple(d.shape) for d in leaves]}, expected "
                f"{[tuple(h.shape) for h in old]}")
        now = part.at(state.step)
        w = now.one_minus("b2")
        slots[key] = [None if h is None else lerp(h, d, w) for h, d in zip(old, leaves,
                                                                              strict=True)]
    return dataclasses.replace(state, slots=slots)
