"""Rules that treat a parameter as a matrix: Muon (Jordan et al., 2024)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import COMBINATORS, Elementwise, Info, Kernel, PerLeaf, Rule, Transform, chain
from ..hyper import NONNEG, UNIT_OPEN, Interval, check_integer, check_real, hyper
from ..moments import addmm, bias_correction, fma, frobenius, lerp
from ..transforms.decay import weight_decay
from ..transforms.scale import scale_by_lr
from .adam import scale_by_adam

# Keller Jordan's quintic: the slope at 0 is as large as keeps the iteration's fixed band
# around 1 (singular values end in about [0.7, 1.2], not exactly 1)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = (None, "original", "original_in_out", "match_rms_adamw")
MOMENTUM_FORMS = ("ema", "ema_bias_corrected", "sum")
EPS_FORMS = ("clamp", "add")


class Ema(NamedTuple):
    momentum: Any
    one_minus_momentum: Any


def _ema_heavy_ball(xp, c, p, u, b):
    b = lerp(b, u, c.one_minus_momentum)
    return b, b


def _ema_nesterov(xp, c, p, u, b):
    b = lerp(b, u, c.one_minus_momentum)
    return lerp(u, b, c.momentum), b


@dataclass(frozen=True)
class ema_momentum(Elementwise):
    """Momentum as a moving average (torch's Muon): ``b <- lerp(b, u, 1 - momentum)``,
    ``u <- b``; with ``nesterov``, ``u <- lerp(u, b, momentum)``."""

    momentum: Any = hyper(0.95, NONNEG)
    nesterov: bool = True
    slots: ClassVar[tuple[str, ...]] = ("momentum_buffer",)

    def coeffs(self, step: Any) -> Ema:
        return Ema(momentum=self.momentum, one_minus_momentum=self.one_minus("momentum"))

    @property
    def kernel(self) -> Kernel:  # type: ignore[override]
        return _ema_nesterov if self.nesterov else _ema_heavy_ball


class EmaCorrected(NamedTuple):
    momentum: Any
    one_minus_momentum: Any
    bc: Any  # 1 - momentum^t
    bc_next: Any  # 1 - momentum^(t+1)


def _ema_corrected_heavy_ball(xp, c, p, u, b):
    b = c.one_minus_momentum * u + c.momentum * b  # optax's update_moment, as it writes it
    return b / c.bc, b


def _ema_corrected_nesterov(xp, c, p, u, b):
    b = c.one_minus_momentum * u + c.momentum * b
    return c.momentum * (b / c.bc_next) + c.one_minus_momentum * (u / c.bc), b


@dataclass(frozen=True)
class ema_momentum_bias_corrected(Elementwise):
    """optax's Muon momentum: ``b <- (1-momentum)*u + momentum*b``, ``u <- b/(1-momentum^t)``;
    with ``nesterov`` (optax's NAdam form) ``u <- momentum*b/(1-momentum^(t+1)) +
    (1-momentum)*u/(1-momentum^t)``."""

    momentum: Any = hyper(0.95, NONNEG)
    nesterov: bool = True
    slots: ClassVar[tuple[str, ...]] = ("momentum_buffer",)

    def coeffs(self, step: Any) -> EmaCorrected:
        c = self.one_minus("momentum")
        return EmaCorrected(momentum=self.momentum, one_minus_momentum=c,
                            bc=bias_correction(self.momentum, c, step),
                            bc_next=bias_correction(self.momentum, c, step + 1))

    @property
    def kernel(self) -> Kernel:  # type: ignore[override]
        return _ema_corrected_nesterov if self.nesterov else _ema_corrected_heavy_ball


class SumMomentum(NamedTuple):
    momentum: Any
    momentum_minus_one: Any


def _sum_heavy_ball(xp, c, p, u, b):
    b = b + (u + b * c.momentum_minus_one)  # keras's assign_add(m, g + m*(momentum - 1))
    return b, b


def _sum_nesterov(xp, c, p, u, b):
    b = b + (u + b * c.momentum_minus_one)
    return u + c.momentum * b, b


@dataclass(frozen=True)
class sum_momentum(Elementwise):
    """keras's Muon momentum, a sum rather than an average: ``b <- momentum*b + u``,
    ``u <- b``; with ``nesterov``, ``u <- u + momentum*b``. It is :class:`ema_momentum`'s
    buffer and update divided by ``1 - momentum``."""

    momentum: Any = hyper(0.95, NONNEG)
    nesterov: bool = True
    slots: ClassVar[tuple[str, ...]] = ("momentum_buffer",)

    def coeffs(self, step: Any) -> SumMomentum:
        return SumMomentum(momentum=self.momentum, momentum_minus_one=-self.one_minus("momentum"))

    @property
    def kernel(self) -> Kernel:  # type: ignore[override]
        return _sum_nesterov if self.nesterov else _sum_heavy_ball


class NewtonSchulz(NamedTuple):
    a: Any
    b: Any
    c: Any
    eps: Any


def _check_ns_steps(t: Any) -> None:
    # torch: "less than 100 for computational efficiency"
    object.__setattr__(t, "ns_steps", check_integer(t.name, "ns_steps", t.ns_steps, 0, 100))


def _check_adjust_lr_fn(owner: str, fn: Any) -> None:
    if fn not in ADJUST_LR_FNS:
        raise ValueError(f"{owner}: adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {fn!r}")


def _check_momentum_form(owner: str, form: Any) -> None:
    if form not in MOMENTUM_FORMS:
        raise ValueError(f"{owner}: momentum_form must be one of {MOMENTUM_FORMS}, got {form!r}")


def _check_eps_form(owner: str, form: Any) -> None:
    if form not in EPS_FORMS:
        raise ValueError(f"{owner}: eps_form must be one of {EPS_FORMS}, got {form!r}")


def _check_ns_dtype(owner: str, dtype: Any) -> None:
    if dtype not in (None, "bfloat16", "float16", "float32", "float64"):
        raise ValueError(f"{owner}: ns_dtype must be None (the update's own dtype) or a float "
                         f"dtype's name, got {dtype!r}")


def _muon_or_adam(path: str, leaf: Any) -> str:
    return "muon" if leaf.ndim == 2 else "adam"


def _muon_or_adam_nd(path: str, leaf: Any) -> str:
    return "muon" if leaf.ndim >= 2 else "adam"


def _matrix_error(shape: tuple[int, ...], axes: Any = None) -> str | None:
    if axes is None:
        return None if len(shape) == 2 else (
            "it is not a matrix (Muon orthogonalises 2-D updates; update other parameters with "
            "another rule, or name their matrix_axes)"
        )
    if len(shape) < 2:
        return f"it has {len(shape)} axes, fewer than the 2 of a matrix"
    red, out = _axes(axes, len(shape))
    if set(red) & set(out):
        return f"its matrix_axes {axes} name an axis twice"
    return None


def _axes(axes: Any, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """optax's ``MuonDimensionNumbers`` normalised: (reduction axes, output axes), each a
    tuple of axes counted from 0 (negative ones from the end)."""
    return tuple(tuple(a % ndim for a in ((x,) if isinstance(x, int) else x))  # type: ignore[return-value]
                 for x in axes)


def _matrix_view(shape: tuple[int, ...], axes: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The permutation that puts a leaf's batch axes, then its reduction axes, then its output
    axes in order, and the (batch, rows, cols) shape it is then reshaped to."""
    red, out = _axes(axes, len(shape))
    batch = tuple(sorted(set(range(len(shape))) - set(red) - set(out)))
    size = lambda ax: math.prod(shape[a] for a in ax)  # noqa: E731
    return (*batch, *red, *out), (size(batch), size(red), size(out))


def _check_matrix_axes(owner: str, axes: Any) -> None:
    def ok(x: Any) -> bool:
        xs = (x,) if isinstance(x, int) else x
        return (isinstance(xs, tuple) and len(xs) > 0
                and all(isinstance(a, int) and not isinstance(a, bool) for a in xs))

    if axes is not None and not (isinstance(axes, tuple) and len(axes) == 2
                                 and all(ok(x) for x in axes)):
        raise ValueError(f"{owner}: matrix_axes must be None (a 2-D leaf's rows and columns) or "
                         f"(reduction axes, output axes), each an int or a tuple of ints, got "
                         f"{axes!r}")


@dataclass(frozen=True)
class orthogonalize(PerLeaf):
    """``u <- NS_k(u)``: ``ns_steps`` Newton-Schulz steps towards the orthogonal factor of
    ``u = U S V^T`` (``U V^T``, singular values ending near 1). ``X <- u / max(|u|_F, eps)``
    (``eps_form="add"``: ``u / (|u|_F + eps)``, optax's and keras's), transposed to be wide;
    each step ``A = X X^T``, ``X <- a X + (b A + c A A) X``.

    Computed in the update's own dtype, or in ``ns_dtype`` (``"bfloat16"``: torch's Muon, whose
    matmuls then run at bfloat16 speed; torch and JAX arrays, NumPy's refused at set-up), each
    step's two matrix products with their sums rounded once on torch
    (:func:`uniopt.moments.addmm`), as torch's. Leaves of one shape are orthogonalised
    together, one batched matmul chain. ``adaptive`` (optax's):
    the result scaled by the dual norm of the input, ``<u, O> O`` (``<.,.>`` the sum of the
    elementwise products over the whole leaf, Bernstein and Newhouse, 2024). ``matrix_axes``
    (optax's ``MuonDimensionNumbers``): ``(reduction axes, output axes)`` of a leaf of any
    rank, each an int or a tuple; the leaf is seen as ``(batch, rows, cols)``, its other axes
    the batch, each matrix orthogonalised on its own.

    On DTensor shards (FSDP2, tensor parallel) each matrix is all-gathered whole on every rank,
    which iterates on it, and keeps its own shard of the result (:mod:`uniopt.interop.dtensor`):
    the numbers of an unsharded run."""

    real_only = True

    ns_coefficients: tuple[Any, Any, Any] = hyper(NS_COEFFICIENTS, Interval(None))
    eps: Any = hyper(1e-7, NONNEG)
    ns_steps: int = 5
    ns_dtype: str | None = None
    eps_form: str = "clamp"
    adaptive: bool = False
    matrix_axes: tuple[Any, Any] | None = None
    batched: ClassVar[bool] = True

    def check(self) -> None:
        _check_ns_steps(self)
        _check_ns_dtype(self.name, self.ns_dtype)
        _check_eps_form(self.name, self.eps_form)
        _check_matrix_axes(self.name, self.matrix_axes)

    @property
    def casts_to(self) -> tuple[str, ...]:  # type: ignore[override]
        return () if self.ns_dtype is None else (self.ns_dtype,)

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        return _matrix_error(shape, self.matrix_axes)

    def coeffs(self, step: Any) -> NewtonSchulz:
        a, b, c = self.ns_coefficients
        return NewtonSchulz(a=a, b=b, c=c, eps=self.eps)

    def apply(self, xp, c, p, u):
        if self.matrix_axes is None:
            x = self._orthogonalize(xp, c, u)
        else:
            # leaves stacked along axis 0; each leaf's matrices are (batch, rows, cols), all
            # of the stack's in one (stack*batch, rows, cols) chain
            perm, flat = _matrix_view(tuple(u.shape[1:]), self.matrix_axes)
            order = (0, *[a + 1 for a in perm])
            moved = xp.permute_dims(u, order)
            x = self._orthogonalize(xp, c, xp.reshape(moved, (-1, *flat[1:])))
            back = sorted(range(len(order)), key=lambda i: order[i])
            x = xp.permute_dims(xp.reshape(x, moved.shape), tuple(back))
        if self.adaptive:  # optax's dual-norm scaling, <u, O> O, over each whole leaf
            x = xp.sum(u * x, axis=tuple(range(1, u.ndim)), keepdims=True) * x
        return (x,)

    def _orthogonalize(self, xp: Any, c: Any, u: Any) -> Any:
        if u.ndim == 3 and u.shape[0] == 1:
            # a matrix alone: its own 2-D chain, torch's addmm and mm, whose bfloat16 sums
            # round apart from baddbmm's and bmm's (one bit in about 200 4x4 steps)
            return xp.expand_dims(self._orthogonalize(xp, c, u[0, ...]), axis=0)
        wide = u.shape[-2] <= u.shape[-1]
        x = u if wide else xp.matrix_transpose(u)
        if self.ns_dtype is not None:
            dtype = getattr(xp, self.ns_dtype, None)
            if dtype is None:
                raise TypeError(f"{self.name}: ns_dtype={self.ns_dtype!r}, which "
                                f"{xp.__name__} arrays do not have")
            x = xp.astype(x, dtype)
        if self.eps_form == "add":
            x = x / (frobenius(xp, x) + c.eps)
        else:
            x = x / xp.clip(frobenius(xp, x), min=c.eps)
        for _ in range(self.ns_steps):
            gram = x @ xp.matrix_transpose(x)
            x = addmm(xp, c.a, x, 1.0, addmm(xp, c.b, gram, c.c, gram, gram), x)
        x = x if wide else xp.matrix_transpose(x)
        return x if x.dtype == u.dtype else xp.astype(x, u.dtype)


class MatrixStep(NamedTuple):
    lr: Any  # adjusted to the matrix's shape (leaf_coeffs)
    lr_wd: Any  # decoupled decay, scaled by the unadjusted lr


@dataclass(frozen=True)
class scale_by_shape_lr(PerLeaf):
    """``u <- lr * s(A, B) * u + lr*weight_decay*p`` for an ``A x B`` matrix, ``s`` torch's
    ``adjust_lr_fn``: ``"original"`` (or None) ``sqrt(max(1, A/B))`` (torch's ``(out, in)``
    weights: ``sqrt(max(1, fan_out/fan_in))``), ``"original_in_out"`` ``sqrt(max(1, B/A))``
    (the same for optax's ``(in, out)`` kernels), ``"match_rms_adamw"`` ``0.2 sqrt(max(A, B))``
    (the update's RMS then matches AdamW's; keras's ``rms_rate=0.2``).

    Last in a rule it writes ``p (1 - lr*weight_decay) + (-lr s) u`` with one rounding for
    the add, torch's ``mul_`` then ``add_(u, alpha=-lr)``: ``uniopt.torch.Muon`` is then
    torch's bits where each matrix has a shape of its own; matrices of one shape share a
    batched Newton-Schulz chain (baddbmm), whose bfloat16 products can round apart from
    torch's per-matrix addmm."""

    lr: Any = hyper(1e-3, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    adjust_lr_fn: str | None = None
    matrix_axes: tuple[Any, Any] | None = None
    uses_params: ClassVar[bool] = True
    makes_step: ClassVar[bool] = True
    # elementwise with a coefficient per shape: stacking its leaves would only copy them
    batched: ClassVar[bool] = False

    def check(self) -> None:
        _check_adjust_lr_fn(self.name, self.adjust_lr_fn)
        _check_matrix_axes(self.name, self.matrix_axes)

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        return _matrix_error(shape, self.matrix_axes)

    def coeffs(self, step: Any) -> MatrixStep:
        return MatrixStep(lr=self.lr, lr_wd=self.lr * self.weight_decay)

    def leaf_coeffs(self, c: MatrixStep, shape: tuple[int, ...]) -> MatrixStep:
        rows, cols = shape if self.matrix_axes is None else _matrix_view(
            shape, self.matrix_axes)[1][1:]
        if rows * cols == 0:  # an empty matrix: nothing to scale (and no ratio of sides)
            ratio = 1.0
        elif self.adjust_lr_fn == "match_rms_adamw":
            ratio = 0.2 * math.sqrt(max(rows, cols))
        elif self.adjust_lr_fn == "original_in_out":
            ratio = math.sqrt(max(1.0, cols / rows))
        else:
            ratio = math.sqrt(max(1.0, rows / cols))
        return c._replace(lr=c.lr * ratio)

    @staticmethod
    def apply(xp, c, p, u):
        return (c.lr * u + c.lr_wd * p,)

    @staticmethod
    def finish(xp, c, p, u):  # last: torch's p.mul_(1 - lr*wd), then p.add_(u, alpha=-lr)
        return (fma(-c.lr, u, p * (1 - c.lr_wd)),)


@dataclass(frozen=True)
class muon(Rule):
    r"""Muon (Jordan et al., 2024) as torch 2.13's ``Muon`` writes it, for 2-D parameters.

    ``b <- lerp(b, g, 1 - momentum)``; ``O = NS(lerp(g, b, momentum))`` (``nesterov``; else
    ``NS(b)``), :class:`orthogonalize`; ``p <- p - lr*s(A, B)*O - lr*weight_decay*p`` with
    ``s`` from ``adjust_lr_fn`` (:class:`scale_by_shape_lr`). For an ``A x B`` matrix, with
    ``mu = momentum``, ``lambda = weight_decay``, ``(a, b, c) = ns_coefficients`` and
    ``K = ns_steps``:

    $$
    \begin{aligned}
    B_t &= \mu\, B_{t-1} + (1 - \mu)\, G_t, \qquad
    M_t = \begin{cases} (1 - \mu)\, G_t + \mu\, B_t & \text{Nesterov} \\
    B_t & \text{otherwise} \end{cases} \\
    X_0 &= \frac{M_t}{\max(\lVert M_t \rVert_F,\ \epsilon)}
    \quad \text{(transposed if } A > B\text{)} \\
    X_{k+1} &= a X_k + \left(b\, X_k X_k^\top + c\, (X_k X_k^\top)^2\right) X_k \\
    O_t &= X_K, \qquad s = \sqrt{\max(1, A/B)} \\
    P_t &= (1 - \mathrm{lr}\,\lambda)\, P_{t-1} - \mathrm{lr}\, s\, O_t
    \end{aligned}
    $$

    ``NS`` is the Newton-Schulz iteration on the second line: ``O`` is near ``U V^T`` for
    ``M = U S V^T``. A leaf that is not a matrix is
    an error at set-up, as in torch: give biases and embeddings to another rule.
    ``ns_dtype="bfloat16"`` runs the iteration as torch's Muon does (``uniopt.torch.Muon``
    does); the default runs it in the update's dtype, more exact and available on NumPy.

    Options (the ``convention`` sets them, and the defaults, for the fields not given):

    - ``momentum_form="ema"``: torch's moving average above (:class:`ema_momentum`).
    - ``momentum_form="ema_bias_corrected"``: optax's, ``b/(1-momentum^t)``; Nesterov
      ``momentum*b/(1-momentum^(t+1)) + (1-momentum)*g/(1-momentum^t)``.
    - ``momentum_form="sum"``: keras's, ``b <- momentum*b + g``; Nesterov ``g + momentum*b``.
    - ``eps_form="clamp"``: NS starts from ``X/max(|X|_F, eps)`` (torch); ``"add"``:
      ``X/(|X|_F + eps)`` (optax, keras).
    - ``adjust_lr_fn``: ``"original"`` (or None) ``sqrt(max(1, A/B))`` (torch);
      ``"original_in_out"`` ``sqrt(max(1, B/A))`` (optax's width scaling of ``(in, out)`` kernels);
      ``"match_rms_adamw"`` ``0.2*sqrt(max(A, B))`` (torch's option; keras's ``rms_rate=0.2``).
    - ``adaptive``: ``O`` scaled by ``<m, O>`` (the sum of the products of the
      orthogonalised momentum ``m`` and ``O``), optax's option (:class:`orthogonalize`).
    - ``others="error"``: a leaf that is not a matrix is an error (torch); ``"adamw"``:
      optax's, each such leaf stepped by AdamW instead, ``p <- p - adam_lr*(A + adam_wd*p)``,
      ``A`` Adam's direction with ``adam_betas``, ``eps``, ``adam_eps_root`` and (with
      ``nesterov``) optax's NAdam-style ``m_hat``; ``adam_lr`` None is ``lr``. The rule is
      then a :func:`uniopt.partition` of members ``"muon"`` and ``"adam"``.
    - ``matrix_axes``: optax's ``MuonDimensionNumbers(reduction_axis, output_axis)`` for every
      leaf Muon steps (None: a 2-D leaf's rows and columns); the other axes are a batch of
      matrices (:class:`orthogonalize`), ``A`` and ``B`` the products of the reduction and
      output axes' sizes. With ``others="adamw"``, every leaf of two or more axes goes to Muon
      then (optax takes a tree of them; give leaves different ones with
      :func:`uniopt.partition`).
    - ``ns_coefficients``, ``ns_steps``, ``eps``: the iteration's (optax ``ns_coeffs``, keras
      ``muon_a/b/c``); the decay is ``lr*weight_decay*p`` in all three, unadjusted by ``s``.

    The forms differ only in how far ``eps`` reaches (NS is blind to the scale of its input,
    and ``"sum"``'s buffer is ``"ema"``'s over ``1 - momentum``), except optax's Nesterov
    bias correction, which weighs ``g`` against ``b`` differently in the first steps.

    Conventions: ``"torch"`` (lr 1e-3, weight_decay 0.1, eps 1e-7 clamped); ``"optax"``,
    ``optax.contrib.muon`` on 2-D leaves (it gives the others to AdamW): eps 1e-8 added,
    weight_decay 0, bias-corrected momentum, ``original_in_out``; optax requires a learning
    rate, ours keeps 1e-3; it sets ``others="adamw"`` (below), as optax's ``muon`` does; its
    ``preconditioning`` other than ``"frobenius"``, per-step ``"dion"`` coefficients,
    ``weight_decay_mask`` and ``mu_dtype`` are not offered (a tree of
    ``muon_weight_dimension_numbers`` is one ``matrix_axes`` per :func:`uniopt.partition`
    member): ``consistent_rms=0.2`` is ``match_rms_adamw``;
    ``"keras"``, ``keras.optimizers.Muon`` on the matrices it gives Muon (it gives other
    variables, embeddings and ``exclude_layers`` to its AdamW, at ``lr*adam_lr_ratio`` but
    decayed by ``lr*adam_weight_decay``: port those as
    ``uo.adamw(convention="keras", lr=lr*adam_lr_ratio,
    weight_decay=adam_weight_decay/adam_lr_ratio)`` in a :func:`uniopt.partition`): lr
    1e-3, weight_decay 0.004, eps 1e-7 added (fixed in keras), sum momentum,
    ``match_rms_adamw`` (keras's ``rms_rate=r`` is ``lr*r/0.2`` with ``weight_decay*0.2/r``;
    ``rms_rate=None``, no scaling, is not offered).

    >>> import numpy as np, uniopt as uo
    >>> p = [np.eye(2), 2 * np.eye(2)]  # one shape: orthogonalised in one batched call
    >>> state = uo.setup(uo.muon(lr=0.1, weight_decay=0.0), p)
    >>> state, p = uo.update(state, p, [np.eye(2), np.eye(2)])
    >>> np.round(np.diag(p[1]), 4)  # 2 - 0.1*1.1081: NS leaves singular values near 1
    array([1.8892, 1.8892])
    """

    lr: Any = hyper(1e-3, NONNEG)
    weight_decay: Any = hyper(0.1, NONNEG)
    momentum: Any = hyper(0.95, NONNEG)
    nesterov: bool = True
    ns_coefficients: tuple[Any, Any, Any] = hyper(NS_COEFFICIENTS, Interval(None))
    eps: Any = hyper(1e-7, NONNEG)
    ns_steps: int = 5
    adjust_lr_fn: str | None = None
    ns_dtype: str | None = None
    momentum_form: str = "ema"
    eps_form: str = "clamp"
    adaptive: bool = False
    others: str = "error"
    adam_betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    adam_eps_root: Any = hyper(0.0, NONNEG)
    adam_weight_decay: Any = hyper(0.0, NONNEG)
    adam_lr: Any = None
    matrix_axes: tuple[Any, Any] | None = None
    convention: str = "torch"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {},
        "optax": {"weight_decay": 0.0, "eps": 1e-8, "momentum_form": "ema_bias_corrected",
                  "eps_form": "add", "adjust_lr_fn": "original_in_out", "others": "adamw"},
        "keras": {"weight_decay": 0.004, "momentum_form": "sum", "eps_form": "add",
                  "adjust_lr_fn": "match_rms_adamw"},
    }

    info: ClassVar[Info] = Info(
        family="matrix",
        paper="Jordan et al. (2024)",
        references=("torch.optim.Muon", "optax.contrib.muon", "keras.optimizers.Muon"),
        example={"lr": 0.03},
        budget=500,
        complex=False,
    )

    def parts(self) -> tuple[Transform, ...]:
        if self.others == "adamw":
            lr = self.lr if self.adam_lr is None else self.adam_lr
            b1, b2 = self.adam_betas
            adam = chain(scale_by_adam(b1=b1, b2=b2, eps=self.eps, eps_root=self.adam_eps_root,
                                       nesterov=self.nesterov),
                         weight_decay(wd=self.adam_weight_decay), scale_by_lr(lr=lr))
            members = {"muon": dataclasses.replace(self, others="error"), "adam": adam}
            labels = _muon_or_adam if self.matrix_axes is None else _muon_or_adam_nd
            return (COMBINATORS["partition"](members, labels),)
        momentum: Transform
        if self.momentum_form == "ema_bias_corrected":
            momentum = ema_momentum_bias_corrected(momentum=self.momentum, nesterov=self.nesterov)
        elif self.momentum_form == "sum":
            momentum = sum_momentum(momentum=self.momentum, nesterov=self.nesterov)
        else:
            momentum = ema_momentum(momentum=self.momentum, nesterov=self.nesterov)
        return (
            momentum,
            orthogonalize(ns_coefficients=self.ns_coefficients, eps=self.eps,
                          ns_steps=self.ns_steps, ns_dtype=self.ns_dtype,
                          eps_form=self.eps_form, adaptive=self.adaptive,
                          matrix_axes=self.matrix_axes),
            scale_by_shape_lr(lr=self.lr, weight_decay=self.weight_decay,
                              adjust_lr_fn=self.adjust_lr_fn, matrix_axes=self.matrix_axes),
        )

    def check(self) -> None:
        _check_ns_steps(self)
        _check_adjust_lr_fn(self.name, self.adjust_lr_fn)
        _check_ns_dtype(self.name, self.ns_dtype)
        _check_momentum_form(self.name, self.momentum_form)
        _check_eps_form(self.name, self.eps_form)
        _check_matrix_axes(self.name, self.matrix_axes)
        if self.others not in ("error", "adamw"):
            raise ValueError(f"{self.name}: others must be 'error' or 'adamw', got "
                             f"{self.others!r}")
        object.__setattr__(self, "adam_lr", check_real(self.name, "adam_lr", self.adam_lr, NONNEG,
                                                       none="lr", schedulable=True))
