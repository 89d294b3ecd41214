"""8-bit state (setup(..., state_dtype="q8")): blockwise dynamic-tree quantised slots."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import tempfile
import tracemalloc
from typing import Any

import numpy as np
import optree
import pytest

import uniopt as uo
from uniopt import fast, quant
from uniopt.fast import cpu
from uniopt.tree import NAMESPACE

BLOCK = 2048


def _tree(rng: np.random.Generator, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    # a partial last block (5000 = 2 * 2048 + 904), a leaf smaller than a block, a scalar
    return {"w": rng.standard_normal((50, 100)).astype(dtype),
            "b": rng.standard_normal(300).astype(dtype),
            "s": np.asarray(rng.standard_normal(), dtype=dtype)}


def _grads(rng: np.random.Generator, like: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    # per-block scales that differ by orders of magnitude, as real gradients' do
    return [{k: (rng.standard_normal(v.shape) * 10.0 ** rng.integers(-4, 1)).astype(v.dtype)
             for k, v in like.items()} for _ in range(steps)]


# --- the map and the round trip, written from the paper's description ------------------------


def _magnitudes(decades: int) -> np.ndarray:
    """0; in decade i (0 the smallest) of [10**-(decades-i), 10**-(decades-i-1)], the
    midpoints of 2**(i+1) equal parts; 1."""
    vals = [0.0, 1.0]
    for i in range(decades):
        lo, hi = 10.0 ** -(decades - i), 10.0 ** -(decades - i - 1)
        k = 2 ** (i + 1)
        vals += [lo + (j + 0.5) * (hi - lo) / k for j in range(k)]
    return np.sort(np.array(vals))


def test_the_maps() -> None:
    np.testing.assert_allclose(quant.MAG_U, _magnitudes(7), rtol=1e-7)
    np.testing.assert_allclose(quant.MAG_S, _magnitudes(6), rtol=1e-7)
    assert len(quant.MAG_U) == 256 and len(quant.MAG_S) == 128
    assert np.all(np.diff(quant.MAG_U) > 0) and np.all(np.diff(quant.MAG_S) > 0)


def _bracket(table: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The map's values either side of each magnitude ``m``."""
    hi = np.clip(np.searchsorted(table, m, side="left"), 1, len(table) - 1)
    return table[hi - 1].astype(np.float64), table[hi].astype(np.float64)


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_is_at_most_half_a_code_step_of_the_block(signed: bool) -> None:
    rng = np.random.default_rng(1)
    n = 5 * BLOCK + 123
    x = rng.standard_normal(n) * np.repeat(10.0 ** rng.integers(-6, 3, 6), BLOCK)[:n]
    x[:50] = 0.0
    x[BLOCK:2 * BLOCK] = 0.0  # a block of zeros: scale 0, codes 0, values exactly 0
    if not signed:
        x = np.abs(x) ** 2
    x = x.astype(np.float32).reshape(-1, 1)
    q = quant.quantise(np, x, signed)
    assert q.codes.dtype == (np.int8 if signed else np.uint8) and q.codes.shape == x.shape
    assert q.absmax.shape == (6,) and q.absmax.dtype == np.float32
    back = quant.dequantise(np, q).astype(np.float64).ravel()
    xs = x.astype(np.float64).ravel()
    absmax = np.repeat(q.absmax.astype(np.float64), BLOCK)[:n]
    np.testing.assert_array_equal(absmax.reshape(-1, BLOCK)[:, 0] if n % BLOCK == 0 else
                                  q.absmax, [np.abs(xs[i:i + BLOCK]).max()
                                             for i in range(0, n, BLOCK)])
    table = quant.MAG_S if signed else quant.MAG_U
    scale = np.where(absmax > 0, absmax, 1.0)
    lo, hi = _bracket(table, np.abs(xs) / scale)
    err = np.abs(back - xs)
    # half the step between the map's two values around x/absmax, times the block's absmax
    # (plus the float32 rounding of x/absmax and of code * absmax: a few ulps of absmax)
    bound = 0.5 * (hi - lo) * absmax + 4 * 2.0**-24 * absmax
    assert np.all(err <= bound)
    # and the coarsest step of the map bounds every error: 0.9/64 (signed), 0.9/128 (unsigned)
    assert np.all(err <= (0.5 * 0.9 / (64 if signed else 128) + 1e-6) * absmax)
    assert np.all(back[BLOCK:2 * BLOCK] == 0) and np.all(back[:50] == 0)
    # nearest: no other value of the map is closer than the one chosen
    vals = np.asarray(table, np.float64)
    y = np.abs(xs) / scale
    best = np.abs(y[:, None] - vals[None, :]).min(axis=1)
    assert np.all(np.abs(np.abs(back) / scale - y) <= best + 1e-6)


def test_signed_map_is_symmetric_and_unsigned_rounds_negatives_to_zero() -> None:
    x = np.linspace(-1, 1, 4001, dtype=np.float32)
    q = quant.quantise(np, x, True)
    np.testing.assert_array_equal(q.codes, -q.codes[::-1])
    assert q.codes.min() == -127 and q.codes.max() == 127
    u = quant.quantise(np, x, False)
    assert np.all(u.codes[x < 0] == 0) and u.codes.max() == 255



