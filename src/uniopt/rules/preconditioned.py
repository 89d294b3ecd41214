"""Rules that precondition a tensor along each of its axes: SOAP (Vyas et al., 2024) and
Shampoo (Gupta et al., 2018).

Each axis of a leaf (of size at most ``max_precond_dim``) keeps a ``d x d`` statistic, the
moving average of the gradient's products over the other axes (Shampoo's factors), packed one
after another in one flat slot; their eigenbases likewise. A leaf whose axes all keep their
basis keeps neither slot.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from .. import backend
from ..base import Elementwise, Info, PerLeaf, Rule, Transform
from ..hyper import NONNEG, UNIT_OPEN, check_integer, check_real, hyper
from ..moments import bias_correction, fma, lerp, select
from ..transforms.decay import decoupled_weight_decay
from ..transforms.scale import scale_by_lr


def merged_shape(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """The authors' ``merge_dims``: neighbouring axes joined while their product stays at
    most ``max_dim``; an axis larger than it stays alone. ``(2, 3, 4)`` with 6 is ``(6, 4)``."""
    out: list[int] = []
    cur = 1
    for d in shape:
        if cur * d <= max_dim:
            cur *= d
        elif cur > 1:
            out.append(cur)
            cur = d
        else:
            out.append(d)
    if cur > 1 or not out:
        out.append(cur)
    return tuple(out)


def _flag(c: Any) -> Any:
    # a host bool, or (under jax.jit) a traced number the engine cast to the leaf's dtype
    return c if isinstance(c, bool) else c != 0


def _pick(xp: Any, cond: Any, a: Callable[[], tuple[Any, ...]],
          b: Callable[[], tuple[Any, ...]]) -> tuple[Any, ...]:
    """``a()`` where ``cond`` else ``b()``: on the host one branch runs; traced, both run and
    ``xp.where`` picks (an eigendecomposition that is not needed is then computed anyway)."""
    if isinstance(cond, bool):
        return a() if cond else b()
    return tuple(x if x is y else xp.where(cond, x, y) for x, y in zip(a(), b(), strict=True))


def _project(xp: Any, x: Any, qs: list[Any], back: bool = False) -> Any:
    """``x`` with each axis turned into its eigenbasis (``back``: out of it), axis after axis as
    ``tensordot`` moves it last; an axis without a basis is only moved."""
    for q in qs:
        if q is None:
            x = xp.permute_dims(x, (*range(1, x.ndim), 0))
        else:
            x = xp.tensordot(x, q, axes=([0], [1 if back else 0]))
    return x


class SoapCoeffs(NamedTuple):
    one_minus_beta1: Any
    one_minus_beta2: Any
    one_minus_shampoo_beta: Any
    eps: Any
    scale: Any  # sqrt(1 - beta2^n)/(1 - beta1^n) after the n = step moment updates
    first: Any  # the first step: statistics and eigenbases only, no update
    refresh: Any  # this step re-estimates the eigenbases (one power iteration and a QR)


@dataclass(frozen=True)
class scale_by_soap(PerLeaf):
    """Adam in the eigenbasis of Shampoo's preconditioner (SOAP), per leaf.

    For each axis ``i`` kept (size ``<= max_precond_dim``; a vector's only where
    ``precondition_1d``; with ``merge_dims`` the axes of :func:`merged_shape` first):
    ``L_i <- lerp(L_i, G_(i) G_(i)^T, 1 - shampoo_beta)`` (the products over the other axes) and
    its eigenbasis ``Q_i``. ``R(x)`` turns each axis of ``x`` by ``Q_i^T``, ``R^-1`` back.
    ``m <- lerp(m, g, 1 - beta1)`` (in the leaf's basis), ``v <- lerp(v, R(g)^2, 1 - beta2)``
    (in the eigenbasis), ``u <- s R^-1(R(m) / (sqrt(v) + eps))``, ``s = sqrt(1 - beta2^n) /
    (1 - beta1^n)`` (``correct_bias``; else 1) for the ``n`` moment updates made;
    ``normalize_grads``: ``u / (rms(u) + eps)`` before ``s``.

    The first step only gathers ``L_i`` and takes ``Q_i`` from its eigendecomposition (``eigh``,
    eigenvalues in descending order), and makes no update; every ``precondition_frequency``
    steps after it, after this step's ``L_i``, one power iteration ``Q_i <- QR(L_i Q_i)`` with
    ``Q_i``'s columns and ``v``'s entries along axis ``i`` sorted by the estimated eigenvalues
    ``diag(Q_i^T L_i Q_i)``, descending. ``qr_dtype="float32"`` takes that QR in float32 (then
    back), as ``pytorch_optimizer.SOAP`` and the authors' code do; None: in the leaf's dtype.
    """

    real_only = True

    b1: Any = hyper(0.95, UNIT_OPEN)
    b2: Any = hyper(0.95, UNIT_OPEN)
    shampoo_beta: Any = hyper(0.95, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    precondition_frequency: int = 10
    max_precond_dim: int = 10000
    merge_dims: bool = False
    precondition_1d: bool = False
    normalize_grads: bool = False
    correct_bias: bool = True
    qr_dtype: str | None = None
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq", "GG", "Q")
    linalg: ClassVar[tuple[str, ...]] = ("eigh", "qr")
    # as Shampoo's: its step takes the eigenvectors of GG, which 8 bits per block do not keep
    # (a least-squares run diverged, Q no longer orthogonal: |Q^T Q - I| 0.016)
    no_q8: ClassVar[str | None] = (
        "its GG and Q are matrices (the preconditioner's statistics and their eigenbases), and "
        "8 bits per block of 2048 entries round away the small eigenvalues and leave Q "
        "no longer orthogonal")

    def check(self) -> None:
        _check_soap(self)

    def _sides(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], list[int | None]]:
        """The shape the leaf is worked in, and each of its axes' size where it is
        preconditioned (None where it keeps its basis)."""
        work = merged_shape(shape, self.max_precond_dim) if self.merge_dims and len(shape) > 1 \
            else shape
        if len(work) == 1 and not self.precondition_1d:
            return work, [None]
        return work, [d if d <= self.max_precond_dim else None for d in work]

    def slot_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...] | None, ...]:
        n = sum(d * d for d in self._sides(shape)[1] if d is not None)
        packed = (n,) if n else None
        return (tuple(shape), tuple(shape), packed, packed)

    def coeffs(self, step: Any) -> SoapCoeffs:
        b1, b2, c1, c2 = self.b1, self.b2, self.one_minus("b1"), self.one_minus("b2")
        first = step == 0
        if not self.correct_bias:
            scale: Any = 1.0
        elif isinstance(step, int):  # torch's formula in double on the host
            scale = 0.0 if first else (math.sqrt(bias_correction(b2, c2, step - 1))
                                       / bias_correction(b1, c1, step - 1))
        else:  # traced: a harmless value at the first step, which makes no update
            n = step + first
            scale = bias_correction(b2, c2, n - 1) ** 0.5 / bias_correction(b1, c1, n - 1)
        return SoapCoeffs(
            one_minus_beta1=c1, one_minus_beta2=c2,
            one_minus_shampoo_beta=self.one_minus("shampoo_beta"), eps=self.eps, scale=scale,
            first=first, refresh=(step > 0) & (step % self.precondition_frequency == 0),
        )

    def apply(self, xp, c, p, u, exp_avg, exp_avg_sq, gg, q):
        work, sides = self._sides(tuple(u.shape))
        g = xp.reshape(u, work)
        qs, ggs = _unpack(xp, q, sides), _unpack(xp, gg, sides)
        first, refresh = _flag(c.first), _flag(c.refresh)

        def adam() -> tuple[Any, ...]:
            rot = _project(xp, g, qs)
            m = lerp(exp_avg, u, c.one_minus_beta1)
            v = lerp(xp.reshape(exp_avg_sq, work), rot * rot, c.one_minus_beta2)
            d = _project(xp, _project(xp, xp.reshape(m, work), qs) / (xp.sqrt(v) + c.eps), qs,
                         back=True)
            if self.normalize_grads:
                d = d / (xp.sqrt(xp.mean(d * d)) + c.eps)
            return c.scale * d, m, v

        def wait() -> tuple[Any, ...]:
            return xp.zeros_like(g), exp_avg, xp.reshape(exp_avg_sq, work)

        d, m, v = _pick(xp, first, wait, adam)
        ggs = [None if s is None else lerp(s, _outer(xp, g, i), c.one_minus_shampoo_beta)
               for i, s in enumerate(ggs)]
        if gg is None:  # no axis preconditioned: Adam
            return xp.reshape(d, u.shape), m, xp.reshape(v, u.shape), None, None

        def eigenbases() -> tuple[Any, ...]:
            return (v, *[None if s is None else _eigenbasis(xp, s) for s in ggs])

        def power_iteration() -> tuple[Any, ...]:
            return self._power_iteration(xp, ggs, qs, v)

        def kept() -> tuple[Any, ...]:
            return (v, *qs)

        v, *qs = _pick(xp, first, eigenbases, lambda: _pick(xp, refresh, power_iteration, kept))
        return (xp.reshape(d, u.shape), m, xp.reshape(v, u.shape), _pack(xp, ggs), _pack(xp, qs))

    def _power_iteration(self, xp: Any, ggs: list[Any], qs: list[Any],
                         v: Any) -> tuple[Any, ...]:
        out: list[Any] = []
        for i, (s, q) in enumerate(zip(ggs, qs, strict=True)):
            if s is None:
                out.append(None)
                continue
            sq = s @ q
            order = xp.argsort(xp.sum(q * sq, axis=0), descending=True)
            v = xp.take(v, order, axis=i)
            y = xp.take(sq, order, axis=1)
            if self.qr_dtype is not None and y.dtype != getattr(xp, self.qr_dtype):
                wide = xp.astype(y, getattr(xp, self.qr_dtype))
                out.append(xp.astype(backend.decomposed(xp.linalg.qr, wide)[0], y.dtype))
            else:
                out.append(backend.decomposed(xp.linalg.qr, y)[0])
        return (v, *out)


def _outer(xp: Any, g: Any, i: int) -> Any:
    """``G_(i) G_(i)^T``: the products of ``g`` with itself over every axis but ``i``."""
    others = [j for j in range(g.ndim) if j != i]
    return xp.tensordot(g, g, axes=(others, others))


def _eigenbasis(xp: Any, s: Any) -> Any:
    # the authors' tiny shift (it keeps an all-zero statistic's eigenvectors defined for
    # solvers that need it; it vanishes beside any other entry); columns by descending eigenvalue
    n = s.shape[0]
    shift = xp.eye(n, dtype=s.dtype, device=backend.device(s)) * 1e-30
    return xp.flip(backend.decomposed(xp.linalg.eigh, s + shift)[1], axis=1)


def _unpack(xp: Any, flat: Any, sides: list[int | None]) -> list[Any]:
    out: list[Any] = []
    at = 0
    for d in sides:
        if d is None or flat is None:
            out.append(None)
            continue
        out.append(xp.reshape(flat[at:at + d * d], (d, d)))
        at += d * d
    return out


def _pack(xp: Any, mats: list[Any]) -> Any:
    return xp.concat([xp.reshape(m, (-1,)) for m in mats if m is not None])


def _check_soap(t: Any) -> None:
    for name in ("precondition_frequency", "max_precond_dim"):
        object.__setattr__(t, name, check_integer(t.name, name, getattr(t, name), 1))
    if t.qr_dtype not in (None, "float32", "float64"):
        raise ValueError(f"{t.name}: qr_dtype must be None (the leaf's dtype), 'float32' or "
                         f"'float64', got {t.qr_dtype!r}")


class StepDecay(NamedTuple):
    lr: Any
    lr_wd: Any  # 0 at the first step, which makes no update
    keep: Any  # 1 - lr_wd


@dataclass(frozen=True)
class scale_by_lr_decay_after(Elementwise):
    """``p <- (p - lr*u) (1 - lr*weight_decay)``: the step, then decoupled decay of the stepped
    parameter (``pytorch_optimizer``'s SOAP order), as an update ``lr*u + lr*wd*(p - lr*u)``.
    ``skip_first``: no decay at the first step (a rule that makes no step then)."""

    lr: Any = hyper(3e-3, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    skip_first: bool = False
    uses_params: ClassVar[bool] = True
    makes_step: ClassVar[bool] = True

    @staticmethod
    def kernel(xp, c, p, u):
        return (c.lr * u + c.lr_wd * (p - c.lr * u),)

    @staticmethod
    def finish(xp, c, p, u):  # p.add_(u, alpha=-lr), then p.mul_(1 - lr*wd)
        return fma(-c.lr, u, p) * c.keep

    def coeffs(self, step: Any) -> StepDecay:
        lr_wd = self.lr * self.weight_decay
        if self.skip_first:
            lr_wd = lr_wd * (step != 0)
        return StepDecay(lr=self.lr, lr_wd=lr_wd, keep=1.0 - lr_wd)


@dataclass(frozen=True)
class soap(Rule):
    r"""SOAP (Vyas et al., 2024): Adam run in the eigenbasis of Shampoo's preconditioner.

    :class:`scale_by_soap` (every option below is its), then
    ``p <- (p - lr*u)(1 - lr*weight_decay)`` (:class:`scale_by_lr_decay_after`). The first step
    only gathers the statistics: the parameters change from the second. For a matrix leaf
    ``G = g_t`` at step ``t >= 2``, with ``Q_L``, ``Q_R`` the eigenbases held before the step,
    ``beta_s = shampoo_beta``, ``lambda = weight_decay`` and ``n = t - 1`` moment updates:

    $$
    \begin{aligned}
    M_t &= \beta_1 M_{t-1} + (1 - \beta_1)\, G, \qquad
    V_t = \beta_2 V_{t-1} + (1 - \beta_2) \left(Q_L^\top G\, Q_R\right)^2 \\
    D_t &= Q_L \left(\frac{Q_L^\top M_t\, Q_R}{\sqrt{V_t} + \epsilon}\right) Q_R^\top,
    \qquad s_t = \frac{\sqrt{1 - \beta_2^{\,n}}}{1 - \beta_1^{\,n}} \\
    p_t &= \left(p_{t-1} - \mathrm{lr}\, s_t\, D_t\right) (1 - \mathrm{lr}\,\lambda) \\
    L_t &= \beta_s L_{t-1} + (1 - \beta_s)\, G G^\top, \qquad
    R_t = \beta_s R_{t-1} + (1 - \beta_s)\, G^\top G
    \end{aligned}
    $$

    (squares and the division elementwise). Step 1 sets ``L_1 = (1 - beta_s) G G^T`` (and
    ``R_1``) and ``Q_L``, ``Q_R`` to their eigenvectors; every ``precondition_frequency`` steps
    after it, one power iteration ``Q <- QR(L Q)`` refreshes each basis (``V`` re-sorted with
    it). A tensor of more axes turns each kept axis by its ``Q_i``.

    - ``betas``: Adam's moments in the eigenbasis; ``shampoo_beta`` (None: ``betas[1]``) the
      statistics' average; ``eps`` Adam's, added to ``sqrt(v)``.
    - ``precondition_frequency``: steps between power-iteration refreshes of the eigenbases.
    - ``max_precond_dim``: axes longer than it keep their basis (plain Adam along them).
    - ``merge_dims``: join small neighbouring axes first (:func:`merged_shape`, the authors'
      rule); ``precondition_1d``: vectors get a ``d x d`` statistic too (else plain Adam).
    - ``normalize_grads``: divide the direction by its RMS (plus eps); ``correct_bias``:
      Adam's bias correction as one step-size factor.
    - ``qr_dtype``: the refresh's QR in float32 (``pytorch_optimizer`` and the authors do) or
      the leaf's dtype (None, the default here: exact where the leaf is float64).

    Defaults and arithmetic are ``pytorch_optimizer.SOAP``'s (4.1): lr 3e-3, betas (0.95,
    0.95), weight_decay 0.01, frequency 10. Differences: ``qr_dtype`` defaults to the leaf's
    dtype (``qr_dtype="float32"`` is theirs: then float64 results agree to 1e-7, float32's QR
    rounding, measured); ``merge_dims`` follows the authors (``pytorch_optimizer``'s
    ``merge_small_dims`` turns a tensor of at most ``max_precond_dim`` elements into shape
    ``[1]`` and fails to reshape it); its ``data_format="channels_last"`` is not offered.
    Eigenvectors are defined up to sign (which cancels) and, where eigenvalues repeat, up to a
    rotation of their space, which the solver picks (LAPACK and torch pick differently): a
    gradient of rank below an axis's size at the first step gives such repeats.

    >>> import numpy as np, uniopt as uo
    >>> p = {"w": np.ones((3, 2))}
    >>> state = uo.setup(uo.soap(lr=0.1, weight_decay=0.0), p)
    >>> state, p = uo.update(state, p, {"w": np.ones((3, 2))})  # statistics only
    >>> float(p["w"][0, 0])
    1.0
    """

    lr: Any = hyper(3e-3, NONNEG)
    betas: tuple[Any, Any] = hyper((0.95, 0.95), UNIT_OPEN)
    shampoo_beta: Any = None
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(1e-2, NONNEG)
    precondition_frequency: int = 10
    max_precond_dim: int = 10000
    merge_dims: bool = False
    precondition_1d: bool = False
    normalize_grads: bool = False
    correct_bias: bool = True
    qr_dtype: str | None = None

    info: ClassVar[Info] = Info(
        family="matrix",
        paper="Vyas et al. (2024)",
        references=("pytorch_optimizer.SOAP", "formula"),
        example={"lr": 0.05, "weight_decay": 0.0},
        complex=False,
        # across libraries the eigenbases come from different solvers (LAPACK's, torch's,
        # XLA's), equal up to rounding that the rotation into them carries into every step:
        # 9.5e-10 measured over 10 steps between NumPy and torch
        rtol=1e-8,
        free_slots=("Q",),  # eigenvectors: each solver picks its own signs
    )

    def check(self) -> None:
        _check_soap(self)
        object.__setattr__(self, "shampoo_beta", check_real(
            self.name, "shampoo_beta", self.shampoo_beta, UNIT_OPEN, none="betas[1]",
            schedulable=True))

    def parts(self) -> tuple[Transform, ...]:
        beta = self.betas[1] if self.shampoo_beta is None else self.shampoo_beta
        return (
            scale_by_soap(b1=self.betas[0], b2=self.betas[1], shampoo_beta=beta, eps=self.eps,
                          precondition_frequency=self.precondition_frequency,
                          max_precond_dim=self.max_precond_dim, merge_dims=self.merge_dims,
                          precondition_1d=self.precondition_1d,
                          normalize_grads=self.normalize_grads, correct_bias=self.correct_bias,
                          qr_dtype=self.qr_dtype),
            scale_by_lr_decay_after(lr=self.lr, weight_decay=self.weight_decay, skip_first=True),
        )


class ShampooCoeffs(NamedTuple):
    momentum: Any
    wd: Any  # the L2 term added to the momentum-mixed gradient
    matrix_eps: Any
    first: Any  # the first step: the buffer starts at the gradient, the statistics at eps*I
    refresh: Any  # this step recomputes the inverse roots


@dataclass(frozen=True)
class scale_by_shampoo(PerLeaf):
    """Shampoo's preconditioned direction (Gupta et al., 2018), per leaf of ``k`` axes.

    ``g <- lerp(g, b, momentum) + wd*p`` (``b`` the previous direction, the first gradient at
    the first step); for each axis ``i``: ``H_i <- H_i + G_(i) G_(i)^T`` (``H_i`` starting at
    ``matrix_eps*I``; ``G_(i)`` the axis against all others), every
    ``preconditioning_compute_steps`` steps ``P_i = H_i^(-1/(2k))`` (eigendecomposition:
    ``V diag(lambda^(-1/(2k))) V^T``), zero until the first; ``u <- g x_1 P_1 ... x_k P_k``
    (each axis multiplied by its ``P_i``), and ``b <- u``. A scalar is not preconditioned.
    ``block_size`` (Anil et al., 2020): each axis longer than it is cut into runs of
    ``block_size`` (the last shorter) and each block of the leaf is preconditioned on its own,
    its statistics packed after the previous block's."""

    real_only = True

    momentum: Any = hyper(0.0, UNIT_OPEN)
    wd: Any = hyper(0.0, NONNEG)
    matrix_eps: Any = hyper(1e-6, NONNEG)
    preconditioning_compute_steps: int = 1
    block_size: int | None = None
    uses_params: ClassVar[bool] = True
    slots: ClassVar[tuple[str, ...]] = ("momentum_buffer", "pre_cond", "inv_pre_cond")
    linalg: ClassVar[tuple[str, ...]] = ("eigh",)
    # 8-bit codes keep two digits of a block's largest entry: the statistics' small
    # eigenvalues, the directions the inverse roots amplify most, are lost to them
    no_q8: ClassVar[str | None] = (
        "its pre_cond and inv_pre_cond are matrices (the preconditioner's statistics and their "
        "inverse roots), and 8 bits per block of 2048 entries round away their small "
        "eigenvalues, which the inverse roots amplify")

    def check(self) -> None:
        _check_counts(self)

    def _blocks(self, shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
        """The leaf's blocks, as slices, in row-major order of their positions: each axis
        longer than ``block_size`` cut into runs of ``block_size`` (the last shorter)."""
        b = self.block_size
        runs = [[slice(0, d)] if b is None or d <= b else
                [slice(i, min(i + b, d)) for i in range(0, d, b)] for d in shape]
        return [tuple(x) for x in itertools.product(*runs)]

    def slot_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...] | None, ...]:
        n = sum((s.stop - s.start) ** 2 for block in self._blocks(tuple(shape)) for s in block)
        return (tuple(shape), (n,) if n else None, (n,) if n else None)

    def coeffs(self, step: Any) -> ShampooCoeffs:
        return ShampooCoeffs(momentum=self.momentum, wd=self.wd, matrix_eps=self.matrix_eps,
                             first=step == 0,
                             refresh=(step + 1) % self.preconditioning_compute_steps == 0)

    def apply(self, xp, c, p, u, buf, pre, inv):
        first = _flag(c.first)
        buf = select(xp, first, u, buf)
        g = lerp(u, buf, c.momentum) + c.wd * p
        if pre is None:
            return g, g, None, None
        blocks = self._blocks(tuple(u.shape))
        if len(blocks) == 1:
            out, hs, ps = self._block(xp, c, g, pre, inv)
            return out, out, hs, ps
        outs, hs, ps, at = [], [], [], 0
        for block in blocks:
            n = sum((s.stop - s.start) ** 2 for s in block)
            o, h, q = self._block(xp, c, g[block], pre[at:at + n], inv[at:at + n])
            outs.append(o)
            hs.append(h)
            ps.append(q)
            at += n
        out = _assemble(xp, outs, [len(range(0, d, self.block_size or d)) if d else 1
                                   for d in u.shape])
        return out, out, xp.concat(hs), xp.concat(ps)

    def _block(self, xp: Any, c: Any, g: Any, pre: Any, inv: Any) -> tuple[Any, Any, Any]:
        """One block's direction and its new packed statistics and inverse roots."""
        first = _flag(c.first)
        sides: list[int | None] = list(g.shape)
        hs = []
        for i, h in enumerate(_unpack(xp, pre, sides)):
            eye = xp.eye(h.shape[0], dtype=h.dtype, device=backend.device(h))
            hs.append(select(xp, first, eye * c.matrix_eps, h) + _outer(xp, g, i))
        power = -1.0 / (2 * g.ndim)
        ps = _pick(xp, _flag(c.refresh),
                   lambda: tuple(_inverse_root(xp, h, power, c.matrix_eps) for h in hs),
                   lambda: tuple(_unpack(xp, inv, sides)))
        return _project(xp, g, list(ps)), _pack(xp, hs), _pack(xp, list(ps))


