"""uniopt.update under jax.jit: the state is a JAX pytree whose leaves are the step counter, the
slots and the rule's numeric hyperparameters, so a run compiles once, adjust() included."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import uniopt as uo  # noqa: E402
from helpers import compilations, counting_jit, rel_diff  # noqa: E402
from uniopt.hyper import DeviceNumber  # noqa: E402

# options and schedules over 100 steps; every rule as its registry example builds it compiles
# once and matches NumPy in tests/test_registry.py
RULES = {
    "adam-cosine": lambda: uo.adam(lr=uo.schedules.cosine(1e-2, steps=100)),
    "sgd-momentum-dampening": lambda: uo.sgd(lr=0.1, momentum=0.9, dampening=0.1),
    "sgd-nesterov-wd": lambda: uo.sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "rmsprop-momentum-schedule": lambda: uo.rmsprop(lr=1e-2, momentum=lambda s: 0.5, centered=True),
    "adagrad": lambda: uo.adagrad(lr=0.1, lr_decay=1e-2),
    "amsgrad": lambda: uo.adam(lr=1e-2, amsgrad=True),
    "clip-global-adamw": lambda: uo.chain(uo.clip_by_global_norm(0.1), uo.adamw(lr=1e-2)),
    "adamax": lambda: uo.adamax(lr=1e-2, weight_decay=1e-2),
    # the rectification switches on at a traced step
    "radam-decoupled": lambda: uo.radam(lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True),
    "asgd-averaging": lambda: uo.asgd(lr=0.05, lambd=1e-2, t0=10),
    "rprop": lambda: uo.rprop(etas=(0.4, lambda s: 1.3), step_sizes=(1e-6, 0.1)),
}


def _tree(lib, dtype):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    tree = {"w": rng.standard_normal((3, 2)), "b": [rng.standard_normal(2), None, np.array(0.5)]}
    return jax.tree.map(lambda x: lib.asarray(x, dtype=dtype), tree)


def _grads(params, k):  # type: ignore[no-untyped-def]
    return jax.tree.map(lambda x: jnp.sin(x * (k + 1)) + 0.1, params)


@pytest.mark.parametrize("name", sorted(RULES))
def test_jit_compiles_once_and_matches_numpy(name: str) -> None:
    with jax.enable_x64(True):
        jitted, traces = counting_jit(donate_argnums=(0, 1))
        params = _tree(jnp, jnp.float64)
        state = uo.setup(RULES[name](), params)
        ref = _tree(np, np.float64)
        ref_state = uo.setup(RULES[name](), ref)
        for k in range(100):
            grads = _grads(params, k)
            ref_grads = jax.tree.map(np.asarray, grads)
            state, params = jitted(state, params, grads)
            ref_state, ref = uo.update(ref_state, ref, ref_grads)
            for a, b in zip(uo.trainables(params), uo.trainables(ref), strict=True):
                # XLA may fuse and reorder float64 arithmetic: a few ulps per step
                assert rel_diff(a, b) <= 1e-12
        assert len(traces) == 1, "the jitted update recompiled"
        assert int(state.step) == 100
        assert all(isinstance(x, jax.Array) for x in uo.trainables(params))


def test_nadam_runs_eagerly_and_says_why_not_under_jit() -> None:
    """NAdam's product of momenta is multiplied step by step on the host."""
    params, ref = _tree(jnp, jnp.float32), _tree(np, np.float32)
    state, ref_state = uo.setup(uo.nadam(lr=1e-2), params), uo.setup(uo.nadam(lr=1e-2), ref)
    for k in range(3):
        grads = _grads(params, k)
        state, params = uo.update(state, params, grads)
        ref_state, ref = uo.update(ref_state, ref, jax.tree.map(np.asarray, grads))
    for a, b in zip(uo.trainables(params), uo.trainables(ref), strict=True):
        assert rel_diff(a, b) <= 1e-6
    with pytest.raises(TypeError, match="scale_by_nadam: the product of NAdam's momenta .* "
                                        r"cannot be traced \(jax.jit\)"):
        jax.jit(uo.update)(state, params, _grads(params, 3))
    # eager vmap traces too: the message said only jit, and "run it eagerly" where it was
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), (state, params))
    with pytest.raises(TypeError, match=r"jax.vmap.*convention='optax'"):
        jax.vmap(uo.update)(*stacked, jax.tree.map(lambda x: jnp.stack([x, x]),
                                                   _grads(params, 3)))


