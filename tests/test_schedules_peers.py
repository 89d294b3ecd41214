"""uniopt.schedules against their peers at every one of 10,000 steps, to 1e-12 relative (float64):
torch.optim.lr_scheduler (stepped as a training loop steps it, and torch's closed forms),
optax (float64) and transformers. Where a peer is off, the exact value decides: the tests at the
end measure each such disagreement (docs/schedules.md, "Where the peers are off")."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from uniopt import schedules as us

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")
torch = pytest.importorskip("torch")

N = 10_000
STEPS = np.arange(N)
LR = 0.1
lr_scheduler = torch.optim.lr_scheduler
Refs = Callable[[], dict[str, np.ndarray]]


def torch_optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))], lr=LR)


def stepped(make: Callable[[Any], Any], n: int = N) -> tuple[np.ndarray, Any]:
    """The lr each of the first ``n`` updates sees, read before each scheduler step."""
    opt = torch_optimizer()
    sched = make(opt)
    opt.step()  # no gradient, no change: only so torch doesn't warn that the scheduler went first
    lrs = np.empty(n)
    for k in range(n):
        lrs[k] = opt.param_groups[0]["lr"]
        sched.step()
    return lrs, opt


def torch_(make: Callable[[Any], Any], n: int = N) -> Refs:
    """torch's values as a training loop gets them and, where the scheduler has one, its closed
    form (the exact formula, which its recursive ``get_lr`` approximates)."""

    def refs() -> dict[str, np.ndarray]:
        out = {"torch": stepped(make, n)[0]}
        sched = make(torch_optimizer())
        if hasattr(sched, "_get_closed_form_lr"):
            closed = np.empty(n)
            for k in range(n):
                sched.last_epoch = k
                closed[k] = sched._get_closed_form_lr()[0]
            out["torch closed form"] = closed
        return out

    return refs


# transformers' schedules, imported when a case runs (its import costs every worker seconds at
# collection)
def get_wsd_schedule(*args: Any, **kwargs: Any) -> Any:
    from transformers.optimization import get_wsd_schedule

    return get_wsd_schedule(*args, **kwargs)


def get_inverse_sqrt_schedule(*args: Any, **kwargs: Any) -> Any:
    from transformers.optimization import get_inverse_sqrt_schedule

    return get_inverse_sqrt_schedule(*args, **kwargs)


def transformers_(make: Callable[[Any], Any]) -> Refs:
    return lambda: {"transformers": stepped(make)[0]}


def optax_(make: Callable[[], Callable]) -> Refs:
    # float64, op by op: under jax.jit, XLA contracts a * b + c into an fma and divides by
    # multiplying with the reciprocal, which moves the last bits (see test_optax_polynomial_jit)
    def refs() -> dict[str, np.ndarray]:
        with jax.enable_x64(True):
            return {"optax": np.asarray(jax.vmap(make())(jnp.arange(N)), dtype=float)}

    return refs


def same_as(sched: us.Schedule) -> Refs:
    """A composition of existing schedules the case must equal."""
    return lambda: {repr(sched): np.asarray(sched(STEPS), dtype=float)}  # type: ignore[arg-type]


P, DIV, FINAL = LR, 25.0, 1e4  # optax's onecycles: values as its cumulative product makes them
SGDR_CYCLES = [100 * 2**i for i in range(7)]  # 12,700 steps
SGDR_STARTS = list(np.cumsum(SGDR_CYCLES)[:-1])

CASES: dict[str, tuple[Any, tuple[Refs, ...]]] = {
    # --- polynomial
    "polynomial": (  # optax's misses the last bits here: test_polynomial_end
        us.polynomial(LR, 0.0, 8000, power=2.0),
        (torch_(lambda o: lr_scheduler.PolynomialLR(o, total_iters=8000, power=2.0)),),
    ),
    "polynomial_sqrt": (
        us.polynomial(LR, 0.0, N, power=0.5),
        (torch_(lambda o: lr_scheduler.PolynomialLR(o, total_iters=N, power=0.5)),),
    ),
    "polynomial_begin_end": (
        us.join([LR, us.polynomial(LR, 1e-4, 7000, power=1.5)], [1000]),
        (optax_(lambda: optax.polynomial_schedule(LR, 1e-4, 1.5, 7000, transition_begin=1000)),),
    ),
    # --- one-cycle: torch's knots (onecycle) and optax's (piecewise_interpolate)
    "OneCycleLR": (
        us.onecycle(LR, N),
        (torch_(lambda o: lr_scheduler.OneCycleLR(o, LR, N, cycle_momentum=False)),),
    ),
    "OneCycleLR_linear": (  # torch misses its last value: test_torch_onecycle_linear_end
        us.onecycle(LR, N, kind="linear"),
        (
            torch_(
                lambda o: lr_scheduler.OneCycleLR(
                    o, LR, N, anneal_strategy="linear", cycle_momentum=False
                ),
                n=N - 1,
            ),
        ),
    ),
    "OneCycleLR_three_phase_linear": (
        us.onecycle(LR, N, 0.25, div=10.0, final_div=100.0, kind="linear", three_phase=True),
        (
            torch_(
                lambda o: lr_scheduler.OneCycleLR(
                    o, LR, N, pct_start=0.25, div_factor=10.0, final_div_factor=100.0,
                    anneal_strategy="linear", three_phase=True, cycle_momentum=False,
                )
            ),
        ),
    ),
    "OneCycleLR_three_phase": (
        us.onecycle(LR, N, 0.35, three_phase=True),
        (
            torch_(
                lambda o: lr_scheduler.OneCycleLR(
                    o, LR, N, pct_start=0.35, three_phase=True, cycle_momentum=False
                )
            ),
        ),
    ),
    "cosine_onecycle_schedule": (
        us.piecewise_interpolate(
            P / DIV, {3000: P / DIV * DIV, N: P / DIV * DIV * (1 / (DIV * FINAL))}, "cosine"
        ),
        (optax_(lambda: optax.cosine_onecycle_schedule(N, P)),),
    ),
    "linear_onecycle_schedule": (
        us.piecewise_interpolate(
            P / DIV,
            {3000: P / DIV * DIV, 8500: P / DIV * DIV / DIV, N: P / DIV * DIV / DIV / FINAL},
        ),
        (optax_(lambda: optax.linear_onecycle_schedule(N, P)),),
    ),
    # --- piecewise interpolation: optax multiplies scales, uniopt sets values
    "piecewise_interpolate_linear": (
        us.piecewise_interpolate(LR, {1000: LR * 0.5, 4000: LR * 0.05, 9000: LR * 0.05 * 2}),
        (
            optax_(
                lambda: optax.piecewise_interpolate_schedule(
                    "linear", LR, {1000: 0.5, 4000: 0.1, 9000: 2.0}
                )
            ),
        ),
    ),
    "piecewise_interpolate_cosine": (
        us.piecewise_interpolate(LR, {0: LR * 0.5, 4000: LR * 0.05, 9000: LR * 0.05 * 2}, "cosine"),
        (
            optax_(
                lambda: optax.piecewise_interpolate_schedule(
                    "cosine", LR, {0: 0.5, 4000: 0.1, 9000: 2.0}
                )
            ),
        ),
    ),
    # --- SGDR
    "sgdr": (
        us.sgdr(LR, 100, mult=2, floor=1e-4),
        (
            torch_(lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, 100, 2, eta_min=1e-4)),
            optax_(
                lambda: optax.sgdr_schedule(
                    [
                        {"init_value": LR, "peak_value": LR, "warmup_steps": 0,
                         "decay_steps": t, "end_value": 1e-4}
                        for t in SGDR_CYCLES
                    ]
                )
            ),
        ),
    ),
    "sgdr_mult3": (
        us.sgdr(LR, 7, mult=3),
        (torch_(lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, 7, 3)),),
    ),
    "sgdr_mult1": (
        us.sgdr(LR, 300, floor=1e-3),
        (torch_(lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, 300, eta_min=1e-3)),),
    ),
    "sgdr_schedule_warmups": (  # optax's cycles each warm up: a join of warmups
        us.join([us.warmup(50, us.cosine(LR, t - 50, floor=1e-4)) for t in SGDR_CYCLES],
                SGDR_STARTS),
        (
            optax_(
                lambda: optax.sgdr_schedule(
                    [
                        {"init_value": 0.0, "peak_value": LR, "warmup_steps": 50,
                         "decay_steps": t, "end_value": 1e-4}
                        for t in SGDR_CYCLES
                    ]
                )
            ),
        ),
    ),
    # --- cyclic
    "CyclicLR": (
        us.cyclic(1e-3, LR, 200, 300),
        (torch_(lambda o: lr_scheduler.CyclicLR(o, 1e-3, LR, 200, 300, cycle_momentum=False)),),
    ),
    "CyclicLR_triangular2": (
        us.cyclic(1e-3, LR, 250, mode="triangular2"),
        (
            torch_(
                lambda o: lr_scheduler.CyclicLR(
                    o, 1e-3, LR, 250, mode="triangular2", cycle_momentum=False
                )
            ),
        ),
    ),
    "CyclicLR_exp_range": (
        us.cyclic(1e-3, LR, 100, mode="exp_range", gamma=0.9995),
        (
            torch_(
                lambda o: lr_scheduler.CyclicLR(
                    o, 1e-3, LR, 100, mode="exp_range", gamma=0.9995, cycle_momentum=False
                )
            ),
        ),
    ),
    # --- warmup-stable-decay, inverse square root: transformers' LambdaLRs
    "wsd_1-sqrt": (
        us.wsd(LR, 500, 7500, 2000),
        (transformers_(lambda o: get_wsd_schedule(o, 500, 2000, N, decay_type="1-sqrt")),),
    ),
    "wsd_linear": (
        us.wsd(LR, 500, 1500, 8000, shape="linear"),
        (transformers_(lambda o: get_wsd_schedule(o, 500, 8000, N, decay_type="linear")),),
    ),
    "wsd_cosine_floor": (
        us.wsd(LR, 500, 7500, 2000, floor=LR * 0.1, shape="cosine", init=LR * 0.1),
        (
            transformers_(
                lambda o: get_wsd_schedule(
                    o, 500, 2000, N, decay_type="cosine", min_lr_ratio=0.1
                )
            ),
            same_as(us.warmup(500, us.join([LR, us.cosine(LR, 2000, LR * 0.1)], [7500]), LR * 0.1)),
        ),
    ),
    "inverse_sqrt": (
        us.warmup(500, us.inverse_sqrt(LR, timescale=500)),
        (transformers_(lambda o: get_inverse_sqrt_schedule(o, 500)),),
    ),
    "inverse_sqrt_timescale": (
        us.warmup(500, us.inverse_sqrt(LR, timescale=2000)),
        (transformers_(lambda o: get_inverse_sqrt_schedule(o, 500, timescale=2000)),),
    ),
    # no warm-up and no timescale: transformers' timescale is then 10,000 (docs/schedules.md:
    # `timescale or w or 10_000`)
    "inverse_sqrt_no_warmup": (
        us.warmup(0, us.inverse_sqrt(LR, timescale=10_000)),
        (transformers_(lambda o: get_inverse_sqrt_schedule(o, 0)),),
    ),
    # --- torch's others, by composition
    "MultiStepLR": (  # a repeated milestone multiplies twice
        us.piecewise_constant(LR, {1000: LR * 0.3, 3000: LR * 0.3**3, 8000: LR * 0.3**4}),
        (torch_(lambda o: lr_scheduler.MultiStepLR(o, [1000, 3000, 3000, 8000], gamma=0.3)),),
    ),
    "StepLR": (
        us.exponential(LR, rate=0.7, steps=700, staircase=True),
        (torch_(lambda o: lr_scheduler.StepLR(o, step_size=700, gamma=0.7)),),
    ),
    "ConstantLR": (
        us.piecewise_constant(LR * 0.25, {2500: LR}),
        (torch_(lambda o: lr_scheduler.ConstantLR(o, factor=0.25, total_iters=2500)),),
    ),
    "LinearLR": (
        us.linear(LR * 0.02, LR, 2000),
        (torch_(lambda o: lr_scheduler.LinearLR(o, 0.02, 1.0, total_iters=2000)),),
    ),
    "LinearLR_decay": (
        us.linear(LR, LR * 0.05, N),
        (torch_(lambda o: lr_scheduler.LinearLR(o, 1.0, 0.05, total_iters=N)),),
    ),
    "CosineAnnealingLR": (
        us.cosine(LR, N, floor=1e-4),
        (torch_(lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=N, eta_min=1e-4)),),
    ),
    "CosineAnnealingLR_to_0": (
        us.cosine(LR, N),
        (torch_(lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=N)),),
    ),
    "ExponentialLR": (
        us.exponential(LR, rate=0.9995),
        (torch_(lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9995)),),
    ),
    "SequentialLR_is_join": (
        us.join([us.linear(LR * 0.01, LR, 500), us.cosine(LR, N - 500, floor=1e-5)], [500]),
        (
            torch_(
                lambda o: lr_scheduler.SequentialLR(
                    o,
                    [lr_scheduler.LinearLR(o, 0.01, 1.0, total_iters=500),
                     lr_scheduler.CosineAnnealingLR(o, T_max=N - 500, eta_min=1e-5)],
                    milestones=[500],
                )
            ),
        ),
    ),
    "SequentialLR_is_join_3": (
        us.join([LR * 0.1, us.exponential(LR, 0.9998), us.exponential(LR, 0.5, 1000, True)],
                [300, 4000]),
        (
            torch_(
                lambda o: lr_scheduler.SequentialLR(
                    o,
                    [lr_scheduler.ConstantLR(o, factor=0.1, total_iters=300),
                     lr_scheduler.ExponentialLR(o, gamma=0.9998),
                     lr_scheduler.StepLR(o, step_size=1000, gamma=0.5)],
                    milestones=[300, 4000],
                )
            ),
        ),
    ),
    # --- optax's warm-ups: warmup
    "warmup_cosine_decay_schedule": (
        us.warmup(500, us.cosine(LR, N - 500, floor=1e-4, exponent=2.0)),
        (optax_(lambda: optax.warmup_cosine_decay_schedule(0.0, LR, 500, N, 1e-4, exponent=2.0)),),
    ),
    "warmup_exponential_decay_schedule": (
        us.warmup(500, us.join([LR, us.exponential(LR, 0.98, 100, end=1e-3)], [1000]), init=1e-4),
        (
            optax_(
                lambda: optax.warmup_exponential_decay_schedule(
                    1e-4, LR, 500, 100, 0.98, transition_begin=1000, end_value=1e-3
                )
            ),
        ),
    ),
    "warmup_constant_schedule": (
        us.warmup(700, LR),
        (optax_(lambda: optax.warmup_constant_schedule(0.0, LR, 700)),),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_peers(case: tuple[Any, tuple[Refs, ...]]) -> None:
    sched, refs = case
    ours = np.asarray(sched(STEPS), dtype=float)  # NumPy steps: all 10,000 at once
    # Python steps go the scalar way: the same numbers, but for NumPy's pow in the last bit
    some = STEPS[::97]
    np.testing.assert_allclose([sched(int(k)) for k in some], ours[some], rtol=1e-15, atol=0)
    for ref in refs:
        for name, theirs in ref().items():
            np.testing.assert_allclose(
                ours[: len(theirs)], theirs, rtol=1e-12, atol=0, err_msg=f"against {name}"
            )


# --- where the peers are off: the size of it, and what is exact -------------------------------


def max_rel(values: Any, exact: Any) -> float:
    return max(float(abs(Fraction(v) - e) / abs(e)) for v, e in zip(values, exact, strict=True))


def test_torch_recursion_drifts_past_t_max() -> None:
    """torch's CosineAnnealingLR multiplies the lr by a ratio of cosines each step; past T_max
    (where it rises again, periodically) its rounding errors grow at every turn until they pass
    1e-12 of its own closed form; within T_max (all uniopt's cosine covers) they stay < 1e-13."""
    make = lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=100, eta_min=1e-3)  # noqa: E731
    refs = torch_(make)()
    drift = np.max(np.abs(refs["torch"] - refs["torch closed form"]) / refs["torch closed form"])
    assert 2e-12 < drift < 4e-12
    within = torch_(lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=N, eta_min=1e-3))()
    assert np.max(np.abs(within["torch"] / within["torch closed form"] - 1)) < 1e-13


