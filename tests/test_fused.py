"""The compiled fast path is held to the reference path bit for bit, and falls back loudly."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from helpers import (
    assert_same,
    assert_same_state,
    beside_reference,
    expect_compiled,
    grads_like,
    reference_path,
    rel_diff,
)
from uniopt import fast as ufast
from uniopt.fast import cpu as fused

RULES = {
    "sgd": uo.sgd(lr=0.1),
    "sgd-momentum-dampening-wd": uo.sgd(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01),
    "sgd-nesterov": uo.sgd(lr=0.1, momentum=0.8, nesterov=True),
    # a momentum that is 0 in float32 but not in double: both paths must branch alike (the blocks
    # of rmsprop-centered-momentum, so no loop of its own)
    "rmsprop-tiny-momentum": uo.rmsprop(lr=0.1, momentum=1e-300, centered=True, weight_decay=1e-3),
    "adagrad": uo.adagrad(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.1),
    "adagrad-eps-in-sqrt": uo.adagrad(lr=0.1, eps=0.0, eps_in_sqrt=True),
    "rmsprop": uo.rmsprop(lr=0.01),
    "rmsprop-centered-momentum": uo.rmsprop(
        lr=0.01, centered=True, momentum=0.5, weight_decay=1e-3
    ),
    "adadelta": uo.adadelta(lr=0.5, rho=0.8, weight_decay=0.1),
    "adam": uo.adam(lr=0.01),
    "amsgrad-l2": uo.adam(lr=0.01, weight_decay=0.1, amsgrad=True),
    "adamw": uo.adamw(lr=0.01, weight_decay=0.1),
    "adamw-decoupled": uo.adamw(lr=0.01, weight_decay=1e-3, couple_lr=False),
    "optimistic_adam": uo.optimistic_adam(0.01, beta=0.5),
    "chain-clip-wd-adam": uo.chain(uo.clip(0.5), uo.weight_decay(1e-2), uo.adam(lr=1e-2)),
    "scheduled": uo.adam(lr=uo.schedules.cosine(1e-2, steps=20), betas=(lambda s: 0.8, 0.99)),
    "adamax-l2": uo.adamax(lr=0.01, weight_decay=0.1),
    "nadam-decoupled": uo.nadam(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    # the rectification switches on at step 6 of the 25
    "radam-l2": uo.radam(lr=0.01, weight_decay=0.1),
    "asgd-averaging": uo.asgd(lr=0.05, lambd=0.01, t0=5, weight_decay=1e-2),
    "rprop": uo.rprop(lr=0.01, etas=(0.3, 1.4), step_sizes=(1e-4, 0.03)),
    # every averaging part, each averaging the params the parts before it write: a sync at
    # steps 3, 6..., members of the mean at steps 2, 5..., the EMA's first copy
    "lookahead-polyak-ema": uo.chain(uo.lookahead(uo.sgd(lr=0.1, momentum=0.9), k=3, alpha=0.6),
                                     uo.polyak(start=2, every=3), uo.ema(0.9)),
    # signSGD: the compiled sign is NumPy's (+0.0 for either zero, NaN kept)
    "sign": uo.chain(uo.sign(), uo.scale_by_lr(0.01)),
    # optax's small blocks in one loop: a NaN select, a global norm's extra pass, a period's
    # sum, the params held at 0 (half of them start negative)
    "optax-blocks": uo.chain(uo.zero_nans(), uo.normalize(), uo.adam(lr=0.01), uo.apply_every(2),
                             uo.keep_params_nonnegative()),
    # a part that sets the parameter (its finish), with L1's exact zeros
    "ftrl": uo.ftrl(lr=0.1, l1_regularization_strength=0.05,
                    l2_shrinkage_regularization_strength=0.01, beta=0.5),
}
# a leaf larger than one chunk, so chunk boundaries inside a leaf are exercised
SHAPES = [(), (1,), (3, 4), (fused.CHUNK * 2 + 17,), (5, 1, 7)]


def _params(rng: np.random.Generator, dtype: type) -> dict[str, np.ndarray]:
    return {f"x{i}": rng.standard_normal(s).astype(dtype) for i, s in enumerate(SHAPES)}


# float64 for the rules whose arithmetic branches or schedules (the generated loop is the same
# text for every dtype; a loop costs seconds to compile on a cold cache)
FLOAT64 = ("rmsprop-tiny-momentum", "adagrad-eps-in-sqrt", "scheduled", "rprop")
# the pure loop (new arrays out) for every count of slots, and for each kind of finish (the
# part that writes p: scale_by_lr's, the decay's, NAdam's with its slots, ASGD's averaging);
# the other rules in place only (see helpers.beside_reference)
PURE = ("sgd", "sgd-momentum-dampening-wd", "adam", "amsgrad-l2", "chain-clip-wd-adam",
        "nadam-decoupled", "asgd-averaging", "lookahead-polyak-ema", "scheduled")


@pytest.mark.slow  # compiles a loop per rule, dtype and mode on a cold cache
@pytest.mark.parametrize(("name", "dtype"), [(n, np.float32) for n in sorted(RULES)]
                         + [(n, np.float64) for n in FLOAT64])
def test_fast_path_is_bitwise_the_reference(name: str, dtype: type) -> None:
    rng = np.random.default_rng(0)
    rule = RULES[name]
    fast = _params(rng, dtype)
    ref = {k: v.copy() for k, v in fast.items()}
    s_fast, s_ref = uo.setup(rule, fast), uo.setup(rule, ref)
    s_fast, fast, s_ref = beside_reference(s_fast, fast, s_ref, ref, 25,
                                           lambda k: grads_like(rng, fast),
                                           pure=name in PURE and dtype == np.float32)
    assert all(type(x) is np.ndarray for x in uo.trainables(fast))
    assert_same(uo.trainables(fast), uo.trainables(ref))
    assert_same_state(s_fast, s_ref)


# Rules with per-leaf parts (fast.cpu.segmented): each run of elementwise parts one compiled
# pass, the per-leaf parts between them as the reference path runs them, the update handed on
# in arrays of its own
SEGMENTED = {
    # an elementwise prefix (the momentum), then per-leaf parts only, the last writing p;
    # matrices wide and tall (orthogonalize works on the transpose: u comes back transposed),
    # one over two chunks, and a stack of same-shaped ones (one batched call)
    "muon": (uo.muon(lr=0.02, weight_decay=0.01),
             [(2, fused.CHUNK + 20000), (7, 3), (3, 7), *[(4, 5)] * 3]),
    # a per-leaf part first and between two runs; a global norm inside a run, of the u that
    # reaches it (Adam's, from the centred gradient); an elementwise suffix writing p
    "centralize-adam-clip-trust-wd": (
        uo.chain(uo.centralize(), uo.scale_by_adam(), uo.clip_by_global_norm(1.0),
                 uo.scale_by_trust_ratio(), uo.weight_decay(0.01), uo.scale_by_lr(0.1)),
        SHAPES),
}


@pytest.mark.parametrize(("name", "dtype"), [("muon", np.float32), ("muon", np.float64),
                                             ("centralize-adam-clip-trust-wd", np.float32)])
def test_per_leaf_parts_between_compiled_runs_are_bitwise_the_reference(
        name: str, dtype: type) -> None:
    rng = np.random.default_rng(1)
    rule, shapes = SEGMENTED[name]
    fast = {f"x{i}": rng.standard_normal(s).astype(dtype) for i, s in enumerate(shapes)}
    ref = {k: v.copy() for k, v in fast.items()}
    first, before = fast, {k: v.copy() for k, v in fast.items()}
    s_fast, s_ref = uo.setup(rule, fast), uo.setup(rule, ref)
    s_first = s_fast
    s_fast, fast, s_ref = beside_reference(s_fast, fast, s_ref, ref, 8,
                                           lambda k: grads_like(rng, fast))
    assert all(type(x) is np.ndarray for x in uo.trainables(fast))
    assert_same(uo.trainables(fast), uo.trainables(ref))
    assert_same_state(s_fast, s_ref)
    # the first step was pure: it wrote neither the caller's params nor their slots
    assert_same(uo.trainables(first), uo.trainables(before))
    assert_same_state(s_first, uo.setup(rule, before))


def test_the_compiled_sign_is_numpys_at_zeros_and_nan(small_steps_compiled: None) -> None:
    """np.sign gives +0.0 for -0.0 and keeps NaN; numba's scalar sign keeps -0.0 (and
    ``-0.0 - 0.01*(-0.0)`` is +0.0 where ``-0.0 - 0.01*0.0`` is -0.0): the compiled loop's is
    NumPy's, bit for bit (the loop of RULES["sign"], in place, float32)."""
    g = [np.array([-0.0, 0.0, np.nan, -3.0, 2.0, -np.inf], np.float32)]
    fast, ref = [np.full(6, -0.0, np.float32)], [np.full(6, -0.0, np.float32)]
    rule = RULES["sign"]
    with expect_compiled(1):
        uo.update_(uo.setup(rule, fast), fast, g)
    with reference_path():
        uo.update_(uo.setup(rule, ref), ref, g)
    assert_same(fast, ref)
    assert np.signbit(fast[0][0]) and np.signbit(fast[0][1])


