"""uo.kahan_summation: Kahan-compensated parameter writes ("Revisiting BFloat16 Training",
Zamirai et al. 2020, Algorithm 2), held to the paper's algorithm written here in torch, bit for
bit, on every path (compiled loop, multi-tensor path, reference path on torch, NumPy and JAX);
its rounding held to torch's conversions on every float32 of a binade; and shown to do its job:
updates a bfloat16 weight rounds away add up."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import uniopt as uo  # noqa: E402
import uniopt.torch as ut  # noqa: E402
from helpers import counting_jit, reference_path  # noqa: E402
from uniopt import backend  # noqa: E402
from uniopt.fast import cpu, foreach  # noqa: E402
from uniopt.transforms import kahan  # noqa: E402

SLOT = "kahan_summation.compensation"


def _float32s() -> torch.Tensor:
    """Every float32 of [1, 2) (every significand: the rounding looks at nothing else), and
    every 16th of them negated and near the ends of float32's normal range."""
    one = (np.arange(1 << 23, dtype=np.uint32) | np.uint32(0x3F800000)).view(np.float32)
    some = one[::16]
    return torch.from_numpy(np.concatenate([one, -some, some * np.float32(2.0**-120),
                                            some * np.float32(2.0**90)]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_rounding_is_torchs_conversion_on_every_float32_of_a_binade(
        dtype: torch.dtype) -> None:
    x = _float32s()
    if dtype == torch.float16:
        # float16's normal range, and below it every float32 from 2^-26 to its smallest normal
        # (its subnormals, ties among them) and a few that round to 0
        x = x[x.abs() < 65504]
        tiny = (np.arange(1 << 20, dtype=np.uint32) * 16 + np.uint32(0x32800000)).view(
            np.float32)
        x = torch.cat([x, torch.from_numpy(tiny[tiny < 2.0**-14]),
                       -torch.from_numpy(tiny[tiny < 2.0**-14])])
    c = kahan.kahan_summation().for_dtype(kahan.kahan_summation().coeffs(0), dtype)
    ours = kahan._rounded(backend.namespace(x), c, x)
    assert torch.equal(ours, x.to(dtype).float())
    # (and on NumPy float32, the reference path's arithmetic on NumPy arrays)
    xn = x.numpy()[::7]
    assert np.array_equal(kahan._rounded(backend.namespace(xn), c, xn), ours.numpy()[::7])


def test_non_finite_and_huge_values_pass_through() -> None:
    c = kahan.kahan_summation().for_dtype(kahan.kahan_summation().coeffs(0), torch.bfloat16)
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 3e38, -2.0**101, 0.0, -0.0])
    out = kahan._rounded(backend.namespace(x), c, x)
    assert torch.equal(out[:2], x[:2]) and out[2].isnan()
    # (a zero may lose its sign: the engine's p - (p - t) writes +0 for either anyway)
    assert torch.equal(out[3:], x[3:])


# --- the paper's Algorithm 2, written here --------------------------------------------------


