"""Small test problems with analytic gradients, for ``uniopt compare`` and the tests.

Each problem is a frozen dataclass whose fields fix the problem itself (dimension, conditioning,
the seed of its data); ``init(seed)`` gives a starting point, so one problem can be started from
many places while its minimum stays the same. Params are float64 NumPy arrays in a list, or in a
dict for :class:`Logistic`, so the comparison also walks a tree with more than one leaf.

``hvp(params)`` is the Hessian-vector product at ``params``, a function ``v -> H v`` (a tree like
the params), exact, for a rule whose step reads ``hvp=`` (:func:`uniopt.sophia_h`); a problem
of the user's own may go without one.

``optimum`` is the minimum loss and ``argmin`` a point that attains it: exact for
:class:`Rosenbrock`, :class:`Beale` and :class:`Quadratic`, from Newton's method (computed once
per instance and cached) for :class:`Logistic`; ``None`` where no one knows it (:class:`MLP`, and
a problem of the user's own, :class:`UserProblem`, that does not say).

>>> p = PROBLEMS["logistic"]
>>> params = p.init(0)
>>> sorted(params), params["w"].shape, params["b"].shape
(['b', 'w'], (20,), ())
>>> bool(p.loss(params) > p.optimum)
True
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from ..hyper import did_you_mean

Array = NDArray[np.float64]


class Problem(Protocol):
    """What ``uniopt compare`` needs of a problem."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def optimum(self) -> float | None: ...

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

    def hvp(self, params: list[Array]) -> Callable[[list[Array]], list[Array]]:
        (x,) = params

        def hv(v: list[Array]) -> list[Array]:
            (u,) = v
            a = x[:-1]
            out = np.zeros_like(x)  # H is tridiagonal, -400 x[i] beside its diagonal
            out[:-1] = (2.0 + 1200.0 * a * a - 400.0 * x[1:]) * u[:-1] - 400.0 * a * u[1:]
            out[1:] += 200.0 * u[1:] - 400.0 * a * u[:-1]
            return [out]

        return hv


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

    def hvp(self, params: list[Array]) -> Callable[[list[Array]], list[Array]]:
        a = self._data[0]
        return lambda v: [a @ v[0]]


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

    def hvp(self, params: dict[str, Array]) -> Callable[[dict[str, Array]], dict[str, Array]]:
        x, _ = self._data
        w, b = params["w"], params["b"]

        def hv(v: dict[str, Array]) -> dict[str, Array]:
            # H = X^T diag(s (1 - s)) X / samples + l2 I over (w, b), s the sigmoid of margins
            s = _sigmoid(self._margins(w, b))
            d = s * (1.0 - s) / self.samples * (x @ v["w"] + v["b"])
            return {"w": x.T @ d + self.l2 * v["w"],
                    "b": np.asarray(np.sum(d) + self.l2 * v["b"])}

        return hv

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


