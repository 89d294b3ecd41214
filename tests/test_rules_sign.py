"""lion, sign_sgd and signum against their peers: optax (under ``jax.jit``, x64), the authors'
``lion_pytorch`` (float64 tensors), keras 3 on JAX (float64 variables) and keras's own golden
values for Lion (read from its installed ``lion_test.py`` at test time).

Both sides run free for 300 steps in float64, each computing its gradient at its own
parameters, so a wrong step anywhere shows in every later one. A sign step is exact
(``lr*(+-1)``): the peers differ only in how they round the decay and the momentum.
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
from free_run import (
    LR_SCHEDULE,
    TOL,
    grad_at,
    optax_schedule,
    run_keras,
    run_optax,
    run_ours,
    run_torch,
    start_of,
    worst_of,
)
from helpers import keras_on_jax, rel_diff


def _hp(seed: int) -> dict[str, float]:
    rng = np.random.default_rng(1000 + seed)
    return dict(lr=float(rng.uniform(1e-3, 3e-2)), b1=float(rng.uniform(0.5, 0.95)),
                b2=float(rng.uniform(0.9, 0.999)), wd=float(rng.choice([0.0, rng.uniform(0, 1)])))


# --- lion ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_lion_optax_convention_matches_optax(jx: Any, seed: int) -> None:
    optax = pytest.importorskip("optax")
    h = _hp(seed)
    ours = uo.lion(h["lr"], betas=(h["b1"], h["b2"]), weight_decay=h["wd"], convention="optax")
    theirs = optax.lion(h["lr"], b1=h["b1"], b2=h["b2"], weight_decay=h["wd"])
    assert worst_of(run_ours(ours, seed), run_optax(jx, theirs, seed)) < TOL


@pytest.mark.slow
def test_lion_scheduled_lr_and_defaults_match_optax(jx: Any) -> None:
    optax = pytest.importorskip("optax")
    ours = uo.lion(LR_SCHEDULE, convention="optax")  # optax's weight_decay 1e-3, betas
    theirs = optax.lion(optax_schedule(optax))
    assert worst_of(run_ours(ours, 3), run_optax(jx, theirs, 3)) < TOL
    # a wrong default shows: weight decay is not negligible at this scale
    assert worst_of(run_ours(uo.lion(LR_SCHEDULE), 3), run_optax(jx, theirs, 3)) > 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("couple_lr", [True, False])
def test_lion_matches_lion_pytorch(seed: int, couple_lr: bool) -> None:
    lion_pytorch = pytest.importorskip("lion_pytorch")
    h = _hp(seed)
    wd = h["wd"] or 0.3
    if not couple_lr:
        wd *= h["lr"]  # lion_pytorch divides it by the initial lr: the same decay per step
    ours = uo.lion(h["lr"], betas=(h["b1"], h["b2"]), weight_decay=wd, couple_lr=couple_lr)
    theirs = run_torch(lambda ps: lion_pytorch.Lion(
        ps, lr=h["lr"], betas=(h["b1"], h["b2"]), weight_decay=wd,
        decoupled_weight_decay=not couple_lr), seed)
    err = worst_of(run_ours(ours, seed), theirs)
    # coupled: lion_pytorch's own operation order (p*(1 - lr*wd), then one fused
    # multiply-add), bit for bit; decoupled: its 1 - lr*(wd/lr) is 1 - wd up to an ulp
    assert err == 0.0 if couple_lr else err < TOL, err


@pytest.mark.slow
def test_lion_scheduled_lr_matches_lion_pytorch() -> None:
    lion_pytorch = pytest.importorskip("lion_pytorch")
    ours = uo.lion(LR_SCHEDULE, weight_decay=0.5)  # the paper's defaults otherwise

    def schedule(k: int) -> float:
        return float(LR_SCHEDULE(k))

    theirs = run_torch(lambda ps: lion_pytorch.Lion(ps, lr=0.05, weight_decay=0.5), 4, schedule)
    assert worst_of(run_ours(ours, 4), theirs) < TOL


def test_lion_defaults_per_convention() -> None:
    assert uo.lion() == uo.lion(1e-4, betas=(0.9, 0.99), weight_decay=0.0)
    assert uo.lion(convention="optax").weight_decay == 1e-3
    assert uo.lion(convention="keras").lr == 1e-3
    assert uo.lion(convention="keras").weight_decay == 0.0


@pytest.fixture(scope="module")
def keras(jx: Any) -> Any:
    return keras_on_jax()


@pytest.mark.slow
@pytest.mark.parametrize("wd", [0.0, 0.4])
def test_lion_keras_convention_matches_keras(keras: Any, jx: Any, wd: float) -> None:
    """keras on JAX in float64 variables (its arithmetic is float64 there too: it casts its
    numbers to the variable's dtype); the rate is dyadic, since keras keeps it in a float32
    variable, so that it is the same number on both sides."""
    lr = 2**-7
    ours = uo.lion(lr, betas=(0.8, 0.95), weight_decay=wd, convention="keras")
    opt = keras.optimizers.Lion(learning_rate=lr, beta_1=0.8, beta_2=0.95,
                                weight_decay=wd or None)
    theirs = run_keras(jx, keras, opt, 5)
    assert worst_of(run_ours(ours, 5), theirs) < TOL


def _keras_lion_golden() -> dict[str, Any]:
    """keras's ``LionTest.test_correctness_with_golden``: its optimizer's arguments, ``x``,
    the gradients, the golden rows and the tolerances, read from the installed file (a
    changed test fails here rather than passing on stale numbers)."""
    spec = importlib.util.find_spec("keras")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("keras is not installed")
    path = pathlib.Path(list(spec.submodule_search_locations)[0], "src", "optimizers",
                        "lion_test.py")
    if not path.exists():
        pytest.skip(f"this keras has no {path}")
    tree = ast.parse(path.read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
              and n.name == "test_correctness_with_golden")

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            args = [value(a) for a in node.args]
            if node.func.attr == "Variable":
                return np.asarray(args[0], np.float64)
            if node.func.attr in ("ones", "full", "arange", "tile", "array"):
                return np.asarray(getattr(np, node.func.attr)(*args), np.float64)
        return ast.literal_eval(node)

    found: dict[str, Any] = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name == "optimizer":
                assert isinstance(node.value, ast.Call)
                found["kwargs"] = {k.arg: ast.literal_eval(k.value) for k in node.value.keywords}
            else:
                found[name] = value(node.value)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "assertAllClose"):
            found.update({k.arg: ast.literal_eval(k.value) for k in node.keywords})
    assert {"kwargs", "x", "grads", "first_grads", "golden", "rtol", "atol"} <= found.keys()
    return found


def test_lion_keras_convention_reproduces_keras_golden_values() -> None:
    g = _keras_lion_golden()
    names = {"learning_rate": "lr", "weight_decay": "weight_decay"}
    assert set(g["kwargs"]) <= {*names, "beta_1", "beta_2"}, g["kwargs"]
    kw = {names[k]: v for k, v in g["kwargs"].items() if k in names}
    if "beta_1" in g["kwargs"] or "beta_2" in g["kwargs"]:
        kw["betas"] = (g["kwargs"].get("beta_1", 0.9), g["kwargs"].get("beta_2", 0.99))
    x = [g["x"].copy()]
    state = uo.setup(uo.lion(**kw, convention="keras"), x)
    state, x = uo.update(state, x, [g["first_grads"]])
    for row in g["golden"]:
        np.testing.assert_allclose(x[0], row, rtol=g["rtol"], atol=g["atol"])
        state, x = uo.update(state, x, [g["grads"]])
    # the paper's default lr (1e-4) would miss keras's rows (1e-3 per step) by far
    x = [g["x"].copy()]
    state = uo.setup(uo.lion(**{k: v for k, v in kw.items() if k != "lr"}), x)
    state, x = uo.update(state, x, [g["first_grads"]])
    state, x = uo.update(state, x, [g["grads"]])
    assert np.max(np.abs(x[0] - g["golden"][1])) > 1e-3


# --- sign_sgd, signum ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("scheduled", [False, True])
def test_sign_sgd_and_signum_match_optax(jx: Any, scheduled: bool) -> None:
    optax = pytest.importorskip("optax")
    lr: Any = LR_SCHEDULE if scheduled else 0.02
    their_lr = optax_schedule(optax) if scheduled else 0.02
    assert worst_of(run_ours(uo.sign_sgd(lr), 6), run_optax(jx, optax.sign_sgd(their_lr), 6)) < TOL
    beta = 0.9 if scheduled else 0.75
    err = worst_of(run_ours(uo.signum(lr, beta=beta), 7),
                 run_optax(jx, optax.signum(their_lr, beta=beta), 7))
    assert err < TOL


# --- the other array libraries, the in-place update ------------------------------------------


RULES = {
    "lion": lambda: uo.lion(0.01, betas=(0.8, 0.95), weight_decay=0.3),
    "lion_uncoupled": lambda: uo.lion(0.01, weight_decay=0.003, couple_lr=False),
    "sign_sgd": lambda: uo.sign_sgd(0.01),
    "signum": lambda: uo.signum(0.01, beta=0.8),
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_torch_jax_and_in_place_match_numpy(jx: Any, name: str) -> None:
    torch = pytest.importorskip("torch")
    jnp = jx.numpy
    rule = RULES[name]()
    params, noises = start_of(8)
    ref = run_ours(rule, 8)[:20]
    runs: dict[str, Any] = {
        "torch": {k: torch.tensor(v) for k, v in params.items()},
        "jax": {k: jnp.asarray(v) for k, v in params.items()},
        "in_place": {k: v.copy() for k, v in params.items()},
    }
    for label, p in runs.items():
        state = uo.setup(rule, p)
        for i, noise in enumerate(noises[:20]):
            g = {k: grad_at(np.asarray(v), noise[k]) for k, v in p.items()}
            if label == "in_place":
                state = uo.update_(state, p, g)
            else:
                as_lib = torch.tensor if label == "torch" else jnp.asarray
                state, p = uo.update(state, p, {k: as_lib(v) for k, v in g.items()})
            assert max(rel_diff(np.asarray(p[k]), ref[i][k]) for k in p) < TOL, (label, i)


# --- bad hyperparameters ---------------------------------------------------------------------


@pytest.mark.parametrize(("make", "message"), [
    (lambda: uo.lion(lr=-1.0), r"^lion: lr must be >= 0, got -1\.0$"),
    (lambda: uo.lion(betas=(1.5, 0.99)), r"^lion: betas\[0\] must be in \[0, 1\], got 1\.5$"),
    (lambda: uo.lion(betas=(0.9, -0.1)), r"^lion: betas\[1\] must be in \[0, 1\], got -0\.1$"),
    (lambda: uo.lion(weight_decay=-1e-3), r"^lion: weight_decay must be >= 0, got -0\.001$"),
    (lambda: uo.lion(convention="torch"),
     r"^lion: convention must be one of 'paper', 'optax', 'keras', got 'torch'$"),
    (lambda: uo.sign_sgd(lr=-0.1), r"^sign_sgd: lr must be >= 0, got -0\.1$"),
    (lambda: uo.signum(beta=1.0), r"^signum: beta must be in \[0, 1\), got 1\.0$"),
    (lambda: uo.signum(lr=-0.1), r"^signum: lr must be >= 0, got -0\.1$"),
])
def test_bad_hyperparameters_are_named(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_a_schedule_going_negative_is_caught_before_anything_changes() -> None:
    p = [np.ones(3)]
    state = uo.setup(uo.lion(lambda s: 0.1 - 0.2 * s), p)
    state, p = uo.update(state, p, [np.ones(3)])
    before = p[0].copy()
    with pytest.raises(ValueError, match=r"^lion: lr must be >= 0, got -0\.1 \(the value of its "
                                         r"schedule at step 1\)$"):
        uo.update_(state, p, [np.ones(3)])
    assert np.array_equal(p[0], before)
