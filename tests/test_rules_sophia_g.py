"""Sophia-G (``uo.sophia_g``, ``uniopt.torch.SophiaG``) against its authors' algorithm.

Their ``SophiaG`` (github.com/Liuhong99/Sophia, ``sophia.py``) is not on the package index, so
the test writes it out in torch, from the paper's Algorithm 3 and their code's order of
operations: the step decays the parameter, updates the momentum, and moves by
``lr * sign(m) * min(|m| / (rho*bs*h + 1e-15), 1)``; ``update_hessian()`` folds
``g_s * g_s`` (``g_s`` the gradient of the loss at sampled labels) into ``h`` with ``b2``;
their training loop calls it every ``k`` steps, after the step. The generic registry suite
holds the rule to the other backends, ``jax.jit``, schedules and masks.
"""

from __future__ import annotations

import inspect
import io
from typing import Any

import numpy as np
import pytest

import uniopt as uo

torch = pytest.importorskip("torch")
import uniopt.torch as ut  # noqa: E402

SHAPES = [(7, 5), (5,), (3, 4, 2)]
STEPS, EVERY = 300, 10


def _theirs_step(ps: list[Any], gs: list[Any], st: list[dict[str, Any]], *, lr: float,
                 betas: tuple[float, float], rho: float, weight_decay: float, bs: float,
                 maximize: bool = False) -> None:
    b1 = betas[0]
    for p, g, s in zip(ps, gs, st, strict=True):
        g = -g if maximize else g
        s["step"] += 1
        p.mul_(1 - lr * weight_decay)
        s["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
        ratio = (s["exp_avg"].abs() / (rho * bs * s["hessian"] + 1e-15)).clamp(None, 1)
        p.addcmul_(s["exp_avg"].sign(), ratio, value=-lr)


def _theirs_hessian(gs: list[Any], st: list[dict[str, Any]], b2: float) -> None:
    for g, s in zip(gs, st, strict=True):
        s["hessian"].mul_(b2).addcmul_(g, g, value=1 - b2)


def _draws(seed: int) -> tuple[list[np.ndarray], list[list[np.ndarray]], list[list[np.ndarray]]]:
    """Start, the gradients of each step and the sampled-label gradients of each estimate
    (small, so that h stays small against |m|/(rho*bs) and both sides of the clip are met)."""
    rng = np.random.default_rng(seed)
    start = [rng.standard_normal(s) for s in SHAPES]
    grads = [[rng.standard_normal(s) for s in SHAPES] for _ in range(STEPS)]
    sampled = [[rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 0) for s in SHAPES]
               for _ in range(STEPS // EVERY)]
    return start, grads, sampled


HP = {"lr": 0.01, "betas": (0.9, 0.95), "rho": 0.05, "weight_decay": 0.1}


@pytest.mark.parametrize("bs", [1.0, 480.0])
def test_functional_and_torch_match_their_algorithm_over_300_steps(bs: float) -> None:
    start, grads, sampled = _draws(0)
    theirs = [torch.tensor(x) for x in start]
    st = [{"step": 0, "exp_avg": torch.zeros_like(p), "hessian": torch.zeros_like(p)}
          for p in theirs]
    ps = [torch.nn.Parameter(torch.tensor(x)) for x in start]
    opt = ut.SophiaG(ps, **HP)
    ours = [x.copy() for x in start]
    state = uo.setup(uo.sophia_g(**HP, bs=bs), ours)
    clipped = 0
    for t in range(STEPS):
        gs = [torch.tensor(g) for g in grads[t]]
        _theirs_step(theirs, gs, st, **HP, bs=bs)
        clipped += sum(int((s["exp_avg"].abs() >= HP["rho"] * bs * s["hessian"]).sum())
                       for s in st)
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()
        opt.step(bs=bs)
        state = uo.update_(state, ours, grads[t])
        if t % EVERY == EVERY - 1:
            d = [torch.tensor(g) for g in sampled[t // EVERY]]
            _theirs_hessian(d, st, HP["betas"][1])
            for p, g in zip(ps, d, strict=True):
                p.grad = g.clone()
            opt.update_hessian()
            state = uo.sophia_hessian(state, [g * g for g in sampled[t // EVERY]])
        for p, q, o in zip(theirs, ps, ours, strict=True):
            np.testing.assert_allclose(q.detach().numpy(), p.numpy(), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(o, p.numpy(), rtol=1e-12, atol=1e-12)
    # both sides of the clip were met
    assert 0 < clipped < STEPS * sum(int(np.prod(s)) for s in SHAPES)
    for p, s in zip(ps, st, strict=True):
        np.testing.assert_allclose(opt.state[p]["hessian"].numpy(), s["hessian"].numpy(),
                                   rtol=1e-12, atol=0)
        assert int(opt.state[p]["step"]) == STEPS


def test_torch_class_has_their_signature_and_checks() -> None:
    params = inspect.signature(ut.SophiaG).parameters
    assert {k: v.default for k, v in params.items() if k != "params"} == {
        "lr": 1e-4, "betas": (0.965, 0.99), "rho": 0.04, "weight_decay": 1e-1,
        "maximize": False, "capturable": False, "state_dtype": None}
    assert inspect.signature(ut.SophiaG.step).parameters["bs"].default == 5120
    w = [torch.nn.Parameter(torch.zeros(2))]
    for kw, message in (({"lr": -1.0}, "Invalid learning rate: -1.0"),
                        ({"betas": (1.0, 0.99)}, "Invalid beta parameter at index 0: 1.0"),
                        ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1: -0.1"),
                        ({"rho": -0.5}, "Invalid rho parameter at index 1: -0.5"),
                        ({"weight_decay": -0.1}, "Invalid weight_decay value: -0.1")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ut.SophiaG(w, **kw)
    opt = ut.SophiaG(w, state_dtype="q8")
    w[0].grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"kept in the params' dtype only \(state_dtype=None\), "
                                         r"got state_dtype='q8'"):
        opt.update_hessian()
    assert not opt.state
    # a refusal in a later group or parameter writes no estimate before it (one pass of checks)
    a, z = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3, dtype=torch.cfloat))
    for groups in ([{"params": [a]}, {"params": [z]}],
                   [{"params": [a]}, {"params": [torch.nn.Parameter(torch.ones(2))],
                                      "state_dtype": "float32"}]):
        opt = ut.SophiaG(groups)
        for g in opt.param_groups:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
        with pytest.raises((TypeError, ValueError)):
            opt.update_hessian()
        assert not opt.state
    emb = torch.nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    opt = ut.SophiaG(emb.parameters())
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="SophiaG does not support sparse gradients"):
        opt.update_hessian()
    with pytest.raises(RuntimeError, match="SophiaG does not support sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)


def test_maximize_groups_bs_and_a_saved_state_continue_as_theirs() -> None:
    """Two groups (one maximizing, with its own rho), bs changed between steps, and a state
    dict saved, loaded with ``weights_only=True`` into a new optimizer and continued."""
    start, grads, sampled = _draws(1)
    theirs = [torch.tensor(x) for x in start]
    st = [{"step": 0, "exp_avg": torch.zeros_like(p), "hessian": torch.zeros_like(p)}
          for p in theirs]
    ps = [torch.nn.Parameter(torch.tensor(x)) for x in start]
    hp2 = {**HP, "rho": 0.2}

    def make() -> Any:
        return ut.SophiaG([{"params": ps[:2]}, {"params": ps[2:], "rho": 0.2,
                                                 "maximize": True}], **HP)

    opt = make()
    for t in range(40):
        bs = 64.0 if t < 20 else 16.0
        gs = [torch.tensor(g) for g in grads[t]]
        _theirs_step(theirs[:2], gs[:2], st[:2], **HP, bs=bs)
        _theirs_step(theirs[2:], gs[2:], st[2:], **hp2, bs=bs, maximize=True)
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()
        opt.step(bs=bs)
        if t % 5 == 4:
            d = [torch.tensor(g) for g in sampled[t // 5]]
            _theirs_hessian(d, st, HP["betas"][1])
            for p, g in zip(ps, d, strict=True):
                p.grad = g.clone()
            opt.update_hessian()
        if t == 25:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            opt = make()
            opt.load_state_dict(torch.load(buf, weights_only=True))
        for p, q in zip(theirs, ps, strict=True):
            np.testing.assert_allclose(q.detach().numpy(), p.numpy(), rtol=1e-12, atol=1e-12)
    assert opt.param_groups[1]["bs"] == 16.0 and opt.param_groups[1]["rho"] == 0.2


def _estimated() -> tuple[Any, Any]:
    """The class's example: one parameter with a Hessian estimate and a gradient."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = ut.SophiaG([w], lr=0.1, rho=1.0, weight_decay=0.0)
    w.grad = torch.tensor([2.0, 20.0], dtype=torch.float64)
    opt.update_hessian()
    w.grad = torch.tensor([2.0, -4.0], dtype=torch.float64)
    return w, opt


@pytest.mark.parametrize("bad", [0, -3, "x", None, float("nan")])
def test_a_refused_bs_leaves_the_groups_and_state_as_they_were(bad: Any) -> None:
    w, opt = _estimated()
    opt.step(bs=1)
    before, saved = w.detach().clone(), opt.state_dict()
    with pytest.raises((ValueError, TypeError), match=r"SophiaG: step\(bs=\.\.\.\) must be"):
        opt.step(bs=bad)
    assert opt.param_groups[0]["bs"] == 1
    after = opt.state_dict()
    assert after["param_groups"] == saved["param_groups"]
    assert torch.equal(after["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])
    assert torch.equal(w.detach(), before)
    # a refusal after bs was taken (a sparse gradient's) leaves it too
    emb = torch.nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    opt = ut.SophiaG(emb.parameters())
    with pytest.raises(RuntimeError, match="SophiaG does not support sparse gradients"):
        opt.step(bs=7)
    assert opt.param_groups[0]["bs"] == 5120


def test_step_hooks_see_the_call_as_given_and_may_change_bs() -> None:
    w, opt = _estimated()
    seen: list[tuple[Any, ...]] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", args, kwargs)))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", args, kwargs)))

    def closure() -> Any:
        return torch.tensor(3.0)

    assert float(opt.step(closure=closure, bs=64)) == 3.0
    assert seen == [("pre", (opt,), {"closure": closure, "bs": 64}),
                    ("post", (opt,), {"closure": closure, "bs": 64})]
    assert opt.param_groups[0]["bs"] == 64
    seen.clear()
    opt.step()
    assert seen == [("pre", (opt,), {}), ("post", (opt,), {})]
    assert opt.param_groups[0]["bs"] == 5120
    # a pre-hook's new arguments are the step's (torch's hook API): bs=1 is the example's step
    w, opt = _estimated()
    opt.register_step_pre_hook(lambda o, args, kwargs: (args, {**kwargs, "bs": 1}))
    opt.step(bs=64)
    assert opt.param_groups[0]["bs"] == 1
    np.testing.assert_allclose(w.detach().numpy(), [0.9, -1.9965], rtol=1e-12)
