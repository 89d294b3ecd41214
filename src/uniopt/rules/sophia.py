"""Sophia (Liu et al., 2023): a clipped, diagonally preconditioned momentum step.

Sophia divides its momentum by an EMA of a Hessian-diagonal estimate refreshed every few
steps. uniopt never differentiates (gradients come from anywhere), so the estimate is an input:
:func:`sophia_hessian` folds one into the state, computed by whatever the user differentiates
with. Sophia-H's is Hutchinson's ``r * (H r)`` for a random sign vector ``r`` (optax's
``hutchinson_estimator_diag_hessian``: ``jax.jvp(jax.grad(loss), (params,), (r,))``; torch's
``torch.func.jvp``); Sophia-G's is the Gauss-Newton-Bartlett estimate ``g * g``, ``g`` the
gradient of the loss at labels sampled from the model's own predictions (:func:`sophia_g`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from .. import backend
from ..base import Elementwise, Info, Rule, Transform
from ..hyper import NONNEG, POSITIVE, UNIT_OPEN, Interval, hyper
from ..moments import bias_correction, lerp
from ..state import AnyParams, State
from ..transforms.decay import decayed
from ..transforms.scale import scale_by_lr
from ..tree import flatten_leaves


class SophiaCoeffs(NamedTuple):
    one_minus_b1: Any
    bc1: Any  # 1 - b1^t
    gamma: Any
    eps: Any
    clip: Any
    neg_clip: Any


@dataclass(frozen=True)
class scale_by_sophia(Elementwise):
    """Sophia's direction: ``m <- b1*m + (1-b1)*u``;
    ``u <- clip((m/(1-b1^t))/max(gamma*h, eps), -clip_threshold, clip_threshold)``, ``h`` the
    EMA of Hessian-diagonal estimates (slot ``hessian``, fed by :func:`sophia_hessian`;
    ``b2`` is its decay there). ``use_clipping=False``: no clipping (optax's
    ``clip_threshold=None``)."""

    b1: Any = hyper(0.965, UNIT_OPEN)
    b2: Any = hyper(0.99, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    gamma: Any = hyper(0.01, NONNEG)
    clip_threshold: Any = hyper(1.0, Interval(0.0, None, lo_open=True))
    use_clipping: bool = True
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "hessian")

    def coeffs(self, step: Any) -> SophiaCoeffs:
        c1 = self.one_minus("b1")
        bound = self.clip_threshold if self.use_clipping else math.inf
        return SophiaCoeffs(one_minus_b1=c1, bc1=bias_correction(self.b1, c1, step),
                            gamma=self.gamma, eps=self.eps, clip=bound, neg_clip=-bound)

    @staticmethod
    def kernel(xp, c, p, u, exp_avg, hessian):
        m = lerp(exp_avg, u, c.one_minus_b1)
        r = (m / c.bc1) / xp.maximum(c.gamma * hessian, c.eps)
        return xp.minimum(xp.maximum(r, c.neg_clip), c.clip), m, hessian


@dataclass(frozen=True)
class sophia(Rule):
    """Sophia (Liu et al., 2023) as ``optax.contrib.sophia`` writes it.

    ``m <- b1*m + (1-b1)*g``; ``p <- p - lr*(clip(m_hat/max(gamma*h, eps), c) + wd*p)``, with
    ``h <- b2*h + (1-b2)*d`` folded in by :func:`sophia_hessian` from an estimate ``d`` of the
    Hessian's diagonal, every ``k`` steps (optax's ``update_interval``, default 10: at the
    updates numbered 0, k, 2k, ..., after that update, from ``d`` computed at the params it
    started from). ``h`` starts at 0, so until the first estimate the step is
    ``lr*clip(m_hat/eps)``: a sign step where clipped.

    ``use_clipping=False`` is optax's ``clip_threshold=None``. Defaults are optax's
    (weight_decay 1e-4); optax requires a learning rate, ours is 1e-3. optax's ``verbose`` win
    rate is not offered.

    >>> import numpy as np, uniopt as uo
    >>> p = {"w": np.array([1.0, -2.0])}
    >>> state = uo.setup(uo.sophia(lr=0.1, weight_decay=0.0), p)
    >>> d = {"w": np.array([4.0, 100.0])}  # a Hessian-diagonal estimate at p
    >>> state, p = uo.update(state, p, {"w": np.array([2.0, -4.0])})
    >>> state = uo.sophia_hessian(state, d)
    >>> p["w"]  # h was 0: the first step is clipped to lr per coordinate
    array([ 0.9, -1.9])
    """

    lr: Any = hyper(1e-3, NONNEG)
    b1: Any = hyper(0.965, UNIT_OPEN)
    b2: Any = hyper(0.99, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(1e-4, NONNEG)
    gamma: Any = hyper(0.01, NONNEG)
    clip_threshold: Any = hyper(1.0, Interval(0.0, None, lo_open=True))
    use_clipping: bool = True

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="second-order",
        paper="Liu et al. (2023)",
        references=("optax.contrib.sophia",),
        # the generic problems feed no Hessian estimate: h stays 0, a clipped sign step
        example={"lr": 0.005, "weight_decay": 0.0},
        budget=1000,
    )

    def parts(self) -> tuple[Transform, ...]:
        direction = scale_by_sophia(b1=self.b1, b2=self.b2, eps=self.eps, gamma=self.gamma,
                                    clip_threshold=self.clip_threshold,
                                    use_clipping=self.use_clipping)
        return decayed((direction, scale_by_lr(lr=self.lr)), self.lr, self.weight_decay,
                       "decoupled", self.on("weight_decay"))


class SophiaGCoeffs(NamedTuple):
    b1: Any
    one_minus_b1: Any
    scale: Any  # rho * bs
    eps: Any
    clip: Any  # 1: the trust region is lr
    neg_clip: Any


@dataclass(frozen=True)
class scale_by_sophia_g(Elementwise):
    """Sophia-G's direction as its authors' ``SophiaG`` computes it: ``m <- b1*m + (1-b1)*u``;
    ``u <- clip(m / (rho*bs*h + eps), -1, 1)`` (theirs: ``sign(m) * min(|m|/(...), 1)``, the
    same numbers), ``h`` the EMA of Gauss-Newton-Bartlett estimates ``g*g`` (slot ``hessian``,
    fed by :func:`sophia_hessian`, ``b2`` its decay there). No bias correction; ``bs`` is the
    number of examples the estimate's sampled loss averaged over (theirs: ``step(bs=...)``)."""

    b1: Any = hyper(0.965, UNIT_OPEN)
    b2: Any = hyper(0.99, UNIT_OPEN)
    rho: Any = hyper(0.04, NONNEG)
    bs: Any = hyper(5120, POSITIVE)
    eps: Any = hyper(1e-15, NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "hessian")

    def coeffs(self, step: Any) -> SophiaGCoeffs:
        return SophiaGCoeffs(b1=self.b1, one_minus_b1=self.one_minus("b1"),
                             scale=self.rho * self.bs, eps=self.eps, clip=1.0, neg_clip=-1.0)

    @staticmethod
    def kernel(xp, c, p, u, exp_avg, hessian):
        m = exp_avg * c.b1 + u * c.one_minus_b1
        r = m / (c.scale * hessian + c.eps)
        return xp.minimum(xp.maximum(r, c.neg_clip), c.clip), m, hessian

    @staticmethod
    def fold(h: Any, d: Any, b2: Any, one_minus_b2: Any) -> Any:
        """``h`` after the estimate ``d``, as theirs writes it: ``h*b2 + (1-b2)*d``."""
        return h * b2 + one_minus_b2 * d


