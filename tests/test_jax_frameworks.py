"""uniopt where JAX users train: a State is a JAX pytree whatever its leaves, flax NNX's
Optimizer, equinox's filter_jit loop, flax/orbax checkpoints, linen's TrainState; and uniopt's
blocks inside optax.chain mean what optax's do.

The framework tests each run in a fresh process: what breaks there (a State that JAX has not
been told about yet) is invisible in a test process where some earlier test already set one up.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from helpers import compilations, rel_diff

jax = pytest.importorskip("jax")
jnp = jax.numpy
optax = pytest.importorskip("optax")

# the shapes a state takes: slots or none, a schedule, optional blocks, nested members, an
# optax member's tree state (every rule is one of these to the pytree code)
RULES = {
    "rmsprop": uo.rmsprop(lr=0.01, centered=True, momentum=0.5),
    "adam": uo.adam(lr=uo.schedules.cosine(1e-2, steps=10), amsgrad=True),
    "chain": uo.chain(uo.clip_by_global_norm(1.0), uo.weight_decay(1e-2), uo.adam(lr=1e-2)),
    "optax-member": uo.chain(optax.clip_by_global_norm(1.0), uo.sgd(lr=0.1)),
}


def _fresh(code: str, timeout: float = 240) -> str:
    """Run ``code`` in a new Python process; its stdout."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("name", sorted(RULES))
def test_a_state_is_a_pytree_whatever_its_leaves(name: str) -> None:
    """tree_map to None, to ShapeDtypeStruct, to another dtype, and back: as every pytree."""
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    grads = {"w": jnp.full((3, 2), 0.5), "b": jnp.ones(2)}
    state = uo.setup(RULES[name], params)
    jitted, _ = jax.jit(uo.update)(state, params, grads)
    for st in (state, jitted):
        assert jax.tree.leaves(jax.tree.map(lambda x: None, st)) == []
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
                              st)
        assert jax.tree.structure(shapes) == jax.tree.structure(st)
        back = jax.tree.map(lambda _, x: x, shapes, st)
        half = jax.tree.map(lambda x: jnp.asarray(x, jnp.float16), st)
        assert jax.tree.structure(half) == jax.tree.structure(st)
        ref_state, ref = uo.update(st, params, grads)
        new_state, new = uo.update(back, params, grads)
        for a, b in zip(jax.tree.leaves((ref_state, ref)), jax.tree.leaves((new_state, new)),
                        strict=True):
            if st is jitted:  # the same leaves: the same step
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            else:
                # the set-up rule's numbers are Python floats; rebuilt from leaves, float32
                # (without x64): its bias corrections round otherwise, as the jitted run's do
                # (docs/jax.md: a few ulps; JAX 0.12's float32 power gives 1 here, 0.10's 0)
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=4 * 2.0**-23)


