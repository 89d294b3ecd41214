"""MoMo (Schaipp et al., 2023): momentum models with a Polyak-type step size, for SGD with
momentum and for Adam.

The step size ``min(lr, <the model's step>)`` comes from inner products over the whole tree
(the averaged gradient with the params, its squared norm) and from the averaged loss, so each
rule is one whole-tree part: its tree state holds the per-leaf averages and the scalars (the
averaged loss, the averaged ``<g, p>``, the lower bound of the loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .. import backend
from ..base import Info, Rule, Transform, WholeTree
from ..hyper import NONNEG, UNIT_OPEN, Interval, hyper, on_host, static
from ..tree import flatten_leaves, unflatten
from .schedule_free import arrays, as_dtype, kept, scalar_like

ANY = Interval(None)
# optax's floor on the squared norm, jnp.finfo(float).eps: float64's, whatever the params' type
TINY = float(np.finfo(np.float64).eps)


def _needs_value(name: str, extra: dict[str, Any]) -> Any:
    value = extra.get("value")
    if value is None:
        raise TypeError(
            f"{name} reads the loss of each step: pass it as uo.update(state, params, grads, "
            "value=loss), or as tx.update(grads, state, params, value=loss) (in an "
            "optax.chain, which hands value= only to members of its extra-arguments kind, "
            "as uo.to_optax(...) wraps it)")
    return value


def _dot(xp: Any, xs: list[Any], ys: list[Any], like: Any) -> Any:
    """``sum_i <x_i, y_i>`` over the leaves, as a 0-d array of ``like``'s dtype."""
    out = xp.zeros_like(like)
    for x, y in zip(xs, ys, strict=True):
        out = out + xp.sum(xp.astype(x * y, like.dtype))
    return out


def _step_size(xp: Any, c: Any, barf: Any, gamma: Any, lb: Any, iprod: Any, norm: Any,
               bc1: Any, adapt: bool) -> tuple[Any, Any]:
    """MoMo's ``(tau, lb)``: the step along the (preconditioned) average and the next lower
    bound, as optax computes them (``bc1 = 1`` for plain MoMo)."""
    def number(x: Any) -> Any:
        return xp.asarray(x, dtype=norm.dtype, device=backend.device(norm))

    shrink = 1.0 + c.lr_wd
    if adapt:
        cap = shrink * (barf - gamma) + iprod
        lb = xp.where(cap < shrink * bc1 * lb,
                      xp.maximum(cap / (2.0 * bc1 * shrink), number(c.lower_bound)),
                      lb)
    tiny = norm <= TINY
    gap = xp.maximum(shrink * (barf - bc1 * lb - gamma) + iprod, xp.zeros_like(norm))
    t1 = xp.where(tiny, xp.zeros_like(norm), gap / xp.where(tiny, xp.ones_like(norm), norm))
    tau = xp.minimum(number(c.lr / bc1), t1)
    if adapt:
        lb = xp.maximum(((barf + iprod - gamma) - 0.5 * tau * norm) / bc1, number(c.lower_bound))
    return tau, lb


class MomoCoeffs(NamedTuple):
    lr: Any
    lr_wd: Any  # lr*weight_decay
    decay: Any  # (lr*wd)/(1 + lr*wd): the params' share in the update
    beta: Any  # 0 at the first update: the averages start at the first values
    one_minus_beta: Any
    lower_bound: Any


