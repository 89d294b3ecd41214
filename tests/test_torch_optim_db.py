"""``uniopt.torch`` held to torch's own table of optimizers, ``optim_db``
(``torch.testing._internal.common_optimizers``): for each of its ``OptimizerInfo`` entries the
class of the same name in ``uniopt.torch`` must do what torch's class does, on every CPU
configuration torch's own tests run. A class uniopt does not have yet is skipped, saying so.

Read from torch, never copied: the configurations (``optim_inputs_func``, with the
foreach/fused/differentiable variants torch's tests add), the LR schedulers
(``scheduler_inputs``), the error cases (``optim_error_inputs_func``), the capabilities
(``supported_impls``, ``supports_complex``, ``step_requires_closure``,
``only_supports_sparse_grads``) and torch's skips (``decorators``/``skips``, applied as torch's
``TestOptimRenewed`` would for the test each one here mirrors, on CPU).

* Trajectories: each configuration x (no scheduler, each ``scheduler_inputs`` entry, OneCycleLR)
  x (float64, float32), ``STEPS`` steps of both classes (``CLOSURE_STEPS`` of LBFGS) from the
  same initial tensors, each side taking the gradient of one stochastic quadratic loss at *its
  own* parameters (so a difference feeds back into later steps). LBFGS steps with a closure,
  SparseAdam gets sparse gradients, Muon only the matrices.
  ReduceLROnPlateau sees torch's loss on both sides, so that a loss within rounding of its
  threshold cannot part the two schedules. Params are compared after every step, the full
  ``state_dict()`` after the run.
* State dicts both ways, errors (constructor or step, as ``error_on`` says), ``differentiable``
  (gradients through the step) and complex params: see each test.

Tolerance (as ``tests/test_parity_torch.py``): a tensor's error after step n is the largest
difference divided by the largest magnitude torch's tensor has reached so far
(:func:`helpers.scaled_error`), so that cancellation in a small value is not reported as
disagreement. float64 and complex128 must agree to 1e-12 at every step: rounding differences
of correct implementations stay below 1e-13 in 50 steps (the parity grid measures at most
1.8e-14 over 300), far below what a wrong formula gives. float32 and complex64 are held to the
float64 (complex128) run of torch's class, which starts from the same numbers (the problem's
data are float32 numbers) and is the float64 test's comparison too: uniopt may be off from it by
``F32_FACTOR * max((n + F32_FIRST) * eps32, torch's own float32 error on that tensor)``. Both
float32 runs round every operation (and their gradients) to float32, in different orders (torch
fuses addcmul/addcdiv/lerp, uniopt rounds each product), each by about ``n * eps32`` after n
steps, more where the problem amplifies rounding, which torch's own error shows. The state
dicts are held to the same bounds (at step ``STEPS``).

What uniopt's ``state_dict`` may add to torch's, and nothing else: a ``step`` in a parameter's
state where torch keeps none (``uniopt.torch`` counts steps for every class, to evaluate
schedules). No param-group key: AdamW's ``couple_lr`` is in a group only where not its default,
and torch's table never sets it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import re
import unittest
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")  # imported by torch.testing._internal

from torch.optim.lr_scheduler import OneCycleLR, ReduceLROnPlateau  # noqa: E402
from torch.testing._internal import common_optimizers as co  # noqa: E402

import uniopt.torch as ut  # noqa: E402
from helpers import scaled_error  # noqa: E402

# torch keeps these classes' per-parameter scalars (NAdam's mu_product, ASGD's eta and mu) in its
# default dtype, float32 unless set, even for float64 params, as uniopt.torch does. Their tests
# run with torch's default dtype float64, where those scalars are as exact as the rest
SCALARS_IN_DEFAULT_DTYPE = ("NAdam", "ASGD")


@pytest.fixture(autouse=True)
def _double_scalars(request: pytest.FixtureRequest) -> Iterator[None]:
    params = getattr(request.node, "callspec", None)
    names = set(params.params.values()) if params else set()
    if not names & set(SCALARS_IN_DEFAULT_DTYPE):
        yield
        return
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)

STEPS = 50
# LBFGS's step runs up to max_iter (20) iterations, each evaluating the closure: a tenth as many
# steps is still twice as many updates
CLOSURE_STEPS = STEPS // 10
# the product of configurations and schedulers (every configuration is run STEPS steps without
# a scheduler, and the default one under each scheduler): enough steps for each scheduler to act
# (StepLR's step_size and ReduceLROnPlateau's patience are 10 in torch's table), on each
# configuration's arithmetic already held to STEPS steps
PRODUCT_STEPS = 20
RTOL64 = 1e-12
EPS32 = float(np.finfo(np.float32).eps)
F32_FACTOR, F32_FIRST = 2.0, 4
# the parameters: shapes of a small model (a weight, its bias, a second matrix for the classes
# that take matrices only)
SHAPES = ((4, 3), (3,), (2, 4))

INFOS = {info.name: info for info in co.optim_db}
EXACT = (torch.float64, torch.complex128)  # dtypes compared to torch alone, at RTOL64
REFERENCE = {torch.float32: torch.float64, torch.complex64: torch.complex128}
REFERENCE_OF = {v: k for k, v in REFERENCE.items()}


def uniopt_class(info: Any) -> type:
    """The class of ``info``'s name in uniopt.torch, or a skip."""
    cls = getattr(ut, info.name, None)
    if cls is None:
        pytest.skip(f"uniopt.torch has no {info.name} yet")
    return cls


