"""Multiplying the update by a number: a factor, a learning rate, a leaf's trust ratio; or
keeping only its sign."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import Elementwise, PerLeaf
from ..hyper import NONNEG, Interval, hyper
from ..moments import fma


class Factor(NamedTuple):
    factor: Any


def scale_kernel(xp, c, p, u):
    return (c.factor * u,)


@dataclass(frozen=True)
class scale(Elementwise):
    """``u <- factor * u``. ``scale(lr)`` ends most optimizers; ``factor`` may be a schedule.

    >>> import numpy as np, uniopt as uo
    >>> uo.update(uo.setup(uo.scale(0.5), [np.ones(2)]), [np.ones(2)], [np.ones(2)])[1]
    [array([0.5, 0.5])]
    """

    factor: Any = hyper(1.0, Interval(None))

    def steady(self) -> int | None:
        return 0

    def coeffs(self, step: int) -> Factor:
        return Factor(factor=self.factor)

    kernel = staticmethod(scale_kernel)


@dataclass(frozen=True)
class scale_by_lr(Elementwise):
    """``u <- lr * u``: :class:`scale` for a learning rate, which must not be negative."""

    lr: Any = hyper(1e-3, NONNEG)
    makes_step: ClassVar[bool] = True

    def steady(self) -> int | None:
        return 0

    def coeffs(self, step: int) -> Factor:
        return Factor(factor=self.lr)

    kernel = staticmethod(scale_kernel)

    @staticmethod
    def finish(xp, c, p, u):  # last: torch's p.add_(u, alpha=-lr), one fused multiply-add
        return fma(-c.factor, u, p)


class NoCoefficients(NamedTuple):
    pass


@dataclass(frozen=True)
class sign(Elementwise):
    """``u <- sign(u)``, element by element (optax's ``scale_by_sign``; Lion's and signSGD's
    direction). The sign of the array library: ``sign(0) = 0``; NaN stays NaN on NumPy, JAX
    and the compiled path, where torch's ``sign`` makes it 0.

    >>> import numpy as np, uniopt as uo
    >>> g = [np.array([-2.0, 0.0, 0.5])]
    >>> uo.update(uo.setup(uo.sign(), g), [np.zeros(3)], g)[1]
    [array([ 1.,  0., -1.])]
    """

    def steady(self) -> int | None:
        return 0

    def coeffs(self, step: Any) -> NoCoefficients:
        return NoCoefficients()

    @staticmethod
    def kernel(xp, c, p, u):
        return (xp.sign(u),)


class TrustRatio(NamedTuple):
    min_norm: Any
    trust_coefficient: Any
    eps: Any


@dataclass(frozen=True)
class scale_by_trust_ratio(PerLeaf):
    """Each leaf's update scaled by its trust ratio (LARS, LAMB): ``u <- r u`` with
    ``r = trust_coefficient * |p| / (|u| + eps)``, each norm raised to at least ``min_norm``,
    and ``r = 1`` where either norm is 0 (a zero-initialised parameter moves at all). As
    optax's ``scale_by_trust_ratio``. On DTensor shards (FSDP2, tensor parallel) the leaf's
    parameter and update are all-gathered whole on every rank, as for every per-leaf part
    (:mod:`uniopt.interop.dtensor`)."""

    real_only = True

    min_norm: Any = hyper(0.0, NONNEG)
    trust_coefficient: Any = hyper(1.0, NONNEG)
    eps: Any = hyper(0.0, NONNEG)
    uses_params: ClassVar[bool] = True
    batched: ClassVar[bool] = True

    def coeffs(self, step: Any) -> TrustRatio:
        return TrustRatio(min_norm=self.min_norm, trust_coefficient=self.trust_coefficient,
                          eps=self.eps)

    @staticmethod
    def apply(xp, c, p, u):
        p_norm = xp.clip(leaf_norm(xp, p), min=c.min_norm)
        u_norm = xp.clip(leaf_norm(xp, u), min=c.min_norm)
        zero = (p_norm == 0) | (u_norm == 0)
        # where a norm is 0 the ratio is not used: its denominator is kept from dividing by 0
        ratio = c.trust_coefficient * p_norm / xp.where(zero, 1.0, u_norm + c.eps)
        return (u * xp.where(zero, 1.0, ratio),)


class MinScale(NamedTuple):
    min_scale: Any


@dataclass(frozen=True)
class _ParamBlock(PerLeaf):
    """Each leaf's update scaled by a measure of its parameter, at least ``min_scale``."""

    real_only = True

    min_scale: Any = hyper(1e-3, NONNEG)
    uses_params: ClassVar[bool] = True
    batched: ClassVar[bool] = True

    def coeffs(self, step: Any) -> MinScale:
        return MinScale(min_scale=self.min_scale)


@dataclass(frozen=True)
class scale_by_param_block_norm(_ParamBlock):
    """Each leaf's update times its parameter's 2-norm, at least ``min_scale``:
    ``u <- u * max(|p|, min_scale)`` (optax's ``scale_by_param_block_norm``)."""

    @staticmethod
    def apply(xp, c, p, u):
        return (u * xp.clip(leaf_norm(xp, p), min=c.min_scale),)


@dataclass(frozen=True)
class scale_by_param_block_rms(_ParamBlock):
    """Each leaf's update times its parameter's root mean square, at least ``min_scale``:
    ``u <- u * max(sqrt(mean(p^2)), min_scale)`` (optax's ``scale_by_param_block_rms``;
    Adafactor's relative step). An empty leaf's is ``min_scale``."""

    @staticmethod
    def apply(xp, c, p, u):
        axes = tuple(range(1, p.ndim))
        size = 1
        for n in p.shape[1:]:
            size *= n
        mean = (xp.sum(p * p, axis=axes, keepdims=True) if axes else p * p) / max(size, 1)
        return (u * xp.clip(safe_sqrt(xp, mean), min=c.min_scale),)


def leaf_norm(xp: Any, x: Any) -> Any:
    """The 2-norm of each leaf of the batch ``x`` (stacked along the first axis), shaped to
    broadcast against it."""
    axes = tuple(range(1, x.ndim))
    if not axes:  # (0-d leaves: |x|, which XLA also made of sqrt(x*x), exact where x*x is not)
        return xp.abs(x)
    return safe_sqrt(xp, xp.sum(x * x, axis=axes, keepdims=True))


def safe_sqrt(xp: Any, x: Any) -> Any:
    """``sqrt(x)`` of a sum of squares, its derivative 0 where ``x`` is 0 (a leaf of zeros, a
    bias as initialised): the same values, but sqrt's infinite slope at 0 times the 0 a clip
    or a select hands back made a derivative through the step (``jax.grad``, autograd) NaN."""
    positive = x > 0
    return xp.where(positive, xp.sqrt(xp.where(positive, x, xp.ones_like(x))), x)
