"""L-BFGS (Nocedal, 1980; Liu & Nocedal, 1989) as torch writes it, line search included.

One step runs up to ``max_iter`` iterations on the params as one flat vector, calling the
closure at each trial point, so it is a :class:`~uniopt.base.Minimizer` driven by
:func:`uniopt.minimize_step`. Its state is a dict under torch's names (``d``, ``t``,
``old_dirs``, ``old_stps``, ``ro``, ``H_diag``, ``prev_flat_grad``, ``prev_loss``, ``al``,
``n_iter``, ``func_evals``): arrays, lists of arrays and numbers, a pytree.

The iterations branch on the loss and the gradient at every turn (Python control flow), so
a step does not run under ``jax.jit``; the closure it calls may be jitted, and its state, a
pytree of arrays, may be carried through jitted code and checkpointed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import backend
from ..base import Info, Minimizer, Rule, Transform
from ..hyper import NONNEG, check_integer, hyper

# a complex leaf's part in the flat vectors: its real pairs
_REAL = {"complex64": "float32", "complex128": "float64"}

Evaluate = Callable[[Any], tuple[Any, Any]]


def _check_ints(t: Any) -> None:
    for name in ("max_iter", "history_size", "max_eval"):
        v = getattr(t, name)
        if name == "max_eval" and v is None:
            continue
        object.__setattr__(t, name, check_integer(t.name, name, v, 1))
    if t.line_search_fn not in (None, "strong_wolfe"):
        raise ValueError(
            f"{t.name}: line_search_fn must be None or 'strong_wolfe', got {t.line_search_fn!r}"
        )


def _loss(value: Any) -> float:
    """The closure's loss as a number: L-BFGS compares losses (its stopping test, the line
    search), so one that reads none (``None``, a rule's closure written for a rule that reads no
    loss) is refused by name."""
    if value is None:
        raise TypeError("lbfgs: the closure returned None for the loss; L-BFGS compares "
                        "losses (its stopping test, its line search): return the loss too")
    return float(value)


@dataclass(frozen=True)
class lbfgs_step(Minimizer):
    """The L-BFGS iterations of one step (the part :class:`lbfgs` runs)."""

    lr: Any = hyper(1.0, NONNEG)
    max_iter: int = 20
    max_eval: int | None = None
    tolerance_grad: Any = hyper(1e-7, NONNEG)
    tolerance_change: Any = hyper(1e-9, NONNEG)
    history_size: int = 100
    line_search_fn: str | None = None

    def check(self) -> None:
        _check_ints(self)

    def init_tree(self, params: Any) -> Any:
        return {"func_evals": 0, "n_iter": 0}

    def check_tree(self, state: Any, leaves: list[Any]) -> str | None:
        # its vectors are the params raveled into one (a complex leaf as its real pairs)
        n = sum(int(math.prod(p.shape)) * (2 if backend.is_complex(p) else 1) for p in leaves)
        # (of the arrays a flax NNX Param holds: minimize_step is handed a State of them)
        lib = backend.array_library(leaves[0]) if leaves else None
        # (the vectors' dtype where every leaf has one: another fails inside a dot product)
        dtypes = {_REAL.get(n, n) for n in map(backend.dtype_name, (p.dtype for p in leaves))}
        dtype = dtypes.pop() if len(dtypes) == 1 else None
        for key in ("d", "prev_flat_grad", "old_dirs", "old_stps"):
            v = state.get(key) if isinstance(state, dict) else None
            for x in v if isinstance(v, list) else [] if v is None else [v]:
                if tuple(getattr(x, "shape", ())) != (n,):
                    return (f"its {key} holds a vector of shape "
                            f"{tuple(getattr(x, 'shape', ()))}, where these params make vectors "
                            f"of {n} elements")
                if lib is not None and backend.library(x) != lib:
                    # (a fresh state holds no array: a checkpoint loaded with like= such a
                    # state makes its history in the library it was saved from)
                    return (f"its {key} holds {backend.library(x)} arrays, where these params "
                            f"are {lib} arrays (a checkpoint saved from {backend.library(x)} "
                            "loads into another library's params with like=(rule, params))")
                if dtype is not None and backend.dtype_name(x.dtype) != dtype:
                    return (f"its {key} holds a vector of {backend.dtype_name(x.dtype)}, where "
                            f"these params are {dtype}")
        return None

    def minimize(self, xp: Any, x: Any, state: Any, evaluate: Evaluate) -> tuple[Any, Any, Any]:
        # (its own dict, written as torch writes its state: a closure reads the counts mid-step)
        st = state
        lr, tol_change = self.lr, self.tolerance_change
        max_iter = self.max_iter
        max_eval = self.max_eval if self.max_eval is not None else max_iter * 5 // 4
        orig_loss, g = evaluate(x)
        loss = _loss(orig_loss)
        evals = 1
        st["func_evals"] += 1
        if _amax(xp, g) <= self.tolerance_grad:
            return x, st, orig_loss
        d: Any = st.get("d")
        t, h_diag = st.get("t"), st.get("H_diag")
        # the history's lists are the state's, grown as they are (copies: the state handed in
        # keeps its own), as torch grows its state's in place
        for k in ("old_dirs", "old_stps", "ro"):
            if k in st:
                st[k] = list(st[k])
        old_dirs, old_stps, ro = (st.get(k, []) for k in ("old_dirs", "old_stps", "ro"))
        al = st.get("al")
        prev_g, prev_loss = st.get("prev_flat_grad"), st.get("prev_loss")
        n = 0
        while n < max_iter:
            n += 1
            st["n_iter"] += 1
            if st["n_iter"] == 1:
                d, old_dirs, old_stps, ro, h_diag = -g, [], [], [], 1
            else:
                y, s = g - prev_g, d * t
                ys = _dot(y, s)
                if ys > 1e-10:  # curvature positive: remember the pair, forget the oldest
                    if len(old_dirs) == self.history_size:
                        del old_dirs[0], old_stps[0], ro[0]
                    old_dirs.append(y)
                    old_stps.append(s)
                    ro.append(1.0 / ys)
                    h_diag = ys / _dot(y, y)
                al = list(al) if al is not None else [None] * self.history_size
                st["al"] = al  # (torch's, filled in place as the recursion goes)
                # the two-loop recursion: d = -H g with H the limited-memory inverse Hessian
                q = -g
                for i in range(len(old_dirs) - 1, -1, -1):
                    al[i] = _dot(old_stps[i], q) * ro[i]
                    q = _axpy(-al[i], old_dirs[i], q)
                d = q * h_diag
                for i in range(len(old_dirs)):
                    be_i = _dot(old_dirs[i], d) * ro[i]
                    d = _axpy(al[i] - be_i, old_stps[i], d)
            prev_g, prev_loss = g, loss
            if "prev_flat_grad" in st:  # (torch's copies the gradient into the state's)
                st["prev_flat_grad"] = g
            t = min(1.0, 1.0 / xp.sum(xp.abs(g))) * lr if st["n_iter"] == 1 else lr
            gtd = _dot(g, d)
            if gtd > -tol_change:  # not a descent direction any more
                break
            ls_evals = 0
            if self.line_search_fn == "strong_wolfe":
                def along(step: Any, x0: Any = x, d0: Any = d) -> tuple[float, Any]:
                    f_new, g_new = evaluate(_axpy(step, d0, x0))
                    return _loss(f_new), g_new

                # torch's step hands its line search no tolerance_change: the search stops
                # on a bracket narrower than its own default, 1e-9, whatever the optimizer's
                loss, g, t, ls_evals = _strong_wolfe(
                    xp, along, t, d, loss, g, gtd, max_ls=max_eval - evals,
                )
                x = _axpy(t, d, x)
                done = _amax(xp, g) <= self.tolerance_grad
            else:
                x = _axpy(t, d, x)
                done = False
                if n != max_iter:  # the last iteration's point is the next step's first
                    f_new, g = evaluate(x)
                    loss, ls_evals = _loss(f_new), 1
                    done = _amax(xp, g) <= self.tolerance_grad
            evals += ls_evals
            st["func_evals"] += ls_evals
            if n == max_iter or evals >= max_eval or done:
                break
            if _amax(xp, d * t) <= tol_change or abs(loss - prev_loss) < tol_change:
                break  # no progress
        st.update(d=d, t=t, old_dirs=old_dirs, old_stps=old_stps, ro=ro, H_diag=h_diag,
                  prev_flat_grad=prev_g, prev_loss=prev_loss)
        return x, st, orig_loss


def _axpy(a: Any, v: Any, x: Any) -> Any:
    """``x + a v``; on tensors torch's ``add(alpha=a)``, one rounding per element where torch
    fuses it (CPU), so a step is torch's bit for bit."""
    if backend.is_torch(x):
        return x.add(v, alpha=a)
    return x + a * v


