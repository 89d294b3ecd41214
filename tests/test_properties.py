"""Properties every rule must have, over hyperparameters drawn by hypothesis.

Runs are reproducible: every test uses ``derandomize=True`` and no example database, and the
arrays come from a NumPy generator seeded by a hypothesis-drawn integer.
"""

from __future__ import annotations

import dataclasses
import math
from collections import namedtuple
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import uniopt as uo
from helpers import (
    WIDE_LEAVES,
    assert_same,
    assert_same_state,
    copy_tree,
    expect_compiled,
    grads_like,
    map_tree,
    reference_path,
)

torch = pytest.importorskip("torch")

SETTINGS = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

STEPS = 5

# --- hyperparameter strategies ------------------------------------------------------------------

lrs = st.floats(1e-4, 0.3)
small = st.floats(1e-10, 1e-4)
decay = st.floats(0.0, 0.99)
b2s = st.floats(0.5, 0.9999)
wds = st.one_of(st.just(0.0), st.floats(1e-4, 0.1))
seeds = st.integers(0, 2**32 - 1)

Switches = frozenset[str]


def _switch(on: Switches, name: str, strategy: Any, off: Any = 0.0) -> Any:
    """``strategy`` where switch ``name`` is on; else ``off``, the value that drops its block."""
    return strategy if name in on else st.just(off)


def sgd_kw(on: Switches) -> Any:
    nesterov = "nesterov" in on
    momentum = st.floats(0.1, 0.99) if nesterov else st.floats(0.0, 0.99, exclude_min=True)
    return st.fixed_dictionaries(
        {
            "lr": lrs,
            "momentum": _switch(on, "momentum", momentum),
            "dampening": st.just(0.0) if nesterov else st.floats(0.0, 0.9),
            "weight_decay": _switch(on, "weight_decay", st.floats(1e-4, 0.1)),
            "nesterov": st.just(nesterov),
        }
    )


SGD_SWITCHES = ("momentum", "nesterov", "weight_decay")


def sgd_valid(on: Switches) -> bool:
    return "nesterov" not in on or "momentum" in on


def adam_kw(on: Switches, weight_decay: Any = None) -> Any:
    """Adam's keywords; ``weight_decay`` is switch-driven unless a strategy is given."""
    return st.fixed_dictionaries(
        {
            "lr": lrs,
            "betas": st.tuples(decay, b2s),
            "eps": small,
            "weight_decay": (
                _switch(on, "weight_decay", st.floats(1e-4, 0.1))
                if weight_decay is None
                else weight_decay
            ),
            "amsgrad": st.just("amsgrad" in on),
        }
    )


def _adamw_kw(couple_lr: bool) -> Any:
    # AdamW's decay is a block whatever its value: 0 is a value like any other
    return lambda on: adam_kw(on, wds).map(lambda kw: {**kw, "couple_lr": couple_lr})


@dataclasses.dataclass(frozen=True)
class Case:
    """A rule family: how to build it from keywords, and valid keywords (``lr`` always).

    A switch turns a block of the rule on or picks its kernel (momentum, Nesterov, AMSGrad,
    centered, weight decay); ``kwargs(on)`` draws valid values with the switches ``on`` set and
    the others off. The blocks decide which compiled loop a step runs, the values do not: a
    narrow (reference-path) test draws the switches too, a wide (compiled-path) one runs each
    set of ``wide``, fixed, so the wide tests compile a small bounded set of loops. Between them
    the sets put every block and kernel variant on the compiled path (a switch that is off only
    drops a block); each is a configuration tests/test_fused.py compiles too, except the chains
    of chain-clip-sgd and the last three cases (four loops each: two dtypes, pure and in place).
    """

    name: str
    build: Any
    kwargs: Callable[[Switches], Any]
    switches: tuple[str, ...] = ()
    wide: tuple[Switches, ...] = (frozenset(),)
    valid: Callable[[Switches], bool] = lambda on: True

    def keywords(self, on: Switches | None) -> Any:
        """A strategy for valid keywords: with switches ``on``, or (None) with drawn ones."""
        if on is not None:
            assert self.valid(on) and on <= set(self.switches), (self.name, on)
            return self.kwargs(on)
        if not self.switches:
            return self.kwargs(frozenset())
        return st.frozensets(st.sampled_from(self.switches)).filter(self.valid).flatmap(self.kwargs)

    def __repr__(self) -> str:
        return self.name


def _sets(*sets: str) -> tuple[Switches, ...]:
    """Switch sets from their names joined by "-" ("" for none)."""
    return tuple(frozenset(s.split("-")) - {""} for s in sets)