def _searched(x: np.ndarray, signed: bool) -> np.ndarray:
    """The codes (as bytes) of float32 ``x`` by the search over the midpoints, a negative value
    (its sign bit, NaN included) taking the negated code (signed) or 0 (unsigned), as the
    compiled loop does."""
    mids = quant.MID_S if signed else quant.MID_U
    mag = np.searchsorted(mids, np.abs(x), side="left")
    neg = np.signbit(x)
    code = np.where(neg, -mag, mag) if signed else np.where(neg, 0, mag)
    return code.astype(np.int64).astype(np.uint8)


def _edges(signed: bool) -> np.ndarray:
    """Float32 bits where a compiled code could go wrong first: each midpoint and those either
    side; each binade's and each table entry's first (the piece, the look-up); 0, the
    subnormals' ends, 1, past 1, infinity, NaNs; with both signs."""
    from uniopt.fast import q8

    mids = (quant.MID_S if signed else quant.MID_U).view(np.uint32).astype(np.int64)
    shift = q8.SHIFT_S if signed else q8.SHIFT_U
    lo, table = q8.code_table(quant.MID_S if signed else quant.MID_U, shift)
    entries = (np.arange(lo, lo + len(table)) << shift).astype(np.int64)
    binades = np.arange(256, dtype=np.int64) << 23
    x = np.concatenate([mids + d for d in (-2, -1, 0, 1, 2)]
                       + [e + d for e in (entries, binades) for d in (-1, 0, 1)]
                       + [np.array([0, 1, 0x7FFFFF, 0x800000, 0x3F7FFFFF, 0x3F800000,
                                    0x3F800001, 0x7F7FFFFF, 0x7F800000, 0x7F800001,
                                    0x7FC00000, 0x7FFFFFFF])])
    x = x[(x >= 0) & (x <= 0x7FFFFFFF)]
    return np.concatenate([x, x | 0x80000000]).astype(np.uint32)


@pytest.mark.parametrize("signed", [True, False])
def test_compiled_code_equals_the_search_at_every_midpoint(signed: bool) -> None:
    # the compiled code is monotone in the magnitude within each table entry and each piece of
    # the map: equal to the search at each midpoint and either side of it, and at the ends of
    # every entry and binade, it is equal everywhere (the ends and NaN too; every float32 was
    # checked once, both ways the loop finds codes)
    from uniopt.fast import q8

    x = _edges(signed).view(np.float32)
    np.testing.assert_array_equal(q8.codes(x, np.float32(1), signed), _searched(x, signed))


