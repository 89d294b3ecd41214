"""Parity with torch.optim 2.13's single-tensor optimizers (``foreach=False``), step by step.

Every run gives uniopt (functional API, NumPy arrays) and torch the same initial values and the
same gradients, runs ``STEPS`` updates (``GRID_STEPS`` in the grid) and compares the parameters
*and every state slot* after each one. Two kinds of gradients:

* ``noise``: fresh random gradients every step, independent of the parameters;
* ``loss``: the gradient of a stochastic quadratic loss ``sum(h/2 (p - c)^2) + xi_t . p``
  (fresh noise ``xi_t`` every step, like a minibatch), each side evaluated at *its own*
  parameters, so the parameters travel towards ``c``, the moments see correlated gradients,
  and any difference in a step is fed back into every later gradient.

How two runs are compared (:func:`scaled_error`): for each tensor, after step ``n``,

    err_n = max_i |ours_n[i] - torch_n[i]| / max_{k <= n, i} |torch_k[i]|

the largest difference, scaled by the largest magnitude that tensor has reached so far. Rounding
errors are a few ulps of the operands that produced a value, and the operands of one tensor share
its scale; the value itself can be far smaller by cancellation (``g + wd*p``, the centered
variance ``v - gbar^2``, a parameter crossing zero), which an elementwise relative error would
report as a disagreement. float64 must agree to ``err_n <= 1e-12`` at every step. Measured over
10 seeds and both gradient kinds of the grid below: at most 1.8e-14 (AdamW, where torch
multiplies p by ``1 - lr*wd`` and uniopt subtracts ``lr*wd*p``; 7e-15 for the other rules,
median 4e-16), so 1e-12 leaves room for rounding to accumulate over 300 steps and still sits
orders of magnitude below any wrong formula (the sanity tests show a relative change of 1e-6 in
one hyperparameter failing it). float32: see :func:`excess`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import uniopt as uo  # noqa: E402
import uniopt.torch  # noqa: E402
from helpers import expect_compiled, scaled_error  # noqa: E402
from uniopt.fast import cpu  # noqa: E402

STEPS = 300
# The grid's runs (and the wrong-hyperparameter tests, which must fail the grid's comparison) are
# shorter: each of those wrong hyperparameters fails it at the first or second step and reaches its
# largest float32 excess within 100, so 200 steps of state and feedback are still hundreds, at
# two thirds of the grid's time; errors of the first 200 steps are bounded by those measured over
# 300 below.
GRID_STEPS = 200
RTOL64 = 1e-12
EPS32 = float(np.finfo(np.float32).eps)
F32_FACTOR, F32_FIRST = 2.0, 4  # see excess()
PARAMS = ("bias", "layers0", "layers1", "w")  # Problem's parameters (trajectory names), in order

# every test here runs hundreds of steps against torch
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def torch_scalars_in_double() -> Iterator[None]:
    """torch keeps a parameter's scalar state (``step``, NAdam's ``mu_product``, ASGD's ``eta``
    and ``mu``) in its default dtype, float32 unless set; uniopt derives those numbers from the
    step count in double on the host, as torch does with a float64 default. With float32 scalars
    NAdam and ASGD would differ by float32's rounding of them (1e-8 relative) in every dtype, so
    the comparison here is with torch at its float64 default; tensors keep the dtypes given."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


# --- hyperparameters: the grid of switches and a seeded sampler ----------------------------------

RULES: dict[str, tuple[Callable[..., Any], type]] = {
    "sgd": (uo.sgd, torch.optim.SGD),
    "adagrad": (uo.adagrad, torch.optim.Adagrad),
    "rmsprop": (uo.rmsprop, torch.optim.RMSprop),
    "adadelta": (uo.adadelta, torch.optim.Adadelta),
    "adam": (uo.adam, torch.optim.Adam),
    "adamw": (uo.adamw, torch.optim.AdamW),
    "adamax": (uo.adamax, torch.optim.Adamax),
    "nadam": (uo.nadam, torch.optim.NAdam),
    "radam": (uo.radam, torch.optim.RAdam),
    "asgd": (uo.asgd, torch.optim.ASGD),
    "rprop": (uo.rprop, torch.optim.Rprop),
}


