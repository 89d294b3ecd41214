"""Adam (Kingma & Ba, 2015) and its family: AMSGrad, AdamW, optimistic Adam."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, cast

from ..base import Elementwise, Info, Kernel, Rule, Transform
from ..hyper import NONNEG, UNIT_OPEN, hyper
from ..moments import bias_correction, ema_sq, lerp, select
from ..transforms.decay import check_decay_form, decayed, decoupled_weight_decay, weight_decay
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
    ``m_hat = b1*m/(1-b1^(t+1)) + (1-b1)*u/(1-b1^t)``. ``folded_lr`` (1: the direction alone,
    as optax's ``scale_by_adam``) is a learning rate folded in as torch folds it,
    ``((lr/(1-b1^t))*m)/denom``, so the rules that pass theirs round as torch's ``addcdiv``
    does (a chain of blocks keeps ``scale_by_lr``, and one ``lr`` for :func:`uniopt.adjust`).
    """

    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    nesterov: bool = False
    folded_lr: Any = hyper(1.0, NONNEG)
    eps_floor16: bool = False
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")

    def coeffs(self, step: int) -> AdamCoeffs:
        c1, c2 = self.one_minus("b1"), self.one_minus("b2")
        bc1, bc2 = bias_correction(self.b1, c1, step), bias_correction(self.b2, c2, step)
        if self.nesterov:
            m_scale = self.folded_lr * self.b1 / bias_correction(self.b1, c1, step + 1)
            u_scale = self.folded_lr * c1 / bc1
        else:
            m_scale, u_scale = self.folded_lr / bc1, 0.0
        return AdamCoeffs(
            one_minus_b1=c1, b2=self.b2, one_minus_b2=c2, m_scale=m_scale, u_scale=u_scale,
            sqrt_bc2=bc2**0.5, eps_root_bc2=_times_bc2(self.eps_root, bc2), eps=self.eps,
        )

    @property
    def kernel(self) -> Kernel:  # type: ignore[override]
        return nadam_kernel if self.nesterov else adam_kernel


def _times_bc2(eps_root: Any, bc2: Any) -> Any:
    """``eps_root*(1 - b2^t)``, a host 0 where ``eps_root`` is one (torch's Adam has none): under
    ``jax.jit`` XLA drops ``v + 0``, where ``0*bc2``, a traced value, is an addition per
    element."""
    return 0.0 if isinstance(eps_root, float) and eps_root == 0.0 else eps_root * bc2


# Each Adam-family block has two kernels, plain and NAdam-style (optax's nesterov): the second
# adds u_scale*u, which the first leaves out (u_scale is 0) rather than compute: under jax.jit,
# 0*u is an operation per element, and it makes the params' fusion read u a second time


def adam_kernel(xp, c, p, u, exp_avg, exp_avg_sq):
    m = lerp(exp_avg, u, c.one_minus_b1)
    v = ema_sq(exp_avg_sq, u, c.b2, c.one_minus_b2)
    return c.m_scale * m / (xp.sqrt(v + c.eps_root_bc2) / c.sqrt_bc2 + c.eps), m, v


def nadam_kernel(xp, c, p, u, exp_avg, exp_avg_sq):
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

    @property
    def kernel(self) -> Kernel:  # type: ignore[override]
        return amsgrad_nadam_kernel if self.nesterov else amsgrad_kernel


def amsgrad_kernel(xp, c, p, u, exp_avg, exp_avg_sq, max_exp_avg_sq):
    m = lerp(exp_avg, u, c.one_minus_b1)
    v = ema_sq(exp_avg_sq, u, c.b2, c.one_minus_b2)
    v_max = xp.maximum(max_exp_avg_sq, v)
    return c.m_scale * m / (xp.sqrt(v_max + c.eps_root_bc2) / c.sqrt_bc2 + c.eps), m, v, v_max


