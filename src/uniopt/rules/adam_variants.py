"""Adam's variants as torch.optim has them: Adamax, NAdam, RAdam.

Each direction block applies the learning rate itself, folded into the step-dependent
coefficient as torch folds it (``lr/(1 - b1^t)``, NAdam's ``lr*(1 - mu_t)/(1 - prod mu)``), so a
kernel rounds in torch's order: ``addcdiv`` as ``(value*num)/den``.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..backend import namespace
from ..base import Elementwise, Rule, Transform
from ..hyper import NONNEG, UNIT_OPEN, _traced, hyper
from ..moments import bias_correction, ema_sq, lerp, select
from ..transforms.decay import decoupled_weight_decay, weight_decay


def _decayed(direction: Elementwise, lr: Any, wd: Any, decoupled: bool, on: bool) -> tuple[
        Transform, ...]:
    """``direction`` with torch's decay: L2 before it, or decoupled ``p *= 1 - lr*wd``."""
    if not on:
        return (direction,)
    if decoupled:
        return (direction, decoupled_weight_decay(lr=lr, wd=wd))
    return (weight_decay(wd=wd), direction)


# --- Adamax --------------------------------------------------------------------------------------


class AdamaxCoeffs(NamedTuple):
    one_minus_b1: Any
    b2: Any
    eps: Any
    clr: Any  # lr / (1 - b1^t)


@dataclass(frozen=True)
class scale_by_adamax(Elementwise):
    """Adamax's step: ``m <- b1*m + (1-b1)*u``, ``n <- max(b2*n, |u| + eps)``,
    ``u <- lr/(1 - b1^t) * m/n`` (eps inside the maximum, as torch and optax)."""

    lr: Any = hyper(2e-3, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_inf")
    makes_step: ClassVar[bool] = True

    def coeffs(self, step: int) -> AdamaxCoeffs:
        c1 = self.one_minus("b1")
        return AdamaxCoeffs(one_minus_b1=c1, b2=self.b2, eps=self.eps,
                            clr=self.lr / bias_correction(self.b1, c1, step))

    @staticmethod
    def kernel(xp, c, p, u, exp_avg, exp_inf):
        m = lerp(exp_avg, u, c.one_minus_b1)
        n = xp.maximum(exp_inf * c.b2, xp.maximum(u, -u) + c.eps)
        return (c.clr * m) / n, m, n


@dataclass(frozen=True)
class adamax(Rule):
    """Adamax (Kingma & Ba, 2015, section 7.1) as torch writes it: Adam with the infinity norm.

    ``g <- g + weight_decay*p``; ``m <- b1*m + (1-b1)*g``; ``n <- max(b2*n, |g| + eps)``;
    ``p <- p - lr/(1 - b1^t) * m/n``.
    """

    lr: Any = hyper(2e-3, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    def parts(self) -> tuple[Transform, ...]:
        direction = scale_by_adamax(lr=self.lr, b1=self.betas[0], b2=self.betas[1], eps=self.eps)
        return _decayed(direction, self.lr, self.weight_decay, False, self.on("weight_decay"))


# --- NAdam ---------------------------------------------------------------------------------------


def nadam_mu(b1: float, psi: float, t: float) -> float:
    """NAdam's momentum at update ``t``: ``b1*(1 - 0.5*0.96^(t*psi))`` (Dozat's schedule)."""
    return b1 * (1.0 - 0.5 * (0.96 ** (t * psi)))


# Below this, 1 - x is 1.0 in double: the product of the mus no longer changes a coefficient.
_NEGLIGIBLE = 2.0**-60
_PRODUCTS: dict[tuple[float, float], array] = {}
_ONE = array("d", [1.0])  # the empty product


def mu_product(b1: float, psi: float, t: int, exact: bool = False) -> float:
    """``mu_1 * ... * mu_t``, multiplied in order as torch's ``mu_product`` tensor accumulates
    it (in double). Kept per ``(b1, psi)`` until it is negligible next to 1 (at most about
    ``40/(1-b1)`` numbers), so a step costs no loop over its history; past that the last kept
    value is returned, which changes no coefficient, unless ``exact`` (for torch's state)."""
    prods = _PRODUCTS.get((b1, psi), _ONE)
    if len(prods) <= t and prods[-1] >= _NEGLIGIBLE:
        # extended in a copy (to twice its length: copies cost O(1) a step), then published
        # whole: another thread never sees, or appends to, a half-written list
        more = array("d", prods)
        while len(more) <= max(t, 2 * len(prods)) and more[-1] >= _NEGLIGIBLE:
            more.append(more[-1] * nadam_mu(b1, psi, float(len(more))))
        if len(_PRODUCTS) >= 16:  # a schedule of b1 makes a new pair every step
            _PRODUCTS.clear()
        _PRODUCTS[(b1, psi)] = prods = more
    if t < len(prods):
        return prods[t]
    x = prods[-1]
    for i in range(len(prods), t + 1 if exact else 0):
        x *= nadam_mu(b1, psi, float(i))
    return x


def _check_past_product(owner: str, past: Any) -> None:
    def pair(x: Any) -> bool:
        return (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], int)
                and not isinstance(x[0], bool) and x[0] >= 0 and isinstance(x[1], float))

    if past is not None and not (isinstance(past, tuple) and all(map(pair, past))):
        raise ValueError(f"{owner}: past_product must be None or pairs (step count, product), "
                         f"got {past!r}")