@pytest.mark.parametrize("signed", [True, False])
def test_compiled_codes_of_random_blocks_with_ties_zeros_and_non_finite_values(
        signed: bool) -> None:
    # the loop's codes of x / scale: random magnitudes over the map's decades, values exactly
    # on a midpoint times the scale (a power of two: the quotient is the midpoint, a tie), zeros,
    # infinities and NaNs of either sign; random bit patterns; lengths not a multiple of 64
    from uniopt.fast import q8

    rng = np.random.default_rng(11)
    mids = quant.MID_S if signed else quant.MID_U
    for n in (1, 15, 63, 64, 65, 1000, 2047, 2048, 2049, 5000):
        scale = np.float32(2.0 ** rng.integers(-20, 20))
        x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 0, n)).astype(np.float32) * scale
        ties = rng.random(n) < 0.2
        x[ties] = rng.choice(mids, ties.sum()) * scale * rng.choice([-1, 1], ties.sum())
        special = rng.random(n) < 0.05
        x[special] = rng.choice(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan],
                                         np.float32), special.sum())
        if n > 2000:
            x[:200] = rng.integers(0, 2 ** 32, 200, dtype=np.uint64).astype(np.uint32).view(
                np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            want = _searched(x / scale, signed)
        np.testing.assert_array_equal(q8.codes(x, scale, signed), want)
        back = q8.values(want, scale, signed)
        table = q8.VALUE_S if signed else q8.VALUE_U
        np.testing.assert_array_equal(back, table[want] * scale)


@pytest.mark.parametrize("lib", ["numpy", "array_api_strict", "torch", "jax"])
@pytest.mark.parametrize("signed", [True, False])
def test_the_reference_codes_are_the_loops_at_signs_zeros_and_non_finite_values(
        lib: str, signed: bool) -> None:
    # quantise on every library (the reference path's) reads a value's sign from its sign bit,
    # a NaN's too, as the compiled loop does: -0.0 and -NaN take the negated code or 0. A
    # block holding a NaN has a NaN scale on every library (XLA's row maximum drops NaNs), so
    # its values divide by one: x itself is coded.
    x = _edges(signed).view(np.float32)
    x = x[np.isnan(x) | (np.abs(x) <= 1) | np.isinf(x)]
    assert np.isnan(x).any() and np.signbit(x[np.isnan(x)]).any()
    x = np.concatenate([x, np.float32([np.nan])])  # a NaN in every block
    x = np.concatenate([x[i:i + quant.BLOCK - 1].tolist() + [np.nan]
                        for i in range(0, len(x), quant.BLOCK - 1)]).astype(np.float32)
    mod = pytest.importorskip(lib)
    a = (mod.numpy if lib == "jax" else mod).asarray(x)
    q = quant.quantise(uo.backend.namespace(a), a, signed)
    codes = np.array(np.from_dlpack(q.codes))
    assert np.isnan(np.from_dlpack(q.absmax)).all()
    np.testing.assert_array_equal(codes.view(np.uint8), _searched(x, signed))


@pytest.mark.slow  # a process of its own: 15 s, most of it compiling
def test_the_gathers_give_the_same_codes(tmp_path: Any) -> None:
    # the other way the loop finds codes (a CPU without VBMI), in a process that takes it
    from uniopt.fast import q8

    if not q8.VBMI:
        pytest.skip("the gathers are this CPU's way: the tests above ran them")
    here = os.path.dirname(os.path.abspath(__file__))
    script = (f"import sys; sys.path.insert(0, {here!r}); import test_q8; "
              "from uniopt.fast import q8; assert not q8.VBMI\n"
              "for s in (True, False):\n"
              "    test_q8.test_compiled_code_equals_the_search_at_every_midpoint(s)\n"
              "    test_q8.test_compiled_codes_of_random_blocks_with_ties_zeros_and_non_finite_"
              "values(s)\n")
    env = {**os.environ, "UNIOPT_Q8_GATHER": "1", "UNIOPT_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], env=env, timeout=300, check=True)


def test_the_look_up_tables_are_checked_when_built() -> None:
    from uniopt.fast import q8

    with pytest.raises(ValueError, match="two midpoints"):
        q8.code_table(quant.MID_U, q8.SHIFT_U + 1)
    with pytest.raises(ValueError, match="holds 2 cuts"):
        q8.piece_tables(np.linspace(0.01, 0.99, 255).astype(np.float32), 8)


# --- memory -------------------------------------------------------------------------------


def _mlp_shapes() -> list[tuple[int, ...]]:
    return [(256, 512), (512,), (512, 512), (512,), (512, 10), (10,)]


def test_state_bytes_per_parameter() -> None:
    params = [np.zeros(s, np.float32) for s in _mlp_shapes()]
    n = sum(p.size for p in params)
    state = uo.setup(uo.adam(), params, state_dtype="q8")
    leaves = optree.tree_leaves(state.slots, namespace=NAMESPACE)
    assert {str(x.dtype) for x in leaves} == {"int8", "uint8", "float32"}
    per = sum(x.nbytes for x in leaves) / n
    assert per <= 2.1, per  # 2 codes + 2 scales per 2048: 2.004 (float32 state: 8)
    assert sum(quant.nbytes(q) for v in state.slots.values() for q in v) / n == per

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = uo.setup(uo.adam(), params, state_dtype="q8")
        after = tracemalloc.get_traced_memory()[0]
        f32 = uo.setup(uo.adam(), params)
        full = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert (after - before) / n <= 2.1, (after - before) / n
    assert (full - after) / n >= 8  # the float32 state, for scale
    del kept, f32


# --- one step against the recipe, written here --------------------------------------------


def _quantise(x: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise absmax, nearest value of the map by brute force (codes as signed indices)."""
    table = _magnitudes(6 if signed else 7).astype(np.float32).astype(np.float64)
    flat = x.ravel().astype(np.float64)
    nb = max(1, math.ceil(flat.size / BLOCK))
    absmax = np.array([np.abs(flat[i * BLOCK:(i + 1) * BLOCK]).max() for i in range(nb)])
    scale = np.repeat(np.where(absmax > 0, absmax, 1.0), BLOCK)[:flat.size]
    y = (flat.astype(np.float32) / scale.astype(np.float32)).astype(np.float64)
    mag = np.abs(y) if signed else np.maximum(y, 0)
    code = np.abs(mag[:, None] - table[None, :]).argmin(axis=1)
    code = np.where(y < 0, -code, code) if signed else code
    return code.reshape(x.shape), absmax.astype(np.float32)


def _dequantise(codes: np.ndarray, absmax: np.ndarray, signed: bool) -> np.ndarray:
    table = _magnitudes(6 if signed else 7).astype(np.float32)
    c = codes.ravel().astype(np.int64)
    v = np.sign(c).astype(np.float32) * table[np.abs(c)]
    return (v * np.repeat(absmax, BLOCK)[:c.size]).reshape(codes.shape)


def test_a_step_is_dequantise_then_float32_adam_then_quantise() -> None:
    rng = np.random.default_rng(2)
    params = _tree(rng)
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    state = uo.setup(uo.adam(lr=lr, betas=(b1, b2), eps=eps), params, state_dtype="q8")
    grads = _grads(rng, params, 4)
    for g in grads[:3]:
        state, params = uo.update(state, params, g)
    new_state, new_params = uo.update(state, params, grads[3])
    t = 4
    f = np.float32
    for i, k in enumerate(sorted(params)):
        qm, qv = state.slots["scale_by_adam.exp_avg"][i], state.slots["scale_by_adam.exp_avg_sq"][i]
        m = _dequantise(qm.codes, qm.absmax, True)
        v = _dequantise(qv.codes, qv.absmax, False)
        np.testing.assert_array_equal(m, quant.dequantise(np, qm))
        np.testing.assert_array_equal(v, quant.dequantise(np, qv))
        g = grads[3][k]
        m = f(b1) * m + f(1 - b1) * g
        v = f(b2) * v + f(1 - b2) * g * g
        step = f(lr / (1 - b1**t)) * m / (np.sqrt(v) / f(math.sqrt(1 - b2**t)) + f(eps))
        # the kernel rounds m once (a fused lerp) and v's terms in its own order: float32
        # rounding apart, so the params agree to a few ulps and a code may sit one apart
        np.testing.assert_allclose(new_params[k], params[k] - step, rtol=2e-6, atol=1e-7)
        for new, want, signed in ((new_state.slots["scale_by_adam.exp_avg"][i], m, True),
                                  (new_state.slots["scale_by_adam.exp_avg_sq"][i], v, False)):
            codes, absmax = _quantise(want, signed)
            np.testing.assert_allclose(new.absmax, absmax, rtol=1e-6)
            diff = np.abs(new.codes.astype(np.int64) - codes)
            assert diff.max() <= 1 and np.mean(diff) < 1e-3, (k, signed, diff.max(), diff.mean())


# --- paths and backends -------------------------------------------------------------------


def _big(rng: np.random.Generator) -> list[np.ndarray]:
    # above the compiled loop's small-step size, with a partial block
    return [rng.standard_normal((130, 200)).astype(np.float32),
            rng.standard_normal(1000).astype(np.float32)]


def _equal_states(a: uo.State, b: uo.State) -> None:
    for key in a.slots:
        for x, y in zip(a.slots[key], b.slots[key], strict=True):
            np.testing.assert_array_equal(np.asarray(x.codes), np.asarray(y.codes))
            np.testing.assert_array_equal(np.asarray(x.absmax), np.asarray(y.absmax))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_loop_equals_the_reference_path(dtype: Any, monkeypatch: Any) -> None:
    rng = np.random.default_rng(3)
    params = [p.astype(dtype) for p in _big(rng)]
    grads = [[(rng.standard_normal(p.shape) * 1e-2).astype(dtype) for p in params]
             for _ in range(3)]
    rule = uo.adamw(lr=1e-2, weight_decay=0.1)
    fast_s, fast_p = uo.setup(rule, params, state_dtype="q8"), params
    inplace_p = [p.copy() for p in params]
    inplace_s = uo.setup(rule, inplace_p, state_dtype="q8")
    before = cpu.STEPS
    for g in grads:
        fast_s, fast_p = uo.update(fast_s, fast_p, g)
        inplace_s = uo.update_(inplace_s, inplace_p, g)
    assert cpu.STEPS - before == 6
    monkeypatch.setattr(fast, "Q8_STRATEGIES", ())
    ref_s, ref_p = uo.setup(rule, params, state_dtype="q8"), params
    for g in grads:
        ref_s, ref_p = uo.update(ref_s, ref_p, g)
    for a, b, c in zip(fast_p, inplace_p, ref_p, strict=True):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)
    _equal_states(fast_s, ref_s)
    _equal_states(inplace_s, ref_s)


def test_a_block_of_zeros_keeps_the_code_of_zero_on_the_compiled_loop(monkeypatch: Any) -> None:
    # a block whose largest magnitude is 0 is coded over a scale of 1, as the reference path
    # does: over its scale of 0 every value would be 0/0, NaN, whose code is the map's last
    # (the same values, read back, but not the reference's codes nor a checkpoint's bytes)
    rng = np.random.default_rng(5)
    params = _big(rng)
    grads = [rng.standard_normal(params[0].shape).astype(np.float32),
             np.zeros_like(params[1])]
    grads[0].ravel()[BLOCK:2 * BLOCK] = 0.0  # (a block of zeros in a leaf stepped otherwise)
    rule = uo.adam(lr=1e-2)
    before = cpu.STEPS
    fast_s = uo.update_(uo.setup(rule, params, state_dtype="q8"), [p.copy() for p in params],
                        grads)
    assert cpu.STEPS - before == 1
    monkeypatch.setattr(fast, "Q8_STRATEGIES", ())
    ref_s = uo.update_(uo.setup(rule, params, state_dtype="q8"), [p.copy() for p in params],
                       grads)
    _equal_states(fast_s, ref_s)
    for key in fast_s.slots:
        codes = [np.asarray(q.codes).ravel() for q in fast_s.slots[key]]
        zero = codes[1][0]
        assert (codes[1] == zero).all() and (codes[0][BLOCK:2 * BLOCK] == zero).all()


def test_a_small_tree_takes_the_loop_as_float_state_does(monkeypatch: Any,
                                                         tmp_path: Any) -> None:
    """A small tree's 8-bit steps took the reference path for good (2.4 ms a step on S1
    against 0.03 with float32 state); now, as float state's do, they take the loop after
    COMPILE_AFTER steps, or at once where it is at hand, with the same bits."""
    from uniopt.fast import q8

    monkeypatch.setattr(cpu, "COMPILE_AFTER", 3)
    monkeypatch.setattr(q8, "_LOOPS", {})  # no loop at hand: in this process, or on disk
    monkeypatch.setattr(q8, "_MODULES", {})
    monkeypatch.setenv("UNIOPT_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(s).astype(np.float32) for s in ((7, 5), (5,))]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in params] for _ in range(6)]

    def run(rule: uo.Transform) -> tuple[Any, list[Any], int]:
        state, p, before = uo.setup(rule, params, state_dtype="q8"), params, cpu.STEPS
        for g in grads:
            state, p = uo.update(state, p, g)
        return state, p, cpu.STEPS - before

    waited_s, waited_p, compiled = run(uo.adam(lr=1e-2))
    assert compiled == 3  # the first 3 on the reference path, then the loop
    at_once_s, at_once_p, compiled = run(uo.adam(lr=1e-2))  # a new rule: the loop at hand
    assert compiled == 6
    monkeypatch.setattr(cpu, "COMPILE_AFTER", None)
    ref_s, ref_p, compiled = run(uo.adam(lr=1e-2))
    assert compiled == 0
    for a, b, c in zip(waited_p, at_once_p, ref_p, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)
    _equal_states(waited_s, ref_s)
    _equal_states(at_once_s, ref_s)


def test_a_small_torch_tree_takes_the_reference_path_with_the_loop_at_hand(
        monkeypatch: Any) -> None:
    """As float state's (tests/test_small.py): a small tree of torch tensors with 8-bit state
    steps on the reference path's torch operations at every step, the loop at hand or not, so
    its numbers do not depend on the kernel cache."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(cpu, "COMPILE_AFTER", 1)
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(s).astype(np.float32) for s in ((7, 5), (5,))]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in params] for _ in range(4)]
    rule = uo.adam(lr=1e-2)
    state, arrays = uo.setup(rule, params, state_dtype="q8"), [p.copy() for p in params]
    for g in grads:  # the loop compiled, at hand for every small step of the rule
        state = uo.update_(state, arrays, g)

    def run() -> list[Any]:
        ps = [torch.from_numpy(p.copy()) for p in params]
        s, before = uo.setup(rule, ps, state_dtype="q8"), cpu.STEPS
        for g in grads:
            s = uo.update_(s, ps, [torch.from_numpy(x) for x in g])
        assert cpu.STEPS == before
        return ps

    at_hand = run()
    monkeypatch.setattr(cpu, "COMPILE_AFTER", None)  # never at hand
    for a, b in zip(at_hand, run(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
# one loop of each kind of slot set (two unsigned and a signed slot with a maximum, a rule whose
# coefficients switch at a step, a signed slot alone): the loop's text is generated alike for
# every rule, and each compile costs seconds on a cold cache (test_fused holds every rule's
# kernels to the reference path in float32 and float64)
@pytest.mark.parametrize("rule", [uo.adam(lr=1e-2, amsgrad=True), uo.radam(),
                                  uo.sgd(lr=1e-2, momentum=0.9)],
                         ids=lambda r: r.name + ("_ams" if getattr(r, "amsgrad", 0) else ""))
def test_every_elementwise_rule_compiled_equals_reference(rule: Any, monkeypatch: Any) -> None:
    rng = np.random.default_rng(4)
    params = _big(rng)
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in params] for _ in range(3)]
    s, p = uo.setup(rule, params, state_dtype="q8"), params
    for g in grads:
        s, p = uo.update(s, p, g)
    monkeypatch.setattr(fast, "Q8_STRATEGIES", ())
    r, q = uo.setup(rule, params, state_dtype="q8"), params
    for g in grads:
        r, q = uo.update(r, q, g)
    for a, b in zip(p, q, strict=True):
        np.testing.assert_array_equal(a, b)
    _equal_states(s, r)


