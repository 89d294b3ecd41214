"""Small models: a step's Python work is a fixed amount, whatever the number of leaves; small
trees take the compiled loop (bit for bit the reference path); uniopt.torch keeps torch's step
hooks and profiler label; a jitted step's arguments do not grow with the hyperparameters."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import importlib
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from helpers import (
    assert_same,
    assert_same_state,
    beside_reference,
    expect_compiled,
    reference_path,
)

MLP = [(64, 20), (64,), (64, 64), (64,), (3, 64), (3,)]  # the bench's S1
# rules whose loops test_fused compiles too
RULES = {
    "adamw": uo.adamw(lr=0.01, weight_decay=0.1),
    "adam": uo.adam(lr=0.01),
    "sgd-momentum": uo.sgd(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01),
}


def _tree(shapes: list[tuple[int, ...]], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _python_calls(fn: Callable[[], Any]) -> int:
    """Python-level function calls made while ``fn`` runs (C functions not counted)."""
    count = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event == "call":
            count += 1

    # a garbage collection inside fn would count the finalizers it runs (objects other tests
    # left), which have nothing to do with the step (none runs while the collector is off)
    gc.disable()
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
        gc.enable()
    return count - 1  # fn itself


@pytest.mark.usefixtures("small_steps_compiled")
@pytest.mark.parametrize("name", sorted(RULES))
def test_a_small_step_is_compiled_and_bitwise_the_reference(name: str) -> None:
    params, ref = _tree(MLP), _tree(MLP)
    s, s_ref = uo.setup(RULES[name], params), uo.setup(RULES[name], ref)
    rng = np.random.default_rng(1)
    s, params, s_ref = beside_reference(
        s, params, s_ref, ref, 20,
        lambda k: [rng.standard_normal(p.shape).astype(np.float32) for p in ref])
    assert_same(params, ref)
    assert_same_state(s, s_ref)


@pytest.mark.usefixtures("small_steps_compiled")
def test_python_work_per_step_does_not_grow_with_the_leaves() -> None:
    """A step makes a fixed, small number of Python-level calls: none per leaf."""
    counts = {}
    for n in (6, 60):
        params = _tree((MLP * 10)[:n])
        grads = _tree((MLP * 10)[:n], seed=1)
        state = uo.setup(RULES["adamw"], params)
        for _ in range(3):  # compiled and memoised
            state = uo.update_(state, params, grads)
        with expect_compiled(1):
            counts[n] = _python_calls(lambda: uo.update_(state, params, grads))  # noqa: B023
    assert counts[6] == counts[60], counts
    assert counts[6] <= 25, counts  # 22 today: the rule's lane (fast.cpu.Lane)


def _whole_way(rule: Any) -> None:
    """Forget ``rule``'s lanes: its next step goes the whole way (and makes one again)."""
    rule.memo.pop("cpu-lanes", None)


_LANE_RULES = {**RULES, "adam-scheduled": uo.adam(lr=uo.schedules.cosine(0.1, 30)),
               "nesterov": uo.sgd(lr=0.1, momentum=0.9, nesterov=True)}


# (float32 for every rule, whose loops the tests above compile too; float64 for two)
@pytest.mark.usefixtures("small_steps_compiled")
@pytest.mark.parametrize(("name", "dtype"), [
    *[(name, np.float32) for name in sorted(_LANE_RULES)],
    ("adam-scheduled", np.float64), ("sgd-momentum", np.float64)])