def _assemble(xp: Any, parts: list[Any], counts: list[int]) -> Any:
    """The blocks (row-major by position, ``counts`` along each axis) joined into one array."""
    if len(counts) == 1:
        return xp.concat(parts, axis=-1)
    step = len(parts) // counts[0]
    rows = [_assemble(xp, parts[i:i + step], counts[1:]) for i in range(0, len(parts), step)]
    return xp.concat(rows, axis=-len(counts))


def _check_counts(t: Any) -> None:
    object.__setattr__(t, "preconditioning_compute_steps", check_integer(
        t.name, "preconditioning_compute_steps", t.preconditioning_compute_steps, 1))
    if t.block_size is not None:  # (None: no blocks)
        object.__setattr__(t, "block_size", check_integer(t.name, "block_size", t.block_size, 1))


def _inverse_root(xp: Any, h: Any, power: float, floor: Any) -> Any:
    """``h^power`` of a symmetric ``h`` whose eigenvalues are at least ``floor`` (``eps*I``
    plus sums of outer products), from its eigendecomposition: an eigenvalue below it is
    rounding (with a spread beyond the dtype's precision, a rank-deficient sum's null space
    comes out of eigh at +-1e-7 of the largest in float32, negative, and its root NaN), and is
    taken as ``floor``."""
    w, v = backend.decomposed(xp.linalg.eigh, h)
    return (v * xp.maximum(w, floor)**power) @ xp.matrix_transpose(v)