def _numpy_run() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], uo.State,
                            dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    params = _tree(rng)
    grads = _grads(rng, params, 3)
    s, p = uo.setup(uo.adam(lr=1e-2), params, state_dtype="q8"), params
    for g in grads:
        s, p = uo.update(s, p, g)
    return params, grads, s, p


def test_numpy_and_torch_agree() -> None:
    torch = pytest.importorskip("torch")
    params, grads, s, p = _numpy_run()
    ts = uo.setup(uo.adam(lr=1e-2), {k: torch.tensor(v) for k, v in params.items()},
                  state_dtype="q8")
    tp = {k: torch.tensor(v) for k, v in params.items()}
    for g in grads:
        ts = uo.update_(ts, tp, {k: torch.tensor(v) for k, v in g.items()})
    assert ts.slots["scale_by_adam.exp_avg"][0].codes.dtype == torch.int8
    _agree(s, p, ts, {k: v.numpy() for k, v in tp.items()})


@pytest.mark.slow  # JAX compiles the step twice: some seconds
def test_numpy_and_jax_under_jit_agree() -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    params, grads, s, p = _numpy_run()
    step = jax.jit(uo.update)
    js = uo.setup(uo.adam(lr=1e-2), {k: jnp.asarray(v) for k, v in params.items()},
                  state_dtype="q8")
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    for g in grads:
        js, jp = step(js, jp, {k: jnp.asarray(v) for k, v in g.items()})
    assert isinstance(js.slots["scale_by_adam.exp_avg"][0], quant.Q8)
    _agree(s, p, js, jp)


