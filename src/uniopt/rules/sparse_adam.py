"""SparseAdam (torch's ``SparseAdam``): Adam's moments and step only where a gradient is.

torch runs it on sparse gradients (``nn.Embedding(sparse=True)``) and touches only the
entries they hold. Arrays without a sparse type (NumPy, JAX) say which entries are present
by being non-zero: an entry whose gradient is exactly 0 keeps its moments and its value.
:class:`uniopt.torch.SparseAdam` hands the engine only the entries of the sparse gradient,
gathered (``skip_zeros=False``: every one is present, a stored 0 included, as in torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import Elementwise, Info, Rule, Transform
from ..hyper import NONNEG, UNIT_OPEN, hyper
from ..moments import bias_correction, select


class SparseAdamCoeffs(NamedTuple):
    one_minus_b1: Any
    one_minus_b2: Any
    eps: Any
    step_size: Any  # lr sqrt(1 - b2^t) / (1 - b1^t): eps sits on the uncorrected sqrt(v)


def _sqrt(x: Any) -> Any:
    return math.sqrt(x) if isinstance(x, float) else x**0.5  # torch's math.sqrt on the host


def _moments(xp: Any, c: Any, u: Any, m: Any, v: Any) -> tuple[Any, Any, Any]:
    # torch's order: the increments (g - m)(1 - b1), (g^2 - v)(1 - b2) are rounded first
    m = m + (u - m) * c.one_minus_b1
    v = v + (u * u - v) * c.one_minus_b2
    return c.step_size * (m / (xp.sqrt(v) + c.eps)), m, v


def _kernel_all(xp, c, p, u, exp_avg, exp_avg_sq):
    return _moments(xp, c, u, exp_avg, exp_avg_sq)


def _kernel_nonzero(xp, c, p, u, exp_avg, exp_avg_sq):
    step, m, v = _moments(xp, c, u, exp_avg, exp_avg_sq)
    present = u != 0
    return (select(xp, present, step, u), select(xp, present, m, exp_avg),
            select(xp, present, v, exp_avg_sq))


@dataclass(frozen=True)
class scale_by_sparse_adam(Elementwise):
    """``m <- m + (1-b1)(u - m)``, ``v <- v + (1-b2)(u^2 - v)``,
    ``u <- lr sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v) + eps)`` (eps before bias correction, unlike
    :class:`~uniopt.scale_by_adam`); with ``skip_zeros`` only where ``u != 0``, elsewhere
    ``u`` stays 0 and the moments as they were."""

    real_only = True

    lr: Any = hyper(1e-3, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    skip_zeros: bool = True
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")
    makes_step: ClassVar[bool] = True

    def coeffs(self, step: int) -> SparseAdamCoeffs:
        c1, c2 = self.one_minus("b1"), self.one_minus("b2")
        bc1, bc2 = bias_correction(self.b1, c1, step), bias_correction(self.b2, c2, step)
        return SparseAdamCoeffs(one_minus_b1=c1, one_minus_b2=c2, eps=self.eps,
                                step_size=self.lr * _sqrt(bc2) / bc1)

    @property
    def kernel(self) -> Any:  # type: ignore[override]
        return _kernel_nonzero if self.skip_zeros else _kernel_all


@dataclass(frozen=True)
class sparse_adam(Rule):
    r"""SparseAdam as torch writes it: Adam (eps added to the uncorrected ``sqrt(v)``, the step
    ``lr sqrt(1-b2^t)/(1-b1^t)``) on the entries present only; see
    :class:`scale_by_sparse_adam`. On dense arrays an entry is present where its gradient is
    non-zero (``skip_zeros=False``: everywhere). At step ``t`` (from 1), on each entry present
    (the others keep their value and their moments):

    $$
    \begin{aligned}
    m_t &= m_{t-1} + (1 - \beta_1)\, (g_t - m_{t-1}), \qquad
    v_t = v_{t-1} + (1 - \beta_2)\, (g_t^2 - v_{t-1}) \\
    p_t &= p_{t-1} - \mathrm{lr}\, \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\,
    \frac{m_t}{\sqrt{v_t} + \epsilon}
    \end{aligned}
    $$

    >>> import numpy as np, uniopt as uo
    >>> p = [np.array([1.0, 2.0])]
    >>> state = uo.setup(uo.sparse_adam(lr=0.1), p)
    >>> state, p = uo.update(state, p, [np.array([0.0, -4.0])])
    >>> p[0].round(6)  # the first entry has no gradient: untouched
    array([1. , 2.1])
    """

    lr: Any = hyper(1e-3, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    skip_zeros: bool = True

    info: ClassVar[Info] = Info(
        family="adam",
        paper="Kingma & Ba (2015), lazy on sparse gradients",
        references=("torch.optim.SparseAdam",),
        example={"lr": 0.1},
        budget=500,
        complex=False,
    )

    def parts(self) -> tuple[Transform, ...]:
        return (scale_by_sparse_adam(lr=self.lr, b1=self.betas[0], b2=self.betas[1],
                                     eps=self.eps, skip_zeros=self.skip_zeros),)
