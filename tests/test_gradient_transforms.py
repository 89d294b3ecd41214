"""The gradient transforms against their peers: clip_by_norm (keras's ``clipnorm``),
clip_by_block_rms, adaptive_grad_clip, add_noise, centralize, scale_by_trust_ratio and sign
(optax's), in chains with Adam, through the optax protocol, under ``jax.jit``, through
``uniopt.torch.Optimizer``; their edge cases and bad input.

Float64 throughout (optax under ``jax.enable_x64``), so a disagreement in a rule cannot hide
behind float32 rounding: 300 steps agree to 1e-12, relative to each leaf's scale
(:func:`helpers.rel_diff`). Each gradient is scaled by ``10**U(-1.5, 1.5)``, so every clip
acts at some steps and not at others.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

import uniopt as uo  # noqa: E402
from helpers import (  # noqa: E402
    counting_jit,
    expect_compiled,
    jitted_optax_step,
    keras_on_jax,
    reference_path,
    rel_diff,
)
from uniopt.fast import cpu  # noqa: E402

SHAPES = {"a": (3,), "b": (4, 5), "c": (2, 3, 4, 4)}
STEPS = 300
LR = 2.0**-7  # exact in float32: keras keeps its learning rate in a float32 variable


def _params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def _grads(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s) * 10 ** rng.uniform(-1.5, 1.5) for k, s in SHAPES.items()}


# name: (the uniopt chain, the optax chain it must equal)
PEERS: dict[str, tuple[Any, Any]] = {
    "clip_by_block_rms": (lambda: uo.chain(uo.clip_by_block_rms(0.5), uo.adam(lr=LR)),
                          lambda: optax.chain(optax.clip_by_block_rms(0.5), optax.adam(LR))),
    "adaptive_grad_clip": (
        lambda: uo.chain(uo.adaptive_grad_clip(0.3, eps=1e-3), uo.adam(lr=LR)),
        lambda: optax.chain(optax.adaptive_grad_clip(0.3, eps=1e-3), optax.adam(LR))),
    "centralize": (lambda: uo.chain(uo.centralize(), uo.adam(lr=LR)),
                   lambda: optax.chain(optax.centralize(), optax.adam(LR))),
    # LAMB's place for it: between Adam's direction and the learning rate
    "scale_by_trust_ratio": (
        lambda: uo.chain(uo.scale_by_adam(), uo.scale_by_trust_ratio(0.5, 0.8, 1e-3),
                         uo.scale_by_lr(LR)),
        lambda: optax.chain(optax.scale_by_adam(), optax.scale_by_trust_ratio(0.5, 0.8, 1e-3),
                            optax.scale(-LR))),
    "sign": (lambda: uo.chain(uo.sign(), uo.adam(lr=LR)),
             lambda: optax.chain(optax.scale_by_sign(), optax.adam(LR))),
    "normalize": (lambda: uo.chain(uo.normalize(), uo.adam(lr=LR)),
                  lambda: optax.chain(optax.contrib.normalize(), optax.adam(LR))),
    # Adafactor's relative step sizes, between the direction and the learning rate
    "scale_by_param_block_norm": (
        lambda: uo.chain(uo.scale_by_adam(), uo.scale_by_param_block_norm(0.5),
                         uo.scale_by_lr(LR)),
        lambda: optax.chain(optax.scale_by_adam(), optax.scale_by_param_block_norm(0.5),
                            optax.scale(-LR))),
    "scale_by_param_block_rms": (
        lambda: uo.chain(uo.scale_by_adam(), uo.scale_by_param_block_rms(0.5),
                         uo.scale_by_lr(LR)),
        lambda: optax.chain(optax.scale_by_adam(), optax.scale_by_param_block_rms(0.5),
                            optax.scale(-LR))),
    # last in its chain; the params start at N(0, 1): half are held at 0 from the first step
    "keep_params_nonnegative": (
        lambda: uo.chain(uo.adam(lr=LR), uo.keep_params_nonnegative()),
        lambda: optax.chain(optax.adam(LR), optax.keep_params_nonnegative())),
    "apply_every": (lambda: uo.chain(uo.adam(lr=LR), uo.apply_every(3)),
                    lambda: optax.chain(optax.adam(LR), optax.apply_every(3))),
}


@pytest.fixture(autouse=True)
def _x64():  # type: ignore[no-untyped-def]
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("name", sorted(PEERS))
def test_a_chain_with_adam_matches_optax_on_numpy(name: str) -> None:
    ours, theirs = PEERS[name][0](), PEERS[name][1]()
    rng = np.random.default_rng(0)
    params = _params(rng)
    state = uo.setup(ours, params)
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    jstate, step = theirs.init(jparams), jitted_optax_step(theirs)
    for _ in range(STEPS):
        grads = _grads(rng)
        state, params = uo.update(state, params, grads)
        jparams, jstate = step(jparams, jstate, {k: jnp.asarray(v) for k, v in grads.items()})
    for k in params:
        assert rel_diff(params[k], jparams[k]) <= 1e-12, k


def _all_in_one() -> tuple[Any, Any]:
    """Every transform with an optax peer in one chain (sign, then optax's formula for
    clip_by_norm, which optax lacks): a jitted step of it must compile once."""
    def clip_by_norm(c: float) -> Any:
        return optax.stateless(lambda u, p: jax.tree.map(
            lambda g: g * (c / jnp.maximum(jnp.linalg.norm(g), c)), u))
    ours = uo.chain(uo.add_noise(0.5, 0.55, seed=3), uo.sign(), uo.centralize(),
                    uo.adaptive_grad_clip(0.3), uo.clip_by_block_rms(0.5), uo.clip_by_norm(2.0),
                    uo.scale_by_adam(), uo.scale_by_trust_ratio(0.5, 0.8, 1e-3),
                    uo.scale_by_lr(LR))
    theirs = optax.chain(optax.add_noise(0.5, 0.55, key=3), optax.scale_by_sign(),
                         optax.centralize(), optax.adaptive_grad_clip(0.3),
                         optax.clip_by_block_rms(0.5), clip_by_norm(2.0), optax.scale_by_adam(),
                         optax.scale_by_trust_ratio(0.5, 0.8, 1e-3), optax.scale(-LR))
    return ours, theirs


def test_under_jit_the_same_keys_as_optax_and_one_compile() -> None:
    """Every transform in one chain under one jit. On JAX, add_noise splits optax's key as
    optax does: the very same noise; the key is a leaf of the state, carried from one jitted
    step to the next."""
    ours, theirs = _all_in_one()
    step, traces = counting_jit()
    rng = np.random.default_rng(1)
    params = {k: jnp.asarray(v) for k, v in _params(rng).items()}
    state = uo.setup(ours, params)
    jparams, jstate, theirs_step = params, theirs.init(params), jitted_optax_step(theirs)
    for _ in range(STEPS):
        grads = {k: jnp.asarray(v) for k, v in _grads(rng).items()}
        state, params = step(state, params, grads)
        jparams, jstate = theirs_step(jparams, jstate, grads)
    assert len(traces) == 1, "the jitted update recompiled"
    for k in params:
        assert rel_diff(params[k], jparams[k]) <= 1e-12, k


ALONE: dict[str, tuple[Any, Any]] = {
    "clip_by_block_rms": (uo.clip_by_block_rms(0.5), optax.clip_by_block_rms(0.5)),
    "adaptive_grad_clip": (uo.adaptive_grad_clip(0.3), optax.adaptive_grad_clip(0.3)),
    "centralize": (uo.centralize(), optax.centralize()),
    "scale_by_trust_ratio": (uo.scale_by_trust_ratio(0.5, 0.8, 1e-3),
                             optax.scale_by_trust_ratio(0.5, 0.8, 1e-3)),
    "sign": (uo.sign(), optax.scale_by_sign()),
    "add_noise": (uo.add_noise(0.5, 0.55, seed=11), optax.add_noise(0.5, 0.55, key=11)),
    "normalize": (uo.normalize(), optax.contrib.normalize()),
    "scale_by_param_block_norm": (uo.scale_by_param_block_norm(0.5),
                                  optax.scale_by_param_block_norm(0.5)),
    "scale_by_param_block_rms": (uo.scale_by_param_block_rms(1.2),
                                 optax.scale_by_param_block_rms(1.2)),
    "apply_every": (uo.apply_every(2), optax.apply_every(2)),
    # (keep_params_nonnegative alone reads its input as the step it makes, uniopt's u = -optax's
    # update: the same block only after a rule, as PEERS has it)
}


@pytest.mark.parametrize("name", sorted(ALONE))
def test_alone_through_the_optax_protocol_each_update_is_optaxs(name: str) -> None:
    """Alone, no Adam to smooth a factor away: uniopt's own ``init``/``update`` (on NumPy
    arrays; add_noise on JAX's, for optax's draws) hand back optax's updates step by step."""
    ours, theirs = ALONE[name]
    rng = np.random.default_rng(2)
    lib = jnp.asarray if name == "add_noise" else np.asarray
    params = {k: lib(v) for k, v in _params(rng).items()}
    state, jstate = ours.init(params), theirs.init(params)
    their_update = jax.jit(theirs.update)
    changed = 0
    for _ in range(3):
        grads = {k: lib(v) for k, v in _grads(rng).items()}
        updates, state = ours.update(grads, state, params)
        expected, jstate = their_update(grads, jstate, params)
        for k in params:
            assert rel_diff(updates[k], expected[k]) <= 1e-14, k
            changed += not np.array_equal(np.asarray(updates[k]), np.asarray(grads[k]))
    assert changed  # the transform did something


