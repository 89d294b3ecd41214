"""A jitted step on many leaves: what XLA is handed, read from the program itself.

The step does no host round trip (no callback, no outfeed/send), donating the state and params
(``donate_argnums=(0, 1)``) lets every slot and parameter be updated in its own buffer (each is
in the compiled program's ``input_output_alias`` and none is copied), the program grows by a
fixed number of operations per leaf (one call of each elementwise kernel, traced once), and a
many-leaf tree of mixed shapes and dtypes follows the NumPy run. Assertions are on program text
and numbers, never on time (benchmarks/jax_many_leaves.py times it).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

import uniopt as uo  # noqa: E402
from helpers import rel_diff  # noqa: E402
from uniopt import engine  # noqa: E402

# XLA's ways of leaving the device mid-program: a Python callback is a custom-call to one of
# these targets (jax.debug.callback, pure_callback, io_callback), the others are instructions
HOST_TARGETS = ("callback",)
HOST_OPS = ("outfeed", "infeed", "send", "recv", "send-done", "recv-done")


def _entry(text: str) -> str:
    return text[text.index("\nENTRY"):]


def host_round_trips(text: str) -> list[str]:
    """The instructions of compiled HLO ``text`` that reach the host."""
    found = []
    for line in text.splitlines():
        op = re.search(r"= \S+ ([\w-]+)\(", line)
        if op is None:
            continue
        if op.group(1) in HOST_OPS:
            found.append(line.strip())
        elif op.group(1) == "custom-call":
            target = re.search(r'custom_call_target="([^"]*)"', line)
            if target is None or any(t in target.group(1).lower() for t in HOST_TARGETS):
                found.append(line.strip())
    return found


def parameters(text: str) -> dict[int, str]:
    """The entry computation's parameters: number -> JAX's path of the argument."""
    out = {}
    for m in re.finditer(r"parameter\((\d+)\), metadata=\{op_name=\"([^\"]*)\"", _entry(text)):
        out[int(m.group(1))] = m.group(2).replace("\\'", "'")
    return out


def aliased(text: str) -> set[int]:
    """The parameters whose buffers an output of compiled HLO ``text`` reuses."""
    header = text.splitlines()[0]
    at = header.find("input_output_alias={")
    if at < 0:
        return set()
    depth, start, end = 0, at + len("input_output_alias="), len(header)
    for i in range(start, len(header)):  # to the brace that closes the map
        depth += {"{": 1, "}": -1}.get(header[i], 0)
        if depth == 0:
            end = i
            break
    # entries "{output index}: (parameter, {index within it}, may-alias)"
    return {int(p) for p in re.findall(r"\((\d+), \{", header[at:end])}


def copies(text: str) -> list[str]:
    """The copy instructions of the entry computation that move an array (not a scalar)."""
    return [line.strip() for line in _entry(text).splitlines()
            if re.search(r"= \S+\[[^\]]+\]\{[^}]*\} copy\(", line)]


def _tree(n: int, lib: Any = jnp, seed: int = 0) -> list[Any]:
    """``n`` small leaves of mixed shapes, float32 and float64 (x64) alternating in runs."""
    rng = np.random.default_rng(seed)
    shapes = [(3,), (2, 4), (), (5, 1), (1, 3, 2), (7,)]
    dtypes = [np.float32, np.float64]
    return [lib.asarray(rng.standard_normal(shapes[i % 6]), dtype=dtypes[(i // 5) % 2])
            for i in range(n)]


RULES = {
    "adamw": lambda: uo.adamw(lr=1e-2, weight_decay=1e-2),
    # momentum's outgoing u once made XLA copy every donated buffer (transforms/momentum.py)
    "sgd-nesterov": lambda: uo.sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "clip-adam": lambda: uo.chain(uo.clip_by_global_norm(1.0), uo.adam(lr=1e-2)),
    "rmsprop-centered": lambda: uo.rmsprop(lr=1e-2, momentum=0.5, centered=True),
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_a_jitted_step_stays_on_the_device_and_updates_every_buffer_in_place(name: str) -> None:
    with jax.enable_x64(True):
        params = _tree(engine.TRACE_ONCE)  # from there on each kernel is traced once
        state = uo.setup(RULES[name](), params)
        grads = [p * 0.5 for p in params]
        text = jax.jit(uo.update, donate_argnums=(0, 1)).lower(
            state, params, grads).compile().as_text()
    assert host_round_trips(text) == []
    names = parameters(text)
    # the state's children are (step, slots, tree states, numbers, counts): slots are state[1]
    slots = {i for i, path in names.items() if path.startswith("state[1]")}
    new_params = {i for i, path in names.items() if path.startswith("params")}
    n = engine.TRACE_ONCE
    assert len(slots) == n * len(state.slots) and len(new_params) == n
    assert slots | new_params <= aliased(text), "a donated slot or parameter is not reused"
    assert copies(text) == []


def test_the_checks_see_what_they_look_for() -> None:
    """A callback, a step without donation and a copied buffer are each reported."""
    def with_callback(x: Any) -> Any:
        jax.debug.callback(lambda v: None, x)
        return x * 2

    text = jax.jit(with_callback).lower(jnp.ones(3)).compile().as_text()
    assert host_round_trips(text)
    params = _tree(3)
    state = uo.setup(uo.adam(), params)
    text = jax.jit(uo.update).lower(state, params, params).compile().as_text()
    assert not aliased(text)
    # a donated buffer read after the output that reuses it is written: XLA copies it first
    text = jax.jit(lambda x: (x + 1, x[::-1] * 2), donate_argnums=0).lower(
        jnp.ones(8)).compile().as_text()
    assert aliased(text) == {0} and len(copies(text)) == 1


def _ops(lowered: Any) -> int:
    """The StableHLO operations of a lowered program (a call of a shared function is one)."""
    return len(re.findall(r"\bstablehlo\.\w+", lowered.as_text()))


def test_the_trace_holds_one_call_per_leaf_and_part() -> None:
    """From engine.TRACE_ONCE leaves on, each elementwise part's kernel is traced once and
    called on every leaf: the jaxpr grows by one equation per leaf and part (optax's AdamW:
    18), and the lowered program's own operations do not grow at all. XLA:CPU then inlines the
    calls and compiles a kernel for each output buffer (every leaf's new parameter and slots),
    so its compile time still grows with the leaves (the docs' page "JAX, and
    other array libraries", docs/jax.md)."""
    tx = optax.adamw(1e-2, weight_decay=1e-2)

    def optax_step(s: Any, p: Any, g: Any) -> Any:
        u, s = tx.update(g, s, p)
        return s, optax.apply_updates(p, u)

    rule = uo.adamw(lr=1e-2, weight_decay=1e-2)
    # the decay and Adam, both elementwise, and Adam's finish (the write of the new parameter)
    calls = len(rule.flat_parts) + (rule.flat_parts[-1].finish is not None)
    eqns, theirs, ops = [], [], []
    n = engine.TRACE_ONCE
    for k in (1, 2, 4):
        params = [jnp.ones(100, dtype=jnp.float32) for _ in range(k * n)]
        state = uo.setup(rule, params)
        eqns.append(len(jax.make_jaxpr(uo.update)(state, params, params).jaxpr.eqns))
        theirs.append(len(jax.make_jaxpr(optax_step)(tx.init(params), params, params).jaxpr.eqns))
        ops.append(_ops(jax.jit(uo.update).lower(state, params, params)))
    assert eqns[1] - eqns[0] == calls * n and eqns[2] - eqns[1] == 2 * calls * n
    assert theirs[1] - theirs[0] >= 5 * calls * n  # optax's, for scale: 18 a leaf
    assert ops[0] == ops[1] == ops[2]


def test_a_kernel_traced_once_gives_the_same_bits() -> None:
    """The calls compute what the operations written out leaf by leaf compute, bit for bit:
    bfloat16 leaves (computed in float32), host numbers fixed in the traced function (a
    schedule's value, Nesterov's switch), a global norm."""
    rules = [uo.chain(uo.clip_by_global_norm(1.0), uo.sgd(
        lr=uo.schedules.cosine(0.1, steps=10), momentum=0.9, nesterov=True))]
    for rule in rules:
        runs = []
        for once in (1, 10**9):
            saved, engine.TRACE_ONCE = engine.TRACE_ONCE, once
            try:
                leaves = _tree(18, np)
                params = [jnp.asarray(x, dtype=jnp.bfloat16) for x in leaves[::2]]
                params += [jnp.asarray(x, dtype=jnp.float32) for x in leaves[1::2]]
                state = uo.setup(rule, params)
                step = jax.jit(uo.update)
                for k in range(4):
                    state, params = step(state, params, [jnp.sin(p * (k + 1)) for p in params])
                runs.append([np.asarray(x, np.float64) for x in
                             [*params, *jax.tree.leaves(state.slots)]])
            finally:
                engine.TRACE_ONCE = saved
        assert all(np.array_equal(a, b) for a, b in zip(*runs, strict=True))


def test_many_leaves_of_two_dtypes_follow_numpy_under_jit() -> None:
    """36 leaves of six shapes, float32 and float64, through a global-norm clip and AdamW for
    20 jitted steps (each kernel traced once), against the NumPy run."""
    rule = uo.chain(uo.clip_by_global_norm(1.0), uo.adamw(lr=1e-2, weight_decay=1e-2))
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        params, ref = _tree(36), _tree(36, np)
        assert len(params) > engine.TRACE_ONCE
        state, ref_state = uo.setup(rule, params), uo.setup(rule, ref)
        step = jax.jit(uo.update, donate_argnums=(0, 1))
        for _ in range(20):
            grads = [rng.standard_normal(p.shape).astype(p.dtype) for p in ref]
            state, params = step(state, params, [jnp.asarray(g) for g in grads])
            ref_state, ref = uo.update(ref_state, ref, grads)
        for a, b in zip(params, ref, strict=True):
            assert a.dtype == b.dtype
            # XLA contracts multiply-adds and divides by reciprocals where NumPy rounds each
            # operation: a few ulps a step (float32's ulp is 1.2e-7); and on JAX the global
            # norm sums each leaf's squares in the leaf's dtype (NumPy: in float64), so the
            # clip factor every leaf shares carries float32's rounding of the float32 leaves'
            # part (5e-11 on the float64 leaves after 20 steps)
            assert rel_diff(a, b) <= (2e-5 if b.dtype == np.float32 else 1e-9)
