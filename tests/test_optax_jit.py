"""Parity with optax, both under jax.jit, 300 steps on a random pytree; and a uniopt rule driven
by optax.chain / optax.apply_updates.

Gradients are a fixed random sequence, not a function of the parameters: with feedback, a
1-ulp difference in an oscillating optimizer (optimistic Adam, RMSprop) is amplified by the
dynamics until the runs separate, which would measure the problem's chaos, not the rules.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

import uniopt as uo  # noqa: E402
from helpers import jitted_optax_step, rel_diff  # noqa: E402

STEPS = 300


def _lr(kind: str):  # type: ignore[no-untyped-def]
    if kind == "constant":
        return 0.02, 0.02
    return (
        uo.schedules.cosine(0.05, steps=STEPS, floor=0.001),
        optax.cosine_decay_schedule(0.05, STEPS, alpha=0.001 / 0.05),
    )


CASES = {
    "adam": lambda lr, olr: (uo.adam(lr=lr), optax.adam(olr)),
    "adamw": lambda lr, olr: (
        uo.adamw(lr=lr, weight_decay=1e-2),
        optax.adamw(olr, weight_decay=1e-2),
    ),
    "sgd-momentum": lambda lr, olr: (uo.sgd(lr=lr, momentum=0.9), optax.sgd(olr, momentum=0.9)),
    "sgd-nesterov": lambda lr, olr: (
        uo.sgd(lr=lr, momentum=0.9, nesterov=True),
        optax.sgd(olr, momentum=0.9, nesterov=True),
    ),
    "optimistic_adam": lambda lr, olr: (uo.optimistic_adam(lr), optax.optimistic_adam_v2(olr)),
    "rmsprop": lambda lr, olr: (
        uo.rmsprop(lr=lr, alpha=0.9),
        optax.rmsprop(olr, decay=0.9, eps_in_sqrt=False),
    ),
    "adagrad": lambda lr, olr: (
        uo.adagrad(lr=lr, eps=1e-7, eps_in_sqrt=True),
        optax.adagrad(olr, initial_accumulator_value=0.0, eps=1e-7),
    ),
    # optax's defaults; eps = 0 takes the G = 0 branch on the zero-gradient leaf (see _run)
    "adagrad-optax-defaults": lambda lr, olr: (
        uo.adagrad(lr=lr, eps=1e-7, eps_in_sqrt=True, initial_accumulator_value=0.1),
        optax.adagrad(olr),
    ),
    "adagrad-eps-0": lambda lr, olr: (
        uo.adagrad(lr=lr, eps=0.0, eps_in_sqrt=True),
        optax.adagrad(olr, initial_accumulator_value=0.0, eps=0.0),
    ),
}


def _tree(seed: int = 0) -> dict:
    """A random pytree: nested dicts and lists, 0-d to 3-d leaves, some empty, a None; the
    parameter named "w" always exists (a row of it gets no gradient at first, see _run)."""
    rng = np.random.default_rng(seed)

    def node(depth: int):  # type: ignore[no-untyped-def]
        if depth == 0 or rng.random() < 0.3:
            shape = tuple(int(n) for n in rng.integers(0, 5, size=rng.integers(0, 4)))
            return rng.standard_normal(shape)
        if rng.random() < 0.5:
            return [node(depth - 1) for _ in range(rng.integers(1, 4))]
        return {f"k{i}": node(depth - 1) for i in range(rng.integers(1, 4))}

    return {"w": rng.standard_normal((8, 5)), "rest": node(3), "none": None}


def _run(ours, theirs, seed: int = 0) -> float:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    params = jax.tree.map(jnp.asarray, _tree(seed))
    state, o_params, o_state = uo.setup(ours, params), params, theirs.init(params)
    ours_step, theirs_step = jax.jit(uo.update), jitted_optax_step(theirs)
    worst = 0.0
    for k in range(STEPS):
        # drawn and checked in NumPy: an eager JAX operation per leaf and step costs more than
        # the jitted steps (and an XLA compile per new leaf shape)
        noise = jax.tree.map(lambda x: rng.standard_normal(x.shape), params)
        if k < 50:  # a row that gets no gradient at first (a frozen or unused embedding row)
            noise["w"][0] = 0.0
        grads = jax.tree.map(jnp.asarray, noise)
        state, params = ours_step(state, params, grads)
        o_params, o_state = theirs_step(o_params, o_state, grads)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(o_params), strict=True):
            a = np.asarray(a)
            assert np.all(np.isfinite(a))
            worst = max(worst, rel_diff(a, b))
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("lr_kind", ["constant", "cosine"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_optax_under_jit(name: str, lr_kind: str) -> None:
    seed = sorted(CASES).index(name) * 2 + (lr_kind == "cosine")  # a tree of its own
    with jax.enable_x64(True):
        err = _run(*CASES[name](*_lr(lr_kind)), seed=seed)
    assert err < 1e-12, err  # float64 both sides; operation order only


def test_a_wrong_hyperparameter_is_caught() -> None:
    with jax.enable_x64(True):
        err = _run(uo.adam(lr=0.02, betas=(0.9, 0.99)), optax.adam(0.02))
        # torch's eps placement against optax's: the parity test sees the difference
        placement = _run(
            uo.adagrad(lr=0.02, eps=1e-7), optax.adagrad(0.02, initial_accumulator_value=0.0)
        )
    assert err > 1e-6
    assert placement > 1e-9, placement


def test_uniopt_rule_inside_optax_chain_under_jit() -> None:
    with jax.enable_x64(True):
        lr, olr = _lr("cosine")
        mixed = optax.chain(optax.clip_by_global_norm(1.0), uo.adam(lr=lr))
        pure = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(olr))
        assert _run_optax(mixed, pure) < 1e-12


def _run_optax(a, b) -> float:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(2)
    pa = pb = jax.tree.map(jnp.asarray, _tree())
    sa, sb = a.init(pa), b.init(pb)
    fa, fb = jitted_optax_step(a), jitted_optax_step(b)
    worst = 0.0
    for _ in range(STEPS):
        g = jax.tree.map(lambda x: jnp.asarray(3 * rng.standard_normal(x.shape)), pa)
        pa, sa = fa(pa, sa, g)
        pb, sb = fb(pb, sb, g)
        for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
            worst = max(worst, float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0)))
    return worst


def test_a_schedule_of_ours_gets_the_count_as_optax_hands_it() -> None:
    """A callable that is not one of uniopt's schedules gets the step count as optax gives it,
    an int32 array under ``jax.jit``: a table indexed by it traces (it raised, the count was
    a float), and the parity of a count past 2**24 is exact without x64 (a float32 count read
    2**24 + 1 as even)."""
    jnp = jax.numpy
    params, grads = {"w": jnp.ones(2)}, {"w": jnp.ones(2)}
    table = jnp.linspace(1e-2, 1e-3, 200)
    odd = 2**24 + 1

    def at(tx: object, count: int) -> float:
        state = tx.init(params)  # type: ignore[attr-defined]
        leaves, treedef = jax.tree.flatten(state)
        leaves = [jnp.asarray(count, jnp.int32) if x.dtype == jnp.int32 and x.ndim == 0 else x
                  for x in leaves]
        updates, _ = jax.jit(tx.update)(grads, jax.tree.unflatten(treedef, leaves), params)
        return float(updates["w"][0])

    seen = []
    for sched in (lambda count: table[count],
                  lambda count: jnp.where(count % 2 == 1, 1.0, 0.0)):
        for count in (3, odd):  # (the table's index past its end is clamped, as optax's)
            ours, theirs = at(uo.sgd(lr=sched), count), at(optax.sgd(sched), count)
            assert ours == theirs, (count, ours, theirs)
            seen.append(ours)
    assert seen[3] == -1.0  # the odd count past 2**24: lr 1
