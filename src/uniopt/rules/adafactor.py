"""Adafactor (Shazeer & Stern, 2018) in torch's form: a factored second moment."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from .. import backend
from ..backend import is_torch, namespace
from ..base import Info, PerLeaf, Rule, Transform
from ..hyper import NONNEG, Interval, hyper
from ..moments import fma, lerp


def _leaf_axes(x: Any) -> tuple[int, ...]:
    """The axes of each leaf in a batch (all but the leading one)."""
    return tuple(range(1, x.ndim))


def _norm(xp: Any, x: Any, axis: int) -> Any:
    """The 2-norm along ``axis``, kept: torch's ``norm(x, dim=axis, keepdim=True)`` on torch
    tensors (its own reduction, as its Adafactor takes it), ``sqrt(sum(x*x))`` elsewhere."""
    if is_torch(x):
        import torch

        return torch.linalg.vector_norm(x, dim=axis, keepdim=True)
    return xp.sqrt(xp.sum(x * x, axis=axis, keepdims=True))


def _mean_sq(xp: Any, g: Any, axis: int) -> Any:
    """The mean of ``g^2`` along ``axis`` in torch's order: ``norm(g, dim).square_().div_(n)``
    (its Adafactor never forms ``g*g`` for a matrix)."""
    r = _norm(xp, g, axis)
    return r * r / g.shape[axis]


def _rsqrt(xp: Any, x: Any) -> Any:
    """``1/sqrt(x)``: torch's CPU ``rsqrt`` is that, an IEEE square root and a division (two
    roundings), on its vectorised and scalar paths alike."""
    if is_torch(x):
        import torch

        return torch.rsqrt(x)
    return 1 / xp.sqrt(x)


def _leaf_norms(xp: Any, x: Any) -> Any:
    """Each leaf's 2-norm: on torch tensors a list of Python floats, each leaf's own
    ``norm(2).item()`` as torch's for-loop takes it (one reduction per leaf: a reduction over
    the batch may split its sums elsewhere); on other arrays, shaped ``(batch, 1, ...)``."""
    if is_torch(x):
        return [float(x[b].norm(2)) for b in range(x.shape[0])]
    axes = _leaf_axes(x)
    return xp.sqrt(xp.sum(x * x, axis=axes, keepdims=True)) if axes else xp.abs(x)


def _larger(xp: Any, floor: Any, x: Any) -> Any:
    """Python's ``max(floor, x)``: ``x`` where it is larger (not NaN), else ``floor``."""
    if isinstance(x, float):
        return max(floor, x)
    return xp.where(x > floor, x, floor)


def _wide(xp: Any, x: Any) -> Any:
    """``x`` in float64, as torch's ``.item()`` arithmetic is on the host, where the library
    has it (JAX only with x64; there ``x`` as it is)."""
    if backend.is_jax(x):
        return x
    return xp.astype(x, xp.float64)


class FactoredCoeffs(NamedTuple):
    weight: Any  # t^beta2_decay: the weight of this step's squares in the moving averages
    eps1: Any  # floor of the variance estimate's root (None: the dtype's machine epsilon)
    d: Any  # clipping threshold of the update's RMS
    clip: bool  # whether to clip here (adafactor clips in its last part, as torch)


