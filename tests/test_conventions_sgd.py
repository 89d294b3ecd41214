"""The conventions of sgd, rmsprop, adagrad and adadelta against the frameworks they name.

``convention="optax"`` against optax and ``convention="keras"`` against keras 3 (its JAX
backend), both float64 (optax under ``jax.enable_x64``, keras with ``floatx`` float64 so its
learning rate variable is float64 too), 300 steps, to 1e-12 relative: the differences left are
operation order, a few ulps a step. keras's own golden-value tests (``*_test.py``, shipped in its
wheel) are read at test time and run on our rules. ``convention="flux"`` against Optimisers.jl's
formulas (0.4), written here in NumPy as its ``apply!`` methods write them: Julia cannot run here.

Each side runs free, its gradients computed at its own parameters (a bounded loss plus shared
noise), so a wrong step anywhere shows in every later one.
"""

from __future__ import annotations

import ast
import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

import uniopt as uo  # noqa: E402
from helpers import jitted_optax_step, keras_on_jax, rel_diff  # noqa: E402
from uniopt.conventions import FORMULAS  # noqa: E402

SHAPES = [(), (3, 4)]  # two leaves: each race is 300 steps of both sides, and each peer compiles
STEPS = 300
KERAS_STEPS = 100  # keras's optimizers are checked at more points (cases, goldens): fewer steps
TOL = 1e-12  # float64 on both sides: operation order only

Step = Callable[[list[np.ndarray], list[np.ndarray]], list[np.ndarray]]


@pytest.fixture(autouse=True)
def _x64():  # type: ignore[no-untyped-def]
    with jax.enable_x64(True):
        yield