def test_a_steady_step_takes_the_lane_bit_for_bit_the_whole_way(
        name: str, dtype: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step after a rule's first compiled one takes its lane (fast.cpu.Lane: the same
    compiled loop, none of run's per-call working out; run is not called): the same bits as a
    step that goes the whole way, for a fixed and a scheduled rule, in both precisions."""
    from uniopt.fast import cpu

    whole = []
    run = cpu.run
    monkeypatch.setattr(cpu, "run", lambda *a, **k: whole.append(1) or run(*a, **k))
    rule = _LANE_RULES[name]
    a, b = ([x.astype(dtype) for x in _tree(MLP)] for _ in range(2))
    sa, sb = uo.setup(rule, a), uo.setup(rule, b)
    rng = np.random.default_rng(2)
    for k in range(12):
        grads = [rng.standard_normal(p.shape).astype(dtype) * 10.0 ** (k % 3 - 1) for p in a]
        lane = (rule.memo.get("cpu-lanes") or {}).get(np.dtype(dtype).num)
        del whole[:]
        with expect_compiled(1):
            sa = uo.update_(sa, a, grads)
        if k:  # (the first step made it)
            assert isinstance(lane, cpu.Lane) and lane.storage[0] == cpu._kind(np.dtype(dtype))
            assert not whole, "the step went the whole way"
        with expect_compiled(1):
            _whole_way(rule)
            sb = uo.update_(sb, b, [g.copy() for g in grads])
        assert whole
        assert_same(a, b)
        assert_same_state(sa, sb)


@pytest.mark.usefixtures("small_steps_compiled")
def test_a_lanes_kept_coefficients_serve_only_steps_past_the_steady_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule's lane keeps the coefficients of its parts' steady steps (SGD with dampening:
    from its second step, the first undamped): a new state of the same rule, stepped on that
    lane at its first step, gets the first step's numbers, bit for bit the whole way's."""
    from uniopt.fast import cpu

    whole = []
    run = cpu.run
    monkeypatch.setattr(cpu, "run", lambda *a, **k: whole.append(1) or run(*a, **k))
    rule = uo.sgd(lr=0.1, momentum=0.9, dampening=0.5)
    grads = _tree(MLP, seed=3)
    old = _tree(MLP)
    state = uo.setup(rule, old)
    for _ in range(4):
        state = uo.update_(state, old, grads)
    lane = rule.memo["cpu-lanes"][np.dtype(np.float32).num]
    assert lane.fixed.start == 1 and lane.fixed.made is not None
    a, b = _tree(MLP), _tree(MLP)
    del whole[:]
    with expect_compiled(1):
        sa = uo.update_(uo.setup(rule, a), a, grads)
    assert not whole, "the step went the whole way"
    with reference_path():
        sb = uo.update_(uo.setup(rule, b), b, grads)
    assert_same(a, b)
    assert_same_state(sa, sb)


@dataclasses.dataclass(frozen=True)
class _HalvingLr(uo.scale_by_lr):
    """A user's block made from one of ours: its coefficients move at every step, and it does
    not say so (scale_by_lr says its own are steady from step 0)."""

    def coeffs(self, step: int) -> Any:
        return super().coeffs(step)._replace(factor=self.lr * 0.5**step)


@pytest.mark.usefixtures("small_steps_compiled")
def test_a_subclass_that_computes_its_coefficients_anew_is_not_taken_as_steady() -> None:
    """A subclass that computes its coefficients anew without saying from when they are steady
    is taken to move: its lane makes them at every step (it had kept its parent's word, and the
    coefficients of its second step, for good), bit for bit the reference path."""
    from uniopt.base import steady_from

    rule = _HalvingLr(lr=1.0)
    assert steady_from(rule) is None and steady_from(uo.scale_by_lr(lr=1.0)) == 0
    a, b = _tree(MLP), _tree(MLP)
    sa, sb = uo.setup(rule, a), uo.setup(rule, b)
    grads = _tree(MLP, seed=4)
    for _ in range(5):
        with expect_compiled(1):
            sa = uo.update_(sa, a, grads)
        with reference_path():
            sb = uo.update_(sb, b, grads)
        assert_same(a, b)


@pytest.mark.usefixtures("small_steps_compiled")
def test_a_rule_whose_first_steps_were_on_16_bit_leaves_has_a_lane_for_wider_ones() -> None:
    """Leaves no lane takes (float16) leave the rule free to make one for leaves a lane takes:
    one float16 step stored "no lane" for the rule, for good (its float32 steps then went the
    whole way, 14.6 us a step where the lane's take 10.3); a rule with a norm has none."""
    from uniopt.fast import cpu

    rule = uo.sgd(lr=0.1, momentum=0.9)
    half = [x.astype(np.float16) for x in _tree(MLP)]
    uo.update_(uo.setup(rule, half), half, [g.astype(np.float16) for g in _tree(MLP, 1)])
    params = _tree(MLP)
    state = uo.setup(rule, params)
    for _ in range(2):
        state = uo.update_(state, params, _tree(MLP, seed=1))
    assert isinstance(rule.memo["cpu-lanes"][np.dtype(np.float32).num], cpu.Lane)
    clipped = uo.chain(uo.clip_by_norm(1.0), uo.sgd(lr=0.1))
    state = uo.setup(clipped, params)
    for _ in range(2):
        state = uo.update_(state, params, _tree(MLP, seed=1))
    assert clipped.memo.get("cpu-lanes") is False


@pytest.mark.usefixtures("small_steps_compiled")
def test_the_lane_hands_on_what_it_cannot_take_as_the_whole_way_does() -> None:
    """A step the lane cannot take (a read-only, float64 or strided leaf, another count of
    leaves, a slot that is not a list, a slot the rule does not read) goes the whole way: the
    same error, warnings and numbers as where the rule has no lane; the lane wrote nothing."""
    import dataclasses
    import warnings

    from uniopt import fast

    rule = uo.sgd(lr=0.1, momentum=0.9)

    def outcome(lane: bool, spoil: Callable[..., Any]) -> tuple[Any, ...]:
        params, grads = _tree(MLP), _tree(MLP, seed=1)
        state = uo.update_(uo.setup(rule, params), params, grads)  # (its lane made)
        if not lane:
            _whole_way(rule)
        ps, gs, st = spoil(params, grads, state)
        fast._warned.clear()  # (each reason is said once a process: here, in each outcome)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                out = uo.update_(st, ps, gs)
            except (TypeError, ValueError, RuntimeError) as e:
                return "raised", type(e), str(e), [p.copy() for p in params]
        return ("stepped", [str(w.message) for w in seen], [p.copy() for p in params],
                {k: [x.copy() for x in v] for k, v in out.slots.items()})

    def read_only(ps: list[Any], gs: list[Any], st: uo.State) -> Any:
        ps[2].flags.writeable = False
        return ps, gs, st

    def float64_grad(ps: list[Any], gs: list[Any], st: uo.State) -> Any:
        return ps, [*gs[:5], gs[5].astype(np.float64)], st

    def strided_grads(ps: list[Any], gs: list[Any], st: uo.State) -> Any:
        return ps, [np.asfortranarray(g) if g.ndim == 2 else g for g in gs], st

    def fewer_leaves(ps: list[Any], gs: list[Any], st: uo.State) -> Any:
        return ps[:4], gs[:4], uo.setup(rule, ps[:4])

    def tuple_slot(ps: list[Any], gs: list[Any], st: uo.State) -> Any:
        return ps, gs, dataclasses.replace(st, slots={k: tuple(v) for k, v in st.slots.items()})

    def unread_slot(ps: list[Any], gs: list[Any], st: uo.State) -> Any:
        return ps, gs, dataclasses.replace(
            st, slots={**st.slots, "other": [np.zeros_like(p) for p in ps]})

    for spoil in (read_only, float64_grad, strided_grads, fewer_leaves, tuple_slot,
                  unread_slot):
        with_lane, without = outcome(True, spoil), outcome(False, spoil)
        assert with_lane[:2] == without[:2], (spoil.__name__, with_lane[:3], without[:3])
        if with_lane[0] == "raised":
            assert with_lane[2] == without[2], spoil.__name__
            assert_same(with_lane[3], without[3])
        else:
            assert_same(with_lane[2], without[2])
            assert sorted(with_lane[3]) == sorted(without[3])
            for k in with_lane[3]:
                assert_same(with_lane[3][k], without[3][k])


@pytest.mark.usefixtures("small_steps_compiled")
def test_two_threads_stepping_with_one_rule_each_get_their_own_step() -> None:
    """A rule shared by two threads (a search over seeds, each its own state), however often
    the threads switch: each thread's arrays step as they would alone (the next test makes the
    interleaving that matters happen every time)."""
    import threading

    rule = RULES["adamw"]
    runs = {}
    for k in range(2):  # each alone first: the numbers each thread must get
        params, state = _tree(MLP, seed=k), uo.setup(rule, _tree(MLP, seed=k))
        for j in range(200):
            state = uo.update_(state, params, _tree(MLP, seed=10 * k + j % 7))
        runs[k] = params

    out: dict[int, list[Any]] = {}

    def work(k: int) -> None:
        params, state = _tree(MLP, seed=k), uo.setup(rule, _tree(MLP, seed=k))
        for j in range(200):
            state = uo.update_(state, params, _tree(MLP, seed=10 * k + j % 7))
        out[k] = params

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    for k in range(2):
        assert_same(out[k], runs[k])


@pytest.mark.usefixtures("small_steps_compiled")
def test_a_lane_step_inside_another_keeps_each_its_own_arrays(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another step of the same rule between a lane step's check and its loop (another thread's,
    made to happen here, in this thread, every time): each steps its own arrays, as one after
    the other does. A table of addresses kept on the lane was the other step's by then."""
    from uniopt.fast import cpu

    rule = RULES["adamw"]
    a, b, ra, rb = _tree(MLP, seed=0), _tree(MLP, seed=1), _tree(MLP, seed=0), _tree(MLP, seed=1)
    ga, gb = _tree(MLP, seed=2), _tree(MLP, seed=3)
    sa, sb, sra, srb = (uo.setup(rule, x) for x in (a, b, ra, rb))
    for _ in range(2):  # (the lane made)
        sa, sb = uo.update_(sa, a, ga), uo.update_(sb, b, gb)
        sra, srb = uo.update_(sra, ra, ga), uo.update_(srb, rb, gb)
    inner: list[Any] = []
    check = cpu._check

    def between(*args: Any) -> Any:
        code = check(*args)
        if inner:
            inner.pop()()
        return code

    with monkeypatch.context() as m:
        m.setattr(cpu, "_check", between)
        inner.append(lambda: uo.update_(sb, b, gb))
        with expect_compiled(2):
            uo.update_(sa, a, ga)
    assert not inner
    uo.update_(srb, rb, gb)
    uo.update_(sra, ra, ga)
    assert_same(a, ra)
    assert_same(b, rb)


@pytest.mark.usefixtures("small_steps_compiled")
def test_a_schedule_that_changes_the_leaves_runs_before_the_check() -> None:
    """A schedule is the user's code, run as a step resolves its numbers: a leaf it puts in the
    params' list (a read-only one here) is seen by the check before the loop, as on the whole
    way (the lane checked, then resolved: it wrote the read-only array, and past the end of a
    shorter one)."""
    params, grads = _tree(MLP), _tree(MLP, seed=1)
    swap: list[Any] = []

    def lr(step: Any) -> float:
        if swap:
            params[3] = swap.pop()
        return 0.01

    rule = uo.sgd(lr=lr, momentum=0.9)
    state = uo.setup(rule, params)
    for _ in range(3):
        state = uo.update_(state, params, grads)
    frozen = params[3].copy()
    frozen.flags.writeable = False
    before = [p.copy() for p in params]
    swap.append(frozen)
    with pytest.raises(TypeError, match=r"params\[3\] in place: the NumPy array is read-only"):
        uo.update_(state, params, grads)
    assert_same(params, [*before[:3], frozen, *before[4:]])
    assert_same([frozen], [before[3]])


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("pure", [True, False], ids=["update", "update_"])
@pytest.mark.parametrize("name", sorted(RULES))
def test_the_reference_path_does_little_python_work_per_leaf(name: str, pure: bool,
                                                              lib: str) -> None:
    """On the reference path (JAX, torch off the CPU, any array-API library, a small model's
    first steps) a leaf costs its kernels' calls and a few checks: the names of the leaves,
    the slots' expected shapes and each array's library and dtype are found once per tree
    structure, rule and (type, dtype), not per step (Adam made 86 calls a leaf on NumPy
    arrays before, 90 on torch tensors in place; AdamW 98 and 97)."""
    convert: Callable[[np.ndarray], Any] = lambda a: a  # noqa: E731
    if lib == "torch":
        convert = pytest.importorskip("torch").from_numpy
    # counted with the libraries the engine looks for in sys.modules loaded, whichever tests
    # ran before in this process: a check written as a generator over a step's coefficients
    # or leaves once made 19 calls more where JAX and torch.distributed were loaded (CI's
    # count reached this bound, a run here was 281); flax NNX's Variable is looked for too
    for module in ("jax", "torch.distributed.tensor", "flax.nnx"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    counts = {}
    for n in (6, 12):
        params = [convert(a) for a in _tree((MLP * 2)[:n])]
        grads = [convert(a) for a in _tree((MLP * 2)[:n], seed=1)]
        state = uo.setup(RULES[name], params)

        def step(grads: list[Any] = grads) -> None:
            nonlocal state, params
            if pure:
                state, params = uo.update(state, params, grads)
            else:
                state = uo.update_(state, params, grads)

        with reference_path():
            step()
            counts[n] = _python_calls(step)
    per_leaf = (counts[12] - counts[6]) / 6
    # the kernels' own calls (Adam: its kernel, lerp, ema_sq, fma) and ~20 of the engine's
    assert per_leaf <= 36, counts  # 22-33 today
    # 203-281 today (~80 for the step whatever its leaves), whatever libraries are loaded: the
    # bound catches a check that makes a call more per coefficient or leaf where one is
    assert counts[6] <= 290, counts


@pytest.mark.usefixtures("small_steps_compiled")
def test_torch_step_python_work_does_not_grow_and_hooks_still_run() -> None:
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut
    from uniopt.torch import plans

    counts = {}
    for n in (2, 4, 6, 12, 30, 60):  # gradients as views, and (from plans.ADDRESS_MIN) by address
        ps = [torch.nn.Parameter(torch.from_numpy(x)) for x in _tree((MLP * 10)[:n])]
        opt = ut.AdamW(ps, lr=1e-3)
        grads = [torch.from_numpy(x) for x in _tree((MLP * 10)[:n], seed=1)]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g
        for _ in range(3):
            opt.step()
        with expect_compiled(2):
            # the same gradient tensors as the last step (their views kept), then new ones
            counts[n] = _python_calls(opt.step)
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            counts[-n] = _python_calls(opt.step)
    assert 4 < plans.ADDRESS_MIN <= 6
    for a, b in ((2, 4), (6, 12), (30, 60)):
        assert counts[a] == counts[b] and counts[-a] == counts[-b], counts
    # the rule, the coefficients, the loop: 32-38 today (39-45 when every step resolved the
    # whole rule and new gradients were kept as SeenGrads at every step)
    assert max(counts.values()) <= 40, counts

    # torch's step hooks and profiler label, as torch.optim has them
    seen: list[str] = []
    calls: list[Any] = []  # the hooks' arguments, as torch's wrapper hands them over

    def hook(name: str) -> Callable[..., None]:
        def record(o: Any, a: Any, k: Any) -> None:  # (a pair returned would replace a, k)
            seen.append(name)
            calls.append((o, a, k))

        return record

    pre = opt.register_step_pre_hook(hook("pre"))
    post = opt.register_step_post_hook(hook("post"))
    before = ps[0].detach().clone()
    opt.step()
    assert seen == ["pre", "post"] and not torch.equal(ps[0].detach(), before)
    assert calls == [(opt, (opt,), {})] * 2  # torch's: no closure, none in the arguments
    closure = lambda: 1.0  # noqa: E731
    assert opt.step(closure) == 1.0 and calls[2:] == [(opt, (opt, closure), {})] * 2
    del seen[2:]
    pre.remove()
    post.remove()
    opt.step()
    assert seen == ["pre", "post"]
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(lambda o, a, k: seen.append("global"))
    try:
        opt.step()
    finally:
        handle.remove()
    assert seen[-1] == "global"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert any(e.name == "Optimizer.step#AdamW.step" for e in prof.events())
    # an LR scheduler sees the step (no "lr_scheduler.step() before optimizer.step()" warning)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 5e-4


@pytest.mark.usefixtures("small_steps_compiled")
def test_torch_gradient_views_are_kept_while_the_tensors_are_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A small model's gradients as the engine gets them (their views; a bigger group's
    addresses, kept alike) are kept from step to step while each gradient is the same tensor
    at the same address (zero_grad(set_to_none=False)), and looked at anew when one is
    replaced, its memory swapped, its shape or its layout changed; the parameters' views when
    their memory is swapped, the slots' when a state is loaded. Every step's numbers are those
    of an optimizer handed new gradient tensors each step, bit for bit, and autograd sees each
    write."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut
    from uniopt import backend
    from uniopt.torch import plans

    made: list[int] = []
    real_views, real_addresses = backend.numpy_views, plans.addresses
    monkeypatch.setattr(backend, "numpy_views",
                        lambda lists: made.append(len(lists[0])) or real_views(lists))
    monkeypatch.setattr(plans, "addresses",
                        lambda gs, *a: made.append(len(gs)) or real_addresses(gs, *a))
    start = _tree(MLP)
    kept = [torch.nn.Parameter(torch.tensor(x)) for x in start]
    fresh = [torch.nn.Parameter(torch.tensor(x)) for x in start]
    opt = ut.SGD(kept, lr=0.1, momentum=0.9, weight_decay=0.01)
    ref = ut.SGD(fresh, lr=0.1, momentum=0.9, weight_decay=0.01)
    for p in kept:
        p.grad = torch.zeros_like(p)
    rng = np.random.default_rng(3)

    def step(k: int, change: Callable[[list[Any]], None] | None = None) -> None:
        values = [torch.from_numpy(rng.standard_normal(p.shape).astype(np.float32))
                  for p in kept]
        for p, v in zip(kept, values, strict=True):
            p.grad.copy_(v)  # in place, as backward accumulates
        if change is not None:
            change(values)
        for q, v in zip(fresh, values, strict=True):
            q.grad = v.clone()
        made.clear()
        opt.step()
        ref.step()
        for p, q in zip(kept, fresh, strict=True):
            assert torch.equal(p.detach(), q.detach()), k
            assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])

    step(0)
    step(1)  # the plan is built at the first step: its gradient views kept from the second
    step(2)
    assert made == [6]  # ref's only
    y = (kept[0] * kept[0]).sum()
    step(3)
    assert made == [6]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    # one gradient's memory swapped (the old memory freed), then one gradient replaced
    step(4, lambda v: kept[2].grad.set_(v[2].clone()))
    assert made == [6, 6]
    step(5)
    step(6, lambda v: setattr(kept[4], "grad", v[4].clone()))
    assert made == [6, 6]
    # one resized in place (the same address): seen, refused, nothing written
    before = [p.detach().clone() for p in kept]
    kept[5].grad.resize_(1)
    with pytest.raises(ValueError, match=r"params\[5\] has shape \(1,\)"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(kept, before, strict=True))
    kept[5].grad.resize_(3)
    step(7)
    assert made == [6, 6]
    # a parameter's memory swapped, in both: new plans, gradients viewed anew
    for p, q in zip(kept[:2], fresh[:2], strict=True):
        p.data, q.data = p.detach().clone(), q.detach().clone()
    step(8)
    step(9)
    step(10)
    assert made == [6]
    # the state loaded from the other optimizer: a new plan
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # (torch's load keeps its tensors)
    step(11)
    step(12)
    step(13)
    assert made == [6]
    # a gradient transposed where it is (the same tensor, address and shape): looked at anew,
    # then kept in its new layout
    step(14, lambda v: (kept[2].grad.t_(), v.__setitem__(2, v[2].t().contiguous())))
    assert made == [6, 6, 6]  # (no addresses for a strided gradient: views)
    step(15)
    assert made == [6]


