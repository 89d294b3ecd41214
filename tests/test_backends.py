"""Every rule on every backend of the matrix (the ``backend`` fixture, conftest.py), step by step
against NumPy.

Each run starts from the same params tree (a dict holding a list, with a ``None`` and a 0-d
leaf), feeds the same ``STEPS`` gradients from a fixed NumPy generator converted to the backend,
and after every step compares the params *and every state slot* with uniopt's pure update on
NumPy arrays of the same dtype (the reference). The error of one array after step ``n`` is

    err_n = max_i |ours_n[i] - ref_n[i]| / max_{k <= n, i} |ref_k[i]|

the largest difference scaled by the largest magnitude the array has reached so far (as in
test_parity_torch.py): rounding errors are a few ulps of the operands, which share the array's
scale, while single elements, and the 0-d leaf, can be far smaller by cancellation (``g + wd*p``,
the centered variance ``v - gbar^2``, a parameter crossing zero).

Backends that can be written (NumPy, array-api-strict, torch) also run ``update_`` in lockstep
for the first ``INPLACE_STEPS``: it must agree with ``update`` bit for bit and write the very
arrays it was given. Read-only NumPy (whose pure update is fed read-only params, state and
gradients at every step) and JAX run the pure update only; their ``update_`` must refuse with a
TypeError.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import array_api_compat as aac
import numpy as np
import pytest

import uniopt as uo
from helpers import rel_diff

# Every branch a rule has shows within these steps (the global-norm clip acts at some of them
# and not at others; no schedule changes regime later), and so does a backend computing in
# another precision, at the first step; the errors below, measured over 200 steps, bound those of
# 40 (the generic suite, tests/test_registry.py, runs every rule on every backend for 10 more)
STEPS = 40
# update_ runs the same computation as update and differs only in the final write (engine.py),
# so a wrong write shows within a few steps, and the first-step switches (trace's undamped first
# buffer, optimistic_adam's r_0 = r_1) fall inside them; the lockstep stops here to keep the
# file fast (array-api-strict's Python wrappers cost about 1 ms an update)
INPLACE_STEPS = 20

RULES: dict[str, uo.Transform] = {
    "sgd": uo.sgd(lr=0.1),
    "sgd-momentum-dampening-wd": uo.sgd(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "sgd-nesterov-wd": uo.sgd(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adagrad": uo.adagrad(lr=0.1, lr_decay=1e-3, weight_decay=1e-2, initial_accumulator_value=0.1),
    "adagrad-eps-in-sqrt": uo.adagrad(lr=0.1, eps=1e-7, eps_in_sqrt=True),
    "rmsprop": uo.rmsprop(lr=1e-2),
    "rmsprop-centered-momentum": uo.rmsprop(
        lr=1e-2, centered=True, momentum=0.9, weight_decay=1e-2
    ),
    "adadelta": uo.adadelta(lr=1.0, weight_decay=1e-2),
    "adam": uo.adam(lr=1e-2, weight_decay=1e-2),
    "adam-scheduled-lr": uo.adam(lr=lambda t: 1e-2 * 0.99**t),
    "amsgrad": uo.adam(lr=1e-2, amsgrad=True),
    "adamw": uo.adamw(lr=1e-2, weight_decay=0.1),
    "adamw-uncoupled": uo.adamw(lr=1e-2, weight_decay=1e-3, couple_lr=False),
    "optimistic_adam": uo.optimistic_adam(lr=1e-2),
    "chain-clip-sgd": uo.chain(uo.clip(0.5), uo.sgd(lr=0.1, momentum=0.9)),
    "chain-weight_decay-adam": uo.chain(uo.weight_decay(1e-2), uo.adam(lr=1e-2)),
    # the gradients' global norm is about 4.6: clipped at some steps, not at others
    "chain-clip_by_global_norm-adam": uo.chain(uo.clip_by_global_norm(4.5), uo.adam(lr=1e-2)),
}

# On NumPy itself (``numpy_arithmetic``) the results must be the same bits. Elsewhere single
# operations differ from NumPy's by up to one ulp, measured on this machine (torch 2.13 CPU,
# jax 0.10 CPU):
# * uniopt's NumPy path rounds torch's multiply-adds once (lerp, addcmul, add with alpha: a
#   hardware fused multiply-add), as torch's own operations, which the torch path calls, do;
#   array-api-strict and JAX have no fused multiply-add, and round ``a*b + c`` twice;
# * torch's vectorised sqrt is not correctly rounded: on 1e5 random floats it differs from
#   NumPy's (which is) in 17.5% of float32 and 1.3% of float64 elements, by 1 ulp at most
#   (AVX512 and AVX2 alike; 0-d and tensors shorter than 8 take an exact scalar path);
# * XLA computes ``x / c`` for a scalar ``c`` as ``x * (1/c)``, 1/c rounded to x's dtype: 40% of
#   float32 and 49% of float64 elements differ, by 1 ulp at most. The adam family divides by
#   ``sqrt(1 - b2^t)``; every other kernel divides array by array and matches JAX bit for bit.
# Everything else agrees with NumPy bit for bit, and JAX's weak-typed Python scalars round each
# coefficient to float32 as NumPy 2 does.
# Those 1-ulp differences enter the slots and params every step, and the moments' decay keeps
# them from piling up: over 200 steps the largest err_n measured is
#   float64: torch 4.2e-16 (clip_by_global_norm+adam), jax 3.0e-16 (idem);
#   float32: torch 5.3e-7 = 4.4 eps (adadelta's acc_delta), jax 1.5e-7 = 1.3 eps
#   (clip_by_global_norm+adam, whose norm JAX sums in float32: without x64 it has no float64
#   for the engine's sum; 1.1e-7 for the other rules).
# float64 is held to 1e-12, far above those and far below what a wrong formula gives (see
# test_comparison_can_fail); float32 to 16 eps, about 4x the largest measured.
EPS32 = float(np.finfo(np.float32).eps)
TOL: dict[type, float] = {np.float64: 1e-12, np.float32: 16 * EPS32}


def _init() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((3, 4)),
        "layers": [rng.standard_normal(5), None, np.array(0.75)],
        "b": rng.standard_normal((2, 1)),
    }


def _tree(flat: list[Any]) -> dict[str, Any]:
    """The params tree of :func:`_init` from its leaves in trainables order."""
    b, l0, l2, w = flat
    return {"w": w, "layers": [l0, None, l2], "b": b}


@functools.cache
def _grads() -> list[list[np.ndarray]]:
    """The gradients of every step, float64, as flat lists in trainables order."""
    rng = np.random.default_rng(1)
    shapes = [x.shape for x in uo.trainables(_init())]
    # a bias, so the params drift and the moments do not average out
    return [[rng.standard_normal(s) + 0.3 for s in shapes] for _ in range(STEPS)]


def _convert(backend: Any, flat: list[np.ndarray]) -> list[Any]:
    return [backend.asarray(x.astype(backend.np_dtype)) for x in flat]


def _arrays(state: uo.State, params: Any) -> list[Any]:
    """The params then every slot (keys sorted), flat."""
    return uo.trainables(params) + [s for k in sorted(state.slots) for s in state.slots[k]]


@functools.cache
def _reference(rule_id: str, dt: type[np.floating]) -> list[list[np.ndarray]]:
    """:func:`_arrays` after each step of the NumPy run, as copies."""
    init = [x.astype(dt) for x in uo.trainables(_init())]
    params = _tree(init)
    assert all(a is b for a, b in zip(uo.trainables(params), init, strict=True))
    state = uo.setup(RULES[rule_id], params)
    out = []
    for g in _grads():
        state, params = uo.update(state, params, [x.astype(dt) for x in g])
        out.append([np.array(x) for x in _arrays(state, params)])
    return out


def _err(ours: np.ndarray, ref: np.ndarray, scale: float) -> float:
    diff = float(np.max(np.abs(ours.astype(np.float64) - ref), initial=0.0))
    return diff / scale if scale else (0.0 if diff == 0 else np.inf)


# see test_global_norm_on_jax_float32_warns_nothing
@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64:UserWarning")
@pytest.mark.slow
@pytest.mark.parametrize("rule_id", list(RULES))
def test_matches_numpy(backend: Any, rule_id: str) -> None:
    rule = RULES[rule_id]
    ref = _reference(rule_id, backend.np_dtype)
    tol = 0.0 if backend.numpy_arithmetic else TOL[backend.np_dtype]
    params = _tree(_convert(backend, uo.trainables(_init())))
    state = uo.setup(rule, params)
    start = (state, params, [backend.to_numpy(x) for x in _arrays(state, params)])
    writable = backend.immutable is None
    if writable:
        ip_params = _tree(_convert(backend, uo.trainables(_init())))
        ip_state = uo.setup(rule, ip_params)
        ip_arrays = _arrays(ip_state, ip_params)
    scales = [0.0] * len(ref[0])
    update = backend.wrap(uo.update)
    for step, g in enumerate(_grads()):
        grads = _convert(backend, g)
        old = _arrays(state, params)
        state, params = update(state, params, grads)
        new = _arrays(state, params)
        for x, x0 in zip(new, old, strict=True):
            assert type(x) is type(x0) and isinstance(x, backend.array_type)
            assert x.dtype == backend.dtype
            assert tuple(x.shape) == tuple(x0.shape)  # 0-d stays a 0-d array
            assert aac.device(x) == aac.device(x0)
            assert all(x is not y for y in old + grads), "a pure update handed back an input"
            backend.seal(x)
        ours = [backend.to_numpy(x) for x in new]
        scales = [max(s, float(np.max(np.abs(r)))) for s, r in zip(scales, ref[step], strict=True)]
        errs = [_err(a, r, s) for a, r, s in zip(ours, ref[step], scales, strict=True)]
        assert max(errs) <= tol, (step, errs)
        if writable and step < INPLACE_STEPS:
            ip_state = uo.update_(ip_state, ip_params, grads)
            assert ip_state.step == step + 1
            written = _arrays(ip_state, ip_params)
            assert all(a is b for a, b in zip(written, ip_arrays, strict=True))
            for a, b in zip(written, ours, strict=True):
                assert np.array_equal(backend.to_numpy(a), b), step
    assert state.step == STEPS
    state0, params0, values0 = start
    assert state0.step == 0
    for a, b in zip(_arrays(state0, params0), values0, strict=True):
        np.testing.assert_array_equal(backend.to_numpy(a), b)  # the pure update wrote nothing


def test_comparison_can_fail() -> None:
    """The reference moves, and a relative change of 1e-9 in lr fails the float64 bound."""
    ref = _reference("adam", np.float64)
    init = uo.trainables(_init())
    moved = [_err(a, b, float(np.max(np.abs(b)))) for a, b in zip(ref[-1], init, strict=False)]
    assert min(moved) > 1e-2
    params = _tree(init)
    state = uo.setup(uo.adam(lr=1e-2 * (1 + 1e-9), weight_decay=1e-2), params)
    for g in _grads()[:5]:
        state, params = uo.update(state, params, g)
    arrays = _arrays(state, params)
    errs = [_err(a, r, float(np.max(np.abs(r)))) for a, r in zip(arrays, ref[4], strict=True)]
    assert max(errs) > 10 * TOL[np.float64]


def test_global_norm_on_jax_float32_warns_nothing() -> None:
    jax = pytest.importorskip("jax")
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("error")
        params = [jax.numpy.ones(3, dtype=jax.numpy.float32)]
        state = uo.setup(uo.chain(uo.clip_by_global_norm(1.0), uo.sgd(lr=0.1)), params)
        _, params = uo.update(state, params, [jax.numpy.full(3, 2.0, dtype=params[0].dtype)])
    np.testing.assert_allclose(np.asarray(params[0]), 1 - 0.1 / 3**0.5, rtol=1e-6)


def _stepped(backend: Any) -> tuple[uo.State, Any, list[Any]]:
    """An adam state after one update, its params, and the next gradients."""
    params = _tree(_convert(backend, uo.trainables(_init())))
    state = uo.setup(uo.adam(lr=0.1), params)
    state, params = uo.update(state, params, _convert(backend, _grads()[0]))
    for x in _arrays(state, params):
        backend.seal(x)
    return state, params, _convert(backend, _grads()[1])


def _snapshot(backend: Any, state: uo.State, params: Any, grads: list[Any]) -> list[np.ndarray]:
    return [backend.to_numpy(x) for x in _arrays(state, params) + grads]


def _assert_unchanged(
    snap: list[np.ndarray], backend: Any, state: uo.State, params: Any, grads: list[Any]
) -> None:
    assert state.step == 1
    for a, b in zip(_snapshot(backend, state, params, grads), snap, strict=True):
        np.testing.assert_array_equal(a, b)


def test_update_inplace_writes_or_refuses(backend: Any) -> None:
    state, params, grads = _stepped(backend)
    if backend.immutable is None:
        before = _arrays(state, params)
        expected = _arrays(*uo.update(state, params, grads))
        new = uo.update_(state, params, grads)
        assert new.step == 2
        assert all(a is b for a, b in zip(_arrays(new, params), before, strict=True))
        for a, b in zip(before, expected, strict=True):
            np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
        return
    snap = _snapshot(backend, state, params, grads)
    # params['b'] is the first leaf in trainables order
    with pytest.raises(TypeError, match=rf"update_ .*params\['b'\].*{backend.immutable}"):
        uo.update_(state, params, grads)
    _assert_unchanged(snap, backend, state, params, grads)


@pytest.mark.parametrize("inplace", [False, True], ids=["update", "update_"])
def test_gradient_from_another_library(backend: Any, inplace: bool) -> None:
    state, params, grads = _stepped(backend)
    snap = _snapshot(backend, state, params, grads)
    bad = list(grads)
    g = _grads()[1][2].astype(backend.np_dtype)  # for params['layers'][2], 0-d
    if isinstance(params["b"], np.ndarray):
        torch = pytest.importorskip("torch")
        bad[2] = torch.asarray(g)
    else:
        bad[2] = g
    message = r"gradient for params\['layers'\]\[2\] is a \w+ array but its parameter is a \w+"
    if inplace and backend.immutable:
        # refusing to write the params first would be as clear
        message = rf"{message}|update_ .*{backend.immutable}"
    with pytest.raises(TypeError, match=message):
        (uo.update_ if inplace else uo.update)(state, params, bad)
    _assert_unchanged(snap, backend, state, params, grads)


@pytest.mark.parametrize("entry", ["setup", "update", "update_"])
@pytest.mark.parametrize("first", ["numpy", "torch"])
def test_params_from_two_libraries(entry: str, first: str) -> None:
    torch = pytest.importorskip("torch")
    libs = {"numpy": np.array, "torch": lambda a: torch.asarray(a, copy=True)}
    other = "torch" if first == "numpy" else "numpy"
    own, foreign = libs[first], libs[other]
    init = uo.trainables(_init())
    mixed = _tree([own(init[0]), own(init[1]), foreign(init[2]), own(init[3])])
    g = _grads()[0]
    grads = [own(g[0]), own(g[1]), foreign(g[2]), own(g[3])]
    # names the leaf and both libraries, in whatever words
    message = rf"(?s)(?=.*params\['layers'\]\[2\])(?=.*{first})(?=.*{other})"
    rule = uo.sgd(lr=0.1)  # no slots: a state cannot tell the libraries apart by its slots
    if entry == "setup":
        with pytest.raises(TypeError, match=message):
            uo.setup(rule, mixed)
        return
    state = uo.setup(rule, _tree([own(x) for x in init]))
    with pytest.raises(TypeError, match=message):
        (uo.update_ if entry == "update_" else uo.update)(state, mixed, grads)
    assert state.step == 0
    for a, b in zip(uo.trainables(mixed), init, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_adagrad_eps_in_sqrt_zero_gradient_is_zero(backend: Any) -> None:
    """optax's placement with eps = 0: an element that has only had zero gradients has G = 0,
    and its update is 0, with no 0/0 (nor a NumPy warning about one) on any backend."""
    params = _convert(backend, [np.array([1.0, 2.0, 3.0])])
    state = uo.setup(uo.adagrad(lr=0.5, eps=0.0, eps_in_sqrt=True), params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state, params = uo.update(state, params, _convert(backend, [np.array([0.0, 4.0, -1.0])]))
    np.testing.assert_array_equal(backend.to_numpy(params[0]), [1.0, 1.5, 3.5])


@pytest.mark.parametrize("device", ["CPU_DEVICE", "device1"])
@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex_params_of_a_library_without_real_views(device: str, dtype: Any) -> None:
    """array-api-strict has no real view of a complex array: ``update_`` steps copies of the
    pairs and writes them back, params and slots, as NumPy's ``update_`` writes through its
    views (it wrote nothing, while the step count went on), also off the default device
    (where the pairs came back on another device and failed)."""
    xs = pytest.importorskip("array_api_strict")
    dev = xs.Device(device)

    def pairs(a: Any) -> np.ndarray:  # (array-api-strict's arithmetic is not NumPy's to the bit)
        z = np.asarray(xs.asarray(a, device=xs.Device("CPU_DEVICE")))
        return np.stack([z.real, z.imag], axis=-1)

    rng = np.random.default_rng(0)
    p0 = (rng.standard_normal(5) + 1j * rng.standard_normal(5)).astype(dtype)
    gs = [(rng.standard_normal(5) + 1j * rng.standard_normal(5)).astype(dtype) for _ in range(3)]
    tol = 1e-6 if dtype == np.complex64 else 1e-14
    for rule in (uo.sgd(lr=0.1, momentum=0.9), uo.adam(lr=0.1)):
        ref = [p0.copy()]
        ref_state = uo.setup(rule, ref)
        params = [xs.asarray(p0, device=dev)]
        state = uo.setup(rule, params)
        pure_params, pure_state = params, state
        for g in gs:
            ref_state = uo.update_(ref_state, ref, [g])
            pure_state, pure_params = uo.update(pure_state, pure_params,
                                                [xs.asarray(g, device=dev)])
            state = uo.update_(state, params, [xs.asarray(g, device=dev)])
        assert params[0].device == pure_params[0].device == dev
        assert np.array_equal(pairs(params[0]), pairs(pure_params[0]))
        assert rel_diff(pairs(params[0]), pairs(ref[0])) <= tol
        for key, slot in state.slots.items():
            assert np.array_equal(pairs(slot[0]), pairs(pure_state.slots[key][0]))
            assert rel_diff(pairs(slot[0]), pairs(ref_state.slots[key][0])) <= tol, key


@pytest.mark.parametrize("rule", [
    uo.chain(uo.clip_by_global_norm(0.5), uo.adam(lr=0.1)),
    uo.adafactor(lr=0.1),
], ids=["clip-adam", "adafactor"])
def test_a_device_without_float64_takes_norms_in_float32(rule: uo.Transform) -> None:
    """The global norm (and Adafactor's sums) are taken in float64 where the device has it; on
    one without (array-api-strict's ``no_float64``, as torch's MPS) in float32: it raised
    "does not support dtype=float64"."""
    xs = pytest.importorskip("array_api_strict")
    dev = xs.Device("no_float64")
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal(s).astype(np.float32) for s in ((4, 3), (5,))]
    gs = [[rng.standard_normal(p.shape).astype(np.float32) for p in p0] for _ in range(3)]
    ref, params = [p.copy() for p in p0], [xs.asarray(p, device=dev) for p in p0]
    ref_state, state = uo.setup(rule, ref), uo.setup(rule, params)
    for g in gs:
        ref_state, ref = uo.update(ref_state, ref, g)
        state, params = uo.update(state, params, [xs.asarray(x, device=dev) for x in g])
    for a, b in zip(params, ref, strict=True):
        assert a.device == dev and a.dtype == xs.float32
        assert rel_diff(np.asarray(xs.asarray(a, device=xs.Device("CPU_DEVICE"))), b) <= 1e-6


@pytest.mark.parametrize("rule", [
    uo.mechanize(uo.adam(lr=1e-2)),
    uo.accumulate(uo.adam(lr=1e-2), every=2),
    uo.chain(uo.adam(lr=1e-2), uo.reduce_on_plateau(patience=0)),
    uo.dog(init_step=("learning_rate", 1e-3)),
    uo.chain(uo.scale_by_lbfgs(), uo.scale_by_lr(0.1)),
], ids=["mechanize", "accumulate-float32", "plateau", "dog-lr", "scale_by_lbfgs"])
def test_a_rule_off_array_api_stricts_default_device(rule: uo.Transform) -> None:
    """Each made an array of its own without ``device=`` (Mechanic's sums and betas,
    accumulate's float32 sums, the plateau's loss and floor, DoG's first step), which met the
    params' device1 arrays and raised; scale_by_lbfgs indexed its history as NumPy does, not as
    the standard does. Now each steps there as on NumPy."""
    xs = pytest.importorskip("array_api_strict")
    dev = xs.Device("device1")
    start = {"w": np.array([[1.0, -2.0], [0.5, 3.0]]), "b": np.array([0.25, -0.75])}
    grads = [{k: np.sin(v * (t + 1)) for k, v in start.items()} for t in range(6)]
    kw = {"state_dtype": "float32"} if "accumulate" in str(rule)[:12] else {}
    runs = []
    for to in (np.array, lambda a: xs.asarray(a, device=dev)):
        ps = {k: to(v) for k, v in start.items()}
        state = uo.setup(rule, ps, **kw)
        for t, g in enumerate(grads):
            state, ps = uo.update(state, ps, {k: to(v) for k, v in g.items()}, value=1.0 / (t + 1))
        runs.append({k: np.asarray(xs.asarray(v, device=xs.Device("CPU_DEVICE")))
                     if not isinstance(v, np.ndarray) else v for k, v in ps.items()})
    for k in start:
        np.testing.assert_allclose(runs[1][k], runs[0][k], rtol=1e-12, atol=1e-15)


def test_a_gradient_on_another_device_than_its_parameter_is_named_before_any_write() -> None:
    """array_api_strict's own error named no leaf, and inside a partition's update_ the first
    member's leaf was written before it came."""
    xs = pytest.importorskip("array_api_strict")
    dev = xs.Device("device1")
    params = {"a": xs.asarray([1.0, 2.0], device=dev), "b": xs.asarray([3.0], device=dev)}
    rule = uo.partition({"x": uo.sgd(lr=0.1), "y": uo.adam(lr=0.1)},
                        lambda path, leaf: "x" if path[-1] == "a" else "y")
    state = uo.setup(rule, params)
    grads = {"a": xs.asarray([1.0, 1.0], device=dev), "b": xs.asarray([1.0])}
    with pytest.raises(ValueError, match=r"gradient for params\['b'\] is on .*CPU_DEVICE.*, its "
                                         r"parameter on .*device1"):
        uo.update_(state, params, grads)
    assert np.asarray(xs.asarray(params["a"], device=xs.Device("CPU_DEVICE"))).tolist() == [
        1.0, 2.0]
