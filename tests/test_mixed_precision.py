"""float16/bfloat16 parameters (NumPy's bfloat16 is ml_dtypes'), with slots of their own dtype
or float32 (setup(..., state_dtype="float32")); narrower floats refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import uniopt as uo


def _run(params, grads_fn, rule, steps, state_dtype, inplace=False):  # type: ignore[no-untyped-def]
    state = uo.setup(rule, params, state_dtype=state_dtype)
    for k in range(steps):
        if inplace:
            state = uo.update_(state, params, grads_fn(k))
        else:
            state, params = uo.update(state, params, grads_fn(k))
    return state, params


@pytest.mark.parametrize("inplace", [False, True])
def test_numpy_float16_with_float32_moments_matches_a_float32_run(inplace: bool) -> None:
    rng = np.random.default_rng(0)
    p32 = [rng.standard_normal(50).astype(np.float32)]
    big = [(300 * rng.standard_normal(50)).astype(np.float32) for _ in range(20)]  # g**2 > 65504
    rule = uo.adam(lr=1e-2)
    p16 = [p32[0].astype(np.float16)]
    s16, q16 = _run(p16, lambda k: [big[k].astype(np.float16)], rule, 20, "float32", inplace)
    if inplace:
        q16 = p16
    assert q16[0].dtype == np.float16
    assert all(s.dtype == np.float32 for v in s16.slots.values() for s in v)
    assert np.all(np.isfinite(s16.slots["scale_by_adam.exp_avg_sq"][0]))
    # the same run in float32 (gradients rounded to float16 as above): the float16 parameters
    # are that run rounded once per step, so within a few float16 ulps of it
    _, q32 = _run(
        [p32[0].astype(np.float16).astype(np.float32)],
        lambda k: [big[k].astype(np.float16).astype(np.float32)],
        rule,
        20,
        None,
    )
    np.testing.assert_allclose(q16[0].astype(np.float32), q32[0], rtol=0, atol=20 * 2**-10 * 4)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the point
def test_without_state_dtype_float16_moments_overflow() -> None:
    p = [np.zeros(4, np.float16)]
    s, _ = _run(p, lambda k: [np.full(4, 30_000, np.float16)], uo.adam(lr=1e-2), 1, None)
    assert not np.all(np.isfinite(s.slots["scale_by_adam.exp_avg_sq"][0]))  # why the option exists


def test_torch_bfloat16_and_jax_bfloat16() -> None:
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    for lib, dt in ((torch, torch.bfloat16), (jax.numpy, jax.numpy.bfloat16)):
        p = [lib.ones(8, dtype=dt)]
        s, q = _run(
            p,
            lambda k, lib=lib, dt=dt: [lib.full((8,), 400.0, dtype=dt)],
            uo.adam(lr=0.1),
            5,
            "float32",
        )
        assert q[0].dtype == dt
        assert all(str(x.dtype).endswith("float32") for v in s.slots.values() for x in v)
        assert abs(float(q[0][0]) - 0.5) < 0.02  # five Adam steps of lr 0.1 against the gradient


@pytest.mark.parametrize("state_dtype", [None, "float32"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_numpy_bfloat16_is_torchs_bfloat16_bit_for_bit(
        state_dtype: str | None, inplace: bool, compiled: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ml_dtypes' bfloat16 NumPy arrays (what JAX hands NumPy) step as torch's bfloat16
    tensors do: computed in float32 and rounded once, on the reference path and the compiled
    loop alike; 30 steps of AdamW (weight decay, bias corrections, a root)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    torch = pytest.importorskip("torch")
    from uniopt.fast import cpu

    if compiled:
        monkeypatch.setattr(cpu, "MIN_LEAVES", 0)
        monkeypatch.setattr(cpu, "MIN_SIZE", 0)
    rng = np.random.default_rng(3)
    shapes = [(3, 5), (300,), (1,)]
    start = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    bf16 = ml_dtypes.bfloat16
    rule = uo.adamw(lr=1e-2, weight_decay=0.1)
    ours = [a.astype(bf16) for a in start]
    theirs = [torch.from_numpy(a).to(torch.bfloat16) for a in start]
    s_np = uo.setup(rule, ours, state_dtype=state_dtype)
    s_t = uo.setup(rule, theirs, state_dtype=state_dtype)
    before = cpu.STEPS
    for _ in range(30):
        g = [(3 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
        g_np = [x.astype(bf16) for x in g]
        if inplace:
            s_np = uo.update_(s_np, ours, g_np)
        else:
            s_np, ours = uo.update(s_np, ours, g_np)
        s_t = uo.update_(s_t, theirs, [torch.from_numpy(x).to(torch.bfloat16) for x in g])
    # the torch side takes the loop, through its bits; the NumPy side too where asked
    assert cpu.STEPS - before == (60 if compiled else 30)
    assert all(p.dtype == bf16 for p in ours)
    want_slot = np.dtype(bf16) if state_dtype is None else np.dtype(np.float32)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a.view(np.int16), b.view(torch.int16).numpy())
    for key, xs in s_np.slots.items():
        for a, b in zip(xs, s_t.slots[key], strict=True):
            assert a.dtype == want_slot
            np.testing.assert_array_equal(a.astype(np.float32), b.float().numpy())


def test_floats_of_8_bits_are_refused_by_name() -> None:
    """An 8-bit float's moments underflow (Adam's ``g**2`` in float8_e4m3fn is 0 below 0.04,
    and it has no infinity: the step was NaN on JAX), and torch has no arithmetic in them."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    leaves = [np.ones(3, ml_dtypes.float8_e4m3fn)]
    jax = pytest.importorskip("jax")
    leaves.append(jax.numpy.ones(3, jax.numpy.float8_e5m2))
    torch = pytest.importorskip("torch")
    leaves.append(torch.ones(3, dtype=torch.float8_e4m3fn))
    for leaf in leaves:
        with pytest.raises(TypeError, match=r"params\['w'\] has dtype \S*float8_e\dm\d\w*; "
                                            "uniopt updates floats of 16 bits or more"):
            uo.setup(uo.adam(), {"w": leaf})