@pytest.mark.usefixtures("small_steps_compiled")
@pytest.mark.parametrize("by_address", [False, True], ids=["views", "addresses"])
def test_a_torch_group_bound_to_its_loop_steps_as_the_engine_does(
    monkeypatch: pytest.MonkeyPatch, by_address: bool,
) -> None:
    """After its first compiled step a group's loop is bound to its parameters' and slots'
    views (fast.cpu.Bound) and later steps call it directly. Every step equals that of an
    optimizer whose groups never bind, bit for bit: with gradients kept or new, after the lr
    changes, after nesterov is switched on (the same slots, another kernel: the bound loop of
    the old rule must not run), after a slot is replaced, after a parameter's or a slot's
    memory is swapped under the same tensor; and a bad gradient is refused by both alike, with
    nothing written."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut
    from uniopt.fast import cpu
    from uniopt.torch import plans

    if by_address:
        monkeypatch.setattr(plans, "ADDRESS_MIN", 1)
    calls: list[bool] = []
    real_call, real_bind = cpu.Bound.__call__, cpu.bind
    monkeypatch.setattr(cpu.Bound, "__call__",
                        lambda self, *a: calls.append(real_call(self, *a)) or calls[-1])
    start = _tree(MLP)
    ps = [torch.nn.Parameter(torch.tensor(x)) for x in start]
    qs = [torch.nn.Parameter(torch.tensor(x)) for x in start]
    opt = ut.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01)
    ref = ut.SGD(qs, lr=0.1, momentum=0.9, weight_decay=0.01)
    rng = np.random.default_rng(5)

    def step(k: int, keep: bool = False, bound: bool = True) -> None:
        values = [torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
                  for x in start]
        for p, q, v in zip(ps, qs, values, strict=True):
            if keep and p.grad is not None:
                p.grad.copy_(v)
            else:
                p.grad = v.clone()
            q.grad = v.clone()
        monkeypatch.setattr(cpu, "bind", lambda *a: None)
        ref.step()
        monkeypatch.setattr(cpu, "bind", real_bind)
        calls.clear()
        opt.step()
        assert calls == ([True] if bound else []), k
        for p, q in zip(ps, qs, strict=True):
            assert torch.equal(p.detach(), q.detach()), k
            assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])

    step(0, bound=False)  # the engine's step, which binds
    for k in range(1, 4):
        step(k, keep=True)
    step(4)
    for group in (*opt.param_groups, *ref.param_groups):
        group["lr"] = 0.05
    step(5, bound=False)  # a new rule: the engine's step, bound anew
    step(6)
    for group in (*opt.param_groups, *ref.param_groups):
        group["nesterov"] = True
    step(7, bound=False)
    step(8)
    for st in (opt.state[ps[2]], ref.state[qs[2]]):
        st["momentum_buffer"] = st["momentum_buffer"].clone() * 0.5
    step(9, bound=False)  # a new plan
    step(10)
    for p, q in zip(ps[:2], qs[:2], strict=True):
        p.data, q.data = p.detach().clone(), q.detach().clone()
    step(11, bound=False)
    step(12)
    for p in ps[3:5]:  # the same numbers in new memory, the old freed: a new plan, new views
        buf = opt.state[p]["momentum_buffer"]
        buf.set_(buf.clone())
    step(13, bound=False)
    step(14)
    before = [p.detach().clone() for p in ps]
    slots = [opt.state[p]["momentum_buffer"].clone() for p in ps]
    ps[3].grad.resize_(2)  # (the same memory: a step that looked only at it would run)
    with pytest.raises(ValueError, match=r"params\[3\] has shape \(2,\)"):
        opt.step()
    for p, b, s in zip(ps, before, slots, strict=True):
        assert torch.equal(p.detach(), b) and torch.equal(opt.state[p]["momentum_buffer"], s)
    step(15)


@pytest.mark.usefixtures("small_steps_compiled")
@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adagrad"])
def test_a_bound_step_makes_steady_coefficients_once(
    monkeypatch: pytest.MonkeyPatch, name: str,
) -> None:
    """A group's bound loop (fast.cpu.Bound) makes its coefficients once where its parts say
    they stop moving (Part.steady: SGD's from its second step, torch's first undamped) and at
    every step where they do not (Adagrad's decaying lr, numbers read from the group after an
    lr changed between steps): every step equals that of an optimizer whose group never
    binds, bit for bit."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut
    from uniopt.fast import cpu

    kwargs = {"SGD": {"lr": 0.1, "momentum": 0.9, "dampening": 0.5, "weight_decay": 0.01},
              "RMSprop": {"lr": 0.01, "momentum": 0.5}, "Adagrad": {"lr": 0.1, "lr_decay": 0.1}}
    start = _tree(MLP)
    ps = [torch.nn.Parameter(torch.tensor(x)) for x in start]
    qs = [torch.nn.Parameter(torch.tensor(x)) for x in start]
    opt, ref = getattr(ut, name)(ps, **kwargs[name]), getattr(ut, name)(qs, **kwargs[name])
    rng = np.random.default_rng(7)
    real_bind = cpu.bind
    for k in range(8):
        if k == 5:
            for group in (*opt.param_groups, *ref.param_groups):
                group["lr"] *= 0.5
        for p, q, x in zip(ps, qs, start, strict=True):
            p.grad = torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
            q.grad = p.grad.clone()
        monkeypatch.setattr(cpu, "bind", lambda *a: None)
        ref.step()
        monkeypatch.setattr(cpu, "bind", real_bind)
        opt.step()
        for p, q in zip(ps, qs, strict=True):
            assert torch.equal(p.detach(), q.detach()), k
            for key, v in opt.state[p].items():
                assert torch.equal(v, ref.state[q][key]), (k, key)
        lane = opt._plans[0].lane
        assert ref._plans[0].lane is None and lane is not None, k
        # (from the lr's change the group's rule reads its numbers from the group, as under a
        # torch scheduler: coefficients made at every step)
        made = lane.fixed is not None and lane.fixed.made is not None
        assert made == (name != "Adagrad" and 0 < k < 5), k


