"""``uniopt.torch`` against ``torch.optim``'s for-loop (``foreach=False``), element by element.

Where torch's arithmetic has no square root (SGD in every form, Adamax, ASGD, Rprop) uniopt
rounds as torch does, operation by operation, including the fused multiply-adds of torch's CPU
kernels (``lerp``, ``addcmul``, ``add(x, alpha=a)``): ``torch.equal`` after every step. Where it
has one, torch's CPU ``sqrt`` is not correctly rounded (it differs from IEEE's on about 16% of
float32 and 1% of float64 values) and uniopt's is, so a few elements differ by an ulp; torch's
own fused kernels (Adam, AdamW, Adagrad), which take IEEE's square root too, differ from its
for-loop as much (and more: their weight decay is not the for-loop's fused multiply-add). There
uniopt must differ from the for-loop on no more elements than torch's fused implementation
does, on the same data.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import uniopt as uo  # noqa: E402
import uniopt.torch as ut  # noqa: E402

STEPS = 300
# small trees take the reference path (NumPy views of the tensors), one leaf past MIN_SIZE the
# compiled loop: both must round as torch does
SMALL = ((), (5,), (7, 11))
LARGE = ((1 << 14) + 3,)


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _maybe(rng: np.random.Generator, value: Callable[[], float]) -> float:
    return value() if rng.random() < 0.7 else 0.0


# valid random hyperparameters per class, drawn as torch's tests would pass them
def _sgd(rng: np.random.Generator) -> dict[str, Any]:
    momentum = _maybe(rng, lambda: _uniform(rng, 0.1, 0.99))
    nesterov = bool(momentum and rng.random() < 0.5)
    return {"lr": _uniform(rng, 1e-3, 0.1), "momentum": momentum, "nesterov": nesterov,
            "dampening": 0.0 if nesterov else _maybe(rng, lambda: _uniform(rng, 0.0, 0.5)),
            "weight_decay": _maybe(rng, lambda: _uniform(rng, 0.0, 0.1))}


def _betas(rng: np.random.Generator) -> tuple[float, float]:
    # beta1 below 0.5 takes lerp's other branch (from the far end)
    return (_uniform(rng, 0.2, 0.95), _uniform(rng, 0.5, 0.9999))


def _adam(rng: np.random.Generator) -> dict[str, Any]:
    return {"lr": _uniform(rng, 1e-3, 0.05), "betas": _betas(rng),
            "eps": 10 ** _uniform(rng, -8, -3), "amsgrad": bool(rng.random() < 0.4),
            "weight_decay": _maybe(rng, lambda: _uniform(rng, 0.0, 0.1))}


def _adamax(rng: np.random.Generator) -> dict[str, Any]:
    return {"lr": _uniform(rng, 1e-3, 0.05), "betas": _betas(rng),
            "eps": 10 ** _uniform(rng, -8, -3),
            "weight_decay": _maybe(rng, lambda: _uniform(rng, 0.0, 0.1))}


def _asgd(rng: np.random.Generator) -> dict[str, Any]:
    return {"lr": _uniform(rng, 1e-3, 0.05), "lambd": 10 ** _uniform(rng, -5, -2),
            "alpha": _uniform(rng, 0.5, 1.0), "t0": float(rng.integers(1, 200)),
            "weight_decay": _maybe(rng, lambda: _uniform(rng, 0.0, 0.1))}


def _rprop(rng: np.random.Generator) -> dict[str, Any]:
    return {"lr": _uniform(rng, 1e-3, 0.05),
            "etas": (_uniform(rng, 0.3, 0.7), _uniform(rng, 1.1, 1.5)),
            "step_sizes": (10 ** _uniform(rng, -7, -5), _uniform(rng, 1.0, 50.0))}


def _adagrad(rng: np.random.Generator) -> dict[str, Any]:
    return {"lr": _uniform(rng, 1e-3, 0.1), "lr_decay": _maybe(rng, lambda: 1e-3),
            "initial_accumulator_value": _maybe(rng, lambda: _uniform(rng, 0.0, 0.5)),
            "eps": 10 ** _uniform(rng, -10, -4),
            "weight_decay": _maybe(rng, lambda: _uniform(rng, 0.0, 0.1))}


def _adafactor(rng: np.random.Generator) -> dict[str, Any]:
    return {"lr": _uniform(rng, 1e-3, 0.3), "beta2_decay": _uniform(rng, -1.0, -0.3),
            "eps": (None if rng.random() < 0.5 else 10 ** _uniform(rng, -30, -10),
                    10 ** _uniform(rng, -4, -2)),
            "d": _uniform(rng, 1.0, 2.0) if rng.random() < 0.5 else 1.0,
            "weight_decay": _maybe(rng, lambda: _uniform(rng, 0.0, 0.1)), "maximize": False}


# Adafactor has no sqrt: its root is torch's rsqrt, which on the CPU is an IEEE square root and
# a division (two roundings; test_torchs_rsqrt_is_one_over_the_ieee_root)
NO_ROOT = {"SGD": _sgd, "Adamax": _adamax, "ASGD": _asgd, "Rprop": _rprop,
           "Adafactor": _adafactor}
FUSED = {"Adam": _adam, "AdamW": _adam, "Adagrad": _adagrad, "SGD": _sgd}


def _schedule(opt: Any, scheduled: bool) -> Any:
    if not scheduled:
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, STEPS) / STEPS)))


def _cycle_momentum(opt: Any, start: dict[str, Any], t: int) -> None:
    """A scheduled run's momentum and first beta move at every step as OneCycleLR's and
    CyclicLR's ``cycle_momentum`` move them (between 0.85 and 1 of the value given), so the
    rules' buffers are held to torch's with a coefficient that is new at each step. A momentum
    of 0 stays 0: another configuration, not a schedule of it."""
    f = 0.925 + 0.075 * math.cos(0.3 * t)
    for g in opt.param_groups:
        if start.get("momentum"):
            g["momentum"] = start["momentum"] * f
        if "betas" in start:
            g["betas"] = (start["betas"][0] * f, start["betas"][1])


@contextlib.contextmanager
def _ieee_sqrt() -> Iterator[None]:
    """torch's square roots replaced by the correctly rounded one (NumPy's), so that torch's
    for-loop is torch's order of operations with nothing else changed. ``rsqrt`` (Adafactor's)
    is left as it is: on the CPU it is already ``1 / sqrt(x)`` with IEEE's root."""
    def sqrt(x: Any) -> Any:
        return torch.from_numpy(np.asarray(np.sqrt(x.detach().numpy())))

    def sqrt_(x: Any) -> Any:
        return x.copy_(sqrt(x))

    saved = torch.Tensor.sqrt, torch.Tensor.sqrt_, torch.sqrt
    torch.Tensor.sqrt, torch.Tensor.sqrt_, torch.sqrt = sqrt, sqrt_, sqrt  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.Tensor.sqrt, torch.Tensor.sqrt_, torch.sqrt = saved  # type: ignore[misc]


