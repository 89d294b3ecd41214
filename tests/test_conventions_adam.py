"""The Adam family's ``convention=`` against the frameworks it names.

- ``"optax"``: against optax itself under ``jax.jit`` in float64, 300 free-running steps;
  each optax optimizer is compiled once, its hyperparameters (the learning rate of a schedule
  included, its value at each step) passed as jit arguments.
- ``"keras"``: against keras 3 on its JAX backend (float64 variables, one compile per
  optimizer), and against keras's own golden values: ``test_correctness_with_golden`` of its
  ``adam_test.py``, ``adamw_test.py``, ``adamax_test.py``, ``nadam_test.py`` is read with
  ``ast`` at test time (optimizer, hyperparameters, gradients, golden arrays, tolerances), none
  of it copied here.
- ``"flux"``: Optimisers.jl cannot run here; its rules (``src/rules.jl``, v0.4) are written
  below independently, a few lines of NumPy each, and run beside ours for 300 steps.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from helpers import keras_on_jax, rel_diff

SHAPES = [(), (3,), (4, 5), (2, 3, 2)]
STEPS = 300
TOL = 1e-12  # float64 on both sides: operation order only, a few ulps a step


def _grads(params: dict[str, np.ndarray], noise: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A bounded loss's gradient at ``params`` plus shared noise: each side runs free, so a
    wrong step anywhere shows in every later one."""
    return {k: np.asarray(np.tanh(v) * 0.5 + noise[k]) for k, v in params.items()}


