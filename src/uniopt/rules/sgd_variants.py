"""SGD with something added: Gaussian noise, Polyak's step size, an optimistic look-back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .. import backend
from ..base import Info, Rule, Transform, WholeTree
from ..hyper import NONNEG, Interval, check_integer, hyper
from ..transforms.noise import SEEDS, add_noise
from ..transforms.scale import scale_by_lr
from ..tree import flatten_leaves, unflatten
from .adam import scale_by_optimistic_gradient


@dataclass(frozen=True)
class noisy_sgd(Rule):
    r"""SGD with annealed Gaussian noise (Neelakantan et al., 2015) as ``optax.noisy_sgd``:
    ``p <- p - lr*(g + sqrt(eta/t^gamma)*z)``, ``z`` standard normal, ``t`` the update's number
    (:class:`~uniopt.add_noise`, then ``lr``):

    $$
    p_t = p_{t-1} - \mathrm{lr} \left(g_t + \sqrt{\frac{\eta}{t^{\gamma}}}\, z_t\right),
    \qquad z_t \sim \mathcal N(0, I)
    $$

    On JAX arrays the noise is optax's for ``key=seed``, draw for draw; on NumPy and torch,
    their own generators' (see :class:`~uniopt.add_noise`). optax requires ``learning_rate``;
    ``lr`` here defaults to 1e-3.
    """

    lr: Any = hyper(1e-3, NONNEG)
    eta: Any = hyper(0.01, NONNEG)
    gamma: Any = hyper(0.55, NONNEG)
    seed: int = 0

    info: ClassVar[Info] = Info(
        family="sgd",
        paper="Neelakantan et al. (2015)",
        references=("optax.noisy_sgd",),
        # no noise, so the array libraries (each with its own generator) agree; plain gradient
        # descent needs a small lr and many steps through Rosenbrock's valley
        example={"lr": 0.0019, "eta": 0.0},
        budget=3000,
        complex=False,
    )

    def check(self) -> None:
        object.__setattr__(self, "seed", check_integer(self.name, "seed", self.seed, 0, SEEDS))

    def parts(self) -> tuple[Transform, ...]:
        return (add_noise(eta=self.eta, gamma=self.gamma, seed=self.seed),
                scale_by_lr(lr=self.lr))


class PolyakCoeffs(NamedTuple):
    f_min: Any
    max_lr: Any
    eps: Any


VARIANTS = ("sps", "sps+")
# optax's floor on the squared norm, jnp.finfo(float).eps: float64's, whatever the params' type
TINY = float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class scale_by_polyak(WholeTree):
    """Polyak's step size (Loizou et al., 2021) from the loss: ``u <- s*u`` with
    ``s = min((f - f_min)/(|u|^2 + eps), max_learning_rate)`` (``|u|`` over every leaf;
    ``variant="sps+"``: the gap clipped at 0), and ``s = 0`` where ``|u|^2 + eps`` is at most
    float64's machine epsilon; as optax's ``scale_by_polyak``. ``f``, the loss, is the step's
    ``value=``."""

    real_only = True

    f_min: Any = hyper(0.0, Interval(None))
    max_learning_rate: Any = hyper(1.0, NONNEG)
    eps: Any = hyper(0.0, NONNEG)
    variant: str = "sps"

    reads_value: ClassVar[bool] = True
    step_args: ClassVar[tuple[str, ...]] = ("value",)

    def check(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"{self.name}: variant must be one of "
                             f"{', '.join(map(repr, VARIANTS))}, got {self.variant!r}")

    def coeffs(self, step: Any) -> PolyakCoeffs:
        return PolyakCoeffs(f_min=self.f_min, max_lr=self.max_learning_rate, eps=self.eps)

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return ()

    def init_tree(self, params: Any) -> Any:
        return {}

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any,
                   **extra: Any) -> tuple[Any, Any]:
        value = extra.get("value")
        if value is None:
            raise TypeError(
                f"{self.name} reads the loss of each step: pass it as uo.update(state, params, "
                "grads, value=loss), or as tx.update(grads, state, params, value=loss) (in an "
                "optax.chain, which hands value= only to members of its extra-arguments kind, "
                "as uo.to_optax(...) wraps it)")
        leaves, treedef = flatten_leaves(u)
        if not leaves:
            return u, state
        xp = backend.namespace(leaves[0])
        sq = sum(xp.sum(x * x) for x in leaves)
        gap = backend.loss_like(value, sq) - c.f_min
        if self.variant == "sps+":
            gap = xp.maximum(gap, xp.zeros_like(gap))
        den = sq + c.eps
        small = den <= TINY
        s = xp.where(small, xp.zeros_like(gap),
                     xp.minimum(gap / xp.where(small, xp.ones_like(den), den),
                                xp.asarray(c.max_lr, dtype=sq.dtype, device=backend.device(sq))))
        return unflatten(treedef, [s * x for x in leaves]), state


@dataclass(frozen=True)
class polyak_sgd(Rule):
    r"""SGD with Polyak's step size (Loizou et al., 2021) as ``optax.polyak_sgd``:
    ``p <- p - s*scaling*g`` with ``s = min((f - f_min)/(scaling^2*|g|^2 + eps),
    max_learning_rate)`` (:class:`scale_by_polyak` after ``scaling``, as optax orders them, so
    its norm is of ``scaling*g``). With ``f_t`` the loss at ``p_{t-1}``, ``c = scaling`` and
    the norm over the whole tree:

    $$
    s_t = \min\left(\frac{f_t - f_{\min}}{c^2 \lVert g_t \rVert^2 + \epsilon},\
    \text{max_learning_rate}\right), \qquad
    p_t = p_{t-1} - s_t\, c\, g_t
    $$

    (``s_t = 0`` where the denominator is at most float64's machine epsilon). Each step needs
    the loss: ``uo.update(state, params, grads, value=loss)``. ``variant="sps+"``: the gap
    ``f - f_min`` clipped at 0 (Garrigos et al., 2023). ``f_min`` must be a lower bound of the
    loss, or the step can climb.
    """

    max_learning_rate: Any = hyper(1.0, NONNEG)
    scaling: Any = hyper(1.0, NONNEG)
    f_min: Any = hyper(0.0, Interval(None))
    eps: Any = hyper(0.0, NONNEG)
    variant: str = "sps"

    info: ClassVar[Info] = Info(
        family="sgd",
        paper="Loizou et al. (2021)",
        references=("optax.polyak_sgd",),
        example={"max_learning_rate": 0.1},
        complex=False,
    )

    def check(self) -> None:
        scale_by_polyak(variant=self.variant)

    def parts(self) -> tuple[Transform, ...]:
        return (scale_by_lr(lr=self.scaling),
                scale_by_polyak(f_min=self.f_min, max_learning_rate=self.max_learning_rate,
                                eps=self.eps, variant=self.variant))


@dataclass(frozen=True)
class optimistic_gradient_descent(Rule):
    r"""Optimistic gradient descent (Mokhtari et al., 2019) as
    ``optax.optimistic_gradient_descent``: ``p <- p - lr*((alpha + beta)*g_t - beta*g_{t-1})``
    with ``g_0 = g_1`` (:class:`~uniopt.scale_by_optimistic_gradient`). optax requires
    ``learning_rate``; ``lr`` here defaults to 1e-3.

    $$
    p_t = p_{t-1} - \mathrm{lr}\left((\alpha + \beta)\, g_t - \beta\, g_{t-1}\right),
    \qquad g_0 = g_1
    $$
    """

    lr: Any = hyper(1e-3, NONNEG)
    alpha: Any = hyper(1.0, NONNEG)
    beta: Any = hyper(1.0, NONNEG)

    info: ClassVar[Info] = Info(
        family="sgd",
        paper="Mokhtari et al. (2019)",
        references=("optax.optimistic_gradient_descent",),
        example={"lr": 0.0018, "beta": 0.05},
        budget=3000,
    )

    def parts(self) -> tuple[Transform, ...]:
        return (scale_by_optimistic_gradient(alpha=self.alpha, beta=self.beta),
                scale_by_lr(lr=self.lr))
