"""Averaged weights (ema, polyak, lookahead) against the peers that define them: torch's
AveragedModel (EMA and its default equal-weight average, after torch's SGD), optax.ema and
optax.lookahead; on NumPy and torch tensors through the functional API, under one jax.jit
loop, and through uniopt.torch.Optimizer. float64, 300 steps on a small tree of a few shapes;
each side computes its gradients from its own parameters (with NumPy's tanh, so every side sees
the same function), so a wrong step anywhere shows in every later one.

Tolerances: 1e-12 relative where the arithmetic is written in the peer's order (torch's CPU
``lerp`` rounds once through a fused multiply-add; XLA may fuse too); averages and parameters
that torch or optax compute with the very operations of the kernel are asserted to the bit.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from helpers import counting_jit, rel_diff

SHAPES = [(), (3,), (4, 5), (2, 1, 3)]
STEPS = 300


@functools.cache
def _problem(seed: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """The initial params and every step's gradient noise."""
    rng = np.random.default_rng(seed)
    params = {f"x{i}": rng.standard_normal(s) for i, s in enumerate(SHAPES)}
    noise = [{k: 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}
             for _ in range(STEPS)]
    return params, noise


def _np(x: Any) -> np.ndarray:
    return x.detach().numpy() if hasattr(x, "detach") else np.asarray(x)


def _grads(params: dict[str, Any], noise: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(np.tanh(_np(v)) * 0.5 + noise[k]) for k, v in params.items()}


def _ours(rule: uo.Transform, lib: str, seed: int) -> Iterator[tuple[uo.State, dict[str, Any]]]:
    """The state and params before the first step and after each, pure and in-place steps in
    turn, on NumPy arrays or torch tensors."""
    start, noise = _problem(seed)
    if lib == "torch":
        torch = pytest.importorskip("torch")
        conv: Any = lambda a: torch.from_numpy(a.copy())  # noqa: E731
    else:
        conv = np.array
    params = {k: conv(v) for k, v in start.items()}
    state = uo.setup(rule, params)
    yield state, params
    for t in range(STEPS):
        g = {k: conv(v) for k, v in _grads(params, noise[t]).items()}
        if t % 2:
            state = uo.update_(state, params, g)
        else:
            state, params = uo.update(state, params, g)
        yield state, params


def _holder(params: dict[str, Any]) -> Any:
    import torch

    return torch.nn.ParameterList(
        [torch.nn.Parameter(torch.from_numpy(_np(v).copy())) for v in params.values()])