@dataclass(frozen=True)
class scale_by_momo(WholeTree):
    """MoMo's step for SGD with momentum, optax's ``contrib.momo`` (with ``f`` the step's loss,
    ``value=``, and averages over the whole tree; each average starts at its first value):

    ``f_bar <- beta*f_bar + (1-beta)*f``; ``m <- beta*m + (1-beta)*g``;
    ``gamma <- beta*gamma + (1-beta)*<g, p>``;
    ``tau = min(lr, max((1 + lr*wd)*(f_bar - lb - gamma) + <m, p>, 0)/|m|^2)`` (0 where
    ``|m|^2`` is at most float64's machine epsilon);
    ``u = (lr*wd)/(1 + lr*wd)*p + tau*m``.

    ``adapt_lower_bound``: ``lb`` (starting at ``lower_bound``) follows the paper's online
    estimate, never below ``lower_bound``. Tree state: ``exp_avg`` (one array per leaf),
    ``barf``, ``gamma``, ``lb``."""

    real_only = True

    lr: Any = hyper(1.0, NONNEG)
    beta: Any = hyper(0.9, UNIT_OPEN)
    lower_bound: Any = static(0.0, ANY)
    weight_decay: Any = hyper(0.0, NONNEG)
    adapt_lower_bound: bool = False

    like_params: ClassVar[tuple[str, ...]] = ("exp_avg",)
    uses_params: ClassVar[bool] = True
    makes_step: ClassVar[bool] = True
    reads_value: ClassVar[bool] = True
    step_args: ClassVar[tuple[str, ...]] = ("value",)

    def coeffs(self, step: Any) -> MomoCoeffs:
        # (1 or 0 in the count's own type: a count on the device, capturable=True, made a bool
        # tensor, which torch refuses to subtract from 1.0)
        later = (step - step) + (step != 0)
        lr_wd = self.lr * self.weight_decay
        return MomoCoeffs(lr=self.lr, lr_wd=lr_wd, decay=lr_wd / (1.0 + lr_wd),
                          beta=later * self.beta,
                          one_minus_beta=(1.0 - later) + later * self.one_minus("beta"),
                          lower_bound=self.lower_bound)

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return (tuple(shape),) * len(self.like_params)

    def init_tree(self, params: Any) -> dict[str, Any]:
        leaves, _ = flatten_leaves(params)
        # (each number its own array: jax.jit's donate_argnums refuses one buffer twice)
        return {"exp_avg": [backend.namespace(p).zeros_like(p) for p in leaves],
                "barf": scalar_like(leaves, 0.0), "gamma": scalar_like(leaves, 0.0),
                "lb": scalar_like(leaves, on_host(self.lower_bound))}

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any,
                   **extra: Any) -> tuple[Any, Any]:
        value = _needs_value(self.name, extra)
        gs, treedef = flatten_leaves(u)
        ps, _ = flatten_leaves(params)
        barf0 = state["barf"]
        xp = backend.namespace(barf0)
        f = backend.loss_like(value, barf0)
        barf = c.beta * barf0 + c.one_minus_beta * f
        ms = [as_dtype(c.beta, g) * m + as_dtype(c.one_minus_beta, g) * g
              for m, g in zip(state["exp_avg"], gs, strict=True)]
        gamma = c.beta * state["gamma"] + c.one_minus_beta * _dot(xp, gs, ps, barf0)
        norm = _dot(xp, ms, ms, barf0)
        iprod = _dot(xp, ms, ps, barf0)
        tau, lb = _step_size(xp, c, barf, gamma, state["lb"], iprod, norm, 1.0,
                             self.adapt_lower_bound)
        out = [as_dtype(c.decay, p) * p + as_dtype(tau, m) * m
               for m, p in zip(ms, ps, strict=True)]
        return unflatten(treedef, out), {
            "exp_avg": arrays(ms, state["exp_avg"]), "barf": kept(xp, barf, barf0),
            "gamma": kept(xp, gamma, barf0), "lb": kept(xp, lb, barf0)}


@dataclass(frozen=True)
class momo(Rule):
    r"""MoMo (Schaipp et al., 2023) as ``optax.contrib.momo``: SGD with momentum whose step
    size is ``min(lr, <a Polyak-type step from a model of the loss>)``
    (:class:`scale_by_momo`), with the decay ``p <- p/(1 + lr*weight_decay)`` folded in. With
    ``f_t`` the loss at ``p_{t-1}``, ``lambda = weight_decay``, ``lb`` the lower bound,
    inner products and norms over the whole tree, and each average starting at its first
    value (``beta = 0`` at ``t = 1``):

    $$
    \begin{aligned}
    \bar f_t &= \beta \bar f_{t-1} + (1 - \beta)\, f_t, \qquad
    m_t = \beta\, m_{t-1} + (1 - \beta)\, g_t \\
    \gamma_t &= \beta\, \gamma_{t-1} + (1 - \beta) \langle g_t, p_{t-1} \rangle \\
    \tau_t &= \min\left(\mathrm{lr},\ \frac{\max\left((1 + \mathrm{lr}\,\lambda)
    (\bar f_t - \mathrm{lb} - \gamma_t) + \langle m_t, p_{t-1} \rangle,\ 0\right)}
    {\lVert m_t \rVert^2}\right) \\
    p_t &= \frac{p_{t-1}}{1 + \mathrm{lr}\,\lambda} - \tau_t\, m_t
    \end{aligned}
    $$

    (``tau_t = 0`` where ``|m_t|^2`` is at most float64's machine epsilon.)

    Each step needs the loss: ``uo.update(state, params, grads, value=loss)``.
    ``lower_bound`` must be a lower bound of the loss (0 for most losses);
    ``adapt_lower_bound=True`` estimates one on the fly, never below ``lower_bound``. Names
    and defaults are optax's (``lr`` is its ``learning_rate``, 1.0; a schedule is read at the
    step's number, 0 first). The scalars of the state are kept in the params' widest float
    type, float32 at least (optax: the narrowest). Matches optax 0.2.8 to rounding.
    """

    lr: Any = hyper(1.0, NONNEG)
    beta: Any = hyper(0.9, UNIT_OPEN)
    lower_bound: Any = static(0.0, ANY)
    weight_decay: Any = hyper(0.0, NONNEG)
    adapt_lower_bound: bool = False

    info: ClassVar[Info] = Info(
        family="polyak",
        paper="Schaipp et al. (2023)",
        references=("optax.contrib.momo",),
        example={"lr": 1.0},
        complex=False,
    )

    def parts(self) -> tuple[Transform, ...]:
        return (scale_by_momo(lr=self.lr, beta=self.beta, lower_bound=self.lower_bound,
                              weight_decay=self.weight_decay,
                              adapt_lower_bound=self.adapt_lower_bound),)


