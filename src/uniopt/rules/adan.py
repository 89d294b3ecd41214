"""Adan (Xie et al., 2022): adaptive Nesterov momentum, as its authors and as optax write it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import Elementwise, Info, Rule, Transform
from ..hyper import NONNEG, UNIT_OPEN, hyper
from ..moments import bias_correction, ema_sq, lerp, select
from ..transforms.decay import weight_decay
from ..transforms.mask import frozen_mask, masked_by
from ..transforms.scale import scale_by_lr
from .adam import _choice


class AdanCoeffs(NamedTuple):
    one_minus_b1: Any
    one_minus_b2: Any
    b3: Any
    one_minus_b3: Any
    diff_weight: Any  # of the gradient difference in n's term and in the update
    m_scale: Any  # 1/(1 - b1^t)
    v_scale: Any  # diff_weight/(1 - b2^t)
    bc3: Any  # 1 - b3^t
    eps_root: Any
    eps: Any
    first: Any  # the first update: no previous gradient, the difference is 0


@dataclass(frozen=True)
class scale_by_adan(Elementwise):
    """Adan's direction, with ``w`` the weight of the gradient difference:
    ``d = g - g_prev`` (0 on the first update); ``m <- b1*m + (1-b1)*g``;
    ``v <- b2*v + (1-b2)*d``; ``n <- b3*n + (1-b3)*(g + w*d)^2``;
    ``u <- (m/(1-b1^t) + w*v/(1-b2^t)) / (sqrt(n/(1-b3^t) + eps_root) + eps)``.

    ``diff_weight="b2"``: ``w = b2`` (the paper's ``1 - beta_2`` in its own notation, whose
    betas are optax's ``1 - b``; the authors' code, pytorch_optimizer); ``"one_minus_b2"``:
    ``w = 1 - b2``, as optax 0.2.8's ``scale_by_adan`` (optax pull request 1715 proposes
    ``b2``)."""

    real_only = True

    b1: Any = hyper(0.98, UNIT_OPEN)
    b2: Any = hyper(0.92, UNIT_OPEN)
    b3: Any = hyper(0.99, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    diff_weight: str = "b2"
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_diff", "exp_avg_sq", "previous_grad")

    def check(self) -> None:
        _choice(self.name, "diff_weight", self.diff_weight, DIFF_WEIGHTS)

    def coeffs(self, step: Any) -> AdanCoeffs:
        c1, c2, c3 = self.one_minus("b1"), self.one_minus("b2"), self.one_minus("b3")
        w = self.b2 if self.diff_weight == "b2" else c2
        return AdanCoeffs(
            one_minus_b1=c1, one_minus_b2=c2, b3=self.b3, one_minus_b3=c3, diff_weight=w,
            m_scale=1 / bias_correction(self.b1, c1, step),
            v_scale=w / bias_correction(self.b2, c2, step),
            bc3=bias_correction(self.b3, c3, step), eps_root=self.eps_root, eps=self.eps,
            first=step == 0,
        )

    @staticmethod
    def kernel(xp, c, p, u, exp_avg, exp_avg_diff, exp_avg_sq, previous_grad):
        # the first difference is u - u: 0 for every finite u, with no constant
        diff = u - select(xp, c.first, u, previous_grad)
        m = lerp(exp_avg, u, c.one_minus_b1)
        v = lerp(exp_avg_diff, diff, c.one_minus_b2)
        n = ema_sq(exp_avg_sq, u + c.diff_weight * diff, c.b3, c.one_minus_b3)
        den = xp.sqrt(n / c.bc3 + c.eps_root) + c.eps
        return (c.m_scale * m + c.v_scale * v) / den, m, v, n, u


DIFF_WEIGHTS = ("b2", "one_minus_b2")
DECAY_FORMS = ("proximal", "decoupled")


class Proximal(NamedTuple):
    denom: Any  # 1 + lr*wd


@dataclass(frozen=True)
class proximal_weight_decay(Elementwise):
    """Adan's weight decay, a proximal step after the update: ``p <- (p - u)/(1 + lr*wd)``,
    so ``u <- p - (p - u)/(1 + lr*wd)`` (``u`` the incoming step, its lr applied)."""

    lr: Any = hyper(1e-3, NONNEG)
    wd: Any = hyper(0.0, NONNEG)
    uses_params: ClassVar[bool] = True

    def coeffs(self, step: Any) -> Proximal:
        return Proximal(denom=1 + self.lr * self.wd)

    @staticmethod
    def kernel(xp, c, p, u):
        return (p - (p - u) / c.denom,)

    @staticmethod
    def finish(xp, c, p, u):  # last: the authors' p.div_(1 + lr*wd) after the step
        return (p - u) / c.denom


@dataclass(frozen=True)
class adan(Rule):
    r"""Adan (Xie et al., 2022): :class:`scale_by_adan`'s direction ``r``, ``p <- p - lr*r``,
    with weight decay. At step ``t`` (from 1), with ``w`` the weight of the gradient
    difference (``b2``, or ``1 - b2``: ``diff_weight``) and ``lambda = weight_decay``:

    $$
    \begin{aligned}
    \Delta_t &= g_t - g_{t-1} \quad (\Delta_1 = 0) \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, \Delta_t \\
    n_t &= \beta_3 n_{t-1} + (1 - \beta_3)\, (g_t + w\, \Delta_t)^2 \\
    r_t &= \frac{m_t / (1 - \beta_1^t) + w\, v_t / (1 - \beta_2^t)}
    {\sqrt{n_t / (1 - \beta_3^t) + \epsilon_{root}} + \epsilon} \\
    p_t &= \begin{cases}
    \dfrac{p_{t-1} - \mathrm{lr}\, r_t}{1 + \mathrm{lr}\,\lambda} & \text{proximal} \\[1ex]
    p_{t-1} - \mathrm{lr}\,(r_t + \lambda\, p_{t-1}) & \text{decoupled}
    \end{cases}
    \end{aligned}
    $$

    Options (``convention=`` sets them, and the defaults):

    - ``diff_weight``: the weight of the gradient difference (see :class:`scale_by_adan`):
      ``"b2"`` (the paper, the authors' code, ``pytorch_optimizer.Adan``) or
      ``"one_minus_b2"`` (optax 0.2.8, which weighs it 0.08 where the paper has 0.92 at the
      default ``b2``: a different algorithm from the second step on).
    - ``decay_form``: ``"proximal"``, the paper's ``p <- (p - lr*r)/(1 + lr*weight_decay)``
      (the authors' default, ``pytorch_optimizer.Adan``); ``"decoupled"``,
      ``p <- p - lr*(r + weight_decay*p)`` (optax; pytorch_optimizer's
      ``weight_decouple=True``, ``p*(1 - lr*wd)`` first, is the same up to rounding).
    - ``mask``: the leaves to decay, a tree of bools (not globs) or a function of the params
      returning one, as optax's ``mask`` (:class:`~uniopt.masked_block`).
    - ``eps_root``: eps inside the root, ``sqrt(n_hat + eps_root) + eps`` (optax's default is
      1e-8; the paper has none).

    Conventions: ``"paper"`` (the default; ``pytorch_optimizer.Adan`` without its gradient
    clipping: ``diff_weight="b2"``, eps_root 0, proximal decay); ``"optax"``
    (``optax.adan``: ``"one_minus_b2"``, eps_root 1e-8, decoupled decay; optax requires a
    learning rate, ours keeps 1e-3). Both take betas as decays near 1 (the paper's
    ``beta`` is ``1 - b``).
    """

    lr: Any = hyper(1e-3, NONNEG)
    b1: Any = hyper(0.98, UNIT_OPEN)
    b2: Any = hyper(0.92, UNIT_OPEN)
    b3: Any = hyper(0.99, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    mask: Any = None
    diff_weight: str = "b2"
    decay_form: str = "proximal"
    convention: str = "paper"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        "optax": {"diff_weight": "one_minus_b2", "eps_root": 1e-8, "decay_form": "decoupled"},
    }

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="adam",
        paper="Xie et al. (2022)",
        references=("optax.adan", "pytorch_optimizer.Adan"),
        example={"lr": 0.05},
        complex=False,
    )

    def check(self) -> None:
        _choice(self.name, "diff_weight", self.diff_weight, DIFF_WEIGHTS)
        _choice(self.name, "decay_form", self.decay_form, DECAY_FORMS)
        object.__setattr__(self, "mask", frozen_mask(self.name, "mask", self.mask))

    def parts(self) -> tuple[Transform, ...]:
        direction = scale_by_adan(b1=self.b1, b2=self.b2, b3=self.b3, eps=self.eps,
                                  eps_root=self.eps_root, diff_weight=self.diff_weight)
        lr = scale_by_lr(lr=self.lr)
        if not self.on("weight_decay"):
            return (direction, lr)
        if self.decay_form == "decoupled":
            return (direction, masked_by(weight_decay(wd=self.weight_decay), self.mask), lr)
        return (direction, lr,
                masked_by(proximal_weight_decay(lr=self.lr, wd=self.weight_decay), self.mask))
