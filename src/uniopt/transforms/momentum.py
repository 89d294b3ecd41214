"""Heavy-ball and Nesterov momentum: torch's form (the learning rate applied after the buffer)
and Sutskever's (the learning rate inside it: keras, Optimisers.jl)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import Elementwise, Kernel
from ..hyper import NONNEG, UNIT, hyper
from ..moments import fma, select


class Momentum(NamedTuple):
    momentum: Any
    weight: Any  # of the incoming u: 1 on the first update, else 1 - dampening
    on: Any  # momentum is non-zero at this step (decided in double precision on the host)


# The outgoing u is written in terms of the new buffer, not of its expression: XLA then reads
# the buffer it wrote instead of recomputing it from the old one in the params' fusion (which,
# with the state donated, made it copy every buffer first).


# torch's buf.mul_(momentum).add_(u, alpha=weight) and u.add(buf, alpha=momentum): each add
# one fused multiply-add


def heavy_ball(xp, c, p, u, b):
    # momentum off at this step (a schedule): torch leaves its buffer alone
    b = select(xp, c.on, fma(c.weight, u, c.momentum * b), b)
    return select(xp, c.on, b, u), b


def nesterov(xp, c, p, u, b):
    b = select(xp, c.on, fma(c.weight, u, c.momentum * b), b)
    return select(xp, c.on, fma(c.momentum, b, u), u), b


def check_nesterov(owner: str, nesterov: bool, momentum: Any, kept: bool = False) -> None:
    """Nesterov's look-ahead needs momentum: without, ``nesterov=True`` is a slip (torch's
    constructor refuses it). Dampening is taken: torch's constructor refuses it too, but its
    step computes it (for a param group's own values, which it never checks), and so does
    :func:`nesterov`. ``kept``: the rule keeps its momentum block whatever the number (it
    came as a JAX array: ``optax.inject_hyperparams`` rebuilds the rule at each step from
    values set between steps), a value then as torch's group value set after its constructor
    (OneCycleLR's ``base_momentum=0``), which steps."""
    if nesterov and not kept and not callable(momentum) and momentum <= 0:
        raise ValueError(f"{owner}: nesterov=True requires momentum > 0, got "
                         f"momentum={momentum!r}")


@dataclass(frozen=True)
class trace(Elementwise):
    """Heavy-ball momentum in torch's form: ``b <- momentum*b + (1-dampening)*u``, ``u <- b``.

    The first update stores ``b = u`` undamped, as torch does. With ``nesterov=True`` the
    outgoing update is ``u + momentum*b`` (with momentum 0, ``u``, as optax's ``trace``;
    with dampening, what torch's step computes for a param group's values, which its
    constructor refuses).
    At a step where a momentum schedule is 0, ``u`` passes unchanged and ``b`` is kept, as in
    torch (``if momentum != 0``); with ``hold=False``, ``b <- u``, as optax's ``trace``
    computes it (``g + 0*t``) for a momentum its ``inject_hyperparams`` sets to 0. (torch also
    starts its buffer undamped at the first non-zero momentum; here that happens only at the
    first update, which differs only with dampening > 0.)
    """

    momentum: Any = hyper(0.9, NONNEG)
    dampening: Any = hyper(0.0, UNIT)
    nesterov: bool = False
    hold: bool = True
    # (no check_nesterov here: the block, as optax's trace, takes momentum 0, where the
    # look-ahead adds 0; a rule refuses it where its framework does. A rule's momentum given as
    # an array keeps this block even at 0: optax.inject_hyperparams passes it so)
    slots: ClassVar[tuple[str, ...]] = ("momentum_buffer",)

    def steady(self) -> int | None:
        return 1  # (torch's first step, undamped)

    def coeffs(self, step: int) -> Momentum:
        # arithmetic, not branches, so a traced step (jax.jit) or one counted on a torch device
        # works; exact for step 0 / not 0 (a number: torch has no 1 - a bool tensor)
        first = (step == 0) * 1.0
        undamped = self.one_minus("dampening")
        if not (isinstance(undamped, float) and undamped == 1.0):  # a host 1: 1 at every step
            undamped = first + (1.0 - first) * undamped
        on = self.nonzero("momentum") if self.hold else True
        return Momentum(momentum=self.momentum, weight=undamped, on=on)

    @property
    def kernel(self) -> Kernel:  # type: ignore[override]
        return nesterov if self.nesterov else heavy_ball


# --- the learning rate inside the buffer: Sutskever's form -------------------------------------
#
# Sutskever et al. (2013) keep the step itself, v <- momentum*v + lr*u, where torch keeps the
# direction and multiplies by lr afterwards. At a constant lr the two are the same algorithm;
# under a schedule they differ, since the velocity keeps the lr of the steps that made it.

MOMENTUM_FORMS = ("torch", "keras", "sutskever")


def check_momentum_form(owner: str, form: str, forms: tuple[str, ...] = MOMENTUM_FORMS) -> None:
    if form not in forms:
        raise ValueError(
            f"{owner}: momentum_form must be one of {', '.join(map(repr, forms))}, got {form!r}"
        )


class LrMomentum(NamedTuple):
    momentum: Any
    lr: Any
    momentum_sq: Any  # Optimisers.jl's Nesterov: momentum^2 times the old velocity
    lr_ahead: Any  # ... plus (1 + momentum)*lr times u


def sutskever_heavy_ball(xp, c, p, u, v):
    v = c.momentum * v + c.lr * u
    return v, v


def sutskever_nesterov(xp, c, p, u, v):
    # Optimisers.jl's Nesterov, from the old velocity: momentum*v_new + lr*u, rounded as it is
    return c.momentum_sq * v + c.lr_ahead * u, c.momentum * v + c.lr * u


def keras_heavy_ball(xp, c, p, u, m):
    # keras keeps m = -v and adds it: p + m is p - (-m), exactly
    m = m * c.momentum - u * c.lr
    return -m, m


def keras_nesterov(xp, c, p, u, m):
    m = m * c.momentum - u * c.lr
    return u * c.lr - m * c.momentum, m  # p + (momentum*m - lr*u), negated exactly


@dataclass(frozen=True)
class sutskever_trace(Elementwise):
    """Momentum with the learning rate inside the buffer (Sutskever et al., 2013):
    ``v <- momentum*v + lr*u``, ``u <- v``; Optimisers.jl's ``Momentum``, and keras's and
    optax's RMSprop momentum (their ``trace`` after the learning rate). With ``nesterov=True``,
    Optimisers.jl's ``Nesterov``: ``u <- momentum^2*v_old + (1+momentum)*lr*u`` (which is
    ``momentum*v + lr*u``); Optimisers.jl stores ``-v`` there. The buffer starts at 0 and
    ``momentum = 0`` needs no special case (plain ``lr*u``)."""

    lr: Any = hyper(1e-3, NONNEG)
    momentum: Any = hyper(0.9, NONNEG)
    nesterov: bool = False
    slots: ClassVar[tuple[str, ...]] = ("momentum",)
    makes_step: ClassVar[bool] = True  # its lr is applied here

    def steady(self) -> int | None:
        return 0

    def coeffs(self, step: int) -> LrMomentum:
        return LrMomentum(momentum=self.momentum, lr=self.lr,
                          momentum_sq=self.momentum * self.momentum,
                          lr_ahead=(1.0 + self.momentum) * self.lr)

    @property
    def kernel(self) -> Kernel:  # type: ignore[override]
        return sutskever_nesterov if self.nesterov else sutskever_heavy_ball


@dataclass(frozen=True)
class keras_trace(sutskever_trace):
    """keras's SGD momentum, :class:`sutskever_trace` written as keras writes it: the buffer is
    ``m = -v``, ``m <- momentum*m - lr*u``, ``p <- p + m`` (Nesterov
    ``p <- p + momentum*m - lr*u``), so its state and rounding are keras's."""

    @property
    def kernel(self) -> Kernel:  # type: ignore[override]
        return keras_nesterov if self.nesterov else keras_heavy_ball