def _race(ours: uo.Transform, theirs: Callable[[list[np.ndarray]], Step], seed: int = 0,
          steps: int = STEPS) -> float:
    """Largest relative difference over all steps and leaves of ``ours`` and the peer's step
    function (``theirs(params)`` makes it, holding the peer's state)."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s) for s in SHAPES]
    other = [p.copy() for p in params]
    state = uo.setup(ours, params)
    their_step = theirs(other)
    worst = 0.0
    for _ in range(steps):
        noise = [0.1 * rng.standard_normal(s) for s in SHAPES]
        grads = [np.asarray(np.tanh(p) * 0.5 + n) for p, n in zip(params, noise, strict=True)]
        state, params = uo.update(state, params, grads)
        other = their_step(other, [np.asarray(np.tanh(p) * 0.5 + n)
                                   for p, n in zip(other, noise, strict=True)])
        worst = max(worst, *(rel_diff(a, b) for a, b in zip(params, other, strict=True)))
    return worst


def _cosine(steps: int = STEPS) -> Any:
    return uo.schedules.cosine(0.1, steps=steps, floor=0.002)


# --- optax --------------------------------------------------------------------------------------


def optax_peer(tx: Any) -> Callable[[list[np.ndarray]], Step]:
    def make(params: list[np.ndarray]) -> Step:
        step = jitted_optax_step(tx)
        state = [tx.init([jnp.asarray(p) for p in params])]

        def run(ps: list[np.ndarray], gs: list[np.ndarray]) -> list[np.ndarray]:
            new, state[0] = step([jnp.asarray(p) for p in ps], state[0],
                                 [jnp.asarray(g) for g in gs])
            return [np.asarray(p) for p in new]

        return run

    return make


def _draw(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return dict(lr=float(rng.uniform(1e-3, 5e-2)), momentum=float(rng.uniform(0.5, 0.95)),
                decay=float(rng.uniform(0.8, 0.99)), eps=float(10 ** rng.uniform(-8, -4)),
                init=float(rng.uniform(0.0, 0.5)), wd=float(rng.uniform(0.0, 1e-2)))


def _larger(lr: Any) -> Any:
    """Adadelta's steps are about its lr times the gradient's scale: a constant lr of order 1."""
    return lr if callable(lr) else 20 * lr


# (ours, theirs) from a draw and a learning rate (a number or a schedule); seeds pick the flags
OPTAX_CASES: dict[str, Callable[[dict[str, Any], Any, int], tuple[Any, Any]]] = {
    "sgd": lambda h, lr, s: (
        uo.sgd(lr, momentum=h["momentum"], nesterov=bool(s % 2), convention="optax"),
        optax.sgd(lr, momentum=h["momentum"], nesterov=bool(s % 2))),
    "rmsprop": lambda h, lr, s: (
        uo.rmsprop(lr, alpha=h["decay"], eps=h["eps"], initial_scale=h["init"],
                   centered=bool(s % 2), momentum=h["momentum"], eps_in_sqrt=s != 1,
                   convention="optax"),
        optax.rmsprop(lr, decay=h["decay"], eps=h["eps"], initial_scale=h["init"],
                      centered=bool(s % 2), momentum=h["momentum"], eps_in_sqrt=s != 1)),
    "adagrad": lambda h, lr, s: (
        uo.adagrad(lr, initial_accumulator_value=h["init"] + 0.01, eps=h["eps"],
                   convention="optax"),
        optax.adagrad(lr, initial_accumulator_value=h["init"] + 0.01, eps=h["eps"])),
    "adadelta": lambda h, lr, s: (
        uo.adadelta(_larger(lr), rho=h["decay"], eps=h["eps"], weight_decay=h["wd"],
                    convention="optax"),
        optax.adadelta(_larger(lr), rho=h["decay"], eps=h["eps"], weight_decay=h["wd"])),
}


@pytest.mark.slow  # hundreds of steps beside a peer
@pytest.mark.parametrize("name", sorted(OPTAX_CASES))
def test_optax_convention_matches_optax(name: str) -> None:
    """A random draw at a constant lr and one under a cosine schedule (optax gets the same
    function); the seeds switch Nesterov, centered and eps_in_sqrt."""
    for seed, scheduled in [(0, False), (1, True)]:
        h = _draw(seed)
        ours, theirs = OPTAX_CASES[name](h, _cosine() if scheduled else h["lr"], seed)
        err = _race(ours, optax_peer(theirs), seed)
        assert err < TOL, (name, seed, err)


def _defaults(fn: Any) -> dict[str, Any]:
    return {k: v.default for k, v in inspect.signature(fn).parameters.items()}


def _same_defaults(ours: uo.Transform, theirs: Any, names: dict[str, str]) -> None:
    """Each of the peer's defaults (its name -> ours) is the convention's."""
    peer = _defaults(theirs)
    for their_name, our_name in names.items():
        assert getattr(ours, our_name) == peer[their_name], (ours, their_name)


def test_optax_defaults() -> None:
    """The convention's defaults are optax's, read from its signatures (the races above pass
    every value): optax requires a learning rate where ours keeps one, and adadelta's is None,
    which ascends, where ours is 1."""
    _same_defaults(uo.rmsprop(convention="optax"), optax.rmsprop,
                   {"decay": "alpha", "eps": "eps", "initial_scale": "initial_scale",
                    "eps_in_sqrt": "eps_in_sqrt"})
    _same_defaults(uo.adagrad(convention="optax"), optax.adagrad,
                   {"initial_accumulator_value": "initial_accumulator_value", "eps": "eps"})
    _same_defaults(uo.adadelta(convention="optax"), optax.adadelta, {"rho": "rho", "eps": "eps"})
    assert _defaults(optax.adadelta)["learning_rate"] is None
    assert uo.adadelta(convention="optax").lr == 1.0


# --- keras --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras() -> Any:
    """keras 3 on its JAX backend, imported once, with float64 variables (its learning rate
    included: keras keeps it in a variable of ``floatx``)."""
    keras = keras_on_jax()
    floatx = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield keras
    keras.config.set_floatx(floatx)


def keras_peer(opt: Any) -> Callable[[list[np.ndarray]], Step]:
    def make(params: list[np.ndarray]) -> Step:
        import keras

        variables = [keras.Variable(p.copy(), dtype="float64") for p in params]  # JAX may alias
        opt.build(variables)
        step = jax.jit(opt.stateless_apply)
        state = [[v.value for v in opt.variables]]

        def run(ps: list[np.ndarray], gs: list[np.ndarray]) -> list[np.ndarray]:
            new, state[0] = step(state[0], [jnp.asarray(g) for g in gs],
                                 [jnp.asarray(p) for p in ps])
            return [np.asarray(p) for p in new]

        return run

    return make


class _KerasSchedule:
    """A uniopt schedule as a keras LearningRateSchedule (keras calls it with its iteration
    count, 0 at the first update, as uniopt counts)."""

    def __new__(cls, keras: Any, schedule: Any) -> Any:
        class Wrapped(keras.optimizers.schedules.LearningRateSchedule):  # type: ignore[misc]
            def __call__(self, step: Any) -> Any:
                return schedule(jnp.asarray(step))  # a keras Variable: its JAX array

        return Wrapped()


KERAS_CASES: dict[str, Callable[[Any], tuple[Any, Any]]] = {
    "sgd_momentum": lambda k: (uo.sgd(momentum=0.9, convention="keras"),
                               k.optimizers.SGD(momentum=0.9)),
    "sgd_nesterov": lambda k: (uo.sgd(0.05, momentum=0.8, nesterov=True, convention="keras"),
                               k.optimizers.SGD(0.05, momentum=0.8, nesterov=True)),
    "sgd_nesterov_no_momentum": lambda k: (uo.sgd(nesterov=True, convention="keras"),
                                           k.optimizers.SGD(nesterov=True)),
    "rmsprop_momentum": lambda k: (uo.rmsprop(momentum=0.7, convention="keras"),
                                   k.optimizers.RMSprop(momentum=0.7)),
    "rmsprop_centered": lambda k: (
        uo.rmsprop(0.01, alpha=0.8, eps=1e-5, momentum=0.5, centered=True, convention="keras"),
        k.optimizers.RMSprop(0.01, rho=0.8, epsilon=1e-5, momentum=0.5, centered=True)),
    "adagrad": lambda k: (
        uo.adagrad(0.05, initial_accumulator_value=0.2, eps=1e-4, convention="keras"),
        k.optimizers.Adagrad(0.05, initial_accumulator_value=0.2, epsilon=1e-4)),
    "adadelta": lambda k: (uo.adadelta(0.5, rho=0.8, eps=1e-6, convention="keras"),
                              k.optimizers.Adadelta(0.5, rho=0.8, epsilon=1e-6)),
    # keras's weight decay, p <- p - p*wd*lr before the step at the step's (scheduled) lr:
    # decay_form="decoupled" in each keras row
    "sgd_momentum_decay_scheduled": lambda k: (
        uo.sgd(_cosine(KERAS_STEPS), momentum=0.9, weight_decay=0.3, convention="keras"),
        k.optimizers.SGD(_KerasSchedule(k, _cosine(KERAS_STEPS)), momentum=0.9,
                         weight_decay=0.3)),
    "rmsprop_decay": lambda k: (uo.rmsprop(0.01, weight_decay=0.5, convention="keras"),
                                k.optimizers.RMSprop(0.01, weight_decay=0.5)),
    "adagrad_decay": lambda k: (uo.adagrad(0.05, weight_decay=0.4, convention="keras"),
                                k.optimizers.Adagrad(0.05, weight_decay=0.4)),
    "adadelta_decay": lambda k: (uo.adadelta(0.5, weight_decay=0.2, convention="keras"),
                                 k.optimizers.Adadelta(0.5, weight_decay=0.2)),
}


@pytest.mark.slow  # hundreds of steps beside a peer
@pytest.mark.parametrize("name", sorted(KERAS_CASES))
def test_keras_convention_matches_keras(keras: Any, name: str) -> None:
    """keras's defaults where the case gives none (SGD lr 1e-2; RMSprop lr 1e-3, rho 0.9, eps
    1e-7); ``nesterov=True`` with ``momentum=0`` is plain SGD in keras."""
    ours, theirs = KERAS_CASES[name](keras)
    assert _race(ours, keras_peer(theirs), steps=KERAS_STEPS) < TOL


def test_keras_adagrad_zero_over_zero_is_the_one_documented_difference(keras: Any) -> None:
    """Where an entry's accumulator and eps are both 0, keras's Adagrad divides 0 by 0 (NaN);
    the keras convention steps 0 there, as optax, and says so in its conventions row. The
    entry beside it, with a gradient, is keras's step."""
    ours = uo.adagrad(0.1, initial_accumulator_value=0.0, eps=0.0, convention="keras")
    theirs = keras_peer(keras.optimizers.Adagrad(0.1, initial_accumulator_value=0.0,
                                                 epsilon=0.0))([np.array([2.0, 2.0])])
    g = [np.array([0.0, 1.0])]
    [k] = theirs([np.array([2.0, 2.0])], g)
    state, [p] = uo.update(uo.setup(ours, [np.array([2.0, 2.0])]), [np.array([2.0, 2.0])], g)
    assert np.isnan(k[0]) and p[0] == 2.0
    assert k[1] == p[1] == 1.9
    assert "keras's 0/0 is NaN" in FORMULAS["adagrad"]["keras"]


