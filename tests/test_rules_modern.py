"""ADOPT, AdEMAMix, simplified AdEMAMix, MADGRAD and SAM against their peers.

optax (``optax.contrib``) runs under ``jax.jit`` in float64 (x64); pytorch-optimizer on float64
tensors; ours on NumPy (the reference path). Each side runs free for 300 steps, its gradients
computed at its own parameters (a bounded loss plus shared noise), so a wrong step anywhere
shows in every later one; tolerance 1e-12 relative (float64 rounding in different operation
orders) unless a reason is written beside another.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from helpers import jitted_optax_step, rel_diff

SHAPES = {"w": (5, 3), "b": (4,), "s": ()}
STEPS = 300


def _params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def _grads(params: dict[str, Any], noise: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.tanh(np.asarray(v)) * 0.5 + noise[k] for k, v in params.items()}


def _vs_optax(ours: uo.Transform, theirs: Any, seed: int, steps: int = STEPS,
              float_count: bool = False) -> float:
    """Largest relative difference of the params over every step and leaf. ``float_count``:
    optax's step counts as float64 (see :func:`_float_counts`)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    params = _params(rng)
    state = uo.setup(ours, params)
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    jstate = theirs.init(jparams)
    if float_count:
        jstate = _float_counts(jstate)
    step = jitted_optax_step(theirs)
    worst = 0.0
    for _ in range(steps):
        noise = {k: 0.1 * rng.standard_normal(s) for k, s in SHAPES.items()}
        jgrads = {k: jnp.asarray(v) for k, v in _grads(jparams, noise).items()}
        state, params = uo.update(state, params, _grads(params, noise))
        jparams, jstate = step(jparams, jstate, jgrads)
        worst = max(worst, *(rel_diff(params[k], jparams[k]) for k in params))
    return worst


def _float_counts(state: Any) -> Any:
    """An optax state with every ``count`` a float64 number: optax keeps it as int32, and JAX
    computes ``sqrt(int32)`` and ``python_float * int32_array`` in float32 even under x64, so
    a number optax derives from it (MADGRAD's ``lamb``) is rounded to float32."""
    import jax.numpy as jnp

    if hasattr(state, "_fields"):
        return type(state)(*(jnp.asarray(v, jnp.float64) if f == "count" else _float_counts(v)
                             for f, v in zip(state._fields, state, strict=True)))
    if isinstance(state, tuple):
        return tuple(_float_counts(v) for v in state)
    return state


def _f64(schedule: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """An optax schedule called with its int32 count as float64: otherwise JAX computes it in
    float32 (see :func:`_float_counts`)."""
    import jax.numpy as jnp

    return lambda count: schedule(jnp.asarray(count, jnp.float64))


def _vs_torch(ours: uo.Transform, make: Callable[[list[Any]], Any], seed: int,
              steps: int = STEPS) -> float:
    """As :func:`_vs_optax` against a torch optimizer ``make(tensors)`` on float64 tensors."""
    import torch

    rng = np.random.default_rng(seed)
    params = _params(rng)
    state = uo.setup(ours, params)
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in params.items()}
    opt = make(list(tensors.values()))
    worst = 0.0
    for _ in range(steps):
        noise = {k: 0.1 * rng.standard_normal(s) for k, s in SHAPES.items()}
        theirs = _grads({k: t.numpy() for k, t in tensors.items()}, noise)
        for k, t in tensors.items():
            t.grad = torch.tensor(theirs[k], dtype=torch.float64)
        opt.step()
        state, params = uo.update(state, params, _grads(params, noise))
        worst = max(worst, *(rel_diff(params[k], tensors[k].numpy()) for k in params))
    return worst


@pytest.fixture
def optax_x64() -> Any:
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    with jax.enable_x64(True):
        yield optax


@pytest.fixture
def pto() -> Any:
    pytest.importorskip("torch")
    return pytest.importorskip("pytorch_optimizer")


def _cosine(lr: float) -> tuple[Any, Any]:
    """A cosine decay of ``lr`` over the run, ours and optax's."""
    import optax

    return (uo.schedules.cosine(lr, steps=STEPS, floor=lr / 20),
            _f64(optax.cosine_decay_schedule(lr, STEPS, alpha=1 / 20)))


