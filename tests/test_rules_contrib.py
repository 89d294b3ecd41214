"""acprop, momo, momo_adam, dpsgd and galore against optax.contrib 0.2.8.

Every run is float64 on both sides (``jax.enable_x64``), optax under ``jax.jit``, ours on the
NumPy reference path (dpsgd and galore on JAX arrays under ``jax.jit``: optax's noise, JAX's
SVD); the tolerance is 1e-12 relative: the two differ in operation order only (a few ulps a
step). 100 steps suffice (40 for galore): a wrong step shows in every later one.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

import uniopt as uo  # noqa: E402
from helpers import rel_diff  # noqa: E402
from optax_parity import SHAPES, run  # noqa: E402

STEPS = 100
MASK = {"w": True, "b": False, "s": True}


@pytest.fixture(autouse=True)
def _x64():  # type: ignore[no-untyped-def]
    with jax.enable_x64(True):
        yield


def _cosine(peak: float) -> tuple[object, object]:
    """One cosine schedule, uniopt's and optax's."""
    return (uo.schedules.cosine(peak, steps=STEPS, floor=peak / 50),
            optax.cosine_decay_schedule(peak, STEPS, alpha=1 / 50))


def _optax_names(hp: dict[str, Any]) -> dict[str, Any]:
    return {("learning_rate" if k == "lr" else k): v for k, v in hp.items()}


# --- acprop -------------------------------------------------------------------------------------


def test_acprop_matches_optax() -> None:
    hp = dict(lr=0.01, b1=0.8, b2=0.95, eps=1e-8, eps_root=1e-10, weight_decay=0.1, mask=MASK)
    assert run(uo.acprop(**hp), optax.contrib.acprop(**_optax_names(hp)), 1,
               STEPS) < 1e-12
    ours, theirs = _cosine(0.05)
    assert run(uo.acprop(ours), optax.contrib.acprop(theirs), 2, STEPS) < 1e-12


def test_acprop_first_step_is_the_gradient_over_one_plus_eps() -> None:
    p, g = [np.array([1.0, -2.0])], [np.array([0.5, 3.0])]
    state = uo.setup(uo.acprop(0.1, eps=0.25), p)
    _, new = uo.update(state, p, g)
    assert np.array_equal(new[0], p[0] - 0.1 * g[0] / 1.25)


# --- momo, momo_adam ----------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["momo", "momo_adam"])
def test_momo_matches_optax(rule: str) -> None:
    hp: dict[str, Any] = dict(lower_bound=-0.1, weight_decay=0.05, adapt_lower_bound=True)
    hp |= dict(lr=0.5, beta=0.8) if rule == "momo" else dict(lr=0.05, b1=0.8, b2=0.95, eps=1e-6)
    theirs = getattr(optax.contrib, rule)
    assert run(getattr(uo, rule)(**hp), theirs(**_optax_names(hp)), 3, STEPS, value=True) < 1e-12
    ours, sched = _cosine(1.0 if rule == "momo" else 0.1)
    assert run(getattr(uo, rule)(ours), theirs(sched), 4, STEPS, value=True) < 1e-12


def test_momo_adam_on_jax_under_jit_matches_optax() -> None:
    err = run(uo.momo_adam(0.1, adapt_lower_bound=True),
              optax.contrib.momo_adam(0.1, adapt_lower_bound=True), 5, 20, value=True,
              on_jax=True)
    assert err < 1e-12, err


def test_momo_step_is_capped_by_lr_and_zero_gradient_moves_nothing() -> None:
    p = [np.array([3.0])]
    state = uo.setup(uo.momo(lr=0.1), p)
    # f = 4.5, g = 3: Polyak's step 4.5/9 = 0.5 is capped at lr
    _, new = uo.update(state, p, [np.array([3.0])], value=4.5)
    assert new[0][0] == pytest.approx(3.0 - 0.1 * 3.0, rel=1e-15)
    _, new = uo.update(state, p, [np.zeros(1)], value=4.5)
    assert np.array_equal(new[0], p[0])


@pytest.mark.parametrize("rule", [uo.momo, uo.momo_adam])
def test_momo_needs_the_loss(rule: Any) -> None:
    p = [np.ones(2)]
    with pytest.raises(TypeError, match="value=loss"):
        uo.update(uo.setup(rule(), p), p, [np.ones(2)])


# --- dpsgd --------------------------------------------------------------------------------------


def _dpsgd_run(batch: int, hp: dict[str, Any], seed: int, steps: int = STEPS) -> float:
    """Free runs of ours (JAX arrays, under jax.jit) and optax's, from per-example gradients
    ``tanh(p)/2 + noise_i``; the largest relative difference of the params."""
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(rng.standard_normal(s)) for k, s in SHAPES.items()}
    rule = uo.dpsgd(**hp, batch_size=batch)
    theirs = _optax_names(hp)
    with warnings.catch_warnings():  # optax 0.2.8 warns that dpsgd's seed is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        tx = optax.contrib.dpsgd(**theirs)

    @jax.jit
    def optax_step(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    ours_step = jax.jit(lambda s, p, g: uo.update(s, p, rule.aggregate(g)))
    mine, state, jp, js = params, uo.setup(rule, params), params, tx.init(params)
    worst = 0.0
    for _ in range(steps):
        noise = {k: 0.5 * rng.standard_normal((batch, *s)) for k, s in SHAPES.items()}
        state, mine = ours_step(state, mine, {k: jnp.tanh(mine[k]) / 2 + noise[k] for k in mine})
        jp, js = optax_step(jp, js, {k: jnp.tanh(jp[k]) / 2 + noise[k] for k in jp})
        worst = max(worst, *(rel_diff(np.asarray(mine[k]), np.asarray(jp[k])) for k in mine))
    return worst


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_dpsgd_on_jax_matches_optax(momentum: float | None) -> None:
    # clipped (each example's norm is about 2.5) and noised: the noise is optax's, draw for draw
    hp: dict[str, Any] = dict(lr=0.05, l2_norm_clip=1.0, noise_multiplier=0.3, seed=3)
    if momentum is not None:
        hp |= dict(lr=0.02, l2_norm_clip=0.5, seed=7, momentum=momentum, nesterov=True)
    err = _dpsgd_run(4 if momentum is None else 3, hp, 6)
    assert err < 1e-12, err


def test_per_example_clip_matches_optax() -> None:
    rng = np.random.default_rng(8)
    g = [rng.standard_normal((5, 3, 2)), rng.standard_normal((5,))]
    g[0][2] = 0.0
    g[1][2] = 0.0  # an example of norm 0 keeps multiplier 1
    for clip in (0.0, 1.0, 2.5, np.inf):
        ours, n = uo.per_example_global_norm_clip(g, clip)
        theirs, m = optax.per_example_global_norm_clip([jnp.asarray(x) for x in g], clip)
        assert int(n) == int(m)
        for a, b in zip(ours, theirs, strict=True):
            assert rel_diff(a, np.asarray(b)) < 1e-15


def test_dpsgd_without_noise_on_numpy_is_clipped_mean_sgd() -> None:
    p = {"w": np.array([1.0, 2.0])}
    per_example = {"w": np.array([[3.0, 4.0], [0.3, 0.4]])}  # norms 5 (clipped to 1) and 0.5
    rule = uo.dpsgd(0.1, l2_norm_clip=1.0, noise_multiplier=0.0, batch_size=2)
    _, new = uo.update(uo.setup(rule, p), p, rule.aggregate(per_example))
    assert np.allclose(new["w"], p["w"] - 0.1 * np.array([0.6 + 0.3, 0.8 + 0.4]) / 2,
                       rtol=1e-15)


def test_dpsgd_refuses_gradients_without_the_batch_axis() -> None:
    rule = uo.dpsgd(batch_size=3)
    with pytest.raises(ValueError, match="3 examples"):
        rule.aggregate({"w": np.ones((2, 4))})
    with pytest.raises(ValueError, match="leading axis"):
        uo.per_example_global_norm_clip([np.ones((2, 4)), np.ones((3,))], 1.0)


# --- galore -------------------------------------------------------------------------------------

GALORE_SHAPES = {"w": (5, 3), "v": (2, 6), "b": (4,), "s": ()}


def test_galore_on_jax_matches_optax() -> None:
    # on JAX arrays the SVD is JAX's, as optax's: the same projectors. rank 2 < min(m, n); with
    # the dimension numbers "t" is (3, 8) (a right projector), "u" is (6, 2) (a left one);
    # refreshed every 7 steps; a scheduled lr, a masked decay
    ours, theirs = _cosine(0.05)
    hp = dict(rank=2, update_proj_gap=7, weight_decay=0.1, mask={"t": True, "u": True, "b": False})
    err = run(uo.galore(ours, **hp, weight_dimension_numbers=uo.GaLoreDimensionNumbers(0, (1, 2))),
              optax.contrib.galore(theirs, **hp,
                                   weight_dimension_numbers=optax.contrib.GaLoreDimensionNumbers(
                                       0, (1, 2))),
              9, 40, on_jax=True, shapes={"t": (3, 4, 2), "u": (6, 1, 2), "b": (4,)})
    assert err < 1e-12, err


@pytest.mark.parametrize("scale", [0.25, 2.0])
def test_galore_scale_is_the_projected_updates_alone(scale: float) -> None:
    """``scale`` multiplies the projected matrices' updates, as optax's and the authors' (their
    projector's ``project_back``); a leaf GaLore does not project (a bias, a scalar) takes
    Adam's step as it is. uniopt scaled every leaf: with the paper's 0.25 a bias stepped a
    quarter of Adam's step (0.1 off optax after 50 steps)."""
    hp = dict(rank=2, update_proj_gap=7, scale=scale)
    err = run(uo.galore(0.01, **hp), optax.contrib.galore(0.01, **hp), 3, 30, on_jax=True,
              shapes={"w": (6, 4), "b": (4,), "s": ()})
    assert err < 1e-12, err


