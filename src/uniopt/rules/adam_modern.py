"""Adam's recent relatives: ADOPT (Taniguchi et al., 2024), AdEMAMix and its simplified form
(Pagliardini et al., 2024; Morwani et al., 2025).

None is in torch.optim: names and defaults are optax's (``optax.contrib``), with the forms of
pytorch-optimizer (and the authors' PyTorch code) reached through explicit options. The
warm-ups of AdEMAMix's ``alpha`` and ``b3`` are schedules (:class:`ademamix_alpha`,
:class:`ademamix_b3`), as any hyperparameter may be; so is ADOPT's clipping bound
(:class:`step_power`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, cast

from ..base import Elementwise, Info, Rule, Transform
from ..hyper import NONNEG, UNIT_OPEN, hyper
from ..moments import bias_correction, ema_sq, fma, lerp
from ..schedules import _check_count, _check_number, _namespace, _Record, _result, _Scalar
from ..transforms.decay import check_decay_form, decayed
from ..transforms.scale import scale_by_lr

# --- schedules ----------------------------------------------------------------------------------


def _real(xp: Any, step: Any) -> Any:
    """The step as a number to compute with: a JAX state's step is an int32 array, whose
    arithmetic with Python floats JAX does in float32 even under x64; this is the default float
    type (float64 under x64)."""
    return step if xp is _Scalar else xp.astype(step, xp.asarray(0.0).dtype)


@dataclass(frozen=True)
class step_power(_Record):
    """``(s + offset) ** power`` after ``s`` updates: ADOPT's clipping bound.

    ``step_power(0.25)`` is optax's ``clip_value_fn`` (``count ** 0.25``, 0 at the first update,
    1 at the first that moves); ``step_power(0.25, offset=1)`` is pytorch-optimizer's and the
    authors' code's ``step ** 0.25`` with ``step`` counted from 1.

    >>> import uniopt as uo
    >>> [uo.step_power(0.5)(k) for k in (0, 1, 4)]
    [0.0, 1.0, 2.0]
    """

    power: float = 0.25
    offset: float = 0.0

    def __post_init__(self) -> None:
        _check_number("step_power", "power", self.power)
        _check_number("step_power", "offset", self.offset)
        if self.offset < 0:
            raise ValueError(f"step_power: offset must be >= 0, got {self.offset!r}")

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        return _result(xp, xp.pow(_real(xp, step) + self.offset, self.power))


@dataclass(frozen=True)
class ademamix_alpha(_Record):
    """AdEMAMix's warm-up of ``alpha``: linear from ``start`` to ``alpha`` over ``steps``, then
    ``alpha``. With ``t = s + offset`` (``s`` updates applied), ``a = t/steps``:
    ``value = (1 - a)*start + a*alpha`` while ``t < steps``.

    ``offset=0`` is the authors' optax scheduler (``alpha_scheduler(alpha, 0, T)``, called by
    ``optax.contrib.ademamix`` with its 0-based count); ``offset=1`` is pytorch-optimizer's
    ``min(t*alpha/T, alpha)``, ``t`` counted from 1 (equal up to rounding).

    >>> import uniopt as uo
    >>> [uo.ademamix_alpha(4.0, steps=4)(k) for k in range(6)]
    [0.0, 1.0, 2.0, 3.0, 4.0, 4.0]
    """

    alpha: float
    steps: int
    start: float = 0.0
    offset: int = 0

    def __post_init__(self) -> None:
        _check_number("ademamix_alpha", "alpha", self.alpha)
        _check_number("ademamix_alpha", "start", self.start)
        _check_count("ademamix_alpha", "steps", self.steps)
        _check_count("ademamix_alpha", "offset", self.offset, allow_zero=True)

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        t = _real(xp, step) + self.offset
        a = xp.clip(t / self.steps, 0.0, 1.0)
        return _result(xp, xp.where(t < self.steps, (1.0 - a) * self.start + a * self.alpha,
                                    self.alpha))


@dataclass(frozen=True)
class ademamix_b3(_Record):
    """AdEMAMix's warm-up of ``b3``: the half-life ``f(b) = ln(1/2)/ln(b) - 1`` moves linearly
    from ``f(start)`` (``start`` usually ``b1``; 0.9, ademamix's ``b1``, by default) to ``f(b3)``
    over ``steps``, then ``b3``:
    ``value = (1/2) ** (1/(f + 1))`` with ``f = (1 - a) f(start) + a f(b3)``, ``a = t/steps``,
    ``t = s + offset``.

    ``offset=0`` is the authors' optax scheduler (``beta3_scheduler(b3, b1, T)``);
    ``offset=1`` is pytorch-optimizer's ``exp(ln b1 ln b3/((1 - a) ln b3 + a ln b1))``, the
    same function, ``t`` counted from 1, where ``b3 >= start``. pytorch-optimizer also caps it,
    ``min(., b3)``, and goes on with its formula past ``steps``, which differs for a warm-up
    down to a smaller ``b3`` (``start > b3``): its value is ``b3`` up to ``steps``, then falls
    below ``b3``; ours, the paper's, goes from ``start`` to ``b3`` and stays there.

    >>> import uniopt as uo
    >>> s = uo.ademamix_b3(0.9999, steps=100, start=0.9)
    >>> round(s(0), 12), s(100)
    (0.9, 0.9999)
    """

    b3: float
    steps: int
    start: float = 0.9  # (ademamix's b1; 0.0, the default before, was refused as a start)
    offset: int = 0

    def __post_init__(self) -> None:
        for name in ("b3", "start"):
            v = getattr(self, name)
            _check_number("ademamix_b3", name, v)
            if not 0 < v < 1:
                raise ValueError(f"ademamix_b3: {name} must be in (0, 1), got {v!r}")
        _check_count("ademamix_b3", "steps", self.steps)
        _check_count("ademamix_b3", "offset", self.offset, allow_zero=True)

    def __call__(self, step: int) -> float:
        xp = _namespace(step)
        t = _real(xp, step) + self.offset
        a = xp.clip(t / self.steps, 0.0, 1.0)
        half = math.log(0.5)
        f_start, f_end = half / math.log(self.start) - 1.0, half / math.log(self.b3) - 1.0
        f = (1.0 - a) * f_start + a * f_end
        return _result(xp, xp.where(t < self.steps, xp.pow(0.5, 1.0 / (f + 1.0)), self.b3))


# --- ADOPT --------------------------------------------------------------------------------------


class AdoptCoeffs(NamedTuple):
    one_minus_b1: Any  # 0 at the first update: m stays 0
    b2: Any  # 0 at the first update: v <- u^2
    one_minus_b2: Any  # 1 at the first update
    eps: Any
    clip: Any  # the bound on the normalised gradient (inf: no clipping)
    neg_clip: Any
    first: Any  # 1 at the first update, else 0: keeps u/max(sqrt(0), eps) finite at eps = 0


@dataclass(frozen=True)
class scale_by_adopt(Elementwise):
    """ADOPT's direction: the gradient normalised by the *previous* second moment.

    ``n <- clip(u/max(sqrt(v), eps), -c_t, c_t)``; ``m <- b1*m + (1-b1)*n``;
    ``v <- b2*v + (1-b2)*u^2``; ``u <- m`` (``nesterov``: ``b1*m + (1-b1)*n``). The first
    update only fills ``v <- u^2`` and returns 0. ``clip`` is ``c_t`` (a number or a schedule,
    by default ``step_power(0.25)``, optax's ``count**0.25``); ``use_clipping=False``: none.
    """

    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.9999, UNIT_OPEN)
    eps: Any = hyper(1e-6, NONNEG)
    clip: Any = hyper(step_power(0.25), NONNEG)
    use_clipping: bool = True
    nesterov: bool = False
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")

    def coeffs(self, step: Any) -> AdoptCoeffs:
        first, later = step == 0, step != 0
        # the first update as optax writes it (b1 -> 1, b2 -> 0), as products with the
        # step's switch, so a traced step (jax.jit) needs no branch. (at: a block built by
        # hand and not yet resolved by the engine still holds its default schedule)
        bound = cast(scale_by_adopt, self.at(step)).clip if self.use_clipping else math.inf
        return AdoptCoeffs(
            one_minus_b1=later * self.one_minus("b1"), b2=later * self.b2,
            one_minus_b2=first * 1.0 + later * self.one_minus("b2"), eps=self.eps,
            clip=bound, neg_clip=-bound, first=first * 1.0,
        )

    @property
    def kernel(self) -> Any:  # type: ignore[override]
        return _adopt_nesterov_kernel if self.nesterov else _adopt_kernel


def _adopt_kernel(xp, c, p, u, exp_avg, exp_avg_sq):
    n = u / (xp.maximum(xp.sqrt(exp_avg_sq), c.eps) + c.first)
    n = xp.minimum(xp.maximum(n, c.neg_clip), c.clip)
    m = lerp(exp_avg, n, c.one_minus_b1)
    return m, m, ema_sq(exp_avg_sq, u, c.b2, c.one_minus_b2)


def _adopt_nesterov_kernel(xp, c, p, u, exp_avg, exp_avg_sq):
    n = u / (xp.maximum(xp.sqrt(exp_avg_sq), c.eps) + c.first)
    n = xp.minimum(xp.maximum(n, c.neg_clip), c.clip)
    m = lerp(exp_avg, n, c.one_minus_b1)
    return lerp(m, n, c.one_minus_b1), m, ema_sq(exp_avg_sq, u, c.b2, c.one_minus_b2)


@dataclass(frozen=True)
class adopt(Rule):
    r"""ADOPT (Taniguchi et al., 2024): Adam with the gradient normalised by the previous
    second moment, then averaged, so it converges with any ``b2``.

    ``g <- g + weight_decay*p`` (``decay_form="l2"``); ``n = clip(g/max(sqrt(v), eps), c_t)``;
    ``m <- b1*m + (1-b1)*n``; ``p <- p - lr*m``; ``v <- b2*v + (1-b2)*g^2``. The first update
    only sets ``v = g^2`` (the parameters do not move). See :class:`scale_by_adopt`. At
    update ``t >= 2``, with ``lambda = weight_decay`` (``v_1 = g_1^2``, ``m_1 = 0``,
    ``p_1 = p_0``; by default ``c_t = (t - 1)^(1/4)``):

    $$
    \begin{aligned}
    g_t &\leftarrow g_t + \lambda\, p_{t-1} \\
    n_t &= \operatorname{clip}\left(\frac{g_t}{\max(\sqrt{v_{t-1}},\ \epsilon)},\
    -c_t,\ c_t\right) \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, n_t \\
    p_t &= p_{t-1} - \mathrm{lr} \cdot
    \begin{cases} \beta_1 m_t + (1 - \beta_1)\, n_t & \text{nesterov} \\
    m_t & \text{otherwise} \end{cases} \\
    v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2
    \end{aligned}
    $$

    Options: ``clip``: the bound ``c_t``, a number or a schedule (default
    ``step_power(0.25)``: ``c_t = s**0.25`` after ``s`` updates, optax's ``clip_value_fn``);
    ``use_clipping=False``: no clipping. ``nesterov``: ``p <- p - lr*(b1*m + (1-b1)*n)``
    (optax). ``decay_form``: ``"l2"`` (pytorch-optimizer's default); ``"decoupled"``:
    ``p <- p*(1 - lr*weight_decay)`` before the step (its ``weight_decouple=True``).

    Conventions: ``"optax"`` (``optax.contrib.adopt``; optax requires a learning rate, ours is
    pytorch-optimizer's 1e-3); ``"torch"``: ``pytorch_optimizer.ADOPT`` and the authors'
    PyTorch code, which count the steps from 1 with the initial step included, so their bound
    is one step later, ``clip=step_power(0.25, offset=1)`` (``2**0.25`` at the first update
    that moves, where optax has 1).
    """

    lr: Any = hyper(1e-3, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.9999, UNIT_OPEN)
    eps: Any = hyper(1e-6, NONNEG)
    clip: Any = hyper(step_power(0.25), NONNEG)
    use_clipping: bool = True
    nesterov: bool = False
    weight_decay: Any = hyper(0.0, NONNEG)
    decay_form: str = "l2"
    convention: str = "optax"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "optax": {},
        "torch": {"clip": step_power(0.25, offset=1)},
    }

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="adam",
        paper="Taniguchi et al. (2024)",
        references=("optax.contrib.adopt", "pytorch_optimizer.ADOPT"),
        example={"lr": 0.1, "b2": 0.99},
        budget=1000,
    )

    def check(self) -> None:
        check_decay_form(self.name, self.decay_form)

    def parts(self) -> tuple[Transform, ...]:
        direction = scale_by_adopt(b1=self.b1, b2=self.b2, eps=self.eps, clip=self.clip,
                                   use_clipping=self.use_clipping, nesterov=self.nesterov)
        return decayed((direction, scale_by_lr(lr=self.lr)), self.lr, self.weight_decay,
                       self.decay_form, self.on("weight_decay"))


# --- AdEMAMix -----------------------------------------------------------------------------------


class AdemamixCoeffs(NamedTuple):
    one_minus_b1: Any
    b2: Any
    one_minus_b2: Any
    one_minus_b3: Any
    alpha: Any
    bc1: Any  # 1 - b1^t
    sqrt_bc2: Any  # sqrt(1 - b2^t)
    eps_root_bc2: Any  # eps_root*(1 - b2^t): sqrt(v + this)/sqrt_bc2 = sqrt(v_hat + eps_root)
    eps: Any
    lr: Any


@dataclass(frozen=True)
class scale_by_ademamix(Elementwise):
    """AdEMAMix's step: Adam's ``m1``, ``v`` and a slow EMA ``m2 <- b3*m2 + (1-b3)*u``;
    ``u <- lr*(m1_hat + alpha*m2)/(sqrt(v_hat + eps_root) + eps)`` (``m2`` not
    bias-corrected). ``b3`` and ``alpha`` are usually schedules (:class:`ademamix_b3`,
    :class:`ademamix_alpha`)."""

    lr: Any = hyper(1e-3, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    b3: Any = hyper(0.9999, UNIT_OPEN)
    alpha: Any = hyper(5.0, NONNEG)
    eps: Any = hyper(1e-8, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_slow", "exp_avg_sq")
    makes_step: ClassVar[bool] = True

    def coeffs(self, step: Any) -> AdemamixCoeffs:
        c1, c2 = self.one_minus("b1"), self.one_minus("b2")
        bc2 = bias_correction(self.b2, c2, step)
        return AdemamixCoeffs(
            one_minus_b1=c1, b2=self.b2, one_minus_b2=c2, one_minus_b3=self.one_minus("b3"),
            alpha=self.alpha, bc1=bias_correction(self.b1, c1, step), sqrt_bc2=bc2**0.5,
            eps_root_bc2=self.eps_root * bc2, eps=self.eps, lr=self.lr,
        )

    @staticmethod
    def kernel(xp, c, p, u, exp_avg, exp_avg_slow, exp_avg_sq):
        m1 = lerp(exp_avg, u, c.one_minus_b1)
        m2 = lerp(exp_avg_slow, u, c.one_minus_b3)
        v = ema_sq(exp_avg_sq, u, c.b2, c.one_minus_b2)
        mixed = fma(c.alpha, m2, m1 / c.bc1)  # pytorch-optimizer's m1/bc1, then add(alpha=)
        den = xp.sqrt(v + c.eps_root_bc2) / c.sqrt_bc2 + c.eps
        return (c.lr * mixed) / den, m1, m2, v


@dataclass(frozen=True)
class ademamix(Rule):
    r"""AdEMAMix (Pagliardini et al., 2024): Adam whose numerator mixes a fast and a slow EMA.

    ``m1 <- b1*m1 + (1-b1)*g``; ``m2 <- b3*m2 + (1-b3)*g``; ``v <- b2*v + (1-b2)*g^2``;
    ``p <- p - lr*((m1/(1-b1^t) + alpha*m2)/(sqrt(v/(1-b2^t) + eps_root) + eps) + wd*p)``.
    At step ``t`` (from 1), with ``lambda = weight_decay`` (``decay_form="decoupled"``):

    $$
    \begin{aligned}
    m^{(1)}_t &= \beta_1 m^{(1)}_{t-1} + (1 - \beta_1)\, g_t, \qquad
    m^{(2)}_t = \beta_3 m^{(2)}_{t-1} + (1 - \beta_3)\, g_t \\
    v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
    p_t &= p_{t-1} - \mathrm{lr} \left(
    \frac{m^{(1)}_t / (1 - \beta_1^t) + \alpha\, m^{(2)}_t}
    {\sqrt{v_t / (1 - \beta_2^t) + \epsilon_{root}} + \epsilon}
    + \lambda\, p_{t-1}\right)
    \end{aligned}
    $$
    The paper warms ``alpha`` and ``b3`` up over ``T`` steps: pass
    ``alpha=ademamix_alpha(alpha, T)`` and ``b3=ademamix_b3(b3, T, start=b1)`` (the authors'
    optax schedulers; ``offset=1`` for pytorch-optimizer's ``t_alpha_beta3=T``).

    Options: ``decay_form``: ``"decoupled"`` (optax: ``p <- p - lr*(... + wd*p)``);
    ``"l2"``: ``g <- g + wd*p`` through the moments (pytorch-optimizer's default).

    Conventions: ``"optax"`` (``optax.contrib.ademamix``; lr required there, ours is 1e-3);
    ``"torch"`` (``pytorch_optimizer.AdEMAMix``: ``betas=(b1, b2, b3)``, L2 decay).
    ``optax.contrib.scale_by_ademamix`` defaults to ``alpha=6``, its ``ademamix`` to 5: ours 5.
    """

    lr: Any = hyper(1e-3, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    b3: Any = hyper(0.9999, UNIT_OPEN)
    alpha: Any = hyper(5.0, NONNEG)
    eps: Any = hyper(1e-8, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    decay_form: str = "decoupled"
    convention: str = "optax"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "optax": {},
        "torch": {"decay_form": "l2"},
    }

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="adam",
        paper="Pagliardini et al. (2024)",
        references=("optax.contrib.ademamix", "pytorch_optimizer.AdEMAMix"),
        example={"lr": 0.05, "b3": 0.95, "alpha": 1.0},
        budget=1000,
    )

    def check(self) -> None:
        check_decay_form(self.name, self.decay_form)

    def parts(self) -> tuple[Transform, ...]:
        direction = scale_by_ademamix(lr=self.lr, b1=self.b1, b2=self.b2, b3=self.b3,
                                      alpha=self.alpha, eps=self.eps, eps_root=self.eps_root)
        return decayed((direction,), self.lr, self.weight_decay, self.decay_form,
                       self.on("weight_decay"))


class SimplifiedAdemamixCoeffs(NamedTuple):
    b1: Any
    b2: Any
    one_minus_b2: Any
    alpha: Any
    sqrt_bc2: Any
    eps_root_bc2: Any
    eps: Any
    lr: Any


@dataclass(frozen=True)
class scale_by_simplified_ademamix(Elementwise):
    """Simplified AdEMAMix's step: ``m <- b1*m + u`` (an undamped sum), Adam's ``v``;
    ``u <- lr*(m + alpha*u)/(sqrt(v_hat + eps_root) + eps)``."""

    lr: Any = hyper(1e-3, NONNEG)
    b1: Any = hyper(0.99, UNIT_OPEN)
    b2: Any = hyper(0.95, UNIT_OPEN)
    alpha: Any = hyper(0.0, NONNEG)
    eps: Any = hyper(1e-8, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")
    makes_step: ClassVar[bool] = True

    def coeffs(self, step: Any) -> SimplifiedAdemamixCoeffs:
        c2 = self.one_minus("b2")
        bc2 = bias_correction(self.b2, c2, step)
        return SimplifiedAdemamixCoeffs(
            b1=self.b1, b2=self.b2, one_minus_b2=c2, alpha=self.alpha, sqrt_bc2=bc2**0.5,
            eps_root_bc2=self.eps_root * bc2, eps=self.eps, lr=self.lr,
        )

    @staticmethod
    def kernel(xp, c, p, u, exp_avg, exp_avg_sq):
        m = fma(c.b1, exp_avg, u)
        v = ema_sq(exp_avg_sq, u, c.b2, c.one_minus_b2)
        den = xp.sqrt(v + c.eps_root_bc2) / c.sqrt_bc2 + c.eps
        return (c.lr * fma(c.alpha, u, m)) / den, m, v


@dataclass(frozen=True)
class simplified_ademamix(Rule):
    r"""Simplified AdEMAMix (Morwani et al., 2025), as ``optax.contrib.simplified_ademamix``.

    ``m <- b1*m + g`` (no ``1-b1`` factor); ``v <- b2*v + (1-b2)*g^2``;
    ``p <- p - lr*((m + alpha*g)/(sqrt(v/(1-b2^t) + eps_root) + eps) + wd*p)``. ``alpha = 0``
    is Adam with ``lr/(1-b1)`` and no first-moment bias correction. At step ``t`` (from 1),
    with ``lambda = weight_decay``:

    $$
    \begin{aligned}
    m_t &= \beta_1 m_{t-1} + g_t, \qquad v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
    p_t &= p_{t-1} - \mathrm{lr} \left(
    \frac{m_t + \alpha\, g_t}{\sqrt{v_t / (1 - \beta_2^t) + \epsilon_{root}} + \epsilon}
    + \lambda\, p_{t-1}\right)
    \end{aligned}
    $$

    ``pytorch_optimizer.SimplifiedAdEMAMix`` is another algorithm under that name (a damped
    EMA, a running sum of bias corrections in its denominator, a ``b1`` warm-up), not this one.
    """

    lr: Any = hyper(1e-3, NONNEG)
    b1: Any = hyper(0.99, UNIT_OPEN)
    b2: Any = hyper(0.95, UNIT_OPEN)
    alpha: Any = hyper(0.0, NONNEG)
    eps: Any = hyper(1e-8, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="adam",
        paper="Morwani et al. (2025)",
        references=("optax.contrib.simplified_ademamix",),
        example={"lr": 0.002, "b1": 0.9},
    )

    def parts(self) -> tuple[Transform, ...]:
        direction = scale_by_simplified_ademamix(lr=self.lr, b1=self.b1, b2=self.b2,
                                                 alpha=self.alpha, eps=self.eps,
                                                 eps_root=self.eps_root)
        return decayed((direction,), self.lr, self.weight_decay, "decoupled",
                       self.on("weight_decay"))
