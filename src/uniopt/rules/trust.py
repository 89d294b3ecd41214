"""Layer-wise trust: rules that scale each leaf's step by norms of that leaf (LAMB, LARS,
NovoGrad, Fromage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import Elementwise, Info, PerLeaf, Rule, Transform
from ..hyper import NONNEG, UNIT_OPEN, hyper
from ..moments import fma, select
from ..schedules import cosine
from ..transforms.decay import weight_decay
from ..transforms.mask import frozen_mask, masked_by
from ..transforms.momentum import trace
from ..transforms.scale import leaf_norm, scale_by_lr, scale_by_trust_ratio
from .adam import scale_by_adam


@dataclass(frozen=True)
class lamb(Rule):
    r"""LAMB (You et al., 2020) as ``optax.lamb``: Adam's direction plus decoupled decay, scaled
    leaf by leaf by its trust ratio.

    ``r = m_hat/(sqrt(v_hat + eps_root) + eps)`` (:class:`~uniopt.scale_by_adam`);
    ``d = r + weight_decay*p`` (on the leaves ``mask`` selects); ``d <- |p|/|d| * d`` per leaf
    (:class:`~uniopt.scale_by_trust_ratio`, ratio 1 where either norm is 0);
    ``p <- p - lr*d``. With ``lambda = weight_decay`` and ``|.|`` a leaf's 2-norm:

    $$
    \begin{aligned}
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
    r_t &= \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t) + \epsilon_{root}}
    + \epsilon}, \qquad d_t = r_t + \lambda\, p_{t-1} \\
    p_t &= p_{t-1} - \mathrm{lr}\, \frac{\lVert p_{t-1} \rVert}{\lVert d_t \rVert}\, d_t
    \end{aligned}
    $$

    ``mask``: the leaves to decay, as optax takes it: a tree of bools like the params (or a
    prefix of it), or a function of the params that returns one (:class:`~uniopt.masked_block`);
    a leaf that is no bool, a glob among them, is refused. optax requires ``learning_rate``;
    ``lr`` here defaults to 1e-3.
    """

    lr: Any = hyper(1e-3, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-6, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    mask: Any = None

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="trust",
        paper="You et al. (2020)",
        references=("optax.lamb", "keras.optimizers.Lamb"),
        # a normalised step keeps its size near the optimum: the lr must decay to reach it
        example={"lr": cosine(0.05, steps=1000)},
        budget=1000,
        complex=False,
    )

    def check(self) -> None:
        object.__setattr__(self, "mask", frozen_mask(self.name, "mask", self.mask))

    def parts(self) -> tuple[Transform, ...]:
        direction = scale_by_adam(b1=self.b1, b2=self.b2, eps=self.eps, eps_root=self.eps_root)
        decay = ((masked_by(weight_decay(wd=self.weight_decay), self.mask),)
                 if self.on("weight_decay") else ())
        return (direction, *decay, scale_by_trust_ratio(), scale_by_lr(lr=self.lr))


@dataclass(frozen=True)
class lars(Rule):
    r"""LARS (You et al., 2017) as ``optax.lars``.

    ``d = g + weight_decay*p`` (on the leaves ``weight_decay_mask`` selects);
    ``d <- trust_coefficient*|p|/(|d| + eps) * d`` per leaf (on the leaves
    ``trust_ratio_mask`` selects; ratio 1 where either norm is 0); ``d <- lr*d``;
    ``b <- momentum*b + d``, ``p <- p - b`` (Nesterov ``p <- p - (d + momentum*b)``). With
    ``lambda = weight_decay``, ``eta = trust_coefficient``, ``mu = momentum`` and ``|.|`` a
    leaf's 2-norm:

    $$
    \begin{aligned}
    d_t &= g_t + \lambda\, p_{t-1} \\
    d_t &\leftarrow \mathrm{lr}\, \frac{\eta\, \lVert p_{t-1} \rVert}
    {\lVert d_t \rVert + \epsilon}\, d_t \\
    b_t &= \mu\, b_{t-1} + d_t \quad (b_1 = d_1) \\
    p_t &= p_{t-1} -
    \begin{cases} d_t + \mu\, b_t & \text{Nesterov} \\ b_t & \text{otherwise} \end{cases}
    \end{aligned}
    $$

    The learning rate is applied before the momentum buffer, as optax does (Sutskever's form:
    under a schedule the buffer keeps the learning rate of the steps that made it). The masks
    are as optax takes them (:class:`~uniopt.masked_block`; None or True: every leaf): trees of
    bools, not globs, or functions of the params.
    ``nesterov`` with ``momentum`` 0 is plain SGD, as optax's.
    optax requires ``learning_rate``; ``lr`` here defaults to 1e-3.
    """

    lr: Any = hyper(1e-3, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    weight_decay_mask: Any = True
    trust_coefficient: Any = hyper(0.001, NONNEG)
    eps: Any = hyper(0.0, NONNEG)
    trust_ratio_mask: Any = True
    momentum: Any = hyper(0.9, NONNEG)
    nesterov: bool = False

    optional: ClassVar[tuple[str, ...]] = ("weight_decay", "momentum")

    info: ClassVar[Info] = Info(
        family="trust",
        paper="You et al. (2017)",
        references=("optax.lars",),
        example={"lr": 0.1, "trust_coefficient": 0.1},
        complex=False,
    )

    def check(self) -> None:
        for name in ("weight_decay_mask", "trust_ratio_mask"):
            object.__setattr__(self, name, frozen_mask(self.name, name, getattr(self, name)))

    def parts(self) -> tuple[Transform, ...]:
        decay = ((masked_by(weight_decay(wd=self.weight_decay), self.weight_decay_mask),)
                 if self.on("weight_decay") else ())
        trust = masked_by(scale_by_trust_ratio(trust_coefficient=self.trust_coefficient,
                                               eps=self.eps), self.trust_ratio_mask)
        momentum = ((trace(momentum=self.momentum, nesterov=self.nesterov, hold=False),)
                    if self.on("momentum") else ())
        return (*decay, trust, scale_by_lr(lr=self.lr), *momentum)


class NovogradCoeffs(NamedTuple):
    b1: Any
    b2: Any
    one_minus_b2: Any
    eps: Any
    eps_root: Any
    wd: Any
    first: Any  # the first update: nu starts at |g|^2 itself


@dataclass(frozen=True)
class scale_by_novograd(PerLeaf):
    """NovoGrad's direction, one second moment per leaf: ``n = |u|^2`` over the leaf;
    ``nu <- n`` on the first update, then ``nu <- b2*nu + (1-b2)*n``;
    ``m <- b1*m + u/(sqrt(nu + eps_root) + eps) + weight_decay*p`` (``m`` starts at 0, so the
    first is the bracket alone); ``u <- m``. As optax's ``scale_by_novograd``."""

    real_only = True

    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.25, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "grad_norm_sq")
    uses_params: ClassVar[bool] = True
    batched: ClassVar[bool] = True

    def slot_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...] | None, ...]:
        return tuple(shape), ()

    def coeffs(self, step: Any) -> NovogradCoeffs:
        return NovogradCoeffs(b1=self.b1, b2=self.b2, one_minus_b2=self.one_minus("b2"),
                              eps=self.eps, eps_root=self.eps_root, wd=self.weight_decay,
                              first=step == 0)

    @staticmethod
    def apply(xp, c, p, u, exp_avg, grad_norm_sq):
        norm = leaf_norm(xp, u)  # (batch, 1, ...): each leaf's norm, broadcasting
        n = norm * norm
        nu = select(xp, c.first, n, c.b2 * xp.reshape(grad_norm_sq, n.shape) + c.one_minus_b2 * n)
        m = c.b1 * exp_avg + (u / (xp.sqrt(nu + c.eps_root) + c.eps) + c.wd * p)
        return m, m, xp.reshape(nu, grad_norm_sq.shape)