def test_keras_defaults(keras: Any) -> None:
    """The convention's defaults are keras's, read from its signatures."""
    opt = keras.optimizers
    _same_defaults(uo.sgd(convention="keras"), opt.SGD, {"learning_rate": "lr",
                                                         "momentum": "momentum"})
    _same_defaults(uo.rmsprop(convention="keras"), opt.RMSprop,
                   {"learning_rate": "lr", "rho": "alpha", "epsilon": "eps",
                    "momentum": "momentum", "centered": "centered"})
    _same_defaults(uo.adagrad(convention="keras"), opt.Adagrad,
                   {"learning_rate": "lr", "initial_accumulator_value":
                    "initial_accumulator_value", "epsilon": "eps"})
    _same_defaults(uo.adadelta(convention="keras"), opt.Adadelta,
                   {"learning_rate": "lr", "rho": "rho", "epsilon": "eps"})


# keras's golden-value tests: names in its test files -> ours (their keyword -> our field), with
# keras's defaults for the fields whose defaults differ (rules without a keras convention)
KERAS_RULES: dict[str, tuple[Any, dict[str, str], dict[str, Any]]] = {
    "SGD": (uo.sgd, {"learning_rate": "lr"}, {}),
    "RMSprop": (uo.rmsprop, {"learning_rate": "lr", "rho": "alpha", "epsilon": "eps"}, {}),
    "Adagrad": (uo.adagrad, {"learning_rate": "lr", "epsilon": "eps"}, {}),
    "Adadelta": (uo.adadelta, {"learning_rate": "lr", "epsilon": "eps"}, {}),
    "Ftrl": (uo.ftrl, {"learning_rate": "lr"}, {}),
    # keras's Lamb is optax's with keras's eps (its weight_decay, a decay before the step, is
    # not optax's inside the trust ratio; its golden test takes none)
    "Lamb": (uo.lamb, {"learning_rate": "lr", "beta_1": "b1", "beta_2": "b2",
                       "epsilon": "eps"}, {"eps": 1e-7}),
}


