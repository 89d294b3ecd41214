"""MADGRAD (Defazio & Jelassi, 2021): momentumised, adaptive, dual-averaged gradient descent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from .. import backend
from ..base import Info, PerLeaf, Rule, Transform
from ..hyper import NONNEG, Interval, hyper
from ..moments import fma, lerp
from ..transforms.decay import weight_decay


class MadgradCoeffs(NamedTuple):
    lamb: Any  # (lr + eps)*sqrt(t): the weight of this step's gradient in the sums
    third: Any  # 1/3: the cube root
    eps: Any
    one_minus_momentum: Any  # the step of p towards the dual-averaging point z


def _step(xp: Any, c: Any, p: Any, u: Any, grad_sum_sq: Any, s: Any, x0: Any) -> tuple[
        Any, Any, Any]:
    """``(p_new, S, s)``: the sums, the dual-averaging point ``z = x0 - s/(S^(1/3) + eps)``
    (torch's ``addcdiv`` with value -1) and pytorch-optimizer's ``p.lerp_(z, 1 - momentum)``."""
    gss = fma(c.lamb * u, u, grad_sum_sq)  # torch's addcmul_(g, g, value=lamb)
    s = fma(c.lamb, u, s)
    z = x0 - s / (gss ** c.third + c.eps)
    return lerp(p, z, c.one_minus_momentum), gss, s


@dataclass(frozen=True)
class scale_by_madgrad(PerLeaf):
    """MADGRAD's step, the learning rate inside it.

    ``lamb = (lr + eps)*sqrt(t)``; ``S <- S + lamb*u^2``; ``s <- s + lamb*u``;
    ``z = x0 - s/(S^(1/3) + eps)``; ``p <- (1 - momentum)*z + momentum*p``, so the update is
    ``p - p_new``. ``x0`` is the parameter as it was at set-up.

    Elementwise in its arithmetic, but a per-leaf part: the cube root is a power, which the
    compiled loop (LLVM's ``pow``) and NumPy (its vectorised ``power``) round differently in
    the last bit, so it keeps the reference path, the ground truth."""

    lr: Any = hyper(1e-2, NONNEG)
    momentum: Any = hyper(0.9, Interval(0.0, 1.0, hi_open=True))
    eps: Any = hyper(1e-6, NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("grad_sum_sq", "s", "x0")
    uses_params: ClassVar[bool] = True
    makes_step: ClassVar[bool] = True
    exact_state: ClassVar[str | None] = (
        "it makes the parameter from its slots x0 and s, so the params would keep only the "
        "state's precision")

    def init_slots(self, p: Any, xp: Any) -> tuple[Any, ...]:
        # x0 a copy outside autograd's graph (of a param that requires grad: no record)
        return (xp.zeros_like(p), xp.zeros_like(p), backend.detached_copy(p))

    def coeffs(self, step: Any) -> MadgradCoeffs:
        return MadgradCoeffs(lamb=(self.lr + self.eps) * (step + 1) ** 0.5, third=1.0 / 3.0,
                             eps=self.eps, one_minus_momentum=self.one_minus("momentum"))

    @staticmethod
    def apply(xp: Any, c: Any, p: Any, u: Any, *slots: Any) -> tuple[Any, ...]:
        p_new, gss, s = _step(xp, c, p, u, *slots)
        return p - p_new, gss, s, slots[2]

    @staticmethod
    def finish(xp: Any, c: Any, p: Any, u: Any, *slots: Any) -> tuple[Any, ...]:
        # last: the parameter written as pytorch-optimizer writes it, p.lerp_(z, 1 - momentum)
        p_new, gss, s = _step(xp, c, p, u, *slots)
        return p_new, gss, s, slots[2]


@dataclass(frozen=True)
class madgrad(Rule):
    r"""MADGRAD (Defazio & Jelassi, 2021): dual averaging with a cube-root adaptive scale and
    momentum as an average of iterates.

    ``g <- g + weight_decay*p`` (L2, as optax); ``lamb_t = (lr + eps)*sqrt(t)``;
    ``S <- S + lamb_t*g^2``; ``s <- s + lamb_t*g``; ``z = x0 - s/(S^(1/3) + eps)``;
    ``p <- momentum*p + (1 - momentum)*z``, ``x0`` the initial parameters
    (:class:`scale_by_madgrad`). At step ``t`` (from 1), with ``lambda = weight_decay``,
    ``mu = momentum`` and ``S_0 = s_0 = 0``:

    $$
    \begin{aligned}
    g_t &\leftarrow g_t + \lambda\, p_{t-1}, \qquad
    \ell_t = (\mathrm{lr} + \epsilon) \sqrt{t} \\
    S_t &= S_{t-1} + \ell_t\, g_t^2, \qquad s_t = s_{t-1} + \ell_t\, g_t \\
    z_t &= x_0 - \frac{s_t}{S_t^{1/3} + \epsilon} \\
    p_t &= \mu\, p_{t-1} + (1 - \mu)\, z_t
    \end{aligned}
    $$

    Matches ``optax.contrib.madgrad`` and ``pytorch_optimizer.MADGRAD`` (defaults: the
    authors', lr 1e-2; pytorch-optimizer's lr is 1e-3, optax requires one). Known differences:
    pytorch-optimizer with ``momentum=0`` keeps no ``x0`` and recomputes it each step as
    ``p + s/rms`` (the same up to rounding while the momentum has been 0 from the start; a
    momentum that becomes 0 mid-run, a schedule's or a group's value, leaves ``p`` off ``z``,
    and its recomputed ``x0`` then differs: 0.24 apart after 3 steps of 0), and with
    ``eps=0`` treats a zero ``S`` as
    inactive; here and in optax ``x0`` is kept and ``eps=0`` divides by zero where ``S`` is 0.
    optax computes ``lambda``'s ``sqrt(t)`` in float32 even under x64 (its int32 count): 1e-9 to
    1e-8 relative apart in float64; uniopt's is in the params' precision.
    At a step of ``lr = 0`` (a warm-up from 0) pytorch-optimizer takes ``ell_t = 0`` and
    nothing moves; here, as in optax, ``ell_t = eps*sqrt(t)`` still accumulates and ``p``
    moves by about ``eps^(2/3)`` (6.9e-6 apart after 200 steps of a warm-up over 16).
    Its ``weight_decouple=True`` form is not offered.
    """

    lr: Any = hyper(1e-2, NONNEG)
    momentum: Any = hyper(0.9, Interval(0.0, 1.0, hi_open=True))
    weight_decay: Any = hyper(0.0, NONNEG)
    eps: Any = hyper(1e-6, NONNEG)

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="dual-averaging",
        paper="Defazio & Jelassi (2021)",
        references=("optax.contrib.madgrad", "pytorch_optimizer.MADGRAD"),
        example={"lr": 0.05},
    )

    def parts(self) -> tuple[Transform, ...]:
        step = scale_by_madgrad(lr=self.lr, momentum=self.momentum, eps=self.eps)
        if self.on("weight_decay"):
            return (weight_decay(wd=self.weight_decay), step)
        return (step,)