class MomoAdamCoeffs(NamedTuple):
    lr: Any
    lr_wd: Any
    decay: Any
    b1: Any
    one_minus_b1: Any
    b2: Any
    one_minus_b2: Any
    bc1: Any  # 1 - b1^t
    bc2: Any  # 1 - b2^t
    eps: Any
    lower_bound: Any


@dataclass(frozen=True)
class scale_by_momo_adam(WholeTree):
    """MoMo's step for Adam, optax's ``contrib.momo_adam`` (``f`` the step's loss):

    ``f_bar <- b1*f_bar + (1-b1)*f``; ``m <- b1*m + (1-b1)*g``; ``v <- b2*v + (1-b2)*g^2``;
    ``d = eps + sqrt(v/(1-b2^t))``; ``gamma <- b1*gamma + (1-b1)*<g, p>``;
    ``tau = min(lr/bc1, max((1 + lr*wd)*(f_bar - bc1*lb - gamma) + <m, p>, 0)/<m, m/d>)``
    with ``bc1 = 1 - b1^t`` (0 where ``<m, m/d>`` is at most float64's machine epsilon);
    ``u = (lr*wd)/(1 + lr*wd)*p + tau*m/d``. ``adapt_lower_bound`` as :class:`scale_by_momo`.
    Tree state: ``exp_avg``, ``exp_avg_sq`` (one array per leaf each), ``barf``, ``gamma``,
    ``lb``."""

    real_only = True

    lr: Any = hyper(1e-2, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    lower_bound: Any = static(0.0, ANY)
    weight_decay: Any = hyper(0.0, NONNEG)
    adapt_lower_bound: bool = False

    like_params: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")
    uses_params: ClassVar[bool] = True
    makes_step: ClassVar[bool] = True
    reads_value: ClassVar[bool] = True
    step_args: ClassVar[tuple[str, ...]] = ("value",)

    def coeffs(self, step: Any) -> MomoAdamCoeffs:
        t = step + 1.0  # a float first: JAX divides int32 in float32
        lr_wd = self.lr * self.weight_decay
        return MomoAdamCoeffs(lr=self.lr, lr_wd=lr_wd, decay=lr_wd / (1.0 + lr_wd),
                              b1=self.b1, one_minus_b1=self.one_minus("b1"), b2=self.b2,
                              one_minus_b2=self.one_minus("b2"), bc1=1.0 - self.b1 ** t,
                              bc2=1.0 - self.b2 ** t, eps=self.eps,
                              lower_bound=self.lower_bound)

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return (tuple(shape),) * len(self.like_params)

    def init_tree(self, params: Any) -> dict[str, Any]:
        leaves, _ = flatten_leaves(params)
        return {"exp_avg": [backend.namespace(p).zeros_like(p) for p in leaves],
                "exp_avg_sq": [backend.namespace(p).zeros_like(p) for p in leaves],
                "barf": scalar_like(leaves, 0.0), "gamma": scalar_like(leaves, 0.0),
                "lb": scalar_like(leaves, on_host(self.lower_bound))}

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any,
                   **extra: Any) -> tuple[Any, Any]:
        value = _needs_value(self.name, extra)
        gs, treedef = flatten_leaves(u)
        ps, _ = flatten_leaves(params)
        barf0 = state["barf"]
        xp = backend.namespace(barf0)
        f = backend.loss_like(value, barf0)
        barf = c.b1 * barf0 + c.one_minus_b1 * f
        ms = [c.b1 * m + c.one_minus_b1 * g for m, g in zip(state["exp_avg"], gs, strict=True)]
        vs = [c.b2 * v + c.one_minus_b2 * g * g
              for v, g in zip(state["exp_avg_sq"], gs, strict=True)]
        ds = [c.eps + xp.sqrt(v / as_dtype(c.bc2, v)) for v in vs]
        directions = [m / d for m, d in zip(ms, ds, strict=True)]
        norm = _dot(xp, ms, directions, barf0)
        gamma = c.b1 * state["gamma"] + c.one_minus_b1 * _dot(xp, gs, ps, barf0)
        iprod = _dot(xp, ms, ps, barf0)
        bc1 = xp.asarray(c.bc1, dtype=barf0.dtype, device=backend.device(barf0))
        tau, lb = _step_size(xp, c, barf, gamma, state["lb"], iprod, norm, bc1,
                             self.adapt_lower_bound)
        out = [as_dtype(c.decay, p) * p + as_dtype(tau, n) * n
               for n, p in zip(directions, ps, strict=True)]
        return unflatten(treedef, out), {
            "exp_avg": arrays(ms, state["exp_avg"]), "exp_avg_sq": arrays(vs, state["exp_avg_sq"]),
            "barf": kept(xp, barf, barf0), "gamma": kept(xp, gamma, barf0),
            "lb": kept(xp, lb, barf0)}


