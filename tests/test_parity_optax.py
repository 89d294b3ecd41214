"""optimistic_adam against optax.optimistic_adam_v2, the semantics it promises.

optax computes in float32 under JAX's default configuration; every test here runs under
``jax.enable_x64`` so the comparison is float64 against float64 and a disagreement in the update
rule cannot hide behind float32 rounding. optax's steps run under ``jax.jit``, as its users run
them (eagerly, each of its operations is a dispatch of its own: most of this file's time).
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

import uniopt as uo  # noqa: E402
from helpers import jitted_optax_step, rel_diff  # noqa: E402

pytestmark = pytest.mark.slow  # every test runs hundreds of steps against optax


@pytest.fixture(autouse=True)
def _x64():  # type: ignore[no-untyped-def]
    with jax.enable_x64(True):
        yield


SHAPES = [(), (1,), (7,), (4, 5), (3, 2, 6)]
STEPS = 300


def _run(ours, theirs, seed: int) -> float:
    """Largest relative difference over all steps and leaves; each side runs free, its
    gradients computed at its own parameters (a bounded loss plus shared noise), so a wrong
    step anywhere shows up in every later one."""
    rng = np.random.default_rng(seed)
    params = {f"x{i}": rng.standard_normal(s) for i, s in enumerate(SHAPES)}
    state = uo.setup(ours, params)
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    jstate = theirs.init(jparams)
    theirs_step = jitted_optax_step(theirs)
    worst = 0.0
    for _ in range(STEPS):
        noise = {k: 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}
        grads = {k: np.tanh(v) * 0.5 + noise[k] for k, v in params.items()}
        theirs_now = {k: np.asarray(v) for k, v in jparams.items()}
        jgrads = {k: jnp.asarray(np.tanh(v) * 0.5 + noise[k]) for k, v in theirs_now.items()}
        state, params = uo.update(state, params, grads)
        jparams, jstate = theirs_step(jparams, jstate, jgrads)
        for k in params:
            worst = max(worst, rel_diff(params[k], jparams[k]))
    return worst


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("nesterov", [True, False])
def test_optimistic_adam_matches_optax_v2(seed: int, nesterov: bool) -> None:
    rng = np.random.default_rng(100 + seed)
    hp = dict(
        alpha=float(rng.uniform(0.1, 2.0)),
        beta=float(rng.uniform(0.0, 2.0)),
        b1=float(rng.uniform(0.5, 0.95)),
        b2=float(rng.uniform(0.9, 0.999)),
        eps=float(10 ** rng.uniform(-9, -6)),
        eps_root=float(rng.choice([0.0, 1e-8])),
        nesterov=nesterov,
    )
    lr = float(rng.uniform(1e-3, 1e-1))
    err = _run(uo.optimistic_adam(lr, **hp), optax.optimistic_adam_v2(lr, **hp), seed)
    # both sides are float64; differences are operation order only (a few ulps per step)
    assert err < 1e-12, err


def test_optimistic_adam_schedule_matches_optax_v2() -> None:
    lr = uo.schedules.cosine(0.05, steps=STEPS, floor=0.001)
    their_lr = optax.cosine_decay_schedule(0.05, STEPS, alpha=0.001 / 0.05)
    beta = lambda s: 0.5 + 0.5 * np.sin(s / 20.0) ** 2  # noqa: E731 - any callable is a schedule
    err = _run(
        uo.optimistic_adam(lr, alpha=0.5, beta=beta),
        optax.optimistic_adam_v2(their_lr, alpha=0.5, beta=1.0),
        seed=3,
    )
    # beta is scheduled on our side only: the runs must differ, proving the schedule is used
    assert err > 1e-6
    err = _run(
        uo.optimistic_adam(lr, alpha=0.5, beta=0.7),
        optax.optimistic_adam_v2(their_lr, alpha=0.5, beta=0.7),
        seed=3,
    )
    assert err < 1e-12, err


def test_wrong_hyperparameter_is_caught() -> None:
    err = _run(
        uo.optimistic_adam(0.01, b2=0.99), optax.optimistic_adam_v2(0.01, b2=0.999), seed=0
    )
    assert err > 1e-6
