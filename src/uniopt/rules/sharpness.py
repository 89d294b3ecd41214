"""Sharpness-aware minimisation (Foret et al., 2021) around any rule, and its adaptive form
ASAM (Kwon et al., 2021).

A step takes two gradients, at ``w`` and at the perturbed ``w + e``, so it is a
:class:`~uniopt.base.Minimizer` driven by :func:`uniopt.minimize_step` with a closure. The base
rule runs as it would on its own, with its own :class:`~uniopt.State` kept in this part's tree
state, on the gradient at ``w + e``. The engine hands a minimizer the params as one flat
vector; the base rule sees them as their own tree again (per-leaf rules such as Muon see their
matrices), rebuilt from the leaf shapes kept beside its state. The base rule is stepped through
the optax protocol every transform speaks (``init``, ``update``: the engine sits above the
rules, which reach it only so), its step added to the params.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import backend
from ..base import Info, Minimizer, Rule, Transform, makes_step, reads_loss
from ..hyper import NONNEG, hyper
from ..tree import trainables, unflatten
from .sgd import sgd


def _check_base(owner: str, base: Any) -> None:
    if not isinstance(base, Transform):
        raise TypeError(f"{owner}: base must be a uniopt rule or transform, got {base!r}")
    if any(isinstance(p, Minimizer) for p in base.flat_parts):
        raise ValueError(f"{owner}: base must take gradients (an update rule), not evaluate the "
                         f"objective itself; got {base!r}")
    reads = reads_loss(base)
    if reads is not None:
        # (which loss: the one at w, or at the perturbed point whose gradient it steps with?)
        raise ValueError(f"{owner}: base must step from gradients alone; {reads} reads the "
                         "loss of each step")
    if not makes_step(base):
        raise ValueError(f"{owner}: base must make a step (apply a learning rate), not only a "
                         f"direction; got {base!r}")


@dataclass(frozen=True)
class sam_step(Minimizer):
    """One SAM step (the part :class:`sam` runs): ``g = grad(w)``;
    ``e = rho*T^2 g/(|T g| + eps)`` with ``T = 1`` (SAM) or ``|w|`` (``adaptive``: ASAM),
    ``|.|`` the 2-norm over every leaf; ``w <- base(w, grad(w + e))``."""

    real_only = True

    base: Transform = sgd(lr=1e-3)
    rho: Any = hyper(0.05, NONNEG)
    adaptive: bool = False
    eps: Any = hyper(1e-12, NONNEG)

    def check(self) -> None:
        _check_base(self.name, self.base)

    def init_tree(self, params: Any) -> Any:
        # each leaf's shape as that of an empty array (shape (0, *leaf.shape)): an array's
        # shape is static under jax.jit, where Python ints in the state would be traced leaves
        shapes = tuple(backend.namespace(leaf).zeros((0, *leaf.shape), dtype=leaf.dtype,
                                                     device=backend.device(leaf))
                       for leaf in trainables(params))
        return {"base": self.base.init(params), "shapes": shapes}

    def minimize(self, xp: Any, x: Any, state: Any,
                 evaluate: Callable[[Any], tuple[Any, Any]]) -> tuple[Any, Any, Any]:
        # (a state saved before the shapes were arrays holds tuples of ints)
        base, shapes = state["base"], tuple(tuple(int(n) for n in s) if isinstance(s, tuple)
                                            else tuple(s.shape[1:]) for s in state["shapes"])
        loss, g = evaluate(x)
        if self.adaptive:
            scaled = xp.abs(x) * g
            e = (x * x) * g * (self.rho / (xp.sqrt(xp.sum(scaled * scaled)) + self.eps))
        else:
            e = g * (self.rho / (xp.sqrt(xp.sum(g * g)) + self.eps))
        _, g_adv = evaluate(x + e)
        # (the vector is in the leaves' widest dtype: each leaf goes to the base in its own,
        # as its state was set up; a float32 leaf beside a float64 one came as float64, which
        # the base refused as a state "set up for other params")
        dtypes = [None if isinstance(s, tuple) else s.dtype for s in state["shapes"]]
        params = unflatten(base.treedef, _split(xp, x, shapes, dtypes))
        step, base = self.base.update(_split(xp, g_adv, shapes, dtypes), base, params)
        x = x + xp.concat([xp.reshape(v, (-1,)) for v in trainables(step)])
        return x, {"base": base, "shapes": state["shapes"]}, loss


def _split(xp: Any, x: Any, shapes: tuple[tuple[int, ...], ...], dtypes: list[Any]) -> list[Any]:
    out, at = [], 0
    for s, dtype in zip(shapes, dtypes, strict=True):
        n = math.prod(s)
        v = xp.reshape(x[at:at + n], s)
        out.append(v if dtype is None or v.dtype == dtype else xp.astype(v, dtype))
        at += n
    return out


@dataclass(frozen=True)
class sam(Rule):
    r"""Sharpness-aware minimisation (Foret et al., 2021) around the rule ``base``; a step
    needs the closure: :func:`uniopt.minimize_step`.

    ``g = grad(w)``; ``e = rho*g/(|g| + eps)`` (``|.|`` the 2-norm over every leaf);
    ``w <- base(w, grad(w + e))``: the base rule's step, with its own state, on the gradient at
    the perturbed point. ``adaptive=True`` is ASAM (Kwon et al., 2021) as the authors'
    PyTorch code writes it: ``e = rho*w^2 g/(|w g| + eps)``. ``rho`` and ``eps`` may be
    schedules; the base rule's own hyperparameters are fixed once it is built (give it
    schedules). With ``L`` the loss and norms over the whole tree:

    $$
    \begin{aligned}
    g_t &= \nabla L(w_{t-1}), \qquad
    e_t = \begin{cases}
    \rho\, \dfrac{g_t}{\lVert g_t \rVert + \epsilon} & \text{SAM} \\[1ex]
    \rho\, \dfrac{w_{t-1}^2\, g_t}{\lVert\, |w_{t-1}|\, g_t \rVert + \epsilon}
    & \text{adaptive (ASAM)}
    \end{cases} \\
    w_t &= \operatorname{base}\left(w_{t-1},\ \nabla L(w_{t-1} + e_t)\right)
    \end{aligned}
    $$

    Matches ``optax.contrib.sam`` (driven through its two calls per step, ``eps=0``: optax
    normalises with no eps) and ``pytorch_optimizer.SAM`` (eps 1e-12), which sums the squared
    norms in float32 even for float64 tensors, so its perturbation differs from ours by a
    float32 rounding.

    >>> import numpy as np, uniopt as uo
    >>> def closure(p):  # (loss, grads) at the params p
    ...     return float((p["x"] ** 2).sum()), {"x": 2.0 * p["x"]}
    >>> params = {"x": np.array([3.0, 4.0])}
    >>> state = uo.setup(uo.sam(uo.sgd(lr=0.1), rho=0.5), params)
    >>> state, params, loss = uo.minimize_step(state, params, closure)
    >>> loss, params["x"]  # the gradient at x + 0.5 x/|x| = 1.1 x
    (25.0, array([2.34, 3.12]))
    """

    base: Transform = sgd(lr=1e-3)
    rho: Any = hyper(0.05, NONNEG)
    adaptive: bool = False
    eps: Any = hyper(1e-12, NONNEG)

    info: ClassVar[Info] = Info(
        family="sharpness",
        paper="Foret et al. (2021)",
        references=("optax.contrib.sam", "pytorch_optimizer.SAM", "formula"),
        example={"base": sgd(lr=0.002, momentum=0.9), "rho": 0.001},
        needs_closure=True,
        # the perturbation squares the gradient (and ASAM the parameter) as real numbers
        complex=False,
    )

    def check(self) -> None:
        _check_base(self.name, self.base)

    def parts(self) -> tuple[Transform, ...]:
        return (sam_step(base=self.base, rho=self.rho, adaptive=self.adaptive, eps=self.eps),)
