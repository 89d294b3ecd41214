"""Run by tests/test_distributed_jax.py in a fresh process: JAX takes its device count from
``XLA_FLAGS`` when it is imported, so 8 host devices (or a process of a ``jax.distributed``
group) need a process of their own. Prints one JSON line of findings; the test judges them.

    python distributed_jax_worker.py mesh
    python distributed_jax_worker.py process ID PORT
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any

# host devices on a few busy cores can be slow to meet in a collective: XLA's 40 s before it
# aborts the process is too short on a loaded test machine
SLOW_PEERS = "--xla_cpu_collective_call_terminate_timeout_seconds=600"

# which collectives a compiled step holds; a shape such as f64[] or (f64[], f64[]) follows "="
COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\([^)]*\)|\S+)\s+(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute)(-start)?\("
)


def collectives(hlo: str) -> list[tuple[str, str]]:
    """(op, result shape) of each collective in a compiled module's text."""
    return [(m["op"], m["shape"]) for m in COLLECTIVE.finditer(hlo)]


def scalar_shapes(shape: str) -> bool:
    """Whether an HLO result shape holds only scalars: ``f64[]``, ``f64[1]{0}`` or a tuple of
    them."""
    return all(re.fullmatch(r"[a-z0-9]+\[1?\](\{0?\})?", s.strip())
               for s in shape.strip("()").split(",") if s.strip())