@pytest.mark.usefixtures("small_steps_compiled")
def test_a_bound_step_before_its_steady_step_makes_its_coefficients_anew() -> None:
    """A bound loop called at a step before its parts' steady one (a count loaded from an
    earlier point) makes that step's coefficients, not those it keeps for later steps."""
    from uniopt.engine import resolve
    from uniopt.fast import cpu

    rule = uo.sgd(lr=0.1, momentum=0.9, dampening=0.5)
    start, grads = _tree(MLP), _tree(MLP, seed=1)
    params = [x.copy() for x in start]
    state = uo.setup(rule, params)
    with expect_compiled(1):
        uo.update_(state, params, grads)  # (compiles the loop the bound one calls)
    bound = cpu.bind(resolve(rule, 0), params, state.slots, rule.memo, fixed=True)
    assert bound is not None and bound.fixed is not None and bound.fixed.start == 1
    for step in (1, 2, 0):
        before = [x.copy() for x in params]
        slots = {k: [b.copy() for b in v] for k, v in state.slots.items()}
        assert bound(step, grads)
        expected = [x.copy() for x in before]
        with reference_path():
            uo.update_(uo.State(rule, step, slots, state.treedef), expected, grads)
        assert_same(params, expected)


@pytest.mark.usefixtures("small_steps_compiled")
def test_torch_gradients_go_by_address_only_where_each_is_plain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Gradients reach the compiled loop by the addresses of their memory only where each is a
    plain, dense, contiguous CPU tensor of its parameter's dtype and shape, with memory: with a
    transposed, an expanded (stride 0), a negative-bit, a ZeroTensor or a subclass's gradient
    among them, none goes by address, and every step equals that of an optimizer handed plain
    copies, bit for bit; so does a group whose parameters are at two step counts (two engine
    calls, each handed its own gradients' addresses)."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut
    from uniopt import backend
    from uniopt.torch import plans

    got: list[Any] = []
    real = plans.addresses
    monkeypatch.setattr(plans, "addresses", lambda gs, *a: got.append(real(gs, *a)) or got[-1])
    shapes = (MLP * 5)[:plans.ADDRESS_MIN]  # as few as go by address
    start = _tree(shapes)
    ps = [torch.nn.Parameter(torch.tensor(x)) for x in start]
    qs = [torch.nn.Parameter(torch.tensor(x)) for x in start]
    opt = ut.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01)
    ref = ut.SGD(qs, lr=0.1, momentum=0.9, weight_decay=0.01)
    rng = np.random.default_rng(4)

    def step(odd: dict[int, Callable[[Any], Any]], only: range = range(100)) -> None:
        for i in range(len(shapes)):
            g = torch.from_numpy(rng.standard_normal(start[i].shape).astype(np.float32))
            ps[i].grad = odd[i](g) if i in odd else g if i in only else None
            h = ps[i].grad
            qs[i].grad = (None if h is None else torch.zeros(h.shape) if h._is_zerotensor()
                          else torch.tensor(h.tolist(), dtype=torch.float32))
        ref.step()
        got.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the transposed one: the reference path
            opt.step()
        for p, q in zip(ps, qs, strict=True):
            assert torch.equal(p.detach(), q.detach())
            if q in ref.state:
                assert torch.equal(opt.state[p]["momentum_buffer"],
                                   ref.state[q]["momentum_buffer"])

    step({}, only=range(0, len(shapes), 2))  # half the parameters: their first step
    step({})  # the others' first, their second (a new plan: its first step looks at each)
    step({})
    assert [type(a) for a in got] == [backend.Addressed]
    assert len(opt._plans[0].runs) == 2  # one per step count
    odd = {
        0: lambda g: torch.from_numpy(np.ascontiguousarray(g.numpy().T)).t(),  # (64, 20)
        1: lambda g: g[:1].expand(64),
        3: lambda g: torch._neg_view(-g),
        4: lambda g: torch._efficientzerotensor(g.shape),
        5: lambda g: torch.nn.Parameter(g, requires_grad=False),
    }
    for i, make in odd.items():
        step({i: make})
        assert got == [None], i
    step({})
    assert [type(a) for a in got] == [backend.Addressed]


