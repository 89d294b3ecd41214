"""``state_dtype`` under the optax protocol: ``uo.to_optax(rule, state_dtype=...)`` makes the
wider state in ``init``, and a rule stepping 16-bit params from such a state hands back wider
updates that ``optax.apply_updates`` turns into the params ``uo.update`` stores, bit for bit
(docs/optax.md, "float32 state for bfloat16 params"). The flax NNX ``Optimizer`` run is in
tests/test_jax_frameworks.py, in a fresh process as its others are."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import uniopt as uo

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy


def _problem(dtype: Any, steps: int, seed: int = 0) -> tuple[dict[str, Any], list[Any]]:
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(16, 12)), dtype),
              "b": jnp.asarray(rng.normal(size=12), dtype)}
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), dtype), params)
             for _ in range(steps)]
    return params, grads


def _bits(x: Any) -> np.ndarray:
    a = np.asarray(x)
    return a.view(f"uint{8 * a.dtype.itemsize}")


def _same_bits(a: Any, b: Any) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(_bits(x), _bits(y))


def _protocol_step(tx: Any) -> Any:
    @jax.jit
    def step(s: Any, p: Any, g: Any) -> tuple[Any, Any, Any]:
        u, s = tx.update(g, s, p)
        return s, optax.apply_updates(p, u), u

    return step


CASES = [
    (uo.adamw(lr=1e-2, weight_decay=1e-2), "float32", jnp.bfloat16),
    (uo.adamw(lr=1e-2, weight_decay=1e-2), "q8", jnp.bfloat16),
    (uo.sgd(lr=0.05, momentum=0.9, nesterov=True), "float32", jnp.float16),
    (uo.lion(lr=1e-3, weight_decay=0.1), "float32", jnp.bfloat16),
    # the last part writes the params itself (a finish), and keeps what rounding took
    (uo.chain(uo.adamw(lr=1e-3), uo.kahan_summation()), "float32", jnp.bfloat16),
]


@pytest.mark.parametrize("rule, state_dtype, dtype", CASES,
                         ids=["adamw-bf16", "adamw-q8", "sgd-f16", "lion", "kahan"])
def test_jitted_protocol_stores_what_update_stores(rule: Any, state_dtype: str,
                                                   dtype: Any) -> None:
    """25 jitted steps of 16-bit params: ``to_optax(rule, state_dtype=...)``'s updates added by
    ``optax.apply_updates`` give uo.update's params bit for bit, and the states agree. The
    updates are float32, as optax's own with ``mu_dtype=jnp.float32`` are (in the params' dtype
    they rounded the params twice, the update and then the sum: 595 of 4,096 bfloat16 params
    off uo.update's after 50 steps of AdamW)."""
    params, grads = _problem(dtype, 25)
    tx = uo.to_optax(rule, state_dtype=state_dtype)
    theirs = _protocol_step(tx)
    ours = jax.jit(uo.update)
    s, p = tx.init(params), params
    assert s.state_dtype == state_dtype
    r, q = uo.setup(rule, params, state_dtype=state_dtype), params
    for g in grads:
        s, p, u = theirs(s, p, g)
        r, q = ours(r, q, g)
        _same_bits(p, q)
    assert {x.dtype for x in jax.tree.leaves(u)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype(dtype)}
    _same_bits(s.slots, r.slots)


def test_optax_mu_dtype_hands_back_float32_updates_too() -> None:
    """What a porting user had: optax's AdamW with ``mu_dtype=jnp.float32`` on bfloat16 params
    keeps its second moment in bfloat16 and hands back float32 updates, which
    ``optax.apply_updates`` adds in float32 and rounds once. uniopt keeps both moments in
    float32 and forms ``1 - beta`` in double: not the same numbers, but close (docs/optax.md's
    numbers)."""
    params, grads = _problem(jnp.bfloat16, 25)
    theirs = optax.adamw(1e-2, weight_decay=1e-2, mu_dtype=jnp.float32)
    tx = uo.to_optax(uo.adamw(lr=1e-2, weight_decay=1e-2), state_dtype="float32")
    t, p = theirs.init(params), params
    s, q = tx.init(params), params
    assert t[0].nu["w"].dtype == jnp.bfloat16  # (optax's second moment: the params' dtype)
    step_t, step_s = _protocol_step(theirs), _protocol_step(tx)
    for g in grads:
        t, p, v = step_t(t, p, g)
        s, q, u = step_s(s, q, g)
    assert v["w"].dtype == u["w"].dtype == jnp.float32
    for a, b, c in zip(*map(jax.tree.leaves, (p, q, params)), strict=True):
        a32, b32, c32 = (np.asarray(x, np.float32) for x in (a, b, c))
        # (measured: 8% of the params differ, by 0.1-0.4% of the distance they moved)
        assert np.mean(np.abs(a32 - b32)) <= 0.02 * np.mean(np.abs(b32 - c32))


def test_inside_optax_chain() -> None:
    """``optax.chain(optax.clip_by_global_norm(1.0), uo.to_optax(uo.adamw(...),
    state_dtype="float32"))`` under jit: optax's clip on the bfloat16 gradients, then
    uo.update's step of the clipped ones, bit for bit, 20 steps."""
    params, grads = _problem(jnp.bfloat16, 20, seed=1)
    rule = uo.adamw(lr=1e-2, weight_decay=1e-2)
    clip = optax.clip_by_global_norm(1.0)
    tx = optax.chain(clip, uo.to_optax(rule, state_dtype="float32"))
    step = _protocol_step(tx)
    s, p = tx.init(params), params
    r, q = uo.setup(rule, params, state_dtype="float32"), params

    @jax.jit
    def ours(r: Any, q: Any, g: Any) -> tuple[Any, Any]:
        clipped, _ = clip.update(g, clip.init(q), q)
        return uo.update(r, q, clipped)

    for g in grads:
        s, p, _ = step(s, p, g)
        r, q = ours(r, q, g)
        _same_bits(p, q)
    _same_bits(s[1].slots, r.slots)