def _load(holder: Any, params: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for h, v in zip(holder, params.values(), strict=True):
            h.copy_(torch.from_numpy(_np(v)))


def _worst(ours: Any, theirs: Any) -> float:
    return max(rel_diff(_np(a), _np(b)) for a, b in zip(ours, theirs, strict=True))


# --- ema -----------------------------------------------------------------------------------


@pytest.mark.slow  # 300 steps beside the peer
@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("decay", [0.97, 0.3])  # 0.3: torch's lerp steps back from the end
def test_ema_is_torchs_averaged_model(lib: str, decay: float) -> None:
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    worst = 0.0
    swa = holder = None
    for t, (state, params) in enumerate(_ours(
            uo.chain(uo.sgd(lr=0.1, momentum=0.9), uo.ema(decay)), lib, 0)):
        if holder is None:
            holder = _holder(params)
            swa = AveragedModel(holder, multi_avg_fn=get_ema_multi_avg_fn(decay))
        else:
            _load(holder, params)
            swa.update_parameters(holder)
        avg = uo.averaged(state, params)
        assert all(isinstance(a, torch.Tensor if lib == "torch" else np.ndarray)
                   for a in avg.values())
        worst = max(worst, _worst(avg.values(), swa.module.parameters()))
        if t < 2:  # the copy it starts as, and the first update's copy: exact
            assert worst == 0.0
    assert worst <= 1e-12, worst


@functools.cache
def _optax_ema(decay: float, debias: bool) -> list[list[np.ndarray]]:
    """optax.ema fed the params of SGD after each step (on NumPy)."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    tx = optax.ema(decay, debias=debias)
    update = jax.jit(tx.update)
    out, st = [], None
    for _, params in _ours(uo.sgd(lr=0.1, momentum=0.9), "numpy", 1):
        if st is None:
            st = tx.init(params)
            continue
        avg, st = update(params, st)
        out.append([np.asarray(avg[k]) for k in params])
    return out


@pytest.mark.slow  # 300 steps beside the peer
@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("debias", [True, False])
def test_ema_is_optax_ema(lib: str, debias: bool) -> None:
    jax = pytest.importorskip("jax")
    decay = 0.9
    with jax.enable_x64(True):
        theirs = _optax_ema(decay, debias)
    rule = uo.chain(uo.sgd(lr=0.1, momentum=0.9),
                    uo.ema(decay, debias=True) if debias else uo.ema(decay, initial="zero"))
    worst = 0.0
    for t, (state, params) in enumerate(_ours(rule, lib, 1)):
        avg = uo.averaged(state, params)
        if t == 0:  # nothing averaged: the params (debiased), zeros (raw)
            want = list(params.values()) if debias else [0 * v for v in params.values()]
            assert _worst(avg.values(), want) == 0.0
            continue
        worst = max(worst, _worst(avg.values(), theirs[t - 1]))
    # optax: (1 - d)*p + d*ema, ours torch's lerp; 1 - d**t from XLA's pow, ours C's
    assert worst <= 1e-12, worst


# --- polyak / SWA ---------------------------------------------------------------------------


@pytest.mark.slow  # 300 steps beside the peer
@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize(("start", "every"), [(0, 1), (40, 7)])
def test_polyak_is_torchs_swa_after_torchs_sgd(lib: str, start: int, every: int) -> None:
    """torch's AveragedModel with its default average, updated after its own SGD's steps
    ``start, start + every, ...``; fed our params, the same numbers to the bit (the same
    operations). (torch's SGD rounds ``p - lr*b`` once, through a fused multiply-add.)"""
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import AveragedModel

    lr, momentum = 0.1, 0.9
    _, noise = _problem(2)
    rule = uo.chain(uo.sgd(lr=lr, momentum=momentum), uo.polyak(start=start, every=every))
    model = swa = opt = ours = fed = None
    taken, worst = 0, 0.0
    for t, (state, params) in enumerate(_ours(rule, lib, 2)):
        if model is None:
            model, ours = _holder(params), _holder(params)
            swa, fed = AveragedModel(model), AveragedModel(ours)
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        else:
            theirs = dict(zip(params, model, strict=True))
            for p, g in zip(model, _grads(theirs, noise[t - 1]).values(), strict=True):
                p.grad = torch.from_numpy(g)
            opt.step()
            if t - 1 >= start and (t - 1 - start) % every == 0:
                swa.update_parameters(model)
                _load(ours, params)
                fed.update_parameters(ours)
                taken += 1
        avg = uo.averaged(state, params).values()
        assert _worst(avg, fed.module.parameters()) == 0.0
        worst = max(worst, _worst(params.values(), model.parameters()),
                    _worst(avg, swa.module.parameters()))
    assert worst <= 1e-12, worst
    assert taken == len(range(start, STEPS, every)) and int(swa.n_averaged) == taken


# --- lookahead ------------------------------------------------------------------------------


@functools.cache
def _optax_lookahead(k: int, alpha: float) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    """optax.lookahead(optax.sgd(...)): its fast and slow params after each step."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    from helpers import jitted_optax_step

    start, noise = _problem(3)
    tx = optax.lookahead(optax.sgd(0.1, momentum=0.9), sync_period=k, slow_step_size=alpha)
    params = optax.LookaheadParams.init_synced({n: jax.numpy.asarray(v) for n, v in start.items()})
    st = tx.init(params)
    step = jitted_optax_step(tx)
    out = []
    for t in range(STEPS):
        g = {n: jax.numpy.asarray(v) for n, v in _grads(params.fast, noise[t]).items()}
        params, st = step(params, st, g)
        out.append(([np.asarray(params.fast[n]) for n in start],
                    [np.asarray(params.slow[n]) for n in start]))
    return out


@pytest.mark.slow  # 300 steps beside the peer
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_lookahead_is_optax_lookahead(lib: str) -> None:
    """The params are optax's fast params, right after a sync step too (where optax does not
    copy the slow weights but steps to them); the average is optax's slow params. (The same
    operations, but XLA fuses the SGD step's multiply-adds: 1e-12.)"""
    jax = pytest.importorskip("jax")
    k, alpha = 5, 0.3
    with jax.enable_x64(True):
        theirs = _optax_lookahead(k, alpha)
    rule = uo.lookahead(uo.sgd(lr=0.1, momentum=0.9), k=k, alpha=alpha)
    worst = 0.0
    for t, (state, params) in enumerate(_ours(rule, lib, 3)):
        if t == 0:
            continue
        fast, slow = theirs[t - 1]
        worst = max(worst, _worst(params.values(), fast),
                    _worst(uo.averaged(state, params).values(), slow))
        if t % k == 0:  # synced: the params are the slow weights, up to rounding
            assert _worst(params.values(), uo.averaged(state, params).values()) <= 1e-15
    assert worst <= 1e-12, worst


def test_adjust_reaches_the_rule_inside_lookahead() -> None:
    state = uo.setup(uo.lookahead(uo.adam(lr=1e-3), k=3, alpha=0.5), [np.zeros(2)])
    state = uo.adjust(state, lr=0.5, alpha=0.25)
    assert state.rule.transforms[0].lr == 0.5 and state.rule.transforms[1].alpha == 0.25


# --- jax.jit --------------------------------------------------------------------------------


@pytest.mark.slow  # 300 steps beside NumPy
def test_all_three_under_one_jit_compile_once_and_match_numpy() -> None:
    """Every part in one chain (lookahead's sync, then the averages of the params it writes),
    adjusted mid-run: one trace, NumPy's numbers; averaged() on the jitted state, eagerly and
    under jit."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rule = uo.chain(uo.sgd(lr=0.1, momentum=0.9), uo.lookahead_sync(k=3, alpha=0.5),
                    uo.polyak(start=5, every=2), uo.ema(0.9, debias=True))
    jitted, traces = counting_jit()
    read = jax.jit(lambda s, p: uo.averaged(s, p, name="ema"))
    with jax.enable_x64(True):
        start, noise = _problem(4)
        params = {k: jnp.asarray(v) for k, v in start.items()}
        ref = {k: v.copy() for k, v in start.items()}
        state, ref_state = uo.setup(rule, params), uo.setup(rule, ref)
        for t in range(STEPS):
            if t == 150:
                state, ref_state = (uo.adjust(s, alpha=0.7, decay=0.8)
                                    for s in (state, ref_state))
            g = _grads(ref, noise[t])
            state, params = jitted(state, params, {k: jnp.asarray(v) for k, v in g.items()})
            ref_state = uo.update_(ref_state, ref, g)
            assert _worst(params.values(), ref.values()) <= 1e-12
        for name in ("lookahead_sync", "polyak", "ema"):
            ours = uo.averaged(state, params, name=name)
            assert all(isinstance(a, jax.Array) for a in ours.values())
            assert _worst(ours.values(), uo.averaged(ref_state, ref, name=name).values()) <= 1e-12
        assert _worst(read(state, params).values(), uo.averaged(state, params, name="ema").values()
                      ) <= 1e-15
    assert len(traces) == 1, f"compiled {len(traces)} times"


def test_float32_debiased_read_of_a_jitted_state_uses_the_hosts_complement() -> None:
    """Without x64 the correction 1 - 0.999**t comes from the host's 1 - 0.999, read eagerly
    or under jit (float32 0.999 would be off by 1e-5)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rule = uo.chain(uo.sgd(lr=0.1), uo.ema(0.999, debias=True))
    params = {"w": jnp.ones(3, jnp.float32)}
    state = uo.setup(rule, params)
    step = jax.jit(uo.update)
    for _ in range(5):
        state, params = step(state, params, {"w": jnp.ones(3, jnp.float32)})
    exact = sum(0.999 ** (5 - t) * 0.001 * (1 - 0.1 * t) for t in range(1, 6)) / (1 - 0.999**5)
    for read in (uo.averaged, jax.jit(uo.averaged)):
        assert rel_diff(read(state, params)["w"], np.full(3, exact)) <= 4e-7


# --- uniopt.torch ---------------------------------------------------------------------------


def test_torch_facade_reads_the_ema_of_adamw_as_torchs_averaged_model() -> None:
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    import uniopt.torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    model = model.double()
    opt = uniopt.torch.Optimizer(model.parameters(),
                                 uo.chain(uo.adamw(lr=1e-2, weight_decay=0.1), uo.ema(0.9)))
    before = opt.averaged()  # no step yet: copies of the params
    assert all(torch.equal(before[p], p) and before[p] is not p for p in model.parameters())
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randn(16, 1, dtype=torch.float64)
    for _ in range(50):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        ema.update_parameters(model)
        avg = opt.averaged()
        worst = _worst([avg[p] for p in model.parameters()], ema.module.parameters())
        assert worst <= 1e-12, worst
    assert all(not a.requires_grad for a in avg.values())
    # what it hands out is the user's: writing it leaves the state alone
    first = next(iter(model.parameters()))
    avg[first].zero_()
    assert not torch.equal(opt.averaged()[first], avg[first])


def test_torch_facade_without_an_average_says_so() -> None:
    torch = pytest.importorskip("torch")
    import uniopt.torch

    opt = uniopt.torch.Optimizer([torch.nn.Parameter(torch.ones(2))], uo.adam())
    with pytest.raises(ValueError, match="adam keeps no averaged weights; end its chain"):
        opt.averaged()


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda: uo.ema(1.5), ValueError, r"ema: decay must be in \[0, 1\], got 1.5"),
    (lambda: uo.ema(-0.1), ValueError, r"ema: decay must be in \[0, 1\], got -0.1"),
    (lambda: uo.ema(0.9, initial="ones"), ValueError,
     "ema: initial must be 'params' or 'zero', got 'ones'"),
    (lambda: uo.ema(0.9, debias=True, initial="params"), ValueError,
     "ema: debias=True corrects an average that starts at zero"),
    (lambda: uo.ema(1.0, debias=True), ValueError, "needs a fixed decay below 1, got decay=1.0"),
    (lambda: uo.ema(lambda s: 0.9, debias=True), ValueError, "needs a fixed decay below 1"),
    (lambda: uo.polyak(start=-1), ValueError, "polyak: start must be an integer >= 0, got -1"),
    (lambda: uo.polyak(every=0), ValueError, "polyak: every must be an integer >= 1, got 0"),
    (lambda: uo.polyak(every=1.5), TypeError, "polyak: every must be an integer >= 1, got 1.5"),
    (lambda: uo.polyak(start=True), TypeError, "polyak: start must be an integer >= 0, got True"),
    (lambda: uo.lookahead(uo.sgd(), k=0), ValueError,
     "lookahead_sync: k must be an integer >= 1, got 0"),
    (lambda: uo.lookahead(uo.sgd(), k=2.0), TypeError,
     "lookahead_sync: k must be an integer >= 1, got 2.0"),
    (lambda: uo.lookahead(uo.sgd(), alpha=1.5), ValueError,
     r"lookahead_sync: alpha must be in \[0, 1\], got 1.5"),
    (lambda: uo.lookahead(uo.sgd(), alpha=-0.5), ValueError,
     r"lookahead_sync: alpha must be in \[0, 1\], got -0.5"),
    (lambda: uo.lookahead("sgd"), TypeError, "^lookahead: rule is neither a uniopt transform"),
    (lambda: uo.lookahead(uo.adam), TypeError, r"^lookahead: rule is the class adam; call it"),
])
def test_bad_hyperparameters_are_named(make: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        make()


def test_a_bad_scheduled_value_changes_nothing() -> None:
    params = [np.ones(3)]
    rule = uo.chain(uo.sgd(lr=0.1), uo.lookahead_sync(k=2, alpha=lambda s: 0.5 if s < 1 else 2.0),
                    uo.ema(lambda s: 0.9 if s < 2 else 1.5))
    state = uo.setup(rule, params)
    state = uo.update_(state, params, [np.ones(3)])
    before = [params[0].copy(), *(s[0].copy() for s in state.slots.values())]
    for step in (uo.update_, uo.update):
        with pytest.raises(ValueError, match=r"lookahead_sync: alpha must be in \[0, 1\], got 2.0 "
                                             r"\(the value of its schedule at step 1\)"):
            step(state, params, [np.ones(3)])
    with pytest.raises(ValueError, match=r"ema: decay must be in \[0, 1\], got 1.5"):
        uo.adjust(state, decay=1.5)
    after = [params[0], *(s[0] for s in state.slots.values())]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert state.step == 1 and state.rule.transforms[2].decay(0) == 0.9


def test_averaged_names_what_is_wrong() -> None:
    p = {"w": np.zeros(2)}
    with pytest.raises(ValueError, match="chain keeps no averaged weights; end its chain with"):
        uo.averaged(uo.setup(uo.chain(uo.sgd(), uo.trace()), p), p)
    two = uo.setup(uo.chain(uo.sgd(), uo.ema(0.9), uo.ema(0.99), uo.polyak()), p)
    with pytest.raises(ValueError, match=r"chain keeps 3 averages \(ema, ema#1, polyak\); name one"
                                         r", e.g. averaged\(state, params, name='ema'\)"):
        uo.averaged(two, p)
    with pytest.raises(ValueError, match=r"no average named 'swa'; its averages are \['ema', "
                                         r"'ema#1', 'polyak'\]"):
        uo.averaged(two, p, name="swa")
    assert uo.averaged(two, p, name="ema#1")["w"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="params do not have the tree structure this state"):
        uo.averaged(two, [np.zeros(2)], name="polyak")
    with pytest.raises(TypeError, match="averaged: expected a uniopt State, got dict"):
        uo.averaged({"w": 1}, p)


def test_averages_in_a_wider_state_dtype_come_back_in_the_params_dtype() -> None:
    p = [np.ones(3, np.float16)]
    state = uo.setup(uo.chain(uo.sgd(lr=1e-3), uo.polyak()), p, state_dtype="float32")
    state = uo.update_(state, p, [np.ones(3, np.float16)])
    (avg,) = uo.averaged(state, p)
    assert state.slots["polyak.average"][0].dtype == np.float32 and avg.dtype == np.float16
    np.testing.assert_array_equal(avg, np.float16(np.float32(1) - np.float32(1e-3)))


@pytest.mark.parametrize("rule", [uo.chain(uo.sgd(lr=1e-3), uo.ema(0.999)),
                                  uo.chain(uo.sgd(lr=1e-3), uo.ema(0.999, debias=True)),
                                  uo.chain(uo.sgd(lr=1e-3), uo.polyak()),
                                  uo.lookahead(uo.sgd(lr=1e-3), 5, 0.5), uo.asgd(lr=1e-3)],
                         ids=["ema", "ema-debias", "polyak", "lookahead", "asgd"])
def test_averages_refuse_8_bit_state(rule: Any) -> None:
    """An average moves by a small fraction of its distance to the params at each step, which
    rounding to the nearest 8-bit code undid: params drifting by 1e-3 a step from
    linspace(0.5, 1) left uo.ema(0.999)'s average 0.68 behind its exact value after 3,000 steps
    (a sweep's measure), only the block's largest element moving. Refused at set-up, naming
    the part; float32 state is taken."""
    p = {"w": np.linspace(0.5, 1.0, 4096, dtype=np.float32)}
    with pytest.raises(ValueError, match=r"state_dtype='q8' is not offered for \w+('s \w+)?: "
                                         r"its slot (ax )?holds (averaged )?weights that move "
                                         r"by a small step .* \(the average stops moving\)"):
        uo.setup(rule, p, state_dtype="q8")
    uo.setup(rule, p, state_dtype="float32")


@pytest.mark.parametrize("lib", ["numpy", "jax", "jax-jit"])
def test_a_debiased_average_of_a_leaf_left_out_reads_at_its_own_count(lib: str) -> None:
    """A leaf whose gradient was None at some steps keeps its own count; its debiased average
    divides by ``1 - d^t`` of that count (it read the state's step: a leaf that never moves
    averaged 0.889 of itself, as uniopt.torch's reading did not)."""
    to: Any = np.asarray
    if lib != "numpy":
        jax = pytest.importorskip("jax")
        to = jax.numpy.asarray
    p = {"a": to(np.ones(2)), "b": to(np.ones(2))}
    rule = uo.chain(uo.sgd(lr=0.1), uo.ema(0.5, debias=True))
    state = uo.setup(rule, p)
    step = uo.update
    if lib == "jax-jit":
        step = jax.jit(uo.update)
    for i in range(6):
        state, p = step(state, p, {"a": to(np.full(2, 0.1)),
                                   "b": to(np.zeros(2)) if i % 2 == 0 else None})
    assert [int(k) for k in np.asarray(state.counts)] == [6, 3]
    np.testing.assert_allclose(np.asarray(uo.averaged(state, p)["b"]), 1.0, rtol=1e-15)


def test_uniopt_torch_averaged_names_an_average_inside_a_recipe() -> None:
    """``Optimizer.averaged(name)`` of a rule with a combinator: the named average (the name
    was dropped: two averages raised, one was handed back whatever its name)."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    inner = uo.partition({"a": uo.sgd(lr=1.0)}, lambda path, x: "a")
    opt = ut.Optimizer([w], uo.chain(inner, uo.polyak(), uo.ema(0.9)))
    for _ in range(4):
        w.grad = torch.ones(2, dtype=torch.float64)
        opt.step()
    assert torch.equal(opt.averaged("polyak")[w], torch.full((2,), -2.5, dtype=torch.float64))
    state, p = _ema_reference(4)
    ema = uo.averaged(state, p, "ema")["w"]
    assert not np.allclose(ema, -2.5)
    np.testing.assert_array_equal(opt.averaged("ema")[w].numpy(), ema)
    only = ut.Optimizer([w], uo.chain(inner, uo.ema(0.9)))
    with pytest.raises(ValueError, match=r"no average named 'polyak'"):
        only.averaged("polyak")


def _ema_reference(steps: int) -> tuple[Any, Any]:
    """The functional run the test above holds uniopt.torch's to."""
    p = {"w": np.zeros(2)}
    rule = uo.chain(uo.partition({"a": uo.sgd(lr=1.0)}, lambda path, x: "a"), uo.polyak(),
                    uo.ema(0.9))
    state = uo.setup(rule, p)
    for _ in range(steps):
        state, p = uo.update(state, p, {"w": np.ones(2)})
    return state, p


@pytest.mark.parametrize("make", [
    lambda: uo.chain(uo.ema(0.9), uo.scale_by_lr(0.1)),
    lambda: uo.chain(uo.chain(uo.sgd(lr=0.1), uo.polyak()), uo.scale(2.0)),
    lambda: uo.chain(uo.sgd(lr=0.1), uo.ema(0.9), uo.adam()),
    lambda: uo.chain(uo.chain(uo.chain(uo.sgd(lr=0.1), uo.ema(0.9))), uo.scale(2.0)),
], ids=["ema-first", "polyak-in-a-chain-then-scale", "ema-between-rules", "nested-twice"])
def test_an_average_goes_last_in_a_chain(make: Any) -> None:
    """It averages p - u for the u it is given: with a part after it, that is not the param
    the step writes (a port of optax's chain(ema, ...) got plain SGD and a meaningless
    average, silently)."""
    with pytest.raises(ValueError, match=r"chain: (ema|polyak) averages the parameters the step "
                                         r"writes, so what changes the update goes before it; "
                                         r"got \w+ after it"):
        make()


def test_what_only_rounds_or_syncs_the_written_params_may_follow_an_average() -> None:
    """Lookahead's sync (an ema of the fast weights), Kahan's rounding, other averages: taken,
    as before the check."""
    uo.chain(uo.lookahead(uo.sgd(lr=0.1)), uo.polyak(), uo.ema(0.9))
    uo.lookahead(uo.chain(uo.sgd(lr=0.1), uo.ema(0.9)))
    uo.chain(uo.sgd(lr=0.1), uo.ema(0.9), uo.kahan_summation())


def test_optaxs_ema_of_the_updates_is_the_bias_corrected_ema_momentum() -> None:
    """What the refusal above points to: optax.chain(optax.ema(0.9), sgd) to 1e-12."""
    optax = pytest.importorskip("optax")
    jax = pytest.importorskip("jax")
    rng = np.random.default_rng(0)
    p = {"w": rng.normal(size=(3, 2))}
    with jax.enable_x64(True):
        ours = uo.setup(uo.chain(uo.ema_momentum_bias_corrected(0.9, nesterov=False),
                                 uo.scale_by_lr(0.1)), p)
        ref = optax.chain(optax.ema(0.9), optax.scale_by_learning_rate(0.1))
        q = jax.tree.map(jax.numpy.asarray, p)
        t = ref.init(q)
        for _ in range(20):
            g = {"w": rng.normal(size=(3, 2))}
            ours, p = uo.update(ours, p, g)
            u, t = ref.update(jax.tree.map(jax.numpy.asarray, g), t, q)
            q = optax.apply_updates(q, u)
        np.testing.assert_allclose(p["w"], np.asarray(q["w"]), rtol=1e-12, atol=0)