@dataclass(frozen=True)
class Beale:
    """Beale's function, ``sum_i (c_i - x + x y^i)^2`` for ``c = (1.5, 2.25, 2.625)``; minimum 0
    at ``(3, 0.5)``, in a narrow curved valley between steep walls.

    Every start is ``(1, 1)`` (seed ignored, as for :class:`Rosenbrock`): from there the valley
    bends through a quarter turn on its way to the minimum.
    """

    name: str = "beale"

    @property
    def description(self) -> str:
        return "2-d Beale from (1, 1)"

    @property
    def optimum(self) -> float:
        return 0.0

    @property
    def argmin(self) -> list[Array]:
        return [np.array([3.0, 0.5])]

    def init(self, seed: int) -> list[Array]:
        return [np.array([1.0, 1.0])]

    @staticmethod
    def _terms(x: np.float64, y: np.float64) -> list[tuple[np.float64, int]]:
        """``(r_i, i)``: each residual ``c_i - x + x y^i`` with its power of ``y`` (NumPy
        scalars: a diverging run overflows to inf, as arrays do, not to an OverflowError)."""
        return [(c - x + x * y**i, i) for i, c in ((1, 1.5), (2, 2.25), (3, 2.625))]

    def loss(self, params: list[Array]) -> float:
        (p,) = params
        return float(sum(r * r for r, _ in self._terms(p[0], p[1])))

    def grad(self, params: list[Array]) -> list[Array]:
        (p,) = params
        x, y = p[0], p[1]
        gx = gy = np.float64(0.0)
        for r, i in self._terms(x, y):
            gx += 2.0 * r * (y**i - 1.0)
            gy += 2.0 * r * x * i * y ** (i - 1)
        return [np.array([gx, gy])]

    def hvp(self, params: list[Array]) -> Callable[[list[Array]], list[Array]]:
        (p,) = params

        def hv(v: list[Array]) -> list[Array]:
            x, y = p[0], p[1]
            hxx = hxy = hyy = np.float64(0.0)
            for r, i in self._terms(x, y):
                rx, ry = y**i - 1.0, x * i * y ** (i - 1)  # the residual's gradient
                hxx += 2.0 * rx * rx
                hxy += 2.0 * (rx * ry + r * i * y ** (i - 1))
                # (i - 1) y^(i - 2), written so that i = 1 at y = 0 is 0, not 0 / 0
                hyy += 2.0 * (ry * ry + r * x * i * (i - 1) * y ** max(i - 2, 0))
            (u,) = v
            return [np.array([hxx * u[0] + hxy * u[1], hxy * u[0] + hyy * u[1]])]

        return hv


def two_moons(samples: int, noise: float, seed: int) -> tuple[Array, Array]:
    """Two interleaved half circles in the plane, ``(x (samples, 2), y in {-1, 1})``, with
    Gaussian noise of scale ``noise``, drawn from ``seed`` (scikit-learn's ``make_moons`` data,
    generated here so that NumPy is all it takes)."""
    rng = np.random.default_rng(seed)
    upper = samples // 2
    t = np.concatenate([np.linspace(0.0, np.pi, upper), np.linspace(0.0, np.pi, samples - upper)])
    x = np.stack([np.cos(t), np.sin(t)], axis=1)
    x[upper:] = np.stack([1.0 - np.cos(t[upper:]), 0.5 - np.sin(t[upper:])], axis=1)
    x += noise * rng.standard_normal(x.shape)
    y = np.where(np.arange(samples) < upper, 1.0, -1.0)
    return x, y


