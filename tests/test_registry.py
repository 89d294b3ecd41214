"""One generic suite over every rule of :mod:`uniopt.registry`: a rule declares its
:class:`~uniopt.base.Info` and is tested here with no line written for it. Nothing below names
a rule; where rules differ, the difference is a field of ``Info`` (``needs_closure``,
``complex``, ``jit``, ``backends``, ``rtol``, ``example``, ``budget``) or a capability their
parts declare (a per-leaf part refusing a leaf's shape, :meth:`~uniopt.base.PerLeaf.check_shape`).

Every rule is built from ``info.example`` and driven by the gradient of a problem (a rule that
``needs_closure`` through :func:`uniopt.minimize_step`, handed the loss and gradient as a
closure). What is checked, per rule:

* convergence, within ``info.budget`` steps from the stated start:
  the quadratic ``f(x) = 1/2 sum_i d_i (x_i - 1)^2``, ``d = linspace(1, 100, 10)`` (condition
  number 100), from ``x = 0``, to ``f <= 1e-4 f(0)``; and Rosenbrock
  ``f(x, y) = (1 - x)^2 + 100 (y - x^2)^2`` from ``(-1.5, 2)`` (``f = 12.5``), to
  ``f <= 0.1``: through the curved valley, past its bend (``f = 1`` at the origin), to within
  about 0.3 of the minimum ``(1, 1)``;
* float32 and float64 params keep their dtype, and so does every array of the state;
* every array of the state keeps the dtype setup gave it, for float16, float32 and float64
  params and each ``state_dtype`` (None, ``"float32"``, ``"float64"``);
* the optax protocol (``rule.init``/``rule.update``, updates added) and
  ``uniopt.torch.Optimizer(params, rule)`` land where ``uo.update`` does;
* the pure ``uo.update`` and the in-place ``uo.update_`` agree bit for bit on NumPy;
* NumPy, torch, JAX (x64) and array-api-strict agree to ``info.rtol`` over 10 steps in
  float64, for the libraries in ``info.backends``;
* every number among the hyperparameters replaced by ``uo.schedules.constant`` of itself gives
  the same trajectory, bit for bit on NumPy;
* ``jax.jit(uo.update)`` traces once and compiles once (counted in JAX's compile log) over
  those 10 steps (a rule with ``info.jit`` false instead refuses with a TypeError that says
  so, and runs eagerly), and every leaf of its JAX state is committed to a device where the
  params are, and only there (else a second compilation beside committed params);
* inside ``uo.partition`` and ``uo.freeze`` a frozen leaf stays bit for bit where it was and
  inside ``uo.masked`` an unmasked leaf takes the raw gradient, while the other leaves step
  exactly as the plain rule on them alone;
* complex params (where ``info.complex``) step as the pairs of their real and imaginary parts
  (torch's ``view_as_real``, see tests/test_complex.py), slots included;
* the registry's ``slots`` are the state's slot names after setup;

and the README's rule table is ``registry.table()``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import array_api_compat as aac
import numpy as np
import pytest

import uniopt as uo
from helpers import assert_same, compilations, counting_jit, reference_path, rel_diff
from uniopt import registry
from uniopt.base import Info, PerLeaf, Transform, WholeTree

NAMES = registry.names()
by_rule = pytest.mark.parametrize("name", NAMES)

# the small tree of the quick tests: leaves of 2, 1 and 2 dimensions; a rule whose per-leaf
# part refuses a shape (Muon: matrices only) gets the leaves it takes; the last leaf kept is
# the one held still in the partition, freeze and masked test
SHAPES = {"a": (3, 4), "b": (5,), "c": (2, 3)}
STEPS = 5


def _build(e: registry.Entry, **changes: Any) -> Transform:
    return e.rule(**{**e.example, **changes})


def _takes(rule: Transform, shape: tuple[int, ...]) -> bool:
    return all(p.check_shape(shape) is None for p in rule.flat_parts if isinstance(p, PerLeaf))


def _shape(rule: Transform, n: int) -> tuple[int, ...]:
    """A leaf of ``n`` elements the rule takes: a vector, else a matrix of one row."""
    shape = next((s for s in [(n,), (1, n)] if _takes(rule, s)), None)
    assert shape is not None, f"{rule.name} takes neither a vector nor a matrix of {n}"
    return shape


class Problem:
    """``f(p) = sum over leaves of 1/2 sum C |p - T|^2``, C in [0.5, 2], T random: its
    gradient ``C (p - T)`` (for complex leaves, the one torch takes: ``C (z - T)``), and the
    closure ``p -> (f, grad)`` that a rule which ``needs_closure`` is stepped with. ``conv``
    turns the NumPy constants into the library's arrays."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: Any = np.float64,
                 conv: Callable[[np.ndarray], Any] = np.asarray, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        cplx = np.issubdtype(dtype, np.complexfloating)
        self.init: dict[str, np.ndarray] = {}
        self.c: dict[str, Any] = {}
        self.t: dict[str, Any] = {}
        for k, s in shapes.items():
            p, t = (rng.standard_normal(s) + 1j * rng.standard_normal(s) if cplx
                    else rng.standard_normal(s) for _ in range(2))
            self.init[k] = np.asarray(p, dtype)
            self.c[k] = conv(rng.uniform(0.5, 2.0, s).astype(np.finfo(dtype).dtype))
            self.t[k] = conv(np.asarray(t, dtype))
        self.conv = conv

    def params(self) -> dict[str, Any]:
        return {k: self.conv(v.copy()) for k, v in self.init.items()}

    def grad(self, p: dict[str, Any]) -> dict[str, Any]:
        return {k: self.c[k] * (p[k] - self.t[k]) for k in p}

    def hvp(self, p: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """The Hessian-vector product at ``p`` (``C v``), for a rule that reads ``hvp``."""
        return lambda v: {k: self.c[k] * v[k] for k in v}

    def closure(self, p: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        loss = sum(aac.array_namespace(v).sum(0.5 * self.c[k] * abs(v - self.t[k]) ** 2)
                   for k, v in p.items())
        return loss, self.grad(p)


def _drive(e: registry.Entry, state: uo.State, params: Any, problem: Any, steps: int,
           inplace: bool = False) -> tuple[uo.State, Any]:
    """``steps`` steps on ``problem`` (pure, or in place with ``inplace``)."""
    for _ in range(steps):
        extra: dict[str, Any] = {}
        if e.step_args:  # what the rule reads of the objective, beside the gradient
            loss, g = problem.closure(params)
            given = {"value": loss, "grad": g, "value_fn": problem.closure,
                     "hvp": problem.hvp(params)}
            extra = {k: given[k] for k in e.step_args}
        if e.needs_closure and inplace:
            state, _ = uo.minimize_step_(state, params, problem.closure)
        elif e.needs_closure:
            state, params, _ = uo.minimize_step(state, params, problem.closure)
        elif inplace:
            state = uo.update_(state, params, problem.grad(params), **extra)
        else:
            state, params = uo.update(state, params, problem.grad(params), **extra)
    return state, params


def _shapes(rule: Transform) -> dict[str, tuple[int, ...]]:
    shapes = {k: s for k, s in SHAPES.items() if _takes(rule, s)}
    assert len(shapes) >= 2, f"{rule.name} takes too few of {SHAPES}"
    return shapes


def _run(e: registry.Entry, rule: Transform | None = None, steps: int = STEPS,
         dtype: Any = np.float64, inplace: bool = False) -> tuple[uo.State, dict[str, Any]]:
    rule = _build(e) if rule is None else rule
    problem = Problem(_shapes(rule), dtype)
    params = problem.params()
    return _drive(e, uo.setup(rule, params), params, problem, steps, inplace)


def _state_arrays(state: uo.State) -> list[Any]:
    import optree

    from uniopt.tree import NAMESPACE

    out = [a for v in state.slots.values() for a in v if a is not None]
    return out + [a for a in optree.tree_leaves(state.tree_states, namespace=NAMESPACE)
                  if hasattr(a, "dtype")]


# --- convergence --------------------------------------------------------------------------------


class Quadratic:
    d = np.linspace(1.0, 100.0, 10)
    start = np.zeros(10)
    threshold = 1e-4 * 0.5 * float(np.sum(d))  # 1e-4 of f(start)

    def loss(self, x: np.ndarray) -> float:
        return 0.5 * float(np.sum(self.d * (x.ravel() - 1.0) ** 2))

    def gradient(self, x: np.ndarray) -> np.ndarray:
        return (self.d * (x.ravel() - 1.0)).reshape(x.shape)

    def hessian(self, x: np.ndarray) -> np.ndarray:
        return np.diag(self.d)


class Rosenbrock:
    start = np.array([-1.5, 2.0])
    threshold = 0.1

    def loss(self, x: np.ndarray) -> float:
        a, b = x.ravel()
        return float((1 - a) ** 2 + 100 * (b - a * a) ** 2)

    def gradient(self, x: np.ndarray) -> np.ndarray:
        a, b = x.ravel()
        return np.array([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)]).reshape(x.shape)

    def hessian(self, x: np.ndarray) -> np.ndarray:
        a, b = x.ravel()
        return np.array([[2 - 400 * (b - 3 * a * a), -400 * a], [-400 * a, 200.0]])


class _OneLeaf:
    """A problem on one leaf ``x`` as :func:`_drive` takes it."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def grad(self, p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"x": self.f.gradient(p["x"])}

    def closure(self, p: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        return self.f.loss(p["x"]), self.grad(p)

    def hvp(self, p: dict[str, np.ndarray]) -> Callable[[dict[str, Any]], dict[str, Any]]:
        h = self.f.hessian(p["x"])
        return lambda v: {"x": (h @ v["x"].ravel()).reshape(v["x"].shape)}


@by_rule
@pytest.mark.parametrize("problem", [Quadratic, Rosenbrock], ids=lambda p: p.__name__)
def test_converges_within_its_budget(name: str, problem: type) -> None:
    e = registry.entry(name)
    f = problem()
    rule = _build(e)
    params = {"x": f.start.reshape(_shape(rule, f.start.size)).copy()}
    with np.errstate(over="ignore", invalid="ignore"):  # a failing run says so below
        _, params = _drive(e, uo.setup(rule, params), params, _OneLeaf(f), e.budget)
    loss = f.loss(params["x"])
    assert math.isfinite(loss) and loss <= f.threshold, (
        f"{name} with {e.example} reached {loss:.3g} after {e.budget} steps "
        f"(threshold {f.threshold:.3g})")


# --- dtypes, pure and in place, slots -----------------------------------------------------------


@by_rule
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_dtype_is_kept(name: str, dtype: Any) -> None:
    e = registry.entry(name)
    for inplace in (False, True):
        state, params = _run(e, steps=3, dtype=dtype, inplace=inplace)
        for a in params.values():
            assert type(a) is np.ndarray and a.dtype == dtype, inplace
        for a in _state_arrays(state):  # a minimizer's numbers may be NumPy scalars
            if np.issubdtype(a.dtype, np.floating):
                assert a.dtype == dtype, (inplace, a.dtype)


def _dtypes(state: uo.State) -> dict[str, str]:
    """Each array of ``state`` (a member's state's, a generator's too) by its path."""
    import optree

    from uniopt.tree import NAMESPACE

    paths, leaves, _ = optree.tree_flatten_with_path(state, namespace=NAMESPACE)
    return {"/".join(map(str, p)): str(x.dtype) for p, x in zip(paths, leaves, strict=True)
            if hasattr(x, "dtype")}


@by_rule
def test_the_state_keeps_the_dtypes_setup_gave_it(name: str) -> None:
    """After steps, pure and in place, every array of the state has the dtype it had after
    setup, for float16, float32 and float64 params and each ``state_dtype``: a checkpoint
    saved at any step loads with ``like=(rule, params)``, which sets the state up afresh.
    (A minimizer's history, made at its first step, has no dtype from setup to keep.)"""
    e = registry.entry(name)
    rule = _build(e)
    exact = any(p.exact_state for p in rule.flat_parts)  # (FTRL: no state narrower than p)
    for dtype in (np.float16, np.float32, np.float64):
        problem = Problem(_shapes(rule), dtype)
        for state_dtype in (None, "float32", "float64"):
            if exact and state_dtype == "float32" and dtype == np.float64:
                with pytest.raises(ValueError, match="not offered for"):
                    uo.setup(rule, problem.params(), state_dtype=state_dtype)
                continue
            want = _dtypes(uo.setup(rule, problem.params(), state_dtype=state_dtype))
            for inplace in (False, True):
                params = problem.params()
                with np.errstate(all="ignore"):  # float16 may overflow: dtypes are the point
                    state, _ = _drive(e, uo.setup(rule, params, state_dtype=state_dtype),
                                      params, problem, 2, inplace)
                got = _dtypes(state)
                assert {k: got.get(k) for k in want} == want, (
                    np.dtype(dtype).name, state_dtype, inplace)


@by_rule
def test_update_and_update_in_place_agree_bit_for_bit(name: str) -> None:
    e = registry.entry(name)
    s1, p1 = _run(e)
    s2, p2 = _run(e, inplace=True)
    assert_same(list(p1.values()), list(p2.values()))
    assert s1.step == s2.step and list(s1.slots) == list(s2.slots)
    assert_same(_state_arrays(s1), _state_arrays(s2))


def _stepped_by_gradients(name: str) -> tuple[Transform, Any]:
    """The rule's example and its problem, or the test skipped where the step reads more than
    a gradient."""
    e = registry.entry(name)
    if e.step_args or e.needs_closure:
        pytest.skip("the step reads the objective, not a gradient alone")
    rule = _build(e)
    return rule, Problem(_shapes(rule), np.float64)


@by_rule
def test_in_place_gradients_that_are_the_params_arrays(name: str) -> None:
    """``update_(state, params, params)`` (the gradient of ``|w|^2/2`` is ``w``) steps as with a
    copy of the params for gradients, bit for bit: Adan's previous gradient was the array the
    step had just written with the new params."""
    rule, problem = _stepped_by_gradients(name)
    runs = []
    for same in (True, False):
        params = problem.params()
        state = uo.setup(rule, params)
        for _ in range(3):
            state = uo.update_(state, params, params if same else
                               {k: v.copy() for k, v in params.items()})
        runs.append((params, state))
    (p1, s1), (p2, s2) = runs
    assert_same(list(p1.values()), list(p2.values()))
    assert_same(_state_arrays(s1), _state_arrays(s2))


@by_rule
@pytest.mark.parametrize("compiled", [False, True], ids=["reference", "compiled"])
def test_a_0d_leaf_stays_an_array(name: str, compiled: bool,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A 0-d parameter (a scale, a temperature) beside the others: NumPy's arithmetic on it
    gives scalars, and every leaf a pure step hands back, of the params and of the slots, is
    still an array (SM3's per-leaf slot was a float64, which a checkpoint refused to load and
    ``update_`` could not write)."""
    import optree

    from uniopt.fast import cpu

    e = registry.entry(name)
    rule = _build(e)
    if not _takes(rule, ()):
        pytest.skip("the rule takes no 0-d leaf")
    if compiled:
        monkeypatch.setattr(cpu, "MIN_LEAVES", 0)
        monkeypatch.setattr(cpu, "MIN_SIZE", 0)
    problem = Problem({**_shapes(rule), "s": ()}, np.float64)
    params = problem.params()
    state, params = _drive(e, uo.setup(rule, params), params, problem, 2)
    # (a whole-tree part's own numbers may be scalars: L-BFGS's history keeps them so)
    for x in optree.tree_leaves((state.slots, params), namespace="uniopt"):
        assert not isinstance(x, np.generic), (name, type(x))


@by_rule
def test_a_real_only_rule_refuses_complex_params_at_set_up(name: str) -> None:
    """A rule whose ``Info.complex`` is False names itself at set-up, in a chain too: on the
    pairs of a complex leaf's parts some ran silently (Adan, LAMB, Fromage), others failed in
    NumPy's broadcasting at the step or said the state was set up for other params."""
    e = registry.entry(name)
    if e.complex:
        pytest.skip("takes complex params")
    rule = _build(e)
    params = Problem(_shapes(rule), np.float64).params()
    key = sorted(params)[-1]
    params[key] = params[key].astype(np.complex128)
    for r in (rule, *([] if e.needs_closure else [uo.chain(uo.clip_by_global_norm(1.0), rule)])):
        with pytest.raises(TypeError, match=rf"setup: {name} takes real params only .*; "
                                            rf"params\['{key}'\] is complex"):
            uo.setup(r, params)


@by_rule
def test_a_real_only_rules_parts_refuse_complex_params_in_a_hand_built_chain(name: str) -> None:
    """The parts of a rule that takes real params only carry the refusal themselves
    (``Part.real_only``), so a chain built from them by hand refuses complex params too: on the
    pairs Prodigy, schedule-free and GaLore stepped silently, Adafactor's factors, NovoGrad,
    SM3, Shampoo, SOAP and Muon's orthogonalisation failed with raw errors. A rule that takes
    complex params holds no such part."""
    e = registry.entry(name)
    rule = _build(e)
    marked = [p for p in rule.flat_parts if p.real_only]
    assert bool(marked) == (not e.complex), (name, [p.name for p in rule.flat_parts])
    if e.complex:
        return
    by_hand = uo.chain(*rule.flat_parts)
    params = Problem(_shapes(rule), np.float64).params()
    uo.setup(by_hand, params)  # real params: set up as the rule is
    key = sorted(params)[-1]
    params[key] = params[key].astype(np.complex128)
    with pytest.raises(TypeError, match=rf"setup: {marked[0].name} takes real params only "
                                        rf"\(Part.real_only\); params\['{key}'\] is complex"):
        uo.setup(by_hand, params)


def test_what_a_step_needs_is_declared_once_by_the_parts() -> None:
    """The registry's ``step_args`` and ``linalg`` (the README's table, the rules' pages, the
    CLI) are what the example's parts declare (``Part.step_args``, ``Part.linalg``: what
    set-up and uniopt.torch read, of a part in a chain built by hand too), in their order:
    ``Info`` takes no copy written by hand (it held both, a test keeping one to the parts)."""
    assert not {"step_args", "linalg"} & {f.name for f in dataclasses.fields(Info)}
    for what in ("step_args", "linalg"):
        assert any(getattr(registry.entry(name), what) for name in NAMES), what
    for name in NAMES:
        e = registry.entry(name)
        parts = _build(e).flat_parts
        for what in ("step_args", "linalg"):
            said = tuple(dict.fromkeys(x for p in parts for x in getattr(p, what)))
            assert getattr(e, what) == said, (name, what)
        # (a part is handed the step's arguments only where it reads them)
        assert all(isinstance(p, WholeTree) and p.reads_value for p in parts if p.step_args)


@by_rule
def test_big_endian_params_step_as_native_ones(name: str) -> None:
    """Params and gradients of a non-native byte order (``>f8``, as a FITS or HDF5 file holds
    them) step as native ones, bit for bit: Adagrad, MADGRAD, simplified AdEMAMix and SOAP
    handed their dtype to a NumPy ufunc that has no loop for it."""
    rule, problem = _stepped_by_gradients(name)
    runs = []
    for order in ("=", ">"):
        params = {k: v.astype(v.dtype.newbyteorder(order)) for k, v in problem.params().items()}
        state = uo.setup(rule, params)
        for _ in range(3):
            grads = {k: v.astype(v.dtype.newbyteorder(order))
                     for k, v in problem.grad(params).items()}
            state, params = uo.update(state, params, grads)
        runs.append({k: np.asarray(v, np.float64) for k, v in params.items()})
    assert_same(list(runs[1].values()), list(runs[0].values()))


@by_rule
def test_fortran_ordered_params_step_in_place_as_pure(name: str) -> None:
    """A Fortran-ordered matrix (a transposed weight, or Fortran code's): the pure step's new
    params and slots keep that order, as the in-place step's do, and the two agree bit for
    bit. NumPy handed the pure step's results back in C order, and Adafactor's RMS of the
    params then added in another order (4.4e-16 after 3 steps)."""
    rule, problem = _stepped_by_gradients(name)
    if not _takes(rule, (48, 80)):
        pytest.skip("the rule takes no matrix")
    problem = Problem({**_shapes(rule), "f": (48, 80)}, np.float64)
    start = {k: np.asfortranarray(v) for k, v in problem.params().items()}
    pure, inplace = dict(start), {k: v.copy(order="K") for k, v in start.items()}
    s_pure, s_inplace = uo.setup(rule, pure), uo.setup(rule, inplace)
    for _ in range(4):
        grads = {k: np.asfortranarray(v) for k, v in problem.grad(pure).items()}
        s_pure, pure = uo.update(s_pure, pure, grads)
        s_inplace = uo.update_(s_inplace, inplace, grads)
    assert pure["f"].flags.f_contiguous
    assert_same(list(pure.values()), list(inplace.values()))
    for key, slots in s_pure.slots.items():  # (Adafactor keeps None for a matrix's variance)
        assert [x is None for x in slots] == [x is None for x in s_inplace.slots[key]], key
        assert_same([x for x in slots if x is not None],
                    [x for x in s_inplace.slots[key] if x is not None])


@by_rule
def test_numpy_bfloat16_params_step_pure_and_in_place(name: str) -> None:
    """NumPy's bfloat16 (``ml_dtypes``: what ``np.asarray`` of a JAX bfloat16 array holds)
    through every rule, its step computed in float32: the params stay bfloat16, finite, and the
    two forms agree bit for bit. The whole-tree rules (Prodigy, DoG, schedule-free, GaLore,
    Kron...) failed after their part, NumPy's isdtype refusing the dtype."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rule, problem = _stepped_by_gradients(name)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    start = {k: v.astype(bf16) for k, v in problem.params().items()}
    pure, inplace = dict(start), {k: v.copy() for k, v in start.items()}
    s_pure, s_inplace = uo.setup(rule, pure), uo.setup(rule, inplace)
    for _ in range(3):
        grads = {k: v.astype(bf16) for k, v in problem.grad(
            {k: x.astype(np.float64) for k, x in pure.items()}).items()}
        s_pure, pure = uo.update(s_pure, pure, grads)
        s_inplace = uo.update_(s_inplace, inplace, grads)
    for k, v in pure.items():
        assert v.dtype == bf16 and np.isfinite(v.astype(np.float32)).all(), (name, k)
        assert v.tobytes() == inplace[k].tobytes(), (name, k)


@by_rule
def test_a_float32_state_of_bfloat16_params_is_a_float32_run_rounded_at_each_step(
        name: str) -> None:
    """``state_dtype="float32"`` on bfloat16 params keeps every state in float32 and computes
    in it, a whole-tree part's too: the params are, bit for bit, those of a float32 run from
    the same values whose params are rounded to bfloat16 after each step. Prodigy's moments,
    schedule-free's ``z``, D-Adaptation's, GaLore's and Kron's states were kept in bfloat16,
    the option taken and not honoured."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rule, problem = _stepped_by_gradients(name)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    start = {k: v.astype(bf16) for k, v in problem.params().items()}
    ours, theirs = dict(start), {k: v.astype(np.float32) for k, v in start.items()}
    s_ours, s_theirs = uo.setup(rule, ours, state_dtype="float32"), uo.setup(rule, theirs)
    for _ in range(8):
        grads = {k: v.astype(bf16) for k, v in problem.grad(
            {k: x.astype(np.float64) for k, x in ours.items()}).items()}
        s_ours, ours = uo.update(s_ours, ours, grads)
        s_theirs, theirs = uo.update(s_theirs, theirs,
                                     {k: v.astype(np.float32) for k, v in grads.items()})
        theirs = {k: v.astype(bf16).astype(np.float32) for k, v in theirs.items()}
    for k, v in ours.items():
        assert v.dtype == bf16 and v.tobytes() == theirs[k].astype(bf16).tobytes(), (name, k)


@by_rule
def test_a_jitted_step_may_close_over_a_state(name: str, jx: Any) -> None:
    """``jax.jit(lambda p: uo.update(state, p, g))`` with a state that has stepped, closed
    over rather than passed: its concrete arrays come out of arithmetic in the trace as
    tracers, which Kron's update counter and ASGD's averaging weight took for numbers
    (ConcretizationTypeError, TracerBoolConversionError). As the eager step, to rounding."""
    e = registry.entry(name)
    if "jax" not in e.backends or not e.jit:
        pytest.skip("no jitted JAX step")
    rule, problem = _stepped_by_gradients(name)
    jnp = jx.numpy
    params = {k: jnp.asarray(v) for k, v in problem.params().items()}
    grads = {k: jnp.asarray(v) for k, v in problem.grad(problem.params()).items()}
    state, params = uo.update(uo.setup(rule, params), params, grads)
    eager = uo.update(state, params, grads)[1]
    jitted = jx.jit(lambda p: uo.update(state, p, grads)[1])(params)
    for k in eager:
        # (to the rule's own tolerance across libraries: SOAP's eigenbases are LAPACK's or XLA's)
        assert rel_diff(np.asarray(jitted[k]), np.asarray(eager[k])) <= max(e.rtol, 1e-12), (
            name, k)


@by_rule
def test_empty_leaves_step_beside_the_others(name: str) -> None:
    """Leaves with no elements, ``(0,)``, ``(0, 3)`` and ``(3, 0)`` where the rule takes their
    shape, beside the usual ones: two steps, pure and in place, every number finite. Muon's
    side ratio divided by zero (and the compiled path had written its momentum first), SM3
    took the maximum of nothing, Kron under ``jax.jit`` too."""
    e = registry.entry(name)
    rule = _build(e)
    empty = {f"z{i}": s for i, s in enumerate([(0,), (0, 3), (3, 0)]) if _takes(rule, s)}
    if not empty:
        pytest.skip("the rule takes no empty leaf")
    problem = Problem({**_shapes(rule), **empty}, np.float64)
    for inplace in (False, True):
        params = problem.params()
        state, params = _drive(e, uo.setup(rule, params), params, problem, 2, inplace)
        for k, shape in empty.items():
            assert params[k].shape == shape
        assert all(np.isfinite(v).all() for v in params.values()), name


def _reads_the_loss(name: str) -> tuple[Transform, Any]:
    e = registry.entry(name)
    if e.step_args != ("value",):
        pytest.skip("the step reads no loss, or more than the loss")
    rule = _build(e)
    return rule, Problem(_shapes(rule), np.float64)


@by_rule
def test_minimize_step_hands_the_loss_to_a_rule_that_reads_it(name: str) -> None:
    """A rule that reads the step's loss (Polyak's step size, Momo's) through
    ``minimize_step``: the closure's loss, as ``update(..., value=loss)`` takes it, bit for
    bit, pure and in place (it raised that the loss was missing, the closure having
    returned it)."""
    rule, problem = _reads_the_loss(name)
    by_value, by_closure, in_place = problem.params(), problem.params(), problem.params()
    s1 = s2 = uo.setup(rule, by_value)
    s3 = uo.setup(rule, in_place)
    for _ in range(3):
        loss, g = problem.closure(by_value)
        s1, by_value = uo.update(s1, by_value, g, value=loss)
        s2, by_closure, got = uo.minimize_step(s2, by_closure, problem.closure)
        s3, _ = uo.minimize_step_(s3, in_place, problem.closure)
        assert got == loss
    assert_same(list(by_closure.values()), list(by_value.values()))
    assert_same(list(in_place.values()), list(by_value.values()))


@by_rule
def test_a_loss_that_is_no_number_is_refused_before_any_write(name: str) -> None:
    """``value=`` is the step's loss: a per-example loss (an array) was broadcast into the
    params, a (2,) leaf coming back (2, 2); a string was taken. Refused by name, pure and in
    place, nothing written."""
    rule, problem = _reads_the_loss(name)
    params = problem.params()
    state = uo.setup(rule, params)
    before = {k: v.copy() for k, v in params.items()}
    for bad, error, words in ((np.ones((2, 1)), ValueError, r"an array of shape \(2, 1\)"),
                              ("1.0", TypeError, "'1.0'"), (True, TypeError, "True")):
        with pytest.raises(error, match=rf"value= must be one number, the step's loss; got "
                                        rf"{words}"):
            uo.update(state, params, problem.grad(params), value=bad)
        with pytest.raises(error, match="value= must be one number"):
            uo.update_(state, params, problem.grad(params), value=bad)
    assert_same(list(params.values()), list(before.values()))
    assert state.step == 0


@by_rule
def test_a_library_outside_info_backends_is_refused_at_set_up(name: str) -> None:
    """A rule whose ``Info.backends`` has no array-API entry names itself at set-up, in a
    chain too: Kron (preconditioner refreshes on) and the line search failed inside
    array-api-strict at the step with a raw TypeError or IndexError."""
    e = registry.entry(name)
    if "array_api" in e.backends:
        pytest.skip("runs on array-API libraries")
    rule = _build(e)
    params = Problem(_shapes(rule), np.float64, conv=_library("array_api")[0]).params()
    class Sub(np.ndarray):  # a NumPy subclass is NumPy's (it was refused as another library's)
        pass

    uo.setup(rule, {k: np.asarray(v).view(Sub) for k, v in Problem(_shapes(rule)).params().items()})
    for r in (rule, *([] if e.needs_closure else [uo.chain(uo.clip_by_global_norm(1.0), rule)])):
        with pytest.raises(TypeError, match=rf"setup: {name} runs on numpy, torch, jax arrays "
                                            r"\(the registry's Info.backends\); params\['\w+'\] "
                                            "comes from array_api_strict"):
            uo.setup(r, params)


def test_an_array_api_older_than_2024_12_is_refused_at_set_up() -> None:
    """The parts hand Python scalars to ``where``, ``maximum``, ``clip``... beside arrays, which
    the standard allows from 2024.12: array-api-strict set to 2023.12 failed inside itself
    (``'float' object has no attribute 'dtype'``) at the step of a dozen rules."""
    xs = pytest.importorskip("array_api_strict")
    xs.set_array_api_strict_flags(api_version="2023.12")
    try:
        with pytest.raises(TypeError, match=r"uniopt needs the array API standard 2024.12 or "
                                            r"later .*; array_api_strict is set to 2023.12"):
            uo.setup(uo.rprop(lr=0.01), {"w": xs.asarray([1.0, 2.0])})
    finally:
        xs.reset_array_api_strict_flags()


@pytest.mark.parametrize("lib", ["numpy", "array_api"])
@by_rule
def test_a_pure_step_hands_back_nothing_it_was_given(name: str, lib: str) -> None:
    """``uo.update`` aliases none of its inputs: no array of the new state (slots, whole-tree
    states, members' states) or of the new params shares memory with the state, params or
    gradients it was given. Parts that hand their state on unchanged (DoG's initial params,
    Kron's preconditioners between refreshes) or as a view (SOAP's reshaped second moment)
    did, so that a caller writing the new state wrote the old one; on array-api-strict, whose
    arrays wrap NumPy's, they still did (its reshape is a new object)."""
    import optree

    e = registry.entry(name)
    if lib not in e.backends:
        pytest.skip(f"Info.backends has no {lib}")
    rule = _build(e)
    to_lib, _ = _library(lib)
    problem = Problem(_shapes(rule), np.float64, conv=to_lib)
    params = problem.params()
    state = uo.setup(rule, params)
    # (array-api-strict's memory: the NumPy array it wraps)
    memory = (lambda x: x) if lib == "numpy" else (lambda x: getattr(x, "_array", None))
    arrays = lambda tree: [m for x in optree.tree_leaves(tree, namespace="uniopt")  # noqa: E731
                           if isinstance(m := memory(x), np.ndarray)]
    for _ in range(3):
        grads = problem.grad(params)
        given = arrays((state, params, grads))
        new_state, new_params = _drive(e, state, params, problem, 1)
        for x in arrays((new_state, new_params)):
            assert not any(np.shares_memory(x, y) for y in given), name
        state, params = new_state, new_params


@by_rule
def test_a_schedule_past_the_rules_own_range_fails_the_step_before_any_write(name: str) -> None:
    """Each number of the rule, where its constructor refuses -1 or 1.5, given as a schedule
    that reaches that value at step 1: the step raises, naming the rule's own field, and
    leaves the params as they were. A part may take a wider range than its rule (cocob's lr
    is a scale's factor, sophia_h's b1 an ema's momentum): such values ran silently."""
    e = registry.entry(name)
    rule = _build(e)
    fields = [k for k, v in rule.hyperparameters().items() if type(v) is float]
    for field, bad in [(f, x) for f in fields for x in (-1.0, 1.5) if _refused(e, f, x)]:
        value = rule.hyperparameters()[field]
        try:
            scheduled = _build(e, **{field: lambda s, v=value, x=bad: v if s < 1 else x})
        except (TypeError, ValueError):  # a number no schedule may give
            continue
        problem = Problem(_shapes(scheduled), np.float64)
        params = problem.params()
        state, _ = _drive(e, uo.setup(scheduled, params), params, problem, 1, inplace=True)
        before = {k: v.copy() for k, v in params.items()}
        with pytest.raises(ValueError, match=rf"{re.escape(field)}.*\(the value of its schedule "
                                             r"at step 1\)"):
            _drive(e, state, params, problem, 1, inplace=True)
        assert_same(list(params.values()), list(before.values()))


def _refused(e: registry.Entry, field: str, value: float) -> bool:
    try:
        _build(e, **{field: value})
    except ValueError:
        return True
    return False


@by_rule
def test_slots_are_the_states(name: str) -> None:
    e = registry.entry(name)
    rule = _build(e)
    state = uo.setup(rule, Problem(_shapes(rule)).params())
    assert tuple(k.rsplit(".", 1)[-1] for k in state.slots) == e.slots


# --- array libraries ----------------------------------------------------------------------------


def _library(lib: str) -> tuple[Callable[[np.ndarray], Any], Callable[[Any], np.ndarray]]:
    """``(to the library, back to NumPy)`` for a name of ``Info.backends``."""
    if lib == "numpy":
        return np.array, np.asarray
    if lib == "torch":
        torch = pytest.importorskip("torch")
        return (lambda a: torch.asarray(a, copy=True)), (lambda x: x.numpy())
    if lib == "jax":
        jnp = pytest.importorskip("jax").numpy
        return jnp.asarray, np.asarray
    if lib == "array_api":
        xs = pytest.importorskip("array_api_strict")
        dev = xs.Device("device1")  # not the default: an array made without device= shows
        return (lambda a: xs.asarray(a, device=dev, copy=True)), (
            lambda x: np.array(np.from_dlpack(x)))
    raise AssertionError(f"unknown library {lib!r} in Info.backends")


@by_rule
def test_array_libraries_agree(name: str, jx: Any) -> None:
    """JAX runs under ``jax.jit`` where the rule traces (it must compile once), eagerly where
    not: a jitted step runs the same arithmetic in one program, and compiles in a fraction of
    the time that eager JAX takes to dispatch (and compile) a rule's operations one by one."""
    e = registry.entry(name)
    rule = _build(e)
    ref_state, ref = _run(e, rule, steps=10)
    for lib in e.backends:
        to, back = _library(lib)
        problem = Problem(_shapes(rule), conv=to)
        params = problem.params()
        state = uo.setup(rule, params)
        if lib == "jax" and e.jit and not e.needs_closure and not e.step_args:
            jitted, traces = counting_jit()
            with compilations() as compiles:
                for _ in range(10):
                    state, params = jitted(state, params, problem.grad(params))
            assert len(traces) == len(compiles) == 1, "the jitted update recompiled"
        elif lib == "jax" and e.jit and not e.step_args:
            # a closure's rule (SAM) under jit, its state passed: the leaves' shapes it kept
            # as Python ints were traced (ConcretizationTypeError)
            traces: list[int] = []

            def step(state: uo.State, params: Any, traces: list[int] = traces,
                     problem: Problem = problem) -> Any:
                traces.append(1)
                return uo.minimize_step(state, params, problem.closure)[:2]

            jitted_step = jx.jit(step)
            with compilations() as compiles:
                for _ in range(10):
                    state, params = jitted_step(state, params)
            assert len(traces) == len(compiles) == 1, "the jitted minimize_step recompiled"
        else:
            state, params = _drive(e, state, params, problem, 10)
        for k, v in params.items():
            assert rel_diff(back(v), ref[k]) <= e.rtol, (lib, k)
        for key, arrays in state.slots.items():
            if key.rsplit(".", 1)[-1] in e.free_slots:
                continue  # the solver's own choice: held through the params
            for a, b in zip(arrays, ref_state.slots[key], strict=True):
                assert (a is None) == (b is None)
                assert a is None or rel_diff(back(a), b) <= e.rtol, (lib, key)


@pytest.mark.parametrize("name", [n for n in NAMES if (e := registry.entry(n)).jit
                                  and "jax" in e.backends and not e.needs_closure
                                  and not e.step_args])
def test_a_jax_state_is_placed_as_its_params(name: str, jx: Any) -> None:
    """Every leaf of a JAX state from setup, the rule's numbers too, is a JAX array committed
    to a device exactly where the params are: a jitted step hands back every output committed
    when any input was, so one leaf placed otherwise makes the second call's arguments new to
    ``jit`` (a second XLA compilation beside committed params, the test above for the
    others). Set-up only: no step is compiled."""
    rule = _build(registry.entry(name))
    params = Problem(_shapes(rule), conv=jx.numpy.asarray).params()
    for committed in (False, True):
        if committed:
            params = jx.device_put(params, jx.devices()[0])
        leaves = jx.tree.leaves(uo.setup(rule, params))
        assert all(isinstance(x, jx.Array) for x in leaves), name
        assert [x.committed for x in leaves] == [committed] * len(leaves), (name, committed)


@pytest.mark.parametrize("name", [n for n in NAMES if not registry.entry(n).jit
                                  and not registry.entry(n).needs_closure])
def test_a_rule_that_does_not_trace_says_so(name: str, jx: Any) -> None:
    e = registry.entry(name)
    rule = _build(e)
    problem = Problem(_shapes(rule), conv=jx.numpy.asarray)
    params = problem.params()
    with pytest.raises(TypeError, match=r"jax\.jit"):
        jx.jit(uo.update)(uo.setup(rule, params), params, problem.grad(params))


# --- schedules ----------------------------------------------------------------------------------


def _numbers(rule: Transform) -> list[tuple[str, int | None]]:
    """Every hyperparameter that is a number, as (field, index in its tuple or None); but not
    one at the value that drops an optional block (a schedule keeps the block: another
    recipe, which a rule may refuse beside other options)."""
    out: list[tuple[str, int | None]] = []
    for k, v in rule.hyperparameters().items():
        if k in rule.optional and not rule.on(k):
            continue
        for i, x in enumerate(v) if isinstance(v, tuple) else [(None, v)]:
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                out.append((k, i))
    return out


def _scheduled(rule: Transform, field: str, i: int | None) -> Transform:
    v = getattr(rule, field)
    if i is None:
        return rule.replace(**{field: uo.schedules.constant(v)})
    return rule.replace(**{field: tuple(uo.schedules.constant(x) if j == i else x
                                        for j, x in enumerate(v))})


@by_rule
def test_a_constant_schedule_is_the_number(name: str) -> None:
    e = registry.entry(name)
    rule = _build(e)
    numbers = _numbers(rule)
    assert numbers, f"{name}'s example has no number to schedule"
    ref_state, ref = _run(e, rule, steps=4)
    for field, i in numbers:
        state, params = _run(e, _scheduled(rule, field, i), steps=4)
        assert_same(list(params.values()), list(ref.values()))
        assert list(state.slots) == list(ref_state.slots), (field, i)
        assert_same(_state_arrays(state), _state_arrays(ref_state))


# --- combinators --------------------------------------------------------------------------------


@by_rule
def test_partition_freeze_and_masked(name: str) -> None:
    e = registry.entry(name)
    if e.needs_closure or e.step_args:
        pytest.skip("a rule that evaluates the objective itself steps the whole tree")
    rule = _build(e)
    shapes = _shapes(rule)
    frozen_key = list(shapes)[-1]  # held still, or handed its raw gradient (masked)
    problem = Problem(shapes)
    rest = Problem({k: s for k, s in shapes.items() if k != frozen_key})
    rest.init, rest.c, rest.t = ({k: v for k, v in d.items() if k != frozen_key}
                                 for d in (problem.init, problem.c, problem.t))
    _, plain = _drive(e, uo.setup(rule, rest.params()), rest.params(), rest, 3)
    wrapped = {
        "partition": uo.partition({"on": rule, "off": None},
                                  lambda path, leaf: "off" if path == frozen_key else "on"),
        "freeze": uo.freeze(rule, frozen_key),
        "masked": uo.masked(rule, lambda path, leaf: path != frozen_key),
    }
    for kind, opt in wrapped.items():
        params = problem.params()
        state = uo.setup(opt, params)
        frozen = params[frozen_key].copy()
        for _ in range(3):
            g = problem.grad(params)
            state, params = uo.update(state, params, g)
            if kind == "masked":  # the unmasked leaf's update is its gradient as it comes
                frozen = frozen - g[frozen_key]
        assert_same([params[frozen_key]], [frozen])
        assert_same([params[k] for k in plain], list(plain.values()))


# --- complex numbers ----------------------------------------------------------------------------


def _pairs(z: np.ndarray) -> np.ndarray:
    return np.stack([z.real, z.imag], axis=-1)


@by_rule
def test_complex_params_step_as_their_real_pairs(name: str) -> None:
    e = registry.entry(name)
    if not e.complex:
        pytest.skip("Info.complex is False")
    rule = _build(e)
    shapes = _shapes(rule)
    problem = Problem(shapes, np.complex128)
    params = problem.params()
    state, params = _drive(e, uo.setup(rule, params), params, problem, STEPS)
    real = Problem({k: (*s, 2) for k, s in shapes.items()})
    real.init = {k: _pairs(v) for k, v in problem.init.items()}
    real.c = {k: np.stack([v, v], axis=-1) for k, v in problem.c.items()}
    real.t = {k: _pairs(v) for k, v in problem.t.items()}
    rparams = real.params()
    rstate, rparams = _drive(e, uo.setup(rule, rparams), rparams, real, STEPS)
    written = problem.params()  # in place: written through the arrays' real views
    _drive(e, uo.setup(rule, written), written, problem, STEPS, inplace=True)
    assert_same([_pairs(v) for v in written.values()], [_pairs(v) for v in params.values()])
    for k, v in params.items():
        assert v.dtype == np.complex128 and np.all(np.isfinite(v))
        assert rel_diff(_pairs(v), rparams[k]) <= 1e-12, k
    for key, arrays in state.slots.items():
        for a, b in zip(arrays, rstate.slots[key], strict=True):
            assert a is None or rel_diff(_pairs(a) if np.iscomplexobj(a) else a, b) <= 1e-12


# --- the README ---------------------------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_rule_table_is_the_registrys() -> None:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- rules:start -->\n(.*?)\n<!-- rules:end -->", text, re.S)
    assert found, "README.md lacks the <!-- rules:start --> ... <!-- rules:end --> markers"
    assert found.group(1).strip() == registry.table(), (
        "README.md's rule table is stale: paste `uniopt rules` between its markers")


# --- where users drive it: the optax protocol, uniopt.torch.Optimizer ---------------------------


@by_rule
def test_the_optax_protocol_steps_as_update(name: str) -> None:
    """``rule.init`` / ``rule.update`` (updates to be added, as optax's), the step's extra
    arguments passed as optax passes them, land where ``uo.update`` does, to rounding: the
    protocol hands back ``-u`` and the caller adds it, where the engine may write ``p`` in a
    peer's order (a fused multiply-add)."""
    e = registry.entry(name)
    if e.needs_closure:
        pytest.skip("a rule that evaluates the objective itself is stepped with minimize_step")
    rule = _build(e)
    problem = Problem(_shapes(rule))
    _, ref = _drive(e, uo.setup(rule, problem.params()), problem.params(), problem, STEPS)
    params = problem.params()
    state = rule.init(params)
    for _ in range(STEPS):
        loss, g = problem.closure(params)
        given = {"value": loss, "grad": g, "value_fn": problem.closure,
                 "hvp": problem.hvp(params)}
        updates, state = rule.update(g, state, params, **{k: given[k] for k in e.step_args})
        params = {k: params[k] + updates[k] for k in params}
    for k, v in params.items():
        assert rel_diff(v, ref[k]) <= 1e-14, k


@by_rule
def test_uniopt_torch_optimizer_steps_as_update(name: str) -> None:
    """``uniopt.torch.Optimizer(params, rule)``, the torch.optim-style class any rule drops
    into, over torch tensors: the functional step's numbers on the same tensors."""
    torch = pytest.importorskip("torch")
    e = registry.entry(name)
    if e.needs_closure or e.step_args:
        pytest.skip("the step needs the objective: uo.minimize_step / uo.update(value=...)")
    if "torch" not in e.backends:
        pytest.skip("Info.backends has no torch")
    from uniopt.torch import Optimizer

    rule = _build(e)
    problem = Problem(_shapes(rule), conv=torch.tensor)
    ref = problem.params()
    ref_state = uo.setup(rule, ref)
    tensors = {k: v.clone().requires_grad_(True) for k, v in problem.params().items()}
    opt = Optimizer(list(tensors.values()), rule)
    for _ in range(STEPS):
        g = problem.grad(ref)
        ref_state, ref = uo.update(ref_state, ref, g)
        with torch.no_grad():
            grads = problem.grad({k: t.detach() for k, t in tensors.items()})
        for k, t in tensors.items():
            t.grad = grads[k].clone()
        opt.step()
    for k, t in tensors.items():
        assert rel_diff(t.detach().numpy(), ref[k].numpy()) <= max(e.rtol, 1e-14), k


@by_rule
@pytest.mark.filterwarnings("error::RuntimeWarning")  # (a mean of nothing: Kron's NumPy warned)
def test_an_empty_leaf_and_a_scalar_leaf_step_beside_the_others(name: str) -> None:
    """A tree with a leaf of no elements and a 0-d one (where the rule takes their shapes):
    each keeps its shape, the others step as they would alone, pure and in place (sm3 gave an
    empty vector an accumulator of one and could not reshape it back)."""
    e = registry.entry(name)
    rule = _build(e)
    odd = {k: s for k, s in {"empty": (0,), "scalar": ()}.items() if _takes(rule, s)}
    shapes = {**_shapes(rule), **odd}
    for inplace in (False, True):
        problem = Problem(shapes)
        params = problem.params()
        state, out = _drive(e, uo.setup(rule, params), params, problem, 2, inplace)
        assert {k: np.shape(v) for k, v in out.items()} == shapes
        assert all(np.all(np.isfinite(v)) for v in out.values()), inplace


@by_rule
def test_torch_bfloat16_params_step_and_keep_their_dtypes(name: str) -> None:
    """Every rule steps torch bfloat16 params, computing in float32, and its state keeps the
    dtypes setup gave it (GaLore mixed its bfloat16 moments with the float32 step in lerp)."""
    torch = pytest.importorskip("torch")
    e = registry.entry(name)
    rule = _build(e)
    problem = Problem(_shapes(rule), np.float32,
                      conv=lambda x: torch.as_tensor(x).to(torch.bfloat16))
    params = problem.params()
    want = _dtypes(uo.setup(rule, params))
    # on the reference path, where the bug was: the compiled loop's bfloat16 steps are held to
    # it rule by rule in test_foreach, and compiling one per rule here cost 30 s cold
    with reference_path():
        state, out = _drive(e, uo.setup(rule, params), params, problem, 2)
    assert all(v.dtype == torch.bfloat16 and bool(torch.isfinite(v).all()) for v in out.values())
    got = _dtypes(state)
    assert {k: got.get(k) for k in want} == want



@by_rule
def test_a_state_made_for_params_that_require_grad_records_no_graph(name: str) -> None:
    """Torch params that require grad (a model's): no array of the state set up for them, or
    stepped once, is in autograd's graph, and the state deep-copies (MADGRAD's x0 was the
    params' clone, recorded)."""
    torch = pytest.importorskip("torch")
    import copy

    e = registry.entry(name)
    rule = _build(e)
    problem = Problem(_shapes(rule), conv=torch.as_tensor)
    params = {k: v.requires_grad_() for k, v in problem.params().items()}
    state = uo.setup(rule, params)
    with torch.no_grad():
        state, _ = _drive(e, state, params, problem, 1)
    for a in _state_arrays(state):
        assert not (isinstance(a, torch.Tensor) and a.grad_fn is not None), name
    copy.deepcopy(state)


@by_rule
def test_a_jax_state_holds_each_array_once(name: str, jx: Any) -> None:
    """Every array of a JAX state is its own buffer: jax.jit(..., donate_argnums) refuses one
    buffer donated twice ("Attempt to donate the same buffer twice"), which Momo's two zeros
    (and skip_nonfinite's two counters, below) were, so the first donated step failed."""
    rule = _build(registry.entry(name))
    params = {k: jx.numpy.ones(s) for k, s in SHAPES.items() if _takes(rule, s)}
    for r in (rule, uo.skip_nonfinite(rule)) if name == "sgd" else (rule,):
        leaves = [x for x in jx.tree.leaves(uo.setup(r, params)) if isinstance(x, jx.Array)]
        seen = [x.unsafe_buffer_pointer() for x in leaves]
        assert len(set(seen)) == len(seen), (r.name, len(seen) - len(set(seen)))
