"""A leaf whose gradient is None stays where it is, with its slots and its step count, as
torch's optimizers and Optimisers.jl leave it: against torch.optim on every backend."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from helpers import (
    WIDE_LEAVES,
    assert_same,
    copy_tree,
    counting_jit,
    expect_compiled,
    reference_path,
)

torch = pytest.importorskip("torch")

STEPS = 100
NONE_AT = {"b": {1, 3, 4, 50, 51}, "c": set(range(20, 60))}


def _setup() -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=3), "b": rng.normal(size=(2, 2)), "c": rng.normal(size=5)}
    grads = []
    for i in range(STEPS):
        grads.append({k: None if i in NONE_AT.get(k, ()) else rng.normal(size=v.shape)
                      for k, v in params.items()})
    return params, grads


CASES = {
    "adam": (uo.adam(lr=0.1, amsgrad=True), lambda ps: torch.optim.Adam(ps, lr=0.1, amsgrad=True)),
    "sgd": (uo.sgd(lr=0.1, momentum=0.9, nesterov=True),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)),
    "radam": (uo.radam(lr=0.1), lambda ps: torch.optim.RAdam(ps, lr=0.1)),
}


def _torch_run(make: Any, params: dict[str, np.ndarray], grads: list[dict[str, Any]]) -> Any:
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt = make(list(tp.values()))
    for g in grads:
        for k, t in tp.items():
            t.grad = None if g[k] is None else torch.tensor(g[k])
        opt.step()
    return {k: t.detach().numpy() for k, t in tp.items()}


@functools.cache
def _want(name: str) -> dict[str, np.ndarray]:
    params, grads = _setup()
    return _torch_run(CASES[name][1], params, grads)


# every rule on NumPy; the other libraries run the same engine code on their arrays
@pytest.mark.parametrize("name, library", [
    *((name, "numpy") for name in sorted(CASES)), ("adam", "torch"), ("sgd", "torch"),
    ("adam", "jax")])
def test_none_gradients_match_torch(name: str, library: str) -> None:
    rule = CASES[name][0]
    params, grads = _setup()
    want = _want(name)
    if library == "numpy":
        p, pi = copy_tree(params), copy_tree(params)
        state, state_i = uo.setup(rule, p), uo.setup(rule, pi)
        for g in grads:
            state, p = uo.update(state, p, g)
            state_i = uo.update_(state_i, pi, g)
        assert_same(list(p.values()), list(pi.values()))
    elif library == "torch":
        p = {k: torch.tensor(v) for k, v in params.items()}
        state = uo.setup(rule, p)
        for g in grads:
            state = uo.update_(state, p, {k: None if v is None else torch.tensor(v)
                                          for k, v in g.items()})
        p = {k: t.numpy() for k, t in p.items()}
    else:
        jax = pytest.importorskip("jax")
        with jax.enable_x64(True):
            p = {k: jax.numpy.asarray(v) for k, v in params.items()}
            state = uo.setup(rule, p)
            step, traces = counting_jit()
            for g in grads:
                state, p = step(state, p, {k: None if v is None else jax.numpy.asarray(v)
                                           for k, v in g.items()})
            # one trace per pattern of None gradients, and one more when the counts first
            # part (the state then carries them)
            assert len(traces) <= 6
    for k in want:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=0, atol=1e-12)
    assert state.step == STEPS
    assert [int(c) for c in state.counts] == [STEPS - len(NONE_AT.get(k, ())) for k in "abc"]


def test_a_leaf_without_gradient_keeps_its_slots_bit_for_bit() -> None:
    params, grads = _setup()
    state = uo.setup(uo.adam(lr=0.1), params)
    state, params = uo.update(state, params, grads[0])
    before = [np.copy(s[1]) for s in state.slots.values()]
    p_before = np.copy(params["b"])
    state, params = uo.update(state, params, grads[1])  # b's is None
    assert_same([s[1] for s in state.slots.values()], before)
    assert_same([params["b"]], [p_before])


def test_a_flat_gradient_list_may_hold_none() -> None:
    params, grads = _setup()
    tree_state, flat_state = uo.setup(uo.adam(lr=0.1), params), uo.setup(uo.adam(lr=0.1), params)
    p_tree, p_flat = copy_tree(params), copy_tree(params)
    for g in grads[:10]:
        tree_state = uo.update_(tree_state, p_tree, g)
        flat_state = uo.update_(flat_state, p_flat, [g[k] for k in sorted(g)])
    assert_same(list(p_tree.values()), list(p_flat.values()))


def test_per_leaf_counts_of_another_length_are_refused_before_anything_moves() -> None:
    """A state whose step counts (one per leaf, kept once a gradient was None) are of other
    params (a state edited or restored by hand) stepped each leaf at the count of another."""
    params, grads = _setup()
    state, params = uo.update(uo.setup(uo.adam(lr=0.1), params), params, grads[1])
    assert state.counts.tolist() == [1, 0, 1]
    bad = dataclasses.replace(state, counts=np.array([1, 0, 7, 2]))
    before = copy_tree(params)
    message = (r"^this state counts steps for 4 leaves, the params have 3: it was set up "
               r"for other params$")
    with pytest.raises(ValueError, match=message):
        uo.update(bad, params, grads[2])
    with pytest.raises(ValueError, match=message):
        uo.update_(bad, params, grads[2])
    assert_same(list(params.values()), list(before.values()))
    assert bad.counts.tolist() == [1, 0, 7, 2]


def test_leaves_that_share_a_count_step_on_the_compiled_loop() -> None:
    """One engine call per count the moving leaves share: a wide tree with a frozen branch
    takes the compiled loop, bit for bit as the reference path."""
    rng = np.random.default_rng(1)
    params = [rng.normal(size=(3, 3)) for _ in range(2 * WIDE_LEAVES)]
    grads = [[None if (i < WIDE_LEAVES and s % 2) else rng.normal(size=(3, 3))
              for i in range(len(params))] for s in range(4)]
    fast, ref = copy_tree(params), copy_tree(params)
    s_fast, s_ref = uo.setup(uo.adamw(lr=0.1), fast), uo.setup(uo.adamw(lr=0.1), ref)
    # steps 0, 1, 3: one group moves (at 1 and 3 the frozen half stays); step 2: every leaf,
    # at two counts
    with expect_compiled(5):
        for g in grads:
            s_fast = uo.update_(s_fast, fast, g)
    with reference_path():
        for g in grads:
            s_ref = uo.update_(s_ref, ref, g)
    assert_same(fast, ref)
    assert [int(c) for c in s_fast.counts[::WIDE_LEAVES]] == [2, 4]


def test_none_gradients_reach_the_members_of_a_partition() -> None:
    params, grads = _setup()
    want = _torch_run(lambda ps: torch.optim.Adam(ps, lr=0.1), params, grads)
    rule = uo.partition({"x": uo.adam(lr=0.1), "y": uo.adam(lr=0.1)},
                        uo.by_path({"a": "x", "*": "y"}))
    state = uo.setup(rule, params)
    for g in grads:
        state = uo.update_(state, params, g)
    for k in want:
        np.testing.assert_allclose(params[k], want[k], rtol=0, atol=1e-12)


def test_a_scan_over_none_gradients_runs_as_docs_say() -> None:
    """The first step with a None gradient gives the state its per-leaf counts, a new carry
    structure that jax.lax.scan refuses; a state that carries them from set-up
    (docs/getting-started.md), or uo.freeze for a leaf still the whole run, scans as a loop
    of steps does."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    params = {"w": jnp.ones(3), "b": jnp.full(2, 0.5)}
    gs = {"w": jnp.arange(15.0).reshape(5, 3) / 10, "b": None}

    def body(carry: Any, g: Any) -> Any:
        return uo.update(*carry, g), None

    def loop(state: Any) -> Any:
        p = params
        for k in range(5):
            state, p = uo.update(state, p, {"w": gs["w"][k], "b": None})
        return state, p

    rule = uo.adamw(lr=1e-2, weight_decay=0.1)
    with pytest.raises(TypeError, match="carry"):  # (what the docs tell how to avoid)
        jax.lax.scan(body, (uo.setup(rule, params), params), gs)
    state = uo.setup(rule, params)
    state = dataclasses.replace(state, counts=jnp.zeros(len(uo.trainables(params)), jnp.int32))
    (got, p), _ = jax.lax.scan(body, (state, params), gs)
    want, q = loop(uo.setup(rule, params))
    assert got.counts.tolist() == want.counts.tolist() == [0, 5]
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), np.asarray(q[k]), rtol=1e-6)
    frozen = uo.freeze(rule, "b")
    (_, p), _ = jax.lax.scan(body, (uo.setup(frozen, params), params), gs)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), np.asarray(q[k]), rtol=1e-6)


