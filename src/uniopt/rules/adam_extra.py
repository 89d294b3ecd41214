"""Adam's relatives as optax has them: AdaBelief, Yogi, AMSGrad, AdamaxW, NAdamW.

AdaBelief and Yogi are new blocks; AMSGrad, AdamaxW and NAdamW are the blocks of
:class:`~uniopt.adam`, :class:`~uniopt.adamax` and :class:`~uniopt.nadam` with optax's options,
under optax's names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import Elementwise, Info, Kernel, Rule, Transform
from ..hyper import NONNEG, UNIT_OPEN, hyper, static
from ..moments import bias_correction, ema_sq, lerp
from ..transforms.decay import decoupled_weight_decay
from ..transforms.scale import scale_by_lr
from .adam import (
    _choice,
    scale_by_adam,
    scale_by_amsgrad,
    scale_by_amsgrad_hat,
    scale_by_amsgrad_raw_hat,
)
from .adam_variants import MOMENTUM_SCHEDULES, scale_by_adamax, scale_by_nadam


class BeliefCoeffs(NamedTuple):
    one_minus_b1: Any
    b2: Any
    one_minus_b2: Any
    eps_root: Any
    m_scale: Any  # m_hat = m_scale*m + u_scale*u: 1/(1 - b1^t) and 0, or the Nesterov pair
    u_scale: Any
    bc2: Any  # 1 - b2^t
    eps: Any


@dataclass(frozen=True)
class scale_by_belief(Elementwise):
    """AdaBelief's direction, optax's ``scale_by_belief``: ``m <- b1*m + (1-b1)*u``;
    ``s <- b2*s + (1-b2)*(u - m)^2 + eps_root`` (``eps_root`` kept in ``s``);
    ``u <- m_hat/(sqrt(s/(1-b2^t)) + eps)``, ``m_hat = m/(1-b1^t)`` or, ``nesterov``,
    ``b1*m/(1-b1^(t+1)) + (1-b1)*u/(1-b1^t)``."""

    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-16, NONNEG)
    eps_root: Any = hyper(1e-16, NONNEG)
    nesterov: bool = False
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_var")

    def coeffs(self, step: int) -> BeliefCoeffs:
        c1, c2 = self.one_minus("b1"), self.one_minus("b2")
        bc1 = bias_correction(self.b1, c1, step)
        if self.nesterov:
            m_scale, u_scale = self.b1 / bias_correction(self.b1, c1, step + 1), c1 / bc1
        else:
            m_scale, u_scale = 1.0 / bc1, 0.0
        return BeliefCoeffs(one_minus_b1=c1, b2=self.b2, one_minus_b2=c2, eps_root=self.eps_root,
                            m_scale=m_scale, u_scale=u_scale,
                            bc2=bias_correction(self.b2, c2, step), eps=self.eps)

    @property
    def kernel(self) -> Kernel:  # type: ignore[override]
        return belief_nadam_kernel if self.nesterov else belief_kernel


# the plain kernel leaves out u_scale*u (u_scale is 0), as adam_kernel does


def belief_kernel(xp, c, p, u, exp_avg, exp_avg_var):
    m = lerp(exp_avg, u, c.one_minus_b1)
    s = ema_sq(exp_avg_var, u - m, c.b2, c.one_minus_b2) + c.eps_root
    return c.m_scale * m / (xp.sqrt(s / c.bc2) + c.eps), m, s


def belief_nadam_kernel(xp, c, p, u, exp_avg, exp_avg_var):
    m = lerp(exp_avg, u, c.one_minus_b1)
    s = ema_sq(exp_avg_var, u - m, c.b2, c.one_minus_b2) + c.eps_root
    m_hat = c.m_scale * m + c.u_scale * u
    return m_hat / (xp.sqrt(s / c.bc2) + c.eps), m, s


@dataclass(frozen=True)
class adabelief(Rule):
    r"""AdaBelief (Zhuang et al., 2020) as ``optax.adabelief``: Adam with the variance of the
    gradient around its mean, ``p <- p - lr*m_hat/(sqrt(s_hat) + eps)`` (:class:`scale_by_belief`).
    At step ``t`` (from 1), with ``(b1, b2) = betas``:

    $$
    \begin{aligned}
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
    s_t &= \beta_2 s_{t-1} + (1 - \beta_2)\, (g_t - m_t)^2 + \epsilon_{root} \\
    \hat m_t &= \begin{cases}
    \dfrac{\beta_1 m_t}{1 - \beta_1^{t+1}} + \dfrac{(1 - \beta_1)\, g_t}{1 - \beta_1^t}
    & \text{nesterov} \\[1ex]
    \dfrac{m_t}{1 - \beta_1^t} & \text{otherwise} \end{cases} \\
    p_t &= p_{t-1} - \mathrm{lr}\, \frac{\hat m_t}{\sqrt{s_t / (1 - \beta_2^t)} + \epsilon}
    \end{aligned}
    $$

    ``eps_root`` is added to ``s`` itself every step, where it accumulates, as optax and the
    authors' ``adabelief_pytorch`` (and ``pytorch_optimizer.AdaBelief``) do: their single
    ``eps`` is optax's ``eps`` and ``eps_root`` at one value, which optax's defaults (both
    1e-16, the authors' default eps) are. The authors' package also rectifies (RAdam's
    ``rectify=True``, its default) and decouples a weight decay; optax's, and this rule, do
    neither: chain :func:`~uniopt.weight_decay` for a decay.

    optax requires a learning rate; ours keeps 1e-3 (the authors').
    """

    lr: Any = hyper(1e-3, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    eps: Any = hyper(1e-16, NONNEG)
    eps_root: Any = hyper(1e-16, NONNEG)
    nesterov: bool = False

    info: ClassVar[Info] = Info(
        family="adam",
        paper="Zhuang et al. (2020)",
        references=("optax.adabelief",),
        example={"lr": 0.05},
        budget=1000,
    )

    def parts(self) -> tuple[Transform, ...]:
        return (scale_by_belief(b1=self.betas[0], b2=self.betas[1], eps=self.eps,
                                eps_root=self.eps_root, nesterov=self.nesterov),
                scale_by_lr(lr=self.lr))


class YogiCoeffs(NamedTuple):
    one_minus_b1: Any
    one_minus_b2: Any
    bc1: Any  # 1 - b1^t
    bc2: Any  # 1 - b2^t
    eps_root: Any
    eps: Any


@dataclass(frozen=True)
class scale_by_yogi(Elementwise):
    """Yogi's direction, optax's ``scale_by_yogi``: ``m <- b1*m + (1-b1)*u``;
    ``v <- v - (1-b2)*sign(v - u^2)*u^2``; ``u <- m_hat/(sqrt(v_hat + eps_root) + eps)``
    with both moments bias-corrected and both starting at ``initial_accumulator_value``."""

    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-3, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    initial_accumulator_value: float = static(1e-6, NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")

    def init_slots(self, p: Any, xp: Any) -> tuple[Any, ...]:
        value = self.initial_accumulator_value
        return (xp.full_like(p, value), xp.full_like(p, value))

    def coeffs(self, step: int) -> YogiCoeffs:
        c1, c2 = self.one_minus("b1"), self.one_minus("b2")
        return YogiCoeffs(one_minus_b1=c1, one_minus_b2=c2, bc1=bias_correction(self.b1, c1, step),
                          bc2=bias_correction(self.b2, c2, step), eps_root=self.eps_root,
                          eps=self.eps)

    @staticmethod
    def kernel(xp, c, p, u, exp_avg, exp_avg_sq):
        m = lerp(exp_avg, u, c.one_minus_b1)
        g2 = u * u
        v = exp_avg_sq - c.one_minus_b2 * xp.sign(exp_avg_sq - g2) * g2
        return (m / c.bc1) / (xp.sqrt(v / c.bc2 + c.eps_root) + c.eps), m, v


@dataclass(frozen=True)
class yogi(Rule):
    r"""Yogi (Zaheer et al., 2018) as ``optax.yogi``: Adam whose second moment moves towards
    ``g^2`` by at most ``(1-b2)*g^2`` a step (:class:`scale_by_yogi`),
    ``p <- p - lr*m_hat/(sqrt(v_hat + eps_root) + eps)``. At step ``t`` (from 1), with
    ``(b1, b2) = betas`` and ``m_0 = v_0 = initial_accumulator_value``:

    $$
    \begin{aligned}
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
    v_t &= v_{t-1} - (1 - \beta_2)\, \operatorname{sign}(v_{t-1} - g_t^2)\, g_t^2 \\
    p_t &= p_{t-1} - \mathrm{lr}\, \frac{m_t / (1 - \beta_1^t)}
    {\sqrt{v_t / (1 - \beta_2^t) + \epsilon_{root}} + \epsilon}
    \end{aligned}
    $$

    As optax (and ``pytorch_optimizer.Yogi``), both moments start at
    ``initial_accumulator_value`` and both are bias-corrected; the paper's Algorithm 2 corrects
    neither. optax requires a learning rate; ours keeps 1e-2 (the paper's).
    """

    lr: Any = hyper(1e-2, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    eps: Any = hyper(1e-3, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    initial_accumulator_value: float = static(1e-6, NONNEG)

    info: ClassVar[Info] = Info(
        family="adam",
        paper="Zaheer et al. (2018)",
        references=("optax.yogi",),
        example={"lr": 0.1},
        budget=1000,
    )

    def parts(self) -> tuple[Transform, ...]:
        return (scale_by_yogi(b1=self.betas[0], b2=self.betas[1], eps=self.eps,
                              eps_root=self.eps_root,
                              initial_accumulator_value=self.initial_accumulator_value),
                scale_by_lr(lr=self.lr))


AMSGRAD_FORMS = ("corrected", "raw", "raw_uncorrected")


@dataclass(frozen=True)
class amsgrad(Rule):
    r"""AMSGrad (Reddi et al., 2018) as ``optax.amsgrad``: Adam with
    ``v_max <- max(v_max, v_hat)`` of the bias-corrected ``v_hat``,
    ``p <- p - lr*m_hat/(sqrt(v_max + eps_root) + eps)``. It is :class:`~uniopt.adam` with
    ``amsgrad=True, amsgrad_max="corrected"`` (its blocks), under optax's name. At step ``t``
    (from 1), with ``(b1, b2) = betas``:

    $$
    \begin{aligned}
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
    \hat m_t &= \frac{m_t}{1 - \beta_1^t}, \qquad
    \hat v^{\max}_t = \max\left(\hat v^{\max}_{t-1},\ \frac{v_t}{1 - \beta_2^t}\right) \\
    p_t &= p_{t-1} - \mathrm{lr}\, \frac{\hat m_t}{\sqrt{\hat v^{\max}_t + \epsilon_{root}}
    + \epsilon}
    \end{aligned}
    $$

    (``amsgrad_max="raw"``: ``v_max_t = max(v_max_{t-1}, v_t)``, then
    ``sqrt(v_max_t/(1 - b2^t) + eps_root)`` in the denominator; ``"raw_uncorrected"``, optax's
    ``bias_correction_nu=False``: the same maximum, ``sqrt(v_max_t + eps_root)``.)

    Option: ``amsgrad_max``: ``"corrected"``: the maximum of ``v_hat`` (optax); ``"raw"``: of
    the raw ``v``, corrected afterwards (torch's ``Adam(amsgrad=True)``); ``"raw_uncorrected"``:
    of the raw ``v``, never corrected (optax's ``bias_correction_nu=False``).

    Conventions: ``"optax"`` (optax requires a learning rate, ours keeps 1e-3; its
    ``bias_correction_mu=False`` is not offered: ``uniopt.adam``'s ``convention="flux"``
    corrects neither moment); ``"torch"``.
    """

    lr: Any = hyper(1e-3, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    amsgrad_max: str = "corrected"
    convention: str = "optax"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "optax": {},
        "torch": {"amsgrad_max": "raw"},
    }

    info: ClassVar[Info] = Info(
        family="adam",
        paper="Reddi et al. (2018)",
        references=("optax.amsgrad", "torch.optim.Adam"),
        example={"lr": 2.0},  # the maximum of v keeps Rosenbrock's first, large, gradients
        budget=2000,
    )

    def check(self) -> None:
        _choice(self.name, "amsgrad_max", self.amsgrad_max, AMSGRAD_FORMS)

    def parts(self) -> tuple[Transform, ...]:
        block = {"corrected": scale_by_amsgrad_hat, "raw": scale_by_amsgrad,
                 "raw_uncorrected": scale_by_amsgrad_raw_hat}[self.amsgrad_max]
        return (block(b1=self.betas[0], b2=self.betas[1], eps=self.eps, eps_root=self.eps_root,
                      folded_lr=self.lr),)


@dataclass(frozen=True)
class adamaxw(Rule):
    r"""Adamax with decoupled weight decay, as ``optax.adamaxw``:
    ``p <- p - lr*(m/((1-b1^t)*n) + weight_decay*p)``, ``n <- max(b2*n, |g| + eps)``
    (:class:`~uniopt.adamax`'s block, with optax's decay). With ``(b1, b2) = betas`` and
    ``lambda = weight_decay``:

    $$
    \begin{aligned}
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t, \qquad
    n_t = \max\left(\beta_2 n_{t-1},\ |g_t| + \epsilon\right) \\
    p_t &= p_{t-1} - \mathrm{lr} \left(\frac{m_t}{(1 - \beta_1^t)\, n_t}
    + \lambda\, p_{t-1}\right)
    \end{aligned}
    $$

    optax's ``mask`` (which leaves decay) is ``uniopt.partition`` of two ``adamaxw`` records,
    one with ``weight_decay=0``. optax requires a learning rate; ours keeps 1e-3.
    """

    lr: Any = hyper(1e-3, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(1e-4, NONNEG)

    info: ClassVar[Info] = Info(
        family="adam",
        paper="Kingma & Ba (2015); Loshchilov & Hutter (2019)",
        references=("optax.adamaxw",),
        example={"lr": 0.1, "weight_decay": 0.0},
        budget=2000,
    )

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    def parts(self) -> tuple[Transform, ...]:
        step = scale_by_adamax(lr=self.lr, b1=self.betas[0], b2=self.betas[1], eps=self.eps)
        if not self.on("weight_decay"):
            return (step,)
        return (step, decoupled_weight_decay(lr=self.lr, wd=self.weight_decay))


@dataclass(frozen=True)
class nadamw(Rule):
    r"""NAdam with decoupled weight decay, as ``optax.nadamw`` (``optax.adamw(nesterov=True)``):
    ``p <- p - lr*(m_hat/(sqrt(v_hat + eps_root) + eps) + weight_decay*p)`` with
    ``m_hat = b1*m/(1-b1^(t+1)) + (1-b1)*g/(1-b1^t)`` (the blocks of :class:`~uniopt.nadam`
    with ``momentum_schedule="constant"`` and ``decoupled_weight_decay=True``). With
    ``(b1, b2) = betas`` and ``lambda = weight_decay``:

    $$
    \begin{aligned}
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
    \hat m_t &= \frac{\beta_1 m_t}{1 - \beta_1^{t+1}} + \frac{(1 - \beta_1)\, g_t}{1 - \beta_1^t},
    \qquad \hat v_t = \frac{v_t}{1 - \beta_2^t} \\
    p_t &= p_{t-1} - \mathrm{lr} \left(\frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}}
    + \epsilon} + \lambda\, p_{t-1}\right)
    \end{aligned}
    $$

    Option: ``momentum_schedule``: ``"constant"`` (optax, above); ``"dozat"``: torch's NAdam
    momenta, i.e. ``torch.optim.NAdam(decoupled_weight_decay=True)`` (``momentum_decay`` is its
    psi; ``eps_root`` must then be 0).

    Conventions: ``"optax"`` (optax requires a learning rate, ours keeps 1e-3; weight_decay
    1e-4); ``"torch"`` (lr 2e-3, ``"dozat"``; torch's NAdam defaults weight_decay to 0, ours
    keeps 1e-4 since this is the decayed rule). optax's ``mask`` is ``uniopt.partition``.
    """

    lr: Any = hyper(1e-3, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    weight_decay: Any = hyper(1e-4, NONNEG)
    momentum_decay: Any = hyper(4e-3, NONNEG)
    momentum_schedule: str = "constant"
    convention: str = "optax"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "optax": {},
        "torch": {"lr": 2e-3, "momentum_schedule": "dozat"},
    }

    info: ClassVar[Info] = Info(
        family="adam",
        paper="Dozat (2016); Loshchilov & Hutter (2019)",
        references=("optax.nadamw", "torch.optim.NAdam"),
        example={"lr": 0.05, "weight_decay": 0.0},
        budget=1000,
    )

    optional: ClassVar[tuple[str, ...]] = ("weight_decay", "eps_root")

    def check(self) -> None:
        _choice(self.name, "momentum_schedule", self.momentum_schedule, MOMENTUM_SCHEDULES)
        # (by its value: an array 0, as optax.inject_hyperparams passes every number, keeps
        # its block in case it changes, and is still no eps_root)
        if self.momentum_schedule == "dozat" and self.nonzero("eps_root"):
            raise ValueError(f"{self.name}: eps_root is an option of momentum_schedule="
                             f"'constant', got eps_root={self.eps_root!r} with 'dozat'")

    def parts(self) -> tuple[Transform, ...]:
        b1, b2 = self.betas
        decays = self.on("weight_decay")
        if self.momentum_schedule == "dozat":  # torch's NAdamW: p*(1 - lr*wd) in the block
            return (scale_by_nadam(lr=self.lr, b1=b1, b2=b2, eps=self.eps,
                                   momentum_decay=self.momentum_decay,
                                   decoupled_wd=self.weight_decay if decays else 0.0),)
        # lr folded into the block (no scale_by_lr, whose last rounding is a fused
        # multiply-add): p - u with the decay off, p*(1 - lr*wd) - u with it on, the same
        # numbers where wd is 0
        step = scale_by_adam(b1=b1, b2=b2, eps=self.eps, eps_root=self.eps_root,
                             nesterov=True, folded_lr=self.lr)
        if not decays:
            return (step,)
        return (step, decoupled_weight_decay(lr=self.lr, wd=self.weight_decay))