def _agree(s: uo.State, p: dict[str, np.ndarray], other_s: uo.State, other_p: Any) -> None:
    # torch's lerp and XLA's fusions round the kernel's float32 arithmetic in their own
    # order (as with float32 state): a few ulps on the params, and a new slot value that falls
    # within those ulps of a midpoint between codes takes the neighbouring code
    for k in p:
        np.testing.assert_allclose(np.asarray(other_p[k]), p[k], rtol=1e-5, atol=1e-6)
    for key in s.slots:
        for a, b in zip(s.slots[key], other_s.slots[key], strict=True):
            diff = np.abs(np.asarray(a.codes, np.int64) - np.asarray(b.codes, np.int64))
            assert diff.max() <= 1 and diff.mean() < 1e-2
            np.testing.assert_allclose(np.asarray(b.absmax), a.absmax, rtol=1e-5)


def test_pure_and_in_place_agree_and_pure_aliases_nothing() -> None:
    rng = np.random.default_rng(6)
    params = _tree(rng)
    g = _grads(rng, params, 1)[0]
    s0 = uo.setup(uo.adam(lr=1e-2), params, state_dtype="q8")
    codes = s0.slots["scale_by_adam.exp_avg"][0].codes.copy()
    s1, p1 = uo.update(s0, params, g)
    np.testing.assert_array_equal(s0.slots["scale_by_adam.exp_avg"][0].codes, codes)
    p2 = {k: v.copy() for k, v in params.items()}
    s2 = uo.update_(uo.setup(uo.adam(lr=1e-2), params, state_dtype="q8"), p2, g)
    for k in params:
        np.testing.assert_array_equal(p1[k], p2[k])
    _equal_states(s1, s2)