def amsgrad_nadam_kernel(xp, c, p, u, exp_avg, exp_avg_sq, max_exp_avg_sq):
    m = lerp(exp_avg, u, c.one_minus_b1)
    v = ema_sq(exp_avg_sq, u, c.b2, c.one_minus_b2)
    v_max = xp.maximum(max_exp_avg_sq, v)
    m_hat = c.m_scale * m + c.u_scale * u
    return m_hat / (xp.sqrt(v_max + c.eps_root_bc2) / c.sqrt_bc2 + c.eps), m, v, v_max


def _eps_hat(c: AdamCoeffs) -> AdamCoeffs:
    """keras's "epsilon hat": eps added to the uncorrected root, ``sqrt(v) + eps``, is
    ``eps/sqrt(1 - b2^t)`` added to the corrected one."""
    return c._replace(eps=c.eps / c.sqrt_bc2)


@dataclass(frozen=True)
class scale_by_adam_eps_hat(scale_by_adam):
    """:class:`scale_by_adam` as keras writes it: ``sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v) + eps)``."""

    def coeffs(self, step: int) -> AdamCoeffs:
        return _eps_hat(super().coeffs(step))


@dataclass(frozen=True)
class scale_by_amsgrad_eps_hat(scale_by_amsgrad):
    """:class:`scale_by_amsgrad` with keras's eps on the uncorrected root of ``v_max``."""

    def coeffs(self, step: int) -> AdamCoeffs:
        return _eps_hat(super().coeffs(step))


class AmsgradHatCoeffs(NamedTuple):
    one_minus_b1: Any
    b2: Any
    one_minus_b2: Any
    m_scale: Any
    u_scale: Any
    bc2: Any  # 1 - b2^t: v_hat = v/bc2
    eps_root: Any
    eps: Any


@dataclass(frozen=True)
class scale_by_amsgrad_hat(scale_by_adam):
    """optax's AMSGrad: ``v_max <- max(v_max, v_hat)`` of the *corrected* ``v_hat``;
    ``u <- m_hat/(sqrt(v_max + eps_root) + eps)``."""

    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def coeffs(self, step: int) -> Any:  # AmsgradHatCoeffs
        c = super().coeffs(step)
        return AmsgradHatCoeffs(
            one_minus_b1=c.one_minus_b1, b2=c.b2, one_minus_b2=c.one_minus_b2,
            m_scale=c.m_scale, u_scale=c.u_scale,
            bc2=bias_correction(self.b2, c.one_minus_b2, step), eps_root=self.eps_root, eps=c.eps,
        )

    @property
    def kernel(self) -> Kernel:  # type: ignore[override]
        return amsgrad_hat_nadam_kernel if self.nesterov else amsgrad_hat_kernel


def amsgrad_hat_kernel(xp, c, p, u, exp_avg, exp_avg_sq, max_exp_avg_sq):
    m = lerp(exp_avg, u, c.one_minus_b1)
    v = ema_sq(exp_avg_sq, u, c.b2, c.one_minus_b2)
    v_max = xp.maximum(max_exp_avg_sq, v / c.bc2)
    return c.m_scale * m / (xp.sqrt(v_max + c.eps_root) + c.eps), m, v, v_max


def amsgrad_hat_nadam_kernel(xp, c, p, u, exp_avg, exp_avg_sq, max_exp_avg_sq):
    m = lerp(exp_avg, u, c.one_minus_b1)
    v = ema_sq(exp_avg_sq, u, c.b2, c.one_minus_b2)
    v_max = xp.maximum(max_exp_avg_sq, v / c.bc2)
    m_hat = c.m_scale * m + c.u_scale * u
    return m_hat / (xp.sqrt(v_max + c.eps_root) + c.eps), m, v, v_max


@dataclass(frozen=True)
class scale_by_amsgrad_raw_hat(scale_by_amsgrad_hat):
    """optax's AMSGrad with ``bias_correction_nu=False``: ``v_max <- max(v_max, v)`` of the raw
    ``v``, never corrected; ``u <- m_hat/(sqrt(v_max + eps_root) + eps)``."""

    def coeffs(self, step: int) -> Any:  # AmsgradHatCoeffs
        return super().coeffs(step)._replace(bc2=1.0)