def test_a_state_from_setup_steps_so_through_the_protocol() -> None:
    """``rule.update`` of a state that ``uo.setup(..., state_dtype="float32")`` made (an equinox
    loop's ``init``) hands back the wide updates too; a block without a learning rate hands back
    its direction in the gradients' dtype, as without a state_dtype (a uniopt block after it in
    an optax.chain takes gradients of the params' dtype only); and a state without a
    state_dtype steps as it did: bfloat16 updates."""
    params, grads = _problem(jnp.bfloat16, 3)
    rule = uo.adam(lr=1e-2)
    s, p = uo.setup(rule, params, state_dtype="float32"), params
    r, q = s, params
    for g in grads:
        u, s = rule.update(g, s, p)
        p = optax.apply_updates(p, u)
        r, q = uo.update(r, q, g)
    assert u["w"].dtype == jnp.float32
    _same_bits(p, q)
    d, _ = uo.scale_by_adam().update(grads[0], uo.setup(uo.scale_by_adam(), params,
                                                        state_dtype="float32"), params)
    assert d["w"].dtype == jnp.bfloat16
    u, _ = rule.update(grads[0], uo.setup(rule, params), params)
    assert u["w"].dtype == jnp.bfloat16
    u, _ = uo.to_optax(rule).update(grads[0], uo.to_optax(rule).init(params), params)
    assert u["w"].dtype == jnp.bfloat16


def test_an_update_without_params_is_the_rules_step() -> None:
    """Without params (``tx.update(g, s)``, the gradients standing in for them) the update is
    the rule's step, not a difference of params: the gradients' ``g - d`` rounded, less ``g``,
    was 0 for SGD's 1e-3 step of a bfloat16 gradient of 256."""
    g = {"w": jnp.asarray([256.0, 1.0], jnp.bfloat16)}
    tx = uo.to_optax(uo.sgd(lr=1e-3), state_dtype="float32")
    u, _ = tx.update(g, tx.init(g))
    want = (-1e-3 * np.asarray(g["w"], np.float32)).astype(jnp.bfloat16)
    _same_bits(u, {"w": jnp.asarray(want)})


def test_float64_state_of_bfloat16_params() -> None:
    """``state_dtype="float64"`` (64-bit JAX): float64 updates, the params uo.update stores (a
    float64 result rounded once to bfloat16) bit for bit."""
    with jax.enable_x64(True):
        params, grads = _problem(jnp.bfloat16, 20, seed=2)
        rule = uo.adamw(lr=1e-2, weight_decay=1e-2)
        tx = uo.to_optax(rule, state_dtype="float64")
        step = _protocol_step(tx)
        s, p = tx.init(params), params
        r, q = uo.setup(rule, params, state_dtype="float64"), params
        for g in grads:
            s, p, u = step(s, p, g)
            r, q = jax.jit(uo.update)(r, q, g)
            _same_bits(p, q)
        assert u["w"].dtype == jnp.float64


def test_zeros_and_infinities_keep_their_bits() -> None:
    """A parameter the step leaves where it is goes back as a zero of its sign: ``p + u``
    keeps -0.0 and an infinity (``a - p`` gave +0.0, and NaN for an infinity). Beside them,
    ``1 - 0.3 * 1.1`` rounded once (0.66796875; the bfloat16 update rounded it twice:
    0.671875)."""
    p = [jnp.asarray([-0.0, jnp.inf, -jnp.inf, 0.0, 1.0], jnp.bfloat16)]
    g = [jnp.asarray([0.0, 0.0, 0.0, 0.0, 1.1], jnp.bfloat16)]
    rule = uo.sgd(lr=0.3)
    tx = uo.to_optax(rule, state_dtype="float32")
    u, _ = tx.update(g, tx.init(p), p)
    _, want = uo.update(uo.setup(rule, p, state_dtype="float32"), p, g)
    _same_bits(optax.apply_updates(p, u), want)
    assert _bits(want[0])[0] == _bits(jnp.asarray(-0.0, jnp.bfloat16))
    assert float(want[0][-1]) == 0.66796875


@pytest.mark.parametrize("bad", ["bfloat16", "float16", "f32", jnp.float32])
def test_bad_state_dtype_is_refused_by_name(bad: Any) -> None:
    with pytest.raises(ValueError, match="to_optax: state_dtype must be 'float32', 'float64' "
                                         f"or 'q8', got {re.escape(repr(bad))}"):
        uo.to_optax(uo.adamw(), state_dtype=bad)


def test_a_refused_state_dtype_is_said_at_init() -> None:
    """What setup refuses for a rule (8-bit slots of a rule with whole-tree parts) is refused
    by the wrapped ``init``, in setup's words."""
    tx = uo.to_optax(uo.prodigy(), state_dtype="q8")
    with pytest.raises(ValueError, match="state_dtype='q8'"):
        tx.init({"w": jnp.ones(3, jnp.bfloat16)})


def test_placeholder_params_keep_the_state_dtype() -> None:
    """``optax.tree.map_params`` sets a state up from placeholder params: the state it marks
    says the same state_dtype, so a state cast by it steps as the wrapped init's."""
    params, grads = _problem(jnp.bfloat16, 1)
    tx = uo.to_optax(uo.adamw(lr=1e-2), state_dtype="float32")
    state = tx.init(params)
    same = optax.tree.map_params(tx, lambda x: x, state)
    assert same.state_dtype == "float32"
    u, _ = tx.update(grads[0], same, params)
    assert u["w"].dtype == jnp.float32