@dataclass(frozen=True)
class novograd(Rule):
    r"""NovoGrad (Ginsburg et al., 2019) as ``optax.novograd``: :class:`scale_by_novograd`, then
    ``p <- p - lr*m``. With ``lambda = weight_decay`` and ``|g|`` a leaf's 2-norm:

    $$
    \begin{aligned}
    \nu_t &= \beta_2\, \nu_{t-1} + (1 - \beta_2)\, \lVert g_t \rVert^2
    \quad (\nu_1 = \lVert g_1 \rVert^2) \\
    m_t &= \beta_1 m_{t-1} + \frac{g_t}{\sqrt{\nu_t + \epsilon_{root}} + \epsilon}
    + \lambda\, p_{t-1} \quad (m_0 = 0) \\
    p_t &= p_{t-1} - \mathrm{lr}\, m_t
    \end{aligned}
    $$

    The second moment is one number per leaf (the squared norm of its gradient, averaged),
    so the state is half Adam's; ``weight_decay`` is added inside the moment, after the
    normalisation, as in the paper and optax. optax requires ``learning_rate``; ``lr`` here
    defaults to 1e-3.
    """

    lr: Any = hyper(1e-3, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.25, UNIT_OPEN)
    eps: Any = hyper(1e-6, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)

    info: ClassVar[Info] = Info(
        family="trust",
        paper="Ginsburg et al. (2019)",
        references=("optax.novograd",),
        example={"lr": 0.01},
        complex=False,
    )

    def parts(self) -> tuple[Transform, ...]:
        return (scale_by_novograd(b1=self.b1, b2=self.b2, eps=self.eps, eps_root=self.eps_root,
                                  weight_decay=self.weight_decay), scale_by_lr(lr=self.lr))


