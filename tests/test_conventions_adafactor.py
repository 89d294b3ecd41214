"""Adafactor's ``convention=`` against the frameworks it names.

- ``"optax"``: against ``optax.adafactor`` under ``jax.jit`` in float64, 100 free-running steps,
  a 2-D leaf factored (``min_dim_size_to_factor=1`` on both sides) and not (optax's 128), with
  decay and clipping on. optax computes ``t`` of ``1 - t^-decay_rate`` in float32 (optax 0.2.8,
  ``_decay_rate_pow``), a relative error up to 6e-8 in the moving average's weight: the tight
  test builds optax's own chain (``scale_by_factored_rms`` ... ``scale(-1)``, as ``adafactor``
  assembles it) with that schedule in float64; ``optax.adafactor`` itself is held to 1e-6.
- ``"keras"``: against keras 3's ``Adafactor`` on its JAX backend (float64 variables; the
  one step keras takes in float32 there, ``ops.mean``, computed in float64: see
  ``keras_mean_in_float64``), with and without its weight decay, and
  keras's ``test_correctness_with_golden`` of its ``adafactor_test.py``, read with ``ast`` at
  test time, none of its numbers copied here.

Tolerance 1e-12 of the largest magnitude (``helpers.rel_diff``): both sides compute the same
float64 arithmetic in other orders (optax's ``(R/mean R)^-1/2 C^-1/2`` for our
``rsqrt(R C / mean R)``, ``d v + (1-d) x`` for torch's ``lerp``); measured 2e-15 after 100
steps (seed 0), the update being normalised by its own RMS at every step.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import re
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from helpers import keras_on_jax, rel_diff

SHAPES = [(4, 6), (6, 3), (5,)]
STEPS = 100
TOL = 1e-12


def _problem(seed: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    params = {f"w{i}": rng.standard_normal(s) for i, s in enumerate(SHAPES)}
    return params, [{k: 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}
                    for _ in range(STEPS)]


def _grads(params: dict[str, Any], noise: dict[str, Any], tanh: Any = np.tanh) -> dict[str, Any]:
    return {k: tanh(v) * 0.5 + noise[k] for k, v in params.items()}


def _ours(rule: uo.Transform, params: dict[str, np.ndarray],
          noises: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    state, path = uo.setup(rule, params), []
    for noise in noises:
        state, params = uo.update(state, params, _grads(params, noise))
        path.append(params)
    return path


def _worst(ours: list[dict[str, np.ndarray]], theirs: list[dict[str, Any]]) -> float:
    return max(rel_diff(p[k], np.asarray(q[k])) for p, q in zip(ours, theirs, strict=True)
               for k in p)


def _run_jitted(jx: Any, update: Any, params: Any, state: Any,
                noises: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    step = jx.jit(lambda p, s, n: update(p, s, _grads(p, n, jx.numpy.tanh)))
    path = []
    for noise in noises:
        params, state = step(params, state, noise)
        path.append(params)
    return jx.device_get(path)


@pytest.fixture(scope="module")
def jx():  # type: ignore[no-untyped-def]
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    with jax.enable_x64(True):
        yield jax


# --- optax -----------------------------------------------------------------------------------

LR, WD = 0.05, 0.01


def _optax_path(jx: Any, opt: Any, params: dict[str, np.ndarray],
                noises: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    import optax

    def update(p: Any, s: Any, g: Any) -> Any:
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    theirs_p = {k: jx.numpy.asarray(v) for k, v in params.items()}
    return _run_jitted(jx, update, theirs_p, opt.init(theirs_p), noises)


@pytest.mark.parametrize("min_dim", [1, 128])
def test_optax_convention_matches_optax_adafactor_chain(jx: Any, min_dim: int) -> None:
    """optax.adafactor's chain, its schedule's ``t`` in float64: to 1e-12. ``min_dim=1``
    factors the matrices (over both axes, the last two), 128 (optax's default) does not."""
    from optax._src import combine, factorized, transform
    from optax.transforms import _clipping

    def decay_rate_pow(i: Any, exponent: Any) -> Any:  # optax's, t in float64
        return 1.0 - jx.numpy.asarray(i + 1, jx.numpy.float64) ** (-exponent)

    opt = combine.chain(
        factorized.scale_by_factored_rms(True, 0.8, 0, min_dim, 1e-30,
                                         decay_rate_fn=decay_rate_pow),
        _clipping.clip_by_block_rms(1.0),
        transform.scale_by_learning_rate(LR, flip_sign=False),
        transform.scale_by_param_block_rms(),
        transform.add_decayed_weights(WD),
        transform.scale(-1),
    )
    params, noises = _problem(min_dim)
    theirs = _optax_path(jx, opt, params, noises)
    ours = uo.adafactor(lr=LR, weight_decay=WD, min_dim_size_to_factor=min_dim,
                        convention="optax")
    state = uo.setup(ours, params)
    factored = {k for k, v in zip(params, state.slots["scale_by_factored_rms.row_var"],
                                  strict=True) if v is not None}
    assert factored == ({"w0", "w1"} if min_dim == 1 else set()), factored
    worst = _worst(_ours(ours, params, noises), theirs)
    assert worst < TOL, worst
    # the decay's form is what tells them apart here (lr = 0.05 < 1/sqrt(t) for t <= 400)
    torch_form = uo.adafactor(lr=LR, weight_decay=WD)
    assert _worst(_ours(torch_form, params, noises[:5]), theirs[:5]) > 1e-4


def test_optax_convention_matches_optax_adafactor_as_it_rounds(jx: Any) -> None:
    """``optax.adafactor`` itself: its float32 ``t`` moves each weight by up to 6e-8 relative;
    1e-6 bounds the 100-step trajectory (measured 1.8e-8)."""
    import optax

    params, noises = _problem(1)
    opt = optax.adafactor(LR, min_dim_size_to_factor=1, weight_decay_rate=WD)
    theirs = _optax_path(jx, opt, params, noises)
    ours = uo.adafactor(lr=LR, weight_decay=WD, min_dim_size_to_factor=1, convention="optax")
    worst = _worst(_ours(ours, params, noises), theirs)
    assert worst < 1e-6, worst


def test_optax_defaults() -> None:
    import inspect

    optax = pytest.importorskip("optax")
    sig = inspect.signature(optax.adafactor).parameters
    ours = uo.adafactor(convention="optax")
    assert sig["learning_rate"].default is None and ours.lr == 1.0  # None: no lr scaling
    assert ours.min_dim_size_to_factor == sig["min_dim_size_to_factor"].default
    assert -ours.beta2_decay == sig["decay_rate"].default and sig["decay_offset"].default == 0
    assert ours.d == sig["clipping_threshold"].default and ours.eps[0] == sig["eps"].default
    assert sig["multiply_by_parameter_scale"].default is True and ours.param_scale is True
    assert sig["momentum"].default is None and sig["weight_decay_rate"].default is None
    assert ours.weight_decay == 0.0 and ours.eps[1] == 1e-3  # scale_by_param_block_rms's
    assert (ours.eps_form, ours.relative_step, ours.decay_form, ours.factored_axes) == (
        "add", False, "independent", "largest")


def test_optax_largest_axes_refused_where_they_are_not_the_last() -> None:
    rule = uo.adafactor(convention="optax", min_dim_size_to_factor=2)
    uo.setup(rule, [np.ones((2, 3, 4))])  # the two largest are the last two
    with pytest.raises(ValueError, match=re.escape(
            "adafactor: params[0] has shape (4, 3, 2): factored_axes='largest' (optax) factors "
            "axes [0, 1] of this leaf; uniopt factors the last two axes only, so optax's "
            "statistics for it are not offered")):
        uo.setup(rule, [np.ones((4, 3, 2))])
    uo.setup(rule, [np.ones((1, 4, 3))])  # ... and a leaf optax does not factor is fine
    uo.setup(uo.adafactor(convention="optax"), [np.ones((4, 3, 2))])


# --- keras -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras(jx: Any):  # type: ignore[no-untyped-def]
    return keras_on_jax()


@pytest.fixture
def keras_mean_in_float64(keras: Any, jx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """keras 3.15's JAX backend takes ``ops.mean`` of a float64 array in float32
    (``compute_dtype = result_type(x.dtype, "float32")``, which keras's promotion table makes
    float32): the only float32 step in its Adafactor there. This computes it in the array's
    dtype, so keras's own arithmetic can be held to float64's rounding."""
    from keras.src.backend.jax import numpy as backend_numpy

    probe = jx.numpy.asarray(np.array([1.0, 2.0**-30, 2.0**-30]))
    assert float(backend_numpy.mean(probe)) != float(np.mean(np.asarray(probe))), \
        "keras's mean is float64 now: test it without this patch, at 1e-12"
    monkeypatch.setattr(backend_numpy, "mean", lambda x, axis=None, keepdims=False:
                        jx.numpy.mean(jx.numpy.asarray(x), axis=axis, keepdims=keepdims))


# keras keeps its learning rate in a float32 variable: dyadic rates are the same in float64
KERAS_CASES = {
    "defaults": (dict(learning_rate=2**-4), dict(lr=2**-4)),
    "options": (dict(learning_rate=2**-3, beta_2_decay=-0.65, epsilon_1=1e-12, epsilon_2=1e-2,
                     clip_threshold=1.5),
                dict(lr=2**-3, beta2_decay=-0.65, eps=(1e-12, 1e-2), d=1.5)),
    # keras decays every variable before its update_step reads the parameter's scale
    "weight_decay": (dict(learning_rate=2**-4, weight_decay=0.1),
                     dict(lr=2**-4, weight_decay=0.1)),
}


def _keras_worst(keras: Any, jx: Any, case: str) -> float:
    kwargs, ours_kw = KERAS_CASES[case]
    params, noises = _problem(7)
    variables = [keras.Variable(p.copy(), dtype="float64", name=k) for k, p in params.items()]
    opt = keras.optimizers.Adafactor(**kwargs)
    opt.build(variables)

    def update(p: Any, s: Any, g: Any) -> Any:
        p, s = opt.stateless_apply(s, list(g.values()), list(p.values()))
        return dict(zip(params, p, strict=True)), s

    theirs = _run_jitted(jx, update, {k: v.value for k, v in zip(params, variables, strict=True)},
                         [v.value for v in opt.variables], noises)
    return _worst(_ours(uo.adafactor(**ours_kw, convention="keras"), params, noises), theirs)


@pytest.mark.parametrize("case", sorted(KERAS_CASES))
def test_keras_convention_matches_keras_adafactor(keras: Any, jx: Any,
                                                  keras_mean_in_float64: None, case: str) -> None:
    """With keras's one float32 step computed in float64, 100 steps agree to float64's
    rounding (measured 4e-16, 2e-16 and 8e-16)."""
    worst = _keras_worst(keras, jx, case)
    assert worst < TOL, (case, worst)


def _keras_golden() -> dict[str, Any]:
    """``test_correctness_with_golden``: the optimizer's keyword arguments, the start, the
    first and the later gradients (``np.ones``, ``np.arange``, ``np.full`` calls), the golden
    table and the tolerances, all read from keras's source."""
    spec = importlib.util.find_spec("keras")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("keras is not installed")
    path = pathlib.Path(list(spec.submodule_search_locations)[0], "src", "optimizers",
                        "adafactor_test.py")
    if not path.exists():
        pytest.skip(f"this keras has no {path}")
    tree = ast.parse(path.read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
              and n.name == "test_correctness_with_golden")
    numpy_calls = {"ones": np.ones, "arange": np.arange, "full": np.full, "array": np.array}
    found: dict[str, Any] = {}

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in numpy_calls:
                return numpy_calls[node.func.attr](*map(ast.literal_eval, node.args))
            if node.func.attr == "Variable":
                return value(node.args[0])
        return ast.literal_eval(node)

    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            call = node.value
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and \
                    call.func.id == "Adafactor":
                found["kwargs"] = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
            else:
                found[node.targets[0].id] = value(call)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr == "assertAllClose":
            found.update({k.arg: ast.literal_eval(k.value) for k in node.keywords})
    return found


def test_keras_golden() -> None:
    """keras's golden trajectory: one step of ``first_grads``, then ``grads``; each row of the
    table is the variable before a step, within keras's own tolerances."""
    g = _keras_golden()
    assert {"kwargs", "x", "grads", "first_grads", "golden", "rtol", "atol"} <= g.keys(), g.keys()
    names = {"learning_rate": "lr", "beta_2_decay": "beta2_decay", "clip_threshold": "d",
             "relative_step": "relative_step"}
    kw = {names[k]: v for k, v in g["kwargs"].items() if k in names}
    # keras 3.15 takes rho = min(lr, 1/sqrt(t)) whatever its relative_step says
    kw["relative_step"] = True
    kw["eps"] = (g["kwargs"]["epsilon_1"], g["kwargs"]["epsilon_2"])
    rule = uo.adafactor(**kw, convention="keras")
    state = uo.setup(rule, [g["x"]])
    state, (x,) = uo.update(state, [g["x"]], [g["first_grads"]])
    for row in g["golden"]:
        np.testing.assert_allclose(x, row, rtol=g["rtol"], atol=g["atol"])
        state, (x,) = uo.update(state, [x], [g["grads"]])


def test_keras_defaults() -> None:
    ours = uo.adafactor(convention="keras")
    assert ours.lr == 1e-3 and ours.eps == (1e-30, 1e-3) and ours.eps_form == "add"
    assert ours.beta2_decay == -0.8 and ours.d == 1.0 and ours.relative_step is True
    if importlib.util.find_spec("keras") is None:
        return
    src = pathlib.Path(list(importlib.util.find_spec("keras").submodule_search_locations)[0],
                       "src", "optimizers", "adafactor.py").read_text()
    init = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)
                and n.name == "__init__")
    args = init.args
    defaults = {a.arg: ast.literal_eval(d) for a, d in
                zip(args.args[len(args.args) - len(args.defaults):], args.defaults, strict=True)}
    assert defaults["learning_rate"] == ours.lr and defaults["beta_2_decay"] == ours.beta2_decay
    assert (defaults["epsilon_1"], defaults["epsilon_2"]) == ours.eps
    assert defaults["clip_threshold"] == ours.d and defaults["relative_step"] is True
    assert defaults["weight_decay"] is None and ours.weight_decay == 0.0


