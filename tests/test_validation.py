"""Bad input raises a ValueError/TypeError that names the bad value, before anything changes.

Every case that has a state and params runs both the pure and the in-place update and then
checks that params, grads, every slot and ``state.step`` are exactly what they were: a bad
input must never half-update.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from helpers import WIDE_LEAVES, expect_compiled
from uniopt.engine import SlotsChanged, flat_list_def

jnp = pytest.importorskip("jax.numpy")
torch = pytest.importorskip("torch")
import uniopt.torch as ut  # noqa: E402

# --- helpers ------------------------------------------------------------------------------------


def _opt_adam(**kw):
    return uo.optimistic_adam(**{"lr": 1e-3, **kw})


# A step over many leaves runs uniopt's compiled NumPy loop, a small one the reference code:
# "wide" params add enough leaves for the first, and bad input must be caught on both.


def _on_path(width, steps):
    """Expect the good steps before the bad input on the path the width is for."""
    return expect_compiled(steps if width == "wide" else 0)


def _params(width="narrow"):
    params = {
        "layer": [np.linspace(-1.0, 1.0, 6).reshape(2, 3), np.array([0.5, -0.25, 2.0])],
        "bias": np.array([0.1, -0.2]),
    }
    if width == "wide":
        params["many"] = [np.full(3, 0.1 * i) for i in range(WIDE_LEAVES)]
    return params


def _grads(like=None):
    """Gradients for ``_params()``, or for the params ``like`` (narrow or wide)."""
    grads = {
        "layer": [np.full((2, 3), 0.3), np.array([1.0, -1.0, 0.5])],
        "bias": np.array([-0.7, 0.2]),
    }
    if like is not None and "many" in like:
        grads["many"] = [np.full(3, 1.0 - 0.05 * i) for i in range(len(like["many"]))]
    return grads


def _copy(a):
    if isinstance(a, torch.Tensor):
        return a.detach().numpy().copy()
    return np.array(a, copy=True)


def _snapshot(state, *trees):
    """Copies of everything an update could touch."""
    slots = {k: [_copy(a) for a in v] for k, v in state.slots.items()}
    leaves = [[_copy(a) for a in uo.trainables(t)] for t in trees]
    return state.step, slots, leaves


def _assert_same(snap, state, *trees):
    step, slots, leaves = snap
    assert state.step == step
    assert sorted(state.slots) == sorted(slots)
    for k, arrays in slots.items():
        assert len(state.slots[k]) == len(arrays)
        for old, now in zip(arrays, state.slots[k], strict=True):
            assert np.array_equal(old, _copy(now)), k
    for before, tree in zip(leaves, trees, strict=True):
        now = uo.trainables(tree)
        assert len(now) == len(before)
        for old, a in zip(before, now, strict=True):
            assert np.array_equal(old, _copy(a))


def _stepped(rule, width="narrow", steps=2):
    """A state that has taken a few updates, so its slots are not all zero."""
    params = _params(width)
    state = uo.setup(rule, params)
    with _on_path(width, steps):
        for _ in range(steps):
            state = uo.update_(state, params, _grads(params))
    return state, params


@pytest.fixture(params=["narrow", "wide"])
def width(request):
    return request.param


def _rejects(exc, match, state, params, grads, *, pure=True, inplace=True):
    """Both update forms raise ``exc`` matching ``match`` and leave every input as it was."""
    snap = _snapshot(state, params, grads)
    if pure:
        with pytest.raises(exc, match=match):
            uo.update(state, params, grads)
        _assert_same(snap, state, params, grads)
    if inplace:
        with pytest.raises(exc, match=match):
            uo.update_(state, params, grads)
        _assert_same(snap, state, params, grads)


# --- hyperparameter values ----------------------------------------------------------------------

# (constructor, keyword, label in the message): every non-negative hyperparameter of every rule
# and building block.
NONNEG_FIELDS = [
    (uo.sgd, "lr", "lr"),
    (uo.sgd, "momentum", "momentum"),
    (uo.sgd, "weight_decay", "weight_decay"),
    (uo.sgd, "dampening", "dampening"),
    (uo.adagrad, "lr", "lr"),
    (uo.adagrad, "lr_decay", "lr_decay"),
    (uo.adagrad, "eps", "eps"),
    (uo.adagrad, "weight_decay", "weight_decay"),
    (uo.adagrad, "initial_accumulator_value", "initial_accumulator_value"),
    (uo.rmsprop, "lr", "lr"),
    (uo.rmsprop, "eps", "eps"),
    (uo.rmsprop, "weight_decay", "weight_decay"),
    (uo.rmsprop, "momentum", "momentum"),
    (uo.rmsprop, "alpha", "alpha"),
    (uo.adadelta, "lr", "lr"),
    (uo.adadelta, "eps", "eps"),
    (uo.adadelta, "weight_decay", "weight_decay"),
    (uo.adadelta, "rho", "rho"),
    (uo.adam, "lr", "lr"),
    (uo.adam, "eps", "eps"),
    (uo.adam, "weight_decay", "weight_decay"),
    (uo.adamw, "lr", "lr"),
    (uo.adamw, "eps", "eps"),
    (uo.adamw, "weight_decay", "weight_decay"),
    (_opt_adam, "lr", "lr"),
    (_opt_adam, "eps", "eps"),
    (_opt_adam, "eps_root", "eps_root"),
    (_opt_adam, "alpha", "alpha"),
    (_opt_adam, "beta", "beta"),
    (_opt_adam, "b1", "b1"),
    (_opt_adam, "b2", "b2"),
    (uo.weight_decay, "wd", "wd"),
    (uo.scale_by_lr, "lr", "lr"),
    (uo.trace, "momentum", "momentum"),
    (uo.trace, "dampening", "dampening"),
    (uo.clip, "max_delta", "max_delta"),
    (uo.scale_by_adam, "b1", "b1"),
    (uo.scale_by_adam, "eps", "eps"),
    (uo.scale_by_adam, "eps_root", "eps_root"),
    (uo.scale_by_rms, "eps", "eps"),
    (uo.scale_by_adagrad, "lr", "lr"),
    (uo.scale_by_adagrad, "eps", "eps"),
    (uo.scale_by_adadelta, "eps", "eps"),
    (uo.scale_by_optimistic_gradient, "alpha", "alpha"),
    (uo.scale_by_optimistic_gradient, "beta", "beta"),
    *((rule, kw, kw) for rule in (uo.adamax, uo.nadam, uo.radam)
      for kw in ("lr", "eps", "weight_decay")),
    (uo.nadam, "momentum_decay", "momentum_decay"),
    *((uo.asgd, kw, kw) for kw in ("lr", "lambd", "alpha", "t0", "weight_decay")),
    (uo.rprop, "lr", "lr"),
    (uo.decoupled_weight_decay, "lr", "lr"),
    (uo.decoupled_weight_decay, "wd", "wd"),
]


def _id(case):
    ctor, kw = case[0], case[1]
    return f"{getattr(ctor, '__name__', 'optimistic_adam').lstrip('_')}-{kw}"


@pytest.mark.parametrize("case", NONNEG_FIELDS, ids=_id)
def test_negative_hyperparameter(case):
    ctor, kw, label = case
    with pytest.raises(ValueError, match=rf"\b{label} must be .*got -0\.5\b"):
        ctor(**{kw: -0.5})


# values just outside the closed/half-open unit intervals, and the value that makes the
# interval half-open (a decay of exactly 1 never forgets)
UNIT_CASES = [
    (uo.adam, {"betas": (1.0, 0.999)}, r"betas\[0\]", "1.0"),
    (uo.adam, {"betas": (0.9, 1.0)}, r"betas\[1\]", "1.0"),
    (uo.adam, {"betas": (-0.1, 0.999)}, r"betas\[0\]", "-0.1"),
    (uo.adam, {"betas": (0.9, -0.1)}, r"betas\[1\]", "-0.1"),
    (uo.adam, {"betas": (0.9, 1.5)}, r"betas\[1\]", "1.5"),
    (uo.adamw, {"betas": (1.0, 0.999)}, r"betas\[0\]", "1.0"),
    (uo.adamw, {"betas": (0.9, -0.001)}, r"betas\[1\]", "-0.001"),
    (_opt_adam, {"b1": 1.0}, "b1", "1.0"),
    (_opt_adam, {"b2": 1.0}, "b2", "1.0"),
    (_opt_adam, {"b1": -0.2}, "b1", "-0.2"),
    (_opt_adam, {"b2": 2.0}, "b2", "2.0"),
    (uo.scale_by_adam, {"b1": 1.0}, "b1", "1.0"),
    (uo.scale_by_adam, {"b2": 1.0}, "b2", "1.0"),
    (uo.adadelta, {"rho": 1.01}, "rho", "1.01"),
    (uo.adadelta, {"rho": -0.01}, "rho", "-0.01"),
    (uo.scale_by_adadelta, {"rho": 1.5}, "rho", "1.5"),
    (uo.rmsprop, {"alpha": 1.01}, "alpha", "1.01"),
    (uo.rmsprop, {"alpha": -0.01}, "alpha", "-0.01"),
    (uo.scale_by_rms, {"alpha": 2.0}, "alpha", "2.0"),
    (uo.sgd, {"momentum": 0.9, "dampening": 1.5}, "dampening", "1.5"),
    (uo.trace, {"dampening": 1.5}, "dampening", "1.5"),
    (uo.adamax, {"betas": (1.0, 0.999)}, r"betas\[0\]", "1.0"),
    (uo.nadam, {"betas": (0.9, 1.0)}, r"betas\[1\]", "1.0"),
    (uo.radam, {"betas": (-0.1, 0.999)}, r"betas\[0\]", "-0.1"),
    (uo.scale_by_nadam, {"b2": 1.0}, "b2", "1.0"),
]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"etas": (1.0, 1.2)},
         r"etas must satisfy 0 < etas\[0\] < 1 < etas\[1\], got \(1\.0, 1\.2\)"),
        ({"etas": (0.5, 1.0)}, r"etas must satisfy .*got \(0\.5, 1\.0\)"),
        ({"etas": (0.0, 1.2)}, r"etas\[0\] must be > 0, got 0\.0"),
        ({"step_sizes": (-1e-6, 50)}, r"step_sizes\[0\] must be >= 0, got -1e-06"),
        ({"step_sizes": (1.0, 0.5)}, r"step_sizes must be \(min, max\) with min <= max, got "
                                     r"\(1\.0, 0\.5\)"),
        ({"etas": (0.5,)}, r"etas must be a tuple of 2 numbers or schedules, got \(0\.5,\)"),
    ],
)
def test_rprop_etas_and_step_sizes(kw, match):
    for ctor in (uo.rprop, uo.scale_by_rprop):
        with pytest.raises(ValueError, match=match):
            ctor(**kw)


@pytest.mark.parametrize("ctor,kw,label,value", UNIT_CASES)
def test_decay_outside_unit_interval(ctor, kw, label, value):
    with pytest.raises(ValueError, match=rf"{label} must be in \[0, 1[\])], got {value}\b"):
        ctor(**kw)


@pytest.mark.parametrize(
    "ctor,kw",
    [
        (uo.adadelta, {"rho": 1.0}),
        (uo.adadelta, {"rho": 0.0}),
        (uo.rmsprop, {"alpha": 1.0}),
        (uo.rmsprop, {"alpha": 0.0}),
        (uo.adam, {"betas": (0.0, 0.0)}),
    ],
)
def test_closed_interval_ends_are_valid(ctor, kw):
    # the ends of [0, 1] are legal: the rejections above are about the range, not the value 1
    rule = ctor(**kw)
    for k, v in kw.items():
        assert getattr(rule, k) == v


@pytest.mark.parametrize(
    "build",
    [
        lambda: uo.sgd(lr=0.1, nesterov=True),
        lambda: uo.sgd(lr=0.1, momentum=0.0, nesterov=True),
        lambda: uo.rmsprop(momentum=0.0, nesterov=True),
    ],
    ids=["sgd-default-momentum", "sgd-momentum0", "rmsprop-momentum0"],
)
def test_nesterov_needs_momentum(build):
    with pytest.raises(ValueError, match=r"nesterov=True requires momentum > 0, got momentum="):
        build()


def test_nesterov_with_dampening_is_torchs_step_for_a_param_groups_values():
    """torch's constructor refuses the pair, its step computes it (a group's values are never
    checked): b = mu*b + (1 - d)*g after the first b = g, p -= lr*(g + mu*b)."""
    rng = np.random.default_rng(0)
    p = rng.normal(size=4)
    state = uo.setup(uo.sgd(lr=0.1, momentum=0.9, dampening=0.3, nesterov=True), p)
    want, b = p, None
    for _ in range(5):
        g = rng.normal(size=4)
        state, p = uo.update(state, p, g)
        b = g if b is None else 0.9 * b + 0.7 * g
        want = want - 0.1 * (g + 0.9 * b)
        assert np.allclose(p, want, rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    "ctor,kw,label",
    [
        (uo.sgd, {"lr": math.nan}, "lr"),
        (uo.sgd, {"momentum": math.nan}, "momentum"),
        (uo.adagrad, {"eps": math.nan}, "eps"),
        (uo.rmsprop, {"alpha": math.nan}, "alpha"),
        (uo.adadelta, {"rho": math.nan}, "rho"),
        (uo.adam, {"betas": (math.nan, 0.999)}, r"betas\[0\]"),
        (uo.adam, {"weight_decay": math.nan}, "weight_decay"),
        (uo.adamw, {"lr": np.float64("nan")}, "lr"),
        (_opt_adam, {"b2": math.nan}, "b2"),
        (uo.clip, {"max_delta": math.nan}, "max_delta"),
        (uo.scale, {"factor": math.nan}, "factor"),
    ],
)
def test_nan_hyperparameter(ctor, kw, label):
    with pytest.raises(ValueError, match=rf"{label} must be .*got .*nan"):
        ctor(**kw)


@pytest.mark.parametrize(
    "ctor,kw,label",
    [
        (uo.adam, {"eps": "tiny"}, "eps"),
        (uo.rmsprop, {"momentum": None}, "momentum"),
        (_opt_adam, {"lr": "fast"}, "lr"),
        (uo.scale, {"factor": [1.0, 2.0]}, "factor"),
        (uo.scale, {"factor": np.array([2.0])}, "factor"),
        pytest.param(uo.sgd, {"lr": "0.1"}, "lr"),
        pytest.param(uo.adam, {"betas": (0.9, "0.999")}, r"betas\[1\]"),
    ],
)
def test_non_number_hyperparameter(ctor, kw, label):
    with pytest.raises(TypeError, match=rf"{label} must be a number or a schedule, got "):
        ctor(**kw)


@pytest.mark.parametrize("make, label", [
    (lambda v: uo.adagrad(initial_accumulator_value=v), "adagrad: initial_accumulator_value"),
    (lambda v: uo.rmsprop(initial_scale=v), "rmsprop: initial_scale"),
    (lambda v: uo.cocob(eps=v), "cocob: eps"),
])
def test_a_field_that_takes_no_schedule_says_so(make, label):
    """A fixed number (an initial value, a tolerance) is asked for as a number: the message
    does not offer a schedule, and one given is refused as a schedule."""
    with pytest.raises(TypeError, match=rf"^{label} must be a number, got '0.1'$"):
        make("0.1")
    with pytest.raises(TypeError, match=rf"^{label} must be a number, not a schedule \(it takes "
                                        r"none\), got constant\(value=0.1\)$"):
        make(uo.schedules.constant(0.1))


@pytest.mark.parametrize("make, label, what", [
    (lambda v: uo.adafactor(eps=(None, v)), r"adafactor: eps\[1\]", "a number >= 0"),
    (lambda v: uo.adafactor(eps=(v, 1e-3)), r"adafactor: eps\[0\]",
     r"None or a number >= 0"),
    (lambda v: uo.prodigy(beta3=v), "prodigy: beta3",
     r"None \(sqrt\(betas\[1\]\)\) or a number in \[0, 1\)"),
])
def test_a_number_whose_none_means_something_takes_no_schedule_and_says_so(make, label, what):
    """Fields whose None stands for a derived value take numbers only: a schedule is refused in
    the words of the fields above (the message had offered only a number, as for a string)."""
    with pytest.raises(TypeError, match=rf"^{label} must be {what}, not a schedule \(it takes "
                                        r"none\), got constant\(value=0.1\)$"):
        make(uo.schedules.constant(0.1))


@pytest.mark.parametrize("ctor,kw", [(uo.sgd, {"lr": True}), (uo.adam, {"eps": False})])
def test_bool_hyperparameter_is_not_a_number(ctor, kw):
    with pytest.raises(TypeError, match=r"must be a number or a schedule, got (True|False)"):
        ctor(**kw)


@pytest.mark.parametrize("betas", [(0.9,), (0.9, 0.99, 0.999)])
def test_betas_of_wrong_length(betas):
    with pytest.raises(ValueError, match=r"^adam: betas must be a tuple of 2 numbers or schedules, "
                                         + re.escape(f"got {betas}") + "$"):
        uo.adam(betas=betas)


# --- schedules that go bad ----------------------------------------------------------------------


def _bad_at_3(good, bad):
    return lambda step: good if step < 3 else bad



# Where a block does not matter to what is checked, the rules here are configurations that
# test_fused.py compiles too (weight decay on, a chain of its own): the wide variant then loads
# their compiled loops instead of compiling more.
SCHEDULE_CASES = [
    pytest.param(
        lambda: uo.sgd(lr=_bad_at_3(0.1, -0.1), momentum=0.9), r"lr must be >= 0", id="sgd-lr"
    ),
    pytest.param(
        lambda: uo.sgd(lr=0.1, momentum=_bad_at_3(0.9, -1.0)), r"momentum", id="sgd-momentum"
    ),
    pytest.param(lambda: uo.adam(lr=_bad_at_3(1e-2, -1e-2)), r"adam: lr must be >= 0",
                 id="adam-lr"),
    pytest.param(
        lambda: uo.adam(betas=(_bad_at_3(0.9, 1.0), 0.999)),
        r"adam: betas\[0\] must be in \[0, 1\)",  # the rule's own words, not its part's b1
        id="adam-beta1",
    ),
    pytest.param(
        lambda: uo.adamw(weight_decay=_bad_at_3(0.01, -0.01)), r"adamw: weight_decay must be >= 0",
        id="adamw-wd"
    ),
    pytest.param(
        lambda: uo.rmsprop(alpha=_bad_at_3(0.9, 1.5)),
        r"alpha must be in \[0, 1\]",
        id="rmsprop-alpha",
    ),
    pytest.param(
        lambda: uo.adadelta(eps=_bad_at_3(1e-6, math.nan), weight_decay=0.1),
        r"eps must be .*nan",
        id="adadelta-eps",
    ),
    pytest.param(
        lambda: uo.adagrad(lr=_bad_at_3(0.1, -0.1), weight_decay=0.1),
        r"lr must be >= 0",
        id="adagrad-lr",
    ),
    pytest.param(
        lambda: _opt_adam(b2=_bad_at_3(0.999, -0.5)),
        r"b2 must be in \[0, 1\)",
        id="optimistic-b2",
    ),
    pytest.param(
        lambda: uo.chain(uo.clip(_bad_at_3(1.0, -1.0)), uo.weight_decay(1e-2), uo.adam(lr=1e-2)),
        r"max_delta must be >= 0",
        id="chain-clip",
    ),
    pytest.param(
        lambda: uo.rprop(lr=0.01, etas=(0.3, _bad_at_3(1.4, 0.9)), step_sizes=(1e-4, 0.03)),
        r"etas must satisfy 0 < etas\[0\] < 1 < etas\[1\], got \(0\.3, 0\.9\)",
        id="rprop-etas",
    ),
    pytest.param(
        lambda: uo.nadam(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True,
                         momentum_decay=_bad_at_3(4e-3, -1.0)),
        r"momentum_decay must be >= 0",
        id="nadam-momentum_decay",
    ),
    pytest.param(
        lambda: uo.asgd(lr=0.05, lambd=_bad_at_3(0.01, -0.01), t0=5, weight_decay=1e-2),
        r"lambd must be >= 0",
        id="asgd-lambd",
    ),
]


@pytest.mark.parametrize("build,match", SCHEDULE_CASES)
@pytest.mark.parametrize("inplace", [False, True], ids=["update", "update_"])
def test_schedule_invalid_at_step_3(build, match, inplace, width):
    params = _params(width)
    state = uo.setup(build(), params)
    # the good steps in place whichever form then meets the bad one (it is refused before either
    # form runs a step, so the wide variant compiles one loop per rule, not two)
    with _on_path(width, 3):
        for _ in range(3):
            state = uo.update_(state, params, _grads(params))
    assert state.step == 3
    _rejects(
        ValueError,
        rf"(?s){match}.*step 3",
        state,
        params,
        _grads(params),
        pure=not inplace,
        inplace=inplace,
    )


@pytest.mark.parametrize("build", [
    *(case.values[0] for case in SCHEDULE_CASES),
    lambda: uo.adamw(lr=lambda s: 1e-3 / (1 + s), betas=(lambda s: 0.9 - 0.1 * s, 0.999)),
    lambda: uo.sgd(lr=lambda s: 0.1 * s, momentum=0.9, weight_decay=jnp.asarray(0.01)),
    lambda: uo.sgd(lr=lambda s: 0.1 if s < 2 else 1),  # an int from a schedule
], ids=[*(case.id for case in SCHEDULE_CASES), "adamw-betas0", "sgd-jax-wd", "sgd-int-lr"])
def test_a_host_step_resolves_a_record_as_the_general_path_does(build):
    """At a host step (a Python int) a scheduled record is resolved by a short path
    (Transform._at_host); any other step takes the general one. Same values, same facts, and
    where a value is bad, the same error naming the step."""
    for part, _ in build().keyed_parts:
        for s in range(6):
            try:
                general = part.at(np.int64(s))
            except (TypeError, ValueError) as e:
                with pytest.raises(type(e), match=re.escape(str(e))):
                    part.at(s)
                continue
            short = part.at(s)
            assert short.fields() == general.fields() and short.host == general.host
            assert [type(v) for v in short.fields().values()] == [
                type(v) for v in general.fields().values()]


@pytest.mark.parametrize("bad", ["fast", None])
def test_schedule_returning_non_number(bad):
    params = _params()
    state = uo.setup(uo.sgd(lr=_bad_at_3(0.1, bad)), params)
    for _ in range(3):
        state = uo.update_(state, params, _grads())
    _rejects((TypeError, ValueError), r"(?s)lr must be a number.*step 3", state, params, _grads())


# --- gradients ----------------------------------------------------------------------------------


@pytest.fixture(params=["sgd", "adam", "adamw", "optimistic_adam"])
def stepped(request, width):
    rule = {
        "sgd": uo.sgd(lr=0.1, momentum=0.9, weight_decay=1e-2),
        "adam": uo.adam(lr=0.1),
        "adamw": uo.adamw(lr=0.1, amsgrad=True),
        "optimistic_adam": uo.optimistic_adam(lr=0.1),
    }[request.param]
    return _stepped(rule, width)


def test_gradient_shape_names_the_leaf(stepped):
    state, params = stepped
    grads = _grads(params)
    grads["layer"][0] = np.zeros((3, 2))
    _rejects(
        ValueError,
        re.escape("params['layer'][0] has shape (3, 2), its parameter (2, 3)"),
        state,
        params,
        grads,
    )


def test_gradient_shape_in_flat_list(stepped):
    state, params = stepped
    flat = uo.trainables(_grads(params))
    flat[1] = np.zeros(4)
    # optree order: params['bias'], params['layer'][0], ...
    _rejects(ValueError, re.escape("params['layer'][0] has shape (4,)"), state, params, flat)


def test_gradient_dtype(stepped):
    state, params = stepped
    grads = _grads(params)
    grads["bias"] = grads["bias"].astype(np.float32)
    _rejects(
        ValueError,
        re.escape("params['bias'] has dtype float32, its parameter float64"),
        state,
        params,
        grads,
    )


@pytest.mark.parametrize("rule", [uo.sgd(lr=0.1, momentum=0.9), uo.adamw(lr=0.1)],
                         ids=["sgd", "adamw"])
@pytest.mark.parametrize("big", ["params", "grads", "both"])
def test_a_gradient_in_the_other_byte_order_is_taken(rule: Any, big: str) -> None:
    """Big-endian float64 params (as FITS and some HDF5 files load) and the native float64
    gradient NumPy's arithmetic makes of them were refused ("has dtype float64, its parameter
    >f8", a sweep's finding), either way round. One type in two byte orders steps as the
    native run does, bit for bit, each array keeping its own byte order, pure and in place."""
    start = np.linspace(-1.0, 1.0, 5)
    order = {"params": (">f8", "<f8"), "grads": ("<f8", ">f8"), "both": (">f8", ">f8")}[big]
    native_p = [start.copy()]
    native = uo.setup(rule, native_p)
    inplace_p, pure_p = [start.astype(order[0])], [start.astype(order[0])]
    inplace, pure = uo.setup(rule, inplace_p), uo.setup(rule, pure_p)
    for k in range(4):
        g = 2.0 * start - 0.1 * k
        native = uo.update_(native, native_p, [g])
        inplace = uo.update_(inplace, inplace_p, [g.astype(order[1])])
        pure, pure_p = uo.update(pure, pure_p, [g.astype(order[1])])
    assert inplace_p[0].dtype.str == pure_p[0].dtype.str == order[0]
    np.testing.assert_array_equal(inplace_p[0], native_p[0])
    np.testing.assert_array_equal(pure_p[0], native_p[0])


@pytest.mark.parametrize(
    "bad", [1.0, "grad", torch.zeros(2, dtype=torch.float64)], ids=["float", "str", "torch"]
)
def test_gradient_not_an_array_of_the_params_library(stepped, bad):
    state, params = stepped
    grads = _grads(params)
    grads["bias"] = bad
    match = r"gradient for params\['bias'\] is a (float|str|torch)"
    _rejects(TypeError, match, state, params, grads)


def test_a_masked_array_is_refused_as_a_param_or_a_gradient(stepped):
    """NumPy's masked arrays step their masked entries or not as each operation's masks fall
    (Adam left them, Muon's matrix product wrote -inf into plain params through a masked
    gradient): refused by name, as params and as gradients, before anything is written."""
    mask = np.ma.MaskedArray(np.ones((2, 3)), mask=np.eye(2, 3, dtype=bool))
    with pytest.raises(TypeError, match=r"params\['w'\] is a NumPy masked array: .*np.ma.getdata"):
        uo.setup(uo.adam(), {"w": mask})
    state, params = stepped
    grads = _grads(params)
    grads["bias"] = np.ma.MaskedArray(grads["bias"], mask=[True, False])
    _rejects(TypeError, r"gradient for params\['bias'\] is a NumPy masked array", state, params,
             grads)


@pytest.mark.parametrize("n", [2, 4])
def test_flat_gradient_list_of_wrong_length(stepped, n):
    state, params = stepped
    flat = [np.zeros(1)] * n
    count = len(uo.trainables(params))
    _rejects(
        ValueError,
        rf"flat gradient list has {n} arrays but params have {count}",
        state,
        params,
        flat,
    )


@pytest.mark.parametrize("bad", [1.0, "g"], ids=["float", "str"])
def test_a_flat_gradient_list_with_an_entry_not_an_array_names_it(stepped, bad):
    """``[g0, 1.0, g2]`` was refused as a tree of another structure than params, naming
    neither the entry nor what it is."""
    state, params = stepped
    flat = [np.zeros_like(p) for p in uo.trainables(params)]
    flat[1] = bad
    _rejects(TypeError, rf"flat gradient list: entry 1 \(for params\[.*\]\) is "
                        rf"{type(bad).__name__} {bad!r}, not an array", state, params, flat)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda g: {**{k: v for k, v in g.items() if k != "bias"}, "bias2": g["bias"]},
        lambda g: {**g, "layer": tuple(g["layer"])},
        lambda g: {k: v for k, v in g.items() if k != "bias"},
        lambda g: {**g, "layer": [g["layer"][0], [g["layer"][1]]]},
        lambda g: [g["bias"], [*g["layer"]], *g.get("many", [])],
    ],
    # (a None where params hold an array is no error: that leaf stays, see test_none_grads)
    ids=["other-key", "tuple-for-list", "missing-key", "nested", "nested-list"],
)
def test_grads_tree_of_wrong_structure(stepped, spoil):
    state, params = stepped
    grads = spoil(_grads(params))
    _rejects(ValueError, r"grads must be a tree with the structure of params", state, params, grads)


# --- params against the state -------------------------------------------------------------------


@pytest.mark.parametrize(
    "other",
    [
        lambda p: {**p, "extra": np.zeros(1)},
        lambda p: uo.trainables(p),
        lambda p: {**p, "layer": tuple(p["layer"])},
    ],
    ids=["extra-key", "flat-list", "tuple-for-list"],
)
def test_params_of_another_structure(stepped, other):
    state, params = stepped
    p2 = other(params)
    g2 = other(_grads(params))
    _rejects(
        ValueError,
        r"params do not have the tree structure this state was set up for",
        state,
        p2,
        g2,
    )
    _assert_same(_snapshot(state, params), state, params)


def test_params_of_other_shapes(width):
    state, params = _stepped(uo.adam(lr=0.1), width)
    p2 = {**params, "layer": [np.zeros((3, 2)), np.zeros(3)]}
    g2 = {**_grads(params), "layer": [np.ones((3, 2)), np.ones(3)]}
    _rejects(
        ValueError,
        re.escape("params['layer'][0] has shape (3, 2)") + r".*other params",
        state,
        p2,
        g2,
    )


def test_params_of_other_dtype(width):
    state, params = _stepped(uo.adam(lr=0.1), width)
    p2 = {k: v for k, v in params.items()}
    p2["bias"] = params["bias"].astype(np.float32)
    g2 = _grads(params)
    g2["bias"] = g2["bias"].astype(np.float32)
    _rejects(
        ValueError, re.escape("params['bias'] has shape (2,) and dtype float32"), state, p2, g2
    )


@pytest.mark.parametrize("bad", [1.5, "w"], ids=["float", "str"])
def test_non_array_param_leaf(bad, width):
    params = {"w": np.zeros(2), "b": bad}
    with pytest.raises(TypeError, match=r"params\['b'\] is a (float|str), not an array"):
        uo.setup(uo.adam(), params)
    state, good = _stepped(uo.adam(lr=0.1), width)
    bad_tree = {**good, "bias": bad}
    _rejects(
        TypeError,
        r"params\['bias'\] is a (float|str), not an array",
        state,
        bad_tree,
        _grads(good),
    )


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])  # complex: test_complex.py
def test_non_floating_params(dtype):
    with pytest.raises(TypeError, match=rf"params\[0\] has dtype {np.dtype(dtype).name}"):
        uo.setup(uo.sgd(), [np.zeros(3, dtype=dtype)])
    state = uo.setup(uo.sgd(lr=0.1), [np.zeros(3)])
    params = [np.zeros(3, dtype=dtype)]
    _rejects(
        TypeError, rf"has dtype {np.dtype(dtype).name}", state, params, [np.ones(3, dtype=dtype)]
    )


def test_an_array_given_twice_is_refused_but_jaxs():
    """A tied weight given as two leaves stepped in place as its last leaf on the reference
    path, as both on the compiled one, and a pure step untied it. JAX's arrays are immutable:
    the same one twice is two leaves that start equal."""
    for w in (np.ones(3), torch.ones(3, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"params\['enc'\] is the same array as "
                                             r"params\['dec'\]: a tied weight is one parameter"):
            uo.setup(uo.sgd(lr=0.1), {"enc": w, "dec": w})
    # set up untied, stepped in place tied (the reference path): refused before any write
    state = uo.setup(uo.sgd(lr=0.1), {"enc": np.ones(3), "dec": np.ones(3)})
    w = np.ones(3)
    _rejects(ValueError, r"params\['enc'\] is the same array as params\['dec'\]", state,
             {"enc": w, "dec": w}, {"enc": np.ones(3), "dec": np.ones(3)}, pure=False)
    z = jnp.ones(3)
    state, p = uo.update(uo.setup(uo.sgd(lr=0.1), {"a": z, "b": z}), {"a": z, "b": z},
                         {"a": jnp.full(3, 0.5), "b": jnp.full(3, 0.25)})
    np.testing.assert_allclose(np.asarray(p["a"]), 0.95)
    np.testing.assert_allclose(np.asarray(p["b"]), 0.975)


@pytest.mark.usefixtures("small_steps_compiled")
@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_an_array_given_twice_after_set_up_is_refused_by_the_compiled_loop(library):
    """Set up untied, then stepped in place with one array as two leaves: the compiled loop
    stepped it twice (SGD from 1 by 0.1: 0.8), where the reference path refuses."""
    make = np.ones if library == "numpy" else (lambda n: torch.ones(n, dtype=torch.float64))
    for n in (2, WIDE_LEAVES):
        names = [f"l{i:02d}" for i in range(n)]
        state = uo.setup(uo.sgd(lr=0.1), {k: make(3) for k in names})
        params = {k: make(3) for k in names}
        params[names[-1]] = params[names[0]]
        grads = {k: make(3) for k in names}
        with expect_compiled(0):
            _rejects(ValueError, rf"params\['{names[-1]}'\] is the same array as "
                                 rf"params\['{names[0]}'\]", state, params, grads, pure=False)


@pytest.mark.usefixtures("small_steps_compiled")
def test_a_state_of_float32_params_is_refused_for_float16_params_by_the_compiled_loop():
    """The loop takes float32 slots beside float16 params (``state_dtype="float32"``); without
    that, they are a state set up for other params, as the reference path says (the loop
    stepped them, and ``state_dtype`` stayed None)."""
    for n in (2, WIDE_LEAVES):
        state = uo.setup(uo.adam(lr=0.1), [np.ones(8, np.float32) for _ in range(n)])
        with expect_compiled(0):
            _rejects(ValueError, r"dtype float32: a state of these params keeps float16 "
                                 r"slots; the params or the state were cast since set-up",
                     state, [np.ones(8, np.float16) for _ in range(n)],
                     [np.ones(8, np.float16) for _ in range(n)])


@pytest.mark.parametrize("width", ["narrow", "wide"])
def test_views_sharing_memory_are_refused_as_a_tied_weight(width):
    """A tied weight given as an array and a view of it (``w`` and ``w.reshape``, ``w[:]``, a
    torch ``view``), or two slices that overlap, passed the identity check: in place the
    compiled loop stepped the shared memory twice, the reference path once. Refused at set-up
    and by ``update_`` on both paths, before any write; slices that share no element (a flat
    buffer split into params) step as any leaves."""
    extra = {f"x{i}": np.zeros(2) for i in range(WIDE_LEAVES if width == "wide" else 0)}
    w, buf, t = np.arange(6.0), np.arange(12.0), torch.arange(6.0, dtype=torch.float64)
    for tied, name in (({"a": w, "b": w.reshape(3, 2)}, "b"), ({"a": w, "b": w[:]}, "b"),
                       ({"a": buf[0:6], "b": buf[4:10]}, "b")):
        with pytest.raises(ValueError, match=rf"params\['{name}'\] shares memory with "
                                             r"params\['a'\] \(views of one array"):
            uo.setup(uo.sgd(lr=0.1), {**tied, **extra})
    with pytest.raises(ValueError, match="shares memory"):
        uo.setup(uo.sgd(lr=0.1), {"a": t, "b": t.view(3, 2)})
    # tensors of one storage that are no views of each other (Tensor.set_): no base to see
    with pytest.raises(ValueError, match=r"params\['b'\] shares memory .* one storage"):
        uo.setup(uo.sgd(lr=0.1), {"a": t, "b": torch.empty(0, dtype=t.dtype).set_(t)})
    # (a lazy module's parameter has no storage yet to look at: its own, as before)
    uo.setup(uo.sgd(lr=0.1), {"a": t, "b": torch.nn.parameter.UninitializedParameter()})
    # set up apart, stepped in place with views of one array: refused before any write
    apart = {"a": np.arange(6.0), "b": np.arange(6.0), **extra}
    state = uo.setup(uo.sgd(lr=0.1), apart)
    grads = {k: np.ones_like(v) for k, v in apart.items()}
    with _on_path(width, 0):
        _rejects(ValueError, r"params\['b'\] shares memory with params\['a'\]", state,
                 {**extra, "a": w, "b": w[:]}, grads, pure=False)
    # a flat buffer cut into params that share nothing: as separate arrays
    flat, ref = np.arange(12.0), {"a": np.arange(6.0), "b": np.arange(6.0, 12.0), **extra}
    split = {"a": flat[0:6], "b": flat[6:12], **extra}
    s1, s2 = uo.setup(uo.adam(lr=0.1), split), uo.setup(uo.adam(lr=0.1), ref)
    for _ in range(3):
        s1 = uo.update_(s1, split, {k: np.sin(v) for k, v in split.items()})
        s2 = uo.update_(s2, ref, {k: np.sin(v) for k, v in ref.items()})
    np.testing.assert_array_equal(flat, np.concatenate([ref["a"], ref["b"]]))


@pytest.mark.parametrize("width", ["narrow", "wide"])
def test_gradients_reaching_into_params_memory_step_as_copies(width):
    """A gradient that is a view of the params' memory, shifted (``p = buf[1:11]``, ``g =
    buf[0:10]``): the compiled loop read gradient elements it had already written as params
    (0.2 from the pure step's Adam); it is copied first, as the reference path reads it. The
    same elements as its own parameter's (``g = buf[1:11]``) are read before being written."""
    extra = {f"x{i}": np.zeros(2) for i in range(WIDE_LEAVES if width == "wide" else 0)}
    for shift in (0, 1):
        buf = np.linspace(-1.0, 1.0, 12)
        p = {"p": buf[1:11], **extra}
        g = {"p": buf[1 - shift:11 - shift], **{k: np.ones(2) for k in extra}}
        pure_state = uo.setup(uo.adam(lr=0.1), p)
        _, want = uo.update(pure_state, p, g)
        want = {k: v.copy() for k, v in want.items()}
        state = uo.setup(uo.adam(lr=0.1), p)
        with _on_path(width, 1):
            uo.update_(state, p, g)
        np.testing.assert_array_equal(p["p"], want["p"])


def test_views_that_share_no_element_step_on_every_library():
    """Two columns of one matrix share no element though their spans overlap: NumPy's exact
    test said so, and a tensor's overlapping span was taken as shared (refused)."""
    for make in (np.array, torch.tensor):
        w = make(np.arange(12.0).reshape(4, 3))
        params = {"a": w[:, 0], "b": w[:, 1]}
        state = uo.setup(uo.sgd(lr=0.1), params)
        uo.update_(state, params, {"a": params["a"] * 0 + 1, "b": params["b"] * 0 + 1})
        np.testing.assert_array_equal(np.asarray(w)[:, :2], np.arange(12.0).reshape(4, 3)[:, :2]
                                      - 0.1)


@pytest.mark.parametrize("width", ["narrow", "wide"])
def test_gradients_that_are_other_params_or_views_of_their_own(width):
    """The gradient of a*b is (b, a): in place, the compiled loop read b's gradient after it
    had written a (Adam 1.50000001 for 1.500000005); and a gradient that is a view of its own
    parameter (not the array itself) was kept by Adan's slot as the params' memory (1.5e-3 off
    in place). Both step as copies would, bit for bit the pure step."""
    extra = {f"x{i}": np.zeros(2) for i in range(WIDE_LEAVES if width == "wide" else 0)}
    xg = {k: np.ones(2) for k in extra}

    def swapped(q):
        return {"a": q["b"], "b": q["a"], **xg}

    def own_views(q):
        return {"a": q["a"][:], "b": q["b"][:], **xg}

    for rule, grads in ((uo.adam(lr=0.1), swapped), (uo.adan(lr=0.1), own_views)):
        a, b = np.linspace(0.5, 1.0, 4), np.linspace(1.5, 2.0, 4)
        p = {"a": a, "b": b, **extra}
        pure = {k: v.copy() for k, v in p.items()}
        s_pure, s_in = uo.setup(rule, pure), uo.setup(rule, p)
        for _ in range(3):
            s_pure, pure = uo.update(s_pure, pure, grads(pure))
            s_in = uo.update_(s_in, p, grads(p))
        for k in p:
            assert p[k].tobytes() == pure[k].tobytes(), (rule.name, k)


def test_update_with_a_non_state():
    params = _params()
    with pytest.raises(TypeError, match=r"expected a uniopt State .* got dict"):
        uo.update({"step": 0}, params, _grads())
    with pytest.raises(TypeError, match=r"expected a uniopt State .* got dict"):
        uo.update_({"step": 0}, params, _grads())


@pytest.mark.parametrize("fn", [uo.update, uo.update_])
def test_update_with_the_state_and_the_params_swapped(fn):
    # (it said "params['step'] is a int, not an array")
    params = _params()
    state = uo.setup(uo.adam(), params)
    with pytest.raises(TypeError, match=r"the params given are a uniopt State: the state comes "
                                        r"first, update\(state, params, grads\)"):
        fn(params, state, _grads())
    with pytest.raises(TypeError, match=r"params\['x'\] is an int, not an array"):
        fn(state, {"x": 3}, {"x": np.ones(2)})


@pytest.mark.parametrize("fn", [uo.update, uo.update_])
def test_update_in_optax_order_names_the_order(fn):
    # (optax's (grads, state, params): "params['step'] has dtype int32; ... leave a model's
    # integer arrays out", of the state taken for params)
    params = _params()
    state = uo.setup(uo.adam(), params)
    snap = _snapshot(state, params)
    with pytest.raises(TypeError, match=r"the params given are a uniopt State: the state comes "
                                        r"first, update\(state, params, grads\); the optax "
                                        r"protocol, rule.update, takes \(grads, state, params\)"):
        fn(_grads(), state, params)
    with pytest.raises(TypeError, match=r"the grads given are a uniopt State"):
        fn(_grads(), params, state)
    _assert_same(snap, state, params)


# --- in place on arrays that cannot be written --------------------------------------------------


def test_update_inplace_refuses_a_leaf_whose_elements_overlap():
    # rows of an as_strided view that share elements (no stride of 0): torch's loops step a
    # shared element once per place, a pass once from its old value: its updates were lost
    as_strided = np.lib.stride_tricks.as_strided
    buf = np.zeros(10, np.float32)
    p = as_strided(buf, (3, 4), (8, 4))  # rows at 0, 2, 4: elements 2..5 twice
    state = uo.setup(uo.sgd(lr=0.1), [p])
    with pytest.raises(ValueError, match=r"update_ cannot write params\[0\] in place: its "
                       r"elements overlap in memory \(shape \(3, 4\), strides \(8, 4\)\)"):
        uo.update_(state, [p], [np.ones((3, 4), np.float32)])
    assert not buf.any()
    # interleaved strides that do not nest but share no element: stepped
    buf = np.zeros(8, np.float32)
    q = as_strided(buf, (2, 3), (12, 8))  # places 0, 2, 4 and 3, 5, 7
    uo.update_(uo.setup(uo.sgd(lr=0.1), [q]), [q], [np.ones((2, 3), np.float32)])
    np.testing.assert_array_equal(buf, np.float32([-0.1, 0, -0.1, -0.1, -0.1, -0.1, 0, -0.1]))
    # a pure step reads it and writes new arrays: taken
    _, out = uo.update(state, [p], [np.ones((3, 4), np.float32)])
    assert out[0].shape == (3, 4)


def test_update_inplace_read_only_numpy(stepped):
    state, params = stepped
    # only the last leaf in optree order is read-only: the ones before must not be written
    uo.trainables(params)[-1].setflags(write=False)
    last = "params['many'][39]" if "many" in params else "params['layer'][1]"
    snap = _snapshot(state, params)
    with pytest.raises(TypeError, match=re.escape(last) + r".*read-only"):
        uo.update_(state, params, _grads(params))
    _assert_same(snap, state, params)
    # the pure update still works on read-only input
    new_state, new_params = uo.update(state, params, _grads(params))
    assert new_state.step == state.step + 1
    assert not np.array_equal(uo.trainables(new_params)[-1], uo.trainables(params)[-1])


def test_update_inplace_of_a_numpy_scalar_says_what_it_is():
    # (it said "the NumPy array is read-only")
    params = {"x": np.float32(1.0)}
    state = uo.setup(uo.sgd(lr=0.1), params)
    with pytest.raises(TypeError, match=r"params\['x'\] in place: a NumPy scalar \(float32\) is "
                       r"a value, not memory to write; use uniopt.update, or a 0-d array"):
        uo.update_(state, params, {"x": np.float32(1.0)})
    assert uo.update(state, params, {"x": np.float32(1.0)})[1]["x"] == np.float32(0.9)


@pytest.mark.parametrize("scalar", ["gradient", "param"])
def test_a_bfloat16_numpy_scalar_is_numpys(scalar):
    """An ml_dtypes bfloat16 scalar (a 0-d bfloat16 array's arithmetic gives one) is NumPy's, as
    a float32 scalar is: a 0-d param's scalar gradient, or a scalar param's 0-d one, was refused
    as "a ml_dtypes array but its parameter is a numpy array" (and the reverse)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    p, g = np.array(1.5, bf16), np.array(2.0, bf16) * np.array(1.0, bf16)
    if scalar == "param":
        p, g = bf16(1.5), np.array(2.0, bf16)
    assert isinstance(p if scalar == "param" else g, np.generic)
    state = uo.setup(uo.sgd(lr=0.1), {"z": p})
    state, new = uo.update(state, {"z": p}, {"z": g})
    assert new["z"].dtype == bf16 and float(new["z"]) == float(bf16(1.5 - 0.1 * 2.0))


def test_update_inplace_read_only_slot(width):
    state, params = _stepped(uo.adam(lr=0.1), width)
    state.slots["scale_by_adam.exp_avg_sq"][-1].setflags(write=False)
    _rejects(TypeError, r"read-only", state, params, _grads(params), pure=False)


def test_update_inplace_jax():
    params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    grads = {"w": jnp.full(3, 0.5), "b": jnp.ones(2)}
    state = uo.setup(uo.adam(lr=0.1), params)
    state, params = uo.update(state, params, grads)
    snap = _snapshot(state, params, grads)
    with pytest.raises(TypeError, match=r"params\['b'\].*JAX arrays are immutable"):
        uo.update_(state, params, grads)
    _assert_same(snap, state, params, grads)


# --- the optax protocol -------------------------------------------------------------------------


def test_optax_state_of_another_rule():
    params = _params()
    state = uo.adam(lr=0.1).init(params)
    snap = _snapshot(state, params)
    with pytest.raises(ValueError, match=r"this state was not set up for sgd\(.*its rule is adam"):
        uo.sgd(lr=0.1, momentum=0.9).update(_grads(), state, params)
    with pytest.raises(ValueError, match=r"this state was not set up for adam\(.*amsgrad=True"):
        uo.adam(amsgrad=True).update(_grads(), state, params)
    with pytest.raises(TypeError, match=r"adam.update\(grads, state, params\): the state is "
                                        r"dict, not the uniopt State rule.init\(params\) made$"):
        uo.adam().update(_grads(), {"step": 0}, params)
    _assert_same(snap, state, params)


def test_optax_update_in_uniopts_order_names_the_order():
    # (it said "this state was not set up for adam(...): its rule is {'w': Array...}", and
    # "its rule is None")
    params = _params()
    rule = uo.adam(lr=0.1)
    state = rule.init(params)
    snap = _snapshot(state, params)
    with pytest.raises(TypeError, match=r"the state is dict, not the uniopt State .* \(uniopt."
                                        r"update takes \(state, params, grads\); the optax "
                                        r"protocol, rule.update, takes \(grads, state, params\)"):
        rule.update(state, params, _grads())
    with pytest.raises(TypeError, match=r"the state is None, not the uniopt State"):
        rule.update(_grads(), None, params)
    _assert_same(snap, state, params)


@pytest.mark.parametrize(
    "rule",
    [
        uo.adamw(),
        uo.sgd(lr=0.1, weight_decay=1e-3),
        uo.chain(uo.weight_decay(1e-3), uo.adam()),
        uo.adam(weight_decay=lambda step: 0.0),
    ],
    ids=["adamw", "sgd-wd", "chain-wd", "adam-scheduled-wd"],
)
def test_optax_without_params_when_weight_decay_needs_them(rule):
    params = _params()
    state = rule.init(params)
    snap = _snapshot(state, params)
    with pytest.raises(ValueError, match=rf"{rule.name}: its update needs params"):
        rule.update(_grads(), state)
    _assert_same(snap, state, params)


def test_optax_without_params_is_fine_without_weight_decay():
    # the counterpart of the test above: only rules that read params demand them
    params = _params()
    rule = uo.adam(lr=0.1)
    updates, state = rule.update(_grads(), rule.init(params))
    assert state.step == 1
    assert np.allclose(updates["bias"], [0.1, -0.1])


# --- adjust -------------------------------------------------------------------------------------


def test_adjust_unknown_name():
    state, params = _stepped(uo.adam(lr=0.1))
    snap = _snapshot(state, params)
    rule = state.rule
    with pytest.raises(ValueError, match=r"'learning_rate' is not a hyperparameter of adam.*'lr'"):
        uo.adjust(state, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"'lrr' is not a hyperparameter of adam \(its "
                                         r"hyperparameters are .*\); did you mean 'lr'\?"):
        uo.adjust(state, lrr=0.1)
    with pytest.raises(ValueError, match=r"'learning_rate' is not a hyperparameter of adam.*'lr'"):
        uo.adjust(state, learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"'amsgrad' is not a hyperparameter"):
        uo.adjust(state, amsgrad=True)
    assert state.rule is rule
    _assert_same(snap, state, params)


def test_adjust_ambiguous_name_in_chain():
    rule = uo.chain(uo.sgd(lr=1.0, weight_decay=0.1), uo.adamw(lr=0.1, weight_decay=0.01))
    state, params = _stepped(rule)
    snap = _snapshot(state, params)
    with pytest.raises(
        ValueError,
        match=r"'weight_decay' is a hyperparameter of 2 members"
        r".*0\.weight_decay.*1\.weight_decay",
    ):
        uo.adjust(state, weight_decay=0.5)
    assert state.rule is rule
    _assert_same(snap, state, params)

    new = uo.adjust(state, **{"1.weight_decay": 0.5})
    assert new.rule.transforms[1].weight_decay == 0.5
    assert new.rule.transforms[0].weight_decay == 0.1
    assert new.rule.transforms[1].lr == 0.1
    assert new.step == state.step
    for k, arrays in state.slots.items():
        assert all(a is b for a, b in zip(arrays, new.slots[k], strict=True))
    assert state.rule.transforms[1].weight_decay == 0.01


def test_adjust_of_a_name_that_is_also_a_members():
    # chain(weight_decay(5e-4), adam()): weight_decay= set Adam's own L2 term, silently, not the
    # member named weight_decay (whose rate is wd): two decays then
    rule = uo.chain(uo.weight_decay(5e-4), uo.adam(lr=0.1))
    state, params = _stepped(rule)
    snap = _snapshot(state, params)
    with pytest.raises(ValueError, match=r"'weight_decay' is ambiguous here: it is the "
                       r"hyperparameter 1\.weight_decay \(adam\), and member 0 of this chain "
                       r"is weight_decay; .*\{'0\.wd': \.\.\.\}.*\{'1\.weight_decay'"):
        uo.adjust(state, weight_decay=1e-2)
    _assert_same(snap, state, params)
    assert uo.adjust(state, **{"0.wd": 1e-2}).rule.transforms[0].wd == 1e-2
    assert uo.adjust(state, **{"1.weight_decay": 1e-2}).rule.transforms[1].weight_decay == 1e-2
    state, _ = _stepped(uo.chain(uo.weight_decay(5e-4), uo.scale(-0.1)))
    with pytest.raises(ValueError, match=r"'weight_decay' names member 0 of this chain, not a "
                       r"hyperparameter; .*\{'0\.wd'"):
        uo.adjust(state, weight_decay=1e-2)
    # a rule's own field of that name is no ambiguity
    state, _ = _stepped(uo.adamw(lr=0.1, weight_decay=1e-2))
    assert uo.adjust(state, weight_decay=0.5).rule.weight_decay == 0.5
    # the two as members of an optax chain, each a state of its own
    optax = pytest.importorskip("optax")
    states = optax.chain(uo.weight_decay(5e-4), uo.adam(lr=0.1)).init({"w": np.ones(3)})
    with pytest.raises(ValueError, match=r"'weight_decay' is a hyperparameter of adam, and the "
                       r"name of a rule in this tuple \(weight_decay, whose hyperparameters "
                       r"are \['wd'\]\)"):
        uo.adjust(states, weight_decay=1e-2)
    assert uo.adjust(states, wd=1e-2)[0].rule.wd == 1e-2


@pytest.mark.parametrize(
    "key",
    [
        "2.lr",
        "-1.lr",
        "x.lr",
    ],
)
def test_adjust_position_that_is_not_a_member(key):
    state, _ = _stepped(uo.chain(uo.sgd(lr=1.0), uo.adam(lr=0.1)))
    with pytest.raises(ValueError, match=r"adjust: .*(member|position)"):
        uo.adjust(state, **{key: 0.5})


def test_adjust_that_changes_the_slots():
    state, params = _stepped(uo.sgd(lr=0.1, momentum=0.0))
    snap = _snapshot(state, params)
    with pytest.raises(ValueError, match=r"would change the optimizer's slots"):
        uo.adjust(state, momentum=0.9)
    _assert_same(snap, state, params)
    state2, params2 = _stepped(uo.rmsprop(lr=0.1, momentum=0.5))
    snap2 = _snapshot(state2, params2)
    # (to 0: the advice is the schedule that keeps the buffer, which it was "a non-zero value
    # or a schedule at set-up", both of which the rule already had)
    with pytest.raises(ValueError, match=re.escape(
            "('trace', ('momentum_buffer',))) to (('scale_by_rms', ('square_avg',)),); "
            "adjust(state, momentum=uniopt.schedules.constant(0.0)) keeps them")):
        uo.adjust(state2, momentum=0.0)
    _assert_same(snap2, state2, params2)
    kept = uo.adjust(state2, momentum=uo.schedules.constant(0.0))
    assert kept.slots.keys() == state2.slots.keys()


def _sgd(m):
    return uo.sgd(lr=0.1, momentum=m)


# each a rule whose SGD member has momentum m, and the key adjust names that momentum by (Adam
# listed first in a partition: its leaf was written before the step's KeyError, in place)
_COMBINED = {
    "partition": (lambda m: uo.partition({"y": uo.adam(lr=0.1), "x": _sgd(m)},
                                         {"a": "x", "b": "y"}), "x.momentum"),
    "masked": (lambda m: uo.masked(_sgd(m), {"a": True, "b": False}), "momentum"),
    "freeze": (lambda m: uo.freeze(_sgd(m), ["b"]), "momentum"),
    "accumulate": (lambda m: uo.accumulate(_sgd(m), every=2), "momentum"),
    "skip_nonfinite": (lambda m: uo.skip_nonfinite(_sgd(m)), "momentum"),
    "chain-clip-partition": (lambda m: uo.chain(uo.clip_by_global_norm(1.0), uo.partition(
        {"y": uo.adam(lr=0.1), "x": _sgd(m)}, {"a": "x", "b": "y"})), "x.momentum"),
    "partition-accumulate": (lambda m: uo.partition(
        {"y": uo.adam(lr=0.1), "x": uo.accumulate(_sgd(m), every=2)}, {"a": "x", "b": "y"}),
        "x.momentum"),
}


def _leaves(tree):
    import jax

    return [np.asarray(x).copy() for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.parametrize("lib", ["numpy", "jit"])
@pytest.mark.parametrize(("made", "to"), [(0.0, 0.9), (0.9, 0.0)])
@pytest.mark.parametrize("kind", list(_COMBINED))
def test_adjust_that_changes_a_members_slots(kind, made, to, lib):
    """A combinator's members keep their slots in states of their own, which the rule's layout
    did not hold: a momentum moved to or from 0 inside one was taken, and the next step raised
    a bare KeyError for the buffer (in place, after writing another member's leaves), or ran
    without it. Refused as a plain rule's is, naming the key; state and params unchanged."""
    import jax

    make, key = _COMBINED[kind]
    arr = jnp.asarray if lib == "jit" else np.asarray
    params = {"a": arr([1.0, 2.0, 3.0]), "b": arr([2.0, -1.0])}
    grads = {"a": arr([0.5, -0.5, 1.0]), "b": arr([1.0, 0.25])}
    step = jax.jit(uo.update) if lib == "jit" else uo.update
    state = uo.setup(make(made), params)
    state, params = step(state, params, grads)
    rule, before = state.rule, _leaves((state, params))
    with pytest.raises(SlotsChanged, match=rf"adjust: {{{re.escape(repr(key))}: {to}}} would "
                                           r"change the optimizer's slots") as e:
        uo.adjust(state, **{key: to})
    assert e.value.before != e.value.after
    if lib == "jit" and made == 0.0:  # (a traced non-zero: refused inside the step as well)
        with pytest.raises(SlotsChanged):
            jax.jit(lambda s, v: uo.adjust(s, **{key: v}))(state, to)
    assert state.rule is rule
    for a, b in zip(before, _leaves((state, params)), strict=True):
        assert np.array_equal(a, b)
    if made == 0.0:
        assert "needs a new uniopt.setup" in str(e.value)
        return
    # the advice, run: the buffer kept, and the next step takes it
    call = re.search(r"; (adjust\(state, .*\)) keeps them", str(e.value)).group(1)
    kept = eval(compile(call, "<advice>", "eval"),
                {"adjust": uo.adjust, "state": state, "uniopt": uo})
    state2, _ = step(kept, params, grads)
    assert len(_leaves(state2)) == len(before) - len(uo.trainables(params))


@pytest.mark.parametrize(("rule", "kw", "call"), [
    (uo.chain(uo.clip_by_global_norm(1.0), _sgd(0.9)), {"1.momentum": 0},
     "adjust(state, **{'1.momentum': uniopt.schedules.constant(0)})"),
    (uo.sgd(lr=0.1, momentum=0.9), {"momentum": 0.0, "lr": 0.0},
     "adjust(state, momentum=uniopt.schedules.constant(0.0))"),
    (uo.sgd(lr=0.1, momentum=0.9), {"lr": 0.0, "momentum": 0},
     "adjust(state, momentum=uniopt.schedules.constant(0))"),
    (uo.partition({"x": _sgd(0.9), "y": _sgd(0.5)}, {"a": "x", "b": "y"}),
     {"x.momentum": 0, "y.momentum": 0.0, "x.lr": 0},
     "adjust(state, **{'x.momentum': uniopt.schedules.constant(0), "
     "'y.momentum': uniopt.schedules.constant(0.0)})"),
])
def test_adjust_slots_advice_is_python_naming_the_keys_that_drop_them(rule, kw, call):
    """The advice for a momentum moved to 0 is a call to copy: a dotted key as ``**{...}``
    (``adjust(state, 1.momentum=...)`` is a SyntaxError), and only the keys that drop a block
    (``lr=0.0`` beside them needs no schedule)."""
    params = {"a": np.ones(3), "b": np.ones(2)}
    state = uo.setup(rule, params)
    with pytest.raises(SlotsChanged) as e:
        uo.adjust(state, **kw)
    message = str(e.value)
    assert f"; {call} keeps them" in message
    assert message.startswith(
        f"adjust: { {k: v for k, v in kw.items() if 'momentum' in k} } would change")
    kept = eval(compile(call, "<advice>", "eval"),
                {"adjust": uo.adjust, "state": state, "uniopt": uo})
    assert uo.adjust(kept, **{k: v for k, v in kw.items() if "lr" in k}).step == 0


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        ({"lr": -1e-3}, ValueError, r"lr must be >= 0, got -0\.001"),
        ({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\] must be in \[0, 1\), got 1\.0"),
        ({"eps": math.nan}, ValueError, r"eps must be finite, got nan"),
        # (inf is >= 0: the finite check alone refuses it)
        ({"lr": math.inf}, ValueError, r"lr must be finite, got inf"),
        ({"weight_decay": "big"}, TypeError, r"weight_decay must be a number or a schedule"),
    ],
)
def test_adjust_invalid_value(kw, exc, match):
    state, params = _stepped(uo.adam(lr=0.1))
    rule = state.rule
    snap = _snapshot(state, params)
    with pytest.raises(exc, match=match):
        uo.adjust(state, **kw)
    assert state.rule is rule
    _assert_same(snap, state, params)


def test_adjust_non_state():
    with pytest.raises(TypeError, match=r"adjust: expected a uniopt State, or a tree holding "
                                        r"one \(an optax combinator's state\), got uniopt.adam$"):
        uo.adjust(uo.adam(), lr=0.1)


# --- construction -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,match",
    [
        ((uo.sgd(), 3), r"argument 1 is neither a uniopt transform nor an optax \S+: 3"),
        ((uo.adam,), r"chain: argument 0 is the class adam; call it: adam\(\)"),
        ((uo.clip(1.0), "adam"), r"argument 1 is neither .* GradientTransformation: 'adam'"),
        ((None,), r"argument 0 is neither a uniopt transform nor an optax \S+: None"),
    ],
)
def test_chain_of_non_transform(args, match):
    with pytest.raises(TypeError, match=match):
        uo.chain(*args)