class _OurOptimizer:
    """Stands in for a keras optimizer in keras's own test: ``apply_gradients`` steps our rule
    (``convention="keras"`` where it has conventions) in place on the NumPy 'variables'."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        rule, names, defaults = KERAS_RULES[name]
        given = {**defaults, **{names.get(k, k): v for k, v in kwargs.items()}}
        if "convention" in rule.__dataclass_fields__:
            given["convention"] = "keras"
        self.rule = rule(**given)
        self.state: Any = None

    def apply_gradients(self, pairs: Any) -> None:
        grads, variables = zip(*pairs, strict=True)
        if self.state is None:
            self.state = uo.setup(self.rule, list(variables))
        grads = [np.asarray(g, dtype=v.dtype) for g, v in zip(grads, variables, strict=True)]
        self.state = uo.update_(self.state, list(variables), grads)


class _Case:
    """keras's ``self`` in its test: the assertions it makes, counted."""

    def __init__(self) -> None:
        self.checked = 0

    def assertAllClose(self, a: Any, b: Any, rtol: float = 1e-6, atol: float = 1e-6) -> None:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)
        self.checked += 1


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adagrad", "adadelta", "ftrl", "lamb"])
def test_keras_golden_values(keras: Any, name: str) -> None:
    """keras's ``test_correctness_with_golden``, read from the test file its wheel ships and run
    as it is written, with our rule in place of keras's optimizer and NumPy float64 arrays in
    place of its variables (its tolerances, its golden numbers: none of them is copied here)."""
    path = Path(keras.__file__).parent / "src" / "optimizers" / f"{name}_test.py"
    if not path.exists():
        pytest.skip(f"keras ships no {path.name}")
    tree = ast.parse(path.read_text())
    [test] = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
              and node.name == "test_correctness_with_golden"]
    namespace = {
        "np": np, "ops": keras.ops, "self": _Case(),
        "backend": type("backend", (), {"Variable": staticmethod(
            lambda v, **kw: np.array(v, dtype=np.float64))}),
        **{n: functools.partial(_OurOptimizer, n) for n in KERAS_RULES},
    }
    exec(compile(ast.Module(body=test.body, type_ignores=[]), str(path), "exec"), namespace)
    assert namespace["self"].checked >= 5  # type: ignore[attr-defined]


