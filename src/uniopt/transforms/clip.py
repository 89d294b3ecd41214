"""Clipping the update: element by element, by the global norm, by each leaf's norm or RMS,
or unit by unit relative to the parameter (adaptive gradient clipping)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..backend import is_complex, namespace
from ..base import Elementwise, PerLeaf
from ..hyper import NONNEG, Interval, hyper
from .scale import Factor, safe_sqrt, scale_kernel

POSITIVE = Interval(0.0, lo_open=True)


class Bounds(NamedTuple):
    lo: Any
    hi: Any


@dataclass(frozen=True)
class clip(Elementwise):
    """``u <- clip(u, -max_delta, max_delta)``, element by element."""

    max_delta: Any = hyper(1.0, NONNEG)

    def steady(self) -> int | None:
        return 0

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

    On DTensor shards (FSDP2, tensor parallel) each rank sums the squares of its shards, one
    float64 number per leaf, and one ``all_reduce`` per mesh dimension adds them over the
    ranks a leaf is split across; a replicated leaf (a ``RowwiseParallel`` bias) is counted
    once, not once per rank.
    """

    max_norm: Any = hyper(1.0, NONNEG)
    needs_norm = True

    def coeffs(self, step: int) -> Factor:
        return Factor(factor=1.0)  # until the norm is known: see norm_coeffs

    def norm_coeffs(self, norm: Any, size: Any) -> Factor:
        # a NaN norm makes every leaf NaN, as optax's and torch's clip do (not "no clip")
        if isinstance(norm, float):
            return Factor(factor=1.0 if norm <= self.max_norm else self.max_norm / norm)
        xp = namespace(norm)  # a traced norm, under jax.jit
        return Factor(factor=xp.where(norm <= self.max_norm, 1.0, self.max_norm / norm))

    kernel = staticmethod(scale_kernel)


