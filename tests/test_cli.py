"""The built-in problems and the ``uniopt`` command: compare, schedule, bench, rules, translate,
conventions, and the plots (matplotlib) and progress bar (rich) of the optional extras."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from uniopt import conventions
from uniopt.tools.cli import DEFAULT_LR, RULES, main
from uniopt.tools.problems import DEFAULT_PROBLEMS, PROBLEMS, Logistic, Quadratic, Rosenbrock

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


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_hvp_matches_central_differences_of_the_gradient(name):
    import optree

    problem, h = PROBLEMS[name], 1e-5
    rng = np.random.default_rng(7)
    for params in _points(problem):
        v = optree.tree_map(lambda x: rng.standard_normal(np.shape(x)), params)
        hv = problem.hvp(params)(v)
        assert optree.tree_structure(hv) == optree.tree_structure(params)
        up, down = (problem.grad(optree.tree_map(lambda x, d, s=s: x + s * h * d, params, v))
                    for s in (1, -1))
        fd = optree.tree_map(lambda a, b: (a - b) / (2 * h), up, down)
        a, n = (np.concatenate([np.ravel(x) for x in optree.tree_leaves(t)]) for t in (hv, fd))
        assert np.linalg.norm(a - n) <= 1e-6 * np.linalg.norm(n)


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


def test_compare_defaults_cover_every_preset_and_default_problem(capsys):
    assert main(["compare", "--steps", "20"]) == 0
    assert _table_pairs(capsys.readouterr().out) == {
        (p, r) for p in DEFAULT_PROBLEMS for r in RULES
    }
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
        ("--rules", "adam,adamz", "adamz"),
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


def test_unknown_rule_suggests_the_closest_name(capsys):
    assert main(["compare", "--rules", "sgdd"]) == 2
    err = capsys.readouterr().err
    assert "unknown rule 'sgdd'; did you mean 'sgd'" in err and "uniopt rules" in err
    assert "Traceback" not in err


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
    assert _table_pairs(proc.stdout) == {(p, r) for p in DEFAULT_PROBLEMS for r in RULES}
    bad = subprocess.run(
        [sys.executable, "-m", "uniopt", "compare", "--rules", "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2 and "'nope'" in bad.stderr


def test_a_reader_that_stops_early_ends_the_command_quietly():
    """``uniopt rules | head -1``: the pipe is closed before the command writes; it exits with
    141 (128 + SIGPIPE, as a tool stopped by SIGPIPE does) and prints no traceback."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    argvs = [["rules"], ["rules", "adamw"], ["rules", "--json"], ["schedule", "cosine(-1, 100)"]]
    procs = [subprocess.Popen([sys.executable, "-m", "uniopt", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env) for argv in argvs]
    for proc in procs:
        proc.stdout.close()  # long before the command has imported uniopt
    for argv, proc in zip(argvs, procs, strict=True):
        _, err = proc.communicate(timeout=120)
        assert (proc.returncode, err.decode()) == (141, ""), argv


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
    (["translate", "adam", "--to", "optax", "lr=1e-3", "lr=2e-3"], "lr given twice"),
    (["translate", "adamw", "--to", "flux", "--set", "couple_lr=False", "--set",
      "couple_lr=True"], "--set couple_lr given twice"),
])
def test_translate_bad_input_is_a_usage_error(capsys, argv, named):
    assert main(argv) == 2
    assert named in capsys.readouterr().err


