"""The rest of optax's protocol: extra arguments (``value=loss``), ``inject_hyperparams`` under
``jax.jit``, ``optax.tree.map_params`` (placeholder params), a state rebuilt from any leaves.

Cheap by design: small trees, NumPy where the peer allows it, a handful of jit compiles.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import uniopt as uo
from helpers import rel_diff

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

def _problem(steps: int, seed: int = 1) -> tuple[dict[str, np.ndarray], list[Any]]:
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}
    return params, [{k: rng.normal(size=v.shape) for k, v in params.items()}
                    for _ in range(steps)]


def _jitted(tx: Any) -> Any:
    """One jitted optax step with the loss as the ``value`` extra argument."""
    @jax.jit
    def step(p: Any, s: Any, g: Any, value: Any) -> tuple[Any, Any]:
        u, s = tx.update(g, s, p, value=value)
        return optax.apply_updates(p, u), s

    return step


# --- extra arguments ------------------------------------------------------------------------


def test_extra_arguments_are_taken_and_ignored_as_optax_does() -> None:
    params, (g,) = jax.tree.map(jnp.asarray, _problem(1))
    rule = uo.adam(lr=0.1)
    plain, _ = rule.update(g, rule.init(params), params)
    extra, _ = rule.update(g, rule.init(params), params, value=1.0, key=None)
    for name in params:
        np.testing.assert_array_equal(plain[name], extra[name])
    # an optax chain hands its extra arguments to every member
    for tx in (optax.chain(optax.clip(10.0), rule), optax.with_extra_args_support(rule),
               uo.to_optax(rule)):
        u, _ = tx.update(g, tx.init(params), params, value=1.0)
        for name in params:
            np.testing.assert_allclose(u[name], plain[name], rtol=1e-6)
    # and the other way: an optax member of a uniopt chain that takes extra arguments gets the
    # step's (value=)
    def times(u: Any, s: Any, p: Any = None, *, value: Any, **kw: Any) -> Any:
        return jax.tree.map(lambda x: value * x, u), s

    rule = uo.chain(uo.sgd(lr=0.1), optax.GradientTransformationExtraArgs(lambda p: (), times))
    state, p = uo.update(uo.setup(rule, params), params, g, value=3.0)
    for name in params:
        np.testing.assert_allclose(p[name], params[name] - 0.3 * g[name], rtol=1e-6)


def test_to_optax_takes_only_uniopt_transforms() -> None:
    with pytest.raises(TypeError, match="to_optax: expected a uniopt transform, got 3"):
        uo.to_optax(3)


# --- optax.inject_hyperparams -------------------------------------------------------------


def test_inject_hyperparams_under_jit_follows_optax_and_the_plain_rule() -> None:
    """Our names, traced under jit; weight_decay starts at 0, so its block is kept for the
    values set later; changes to state.hyperparams reach the step."""
    params, grads = _problem(30)
    with jax.enable_x64(True):
        ours = optax.inject_hyperparams(uo.adamw)(lr=0.02, weight_decay=0.0)
        theirs = optax.inject_hyperparams(optax.adamw)(learning_rate=0.02, weight_decay=0.0)
        plain = uo.adamw(lr=0.02, weight_decay=0.0)  # on NumPy, no decay block
        jp = jax.tree.map(jnp.asarray, params)
        s, t, ps = ours.init(jp), theirs.init(jp), plain.init(params)
        step_s, step_t = _jitted(ours), _jitted(theirs)
        p, q, pp = jp, jp, params
        for k, g in enumerate(grads):
            if k == 10:
                s.hyperparams["lr"] = t.hyperparams["learning_rate"] = jnp.asarray(0.01)
            if k == 20:
                s.hyperparams["weight_decay"] = t.hyperparams["weight_decay"] = jnp.asarray(0.1)
            jg = jax.tree.map(jnp.asarray, g)
            p, s = step_s(p, s, jg, 0.0)
            q, t = step_t(q, t, jg, 0.0)
            if k < 10:
                u, ps = plain.update(g, ps, pp)
                pp = {n: pp[n] + u[n] for n in pp}
                assert max(rel_diff(p[n], pp[n]) for n in params) <= 1e-12
            assert max(rel_diff(p[n], q[n]) for n in params) <= 1e-12
    assert max(abs(np.asarray(p[n]) - params[n]).max() for n in params) > 0.1  # it moved


def test_inject_hyperparams_keeps_blocks_with_slots_and_takes_fixed_values_from_set_up() -> None:
    """sgd's momentum defaults to 0: as an array it keeps its buffer, and momentum set later
    acts as a momentum schedule does; adagrad's initial value, fixed at set-up, comes back
    traced and is taken from the state."""
    params, grads = _problem(12)
    with jax.enable_x64(True):
        sgd = optax.inject_hyperparams(uo.sgd)(lr=0.1)
        s = sgd.init(jax.tree.map(jnp.asarray, params))
        assert "trace.momentum_buffer" in s.inner_state.slots
        scheduled = uo.sgd(lr=0.1, momentum=lambda t: 0.0 if t < 6 else 0.9)
        ref, pr = uo.setup(scheduled, params), params
        step = _jitted(sgd)
        p = jax.tree.map(jnp.asarray, params)
        for k, g in enumerate(grads):
            if k == 6:
                s.hyperparams["momentum"] = jnp.asarray(0.9)
            p, s = step(p, s, jax.tree.map(jnp.asarray, g), 0.0)
            ref, pr = uo.update(ref, pr, g)
            assert max(rel_diff(p[n], pr[n]) for n in params) <= 1e-12

        ada = optax.inject_hyperparams(uo.adagrad)(lr=0.1, initial_accumulator_value=0.5)
        a = ada.init(p)
        _, a = _jitted(ada)(p, a, jax.tree.map(jnp.asarray, grads[0]), 0.0)
        assert a.inner_state.rule.initial_accumulator_value == 0.5


# --- optax.tree.map_params and states from any leaves ---------------------------------------


def test_map_params_maps_the_slots_of_a_rule_and_of_a_rule_in_an_optax_chain() -> None:
    params, (g,) = _problem(1)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
    for tx in (uo.adamw(lr=0.1), optax.chain(optax.scale_by_adam(), uo.sgd(lr=0.1, momentum=0.9))):
        _, state = tx.update(g, tx.init(params), params)
        moments = 4 if isinstance(tx, uo.Transform) else 6  # optax's mu and nu, our buffer
        half = optax.tree.map_params(tx, lambda x: x.astype(jnp.bfloat16), state)
        mapped = 0
        for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(half), strict=True):
            if y.dtype == jnp.bfloat16:  # a moment
                mapped += 1
                np.testing.assert_array_equal(np.asarray(x.astype(jnp.bfloat16)), y)
            else:  # the step counts, the rule's numbers: untouched
                assert x is y
        assert mapped == moments
        none = optax.tree.map_params(tx, lambda x: x, state, transform_non_params=lambda _: None)
        assert len(jax.tree.leaves(none)) == moments
        # a mapped state steps as the one it came from
        same = optax.tree.map_params(tx, lambda x: x, state)
        a, b = tx.update(g, same, params), tx.update(g, state, params)
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_placeholder_state_itself_does_not_step() -> None:
    params, (g,) = _problem(1)
    rule, made = uo.adam(), []

    def init(p: Any) -> Any:  # what map_params sets up with its placeholder
        made.append(rule.init(p))
        return made[-1]

    optax.tree.map_params(init, lambda x: x, rule.init(params))
    with pytest.raises(ValueError, match=r"this state was made for optax's placeholder params "
                                         r"\(by optax.tree.map_params\), not for arrays"):
        uo.update(made[0], params, g)


def test_a_state_from_any_leaves_shows_and_shapes() -> None:
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    tx = uo.chain(uo.adamw(lr=0.1), uo.trace())
    state = tx.init(params)
    shapes = jax.eval_shape(tx.init, params)
    assert jax.tree.structure(shapes) == jax.tree.structure(state)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(shapes)] == [
        (jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(state)]
    for other in (jax.tree.map(lambda x: None, state), shapes):
        assert repr(other).startswith("State(rule=chain(transforms=(adamw(lr=")