def test_blocks_inside_optax_chain_are_directions() -> None:
    """A block without a learning rate hands back its direction, as optax's do; a rule (or
    scale_by_lr) hands back the step to add. So uniopt's blocks and optax's mix in
    optax.chain, and optax.chain(uo.clip_by_global_norm(1.0), uo.adamw(...)) descends."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        params = [jnp.asarray(rng.standard_normal(5)), jnp.asarray(rng.standard_normal((2, 3)))]
        pairs = [
            (optax.chain(uo.clip_by_global_norm(1.0), uo.scale_by_adam(),
                         optax.scale_by_learning_rate(1e-2)),
             optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(),
                         optax.scale_by_learning_rate(1e-2))),
            (optax.chain(uo.clip_by_global_norm(1.0), uo.adamw(lr=1e-2, weight_decay=1e-2)),
             optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=1e-2))),
            (optax.chain(optax.scale_by_adam(), uo.scale_by_lr(1e-2)), optax.adam(1e-2)),
        ]
        for ours, theirs in pairs:
            p, q = params, params
            s, t = ours.init(p), theirs.init(q)
            for _ in range(50):
                g = [jnp.asarray(rng.standard_normal(x.shape)) * 3 for x in params]
                u, s = ours.update(g, s, p)
                v, t = theirs.update(g, t, q)
                p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
            for a, b in zip(p, q, strict=True):
                assert rel_diff(a, b) <= 1e-12


def test_nnx_optimizer_in_a_fresh_process() -> None:
    pytest.importorskip("flax")
    out = _fresh("""
        import jax, jax.numpy as jnp, numpy as np, optax
        from flax import nnx
        import uniopt as uo

        class MLP(nnx.Module):
            def __init__(self, rngs):
                self.l1, self.l2 = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 1, rngs=rngs)
            def __call__(self, x):
                return self.l2(jax.nn.relu(self.l1(x)))

        x = jax.random.normal(jax.random.PRNGKey(0), (32, 4))
        y = jnp.sum(x, 1, keepdims=True)

        def run(tx, x64, eager=False):
            with jax.enable_x64(x64):
                tx = tx if hasattr(tx, "init") else tx()  # optax builds dtypes under x64
                model = MLP(nnx.Rngs(0))
                if x64:
                    nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float64),
                                                   nnx.state(model)))
                opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

                def train(model, opt):
                    loss = lambda m: jnp.mean((m(x.astype(m.l1.kernel.dtype)) - y) ** 2)
                    grads = nnx.grad(loss)(model)
                    opt.update(model, grads)

                # eagerly, as flax's docstring steps it (the state's counter must advance)
                step = train if eager else nnx.jit(train)
                for _ in range(5 if eager else 100):  # (eager: the counter from step 2)
                    step(model, opt)
                return [np.asarray(a) for a in jax.tree.leaves(nnx.state(model, nnx.Param))]

        def diff(a, b):
            return max(float(np.max(np.abs(u - v)) / np.max(np.abs(v))) for u, v in zip(a, b))

        ours = run(uo.adamw(lr=1e-2, weight_decay=1e-2), False)
        print("f32", diff(ours, run(optax.adamw(1e-2, weight_decay=1e-2), False)))
        print("f64", diff(run(uo.adamw(lr=1e-2, weight_decay=1e-2), True),
                          run(optax.adamw(1e-2, weight_decay=1e-2), True)))
        print("eager", diff(run(uo.adamw(lr=1e-2, weight_decay=1e-2), True, True),
                            run(optax.adamw(1e-2, weight_decay=1e-2), True, True)))
        # uo.adjust on the Optimizer's state: the next jitted step takes its lr
        model = MLP(nnx.Rngs(1))
        opt = nnx.Optimizer(model, uo.sgd(lr=0.1), wrt=nnx.Param)

        traces = []

        @nnx.jit
        def ones_step(model, opt):
            traces.append(1)
            opt.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))

        ones_step(model, opt)
        nnx.update(opt.opt_state, nnx.state(uo.adjust(nnx.as_pure(opt.opt_state), lr=0.5)))
        before = np.asarray(model.l1.bias[...])
        ones_step(model, opt)
        print("adjusted", float(np.max(np.abs(np.asarray(model.l1.bias[...]) - before + 0.5))))
        # and assigned back as it comes (its numbers in NNX's OptArray, as the other leaves)
        opt.opt_state = uo.adjust(opt.opt_state, lr=0.25)
        before = np.asarray(model.l1.bias[...])
        ones_step(model, opt)
        print("assigned", float(np.max(np.abs(np.asarray(model.l1.bias[...]) - before + 0.25))))
        print("traces", len(traces))
        opt.opt_state = uo.adjust(opt.opt_state, lr=0.125)
        before = np.asarray(model.l1.bias[...])
        opt.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))  # eagerly
        print("eager_adjusted",
              float(np.max(np.abs(np.asarray(model.l1.bias[...]) - before + 0.125))))
        # a rule holding a combinator, assigned back: the members' states keep NNX's wrapping
        # (the next update raised "Cannot set key 3 on immutable node of type State")
        model = MLP(nnx.Rngs(1))
        opt = nnx.Optimizer(model, uo.chain(uo.clip_by_global_norm(1e6), uo.partition(
            {"x": uo.sgd(lr=0.1), "y": uo.sgd(lr=0.1)}, uo.by_path({"*bias*": "x", "*": "y"}))),
            wrt=nnx.Param)
        ones_step(model, opt)
        opt.opt_state = uo.adjust(opt.opt_state, **{"1.x.lr": 0.5})
        before = np.asarray(model.l1.bias[...])
        ones_step(model, opt)
        print("member_adjusted",
              float(np.max(np.abs(np.asarray(model.l1.bias[...]) - before + 0.5))))
        # a recipe by path: NNX's params are named "l1.kernel", "l1.bias"...
        recipe = uo.skip_nonfinite(uo.accumulate(uo.partition(
            {"d": uo.adamw(lr=1e-2, weight_decay=0.1), "n": uo.adam(lr=1e-2)},
            uo.by_path({"*bias*": "n", "*": "d"})), 2))
        theirs = lambda: optax.apply_if_finite(optax.MultiSteps(optax.multi_transform(
            {"d": optax.adamw(1e-2, weight_decay=0.1), "n": optax.adam(1e-2)},
            lambda p: jax.tree_util.tree_map_with_path(
                lambda path, _: "n" if "bias" in jax.tree_util.keystr(path) else "d", p)), 2,
            accumulator_dtype=jnp.float64), 10)
        print("recipe", diff(run(recipe, True), run(theirs, True)))
        # an optax member in uo.chain (docs/optax.md's recipe): it refused NNX's Params
        with_optax = uo.chain(optax.clip_by_global_norm(0.5), uo.adam(lr=1e-2))
        print("optax_member", diff(run(with_optax, True), run(
            lambda: optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2)), True)))
    """)
    got = dict(line.split() for line in out.splitlines())
    assert float(got["recipe"]) <= 1e-12, got
    assert float(got["optax_member"]) <= 1e-12, got
    # float64: the same arithmetic; float32: uniopt forms 1 - beta in double (optax in
    # float32, where 1 - 0.999 is off by 1.3e-5), which over 100 steps moves the params ~1e-5
    assert float(got["f64"]) <= 1e-12, got
    assert float(got["f32"]) <= 3e-5, got
    assert float(got["eager"]) <= 1e-12, got
    assert float(got["adjusted"]) <= 1e-7, got  # a step of 0.5, not the rule's 0.1
    assert float(got["assigned"]) <= 1e-7 and float(got["eager_adjusted"]) <= 1e-7, got
    assert got["traces"] == "1", got  # an adjust compiles nothing anew
    assert float(got["member_adjusted"]) <= 1e-7, got


def test_nnx_optimizer_with_a_float32_state_of_bfloat16_params() -> None:
    """``nnx.Optimizer(model, uo.to_optax(uo.adamw(...), state_dtype="float32"), wrt=nnx.Param)``
    on a bfloat16 model: float32 moments, float32 updates, and after 20 jitted steps the
    params NNX's functional style gets from ``uo.update`` with the same state_dtype, bit for
    bit (NNX's update is optax.apply_updates of the protocol's updates)."""
    pytest.importorskip("flax")
    out = _fresh("""
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        import uniopt as uo

        class MLP(nnx.Module):
            def __init__(self, rngs):
                self.l1 = nnx.Linear(4, 8, rngs=rngs, param_dtype=jnp.bfloat16)
                self.l2 = nnx.Linear(8, 1, rngs=rngs, param_dtype=jnp.bfloat16)
            def __call__(self, x):
                return self.l2(jax.nn.relu(self.l1(x)))

        x = jax.random.normal(jax.random.PRNGKey(0), (32, 4)).astype(jnp.bfloat16)
        y = jnp.sum(x, 1, keepdims=True)
        loss = lambda m: jnp.mean((m(x) - y).astype(jnp.float32) ** 2)
        rule = uo.adamw(lr=1e-2, weight_decay=1e-2)

        model = MLP(nnx.Rngs(0))
        opt = nnx.Optimizer(model, uo.to_optax(rule, state_dtype="float32"), wrt=nnx.Param)

        @nnx.jit
        def train(model, opt):
            return opt.update(model, nnx.grad(loss)(model))

        for _ in range(20):
            updates = train(model, opt)
        graphdef, params, rest = nnx.split(MLP(nnx.Rngs(0)), nnx.Param, ...)
        state = uo.setup(rule, params, state_dtype="float32")

        @jax.jit
        def step(state, params):
            grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest)))(params)
            return uo.update(state, params, grads)

        for _ in range(20):
            state, params = step(state, params)
        ours = [np.asarray(a) for a in jax.tree.leaves(nnx.state(model, nnx.Param))]
        want = [np.asarray(a) for a in jax.tree.leaves(params)]
        print("dtypes", ",".join(sorted({str(a.dtype) for a in ours})))
        print("updates", ",".join(sorted({str(a.dtype) for a in jax.tree.leaves(updates)})))
        slots = nnx.as_pure(opt.opt_state).slots.values()
        print("slots", ",".join(sorted({str(a.dtype) for v in slots for a in v})))
        print("differ", sum(int((a.view(np.uint16) != b.view(np.uint16)).sum())
                            for a, b in zip(ours, want)))
        print("moved", sum(int((a != np.asarray(b)).sum()) for a, b in
                           zip(ours, jax.tree.leaves(nnx.state(MLP(nnx.Rngs(0)), nnx.Param)))))
    """)
    got = dict(line.split() for line in out.splitlines())
    assert got["dtypes"] == "bfloat16" and got["updates"] == "float32", got
    assert got["slots"] == "float32", got
    assert got["differ"] == "0" and int(got["moved"]) > 20, got


def test_equinox_loop_in_a_fresh_process() -> None:
    pytest.importorskip("equinox")
    out = _fresh("""
        import jax, jax.numpy as jnp, numpy as np, optax, equinox as eqx
        import uniopt as uo
        jax.config.update("jax_enable_x64", True)
        key = jax.random.PRNGKey(0)
        model = eqx.nn.MLP(4, 1, 8, 2, key=key, dtype=jnp.float64)
        x = jax.random.normal(key, (32, 4), jnp.float64)
        y = jnp.sum(x, 1, keepdims=True)
        loss = lambda m: jnp.mean((jax.vmap(m)(x) - y) ** 2)
        traces = []

        def train(tx, functional=False):
            m = model
            params = eqx.filter(m, eqx.is_array)
            state = uo.setup(tx, params) if functional else tx.init(params)

            @eqx.filter_jit
            def step(m, state):
                traces.append(1)
                g = eqx.filter_grad(loss)(m)
                if functional:
                    p, static = eqx.partition(m, eqx.is_array)
                    state, p = uo.update(state, p, g)
                    return eqx.combine(p, static), state
                u, state = tx.update(g, state, eqx.filter(m, eqx.is_array))
                return eqx.apply_updates(m, u), state

            for _ in range(50):
                m, state = step(m, state)
            return jax.tree.leaves(eqx.filter(m, eqx.is_array))

        def diff(a, b):
            return max(float(np.max(np.abs(u - v)) / np.max(np.abs(v))) for u, v in zip(a, b))

        ref = train(optax.chain(optax.clip_by_global_norm(1.0),
                                optax.adamw(1e-2, weight_decay=1e-2)))
        traces.clear()
        print("protocol", diff(train(optax.chain(uo.clip_by_global_norm(1.0),
                                                 uo.adamw(lr=1e-2, weight_decay=1e-2))), ref))
        print("functional", diff(train(uo.chain(uo.clip_by_global_norm(1.0),
                                                uo.adamw(lr=1e-2, weight_decay=1e-2)), True), ref))
        print("traces", len(traces))
    """)
    got = dict(line.split() for line in out.splitlines())
    assert float(got["protocol"]) <= 1e-12 and float(got["functional"]) <= 1e-12, got
    assert got["traces"] == "2", got  # one compile per loop


@pytest.mark.parametrize("missed", [False, True], ids=["every-leaf", "a-leaf-missed"])
def test_flax_from_bytes_gives_a_state_that_steps_eagerly_and_jitted(missed: bool) -> None:
    """flax restores a msgpack's arrays as NumPy's: a uniopt State came back with NumPy slots,
    which an eager ``uo.update`` beside JAX params and gradients refused as "set up for other
    params" (a sweep's finding; a jitted step, and optax's protocol, took it). It now steps
    them as JAX arrays, as the optax protocol steps a TrainState flax restored whole: the run
    resumed eagerly, through the protocol and under jit is the run that never stopped (counts
    too, where a leaf missed a step before the save)."""
    serialization = pytest.importorskip("flax.serialization")
    params = {"w": jax.numpy.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jax.numpy.ones(3)}
    rule = uo.chain(uo.clip_by_global_norm(1.0), uo.adamw(lr=1e-2))
    grads = [{"w": params["w"] * (k + 1), "b": None if missed and k == 1 else params["b"] - k}
             for k in range(5)]
    step = jax.jit(uo.update)
    state, p = uo.setup(rule, params), params
    for g in grads[:2]:
        state, p = step(state, p, g)
    back = serialization.from_bytes(uo.setup(rule, params), serialization.to_bytes(state))
    assert isinstance(back.slots["scale_by_adam.exp_avg"][0], np.ndarray)  # (flax's way)
    assert (back.counts is not None) == missed
    never, eager, jitted, protocol = (state, p), (back, p), (back, p), (back, p)
    for g in grads[2:]:
        never = step(*never, g)
        eager = uo.update(*eager, g)
        jitted = step(*jitted, g)
        if not missed:  # (the optax protocol updates every leaf)
            updates, st = rule.update(g, protocol[0], protocol[1])
            protocol = (st, optax.apply_updates(protocol[1], updates))
    assert isinstance(eager[0].slots["scale_by_adam.exp_avg"][0], jax.Array)
    for got in (eager, jitted, *(() if missed else (protocol,))):
        for k in params:
            assert rel_diff(got[1][k], never[1][k]) <= 1e-6  # (eager and jitted: float32)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(never), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_flax_serialization_round_trips_an_8_bit_state_bit_for_bit() -> None:
    """A ``state_dtype="q8"`` state's slots (``quant.Q8``: codes and scales) were no type flax's
    serialization knew: ``to_bytes`` raised "can not serialize 'Q8' object", of the State and
    of a linen TrainState holding ``uo.to_optax(rule, state_dtype="q8")``'s."""
    serialization = pytest.importorskip("flax.serialization")
    train_state = pytest.importorskip("flax.training.train_state")
    params = {"w": jax.numpy.linspace(-1.0, 1.0, 12).reshape(4, 3)}
    rule = uo.adamw(lr=1e-2)
    state, _ = jax.jit(uo.update)(uo.setup(rule, params, state_dtype="q8"), params,
                                  {"w": params["w"] + 0.5})
    back = serialization.from_bytes(uo.setup(rule, params, state_dtype="q8"),
                                    serialization.to_bytes(state))
    held = state.slots["scale_by_adam.exp_avg"][0]
    assert type(back.slots["scale_by_adam.exp_avg"][0]) is type(held)
    assert int(back.step) == int(state.step) == 1
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ts = train_state.TrainState.create(apply_fn=None, params=params,
                                       tx=uo.to_optax(rule, state_dtype="q8"))
    assert serialization.from_bytes(ts, serialization.to_bytes(ts)).step == 0


