"""ftrl against ``keras.optimizers.Ftrl`` (keras 3 on JAX, float64 variables), free-running for
300 steps, each side computing its gradient at its own parameters; keras's own golden values run
in tests/test_conventions_sgd.py (``test_keras_golden_values``).

Learning rates are dyadic: keras keeps its rate in a variable of ``floatx`` (float32 unless set),
so such a rate is the same number on both sides.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import uniopt as uo
from free_run import TOL, run_keras, run_ours, worst_of
from helpers import keras_on_jax

# (our fields, keras's keywords): keras's names but lr
CASES = {
    "defaults": {"lr": 2**-4},
    # every term at once: keras's golden test's numbers, with its power of -0.2 (per leaf)
    "every-term": {"lr": 2**-5, "learning_rate_power": -0.2, "initial_accumulator_value": 0.4,
                   "l1_regularization_strength": 0.05, "l2_regularization_strength": 0.15,
                   "l2_shrinkage_regularization_strength": 0.01, "beta": 0.3},
    # an L1 strength that holds most entries at exactly 0, from an accumulator of 0
    "sparse": {"lr": 2**-3, "l1_regularization_strength": 0.4, "beta": 1.0,
               "initial_accumulator_value": 0.0},
    # a power of 0: a fixed rate, no adaptation
    "fixed-rate": {"lr": 2**-4, "learning_rate_power": 0.0, "l2_regularization_strength": 0.1},
}


def _keras_kwargs(fields: dict[str, Any]) -> dict[str, Any]:
    return {("learning_rate" if k == "lr" else k): v for k, v in fields.items()}


@pytest.fixture(scope="module")
def keras(jx: Any) -> Any:
    return keras_on_jax()


@pytest.mark.parametrize("case", list(CASES))
def test_matches_keras(keras: Any, jx: Any, case: str) -> None:
    fields = CASES[case]
    ours = run_ours(uo.ftrl(**fields), 3)
    theirs = run_keras(jx, keras, keras.optimizers.Ftrl(**_keras_kwargs(fields)), 3)
    assert worst_of(ours, theirs) < TOL
    if case == "sparse":  # L1 sets entries to exactly 0, the same ones as keras
        zeros = sum(int((v == 0).sum()) for v in ours[-1].values())
        assert zeros >= 5 and all(np.array_equal(ours[-1][k] == 0, np.asarray(theirs[-1][k]) == 0)
                                  for k in ours[-1])


def test_the_defaults_are_keras(keras: Any) -> None:
    import inspect

    theirs = inspect.signature(keras.optimizers.Ftrl).parameters
    ours = uo.ftrl()
    for field in ("learning_rate_power", "initial_accumulator_value", "beta",
                  "l1_regularization_strength", "l2_regularization_strength",
                  "l2_shrinkage_regularization_strength"):
        assert getattr(ours, field) == theirs[field].default, field
    assert ours.lr == theirs["learning_rate"].default


@pytest.mark.parametrize(("field", "value"), [
    ("lr", 0.0), ("learning_rate_power", 0.5), ("initial_accumulator_value", -0.1),
    ("l1_regularization_strength", -1.0), ("l2_regularization_strength", -1.0),
    ("l2_shrinkage_regularization_strength", -1.0), ("beta", -1.0)])
def test_refuses_what_keras_refuses(field: str, value: float) -> None:
    """keras raises for the powers and strengths; a rate of 0 (which divides by 0 in keras's
    step) and a negative beta are refused here too, where keras 3.15 takes them."""
    with pytest.raises(ValueError, match=rf"{field}.*{value}"):
        uo.ftrl(**{field: value})


def test_the_power_of_a_square_root_takes_the_compiled_loop_and_others_the_reference_path(
) -> None:
    """keras's default power is a square root, elementwise on the compiled loop; another is a
    per-leaf part (its powers rounded by each library): the same numbers to rounding."""
    assert [type(p).__name__ for p in uo.ftrl().flat_parts] == ["scale_by_ftrl"]
    near = uo.ftrl(lr=0.1, learning_rate_power=-0.5 + 1e-15)
    assert [type(p).__name__ for p in near.flat_parts] == ["scale_by_ftrl_power"]
    a, b = run_ours(uo.ftrl(lr=0.1), 1, steps=50), run_ours(near, 1, steps=50)
    assert worst_of(a, b) < 1e-12


@pytest.mark.parametrize(("state_dtype", "dtype"), [("q8", np.float32), ("float32", np.float64)])
def test_a_state_narrower_than_the_params_is_refused(state_dtype: str, dtype: type) -> None:
    """FTRL sets the parameter from its linear slot: 8-bit slots put every parameter 0.02 from
    the optimum where float slots put it 4e-8 (a review's measure), float32 slots cap float64
    params at float32's digits. Refused at set-up, for the functional API and uniopt.torch
    (8 bits by its constructor, float32 state on float64 params by the step that would make
    it); a state as wide as the params is taken."""
    with pytest.raises(ValueError, match=rf"state_dtype='{state_dtype}' is not offered for "
                                         r"ftrl\b.*linear slot"):
        uo.setup(uo.ftrl(), [np.ones(3, dtype)], state_dtype=state_dtype)
    uo.setup(uo.ftrl(), [np.ones(3, np.float32)], state_dtype="float32")
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64 if dtype == np.float64
                                      else torch.float32))
    if state_dtype == "q8":
        with pytest.raises(ValueError, match="^uniopt.torch.Optimizer: .*linear slot"):
            ut.Optimizer([p], uo.ftrl(), state_dtype=state_dtype)
        return
    opt = ut.Optimizer([p], uo.ftrl(), state_dtype=state_dtype)
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="^uniopt.torch.Optimizer: .*linear slot"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones_like(p))
    assert p not in opt.state  # (no step count left behind by the refused set-up)


def test_a_group_refused_for_one_param_gives_none_a_state() -> None:
    """A float32 and a float64 parameter in one group with state_dtype='float32': the float64
    one is refused, and the float32 one, set up first, keeps no state either."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    p0 = torch.nn.Parameter(torch.ones(3, dtype=torch.float32))
    p1 = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = ut.Optimizer([p0, p1], uo.ftrl(), state_dtype="float32")
    p0.grad, p1.grad = torch.ones_like(p0), torch.ones_like(p1)
    with pytest.raises(ValueError, match="on float64 params"):
        opt.step()
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
    assert torch.equal(p0.detach(), torch.ones(3)) and torch.equal(p1.detach(),
                                                                  torch.ones(3).double())


def test_sparse_rows_step_the_rows_an_embeddings_gradient_holds() -> None:
    """``uniopt.torch.Optimizer(..., sparse_rows=True)``: FTRL on an ``nn.Embedding(sparse=
    True)`` steps the rows a batch looks up (a row looked up twice: its gradients summed), as
    the dense rule on those rows alone; every other row keeps its value and its state."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    torch.manual_seed(0)
    emb = torch.nn.Embedding(12, 4, sparse=True, dtype=torch.float64)
    rule = uo.ftrl(lr=0.1, l1_regularization_strength=0.01, beta=0.5)
    opt = ut.Optimizer(emb.parameters(), rule, sparse_rows=True)
    names = ("scale_by_ftrl.accumulator", "scale_by_ftrl.linear")
    for batch in ([1, 3, 3, 7], [0, 1, 11], [3, 5, 5, 5]):
        index = torch.tensor(batch)
        opt.zero_grad()
        (emb(index) * torch.arange(1.0, 5.0, dtype=torch.float64)).sin().sum().backward()
        assert emb.weight.grad.is_sparse
        g = emb.weight.grad.coalesce()
        rows = g.indices()[0].numpy()
        before = emb.weight.detach().numpy().copy()
        st = opt.state.get(emb.weight, {})
        slots = {n: (st[n].numpy().copy() if n in st else
                     np.full_like(before, 0.1) if n.endswith("accumulator") else
                     np.zeros_like(before)) for n in names}
        # the dense rule on those rows alone, from their values and state
        state = uo.setup(rule, [before[rows]])
        state = uo.State(state.rule, state.step, {n: [slots[n][rows]] for n in names},
                         state.treedef)
        want = [before[rows].copy()]
        uo.update_(state, want, [g.values().numpy()])
        opt.step()
        untouched = np.setdiff1d(np.arange(12), rows)
        got = emb.weight.detach().numpy()
        np.testing.assert_array_equal(got[untouched], before[untouched])
        np.testing.assert_allclose(got[rows], want[0], rtol=1e-14, atol=1e-300)
        for n in names:
            np.testing.assert_array_equal(opt.state[emb.weight][n].numpy()[untouched],
                                          slots[n][untouched])


def test_sparse_rows_adagrad_is_torchs_sparse_adagrad() -> None:
    """torch.optim.Adagrad takes sparse gradients, stepping their rows: the same numbers."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    torch.manual_seed(1)
    ours, theirs = (torch.nn.Embedding(20, 3, sparse=True, dtype=torch.float64) for _ in "ab")
    theirs.load_state_dict(ours.state_dict())
    a = ut.Optimizer(ours.parameters(), uo.adagrad(lr=0.1), sparse_rows=True)
    b = torch.optim.Adagrad(theirs.parameters(), lr=0.1)
    for k in range(15):
        index = torch.randint(0, 20, (6,), generator=torch.Generator().manual_seed(k))
        for emb, opt in ((ours, a), (theirs, b)):
            opt.zero_grad()
            emb(index).pow(2).sum().backward()
            opt.step()
    np.testing.assert_allclose(ours.weight.detach(), theirs.weight.detach(), rtol=1e-14)


def test_sparse_rows_are_asked_for_and_refused_for_reductions() -> None:
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = ut.Optimizer(emb.parameters(), uo.ftrl())
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="unless made with sparse_rows=True"):
        opt.step()
    with pytest.raises(TypeError, match="clip_by_global_norm is not elementwise"):
        ut.Optimizer(emb.parameters(), uo.chain(uo.clip_by_global_norm(1.0), uo.ftrl()),
                     sparse_rows=True)
    with pytest.raises(TypeError, match="not elementwise"):
        ut.Optimizer(emb.parameters(), uo.ftrl(learning_rate_power=-0.3), sparse_rows=True)
    import copy

    kept = copy.deepcopy(ut.Optimizer(emb.parameters(), uo.ftrl(), sparse_rows=True))
    [w] = kept.param_groups[0]["params"]  # (the copy's own parameter, without a gradient)
    w.grad = emb.weight.grad.clone()
    kept.step()  # (a copy, as a checkpointing framework makes one, still takes them)
    assert kept.state[w]["scale_by_ftrl.accumulator"].shape == (5, 2)