def _race(name: str, hp: dict[str, Any], dtype: Any, shapes: tuple[Any, ...], steps: int,
          scheduled: bool, peer: dict[str, Any], seed: int,
          ieee: bool = False) -> list[list[Any]]:
    """The params of uniopt.torch's class and of torch's (with the options ``peer``; ``ieee``:
    with IEEE square roots) after every step, on the same gradients: ``[[ours, theirs], ...]``,
    flattened to one tensor."""
    rng = np.random.default_rng(seed)
    start = [torch.tensor(rng.standard_normal(s), dtype=dtype) for s in shapes]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    opts = [getattr(ut, name)(ours, **hp), getattr(torch.optim, name)(theirs, **hp, **peer)]
    scheds = [_schedule(o, scheduled) for o in opts]
    out = []
    for _ in range(steps):
        grads = [torch.tensor(rng.standard_normal(s), dtype=dtype) for s in shapes]
        for ps in (ours, theirs):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
        for opt, sched in zip(opts, scheds, strict=True):
            with _ieee_sqrt() if ieee and opt is opts[1] else contextlib.nullcontext():
                opt.step()
            if sched is not None:
                sched.step()
                _cycle_momentum(opt, hp, len(out))
        out.append([torch.cat([p.detach().reshape(-1) for p in ps]) for ps in (ours, theirs)])
    return out


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with warnings.catch_warnings():
        # an lr scheduler's first step warns when it runs before optimizer.step()
        warnings.simplefilter("ignore", UserWarning)
        yield