def mesh_run() -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_enable_x64", True)
    import uniopt as uo

    # jax_log_compiles logs every XLA compilation by function name: the step's are counted
    compiles: list[str] = []

    class Compiles(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "XLA compilation of jit(sharded_step)" in record.getMessage():
                compiles.append(record.getMessage())

    logger = logging.getLogger("jax")
    logger.addHandler(Compiles())
    logger.propagate = False
    jax.config.update("jax_log_compiles", True)

    mesh = jax.make_mesh((4, 2), ("data", "model"))
    # a replicated matrix written P(None, None), as jit returns it: written P() (the same
    # layout), the second step's arguments would differ from the first's in spelling, one more
    # entry in jit's dispatch cache (JAX's, not a compilation: the compile count stays 1)
    layout = {"w": ((16, 8), P("data", "model")), "e": ((32, 6), P("data", None)),
              "b": ((8,), P("model")), "r": ((5, 3), P(None, None)), "s": ((), P())}
    shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in layout.items()}
    rng = np.random.default_rng(0)
    start = {k: rng.standard_normal(shape) for k, (shape, _) in layout.items()}
    grads = [{k: rng.standard_normal(shape) for k, (shape, _) in layout.items()}
             for _ in range(100)]

    def sharded(tree: dict[str, Any]) -> dict[str, Any]:
        return {k: jax.device_put(jnp.asarray(v), shardings[k]) for k, v in tree.items()}

    def run(rule: uo.Transform, steps: int, on_mesh: bool) -> dict[str, Any]:
        traces = [0]

        def sharded_step(state: uo.State, params: Any, g: Any) -> Any:
            traces[0] += 1
            return uo.update(state, params, g)

        place = sharded if on_mesh else (lambda t: {k: jnp.asarray(v) for k, v in t.items()})
        params = place(start)
        state = uo.setup(rule, params)
        slot_layout = {k: [str(getattr(getattr(x, "sharding", None), "spec", None)) for x in v]
                       for k, v in state.slots.items()}
        set_up = {k: [None if x is None else x.sharding for x in v] for k, v in state.slots.items()}
        jitted = jax.jit(sharded_step, donate_argnums=(0, 1))
        before = len(compiles)
        hlo = jitted.lower(state, params, place(grads[0])).compile().as_text()
        first = None
        for i in range(steps):
            given = params
            # one step at a time: two in flight can starve each other's collectives of
            # threads where 8 host devices share 2 cores (seen to hang)
            state, params = jax.block_until_ready(jitted(state, params, place(grads[i])))
            first = given["w"].is_deleted() if first is None else first
            if i == steps // 2:  # a new number, the same skeleton: the same compiled step
                state = uo.adjust(state, lr=5e-3)
        same = {k: bool(params[k].sharding.is_equivalent_to(shardings[k], len(layout[k][0])))
                for k in params} if on_mesh else {}
        slots_same = {
            name: [x is None or bool(x.sharding.is_equivalent_to(shardings[k], x.ndim))
                   for k, x in zip(sorted(params), xs, strict=True)]
            for name, xs in state.slots.items()} if on_mesh else {}
        # every slot as set up, those of another shape than their leaf's included
        slots_kept = {name: [x is None or bool(x.sharding.is_equivalent_to(was, x.ndim))
                             for x, was in zip(xs, set_up[name], strict=True)]
                      for name, xs in state.slots.items()} if on_mesh else {}
        return {"params": {k: np.asarray(v).tolist() for k, v in params.items()},
                "traces": traces[0], "cache": jitted._cache_size(),
                "compiles": len(compiles) - before, "collectives": collectives(hlo),
                "donated": first, "params_sharding_kept": same, "slots_sharding_kept": slots_same,
                "slots_at_setup": slot_layout, "slots_kept_from_setup": slots_kept}

    def numpy_run(rule: uo.Transform, steps: int) -> dict[str, Any]:
        """The eager NumPy reference path on the same data and the same adjust."""
        params = {k: v.copy() for k, v in start.items()}
        state = uo.setup(rule, params)
        for i in range(steps):
            state, params = uo.update(state, params, grads[i])
            if i == steps // 2:
                state = uo.adjust(state, lr=5e-3)
        return {k: np.asarray(v).tolist() for k, v in params.items()}

    def matrix_run(rule: uo.Transform, keys: tuple[str, ...], steps: int = 4) -> dict[str, Any]:
        """``steps`` jitted, donated steps on the mesh of the leaves ``keys``: the largest
        difference from the eager NumPy run, whether params and slots kept their layout, and
        the step's compilations."""
        params = {k: v for k, v in sharded(start).items() if k in keys}
        state = uo.setup(rule, params)
        set_up = {k: [None if x is None else x.sharding for x in v]
                  for k, v in state.slots.items()}
        ref = {k: start[k].copy() for k in keys}
        ref_state = uo.setup(rule, ref)

        def sharded_step(state: uo.State, params: Any, g: Any) -> Any:
            return uo.update(state, params, g)

        jitted = jax.jit(sharded_step, donate_argnums=(0, 1))
        before = len(compiles)
        for i in range(steps):
            g = {k: v for k, v in grads[i].items() if k in keys}
            state, params = jax.block_until_ready(jitted(state, params, sharded(g)))
            ref_state, ref = uo.update(ref_state, ref, g)
        return {"diff": max(float(np.max(np.abs(np.asarray(params[k]) - ref[k])
                                      / np.maximum(np.abs(ref[k]), 1e-300))) for k in keys),
                "params_kept": all(bool(params[k].sharding.is_equivalent_to(
                    shardings[k], len(layout[k][0]))) for k in keys),
                "slots_kept": all(x is None or bool(x.sharding.is_equivalent_to(was, x.ndim))
                                  for name, xs in state.slots.items()
                                  for x, was in zip(xs, set_up[name], strict=True)),
                "compiles": len(compiles) - before}

    adamw = uo.chain(uo.clip_by_global_norm(1.0), uo.adamw(lr=1e-2, weight_decay=1e-2))
    out: dict[str, Any] = {
        "devices": len(jax.devices()),
        # the unsharded run: the same jitted step on one device
        "adamw-clip": {"mesh": run(adamw, 100, True), "one": run(adamw, 100, False)["params"],
                       "numpy": numpy_run(adamw, 100)},
    }
    # a combinator's counters beside sharded params (placed as they are: compiled once)
    out["skip"] = {"mesh": run(uo.skip_nonfinite(uo.sgd(lr=1e-2)), 4, True)}
    out["automatic"] = automatic_run()
    # per-tensor norms (trust ratios) of sharded leaves
    for name, rule in {"lamb": uo.lamb(lr=1e-2, weight_decay=1e-2),
                       "lars": uo.lars(lr=1e-2, momentum=0.9, weight_decay=1e-3)}.items():
        out[name] = {"mesh": run(rule, 20, True), "numpy": numpy_run(rule, 20)}
    # a whole-tree rule's numbers (schedule-free's weight sum) and Adafactor's factors, of
    # other shapes than the (sharded) first leaf and matrices: set up, then stepped as the
    # eager NumPy run; or why not
    for name, rule in {"schedule-free": uo.schedule_free_adamw(lr=1e-2),
                       "adafactor": uo.adafactor(lr=1e-2)}.items():
        try:
            out[name] = {"mesh": run(rule, 6, True), "numpy": numpy_run(rule, 6)}
        except Exception as e:  # reported: the other scenarios still run
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    # the other rules whose slots or whole-tree numbers differ in shape from their leaves: how
    # set-up lays out each of those, or why it failed
    placed: dict[str, Any] = {}
    for name, rule in {"prodigy": uo.prodigy(), "momo": uo.momo(), "lbfgs": uo.scale_by_lbfgs(),
                       "plateau": uo.chain(uo.adam(), uo.reduce_on_plateau()),
                       "linesearch": uo.chain(uo.sgd(), uo.scale_by_backtracking_linesearch()),
                       "sm3": uo.sm3(), "novograd": uo.novograd(), "soap": uo.soap(),
                       "shampoo": uo.shampoo(), "galore": uo.galore(), "kron": uo.kron()}.items():
        try:
            state = uo.setup(rule, sharded(start))
        except Exception as e:  # reported: the other scenarios still run
            placed[name] = f"{type(e).__name__}: {e}"
            continue
        shapes = [start[k].shape for k in sorted(start)]  # trainables order
        other = [x for xs in state.slots.values() for x, shape in zip(xs, shapes, strict=True)
                 if x is not None and x.shape != shape]
        # a whole-tree state's numbers: scalars, L-BFGS's weights (b is the only 1-d leaf)
        other += [x for x in jax.tree.leaves(state.tree_states) if isinstance(x, jax.Array)
                  and (x.ndim == 0 or (x.ndim == 1 and x.shape != start["b"].shape))]
        placed[name] = [len(other), all(x.sharding.is_fully_replicated for x in other)]
    out["other-shapes"] = placed
    # whole-tree parts that make arrays of their own shapes (GaLore's projectors, Kron's
    # factors: they were made with the leaf's sharding, which does not divide them): 3 jitted
    # steps on the mesh against the same on one device (Kron's draws: the same key)
    beside: dict[str, Any] = {}

    def galore_moments(state: uo.State) -> list[bool]:
        # the moments of the leaves GaLore does not project (b and s, in trainables order
        # b, e, r, s, w) laid out as their leaf
        st = state.tree_states["scale_by_galore"]
        return [bool(st[m][i].sharding.is_equivalent_to(shardings[k], st[m][i].ndim))
                for m in ("exp_avg", "exp_avg_sq") for i, k in ((0, "b"), (3, "s"))]

    for name, rule in {"galore": uo.galore(lr=1e-2), "kron": uo.kron(lr=1e-2)}.items():
        try:
            ends = []
            for on_mesh in (True, False):
                params = sharded(start) if on_mesh else {k: jnp.asarray(v)
                                                         for k, v in start.items()}
                state = uo.setup(rule, params)
                moments = galore_moments(state) if on_mesh and name == "galore" else []
                for i in range(3):
                    g = sharded(grads[i]) if on_mesh else {k: jnp.asarray(v)
                                                           for k, v in grads[i].items()}
                    state, params = jax.jit(uo.update)(state, params, g)
                if moments:
                    out["galore-moments"] = moments + galore_moments(state)
                ends.append(params)
            beside[name] = max(float(np.max(np.abs(np.asarray(ends[0][k])
                                                   - np.asarray(ends[1][k])))) for k in start)
        except Exception as e:  # reported: the other scenarios still run
            beside[name] = f"{type(e).__name__}: {e}"
    out["beside-one-device"] = beside
    # rules whose per-leaf or whole-tree parts contract split axes or mix layouts (matrix
    # products, per-axis maxima, dot products of trees): on the explicit mesh they run on whole
    # arrays and hand each one back laid out as it came, as the eager NumPy run
    explicit: dict[str, Any] = {}
    for name, (rule, keys) in {
            "muon": (uo.muon(lr=2e-2), ("e", "r", "w")),
            "shampoo": (uo.shampoo(lr=1e-2), tuple(layout)),
            "soap": (uo.soap(lr=1e-2), tuple(layout)),
            "sm3": (uo.sm3(lr=1e-1), tuple(layout)),
            "lbfgs": (uo.chain(uo.scale_by_lbfgs(), uo.scale(-0.1)), tuple(layout))}.items():
        try:
            explicit[name] = matrix_run(rule, keys)
        except Exception as e:  # reported: the other scenarios still run
            explicit[name] = {"error": f"{type(e).__name__}: {e}"}
    # the line searches, whose state holds trees shaped as the params and whose step reads the
    # gradient it is given: 10 jitted steps on the mesh against the same on one device
    def search_run(make: Any, keeps: bool, on_mesh: bool) -> dict[str, Any]:
        target = {k: rng.standard_normal(start[k].shape) for k in ("w", "b")}

        def f(p: Any) -> Any:
            return (jnp.sum((p["w"] - target["w"]) ** 2 * (1 + jnp.arange(8)))
                    + jnp.sum((p["b"] - target["b"]) ** 4))

        vg = jax.value_and_grad(f)

        @jax.jit
        def search_step(p: Any, s: Any) -> Any:
            v, g = uo.value_and_grad_from_state(vg, p, s) if keeps else vg(p)
            s, p = uo.update(s, p, g, value=v, grad=g, value_fn=f)
            return p, s, v

        p = {k: jnp.asarray(start[k]) for k in ("w", "b")}
        if on_mesh:
            p = {k: jax.device_put(v, shardings[k]) for k, v in p.items()}
        s = uo.setup(make(), p)
        for _ in range(10):
            p, s, v = jax.block_until_ready(search_step(p, s))
        return {"params": {k: np.asarray(v).tolist() for k, v in p.items()},
                "kept": all(bool(p[k].sharding.is_equivalent_to(shardings[k], p[k].ndim))
                            for k in p) if on_mesh else True}

    for name, make, keeps in (
            ("lbfgs-zoom", uo.lbfgs_linesearch, True),
            ("backtracking", lambda: uo.chain(
                uo.sgd(lr=1.0), uo.scale_by_backtracking_linesearch(max_backtracking_steps=15)),
             False)):
        rng = np.random.default_rng(1)
        try:
            mesh_side = search_run(make, keeps, True)
            rng = np.random.default_rng(1)
            explicit[name] = {"mesh": mesh_side, "one": search_run(make, keeps, False)}
        except Exception as e:  # reported: the other scenarios still run
            explicit[name] = {"error": f"{type(e).__name__}: {e}"}
    out["explicit"] = explicit
    # 8-bit slots: refused for a leaf split over the mesh (its blocks would cross the shards);
    # a replicated tree steps under jit as on one device
    try:
        uo.setup(uo.adamw(lr=1e-2), sharded(start), state_dtype="q8")
        out["q8-sharded"] = "set up"
    except ValueError as e:
        out["q8-sharded"] = str(e)
    # replicated over the mesh (every axis spelled, as jit returns it) and committed to one
    # device: each 8-bit slot's codes and scales set up where the step hands them back (they
    # were made uncommitted on the default device: a second compilation), and kept so
    q8_places = {
        "replicated": lambda x: jax.device_put(x, NamedSharding(mesh, P(*[None] * x.ndim))),
        "device 1": lambda x: jax.device_put(x, jax.devices()[1])}
    q8_params = {name: {k: place(jnp.asarray(v, jnp.float32)) for k, v in start.items()}
                 for name, place in q8_places.items()}
    q8_states = {name: uo.setup(uo.adamw(lr=1e-2), p, state_dtype="q8")
                 for name, p in q8_params.items()}
    q8_set_up = {name: [x.sharding for x in jax.tree.leaves(s.slots)]
                 for name, s in q8_states.items()}
    placed_q8: dict[str, Any] = {
        name: {"placed": all(x.committed and x.sharding.is_equivalent_to(
                   q8_params[name]["w"].sharding, x.ndim) for x in jax.tree.leaves(s.slots)),
               "leaves": len(jax.tree.leaves(s.slots))}
        for name, s in q8_states.items()}

    plain = {k: np.asarray(v, np.float32) for k, v in start.items()}
    ref = uo.setup(uo.adamw(lr=1e-2), plain, state_dtype="q8")
    for name in q8_places:
        def sharded_step(state: uo.State, params: Any, g: Any) -> Any:  # (a cache of its own)
            return uo.update(state, params, g)

        jitted = jax.jit(sharded_step, donate_argnums=(0, 1))
        before = len(compiles)
        for i in range(5):
            g = {k: np.asarray(v, np.float32) for k, v in grads[i].items()}
            q8_states[name], q8_params[name] = jax.block_until_ready(
                jitted(q8_states[name], q8_params[name], g))
            if name == "replicated":
                ref = uo.update_(ref, plain, g)
        placed_q8[name].update(
            compiles=len(compiles) - before, cache=jitted._cache_size(),
            kept=all(x.sharding.is_equivalent_to(was, x.ndim) for x, was in zip(
                jax.tree.leaves(q8_states[name].slots), q8_set_up[name], strict=True)),
            diff=max(float(np.max(np.abs(np.asarray(q8_params[name][k]) - plain[k])))
                     for k in plain))
    out["q8-placement"] = placed_q8
    out["q8-replicated"] = placed_q8["replicated"]["diff"]
    return out


