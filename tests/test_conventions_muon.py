"""Muon's ``convention=`` against the frameworks it names: on 2-D parameters, and for optax
also on trees with other leaves, which optax's muon (and ours with ``others="adamw"``, set by
the convention) gives to AdamW; keras's AdamW branch is not compared.

- ``"optax"``: against ``optax.contrib.muon`` under ``jax.jit`` in float64, 120 free-running
  steps, Nesterov and heavy ball, each compiled once.
- ``"keras"``: against keras 3's ``Muon`` on its JAX backend (float64 variables, one compile
  per optimizer), and against keras's own values: ``test_Newton_Schulz`` and
  ``test_muon_single_step`` of its ``muon_test.py``, read with ``ast`` at test time, none of
  their numbers copied here.

Tolerance: 1e-10 of the largest magnitude (``helpers.rel_diff``), not the 1e-12 of the
elementwise rules. Both sides compute the same arithmetic in float64, in other orders (optax
and keras write ``(c A) @ A`` for our ``c (A @ A)``, ``(1-mu) g + mu b`` for torch's ``lerp``,
``lr (s O + wd p)`` for ``lr s O + lr wd p``): one step differs by a few ulps. Newton-Schulz
then amplifies: its slope at small singular values is ``a = 3.4445`` a step, ``a^5 ~ 480``
over five, and a free-running trajectory feeds each step's difference into the next
gradient. Measured (seed 0, 150 steps): 1e-15 after 10 steps, ~1e-12 after 100; 120 steps
stay below 1e-10 with a margin of ten or more.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from helpers import keras_on_jax, rel_diff

SHAPES = [(4, 6), (6, 3), (5, 5)]  # wide, tall (transposed for NS), square
STEPS = 120
TOL = 1e-10


def _problem(seed: int, shapes: list[tuple[int, int]] = SHAPES
             ) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    params = {f"w{i}": rng.standard_normal(s) for i, s in enumerate(shapes)}
    return params, [{k: 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}
                    for _ in range(STEPS)]


def _grads(params: dict[str, Any], noise: dict[str, Any], tanh: Any = np.tanh) -> dict[str, Any]:
    """A bounded loss's gradient at ``params`` plus shared noise: each side runs free."""
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
    """``update(p, s, g) -> (p, s)`` under one ``jax.jit``, the gradient taken inside."""
    jnp = jx.numpy
    step = jx.jit(lambda p, s, n: update(p, s, _grads(p, n, jnp.tanh)))
    path = []
    for noise in noises:
        params, state = step(params, state, noise)
        path.append(params)
    return jx.device_get(path)


# --- optax -----------------------------------------------------------------------------------


@pytest.mark.parametrize("nesterov", [True, False])
def test_optax_convention_matches_optax_contrib_muon(jx: Any, nesterov: bool) -> None:
    """Momentum far from 1, a large eps (its placement, X/(|X| + eps), and the bias
    correction then show), decay on; every shape scaling of optax's width rule."""
    import optax

    lr, beta, eps, wd = 0.02, 0.8, 1e-2, 0.05
    opt = optax.contrib.muon(lr, beta=beta, eps=eps, weight_decay=wd, nesterov=nesterov)
    params, noises = _problem(1 + nesterov)

    def update(p: Any, s: Any, g: Any) -> Any:
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    theirs_p = {k: jx.numpy.asarray(v) for k, v in params.items()}
    theirs = _run_jitted(jx, update, theirs_p, opt.init(theirs_p), noises)
    ours = uo.muon(lr, momentum=beta, eps=eps, weight_decay=wd, nesterov=nesterov,
                   convention="optax")
    worst = _worst(_ours(ours, params, noises), theirs)
    assert worst < TOL, worst
    # the convention is what makes it agree: torch's form is far off
    torch_form = uo.muon(lr, momentum=beta, eps=eps, weight_decay=wd, nesterov=nesterov)
    assert _worst(_ours(torch_form, params, noises[:5]), theirs[:5]) > 1e-4