def test_untraceable_schedule_gets_a_clear_error() -> None:
    params = _tree(jnp, jnp.float32)
    state = uo.setup(uo.sgd(lr=lambda s: 0.1 * math.cos(s)), params)
    with pytest.raises(TypeError, match=r"could not be traced by jax.jit.*uniopt.schedules"):
        jax.jit(uo.update)(state, params, _grads(params, 0))
    # the same schedule is fine outside jit
    uo.update(state, params, _grads(params, 0))
    # accumulate's every, a schedule too: it raised JAX's TracerBoolConversionError as it was
    rule = uo.accumulate(uo.sgd(lr=0.1), every=lambda s: 2 if s < 3 else 3)
    state = uo.setup(rule, params)
    with pytest.raises(TypeError, match=r"^accumulate: a schedule could not be traced by "
                                        r"jax.jit \(TracerBoolConversionError.*uniopt.schedules"):
        jax.jit(uo.update)(state, params, _grads(params, 0))
    # a record there traces, and steps as it does eagerly
    rule = uo.accumulate(uo.sgd(lr=0.1), every=uo.schedules.piecewise_constant(2, {1: 3}))
    eager = jitted = uo.setup(rule, params)
    p_eager = p_jitted = params
    for i in range(8):
        eager, p_eager = uo.update(eager, p_eager, _grads(params, i))
        jitted, p_jitted = jax.jit(uo.update)(jitted, p_jitted, _grads(params, i))
    assert int(jitted.tree_states["accumulate"]["inner"].step) == 3
    for a, b in zip(jax.tree.leaves(p_eager), jax.tree.leaves(p_jitted), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@pytest.mark.parametrize("shape", [(3,), (1,), (2, 1)])
def test_a_schedule_of_an_array_is_refused_under_jit_as_eagerly(shape: tuple[int, ...]) -> None:
    """A schedule whose value is an array, not a number, is refused under ``jax.jit`` as it is
    eagerly, naming the hyperparameter, the shape and the traced step: it was applied as it
    came, elementwise, and one of shape (2, 1) turned params of shape (3,) into (2, 3)."""
    p, g = jnp.zeros(3), jnp.ones(3)
    state = uo.setup(uo.sgd(lr=lambda s: jnp.full(shape, 0.1)), p)
    with pytest.raises(TypeError, match=r"sgd: lr must be a number or a schedule, got Array"):
        uo.update(state, p, g)
    with pytest.raises(TypeError, match=r"sgd: lr must be a number or a schedule, got a traced "
                                        + re.escape(f"array of shape {shape}") + r".*\(the value "
                                        r"of its schedule at the traced step\)"):
        jax.jit(uo.update)(state, p, g)


def test_a_bad_schedule_value_under_jit_is_named_at_the_traced_step() -> None:
    state = uo.setup(uo.adamw(weight_decay=lambda s: -1.0), jnp.zeros(2))
    with pytest.raises(ValueError, match=r"weight_decay must be >= 0, got -1.0 \(the value of "
                                         r"its schedule at the traced step\)"):
        jax.jit(uo.update)(state, jnp.zeros(2), jnp.ones(2))


def test_float32_jit_matches_eager() -> None:
    params = _tree(jnp, jnp.float32)
    state = uo.setup(uo.adam(lr=1e-2), params)
    eager_state, eager = state, params
    jitted = jax.jit(uo.update)
    for k in range(50):
        grads = _grads(params, k)
        state, params = jitted(state, params, grads)
        eager_state, eager = uo.update(eager_state, eager, _grads(eager, k))
    for a, b in zip(uo.trainables(params), uo.trainables(eager), strict=True):
        assert a.dtype == jnp.float32
        # XLA fuses the step into one expression; eager JAX rounds after every operation
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=50 * 2**-23)


@pytest.mark.parametrize("rule", [uo.radam(), uo.signum(lr=0.1), uo.adam(),
                                  uo.adafactor(lr=0.01, convention="optax")],
                         ids=lambda r: r.name)
def test_an_infinite_moment_is_the_same_eager_and_jitted(rule: Any) -> None:
    # eagerly a moving average took torch's two sides, which make an infinite moment NaN
    # (inf - inf), where under jit it stayed infinite: RAdam's step was NaN or -inf, signum's
    # NaN or optax's number, by whether it was jitted
    w = jnp.array([[-1.0, -0.5, 0.5, 1.0]] * 2, jnp.float32)
    g = jnp.array([[jnp.inf, 1.0, -1.0, 0.0], [3e19, -3e19, 1.0, 2.0]], jnp.float32)
    runs = []
    for f in (uo.update, jax.jit(uo.update)):
        state, p = uo.setup(rule, {"w": w}), {"w": w}
        for _ in range(3):
            state, p = f(state, p, {"w": g})
        runs.append(np.asarray(p["w"]))
    eager, jitted = runs
    np.testing.assert_array_equal(np.isnan(eager), np.isnan(jitted))
    np.testing.assert_array_equal(np.isinf(eager), np.isinf(jitted))
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)


def test_adafactor_of_a_gradient_whose_square_overflows_steps_as_optaxs() -> None:
    # |g| > 1.8e19 in float32: g*g is infinite, and the first step's average (weight 1) was
    # inf + 0 * inf = NaN eagerly; optax's is infinite, its step 0 (finite params)
    optax = pytest.importorskip("optax")
    p = {"w": jnp.linspace(-1, 1, 32, dtype=jnp.float32).reshape(4, 8)}
    g = {"w": jnp.full((4, 8), 2e19, jnp.float32).at[0, 0].set(1.0)}
    tx = optax.adafactor(0.01)
    updates, _ = tx.update(g, tx.init(p), p)
    want = np.asarray(optax.apply_updates(p, updates)["w"])
    _, got = uo.update(uo.setup(uo.adafactor(lr=0.01, convention="optax"), p), p, g)
    assert np.isfinite(want).all()
    np.testing.assert_allclose(np.asarray(got["w"]), want, rtol=1e-6)


def _fixed_grads(params, n, dtype):  # type: ignore[no-untyped-def]
    """Gradients that do not depend on the trajectory, so two runs can be compared for long."""
    rng = np.random.default_rng(1)
    return [jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(dtype), params)
            for _ in range(n)]


