"""The rest of optax's protocol: extra arguments (``value=loss``), ``inject_hyperparams`` under
``jax.jit``, ``optax.tree.map_params`` (placeholder params), a state rebuilt from any leaves;
and :class:`uniopt.reduce_on_plateau`, the transform that reads the loss, against optax's and
torch's.

Cheap by design: small trees, NumPy where the peer allows it, a handful of jit compiles.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import pickle
import warnings
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from helpers import rel_diff

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

PLATEAU = {"factor": 0.5, "patience": 5, "rtol": 1e-3, "atol": 1e-3, "cooldown": 3,
           "accumulation_size": 2, "min_scale": 0.1}


def _losses(n: int = 300) -> np.ndarray:
    """Noisy, decreasing, then flat from step ~57 on: a plateau that triggers reductions."""
    t = np.arange(n)
    return np.maximum(2.0 * np.exp(-t / 30), 0.3) + 0.02 * np.random.default_rng(0).normal(size=n)


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


def _scale(state: uo.State) -> float:
    return float(state.tree_states["reduce_on_plateau"]["scale"])


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


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("convention", ["torch", "optax"])
def test_an_injected_momentum_of_0_with_nesterov_steps(jit: bool, convention: str) -> None:
    """``nesterov=True`` and a momentum set to 0 between steps: the rule rebuilt eagerly from
    the injected 0 was refused ("nesterov=True requires momentum > 0"), where under jit it
    stepped, and torch steps a group's momentum set to 0 after its constructor (OneCycleLR's
    ``base_momentum=0``). It steps, as optax's sgd does; made with a 0, it is still refused."""
    params, grads = _problem(8)
    with jax.enable_x64(True):
        ours = optax.inject_hyperparams(uo.sgd)(lr=0.1, momentum=0.9, nesterov=True,
                                                 convention=convention)
        theirs = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9,
                                                     nesterov=True)
        jp = jax.tree.map(jnp.asarray, params)
        s, t, p, q = ours.init(jp), theirs.init(jp), jp, jp
        for k, g in enumerate(grads):
            s.hyperparams["momentum"] = t.hyperparams["momentum"] = jnp.asarray(
                0.0 if k in (2, 3) else 0.9)
            jg = jax.tree.map(jnp.asarray, g)
            if jit:
                p, s = _jitted(ours)(p, s, jg, 0.0)
            else:
                mine, s = ours.update(jg, s, p)
                p = optax.apply_updates(p, mine)
            u, t = theirs.update(jg, t, q)
            q = optax.apply_updates(q, u)
            if convention == "optax" or k < 2:  # (torch's keeps its buffer at 0: apart after)
                assert max(rel_diff(p[n], q[n]) for n in params) <= 1e-12, k
    with pytest.raises(ValueError, match="nesterov=True requires momentum > 0"):
        uo.sgd(lr=0.1, momentum=0.0, nesterov=True)


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


CONVENTIONAL = [getattr(uo, n) for n in uo.__all__ if isinstance(getattr(uo, n), type)
                and issubclass(getattr(uo, n), uo.Rule) and getattr(uo, n).conventions]


@pytest.mark.parametrize(("rule", "convention"),
                         [(r, c) for r in CONVENTIONAL for c in r.conventions],
                         ids=lambda x: x if isinstance(x, str) else x.__name__)
def test_inject_hyperparams_builds_the_rule_of_the_convention_given(rule: Any,
                                                                    convention: str) -> None:
    """optax.inject_hyperparams applies the signature's defaults before it builds the rule, so
    every field arrives given: they must be the convention's (optax's weight decay 1e-4 for
    adamw, its eps outside the root for adagrad), not the fields' own, torch's."""
    params = {"w": jnp.ones((3, 2), jnp.float32)}
    given = {"convention": convention}
    given |= {f.name: 0.01 for f in dataclasses.fields(rule)  # (optimistic_adam's lr)
              if f.init and f.default is dataclasses.MISSING}
    built = optax.inject_hyperparams(rule)(**given).init(params).inner_state.rule
    direct = rule(**given)
    for f in dataclasses.fields(direct):
        # (not what the rule found at set-up; a schedule inject_hyperparams evaluates itself)
        if not f.init or callable(getattr(direct, f.name)):
            continue
        got, want = getattr(built, f.name), getattr(direct, f.name)
        assert _same(got, want), (f.name, got, want)


def _same(got: Any, want: Any) -> bool:
    """Equal, but a number (which comes back through the state as a float32 array) to 1e-6."""
    if isinstance(want, (tuple, list)):
        return len(got) == len(want) and all(map(_same, got, want))
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        return not isinstance(got, bool) and math.isclose(float(got), want, rel_tol=1e-6)
    return bool(got == want)