CASES = [
    Case(
        "sgd",
        lambda kw: uo.sgd(**kw),
        sgd_kw,
        SGD_SWITCHES,
        _sets("momentum-weight_decay", "momentum-nesterov"),
        sgd_valid,
    ),
    Case(
        "adagrad",
        lambda kw: uo.adagrad(**kw),
        lambda on: st.fixed_dictionaries(
            {
                "lr": lrs,
                "lr_decay": st.floats(0.0, 0.1),
                "weight_decay": _switch(on, "weight_decay", st.floats(1e-4, 0.1)),
                "initial_accumulator_value": st.floats(0.0, 1.0),
                "eps": small,
            }
        ),
        ("weight_decay",),
        _sets("weight_decay"),
    ),
    Case(
        "rmsprop",
        lambda kw: uo.rmsprop(**kw),
        lambda on: st.fixed_dictionaries(
            {
                "lr": lrs,
                "alpha": st.floats(0.5, 0.999),
                "eps": small,
                "weight_decay": _switch(on, "weight_decay", st.floats(1e-4, 0.1)),
                "momentum": _switch(on, "momentum", st.floats(0.0, 0.99, exclude_min=True)),
                "centered": st.just("centered" in on),
            }
        ),
        ("centered", "momentum", "weight_decay"),
        _sets("centered-momentum-weight_decay", ""),
    ),
    Case(
        "adadelta",
        lambda kw: uo.adadelta(**kw),
        lambda on: st.fixed_dictionaries(
            {
                "lr": st.floats(0.1, 1.0),
                "rho": decay,
                "eps": small,
                "weight_decay": _switch(on, "weight_decay", st.floats(1e-4, 0.1)),
            }
        ),
        ("weight_decay",),
        _sets("weight_decay"),
    ),
    Case(
        "adam",
        lambda kw: uo.adam(**kw),
        adam_kw,
        ("amsgrad", "weight_decay"),
        _sets("amsgrad-weight_decay", ""),
    ),
    Case("adamw", lambda kw: uo.adamw(**kw), _adamw_kw(True), ("amsgrad",), _sets("")),
    Case("adamw-decoupled", lambda kw: uo.adamw(**kw), _adamw_kw(False), ("amsgrad",), _sets("")),
    Case(
        "optimistic_adam",
        lambda kw: uo.optimistic_adam(**kw),
        # Nesterov and eps_root change the coefficients, not the kernels
        lambda on: st.fixed_dictionaries(
            {
                "lr": lrs,
                "alpha": st.floats(0.0, 2.0),
                "beta": st.floats(0.0, 2.0),
                "b1": decay,
                "b2": b2s,
                "eps": small,
                "eps_root": st.one_of(st.just(0.0), small),
                "nesterov": st.booleans(),
            }
        ),
    ),
    Case(
        "chain-l2-adam",
        lambda kw: uo.chain(uo.weight_decay(kw.pop("wd")), uo.adam(**kw)),
        lambda on: adam_kw(on, st.just(0.0)).flatmap(
            lambda kw: st.floats(1e-4, 0.1).map(lambda wd: {**kw, "wd": wd})
        ),
        ("amsgrad",),
        _sets("amsgrad"),
    ),
    Case(
        "chain-clip-sgd",
        lambda kw: uo.chain(uo.clip(kw.pop("max_delta")), uo.sgd(**kw)),
        lambda on: sgd_kw(on).flatmap(
            lambda kw: st.floats(0.01, 2.0).map(lambda d: {**kw, "max_delta": d})
        ),
        SGD_SWITCHES,
        # sgd's wide sets have momentum; this one has none
        _sets("weight_decay"),
        sgd_valid,
    ),
    Case(
        "chain-adam-decoupled-wd",
        lambda kw: uo.chain(uo.adam(kw["lr"], kw["betas"]), uo.weight_decay(kw["wd"])),
        lambda on: st.fixed_dictionaries({"lr": lrs, "betas": st.tuples(decay, b2s), "wd": wds}),
    ),
    Case(
        "chain-optimistic-head",
        # the optimistic block first in a chain stores the incoming gradient itself as its slot
        lambda kw: uo.chain(
            uo.scale_by_optimistic_gradient(kw["alpha"], kw["beta"]), uo.scale_by_lr(kw["lr"])
        ),
        lambda on: st.fixed_dictionaries(
            {"lr": lrs, "alpha": st.floats(0.0, 2.0), "beta": st.floats(0.0, 2.0)}
        ),
    ),
    Case(
        "chain-centered-nesterov",
        lambda kw: uo.chain(
            uo.scale_by_centered_rms(kw["alpha"], kw["eps"]),
            uo.trace(kw["momentum"], nesterov=True),
            uo.scale_by_lr(kw["lr"]),
        ),
        lambda on: st.fixed_dictionaries(
            {
                "lr": lrs,
                "alpha": st.floats(0.5, 0.999),
                "eps": small,
                "momentum": st.floats(0.1, 0.99),
            }
        ),
    ),
    Case(
        "chain-adagrad-adadelta-amsgrad",
        lambda kw: uo.chain(
            uo.scale_by_adagrad(kw["lr"], eps=kw["eps"], initial_accumulator_value=0.1),
            uo.scale_by_adadelta(kw["rho"], kw["eps"]),
            uo.scale_by_amsgrad(0.9, 0.999, kw["eps"], eps_root=kw["eps"]),
            uo.clip(0.5),
        ),
        lambda on: st.fixed_dictionaries({"lr": lrs, "eps": small, "rho": decay}),
    ),
]


