"""optax transformations inside a uniopt chain (``uo.chain`` wraps them in ``uo.from_optax``),
held to optax running the same recipe by itself: 300 steps under jax.jit, float64, params
compared after every step. (The other direction, a uniopt rule inside ``optax.chain``, is in
test_optax_jit.py.)"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

import uniopt as uo  # noqa: E402
from helpers import counting_jit, jitted_optax_step  # noqa: E402

STEPS = 300


def _cosine():  # type: ignore[no-untyped-def]
    return (
        uo.schedules.cosine(0.05, steps=STEPS, floor=0.001),
        optax.cosine_decay_schedule(0.05, STEPS, alpha=0.001 / 0.05),
    )


def _recipes():  # type: ignore[no-untyped-def]
    lr, olr = _cosine()
    return {
        # an optax clip in front of a uniopt rule
        "clip+adam": (
            uo.chain(optax.clip_by_global_norm(1.0), uo.adam(lr=lr)),
            optax.chain(optax.clip_by_global_norm(1.0), optax.adam(olr)),
        ),
        # an optax direction between uniopt blocks that carry slots before and after it
        "trace+rms+trace": (
            uo.chain(uo.trace(0.5), optax.scale_by_rms(decay=0.9), uo.trace(0.9),
                     uo.scale_by_lr(lr)),
            optax.chain(optax.trace(0.5), optax.scale_by_rms(decay=0.9), optax.trace(0.9),
                        optax.scale_by_learning_rate(olr)),
        ),
        # optax's decoupled decay reads params: they reach it
        "adam+decay": (
            uo.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-2), uo.scale_by_lr(lr)),
            optax.adamw(olr, weight_decay=1e-2),
        ),
        # a whole optax optimizer returns updates to add: negate=True
        "whole sgd": (
            uo.chain(uo.clip(0.5), uo.from_optax(optax.sgd(olr, momentum=0.9), negate=True)),
            optax.chain(optax.clip(0.5), optax.sgd(olr, momentum=0.9)),
        ),
    }


def _tree() -> dict:
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((8, 5)), "layers": [rng.standard_normal(7), None,
                                                         rng.standard_normal(())]}


def _run(ours, theirs, lib=jnp) -> float:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lib.asarray, _tree())
    o_params = jax.tree.map(jnp.asarray, _tree())
    state, o_state = uo.setup(ours, params), theirs.init(o_params)
    ours_step = jax.jit(uo.update) if lib is jnp else uo.update
    theirs_step = jitted_optax_step(theirs)
    worst = 0.0
    for _ in range(STEPS):
        g = jax.tree.map(lambda x: 3 * rng.standard_normal(x.shape), _tree())
        state, params = ours_step(state, params, jax.tree.map(lib.asarray, g))
        o_params, o_state = theirs_step(o_params, o_state, jax.tree.map(jnp.asarray, g))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(o_params), strict=True):
            assert type(a) is type(params["w"])
            worst = max(worst, float(np.max(np.abs(np.asarray(a) - np.asarray(b)))))
    assert state.step == STEPS
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clip+adam", "trace+rms+trace", "adam+decay", "whole sgd"])
def test_optax_inside_uniopt_chain_under_jit(name: str) -> None:
    with jax.enable_x64(True):
        assert _run(*_recipes()[name]) < 1e-12


def test_optax_inside_uniopt_chain_on_numpy() -> None:
    """NumPy params: optax computes with JAX, the results come back as NumPy arrays."""
    with jax.enable_x64(True):
        assert _run(*_recipes()["clip+adam"], lib=np) < 1e-12


def test_negate_is_needed_for_a_whole_optax_optimizer() -> None:
    with jax.enable_x64(True):
        lr, olr = _cosine()
        wrong = uo.chain(uo.clip(0.5), uo.from_optax(optax.sgd(olr, momentum=0.9)))
        assert _run(wrong, _recipes()["whole sgd"][1]) > 1.0


def test_a_whole_optax_optimizer_alone_keeps_its_sign_under_jit() -> None:
    """``from_optax(tx, negate=True)`` on its own, through the optax protocol under
    ``jax.jit``, steps as ``tx``: 30 steps to 1e-12. The record rebuilt from the state's leaves
    inside the trace had lost ``makes_step`` (set beside the fields, at construction), so every
    jitted step came back with its sign flipped: an ascent."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        params = {"w": jax.numpy.asarray(rng.standard_normal(5))}
        ours, theirs = uo.from_optax(optax.adam(1e-2), negate=True), optax.adam(1e-2)
        step_ours, step_theirs = jitted_optax_step(ours), jitted_optax_step(theirs)
        p, s, q, t = params, ours.init(params), params, theirs.init(params)
        for _ in range(30):
            g = {"w": jax.numpy.asarray(rng.standard_normal(5))}
            (p, s), (q, t) = step_ours(p, s, g), step_theirs(q, t, g)
        assert np.max(np.abs(np.asarray(p["w"]) - np.asarray(q["w"]))) < 1e-12