def test_inject_hyperparams_in_optaxs_convention_follows_optaxs_rule() -> None:
    """RMSprop in optax's form (eps outside the root, optax's momentum), injected and jitted,
    the learning rate set between steps: optax's own, injected, to 1e-12 in float64."""
    params, grads = _problem(40)
    with jax.enable_x64(True):
        ours = optax.inject_hyperparams(uo.rmsprop)(lr=0.01, momentum=0.5, convention="optax")
        theirs = optax.inject_hyperparams(optax.rmsprop)(learning_rate=0.01, momentum=0.5)
        p = q = jax.tree.map(jnp.asarray, params)
        s, t = ours.init(p), theirs.init(q)
        step_s, step_t = _jitted(ours), _jitted(theirs)
        for k, g in enumerate(grads):
            if k == 20:
                s.hyperparams["lr"] = t.hyperparams["learning_rate"] = jnp.asarray(0.003)
            jg = jax.tree.map(jnp.asarray, g)
            p, s = step_s(p, s, jg, 0.0)
            q, t = step_t(q, t, jg, 0.0)
            assert max(rel_diff(p[n], q[n]) for n in params) <= 1e-12, k


def test_the_signatures_defaults_are_the_conventions_through_a_partial_too() -> None:
    """A functools.partial that fixes the convention keeps it (its signature is a replaced
    one); a rule without conventions has the plain signature."""
    sig = inspect.signature(functools.partial(uo.adamw, convention="optax"))
    bound = sig.bind(lr=0.1)
    bound.apply_defaults()
    assert bound.arguments["weight_decay"] == 1e-4 and bound.arguments["convention"] == "optax"
    state = optax.inject_hyperparams(functools.partial(uo.adamw, convention="optax"))(
        lr=0.1).init({"w": jnp.ones(2)})
    assert float(state.hyperparams["weight_decay"]) == pytest.approx(1e-4)
    bound = inspect.signature(uo.lamb).bind(lr=0.1)
    bound.apply_defaults()
    assert bound.arguments["weight_decay"] == uo.lamb().weight_decay


def test_a_partials_fixed_values_pickling_and_bind_partial_keep_to_the_convention() -> None:
    """A value a functools.partial fixes is the caller's, not overruled by the convention's
    default; a pickled or copied signature and bind_partial apply the convention's defaults
    too."""
    fixed = functools.partial(uo.adamw, weight_decay=0.05, convention="optax")
    bound = inspect.signature(fixed).bind()
    bound.apply_defaults()
    assert bound.arguments["weight_decay"] == 0.05 and bound.arguments["eps_root"] == 0.0
    state = optax.inject_hyperparams(fixed)(lr=1e-3).init({"w": jnp.ones(2)})
    assert float(state.hyperparams["weight_decay"]) == pytest.approx(0.05)
    # fixed to the very value of the field's own (torch's) default, for another convention:
    # still the caller's (it was read as not fixed, and optax's 1e-4 applied)
    torchs = functools.partial(uo.adamw, weight_decay=float("0.01"), convention="optax")
    bound = inspect.signature(torchs).bind()
    bound.apply_defaults()
    assert bound.arguments["weight_decay"] == 0.01
    for again in (pickle.loads(pickle.dumps(inspect.signature(torchs))),
                  copy.deepcopy(inspect.signature(torchs))):
        bound = again.bind()
        bound.apply_defaults()
        assert bound.arguments["weight_decay"] == 0.01 and bound.arguments["eps_root"] == 0.0
    sig = inspect.signature(uo.adam)
    for again in (pickle.loads(pickle.dumps(sig)), copy.copy(sig), copy.deepcopy(sig)):
        bound = again.bind(lr=1.0, convention="optax")
        bound.apply_defaults()
        assert bound.arguments["amsgrad_max"] == "corrected"
    # (numbers too: pickle makes a new object of each, so a default's identity cannot tell a
    # pickled signature's unfixed field, whose default stays the convention's)
    again = pickle.loads(pickle.dumps(inspect.signature(uo.adamw)))
    bound = again.bind(convention="optax")
    bound.apply_defaults()
    assert bound.arguments["weight_decay"] == 1e-4
    # and a partial's fixed convention stays fixed through pickle and copy
    part = inspect.signature(functools.partial(uo.adamw, convention="optax"))
    for again in (pickle.loads(pickle.dumps(part)), copy.copy(part), copy.deepcopy(part)):
        bound = again.bind()
        bound.apply_defaults()
        assert bound.arguments["weight_decay"] == 1e-4 and bound.arguments["eps_root"] == 0.0
    bound = sig.bind_partial(convention="optax")
    bound.apply_defaults()
    assert bound.arguments["amsgrad_max"] == "corrected"


def test_inject_hyperparams_with_an_unknown_convention_names_it() -> None:
    with pytest.raises(ValueError, match="adamw: convention must be one of .* got 'nope'"):
        optax.inject_hyperparams(uo.adamw)(lr=0.1, convention="nope").init({"w": jnp.ones(2)})


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


