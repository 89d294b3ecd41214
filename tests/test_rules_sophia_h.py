"""Sophia-H (``uo.sophia_h``, ``uniopt.torch.SophiaH``) against ``pytorch_optimizer.SophiaH``.

The problem: a small tanh network on fixed data, float64, its parameters a list (a (5, 4)
matrix, a (4,) bias, a (4, 2) matrix and a scalar), so its Hessian has off-diagonal blocks.

Randomness is matched, not patched, against pytorch-optimizer: it draws its probes from
torch's global generator (``torch.randn_like`` / ``torch.randint_like``), ours from a generator
kept in the state, seeded with ``seed``; ``torch.manual_seed(seed)`` before the first step makes
the two streams the same, as nothing else draws between steps. NumPy and JAX draw from their
own generators, so to hold them to torch the probes the torch run drew are recorded and fed
back to them (the draw functions patched in this test only); JAX's own generator is held to
itself, eager against ``jax.jit``. optax has no Sophia-H: ``optax.contrib.sophia`` is the other
arithmetic (bias-corrected momentum, ``gamma``, the estimate folded in after the step), which
``uo.sophia`` matches (tests/test_rules_modern.py).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from helpers import rel_diff
from uniopt.rules import sophia_h as sophia_h_module

torch = pytest.importorskip("torch")

# the closures take H v from gradients of backward(create_graph=True), as pytorch-optimizer's
# users write them; torch warns of the reference cycle that leaves through .grad
pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")

SHAPES = [(5, 4), (4,), (4, 2), ()]
RNG = np.random.default_rng(7)
X = RNG.standard_normal((16, 5))
Y = RNG.standard_normal((16, 2))
INIT = [RNG.standard_normal(s) * 0.5 for s in SHAPES]


def _loss_torch(ps: list[Any]) -> Any:
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    out = ps[3] * (torch.tanh(x @ ps[0] + ps[1]) @ ps[2])
    return ((out - y) ** 2).mean()


def _torch_params() -> list[Any]:
    return [torch.nn.Parameter(torch.tensor(v)) for v in INIT]


def _run_class(cls: Any, steps: int, kw: dict[str, Any], seed: int = 0,
               schedule: bool = False) -> list[list[np.ndarray]]:
    """The params after every step of ``cls`` stepped with a closure."""
    ps = _torch_params()
    opt = cls(ps, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + 0.01 * t)) \
        if schedule else None

    def closure() -> Any:
        opt.zero_grad()
        loss = _loss_torch(ps)
        loss.backward(create_graph=True)
        return loss

    torch.manual_seed(seed)
    out = []
    for _ in range(steps):
        opt.step(closure)
        if sched is not None:
            sched.step()
        out.append([p.detach().numpy().copy() for p in ps])
    for p in ps:  # backward(create_graph=True) leaves a cycle through .grad
        p.grad = None
    return out


CASES = [
    {},  # the defaults: p = 0.01 clips nearly every coordinate
    {"lr": 0.05, "p": 1.0, "betas": (0.9, 0.95), "update_period": 3},
    {"lr": 0.01, "p": 0.5, "weight_decay": 0.1, "update_period": 2, "num_samples": 3,
     "hessian_distribution": "rademacher"},
    {"lr": 0.02, "p": 2.0, "weight_decay": 0.05, "weight_decouple": False},
    {"lr": 0.03, "p": 1.0, "weight_decay": 0.05, "fixed_decay": True, "update_period": 1},
]


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(CASES)))
def test_torch_class_matches_pytorch_optimizer(case: int) -> None:
    """100 steps (ten refreshes of the estimate at the default period), every step's params:
    to the last bit in practice (1e-12 allowed for the order of float64 operations)."""
    po = pytest.importorskip("pytorch_optimizer")
    from uniopt.torch import SophiaH

    kw = CASES[case]
    theirs = _run_class(po.SophiaH, 100, kw, seed=case, schedule=case == 1)
    ours = _run_class(SophiaH, 100, {**kw, "seed": case}, seed=case, schedule=case == 1)
    assert max(rel_diff(a, b) for t, o in zip(theirs, ours, strict=True)
               for a, b in zip(t, o, strict=True)) <= 1e-12
    moved = np.abs(theirs[-1][0] - INIT[0]).max()
    assert moved > 0.05  # the run goes somewhere (0.06 in 100 steps at the defaults' clip)


def _record_probes(monkeypatch: pytest.MonkeyPatch) -> list[list[np.ndarray]]:
    log: list[list[np.ndarray]] = []
    draw = sophia_h_module._DRAW["torch"]

    def recording(state: Any, leaves: list[Any], dist: str) -> tuple[list[Any], Any]:
        z, state = draw(state, leaves, dist)
        log.append([t.numpy().copy() for t in z])
        return z, state

    monkeypatch.setitem(sophia_h_module._DRAW, "torch", recording)
    return log


def _replay(monkeypatch: pytest.MonkeyPatch, kind: str, log: list[list[np.ndarray]],
            conv: Callable[[np.ndarray], Any]) -> None:
    probes = iter(log)

    def replay(state: Any, leaves: list[Any], dist: str) -> tuple[list[Any], Any]:
        return [conv(z) for z in next(probes)], state

    monkeypatch.setitem(sophia_h_module._DRAW, kind, replay)


def _numpy_oracle(p: list[np.ndarray]) -> tuple[list[np.ndarray], Callable[[Any], Any]]:
    """Gradient and ``v -> H v`` at NumPy params, taken by torch's autograd (uniopt never
    differentiates: a gradient may come from anywhere)."""
    ps = [torch.tensor(v, requires_grad=True) for v in p]
    gs = torch.autograd.grad(_loss_torch(ps), ps, create_graph=True)

    def hvp(v: list[np.ndarray]) -> list[np.ndarray]:
        hv = torch.autograd.grad(gs, ps, grad_outputs=[torch.tensor(x) for x in v],
                                 retain_graph=True)
        return [h.numpy() for h in hv]

    return [g.detach().numpy() for g in gs], hvp


def _loss_jax(ps: list[Any]) -> Any:
    import jax.numpy as jnp

    out = ps[3] * (jnp.tanh(jnp.asarray(X) @ ps[0] + ps[1]) @ ps[2])
    return jnp.mean((out - jnp.asarray(Y)) ** 2)


def _jax_hvp(ps: list[Any]) -> Callable[[Any], Any]:
    import jax

    return lambda v: jax.jvp(jax.grad(_loss_jax), (ps,), (v,))[1]


JAX_STEPS = 25
RULE_CASE = {"lr": 0.05, "p": 1.0, "update_period": 3, "num_samples": 2}


def _rule() -> uo.Transform:
    return uo.sophia_h(lr=0.05, clip_threshold=1.0, update_period=3, num_samples=2)


@pytest.mark.slow
def test_numpy_and_jax_match_torch_with_the_same_probes(
        monkeypatch: pytest.MonkeyPatch, jx: Any) -> None:
    """100 steps of the functional rule on NumPy (gradients and H v from torch's autograd), 25
    on JAX (``jax.grad``, ``jax.jvp``; eager), fed the probes the torch class drew: every step's
    params within 1e-12 of the torch class's."""
    import jax.numpy as jnp

    from uniopt.torch import SophiaH

    steps = 100
    log = _record_probes(monkeypatch)
    ref = _run_class(SophiaH, steps, RULE_CASE)
    assert len(log) == 2 * (1 + (steps - 1) // 3)  # num_samples draws every third step

    _replay(monkeypatch, "numpy", log, lambda z: z)
    p = [v.copy() for v in INIT]
    state = uo.setup(_rule(), p)
    for t in range(steps):
        g, hvp = _numpy_oracle(p)
        state, p = uo.update(state, p, g, hvp=hvp)
        assert max(rel_diff(a, b) for a, b in zip(p, ref[t], strict=True)) <= 1e-12, t

    _replay(monkeypatch, "jax", log, jnp.asarray)
    pj = [jnp.asarray(v) for v in INIT]
    state = uo.setup(_rule(), pj)
    grad = jx.grad(_loss_jax)
    for t in range(JAX_STEPS):  # eager JAX dispatches op by op: fewer steps
        state, pj = uo.update(state, pj, grad(pj), hvp=_jax_hvp(pj))
        assert max(rel_diff(np.asarray(a), b) for a, b in zip(pj, ref[t], strict=True)) \
            <= 1e-12, t


def test_jax_under_jit_is_eager_jax(jx: Any) -> None:
    """JAX's own generator, ``lax.cond`` for the refresh: 8 jitted steps (one trace) equal
    8 eager ones, the HVP ``jax.jvp(jax.grad(f))`` inside the jitted step."""
    import jax.numpy as jnp

    traces = []

    def step(state: uo.State, ps: list[Any]) -> Any:
        traces.append(1)
        return uo.update(state, ps, jx.grad(_loss_jax)(ps), hvp=_jax_hvp(ps))

    jitted = jx.jit(step)
    p1 = p2 = [jnp.asarray(v) for v in INIT]
    s1 = s2 = uo.setup(_rule(), p1)
    for _ in range(8):
        s1, p1 = jitted(s1, p1)
        s2, p2 = step(s2, p2)
    assert len(traces) == 1 + 8  # one trace, then the eager calls
    for a, b in zip(p1, p2, strict=True):
        assert rel_diff(np.asarray(a), np.asarray(b)) <= 1e-12
    h1 = s1.tree_states["scale_by_hutchinson_sophia"]["hessian_moment"]
    assert float(jnp.abs(h1[0]).max()) > 0


def test_float16_params_under_jit_keep_a_float16_moment(jx: Any) -> None:
    """float16 params step in float32: the refresh's ``lax.cond`` hands back h in the one
    dtype either way (it failed to trace, float32 against float16), and the state keeps h
    in float16 as set up, so the jitted step traces once."""
    import jax.numpy as jnp

    traces = []
    c = jnp.asarray([4.0, 100.0, 1.0], jnp.float16)

    def step(state: uo.State, ps: list[Any]) -> Any:
        traces.append(1)
        return uo.update(state, ps, [c * (ps[0] - 0.5)], hvp=lambda v: [c * v[0]])

    rule = uo.sophia_h(lr=0.1, clip_threshold=1.0, distribution="rademacher",
                       update_period=2)
    p1 = p2 = [jnp.asarray([1.0, -1.0, 2.0], jnp.float16)]
    s1 = s2 = uo.setup(rule, p1)
    for _ in range(4):
        s1, p1 = jx.jit(step)(s1, p1)
        s2, p2 = step(s2, p2)
        h = s1.tree_states["scale_by_hutchinson_sophia"]["hessian_moment"][0]
        assert h.dtype == jnp.float16 and p1[0].dtype == jnp.float16
    assert len(traces) == 1 + 4  # one trace, then the eager calls
    # XLA may round the fused float32 arithmetic otherwise: one float16 ulp at most
    assert rel_diff(np.asarray(p1[0]), np.asarray(p2[0])) <= 2.0**-10


def test_numpy_probes_are_the_seeded_pcg64_stream() -> None:
    """The formula on NumPy: at steps 0 and k, ``h <- b2 h + (1-b2) z*(H z)`` with ``z`` the
    next standard normals of ``default_rng(seed)``, leaf after leaf; between them h stays."""
    d = [np.linspace(1.0, 2.0, 6).reshape(2, 3), np.array([3.0, 4.0])]
    hvp_calls = []

    def hvp(v: list[np.ndarray]) -> list[np.ndarray]:
        hvp_calls.append(1)
        return [a * b for a, b in zip(d, v, strict=True)]

    rule = uo.sophia_h(lr=0.1, b1=0.5, b2=0.75, clip_threshold=10.0, update_period=4,
                       seed=11)
    p = [np.ones((2, 3)), np.ones(2)]
    g = [np.full((2, 3), 0.5), np.full(2, -0.25)]
    state = uo.setup(rule, p)
    rng = np.random.default_rng(11)
    h = [np.zeros_like(x) for x in p]
    m = [np.zeros_like(x) for x in p]
    for t in range(6):
        hv = hvp if t % 4 == 0 else None  # the steps between may omit it
        state, new = uo.update(state, p, g, hvp=hv)
        if t % 4 == 0:
            z = [rng.standard_normal(x.shape) for x in p]
            h = [0.75 * a + 0.25 * (zz * dd * zz) for a, zz, dd in zip(h, z, d, strict=True)]
        m = [0.5 * a + 0.5 * b for a, b in zip(m, g, strict=True)]
        want = [x - 0.1 * np.clip(mm / np.maximum(hh, 1e-12), -10, 10)
                for x, mm, hh in zip(p, m, h, strict=True)]
        for a, b in zip(new, want, strict=True):
            assert rel_diff(a, b) <= 1e-14, t
        p = new
    assert len(hvp_calls) == 2


def test_torch_state_dict_resumes_the_same_draws() -> None:
    """A saved state (the generator's included) loaded into a new optimizer continues the
    run to the last bit."""
    from uniopt.torch import SophiaH

    def run(opt: Any, ps: list[Any], steps: int) -> None:
        def closure() -> Any:
            opt.zero_grad()
            loss = _loss_torch(ps)
            loss.backward(create_graph=True)
            return loss

        for _ in range(steps):
            opt.step(closure)

    kw = {"lr": 0.05, "p": 1.0, "update_period": 2, "seed": 5}
    ps = _torch_params()
    opt = SophiaH(ps, **kw)
    run(opt, ps, 7)
    saved = copy.deepcopy(opt.state_dict())
    at = [p.detach().clone() for p in ps]
    run(opt, ps, 6)
    ps2 = [torch.nn.Parameter(t.clone()) for t in at]
    opt2 = SophiaH(ps2, **{**kw, "seed": 9})  # the loaded generator wins
    opt2.load_state_dict(saved)
    run(opt2, ps2, 6)
    for a, b in zip(ps, ps2, strict=True):
        assert torch.equal(a.detach(), b.detach())
        a.grad = b.grad = None


def test_update_in_place_and_torch_tensors_equal_numpy() -> None:
    """``uo.update_`` writes what ``uo.update`` returns; torch tensors (their own generator,
    Rademacher probes on a diagonal Hessian: the same estimate) equal NumPy."""
    c = [np.linspace(1.0, 3.0, 20).reshape(5, 4), np.array([2.0, 5.0, 0.5, 1.0])]
    rule = uo.sophia_h(lr=0.1, clip_threshold=1.0, update_period=2, distribution="rademacher")
    p = [RNG.standard_normal(s) for s in ((5, 4), (4,))]
    q = [x.copy() for x in p]
    pt = [torch.tensor(x) for x in p]
    s, s_ = uo.setup(rule, p), uo.setup(rule, q)
    st = uo.setup(rule, pt)
    for _ in range(12):
        s, p = uo.update(s, p, [a * x for a, x in zip(c, p, strict=True)],
                         hvp=lambda v: [a * x for a, x in zip(c, v, strict=True)])
        s_ = uo.update_(s_, q, [a * x for a, x in zip(c, q, strict=True)],
                        hvp=lambda v: [a * x for a, x in zip(c, v, strict=True)])
        st, pt = uo.update(st, pt, [torch.tensor(a) * x for a, x in zip(c, pt, strict=True)],
                           hvp=lambda v: [torch.tensor(a) * x for a, x in zip(c, v, strict=True)])
    for a, b, t in zip(p, q, pt, strict=True):
        assert np.array_equal(a, b)
        assert rel_diff(t.numpy(), a) <= 1e-12


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "words"), [
    ("update_period", 0, "update_period must be an integer >= 1"),
    ("update_period", 0, "update_period must be an integer >= 1"),
    ("num_samples", 0, "num_samples must be an integer >= 1"),
    ("distribution", "uniform", "distribution must be one of"),
    ("seed", -1, "seed must be an integer in"),
    ("seed", 2**32, "seed must be an integer in"),
    ("b1", 1.0, "b1"),
    ("clip_threshold", -1.0, "clip_threshold"),
    ("eps", -1.0, "eps"),
])
def test_bad_hyperparameters_raise(field: str, value: Any, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        uo.sophia_h(**{field: value})
    if field in ("update_period", "num_samples", "distribution", "seed"):
        with pytest.raises(ValueError, match=words):
            uo.scale_by_hutchinson_sophia(**{field: value})


def test_a_refreshing_step_without_hvp_raises() -> None:
    p = [np.ones(3)]
    state = uo.setup(uo.sophia_h(), p)
    with pytest.raises(TypeError, match="pass hvp="):
        uo.update(state, p, [np.ones(3)])
    with pytest.raises(TypeError, match="pass hvp="):
        uo.update(state, p, [np.ones(3)], hvp="not a function")


def test_an_hvp_of_the_wrong_shape_raises() -> None:
    p = [np.ones(3), np.ones(2)]
    state = uo.setup(uo.sophia_h(), p)
    with pytest.raises(ValueError, match="hvp must return a tree shaped like the params"):
        uo.update(state, p, [np.ones(3), np.ones(2)], hvp=lambda v: [np.ones(3)])
    with pytest.raises(ValueError, match="hvp must return a tree shaped like the params"):
        uo.update(state, p, [np.ones(3), np.ones(2)], hvp=lambda v: [np.ones(3), np.ones(3)])


def test_a_state_of_another_library_raises() -> None:
    state = uo.setup(uo.scale_by_hutchinson_sophia(), [np.ones(3)])  # the part alone
    with pytest.raises(TypeError, match="numpy generator"):
        uo.update(state, [torch.ones(3, dtype=torch.float64)],
                  [torch.ones(3, dtype=torch.float64)], hvp=lambda v: v)


@pytest.mark.parametrize("graph", [False, True], ids=["no-graph", "one-group-linear"])
def test_torch_class_groups_step_together_or_not_at_all(graph: bool) -> None:
    """Two param groups: where no gradient has a graph, the first group to refresh its
    estimate raises before any group has stepped (the first group had stepped, its state too);
    where only the second group's loss is linear, it steps as a linear leaf in one group does
    (``H v = 0`` there) and was refused, naming create_graph, which the closure had called."""
    from uniopt.torch import SophiaH

    a = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([0.5, 0.5], dtype=torch.float64))
    opt = SophiaH([{"params": [a]}, {"params": [b]}], lr=0.05, update_period=1)

    def closure() -> Any:
        opt.zero_grad()
        loss = (a ** 4).sum() + 0.5 * b.sum()
        loss.backward(create_graph=graph)
        return loss

    before = [a.detach().clone(), b.detach().clone()], copy.deepcopy(opt.state_dict())
    if not graph:
        with pytest.raises(RuntimeError, match="create_graph=True"):
            opt.step(closure)
        assert all(map(torch.equal, [a.detach(), b.detach()], before[0]))
        assert str(opt.state_dict()) == str(before[1])
        return
    opt.step(closure)
    assert not torch.equal(a.detach(), before[0][0])
    assert not torch.equal(b.detach(), before[0][1])  # its momentum moves it, its h is 0


