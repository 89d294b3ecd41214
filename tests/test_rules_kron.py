"""Kron (``uo.kron``) against ``pytorch_optimizer.Kron``, float64.

Randomness is matched, not approximated. The probes: pytorch-optimizer draws them from torch's
global generator (``torch.randn_like``, leaf after leaf, on updating steps), ours from a torch
generator in the state seeded with ``seed``: ``torch.manual_seed(seed)`` before its first step
makes them the same. NumPy and JAX draw from their own generators, so their runs are fed the
probes torch's generator draws for that seed (the draw function patched in this test). The
balancing draws: pytorch-optimizer calls ``np.random.random()`` once a step; here its module's
``np`` is given a stand-in whose ``random.random`` is NumPy's PCG64 seeded with ``seed``, the
stream ours draws from.

Two of pytorch-optimizer's choices are set aside to compare float64 arithmetic: it keeps the
factors in ``precondition_dtype`` (float32 by default: given float64 here) and solves the
triangular systems in float32 whatever the dtype (its ``solve_triangular_right``, patched here
to solve in the dtype it is given; ours solves in the leaf's dtype).

100 steps at 1e-12, every step (200 and 300 pass too). A caution for other problems: the
trajectory can be sensitive to the last bit. With a constant gradient noise (the params settle
where the gradient vanishes), pytorch-optimizer against itself, its initial params changed by 1e-15
relative, drifted to 7e-13 by step 175, 2e-8 by 200 and 6e-3 by 250 (the step size of the
factors' update is normalised by a lower bound of a spectral norm that picks the largest row of
a symmetric matrix, a choice rounding can flip); here, with fresh noise every step, it stays
within 2e-14 over 300 steps.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from helpers import counting_jit, rel_diff
from uniopt.rules import sophia_h as draws

torch = pytest.importorskip("torch")
po = pytest.importorskip("pytorch_optimizer")
psgd = pytest.importorskip("pytorch_optimizer.optimizer.psgd")

SHAPES = [(5, 3), (4,), (), (2, 3, 2)]
STEPS = 100  # the preconditioner is refit at most every step: 100 fits at probability 1
RNG = np.random.default_rng(0)
INIT = [RNG.standard_normal(s) for s in SHAPES]
NOISE = [[0.3 * RNG.standard_normal(s) for s in SHAPES] for _ in range(STEPS)]


def _grads(p: list[np.ndarray], t: int) -> list[np.ndarray]:
    return [0.5 * np.tanh(a) + n for a, n in zip(p, NOISE[t], strict=True)]


def _solve_in_its_dtype(x: Any, a: Any) -> Any:
    flat = x.reshape(-1, x.size(-1))
    return torch.linalg.solve_triangular(a, flat, upper=True, left=False).reshape_as(x)


def _theirs(monkeypatch: pytest.MonkeyPatch, kw: dict[str, Any], seed: int,
            lr_factor: Any = None, steps: int = STEPS, cls: Any = None,
            groups: Any = None) -> list[list[np.ndarray]]:
    """pytorch-optimizer's Kron (or the class ``cls`` given its arguments) over ``steps``
    steps, from a generator seeded with ``seed``; ``groups`` makes its param groups of the
    parameters."""
    balance = np.random.Generator(np.random.PCG64(seed))
    monkeypatch.setattr(psgd, "solve_triangular_right", _solve_in_its_dtype)
    monkeypatch.setattr(psgd, "np", types.SimpleNamespace(
        random=types.SimpleNamespace(random=balance.random), argsort=np.argsort))
    ps = [torch.nn.Parameter(torch.tensor(a)) for a in INIT]
    opt = (cls or po.Kron)(ps if groups is None else groups(ps),
                           precondition_dtype=torch.float64, **kw)
    sched = None if lr_factor is None else torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    torch.manual_seed(seed)
    out = []
    for t in range(steps):
        for p, g in zip(ps, _grads([p.detach().numpy() for p in ps], t), strict=True):
            p.grad = torch.tensor(g)
        opt.step()
        if sched is not None:
            sched.step()
        out.append([p.detach().numpy().copy() for p in ps])
    return out


def _ours(rule: uo.Transform, conv: Any) -> list[list[np.ndarray]]:
    p = [conv(a.copy()) for a in INIT]
    state = uo.setup(rule, p)
    out = []
    for t in range(STEPS):
        g = _grads([np.asarray(x) for x in p], t)
        state, p = uo.update(state, p, [conv(x) for x in g])
        out.append([np.asarray(x).copy() for x in p])
    return out


def _worst(a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> float:
    return max(rel_diff(x, y) for s, t in zip(a, b, strict=True)
               for x, y in zip(s, t, strict=True))


def _f(t: int) -> float:
    return 1.0 / (1.0 + 0.02 * t)


# (pytorch-optimizer's arguments, ours where they differ)
CASES = [
    ({"lr": 0.01, "balance_prob": 0.3}, {}),
    ({"lr": 0.02, "momentum": 0.8, "weight_decay": 0.1, "memory_save_mode": "one_diag",
      "pre_conditioner_update_probability": 0.25, "balance_prob": 0.5},
     {"preconditioner_update_probability": 0.25}),
    ({"lr": 0.01, "weight_decay": 0.05, "weight_decouple": False, "min_ndim_triangular": 3,
      "momentum_into_precondition_update": False, "max_size_triangular": 4,
      "pre_conditioner_update_probability": psgd.precondition_update_prob_schedule(
          min_prob=0.1, decay=0.05, flat_start=20)},
     {"preconditioner_update_probability": uo.psgd_update_probability(
         min_prob=0.1, decay=0.05, flat_start=20)}),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(CASES)))
def test_torch_tensors_match_pytorch_optimizer(monkeypatch: pytest.MonkeyPatch,
                                               case: int) -> None:
    """Our rule on torch tensors, the same probes and balancing draws: every step's params
    within 1e-12 (the first case with a scheduled lr: a torch LambdaLR on theirs, the
    schedule as our lr)."""
    theirs_kw, ours_kw = CASES[case]
    seed = 3 + case
    scheduled = case == 0
    theirs = _theirs(monkeypatch, theirs_kw, seed, _f if scheduled else None)
    kw = {k: v for k, v in theirs_kw.items() if k != "pre_conditioner_update_probability"}
    if scheduled:
        kw["lr"] = lambda t, lr=kw["lr"]: lr * _f(t)
    ours = _ours(uo.kron(**{**kw, **ours_kw}, seed=seed), torch.tensor)
    assert _worst(theirs, ours) <= 1e-12
    assert np.abs(theirs[-1][0] - INIT[0]).max() > 0.05  # the run goes somewhere


@pytest.mark.slow
def test_numpy_and_jax_with_the_same_probes_match(monkeypatch: pytest.MonkeyPatch,
                                                  jx: Any) -> None:
    """NumPy (LAPACK's triangular solve), fed torch's probes for the seed: 1e-12 of
    pytorch-optimizer over every step; JAX (eager; jax.scipy's solve) likewise over 5."""
    import jax.numpy as jnp

    kw = {"lr": 0.01, "balance_prob": 0.3}
    theirs = _theirs(monkeypatch, kw, seed=1)
    # theirs draws torch.randn_like of each leaf, in order, at every step (probability 1 for
    # the first 500 steps) from torch's generator seeded with 1: these
    gen = torch.Generator().manual_seed(1)
    log = [torch.randn(s, generator=gen, dtype=torch.float64).numpy()
           for _ in range(STEPS) for s in SHAPES]

    for kind, conv, steps in (("numpy", np.asarray, STEPS), ("jax", jnp.asarray, 5)):
        probes = iter(log)
        monkeypatch.setitem(draws._DRAW, kind,
                            lambda s, leaves, d, c=conv, it=probes: ([c(next(it))], s))
        p = [conv(a.copy()) for a in INIT]
        state = uo.setup(uo.kron(**kw, seed=1), p)
        for t in range(steps):
            state, p = uo.update(state, p, [conv(g) for g in _grads(
                [np.asarray(x) for x in p], t)])
            assert max(rel_diff(np.asarray(a), b) for a, b in zip(p, theirs[t],
                                                                  strict=True)) <= 1e-12, kind


def test_numpy_without_scipy_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """SciPy is no dependency of the core: without it, NumPy's triangular solves substitute a
    column at a time, and the run is pytorch-optimizer's to 1e-12 over every step, as with
    LAPACK's (it raised ModuleNotFoundError)."""
    kw = {"lr": 0.01, "balance_prob": 0.3}
    theirs = _theirs(monkeypatch, kw, seed=1)
    gen = torch.Generator().manual_seed(1)
    probes = iter([torch.randn(s, generator=gen, dtype=torch.float64).numpy()
                   for _ in range(STEPS) for s in SHAPES])
    monkeypatch.setitem(draws._DRAW, "numpy", lambda s, leaves, d: ([next(probes)], s))
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy... raises ImportError
    monkeypatch.setitem(sys.modules, "scipy.linalg", None)
    p = [a.copy() for a in INIT]
    state = uo.setup(uo.kron(**kw, seed=1), p)
    for t in range(STEPS):
        state, p = uo.update(state, p, _grads(p, t))
        assert max(rel_diff(a, b) for a, b in zip(p, theirs[t], strict=True)) <= 1e-12, t


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_the_substitution_solves_as_lapack_does(monkeypatch: pytest.MonkeyPatch,
                                                dtype: Any) -> None:
    from uniopt.rules import kron

    rng = np.random.default_rng(0)
    q = (np.triu(rng.standard_normal((7, 7))) + 4 * np.eye(7)).astype(dtype)
    x = rng.standard_normal((5, 7)).astype(dtype)
    exact = x.astype(np.float64) @ np.linalg.inv(q.astype(np.float64))
    with_lapack = kron._right_solve(np, x, q)
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.linalg", None)
    substituted = kron._right_solve(np, x, q)
    assert substituted.dtype == with_lapack.dtype == dtype
    tol = {np.float16: 1e-3, np.float32: 1e-6, np.float64: 1e-15}[dtype]
    assert rel_diff(with_lapack, exact) <= tol and rel_diff(substituted, exact) <= tol


@pytest.mark.parametrize("mode", [None, "one_diag", "smart_one_diag", "all_diag"])
def test_diagonal_factors_are_pytorch_optimizers(mode: str | None) -> None:
    for shape in [(5, 3), (4,), (3, 3), (1, 6), (2, 9, 4), (9000, 2)]:
        for size, ndim in [(8192, 2), (4, 2), (8192, 3)]:
            qs, _ = psgd.initialize_q_expressions(torch.zeros(shape), 1.0, size, ndim, mode)
            part = uo.scale_by_kron(max_size_triangular=size, min_ndim_triangular=ndim,
                                    memory_save_mode=mode)
            assert part.diagonal(shape) == [q.dim() < 2 for q in qs], (shape, size, ndim)


def test_update_probability_schedule() -> None:
    s = uo.psgd_update_probability()
    assert s(0) == s(500) == 1.0
    assert s(1000) == pytest.approx(np.exp(-0.5))
    assert s(10**6) == 0.03
    theirs = psgd.precondition_update_prob_schedule()
    for t in (0, 600, 2000, 5000):  # theirs in float32
        assert s(t) == pytest.approx(float(theirs(t)), rel=1e-6)


def test_the_counter_updates_every_1_over_p_steps() -> None:
    calls = []
    numpy_draw = draws._DRAW["numpy"]

    def count(state: Any, leaves: list[Any], dist: str) -> tuple[list[Any], Any]:
        calls.append(1)
        return numpy_draw(state, leaves, dist)

    draws._DRAW["numpy"] = count
    try:
        p = [np.ones((2, 2))]
        state = uo.setup(uo.kron(preconditioner_update_probability=0.25), p)
        for _ in range(12):
            state, p = uo.update(state, p, [np.ones((2, 2))])
    finally:
        draws._DRAW["numpy"] = numpy_draw
    assert len(calls) == 3


@pytest.mark.parametrize(("field", "value", "words"), [
    ("max_size_triangular", 0, "max_size_triangular must be an integer >= 1"),
    ("min_ndim_triangular", -1, "min_ndim_triangular must be an integer >= 0"),
    ("min_ndim_triangular", -1, "min_ndim_triangular must be an integer >= 0"),
    ("memory_save_mode", "some_diag", "memory_save_mode must be one of"),
    ("balance_prob", 1.5, r"balance_prob must be a number in \[0, 1\]"),
    ("precond_init_scale", 0.0, "precond_init_scale must be a number > 0"),
    ("seed", -1, "seed must be an integer in"),
    ("preconditioner_update_probability", 1.5,
     r"preconditioner_update_probability must be in \[0, 1\], got 1\.5$"),
    ("momentum", 1.0, r"momentum must be in \[0, 1\), got 1\.0$"),
    ("precond_lr", -0.1, r"precond_lr must be >= 0, got -0\.1$"),
])
def test_bad_hyperparameters_raise(field: str, value: Any, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        uo.kron(**{field: value})
    with pytest.raises(ValueError, match=words):
        uo.scale_by_kron(**{field: value})


def test_a_checkpoint_resumes_the_same_run(tmp_path: Any) -> None:
    """The factors, the counter and both generators are saved: a loaded state continues the
    run to the last bit (the default probability schedule is a record uniopt saves)."""
    rule = uo.kron(lr=0.01, balance_prob=0.5, preconditioner_update_probability=0.5)
    p = [np.ones((3, 2)), np.ones(4)]
    state = uo.setup(rule, p)
    for _ in range(3):
        state, p = uo.update(state, p, [np.sin(x) for x in p])
    uo.save(tmp_path / "kron", state)
    loaded = uo.load(tmp_path / "kron", state)
    q = [x.copy() for x in p]
    for _ in range(5):
        state, p = uo.update(state, p, [np.sin(x) for x in p])
        loaded, q = uo.update(loaded, q, [np.sin(x) for x in q])
    assert all(np.array_equal(a, b) for a, b in zip(p, q, strict=True))
    uo.save(tmp_path / "default", uo.setup(uo.kron(), p))  # the schedule record saves


def test_jit_compiles_once_and_is_eager_jax_and_numpy(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture,
                                                      jx: Any) -> None:
    """Under ``jax.jit`` the update decision (a counter in the state against a scheduled
    probability), the balancing draws and the probes (JAX keys in the state) run in the
    program, under ``lax.cond``: 20 steps trace once and compile once (JAX's log of its
    compilations: a state array committed to a device where the params are not compiled
    the step again without tracing it). The jitted steps are eager JAX's over
    the first 5 (within 1e-15, measured 9e-17; eager JAX dispatches op by op, so few steps)
    and NumPy's, its probes and balancing draws taken from the same JAX keys (the draw
    functions patched), over all 20 within 1e-14 (measured 2.2e-16 at step 20). With this
    seed and schedule (the probability falls from 1 at step 3 to 0.3 at 16), steps 1, 2 and
    16 (from 0) balance, 4, 6, 8, 10, 11, 13-15 and 17-19 do not fit the preconditioner."""
    jnp = jx.numpy
    from uniopt.rules import kron as kron_module

    steps = 20
    rule = uo.kron(lr=0.02, balance_prob=0.5, preconditioner_update_probability=(
        uo.psgd_update_probability(min_prob=0.3, decay=0.1, flat_start=3)), seed=2)
    jitted, traces = counting_jit()
    p = [jnp.asarray(a) for a in INIT]
    state, ours = uo.setup(rule, p), []
    with caplog.at_level(logging.WARNING), jx.log_compiles(True):
        for t in range(steps):
            state, p = jitted(state, p, [jnp.asarray(g) for g in _grads(
                [np.asarray(x) for x in p], t)])
            ours.append([np.asarray(x) for x in p])
    compiles = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(step)")]
    assert len(traces) == 1 and len(compiles) == 1, "the jitted update recompiled"

    p = [jnp.asarray(a) for a in INIT]
    state = uo.setup(rule, p)
    for t in range(5):
        state, p = uo.update(state, p, [jnp.asarray(g) for g in _grads(
            [np.asarray(x) for x in p], t)])
        assert max(rel_diff(np.asarray(a), b) for a, b in zip(p, ours[t], strict=True)) <= 1e-15

    # NumPy drawing what JAX draws: its generators' states are stood in for by JAX keys
    held = uo.setup(rule, [jnp.zeros(1)]).tree_states["scale_by_kron"]
    keys = {"probes": held["generator"], "balance": held["balance_generator"]}
    jax_draw, jax_balance = draws._DRAW["jax"], kron_module._balance_draw

    def draw(s: Any, leaves: list[Any], dist: str) -> tuple[list[Any], Any]:
        z, keys["probes"] = jax_draw(keys["probes"], [jnp.asarray(x) for x in leaves], dist)
        return [np.asarray(x) for x in z], s

    def balance_draw(kind: str, s: Any) -> tuple[Any, Any]:
        r, keys["balance"] = jax_balance("jax", keys["balance"])
        return float(r), s

    monkeypatch.setitem(draws._DRAW, "numpy", draw)
    monkeypatch.setattr(kron_module, "_balance_draw", balance_draw)
    p = [a.copy() for a in INIT]
    state = uo.setup(rule, p)
    for t in range(steps):
        state, p = uo.update(state, p, _grads(p, t))
        assert max(rel_diff(a, b) for a, b in zip(p, ours[t], strict=True)) <= 1e-14, t


def test_float32_stays_float32_under_jit_with_x64(jx: Any) -> None:
    """With x64 on, a scheduled coefficient is traced as float64: float32 params, momentum and
    factors stay float32 through both branches of the fit (traced only: ``eval_shape``)."""
    jnp = jx.numpy
    rule = uo.kron(lr=lambda t: 0.01 / (1 + t), momentum=uo.schedules.constant(0.9),
                   precond_lr=uo.schedules.linear(0.1, 0.01, 10), weight_decay=0.1,
                   weight_decouple=False)
    p = [jnp.ones(s, dtype=jnp.float32) for s in SHAPES]
    state, out = jx.eval_shape(uo.update, uo.setup(rule, p), p, p)
    assert {x.dtype for x in out} == {np.dtype(np.float32)}
    floats = [x.dtype for x in jx.tree_util.tree_leaves(state.tree_states)  # m, 7 factors
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert len(floats) == 4 + 7 and set(floats) == {np.dtype(np.float32)}


# --- uniopt.torch.Kron --------------------------------------------------------------------------


def test_torch_class_matches_pytorch_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """``uniopt.torch.Kron`` given pytorch-optimizer's arguments, 10 steps in float64 (the
    rule's 100 are above), within 1e-12 of it at every step: one group with a LambdaLR, its
    probes from its own generator (seeded as torch's global one is for theirs); two groups
    of different ``lr``, ``weight_decay`` and ``weight_decouple``, its probes drawn from
    torch's global generator in order (as theirs: each group of ours has its own generator)."""
    from uniopt.torch import Kron

    kw = {"lr": 0.01, "balance_prob": 0.5, "pre_conditioner_update_probability": 0.5}
    theirs = _theirs(monkeypatch, kw, 5, _f, 10)
    assert _worst(theirs, _theirs(monkeypatch, {**kw, "seed": 5}, 5, _f, 10, Kron)) <= 1e-12

    def groups(ps: list[Any]) -> list[dict[str, Any]]:
        return [{"params": ps[:2], "lr": 0.02, "weight_decay": 0.1},
                {"params": ps[2:], "weight_decay": 0.05, "weight_decouple": False}]

    theirs = _theirs(monkeypatch, kw, 6, steps=10, groups=groups)
    monkeypatch.setitem(draws._DRAW, "torch", lambda s, leaves, d: (
        [torch.randn_like(x) for x in leaves], s))
    ours = _theirs(monkeypatch, kw, 6, steps=10, cls=Kron, groups=groups)
    assert _worst(theirs, ours) <= 1e-12
    assert np.abs(theirs[-1][3] - INIT[3]).max() > 0.05  # the second group moves


def _kron_steps(opt: Any, ps: list[Any], steps: int) -> None:
    for _ in range(steps):
        for p in ps:
            p.grad = torch.sin(p.detach()) + 0.1
        opt.step()


def test_torch_class_state_dict_resumes_the_same_run() -> None:
    """``state_dict`` through ``torch.save`` / ``torch.load(weights_only=True)``: factors,
    momentum, counter and both generators (the balancing one's 64-bit words exactly) come
    back, and the loaded optimizer continues bit for bit, in two groups."""
    import io

    from uniopt.torch import Kron

    def make() -> tuple[Any, list[Any]]:
        ps = [torch.nn.Parameter(torch.tensor(a)) for a in INIT]
        return Kron([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02}], lr=0.01,
                    balance_prob=0.5, pre_conditioner_update_probability=0.5, seed=3), ps

    opt, ps = make()
    _kron_steps(opt, ps, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded, qs = make()
    with torch.no_grad():
        for q, p in zip(qs, ps, strict=True):
            q.copy_(p)
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    _kron_steps(opt, ps, 4)
    _kron_steps(loaded, qs, 4)
    assert all(torch.equal(p, q) for p, q in zip(ps, qs, strict=True))
    assert set(opt.state_dict()["param_groups"][1]) >= {
        "pre_conditioner_update_probability", "precondition_lr", "balance_prob", "seed"}


def test_torch_class_errors() -> None:
    """A dtype other than the parameter's for the momentum or the factors, a bad value, a
    parameter without a gradient: each names itself, and nothing is written."""
    from uniopt.torch import Kron

    w = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"precondition_dtype=torch.float32: .*float64"):
        Kron([w], precondition_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"^uniopt\.torch\.Kron: mu_dtype=torch\.bfloat16: uniopt "
                                         r"keeps the momentum and the factors in the parameter's "
                                         r"dtype \(torch\.float64\); pass None$"):
        Kron([w], mu_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="memory_save_mode must be one of"):
        Kron([w], memory_save_mode="some_diag")
    opt = Kron([w], precondition_dtype=torch.float64)  # the parameter's own: taken
    with pytest.raises(ValueError, match=r"^uniopt\.torch\.Kron: precondition_dtype=torch\."
                                         r"float64: .*in the parameter's dtype "
                                         r"\(torch\.float32\); pass None$"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))]})
    assert len(opt.param_groups) == 1
    v = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt.add_param_group({"params": [v], "lr": 0.1})
    w.grad = torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"parameter\(s\) \[0\] of param group 1 have no"):
        opt.step()
    assert torch.equal(w, torch.ones(2, 2, dtype=torch.float64)) and not opt.state


