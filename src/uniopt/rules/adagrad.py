from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import Elementwise, Rule, static
from ..hyper import NONNEG, hyper
from ..transforms import weight_decay


@dataclass(frozen=True)
class scale_by_adagrad(Elementwise):
    """``G <- G + u^2``; ``u <- lr/(1 + t*lr_decay) * u/(sqrt(G) + eps)`` (torch's Adagrad)."""

    lr: Any = hyper(1e-2, NONNEG)
    lr_decay: Any = hyper(0.0, NONNEG)
    eps: Any = hyper(1e-10, NONNEG)
    initial_accumulator_value: float = static(0.0, NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("sum",)

    def init_slots(self, p: Any, xp: Any) -> tuple[Any, ...]:
        return (xp.full_like(p, self.initial_accumulator_value),)

    def coeffs(self, step: int) -> tuple[float, ...]:
        return (self.lr / (1.0 + step * self.lr_decay), self.eps)

    @staticmethod
    def kernel(xp, c, p, u, acc):
        acc = acc + u * u
        return c[0] * (u / (xp.sqrt(acc) + c[1])), acc


@dataclass(frozen=True)
class adagrad(Rule):
    """Adagrad (Duchi et al., 2011) as torch writes it.

    ``g <- g + weight_decay*p``; ``G <- G + g^2``; ``p <- p - lr/(1+(t-1)*lr_decay) *
    g/(sqrt(G) + eps)``, ``G`` starting at ``initial_accumulator_value``; t counts from 1.
    (optax and keras start ``G`` at 0.1 and put eps inside the root; see CONVENTIONS.)
    """

    lr: Any = hyper(1e-2, NONNEG)
    lr_decay: Any = hyper(0.0, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    initial_accumulator_value: float = static(0.0, NONNEG)
    eps: Any = hyper(1e-10, NONNEG)

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    def parts(self) -> tuple[Elementwise, ...]:
        return (
            *([weight_decay(self.weight_decay)] if self.on("weight_decay") else []),
            scale_by_adagrad(self.lr, self.lr_decay, self.eps, self.initial_accumulator_value),
        )