@dataclass(frozen=True)
class scale_by_amsgrad_uncorrected(scale_by_amsgrad):
    """Optimisers.jl's AMSGrad: neither moment bias-corrected, ``u <- m/(sqrt(v_max) + eps)``
    (``v_max`` the maximum of the raw ``v``). ``moments_init="eps"``: ``m``, ``v`` and ``v_max``
    start at ``eps``, as Optimisers.jl's do."""

    moments_init: str = "zero"

    def init_slots(self, p: Any, xp: Any) -> tuple[Any, ...]:
        if self.moments_init == "zero":
            return super().init_slots(p, xp)
        # a schedule's first value: Optimisers.jl reads its eps once, at setup
        eps = cast(scale_by_adam, self.at(0)).eps
        return tuple(xp.full_like(p, eps) for _ in self.slots)

    def coeffs(self, step: int) -> AdamCoeffs:
        c = super().coeffs(step)
        return c._replace(m_scale=self.folded_lr, u_scale=0.0, sqrt_bc2=1.0,
                          eps_root_bc2=self.eps_root)


def _adam_block(betas: tuple[Any, Any], eps: Any, amsgrad: bool, lr: Any,
                eps_floor16: bool = False) -> Elementwise:
    return (scale_by_amsgrad if amsgrad else scale_by_adam)(b1=betas[0], b2=betas[1], eps=eps,
                                                             folded_lr=lr,
                                                             eps_floor16=eps_floor16)


AMSGRAD_MAX = ("raw", "corrected", "raw_uncorrected", "uncorrected")
MOMENTS_INIT = ("zero", "eps")


def _choice(owner: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(repr, allowed))}, "
                         f"got {value!r}")


def _check_adam_options(rule: Any) -> None:
    _choice(rule.name, "amsgrad_max", rule.amsgrad_max, AMSGRAD_MAX)
    _choice(rule.name, "moments_init", rule.moments_init, MOMENTS_INIT)
    if not rule.amsgrad:
        return  # the AMSGrad options are not used
    if rule.moments_init == "eps" and rule.amsgrad_max != "uncorrected":
        raise ValueError(f"{rule.name}: moments_init='eps' is Optimisers.jl's AMSGrad, with "
                         f"amsgrad_max='uncorrected'; got amsgrad_max={rule.amsgrad_max!r}")
    if rule.eps_hat and rule.amsgrad_max != "raw":
        raise ValueError(f"{rule.name}: eps_hat (keras) takes the maximum of the raw v, "
                         f"amsgrad_max='raw'; got amsgrad_max={rule.amsgrad_max!r}")


def _direction(rule: Any) -> Elementwise:
    """Adam's direction with the rule's options; torch's own block where they are torch's."""
    plain = not (rule.eps_hat or rule.on("eps_root"))
    floor = getattr(rule, "eps_floor16", False)  # adamw has none: Optimisers.jl's AdamW
    if plain and (not rule.amsgrad or rule.amsgrad_max == "raw"):
        return _adam_block(rule.betas, rule.eps, rule.amsgrad, rule.lr, floor)
    b1, b2 = rule.betas
    kw = dict(b1=b1, b2=b2, eps=rule.eps, eps_root=rule.eps_root, folded_lr=rule.lr,
              eps_floor16=floor)
    if not rule.amsgrad:
        return (scale_by_adam_eps_hat if rule.eps_hat else scale_by_adam)(**kw)
    if rule.amsgrad_max == "corrected":
        return scale_by_amsgrad_hat(**kw)
    if rule.amsgrad_max == "raw_uncorrected":
        return scale_by_amsgrad_raw_hat(**kw)
    if rule.amsgrad_max == "uncorrected":
        return scale_by_amsgrad_uncorrected(**kw, moments_init=rule.moments_init)
    return (scale_by_amsgrad_eps_hat if rule.eps_hat else scale_by_amsgrad)(**kw)


