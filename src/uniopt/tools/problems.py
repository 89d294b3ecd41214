"""Small test problems with analytic gradients, for ``uniopt compare`` and the tests.

Each problem is a frozen dataclass whose fields fix the problem itself (dimension, conditioning,
the seed of its data); ``init(seed)`` gives a starting point, so one problem can be started from
many places while its minimum stays the same. Params are float64 NumPy arrays in a list, or in a
dict for :class:`Logistic`, so the comparison also walks a tree with more than one leaf.

``optimum`` is the minimum loss and ``argmin`` a point that attains it: exact for
:class:`Rosenbrock` and :class:`Quadratic`, from Newton's method (computed once per instance and
cached) for :class:`Logistic`.

>>> p = PROBLEMS["logistic"]
>>> params = p.init(0)
>>> sorted(params), params["w"].shape, params["b"].shape
(['b', 'w'], (20,), ())
>>> bool(p.loss(params) > p.optimum)
True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]


class Problem(Protocol):
    """What ``uniopt compare`` needs of a problem."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def optimum(self) -> float: ...

    def init(self, seed: int) -> Any: ...

    def loss(self, params: Any) -> float: ...

    def grad(self, params: Any) -> Any: ...


@dataclass(frozen=True)
class Rosenbrock:
    """``sum_i 100 (x[i+1] - x[i]^2)^2 + (1 - x[i])^2``; minimum 0 at ``x = 1``.

    Every start is the classic ``(-1.2, 1, -1.2, 1, ...)``: the curved valley from that point is
    the benchmark, so ``init`` ignores its seed.
    """

    dim: int = 2
    name: str = "rosenbrock"

    def __post_init__(self) -> None:
        if self.dim < 2:
            raise ValueError(f"rosenbrock: dim must be at least 2, got {self.dim}")

    @property
    def description(self) -> str:
        return f"{self.dim}-d Rosenbrock from (-1.2, 1, ...)"

    @property
    def optimum(self) -> float:
        return 0.0

    @property
    def argmin(self) -> list[Array]:
        return [np.ones(self.dim)]

    def init(self, seed: int) -> list[Array]:
        return [np.resize(np.array([-1.2, 1.0]), self.dim)]

    def loss(self, params: list[Array]) -> float:
        (x,) = params
        return float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))

    def grad(self, params: list[Array]) -> list[Array]:
        (x,) = params
        r = x[1:] - x[:-1] ** 2
        g = np.zeros_like(x)
        g[:-1] = -400.0 * x[:-1] * r - 2.0 * (1.0 - x[:-1])
        g[1:] += 200.0 * r
        return [g]


@dataclass(frozen=True)
class Quadratic:
    """``0.5 x^T A x - b^T x`` with ``A = Q diag(lam) Q^T``: eigenvalues log-spaced from 1 to
    ``cond``, ``Q`` a random rotation and ``b`` random, both drawn from ``data_seed``.

    Starts are standard normal; the minimum is ``-0.5 b^T A^{-1} b`` at ``A^{-1} b``.
    """

    dim: int = 50
    cond: float = 1e3
    data_seed: int = 0
    name: str = "quadratic"

    def __post_init__(self) -> None:
        if self.dim < 1 or not self.cond >= 1.0:
            raise ValueError(
                f"quadratic: need dim >= 1 and cond >= 1, got dim={self.dim}, cond={self.cond}"
            )

    @property
    def description(self) -> str:
        return f"{self.dim}-d quadratic, condition number {self.cond:g}, random rotation"

    @functools.cached_property
    def _data(self) -> tuple[Array, Array, Array, Array]:
        """``(A, b, eigenvalues, Q)``."""
        rng = np.random.default_rng(self.data_seed)
        # QR of a Gaussian matrix, signs fixed by R's diagonal: a uniformly random rotation
        q, r = np.linalg.qr(rng.standard_normal((self.dim, self.dim)))
        q = q * np.sign(np.diag(r))
        lam = np.logspace(0.0, np.log10(self.cond), self.dim)
        a = (q * lam) @ q.T
        a = 0.5 * (a + a.T)
        b = rng.standard_normal(self.dim)
        return a, b, lam, q

    @functools.cached_property
    def argmin(self) -> list[Array]:
        _, b, lam, q = self._data
        return [q @ ((q.T @ b) / lam)]

    @functools.cached_property
    def optimum(self) -> float:
        _, b, _, _ = self._data
        return float(-0.5 * b @ self.argmin[0])

    def init(self, seed: int) -> list[Array]:
        return [np.random.default_rng(seed).standard_normal(self.dim)]

    def loss(self, params: list[Array]) -> float:
        (x,) = params
        a, b, _, _ = self._data
        return float(0.5 * x @ (a @ x) - b @ x)

    def grad(self, params: list[Array]) -> list[Array]:
        (x,) = params
        a, b, _, _ = self._data
        return [a @ x - b]


