"""The built-in problems and the ``uniopt compare`` command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import uniopt as uo
from uniopt.tools.cli import DEFAULT_LR, RULES, main
from uniopt.tools.problems import PROBLEMS, Logistic, Quadratic, Rosenbrock

SRC = Path(__file__).resolve().parents[1] / "src"


def _fd_grad(problem, params, h=1e-6):
    """Central finite differences of ``problem.loss``, leaf by leaf, element by element."""
    out = []
    for leaf in uo.trainables(params):
        g = np.zeros_like(leaf)
        for i in np.ndindex(leaf.shape):
            old = leaf[i]
            leaf[i] = old + h
            up = problem.loss(params)
            leaf[i] = old - h
            down = problem.loss(params)
            leaf[i] = old
            g[i] = (up - down) / (2 * h)
        out.append(g)
    return out


def _points(problem):
    """The start, and a point away from it (Rosenbrock's start does not depend on the seed)."""
    start = problem.init(0)
    rng = np.random.default_rng(123)
    moved = problem.init(1)
    for leaf in uo.trainables(moved):
        leaf += 0.3 * rng.standard_normal(leaf.shape)
    return [start, moved]


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_gradient_matches_central_differences(name):
    problem = PROBLEMS[name]
    for params in _points(problem):
        analytic = uo.trainables(problem.grad(params))
        numeric = _fd_grad(problem, params)
        a, n = (
            np.concatenate([g.ravel() for g in analytic]),
            np.concatenate([g.ravel() for g in numeric]),
        )
        assert np.all(np.isfinite(a)) and np.linalg.norm(a) > 1e-3
        # truncation ~h^2 and rounding ~eps*|loss|/h are both far below 1e-7 of the gradient
        assert np.linalg.norm(a - n) <= 1e-7 * np.linalg.norm(a)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_grad_has_the_params_structure_and_float64(name):
    problem = PROBLEMS[name]
    params = problem.init(0)
    grads = problem.grad(params)
    assert type(grads) is type(params)
    for p, g in zip(uo.trainables(params), uo.trainables(grads), strict=True):
        assert g.shape == p.shape and g.dtype == p.dtype == np.float64


def test_logistic_params_are_a_tree():
    params = Logistic().init(0)
    assert sorted(params) == ["b", "w"]
    assert params["w"].shape == (20,) and params["b"].shape == ()


def test_rosenbrock_minimum():
    p = Rosenbrock(dim=6)
    assert p.optimum == 0.0
    assert p.loss(p.argmin) == 0.0
    assert np.all(p.grad(p.argmin)[0] == 0.0)
    np.testing.assert_array_equal(p.init(0)[0], [-1.2, 1.0, -1.2, 1.0, -1.2, 1.0])
    # the classic value at the classic start: 100 (1 - 1.44)^2 + 2.2^2
    assert Rosenbrock().loss(Rosenbrock().init(0)) == pytest.approx(24.2, rel=1e-15)


def test_quadratic_minimum_and_conditioning():
    p = Quadratic()
    a, b, _, _ = p._data
    assert np.linalg.cond(a) == pytest.approx(1e3, rel=1e-8)
    np.testing.assert_allclose(a, a.T, rtol=0, atol=0)
    x_star = np.linalg.solve(a, b)
    np.testing.assert_allclose(p.argmin[0], x_star, rtol=1e-10)
    assert p.optimum == pytest.approx(-0.5 * b @ x_star, rel=1e-12)
    assert p.loss(p.argmin) == pytest.approx(p.optimum, rel=1e-14)
    assert np.linalg.norm(p.grad(p.argmin)[0]) <= 1e-12 * np.linalg.norm(a) * np.linalg.norm(x_star)


def test_logistic_optimum_is_the_minimum():
    p = Logistic()
    g = p.grad(p.argmin)
    assert np.max(np.abs(g["w"])) < 1e-12 and abs(float(g["b"])) < 1e-12
    assert p.loss(p.argmin) == p.optimum
    # strictly convex: any move away from the argmin raises the loss
    rng = np.random.default_rng(0)
    for _ in range(20):
        moved = {k: v + 1e-3 * rng.standard_normal(v.shape) for k, v in p.argmin.items()}
        assert p.loss(moved) > p.optimum
    # Newton's answer agrees with a long, independent gradient descent from another start
    params = p.init(7)
    for _ in range(3000):
        g = p.grad(params)
        params = {k: v - 1.0 * g[k] for k, v in params.items()}
    assert p.loss(params) - p.optimum == pytest.approx(0.0, abs=1e-12)
    # the data set is not separable: the minimiser is where the L2 term balances the fit
    assert 0.1 < p.optimum < math.log(2)


def _run_pure(problem, rule, lr, steps, seed=0):
    """Losses after each of ``steps`` updates, through the pure API (the command uses update_)."""
    params = problem.init(seed)
    state = uo.setup(RULES[rule](lr), params)
    losses = [problem.loss(params)]
    for _ in range(steps):
        state, params = uo.update(state, params, problem.grad(params))
        losses.append(problem.loss(params))
    return losses


def _compare_json(capsys, *args):
    assert main(["compare", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _table_pairs(text):
    names = set(PROBLEMS)
    return {
        tuple(line.split()[:2])
        for line in text.splitlines()
        if line.split()[:1] in [[n] for n in names]
    }


def test_compare_prints_a_row_per_rule_and_problem(capsys):
    rules, problems = ["sgd", "adam", "adadelta", "optimistic_adam"], ["rosenbrock", "logistic"]
    rc = main(
        ["compare", "--steps", "200", "--rules", ",".join(rules), "--problems", ",".join(problems)]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert _table_pairs(out) == {(p, r) for p in problems for r in rules}
    assert "final loss" in out and "steps to 1e-06" in out


def test_compare_defaults_cover_every_rule_and_problem(capsys):
    assert main(["compare", "--steps", "20"]) == 0
    assert _table_pairs(capsys.readouterr().out) == {(p, r) for p in PROBLEMS for r in RULES}
    assert set(DEFAULT_LR) == set(PROBLEMS)
    assert all(set(row) == set(RULES) for row in DEFAULT_LR.values())


def test_json_output_fields_and_numbers(capsys):
    doc = _compare_json(
        capsys, "--steps", "150", "--rules", "adam,rmsprop", "--problems", "quadratic,logistic"
    )
    assert doc["settings"]["steps"] == 150 and doc["settings"]["lr"] is None
    results = doc["results"]
    assert [(r["problem"], r["rule"]) for r in results] == [
        ("quadratic", "adam"),
        ("quadratic", "rmsprop"),
        ("logistic", "adam"),
        ("logistic", "rmsprop"),
    ]
    for r in results:
        assert set(r) >= {
            "problem", "rule", "lr", "final_loss", "optimum", "gap", "steps_to_tol",
            "diverged", "us_per_update",
        }  # fmt: skip
        problem = PROBLEMS[r["problem"]]
        assert r["lr"] == DEFAULT_LR[r["problem"]][r["rule"]]
        assert r["optimum"] == problem.optimum
        assert r["diverged"] is False and r["us_per_update"] > 0
        # update_ in the command and the pure update here give the same numbers, bit for bit
        losses = _run_pure(problem, r["rule"], r["lr"], 150)
        assert r["initial_loss"] == losses[0]
        assert r["final_loss"] == losses[-1]
        assert r["gap"] == r["final_loss"] - r["optimum"]


def test_adam_reaches_tolerance_on_the_quadratic(capsys):
    tol = 1e-6
    doc = _compare_json(
        capsys, "--steps", "1000", "--rules", "adam", "--problems", "quadratic", "--tol", str(tol)
    )
    (r,) = doc["results"]
    hit = r["steps_to_tol"]
    assert isinstance(hit, int) and 0 < hit <= 1000
    gaps = np.array(_run_pure(PROBLEMS["quadratic"], "adam", r["lr"], 1000)) - r["optimum"]
    assert gaps[hit] <= tol and np.all(gaps[:hit] > tol)


def test_steps_to_tol_is_zero_when_the_start_is_within_tol(capsys):
    doc = _compare_json(capsys, "--steps", "3", "--rules", "sgd", "--tol", "1e9")
    assert [r["steps_to_tol"] for r in doc["results"]] == [0, 0, 0]


def test_never_reaching_tol_is_reported_as_none_and_dash(capsys):
    args = ["--steps", "5", "--rules", "adadelta", "--problems", "quadratic"]
    (r,) = _compare_json(capsys, *args)["results"]
    assert r["steps_to_tol"] is None and r["gap"] > 1e-6
    assert main(["compare", *args]) == 0
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("quadratic ")]
    assert row[0].split()[-2] == "-"


def test_lr_override_and_divergence_are_reported(capsys):
    args = ["--steps", "100", "--rules", "sgd,adam", "--problems", "rosenbrock", "--lr", "1"]
    sgd_run, adam_run = _compare_json(capsys, *args)["results"]
    assert sgd_run["lr"] == adam_run["lr"] == 1.0
    # plain gradient steps of size 1 on Rosenbrock blow up within a few updates
    with np.errstate(all="ignore"):
        losses = np.array(_run_pure(PROBLEMS["rosenbrock"], "sgd", 1.0, 100))
        first_bad = int(np.argmax(~np.isfinite(losses)))
    assert first_bad > 0
    assert sgd_run["diverged"] is True and sgd_run["diverged_at"] == first_bad
    assert sgd_run["final_loss"] is None and sgd_run["gap"] is None
    assert sgd_run["steps_to_tol"] is None
    assert adam_run["diverged"] is False and math.isfinite(adam_run["final_loss"])
    assert main(["compare", *args]) == 0
    out = capsys.readouterr().out
    assert "diverged" in out and f"at step {first_bad}" in out


@pytest.mark.parametrize(
    ("flag", "value", "bad"),
    [
        ("--rules", "adam,adamax", "adamax"),
        ("--problems", "quadratic,himmelblau", "himmelblau"),
        ("--steps", "0", "0"),
        ("--tol", "-1", "-1"),
        ("--lr", "inf", "inf"),
    ],
)
def test_bad_arguments_are_usage_errors(capsys, flag, value, bad):
    assert main(["compare", flag, value]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"argument {flag}" in captured.err and repr(bad) in captured.err


def test_unknown_rule_lists_the_choices(capsys):
    assert main(["compare", "--rules", "sgdd"]) == 2
    err = capsys.readouterr().err
    assert "unknown rule 'sgdd'" in err and all(r in err for r in RULES)


def test_no_subcommand_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_python_dash_m_runs_the_command():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "uniopt", "compare", "--steps", "50"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert _table_pairs(proc.stdout) == {(p, r) for p in PROBLEMS for r in RULES}
    bad = subprocess.run(
        [sys.executable, "-m", "uniopt", "compare", "--rules", "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2 and "'nope'" in bad.stderr


def test_compare_needs_no_optional_framework():
    code = (
        "import sys; from uniopt.tools.cli import main; main(['compare', '--steps', '2']); "
        "print(sorted(m for m in ('torch', 'jax', 'matplotlib', 'rich') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"


def test_translate_prints_the_target_rule_and_whether_it_is_exact(capsys):
    rc = main(["translate", "adamw", "--from", "torch", "--to", "flux", "--set",
               "couple_lr=False", "lr=1e-3", "weight_decay=1e-2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "adamw: torch -> flux" in out and "couple_lr=False" in out
    assert "weight_decay=1e-05" in out and "exact:       yes" in out and "explanation:" in out
    assert main(["translate", "adamw", "--to", "flux", "lr=1e-3", "weight_decay=1e-2"]) == 0
    out = capsys.readouterr().out  # Optimisers.jl's AdamW(couple=true) is torch's
    assert "couple_lr" not in out and "weight_decay=0.01" in out and "exact:       yes" in out


def test_translate_json_and_an_inexact_translation(capsys):
    assert main(["translate", "adagrad", "--to", "optax", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["exact"] is False and "eps = 0" in doc["conditions"]
    assert doc["rule"].startswith("uo.adagrad(convention='optax'") and doc["target"] == "optax"


@pytest.mark.parametrize(("argv", "named"), [
    (["translate", "adagrad", "--to", "tensorflow"], "'tensorflow'"),
    (["translate", "radam", "--to", "keras"], "'keras'"),
    (["translate", "adamz", "--to", "optax"], "'adamz'"),
    (["translate", "adagrad", "--to", "optax", "lr"], "'lr'"),
    (["translate", "adagrad", "--to", "optax", "lr=-1"], "lr"),
])
def test_translate_bad_input_is_a_usage_error(capsys, argv, named):
    assert main(argv) == 2
    assert named in capsys.readouterr().err


def test_conventions_writes_the_page(tmp_path, capsys):
    path = tmp_path / "conventions.md"
    assert main(["conventions", "--write", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == uo.conventions.page()
    assert main(["conventions"]) == 0
    assert capsys.readouterr().out == uo.conventions.page() + "\n"


# --- uniopt rules -------------------------------------------------------------------------------


def test_rules_prints_the_registry_table(capsys):
    from uniopt import registry

    assert main(["rules"]) == 0
    assert capsys.readouterr().out.strip() == registry.table()


def test_rules_json_lists_every_entry(capsys):
    from uniopt import registry

    assert main(["rules", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in doc] == registry.names()
    for d in doc:
        e = registry.entry(d["name"])
        assert d["slots"] == list(e.slots) and d["budget"] == e.budget
        assert d["needs_closure"] == e.needs_closure and d["references"] == list(e.references)


def test_rules_name_prints_the_entry_and_the_docstring(capsys):
    import inspect

    from uniopt import registry

    name = registry.names()[0]
    assert main(["rules", name]) == 0
    out = capsys.readouterr().out
    assert f"name:          {name}" in out
    assert inspect.getdoc(registry.entry(name).rule) in out
    assert main(["rules", name, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["name"] == name and doc["doc"] == inspect.getdoc(registry.entry(name).rule)


def test_rules_misspelled_suggests_the_closest_names(capsys):
    from uniopt import registry

    name = registry.names()[0]
    assert main(["rules", name[:-1] + "q"]) == 2
    err = capsys.readouterr().err
    assert f"no rule named {name[:-1] + 'q'!r}; did you mean" in err and repr(name) in err


# --- uniopt bench --rules: every elementwise rule of the registry ------------------------------


def test_bench_takes_every_elementwise_rule_and_skips_the_others():
    from uniopt import registry
    from uniopt.base import Elementwise
    from uniopt.tools import bench
    from uniopt.tools.cli import build_parser

    args = build_parser().parse_args(["bench", "--rules", "all"])
    assert args.rules == registry.names()
    w = bench._Workload([(6,), (2, 3)])
    for name in registry.names():
        parts = bench._rule(name).flat_parts
        if all(isinstance(p, Elementwise) for p in parts):
            assert bench.skip_reason(name) is None and name in bench.TRAFFIC
            assert bench.TRAFFIC[name] == 3 + 2 * sum(len(p.slots) for p in parts)
            step = bench.IMPLEMENTATIONS["uniopt"](w, name)
            assert step is not None
            step()
        else:
            why = bench.skip_reason(name)
            assert name not in bench.TRAFFIC and why is not None
            assert all(p.name in why for p in parts if not isinstance(p, Elementwise))


def test_bench_rejects_an_unknown_rule(capsys):
    assert main(["bench", "--rules", "adam,nosuchrule"]) == 2
    assert "unknown rule 'nosuchrule'" in capsys.readouterr().err