# --- ADOPT ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_adopt_matches_optax(optax_x64: Any) -> None:
    rng = np.random.default_rng(10)
    hp = dict(b1=float(rng.uniform(0.5, 0.95)), b2=float(rng.uniform(0.9, 0.9999)),
              eps=float(10 ** rng.uniform(-8, -4)))
    lr = float(rng.uniform(1e-3, 5e-2))
    for clipping, nesterov in ((True, False), (False, True)):
        ours = uo.adopt(lr, use_clipping=clipping, nesterov=nesterov, **hp)
        theirs = optax_x64.contrib.adopt(lr, use_clipping=clipping, nesterov=nesterov, **hp)
        assert _vs_optax(ours, theirs, seed=0) < 1e-12
    # a scheduled lr and another bound: optax's clip_value_fn is our clip schedule
    ours_lr, their_lr = _cosine(lr)
    ours = uo.adopt(ours_lr, clip=uo.step_power(0.5), nesterov=True, **hp)
    theirs = optax_x64.contrib.adopt(their_lr, clip_value_fn=lambda c: c**0.5, nesterov=True,
                                     **hp)
    assert _vs_optax(ours, theirs, seed=1) < 1e-12


def test_adopt_first_step_only_fills_v() -> None:
    p = {"x": np.array([1.0, -2.0])}
    state, q = uo.update(uo.setup(uo.adopt(0.1), p), p, {"x": np.array([3.0, 0.0])})
    assert np.array_equal(q["x"], p["x"])
    assert np.array_equal(state.slots["scale_by_adopt.exp_avg_sq"][0], [9.0, 0.0])
    # then u/max(sqrt(v), eps) = (2, 0), clipped at 1**0.25: the first move is lr*(1-b1)
    state, q = uo.update(state, q, {"x": np.array([6.0, 0.0])})
    np.testing.assert_allclose(q["x"], [1.0 - 0.1 * 0.1 * 1.0, -2.0], rtol=0, atol=1e-15)


@pytest.mark.slow
@pytest.mark.parametrize("decay_form", ["l2", "decoupled"])
def test_adopt_torch_convention_matches_pytorch_optimizer(pto: Any, decay_form: str) -> None:
    # pytorch-optimizer clips at step**0.25 with its step counted from 1, the filling step
    # included: one step later than optax, which the "torch" convention reproduces
    hp = dict(b1=0.8, b2=0.99, eps=1e-6)
    ours = uo.adopt(0.02, weight_decay=0.03, decay_form=decay_form, convention="torch", **hp)
    assert _vs_torch(ours, lambda ps: pto.ADOPT(
        ps, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.03,
        weight_decouple=decay_form == "decoupled", foreach=False), seed=3) < 1e-12


def test_adopt_conventions_differ_only_in_the_bound() -> None:
    assert uo.adopt(convention="torch").clip == uo.step_power(0.25, offset=1)
    assert uo.adopt(convention="torch", clip=2.0).clip == 2.0
    assert uo.adopt().clip == uo.step_power(0.25)


# --- AdEMAMix -------------------------------------------------------------------------------------


def _their_alpha(alpha: float, steps: int) -> Callable[[Any], Any]:
    """The authors' optax ``alpha_scheduler(alpha, 0, steps)``, written out here."""
    import jax.numpy as jnp

    def schedule(count: Any) -> Any:
        warm = (count < steps).astype(jnp.float64)
        a = count / float(steps)
        return warm * ((1.0 - a) * 0.0 + a * alpha) + alpha * (1.0 - warm)

    return schedule


def _their_b3(b3: float, b1: float, steps: int) -> Callable[[Any], Any]:
    """The authors' optax ``beta3_scheduler(b3, b1, steps)``: a linear half-life."""
    import jax.numpy as jnp

    def f(beta: float) -> Any:
        return jnp.log(0.5) / jnp.log(beta) - 1

    def schedule(count: Any) -> Any:
        warm = (count < steps).astype(jnp.float64)
        a = count / float(steps)
        return warm * jnp.power(0.5, 1 / ((1.0 - a) * f(b1) + a * f(b3) + 1)) + b3 * (1 - warm)

    return schedule


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_ademamix_matches_optax(optax_x64: Any, seed: int) -> None:
    rng = np.random.default_rng(20 + seed)
    hp = dict(b1=float(rng.uniform(0.5, 0.95)), b2=float(rng.uniform(0.9, 0.999)),
              b3=float(rng.uniform(0.99, 0.9999)), alpha=float(rng.uniform(0.5, 8.0)),
              eps=float(10 ** rng.uniform(-9, -6)), eps_root=float(rng.choice([0.0, 1e-8])),
              weight_decay=float(rng.choice([0.0, 0.05])))
    lr = float(rng.uniform(1e-3, 2e-2))
    assert _vs_optax(uo.ademamix(lr, **hp), optax_x64.contrib.ademamix(lr, **hp), seed) < 1e-12