@pytest.mark.parametrize(
    "rule",
    [uo.adam, "adam", None, torch.optim.SGD],
    ids=["class", "str", "none", "torch-optimizer"],
)
def test_setup_with_non_rule(rule):
    with pytest.raises(TypeError, match=r"setup: expected a uniopt rule or transform, got "):
        uo.setup(rule, _params())


def test_asgd_eta_lr_names_a_bad_value():
    for bad, error in ((-0.1, ValueError), (math.inf, ValueError), ("0.1", TypeError),
                       (True, TypeError)):
        with pytest.raises(error, match=r"asgd: eta_lr must be None or a number >= 0, got"):
            uo.asgd(eta_lr=bad)
    assert uo.asgd(eta_lr=0.5).eta_lr == 0.5
    assert type(uo.asgd(eta_lr=np.float32(0.5)).eta_lr) is float


def test_asgd_past_eta_mu_names_a_bad_value():
    for bad in (((1, 0.1),), ((1, 0.1, 1),), ((-1, 0.1, 1.0),), [(1, 0.1, 1.0)]):
        with pytest.raises(ValueError, match=r"asgd: past_eta_mu must be None or triples"):
            uo.asgd(past_eta_mu=bad)
    assert uo.asgd(past_eta_mu=((3, 0.1, 0.5),)).past_eta_mu == ((3, 0.1, 0.5),)


