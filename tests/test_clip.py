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