def test_adjust_of_an_nnx_state_names_it_and_the_opt_state() -> None:
    """``uo.adjust(nnx.state(opt), ...)`` said "expected a uniopt State ... got State": flax's
    ``nnx.State``, named as uniopt's own."""
    nnx = pytest.importorskip("flax.nnx")
    opt = nnx.Optimizer(nnx.Linear(3, 1, rngs=nnx.Rngs(0)), uo.adamw(lr=1e-3), wrt=nnx.Param)
    with pytest.raises(TypeError, match=r"got flax\.nnx\..*State \(an nnx.Optimizer's uniopt "
                                        r"state is its opt_state: opt.opt_state = "
                                        r"uo.adjust\(opt.opt_state, lr=...\)\)"):
        uo.adjust(nnx.state(opt), lr=1e-4)
    opt.opt_state = uo.adjust(opt.opt_state, lr=1e-4)  # (as it says)
    assert float(opt.opt_state.rule.lr) == pytest.approx(1e-4)


def test_flax_from_bytes_refuses_a_target_whose_rule_has_another_form() -> None:
    """flax restored a state into a target whose rule reads its numbers in other places (a
    number became a schedule, or the reverse; adamw's state into adam's, of as many numbers)
    with no check: it stepped with betas=(0.0099, 0.8999), eps=0.999, and the reverse moved
    params by 0.82 in one step. ``uo.load`` refused the same. A target of the same form with
    other numbers still takes the saved numbers; a dict saved before the form was kept is
    checked by its count of numbers."""
    serialization = pytest.importorskip("flax.serialization")
    params = {"w": jax.numpy.ones((3, 2)), "b": jax.numpy.zeros(2)}
    grads = {"w": jax.numpy.full((3, 2), 0.5), "b": jax.numpy.ones(2)}
    fixed = uo.adamw(lr=1e-2, weight_decay=0.1)
    scheduled = uo.adamw(lr=uo.schedules.cosine(1e-2, steps=100), weight_decay=0.1)
    for saved_rule, target_rule in [(fixed, scheduled), (scheduled, fixed),
                                    (fixed, uo.adam(lr=1e-2))]:
        state, _ = uo.update(uo.setup(saved_rule, params), params, grads)
        target = uo.setup(target_rule, params)
        with pytest.raises(ValueError, match=r"the state dict is for adamw\(lr=.*the target's "
                                             r"rule is adam"):
            serialization.from_bytes(target, serialization.to_bytes(state))
    state, _ = uo.update(uo.setup(fixed, params), params, grads)
    back = serialization.from_bytes(uo.setup(uo.adamw(lr=0.5, weight_decay=0.1), params),
                                    serialization.to_bytes(state))
    assert float(back.rule.lr) == pytest.approx(1e-2)
    old = serialization.to_state_dict(state)
    del old["rule_form"]
    back = serialization.from_state_dict(
        uo.setup(uo.adamw(lr=0.5, weight_decay=0.1), params), old)
    assert float(back.rule.lr) == pytest.approx(1e-2)
    with pytest.raises(ValueError, match=r"is for a rule of 13 numbers; the target's rule is "
                                         r"adamw\(lr=cosine.*, of 11"):
        serialization.from_state_dict(uo.setup(scheduled, params), old)