def test_bad_state_dtype() -> None:
    with pytest.raises(ValueError,
                       match="state_dtype must be 'float32', 'float64' or 'q8', got 'int8'"):
        uo.setup(uo.adam(), [np.ones(2)], state_dtype="int8")


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.usefixtures("small_steps_compiled")
def test_a_wider_state_dtype_computes_in_it_on_every_path(
    inplace: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32 params with state_dtype="float64": every step is computed in float64 and the
    params rounded once, whether or not the rule keeps slots (the compiled loop computes in the
    params' float32, so such a state takes the reference path; a rule without slots had nothing
    that made it decline, and was computed in float32)."""
    from uniopt.fast import cpu

    rng = np.random.default_rng(1)
    params = [rng.standard_normal(50).astype(np.float32) for _ in range(20)]
    grads = [rng.standard_normal(50).astype(np.float32) for _ in range(20)]
    for rule in (uo.chain(uo.scale_by_lr(0.1)), uo.sgd(lr=0.1, momentum=0.9)):
        # one step: float64 arithmetic, rounded once
        _, got = _run([p.copy() for p in params], lambda k: grads, rule, 1, "float64", inplace)
        _, wide = _run([p.astype(np.float64) for p in params],
                       lambda k: [g.astype(np.float64) for g in grads], rule, 1, None)
        for a, b in zip(got, wide, strict=True):
            np.testing.assert_array_equal(a, b.astype(np.float32))
        # three steps: the reference path's, bit for bit
        _, got = _run([p.copy() for p in params], lambda k: grads, rule, 3, "float64", inplace)
        with monkeypatch.context() as m:
            m.setattr(cpu, "AVAILABLE", False)
            _, ref = _run([p.copy() for p in params], lambda k: grads, rule, 3, "float64")
        for a, b in zip(got, ref, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("inplace", [False, True])
def test_float32_state_of_float64_params_steps_them_in_float64(lib: str, inplace: bool) -> None:
    """float64 params with state_dtype="float32": the slots are kept in float32, the step is
    computed in float64, so the params keep their float64 digits (the step was computed in
    float32: a zero gradient moved 1 + 1e-12 to 1.0 and 0.1 to 0.10000000149011612): the float64
    run whose momentum is stored in float32 between steps, bit for bit."""
    conv = (lambda a: a) if lib == "numpy" else pytest.importorskip("torch").from_numpy
    back = np.asarray if lib == "numpy" else (lambda t: t.numpy())
    rule = uo.sgd(lr=0.1, momentum=0.9)
    start = np.array([1.0 + 1e-12, 0.1, -3.0])
    for g in (np.zeros(3), np.array([1e-3, 2.5e-4, -7.0])):
        got = _run([conv(start.copy())], lambda k, g=g: [conv(g.copy())], rule, 2, "float32",
                   inplace)
        state, params = got
        new = back(params[0])  # (in place: the array passed in)
        # the float64 run whose momentum is rounded to float32 after every step (optax's
        # mu_dtype: the step reads the float32 slot, computes in float64, stores it rounded)
        ref = uo.setup(rule, [start.copy()])
        p = [start.copy()]
        for _ in range(2):
            ref = uo.update_(ref, p, [g.copy()])
            m = ref.slots["trace.momentum_buffer"][0]
            m[...] = m.astype(np.float32)
        p = p[0]
        np.testing.assert_array_equal(new, p)
        assert back(state.slots["trace.momentum_buffer"][0]).dtype == np.float32
        if not g.any():
            np.testing.assert_array_equal(p, start)


@pytest.mark.parametrize("inplace", [False, True])
def test_big_endian_float16_is_computed_in_float32_as_native(inplace: bool) -> None:
    """A big-endian float16 (``>f2``) is float16: computed in float32 and rounded once, as a
    native one (its dtype's name was ``>f2``, taken for a float of 64 bits and computed in
    float16: 1.2e-4 apart after 5 Adam steps)."""
    rng = np.random.default_rng(2)
    start = rng.standard_normal(40)
    runs = []
    for dt in ("<f2", ">f2"):
        p = [start.astype(dt)]
        state, p = _run(p, lambda k, dt=dt: [np.full(40, 0.3 * (k + 1), dt)],
                        uo.adam(lr=1e-2), 5, None, inplace)
        runs.append(np.asarray(p[0], np.float64))
    np.testing.assert_array_equal(runs[1], runs[0])


@pytest.mark.parametrize("bits", ["float16", "bfloat16"])
def test_float64_state_rounds_16_bit_params_once_on_every_library(bits: str) -> None:
    """With ``state_dtype="float64"`` the float64 result goes to 16 bits rounded once, as NumPy
    rounds it, on torch and JAX too, pure and in place and through uniopt.torch: their own
    conversion goes through float32 and rounded twice (1 + half an ulp + 2^-40 came out 1,
    not the next 16-bit number)."""
    import warnings

    torch = pytest.importorskip("torch")
    half_ulp = 2.0**-11 if bits == "float16" else 2.0**-8
    rule = uo.sgd(lr=half_ulp + 2.0**-40, momentum=0.9)
    want = 1.0 + 2 * half_ulp
    tdt = getattr(torch, bits)
    cases: list[tuple[Any, Any]] = [(torch.ones(1, dtype=tdt), torch.full((1,), -1.0, dtype=tdt))]
    if bits == "float16":
        cases.append((np.ones(1, np.float16), np.full(1, -1.0, np.float16)))
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):
        jdt = getattr(jax.numpy, bits)
        jax_case = (jax.numpy.ones(1, jdt), jax.numpy.full((1,), -1.0, jdt))
        _, [p] = uo.update(uo.setup(rule, [jax_case[0]], state_dtype="float64"),
                           [jax_case[0]], [jax_case[1]])
        assert float(p[0]) == want, "jax"
    for p0, g in cases:
        _, [p] = uo.update(uo.setup(rule, [p0], state_dtype="float64"), [p0], [g])
        q = [p0.clone() if hasattr(p0, "clone") else p0.copy()]
        uo.update_(uo.setup(rule, q, state_dtype="float64"), q, [g])
        assert float(p[0]) == float(q[0][0]) == want, type(p0)
    import uniopt.torch as ut

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for flags in ({}, {"foreach": True}):
            w = torch.nn.Parameter(torch.ones(1, dtype=tdt))
            opt = ut.SGD([w], lr=half_ulp + 2.0**-40, momentum=0.9, state_dtype="float64",
                         **flags)
            w.grad = torch.full((1,), -1.0, dtype=tdt)
            opt.step()  # (bfloat16 with a float64 state raised: the loop declined its bits)
            assert float(w[0]) == want, flags


def test_a_strided_bfloat16_gradient_steps_as_a_contiguous_one() -> None:
    """uniopt.torch with bfloat16 params: a gradient laid out otherwise than its parameter (a
    transpose) steps as its contiguous copy, at every step (from the second on, the compiled
    loop declined its view and the step raised: bfloat16 bits have no reference path)."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    g = torch.Generator().manual_seed(0)
    start = torch.randn(30, 40, generator=g).to(torch.bfloat16)
    grads = [torch.randn(40, 30, generator=g).to(torch.bfloat16).t() for _ in range(3)]
    w, v = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours, contiguous = ut.AdamW([w], lr=1e-2), ut.AdamW([v], lr=1e-2)
    for grad in grads:
        assert not grad.is_contiguous()
        w.grad, v.grad = grad, grad.contiguous()
        ours.step()
        contiguous.step()
        assert torch.equal(w.detach(), v.detach())
    # a contiguous one still goes to the compiled loop as it is (not through the copying path:
    # the fix first sent every bfloat16 gradient there, a small step 65% slower)
    assert contiguous._plans[0].fast_grads([v.grad]) is not None


def test_a_float64_state_of_jax_arrays_without_x64_is_refused_at_set_up() -> None:
    """Without 64-bit JAX a float64 state cannot exist: set-up refuses it, saying what to turn
    on (it made float32 slots, and the first step called them another state's)."""
    jax = pytest.importorskip("jax")
    params = [jax.numpy.ones(2, jax.numpy.bfloat16)]
    with jax.enable_x64(False):
        nnx = pytest.importorskip("flax.nnx")
        for ps in (params, [nnx.Param(jax.numpy.ones(2))]):  # (an NNX Param was let through)
            with pytest.raises(ValueError, match=r"state_dtype='float64' on JAX arrays needs "
                                                 r"64-bit JAX \(jax.config.update"):
                uo.setup(uo.adam(), ps, state_dtype="float64")
    with jax.enable_x64(True):
        state = uo.setup(uo.adam(), params, state_dtype="float64")
        state, _ = uo.update(state, params, [jax.numpy.ones(2, jax.numpy.bfloat16)])
        assert all(s[0].dtype == jax.numpy.float64 for s in state.slots.values())