@dataclass(frozen=True)
class sophia_g(Rule):
    """Sophia-G (Liu et al., 2023) as its authors' ``SophiaG`` (github.com/Liuhong99/Sophia)
    writes it: ``m <- b1*m + (1-b1)*g``;
    ``p <- p*(1 - lr*wd) - lr*clip(m/(rho*bs*h + eps), -1, 1)``, with ``h <- b2*h + (1-b2)*g_s*g_s``
    folded in by :func:`sophia_hessian` from ``g_s*g_s``, ``g_s`` the gradient of the loss at
    labels sampled from the model's predictions (their ``update_hessian()``, every ``k``
    steps: 10 in their training script). ``bs`` is the number of examples that loss averaged
    over (their ``step(bs=5120)``); ``eps`` is their ``1e-15``. Unlike :func:`sophia` (optax's
    form, the paper's ``max(gamma*h, eps)``), no bias correction, and the clip is at 1: the
    trust region is ``lr``. Defaults are theirs.

    >>> import numpy as np, uniopt as uo
    >>> p = [np.array([1.0, -2.0])]
    >>> state = uo.setup(uo.sophia_g(lr=0.1, weight_decay=0.0, bs=1, rho=1.0), p)
    >>> gs = [np.array([2.0, 20.0])]  # the gradient at sampled labels
    >>> state = uo.sophia_hessian(state, [g * g for g in gs])
    >>> state, p = uo.update(state, p, [np.array([2.0, -4.0])])
    >>> p[0]  # m = 0.035 g, h = 0.01 g_s^2: 0.07/0.04 clipped to 1, then -0.14/4; times lr
    array([ 0.9   , -1.9965])
    """

    lr: Any = hyper(1e-4, NONNEG)
    betas: tuple[Any, Any] = hyper((0.965, 0.99), UNIT_OPEN)
    rho: Any = hyper(0.04, NONNEG)
    weight_decay: Any = hyper(1e-1, NONNEG)
    bs: Any = hyper(5120, POSITIVE)
    eps: Any = hyper(1e-15, NONNEG)

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="second-order",
        paper="Liu et al. (2023)",
        references=("formula",),
        # the generic problems feed no estimate: h stays 0, a clipped sign step
        example={"lr": 0.005, "weight_decay": 0.0},
        budget=1000,
    )

    def parts(self) -> tuple[Transform, ...]:
        direction = scale_by_sophia_g(b1=self.betas[0], b2=self.betas[1], rho=self.rho,
                                      bs=self.bs, eps=self.eps)
        return decayed((direction, scale_by_lr(lr=self.lr)), self.lr, self.weight_decay,
                       "decoupled", self.on("weight_decay"))