@pytest.mark.slow
@pytest.mark.parametrize("scheduled", [False, True], ids=["constant-lr", "scheduled-lr"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(NO_ROOT))
def test_rules_without_a_root_are_torchs_bits(name: str, dtype: str, scheduled: bool) -> None:
    seed = zlib.crc32(f"{name}-{dtype}-{scheduled}".encode())
    hp = NO_ROOT[name](np.random.default_rng(seed))
    for step, (ours, theirs) in enumerate(_race(name, hp, getattr(torch, dtype), SMALL, STEPS,
                                               scheduled, {"foreach": False}, seed)):
        assert torch.equal(ours, theirs), (step, hp)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adafactor_is_torchs_bits(dtype: str) -> None:
    """Leaves of 0 to 3 dimensions, two of each shape (uniopt stacks them into one call) and
    a matrix long enough for torch's vectorised reductions, with and without a schedule: torch's
    norms, lerps, rsqrt and Python-float step sizes, bit for bit, with no root replaced."""
    shapes = ((), (), (5,), (5,), (7, 11), (7, 11), (3, 4, 6), (3, 4, 6), (67, 129))
    for scheduled in (False, True):
        seed = zlib.crc32(f"Adafactor-{dtype}-{scheduled}".encode())
        hp = _adafactor(np.random.default_rng(seed))
        for step, (ours, theirs) in enumerate(_race("Adafactor", hp, getattr(torch, dtype),
                                                   shapes, 40, scheduled, {"foreach": False},
                                                   seed)):
            assert torch.equal(ours, theirs), (step, hp)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torchs_rsqrt_is_one_over_the_ieee_root(dtype: str) -> None:
    """What uniopt's Adafactor assumes (so _ieee_sqrt leaves rsqrt alone): torch's CPU rsqrt,
    vectorised body and scalar tail, is ``1 / sqrt(x)`` with IEEE's root, rounded twice."""
    rng = np.random.default_rng(5)
    x = (rng.random(4099) * 10.0 ** rng.integers(-30, 30, 4099)).astype(dtype)
    assert np.array_equal(torch.rsqrt(torch.from_numpy(x)).numpy(), 1 / np.sqrt(x))


@pytest.mark.parametrize("name", list(NO_ROOT))
def test_the_compiled_loop_is_torchs_bits_too(name: str) -> None:
    """A leaf past the compiled loop's threshold: its kernels round as the reference's."""
    hp = NO_ROOT[name](np.random.default_rng(7))
    for step, (ours, theirs) in enumerate(_race(name, hp, torch.float32, LARGE, 20, True,
                                               {"foreach": False}, 7)):
        assert torch.equal(ours, theirs), (step, hp)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", [n for n in FUSED if n != "SGD"])
def test_rules_with_a_root_differ_from_torch_no_more_than_its_fused_kernels(
        name: str, dtype: str) -> None:
    """20 steps, the issue's measure: the fraction of elements unequal to the for-loop's."""
    seed = zlib.crc32(f"{name}-{dtype}".encode())
    hp = FUSED[name](np.random.default_rng(seed))
    dt = getattr(torch, dtype)
    loop = _race(name, hp, dt, LARGE, 20, False, {"foreach": False}, seed)
    fused = _race(name, hp, dt, LARGE, 20, False, {"fused": True}, seed)
    ours, theirs = loop[-1]
    assert torch.equal(fused[-1][0], ours)  # the same run of ours
    mine = float((ours != theirs).double().mean())
    torchs = float((fused[-1][1] != theirs).double().mean())
    assert mine <= torchs, (mine, torchs, hp)


def _rmsprop(rng: np.random.Generator) -> dict[str, Any]:
    return {"lr": _uniform(rng, 1e-3, 0.05), "alpha": _uniform(rng, 0.5, 0.999),
            "eps": 10 ** _uniform(rng, -8, -3), "centered": bool(rng.random() < 0.5),
            "momentum": _maybe(rng, lambda: _uniform(rng, 0.1, 0.9)),
            "weight_decay": _maybe(rng, lambda: _uniform(rng, 0.0, 0.1))}


def _adadelta(rng: np.random.Generator) -> dict[str, Any]:
    return {"lr": _uniform(rng, 0.1, 1.0), "rho": _uniform(rng, 0.5, 0.99),
            "eps": 10 ** _uniform(rng, -7, -3),
            "weight_decay": _maybe(rng, lambda: _uniform(rng, 0.0, 0.1))}


def _nadam(rng: np.random.Generator) -> dict[str, Any]:
    return {**_adamax(rng), "momentum_decay": 10 ** _uniform(rng, -3, -2),
            "decoupled_weight_decay": bool(rng.random() < 0.5)}


def _radam(rng: np.random.Generator) -> dict[str, Any]:
    return {**_adamax(rng), "decoupled_weight_decay": bool(rng.random() < 0.5)}


ROOT = {"Adam": _adam, "AdamW": _adam, "Adagrad": _adagrad, "RMSprop": _rmsprop,
        "Adadelta": _adadelta, "NAdam": _nadam, "RAdam": _radam}


@pytest.mark.slow
@pytest.mark.parametrize("scheduled", [False, True], ids=["constant-lr", "scheduled-lr"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(ROOT))
def test_rules_with_a_root_are_torchs_bits_but_for_the_root(name: str, dtype: str,
                                                            scheduled: bool) -> None:
    """torch's for-loop with its square root made IEEE's and nothing else: uniopt's bits at
    every step, so torch's ``sqrt`` is the only difference left."""
    seed = zlib.crc32(f"{name}-{dtype}-{scheduled}-root".encode())
    hp = ROOT[name](np.random.default_rng(seed))
    for step, (ours, theirs) in enumerate(_race(name, hp, getattr(torch, dtype), SMALL, STEPS,
                                               scheduled, {"foreach": False}, seed, ieee=True)):
        assert torch.equal(ours, theirs), (step, hp)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_muon_is_torchs_bits_on_matrices_of_distinct_shapes(dtype: str) -> None:
    """Matrices of distinct shapes, each its own Newton-Schulz chain (torch's addmm in
    bfloat16), then torch's decay and fused add: torch's bits. Matrices of one shape are
    stacked into one baddbmm chain, which can round differently from torch's per-matrix addmm
    (first seen at step 14 on two 13x5 matrices), so they are left out here."""
    seed = zlib.crc32(f"Muon-{dtype}".encode())
    rng = np.random.default_rng(seed)
    hp = {"lr": _uniform(rng, 1e-3, 0.05), "weight_decay": _maybe(rng, lambda: 0.05),
          "momentum": _uniform(rng, 0.8, 0.99), "nesterov": bool(rng.random() < 0.5),
          "adjust_lr_fn": "match_rms_adamw" if rng.random() < 0.5 else None}
    for step, (ours, theirs) in enumerate(_race("Muon", hp, getattr(torch, dtype),
                                               ((7, 11), (16, 16), (13, 5)), 15, True, {},
                                               seed)):
        assert torch.equal(ours, theirs), (step, hp)


@pytest.mark.parametrize("shape", [(4, 4), (5, 3), (3, 5), (7, 2)])
def test_muon_single_matrix_steps_are_torchs_bits(shape: tuple[int, int]) -> None:
    """A matrix alone runs its own 2-D chain (torch's addmm and mm): on small matrices a
    batched chain's bfloat16 sums (baddbmm) differed from torch's in about one step of 200,
    so many fresh first steps, each on its own draw, are compared."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"muon-single-{shape}".encode()))
    for trial in range(200):
        p0 = torch.randn(shape, generator=gen, dtype=torch.float64)
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        out = []
        for cls in (torch.optim.Muon, ut.Muon):
            p = torch.nn.Parameter(p0.clone())
            p.grad = g.clone()
            cls([p], lr=0.02).step()
            out.append(p.detach())
        assert torch.equal(out[0], out[1]), trial


@pytest.mark.parametrize(("b1", "product"), [(0.9, 0.0), (0.99, 2.0**-149)])
def test_nadam_at_torchs_stalled_float32_step_count(b1: float, product: float) -> None:
    """torch keeps ``step`` in float32 by default, where counting stops at 2**24: NAdam's kept
    product then no longer matches the count, and uniopt.torch derived it anew, multiplying the
    momenta of every past step (13 s a step). The product underflows long before, to 0 or to
    the least subnormal (where b1 is larger), and stays there: the steps are torch's, bit for
    bit."""
    dd = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        out = []
        for mod in (torch.optim, ut):
            torch.manual_seed(0)
            p = torch.nn.Parameter(torch.randn(4))
            opt = mod.NAdam([p], lr=0.01, betas=(b1, 0.999))
            p.grad = torch.randn(4)
            opt.step()
            sd = opt.state_dict()
            sd["state"][0]["step"] = torch.tensor(2.0**24)
            sd["state"][0]["mu_product"] = torch.tensor(product)  # where b1**(2**24) went
            opt.load_state_dict(sd)
            for _ in range(3):
                p.grad = torch.ones(4)
                opt.step()
            out.append(p.detach().clone())
        assert torch.equal(*out)
    finally:
        torch.set_default_dtype(dd)


@pytest.mark.parametrize("n, foreach", [(7, False), (20_000, False), (7, True)])
def test_rprop_skips_a_nan_gradient_entry_as_torch(n: int, foreach: bool) -> None:
    """torch's CPU ``sign`` of NaN is 0, so torch's Rprop leaves an entry whose gradient is NaN
    unmoved, its step size kept; uniopt's torch convention does the same (it turned the entry
    NaN for good), on the reference path, the compiled loop and the multi-tensor path (which
    turned it NaN: its kernel chose by a NaN value). The optax convention keeps optax's NaN."""
    flags: dict[str, Any] = {"foreach": foreach}
    g = torch.Generator().manual_seed(0)
    start = torch.randn(n, dtype=torch.float64, generator=g)
    grads = [torch.randn(n, dtype=torch.float64, generator=g) for _ in range(12)]
    for k in (3, 4, 9):
        grads[k][: n // 3] = float("nan")
    out = []
    for cls in (torch.optim.Rprop, ut.Rprop):
        w = torch.nn.Parameter(start.clone())
        opt = cls([w], lr=0.01, **flags)
        for grad in grads:
            w.grad = grad.clone()
            opt.step()
        out.append((w.detach().clone(), opt.state[w]["step_size"].clone()))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert not torch.isnan(out[1][0]).any()
    p = [start.numpy().copy()]
    state = uo.setup(uo.rprop(lr=0.01, convention="optax"), p)
    for k in (3, 4):  # (optax 0.2.8 hands out the step before: its first is 0)
        state = uo.update_(state, p, [grads[k].numpy()])
    assert np.isnan(p[0][: n // 3]).all()


@pytest.mark.parametrize(("name", "kw"), [("NAdam", {"lr": 0.01}),
                                          ("ASGD", {"lr": 0.05, "t0": 2, "lambd": 1e-2})])
def test_a_resumed_float64_run_holds_the_numbers_as_torchs_load_casts_them(
        name: str, kw: dict[str, Any]) -> None:
    """torch's load_state_dict casts NAdam's mu_product and ASGD's eta and mu to a float64
    parameter's dtype (its default dtype's float32 until then), and NAdam then multiplies its
    product in float64: a run resumed from its own checkpoint, twice, is torch's bit for bit,
    and so are its saved numbers, dtype included."""
    runs = []
    for cls in (getattr(torch.optim, name), getattr(ut, name)):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        opt = cls([p], **kw)
        saved = []
        for s in range(30):
            if s in (3, 17):
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            p.grad = torch.randn(3, 4, dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(s))
            opt.step()
            saved.append({k: v.clone() for k, v in opt.state_dict()["state"][0].items()
                          if k != "step"})
        runs.append((p.detach().clone(), saved))
    (theirs, their_saved), (ours, our_saved) = runs
    assert torch.equal(ours, theirs)
    for a, b in zip(their_saved, our_saved, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