# --- checkpoints and errors ----------------------------------------------------------------


def test_checkpoint_round_trip() -> None:
    rng = np.random.default_rng(7)
    params = _tree(rng)
    rule = uo.adam(lr=1e-2)
    state = uo.setup(rule, params, state_dtype="q8")
    for g in _grads(rng, params, 3):
        state, params = uo.update(state, params, g)
    path = os.path.join(tempfile.mkdtemp(), "q8.safetensors")
    uo.save(path, state)
    back = uo.load(path, (rule, params))
    assert back.state_dtype == "q8" and back.step == 3
    _equal_states(state, back)
    into = uo.load(path, uo.setup(rule, params, state_dtype="q8"))
    _equal_states(state, into)
    g = _grads(rng, params, 1)[0]
    a, pa = uo.update(state, params, g)
    b, pb = uo.update(back, params, g)
    for k in params:
        np.testing.assert_array_equal(pa[k], pb[k])
    with pytest.raises(ValueError, match="state_dtype is 'q8' in the checkpoint, None in like"):
        uo.load(path, uo.setup(rule, params))


def test_errors() -> None:
    params = [np.zeros(3, np.float32)]
    with pytest.raises(ValueError, match="'float32', 'float64' or 'q8', got 'int8'"):
        uo.setup(uo.adam(), params, state_dtype="int8")
    with pytest.raises(ValueError, match="for real params"):
        uo.setup(uo.adam(), [np.zeros(3, np.complex64)], state_dtype="q8")
    with pytest.raises(ValueError, match="whole-tree parts"):
        uo.setup(uo.partition({"a": uo.adam()}, lambda path, leaf: "a"), params,
                 state_dtype="q8")
    state = uo.setup(uo.adam(), params, state_dtype="q8")
    with pytest.raises(ValueError, match="8-bit scale_by_adam.exp_avg for it is"):
        uo.update(state, [np.zeros(5000, np.float32)], [np.zeros(5000, np.float32)])
    plain = uo.setup(uo.adam(), params)
    mixed = uo.State(plain.rule, 0, plain.slots, plain.treedef, "q8")
    with pytest.raises(ValueError, match="for it is none|for it is"):
        uo.update(mixed, params, params)


# --- convergence --------------------------------------------------------------------------