@pytest.mark.slow
def test_ademamix_warmups_match_the_authors_optax_schedulers(optax_x64: Any) -> None:
    b1, b3, alpha, warm = 0.9, 0.9995, 4.0, 200
    ours_lr, their_lr = _cosine(0.01)
    ours = uo.ademamix(ours_lr, b1=b1, b3=uo.ademamix_b3(b3, warm, start=b1),
                       alpha=uo.ademamix_alpha(alpha, warm), weight_decay=0.01)
    theirs = optax_x64.contrib.ademamix(their_lr, b1=b1, b3=_their_b3(b3, b1, warm),
                                        alpha=_their_alpha(alpha, warm), weight_decay=0.01)
    # b3's schedule is computed in Python here, in XLA there: an ulp of b3 is 1e-16/(1-b3)
    # = 2e-13 relative in 1-b3, the slow EMA's weight, which alpha = 4 carries to the step
    assert _vs_optax(ours, theirs, 4) < 1e-12


def test_ademamix_schedules_are_the_papers() -> None:
    alpha, b3 = uo.ademamix_alpha(5.0, 100), uo.ademamix_b3(0.9999, 100, start=0.9)
    assert alpha(0) == 0.0 and alpha(50) == 2.5 and alpha(100) == alpha(10**6) == 5.0
    assert math.isclose(b3(0), 0.9, rel_tol=1e-15) and b3(100) == 0.9999
    # start defaults to ademamix's b1 (its default was 0.0, which the start's check refused)
    assert uo.ademamix_b3(0.9999, 100) == b3
    # a warm-up from start: (1 - t/steps)*start + (t/steps)*alpha, then alpha
    assert [uo.ademamix_alpha(4.0, 4, start=2.0)(t) for t in range(6)] == [
        2.0, 2.5, 3.0, 3.5, 4.0, 4.0]
    assert [uo.ademamix_alpha(4.0, 4, start=2.0, offset=1)(t) for t in range(4)] == [
        2.5, 3.0, 3.5, 4.0]
    # the half-life in between: pytorch-optimizer's log form, one step later
    lb1, lb3 = math.log(0.9), math.log(0.9999)
    for t in (1, 37, 99):
        a = t / 100
        assert math.isclose(uo.ademamix_b3(0.9999, 100, start=0.9, offset=1)(t - 1),
                            math.exp(lb1 * lb3 / ((1 - a) * lb3 + a * lb1)), rel_tol=1e-15)


def test_ademamix_b3_from_1_is_pytorch_optimizers_but_for_its_cap(pto: Any) -> None:
    """pytorch-optimizer's schedule_beta3, read from it: ``offset=1`` is the same function one
    step later where b3 >= start. Its ``min(., b3)`` caps a warm-up down to a smaller b3 at b3
    up to T, after which its formula goes on below b3, where ours (the paper's) stays at b3
    (as the docstring says)."""
    schedule = pto.AdEMAMix.schedule_beta3
    for b1, b3 in ((0.9, 0.9999), (0.97, 0.96)):
        ours = uo.ademamix_b3(b3, 50, start=b1, offset=1)
        for t in range(1, 60):
            want = schedule(50, t, b1, b3)
            if b3 >= b1:
                assert math.isclose(ours(t - 1), want, rel_tol=1e-14), (b1, b3, t)
            elif t <= 50:
                assert want == b3 and (t == 50 or ours(t - 1) > b3), (b1, b3, t)
            else:
                assert want < b3 == ours(t - 1), (b1, b3, t)


@pytest.mark.slow
def test_ademamix_torch_convention_matches_pytorch_optimizer(pto: Any) -> None:
    warm = 150
    ours = uo.ademamix(0.01, b1=0.85, b2=0.99, b3=uo.ademamix_b3(0.999, warm, 0.85, offset=1),
                       alpha=uo.ademamix_alpha(3.0, warm, offset=1), weight_decay=0.02,
                       convention="torch")
    err = _vs_torch(ours, lambda ps: pto.AdEMAMix(
        ps, lr=0.01, betas=(0.85, 0.99, 0.999), alpha=3.0, t_alpha_beta3=warm,
        weight_decay=0.02, foreach=False), seed=5)
    assert err < 1e-12


@pytest.mark.slow
def test_simplified_ademamix_matches_optax(optax_x64: Any) -> None:
    ours_lr, their_lr = _cosine(0.003)
    hp = dict(b1=0.95, b2=0.9, eps=1e-7, eps_root=1e-9, weight_decay=0.02)
    ours = uo.simplified_ademamix(ours_lr, alpha=uo.schedules.linear(0.0, 3.0, steps=100), **hp)
    theirs = optax_x64.contrib.simplified_ademamix(
        their_lr, alpha=_f64(optax_x64.linear_schedule(0.0, 3.0, 100)), **hp)
    assert _vs_optax(ours, theirs, 6) < 1e-12
    assert _vs_optax(uo.simplified_ademamix(0.002),
                     optax_x64.contrib.simplified_ademamix(0.002), 7) < 1e-12


