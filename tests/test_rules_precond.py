"""The matrix-preconditioner rules: SOAP against ``pytorch_optimizer.SOAP`` and against the
paper's algorithm written here; Shampoo against ``pytorch_optimizer.Shampoo`` (below).

Eigenvectors are defined up to sign and, where eigenvalues repeat, up to a rotation of their
space, chosen by the solver. Signs cancel (each rotation is undone, ``v`` holds squares), so the
parameters are compared, after free steps on fixed random gradients. Repeats come from a first
gradient of rank below an axis's size (a (5, 3) matrix's 5 x 5 factor, a vector's ``g g^T``):
there LAPACK (NumPy, JAX) and torch choose different bases of the null space, and the runs part
(4e-3 on a (5, 3) matrix after 50 steps, measured). So:

- torch tensors against ``pytorch_optimizer`` (the same ``torch.linalg`` solvers, the same
  ``tensordot`` order, QR in float32 as theirs with ``qr_dtype="float32"``): every shape, 1e-12
  (measured 1e-16);
- NumPy against the paper's algorithm written below with NumPy's solvers, on leaves whose
  factors have distinct eigenvalues, 1e-12;
- NumPy against ``pytorch_optimizer``: their QR runs in float32, and NumPy's float32 QR (OpenBLAS)
  rounds apart from torch's: 1e-8 measured, checked below 1e-6.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import uniopt as uo
from helpers import rel_diff

torch = pytest.importorskip("torch")
pto = pytest.importorskip("pytorch_optimizer")

SHAPES = {"w": (5, 3), "sq": (4, 4), "b": (4,), "s": ()}
# leaves whose factors have distinct eigenvalues from the first step (the (5, 3) matrix's
# 5 x 5 factor is left out by max_precond_dim=4)
DISTINCT = {"w": (5, 3), "sq": (4, 4), "t": (3, 3), "b": (4,), "s": ()}


def _problem(seed: int, steps: int, shapes: dict[str, tuple[int, ...]] = SHAPES
             ) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    return params, [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(steps)]


def _ours(rule: uo.Transform, params: dict[str, np.ndarray],
          grads: list[dict[str, np.ndarray]], to: Any = np.array) -> dict[str, np.ndarray]:
    ps = {k: to(v) for k, v in params.items()}
    state = uo.setup(rule, ps)
    for g in grads:
        state, ps = uo.update(state, ps, {k: to(v) for k, v in g.items()})
    return {k: np.asarray(v) for k, v in ps.items()}


def _theirs(params: dict[str, np.ndarray], grads: list[dict[str, np.ndarray]],
            lr: Any = 3e-3, **kwargs: Any) -> dict[str, np.ndarray]:
    ps = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    opt = pto.SOAP(list(ps.values()), lr=lr if not callable(lr) else lr(0), **kwargs)
    for t, g in enumerate(grads):
        if callable(lr):
            opt.param_groups[0]["lr"] = lr(t)
        for k, p in ps.items():
            p.grad = torch.tensor(g[k], dtype=torch.float64)
        opt.step()
    return {k: p.detach().numpy() for k, p in ps.items()}


def _worst(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(rel_diff(a[k], b[k]) for k in b)


def _kwargs(rng: np.random.Generator) -> dict[str, Any]:
    return dict(lr=float(rng.uniform(1e-3, 3e-2)),
                betas=(float(rng.uniform(0.5, 0.99)), float(rng.uniform(0.5, 0.999))),
                shampoo_beta=float(rng.uniform(0.5, 0.99)), eps=float(10 ** rng.uniform(-8, -2)),
                weight_decay=float(rng.uniform(0, 0.1)),
                precondition_frequency=int(rng.integers(1, 6)),
                precondition_1d=bool(rng.integers(2)), normalize_grads=bool(rng.integers(2)),
                correct_bias=bool(rng.integers(2)))


def _to_theirs(kw: dict[str, Any]) -> dict[str, Any]:
    out = dict(kw)
    if "normalize_grads" in out:
        out["normalize_gradient"] = out.pop("normalize_grads")
    if "max_precond_dim" in out:
        out["max_precondition_dim"] = out.pop("max_precond_dim")
    return out


CASES = {
    "scheduled": dict(lr=uo.schedules.cosine(0.02, steps=300, floor=1e-3),
                      weight_decay=0.05, precondition_frequency=3),
    "random0": _kwargs(np.random.default_rng(0)),
    "random1": _kwargs(np.random.default_rng(1)),
    "large_axes": dict(max_precond_dim=4, precondition_1d=True, lr=0.01),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_soap_matches_pytorch_optimizer_on_torch(case: str) -> None:
    kw = CASES[case]
    params, grads = _problem(3, 100)
    theirs = _theirs(params, grads, **_to_theirs(kw))
    ours = _ours(uo.soap(**kw, qr_dtype="float32"), params, grads, torch.tensor)
    assert _worst(ours, theirs) < 1e-12


def test_soap_merge_dims_matches_pytorch_optimizer() -> None:
    """Shapes where the authors' merge (ours) and ``pytorch_optimizer``'s agree: (2, 3, 4) is
    worked as (6, 4); theirs fails on 1-D leaves and on any leaf of at most max_precond_dim
    elements (their shape [1]), so none is here."""
    params, grads = _problem(4, 20, {"k": (2, 3, 4), "w": (5, 3), "s": ()})
    kw = dict(lr=0.01, merge_dims=True, max_precond_dim=6, precondition_frequency=2)
    theirs = _theirs(params, grads, **_to_theirs(kw))
    ours = _ours(uo.soap(**kw, qr_dtype="float32"), params, grads, torch.tensor)
    assert _worst(ours, theirs) < 1e-12
    assert uo.merged_shape((2, 3, 4), 6) == (6, 4)
    assert uo.merged_shape((20, 3), 10) == (20, 3)  # theirs: [1, 20, 3]
    assert uo.merged_shape((5, 3), 100) == (15,)  # theirs: [1], which fails to reshape
    assert uo.merged_shape((), 10) == (1,)


def test_soap_numpy_against_pytorch_optimizer() -> None:
    """NumPy's float32 QR (OpenBLAS) against torch's: float32 rounding reaches the
    parameters, 1e-9 measured after 30 steps; checked below 1e-6."""
    params, grads = _problem(5, 30, DISTINCT)
    kw = dict(lr=0.01, max_precond_dim=4, precondition_frequency=3)
    theirs = _theirs(params, grads, **_to_theirs(kw))
    assert _worst(_ours(uo.soap(**kw, qr_dtype="float32"), params, grads), theirs) < 1e-6


# --- the paper's algorithm, written with NumPy's solvers -------------------------------------


def _soap_formula(params: dict[str, np.ndarray], grads: list[dict[str, np.ndarray]], lr: float,
                  betas: tuple[float, float], shampoo_beta: float, eps: float, wd: float,
                  frequency: int, max_dim: int) -> dict[str, np.ndarray]:
    """Vyas et al. (2024), Algorithm 3, for leaves of at most two axes: a vector as a column,
    a scalar as 1 x 1; an axis longer than ``max_dim`` (or a column's second) keeps the
    identity. ``pytorch_optimizer``'s order: the first step gathers statistics only."""
    b1, b2 = betas
    out = {k: v.copy() for k, v in params.items()}
    st: dict[str, Any] = {}
    for t, step in enumerate(grads, 1):
        for k, g0 in step.items():
            shape = g0.shape
            g = g0.reshape(shape + (1,) * (2 - len(shape)))
            if k not in st:
                sides = [d if len(shape) == 2 and d <= max_dim else None for d in g.shape]
                st[k] = dict(m=np.zeros_like(g), v=np.zeros_like(g),
                             L=[None if d is None else np.zeros((d, d)) for d in sides],
                             Q=[np.eye(d) for d in g.shape])
            s = st[k]
            ql, qr = s["Q"]
            if t > 1:
                n = t - 1
                s["m"] = b1 * s["m"] + (1 - b1) * g
                rot = ql.T @ g @ qr
                s["v"] = b2 * s["v"] + (1 - b2) * rot**2
                d = ql @ ((ql.T @ s["m"] @ qr) / (np.sqrt(s["v"]) + eps)) @ qr.T
                d *= np.sqrt(1 - b2**n) / (1 - b1**n)
                out[k] = (out[k] - lr * d.reshape(shape)) * (1 - lr * wd)
            for i, stat in enumerate(s["L"]):
                if stat is None:
                    continue
                s["L"][i] = shampoo_beta * stat + (1 - shampoo_beta) * (
                    g @ g.T if i == 0 else g.T @ g)
                stat = s["L"][i]
                if t == 1:
                    s["Q"][i] = np.linalg.eigh(stat + 1e-30 * np.eye(len(stat)))[1][:, ::-1]
                elif (t - 1) % frequency == 0:
                    q = s["Q"][i]
                    order = np.argsort(-np.diag(q.T @ stat @ q), kind="stable")
                    s["v"] = np.take(s["v"], order, axis=i)
                    s["Q"][i] = np.linalg.qr(stat @ q[:, order])[0]
    return out


@pytest.mark.slow
def test_soap_numpy_matches_the_paper_formula() -> None:
    params, grads = _problem(6, 150, DISTINCT)
    kw = dict(lr=0.01, betas=(0.9, 0.97), shampoo_beta=0.8, eps=1e-6, weight_decay=0.05,
              precondition_frequency=4, max_precond_dim=4)
    ours = _ours(uo.soap(**kw), params, grads)
    theirs = _soap_formula(params, grads, 0.01, (0.9, 0.97), 0.8, 1e-6, 0.05, 4, 4)
    assert _worst(ours, theirs) < 1e-12


def test_soap_backends_agree() -> None:
    """Five steps on NumPy and torch, where no eigenvalue repeats; three on JAX under
    ``jax.jit`` (the first step's eigendecomposition, a refresh, a plain step: the switches are
    traced), a matrix and a scalar only, since JAX compiles for each leaf's shape."""
    jax = pytest.importorskip("jax")
    params, grads = _problem(7, 5, DISTINCT)
    rule = uo.soap(lr=0.05, max_precond_dim=4, precondition_frequency=2, weight_decay=0.1)
    ref = _ours(rule, params, grads)
    assert _worst(_ours(rule, params, grads, torch.tensor), ref) < 1e-12
    params, grads = {k: params[k] for k in "ws"}, [{k: g[k] for k in "ws"} for g in grads[:3]]
    ref = _ours(rule, params, grads)
    with jax.enable_x64(True):
        ps = {k: jax.numpy.asarray(v) for k, v in params.items()}
        state, step = uo.setup(rule, ps), jax.jit(uo.update)
        for g in grads:
            state, ps = step(state, ps, g)
        assert _worst({k: np.asarray(v) for k, v in ps.items()}, ref) < 1e-12


def test_soap_in_place_equals_pure() -> None:
    params, grads = _problem(8, 4, DISTINCT)
    rule = uo.soap(lr=0.05, precondition_frequency=2, max_precond_dim=4)
    ref = _ours(rule, params, grads)
    ps = {k: v.copy() for k, v in params.items()}
    state = uo.setup(rule, ps)
    for g in grads:
        state = uo.update_(state, ps, g)
    assert _worst(ps, ref) == 0.0


def test_soap_state_shapes() -> None:
    """The factors of every kept axis packed in one flat slot; none where no axis is kept."""
    state = uo.setup(uo.soap(max_precond_dim=4), {"w": np.zeros((5, 3)), "b": np.zeros(4)})
    gg = state.slots["scale_by_soap.GG"]
    assert [None if x is None else x.shape for x in gg] == [None, (9,)]  # b, then w: 3 x 3
    state = uo.setup(uo.soap(precondition_1d=True), {"b": np.zeros(4)})
    assert state.slots["scale_by_soap.Q"][0].shape == (16,)


@pytest.mark.parametrize("kwargs, match", [
    (dict(precondition_frequency=0), "precondition_frequency"),
    (dict(max_precond_dim=0), "max_precond_dim"),
    (dict(qr_dtype="float16"), "qr_dtype"),
    (dict(shampoo_beta=1.0), "shampoo_beta"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(lr=-1.0), "lr"),
])
def test_soap_rejects(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        uo.soap(**kwargs)


# --- Shampoo -----------------------------------------------------------------------------------

SHAMPOO_SHAPES = {"w": (5, 3), "b": (4,), "s": (), "k": (2, 3, 4)}
# (theirs, ours). matrix_eps 1e-3 where momentum feeds a direction back: at theirs 1e-6 a
# vector's first statistic 1e-6*I + g g^T has a condition number near 1e7, its -1/2 power
# amplifies by 1e3 what eigh (ours) and SVD (theirs) round apart, and the momentum carries it
# on: 2e-10 measured after 100 steps; 1e-13 at matrix_eps 1e-3 (and 1e-15 without momentum)
SHAMPOO_CASES = {
    "defaults": (dict(lr=0.01), dict(lr=0.01)),
    "momentum_l2": (dict(lr=0.01, momentum=0.7, weight_decay=0.1, preconditioning_compute_steps=3,
                         matrix_eps=1e-3),
                    dict(lr=0.01, momentum=0.7, weight_decay=0.1, preconditioning_compute_steps=3,
                         matrix_eps=1e-3)),
    "decoupled": (dict(lr=0.02, momentum=0.5, weight_decay=0.1, weight_decouple=True,
                       matrix_eps=1e-3),
                  dict(lr=0.02, momentum=0.5, weight_decay=0.1, decay_form="decoupled",
                       matrix_eps=1e-3)),
    "fixed": (dict(lr=0.01, weight_decay=0.01, weight_decouple=True, fixed_decay=True),
              dict(lr=0.01, weight_decay=0.01, decay_form="fixed")),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SHAMPOO_CASES))
def test_shampoo_matches_pytorch_optimizer(case: str) -> None:
    theirs_kw, ours_kw = SHAMPOO_CASES[case]
    params, grads = _problem(9, 100, SHAMPOO_SHAPES)
    ps = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    opt = pto.Shampoo(list(ps.values()), **theirs_kw)
    for g in grads:
        for k, p in ps.items():
            p.grad = torch.tensor(g[k], dtype=torch.float64)
        opt.step()
    theirs = {k: p.detach().numpy() for k, p in ps.items()}
    rule = uo.shampoo(**ours_kw)
    assert _worst(_ours(rule, params, grads), theirs) < 1e-12
    assert _worst(_ours(rule, params, grads[:30], torch.tensor),
                  _ours(rule, params, grads[:30])) < 1e-12


def test_shampoo_on_jax_under_jit() -> None:
    jax = pytest.importorskip("jax")
    params, grads = _problem(10, 4, {"w": (5, 3)})
    rule = uo.shampoo(lr=0.05, momentum=0.5, preconditioning_compute_steps=2, matrix_eps=1e-3)
    ref = _ours(rule, params, grads)
    with jax.enable_x64(True):
        ps = {k: jax.numpy.asarray(v) for k, v in params.items()}
        state, step = uo.setup(rule, ps), jax.jit(uo.update)
        for g in grads:
            state, ps = step(state, ps, g)
        assert _worst({k: np.asarray(v) for k, v in ps.items()}, ref) < 1e-12


@pytest.mark.parametrize("kwargs, match", [
    (dict(preconditioning_compute_steps=0), "preconditioning_compute_steps"),
    (dict(decay_form="adamw"), "decay_form"),
    (dict(momentum=1.0), "momentum"),
    (dict(matrix_eps=-1.0), "matrix_eps"),
    (dict(block_size=0), "block_size"),
])
def test_shampoo_rejects(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        uo.shampoo(**kwargs)


@pytest.mark.parametrize("dtype,state_dtype", [(np.float32, None), (np.float16, None),
                                               (np.float16, "float32")])
def test_shampoo_stays_finite_where_a_statistic_is_rank_deficient(dtype: Any,
                                                                   state_dtype: Any) -> None:
    """A 16 x 8 gradient: L = eps*I + G G^T has a null space of 8 at eps = 1e-6, below float32's
    precision beside its largest eigenvalue (~40), and eigh returns it at -6e-8: its -1/4 power
    was NaN at the second step (at the first in float16 slots). Every eigenvalue is at least
    eps, and one below it is taken as eps."""
    p = [np.random.default_rng(0).standard_normal((16, 8)).astype(dtype)]
    state = uo.setup(uo.shampoo(lr=1.0), p, state_dtype=state_dtype)
    start = float(np.abs(p[0].astype(np.float64) - 0.3).mean())
    for _ in range(5):
        state = uo.update_(state, p, [p[0] - dtype(0.3)])
        assert np.isfinite(p[0]).all()
    assert float(np.abs(p[0].astype(np.float64) - 0.3).mean()) < start / 2


@pytest.mark.parametrize(("rule", "match"), [
    (uo.shampoo(), r"shampoo: its pre_cond and inv_pre_cond are matrices"),
    # (SOAP took 8 bits: its Q lost orthogonality and a least-squares run diverged)
    (uo.soap(), r"soap: its GG and Q are matrices"),
])
def test_matrix_statistics_refuse_8_bits(rule: Any, match: str) -> None:
    with pytest.raises(ValueError, match=r"state_dtype='q8' is not offered for " + match):
        uo.setup(rule, [np.ones((4, 3), np.float32)], state_dtype="q8")


def test_shampoo_blocks_are_separate_leaves() -> None:
    """A (5, 7) matrix in blocks of 3 (rows 3+2, columns 3+3+1) and a vector of 4 (3+1) step as
    their blocks would as leaves of their own (momentum and decay included)."""
    params, grads = _problem(13, 12, {"w": (5, 7), "b": (4,)})
    rule = uo.shampoo(lr=0.05, momentum=0.5, weight_decay=0.01, block_size=3, matrix_eps=1e-3)
    ours = _ours(rule, params, grads)
    cuts = {"w": [(slice(r, r + 3), slice(c, c + 3)) for r in (0, 3) for c in (0, 3, 6)],
            "b": [(slice(0, 3),), (slice(3, 4),)]}

    def split(tree: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {f"{k}{i}": tree[k][s] for k, ss in cuts.items() for i, s in enumerate(ss)}

    plain = _ours(uo.shampoo(lr=0.05, momentum=0.5, weight_decay=0.01, matrix_eps=1e-3),
                  split(params), [split(g) for g in grads])
    assert _worst(split(ours), plain) < 1e-15
    state = uo.setup(rule, {"w": params["w"]})
    packed = sum(r * r + c * c for r in (3, 2) for c in (3, 3, 1))  # each block's two factors
    assert state.slots["scale_by_shampoo.pre_cond"][0].shape == (packed,)


@pytest.mark.parametrize("rule", [
    uo.chain(uo.trace(0.9), uo.shampoo(1e-2)),
    uo.soap(lr=1e-2),
    uo.galore(lr=1e-2, rank=2),
], ids=["trace-shampoo", "soap", "galore"])
@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_a_non_finite_gradient_takes_a_matrix_rule_to_nan_on_every_library(
        rule: uo.Transform, library: str) -> None:
    """A NaN gradient made NumPy's and torch's eigendecomposition (SVD) raise partway through
    ``update_``: the leaves before it stepped (and, with 20 leaves, a chained elementwise
    part's slots written in place for all of them), no count advanced, and every later step
    raised again. Now it goes to NaN as under JAX (whose solvers return NaN) and as every
    elementwise rule does: the whole step is taken, the bad leaf's parameter has JAX's NaNs,
    the other leaves are the clean run's."""
    jnp = pytest.importorskip("jax.numpy")
    to = {"numpy": np.array, "torch": torch.tensor}[library]
    rng = np.random.default_rng(0)
    shapes = {f"w{i:02d}": (6 + i % 3, 5) for i in range(20)}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(3)]
    bad = [dict(g) for g in grads]
    bad[0]["w07"] = grads[0]["w07"].copy()
    bad[0]["w07"][2, 3] = np.nan  # at the first step: every rule decomposes then

    def run(gs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        ps = {k: to(v.copy()) for k, v in params.items()}
        state = uo.setup(rule, ps)
        for g in gs:
            state = uo.update_(state, ps, {k: to(v) for k, v in g.items()})
        assert int(state.step) == len(gs)
        return {k: np.asarray(v) for k, v in ps.items()}

    got, clean = run(bad), run(grads)
    for k in shapes:
        if k != "w07":
            np.testing.assert_array_equal(got[k], clean[k])
    # JAX's solvers: the same NaNs
    js = {k: jnp.asarray(v) for k, v in params.items()}
    state = uo.setup(rule, js)
    for g in bad:
        state, js = uo.update(state, js, {k: jnp.asarray(v) for k, v in g.items()})
    assert {k for k, v in js.items() if np.isnan(np.asarray(v)).any()} == {"w07"}
    np.testing.assert_array_equal(np.isnan(got["w07"]), np.isnan(np.asarray(js["w07"])))


def test_a_finite_matrix_a_solver_fails_on_is_retried_in_float64_or_raises() -> None:
    """backend.decomposed: NaN results only for a non-finite matrix; a finite float32 one the
    solver fails on is decomposed in float64 (results in float32), a finite float64 one that
    fails raises (a silent NaN would end the run with nothing said)."""
    from uniopt import backend

    calls: list[Any] = []

    def flaky(a: np.ndarray) -> Any:
        calls.append(a.dtype)
        if a.dtype == np.float32:
            raise np.linalg.LinAlgError("Eigenvalues did not converge")
        return np.linalg.eigh(a)

    s = np.array([[2.0, 1.0], [1.0, 3.0]], np.float32)
    w, v = backend.decomposed(flaky, s)
    assert calls == [np.float32, np.float64] and w.dtype == v.dtype == np.float32
    np.testing.assert_allclose(w, np.linalg.eigh(s.astype(np.float64))[0], rtol=1e-6)

    def failing(a: np.ndarray) -> Any:
        raise np.linalg.LinAlgError("Eigenvalues did not converge")

    with pytest.raises(np.linalg.LinAlgError):
        backend.decomposed(failing, s.astype(np.float64))
    bad = s.copy()
    bad[1, 1] = np.nan

    def refusing_nan(a: np.ndarray) -> Any:  # (as LAPACK's eigh does on most such inputs)
        if np.isnan(a).any():
            raise np.linalg.LinAlgError("Eigenvalues did not converge")
        return np.linalg.eigh(a)

    out = backend.decomposed(refusing_nan, bad)
    assert [x.shape for x in out] == [(2,), (2, 2)] and all(np.isnan(x).all() for x in out)