# --- the momentum forms under a schedule ---------------------------------------------------------


def torch_sgd_peer(schedule: Any, momentum: float) -> Callable[[list[np.ndarray]], Step]:
    torch = pytest.importorskip("torch")

    def make(params: list[np.ndarray]) -> Step:
        ts = [torch.tensor(p) for p in params]
        opt = torch.optim.SGD(ts, lr=float(schedule(0)), momentum=momentum)
        count = [0]

        def run(ps: list[np.ndarray], gs: list[np.ndarray]) -> list[np.ndarray]:
            opt.param_groups[0]["lr"] = float(schedule(count[0]))
            count[0] += 1
            for t, g in zip(ts, gs, strict=True):
                t.grad = torch.tensor(g)
            opt.step()
            return [t.detach().numpy().copy() for t in ts]

        return run

    return make


def uniopt_peer(rule: uo.Transform) -> Callable[[list[np.ndarray]], Step]:
    def make(params: list[np.ndarray]) -> Step:
        state = [uo.setup(rule, params)]

        def run(ps: list[np.ndarray], gs: list[np.ndarray]) -> list[np.ndarray]:
            state[0], new = uo.update(state[0], ps, gs)
            return list(new)

        return run

    return make


@pytest.mark.slow  # hundreds of steps beside a peer
def test_momentum_forms_differ_under_a_schedule(keras: Any) -> None:
    """At a constant lr torch's and keras's momentum are one algorithm; under a decaying
    schedule keras's velocity keeps the larger lr of its past steps. Each form matches its own
    peer, and the two forms differ."""
    lr = _cosine(KERAS_STEPS)
    torch_form, keras_form = (uo.sgd(lr, momentum=0.9, convention=c) for c in ("torch", "keras"))
    assert _race(torch_form, torch_sgd_peer(lr, 0.9), steps=KERAS_STEPS) < TOL
    keras_sched = keras.optimizers.SGD(_KerasSchedule(keras, lr), momentum=0.9)
    assert _race(keras_form, keras_peer(keras_sched), steps=KERAS_STEPS) < TOL
    assert _race(keras_form, uniopt_peer(torch_form), steps=KERAS_STEPS) > 1e-3
    # a constant lr: the forms agree but for rounding
    assert _race(uo.sgd(0.05, momentum=0.9, convention="keras"),
                 uniopt_peer(uo.sgd(0.05, momentum=0.9)), steps=KERAS_STEPS) < 1e-10


# --- Optimisers.jl ------------------------------------------------------------------------------


def flux_peer(apply: Callable[..., Any], init: Callable[[np.ndarray], Any],
              eta: Callable[[int], float] | None = None) -> Callable[[list[np.ndarray]], Step]:
    """Optimisers.jl's ``update!``: ``x .-= apply!(rule, state, x, dx)``, per leaf; ``eta``
    (a function of the step) is handed to ``apply`` as ``adjust!`` would set it."""

    def make(params: list[np.ndarray]) -> Step:
        states = [init(p) for p in params]
        count = [0]

        def run(ps: list[np.ndarray], gs: list[np.ndarray]) -> list[np.ndarray]:
            out = []
            for i, (x, dx) in enumerate(zip(ps, gs, strict=True)):
                step = apply(states[i], dx) if eta is None else apply(states[i], dx,
                                                                      eta(count[0]))
                out.append(x - step)
            count[0] += 1
            return out

        return run

    return make