class NadamCoeffs(NamedTuple):
    one_minus_b1: Any
    b2: Any
    one_minus_b2: Any
    bc2: Any  # 1 - b2^t
    eps: Any
    g_scale: Any  # lr*(1 - mu_t)/(1 - mu_1...mu_t)
    m_scale: Any  # lr*mu_{t+1}/(1 - mu_1...mu_{t+1})


@dataclass(frozen=True)
class scale_by_nadam(Elementwise):
    """NAdam's step (Dozat, 2016), torch's form: with Adam's ``m`` and ``v``,
    ``u <- lr*(1-mu_t)/(1-P_t) * u/d + lr*mu_{t+1}/(1-P_{t+1}) * m/d``,
    ``d = sqrt(v/(1-b2^t)) + eps``, ``mu_t = b1*(1 - 0.5*0.96^(t*momentum_decay))``,
    ``P_t = mu_1*...*mu_t``. ``P_t`` is derived from the step count, for the values of ``b1``
    and ``momentum_decay`` at this step; ``past_product``, pairs ``(n, P_n)`` of the product
    of the momenta of the first ``n`` steps as they were (torch's ``mu_product``, which
    multiplies in each step's own ``b1``), makes step ``n + 1`` take ``P_n * mu_{n+1}``
    (``uniopt.torch.NAdam`` passes them; a step with no pair derives its product)."""

    lr: Any = hyper(2e-3, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    momentum_decay: Any = hyper(4e-3, NONNEG)
    past_product: tuple[tuple[int, float], ...] | None = None
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")
    makes_step: ClassVar[bool] = True

    def check(self) -> None:
        _check_past_product(self.name, self.past_product)

    def coeffs(self, step: int) -> NadamCoeffs:
        if any(map(_traced, (step, self.b1, self.momentum_decay))):
            raise TypeError(
                f"{self.name}: the product of NAdam's momenta is computed on the host, step by "
                "step; it cannot be traced (jax.jit): run it eagerly"
            )
        t, psi = int(step) + 1, self.momentum_decay
        mu, mu_next = nadam_mu(self.b1, psi, float(t)), nadam_mu(self.b1, psi, float(t + 1))
        past = dict(self.past_product or ()).get(t - 1)
        prod = mu_product(self.b1, psi, t) if past is None else past * mu
        return NadamCoeffs(
            one_minus_b1=self.one_minus("b1"), b2=self.b2, one_minus_b2=self.one_minus("b2"),
            bc2=1.0 - self.b2**t, eps=self.eps,
            g_scale=self.lr * (1.0 - mu) / (1.0 - prod),
            m_scale=self.lr * mu_next / (1.0 - prod * mu_next),
        )

    @staticmethod
    def kernel(xp, c, p, u, exp_avg, exp_avg_sq):
        m = lerp(exp_avg, u, c.one_minus_b1)
        v = ema_sq(exp_avg_sq, u, c.b2, c.one_minus_b2)
        d = xp.sqrt(v / c.bc2) + c.eps
        return (c.g_scale * u) / d + (c.m_scale * m) / d, m, v

    @staticmethod
    def finish(xp, c, p, u, exp_avg, exp_avg_sq):  # last: torch's two addcdiv_, each rounded
        d = xp.sqrt(exp_avg_sq / c.bc2) + c.eps
        return (p - (c.g_scale * u) / d) - (c.m_scale * exp_avg) / d


@dataclass(frozen=True)
class nadam(Rule):
    """NAdam (Dozat, 2016) as torch writes it: :class:`scale_by_nadam`, with
    ``g <- g + weight_decay*p`` before it, or with ``decoupled_weight_decay=True``
    ``p <- p*(1 - lr*weight_decay)`` beside it (NAdamW)."""

    lr: Any = hyper(2e-3, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    momentum_decay: Any = hyper(4e-3, NONNEG)
    decoupled_weight_decay: bool = False
    past_product: tuple[tuple[int, float], ...] | None = None  # see scale_by_nadam

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    def check(self) -> None:
        _check_past_product(self.name, self.past_product)

    def parts(self) -> tuple[Transform, ...]:
        direction = scale_by_nadam(lr=self.lr, b1=self.betas[0], b2=self.betas[1], eps=self.eps,
                                   momentum_decay=self.momentum_decay,
                                   past_product=self.past_product)
        return _decayed(direction, self.lr, self.weight_decay, self.decoupled_weight_decay,
                        self.on("weight_decay"))


# --- RAdam ---------------------------------------------------------------------------------------


class RadamCoeffs(NamedTuple):
    one_minus_b1: Any
    b2: Any
    one_minus_b2: Any
    bc1: Any  # 1 - b1^t
    lr: Any
    sqrt_bc2: Any  # sqrt(1 - b2^t)
    eps: Any
    rect: Any  # the variance rectification r_t (0 while rho_t <= 5)
    rectify: Any  # rho_t > 5: the adaptive step, else the momentum step


@dataclass(frozen=True)
class scale_by_radam(Elementwise):
    """RAdam's step (Liu et al., 2020), torch's form: with Adam's ``m`` and ``v`` and
    ``m_hat = m/(1 - b1^t)``, ``u <- m_hat*lr * sqrt(1-b2^t)/(sqrt(v) + eps) * r_t`` while
    ``rho_t > 5``, else ``u <- m_hat*lr``; ``rho_inf = 2/(1-b2) - 1``,
    ``rho_t = rho_inf - 2t*b2^t/(1-b2^t)``,
    ``r_t = sqrt((rho_t-4)(rho_t-2)rho_inf / ((rho_inf-4)(rho_inf-2)rho_t))``."""

    lr: Any = hyper(1e-3, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")
    makes_step: ClassVar[bool] = True

    def coeffs(self, step: int) -> RadamCoeffs:
        c1, c2 = self.one_minus("b1"), self.one_minus("b2")
        traced = [x for x in (step, self.b1, self.b2) if _traced(x)]
        t = step + 1 if traced else int(step) + 1
        bc2 = bias_correction(self.b2, c2, t - 1)
        # torch's b2^t on the host; traced (jax.jit), from the complement as bias_correction's
        b2t = self.b2**t if not traced else 1.0 - bc2
        rho_inf = 2.0 / c2 - 1.0
        rho_t = rho_inf - 2.0 * t * b2t / bc2
        ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        if traced:
            xp = namespace(traced[0])
            rectify = rho_t > 5.0
            rect = xp.where(rectify, xp.sqrt(xp.maximum(ratio, 0.0)), 0.0)
        else:
            rectify = rho_t > 5.0
            rect = math.sqrt(ratio) if rectify else 0.0
        return RadamCoeffs(
            one_minus_b1=c1, b2=self.b2, one_minus_b2=c2, bc1=bias_correction(self.b1, c1, t - 1),
            lr=self.lr, sqrt_bc2=bc2**0.5, eps=self.eps, rect=rect, rectify=rectify,
        )

    @staticmethod
    def kernel(xp, c, p, u, exp_avg, exp_avg_sq):
        m = lerp(exp_avg, u, c.one_minus_b1)
        v = ema_sq(exp_avg_sq, u, c.b2, c.one_minus_b2)
        step = (m / c.bc1) * c.lr
        adaptive = step * (c.sqrt_bc2 / (xp.sqrt(v) + c.eps)) * c.rect
        return select(xp, c.rectify, adaptive, step), m, v


@dataclass(frozen=True)
class radam(Rule):
    """RAdam (Liu et al., 2020) as torch writes it: :class:`scale_by_radam`, with
    ``g <- g + weight_decay*p`` before it, or with ``decoupled_weight_decay=True``
    ``p <- p*(1 - lr*weight_decay)`` beside it."""

    lr: Any = hyper(1e-3, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    decoupled_weight_decay: bool = False

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    def parts(self) -> tuple[Transform, ...]:
        direction = scale_by_radam(lr=self.lr, b1=self.betas[0], b2=self.betas[1], eps=self.eps)
        return _decayed(direction, self.lr, self.weight_decay, self.decoupled_weight_decay,
                        self.on("weight_decay"))