def test_adjust_reaches_a_uniopt_state_inside_optax_combinators() -> None:
    """``uo.adjust`` on the state of an optax combinator holding a uniopt rule (a chain's
    tuple, ``MultiStepsState``, ``MaskedState``: what a TrainState or an NNX Optimizer holds
    when its tx is such a combinator) adjusts the uniopt state inside, and the next jitted step
    takes its number (it raised: "expected a uniopt State, got tuple"). A hyperparameter of
    two of its states, or of none, is an error that says so."""
    params = {"w": jax.numpy.ones(3)}
    grads = {"w": jax.numpy.ones(3)}
    for tx in (optax.chain(uo.clip_by_global_norm(1e6), uo.adamw(lr=0.1)),
               optax.MultiSteps(uo.adamw(lr=0.1), 1),
               optax.masked(uo.adamw(lr=0.1), {"w": True})):
        state = uo.adjust(tx.init(params), lr=0.0)  # a step of lr 0 moves nothing
        updates, _ = jax.jit(tx.update)(grads, state, params)
        assert not np.any(np.asarray(updates["w"])), type(state).__name__
    two = optax.chain(uo.sgd(lr=0.1), uo.adamw(lr=0.1))
    with pytest.raises(ValueError, match=r"'lr' is a hyperparameter of 2 of the 2 uniopt "
                                         r"states in this tuple; adjust each where it is"):
        uo.adjust(two.init(params), lr=0.0)
    with pytest.raises(ValueError, match=r"'lrr' is a hyperparameter of none of the 2 .*; did "
                                         r"you mean 'lr'\?"):
        uo.adjust(two.init(params), lrr=0.0)


def test_compiles_once_and_adjust_reaches_the_uniopt_members() -> None:
    with jax.enable_x64(True):
        jitted, traces = counting_jit(donate_argnums=(0, 1))
        params = jax.tree.map(jnp.asarray, _tree())
        ref = jax.tree.map(jnp.asarray, _tree())
        rule = uo.chain(optax.clip_by_global_norm(1.0), uo.adam(lr=1e-2))
        state, ref_state = uo.setup(rule, params), uo.setup(rule, ref)
        rng = np.random.default_rng(2)
        for k in range(60):
            if k in (20, 40):
                state = uo.adjust(state, lr=1e-2 / (k // 10))
                ref_state = uo.adjust(ref_state, lr=1e-2 / (k // 10))
            g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)), ref)
            state, params = jitted(state, params, g)
            ref_state, ref = uo.update(ref_state, ref, g)  # eager
        assert len(traces) == 1
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12)


def test_update_in_place_on_numpy() -> None:
    with jax.enable_x64(True):
        rule = uo.chain(optax.scale_by_adam(), uo.scale_by_lr(0.1))
        params = [np.ones(3), np.zeros(2)]
        pure_state = state = uo.setup(rule, params)
        grads = [np.array([1.0, -1.0, 0.5]), np.array([2.0, 0.0])]
        pure_state, pure = uo.update(pure_state, params, grads)
        arrays = list(params)
        state = uo.update_(state, params, grads)
        assert all(a is b for a, b in zip(params, arrays, strict=True))
        for a, b in zip(params, pure, strict=True):
            np.testing.assert_array_equal(a, b)
        assert int(state.tree_states["from_optax"].count) == 1  # ScaleByAdamState
        np.testing.assert_allclose(params[0], [0.9, 1.1, 0.9])  # Adam's first step is sign(g)