def _dot(a: Any, b: Any) -> Any:
    """``a @ b`` in the vectors' dtype, as torch's ``dot`` gives it: ml_dtypes' bfloat16 one is
    a float32 number, which NumPy 2 would then spread to the direction and the history."""
    r = a @ b
    return r if r.dtype == a.dtype else r.astype(a.dtype)


def _amax(xp: Any, v: Any) -> Any:
    return xp.max(xp.abs(v))


def _sqrt(xp: Any, v: Any) -> Any:
    return math.sqrt(v) if isinstance(v, float) else xp.sqrt(v)


def _cubic_min(xp: Any, x1: Any, f1: Any, g1: Any, x2: Any, f2: Any, g2: Any,
               bounds: tuple[Any, Any] | None = None) -> Any:
    """The minimiser of the cubic through ``(x1, f1)`` and ``(x2, f2)`` with slopes ``g1``,
    ``g2``, clamped to ``bounds`` (default: the interval between them); their midpoint where
    the cubic has no minimum."""
    lo, hi = bounds if bounds is not None else ((x1, x2) if x1 <= x2 else (x2, x1))
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1**2 - g1 * g2
    if not d2_square >= 0:  # no minimum (or nan): bisect
        return (lo + hi) / 2.0
    d2 = _sqrt(xp, d2_square)
    if x1 <= x2:
        at = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        at = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(at, lo), hi)