def _logu(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(10 ** rng.uniform(math.log10(lo), math.log10(hi)))


def sample(
    rule: str, on: dict[str, bool], rng: np.random.Generator, dtype: Any = np.float64
) -> dict[str, Any]:
    """Valid hyperparameters for ``rule``, the same keyword names for uniopt and torch.

    A switch that is off sets its hyperparameter to 0 (or False). L2 decay stays <= 1e-2, and
    gradients >= 1e-2 (see Problem): the decay enters the gradient, and where ``wd*p``
    outweighs the gradient noise an adaptive method drives p to a point where it steps by ~lr
    either way, and the loop amplifies any rounding difference by ``lr*wd/sqrt(v)`` per step
    (a factor 4.5 seen with 1e-5 gradients): two correct implementations then part at any
    precision.

    In float32 the L2 decay is rounded to a power of two. torch forms ``g + wd*p`` with one
    rounding, uniopt (NumPy has no fused multiply-add) rounds ``wd*p`` first; where the sum
    cancels, that extra half-ulp of ``wd*p`` is amplified by ``|wd*p| / |g + wd*p|``, and
    elements with a ratio of 1000 turn up among the ~1e6 element-steps of a run. With a power
    of two, ``wd*p`` is exact and both sides round the sum once, to the same number, so the
    float32 comparison measures the rules, not the conditioning of that sum (float64 runs keep
    arbitrary values: there the extra rounding stays far below 1e-12).
    """
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    wd = _logu(rng, 1e-4, 1e-2) if on.get("weight_decay") else 0.0
    if wd and np.dtype(dtype) == np.float32:
        wd = 2.0 ** round(math.log2(wd))
    if rule == "sgd":
        return dict(
            lr=_logu(rng, 1e-3, 1e-1),
            momentum=u(0.5, 0.99) if on["momentum"] else 0.0,
            dampening=u(0.1, 0.9) if on["dampening"] else 0.0,
            weight_decay=wd,
            nesterov=on["nesterov"],
        )
    if rule == "adagrad":
        return dict(
            lr=_logu(rng, 1e-3, 1e-1),
            lr_decay=_logu(rng, 1e-4, 1e-1) if on["lr_decay"] else 0.0,
            weight_decay=wd,
            initial_accumulator_value=u(0.01, 1.0) if on["initial_accumulator_value"] else 0.0,
            eps=_logu(rng, 1e-10, 1e-6),
        )
    if rule == "rmsprop":
        return dict(
            lr=_logu(rng, 1e-4, 1e-2),
            alpha=u(0.8, 0.999),
            eps=_logu(rng, 1e-10, 1e-6),
            weight_decay=wd,
            momentum=u(0.5, 0.95) if on["momentum"] else 0.0,
            centered=on["centered"],
        )
    if rule == "adadelta":
        return dict(lr=u(0.1, 1.0), rho=u(0.8, 0.99), eps=_logu(rng, 1e-8, 1e-5), weight_decay=wd)
    if rule in ("adam", "adamw"):
        return dict(
            lr=_logu(rng, 1e-4, 1e-2),
            betas=(u(0.5, 0.95), u(0.9, 0.9999)),
            eps=_logu(rng, 1e-10, 1e-6),
            # AdamW's decay never enters the gradient, so the caveats above do not apply
            weight_decay=wd if rule == "adam" else _logu(rng, 1e-3, 1e-1),
            amsgrad=on["amsgrad"],
        )
    if rule in ("adamax", "nadam", "radam"):
        decoupled = on.get("decoupled_weight_decay", False)
        hp = dict(
            lr=_logu(rng, 1e-4, 1e-2),
            betas=(u(0.5, 0.95), u(0.9, 0.9999)),
            eps=_logu(rng, 1e-10, 1e-6),
            weight_decay=_logu(rng, 1e-3, 1e-1) if decoupled else wd,
        )
        if rule == "nadam":
            hp["momentum_decay"] = _logu(rng, 1e-3, 1e-1)
        return hp if rule == "adamax" else {**hp, "decoupled_weight_decay": decoupled}
    if rule == "asgd":
        return dict(
            lr=_logu(rng, 1e-3, 1e-1),
            lambd=_logu(rng, 1e-4, 1e-1),
            alpha=u(0.5, 1.0),
            # averaging from an early step on, or (torch's default) never
            t0=float(rng.integers(5, 100)) if on["averaging"] else 1e6,
            weight_decay=wd,
        )
    if rule == "rprop":
        return dict(
            lr=_logu(rng, 1e-4, 1e-2),
            etas=(u(0.2, 0.8), u(1.05, 1.5)),
            step_sizes=(_logu(rng, 1e-8, 1e-5), _logu(rng, 1e-2, 1.0)),
        )
    raise AssertionError(rule)


def _switches(rule: str, names: tuple[str, ...]) -> Iterator[tuple[str, dict[str, bool], str]]:
    for values in itertools.product([False, True], repeat=len(names)):
        on = dict(zip(names, values, strict=True))
        if rule == "sgd" and on["nesterov"] and (not on["momentum"] or on["dampening"]):
            # torch's constructor refuses both; uniopt only the first (with dampening it steps
            # as torch's step does for a param group's values: check_nesterov)
            continue
        if on.get("decoupled_weight_decay") and not on["weight_decay"]:
            continue  # no decay to decouple
        yield rule, on, f"{rule}[{'-'.join(n for n, v in on.items() if v) or 'plain'}]"


# every valid combination of the switches the issue lists, one entry per configuration
GRID = [
    *_switches("sgd", ("momentum", "dampening", "nesterov", "weight_decay")),
    *_switches("adagrad", ("lr_decay", "initial_accumulator_value", "weight_decay")),
    *_switches("rmsprop", ("centered", "momentum", "weight_decay")),
    *_switches("adadelta", ("weight_decay",)),
    *_switches("adam", ("amsgrad", "weight_decay")),
    *_switches("adamw", ("amsgrad",)),
    *_switches("adamax", ("weight_decay",)),
    *_switches("nadam", ("weight_decay", "decoupled_weight_decay")),
    *_switches("radam", ("weight_decay", "decoupled_weight_decay")),
    *_switches("asgd", ("averaging", "weight_decay")),
    *_switches("rprop", ()),
]


def config(
    index: int, seed: int, dtype: Any = np.float64
) -> tuple[str, dict[str, Any], np.random.Generator]:
    """GRID entry ``index`` with hyperparameters drawn for ``seed``, and the generator that
    drew them (to draw the problem next)."""
    rule, on, _ = GRID[index]
    rng = np.random.default_rng([seed, index])
    return rule, sample(rule, on, rng, dtype), rng


# --- data: initial parameters and gradients, shared by both sides -------------------------------


class Problem:
    """A params tree of random-shaped tensors (0-d, one element, small, largish, then
    ``extra`` more small ones) and the gradients for it, from a seeded generator.

    The tree is ``{"bias": (), "layers": [(1,), small, ...], "w": large}``, so
    :func:`uniopt.trainables` lists bias, layers[0], layers[1], ..., w: the order of ``p0``.
    Each tensor has its own gradient scale, log-uniform in [1e-2, 10], so that ``eps`` weighs
    differently on each (from 1e-4 down to 1e-11 of sqrt(v)).
    """

    def __init__(self, rng: np.random.Generator, dtype: Any, kind: str, extra: int = 0) -> None:
        def small() -> tuple[int, ...]:
            return tuple(int(n) for n in rng.integers(2, 6, size=int(rng.integers(1, 4))))

        large = (int(rng.integers(30, 50)), int(rng.integers(40, 60)))
        self.shapes = [(), (1,), small(), *(small() for _ in range(extra)), large]
        self.rng, self.dtype = rng, dtype
        self.scale = [_logu(rng, 1e-2, 10.0) for _ in self.shapes]
        self.p0 = [np.asarray(rng.standard_normal(s), dtype) for s in self.shapes]
        # loss: curvature comparable to the noise, so the mean gradient and the noise are of the
        # same size (the moments correlate) and lr*h stays far below the stability limit
        on = kind == "loss"
        self.h = [
            on * 0.3 * sc * rng.uniform(0.5, 1.5, s)
            for s, sc in zip(self.shapes, self.scale, strict=True)
        ]
        self.c = [rng.standard_normal(s) for s in self.shapes]
        self.xi: list[Any] = []

    def names(self) -> list[str]:
        """The parameters' names in trajectories (:data:`PARAMS` without ``extra``)."""
        return ["bias", *(f"layers{i}" for i in range(len(self.shapes) - 2)), "w"]

    def tree(self, leaves: list[Any]) -> dict[str, Any]:
        return {"bias": leaves[0], "layers": list(leaves[1:-1]), "w": leaves[-1]}

    def next_step(self) -> None:
        """Draw this step's noise (one draw, used by every side)."""
        self.xi = [
            self.rng.standard_normal(s) * sc for s, sc in zip(self.shapes, self.scale, strict=True)
        ]

    def grads(self, params: list[Any], dtype: Any = None) -> list[Any]:
        """The gradient at ``params``: computed in float64, rounded to the run's dtype, then
        delivered in ``dtype`` (a float64 reference run gets the same float32-valued inputs)."""
        return [
            np.asarray(h * (np.asarray(p, np.float64) - c) + x, self.dtype).astype(
                dtype or self.dtype
            )
            for h, p, c, x in zip(self.h, params, self.c, self.xi, strict=True)
        ]


# --- running both sides --------------------------------------------------------------------------

# name -> stacked values after each step: ours, torch's (, a float64 torch run's)
Trajectories = dict[str, tuple[np.ndarray, ...]]


def run_pair(
    ours: Any,
    make_torch: Callable[[list[Any]], Any],
    problem: Problem,
    *,
    inplace: bool,
    flat_grads: bool,
    torch_hyper: Callable[[int], dict[str, Any]] | None = None,
    steps: int = STEPS,
    reference: bool = False,
    slots: bool = True,
) -> Trajectories:
    """Run ``ours`` and a torch optimizer side by side; every parameter and (with ``slots``)
    every state slot after every step, as ``{name: (ours[steps, ...], torch[steps, ...])}``.

    With ``reference``, each entry has a third array: torch in float64 fed the same
    (float32-valued) inputs, the exact answer for a float32 run to within float64 rounding.
    ``torch_hyper(s)`` gives the values to write into ``param_groups[0]`` before step ``s``
    (``s`` updates already applied), where uniopt evaluates its schedules.
    """
    params = problem.tree([p.copy() for p in problem.p0])
    state = uo.setup(ours, params)
    runs = [[torch.tensor(p) for p in problem.p0]]
    if reference:
        runs.append([torch.tensor(p, dtype=torch.float64) for p in problem.p0])
    opts = [make_torch(ps) for ps in runs]
    # the torch state key of each uniopt slot: uniopt's slot names are torch's
    slot_keys = {key: key.rsplit(".", 1)[1] for key in state.slots} if slots else {}
    rec: dict[str, list[list[np.ndarray]]] = {}
    names = problem.names()

    def record(name: str, ours: Any, *theirs: Any) -> None:
        if name not in rec:
            rec[name] = [[] for _ in range(1 + len(theirs))]
        into = rec[name]
        into[0].append(np.array(ours))
        for k, t in enumerate(theirs, 1):
            into[k].append(t.numpy().copy())

    for s in range(steps):
        problem.next_step()
        g = problem.grads(uo.trainables(params))
        grads = g if flat_grads else problem.tree(g)
        if inplace:
            state = uo.update_(state, params, grads)
        else:
            state, params = uo.update(state, params, grads)
        for ps, opt in zip(runs, opts, strict=True):
            if torch_hyper is not None:
                opt.param_groups[0].update(torch_hyper(s))
            tg = problem.grads([t.detach().numpy() for t in ps], ps[0].numpy().dtype)
            for t, x in zip(ps, tg, strict=True):
                t.grad = torch.from_numpy(x)
            opt.step()
        for i, (name, p) in enumerate(zip(names, uo.trainables(params), strict=True)):
            record(name, p, *(ps[i] for ps in runs))
            for key, tkey in slot_keys.items():
                theirs = (opt.state[ps[i]][tkey] for ps, opt in zip(runs, opts, strict=True))
                record(f"{name}.{tkey}", state.slots[key][i], *theirs)
    if slots:  # the same slots on both sides: a slot torch keeps and uniopt lacks goes unchecked
        for ps, opt in zip(runs, opts, strict=True):
            for t in ps:
                # NAdam's mu_product, ASGD's eta and mu: numbers uniopt derives from the step
                # count (test_torch_facade checks them)
                derived = getattr(getattr(uniopt.torch, type(opt).__name__), "_derived", ())
                assert set(opt.state[t]) - {"step", *derived} == set(slot_keys.values())
                if "step" in opt.state[t]:
                    assert int(opt.state[t]["step"]) == state.step == steps
    return {k: tuple(np.stack(v) for v in values) for k, values in rec.items()}


def excess(traj: Trajectories) -> dict[str, np.ndarray]:
    """Per tensor and step, the measured difference as a multiple of what is allowed (> 1: fail).

    float64: ``scaled_error(ours, torch) / 1e-12``.

    float32 (the trajectories carry a float64 reference run): uniopt must stay about as close
    to the float64 answer as torch's float32 run does. Both round every operation to float32,
    in different orders (torch forms lr/bias_correction1 as one scalar, fuses addcmul, addcdiv
    and lerp into fewer roundings and multiplies AdamW's p by ``1 - lr*wd`` rounded to float32;
    uniopt rounds each product and multiplies by lr last), so neither is the other. A step
    rounds a handful of operations, each by at most half an ulp of its operands, which share the
    tensor's scale, and the states carry every error into later steps: after n steps each run
    is within about n * eps32 of the exact result (the first step can take a few ulps at once:
    + F32_FIRST). Where the problem amplifies rounding (an update much larger than the
    parameter, a normalisation by a tiny sqrt(v)) both runs exceed that, and torch's own error
    on the tensor shows by how much. So after step n uniopt may be off by
    ``F32_FACTOR * max((n + F32_FIRST) * eps32, worst error of torch's run on that tensor)``;
    the factor covers uniopt's extra roundings (e.g. Adadelta's acc_delta, where torch's
    addcmul rounds once and uniopt three times: up to 2.6x torch's error measured). Measured
    over 10 seeds and both gradient kinds of the grid: at most 0.42 of this bound (median 0.08).
    """
    out = {}
    for name, (ours, theirs, *ref) in traj.items():
        if ours.dtype == np.float64:
            out[name] = scaled_error(ours, theirs) / RTOL64
            continue
        n = np.arange(1, len(ours) + 1)
        e_torch = scaled_error(theirs, ref[0]).max()
        allowed = F32_FACTOR * np.maximum((n + F32_FIRST) * EPS32, e_torch)
        out[name] = scaled_error(ours, ref[0]) / allowed
    return out


def worst(traj: Trajectories) -> tuple[float, str]:
    """The largest :func:`excess` over every step and tensor, and where it is."""
    ratio, where = 0.0, ""
    for name, r in excess(traj).items():
        k = int(np.argmax(r))
        if r[k] > ratio:
            ratio, where = float(r[k]), f"{name} after step {k + 1}"
    return ratio, where


def assert_parity(traj: Trajectories) -> None:
    ratio, where = worst(traj)
    assert ratio <= 1.0, f"uniopt and torch disagree: {where} ({ratio:.3g} x the tolerance)"


def torch_opt(cls: type, **kwargs: Any) -> Callable[[list[Any]], Any]:
    return lambda ps: cls(ps, foreach=False, **kwargs)


def api(seed: int) -> dict[str, bool]:
    """Alternate the ways of calling uniopt between tests: pure or in place, gradients as a
    tree or as the flat list aligned with trainables."""
    return dict(inplace=seed % 2 == 1, flat_grads=seed % 4 >= 2)


def grid_run(
    index: int,
    seed: int,
    kind: str,
    dtype: Any,
    both: dict[str, Any] | None = None,
    ours_only: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    **calls: bool,
) -> Trajectories:
    """GRID entry ``index`` against torch, with ``both`` overriding hyperparameters on both
    sides and ``ours_only(hp)`` changing uniopt's alone; ``calls``: see :func:`run_pair`
    (default: :func:`api`)."""
    rule, hp, rng = config(index, seed, dtype)
    hp = {**hp, **(both or {})}
    ours, theirs = RULES[rule]
    return run_pair(
        ours(**{**hp, **(ours_only(hp) if ours_only else {})}),
        torch_opt(theirs, **hp),
        Problem(rng, dtype, kind),
        reference=dtype == np.float32,
        steps=GRID_STEPS,
        **(calls or api(seed)),
    )


# --- the grid: every configuration, over seeds, gradient kinds and dtypes ------------------------

# four runs per configuration, each on its own seed (hyperparameters, shapes, scales and data
# differ): both gradient kinds in both dtypes, and all four ways of calling uniopt
RUNS = [  # seed, gradient kind, dtype, in place, flat gradient list
    pytest.param(0, "noise", np.float64, False, False, id="s0-noise-f64-update-tree"),
    pytest.param(1, "loss", np.float64, True, True, id="s1-loss-f64-update_-flat"),
    pytest.param(2, "loss", np.float32, True, False, id="s2-loss-f32-update_-tree"),
    pytest.param(3, "noise", np.float32, False, True, id="s3-noise-f32-update-flat"),
]


@pytest.mark.parametrize(("seed", "kind", "dtype", "inplace", "flat"), RUNS)
@pytest.mark.parametrize("index", range(len(GRID)), ids=[g[2] for g in GRID])
def test_matches_torch(
    index: int, seed: int, kind: str, dtype: Any, inplace: bool, flat: bool
) -> None:
    assert_parity(grid_run(index, seed, kind, dtype, inplace=inplace, flat_grads=flat))


def _grid_index(label: str) -> int:
    return next(i for i, g in enumerate(GRID) if g[2] == label)


# A hyperparameter uniopt gets wrong must fail the very comparison the grid uses, in both dtypes.
# float64 resolves a relative change of 1e-6 (of 1 - rate for the decay rates; 1e-5 for eps,
# whose effect is a further eps/sqrt(v) smaller). float32 resolves what changes the result by
# more than ~eps32 per step: 1e-3 of a decay rate (it scales a slot at once), 1e-2 of a factor
# of a small term (AdamW's lr*wd*p, Adagrad's lr_decay, ASGD's lambd), a factor 11 of eps,
# 1e-1 of NAdam's momentum_decay (it moves mu_t through 0.96^(t*psi), slowly). Where the term is
# too small at the sampled values to show in float32 at all, both sides get larger ones first.
WRONG = [  # grid entry, set on both sides, the hyperparameter uniopt gets wrong, by f64, by f32
    ("adam[amsgrad-weight_decay]", {}, "betas[1]", 1e-6, 1e-3),
    ("adam[plain]", {"eps": 1e-6, "lr": 1e-2}, "eps", 1e-5, 10.0),
    ("adamw[plain]", {"lr": 1e-2, "weight_decay": 0.1}, "weight_decay", 1e-6, 1e-2),
    ("sgd[momentum-dampening-weight_decay]", {}, "dampening", 1e-6, 1e-3),
    ("rmsprop[centered-momentum]", {}, "alpha", 1e-6, 1e-3),
    ("adagrad[lr_decay-initial_accumulator_value]", {"lr": 0.1}, "lr_decay", 1e-6, 1e-2),
    ("adadelta[weight_decay]", {}, "rho", 1e-6, 1e-3),
    ("nadam[weight_decay]", {"momentum_decay": 0.1}, "momentum_decay", 1e-6, 0.1),
    ("radam[plain]", {}, "betas[1]", 1e-6, 1e-3),
    ("asgd[averaging]", {"lambd": 0.1}, "lambd", 1e-6, 1e-2),
]


def _off_by(hp: dict[str, Any], field: str, rel: float) -> dict[str, Any]:
    """``field`` changed by ``rel``: a factor of eps and weights, of 1 - rate for decay rates."""
    if field == "betas[1]":
        b1, b2 = hp["betas"]
        return {"betas": (b1, 1 - (1 - b2) * (1 + rel))}
    if field in ("alpha", "rho"):
        return {field: 1 - (1 - hp[field]) * (1 + rel)}
    return {field: hp[field] * (1 + rel)}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    ("label", "both", "field", "r64", "r32"), WRONG, ids=[f"{w[0]}.{w[2]}" for w in WRONG]
)
def test_wrong_hyperparameter_is_caught(
    label: str, both: dict[str, Any], field: str, r64: float, r32: float, dtype: Any
) -> None:
    rel, seed = (r64, 0) if dtype == np.float64 else (r32, 5)
    ours_only = lambda hp: _off_by(hp, field, rel)  # noqa: E731
    traj = grid_run(_grid_index(label), seed, "noise", dtype, both, ours_only)
    ratio, where = worst(traj)
    assert ratio > 1.0, f"a wrong {field} went unnoticed: {ratio:.3g} x the tolerance at {where}"