@dataclass(frozen=True)
class MLP:
    """A small network on the two moons: ``2 -> hidden -> hidden -> 1``, tanh, the logistic loss
    ``mean_i log(1 + exp(-y_i f(x_i)))``; params ``{"w1", "b1", "w2", "b2", "w3", "b3"}``
    (weights as ``(out, in)``, torch's layout). Starts: Glorot-normal weights and zero biases
    drawn from the seed. Non-convex, and its minimum is unknown (the loss tends to 0 on
    separable data as the weights grow), so ``optimum`` is ``None``.
    """

    samples: int = 200
    hidden: int = 16
    noise: float = 0.1
    data_seed: int = 0
    name: str = "mlp"

    def __post_init__(self) -> None:
        if self.samples < 2 or self.hidden < 1 or not self.noise >= 0:
            raise ValueError(
                "mlp: need samples >= 2, hidden >= 1 and noise >= 0, got "
                f"samples={self.samples}, hidden={self.hidden}, noise={self.noise}"
            )

    @property
    def description(self) -> str:
        h = self.hidden
        return f"MLP 2-{h}-{h}-1 (tanh) on {self.samples} two-moons points, logistic loss"

    @property
    def optimum(self) -> None:
        return None

    @functools.cached_property
    def _data(self) -> tuple[Array, Array]:
        return two_moons(self.samples, self.noise, self.data_seed)

    def init(self, seed: int) -> dict[str, Array]:
        rng = np.random.default_rng(seed)
        h = self.hidden

        def glorot(fan_out: int, fan_in: int) -> Array:
            return rng.standard_normal((fan_out, fan_in)) * np.sqrt(2.0 / (fan_in + fan_out))

        return {
            "w1": glorot(h, 2), "b1": np.zeros(h),
            "w2": glorot(h, h), "b2": np.zeros(h),
            "w3": glorot(1, h), "b3": np.zeros(1),
        }  # fmt: skip

    def _forward(self, p: dict[str, Array]) -> tuple[Array, Array, Array]:
        x, _ = self._data
        h1 = np.tanh(x @ p["w1"].T + p["b1"])
        h2 = np.tanh(h1 @ p["w2"].T + p["b2"])
        return h1, h2, (h2 @ p["w3"].T + p["b3"])[:, 0]

    def loss(self, params: dict[str, Array]) -> float:
        _, y = self._data
        return float(np.mean(_log1pexp(-y * self._forward(params)[2])))

    def grad(self, params: dict[str, Array]) -> dict[str, Array]:
        x, y = self._data
        h1, h2, f = self._forward(params)
        df = (-y * _sigmoid(-y * f) / self.samples)[:, None]  # dloss/df, (samples, 1)
        d2 = (df @ params["w3"]) * (1.0 - h2 * h2)
        d1 = (d2 @ params["w2"]) * (1.0 - h1 * h1)
        return {
            "w1": d1.T @ x, "b1": d1.sum(0),
            "w2": d2.T @ h1, "b2": d2.sum(0),
            "w3": df.T @ h2, "b3": df.sum(0),
        }  # fmt: skip

    def hvp(self, params: dict[str, Array]) -> Callable[[dict[str, Array]], dict[str, Array]]:
        """Pearlmutter's R-operator: :meth:`grad`'s forward and backward passes differentiated
        along ``v``, so ``H v`` costs two passes and is exact."""
        p = params

        def hv(v: dict[str, Array]) -> dict[str, Array]:
            x, y = self._data
            h1, h2, f = self._forward(p)
            rh1 = (1.0 - h1 * h1) * (x @ v["w1"].T + v["b1"])
            rh2 = (1.0 - h2 * h2) * (rh1 @ p["w2"].T + h1 @ v["w2"].T + v["b2"])
            rf = rh2 @ p["w3"].T + h2 @ v["w3"].T + v["b3"]
            s = _sigmoid(-y * f)[:, None]
            df = -y[:, None] * s / self.samples
            rdf = s * (1.0 - s) / self.samples * rf
            e2 = df @ p["w3"]
            d2 = e2 * (1.0 - h2 * h2)
            rd2 = (rdf @ p["w3"] + df @ v["w3"]) * (1.0 - h2 * h2) - 2.0 * e2 * h2 * rh2
            e1 = d2 @ p["w2"]
            rd1 = (rd2 @ p["w2"] + d2 @ v["w2"]) * (1.0 - h1 * h1) - 2.0 * e1 * h1 * rh1
            return {
                "w1": rd1.T @ x, "b1": rd1.sum(0),
                "w2": rd2.T @ h1 + d2.T @ rh1, "b2": rd2.sum(0),
                "w3": rdf.T @ h2 + df.T @ rh2, "b3": rdf.sum(0),
            }  # fmt: skip

        return hv


PROBLEMS: dict[str, Problem] = {
    p.name: p for p in (Rosenbrock(), Quadratic(), Logistic(), Beale(), MLP())
}
# what ``uniopt compare`` runs when no --problems are given: the quick ones
DEFAULT_PROBLEMS: tuple[str, ...] = ("rosenbrock", "quadratic", "logistic")


class BadProblem(ValueError):
    """A problem of the user's own whose function breaks its contract, ``params -> (loss,
    grads)``: the message names the function and what it returned."""