def test_torch_linear_lr_misses_a_small_end_factor() -> None:
    """LinearLR(start_factor=1, end_factor=1e-8) should end at lr * 1e-8. Both of torch's forms
    compute it as a difference of numbers near 1 (its recursion's last factor is
    ``1 + (end - start) / (...)``; its closed form ``start + (end - start) * 1``), which leaves
    ~1e-8 of the end's own size wrong; linear pins its end."""
    make = lambda o: lr_scheduler.LinearLR(o, 1.0, 1e-8, total_iters=10)  # noqa: E731
    refs = torch_(make, n=11)()
    exact = [Fraction(LR) * (1 + (Fraction(1e-8) - 1) * Fraction(k, 10)) for k in range(11)]
    assert 3e-9 < max_rel(refs["torch"], exact) < 5e-9
    assert 1e-8 < max_rel(refs["torch closed form"], exact) < 2e-8
    assert max_rel([us.linear(LR, LR * 1e-8, 10)(k) for k in range(11)], exact) < 1e-15


def test_torch_onecycle_linear_end() -> None:
    """OneCycleLR(anneal_strategy='linear') computes its last lr as ``(min - max) * 1.0 + max``,
    which misses its own ``min_lr`` by up to an ulp of ``max_lr``: 6e-12 of ``min_lr`` here."""
    lrs, opt = stepped(
        lambda o: lr_scheduler.OneCycleLR(o, LR, N, anneal_strategy="linear", cycle_momentum=False)
    )
    min_lr = opt.param_groups[0]["min_lr"]
    assert 5e-12 < abs(lrs[-1] - min_lr) / min_lr < 7e-12
    assert us.onecycle(LR, N, kind="linear")(N - 1) == min_lr


