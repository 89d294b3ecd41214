"""Tests for uniopt.schedules: hand-computed values, optax, torch.optim.lr_scheduler, validation."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import uniopt as uo
from uniopt import schedules

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")
torch = pytest.importorskip("torch")

N = 300  # steps compared against optax and torch: s = 0..N


def values(sched: Callable[[int], float], n: int = N) -> list[float]:
    return [sched(s) for s in range(n + 1)]


# --- hand-computed values; the first update sees s = 0 ------------------------------------


def test_constant() -> None:
    assert values(schedules.constant(0.3), 5) == [0.3] * 6


def test_linear() -> None:
    s = schedules.linear(0.5, 0.1, steps=4)
    expected = [0.5 + (0.1 - 0.5) * min(k, 4) / 4 for k in range(8)]
    assert values(s, 7) == pytest.approx(expected, rel=1e-15)
    assert s(0) == 0.5 and s(4) == 0.1 and s(10**9) == 0.1  # both ends exactly


def test_linear_increasing() -> None:
    assert values(schedules.linear(0.0, 1.0, steps=2), 3) == [0.0, 0.5, 1.0, 1.0]


def test_cosine() -> None:
    s = schedules.cosine(2.0, steps=8, floor=0.4)
    expected = [
        0.4 + (2.0 - 0.4) * 0.5 * (1 + math.cos(math.pi * min(k, 8) / 8)) for k in range(12)
    ]
    assert values(s, 11) == pytest.approx(expected, rel=1e-15)
    assert s(0) == 2.0 and s(4) == pytest.approx(1.2, rel=1e-15) and s(8) == 0.4 and s(99) == 0.4


def test_exponential() -> None:
    s = schedules.exponential(1.0, rate=0.5, steps=2)
    assert values(s, 4) == pytest.approx([1.0, 0.5**0.5, 0.5, 0.5**1.5, 0.25], rel=1e-15)
    st_ = schedules.exponential(1.0, rate=0.5, steps=2, staircase=True)
    assert values(st_, 5) == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    lo = schedules.exponential(1.0, rate=0.5, end=0.2)
    assert values(lo, 4) == [1.0, 0.5, 0.25, 0.2, 0.2]
    hi = schedules.exponential(1.0, rate=2.0, end=5.0)
    assert values(hi, 4) == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_exponential_overflow_is_inf_then_clipped() -> None:
    # 1.1 ** 1e5 overflows a Python float; the `end` bound must still apply
    assert schedules.exponential(1e-3, rate=1.1, end=1.0)(100_000) == 1.0
    assert schedules.exponential(1e-3, rate=1.1)(100_000) == math.inf


def test_piecewise_constant_sets_values() -> None:
    s = schedules.piecewise_constant(1.0, {20: 0.01, 10: 0.1})  # order of the dict is irrelevant
    assert [s(k) for k in (0, 9, 10, 19, 20, 1000)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    assert schedules.piecewise_constant(1.0, {0: 0.5})(0) == 0.5
    assert schedules.piecewise_constant(1.0, {})(7) == 1.0


def test_piecewise_constant_copies_its_dict() -> None:
    d = {10: 0.1}
    s = schedules.piecewise_constant(1.0, d)
    d[5] = 123.0
    assert s(7) == 1.0


def test_warmup() -> None:
    s = schedules.warmup(4, then=schedules.linear(1.0, 0.0, steps=10), init=0.2)
    assert values(s, 15) == pytest.approx(
        [0.2, 0.4, 0.6, 0.8] + [1.0 - k / 10 for k in range(10)] + [0.0, 0.0], rel=1e-15
    )
    assert s(4) == 1.0


def test_warmup_number_and_zero_steps() -> None:
    assert values(schedules.warmup(2, then=0.3), 3) == [0.0, 0.15, 0.3, 0.3]
    c = schedules.cosine(1.0, steps=10)
    assert values(schedules.warmup(0, then=c), 12) == values(c, 12)


def test_join() -> None:
    lin = schedules.linear(1.0, 0.0, steps=10)
    s = schedules.join([0.5, lin, lambda k: 10.0 + k], boundaries=[3, 8])
    assert values(s, 10) == pytest.approx(
        [0.5, 0.5, 0.5] + [lin(k) for k in range(5)] + [10.0, 11.0, 12.0], rel=1e-15
    )
    assert schedules.join([7.0], boundaries=[])(5) == 7.0


def test_join_calls_only_the_active_schedule() -> None:
    s = schedules.join([0.1, math.sqrt], boundaries=[10])  # math.sqrt(-1) would raise
    assert s(9) == 0.1 and s(10) == 0.0 and s(14) == 2.0
    w = schedules.warmup(3, then=math.sqrt)
    assert w(2) == 0.0 and w(7) == 2.0


# --- contract: Python floats out, frozen value objects, arrays in -> arrays out --------------

ALL = [
    schedules.constant(0.3),
    schedules.linear(1.0, 0.1, steps=10),
    schedules.cosine(1.0, steps=10, floor=0.1),
    schedules.exponential(1.0, rate=0.5, steps=3, staircase=True, end=0.2),
    schedules.exponential(0.1, rate=1.5, steps=3, end=4.0),
    schedules.piecewise_constant(1.0, {3: 0.5, 7: 0.1}),
    schedules.warmup(4, then=schedules.cosine(1.0, steps=10)),
    schedules.join([1.0, schedules.linear(1.0, 0.0, steps=10), lambda k: 0.5 * k], [3, 8]),
]


@pytest.mark.parametrize("sched", ALL, ids=lambda s: type(s).__name__)
def test_returns_python_float(sched: Callable[[int], float]) -> None:
    for k in (0, 1, 5, 50):
        assert type(sched(k)) is float
        assert type(sched(np.int64(k))) is float


@pytest.mark.parametrize("sched", ALL, ids=lambda s: type(s).__name__)
def test_frozen_hashable_equal(sched: Callable[[int], float]) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.steps = 3  # type: ignore[attr-defined]
    copy = dataclasses.replace(sched)  # type: ignore[type-var]
    assert copy == sched and hash(copy) == hash(sched)


@pytest.mark.parametrize("sched", ALL, ids=lambda s: type(s).__name__)
def test_array_steps(sched: Any) -> None:
    expected = np.array(values(sched, 20))
    numpy_vals = np.array([sched(np.asarray(k)) for k in range(21)], dtype=float)
    np.testing.assert_allclose(numpy_vals, expected, rtol=1e-15)
    jitted = jax.jit(sched)
    jax_vals = np.array([jitted(jnp.asarray(k)) for k in range(21)], dtype=float)
    # jax computes in float32
    np.testing.assert_allclose(jax_vals, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


@given(
    init=st.floats(-10, 10),
    end=st.floats(-10, 10),
    steps=st.integers(1, 10_000),
    frac=st.floats(0, 1),
)
def test_linear_hits_ends_and_stays_between(
    init: float, end: float, steps: int, frac: float
) -> None:
    s = schedules.linear(init, end, steps)
    assert s(0) == init and s(steps) == end and s(steps + 1) == end
    k = round(frac * steps)
    assert min(init, end) <= s(k) <= max(init, end)
    assert (s(k) <= s(k + 1)) if end >= init else (s(k) >= s(k + 1))


@given(
    init=st.floats(-10, 10),
    floor=st.floats(-10, 10),
    steps=st.integers(1, 10_000),
    frac=st.floats(0, 1),
)
def test_cosine_hits_ends_and_stays_between(
    init: float, floor: float, steps: int, frac: float
) -> None:
    s = schedules.cosine(init, steps, floor)
    assert s(0) == init and s(steps) == floor and s(steps + 1) == floor
    k = round(frac * steps)
    assert min(init, floor) <= s(k) <= max(init, floor)


# --- optax ----------------------------------------------------------------------------------
# Each case is (ours, optax factory, float32 rtol). optax computes in float32 by default, so the
# main comparison runs optax under jax.enable_x64 and demands 1e-12 relative; the float32 run
# (what optax users actually get) is checked to 1e-6 relative, plus an absolute 1e-6 * peak
# for values near zero (float32 cancellation in 1 + cos near pi gives ~2e-4 *relative* error
# there). The growing exponential needs 2e-5: rate**p multiplies float32's rounding of `rate`
# (~5e-8 relative) by p ~ 190.

OPTAX_CASES = {
    "linear": (
        schedules.linear(0.1, 1e-3, steps=200),
        lambda: optax.linear_schedule(0.1, 1e-3, 200),
        1e-6,
    ),
    "linear_up": (
        schedules.linear(0.0, 0.1, steps=50),
        lambda: optax.linear_schedule(0.0, 0.1, 50),
        1e-6,
    ),
    "cosine": (
        schedules.cosine(0.1, steps=250),
        lambda: optax.cosine_decay_schedule(0.1, 250),
        1e-6,
    ),
    "cosine_floor": (  # our absolute floor is optax's alpha * init
        schedules.cosine(0.1, steps=250, floor=1e-3),
        lambda: optax.cosine_decay_schedule(0.1, 250, alpha=1e-3 / 0.1),
        1e-6,
    ),
    "exponential": (
        schedules.exponential(0.1, rate=0.97, steps=3),
        lambda: optax.exponential_decay(0.1, 3, 0.97),
        1e-6,
    ),
    "exponential_staircase_end": (
        schedules.exponential(0.1, rate=0.9, steps=7, staircase=True, end=0.02),
        lambda: optax.exponential_decay(0.1, 7, 0.9, staircase=True, end_value=0.02),
        1e-6,
    ),
    "exponential_up_end": (
        schedules.exponential(1e-4, rate=1.05, end=1.0),
        lambda: optax.exponential_decay(1e-4, 1, 1.05, end_value=1.0),
        2e-5,
    ),
    "piecewise_constant": (  # optax multiplies scales: 0.1 * 0.1 = 0.01, then * 0.1 = 0.001
        schedules.piecewise_constant(0.1, {50: 0.01, 150: 0.001}),
        lambda: optax.piecewise_constant_schedule(0.1, {50: 0.1, 150: 0.1}),
        1e-6,
    ),
    "join": (
        schedules.join(
            [schedules.linear(0.0, 0.1, 30), schedules.cosine(0.1, 100), 0.05], [30, 130]
        ),
        lambda: optax.join_schedules(
            [
                optax.linear_schedule(0.0, 0.1, 30),
                optax.cosine_decay_schedule(0.1, 100),
                optax.constant_schedule(0.05),
            ],
            [30, 130],
        ),
        1e-6,
    ),
    "warmup_cosine": (
        schedules.warmup(20, then=schedules.cosine(0.1, steps=230, floor=1e-3), init=1e-4),
        lambda: optax.warmup_cosine_decay_schedule(1e-4, 0.1, 20, 250, end_value=1e-3),
        1e-6,
    ),
    "warmup_exponential": (
        schedules.warmup(20, then=schedules.exponential(0.1, 0.9, 10, staircase=True, end=1e-3)),
        lambda: optax.warmup_exponential_decay_schedule(
            0.0, 0.1, 20, 10, 0.9, staircase=True, end_value=1e-3
        ),
        1e-6,
    ),
    "warmup_constant": (
        schedules.warmup(20, then=0.1),
        lambda: optax.warmup_constant_schedule(0.0, 0.1, 20),
        1e-6,
    ),
}


def optax_values(make: Callable[[], Callable]) -> np.ndarray:
    sched = make()
    # optax's optimizers pass the step count as an integer array
    return np.array([sched(jnp.asarray(k)) for k in range(N + 1)], dtype=float)


@pytest.mark.parametrize("case", OPTAX_CASES.values(), ids=OPTAX_CASES.keys())
def test_matches_optax_float64(case: tuple) -> None:
    ours, make, _ = case
    with jax.enable_x64(True):
        theirs = optax_values(make)
    np.testing.assert_allclose(values(ours), theirs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", OPTAX_CASES.values(), ids=OPTAX_CASES.keys())
def test_matches_optax_float32(case: tuple) -> None:
    ours, make, rtol = case
    expected = np.array(values(ours))
    theirs = optax_values(make)
    np.testing.assert_allclose(theirs, expected, rtol=rtol, atol=1e-6 * np.abs(expected).max())


# --- torch.optim.lr_scheduler ---------------------------------------------------------------
# torch's schedulers are recursive (lr_{s+1} = f(lr_s)), ours are closed-form, so they agree
# to float64 rounding accumulated over the steps, not bit for bit: 1e-12 relative. StepLR and
# MultiStepLR happen to agree exactly here.

LR = 0.1


def torch_lrs(make: Callable[[torch.optim.Optimizer], object], n: int = N) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = torch.optim.SGD([param], lr=LR)
    sched = make(opt)
    lrs = []
    for _ in range(n + 1):
        lrs.append(opt.param_groups[0]["lr"])  # the lr the next optimizer step will use
        param.grad = torch.ones_like(param)
        opt.step()
        sched.step()  # type: ignore[attr-defined]
    return lrs


lr_scheduler = torch.optim.lr_scheduler

TORCH_CASES = {
    # CosineAnnealingLR is periodic: compare up to T_max only (see the test below)
    "CosineAnnealingLR": (
        schedules.cosine(LR, steps=N, floor=1e-3),
        lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=N, eta_min=1e-3),
    ),
    "CosineAnnealingLR_zero_floor": (
        schedules.cosine(LR, steps=N),
        lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=N),
    ),
    "ExponentialLR": (
        schedules.exponential(LR, rate=0.98),
        lambda o: lr_scheduler.ExponentialLR(o, gamma=0.98),
    ),
    "StepLR": (
        schedules.exponential(LR, rate=0.5, steps=30, staircase=True),
        lambda o: lr_scheduler.StepLR(o, step_size=30, gamma=0.5),
    ),
    "MultiStepLR": (
        schedules.piecewise_constant(LR, {30: LR * 0.3, 80: LR * 0.3**2, 200: LR * 0.3**3}),
        lambda o: lr_scheduler.MultiStepLR(o, milestones=[30, 80, 200], gamma=0.3),
    ),
    "LinearLR_warmup": (
        schedules.linear(LR * 0.25, LR, steps=40),
        lambda o: lr_scheduler.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=40),
    ),
    "LinearLR_decay": (
        schedules.linear(LR, LR * 0.01, steps=100),
        lambda o: lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.01, total_iters=100),
    ),
}


@pytest.mark.parametrize("case", TORCH_CASES.values(), ids=TORCH_CASES.keys())
def test_matches_torch(case: tuple) -> None:
    ours, make = case
    np.testing.assert_allclose(values(ours), torch_lrs(make), rtol=1e-12, atol=0)


def test_torch_cosine_annealing_rises_after_t_max_ours_holds_floor() -> None:
    ours = schedules.cosine(LR, steps=50, floor=1e-3)
    theirs = torch_lrs(lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=50, eta_min=1e-3), 80)
    assert theirs[50] == pytest.approx(1e-3, rel=1e-12)
    assert theirs[80] > 1e-2 and ours(80) == 1e-3


# --- validation -----------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def ill_typed(x: object) -> Any:
    """Lets the validation tests pass deliberately wrong types past mypy."""
    return x


BAD: list[tuple[Callable[[], object], str]] = [
    (lambda: schedules.constant(NAN), "constant: value must be a finite number, got nan"),
    (
        lambda: schedules.constant(ill_typed("0.1")),
        "constant: value must be a finite number, got '0.1'",
    ),
    (lambda: schedules.constant(True), "constant: value must be a finite number, got True"),
    (lambda: schedules.linear(INF, 0.0, 10), "linear: init must be a finite number, got inf"),
    (lambda: schedules.linear(1.0, NAN, 10), "linear: end must be a finite number, got nan"),
    (lambda: schedules.linear(1.0, 0.0, 0), "linear: steps must be a positive integer, got 0"),
    (
        lambda: schedules.linear(1.0, 0.0, ill_typed(2.5)),
        "linear: steps must be a positive integer, got 2.5",
    ),
    (lambda: schedules.cosine(1.0, steps=0), "cosine: steps must be a positive integer, got 0"),
    (lambda: schedules.cosine(1.0, steps=-3), "cosine: steps must be a positive integer, got -3"),
    (lambda: schedules.cosine(NAN, 10), "cosine: init must be a finite number, got nan"),
    (
        lambda: schedules.cosine(1.0, 10, floor=-INF),
        "cosine: floor must be a finite number, got -inf",
    ),
    (lambda: schedules.exponential(INF, 0.5), "exponential: init must be a finite number, got inf"),
    (lambda: schedules.exponential(1.0, NAN), "exponential: rate must be a finite number, got nan"),
    (lambda: schedules.exponential(1.0, 0.0), "exponential: rate must be positive, got 0.0"),
    (lambda: schedules.exponential(1.0, -0.5), "exponential: rate must be positive, got -0.5"),
    (
        lambda: schedules.exponential(1.0, 0.5, steps=0),
        "exponential: steps must be a positive integer, got 0",
    ),
    (
        lambda: schedules.exponential(1.0, 0.5, end=NAN),
        "exponential: end must be a finite number, got nan",
    ),
    (
        lambda: schedules.exponential(1.0, 0.5, end=2.0),
        "exponential: end must be <= init=1.0 when rate < 1 (a lower bound), got 2.0",
    ),
    (
        lambda: schedules.exponential(1.0, 2.0, end=0.5),
        "exponential: end must be >= init=1.0 when rate >= 1 (an upper bound), got 0.5",
    ),
    (
        lambda: schedules.piecewise_constant(NAN, {1: 0.1}),
        "piecewise_constant: init must be a finite number, got nan",
    ),
    (
        lambda: schedules.piecewise_constant(1.0, {-1: 0.1}),
        "piecewise_constant: each boundary must be a non-negative integer, got -1",
    ),
    (
        lambda: schedules.piecewise_constant(1.0, {ill_typed(2.5): 0.1}),
        "piecewise_constant: each boundary must be a non-negative integer, got 2.5",
    ),
    (
        lambda: schedules.piecewise_constant(1.0, {5: INF}),
        "piecewise_constant: the value at boundary 5 must be a finite number, got inf",
    ),
    (
        lambda: schedules.warmup(-1, then=1.0),
        "warmup: steps must be a non-negative integer, got -1",
    ),
    (
        lambda: schedules.warmup(5, then=1.0, init=NAN),
        "warmup: init must be a finite number, got nan",
    ),
    (
        lambda: schedules.join([1.0, 2.0], [1, 2]),
        "join: needs len(boundaries) + 1 schedules, got 2 schedules and boundaries=[1, 2]",
    ),
    (
        lambda: schedules.join([1.0, 2.0, 3.0], [5, 5]),
        "join: boundaries must be strictly increasing, got [5, 5]",
    ),
    (
        lambda: schedules.join([1.0, 2.0], [-1]),
        "join: each boundary must be a non-negative integer, got -1",
    ),
    (
        lambda: schedules.join([1.0, 2.0], [ill_typed(1.5)]),
        "join: each boundary must be a non-negative integer, got 1.5",
    ),
    # a string "false" is true: it ran the staircase, and the third phase
    (
        lambda: schedules.exponential(0.1, 0.5, 10, staircase=ill_typed("false")),
        "exponential: staircase must be True or False, got 'false'",
    ),
    (
        lambda: schedules.exponential(0.1, 0.5, 10, staircase=ill_typed(None)),
        "exponential: staircase must be True or False, got None",
    ),
    (
        lambda: schedules.onecycle(1.0, 100, three_phase=ill_typed("no")),
        "onecycle: three_phase must be True or False, got 'no'",
    ),
    # pairs for a dict: an AttributeError ('list' object has no attribute 'items')
    (
        lambda: schedules.piecewise_constant(0.1, ill_typed([(10, 0.01)])),
        "piecewise_constant: boundaries_and_values must be a dict of boundary: value, got "
        "[(10, 0.01)]",
    ),
    (
        lambda: schedules.piecewise_interpolate(0.1, ill_typed([(10, 0.01)])),
        "piecewise_interpolate: boundaries_and_values must be a dict of boundary: value, got "
        "[(10, 0.01)]",
    ),
    # the field the caller wrote, not the helper that checked it (piecewise_interpolate,
    # constant, as_schedule)
    (
        lambda: schedules.onecycle(1.0, 100, kind=ill_typed("cos")),
        "onecycle: kind must be one of 'linear', 'cosine', got 'cos'",
    ),
    (
        lambda: schedules.onecycle(1e300, 100, div=1e-10),
        "onecycle: peak / div / final_div must be finite, got inf (peak=1e+300, div=1e-10, "
        "final_div=10000.0)",
    ),
    (lambda: schedules.join([NAN, 1], [9]), "join: schedules[0] must be a finite number, got nan"),
    (lambda: schedules.join([1, INF], [9]), "join: schedules[1] must be a finite number, got inf"),
    (lambda: schedules.warmup(100, INF), "warmup: then must be a finite number, got inf"),
    (lambda: schedules.as_schedule(NAN), "as_schedule: x must be a finite number, got nan"),
    (lambda: schedules.product(), "product: needs at least one factor"),
    (lambda: schedules.product(0.5, NAN), "product: each factor must be a finite number, got nan"),
]


def test_numpy_bools_are_flags() -> None:
    import numpy as np

    assert schedules.exponential(0.1, 0.5, 10, staircase=np.True_)(15) == 0.05
    assert schedules.onecycle(1.0, 100, three_phase=np.False_)(99) < 1e-4


def test_arithmetic_on_a_schedule_says_what_to_write() -> None:
    """``sched * 0.5`` at a module's top level failed in ``sys._getframe`` (call stack is not
    deep enough), and elsewhere said that a torch scheduler drove the group."""
    s = schedules.cosine(0.03, steps=1000)
    for op in (lambda: s * 0.5, lambda: 0.5 * s, lambda: s * s):
        with pytest.raises(TypeError, match=r"is a uniopt schedule, not a number: no arithmetic "
                                            r"is defined on it; schedules.product\("):
            op()
    # product only where it is what was written: s + 0.5 was told schedules.product(s, 0.5)
    said = r"no arithmetic is defined on it; a schedule is any function of the step: lambda s: "
    for op, meant in ((lambda: s + 0.5, r"schedule\(s\) \+ 0\.5, with schedule this one, is"),
                      (lambda: 1 - s, r"1 - schedule\(s\), with schedule this one, is"),
                      (lambda: s ** 2, r"schedule\(s\) \*\* 2, with"),
                      (lambda: 2 / s, r"2 / schedule\(s\), with"),
                      (lambda: s + s, r"schedule\(s\) \+ other\(s\), with schedule this one "
                                      r"and other the other, is")):
        with pytest.raises(TypeError, match=said + meant) as e:
            op()
        assert "product" not in str(e.value)
    with pytest.raises(TypeError, match=r"schedules.product\(cosine\(.*\), 0\.5\) is its quotient "
                                        r"by that number"):
        s / 2
    with pytest.raises(TypeError, match=r"is a uniopt schedule, not a number: its value at a "
                                        r"step is cosine\(.*\)\(step\)"):
        float(s)
    # product only where product takes it: an array peak was told schedules.product(s,
    # tensor(0.1000)) (which product refuses), s / nan product(s, nan), s / inf product(s, 0.0)
    for op in (lambda: torch.tensor(0.1) * s, lambda: s * jnp.float32(0.1),
               lambda: s / np.asarray(2.0)):
        with pytest.raises(TypeError, match=r"is an array: .*scale a schedule of 1") as e:
            op()
        assert "product" not in str(e.value)
    with pytest.raises(TypeError, match=r"is an array: .*scale a schedule of 1"):
        jax.vmap(lambda peak: peak * s)(jnp.asarray([0.1, 0.2]))
    for op in (lambda: s / math.nan, lambda: s / math.inf, lambda: s / 1e-320,
               lambda: s * math.nan, lambda: math.inf * s):
        with pytest.raises(TypeError, match=said) as e:
            op()
        assert "product" not in str(e.value)
    with pytest.raises(TypeError, match=r"schedules.product\(cosine\(.*\), np.float64\(0\.25\)\)"):
        s / np.float64(4.0)
    # at the top of a program's stack
    code = compile("s * 0.5", "<module>", "exec")
    with pytest.raises(TypeError, match="no arithmetic is defined on it"):
        exec(code, {"s": s})


@pytest.mark.parametrize(("make", "message"), BAD, ids=[m for _, m in BAD])
def test_validation(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        make()


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda: schedules.warmup(5, then=ill_typed("fast")), "warmup: then must be"),
        (lambda: schedules.join([1.0, ill_typed("fast")], [5]), "join: schedules[1] must be"),
        (lambda: schedules.as_schedule(ill_typed("fast")), "as_schedule: expected"),
    ],
)
def test_non_schedule_is_type_error(make: Callable[[], object], said: str) -> None:
    with pytest.raises(TypeError, match=f"^{re.escape(said)} a number or a callable step -> "
                                        "float, got 'fast'$"):
        make()


# --- as_schedule ----------------------------------------------------------------------------


def test_as_schedule_number() -> None:
    assert schedules.as_schedule(0.1) == schedules.constant(0.1)
    assert schedules.as_schedule(3)(7) == 3.0
    assert schedules.as_schedule(np.float32(0.5))(0) == 0.5


def test_as_schedule_callable_is_returned_as_is() -> None:
    c = schedules.cosine(1.0, steps=10)
    assert schedules.as_schedule(c) is c

    def f(step: int) -> float:
        return 1.0 / (1 + step)

    assert schedules.as_schedule(f) is f


@pytest.mark.parametrize("bad", [None, True, "0.1", [0.1], 1j])
def test_as_schedule_rejects(bad: object) -> None:
    with pytest.raises(TypeError, match=re.escape(repr(bad))):
        schedules.as_schedule(bad)  # type: ignore[arg-type]


def test_any_lambda_is_a_schedule() -> None:
    lam = lambda step: 0.1 * 0.5**step  # noqa: E731
    assert schedules.as_schedule(lam)(2) == 0.025
    assert schedules.warmup(2, then=lam)(3) == 0.05
    assert schedules.join([lam, lam], [2])(3) == 0.05


@pytest.mark.parametrize("make", [
    lambda f: schedules.warmup(5, f),
    lambda f: schedules.join([0.1, f], [5]),
    lambda f: schedules.product(f, 2.0),
    lambda f: schedules.warmup(3, schedules.join([f, schedules.product(f, 0.5)], [4])),
], ids=["warmup", "join", "product", "nested"])
def test_a_function_nested_in_a_record_gets_the_integer_count_under_jax(make: Any) -> None:
    """A function of your own inside ``warmup``/``join``/``product`` got the count as a float
    under JAX (the record's own arithmetic takes it so), where docs/schedules.md promises it
    the state's integer, as optax hands it: a table indexed by it raised ("Indexer must have
    integer or boolean type"), and warmup's ramp read its value at 0 with Python's min, which
    a traced value refuses under jax.jit. Now it gets the integer, eager and jitted, and the
    record's values are those of the NumPy run, where every count is a Python int."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    table = [0.1, 0.05, 0.01, 0.005]
    seen: list[Any] = []

    def mine(count: Any) -> Any:
        seen.append(getattr(count, "dtype", type(count)))
        if isinstance(count, int):
            return table[min(count // 4, 3)]
        return jnp.asarray(table)[jnp.minimum(count // 4, 3)]

    sched = make(mine)
    params = {"w": np.ones(3)}
    grads = {"w": np.linspace(0.5, 1.5, 3)}
    want = [params]
    state = uo.setup(uo.sgd(lr=sched), params)
    for _ in range(14):
        state, p = uo.update(state, want[-1], grads)
        want.append(p)
    for step in (uo.update, jax.jit(uo.update)):
        seen.clear()
        js = {"w": jnp.asarray(params["w"])}
        state = uo.setup(uo.sgd(lr=sched), js)
        for t in range(14):
            state, js = step(state, js, {"w": jnp.asarray(grads["w"])})
            # (JAX in float32, x64 off: NumPy in float64)
            np.testing.assert_allclose(np.asarray(js["w"]), want[t + 1]["w"], rtol=1e-6,
                                       atol=1e-6)
        assert seen and all(jnp.issubdtype(d, jnp.integer) for d in seen if d is not int), seen


@pytest.mark.parametrize("sched", [
    schedules.linear(1.0, 0.0, 10), schedules.cosine(0.01, 100),
    schedules.warmup(5, 1e-2), schedules.polynomial(1.0, 0.1, 20, 2.0),
    schedules.join([0.1, schedules.linear(0.1, 0.0, 10)], [5]),
], ids=["linear", "cosine", "warmup", "polynomial", "join"])
def test_a_records_value_at_a_torch_tensor_count(sched: Any) -> None:
    """A torch tensor count (a capturable step's) gives the int count's value: the ramp's clip
    took the array namespace's minimum of two Python numbers, which torch's refuses."""
    for k in (0, 3, 7, 30):
        assert float(sched(torch.tensor(k, dtype=torch.float64))) == pytest.approx(
            sched(k), rel=1e-15, abs=1e-18)


_AT_THE_END = {
    "linear": lambda: schedules.linear(1.0, 0.0, steps=10),
    "cosine": lambda: schedules.cosine(1.0, steps=10),
    "exponential": lambda: schedules.exponential(1.0, rate=0.9),
    "inverse_sqrt": lambda: schedules.inverse_sqrt(1e-3, 4000),
    "warmup-inverse_sqrt": lambda: schedules.warmup(4000, schedules.inverse_sqrt(1e-3, 4000)),
    "bias_correction": lambda: schedules.bias_correction(0.9, power=-0.5),
    "sgdr": lambda: schedules.sgdr(1.0, steps=100),
    "cyclic": lambda: schedules.cyclic(0.0, 1.0, 2),
}


@pytest.mark.parametrize("name", sorted(_AT_THE_END))
def test_a_schedule_at_the_end_of_optaxs_int32_count_is_its_value(name: str) -> None:
    """As an optax schedule a record is handed optax's int32 count, which stops at 2**31 - 1:
    inverse_sqrt's ``step + timescale`` (an int timescale) and bias_correction's ``step + 1``
    wrapped there (a NaN, a correction of 0); each is its value at the Python count."""
    s = _AT_THE_END[name]()
    for k in (2**31 - 4001, 2**31 - 2, 2**31 - 1):
        got = float(s(jnp.asarray(k, jnp.int32)))
        assert math.isfinite(got)
        assert got == pytest.approx(float(s(k)), rel=1e-6, abs=1e-30), k


def test_an_array_for_a_schedules_number_is_refused_saying_what_to_write() -> None:
    """A peak lr swept under ``jax.vmap`` (or differentiated under ``jax.grad``) is a traced
    array, which a schedule's fields refuse (they are data, saved, and part of a jitted
    step's structure): the message said only "must be a finite number". It says how to scale
    a schedule of 1 instead, which runs under vmap."""
    with pytest.raises(ValueError, match=r"cosine: init must be a finite number, got "
                                         r"VmapTracer.*scale a schedule of 1"):
        jax.vmap(lambda x: schedules.cosine(x, steps=10)(3))(jnp.ones(2))
    with pytest.raises(TypeError, match=r"as_schedule: .*scale a schedule of 1"):
        schedules.as_schedule(jnp.asarray(0.1))
    got = jax.vmap(lambda x: x * schedules.cosine(1.0, steps=10)(3))(jnp.asarray([1.0, 2.0]))
    np.testing.assert_allclose(np.asarray(got), [schedules.cosine(1.0, steps=10)(3),
                                                 2 * schedules.cosine(2.0, steps=10)(3) / 2])


# --- stairs, cycles, phases and ends under jax.jit: exactly Python's ----------------------------

def _reciprocal_misses(dtype: Any, count: int) -> list[int]:
    """The first step counts ``n`` with ``n * (1 / n) != 1`` in ``dtype``: XLA divides by a
    constant as a multiply by its rounded reciprocal, so a quotient ``s / n`` decides a stair, a
    cycle or an end one update late there (41, 47, 55, ... in float32; 49, 98, ... in float64)."""
    one = dtype(1)
    return [n for n in range(1, 1000) if dtype(n) * (one / dtype(n)) != one][:count]


_SIZES = [1, 2, 3, 10, *_reciprocal_misses(np.float32, 4), *_reciprocal_misses(np.float64, 4)]


def _restarts(n: int, m: int) -> list[int]:
    out, start, length = [], n, n * m
    while start < 2**24:  # float32 steps are exact to 2**24
        out.append(start)
        start, length = start + length, length * m
    return out


# name: (the schedule for a step count n, the steps where its value turns: a stair, a restart,
# a peak or an end, at a value float32 holds)
_DECISIONS: dict[str, tuple[Callable[[int], Any], Callable[[int], list[int]]]] = {
    "linear": (lambda n: schedules.linear(1.0, 0.0, n), lambda n: [0, n, 7 * n]),
    "linear up": (lambda n: schedules.linear(0.0, 1.0, n), lambda n: [0, n, 7 * n]),
    "cosine": (lambda n: schedules.cosine(1.0, n), lambda n: [0, n, 7 * n]),
    "polynomial": (lambda n: schedules.polynomial(1.0, 0.0, n, 2.0), lambda n: [0, n, 7 * n]),
    "staircase": (lambda n: schedules.exponential(1.0, 0.5, n, staircase=True),
                  lambda n: [k * n + d for k in range(1, 41) for d in (-1, 0)]),
    "cyclic": (lambda n: schedules.cyclic(0.0, 1.0, n, 2 * n + 1, mode="triangular2"),
               lambda n: [k * (3 * n + 1) + d for k in range(12) for d in (0, n)]),
    "wsd linear": (lambda n: schedules.wsd(1.0, n, 3, n, shape="linear"),
                   lambda n: [n, n + 3, 2 * n + 3]),
    "wsd 1-sqrt": (lambda n: schedules.wsd(1.0, 2, n, n), lambda n: [2, n + 2, 2 * n + 2]),
    "inverse_sqrt": (lambda n: schedules.warmup(n, schedules.inverse_sqrt(1.0, n)),
                     lambda n: [0, n]),
}
# sgdr's restarts are sums of powers of mult (7 * (1 + 7) = 56): a division by mult - 1 missed
# them; each schedule is a (steps, mult) pair
_SGDR = [(n, m) for n in (1, 7) for m in (2, 6, 7, 12)]
_DECISIONS["sgdr"] = (lambda i: schedules.sgdr(1.0, *_SGDR[i]),
                      lambda i: [0, *_restarts(*_SGDR[i])])


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "x64"])
@pytest.mark.parametrize("name", sorted(_DECISIONS))
def test_decisions_under_jit_are_pythons(name: str, x64: bool) -> None:
    """Each stair, cycle, restart, peak and end under ``jax.jit`` falls on the step Python's
    puts it: uo.update hands a schedule its count as the default float, optax as the int32
    count, and under jit ``s / n`` is ``s * (1 / n)``. sgdr with ``mult=7, steps=7`` was at
    its floor at the restart (7 * (1 / 6) * 6 = 7.0000005), StepLR with 41 steps decayed a
    step late, linear(1, 0, 41) ended an ulp above 0. At each decision the jitted value is
    Python's exactly, a step either side they agree to float32's rounding. The step counts are
    the first whose reciprocal rounds in float32 and in float64, and a few others."""
    make, points = _DECISIONS[name]
    sizes = range(len(_SGDR)) if name == "sgdr" else _SIZES
    scheds = [make(n) for n in sizes]
    # each decision's step and its neighbours
    steps = [np.add.outer(points(n), [-1, 0, 1]).clip(0).ravel() for n in sizes]
    with jax.enable_x64(x64):

        def values(ks: list[Any]) -> list[Any]:
            return [f(k) for s, k in zip(scheds, ks, strict=True)
                    for f in (jax.vmap(lambda c, s=s: uo.hyper.resolve(s, c)), jax.vmap(s))]

        got = jax.jit(values)([jnp.asarray(k, jnp.int32) for k in steps])
    for i, (s, ks) in enumerate(zip(scheds, steps, strict=True)):
        want = np.array([s(int(k)) for k in ks])
        exact = np.arange(len(ks)) % 3 == 1
        for g in got[2 * i:2 * i + 2]:
            g = np.asarray(g, dtype=float)
            bad = np.flatnonzero(exact & (g != want))
            assert not len(bad), (s, ks[bad].tolist(), g[bad].tolist(), want[bad].tolist())
            np.testing.assert_allclose(g, want, rtol=0, atol=1e-6, err_msg=repr(s))


def test_sgdr_at_an_infinite_step_fails_rather_than_walking_its_cycles_forever() -> None:
    """A Python step walks sgdr's cycles in whole numbers; an infinite one walked them without
    end. It now fails at once, as it did before the walk (math's cosine of inf)."""
    import threading

    out: list[BaseException] = []

    def call() -> None:
        try:
            schedules.sgdr(1.0, steps=10, mult=2)(math.inf)
        except ValueError as e:
            out.append(e)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and len(out) == 1
