"""SM3 (Anil et al., 2019): Adagrad with one accumulator per slice of each axis."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import Info, PerLeaf, Rule, Transform
from ..hyper import NONNEG, UNIT_OPEN, Interval, hyper, static
from ..transforms.scale import scale_by_lr


class Sm3Coeffs(NamedTuple):
    b1: Any
    one_minus_b1: Any
    eps: Any
    new: Any  # the weight of g^2 in the accumulator: 1 - b2, or 1 where b2 = 1 (optax's)
    b2: Any


@dataclass(frozen=True)
class scale_by_sm3(PerLeaf):
    """SM3-II's direction with momentum, as optax's ``scale_by_sm3``.

    A leaf of ``k >= 2`` axes keeps one accumulator per index of each axis, ``mu_i``; each
    element takes the smallest of those that cover it, ``a = g^2 + min_i mu_i``, and each
    ``mu_i`` becomes the maximum of ``a`` over the other axes. A vector keeps ``a`` itself (it
    is Adagrad), and so does a scalar (where optax fails). Then ``d = g/sqrt(a + eps)`` (0
    where ``a = 0``), ``m <- b1*m + (1-b1)*d``, ``u <- m``. With ``b2`` below 1 the
    accumulators decay, as optax's: ``a = (1 - b2)*g^2 + b2*min_i mu_i``. The accumulators of a
    leaf lie end to end in one slot, ``accumulator``, of ``sum(shape)`` numbers (1 for a scalar,
    none for an empty vector)."""

    real_only = True

    b1: Any = hyper(0.9, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    b2: float = static(1.0, Interval(0.0, 1.0, lo_open=True))
    slots: ClassVar[tuple[str, ...]] = ("accumulator", "momentum_buffer")

    def slot_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...] | None, ...]:
        return ((sum(shape),) if shape else (1,)), tuple(shape)

    def coeffs(self, step: Any) -> Sm3Coeffs:
        return Sm3Coeffs(b1=self.b1, one_minus_b1=self.one_minus("b1"), eps=self.eps,
                         new=1.0 if self.b2 == 1.0 else 1.0 - self.b2, b2=self.b2)

    @staticmethod
    def apply(xp, c, p, u, accumulator, momentum_buffer):
        shape, k = tuple(u.shape), u.ndim
        if k >= 2 and 0 in shape:  # an empty matrix: no maximum to take, nothing to move
            return u, accumulator, momentum_buffer
        if k < 2:
            a = c.new * (u * u) + c.b2 * xp.reshape(accumulator, shape)
            new = xp.reshape(a, (shape[0] if shape else 1,))
        else:
            ends = [sum(shape[:i + 1]) for i in range(k)]
            mus = [xp.reshape(accumulator[e - n:e], (1,) * i + (n,) + (1,) * (k - i - 1))
                   for i, (e, n) in enumerate(zip(ends, shape, strict=True))]
            a = c.new * (u * u) + c.b2 * functools.reduce(xp.minimum, mus)
            new = xp.concat([xp.max(a, axis=tuple(j for j in range(k) if j != i))
                             for i in range(k)])
        zero = a == 0  # optax's convention 0/0 = 0: no gradient yet, no step
        d = xp.where(zero, u * 0, u / xp.sqrt(xp.where(zero, 1, a) + c.eps))
        m = c.one_minus_b1 * d + c.b1 * momentum_buffer
        return m, new, m


@dataclass(frozen=True)
class sm3(Rule):
    r"""SM3 (Anil et al., 2019) as ``optax.sm3``: :class:`scale_by_sm3` (SM3-II with an
    exponential moving average ``momentum``), then ``p <- p - lr*m``. For a matrix leaf
    (one accumulator ``r_i`` per row, ``c_j`` per column; a vector keeps ``a`` itself), with
    ``beta = momentum``:

    $$
    \begin{aligned}
    a_{t,ij} &= g_{t,ij}^2 + \min(r_{t-1,i},\ c_{t-1,j}), \qquad
    r_{t,i} = \max_j a_{t,ij}, \qquad c_{t,j} = \max_i a_{t,ij} \\
    m_t &= \beta\, m_{t-1} + (1 - \beta)\, \frac{g_t}{\sqrt{a_t + \epsilon}}
    \quad (0 \text{ where } a_t = 0) \\
    p_t &= p_{t-1} - \mathrm{lr}\, m_t
    \end{aligned}
    $$

    Its memory is that of momentum plus ``sum(shape)`` numbers per leaf, where Adagrad keeps
    ``prod(shape)``. optax requires ``learning_rate`` and takes no schedule for it (it
    multiplies by ``-learning_rate``); ``lr`` here defaults to 1e-2 and may be a schedule.
    optax fails on scalar leaves; here a scalar is a vector of one.
    """

    lr: Any = hyper(1e-2, NONNEG)
    momentum: Any = hyper(0.9, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)

    info: ClassVar[Info] = Info(
        family="adaptive",
        paper="Anil et al. (2019)",
        references=("optax.sm3",),
        example={"lr": 1.0, "momentum": 0.9},
        budget=1000,
        complex=False,
    )

    def parts(self) -> tuple[Transform, ...]:
        return (scale_by_sm3(b1=self.momentum, eps=self.eps), scale_by_lr(lr=self.lr))
