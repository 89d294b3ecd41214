"""float16/bfloat16 parameters with float32 state: setup(..., state_dtype="float32")."""

from __future__ import annotations

import numpy as np
import pytest

import uniopt as uo


def _run(params, grads_fn, rule, steps, state_dtype, inplace=False):  # type: ignore[no-untyped-def]
    state = uo.setup(rule, params, state_dtype=state_dtype)
    for k in range(steps):
        if inplace:
            state = uo.update_(state, params, grads_fn(k))
        else:
            state, params = uo.update(state, params, grads_fn(k))
    return state, params


@pytest.mark.parametrize("inplace", [False, True])
def test_numpy_float16_with_float32_moments_matches_a_float32_run(inplace: bool) -> None:
    rng = np.random.default_rng(0)
    p32 = [rng.standard_normal(50).astype(np.float32)]
    big = [(300 * rng.standard_normal(50)).astype(np.float32) for _ in range(20)]  # g**2 > 65504
    rule = uo.adam(lr=1e-2)
    p16 = [p32[0].astype(np.float16)]
    s16, q16 = _run(p16, lambda k: [big[k].astype(np.float16)], rule, 20, "float32", inplace)
    if inplace:
        q16 = p16
    assert q16[0].dtype == np.float16
    assert all(s.dtype == np.float32 for v in s16.slots.values() for s in v)
    assert np.all(np.isfinite(s16.slots["scale_by_adam.exp_avg_sq"][0]))
    # the same run in float32 (gradients rounded to float16 as above): the float16 parameters
    # are that run rounded once per step, so within a few float16 ulps of it
    _, q32 = _run(
        [p32[0].astype(np.float16).astype(np.float32)],
        lambda k: [big[k].astype(np.float16).astype(np.float32)],
        rule,
        20,
        None,
    )
    np.testing.assert_allclose(q16[0].astype(np.float32), q32[0], rtol=0, atol=20 * 2**-10 * 4)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the point
def test_without_state_dtype_float16_moments_overflow() -> None:
    p = [np.zeros(4, np.float16)]
    s, _ = _run(p, lambda k: [np.full(4, 30_000, np.float16)], uo.adam(lr=1e-2), 1, None)
    assert not np.all(np.isfinite(s.slots["scale_by_adam.exp_avg_sq"][0]))  # why the option exists


def test_torch_bfloat16_and_jax_bfloat16() -> None:
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    for lib, dt in ((torch, torch.bfloat16), (jax.numpy, jax.numpy.bfloat16)):
        p = [lib.ones(8, dtype=dt)]
        s, q = _run(
            p,
            lambda k, lib=lib, dt=dt: [lib.full((8,), 400.0, dtype=dt)],
            uo.adam(lr=0.1),
            5,
            "float32",
        )
        assert q[0].dtype == dt
        assert all(str(x.dtype).endswith("float32") for v in s.slots.values() for x in v)
        assert abs(float(q[0][0]) - 0.5) < 0.02  # five Adam steps of lr 0.1 against the gradient


def test_bad_state_dtype() -> None:
    with pytest.raises(ValueError,
                       match="state_dtype must be 'float32', 'float64' or 'q8', got 'int8'"):
        uo.setup(uo.adam(), [np.ones(2)], state_dtype="int8")