def _zeros(*names: str) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    return lambda x: {n: np.zeros_like(x) for n in names}


def flux_momentum(rho: float) -> Callable[..., np.ndarray]:
    def apply(s: dict[str, np.ndarray], dx: np.ndarray, eta: float) -> np.ndarray:
        s["v"] = rho * s["v"] + eta * dx  # Momentum: @.. mvel = ρ * mvel + η * dx
        return s["v"]

    return apply


def flux_nesterov(eta: float, rho: float) -> Callable[..., np.ndarray]:
    def apply(s: dict[str, np.ndarray], dx: np.ndarray) -> np.ndarray:
        newdx = -(rho**2) * s["vel"] + (1 + rho) * eta * dx
        s["vel"] = rho * s["vel"] - eta * dx
        return newdx

    return apply


def flux_rmsprop(eta: float, rho: float, eps: float, centred: bool) -> Callable[..., np.ndarray]:
    def apply(s: dict[str, np.ndarray], dx: np.ndarray) -> np.ndarray:
        s["quad"] = rho * s["quad"] + (1 - rho) * dx**2
        if centred:
            s["lin"] = rho * s["lin"] + (1 - rho) * dx
        return dx * eta / (np.sqrt(s["quad"] - s["lin"] ** 2) + eps)

    return apply


def flux_adagrad(eta: float, eps: float) -> Callable[..., np.ndarray]:
    def apply(s: dict[str, np.ndarray], dx: np.ndarray) -> np.ndarray:
        s["acc"] = s["acc"] + dx**2
        return dx * eta / (np.sqrt(s["acc"]) + eps)

    return apply


def flux_adadelta(rho: float, eps: float) -> Callable[..., np.ndarray]:
    def apply(s: dict[str, np.ndarray], dx: np.ndarray) -> np.ndarray:
        s["acc"] = rho * s["acc"] + (1 - rho) * dx**2
        step = dx * np.sqrt(s["dacc"] + eps) / np.sqrt(s["acc"] + eps)
        s["dacc"] = rho * s["dacc"] + (1 - rho) * step**2
        return step

    return apply


FLUX_CASES: dict[str, tuple[Any, Callable[[list[np.ndarray]], Step]]] = {
    # Descent(): η 0.1
    "descent": (uo.sgd(convention="flux"),
                flux_peer(lambda s, dx: 0.1 * dx, _zeros())),
    "momentum": (uo.sgd(0.01, momentum=0.9, convention="flux"),
                 flux_peer(flux_momentum(0.9), _zeros("v"), lambda t: 0.01)),
    # Momentum(): η 0.01, ρ 0.9; Nesterov(): η 0.001, ρ 0.9 (Descent's 0.1 was taken for all)
    "momentum_default": (uo.sgd(momentum=0.9, convention="flux"),
                         flux_peer(flux_momentum(0.9), _zeros("v"), lambda t: 0.01)),
    "nesterov_default": (uo.sgd(momentum=0.9, nesterov=True, convention="flux"),
                         flux_peer(flux_nesterov(0.001, 0.9), _zeros("vel"))),
    "momentum_scheduled": (uo.sgd(_cosine(), momentum=0.9, convention="flux"),
                           flux_peer(flux_momentum(0.9), _zeros("v"), _cosine())),
    "nesterov": (uo.sgd(0.01, momentum=0.8, nesterov=True, convention="flux"),
                 flux_peer(flux_nesterov(0.01, 0.8), _zeros("vel"))),
    # RMSProp(): η 1e-3, ρ 0.9, ϵ 1e-8
    "rmsprop": (uo.rmsprop(convention="flux"),
                flux_peer(flux_rmsprop(1e-3, 0.9, 1e-8, False), _zeros("quad", "lin"))),
    "rmsprop_centred": (uo.rmsprop(0.01, alpha=0.8, centered=True, convention="flux"),
                        flux_peer(flux_rmsprop(0.01, 0.8, 1e-8, True), _zeros("quad", "lin"))),
    # AdaGrad(): η 0.1, ϵ 1e-8, the accumulator starts at ϵ
    "adagrad": (uo.adagrad(convention="flux"),
                flux_peer(flux_adagrad(0.1, 1e-8), lambda x: {"acc": np.full_like(x, 1e-8)})),
    "adagrad_eps": (uo.adagrad(convention="flux", eps=1e-3),
                    flux_peer(flux_adagrad(0.1, 1e-3),
                              lambda x: {"acc": np.full_like(x, 1e-3)})),
    # AdaDelta(): ρ 0.9, ϵ 1e-8, no lr
    "adadelta": (uo.adadelta(convention="flux"),
                 flux_peer(flux_adadelta(0.9, 1e-8), _zeros("acc", "dacc"))),
}


