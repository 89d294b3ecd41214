"""Heavy-ball and Nesterov momentum, in torch's form."""

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


def check_nesterov(owner: str, nesterov: bool, momentum: Any, dampening: Any) -> None:
    """Nesterov's look-ahead needs momentum and no dampening (torch's rule)."""
    if nesterov and not (callable(momentum) or callable(dampening)) and (
        momentum <= 0 or dampening != 0
    ):
        raise ValueError(
            f"{owner}: nesterov=True requires momentum > 0 and dampening = 0, "
            f"got momentum={momentum!r}, dampening={dampening!r}"
        )


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
        check_nesterov(self.name, self.nesterov, self.momentum, self.dampening)

    def coeffs(self, step: int) -> Momentum:
        # arithmetic, not branches, so a traced step (jax.jit) works; exact for step 0 / not 0
        first = step == 0
        return Momentum(
            momentum=self.momentum,
            weight=first + (1.0 - first) * self.one_minus("dampening"),
            on=self.momentum != 0,
        )

    @property
    def kernel(self) -> Kernel:  # type: ignore[override]
        return nesterov if self.nesterov else heavy_ball