@pytest.mark.parametrize(("pct_start", "base", "top", "kind", "three_phase"), [
    (0.3, 0.85, 0.95, "cosine", False), (0.25, 0.85, 0.95, "linear", True),
    (0.3, 0.5, 0.9, "cosine", False), (0.35, 0.7, 0.98, "cosine", True),
])
def test_torch_onecycle_momentum(
    pct_start: float, base: float, top: float, kind: Any, three_phase: bool
) -> None:
    """OneCycleLR's momentum (``cycle_momentum``, on by default) is the ``piecewise_interpolate``
    docs/schedules.md writes, bit for bit; ``onecycle(base, n, pct_start, base / top, 1.0)`` is
    too where ``base / (base / top)`` rounds back to ``top`` (at torch's 0.85 and 0.95)."""
    n = 1000
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))], lr=LR,
                          momentum=0.9)
    sched = lr_scheduler.OneCycleLR(
        opt, LR, n, pct_start=pct_start, anneal_strategy="cos" if kind == "cosine" else "linear",
        three_phase=three_phase, base_momentum=base, max_momentum=top)
    opt.step()
    theirs = []
    for _ in range(n):
        theirs.append(opt.param_groups[0]["momentum"])
        sched.step()
    up = pct_start * n - 1
    knots = {up: base, 2 * up: top, n - 1: top} if three_phase else {up: base, n - 1: top}
    ours = us.piecewise_interpolate(top, knots, kind)
    assert [ours(k) for k in range(n)] == theirs
    onecycle = us.onecycle(base, n, pct_start, base / top, 1.0, kind, three_phase)
    assert (onecycle == ours) == (base / (base / top) == top) == (top == 0.95)