def test_rules_that_step_every_leaf_together_refuse_a_none_gradient() -> None:
    params, grads = _setup()
    state = uo.setup(uo.accumulate(uo.adam(lr=0.1), 2), params)
    with pytest.raises(ValueError, match=r"accumulate: the gradient of params\['b'\] is None"):
        uo.update_(state, params, grads[1])
    optax = pytest.importorskip("optax")
    state = uo.setup(uo.chain(uo.from_optax(optax.scale(1.0)), uo.sgd(lr=0.1)), params)
    with pytest.raises(ValueError, match=r"a gradient is None, but whole-tree parts"):
        uo.update(state, params, grads[1])


@pytest.mark.parametrize("rule", [
    uo.adam(lr=lambda s: 0.1 if s < 2 else float("nan")),
    uo.chain(uo.clip_by_global_norm(1.0), uo.sgd(lr=lambda s: 0.1 if s < 2 else -1.0,
                                                 momentum=0.9)),
], ids=["adam", "clip-sgd"])
def test_a_schedule_invalid_at_one_leafs_count_fails_before_any_leaf_moves(rule: Any) -> None:
    """Leaves at counts 1 and 2 step in one call per count; a schedule invalid at count 2 is
    an error before the leaves at count 1 are written (they were, and their slots, while the
    state's counts said they had not moved)."""
    params = {"a": np.linspace(-1, 1, 12).reshape(3, 4), "b": np.linspace(0, 1, 5)}
    grads = {"a": np.full((3, 4), 0.3), "b": np.full(5, -0.2)}
    state = uo.update_(uo.setup(rule, params), params, grads)
    state = uo.update_(state, params, {"a": None, "b": grads["b"]})
    assert state.counts.tolist() == [1, 2]
    before = copy_tree(params), copy_tree(state.slots)
    with pytest.raises(ValueError, match=r"at step 2\)"):
        uo.update_(state, params, grads)
    assert_same(list(params.values()), list(before[0].values()))
    assert_same([x for v in state.slots.values() for x in v],
                [x for v in before[1].values() for x in v])
    assert state.counts.tolist() == [1, 2]