def test_nnx_labels_and_optax_masks_of_params_leave_the_process_as_it_was() -> None:
    """A tree of NNX Params holding labels (``jax.tree.map`` over ``nnx.state(model,
    nnx.Param)``, how one labels an NNX model) given to ``uo.partition``, and
    ``optax.multi_transform`` of uniopt rules in an ``nnx.Optimizer`` (optax's masks put a
    MaskedNode into the Params), made nnx.Param a node of uniopt's trees for the rest of the
    process: they failed, and so did every later NNX Optimizer with a uniopt rule (a sweep's
    finding). Each now steps as the same recipe of optax's own rules, and a plain rule after
    them still does."""
    nnx = pytest.importorskip("flax.nnx")

    def model() -> Any:
        return nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
                              nnx.Linear(8, 1, rngs=nnx.Rngs(1)))

    def train(make_tx: Any) -> list[np.ndarray]:
        m = model()
        opt = nnx.Optimizer(m, make_tx(m), wrt=nnx.Param)

        @nnx.jit
        def step(m: Any, opt: Any) -> None:
            opt.update(m, nnx.grad(lambda m: jax.numpy.mean(
                (m(jax.numpy.ones((3, 4))) - 1.0) ** 2))(m))

        for _ in range(5):
            step(m, opt)
        return [np.asarray(x) for x in jax.tree.leaves(nnx.state(m, nnx.Param))]

    def labels(m: Any) -> Any:
        return jax.tree.map(lambda v: "a" if v.ndim == 2 else "b", nnx.state(m, nnx.Param))

    def by_ndim(params: Any) -> Any:
        return jax.tree.map(lambda v: "a" if v.ndim == 2 else "b", params)

    want = train(lambda m: optax.multi_transform(
        {"a": optax.adam(1e-2), "b": optax.sgd(1e-2)}, by_ndim))
    before = train(lambda m: uo.adam(lr=1e-2))
    for got in (train(lambda m: uo.partition({"a": uo.adam(lr=1e-2), "b": uo.sgd(lr=1e-2)},
                                             labels(m))),
                train(lambda m: optax.multi_transform(
                    {"a": uo.adam(lr=1e-2), "b": uo.sgd(lr=1e-2)}, by_ndim))):
        for x, y in zip(got, want, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    for x, y in zip(train(lambda m: uo.adam(lr=1e-2)), before, strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_state_set_up_from_nnx_params_is_placed_as_their_arrays() -> None:
    """NNX sets a rule up from its Params: the whole-tree scalars of a state (Prodigy's
    estimate, schedule-free's weight sum, Adafactor's and SOAP's...) asked the Param for its
    device and were made committed beside uncommitted params, so the second jitted step was a
    new signature and compiled again (a sweep's finding, 18 registry rules). Every array of
    every registry rule's state set up from uncommitted Params is uncommitted, as the params;
    an NNX training step compiles once."""
    nnx = pytest.importorskip("flax.nnx")
    from uniopt import registry

    m = nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), nnx.Linear(6, 6, rngs=nnx.Rngs(1)))
    params = nnx.state(m, nnx.Param)
    assert not any(x.committed for x in jax.tree.leaves(params))
    for name in registry.names():
        e = registry.entry(name)
        rule = e.rule(**e.example)
        if name == "muon":  # (matrices only: the biases to AdamW)
            rule = e.rule(**{**e.example, "others": "adamw"})
        state = uo.setup(rule, params)
        committed = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)
                     and x.committed]
        assert not committed, name
    for rule in (uo.prodigy(), uo.schedule_free_adamw(lr=1e-3), uo.adafactor(lr=1e-2)):
        opt = nnx.Optimizer(m, rule, wrt=nnx.Param)

        @nnx.jit
        def step(m: Any, opt: Any) -> None:
            opt.update(m, nnx.grad(lambda m: jax.numpy.mean(m(jax.numpy.ones((2, 4))) ** 2))(m))

        with compilations("step") as compiles:
            for _ in range(3):
                step(m, opt)
        assert len(compiles) == 1, rule.name