def _start(seed: int) -> tuple[np.random.Generator, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return rng, {f"x{i}": rng.standard_normal(s) for i, s in enumerate(SHAPES)}


def _noise(rng: np.random.Generator, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}


def _wavy(base: float) -> Callable[[Any], Any]:
    """A learning rate schedule (any callable of the step, counted from 0) that moves a lot."""
    return lambda s: base * (1.0 + 0.5 * np.cos(s / 7.0))


# --- optax -----------------------------------------------------------------------------------


def _noises(seed: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """The starting params and every step's noise, drawn beforehand."""
    rng, params = _start(seed)
    return params, [_noise(rng, params) for _ in range(STEPS)]


def _ours_path(ours: uo.Transform, params: dict[str, np.ndarray],
               noises: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    state = uo.setup(ours, params)
    path = []
    for noise in noises:
        state, params = uo.update(state, params, _grads(params, noise))
        path.append(params)
    return path


def _worst(path: list[dict[str, np.ndarray]], theirs: dict[str, Any]) -> float:
    """Largest relative difference over all steps and leaves; ``theirs`` holds each leaf's
    values stacked over the steps."""
    return max(rel_diff(p[k], theirs[k][i]) for i, p in enumerate(path) for k in p)


def _stepper(jx: Any, update: Callable[..., Any]) -> Callable[..., Any]:
    """``run(params, state, noises, lrs, hp) -> params at every step``: ``update(p, s, g,
    lr_t, hp) -> (p, s)`` under one ``jax.jit`` (compiled once: the numbers are arguments),
    each step's gradient computed inside at its own params as :func:`_grads` does; the
    noises and rates go in once, the values come back once."""
    jnp = jx.numpy

    @jx.jit
    def step(p: Any, s: Any, noises: Any, lrs: Any, k: Any, hp: Any) -> Any:
        g = jx.tree.map(lambda v, n: jnp.tanh(v) * 0.5 + n[k], p, noises)
        return update(p, s, g, lrs[k], hp)

    def run(p: Any, s: Any, noises: list[dict[str, np.ndarray]], lrs: list[float],
            hp: dict[str, float]) -> dict[str, np.ndarray]:
        stacked = {k: jnp.asarray(np.stack([n[k] for n in noises])) for k in noises[0]}
        jlrs = jnp.asarray(lrs, jnp.float64)
        jhp = {k: jnp.asarray(v, jnp.float64) for k, v in hp.items()}
        path = []
        for k in range(len(noises)):
            p, s = step(p, s, stacked, jlrs, k, jhp)
            path.append(p)
        path = jx.device_get(path)
        return {k: np.stack([q[k] for q in path]) for k in path[0]}

    return run


def _optax_run(jx: Any, ours: uo.Transform, make: Callable[..., Any], hp: dict[str, float],
               lr: float | Callable[[Any], Any], seed: int) -> float:
    """Largest relative difference over all steps and leaves between ``ours`` and the optax
    optimizer ``make(learning_rate, **hp)``, compiled once per ``make`` (the numbers are jit
    arguments; a schedule's value at each step is passed in)."""
    import optax

    jnp = jx.numpy
    run = _OPTAX_RUNS.get(make)
    if run is None:
        def update(p: Any, s: Any, g: Any, lr_t: Any, hp: Any) -> Any:
            u, s = make(lr_t, **hp).update(g, s, p)
            return optax.apply_updates(p, u), s

        run = _OPTAX_RUNS[make] = _stepper(jx, update)
    params, noises = _noises(seed)
    theirs = {k: jnp.asarray(v) for k, v in params.items()}
    lrs = [lr(k) if callable(lr) else lr for k in range(STEPS)]
    path = run(theirs, make(1.0, **hp).init(theirs), noises, lrs, hp)
    return _worst(_ours_path(ours, params, noises), path)


_OPTAX_RUNS: dict[Any, Any] = {}


def _adam_hp(rng: np.random.Generator) -> dict[str, float]:
    return dict(b1=float(rng.uniform(0.5, 0.95)), b2=float(rng.uniform(0.9, 0.999)),
                eps=float(10 ** rng.uniform(-9, -6)), eps_root=float(rng.choice([0.0, 1e-8])))


def _ours_adam_kw(hp: dict[str, float]) -> dict[str, Any]:
    kw = dict(hp)
    kw["betas"] = (kw.pop("b1"), kw.pop("b2"))
    return kw


def _optax_makers() -> dict[str, tuple[Callable[..., uo.Transform], Callable[..., Any]]]:
    import optax

    def no_root(f: Callable[..., Any]) -> Callable[..., Any]:  # adamax has no eps_root
        return lambda lr, eps_root, **kw: f(lr, **kw)

    return {
        "adam": (lambda lr, **kw: uo.adam(lr, **_ours_adam_kw(kw), convention="optax"),
                 optax.adam),
        "adamw": (lambda lr, **kw: uo.adamw(lr, **_ours_adam_kw(kw), convention="optax"),
                  optax.adamw),
        "amsgrad": (lambda lr, **kw: uo.adam(lr, **_ours_adam_kw(kw), amsgrad=True,
                                             convention="optax"), optax.amsgrad),
        "adamax": (lambda lr, eps_root, **kw: uo.adamax(lr, **_ours_adam_kw(kw),
                                                        convention="optax"),
                   no_root(optax.adamax)),
        "nadam": (lambda lr, **kw: uo.nadam(lr, **_ours_adam_kw(kw), convention="optax"),
                  optax.nadam),
        "radam": (lambda lr, **kw: uo.radam(lr, **_ours_adam_kw(kw), convention="optax"),
                  optax.radam),
        "optimistic_adam": (
            lambda lr, alpha, beta, **kw: uo.optimistic_adam(lr, alpha=alpha, beta=beta, **kw,
                                                             convention="optax"),
            optax.optimistic_adam_v2),
    }


@pytest.mark.parametrize("name", ["adam", "adamw", "amsgrad", "adamax", "nadam", "radam",
                                  "optimistic_adam"])
def test_optax_convention_matches_optax(jx: Any, name: str) -> None:
    ours, theirs = _optax_makers()[name]
    for seed in (0, 1):  # two random hyperparameter sets: a constant rate, then a schedule
        rng = np.random.default_rng(50 + seed + 10 * len(name))
        hp = _adam_hp(rng)
        if name == "adamw":
            hp["weight_decay"] = float(rng.uniform(1e-4, 0.1))
        if name == "optimistic_adam":
            hp.update(alpha=float(rng.uniform(0.1, 2.0)), beta=float(rng.uniform(0.0, 2.0)))
        lr = float(rng.uniform(1e-3, 5e-2))
        rate = _wavy(lr) if seed else lr
        err = _optax_run(jx, ours(rate, **hp), theirs, hp, rate, seed)
        assert err < TOL, (name, hp, err)


# --- keras -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras(jx: Any) -> Any:
    return keras_on_jax()


# keras keeps its learning rate in a float32 variable: a dyadic rate is the same number in
# float64, so the comparison stays float64 against float64
KERAS_CASES = {
    "Adam": (dict(learning_rate=2**-7, beta_1=0.8, beta_2=0.95, epsilon=1e-3),
             lambda: uo.adam(2**-7, betas=(0.8, 0.95), eps=1e-3, convention="keras")),
    "AdamW": (dict(learning_rate=2**-7, beta_1=0.85, beta_2=0.99, epsilon=1e-2,
                   weight_decay=0.3),
              lambda: uo.adamw(2**-7, betas=(0.85, 0.99), eps=1e-2, weight_decay=0.3,
                               convention="keras")),
    "AMSGrad": (dict(learning_rate=2**-8, beta_1=0.7, beta_2=0.9, epsilon=1e-4, amsgrad=True),
                lambda: uo.adam(2**-8, betas=(0.7, 0.9), eps=1e-4, amsgrad=True,
                                convention="keras")),
    "Adamax": (dict(learning_rate=2**-6, beta_1=0.8, beta_2=0.9, epsilon=1e-3),
               lambda: uo.adamax(2**-6, betas=(0.8, 0.9), eps=1e-3, convention="keras")),
    "Nadam": (dict(learning_rate=2**-7, beta_1=0.85, beta_2=0.95, epsilon=1e-4),
              lambda: uo.nadam(2**-7, betas=(0.85, 0.95), eps=1e-4, convention="keras")),
    # keras's weight decay, p <- p - p*wd*lr before the step, for every optimizer: keras's
    # Adam(weight_decay=) is its AdamW
    "Adam_decay": (dict(learning_rate=2**-7, beta_1=0.8, beta_2=0.95, epsilon=1e-3,
                        weight_decay=0.3),
                   lambda: uo.adam(2**-7, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.3,
                                   convention="keras")),
    "Adamax_decay": (dict(learning_rate=2**-6, beta_1=0.8, beta_2=0.9, epsilon=1e-3,
                          weight_decay=0.4),
                     lambda: uo.adamax(2**-6, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.4,
                                       convention="keras")),
    "Nadam_decay": (dict(learning_rate=2**-7, beta_1=0.85, beta_2=0.95, epsilon=1e-4,
                         weight_decay=0.2),
                    lambda: uo.nadam(2**-7, betas=(0.85, 0.95), eps=1e-4, weight_decay=0.2,
                                     convention="keras")),
}


@pytest.mark.parametrize("name", sorted(KERAS_CASES))
def test_keras_convention_matches_keras(keras: Any, jx: Any, name: str) -> None:
    """Large eps and betas far from 1, so that eps's placement and the forms of the momenta
    decide the result; float64 on both sides."""
    kwargs, ours = KERAS_CASES[name]
    cls = getattr(keras.optimizers, "Adam" if name == "AMSGrad" else name.removesuffix("_decay"))
    params, noises = _noises(7)
    variables = [keras.Variable(p.copy(), dtype="float64") for p in params.values()]
    opt = cls(**kwargs)
    opt.build(variables)

    def update(p: Any, s: Any, g: Any, lr_t: Any, hp: Any) -> Any:
        p, s = opt.stateless_apply(s, list(g.values()), list(p.values()))
        return dict(zip(params, p, strict=True)), s

    lrs = [0.0] * STEPS  # unused: keras's rate is in its state
    path = _stepper(jx, update)({k: v.value for k, v in zip(params, variables, strict=True)},
                                [v.value for v in opt.variables], noises, lrs, {})
    worst = _worst(_ours_path(ours(), params, noises), path)
    assert worst < TOL, (name, worst)


# keras's own golden-value tests, read from its installed sources at test time


def _keras_test_file(name: str) -> pathlib.Path:
    spec = importlib.util.find_spec("keras")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("keras is not installed")
    path = pathlib.Path(list(spec.submodule_search_locations)[0], "src", "optimizers", name)
    if not path.exists():
        pytest.skip(f"this keras has no {path}")
    return path


_NUMPY_CALLS = {"ones", "full", "arange", "tile", "array"}  # np.* and ops.* alike


def _value(node: ast.AST) -> Any:
    """A literal, or a call of one of the few array constructors the golden tests use (on
    literals); ``backend.Variable(x)`` is ``x``. Anything else fails: the test changed."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        args = [_value(a) for a in node.args]
        kw = {k.arg: _value(k.value) for k in node.keywords}
        if node.func.attr == "Variable":
            return np.asarray(args[0], np.float64)
        if node.func.attr in _NUMPY_CALLS:
            kw.pop("dtype", None)  # run in float64: keras's float32 is inside its tolerance
            return np.asarray(getattr(np, node.func.attr)(*args, **kw), np.float64)
    return ast.literal_eval(node)


def _keras_golden(name: str) -> dict[str, Any]:
    tree = ast.parse(_keras_test_file(name).read_text())
    fn = next(n for n in ast.walk(tree)
              if isinstance(n, ast.FunctionDef) and n.name == "test_correctness_with_golden")
    found: dict[str, Any] = {}
    tol: dict[str, float] = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name_ = node.targets[0].id
            if name_ == "optimizer":
                assert isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name)
                found["class"] = node.value.func.id
                found["kwargs"] = {k.arg: ast.literal_eval(k.value) for k in node.value.keywords}
            else:
                found[name_] = _value(node.value)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "assertAllClose"):
            tol = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    assert {"class", "x", "grads", "first_grads", "golden"} <= found.keys(), found.keys()
    assert tol.keys() == {"rtol", "atol"}, tol
    return {**found, **tol}


def _keras_rule(cls: str, kwargs: dict[str, Any], **options: Any) -> uo.Transform:
    """Our rule for keras's optimizer ``cls(**kwargs)``, with keras's convention."""
    rule = {"Adam": uo.adam, "AdamW": uo.adamw, "Adamax": uo.adamax, "Nadam": uo.nadam}[cls]
    names = {"learning_rate": "lr", "epsilon": "eps", "weight_decay": "weight_decay",
             "amsgrad": "amsgrad"}
    kw: dict[str, Any] = {}
    for k, v in kwargs.items():
        if k in ("beta_1", "beta_2"):
            continue
        assert k in names, f"keras's golden test sets {k}, which this test does not map"
        kw[names[k]] = v
    if "beta_1" in kwargs or "beta_2" in kwargs:
        kw["betas"] = (kwargs.get("beta_1", 0.9), kwargs.get("beta_2", 0.999))
    return rule(**kw, **options, convention="keras")


def _golden_misses(g: dict[str, Any], rule: uo.Transform) -> float:
    """Largest excess over keras's ``assertAllClose`` bound along its golden sequence: the
    first gradient, then before each further step the golden row is checked."""
    x = [g["x"].copy()]
    state = uo.setup(rule, x)
    state, x = uo.update(state, x, [g["first_grads"]])
    worst = -np.inf
    for row in g["golden"]:
        bound = g["atol"] + g["rtol"] * np.abs(row)
        worst = max(worst, float(np.max(np.abs(x[0] - row) - bound)))
        state, x = uo.update(state, x, [g["grads"]])
    return worst


@pytest.mark.parametrize("name", ["adam_test.py", "adamw_test.py", "adamax_test.py",
                                  "nadam_test.py"])
def test_keras_convention_reproduces_keras_golden_values(name: str) -> None:
    g = _keras_golden(name)
    assert _golden_misses(g, _keras_rule(g["class"], g["kwargs"])) <= 0.0


def test_keras_adamw_golden_values_need_eps_hat() -> None:
    """keras's AdamW golden test runs with epsilon=2, where eps's placement is visible: with
    torch's placement (``eps_hat=False``) the sequence leaves keras's tolerance by far."""
    g = _keras_golden("adamw_test.py")
    assert g["kwargs"].get("epsilon", 0) >= 1.0, "keras changed its AdamW golden test"
    assert _golden_misses(g, _keras_rule(g["class"], g["kwargs"], eps_hat=False)) > 0.1


# --- Optimisers.jl (Flux), its rules written independently ----------------------------------


def _flux_run(ours: uo.Transform, init: Callable[[np.ndarray], list[Any]],
              step: Callable[[list[Any], np.ndarray, np.ndarray, int], np.ndarray],
              seed: int = 3) -> float:
    """``step(state, x, dx, k)`` is Optimisers.jl's ``apply!`` (updating ``state`` in place)
    for step ``k`` counted from 0, returning the ``dx'`` that ``update!`` subtracts."""
    rng, params = _start(seed)
    ref = {k: v.copy() for k, v in params.items()}
    rstate = {k: init(v) for k, v in ref.items()}
    state = uo.setup(ours, params)
    worst = 0.0
    for k in range(STEPS):
        noise = _noise(rng, params)
        state, params = uo.update(state, params, _grads(params, noise))
        for key, dx in _grads(ref, noise).items():
            ref[key] = ref[key] - step(rstate[key], ref[key], dx, k)
        worst = max(worst, *(rel_diff(params[key], ref[key]) for key in params))
    return worst


def _moments(st: list[Any], dx: np.ndarray, b1: float, b2: float) -> None:
    st[0] = b1 * st[0] + (1 - b1) * dx
    st[1] = b2 * st[1] + (1 - b2) * dx * dx


@pytest.mark.parametrize("couple", [True, False])
def test_flux_adamw(couple: bool) -> None:
    eta, b1, b2, lam, eps = 0.01, 0.8, 0.95, 0.05, 1e-6

    def step(st: list[Any], x: np.ndarray, dx: np.ndarray, k: int) -> np.ndarray:
        _moments(st, dx, b1, b2)
        d = st[0] / (1 - st[2][0]) / (np.sqrt(st[1] / (1 - st[2][1])) + eps)
        st[2] = (st[2][0] * b1, st[2][1] * b2)
        return eta * (d + lam * x) if couple else eta * d + lam * x

    ours = uo.adamw(eta, betas=(b1, b2), eps=eps, weight_decay=lam, couple_lr=couple,
                    convention="flux")
    assert _flux_run(ours, lambda x: [0 * x, 0 * x, (b1, b2)], step) < TOL


def test_flux_amsgrad_starts_at_eps_uncorrected() -> None:
    eta, b1, b2, eps = 0.01, 0.8, 0.95, 1e-3  # a large eps: where the moments start matters

    def step(st: list[Any], x: np.ndarray, dx: np.ndarray, k: int) -> np.ndarray:
        _moments(st, dx, b1, b2)
        st[2] = np.maximum(st[2], st[1])
        return eta * st[0] / (np.sqrt(st[2]) + eps)

    ours = uo.adam(eta, betas=(b1, b2), eps=eps, amsgrad=True, convention="flux")
    assert _flux_run(ours, lambda x: [x * 0 + eps] * 3, step) < TOL


def test_flux_nadam_has_b2_in_the_root() -> None:
    eta, b1, b2, eps = _wavy(0.01), 0.8, 0.95, 1e-6

    def step(st: list[Any], x: np.ndarray, dx: np.ndarray, k: int) -> np.ndarray:
        _moments(st, dx, b1, b2)
        bt1, bt2 = st[2]
        num = b1 * st[0] / (1 - b1 * bt1) + (1 - b1) * dx / (1 - bt1)
        st[2] = (bt1 * b1, bt2 * b2)
        return num / (np.sqrt(st[1] * b2 / (1 - bt2)) + eps) * eta(k)

    ours = uo.nadam(eta, betas=(b1, b2), eps=eps, convention="flux")
    assert _flux_run(ours, lambda x: [0 * x, 0 * x, (b1, b2)], step) < TOL


def test_flux_oadam_first_step_and_remembered_term() -> None:
    """Optimisers.jl's default betas (0.5, 0.9); under a schedule the remembered term keeps
    the learning rate it was made with."""
    eta, eps = _wavy(0.01), 1e-8
    b1, b2 = 0.5, 0.9

    def step(st: list[Any], x: np.ndarray, dx: np.ndarray, k: int) -> np.ndarray:
        _moments(st, dx, b1, b2)
        prev = st[3]
        st[3] = eta(k) * st[0] / (1 - st[2][0]) / (np.sqrt(st[1] / (1 - st[2][1])) + eps)
        st[2] = (st[2][0] * b1, st[2][1] * b2)
        return 2 * st[3] - prev

    ours = uo.optimistic_adam(eta, convention="flux")
    assert (ours.b1, ours.b2) == (b1, b2)
    assert _flux_run(ours, lambda x: [0 * x, 0 * x, (b1, b2), 0 * x], step) < TOL


def test_flux_radam_rectifies_above_4() -> None:
    """b2 = 0.999: rho_5 is just below 5, so Optimisers.jl (> 4) takes the adaptive step at
    t = 5 where torch (> 5) does not yet."""
    eta, b1, b2, eps = 0.01, 0.8, 0.999, 1e-6
    rho_inf = 2 / (1 - b2) - 1

    def step(st: list[Any], x: np.ndarray, dx: np.ndarray, k: int) -> np.ndarray:
        _moments(st, dx, b1, b2)
        bt1, bt2 = st[2]
        t = k + 1
        rho = rho_inf - 2 * t * bt2 / (1 - bt2)
        st[2] = (bt1 * b1, bt2 * b2)
        if rho > 4:
            r = np.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            return st[0] / (1 - bt1) / (np.sqrt(st[1] / (1 - bt2)) + eps) * eta * r
        return st[0] / (1 - bt1) * eta

    ours = uo.radam(eta, betas=(b1, b2), eps=eps, convention="flux")
    assert _flux_run(ours, lambda x: [0 * x, 0 * x, (b1, b2)], step) < TOL
    assert 4 < rho_inf - 10 * b2**5 / (1 - b2**5) <= 5  # t = 5 is where they part


def test_flux_adamax_eps_outside_the_max() -> None:
    eta, b1, b2, eps = 0.01, 0.8, 0.95, 1e-2

    def step(st: list[Any], x: np.ndarray, dx: np.ndarray, k: int) -> np.ndarray:
        st[0] = b1 * st[0] + (1 - b1) * dx
        st[1] = np.maximum(b2 * st[1], np.abs(dx))
        out = (eta / (1 - st[2][0])) * st[0] / (st[1] + eps)
        st[2] = (st[2][0] * b1, st[2][1] * b2)
        return out

    ours = uo.adamax(eta, betas=(b1, b2), eps=eps, convention="flux")
    assert _flux_run(ours, lambda x: [0 * x, 0 * x, (b1, b2)], step) < TOL


# --- the tables and the errors ---------------------------------------------------------------


def test_conventions_set_defaults_and_keep_what_is_given() -> None:
    assert uo.adam().eps == 1e-8 and uo.adam(convention="keras").eps == 1e-7
    assert uo.adam(eps=1e-5, convention="keras").eps == 1e-5
    assert uo.adamw(convention="keras").weight_decay == 4e-3
    assert uo.adamw(convention="optax").weight_decay == 1e-4
    assert uo.adamw(convention="flux").weight_decay == 0.0
    assert uo.adamw(convention="paper").couple_lr is False
    assert uo.adamax().lr == 2e-3 and uo.adamax(convention="keras").lr == 1e-3
    assert uo.nadam(convention="keras").momentum_decay == 1.0
    assert uo.optimistic_adam(0.1).convention == "optax"
    assert uo.radam(convention="flux").rectify_threshold == 4.0


@pytest.mark.parametrize("make, value", [
    (lambda: uo.adam(convention="jax"), "'jax'"),
    (lambda: uo.radam(convention="keras"), "'keras'"),  # keras has no RAdam
    (lambda: uo.optimistic_adam(0.1, convention="torch"), "'torch'"),
    (lambda: uo.adam(amsgrad_max="max"), "'max'"),
    (lambda: uo.adamw(moments_init="one"), "'one'"),
    (lambda: uo.adam(amsgrad=True, moments_init="eps"), "'raw'"),
    (lambda: uo.adam(amsgrad=True, eps_hat=True, amsgrad_max="corrected"), "'corrected'"),
    (lambda: uo.nadam(momentum_schedule="linear"), "'linear'"),
    (lambda: uo.nadam(b2_in_root=True), "'dozat'"),
    (lambda: uo.adam(decay_form="coupled"), "'coupled'"),
    (lambda: uo.adamax(decay_form="L2", convention="keras"), "'L2'"),
    (lambda: uo.optimistic_adam(0.1, first_prev="last"), "'last'"),
    (lambda: uo.radam(rectify_threshold=1.0), "1.0"),
    # in [2, 4) the rectifier is imaginary where rho_t is: a silent zero step, or a complex one
    (lambda: uo.radam(rectify_threshold=3.0, convention="optax"),
     r"rectify_threshold must be a number >= 4 \(r_t is real where rho_t >= 4\), got 3.0"),
])
def test_bad_conventions_and_options_raise(make: Callable[[], Any], value: str) -> None:
    with pytest.raises(ValueError, match=value):
        make()


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # keras's
def test_keras_accumulation_reads_its_schedule_at_the_micro_batch(keras: Any, jx: Any) -> None:
    """keras's ``gradient_accumulation_steps=k`` reads a learning-rate schedule at its count of
    calls; ``uo.accumulate`` counts updates. docs/coming-from/keras.md gives the rule keras's
    count, ``lr=lambda s: sched(k*s + k - 1)``: 40 micro-batches of AdamW, float64, against
    ``keras.optimizers.AdamW(ExponentialDecay(...), gradient_accumulation_steps=4)`` (read at
    ``s``, the first update was 0.1 off and the second 0.7)."""
    k = 4
    sched = uo.schedules.exponential(0.05, 0.7, 10)
    theirs = keras.optimizers.AdamW(
        keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=10, decay_rate=0.7),
        weight_decay=0.1, gradient_accumulation_steps=k)
    ours = uo.accumulate(uo.adamw(lr=lambda s: sched(k * s + k - 1), weight_decay=0.1,
                                  convention="keras"), every=k)
    rng = np.random.default_rng(8)
    start = [rng.normal(size=(3, 2)), rng.normal(size=4)]
    variables = [keras.Variable(p.copy(), dtype="float64") for p in start]
    params = [p.copy() for p in start]
    state = uo.setup(ours, params)
    for _ in range(40):
        grads = [rng.normal(size=p.shape) for p in start]
        theirs.apply_gradients([(keras.ops.convert_to_tensor(g, dtype="float64"), v)
                                for g, v in zip(grads, variables, strict=True)])
        state = uo.update_(state, params, grads)
        for p, v in zip(params, variables, strict=True):
            assert rel_diff(p, np.asarray(keras.ops.convert_to_numpy(v))) < 1e-12


def test_keras_schedules_map_as_the_keras_page_says() -> None:
    """docs/coming-from/keras.md's table, held to keras's own schedules (computed in float32:
    1e-6 relative) over 120 steps, restarts and boundaries included. Each keras schedule is
    read under ``jax.jit``, as keras's compiled train step reads it (called eagerly, the
    restarts schedule compiles its ``cond`` anew at every step: most of the 5 s this test
    took)."""
    keras = keras_on_jax()
    import jax

    K, S = keras.optimizers.schedules, uo.schedules
    pairs = {
        "exponential": (K.ExponentialDecay(0.1, 10, 0.5), S.exponential(0.1, 0.5, 10)),
        "staircase": (K.ExponentialDecay(0.1, 10, 0.5, staircase=True),
                      S.exponential(0.1, 0.5, 10, staircase=True)),
        "polynomial": (K.PolynomialDecay(0.1, 50, 0.01, power=2.0),
                       S.polynomial(0.1, 0.01, 50, power=2.0)),
        "piecewise": (K.PiecewiseConstantDecay([10, 20], [0.1, 0.05, 0.01]),
                      S.piecewise_constant(0.1, {11: 0.05, 21: 0.01})),
        "cosine": (K.CosineDecay(0.1, 50, alpha=0.1), S.cosine(0.1, 50, floor=0.01)),
        "cosine-warmup": (K.CosineDecay(0.0, 50, alpha=0.1, warmup_target=0.1, warmup_steps=10),
                          S.warmup(10, S.cosine(0.1, 50, floor=0.01), init=0.0)),
        "restarts": (K.CosineDecayRestarts(0.1, 10, t_mul=2.0, m_mul=1.0, alpha=0.1),
                     S.sgdr(0.1, 10, mult=2, floor=0.01)),
        "inverse-time": (K.InverseTimeDecay(0.1, 10, 0.5), lambda s: 0.1 / (1 + 0.5 * s / 10)),
    }
    for name, (theirs, ours) in pairs.items():
        at = jax.jit(theirs.__call__)
        for s in range(120):
            assert abs(float(at(s)) - ours(s)) <= 1e-6 * 0.1, (name, s)
    # (without the +1 the piecewise schedule moves one step early)
    early = S.piecewise_constant(0.1, {10: 0.05, 20: 0.01})
    assert early(10) != float(pairs["piecewise"][0](10))
