"""Line searches as blocks of a chain: the step size found by evaluating the objective.

These are optax's form of a line search (``optax.scale_by_zoom_linesearch``,
``optax.scale_by_backtracking_linesearch``): a whole-tree part that takes the direction ``u``
from the parts before it and hands out ``eta * u``, with ``eta`` found by calling the
objective at trial points ``p - eta u``. The step's extra arguments carry what it needs::

    uo.update(state, params, grads, value=loss, grad=grads, value_fn=f)
    tx.update(grads, state, params, value=loss, grad=grads, value_fn=f)   # optax protocol

``value``: the loss at ``params``; ``grad``: its gradient there (a tree like params or a flat
list); ``value_fn(params, **kwargs)``: the objective. On JAX it may return the loss alone (it
is differentiated with ``jax.value_and_grad``); on torch a loss alone is differentiated with
``torch.func.grad_and_value``; on NumPy, where nothing differentiates, the zoom search needs
``value_fn`` to return ``(loss, grads)``. Any further keyword argument of the step that
``value_fn`` takes (the batch: ``x=``, ``y=``) is passed on to it, as optax does.

The searches branch on the values they meet: on host arrays (NumPy, torch, JAX outside
``jax.jit``) the iterations are a Python loop that stops when the search does; under
``jax.jit`` they are ``jax.lax.while_loop`` and ``jax.lax.cond``, as in optax, so a jitted
step compiles once. The arithmetic follows optax's operation for operation, so in float64 the
step sizes, values and parameters agree with optax's to rounding (its dot products are XLA's,
summed in another order).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import backend
from ..base import WholeTree
from ..hyper import NONNEG, Interval, _traced, check_integer, check_real, static
from ..tree import flatten_leaves, leaf_names, unflatten

Leaves = list[Any]
Evaluate = Callable[[Leaves], tuple[Any, Leaves | None]]

_POSITIVE = Interval(0.0, None, lo_open=True)
_OPEN_UNIT = Interval(0.0, 1.0, lo_open=True, hi_open=True)


# --- tree arithmetic on lists of leaves, in optax's order of operations ------------------------

def vdot(a: Leaves, b: Leaves) -> Any:
    """The inner product of two lists of real leaves, summed leaf after leaf from 0 as
    ``optax.tree.vdot`` sums them."""
    total: Any = 0
    for x, y in zip(a, b, strict=True):
        xp = backend.namespace(x)
        if x.dtype != y.dtype:  # a 16-bit leaf's against the step's float32: torch's
            wide = xp.result_type(x, y)  # tensordot promotes neither, NumPy's and JAX's do
            x, y = xp.astype(x, wide), xp.astype(y, wide)
        # a contraction, as optax's (XLA's dot, not a sum of products: another rounding)
        total = total + xp.tensordot(x, y, axes=x.ndim)
    return total


def sq_norm(a: Leaves) -> Any:
    total: Any = 0
    for x in a:
        total = total + backend.namespace(x).sum(x * x)
    return total


def add_scale(x: Leaves, s: Any, y: Leaves) -> Leaves:
    """``x + s y``, leaf by leaf."""
    return [a + s * b for a, b in zip(x, y, strict=True)]


def where(xp: Any, c: Any, a: Any, b: Any) -> Any:
    """``a`` where ``c`` holds, else ``b``: for scalars, lists of leaves and tuples of them."""
    if isinstance(a, (list, tuple)):
        return type(a)(where(xp, c, x, y) for x, y in zip(a, b, strict=True))
    return xp.where(c, a, b)


# --- control flow: Python on host arrays, jax.lax on traced ones -----------------------------

def _traced_tree(s: dict[str, Any]) -> bool:
    return any(_traced(v) for v in _leaves_of(s))


def _leaves_of(s: Any) -> Iterator[Any]:
    if isinstance(s, dict):
        for v in s.values():
            yield from _leaves_of(v)
    elif isinstance(s, (list, tuple)):
        for v in s:
            yield from _leaves_of(v)
    else:
        yield s


def _cast_like(new: Any, old: Any) -> Any:
    """``new`` with each leaf in its counterpart's dtype (a loop's carry keeps its types)."""
    if isinstance(new, dict):
        return {k: _cast_like(new[k], old[k]) for k in new}
    if isinstance(new, (list, tuple)):
        return type(new)(_cast_like(a, b) for a, b in zip(new, old, strict=True))
    xp = backend.namespace(old)
    return xp.astype(xp.asarray(new), old.dtype)


def while_loop(cond: Callable[[Any], Any], body: Callable[[Any], Any], s: Any) -> Any:
    """``while cond(s): s = body(s)``; ``jax.lax.while_loop`` where ``s`` is traced."""
    if _traced_tree(s):
        import jax

        return jax.lax.while_loop(cond, lambda x: _cast_like(body(x), x), s)
    while bool(cond(s)):
        s = body(s)
    return s


def if_else(pred: Any, yes: Callable[[Any], Any], no: Callable[[Any], Any], s: Any) -> Any:
    """``yes(s)`` if ``pred`` else ``no(s)``; ``jax.lax.cond`` where ``s`` is traced."""
    if _traced_tree(s) or _traced(pred):
        import jax

        return jax.lax.cond(pred, lambda x: _cast_like(yes(x), x),
                            lambda x: _cast_like(no(x), x), s)
    return yes(s) if bool(pred) else no(s)


# --- the step's extra arguments -----------------------------------------------------------

def _fn_kwargs(owner: str, value_fn: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """The step's extra arguments that ``value_fn`` takes (optax's rule); any other is an
    error, as in optax."""
    try:
        names = inspect.signature(value_fn).parameters
    except (TypeError, ValueError):  # a builtin or C function: hand it nothing
        names = {}  # type: ignore[assignment]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in names.values())
    kwargs = {k: v for k, v in extra.items() if k in names or takes_any}
    rest = sorted(k for k in extra if k not in kwargs)
    if rest:
        raise TypeError(f"{owner}: keyword arguments {rest} were passed to the step but "
                        "value_fn does not take them")
    return kwargs


def _needs(owner: str, value: Any, grad: Any, value_fn: Any) -> None:
    missing = [n for n, v in (("value", value), ("grad", grad), ("value_fn", value_fn))
               if v is None]
    if missing:
        raise ValueError(
            f"{owner} evaluates the objective: the step needs "
            f"{', '.join(m + '=' for m in missing)} (value: the loss at params, grad: its "
            "gradient, value_fn: the objective), e.g. uo.update(state, params, grads, "
            "value=loss, grad=grads, value_fn=f) or tx.update(grads, state, params, "
            "value=loss, grad=grads, value_fn=f)"
        )
    if not callable(value_fn):
        raise TypeError(f"{owner}: value_fn must be callable (params -> loss), got {value_fn!r}")


def grad_leaves(owner: str, grad: Any, treedef: Any, like: Leaves,
                what: str = "grad") -> Leaves:
    """The leaves of ``grad``, a tree like params or a flat list of their arrays, each an
    array of the params' library and shape (``like``: the params' leaves)."""
    n = len(like)
    leaves, g_def = flatten_leaves(grad)
    if g_def != treedef and not (isinstance(grad, (list, tuple)) and len(grad) == n):
        raise ValueError(f"{owner}: {what} must be a tree like params or a flat list of {n} "
                         f"arrays; params are {treedef}, {what} is {g_def}")
    if len(leaves) != n:
        raise ValueError(f"{owner}: {what} has {len(leaves)} arrays, params {n}")
    for i, (g, p) in enumerate(zip(leaves, like, strict=True)):
        if not backend.is_array(g) or backend.array_library(g) != backend.array_library(p):
            raise TypeError(f"{owner}: {what} for {leaf_names(treedef)[i]} is "
                            f"{type(g).__name__}, the params' {backend.library(p)} arrays")
        # (not its dtype: 16-bit params come here in the float32 they are computed in)
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(f"{owner}: {what} for {leaf_names(treedef)[i]} has shape "
                             f"{tuple(g.shape)}, the parameter {tuple(p.shape)}")
    return leaves


def evaluator(owner: str, value_fn: Callable[..., Any], kwargs: dict[str, Any], treedef: Any,
              like: Leaves, with_grad: bool) -> Callable[[Leaves], tuple[Any, Leaves | None]]:
    """A function of the leaves of a trial point: ``(loss, grad leaves)`` (``with_grad``) or
    ``(loss, None)``. ``value_fn`` returns the loss, or ``(loss, grads)``."""
    fn = functools.partial(value_fn, **kwargs) if kwargs else value_fn
    dt = like[0].dtype

    def loss_of(out: Any) -> Any:
        loss = out[0] if isinstance(out, tuple) else out
        if math.prod(getattr(loss, "shape", ())) != 1:
            raise ValueError(f"{owner}: value_fn's loss must be one number, got an array of "
                             f"shape {tuple(loss.shape)}")
        xp = backend.namespace(like[0])
        return xp.reshape(xp.asarray(loss, dtype=_real(xp, dt)), ())

    def evaluate(x: Leaves) -> tuple[Any, Leaves | None]:
        tree = unflatten(treedef, x)
        out = fn(tree)
        if isinstance(out, tuple) and len(out) == 2:
            return loss_of(out), (grad_leaves(owner, out[1], treedef, like,
                                              "value_fn's gradient") if with_grad else None)
        if not with_grad:
            return loss_of(out), None
        if backend.is_jax(like[0]):
            import jax

            loss, g = jax.value_and_grad(fn)(tree)
        elif backend.is_torch(like[0]):
            import torch

            g, loss = torch.func.grad_and_value(fn)(tree)
        else:
            raise TypeError(
                f"{owner} needs the gradient at trial points: on {backend.library(like[0])} "
                "arrays value_fn must return (loss, grads) (JAX and torch differentiate a "
                "value_fn that returns the loss alone)"
            )
        return loss_of(loss), grad_leaves(owner, g, treedef, like, "value_fn's gradient")

    return evaluate


def _real(xp: Any, dtype: Any) -> Any:
    return xp.real(xp.zeros((), dtype=dtype)).dtype


def _scalar(xp: Any, v: Any, dtype: Any, like: Any) -> Any:
    return backend.number(xp, v, dtype, like)


def _split(u: Any, params: Any) -> tuple[Leaves, Leaves, Any, Any]:
    us, treedef = flatten_leaves(u)
    ps, _ = flatten_leaves(params)
    return us, ps, treedef, backend.namespace(us[0])


# --- zoom ------------------------------------------------------------------------------------

def _cubicmin(xp: Any, a: Any, fa: Any, fpa: Any, b: Any, fb: Any, c: Any, fc: Any) -> Any:
    """The critical point of the cubic through ``(a, fa)``, ``(b, fb)``, ``(c, fc)`` with
    slope ``fpa`` at ``a`` (nan where there is none), as optax writes it: powers as products
    (XLA's integer powers), the 2 x 2 system as two sums of products."""
    big_c = fpa
    db = b - a
    dc = c - a
    dbdc = db * dc
    denom = (dbdc * dbdc) * (db - dc)
    r1 = fb - fa - big_c * db
    r2 = fc - fa - big_c * dc
    # the 2 x 2 system as one matrix product, as optax's (XLA's dot rounds as it does)
    d1 = xp.stack([xp.stack([dc * dc, -(db * db)]),
                   xp.stack([-(dc * (dc * dc)), db * (db * db)])])
    ab = xp.matmul(d1, xp.stack([r1, r2])) / denom
    big_a, big_b = ab[0], ab[1]
    radical = big_b * big_b - 3.0 * big_a * big_c
    return a + (-big_b + xp.sqrt(radical)) / (3.0 * big_a)


def _quadmin(a: Any, fa: Any, fpa: Any, b: Any, fb: Any) -> Any:
    """The critical point of the parabola through ``(a, fa)``, ``(b, fb)`` with slope ``fpa``
    at ``a``."""
    db = b - a
    big_b = (fb - fa - fpa * db) / (db * db)
    return a - fpa / (2.0 * big_b)


@dataclass(frozen=True)
class scale_by_zoom_linesearch(WholeTree):
    """A step size ``eta`` along ``-u`` meeting the strong Wolfe conditions, then
    ``u <- eta u`` (optax's ``scale_by_zoom_linesearch``, Nocedal & Wright algorithms 3.5 and
    3.6, with Hager & Zhang's approximate decrease). With ``f`` the objective, ``p`` the
    params, ``g = grad``, ``s0 = -<u, g>`` the initial slope, a step ``eta`` is accepted when

    * decrease: ``f(p - eta u) <= f(p) + slope_rtol eta s0`` or, near a minimum
      (``approx_dec_rtol`` not None, and ``f(p - eta u) <= f(p) + approx_dec_rtol |f(p)|``),
      ``s(eta) <= (2 slope_rtol - 1) s0``;
    * curvature: ``|s(eta)| <= curv_rtol |s0|``, ``s(eta) = -<u, grad f(p - eta u)>``;

    each up to ``tol``. The search starts at ``1`` (``initial_guess_strategy="one"``) or at
    the last step's ``eta`` (``"keep"``), multiplies it by ``increase_factor`` (capped at
    ``max_learning_rate``) until an interval holding an acceptable step is found, then
    narrows it by cubic, quadratic or bisection steps (the interval's ends ``stepsize_precision``
    apart: the best step with sufficient decrease is taken). After ``max_linesearch_steps``
    evaluations it takes the best step with sufficient decrease seen, else the last one.

    The step's extra arguments: ``value`` (``f(p)``), ``grad`` (``grad f(p)``) and
    ``value_fn`` (see :mod:`uniopt.transforms.linesearch`). The state keeps ``learning_rate``
    (``eta``), ``value`` and ``grad`` at the new point (the next step's ``value`` and
    ``grad``: :func:`uniopt.value_and_grad_from_state`), and the search's
    ``num_linesearch_steps``, ``decrease_error`` and ``curvature_error``. Defaults are
    optax's; optax's ``verbose`` printing is not kept.

    >>> import numpy as np, uniopt as uo
    >>> def f(p):  # the loss and its gradient
    ...     return float(((p["x"] - 3.0) ** 2).sum()), {"x": 2.0 * (p["x"] - 3.0)}
    >>> opt = uo.chain(uo.scale_by_lr(lr=1.0), uo.scale_by_zoom_linesearch(15))
    >>> params = {"x": np.zeros(2)}
    >>> state = uo.setup(opt, params)
    >>> loss, g = f(params)
    >>> state, params = uo.update(state, params, g, value=loss, grad=g, value_fn=f)
    >>> params["x"]
    array([3., 3.])
    """

    real_only = True

    max_linesearch_steps: int = 20
    max_learning_rate: float | None = None
    tol: float = static(0.0, NONNEG)
    increase_factor: float = static(2.0, _POSITIVE)
    slope_rtol: float = static(1e-4, _OPEN_UNIT)
    curv_rtol: float = static(0.9, _OPEN_UNIT)
    approx_dec_rtol: float | None = 1e-6
    stepsize_precision: float = static(1e-5, NONNEG)
    initial_guess_strategy: str = "keep"

    like_params: ClassVar[tuple[str, ...]] = ("grad",)
    reads_value: ClassVar[bool] = True
    uses_params: ClassVar[bool] = True
    makes_step: ClassVar[bool] = True
    whole_objective: ClassVar[bool] = True
    step_args: ClassVar[tuple[str, ...]] = ("value", "grad", "value_fn")
    # the step's other keywords go on to value_fn (optax's extra arguments), which says
    # which it does not take
    takes_any_keyword: ClassVar[bool] = True

    def check(self) -> None:
        _steps(self, "max_linesearch_steps")
        for name, valid in (("max_learning_rate", _POSITIVE), ("approx_dec_rtol", NONNEG)):
            object.__setattr__(self, name, check_real(self.name, name, getattr(self, name),
                                                      valid, none=""))
        if self.initial_guess_strategy not in ("one", "keep"):
            raise ValueError(f"{self.name}: initial_guess_strategy must be 'one' or 'keep', "
                             f"got {self.initial_guess_strategy!r}")

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return (tuple(shape),) * len(self.like_params)

    def init_tree(self, params: Any) -> dict[str, Any]:
        ps = [p for p in flatten_leaves(params)[0]]
        xp = backend.namespace(ps[0])
        dt = _real(xp, ps[0].dtype)
        return {"learning_rate": _scalar(xp, 1.0, dt, ps[0]),
                "value": _scalar(xp, math.inf, dt, ps[0]),
                "grad": [xp.zeros_like(p) for p in ps],
                "num_linesearch_steps": _scalar(xp, 0, xp.int32, ps[0]),
                "decrease_error": _scalar(xp, math.inf, dt, ps[0]),
                "curvature_error": _scalar(xp, math.inf, dt, ps[0])}

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any, value: Any = None,
                   grad: Any = None, value_fn: Any = None,
                   **extra: Any) -> tuple[Any, dict[str, Any]]:
        _needs(self.name, value, grad, value_fn)
        us, ps, treedef, xp = _split(u, params)
        kwargs = _fn_kwargs(self.name, value_fn, extra)
        g0 = grad_leaves(self.name, grad, treedef, ps)
        evaluate = evaluator(self.name, value_fn, kwargs, treedef, ps, with_grad=True)
        with backend.quiet():  # (a search meets inf and nan on purpose)
            out, new = self._search(xp, us, ps, g0, value, state, evaluate)
        return unflatten(treedef, out), new

    def _search(self, xp: Any, us: Leaves, ps: Leaves, g0: Leaves, value: Any,
                state: dict[str, Any], evaluate: Evaluate) -> tuple[Leaves, dict[str, Any]]:
        # the step's dtype (float32 for 16-bit params), the loss's at trial points: torch
        # mixes no dtypes in a product of matrices; the state keeps its own (_cast_like)
        dt = _real(xp, us[0].dtype)
        # optax's direction is the update to add: d = -u, negated exactly
        d = [-x for x in us]
        value_init = xp.reshape(xp.asarray(value, dtype=dt), ())
        slope_init = vdot(d, g0)
        guess = (_scalar(xp, 1.0, dt, ps[0]) if self.initial_guess_strategy == "one"
                 else xp.astype(state["learning_rate"], dt))
        zero, inf = _scalar(xp, 0.0, dt, ps[0]), _scalar(xp, math.inf, dt, ps[0])
        false = xp.asarray(False)
        s0 = {
            "count": _scalar(xp, 0, xp.int32, ps[0]),
            "stepsize": zero, "value": value_init, "grad": list(g0), "slope": slope_init,
            "decrease_error": inf, "curvature_error": inf, "error": inf,
            "interval_found": false, "done": false, "failed": false,
            "low": zero, "value_low": value_init, "slope_low": slope_init,
            "high": zero, "value_high": value_init, "slope_high": slope_init,
            "cubic_ref": zero, "value_cubic_ref": value_init,
            "safe_stepsize": zero, "safe_value": value_init, "safe_grad": list(g0),
        }
        tol, max_steps = self.tol, self.max_linesearch_steps

        def on_line(eta: Any) -> tuple[Any, Leaves, Any]:
            v, g = evaluate(add_scale(ps, eta, d))
            assert g is not None
            return v, g, vdot(g, d)

        def errors(eta: Any, v: Any, slope: Any) -> tuple[Any, Any, Any]:
            dec = v - value_init - self.slope_rtol * eta * slope_init
            if self.approx_dec_rtol is not None:
                approx = slope - (2 * self.slope_rtol - 1.0) * slope_init
                delta = v - value_init - self.approx_dec_rtol * xp.abs(value_init)
                dec = xp.minimum(xp.maximum(approx, delta), dec)
            dec = xp.maximum(dec, zero)
            dec = xp.where(xp.isnan(dec), inf, dec)
            curv = xp.abs(slope) - self.curv_rtol * xp.abs(slope_init)
            curv = xp.maximum(curv, zero)
            curv = xp.where(xp.isnan(curv), inf, curv)
            return dec, curv, xp.maximum(dec, curv)

        def search_interval(s: dict[str, Any]) -> dict[str, Any]:
            first = s["count"] == 0
            eta = xp.where(first, guess, self.increase_factor * s["stepsize"])
            if self.max_learning_rate is not None:
                cap = _scalar(xp, self.max_learning_rate, dt, ps[0])
                reached = eta >= cap
                eta = xp.minimum(eta, cap)
            else:
                reached = false
            v, g, slope = on_line(eta)
            dec, curv, err = errors(eta, v, slope)
            safe = where(xp, dec <= tol, [eta, v, g], [s["safe_stepsize"], s["safe_value"],
                                                      s["safe_grad"]])
            high_new = (dec > 0.0) | ((v >= s["value"]) & ~first)
            low_new = (slope >= 0.0) & ~high_new
            prev = [s["stepsize"], s["value"], s["slope"]]
            low, value_low, slope_low, high, value_high, slope_high = where(
                xp, low_new, [eta, v, slope, *prev], [*prev, eta, v, slope])
            found = high_new | low_new | (err <= tol)
            done = (err <= tol) | (reached & ~found)
            return {
                "count": s["count"] + 1, "stepsize": eta, "value": v, "grad": g,
                "slope": slope, "decrease_error": dec, "curvature_error": curv, "error": err,
                "interval_found": found, "done": done,
                "failed": (s["count"] + 1 >= max_steps) & ~done,
                "low": low, "value_low": value_low, "slope_low": slope_low,
                "high": high, "value_high": value_high, "slope_high": slope_high,
                "cubic_ref": low, "value_cubic_ref": value_low,
                "safe_stepsize": safe[0], "safe_value": safe[1], "safe_grad": safe[2],
            }

        def zoom(s: dict[str, Any]) -> dict[str, Any]:
            low, high = s["low"], s["high"]
            value_low, slope_low = s["value_low"], s["slope_low"]
            delta = xp.abs(high - low)
            left, right = xp.minimum(high, low), xp.maximum(high, low)
            cubic_chk, quad_chk = 0.2 * delta, 0.1 * delta
            too_small = delta <= self.stepsize_precision
            cubic = _cubicmin(xp, low, value_low, slope_low, high, s["value_high"],
                              s["cubic_ref"], s["value_cubic_ref"])
            use_cubic = (cubic > left + cubic_chk) & (cubic < right - cubic_chk)
            quad = _quadmin(low, value_low, slope_low, high, s["value_high"])
            use_quad = ~use_cubic & (quad > left + quad_chk) & (quad < right - quad_chk)
            use_bisection = ~use_cubic & ~use_quad
            middle = xp.where(use_cubic, cubic, s["cubic_ref"])
            middle = xp.where(use_quad, quad, middle)
            middle = xp.where(use_bisection, (low + high) / 2.0, middle)
            v, g, slope = on_line(middle)
            dec, curv, err = errors(middle, v, slope)
            better = (dec <= tol) & (v < s["safe_value"])
            safe = where(xp, better, [middle, v, g], [s["safe_stepsize"], s["safe_value"],
                                                      s["safe_grad"]])
            done = err <= tol
            high_to_middle = (dec > 0.0) | (v >= value_low)
            high_to_low = (slope * (high - low) >= 0.0) & ~high_to_middle
            new_high = where(xp, high_to_middle, [middle, v, slope],
                             [high, s["value_high"], s["slope_high"]])
            new_high = where(xp, high_to_low, [low, value_low, slope_low], new_high)
            new_low = where(xp, ~high_to_middle, [middle, v, slope], [low, value_low, slope_low])
            ref = where(xp, high_to_middle | high_to_low, [high, s["value_high"]],
                        [low, value_low])
            stop = (s["count"] + 1 >= max_steps) | (too_small & (safe[0] > 0.0))
            return {
                "count": s["count"] + 1, "stepsize": middle, "value": v, "grad": g,
                "slope": slope, "decrease_error": dec, "curvature_error": curv, "error": err,
                "interval_found": s["interval_found"], "done": done, "failed": stop & ~done,
                "low": new_low[0], "value_low": new_low[1], "slope_low": new_low[2],
                "high": new_high[0], "value_high": new_high[1], "slope_high": new_high[2],
                "cubic_ref": ref[0], "value_cubic_ref": ref[1],
                "safe_stepsize": safe[0], "safe_value": safe[1], "safe_grad": safe[2],
            }

        def safe_step(s: dict[str, Any]) -> dict[str, Any]:
            # out of steps: the best point with sufficient decrease, if any was met
            take = (s["safe_stepsize"] > 0.0) | xp.isinf(s["decrease_error"])
            eta, v, g = where(xp, take, [s["safe_stepsize"], s["safe_value"], s["safe_grad"]],
                              [s["stepsize"], s["value"], s["grad"]])
            return {**s, "stepsize": eta, "value": v, "grad": g}

        def step(s: dict[str, Any]) -> dict[str, Any]:
            s = if_else(s["interval_found"], zoom, search_interval, s)
            return if_else(s["failed"], safe_step, lambda x: x, s)

        final = while_loop(lambda s: ~(s["done"] | s["failed"]), step, s0)
        eta = final["stepsize"]
        new = {"learning_rate": eta, "value": final["value"], "grad": final["grad"],
               "num_linesearch_steps": final["count"],
               "decrease_error": final["decrease_error"],
               "curvature_error": final["curvature_error"]}
        return [eta * x for x in us], _cast_like(new, state)


