"""clip_by_global_norm against optax and torch."""

from __future__ import annotations

import numpy as np
import pytest

import uniopt as uo


def _tree(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"a": rng.standard_normal((40, 50)), "b": rng.standard_normal(30), "c": np.array(0.3)}


@pytest.mark.parametrize("max_norm", [0.1, 5.0, 1e3])
def test_matches_optax_clip_by_global_norm(max_norm: float) -> None:
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    rng = np.random.default_rng(0)
    params = _tree(rng)
    ours = uo.chain(uo.clip_by_global_norm(max_norm), uo.sgd(lr=0.1, momentum=0.9))
    theirs = optax.chain(optax.clip_by_global_norm(max_norm), optax.sgd(0.1, momentum=0.9))
    with jax.enable_x64(True):
        jp = {k: jax.numpy.asarray(v) for k, v in params.items()}
        js = theirs.init(jp)
        state = uo.setup(ours, params)
        for _ in range(50):
            grads = {k: v * 3 + rng.standard_normal(v.shape) for k, v in params.items()}
            state, params = uo.update(state, params, grads)
            upd, js = theirs.update({k: jax.numpy.asarray(v) for k, v in grads.items()}, js, jp)
            jp = optax.apply_updates(jp, upd)
            for k in params:
                np.testing.assert_allclose(params[k], np.asarray(jp[k]), rtol=1e-12, atol=1e-12)


def test_clips_only_above_the_norm_and_to_the_norm() -> None:
    g = [np.array([3.0, 4.0]), np.array([0.0])]  # norm 5
    for max_norm, factor in [(10.0, 1.0), (5.0, 1.0), (1.0, 0.2)]:
        p = [np.zeros(2), np.zeros(1)]
        _, new = uo.update(uo.setup(uo.clip_by_global_norm(max_norm), p), p, g)
        np.testing.assert_allclose(new[0], -factor * g[0], rtol=1e-15)


def test_torch_clip_grad_norm_differs_by_its_epsilon() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    params = _tree(rng)
    grads = {k: 10 * rng.standard_normal(v.shape) for k, v in params.items()}
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    for k in tp:
        tp[k].grad = torch.tensor(grads[k])
    torch.nn.utils.clip_grad_norm_(list(tp.values()), max_norm=1.0)
    _, ours = uo.update(uo.setup(uo.clip_by_global_norm(1.0), params), params, grads)
    norm = np.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    for k in params:
        clipped = -(ours[k] - params[k])
        # torch scales by 1/(norm + 1e-6), ours by 1/norm: a relative 1e-6/norm apart, no more
        np.testing.assert_allclose(
            tp[k].grad.numpy(), clipped * norm / (norm + 1e-6), rtol=1e-12, atol=1e-15
        )
        assert not np.allclose(tp[k].grad.numpy(), clipped, rtol=1e-12, atol=0)


@pytest.mark.parametrize("path", ["reference", "compiled", "jit"])
def test_a_nan_norm_makes_every_leaf_nan_as_optax_and_torch(
        path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One NaN makes the global norm NaN, and every leaf NaN (optax's and torch's clip): the
    norm's ``> max_norm`` was False for NaN, and the other leaves went through unclipped."""
    from uniopt.fast import cpu

    if path == "compiled":
        monkeypatch.setattr(cpu, "MIN_LEAVES", 0)
        monkeypatch.setattr(cpu, "MIN_SIZE", 0)
    g = [np.array([30.0, 40.0, 0.0]), np.array([np.nan, 1.0])]
    p = [np.zeros(3), np.zeros(2)]
    rule = uo.clip_by_global_norm(1.0)
    if path == "jit":
        jax = pytest.importorskip("jax")
        with jax.enable_x64(True):
            jp = [jax.numpy.asarray(x) for x in p]
            _, new = jax.jit(uo.update)(uo.setup(rule, jp), jp, [jax.numpy.asarray(x) for x in g])
        new = [np.asarray(x) for x in new]
    else:
        before = cpu.STEPS
        _, new = uo.update(uo.setup(rule, p), p, g)
        assert cpu.STEPS - before == (path == "compiled")
    assert all(np.isnan(x).all() for x in new)
    # and a zero norm under a zero bound moves nothing (no 0/0)
    _, new = uo.update(uo.setup(uo.clip_by_global_norm(0.0), p), p, [np.zeros(3), np.zeros(2)])
    assert all((x == 0).all() for x in new)


def test_a_global_norm_of_torch_tensors_is_read_once_and_runs_on_meta() -> None:
    """The global norm's sum of squares is read to the host once, after every leaf's square is
    summed in float64 on the tensors' device (a read per leaf was a synchronisation per tensor
    on a GPU), and not at all on the meta device, where a dry run now steps (it raised
    "Tensor.item() cannot be called on meta tensors", as torch's clip_grad_norm_ does not)."""
    torch = pytest.importorskip("torch")
    rule = uo.chain(uo.clip_by_global_norm(1.0), uo.adamw(lr=1e-3))
    meta = {"w": torch.empty(4, 3, device="meta"), "b": torch.empty(3, device="meta")}
    state, new = uo.update(uo.setup(rule, meta), meta, {k: torch.empty_like(v)
                                                          for k, v in meta.items()})
    assert all(v.is_meta and v.shape == meta[k].shape for k, v in new.items())
    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    grads = {k: 3 * rng.standard_normal(v.shape) for k, v in arrays.items()}
    _, want = uo.update(uo.setup(rule, arrays), arrays, grads)
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    _, got = uo.update(uo.setup(rule, tensors), tensors,
                       {k: torch.from_numpy(v) for k, v in grads.items()})
    for k in arrays:
        np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-15, atol=0)