def _maximum(a: Any, b: Any) -> Any:
    """``max(a, b)``, NaN kept, of host numbers (then a Python float: a NumPy scalar would
    widen float32 arrays) or of arrays (a norm traced by ``jax.jit``, the compiled path's table
    of every leaf's norm)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a if a != a or a > b else b
    return namespace(b if isinstance(a, (int, float)) else a).maximum(a, b)


@dataclass(frozen=True)
class clip_by_norm(Elementwise):
    """Each leaf's update to 2-norm at most ``max_norm``: ``u <- u * max_norm/max(|u|,
    max_norm)``, so ``u`` is left exactly as it is where ``|u| <= max_norm`` (a zero ``u``
    too: nothing divides by its norm).

    Keras's ``clipnorm`` (which computes ``u*max_norm / max(|u|, max_norm)``, the same but
    for rounding; its ``clipnorm=0`` turns clipping off, here ``max_norm`` must be positive)
    and Flux's ``ClipNorm(max_norm)``; torch's ``clip_grad_norm_`` on one tensor at a time
    divides by ``|u| + 1e-6``. On the compiled path the norms cost one extra read pass, as
    :class:`clip_by_global_norm`'s does, and on DTensor shards the same ``all_reduce`` of each
    leaf's sum of squares over the ranks it is split across.

    >>> import numpy as np, uniopt as uo
    >>> g = [np.array([3.0, 4.0]), np.array([0.3, 0.4])]  # norms 5 and 0.5
    >>> uo.update(uo.setup(uo.clip_by_norm(1.0), g), [np.zeros(2)] * 2, g)[1]
    [array([-0.6, -0.8]), array([-0.3, -0.4])]
    """

    max_norm: Any = hyper(1.0, POSITIVE)
    needs_norm = True
    norm_per_leaf = True

    def coeffs(self, step: Any) -> Factor:
        return Factor(factor=1.0)  # until the norms are known: see norm_coeffs

    def norm_coeffs(self, norm: Any, size: Any) -> Factor:
        return Factor(factor=self.max_norm / _maximum(norm, self.max_norm))

    kernel = staticmethod(scale_kernel)


class Denominator(NamedTuple):
    denom: Any


def divide_kernel(xp, c, p, u):
    return (u / c.denom,)


@dataclass(frozen=True)
class clip_by_block_rms(Elementwise):
    """Each leaf's update to root mean square at most ``threshold``:
    ``u <- u / max(1, rms(u)/threshold)``, ``rms(u) = |u| / sqrt(u.size)``; as optax's
    ``clip_by_block_rms``. ``threshold`` must be positive (optax divides by it). On DTensor
    shards, as :class:`clip_by_norm`: each leaf's sum of squares ``all_reduce``-d over the ranks
    it is split across, over its global number of elements."""

    threshold: Any = hyper(1.0, POSITIVE)
    needs_norm = True
    norm_per_leaf = True
    complex_aware = True  # the mean is over a complex leaf's numbers, not its pairs' parts

    def coeffs(self, step: Any) -> Denominator:
        return Denominator(denom=1.0)  # until the norms are known: see norm_coeffs

    def norm_coeffs(self, norm: Any, size: Any) -> Denominator:
        rms = norm / _maximum(size, 1) ** 0.5  # an empty leaf's is 0
        return Denominator(denom=_maximum(rms / self.threshold, 1.0))

    kernel = staticmethod(divide_kernel)


@dataclass(frozen=True)
class normalize(Elementwise):
    """``u <- u/((||u|| + eps)/scale_factor)``, the norm over every leaf: with the defaults
    ``u/||u||``, ``optax.contrib.normalize`` (SAM's step direction; a zero update is NaN, as
    optax's); with ``eps=1e-6``, ``optax.normalize_by_update_norm(scale_factor, eps)``. One
    extra read pass, as :class:`clip_by_global_norm`'s."""

    scale_factor: Any = hyper(1.0, Interval(None))
    eps: Any = hyper(0.0, NONNEG)
    needs_norm = True

    def coeffs(self, step: Any) -> Denominator:
        return Denominator(denom=1.0)  # until the norm is known: see norm_coeffs

    def norm_coeffs(self, norm: Any, size: Any) -> Denominator:
        return Denominator(denom=(norm + self.eps) / self.scale_factor)

    kernel = staticmethod(divide_kernel)


class UnitClip(NamedTuple):
    clipping: Any
    eps: Any
    div_eps: Any  # keeps the division finite where a unit's norm is 0 (it is not clipped)


WEIGHT_LAYOUTS = ("optax", "torch")


@dataclass(frozen=True)
class adaptive_grad_clip(PerLeaf):
    """Adaptive gradient clipping (Brock et al., 2021): each unit's update is scaled to norm at
    most ``clipping * max(|p_unit|, eps)``, ``u <- u * max_norm / max(|u_unit|, 1e-6)`` where
    ``|u_unit| >= max_norm``; as optax's ``adaptive_grad_clip``.

    A *unit* is what one output feature owns, and where that is depends on how a framework
    lays out its weights. ``weight_layout="optax"`` reduces as optax's ``unitwise_norm``, for
    JAX's layouts (a Dense kernel ``(in, out)``, a convolution ``HWIO``): a leaf that squeezes
    to at most one axis is one unit; 2-D and 3-D leaves reduce over axis 0; 4-D over
    ``(0, 1, 2)``; 5-D over ``(0, 1, 2, 3)``. ``weight_layout="torch"``, for torch's (a Linear
    weight ``(out, in)``, a convolution ``(out, in, kh, kw)``), reduces over every axis but
    the first, as timm's ``adaptive_clip_grad`` (a vector or a scalar is one unit). ``axis``
    names the axes to reduce for every leaf instead, as optax's ``axis``.
    """

    clipping: Any = hyper(1e-2, NONNEG)
    eps: Any = hyper(1e-3, NONNEG)
    axis: int | tuple[int, ...] | None = None
    weight_layout: str = "optax"
    uses_params: ClassVar[bool] = True
    batched: ClassVar[bool] = True
    # a complex leaf's units are of its own axes, each number's modulus in their norms
    complex_aware: ClassVar[bool] = True

    def check(self) -> None:
        if isinstance(self.axis, list):
            object.__setattr__(self, "axis", tuple(self.axis))
        if self.weight_layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"{self.name}: weight_layout must be one of {WEIGHT_LAYOUTS}, got "
                             f"{self.weight_layout!r}")
        axes = (self.axis,) if isinstance(self.axis, int) else self.axis
        if axes is not None and not (
            isinstance(axes, tuple) and all(isinstance(a, int) and not isinstance(a, bool)
                                            for a in axes)
        ):
            raise TypeError(f"{self.name}: axis must be None, an int or a tuple of ints, got "
                            f"{self.axis!r}")
        if axes is not None and self.weight_layout != "optax":
            raise ValueError(f"{self.name}: give axis or weight_layout={self.weight_layout!r}, "
                             "not both")

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        try:
            self.unit_axes(shape)
        except ValueError as e:
            return str(e)
        return None

    def unit_axes(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The axes a leaf of ``shape`` is reduced over, each unit's norm."""
        ndim = len(shape)
        if self.axis is not None:
            axes = (self.axis,) if isinstance(self.axis, int) else self.axis
            bad = [a for a in axes if not -ndim <= a < ndim]
            if bad:
                raise ValueError(f"axis {bad[0]} is out of range for {ndim} dimensions")
            return tuple(sorted({a % ndim for a in axes}))
        if self.weight_layout == "torch":
            return tuple(range(ndim)) if ndim <= 1 else tuple(range(1, ndim))
        if sum(n != 1 for n in shape) <= 1:
            return tuple(range(ndim))
        if ndim > 5:
            raise ValueError("optax's unitwise norm takes leaves of up to 5 dimensions; name "
                             "the axes to reduce with axis=")
        return {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}[ndim]

    def coeffs(self, step: Any) -> UnitClip:
        return UnitClip(clipping=self.clipping, eps=self.eps, div_eps=1e-6)

    def apply(self, xp, c, p, u):
        axes = tuple(a + 1 for a in self.unit_axes(tuple(u.shape[1:])))  # after the batch's
        g_norm, p_norm = unit_norm(xp, u, axes), unit_norm(xp, p, axes)
        max_norm = c.clipping * xp.clip(p_norm, min=c.eps)
        clipped = u * (max_norm / xp.clip(g_norm, min=c.div_eps))
        return (xp.where(g_norm < max_norm, u, clipped),)


def unit_norm(xp: Any, x: Any, axes: tuple[int, ...]) -> Any:
    """The 2-norm of ``x`` over ``axes``, kept for broadcasting (no axes: ``|x|``, where torch
    would read an empty tuple as every axis); its derivative 0 at a unit of zeros (a bias as
    initialised: sqrt's made a derivative through the step NaN there, as optax's does). Of
    complex ``x``, the norm of the moduli, ``|z|^2`` as optax's ``abs_sq``."""
    sq = xp.real(xp.conj(x) * x) if is_complex(x) else x * x
    return safe_sqrt(xp, xp.sum(sq, axis=axes, keepdims=True) if axes else sq)