# --- MADGRAD --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_madgrad_matches_optax(optax_x64: Any, seed: int) -> None:
    rng = np.random.default_rng(30 + seed)
    hp = dict(momentum=float(rng.choice([0.0, rng.uniform(0.5, 0.95)])),
              eps=float(10 ** rng.uniform(-8, -5)), weight_decay=float(rng.choice([0.0, 0.01])))
    lr = float(rng.uniform(1e-3, 3e-2))
    # optax 0.2.8 computes lamb = (lr + eps)*sqrt(count + 1) in float32 even under x64 (its
    # count is int32): with its count made float64 it is ours
    theirs = optax_x64.contrib.madgrad(lr, **hp)
    assert _vs_optax(uo.madgrad(lr, **hp), theirs, seed, float_count=True) < 1e-12
    assert _vs_optax(uo.madgrad(lr, **hp), theirs, seed, steps=5) > 1e-12  # as optax runs it
    ours_lr, their_lr = _cosine(lr)
    assert _vs_optax(uo.madgrad(ours_lr, **hp), optax_x64.contrib.madgrad(their_lr, **hp),
                     seed, float_count=True) < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_madgrad_matches_pytorch_optimizer(pto: Any, momentum: float) -> None:
    # momentum 0: pytorch-optimizer rebuilds x0 as p + s/rms each step instead of keeping it,
    # which rounds differently; the error stays at rounding level, without growth
    ours = uo.madgrad(0.01, momentum=momentum, weight_decay=0.01)
    err = _vs_torch(ours, lambda ps: pto.MADGRAD(ps, lr=0.01, momentum=momentum,
                                                 weight_decay=0.01, foreach=False), seed=8)
    assert err < 1e-12


# --- what every rule here shares ------------------------------------------------------------------

RULES = [
    uo.adopt(0.05, nesterov=True, weight_decay=0.01),
    uo.ademamix(0.02, b3=uo.ademamix_b3(0.999, 10, start=0.9), alpha=uo.ademamix_alpha(2.0, 10),
                weight_decay=0.01),
    uo.simplified_ademamix(0.002, alpha=1.0),
    uo.madgrad(0.05, weight_decay=0.01),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_backends_and_in_place_agree_with_numpy(rule: uo.Transform) -> None:
    rng = np.random.default_rng(0)
    params = _params(rng)
    grads = [_params(rng) for _ in range(12)]
    state, ref = uo.setup(rule, params), params
    for g in grads:
        state, ref = uo.update(state, ref, g)
    inplace = {k: v.copy() for k, v in params.items()}
    state = uo.setup(rule, inplace)
    for g in grads:
        state = uo.update_(state, inplace, g)
    assert all(np.array_equal(inplace[k], ref[k]) for k in ref)
    libs = []
    torch = pytest.importorskip("torch")
    libs.append((lambda x: torch.tensor(x, dtype=torch.float64), lambda x: x.numpy()))
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):
        libs.append((jax.numpy.asarray, np.asarray))
        for to, back in libs:
            ps = {k: to(v) for k, v in params.items()}
            st = uo.setup(rule, ps)
            for g in grads:
                st, ps = uo.update(st, ps, {k: to(v) for k, v in g.items()})
            assert max(rel_diff(back(ps[k]), ref[k]) for k in ref) < 1e-12