def test_clip_by_norm_with_adam_matches_keras_clipnorm() -> None:
    """keras 3 on its JAX backend, ``clipnorm=1``: each variable's gradient clipped to norm 1,
    then Adam. keras adds its epsilon to the root of the uncorrected second moment, torch
    (uo.adam) to the corrected one: with epsilon 0 both are ``m_hat / sqrt(v_hat)``."""
    keras = keras_on_jax()
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s) for s in SHAPES.values()]
    variables = [keras.Variable(p.copy(), dtype="float64") for p in params]  # JAX may alias
    opt = keras.optimizers.Adam(learning_rate=LR, clipnorm=1.0, epsilon=0.0)
    opt.build(variables)
    keras_step = jax.jit(opt.stateless_apply)
    theirs, opt_vars = [v.value for v in variables], [v.value for v in opt.variables]
    state = uo.setup(uo.chain(uo.clip_by_norm(1.0), uo.adam(lr=LR, eps=0.0)), params)
    for _ in range(STEPS):
        grads = list(_grads(rng).values())
        state = uo.update_(state, params, grads)
        theirs, opt_vars = keras_step(opt_vars, [jnp.asarray(g) for g in grads], theirs)
    for i, p in enumerate(params):
        assert rel_diff(p, theirs[i]) <= 1e-12, i


