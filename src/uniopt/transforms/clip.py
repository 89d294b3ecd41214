"""Clipping the update: element by element, or by the global norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from ..backend import namespace
from ..base import Elementwise
from ..hyper import NONNEG, hyper
from .scale import Factor, scale_kernel


class Bounds(NamedTuple):
    lo: Any
    hi: Any


@dataclass(frozen=True)
class clip(Elementwise):
    """``u <- clip(u, -max_delta, max_delta)``, element by element."""

    max_delta: Any = hyper(1.0, NONNEG)

    def coeffs(self, step: int) -> Bounds:
        return Bounds(lo=-self.max_delta, hi=self.max_delta)

    @staticmethod
    def kernel(xp, c, p, u):
        return (xp.minimum(xp.maximum(u, c.lo), c.hi),)


@dataclass(frozen=True)
class clip_by_global_norm(Elementwise):
    """``u <- u * max_norm/||u||`` where the norm over every leaf exceeds ``max_norm``.

    As optax's ``clip_by_global_norm``; torch's ``clip_grad_norm_`` divides by
    ``||u|| + 1e-6`` and so scales by a hair less. Costs one extra read pass over whatever
    precedes it in the chain (at the head: the gradients).
    """

    max_norm: Any = hyper(1.0, NONNEG)
    needs_norm = True

    def coeffs(self, step: int) -> Factor:
        return Factor(factor=1.0)  # until the norm is known: see norm_coeffs

    def norm_coeffs(self, norm: Any, size: Any) -> Factor:
        if isinstance(norm, float):
            return Factor(factor=self.max_norm / norm if norm > self.max_norm else 1.0)
        xp = namespace(norm)  # a traced norm, under jax.jit
        return Factor(factor=xp.where(norm > self.max_norm, self.max_norm / norm, 1.0))

    kernel = staticmethod(scale_kernel)