@pytest.mark.slow  # hundreds of steps beside a peer
@pytest.mark.parametrize("name", sorted(FLUX_CASES))
def test_flux_convention_matches_optimisers_jl(name: str) -> None:
    ours, theirs = FLUX_CASES[name]
    assert _race(ours, theirs) < TOL


@pytest.mark.parametrize("nesterov", [False, True])
def test_the_translations_state_line_gives_optimisers_jls_own_buffer(nesterov: bool) -> None:
    """The state line of a translation from torch to Flux relates torch's buffer to the one
    Optimisers.jl keeps: Momentum's ``v`` is ours, Nesterov's ``vel`` is its negation (the line
    said ``v = lr·b_torch`` for both)."""
    lr, mu = 0.01, 0.8
    rule = uo.sgd(lr, momentum=mu, nesterov=nesterov)
    tr = uo.translate(rule, target="flux")
    rng = np.random.default_rng(0)
    params, grads = [rng.standard_normal(4)], [[rng.standard_normal(4)] for _ in range(5)]
    torch_state, flux_state = uo.setup(rule, params), uo.setup(tr.rule, params)
    key = "vel" if nesterov else "v"
    theirs = {key: np.zeros(4)}
    apply = flux_nesterov(lr, mu) if nesterov else functools.partial(flux_momentum(mu),
                                                                      eta=lr)
    for g in grads:
        torch_state, _ = uo.update(torch_state, params, g)
        flux_state, _ = uo.update(flux_state, params, g)
        apply(theirs, g[0])
    [[b_torch]], [[ours]] = torch_state.slots.values(), flux_state.slots.values()
    np.testing.assert_allclose(ours, lr * b_torch, rtol=1e-12)
    np.testing.assert_allclose(theirs[key], -ours if nesterov else ours, rtol=1e-12)
    assert ("Optimisers.jl's Nesterov stores −v" in tr.state) == nesterov, tr.state


# --- errors -------------------------------------------------------------------------------------

RULES = [uo.sgd, uo.rmsprop, uo.adagrad, uo.adadelta]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_unknown_convention_is_named(rule: Any) -> None:
    with pytest.raises(ValueError, match=r"convention must be one of .*got 'pytorch'"):
        rule(convention="pytorch")


@pytest.mark.parametrize("rule", [uo.sgd, uo.rmsprop], ids=lambda r: r.__name__)
def test_bad_momentum_form_is_named(rule: Any) -> None:
    with pytest.raises(ValueError, match=r"momentum_form must be one of .*got 'x'"):
        rule(momentum=0.9, momentum_form="x")


def test_option_errors() -> None:
    with pytest.raises(ValueError, match=r"momentum_form .*got 'keras'"):
        uo.rmsprop(momentum_form="keras")  # keras's RMSprop momentum is the sutskever form
    with pytest.raises(ValueError, match=r"dampening=0.1 with momentum_form='keras'"):
        uo.sgd(momentum=0.9, dampening=0.1, convention="keras")
    with pytest.raises(ValueError, match=r"nesterov=True requires momentum > 0"):
        uo.sgd(nesterov=True)  # torch's rule; keras's convention allows it (plain SGD)
    assert uo.sgd(nesterov=True, convention="keras").parts()[-1] == uo.scale_by_lr(lr=1e-2)
    with pytest.raises(ValueError, match=r"start_at_eps=True .*initial_accumulator_value=0.1"):
        uo.adagrad(convention="flux", initial_accumulator_value=0.1)