def test_nadam_past_product_names_a_bad_value():
    for bad in ((1, 0.5), ((1.0, 0.5),), "x"):
        with pytest.raises(ValueError, match=r"nadam: past_product must be None or pairs"):
            uo.nadam(past_product=bad)
    assert uo.nadam(past_product=((0, 1.0), (3, 0.5))).past_product == ((0, 1.0), (3, 0.5))


def test_a_0d_array_of_any_library_is_taken_as_its_number() -> None:
    """``lr=torch.tensor(0.1)`` (or a NumPy or JAX 0-d array) is the number it holds, at
    construction and in ``adjust`` (torch's dtype names are no NumPy dtypes: it raised
    "data type 'torch.float32' not understood"); a 0-d bool is refused as a bool is."""
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    for lr in (torch.tensor(0.25), torch.tensor(0.25, dtype=torch.bfloat16), np.float32(0.25),
               np.array(0.25), jnp.asarray(0.25)):
        assert uo.sgd(lr=lr).lr == 0.25
        state = uo.adjust(uo.setup(uo.sgd(lr=0.1), [np.ones(2)]), lr=lr)
        assert state.rule.lr == 0.25
    with pytest.raises(TypeError, match=r"lr must be a number or a schedule, got tensor\(True\)"):
        uo.sgd(lr=torch.tensor(True))