def test_an_nnx_optimizer_under_an_explicit_mesh_steps_as_optaxs() -> None:
    """Under ``jax.set_mesh`` of a mesh of explicit axes (``jax.make_mesh``'s default), every
    ``nnx.Optimizer`` with a uniopt rule failed at set-up: a zeros_like of a Param asked JAX to
    abstract the Param, which it refuses (a sweep's finding). The state is made of the Params'
    arrays; three jitted steps on 4 host devices are optax's AdamW's to float32 rounding."""
    pytest.importorskip("flax")
    out = _fresh("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, jax.numpy as jnp, numpy as np, optax
        from flax import nnx
        import uniopt as uo

        got = {}
        with jax.set_mesh(jax.make_mesh((2, 2), ("data", "model"))):
            for name, tx in (("optax", optax.adamw(1e-2)),
                             ("uniopt", uo.adamw(lr=1e-2, weight_decay=1e-4))):
                model = nnx.Linear(8, 16, rngs=nnx.Rngs(0))
                opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

                @nnx.jit
                def step(model, opt):
                    opt.update(model, nnx.grad(
                        lambda m: jnp.mean(m(jnp.ones((4, 8))) ** 2))(model))

                for _ in range(3):
                    step(model, opt)
                got[name] = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
        print(max(float(np.max(np.abs(a - b))) for a, b in zip(got["optax"], got["uniopt"])))
    """)
    assert float(out) < 1e-6


def test_an_equinox_module_that_passes_for_an_array_is_a_node() -> None:
    """A parametrisation (an equinox module whose ``__jax_array__`` computes its array from a
    field) is a node of the params whose field is stepped; the change that kept flax NNX's
    Variables leaves took every class with ``__jax_array__`` for one (the review's finding:
    "params['scale'] is a Positive, not an array"). Its field steps as the same array would
    outside it, and the optax protocol keeps the node."""
    eqx = pytest.importorskip("equinox")

    class Positive(eqx.Module):  # type: ignore[misc,name-defined]
        raw: Any

        def __jax_array__(self) -> Any:
            return jax.nn.softplus(self.raw)

    params = {"scale": Positive(jax.numpy.zeros(2)), "w": jax.numpy.ones(2)}
    assert [x.shape for x in uo.trainables(params)] == [(2,), (2,)]
    grads = {"scale": Positive(jax.numpy.full(2, 0.5)), "w": jax.numpy.full(2, 0.25)}
    state, p = uo.update(uo.setup(uo.adam(lr=0.1), params), params, grads)
    bare = {"scale": jax.numpy.zeros(2), "w": jax.numpy.ones(2)}
    _, want = uo.update(uo.setup(uo.adam(lr=0.1), bare), bare,
                        {"scale": jax.numpy.full(2, 0.5), "w": jax.numpy.full(2, 0.25)})
    np.testing.assert_array_equal(np.asarray(p["scale"].raw), np.asarray(want["scale"]))
    tx = uo.adam(lr=0.1)
    u, _ = tx.update(grads, tx.init(params), params)
    assert isinstance(optax.apply_updates(params, u)["scale"], Positive)


def test_nnx_functional_style_keeps_its_params(tmp_path: Any) -> None:
    """``nnx.split(model, nnx.Param, ...)`` gives a State of Params: ``uo.update`` handed the
    params back as bare arrays and the optax protocol its updates so (optax's are Params), so
    ``optax.apply_updates`` and a ``lax.scan`` carry changed structure and a jitted step got a
    second cache entry (a sweep's and a review's finding). Both hand back Params, as given;
    a scan of 5 steps is the loop of 5, and the protocol's run is uo.update's."""
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.numpy.ones((2, 8))
    rule = uo.adamw(lr=1e-2)

    def grad(p: Any) -> Any:
        return jax.grad(lambda p: jax.numpy.sum(nnx.merge(gd, p, rest)(x) ** 2))(p)

    @jax.jit
    def step(s: Any, p: Any) -> Any:
        return uo.update(s, p, grad(p))

    s, p = uo.setup(rule, params), params
    for _ in range(5):
        s, p = step(s, p)
    assert jax.tree.structure(p) == jax.tree.structure(params)
    assert step._cache_size() == 1
    scanned = jax.lax.scan(lambda c, _: (step(*c), None), (uo.setup(rule, params), params),
                           None, length=5)[0][1]
    st, q = rule.init(params), params
    for _ in range(5):
        u, st = rule.update(grad(q), st, q)
        q = optax.apply_updates(q, u)
    assert type(u["kernel"]) is type(params["kernel"])
    for a, b, c in zip(jax.tree.leaves(scanned), jax.tree.leaves(q), jax.tree.leaves(p),
                       strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(b), np.asarray(c), rtol=1e-6)


@pytest.mark.parametrize("kind", ["accumulate", "skip_nonfinite"])
def test_nnx_functional_style_steps_a_combinator_as_on_plain_arrays(kind: str) -> None:
    """``uo.accumulate`` and ``uo.skip_nonfinite`` over NNX Params in the functional style
    (split, setup, update): the second step handed the rule the combinator's gradients, JAX
    arrays, beside the Params ("a jax array but its parameter is a flax array"), or a Param to
    ``jnp.isfinite``; and the params came back held twice. They step as the same rule over the
    Params' plain arrays, Params in, Params out."""
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.numpy.ones((2, 4))

    def grad(p: Any) -> Any:
        return jax.grad(lambda p: jax.numpy.sum(nnx.merge(gd, p, rest)(x) ** 2))(p)

    rule = (uo.accumulate(uo.adamw(lr=1e-2), every=2) if kind == "accumulate"
            else uo.skip_nonfinite(uo.adamw(lr=1e-2)))
    s, p = uo.setup(rule, params), params
    plain = {k: v[...] for k, v in params.items()}
    t, q = uo.setup(rule, plain), plain
    for _ in range(4):
        g = grad(p)
        s, p = uo.update(s, p, g)
        t, q = uo.update(t, q, {k: v[...] for k, v in g.items()})
    assert jax.tree.structure(p) == jax.tree.structure(params)
    for k in plain:
        np.testing.assert_array_equal(np.asarray(p[k][...]), np.asarray(q[k]))


@pytest.mark.parametrize("make", [lambda: uo.lbfgs(lr=0.5), lambda: uo.sam(uo.sgd(lr=0.1))],
                         ids=["lbfgs", "sam"])
def test_nnx_functional_style_minimize_step_keeps_its_params(make: Any) -> None:
    """``uo.minimize_step`` over ``nnx.split``'s State of Params handed the new params back as
    bare arrays (``uo.update`` hands Params back), and L-BFGS's next step over Params took its
    own history for another library's ("its d holds jax arrays, where these params are flax
    arrays"). Params in, Params out, three steps, the numbers of the Params' plain arrays."""
    nnx = pytest.importorskip("flax.nnx")
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)

    def closure(p: Any) -> Any:
        return jax.value_and_grad(lambda p: jnp.sum((x @ p["kernel"] + p["bias"] - 1) ** 2))(p)

    _, params, _ = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.Param, ...)
    plain = nnx.to_pure_dict(params)
    s, p = uo.setup(make(), params), params
    t, q = uo.setup(make(), plain), plain
    for _ in range(3):
        s, p, _ = uo.minimize_step(s, p, closure)
        t, q, _ = uo.minimize_step(t, q, closure)
    assert jax.tree.structure(p) == jax.tree.structure(params)
    got = nnx.to_pure_dict(p)
    for k in plain:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(q[k]))