def test_a_state_set_up_for_other_arrays_is_refused(jx: Any) -> None:
    """A state whose generators are NumPy's, stepped with JAX arrays: an error naming both,
    not draws from the wrong generator."""
    jnp = jx.numpy
    np_state = uo.setup(uo.kron(), [np.ones((2, 2))])
    with pytest.raises(TypeError, match="holds a numpy generator, the updates are jax arrays"):
        uo.update(np_state, [jnp.ones((2, 2))], [jnp.ones((2, 2))])
    assert int(np_state.tree_states["scale_by_kron"]["update_counter"]) == 0


def test_an_empty_leaf_steps_under_jit() -> None:
    """A ``(3, 0)`` leaf beside a matrix: its empty axis's diagonal factor has no maximum to
    scale by (``jax.jit`` refused to trace the step), and ``reshape(..., -1)`` of an empty
    leaf is ambiguous there."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    params = {"w": jnp.ones((3, 4)), "z": jnp.ones((3, 0))}
    grads = {"w": jnp.full((3, 4), 0.5), "z": jnp.ones((3, 0))}
    state = uo.setup(uo.kron(lr=0.01), params)
    step = jax.jit(uo.update)
    for _ in range(2):
        state, params = step(state, params, grads)
    assert params["z"].shape == (3, 0)
    assert bool(jnp.isfinite(params["w"]).all())


def test_a_state_for_other_shapes_is_refused_naming_the_leaf() -> None:
    """Kron's state is a whole-tree part's: set up for other params, a step failed in a
    broadcast that named no leaf ('operands could not be broadcast'; torch's size error, a
    RuntimeError; JAX's 'add got incompatible shapes')."""
    state = uo.setup(uo.kron(lr=0.1), [np.ones((3, 2)), np.ones(4)])
    for params, why in (([np.ones((2, 3)), np.ones(4)], r"momentum_buffer for leaf 0 has shape "
                                                        r"\(3, 2\), where a param of shape "
                                                        r"\(2, 3\)"),
                        ([np.ones((3, 2)), np.ones(5)], r"leaf 1 has shape \(4,\)")):
        before = [p.copy() for p in params]
        with pytest.raises(ValueError, match=why + ".*this state was set up for other params"):
            uo.update_(state, params, [np.full(p.shape, 0.1) for p in params])
        assert all(np.array_equal(a, b) for a, b in zip(params, before, strict=True))
