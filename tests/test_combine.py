"""Recipes by path: partition, masked, freeze against optax's multi_transform and masked, on
every backend; selectors; errors that name the leaf; members reached by adjust."""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any

import numpy as np
import optree
import pytest

import uniopt as uo
from helpers import (
    WIDE_LEAVES,
    assert_same,
    copy_tree,
    counting_jit,
    expect_compiled,
    grads_like,
    map_tree,
)

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

STEPS = 300
# the other backends run the same code on their arrays: agreement over fewer steps shows it
BACKEND_STEPS = 60


def _steps(library: str) -> int:
    return STEPS if library == "numpy" else BACKEND_STEPS


def _params(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "embed": {"weight": rng.normal(size=(6, 4))},
        "layers": [{"w": rng.normal(size=(4, 4)), "bias": rng.normal(size=4),
                    "norm": {"scale": rng.normal(size=4)}} for _ in range(2)],
        "head": rng.normal(size=(4, 3)),
    }


def _labels(params: dict[str, Any]) -> Any:
    """The same partition as a tree of labels, for optax."""
    def label(path: str) -> str:
        if path.startswith("embed"):
            return "embed"
        return "plain" if path.endswith("bias") or "norm" in path else "decay"
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) for p, _ in paths]
    return jax.tree.unflatten(treedef, [label(n) for n in names])


RECIPE = uo.by_path({"embed.*": "embed", "*.bias": "plain", "*norm*": "plain", "*": "decay"})


def _uniopt_rule() -> uo.Transform:
    return uo.partition({
        "decay": uo.adamw(lr=1e-2, weight_decay=0.1),
        "plain": uo.adam(lr=1e-2),
        "embed": uo.adamw(lr=1e-3, weight_decay=0.1),
    }, RECIPE)


def _optax_rule(params: Any) -> Any:
    return optax.multi_transform({
        "decay": optax.adamw(1e-2, weight_decay=0.1),
        "plain": optax.adam(1e-2),
        "embed": optax.adamw(1e-3, weight_decay=0.1),
    }, _labels(params))


def _run_optax(tx: Any, params: Any, grads: list[Any]) -> list[Any]:
    """optax's params after every step; ``tx`` may be a function that builds it (under x64:
    optax canonicalises dtypes such as ``accumulator_dtype`` when it is built)."""
    with jax.enable_x64(True):
        if not hasattr(tx, "init"):
            tx = tx()
        p = map_tree(jnp.asarray, params)
        s = tx.init(p)

        @jax.jit
        def step(p: Any, s: Any, g: Any) -> Any:
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        out = []
        for g in grads:
            p, s = step(p, s, map_tree(jnp.asarray, g))
            out.append(map_tree(np.asarray, p))
        return out


def _close(a: Any, b: Any, tol: float = 1e-12) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.max(np.abs(x - y)) <= tol * max(1.0, np.max(np.abs(y))), (x, y)


@pytest.mark.parametrize("library", ["numpy", "torch", "jax"])
def test_partition_matches_optax_multi_transform(library: str) -> None:
    rng = np.random.default_rng(0)
    params = _params(rng)
    grads = [grads_like(rng, params) for _ in range(_steps(library))]
    want = _run_optax(_optax_rule(params), params, grads)
    if library == "numpy":
        p, pi = copy_tree(params), copy_tree(params)
        state, state_i = uo.setup(_uniopt_rule(), p), uo.setup(_uniopt_rule(), pi)
        for g, w in zip(grads, want, strict=True):
            state, p = uo.update(state, p, g)
            state_i = uo.update_(state_i, pi, g)
            _close(p, w)
        assert_same(jax.tree.leaves(p), jax.tree.leaves(pi))
    elif library == "torch":
        _close(_last_params("torch", _uniopt_rule, params, grads), want[-1])
    else:
        _close(_last_params("jax", _uniopt_rule, params, grads), want[-1])


def test_partition_takes_one_label_for_every_leaf_as_optax() -> None:
    """A bare string is a tree of one label, a prefix of every params tree (optax.partition's
    prefix); it was taken as a glob and refused ("the label of params['a'] is False")."""
    rng = np.random.default_rng(1)
    params = _params(rng)
    grads = [grads_like(rng, params) for _ in range(3)]
    tx = optax.partition({"x": optax.adam(0.1)}, "x")
    want = _run_optax(tx, params, grads)
    p = copy_tree(params)
    state = uo.setup(uo.partition({"x": uo.adam(lr=0.1)}, "x"), p)
    for g, w in zip(grads, want, strict=True):
        state, p = uo.update(state, p, g)
        _close(p, w)
    with pytest.raises(TypeError, match="labels .* holds re.compile"):
        uo.partition({"x": uo.adam()}, re.compile("x"))


def _last_params(library: str, make: Any, params: Any, grads: list[Any]) -> Any:
    """The params after ``make()``'s steps on ``grads``: torch tensors stepped in place (as
    NumPy), or JAX arrays under jax.jit in float64, compiled once."""
    if library == "torch":
        torch = pytest.importorskip("torch")
        p = map_tree(torch.from_numpy, copy_tree(params))
        state = uo.setup(make(), p)
        for g in grads:
            state = uo.update_(state, p, map_tree(torch.from_numpy, g))
        return map_tree(lambda t: t.numpy(), p)
    with jax.enable_x64(True):
        p = map_tree(jnp.asarray, params)
        state = uo.setup(make(), p)
        step, traces = counting_jit()
        for g in grads:
            state, p = step(state, p, map_tree(jnp.asarray, g))
        assert len(traces) == 1
        return p


def test_each_member_keeps_state_for_its_own_leaves_only() -> None:
    params = _params(np.random.default_rng(1))
    state = uo.setup(uo.freeze(uo.adam(lr=1e-3), "embed.*"), params)
    members = state.tree_states["freeze"]
    assert len(members["trainable"].slots["scale_by_adam.exp_avg"]) == 7
    assert members["frozen"].slots == {}


def test_masked_matches_optax_masked_in_a_chain() -> None:
    rng = np.random.default_rng(2)
    params = _params(rng)
    grads = [grads_like(rng, params) for _ in range(STEPS)]
    mask = jax.tree.map(lambda label: label == "decay", _labels(params))
    tx = optax.chain(optax.masked(optax.add_decayed_weights(0.05), mask), optax.adam(1e-2))
    want = _run_optax(tx, params, grads)
    for spec in (mask, ["layers.*.w", "head"], re.compile(r"layers\.\d\.w|head"),
                 lambda path, x: x.ndim == 2 and not path.startswith("embed")):
        p = copy_tree(params)
        state = uo.setup(uo.chain(uo.masked(uo.weight_decay(0.05), spec), uo.adam(lr=1e-2)), p)
        for g in grads:
            state = uo.update_(state, p, g)
        _close(p, want[-1])


def test_masked_alone_passes_the_other_updates_through() -> None:
    """As optax's, the leaves left out get the updates as they come, at the head of a rule the
    raw gradient; but a uniopt update is subtracted and optax's added: they step down the
    gradient here and up it in ``optax.masked`` alone (docs/recipes.md says so), through the
    optax protocol too."""
    params = {"a": np.ones(3), "b": np.ones(3)}
    g = {"a": np.full(3, 0.5), "b": np.full(3, 0.5)}
    rule = uo.masked(uo.sgd(lr=0.1), "a")
    state = uo.setup(rule, params)
    _, new = uo.update(state, params, g)
    np.testing.assert_array_equal(new["a"], 1 - 0.1 * 0.5)
    np.testing.assert_array_equal(new["b"], 1 - 0.5)
    jparams, jg = jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, g)
    mine, _ = rule.update(jg, rule.init(jparams), jparams)
    tx = optax.masked(optax.sgd(0.1), {"a": True, "b": False})
    theirs, _ = tx.update(jg, tx.init(jparams), jparams)
    np.testing.assert_allclose(optax.apply_updates(jparams, mine)["b"], 1 - 0.5)
    np.testing.assert_allclose(optax.apply_updates(jparams, theirs)["b"], 1 + 0.5)
    np.testing.assert_allclose(optax.apply_updates(jparams, mine)["a"],
                               optax.apply_updates(jparams, theirs)["a"])


@pytest.mark.parametrize("inplace", [False, True])
def test_freeze_leaves_the_frozen_untouched(inplace: bool) -> None:
    rng = np.random.default_rng(3)
    params = _params(rng)
    before = copy_tree(params)
    opt = uo.freeze(uo.adamw(lr=1e-2, weight_decay=0.1), ["embed.*", "head"])
    tx = optax.multi_transform(
        {"t": optax.adamw(1e-2, weight_decay=0.1), "f": optax.set_to_zero()},
        jax.tree.map(lambda lab: "f" if lab == "embed" else "t", _labels(params)) | {"head": "f"})
    grads = [grads_like(rng, params) for _ in range(20)]
    want = _run_optax(tx, params, grads)
    state = uo.setup(opt, params)
    for g in grads:
        if inplace:
            state = uo.update_(state, params, g)
        else:
            state, new = uo.update(state, params, g)
            assert new["head"] is not params["head"]  # a pure step aliases no input
            params = new
    _close(params, want[-1])
    assert_same([params["embed"]["weight"], params["head"]],
                [before["embed"]["weight"], before["head"]])