def by_case(argnames: str, variants: list[tuple[Any, ...]]) -> Any:
    """Parametrize ``case``, ``argnames`` and ``on`` over every case and variant; a variant's
    last value is its width: "narrow" draws the switches (``on`` is None), "wide" runs once per
    fixed switch set of the case (:class:`Case`)."""
    params = []
    for case in CASES:
        for variant in variants:
            label = "-".join(str(v) for v in variant)
            for on in case.wide if variant[-1] == "wide" else (None,):
                sets = "" if on is None else f"[{'-'.join(sorted(on)) or 'plain'}]"
                params.append(pytest.param(case, *variant, on, id=f"{case.name}-{label}{sets}"))
    return pytest.mark.parametrize(f"case,{argnames},on", params)


case_param = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
by_width = by_case("width", [("narrow",), ("wide",)])
# the reference path only: a wide tree compiles a loop per drawn set of flags, and the compiled
# loop's dtypes are test_fused's (bitwise the reference's, in float32 and float64)
narrow_only = by_case("width", [("narrow",)])
ADAM = next(c for c in CASES if c.name == "adam")


# --- trees and data -----------------------------------------------------------------------------

Point = namedtuple("Point", "x y")


@uo.register_dataclass
@dataclasses.dataclass
class Layer:
    w: Any
    b: Any


# A step over many leaves (or many elements) runs uniopt's compiled NumPy loop, a small one the
# reference code: "wide" trees have enough leaves (WIDE_LEAVES more) for the first, "narrow" ones
# take the second, and every property must hold on both. Each test checks which one ran.


def _nested(rng: np.random.Generator, dtype: Any = np.float64, width: str = "narrow") -> Any:
    """A params tree with every kind of node uniopt supports."""

    def a(*shape: int) -> np.ndarray:
        return rng.normal(size=shape).astype(dtype)

    tree = {
        "enc": [Layer(w=a(3, 2), b=None), Layer(w=a(2, 2), b=a(2))],
        "head": (Point(x=a(4), y=None), a(1, 3)),
        "frozen": None,
        "gain": {"z": a(2), "a": [a(5)]},
    }
    if width == "wide":
        tree["gain"]["m"] = tuple(Point(x=a(2), y=None) for _ in range(WIDE_LEAVES))
    return tree


def _simple(rng: np.random.Generator, dtype: Any = np.float64, width: str = "narrow") -> Any:
    tree = {"w": rng.normal(size=(3, 2)).astype(dtype), "b": [rng.normal(size=4).astype(dtype)]}
    if width == "wide":
        tree["many"] = [rng.normal(size=3).astype(dtype) for _ in range(WIDE_LEAVES)]
    return tree


def compiled(width: str, steps: int) -> Any:
    """Expect ``steps`` steps of the compiled loop for a wide tree, none for a narrow one."""
    return expect_compiled(steps if width == "wide" else 0)


def _leaves(tree: Any) -> list[Any]:
    return uo.trainables(tree)


def _add(p: Any, u: Any) -> Any:
    """``p + u`` leaf by leaf over two trees of dicts and lists."""
    if isinstance(p, dict):
        return {k: _add(v, u[k]) for k, v in p.items()}
    if isinstance(p, list):
        return [_add(a, b) for a, b in zip(p, u, strict=True)]
    return p + u


def _copy_state(state: uo.State) -> uo.State:
    slots = {k: [np.array(a, copy=True) for a in v] for k, v in state.slots.items()}
    return uo.State(state.rule, state.step, slots, state.treedef)