_X = np.linspace(-1.0, 1.0, 6, dtype=np.float32).reshape(2, 3)


def _nnx_loss(p: Any) -> Any:
    """An nnx.Linear(3, 2)'s loss, of a State of its Params or of a dict of arrays alike."""
    return jnp.sum((jnp.asarray(_X) @ p["kernel"] + p["bias"] - 1.0) ** 2)


def _nnx_hvp(v: Any) -> dict[str, Any]:
    """``_nnx_loss``'s Hessian times ``v`` (it is quadratic: one Hessian)."""
    x = jnp.asarray(_X)
    r = x @ v["kernel"] + v["bias"]
    return {"bias": 2 * jnp.sum(r, axis=0), "kernel": 2 * x.T @ r}


def _two_steps(e: Any, params: Any, grads: Any, how: str) -> Any:
    """Two steps of registry rule ``e`` from ``params`` with gradients ``grads`` (``how``:
    uo.update, uo.update_ or the optax protocol; a rule that evaluates the loss itself, by
    minimize_step and its closure); the params after them, or the error (type, message)."""
    rule = e.rule(**e.info.example)
    given = {"value": _nnx_loss(params), "grad": grads, "value_fn": _nnx_loss,
             "hvp": _nnx_hvp}
    extra = {k: given[k] for k in e.step_args}
    try:
        state = rule.init(params) if how == "protocol" else uo.setup(rule, params)
        for _ in range(2):
            if e.needs_closure and how == "update_":
                state, _ = uo.minimize_step_(state, params, jax.value_and_grad(_nnx_loss))
            elif e.needs_closure:
                state, params, _ = uo.minimize_step(state, params, jax.value_and_grad(_nnx_loss))
            elif how == "update_":
                state = uo.update_(state, params, grads, **extra)
            elif how == "update":
                state, params = uo.update(state, params, grads, **extra)
            else:
                updates, state = rule.update(grads, state, params, **extra)
                params = optax.apply_updates(params, updates)
    except Exception as ex:  # noqa: BLE001 (compared: a refusal is the same either way)
        return type(ex).__name__, str(ex)
    return params


# the rules a sweep found failing on Params (and Adam): the three entry points share one
# prologue, which every rule's uo.update tests; these take update_ and the protocol as well
_NNX_EVERY_ENTRY = {"adam", "galore", "kron", "lbfgs_linesearch", "dog", "dowg", "dpsgd",
                    "noisy_sgd", "sparse_adam"}


@pytest.mark.parametrize("name", uo.registry.names())
def test_every_rule_steps_nnx_params_as_their_arrays(name: str) -> None:
    """Every registry rule in NNX's functional style (``nnx.split``'s State of Params, and
    ``jax.grad``'s State of Params for its gradients), by ``uo.update``, ``uo.update_`` and
    the optax protocol (``minimize_step`` and ``minimize_step_`` for a rule that evaluates the
    loss itself), two steps: the same numbers, bit for bit, as on the Params' plain arrays,
    Params back, and no warning. A sweep's finding: the rules were handed the Params
    themselves, which pass for arrays but not everywhere, and GaLore, DoG and DoWG warned
    (NumPy took a Param for a dtype: "Implicit conversion of an array to a dtype is
    deprecated", an error in a later JAX), Kron, DP-SGD and noisy SGD refused ("its state
    holds a jax generator, the updates are flax arrays"), Sparse Adam failed (a Param's
    ``!=`` is no array's) and the zoom line search did not differentiate ``value_fn`` ("on
    flax arrays value_fn must return (loss, grads)"), through every entry point. A rule's
    refusal (Muon's of the bias) is the same either way; update_ is refused where a rule keeps
    slots (JAX's arrays are immutable)."""
    nnx = pytest.importorskip("flax.nnx")
    e = uo.registry.entry(name)
    want: dict[str, Any] = {}
    for how in ("update", "update_", "protocol") if name in _NNX_EVERY_ENTRY else ("update",):
        # (a model of its own each time: update_ sets its Params)
        _, params, _ = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.Param, ...)
        grads = jax.grad(_nnx_loss)(params)  # (a State of Params, as params)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = _two_steps(e, params, grads, how)
        if how == "update_" and isinstance(got, tuple) and got[1].startswith(
                "update_ cannot write"):
            continue  # (a rule that keeps slots: JAX's arrays are immutable)
        plain = "protocol" if how == "protocol" else "update"
        if plain not in want:
            want[plain] = _two_steps(e, nnx.to_pure_dict(params), nnx.to_pure_dict(grads),
                                     plain)
        if isinstance(want[plain], tuple):
            assert got == want[plain], (how, got)
            continue
        assert not isinstance(got, tuple), (how, got)
        if how == "update_":
            got = params
        assert jax.tree.structure(got) == jax.tree.structure(grads), how
        got = nnx.to_pure_dict(got)
        for k in got:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[plain][k]),
                                          err_msg=how)