ADJUSTED = {
    # rule, then three adjust() calls at steps 25, 50 and 75
    "clip-adamw": (
        lambda: uo.chain(uo.clip_by_global_norm(1.0), uo.adamw(lr=1e-2, weight_decay=1e-2)),
        [{"lr": 1e-3}, {"betas": (0.8, 0.99), "eps": 1e-6},
         {"max_norm": 0.25, "weight_decay": 0.1}],
    ),
    "sgd-nesterov": (
        lambda: uo.sgd(lr=0.1, momentum=0.9, nesterov=True),
        [{"lr": 0.05}, {"momentum": 0.5}, {"lr": 0.2, "momentum": 0.99}],
    ),
    "adagrad-schedule": (
        lambda: uo.adagrad(lr=uo.schedules.cosine(0.1, steps=100), lr_decay=1e-2,
                           weight_decay=1e-4),
        [{"lr_decay": 0.0}, {"eps": 1e-3}, {"weight_decay": 1e-3}],
    ),
}


@pytest.mark.parametrize("name", sorted(ADJUSTED))
def test_adjust_under_jit_does_not_recompile(name: str) -> None:
    make, changes = ADJUSTED[name]
    with jax.enable_x64(True):
        jitted, traces = counting_jit(donate_argnums=(0, 1))
        params = _tree(jnp, jnp.float64)
        ref = _tree(np, np.float64)
        rule = make()
        state, ref_state = uo.setup(rule, params), uo.setup(rule, ref)
        grads = _fixed_grads(ref, 100, np.float64)
        for k in range(100):
            if k in (25, 50, 75):
                change = changes[k // 25 - 1]
                state, ref_state = uo.adjust(state, **change), uo.adjust(ref_state, **change)
            state, params = jitted(state, params, jax.tree.map(jnp.asarray, grads[k]))
            ref_state, ref = uo.update(ref_state, ref, grads[k])
            for a, b in zip(uo.trainables(params), uo.trainables(ref), strict=True):
                assert rel_diff(a, b) <= 1e-12
        assert len(traces) == 1, f"compiled {len(traces)} times"
        # the state coming out of jit carries the adjusted values
        for key, value in changes[-1].items():
            members = state.rule.transforms if isinstance(state.rule, uo.chain) else [state.rule]
            got = [getattr(m, key) for m in members if key in m.hyperparameters()]
            assert [float(x) for x in got] == [value]


def test_adjust_that_adds_a_block_recompiles_once() -> None:
    """Weight decay 0 has no block; turning it on adds one: one more compile, right numbers."""
    params, ref = _tree(jnp, jnp.float32), _tree(np, np.float32)
    jitted, traces = counting_jit()
    state, ref_state = uo.setup(uo.adam(lr=1e-2), params), uo.setup(uo.adam(lr=1e-2), ref)
    grads = _fixed_grads(ref, 30, np.float32)
    for k in range(30):
        if k in (10, 20):
            wd = {10: 0.1, 20: 0.2}[k]
            state = uo.adjust(state, weight_decay=wd)
            ref_state = uo.adjust(ref_state, weight_decay=wd)
        state, params = jitted(state, params, jax.tree.map(jnp.asarray, grads[k]))
        ref_state, ref = uo.update(ref_state, ref, grads[k])
    assert len(traces) == 2
    for a, b in zip(uo.trainables(params), uo.trainables(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=16 * 2**-23)


@pytest.mark.parametrize("combinator", ["partition", "masked"])
def test_adjust_of_another_form_inside_a_combinator_recompiles_once(combinator: str) -> None:
    """A schedule adjusted to a number inside ``uo.partition``/``uo.masked``: one compile
    more, as for a plain rule (the members' states still held the schedule, and the step after
    the adjust's compiled again), and the numbers of the eager run."""
    params, ref = _tree(jnp, jnp.float32), _tree(np, np.float32)
    member = uo.adam(lr=uo.schedules.cosine(1e-2, steps=40))
    rule = (uo.partition({"a": member, "b": uo.sgd(lr=0.1)},
                         lambda path, leaf: "a" if path == "w" else "b")
            if combinator == "partition" else uo.masked(member, "w"))
    jitted, traces = counting_jit()
    state, ref_state = uo.setup(rule, params), uo.setup(rule, ref)
    grads = _fixed_grads(ref, 12, np.float32)
    for k in range(12):
        if k == 5:
            key = "a.lr" if combinator == "partition" else "lr"
            state = uo.adjust(state, **{key: 1e-3})
            ref_state = uo.adjust(ref_state, **{key: 1e-3})
        state, params = jitted(state, params, jax.tree.map(jnp.asarray, grads[k]))
        ref_state, ref = uo.update(ref_state, ref, grads[k])
    assert len(traces) == 2
    for a, b in zip(uo.trainables(params), uo.trainables(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=16 * 2**-23)


def test_a_recompile_message_says_what_changed() -> None:
    """JAX's message when a compiled step is handed a state of another form ("seen ... but now
    given ..."): the state's metadata names the rule's schedules and fixed values (it showed
    two equal reprs when only a schedule had changed)."""
    params = {"w": jnp.ones(3)}
    state = uo.setup(uo.adam(lr=uo.schedules.cosine(0.1, steps=100)), params)
    other = uo.adjust(state, lr=uo.schedules.cosine(0.05, steps=100))
    a, b = (str(jax.tree_util.tree_structure(s)) for s in (state, other))
    assert a != b
    assert "cosine(init=0.1," in a and "cosine(init=0.05," in b


def test_float32_hyperparameters_under_jit_keep_their_precision() -> None:
    """Without jax x64, JAX holds traced hyperparameters in float32, where 1 - 0.999 loses five
    digits; the complements computed on the host travel with the state, so the jitted run is
    the eager one (double-precision alpha, rho, betas), not the one with float32 values."""
    params = jax.tree.map(jnp.asarray, _tree(np, np.float32))
    grads = [jax.tree.map(jnp.asarray, g) for g in _fixed_grads(params, 200, np.float32)]

    def ulps(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.max(np.abs(a - b)) / np.max(np.abs(b)) / 2**-23)

    # float32 values would cost adam < 1 ulp (its bias correction divides the same rounding
    # out) and sgd's dampening too (it scales a step that moves the params little)
    for make, sensitive in [(lambda d: uo.rmsprop(lr=1e-2, alpha=d), True),
                            (lambda d: uo.adadelta(rho=d), True),
                            (lambda d: uo.adam(lr=1e-2, betas=(d, d), amsgrad=True), False),
                            (lambda d: uo.sgd(lr=1e-2, momentum=0.9, dampening=d), False)]:
        runs = {}
        for label, d, jit in [("jit", 0.999, True), ("eager", 0.999, False),
                              ("eager fl32", float(np.float32(0.999)), False)]:
            state, p = uo.setup(make(d), params), params
            step = jax.jit(uo.update) if jit else uo.update
            for k, g in enumerate(grads):
                if k == 100:  # an adjust mid-run keeps the other fields' complements
                    state = uo.adjust(state, lr=5e-3)
                state, p = step(state, p, g)
            runs[label] = np.concatenate([np.ravel(x) for x in uo.trainables(p)])
        assert ulps(runs["jit"], runs["eager"]) <= 8, make(0.5)
        if sensitive:
            assert ulps(runs["eager fl32"], runs["eager"]) > 4 * ulps(runs["jit"], runs["eager"])


def test_a_part_chained_on_its_own_keeps_its_complements_after_jit() -> None:
    """A part that is a chain's member itself (not made by a rule's parts()) pairs its numbers
    with the host's complements too: an eager step (or read) of a state that came out of
    jax.jit computes with 1 - 0.999 from the host, not from float32 0.999."""
    from uniopt.engine import resolve

    params = {"w": jnp.ones(3, jnp.float32)}
    state = uo.setup(uo.chain(uo.scale_by_adam(b2=0.999), uo.scale_by_lr(1e-3)), params)
    state, params = jax.jit(uo.update)(state, params, {"w": jnp.ones(3, jnp.float32)})
    coeffs = resolve(state.rule, state.step)[0][1]
    assert float(coeffs.one_minus_b2) == float(np.float32(0.001))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Linear:
    """An equinox/flax-style module: array fields are children, ``act`` is static."""

    w: jax.Array
    b: jax.Array | None
    act: str = dataclasses.field(default="relu", metadata={"static": True})


def test_module_pytrees_under_jit() -> None:
    """Parameters held in modules JAX knows as pytrees (and nested dicts of them): same leaf
    order as JAX, gradients from jax.grad (modules too) or as a flat list, one compile."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)

        def arr(*shape: int) -> jax.Array:
            return jnp.asarray(rng.standard_normal(shape))

        model = {
            "encoder": [Linear(arr(4, 3), arr(3)), Linear(arr(3, 3), None, act="tanh")],
            "head": {"out": Linear(arr(3, 1), arr(1), act="id"), "temperature": arr()},
        }
        x = arr(8, 4)

        def loss(m):  # type: ignore[no-untyped-def]
            h = x
            for layer in m["encoder"]:
                h = h @ layer.w + (0 if layer.b is None else layer.b)
                h = jnp.tanh(h) if layer.act == "tanh" else jax.nn.relu(h)
            out = m["head"]["out"]
            return jnp.mean((h @ out.w + out.b) ** 2) * jnp.exp(m["head"]["temperature"])

        assert [a.shape for a in uo.trainables(model)] == [
            a.shape for a in jax.tree.leaves(model)
        ]
        rule = uo.adamw(lr=1e-2, weight_decay=1e-2)
        state, params = uo.setup(rule, model), model
        ref = [np.asarray(a) for a in jax.tree.leaves(model)]  # the same arrays, a flat list
        ref_state = uo.setup(rule, ref)
        jitted, traces = counting_jit()
        for k in range(100):
            grads = jax.grad(loss)(params)
            if k % 2:  # alternate: a module tree, then a flat list in trainables order
                grads = uo.trainables(grads)
            state, params = jitted(state, params, grads)
            flat = [np.asarray(g) for g in jax.tree.leaves(grads)]
            ref_state, ref = uo.update(ref_state, ref, flat)
            for a, b in zip(jax.tree.leaves(params), ref, strict=True):
                assert rel_diff(a, b) <= 1e-12
        assert len(traces) == 2  # one compile per gradient structure (module tree, flat list)
        assert isinstance(params["encoder"][1], Linear) and params["encoder"][1].act == "tanh"
        assert params["encoder"][1].b is None
        assert float(loss(params)) < float(loss(model))


def test_module_with_a_non_array_field_names_it() -> None:
    with pytest.raises(TypeError, match=r"params\['layer'\]\['w'\] is a str, not an array"):
        uo.setup(uo.sgd(), {"layer": Linear("oops", jnp.zeros(2))})  # type: ignore[arg-type]


def test_a_jitted_loop_reads_nothing_back_from_the_device() -> None:
    """Between jitted steps (adjust aside) the state is rebuilt without reading a value back
    from the device (which would make an accelerator wait every step): the rule's parts, whose
    construction validates the numbers on the host, are made only when asked for."""
    params = _tree(jnp, jnp.float32)
    state = uo.setup(uo.chain(uo.clip_by_global_norm(1.0), uo.adam(lr=1e-2)), params)
    step = jax.jit(uo.update, donate_argnums=(0, 1))
    grads = _grads(params, 0)
    for _ in range(3):
        state, params = step(state, params, grads)
        assert "flat_parts" not in state.rule.__dict__
        # every number is an element of the one array the step returned, not yet read
        numbers = [m.lr if hasattr(m, "lr") else m.max_norm for m in state.rule.transforms]
        assert all(isinstance(x, DeviceNumber) and x.array is jax.tree.leaves(state)[-1]
                   for x in numbers)
    # asked for, outside jit, the parts carry the host's complements
    adam_part = state.rule.flat_parts[1]
    assert adam_part.one_minus("b2") is not None and float(adam_part.one_minus("b2")) == float(
        np.float32(1 - 0.999))


@pytest.mark.parametrize("committed", [False, True], ids=["uncommitted", "committed"])
def test_a_fresh_state_goes_into_jit_as_a_step_hands_it_back(committed: bool) -> None:
    """A state fresh from setup flattens to the leaves a jitted step returns: JAX arrays of the
    same dtypes and placement (the rule's numbers in JAX's default float, not NumPy's float64;
    counter, slots and numbers committed where the params are). Otherwise the second call is
    a signature not seen before: it misses jit's fast dispatch, and beside params committed to
    a device compiles the step a second time."""
    def leaves(state):  # type: ignore[no-untyped-def]
        return [(isinstance(x, jax.Array), x.dtype, getattr(x, "weak_type", None),
                 getattr(x, "committed", None), getattr(x, "sharding", None))
                for x in jax.tree.leaves(state)]

    params = _tree(jnp, jnp.float32)
    if committed:
        params = jax.device_put(params, jax.devices()[0])
    for rule in (uo.adamw(lr=1e-3), uo.sgd(lr=0.1, momentum=0.9), uo.adam(lr=1e-3)):
        state, p = uo.setup(rule, params), params
        jitted, traces = counting_jit()
        with compilations() as compiles:
            for k in range(3):
                out, p = jitted(state, p, _grads(p, k))
                assert leaves(out) == leaves(state), rule.name
                state = out
        assert len(traces) == len(compiles) == 1, rule.name


@pytest.mark.parametrize("rule", [
    uo.masked(uo.adam(lr=1e-3), "*.bias"),  # matches no leaf of this model
    uo.masked(uo.adam(lr=1e-3), "*"),  # matches every leaf: the other side is empty
    uo.partition({"a": uo.adam(lr=1e-3), "b": uo.sgd(lr=0.1)}, uo.by_path({"*": "a"})),
    uo.skip_nonfinite(uo.accumulate(uo.chain(uo.clip_by_global_norm(1.0), uo.partition(
        {"a": uo.masked(uo.adam(lr=1e-3), "*.bias"), "b": uo.lion(lr=1e-4)},
        uo.by_path({"*": "a"}))), 2)),
    *(uo.partition({"a": uo.adam(lr=1e-3), "b": member}, uo.by_path({"*": "a"})) for member in (
        uo.accumulate(uo.adam(lr=1e-3), 2), uo.skip_nonfinite(uo.sgd(lr=0.1)),
        uo.chain(uo.adam(lr=1e-3), uo.reduce_on_plateau()), uo.noisy_sgd(lr=1e-3)))],
    ids=["mask-none", "mask-all", "partition-empty", "nested", "empty-accumulate",
         "empty-skip_nonfinite", "empty-plateau", "empty-noisy_sgd"])
def test_a_member_given_no_leaf_compiles_once(rule: Any, tmp_path: Any) -> None:
    """A member of a mask or partition that gets none of the params (a mask for biases on a
    model without them) was set up with a Python int counter and NumPy numbers, having no leaf
    to tell its library, and so were its whole-tree parts' numbers (accumulate's count,
    skip_nonfinite's flags, a plateau's values, noisy_sgd's generator); a jitted step hands
    them back as JAX arrays, and the second step compiled again (a sweep's finding, then the
    review's). Also with the state donated, and after a checkpoint loaded like a fresh
    set-up."""
    for donate in ((), (0, 1)):
        params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
        state, p = uo.setup(rule, params), params
        jitted, traces = counting_jit(donate_argnums=donate)
        with compilations() as compiles:
            for k in range(3):
                state, p = jitted(state, p, {"w": jnp.full((3, 2), 0.5 + k), "b": jnp.ones(2)})
        # (and one entry of jit's cache: an int counter given back as an array was a new
        # signature, which missed the fast dispatch even where it traced nothing anew)
        assert len(traces) == len(compiles) == jitted._cache_size() == 1
    path = str(tmp_path / "ck.uo")
    uo.save(path, state)
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}  # (the first were donated)
    state, p = uo.load(path, like=(rule, params)), params
    jitted, traces = counting_jit()
    for k in range(2):
        state, p = jitted(state, p, {"w": jnp.full((3, 2), 0.5 + k), "b": jnp.ones(2)})
    assert jitted._cache_size() == 1


def test_states_of_one_rule_keep_their_own_numbers_under_donation() -> None:
    """Two states set up from one rule object (two models, or a run set up again), stepped by
    a jitted update that donates its state: each has its own array of the rule's numbers, so
    donating one state's deletes nothing of the other's. (They shared one, and the second
    state's step, or any new set-up of the rule, raised "Array has been deleted".)"""
    rule = uo.adamw(lr=1e-2, weight_decay=0.1)
    step = jax.jit(uo.update, donate_argnums=(0, 1))
    p1, p2 = [jnp.ones(3)], [jnp.full(4, 2.0)]
    s1, s2 = uo.setup(rule, p1), uo.setup(rule, p2)
    for _ in range(2):
        s1, p1 = step(s1, p1, [jnp.ones(3)])
        s2, p2 = step(s2, p2, [jnp.ones(4)])
    again = uo.setup(rule, [jnp.ones(3)])  # after the first state's arrays were donated
    again, p3 = step(again, [jnp.ones(3)], [jnp.ones(3)])
    again, p3 = step(again, p3, [jnp.ones(3)])
    np.testing.assert_array_equal(np.asarray(p3[0]), np.asarray(p1[0]))
    ref_state, ref = uo.setup(rule, [np.full(4, 2.0)]), [np.full(4, 2.0)]
    for _ in range(2):
        ref_state, ref = uo.update(ref_state, ref, [np.ones(4)])
    assert rel_diff(np.asarray(p2[0]), ref[0]) <= 1e-6


def test_what_the_host_knows_is_compiled_as_known() -> None:
    """A number that keeps a block (SGD's momentum) is non-zero in the program compiled for
    it: no per-element switch between the buffer and the gradient (which read the gradient a
    second time); a state out of the step builds its rule only when asked for."""
    params = [jnp.ones((4, 3)), jnp.ones(3)]
    state = uo.setup(uo.sgd(lr=0.1, momentum=0.9, dampening=0.1), params)
    program = jax.jit(uo.update).lower(state, params, params).as_text()
    # (the one select is the step count's, a scalar that stops at its end)
    selects = [line for line in program.splitlines() if "select" in line]
    assert all(line.rstrip().endswith("tensor<i32>") for line in selects), selects
    state, params = jax.jit(uo.update)(state, params, params)
    state, params = jax.jit(uo.update)(state, params, params)
    assert "rule" not in state.__dict__
    assert float(state.rule.momentum) == float(np.float32(0.9))
    assert state.rule.nonzero("momentum") is True


def test_schedules_under_jit_compute_in_the_default_float() -> None:
    """The state's step is an int32 array under jit: schedules are handed it as the default
    float (float64 with x64), so a linear or exponential schedule is the host's to rounding,
    not float32's (before: 2e-8 and 6e-7 apart after 60 steps). schedule-free's optax form
    reads lr one step ahead for its weights, where the schedule was handed int32 + 1 (1.4e-11
    apart after 30 steps of a rising linear lr)."""
    with jax.enable_x64(True):
        rising = uo.schedules.linear(1e-3, 1e-2, steps=1000)
        for rule in (uo.sgd(lr=uo.schedules.linear(1e-2, 1e-4, steps=100)),
                     uo.sgd(lr=uo.schedules.exponential(0.1, 0.97)),
                     uo.schedule_free_adamw(lr=rising, convention="optax")):
            p, pj = {"w": np.ones(3)}, {"w": jnp.ones(3)}
            s, sj = uo.setup(rule, p), uo.setup(rule, pj)
            step = jax.jit(uo.update)
            for t in range(60):
                g = np.cos(np.arange(3.0) + t)
                s, p = uo.update(s, p, {"w": g})
                sj, pj = step(sj, pj, {"w": jnp.asarray(g)})
            assert rel_diff(np.asarray(pj["w"]), p["w"]) < 1e-14


@pytest.mark.parametrize("rule", ["adam", "nadam", "cosine"])
@pytest.mark.parametrize("jitted", [True, False], ids=["jit", "eager"])
def test_the_int32_count_stops_at_its_end_as_optaxs(jitted: bool, rule: str) -> None:
    """The int32 step count stops at 2**31 - 1, as optax's ``safe_increment`` stops it, and
    the coefficients are optax's there: it wrapped to negative numbers, and the bias
    corrections with it (Adam moved 0.97 where optax moved 0.88 after three steps from
    2**31 - 2). Eagerly it still wrapped (a checkpoint's count may be there): Adam's step was
    0, NAdam's 4e-3 off, a schedule started again."""
    with jax.enable_x64(True):
        import optax

        params = jnp.asarray([1.0, -1.0])
        grads = jnp.asarray([0.5, -0.5])
        ours, theirs = {
            "adam": (uo.adam(lr=0.1, convention="optax"), optax.adam(0.1)),
            "nadam": (uo.nadam(lr=0.1, convention="optax"), optax.nadam(0.1)),
            "cosine": (uo.sgd(lr=uo.schedules.cosine(0.1, steps=1000)),
                       optax.sgd(optax.cosine_decay_schedule(0.1, 1000)))}[rule]
        state = uo.setup(ours, params)
        state = jax.tree.map(lambda x: jnp.asarray(2**31 - 2, jnp.int32)
                             if getattr(x, "dtype", None) == jnp.int32 else x, state)
        opt_state = jax.tree.map(lambda x: jnp.asarray(2**31 - 2, jnp.int32)
                                 if getattr(x, "dtype", None) == jnp.int32 else x,
                                 theirs.init(params))
        p, q = params, params
        step = jax.jit(uo.update) if jitted else uo.update
        for _ in range(3):
            state, p = step(state, p, grads)
            updates, opt_state = theirs.update(grads, opt_state, q)
            q = optax.apply_updates(q, updates)
        assert int(state.step) == 2**31 - 1
        np.testing.assert_array_equal(np.asarray(p), np.asarray(q))


@pytest.mark.parametrize("betas", [(0.0, 0.0), (0.3, 0.2)])
@pytest.mark.parametrize("convention", ["torch", "optax"])
def test_a_beta_below_a_half_keeps_the_gradient_on_jax(convention: str,
                                                        betas: tuple[float, float]) -> None:
    """A moving average's weight 1 - beta at or above 1/2 (a beta of 0: the gradient itself)
    is taken from the gradient's side on JAX, as on NumPy and in torch's lerp: from the old
    average's side a large first gradient swallowed a small second one (Adam with betas 0 on
    JAX stepped -1.22 where NumPy, torch and optax step -0.9999)."""
    optax = pytest.importorskip("optax")
    rule = uo.adam(1.0, betas=betas, convention=convention)
    grads = [1000.0, 1e-4, -3e-3]
    ends = {}
    for name, wrap, as_array in (("numpy", lambda f: f, np.asarray),
                                 ("jax", lambda f: f, jnp.asarray),
                                 ("jit", jax.jit, jnp.asarray)):
        p = {"w": as_array(np.zeros(1, np.float32))}
        state, step = uo.setup(rule, p), wrap(uo.update)
        for g in grads:
            state, p = step(state, p, {"w": as_array(np.array([g], np.float32))})
        ends[name] = np.asarray(p["w"])
    tx = optax.adam(1.0, b1=betas[0], b2=betas[1])
    p = {"w": jnp.zeros(1, jnp.float32)}
    s = tx.init(p)
    for g in grads:
        u, s = tx.update({"w": jnp.array([g], jnp.float32)}, s, p)
        p = optax.apply_updates(p, u)
    for name in ("jax", "jit"):
        np.testing.assert_allclose(ends[name], ends["numpy"], rtol=4e-7)
    np.testing.assert_allclose(ends["numpy"], np.asarray(p["w"]), rtol=4e-7)


@pytest.mark.parametrize("name", ["lamb", "lars", "fromage", "adafactor", "dog", "mechanize",
                                  "adaptive_grad_clip"])
def test_jax_grad_through_a_step_is_finite_where_a_leaf_is_zeros(name: str) -> None:
    """``jax.grad`` with respect to the params through a jitted step, a leaf of zeros among
    them (a bias as initialised): finite, and where the step is smooth there, finite
    differences' (Adafactor's scale is then eps2's). Every leaf norm was ``sqrt(sum(x*x))``,
    whose slope at 0 times the 0 a clip or select hands back is NaN (lamb, lars, fromage,
    adafactor; optax's safe norm gives the same values and finite derivatives), as were DoG's
    first distance and Mechanic's first root of v; and adaptive_grad_clip's unit norms (optax's
    own are NaN there)."""
    jnp = jax.numpy
    rule = {"lamb": lambda: uo.lamb(0.05), "lars": lambda: uo.lars(0.1),
            "fromage": lambda: uo.fromage(0.05),
            "adafactor": lambda: uo.adafactor(0.03, convention="optax"),
            "dog": lambda: uo.dog(), "mechanize": lambda: uo.mechanize(uo.sgd(lr=0.1)),
            "adaptive_grad_clip": lambda: uo.chain(uo.adaptive_grad_clip(0.1),
                                                   uo.sgd(lr=0.1))}[name]()
    rng = np.random.default_rng(0)
    p0 = {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
          "b": jnp.zeros(5, jnp.float32)}
    g = {"w": jnp.asarray(rng.uniform(0.2, 1, (3, 4)), jnp.float32),
         "b": jnp.asarray(rng.uniform(0.2, 1, 5), jnp.float32)}

    @jax.jit
    def loss(p: Any) -> Any:
        state = uo.setup(rule, p)
        state, p = uo.update(state, p, g)
        return sum(jnp.sum(x ** 2) for x in p.values())

    d = jax.grad(loss)(p0)
    assert all(bool(jnp.isfinite(x).all()) for x in d.values()), d
    if name == "adafactor":  # optax's, whose step it is (float32: too small a slope for FD)
        optax = pytest.importorskip("optax")
        tx = optax.adafactor(0.03)

        def theirs(p: Any) -> Any:
            u, _ = tx.update(g, tx.init(p), p)
            return sum(jnp.sum(x ** 2) for x in optax.apply_updates(p, u).values())

        want = jax.grad(theirs)(p0)
        assert float(want["b"][0]) != 0
        for k in d:
            np.testing.assert_allclose(np.asarray(d[k]), np.asarray(want[k]), rtol=1e-5)


@pytest.mark.parametrize("name", ["lamb", "lars", "fromage"])
def test_a_scalar_leafs_norm_is_its_magnitude_eager_and_jitted(name: str) -> None:
    """A 0-d leaf's norm is ``|x|`` on every path: XLA made ``sqrt(x*x)`` of it ``|x|``
    under jit (a huge leaf stepped, a tiny one kept its size), where eagerly ``x*x``
    overflowed to inf (or underflowed to 0); a guarded root then kept XLA from it."""
    jnp = jax.numpy
    rule = {"lamb": lambda: uo.lamb(0.01), "lars": lambda: uo.lars(0.01),
            "fromage": lambda: uo.fromage(0.01)}[name]()
    for x in (3e19, 1e-30):
        params = {"s": jnp.float32(x), "w": jnp.ones(3, jnp.float32)}
        grads = {"s": jnp.float32(1.0), "w": jnp.ones(3, jnp.float32)}
        eager = uo.update(uo.setup(rule, params), params, grads)[1]["s"]
        jitted = jax.jit(uo.update)(uo.setup(rule, params), params, grads)[1]["s"]
        numpy = uo.update(uo.setup(rule, {"s": np.float32(x), "w": np.ones(3, np.float32)}),
                          {"s": np.float32(x), "w": np.ones(3, np.float32)},
                          {"s": np.float32(1.0), "w": np.ones(3, np.float32)})[1]["s"]
        assert np.isfinite(float(eager)) and float(eager) < x, (x, eager)
        assert float(jitted) == pytest.approx(float(eager), rel=1e-6)
        assert float(numpy) == pytest.approx(float(eager), rel=1e-6)


_META = {
    "adamw": lambda lr: uo.adamw(lr=lr, weight_decay=0.1),
    "sgd": lambda lr: uo.sgd(lr=lr, momentum=0.9, nesterov=True),
    "schedule_free_adamw": lambda lr: uo.schedule_free_adamw(lr=lr),
    "lamb": lambda lr: uo.lamb(lr),
    "dog": lambda lr: uo.dog(lr=lr),
}


@pytest.mark.parametrize("name", sorted(_META))
def test_jax_grad_through_jitted_steps_is_finite_differences(name: str) -> None:
    """A meta-learning derivative in JAX: the loss after three jitted steps, differentiated
    with respect to the lr and to the initial params (along a direction) by ``jax.grad``, is
    a central difference's, in float64."""
    jnp = jax.numpy
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        p0 = {"w": jnp.asarray(rng.standard_normal((3, 4))),
              "b": jnp.asarray(rng.standard_normal(5))}
        gs = [{k: jnp.asarray(rng.standard_normal(v.shape)) for k, v in p0.items()}
              for _ in range(3)]
        v = {k: jnp.asarray(rng.standard_normal(x.shape)) for k, x in p0.items()}

        @jax.jit
        def loss(p: Any, lr: Any) -> Any:
            state = uo.setup(_META[name](lr), p)
            for g in gs:
                state, p = uo.update(state, p, g)
            return sum(jnp.sum(x ** 2) for x in p.values())

        lr, h = 0.05, 1e-6
        d_lr = jax.grad(loss, argnums=1)(p0, lr)
        d_p = jax.grad(loss)(p0, lr)
        along = sum(float(jnp.sum(d_p[k] * v[k])) for k in p0)
        shifted = [{k: p0[k] + s * h * v[k] for k in p0} for s in (1, -1)]
        fd_p = float(loss(shifted[0], lr) - loss(shifted[1], lr)) / (2 * h)
        fd_lr = float(loss(p0, lr + h) - loss(p0, lr - h)) / (2 * h)
        # (a central difference of a loss of about 20 in float64 is good to about 1e-8)
        assert float(d_lr) == pytest.approx(fd_lr, rel=1e-6, abs=1e-8)
        assert along == pytest.approx(fd_p, rel=1e-6, abs=1e-8)


def test_an_ensembles_state_says_to_adjust_inside_vmap_and_saves_model_by_model(
        tmp_path: Any) -> None:
    """A state made under ``jax.vmap`` (an ensemble: one rule per model) holds rows of numbers:
    ``uo.adjust`` took it eagerly without a word, and the next vmapped step failed stacking
    them ("Cannot stack arrays with different numbers of dimensions"); ``uo.save`` said
    ``rule.lr is an ArrayImpl``. Both say what it is and what to write; adjusting inside
    vmap, and saving one model's state, work."""
    p = {"w": jnp.ones((3, 4))}
    g = {"w": jnp.full((3, 4), 0.5)}
    state = jax.vmap(lambda q: uo.setup(uo.adamw(lr=0.1), q))(p)
    state, p = jax.jit(jax.vmap(uo.update))(state, p, g)
    with pytest.raises(ValueError, match=r"adjust: this state's numbers are a batch, shape "
                                         r"\(3, \d+\).*jax.vmap\(lambda s: uo.adjust\(s, lr=...\)"):
        uo.adjust(state, lr=1e-3)
    with pytest.raises(uo.CheckpointError, match=r"save: this state's numbers are a batch"):
        uo.save(tmp_path / "all.uo", state)
    # stepped outside vmap (eagerly, under jit, by the optax protocol): a broadcast naming
    # nothing ("mul got incompatible shapes for broadcasting: (3,), (13,)")
    batch = r"this state's numbers are a batch, shape \(3, \d+\).*jax.vmap\(uo.update\)"
    for step in (uo.update, jax.jit(uo.update),
                 lambda s, p, g: uo.adamw(lr=0.1).update(g, s, p)):
        with pytest.raises(ValueError, match=batch):
            step(state, p, g)
    lower = jax.vmap(lambda s: uo.adjust(s, lr=1e-3))(state)
    np.testing.assert_allclose(np.asarray(jax.vmap(lambda s: s.rule.lr)(lower)), [1e-3] * 3,
                               rtol=1e-6)
    jax.vmap(uo.update)(lower, p, g)
    one = jax.tree.map(lambda x: x[1], state)
    uo.save(tmp_path / "one.uo", one)
    assert float(uo.load(tmp_path / "one.uo", one).rule.lr) == pytest.approx(0.1)