def test_ademamix_jit_with_scheduled_b3_and_alpha() -> None:
    jax = pytest.importorskip("jax")
    rule = RULES[1]
    rng = np.random.default_rng(1)
    params = _params(rng)
    grads = [_params(rng) for _ in range(12)]
    with jax.enable_x64(True):
        step = jax.jit(uo.update)
        ps = {k: jax.numpy.asarray(v) for k, v in params.items()}
        st = uo.setup(rule, ps)
        ref_state, ref = uo.setup(rule, params), params
        for g in grads:
            st, ps = step(st, ps, {k: jax.numpy.asarray(v) for k, v in g.items()})
            ref_state, ref = uo.update(ref_state, ref, g)
        assert max(rel_diff(np.asarray(ps[k]), ref[k]) for k in ref) < 1e-12


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "match"), [
    (lambda: uo.adopt(decay_form="l1"), "decay_form must be one of 'l2', 'decoupled', got 'l1'"),
    (lambda: uo.adopt(convention="keras"), "convention must be one of 'optax', 'torch'"),
    (lambda: uo.adopt(clip=-1.0), r"^adopt: clip must be >= 0, got -1\.0$"),
    (lambda: uo.adopt(b2=1.0), r"^adopt: b2 must be in \[0, 1\), got 1\.0$"),
    (lambda: uo.ademamix(b3=1.0), r"^ademamix: b3 must be in \[0, 1\), got 1\.0$"),
    (lambda: uo.ademamix(alpha=-0.5), r"^ademamix: alpha must be >= 0, got -0\.5$"),
    (lambda: uo.ademamix(decay_form="x"), "decay_form must be one of"),
    (lambda: uo.simplified_ademamix(b1=1.5),
     r"^simplified_ademamix: b1 must be in \[0, 1\), got 1\.5$"),
    (lambda: uo.madgrad(momentum=1.0), r"^madgrad: momentum must be in \[0, 1\), got 1\.0$"),
    (lambda: uo.madgrad(lr=-1e-3), r"^madgrad: lr must be >= 0, got -0\.001$"),
    (lambda: uo.step_power(0.25, offset=-1), "offset must be >= 0, got -1"),
    (lambda: uo.step_power(math.nan), "power must be a finite number"),
    (lambda: uo.ademamix_alpha(5.0, steps=0),
     r"^ademamix_alpha: steps must be a positive integer, got 0$"),
    (lambda: uo.ademamix_b3(1.0, steps=10), r"b3 must be in \(0, 1\), got 1.0"),
    (lambda: uo.ademamix_b3(0.999, steps=10, start=0.0), "start must be in"),
])
def test_bad_hyperparameters_raise(make: Callable[[], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_a_schedule_that_leaves_the_range_fails_before_anything_is_written() -> None:
    p = {"x": np.ones(3)}
    state = uo.setup(uo.adopt(0.1, clip=lambda s: 1.0 - s), p)
    state, p = uo.update(state, p, {"x": np.ones(3)})
    state, p = uo.update(state, p, {"x": np.ones(3)})  # clip 0 at the second step
    before = p["x"].copy()
    with pytest.raises(ValueError, match=r"^adopt: clip must be >= 0, got -1\.0 \(the value of its "
                                         r"schedule at step 2\)$"):
        uo.update_(state, p, {"x": np.ones(3)})
    assert np.array_equal(p["x"], before)


# --- SAM ------------------------------------------------------------------------------------------


def _loss(params: dict[str, Any], noise: dict[str, np.ndarray]) -> Any:
    """The loss whose gradient is :func:`_grads`: ``sum(0.5 log cosh(p) + noise*p)``."""
    return sum(float(np.sum(0.5 * np.log(np.cosh(np.asarray(v))) + noise[k] * np.asarray(v)))
               for k, v in params.items())


def _sam_run(rule: uo.Transform, seed: int, steps: int = STEPS) -> list[dict[str, np.ndarray]]:
    """Our params after each :func:`uniopt.minimize_step` on the noisy loss, the same minibatch
    (noise) for both of a step's gradients."""
    rng = np.random.default_rng(seed)
    params = _params(rng)
    state = uo.setup(rule, params)
    out = []
    for _ in range(steps):
        noise = {k: 0.1 * rng.standard_normal(s) for k, s in SHAPES.items()}
        state, params, loss = uo.minimize_step(
            state, params, lambda p, n=noise: (_loss(p, n), _grads(p, n)))
        out.append(params)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_sam_matches_optax_two_step_protocol(optax_x64: Any, base: str) -> None:
    import jax.numpy as jnp

    # optax's SAM is one transformation called twice per step (transparent mode): odd calls
    # move to w + rho*g/|g| (adv_optimizer: normalize, then sgd(rho), negated), even calls
    # return cache - w_adv + base_update, landing on w + base_update
    rho = 0.07
    ours_base, their_base = {
        "sgd": (uo.sgd(0.05, momentum=0.8), optax_x64.sgd(0.05, momentum=0.8)),
        "adam": (uo.adam(0.01), optax_x64.adam(0.01)),
    }[base]
    theirs = optax_x64.contrib.sam(
        their_base, optax_x64.chain(optax_x64.contrib.normalize(), optax_x64.sgd(rho)),
        sync_period=2)
    ours = _sam_run(uo.sam(ours_base, rho=rho, eps=0.0), seed=9)
    rng = np.random.default_rng(9)
    jparams = {k: jnp.asarray(v) for k, v in _params(rng).items()}
    jstate = theirs.init(jparams)
    step = jitted_optax_step(theirs)
    worst = 0.0
    for mine in ours:
        noise = {k: 0.1 * rng.standard_normal(s) for k, s in SHAPES.items()}
        for _ in range(2):  # ascend, then descend from the cached point
            jgrads = {k: jnp.asarray(v) for k, v in _grads(jparams, noise).items()}
            jparams, jstate = step(jparams, jstate, jgrads)
        worst = max(worst, *(rel_diff(mine[k], jparams[k]) for k in mine))
    assert worst < 1e-12


@pytest.mark.parametrize(("base", "name"), [
    (uo.polyak_sgd(), "polyak_sgd"), (uo.momo(), "momo"),
    # a part in a chain built by hand (registry rules alone were read, by Info.step_args)
    (uo.chain(uo.scale_by_polyak()), "scale_by_polyak"),
    (uo.chain(uo.sgd(lr=0.1), uo.reduce_on_plateau()), "reduce_on_plateau"),
])
def test_sam_refuses_a_base_that_reads_the_loss(base: Any, name: str) -> None:
    """Which loss would it read: at w, or at the perturbed point it steps with the gradient
    of? It was accepted, and every step then raised that the loss was missing."""
    with pytest.raises(ValueError, match=r"sam: base must step from gradients alone; "
                                         rf"{name} reads the loss of each step"):
        uo.sam(base)


def _sam_formula(rho: float, adaptive: bool, lr: float, mu: float, seed: int,
                 steps: int) -> list[dict[str, np.ndarray]]:
    """SAM (ASAM) with torch's momentum SGD, written out from the papers."""
    rng = np.random.default_rng(seed)
    w = _params(rng)
    buf: dict[str, np.ndarray] = {}
    out = []
    for _ in range(steps):
        noise = {k: 0.1 * rng.standard_normal(s) for k, s in SHAPES.items()}
        g = _grads(w, noise)
        t = {k: np.abs(w[k]) if adaptive else np.ones_like(w[k]) for k in w}
        norm = math.sqrt(sum(float(np.sum((t[k] * g[k]) ** 2)) for k in w))
        g_adv = _grads({k: w[k] + rho * t[k] ** 2 * g[k] / (norm + 1e-12) for k in w}, noise)
        for k in w:
            buf[k] = g_adv[k] if k not in buf else mu * buf[k] + g_adv[k]
        w = {k: w[k] - lr * buf[k] for k in w}
        out.append(w)
    return out


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_and_asam_match_their_formulas(adaptive: bool) -> None:
    rho = 0.5 if adaptive else 0.05
    ours = _sam_run(uo.sam(uo.sgd(0.05, momentum=0.9), rho=rho, adaptive=adaptive), 11, 60)
    theirs = _sam_formula(rho, adaptive, 0.05, 0.9, 11, 60)
    assert max(rel_diff(a[k], b[k]) for a, b in zip(ours, theirs, strict=True) for k in a) < 1e-12


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_sam_steps_a_tree_of_float32_and_float64_leaves(base: str) -> None:
    """SAM's vector of every leaf is in the widest dtype; cut back into leaves it kept that
    dtype, and the base rule refused its float32 leaf as "a state set up for other params" at
    every step. Each leaf now goes to the base in its own dtype: the steps are those of the
    formula above with the float32 leaf rounded to float32 after each (to float32's digits)."""
    rule = uo.sam(uo.sgd(0.05, momentum=0.9) if base == "sgd" else uo.adam(lr=0.01), rho=0.05)
    rng = np.random.default_rng(3)
    p = {"a": rng.standard_normal(5), "b": rng.standard_normal((2, 3)).astype(np.float32)}
    wide = {k: v.astype(np.float64) for k, v in p.items()}

    def closure(w: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return sum(float(np.sum(v.astype(np.float64) ** 2)) / 2 for v in w.values()), {
            k: v * (1 + k0) for k0, (k, v) in enumerate(w.items())}

    s, sw = uo.setup(rule, p), uo.setup(rule, wide)
    for _ in range(5):
        s, p, _ = uo.minimize_step(s, p, closure)
        sw, wide, _ = uo.minimize_step(sw, wide, closure)
        wide["b"] = wide["b"].astype(np.float32).astype(np.float64)
    assert p["a"].dtype == np.float64 and p["b"].dtype == np.float32
    # (b's gradients and slots are float32 in the mixed tree, float64 in the wide one: a
    # float32 rounding or two a step, 2e-6 after five; a feels them through the global norm)
    np.testing.assert_allclose(p["a"], wide["a"], rtol=1e-6)
    np.testing.assert_allclose(p["b"], wide["b"], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_matches_pytorch_optimizer(pto: Any, adaptive: bool) -> None:
    import torch

    rho, steps = 0.05, 100
    ours = _sam_run(uo.sam(uo.sgd(0.05, momentum=0.9), rho=rho, adaptive=adaptive), 12, steps)
    rng = np.random.default_rng(12)
    tensors = {k: torch.tensor(v, requires_grad=False) for k, v in _params(rng).items()}
    opt = pto.SAM(list(tensors.values()), torch.optim.SGD, rho=rho, adaptive=adaptive,
                  lr=0.05, momentum=0.9, foreach=False)
    worst = 0.0
    for mine in ours:
        noise = {k: 0.1 * rng.standard_normal(s) for k, s in SHAPES.items()}

        def closure(n: dict[str, np.ndarray] = noise) -> None:
            for k, g in _grads({k: t.numpy() for k, t in tensors.items()}, n).items():
                tensors[k].grad = torch.tensor(g)

        closure()
        opt.step(closure)
        worst = max(worst, *(rel_diff(mine[k], tensors[k].numpy()) for k in mine))
    # pytorch-optimizer sums the squared norms in float32 (get_global_gradient_norm's .float()),
    # even for float64 tensors: its perturbation carries a float32 rounding, ~6e-8 of rho*g,
    # which reaches the params through the gradient at w + e (measured: 9e-10 over 100 steps)
    assert worst < 1e-8
    assert worst > 1e-12  # the float32 norm shows: were it gone, tighten the tolerance


def test_sam_in_place_and_on_jax_agree_with_numpy() -> None:
    rule = uo.sam(uo.adam(0.02), rho=0.1, adaptive=True)
    ref = _sam_run(rule, 13, 8)[-1]
    rng = np.random.default_rng(13)
    params = _params(rng)
    state = uo.setup(rule, params)
    for _ in range(8):
        noise = {k: 0.1 * rng.standard_normal(s) for k, s in SHAPES.items()}
        state, _ = uo.minimize_step_(state, params, lambda p, n=noise: (_loss(p, n),
                                                                         _grads(p, n)))
    assert all(np.array_equal(params[k], ref[k]) for k in ref)
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):
        rng = np.random.default_rng(13)
        jparams = {k: jax.numpy.asarray(v) for k, v in _params(rng).items()}
        state = uo.setup(rule, jparams)
        for _ in range(8):
            noise = {k: 0.1 * rng.standard_normal(s) for k, s in SHAPES.items()}
            state, jparams, _ = uo.minimize_step(
                state, jparams, lambda p, n=noise: (0.0, {k: jax.numpy.asarray(v) for k, v in
                                                          _grads(p, n).items()}))
        assert max(rel_diff(np.asarray(jparams[k]), ref[k]) for k in ref) < 1e-12


def test_sam_base_errors() -> None:
    with pytest.raises(TypeError, match="base must be a uniopt rule or transform, got 0.1"):
        uo.sam(0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="base must take gradients"):
        uo.sam(uo.lbfgs())
    with pytest.raises(ValueError, match="base must make a step"):
        uo.sam(uo.scale_by_adam())  # a direction: added as a step it would ascend
    with pytest.raises(ValueError, match=r"^sam: rho must be >= 0, got -0\.05$"):
        uo.sam(uo.sgd(0.1), rho=-0.05)


# --- Sophia ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("clip", [1.0, None])
def test_sophia_matches_optax_with_its_hutchinson_estimates(optax_x64: Any,
                                                            clip: float | None) -> None:
    import jax
    import jax.numpy as jnp

    def loss(p: Any, noise: Any) -> Any:
        return sum(jnp.sum(0.5 * jnp.log(jnp.cosh(v)) + noise[k] * v) for k, v in p.items())

    every, lr = 3, 0.02
    hp = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, gamma=0.05)
    theirs = optax_x64.contrib.sophia(lr, clip_threshold=clip, update_interval=every, **hp)
    ours = uo.sophia(lr, clip_threshold=clip or 1.0, use_clipping=clip is not None, **hp)

    @jax.jit
    def their_step(p: Any, s: Any, noise: Any) -> tuple[Any, Any]:
        u, s = theirs.update(jax.grad(loss)(p, noise), s, p,
                             obj_fn=lambda q: loss(q, noise))
        return optax_x64.apply_updates(p, u), s

    @jax.jit
    def hutchinson(p: Any, key: Any, noise: Any) -> Any:
        # optax's estimator, written here: its key split, its Rademacher signs, r * (H r)
        _, sub = jax.random.split(key)
        r = optax_x64.tree.random_like(sub, p, jax.random.rademacher, dtype=jnp.float32)
        r = jax.tree.map(lambda x: x.astype(jnp.float64), r)
        hvp = jax.jvp(lambda q: jax.grad(loss)(q, noise), (p,), (r,))[1]
        return jax.tree.map(lambda h, x: h * x, hvp, r)

    rng = np.random.default_rng(14)
    params = _params(rng)
    state = uo.setup(ours, params)
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    jstate = theirs.init(jparams)
    worst = 0.0
    for k in range(STEPS):
        noise = {n: 0.1 * rng.standard_normal(s) for n, s in SHAPES.items()}
        key = jstate[0].hessian_fn_state.key  # the key optax draws this step's signs with
        estimate = hutchinson({n: jnp.asarray(v) for n, v in params.items()}, key, noise)
        state, params = uo.update(state, params, _grads(params, noise))
        if k % every == 0:
            state = uo.sophia_hessian(state, {n: np.asarray(v) for n, v in estimate.items()})
        jparams, jstate = their_step(jparams, jstate, noise)
        worst = max(worst, *(rel_diff(params[n], jparams[n]) for n in params))
    assert worst < 1e-12


def test_sophia_hessian_errors() -> None:
    p = {"w": np.ones(3)}
    with pytest.raises(ValueError, match="has no Sophia part"):
        uo.sophia_hessian(uo.setup(uo.adam(), p), p)
    with pytest.raises(ValueError, match=r"got shapes \[\(2,\)\], expected \[\(3,\)\]"):
        uo.sophia_hessian(uo.setup(uo.sophia(), p), {"w": np.ones(2)})
    # a tree of other keys was taken leaf by leaf, in its own order (update refuses it)
    two = {"a": np.ones(2), "b": np.ones(2)}
    with pytest.raises(ValueError, match=r"the estimate's tree is not the params'"):
        uo.sophia_hessian(uo.setup(uo.sophia(), two), {"y": np.ones(2), "x": np.ones(2)})
    state = uo.setup(uo.sophia(), two)
    by_tree = uo.sophia_hessian(state, {"a": np.full(2, 2.0), "b": np.full(2, 3.0)})
    by_list = uo.sophia_hessian(state, [np.full(2, 2.0), np.full(2, 3.0)])
    by_tuple = uo.sophia_hessian(state, (np.full(2, 2.0), np.full(2, 3.0)))  # as update takes
    for key, arrays in by_tree.slots.items():
        for x, y, z in zip(arrays, by_list.slots[key], by_tuple.slots[key], strict=True):
            np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(x, z)
    with pytest.raises(ValueError, match=r"^sophia: clip_threshold must be > 0, got 0\.0$"):
        uo.sophia(clip_threshold=0.0)
    with pytest.raises(ValueError, match=r"^sophia: gamma must be >= 0, got -1\.0$"):
        uo.sophia(gamma=-1.0)
    # params that are tuples of tuples: a tree of their structure is a tree, not a flat list
    nested = uo.setup(uo.sophia_g(lr=0.1), ((np.ones(2),), (np.ones(3),)))
    as_tree = uo.sophia_hessian(nested, ((np.full(2, 2.0),), (np.full(3, 3.0),)))
    as_list = uo.sophia_hessian(nested, [np.full(2, 2.0), np.full(3, 3.0)])
    for key, arrays in as_tree.slots.items():
        for x, y in zip(arrays, as_list.slots[key], strict=True):
            np.testing.assert_array_equal(x, y)


# --- the compiled loop ----------------------------------------------------------------------------
# (MADGRAD keeps the reference path: its cube root is a power, rounded differently there)


@pytest.mark.slow  # compiles a loop per rule on a cold cache
@pytest.mark.parametrize("rule", [*RULES[:3], uo.sophia(0.01)], ids=lambda r: r.name)



def test_the_compiled_loop_is_bitwise_the_reference(rule: uo.Transform) -> None:
    from helpers import WIDE_LEAVES, assert_same, assert_same_state, beside_reference, grads_like

    rng = np.random.default_rng(2)
    fast = {f"x{i}": rng.standard_normal((3, 4)) for i in range(WIDE_LEAVES)}
    ref = {k: v.copy() for k, v in fast.items()}
    s_fast, s_ref = uo.setup(rule, fast), uo.setup(rule, ref)
    s_fast, fast, s_ref = beside_reference(s_fast, fast, s_ref, ref, 12,
                                           lambda k: grads_like(rng, fast), pure=False)
    assert_same(uo.trainables(fast), uo.trainables(ref))
    assert_same_state(s_fast, s_ref)
