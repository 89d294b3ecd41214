"""A whole training recipe, as people write them: AdamW with no decay on biases and LayerNorm
(by glob), the embedding's lr x 0.1, gradients accumulated over 4 micro-batches, an EMA of the
weights for evaluation, and a guard that skips the micro-batch whose gradient is NaN (step 37).

One uniopt rule, run on NumPy, on a torch module through ``uniopt.torch.Optimizer`` and on a
JAX pytree under ``jax.jit``, against the same recipe hand-built in torch.optim (param groups,
``p.grad`` accumulation, ``AveragedModel``) and in optax (``multi_transform``, ``MultiSteps``,
``apply_if_finite``). Every framework is fed the same float64 gradients."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import uniopt as uo
from helpers import assert_same, counting_jit

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

MICRO = 160  # micro-batches: 40 steps
EVERY, DECAY, LR, WD, NAN_AT = 4, 0.999, 1e-2, 0.1, 37
V, D = 16, 8


def _module() -> Any:
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = torch.nn.LayerNorm(D), torch.nn.LayerNorm(D)
            self.qkv, self.proj = torch.nn.Linear(D, 3 * D), torch.nn.Linear(D, D)
            self.up, self.down = torch.nn.Linear(D, 2 * D), torch.nn.Linear(2 * D, D)

    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(V, D)
    model.blocks = torch.nn.ModuleList([Block(), Block()])
    model.head = torch.nn.Linear(D, V)
    return model.double()


GLOBS = uo.by_path({"embed.*": "embed", "*.bias": "no_decay", "*norm*": "no_decay",
                    "*": "decay"})


def _label(name: str) -> str:
    return GLOBS(name, None)


def _rule() -> uo.Transform:
    return uo.skip_nonfinite(uo.accumulate(uo.chain(uo.partition({
        "decay": uo.adamw(lr=LR, weight_decay=WD),
        "no_decay": uo.adamw(lr=LR, weight_decay=0.0),
        "embed": uo.adamw(lr=LR * 0.1, weight_decay=WD),
    }, GLOBS), uo.ema(DECAY)), every=EVERY))


@pytest.fixture(scope="module")
def case() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    params = {n: p.detach().numpy().copy() for n, p in _module().named_parameters()}
    rng = np.random.default_rng(0)
    grads = [{n: rng.normal(size=p.shape) for n, p in params.items()} for _ in range(MICRO)]
    grads[NAN_AT]["blocks.1.up.weight"][3, 2] = np.nan
    return params, grads


def _numpy(params: Any, grads: Any) -> tuple[Any, Any, Any]:
    p = {k: v.copy() for k, v in params.items()}
    state = uo.setup(_rule(), p)
    for g in grads:
        state = uo.update_(state, p, g)
    return p, uo.averaged(state, p), state


def _torch_hand_built(params: Any, grads: Any) -> tuple[Any, Any]:
    model = _module()
    named = dict(model.named_parameters())
    groups: dict[str, list[Any]] = {"decay": [], "no_decay": [], "embed": []}
    for n, p in named.items():
        groups[_label(n)].append(p)
    opt = torch.optim.AdamW([
        {"params": groups["decay"], "weight_decay": WD},
        {"params": groups["no_decay"], "weight_decay": 0.0},
        {"params": groups["embed"], "lr": LR * 0.1, "weight_decay": WD},
    ], lr=LR)
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(DECAY))
    kept = 0
    for g in grads:
        if not all(np.isfinite(v).all() for v in g.values()):
            continue  # the guard: this micro-batch never happened
        for n, p in named.items():
            t = torch.from_numpy(g[n]) / EVERY
            p.grad = t if p.grad is None else p.grad + t
        kept += 1
        if kept % EVERY == 0:
            opt.step()
            opt.zero_grad()
            ema.update_parameters(model)
    averaged = {n: p.detach().numpy() for n, p in ema.module.named_parameters()}
    return {n: p.detach().numpy() for n, p in named.items()}, averaged


def _optax_hand_built(params: Any, grads: Any) -> Any:
    with jax.enable_x64(True):
        labels = {n: _label(n) for n in params}
        tx = optax.apply_if_finite(optax.MultiSteps(optax.multi_transform({
            "decay": optax.adamw(LR, weight_decay=WD),
            "no_decay": optax.adamw(LR, weight_decay=0.0),
            "embed": optax.adamw(LR * 0.1, weight_decay=WD),
        }, labels), EVERY, accumulator_dtype=jax.numpy.float64), max_consecutive_errors=3)
        p = {k: jax.numpy.asarray(v) for k, v in params.items()}
        s = tx.init(p)

        @jax.jit
        def step(p: Any, s: Any, g: Any) -> Any:
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        for g in grads:
            p, s = step(p, s, g)
        return {k: np.asarray(v) for k, v in p.items()}


def _close(a: dict[str, Any], b: dict[str, Any], tol: float = 1e-12) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
        err = np.max(np.abs(x - y)) / max(1.0, np.max(np.abs(y)))
        assert err <= tol, f"{k}: {err:.3g}"


def test_the_recipe_matches_torch_optim_and_optax(case: Any) -> None:
    params, grads = case
    ours, our_ema, state = _numpy(params, grads)
    theirs, their_ema = _torch_hand_built(params, grads)
    _close(ours, theirs)
    _close(our_ema, their_ema)
    _close(ours, _optax_hand_built(params, grads))
    guard = state.tree_states["skip_nonfinite"]
    assert guard["total_notfinite"] == 1
    assert guard["inner"].tree_states["accumulate"]["inner"].step == (MICRO - 1) // EVERY


def test_the_recipe_is_the_same_on_numpy_torch_and_jax(case: Any) -> None:
    params, grads = case
    ours, our_ema, _ = _numpy(params, grads)

    # a torch module through uniopt.torch: the same bits (its CPU tensors are NumPy views)
    import uniopt.torch as ut

    model = _module()
    opt = ut.Optimizer(model.named_parameters(), _rule())
    named = dict(model.named_parameters())
    for g in grads:
        for n, p in named.items():
            p.grad = torch.from_numpy(g[n])
        opt.step()
    assert_same([named[k].detach().numpy() for k in sorted(ours)],
                [ours[k] for k in sorted(ours)])
    averaged = opt.averaged()
    assert_same([averaged[named[k]].numpy() for k in sorted(ours)],
                [our_ema[k] for k in sorted(ours)])

    # a JAX pytree under one jax.jit (XLA may fuse a multiply-add: 1e-12, not the bits)
    with jax.enable_x64(True):
        p = {k: jax.numpy.asarray(v) for k, v in params.items()}
        state = uo.setup(_rule(), p)
        step, traces = counting_jit()
        for g in grads:
            state, p = step(state, p, g)
        assert len(traces) == 1
        _close(p, ours)
        _close(uo.averaged(state, p), our_ema)