def test_a_uniopt_chain_holding_optax_inside_optax() -> None:
    """Both directions at once: optax.chain(uo.chain(optax..., uo...)) is optax's recipe."""
    with jax.enable_x64(True):
        lr, olr = _cosine()
        inner = uo.chain(optax.clip_by_global_norm(1.0), uo.adam(lr=lr))
        outer = optax.chain(optax.add_decayed_weights(1e-3), inner)
        pure = optax.chain(optax.add_decayed_weights(1e-3), optax.clip_by_global_norm(1.0),
                           optax.adam(olr))
        params = jax.tree.map(jnp.asarray, _tree())
        sa, sb, pa, pb = outer.init(params), pure.init(params), params, params
        rng = np.random.default_rng(3)
        for _ in range(50):
            g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)), params)
            ua, sa = outer.update(g, sa, pa)
            ub, sb = pure.update(g, sb, pb)
            pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
        for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12)


def test_bad_members_and_libraries_are_named() -> None:
    with pytest.raises(TypeError, match=r"chain: argument 1 is neither a uniopt transform nor "
                                        r"an optax GradientTransformation: 'adam'"):
        uo.chain(uo.clip(1.0), "adam")
    with pytest.raises(TypeError, match="from_optax: 3 is not an optax GradientTransformation"):
        uo.from_optax(3)
    torch = pytest.importorskip("torch")
    rule = uo.chain(optax.clip_by_global_norm(1.0), uo.sgd(lr=0.1))
    with pytest.raises(TypeError, match="from_optax runs optax, on JAX or NumPy arrays; "
                                        "these params are torch arrays"):
        uo.setup(rule, [torch.zeros(2)])
    import uniopt.torch as ut

    with pytest.raises(TypeError, match=r"holds an optax transformation \(from_optax\)"):
        ut.Optimizer([torch.nn.Parameter(torch.zeros(2))], rule)


def test_a_state_without_the_tree_state_is_refused() -> None:
    params = [np.ones(2)]
    state = uo.setup(uo.chain(optax.scale_by_adam(), uo.scale_by_lr(0.1)), params)
    broken = uo.State(state.rule, state.step, state.slots, state.treedef)
    with pytest.raises(ValueError, match=r"holds tree states \[\] but its rule has whole-tree "
                                         r"parts \['from_optax'\]"):
        uo.update(broken, params, [np.ones(2)])
    np.testing.assert_array_equal(params[0], [1.0, 1.0])


def test_a_rule_class_is_not_taken_for_an_optax_transformation() -> None:
    with pytest.raises(TypeError, match="from_optax: <class 'uniopt.rules.adam.adam'> is not"):
        uo.from_optax(uo.adam)
    with pytest.raises(TypeError, match="from_optax: adam"):
        uo.from_optax(uo.adam())  # a uniopt rule goes into a chain as itself


@pytest.mark.parametrize("member", ["clip_by_block_rms", "adaptive_grad_clip", "scale_by_yogi"])
def test_an_optax_member_after_a_uniopt_one_takes_a_0d_numpy_leaf(member: str) -> None:
    """NumPy hands a 0-d leaf's arithmetic back as a scalar, which optax members that check
    for arrays refuse: the engine hands them arrays. Five steps against the same optax chain on
    JAX arrays, in float64."""
    made = {"clip_by_block_rms": lambda: optax.clip_by_block_rms(1.0),
            "adaptive_grad_clip": lambda: optax.adaptive_grad_clip(0.5),
            "scale_by_yogi": lambda: optax.scale_by_yogi()}[member]
    rng = np.random.default_rng(0)
    p = {"s": np.asarray(1.5), "v": rng.normal(size=3)}
    grads = [{"s": np.asarray(rng.normal()), "v": rng.normal(size=3)} for _ in range(5)]
    with jax.enable_x64(True):
        state = uo.setup(uo.chain(uo.scale(2.0), made()), p)
        theirs = optax.chain(optax.scale(2.0), made())
        q = jax.tree.map(jax.numpy.asarray, p)
        t = theirs.init(q)
        for g in grads:
            state, p = uo.update(state, p, g)
            u, t = theirs.update(jax.tree.map(jax.numpy.asarray, g), t, q)
            q = jax.tree.map(lambda a, b: a - b, q, u)  # (uniopt steps against the direction)
        for k in p:
            assert isinstance(p[k], np.ndarray)
            np.testing.assert_allclose(p[k], np.asarray(q[k]), rtol=1e-12, atol=0)
