"""Free-running paths beside a peer, for the rule files written against optax, torch
packages and keras: ``from free_run import ...``.

Both sides run for ``STEPS`` steps in float64 on a small tree (a scalar, a (4,) vector, a
(5, 3) matrix), each computing its gradient at its own parameters (``tanh(p)/2`` plus noise
both share), so a wrong step anywhere shows in every later one. optax's path runs under one
``jax.jit`` (the caller holds ``jax.enable_x64``); torch's in float64 tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from helpers import rel_diff

SHAPES = [(), (4,), (5, 3)]
STEPS = 300
TOL = 1e-12  # float64 on both sides: operation order only, a few ulps a step


def grad_at(p: np.ndarray, noise: np.ndarray) -> np.ndarray:
    return np.asarray(np.tanh(p) * 0.5 + noise)


def start_of(seed: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """The starting params and every step's gradient noise."""
    rng = np.random.default_rng(seed)
    params = {f"x{i}": rng.standard_normal(s) for i, s in enumerate(SHAPES)}
    noises = [{k: 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}
              for _ in range(STEPS)]
    return params, noises


def run_ours(rule: uo.Transform, seed: int, steps: int = STEPS) -> list[dict[str, np.ndarray]]:
    params, noises = start_of(seed)
    state = uo.setup(rule, params)
    path = []
    for noise in noises[:steps]:
        state, params = uo.update(state, params, {k: grad_at(v, noise[k])
                                                  for k, v in params.items()})
        path.append(params)
    return path


def worst_of(ours: list[dict[str, np.ndarray]], theirs: list[dict[str, Any]]) -> float:
    return max(rel_diff(p[k], q[k]) for p, q in zip(ours, theirs, strict=True) for k in p)


def run_optax(jx: Any, tx: Any, seed: int, steps: int = STEPS) -> list[dict[str, Any]]:
    """optax's path: every step under one ``jax.jit`` (a ``lax.scan`` over the noises), each
    gradient computed at optax's own params."""
    import optax

    jnp = jx.numpy
    params, noises = start_of(seed)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    stacked = {k: jnp.asarray(np.stack([n[k] for n in noises[:steps]])) for k in params}

    def step(carry: Any, noise: Any) -> Any:
        p, s = carry
        g = {k: jnp.tanh(v) * 0.5 + noise[k] for k, v in p.items()}
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        return (p, s), p

    path = jx.device_get(jx.jit(lambda p, n: jx.lax.scan(step, (p, tx.init(p)), n)[1])(
        p, stacked))
    return [{k: np.asarray(path[k][i]) for k in path} for i in range(steps)]


def run_torch(make: Callable[[list[Any]], Any], seed: int,
           lr: Callable[[int], float] | None = None) -> list[dict[str, np.ndarray]]:
    torch = pytest.importorskip("torch")
    params, noises = start_of(seed)
    ts = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    opt = make(list(ts.values()))
    path = []
    for k, noise in enumerate(noises):
        if lr is not None:
            opt.param_groups[0]["lr"] = lr(k)
        for key, t in ts.items():
            t.grad = torch.as_tensor(grad_at(t.detach().numpy(), noise[key]))
        opt.step()
        path.append({key: t.detach().numpy().copy() for key, t in ts.items()})
    return path


def run_keras(jx: Any, keras: Any, opt: Any, seed: int,
              steps: int = STEPS) -> list[dict[str, Any]]:
    """keras's path (keras 3 on JAX, float64 variables: it casts its numbers to the variable's
    dtype): its ``stateless_apply`` under ``jax.jit``, one call per step."""
    params, noises = start_of(seed)
    variables = [keras.Variable(v.copy(), dtype="float64") for v in params.values()]
    opt.build(variables)

    @jx.jit
    def step(p: Any, s: Any, n: Any) -> Any:
        g = [jx.numpy.tanh(v) * 0.5 + x for v, x in zip(p, n, strict=True)]
        return opt.stateless_apply(s, g, p)

    p, s = [v.value for v in variables], [v.value for v in opt.variables]
    path = []
    for noise in noises[:steps]:
        p, s = step(p, s, list(noise.values()))
        path.append(dict(zip(params, p, strict=True)))
    return path


LR_SCHEDULE = uo.schedules.cosine(0.05, steps=STEPS, floor=0.001)


def optax_schedule(optax: Any) -> Any:
    return optax.cosine_decay_schedule(0.05, STEPS, alpha=0.001 / 0.05)