# --- torch -------------------------------------------------------------------------------------

TORCH_RULES = {
    "clip_by_norm": lambda: uo.clip_by_norm(1.0),
    "clip_by_block_rms": lambda: uo.clip_by_block_rms(0.5),
    "adaptive_grad_clip": lambda: uo.adaptive_grad_clip(0.3, weight_layout="torch"),
    "add_noise": lambda: uo.add_noise(0.5, 0.55, seed=5),
    "centralize": uo.centralize,
    "scale_by_trust_ratio": lambda: uo.scale_by_trust_ratio(0.5, 0.8, 1e-3),
    "sign": uo.sign,
    "normalize": uo.normalize,
    "scale_by_param_block_norm": lambda: uo.scale_by_param_block_norm(0.5),
    "scale_by_param_block_rms": lambda: uo.scale_by_param_block_rms(0.5),
    "apply_every": lambda: uo.apply_every(3),
    "zero_nans": uo.zero_nans,
}


@pytest.mark.parametrize("name", sorted(TORCH_RULES))
def test_through_uniopt_torch_optimizer(name: str) -> None:
    """In a torch training step, chained with Adam: the same numbers as the functional API on
    the same tensors (one torch generator for add_noise, kept in the first parameter's state
    and saved with it), before and after a state_dict round trip."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    rule = uo.chain(TORCH_RULES[name](), uo.adam(lr=LR))
    rng = np.random.default_rng(3)
    start = _params(rng)
    ps = [torch.nn.Parameter(torch.tensor(v)) for v in start.values()]
    ref = [torch.tensor(v) for v in start.values()]
    opt, state = ut.Optimizer(ps, rule), uo.setup(rule, ref)
    for k in range(12):
        grads = [torch.tensor(g) for g in _grads(rng).values()]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g
        opt.step()
        state = uo.update_(state, ref, grads)
        if k == 5:  # a checkpoint, loaded into a new optimizer
            saved = opt.state_dict()
            opt = ut.Optimizer(ps, rule)
            opt.load_state_dict(saved)
    for p, r in zip(ps, ref, strict=True):
        assert rel_diff(p.detach().numpy(), r.numpy()) <= 1e-14


# --- add_noise on NumPy and torch: its own generator, tested by its distribution ----------------


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_noise_has_the_annealed_variance_and_is_reproducible(lib: str) -> None:
    """``sqrt(eta / t^gamma) z``: over 20,000 draws a step, each step's mean within 4 standard
    errors of 0 and variance within 4 of ``eta / t^gamma``, leaves and steps uncorrelated;
    the same seed draws the same, another seed other numbers, and a copy of the state goes on
    as the original."""
    eta, gamma, n = 2.0, 0.55, 10_000
    if lib == "torch":
        torch = pytest.importorskip("torch")
        zeros: Any = torch.zeros
        array: Any = lambda x: x.numpy()  # noqa: E731
    else:
        zeros, array = np.zeros, np.asarray

    def run(seed: int, steps: int = 4, state: Any = None) -> tuple[list[Any], Any]:
        params = [zeros(n, dtype=_f64(lib)), zeros((100, 100), dtype=_f64(lib))]
        state = state or uo.setup(uo.add_noise(eta, gamma, seed=seed), params)
        draws = []
        for _ in range(steps):
            state, new = uo.update(state, params, [zeros(n, dtype=_f64(lib)),
                                                   zeros((100, 100), dtype=_f64(lib))])
            draws.append([-array(x).reshape(-1) for x in new])
        return draws, state

    draws, _ = run(seed=1)
    for t, (a, b) in enumerate(draws, start=1):
        var = eta / t**gamma
        for x in (a, b):
            assert abs(x.mean()) <= 4 * np.sqrt(var / n)
            assert abs(x.var() - var) <= 4 * var * np.sqrt(2 / n)
        assert abs(np.corrcoef(a, b)[0, 1]) <= 4 / np.sqrt(n)
    assert abs(np.corrcoef(draws[0][0], draws[1][0])[0, 1]) <= 4 / np.sqrt(n)
    again, _ = run(seed=1)
    other, _ = run(seed=2, steps=1)
    assert all(np.array_equal(x, y) for d, e in zip(draws, again, strict=True)
               for x, y in zip(d, e, strict=True))
    assert not np.array_equal(draws[0][0], other[0][0])
    # resuming from a state (its generator's state) draws what the run would have drawn next
    _, half = run(seed=1, steps=2)
    rest, _ = run(seed=1, steps=2, state=half)
    assert np.array_equal(rest[0][1], draws[2][1]) and np.array_equal(rest[1][0], draws[3][0])


def _f64(lib: str) -> Any:
    if lib == "torch":
        import torch

        return torch.float64
    return np.float64


# --- the compiled path ----------------------------------------------------------------------


def test_per_leaf_norms_keep_the_compiled_path() -> None:
    """A per-leaf norm costs one extra read pass, as the global one: the step stays compiled
    and agrees with the reference path to a few ulps (the two sum the squares in different
    orders). A leaf longer than a chunk is summed over several; the second norm is of what
    the first clip and Adam made. (Three loops to compile on a cold cache: one rule.)"""
    rule = uo.chain(uo.clip_by_norm(3.0), uo.scale_by_adam(), uo.clip_by_block_rms(0.9),
                    uo.scale_by_lr(1e-2))
    rng = np.random.default_rng(4)
    shapes = [(), (3,), (cpu.CHUNK * 2 + 5,), (40, 50), (0,)]
    fast = [rng.standard_normal(s) for s in shapes]
    ref = [x.copy() for x in fast]
    s_fast, s_ref = uo.setup(rule, fast), uo.setup(rule, ref)
    for _ in range(8):
        grads = [np.asarray(rng.standard_normal(s) * 10 ** rng.uniform(-1, 1)) for s in shapes]
        with expect_compiled(1):
            s_fast = uo.update_(s_fast, fast, grads)
        with reference_path():
            s_ref = uo.update_(s_ref, ref, grads)
    for a, b in zip(fast, ref, strict=True):
        assert rel_diff(a, b) <= 8 * np.finfo(np.float64).eps


# --- edge cases, by their numbers -------------------------------------------------------------


def _step(t: Any, params: list[np.ndarray], grads: list[np.ndarray]) -> list[np.ndarray]:
    """The update ``t`` makes (``p - p_new``)."""
    _, new = uo.update(uo.setup(t, params), params, grads)
    return [p - q for p, q in zip(params, new, strict=True)]


def test_clip_by_norm_at_and_around_the_limit() -> None:
    g = [np.zeros(4), np.array([3.0, 4.0]), np.array([0.6, 0.8]), np.array([30.0, -40.0])]
    out = _step(uo.clip_by_norm(1.0), [np.zeros_like(x) for x in g], g)
    np.testing.assert_array_equal(out[0], 0.0)  # norm 0: untouched, no 0/0
    np.testing.assert_array_equal(out[2], g[2])  # at the limit: exactly as it was
    np.testing.assert_allclose(out[1], [0.6, 0.8], rtol=1e-15)
    np.testing.assert_allclose(out[3], [0.6, -0.8], rtol=1e-15)


def test_block_rms_trust_ratio_and_agc_edge_cases() -> None:
    zero, g = np.zeros((2, 2)), np.full((2, 2), 4.0)  # rms 4
    assert np.array_equal(_step(uo.clip_by_block_rms(2.0), [zero], [g])[0], np.full((2, 2), 2.0))
    assert np.array_equal(_step(uo.clip_by_block_rms(8.0), [zero], [g])[0], g)
    # a zero parameter or update: the ratio is 1
    assert np.array_equal(_step(uo.scale_by_trust_ratio(), [zero], [g])[0], g)
    # norms 2 and 8 (each raised to min_norm 3): 0.5 * 3 / 8
    p = np.full((2, 2), 1.0)
    np.testing.assert_allclose(_step(uo.scale_by_trust_ratio(3.0, 0.5), [p], [g])[0],
                               g * 0.5 * 3 / 8, rtol=1e-15)
    # AGC on a zero parameter: clipped to clipping * eps per unit (each column of 2)
    out = _step(uo.adaptive_grad_clip(0.5, eps=0.1), [zero], [g])[0]
    np.testing.assert_allclose(np.linalg.norm(out, axis=0), 0.05, rtol=1e-15)


@pytest.mark.parametrize(("shape", "layout", "axes"), [
    ((), "optax", ()), ((3,), "optax", (0,)), ((1, 5), "optax", (0, 1)), ((4, 5), "optax", (0,)),
    ((2, 3, 4), "optax", (0,)), ((2, 3, 4, 4), "optax", (0, 1, 2)),
    ((2, 1, 3, 4, 4), "optax", (0, 1, 2, 3)),
    ((3,), "torch", (0,)), ((4, 5), "torch", (1,)), ((8, 3, 4, 4), "torch", (1, 2, 3)),
])
def test_agc_units_by_layout(shape: tuple[int, ...], layout: str, axes: tuple[int, ...]) -> None:
    """optax's table for JAX's weight layouts; every axis but the first for torch's (each
    output channel a unit): the update equals the unit-by-unit formula on those axes."""
    t = uo.adaptive_grad_clip(0.2, weight_layout=layout)
    assert t.unit_axes(shape) == axes
    rng = np.random.default_rng(5)
    p, g = rng.standard_normal(shape), 3 * rng.standard_normal(shape)
    g_norm = np.sqrt(np.sum(g * g, axis=axes, keepdims=True))
    cap = 0.2 * np.maximum(np.sqrt(np.sum(p * p, axis=axes, keepdims=True)), 1e-3)
    expected = np.where(g_norm < cap, g, g * cap / g_norm)
    # (p - p_new recovers the update to within an ulp of p)
    np.testing.assert_allclose(_step(t, [p], [g])[0], expected, rtol=1e-14, atol=1e-15)


def test_sign_and_centralize_on_every_library() -> None:
    torch = pytest.importorskip("torch")
    g = np.array([[-2.0, 0.0, 0.5], [1.0, 3.0, 5.0]])
    for lib in (np.asarray, torch.tensor, jnp.asarray):
        (s,) = _step_any(uo.sign(), lib(g))
        np.testing.assert_array_equal(np.asarray(s), [[-1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
        (c,) = _step_any(uo.centralize(), lib(g))
        np.testing.assert_allclose(np.asarray(c), g - g.mean(axis=1, keepdims=True), atol=1e-15)


def _step_any(t: Any, g: Any) -> list[Any]:
    params = [g * 0]
    _, new = uo.update(uo.setup(t, params), params, [g])
    return [-x for x in new]


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda: uo.clip_by_norm(-1.0), ValueError, r"clip_by_norm: max_norm must be > 0, got -1"),
    (lambda: uo.clip_by_norm(0.0), ValueError, r"clip_by_norm: max_norm must be > 0, got 0"),
    (lambda: uo.clip_by_norm("1"), TypeError, r"max_norm must be a number or a schedule"),
    (lambda: uo.clip_by_block_rms(0.0), ValueError, r"threshold must be > 0, got 0"),
    (lambda: uo.adaptive_grad_clip(-0.1), ValueError, r"clipping must be >= 0, got -0.1"),
    (lambda: uo.adaptive_grad_clip(0.1, eps=-1e-3), ValueError, r"eps must be >= 0, got -0.001"),
    (lambda: uo.adaptive_grad_clip(weight_layout="tf"), ValueError,
     r"weight_layout must be one of \('optax', 'torch'\), got 'tf'"),
    (lambda: uo.adaptive_grad_clip(axis="0"), TypeError, r"axis must be None, an int or a tuple"),
    (lambda: uo.adaptive_grad_clip(axis=0, weight_layout="torch"), ValueError,
     r"give axis or weight_layout='torch', not both"),
    (lambda: uo.add_noise(eta=-1.0), ValueError, r"add_noise: eta must be >= 0, got -1"),
    (lambda: uo.add_noise(gamma=-0.5), ValueError, r"add_noise: gamma must be >= 0, got -0.5"),
    (lambda: uo.add_noise(seed=-1), ValueError, r"seed must be an integer in \[0, 2\*\*32\), "
     r"got -1"),
    (lambda: uo.add_noise(seed=2**32), ValueError, r"seed must be an integer .* got 4294967296"),
    (lambda: uo.add_noise(seed=1.5), TypeError, r"seed must be an integer .* got 1.5"),
    (lambda: uo.scale_by_trust_ratio(min_norm=-1.0), ValueError, r"min_norm must be >= 0"),
    (lambda: uo.scale_by_trust_ratio(trust_coefficient=-1.0), ValueError,
     r"trust_coefficient must be >= 0, got -1"),
    (lambda: uo.scale_by_trust_ratio(eps=-1.0), ValueError, r"eps must be >= 0, got -1"),
    (lambda: uo.scale_by_param_block_rms(min_scale=-1.0), ValueError,
     r"scale_by_param_block_rms: min_scale must be >= 0, got -1"),
    (lambda: uo.scale_by_param_block_norm(min_scale=-0.5), ValueError,
     r"min_scale must be >= 0, got -0.5"),
    (lambda: uo.apply_every(0), ValueError, r"apply_every: k must be .*1.*got 0"),
    (lambda: uo.apply_every(1.5), TypeError, r"apply_every: k must be .*got 1.5"),
])
def test_bad_hyperparameters_are_named(make: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        make()


def test_bad_leaves_and_schedules_raise_before_anything_changes() -> None:
    p = {"w": np.ones((2, 1, 1, 1, 1, 3)), "b": np.ones(3)}
    with pytest.raises(ValueError, match=r"params\['w'\] has shape \(2, 1, 1, 1, 1, 3\): optax's "
                                         r"unitwise norm takes leaves of up to 5 dimensions"):
        uo.setup(uo.adaptive_grad_clip(), p)
    with pytest.raises(ValueError, match=r"params\['b'\] has shape \(3,\): axis 1 is out of range"):
        uo.setup(uo.adaptive_grad_clip(axis=(0, 1)), {"b": np.ones(3)})
    # a schedule that reaches 0 at step 1: the step raises, params and state as they were
    clip = uo.chain(uo.clip_by_norm(lambda t: 1.0 - t), uo.sgd(lr=0.1, momentum=0.9))
    p = [np.ones(3)]
    state = uo.update_(uo.setup(clip, p), p, [np.ones(3)])
    before, buf = p[0].copy(), state.slots["trace.momentum_buffer"][0].copy()
    with pytest.raises(ValueError, match=r"max_norm must be > 0, got 0.0 \(the value of its "
                                         r"schedule at step 1\)"):
        uo.update_(state, p, [np.ones(3)])
    assert np.array_equal(p[0], before)
    assert np.array_equal(state.slots["trace.momentum_buffer"][0], buf)


def test_optax_protocol_needs_params_where_a_transform_reads_them() -> None:
    g = {"w": jnp.ones((2, 2))}
    for t in (uo.adaptive_grad_clip(), uo.scale_by_trust_ratio()):
        with pytest.raises(ValueError, match=rf"{t.name}: its update needs params"):
            t.update(g, t.init(g))


def test_a_noise_state_for_other_arrays_is_refused() -> None:
    torch = pytest.importorskip("torch")
    state = uo.setup(uo.add_noise(), [np.zeros(2)])
    p = [torch.zeros(2)]
    with pytest.raises(TypeError, match=r"add_noise: its state holds a numpy generator, the "
                                        r"updates are torch arrays"):
        uo.update_(state, p, [torch.ones(2)])
    assert torch.equal(p[0], torch.zeros(2))


# --- zero_nans, keep_params_nonnegative, apply_every: edges ----------------------------------


@pytest.mark.parametrize("lib", ["numpy", "torch", "jax", "jax-jit"])
def test_zero_nans_before_adam_is_optaxs_with_nan_gradients(lib: str) -> None:
    """A quarter of the gradients' entries NaN (an infinity kept as such): on every library,
    the reference path and the compiled loop, the same params as optax's chain."""
    if lib == "torch":
        torch = pytest.importorskip("torch")
        to, back = torch.tensor, (lambda t: t.numpy())
    else:
        to, back = (np.asarray, np.asarray) if lib == "numpy" else (jnp.asarray, np.asarray)
    rng = np.random.default_rng(4)
    start = _params(rng)
    ours = uo.chain(uo.zero_nans(), uo.adam(lr=LR))
    theirs = optax.chain(optax.zero_nans(), optax.adam(LR))
    params = {k: to(v.copy()) for k, v in start.items()}
    state = uo.setup(ours, params)
    update = jax.jit(uo.update) if lib == "jax-jit" else uo.update
    jparams = {k: jnp.asarray(v) for k, v in start.items()}
    jstate, step = theirs.init(jparams), jitted_optax_step(theirs)
    for _ in range(30):
        grads = _grads(rng)
        for g in grads.values():
            g[rng.random(g.shape) < 0.25] = np.nan
        state, params = update(state, params, {k: to(v) for k, v in grads.items()})
        jparams, jstate = step(jparams, jstate, {k: jnp.asarray(v) for k, v in grads.items()})
    for k in params:
        assert np.isfinite(back(params[k])).all()
        assert rel_diff(back(params[k]), jparams[k]) <= 1e-12, k