def test_a_frozen_member_in_a_chain_gives_zero_updates() -> None:
    params = {"a": np.ones(2), "b": np.ones(2)}
    g = {"a": np.full(2, np.inf), "b": np.ones(2)}
    state = uo.setup(uo.chain(uo.freeze(uo.scale(2.0), "a"), uo.scale_by_lr(lr=0.5)), params)
    _, new = uo.update(state, params, g)
    np.testing.assert_array_equal(new["a"], 1.0)  # not inf * 0
    np.testing.assert_array_equal(new["b"], 0.0)


def test_members_step_on_the_compiled_loop() -> None:
    """Each member steps its leaves in one engine call, so a wide tree takes the compiled
    loop once per member and step, bit for bit as the reference path."""
    rng = np.random.default_rng(4)
    params = {f"l{i}": {"w": rng.normal(size=(3, 3)), "bias": rng.normal(size=3)}
              for i in range(WIDE_LEAVES)}
    grads = [grads_like(rng, params) for _ in range(3)]
    opt = uo.partition({"d": uo.adamw(lr=1e-2, weight_decay=0.1), "p": uo.adam(lr=1e-2)},
                       uo.by_path({"*.bias": "p", "*": "d"}))
    fast, ref = copy_tree(params), copy_tree(params)
    s_fast, s_ref = uo.setup(opt, fast), uo.setup(opt, ref)
    with expect_compiled(2 * len(grads)):
        for g in grads:
            s_fast = uo.update_(s_fast, fast, g)
    from helpers import reference_path
    with reference_path():
        for g in grads:
            s_ref = uo.update_(s_ref, ref, g)
    assert_same(jax.tree.leaves(fast), jax.tree.leaves(ref))


def test_adjust_reaches_a_member_by_its_label() -> None:
    state = uo.setup(_uniopt_rule(), _params(np.random.default_rng(5)))
    new = uo.adjust(state, **{"embed.lr": 1e-4})
    assert new.rule.inner["embed"].lr == 1e-4 and new.rule.inner["decay"].lr == 1e-2
    with pytest.raises(ValueError, match=r"'lr' is a hyperparameter of 3 members.*decay\.lr"):
        uo.adjust(state, lr=1e-4)


def test_adjust_reaches_a_label_with_dots() -> None:
    """A label may hold dots (a module path, "no.decay"): the longest label the key begins
    with is the member (it was unreachable: "no" named no member)."""
    params = {"w": np.ones(2), "b": np.ones(2)}
    rule = uo.partition({"no.decay": uo.sgd(lr=0.1), "no": uo.adamw(lr=0.1)},
                        {"w": "no", "b": "no.decay"})
    for r in (rule, uo.chain(uo.clip_by_global_norm(1.0), rule)):
        new = uo.adjust(uo.setup(r, params), **{"no.decay.lr": 0.5, "no.weight_decay": 0.0})
        part = new.rule if r is rule else new.rule.transforms[1]
        assert part.inner["no.decay"].lr == 0.5 and part.inner["no"].lr == 0.1
        assert part.inner["no"].weight_decay == 0.0


def test_optax_protocol_in_an_optax_chain() -> None:
    rng = np.random.default_rng(6)
    params = _params(rng)
    grads = [grads_like(rng, params) for _ in range(30)]
    want = _run_optax(optax.chain(optax.clip(1.0), _optax_rule(params)), params, grads)
    got = _run_optax(optax.chain(optax.clip(1.0), _uniopt_rule()), params, grads)
    _close(got[-1], want[-1])


def test_a_leaf_no_pattern_matches_is_an_error_naming_it() -> None:
    params = {"w": np.ones(2), "extra": np.ones(2)}
    with pytest.raises(ValueError, match=r"by_path: 'extra' matches none of \['w'\]"):
        uo.setup(uo.partition({"a": uo.sgd(lr=0.1)}, uo.by_path({"w": "a"})), params)


def test_a_label_without_a_rule_is_an_error_naming_the_leaf() -> None:
    params = {"w": np.ones(2), "b": np.ones(2)}
    with pytest.raises(ValueError, match=r"params\['b'\] is labelled 'bias', which names none"):
        uo.setup(uo.partition({"a": uo.sgd(lr=0.1)}, {"w": "a", "b": "bias"}), params)


def test_a_mask_shaped_unlike_the_params_is_an_error() -> None:
    params = {"w": np.ones(2), "b": np.ones(2)}
    with pytest.raises(ValueError, match=r"masked: the mask tree has structure"):
        uo.setup(uo.masked(uo.sgd(lr=0.1), {"w": True}), params)


# trees that are prefixes of _params' structure: a value at an inner node holds for every leaf
# under it (optax's multi_transform and masked take them so)
PREFIX_LABELS = {"embed": "embed", "head": "decay",
                 "layers": ["plain", {"w": "decay", "bias": "plain", "norm": "plain"}]}
PREFIX_MASK = {"embed": False, "head": True, "layers": [True, {"w": False, "bias": True,
                                                               "norm": True}]}
PREFIX_RULES = {
    "partition": (
        lambda: uo.partition({"decay": uo.adamw(lr=1e-2, weight_decay=0.1),
                              "plain": uo.adam(lr=1e-2),
                              "embed": uo.sgd(lr=1e-3, momentum=0.9)}, PREFIX_LABELS),
        lambda: optax.multi_transform({"decay": optax.adamw(1e-2, weight_decay=0.1),
                                       "plain": optax.adam(1e-2),
                                       "embed": optax.sgd(1e-3, momentum=0.9)}, PREFIX_LABELS)),
    "masked": (
        lambda: uo.chain(uo.masked(uo.weight_decay(0.05), PREFIX_MASK), uo.adam(lr=1e-2)),
        lambda: optax.chain(optax.masked(optax.add_decayed_weights(0.05), PREFIX_MASK),
                            optax.adam(1e-2))),
    "freeze": (
        lambda: uo.freeze(uo.adam(lr=1e-2), PREFIX_MASK),
        lambda: optax.multi_transform(
            {"t": optax.adam(1e-2), "f": optax.set_to_zero()},
            jax.tree.map(lambda frozen: "f" if frozen else "t", PREFIX_MASK))),
}


@pytest.mark.parametrize("library", ["numpy", "torch", "jax-jit"])
@pytest.mark.parametrize("name", list(PREFIX_RULES))
def test_a_labels_or_mask_tree_may_be_a_prefix_of_the_params(name: str, library: str) -> None:
    """A labels or mask tree that is a prefix of the params (a label for a whole module) was
    refused ("the labels tree has structure ..."), where optax's multi_transform and masked
    take it: its value at an inner node holds for every leaf under it. Against optax's same
    tree, jitted, in float64."""
    ours, theirs = PREFIX_RULES[name]
    rng = np.random.default_rng(3)
    params = _params(rng)
    grads = [grads_like(rng, params) for _ in range(BACKEND_STEPS)]
    want = _run_optax(theirs, params, grads)[-1]
    if library == "numpy":
        p = copy_tree(params)
        state = uo.setup(ours(), p)
        for g in grads:
            state = uo.update_(state, p, g)
    else:
        p = _last_params(library.removesuffix("-jit"), ours, params, grads)
    _close(p, want)
    if name == "freeze":  # (layers[0]'s leaves, under the value True at layers[0])
        np.testing.assert_array_equal(np.asarray(p["layers"][0]["w"]), params["layers"][0]["w"])


def test_a_tree_neither_the_params_structure_nor_a_prefix_says_so() -> None:
    params = {"a": {"w": np.ones(2), "b": np.ones(2)}, "c": np.ones(2)}
    for rule in (uo.partition({"x": uo.sgd(lr=0.1)}, {"a": {"w": "x"}, "c": "x"}),
                 uo.masked(uo.sgd(lr=0.1), {"a": True}),
                 uo.freeze(uo.sgd(lr=0.1), [True, False]),
                 # None over a subtree the params have (optax refuses it too; spread, it read
                 # as False), and None over a leaf
                 uo.masked(uo.sgd(lr=0.1), {"a": None, "c": True}),
                 uo.partition({"x": uo.sgd(lr=0.1)}, {"a": "x", "c": None})):
        with pytest.raises(ValueError, match=r"tree has structure .*: it must be the params' "
                                             r"structure or a prefix of it"):
            uo.setup(rule, params)