def test_torch_cyclic_loses_bits_in_later_cycles() -> None:
    """CyclicLR finds the position in the cycle as ``1 + s / total - cycle``: a difference of
    numbers the size of the cycle count, so later cycles lose bits (1.2e-12 relative with
    ``base_lr=0``); uniopt takes an integer remainder."""
    lrs = stepped(lambda o: lr_scheduler.CyclicLR(o, 0.0, LR, 200, 300, cycle_momentum=False))[0]
    ours = us.cyclic(0.0, LR, 200, 300)
    ks = [k for k in range(7000, N) if k % 500]  # late cycles, where the value is not 0
    at = [k % 500 for k in ks]
    exact = [Fraction(LR) * (Fraction(a, 200) if a <= 200 else Fraction(500 - a, 300)) for a in at]
    assert 1e-12 < max_rel(lrs[ks], exact) < 1.5e-12
    assert max_rel([ours(k) for k in ks], exact) < 1e-15


def test_polynomial_end() -> None:
    """Near the end of a decay to 0 the value is a small difference. torch's closed form and
    optax compute ``1 - s / steps``, off by up to ~steps * power / 2 ulps of the value there;
    optax (XLA on CPU, float64 too) also divides by multiplying with the reciprocal. uniopt
    computes ``(steps - s) / steps``."""
    ks = np.arange(7900, 8000)
    exact = [Fraction(LR) * Fraction(8000 - int(k), 8000) ** 2 for k in ks]
    assert max_rel([us.polynomial(LR, 0.0, 8000, power=2.0)(int(k)) for k in ks], exact) < 1e-15
    closed = torch_(lambda o: lr_scheduler.PolynomialLR(o, total_iters=8000, power=2.0))()
    with jax.enable_x64(True):
        theirs = jax.vmap(optax.polynomial_schedule(LR, 0.0, 2.0, 8000))(jnp.asarray(ks))
        assert np.sum(np.asarray(jnp.asarray(ks) / 8000) != ks / 8000) > 10  # XLA's quotients
    assert 5e-13 < max_rel(closed["torch closed form"][ks], exact) < 1e-12
    assert 1e-12 < max_rel(np.asarray(theirs), exact) < 2e-12


