"""A jitted AdamW step on many small leaves (N x 100 float32), uniopt against optax: the time to
trace and lower it, to compile it, and the median of later steps.

    python benchmarks/jax_many_leaves.py [N ...] [--no-optax] [--floor]

XLA:CPU compiles each output buffer of the program on its own (every leaf's new parameter and
slots), so compile time grows with N whatever the traced program looks like; the docs' page "JAX,
and other array libraries" (docs/jax.md) has the numbers. ``--floor`` adds the program that does
no arithmetic at all: the same arguments (AdamW's state, params and gradients, state and params
donated), the state and params handed back as they came. What XLA takes to compile and run
that is what any step over one buffer per leaf and slot costs before its arithmetic.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import uniopt as uo


def _tree(n: int) -> list[jax.Array]:
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.standard_normal(100), dtype=jnp.float32) for _ in range(n)]


def _time(fn: Callable[..., Any], state: Any, params: Any, grads: Any,
          steps: int = 7) -> tuple[float, float, float]:
    """(trace and lower, compile, median later step) in seconds."""
    jitted = jax.jit(fn, donate_argnums=(0, 1))
    t = time.perf_counter()
    lowered = jitted.lower(state, params, grads)
    lower = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    state, params = compiled(state, params, grads)
    jax.block_until_ready(params)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, params = compiled(state, params, grads)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - t)
    return lower, compile_s, statistics.median(times)


def uniopt_step(n: int) -> tuple[float, float, float]:
    params = _tree(n)
    grads = [p * 0.5 for p in params]
    state = uo.setup(uo.adamw(lr=1e-3, weight_decay=1e-2), params)
    return _time(uo.update, state, params, grads)


def optax_step(n: int) -> tuple[float, float, float]:
    params = _tree(n)
    grads = [p * 0.5 for p in params]
    tx = optax.adamw(1e-3, weight_decay=1e-2)

    def step(state: Any, params: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return state, optax.apply_updates(params, updates)

    return _time(step, tx.init(params), params, grads)


def floor_step(n: int) -> tuple[float, float, float]:
    params = _tree(n)
    grads = [p * 0.5 for p in params]
    state = uo.setup(uo.adamw(lr=1e-3, weight_decay=1e-2), params)

    def step(state: Any, params: Any, grads: Any) -> tuple[Any, Any]:
        return state, params

    return _time(step, state, params, grads)


if __name__ == "__main__":
    sizes = [int(a) for a in sys.argv[1:] if a.isdigit()] or [1000, 3000]
    runs = [("uniopt", uniopt_step)] + ([] if "--no-optax" in sys.argv else
                                        [("optax", optax_step)])
    runs += [("floor", floor_step)] if "--floor" in sys.argv else []
    for n in sizes:
        for name, run in runs:
            lower, compile_s, step = run(n)
            print(f"{n:6d} leaves  {name:6s}: trace+lower {lower:6.2f} s, compile "
                  f"{compile_s:7.2f} s, step {step * 1e3:8.2f} ms", flush=True)