def _grad_seq(rng: np.random.Generator, params: Any, n: int = STEPS) -> list[Any]:
    return [grads_like(rng, params) for _ in range(n)]


def _run(rule: uo.Transform, params: Any, grads: list[Any]) -> tuple[uo.State, Any]:
    state = uo.setup(rule, params)
    for g in grads:
        state, params = uo.update(state, params, g)
    return state, params


# --- pure and in place ---------------------------------------------------------------------------


def _strided(x: np.ndarray) -> np.ndarray:
    """A writable, non-contiguous copy of ``x``: NumPy arrays that no compiled path takes."""
    base = np.zeros((*x.shape, 2), x.dtype)
    base[..., 0] = x
    return base[..., 0]


# "numpy": C-contiguous arrays; "numpy-strided": params are strided views (in place they stay
# strided, pure updates return fresh contiguous arrays), so the two forms take different code
# paths (the compiled loop runs the pure updates from the second on, never the in-place ones)
# and must still agree; "torch": another library
@by_case(
    "lib,width",
    [("numpy", "narrow"), ("numpy", "wide"), ("numpy-strided", "wide"), ("torch", "narrow")],
)
@SETTINGS
@given(data=st.data(), seed=seeds, dtype=st.sampled_from([np.float32, np.float64]))
def test_pure_and_inplace_agree_bit_for_bit(case, lib, width, on, data, seed, dtype):
    if width == "wide":
        # the two forms' loops differ in their generated driver, not in the rule's kernels, which
        # tests/test_fused.py holds to the reference in both dtypes: each dtype here would be
        # two more loops to compile per case (about a minute of the suite with a cold cache)
        dtype = np.float64
    kw = data.draw(case.keywords(on))
    rng = np.random.default_rng(seed)
    params = _simple(rng, dtype, width)
    grads = _grad_seq(rng, params)
    conv = {"numpy": np.array, "numpy-strided": _strided, "torch": torch.from_numpy}[lib]

    def to_lib(tree: Any, c: Any = conv) -> Any:
        return map_tree(lambda x: c(np.array(x)), tree)

    def to_np(xs: list[Any]) -> list[np.ndarray]:
        return [x.numpy() if isinstance(x, torch.Tensor) else x for x in xs]

    gconv = torch.from_numpy if lib == "torch" else np.array
    pure_p, inplace_p = to_lib(params), to_lib(params)
    held = _leaves(inplace_p)
    pure_s = uo.setup(case.build(dict(kw)), pure_p)
    inplace_s = uo.setup(case.build(dict(kw)), inplace_p)
    held_slots = {k: list(v) for k, v in inplace_s.slots.items()}
    with compiled(width, 2 * STEPS if lib == "numpy" else STEPS - 1):
        for g in grads:
            pure_s, pure_p = uo.update(pure_s, pure_p, to_lib(g, gconv))
            out = uo.update_(inplace_s, inplace_p, to_lib(g, gconv))
            # the state passed in is advanced: a loop that drops update_'s result (torch's
            # habit) steps as one that keeps it
            assert out is inplace_s
            assert_same(to_np(_leaves(pure_p)), to_np(_leaves(inplace_p)))
            assert_same_state(pure_s, inplace_s)
    # in place means the very arrays the caller holds were written
    assert all(a is b for a, b in zip(held, _leaves(inplace_p), strict=True))
    for k, arrays in held_slots.items():
        assert all(a is b for a, b in zip(arrays, inplace_s.slots[k], strict=True))


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("rule", [
    uo.adam(lr=0.1), uo.partition({"a": uo.adam(lr=0.1), "b": uo.sgd(lr=0.1, momentum=0.9)},
                                  lambda path, p: "a" if path[0] == "w" else "b"),
    uo.chain(uo.clip_by_global_norm(0.5), uo.prodigy()), uo.lbfgs()],
    ids=["adam", "partition", "prodigy", "lbfgs"])