def test_a_torch_gradient_on_another_device_is_refused_naming_the_leaf():
    """A gradient on another device than its parameter (meta standing in for a GPU's) is
    refused before anything is written, naming the leaf: torch's own error came from the first
    kernel that met it, after a partition's earlier member had written its leaf."""
    torch = pytest.importorskip("torch")
    for rule in (uo.adam(lr=0.1),
                 uo.partition({"a": uo.adam(lr=0.1), "s": uo.sgd(lr=0.1)},
                              {"enc": "a", "head": "s"})):
        params = {"enc": torch.ones(3, dtype=torch.float64),
                  "head": torch.ones(2, dtype=torch.float64)}
        grads = {"enc": torch.ones(3, dtype=torch.float64),
                 "head": torch.ones(2, dtype=torch.float64, device="meta")}
        state = uo.setup(rule, params)
        for step in (uo.update, uo.update_):
            with pytest.raises(ValueError, match=re.escape(
                    "gradient for params['head'] is on meta, its parameter on cpu")):
                step(state, params, grads)
        assert torch.equal(params["enc"], torch.ones(3, dtype=torch.float64))
        assert state.step == 0


@pytest.mark.usefixtures("small_steps_compiled")
def test_a_state_of_another_array_library_is_refused_naming_both():
    """A state set up for torch tensors, handed NumPy arrays of the same shapes (and the
    reverse), is refused naming both libraries, nothing written: the compiled loop raised an
    AttributeError on the torch slots' dtype, the other way round the message called float64
    and torch.float64 two dtypes."""
    torch = pytest.importorskip("torch")
    as_torch = {"w": torch.arange(3.0, dtype=torch.float64)}
    as_numpy = {"w": np.arange(3.0)}
    for made, given, lib, other in ((as_torch, as_numpy, "numpy", "torch"),
                                    (as_numpy, as_torch, "torch", "numpy")):
        state = uo.setup(uo.adam(lr=0.1), made)
        grads = {"w": given["w"] * 0 + 1}
        for step in (uo.update, uo.update_):
            with pytest.raises(ValueError, match=re.escape(
                    f"params['w'] is a {lib} array, but the state's scale_by_adam.exp_avg for it "
                    f"is a {other} array: this state was set up for other params")):
                step(state, given, grads)
        assert list(given["w"].tolist()) == [0.0, 1.0, 2.0]