@pytest.mark.parametrize("name", ["sparse_adam", "kron", "galore", "noisy_sgd"])
def test_nnx_gradients_beside_bare_arrays_step_as_their_arrays(name: str) -> None:
    """Params given as a State of bare arrays, gradients as ``jax.grad``'s State of Params (a
    mix the engine lets through): each gradient is stepped as the array its Param holds, as
    on plain arrays, bit for bit and without a warning (they reached the rules as Params:
    Sparse Adam's ``!=``, Kron's and noisy SGD's "the updates are flax arrays", GaLore's
    NumPy dtype warning)."""
    nnx = pytest.importorskip("flax.nnx")
    _, params, _ = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.Param, ...)
    grads = jax.grad(_nnx_loss)(params)
    bare = nnx.State(nnx.to_pure_dict(params))
    rule = getattr(uo, name)()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, got = uo.update(uo.setup(rule, bare), bare, grads)
        updates, _ = rule.update(grads, rule.init(bare), bare)
    plain, pgrads = nnx.to_pure_dict(params), nnx.to_pure_dict(grads)
    _, want = uo.update(uo.setup(rule, plain), plain, pgrads)
    want_u, _ = rule.update(pgrads, rule.init(plain), plain)
    for k in plain:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
        np.testing.assert_array_equal(np.asarray(updates[k][...]), np.asarray(want_u[k]))


def test_nnx_params_beside_committed_gradients_step_eagerly() -> None:
    """NNX's Params hold uncommitted arrays; a jitted ``jax.grad`` of a batch put with
    ``jax.device_put`` hands committed gradients on the same device. The gradient device
    check of other array libraries took the Params for one and refused ("is on cpu:0, its
    parameter on None"); NNX's arrays are JAX's, and placed by JAX."""
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    grads = jax.tree.map(lambda v: jax.device_put(jax.numpy.ones_like(v), jax.devices()[0]),
                         params)  # (committed)
    rule = uo.adam(lr=1e-2)
    _, new = uo.update(uo.setup(rule, params), params, grads)
    updates, _ = rule.update(grads, rule.init(params), params)
    for a, u, b in zip(jax.tree.leaves(new), jax.tree.leaves(updates), jax.tree.leaves(params),
                       strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b) - 1e-2, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(u), -1e-2, rtol=1e-6)


def test_an_nnx_optimizer_resumes_from_uo_load(tmp_path: Any) -> None:
    """``opt.opt_state = uo.load(path, like=opt.opt_state)`` loaded bare arrays where NNX
    keeps OptArray variables, and the next ``opt.update`` failed inside flax ("Cannot set key
    0 on immutable node of type State"; a sweep's finding). They come back held as like's,
    as uo.adjust hands them back, and the resumed run is the run that never stopped."""
    nnx = pytest.importorskip("flax.nnx")

    def make() -> tuple[Any, Any]:
        m = nnx.Linear(8, 2, rngs=nnx.Rngs(0))
        rule = uo.chain(uo.clip_by_global_norm(1.0), uo.adamw(lr=1e-2, weight_decay=0.1))
        return m, nnx.Optimizer(m, rule, wrt=nnx.Param)

    def first(step: Any, m: Any, opt: Any, xs: list[Any]) -> None:
        for x in xs:
            step(m, opt, x)

    _nnx_resumes(nnx, make, first, str(tmp_path / "opt.uo"))


