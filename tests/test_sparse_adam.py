"""SparseAdam against ``torch.optim.SparseAdam`` 2.13: many steps of sparse gradients whose
rows change (duplicates, empty steps, rows never seen), checkpoints both ways, torch's
messages; and the functional rule on dense arrays, where an entry is present if non-zero.

On tensors the engine runs torch's operations in torch's order on the gathered rows, so the
runs agree bit for bit (asserted exactly, float32 and float64).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import uniopt as uo  # noqa: E402
import uniopt.torch as ut  # noqa: E402
from helpers import expect_compiled, reference_path  # noqa: E402

SHAPES = [(7, 3), (5,)]


def sparse_grads(step: int, dtype: Any) -> list[Any]:
    """Gradients of the rows a batch touches: duplicates (summed), and none on every 4th step
    for the second parameter (its step still counts, as torch's)."""
    g = torch.Generator().manual_seed(step)
    out = []
    for k, shape in enumerate(SHAPES):
        n = 0 if (k == 1 and step % 4 == 3) else 4
        rows = torch.randint(0, shape[0], (1, n), generator=g)
        values = torch.randn((n, *shape[1:]), generator=g, dtype=dtype)
        out.append(torch.sparse_coo_tensor(rows, values, shape))
    return out


def run(cls: Any, steps: int, dtype: Any = torch.float64, **kw: Any) -> tuple[list[Any], Any]:
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]
    opt = cls(ps, **kw)
    out = []
    for step in range(steps):
        for p, grad in zip(ps, sparse_grads(step, dtype), strict=True):
            p.grad = grad
        opt.step()
        out.append([p.detach().clone() for p in ps])
    return out, opt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [{}, {"lr": 0.05, "betas": (0.5, 0.9), "eps": 1e-3},
                                {"lr": 0.01, "maximize": True}])
def test_many_steps_as_torch_bit_for_bit(kw: dict[str, Any], dtype: Any) -> None:
    theirs, t_opt = run(torch.optim.SparseAdam, 60, dtype, **kw)
    ours, o_opt = run(ut.SparseAdam, 60, dtype, **kw)
    for a, b in zip(ours, theirs, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    for p, q in zip(t_opt.param_groups[0]["params"], o_opt.param_groups[0]["params"],
                    strict=True):
        t_st, o_st = t_opt.state[p], o_opt.state[q]
        assert int(o_st["step"]) == t_st["step"] == 60
        assert torch.equal(o_st["exp_avg"], t_st["exp_avg"])
        assert torch.equal(o_st["exp_avg_sq"], t_st["exp_avg_sq"])


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_loads_both_ways_and_continues(direction: str) -> None:
    first, second = ((torch.optim.SparseAdam, ut.SparseAdam) if direction == "torch_to_ours"
                     else (ut.SparseAdam, torch.optim.SparseAdam))
    straight, _ = run(torch.optim.SparseAdam, 10, lr=0.01)
    head, opt = run(first, 5, lr=0.01)
    sd = opt.state_dict()
    assert all(type(st["step"]) is int for st in sd["state"].values())  # torch's int
    ps = [torch.nn.Parameter(x.clone()) for x in head[-1]]
    resumed = second(ps, lr=0.01)
    resumed.load_state_dict(sd)
    for step in range(5, 10):
        for p, grad in zip(ps, sparse_grads(step, torch.float64), strict=True):
            p.grad = grad
        resumed.step()
        for x, y in zip(ps, straight[step], strict=True):
            assert torch.equal(x.detach(), y)


def test_dense_gradients_are_rejected_with_torchs_message_before_any_write() -> None:
    _, opt = run(ut.SparseAdam, 2)
    ps = opt.param_groups[0]["params"]
    ps[0].grad = sparse_grads(9, torch.float64)[0]
    ps[1].grad = torch.ones(5, dtype=torch.float64)
    before = ([p.detach().clone() for p in ps],
              {k: {n: x.clone() if torch.is_tensor(x) else x for n, x in v.items()}
               for k, v in opt.state_dict()["state"].items()})
    with pytest.raises(RuntimeError) as ours:
        opt.step()
    t_opt = torch.optim.SparseAdam([torch.nn.Parameter(torch.zeros(5))])
    t_opt.param_groups[0]["params"][0].grad = torch.ones(5)
    with pytest.raises(RuntimeError) as theirs:
        t_opt.step()
    assert str(ours.value) == str(theirs.value)
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before[0], strict=True))
    after = opt.state_dict()["state"]
    for k, st in before[1].items():
        assert after[k]["step"] == st["step"]
        assert torch.equal(after[k]["exp_avg"], st["exp_avg"])


@pytest.mark.parametrize(("kw", "message"), [
    ({"lr": 0.0}, "Invalid learning rate: 0.0"),
    ({"eps": 0.0}, "Invalid epsilon value: 0.0"),
    ({"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1: 1.0"),
    ({"betas": (-0.1, 0.9)}, r"Invalid beta parameter at index 0: -0.1"),
])
def test_invalid_hyperparameters_as_torch(kw: dict[str, Any], message: str) -> None:
    w = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=message):
        torch.optim.SparseAdam(w, **kw)
    with pytest.raises(ValueError, match=message):
        ut.SparseAdam(w, **kw)