def _mlp_run(seed: int, state_dtype: str | None, steps: int) -> float:
    """A 2-layer tanh MLP on a synthetic regression task; the final loss."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    teacher = rng.standard_normal((8, 1)).astype(np.float32)
    y = np.sin(x @ teacher) + 0.1 * x[:, :1] ** 2
    params = {"w1": (rng.standard_normal((8, 64)) / np.sqrt(8)).astype(np.float32),
              "b1": np.zeros(64, np.float32),
              "w2": (rng.standard_normal((64, 1)) / 8).astype(np.float32),
              "b2": np.zeros(1, np.float32)}
    state = uo.setup(uo.adam(lr=3e-3), params, state_dtype=state_dtype)

    def loss_grad(p: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        h = np.tanh(x @ p["w1"] + p["b1"])
        r = h @ p["w2"] + p["b2"] - y
        d = 2 * r / len(x)
        dh = (d @ p["w2"].T) * (1 - h**2)
        return float(np.mean(r**2)), {"w1": x.T @ dh, "b1": dh.sum(0), "w2": h.T @ d,
                                      "b2": d.sum(0)}

    for _ in range(steps):
        _, g = loss_grad(params)
        state = uo.update_(state, params, g)
    return loss_grad(params)[0]


@pytest.mark.slow
def test_mlp_converges_as_float32_adam_does() -> None:
    seeds, steps = range(5), 400
    f32 = np.array([_mlp_run(s, None, steps) for s in seeds])
    q8 = np.array([_mlp_run(s, "q8", steps) for s in seeds])
    spread = f32.max() - f32.min()
    assert f32.max() < 0.2 * _mlp_run(0, None, 0)  # it learned
    assert abs(q8.mean() - f32.mean()) <= spread, (f32, q8)
    assert q8.max() <= f32.max() + spread, (f32, q8)


def test_leaves_without_gradients_and_half_precision_params() -> None:
    p = {"a": np.ones(5, np.float32), "b": np.ones(3, np.float32)}
    s = uo.setup(uo.adam(lr=0.1), p, state_dtype="q8")
    s, q = uo.update(s, p, {"a": np.ones(5, np.float32), "b": None})
    np.testing.assert_array_equal(q["b"], p["b"])  # a leaf without a gradient stays
    assert abs(q["a"][0] - 0.9) < 1e-6 and list(s.counts) == [1, 0]
    codes = s.slots["scale_by_adam.exp_avg"][1].codes
    assert np.all(codes == 0)  # and so do its slots
    h = [np.ones(4, np.float16)]
    s = uo.setup(uo.adam(lr=0.1), h, state_dtype="q8")
    s, out = uo.update(s, h, [np.ones(4, np.float16)])
    assert out[0].dtype == np.float16 and np.all(out[0] == np.float16(0.9))


def test_torch_optimizer_class_with_8_bit_state_and_its_state_dict() -> None:
    import io

    torch = pytest.importorskip("torch")

    import uniopt.torch

    rng = np.random.default_rng(5)
    tree = _tree(rng)
    grads = _grads(rng, tree, 6)

    def make() -> tuple[list[torch.nn.Parameter], Any]:
        ps = [torch.nn.Parameter(torch.tensor(v)) for v in tree.values()]
        return ps, uniopt.torch.AdamW(ps, lr=1e-2, state_dtype="q8")

    def step(opt: Any, ps: list[torch.nn.Parameter], g: dict[str, np.ndarray]) -> None:
        for p, v in zip(ps, g.values(), strict=True):
            p.grad = torch.tensor(v)
        opt.step()

    ps, opt = make()
    # the engine's own 8-bit run of the group's rule, on NumPy arrays
    params = [v.copy() for v in tree.values()]
    state = uo.setup(opt._group_rule(opt.param_groups[0]), params, state_dtype="q8")
    for g in grads[:3]:
        step(opt, ps, g)
        state = uo.update_(state, params, list(g.values()))
    for p, q in zip(ps, params, strict=True):
        np.testing.assert_array_equal(p.detach().numpy(), q)
    st = opt.state[ps[0]]
    assert st["exp_avg"].dtype == torch.int8 and st["exp_avg_sq"].dtype == torch.uint8
    assert st["exp_avg.absmax"].dtype == torch.float32 and st["exp_avg.absmax"].shape == (3,)
    np.testing.assert_array_equal(st["exp_avg"].numpy(), state.slots["scale_by_adam.exp_avg"][0]
                                  .codes)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    ps2, opt2 = make()
    with torch.no_grad():
        for p, q in zip(ps2, ps, strict=True):
            p.copy_(q)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.state[ps2[0]]["exp_avg"].dtype == torch.int8
    for g in grads[3:]:
        step(opt, ps, g)
        step(opt2, ps2, g)
    for p, q in zip(ps, ps2, strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match=r"^AdamW: state_dtype must be None, 'float32', 'float64' "
                                         r"or 'q8', got 'q4'$"):
        uniopt.torch.AdamW(ps, state_dtype="q4")
    w = torch.nn.Parameter(torch.zeros(4, 2))
    opt = uniopt.torch.Adagrad([w], state_dtype="q8")
    w.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 2), (4, 2), check_invariants=True)
    with pytest.raises(ValueError, match=r"^Adagrad: sparse gradients with state_dtype='q8': the "
                                         r"rows of an 8-bit slot share their block's scale"):
        opt.step()
    assert torch.equal(w, torch.zeros(4, 2))


@pytest.mark.parametrize("flags", [{}, {"foreach": True}], ids=["default", "foreach"])
def test_torch_classes_keep_bfloat16_params_in_8_bits(flags: dict[str, Any]) -> None:
    """``state_dtype="q8"`` on bfloat16 parameters (it raised: the 8-bit loop was handed the
    tensor's bits as uint16): the reference path's steps, as the functional API takes them on
    the same tensors, bit for bit, the slots codes and scales."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    gen = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(3000, generator=gen).to(torch.bfloat16))
    q = p.detach().clone()
    opt = ut.AdamW([p], lr=0.01, weight_decay=0.1, state_dtype="q8", **flags)
    state = uo.setup(uo.adamw(lr=0.01, weight_decay=0.1), [q], state_dtype="q8")
    for _ in range(4):
        g = torch.randn(3000, generator=gen).to(torch.bfloat16)
        p.grad = g.clone()
        opt.step()
        state = uo.update_(state, [q], [g])
    assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), q)
    st = opt.state[p]
    assert st["exp_avg"].dtype == torch.int8 and st["exp_avg_sq"].dtype == torch.uint8
    assert torch.equal(st["exp_avg"], state.slots["scale_by_adam.exp_avg"][0].codes)