def test_fast_path_runs_for_plain_arrays() -> None:
    big = [np.ones(fused.MIN_SIZE, np.float32), np.ones((2, 2), np.float32)]
    many = [np.ones(3, np.float32) for _ in range(fused.MIN_LEAVES)]
    with expect_compiled(4):
        for p in (big, many):
            state = uo.setup(uo.adam(), p)
            state = uo.update_(state, p, [np.ones_like(x) for x in p])
            state, _ = uo.update(state, p, [np.ones_like(x) for x in p])
    # a tiny step stays on the reference path: no compile for a few numbers
    tiny = [np.ones(3, np.float32)]
    with expect_compiled(0):
        uo.update_(uo.setup(uo.adam(), tiny), tiny, [np.ones(3, np.float32)])


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_packed_params_are_views_that_write_through_and_step_as_the_tree(library: str) -> None:
    """uo.pack: one contiguous 1-D buffer and the tree of views into it (a non-contiguous leaf
    and a 0-d one included); a write through a view is the buffer's and the reverse, and a step
    on ``[flat]`` with the gradients packed alike is the step on the tree."""
    rng = np.random.default_rng(4)
    tree = {"w": rng.standard_normal((fused.MIN_SIZE, 3)).astype(np.float32).T,
            "b": rng.standard_normal(5).astype(np.float32), "s": np.array(0.5, np.float32)}
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in tree.items()}
    if library == "torch":
        torch = pytest.importorskip("torch")
        tree, grads = ({k: torch.from_numpy(v) for k, v in t.items()} for t in (tree, grads))

    def host(x: Any) -> np.ndarray:
        return x.numpy().copy() if library == "torch" else np.array(x)
    flat, views = uo.pack(tree)
    assert tuple(flat.shape) == (3 * fused.MIN_SIZE + 6,)
    for k in tree:
        assert tuple(views[k].shape) == tuple(tree[k].shape)
        assert_same([host(views[k])], [host(tree[k])])
    views["w"][1, 2] = 7.0
    flat[5] = -3.0  # ("s", after "b"'s 5 numbers: the leaves in the tree's order)
    assert (host(flat) == 7.0).sum() == 1 and float(views["s"]) == -3.0
    assert_same([host(flat)], [np.concatenate([host(views[k]).ravel() for k in ("b", "s", "w")])])

    ref = {k: host(v) for k, v in views.items()}
    g_flat, _ = uo.pack(grads)
    state = uo.setup(uo.adam(lr=0.1), [flat])
    ref_state = uo.setup(uo.adam(lr=0.1), ref)
    for _ in range(3):
        state = uo.update_(state, [flat], [g_flat])
        ref_state = uo.update_(ref_state, ref, {k: host(v) for k, v in grads.items()})
    assert_same([host(views[k]) for k in ref], list(ref.values()))


