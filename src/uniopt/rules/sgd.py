"""Stochastic gradient descent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import ByFields, Info, Rule, Transform
from ..hyper import NONNEG, UNIT, hyper
from ..transforms.decay import check_decay_form, decayed
from ..transforms.momentum import (
    check_momentum_form,
    check_nesterov,
    keras_trace,
    sutskever_trace,
    trace,
)
from ..transforms.scale import scale_by_lr


def _flux_lr(given: Any) -> float:
    """Optimisers.jl's default step size for the rule it is: ``Nesterov``, ``Momentum`` or
    ``Descent``."""
    return 0.001 if given.get("nesterov") else 0.01 if given.get("momentum") else 0.1


@dataclass(frozen=True)
class sgd(Rule):
    r"""Stochastic gradient descent with torch's momentum, dampening and Nesterov.

    ``g <- g + weight_decay*p``; with momentum ``b <- momentum*b + (1-dampening)*g`` (``b = g``
    on the first update) and ``g <- b`` (Nesterov: ``g + momentum*b``); ``p <- p - lr*g``.
    With ``mu = momentum``, ``tau = dampening``, ``lambda = weight_decay``:

    $$
    \begin{aligned}
    g_t &\leftarrow g_t + \lambda\, p_{t-1} \\
    b_t &= \mu\, b_{t-1} + (1 - \tau)\, g_t \quad (b_1 = g_1) \\
    p_t &= p_{t-1} - \mathrm{lr} \cdot
    \begin{cases} g_t + \mu\, b_t & \text{Nesterov} \\ b_t & \text{otherwise} \end{cases}
    \end{aligned}
    $$

    The momentum buffer exists only if ``momentum`` is non-zero or a schedule at set-up.

    Options (the ``convention`` sets them, and the defaults, for the fields not given):

    - ``momentum_form="torch"``: as above, the learning rate applied after the buffer.
    - ``momentum_form="keras"``: the learning rate inside the buffer, ``m <- momentum*m - lr*g``,
      ``p <- p + m`` (Nesterov ``p <- p + momentum*m - lr*g``); ``nesterov=True`` with
      ``momentum=0`` is plain SGD, as in keras.
    - ``momentum_form="sutskever"``: Optimisers.jl's ``Momentum``, ``v <- momentum*v + lr*g``,
      ``p <- p - v``, and its ``Nesterov`` (see :class:`~uniopt.sutskever_trace`).
      At a constant lr the three forms are one algorithm; under a schedule the keras and
      sutskever velocities keep the lr of the steps that made them. ``dampening`` is torch's
      alone (0 in the other forms).
    - ``decay_form="decoupled"``: keras's weight decay, ``p <- p - lr*weight_decay*p`` before
      the step, in place of torch's ``"l2"`` term (the same without momentum).

    Conventions: ``"torch"`` (lr 1e-3); ``"optax"``, ``optax.sgd``: torch's form (its ``trace``
    is torch's with dampening 0); optax requires a learning rate, ours keeps 1e-3; ``"keras"``:
    lr 1e-2, keras's form, decoupled decay; ``"flux"``: Optimisers.jl's defaults, the sutskever
    form: lr 0.1 (``Descent``), 1e-2 with momentum (``Momentum``), 1e-3 with ``nesterov=True``
    (``Nesterov``, whose ``rho = 0.9`` is ``momentum=0.9``: ``nesterov=True`` without momentum
    is refused there, as in torch's form).

    >>> import numpy as np, uniopt as uo
    >>> p = {"w": np.array([1.0, -2.0])}
    >>> state = uo.setup(uo.sgd(lr=0.1, momentum=0.9), p)
    >>> state, p = uo.update(state, p, {"w": np.array([1.0, 1.0])})
    >>> p["w"]
    array([ 0.9, -2.1])
    """

    lr: Any = hyper(1e-3, NONNEG)
    momentum: Any = hyper(0.0, NONNEG)
    dampening: Any = hyper(0.0, UNIT)
    weight_decay: Any = hyper(0.0, NONNEG)
    nesterov: bool = False
    momentum_form: str = "torch"
    decay_form: str = "l2"
    convention: str = "torch"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {},
        "optax": {},
        "keras": {"lr": 1e-2, "momentum_form": "keras", "decay_form": "decoupled"},
        # Descent(0.1), Momentum(0.01, 0.9), Nesterov(0.001, 0.9)
        "flux": {"lr": ByFields(_flux_lr, "0.1; 0.01 with momentum; 0.001 with nesterov"),
                 "momentum_form": "sutskever"},
    }

    # dampening 0 is the block of torch's first update alone: the jitted step multiplies u by
    # nothing (a traced 1 - dampening would be a multiplication per element)
    optional: ClassVar[tuple[str, ...]] = ("weight_decay", "momentum", "dampening")

    info: ClassVar[Info] = Info(
        family="sgd",
        paper="Robbins & Monro (1951); Sutskever et al. (2013)",
        references=(
            "torch.optim.SGD",
            "optax.sgd",
            "keras.optimizers.SGD",
            "formula:Optimisers.Momentum",
        ),
        example={"lr": 0.001, "momentum": 0.9},
        budget=500,
    )

    def check(self) -> None:
        check_momentum_form(self.name, self.momentum_form)
        check_decay_form(self.name, self.decay_form)
        if self.convention == "optax" and (callable(self.dampening) or self.dampening != 0):
            raise ValueError(f"{self.name}: optax's sgd has no dampening, got "
                             f"dampening={self.dampening!r} with convention='optax'")
        if self.convention == "flux":
            # Optimisers.jl's Nesterov() has rho 0.9 where our momentum defaults to 0: without
            # momentum it would be plain descent at Nesterov's lr
            try:
                check_nesterov(f"{self.name}(convention='flux')", self.nesterov, self.momentum,
                               self.kept("momentum"))
            except ValueError as e:
                raise ValueError(f"{e} (Optimisers.jl's Nesterov() is momentum=0.9, lr=1e-3)") \
                    from None
        if self.momentum_form == "torch" and not (self.convention == "optax"
                                                  and not callable(self.momentum)
                                                  and self.momentum == 0):
            # (optax's nesterov=True with momentum 0 is plain SGD: g + 0*t)
            check_nesterov(self.name, self.nesterov, self.momentum, self.kept("momentum"))
        elif callable(self.dampening) or self.dampening != 0:
            raise ValueError(
                f"{self.name}: dampening is torch's momentum form only, got "
                f"dampening={self.dampening!r} with momentum_form={self.momentum_form!r}"
            )

    def parts(self) -> tuple[Transform, ...]:
        steps: tuple[Transform, ...]
        if self.on("momentum") and self.momentum_form != "torch":
            inside = keras_trace if self.momentum_form == "keras" else sutskever_trace
            steps = (inside(lr=self.lr, momentum=self.momentum, nesterov=self.nesterov),)
        else:
            steps = (
                *([trace(momentum=self.momentum,
                         dampening=self.dampening if self.on("dampening") else 0.0,
                         nesterov=self.nesterov, hold=self.convention != "optax")]
                  if self.on("momentum") else []),
                scale_by_lr(lr=self.lr),
            )
        return decayed(steps, self.lr, self.weight_decay, self.decay_form, self.on("weight_decay"))