def _nnx_resumes(nnx: Any, make: Any, first: Any, path: str) -> Any:
    """Three steps of ``make()``'s optimizer (``first(step, m, opt, xs)``), its opt_state
    saved to ``path`` and loaded into a fresh ``make()``'s, and three more steps of both:
    the resumed run is the run that never stopped, bit for bit. Returns both optimizers."""

    @nnx.jit
    def step(m: Any, opt: Any, x: Any) -> None:
        opt.update(m, nnx.grad(lambda m: jax.numpy.mean((m(x) - 1.0) ** 2))(m))

    xs = [jax.numpy.full((4, 8), 0.1 * (k + 1)) for k in range(6)]
    m, opt = make()
    first(step, m, opt, xs[:3])
    uo.save(path, opt.opt_state)
    m2, opt2 = make()
    nnx.update(m2, nnx.state(m, nnx.Param))
    opt2.opt_state = uo.load(path, like=opt2.opt_state)
    for x in xs[3:]:
        step(m, opt, x)
        step(m2, opt2, x)
    assert int(opt2.opt_state.step) == 6
    for a, b in zip(jax.tree.leaves(nnx.state(m2, nnx.Param)),
                    jax.tree.leaves(nnx.state(m, nnx.Param)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return opt, opt2


def test_an_adjusted_nnx_optimizer_resumes_from_uo_load(tmp_path: Any) -> None:
    """An NNX Optimizer adjusted mid-run (``opt.opt_state = uo.adjust(...)``), saved, and
    resumed into a fresh optimizer made with the start's lr: ``uo.load`` refused the fresh
    state as "a state for another rule" and advised ``like=params``, whose state the next
    ``opt.update`` failed on inside flax ("Cannot set key 0 on immutable node"; a hunt's
    finding). It loads with the checkpoint's adjusted numbers, which the optax protocol then
    steps with, and the resumed run is the run that never stopped, bit for bit."""
    nnx = pytest.importorskip("flax.nnx")

    def make() -> tuple[Any, Any]:
        m = nnx.Linear(8, 2, rngs=nnx.Rngs(0))
        return m, nnx.Optimizer(m, uo.adamw(lr=1e-2, weight_decay=0.1), wrt=nnx.Param)

    def first(step: Any, m: Any, opt: Any, xs: list[Any]) -> None:
        step(m, opt, xs[0])
        opt.opt_state = uo.adjust(opt.opt_state, lr=3e-3, weight_decay=0.05)
        for x in xs[1:]:
            step(m, opt, x)

    path = str(tmp_path / "opt.uo")
    opt, opt2 = _nnx_resumes(nnx, make, first, path)
    assert float(opt2.opt_state.rule.lr) == float(np.float32(3e-3))  # (the file's, kept)
    # an adjust to another form (a schedule for lr) is refused, the advice one that works here
    opt.opt_state = uo.adjust(opt.opt_state, lr=uo.schedules.constant(1e-3))
    uo.save(path, opt.opt_state)
    with pytest.raises(uo.CheckpointError, match=r"another form: opt.opt_state = uo.adjust"
                                                 r"\(opt.opt_state, ...\) to the checkpoint's "
                                                 r"schedules or numbers before loading$"):
        uo.load(path, like=make()[1].opt_state)
    m3, opt3 = make()
    opt3.opt_state = uo.adjust(opt3.opt_state, lr=uo.schedules.constant(1e-3))
    opt3.opt_state = uo.load(path, like=opt3.opt_state)
    assert int(opt3.opt_state.step) == 6


def test_checkpoints_in_a_fresh_process() -> None:
    """flax to_bytes/from_bytes and orbax's StandardCheckpointer round trips are equal, and a
    linen TrainState resumed from either follows the run that never stopped, under jax.jit and
    eagerly (from_bytes restores NumPy arrays, which the eager step takes beside JAX
    gradients, as optax does)."""
    pytest.importorskip("flax")
    pytest.importorskip("orbax.checkpoint")
    out = _fresh("""
        import tempfile, jax, jax.numpy as jnp, numpy as np
        import flax.linen as nn
        from flax import serialization
        from flax.training import train_state
        import orbax.checkpoint as ocp
        import uniopt as uo

        class M(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Dense(1)(nn.relu(nn.Dense(8)(x)))

        x = jax.random.normal(jax.random.PRNGKey(0), (32, 4))
        y = jnp.sum(x, 1, keepdims=True)
        m = M()
        params = m.init(jax.random.PRNGKey(1), x)
        rule = uo.chain(uo.clip_by_global_norm(1.0), uo.adamw(lr=1e-2, weight_decay=1e-2))
        make = lambda: train_state.TrainState.create(apply_fn=m.apply, params=params, tx=rule)

        @jax.jit
        def step(st):
            g = jax.grad(lambda p: jnp.mean((st.apply_fn(p, x) - y) ** 2))(st.params)
            return st.apply_gradients(grads=g)

        def same(a, b):
            la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
            return len(la) == len(lb) and all(np.array_equal(u, v) for u, v in zip(la, lb))

        st = make()
        for _ in range(10):
            st = step(st)
        path = tempfile.mkdtemp() + "/ckpt"
        ck = ocp.StandardCheckpointer()
        ck.save(path, st)
        ck.wait_until_finished()
        from_orbax = ck.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, make()))
        from_flax = serialization.from_bytes(make(), serialization.to_bytes(st))
        print("orbax_equal", same(from_orbax, st))
        print("flax_equal", same(from_flax, st))
        print("lr", float(from_flax.opt_state.rule.transforms[1].lr))
        # from_bytes restores NumPy arrays; an eager step takes them beside jax.grad's
        eager, never, resumed = step.__wrapped__, st, from_flax
        for _ in range(3):
            never, resumed = eager(never), eager(resumed)
        print("flax_eager_resumed", same(resumed.params, never.params)
              and same(resumed.opt_state, never.opt_state))
        for _ in range(10):
            st, from_orbax, from_flax = step(st), step(from_orbax), step(from_flax)
        print("orbax_resumed", same(from_orbax.params, st.params))
        print("flax_resumed", same(from_flax.params, st.params))
    """)
    got = dict(line.split() for line in out.splitlines())
    assert got == {"orbax_equal": "True", "flax_equal": "True", "lr": got["lr"],
                   "flax_eager_resumed": "True", "orbax_resumed": "True",
                   "flax_resumed": "True"}, got
    assert abs(float(got["lr"]) - 1e-2) < 1e-8


def test_rules_that_draw_or_count_step_in_an_nnx_optimizer() -> None:
    """nnx.Optimizer sets a rule up from the model's nnx.Param variables, which held a NumPy
    generator's words where JAX arrays draw from a key (noisy_sgd, dpsgd, Kron, Sophia-H:
    "its state holds a numpy generator", and under nnx.jit JAX's "invalid PRNG key data"),
    and skip_nonfinite's counters as Python ints. Now the same draws as the functional step on
    plain arrays, eagerly and under nnx.jit (noisy_sgd and Kron here; dpsgd and Sophia-H set
    their key up by the same function, and accumulate its counter as skip_nonfinite does)."""
    nnx = pytest.importorskip("flax.nnx")
    jnp = jax.numpy
    x = jnp.ones((2, 4))

    def train(model: Any, opt: Any) -> None:
        opt.update(model, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model))

    for make in (lambda: uo.noisy_sgd(lr=0.01, eta=0.01), lambda: uo.kron(lr=0.01),
                 lambda: uo.skip_nonfinite(uo.sgd(lr=0.1))):
        for step in (train, nnx.jit(train)):
            model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
            params = jax.tree.map(jnp.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
            opt = nnx.Optimizer(model, make(), wrt=nnx.Param)
            assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(
                nnx.to_pure_dict(nnx.state(opt, nnx.OptState))))
            step(model, opt)
            grads = jax.grad(lambda p: jnp.mean((x @ p["kernel"] + p["bias"]) ** 2))(params)
            _, ours = uo.update(uo.setup(make(), params), params, grads)
            got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            for k in ours:
                np.testing.assert_allclose(np.asarray(got[k]), np.asarray(ours[k]), rtol=1e-6)