def skip_as_torch(info: Any, test: str, dtype: Any) -> None:
    """Skip where torch's own ``TestOptimRenewed.<test>`` is skipped for ``info`` on CPU in
    ``dtype``: its active DecorateInfo decorators, applied to a probe and called."""
    kwargs = {"optim_info": info, "dtype": dtype, "device": "cpu"}
    for decorate in info.decorators:
        if not isinstance(decorate, co.DecorateInfo):
            continue
        if not decorate.is_active("TestOptimRenewed", test, "cpu", dtype, kwargs):
            continue
        for decorator in decorate.decorators:
            probe = decorator(lambda *a, **k: None)
            try:
                probe(unittest.TestCase())
            except unittest.SkipTest as e:
                pytest.skip(f"torch skips {test} for {info.name} on CPU: {e}")


# --- the problem: one stochastic quadratic loss, evaluated at each side's params --------------


@dataclasses.dataclass(frozen=True)
class Problem:
    """``loss_t(p) = sum(h/2 |p - c|^2 + Re(conj(xi_t) p))`` over the tensors: its gradient
    ``h (p - c) + xi_t`` (torch's convention for complex p), fresh noise ``xi_t`` per step;
    float64 (complex128) tensors of float32 (complex64) numbers, so that a float32 run starts
    from the same numbers as a float64 one."""

    p0: list[Any]
    h: list[Any]
    c: list[Any]
    xi: list[list[Any]]  # per step, per tensor
    rows: list[list[Any]]  # per step, per tensor: the rows a sparse gradient keeps (0 or 1)

    @staticmethod
    def make(complex_: bool, steps: int = 2 * STEPS) -> Problem:
        rng = np.random.default_rng(12)

        def draw(shape: tuple[int, ...], scale: float = 1.0) -> Any:
            x = rng.standard_normal(shape)
            x = torch.tensor(scale * (x + 1j * rng.standard_normal(shape) if complex_ else x))
            return x.to(REFERENCE_OF[x.dtype]).to(x.dtype)

        def rows(n: int, dim: int) -> Any:
            return torch.tensor(rng.random(n) < 0.6, dtype=torch.float64).reshape(-1, *[1] * dim)

        return Problem(
            [draw(s) for s in SHAPES],
            [torch.tensor(rng.uniform(0.5, 2.0, s)).float().double() for s in SHAPES],
            [draw(s) for s in SHAPES],
            [[draw(s, 0.5) for s in SHAPES] for _ in range(steps)],
            [[rows(s[0], len(s) - 1) for s in SHAPES] for _ in range(steps)],
        )

    def loss_grads(self, t: int, params: list[Any], kept: tuple[int, ...], loss: bool = True
                   ) -> tuple[Any, list[Any]]:
        """The loss (if asked for: most runs need only the gradients) and gradients at
        ``params`` (the tensors ``kept``) for step ``t``, computed in float64 (complex128),
        delivered in the params' dtype."""
        # torch's multi-tensor ops: one call per operation for every tensor (the suite runs
        # thousands of these)
        xs = [p.detach().to(self.c[i].dtype) for p, i in zip(params, kept, strict=True)]
        cs, hs, xis = ([v[i] for i in kept] for v in (self.c, self.h, self.xi[t]))
        ds = torch._foreach_sub(xs, cs)
        gs = torch._foreach_add(torch._foreach_mul(ds, hs), xis)
        total: Any = 0.0
        if loss:
            for x, d, h, xi in zip(xs, ds, hs, xis, strict=True):
                total = total + (h / 2 * d.abs() ** 2 + (xi.conj() * x).real).sum()
        return total, [g.to(p.dtype) for g, p in zip(gs, params, strict=True)]


PROBLEMS = {False: Problem.make(False), True: Problem.make(True)}


