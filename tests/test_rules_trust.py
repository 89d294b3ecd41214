"""lamb, lars, novograd, fromage (and the trust-ratio block) against optax 0.2.8.

Every run is float64 on both sides (``jax.enable_x64``), optax under ``jax.jit``, ours on the
NumPy reference path; the tolerance is 1e-12 relative: the two differ in operation order only
(a few ulps a step).
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

import uniopt as uo  # noqa: E402
from helpers import rel_diff  # noqa: E402
from optax_parity import assert_libraries_agree, run  # noqa: E402

MASK = {"w": True, "b": False, "s": True}


@pytest.fixture(autouse=True)
def _x64():  # type: ignore[no-untyped-def]
    with jax.enable_x64(True):
        yield


def _cosine() -> tuple[object, object]:
    """One cosine schedule, uniopt's and optax's."""
    return (uo.schedules.cosine(0.05, steps=300, floor=0.001),
            optax.cosine_decay_schedule(0.05, 300, alpha=0.001 / 0.05))


def _random(seed: int) -> np.random.Generator:
    return np.random.default_rng(1000 + seed)


# --- the trust ratio ---------------------------------------------------------------------------


@pytest.mark.parametrize("hp", [{}, {"min_norm": 0.5, "trust_coefficient": 0.3, "eps": 0.1},
                                {"trust_coefficient": 2.0, "eps": 1e-3}])
def test_trust_ratio_matches_optax_with_zero_norms(hp: dict[str, float]) -> None:
    rng = np.random.default_rng(0)
    params = {"zero_p": np.zeros(3), "zero_u": rng.normal(size=(2, 2)), "both": np.zeros(()),
              "any": rng.normal(size=4), "scalar": np.array(-1.5)}
    grads = {"zero_p": rng.normal(size=3), "zero_u": np.zeros((2, 2)), "both": np.zeros(()),
             "any": rng.normal(size=4), "scalar": np.array(0.25)}
    ours = uo.update(uo.setup(uo.scale_by_trust_ratio(**hp), params), params, grads)[1]
    tx = optax.scale_by_trust_ratio(**hp)
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    u, _ = tx.update({k: jnp.asarray(v) for k, v in grads.items()}, tx.init(jp), jp)
    for k in params:  # ours is p - u: optax's update is to be added
        assert rel_diff(params[k] - ours[k], u[k]) < 1e-15, k


# --- lamb --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_lamb_matches_optax(seed: int) -> None:
    rng = _random(seed)
    hp = dict(b1=float(rng.uniform(0.5, 0.95)), b2=float(rng.uniform(0.9, 0.999)),
              eps=float(10 ** rng.uniform(-8, -4)), eps_root=float(rng.choice([0.0, 1e-8])),
              weight_decay=float(rng.uniform(0, 0.2)))
    lr = float(rng.uniform(1e-3, 5e-2))
    mask = MASK if seed else None
    err = run(uo.lamb(lr, **hp, mask=mask), optax.lamb(lr, **hp, mask=mask), seed)
    assert err < 1e-12, err


@pytest.mark.slow
def test_lamb_scheduled_matches_optax() -> None:
    ours, theirs = _cosine()
    err = run(uo.lamb(ours, weight_decay=0.05), optax.lamb(theirs, weight_decay=0.05), 7)
    assert err < 1e-12, err


def test_lamb_with_keras_eps_is_keras_lamb(jx) -> None:  # type: ignore[no-untyped-def]
    """``keras.optimizers.Lamb`` (keras 3 on JAX, float64 variables) is optax's LAMB with
    keras's eps of 1e-7: 300 steps free-running (dyadic rates: keras keeps its rate in a
    variable of floatx)."""
    from free_run import TOL, run_keras, run_ours, worst_of
    from helpers import keras_on_jax

    keras = keras_on_jax()
    for lr in (2**-6, 2**-4):
        theirs = run_keras(jx, keras, keras.optimizers.Lamb(learning_rate=lr), 3)
        assert worst_of(run_ours(uo.lamb(lr=lr, eps=1e-7), 3), theirs) < TOL


# --- lars --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lars_matches_optax(seed: int) -> None:
    rng = _random(seed)
    hp = dict(weight_decay=float(rng.uniform(0, 0.2)),
              trust_coefficient=float(rng.uniform(1e-3, 0.5)),
              eps=float(rng.choice([0.0, 1e-6])), momentum=float(rng.uniform(0.5, 0.95)),
              nesterov=bool(seed % 2))
    if seed == 2:
        hp.update(weight_decay_mask=MASK, trust_ratio_mask={"w": True, "b": True, "s": False})
    lr = float(rng.uniform(1e-2, 0.3))
    err = run(uo.lars(lr, **hp), optax.lars(lr, **hp), seed)
    assert err < 1e-12, err


@pytest.mark.slow
def test_lars_scheduled_matches_optax() -> None:
    ours, theirs = _cosine()
    err = run(uo.lars(ours, weight_decay=0.01, trust_coefficient=0.2),
              optax.lars(theirs, weight_decay=0.01, trust_coefficient=0.2), 8)
    assert err < 1e-12, err


def test_lars_without_momentum_keeps_no_buffer() -> None:
    state = uo.setup(uo.lars(0.1, momentum=0.0), {"w": np.ones(3)})
    assert not state.slots


def test_lars_nesterov_without_momentum_is_optaxs_plain_step() -> None:
    hp = dict(momentum=0.0, nesterov=True, weight_decay=0.01, trust_coefficient=0.2)
    assert run(uo.lars(0.1, **hp), optax.lars(0.1, **hp), 3, steps=30) < 1e-12


# --- novograd ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_novograd_matches_optax(seed: int) -> None:
    rng = _random(seed)
    hp = dict(b1=float(rng.uniform(0.5, 0.95)), b2=float(rng.uniform(0.1, 0.9)),
              eps=float(10 ** rng.uniform(-8, -4)), eps_root=float(rng.choice([0.0, 1e-8])),
              weight_decay=float(rng.uniform(0, 0.2)))
    lr = float(rng.uniform(1e-3, 5e-2))
    err = run(uo.novograd(lr, **hp), optax.novograd(lr, **hp), seed)
    assert err < 1e-12, err


@pytest.mark.slow
def test_novograd_scheduled_matches_optax() -> None:
    ours, theirs = _cosine()
    err = run(uo.novograd(ours, weight_decay=0.01), optax.novograd(theirs, weight_decay=0.01), 9)
    assert err < 1e-12, err


def test_novograd_keeps_one_second_moment_per_leaf() -> None:
    state = uo.setup(uo.novograd(0.1), {"w": np.ones((5, 3)), "s": np.ones(())})
    sq = state.slots["scale_by_novograd.grad_norm_sq"]
    assert [x.shape for x in sq] == [(), ()]


# --- fromage -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_fromage_matches_optax(seed: int) -> None:
    rng = _random(seed)
    lr, min_norm = float(rng.uniform(1e-3, 0.3)), float(rng.choice([1e-6, 0.5]))
    err = run(uo.fromage(lr, min_norm=min_norm), optax.fromage(lr, min_norm=min_norm), seed)
    assert err < 1e-12, err


@pytest.mark.slow
def test_fromage_scheduled_matches_optax() -> None:
    ours, theirs = _cosine()
    assert run(uo.fromage(ours), optax.fromage(theirs), 10) < 1e-12


# --- errors, backends --------------------------------------------------------------------------


@pytest.mark.parametrize("rule, bad", [
    (uo.lamb, {"b1": 1.0}), (uo.lamb, {"weight_decay": -1.0}), (uo.lars, {"lr": -0.1}),
    (uo.lars, {"trust_coefficient": -1.0}), (uo.novograd, {"b2": 1.5}),
    (uo.fromage, {"min_norm": -1.0}),
])
def test_bad_hyperparameters_are_refused(rule: type, bad: dict[str, float]) -> None:
    ((name, value),) = bad.items()
    with pytest.raises(ValueError, match=f"{name}.*{value}"):
        rule(**bad)


@pytest.mark.parametrize("rule", [
    uo.lamb(0.01, weight_decay=0.1, mask=MASK), uo.lars(0.1, weight_decay=0.1),
    uo.novograd(0.01, weight_decay=0.1), uo.fromage(0.1),
])
def test_torch_and_jax_match_numpy(rule: uo.Transform) -> None:
    assert_libraries_agree(rule)


def test_masks_take_a_function_of_the_params_and_a_prefix() -> None:
    params = {"w": np.ones((2, 2)), "layer": {"b": np.ones(2), "c": np.ones(3)}}
    grads = {"w": np.ones((2, 2)), "layer": {"b": np.ones(2), "c": np.ones(3)}}
    by_fn = uo.lamb(0.1, weight_decay=0.5, mask=lambda p: {k: k == "w" for k in p})
    by_prefix = uo.lamb(0.1, weight_decay=0.5, mask={"w": True, "layer": False})
    a = uo.update(uo.setup(by_fn, params), params, grads)[1]
    b = uo.update(uo.setup(by_prefix, params), params, grads)[1]
    for k in ("w",):
        assert np.array_equal(a[k], b[k])
    assert np.array_equal(a["layer"]["b"], b["layer"]["b"])
    with pytest.raises(ValueError, match="mask is not shaped like the params"):
        uo.update(uo.setup(uo.lamb(0.1, weight_decay=0.5, mask=[True]), params), params, grads)


def test_masked_lamb_and_lars_under_jit_match_numpy() -> None:
    rng = np.random.default_rng(8)
    params = {"w": rng.normal(size=(5, 3)), "b": rng.normal(size=4), "s": np.array(0.3)}
    for rule in (uo.lamb(uo.schedules.cosine(0.05, steps=10), weight_decay=0.1, mask=MASK),
                 uo.lars(0.1, weight_decay=0.1, weight_decay_mask=MASK, trust_ratio_mask=MASK)):
        p, jp = dict(params), {k: jnp.asarray(v) for k, v in params.items()}
        state, jstate = uo.setup(rule, p), uo.setup(rule, jp)
        step = jax.jit(uo.update)
        for _ in range(4):
            g = {k: rng.normal(size=v.shape) for k, v in params.items()}
            state, p = uo.update(state, p, g)
            jstate, jp = step(jstate, jp, {k: jnp.asarray(v) for k, v in g.items()})
        for k in params:
            assert rel_diff(np.asarray(jp[k]), p[k]) < 1e-12, (rule.name, k)


def test_a_masked_rule_checkpoints(tmp_path) -> None:  # type: ignore[no-untyped-def]
    params = {"w": np.ones((2, 2)), "b": np.ones(2)}
    grads = {"w": np.full((2, 2), 0.5), "b": np.full(2, -0.5)}
    rule = uo.lars(0.1, weight_decay=0.1, weight_decay_mask={"w": True, "b": False},
                   trust_ratio_mask={"w": False, "b": True})
    state, params = uo.update(uo.setup(rule, params), params, grads)
    uo.save(tmp_path / "s.safetensors", state)
    loaded = uo.load(tmp_path / "s.safetensors", state)
    assert loaded.rule == state.rule
    a = uo.update(state, params, grads)[1]
    b = uo.update(loaded, params, grads)[1]
    for k in params:
        assert np.array_equal(a[k], b[k])
