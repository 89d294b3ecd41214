"""Running a uniopt rule beside an optax transformation: ``from optax_parity import ...``.

Both sides run free for ``steps`` steps on a small tree (a (5, 3) matrix, a (4,) vector, a
scalar), each computing its gradients at its own parameters (a bounded loss plus noise shared
by both), so a wrong step anywhere shows in every later one. optax runs under ``jax.jit`` in
float64 (the caller holds ``jax.enable_x64``); uniopt on NumPy (the reference path: three
leaves are too few for the compiled loop) unless ``on_jax`` (then on JAX arrays, under
``jax.jit``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import uniopt as uo
from helpers import rel_diff

SHAPES = {"w": (5, 3), "b": (4,), "s": ()}


def loss_of(params: Any) -> float:
    """The loss whose gradient (plus noise) the runs follow: ``sum(log cosh(p))/2``."""
    return float(sum(np.sum(np.log(np.cosh(np.asarray(v)))) for v in params.values()) / 2)


def _grads(params: Any, noise: Any) -> Any:
    return {k: np.asarray(np.tanh(np.asarray(v)) * 0.5 + noise[k]) for k, v in params.items()}


def run(ours: uo.Transform, theirs: Any, seed: int = 0, steps: int = 300,
        value: bool = False, on_jax: bool = False,
        grads_of: Callable[[Any, Any], Any] | None = None,
        shapes: dict[str, tuple[int, ...]] = SHAPES) -> float:
    """The largest relative difference (:func:`helpers.rel_diff`) of the params over every
    step and leaf. ``value``: both get the loss each step (``value=``); ``shapes``: the
    tree's leaves."""
    import jax
    import optax

    jnp = jax.numpy
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    mine: Any = {k: jnp.asarray(v) for k, v in params.items()} if on_jax else params
    state = uo.setup(ours, mine)
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    jstate = theirs.init(jparams)

    @jax.jit
    def step(p: Any, s: Any, g: Any, v: Any) -> tuple[Any, Any]:
        u, s = theirs.update(g, s, p, value=v) if value else theirs.update(g, s, p)
        return optax.apply_updates(p, u), s

    grads_of = grads_of or _grads
    ours_step = jax.jit(uo.update) if on_jax else uo.update
    worst = 0.0
    for _ in range(steps):
        noise = {k: 0.1 * rng.standard_normal(s) for k, s in shapes.items()}
        g = grads_of(mine, noise)
        jg = {k: jnp.asarray(v) for k, v in grads_of(jparams, noise).items()}
        if on_jax:
            g = {k: jnp.asarray(v) for k, v in g.items()}
        extra = {"value": loss_of(mine)} if value else {}
        state, mine = ours_step(state, mine, g, **extra)
        jparams, jstate = step(jparams, jstate, jg, loss_of(jparams) if value else 0.0)
        for k in mine:
            worst = max(worst, rel_diff(np.asarray(mine[k]), np.asarray(jparams[k])))
    return worst


def assert_libraries_agree(rule: uo.Transform) -> None:
    """Four steps of ``rule`` (with its options: masks, decay forms, conventions) on torch
    tensors, on JAX arrays under ``jax.jit``, and in place on NumPy, each equal to the pure
    NumPy run to 1e-12; the generic suite (tests/test_registry.py) runs each rule's registry
    example only."""
    import jax
    import pytest

    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    params = {"w": rng.normal(size=(5, 3)), "b": rng.normal(size=4), "s": np.array(0.3)}
    grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(4)]
    runs = {}
    for lib, conv in [("numpy", np.asarray), ("torch", torch.tensor),
                      ("jax", jax.numpy.asarray)]:
        p = {k: conv(v) for k, v in params.items()}
        state = uo.setup(rule, p)
        step = jax.jit(uo.update) if lib == "jax" else uo.update  # eager JAX: slow dispatches
        for g in grads:
            state, p = step(state, p, {k: conv(v) for k, v in g.items()})
        runs[lib] = {k: np.asarray(v) for k, v in p.items()}
    inplace = {k: v.copy() for k, v in params.items()}
    state = uo.setup(rule, inplace)
    for g in grads:
        state = uo.update_(state, inplace, g)
    runs["in place"] = inplace
    for lib, p in runs.items():
        for k in params:
            assert rel_diff(p[k], runs["numpy"][k]) < 1e-12, (lib, k)