def test_torch_class_errors() -> None:
    from uniopt.torch import SophiaH

    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = SophiaH([w])
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()

    def flat() -> Any:  # backward without create_graph: no graph to take H v from
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step(flat)
    with pytest.raises(ValueError, match="distribution must be one of"):
        SophiaH([w], hessian_distribution="uniform")


def test_a_checkpoint_resumes_the_same_draws(tmp_path: Any) -> None:
    rule = uo.sophia_h(lr=0.1, clip_threshold=1.0, update_period=2)
    hvp = lambda v: [2.0 * x for x in v]  # noqa: E731
    p = [np.ones((3, 2)), np.ones(4)]
    state = uo.setup(rule, p)
    for _ in range(3):
        state, p = uo.update(state, p, [np.sin(x) for x in p], hvp=hvp)
    uo.save(tmp_path / "sophia_h", state)
    loaded = uo.load(tmp_path / "sophia_h", state)
    q = [x.copy() for x in p]
    for _ in range(5):
        state, p = uo.update(state, p, [np.sin(x) for x in p], hvp=hvp)
        loaded, q = uo.update(loaded, q, [np.sin(x) for x in q], hvp=hvp)
    assert all(np.array_equal(a, b) for a, b in zip(p, q, strict=True))


def test_torch_class_names_a_parameter_without_a_gradient() -> None:
    """A parameter the loss does not reach (its gradient None): the group steps as one tree,
    so the step refuses, naming it and how pytorch-optimizer differs, before anything is
    written (it said only "pass zeros", which a closure's caller cannot)."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    a = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    unused = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = ut.SophiaH([a, unused], lr=0.1, p=1.0)

    def closure() -> Any:
        opt.zero_grad()
        loss = (a**4).sum()
        loss.backward(create_graph=True)
        return loss

    with pytest.raises(ValueError, match=r"parameter\(s\) \[1\] of param group 0 have no "
                                         r"gradient.*where pytorch-optimizer leaves them out"):
        opt.step(closure)
    assert torch.equal(a.detach(), torch.ones(3, dtype=torch.float64)) and not opt.state


def test_an_hvp_that_returns_no_arrays_like_the_params_is_named() -> None:
    """What hvp returns is checked as gradients are (a float leaf raised AttributeError on
    .shape; torch tensors for NumPy params a TypeError inside the moment's arithmetic; an
    integer result stepped silently); nothing is written."""
    import torch

    params = {"w": np.ones(3)}
    state = uo.setup(uo.sophia_h(lr=0.1), params)
    for hvp, got in [(lambda v: {"w": 1.0}, "float of dtype None"),
                     (lambda v: {"w": torch.ones(3, dtype=torch.float64)},
                      "Tensor of dtype torch.float64"),
                     (lambda v: {"w": np.ones(3, np.int64)}, "ndarray of dtype int64")]:
        with pytest.raises(TypeError, match=re.escape(
                "scale_by_hutchinson_sophia: hvp must return numpy arrays of real floats like "
                f"the params; got {got} for params['w']")):
            uo.update_(state, params, {"w": np.ones(3)}, hvp=hvp)
        np.testing.assert_array_equal(params["w"], 1.0)
        assert state.step == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_params_hand_hvp_probes_of_their_own_dtype(dtype: str) -> None:
    """16-bit params step in float32, and hvp was handed float32 probes: the usual
    forward-over-reverse product at the params (jax.jvp) refused them ("primal and tangent
    arguments to jax.jvp do not match"). The probes come in the params' dtype."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    grad = jax.grad(lambda p: jnp.sum(p["w"].astype(jnp.float32) ** 4))
    params = {"w": jnp.ones((4, 3), dtype)}
    seen = []

    def hvp(v: Any) -> Any:
        seen.append(v["w"].dtype)
        return jax.jvp(grad, (params,), (v,))[1]

    state, new = uo.update(uo.setup(uo.sophia_h(lr=0.1), params), params, grad(params),
                           hvp=hvp)
    assert seen == [jnp.dtype(dtype)] and new["w"].dtype == jnp.dtype(dtype)
    assert bool(jnp.isfinite(new["w"].astype(jnp.float32)).all())


def test_a_product_wider_than_float32_params_is_taken_as_it_came() -> None:
    """An hvp of a float64 Hessian for float32 params: its product enters the moment in
    float64, rounded once when stored (the probes' dtype fix narrowed it to float32 first)."""
    rng = np.random.default_rng(0)
    hessian = rng.standard_normal((64, 64))
    params = {"w": np.ones(64, np.float32)}
    probes = []

    def hvp(v: Any) -> Any:
        probes.append(v["w"].copy())
        return {"w": hessian @ v["w"].astype(np.float64)}

    rule = uo.sophia_h(lr=0.1)
    state, _ = uo.update(uo.setup(rule, params), params, {"w": np.ones(64, np.float32)},
                         hvp=hvp)
    [z] = probes
    w = np.float32(1.0 - 0.99)  # (1 - b2), rounded to the moment's dtype, as lerp rounds it
    want = (np.float64(w) * ((hessian @ z.astype(np.float64)) * z)).astype(np.float32)
    [got] = state.tree_states["scale_by_hutchinson_sophia"]["hessian_moment"]
    np.testing.assert_array_equal(got, want)