def test_a_loop_that_drops_update_s_result_steps_as_one_that_keeps_it(rule: Any,
                                                                       lib: str) -> None:
    """update_ wrote the slots of the state passed in but returned its next step in a new
    state: ``uo.update_(state, p, g)`` without ``state =`` (torch's habit) stepped Adam's
    moments with the count left at 0, p 0.7656 after two steps of lr 0.1 where 0.8 is right,
    silently (a sweep's finding). The state passed in is now advanced; the same for
    minimize_step_, and for steps with a None gradient (the per-leaf counts)."""
    conv = np.array if lib == "numpy" else (lambda x: torch.tensor(np.array(x)))

    def tree() -> dict[str, Any]:
        return {"w": conv(np.linspace(-1, 1, 6)), "b": conv(np.array([0.5, -0.25]))}

    def grads(p: dict[str, Any], k: int) -> dict[str, Any]:
        # (a None gradient where the rule takes one: whole-tree parts see every leaf)
        gone = k == 2 and not rule.tree_layout
        return {"w": p["w"] * 2 + 0.1 * k, "b": None if gone else p["b"] - 1}

    def closure(p: dict[str, Any]) -> tuple[Any, Any]:
        g = {"w": p["w"] * 2, "b": p["b"] - 1}
        return float((p["w"] ** 2).sum() + ((p["b"] - 1) ** 2).sum() / 2), g

    kept_p, bare_p = tree(), tree()
    kept = uo.setup(rule, kept_p)
    bare = uo.setup(rule, bare_p)
    for k in range(5):
        if rule.name == "lbfgs":
            kept, _ = uo.minimize_step_(kept, kept_p, closure)
            uo.minimize_step_(bare, bare_p, closure)
        else:
            kept = uo.update_(kept, kept_p, grads(kept_p, k))
            uo.update_(bare, bare_p, grads(bare_p, k))
    assert_same([np.asarray(x) for x in _leaves(kept_p)],
                [np.asarray(x) for x in _leaves(bare_p)])
    assert_same_state(kept, bare)
    assert int(np.asarray(bare.step)) == 5


# --- flat gradient lists ------------------------------------------------------------------------


@by_width
@SETTINGS
@given(data=st.data(), seed=seeds)
def test_flat_list_equals_tree(case, width, on, data, seed):
    kw = data.draw(case.keywords(on))
    rng = np.random.default_rng(seed)
    params = _nested(rng, width=width)
    grads = _grad_seq(rng, params)
    # the flat list follows trainables(params): match gradients to params by identity
    flats = []
    for g in grads:
        by_id = {}
        _like_map2(params, g, by_id)
        flats.append([by_id[id(p)] for p in uo.trainables(params)])

    s_tree, p_tree = uo.setup(case.build(dict(kw)), params), params
    s_flat, p_flat = uo.setup(case.build(dict(kw)), params), params
    with compiled(width, 2 * STEPS):
        for g, f in zip(grads, flats, strict=True):
            s_tree, p_tree = uo.update(s_tree, p_tree, g)
            s_flat, p_flat = uo.update(s_flat, p_flat, f)
    assert_same(_leaves(p_tree), _leaves(p_flat))
    assert_same_state(s_tree, s_flat)
    # the result keeps the params' node types
    assert isinstance(p_flat["enc"][1], Layer) and p_flat["enc"][0].b is None
    assert isinstance(p_flat["head"], tuple) and isinstance(p_flat["head"][0], Point)
    assert p_flat["head"][0].y is None and p_flat["frozen"] is None

    # and in place, from the same start
    p_in = copy_tree(params)
    s_in = uo.setup(case.build(dict(kw)), p_in)
    with compiled(width, STEPS):
        for f in flats:
            s_in = uo.update_(s_in, p_in, f)
    assert_same(_leaves(p_tree), _leaves(p_in))


def _like_map2(params: Any, grads: Any, out: dict[int, Any]) -> None:
    """``out[id(param)] = its gradient``, walking both trees by hand."""
    if params is None:
        return
    if isinstance(params, np.ndarray):
        out[id(params)] = grads
    elif isinstance(params, dict):
        for k in params:
            _like_map2(params[k], grads[k], out)
    elif isinstance(params, Layer):
        _like_map2(params.w, grads.w, out)
        _like_map2(params.b, grads.b, out)
    else:
        for p, g in zip(params, grads, strict=True):
            _like_map2(p, g, out)


# --- pure means pure ----------------------------------------------------------------------------


@by_width
@SETTINGS
@given(data=st.data(), seed=seeds)
def test_pure_update_leaves_inputs_alone_and_returns_fresh_arrays(case, width, on, data, seed):
    kw = data.draw(case.keywords(on))
    rng = np.random.default_rng(seed)
    params = _simple(rng, width=width)
    with compiled(width, 3):
        state, params = _run(case.build(dict(kw)), params, _grad_seq(rng, params, 2))
        grads = grads_like(rng, params)
        old_p, old_g, old_s = copy_tree(params), copy_tree(grads), _copy_state(state)
        new_state, new_params = uo.update(state, params, grads)
    assert_same(_leaves(params), _leaves(old_p))
    assert_same(_leaves(grads), _leaves(old_g))
    assert_same_state(state, old_s)

    # writing into everything returned must not reach any input
    for a in _leaves(new_params):
        a[...] = 1234.5
    for arrays in new_state.slots.values():
        for a in arrays:
            a[...] = -999.0
    # nor one another
    assert all(np.all(a == 1234.5) for a in _leaves(new_params))
    assert_same(_leaves(params), _leaves(old_p))
    assert_same(_leaves(grads), _leaves(old_g))
    assert_same_state(state, old_s)