# --- options and errors ----------------------------------------------------------------------


def test_torch_convention_is_unchanged() -> None:
    assert uo.adafactor(convention="torch") == uo.adafactor()
    t = uo.adafactor()
    assert (t.eps_form, t.relative_step, t.param_scale, t.decay_form, t.min_dim_size_to_factor,
            t.factored_axes, t.lr, t.eps) == ("clamp", True, True, "decoupled", 1, "last",
                                              1e-2, (None, 1e-3))


def test_param_scale_off_is_lr_times_the_direction() -> None:
    rule = uo.adafactor(lr=0.5, param_scale=False, relative_step=False)
    p = [np.full(3, 10.0)]
    _, (q,) = uo.update(uo.setup(rule, p), p, [np.full(3, 2.0)])
    np.testing.assert_allclose(q, 10.0 - 0.5)  # g/|g| = 1, no rms(p) = 10 factor


@pytest.mark.parametrize("field,value", [("eps_form", "inside"), ("decay_form", "l2"),
                                         ("factored_axes", "first"),
                                         ("min_dim_size_to_factor", 0),
                                         ("relative_step", "yes"), ("convention", "flux")])
def test_bad_option_values_raise(field: str, value: Any) -> None:
    got = re.escape(repr(value))
    with pytest.raises(ValueError, match=rf"^adafactor: {field} must be .*, got {got}$"):
        uo.adafactor(**{field: value})


def test_keras_relative_step_false_is_refused_as_not_keras() -> None:
    """keras 3's Adafactor takes ``min(lr, 1/sqrt(t))`` whatever ``relative_step`` says: a port
    of ``Adafactor(relative_step=False)`` had run numbers keras never produces (4.4e-3 off
    keras's own golden values at row 5)."""
    with pytest.raises(ValueError, match="relative_step=False is not keras's"):
        uo.adafactor(convention="keras", relative_step=False)
    uo.adafactor(convention="optax", relative_step=False)  # optax's own form