def _paper(ws: list[torch.Tensor], grads: list[list[torch.Tensor]], lr: float,
           comp_dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """SGD's step delta = -lr*g (in float32) summed into bfloat16 weights by Kahan's method."""
    ws = [w.clone() for w in ws]
    cs = [torch.zeros(w.shape, dtype=comp_dtype) for w in ws]
    for gs in grads:
        for i, g in enumerate(gs):
            w = ws[i].float()
            y = -(g.float() * lr) - cs[i].float()
            t = (w + y).to(ws[i].dtype)
            cs[i] = ((t.float() - w) - y).to(comp_dtype)
            ws[i] = t
    return ws, cs


def _draws(n: int, count: int, dtype: torch.dtype = torch.bfloat16, steps: int = 200
           ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(7, 5, generator=g).to(dtype) for _ in range(count)]
    grads = [[torch.randn(7, 5, generator=g).to(dtype) for _ in range(count)]
             for _ in range(steps)]
    return ws, grads


def _ours(rule: uo.Transform, ws: list[Any], grads: list[list[Any]], path: Callable[[], Any],
          state_dtype: str | None = None) -> tuple[list[Any], uo.State]:
    ws = [w.clone() for w in ws]
    state = uo.setup(rule, ws, state_dtype=state_dtype)
    with path():
        for gs in grads:
            state = uo.update_(state, ws, gs)
    return ws, state


PATHS = {"reference": reference_path, "compiled": contextlib.nullcontext, "multi-tensor":
         foreach.forced}


@pytest.mark.parametrize("state_dtype", [None, "float32"])
@pytest.mark.parametrize("path", list(PATHS))
def test_it_is_the_papers_algorithm_bit_for_bit(path: str, state_dtype: str | None) -> None:
    # 20 tensors: the suite's compiled loop takes steps of 16 leaves or more
    ws, grads = _draws(0, 20)
    want, comps = _paper(ws, grads, 1e-3, torch.float32 if state_dtype else torch.bfloat16)
    loop, multi = cpu.STEPS, foreach.STEPS
    got, state = _ours(uo.chain(uo.sgd(lr=1e-3), uo.kahan_summation()), ws, grads,
                       PATHS[path], state_dtype)
    assert cpu.STEPS - loop == (200 if path == "compiled" else 0)
    assert foreach.STEPS - multi == (200 if path == "multi-tensor" else 0)
    assert all(map(torch.equal, got, want))
    assert all(map(torch.equal, state.slots[SLOT], comps))


def test_every_library_and_path_writes_the_same_bits() -> None:
    rule = uo.chain(uo.adamw(lr=3e-4, weight_decay=0.1), uo.kahan_summation())
    ws, grads = _draws(0, 20, steps=30)
    runs = {name: _ours(rule, ws, grads, path)[0] for name, path in PATHS.items()}
    for name, got in runs.items():
        assert all(map(torch.equal, got, runs["reference"])), name
    # float16: NumPy's reference path and torch's
    ws16, grads16 = _draws(0, 3, torch.float16, steps=30)
    on_torch = _ours(rule, ws16, grads16, contextlib.nullcontext)[0]
    state = uo.setup(rule, [w.numpy().copy() for w in ws16])
    on_numpy = [w.numpy().copy() for w in ws16]
    for gs in grads16:
        state = uo.update_(state, on_numpy, [g.numpy() for g in gs])
    for x, y in zip(on_numpy, on_torch, strict=True):
        assert np.array_equal(x, y.numpy())


def test_jax_bfloat16_under_jit_writes_torchs_bits() -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rule = uo.chain(uo.adamw(lr=3e-4), uo.kahan_summation())
    ws, grads = _draws(0, 3, steps=20)
    want = _ours(rule, ws, grads, contextlib.nullcontext)[0]

    def as_jax(t: torch.Tensor) -> Any:
        return jnp.asarray(t.float().numpy()).astype(jnp.bfloat16)

    params = [as_jax(w) for w in ws]
    state = uo.setup(rule, params)
    step, traces = counting_jit()
    for gs in grads:
        state, params = step(state, params, [as_jax(g) for g in gs])
    assert len(traces) == 1
    for x, y in zip(params, want, strict=True):
        assert np.array_equal(np.asarray(x.astype(jnp.float32)), y.float().numpy())


def test_jax_float16_subnormals_under_jit_round_as_torchs_conversion() -> None:
    """The rounding to float16's subnormal spacing, ``(x + m) - m``, under ``jax.jit``: XLA
    simplified it to ``x`` (no rounding: 10,001 of 10,001 subnormal-range values wrong), and a
    float16 run's params and compensation parted from NumPy's after 3 steps. Every float32
    of the float16 subnormal range checked here (a stride of them), jitted, against torch's
    conversion; and a float16 run, jitted, bit for bit NumPy's."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    tiny = (np.arange(1 << 20, dtype=np.uint32)[::13] * 16 + np.uint32(0x32800000)).view(
        np.float32)
    x = np.concatenate([tiny[tiny < 2.0**-14], -tiny[tiny < 2.0**-14]])
    c = kahan.kahan_summation().for_dtype(kahan.kahan_summation().coeffs(0), torch.float16)
    got = jax.jit(lambda v: kahan._rounded(jnp, c, v))(jnp.asarray(x))
    assert np.array_equal(np.asarray(got), torch.from_numpy(x).to(torch.float16).float().numpy())
    rule = uo.chain(uo.sgd(lr=1e-3), uo.kahan_summation())
    rng = np.random.default_rng(0)
    start = (rng.standard_normal(2000) * 1e-5).astype(np.float16)
    grads = [(rng.standard_normal(2000) * 1e-3).astype(np.float16) for _ in range(3)]
    runs = []
    for lib, step in ((np, uo.update), (jnp, jax.jit(uo.update))):
        params = [lib.asarray(start)]
        state = uo.setup(rule, params, state_dtype="float32")
        for g in grads:
            state, params = step(state, params, [lib.asarray(g)])
        runs.append((np.asarray(params[0]), np.asarray(state.slots[SLOT][0])))
    assert runs[1][0].tobytes() == runs[0][0].tobytes()
    # the float32 compensation to the last bit of a step: XLA's CPU code fuses the rule's
    # product lr*g into the next subtraction (one rounding where NumPy makes two), which moves
    # what is lost by up to an ulp of the step in some elements; before, the whole of it was
    # lost (the compensation all but 0)
    step_ulp = np.spacing(np.float32(1e-3) * max(np.abs(g.astype(np.float32)).max()
                                                  for g in grads))
    assert np.all(np.abs(runs[1][1] - runs[0][1]) <= step_ulp)
    assert np.median(np.abs(runs[1][1])) > 100 * step_ulp


def test_through_the_optax_protocol_as_flax_and_equinox_step_it() -> None:
    # updates = p - t, added by optax.apply_updates in bfloat16: exact (p and t are close
    # bfloat16 numbers), so the written weights are uo.update's
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = jax.numpy
    rule = uo.chain(uo.adamw(lr=1e-3), uo.kahan_summation())
    key = jax.random.PRNGKey(0)
    params = [jax.random.normal(key, (6, 4)).astype(jnp.bfloat16)]
    ours, state = list(params), uo.setup(rule, params)
    opt_state = rule.init(params)
    for i in range(50):
        grads = [jax.random.normal(jax.random.PRNGKey(i + 1), (6, 4)).astype(jnp.bfloat16)]
        updates, opt_state = rule.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        state, ours = uo.update(state, ours, grads)
    assert params[0].dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(params[0], np.float32), np.asarray(ours[0], np.float32))


# --- what it is for ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_updates_a_16_bit_weight_rounds_away_add_up(dtype: torch.dtype) -> None:
    # 1,000 steps of 1e-4 on weights near 1: under half the spacing there (bfloat16 2^-8,
    # float16 2^-11), so plain writes never move; compensated, the weights move as float32's
    g = torch.Generator().manual_seed(1)
    w0 = (1 + 0.01 * torch.rand(64, generator=g)).to(dtype)
    grad = torch.ones(64, dtype=dtype)

    def train(rule: uo.Transform, dtype: torch.dtype) -> torch.Tensor:
        ws = [w0.to(dtype)]
        state = uo.setup(rule, ws)
        for _ in range(1000):
            state = uo.update_(state, ws, [grad.to(dtype)])
        return ws[0].float()

    exact = train(uo.sgd(lr=1e-4), torch.float32)
    assert torch.equal(train(uo.sgd(lr=1e-4), dtype), w0.float())  # stale
    kept = train(uo.chain(uo.sgd(lr=1e-4), uo.kahan_summation()), dtype)
    spacing = torch.finfo(dtype).eps  # at 1
    assert (kept - exact).abs().max() <= spacing / 2


def test_float32_weights_are_compensated_for_their_own_rounding() -> None:
    # increments of 2^-26 to 1.0: a quarter of float32's spacing there, lost without it
    ws, kept = [np.ones(4, np.float32)], [np.ones(4, np.float32)]
    plain = uo.setup(uo.sgd(lr=1.0), ws)
    comp = uo.setup(uo.chain(uo.sgd(lr=1.0), uo.kahan_summation()), kept)
    grad = [np.full(4, -(2.0**-26), np.float32)]
    for _ in range(64):
        plain = uo.update_(plain, ws, grad)
        comp = uo.update_(comp, kept, grad)
    assert np.array_equal(ws[0], np.ones(4, np.float32))
    assert np.array_equal(kept[0], np.full(4, 1 + 2.0**-20, np.float32))


def test_in_a_uniopt_torch_optimizer_with_a_checkpoint() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 1)).to(torch.bfloat16)
    opt = ut.Optimizer(model.parameters(), uo.chain(uo.adamw(lr=1e-3), uo.kahan_summation()))
    x, y = torch.randn(64, 8).to(torch.bfloat16), torch.randn(64, 1).to(torch.bfloat16)

    def step() -> float:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()
        return float(loss.detach())

    first = step()
    for _ in range(50):
        last = step()
    assert last < first
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert all(SLOT in s for s in sd["state"].values())
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 1)).to(torch.bfloat16)
    twin.load_state_dict(model.state_dict())
    other = ut.Optimizer(twin.parameters(), uo.chain(uo.adamw(lr=1e-3), uo.kahan_summation()))
    other.load_state_dict(sd)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    for p in twin.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    other.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
