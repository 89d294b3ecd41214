"""GaLore (Zhao et al., 2024): Adam on a low-rank projection of each matrix's gradient.

Each projected leaf's moments have the projection's shape, not the leaf's, and the projector is
refreshed from an SVD of the gradient every few steps: one whole-tree part keeps the projectors
and the moments in its tree state and runs Adam's kernel (:class:`~uniopt.scale_by_adam`'s, so
the arithmetic is written once) on the low-rank gradients.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from .. import backend
from ..base import Info, Rule, Transform, WholeTree
from ..hyper import NONNEG, UNIT_OPEN, check_integer, hyper
from ..transforms.decay import weight_decay
from ..transforms.mask import frozen_mask, masked_by
from ..transforms.scale import scale_by_lr
from ..tree import flatten_leaves, unflatten
from .adam import adam_kernel, scale_by_adam
from .schedule_free import arrays


class GaLoreDimensionNumbers(NamedTuple):
    """The axes of a leaf that form the rows (``reduction_axis``) and the columns
    (``output_axis``) of the matrix GaLore projects, as optax's ``GaLoreDimensionNumbers``:
    an attention weight ``(embed, heads, head_dim)`` is ``GaLoreDimensionNumbers(0, (1, 2))``."""

    reduction_axis: int | tuple[int, ...] = 0
    output_axis: int | tuple[int, ...] = 1


def _axes(a: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return tuple(x % ndim for x in ((a,) if isinstance(a, int) else a))


class _Matrix(NamedTuple):
    """How a leaf is seen as a matrix: its permutation, the matrix's shape, the way back."""

    order: tuple[int, ...]
    rows: int
    cols: int
    permuted: tuple[int, ...]
    back: tuple[int, ...]

    @property
    def left(self) -> bool:  # project the rows (a tall matrix), else the columns
        return self.rows >= self.cols

    def to(self, xp: Any, x: Any) -> Any:
        return xp.reshape(xp.permute_dims(x, self.order), (self.rows, self.cols))

    def from_(self, xp: Any, x: Any) -> Any:
        return xp.permute_dims(xp.reshape(x, self.permuted), self.back)


def _matrix(shape: tuple[int, ...], dims: GaLoreDimensionNumbers) -> _Matrix:
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"GaLore projects leaves of 2 axes or more, got shape {shape}")
    red, out = _axes(dims.reduction_axis, ndim), _axes(dims.output_axis, ndim)
    if set(red) & set(out) or len(set(red) | set(out)) != ndim or len(red + out) != ndim:
        raise ValueError(f"GaLore's reduction axes {red} and output axes {out} must split the "
                         f"{ndim} axes of shape {shape} between them")
    order = red + out
    return _Matrix(order, math.prod(shape[a] for a in red), math.prod(shape[a] for a in out),
                   tuple(shape[a] for a in order),
                   tuple(sorted(range(ndim), key=lambda i: order[i])))


def _check_counts(t: Any) -> None:
    for name in ("rank", "update_proj_gap"):
        object.__setattr__(t, name, check_integer(t.name, name, getattr(t, name), 1))


class GaloreCoeffs(NamedTuple):
    adam: Any  # scale_by_adam's coefficients for the step
    refresh: Any  # the projectors are recomputed at this step
    scale: Any


