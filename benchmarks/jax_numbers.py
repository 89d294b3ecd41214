"""What hyperparameters that are values of a jitted call cost XLA:CPU, against constants of the
program: SGD with momentum written in plain JAX over S2's 50 arrays (``uniopt bench``'s
workload), its momentum and lr (a) compiled in as constants, as optax's are, (b) read from an
f32[9] argument, as uniopt's state carries them (``adjust`` without a recompilation), and (c)
as two scalar arguments. Params, momentum buffers and numbers donated, two gradient sets in
turn, ``block_until_ready`` after each step, the three run in alternating rounds in one process.

    python benchmarks/jax_numbers.py [--rounds 20] [--steps 25] [--workload S2]

Prints each one's median over rounds of a round's median step (ms) and its ratio to (a).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from uniopt.tools import bench


def _constants(p: Any, state: Any, g: Any) -> Any:
    m, h = state
    m = [gi + 0.9 * mi for gi, mi in zip(g, m, strict=True)]
    return [pi - 0.001 * mi for pi, mi in zip(p, m, strict=True)], (m, h)


def _array(p: Any, state: Any, g: Any) -> Any:
    m, h = state
    momentum, lr = h[0], h[1]
    m = [gi + momentum * mi for gi, mi in zip(g, m, strict=True)]
    return [pi - lr * mi for pi, mi in zip(p, m, strict=True)], (m, h)


def _scalars(p: Any, state: Any, g: Any) -> Any:
    m, h = state
    momentum, lr = h
    m = [gi + momentum * mi for gi, mi in zip(g, m, strict=True)]
    return [pi - lr * mi for pi, mi in zip(p, m, strict=True)], (m, h)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--workload", default="S2")
    a = ap.parse_args()
    w = bench._Workload(bench.WORKLOADS[a.workload])
    grads = [[jnp.asarray(g) for g in gs] for gs in w.grads]
    numbers: dict[str, Callable[[], Any]] = {
        "constants": lambda: jnp.zeros(9, jnp.float32),
        "f32[9] argument": lambda: jnp.array([0.9, 0.001] + [0.0] * 7, jnp.float32),
        "scalar arguments": lambda: (jnp.float32(0.9), jnp.float32(0.001)),
    }
    steps: dict[str, Callable[[], None]] = {}
    for (label, make), fn in zip(numbers.items(), (_constants, _array, _scalars), strict=True):
        update = jax.jit(fn, donate_argnums=(0, 1))
        carry = [[jnp.array(p) for p in w.params],
                 ([jnp.zeros_like(jnp.asarray(p)) for p in w.params], make())]
        steps[label] = bench.donated_steps(update, carry, grads, ready=0)
    rounds = bench._interleaved(steps, a.rounds, a.steps, warmup=50)
    base = statistics.median(rounds["constants"])
    for label, xs in rounds.items():
        m = statistics.median(xs)
        print(f"{a.workload} SGD, numbers as {label:17s} {m:.4f} ms  {m / base:.2f}x")


if __name__ == "__main__":
    main()