def test_optax_polynomial_jit() -> None:
    """optax's polynomial_schedule under jax.jit in float64 is nan from its end on: XLA turns
    ``1 - count / steps`` into an fma that lands a hair below 0, and ``(-tiny) ** 1.5`` is nan.
    uniopt's polynomial clips it; its values under jit are checked in test_jit."""
    with jax.enable_x64(True):
        theirs = jax.jit(optax.polynomial_schedule(LR, 1e-4, 1.5, 100))(jnp.asarray(100))
    assert np.isnan(theirs)


# --- jax.jit: one compile for every new schedule ---------------------------------------------

JITTED = [
    us.polynomial(LR, 1e-4, 100, power=1.5),
    us.cosine(LR, 300, floor=1e-3, exponent=2.0),
    us.onecycle(LR, 1000),
    us.onecycle(LR, 1000, kind="linear", three_phase=True),
    us.piecewise_interpolate(LR, {0: 0.05, 400: 0.01, 900: 0.02}, "cosine"),
    us.sgdr(LR, 10, mult=3, floor=1e-3),
    us.sgdr(LR, 70),
    us.cyclic(1e-3, LR, 20, 30, mode="triangular2"),
    us.cyclic(1e-3, LR, 20, mode="exp_range", gamma=0.999),
    us.wsd(LR, 50, 300, 500),
    us.wsd(LR, 50, 300, 500, floor=1e-3, shape="cosine"),
    us.warmup(50, us.inverse_sqrt(LR, 50)),
]