@pytest.mark.parametrize("call, message", [
    (lambda: uo.partition({}, {"w": "a"}), r"rules must be a non-empty dict"),
    (lambda: uo.partition({1: uo.sgd(lr=0.1)}, {"w": "a"}), r"labels must be strings, got 1"),
    (lambda: uo.partition({"a": uo.sgd(lr=0.1)}, {"w": 3}), r"labels \(str\).*holds 3"),
    (lambda: uo.masked(uo.sgd(lr=0.1), {"w": "yes"}), r"tree like the params of bools.*'yes'"),
    (lambda: uo.masked(uo.sgd(lr=0.1), 3.0), r"holds 3.0"),
    (lambda: uo.by_path({"w": 1}), r"by_path: the table maps .* got 'w': 1"),
    (lambda: uo.partition({"a": "adam"}, {"w": "a"}),
     r"partition: rules\['a'\] is neither a uniopt transform"),
    # a combinator names its own member, where chain's words blamed "argument 0"
    (lambda: uo.partition({"x": uo.adam, "y": uo.sgd()}, {"a": "x"}),
     r"^partition: rules\['x'\] is the class adam; call it: adam\(\)$"),
    (lambda: uo.accumulate(None, every=2), r"^accumulate: rule is neither a uniopt transform"),
    (lambda: uo.skip_nonfinite(uo.adam), r"^skip_nonfinite: rule is the class adam"),
    (lambda: uo.mechanize(uo.sgd), r"^mechanize: rule is the class sgd"),
    (lambda: uo.masked(uo.adam, "w"), r"^masked: rule is the class adam"),
    (lambda: uo.freeze(None, "w"), r"^freeze: rule is neither"),
])
def test_bad_recipes_are_clear_errors(call: Any, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        call()


def test_an_update_with_other_params_changes_nothing() -> None:
    params = {"w": np.ones(2), "b": np.ones(2)}
    state = uo.setup(uo.freeze(uo.adam(lr=0.1), "b"), params)
    before = copy_tree(params)
    with pytest.raises(ValueError, match=r"gradient for params\['w'\] has shape"):
        uo.update_(state, params, {"w": np.ones(3), "b": np.ones(2)})
    assert_same(jax.tree.leaves(params), jax.tree.leaves(before))
    assert state.step == 0 and state.tree_states["freeze"]["trainable"].step == 0


def _nan_from_step_1(step: Any) -> float:
    return 1e-2 if step < 1 else float("nan")


@pytest.mark.parametrize("rule", [
    uo.partition({"a": uo.sgd(lr=0.1, momentum=0.9), "b": uo.adam(lr=_nan_from_step_1)},
                 {"w": "a", "v": "b", "u": "b"}),
    # the invalid member two levels down, after a member of the outer one
    uo.partition({"a": uo.sgd(lr=0.1, momentum=0.9),
                  "b": uo.partition({"c": uo.adam(lr=0.1), "d": uo.adam(lr=_nan_from_step_1)},
                                    {"w": None, "v": "c", "u": "d"})},
                 {"w": "a", "v": "b", "u": "b"}),
    # a wrapper as the later member: what it wraps steps at this step
    *[uo.partition({"a": uo.sgd(lr=0.1, momentum=0.9),
                    "b": wrap(uo.sgd(lr=_nan_from_step_1, momentum=0.5))},
                   {"w": "a", "v": "b", "u": "b"})
      for wrap in (lambda r: uo.accumulate(r, 1), uo.skip_nonfinite, uo.mechanize)],
], ids=["flat", "nested", "accumulate", "skip_nonfinite", "mechanize"])
def test_a_member_invalid_at_a_step_fails_it_before_any_member_writes(rule: Any) -> None:
    """The members of a partition step one after another; an in-place step whose last member
    has a schedule invalid at that step raises before the first writes its leaves and state
    (it did write them: a retry then stepped the first member twice)."""
    params = {"w": np.ones(3), "v": np.ones(2), "u": np.ones(2)}
    grads = {k: np.full(v.shape, 0.5) for k, v in params.items()}
    state = uo.update_(uo.setup(rule, params), params, grads)
    before, before_state = copy_tree(params), copy_tree(_numpy_arrays(state))
    with pytest.raises(ValueError, match=r"(adam|sgd): lr must be finite, got nan \(the value "
                                         r"of its schedule at step 1\)"):
        uo.update_(state, params, grads)
    assert_same(jax.tree.leaves(params), jax.tree.leaves(before))
    assert_same(_numpy_arrays(state), before_state)


def test_a_later_members_nonfinite_limit_fails_the_step_before_any_member_writes() -> None:
    """skip_nonfinite past its limit raises before anything is written, as it says: inside a
    partition too, where the members before it had written their leaves."""
    rule = uo.partition({"a": uo.adam(lr=0.1), "b": uo.skip_nonfinite(uo.sgd(lr=0.1), 0)},
                        {"w": "a", "v": "b"})
    params = {"w": np.ones(3), "v": np.ones(2)}
    state = uo.update_(uo.setup(rule, params), params, {"w": np.ones(3), "v": np.ones(2)})
    before, before_state = copy_tree(params), copy_tree(_numpy_arrays(state))
    with pytest.raises(FloatingPointError, match=r"1 steps in a row with non-finite gradients "
                                                 r"\(max_consecutive=0\); this one's first is "
                                                 r"params\['v'\]"):
        uo.update_(state, params, {"w": np.ones(3), "v": np.array([1.0, np.nan])})
    assert_same(jax.tree.leaves(params), jax.tree.leaves(before))
    assert_same(_numpy_arrays(state), before_state)


def _numpy_arrays(tree: Any) -> list[np.ndarray]:
    """The NumPy arrays of ``tree``, a state's (its members' states too) included."""
    return [x for x in optree.tree_leaves(tree, namespace="uniopt")
            if isinstance(x, np.ndarray)]


@pytest.mark.parametrize(("rule", "grad"), [
    (uo.accumulate(uo.adam(lr=0.1), every=2), 0.5),  # a micro-batch: the rule does not step
    (uo.skip_nonfinite(uo.adam(lr=0.1)), np.nan),  # a skipped step
    (uo.freeze(uo.adam(lr=0.1), "b"), 0.5),  # a frozen member
    (uo.mechanize(uo.adam(lr=0.1)), 0.5),  # the params at set-up, kept
], ids=["accumulate", "skip_nonfinite", "freeze", "mechanize"])
def test_a_pure_step_of_a_member_that_does_not_move_aliases_nothing(rule: Any,
                                                                    grad: float) -> None:
    """What a pure step returns shares no memory with what it was given, where a member
    keeps its state as it was too: a later in-place step of the new state wrote the old
    state's arrays (a wrapped rule's slots, mechanize's ``x0``)."""
    params = {"w": np.ones(3), "b": np.ones(2)}
    state = uo.setup(rule, params)
    grads = {"w": np.full(3, grad), "b": np.full(2, 0.5)}
    given = _numpy_arrays(state) + _numpy_arrays(params) + _numpy_arrays(grads)
    before = copy_tree(given)
    new_state, new_params = uo.update(state, params, grads)
    for x in _numpy_arrays(new_state) + _numpy_arrays(new_params):
        assert not any(np.shares_memory(x, y) for y in given)
    for _ in range(2):
        new_state = uo.update_(new_state, new_params, {"w": np.full(3, 0.5), "b": np.ones(2)})
    assert_same(given, before)


# --- accumulate, skip_nonfinite -------------------------------------------------------------
# --- accumulate, skip_nonfinite -------------------------------------------------------------


def _poisoned(rng: np.random.Generator, params: Any, n: int, bad: set[int]) -> list[Any]:
    """``n`` gradient trees, those at steps ``bad`` holding a NaN (and an inf)."""
    out = []
    for i in range(n):
        g = grads_like(rng, params)
        if i in bad:
            g["head"][0, 0] = np.nan
            g["layers"][1]["bias"][2] = np.inf
        out.append(g)
    return out


def _run_uniopt(rule: uo.Transform, params: Any, grads: list[Any], library: str) -> tuple:
    """The params after every step and the last state: pure NumPy steps (checked against
    in-place ones bit for bit), torch tensors in place, or one jitted JAX step."""
    if library == "jax":
        with jax.enable_x64(True):
            p = map_tree(jnp.asarray, params)
            state = uo.setup(rule, p)
            step, traces = counting_jit()
            out = []
            for g in grads:
                state, p = step(state, p, map_tree(jnp.asarray, g))
                out.append(map_tree(np.asarray, p))
            assert len(traces) == 1
            return out, state
    if library == "torch":
        torch = pytest.importorskip("torch")
        pt = map_tree(torch.from_numpy, copy_tree(params))
        state = uo.setup(rule, pt)
        out = []
        for g in grads:
            state = uo.update_(state, pt, map_tree(torch.from_numpy, g))
            out.append(map_tree(lambda t: t.numpy().copy(), pt))
        return out, state
    p, pi = copy_tree(params), copy_tree(params)
    state, state_i = uo.setup(rule, p), uo.setup(rule, pi)
    out = []
    for g in grads:
        state, p = uo.update(state, p, g)
        state_i = uo.update_(state_i, pi, g)
        out.append(p)
    assert_same(jax.tree.leaves(p), jax.tree.leaves(pi))
    return out, state


@pytest.mark.parametrize("library", ["numpy", "torch", "jax"])
def test_accumulate_matches_optax_multisteps(library: str) -> None:
    rng = np.random.default_rng(7)
    params = _params(rng)
    n = _steps(library)
    grads = [grads_like(rng, params) for _ in range(n)]
    sched = uo.schedules.cosine(1e-2, steps=n // 4)
    want = _run_optax(lambda: optax.MultiSteps(optax.adamw(sched, weight_decay=0.1), 4,
                                               accumulator_dtype=jnp.float64), params, grads)
    got, state = _run_uniopt(uo.accumulate(uo.adamw(lr=sched, weight_decay=0.1), every=4),
                             params, grads, library)
    for g, w in zip(got, want, strict=True):
        _close(g, w)
    assert int(state.tree_states["accumulate"]["inner"].step) == n // 4


def test_accumulate_every_may_be_a_schedule() -> None:
    rng = np.random.default_rng(8)
    params = _params(rng)
    grads = [grads_like(rng, params) for _ in range(60)]
    every = uo.schedules.piecewise_constant(2, {5: 4})  # 2 micro-batches, then 4
    want = _run_optax(lambda: optax.MultiSteps(optax.sgd(0.1), lambda s: jnp.where(s < 5, 2, 4),
                                               accumulator_dtype=jnp.float64), params, grads)
    got, _ = _run_uniopt(uo.accumulate(uo.sgd(lr=0.1), every), params, grads, "numpy")
    for g, w in zip(got, want, strict=True):
        _close(g, w)


@pytest.mark.parametrize("library", ["numpy", "torch", "jax"])
def test_skip_nonfinite_matches_optax_apply_if_finite(library: str) -> None:
    rng = np.random.default_rng(9)
    params = _params(rng)
    n = _steps(library)
    bad = {3, 37, 38, 39, 200} if n > 200 else {3, 37, 38, 39}
    grads = _poisoned(rng, params, n, bad)
    want = _run_optax(optax.apply_if_finite(optax.adam(1e-2), 5), params, grads)
    got, state = _run_uniopt(uo.skip_nonfinite(uo.adam(lr=1e-2), 5), params, grads, library)
    for g, w in zip(got, want, strict=True):
        _close(g, w)
    tree = state.tree_states["skip_nonfinite"]
    assert int(tree["total_notfinite"]) == len(bad) and int(tree["inner"].step) == n - len(bad)


def _guard_run(rule: uo.Transform, grads: list[Any], tx: Any, library: str) -> list[tuple]:
    """skip_nonfinite's counts and params against optax's after every step, on NumPy, or JAX
    arrays stepped eagerly or jitted."""
    p0 = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([0.5], np.float32)}
    conv = (lambda t: t) if library == "numpy" else (lambda t: map_tree(jnp.asarray, t))
    ours, theirs = conv(copy_tree(p0)), map_tree(jnp.asarray, p0)
    state, ts = uo.setup(rule, ours), tx.init(theirs)
    step = jax.jit(uo.update) if library == "jax-jit" else uo.update
    rows = []
    for g in grads:
        state, ours = step(state, ours, conv(g))
        u, ts = tx.update(map_tree(jnp.asarray, g), ts, theirs)
        theirs = optax.apply_updates(theirs, u)
        s = state.tree_states["skip_nonfinite"]
        rows.append(((int(s["notfinite_count"]), bool(s["last_finite"]),
                      int(s["total_notfinite"])),
                     (int(ts.notfinite_count), bool(ts.last_finite), int(ts.total_notfinite))))
        for k in p0:
            np.testing.assert_allclose(np.asarray(ours[k]), np.asarray(theirs[k]), rtol=1e-6)
    return rows


@pytest.mark.parametrize("library", ["numpy", "jax-eager", "jax-jit"])
def test_skip_nonfinite_counts_match_optax_at_every_step(library: str) -> None:
    """A finite step resets the count in a row (bad, good, bad, bad, ... never passes 2) and
    ``last_finite`` says whether this step's gradients were finite."""
    good = {"w": np.array([0.5, -1.0], np.float32), "b": np.array([2.0], np.float32)}
    bad = {"w": np.array([np.nan, 1.0], np.float32), "b": np.array([np.inf], np.float32)}
    grads = [bad, good, bad, bad, good, bad, good, bad, bad]
    rows = _guard_run(uo.skip_nonfinite(uo.sgd(lr=0.1), 2), grads,
                      optax.apply_if_finite(optax.sgd(0.1), 2), library)
    for ours, theirs in rows:
        assert ours == theirs
    assert [r[0] for r in rows] == [(1, False, 1), (0, True, 1), (1, False, 2), (2, False, 3),
                                    (0, True, 3), (1, False, 4), (0, True, 4), (1, False, 5),
                                    (2, False, 6)]


@pytest.mark.parametrize("library", ["jax-eager", "jax-jit"])
def test_skip_nonfinite_past_its_limit_under_jax_applies_the_update_as_optax(
        library: str) -> None:
    """Nothing can raise in a traced step: the second and third inf in a row (limit 1) are
    applied, as optax applies them."""
    bad = {"w": np.array([np.inf, 1.0], np.float32), "b": np.array([1.0], np.float32)}
    rows = _guard_run(uo.skip_nonfinite(uo.sgd(lr=0.1), 1), [bad] * 3,
                      optax.apply_if_finite(optax.sgd(0.1), 1), library)
    assert [r[0] for r in rows] == [r[1] for r in rows] == [(1, False, 1), (2, False, 2),
                                                            (3, False, 3)]


def test_too_many_nonfinite_steps_in_a_row_is_an_error_that_changes_nothing() -> None:
    rng = np.random.default_rng(10)
    params = _params(rng)
    state = uo.setup(uo.skip_nonfinite(uo.adam(lr=1e-2), max_consecutive=2), params)
    bad = _poisoned(rng, params, 3, {0, 1, 2})
    state = uo.update_(state, params, bad[0])
    state = uo.update_(state, params, bad[1])
    before = copy_tree(params)
    with pytest.raises(FloatingPointError, match=r"3 steps in a row .* first is "
                                                 r"params\['head'\]"):
        uo.update_(state, params, bad[2])
    assert_same(jax.tree.leaves(params), jax.tree.leaves(before))
    assert state.tree_states["skip_nonfinite"]["notfinite_count"] == 2


@pytest.mark.parametrize("order", ["guard outside", "guard inside"])
def test_a_nonfinite_micro_batch_does_not_spoil_the_accumulator(order: str) -> None:
    """optax's MultiSteps resets its accumulator by multiplying it by zero, so a NaN that
    reached it stays for good; ours is set to zero. Outside, the guard drops the micro-batch
    (as if it never came); inside, the step it would have spoilt."""
    rng = np.random.default_rng(11)
    params = _params(rng)
    grads = _poisoned(rng, params, 24, {5})
    rule = (uo.skip_nonfinite(uo.accumulate(uo.sgd(lr=0.1), 4)) if order == "guard outside"
            else uo.accumulate(uo.skip_nonfinite(uo.sgd(lr=0.1)), 4))
    got, _ = _run_uniopt(rule, params, grads, "numpy")
    kept = [g for i, g in enumerate(grads) if i != 5] if order == "guard outside" else \
        [g for i, g in enumerate(grads) if i // 4 != 1]
    want = _run_optax(lambda: optax.MultiSteps(optax.sgd(0.1), 4,
                                               accumulator_dtype=jnp.float64), params, kept)
    _close(got[-1], want[-1])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(got[-1]))


@pytest.mark.parametrize("call, error, message", [
    (lambda: uo.accumulate(uo.sgd(lr=0.1), 0), ValueError,
     r"every must be an integer >= 1 or a schedule, got 0"),
    (lambda: uo.accumulate(uo.sgd(lr=0.1), 2.5), TypeError, r"got 2.5"),
    (lambda: uo.skip_nonfinite(uo.sgd(lr=0.1), -1), ValueError,
     r"max_consecutive must be an integer >= 0"),
])
def test_bad_wrappers_are_clear_errors(call: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def test_a_schedule_of_every_with_a_bad_value_is_an_error_naming_the_step() -> None:
    params = {"w": np.ones(2)}
    state = uo.setup(uo.accumulate(uo.sgd(lr=0.1), lambda s: 0), params)
    with pytest.raises(ValueError, match=r"every is 0 at step 0"):
        uo.update_(state, params, {"w": np.ones(2)})
    np.testing.assert_array_equal(params["w"], 1.0)


# --- under uniopt.torch -----------------------------------------------------------------------


def _model(torch: Any) -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(),
                               torch.nn.Linear(8, 8), torch.nn.LayerNorm(8),
                               torch.nn.Linear(8, 2)).double()


def _loss(torch: Any, model: Any, step: int) -> Any:
    gen = torch.Generator().manual_seed(step)
    x = torch.randint(0, 10, (16, 2), generator=gen)
    return model(x).pow(2).mean()


def test_a_partition_under_uniopt_torch_is_torchs_param_groups() -> None:
    """No decay on biases and LayerNorm, embedding lr x 0.1, by globs over named_parameters:
    torch's AdamW with three param groups, step for step; a state_dict saved mid-run (loaded
    with weights_only=True) resumes bit for bit."""
    import io

    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    ours, theirs, resumed = _model(torch), _model(torch), _model(torch)
    rule = uo.partition({"embed": uo.adamw(lr=1e-3, weight_decay=0.1),
                         "plain": uo.adamw(lr=1e-2, weight_decay=0.0),
                         "decay": uo.adamw(lr=1e-2, weight_decay=0.1)},
                        uo.by_path({"0.*": "embed", "*.bias": "plain", "3.*": "plain",
                                    "*": "decay"}))
    opt = ut.Optimizer(ours.named_parameters(), rule)
    named = dict(theirs.named_parameters())
    ref = torch.optim.AdamW([
        {"params": [named["0.weight"]], "lr": 1e-3, "weight_decay": 0.1},
        {"params": [p for n, p in named.items() if n.endswith("bias") or n.startswith("3.")],
         "weight_decay": 0.0},
        {"params": [named["2.weight"], named["4.weight"]], "weight_decay": 0.1},
    ], lr=1e-2)
    for step in range(60):
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            _loss(torch, model, step).backward()
            o.step()
        if step == 29:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            resumed.load_state_dict(ours.state_dict())
        if step > 29:
            if step == 30:
                buf.seek(0)
                opt_r = ut.Optimizer(resumed.named_parameters(), rule)
                opt_r.load_state_dict(torch.load(buf, weights_only=True))
            opt_r.zero_grad()
            _loss(torch, resumed, step).backward()
            opt_r.step()
    for a, b, c in zip(ours.parameters(), theirs.parameters(), resumed.parameters(),
                       strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
        assert torch.equal(a, c)


def test_accumulate_and_skip_nonfinite_under_uniopt_torch() -> None:
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    ours, theirs = _model(torch), _model(torch)
    opt = ut.Optimizer(ours.parameters(),
                       uo.skip_nonfinite(uo.accumulate(uo.adam(lr=1e-2), every=4)))
    ref = torch.optim.Adam(theirs.parameters(), lr=1e-2)
    kept = 0
    for step in range(40):
        opt.zero_grad()
        _loss(torch, ours, step).backward()
        if step == 13:
            next(ours.parameters()).grad[0, 0] = float("nan")
        opt.step()
        if step == 13:
            continue
        _loss(torch, theirs, step).div(4).backward()  # the mean of 4 micro-batches
        kept += 1
        if kept % 4 == 0:
            ref.step()
            ref.zero_grad()
    tree = opt.state["uniopt.group0"]["tree_states"]["skip_nonfinite"]
    assert tree["total_notfinite"] == 1
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _edit_group_state(sd: dict[str, Any], edit: Any) -> dict[str, Any]:
    import copy
    sd = copy.deepcopy(sd)
    edit(sd["state"][0]["uniopt.group"])
    return sd


def _tensor(values: list[Any]) -> Any:
    return pytest.importorskip("torch").tensor(values)


def _member(entry: dict[str, Any]) -> dict[str, Any]:
    member: dict[str, Any] = entry["tree_states"]["partition"]["decay"]
    return member


GROUP_EDITS = {
    "member step 1.5": (lambda e: _member(e).update(step=1.5), ValueError,
                        r"partition.decay.step: 1.5 is not a whole number of steps >= 0"),
    "member step -3": (lambda e: _member(e).update(step=-3), ValueError,
                       r"partition.decay.step: -3 is not a whole number"),
    "group step 2.5": (lambda e: e.update(step=2.5), ValueError,
                       r"\]\.step: 2.5 is not a whole number"),
    # (a member keeps per-leaf counts once one of its leaves had no gradient)
    "member counts -3": (lambda e: _member(e).update(counts=_tensor([-3])), ValueError,
                         r"partition.decay.counts: \[-3\] are not whole numbers of steps >= 0"),
    "member counts 1.5": (lambda e: _member(e).update(counts=_tensor([1.5])), ValueError,
                          r"partition.decay.counts: \[1.5\] are not whole numbers of steps"),
    # (loaded, then refused by the next step, after the good state was replaced)
    "member counts of 3 leaves": (
        lambda e: _member(e).update(counts=_tensor([1, 1, 1])), ValueError,
        r"partition.decay.counts: \[1, 1, 1\] counts steps for 3 leaves, the state's params "
        r"are 1"),
    "slot of another shape": (
        lambda e: _member(e)["slots"]["scale_by_adam.exp_avg"].__setitem__(
            0, _member(e)["slots"]["scale_by_adam.exp_avg"][0].T.clone()), ValueError,
        r"exp_avg\[0\]: shape \(3, 4\), expected \(4, 3\)"),
    "no tree_states": (lambda e: e.pop("tree_states"), ValueError,
                       r"expected a state \(step, slots, tree_states\), got \['slots', 'step'\]"),
}


@pytest.mark.parametrize("edit", list(GROUP_EDITS))
def test_a_group_states_edits_are_refused_at_the_load(edit: str) -> None:
    """A group's one state (a partition's, under uniopt.torch.Optimizer) was not read at
    load_state_dict: a member's step of 1.5 loaded and stepped as step 1, a slot of another
    shape or a state without its parts replaced the good state and failed only at the next
    step. They are read at the load, which changes nothing where they do not fit."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    model = torch.nn.Linear(3, 4).double()
    rule = uo.partition({"decay": uo.adamw(lr=1e-2, weight_decay=0.1), "plain": uo.sgd(lr=0.1)},
                        lambda path, leaf: "decay" if leaf.ndim == 2 else "plain")
    opt = ut.Optimizer(model.parameters(), rule)
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(2, 3, dtype=torch.float64)).square().sum().backward()
        opt.step()
    import copy
    sd = copy.deepcopy(opt.state_dict())  # (a state dict shares the optimizer's tensors)
    before = [p.detach().clone() for p in model.parameters()]
    change, kind, message = GROUP_EDITS[edit]
    with pytest.raises(kind, match=message + r".*; nothing was loaded"):
        opt.load_state_dict(_edit_group_state(sd, change))
    assert_same(jax.tree.leaves(optree.tree_map(np.asarray, opt.state_dict()["state"])),
                jax.tree.leaves(optree.tree_map(np.asarray, sd["state"])))
    opt.step()  # the state it had: the step of the run that never met the file
    opt.load_state_dict(copy.deepcopy(sd))
    redo = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, b in zip(model.parameters(), before, strict=True):
            p.copy_(b)
    opt.step()
    for p, r in zip(model.parameters(), redo, strict=True):
        assert torch.equal(p, r)


def test_accumulate_and_skip_nonfinite_as_optax_members() -> None:
    rng = np.random.default_rng(12)
    params = _params(rng)
    grads = _poisoned(rng, params, 30, {5})
    want = _run_optax(lambda: optax.chain(optax.clip(1.0), optax.apply_if_finite(
        optax.MultiSteps(optax.adam(1e-2), 3, accumulator_dtype=jnp.float64), 10)),
        params, grads)
    got = _run_optax(optax.chain(optax.clip(1.0),
                                 uo.skip_nonfinite(uo.accumulate(uo.adam(lr=1e-2), 3))),
                     params, grads)
    _close(got[-1], want[-1])


@pytest.mark.parametrize("wrap", ["partition", "accumulate"])
def test_members_keep_their_slots_in_the_state_dtype(wrap: str) -> None:
    """float16 params, float32 slots: the members are set up as the rule would be."""
    params = {"w": np.ones(3, np.float16), "b": np.ones(2, np.float16)}
    rule = uo.adam(lr=0.1)
    outer = (uo.partition({"a": rule, "b": rule}, uo.by_path({"w": "a", "*": "b"}))
             if wrap == "partition" else uo.accumulate(rule, 1))
    plain, wrapped = copy_tree(params), copy_tree(params)
    s_plain = uo.setup(rule, plain, state_dtype="float32")
    s_wrapped = uo.setup(outer, wrapped, state_dtype="float32")
    g = {"w": np.full(3, 0.3, np.float16), "b": np.full(2, -0.7, np.float16)}
    for _ in range(3):
        s_plain = uo.update_(s_plain, plain, g)
        s_wrapped = uo.update_(s_wrapped, wrapped, g)
    assert_same(jax.tree.leaves(plain), jax.tree.leaves(wrapped))
    slots = jax.tree.leaves(uo.state.to_tree(s_wrapped)["tree_states"])
    assert {str(x.dtype) for x in slots if hasattr(x, "dtype")} == {"float32"}


@pytest.mark.parametrize("chained", [False, True], ids=["alone", "in_a_chain"])
def test_a_float32_accumulator_for_float64_params_stays_float32(chained: bool,
                                                                 tmp_path: Any) -> None:
    """state_dtype="float32" on float64 params: the accumulator set up in float32 stays so at
    every step, pure as in place (the pure step's state is the in-place one's, bit for bit),
    and a checkpoint loads into a state set up afresh."""
    acc = uo.accumulate(uo.sgd(lr=0.5, momentum=0.9), 3)
    rule = uo.chain(uo.clip(1.0), acc) if chained else acc
    rng = np.random.default_rng(0)
    pure, written = {"w": rng.standard_normal(5)}, {"w": np.zeros(5)}
    written["w"][:] = pure["w"]
    s_pure = uo.setup(rule, pure, state_dtype="float32")
    s_written = uo.setup(rule, written, state_dtype="float32")
    for _ in range(4):
        g = {"w": rng.standard_normal(5)}
        s_pure, pure = uo.update(s_pure, pure, g)
        s_written = uo.update_(s_written, written, g)
        (tree,), (tree_written,) = s_pure.tree_states.values(), s_written.tree_states.values()
        assert tree["acc"][0].dtype == np.float32 and tree["mini"] == tree_written["mini"]
        assert_same(_arrays(s_pure), _arrays(s_written))
    assert_same([pure["w"]], [written["w"]])
    uo.save(tmp_path / "acc.safetensors", s_pure, params=pure)
    back = uo.load(tmp_path / "acc.safetensors", like=(rule, {"w": np.zeros(5)}))
    assert_same(_arrays(back), _arrays(s_pure))


def _arrays(state: uo.State) -> list[Any]:
    return [x for x in jax.tree.leaves(uo.state.to_tree(state)) if hasattr(x, "dtype")]


def test_adjust_reaches_a_label_inside_wrappers_and_chains() -> None:
    rule = uo.skip_nonfinite(uo.accumulate(uo.chain(_uniopt_rule(), uo.ema(0.99)), 2))
    state = uo.adjust(uo.setup(rule, _params(np.random.default_rng(0))), **{"embed.lr": 5e-5})
    inner = state.rule.rule.rule.transforms[0]
    assert inner.inner["embed"].lr == 5e-5 and inner.inner["decay"].lr == 1e-2
    with pytest.raises(ValueError, match=r"'nothing.lr' is not a hyperparameter"):
        uo.adjust(state, **{"nothing.lr": 1.0})
    # inside masked, whose other member (the leaves passed through) is an empty chain: that
    # chain said a chain's member is named by its position
    masked = uo.masked(_uniopt_rule(), lambda path, leaf: True)
    state = uo.adjust(uo.setup(masked, _params(np.random.default_rng(0))), **{"embed.lr": 5e-5})
    assert state.rule.rule.inner["embed"].lr == 5e-5


def test_a_namedtuples_fields_are_named_in_paths_as_a_dataclasses_are() -> None:
    """Masks and labels see a namedtuple's fields by their names, as a registered dataclass's
    (``"*.bias"`` froze a dataclass's bias and trained the namedtuple's, whose path was
    ``layer.1``); a frozen pattern that matches no leaf is a typo, refused at set-up."""
    NT = collections.namedtuple("NT", "w bias")

    @uo.register_dataclass
    @dataclasses.dataclass
    class DC:
        w: Any
        bias: Any

    for layer in (NT(np.ones(2), np.ones(1)), DC(np.ones(2), np.ones(1))):
        params = {"layer": layer, "out": [np.ones(1)]}
        seen: list[str] = []
        rule = uo.freeze(uo.sgd(lr=0.1), "*.bias")
        state = uo.setup(uo.masked(rule, lambda path, x, seen=seen: seen.append(path) or True),
                         params)
        state, new = uo.update(state, params, {"layer": type(layer)(np.ones(2), np.ones(1)),
                                               "out": [np.ones(1)]})
        assert seen[:3] == ["layer.w", "layer.bias", "out.0"]
        np.testing.assert_array_equal(new["layer"].bias, [1.0])
        np.testing.assert_array_equal(new["layer"].w, [0.9, 0.9])
        with pytest.raises(ValueError, match=r"freeze: '\*\.biass' matches no leaf of these "
                                             r"params \(their paths: layer\.w, layer\.bias, "
                                             r"out\.0\)"):
            uo.setup(uo.freeze(uo.sgd(lr=0.1), ["*.w", "*.biass"]), params)


@pytest.mark.parametrize("compiled", [False, True], ids=["reference", "compiled"])
@pytest.mark.parametrize("make", [lambda: uo.accumulate(uo.sgd(lr=0.1), every=2),
                                  lambda: uo.mechanize(uo.sgd(lr=0.1)),
                                  lambda: uo.sm3(lr=0.1, momentum=0.9)],
                         ids=["accumulate", "mechanize", "sm3"])
def test_a_0d_leaf_stays_an_array_through_save_load_and_update_(
        make: Any, compiled: bool, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """NumPy's arithmetic on a 0-d leaf gives scalars: a pure step handed them back in the
    accumulator, mechanize's params and SM3's momentum; the checkpoint then refused to load
    and ``update_`` wrote the params before failing on the scalar."""
    from uniopt.fast import cpu

    if compiled:
        monkeypatch.setattr(cpu, "MIN_LEAVES", 0)
        monkeypatch.setattr(cpu, "MIN_SIZE", 0)
    params = {"w": np.zeros(2), "s": np.array(1.0)}
    grads = {"w": np.ones(2), "s": np.array(0.5)}
    state = uo.setup(make(), params)
    state, params = uo.update(state, params, grads)
    leaves = optree.tree_leaves((state.slots, state.tree_states, params), namespace="uniopt")
    assert not any(isinstance(x, np.generic) for x in leaves)
    uo.save(tmp_path / "ck", state, params=params)
    loaded, loaded_params = uo.load(tmp_path / "ck", like=(make(), params), params=True)
    state = uo.update_(state, params, grads)
    loaded = uo.update_(loaded, loaded_params, grads)
    for k in params:
        np.testing.assert_array_equal(params[k], loaded_params[k])


def test_a_label_function_that_reads_dtypes_routes_each_tree_by_its_own() -> None:
    """One rule set up for two trees of the same shapes and other dtypes: each is routed by its
    own labels (the routes were kept by structure and shapes alone: the second tree was
    routed as the first)."""
    rule = uo.partition({"train": uo.sgd(lr=0.5), "frozen": None},
                        lambda path, leaf: "frozen" if leaf.dtype == np.float16 else "train")
    for w, v in ((np.float32, np.float16), (np.float16, np.float32)):
        p = {"w": np.ones(2, w), "v": np.ones(2, v)}
        _, out = uo.update(uo.setup(rule, p), p, {k: np.ones(2, x.dtype) for k, x in p.items()})
        for k, x in out.items():
            assert x.tolist() == ([1.0] * 2 if x.dtype == np.float16 else [0.5] * 2), (k, x)


@pytest.mark.parametrize("member", ["accumulate", "mechanize", "skip_nonfinite"])
def test_a_none_gradient_a_member_refuses_fails_the_step_before_any_member_writes(
        member: str) -> None:
    """A partition's member that steps every leaf together refuses a None gradient; in place,
    the member before it had stepped by then (a retry stepped it twice), or skip_nonfinite's
    check raised a raw TypeError."""
    inner = {"accumulate": uo.accumulate(uo.sgd(lr=0.1), 1),
             "mechanize": uo.mechanize(uo.sgd(lr=0.1)),
             "skip_nonfinite": uo.skip_nonfinite(uo.sgd(lr=0.1))}[member]
    rule = uo.partition({"a": uo.adam(lr=0.1), "b": inner}, {"w": "a", "v": "b"})
    p = {"w": np.ones(3), "v": np.ones(2)}
    state = uo.setup(rule, p)
    leaves = optree.tree_leaves(state, namespace="uniopt")
    before_state, before_p = [np.array(x, copy=True) for x in leaves], copy_tree(p)
    with pytest.raises(ValueError, match=rf"^{member}: the gradient of params\['v'\] is None; it "
                                         r"steps every leaf together\. "):
        uo.update_(state, p, {"w": np.full(3, 0.5), "v": None})
    assert_same([np.asarray(x) for x in leaves], before_state)
    assert_same(list(p.values()), list(before_p.values()))


@pytest.mark.parametrize("member", ["accumulate", "clip-chain"])
def test_a_member_no_leaf_is_labelled_for_steps_under_jit(member: str) -> None:
    """A label no leaf carries (a recipe's member for layers this model lacks), as optax's
    multi_transform allows: under ``jax.jit`` its empty step met traced numbers in host
    branches (TracerBoolConversionError). Its count moves; the params are the eager run's, to
    float32 rounding."""
    jax = pytest.importorskip("jax")
    unused = {"accumulate": uo.accumulate(uo.adamw(lr=0.1), 2),
              "clip-chain": uo.chain(uo.clip_by_global_norm(1.0), uo.adamw(lr=0.1))}[member]
    rule = uo.partition({"used": uo.adam(lr=0.1), "unused": unused}, lambda path, x: "used")
    p = {"w": jax.numpy.ones(2), "b": jax.numpy.ones(3)}
    g = {"w": jax.numpy.ones(2), "b": jax.numpy.full(3, 0.5)}
    ends = []
    for step in (uo.update, jax.jit(uo.update)):
        state, q = uo.setup(rule, p), p
        for _ in range(2):
            state, q = step(state, q, g)
        assert int(state.tree_states["partition"]["unused"].step) == 2
        ends.append(q)
    for k in p:  # (float32: XLA's fused arithmetic against eager JAX's, to rounding)
        np.testing.assert_allclose(np.asarray(ends[0][k]), np.asarray(ends[1][k]), rtol=1e-6)


def test_masks_and_labels_as_trees_of_jax_node_types() -> None:
    """A mask or labels tree of flax's FrozenDict or of an equinox Module (as ``optax.masked``
    takes them, from ``jax.tree.map`` over the params): a tree, not a function (a Module is
    callable: it was called with (path, leaf)), and whatever was set up before (a FrozenDict
    mask was refused until some set-up had met one)."""
    eqx = pytest.importorskip("equinox")
    jax = pytest.importorskip("jax")
    from flax.core import freeze as frozen

    model = eqx.filter(eqx.nn.MLP(3, 1, 4, 1, key=jax.random.PRNGKey(0)), eqx.is_array)
    params = {"frozen": frozen({"kernel": jax.numpy.ones((3, 2)), "bias": jax.numpy.ones(2)}),
              "module": model}
    mask = jax.tree.map(lambda x: x.ndim == 2, params)
    labels = jax.tree.map(lambda x: "matrix" if x.ndim == 2 else "vector", params)
    grads = jax.tree.map(jax.numpy.ones_like, params)
    # (masked, as optax's, hands the other leaves' gradients through: p - g)
    for rule, other in ((uo.masked(uo.sgd(lr=0.5), mask), 1.0),
                        (uo.partition({"matrix": uo.sgd(lr=0.5), "vector": None}, labels), 0.0)):
        _, out = uo.update(uo.setup(rule, params), params, grads)
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(out), strict=True):
            np.testing.assert_array_equal(np.asarray(y),
                                          np.asarray(x) - (0.5 if x.ndim == 2 else other))


def test_adjust_says_a_combinators_own_number_is_set_when_it_is_built() -> None:
    """A combinator's own number (accumulate's every, Mechanic's weight_decay) is set when it
    is built: adjust of it said "not a hyperparameter"; it now says whose it is. A name its
    rule (or a sibling) also has is theirs, as it was: uniopt.torch.Optimizer adjusts a
    Mechanic's rule so. Mechanic's numbers refuse a schedule with a TypeError (it was
    "must be a number >= 0")."""
    params = {"w": np.array([1.0, -2.0])}
    with pytest.raises(ValueError, match=r"'every' of accumulate is its own, set when it is "
                                         r"built"):
        uo.adjust(uo.setup(uo.accumulate(uo.sgd(lr=0.1), every=2), params), every=3)
    with pytest.raises(ValueError, match=r"'every' of accumulate is its own"):  # by position
        uo.adjust(uo.setup(uo.chain(uo.accumulate(uo.sgd(lr=0.1), every=2),
                                    uo.clip_by_global_norm(1.0)), params), **{"0.every": 3})
    beside = uo.adjust(uo.setup(uo.chain(uo.mechanize(uo.sgd(lr=0.1)), uo.scale_by_adam()),
                                params), eps=1e-6)  # Mechanic's own eps is not the sibling's
    assert beside.rule.transforms[1].eps == 1e-6 and beside.rule.transforms[0].eps == 1e-8
    state = uo.setup(uo.mechanize(uo.sgd(lr=0.1), weight_decay=0.01), params)
    new = uo.adjust(state, weight_decay=0.5)  # the rule's (docs: Mechanic's is fixed)
    assert new.rule.weight_decay == 0.01 and new.rule.rule.weight_decay == 0.5
    for name in ("weight_decay", "eps", "s_init"):
        with pytest.raises(TypeError, match=rf"mechanize: {name} is a number fixed when it is "
                                            "built; it takes no schedule"):
            uo.mechanize(uo.sgd(lr=0.1), **{name: lambda s: 0.01})
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = ut.Optimizer([w], uo.mechanize(uo.adam(lr=1e-3)))  # (raised in a first version)
    ref = [np.ones(3)]
    ref_state = uo.setup(uo.mechanize(uo.adam(lr=1e-3)), ref)
    for g in (1.0, -0.5):
        w.grad = torch.full((3,), g, dtype=torch.float64)
        opt.step()
        ref_state = uo.update_(ref_state, ref, [np.full(3, g)])
    np.testing.assert_allclose(w.detach().numpy(), ref[0], rtol=1e-14)
    assert not np.array_equal(ref[0], np.ones(3))



NESTED = {  # (uniopt, optax) combinators nested, each inner tree shaped like the whole params
    "partition-in-masked": (
        lambda o, i: uo.masked(uo.partition({"x": uo.trace(0.5), "y": uo.scale(3.0)}, i), o),
        lambda o, i: optax.masked(optax.multi_transform(
            {"x": optax.trace(0.5), "y": optax.scale(3.0)}, i), o)),
    "masked-in-masked": (
        lambda o, i: uo.masked(uo.masked(uo.trace(0.5), {k: v == "x" for k, v in i.items()}), o),
        lambda o, i: optax.masked(optax.masked(optax.trace(0.5),
                                               {k: v == "x" for k, v in i.items()}), o)),
    "masked-in-partition": (
        lambda o, i: uo.partition({"on": uo.masked(uo.trace(0.5), {k: v == "x" for k, v in
                                                                   i.items()}),
                                   "off": uo.scale(2.0)}, {k: "on" if v else "off"
                                                           for k, v in o.items()}),
        lambda o, i: optax.multi_transform(
            {"on": optax.masked(optax.trace(0.5), {k: v == "x" for k, v in i.items()}),
             "off": optax.scale(2.0)}, {k: "on" if v else "off" for k, v in o.items()})),
}


@pytest.mark.parametrize("library", ["numpy", "jax-jit"])
@pytest.mark.parametrize("name", list(NESTED))
def test_a_nested_combinators_tree_may_be_shaped_like_the_whole_params(name: str,
                                                                       library: str) -> None:
    """The outer combinator leaves some leaves out of what its member sees; a mask or labels
    tree inside, shaped like the whole params, reads its values at the leaves it gets, as in
    optax. Ten steps against optax's same nesting, in float64."""
    ours, theirs = NESTED[name]
    outer = {"a": True, "b": True, "c": False}
    inner = {"a": "x", "b": "y", "c": "x"}
    rng = np.random.default_rng(0)
    p = {k: rng.normal(size=n) for k, n in (("a", 3), ("b", 2), ("c", 1))}
    grads = [{k: rng.normal(size=v.shape) for k, v in p.items()} for _ in range(10)]
    with jax.enable_x64(True):
        rule = uo.chain(ours(outer, inner), uo.scale_by_lr(0.1))
        ref = optax.chain(theirs(outer, inner), optax.scale_by_learning_rate(0.1))
        q = jax.tree.map(jnp.asarray, p)
        if library == "jax-jit":
            p = q
        state, t = uo.setup(rule, p), ref.init(q)
        step = jax.jit(uo.update) if library == "jax-jit" else uo.update
        for g in grads:
            state, p = step(state, p, g)
            u, t = ref.update(jax.tree.map(jnp.asarray, g), t, q)
            q = optax.apply_updates(q, u)
        for k in p:
            np.testing.assert_allclose(np.asarray(p[k]), np.asarray(q[k]), rtol=1e-12, atol=0)


def test_a_nested_tree_of_another_shape_is_still_refused() -> None:
    p = {"a": np.ones(3), "b": np.ones(2), "c": np.ones(1)}
    rule = uo.masked(uo.masked(uo.trace(0.5), {"a": True, "b": False}),
                     {"a": True, "b": True, "c": False})
    with pytest.raises(ValueError, match=r"masked: the mask tree has structure"):
        uo.setup(rule, p)


def test_an_empty_list_of_globs_selects_no_leaf() -> None:
    p = {"a": np.ones(3), "b": np.ones(2)}
    g = {"a": np.full(3, 0.5), "b": np.full(2, 2.0)}
    state = uo.setup(uo.chain(uo.masked(uo.scale(3.0), []), uo.scale_by_lr(0.1)), p)
    _, new = uo.update(state, p, g)
    np.testing.assert_array_equal(new["a"], p["a"] - 0.05)
    np.testing.assert_array_equal(new["b"], p["b"] - 0.2)


@pytest.mark.parametrize("make", [
    lambda fn: uo.partition({"a": uo.sgd(lr=0.1), "b": uo.adam()}, fn),
    lambda fn: uo.masked(uo.adam(), fn)], ids=["partition", "masked"])
def test_an_optax_style_label_function_is_named_with_what_to_write(make: Any) -> None:
    """optax's label and mask functions take the whole params tree; given one, the bare
    "takes 1 positional argument but 2 were given" named neither the combinator nor what it
    calls (a sweep's finding). A TypeError says both; a function of (path, leaf) that raises
    a TypeError of its own raises it as it is."""
    params = {"w": np.ones((2, 2)), "b": np.ones(2)}
    with pytest.raises(TypeError, match=r"^(partition|masked): a (labels|mask) function is "
                                        r"called as fn\(path, leaf\) for each leaf; "
                                        r"'<lambda>' takes one argument"):
        uo.setup(make(lambda params: params), params)

    def broken(path: Any, leaf: Any) -> Any:
        raise TypeError("my own")

    with pytest.raises(TypeError, match="^my own$"):
        uo.setup(make(broken), params)


def test_reprs_are_calls_that_make_the_rule_and_stay_short() -> None:
    # chain printed as chain(transforms=(...)), partition as partition(rules=..., names=...),
    # by_path as by_path(table=...), a mask tree as _TreeSpec(treedef=PyTreeSpec(...)): none of
    # them a call; and a masked rule over 4,000 leaves printed every one (a state: 80K chars)
    names = {n: getattr(uo, n) for n in uo.__all__}
    for rule in (uo.chain(uo.clip_by_global_norm(1.0), uo.adam()),
                 uo.partition({"a": uo.adam(), "b": uo.sgd()}, uo.by_path({"*.w": "a", "*": "b"})),
                 uo.partition({"a": uo.adam(), "b": None}, {"w": "a", "b": "b"}),
                 uo.masked(uo.weight_decay(1e-2), {"w": True, "b": False}),
                 uo.lookahead(uo.sgd(lr=0.1), k=3)):
        assert eval(repr(rule), names) == rule, repr(rule)
    big = {f"l{i}": {"w": np.ones(2), "b": np.ones(2)} for i in range(2000)}
    mask = {k: {"w": True, "b": False} for k in big}
    state = uo.setup(uo.chain(uo.masked(uo.weight_decay(1e-2), mask), uo.adam()), big)
    assert "<a tree of 4000 leaves: False 2000, True 2000>" in repr(state)
    assert len(repr(state)) < 1000


_WIDENED = [
    (lambda: uo.chain(uo.masked(uo.adam(lr=1e-2), ["*"]), uo.ema(0.9)),
     lambda: uo.chain(uo.adam(lr=1e-2), uo.ema(0.9))),
    (lambda: uo.chain(uo.partition({"a": uo.sgd(lr=1e-2, momentum=0.9)}, lambda p, x: "a"),
                      uo.kahan_summation()),
     lambda: uo.chain(uo.sgd(lr=1e-2, momentum=0.9), uo.kahan_summation())),
    (lambda: uo.chain(uo.clip_by_global_norm(1.0),
                      uo.partition({"a": uo.adamw(lr=1e-2)}, lambda p, x: "a")),
     lambda: uo.chain(uo.clip_by_global_norm(1.0), uo.adamw(lr=1e-2))),
]


@pytest.mark.parametrize("lib", ["numpy", "jax", "torch"])
@pytest.mark.parametrize("pair", range(len(_WIDENED)), ids=["masked-ema", "partition-kahan",
                                                            "clip-partition"])
def test_a_combinator_after_other_parts_reads_its_16_bit_slots_widened(
        lib: str, pair: int) -> None:
    """On bfloat16 params a chain widens them to float32 before its combinator, whose member
    then read its bfloat16 slots as they were, beside float32 updates: an extra bfloat16
    rounding of the moments (NumPy, JAX: 109 of 2000 elements an ulp off after 6 steps), and
    torch's lerp refused the mix (the recipe of no decay on biases with Kahan summation).
    The member reads them widened, as alone: the same bits as the chain without the
    combinator."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((50, 40))
    gs = [rng.standard_normal((50, 40)) for _ in range(6)]
    if lib == "torch":
        torch = pytest.importorskip("torch")
        conv = lambda x: torch.tensor(x).bfloat16()  # noqa: E731
        back = lambda x: x.float().numpy()  # noqa: E731
    else:
        conv = ((lambda x: x.astype(ml_dtypes.bfloat16)) if lib == "numpy"  # noqa: E731
                else (lambda x: jnp.asarray(x, jnp.bfloat16)))
        back = lambda x: np.asarray(x, np.float32)  # noqa: E731
    ends = []
    for make in _WIDENED[pair]:
        p = [conv(w)]
        state = uo.setup(make(), p)
        for g in gs:
            state, p = uo.update(state, p, [conv(g)])
        ends.append(back(p[0]))
    np.testing.assert_array_equal(ends[0], ends[1])


@pytest.mark.parametrize("make", [
    lambda: uo.chain(uo.clip_by_global_norm(1.0), uo.masked(uo.weight_decay(1e-2), "w"),
                     uo.adam(lr=0.1)),
    lambda: uo.accumulate(uo.adamw(lr=0.1, weight_decay=0.1), 2),
    lambda: uo.skip_nonfinite(uo.adamw(lr=0.1, weight_decay=0.1)),
], ids=["clip-masked-adam", "accumulate", "skip_nonfinite"])
def test_a_none_gradient_where_every_leaf_steps_together_says_to_freeze_it(make: Any) -> None:
    """A leaf without a gradient (a frozen layer) where a part steps every leaf at once is
    refused; the message said to pass zeros, which moves the leaf (Adam's moments decay, the
    weight decay applies). It names uo.freeze, which passes the leaf by: the other leaves
    step as the rule on them alone."""
    p = {"w": np.ones(3), "b": np.ones(2)}
    with pytest.raises(ValueError, match=r"gradient .*None.*A zero gradient would not leave it "
                                         r"still.*uo.freeze\(rule, paths\)"):
        uo.update(uo.setup(make(), p), p, {"w": np.full(3, 0.5), "b": None})
    frozen, alone = dict(p), {"w": np.ones(3)}
    s, t = uo.setup(uo.freeze(make(), "b"), frozen), uo.setup(make(), alone)
    for _ in range(4):
        s, frozen = uo.update(s, frozen, {"w": np.full(3, 0.5), "b": None})
        t, alone = uo.update(t, alone, {"w": np.full(3, 0.5)})
    assert_same([frozen["w"], frozen["b"]], [alone["w"], np.ones(2)])


@pytest.mark.parametrize(("make", "whole"), [
    (lambda r: uo.masked(r, ["a"]), False),
    (lambda r: uo.freeze(r, ["b"]), False),
    (lambda r: uo.partition({"x": r, "y": uo.sgd(0.1)},
                            lambda path, leaf: "x" if path == "a" else "y"), False),
    (lambda r: uo.partition({"x": uo.chain(uo.clip_by_global_norm(1.0), r)},
                            lambda path, leaf: "x"), True),
    (lambda r: uo.masked(r, ["a", "b"]), True),
], ids=["masked", "freeze", "partition", "partition-every-leaf", "masked-every-leaf"])
def test_a_line_search_is_refused_as_a_member_handed_some_leaves(make: Any, whole: bool) -> None:
    """A line search evaluates the objective over every leaf: inside a combinator that hands
    it some of them it was given the whole tree's grad= ('grad must be a tree like params...')
    and, given only its own leaves', called value_fn with None for the others, where the
    user's objective failed. Refused at set-up, saying why; a member handed every leaf steps
    as the rule alone does."""
    params = {"a": np.array([1.0, -2.0]), "b": np.array([0.5, 3.0])}

    def value_fn(p: Any) -> Any:
        return sum(float(np.sum(v ** 2)) for v in p.values()), {k: 2 * v for k, v in p.items()}

    rule = make(uo.lbfgs_linesearch())
    if not whole:
        with pytest.raises(ValueError, match=r"^\w+: lbfgs_linesearch's scale_by_zoom_linesearch "
                                             r"evaluates the objective over every leaf "
                                             r"\(value_fn at trial params, grad= of the whole "
                                             r"tree\), and a member of \w+ steps only its own"):
            uo.setup(rule, params)
        return
    grads = {k: 2 * v for k, v in params.items()}
    ours, alone = uo.setup(rule, params), uo.setup(uo.lbfgs_linesearch(), params)
    (ours, p1), (alone, p2) = (uo.update(s, params, grads, value=value_fn(params)[0],
                                         grad=grads, value_fn=value_fn) for s in (ours, alone))
    for k in params:
        np.testing.assert_array_equal(p1[k], p2[k])
        assert not np.array_equal(p1[k], params[k])