def test_galore_on_numpy_differs_from_optax_by_its_float32_svd() -> None:
    # optax takes the SVD in float32: LAPACK's (NumPy's) and XLA's float32 singular vectors
    # differ in their last bits, so with one SVD (no refresh) the runs agree to float32's
    # digits only; at a refresh, where the two may choose other signs for a singular vector
    # while Adam's moments stay in the old basis, they part altogether (see uo.galore)
    hp = dict(rank=2, update_proj_gap=1000)
    err = run(uo.galore(0.01, **hp), optax.contrib.galore(0.01, **hp), 11, 40,
              shapes=GALORE_SHAPES)
    assert 1e-12 < err < 1e-6, err


def test_galore_keeps_low_rank_moments() -> None:
    state = uo.setup(uo.galore(rank=2), {"w": np.ones((5, 3)), "v": np.ones((2, 6)),
                                         "b": np.ones(4)})
    (tree,) = state.tree_states.values()
    assert [x.shape for x in tree["exp_avg"]] == [(4,), (2, 2), (2, 3)]
    assert [x.shape for x in tree["projector"]] == [(0, 0), (6, 2), (5, 2)]


def test_galore_refuses_axes_that_do_not_split_the_leaf() -> None:
    rule = uo.galore(weight_dimension_numbers=uo.GaLoreDimensionNumbers(0, 0))
    with pytest.raises(ValueError, match=re.escape(
            "GaLore's reduction axes (0,) and output axes (0,) must split the 2 axes of shape "
            "(3, 2) between them")):
        uo.setup(rule, {"w": np.ones((3, 2))})


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, bad", [
    (uo.acprop, {"b1": 1.0}),
    (uo.acprop, {"eps": -1.0}),
    (uo.momo, {"beta": 1.5}),
    (uo.momo, {"weight_decay": -0.1}),
    (uo.momo_adam, {"b2": -0.2}),
    (uo.dpsgd, {"l2_norm_clip": -1.0}),
    (uo.dpsgd, {"batch_size": 0}),
    (uo.dpsgd, {"seed": -3}),
    (uo.galore, {"rank": 0}),
    (uo.galore, {"update_proj_gap": 0}),
    (uo.galore, {"b1": 1.0}),
])
def test_bad_hyperparameters_are_named(make: Any, bad: dict[str, Any]) -> None:
    ((name, value),) = bad.items()
    with pytest.raises(ValueError, match=f"{name}.*{value}"):
        make(**bad)


def test_dpsgd_nesterov_needs_momentum() -> None:
    with pytest.raises(ValueError, match=r"^dpsgd: nesterov needs a momentum > 0, got 0\.0$"):
        uo.dpsgd(nesterov=True)