def test_jit() -> None:
    steps = jnp.arange(1200, dtype=jnp.int32)  # 0-d int32 tracers under vmap, as the engine's
    values = jax.jit(jax.vmap(lambda s: jnp.stack([f(s) for f in JITTED]), out_axes=1))(steps)
    expected = np.array([np.asarray(f(np.arange(1200)), dtype=float) for f in JITTED])
    assert values.dtype == jnp.float32 and np.all(np.isfinite(values))
    # float32: exp_range's gamma ** s carries s times float32's rounding of gamma (1.5e-5
    # here); the others agree to a few ulps of the peak
    np.testing.assert_allclose(values, expected, rtol=2e-5, atol=1e-7 * LR)


# --- the contract: Python floats, frozen values ----------------------------------------------

NEW = [*JITTED, us.piecewise_interpolate(1.0, {})]


@pytest.mark.parametrize("sched", NEW, ids=lambda s: type(s).__name__)
def test_python_float_frozen_hashable(sched: Any) -> None:
    assert all(type(sched(k)) is float for k in (0, 7, np.int64(5000)))
    copy = dataclasses.replace(sched)
    assert copy == sched and hash(copy) == hash(sched) and repr(copy) == repr(sched)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.init = 3.0


def test_piecewise_interpolate_copies_and_sorts() -> None:
    knots = {8: 0.1, 4: 0.2}
    s = us.piecewise_interpolate(1.0, knots)
    knots[2] = 5.0
    assert list(s.boundaries_and_values) == [4, 8] and s(2) == 0.6
    assert us.piecewise_interpolate(1.0, {})(5) == 1.0


# --- bad input ---------------------------------------------------------------------------------

NAN = float("nan")