@pytest.mark.parametrize(("make", "moments"), [
    (lambda: uo.masked(uo.adam(lr=0.1), {"w": True, "b": False}), 2),
    (lambda: uo.partition({"a": uo.adam(lr=0.1), "b": uo.sgd(lr=0.1)}, {"w": "a", "b": "b"}), 2),
    (lambda: uo.freeze(uo.adam(lr=0.1), "b"), 2),
    (lambda: uo.skip_nonfinite(uo.adam(lr=0.1)), 4),
    (lambda: uo.accumulate(uo.adam(lr=0.1), 2), 6),  # (its running mean too)
    (lambda: uo.mechanize(uo.adam(lr=0.1)), 6),  # (x0 too)
    (lambda: uo.schedule_free_adamw(lr=0.1), 4),
    (lambda: uo.prodigy(), 8),
    (lambda: optax.chain(optax.clip_by_global_norm(1.0),
                         uo.masked(uo.adam(lr=0.1), {"w": True, "b": False})), 2),
])
def test_map_params_maps_the_arrays_of_combinators_and_whole_tree_parts(make: Any,
                                                                       moments: int) -> None:
    # set up from optax's placeholder these called each part's set-up on it and failed
    params, (g,) = _problem(1)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
    tx = make()
    _, state = tx.update(g, tx.init(params), params)
    half = optax.tree.map_params(tx, lambda x: x.astype(jnp.bfloat16), state)
    assert sum(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(half)) == moments
    same = optax.tree.map_params(tx, lambda x: x, state)
    a, b = tx.update(g, same, params), tx.update(g, state, params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_map_params_names_a_part_whose_arrays_it_cannot_mark() -> None:
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    for tx, name in ((uo.galore(lr=0.1), "scale_by_galore"), (uo.kron(lr=0.1), "scale_by_kron")):
        with pytest.raises(TypeError, match=f"map_params: {name} keeps .* jax.tree.map"):
            optax.tree.map_params(tx, lambda x: x, tx.init(params))


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
    tx = uo.chain(uo.adamw(lr=0.1), uo.reduce_on_plateau())
    state = tx.init(params)
    shapes = jax.eval_shape(tx.init, params)
    assert jax.tree.structure(shapes) == jax.tree.structure(state)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(shapes)] == [
        (jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(state)]
    for other in (jax.tree.map(lambda x: None, state), shapes):
        assert repr(other).startswith("State(rule=chain(adamw(lr=")


# --- reduce_on_plateau ----------------------------------------------------------------------


def test_reduce_on_plateau_follows_optax() -> None:
    """After Adam, 300 steps of a loss that stops improving, float64: natively on NumPy
    (``value=``), and through the optax protocol inside optax.chain under jit (to_optax)."""
    losses = _losses()
    params, grads = _problem(len(losses))
    with jax.enable_x64(True):
        theirs = optax.chain(optax.adam(0.05), optax.contrib.reduce_on_plateau(**PLATEAU))
        wrapped = optax.chain(uo.adam(lr=0.05), uo.to_optax(uo.reduce_on_plateau(**PLATEAU)))
        native = uo.chain(uo.adam(lr=0.05), uo.reduce_on_plateau(**PLATEAU))
        jp = jax.tree.map(jnp.asarray, params)
        t, w = theirs.init(jp), wrapped.init(jp)
        n = uo.setup(native, params)
        step_t, step_w = _jitted(theirs), _jitted(wrapped)
        q, pw, pn = jp, jp, params
        scales = []
        for k, (g, loss) in enumerate(zip(grads, losses, strict=True)):
            q, t = step_t(q, t, g, loss)
            pw, w = step_w(pw, w, g, loss)
            n, pn = uo.update(n, pn, g, value=loss)
            scales.append(float(t[1].scale))
            assert _scale(w[1]) == _scale(n) == scales[-1]
            worst = max(max(rel_diff(pw[x], q[x]), rel_diff(pn[x], q[x])) for x in params)
            assert worst <= 1e-12, (k, worst)
    assert sorted(set(scales)) == [0.1, 0.125, 0.25, 0.5, 1.0]  # reduced, down to min_scale
    assert n.tree_states["reduce_on_plateau"]["best_value"].dtype == np.float64


@pytest.mark.parametrize("mode", ["min", "max"])
def test_from_torch_gives_torchs_learning_rates(mode: str) -> None:
    torch = pytest.importorskip("torch")
    losses = _losses() * (1 if mode == "min" else -1)
    for threshold_mode, cooldown, min_lr in [("rel", 0, 0.0), ("abs", 2, 0.004)]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        kw = {"mode": mode, "factor": 0.5, "patience": 4, "threshold": 1e-2,
              "threshold_mode": threshold_mode, "cooldown": cooldown, "min_lr": min_lr}
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)
        state, p = uo.setup(uo.reduce_on_plateau.from_torch(0.1, **kw), [np.zeros(1)]), [np.ones(1)]
        theirs, ours = [], []
        for loss in losses:
            sched.step(float(loss))
            theirs.append(opt.param_groups[0]["lr"])
            state, p = uo.update(state, p, [np.ones(1)], value=loss)
            ours.append(0.1 * _scale(state))
        # without min_lr torch's eps (1e-8) ends the reductions, at the 24th learning rate
        assert len(set(theirs)) == 24 if min_lr == 0 else len(set(theirs)) > 5
        np.testing.assert_allclose(ours, theirs, rtol=1e-15, atol=0)