@dataclass(frozen=True)
class shampoo(Rule):
    r"""Shampoo (Gupta et al., 2018), as ``pytorch_optimizer.Shampoo`` (4.1) writes it:
    :class:`scale_by_shampoo`, then ``p <- p - lr*u``. For a matrix leaf, with
    ``mu = momentum``, ``lambda = weight_decay`` (``decay_form="l2"``), ``B`` the previous
    direction (``B_0 = G_1``) and ``L_0 = R_0 = matrix_eps*I``:

    $$
    \begin{aligned}
    \tilde G_t &= (1 - \mu)\, G_t + \mu\, B_{t-1} + \lambda\, P_{t-1} \\
    L_t &= L_{t-1} + \tilde G_t \tilde G_t^\top, \qquad
    R_t = R_{t-1} + \tilde G_t^\top \tilde G_t \\
    B_t &= L_t^{-1/4}\, \tilde G_t\, R_t^{-1/4}, \qquad P_t = P_{t-1} - \mathrm{lr}\, B_t
    \end{aligned}
    $$

    (the inverse roots recomputed every ``preconditioning_compute_steps`` steps, else the
    last ones kept).

    Each axis of a ``k``-axis leaf keeps the sum of the gradient's products over the other
    axes, from ``matrix_eps*I``, and the leaf's direction is the gradient multiplied along each
    axis by that sum's ``-1/(2k)`` power (a matrix: ``L^(-1/4) G R^(-1/4)``), recomputed every
    ``preconditioning_compute_steps`` steps, by eigendecomposition (theirs by SVD: the same
    matrix, rounded apart by 1e-15). ``momentum``: ``g <- lerp(g, b, momentum)`` where ``b`` is
    the previous *direction* (the first gradient at the first step), theirs.

    - ``weight_decay`` with ``decay_form="l2"``: ``g <- g + weight_decay*p`` after the momentum
      mix (theirs, ``weight_decouple=False``); ``"decoupled"``: ``p <- p (1 - lr*weight_decay)``
      before the step; ``"fixed"``: ``p <- p (1 - weight_decay)`` (``fixed_decay=True``).

    - ``block_size``: axes longer than it are cut into blocks, each block of the leaf
      preconditioned on its own (Anil et al., 2020, as ``ScalableShampoo``'s ``block_size``;
      theirs has no blocks: None, the default).

    An eigenvalue of a statistic below ``matrix_eps`` (where the spread of its spectrum
    passes the dtype's precision, a rank-deficient one's null space comes out of the
    eigendecomposition at about zero, either sign) is taken as ``matrix_eps``, the least it
    can be. ``state_dtype="q8"`` is refused (8 bits would round away the small eigenvalues the
    roots amplify); float16/bfloat16 params keep the statistics in their own dtype unless
    ``state_dtype="float32"`` says otherwise, the advised setting for them.

    As theirs, the inverse roots are zero until the first recomputation: with
    ``preconditioning_compute_steps=n`` the first ``n - 1`` steps do not move. Not offered:
    grafting and the other options of ``ScalableShampoo``.

    >>> import numpy as np, uniopt as uo
    >>> state = uo.setup(uo.shampoo(lr=0.1, matrix_eps=0.0), {"w": np.eye(2)})
    >>> state, p = uo.update(state, {"w": np.eye(2)}, {"w": 4 * np.eye(2)})
    >>> p["w"]  # L = R = 16 I: 16^(-1/4) 4 I 16^(-1/4) = I
    array([[0.9, 0. ],
           [0. , 0.9]])
    """

    lr: Any = hyper(1e-3, NONNEG)
    momentum: Any = hyper(0.0, UNIT_OPEN)
    weight_decay: Any = hyper(0.0, NONNEG)
    decay_form: str = "l2"
    preconditioning_compute_steps: int = 1
    matrix_eps: Any = hyper(1e-6, NONNEG)
    block_size: int | None = None

    info: ClassVar[Info] = Info(
        family="matrix",
        paper="Gupta et al. (2018)",
        references=("pytorch_optimizer.Shampoo",),
        example={"lr": 1.0},  # Adagrad-like steps shrink: a large lr (Rosenbrock 2e-2 in 2000)
        budget=2000,
        complex=False,
        # the inverse roots come from each library's eigh, whose rounding their -1/p power
        # amplifies: 6.2e-12 measured over 10 steps between NumPy and torch
        rtol=1e-10,
    )

    def check(self) -> None:
        _check_counts(self)
        if self.decay_form not in SHAMPOO_DECAY_FORMS:
            raise ValueError(f"{self.name}: decay_form must be one of {SHAMPOO_DECAY_FORMS}, "
                             f"got {self.decay_form!r}")

    def parts(self) -> tuple[Transform, ...]:
        l2 = self.weight_decay if self.decay_form == "l2" else 0.0
        direction = scale_by_shampoo(momentum=self.momentum, wd=l2, matrix_eps=self.matrix_eps,
                                     preconditioning_compute_steps=(
                                         self.preconditioning_compute_steps),
                                     block_size=self.block_size)
        if self.decay_form == "decoupled":
            return (direction, scale_by_lr(lr=self.lr),
                    decoupled_weight_decay(lr=self.lr, wd=self.weight_decay))
        if self.decay_form == "fixed":
            return (direction, scale_by_lr(lr=self.lr),
                    decoupled_weight_decay(lr=1.0, wd=self.weight_decay))
        return (direction, scale_by_lr(lr=self.lr))


SHAMPOO_DECAY_FORMS = ("l2", "decoupled", "fixed")