BAD: list[tuple[Callable[[], object], str]] = [
    (lambda: us.polynomial(1.0, 0.0, 0), "polynomial: steps must be a positive integer, got 0"),
    (lambda: us.polynomial(1.0, 0.0, -5), "polynomial: steps must be a positive integer, got -5"),
    (lambda: us.polynomial(1.0, NAN, 5), "polynomial: end must be a finite number, got nan"),
    (lambda: us.polynomial(1.0, 0.0, 5, power=0), "polynomial: power must be positive, got 0"),
    (lambda: us.cosine(1.0, 5, exponent=-1.0), "cosine: exponent must be positive, got -1.0"),
    (
        lambda: us.piecewise_interpolate(1.0, {-2: 0.1}),
        "piecewise_interpolate: each boundary must be non-negative, got -2",
    ),
    (
        lambda: us.piecewise_interpolate(1.0, {5: float("inf")}),
        "piecewise_interpolate: the value at boundary 5 must be a finite number, got inf",
    ),
    (
        lambda: us.piecewise_interpolate(1.0, {5: 0.1}, kind="cos"),  # type: ignore[arg-type]
        "piecewise_interpolate: kind must be one of 'linear', 'cosine', got 'cos'",
    ),
    (
        lambda: us.onecycle(1.0, 3),
        "onecycle: the peak's step pct_start * steps - 1 must be positive, got "
        "-0.10000000000000009 (pct_start=0.3, steps=3)",
    ),
    (
        lambda: us.onecycle(1.0, 100, pct_start=1.0),
        "onecycle: the peak's step must be below steps - 1 = 99, got 99.0 "
        "(pct_start=1.0, steps=100)",
    ),
    (
        lambda: us.onecycle(1.0, 100, pct_start=0.6, three_phase=True),
        "onecycle: 2 * (pct_start * steps - 1) must be below steps - 1 = 99, got 118.0 "
        "(pct_start=0.6, steps=100)",
    ),
    (lambda: us.onecycle(1.0, 100, div=0.0), "onecycle: div must be positive, got 0.0"),
    (lambda: us.onecycle(1.0, 0), "onecycle: steps must be a positive integer, got 0"),
    (lambda: us.sgdr(1.0, 0), "sgdr: steps must be a positive integer, got 0"),
    (lambda: us.sgdr(1.0, 10, mult=0), "sgdr: mult must be a positive integer, got 0"),
    (lambda: us.sgdr(1.0, 10, mult=1.5), "sgdr: mult must be a positive integer, got 1.5"),  # type: ignore[arg-type]
    (lambda: us.cyclic(0.0, 1.0, 0), "cyclic: steps_up must be a positive integer, got 0"),
    (
        lambda: us.cyclic(0.0, 1.0, 5, steps_down=-1),
        "cyclic: steps_down must be a positive integer, got -1",
    ),
    (
        lambda: us.cyclic(0.0, 1.0, 5, mode="triangle"),  # type: ignore[arg-type]
        "cyclic: mode must be one of 'triangular', 'triangular2', 'exp_range', got 'triangle'",
    ),
    (
        lambda: us.cyclic(0.0, 1.0, 5, gamma=0.99),
        "cyclic: gamma applies to mode='exp_range' only, got gamma=0.99 with mode='triangular'",
    ),
    (
        lambda: us.cyclic(0.0, 1.0, 5, mode="exp_range", gamma=0.0),
        "cyclic: gamma must be positive, got 0.0",
    ),
    (lambda: us.wsd(1.0, -1, 5, 5), "wsd: warmup must be a non-negative integer, got -1"),
    (lambda: us.wsd(1.0, 5, 5, 0), "wsd: decay must be a positive integer, got 0"),
    (
        lambda: us.wsd(1.0, 5, 5, 5, shape="sqrt"),  # type: ignore[arg-type]
        "wsd: shape must be one of '1-sqrt', 'linear', 'cosine', got 'sqrt'",
    ),
    (
        lambda: us.inverse_sqrt(1.0, timescale=0),
        "inverse_sqrt: timescale must be positive, got 0",
    ),
    (
        lambda: us.inverse_sqrt(NAN, timescale=10),
        "inverse_sqrt: init must be a finite number, got nan",
    ),
]


@pytest.mark.parametrize(("make", "message"), BAD, ids=[m for _, m in BAD])
def test_validation(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        make()
