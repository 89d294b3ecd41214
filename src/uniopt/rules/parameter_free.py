"""Parameter-free step sizes: Prodigy (Mishchenko & Defazio, 2023), D-Adaptation AdamW
(Defazio & Mishchenko, 2023), DoG (Ivgi et al., 2023) and COCOB (Orabona & Tommasi, 2017).

Prodigy, D-Adaptation and DoG estimate their step size from sums over the whole tree (an inner
product with the distance travelled, a sum of absolute values, a global norm), so each step is
a whole-tree part whose tree state holds the per-leaf statistics and the global scalars; a
coupled weight decay before it stays elementwise. COCOB bets per element: elementwise.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .. import backend
from ..base import Elementwise, Info, Rule, Transform, WholeTree
from ..hyper import (
    NONNEG,
    UNIT_OPEN,
    Interval,
    _traced,
    check_real,
    hyper,
    on_host,
    plain_number,
    static,
)
from ..moments import select
from ..transforms.decay import weight_decay
from ..transforms.scale import safe_sqrt, scale, scale_by_lr
from ..tree import flatten_leaves, unflatten
from .schedule_free import arrays, as_dtype, kept, scalar_like

POSITIVE = Interval(0.0, None, lo_open=True)


def _total(terms: list[Any]) -> Any:
    """The sum of per-leaf 0-d sums, as one 0-d array (0.0 for no leaves)."""
    out: Any = 0.0
    for t in terms:
        out = out + t
    return out


def _adam_bc(b1: Any, b2: Any, t: Any) -> Any:
    """The bias correction of the step size at count ``t``, ``sqrt(1 - b2^t)/(1 - b1^t)``, as
    prodigyopt and dadaptation write it (in this order of operations)."""
    return (1.0 - b2 ** t) ** 0.5 / (1.0 - b1 ** t)


def _check_prodigy(t: Any) -> None:
    """The checks of ``beta3`` and ``growth_rate``, for :class:`prodigy` and its block."""
    object.__setattr__(t, "beta3", check_real(t.name, "beta3", t.beta3, UNIT_OPEN,
                                              none="sqrt(betas[1])"))
    g = plain_number(t.growth_rate)
    if isinstance(g, float) and g == math.inf:
        g = None  # prodigyopt's default, as None: a checkpoint stores finite numbers
    object.__setattr__(t, "growth_rate", check_real(t.name, "growth_rate", g, Interval(1.0),
                                                    none="no limit"))


class ProdigyCoeffs(NamedTuple):
    lr: Any
    b1: Any
    b2: Any
    beta3: Any
    bc: Any  # sqrt(1 - b2^t)/(1 - b1^t), or 1 without bias correction
    eps: Any
    wd: Any  # decoupled decay, scaled by d*lr*bc
    d0: Any
    d_coef: Any


@dataclass(frozen=True)
class scale_by_prodigy(WholeTree):
    """Prodigy's step (Mishchenko & Defazio, 2023, Algorithm 4 as ``prodigyopt.Prodigy``
    writes it), given the gradient ``g`` and with ``d`` the current estimate:

    ``dlr = d*lr*bc``; ``m <- b1*m + d*(1-b1)*g``; ``v <- b2*v + d^2*(1-b2)*g^2``;
    ``s <- beta3*s + (d/d0)*dlr*g`` (``safeguard_warmup``: ``(d/d0)*d*g``);
    ``num <- beta3*num + (d/d0)*dlr*<g, p0 - p>``; ``d_hat = d_coef*num/sum|s|``;
    ``d_max <- max(d_max, d_hat)``, ``d <- min(d_max, d*growth_rate)`` (None: ``d_max``; the
    first raise: ``max(d, d_hat)``); ``u = wd*dlr*p + dlr*m/(sqrt(v) + d*eps)`` with the new
    ``d`` in the denominator (``b1 = 0``: ``dlr*d*g/(sqrt(v) + d*eps)``, and at a step where a
    schedule's ``b1`` is 0, ``m`` kept, as ``prodigyopt``'s ``if beta1 > 0``; with
    ``hold=False``, optax's, ``m <- d*g`` with the old ``d``). Where ``sum|s|`` is 0 (no
    gradient yet) ``d`` stays and the step is 0, as ``prodigyopt`` returns early.

    Tree state: ``exp_avg`` (absent where ``b1 = 0``), ``exp_avg_sq``, ``s``, ``p0`` (one array
    per leaf) and the scalars ``d``, ``d_max``, ``d_numerator``; with ``lr0_idle`` and
    ``use_bias_correction``, ``k``: the steps that did not return early, whose count ``bc``
    reads in place of the step's.
    """

    real_only = True

    lr: Any = hyper(1.0, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    beta3: float | None = None  # None: sqrt(betas[1]) at each step
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    d0: Any = static(1e-6, POSITIVE)  # the initial estimate: read once, at set-up
    d_coef: Any = hyper(1.0, NONNEG)
    growth_rate: float | None = None  # None: no limit
    use_bias_correction: bool = False
    safeguard_warmup: bool = False
    lr0_idle: bool = False  # prodigyopt's early return: at lr 0 nothing moves or counts
    # at a step where betas[0] is 0 (a schedule's, a group's value), m is kept and the step
    # takes d*g, as prodigyopt's `if beta1 > 0`; False: m <- d*g, optax's
    hold: bool = True

    like_params: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq", "s", "p0")
    uses_params: ClassVar[bool] = True
    makes_step: ClassVar[bool] = True

    def check(self) -> None:
        _check_prodigy(self)

    def coeffs(self, step: Any) -> ProdigyCoeffs:
        b1, b2 = self.betas
        # (the count: a float first, JAX divides int32 in float32)
        bc = _adam_bc(b1, b2, step + 1.0) if self.use_bias_correction else 1.0
        beta3 = b2 ** 0.5 if self.beta3 is None else self.beta3
        return ProdigyCoeffs(lr=self.lr, b1=b1, b2=b2, beta3=beta3, bc=bc, eps=self.eps,
                             wd=self.weight_decay, d0=self.d0, d_coef=self.d_coef)

    @property
    def _keeps_exp_avg(self) -> bool:
        return on_host(self.betas[0]) != 0 or callable(self.betas[0])

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return (tuple(shape),) * (len(self.like_params) - (not self._keeps_exp_avg))

    def init_tree(self, params: Any) -> dict[str, Any]:
        leaves, _ = flatten_leaves(params)
        zeros = [backend.namespace(p).zeros_like(p) for p in leaves]
        first = {} if not self._keeps_exp_avg else {
            "exp_avg": [backend.namespace(p).zeros_like(p) for p in leaves]}
        return {**first, "exp_avg_sq": zeros,
                "s": [backend.namespace(p).zeros_like(p) for p in leaves],
                "p0": [backend.detached_copy(p) for p in leaves],
                "d": scalar_like(leaves, self.d0), "d_max": scalar_like(leaves, self.d0),
                "d_numerator": scalar_like(leaves, 0.0),
                # prodigyopt's own count, of the steps that did not return early: its bias
                # correction's
                **({"k": scalar_like(leaves, 0.0)} if self._counts_own_steps else {})}

    @property
    def _counts_own_steps(self) -> bool:
        return self.lr0_idle and self.use_bias_correction

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any,
                   **extra: Any) -> tuple[Any, Any]:
        gs, treedef = flatten_leaves(u)
        ps, _ = flatten_leaves(params)
        d, d_max = state["d"], state["d_max"]
        xp = backend.namespace(d)
        # (at a count of its own, prodigyopt's)
        bc = _adam_bc(c.b1, c.b2, state["k"] + 1.0) if "k" in state else c.bc
        dlr = d * c.lr * bc
        ratio = d / c.d0
        s_scale = ratio * (d if self.safeguard_warmup else dlr)
        first = "exp_avg" in state
        off: Any = False  # the first moment off at this step (b1 = 0): kept, unused
        if first and self.hold:
            off = c.b1 == 0  # (an array's, traced or on a device, stays one: no host read)
            if isinstance(off, (bool, np.bool_)):
                off = bool(off)
        ms, vs, ss, dots, abs_sums = [], [], [], [], []
        for i, (g, p) in enumerate(zip(gs, ps, strict=True)):
            p0 = state["p0"][i]
            dots.append(xp.sum(xp.astype(g * (p0 - p), d.dtype)))
            if first:
                m = state["exp_avg"][i]
                new_m = m * c.b1 + as_dtype(d * (1.0 - c.b1), g) * g
                ms.append(new_m if off is False else select(xp, off, m, new_m))
            vs.append(state["exp_avg_sq"][i] * c.b2 + as_dtype(d * d * (1.0 - c.b2), g) * g * g)
            s = state["s"][i] * c.beta3 + as_dtype(s_scale, g) * g
            ss.append(s)
            abs_sums.append(xp.sum(xp.astype(xp.abs(s), d.dtype)))
        numerator = state["d_numerator"] * c.beta3 + ratio * dlr * _total(dots)
        live: Any = True
        if self.lr0_idle and (_traced(c.lr) or not c.lr > 0):
            # prodigyopt returns early at a step of lr 0 (a warm-up's): it updates none of them,
            # nor d, nor its count
            live = c.lr > 0
            if not _traced(live):  # (a JVP's tracer compares to a concrete answer)
                live = bool(live)
            pick = (xp.where if _traced(live) else
                    (lambda keep, new, old: new if keep else old))
            pick = functools.partial(pick, live)
            if first:
                ms = [pick(m, old) for m, old in zip(ms, state["exp_avg"], strict=True)]
            vs = [pick(v, old) for v, old in zip(vs, state["exp_avg_sq"], strict=True)]
            ss = [pick(s, old) for s, old in zip(ss, state["s"], strict=True)]
            abs_sums = [pick(a, xp.sum(xp.astype(xp.abs(old), d.dtype)))
                        for a, old in zip(abs_sums, state["s"], strict=True)]
            numerator = pick(numerator, state["d_numerator"])
        denominator = _total(abs_sums)
        moved = denominator > 0
        if live is not True:
            moved = moved & live
        d_hat = c.d_coef * numerator / xp.where(moved, denominator, xp.ones_like(d))
        raised = xp.where(d == c.d0, xp.maximum(d, d_hat), d)
        new_max = xp.maximum(d_max, d_hat)
        new_d = new_max if self.growth_rate is None else xp.minimum(new_max,
                                                                      raised * self.growth_rate)
        new_d, new_max = xp.where(moved, new_d, d), xp.where(moved, new_max, d_max)
        numerator = xp.where(moved, numerator, state["d_numerator"])
        step = xp.where(moved, dlr, xp.zeros_like(dlr))
        out = []
        for i, (g, p) in enumerate(zip(gs, ps, strict=True)):
            den = xp.sqrt(vs[i]) + as_dtype(new_d * c.eps, p)
            direction = ms[i] if first and off is False else as_dtype(new_d, g) * g
            if first and off is not False:
                direction = select(xp, off, direction, ms[i])
            out.append(as_dtype(step * c.wd, p) * p + as_dtype(step, p) * direction / den)
        new = {"exp_avg": arrays(ms, state["exp_avg"])} if first else {}
        new.update({"exp_avg_sq": arrays(vs, state["exp_avg_sq"]), "s": arrays(ss, state["s"]),
                    "p0": state["p0"],
                    "d": kept(xp, new_d, d), "d_max": kept(xp, new_max, d),
                    "d_numerator": kept(xp, numerator, d)})
        if "k" in state:
            new["k"] = kept(xp, xp.where(moved, state["k"] + 1.0, state["k"]), d)
        return unflatten(treedef, out), new


@dataclass(frozen=True)
class prodigy(Rule):
    r"""Prodigy (Mishchenko & Defazio, 2023): Adam whose step size ``d*lr`` estimates the
    distance to the solution, ``d`` growing from ``d0`` (:class:`scale_by_prodigy`). At step
    ``t`` (from 1), with ``d_t`` the estimate before it (``d_1 = d0``), ``lambda =
    weight_decay`` (decoupled), ``<., .>`` and ``|.|_1`` over the whole tree, ``bc = 1`` (with
    ``use_bias_correction``: ``sqrt(1 - b2^t)/(1 - b1^t)``) and ``gamma_t = d_t lr bc``:

    $$
    \begin{aligned}
    m_t &= \beta_1 m_{t-1} + d_t (1 - \beta_1)\, g_t, \qquad
    v_t = \beta_2 v_{t-1} + d_t^2 (1 - \beta_2)\, g_t^2 \\
    s_t &= \beta_3 s_{t-1} + \frac{d_t}{d_0}\, \gamma_t\, g_t, \qquad
    r_t = \beta_3 r_{t-1} + \frac{d_t}{d_0}\, \gamma_t\, \langle g_t, p_0 - p_{t-1} \rangle \\
    \hat d_t &= \text{d_coef}\, \frac{r_t}{\lVert s_t \rVert_1}, \qquad
    D_t = \max(D_{t-1}, \hat d_t) \quad (D_0 = d_0) \\
    d_{t+1} &= \min\left(D_t,\ \text{growth_rate}\cdot d_t\right) \\
    p_t &= p_{t-1} - \gamma_t \left(\lambda\, p_{t-1}
    + \frac{m_t}{\sqrt{v_t} + d_{t+1}\, \epsilon}\right)
    \end{aligned}
    $$

    ``beta3`` defaults to ``sqrt(b2)``; ``growth_rate=None``: ``d_{t+1} = D_t`` (the first
    raise of a limited growth is ``max(d_t, d_hat_t)``); ``safeguard_warmup`` puts ``d_t`` for
    ``gamma_t`` in ``s``'s increment; ``b1 = 0`` keeps no ``m`` and steps ``d_{t+1} g_t`` in
    its place. While ``|s|_1 = 0`` (no gradient yet) ``d`` stays and the step is 0.

    Options, with ``prodigyopt.Prodigy``'s names and defaults: ``beta3`` (None:
    ``sqrt(betas[1])``), ``weight_decay`` with ``decouple=True`` (``p <- p - wd*dlr*p``) or
    ``False`` (``g <- g + wd*p``, an L2 term that reaches the estimate too),
    ``use_bias_correction``, ``safeguard_warmup``, ``d0``, ``d_coef``, ``growth_rate`` (None,
    or prodigyopt's ``inf``: no limit).
    ``slice_p`` (estimating from every n-th element) and FSDP are not offered.

    Conventions:

    * ``"torch"``: the authors' ``prodigyopt.Prodigy`` (``use_bias_correction=False``).
    * ``"optax"``: ``optax.contrib.prodigy(learning_rate, betas, beta3, eps, estim_lr0=d0,
      estim_lr_coef=d_coef, weight_decay, safeguard_warmup)``: bias correction on, decay
      decoupled, no growth limit. Known differences: with ``betas[0] = 0`` optax scales the
      gradient by the old ``d`` (``prodigyopt`` and this rule by the new one); before any
      gradient (``sum|s| = 0``) optax's estimate is NaN.

    ``lr0_idle`` (``prodigyopt``'s; False in the optax convention, as optax): a step that
    ``prodigyopt`` returns early from, one of ``lr = 0`` (a warm-up from 0) or before any
    gradient (``sum|s| = 0``), leaves ``m``, ``v``, ``s``, the numerator and ``d`` as they were
    and is not counted for the bias correction: with ``use_bias_correction`` the tree state
    keeps that count, ``k``, as ``prodigyopt`` keeps its own (counting every step, a parameter
    of a run with a 20-step warm-up from 0 was 26 times its size from ``prodigyopt``'s after
    80 steps).
    """

    lr: Any = hyper(1.0, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    beta3: Any = None
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    decouple: bool = True
    use_bias_correction: bool = False
    safeguard_warmup: bool = False
    d0: Any = static(1e-6, POSITIVE)  # the initial estimate: read once, at set-up
    d_coef: Any = hyper(1.0, NONNEG)
    growth_rate: float | None = None
    lr0_idle: bool = True
    convention: str = "torch"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {}, "optax": {"use_bias_correction": True, "lr0_idle": False}}
    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="parameter-free",
        paper="Mishchenko & Defazio (2023)",
        references=("prodigyopt.Prodigy", "optax.contrib.prodigy"),
        example={"lr": 1.0, "d0": 1e-3},
        budget=2000,
        complex=False,
    )

    def check(self) -> None:
        _check_prodigy(self)

    def parts(self) -> tuple[Transform, ...]:
        coupled = self.on("weight_decay") and not self.decouple
        return (*((weight_decay(wd=self.weight_decay),) if coupled else ()),
                scale_by_prodigy(lr=self.lr, betas=self.betas, beta3=self.beta3,
                                 eps=self.eps, weight_decay=0.0 if coupled else self.weight_decay,
                                 d0=self.d0, d_coef=self.d_coef, growth_rate=self.growth_rate,
                                 use_bias_correction=self.use_bias_correction,
                                 safeguard_warmup=self.safeguard_warmup,
                                 lr0_idle=self.lr0_idle, hold=self.convention != "optax"))


DOG_INITS = ("heuristic", "distance", "learning_rate")


def _check_dog_start(owner: str, kind_name: str, kind: Any, value_name: str,
                     value: Any) -> float:
    """DoG's start, for :class:`dog` and its block: ``kind`` one of :data:`DOG_INITS`, and
    ``value`` (above 0) as a float."""
    if not isinstance(kind, str) or kind not in DOG_INITS:
        raise ValueError(f"{owner}: {kind_name} must be one of "
                         f"{', '.join(map(repr, DOG_INITS))}, got {kind!r}")
    return check_real(owner, value_name, value, POSITIVE)


class DogCoeffs(NamedTuple):
    eps: Any
    first_lr: Any  # init_step=("learning_rate", v): the first step's size


@dataclass(frozen=True)
class scale_by_dog(WholeTree):
    """DoG's step size (Ivgi et al., 2023): ``r <- max(r, ||p - p0||)``;
    ``G <- G + ||g||^2``; ``u = r/sqrt(G + eps) * g``, norms over the whole tree.

    ``r`` starts at ``init_value`` (``start="distance"``), at ``init_value*(1 + ||p0||)``
    (``start="heuristic"``), or at 0 with ``init_value`` the first step's size
    (``"learning_rate"``). Tree state: ``p0`` (one array per leaf), ``max_dist``,
    ``sum_sq_norm_grads``, ``first``."""

    real_only = True

    eps: Any = hyper(1e-8, NONNEG)
    start: str = "heuristic"
    init_value: float = 1e-6

    like_params: ClassVar[tuple[str, ...]] = ("p0",)
    uses_params: ClassVar[bool] = True

    def check(self) -> None:
        object.__setattr__(self, "init_value", _check_dog_start(
            self.name, "start", self.start, "init_value", self.init_value))

    def coeffs(self, step: Any) -> DogCoeffs:
        return DogCoeffs(eps=self.eps, first_lr=self.init_value)

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return (tuple(shape),) * len(self.like_params)

    def init_tree(self, params: Any) -> dict[str, Any]:
        leaves, _ = flatten_leaves(params)
        r0 = scalar_like(leaves, self.init_value if self.start == "distance" else 0.0)
        if self.start == "heuristic":
            xp = backend.namespace(r0)
            squares = _total([xp.sum(xp.astype(p * p, r0.dtype)) for p in leaves])
            r0 = kept(xp, self.init_value * (1.0 + xp.sqrt(r0 + squares)), r0)
        return {"p0": [backend.detached_copy(p) for p in leaves], "max_dist": r0,
                "sum_sq_norm_grads": scalar_like(leaves, 0.0), "first": scalar_like(leaves, 1.0)}

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any,
                   **extra: Any) -> tuple[Any, Any]:
        gs, treedef = flatten_leaves(u)
        ps, _ = flatten_leaves(params)
        r = state["max_dist"]
        xp = backend.namespace(r)
        squares = _total([xp.sum(xp.astype((p0 - p) ** 2, r.dtype))
                          for p0, p in zip(state["p0"], ps, strict=True)])
        dist = safe_sqrt(xp, squares)  # (0 at the first step, where max hands back 0)
        r = xp.maximum(r, dist)
        total = state["sum_sq_norm_grads"] + _total([xp.sum(xp.astype(g * g, r.dtype))
                                                     for g in gs])
        lr = r / xp.sqrt(total + c.eps)
        if self.start == "learning_rate":
            lr = xp.where(state["first"] > 0, backend.number(xp, c.first_lr, r.dtype, r), lr)
        out = [as_dtype(lr, g) * g for g in gs]
        return unflatten(treedef, out), {"p0": state["p0"], "max_dist": kept(xp, r, r),
                                         "sum_sq_norm_grads": kept(xp, total, r),
                                         "first": xp.zeros_like(state["first"])}


@dataclass(frozen=True)
class dog(Rule):
    r"""DoG, "Distance over Gradients" (Ivgi et al., 2023): SGD with the step size
    ``lr * max_s ||p_s - p_0|| / sqrt(sum_s ||g_s||^2 + eps)`` (:class:`scale_by_dog`), after
    ``g <- g + weight_decay*p``; ``lr`` is a multiplier (1: the paper's). With norms over the
    whole tree and ``lambda = weight_decay``:

    $$
    \begin{aligned}
    g_t &\leftarrow g_t + \lambda\, p_{t-1} \\
    \bar r_t &= \max\left(\bar r_{t-1},\ \lVert p_{t-1} - p_0 \rVert\right), \qquad
    G_t = G_{t-1} + \lVert g_t \rVert^2 \\
    p_t &= p_{t-1} - \mathrm{lr}\, \frac{\bar r_t}{\sqrt{G_t + \epsilon}}\, g_t
    \end{aligned}
    $$

    ``init_step=(kind, value)`` as optax's: ``("heuristic", 1e-6)`` starts the distance at
    ``1e-6*(1 + ||p_0||)``, ``("distance", r)`` at ``r``, ``("learning_rate", eta)`` makes
    the first step ``eta*g``. Matches ``optax.contrib.dog``.
    """

    lr: Any = hyper(1.0, NONNEG)
    init_step: tuple[str, float] = ("heuristic", 1e-6)
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="parameter-free",
        paper="Ivgi et al. (2023)",
        references=("optax.contrib.dog",),
        example={"lr": 0.5, "init_step": ("distance", 3.0)},
        budget=3000,
        complex=False,
    )

    def check(self) -> None:
        kind_value = self.init_step
        if not isinstance(kind_value, (tuple, list)) or len(kind_value) != 2:
            raise ValueError(f"{self.name}: init_step must be (kind, value) with kind one of "
                             f"{', '.join(map(repr, DOG_INITS))}, got {kind_value!r}")
        kind, value = kind_value
        object.__setattr__(self, "init_step", (kind, _check_dog_start(
            self.name, "init_step's kind", kind, "init_step's value", value)))

    def parts(self) -> tuple[Transform, ...]:
        decay = (weight_decay(wd=self.weight_decay),) if self.on("weight_decay") else ()
        kind, value = self.init_step
        return (*decay, scale_by_dog(eps=self.eps, start=kind, init_value=value),
                scale_by_lr(lr=self.lr))


class DAdaptCoeffs(NamedTuple):
    lr: Any
    b1: Any
    b2: Any
    sqrt_b2: Any  # the weighting of s and the numerator
    bc: Any  # sqrt(1 - b2^t)/(1 - b1^t)
    eps: Any
    wd: Any


@dataclass(frozen=True)
class scale_by_dadapt_adam(WholeTree):
    """D-Adaptation's Adam step (Defazio & Mishchenko, 2023, Algorithm 4), as
    ``optax.contrib.dadapt_adamw`` writes it, given the gradient ``g``:

    ``dlr = d*lr*bc`` (``bc = sqrt(1 - b2^t)/(1 - b1^t)``);
    ``num <- sqrt(b2)*num + (1 - sqrt(b2))*dlr*<g, s/(sqrt(v) + eps)>`` (the old ``s``, ``v``);
    ``m <- b1*m + (1-b1)*dlr*g``; ``v <- b2*v + (1-b2)*g^2``;
    ``s <- sqrt(b2)*s + (1 - sqrt(b2))*dlr*g``; ``d <- max(d, num/((1 - sqrt(b2))*sum|s|))``;
    ``u = wd*dlr*p + m/(sqrt(v) + eps)``.

    Tree state: ``exp_avg``, ``exp_avg_sq``, ``s`` (one array per leaf), ``d``,
    ``d_numerator``."""

    real_only = True

    lr: Any = hyper(1.0, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    # (> 0: the first step's estimate reads the old s/(sqrt(v) + eps), both 0)
    eps: Any = hyper(1e-8, POSITIVE)
    weight_decay: Any = hyper(0.0, NONNEG)
    d0: Any = static(1e-6, POSITIVE)  # the initial estimate: read once, at set-up

    like_params: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq", "s")
    uses_params: ClassVar[bool] = True
    makes_step: ClassVar[bool] = True

    def coeffs(self, step: Any) -> DAdaptCoeffs:
        b1, b2 = self.betas
        return DAdaptCoeffs(lr=self.lr, b1=b1, b2=b2, sqrt_b2=b2 ** 0.5,
                            bc=_adam_bc(b1, b2, step + 1.0), eps=self.eps, wd=self.weight_decay)

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return (tuple(shape),) * len(self.like_params)

    def init_tree(self, params: Any) -> dict[str, Any]:
        leaves, _ = flatten_leaves(params)

        def zeros() -> list[Any]:
            return [backend.namespace(p).zeros_like(p) for p in leaves]

        return {"exp_avg": zeros(), "exp_avg_sq": zeros(), "s": zeros(),
                "d": scalar_like(leaves, self.d0), "d_numerator": scalar_like(leaves, 0.0)}

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any,
                   **extra: Any) -> tuple[Any, Any]:
        gs, treedef = flatten_leaves(u)
        ps, _ = flatten_leaves(params)
        d = state["d"]
        xp = backend.namespace(d)
        dlr = d * c.lr * c.bc
        rest = 1.0 - c.sqrt_b2
        dots, ms, vs, ss, abs_sums = [], [], [], [], []
        for g, m, v, s in zip(gs, state["exp_avg"], state["exp_avg_sq"], state["s"],
                              strict=True):
            # in d's dtype, the widest of the params': eps (1e-8) is 0 in float16, and the
            # first step's s/sqrt(v) 0/0
            gw, sw, vw = (xp.astype(x, d.dtype) for x in (g, s, v))
            dots.append(xp.sum(gw * (sw / (xp.sqrt(vw) + c.eps))))
            ms.append(c.b1 * m + as_dtype((1.0 - c.b1) * dlr, g) * g)
            vs.append(c.b2 * v + (1.0 - c.b2) * g * g)
            s = c.sqrt_b2 * s + as_dtype(rest * dlr, g) * g
            ss.append(s)
            abs_sums.append(xp.sum(xp.astype(xp.abs(s), d.dtype)))
        numerator = c.sqrt_b2 * state["d_numerator"] + rest * dlr * _total(dots)
        # where nothing has moved s yet (lr 0, as a warm-up from 0 starts; every gradient 0)
        # the estimate is 0/0: d is kept, as the authors' dadaptation keeps it (optax's turns
        # NaN, and every step after it); a NaN gradient still makes d NaN, as in both
        den = rest * _total(abs_sums)
        still = den == 0
        new_d = xp.where(still, d,
                         xp.maximum(d, numerator / xp.where(still, xp.ones_like(den), den)))
        out = [as_dtype(c.wd * dlr, p) * p + m / (xp.sqrt(v) + c.eps)
               for p, m, v in zip(ps, ms, vs, strict=True)]
        return unflatten(treedef, out), {"exp_avg": arrays(ms, state["exp_avg"]),
                                         "exp_avg_sq": arrays(vs, state["exp_avg_sq"]),
                                         "s": arrays(ss, state["s"]),
                                         "d": kept(xp, new_d, d),
                                         "d_numerator": kept(xp, numerator, d)}


@dataclass(frozen=True)
class dadapt_adamw(Rule):
    r"""D-Adaptation AdamW (Defazio & Mishchenko, 2023): Adam with the step size ``d*lr``,
    ``d`` a lower bound on the distance to the solution that grows from ``d0``, and decay
    decoupled (``p <- p - weight_decay*d*lr*bc*p``); see :class:`scale_by_dadapt_adam`. At
    step ``t`` (from 1), with ``d_t`` the estimate before it (``d_1 = d0``),
    ``lambda = weight_decay``, ``<., .>`` and ``|.|_1`` over the whole tree and
    ``gamma_t = d_t lr sqrt(1 - b2^t)/(1 - b1^t)``:

    $$
    \begin{aligned}
    r_t &= \sqrt{\beta_2}\, r_{t-1} + (1 - \sqrt{\beta_2})\, \gamma_t
    \left\langle g_t, \frac{s_{t-1}}{\sqrt{v_{t-1}} + \epsilon} \right\rangle \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, \gamma_t\, g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
    s_t &= \sqrt{\beta_2}\, s_{t-1} + (1 - \sqrt{\beta_2})\, \gamma_t\, g_t, \qquad
    d_{t+1} = \max\left(d_t,\ \frac{r_t}{(1 - \sqrt{\beta_2})\, \lVert s_t \rVert_1}\right) \\
    p_t &= p_{t-1} - \lambda\, \gamma_t\, p_{t-1} - \frac{m_t}{\sqrt{v_t} + \epsilon}
    \end{aligned}
    $$
    ``optax.contrib.dadapt_adamw(learning_rate=lr, betas, eps, estim_lr0=d0,
    weight_decay)``, to which it is held, but where nothing has moved ``s`` yet (``lr`` 0, as
    a warm-up from 0 starts, or every gradient 0): the estimate would divide 0 by 0, and ``d``
    is kept, where optax's turns NaN for good (the authors' ``dadaptation`` skips such a step
    whole; here the rest of it is optax's, a decoupled decay included). ``eps`` must be above
    0 (the first step's estimate reads ``s/(sqrt(v) + eps)`` of zeros).
    """

    lr: Any = hyper(1.0, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    eps: Any = hyper(1e-8, POSITIVE)
    d0: Any = static(1e-6, POSITIVE)  # the initial estimate: read once, at set-up
    weight_decay: Any = hyper(0.0, NONNEG)

    info: ClassVar[Info] = Info(
        family="parameter-free",
        paper="Defazio & Mishchenko (2023)",
        references=("optax.contrib.dadapt_adamw",),
        example={"lr": 0.3, "d0": 1e-3},
        budget=2000,
        complex=False,
    )

    def parts(self) -> tuple[Transform, ...]:
        return (scale_by_dadapt_adam(lr=self.lr, betas=self.betas, eps=self.eps,
                                     weight_decay=self.weight_decay, d0=self.d0),)


class CocobCoeffs(NamedTuple):
    alpha: Any
    zero: Any


@dataclass(frozen=True)
class scale_by_cocob(Elementwise):
    """COCOB-Backprop (Orabona & Tommasi, 2017, Algorithm 2), per element, for the gradient
    ``g``: ``L <- max(L, |g|)``; ``G <- G + |g|``; ``R <- max(R - g*(p - p0), 0)``;
    ``C <- C - g``; the new parameter is ``p0 + C/(L*max(G + L, alpha*L))*(L + R)``, so
    ``u = p - that``. Slots (optax's names): ``init_particles`` (``p0``, the params at
    set-up), ``cumulative_gradients``, ``scale`` (from ``eps``), ``subgradients``,
    ``reward``."""

    real_only = True

    alpha: Any = hyper(100.0, NONNEG)
    eps: float = static(1e-8, POSITIVE)
    slots: ClassVar[tuple[str, ...]] = ("init_particles", "cumulative_gradients", "scale",
                                        "subgradients", "reward")
    uses_params: ClassVar[bool] = True
    exact_state: ClassVar[str | None] = (
        "it makes the parameter from its slot init_particles, so the params would keep only "
        "the state's precision")

    def init_slots(self, p: Any, xp: Any) -> tuple[Any, ...]:
        return (backend.detached_copy(p), xp.zeros_like(p), xp.full_like(p, self.eps),
                xp.zeros_like(p), xp.zeros_like(p))

    def coeffs(self, step: Any) -> CocobCoeffs:
        return CocobCoeffs(alpha=self.alpha, zero=0.0)

    @staticmethod
    def kernel(xp, c, p, u, init_particles, cumulative_gradients, scale, subgradients, reward):
        size = xp.maximum(u, -u)  # |u|: the compiled loop's scalar namespace has no abs
        scale = xp.maximum(scale, size)
        subgradients = subgradients + size
        reward = xp.maximum(reward - u * (p - init_particles), c.zero)
        cumulative_gradients = cumulative_gradients - u
        bet = cumulative_gradients / (scale * xp.maximum(subgradients + scale, c.alpha * scale))
        new = init_particles + bet * (scale + reward)
        return p - new, init_particles, cumulative_gradients, scale, subgradients, reward


@dataclass(frozen=True)
class cocob(Rule):
    r"""COCOB-Backprop (Orabona & Tommasi, 2017): coin betting, no learning rate to tune
    (:class:`scale_by_cocob`), after ``g <- lr*(g + weight_decay*p)``; ``lr`` (1: the paper's)
    scales the gradient, as ``optax.contrib.cocob(learning_rate, alpha, eps, weight_decay)``
    does, to which it is held. Elementwise, with ``lambda = weight_decay``, ``L_0 = eps`` and
    ``G_0 = R_0 = C_0 = 0``:

    $$
    \begin{aligned}
    g_t &\leftarrow \mathrm{lr}\,(g_t + \lambda\, p_{t-1}) \\
    L_t &= \max(L_{t-1}, |g_t|), \qquad G_t = G_{t-1} + |g_t|, \qquad C_t = C_{t-1} - g_t \\
    R_t &= \max\left(R_{t-1} - g_t\, (p_{t-1} - p_0),\ 0\right) \\
    p_t &= p_0 + \frac{C_t}{L_t \max(G_t + L_t,\ \alpha L_t)}\, (L_t + R_t)
    \end{aligned}
    $$
    """

    lr: Any = hyper(1.0, NONNEG)
    alpha: Any = hyper(100.0, NONNEG)
    eps: float = static(1e-8, POSITIVE)
    weight_decay: Any = hyper(0.0, NONNEG)

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="parameter-free",
        paper="Orabona & Tommasi (2017)",
        references=("optax.contrib.cocob",),
        example={"alpha": 10.0},
        budget=3000,
        complex=False,
    )

    def parts(self) -> tuple[Transform, ...]:
        decay = (weight_decay(wd=self.weight_decay),) if self.on("weight_decay") else ()
        return (*decay, scale(factor=self.lr), scale_by_cocob(alpha=self.alpha, eps=self.eps))


def _check_dowg(t: Any) -> None:
    """The check of ``init_estim_sq_dist``, for :class:`dowg` and its block."""
    r = check_real(t.name, "init_estim_sq_dist", t.init_estim_sq_dist,
                   Interval(0.0, lo_open=True), none="eps")
    object.__setattr__(t, "init_estim_sq_dist", r)
    if r is None and callable(t.eps):
        raise ValueError(f"{t.name}: init_estim_sq_dist=None starts at eps, which must "
                         "then be a number, not a schedule")


class DowgCoeffs(NamedTuple):
    eps: Any


@dataclass(frozen=True)
class scale_by_dowg(WholeTree):
    """DoWG's step size (Khaled, Mishchenko & Jin, 2023), as ``optax.contrib.scale_by_dowg``:
    ``r2 <- max(r2, ||p - p0||^2)``; ``V <- V + r2*||g||^2``; ``u = r2/(sqrt(V) + eps)*g``.
    Tree state: ``p0``, ``estim_sq_dist`` (from ``init_estim_sq_dist``),
    ``weighted_sq_norm_grads``."""

    real_only = True

    eps: Any = hyper(1e-4, NONNEG)
    init_estim_sq_dist: float | None = None  # None: eps

    like_params: ClassVar[tuple[str, ...]] = ("p0",)
    uses_params: ClassVar[bool] = True

    def check(self) -> None:
        _check_dowg(self)

    def coeffs(self, step: Any) -> DowgCoeffs:
        return DowgCoeffs(eps=self.eps)

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return (tuple(shape),) * len(self.like_params)

    def init_tree(self, params: Any) -> dict[str, Any]:
        leaves, _ = flatten_leaves(params)
        r = self.init_estim_sq_dist
        return {"p0": [backend.detached_copy(p) for p in leaves],
                "estim_sq_dist": scalar_like(leaves, on_host(self.eps) if r is None else r),
                "weighted_sq_norm_grads": scalar_like(leaves, 0.0)}

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any,
                   **extra: Any) -> tuple[Any, Any]:
        gs, treedef = flatten_leaves(u)
        ps, _ = flatten_leaves(params)
        r2 = state["estim_sq_dist"]
        xp = backend.namespace(r2)
        r2 = xp.maximum(r2, _total([xp.sum(xp.astype((p0 - p) ** 2, r2.dtype))
                                    for p0, p in zip(state["p0"], ps, strict=True)]))
        total = state["weighted_sq_norm_grads"] + r2 * _total(
            [xp.sum(xp.astype(g * g, r2.dtype)) for g in gs])
        lr = r2 / (xp.sqrt(total) + c.eps)
        return unflatten(treedef, [as_dtype(lr, g) * g for g in gs]), {
            "p0": state["p0"], "estim_sq_dist": kept(xp, r2, r2),
            "weighted_sq_norm_grads": kept(xp, total, r2)}


@dataclass(frozen=True)
class dowg(Rule):
    r"""DoWG, "Distance over Weighted Gradients" (Khaled, Mishchenko & Jin, 2023): SGD with
    the step size ``lr * r2_t/(sqrt(sum_s r2_s*||g_s||^2) + eps)``, ``r2_t`` the largest
    squared distance from the start so far (:class:`scale_by_dowg`), after
    ``g <- g + weight_decay*p``. ``init_estim_sq_dist`` (None: ``eps``) is where ``r2``
    starts. Matches ``optax.contrib.dowg``. With norms over the whole tree and
    ``lambda = weight_decay``:

    $$
    \begin{aligned}
    g_t &\leftarrow g_t + \lambda\, p_{t-1} \\
    \bar r^2_t &= \max\left(\bar r^2_{t-1},\ \lVert p_{t-1} - p_0 \rVert^2\right), \qquad
    V_t = V_{t-1} + \bar r^2_t\, \lVert g_t \rVert^2 \\
    p_t &= p_{t-1} - \mathrm{lr}\, \frac{\bar r^2_t}{\sqrt{V_t} + \epsilon}\, g_t
    \end{aligned}
    $$
    """

    lr: Any = hyper(1.0, NONNEG)
    init_estim_sq_dist: float | None = None
    eps: Any = hyper(1e-4, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="parameter-free",
        paper="Khaled, Mishchenko & Jin (2023)",
        references=("optax.contrib.dowg",),
        example={"lr": 1.0, "init_estim_sq_dist": 1.0},
        budget=3000,
        complex=False,
    )

    def check(self) -> None:
        _check_dowg(self)

    def parts(self) -> tuple[Transform, ...]:
        decay = (weight_decay(wd=self.weight_decay),) if self.on("weight_decay") else ()
        return (*decay, scale_by_dowg(eps=self.eps, init_estim_sq_dist=self.init_estim_sq_dist),
                scale_by_lr(lr=self.lr))
