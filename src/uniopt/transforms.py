"""Building blocks that are not whole optimizers; chain them with :func:`uniopt.chain`.

Each block maps the incoming update ``u`` (at the head of a chain, the gradient) to an outgoing
one; the parameter moves by ``p <- p - u`` at the end of the chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .backend import namespace
from .base import Elementwise, select
from .hyper import NONNEG, UNIT, Interval, hyper


@dataclass(frozen=True)
class scale(Elementwise):
    """``u <- factor * u``. ``scale(lr)`` ends most optimizers; ``factor`` may be a schedule.

    >>> import numpy as np, uniopt as uo
    >>> uo.update(uo.setup(uo.scale(0.5), [np.ones(2)]), [np.ones(2)], [np.ones(2)])[1]
    [array([0.5, 0.5])]
    """

    factor: Any = hyper(1.0, Interval(None))

    def coeffs(self, step: int) -> tuple[float, ...]:
        return (self.factor,)

    @staticmethod
    def kernel(xp, c, p, u):
        return (c[0] * u,)


@dataclass(frozen=True)
class scale_by_lr(Elementwise):
    """``u <- lr * u``: :class:`scale` for a learning rate, which must not be negative."""

    lr: Any = hyper(1e-3, NONNEG)

    def coeffs(self, step: int) -> tuple[float, ...]:
        return (self.lr,)

    kernel = staticmethod(scale.kernel)


@dataclass(frozen=True)
class weight_decay(Elementwise):
    """``u <- u + wd * p``.

    At the head of a chain this is L2 regularisation, the same as adding ``wd/2 * sum(p**2)``
    to the loss: ``chain(weight_decay(wd), adam())`` is torch's ``Adam(weight_decay=wd)``, whose
    decay passes through the moments. Placed after a rule, it is decoupled decay scaled by what
    follows it: ``chain(adam(lr), weight_decay(wd))`` is Flux's ``p <- p - lr*A - wd*p``.
    """

    wd: Any = hyper(0.0, NONNEG)
    uses_params = True

    def coeffs(self, step: int) -> tuple[float, ...]:
        return (self.wd,)

    @staticmethod
    def kernel(xp, c, p, u):
        return (u + c[0] * p,)


@dataclass(frozen=True)
class trace(Elementwise):
    """Heavy-ball momentum in torch's form: ``b <- momentum*b + (1-dampening)*u``, ``u <- b``.

    The first update stores ``b = u`` undamped, as torch does. With ``nesterov=True`` the
    outgoing update is ``u + momentum*b``; it needs ``momentum > 0`` and ``dampening = 0``.
    At a step where a momentum schedule is 0, ``u`` passes unchanged and ``b`` is kept, as in
    torch. (torch also starts its buffer undamped at the first non-zero momentum; here that
    happens only at the first update, which differs only with dampening > 0.)
    """

    momentum: Any = hyper(0.9, NONNEG)
    dampening: Any = hyper(0.0, UNIT)
    nesterov: bool = False
    slots: ClassVar[tuple[str, ...]] = ("momentum_buffer",)

    def check(self) -> None:
        if self.nesterov and not (
            callable(self.momentum) or callable(self.dampening)
        ) and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                f"{self.name}: nesterov=True requires momentum > 0 and dampening = 0, "
                f"got momentum={self.momentum!r}, dampening={self.dampening!r}"
            )

    def coeffs(self, step: int) -> tuple[Any, ...]:
        # arithmetic, not branches, so a traced step (jax.jit) works; exact for step 0 / not 0.
        # Whether momentum is on is decided here, in double precision: a momentum that rounds
        # to 0 in the array's precision must not switch the compiled path onto another branch.
        first = step == 0
        damped = first + (1.0 - first) * self.one_minus("dampening")
        return (self.momentum, damped, float(self.nesterov), self.momentum != 0)

    @staticmethod
    def kernel(xp, c, p, u, b):
        nb = c[0] * b + c[1] * u
        out = u + c[0] * nb if c[2] else nb
        # momentum off at this step (a schedule): torch leaves its buffer alone
        return select(xp, c[3], out, u), select(xp, c[3], nb, b)


@dataclass(frozen=True)
class clip(Elementwise):
    """``u <- clip(u, -max_delta, max_delta)``, element by element."""

    max_delta: Any = hyper(1.0, NONNEG)

    def coeffs(self, step: int) -> tuple[float, ...]:
        return (-self.max_delta, self.max_delta)

    @staticmethod
    def kernel(xp, c, p, u):
        return (xp.minimum(xp.maximum(u, c[0]), c[1]),)


@dataclass(frozen=True)
class clip_by_global_norm(Elementwise):
    """``u <- u * max_norm/||u||`` where the norm over every leaf exceeds ``max_norm``.

    As optax's ``clip_by_global_norm``; torch's ``clip_grad_norm_`` divides by
    ``||u|| + 1e-6`` and so scales by a hair less. Costs one extra read pass over whatever
    precedes it in the chain (at the head: the gradients).
    """

    max_norm: Any = hyper(1.0, NONNEG)
    needs_norm = True

    def coeffs(self, step: int) -> tuple[float, ...]:
        return (1.0,)

    def norm_coeffs(self, norm: Any) -> tuple[Any, ...]:
        if isinstance(norm, float):
            return (self.max_norm / norm if norm > self.max_norm else 1.0,)
        xp = namespace(norm)  # a traced norm, under jax.jit
        return (xp.where(norm > self.max_norm, self.max_norm / norm, 1.0),)

    kernel = staticmethod(scale.kernel)


__all__ = ["clip", "clip_by_global_norm", "scale", "scale_by_lr", "trace", "weight_decay"]