def _log1pexp(z: Array) -> Array:
    """``log(1 + exp(z))`` without overflow."""
    return np.logaddexp(0.0, z)


def _sigmoid(z: Array) -> Array:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@dataclass(frozen=True)
class Logistic:
    """L2-regularised logistic regression on a synthetic data set drawn from ``data_seed``.

    ``mean_i log(1 + exp(-y_i (x_i . w + b))) + l2/2 (|w|^2 + b^2)``, labels ``y`` in
    ``{-1, 1}`` drawn from the logistic model itself (so the classes overlap); params are
    ``{"w": (features,), "b": ()}``. The penalty on ``b`` too makes the loss strictly convex
    with a finite minimiser whatever the data. Starts: ``w`` normal with scale 0.1, ``b = 0``.
    """

    samples: int = 500
    features: int = 20
    l2: float = 1e-3
    data_seed: int = 0
    name: str = "logistic"

    def __post_init__(self) -> None:
        if self.samples < 1 or self.features < 1 or not self.l2 > 0:
            raise ValueError(
                "logistic: need samples >= 1, features >= 1 and l2 > 0, got "
                f"samples={self.samples}, features={self.features}, l2={self.l2}"
            )

    @property
    def description(self) -> str:
        return (
            f"logistic regression, {self.samples} samples x {self.features} features, "
            f"L2 {self.l2:g}"
        )

    @functools.cached_property
    def _data(self) -> tuple[Array, Array]:
        """``(x, y)``."""
        rng = np.random.default_rng(self.data_seed)
        x = rng.standard_normal((self.samples, self.features))
        w_true = rng.standard_normal(self.features) / np.sqrt(self.features) * 2.0
        p = _sigmoid(x @ w_true + 0.5)
        y = np.where(rng.random(self.samples) < p, 1.0, -1.0)
        return x, y

    def init(self, seed: int) -> dict[str, Array]:
        rng = np.random.default_rng(seed)
        return {"w": 0.1 * rng.standard_normal(self.features), "b": np.zeros(())}

    def _margins(self, w: Array, b: Array | float) -> Array:
        x, y = self._data
        return y * (x @ w + b)

    def loss(self, params: dict[str, Array]) -> float:
        w, b = params["w"], params["b"]
        m = self._margins(w, b)
        return float(np.mean(_log1pexp(-m)) + 0.5 * self.l2 * (w @ w + b * b))

    def grad(self, params: dict[str, Array]) -> dict[str, Array]:
        x, y = self._data
        w, b = params["w"], params["b"]
        # d/dm log(1 + exp(-m)) = -sigmoid(-m)
        r = -y * _sigmoid(-self._margins(w, b)) / self.samples
        return {"w": x.T @ r + self.l2 * w, "b": np.asarray(np.sum(r) + self.l2 * b)}

    @functools.cached_property
    def argmin(self) -> dict[str, Array]:
        """The minimiser by Newton's method on ``(w, b)``, from zero."""
        x, y = self._data
        xb = np.hstack([x, np.ones((self.samples, 1))])
        theta = np.zeros(self.features + 1)
        for _ in range(100):
            params = {"w": theta[:-1], "b": np.asarray(theta[-1])}
            g = self.grad(params)
            g_flat = np.append(g["w"], g["b"])
            if np.max(np.abs(g_flat)) < 1e-14:
                break
            s = _sigmoid(y * (xb @ theta))
            h = (xb.T * (s * (1.0 - s) / self.samples)) @ xb + self.l2 * np.eye(len(theta))
            theta = theta - np.linalg.solve(h, g_flat)
        else:  # pragma: no cover - Newton converges in ~10 steps on a strictly convex loss
            raise RuntimeError("logistic: Newton's method did not converge")
        return {"w": theta[:-1].copy(), "b": np.asarray(theta[-1])}

    @functools.cached_property
    def optimum(self) -> float:
        return self.loss(self.argmin)


PROBLEMS: dict[str, Problem] = {p.name: p for p in (Rosenbrock(), Quadratic(), Logistic())}