# optax gives every leaf that is not a matrix to its AdamW branch (NAdam-style with nesterov):
# ours with others="adamw", which the convention sets
MIXED = [(4, 6), (6, 3), (4,), ()]
OPTAX_MIXED_CASES = {
    "adaptive": (dict(adaptive=True), dict(adaptive=True)),
    "adam_options": (dict(nesterov=False, weight_decay=0.05, adam_b1=0.8, adam_b2=0.95,
                          adam_eps_root=1e-3, adam_weight_decay=0.1, adam_learning_rate=0.01),
                     dict(nesterov=False, weight_decay=0.05, adam_betas=(0.8, 0.95),
                          adam_eps_root=1e-3, adam_weight_decay=0.1, adam_lr=0.01)),
    "scheduled": (dict(), dict()),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(OPTAX_MIXED_CASES))
def test_optax_convention_on_a_mixed_tree(jx: Any, case: str) -> None:
    """Matrices, a vector and a scalar, 120 steps against optax.contrib.muon (measured 1e-15:
    these trajectories stay far below the bound the module docstring explains)."""
    import optax

    theirs_kw, ours_kw = OPTAX_MIXED_CASES[case]
    lr: Any = 0.02
    ours_lr: Any = 0.02
    if case == "scheduled":
        lr = optax.cosine_decay_schedule(0.02, STEPS, alpha=0.1)
        ours_lr = uo.schedules.cosine(0.02, steps=STEPS, floor=0.002)
    opt = optax.contrib.muon(lr, beta=0.8, eps=1e-2, **theirs_kw)
    params, noises = _problem(11, MIXED)

    def update(p: Any, s: Any, g: Any) -> Any:
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    theirs_p = {k: jx.numpy.asarray(v) for k, v in params.items()}
    theirs = _run_jitted(jx, update, theirs_p, opt.init(theirs_p), noises)
    ours = uo.muon(ours_lr, momentum=0.8, eps=1e-2, convention="optax", **ours_kw)
    assert _worst(_ours(ours, params, noises), theirs) < 1e-12