@dataclass(frozen=True)
class adam(Rule):
    r"""Adam (Kingma & Ba, 2015) as torch writes it.

    ``g <- g + weight_decay*p`` (L2: the decay passes through the moments; that is *not*
    AdamW); ``p <- p - lr * m_hat/(sqrt(v_hat) + eps)`` with the moments of
    :class:`scale_by_adam` (``amsgrad``: :class:`scale_by_amsgrad`). At step ``t`` (from 1),
    with ``(b1, b2) = betas`` and ``lambda = weight_decay``:

    $$
    \begin{aligned}
    g_t &\leftarrow g_t + \lambda\, p_{t-1} \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
    \hat m_t &= \frac{m_t}{1 - \beta_1^t}, \qquad \hat v_t = \frac{v_t}{1 - \beta_2^t} \\
    p_t &= p_{t-1} - \mathrm{lr}\, \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}
    \end{aligned}
    $$

    Options (``convention=`` sets them, and the defaults, as the framework it names has them;
    an option given by the caller is kept):

    - ``eps_root``: optax's eps inside the root, ``m_hat/(sqrt(v_hat + eps_root) + eps)``.
    - ``eps_hat``: keras's ``lr*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v) + eps)``, eps on the
      uncorrected root (torch's form with eps replaced by ``eps/sqrt(1-b2^t)``).
    - ``amsgrad_max``: ``"raw"``: the maximum of the raw ``v``, then corrected (torch, keras);
      ``"corrected"``: of ``v_hat`` (optax); ``"raw_uncorrected"``: of the raw ``v``, which
      stays uncorrected, ``m`` corrected (optax's ``bias_correction_nu=False``);
      ``"uncorrected"``: of the raw ``v``, neither
      moment bias-corrected (Optimisers.jl's AMSGrad). Used with ``amsgrad=True``.
    - ``moments_init``: ``"zero"``; ``"eps"``: AMSGrad's ``m``, ``v``, ``v_max`` start at
      ``eps`` (Optimisers.jl; needs ``amsgrad_max="uncorrected"``).
    - ``decay_form``: ``"l2"`` (torch's, above); ``"decoupled"``: keras's
      ``p <- p - lr*weight_decay*p`` before the step (keras's ``Adam(weight_decay=)``, AdamW).

    Conventions: ``"torch"``; ``"optax"`` (``optax.adam``, ``optax.amsgrad``: max of ``v_hat``;
    optax requires a learning rate, ours keeps 1e-3); ``"keras"`` (eps 1e-7, ``eps_hat``,
    decoupled decay);
    ``"flux"`` (Optimisers.jl >= 0.4 ``Adam``, ``AMSGrad``: uncorrected, moments from eps;
    ``eps_floor16``: float16 leaves take eps ``max(Float16(1e-7), Float16(eps))``, its ``_eps``,
    as do its RMSProp, AdaGrad, AdaDelta, AdaMax, NAdam, RAdam and OAdam).
    Optimisers.jl raises eps to ``max(Float16(1e-7), Float16(eps))`` (unless 0) for Float16
    parameters; uniopt computes float16 leaves in float32 and keeps the eps given.

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
    eps_root: Any = hyper(0.0, NONNEG)
    eps_hat: bool = False
    amsgrad_max: str = "raw"
    moments_init: str = "zero"
    decay_form: str = "l2"
    eps_floor16: bool = False
    convention: str = "torch"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {},
        "optax": {"amsgrad_max": "corrected"},
        "keras": {"eps": 1e-7, "eps_hat": True, "decay_form": "decoupled"},
        "flux": {"amsgrad_max": "uncorrected", "moments_init": "eps",
                 "eps_floor16": True},
    }

    optional: ClassVar[tuple[str, ...]] = ("weight_decay", "eps_root")

    info: ClassVar[Info] = Info(
        family="adam",
        paper="Kingma & Ba (2015)",
        references=(
            "torch.optim.Adam",
            "optax.adam",
            "optax.amsgrad",
            "keras.optimizers.Adam",
            "formula:Optimisers.Adam",
        ),
        example={"lr": 0.1},
        budget=500,
    )

    def check(self) -> None:
        _check_adam_options(self)
        check_decay_form(self.name, self.decay_form)

    def parts(self) -> tuple[Transform, ...]:
        return decayed((_direction(self),), self.lr, self.weight_decay, self.decay_form,
                       self.on("weight_decay"))


@dataclass(frozen=True)
class adamw(Rule):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    ``couple_lr=True`` (default) is torch's AdamW: ``p <- p - lr*(A + weight_decay*p)``.
    ``couple_lr=False`` is Flux's original form, decay independent of the learning rate:
    ``p <- p - lr*A - weight_decay*p``. ``A`` is Adam's direction (:class:`scale_by_adam`),
    with ``lambda = weight_decay``:

    $$
    A_t = \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}, \qquad
    p_t = \begin{cases}
    p_{t-1} - \mathrm{lr}\,(A_t + \lambda\, p_{t-1}) & \texttt{couple_lr=True} \\
    p_{t-1} - \mathrm{lr}\, A_t - \lambda\, p_{t-1} & \texttt{couple_lr=False}
    \end{cases}
    $$

    The paper's ``p <- p - eta_t*(alpha*A + lam*p)`` is ``couple_lr=False`` with
    ``lr = eta_t*alpha`` and ``weight_decay = eta_t*lam`` as two schedules (see the docs'
    Weight decay page, docs/weight-decay.md).
    ``eps_root``, ``eps_hat``, ``amsgrad_max``, ``moments_init`` are :class:`adam`'s options.

    Conventions: ``"torch"`` (weight_decay 1e-2); ``"optax"`` (``optax.adamw``, weight_decay
    1e-4; optax requires a learning rate, ours keeps 1e-3); ``"keras"`` (eps 1e-7, weight_decay
    4e-3, ``eps_hat``); ``"flux"`` (Optimisers.jl >= 0.4 ``AdamW``, lambda 0, ``couple=true``;
    its ``couple=false`` is ``couple_lr=False``; its AdamW has no Float16 eps floor);
    ``"paper"`` (``couple_lr=False``, weight_decay 1e-5: torch's default ``lr*weight_decay``
    per step, the paper giving none).
    """

    lr: Any = hyper(1e-3, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(1e-2, NONNEG)
    amsgrad: bool = False
    couple_lr: bool = True
    eps_root: Any = hyper(0.0, NONNEG)
    eps_hat: bool = False
    amsgrad_max: str = "raw"
    moments_init: str = "zero"
    convention: str = "torch"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {},
        # optax.adamw requires a learning rate: ours keeps torch's 1e-3
        "optax": {"weight_decay": 1e-4},
        "keras": {"eps": 1e-7, "weight_decay": 4e-3, "eps_hat": True},
        "flux": {"weight_decay": 0.0},
        "paper": {"couple_lr": False, "weight_decay": 1e-5},
    }

    optional: ClassVar[tuple[str, ...]] = ("eps_root",)

    info: ClassVar[Info] = Info(
        family="adam",
        paper="Loshchilov & Hutter (2019)",
        references=(
            "torch.optim.AdamW",
            "optax.adamw",
            "keras.optimizers.AdamW",
            "formula:Optimisers.AdamW",
        ),
        example={"lr": 0.1, "weight_decay": 0.0},
        budget=500,
    )

    def check(self) -> None:
        _check_adam_options(self)

    def parts(self) -> tuple[Transform, ...]:
        step = _direction(self)
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
class scale_by_optimistic_gradient_from_zero(scale_by_optimistic_gradient):
    """As :class:`scale_by_optimistic_gradient` with ``u_prev = 0`` on the first update
    (Optimisers.jl's ``OAdam``: its first step is ``2*term``)."""

    def coeffs(self, step: int) -> OptimisticCoeffs:
        return super().coeffs(step)._replace(first=False)