# --- driving an optimizer ---------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What a run leaves: params after each step (NumPy, per tensor), the losses, the state."""

    traj: list[list[np.ndarray]]  # per tensor: one array per step
    losses: list[float]
    opt: Any
    params: list[Any]


@functools.cache
def kept(info: Any) -> tuple[int, ...]:
    """The tensors of :data:`SHAPES` torch's class takes (Muon: the matrices)."""
    out = []
    for i, s in enumerate(SHAPES):
        try:
            info.optim_cls([torch.zeros(s)])
        except (ValueError, RuntimeError):
            continue
        out.append(i)
    return tuple(out)


def new_params(problem: Problem, which: tuple[int, ...], dtype: Any) -> list[Any]:
    """The initial tensors ``which``, in ``dtype``."""
    return [problem.p0[i].to(dtype, copy=True) for i in which]


def steps(info: Any) -> int:
    """How many steps a run of ``info``'s class takes."""
    return CLOSURE_STEPS if info.step_requires_closure else STEPS


def one_cycle(opt: Any, total: int) -> Any:
    """OneCycleLR up to the group's lr and back over ``total`` steps, cycling momentum (or
    beta1) where the class has one."""
    cycle = any(k in opt.defaults for k in ("momentum", "betas"))
    lr = float(opt.param_groups[0]["lr"])
    return OneCycleLR(opt, max_lr=lr, total_steps=total, cycle_momentum=cycle)


def drive(
    info: Any, opt: Any, params: list[Any], problem: Problem, start: int, steps: int,
    schedulers: Any = (), metrics: list[float] | None = None,
) -> Run:
    """``steps`` steps of ``opt`` on ``params`` (the tensors ``kept(info)``) from problem step
    ``start``, fed as torch's class wants (a closure for LBFGS, sparse gradients for
    SparseAdam); after each, the schedulers step (ReduceLROnPlateau on ``metrics`` if given)."""
    which = kept(info)
    traj: list[list[np.ndarray]] = [[] for _ in params]
    losses = []
    # the loss is for LBFGS's closure and for a ReduceLROnPlateau not handed torch's
    want = info.step_requires_closure or metrics is None and any(
        isinstance(s, ReduceLROnPlateau) for s in schedulers)
    for k in range(steps):
        t = start + k

        def closure(t: int = t) -> Any:
            loss, grads = problem.loss_grads(t, params, which, want)
            for p, g, i in zip(params, grads, which, strict=True):
                if info.only_supports_sparse_grads:
                    g = (g * problem.rows[t][i].to(g.dtype)).to_sparse(1)
                p.grad = g
            return loss

        if info.step_requires_closure:
            loss = float(opt.step(closure))
        else:
            loss = float(closure())
            opt.step()
        losses.append(loss)
        for s in schedulers:
            if isinstance(s, ReduceLROnPlateau):
                s.step(metrics[k] if metrics is not None else loss)
            else:
                s.step()
        for tr, p in zip(traj, params, strict=True):
            tr.append(p.detach().numpy().copy())
    return Run(traj, losses, opt, params)


# --- comparing runs ---------------------------------------------------------------------------


# Muon's Newton-Schulz iteration runs in bfloat16 on both sides: an entry within rounding of a
# bfloat16 tie may round either way after a last-bit difference upstream (torch's fused lerp),
# moving that step's update by one bfloat16 rounding (2^-8 relative) times the adjusted lr;
# each step may add one. Runs without such a tie agree to RTOL64 (most do: the default
# configuration, every scheduler but one); this bound holds the rest, and a wrong lr or
# coefficient is off by far more.
def bf16_floor(info: Any, kwargs: dict[str, Any]) -> float:
    """Per step, what one bfloat16 rounding of the orthogonalised update may move a param by,
    relative (0 for every class but Muon). The adjusted lr of the matrices here is at most
    sqrt(4/3) ("original") or 0.2 sqrt(4) ("match_rms_adamw"): 2 bounds both."""
    if info.name != "Muon":
        return 0.0
    lr = float(_number(kwargs.get("lr", 1e-3)))
    return 2 * lr * 2.0**-8


def excess(
    ours: np.ndarray, theirs: np.ndarray, ref: np.ndarray | None, first: int = 1,
    floor: float = 0.0,
) -> np.ndarray:
    """Per step (axis 0; the first is step ``first``), the difference as a multiple of what
    is allowed (> 1: fail): see the module docstring. ``ref`` is the reference run, None for
    float64 and complex128; ``floor``: :func:`bf16_floor`."""
    n = np.arange(first, first + len(ours))
    if ref is None:
        return scaled_error(ours, theirs) / np.maximum(RTOL64, floor * n)
    allowed = F32_FACTOR * np.maximum((n + F32_FIRST) * EPS32, scaled_error(theirs, ref).max())
    return scaled_error(ours, ref) / np.maximum(allowed, floor * n)