@pytest.mark.parametrize("library", ["numpy", "numpy-inplace", "numpy-compiled", "torch", "jax",
                                     "jax-jit"])
@pytest.mark.parametrize("scheduled", [False, True], ids=["number", "schedule"])
def test_a_global_norm_spans_every_leaf_that_steps(library: str, scheduled: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``clip_by_global_norm`` after Adam, leaves at different counts (one engine call per
    count, per leaf on JAX; a uniopt.torch group's runs): the norm is that of every leaf with
    a gradient, as torch's ``clip_grad_norm_`` skips None; each call had clipped by its own
    leaves' norm, for the rest of the run. A scheduled threshold is one for the whole norm, at
    the tree's count (each call had read it at its own leaves' count: a direction not kept).
    Against Adam per leaf at its own count, clipped by hand; 60 steps."""
    from uniopt import schedules
    from uniopt.fast import cpu

    params, grads = _setup()
    grads = grads[:60]
    lr = 0.1
    clip: Any = schedules.piecewise_constant(0.5, {3: 1e3, 20: 0.2}) if scheduled else 0.5
    rule = uo.chain(uo.scale_by_adam(), uo.clip_by_global_norm(clip), uo.scale(lr))
    # the reference: a state per leaf (its own count), the clip over the leaves that move
    want = copy_tree(params)
    alone = {k: uo.setup(uo.scale_by_adam(), [v]) for k, v in want.items()}
    for step, g in enumerate(grads):
        us = {}
        for k, v in g.items():
            if v is not None:
                alone[k], (us[k],) = uo.update(alone[k], [np.zeros_like(v)], [v])
        # (update of zeros params: their new values are -u)
        norm = np.sqrt(sum(np.sum(u**2) for u in us.values()))
        threshold = clip(step) if scheduled else clip
        scale = threshold / norm if norm > threshold else 1.0
        for k, u in us.items():
            want[k] = want[k] + lr * scale * u
    if library == "torch":
        import uniopt.torch as ut

        tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
        opt = ut.Optimizer(list(tp.values()), rule)
        for g in grads:
            for k, v in g.items():
                tp[k].grad = None if v is None else torch.tensor(v)
            opt.step()
        got = {k: v.detach().numpy() for k, v in tp.items()}
    elif library.startswith("numpy"):
        if library == "numpy-compiled":
            monkeypatch.setattr(cpu, "MIN_LEAVES", 0)
            monkeypatch.setattr(cpu, "MIN_SIZE", 0)
            monkeypatch.setattr(cpu, "COMPILE_AFTER", 0)
        got = copy_tree(params)
        state = uo.setup(rule, got)
        ran = cpu.STEPS
        for g in grads:
            if library != "numpy":
                state = uo.update_(state, got, g)
            else:
                state, got = uo.update(state, got, g)
        assert (cpu.STEPS > ran) == (library == "numpy-compiled")
    else:
        jax = pytest.importorskip("jax")
        jnp = jax.numpy
        with jax.enable_x64(True):
            got = {k: jnp.asarray(v) for k, v in params.items()}
            state = uo.setup(rule, got)
            step = jax.jit(uo.update) if library == "jax-jit" else uo.update
            for g in grads:
                state, got = step(state, got, {k: None if v is None else jnp.asarray(v)
                                               for k, v in g.items()})
            got = {k: np.asarray(v) for k, v in got.items()}
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("inplace", [False, True], ids=["pure", "in-place"])
def test_a_lone_group_reads_a_scheduled_threshold_at_the_trees_count(inplace: bool) -> None:
    """Where only leaves behind the tree's count step (one group, at a count of its own), a
    scheduled clip threshold is still the tree's, at ``state.step`` (it was the group's own
    count: the same gradient clipped to 1.0 or to 0.1 by whether another leaf moved); and only
    the norm's part is read there: an lr schedule invalid at ``state.step``, which no leaf
    steps at, is not checked there (with the clip, the step was refused)."""
    def step(state: Any, p: Any, g: Any) -> Any:
        if inplace:
            return uo.update_(state, p, g), p
        return uo.update(state, p, g)

    rule = uo.chain(uo.clip_by_global_norm(lambda s: 1.0 if s < 1 else 0.1), uo.sgd(lr=1.0))
    for others in (False, True):
        p = {"a": np.zeros(1), "b": np.zeros(1)}
        state, p = step(uo.setup(rule, p), p, {"a": np.array([10.0]), "b": None})
        state, p = step(state, p, {"a": np.array([10.0]) if others else None,
                                   "b": np.array([10.0])})
        moved = 0.1 / np.sqrt(2.0) if others else 0.1  # (the threshold at state.step, 1)
        np.testing.assert_allclose(-p["b"], [moved], rtol=1e-15)
    lr = lambda s: 0.1 if s < 2 else -1.0  # noqa: E731
    for clipped in (False, True):
        rule = uo.chain(uo.clip_by_global_norm(1.0), uo.sgd(lr=lr)) if clipped else uo.sgd(lr=lr)
        p = {"a": np.zeros(2), "b": np.zeros(2)}
        state = uo.setup(rule, p)
        for g in ({"a": np.ones(2), "b": None}, {"a": None, "b": None},
                  {"a": np.ones(2), "b": np.ones(2)}):
            state, p = step(state, p, g)
        assert state.counts.tolist() == [2, 1]
    # a threshold invalid there is refused in its own words (another record's, invalid there
    # too but not where its leaves step, was named), nothing written
    rule = uo.chain(uo.scale_by_lr(lr=lambda s: 1.0 if s < 2 else -1.0),
                    uo.clip_by_global_norm(lambda s: 1.0 if s < 2 else -1.0), uo.sgd(lr=0.1))
    p = {"a": np.zeros(2), "b": np.zeros(2)}
    state, p = step(uo.setup(rule, p), p, {"a": np.ones(2), "b": None})
    state, p = step(state, p, {"a": None, "b": None})
    before = copy_tree(p)
    with pytest.raises(ValueError, match=r"^chain: clip_by_global_norm: max_norm must be >= 0, "
                                         r"got -1.0 \(the value of its schedule at step 2\)"):
        step(state, p, {"a": np.ones(2), "b": np.ones(2)})
    assert_same(list(p.values()), list(before.values()))
    assert state.counts.tolist() == [1, 0]


def test_a_rules_own_range_holds_for_its_threshold_at_the_trees_count() -> None:
    """A rule whose field feeds a global-norm part may hold it to a narrower range than the
    part's: at the tree's count that range holds too (clip 0 ran, every update 0, where leaves
    behind the tree's count stepped; refused where every leaf was at it)."""
    from uniopt.base import Rule
    from uniopt.hyper import POSITIVE, hyper

    @dataclasses.dataclass(frozen=True)
    class clipped_sgd(Rule):
        lr: Any = hyper(0.1, POSITIVE)
        clip: Any = hyper(1.0, POSITIVE)

        def parts(self) -> tuple[Any, ...]:
            return uo.clip_by_global_norm(max_norm=self.clip), uo.scale_by_lr(lr=self.lr)

    for grads in ([{"a": np.ones(2), "b": np.ones(2)}] * 3,
                  [{"a": np.ones(2), "b": None}, {"a": None, "b": None},
                   {"a": np.ones(2), "b": np.ones(2)}]):
        p = {"a": np.zeros(2), "b": np.zeros(2)}
        state = uo.setup(clipped_sgd(clip=lambda s: 1.0 if s < 2 else 0.0), p)
        with pytest.raises(ValueError, match=r"^clipped_sgd: clip must be > 0, got 0.0 \(the "
                                             r"value of its schedule at step 2\)"):
            for g in grads:
                state, p = uo.update(state, p, g)


def test_two_global_norms_in_a_chain_span_every_leaf_that_steps() -> None:
    """Each global-norm part reads the norm of every group's updates as they reach it: the
    second clip's squares are summed from the first clip's output at the norm of all (it had
    summed updates each clipped by its own group's norm: 0.354 for 0.5)."""
    rule = uo.chain(uo.clip_by_global_norm(1.0), uo.clip_by_global_norm(0.5), uo.sgd(lr=1.0))
    g = [np.array([3.0, 4.0]), np.array([0.0, 1.0])]
    state = uo.setup(rule, [np.zeros(2), np.zeros(2)])
    state, _ = uo.update(state, [np.zeros(2), np.zeros(2)], [g[0], None])  # counts apart
    for inplace in (False, True):
        p = [np.zeros(2), np.zeros(2)]
        if inplace:
            uo.update_(state, p, g)
        else:
            _, p = uo.update(state, p, g)
        fresh = [np.zeros(2), np.zeros(2)]
        _, want = uo.update(uo.setup(rule, fresh), fresh, g)
        for a, b in zip(p, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-15)