@dataclass(frozen=True)
class scale_by_galore(WholeTree):
    """GaLore's direction, optax's ``contrib.scale_by_galore`` with its default base
    (``scale_by_adam``): each projected leaf seen as a matrix ``G`` (``m x n``), ``P`` the
    first ``r = min(rank, m, n)`` left singular vectors of ``G`` (``m >= n``) or right ones,
    recomputed every ``update_proj_gap`` steps from the first; Adam's direction ``A`` of the
    low-rank gradient ``P^T G`` (or ``G P``); ``u = scale * P A`` (or ``A P^T``), back in the
    leaf's shape. Other leaves take Adam's direction of their gradient.

    ``weight_dimension_numbers``: None (2-D leaves projected, as optax's default) or one
    :class:`GaLoreDimensionNumbers` for every leaf of 2 axes or more. ``svd_in_float32``
    (optax: always): the SVD of a float64 gradient in float32, the projector cast back.
    Tree state: ``projector``, ``exp_avg`` and ``exp_avg_sq`` (one array per leaf; a leaf not
    projected keeps a ``(0, 0)`` projector)."""

    linalg: ClassVar[tuple[str, ...]] = ("svd",)
    reads_every_leaf = False  # (each leaf's projector and moments its own)

    real_only = True

    rank: int = 128
    update_proj_gap: int = 200
    scale: Any = hyper(1.0, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    weight_dimension_numbers: GaLoreDimensionNumbers | None = None
    svd_in_float32: bool = True

    def check(self) -> None:
        _check_counts(self)
        d = self.weight_dimension_numbers
        if d is not None and not isinstance(d, GaLoreDimensionNumbers):
            raise ValueError(f"{self.name}: weight_dimension_numbers must be None or a "
                             f"GaLoreDimensionNumbers, got {d!r}")

    def _adam(self) -> scale_by_adam:
        return scale_by_adam(b1=self.b1, b2=self.b2, eps=self.eps, eps_root=self.eps_root)

    def coeffs(self, step: Any) -> GaloreCoeffs:
        return GaloreCoeffs(adam=self._adam().coeffs(step),
                            refresh=step % self.update_proj_gap == 0, scale=self.scale)

    def _plan(self, shape: tuple[int, ...]) -> _Matrix | None:
        d = self.weight_dimension_numbers
        if d is None:
            return _matrix(shape, GaLoreDimensionNumbers()) if len(shape) == 2 else None
        return _matrix(shape, d) if len(shape) >= 2 else None

    def _state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of a leaf's projector and moments (a leaf it does not project: its own,
        and no projector); kept in :attr:`memo`, as every step checks them."""
        found = self.memo.get(("state shapes", shape))
        if found is not None:
            return found
        plan = self._plan(shape)
        if plan is None:
            found = (0, 0), shape
        else:
            r = min(self.rank, plan.rows, plan.cols)
            side = plan.rows if plan.left else plan.cols
            found = (side, r), ((r, plan.cols) if plan.left else (plan.rows, r))
        self.memo["state shapes", shape] = found
        return found

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        projector, moment = self._state_shapes(tuple(shape))
        return (projector, moment, moment)

    def init_tree(self, params: Any) -> dict[str, Any]:
        leaves, _ = flatten_leaves(params)
        shapes = [self._state_shapes(tuple(p.shape)) for p in leaves]

        def zeros(k: int) -> list[Any]:
            # a leaf not projected keeps Adam's moments laid out as the leaf (a sharded bias's
            # split as it is, as a slot is); the low-rank ones and the projectors replicated
            return [backend.namespace(p).zeros_like(p)
                    if k and self._plan(tuple(p.shape)) is None
                    else _zeros(backend.namespace(p), s[k], p)
                    for p, s in zip(leaves, shapes, strict=True)]

        return {"projector": zeros(0), "exp_avg": zeros(1), "exp_avg_sq": zeros(1)}

    def check_tree(self, state: Any, leaves: list[Any]) -> str | None:
        if not isinstance(state, dict):
            return None
        lists = [(key, state.get(key)) for key in ("projector", "exp_avg", "exp_avg_sq")]
        for i, p in enumerate(leaves):
            projector, moment = self._state_shapes(tuple(p.shape))
            for (key, xs), shape in zip(lists, (projector, moment, moment), strict=True):
                if isinstance(xs, list) and i < len(xs) and tuple(xs[i].shape) != shape:
                    return (f"{key} for leaf {i} has shape {tuple(xs[i].shape)}, where a param "
                            f"of shape {tuple(p.shape)} keeps {shape}")
        return None

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any,
                   **extra: Any) -> tuple[Any, Any]:
        gs, treedef = flatten_leaves(u)
        kernel = adam_kernel  # its scale_by_adam is Adam's, not NAdam's
        out, projectors, ms, vs = [], [], [], []
        for i, g in enumerate(gs):
            xp = backend.namespace(g)

            def read(x: Any, g: Any = g, xp: Any = xp) -> Any:
                # in the step's dtype (float32 for 16-bit params; the engine keeps the state in
                # the dtype setup gave it): torch mixes no dtypes in lerp or matmul
                return x if x.dtype == g.dtype else xp.astype(x, g.dtype)

            plan, proj = self._plan(tuple(g.shape)), read(state["projector"][i])
            low = g
            if plan is not None:
                g2 = plan.to(xp, g)
                proj = self._refreshed(xp, c.refresh, g2, proj, plan)
                low = proj.T @ g2 if plan.left else g2 @ proj
            d, m, v = kernel(xp, c.adam, None, low, read(state["exp_avg"][i]),
                             read(state["exp_avg_sq"][i]))
            if plan is not None:  # (scale is the projected update's alone, as optax's)
                d = c.scale * plan.from_(xp, proj @ d if plan.left else d @ proj.T)
            out.append(d)
            projectors.append(proj)
            ms.append(m)
            vs.append(v)
        return unflatten(treedef, out), {
            "projector": arrays(projectors, state["projector"]),
            "exp_avg": arrays(ms, state["exp_avg"]), "exp_avg_sq": arrays(vs, state["exp_avg_sq"])}

    def _refreshed(self, xp: Any, refresh: Any, g2: Any, old: Any, plan: _Matrix) -> Any:
        """The projector for this step: ``old``, or at a refresh the SVD's singular vectors."""
        r = old.shape[1]

        def svd() -> Any:
            a = xp.astype(g2, xp.float32) if self.svd_in_float32 else g2
            left, _, right = backend.decomposed(
                functools.partial(xp.linalg.svd, full_matrices=False), a)
            vectors = left[:, :r] if plan.left else right[:r, :].T
            return xp.astype(vectors, g2.dtype)

        if isinstance(refresh, bool):
            return svd() if refresh else old
        if backend.is_jax(g2):  # traced under jax.jit: one SVD only where the step refreshes
            import jax

            return jax.lax.cond(refresh, svd, lambda: old)
        return xp.where(refresh, svd(), old)