@dataclass(frozen=True)
class UserProblem:
    """A problem of the user's own, ``module:function`` on the command line (see :func:`load`):
    ``function(params) -> (loss, grads)``, started from ``function.x0`` (an array, a list of
    numbers, or a tree of arrays) or from ``function.init(seed)``; ``function.optimum``, if set,
    is its minimum loss."""

    name: str
    function: Any
    optimum: float | None = None

    @property
    def description(self) -> str:
        doc = (getattr(self.function, "__doc__", None) or "").strip().split("\n")[0]
        return doc or "a problem of your own"

    def init(self, seed: int) -> Any:
        init = getattr(self.function, "init", None)
        try:
            x0 = init(seed) if callable(init) else self.function.x0
            if isinstance(x0, list | tuple) and all(isinstance(v, int | float) for v in x0):
                return np.array(x0, dtype=np.float64)
            import optree

            return optree.tree_map(lambda a: np.array(a, dtype=np.float64), x0)
        except Exception as e:  # the user's code, or a start that is no array of numbers
            raise BadProblem(f"{self.name}: its start ({'init' if callable(init) else 'x0'}) "
                             f"failed: {type(e).__name__}: {e}") from None

    def closure(self, params: Any) -> tuple[float, Any]:
        try:
            out = self.function(params)
        except Exception as e:
            raise BadProblem(f"{self.name} raised {type(e).__name__}: {e}") from None
        if not isinstance(out, tuple) or len(out) != 2:
            raise self._broken(f"it returned {type(out).__name__}")
        loss, grads = out
        if np.ndim(loss) != 0:
            raise self._broken(f"its loss has shape {np.shape(loss)}")
        try:
            value = float(loss)
        except (TypeError, ValueError):
            raise self._broken(f"its loss is {type(loss).__name__}") from None
        import optree

        # checked here, where the user's function can be named: the engine would report a
        # gradient that does not fit only as a leaf of "params"
        p_leaves, p_def = optree.tree_flatten(params)
        g_leaves, g_def = optree.tree_flatten(grads)
        p_shapes, g_shapes = [np.shape(x) for x in p_leaves], [np.shape(x) for x in g_leaves]
        if p_shapes != g_shapes:
            raise self._broken(f"its grads have shapes {g_shapes} where the params have "
                               f"{p_shapes}")
        if p_def != g_def:
            raise self._broken(f"its grads are {g_def} where the params are {p_def}")
        return value, grads

    def _broken(self, what: str) -> BadProblem:
        return BadProblem(f"{self.name} must return (loss, grads), the loss a number and grads "
                          f"a tree shaped like params; {what}")

    def loss(self, params: Any) -> float:
        return self.closure(params)[0]

    def grad(self, params: Any) -> Any:
        return self.closure(params)[1]


def load(spec: str) -> Problem:
    """The problem ``module:function`` names: an object with ``loss`` and ``grad`` used as it
    is, so one that lacks any part of :class:`Problem` (``name``, ``description``, ``optimum``,
    ``init``, ``loss``, ``grad``) is refused, naming what it lacks; or a function ``params ->
    (loss, grads)`` (:class:`UserProblem`). The current directory is searched first, as
    ``python -m`` does. ValueError on a bad name."""
    import importlib
    import os
    import sys

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"a problem of your own is MODULE:FUNCTION, got {spec!r}")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # (its import runs the user's code: a SyntaxError, a 1/0)
        raise ValueError(f"cannot import {module_name!r} (from {spec!r}): "
                         f"{type(e).__name__}: {e}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            hint = did_you_mean(part, [n for n in dir(obj) if not n.startswith("_")])
            raise ValueError(f"{module_name} has no {attr!r}{hint}")
        obj = getattr(obj, part)
    if callable(getattr(obj, "loss", None)) or callable(getattr(obj, "grad", None)):
        # an object, used as it is: nothing stands in for what it lacks
        lacking = [a for a in ("name", "description", "optimum") if not hasattr(obj, a)]
        lacking += [f"{m}()" for m in ("init", "loss", "grad")
                    if not callable(getattr(obj, m, None))]
        if lacking:
            raise ValueError(
                f"{spec}: a problem object is used as it is, with name, description, optimum "
                "(None where unknown), init(seed), loss(params) and grad(params); it has no "
                + ", ".join(lacking))
        return obj
    if not callable(obj):
        raise ValueError(f"{spec} is not a function params -> (loss, grads)")
    if not (callable(getattr(obj, "init", None)) or hasattr(obj, "x0")):
        raise ValueError(
            f"{spec}: say where to start, as an attribute of the function: "
            f"{attr}.x0 = [...] (the first params) or {attr}.init = lambda seed: ..."
        )
    optimum = getattr(obj, "optimum", None)
    try:
        optimum = None if optimum is None else float(optimum)
    except (TypeError, ValueError):
        raise ValueError(f"{spec}.optimum must be a number, got {optimum!r}") from None
    return UserProblem(spec, obj, optimum)