@dataclass(frozen=True)
class momo_adam(Rule):
    r"""MoMo-Adam (Schaipp et al., 2023) as ``optax.contrib.momo_adam``: Adam whose step size
    is ``min(lr/(1 - b1^t), <a Polyak-type step in Adam's metric>)``
    (:class:`scale_by_momo_adam`), with AdamW's kind of decay folded in as
    ``p <- p/(1 + lr*weight_decay)``. With ``f_t`` the loss at ``p_{t-1}``,
    ``lambda = weight_decay``, ``lb`` the lower bound and inner products over the whole tree:

    $$
    \begin{aligned}
    \bar f_t &= \beta_1 \bar f_{t-1} + (1 - \beta_1)\, f_t, \qquad
    \gamma_t = \beta_1 \gamma_{t-1} + (1 - \beta_1) \langle g_t, p_{t-1} \rangle \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2, \qquad
    d_t = \epsilon + \sqrt{v_t / (1 - \beta_2^t)} \\
    \tau_t &= \min\left(\frac{\mathrm{lr}}{1 - \beta_1^t},\
    \frac{\max\left((1 + \mathrm{lr}\,\lambda)
    (\bar f_t - (1 - \beta_1^t)\, \mathrm{lb} - \gamma_t) + \langle m_t, p_{t-1} \rangle,\
    0\right)}{\langle m_t, m_t / d_t \rangle}\right) \\
    p_t &= \frac{p_{t-1}}{1 + \mathrm{lr}\,\lambda} - \tau_t\, \frac{m_t}{d_t}
    \end{aligned}
    $$

    Each step needs the loss: ``uo.update(state, params, grads, value=loss)``.
    ``lower_bound`` and ``adapt_lower_bound`` as :class:`momo`. Names and defaults are optax's
    (``lr``: 1e-2). The scalars of the state are kept in the params' widest float type,
    float32 at least (optax: the narrowest). Matches optax 0.2.8 to rounding.
    """

    lr: Any = hyper(1e-2, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    lower_bound: Any = static(0.0, ANY)
    weight_decay: Any = hyper(0.0, NONNEG)
    adapt_lower_bound: bool = False

    info: ClassVar[Info] = Info(
        family="polyak",
        paper="Schaipp et al. (2023)",
        references=("optax.contrib.momo_adam",),
        example={"lr": 0.1, "b2": 0.9},
        complex=False,
    )

    def parts(self) -> tuple[Transform, ...]:
        return (scale_by_momo_adam(lr=self.lr, b1=self.b1, b2=self.b2, eps=self.eps,
                                   lower_bound=self.lower_bound, weight_decay=self.weight_decay,
                                   adapt_lower_bound=self.adapt_lower_bound),)