def test_translate_a_rule_of_one_form_and_a_rule_whose_default_is_not_torchs(capsys):
    """A rule without conventions (lamb) has nothing to translate: a usage error that says so
    (its printed translation raised KeyError 'convention', with --json too); lion's form,
    without --from, is uo.lion()'s, the paper's (--from defaulted to torch's, which lion has
    not)."""
    for extra in [[], ["--json"]]:
        assert main(["translate", "lamb", "--to", "torch", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("uniopt translate: lamb has one form, no conventions (uo.lamb(")
        assert "no 'torch' convention" in err and "Traceback" not in err
    assert main(["translate", "ftrl", "--from", "keras", "--to", "keras"]) == 2
    assert "ftrl has one form, no conventions" in capsys.readouterr().err
    assert main(["translate", "lion", "--to", "keras", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["source"] == "paper" and doc["exact"] is True
    assert doc["rule"] == "uo.lion(convention='keras', lr=0.0001)"


def test_translate_help_names_only_rules_with_conventions_and_the_default_source(capsys):
    """RULE's help listed all 58 rules, 36 of which (one form: lamb, ftrl, yogi, ...) translate
    always refuses; --from's default said "torch's where torch has the rule", not so for
    amsgrad and nadamw (uo.amsgrad().convention is optax's). docs/frameworks.md names the
    rules whose default is not torch's, as the code has them."""
    assert main(["translate", "-h"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    listed = out.split("RULE one of ", 1)[1].split(" (", 1)[0]
    assert listed.split(", ") == conventions.translatable()
    assert "lamb" not in listed and "ftrl" not in listed and "has nothing to translate" in out
    assert "uo.RULE().convention" in out and "torch's where torch" not in out
    assert main(["translate", "adamz", "--to", "optax"]) == 2
    err = capsys.readouterr().err
    assert "'adamz'" in err and "lamb" not in err
    not_torch = sorted(n for n, cls in conventions.rules().items() if conventions._table(cls)
                       and conventions._default(conventions._fields(cls)["convention"])
                       != "torch")
    page = " ".join((Path(__file__).parent.parent / "docs" / "frameworks.md").read_text()
                    .split())
    sentence = page.split("default convention's, `uo.<name>().convention`:", 1)[1]
    sentence = sentence.split("): a `source=`", 1)[0]
    assert sorted(re.findall(r"`(\w+)`", sentence)) == sorted([*not_torch, "paper"])


def test_translate_reads_schedules_as_compare_does(capsys):
    assert main(["translate", "adam", "lr=cosine(1e-3,100)", "--to", "optax", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rule"] == ("uo.adam(convention='optax', lr=uo.schedules.cosine(init=0.001, "
                           "steps=100, floor=0.0, exponent=1.0))") and doc["exact"] is True
    # Flux's uncoupled decay under an lr schedule: the decay becomes a schedule too
    assert main(["translate", "adamw", "--to", "flux", "--set", "couple_lr=False",
                 "lr=warmup(10, cosine(1e-3, 100))", "weight_decay=1e-2"]) == 0
    out = capsys.readouterr().out
    assert "weight_decay=uo.schedules.product(uo.schedules.warmup(" in out
    assert "exact:       yes" in out
    # a schedule the target cannot follow exactly says so, and why
    assert main(["translate", "sgd", "lr=cosine(1e-3, 100)", "momentum=0.9", "--to",
                 "keras"]) == 0
    out = capsys.readouterr().out
    assert "exact:       no" in out and "constant lr" in out and "lr schedule" in out
    assert main(["translate", "adam", "lr=cosin(1e-3, 100)", "--to", "optax"]) == 2
    err = capsys.readouterr().err
    assert "unknown schedule 'cosin'; did you mean 'cosine'" in err and "Traceback" not in err


def test_conventions_writes_the_page(tmp_path, capsys):
    path = tmp_path / "conventions.md"
    assert main(["conventions", "--write", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == uo.conventions.page()
    assert main(["conventions"]) == 0
    # (the page as written, not with print's newline after its own: a sweep compared the
    # printed page with docs/conventions.md)
    assert capsys.readouterr().out == uo.conventions.page()


def test_conventions_to_an_unwritable_path_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "no" / "conventions.md"
    assert main(["conventions", "--write", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"uniopt conventions: cannot write {path}: No such file or "
                            "directory\n")
    assert captured.out == "" and not path.exists()


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


# --- uniopt bench --rules: every rule of the registry that steps from gradients alone ----------


def test_bench_takes_every_rule_that_steps_from_gradients_alone():
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
        else:  # no floor; run unless it reads the loss
            why = bench.no_floor(name)
            assert name not in bench.TRAFFIC and why is not None
            assert all(p.name in why for p in parts if not isinstance(p, Elementwise))
    skipped = {n for n in registry.names() if bench.skip_reason(n) is not None}
    assert {"lbfgs", "sam", "polyak_sgd", "momo"} <= skipped
    assert not skipped & {"lamb", "lars", "adafactor", "muon", "novograd", "prodigy"}
    assert "loss" in bench.skip_reason("polyak_sgd")


def _bench_params(step):
    """The parameters a bench implementation's step updates, read from its closure (the
    bench's steps keep them as ``params``, ``p`` or a donated ``carry``)."""
    cells = dict(zip(step.__code__.co_freevars, (c.cell_contents for c in step.__closure__),
                     strict=True))
    if "carry" in cells:  # jitted: (params, state) for optax, (state, params) for uniopt
        got = cells["carry"][1 if cells.get("ready") == 1 else 0]
    else:
        got = cells.get("params", cells.get("p"))
    got = got if isinstance(got, list) else [got]
    return np.concatenate([np.asarray(x.detach() if hasattr(x, "detach") else x,
                                      np.float64).ravel() for x in got])


def _peer_rules():
    from uniopt.tools import bench

    return sorted(bench.PEER_SETTINGS)


@pytest.mark.parametrize("rule", _peer_rules())
def test_bench_peers_take_the_step_uniopt_takes(rule):
    """Every float32 row of a rule the bench has peers for times the same update: 3 steps of
    each implementation from the same params and gradients land where uniopt's do, within
    1e-3 of the step and the params' float32 rounding (the NumPy rows of adamw left out its
    decay, 3.4e-2 of the step apart; optax's RMSprop decayed by its default 0.9 with eps
    inside the root, 0.95 apart). 8-bit state is rounded by design and left out. torch's Muon
    orthogonalises in bfloat16, as uniopt.torch's does and NumPy cannot: its torch rows are
    held to uniopt.torch's, and that one to uniopt's within bfloat16's precision (1.8e-2 of
    the step apart here)."""
    from uniopt.tools import bench

    w = bench._Workload([(6, 7), (8, 5)])  # matrices: Muon's peer takes nothing else
    start = np.concatenate([p.ravel() for p in w.params]).astype(np.float64)
    moved = {}
    for impl, make in bench.IMPLEMENTATIONS.items():
        step = make(w, rule)
        if step is None or impl == "uniopt q8":
            continue
        for _ in range(3):
            step()
        moved[impl] = _bench_params(step) - start
    ref = moved.pop("uniopt")
    if len(moved) < 2:
        pytest.skip(f"no peer of {rule} installed beside uniopt's own rows")
    rounding = 4 * np.finfo(np.float32).eps * np.max(np.abs(start))
    for impl, d in moved.items():
        against, within = ref, 1e-3
        if rule == "muon" and impl.startswith("torch"):
            against = moved["uniopt.torch"]
        elif rule == "muon" and impl == "uniopt.torch":
            within = 3e-2
        assert np.max(np.abs(d - against)) <= within * np.max(np.abs(ref)) + rounding, (
            rule, impl)


def test_bench_float16_gradients_keep_adams_second_moment_finite():
    """float16 holds no (1 - b2) g^2 of a gradient near 1e-3: Adam's v stayed 0 (eps=1e-8 is 0
    in float16) and the rows timed steps of 36 and NaNs. Every v is positive now and every
    step finite and of about lr."""
    from uniopt.tools import bench

    w = bench._Workload([(300,), (8, 9)], dtype="float16")
    step = bench.IMPLEMENTATIONS["uniopt"](w, "adam")
    start = np.concatenate([p.ravel() for p in w.params]).astype(np.float64)
    for _ in range(5):
        step()
    cells = dict(zip(step.__code__.co_freevars, (c.cell_contents for c in step.__closure__),
                     strict=True))
    assert all((v > 0).all() for v in cells["state"][0].slots["scale_by_adam.exp_avg_sq"])
    moved = np.abs(_bench_params(step) - start)
    # 5 steps of about lr = 1e-3, and float16's rounding of params up to 4 (ulp 4e-3)
    assert np.isfinite(moved).all() and moved.max() < 0.02


def test_bench_runs_rules_with_per_leaf_parts_without_a_floor(monkeypatch, capsys):
    """LAMB, Adafactor and Muon run (no floor: their parts are not all elementwise); Muon
    where every tensor is a matrix, and skipped with its error where one is not."""
    from uniopt.fast import cpu
    from uniopt.tools import bench

    monkeypatch.setattr(bench, "bandwidth", lambda *a, **k: 1e10)
    monkeypatch.setattr(bench, "_QUIET_S", 0.0)
    monkeypatch.setattr(cpu, "COMPILE_AFTER", cpu.COMPILE_AFTER)  # bench.run sets it to 0
    monkeypatch.setattr(cpu, "AVAILABLE", False)  # the reference path: nothing to compile
    said: list[str] = []
    shapes = {"mats": [(4, 3), (3, 3)], "mixed": [(4, 3), (5,)]}
    bw, rows = bench.run(["mats", "mixed"], ["lamb", "adafactor", "muon", "polyak_sgd", "sgd"],
                         ["uniopt", "uniopt packed"], 1, shapes, said.append)
    got = {(r.workload, r.rule, r.implementation): r for r in rows}
    assert set(got) == {(w, r, i) for w in shapes for r in ("lamb", "adafactor", "sgd")
                        for i in ("uniopt", "uniopt packed") if i == "uniopt" or r == "sgd"
                        } | {("mats", "muon", "uniopt")}
    assert all((r.floor_ms is None) == (r.rule != "sgd") for r in rows)
    assert any(s.startswith("mixed muon uniopt: skipped (muon: params[1] has shape (5,)")
               for s in said), said
    assert any(s.startswith("mats polyak_sgd: skipped (") and "loss" in s for s in said), said
    # a per-leaf rule the packed form does not offer is said, as every other skip is
    assert ("mats lamb uniopt packed: skipped (uniopt packed has no lamb step for float32 "
            "arrays here)") in said, said
    text = bench.table(bw, rows)
    lamb = next(x for x in text.splitlines() if "mats |      lamb" in x)
    assert "x)" not in lamb and " - " in lamb
    assert json.loads(bench.to_json(bw, rows))["rows"][0]["ratio"] is None
    # matrices of one's own: COUNTxROWSxCOLS
    capsys.readouterr()
    assert main(["bench", "--sizes", "2x4x3", "--rules", "muon", "--implementations", "uniopt",
                 "--repeats", "1", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert (row["workload"], row["rule"], row["floor_ms"], row["ratio"]) == (
        "2x4x3", "muon", None, None)
    for bad, said in (("2x0x3", "must be positive"), ("2x3x4x5", "COUNTxROWSxCOLS")):
        assert main(["bench", "--sizes", bad]) == 2
        assert said in capsys.readouterr().err


def test_bench_rejects_an_unknown_rule(capsys):
    assert main(["bench", "--rules", "adam,nosuchrule"]) == 2
    assert "unknown rule 'nosuchrule'" in capsys.readouterr().err


# --- new problems: Beale, the MLP on two moons, a problem of your own ---------------------------


def test_beale_minimum_and_start():
    from uniopt.tools.problems import Beale

    p = Beale()
    assert p.loss(p.argmin) == 0.0 and np.all(p.grad(p.argmin)[0] == 0.0)
    # (1.5 - 1 + 1)^2 + (2.25 - 1 + 1)^2 + (2.625 - 1 + 1)^2 at the start (1, 1)
    assert p.loss(p.init(5)) == pytest.approx(1.5**2 + 2.25**2 + 2.625**2, rel=1e-15)


def test_two_moons_and_the_mlp_are_deterministic():
    from uniopt.tools.problems import MLP, two_moons

    x, y = two_moons(200, 0.1, 0)
    assert x.shape == (200, 2) and sorted(set(y)) == [-1.0, 1.0] and y.sum() == 0
    np.testing.assert_array_equal(x, two_moons(200, 0.1, 0)[0])
    assert not np.array_equal(x, two_moons(200, 0.1, 1)[0])
    p = MLP()
    a, b = p.init(3), p.init(3)
    assert all(np.array_equal(a[k], b[k]) for k in a) and p.optimum is None
    assert p.loss(a) == pytest.approx(math.log(2), rel=0.3)  # small outputs at the start
    with pytest.raises(ValueError, match=r"^mlp: need samples >= 2, hidden >= 1 and noise >= 0, "
                                         r"got samples=200, hidden=0, noise=0\.1$"):
        MLP(hidden=0)


def test_compare_mlp_reports_no_gap(capsys):
    (r,) = _compare_json(capsys, "--steps", "30", "--rules", "adam", "--problems", "mlp")[
        "results"
    ]
    assert r["optimum"] is None and r["gap"] is None and r["steps_to_tol"] is None
    assert r["final_loss"] < r["initial_loss"]
    assert main(["compare", "--steps", "5", "--rules", "adam", "--problems", "mlp"]) == 0
    assert "minimum unknown" in capsys.readouterr().out


_USER_MODULE = '''
import math

import numpy as np

def bowl(x):
    """A bowl centred on (1, -2)."""
    d = x - np.array([1.0, -2.0])
    return float(d @ d) + 3.0, 2.0 * d

bowl.x0 = [0.0, 0.0]
bowl.optimum = 3.0

def nostart(x):
    return float(x @ x), 2.0 * x

def floaty(x):
    return float(x @ x)

floaty.x0 = [1.0, 2.0]

def misshapen(x):
    return float(x @ x), np.ones(5)

misshapen.x0 = [1.0, 2.0]

def cliff(x):  # finite at the start only: a run diverges at its first update
    return (float(x @ x) if x[0] == 1.0 else float("nan")), 2.0 * x

cliff.x0 = [1.0, 2.0]

def late(x):  # keeps its contract at the start only
    return (float(x @ x), 2.0 * x) if x[0] == 1.0 else 1.0

late.x0 = [1.0, 2.0]

def raises(x):
    raise RuntimeError("no model here")

raises.x0 = [1.0, 2.0]

def bad_start(x):
    return float(x @ x), 2.0 * x

bad_start.x0 = "hello"

def int_grads(x):
    return float(x @ x), np.array([1, 2])

int_grads.x0 = [1.0, 2.0]

def nan_start(x):
    return float("nan"), 2.0 * x

nan_start.x0 = [1.0, 2.0]

def log_bowl(x):  # defined for x > 0 only: at x < 0, math.log raises above y = 0.55 and
    # np.log gives NaN (with a RuntimeWarning) below
    log = math.log if x[1] > 0.55 else np.log
    return float(x[0] - log(x[0]) + (x[1] - 2.0) ** 2), np.array([1 - 1 / x[0],
                                                                   2 * (x[1] - 2)])

log_bowl.x0 = [0.05, 0.5]

class Broken:
    name, description, optimum = "broken", "its grad raises", 0.0

    def init(self, seed):
        return np.zeros(2)

    def loss(self, x):
        return float(x @ x)

    def grad(self, x):
        raise KeyError("grad")

broken = Broken()
also_broken = Broken()

class Nameless:  # a problem object without name and description
    optimum = 0.0

    def init(self, seed):
        return np.zeros(2)

    def loss(self, x):
        return float(x @ x)

    def grad(self, x):
        return 2.0 * x

nameless = Nameless()
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"uniopt_user_problem_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(_USER_MODULE)
    monkeypatch.chdir(tmp_path)  # the command looks in the current directory first
    yield name
    sys.modules.pop(name, None)


def test_compare_runs_a_problem_of_your_own(capsys, user_module):
    doc = _compare_json(capsys, "--steps", "200", "--rules", "adam:lr=0.1,sgd:lr=0.1",
                        "--problems", f"{user_module}:bowl")
    assert [r["rule"] for r in doc["results"]] == ["adam:lr=0.1", "sgd:lr=0.1"]
    for r in doc["results"]:
        assert r["problem"] == f"{user_module}:bowl" and r["optimum"] == 3.0
        assert r["initial_loss"] == 8.0 and 0 <= r["gap"] < 1e-6
    assert main(["compare", "--steps", "5", "--problems", f"{user_module}:bowl"]) == 0
    assert "A bowl centred on (1, -2).; minimum 3" in capsys.readouterr().out


@pytest.mark.parametrize(("spec", "said"), [
    ("{m}:bowel", "did you mean 'bowl'"),
    ("{m}:nostart", "nostart.x0 = [...]"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    # (an AttributeError's traceback at the table, after the runs)
    ("{m}:nameless", "{m}:nameless: a problem object is used as it is, with name, description, "
                     "optimum (None where unknown), init(seed), loss(params) and grad(params); "
                     "it has no name, description"),
])
def test_a_bad_problem_of_your_own_is_a_usage_error(capsys, user_module, spec, said):
    assert main(["compare", "--problems", spec.format(m=user_module)]) == 2
    err = capsys.readouterr().err
    assert said.format(m=user_module) in err and "argument --problems" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("function", "said"), [
    ("floaty", "it returned float"),
    ("misshapen", "its grads have shapes [(5,)] where the params have [(2,)]"),
    ("late", "it returned float"),
])
def test_a_function_that_breaks_its_contract_is_a_usage_error(capsys, user_module, function,
                                                              said):
    spec = f"{user_module}:{function}"
    assert main(["compare", "--steps", "3", "--rules", "adam", "--problems", spec]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"uniopt compare: {spec} must return (loss, grads), the loss a number "
                            f"and grads a tree shaped like params; {said}\n")
    assert captured.out == ""


@pytest.mark.parametrize(("args", "said"), [
    (["--problems", "{m}:raises"], "{m}:raises raised RuntimeError: no model here"),
    (["--problems", "{m}:bad_start"], "{m}:bad_start: its start (x0) failed: ValueError"),
    (["--problems", "{m}:int_grads"], "adam on {m}:int_grads, update 1: "),
    (["--problems", "{m}:broken"], "broken raised KeyError: 'grad'"),
    (["--problems", "{m}:broken,{m}:also_broken"], "two problems are named 'broken'"),
    (["--problems", "beale", "--steps", "200", "--rules", "adam:lr=linear(0.1,-0.1,100)"],
     "adam:lr=linear(0.1,-0.1,100) on beale, update 52: adam: lr must be >= 0"),
])
def test_what_fails_at_a_step_is_a_usage_error_not_a_traceback(capsys, user_module, args, said):
    """A problem's function that raises, a start that is no array, gradients of another dtype,
    a schedule invalid at a later step: exit 2 and a line naming it (each was a traceback)."""
    args = [a.format(m=user_module) for a in args]
    rules = [] if "--rules" in args else ["--rules", "adam"]
    assert main(["compare", "--steps", "3", *rules, *args]) == 2
    captured = capsys.readouterr()
    assert said.format(m=user_module) in captured.err and "Traceback" not in captured.err


def test_json_holds_null_for_what_is_not_finite(capsys, user_module):
    """JSON has no NaN or Infinity (a strict reader refuses them): a NaN loss (compare raised
    ValueError), a schedule past float's range (schedule printed Infinity)."""
    def strict(text: str) -> dict:  # type: ignore[type-arg]
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"JSON with {c}"))

    assert main(["compare", "--steps", "3", "--rules", "adam", "--problems",
                 f"{user_module}:nan_start", "--json"]) == 0
    (row,) = strict(capsys.readouterr().out)["results"]
    assert row["initial_loss"] is None
    assert main(["schedule", "exponential(0.1, 1.5, 1)", "--steps", "0,100000", "--json"]) == 0
    assert [v["value"] for v in strict(capsys.readouterr().out)["values"]] == [0.1, None]


def test_the_same_problem_twice_runs_once(capsys, user_module):
    doc = _compare_json(capsys, "--steps", "3", "--rules", "adam",
                        "--problems", f"{user_module}:bowl,{user_module}:bowl,rosenbrock")
    assert [r["problem"] for r in doc["results"]] == [f"{user_module}:bowl", "rosenbrock"]


def test_problems_is_repeatable_as_rules_is(capsys, user_module):
    """A second --problems kept only itself: the first was dropped without a word."""
    doc = _compare_json(capsys, "--steps", "2", "--rules", "adam", "--problems", "quadratic",
                        "--problems", f"rosenbrock,quadratic,{user_module}:bowl", "--problems",
                        f"{user_module}:bowl")
    assert [r["problem"] for r in doc["results"]] == ["quadratic", "rosenbrock",
                                                      f"{user_module}:bowl"]
    assert main(["compare", "--problems", f"{user_module}:broken", "--problems",
                 f"{user_module}:also_broken"]) == 2
    assert "two problems are named 'broken'" in capsys.readouterr().err


@pytest.mark.parametrize(("seeds", "said"), [
    ("-1", "seeds are integers >= 0"), ("0,4-2", "'4-2'"), ("4-0", "'4-0'"),
    ("0-99999999999", "at most 10,000 seeds"),
])
def test_bad_seeds_are_usage_errors(capsys, seeds, said):
    assert main(["compare", "--seeds", seeds]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err


# --- rules with hyperparameters, registry rules, seeds ------------------------------------------


def test_rules_take_hyperparameters(capsys):
    doc = _compare_json(capsys, "--steps", "40", "--problems", "quadratic", "--rules",
                        "adamw:lr=3e-4,weight_decay=0.1,sgd",
                        "--rules", "adam:betas=(0.8,0.99),amsgrad=True")
    rows = doc["results"]
    assert [r["rule"] for r in rows] == [
        "adamw:lr=3e-4,weight_decay=0.1", "sgd", "adam:betas=(0.8,0.99),amsgrad=True"]
    assert rows[0]["hyperparameters"] == {"lr": 3e-4, "weight_decay": 0.1}
    assert rows[2]["hyperparameters"] == {"betas": [0.8, 0.99], "amsgrad": True}
    assert rows[0]["lr"] == 3e-4 and rows[1]["lr"] == DEFAULT_LR["quadratic"]["sgd"]
    p = PROBLEMS["quadratic"]
    for r, rule in zip(rows, [uo.adamw(lr=3e-4, weight_decay=0.1),
                              uo.sgd(lr=DEFAULT_LR["quadratic"]["sgd"], momentum=0.9),
                              uo.adam(lr=0.1, betas=(0.8, 0.99), amsgrad=True)], strict=True):
        params = p.init(0)
        state = uo.setup(rule, params)
        for _ in range(40):
            state, params = uo.update(state, params, p.grad(params))
        assert r["final_loss"] == p.loss(params)  # bit for bit


def test_a_schedule_as_a_hyperparameter(capsys):
    (r,) = _compare_json(capsys, "--steps", "20", "--problems", "rosenbrock", "--rules",
                         "adam:lr=warmup(5, cosine(0.1, 100))")["results"]
    assert r["lr"] == "warmup(5, cosine(0.1, 100))"
    assert r["hyperparameters"] == {"lr": "warmup(5, cosine(0.1, 100))"}


def test_any_registry_rule_runs_closures_and_step_arguments_included(capsys):
    doc = _compare_json(capsys, "--steps", "10", "--problems", "quadratic", "--rules",
                        "lion,lbfgs,polyak_sgd")
    assert [r["rule"] for r in doc["results"]] == ["lion", "lbfgs", "polyak_sgd"]
    for r in doc["results"]:
        assert r["diverged"] is False and r["final_loss"] < r["initial_loss"], r["rule"]
    assert doc["results"][0]["lr"] == "cosine(0.03, 1000)"  # lion's registry example


def test_a_rule_that_reads_hvp_runs_on_every_built_in_problem(capsys):
    doc = _compare_json(capsys, "--steps", "30", "--problems", "all", "--rules", "sophia_h")
    assert [r["problem"] for r in doc["results"]] == list(PROBLEMS)
    assert not any(r["diverged"] for r in doc["results"])
    p, e = PROBLEMS["quadratic"], uo.registry.entry("sophia_h")
    params = p.init(0)
    state = uo.setup(e.rule(**e.example), params)
    for _ in range(30):
        state, params = uo.update(state, params, p.grad(params), hvp=p.hvp(params))
    assert doc["results"][1]["final_loss"] == p.loss(params)  # bit for bit


def test_a_rule_whose_step_needs_what_the_problem_lacks_says_so(capsys, user_module):
    assert main(["compare", "--rules", "adam,sophia_h", "--problems", f"{user_module}:bowl"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"uniopt compare: sophia_h cannot run on {user_module}:bowl: its step "
                            "needs hvp= (the Hessian-vector product, v -> H v at the params), "
                            f"which {user_module}:bowl does not give\n")
    assert captured.out == ""


def test_us_per_update_leaves_out_one_off_costs(capsys, monkeypatch):
    """The first update (which loads the compiled loop) and a slow one later (a compile after
    COMPILE_AFTER updates) do not count in the time per update."""
    import time

    import uniopt.engine

    update_ = uniopt.engine.update_
    calls = []

    def slow_once(*args, **kwargs):
        calls.append(1)
        if len(calls) in (1, 5):
            time.sleep(0.3)
        return update_(*args, **kwargs)

    monkeypatch.setattr(uniopt.engine, "update_", slow_once)
    (r,) = _compare_json(capsys, "--steps", "9", "--rules", "adam", "--problems",
                         "quadratic")["results"]
    assert len(calls) == 9 and r["us_per_update"] < 0.1 * 0.3e6 / 9


def test_a_run_that_diverges_at_its_first_update_has_no_time_per_update(capsys, user_module):
    """us/update is the median of the updates after the first; a run that diverged at its
    first had none, and reported the first's time (the compiled loop's load included: 58 ms
    for Adam where a step takes some 20 us; a sweep's finding): null, and "-" in the table."""
    args = ["--steps", "20", "--rules", "adam:lr=0.1,sgd:lr=0.1", "--problems",
            f"{user_module}:cliff"]
    for r in _compare_json(capsys, *args)["results"]:
        assert r["diverged_at"] == 1 and r["us_per_update"] is None, r
    assert main(["compare", "--no-progress", *args]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines()
            if ln.startswith(f"{user_module}:cliff  ")]
    assert len(rows) == 2 and all(row.split()[-1] == "-" for row in rows), rows
    # (a run of one update that did not diverge reports that update: the review's finding)
    (one,) = _compare_json(capsys, "--steps", "1", "--rules", "adam", "--problems",
                           "quadratic")["results"]
    assert one["diverged_at"] is None and one["us_per_update"] > 0


def test_a_rule_that_cannot_take_the_problem_says_so_before_running(capsys):
    assert main(["compare", "--rules", "adam,muon", "--problems", "rosenbrock"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("uniopt compare: muon cannot run on rosenbrock: ")
    assert "not a matrix" in captured.err and captured.out == ""


@pytest.mark.parametrize(("rules", "said"), [
    ("adamw:weight_decy=0.1", "unknown hyperparameter of adamw 'weight_decy'; did you mean "
                              "'weight_decay'"),
    ("lr=0.1,adam", "comes before any rule"),
    ("adam:lr", "expected KEY=VALUE"),
    ("adam:lr=1,lr=2", "lr given twice"),
    ("adam:lr=cosin(1,2)", "unknown schedule 'cosin'; did you mean 'cosine'"),
    ("adam:lr=__import__('os')", "unknown schedule '__import__'"),
])
def test_bad_rule_specs_are_usage_errors(capsys, rules, said):
    assert main(["compare", "--rules", rules]) == 2
    captured = capsys.readouterr()
    assert said in captured.err and "argument --rules" in captured.err
    assert captured.out == "" and "Traceback" not in captured.err


def test_a_bad_hyperparameter_value_is_an_error_naming_it(capsys):
    assert main(["compare", "--rules", "adamw:lr=-1", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("uniopt compare: adamw:lr=-1: ") and "lr" in err and "-1" in err


def test_seeds_give_a_row_each(capsys):
    doc = _compare_json(capsys, "--steps", "5", "--rules", "adam", "--problems", "quadratic",
                        "--seeds", "0-2")
    assert doc["settings"]["seeds"] == [0, 1, 2]
    assert [r["seed"] for r in doc["results"]] == [0, 1, 2]
    assert len({r["initial_loss"] for r in doc["results"]}) == 3
    assert main(["compare", "--steps", "5", "--rules", "adam", "--problems", "quadratic",
                 "--seed", "4,7"]) == 0
    out = capsys.readouterr().out
    assert "from seeds 4,7" in out and " seed " in out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("quadratic ")]
    assert [row[2] for row in rows] == ["4", "7"]
    assert main(["compare", "--seeds", "a-b"]) == 2
    assert "seeds are integers" in capsys.readouterr().err


def test_problems_all(capsys):
    doc = _compare_json(capsys, "--steps", "2", "--rules", "sgd", "--problems", "all")
    assert [r["problem"] for r in doc["results"]] == list(PROBLEMS)


# --- the progress bar ---------------------------------------------------------------------------


def test_progress_bar_shows_after_its_delay_and_only_with_rich(monkeypatch):
    import io

    Console = pytest.importorskip("rich.console").Console

    from uniopt.tools.cli import Progress

    out = io.StringIO()
    bar = Progress(100, enabled=True, delay=0.0,
                   console=Console(file=out, force_terminal=True, width=80))
    bar.describe("quadratic adam")
    bar.advance(50)
    assert bar.bar is not None
    bar.advance(50)
    bar.close()
    assert "quadratic adam" in out.getvalue() and bar.bar is None
    quick = Progress(100, enabled=True, delay=60.0, console=Console(file=io.StringIO()))
    quick.advance(100)
    assert quick.bar is None  # under a second: no bar
    monkeypatch.setitem(sys.modules, "rich.progress", None)  # rich not installed
    plain = Progress(100, enabled=True, delay=0.0)
    plain.advance(100)
    plain.close()
    assert plain.bar is None


def test_compare_shows_the_bar_on_a_terminal(capsys, monkeypatch):
    pytest.importorskip("rich")
    from uniopt.tools import cli

    monkeypatch.setattr(cli, "PROGRESS_DELAY_S", 0.0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["compare", "--steps", "200", "--rules", "adam", "--problems", "quadratic"]) == 0
    captured = capsys.readouterr()
    assert "quadratic adam" in captured.err and "quadratic adam" not in captured.out
    assert main(["compare", "--steps", "200", "--rules", "adam", "--problems", "quadratic",
                 "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_the_bar_is_stopped_when_a_run_fails():
    """A schedule invalid at a later update, after the bar had shown: the bar was left running,
    redrawn after the error, the terminal's cursor hidden."""
    import io

    Console = pytest.importorskip("rich.console").Console
    from uniopt.tools import cli
    from uniopt.tools.parse import UsageError

    out = io.StringIO()
    bar = cli.Progress(200, enabled=True, delay=0.0,
                       console=Console(file=out, force_terminal=True, width=80))
    with pytest.raises(UsageError, match="on beale, update 52"):
        cli.compare(uo.tools.parse.rules(["sgd,adam:lr=linear(0.1,-0.1,100)"]), ["beale"], 100,
                    [0], 1e-6, progress=bar)  # (sgd's 100 updates show the bar)
    assert bar.bar is None and "\x1b[?25h" in out.getvalue()  # stopped, the cursor shown


def test_compare_ticks_every_update(monkeypatch):
    from uniopt.tools import cli

    seen = []

    class Count(cli.Progress):
        def advance(self, n):
            seen.append(n)

    cli.compare(["adam", "sgd"], ["quadratic"], 250, [0, 1], 1e-6,
                progress=Count(0, enabled=False))
    assert sum(seen) == 2 * 2 * 250


# --- plots (matplotlib) -------------------------------------------------------------------------


def _png_pixels(path, size):
    from matplotlib import image

    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = image.imread(str(path))
    assert img.shape[:2] == (size[1], size[0])
    assert img[..., :3].std() > 0.05  # not blank
    return img


def _gid_lines(ax, gid):
    return [ln for ln in ax.get_lines() if ln.get_gid() == gid]


def test_compare_plot_draws_every_curve_and_2d_path(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from uniopt.tools import cli, plots

    rules = ["adam", "sgd:lr=2e-3"]
    results = cli.compare([uo.tools.parse.rules([r])[0] for r in rules],
                          ["rosenbrock", "quadratic"], 60, [0, 1], 1e-6, track=True)
    fig = plots.compare_figure(results, PROBLEMS)
    loss_r, path_r, loss_q = fig.axes
    for ax in (loss_r, loss_q):
        curves = _gid_lines(ax, "curve")
        assert len(curves) == 4 and all(len(c.get_xdata()) == 61 for c in curves)
        assert ax.get_yscale() == "log"
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["adam", "sgd:lr=2e-3"]
    paths = _gid_lines(path_r, "path")
    assert len(paths) == 4 and len(path_r.collections) > 0  # over the contours
    x, y = paths[0].get_data()
    assert (x[0], y[0]) == (-1.2, 1.0) and len(x) == 61
    png = tmp_path / "cmp.png"
    assert main(["compare", "--steps", "60", "--rules", ",".join(rules), "--problems",
                 "rosenbrock,quadratic", "--seeds", "0,1", "--plot", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().err
    w, h = fig.get_size_inches() * 100
    _png_pixels(png, (round(w), round(h)))


def test_a_1d_problem_has_no_path_panel_and_a_diverged_curve_stops():
    pytest.importorskip("matplotlib")
    from uniopt.tools import cli, plots

    # heavy ball at lr * lambda_max = 5: the loss grows ~8x a step, to inf within 400
    results = cli.compare(["sgd"], ["quadratic"], 400, [0], 1e-6, lr=5e-3, track=True)
    assert results[0].diverged_at is not None
    fig = plots.compare_figure(results, PROBLEMS)
    (ax,) = fig.axes
    (curve,) = _gid_lines(ax, "curve")
    assert len(curve.get_xdata()) == results[0].diverged_at + 1
    y = curve.get_ydata()
    k = int(np.argmax(np.isnan(y))) - 1  # drawn up to a thousand times the start, then cut
    assert k > 0 and np.all(np.isnan(y[k + 1:])) and y[k] <= 1e3 * y[0] + 1
    (cross,) = _gid_lines(ax, "diverged")
    assert list(cross.get_xdata()) == [k]


def test_a_curve_that_leaves_the_range_and_comes_back_is_drawn_and_not_marked():
    """RMSprop at lr=30 on Beale leaps to 7e14 at its first update and then settles below its
    start: its curve was blanked from there on, a lone cross at update 0 saying it diverged."""
    pytest.importorskip("matplotlib")
    from uniopt.tools import cli, plots

    results = cli.compare(uo.tools.parse.rules(["rmsprop:lr=30"]), ["beale"], 5, [0], 1e-6,
                          track=True)
    (r,) = results
    assert r.diverged_at is None and r.losses[1] > 1e12 and r.losses[-1] < r.losses[0]
    ax = plots.compare_figure(results, PROBLEMS).axes[0]
    (curve,) = _gid_lines(ax, "curve")
    y = curve.get_ydata()
    assert np.isnan(y[1]) and np.all(np.isfinite(np.delete(y, 1)))  # only the leap left out
    assert _gid_lines(ax, "diverged") == []


def test_the_contours_leave_out_where_a_problem_of_your_own_is_undefined(user_module):
    """The window of a run from x = 0.05 reaches x < 0, where the loss is undefined: math.log
    raised there, after every run (a traceback, the table lost); np.log gave NaN and a
    RuntimeWarning, and made every contour level NaN (an empty panel)."""
    import warnings

    pytest.importorskip("matplotlib")
    from uniopt.tools import cli, plots, problems

    spec = f"{user_module}:log_bowl"
    problem = problems.load(spec)
    results = cli.compare(["adam"], [problem], 3, [0], 1e-6, track=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ax = plots.compare_figure(results, {spec: problem}).axes[1]
    assert [str(w.message) for w in caught] == []
    assert ax.get_xlim()[0] < 0 and ax.get_ylim()[1] > 0.55  # (both holes are in the window)
    filled = [c for c in ax.collections if hasattr(c, "levels")]
    assert len(filled) == 2  # contourf, contour
    for c in filled:  # (levels, and lines between them: not an empty panel)
        assert len(c.levels) > 5 and np.all(np.isfinite(c.levels))
        assert sum(len(p.vertices) for p in c.get_paths()) > 100


def test_plot_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "x.png"
    for argv in (["compare", "--plot", str(png)], ["schedule", "cosine(1, 10)", "--plot",
                                                   str(png)],
                 ["bench", "--sizes", "1x10", "--plot", str(png)]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert "pip install 'uniopt[plot]'" in captured.err and "Traceback" not in captured.err
        assert captured.out == "" and not png.exists()


def test_plot_to_an_unwritable_path_is_a_usage_error_before_the_runs(tmp_path, capsys,
                                                                     monkeypatch):
    """Each command said so only after all its runs (compare's nine rules, a bench)."""
    pytest.importorskip("matplotlib")
    from uniopt.tools import bench

    def no_runs(*a: Any, **k: Any) -> Any:
        raise AssertionError("ran before the plot's path was checked")

    monkeypatch.setattr(bench, "run", no_runs)
    monkeypatch.setattr("uniopt.tools.cli.compare", no_runs)
    bad = str(tmp_path / "no" / "x.png")
    for argv in (["schedule", "cosine(1, 10)"], ["compare", "--steps", "5"],
                 ["bench", "--sizes", "1x10"]):
        assert main([*argv, "--plot", bad]) == 2
        err = capsys.readouterr().err
        assert f"cannot write {bad}: there is no directory {tmp_path / 'no'}" in err, err


# --- uniopt schedule ----------------------------------------------------------------------------


def test_schedule_prints_values_at_the_even_steps_and_the_knots(capsys):
    s = uo.schedules.warmup(1000, uo.schedules.cosine(3e-4, 100_000))
    assert main(["schedule", "warmup(1000, cosine(3e-4, 100_000))"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == repr(s)
    rows = [ln.split() for ln in lines[2:]]
    steps = [int(k.replace(",", "")) for k, _ in rows]
    assert steps == [0, 1000, *range(10_100, 101_001, 10_100)]
    assert [float(v) for _, v in rows] == pytest.approx([s(k) for k in steps], rel=1e-5)


def test_schedule_json_steps_and_until(capsys):
    assert main(["schedule", "uo.wsd(peak=1e-3, warmup=10, stable=80, decay=10)", "--json",
                 "--steps", "0,5,10,95,100,200"]) == 0
    doc = json.loads(capsys.readouterr().out)
    s = uo.schedules.wsd(peak=1e-3, warmup=10, stable=80, decay=10)
    assert doc["schedule"] == repr(s) and doc["until"] == 100
    assert [(v["step"], v["value"]) for v in doc["values"]] == [
        (k, s(k)) for k in (0, 5, 10, 95, 100, 200)]
    assert main(["schedule", "0.1", "--json", "--until", "50"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schedule"] == "constant(value=0.1)" and doc["values"][-1]["step"] == 50


def test_schedule_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from uniopt.tools import plots

    png = tmp_path / "lr.png"
    assert main(["schedule", "sgdr(0.1, 100, mult=2)", "--plot", str(png), "--log"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("sgdr(")
    fig = plots.schedule_figure(np.arange(11), [1.0] * 5 + [0.5] * 6, [0, 10], [1.0, 0.5], "t")
    (curve,) = _gid_lines(fig.axes[0], "curve")
    assert list(curve.get_ydata()) == [1.0] * 5 + [0.5] * 6
    _png_pixels(png, (750, 400))
    # --log on a warm-up from 0: a log axis without the zeros (it was drawn linear, unsaid);
    # with nothing positive, a usage error
    fig = plots.schedule_figure(np.arange(3), [0.0, 0.5, 1.0], [0], [0.0], "t", log=True)
    assert fig.axes[0].get_yscale() == "log"
    assert main(["schedule", "constant(0.0)", "--plot", str(png), "--log"]) == 2
    assert "no positive value to draw on a log axis" in capsys.readouterr().err
    # the format the extension names (a .pdf held PNG bytes), else PNG
    for name, head in (("lr.pdf", b"%PDF-"), ("lr.svg", b"<?xml"), ("lr.plot", b"\x89PNG")):
        assert main(["schedule", "cosine(0.1, 100)", "--plot", str(tmp_path / name)]) == 0
        assert (tmp_path / name).read_bytes().startswith(head), name


@pytest.mark.parametrize(("text", "said"), [
    ("cosin(3e-4, 100)", "unknown schedule 'cosin'; did you mean 'cosine'"),
    ("cosine(3e-4, 100, flor=0.1)", "unknown argument of cosine 'flor'; did you mean 'floor'"),
    ("cosine(3e-4)", "cosine(init, steps, floor, exponent)"),
    ("cosine(3e-4, 1e5)", "cosine: steps must be"),
    ("__import__('os').system('true')", "is not a schedule"),
    ("os.system('true')", "is not a schedule"),
    ("cosine(3e-4, 2**20)", "is not a number"),
    ("cosine(x, 100)", "unknown name 'x'"),
    ("cosine(3e-4, *a)", "no * arguments"),
    ("'abc'", "is not a schedule"),
    ("cosine(3e-4,", "is not an expression"),
])
def test_bad_schedule_expressions_are_usage_errors(capsys, text, said):
    assert main(["schedule", text]) == 2
    captured = capsys.readouterr()
    assert said in captured.err and captured.out == "" and "Traceback" not in captured.err


def test_schedule_bad_steps(capsys):
    assert main(["schedule", "cosine(1, 10)", "--steps", "1,x"]) == 2
    assert "steps are integers" in capsys.readouterr().err
    assert main(["schedule", "cosine(1, 10)", "--steps", "-1"]) == 2


def test_a_join_without_boundaries_is_drawn(capsys):
    assert main(["schedule", "join([0.001], [])"]) == 0
    assert "0.001" in capsys.readouterr().out


def test_horizon_covers_each_schedule():
    from uniopt import schedules as S
    from uniopt.tools.cli import horizon

    assert horizon(S.warmup(100, S.cosine(1.0, 900))) == (1000, [100, 1000])
    assert horizon(S.join([S.linear(0.0, 1.0, 10), S.cosine(1.0, 90)], [10])) == (100, [10, 100])
    # one schedule and no boundary (the last schedule starts at 0, not at its own knot)
    assert horizon(S.join([S.cosine(1.0, 100)], [])) == (100, [100])
    assert horizon(S.join([S.constant(1e-3)], [])) == (0, [])
    assert horizon(S.join([S.linear(0.0, 1.0, 10), S.warmup(5, S.cosine(1.0, 20))], [30])) == (
        55, [10, 30, 35, 55])
    assert horizon(S.wsd(1.0, 10, 80, 10)) == (100, [10, 90, 100])
    assert horizon(S.sgdr(1.0, 10, mult=2)) == (70, [10, 30, 70])
    assert horizon(S.cyclic(0.1, 1.0, 5)) == (20, [5, 10, 15, 20])
    assert horizon(S.onecycle(1.0, 100))[0] == 99
    assert horizon(S.exponential(1.0, 0.5, 10))[0] == 66  # down to 1%
    assert horizon(S.constant(1.0)) == (0, [])
    assert horizon(S.inverse_sqrt(1.0, 10.0))[0] == 1000
    assert horizon(S.product(S.cosine(1.0, 50), 2.0))[0] == 50
    assert horizon(S.bias_correction(0.9))[0] == 50
    assert horizon(lambda k: 1.0) == (1000, [])


def test_parse_helpers():
    from uniopt.tools import parse

    assert parse.split_top("a:b=(1,2),c=[3,4],d='x,y',e") == ["a:b=(1,2)", "c=[3,4]", "d='x,y'",
                                                              "e"]
    assert parse.value("-1e-3") == -1e-3 and parse.value("None") is None
    assert parse.value("1-sqrt") == "1-sqrt" and parse.value("{10: 0.1}") == {10: 0.1}
    assert parse.value("uniopt.schedules.constant(2)") == uo.schedules.constant(2)
    assert parse.short(uo.schedules.cosine(0.1, 10, floor=0.01)) == "cosine(0.1, 10, floor=0.01)"
    assert parse.short(uo.schedules.join([0.1, uo.schedules.constant(1.0)], [5])) == \
        "join((constant(0.1), constant(1.0)), (5,))"
    assert parse.short(parse.schedule("product(cosine(1, 10), 0.5)")) == \
        "product(cosine(1, 10), 0.5)"


# --- uniopt bench: --sizes, --plot --------------------------------------------------------------


def test_bench_sizes_run_only_the_sizes_asked_for(capsys, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    from uniopt.fast import cpu
    from uniopt.tools import bench

    monkeypatch.setattr(bench, "bandwidth", lambda *a, **k: 1e10)  # the 268 MB pass: not here
    monkeypatch.setattr(bench, "_QUIET_S", 0.0)
    monkeypatch.setattr(cpu, "COMPILE_AFTER", cpu.COMPILE_AFTER)  # bench.run sets it to 0
    png = tmp_path / "bench.png"
    # the NumPy baselines: no kernel to compile, so this stays quick
    impls = "numpy per tensor,numpy flat"
    assert main(["bench", "--sizes", "3x100,2x50", "--implementations", impls,
                 "--repeats", "1", "--json", "--plot", str(png)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(r["workload"], r["implementation"]) for r in doc["rows"]] == [
        (w, i) for w in ("3x100", "2x50") for i in impls.split(",")]
    _png_pixels(png, (800, 240))
    assert main(["bench", "--sizes", "3x100", "--workloads", "S1", "--implementations",
                 "numpy flat", "--repeats", "1", "--json"]) == 0
    assert [r["workload"] for r in json.loads(capsys.readouterr().out)["rows"]] == ["S1", "3x100"]
    assert main(["bench", "--sizes", "3y100"]) == 2
    assert "COUNTxSIZE" in capsys.readouterr().err


def test_bench_with_every_row_skipped_says_so_and_fails(capsys, monkeypatch):
    """Every implementation skipped (a library not installed, a dtype it has no step for): exit
    2 with a line that says nothing was measured, not an empty table and exit 0."""
    from uniopt.fast import cpu
    from uniopt.tools import bench

    monkeypatch.setattr(bench, "bandwidth", lambda *a, **k: 1e10)
    monkeypatch.setattr(bench, "_QUIET_S", 0.0)
    monkeypatch.setattr(cpu, "COMPILE_AFTER", cpu.COMPILE_AFTER)
    monkeypatch.setitem(bench.IMPLEMENTATIONS, "numpy flat", lambda w, rule: None)
    assert main(["bench", "--sizes", "3x100", "--implementations", "numpy flat",
                 "--repeats", "1"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "nothing was measured" in out.err


def test_bench_on_a_device_runs_the_torch_rows_there(capsys, monkeypatch):
    """``--device``: the torch rows on that device, each step synchronised, against a copy's
    bandwidth there; the other rows left out, saying so. ``cpu:0`` is not the default "cpu",
    so it takes that path on this CPU-only machine. A device torch cannot use is refused
    before anything runs."""
    torch = pytest.importorskip("torch")
    from uniopt.fast import cpu
    from uniopt.tools import bench

    monkeypatch.setattr(bench, "_QUIET_S", 0.0)
    monkeypatch.setattr(cpu, "COMPILE_AFTER", cpu.COMPILE_AFTER)  # bench.run sets it to 0
    monkeypatch.setattr(bench, "bandwidth", lambda *a, **k: pytest.fail("the CPU's pass ran"))
    seen = []
    real = bench.synchronizer
    monkeypatch.setattr(bench, "synchronizer", lambda d: seen.append(d) or real(d))
    impls = "numpy flat,torch for-loop,uniopt.torch,uniopt.torch foreach"
    assert main(["bench", "--device", "cpu:0", "--sizes", "3x100", "--implementations", impls,
                 "--rules", "sgd", "--repeats", "1"]) == 0
    out, err = capsys.readouterr()
    assert "numpy flat: left out (not torch tensors on cpu:0)" in err
    assert "(a copy on cpu:0)" in out and "numpy flat" not in out
    for impl in impls.split(",")[1:]:
        assert impl in out
    assert seen == ["cpu:0"] * 4  # the bandwidth's copy, then each row's steps
    for device, why in (("meta", "nothing to time"), ("nonsense", "device type"),
                        ("cuda", "no such device")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        assert main(["bench", "--device", device, "--workloads", "S1"]) == 2
        last = capsys.readouterr().err.splitlines()[-1]
        assert last.startswith(f"uniopt bench: --device {device}: ") and why in last, last


def test_bench_plot_with_no_floor_to_draw_says_so_before_the_runs(tmp_path, capsys,
                                                                  monkeypatch):
    """Only rules without a floor (LAMB's per-tensor trust ratio): an empty figure was written
    and reported as written."""
    pytest.importorskip("matplotlib")
    from uniopt.tools import bench

    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("ran"))
    png = tmp_path / "b.png"
    assert main(["bench", "--sizes", "1x10", "--rules", "lamb", "--plot", str(png)]) == 2
    err = capsys.readouterr().err
    assert ("uniopt bench: --plot: nothing to plot: none of lamb has a memory-bandwidth floor"
            in err) and not png.exists()


def test_bench_follows_the_order_asked_and_takes_workloads_in_any_case(capsys, monkeypatch):
    """The columns followed the rows (an implementation skipped at the first workload came
    last); `--workloads s1` was an unknown workload."""
    from uniopt.tools import bench, plots

    rows = [bench.Row("S1", "adam", "numpy flat", 2.0, 1.0, 0.0),
            bench.Row("W1", "adam", "uniopt", 1.0, 1.0, 0.0),
            bench.Row("W1", "adam", "numpy flat", 2.0, 1.0, 0.0)]
    asked = []
    monkeypatch.setattr(bench, "run", lambda w, *a, **k: asked.append(w) or (1e10, rows))
    assert main(["bench", "--workloads", "s1,w1", "--implementations", "uniopt,numpy flat"]) == 0
    head = capsys.readouterr().out.splitlines()[1]
    assert asked == [["S1", "W1"]]
    assert [c.strip() for c in head.split("|")][3:] == ["uniopt", "numpy flat"], head
    if importlib.util.find_spec("matplotlib") is not None:
        ax = plots.bench_figure(1e10, rows, ["uniopt", "numpy flat"]).axes[0]
        assert ax.get_legend_handles_labels()[1] == ["uniopt", "numpy flat"]


def test_bench_figure_has_a_bar_per_row():
    pytest.importorskip("matplotlib")
    from uniopt.tools import bench, plots

    rows = [bench.Row(w, "adam", impl, ms, 1.0, 0.0)
            for w, ms0 in (("S1", 3.0), ("W1", 1.2))
            for impl, ms in (("uniopt", ms0), ("torch fused", 2 * ms0))]
    fig = plots.bench_figure(2e10, rows)
    (ax,) = fig.axes
    widths = sorted(p.get_width() for p in ax.patches)
    assert widths == sorted(r.ratio for r in rows)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["S1 adam", "W1 adam"]


# --- packaging: --version, help everywhere, py.typed, extras ------------------------------------


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"uniopt {uo.__version__}"


def test_every_option_has_help():
    import argparse

    from uniopt.tools.cli import build_parser

    def walk(parser, where):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{where} {name}")
            elif not isinstance(action, argparse._HelpAction):
                yield where, action

    missing = [(w, a.dest) for w, a in walk(build_parser(), "uniopt") if not a.help]
    assert missing == []


def test_py_typed_and_the_extras():
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11)

    root = SRC.parent
    assert (SRC / "uniopt" / "py.typed").exists()
    project = tomllib.loads((root / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    assert extras["plot"] == ["matplotlib>=3.7"] and extras["cli"] == ["rich>=13"]
    assert {"matplotlib>=3.7", "rich>=13"} <= set(extras["test"])
    assert not any(d.startswith(("matplotlib", "rich")) for d in project["project"]["dependencies"])
    # hatchling puts every file under the package folder in the wheel, py.typed included
    assert project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["src/uniopt"]


def test_bench_gives_a_rule_that_does_not_trace_no_jit_row(monkeypatch):
    """NAdam's products of momenta are the host's: its ``uniopt + jit`` row is left out (it
    raised, losing every row measured before it), the other rows run."""
    pytest.importorskip("jax")
    from uniopt.fast import cpu
    from uniopt.tools import bench

    monkeypatch.setattr(bench, "bandwidth", lambda *a, **k: 1e10)
    monkeypatch.setattr(bench, "_QUIET_S", 0.0)
    monkeypatch.setattr(cpu, "COMPILE_AFTER", cpu.COMPILE_AFTER)
    monkeypatch.setattr(cpu, "AVAILABLE", False)
    _, rows = bench.run(["s"], ["nadam", "adam"], ["uniopt", "uniopt + jit"], 1,
                        {"s": [(4,), (3,)]}, lambda s: None)
    got = {(r.rule, r.implementation) for r in rows}
    assert got == {("nadam", "uniopt"), ("adam", "uniopt"), ("adam", "uniopt + jit")}
    assert "0.00 " not in bench.table(1e10, rows)  # a floor of microseconds shows its digits


def test_compares_amsgrad_is_torchs_adam_amsgrad_and_the_registrys_torch_form():
    """compare's preset takes adam's hyperparameters (weight_decay) and steps as the registry's
    uo.amsgrad in torch's form, which rules, bench and translate name amsgrad."""
    from uniopt.tools.cli import RULES

    preset, registry = RULES["amsgrad"](0.1), uo.amsgrad(lr=0.1, convention="torch")
    p, q = [np.ones(4)], [np.ones(4)]
    s, t = uo.setup(preset, p), uo.setup(registry, q)
    rng = np.random.default_rng(0)
    for _ in range(30):
        g = [rng.normal(size=4)]
        uo.update_(s, p, g)
        uo.update_(t, q, g)
    np.testing.assert_array_equal(p[0], q[0])
    assert main(["compare", "--rules", "amsgrad:weight_decay=0.01", "--steps", "5",
                 "--problems", "quadratic"]) == 0


def test_bench_skips_8_bit_state_for_a_rule_that_has_none(capsys: Any) -> None:
    """`uniopt bench --rules all` stopped at its first rule, acprop, with a traceback: its
    "uniopt q8" row raised setup's refusal of 8-bit state, and an elementwise rule's errors
    are re-raised."""
    assert main(["bench", "--sizes", "1x64", "--rules", "acprop,ftrl,adam", "--implementations",
                 "uniopt,uniopt q8", "--repeats", "1", "--json"]) == 0
    rows = {(r["rule"], r["implementation"]) for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows == {("acprop", "uniopt"), ("ftrl", "uniopt"), ("adam", "uniopt"),
                    ("adam", "uniopt q8")}


def test_bench_says_a_library_is_not_installed(monkeypatch: Any, capsys: Any) -> None:
    """Without torch, every torch row was skipped as 'torch fused has no sgd step for float32
    arrays here'."""
    from uniopt.tools import bench

    find = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else find(name, *a))
    monkeypatch.setitem(sys.modules, "torch", None)  # (import torch raises ImportError)
    assert main(["bench", "--sizes", "1x64", "--rules", "sgd", "--implementations",
                 "uniopt,torch fused", "--repeats", "1"]) == 0
    err = capsys.readouterr().err
    assert "1x64 sgd torch fused: skipped (torch is not installed)" in err, err


def test_compare_lr_leaves_a_rule_without_one_as_it_is(capsys: Any) -> None:
    """`--lr` is one learning rate for every run whose rule has one: SAM and Polyak's step
    take theirs from elsewhere, and `--rules adam,sam --lr 0.01` failed as a whole with
    "sam.__init__() got an unexpected keyword argument 'lr'"."""
    assert main(["compare", "--rules", "adam,sam,polyak_sgd", "--lr", "0.01", "--problems",
                 "quadratic", "--steps", "5", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    lrs = {r["rule"]: r["lr"] for r in runs["results"]}
    assert lrs == {"adam": 0.01, "sam": None, "polyak_sgd": None}, lrs


def test_translate_usage_errors_are_translates(capsys: Any) -> None:
    """A bad KEY=VALUE after the options had uniopt's usage and "uniopt: error"."""
    assert main(["translate", "adamw", "--to", "optax", "lr"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: uniopt translate ")
    assert err.endswith("uniopt translate: error: argument KEY=VALUE: expected KEY=VALUE, got "
                        "'lr'\n")


def test_an_unknown_command_names_the_closest(capsys: Any) -> None:
    assert main(["comapre", "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "uniopt: error: unknown command 'comapre'; did you mean 'compare'?" in err


def test_translate_errors_say_translate_once(capsys: Any) -> None:
    assert main(["translate", "adamw", "--to", "optax", "--set", "nosuch=1"]) == 2
    assert capsys.readouterr().err.strip() == "uniopt translate: adamw has no option 'nosuch'"