def sophia_hessian(state: State, diagonal: Any) -> State:
    """``state`` with Sophia's EMA ``h <- b2*h + (1-b2)*d`` of the Hessian-diagonal estimate
    ``diagonal`` (a tree shaped like the params, or a flat list or tuple in
    :func:`uniopt.trainables` order), ``b2`` as it is at the state's step. Pure: a new state. Every
    :class:`scale_by_sophia` part of the state's rule takes it.

    Raises ValueError where the rule has no such part or the estimate does not match."""
    keys = [(part, keys[1]) for part, keys in state.rule.keyed_parts
            if isinstance(part, (scale_by_sophia, scale_by_sophia_g))]
    if not keys:
        raise ValueError(f"sophia_hessian: the state's rule has no Sophia part: {state.rule!r}")
    # as update takes gradients: a tree of the params' structure, else a flat list or tuple
    # of arrays in trainables order (a tree of other keys was taken leaf by leaf, in its order)
    leaves, treedef = flatten_leaves(diagonal)
    if treedef != state.treedef and not isinstance(state.treedef, AnyParams):
        if not (isinstance(diagonal, (list, tuple)) and all(map(backend.is_array, diagonal))):
            raise ValueError(f"sophia_hessian: the estimate's tree is not the params': got "
                             f"{treedef}, expected {state.treedef}")
        leaves = list(diagonal)
    slots = dict(state.slots)
    for part, key in keys:
        old = slots[key]
        if len(leaves) != len(old) or any(tuple(d.shape) != tuple(h.shape)
                                          for d, h in zip(leaves, old, strict=True)):
            raise ValueError(
                "sophia_hessian: the estimate must have the params' leaves and shapes: got "
                f"shapes {[tuple(d.shape) for d in leaves]}, expected "
                f"{[tuple(h.shape) for h in old]}")
        now = part.at(state.step)
        w = now.one_minus("b2")
        if isinstance(now, scale_by_sophia_g):
            slots[key] = [None if h is None else now.fold(h, d, now.b2, w)
                          for h, d in zip(old, leaves, strict=True)]
            continue
        slots[key] = [None if h is None else lerp(h, d, w) for h, d in zip(old, leaves,
                                                                              strict=True)]
    return dataclasses.replace(state, slots=slots)