class FromageCoeffs(NamedTuple):
    step: Any  # lr/sqrt(1 + lr^2)
    shrink: Any  # 1 - 1/sqrt(1 + lr^2)


@dataclass(frozen=True)
class scale_by_fromage(Elementwise):
    """Fromage's step after the trust ratio: ``u <- lr/sqrt(1+lr^2) * u +
    (1 - 1/sqrt(1+lr^2)) * p``, so ``p <- (p - lr*u)/sqrt(1 + lr^2)``."""

    real_only = True

    lr: Any = hyper(1e-2, NONNEG)
    uses_params: ClassVar[bool] = True
    makes_step: ClassVar[bool] = True

    def coeffs(self, step: Any) -> FromageCoeffs:
        mult = 1 / (1 + self.lr**2) ** 0.5
        return FromageCoeffs(step=self.lr * mult, shrink=1 - mult)

    @staticmethod
    def kernel(xp, c, p, u):
        return (fma(c.step, u, c.shrink * p),)


@dataclass(frozen=True)
class fromage(Rule):
    r"""Fromage (Bernstein et al., 2020) as ``optax.fromage``: each leaf's gradient scaled to
    the parameter's norm, ``d = |p|/|g| * g`` (each norm raised to at least ``min_norm``,
    :class:`~uniopt.scale_by_trust_ratio`), then ``p <- (p - lr*d)/sqrt(1 + lr^2)``
    (:class:`scale_by_fromage`). optax requires ``learning_rate``; ``lr`` here defaults to
    1e-2. With ``|.|`` a leaf's 2-norm:

    $$
    d_t = \frac{\max(\lVert p_{t-1} \rVert, \text{min_norm})}
    {\max(\lVert g_t \rVert, \text{min_norm})}\, g_t, \qquad
    p_t = \frac{p_{t-1} - \mathrm{lr}\, d_t}{\sqrt{1 + \mathrm{lr}^2}}
    $$
    """

    lr: Any = hyper(1e-2, NONNEG)
    min_norm: Any = hyper(1e-6, NONNEG)

    info: ClassVar[Info] = Info(
        family="trust",
        paper="Bernstein et al. (2020)",
        references=("optax.fromage",),
        example={"lr": 0.05},
        budget=1000,
        complex=False,
    )

    def parts(self) -> tuple[Transform, ...]:
        return (scale_by_trust_ratio(min_norm=self.min_norm), scale_by_fromage(lr=self.lr))