@pytest.mark.parametrize("width", ["narrow", "wide"])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.0, 0.5)])
def test_optimistic_state_does_not_alias(alpha, beta, width):
    # optimistic_adam's state stores the previous update, a value that also flows onward
    rng = np.random.default_rng(1)
    params = _simple(rng, width=width)
    state = uo.setup(uo.optimistic_adam(0.1, alpha=alpha, beta=beta), params)
    for _ in range(2):
        g = grads_like(rng, params)
        with compiled(width, 1):
            new_state, new_params = uo.update(state, params, g)
        prev = new_state.slots["scale_by_optimistic_gradient.prev_update"]
        leaves = [
            *_leaves(params),
            *_leaves(g),
            *_leaves(new_params),
            *(a for v in state.slots.values() for a in v),
            *(a for k, v in new_state.slots.items() if not k.endswith("prev_update") for a in v),
        ]
        for a in prev:
            assert not any(np.shares_memory(a, b) for b in leaves)
        state, params = new_state, new_params


def test_optax_protocol_state_does_not_alias_grads():
    rule = uo.chain(uo.scale_by_optimistic_gradient(), uo.scale_by_lr(0.1))
    params = [np.ones(3)]
    grads = [np.array([1.0, 2.0, 3.0])]
    _, state = rule.update(grads, rule.init(params), params)
    grads[0][...] = 0.0  # e.g. a framework zeroing its gradient buffers for the next step
    assert np.array_equal(state.slots["scale_by_optimistic_gradient.prev_update"][0], [1, 2, 3])


# --- resuming -----------------------------------------------------------------------------------


@by_width
@SETTINGS
@given(data=st.data(), seed=seeds, k=st.integers(1, 4))
def test_resume_from_saved_state(case, width, on, data, seed, k):
    kw = data.draw(case.keywords(on))
    rng = np.random.default_rng(seed)
    params = _simple(rng, width=width)
    grads = _grad_seq(rng, params, k + 3)
    with compiled(width, 2 * k + 3):
        whole_s, whole_p = _run(case.build(dict(kw)), params, grads)
        state, p = _run(case.build(dict(kw)), params, grads[:k])
    saved = uo.State(
        state.rule,
        state.step,
        {key: [a.copy() for a in v] for key, v in state.slots.items()},
        state.treedef,
    )
    p = copy_tree(p)
    del state
    with compiled(width, 3):
        for g in grads[k:]:
            saved, p = uo.update(saved, p, g)
    assert_same(_leaves(whole_p), _leaves(p))
    assert_same_state(whole_s, saved)


# --- adjust -------------------------------------------------------------------------------------


@by_width
@SETTINGS
@given(data=st.data(), seed=seeds, k=st.integers(1, 4), lr2=lrs)
def test_adjust_lr_equals_switching_schedule(case, width, on, data, seed, k, lr2):
    kw = data.draw(case.keywords(on))
    lr1 = kw["lr"]
    rng = np.random.default_rng(seed)
    params = _simple(rng, width=width)
    grads = _grad_seq(rng, params, k + 3)

    with compiled(width, k):
        state, p = _run(case.build(dict(kw)), params, grads[:k])
    adjusted = uo.adjust(state, lr=lr2)
    assert adjusted.step == state.step == k
    assert adjusted.slots.keys() == state.slots.keys()
    for key, arrays in state.slots.items():
        assert all(a is b for a, b in zip(arrays, adjusted.slots[key], strict=True))
    assert adjusted.rule != state.rule or lr1 == lr2
    switching = case.build({**kw, "lr": lambda step: lr1 if step < k else lr2})
    with compiled(width, 3 + k + 3):
        for g in grads[k:]:
            adjusted, p = uo.update(adjusted, p, g)
        ref_s, ref_p = _run(switching, params, grads)
    assert_same(_leaves(ref_p), _leaves(p))
    assert_same_state(ref_s, adjusted)


# --- schedules ----------------------------------------------------------------------------------

ADAM_HYPER = ["lr", "betas[0]", "betas[1]", "eps", "weight_decay"]