def test_a_jitted_step_takes_one_array_of_numbers() -> None:
    """However many hyperparameters a rule has, its numbers reach jax.jit as one array."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    params = [jnp.asarray(x) for x in _tree(MLP)]
    few = uo.setup(uo.sgd(lr=0.1), params)
    many = uo.setup(uo.chain(uo.clip_by_global_norm(1.0), uo.adamw(lr=1e-3, weight_decay=0.1,
                                                                   amsgrad=True)), params)
    for state in (few, many):
        slots = sum(len(v) for v in state.slots.values())
        assert len(jax.tree.leaves(state)) == 1 + slots + 1  # step, slots, the numbers
    grads = [jnp.asarray(x) for x in _tree(MLP, seed=1)]
    step = jax.jit(uo.update, donate_argnums=(0, 1))
    state, p = step(many, params, grads)
    numbers = jax.tree.leaves(state)[-1]
    state, p = step(state, p, grads)
    # passed on as it came out: the next step's flatten reused it, nothing was rebuilt
    assert jax.tree.leaves(state)[-1].shape == numbers.shape
    assert state.rule.memo["jax"][0] is jax.tree.leaves(state)[-1]
    assert float(state.rule.transforms[1].lr) == pytest.approx(1e-3)


def test_device_numbers_read_where_the_host_needs_them() -> None:
    """After jit the numbers stay on the device until used: float(), NumPy and JAX take them,
    an eager step and adjust read them, and both agree with the jitted step."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from uniopt.hyper import DeviceNumber

    params = [jnp.asarray(x) for x in _tree(MLP)]
    grads = [jnp.asarray(x) for x in _tree(MLP, seed=1)]
    state = uo.setup(uo.adamw(lr=1e-3, weight_decay=0.1), params)
    state, params = jax.jit(uo.update)(state, params, grads)
    lr = state.rule.lr
    assert isinstance(lr, DeviceNumber)
    assert float(lr) == pytest.approx(1e-3)
    assert np.asarray(lr).item() == pytest.approx(1e-3)
    assert float(jnp.asarray(lr) * 2) == pytest.approx(2e-3)
    eager_state, eager = uo.update(state, params, grads)
    jit_state, jitted = jax.jit(uo.update)(state, params, grads)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    adjusted = uo.adjust(jit_state, weight_decay=0.2)
    assert float(adjusted.rule.weight_decay) == 0.2
    assert float(adjusted.rule.lr) == pytest.approx(1e-3)
    state, _ = jax.jit(uo.update)(adjusted, jitted, grads)
    assert float(state.rule.weight_decay) == pytest.approx(0.2)