def trajectory_problems(ours: Run, theirs: Run, ref: Run | None, start: int = 0,
                        floor: float = 0.0) -> list[str]:
    """Where the params part: the first step each tensor exceeds its tolerance."""
    out = []
    for i, (o, t) in enumerate(zip(ours.traj, theirs.traj, strict=True)):
        r = excess(np.stack(o), np.stack(t), None if ref is None else np.stack(ref.traj[i]),
                   start + 1, floor)
        bad = np.flatnonzero(r > 1)
        if bad.size:
            k = int(bad[0])
            out.append(
                f"param {i} {tuple(o[k].shape)}: after step {start + k + 1} off by {r[k]:.3g}x "
                f"the tolerance (worst {r.max():.3g}x); ours {o[k].ravel()[:3]}, "
                f"torch {t[k].ravel()[:3]}"
            )
    return out


NO_REF = object()  # a value the reference run's state lacks (LBFGS's history can differ)


def state_problems(ours: Any, theirs: Any, ref: Any, path: str = "", floor: float = 0.0
                   ) -> list[str]:
    """Where two ``state_dict()``s differ: keys, types, dtypes, shapes, values beyond the
    tolerance at step STEPS (``ref``: the reference run's state, None for float64 and
    complex128 runs). Allowed additions: see the module docstring."""

    def sub(x: Any, k: Any) -> Any:
        if ref is None or ref is NO_REF:
            return ref
        try:
            return x[k]
        except (KeyError, IndexError):
            return NO_REF

    if isinstance(theirs, torch.Tensor):
        if not isinstance(ours, torch.Tensor):
            return [f"{path}: {ours!r} where torch has a tensor {theirs!r}"]
        if ours.dtype != theirs.dtype or ours.shape != theirs.shape:
            return [f"{path}: {ours.dtype}{tuple(ours.shape)} where torch has "
                    f"{theirs.dtype}{tuple(theirs.shape)}"]
        return _value_problems(ours, theirs, ref, path, floor)
    if isinstance(theirs, dict):
        if not isinstance(ours, dict):
            return [f"{path}: {ours!r} where torch has a dict"]
        extra = set(ours) - set(theirs)
        if path.startswith("state.") and path.count(".") == 1:
            extra -= {"step"}
        if path == "state":  # a parameter whose state is a step count alone
            extra = {k for k in extra if set(ours[k]) - {"step"}}
        out = [f"{path}: keys {sorted(map(str, extra))} that torch lacks"] if extra else []
        if missing := set(theirs) - set(ours):
            out.append(f"{path}: no {sorted(map(str, missing))}")
        for k in set(theirs) & set(ours):
            where = f"{path}.{k}" if path else str(k)
            out += state_problems(ours[k], theirs[k], sub(ref, k), where, floor)
        return out
    if isinstance(theirs, list | tuple):
        if not isinstance(ours, list | tuple) or len(ours) != len(theirs):
            return [f"{path}: {ours!r} where torch has {theirs!r}"]
        return [
            x for k, (o, t) in enumerate(zip(ours, theirs, strict=True))
            for x in state_problems(o, t, sub(ref, k), f"{path}[{k}]", floor)
        ]
    numbers = (float, int)  # by value: torch's defaults mix 0 and 0.0
    if all(isinstance(x, numbers) and not isinstance(x, bool) for x in (ours, theirs)):
        return _value_problems(ours, theirs, ref, path, floor)
    if type(ours) is not type(theirs) or ours != theirs:
        return [f"{path}: {ours!r} where torch has {theirs!r}"]
    return []


def _value_problems(ours: Any, theirs: Any, ref: Any, path: str, floor: float = 0.0
                    ) -> list[str]:
    """A value of a state beside torch's: see :func:`state_problems`. Where the reference run
    lacks it, both float32 values may be off from the exact one by the bound without torch's
    own error, so from each other by twice that."""

    def arr(x: Any) -> np.ndarray:
        x = x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return x.reshape(1, *x.shape)

    if ref is NO_REF:
        allowed = 2 * F32_FACTOR * (STEPS + F32_FIRST) * EPS32
        r = scaled_error(arr(ours), arr(theirs)) / allowed
    else:
        r = excess(arr(ours), arr(theirs), None if ref is None else arr(ref), first=STEPS,
                   floor=floor)
    if r.max() > 1:
        return [f"{path}: off by {r.max():.3g}x the tolerance: ours {arr(ours).ravel()[:3]}, "
                f"torch {arr(theirs).ravel()[:3]}"]
    return []