def _with(kw: dict[str, Any], name: str, wrap: Any) -> dict[str, Any]:
    kw = dict(kw)
    if name.startswith("betas"):
        i = int(name[-2])
        betas = list(kw["betas"])
        betas[i] = wrap(betas[i])
        kw["betas"] = tuple(betas)
    else:
        kw[name] = wrap(kw[name])
    return kw


# uo.schedules.constant on every number of every rule (at its registry example) is
# tests/test_registry.py's; here a plain function, over drawn values and switches
@pytest.mark.parametrize("rule", [uo.adam, uo.adamw], ids=["adam", "adamw"])
@pytest.mark.parametrize("name", ADAM_HYPER)
@SETTINGS
@given(kw=ADAM.keywords(None), seed=seeds)
def test_constant_schedule_equals_number(rule, name, kw, seed):
    def wrap(v: Any) -> Any:
        return lambda step: v

    rng = np.random.default_rng(seed)
    params = _simple(rng)
    grads = _grad_seq(rng, params)
    s1, p1 = _run(rule(**kw), params, grads)
    s2, p2 = _run(rule(**_with(kw, name, wrap)), params, grads)
    assert_same(_leaves(p1), _leaves(p2))
    assert_same_state(s1, s2)


# --- dtypes and 0-d arrays ----------------------------------------------------------------------


@narrow_only
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@SETTINGS
@given(data=st.data(), seed=seeds)
def test_dtype_is_preserved(case, width, on, dtype, data, seed):
    kw = data.draw(case.keywords(on))
    rng = np.random.default_rng(seed)
    params = _simple(rng, dtype, width)
    grads = _grad_seq(rng, params)
    with compiled(width, STEPS):
        state, out = _run(case.build(dict(kw)), params, grads)
    for a in _leaves(out) + [a for v in state.slots.values() for a in v]:
        assert type(a) is np.ndarray
        assert a.dtype == dtype
    p_in = copy_tree(params)
    s_in = uo.setup(case.build(dict(kw)), p_in)
    with compiled(width, STEPS):
        for g in grads:
            s_in = uo.update_(s_in, p_in, g)
    for a in _leaves(p_in) + [a for v in s_in.slots.values() for a in v]:
        assert a.dtype == dtype


@pytest.mark.parametrize("width", ["narrow", "wide"])
@pytest.mark.parametrize(
    "rule",
    [
        uo.sgd(lr=np.float64(0.1)),
        uo.adam(betas=(np.float64(0.9), 0.999)),
        uo.adam(eps=np.array(1e-8)),
    ],
    ids=["sgd-lr", "adam-b1", "adam-0d-eps"],
)
def test_numpy_scalar_hyperparameter_keeps_float32(rule, width):
    params = _simple(np.random.default_rng(0), np.float32, width)
    grads = grads_like(np.random.default_rng(1), params)
    with compiled(width, 1):
        state, out = uo.update(uo.setup(rule, params), params, grads)
    assert all(a.dtype == np.float32 for a in _leaves(out))
    assert all(a.dtype == np.float32 for v in state.slots.values() for a in v)


@case_param
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@SETTINGS
@given(data=st.data(), seed=seeds)
def test_zero_d_params_compute_like_one_element_arrays(case, dtype, data, seed):
    kw = data.draw(case.keywords(None))
    rng = np.random.default_rng(seed)
    gs = rng.normal(size=STEPS).astype(dtype)
    p0 = dtype(rng.normal())
    s0, out0 = _run(case.build(dict(kw)), [np.array(p0)], [[np.array(g)] for g in gs])
    s1, out1 = _run(case.build(dict(kw)), [np.array([p0])], [[np.array([g])] for g in gs])
    assert np.asarray(out0[0]).dtype == dtype
    assert np.array_equal(np.asarray(out0[0]).reshape(1), out1[0])
    for k in s1.slots:
        assert np.array_equal(np.asarray(s0.slots[k][0]).reshape(1), s1.slots[k][0])