def test_keep_params_nonnegative_and_apply_every_in_place() -> None:
    """The compiled loop (many leaves) and the reference path write the same bits; a param
    that a step would take below 0 lands on 0 exactly; apply_every moves nothing between its
    period's last steps."""
    rng = np.random.default_rng(5)
    rule = uo.chain(uo.sgd(lr=0.5), uo.apply_every(3), uo.keep_params_nonnegative())
    start = [np.abs(rng.standard_normal(50)) for _ in range(20)]
    fast, ref = [p.copy() for p in start], [p.copy() for p in start]
    s_fast, s_ref = uo.setup(rule, fast), uo.setup(rule, ref)
    for t in range(6):
        grads = [rng.standard_normal(50) for _ in range(20)]
        before = [p.copy() for p in fast]
        with expect_compiled(1):
            s_fast = uo.update_(s_fast, fast, grads)
        with reference_path():
            s_ref = uo.update_(s_ref, ref, grads)
        for a, b in zip(fast, ref, strict=True):
            assert a.tobytes() == b.tobytes()
        if t % 3 != 2:
            assert all(np.array_equal(a, b) for a, b in zip(fast, before, strict=True))
        else:
            assert all((p >= 0).all() for p in fast)
            assert sum(int((p == 0).sum()) for p in fast) > 0


