"""Adadelta (Zeiler, 2012)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import Elementwise, Info, Rule, Transform
from ..hyper import NONNEG, UNIT, hyper
from ..moments import ema_sq
from ..transforms.decay import check_decay_form, decayed
from ..transforms.scale import scale_by_lr


class AdadeltaCoeffs(NamedTuple):
    rho: Any
    one_minus_rho: Any
    eps: Any


@dataclass(frozen=True)
class scale_by_adadelta(Elementwise):
    """``v <- rho*v + (1-rho)*u^2``; ``d = sqrt(a + eps)/sqrt(v + eps) * u``;
    ``a <- rho*a + (1-rho)*d^2``; ``u <- d``."""

    rho: Any = hyper(0.9, UNIT)
    eps: Any = hyper(1e-6, NONNEG)
    eps_floor16: bool = False
    slots: ClassVar[tuple[str, ...]] = ("square_avg", "acc_delta")

    def steady(self) -> int | None:
        return 0

    def coeffs(self, step: int) -> AdadeltaCoeffs:
        return AdadeltaCoeffs(rho=self.rho, one_minus_rho=self.one_minus("rho"), eps=self.eps)

    @staticmethod
    def kernel(xp, c, p, u, square_avg, acc_delta):
        square_avg = ema_sq(square_avg, u, c.rho, c.one_minus_rho)
        delta = xp.sqrt(acc_delta + c.eps) / xp.sqrt(square_avg + c.eps) * u
        return delta, square_avg, ema_sq(acc_delta, delta, c.rho, c.one_minus_rho)


@dataclass(frozen=True)
class adadelta(Rule):
    r"""Adadelta (Zeiler, 2012) with torch's learning rate: ``p <- p - lr*d``.

    ``d`` as in :class:`scale_by_adadelta`, after ``g <- g + weight_decay*p``. With
    ``lambda = weight_decay``, ``v`` the average of the squared gradients and ``a`` that of
    the squared steps:

    $$
    \begin{aligned}
    g_t &\leftarrow g_t + \lambda\, p_{t-1} \\
    v_t &= \rho\, v_{t-1} + (1 - \rho)\, g_t^2 \\
    d_t &= \frac{\sqrt{a_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t, \qquad
    a_t = \rho\, a_{t-1} + (1 - \rho)\, d_t^2 \\
    p_t &= p_{t-1} - \mathrm{lr}\, d_t
    \end{aligned}
    $$

    The default ``lr=1.0`` is the paper's. Every framework computes ``d`` alike; the
    conventions differ in defaults, and keras in its weight decay:

    Option: ``decay_form="decoupled"``: keras's weight decay, ``p <- p - lr*weight_decay*p``
    before the step, in place of torch's ``"l2"`` term.

    Conventions: ``"torch"``: lr 1.0, rho 0.9, eps 1e-6; ``"optax"``, ``optax.adadelta``: rho
    0.9, eps 1e-6 and lr 1.0, since optax 0.2.8's default ``learning_rate=None`` makes
    ``scale_by_learning_rate`` a no-op that hands back the descent direction *as the update to
    be added*, so it ascends; ``"keras"``: lr 1e-3, rho 0.95, eps 1e-7, decoupled decay;
    ``"flux"``, Optimisers.jl's ``AdaDelta``: no lr (1.0), rho 0.9, eps 1e-8; ``"paper"``
    (Zeiler, 2012, section 4): no lr (1.0), rho 0.95, eps 1e-6.
    """

    lr: Any = hyper(1.0, NONNEG)
    rho: Any = hyper(0.9, UNIT)
    eps: Any = hyper(1e-6, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    decay_form: str = "l2"
    eps_floor16: bool = False
    convention: str = "torch"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {},
        "optax": {},
        "keras": {"lr": 1e-3, "rho": 0.95, "eps": 1e-7, "decay_form": "decoupled"},
        "flux": {"eps": 1e-8,
                 "eps_floor16": True},
        "paper": {"rho": 0.95},
    }

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="adaptive",
        paper="Zeiler (2012)",
        references=(
            "torch.optim.Adadelta",
            "optax.adadelta",
            "keras.optimizers.Adadelta",
            "formula:Optimisers.AdaDelta",
        ),
        example={"lr": 0.3},
        budget=2000,
    )

    def check(self) -> None:
        check_decay_form(self.name, self.decay_form)

    def parts(self) -> tuple[Transform, ...]:
        return decayed((scale_by_adadelta(rho=self.rho, eps=self.eps,
                                           eps_floor16=self.eps_floor16), scale_by_lr(lr=self.lr)),
                       self.lr, self.weight_decay, self.decay_form, self.on("weight_decay"))