@dataclass(frozen=True)
class galore(Rule):
    r"""GaLore (Zhao et al., 2024) as ``optax.contrib.galore`` with its default base optimizer
    (``scale_by_adam``): ``p <- p - lr*(d + weight_decay*p)`` with ``d`` Adam's direction
    computed on a rank-``rank`` projection of each matrix's gradient and projected back
    (:class:`scale_by_galore`), the projection refreshed from an SVD every ``update_proj_gap``
    steps (from the first). For an ``m x n`` matrix leaf with ``m >= n`` (a wide one projects
    its columns: ``G P``, ``A P^T``), ``r = min(rank, m, n)``, ``lambda = weight_decay``:

    $$
    \begin{aligned}
    P_t &= \begin{cases} U_{:, :r} \text{ of } G_t = U \Sigma V^\top
    & t \equiv 1 \pmod{\text{update_proj_gap}} \\
    P_{t-1} & \text{otherwise} \end{cases}, \qquad R_t = P_t^\top G_t \\
    M_t &= \beta_1 M_{t-1} + (1 - \beta_1)\, R_t, \qquad
    V_t = \beta_2 V_{t-1} + (1 - \beta_2)\, R_t^2 \\
    A_t &= \frac{M_t / (1 - \beta_1^t)}{\sqrt{V_t / (1 - \beta_2^t) + \epsilon_{root}}
    + \epsilon} \\
    W_t &= W_{t-1} - \mathrm{lr} \left(\text{scale}\cdot P_t A_t + \lambda\, W_{t-1}\right)
    \end{aligned}
    $$

    A leaf that is not projected takes Adam's direction of its own gradient.

    Options, with optax's names and defaults: ``rank``, ``update_proj_gap``, ``scale``,
    ``weight_decay`` and ``mask`` (decoupled, in the full space; a tree of bools, not globs, or
    a function of the params), ``weight_dimension_numbers``
    (None: 2-D leaves; one :class:`GaLoreDimensionNumbers` for every leaf of 2 axes or more;
    optax's per-leaf trees and functions are not offered: partition the params with
    :func:`uniopt.partition` instead); Adam's ``b1``, ``b2``, ``eps``, ``eps_root`` (optax's
    ``base_optimizer``, any gradient transformation there, is Adam here);
    ``svd_in_float32``: optax computes the SVD in float32 whatever the gradient's dtype (so a
    float64 projector is float32-accurate); False: in the gradient's dtype. optax requires a
    learning rate; ``lr`` here defaults to 1e-3.

    On JAX arrays the SVD is JAX's, as optax's: the same projector to rounding. On NumPy and
    torch, LAPACK's and torch's SVDs may choose other signs for the singular vectors and, in
    float32, other last bits; the step ``P (P^T G)`` does not depend on the signs until the
    projector is refreshed with Adam's moments kept in the old basis.
    """

    lr: Any = hyper(1e-3, NONNEG)
    rank: int = 128
    update_proj_gap: int = 200
    scale: Any = hyper(1.0, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    mask: Any = None
    weight_dimension_numbers: GaLoreDimensionNumbers | None = None
    svd_in_float32: bool = True

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="adam",
        paper="Zhao et al. (2024)",
        references=("optax.contrib.galore",),
        # the SVD in float64, so the array libraries agree beyond float32's digits
        example={"lr": 0.1, "b2": 0.9, "svd_in_float32": False},
        budget=1000,
        complex=False,
    )

    def check(self) -> None:
        _check_counts(self)
        self._direction()
        object.__setattr__(self, "mask", frozen_mask(self.name, "mask", self.mask))

    def _direction(self) -> scale_by_galore:
        return scale_by_galore(rank=self.rank, update_proj_gap=self.update_proj_gap,
                               scale=self.scale, b1=self.b1, b2=self.b2, eps=self.eps,
                               eps_root=self.eps_root,
                               weight_dimension_numbers=self.weight_dimension_numbers,
                               svd_in_float32=self.svd_in_float32)

    def parts(self) -> tuple[Transform, ...]:
        decay = ((masked_by(weight_decay(wd=self.weight_decay), self.mask),)
                 if self.on("weight_decay") else ())
        return (self._direction(), *decay, scale_by_lr(lr=self.lr))


def _zeros(xp: Any, shape: tuple[int, ...], like: Any) -> Any:
    """Zeros of ``shape`` beside leaf ``like`` (replicated where it is laid out over a mesh)."""
    return backend.made_beside(lambda dev: xp.zeros(shape, dtype=like.dtype, device=dev), like)
