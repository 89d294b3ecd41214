"""Adam (Kingma & Ba, 2015) and its family: AMSGrad, AdamW, optimistic Adam."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import Elementwise, Rule, Transform
from ..hyper import NONNEG, UNIT_OPEN, hyper
from ..moments import bias_correction, ema_sq, lerp, select
from ..transforms.decay import decoupled_weight_decay, weight_decay
from ..transforms.scale import scale_by_lr


class AdamCoeffs(NamedTuple):
    one_minus_b1: Any  # m's step towards u
    b2: Any
    one_minus_b2: Any
    m_scale: Any  # lr*m_hat = m_scale*m + u_scale*u: lr/(1 - b1^t) and 0, or NAdam's pair
    u_scale: Any
    sqrt_bc2: Any  # sqrt(1 - b2^t): v_hat's root is sqrt(v + eps_root_bc2) / sqrt_bc2
    eps_root_bc2: Any  # eps_root*(1 - b2^t), so eps_root = 0 keeps torch's operation order
    eps: Any


@dataclass(frozen=True)
class scale_by_adam(Elementwise):
    """Adam's direction: ``u <- lr * m_hat / (sqrt(v_hat + eps_root) + eps)``.

    ``m <- b1*m + (1-b1)*u``, ``v <- b2*v + (1-b2)*u^2``, ``m_hat = m/(1-b1^t)``,
    ``v_hat = v/(1-b2^t)``. ``nesterov=True`` uses optax's NAdam-style
    ``m_hat = b1*m/(1-b1^(t+1)) + (1-b1)*u/(1-b1^t)``. ``lr`` (1: the direction alone, as
    optax's ``scale_by_adam``) is folded in as torch folds it, ``((lr/(1-b1^t))*m)/denom``,
    so the rules that pass theirs round as torch's ``addcdiv`` does.
    """

    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    nesterov: bool = False
    lr: Any = hyper(1.0, NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")

    def coeffs(self, step: int) -> AdamCoeffs:
        c1, c2 = self.one_minus("b1"), self.one_minus("b2")
        bc1, bc2 = bias_correction(self.b1, c1, step), bias_correction(self.b2, c2, step)
        if self.nesterov:
            m_scale = self.lr * self.b1 / bias_correction(self.b1, c1, step + 1)
            u_scale = self.lr * c1 / bc1
        else:
            m_scale, u_scale = self.lr / bc1, 0.0
        return AdamCoeffs(
            one_minus_b1=c1, b2=self.b2, one_minus_b2=c2, m_scale=m_scale, u_scale=u_scale,
            sqrt_bc2=bc2**0.5, eps_root_bc2=self.eps_root * bc2, eps=self.eps,
        )

    @staticmethod
    def kernel(xp, c, p, u, exp_avg, exp_avg_sq):
        m = lerp(exp_avg, u, c.one_minus_b1)
        v = ema_sq(exp_avg_sq, u, c.b2, c.one_minus_b2)
        m_hat = c.m_scale * m + c.u_scale * u
        return m_hat / (xp.sqrt(v + c.eps_root_bc2) / c.sqrt_bc2 + c.eps), m, v


@dataclass(frozen=True)
class scale_by_amsgrad(scale_by_adam):
    """As :class:`scale_by_adam` with ``v_max <- max(v_max, v)`` in place of ``v``.

    The maximum is of the raw ``v``, bias-corrected afterwards (torch and keras; optax takes
    the maximum of ``v_hat``)."""

    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    @staticmethod
    def kernel(xp, c, p, u, exp_avg, exp_avg_sq, max_exp_avg_sq):
        m = lerp(exp_avg, u, c.one_minus_b1)
        v = ema_sq(exp_avg_sq, u, c.b2, c.one_minus_b2)
        v_max = xp.maximum(max_exp_avg_sq, v)
        m_hat = c.m_scale * m + c.u_scale * u
        return m_hat / (xp.sqrt(v_max + c.eps_root_bc2) / c.sqrt_bc2 + c.eps), m, v, v_max


def _adam_block(betas: tuple[Any, Any], eps: Any, amsgrad: bool, lr: Any) -> Elementwise:
    return (scale_by_amsgrad if amsgrad else scale_by_adam)(b1=betas[0], b2=betas[1], eps=eps,
                                                             lr=lr)


@dataclass(frozen=True)
class adam(Rule):
    """Adam (Kingma & Ba, 2015) as torch writes it.

    ``g <- g + weight_decay*p`` (L2: the decay passes through the moments; that is *not*
    AdamW); ``p <- p - lr * m_hat/(sqrt(v_hat) + eps)`` with the moments of
    :class:`scale_by_adam` (``amsgrad``: :class:`scale_by_amsgrad`).

    >>> import numpy as np, uniopt as uo
    >>> p = [np.array([1.0, 2.0])]
    >>> state = uo.setup(uo.adam(lr=0.1), p)
    >>> state, p = uo.update(state, p, [np.array([3.0, -0.5])])
    >>> p[0]  # the first Adam step moves every coordinate by lr against its gradient's sign
    array([0.9, 2.1])
    """

    lr: Any = hyper(1e-3, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    amsgrad: bool = False

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    def parts(self) -> tuple[Transform, ...]:
        return (
            *([weight_decay(wd=self.weight_decay)] if self.on("weight_decay") else []),
            _adam_block(self.betas, self.eps, self.amsgrad, self.lr),
        )


@dataclass(frozen=True)
class adamw(Rule):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    ``couple_lr=True`` (default) is torch's AdamW: ``p <- p - lr*(A + weight_decay*p)``.
    ``couple_lr=False`` is Flux's original form, decay independent of the learning rate:
    ``p <- p - lr*A - weight_decay*p``. ``A`` is Adam's direction (:class:`scale_by_adam`).
    The paper's ``p <- p - eta_t*(alpha*A + lam*p)`` is ``couple_lr=False`` with
    ``lr = eta_t*alpha`` and ``weight_decay = eta_t*lam`` as two schedules (see the README).
    """

    lr: Any = hyper(1e-3, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(1e-2, NONNEG)
    amsgrad: bool = False
    couple_lr: bool = True

    def parts(self) -> tuple[Transform, ...]:
        step = _adam_block(self.betas, self.eps, self.amsgrad, self.lr)
        if self.couple_lr:  # torch's p *= 1 - lr*wd, then the step
            return (step, decoupled_weight_decay(lr=self.lr, wd=self.weight_decay))
        return (step, weight_decay(wd=self.weight_decay))


class OptimisticCoeffs(NamedTuple):
    alpha_plus_beta: Any
    beta: Any
    first: Any  # the first update: u_prev = u


@dataclass(frozen=True)
class scale_by_optimistic_gradient(Elementwise):
    """``u <- (alpha + beta)*u - beta*u_prev``; on the first update ``u_prev = u`` (optax)."""

    alpha: Any = hyper(1.0, NONNEG)
    beta: Any = hyper(1.0, NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("prev_update",)

    def coeffs(self, step: int) -> OptimisticCoeffs:
        return OptimisticCoeffs(alpha_plus_beta=self.alpha + self.beta, beta=self.beta,
                                first=step == 0)

    @staticmethod
    def kernel(xp, c, p, u, prev_update):
        return c.alpha_plus_beta * u - c.beta * select(xp, c.first, u, prev_update), u


@dataclass(frozen=True)
class optimistic_adam(Rule):
    """Optimistic Adam (Daskalakis et al., 2018) with optax's ``optimistic_adam_v2`` semantics.

    ``r_t`` is Adam's direction (:class:`scale_by_adam`, ``nesterov=True`` by default as in
    optax); ``p <- p - lr*((alpha + beta)*r_t - beta*r_{t-1})``, ``r_0 = r_1``. Every
    hyperparameter, ``lr`` included, may be a schedule (optax's v1 crashed on one).
    """

    lr: Any = hyper(valid=NONNEG)
    alpha: Any = hyper(1.0, NONNEG)
    beta: Any = hyper(1.0, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    nesterov: bool = True

    def parts(self) -> tuple[Transform, ...]:
        return (
            scale_by_adam(b1=self.b1, b2=self.b2, eps=self.eps, eps_root=self.eps_root,
                          nesterov=self.nesterov),
            scale_by_optimistic_gradient(alpha=self.alpha, beta=self.beta),
            scale_by_lr(lr=self.lr),
        )
