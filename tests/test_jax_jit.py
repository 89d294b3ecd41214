"""uniopt.update under jax.jit: the state is a JAX pytree, the step counter is an array, and a
run compiles once. (Part of the array-library issue; adjust() still recompiles, see README.)"""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import uniopt as uo  # noqa: E402

RULES = {
    "adam-cosine": lambda: uo.adam(lr=uo.schedules.cosine(1e-2, steps=100)),
    "sgd-momentum-dampening": lambda: uo.sgd(lr=0.1, momentum=0.9, dampening=0.1),
    "sgd-nesterov-wd": lambda: uo.sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "rmsprop-momentum-schedule": lambda: uo.rmsprop(lr=1e-2, momentum=lambda s: 0.5, centered=True),
    "adagrad": lambda: uo.adagrad(lr=0.1, lr_decay=1e-2),
    "adadelta": lambda: uo.adadelta(),
    "amsgrad": lambda: uo.adam(lr=1e-2, amsgrad=True),
    "optimistic_adam": lambda: uo.optimistic_adam(1e-2),
    "clip-global-adamw": lambda: uo.chain(uo.clip_by_global_norm(0.1), uo.adamw(lr=1e-2)),
}


def _tree(lib, dtype):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    tree = {"w": rng.standard_normal((3, 2)), "b": [rng.standard_normal(2), None, np.array(0.5)]}
    return jax.tree.map(lambda x: lib.asarray(x, dtype=dtype), tree)


def _grads(params, k):  # type: ignore[no-untyped-def]
    return jax.tree.map(lambda x: jnp.sin(x * (k + 1)) + 0.1, params)


@pytest.mark.parametrize("name", sorted(RULES))
def test_jit_compiles_once_and_matches_numpy(name: str) -> None:
    with jax.enable_x64(True):
        traces = []

        def step(state, params, grads):  # type: ignore[no-untyped-def]
            traces.append(1)
            return uo.update(state, params, grads)

        jitted = jax.jit(step, donate_argnums=(0, 1))
        params = _tree(jnp, jnp.float64)
        state = uo.setup(RULES[name](), params)
        ref = _tree(np, np.float64)
        ref_state = uo.setup(RULES[name](), ref)
        for k in range(100):
            grads = _grads(params, k)
            ref_grads = jax.tree.map(np.asarray, grads)
            state, params = jitted(state, params, grads)
            ref_state, ref = uo.update(ref_state, ref, ref_grads)
            for a, b in zip(uo.trainables(params), uo.trainables(ref), strict=True):
                # XLA may fuse and reorder float64 arithmetic: a few ulps per step
                assert np.max(np.abs(np.asarray(a) - b)) <= 1e-12 * max(1.0, np.max(np.abs(b)))
        assert len(traces) == 1, "the jitted update recompiled"
        assert int(state.step) == 100
        assert all(isinstance(x, jax.Array) for x in uo.trainables(params))


def test_untraceable_schedule_gets_a_clear_error() -> None:
    params = _tree(jnp, jnp.float32)
    state = uo.setup(uo.sgd(lr=lambda s: 0.1 * math.cos(s)), params)
    with pytest.raises(TypeError, match=r"could not be traced by jax.jit.*uniopt.schedules"):
        jax.jit(uo.update)(state, params, _grads(params, 0))
    # the same schedule is fine outside jit
    uo.update(state, params, _grads(params, 0))


def test_float32_jit_matches_eager() -> None:
    params = _tree(jnp, jnp.float32)
    state = uo.setup(uo.adam(lr=1e-2), params)
    eager_state, eager = state, params
    jitted = jax.jit(uo.update)
    for k in range(50):
        grads = _grads(params, k)
        state, params = jitted(state, params, grads)
        eager_state, eager = uo.update(eager_state, eager, _grads(eager, k))
    for a, b in zip(uo.trainables(params), uo.trainables(eager), strict=True):
        assert a.dtype == jnp.float32
        # XLA fuses the step into one expression; eager JAX rounds after every operation
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=50 * 2**-23)