def test_from_torch_takes_a_threshold_above_1_where_torch_means_one() -> None:
    """torch takes any ``threshold``; with ``mode="max"`` one above 1 asks an improvement to
    exceed ``best*(1 + threshold)`` (here 2.5 times the best), which ``from_torch`` refused
    (``rtol`` was held to [0, 1]): its learning rates are torch's. With ``mode="min"`` no loss
    beats ``best*(1 - threshold)`` from 1 on: refused, in torch's words."""
    torch = pytest.importorskip("torch")
    kw = {"mode": "max", "factor": 0.5, "patience": 1, "threshold": 1.5}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)
    state, p = uo.setup(uo.reduce_on_plateau.from_torch(0.1, **kw), [np.zeros(1)]), [np.ones(1)]
    theirs, ours = [], []
    for metric in [1.0, 3.0, 9.0, 10.0, 11.0, 30.0, 31.0, 32.0, 33.0, 34.0]:
        sched.step(metric)
        theirs.append(opt.param_groups[0]["lr"])
        state, p = uo.update(state, p, [np.ones(1)], value=metric)
        ours.append(0.1 * _scale(state))
    assert len(set(theirs)) == 4  # 3 reductions
    np.testing.assert_allclose(ours, theirs, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\) with mode='min'"):
        uo.reduce_on_plateau.from_torch(0.1, **{**kw, "mode": "min"})


