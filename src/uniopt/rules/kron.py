"""Kron: preconditioned SGD with Kronecker-factored preconditioners (Li, 2018), as Evan
Walters' ``kron_torch`` popularised it and ``pytorch_optimizer.Kron`` writes it.

Each leaf keeps one factor ``Q_i`` per axis (upper triangular, or diagonal where the axis is
long, of length 1, the leaf has too few axes, or the memory-save mode says so); the
preconditioner is ``P = Q^T Q`` with ``Q = Q_1 (x) ... (x) Q_k``, fitted to random probes
``v`` by Li's multiplicative update, on a step-dependent share of the steps.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .. import backend
from ..base import Info, Rule, Transform, WholeTree
from ..hyper import (
    NONNEG,
    POSITIVE,
    UNIT,
    UNIT_OPEN,
    Interval,
    _traced,
    check_integer,
    check_real,
    hyper,
)
from ..schedules import _namespace, _Record, _result
from ..transforms.noise import SEEDS, _kind, _pcg_generator, _pcg_state, seeded_state
from ..transforms.scale import scale_by_lr
from ..tree import flatten_leaves, unflatten
from .sophia_h import _DRAW

MEMORY_SAVE_MODES = (None, "one_diag", "smart_one_diag", "all_diag")
# the floor of Li's step normaliser: bfloat16's smallest normal number, as kron_torch's
TINY = 2.0 ** -126


@dataclass(frozen=True)
class psgd_update_probability(_Record):
    """The share of steps that update the preconditioner (kron_torch's default schedule):
    ``clip(max_prob * exp(-decay*(step - flat_start)), min_prob, max_prob)``, so 1 for the
    first ``flat_start`` steps, then decaying to ``min_prob``."""

    max_prob: float = 1.0
    min_prob: float = 0.03
    decay: float = 0.001
    flat_start: int = 500

    def __call__(self, step: Any) -> Any:
        xp = _namespace(step)
        prob = self.max_prob * xp.exp(-self.decay * (step - self.flat_start))
        return _result(xp, xp.clip(prob, self.min_prob, self.max_prob))


class KronCoeffs(NamedTuple):
    momentum: Any
    one_minus_momentum: Any
    bc: Any  # 1 - momentum^t
    probability: Any
    precond_lr: Any
    wd: Any


@dataclass(frozen=True)
class scale_by_kron(WholeTree):
    """Kron's direction; for each leaf ``p`` with gradient ``g``:

    ``g <- g + wd*p`` for leaves of 2+ axes unless ``weight_decouple``;
    ``m <- momentum*m + (1-momentum)*g``, ``m_hat = m/(1 - momentum^t)``;
    on an updating step (a counter reaches ``1/prob``, ``prob`` the step's
    ``preconditioner_update_probability``, then restarts), with ``v`` standard normal and
    ``h = m_hat`` (``g`` with ``momentum_into_precondition_update=False``):
    ``A = Q h`` (each axis by its factor), ``B = v Q^-T`` (each axis by its factor's inverse,
    a triangular solve), and for each factor ``Q_i``, with ``T1 = A_(i) A_(i)^T`` and
    ``T2 = B_(i) B_(i)^T`` (the axis against all others; their diagonals for a diagonal
    factor): ``Q_i <- Q_i - precond_lr*triu(T1 - T2) Q_i / (||T1 + T2|| + tiny)`` (``||.||``
    a lower bound of the spectral norm; a diagonal factor: elementwise, the largest entry);
    before it, with probability ``balance_prob``, every leaf's factors are rescaled to the
    geometric mean of their largest entries (the preconditioner is unchanged);
    ``u = P m_hat`` (``P = Q^T Q``), ``u <- u * min(1.1/(rms(u) + 1e-6), 1)``, and
    ``u <- u + wd*p`` for leaves of 2+ axes with ``weight_decouple``.

    The tree state holds ``momentum_buffer`` and ``Q`` (per leaf: its factors), the update
    counter, the probes' generator (as :class:`~uniopt.scale_by_hutchinson_sophia`'s: NumPy's
    PCG64, torch's or a JAX key, seeded with ``seed``) and the balancing draws' (one uniform
    number a step: NumPy's PCG64 seeded with ``seed``; on JAX ``jax.random.key(seed)``
    folded with 1, split as the probes' key). Under ``jax.jit`` the counter is an int32
    array and the decisions are traced: the balancing and the fit run under ``lax.cond``, and
    the probability is computed in JAX's default float (float32 without x64, as
    pytorch-optimizer's)."""

    real_only = True
    like_params: ClassVar[tuple[str, ...]] = ("momentum_buffer",)

    momentum: Any = hyper(0.9, UNIT_OPEN)
    weight_decay: Any = hyper(0.0, NONNEG)
    weight_decouple: bool = True
    preconditioner_update_probability: Any = hyper(psgd_update_probability(),
                                                   Interval(0.0, 1.0))
    max_size_triangular: int = 8192
    min_ndim_triangular: int = 2
    memory_save_mode: str | None = None
    momentum_into_precondition_update: bool = True
    precond_lr: Any = hyper(0.1, NONNEG)
    precond_init_scale: float = 1.0
    balance_prob: float = 0.01
    seed: int = 0
    uses_params: ClassVar[bool] = True

    def check(self) -> None:
        _check_kron(self.name, self)

    def coeffs(self, step: Any) -> KronCoeffs:
        c = self.one_minus("momentum")
        return KronCoeffs(momentum=self.momentum, one_minus_momentum=c,
                          bc=1.0 - self.momentum ** (step + 1),
                          probability=self.preconditioner_update_probability,
                          precond_lr=self.precond_lr, wd=self.weight_decay)

    def diagonal(self, shape: tuple[int, ...]) -> list[bool]:
        """Which axes of a leaf of ``shape`` keep a diagonal factor."""
        n = len(shape)
        diag = [False] * n
        if n and self.memory_save_mode == "all_diag":
            diag = [True] * n
        elif n and self.memory_save_mode in ("one_diag", "smart_one_diag"):
            longest = int(np.argsort(shape)[::-1][0])
            ordered = sorted(shape)
            if self.memory_save_mode == "one_diag" or (n >= 2 and ordered[-1] > ordered[-2]):
                diag[longest] = True
        return [d or s == 1 or s > self.max_size_triangular or n < self.min_ndim_triangular
                for s, d in zip(shape, diag, strict=True)]

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        # the momentum, and a factor per axis (a scalar's: one number)
        if not shape:
            return ((), ())
        return (tuple(shape), *((n,) if d else (n, n) for n, d in zip(
            shape, self.diagonal(shape), strict=True)))

    def init_tree(self, params: Any) -> Any:
        leaves = flatten_leaves(params)[0]
        gen = seeded_state(leaves, self.seed)
        qs = []
        for p in leaves:
            xp = backend.namespace(p)
            shape = tuple(p.shape)
            if not shape:
                qs.append([xp.asarray(xp.ones_like(p) * self.precond_init_scale)])
                continue
            s = self.precond_init_scale ** (1.0 / len(shape))
            # (each factor replicated where the leaf is laid out over a mesh)
            qs.append([s * backend.made_beside(functools.partial(
                _diagonal_factor if d else _full_factor, xp, n, p.dtype), p)
                for n, d in zip(shape, self.diagonal(shape), strict=True)])
        first = backend.jax_array_of(leaves[0]) if leaves else None  # (an NNX Param's too)
        if first is not None:
            # on JAX the counter and the balancing draws' key are JAX arrays, which jax.jit
            # carries: a 64-bit counter and PCG64's words would not survive without x64
            import jax
            import jax.numpy as jnp

            counter: Any = backend.placed(jnp.zeros((), dtype=jnp.int32), first)
            balance: Any = backend.placed(jax.random.key_data(
                jax.random.fold_in(jax.random.key(self.seed), 1)), first)
        else:
            counter = np.zeros((), dtype=np.int64)
            balance = _pcg_state(np.random.PCG64(self.seed))
            if leaves and backend.is_torch(leaves[0]):
                # torch tensors, so that a torch state dict loads with weights_only=True
                import torch

                counter, balance = torch.from_numpy(counter), _torch_words(balance)
        return {"momentum_buffer": [backend.namespace(p).zeros_like(p) for p in leaves],
                "Q": qs, "update_counter": counter, "generator": gen,
                "balance_generator": balance}

    def check_tree(self, state: Any, leaves: list[Any]) -> str | None:
        if not isinstance(state, dict):
            return None
        ms, qs = state.get("momentum_buffer"), state.get("Q")
        for i, p in enumerate(leaves):
            shape = tuple(p.shape)
            if isinstance(ms, list) and i < len(ms) and tuple(ms[i].shape) != shape:
                return (f"momentum_buffer for leaf {i} has shape {tuple(ms[i].shape)}, where a "
                        f"param of shape {shape} keeps {shape}")
            factors = qs[i] if isinstance(qs, list) and i < len(qs) else None
            if shape and isinstance(factors, list) and (
                    len(factors) != len(shape) or any(
                        tuple(q.shape)[:1] != (n,) for q, n in zip(factors, shape, strict=True))):
                return (f"Q for leaf {i} has factors of shapes "
                        f"{[tuple(q.shape) for q in factors]}, where a param of shape {shape} "
                        f"keeps one per axis, of its length")
        return None

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any,
                   **extra: Any) -> tuple[Any, Any]:
        leaves, treedef = flatten_leaves(u)
        ps = flatten_leaves(params)[0]
        first = leaves[0] if leaves else np.zeros(0)
        kind = "jax" if backend.is_jax(first) else "torch" if backend.is_torch(first) else "numpy"
        gen, held = state["generator"], _kind(state["generator"])
        if leaves and held != kind:
            raise TypeError(f"{self.name}: its state holds a {held} generator, the updates are "
                            f"{backend.library(first)} arrays: set the state up for these params")
        xp = backend.namespace(first)
        counter = state["update_counter"] + 1
        # every step draws, as kron_torch's rng.random() < balance_prob and do_update
        draw, bal = _balance_draw(kind, state["balance_generator"])
        # (traced under jax.jit, a state closed over by the jitted function too: its concrete
        # arrays come out of arithmetic in the trace as tracers)
        traced = _traced(counter) or _traced(draw) or _traced(c.probability)
        if traced:
            prob = xp.asarray(c.probability)
            update = (prob > 0) & (counter >= 1.0 / prob)
        else:
            counter, prob = int(counter), float(c.probability)
            update = prob > 0 and counter >= 1.0 / prob
        balance = (draw < self.balance_prob) & update if traced else (
            bool(draw < self.balance_prob) and update)
        ms, m_hats, hs = [], [], []
        for p, g, m in zip(ps, leaves, state["momentum_buffer"], strict=True):
            # (each in the leaf's dtype: traced coefficients are JAX's default float)
            if g.ndim >= 2 and not self.weight_decouple:
                g = _like(xp, g + c.wd * p, g)
            m = _like(xp, m * c.momentum + c.one_minus_momentum * g, m)
            ms.append(m)
            m_hats.append(_like(xp, m / c.bc, m))
            hs.append(m_hats[-1] if self.momentum_into_precondition_update else g)

        if traced:
            # whole arrays into jax.lax.cond: a branch that gathers split ones holds collectives,
            # and XLA's CPU client deadlocked running such a program from its persistent cache
            m_hats, hs = [backend.gathered(x) for x in m_hats], [backend.gathered(x) for x in hs]

        def balanced(qs: list[list[Any]]) -> list[list[Any]]:
            return [_balance(xp, q) if g.ndim > 1 else q
                    for q, g in zip(qs, leaves, strict=True)]

        def fitted(qs_gen: tuple[list[list[Any]], Any]) -> tuple[list[list[Any]], Any]:
            qs, gen = qs_gen
            out = []
            for q, m_hat, h in zip(qs, m_hats, hs, strict=True):
                (v,), gen = _DRAW[kind](gen, [m_hat], "gaussian")
                # (laid out as it was: on a mesh a factor made from a split leaf comes back
                # split, which the other branch of jax.lax.cond does not)
                out.append([backend.laid_out_as(_like(xp, new, old), old) for new, old in
                            zip(_update_q(xp, q, v, h, c.precond_lr), q, strict=True)])
            return out, gen

        qs = [list(q) for q in state["Q"]]
        if traced:
            import jax

            qs = jax.lax.cond(balance, balanced, lambda q: q, qs)
            qs, gen = jax.lax.cond(update, fitted, lambda s: s, (qs, gen))
            counter = xp.where(update, 0, counter)
        else:
            if balance:
                qs = balanced(qs)
            if update:
                qs, gen = fitted((qs, gen))
            held_counter = state["update_counter"]
            counter = backend.namespace(held_counter).asarray(0 if update else counter,
                                                              dtype=held_counter.dtype)
        out = []
        for p, g, q, m_hat in zip(ps, leaves, qs, m_hats, strict=True):
            d = _precondition(xp, q, m_hat)
            if math.prod(d.shape):  # (an empty leaf has no RMS: NumPy warns of its mean)
                shrink = 1.1 / (xp.sqrt(xp.mean(d * d)) + 1e-6)
                d = d * xp.minimum(shrink, xp.ones_like(shrink))
            if g.ndim >= 2 and self.weight_decouple:
                d = _like(xp, d + c.wd * p, d)
            out.append(xp.asarray(d))
        # NumPy makes a 0-d leaf's arithmetic a scalar: kept as arrays, as set up
        new = {"momentum_buffer": [xp.asarray(m) for m in ms],
               "Q": [[xp.asarray(x) for x in q] for q in qs],
               "update_counter": counter, "generator": gen, "balance_generator": bal}
        return unflatten(treedef, out), new


def _diagonal_factor(xp: Any, n: int, dtype: Any, device: Any) -> Any:
    return xp.ones((n,), dtype=dtype, device=device)


def _full_factor(xp: Any, n: int, dtype: Any, device: Any) -> Any:
    return xp.eye(n, dtype=dtype, device=device)


def _like(xp: Any, x: Any, like: Any) -> Any:
    """``x`` in ``like``'s dtype."""
    return x if x.dtype == like.dtype else xp.astype(x, like.dtype)


def _balance_draw(kind: str, state: Any) -> tuple[Any, Any]:
    """One uniform number in [0, 1) and the generator's next state: on JAX from the key in
    ``state`` (split, as the probes' key), else from PCG64's words (NumPy's ``random()``)."""
    if kind == "jax":
        import jax

        key, sample = jax.random.split(jax.random.wrap_key_data(state))
        return jax.random.uniform(sample), jax.random.key_data(key)
    bits = _pcg_generator(state)
    draw, words = bits.random(), _pcg_state(bits.bit_generator)
    return draw, _torch_words(words) if kind == "torch" else words


def _torch_words(words: np.ndarray) -> Any:
    """PCG64's unsigned words as a torch int64 tensor of their bits (torch has no uint64 that
    its state dicts load with weights_only=True)."""
    import torch

    return torch.from_numpy(words.view(np.int64).copy())


def _along(xp: Any, q: Any, x: Any, i: int) -> Any:
    """``x`` with axis ``i`` multiplied by factor ``q`` (a matrix: ``sum_b q[a, b] x[..b..]``;
    a vector: elementwise)."""
    if q.ndim < 2:
        shape = [1] * x.ndim
        shape[i] = -1
        return x * xp.reshape(q, tuple(shape))
    return xp.moveaxis(xp.tensordot(q, x, axes=([1], [i])), 0, i)


def _gram(xp: Any, x: Any, i: int, diagonal: bool) -> Any:
    """``X X^T`` for ``X`` the axis ``i`` of ``x`` against all others (its diagonal where
    ``diagonal``)."""
    # (the other axes' size spelled out: -1 is ambiguous for an empty leaf, under jax.jit)
    rest = math.prod(n for j, n in enumerate(x.shape) if j != i)
    rows = xp.reshape(xp.moveaxis(x, i, 0), (x.shape[i], rest))
    if diagonal:
        return xp.sum(rows * rows, axis=1)
    return rows @ xp.matrix_transpose(rows)


def _right_solve(xp: Any, x: Any, q: Any) -> Any:
    """``x @ inv(q)`` for an upper triangular ``q``."""
    if backend.is_torch(x):
        import torch

        return torch.linalg.solve_triangular(q, x, upper=True, left=False)
    if backend.is_jax(x):
        import jax.scipy.linalg

        return jax.scipy.linalg.solve_triangular(q, x.T, trans="T", lower=False).T
    out = x.dtype
    dtype = np.float64 if q.dtype == np.float64 else np.float32  # float16: in float32
    q, x = np.asarray(q, dtype), np.asarray(x, dtype)
    try:
        from scipy.linalg import lapack
    except ImportError:  # SciPy is not one of the core's dependencies
        y = _substituted(q, x)
    else:
        # LAPACK's trtrs itself (solve_triangular's own routine, bit for bit): scipy's wrapper
        # costs milliseconds a call, far more than a factor's solve
        solve = lapack.dtrtrs if dtype == np.float64 else lapack.strtrs
        y = solve(q, x.T, lower=0, trans=1)[0].T
    return y.astype(out, copy=False)


def _substituted(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``x @ inv(q)`` for an upper triangular ``q``, by substitution, a column at a time (where
    SciPy, and with it LAPACK's trtrs, is missing: the same solution, rounded otherwise)."""
    y = np.empty_like(x)
    for j in range(q.shape[0]):
        y[:, j] = (x[:, j] - y[:, :j] @ q[:j, j]) / q[j, j]
    return y


def _inverse_along(xp: Any, q: Any, x: Any, i: int) -> Any:
    """``x`` with axis ``i`` multiplied by ``inv(q)`` from the right (``sum_a x[..a..]
    inv(q)[a, b]``; a vector factor: divided elementwise)."""
    if q.ndim < 2:
        shape = [1] * x.ndim
        shape[i] = -1
        return x / xp.reshape(q, tuple(shape))
    y = xp.moveaxis(x, i, -1)
    flat = xp.reshape(y, (math.prod(y.shape[:-1]), y.shape[-1]))
    return xp.moveaxis(xp.reshape(_right_solve(xp, flat, q), y.shape), -1, i)


def _norm_lower_bound(xp: Any, a: Any) -> Any:
    """A lower bound of the spectral norm of the square matrix ``a`` (Li's: the largest
    row or column, by sum of squares, pushed once through ``a``; both are computed and one
    chosen, as pytorch-optimizer does, so that it traces under ``jax.jit``)."""
    big = xp.max(xp.abs(a))
    a = a / xp.where(big > 0, big, xp.ones_like(big))
    aa = a * a
    cols, rows = xp.sum(aa, axis=0), xp.sum(aa, axis=1)
    i, j = xp.argmax(cols), xp.argmax(rows)
    tiny = xp.asarray(xp.finfo(a.dtype).smallest_normal, dtype=a.dtype)
    x0 = a[:, i] @ a
    x0 = x0 / xp.maximum(xp.linalg.vector_norm(x0), tiny)
    x1 = a @ a[j, :]
    x1 = x1 / xp.maximum(xp.linalg.vector_norm(x1), tiny)
    bound = xp.where(cols[i] > rows[j], xp.linalg.vector_norm(x0 @ xp.matrix_transpose(a)),
                     xp.linalg.vector_norm(xp.matrix_transpose(a) @ x1))
    return big * bound


def _update_q(xp: Any, qs: list[Any], v: Any, h: Any, lr: Any) -> list[Any]:
    if h.ndim == 0:
        a, b = qs[0] * h, v / qs[0]
        t1, t2 = a * a, b * b
        step = (t1 - t2) * lr * qs[0] / (xp.abs(t1 + t2) + TINY)
        return [qs[0] - step]
    a, b = h, v
    for i, q in enumerate(qs):
        a = _along(xp, q, a, i)
        b = _inverse_along(xp, q, b, i)
    out = []
    for i, q in enumerate(qs):
        diagonal = q.ndim < 2
        t1, t2 = _gram(xp, a, i, diagonal), _gram(xp, b, i, diagonal)
        step = (t1 - t2) * lr
        if q.shape[0] == 0:  # an empty leaf's empty axis: no maximum, nothing to fit
            step = q * 0
        elif diagonal:
            step = step * q / (xp.max(xp.abs(t1 + t2)) + TINY)
        else:
            step = (xp.triu(step) / (_norm_lower_bound(xp, t1 + t2) + TINY)) @ q
        out.append(q - step)
    return out


def _precondition(xp: Any, qs: list[Any], g: Any) -> Any:
    """``Q^T Q g``, axis by axis."""
    if g.ndim == 0:
        return qs[0] * qs[0] * g
    for i, q in enumerate(qs):
        g = _along(xp, q, g, i)
    for i, q in enumerate(qs):
        g = _along(xp, q if q.ndim < 2 else xp.matrix_transpose(q), g, i)
    return g


def _balance(xp: Any, qs: list[Any]) -> list[Any]:
    if any(q.shape[0] == 0 for q in qs):  # an empty leaf's: no maximum, nothing to balance
        return qs
    norms = [xp.max(xp.abs(q)) for q in qs]
    mean = math.prod(norms[1:], start=norms[0]) ** (1.0 / len(qs))
    return [q * (mean / n) for q, n in zip(qs, norms, strict=True)]


def _check_kron(owner: str, t: Any) -> None:
    for name, least in (("max_size_triangular", 1), ("min_ndim_triangular", 0)):
        object.__setattr__(t, name, check_integer(owner, name, getattr(t, name), least))
    if t.memory_save_mode not in MEMORY_SAVE_MODES:
        raise ValueError(f"{owner}: memory_save_mode must be one of "
                         f"{', '.join(map(repr, MEMORY_SAVE_MODES))}, got {t.memory_save_mode!r}")
    for name, valid in (("balance_prob", UNIT), ("precond_init_scale", POSITIVE)):
        object.__setattr__(t, name, check_real(owner, name, getattr(t, name), valid))
    object.__setattr__(t, "seed", check_integer(owner, "seed", t.seed, 0, SEEDS))


@dataclass(frozen=True)
class kron(Rule):
    """Kron (Li, 2018; Kronecker-factored PSGD as ``kron_torch`` writes it), with
    ``pytorch_optimizer.Kron``'s names and defaults: ``p <- p - lr*u``, ``u`` from
    :class:`scale_by_kron` (its formulas). Options: ``weight_decouple`` (decay added to the
    preconditioned direction, else to the gradient; leaves of 2+ axes only, as kron_torch),
    ``preconditioner_update_probability`` (a number or a schedule; default
    :class:`psgd_update_probability`: 1 for 500 steps, then decaying to 0.03),
    ``max_size_triangular`` / ``min_ndim_triangular`` / ``memory_save_mode`` (which factors
    are diagonal), ``momentum_into_precondition_update`` (fit ``P`` to the momentum, else to
    the gradient), ``precond_lr``, ``precond_init_scale``, ``balance_prob``, ``seed``.

    Differences from pytorch-optimizer, on purpose: the factors are kept in the leaf's dtype
    (its ``precondition_dtype`` defaults to float32; ``mu_dtype`` is not offered) and the
    triangular solves run in it (pytorch-optimizer and kron_torch solve in float32); the
    update probability is computed in double (theirs in float32); the probes come from a
    generator in the state seeded with ``seed`` (theirs: torch's global generator; after
    ``torch.manual_seed(seed)`` the same on torch tensors) and the balancing draws from
    NumPy's PCG64 seeded with ``seed`` (theirs: ``np.random.random()``; on JAX from a JAX key
    in the state). Runs on NumPy (LAPACK's triangular solve, through SciPy), torch
    (:class:`uniopt.torch.Kron` is pytorch-optimizer's class) and JAX, eagerly or under
    ``jax.jit`` (one compilation; the step's decisions are traced, see
    :class:`scale_by_kron`). Jitted and eager JAX agree to rounding (9e-17 over 5 steps in
    float64, tests/test_rules_kron.py), and NumPy handed JAX's draws agrees with both.

    >>> import numpy as np, uniopt as uo
    >>> p = {"w": np.ones((2, 2))}
    >>> rule = uo.kron(lr=0.1, preconditioner_update_probability=0.0)  # P stays I
    >>> state, p = uo.update(uo.setup(rule, p), p, {"w": np.full((2, 2), 4.0)})
    >>> p["w"]  # m_hat = g, its rms 4 brought down to 1.1 (4.000001: the 1e-6 beside it)
    array([[0.89000003, 0.89000003],
           [0.89000003, 0.89000003]])
    """

    lr: Any = hyper(1e-3, NONNEG)
    momentum: Any = hyper(0.9, UNIT_OPEN)
    weight_decay: Any = hyper(0.0, NONNEG)
    weight_decouple: bool = True
    preconditioner_update_probability: Any = hyper(psgd_update_probability(),
                                                   Interval(0.0, 1.0))
    max_size_triangular: int = 8192
    min_ndim_triangular: int = 2
    memory_save_mode: str | None = None
    momentum_into_precondition_update: bool = True
    precond_lr: Any = hyper(0.1, NONNEG)
    precond_init_scale: float = 1.0
    balance_prob: float = 0.01
    seed: int = 0

    info: ClassVar[Info] = Info(
        family="second-order",
        paper="Li (2018)",
        references=("pytorch_optimizer.Kron",),
        # no preconditioner updates: each array library draws its probes from its own
        # generator, so only then do they agree; the parity tests fit the preconditioner
        example={"lr": 0.01, "preconditioner_update_probability": 0.0},
        budget=1000,
        complex=False,
        backends=("numpy", "torch", "jax"),
    )

    def check(self) -> None:
        _check_kron(self.name, self)

    def parts(self) -> tuple[Transform, ...]:
        return (scale_by_kron(
            momentum=self.momentum, weight_decay=self.weight_decay,
            weight_decouple=self.weight_decouple,
            preconditioner_update_probability=self.preconditioner_update_probability,
            max_size_triangular=self.max_size_triangular,
            min_ndim_triangular=self.min_ndim_triangular,
            memory_save_mode=self.memory_save_mode,
            momentum_into_precondition_update=self.momentum_into_precondition_update,
            precond_lr=self.precond_lr, precond_init_scale=self.precond_init_scale,
            balance_prob=self.balance_prob, seed=self.seed),
            scale_by_lr(lr=self.lr))