def test_flux_nesterov_needs_its_momentum() -> None:
    """Optimisers.jl's ``Nesterov()`` has ``rho = 0.9``; uniopt's momentum defaults to 0, so
    ``sgd(nesterov=True, convention="flux")`` was plain descent at Nesterov's lr 1e-3, neither
    ``Nesterov()`` nor ``Descent()``. It is refused, naming the values, as in torch's form."""
    with pytest.raises(ValueError, match=r"^sgd\(convention='flux'\): nesterov=True requires "
                                         r"momentum > 0, got momentum=0.0 \(Optimisers.jl's "
                                         r"Nesterov\(\) is momentum=0.9, lr=1e-3\)$"):
        uo.sgd(nesterov=True, convention="flux")
    with pytest.raises(ValueError, match=r"got momentum=0"):
        uo.sgd(0.01, momentum=0, nesterov=True, convention="flux")
    assert uo.sgd(momentum=0.9, nesterov=True, convention="flux").lr == 1e-3
    # a schedule, or a JAX array's kept block, is checked when it steps (as torch's form)
    uo.sgd(momentum=uo.schedules.constant(0.9), nesterov=True, convention="flux")


@pytest.mark.parametrize("rule", [*RULES, uo.adam, uo.adamax], ids=lambda r: r.__name__)
def test_bad_decay_form_is_named(rule: Any) -> None:
    with pytest.raises(ValueError, match=r"decay_form must be one of 'l2', 'decoupled', "
                                         r"got 'adamw'"):
        rule(decay_form="adamw")


def test_decay_forms() -> None:
    """torch's L2 term stays torch's default; keras's rows decouple, and a given form wins."""
    for rule in (*RULES, uo.adam, uo.adamax):
        assert rule().decay_form == "l2" and rule(convention="keras").decay_form == "decoupled"
        assert rule(convention="keras", decay_form="l2").decay_form == "l2"
    assert uo.sgd(0.1, weight_decay=0.5).parts()[0] == uo.weight_decay(wd=0.5)
    assert uo.sgd(0.1, weight_decay=0.5, convention="keras").parts()[-1] == \
        uo.decoupled_weight_decay(lr=0.1, wd=0.5)
    assert uo.nadam(convention="keras").decoupled_weight_decay is True


def test_given_fields_win_and_torch_defaults_stay() -> None:
    assert uo.sgd() == uo.sgd(convention="torch")
    assert (uo.rmsprop().lr, uo.rmsprop().alpha, uo.rmsprop().eps) == (1e-2, 0.99, 1e-8)
    keras_rms = uo.rmsprop(convention="keras", eps=1e-3, eps_in_sqrt=False)
    assert (keras_rms.lr, keras_rms.eps, keras_rms.eps_in_sqrt) == (1e-3, 1e-3, False)
    assert uo.adadelta(convention="optax").lr == 1.0  # optax's None ascends


def test_optax_convention_checks_as_optax() -> None:
    """``optax.sgd(momentum=0.0, nesterov=True)`` runs (plain SGD: ``g + 0*t``) where torch's
    check refused it; optax has no dampening, which the optax convention took silently."""
    optax = pytest.importorskip("optax")
    rule = uo.sgd(lr=0.1, momentum=0.0, nesterov=True, convention="optax")
    _, p = uo.update(uo.setup(rule, [np.ones(3)]), [np.ones(3)], [np.full(3, 0.5)])
    tx = optax.sgd(0.1, momentum=0.0, nesterov=True)
    u, _ = tx.update([np.full(3, 0.5)], tx.init([np.ones(3)]))
    np.testing.assert_allclose(p[0], 1.0 + np.asarray(u[0]), rtol=1e-7)
    with pytest.raises(ValueError, match="optax's sgd has no dampening, got dampening=0.3"):
        uo.sgd(momentum=0.9, dampening=0.3, convention="optax")
    with pytest.raises(ValueError, match="nesterov=True requires momentum > 0"):
        uo.sgd(momentum=0.0, nesterov=True)  # torch's check stays torch's