FIRST_PREV = ("current", "zero")


@dataclass(frozen=True)
class optimistic_adam(Rule):
    r"""Optimistic Adam (Daskalakis et al., 2018) with optax's ``optimistic_adam_v2`` semantics.

    ``r_t`` is Adam's direction (:class:`scale_by_adam`, ``nesterov=True`` by default as in
    optax); ``p <- p - lr*((alpha + beta)*r_t - beta*r_{t-1})``, ``r_0 = r_1``. Every
    hyperparameter, ``lr`` included, may be a schedule (optax's v1 crashed on one). At step
    ``t`` (from 1):

    $$
    \begin{aligned}
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
    \hat m_t &= \frac{\beta_1 m_t}{1 - \beta_1^{t+1}} + \frac{(1 - \beta_1)\, g_t}{1 - \beta_1^t}
    \quad \left(\text{not nesterov: } \frac{m_t}{1 - \beta_1^t}\right) \\
    r_t &= \frac{\hat m_t}{\sqrt{v_t / (1 - \beta_2^t) + \epsilon_{root}} + \epsilon} \\
    p_t &= p_{t-1} - \mathrm{lr}\left((\alpha + \beta)\, r_t - \beta\, r_{t-1}\right)
    \end{aligned}
    $$

    Options:

    - ``first_prev``: ``"current"``: ``r_0 = r_1`` (optax); ``"zero"``: ``r_0 = 0``, so the
      first step is ``lr*(alpha + beta)*r_1`` (Optimisers.jl's ``OAdam``).
    - ``remember_lr``: the remembered term is ``lr_{t-1}*r_{t-1}``, made with its own step's
      learning rate (Optimisers.jl keeps ``term = eta*r``); the same at a constant lr.

    Conventions: ``"optax"`` (``optax.optimistic_adam_v2``; lr required); ``"flux"``
    (Optimisers.jl ``OAdam(eta=1e-3, beta=(0.5, 0.9))``: ``Δ = 2*term - term_prev``, so
    ``alpha = beta = 1``, ``nesterov=False``, ``first_prev="zero"``, ``remember_lr``).
    """

    lr: Any = hyper(valid=NONNEG)
    alpha: Any = hyper(1.0, NONNEG)
    beta: Any = hyper(1.0, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    nesterov: bool = True
    first_prev: str = "current"
    remember_lr: bool = False
    eps_floor16: bool = False
    convention: str = "optax"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "optax": {},
        "flux": {"lr": 1e-3, "b1": 0.5, "b2": 0.9, "nesterov": False, "first_prev": "zero",
                 "remember_lr": True, "eps_floor16": True},
    }

    info: ClassVar[Info] = Info(
        family="adam",
        paper="Daskalakis et al. (2018)",
        references=("optax.optimistic_adam_v2", "formula:Optimisers.OAdam"),
        example={"lr": 0.03},
        budget=1000,
    )

    def check(self) -> None:
        _choice(self.name, "first_prev", self.first_prev, FIRST_PREV)

    def parts(self) -> tuple[Transform, ...]:
        direction = scale_by_adam(b1=self.b1, b2=self.b2, eps=self.eps, eps_root=self.eps_root,
                                  nesterov=self.nesterov, eps_floor16=self.eps_floor16)
        optimistic = (scale_by_optimistic_gradient if self.first_prev == "current"
                      else scale_by_optimistic_gradient_from_zero)(alpha=self.alpha,
                                                                   beta=self.beta)
        lr = scale_by_lr(lr=self.lr)
        return (direction, lr, optimistic) if self.remember_lr else (direction, optimistic, lr)