def assert_agree(problems: list[str]) -> None:
    # the first on the first line, for pytest's one-line summary
    assert not problems, f"uniopt differs from torch: {problems[0]} ({len(problems)} in all)" + (
        "".join(f"\n  {p}" for p in problems[1:]))


# --- configurations ---------------------------------------------------------------------------


@functools.cache
def configs(info: Any) -> list[Any]:
    """Every CPU configuration torch's tests run for ``info``: optim_inputs_func's, each also
    with every foreach/fused/differentiable flag torch supports on CPU (torch's own helper)."""
    return co._get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info)


def default_kwargs(info: Any) -> dict[str, Any]:
    inputs = info.optim_inputs_func(device="cpu")
    return next((x for x in inputs if x.desc == "default"), inputs[0]).kwargs


@functools.cache
def schedulers(info: Any) -> list[tuple[str, list[Callable[[Any], Any]]]]:
    """(name, constructors): none, each of ``scheduler_inputs``, OneCycleLR."""
    probe = torch.optim.SGD([torch.zeros(1)], lr=0.1)
    out: list[tuple[str, list[Callable[[Any], Any]]]] = [("no_scheduler", [])]
    for ctors in info.scheduler_inputs:
        name = "+".join(type(f(probe)).__name__ for f in ctors)
        out.append((name if all(n != name for n, _ in out) else f"{name}{len(out)}", list(ctors)))
    return [*out, ("OneCycleLR", [functools.partial(one_cycle, total=steps(info))])]


def run(
    info: Any, cls: type, kwargs: dict[str, Any], ctors: list[Any], dtype: Any,
    metrics: list[float] | None = None, n: int | None = None,
) -> Run:
    """A fresh ``cls`` on the initial tensors in ``dtype``, with the schedulers of ``ctors``,
    for ``n`` steps (default :func:`steps`)."""
    problem = PROBLEMS[dtype.is_complex]
    params = new_params(problem, kept(info), dtype)
    opt = cls(params, **copy.deepcopy(kwargs))
    scheds = [f(opt) for f in ctors]
    return drive(info, opt, params, problem, 0, steps(info) if n is None else n, scheds, metrics)


_TORCH_RUNS: dict[tuple[Any, ...], Run] = {}
SCALARS_IN_STEP_DTYPE = ("differentiable", "capturable")


def _number(v: Any) -> Any:
    """A one-element tensor (lr, a beta) as the number it holds; tuples element by element."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, tuple) and any(isinstance(x, torch.Tensor) for x in v):
        return tuple(_number(x) for x in v)
    return v


def torch_run(
    info: Any, kwargs: dict[str, Any], ctors: list[Any], dtype: Any, key: Any = None,
    n: int | None = None,
) -> Run:
    """torch's run, or a skip where torch's class itself rejects the configuration on CPU.
    A float64 run with a ``key`` is kept: it is both the float64 test's comparison and the
    float32 test's reference."""
    if key is not None and (key, dtype, n) in _TORCH_RUNS:
        return _TORCH_RUNS[key, dtype, n]
    try:
        out = run(info, info.optim_cls, kwargs, ctors, dtype, n=n)
    except (ValueError, RuntimeError, TypeError) as e:
        pytest.skip(f"torch's {info.name} rejects this on CPU: {type(e).__name__}: {e}")
    if key is not None and dtype in EXACT:
        _TORCH_RUNS[key, dtype, n] = out
    return out


