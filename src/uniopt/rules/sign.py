"""Sign-based rules: Lion (Chen et al., 2023), signSGD and Signum (Bernstein et al., 2018).

Every step moves each coordinate by exactly ``lr`` (plus its weight decay): the direction is a
sign, so the peers differ only in how they round the decay and the momentum, never in the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import Elementwise, Info, Rule, Transform
from ..hyper import NONNEG, UNIT, UNIT_OPEN, hyper
from ..moments import fma, lerp
from ..schedules import cosine
from ..transforms.decay import decoupled_weight_decay, weight_decay
from ..transforms.scale import scale_by_lr, sign


class LionCoeffs(NamedTuple):
    b1: Any
    one_minus_b1: Any
    b2: Any
    one_minus_b2: Any


@dataclass(frozen=True)
class scale_by_lion(Elementwise):
    """Lion's direction: ``u <- sign(b1*m + (1-b1)*u)``, then ``m <- b2*m + (1-b2)*u``.

    Each mix is rounded as lion_pytorch's ``mul_(b) + add(g, alpha=1-b)`` (one fused
    multiply-add); optax rounds ``(1-b)*g + b*m`` twice, a last-ulp difference in ``m`` that
    changes a sign only where the mix is a rounding error away from 0."""

    b1: Any = hyper(0.9, UNIT)
    b2: Any = hyper(0.99, UNIT)
    slots: ClassVar[tuple[str, ...]] = ("exp_avg",)

    def steady(self) -> int | None:
        return 0

    def coeffs(self, step: int) -> LionCoeffs:
        return LionCoeffs(b1=self.b1, one_minus_b1=self.one_minus("b1"), b2=self.b2,
                          one_minus_b2=self.one_minus("b2"))

    @staticmethod
    def kernel(xp, c, p, u, exp_avg):
        direction = xp.sign(fma(c.one_minus_b1, u, exp_avg * c.b1))
        return direction, fma(c.one_minus_b2, u, exp_avg * c.b2)


@dataclass(frozen=True)
class lion(Rule):
    r"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    ``c = b1*m + (1-b1)*g``; ``p <- p - lr*(sign(c) + weight_decay*p)``;
    ``m <- b2*m + (1-b2)*g`` (:class:`scale_by_lion`). With ``(b1, b2) = betas`` and
    ``lambda = weight_decay``:

    $$
    \begin{aligned}
    c_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
    p_t &= (1 - \mathrm{lr}\,\lambda)\, p_{t-1} - \mathrm{lr}\, \operatorname{sign}(c_t) \\
    m_t &= \beta_2 m_{t-1} + (1 - \beta_2)\, g_t
    \end{aligned}
    $$

    The decay is the paper's (Program 1:
    ``update += w*lambda; update *= lr``), written as ``p <- p*(1 - lr*wd) - lr*sign(c)``:
    lion_pytorch's, optax's (``add_decayed_weights`` before ``scale_by_learning_rate``) and
    keras's (``p - p*wd*lr`` before the step) are this one formula, rounded apart.

    Options: ``couple_lr=False``: the decay independent of the learning rate,
    ``p <- p - lr*sign(c) - weight_decay*p``: lion_pytorch's ``decoupled_weight_decay=True``
    at a constant lr (it divides ``weight_decay`` by the initial lr, so under a torch lr
    scheduler its decay follows ``lr_t/lr_0``: give ``weight_decay`` that schedule here).

    The momentum slot is kept in the parameters' dtype, or in ``uniopt.setup``'s
    ``state_dtype`` (``"float32"`` for bfloat16 params: optax's ``mu_dtype=jnp.float32``);
    a momentum narrower than the params (optax's ``mu_dtype=jnp.bfloat16`` on float32 params)
    is not offered.

    Conventions: ``"paper"`` (the authors' ``lion_pytorch.Lion``: lr 1e-4, betas (0.9, 0.99),
    weight_decay 0); ``"optax"`` (``optax.lion``: weight_decay 1e-3; optax requires a learning
    rate, ours keeps 1e-4); ``"keras"`` (``keras.optimizers.Lion``: lr 1e-3, weight_decay 0).
    keras rejects ``beta_1 = 0``; lion_pytorch and optax take any beta in [0, 1], as here.

    >>> import numpy as np, uniopt as uo
    >>> p = [np.array([1.0, -2.0, 3.0])]
    >>> state = uo.setup(uo.lion(lr=0.5), p)
    >>> uo.update(state, p, [np.array([1.0, 6.0, -0.1])])[1]
    [array([ 0.5, -2.5,  3.5])]
    """

    lr: Any = hyper(1e-4, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.99), UNIT)
    weight_decay: Any = hyper(0.0, NONNEG)
    couple_lr: bool = True
    convention: str = "paper"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        "optax": {"weight_decay": 1e-3},
        "keras": {"lr": 1e-3},
    }

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="sign",
        paper="Chen et al. (2023)",
        references=("lion_pytorch.Lion", "optax.lion", "keras.optimizers.Lion"),
        # a sign step moves by lr however close the minimum: the rate decays to settle
        example={"lr": cosine(0.03, steps=1000)},
        budget=1000,
    )

    def parts(self) -> tuple[Transform, ...]:
        steps = (scale_by_lion(b1=self.betas[0], b2=self.betas[1]), scale_by_lr(lr=self.lr))
        if not self.on("weight_decay"):
            return steps
        if self.couple_lr:  # lion_pytorch's p *= 1 - lr*wd, then the step
            return (*steps, decoupled_weight_decay(lr=self.lr, wd=self.weight_decay))
        return (*steps, weight_decay(wd=self.weight_decay))