def test_pack_refuses_an_empty_tree_and_mixed_dtypes() -> None:
    with pytest.raises(ValueError, match=r"^pack: the tree holds no arrays$"):
        uo.pack({"a": [], "b": {}})
    with pytest.raises(ValueError, match=r"^pack: every array must have one dtype, got "
                                         r"\['float32', 'float64'\]$"):
        uo.pack({"a": np.ones(2, np.float32), "b": np.ones(2)})


def _fallback(params, grads):  # type: ignore[no-untyped-def]
    """Run one in-place step where the fast path declines it (expecting a warning), and on the
    reference path: the same result."""
    ref = [np.array(p) for p in params]
    rule = uo.adam(lr=0.1)
    ufast._warned.clear()
    with pytest.warns(ufast.FastPathUnavailable, match="fast path not used"), expect_compiled(0):
        uo.update_(uo.setup(rule, params), params, grads)
    with reference_path():
        uo.update_(uo.setup(rule, ref), ref, grads)
    assert_same(params, ref)


N = fused.MIN_SIZE  # large enough for the fast path to be tried


def test_a_reason_is_said_once_whichever_leaf_it_names() -> None:
    """"Reported once per reason", but the reason names its leaf ("params leaf 3 is ..."):
    trees whose odd leaf sat elsewhere warned once per position (18 for 18 trees)."""
    import warnings

    ufast._warned.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for n in range(2, 6):
            ps = [np.ones(N, np.float32) for _ in range(n - 1)] + [np.ones(2, np.float64)]
            uo.update_(uo.setup(uo.adam(), ps), ps, [np.ones_like(p) for p in ps])
    said = [str(w.message) for w in seen if issubclass(w.category, ufast.FastPathUnavailable)]
    assert len(said) == 1 and "params leaf 1 " in said[0], said


def test_non_contiguous_falls_back_with_a_warning() -> None:
    base = np.arange(8.0 * N).reshape(4, 2 * N)
    p = [base[:, ::2]]
    _fallback(p, [np.ones_like(p[0])])
    assert base[0, 0] != 0.0  # the view was written in place, through to its base


def test_mixed_dtypes_fall_back() -> None:
    _fallback(
        [np.ones(N, np.float32), np.ones(2, np.float64)],
        [np.ones(N, np.float32), np.ones(2, np.float64)],
    )
    _fallback([np.ones(N, np.float16), np.ones(2, np.float32)],
              [np.ones(N, np.float16), np.ones(2, np.float32)])