@dataclass(frozen=True)
class scale_by_factored_rms(PerLeaf):
    """Adafactor's direction: ``u <- g / sqrt(v_hat)``, clipped to RMS ``d``.

    A leaf of two or more dimensions keeps the row and column means of ``g^2`` over its last
    two axes, ``R <- lerp(R, mean_cols(g^2), w)``, ``C <- lerp(C, mean_rows(g^2), w)``, and
    estimates ``v_hat = R C / max(mean(R), eps1)``; a smaller leaf keeps ``v <- lerp(v, g^2,
    w)`` whole. ``w = t^beta2_decay``; ``u <- rsqrt(max(v_hat, eps1^2)) g``, then
    ``u <- u / max(1, rms(u)/d)`` (``clip=False``: no clipping). Each mean of ``g^2`` is
    ``norm(g)^2 / n`` along its axis, as torch rounds it."""

    beta2_decay: Any = hyper(-0.8, Interval(None, 0.0))
    eps1: float | None = None
    d: Any = hyper(1.0, Interval(1.0))
    clip: bool = True
    slots: ClassVar[tuple[str, ...]] = ("row_var", "col_var", "variance")
    batched: ClassVar[bool] = True

    def slot_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...] | None, ...]:
        if len(shape) < 2:
            return None, None, tuple(shape)
        return (*shape[:-1], 1), (*shape[:-2], 1, shape[-1]), None

    def coeffs(self, step: Any) -> FactoredCoeffs:
        # torch's step_float**beta2_decay: the step a float
        return FactoredCoeffs(weight=(step + 1.0) ** self.beta2_decay, eps1=self.eps1,
                              d=self.d, clip=self.clip)

    @staticmethod
    def apply(xp, c, p, u, row_var, col_var, variance):
        eps1 = float(xp.finfo(u.dtype).eps) if c.eps1 is None else c.eps1
        if variance is None:
            row_var = lerp(row_var, _mean_sq(xp, u, -1), c.weight)
            col_var = lerp(col_var, _mean_sq(xp, u, -2), c.weight)
            # torch's row_var @ col_var: an outer product, each element one rounded product
            v_hat = row_var * col_var / xp.clip(
                xp.mean(row_var, axis=-2, keepdims=True), min=eps1)
        else:
            v_hat = variance = lerp(variance, u * u, c.weight)
        u = _rsqrt(xp, xp.clip(v_hat, min=eps1 * eps1)) * u
        if c.clip:
            n = math.prod(u.shape[1:])
            u = u / xp.clip(_leaf_norms_array(xp, u) / (n**0.5 * c.d), min=1.0)
        return u, row_var, col_var, variance


def _leaf_norms_array(xp: Any, x: Any) -> Any:
    """:func:`_leaf_norms` as an array shaped ``(batch, 1, ...)`` on every library."""
    norms = _leaf_norms(xp, x)
    if isinstance(norms, list):
        return xp.reshape(xp.asarray(norms, dtype=x.dtype, device=x.device),
                          (-1,) + (1,) * (x.ndim - 1))
    return norms


class RelativeStep(NamedTuple):
    rho: Any  # min(lr, 1/sqrt(t))
    eps2: Any  # floor of a parameter's RMS
    lr_wd: Any  # decoupled decay, scaled by lr (not by rho), as torch
    keep: Any  # 1 - lr*weight_decay: torch's factor of the decay, in Python's double
    d: Any  # clipping threshold of the update's RMS
    clip: bool  # whether to clip it (False: d is not read)