@dataclass(frozen=True)
class sign_sgd(Rule):
    r"""signSGD (Bernstein et al., 2018): ``p <- p - lr*sign(g)`` (``sign(0) = 0``), as
    ``optax.sign_sgd`` (which requires a learning rate; ours keeps 1e-3):

    $$
    p_t = p_{t-1} - \mathrm{lr}\, \operatorname{sign}(g_t)
    $$
    """

    lr: Any = hyper(1e-3, NONNEG)

    info: ClassVar[Info] = Info(
        family="sign",
        paper="Bernstein et al. (2018)",
        references=("optax.sign_sgd",),
        # Rosenbrock's curved valley stops the diagonal steps of a sign in a 2-cycle, at
        # f = 0.09 from step ~3500 at this rate (0.18 at 2e-3; 0.04 at 5e-4, from ~7000)
        example={"lr": 0.001},
        budget=4000,
    )

    def parts(self) -> tuple[Transform, ...]:
        return (sign(), scale_by_lr(lr=self.lr))


class SignumCoeffs(NamedTuple):
    one_minus_beta: Any


@dataclass(frozen=True)
class scale_by_signum(Elementwise):
    """``m <- beta*m + (1-beta)*u`` (not bias-corrected: a positive factor keeps the sign);
    ``u <- sign(m)``."""

    beta: Any = hyper(0.9, UNIT_OPEN)
    slots: ClassVar[tuple[str, ...]] = ("momentum_buffer",)

    def steady(self) -> int | None:
        return 0

    def coeffs(self, step: int) -> SignumCoeffs:
        return SignumCoeffs(one_minus_beta=self.one_minus("beta"))

    @staticmethod
    def kernel(xp, c, p, u, momentum_buffer):
        m = lerp(momentum_buffer, u, c.one_minus_beta)
        return xp.sign(m), m


@dataclass(frozen=True)
class signum(Rule):
    r"""Signum (Bernstein et al., 2018): ``m <- beta*m + (1-beta)*g``; ``p <- p - lr*sign(m)``
    (:class:`scale_by_signum`), as ``optax.signum`` (its ``ema(beta, debias=False)``, then
    ``scale_by_sign``; optax requires a learning rate, ours keeps 1e-3; its
    ``accumulator_dtype`` is ``uniopt.setup``'s ``state_dtype``):

    $$
    m_t = \beta\, m_{t-1} + (1 - \beta)\, g_t, \qquad
    p_t = p_{t-1} - \mathrm{lr}\, \operatorname{sign}(m_t)
    $$
    """

    lr: Any = hyper(1e-3, NONNEG)
    beta: Any = hyper(0.9, UNIT_OPEN)

    info: ClassVar[Info] = Info(
        family="sign",
        paper="Bernstein et al. (2018)",
        references=("optax.signum",),
        example={"lr": cosine(0.03, steps=1000)},
        budget=1000,
    )

    def parts(self) -> tuple[Transform, ...]:
        return (scale_by_signum(beta=self.beta), scale_by_lr(lr=self.lr))