def test_signature_and_defaults_are_torchs() -> None:
    import inspect

    ours = inspect.signature(ut.SparseAdam.__init__).parameters
    theirs = inspect.signature(torch.optim.SparseAdam.__init__).parameters
    assert [(n, p.default) for n, p in theirs.items()] == \
        [(n, p.default) for n, p in ours.items() if n != "state_dtype"]


def dense(grads: list[Any]) -> list[np.ndarray]:
    return [g.to_dense().numpy() for g in grads]


@pytest.mark.parametrize("compiled", [False, True])
def test_functional_rule_on_dense_arrays_updates_only_the_non_zero_entries(
    compiled: bool, small_steps_compiled: None
) -> None:
    """A dense gradient whose present rows are non-zero: the same run as torch's sparse one
    (to NumPy's rounding of sqrt and division, 1e-15); the other entries keep their values
    and moments exactly."""
    theirs, _ = run(torch.optim.SparseAdam, 30, lr=0.01)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g, dtype=torch.float64).numpy() for s in SHAPES]
    state = uo.setup(uo.sparse_adam(lr=0.01), params)
    for step in range(30):
        grads = dense(sparse_grads(step, torch.float64))
        old = [p.copy() for p in params], [m.copy() for m in state.slots[
            "scale_by_sparse_adam.exp_avg"]]
        if compiled:
            with expect_compiled(1):
                state, params = uo.update(state, params, grads)
        else:
            with reference_path():
                state, params = uo.update(state, params, grads)
        for p, m, p0, m0, gr, ref in zip(params, state.slots["scale_by_sparse_adam.exp_avg"],
                                         *old, grads, theirs[step], strict=True):
            absent = gr == 0
            assert np.array_equal(p[absent], p0[absent]) and np.array_equal(m[absent], m0[absent])
            np.testing.assert_allclose(p, ref.numpy(), rtol=0, atol=1e-14)


def test_functional_rule_validates() -> None:
    with pytest.raises(ValueError, match=r"sparse_adam: betas\[1\] must be in \[0, 1\), got 1"):
        uo.sparse_adam(betas=(0.9, 1))
    with pytest.raises(ValueError, match=r"sparse_adam: lr must be >= 0, got -1"):
        uo.sparse_adam(lr=-1)


@pytest.mark.filterwarnings("ignore::uniopt.fast.FastPathUnavailable")
@pytest.mark.parametrize("cls, kw", [(ut.Adagrad, {"lr": 0.1}), (ut.SparseAdam, {"lr": 0.01})])
def test_float32_state_on_float64_params_with_sparse_rows(cls: Any, kw: dict[str, Any]) -> None:
    """``state_dtype="float32"`` on float64 params that take sparse gradients (it raised that
    the state was set up for other params: the rows' step was handed no state dtype): the
    rows present step, the others keep their values, and the state stays float32."""
    p = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    opt = cls([p], **kw, state_dtype="float32")
    for step in range(3):
        p.grad = torch.sparse_coo_tensor(torch.tensor([[1, step % 4]]),
                                         torch.ones(2, 3, dtype=torch.float64) * (step + 1),
                                         (4, 3))
        opt.step()
    assert all(v.dtype == torch.float32 for k, v in opt.state[p].items() if k != "step")
    assert bool(torch.isfinite(p).all()) and p.dtype == torch.float64
    assert torch.equal(p.detach()[3], torch.zeros(3, dtype=torch.float64))  # never a row
    assert not torch.equal(p.detach()[1], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("cls, kw", [(ut.Adagrad, {"lr": 0.1, "differentiable": True})])
def test_differentiable_with_sparse_rows_is_refused_before_any_write(
        cls: Any, kw: dict[str, Any]) -> None:
    """A step of sparse rows is not recorded in autograd: ``differentiable=True`` with sparse
    gradients is refused (it stepped in place, unrecorded, silently), nothing written."""
    p = torch.ones(4, 3, requires_grad=True)
    opt = cls([p], **kw)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 2]]), torch.ones(2, 3), (4, 3))
    with pytest.raises(RuntimeError, match="differentiable=True with sparse gradients is not "
                                           "offered"):
        opt.step()
    st = opt.state[p]  # (Adagrad's, made at construction, as torch's)
    assert torch.equal(p.detach(), torch.ones(4, 3)) and float(st["step"]) == 0
    assert torch.equal(st["sum"], torch.zeros(4, 3))


def test_sparse_rows_warns_of_a_rule_that_skips_zeros_too() -> None:
    """Optimizer(uo.sparse_adam(...), sparse_rows=True) skipped the zero entries inside the
    rows a gradient holds as well (sparse_adam's default for dense gradients), where torch's
    SparseAdam steps them: 0.2 from torch after 6 steps, silently. It warns, naming the fix,
    with which it is torch's bit for bit."""
    theirs, _ = run(torch.optim.SparseAdam, 6, lr=0.1)
    with pytest.warns(UserWarning, match=r"skips zero entries \(skip_zeros=True\), and under "
                                         r"sparse_rows=True .* pass skip_zeros=False"):
        ut.Optimizer([torch.nn.Parameter(torch.ones(3, 2))], uo.sparse_adam(lr=0.1),
                     sparse_rows=True)
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*skip_zeros")
        ours, _ = run(lambda ps, **kw: ut.Optimizer(ps, uo.sparse_adam(lr=0.1, skip_zeros=False),
                                                    sparse_rows=True), 6)
    for a, b in zip(ours, theirs, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
