"""Resilient backpropagation (Riedmiller & Braun, 1993) as torch.optim writes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import Elementwise, Info, Rule, Transform
from ..hyper import NONNEG, Interval, hyper, resolve
from ..moments import select


class RpropCoeffs(NamedTuple):
    etaminus: Any
    etaplus: Any
    lo: Any  # step_sizes: the clamp of the step size
    hi: Any
    zero: Any


def _check(owner: str, etas: Any, step_sizes: Any) -> None:
    if not any(map(callable, etas)) and not 0.0 < etas[0] < 1.0 < etas[1]:
        raise ValueError(f"{owner}: etas must satisfy 0 < etas[0] < 1 < etas[1], got {etas!r}")
    if not any(map(callable, step_sizes)) and step_sizes[0] > step_sizes[1]:
        raise ValueError(
            f"{owner}: step_sizes must be (min, max) with min <= max, got {step_sizes!r}")


@dataclass(frozen=True)
class scale_by_rprop(Elementwise):
    """Rprop's step: where ``u`` keeps the sign of ``prev``, the step size ``s`` grows by
    ``etas[1]``; where it flips, ``s`` shrinks by ``etas[0]`` and ``u`` counts as 0; ``s`` is
    clamped to ``step_sizes``; ``u <- sign(u)*s``; ``prev <- u`` (0 where it flipped).
    ``s`` starts at ``lr`` (its value at step 0: later values change nothing, as in torch)."""

    lr: Any = hyper(1e-2, NONNEG)
    etas: tuple[Any, Any] = hyper((0.5, 1.2), Interval(0.0, lo_open=True))
    step_sizes: tuple[Any, Any] = hyper((1e-6, 50), NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("prev", "step_size")
    makes_step: ClassVar[bool] = True

    def check(self) -> None:
        _check(self.name, self.etas, self.step_sizes)

    def init_slots(self, p: Any, xp: Any) -> tuple[Any, ...]:
        return xp.zeros_like(p), xp.full_like(p, resolve(self.lr, 0))

    def coeffs(self, step: int) -> RpropCoeffs:
        return RpropCoeffs(etaminus=self.etas[0], etaplus=self.etas[1], lo=self.step_sizes[0],
                           hi=self.step_sizes[1], zero=0.0)

    @staticmethod
    def kernel(xp, c, p, u, prev, step_size):
        agree = u * prev
        # agree == 0 keeps s (and a NaN makes it NaN, as torch's sign does)
        s = select(xp, agree > 0, step_size * c.etaplus,
                   select(xp, agree < 0, step_size * c.etaminus, step_size + agree * c.zero))
        s = xp.minimum(xp.maximum(s, c.lo), c.hi)
        g = select(xp, agree < 0, s * c.zero, u)
        return select(xp, g > 0, s, select(xp, g < 0, -s, g * c.zero)), g, s


@dataclass(frozen=True)
class rprop(Rule):
    """Rprop (Riedmiller & Braun, 1993) as torch writes it: :class:`scale_by_rprop`, each
    element moving by its own step size against the sign of its gradient; ``lr`` is the initial
    step size."""

    lr: Any = hyper(1e-2, NONNEG)
    etas: tuple[Any, Any] = hyper((0.5, 1.2), Interval(0.0, lo_open=True))
    step_sizes: tuple[Any, Any] = hyper((1e-6, 50), NONNEG)

    info: ClassVar[Info] = Info(
        family="sign",
        paper="Riedmiller & Braun (1993)",
        references=("torch.optim.Rprop",),
        example={"lr": 0.001},
        budget=500,
    )

    def check(self) -> None:
        _check(self.name, self.etas, self.step_sizes)

    def parts(self) -> tuple[Transform, ...]:
        return (scale_by_rprop(lr=self.lr, etas=self.etas, step_sizes=self.step_sizes),)
