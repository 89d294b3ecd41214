"""adan, sm3, noisy_sgd, polyak_sgd, optimistic_gradient_descent, and optax's forms of
rmsprop and rprop, against optax 0.2.8 (and Adan against pytorch_optimizer).

Every run is float64 on both sides (``jax.enable_x64``), optax under ``jax.jit``, ours on the
NumPy reference path (noisy_sgd on JAX arrays, whose noise is optax's); the tolerance is 1e-12
relative: the two differ in operation order only (a few ulps a step).
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


def _cosine(peak: float = 0.05) -> tuple[object, object]:
    """One cosine schedule, uniopt's and optax's."""
    return (uo.schedules.cosine(peak, steps=300, floor=peak / 50),
            optax.cosine_decay_schedule(peak, 300, alpha=1 / 50))


def _random(seed: int) -> np.random.Generator:
    return np.random.default_rng(2000 + seed)


# --- adan --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_adan_optax_convention_matches_optax(seed: int) -> None:
    rng = _random(seed)
    hp = dict(b1=float(rng.uniform(0.9, 0.99)), b2=float(rng.uniform(0.8, 0.99)),
              b3=float(rng.uniform(0.9, 0.999)), eps=float(10 ** rng.uniform(-8, -5)),
              eps_root=float(rng.choice([0.0, 1e-8])), weight_decay=float(rng.uniform(0, 0.2)))
    lr, mask = float(rng.uniform(1e-3, 5e-2)), MASK if seed else None
    err = run(uo.adan(lr, **hp, mask=mask, convention="optax"),
              optax.adan(lr, **hp, mask=mask), seed)
    assert err < 1e-12, err


@pytest.mark.slow
def test_adan_scheduled_matches_optax() -> None:
    ours, theirs = _cosine()
    err = run(uo.adan(ours, weight_decay=0.05, convention="optax"),
              optax.adan(theirs, weight_decay=0.05), 3)
    assert err < 1e-12, err


def test_adan_paper_differs_from_optax() -> None:
    # optax 0.2.8 weighs the gradient difference by 1 - b2 where the paper has b2 (optax pull
    # request 1715): the same from the first step (the difference is 0 there), not after
    err = run(uo.adan(0.01, eps_root=1e-8, decay_form="decoupled"), optax.adan(0.01), steps=3)
    assert err > 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("decouple", [False, True])
def test_adan_paper_matches_pytorch_optimizer(decouple: bool) -> None:
    torch = pytest.importorskip("torch")
    po = pytest.importorskip("pytorch_optimizer")
    rng = np.random.default_rng(7)
    shapes = {"w": (5, 3), "b": (4,), "s": ()}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    tparams = [torch.tensor(v, requires_grad=True) for v in params.values()]
    lr, wd, betas = 0.02, 0.1, (0.97, 0.9, 0.995)
    theirs = po.Adan(tparams, lr=lr, betas=betas, weight_decay=wd, weight_decouple=decouple,
                     eps=1e-7, foreach=False)
    ours = uo.adan(lr, *betas, eps=1e-7, weight_decay=wd,
                   decay_form="decoupled" if decouple else "proximal")
    state = uo.setup(ours, params)
    for _ in range(100):
        g = {k: np.tanh(v) * 0.5 + 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}
        for t, v in zip(tparams, g.values(), strict=True):
            t.grad = torch.tensor(v)
        theirs.step()
        state, params = uo.update(state, params, g)
    for t, v in zip(tparams, params.values(), strict=True):
        assert rel_diff(v, t.detach().numpy()) < 1e-12


# --- sm3 ---------------------------------------------------------------------------------------

SM3_SHAPES = {"w": (5, 3), "b": (4,), "t": (2, 3, 4)}  # optax.sm3 fails on a scalar


@pytest.mark.slow
@pytest.mark.parametrize("momentum", [0.0, 0.85])
def test_sm3_matches_optax(momentum: float) -> None:
    err = run(uo.sm3(0.1, momentum=momentum), optax.sm3(0.1, momentum=momentum), 4,
              shapes=SM3_SHAPES)
    assert err < 1e-12, err


def test_sm3_keeps_one_accumulator_per_slice() -> None:
    state = uo.setup(uo.sm3(0.1), {"t": np.ones((2, 3, 4)), "s": np.ones(())})
    assert sorted(x.shape for x in state.slots["scale_by_sm3.accumulator"]) == [(1,), (9,)]


def test_sm3_on_a_scalar_is_adagrad() -> None:
    p, g = [np.array(1.0)], [np.array(0.5)]
    state = uo.setup(uo.sm3(0.1, momentum=0.0, eps=0.0), p)
    state, p = uo.update(state, p, g)
    state, p = uo.update(state, p, g)
    assert float(p[0]) == pytest.approx(1.0 - 0.1 - 0.1 * 0.5 / np.sqrt(0.5))


# --- noisy_sgd, polyak_sgd, optimistic_gradient_descent ----------------------------------------


@pytest.mark.slow
def test_noisy_sgd_on_jax_matches_optax() -> None:
    err = run(uo.noisy_sgd(0.02, eta=0.3, gamma=0.4, seed=5),
              optax.noisy_sgd(0.02, eta=0.3, gamma=0.4, key=5), 5, on_jax=True)
    assert err < 1e-12, err
    ours, theirs = _cosine()
    err = run(uo.noisy_sgd(ours, seed=6), optax.noisy_sgd(theirs, key=6), 6, on_jax=True)
    assert err < 1e-12, err


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sps", "sps+"])
def test_polyak_sgd_matches_optax(variant: str) -> None:
    rng = _random(3)
    hp = dict(max_learning_rate=float(rng.uniform(0.1, 1.0)), scaling=float(rng.uniform(0.3, 1)),
              f_min=float(rng.uniform(-0.5, 0.5)), eps=float(rng.choice([0.0, 1e-3])),
              variant=variant)
    err = run(uo.polyak_sgd(**hp), optax.polyak_sgd(**hp), 7, value=True)
    assert err < 1e-12, err
    ours, theirs = _cosine(1.0)
    err = run(uo.polyak_sgd(0.5, scaling=ours, variant=variant),
              optax.polyak_sgd(0.5, scaling=theirs, variant=variant), 8, value=True)
    assert err < 1e-12, err


def test_polyak_sgd_zero_gradient_takes_no_step() -> None:
    p = [np.array([1.0, 2.0])]
    state = uo.setup(uo.polyak_sgd(), p)
    state, new = uo.update(state, p, [np.zeros(2)], value=3.0)
    assert np.array_equal(new[0], p[0])


def test_polyak_sgd_needs_the_loss() -> None:
    p = [np.ones(2)]
    with pytest.raises(TypeError, match="value=loss"):
        uo.update(uo.setup(uo.polyak_sgd(), p), p, [np.ones(2)])


@pytest.mark.slow
def test_optimistic_gradient_descent_matches_optax() -> None:
    rng = _random(4)
    for seed in range(2):
        hp = dict(alpha=float(rng.uniform(0.1, 2.0)), beta=float(rng.uniform(0.0, 2.0)))
        lr = float(rng.uniform(1e-3, 0.1))
        err = run(uo.optimistic_gradient_descent(lr, **hp),
                  optax.optimistic_gradient_descent(lr, **hp), seed)
        assert err < 1e-12, err
    ours, theirs = _cosine()
    err = run(uo.optimistic_gradient_descent(ours, alpha=0.5),
              optax.optimistic_gradient_descent(theirs, alpha=0.5), 9)
    assert err < 1e-12, err


# --- errors, backends --------------------------------------------------------------------------


@pytest.mark.parametrize("rule, bad", [
    (uo.adan, {"b3": 1.0}), (uo.adan, {"diff_weight": "b1"}), (uo.adan, {"decay_form": "l2"}),
    (uo.adan, {"convention": "keras"}), (uo.sm3, {"momentum": -0.5}),
    (uo.noisy_sgd, {"seed": -1}), (uo.noisy_sgd, {"eta": -1.0}),
    (uo.polyak_sgd, {"variant": "sps-"}), (uo.polyak_sgd, {"max_learning_rate": -1.0}),
    (uo.optimistic_gradient_descent, {"beta": -1.0}),
])
def test_bad_hyperparameters_are_refused(rule: type, bad: dict[str, object]) -> None:
    ((name, value),) = bad.items()
    with pytest.raises(ValueError, match=f"{name}.*{value}"):
        rule(**bad)


@pytest.mark.parametrize("rule", [
    uo.adan(0.01, weight_decay=0.1), uo.adan(0.01, weight_decay=0.1, convention="optax"),
    uo.sm3(0.1), uo.optimistic_gradient_descent(0.01),
])
def test_torch_and_jax_match_numpy(rule: uo.Transform) -> None:
    assert_libraries_agree(rule)


def test_polyak_sgd_under_jit_matches_numpy() -> None:
    rng = np.random.default_rng(6)
    params = {"w": rng.normal(size=(5, 3)), "s": np.array(0.3)}
    rule = uo.polyak_sgd(0.5, scaling=0.8, f_min=-0.2)
    step = jax.jit(lambda s, p, g, v: uo.update(s, p, g, value=v))
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    state, jstate = uo.setup(rule, params), uo.setup(rule, jp)
    for _ in range(4):
        g = {k: rng.normal(size=v.shape) for k, v in params.items()}
        loss = float(sum(np.sum(v * v) for v in params.values()))
        state, params = uo.update(state, params, g, value=loss)
        jstate, jp = step(jstate, jp, {k: jnp.asarray(v) for k, v in g.items()}, loss)
    for k in params:
        assert rel_diff(np.asarray(jp[k]), params[k]) < 1e-12


# --- a momentum that is 0 at some steps, under optax.inject_hyperparams ---------------------------


@pytest.mark.parametrize("name, hp", [
    ("sgd", {}), ("sgd", {"nesterov": True}), ("lars", {"weight_decay": 1e-3}),
])
def test_a_momentum_at_0_sets_the_buffer_to_the_update_as_optaxs_trace(
        name: str, hp: dict[str, object]) -> None:
    # optax's trace computes g + 0*t where its momentum is 0: the buffer is the update, where
    # torch's `if momentum != 0` keeps it (the torch convention's, tests/test_parity_torch.py).
    # Two off-steps in five: the buffer the on-steps read is the off-steps' update
    def ours(step: int) -> float:
        return 0.0 if step % 5 in (1, 2) else 0.9

    def theirs(step: object) -> object:
        return jnp.where(jnp.isin(step % 5, jnp.array([1, 2])), 0.0, 0.9)

    lr = 0.05
    mine = (uo.sgd(lr, momentum=ours, convention="optax", **hp) if name == "sgd"
            else uo.lars(lr, momentum=ours, **hp))
    tx = optax.inject_hyperparams(getattr(optax, name))(lr, momentum=theirs, **hp)
    assert run(mine, tx, seed=4, steps=40) < 1e-12


# --- rmsprop: every option of optax.rmsprop ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("eps_in_sqrt", [False, True])
def test_rmsprop_every_option_matches_optax(centered: bool, eps_in_sqrt: bool) -> None:
    # each combination of momentum (none, heavy ball, Nesterov) and bias correction, with
    # centered and eps_in_sqrt as parametrized: 24 runs, so 100 steps each (a wrong formula
    # shows within a few); the random and scheduled runs below go 300
    for momentum, nesterov, bias_correction in [(None, False, False), (None, False, True),
                                                (0.8, False, False), (0.8, False, True),
                                                (0.8, True, False), (0.8, True, True)]:
        hp = dict(centered=centered, eps_in_sqrt=eps_in_sqrt, nesterov=nesterov,
                  bias_correction=bias_correction, initial_scale=0.1)
        ours = uo.rmsprop(0.02, alpha=0.85, eps=1e-3, momentum=momentum or 0.0, **hp,
                          convention="optax")
        theirs = optax.rmsprop(0.02, decay=0.85, eps=1e-3, momentum=momentum, **hp)
        err = run(ours, theirs, 11, steps=100)
        assert err < 1e-12, (momentum, nesterov, bias_correction, err)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_rmsprop_random_and_scheduled_match_optax(seed: int) -> None:
    rng = _random(10 + seed)
    decay, eps, momentum = (float(rng.uniform(0.8, 0.99)), float(10 ** rng.uniform(-6, -2)),
                            float(rng.uniform(0.5, 0.95)))
    hp = dict(centered=bool(seed), nesterov=bool(seed), bias_correction=True,
              initial_scale=float(rng.uniform(0, 1)))
    lr, their_lr = _cosine(0.01) if seed else (0.01, 0.01)
    err = run(uo.rmsprop(lr, alpha=decay, eps=eps, momentum=momentum, **hp, convention="optax"),
              optax.rmsprop(their_lr, decay=decay, eps=eps, momentum=momentum, **hp), seed)
    assert err < 1e-12, err


def test_rmsprop_bias_correction_is_adam_without_momentum() -> None:
    # optax's note: scale_by_rms(eps_in_sqrt=False, bias_correction=True) is Adam with b1 = 0
    rng = np.random.default_rng(3)
    p = [rng.normal(size=5)]
    a = uo.setup(uo.rmsprop(0.01, alpha=0.9, bias_correction=True), p)
    b = uo.setup(uo.adam(0.01, betas=(0.0, 0.9)), p)
    pa, pb = p, p
    for _ in range(20):
        g = [rng.normal(size=5)]
        a, pa = uo.update(a, pa, g)
        b, pb = uo.update(b, pb, g)
    assert rel_diff(pa[0], pb[0]) < 1e-14


def test_rmsprop_nesterov_needs_momentum_but_in_optaxs_convention() -> None:
    with pytest.raises(ValueError, match="nesterov=True requires momentum > 0"):
        uo.rmsprop(nesterov=True)
    # optax's trace(0, nesterov=True) passes the gradient: plain RMSprop
    ours = uo.rmsprop(0.02, momentum=0.0, nesterov=True, convention="optax")
    theirs = optax.rmsprop(0.02, momentum=0.0, nesterov=True)
    assert run(ours, theirs, 5, steps=30) < 1e-12


# --- rprop in optax's form ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_rprop_optax_convention_matches_optax(seed: int) -> None:
    rng = _random(20 + seed)
    eta_minus, eta_plus = float(rng.uniform(0.2, 0.8)), float(rng.uniform(1.05, 1.5))
    # seed 1: lr outside the step sizes, which optax keeps on the first step and torch clamps
    lo, hi = (1e-6, 50.0) if seed == 0 else (0.01, 0.2)
    lr = float(rng.uniform(1e-3, 0.1)) if seed == 0 else 0.5
    ours = uo.rprop(lr, etas=(eta_minus, eta_plus), step_sizes=(lo, hi), convention="optax")
    theirs = optax.rprop(lr, eta_minus=eta_minus, eta_plus=eta_plus, min_step_size=lo,
                         max_step_size=hi)
    assert run(ours, theirs, seed) < 1e-12


def test_rprop_takes_an_infinite_gradient_as_optax_and_torch_do() -> None:
    """An infinite gradient against a memory of 0 makes the sign product NaN: optax shrinks
    the step size there and torch's sign of NaN (0) keeps it, both finite after; uniopt's
    optax form turned the step size NaN for good, on NumPy and JAX."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    grads = [np.array([np.inf, 1.0]), *[np.array([s, 1.0]) for s in (1.0, 1.0, -1.0, 1.0)]]
    tx = optax.rprop(0.01)
    theirs = {"w": jnp.array([2.0, 1.0])}
    s = tx.init(theirs)
    for g in grads:
        u, s = tx.update({"w": jnp.asarray(g)}, s, theirs)
        theirs = optax.apply_updates(theirs, u)
    for wrap, asarray in ((lambda f: f, np.asarray), (lambda f: f, jnp.asarray),
                          (jax.jit, jnp.asarray)):
        p = {"w": asarray(np.array([2.0, 1.0]))}
        state, step = uo.setup(uo.rprop(0.01, convention="optax"), p), wrap(uo.update)
        for g in grads:
            state, p = step(state, p, {"w": asarray(g)})
        np.testing.assert_allclose(np.asarray(p["w"]), np.asarray(theirs["w"]), rtol=1e-6)
    ends = []
    for cls in (torch.optim.Rprop, ut.Rprop):
        w = torch.nn.Parameter(torch.tensor([2.0, 1.0], dtype=torch.float64))
        opt = cls([w], lr=0.01)
        for g in grads:
            w.grad = torch.from_numpy(g.copy())
            opt.step()
        ends.append((w.detach().clone(), opt.state[w]["step_size"].clone()))
    assert torch.isfinite(ends[1][0]).all()
    assert torch.equal(ends[0][0], ends[1][0]) and torch.equal(ends[0][1], ends[1][1])


def test_rprop_optax_update_is_one_step_stale() -> None:
    # optax 0.2.8 hands out the previous update's step (optax pull request 1725): the first
    # update is 0 and each later one is the step torch took one update earlier
    g = [np.array([1.0]), np.array([1.0]), np.array([1.0]), np.array([-1.0]), np.array([1.0])]
    moves = {}
    for convention in ("torch", "optax"):
        p = [np.array([0.0])]
        state = uo.setup(uo.rprop(0.1, convention=convention), p)
        out = []
        for x in g:
            state, new = uo.update(state, p, [x])
            out.append(float(p[0][0] - new[0][0]))
            p = new
        moves[convention] = out
    assert moves["torch"] == pytest.approx([0.1, 0.12, 0.144, 0.0, 0.072])
    assert moves["optax"] == pytest.approx([0.0, 0.1, 0.12, 0.0, 0.0])


def test_rprop_options_are_checked() -> None:
    with pytest.raises(ValueError, match="remember must be one of"):
        uo.rprop(remember="grad")
    with pytest.raises(ValueError, match="stale_update=True.*remember='step'"):
        uo.rprop(stale_update=True)
    with pytest.raises(ValueError, match="convention must be one of"):
        uo.rprop(convention="keras")