def test_a_short_run_keeps_the_reference_path_until_compiling_pays(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """A small step whose loop is not at hand runs on the reference path for its rule's first
    COMPILE_AFTER small steps, then compiles; a rule whose loop is at hand takes it at once."""
    from uniopt.fast import cpu

    monkeypatch.setattr(cpu, "COMPILE_AFTER", 3)
    monkeypatch.setenv("UNIOPT_CACHE_DIR", str(tmp_path))  # nothing on disk
    # a recipe no other test compiles
    make = lambda: uo.chain(uo.scale_by_rms(alpha=0.5), uo.scale(0.25),  # noqa: E731
                            uo.scale_by_adadelta(rho=0.5), uo.scale_by_lr(0.3))
    params, ref = _tree(MLP), _tree(MLP)
    grads = _tree(MLP, seed=1)
    state, s_ref = uo.setup(make(), params), uo.setup(make(), ref)
    with expect_compiled(0):
        for _ in range(3):
            state = uo.update_(state, params, grads)
    with expect_compiled(2):
        for _ in range(2):
            state = uo.update_(state, params, grads)
    with reference_path():
        for _ in range(5):
            s_ref = uo.update_(s_ref, ref, grads)
    assert_same(params, ref)
    assert_same_state(state, s_ref)
    with expect_compiled(1):  # another record of the same recipe: its loop is at hand
        uo.update_(uo.setup(make(), params), params, grads)


def test_the_small_steps_of_an_optimizers_groups_count_together(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """COMPILE_AFTER counts a loop's small steps over every group of a uniopt.torch optimizer:
    one-parameter groups (layer-wise learning rates) have a rule each, each step small, and
    counted apart they ran the reference path for COMPILE_AFTER steps of the optimizer (ten
    times torch's for-loop, for 2,000 steps with 100 groups). 12 groups,
    COMPILE_AFTER 20: the loop from the 21st group step (in the second optimizer step), the
    numbers torch's to the bit (SGD with momentum, whose arithmetic the two paths share)."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut
    from uniopt.fast import cpu

    monkeypatch.setattr(cpu, "COMPILE_AFTER", 20)
    monkeypatch.setenv("UNIOPT_CACHE_DIR", str(tmp_path))  # nothing on disk
    monkeypatch.setattr(cpu, "_FUSED", {})  # nor compiled in this process
    start = _tree(MLP) + _tree(MLP, seed=3)
    ps = [torch.nn.Parameter(torch.tensor(x)) for x in start]
    qs = [torch.nn.Parameter(torch.tensor(x)) for x in start]
    groups = lambda xs: [{"params": [x], "lr": 0.1 * 0.8 ** i}  # noqa: E731
                         for i, x in enumerate(xs)]
    opt = ut.SGD(groups(ps), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    ref = torch.optim.SGD(groups(qs), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3,
                          foreach=False)
    ran = []
    for k in range(5):
        for p, q, g in zip(ps, qs, _tree(MLP + MLP, seed=10 + k), strict=True):
            p.grad, q.grad = torch.tensor(g), torch.tensor(g)
        before = cpu.STEPS
        opt.step()
        ref.step()
        ran.append(cpu.STEPS - before)
        assert all(torch.equal(p, q) for p, q in zip(ps, qs, strict=True)), k
    assert ran == [0, 4, 12, 12, 12]  # (12 group steps, then 8 more on the reference path)
    # rules apart (a script's runs, a search's trials: `uniopt compare`'s 2,000 updates a
    # problem) count apart: three rules of another loop, 8 small steps each, compile nothing
    params, g = _tree(MLP), _tree(MLP, seed=1)
    with expect_compiled(0):
        for _ in range(3):
            state = uo.setup(uo.sgd(lr=0.1, momentum=0.5), params)
            for _ in range(8):
                state = uo.update_(state, params, g)


@pytest.mark.usefixtures("small_steps_compiled")
@pytest.mark.parametrize("name", ["NAdam", "ASGD"])
def test_torch_classes_with_carried_numbers_keep_their_rule(name: str) -> None:
    """NAdam's product of momenta and ASGD's eta carry numbers from step to step. With constant
    hyperparameters the group's rule stays the same object from step to step (a new one each
    step cost a small model's step some 200 us: no compiled loop stays bound, and the rule is
    built and validated anew), past the step where NAdam's product becomes negligible; the
    numbers stay torch's."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    start = _tree(MLP)
    ps = [torch.nn.Parameter(torch.tensor(x, dtype=torch.float64)) for x in start]
    qs = [torch.nn.Parameter(torch.tensor(x, dtype=torch.float64)) for x in start]
    opt, ref = getattr(ut, name)(ps, lr=0.01), getattr(torch.optim, name)(qs, lr=0.01)
    rng = np.random.default_rng(6)
    rules = []
    for _ in range(100):  # NAdam's product is below 2**-60 from about step 60
        for p, q in zip(ps, qs, strict=True):
            p.grad = torch.from_numpy(rng.standard_normal(p.shape))
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        rules.append(opt._rule(opt.param_groups[0])[0])
    assert all(r is rules[2] for r in rules[2:])
    assert opt._plans[0].lane is not None
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.usefixtures("small_steps_compiled")
@pytest.mark.parametrize(("count", "shape"), [
    (6, (64, 64)),  # by address: known again through weak references only
    (2, (256, 256)),  # as views, too large to keep
    (2, (8, 8)),  # as views, small enough to keep (the views keep the memory, not the tensor)
])
def test_zero_grad_frees_the_gradients_of_the_last_step(count: int,
                                                        shape: tuple[int, int]) -> None:
    """``zero_grad()``'s default (``set_to_none=True``) frees the last step's gradient tensors,
    as after torch.optim's step, so the next backward can reuse their memory (a small group's
    views, at most plans.KEEP_VIEWS elements, keep theirs until the next step); the same
    gradients stepped again are known again, and the numbers are those of new tensors."""
    torch = pytest.importorskip("torch")
    import weakref

    import uniopt.torch as ut

    ps = [torch.nn.Parameter(torch.ones(shape)) for _ in range(count)]
    opt = ut.AdamW(ps, lr=1e-3)
    refs = []
    for k in range(3):
        for p in ps:
            p.grad = torch.full(shape, float(k + 1))
        opt.step()
        refs = [weakref.ref(p.grad) for p in ps]
        opt.zero_grad()
    assert all(r() is None for r in refs)
    # the same gradients stepped twice (set_to_none=False): the second step knows them again
    for p in ps:
        p.grad = torch.full(shape, 0.5)
    opt.step()
    before = [p.detach().clone() for p in ps]
    opt.step()
    ref = ut.AdamW([torch.nn.Parameter(torch.ones(shape))], lr=1e-3)
    for g in (1.0, 2.0, 3.0, 0.5, 0.5):
        ref.param_groups[0]["params"][0].grad = torch.full(shape, g)
        ref.step()
    assert all(torch.equal(p.detach(), ref.param_groups[0]["params"][0].detach()) for p in ps)
    assert not torch.equal(ps[0].detach(), before[0])


@pytest.mark.usefixtures("small_steps_compiled")
def test_numbers_a_torch_lr_scheduler_writes_are_read_not_remade(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch ``lr_scheduler`` writes a new lr (OneCycleLR new betas too) into the group at
    every step. The group's rule is made once and reads them, on the compiled loop, bit for bit
    the rule made anew for each value (a group that never reads live); numbers that stop
    changing go back into a rule of their own after ``STEADY`` steps; a number that becomes or
    stops being 0 (a block comes or goes) or becomes a tensor makes the rule anew; a bad value
    is refused before anything is written, saying where it came from."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut
    from uniopt.torch import optimizer

    monkeypatch.setattr(optimizer, "STEADY", 5)
    made: dict[str, int] = {"live": 0, "remade": 0}
    real = ut.AdamW._group_rule

    def counted(self: Any, group: dict[str, Any]) -> Any:
        made["remade" if vars(self).get("_live_keys") else "live"] += 1
        return real(self, group)

    monkeypatch.setattr(ut.AdamW, "_group_rule", counted)
    start = _tree(MLP)
    ps = [torch.nn.Parameter(torch.tensor(x)) for x in start]
    qs = [torch.nn.Parameter(torch.tensor(x)) for x in start]
    opt = ut.AdamW(ps, lr=0.01, weight_decay=0.1)
    ref = ut.AdamW(qs, lr=0.01, weight_decay=0.1)
    monkeypatch.setattr(ref, "_live_keys", lambda group: frozenset())  # remade for each value
    rng = np.random.default_rng(3)

    def steps(n: int, *scheds: Any) -> None:
        for _ in range(n):
            for p, q in zip(ps, qs, strict=True):
                g = torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32))
                p.grad, q.grad = g, g.clone()
            opt.step()
            ref.step()
            for s in scheds:
                s.step()
        for p, q in zip(ps, qs, strict=True):
            assert torch.equal(p.detach(), q.detach())
            for name in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt.state[p][name], ref.state[q][name])

    one_cycle = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=200)
                 for o in (opt, ref)]
    with expect_compiled(40):
        steps(20, *one_cycle)  # lr and betas[0] change at every step
    # made: checking the constructor's values, at the first step, then once or twice more
    # (lr and betas read live; OneCycleLR's first steps may change one of them alone)
    assert made["live"] <= 4 and made["remade"] >= 20, made
    group = opt.param_groups[0]
    assert opt._rules[id(group)].steady is not None  # reading them
    steps(6)  # unchanged for STEADY steps: a rule holding them again
    assert opt._rules[id(group)].steady is None
    before = made["live"]
    for o in (opt, ref):
        o.param_groups[0]["weight_decay"] = 0.0  # the decay block goes: a rule anew
    steps(2)
    for o in (opt, ref):
        o.param_groups[0]["weight_decay"] = 0.05
        o.param_groups[0]["lr"] = torch.tensor(0.02)  # a tensor lr: read by value, not live
    steps(2)
    for o in (opt, ref):
        o.param_groups[0]["lr"] = 0.02
    cosine = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30) for o in (opt, ref)]
    steps(10, *cosine)
    assert made["live"] - before <= 5, made

    # a value the rule reads is checked at each step, before anything is written
    saved = [p.detach().clone() for p in ps]
    state = copy.deepcopy(opt.state_dict()["state"])
    group["lr"] = -0.5
    with pytest.raises(ValueError, match=r"lr must be >= 0, got -0\.5 \(the value param "
                                         r"group 0 holds at step 40\)"):
        opt.step()
    assert all(torch.equal(p.detach(), s) for p, s in zip(ps, saved, strict=True))
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[i][k], v) for i, st in state.items() for k, v in st.items())


