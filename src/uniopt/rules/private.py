"""Differentially private SGD (Abadi et al., 2016): per-example clipping, then Gaussian noise.

optax's ``contrib.dpsgd`` takes per-example gradients, every leaf with a leading batch axis, and
does the clipping and the summing inside its first transformation. uniopt's step takes a
gradient shaped like the params (the engine checks each leaf's shape against its parameter's,
and every part, slot and strategy relies on it), so the step is split where the data changes
shape: :func:`per_example_global_norm_clip` (a pure function of the per-example gradients, no
state) sums the clipped per-example gradients into a params-shaped tree, and the rule's first
part, :class:`differentially_private_aggregate`, adds the noise (its generator is the part's
state) and divides by the batch size. :meth:`dpsgd.aggregate` does the first half with the
rule's own clipping norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .. import backend
from ..base import Info, Rule, Transform, WholeTree
from ..hyper import NONNEG, Interval, check_integer, hyper, static
from ..transforms.momentum import trace
from ..transforms.noise import _DRAW, SEEDS, _kind, add_noise  # add_noise's generators
from ..transforms.scale import scale_by_lr
from ..tree import flatten_leaves, unflatten

COUNT = Interval(1, None, integer=True)


def per_example_global_norm_clip(grads: Any, l2_norm_clip: float) -> tuple[Any, Any]:
    """``(sum_i c_i g_i, number of examples clipped)`` for per-example gradients ``g_i`` (every
    leaf of ``grads`` with the examples along its leading axis), ``c_i = min(l2_norm_clip/|g_i|,
    1)`` with ``|g_i|`` the norm of example ``i`` over the whole tree (1 where it is 0 or NaN);
    as ``optax.per_example_global_norm_clip``. The sum has the params' shapes: it is what
    :class:`dpsgd` takes as its gradient. Any array library.

    >>> import numpy as np, uniopt as uo
    >>> total, n = uo.per_example_global_norm_clip([np.array([[0., 0.], [3., 4.]])], 2.5)
    >>> total[0].tolist(), int(n)
    ([1.5, 2.0], 1)
    """
    leaves, treedef = flatten_leaves(grads)
    if not leaves or any(x.ndim == 0 for x in leaves) or len({x.shape[0] for x in leaves}) > 1:
        raise ValueError("per_example_global_norm_clip: every leaf needs the examples along "
                         "its leading axis, the same number in each, got shapes "
                         f"{[tuple(x.shape) for x in leaves]}")
    xp = backend.namespace(leaves[0])
    n = leaves[0].shape[0]
    squares = sum(xp.sum(xp.reshape(x * x, (n, -1)), axis=1) for x in leaves)
    norms = xp.sqrt(squares)
    over = norms > l2_norm_clip  # False for NaN: NaN's multiplier is 1, as optax's
    c = xp.where(over, l2_norm_clip / xp.where(over, norms, xp.ones_like(norms)),
                 xp.ones_like(norms))
    out = [xp.sum(xp.reshape(c, (n,) + (1,) * (x.ndim - 1)) * x, axis=0) for x in leaves]
    return unflatten(treedef, out), xp.sum(xp.astype(c < 1, xp.int32))


class PrivateCoeffs(NamedTuple):
    std: Any  # l2_norm_clip*noise_multiplier


@dataclass(frozen=True)
class differentially_private_aggregate(WholeTree):
    """``u <- (u + l2_norm_clip*noise_multiplier*z)/batch_size``, ``z`` standard normal, for
    ``u`` the sum of the batch's clipped per-example gradients
    (:func:`per_example_global_norm_clip`): optax's ``contrib.differentially_private_aggregate``
    after its clipping. On JAX arrays the noise is optax's for ``key=seed``, draw for draw
    (``key, *keys = split(key, n + 1)``, one key per leaf); on NumPy and torch, their own
    generators', as :class:`~uniopt.add_noise`'s. ``batch_size``: the number of examples
    summed (optax reads it from the input's leading axis)."""

    real_only = True

    l2_norm_clip: Any = static(1.0, NONNEG)  # not schedulable, as in optax
    noise_multiplier: Any = static(1.0, NONNEG)
    batch_size: int = static(1, COUNT)
    seed: int = 0

    def check(self) -> None:
        object.__setattr__(self, "seed", check_integer(self.name, "seed", self.seed, 0, SEEDS))

    def coeffs(self, step: Any) -> PrivateCoeffs:
        return PrivateCoeffs(std=self.l2_norm_clip * self.noise_multiplier)

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return ()  # (a generator's state: a few numbers)

    def init_tree(self, params: Any) -> Any:
        return add_noise(seed=self.seed).init_tree(params)

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any,
                   **extra: Any) -> tuple[Any, Any]:
        leaves, treedef = flatten_leaves(u)
        first = leaves[0] if leaves else np.zeros(0)
        kind = _kind(state)
        lib = "jax" if backend.is_jax(first) else "torch" if backend.is_torch(first) else "numpy"
        if kind != lib:
            raise TypeError(f"{self.name}: its state holds a {kind} generator, the updates are "
                            f"{backend.library(first)} arrays: set the state up for these params")
        z, state = (_draw_jax if kind == "jax" else _DRAW[kind])(state, leaves)
        b = float(self.batch_size)
        return unflatten(treedef, [(x + c.std * n) / b for x, n in zip(leaves, z, strict=True)]), \
            state