# --- backtracking ----------------------------------------------------------------------------

@dataclass(frozen=True)
class scale_by_backtracking_linesearch(WholeTree):
    """The largest ``eta`` in ``eta0, decrease_factor eta0, ...`` with sufficient decrease
    (Armijo), then ``u <- eta u`` (optax's ``scale_by_backtracking_linesearch``): with ``f``
    the objective, ``p`` the params, ``g = grad``, accept ``eta`` when

    ``f(p - eta u) <= (1 + rtol) f(p) - eta slope_rtol <u, g> + atol``.

    ``eta0 = min(increase_factor eta_prev, max_learning_rate)`` (``eta_prev``: the last step's,
    1 at first); at most ``max_backtracking_steps`` reductions. A trial whose decrease is not
    finite (inf or nan, outside the objective's domain) at the end gives ``eta = 0``: no step.
    ``store_grad``: keep the gradient at the new point in the state (``value_fn`` then also
    gives the gradient: see :mod:`uniopt.transforms.linesearch`), for
    :func:`uniopt.value_and_grad_from_state`. The state keeps ``learning_rate``, ``value``
    (at the new point), ``grad`` (with ``store_grad``), ``num_linesearch_steps`` and
    ``decrease_error``. Defaults are optax's (which has no default for
    ``max_backtracking_steps``); optax's ``verbose`` printing is not kept.
    """

    max_backtracking_steps: int = 15
    slope_rtol: float = static(1e-4, _OPEN_UNIT)
    decrease_factor: float = static(0.8, _OPEN_UNIT)
    increase_factor: float = static(1.5, _POSITIVE)
    max_learning_rate: float = static(1.0, _POSITIVE)
    atol: float = static(0.0, NONNEG)
    rtol: float = static(0.0, NONNEG)
    store_grad: bool = False

    like_params: ClassVar[tuple[str, ...]] = ("grad",)
    reads_value: ClassVar[bool] = True
    uses_params: ClassVar[bool] = True
    makes_step: ClassVar[bool] = True
    whole_objective: ClassVar[bool] = True
    step_args: ClassVar[tuple[str, ...]] = ("value", "grad", "value_fn")
    # the step's other keywords go on to value_fn (optax's extra arguments), which says
    # which it does not take
    takes_any_keyword: ClassVar[bool] = True

    def check(self) -> None:
        _steps(self, "max_backtracking_steps", least=0)
        if not isinstance(self.store_grad, bool):
            raise ValueError(f"{self.name}: store_grad must be True or False, got "
                             f"{self.store_grad!r}")

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return (tuple(shape),) * self.store_grad

    def init_tree(self, params: Any) -> dict[str, Any]:
        ps = [p for p in flatten_leaves(params)[0]]
        xp = backend.namespace(ps[0])
        dt = _real(xp, ps[0].dtype)
        out = {"learning_rate": _scalar(xp, 1.0, dt, ps[0]),
               "value": _scalar(xp, math.inf, dt, ps[0]),
               "num_linesearch_steps": _scalar(xp, 0, xp.int32, ps[0]),
               "decrease_error": _scalar(xp, math.inf, dt, ps[0])}
        if self.store_grad:
            out["grad"] = [xp.zeros_like(p) for p in ps]
        return out

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any, value: Any = None,
                   grad: Any = None, value_fn: Any = None,
                   **extra: Any) -> tuple[Any, dict[str, Any]]:
        _needs(self.name, value, grad, value_fn)
        us, ps, treedef, xp = _split(u, params)
        kwargs = _fn_kwargs(self.name, value_fn, extra)
        g0 = grad_leaves(self.name, grad, treedef, ps)
        evaluate = evaluator(self.name, value_fn, kwargs, treedef, ps,
                             with_grad=self.store_grad)
        with backend.quiet():  # (a search meets inf and nan on purpose)
            out, new = self._search(xp, us, ps, g0, value, state, evaluate)
        return unflatten(treedef, out), new

    def _search(self, xp: Any, us: Leaves, ps: Leaves, g0: Leaves, value: Any,
                state: dict[str, Any], evaluate: Callable[[Leaves], tuple[Any, Any]],
                ) -> tuple[Leaves, dict[str, Any]]:
        dt = _real(xp, us[0].dtype)  # the step's, as the zoom search's
        d = [-x for x in us]
        value = xp.reshape(xp.asarray(value, dtype=dt), ())
        slope = vdot(d, g0)
        zero, inf = _scalar(xp, 0.0, dt, ps[0]), _scalar(xp, math.inf, dt, ps[0])
        eta0 = xp.minimum(self.increase_factor * state["learning_rate"],
                          _scalar(xp, self.max_learning_rate, dt, ps[0]))
        s0 = {"learning_rate": eta0, "new_value": value,
              "new_grad": [xp.zeros_like(p) for p in ps] if self.store_grad else [],
              "decrease_error": inf, "iter_num": _scalar(xp, 0, xp.int32, ps[0])}
        max_steps = self.max_backtracking_steps

        def body(s: dict[str, Any]) -> dict[str, Any]:
            eta = xp.where(s["iter_num"] > 0, self.decrease_factor * s["learning_rate"],
                           s["learning_rate"])
            v, g = evaluate(add_scale(ps, eta, d))
            dec = v - (1.0 + self.rtol) * value - eta * self.slope_rtol * slope
            dec = xp.maximum(xp.where(xp.isnan(dec), inf, dec), zero)
            new_grad = s["new_grad"]
            if self.store_grad:
                # kept where the search ends, as optax transposes its linearisation there
                end = (dec <= self.atol) | (s["iter_num"] == max_steps)
                new_grad = where(xp, end, g, new_grad)
            return {"learning_rate": eta, "new_value": v, "new_grad": new_grad,
                    "decrease_error": dec, "iter_num": s["iter_num"] + 1}

        final = while_loop(
            lambda s: ~(s["decrease_error"] <= self.atol) & (s["iter_num"] <= max_steps),
            body, s0)
        eta = xp.where(xp.isinf(final["decrease_error"]), zero, final["learning_rate"])
        new = {"learning_rate": eta, "value": final["new_value"],
               "num_linesearch_steps": final["iter_num"],
               "decrease_error": final["decrease_error"]}
        if self.store_grad:
            new["grad"] = final["new_grad"]
        return [eta * x for x in us], _cast_like(new, state)


def _steps(t: Any, name: str, least: int = 1) -> None:
    object.__setattr__(t, name, check_integer(t.name, name, getattr(t, name), least))