@dataclass(frozen=True)
class scale_by_param_scale(PerLeaf):
    """Adafactor's step size, relative to each parameter's scale, and decoupled decay:
    ``u <- max(eps2, rms(p)) * min(lr, 1/sqrt(t)) * u / max(1, rms(u)/d) + lr*weight_decay*p``
    (``clip=True``; by default no clipping here).

    Last in a rule, it writes the parameter in torch's order: ``alpha = max(eps2, rms(p)) rho``
    and ``denom = max(1, rms(u)/d)`` as torch's Python floats (each leaf's norms, its
    ``.item()``), ``p <- p (1 - lr*weight_decay)``, then ``p <- p + (-alpha/denom) u`` with one
    rounding (torch's ``p.add_(u, alpha=-alpha/denom)``)."""

    lr: Any = hyper(1e-2, NONNEG)
    eps2: Any = hyper(1e-3, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    d: Any = hyper(1.0, Interval(1.0))
    clip: bool = False
    uses_params: ClassVar[bool] = True
    makes_step: ClassVar[bool] = True
    batched: ClassVar[bool] = True

    def coeffs(self, step: Any) -> RelativeStep:
        decay = 1 / (step + 1.0) ** 0.5  # torch's 1 / (step_float**0.5)
        if isinstance(decay, float) and isinstance(self.lr, float):
            rho = min(self.lr, decay)
        else:  # traced by jax.jit
            rho = namespace(decay if not isinstance(decay, float) else self.lr).minimum(
                self.lr, decay)
        lr_wd = self.lr * self.weight_decay
        return RelativeStep(rho=rho, eps2=self.eps2, lr_wd=lr_wd, keep=1 - lr_wd, d=self.d,
                            clip=self.clip)

    @staticmethod
    def _scales(xp: Any, c: RelativeStep, p: Any, u: Any) -> Any:
        """Each leaf's ``alpha/denom``: Python floats on torch tensors, as torch computes them;
        elsewhere an array shaped ``(batch, 1, ...)``, in float64 where the library has it."""
        root_n = math.prod(p.shape[1:]) ** 0.5  # torch's numel() ** 0.5
        pn = _leaf_norms(xp, p)
        if isinstance(pn, list):
            alphas = [_larger(xp, c.eps2, a / root_n) * c.rho for a in pn]
            if not c.clip:
                return alphas
            return [a / _larger(xp, 1.0, b / (root_n * c.d))
                    for a, b in zip(alphas, _leaf_norms(xp, u), strict=True)]
        alpha = _larger(xp, c.eps2, _wide(xp, pn) / root_n) * c.rho
        if not c.clip:
            return alpha
        return alpha / _larger(xp, 1.0, _wide(xp, _leaf_norms(xp, u)) / (root_n * c.d))

    @staticmethod
    def apply(xp, c, p, u):
        s = scale_by_param_scale._scales(xp, c, p, u)
        if isinstance(s, list):
            s = xp.reshape(xp.asarray(s, dtype=xp.float64, device=p.device),
                           (-1,) + (1,) * (p.ndim - 1))
        return (xp.astype(s, u.dtype) * u + c.lr_wd * p,)

    @staticmethod
    def finish(xp, c, p, u):
        s = scale_by_param_scale._scales(xp, c, p, u)
        decays = not (isinstance(c.lr_wd, (int, float)) and c.lr_wd == 0)
        if isinstance(s, list):  # torch: leaf by leaf, its scalar alpha rounded by add_
            import torch

            return (torch.stack([
                torch.add(p[b] * c.keep if decays else p[b], u[b], alpha=-s[b])
                for b in range(p.shape[0])]),)
        return (fma(xp.astype(-s, u.dtype), u, p * c.keep if decays else p),)


@dataclass(frozen=True)
class adafactor(Rule):
    """Adafactor (Shazeer & Stern, 2018) as torch 2.13's ``Adafactor`` writes it.

    ``p <- p - max(eps2, rms(p)) min(lr, 1/sqrt(t)) U - lr*weight_decay*p`` with ``U`` the
    clipped, factored direction of :class:`scale_by_factored_rms` (row and column statistics
    for leaves of two or more dimensions, over their last two axes). ``eps = (eps1, eps2)``;
    ``eps1=None`` is the parameter dtype's machine epsilon.

    It rounds as torch's for-loop (``foreach=False``): each mean of ``g^2`` is torch's
    ``norm(g, dim)^2 / n``, the moving averages its ``lerp``, ``rsqrt`` an IEEE root and a
    division; ``alpha``, ``rho`` and the clipping's ``denom`` are its Python floats from each
    leaf's norms; the decay ``p (1 - lr*weight_decay)`` comes first and the step is one fused
    ``p + (-alpha/denom) U``. On torch tensors the norms and means are torch's own reductions,
    so ``uniopt.torch.Adafactor`` is torch's bits at every step (torch's square root is not
    used). On NumPy the reductions are NumPy's pairwise sums, which need not add in torch's
    order: a norm may differ in its last bit, and with it a step. (torch takes ``eps1=None``
    from the first parameter of a group for all; here each leaf's own dtype.)

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

    info: ClassVar[Info] = Info(
        family="factored",
        paper="Shazeer & Stern (2018)",
        references=("torch.optim.Adafactor", "optax.adafactor", "keras.optimizers.Adafactor"),
        example={"lr": 0.03},
        budget=2000,
        complex=False,
    )

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
            # torch clips in its last step (one scalar, -alpha/denom, for the fused add)
            scale_by_factored_rms(beta2_decay=self.beta2_decay, eps1=self.eps[0], d=self.d,
                                  clip=False),
            scale_by_param_scale(lr=self.lr, eps2=self.eps[1], weight_decay=self.weight_decay,
                                 d=self.d, clip=True),
        )
