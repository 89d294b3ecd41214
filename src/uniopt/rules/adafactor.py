"""Adafactor (Shazeer & Stern, 2018) in torch's form: a factored second moment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..backend import namespace
from ..base import PerLeaf, Rule, Transform
from ..hyper import NONNEG, Interval, hyper
from ..moments import lerp


def _leaf_axes(x: Any) -> tuple[int, ...]:
    """The axes of each leaf in a batch (all but the leading one)."""
    return tuple(range(1, x.ndim))


def _rms(xp: Any, x: Any) -> Any:
    """Each leaf's root mean square, shaped to broadcast against the batch."""
    axes = _leaf_axes(x)
    if not axes:  # a batch of 0-d leaves (torch reads an empty dim tuple as every axis)
        return xp.abs(x)
    n = 1
    for a in axes:
        n *= x.shape[a]
    return xp.sqrt(xp.sum(x * x, axis=axes, keepdims=True) / n)


class FactoredCoeffs(NamedTuple):
    weight: Any  # t^beta2_decay: the weight of this step's squares in the moving averages
    eps1: Any  # floor of the variance estimate's root (None: the dtype's machine epsilon)
    d: Any  # clipping threshold of the update's RMS


@dataclass(frozen=True)
class scale_by_factored_rms(PerLeaf):
    """Adafactor's direction: ``u <- g / sqrt(v_hat)``, clipped to RMS ``d``.

    A leaf of two or more dimensions keeps the row and column means of ``g^2`` over its last
    two axes, ``R <- lerp(R, mean_cols(g^2), w)``, ``C <- lerp(C, mean_rows(g^2), w)``, and
    estimates ``v_hat = R C / max(mean(R), eps1)``; a smaller leaf keeps ``v <- lerp(v, g^2,
    w)`` whole. ``w = t^beta2_decay``; ``u <- g / sqrt(max(v_hat, eps1^2))``, then
    ``u <- u / max(1, rms(u)/d)``."""

    beta2_decay: Any = hyper(-0.8, Interval(None, 0.0))
    eps1: float | None = None
    d: Any = hyper(1.0, Interval(1.0))
    slots: ClassVar[tuple[str, ...]] = ("row_var", "col_var", "variance")
    batched: ClassVar[bool] = True

    def slot_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...] | None, ...]:
        if len(shape) < 2:
            return None, None, tuple(shape)
        return (*shape[:-1], 1), (*shape[:-2], 1, shape[-1]), None

    def coeffs(self, step: Any) -> FactoredCoeffs:
        return FactoredCoeffs(weight=(step + 1) ** self.beta2_decay, eps1=self.eps1, d=self.d)

    @staticmethod
    def apply(xp, c, p, u, row_var, col_var, variance):
        eps1 = xp.finfo(u.dtype).eps if c.eps1 is None else c.eps1
        g2 = u * u
        if variance is None:
            row_var = lerp(row_var, xp.mean(g2, axis=-1, keepdims=True), c.weight)
            col_var = lerp(col_var, xp.mean(g2, axis=-2, keepdims=True), c.weight)
            v_hat = row_var * col_var / xp.clip(
                xp.mean(row_var, axis=-2, keepdims=True), min=eps1)
        else:
            v_hat = variance = lerp(variance, g2, c.weight)
        u = u / xp.sqrt(xp.clip(v_hat, min=eps1 * eps1))
        return u / xp.clip(_rms(xp, u) / c.d, min=1.0), row_var, col_var, variance


class RelativeStep(NamedTuple):
    rho: Any  # min(lr, 1/sqrt(t))
    eps2: Any  # floor of a parameter's RMS
    lr_wd: Any  # decoupled decay, scaled by lr (not by rho), as torch


@dataclass(frozen=True)
class scale_by_param_scale(PerLeaf):
    """Adafactor's step size, relative to each parameter's scale, and decoupled decay:
    ``u <- max(eps2, rms(p)) * min(lr, 1/sqrt(t)) * u + lr*weight_decay*p``."""

    lr: Any = hyper(1e-2, NONNEG)
    eps2: Any = hyper(1e-3, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    uses_params: ClassVar[bool] = True
    makes_step: ClassVar[bool] = True
    batched: ClassVar[bool] = True

    def coeffs(self, step: Any) -> RelativeStep:
        decay = (step + 1) ** -0.5
        if isinstance(decay, float) and isinstance(self.lr, float):
            rho = min(self.lr, decay)
        else:  # traced by jax.jit
            rho = namespace(decay if not isinstance(decay, float) else self.lr).minimum(
                self.lr, decay)
        return RelativeStep(rho=rho, eps2=self.eps2, lr_wd=self.lr * self.weight_decay)

    @staticmethod
    def apply(xp, c, p, u):
        return (xp.clip(_rms(xp, p), min=c.eps2) * c.rho * u + c.lr_wd * p,)


@dataclass(frozen=True)
class adafactor(Rule):
    """Adafactor (Shazeer & Stern, 2018) as torch 2.13's ``Adafactor`` writes it.

    ``p <- p - max(eps2, rms(p)) min(lr, 1/sqrt(t)) U - lr*weight_decay*p`` with ``U`` the
    clipped, factored direction of :class:`scale_by_factored_rms` (row and column statistics
    for leaves of two or more dimensions, over their last two axes). ``eps = (eps1, eps2)``;
    ``eps1=None`` is the parameter dtype's machine epsilon.

    >>> import numpy as np, uniopt as uo
    >>> p = {"w": np.ones((2, 3))}
    >>> state = uo.setup(uo.adafactor(), p)
    >>> sorted(k for k, v in state.slots.items() if v[0] is not None)
    ['scale_by_factored_rms.col_var', 'scale_by_factored_rms.row_var']
    >>> state, p = uo.update(state, p, {"w": np.full((2, 3), 0.5)})
    >>> p["w"][0, 0]  # rms(p) * lr * g/|g|: 1 - 0.01
    np.float64(0.99)
    """

    lr: Any = hyper(1e-2, NONNEG)
    beta2_decay: Any = hyper(-0.8, Interval(None, 0.0))
    eps: tuple[Any, Any] = (None, 1e-3)
    d: Any = hyper(1.0, Interval(1.0))
    weight_decay: Any = hyper(0.0, NONNEG)

    def check(self) -> None:
        eps = self.eps
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"{self.name}: eps must be a pair (eps1, eps2), got {eps!r}")
        for i, e in enumerate(eps):
            if (e is not None or i == 1) and not (isinstance(e, (int, float)) and e >= 0):
                raise ValueError(
                    f"{self.name}: eps[{i}] must be a number >= 0"
                    f"{' or None' if i == 0 else ''}, got {e!r}"
                )
        object.__setattr__(self, "eps", tuple(None if e is None else float(e) for e in eps))

    def parts(self) -> tuple[Transform, ...]:
        return (
            scale_by_factored_rms(beta2_decay=self.beta2_decay, eps1=self.eps[0], d=self.d),
            scale_by_param_scale(lr=self.lr, eps2=self.eps[1], weight_decay=self.weight_decay),
        )