# --- schedules: the same values written into torch's param_groups before each step ---------------

S = uo.schedules


def at(value: Any, s: int) -> Any:
    """A hyperparameter (number, schedule, or a tuple of them) resolved at step ``s``."""
    if isinstance(value, tuple):
        return tuple(at(v, s) for v in value)
    return float(value(s)) if callable(value) else value


def scheduled_run(
    rule: str, hp: dict[str, Any], seed: int, kind: str, slots: bool = True
) -> Trajectories:
    """uniopt with schedules in ``hp`` against torch with their values set in param_groups."""
    ours, theirs = RULES[rule]
    scheduled = [k for k, v in hp.items() if any(map(callable, v if isinstance(v, tuple) else [v]))]
    assert scheduled
    return run_pair(
        ours(**hp),
        torch_opt(theirs, **{k: at(v, 0) for k, v in hp.items()}),
        Problem(np.random.default_rng(seed), np.float64, kind),
        torch_hyper=lambda s: {k: at(hp[k], s) for k in scheduled},
        slots=slots,
        **api(seed),
    )


LR_SCHEDULES = [
    ("sgd", dict(lr=S.cosine(0.05, steps=STEPS), momentum=0.9, dampening=0.1, weight_decay=1e-3)),
    ("sgd", dict(lr=S.warmup(30, S.cosine(0.05, steps=STEPS - 30)), momentum=0.9, nesterov=True)),
    (
        "adagrad",
        dict(
            lr=S.exponential(0.05, rate=0.99),
            lr_decay=1e-2,
            weight_decay=1e-3,
            initial_accumulator_value=0.1,
        ),
    ),
    (
        "rmsprop",
        dict(lr=S.linear(1e-2, 1e-4, steps=STEPS), momentum=0.5, weight_decay=1e-3, centered=True),
    ),
    ("adadelta", dict(lr=S.piecewise_constant(1.0, {100: 0.5, 200: 0.1}), weight_decay=1e-3)),
    (
        "adam",
        dict(lr=S.warmup(50, S.cosine(1e-2, steps=STEPS - 50)), weight_decay=1e-3, amsgrad=True),
    ),
    ("adamw", dict(lr=lambda s: 1e-2 / math.sqrt(1 + s), weight_decay=0.05, amsgrad=True)),
    ("adamax", dict(lr=S.cosine(1e-2, steps=STEPS), weight_decay=1e-3)),
    ("nadam", dict(lr=S.warmup(30, S.cosine(1e-2, steps=STEPS - 30)), weight_decay=0.05,
                   decoupled_weight_decay=True)),
    ("radam", dict(lr=S.exponential(1e-2, rate=0.99), weight_decay=1e-3)),
]
OTHER_SCHEDULES = [
    (
        "sgd",
        dict(lr=0.02, momentum=S.linear(0.5, 0.95, steps=STEPS), dampening=0.2, weight_decay=1e-3),
    ),
    ("sgd", dict(lr=0.02, momentum=lambda s: 0.9 - 0.3 * math.exp(-s / 50), nesterov=True)),
    (
        "adagrad",
        dict(
            lr=0.05, lr_decay=S.linear(0.0, 0.05, steps=STEPS), eps=S.exponential(1e-4, rate=0.97)
        ),
    ),
    (
        "rmsprop",
        dict(lr=1e-3, alpha=S.linear(0.9, 0.999, steps=STEPS), momentum=0.5, centered=True),
    ),
    ("adadelta", dict(lr=1.0, rho=lambda s: 0.9 + 0.09 * min(s, 200) / 200, weight_decay=1e-3)),
    (
        "adam",
        dict(
            lr=1e-2,
            betas=(S.linear(0.8, 0.95, steps=STEPS), lambda s: 0.999 - 0.09 * 0.98**s),
            weight_decay=1e-3,
        ),
    ),
    ("adamw", dict(lr=1e-2, weight_decay=S.cosine(0.1, steps=STEPS, floor=0.01), amsgrad=True)),
    # RAdam's rectification follows beta2 step by step, as torch's
    ("radam", dict(lr=1e-2, betas=(S.linear(0.8, 0.95, steps=STEPS), lambda s: 0.99 + 1e-5 * s),
                   weight_decay=S.linear(0.0, 1e-2, steps=STEPS), decoupled_weight_decay=True)),
    ("rprop", dict(lr=1e-3, etas=(S.linear(0.3, 0.7, steps=STEPS), lambda s: 1.5 - s / 1000),
                   step_sizes=(1e-6, S.cosine(0.1, steps=STEPS, floor=1e-3)))),
    # ASGD's other numbers enter torch's eta at the step before (see uniopt.torch.ASGD)
    ("asgd", dict(lr=0.02, t0=20, weight_decay=S.linear(1e-3, 1e-2, steps=STEPS))),
]