class _Parameter(np.ndarray):  # a framework's own array type, defined in its module
    __module__ = "someframework.nn"


class _TensorParameter(torch.Tensor):
    __module__ = "someframework.nn"


def test_subclasses_of_numpys_array_and_torchs_tensor_are_their_library():
    """A subclass of ndarray (or of torch.Tensor) defined in another module was a library of
    its own: set up, then refused beside a plain gradient ("is a numpy array but its parameter
    is a someframework array"), and refused beside plain arrays in one tree."""
    for w, b in ((np.ones(3).view(_Parameter), np.zeros(2)),
                 (torch.ones(3, dtype=torch.float64).as_subclass(_TensorParameter),
                  torch.zeros(2, dtype=torch.float64))):
        plain = np.ones(3) if isinstance(w, np.ndarray) else torch.ones(3, dtype=torch.float64)
        state = uo.setup(uo.sgd(lr=0.1), {"w": w, "b": b})
        state, out = uo.update(state, {"w": w, "b": b}, {"w": plain, "b": b})
        assert np.allclose(np.asarray(out["w"]), 0.9)


def test_arrays_without_item_assignment_are_refused_by_update_in_place():
    """pydata's sparse arrays (no ``__setitem__``) failed inside the write with the library's
    own words, naming no leaf; they are refused before it, as read-only arrays are."""
    from uniopt import backend

    class Frozen:  # an array type that cannot be written
        __module__ = "sparse"

    assert backend.immutable_reason(Frozen()) == (
        "sparse arrays cannot be written in place; use uniopt.update")
    assert backend.immutable_reason(np.ones(2)) is None


