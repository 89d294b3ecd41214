"""AdamW with global-norm clipping on parameters sharded over a (4, 2) mesh of 8 devices.

    python examples/jax_mesh.py

Runs on a CPU (8 host devices, set before JAX is imported) as on 8 accelerators. The state is
set up laid out as the parameters; the jitted, donated step keeps that layout, compiles once,
and reduces across devices only the global norm's scalars.
"""

import os

# (a long collective timeout: 8 devices sharing a few busy cores can be slow to meet)
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=600")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import uniopt as uo  # noqa: E402

mesh = jax.make_mesh((4, 2), ("data", "model"))
# every axis spelled out, as jit returns the layouts: the second step's arguments then look
# like the first's (P() for a matrix would cost jit one more dispatch entry, not a compile)
layout = {"w1": P("data", "model"), "w2": P("model", None), "b": P("model")}
shapes = {"w1": (64, 32), "w2": (32, 8), "b": (32,)}


def placed(tree):
    return {k: jax.device_put(v, NamedSharding(mesh, layout[k])) for k, v in tree.items()}


keys = jax.random.split(jax.random.key(0), 2 * len(shapes))
params = placed({k: jax.random.normal(keys[i], s) for i, (k, s) in enumerate(shapes.items())})
target = placed({k: jax.random.normal(keys[-1 - i], s) for i, (k, s) in enumerate(shapes.items())})

rule = uo.chain(uo.clip_by_global_norm(1.0), uo.adamw(lr=5e-2, weight_decay=1e-4))
state = uo.setup(rule, params)  # each slot laid out as its parameter


def loss(params):
    return sum(jnp.sum((params[k] - target[k]) ** 2) for k in params)


@jax.jit
def train_step(state, params):
    state, params = uo.update(state, params, jax.grad(loss)(params))
    return state, params


train_step = jax.jit(train_step, donate_argnums=(0, 1))
start = float(loss(params))
for _ in range(300):
    # one step at a time on a CPU: two steps in flight can starve each other of the threads
    # their collectives wait on where 8 host devices share 2 cores (seen to hang); on
    # accelerators let them queue
    state, params = jax.block_until_ready(train_step(state, params))

print(f"loss {start:.1f} -> {float(loss(params)):.2e}")
print("w1 and its exp_avg:", params["w1"].sharding.spec,
      state.slots["scale_by_adam.exp_avg"][1].sharding.spec)  # trainables: b, w1, w2
print("compiled steps:", train_step._cache_size())