MATRIX_AXES_CASES = {
    # optax's MuonDimensionNumbers -> ours; one spec for every leaf of two or more axes
    "batch_first": ({"k": (2, 4, 6), "w": (3, 5), "b": (4,)}, (0, -1), {}),
    "merged_rows": ({"k": (3, 4, 5), "j": (2, 2, 6)}, ((0, 1), 2), dict(adaptive=True)),
    "swapped": ({"k": (5, 2, 3)}, (2, 0), dict(weight_decay=0.1)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(MATRIX_AXES_CASES))
def test_optax_matrix_axes(jx: Any, case: str) -> None:
    """``matrix_axes`` against ``muon_weight_dimension_numbers`` (batch axes, several
    reduction axes, output before reduction), 120 steps, then 5 steps on torch tensors."""
    import optax
    from optax.contrib import MuonDimensionNumbers

    shapes, axes, kw = MATRIX_AXES_CASES[case]
    spec = MuonDimensionNumbers(*axes)
    dims = {k: spec if len(s) >= 2 else None for k, s in shapes.items()}
    opt = optax.contrib.muon(0.02, beta=0.8, eps=1e-2, muon_weight_dimension_numbers=dims, **kw)
    params, noises = _problem(12, list(shapes.values()))
    params = dict(zip(shapes, params.values(), strict=True))
    noises = [dict(zip(shapes, n.values(), strict=True)) for n in noises]

    def update(p: Any, s: Any, g: Any) -> Any:
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    theirs_p = {k: jx.numpy.asarray(v) for k, v in params.items()}
    theirs = _run_jitted(jx, update, theirs_p, opt.init(theirs_p), noises)
    ours = uo.muon(0.02, momentum=0.8, eps=1e-2, convention="optax", matrix_axes=axes, **kw)
    path = _ours(ours, params, noises)
    assert _worst(path, theirs) < 1e-12  # measured 3e-15
    torch = pytest.importorskip("torch")
    ps = {k: torch.tensor(v) for k, v in params.items()}
    state = uo.setup(ours, ps)
    for noise in noises[:5]:
        g = {k: torch.tensor(v) for k, v in _grads({k: p.numpy() for k, p in ps.items()},
                                                    noise).items()}
        state, ps = uo.update(state, ps, g)
    assert max(rel_diff(ps[k].numpy(), path[4][k]) for k in ps) < 1e-12


def test_matrix_axes_errors() -> None:
    with pytest.raises(ValueError, match=r"^muon: matrix_axes must be None \(a 2-D leaf's rows "
                                         r"and columns\) or \(reduction axes, output axes\), "
                                         r"each an int or a tuple of ints, got \(0,\)$"):
        uo.muon(matrix_axes=(0,))
    with pytest.raises(ValueError, match=r"^muon: matrix_axes must be None \(a 2-D leaf's rows "
                                         r"and columns\) or \(reduction axes, output axes\), "
                                         r"each an int or a tuple of ints, got \(0, \(1\.5,\)\)$"):
        uo.muon(matrix_axes=(0, (1.5,)))
    with pytest.raises(ValueError, match="name an axis twice"):
        uo.setup(uo.muon(matrix_axes=(0, -2)), {"w": np.ones((2, 3))})
    with pytest.raises(ValueError, match="fewer than the 2"):
        uo.setup(uo.muon(matrix_axes=(0, 1)), {"b": np.ones(3)})


def test_others_error_and_adamw() -> None:
    params = {"w": np.ones((2, 3)), "b": np.ones(3)}
    with pytest.raises(ValueError, match="not a matrix"):
        uo.setup(uo.muon(), params)
    state = uo.setup(uo.muon(convention="optax"), params)
    assert set(state.tree_states["partition"]) == {"muon", "adam"}
    with pytest.raises(ValueError, match=r"^muon: others must be 'error' or 'adamw', got 'adam'$"):
        uo.muon(others="adam")
    with pytest.raises(ValueError, match=r"^muon: adam_lr must be None \(lr\), a number >= 0 or "
                                         r"a schedule, got -1\.0$"):
        uo.muon(others="adamw", adam_lr=-1.0)


def test_optax_defaults() -> None:
    """optax.contrib.muon's defaults, read from its signature."""
    import inspect

    optax = pytest.importorskip("optax")
    sig = inspect.signature(optax.contrib.muon).parameters
    ours = uo.muon(convention="optax")
    assert ours.eps == sig["eps"].default and ours.weight_decay == sig["weight_decay"].default
    assert ours.momentum == sig["beta"].default and ours.ns_steps == sig["ns_steps"].default
    assert ours.nesterov is sig["nesterov"].default
    assert ours.ns_coefficients == tuple(sig["ns_coeffs"].default)
    assert sig["consistent_rms"].default is None and sig["adaptive"].default is False
    assert sig["preconditioning"].default == "frobenius"


# --- keras -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras(jx: Any) -> Any:
    return keras_on_jax()


# keras keeps its learning rate in a float32 variable: a dyadic rate is the same in float64;
# and it takes sqrt(max(A, B)) of Python ints in its default float32: shapes whose larger side
# is a square keep that factor exact (sqrt(6) would differ by 1e-8, float32's rounding)
KERAS_SHAPES = [(4, 9), (9, 1), (4, 4)]
KERAS_CASES = {
    "nesterov": (dict(learning_rate=2**-6, momentum=0.8, weight_decay=0.05),
                 dict(lr=2**-6, momentum=0.8, weight_decay=0.05)),
    # keras's nesterov=False hands its momentum Variable itself to NS, which JAX refuses
    # (keras 3.15, eagerly and under jit alike): its heavy-ball form is not compared here
    "coefficients": (dict(learning_rate=2**-5, momentum=0.7, weight_decay=0.1,
                          muon_a=3.0, muon_b=-3.2, muon_c=1.2, ns_steps=4),
                     dict(lr=2**-5, momentum=0.7, weight_decay=0.1,
                          ns_coefficients=(3.0, -3.2, 1.2), ns_steps=4)),
}


def _keras_worst(keras: Any, jx: Any, case: str) -> float:
    kwargs, ours_kw = KERAS_CASES[case]
    params, noises = _problem(7, KERAS_SHAPES)
    variables = [keras.Variable(p.copy(), dtype="float64", name=k) for k, p in params.items()]
    opt = keras.optimizers.Muon(**kwargs)
    opt.build(variables)
    assert not any(opt._should_use_adamw(v) for v in variables)  # the Muon step for all

    def update(p: Any, s: Any, g: Any) -> Any:
        p, s = opt.stateless_apply(s, list(g.values()), list(p.values()))
        return dict(zip(params, p, strict=True)), s

    theirs = _run_jitted(jx, update, {k: v.value for k, v in zip(params, variables, strict=True)},
                         [v.value for v in opt.variables], noises)
    return _worst(_ours(uo.muon(**ours_kw, convention="keras"), params, noises), theirs)


@pytest.mark.parametrize("case", sorted(KERAS_CASES))
def test_keras_convention_matches_keras_muon(keras: Any, jx: Any, case: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """keras's ``ops.norm`` returns float32 for a float64 input (keras 3.15, JAX backend): its
    Newton-Schulz starts from ``X/(|X|_F + 1e-7)`` with the norm rounded to float32. With the
    norm kept in float64 (patched for this test) keras's Muon is ours to 1e-10."""
    from keras.src import ops

    monkeypatch.setattr(ops, "norm", lambda x, axis=None, keepdims=False, **kw:
                        jx.numpy.linalg.norm(x, axis=axis, keepdims=keepdims))
    worst = _keras_worst(keras, jx, case)
    assert worst < TOL, (case, worst)


def test_keras_convention_matches_keras_muon_as_it_rounds(keras: Any, jx: Any) -> None:
    """Unpatched: the float32 norm scales the iteration's input by up to 6e-8 relative, which
    NS, a polynomial and not scale-invariant, passes on (5e-8 on one step's O); 1e-6 bounds
    the 120-step trajectory (measured 2e-8). The forms' own differences are far larger."""
    worst = _keras_worst(keras, jx, "nesterov")
    assert worst < 1e-6, worst


def _keras_muon_test() -> ast.Module:
    spec = importlib.util.find_spec("keras")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("keras is not installed")
    path = pathlib.Path(list(spec.submodule_search_locations)[0], "src", "optimizers",
                        "muon_test.py")
    if not path.exists():
        pytest.skip(f"this keras has no {path}")
    return ast.parse(path.read_text())


def _literal(node: ast.AST) -> Any:
    """A literal, or ``ops.array(...)`` / ``backend.Variable(...)`` of one."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
            node.func.attr in ("array", "Variable"):
        return np.asarray(ast.literal_eval(node.args[0]), np.float64)
    return ast.literal_eval(node)


def _keras_test(tree: ast.Module, name: str) -> dict[str, Any]:
    """The assignments of ``name`` (variables, the optimizer's keyword arguments as
    ``"kwargs"``), the ``update_step``'s learning rate as ``"lr"`` and the first
    ``assertAllClose``'s expected value and tolerances."""
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    found: dict[str, Any] = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and \
                    value.func.id == "Muon":
                found["kwargs"] = {k.arg: ast.literal_eval(k.value) for k in value.keywords}
            else:
                try:
                    found[node.targets[0].id] = _literal(value)
                except ValueError:
                    continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "update_step":
                found["lr"] = ast.literal_eval(node.args[2])
            if node.func.attr == "assertAllClose" and "expected" not in found:
                found["expected"] = _literal(node.args[1]) if not isinstance(
                    node.args[1], ast.Name) else found[node.args[1].id]
                found.update({k.arg: ast.literal_eval(k.value) for k in node.keywords
                              if k.arg in ("rtol", "atol")})
    return found


def test_keras_golden_newton_schulz() -> None:
    """keras's ``test_Newton_Schulz``: its 2x2 input through five steps of its iteration;
    ours with keras's eps form and constant (1e-7 added) within keras's tolerance."""
    g = _keras_test(_keras_muon_test(), "test_Newton_Schulz")
    assert {"tensor_input", "expected", "rtol", "atol"} <= g.keys(), g.keys()
    part = uo.orthogonalize(eps=1e-7, eps_form="add")
    state = uo.setup(part, [g["tensor_input"]])
    _, (out,) = uo.update(state, [np.zeros((2, 2))], [g["tensor_input"]])
    np.testing.assert_allclose(-out, g["expected"], rtol=g["rtol"], atol=g["atol"])


def test_keras_golden_single_step() -> None:
    """keras's ``test_muon_single_step``: one ``update_step`` (keras applies weight decay
    elsewhere; its test sets it to 0) from its variables and gradients."""
    g = _keras_test(_keras_muon_test(), "test_muon_single_step")
    assert {"kwargs", "grads", "vars", "lr", "expected", "rtol", "atol"} <= g.keys(), g.keys()
    names = {"learning_rate": "lr", "weight_decay": "weight_decay"}
    assert g["kwargs"].keys() <= names.keys(), g["kwargs"]
    kw = {names[k]: v for k, v in g["kwargs"].items()}
    kw["lr"] = g["lr"]  # update_step is called with its own rate
    rule = uo.muon(**kw, convention="keras")
    state = uo.setup(rule, [g["vars"]])
    _, (p,) = uo.update(state, [g["vars"]], [g["grads"]])
    np.testing.assert_allclose(p, g["expected"], rtol=g["rtol"], atol=g["atol"])


# --- options and errors ----------------------------------------------------------------------


def test_keras_defaults_and_fixed_eps() -> None:
    ours = uo.muon(convention="keras")
    assert (ours.momentum_form, ours.eps_form, ours.adjust_lr_fn) == ("sum", "add",
                                                                       "match_rms_adamw")
    assert ours.eps == 1e-7 and ours.weight_decay == 0.004 and ours.lr == 1e-3
    if importlib.util.find_spec("keras") is None:
        return
    src = pathlib.Path(list(importlib.util.find_spec("keras").submodule_search_locations)[0],
                       "src", "optimizers", "muon.py").read_text()
    assert "+ 1e-7)" in src and "self.rms_rate" in src  # keras's NS eps is a constant
    tree = ast.parse(src)
    init = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                and n.name == "__init__")
    args = init.args
    defaults = {a.arg: ast.literal_eval(d) for a, d in
                zip(args.args[len(args.args) - len(args.defaults):], args.defaults, strict=True)}
    assert defaults["learning_rate"] == ours.lr and defaults["weight_decay"] == ours.weight_decay
    assert defaults["momentum"] == ours.momentum and defaults["ns_steps"] == ours.ns_steps
    assert (defaults["muon_a"], defaults["muon_b"], defaults["muon_c"]) == ours.ns_coefficients
    assert defaults["rms_rate"] == 0.2 and defaults["nesterov"] is ours.nesterov


def test_torch_convention_is_unchanged() -> None:
    assert uo.muon(convention="torch") == uo.muon()
    t = uo.muon()
    assert (t.momentum_form, t.eps_form, t.adjust_lr_fn, t.eps, t.weight_decay) == (
        "ema", "clamp", None, 1e-7, 0.1)


@pytest.mark.parametrize("field,value", [("momentum_form", "nesterov"), ("eps_form", "inside"),
                                         ("adjust_lr_fn", "in_out"), ("convention", "flux")])
def test_bad_option_values_raise(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=repr(value)):
        uo.muon(**{field: value})


def test_bad_eps_form_of_the_block_raises() -> None:
    with pytest.raises(ValueError, match="'inside'"):
        uo.orthogonalize(eps_form="inside")