def test_marrays_masked_arrays_are_refused_as_numpys_are():
    """marray's masked arrays stepped their masked entries and spread the gradients' masks
    into the params; NumPy's masked arrays were already refused, for this reason. (A stand-in
    of marray's type: its module is what is looked at.)"""

    class MArray(np.ndarray):
        __module__ = "marray._mask"

    with pytest.raises(TypeError, match=r"params\[0\] is a masked array \(marray\)"):
        uo.setup(uo.sgd(lr=0.1), [np.ones(3).view(MArray)])


# fields of one number that are no hyperparameters (read at set-up, or whose None means
# something): (rule, field, a valid value, an invalid one), each taken as any real number is
REAL_FIELDS = [
    (lambda v: uo.kron(balance_prob=v), "balance_prob", 0.25, 1.5),
    (lambda v: uo.kron(precond_init_scale=v), "precond_init_scale", 0.5, 0.0),
    (lambda v: uo.prodigy(growth_rate=v), "growth_rate", 2.0, 0.5),
    (lambda v: uo.prodigy(beta3=v), "beta3", 0.5, 1.0),
    (lambda v: uo.soap(shampoo_beta=v), "shampoo_beta", 0.5, 1.0),
    (lambda v: uo.muon(adam_lr=v), "adam_lr", 0.5, -1.0),
    (lambda v: uo.radam(rectify_threshold=v), "rectify_threshold", 5.0, 3.0),
    (lambda v: uo.asgd(eta_lr=v), "eta_lr", 0.5, -1.0),
    (lambda v: uo.dowg(init_estim_sq_dist=v), "init_estim_sq_dist", 0.5, 0.0),
    (lambda v: uo.dog(init_step=("learning_rate", v)), "init_step", 0.5, 0.0),
    (lambda v: uo.scale_by_zoom_linesearch(max_learning_rate=v), "max_learning_rate", 0.5, 0.0),
    # the public building blocks check the fields their rules check
    (lambda v: uo.scale_by_prodigy(growth_rate=v), "growth_rate", 2.0, 0.5),
    (lambda v: uo.scale_by_prodigy(beta3=v), "beta3", 0.5, 1.0),
    (lambda v: uo.scale_by_dowg(init_estim_sq_dist=v), "init_estim_sq_dist", 0.5, 0.0),
    (lambda v: uo.scale_by_dog(start="distance", init_value=v), "init_value", 0.5, 0.0),
    (lambda v: uo.scale_by_factored_rms(eps1=v), "eps1", 0.5, -1.0),
]


@pytest.mark.parametrize(("make", "field", "good", "bad"), REAL_FIELDS,
                         ids=[f[1] for f in REAL_FIELDS])
def test_real_fields_take_any_real_number(make: Any, field: str, good: float,
                                          bad: float) -> None:
    """A NumPy scalar or a 0-d array of a valid value is the Python float (kept as one, so the
    record is the same whatever it was given); a string, a bool or a value out of range is
    named."""
    want = make(good)
    for given in (np.float32(good), np.float64(good), np.asarray(good), np.int64(good)
                  if float(good).is_integer() else np.asarray(good, np.float32)):
        got = make(given)
        value = getattr(got, field)
        assert type(value[1] if field == "init_step" else value) is float, (given, value)
        assert got == want or float(np.float32(good)) != good, (given, got)
    for bad_kind in ("0.5", True):
        with pytest.raises(TypeError, match=rf"{field}.* must be .*got {bad_kind!r}"):
            make(bad_kind)
    for bad_value in (bad, math.nan, math.inf if field != "growth_rate" else -math.inf):
        with pytest.raises(ValueError, match=rf"{field}.* must be .*got"):
            make(bad_value)


def test_adjust_refuses_radams_eps_root_to_or_from_0_as_docs_jax_says():
    """RAdam's torch form (no eps_root) is a block of its own: moving eps_root to or from 0
    changes the block that holds the moments, as momentum to or from 0 adds or drops a slot."""
    p = {"w": np.ones(3)}
    state, p = uo.update(uo.setup(uo.radam(lr=1e-2), p), p, {"w": np.ones(3)})
    with pytest.raises(ValueError, match="needs a new uniopt.setup"):
        uo.adjust(state, eps_root=1e-8)
    on = uo.setup(uo.radam(lr=1e-2, eps_root=1e-8), p)
    with pytest.raises(ValueError, match="needs a new uniopt.setup"):
        uo.adjust(on, eps_root=0.0)
    assert uo.adjust(on, eps_root=1e-6).rule.eps_root == 1e-6


