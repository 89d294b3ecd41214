"""No per-step allocation that grows with the model: during 100 in-place steps the memory
allocated beyond params + grads + state stays under 5% of them."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import uniopt as uo
from helpers import expect_compiled

# configurations test_fused.py compiles too: in the whole suite this file compiles no loop
RULES = {
    "adam": uo.adam(lr=1e-3),
    "sgd-momentum-wd": uo.sgd(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=1e-4),
    "rmsprop-centered-momentum-wd": uo.rmsprop(
        lr=1e-3, centered=True, momentum=0.5, weight_decay=1e-4
    ),
}


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
@pytest.mark.parametrize("shapes", [[(400, 500)], [(2_000,)] * 100], ids=["one", "many"])
def test_peak_memory_of_in_place_steps(rule: uo.Transform, shapes: list[tuple[int, ...]]) -> None:
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    grads = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    # what is measured is the compiled loop's: one large leaf or many leaves take it
    with expect_compiled(101):
        state = uo.update_(uo.setup(rule, params), params, grads)  # compile outside the measure
        model = sum(p.nbytes for p in params) * (2 + len(state.slots))
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for _ in range(100):
                state = uo.update_(state, params, grads)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    assert peak <= 0.05 * model, f"{peak} bytes allocated beyond a model of {model} bytes"


@pytest.mark.parametrize("n", [2, 40])
def test_a_rule_reused_from_trial_to_trial_keeps_no_params_alive(n: int) -> None:
    """One rule object, set up and stepped in place on new params each trial (a search over
    seeds or data): once the trial's params are dropped they are freed (the rule's memo held
    the last trial's, a whole model, for as long as the rule lived)."""
    import gc
    import weakref

    rule = uo.adamw(lr=1e-3)
    for _ in range(2):
        params = [np.ones(64, np.float32) for _ in range(n)]
        alive = [weakref.ref(p) for p in params]
        state = uo.setup(rule, params)
        for _ in range(3):
            state = uo.update_(state, params, [np.ones(64, np.float32) for _ in range(n)])
        del params, state
        gc.collect()
        assert not any(r() is not None for r in alive)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("count", [1, 8])
def test_uniopt_torch_lets_go_of_a_steps_gradients(dtype: str, count: int) -> None:
    """After ``step(); zero_grad()`` the gradients' memory is freed, as with torch.optim, but
    for groups of at most KEEP_VIEWS elements (docs/torch.md). The compiled step kept the
    NumPy views of the last gradients (a model's worth of memory) in groups of fewer than six
    tensors, and in every bfloat16 group."""
    torch = pytest.importorskip("torch")
    from torch.multiprocessing.reductions import StorageWeakRef

    import uniopt.torch as ut
    from uniopt.torch import plans

    n = 4 * plans.KEEP_VIEWS
    params = [torch.nn.Parameter(torch.randn(n, dtype=getattr(torch, dtype)))
              for _ in range(count)]
    opt = ut.Adam(params, lr=1e-3)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        refs = [StorageWeakRef(p.grad.untyped_storage()) for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert all(r.expired() for r in refs)