def compare_runs(
    info: Any, cls: type, kwargs: dict[str, Any], ctors: list[Any], dtype: Any, key: Any = None,
    n: int | None = None,
) -> None:
    """uniopt's ``cls`` beside torch's class, params after every step and the state after the
    run (of ``n`` steps, default :func:`steps`); float32 and complex64 against a float64
    (complex128) run of torch's (``key``: see :func:`torch_run`)."""
    # tensors as numbers only without a scheduler: a scheduler writes a tensor lr in place,
    # rounding its values to float32, which uniopt reads each step as torch's class does
    plain = {k: v if ctors else _number(v) for k, v in kwargs.items()
             if k not in SCALARS_IN_STEP_DTYPE}
    changed = [k for k in kwargs if k not in plain or plain[k] is not kwargs[k]]
    if changed:
        # torch's differentiable and capturable modes compute the step's scalars (bias
        # corrections, step sizes) from the step tensor, float32 by default, and a float32
        # tensor lr or betas makes what is computed from them float32: uniopt computes them in
        # double in every mode, from the tensors' values, so its run is torch's with numbers
        # and without the flags, and torch's run as given is that up to float32 rounding of
        # those scalars
        flagged = torch_run(info, kwargs, ctors, dtype, n=n)
        key = None if key is None else (*key, "without")
        theirs = torch_run(info, plain, ctors, dtype, key, n)
        for f, t in zip(flagged.traj, theirs.traj, strict=True):
            at = np.arange(1, len(f) + 1)
            gap = scaled_error(np.stack(f), np.stack(t)) / ((at + F32_FIRST) * EPS32 * F32_FACTOR)
            assert gap.max() <= 1, f"torch's {info.name}{kwargs} strays from its plain run"
    else:
        theirs = torch_run(info, kwargs, ctors, dtype, key, n)
    ref = None if dtype in EXACT else torch_run(info, plain, ctors, REFERENCE[dtype], key, n)
    ours = run(info, cls, kwargs, ctors, dtype, metrics=theirs.losses, n=n)
    state = ours.opt.state_dict()
    problems = []
    if changed:  # the flags and tensors as torch's run as given keeps them, the rest as its plain
        problems = state_problems(state["param_groups"], flagged.opt.state_dict()["param_groups"],
                                  None, "param_groups")
        # the group values the flags and tensors touched (a scheduler's initial_lr too)
        state = {**state, "param_groups": [
            {**g, **{k: t[k] for k in t if k in changed or isinstance(f.get(k), torch.Tensor)}}
            for g, t, f in zip(state["param_groups"], theirs.opt.state_dict()["param_groups"],
                               flagged.opt.state_dict()["param_groups"], strict=True)]}
    floor = bf16_floor(info, kwargs)
    assert_agree(
        problems
        + trajectory_problems(ours, theirs, ref, floor=floor)
        + state_problems(state, theirs.opt.state_dict(),
                         None if ref is None else ref.opt.state_dict(), floor=floor)
    )


# --- 1. trajectories --------------------------------------------------------------------------

FLOATS = {"float64": torch.float64, "float32": torch.float32}


def _trajectory_cases() -> Iterator[Any]:
    """Every configuration without a scheduler and the first (torch's default) under each
    scheduler, :func:`steps` steps; the rest of the product is ``slow`` (about 4 times as many
    runs) and runs PRODUCT_STEPS."""
    for info in co.optim_db:
        for c, config in enumerate(configs(info)):
            for s, (sname, _) in enumerate(schedulers(info)):
                for dname in FLOATS:
                    desc = config.desc.replace(" ", "_")
                    marks = [pytest.mark.slow] if c and s else []
                    why = known_difference(info.name, config.kwargs, sname, dname)
                    if why:
                        marks.append(pytest.mark.xfail(reason=why, strict=True))
                    yield pytest.param(info.name, c, s, dname,
                                       id=f"{info.name}-{desc}-{sname}-{dname}", marks=marks)


def known_difference(name: str, kwargs: dict[str, Any], scheduler: str, dtype: str) -> str:
    """Why uniopt's class differs from torch's in this configuration, where it does on purpose
    (each is in docs/torch.md's list of differences); the test must then fail (strict xfail), so
    that a change on either side is noticed."""
    tensor_lr = isinstance(kwargs.get("lr"), torch.Tensor)
    if name == "LBFGS" and tensor_lr and scheduler != "no_scheduler":
        return ("LBFGS: torch keeps a tensor lr itself as state['t'], which the scheduler then "
                "rewrites in place")
    if name == "SparseAdam" and tensor_lr and scheduler != "no_scheduler" and dtype == "float64":
        return ("SparseAdam: torch computes its step size from a float32 tensor lr in float32; "
                "uniopt reads the tensor's value and computes in double")
    return ""


@pytest.mark.parametrize(("name", "config", "scheduler", "dtype"), list(_trajectory_cases()))
def test_trajectory(name: str, config: int, scheduler: int, dtype: str) -> None:
    """:func:`steps` steps of every CPU configuration under each scheduler, beside torch's
    class."""
    info = INFOS[name]
    cls = uniopt_class(info)
    skip_as_torch(info, "test_forloop_goes_right_direction", FLOATS[dtype])
    product = bool(config and scheduler)  # see _trajectory_cases
    compare_runs(info, cls, configs(info)[config].kwargs, schedulers(info)[scheduler][1],
                 FLOATS[dtype], key=(name, config, scheduler),
                 n=min(steps(info), PRODUCT_STEPS) if product else None)