def test_the_trace_block_takes_nesterov_at_momentum_0_as_optaxs_trace():
    """The look-ahead adds 0: the gradient passes (optax's trace(0, nesterov=True)); so LARS and
    optax-form SGD under optax.inject_hyperparams, whose momentum 0 comes as an array and keeps
    the block, set up and step."""
    p, g = [np.ones(3)], [np.array([1.0, -2.0, 3.0])]
    state, out = uo.update(uo.setup(uo.chain(uo.trace(momentum=0.0, nesterov=True),
                                             uo.scale_by_lr(0.1)), p), p, g)
    np.testing.assert_array_equal(out[0], p[0] - 0.1 * g[0])
    optax = pytest.importorskip("optax")
    for make, kw in ((uo.lars, {}), (uo.sgd, {"convention": "optax"})):
        tx = optax.inject_hyperparams(make)(lr=0.1, momentum=0.0, nesterov=True, **kw)
        params = {"w": jnp.ones(3)}
        updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
        assert np.all(np.isfinite(np.asarray(updates["w"])))


def test_asgd_with_its_own_eta_lr_steps_under_jit_as_on_numpy():
    """eta_lr takes over from the first step's lr: under jax.jit the step is traced, so the
    choice is made on the device (it raised TracerBoolConversionError); 5 steps, float64."""
    jax = pytest.importorskip("jax")
    rule = uo.asgd(lr=0.01, eta_lr=0.005, lambd=1e-3)
    with jax.enable_x64(True):
        p, q = {"w": jnp.ones(3)}, {"w": np.ones(3)}
        state, ref = rule.init(p), uo.setup(rule, q)
        step = jax.jit(rule.update)
        for k in range(5):
            g = np.arange(3.0) - k
            u, state = step({"w": jnp.asarray(g)}, state, p)
            p = {"w": p["w"] + u["w"]}
            ref = uo.update_(ref, q, {"w": g})
        np.testing.assert_allclose(np.asarray(p["w"]), q["w"], rtol=1e-14, atol=0)


# --- a step's keywords ------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["update", "update_"])
def test_a_keyword_no_part_reads_is_refused_and_nothing_is_written(entry: str) -> None:
    """A misspelt value= or lr=5.0 (taken for a new learning rate) was dropped silently; now a
    TypeError names it, with what was meant, before anything is written."""
    params = {"w": np.ones(3)}
    state = uo.update_(uo.setup(uo.adam(lr=0.1), params), params, {"w": np.full(3, 0.5)})
    before = (params["w"].copy(), [x.copy() for xs in state.slots.values() for x in xs])
    step = getattr(uo, entry)
    for kw, says in [({"valeu": 1.0}, "unknown keyword 'valeu'; did you mean 'value'"),
                     ({"lr": 5.0}, "unknown keyword 'lr'; a hyperparameter changes with "
                                   "uo.adjust(state, lr=...)"),
                     ({"hpv": 1}, "unknown keyword 'hpv'; did you mean 'hvp'?")]:
        with pytest.raises(TypeError, match=re.escape(f"{entry}: {says}")):
            step(state, params, {"w": np.ones(3)}, **kw)
    np.testing.assert_array_equal(params["w"], before[0])
    for x, y in zip([x for xs in state.slots.values() for x in xs], before[1], strict=True):
        np.testing.assert_array_equal(x, y)
    # the keywords of the parts that read them: every rule takes them, as optax's chain hands
    # its extra arguments to every member
    out = uo.update(state, params, {"w": np.ones(3)}, value=1.0, grad={"w": np.ones(3)},
                    value_fn=lambda p: 0.0, hvp=lambda v: v)[1]
    np.testing.assert_array_equal(out["w"], uo.update(state, params, {"w": np.ones(3)})[1]["w"])


def test_an_optax_member_with_extra_arguments_takes_keywords_of_any_name() -> None:
    """optax's extra arguments may have any name: a rule with an optax member that takes them
    refuses none, and in a partition they reach that member, not the uniopt one beside it."""
    optax = pytest.importorskip("optax")
    seen = []

    def update(u: Any, state: Any, params: Any = None, *, scale: float = 1.0,
               **extra: Any) -> Any:
        seen.append(scale)
        return {k: None if v is None else v * scale for k, v in u.items()}, state

    scaled = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    params = {"a": np.ones(2), "b": np.ones(2)}
    grads = {"a": np.ones(2), "b": np.ones(2)}
    rule = uo.partition({"opt": uo.chain(uo.from_optax(scaled), uo.sgd(lr=0.1)),
                         "own": uo.adam(lr=0.1)}, lambda path, _: "opt" if "a" in path else "own")
    state = uo.setup(rule, params)
    _, out = uo.update(state, params, grads, scale=3.0)
    assert seen == [3.0]
    np.testing.assert_allclose(out["a"], 1 - 0.3)
    _, alone = uo.update(uo.setup(uo.adam(lr=0.1), {"b": np.ones(2)}), {"b": np.ones(2)},
                         {"b": np.ones(2)})
    np.testing.assert_array_equal(out["b"], alone["b"])


# --- whole-tree states against params of other shapes -----------------------------------------


@pytest.mark.parametrize("make", [
    lambda: uo.dog(), lambda: uo.dowg(), lambda: uo.prodigy(), lambda: uo.dadapt_adamw(),
    lambda: uo.schedule_free_sgd(lr=0.1), lambda: uo.momo(), lambda: uo.momo_adam(),
    lambda: uo.galore(lr=0.1), lambda: uo.accumulate(uo.sgd(lr=0.1), every=3),
    lambda: uo.mechanize(uo.sgd(lr=0.1)),
], ids=["dog", "dowg", "prodigy", "dadapt_adamw", "schedule_free_sgd", "momo", "momo_adam",
        "galore", "accumulate", "mechanize"])
@pytest.mark.parametrize("entry", ["update", "update_"])
def test_a_whole_tree_state_of_params_of_other_shapes_is_refused(make: Any, entry: str) -> None:
    """Params whose shapes changed since set-up (the same structure) against a rule whose state
    is its whole-tree parts': they stepped silently (DoG, GaLore, Momo, D-Adaptation; accumulate
    took the micro-batch into its mean) or failed in a NumPy broadcast naming no leaf. A
    ValueError names the leaf and the state's entry, nothing written."""
    params = {"w": np.ones((4, 3))}
    state = uo.setup(make(), params)
    state = uo.update_(state, params, {"w": np.full((4, 3), 0.5)}, value=1.0)
    other = {"w": np.ones((5, 3))}
    trees = [x.copy() for x in _arrays(state.tree_states)]
    with pytest.raises(ValueError, match=r"params\['w'\] has shape \(5, 3\), but the state's "
                                         r"\w+\['\w+'\] for it has shape \(4, 3\): this state "
                                         r"was set up for other params|the state's "
                                         r"scale_by_galore: projector for leaf 0 has "
                                         r"shape \(4, 3\), where a param of shape \(5, 3\) "
                                         r"keeps \(5, 3\)"):
        getattr(uo, entry)(state, other, {"w": np.full((5, 3), 7.0)}, value=1.0)
    np.testing.assert_array_equal(other["w"], 1.0)
    for x, y in zip(_arrays(state.tree_states), trees, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("make", [lambda: uo.dog(), lambda: uo.prodigy(),
                                  lambda: uo.schedule_free_sgd(lr=0.1), lambda: uo.momo()],
                         ids=["dog", "prodigy", "schedule_free_sgd", "momo"])
def test_a_whole_tree_state_of_more_leaves_is_refused(make: Any) -> None:
    """A flat list of params one shorter than the one a whole-tree part's state was set up
    for: 'zip() argument 2 is longer than argument 1' from inside the part. A ValueError
    names the state's entry and both counts, nothing written."""
    params = [np.ones(3), np.ones(2)]
    state = uo.setup(make(), params)
    state = uo.update_(state, params, [np.full(3, 0.5), np.full(2, 0.5)], value=1.0)
    one = [np.ones(3)]
    trees = [x.copy() for x in _arrays(state.tree_states)]
    with pytest.raises(ValueError, match=r"the state's \w+\['\w+'\] holds 2 arrays, one per "
                                         r"leaf, and the params have 1 leaf\(s\): this state was "
                                         r"set up for other params"):
        # (the step of a torch group a parameter was removed from: uniopt.torch makes the
        # State of the group's parameters as they are now)
        uo.update_(dataclasses.replace(state, treedef=flat_list_def(1)), one, [np.ones(3)],
                   value=1.0)
    np.testing.assert_array_equal(one[0], 1.0)
    for x, y in zip(_arrays(state.tree_states), trees, strict=True):
        np.testing.assert_array_equal(x, y)


def _arrays(tree: Any) -> list[Any]:
    import optree

    return [x for x in optree.tree_leaves(tree, none_is_leaf=False)
            if isinstance(x, np.ndarray)]


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_update_in_place_refuses_a_leaf_that_repeats_its_elements(library: str) -> None:
    """A writable view with a stride of 0 (NumPy's as_strided, torch's expand) holds one
    element four times: update_ wrote each once per repeat, the last winning (SGD's four
    different steps became the last one's), where update steps each. Refused, named, nothing
    written; the pure step takes it."""
    from numpy.lib.stride_tricks import as_strided

    if library == "numpy":
        base = np.zeros(1)
        w = as_strided(base, shape=(4,), strides=(0,), writeable=True)
        g = np.array([1.0, 2.0, 3.0, 4.0])
    else:
        base = torch.zeros(1, dtype=torch.float64)
        w, g = base.expand(4), torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    state = uo.setup(uo.sgd(lr=0.1), {"w": w})
    _, pure = uo.update(state, {"w": w}, {"w": g})
    np.testing.assert_allclose(np.asarray(pure["w"]), [-0.1, -0.2, -0.3, -0.4])
    with pytest.raises(ValueError, match=re.escape(
            "update_ cannot write params['w'] in place: it repeats its elements in memory")):
        uo.update_(state, {"w": w}, {"w": g})
    assert float(base[0]) == 0.0


def test_update_in_place_takes_empty_leaves_among_views() -> None:
    """NumPy gives an empty array strides of 0: it repeats nothing, and steps as before (the
    check of repeats refused uniopt.torch's every model with an empty weight, nn.Linear(0, 3),
    whose tensors it steps as NumPy views), at the first in-place step and the later ones."""
    flat = np.zeros(10)
    params = {"a": flat[:5], "b": flat[5:], "e": np.zeros((3, 0))}
    state = uo.setup(uo.adam(lr=0.1), params)
    for _ in range(2):
        state = uo.update_(state, params, {"a": np.ones(5), "b": np.ones(5),
                                           "e": np.zeros((3, 0))})
    assert (flat < 0).all()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 0))
    opt = ut.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.ones(2, 4)).sum().backward()
        opt.step()


@pytest.mark.parametrize("rule", [uo.lbfgs(), uo.sam(uo.sgd(lr=0.1))], ids=["lbfgs", "sam"])
def test_a_closures_loss_of_many_numbers_is_refused_naming_its_shape(rule: Any) -> None:
    """L-BFGS took a per-example loss to float() ('only 0-dimensional arrays can be converted
    to Python scalars'), and SAM stepped on it silently."""
    params = {"w": np.ones(3)}
    state = uo.setup(rule, params)
    with pytest.raises(ValueError, match=r"the closure's loss must be one number; got an array "
                                         r"of shape \(3,\)"):
        uo.minimize_step_(state, params, lambda q: (q["w"] ** 2, {"w": 2 * q["w"]}))
    assert np.array_equal(params["w"], np.ones(3))
    with pytest.raises(TypeError, match="got 'a'"):
        uo.minimize_step_(state, params, lambda q: ("a", {"w": 2 * q["w"]}))
    # one number, or an array of one element (torch's float(closure()) takes a loss of shape
    # (1,)), steps
    for loss in (1.0, np.float32(1.0), np.ones(()), np.ones((1,))):
        uo.minimize_step(state, params, lambda q, loss=loss: (loss, {"w": 2 * q["w"]}))
    if rule.name == "sam":  # (a rule that reads no loss: a closure may give none)
        uo.minimize_step(state, params, lambda q: (None, {"w": 2 * q["w"]}))