def test_the_warning_made_an_error_leaves_params_and_state_unchanged() -> None:
    """Under ``-W error`` the fast path's warning was raised after update_ had written the
    params and Adam's moments in place, the step count left at 0: the next step (no warning:
    once per reason) then stepped with the moments of two steps (a sweep's finding). It is
    given before anything is written; the next step is the first."""
    p = [np.asfortranarray(np.ones((3, N // 2)))]
    state = uo.setup(uo.adam(lr=0.1), p)
    ufast._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ufast.FastPathUnavailable):
            uo.update_(state, p, [np.ones((3, N // 2))])
    assert state.step == 0
    assert_same(p, [np.ones((3, N // 2))])
    assert_same(state.slots["scale_by_adam.exp_avg"], [np.zeros((3, N // 2))])
    uo.update_(state, p, [np.ones((3, N // 2))])
    np.testing.assert_allclose(p[0], 0.9, rtol=1e-7)
    assert state.step == 1


def test_warning_is_given_once_per_reason() -> None:
    ufast._warned.clear()
    p = [np.ones(N, np.float16)]
    state = uo.setup(uo.adam(lr=0.1), p, state_dtype="float64")  # a pairing it declines
    with pytest.warns(ufast.FastPathUnavailable, match="float16 and state as float64") as got:
        state = uo.update_(state, p, [np.ones(N, np.float16)])
    # at the caller's line, from update_ and from the pure update, whose call is deeper
    # (it named uniopt/engine.py)
    assert [w.filename for w in got] == [__file__]
    ufast._warned.clear()
    with pytest.warns(ufast.FastPathUnavailable) as got:
        uo.update(state, p, [np.ones(N, np.float16)])
    assert [w.filename for w in got] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        uo.update_(state, p, [np.ones(N, np.float16)])


def test_bad_input_on_the_fast_path_raises_without_warning_or_change() -> None:
    p = {"a": np.ones(N, np.float32), "b": np.ones(2, np.float32)}
    state = uo.setup(uo.adam(), p)
    with expect_compiled(1):  # a step of this size takes the fast path
        state = uo.update_(state, p, {"a": np.ones(N, np.float32), "b": np.ones(2, np.float32)})
    moments = state.slots["scale_by_adam.exp_avg"]
    before = ({k: v.copy() for k, v in p.items()}, [a.copy() for a in moments])
    ufast._warned.clear()
    with warnings.catch_warnings(), expect_compiled(0):
        warnings.simplefilter("error", ufast.FastPathUnavailable)
        with pytest.raises(ValueError, match=r"gradient for params\['b'\] has shape \(3,\)"):
            uo.update_(state, p, {"a": np.ones(N, np.float32), "b": np.ones(3, np.float32)})
        with pytest.raises(ValueError, match="dtype float64"):
            uo.update_(state, p, {"a": np.ones(N, np.float32), "b": np.ones(2)})
        ro = {k: v.copy() for k, v in p.items()}
        ro["a"].flags.writeable = False
        with pytest.raises(TypeError, match="read-only"):
            uo.update_(state, ro, {"a": np.ones(N, np.float32), "b": np.ones(2, np.float32)})
    for k in p:
        np.testing.assert_array_equal(p[k], before[0][k])
    for a, b in zip(state.slots["scale_by_adam.exp_avg"], before[1], strict=True):
        np.testing.assert_array_equal(a, b)
    assert state.step == 1


def test_pure_update_of_read_only_params_stays_on_the_fast_path() -> None:
    p = [np.ones(N)]
    p[0].flags.writeable = False
    with warnings.catch_warnings(), expect_compiled(1):
        warnings.simplefilter("error", ufast.FastPathUnavailable)
        _, new = uo.update(uo.setup(uo.sgd(lr=0.5), p), p, [np.ones(N)])
    np.testing.assert_array_equal(new[0], 0.5)
    np.testing.assert_array_equal(p[0], 1.0)


def test_update_and_update_in_place_share_one_compiled_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pure step is the in-place loop run on copies of the params and the state: a rule asks
    for the same loop from ``update`` as from ``update_`` (one compile, not two), the pure step
    leaves its inputs as they were, and both give the same bits."""
    asked = []
    real = fused.fused_kernel

    def recording(*args: Any) -> Any:
        asked.append(args)
        return real(*args)

    monkeypatch.setattr(fused, "fused_kernel", recording)
    rule = uo.chain(uo.clip(0.7), uo.adamw(lr=1e-2, weight_decay=0.1))  # a loop of 3 parts
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(N).astype(np.float32), rng.standard_normal(7).astype(np.float32)]
    grads = [rng.standard_normal(x.shape).astype(np.float32) for x in params]
    pure_state, pure = uo.setup(rule, params), [x.copy() for x in params]
    ip_state, ip = uo.setup(rule, params), [x.copy() for x in params]
    before = [x.copy() for x in pure] + [x.copy() for v in pure_state.slots.values() for x in v]
    with expect_compiled(4):
        for _ in range(2):
            new_state, new = uo.update(pure_state, pure, grads)
            after = pure + [x for v in pure_state.slots.values() for x in v]
            assert_same(after, before)  # the inputs of a pure step are left as they were
            pure_state, pure = new_state, new
            before = [x.copy() for x in pure] + [x.copy() for v in pure_state.slots.values()
                                                 for x in v]
            ip_state = uo.update_(ip_state, ip, grads)
    assert_same(pure, ip)
    for key in ip_state.slots:
        assert_same(pure_state.slots[key], ip_state.slots[key])
    assert len(asked) >= 1 and len({a[:3] for a in asked}) == 1, [a[1:3] for a in asked]
    assert asked[0][2] == "inplace"


@pytest.mark.parametrize("sizes", [
    [round(1024 * 64 ** (i / 49)) for i in range(50)],  # a small CNN's: 1K to 64K
    [70_000, 3, 0, 65_536, 1, 200_000, 17],
    [5_000] * 37,
    [int(x) for x in np.random.default_rng(0).integers(0, 300_000, 101)],
])
def test_the_thread_pools_runs_hold_equal_shares(sizes: list[int]) -> None:
    """The thread-pool loop walks :func:`_chunks`' chunks in :data:`RUNS` runs of consecutive
    chunks, each within one chunk of an equal share of the elements, so that numba's split of
    the runs into one group per thread gives 2, 4 or 8 threads shares of elements within two
    chunks of each other (split by chunks, two threads on a small CNN's leaves would do a quarter
    and three quarters of the work)."""
    sz = np.array(sizes, np.int64)
    leaf, start, stop, total = fused._chunks(sz, fused.CHUNK)
    assert total == sum(sizes)
    bounds = fused._shares(start, stop, total, fused.RUNS)
    assert len(bounds) == fused.RUNS + 1 and bounds[0] == 0 and bounds[-1] == len(leaf)
    assert (np.diff(bounds) >= 0).all()  # every chunk in exactly one run
    done = np.concatenate([[0], np.cumsum(stop - start)])
    runs = done[bounds[1:]] - done[bounds[:-1]]
    assert (np.abs(runs * fused.RUNS - total) < fused.CHUNK * fused.RUNS).all(), runs
    for threads in (2, 4, 8):
        shares = runs.reshape(threads, -1).sum(axis=1)
        assert max(shares) - min(shares) < 2 * fused.CHUNK, (threads, shares)
    if len(sizes) == 50:  # the first half of _chunks' order holds about a quarter
        half = len(leaf) // 2
        assert int((stop - start)[:half].sum()) < total // 3


def test_offsets_self_test_passes_here() -> None:
    assert fused.AVAILABLE, "NumPy's array struct layout is not the one the fast path reads"


_NORMS = {"global": uo.clip_by_global_norm(0.5), "leaf": uo.clip_by_norm(0.5),
          "block-rms": uo.clip_by_block_rms(0.5), "normalize": uo.normalize(eps=1e-6)}


# (the global norm in every dtype and place; the others where their bits differ, float64: a
# loop compiled for each case is most of its time)
@pytest.mark.parametrize(("norm", "dtype", "position"), [
    *[("global", d, p) for d in (np.float32, np.float64) for p in ("head", "after-adam")],
    *[(n, np.float64, "head") for n in ("leaf", "block-rms", "normalize")],
])
def test_a_norms_fast_path_agrees_with_reference(dtype: type, position: str,
                                                 norm: str) -> None:
    # The two paths sum the squares in different orders (per chunk and thread, in float64, vs
    # NumPy's sum of each leaf), so a norm (every leaf's, or each leaf's own), and so the clip
    # factor, may differ in the last bit of float64: after rounding to the dtype that is at
    # most a couple of ulps of each update (docs/speed.md says so)
    clip = _NORMS[norm]
    rule = (
        uo.chain(clip, uo.adam(lr=1e-2))
        if position == "head"
        else uo.chain(uo.scale_by_adam(), clip, uo.scale_by_lr(1e-2))
    )
    rng = np.random.default_rng(1)
    fast = _params(rng, dtype)
    ref = {k: v.copy() for k, v in fast.items()}
    s_fast, s_ref = uo.setup(rule, fast), uo.setup(rule, ref)
    eps = np.finfo(dtype).eps
    for _ in range(20):
        grads = grads_like(rng, fast)
        with expect_compiled(1):
            s_fast = uo.update_(s_fast, fast, grads)
        with reference_path():
            s_ref = uo.update_(s_ref, ref, grads)
        for k in fast:
            assert rel_diff(fast[k], ref[k]) <= 8 * eps


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["adam", "sgd-momentum-dampening-wd", "chain-clip-wd-adam"])
def test_torch_cpu_tensors_take_the_fast_path(name: str, dtype: type) -> None:
    """The functional API on CPU tensors runs the compiled loop on NumPy views of their memory:
    bit for bit the NumPy reference; update_ writes the very tensors; update returns new leaf
    tensors that require grad where the old ones did."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    rule = RULES[name]
    ref = _params(rng, dtype)
    params = {k: torch.tensor(v, requires_grad=(k != "x0")) for k, v in ref.items()}
    objects = dict(params)
    state, s_ref = uo.setup(rule, params), uo.setup(rule, ref)
    with warnings.catch_warnings(), expect_compiled(10):
        warnings.simplefilter("error", ufast.FastPathUnavailable)
        for step in range(10):
            grads = grads_like(rng, ref)
            t_grads = {k: torch.from_numpy(g.copy()) for k, g in grads.items()}
            if step % 2:
                state = uo.update_(state, params, t_grads)
                assert all(params[k] is objects[k] for k in params)
            else:
                state, params = uo.update(state, params, t_grads)
                assert all(params[k] is not objects[k] for k in params)
                objects = dict(params)
                for k, t in params.items():
                    assert t.is_leaf and t.requires_grad == (k != "x0")
            with reference_path():
                s_ref = uo.update_(s_ref, ref, grads)
    for k in ref:
        assert isinstance(params[k], torch.Tensor) and params[k].dtype == torch.from_numpy(
            ref[k]).dtype
        np.testing.assert_array_equal(params[k].detach().numpy(), ref[k])
    for key in s_ref.slots:
        for a, b in zip(state.slots[key], s_ref.slots[key], strict=True):
            assert isinstance(a, torch.Tensor)
            np.testing.assert_array_equal(a.numpy(), b)


def test_bfloat16_tensors_take_the_compiled_loop_through_their_bits() -> None:
    """NumPy has no bfloat16: a bfloat16 tensor reaches the loop as an int16 view of its bits,
    read as bfloat16 and rounded back (nearest even, NaN kept), as torch rounds."""
    torch = pytest.importorskip("torch")
    p = [torch.tensor([1.0, -3.0, float("nan"), 2.0**-130, 1e38] * 4000, dtype=torch.bfloat16)]
    ref = [p[0].clone()]
    grads = [torch.full_like(p[0], 0.3)]
    with expect_compiled(1):
        state = uo.update_(uo.setup(uo.sgd(lr=0.5), p), p, grads)
    with reference_path():
        uo.update_(uo.setup(uo.sgd(lr=0.5), ref), ref, grads)
    assert state.step == 1 and p[0].dtype == torch.bfloat16
    assert torch.equal(p[0].view(torch.int16), ref[0].view(torch.int16))


# float16/bfloat16 params, slots of their own dtype or float32: computed in float32, rounded once
LOW = {"adamw": RULES["adamw"], "rmsprop-centered-momentum": RULES["rmsprop-centered-momentum"]}


def _raw(x: Any) -> np.ndarray:
    """The bytes of an array or tensor (NaNs compared by their bits)."""
    if hasattr(x, "detach"):
        import torch

        return x.detach().contiguous().view(torch.uint8).numpy()
    return np.ascontiguousarray(x).view(np.uint8)


@pytest.mark.slow  # a loop per rule, storage and mode
@pytest.mark.parametrize(("name", "lib", "state_dtype"), [
    *[("adamw", lib, sd) for lib in ("numpy-float16", "torch-float16", "torch-bfloat16")
      for sd in (None, "float32")],
    # selects, a centred root and momentum, with bfloat16 slots rounded every step
    ("rmsprop-centered-momentum", "torch-bfloat16", None),
])
def test_16_bit_params_are_bitwise_the_reference(name: str, lib: str, state_dtype: str | None,
                                                 small_steps_compiled: None) -> None:
    rng = np.random.default_rng(1)
    make: Any
    if lib == "numpy-float16":
        def make(a: np.ndarray) -> Any:
            return a.astype(np.float16)
    else:
        torch = pytest.importorskip("torch")
        dtype = torch.float16 if lib == "torch-float16" else torch.bfloat16

        def make(a: np.ndarray) -> Any:
            return torch.from_numpy(a.astype(np.float32)).to(dtype)
    # the ground truth is NumPy's reference path (torch's own elementwise kernels are not
    # NumPy's to the last bit). NumPy has no bfloat16: there it runs on float32 arrays, and
    # what a bfloat16 run stores (params; slots without state_dtype) is rounded to bfloat16
    # after each step, by torch's conversion
    bf16 = lib == "torch-bfloat16"
    def as_ref(x: Any) -> np.ndarray:
        if lib == "numpy-float16":
            return np.array(x)
        return x.float().numpy() if bf16 else x.numpy().copy()

    def rounded(xs: list[np.ndarray]) -> None:
        for x in xs:
            x[...] = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    shapes = [(3, 5), (fused.CHUNK + 7,), (1,)]
    start = [rng.standard_normal(s) for s in shapes]
    params, ref = [make(a) for a in start], [as_ref(make(a)) for a in start]
    s_fast = uo.setup(LOW[name], params, state_dtype=state_dtype)
    s_ref = uo.setup(LOW[name], ref, state_dtype=state_dtype)
    def round_stored(state: uo.State, ref: list[np.ndarray]) -> None:
        if bf16:
            rounded(ref)
            if state_dtype is None:
                rounded([x for v in state.slots.values() for x in v])

    s_fast, params, s_ref = beside_reference(
        s_fast, params, s_ref, ref, 12,
        lambda k: [make(rng.standard_normal(s) * 3) for s in shapes],
        lambda g: [as_ref(x) for x in g], round_stored)
    wide = (lambda x: x.float()) if bf16 else (lambda x: x)
    for a, b in zip(params, ref, strict=True):
        np.testing.assert_array_equal(_raw(wide(a)), _raw(b))
    for key in s_ref.slots:
        for a, b in zip(s_fast.slots[key], s_ref.slots[key], strict=True):
            np.testing.assert_array_equal(_raw(wide(a)), _raw(b))


# --- the thread-pool form of each loop ---------------------------------------------------------

# The suite runs every compiled step on one thread (conftest.py); these send a step to the
# thread pool and hold it to the one-thread run, bit for bit: a norm's squares are summed per
# chunk and the chunks' sums added in one order on any number of threads. One case per kind of
# loop: elementwise (in place and pure), the global norm's sum, the per-leaf sums and 8 bits
PARALLEL_CASES = {  # rule, state_dtype, whether pure steps alternate with in-place ones
    "adamw": (RULES["adamw"], None, True),
    "global-norm": (uo.chain(uo.clip_by_global_norm(0.5), uo.adam(lr=1e-2)), None, False),
    "leaf-norms": (uo.chain(uo.clip_by_norm(3.0), uo.scale_by_adam(), uo.clip_by_block_rms(0.9),
                            uo.scale_by_lr(1e-2)), None, False),
    "adam-q8": (uo.adam(lr=1e-2), "q8", False),
}


@pytest.mark.parametrize("name", sorted(PARALLEL_CASES))
def test_the_thread_pool_loop_is_the_one_thread_loop(name: str) -> None:
    rule, state_dtype, pure = PARALLEL_CASES[name]
    rng = np.random.default_rng(3)
    one = _params(rng, np.float32)
    pool = {k: v.copy() for k, v in one.items()}
    s_one = uo.setup(rule, one, state_dtype=state_dtype)
    s_pool = uo.setup(rule, pool, state_dtype=state_dtype)
    for k in range(6):
        grads = grads_like(rng, one)
        with expect_compiled(1):
            s_one = uo.update_(s_one, one, grads)
        with pytest.MonkeyPatch.context() as mp, expect_compiled(1):
            mp.setattr(fused, "PARALLEL_MIN", 0)
            if k % 2 or not pure:
                s_pool = uo.update_(s_pool, pool, grads)
            else:
                s_pool, pool = uo.update(s_pool, pool, grads)
    assert_same(uo.trainables(pool), uo.trainables(one))
    assert s_pool.step == s_one.step and s_pool.slots.keys() == s_one.slots.keys()
    for key in s_one.slots:  # 8-bit slots as their codes and block scales
        a, b = s_pool.slots[key], s_one.slots[key]
        assert_same([y for x in a for y in _arrays(x)], [y for x in b for y in _arrays(x)])


def _arrays(slot: Any) -> tuple[Any, ...]:
    return (slot.codes, slot.absmax) if hasattr(slot, "codes") else (slot,)


_COMPILE_ONCE = """
import pathlib, sys, time
import os

import numpy as np
import uniopt as uo
from uniopt.fast import cpu
cpu.MIN_LEAVES = cpu.MIN_SIZE = cpu.COMPILE_AFTER = 0
here = pathlib.Path(sys.argv[1])
(here / f"ready{sys.argv[2]}").touch()
while not (here / "go").exists():
    time.sleep(0.005)
params = [np.ones(64, np.float32), np.ones(8, np.float32)]
state = uo.setup(uo.sgd(lr=0.1, momentum=0.9), params)
uo.update_(state, params, [np.full(64, 0.5, np.float32), np.ones(8, np.float32)])
walk, = cpu._HELD
print(1 - walk.cache_hits, walk.cache_hits)
"""


def test_processes_meeting_a_new_loop_together_compile_it_once(tmp_path: Any) -> None:
    """Two processes (the ranks of a job on one machine) take their first step of a loop that
    is not in the cache at the same moment: one compiles it, the other loads its machine code
    from the disk."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "UNIOPT_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", _COMPILE_ONCE, str(tmp_path), str(k)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{k}").exists() for k in range(2)):
            assert time.monotonic() < deadline, "the processes did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        (tmp_path / "go").touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert all(p.returncode == 0 for p in procs), outs
    counts = sorted(tuple(map(int, out.split())) for out, _ in outs)
    assert counts == [(0, 1), (1, 0)], counts  # (compiled, loaded) in each process


def test_a_loop_file_is_checked_and_written_under_the_lock(tmp_path: Any) -> None:
    """The check and write of a loop's file wait for the lock, as its compile does. numba 0.62
    (our floor) keys its cache by the file's time stamp: a process that found no file before
    another wrote it, and wrote it again once the other had compiled, missed the other's machine
    code and compiled the loop a second time (the race of the two-process test above, seen once
    in CI)."""
    import os
    import sys
    import threading

    fcntl = pytest.importorskip("fcntl")
    path = tmp_path / "uniopt_loop_test.py"
    held = os.open(tmp_path / "uniopt_loop_test.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(held, fcntl.LOCK_EX)  # as another process compiling the loop
    done: list[Any] = []
    worker = threading.Thread(target=lambda: done.append(fused._imported("x = 1\n", path)))
    try:
        worker.start()
        worker.join(0.3)
        assert not path.exists() and not done  # waiting: nothing read or written yet
    finally:
        os.close(held)
        worker.join(30)
    sys.modules.pop(path.stem, None)
    assert path.read_text() == "x = 1\n" and done[0].x == 1


# numba's start-up (as a compile runs it), then which implementation lowers each function and
# signature, written to the file argv[1]
_LOWERING = """
import json
import re
import sys
from numba.core.registry import cpu_target

ctx = cpu_target.target_context
ctx.refresh()
name = lambda x: re.sub(" at 0x[0-9a-f]+", "", f"{getattr(x, '__module__', '')}.{x!r}")
lowering = {(name(key), str(sig)): name(impl) for key, sel in ctx._defns.items()
            for sig, impl in sel.versions}
with open(sys.argv[1], "w") as f:
    json.dump([[*k, v] for k, v in lowering.items()], f)
"""

_LOADS_QUICKLY = """
import hashlib, sys
import os

import numpy as np
import uniopt as uo
from uniopt.fast import cpu

cpu.COMPILE_AFTER = 0  # a small step takes the loop at once
rng = np.random.default_rng(0)
cases = {  # the one-thread loop and its check; the pool's with a norm's sum; 8 bits; per-leaf
    "adamw": (uo.adamw(lr=1e-2, weight_decay=0.1), [(20, 64), (64,), (64, 3)], None),
    "clip-adam": (uo.chain(uo.clip_by_global_norm(1.0), uo.adam(lr=1e-2)), [(300, 300)], None),
    "q8": (uo.adam(lr=1e-2), [(300, 300)], "q8"),
    "lamb": (uo.lamb(lr=1e-2), [(40, 40), (40,)], None),
}
for name, (rule, shapes, dtype) in cases.items():
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    state = uo.setup(rule, params, state_dtype=dtype)
    for _ in range(3):
        state = uo.update_(state, params, [rng.standard_normal(s).astype(np.float32)
                                           for s in shapes])
    print(name, hashlib.sha1(b"".join(p.tobytes() for p in params)).hexdigest())
started = "numba.np.arraymath" in sys.modules
""" + _LOWERING + """
print("compiled", cpu.STEPS, "numba's implementations", started)
"""


def test_a_process_loads_cached_loops_without_numbas_start_up(tmp_path: Any) -> None:
    """A second process steps with the loops the first compiled (one-thread, thread-pool,
    a norm's sum, 8-bit, per-leaf segments) loaded from the cache without numba importing the
    implementations it compiles with (uniopt.jitcache), to the same bits; numba's start-up
    later leaves the same implementation lowering each function as where it ran first."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "UNIOPT_CACHE_DIR": str(tmp_path / "cache")}
    outs, tables = [], []
    # numba alone, its start-up first; then a process that compiles, one that loads
    for k, script in enumerate([_LOWERING, _LOADS_QUICKLY, _LOADS_QUICKLY]):
        table = tmp_path / f"lowering{k}.json"
        proc = subprocess.run([sys.executable, "-c", script, str(table)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(proc.stdout.splitlines())
        tables.append({tuple(row[:2]): row[2] for row in json.loads(table.read_text())})
    _, first, second = outs
    assert first[:-1] == second[:-1]  # the same bits
    assert second[-1] == "compiled 12 numba's implementations False", second[-1]
    assert first[-1] == "compiled 12 numba's implementations True", first[-1]  # it compiled
    # numba's own lowering as numba alone has it (the others have more: what they compiled)
    numba_alone = tables[0]
    assert len(numba_alone) > 900
    for table in tables[1:]:
        assert {k: table.get(k) for k in numba_alone} == numba_alone


def test_a_numba_without_the_parts_jitcache_uses_keeps_its_own_cache(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a numba release lacks what the quick cache is made of, a compiled function gets
    numba's own cache, as ``enable_caching`` gives it; a function without one is left alone."""
    from numba.core.caching import FunctionCache

    from uniopt import jitcache

    def f(x: float) -> float:
        return x + 1

    assert type(jitcache.cache_of(f)) is not FunctionCache  # the quick one, on this numba
    monkeypatch.setattr(jitcache, "_quick_class", lambda: None)
    assert type(jitcache.cache_of(f)) is FunctionCache
    assert type(jitcache.njit()(f)._cache) is FunctionCache


def test_a_numba_without_the_parts_jitcache_uses_vectorizes_as_numba_does(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Where a numba release lacks what the tolerant cache is made of, a ufunc is made by
    ``numba.vectorize(cache=True)``, and is NumPy's ufunc all the same."""
    from numba.core import config

    from uniopt import jitcache

    def add(a, b):  # type: ignore[no-untyped-def]
        return a + b

    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path))  # (not the tests' __pycache__)
    monkeypatch.setattr(jitcache, "_tolerant_class", lambda: None)
    made = jitcache.ufunc(add, ["float64(float64, float64)"])
    assert type(made) is np.ufunc and made(np.array([1.0, 2.5]), 2.0).tolist() == [3.0, 4.5]
    assert list(tmp_path.rglob("*add*.nbi"))


def test_a_file_system_without_locks_compiles_unlocked(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Any) -> None:
    """Where flock fails (some network file systems), the loop compiles without the lock
    instead of the step raising."""
    fcntl = pytest.importorskip("fcntl")
    calls = []

    def no_locks(fd: int, op: int) -> None:
        calls.append(op)
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = False
    with fused._locked(tmp_path / "x.lock"):
        ran = True
    assert ran and calls == [fcntl.LOCK_EX]


_TORCH_THREADS = """
import torch, uniopt.torch as ut
torch.set_num_threads(1)
torch.randn(300, 300) @ torch.randn(300, 300)  # torch's pool first, as a forward pass
ps = [torch.nn.Parameter(torch.zeros(300_000)) for _ in range(2)]
for p in ps:
    p.grad = torch.ones_like(p)
opt = ut.Adam(ps)
opt.step()  # large: the compiled loop on numba's thread pool, its first run
print(torch.get_num_threads())
# one optimizer stepped from two threads: its bound step's lists were refilled by one thread
# while the other's pool run read them by address, a segfault (torch's loops race, no crash)
import threading
def work():
    for _ in range(200):
        opt.step()
threads = [threading.Thread(target=work) for _ in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
print(int(opt.state[ps[0]]["step"]))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="numba's pool is one thread here")
def test_numbas_pool_leaves_torchs_thread_count_and_one_optimizer_steps_in_turn() -> None:
    # numba's OpenMP layer sets the process's OpenMP thread count as it starts, and torch,
    # sharing the runtime (its Linux CPU wheels), read it as its own: pinned to one thread, it
    # had two after the first large step (its forward pass's sums then changed)
    import subprocess
    import sys

    pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-c", _TORCH_THREADS], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert proc.stdout.split() == ["1", "401"]


def test_the_integer_half_conversions_are_numpys_and_f16cs() -> None:
    """The float16 conversions a CPU without F16C runs (uniopt.fast.cpu._f16_sw, _to_f16_sw):
    every half widened as NumPy widens it, and floats at and around every half and every
    midpoint between two (ties to even), beyond the largest and below the smallest, rounded
    as NumPy rounds; NaNs quiet, their top payload bits kept, as F16C's, which they equal
    bit for bit where this CPU has it (checked over all 2**32 floats once, by hand)."""
    import numba

    def each(convert: Any, dtype: Any) -> Any:
        """``convert`` of every element, compiled (F16C's only where the CPU has it: numba
        compiles every branch, and F16C's without it aborts)."""
        @numba.njit
        def run(x: Any) -> Any:
            out = np.empty(len(x), dtype)
            for i in range(len(x)):
                out[i] = convert(x[i])
            return out

        return run

    widen, narrow = each(fused._f16_sw, np.float32), each(fused._to_f16_sw, np.uint16)
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    wide = widen(halves)
    nan = np.isnan(halves.view(np.float16))
    np.testing.assert_array_equal(wide[~nan].view(np.uint32),
                                  halves.view(np.float16)[~nan].astype(np.float32).view(np.uint32))
    assert np.isnan(wide[nan]).all() and (wide[nan].view(np.uint32) & 0x400000).all()
    finite = wide[np.isfinite(wide)].astype(np.float64)
    mids = np.unique(finite)
    mids = ((mids[1:] + mids[:-1]) / 2).astype(np.float32)  # exact in float32
    x = np.concatenate([wide, mids, *(np.nextafter(v, w) for v in (wide, mids)
                                       for w in (np.float32(-np.inf), np.float32(np.inf))),
                        np.float32([65519.996, 65520, 65536, 1e30, 2.0 ** -25, 2.0 ** -26,
                                    3 * 2.0 ** -26, -2.0 ** -25]),
                        np.random.default_rng(0).standard_normal(100_000).astype(np.float32)])
    got = narrow(x)
    nan = np.isnan(x)
    with np.errstate(over="ignore"):  # (beyond the largest half: infinity, as meant)
        np.testing.assert_array_equal(got[~nan], x[~nan].astype(np.float16).view(np.uint16))
    want_nan = 0x7E00 | ((x[nan].view(np.uint32) >> 13) & 0x3FF) | (
        (x[nan].view(np.uint32) >> 16) & 0x8000)
    np.testing.assert_array_equal(got[nan], want_nan.astype(np.uint16))
    if fused.F16C:
        np.testing.assert_array_equal(wide.view(np.uint32),
                                      each(fused._f16_hw, np.float32)(halves).view(np.uint32))
        np.testing.assert_array_equal(got, each(fused._to_f16_hw, np.uint16)(x))