@pytest.mark.parametrize(("rule", "slot"), [
    (uo.madgrad(lr=0.05), "its slots x0 and s"), (uo.cocob(alpha=10.0), "its slot init_particles"),
    (uo.lookahead(uo.sgd(lr=0.05, momentum=0.9), 5, 0.5), "its slow weights")],
    ids=["madgrad", "cocob", "lookahead"])
def test_rules_that_make_the_params_from_a_slot_refuse_a_narrower_state(rule: Any,
                                                                       slot: str) -> None:
    """MADGRAD, COCOB and Lookahead set the parameter from a slot (as FTRL does): on a
    quadratic whose float32 run ends near 1e-10, 8-bit slots stalled at 7.2, 6.3 and 0.2, and
    float32 slots capped float64 params at float32's digits (8e-11 where float64 state reached
    1e-14). Refused at set-up, naming why; a state as wide as the params is taken."""
    f32 = [np.ones(8, np.float32)]
    with pytest.raises(ValueError, match=r"state_dtype='q8' is not offered for ") as refused:
        uo.setup(rule, f32, state_dtype="q8")
    if "average stops moving" not in str(refused.value):  # (lookahead's: its averaging's)
        # float32 state is taken on float32 params: the message offers it, and does not name
        # the params' dtype as the reason (it said "on float32 params")
        assert str(refused.value).endswith("use state_dtype=None or 'float32'")
        assert "on float32 params" not in str(refused.value)
    with pytest.raises(ValueError, match=r"state_dtype='float32' is not offered for .* on "
                                         r"float64 params: it (sets|makes) the param\w* "
                                         r"(from|to) " + re.escape(slot)):
        uo.setup(rule, [np.ones(8)], state_dtype="float32")
    uo.setup(rule, f32, state_dtype="float32")


def test_acprop_refuses_8_bit_state() -> None:
    """ACProp divides the raw gradient by the root of its variance plus 1e-16: a variance that
    8 bits round to 0 made a step of g/1e-16 (NaN in its registry example by step 5). Refused
    at set-up, naming why."""
    with pytest.raises(ValueError, match=r"state_dtype='q8' is not offered for acprop: its step "
                                         r"divides the raw gradient"):
        uo.setup(uo.acprop(lr=1e-2), [np.ones(4, np.float32)], state_dtype="q8")


@pytest.mark.parametrize("make", [
    lambda ps, ut: ut.Optimizer(ps, uo.prodigy(), state_dtype="q8"),
    lambda ps, ut: ut.Optimizer(ps, uo.kron(lr=1e-2), state_dtype="q8"),
    lambda ps, ut: ut.Optimizer([{"params": ps, "state_dtype": "q8"}], uo.galore(lr=0.1)),
    lambda ps, ut: ut.LBFGS(ps, state_dtype="q8"),
], ids=["prodigy", "kron", "galore-group", "LBFGS"])
def test_torch_classes_refuse_8_bits_for_whole_tree_parts_as_setup_does(make: Any) -> None:
    """uniopt.setup refuses 8-bit state for a rule with whole-tree parts; the torch classes
    took the option and kept their state in float32, silently."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    with pytest.raises(ValueError, match=r"state_dtype='q8' quantises per-leaf slots; \w+ has "
                                         r"whole-tree parts"):
        make([torch.nn.Parameter(torch.ones(4, 3))], ut)


def test_a_large_leaf_is_quantised_in_pieces_to_the_same_codes_in_little_memory() -> None:
    # quantise's temporaries (the quotients, the search's int64 indices...) took some 30 bytes
    # an element of the whole leaf: q8's set-up of a 64M-element leaf peaked at 2.4 GB where
    # float32 state's took 0.5 GB
    import tracemalloc

    rng = np.random.default_rng(3)
    n = 2 * quant.PIECE + 1000  # (a short last block)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-12, 0, n))).astype(np.float32)
    for signed in (True, False):
        whole, pieces = quant._quantised(np, x, signed), quant.quantise(np, x, signed)
        np.testing.assert_array_equal(pieces.codes, whole.codes)
        np.testing.assert_array_equal(pieces.absmax, whole.absmax)
    peaks = {}
    for dtype in (None, "q8"):
        tracemalloc.start()
        state = uo.setup(uo.adamw(), [np.zeros(8 * quant.PIECE, np.float32)], state_dtype=dtype)
        peaks[dtype] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del state
    assert peaks["q8"] < 1.6 * peaks[None], peaks