def _draw_jax(state: Any, leaves: list[Any]) -> tuple[list[Any], Any]:
    """optax's privacy noise: the key split into one for the next step and one per leaf."""
    import jax

    key, *keys = jax.random.split(jax.random.wrap_key_data(state), len(leaves) + 1)
    z = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return z, jax.random.key_data(key)


@dataclass(frozen=True)
class dpsgd(Rule):
    r"""DP-SGD (Abadi et al., 2016) as ``optax.contrib.dpsgd``: each example's gradient
    clipped to norm ``l2_norm_clip`` (over the whole tree), summed, Gaussian noise of standard
    deviation ``l2_norm_clip*noise_multiplier`` added, divided by the batch size; then
    momentum (optax's ``trace``: ``m <- momentum*m + g``, ``nesterov``: ``g + momentum*m``; 0:
    none, optax's None) and ``p <- p - lr*m``. With ``g_{t,i}`` example ``i``'s gradient,
    ``C = l2_norm_clip``, ``sigma = noise_multiplier``, ``B = batch_size``, ``mu = momentum``:

    $$
    \begin{aligned}
    \bar g_t &= \frac{1}{B} \left(\sum_{i=1}^{B}
    \frac{g_{t,i}}{\max\left(1, \lVert g_{t,i} \rVert / C\right)}
    + \sigma C\, z_t\right), \qquad z_t \sim \mathcal N(0, I) \\
    m_t &= \mu\, m_{t-1} + \bar g_t \\
    p_t &= p_{t-1} - \mathrm{lr} \cdot
    \begin{cases} \bar g_t + \mu\, m_t & \text{nesterov} \\ m_t & \text{otherwise} \end{cases}
    \end{aligned}
    $$

    **Input.** optax takes the per-example gradients (a leading batch axis on every leaf).
    uniopt's gradient is shaped like the params, so the clipping and summing happen before
    the step: ``uo.update(state, params, rule.aggregate(per_example_grads))``, with
    :meth:`aggregate` (:func:`per_example_global_norm_clip` at ``l2_norm_clip``) turning the
    ``(batch_size, *shape)`` leaves into ``shape`` ones; the rule (its first part,
    :class:`differentially_private_aggregate`) adds the noise and divides by ``batch_size``, a
    hyperparameter here (optax reads it from the input). On JAX arrays the noise is optax's
    for ``key=seed``; on NumPy and torch, their generators'. optax requires every argument;
    the defaults here are ``lr=1e-3``, ``l2_norm_clip=1``, ``noise_multiplier=1``.
    """

    lr: Any = hyper(1e-3, NONNEG)
    l2_norm_clip: Any = static(1.0, NONNEG)  # not schedulable, as in optax
    noise_multiplier: Any = static(1.0, NONNEG)
    batch_size: int = static(1, COUNT)
    seed: int = 0
    momentum: Any = hyper(0.0, NONNEG)
    nesterov: bool = False

    optional: ClassVar[tuple[str, ...]] = ("momentum",)

    info: ClassVar[Info] = Info(
        family="sgd",
        paper="Abadi et al. (2016)",
        references=("optax.contrib.dpsgd",),
        # no noise, so the array libraries (each with its own generator) agree
        example={"lr": 0.0018, "noise_multiplier": 0.0, "l2_norm_clip": 1e9, "momentum": 0.5},
        budget=3000,
        complex=False,
    )

    def check(self) -> None:
        object.__setattr__(self, "seed", check_integer(self.name, "seed", self.seed, 0, SEEDS))
        if self.nesterov and not self.on("momentum"):
            raise ValueError(f"{self.name}: nesterov needs a momentum > 0, got "
                             f"{self.momentum!r}")

    def aggregate(self, per_example_grads: Any) -> Any:
        """The step's gradient from per-example gradients (each leaf ``(batch_size, *shape)``):
        their sum, each clipped to norm ``l2_norm_clip``."""
        leaves, _ = flatten_leaves(per_example_grads)
        if leaves and any(x.ndim == 0 or x.shape[0] != self.batch_size for x in leaves):
            raise ValueError(f"{self.name}: per-example gradients need {self.batch_size} "
                             f"examples (batch_size) along each leaf's leading axis, got "
                             f"shapes {[tuple(x.shape) for x in leaves]}")
        return per_example_global_norm_clip(per_example_grads, self.l2_norm_clip)[0]

    def parts(self) -> tuple[Transform, ...]:
        noise = differentially_private_aggregate(
            l2_norm_clip=self.l2_norm_clip, noise_multiplier=self.noise_multiplier,
            batch_size=self.batch_size, seed=self.seed)
        heavy = ((trace(momentum=self.momentum, nesterov=self.nesterov, hold=False),)
                 if self.on("momentum") else ())
        return (noise, *heavy, scale_by_lr(lr=self.lr))
