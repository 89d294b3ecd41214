"""L-BFGS in optax's form: the two-loop recursion as a block, the line search as another.

:func:`uniopt.lbfgs` is torch's L-BFGS: a :class:`~uniopt.base.Minimizer` that runs several
iterations per step through a closure (:func:`uniopt.minimize_step`). optax writes the same
method as a chain, ``chain(scale_by_lbfgs, scale(-lr), scale_by_zoom_linesearch)``, one
iteration per ``update`` with the objective passed as the step's extra arguments; that is
:class:`lbfgs_linesearch` here, built from :class:`scale_by_lbfgs` and a line-search block of
:mod:`uniopt.transforms.linesearch`. Its state is a pytree of arrays: a whole step runs under
``jax.jit`` (one compile).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .. import backend
from ..base import Info, Rule, Transform, WholeTree
from ..hyper import NONNEG, _traced, check_integer, hyper
from ..transforms.linesearch import (
    evaluator,
    scale_by_backtracking_linesearch,
    scale_by_zoom_linesearch,
    sq_norm,
    vdot,
)
from ..transforms.scale import scale_by_lr
from ..tree import flatten_leaves, unflatten


@dataclass(frozen=True)
class scale_by_lbfgs(WholeTree):
    """``u <- H u``, ``H`` the L-BFGS inverse-Hessian estimate from the last ``memory_size``
    pairs ``dp = p - p_prev``, ``du = u - u_prev`` (the incoming ``u``: the gradient at the
    head of a chain), over the whole tree at once (optax's ``scale_by_lbfgs``).

    Each step first stores the new pair with weight ``rho = 1/<du, dp>`` (0 where that is 0,
    and on the first step, where there is no pair), dropping the oldest, then runs the
    two-loop recursion (Nocedal & Wright, algorithm 7.4): from the newest pair to the oldest,
    ``a_i = rho_i <dp_i, q>``, ``q <- q - a_i du_i``; ``r = gamma q``; from the oldest to the
    newest, ``b_i = rho_i <du_i, r>``, ``r <- r + (a_i - b_i) dp_i``. ``gamma``, with
    ``scale_init_precond``: ``<du, dp>/<du, du>`` of the newest pair (1 if ``du = 0``), and on
    the first step ``min(1, 1/|u|)`` (a first step no longer than 1); without it, 1.

    The state: ``count``, the last ``params`` and ``updates``, the pairs stacked oldest first
    along a leading axis of ``memory_size`` (``diff_params_memory``,
    ``diff_updates_memory``) and their ``weights_memory``. optax keeps the pairs in a ring
    indexed by the step; here the stack shifts, which visits the pairs in the same order, so
    the numbers are optax's.
    """

    real_only = True

    memory_size: int = 10
    scale_init_precond: bool = True

    like_params: ClassVar[tuple[str, ...]] = ("params", "updates")
    uses_params: ClassVar[bool] = True

    def check(self) -> None:
        object.__setattr__(self, "memory_size",
                           check_integer(self.name, "memory_size", self.memory_size, 1))
        if not isinstance(self.scale_init_precond, bool):
            raise ValueError(f"{self.name}: scale_init_precond must be True or False, got "
                             f"{self.scale_init_precond!r}")

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        # the params and updates, and the history of their differences
        return (tuple(shape),) * 2 + ((self.memory_size, *shape),) * 2

    def init_tree(self, params: Any) -> dict[str, Any]:
        ps = flatten_leaves(params)[0]
        xp = backend.namespace(ps[0])
        dt = xp.real(xp.zeros((), dtype=ps[0].dtype)).dtype
        # stacked from each leaf's zeros: on its device, a sharded leaf's history split as it
        stacked = [xp.stack([xp.zeros_like(p)] * self.memory_size) for p in ps]
        return {"count": backend.number(xp, 0, xp.int32, ps[0]),
                "params": [xp.zeros_like(p) for p in ps],
                "updates": [xp.zeros_like(p) for p in ps],
                "diff_params_memory": stacked,
                "diff_updates_memory": [xp.zeros_like(s) for s in stacked],
                "weights_memory": backend.number(xp, [0.0] * self.memory_size, dt, ps[0])}

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any,
                   **extra: Any) -> tuple[Any, dict[str, Any]]:
        with np.errstate(all="ignore"):  # 1/|u| at u = 0 is inf on purpose: min(1, inf) = 1
            return self._apply(u, state, params)

    def _apply(self, u: Any, state: Any, params: Any) -> tuple[Any, dict[str, Any]]:
        us, treedef = flatten_leaves(u)
        ps = flatten_leaves(params)[0]
        xp = backend.namespace(us[0])
        s = state
        later = s["count"] > 0
        dp = [p - q for p, q in zip(ps, s["params"], strict=True)]
        du = [a - b for a, b in zip(us, s["updates"], strict=True)]
        curv = vdot(du, dp)
        zero = xp.zeros_like(curv)
        weight = xp.where(curv == 0.0, zero, 1.0 / xp.where(curv == 0.0, zero + 1.0, curv))
        # no pair before the first step: zeros, which the recursion passes through unchanged
        dp = [xp.where(later, x, xp.zeros_like(x)) for x in dp]
        du = [xp.where(later, x, xp.zeros_like(x)) for x in du]
        weight = xp.where(later, weight, zero)
        mem_p = [_push(xp, m, x) for m, x in zip(s["diff_params_memory"], dp, strict=True)]
        mem_u = [_push(xp, m, x) for m, x in zip(s["diff_updates_memory"], du, strict=True)]
        rhos = _push(xp, s["weights_memory"], xp.astype(weight, s["weights_memory"].dtype))
        if self.scale_init_precond:
            num, den = vdot(du, dp), sq_norm(du)
            gamma = xp.where(den > 0.0, num / xp.where(den > 0.0, den, zero + 1.0), zero + 1.0)
            first = xp.minimum(zero + 1.0, 1.0 / xp.sqrt(sq_norm(us)))
            gamma = xp.where(later, gamma, first)
        else:
            gamma = 1.0
        q = list(us)
        alphas: list[Any] = [None] * self.memory_size
        for i in reversed(range(self.memory_size)):
            # (m[i, ...]: the array API indexes every axis; array_api_strict refuses m[i])
            dp_i, du_i = [m[i, ...] for m in mem_p], [m[i, ...] for m in mem_u]
            alphas[i] = rhos[i] * vdot(dp_i, q)
            q = [a + (-alphas[i]) * b for a, b in zip(q, du_i, strict=True)]
        r = [gamma * x for x in q]
        for i in range(self.memory_size):
            dp_i, du_i = [m[i, ...] for m in mem_p], [m[i, ...] for m in mem_u]
            beta = rhos[i] * vdot(du_i, r)
            r = [a + (alphas[i] - beta) * b for a, b in zip(r, dp_i, strict=True)]
        r = [x if x.dtype == u0.dtype else xp.astype(x, u0.dtype) for x, u0 in
             zip(r, us, strict=True)]
        # copies: an in-place step writes the params it was handed
        # NumPy's 0-d arithmetic hands back a scalar: the state keeps arrays (checkpoints)
        count = xp.asarray(s["count"] + 1, dtype=xp.int32, device=backend.device(s["count"]))
        # copies outside autograd's graph (of params that require grad: torch's asarray
        # would keep requires_grad)
        new = {"count": count, "params": [backend.detached_copy(p) for p in ps],
               "updates": [backend.detached_copy(x) for x in us],
               "diff_params_memory": mem_p, "diff_updates_memory": mem_u,
               "weights_memory": rhos}
        return unflatten(treedef, r), new


def _push(xp: Any, stack: Any, x: Any) -> Any:
    """``stack`` with its oldest entry (first) dropped and ``x`` appended."""
    return xp.concat([stack[1:, ...], xp.expand_dims(xp.astype(x, stack.dtype), axis=0)], axis=0)


@dataclass(frozen=True)
class lbfgs_linesearch(Rule):
    r"""L-BFGS in optax's form (``optax.lbfgs``): one iteration per step, the line search a
    block of the chain, ``chain(scale_by_lbfgs(memory_size, scale_init_precond),
    scale_by_lr(lr), linesearch)``; the step ``p <- p - eta lr H g`` with ``H g`` the two-loop
    recursion (:class:`scale_by_lbfgs`) and ``eta`` the line search's. At step ``t``, with
    inner products over the whole tree and the last ``memory_size`` pairs
    ``(s_i, y_i) = (p_i - p_{i-1}, g_i - g_{i-1})``, ``rho_i = 1/<y_i, s_i>`` (0 where that is
    0):

    $$
    \begin{aligned}
    q &\leftarrow g_t; \quad \text{for } i \text{ newest to oldest: }
    \alpha_i = \rho_i \langle s_i, q \rangle, \quad q \leftarrow q - \alpha_i\, y_i \\
    r &\leftarrow \gamma_t\, q, \qquad
    \gamma_t = \frac{\langle y, s \rangle}{\langle y, y \rangle} \text{ (newest pair)},
    \quad \gamma_1 = \min\left(1, \frac{1}{\lVert g_1 \rVert}\right) \\
    &\text{for } i \text{ oldest to newest: }
    r \leftarrow r + \left(\alpha_i - \rho_i \langle y_i, r \rangle\right) s_i \\
    p_t &= p_{t-1} - \eta_t\, \mathrm{lr}\, r
    \end{aligned}
    $$

    (``scale_init_precond=False``: ``gamma_t = 1``.)

    Each step takes the step's extra arguments, as optax's does::

        state, params = uo.update(state, params, grads, value=loss, grad=grads, value_fn=f)

    (or ``tx.update(grads, state, params, value=loss, grad=grads, value_fn=f)``, the optax
    protocol). ``value_fn(params)`` returns the loss (on JAX and torch: it is differentiated)
    or ``(loss, grads)`` (NumPy); see :mod:`uniopt.transforms.linesearch`. The line search
    stores the value and gradient at the new point, which the next step may reuse:
    :func:`uniopt.value_and_grad_from_state`.

    Options (defaults optax's):

    * ``lr``: a factor on the direction before the line search (optax's ``learning_rate``;
      its default None is 1 here), a number or a schedule.
    * ``memory_size``: the pairs kept (10).
    * ``scale_init_precond``: scale the initial inverse Hessian (True), see
      :class:`scale_by_lbfgs`.
    * ``linesearch``: a line-search block, default
      ``scale_by_zoom_linesearch(max_linesearch_steps=20, initial_guess_strategy="one")``,
      or :class:`~uniopt.scale_by_backtracking_linesearch`, or None (no line search: a step
      of ``lr`` along ``H g``).

    Why a rule of its own and not ``lbfgs(convention="optax")``: :class:`uniopt.lbfgs` is a
    closure-driven :class:`~uniopt.base.Minimizer` (several iterations and its own line search
    inside one :func:`uniopt.minimize_step`), this one a chain stepped by :func:`uniopt.update`
    with the objective as the step's arguments. They share no option but the memory (torch's
    ``history_size``, optax's ``memory_size``) and not the way they are driven, so a
    convention, which may only set a rule's own options, cannot turn one into the other.

    Matches ``optax.lbfgs`` (float64, x64) to rounding: optax's dot products are XLA's, summed
    in another order, and the line search's decisions are the same on the same numbers.

    >>> import numpy as np, uniopt as uo
    >>> def f(p):  # (loss, grads): NumPy has no autodiff
    ...     x = p["x"]
    ...     return float(((x - 3.0) ** 2).sum()), {"x": 2.0 * (x - 3.0)}
    >>> params = {"x": np.zeros(2)}
    >>> state = uo.setup(uo.lbfgs_linesearch(), params)
    >>> for _ in range(3):
    ...     loss, g = uo.value_and_grad_from_state(f, params, state)
    ...     state, params = uo.update(state, params, g, value=loss, grad=g, value_fn=f)
    >>> params["x"]
    array([3., 3.])
    """

    lr: Any = hyper(1.0, NONNEG)
    memory_size: int = 10
    scale_init_precond: bool = True
    linesearch: Transform | None = field(default=scale_by_zoom_linesearch(
        max_linesearch_steps=20, initial_guess_strategy="one"))

    info: ClassVar[Info] = Info(
        family="quasi-newton",
        paper="Liu & Nocedal (1989)",
        references=("optax.lbfgs",),
        example={},
        budget=100,
        needs_closure=False,
        complex=False,
        backends=("numpy", "torch", "jax"),
        rtol=1e-10,  # optax's dot products are XLA's, summed in another order
    )

    def check(self) -> None:
        object.__setattr__(self, "memory_size",
                           check_integer(self.name, "memory_size", self.memory_size, 1))
        scale_by_lbfgs(memory_size=self.memory_size, scale_init_precond=self.scale_init_precond)
        if self.linesearch is not None and not isinstance(
                self.linesearch, (scale_by_zoom_linesearch, scale_by_backtracking_linesearch)):
            raise ValueError(
                f"{self.name}: linesearch must be uo.scale_by_zoom_linesearch(...), "
                f"uo.scale_by_backtracking_linesearch(...) or None, got {self.linesearch!r}")

    def parts(self) -> tuple[Transform, ...]:
        head = (scale_by_lbfgs(memory_size=self.memory_size,
                               scale_init_precond=self.scale_init_precond),
                scale_by_lr(lr=self.lr))
        return head if self.linesearch is None else (*head, self.linesearch)


def value_and_grad_from_state(value_fn: Any, params: Any, state: Any,
                              **kwargs: Any) -> tuple[Any, Any]:
    """The loss and gradient at ``params`` that the last step's line search stored in
    ``state`` (it evaluated them at the point it chose, which is ``params`` now), or, before
    the first step or where it stored none that is finite, ``value_fn(params, **kwargs)``
    (optax's ``value_and_grad_from_state``). ``value_fn`` returns ``(loss, grads)``; on JAX
    it may return the loss alone (it is differentiated). Under ``jax.jit`` both branches are
    traced and ``jax.lax.cond`` takes one.
    """
    trees = getattr(state, "tree_states", None)
    if trees is None:
        raise TypeError(f"value_and_grad_from_state: expected a uniopt State, got {state!r}")
    stored = [t for t in trees.values() if isinstance(t, dict) and "value" in t and "grad" in t]
    if len(stored) != 1:
        raise ValueError("value_and_grad_from_state: the state must hold exactly one line "
                         f"search that keeps the value and gradient; it holds {len(stored)}")
    leaves, treedef = flatten_leaves(params)
    evaluate = evaluator("value_and_grad_from_state", value_fn, kwargs, treedef, leaves,
                         with_grad=True)
    value, grad = stored[0]["value"], stored[0]["grad"]

    def compute(_: Any) -> Any:
        v, g = evaluate(leaves)
        return v, g

    xp = backend.namespace(value)
    known = ~(xp.isinf(value) | xp.isnan(value))
    if _traced(value) or _traced(known):
        import jax

        v, g = jax.lax.cond(known, lambda _: (value, list(grad)), compute, None)
    elif bool(known):
        v, g = value, list(grad)
    else:
        v, g = compute(None)
    return v, unflatten(treedef, g)