@pytest.mark.parametrize("width", ["narrow", "wide"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule", [uo.sgd(lr=0.1), uo.adam(lr=0.1)], ids=["sgd", "adam"])
def test_zero_d_params_stay_arrays(rule, dtype, width):
    rng = np.random.default_rng(0)
    params = _simple(rng, dtype, width)
    params["s"] = np.array(1.5, dtype)
    state = uo.setup(rule, params)
    for _ in range(2):
        with compiled(width, 1):
            state, params = uo.update(state, params, grads_like(rng, params))
        assert type(params["s"]) is np.ndarray and params["s"].ndim == 0
        assert params["s"].dtype == dtype
        i = [k for k, a in enumerate(_leaves(params)) if a is params["s"]][0]
        for v in state.slots.values():
            assert type(v[i]) is np.ndarray and v[i].ndim == 0 and v[i].dtype == dtype


# --- trainables order ---------------------------------------------------------------------------


def test_trainables_order():
    def a(v: float) -> np.ndarray:
        return np.array([v])

    arr = {n: a(i) for i, n in enumerate("ABCDEFGHIJ")}
    tree = {
        "b": [arr["A"], (arr["B"], None, {"z": arr["C"], "a": arr["D"]})],
        "a": arr["E"],
        "c": None,
        "nt": Point(y=arr["F"], x=arr["G"]),
        "dc": Layer(b=arr["H"], w=arr["I"]),
        "B": [[[arr["J"]]]],
    }
    # dict keys sorted ("B" < "a" < "b" < ...), sequences and fields in order, depth first,
    # None skipped
    expected = ["J", "E", "A", "B", "D", "C", "I", "H", "G", "F"]
    got = uo.trainables(tree)
    assert len(got) == len(expected)
    assert all(g is arr[e] for g, e in zip(got, expected, strict=True))


# --- the optax protocol -------------------------------------------------------------------------


@by_width
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@SETTINGS
@given(data=st.data(), seed=seeds)
def test_optax_protocol_equals_update(case, width, on, dtype, data, seed):
    # bit for bit, not 1 ulp: updates are -u, and IEEE 754 defines p - u as p + (-u), both
    # correctly rounded from the same exact value. The reference is the rule with a part after
    # it (scale(1.0), which changes no bit of u): so its last part does not write p itself in
    # torch's order (a fused multiply-add, Elementwise.finish), which updates to add cannot.
    # Both on the reference path: the compiled loop is held to it by test_fused, and a loop for
    # the extra part would be one more compile per case
    kw = data.draw(case.keywords(on))
    rng = np.random.default_rng(seed)
    params = _simple(rng, dtype, width)
    grads = _grad_seq(rng, params)
    with reference_path():
        ref_s, ref_p = _run(uo.chain(case.build(dict(kw)), uo.scale(1.0)), params, grads)

    rule = case.build(dict(kw))
    state, p = rule.init(params), params
    for g in grads:
        updates, state = rule.update(g, state, p)
        p = _add(p, updates)
    assert_same(_leaves(ref_p), _leaves(p))
    assert_same_state(ref_s, state)


# --- convergence --------------------------------------------------------------------------------

# the options and chains; every rule as its registry example builds it converges on an
# ill-conditioned quadratic and Rosenbrock in tests/test_registry.py
CONVERGE = [
    uo.sgd(lr=0.1),
    uo.sgd(lr=0.05, momentum=0.9, nesterov=True),
    uo.sgd(lr=0.05, momentum=0.5, dampening=0.5, weight_decay=1e-6),
    uo.adagrad(lr=0.5, lr_decay=1e-3, initial_accumulator_value=0.1),
    uo.rmsprop(lr=0.01, momentum=0.5, centered=True),
    # Adadelta's first steps are about sqrt(eps): eps sets its initial step size
    uo.adadelta(lr=1.0, eps=1e-3),
    uo.adam(lr=0.05, amsgrad=True),
    uo.adamw(lr=0.05, weight_decay=1e-5),
    uo.adamw(lr=0.05, weight_decay=1e-6, couple_lr=False),
    uo.optimistic_adam(lr=0.02, nesterov=False, alpha=0.5, beta=0.5),
    uo.adam(lr=uo.schedules.cosine(0.1, steps=300)),
    uo.chain(uo.clip(0.5), uo.sgd(lr=0.1, momentum=0.5)),
    uo.chain(uo.weight_decay(1e-6), uo.adam(lr=0.05)),
]


@pytest.mark.parametrize("rule", CONVERGE, ids=repr)
def test_convex_quadratic_converges(rule):
    rng = np.random.default_rng(0)
    curv = {"w": rng.uniform(0.5, 2.0, (4, 3)), "b": rng.uniform(0.5, 2.0, 3)}
    opt = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}

    def loss(p: dict[str, np.ndarray]) -> float:
        return sum(0.5 * float(np.sum(curv[k] * (p[k] - opt[k]) ** 2)) for k in p)

    params = {k: np.zeros_like(v) for k, v in opt.items()}
    state = uo.setup(rule, params)
    start = loss(params)
    for _ in range(300):
        grads = {k: curv[k] * (params[k] - opt[k]) for k in params}
        state, params = uo.update(state, params, grads)
    assert math.isfinite(loss(params))
    assert loss(params) < 1e-4 * start