def test_sparse_rows_refuse_any_members_decay_and_a_row_outside_the_table() -> None:
    """A decay is refused with sparse gradients whatever key the group holds it under (a
    chain member's "0.weight_decay", a decay block's "wd"), as torch refuses "weight_decay";
    a gradient row outside the table is refused before any parameter, dense ones included,
    is written (torch's own Adagrad has stepped its dense ones when its gather raises)."""
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    for rule in (uo.chain(uo.adam(lr=0.01, weight_decay=0.1), uo.sgd(lr=1.0)),
                 uo.chain(uo.weight_decay(0.1), uo.sgd(lr=0.1))):
        emb = torch.nn.Embedding(5, 2, sparse=True)
        opt = ut.Optimizer(emb.parameters(), rule, sparse_rows=True)
        emb(torch.tensor([1])).sum().backward()
        with pytest.raises(RuntimeError, match="weight_decay option is not compatible"):
            opt.step()
    w = torch.nn.Parameter(torch.ones(4))
    e = torch.nn.Parameter(torch.zeros(10, 3))
    opt = ut.Optimizer([w, e], uo.sgd(lr=0.1), sparse_rows=True)
    w.grad = torch.ones(4)
    e.grad = torch.sparse_coo_tensor(torch.tensor([[2, 15]]), torch.ones(2, 3), (10, 3))
    with pytest.raises(IndexError, match=r"param 1 of its group holds an index outside its "
                                         r"shape \(10, 3\)"):
        opt.step()
    assert torch.equal(w.detach(), torch.ones(4)) and len(opt.state) == 0