def test_a_small_torch_tree_steps_on_one_path_whether_the_loop_is_at_hand_or_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``uo.update_`` on a small tree of torch tensors takes the reference path's torch
    operations at every step, even where the rule's compiled loop is at hand (compiled in this
    process, or found on disk): torch's sqrt is not the loop's, so the numbers depended on the
    kernel cache, and a run resumed in a new process left the one that never stopped (100 of
    2,048 params after 600 steps)."""
    torch = pytest.importorskip("torch")
    from uniopt.fast import cpu

    rule = uo.adam(lr=1e-3)
    monkeypatch.setattr(cpu, "COMPILE_AFTER", 1)
    arrays = _tree(MLP)
    state = uo.setup(rule, arrays)
    for _ in range(3):  # the loop compiled, at hand for every small step of the rule
        state = uo.update_(state, arrays, _tree(MLP, seed=1))

    def run() -> list[Any]:
        ps = [torch.from_numpy(a) for a in _tree(MLP)]
        s = uo.setup(rule, ps)
        for k in range(4):
            s = uo.update_(s, ps, [torch.from_numpy(g) for g in _tree(MLP, seed=k + 1)])
        return ps

    with expect_compiled(0):
        at_hand = run()
    monkeypatch.setattr(cpu, "COMPILE_AFTER", None)  # never at hand
    for a, b in zip(at_hand, run(), strict=True):
        assert torch.equal(a, b)