@pytest.mark.parametrize(
    ("rule", "hp"), LR_SCHEDULES, ids=[f"{r}{i}" for i, (r, _) in enumerate(LR_SCHEDULES)]
)
def test_lr_schedule_matches_torch(rule: str, hp: dict[str, Any]) -> None:
    seed = LR_SCHEDULES.index((rule, hp))
    assert_parity(scheduled_run(rule, hp, seed, ["noise", "loss"][seed % 2]))


@pytest.mark.parametrize(
    ("rule", "hp"),
    OTHER_SCHEDULES,
    ids=[f"{r}-{'-'.join(k for k in hp if k != 'lr')}" for r, hp in OTHER_SCHEDULES],
)
def test_other_hyperparameter_schedules_match_torch(rule: str, hp: dict[str, Any]) -> None:
    seed = 100 + OTHER_SCHEDULES.index((rule, hp))
    assert_parity(scheduled_run(rule, hp, seed, ["loss", "noise"][seed % 2]))


def _constant(hp: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """``hp`` with the hyperparameters ``names`` replaced by constant lambdas."""

    def const(x: Any) -> Any:
        return tuple(const(v) for v in x) if isinstance(x, tuple) else (lambda s: x)

    return {k: const(v) if k in names else v for k, v in hp.items()}


@pytest.mark.parametrize(
    "index",
    [
        pytest.param(i, id=g[2]) for i, g in enumerate(GRID)
    ],
)
def test_constant_schedule_is_bitwise_the_number(index: int) -> None:
    # 100 steps: a constant cannot drift, a difference shows by the second step
    rule, hp, rng = config(index, 0)
    make = RULES[rule][0]
    plain = make(**hp)
    # a 0 that decides a block stays a number: scheduled, the block is kept for the steps where
    # it is not 0, and the rule is built as torch's is with it (RMSprop with momentum applies lr
    # after the buffer, one rounding apart from its addcdiv without)
    fixed = {k for k in plain.optional if not plain.on(k)}
    sched = make(**_constant(hp, [k for k in plain.hyperparameters() if k not in fixed]))
    problem = Problem(rng, np.float64, "loss")
    a, b = (problem.tree([p.copy() for p in problem.p0]) for _ in range(2))
    sa, sb = uo.setup(plain, a), uo.setup(sched, b)
    for _ in range(100):
        problem.next_step()
        ga, gb = problem.grads(uo.trainables(a)), problem.grads(uo.trainables(b))
        if index % 2:
            sa, sb = uo.update_(sa, a, ga), uo.update_(sb, b, gb)
        else:
            (sa, a), (sb, b) = uo.update(sa, a, ga), uo.update(sb, b, gb)
        for x, y in zip(uo.trainables(a), uo.trainables(b), strict=True):
            assert np.array_equal(x, y)
        for key in sa.slots:  # a schedule may add a block (and slot) a 0 leaves out, not remove one
            for x, y in zip(sa.slots[key], sb.slots[key], strict=True):
                assert np.array_equal(x, y), key


@pytest.mark.parametrize(
    ("rule", "hp"),
    [
        ("sgd", dict(lr=0.02, momentum=lambda s: 0.0 if s < 10 else 0.9)),
        ("rmsprop", dict(lr=1e-3, momentum=lambda s: 0.0 if s % 50 == 25 else 0.5)),
    ],
    ids=["sgd-warmup-from-0", "rmsprop-dip-to-0"],
)
def test_momentum_schedule_through_zero_matches_torch(rule: str, hp: dict[str, Any]) -> None:
    # where momentum is 0 the update passes through and the buffer is kept, as in torch;
    # parameters only: torch's SGD has no buffer while the momentum is 0
    assert_parity(scheduled_run(rule, hp, 3, "noise", slots=False))


# --- weight decay: L2 in a chain, decoupled, and what the difference is --------------------------


@pytest.mark.parametrize(
    "sgd_hp",
    [
        dict(lr=0.05),
        dict(lr=0.02, momentum=0.9, dampening=0.3),
        dict(lr=0.02, momentum=0.8, nesterov=True),
    ],
    ids=["plain", "momentum-dampening", "nesterov"],
)
def test_chain_weight_decay_sgd_is_torch_sgd_weight_decay(sgd_hp: dict[str, Any]) -> None:
    wd = 3e-3
    traj = run_pair(
        uo.chain(uo.weight_decay(wd), uo.sgd(**sgd_hp)),
        torch_opt(torch.optim.SGD, weight_decay=wd, **sgd_hp),
        Problem(np.random.default_rng(11), np.float64, "loss"),
        inplace=True,
        flat_grads=True,
    )
    assert_parity(traj)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_chain_weight_decay_adam_is_torch_adam_not_adamw(amsgrad: bool) -> None:
    wd, hp = 1e-2, dict(lr=1e-2, betas=(0.85, 0.995), eps=1e-7, amsgrad=amsgrad)
    ours = uo.chain(uo.weight_decay(wd), uo.adam(**hp))
    kw = dict(inplace=amsgrad, flat_grads=not amsgrad)

    def run(cls: type) -> Trajectories:
        problem = Problem(np.random.default_rng(12), np.float64, "noise")
        return run_pair(ours, torch_opt(cls, weight_decay=wd, **hp), problem, **kw)

    assert_parity(run(torch.optim.Adam))
    # the L2 term goes through the moments, AdamW's decay does not: ten orders above the
    # agreement with Adam
    adamw = run(torch.optim.AdamW)
    assert max(scaled_error(*adamw[n]).max() for n in PARAMS) > 1e-2


@pytest.mark.parametrize(
    "base",
    [uo.sgd(lr=0.02, momentum=0.9, nesterov=True), uo.adam(lr=1e-2, amsgrad=True)],
    ids=["sgd-nesterov", "amsgrad"],
)
def test_l2_equals_half_wd_sum_of_squares_in_the_loss(base: Any) -> None:
    """``chain(weight_decay(wd), base)`` fed the gradient of a least-squares loss L is ``base``
    fed torch autograd's gradient of ``L + wd/2 * sum(p**2)`` over ``uo.trainables(params)``."""
    wd, rng = 0.05, np.random.default_rng(13)
    p0 = {
        "b": rng.standard_normal(3),
        "s": np.asarray(rng.standard_normal()),
        "w": rng.standard_normal((5, 3)),
    }
    true_w = rng.standard_normal((5, 3))

    def grad(leaves: list[np.ndarray], x: Any, y: Any, penalty: float) -> list[np.ndarray]:
        b, s, w = ts = [torch.tensor(a, requires_grad=True) for a in leaves]  # trainables: b, s, w
        loss = 0.5 * ((s * (x @ w) + b - y) ** 2).sum(dim=1).mean()
        loss = loss + penalty / 2 * sum((t**2).sum() for t in ts)
        return [g.numpy() for g in torch.autograd.grad(loss, ts)]

    runs = {  # name: (rule, the penalty's weight in the loss)
        "l2": (uo.chain(uo.weight_decay(wd), base), 0.0),
        "loss": (base, wd),
        "none": (base, 0.0),
    }
    params = {k: {n: a.copy() for n, a in p0.items()} for k in runs}
    states = {k: uo.setup(rule, params[k]) for k, (rule, _) in runs.items()}
    traj: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {n: ([], []) for n in p0}
    for _ in range(STEPS):
        x = torch.tensor(rng.standard_normal((8, 5)))  # a fresh minibatch
        y = x @ torch.tensor(true_w) + 0.1 * torch.tensor(rng.standard_normal((8, 3)))
        for k, (_, penalty) in runs.items():
            g = grad(uo.trainables(params[k]), x, y, penalty)
            if k == "l2":  # a tree, in place
                tree = dict(zip(["b", "s", "w"], g, strict=True))
                states[k] = uo.update_(states[k], params[k], tree)
            else:  # the flat list aligned with trainables, pure
                states[k], params[k] = uo.update(states[k], params[k], g)
        for n in p0:
            traj[n][0].append(params["l2"][n].copy())
            traj[n][1].append(params["loss"][n].copy())
    for n, (l2, loss) in traj.items():
        assert scaled_error(np.stack(l2), np.stack(loss)).max() <= RTOL64, n
    # the decay is doing something
    assert max(np.max(np.abs(params["none"][n] - params["l2"][n])) for n in p0) > 1e-2


def _adam_decoupled_reference(
    problem: Problem,
    lr: Callable[[int], float],
    wd: float,
    betas: tuple[float, float],
    eps: float,
    amsgrad: bool,
) -> Iterator[dict[str, list[np.ndarray]]]:
    """Adam's direction A and ``p <- p - lr*A - wd*p``, written out; yields parameters and
    moments after each step. Draws each step's noise: run the rule under test in lockstep."""
    b1, b2 = betas
    p = [x.astype(np.float64) for x in problem.p0]
    m, v, vmax = ([np.zeros_like(x) for x in p] for _ in range(3))
    for t in range(1, STEPS + 1):
        problem.next_step()
        g = problem.grads(p)
        for i in range(len(p)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            vmax[i] = np.maximum(vmax[i], v[i])
            a = (m[i] / (1 - b1**t)) / (np.sqrt((vmax[i] if amsgrad else v[i]) / (1 - b2**t)) + eps)
            p[i] = p[i] - lr(t - 1) * a - wd * p[i]
        yield {"param": p, "exp_avg": m, "exp_avg_sq": v, "max_exp_avg_sq": vmax}


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_uncoupled_is_the_formula(amsgrad: bool) -> None:
    """``adamw(couple_lr=False)``: ``p <- p - lr*A - wd*p``, the decay untouched by the lr
    schedule (which here falls to 0)."""
    lr, wd, betas, eps = S.cosine(1e-2, steps=STEPS), 1e-3, (0.8, 0.99), 1e-7
    rule = uo.adamw(lr=lr, betas=betas, eps=eps, weight_decay=wd, amsgrad=amsgrad, couple_lr=False)
    problem = Problem(np.random.default_rng(14), np.float64, "loss")
    params = problem.tree([p.copy() for p in problem.p0])
    state = uo.setup(rule, params)
    rec: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for ref in _adam_decoupled_reference(problem, lr, wd, betas, eps, amsgrad):
        g = problem.grads(uo.trainables(params))  # this step's noise, at uniopt's own params
        if amsgrad:
            state = uo.update_(state, params, g)
        else:
            state, params = uo.update(state, params, g)
        ours = {"param": uo.trainables(params)}
        ours |= {k.rsplit(".", 1)[1]: v for k, v in state.slots.items()}
        for key, arrays in ours.items():
            for name, a, b in zip(problem.names(), arrays, ref[key], strict=True):
                rec.setdefault(f"{name}.{key}", ([], []))
                rec[f"{name}.{key}"][0].append(np.array(a))
                rec[f"{name}.{key}"][1].append(b.copy())
    assert len(rec) == 4 * (3 + amsgrad)
    for name, (a, b) in rec.items():
        err = scaled_error(np.stack(a), np.stack(b))
        assert err.max() <= RTOL64, f"{name} after step {err.argmax() + 1}: {err.max():.3g}"


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_uncoupled_is_torch_adamw_with_wd_over_lr(amsgrad: bool) -> None:
    """At a constant lr, torch's ``p *= 1 - lr*wd'`` with ``wd' = wd/lr`` is ``p -= wd*p``."""
    lr, wd = 3e-3, 2e-4
    traj = run_pair(
        uo.adamw(lr=lr, weight_decay=wd, amsgrad=amsgrad, couple_lr=False),
        torch_opt(torch.optim.AdamW, lr=lr, weight_decay=wd / lr, amsgrad=amsgrad),
        Problem(np.random.default_rng(15), np.float64, "loss"),
        **api(int(amsgrad)),
    )
    assert_parity(traj)


def test_float32_adamw_torch_rounds_its_decay_factor() -> None:
    """torch's float32 AdamW multiplies p by ``1 - lr*wd`` rounded to float32: a relative error
    of up to eps32/2 per step in p, biased the same way every step. uniopt does the same, on
    purpose (its decay writes ``p*(1 - lr*wd)`` first, as torch's): both drift alike from the
    float64 trajectory, and stay together (the float32 tolerance, see excess, is for the
    square root's rounding)."""
    lr, wd = 1e-2, 0.02
    factor = float(np.float32(1 - lr * wd))
    drift = abs(factor - (1 - lr * wd))  # per step, relative to p
    assert drift > 0.2 * EPS32  # of at most eps32/4: these values round badly, on purpose
    traj = run_pair(
        uo.adamw(lr=lr, weight_decay=wd),
        torch_opt(torch.optim.AdamW, lr=lr, weight_decay=wd),
        Problem(np.random.default_rng(16), np.float32, "noise"),
        reference=True,
        **api(0),
    )
    assert_parity(traj)
    ours = max(scaled_error(traj[n][0], traj[n][2]).max() for n in PARAMS)
    theirs = max(scaled_error(traj[n][1], traj[n][2]).max() for n in PARAMS)
    for err in (ours, theirs):
        assert 0.5 * STEPS * drift < err < 2 * STEPS * drift
    assert abs(ours - theirs) < 0.1 * theirs


# --- the compiled path ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "dtype"),
    [
        ("sgd[momentum-dampening-weight_decay]", np.float64),
        ("rmsprop[centered-momentum-weight_decay]", np.float32),
        ("adam[amsgrad-weight_decay]", np.float64),
    ],
)
def test_compiled_path_matches_torch(label: str, dtype: Any) -> None:
    """The grid's trees are small enough for uniopt's reference path; a model with many
    leaves takes the compiled one (uniopt.fast.cpu), which must agree with torch just as well.
    (tests/test_fused.py holds it to the reference path bit for bit, for every rule; this is
    the end-to-end check on a few.)"""
    index = _grid_index(label)
    rule, hp, rng = config(index, 6, dtype)
    ours, theirs = RULES[rule]
    problem = Problem(rng, dtype, "loss", extra=cpu.MIN_LEAVES)
    with expect_compiled(STEPS):  # every step
        traj = run_pair(
            ours(**hp), torch_opt(theirs, **hp), problem, reference=dtype == np.float32,
            **api(index),
        )
    assert_parity(traj)