def automatic_run() -> dict[str, Any]:
    """A mesh of automatic axes (``Mesh(devices, names)``, not ``jax.make_mesh``'s explicit
    ones), params split along it: per rule, jit's cache entries after three jitted steps, with
    and without donation. The state's own arrays (the rule's numbers, a combinator's counters)
    were set up spelled ``P(None,)``; jit hands a replicated array back from such a mesh spelled
    ``P()``, and the second call was a second entry."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import uniopt as uo

    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    params = {"w": jax.device_put(jnp.ones((16, 8)), NamedSharding(mesh, P("data"))),
              "m": jax.device_put(jnp.ones((8, 6)), NamedSharding(mesh, P("data", "model"))),
              "b": jax.device_put(jnp.ones((8,)), NamedSharding(mesh, P("data")))}
    grads = {k: v * 0.1 for k, v in params.items()}
    rules = {"adam": uo.adam(lr=1e-2), "skip": uo.skip_nonfinite(uo.sgd(lr=1e-2)),
             "clip-adamw": uo.chain(uo.clip_by_global_norm(1.0), uo.adamw(lr=1e-2)),
             "plateau": uo.chain(uo.adam(lr=1e-2), uo.reduce_on_plateau()),
             # factors of another shape than the matrix: set up as the step lays them out
             "adafactor": uo.adafactor(lr=1e-2)}
    out: dict[str, Any] = {}
    for name, rule in rules.items():
        for donate in ((), (0, 1)):
            p = {k: v.copy() for k, v in params.items()}
            state = uo.setup(rule, p)
            step = jax.jit(lambda s, p, g: uo.update(s, p, g, value=1.0),
                           donate_argnums=donate)
            for _ in range(3):
                state, p = step(state, p, grads)
            out[f"{name}{' donated' if donate else ''}"] = step._cache_size()
    # eagerly, over the mesh: Mechanic's sums made with the leaves' rank-2 sharding raised
    p = {k: v.copy() for k, v in params.items()}
    state, p = uo.update(uo.setup(uo.mechanize(uo.adam(lr=1e-2)), p), p, grads)
    out["mechanize eager"] = bool(all(bool(jnp.isfinite(v).all()) for v in p.values()))
    return out


def process_run(rank: int, port: int) -> dict[str, Any]:
    """One process of two in a ``jax.distributed`` group on CPU (2 devices each): AdamW with
    global-norm clipping over a mesh of the four devices, each process feeding its shards."""
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=rank, initialization_timeout=60)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import uniopt as uo

    mesh = jax.make_mesh((4,), ("data",))
    # every axis spelled, as jit returns them: one entry in jit's dispatch cache
    layout = {"w": ((8, 3), P("data", None)), "b": ((4,), P("data")), "r": ((3,), P(None))}
    rng = np.random.default_rng(0)  # every process draws the same global arrays
    start = {k: rng.standard_normal(shape) for k, (shape, _) in layout.items()}
    grads = [{k: rng.standard_normal(shape) for k, (shape, _) in layout.items()}
             for _ in range(20)]

    def global_arrays(tree: dict[str, Any]) -> dict[str, Any]:
        # each process gives only the shards of its own devices
        return {k: jax.make_array_from_callback(v.shape, NamedSharding(mesh, layout[k][1]),
                                                lambda idx, v=v: v[idx])
                for k, v in tree.items()}

    rule = uo.chain(uo.clip_by_global_norm(1.0), uo.adamw(lr=1e-2, weight_decay=1e-2))
    params = global_arrays(start)
    state = uo.setup(rule, params)
    step = jax.jit(uo.update, donate_argnums=(0, 1))
    for g in grads:
        state, params = jax.block_until_ready(step(state, params, global_arrays(g)))
    # each process reads back its own shards
    local = {k: [(str(s.index), np.asarray(s.data).tolist()) for s in v.addressable_shards]
             for k, v in params.items()}
    ref_params = {k: jnp.asarray(v) for k, v in start.items()}
    ref_state = uo.setup(rule, ref_params)
    for g in grads:
        ref_state, ref_params = uo.update(ref_state, ref_params,
                                          {k: jnp.asarray(v) for k, v in g.items()})
    worst = 0.0
    for k, v in params.items():
        for s in v.addressable_shards:
            want = np.asarray(ref_params[k])[s.index]
            got = np.asarray(s.data)
            worst = max(worst, float(np.max(np.abs(got - want) / np.maximum(np.abs(want),
                                                                             1e-300))))
    out = {"rank": rank, "processes": jax.process_count(), "devices": len(jax.devices()),
           "local_devices": len(jax.local_devices()), "worst": worst, "shards": len(local["w"]),
           "cache": step._cache_size()}
    jax.distributed.shutdown()
    return out


if __name__ == "__main__":
    if sys.argv[1] == "mesh":
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 " + SLOW_PEERS
        print(json.dumps(mesh_run()))
    else:
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 " + SLOW_PEERS
        print(json.dumps(process_run(int(sys.argv[2]), int(sys.argv[3]))))