def test_keep_params_nonnegative_through_optaxs_protocol_only_after_a_step() -> None:
    """Alone, or after blocks that make no step, it would read optax's update (which optax
    adds) as the step uniopt subtracts: optax.chain(optax.sgd(0.1), it) stepped a parameter
    of 0.05 to -0.05. Refused there, naming the way that works; after a rule in a uo.chain it
    is optax's block."""
    p = {"w": jnp.asarray([0.05, 0.5, 2.0])}
    g = {"w": jnp.asarray([1.0, 1.0, -1.0])}
    for alone in (uo.keep_params_nonnegative(), uo.chain(uo.clip(1.0),
                                                          uo.keep_params_nonnegative())):
        tx = optax.chain(optax.sgd(0.1), alone)
        with pytest.raises(ValueError, match=r"reads its input as the step uniopt subtracts.*"
                                             r"uo\.chain\(rule, uo\.keep_params_nonnegative"):
            tx.update(g, tx.init(p), p)
    ours = uo.chain(uo.sgd(lr=0.1), uo.keep_params_nonnegative())
    theirs = optax.chain(optax.sgd(0.1), optax.keep_params_nonnegative())
    u, _ = ours.update(g, ours.init(p), p)
    v, _ = theirs.update(g, theirs.init(p), p)
    np.testing.assert_array_equal(optax.apply_updates(p, u)["w"], [0.0, 0.4, 2.1])
    np.testing.assert_array_equal(optax.apply_updates(p, u)["w"], optax.apply_updates(p, v)["w"])


def test_zero_nans_takes_real_params_only() -> None:
    """optax zeroes a complex number with a NaN part whole; taken as pairs of reals, the part
    would zero that part alone: refused, not stepped otherwise."""
    with pytest.raises(TypeError, match=r"zero_nans takes real params only"):
        uo.setup(uo.zero_nans(), [np.ones(2, np.complex128)])