# --- 2. state dicts both ways -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(INFOS))
@pytest.mark.parametrize("direction", ["torch_to_uniopt", "uniopt_to_torch"])
def test_state_dict_loads(name: str, direction: str) -> None:
    """Half a run of one class (default configuration), its state_dict loaded into the other
    over copies of the params, the other half: the same as torch's class loading its own
    state (torch's loading casts some slots to the params' dtype, so the comparison is with
    that, not with the run that saved)."""
    info = INFOS[name]
    cls = uniopt_class(info)
    skip_as_torch(info, "test_state_dict_deterministic", torch.float64)
    torch_cls = info.optim_cls
    saver, loader = (torch_cls, cls) if direction == "torch_to_uniopt" else (cls, torch_cls)
    kwargs, half, dtype = default_kwargs(info), steps(info) // 2, torch.float64
    problem = PROBLEMS[False]

    def saved_and_loaded(saver: type, loader: type) -> Run:
        params = new_params(problem, kept(info), dtype)
        opt = saver(params, **copy.deepcopy(kwargs))
        drive(info, opt, params, problem, 0, half)
        params = [p.detach().clone() for p in params]
        loaded = loader(params, **copy.deepcopy(kwargs))
        # a copy: load_state_dict keeps tensors of the right dtype as they are, shared
        loaded.load_state_dict(copy.deepcopy(opt.state_dict()))
        return drive(info, loaded, params, problem, half, half)

    ours = saved_and_loaded(saver, loader)
    theirs = saved_and_loaded(torch_cls, torch_cls)
    assert_agree(
        trajectory_problems(ours, theirs, None, start=half)
        + state_problems(ours.opt.state_dict(), theirs.opt.state_dict(), None)
    )


# --- 3. error inputs --------------------------------------------------------------------------