# torch's loop for 12 steps: the loss at p_t, opt.step() at the learning rate as it is, then
# scheduler.step(loss); the losses plateau, so every case reduces (the max case's metrics
# must grow 2.5-fold to improve: threshold 1.5, which torch takes)
TORCH_LOOPS = [
    ({"factor": 0.5, "patience": 1}, [3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ({"factor": 0.5, "patience": 0, "cooldown": 2, "threshold": 0.1, "threshold_mode": "abs"},
     [3.0, 2.95, 2.0, 1.95, 1.9, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]),
    ({"factor": 0.3, "patience": 1, "min_lr": 0.004, "eps": 1e-4},
     [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ({"mode": "max", "factor": 0.5, "patience": 1, "threshold": 1.5},
     [1.0, 3.0, 9.0, 10.0, 11.0, 30.0, 31.0, 32.0, 33.0, 34.0, 35.0, 36.0]),
]


@pytest.mark.parametrize(("kw", "losses"), TORCH_LOOPS,
                         ids=["rel", "abs-cooldown", "min_lr-eps", "max-threshold-1.5"])
def test_from_torch_steps_as_torchs_scheduler_loop(kw: dict[str, Any],
                                                   losses: list[float]) -> None:
    """``from_torch`` scales each update as torch's loop does: ``opt.step()`` at the learning
    rate as it is, then ``scheduler.step(loss)``, the reduction first moving the *next* step
    (it had scaled the update given that loss already, one step early: 0.1, 0.1, 0.1, 0.05
    where torch steps 0.1 four times). SGD's params side by side with torch's for 12 steps,
    to float64 rounding (1e-15 of params near 1: torch adds ``-lr*g`` in one rounding, uniopt
    rounds the step, scales it and subtracts it)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    p0, grads = rng.standard_normal(4), rng.standard_normal((len(losses), 4))
    w = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.SGD([w], lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)
    rule = uo.chain(uo.sgd(lr=0.1), uo.reduce_on_plateau.from_torch(0.1, **kw))
    p = [p0.copy()]
    state = uo.setup(rule, p)
    lrs = set()
    for g, loss in zip(grads, losses, strict=True):
        lrs.add(opt.param_groups[0]["lr"])
        w.grad = torch.tensor(g)
        opt.step()
        sched.step(loss)
        state, p = uo.update(state, p, [g], value=loss)
        np.testing.assert_allclose(p[0], w.detach().numpy(), rtol=0, atol=1e-15)
    assert len(lrs) >= 3  # reduced twice at least
    assert 0.1 * _scale(state) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-15)


def test_from_torchs_timing_goes_through_jit_and_a_checkpoint(tmp_path: Any) -> None:
    """The timing is a field of the record (``timing="torch"``): a jitted loop compiles once
    and equals the eager one; a state saved mid-run loads with it and resumes as the run
    that never stopped, bit for bit; optax's timing stays the plain constructor's."""
    rule = uo.chain(uo.sgd(lr=0.1), uo.reduce_on_plateau.from_torch(0.1, factor=0.5,
                                                                    patience=1))
    assert rule.transforms[1].timing == "torch" and uo.reduce_on_plateau().timing == "optax"
    losses = [3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0]
    grads = [np.full(2, 0.5 + k) for k in range(len(losses))]
    with jax.enable_x64(True):
        step = jax.jit(lambda s, p, g, v: uo.update(s, p, g, value=v))
        js, jp = uo.setup(rule, [jnp.zeros(2)]), [jnp.zeros(2)]
        ns, np_ = uo.setup(rule, [np.zeros(2)]), [np.zeros(2)]
        for k, (g, loss) in enumerate(zip(grads, losses, strict=True)):
            js, jp = step(js, jp, [jnp.asarray(g)], loss)
            ns, np_ = uo.update(ns, np_, [g], value=loss)
            if k == 3:
                uo.save(tmp_path / "plateau.uo", ns, params=np_)
                back, bp = uo.load(tmp_path / "plateau.uo", like=(rule, [np.zeros(2)]),
                                   params=True)
        assert step._cache_size() == 1
        np.testing.assert_array_equal(np.asarray(jp[0]), np_[0])
    assert back.rule.transforms[1].timing == "torch"
    for g, loss in zip(grads[4:], losses[4:], strict=True):
        back, bp = uo.update(back, bp, [g], value=loss)
    assert bp[0].tobytes() == np_[0].tobytes()
    assert _scale(back) == _scale(ns) == 0.25


def test_reduce_on_plateau_in_place_on_float32_and_torch() -> None:
    """update_ is update; the state keeps the params' float32 and int32 counts; torch tensors
    take the same steps."""
    torch = pytest.importorskip("torch")
    rule = uo.chain(uo.sgd(lr=0.1), uo.reduce_on_plateau(factor=0.5, patience=1))
    a, b = [np.ones(3, np.float32)], [np.ones(3, np.float32)]
    t = [torch.ones(3)]
    sa, sb, st = uo.setup(rule, a), uo.setup(rule, b), uo.setup(rule, t)
    for loss in [3.0, 2.0, 2.0, 2.0, 2.5]:
        g = np.full(3, 0.5, np.float32)
        sa, a = uo.update(sa, a, [g], value=loss)
        sb = uo.update_(sb, b, [g], value=np.float32(loss))
        st = uo.update_(st, t, [torch.from_numpy(g)], value=torch.tensor(loss))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0], t[0].numpy())
    assert _scale(sa) == _scale(st) == 0.125  # patience 1: each evaluation without a gain
    dtypes = {k: str(v.dtype) for k, v in sa.tree_states["reduce_on_plateau"].items()}
    assert dtypes == {"scale": "float32", "best_value": "float32", "avg_value": "float32",
                      "plateau_count": "int32", "cooldown_count": "int32", "count": "int32"}


def test_a_plateau_state_goes_through_a_checkpoint() -> None:
    serialization = pytest.importorskip("flax.serialization")
    params, grads = _problem(40)
    rule = uo.chain(uo.adam(lr=0.05), uo.reduce_on_plateau(**PLATEAU))
    state, p = uo.setup(rule, params), params
    for g, loss in zip(grads[:20], _losses(20), strict=True):
        state, p = uo.update(state, p, g, value=loss)
    back = serialization.from_bytes(uo.setup(rule, params), serialization.to_bytes(state))
    q = p
    for g, loss in zip(grads[20:], _losses(20), strict=True):
        state, p = uo.update(state, p, g, value=loss)
        back, q = uo.update(back, q, g, value=loss)
    for name in params:
        np.testing.assert_array_equal(p[name], q[name])
    assert jax.tree.map(np.array_equal, state.tree_states, back.tree_states) == jax.tree.map(
        lambda _: True, state.tree_states)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"factor": 1.0}, ValueError, r"reduce_on_plateau: factor must be in \(0, 1\), got 1.0"),
    ({"factor": 0}, ValueError, r"reduce_on_plateau: factor must be in \(0, 1\), got 0"),
    ({"patience": -1}, ValueError, "reduce_on_plateau: patience must be an integer >= 0, got -1"),
    ({"patience": 2.5}, TypeError, "reduce_on_plateau: patience must be an integer >= 0, got 2.5"),
    ({"cooldown": True}, TypeError,
     "reduce_on_plateau: cooldown must be an integer >= 0, got True"),
    ({"accumulation_size": 0}, ValueError,
     "reduce_on_plateau: accumulation_size must be an integer >= 1, got 0"),
    ({"rtol": 1.5}, ValueError,
     r"reduce_on_plateau: rtol must be in \[0, 1\] with mode='min', got 1.5"),
    ({"rtol": -0.5, "mode": "max"}, ValueError, "reduce_on_plateau: rtol must be >= 0, got -0.5"),
    ({"timing": "late"}, ValueError,
     r"reduce_on_plateau: timing must be one of \('optax', 'torch'\), got 'late'"),
    ({"atol": -1.0}, ValueError, "reduce_on_plateau: atol must be >= 0, got -1.0"),
    ({"min_scale": 2.0}, ValueError, r"reduce_on_plateau: min_scale must be in \[0, 1\], got 2.0"),
    ({"eps": -1e-8}, ValueError, "reduce_on_plateau: eps must be >= 0, got -1e-08"),
    ({"mode": "mean"}, ValueError, "reduce_on_plateau: mode must be 'min' or 'max', got 'mean'"),
])
def test_bad_plateau_settings_are_named(kwargs: dict[str, Any], error: type,
                                        message: str) -> None:
    with pytest.raises(error, match=message):
        uo.reduce_on_plateau(**kwargs)


@pytest.mark.parametrize(("args", "kwargs", "error", "message"), [
    ((0.0,), {}, ValueError, "lr must be the optimizer's learning rate, a number > 0, got 0.0"),
    ((None,), {}, ValueError, "lr must be the optimizer's learning rate, a number > 0, got None"),
    ((0.1,), {"min_lr": 0.2}, ValueError, r"min_lr must be in \[0, lr=0.1\], got 0.2"),
    ((0.1,), {"threshold_mode": "relative"}, ValueError,
     "threshold_mode must be 'rel' or 'abs', got 'relative'"),
    ((0.1,), {"patience": -1}, ValueError, "patience must be an integer >= 0, got -1"),
    ((0.1,), {"mode": "up"}, ValueError, "mode must be 'min' or 'max', got 'up'"),
    # torch's names and the values given (eps had been named with eps/lr, threshold as rtol)
    ((0.001,), {"eps": -1e-8}, ValueError, "eps must be a number >= 0, got -1e-08"),
    ((0.001,), {"threshold": -0.01}, ValueError,
     r"threshold must be in \[0, 1\) with mode='min' and threshold_mode='rel', got -0.01"),
    ((0.001,), {"threshold": 1.5}, ValueError,
     r"threshold must be in \[0, 1\) with mode='min' and threshold_mode='rel', got 1.5"),
    ((0.001,), {"threshold": -0.01, "threshold_mode": "abs"}, ValueError,
     "threshold must be a number >= 0, got -0.01"),
    ((0.001,), {"threshold": -0.01, "mode": "max"}, ValueError,
     "threshold must be a number >= 0, got -0.01"),
    ((0.001,), {"threshold": None}, ValueError, "threshold must be .*, got None"),
    ((0.1,), {"min_lr": None}, ValueError, r"min_lr must be in \[0, lr=0.1\], got None"),
])
def test_bad_torch_settings_are_named(args: tuple[Any, ...], kwargs: dict[str, Any],
                                      error: type, message: str) -> None:
    with pytest.raises(error, match=f"reduce_on_plateau: {message}"):
        uo.reduce_on_plateau.from_torch(*args, **kwargs)


def test_the_loss_is_asked_for_and_must_be_one_number() -> None:
    params = [np.ones(2)]
    rule = uo.chain(uo.sgd(lr=0.1), uo.reduce_on_plateau())
    state = uo.setup(rule, params)
    with pytest.raises(TypeError, match=r"reduce_on_plateau reads the loss: pass it as "
                                        r"uo.update\(state, params, grads, value=loss\)"):
        uo.update_(state, params, [np.ones(2)])
    with pytest.raises(ValueError, match=r"value= must be one number, the step's loss; got an "
                                         r"array of shape \(2,\)"):
        uo.update_(state, params, [np.ones(2)], value=np.ones(2))
    np.testing.assert_array_equal(params[0], [1.0, 1.0])
    assert int(state.tree_states["reduce_on_plateau"]["count"]) == 0
    # optax.chain keeps extra arguments from members that are not its own kind
    tx = optax.chain(optax.scale(1.0), rule)
    with pytest.raises(TypeError, match="in an optax.chain, wrap the uniopt transform in "
                                        "uo.to_optax"):
        tx.update([np.ones(2)], tx.init(params), params, value=1.0)
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    with pytest.raises(TypeError, match=r"reduce_on_plateau reads the loss, which step\(\) does "
                                        "not take; use torch.optim.lr_scheduler.ReduceLROnPlateau"):
        ut.Optimizer([torch.nn.Parameter(torch.zeros(2))], rule)


def test_the_loss_reaches_a_plateau_inside_rules_that_run_rules() -> None:
    """accumulate and partition hand ``value`` on to their members: the scale follows optax's
    MultiSteps(chain(adam, reduce_on_plateau)), fed the same losses."""
    losses = _losses()
    params, grads = _problem(len(losses))
    with jax.enable_x64(True):
        theirs = optax.MultiSteps(
            optax.chain(optax.adam(0.05), optax.contrib.reduce_on_plateau(**PLATEAU)), 2,
            accumulator_dtype=jnp.float64)
        jp = jax.tree.map(jnp.asarray, params)
        t = theirs.init(jp)
        step_t = _jitted(theirs)
        rule = uo.accumulate(uo.chain(uo.adam(lr=0.05), uo.reduce_on_plateau(**PLATEAU)), 2)
        n = uo.setup(rule, params)
        q, pn = jp, params
        for g, loss in zip(grads, losses, strict=True):
            q, t = step_t(q, t, g, loss)
            n, pn = uo.update(n, pn, g, value=loss)
        assert max(rel_diff(pn[x], q[x]) for x in params) <= 1e-12
        inner = n.tree_states["accumulate"]["inner"]
        assert float(inner.tree_states["reduce_on_plateau"]["scale"]) < 1.0


@pytest.mark.parametrize("library", ["numpy", "jax"])
def test_an_adjusted_state_keeps_its_numbers_under_the_protocol(
        library: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """``uo.adjust`` on a state that ``rule.update`` steps (a flax TrainState's, an NNX
    Optimizer's): the state's numbers win over the transformation's from then on, eagerly and
    under ``jax.jit``, where the first adjust compiles nothing anew: the same bits as handing
    the protocol a transformation with the new numbers. Before, the transformation's numbers
    were used and written back over the state's, silently."""
    make = np.asarray if library == "numpy" else jnp.asarray
    tx, later = uo.adamw(lr=0.1, weight_decay=0.1), uo.adamw(lr=0.01, weight_decay=0.5)
    params = {"w": make(np.linspace(-1.0, 1.0, 6).reshape(3, 2)), "b": make(np.ones(2))}
    grads = [{k: make(np.cos(np.arange(v.size) + i).reshape(v.shape)) for k, v in params.items()}
             for i in range(6)]
    jit = (lambda f: f) if library == "numpy" else jax.jit
    step, new_step = jit(tx.update), jit(later.update)
    state, theirs, p, q = tx.init(params), tx.init(params), params, params
    for i, g in enumerate(grads):
        if i == 2:
            state = uo.adjust(state, lr=0.01, weight_decay=0.5)
        u, state = step(g, state, p)
        v, theirs = (step if i < 2 else new_step)(g, theirs, q)
        p, q = {k: p[k] + u[k] for k in p}, {k: q[k] + v[k] for k in q}
        assert float(state.rule.lr) == pytest.approx(0.01 if i >= 2 else 0.1, rel=1e-7)
        for k in p:
            np.testing.assert_array_equal(np.asarray(p[k]), np.asarray(q[k]))
    if library == "jax":
        assert step._cache_size() == 1  # the adjust changed numbers, not the program
    # a state never adjusted takes the transformation's numbers, as optax's protocol does
    # (optax.inject_hyperparams rebuilds the rule with new ones at every step)
    u, _ = uo.sgd(lr=0.5).update(grads[0], uo.sgd(lr=0.1).init(params), params)
    np.testing.assert_array_equal(np.asarray(u["b"]), -0.5 * np.asarray(grads[0]["b"]))
    # and a checkpoint keeps the state's say
    path = tmp_path_factory.mktemp("adjusted") / "state.uo" if library == "numpy" else None
    if path is not None:
        uo.save(path, state)
        u, _ = tx.update(grads[0], uo.load(path, like=state), p)
        v, _ = later.update(grads[0], state, p)
        np.testing.assert_array_equal(u["w"], v["w"])


def test_an_adjust_of_another_form_is_said_under_jit_and_the_state_keeps_its_record() -> None:
    """A schedule adjusted to a number (or the reverse) is a program of another form: under
    ``jax.jit`` the protocol steps with the transformation's numbers, as docs/optax.md says,
    and warns when it traces the step. The state went back in the transformation's form,
    which flax NNX wrote into the adjusted state's leaves by position (every number a slot
    off: lr 0.9, and uo.save kept it; a sweep's finding): it goes back with its own record,
    leaves as they came, and a jitted step keeps one cache entry."""
    tx = uo.adam(lr=uo.schedules.cosine(1e-2, steps=100))
    params = {"w": jnp.ones(3)}
    g = {"w": jnp.full(3, 0.5)}
    state = uo.adjust(tx.init(params), lr=1e-3)
    eager_u, _ = tx.update(g, state, params)
    _, want = uo.update(state, params, g)
    np.testing.assert_allclose(np.asarray(params["w"] + eager_u["w"]), np.asarray(want["w"]),
                               rtol=1e-6)
    step = jax.jit(tx.update)
    with pytest.warns(UserWarning, match=r"under jax.jit the optax protocol steps with the "
                                         r"numbers of the transformation it is called on"):
        _, out = step(g, state, params)
    assert jax.tree.structure(out) == jax.tree.structure(state)
    assert float(out.rule.lr) == pytest.approx(1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            _, out = step(g, out, params)
    assert step._cache_size() == 1
    # an optimizer made again inside the step with another schedule (other numbers), never
    # adjusted: stepped with the transformation's numbers, as before, and said
    make = lambda: uo.adamw(lr=optax.cosine_decay_schedule(2e-2, 100))  # noqa: E731

    @jax.jit
    def again(s: Any) -> Any:
        return make().update(g, s, params)

    fresh = uo.adamw(lr=optax.cosine_decay_schedule(1e-2, 100)).init(params)
    with pytest.warns(UserWarning, match=r"an optimizer made again with another optax "
                                         r"schedule or member \(other code or numbers\) steps"):
        u, _ = again(fresh)
    v, _ = make().update(g, fresh, params)
    np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(v["w"]), rtol=1e-6)


@pytest.mark.parametrize(("make", "setting"), [
    (lambda: uo.chain(optax.clip_by_global_norm(1.0), uo.sgd(lr=0.1)), {"lr": 0.001}),
    (lambda: uo.adamw(lr=optax.cosine_decay_schedule(0.1, 100), weight_decay=0.1),
     {"weight_decay": 0.5}),
    (lambda: uo.masked(uo.chain(optax.clip_by_global_norm(1.0), uo.sgd(lr=0.1)), "w"),
     {"lr": 0.001}),
])
def test_an_optimizer_made_again_each_step_takes_an_adjust_under_jit_and_warns_of_none(
        make: Any, setting: dict[str, float]) -> None:
    """An optimizer built inside the step (from a config; optax.inject_hyperparams' factory
    does so) holds new optax members and schedules each time: compared as objects they made
    another form, so under jax.jit a plain adjust was dropped (lr 0.1 stepped where 0.001 was
    set) and a state never adjusted warned of an adjust."""
    params = {"w": jnp.ones(3)}
    g = {"w": jnp.full(3, 0.1)}

    def step(state: Any) -> Any:
        u, state = make().update(g, state, params)
        return optax.apply_updates(params, u), state

    state = make().init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = step(state)[0]["w"]
        np.testing.assert_array_equal(np.asarray(jax.jit(step)(state)[0]["w"]),
                                      np.asarray(plain))
        state = uo.adjust(state, **setting)
        want = step(state)[0]["w"]
        got = jax.jit(step)(state)[0]["w"]
    assert not np.allclose(np.asarray(want), np.asarray(plain))  # (the adjust is seen)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


@pytest.mark.parametrize("seq", ["eager-apply_if_finite", "jit-adjust-cond",
                                 "cond-adjust-cond", "jit-adjust-eval_shape-jit"])
def test_a_state_adjusted_then_first_flattened_in_a_trace_steps_on(seq: str) -> None:
    """After ``uo.adjust``, a state first flattened inside a trace (a ``lax.cond`` branch
    handing it back, ``apply_if_finite``'s eager step, ``jax.eval_shape``) cached the trace's
    array of its numbers on the rule: the next step raised UnexpectedTracerError. Each
    sequence's parameters are those of plain eager steps with the same adjust."""
    with jax.enable_x64(True):
        tx = uo.adamw(lr=1e-2, weight_decay=0.1)
        p = {"w": jnp.linspace(-1.0, 1.0, 3)}
        gs = [{"w": jnp.asarray([0.3, -0.2, 0.1]) * (k + 1)} for k in range(3)]

        def cond(g: Any, st: Any, p: Any) -> Any:
            return jax.lax.cond(True, lambda: tx.update(g, st, p), lambda: (g, st))

        first, second = {
            "eager-apply_if_finite": (None, None),
            "jit-adjust-cond": (jax.jit(tx.update), cond),
            "cond-adjust-cond": (cond, cond),
            "jit-adjust-eval_shape-jit": (jax.jit(tx.update), jax.jit(tx.update)),
        }[seq]
        wrapped = optax.apply_if_finite(tx, 3) if first is None else tx
        ends = []
        for plain in (True, False):
            st, q = wrapped.init(p), p
            for k, g in enumerate(gs):
                if k == 1:
                    st = uo.adjust(st, lr=1e-3)
                    if seq.endswith("eval_shape-jit") and not plain:
                        jax.eval_shape(lambda st=st: st)
                step = wrapped.update if plain or first is None else first if k == 0 else second
                u, st = step(g, st, q)
                q = optax.apply_updates(q, u)
            ends.append(np.asarray(q["w"]))
        assert rel_diff(ends[1], ends[0]) <= 1e-14


def test_apply_if_finite_around_a_uniopt_rule_steps_eagerly_as_around_optaxs() -> None:
    """``optax.apply_if_finite`` steps its inner transformation inside ``lax.cond``, eagerly
    too: a state's numbers a step had handed back were read inside that trace, and its second
    step raised JAX's TracerBoolConversionError. 20 eager steps, a NaN gradient at step 7,
    against the same around ``optax.adam``."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        grads = [{"w": jnp.asarray(rng.normal(size=3))} for _ in range(20)]
        grads[7] = {"w": jnp.asarray([1.0, np.nan, 0.0])}
        out = []
        for inner in (optax.adam(1e-2), uo.adam(lr=1e-2, convention="optax")):
            tx = optax.apply_if_finite(inner, 3)
            p = {"w": jnp.ones(3)}
            s = tx.init(p)
            for g in grads:
                u, s = tx.update(g, s, p)
                p = optax.apply_updates(p, u)
            out.append(np.asarray(p["w"]))
        assert rel_diff(out[1], out[0]) <= 1e-12


def test_a_loss_reading_member_of_an_optax_chain_is_told_to_be_wrapped() -> None:
    """optax.chain hands value= only to members of its extra-arguments kind: polyak_sgd
    unwrapped in one got no loss, and the message said to pass value=, which the caller had."""
    import jax.numpy as jnp

    p = {"w": jnp.ones(3)}
    g = {"w": jnp.full(3, 0.5)}
    bare = optax.chain(optax.clip(1.0), uo.polyak_sgd())
    with pytest.raises(TypeError, match=r"in an optax.chain, which hands value= only to members "
                                        r"of its extra-arguments kind, as uo.to_optax\(...\)"):
        bare.update(g, bare.init(p), p, value=jnp.array(1.0))
    wrapped = optax.chain(optax.clip(1.0), uo.to_optax(uo.polyak_sgd()))
    wrapped.update(g, wrapped.init(p), p, value=jnp.array(1.0))


def test_numpy_params_through_optax_apply_updates_step_on() -> None:
    """tx.init of NumPy params, then optax.apply_updates (which computes with jax.numpy) hands
    back JAX params: the next update refused the NumPy state ("set up for other params"), then
    the NumPy gradients, where optax's own rules step on. They step on as JAX arrays."""
    with jax.enable_x64(True):
        ours, theirs = ({"a": np.ones(3)} for _ in range(2))
        tx, peer = uo.adam(lr=0.1, convention="optax"), optax.adam(0.1)
        s, t = tx.init(ours), peer.init(theirs)
        for i in range(4):
            g = {"a": np.full(3, 0.5 + i)}
            u, s = tx.update(g, s, ours)
            ours = optax.apply_updates(ours, u)
            v, t = peer.update(g, t, theirs)
            theirs = optax.apply_updates(theirs, v)
        assert isinstance(ours["a"], jax.Array)
        # (the first step NumPy's arithmetic, the others XLA's, which fuses multiply-adds)
        np.testing.assert_allclose(np.asarray(ours["a"]), np.asarray(theirs["a"]), rtol=1e-13)