@pytest.mark.parametrize("name", uo.registry.names())
def test_a_rule_given_an_unknown_keyword_names_it_and_its_fields(name: str) -> None:
    """optax's and keras's ``learning_rate`` (or a typo) got Python's bare "unexpected keyword
    argument": every registry rule names the keyword, the spelling it takes where there is
    one, and its fields."""
    cls = uo.registry.entry(name).rule
    fields = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    hint = ("; the learning rate is lr" if "lr" in fields else
            "; did you mean 'max_learning_rate'?" if "max_learning_rate" in fields else "")
    with pytest.raises(TypeError, match=re.escape(
            f"{cls.__name__}() got an unexpected keyword argument 'learning_rate'{hint} "
            f"(its fields are {fields})")):
        cls(learning_rate=1e-3)
    with pytest.raises(TypeError, match=re.escape(f"'{fields[0]}x'; did you mean '{fields[0]}'")):
        cls(**{f"{fields[0]}x": 1})


@pytest.mark.parametrize("compiled", [False, True], ids=["reference", "compiled"])
@pytest.mark.parametrize("rule", [uo.adam(lr=0.1), uo.adagrad(lr=0.1), uo.rmsprop(lr=0.1),
                                  uo.chain(uo.clip_by_global_norm(1.0), uo.sgd(lr=0.1)),
                                  uo.novograd(lr=0.1), uo.chain(uo.centralize(), uo.adam(0.1))],
                         ids=["adam", "adagrad", "rmsprop", "clip-sgd", "novograd",
                              "centralize-adam"])
def test_a_non_finite_gradient_steps_to_nan_without_numpys_warnings(
        rule: Any, compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """NumPy's arithmetic on the reference path warned at a NaN or infinite gradient ("invalid
    value encountered in divide"), and under -W error raised with nothing written, where the
    compiled loop, torch and JAX step to NaN in silence: whether a step warned hung on which
    path it took. Every path now steps alike."""
    import warnings

    from uniopt.fast import cpu

    if compiled:  # (the compiled loop around a per-leaf part: its NumPy arithmetic warned)
        monkeypatch.setattr(cpu, "MIN_LEAVES", 0)
        monkeypatch.setattr(cpu, "MIN_SIZE", 0)
        monkeypatch.setattr(cpu, "COMPILE_AFTER", 0)
    grads = {"w": np.array([[0.5, np.nan, np.inf], [-np.inf, 0.0, 1.0], [1.0, 2.0, 3.0]],
                           np.float32),
             "b": np.array([[0.0, 1.0, 2.0]] * 3, np.float32)}
    pure = {"w": np.ones((3, 3), np.float32), "b": np.ones((3, 3), np.float32)}
    written = {"w": np.ones((3, 3), np.float32), "b": np.ones((3, 3), np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = uo.setup(rule, pure)
        for _ in range(2):
            state, pure = uo.update(state, pure, grads)
        state = uo.setup(rule, written)
        for _ in range(2):
            state = uo.update_(state, written, grads)
    assert int(state.step) == 2 and not np.isfinite(pure["w"]).all()
    assert all(np.array_equal(pure[k], written[k], equal_nan=True) for k in pure)


def test_radam_at_a_threshold_of_4_taken_where_rho_t_reaches_4() -> None:
    """``rectify_threshold=4, rectify_strict=False`` with betas[1] = 0.6 (rho_inf exactly 4):
    rho_t reaches 4.0 at step 73 and the rectification, taken there, read 0/0 (eager:
    ZeroDivisionError; under jit NaN). Its value where rho_t has reached rho_inf is 1, the
    formula's own elsewhere, to the bit."""
    rule = uo.radam(lr=0.1, betas=(0.9, 0.6), rectify_threshold=4.0, rectify_strict=False)
    rng = np.random.default_rng(0)
    params = {"w": np.ones(3)}
    state = uo.setup(rule, params)
    for _ in range(100):
        state, params = uo.update(state, params, {"w": rng.standard_normal(3)})
    assert np.isfinite(params["w"]).all()


def test_the_optax_protocol_and_a_minimizer_step_to_nan_without_numpys_warnings() -> None:
    """The optax protocol's step and L-BFGS's own arithmetic warned at a non-finite gradient
    (and raised under -W error), as update's reference path did; a closure's own warnings stay
    the caller's to see."""
    import warnings

    bad = {"w": np.array([1.0, np.inf, np.nan])}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rule = uo.adam(lr=0.1)
        updates, _ = rule.update(bad, rule.init({"w": np.ones(3)}), {"w": np.ones(3)})
        assert not np.isfinite(updates["w"]).all()
        params = {"w": np.ones(3)}
        state = uo.setup(uo.lbfgs(), params)
        uo.minimize_step_(state, params, lambda p: (float(np.sum(p["w"])), bad))
    with pytest.warns(RuntimeWarning, match="divide by zero"):
        uo.minimize_step_(uo.setup(uo.lbfgs(), params), params,
                          lambda p: (float(np.float64(1.0) / np.float64(0.0)),
                                     {"w": np.ones(3)}))


def test_the_rectified_adam_block_refuses_a_threshold_below_4() -> None:
    """Below 4 the rectification's ratio is negative (its root complex on the host: a step of
    complex numbers), or 0/0 where rho_inf is 4, at a rho_t the threshold lets through; radam's
    rectify_threshold was held to 4 and up, the block was not."""
    from uniopt.rules.adam_variants import scale_by_rectified_adam

    with pytest.raises(ValueError, match=r"scale_by_rectified_adam: threshold must be a number "
                                         r">= 4 \(r_t is real where rho_t >= 4\), got 3\.0"):
        scale_by_rectified_adam(threshold=3.0)
    assert scale_by_rectified_adam(threshold=4.0).threshold == 4.0


def test_a_flat_gradient_list_for_a_dict_in_its_own_order_is_warned_of() -> None:
    """A dict of params (torch's named_parameters) and a flat gradient list in the dict's order
    (torch.autograd.grad(loss, model.parameters())): uniopt reads it sorted by key, and where
    the shapes fit both orders (a LayerNorm's weight and bias) it stepped each with the other's
    gradient, silently. It warns, once per rule and order of keys; a dict already sorted, or
    shapes that only one order fits (the shape check then names the leaf), say nothing."""
    import warnings

    params = {"weight": np.ones(4), "bias": np.zeros(4)}  # named_parameters' order
    grads = [np.full(4, 1.0), np.full(4, -1.0)]
    state = uo.setup(uo.sgd(lr=0.1), params)
    with pytest.warns(UserWarning, match=r"grads is a flat sequence, read in "
                                         r"uniopt.trainables\(params\) order .* steps "
                                         r"'weight' with another parameter's gradient"):
        uo.update_(state, params, grads)
    with pytest.warns(UserWarning, match="grads is a flat sequence"):  # (autograd's tuple)
        uo.update(uo.setup(uo.sgd(lr=0.1), params), params, tuple(grads))
    assert params["bias"].tolist() == [-0.1] * 4  # (the first in sorted order: bias)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        uo.update_(state, params, grads)  # once
        uo.update(uo.setup(uo.sgd(lr=0.1), {"bias": np.zeros(4), "weight": np.ones(4)}),
                  {"bias": np.zeros(4), "weight": np.ones(4)}, grads)
        uo.update_(state, params, dict(zip(params, grads, strict=True)))  # (says whose is whose)
        apart = {"weight": np.ones((2, 4)), "bias": np.zeros(2)}
        with pytest.raises(ValueError, match=r"gradient for params\['bias'\] has shape \(2, 4\)"):
            uo.update(uo.setup(uo.sgd(lr=0.1), apart), apart, [np.ones((2, 4)), np.ones(2)])


@pytest.mark.parametrize(("make", "hint"), [
    (lambda: uo.rmsprop(7e-4, decay=0.99), "; optax's rmsprop decay is rmsprop's alpha ("),
    (lambda: uo.rmsprop(rho=0.9), "; keras's RMSprop rho is rmsprop's alpha ("),
    (lambda: uo.adam(3e-4, b1=0.9), "; adam takes the pair as betas=(b1, b2) ("),
    (lambda: uo.adamw(beta_2=0.99), "; adamw takes the pair as betas=(b1, b2) ("),
    (lambda: uo.lamb(beta_1=0.9), "; lamb's is b1 ("),
    (lambda: uo.adam(epsilon=1e-7), "; adam's epsilon is eps ("),
    (lambda: uo.adadelta(decay=0.9), "; did you mean 'decay_form'? ("),
])
def test_optax_and_keras_names_say_what_they_are_here(make: Any, hint: str) -> None:
    """optax's rmsprop(decay=) was answered "did you mean 'decay_form'?" (whose values are
    'l2' and 'decoupled'), and optax's b1 with nothing: the ported names say their field."""
    with pytest.raises(TypeError, match=re.escape(hint)):
        make()


def test_an_unregistered_dataclass_of_params_names_register_dataclass() -> None:
    @dataclasses.dataclass
    class Model:
        w: Any

    with pytest.raises(TypeError, match=re.escape(
            "params is a Model, not an array: params leaves must be arrays (or None) (a "
            "dataclass: uniopt.register_dataclass(Model) makes its fields nodes of the tree)")):
        uo.setup(uo.sgd(), Model(np.ones(3)))


def test_an_integer_leaf_says_to_leave_it_out() -> None:
    """uo.freeze and uo.masked refuse an integer leaf at set-up as every rule does (optax's
    set_to_zero takes jax.grad's float0 for it): the message says how to leave it out."""
    for rule in (uo.adam(), uo.freeze(uo.adam(), ["n"])):
        with pytest.raises(TypeError, match=re.escape(
                "params['n'] has dtype int32; uniopt updates floating arrays (real, or complex "
                "as the pairs of their parts): leave a model's integer arrays out of the params "
                "(equinox: eqx.filter(model, eqx.is_inexact_array); flax: nnx.Param only)")):
            uo.setup(rule, {"n": np.ones(3, np.int32), "w": np.ones(2)})


def test_dog_block_names_an_unknown_start() -> None:
    """scale_by_dog checks its start as dog checks init_step's kind (it left a parameter where
    it was, never moving it)."""
    with pytest.raises(ValueError, match="scale_by_dog: start must be one of 'heuristic'.*"
                                         "got 'bogus'"):
        uo.scale_by_dog(start="bogus")
    with pytest.raises(ValueError, match="dog: init_step's kind must be one of .*got 'bogus'"):
        uo.dog(init_step=("bogus", 1e-6))


@pytest.mark.parametrize("make", [
    lambda m: uo.lamb(weight_decay=0.5, mask=m), lambda m: uo.adan(weight_decay=0.5, mask=m),
    lambda m: uo.acprop(weight_decay=0.5, mask=m), lambda m: uo.galore(weight_decay=0.5, mask=m),
    lambda m: uo.lars(weight_decay_mask=m), lambda m: uo.lars(trust_ratio_mask=m),
    lambda m: uo.masked_block(block=uo.weight_decay(wd=0.5), mask=m),
], ids=["lamb", "adan", "acprop", "galore", "lars_wd", "lars_trust", "masked_block"])
def test_a_rules_mask_takes_bools_only(make: Any) -> None:
    """A rule's mask= took any leaf as bool() does: a glob (what uo.masked takes) decayed every
    leaf, as a NaN did, and 0.0 none; such a leaf is named (the field too)."""
    for bad in ("w", "no-such-leaf", math.nan, 0.0, {"w": True, "b": 1}):
        with pytest.raises(TypeError, match=r"mask must be None, a tree of bools.*it holds"):
            make(bad)
    for good in (False, {"w": np.True_, "b": np.asarray(False)}, lambda p: {"w": True}):
        make(good)


def test_a_mask_function_must_answer_with_bools() -> None:
    p = {"w": np.ones(3), "b": np.ones(2)}
    s = uo.setup(uo.adan(lr=0.1, weight_decay=0.5, mask=lambda q: {"w": "yes", "b": True}), p)
    with pytest.raises(TypeError, match="mask function must return a tree of bools; it holds "
                                        "'yes'"):
        uo.update(s, p, {"w": np.ones(3), "b": np.ones(2)})


def test_a_convention_that_is_no_string_is_named() -> None:
    """A list was looked up in the table of conventions: "unhashable type: 'list'"."""
    with pytest.raises(TypeError, match=r"^adam: convention must be one of 'torch'.* got "
                                        r"\['torch'\]$"):
        uo.adam(convention=["torch"])