def _finite_along(along: Callable[[Any], tuple[float, Any]], t: Any) -> tuple[float, Any]:
    """``along(t)``, refused where the loss is NaN: it picks no point of a bracket, and the
    search then failed with an IndexError (torch's too)."""
    f_t, g_t = along(t)
    if f_t != f_t:
        raise FloatingPointError(f"lbfgs: the loss is nan at the line search's trial step "
                                 f"t={float(t)!r}; the params are left as they were")
    return f_t, g_t


def _strong_wolfe(
    xp: Any, along: Callable[[Any], tuple[float, Any]], t: Any, d: Any, f: float, g: Any,
    gtd: Any, c1: float = 1e-4, c2: float = 0.9, tolerance_change: Any = 1e-9,
    max_ls: int = 25,
) -> tuple[float, Any, Any, int]:
    """A step ``t`` along ``d`` meeting the strong Wolfe conditions (sufficient decrease
    ``f(t) <= f + c1 t gtd`` and curvature ``|f'(t)| <= c2 |gtd|``): bracket, then zoom by
    cubic interpolation (Nocedal & Wright, algorithms 3.5 and 3.6). Returns the loss, gradient
    and step of the best point, and the evaluations spent."""
    d_norm = _amax(xp, d)
    along = functools.partial(_finite_along, along)
    f_new, g_new = along(t)
    evals, gtd_new = 1, _dot(g_new, d)
    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done, ls_iter = False, 0
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            br, br_f, br_g, br_gtd = [t_prev, t], [f_prev, f_new], [g_prev, g_new], \
                [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            br, br_f, br_g, br_gtd = [t], [f_new], [g_new], [gtd_new]
            done = True
            break
        if gtd_new >= 0:
            br, br_f, br_g, br_gtd = [t_prev, t], [f_prev, f_new], [g_prev, g_new], \
                [gtd_prev, gtd_new]
            break
        # extrapolate: a cubic step between 1.01 and 10 times the last
        bounds = (t + 0.01 * (t - t_prev), t * 10)
        t_prev, t = t, _cubic_min(xp, t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds)
        f_prev, g_prev, gtd_prev = f_new, g_new, gtd_new
        f_new, g_new = along(t)
        evals += 1
        gtd_new = _dot(g_new, d)
        ls_iter += 1
    if ls_iter == max_ls:  # out of evaluations while extrapolating
        br, br_f, br_g = [0, t], [f, f_new], [g, g_new]
    # zoom: shrink the bracket around a point meeting both conditions
    insufficient = False
    low, high = (0, 1) if br_f[0] <= br_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(br[1] - br[0]) * d_norm < tolerance_change:
            break
        t = _cubic_min(xp, br[0], br_f[0], br_gtd[0], br[1], br_f[1], br_gtd[1])
        # a trial too close to an end twice running (or outside) moves a tenth inside
        eps = 0.1 * (max(br) - min(br))
        if min(max(br) - t, t - min(br)) < eps:
            if insufficient or t >= max(br) or t <= min(br):
                t = max(br) - eps if abs(t - max(br)) < abs(t - min(br)) else min(br) + eps
                insufficient = False
            else:
                insufficient = True
        else:
            insufficient = False
        f_new, g_new = along(t)
        evals += 1
        gtd_new = _dot(g_new, d)
        ls_iter += 1
        if f_new > (f + c1 * t * gtd) or f_new >= br_f[low]:
            br[high], br_f[high], br_g[high], br_gtd[high] = t, f_new, g_new, gtd_new
            low, high = (0, 1) if br_f[0] <= br_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (br[high] - br[low]) >= 0:
                br[high], br_f[high], br_g[high], br_gtd[high] = \
                    br[low], br_f[low], br_g[low], br_gtd[low]
            br[low], br_f[low], br_g[low], br_gtd[low] = t, f_new, g_new, gtd_new
    return br_f[low], br_g[low], br[low], evals


@dataclass(frozen=True)
class lbfgs(Rule):
    r"""L-BFGS with torch's defaults, iterations and (``line_search_fn="strong_wolfe"``) line
    search; a step needs the closure: :func:`uniopt.minimize_step`.

    Each of up to ``max_iter`` iterations (and ``max_eval`` closure calls, default
    ``max_iter*5//4``) takes ``d = -H g`` from the last ``history_size`` pairs
    ``s = t d``, ``y = g_new - g`` with ``y.s > 1e-10`` (two-loop recursion, ``H_0 = y.s/y.y``),
    and ``x <- x + t d``: ``t = lr`` (the first iteration ever: ``min(1, 1/|g|_1) lr``), or
    the strong-Wolfe step. It stops when ``max|g| <= tolerance_grad``, when ``g.d``,
    ``max|t d|`` or the change of loss falls below ``tolerance_change`` (the line search ends a
    bracket narrower than 1e-9 whatever ``tolerance_change`` is, as torch's). One iteration ``k``,
    with ``x`` the parameters flattened into one vector and ``(s_i, y_i)``, ``rho_i = 1/y_i.s_i``
    the kept pairs, oldest first:

    $$
    \begin{aligned}
    s_{k-1} &= t_{k-1} d_{k-1}, \qquad y_{k-1} = g_k - g_{k-1}
    \quad \text{(kept if } y_{k-1}^\top s_{k-1} > 10^{-10}\text{)} \\
    q &\leftarrow -g_k; \quad \text{for } i \text{ newest to oldest: }
    \alpha_i = \rho_i\, s_i^\top q, \quad q \leftarrow q - \alpha_i\, y_i \\
    d_k &\leftarrow \gamma\, q, \qquad \gamma = \frac{y^\top s}{y^\top y}
    \text{ of the newest pair} \\
    &\text{for } i \text{ oldest to newest: }
    d_k \leftarrow d_k + (\alpha_i - \rho_i\, y_i^\top d_k)\, s_i \\
    x_{k+1} &= x_k + t_k\, d_k, \qquad t_k = \mathrm{lr}
    \ \left(\text{first: } \min(1, 1/\lVert g_1 \rVert_1)\, \mathrm{lr}\right)
    \text{ or the strong-Wolfe step}
    \end{aligned}
    $$

    The first iteration ever is ``d = -g`` (no pairs yet).

    >>> import numpy as np, uniopt as uo
    >>> def closure(p):  # (loss, grads) at the params p
    ...     return float(((p["x"] - 3.0) ** 2).sum()), {"x": 2.0 * (p["x"] - 3.0)}
    >>> params = {"x": np.zeros(2)}
    >>> state = uo.setup(uo.lbfgs(line_search_fn="strong_wolfe"), params)
    >>> state, params, loss = uo.minimize_step(state, params, closure)
    >>> loss, params["x"]
    (18.0, array([3., 3.]))
    """

    lr: Any = hyper(1.0, NONNEG)
    max_iter: int = 20
    max_eval: int | None = None
    tolerance_grad: Any = hyper(1e-7, NONNEG)
    tolerance_change: Any = hyper(1e-9, NONNEG)
    history_size: int = 100
    line_search_fn: str | None = None

    info: ClassVar[Info] = Info(
        family="quasi-newton",
        paper="Liu & Nocedal (1989)",
        references=("torch.optim.LBFGS",),
        example={"lr": 1.0},
        budget=100,
        needs_closure=True,
        jit=False,  # the line search and the stopping tests branch on the loss
    )

    def check(self) -> None:
        _check_ints(self)

    def parts(self) -> tuple[Transform, ...]:
        return (lbfgs_step(**self.fields()),)