def _error_cases() -> Iterator[Any]:
    for info in co.optim_db:
        for j, case in enumerate(info.optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            desc = case.optimizer_error_input.desc.replace(" ", "_")
            yield pytest.param(info.name, j, id=f"{info.name}-{j}-{desc}")


def _snapshot(x: Any) -> Any:
    return copy.deepcopy(x)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(
            torch.equal(a, b) if not a.is_sparse else torch.equal(a.to_dense(), b.to_dense()))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def expect_error(cls: type, case: Any) -> None:
    """What torch's own test_errors checks for ``case`` (``error_type`` raised, or warned,
    with a message that ``re.search`` finds ``error_regex`` in), on ``cls``, saying what
    happened instead; a step error must leave the params and the state as they were."""
    inp = case.optimizer_error_input
    want = f"{case.error_type.__name__} matching {case.error_regex!r}"

    def check(call: Callable[[], Any]) -> Any:
        raised, out = None, None
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                out = call()
            except Exception as e:  # noqa: BLE001 - reported below
                raised = e
        got = f"{type(raised).__name__}({raised})" if raised else "nothing"
        who = f"{cls.__module__}.{cls.__name__}"
        if issubclass(case.error_type, Warning):
            assert raised is None, f"{who} raises {got}, torch warns {want}"
            warned = [w for w in seen if issubclass(w.category, case.error_type)]
            assert any(re.search(case.error_regex, str(w.message)) for w in warned), (
                f"{who} does not warn {want}; warned {[str(w.message) for w in seen]}"
            )
        else:
            assert isinstance(raised, case.error_type) and re.search(
                case.error_regex, str(raised)
            ), f"{who} raises {got}, torch raises {want}"
        return out

    if case.error_on == co.OptimizerErrorEnum.CONSTRUCTION_ERROR:
        check(lambda: cls(inp.params, **inp.kwargs))
        return
    opt = cls(inp.params, **inp.kwargs)
    params = [p for g in opt.param_groups for p in g["params"]]
    before = _snapshot((params, opt.state_dict()))
    check(opt.step)
    assert _same(before, (params, opt.state_dict())), "a failed step changed params or state"


@pytest.mark.parametrize(("name", "case"), list(_error_cases()))
def test_error_input(name: str, case: int) -> None:
    """Each CPU error input raises (or warns) as torch's test_errors expects, on torch's class
    (so a change in torch is noticed) and on uniopt's."""
    info = INFOS[name]
    skip_as_torch(info, "test_errors", torch.float32)

    def fresh() -> Any:  # new tensors for each class
        return info.optim_error_inputs_func(device="cpu", dtype=torch.float32)[case]

    expect_error(info.optim_cls, fresh())
    expect_error(uniopt_class(info), fresh())


# --- 4. differentiable=True, complex params ---------------------------------------------------


def _through_a_step(
    info: Any, cls: type, lr: Any, kwargs: dict[str, Any]
) -> tuple[list[Any], list[Any]]:
    """One ``differentiable=True`` step on non-leaf copies of leaf tensors, from leaf
    gradients and a state that torch's class reached in three plain steps (put into
    ``opt.state`` as torch's own differentiable tests do: torch's differentiable step is one
    step per graph; Adamax's and Rprop's second step fail in torch). Returns the params after
    it and the gradients of a fixed weighted sum of them with respect to the initial params,
    the gradients and lr (where it is a tensor)."""
    problem = PROBLEMS[False]
    warm_params = new_params(problem, kept(info), torch.float64)
    warm = info.optim_cls(warm_params, **kwargs)
    drive(info, warm, warm_params, problem, 0, 3)
    p0 = [p.detach().clone().requires_grad_() for p in warm_params]
    g0 = [problem.c[i].clone().requires_grad_() for i in kept(info)]
    params = [p.clone() for p in p0]
    opt = cls(params, **{**kwargs, "lr": lr, "differentiable": True})
    for p, q, g in zip(params, warm_params, g0, strict=True):
        opt.state[p].update(copy.deepcopy(warm.state[q]))
        p.grad = g
    opt.step()
    total = sum((p * problem.h[i]).sum() for p, i in zip(params, kept(info), strict=True))
    inputs = [*p0, *g0, *([lr] if isinstance(lr, torch.Tensor) else [])]
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    return [p.detach() for p in params], list(grads)


DIFFERENTIABLE = [info.name for info in co.optim_db if "differentiable" in info.supported_impls]


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_differentiable(name: str) -> None:
    """Gradients through a ``differentiable=True`` step (default configuration), with respect
    to the initial params, the gradients and lr, equal torch's (float64, RTOL64). torch's
    differentiable mode computes the step's scalars (bias corrections, step sizes) from its step
    tensor, of torch's default dtype: float64 here, as uniopt computes them (at float32 they
    differ by ~1e-7, amplified up to ~1e-6 in the derivatives). Where torch detaches one
    (ASGD's first ``eta`` from lr: no gradient), uniopt's is the true derivative."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _differentiable(name)
    finally:
        torch.set_default_dtype(before)


def _differentiable(name: str) -> None:
    info = INFOS[name]
    cls = uniopt_class(info)
    kwargs = {k: v for k, v in default_kwargs(info).items() if k != "lr"}
    lr_value = inspect.signature(info.optim_cls).parameters["lr"].default
    lr_value = float(default_kwargs(info).get("lr", lr_value))
    # lr as a tensor that requires grad where torch's class takes one (several multiply by lr
    # with ops that want a number)
    lr: Any = torch.tensor(lr_value, dtype=torch.float64, requires_grad=True)
    try:
        theirs = _through_a_step(info, info.optim_cls, lr, kwargs)
    except (TypeError, RuntimeError):
        lr = lr_value
        theirs = _through_a_step(info, info.optim_cls, lr, kwargs)
    ours = _through_a_step(info, cls, copy.deepcopy(lr), kwargs)
    problems = []
    lr_at = len(kept(info)) * 2 if isinstance(lr, torch.Tensor) else None
    for what, o_list, t_list in zip(("params", "gradients"), ours, theirs, strict=True):
        for i, (o, t) in enumerate(zip(o_list, t_list, strict=True)):
            if t is None and what == "gradients" and i == lr_at and name in LR_DETACHED:
                continue
            if (o is None) != (t is None):
                problems.append(f"{what} {i}: {o} where torch has {t}")
            elif o is not None:
                problems += _value_problems(o, t, None, f"{what} {i}")
    assert_agree(problems)


LR_DETACHED = ("ASGD",)  # torch's ASGD sets its first eta from lr as a detached tensor


COMPLEX = [info.name for info in co.optim_db if info.supports_complex]


@pytest.mark.parametrize("name", COMPLEX)
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64], ids=str)
def test_complex(name: str, dtype: Any) -> None:
    """The default configuration on complex params, a run beside torch's class."""
    info = INFOS[name]
    cls = uniopt_class(info)
    skip_as_torch(info, "test_complex", dtype)
    compare_runs(info, cls, default_kwargs(info), [], dtype, key=(name, "complex"))


# --- the comparison can fail ------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "change"), [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_a_wrong_lr_fails(dtype: Any, change: float) -> None:
    """uniopt's Adam with lr off by a relative ``change`` fails the trajectory comparison
    (float32 rounds a change of 1e-6 away)."""

    def wrong(params: Any, lr: float = 1e-3, **kwargs: Any) -> Any:
        return ut.Adam(params, lr=lr * (1 + change), **kwargs)

    with pytest.raises(AssertionError, match="param 0 .* off by"):
        compare_runs(INFOS["Adam"], wrong, {}, [], dtype)  # type: ignore[arg-type]


def test_every_optimizer_torch_optim_exports_is_offered() -> None:
    """A class the installed torch adds fails here (optim_db's tests would skip it)."""
    exported = {n for n, c in vars(torch.optim).items() if isinstance(c, type)
                and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer}
    assert len(exported) >= 15
    assert sorted(n for n in exported if not hasattr(ut, n)) == []
