"""torch tensors through the functional API (no uniopt.torch): gradients from
``torch.autograd.grad`` or from ``.grad``, pure and in-place updates, against torch.optim on the
same model; dtype, device and autograd status preserved, and no autograd graph recorded."""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import uniopt as uo  # noqa: E402
from uniopt.fast import cpu  # noqa: E402

STEPS = 100
# float64: operation order only (measured 1.7e-16). float32: torch's vectorised sqrt is not
# correctly rounded (test_backends.py), so single elements may differ by an ulp (measured 1)
TOL = {torch.float64: 1e-12, torch.float32: 8 * 2**-23}


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).to(dtype)


def _batch(k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    x = torch.randn(16, 6, generator=g, dtype=dtype)
    return x, torch.sin(x.sum(1, keepdim=True))


def _loss(model: torch.nn.Module, k: int, dtype: torch.dtype) -> torch.Tensor:
    x, y = _batch(k, dtype)
    return torch.mean((model(x) - y) ** 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("style", ["autograd.grad", ".grad", "pure"])
def test_functional_api_on_a_torch_model_matches_torch_optim(style: str, dtype) -> None:  # type: ignore[no-untyped-def]
    ours, theirs = _model(dtype), _model(dtype)
    params = dict(ours.named_parameters())
    state = uo.setup(uo.adam(lr=1e-2, weight_decay=1e-3), params)
    opt = torch.optim.Adam(theirs.parameters(), lr=1e-2, weight_decay=1e-3, foreach=False)
    originals = list(ours.parameters())
    for k in range(STEPS):
        loss = _loss(ours, k, dtype)
        if style == "autograd.grad":  # a flat list in trainables order
            grads = list(torch.autograd.grad(loss, uo.trainables(params)))
            state = uo.update_(state, params, grads)
        elif style == ".grad":  # a tree shaped like params
            ours.zero_grad()
            loss.backward()
            state = uo.update_(state, params, {n: p.grad for n, p in params.items()})
        else:  # pure: new leaf tensors, put back into the module
            grads = list(torch.autograd.grad(loss, uo.trainables(params)))
            old = params
            state, params = uo.update(state, params, grads)
            for n, p in params.items():
                assert p is not old[n] and p.is_leaf and p.requires_grad and p.grad_fn is None
            with torch.no_grad():
                for n, p in ours.named_parameters():
                    p.copy_(params[n])
            params = dict(ours.named_parameters())
        opt.zero_grad()
        _loss(theirs, k, dtype).backward()
        opt.step()
        with torch.no_grad():
            for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
                err = float((a - b).abs().max()) / max(1.0, float(b.abs().max()))
                assert err <= TOL[dtype], (k, err)
    for p, o in zip(ours.parameters(), originals, strict=True):
        assert p is o and p.dtype == dtype and p.requires_grad
    for slots in state.slots.values():
        assert all(not s.requires_grad and s.dtype == dtype for s in slots)


def test_the_step_records_no_autograd_graph() -> None:
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    frozen = torch.randn(4, dtype=torch.float64)  # a tensor that never required grad
    state = uo.setup(uo.chain(uo.weight_decay(0.1), uo.sgd(lr=0.1, momentum=0.9)), [w, frozen])
    g = [torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)]
    state, (w2, f2) = uo.update(state, [w, frozen], g)
    assert w2.grad_fn is None and w2.is_leaf and w2.requires_grad
    assert not f2.requires_grad
    state = uo.update_(state, [w, frozen], g)
    assert w.grad_fn is None and w.is_leaf
    (w * 2).sum().backward()  # w is still an ordinary leaf
    assert w.grad is not None


@pytest.mark.parametrize("rule", [uo.mechanize(uo.adam(lr=0.1)),
                                  uo.partition({"a": uo.mechanize(uo.sgd(lr=0.1)),
                                                "b": uo.adam(lr=0.1)},
                                               lambda path, leaf: "a" if leaf.ndim else "b")],
                         ids=["mechanize", "partition"])
def test_a_combinators_pure_step_hands_back_leaves_that_require_grad_as_before(
        rule: uo.Transform) -> None:
    """mechanize writes its new params itself, outside autograd: they required no grad, and the
    next loss had no gradient to take. (skip_nonfinite, accumulate, masked and freeze hand back
    the leaves their inner rule's own step made, which already require grad as before: no
    case of theirs would fail without the fix.)"""
    w, b = torch.randn(2, 3, requires_grad=True), torch.randn((), requires_grad=True)
    frozen = torch.randn(3)
    state = uo.setup(rule, [w, b, frozen])
    state, new = uo.update(state, [w, b, frozen], [torch.ones(2, 3), torch.ones(()),
                                                   torch.ones(3)])
    assert [(x.is_leaf, x.requires_grad, x.grad_fn) for x in new] == \
        [(True, True, None), (True, True, None), (True, False, None)]


def test_device_is_preserved() -> None:
    """On the meta device (shapes only) nothing may be created on the default device."""
    params = {"w": torch.empty(3, 2, device="meta"), "b": torch.empty(2, device="meta")}
    state = uo.setup(uo.adamw(lr=1e-3), params)
    grads = {k: torch.empty_like(v) for k, v in params.items()}
    state, new = uo.update(state, params, grads)
    assert all(v.device.type == "meta" for v in new.values())
    assert all(s.device.type == "meta" for v in state.slots.values() for s in v)



@pytest.mark.parametrize("n", [20_000, 10], ids=["compiled", "reference"])
def test_an_update_in_place_is_seen_by_autograd(n: int) -> None:
    """As after torch's own in-place updates, a graph that saved a parameter raises on
    ``backward()`` once ``update_`` has written it: on the compiled path (which writes through
    NumPy views, out of autograd's sight) as on the reference path."""
    w = torch.nn.Parameter(torch.ones(n))
    y = (w * w).sum()
    state = uo.setup(uo.sgd(lr=0.1), [w])
    before = cpu.STEPS
    uo.update_(state, [w], [torch.ones(n)])
    assert cpu.STEPS - before == (n >= cpu.MIN_SIZE)  # the path the case is named after
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_func_grad_through_a_step_needs_tracked_and_says_so() -> None:
    """``torch.func.grad`` over a function that steps with ``uo.update``: outside
    ``uniopt.backend.tracked()`` the step is not recorded, and that is said (a derivative of 0
    would be wrong silently); inside it the derivative is the step's, 1.28 w for SGD of lr 0.1
    on |w|^2."""
    from uniopt import backend

    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def meta(w: torch.Tensor, record: bool) -> torch.Tensor:
        with backend.tracked() if record else contextlib.nullcontext():
            state = uo.setup(uo.sgd(lr=0.1), [w])
            _, (w1,) = uo.update(state, [w], [2 * w])
        return (w1**2).sum()

    with pytest.raises(TypeError, match=r"uniopt steps outside autograd: .* uniopt.backend."
                                        r"tracked\(\)"):
        torch.func.grad(meta)(w0, False)
    torch.testing.assert_close(torch.func.grad(meta)(w0, True), 1.28 * w0, rtol=1e-15, atol=0)


def test_func_grad_through_the_gradients_of_a_step_needs_tracked_and_says_so() -> None:
    """The derivative that flows into a step through its gradients alone (here a scale of
    them), the parameters taking none: outside ``tracked()`` it came back 0, silently; now
    refused, naming the gradient. Inside, it is the step's: -lr * sum(g0) for
    SGD. Outside any transform, a gradient that requires grad (``backward(create_graph=True)``)
    steps as torch.optim's, unrecorded."""
    from uniopt import backend

    g0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def moved(scale: torch.Tensor, record: bool) -> torch.Tensor:
        with backend.tracked() if record else contextlib.nullcontext():
            p = [torch.zeros(3, dtype=torch.float64)]
            _, (p1,) = uo.update(uo.setup(uo.sgd(lr=0.1), p), p, [scale * g0])
        return p1.sum()

    with pytest.raises(TypeError, match=r"gradient for params\[0\] carries a torch.func "
                                        r"derivative: uniopt steps outside autograd"):
        torch.func.grad(moved)(torch.tensor(1.0, dtype=torch.float64), False)
    torch.testing.assert_close(torch.func.grad(moved)(torch.tensor(1.0, dtype=torch.float64), True),
                               -0.1 * g0.sum(), rtol=1e-15, atol=0)
    w = torch.ones(3, requires_grad=True)
    (g,) = torch.autograd.grad((w ** 3).sum(), [w], create_graph=True)
    uo.update_(uo.setup(uo.sgd(lr=0.1), [w]), [w], [g])
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.7))


# torch's forward mode scripts its own decompositions at first use (torch.jit.script, deprecated)
_TORCH_SCRIPTS = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _sgd_after(lr: torch.Tensor, record: bool = True, clip: bool = False,
               steps: int = 3) -> torch.Tensor:
    """The loss |p|^2 after ``steps`` steps of SGD with momentum 0.9 (after a global-norm
    clip to 1) of lr ``lr`` on fixed gradients, from fixed params."""
    from uniopt import backend

    p = [torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)]
    gs = [torch.tensor([3.0, -4.0, 7.0], dtype=torch.float64) * (k + 1) for k in range(steps)]
    rule = uo.sgd(lr=lr, momentum=0.9)
    state = uo.setup(uo.chain(uo.clip_by_global_norm(1.0), rule) if clip else rule, p)
    with backend.tracked() if record else contextlib.nullcontext():
        for g in gs:
            state, p = uo.update(state, p, [g])
    return (p[0] ** 2).sum()


def _sgd_by_hand(lr: torch.Tensor, clip: bool = False, steps: int = 3) -> torch.Tensor:
    p = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    m = torch.zeros(3, dtype=torch.float64)
    for k in range(steps):
        g = torch.tensor([3.0, -4.0, 7.0], dtype=torch.float64) * (k + 1)
        if clip:
            g = g * torch.clamp(1.0 / torch.linalg.vector_norm(g), max=1.0)
        m = g if k == 0 else 0.9 * m + g
        p = p - lr * m
    return (p ** 2).sum()


@_TORCH_SCRIPTS
@pytest.mark.parametrize("clip", [False, True], ids=["sgd", "clipped"])
def test_every_torch_func_transform_through_a_tensor_lr_inside_tracked(clip: bool) -> None:
    """Derivatives with respect to a tensor lr through three recorded steps, as the same SGD
    written in torch: forward mode (jvp, jacfwd) came back 0, the lr made a number where it
    did not require grad; vmap over lrs failed (.item() under vmap); and a global-norm clip
    read its norm as a number, a constant to every derivative (-18.8 where -21.3)."""
    lr = torch.tensor(0.05, dtype=torch.float64)
    want = torch.func.grad(lambda x: _sgd_by_hand(x, clip))(lr)
    assert want != 0
    after = functools.partial(_sgd_after, clip=clip)
    for got in (torch.func.grad(after)(lr), torch.func.jacrev(after)(lr),
                torch.func.jacfwd(after)(lr),
                torch.func.jvp(after, (lr,), (torch.ones((), dtype=torch.float64),))[1]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    lrs = torch.tensor([0.01, 0.05], dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(after)(lrs),
                               torch.stack([_sgd_by_hand(x, clip) for x in lrs]),
                               rtol=1e-12, atol=0)


@_TORCH_SCRIPTS
def test_a_forward_mode_dual_lr_carries_its_tangent_through_a_tracked_step() -> None:
    """``torch.autograd.forward_ad``: a dual lr (no requires_grad) was made a number at
    set-up, and the step's tangent lost; it is -g for SGD."""
    import torch.autograd.forward_ad as fwad

    from uniopt import backend

    g = torch.tensor([0.3, 0.1, -0.4], dtype=torch.float64)
    with fwad.dual_level():
        lr = fwad.make_dual(torch.tensor(0.1, dtype=torch.float64),
                            torch.tensor(1.0, dtype=torch.float64))
        p = [torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)]
        with backend.tracked():
            _, (p1,) = uo.update(uo.setup(uo.sgd(lr=lr), p), p, [g])
        torch.testing.assert_close(fwad.unpack_dual(p1).tangent, -g, rtol=0, atol=0)


def test_a_torch_func_derivative_through_a_hyperparameter_or_slot_needs_tracked() -> None:
    """Outside ``tracked()`` the derivative through a tensor lr or a state slot came back 0,
    silently: refused now, naming what carries it."""
    lr = torch.tensor(0.05, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"scale_by_lr's lr carries a torch.func derivative: "
                                        r"uniopt steps outside autograd"):
        torch.func.grad(functools.partial(_sgd_after, record=False))(lr)

    def from_slot(m: torch.Tensor) -> torch.Tensor:
        p = [torch.zeros(3, dtype=torch.float64)]
        state = uo.setup(uo.adam(lr=0.1), p)
        state = dataclasses.replace(
            state, slots={**state.slots, "scale_by_adam.exp_avg": [m]})
        _, (p1,) = uo.update(state, p, [torch.ones(3, dtype=torch.float64)])
        return p1.sum()

    with pytest.raises(TypeError, match=r"the state's scale_by_adam.exp_avg of params\[0\] "
                                        r"carries a torch.func derivative"):
        torch.func.grad(from_slot)(torch.ones(3, dtype=torch.float64))

    def from_whole_tree_state(d: torch.Tensor) -> torch.Tensor:
        p = [torch.ones(3, dtype=torch.float64)]
        state = uo.setup(uo.dog(), p)
        state = dataclasses.replace(state, tree_states={
            "scale_by_dog": {**state.tree_states["scale_by_dog"], "max_dist": d}})
        _, (p1,) = uo.update(state, p, [torch.ones(3, dtype=torch.float64)])
        return p1.sum()

    with pytest.raises(TypeError, match=r"the state of scale_by_dog carries a torch.func "
                                        r"derivative"):
        torch.func.grad(from_whole_tree_state)(torch.tensor(1e-3, dtype=torch.float64))


def test_vmap_alone_refuses_no_autograd_tensor_and_a_constant_is_checked_in_grad() -> None:
    """vmap differentiates nothing: a gradient or a learned lr that requires autograd's grad
    steps in it as outside any transform (the refusal of a torch.func derivative fired on
    them). Inside ``torch.func.grad`` a tensor made there is wrapped by functorch, and a bool
    lr made there passed set-up's check: it is refused as outside."""
    w = torch.nn.Parameter(torch.tensor([0.5, 0.7], dtype=torch.float64))
    lr = torch.nn.Parameter(torch.tensor(0.1, dtype=torch.float64))

    def step(p: torch.Tensor) -> torch.Tensor:
        _, (p1,) = uo.update(uo.setup(uo.sgd(lr=lr), [p]), [p], [w * 2])
        return p1

    ps = torch.ones(2, 2, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(step)(ps).detach(),
                               torch.stack([step(p) for p in ps]).detach(), rtol=0, atol=0)

    def with_bool_lr(x: torch.Tensor) -> torch.Tensor:
        uo.sgd(lr=torch.tensor(True))
        return x.sum()

    with pytest.raises(TypeError, match="sgd: lr must be a number or a schedule"):
        torch.func.grad(with_bool_lr)(torch.ones(2))


def test_a_sparse_gradient_is_refused_naming_the_leaf() -> None:
    params = {"w": torch.ones(3), "e": torch.ones(4, 2)}
    grads = {"w": torch.ones(3), "e": torch.ones(4, 2).to_sparse()}
    state = uo.setup(uo.adam(lr=0.1), params)
    for step in (uo.update, uo.update_):
        with pytest.raises(TypeError, match=r"gradient for params\['e'\] is a torch.sparse_coo "
                                            r"tensor; uniopt.update and update_ take dense "
                                            r"gradients \(g.to_dense\(\)\); sparse ones go to "
                                            r"uniopt.torch's SGD, Adagrad and SparseAdam, or to "
                                            r"uniopt.torch.Optimizer\(params, rule, "
                                            r"sparse_rows=True\)"):
            step(state, params, grads)
    assert torch.equal(params["w"], torch.ones(3)) and state.step == 0


def test_a_compiled_training_step_calls_the_step_through_compiler_disable() -> None:
    """docs/jax.md's recipe for ``torch.compile``: the step called through
    ``torch.compiler.disable`` breaks the graph and steps as it does eagerly, bit for bit."""
    def run(compiled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        params = dict(model.named_parameters())
        state = [uo.setup(uo.adam(lr=1e-2), params)]
        step = torch.compiler.disable(uo.update_)

        def train(x: torch.Tensor) -> None:
            loss = model(x).pow(2).mean()
            grads = torch.autograd.grad(loss, uo.trainables(params))
            state[0] = step(state[0], params, list(grads))

        fn = torch.compile(train, backend="eager") if compiled else train
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            fn(torch.randn(8, 4, generator=g))
        return [p.detach().clone() for p in params.values()]

    assert all(map(torch.equal, run(True), run(False)))


# rules whose state starts as the parameters (schedule-free's z, MADGRAD's x0, lookahead's slow
# weights, COCOB's and DoG's p0), or that take a norm of a leaf (Adafactor) or of a distance
# that starts at 0 (DoG), beside AdamW
_FROM_PARAMS = {
    "schedule_free_sgd": lambda: uo.schedule_free_sgd(lr=0.1),
    "madgrad": lambda: uo.madgrad(lr=0.1),
    "cocob": lambda: uo.cocob(),
    "mechanize": lambda: uo.mechanize(uo.sgd(lr=0.1)),
    "lookahead": lambda: uo.lookahead(uo.sgd(lr=0.1), k=2),
    "dog": lambda: uo.dog(),
    "adafactor": lambda: uo.adafactor(lr=0.01),
    "adamw": lambda: uo.adamw(lr=0.1),
}


@_TORCH_SCRIPTS
@pytest.mark.parametrize("name", sorted(_FROM_PARAMS))
def test_a_recorded_step_differentiates_with_respect_to_the_initial_params(name: str) -> None:
    """Three recorded steps (``tracked()``) from ``p0`` on fixed gradients: the derivative of
    a loss of the last params with respect to ``p0`` is finite differences' (``gradcheck``).
    A state copied from the params was detached (schedule-free: 0 where -4.4, lookahead half,
    MADGRAD 27% off); DoG's came back NaN (the root of a distance that is 0 at the first step,
    times max's 0), as Mechanic's did (the root of its v, 0 at the first step); Adafactor's
    norms of each leaf were taken as numbers on torch (1.4% off, and its lr's derivative 0
    under forward mode), and then as roots of sums of squares (NaN for a leaf of zeros)."""
    from uniopt import backend

    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(3)]

    def loss(p0: torch.Tensor, lr: torch.Tensor | None = None) -> torch.Tensor:
        rule = _FROM_PARAMS[name]() if lr is None else uo.adafactor(lr=lr)
        p = [p0.clone()]
        with backend.tracked():
            state = uo.setup(rule, p)
            for g in gs:
                state, p = uo.update(state, p, [g])
        return (p[0] ** 2).sum()

    p0 = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (p0,))
    (d,) = torch.autograd.grad(loss(p0), p0)
    assert torch.isfinite(d).all() and d.abs().sum() > 0
    if name == "adafactor":  # a leaf of zeros (a bias as initialised): its step is eps2's
        zeros = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(loss, (zeros,))
    if name == "adafactor":
        lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: loss(p0.detach(), x), (lr,))
        (want,) = torch.autograd.grad(loss(p0.detach(), lr), lr)
        got = torch.func.jvp(lambda x: loss(p0.detach(), x), (lr.detach(),),
                             (torch.ones((), dtype=torch.float64),))[1]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


_HOST_NUMBERS = {
    "clip_by_global_norm": lambda: uo.chain(uo.clip_by_global_norm(0.1), uo.sgd(lr=0.5)),
    "clip_by_norm": lambda: uo.chain(uo.clip_by_norm(0.1), uo.sgd(lr=0.5)),
    "adafactor": lambda: uo.adafactor(lr=0.1),
    "adam": lambda: uo.adam(lr=0.1),
}


@pytest.mark.parametrize("name", sorted(_HOST_NUMBERS))
def test_forward_mode_and_vmap_outside_a_recorded_step_keep_the_norms_derivative(
        name: str) -> None:
    """A step reads a global norm (clip_by_global_norm, clip_by_norm) or Adafactor's norms of
    each leaf as Python floats on torch: under ``torch.func.jvp``/``jacfwd`` outside
    ``tracked()`` the tangent through them was dropped (a derivative 8% off, silently), and
    ``torch.func.vmap`` raised torch's ``.item()`` error. Inside a transform they stay
    tensors: forward mode gives the recorded step's derivative and finite differences', and a
    vmapped step is each model's own step."""
    from uniopt import backend

    rule = _HOST_NUMBERS[name]()
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, generator=gen, dtype=torch.float64)
    t = torch.ones(5, dtype=torch.float64)

    def after(p: torch.Tensor) -> torch.Tensor:
        state = uo.setup(rule, [p])
        state, (q,) = uo.update(state, [p], [p ** 3 + 1])
        return (q ** 2).sum()

    with backend.tracked():
        want = torch.func.jvp(after, (p0,), (t,))[1]
    h = 1e-6
    fd = (after(p0 + h * t) - after(p0 - h * t)) / (2 * h)
    torch.testing.assert_close(want, fd, rtol=1e-7, atol=0)
    torch.testing.assert_close(torch.func.jvp(after, (p0,), (t,))[1], want, rtol=1e-13, atol=0)
    torch.testing.assert_close(torch.func.jacfwd(after)(p0) @ t, want, rtol=1e-13, atol=0)

    ps = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)
    gs = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)

    def step(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        state = uo.setup(rule, [p])
        return uo.update(state, [p], [g])[1][0]

    each = torch.stack([step(ps[i], gs[i]) for i in range(4)])
    torch.testing.assert_close(torch.func.vmap(step)(ps, gs), each, rtol=1e-14, atol=0)


def test_a_state_made_from_params_that_require_grad_keeps_no_graph() -> None:
    """Outside a recorded step, a state made from ``nn.Parameter``s holds no tensor in their
    graph: DoG's first distance did (and torch 2.13's ``asarray`` warned that it now keeps
    the graph)."""
    import warnings

    p = [torch.nn.Parameter(torch.ones(3, dtype=torch.float64))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = uo.setup(uo.dog(), p)
        state = uo.update_(state, p, [torch.ones(3, dtype=torch.float64)])
    import optree

    held = [x for x in optree.tree_leaves((state.slots, state.tree_states))
            if isinstance(x, torch.Tensor)]
    assert held and not any(x.requires_grad for x in held)
    assert not p[0].detach().equal(torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("rule", ["polyak_sgd", "momo"])
def test_a_torch_loss_steps_numpy_params_as_a_number_does(rule: str) -> None:
    """``value=`` a 0-d tensor beside NumPy params: the same step as the number (a recorded
    step's loss, kept in autograd's graph, was turned into a tensor of NumPy's dtype)."""
    make = {"polyak_sgd": lambda: uo.polyak_sgd(max_learning_rate=1.0),
            "momo": lambda: uo.momo(lr=0.1)}[rule]
    out = []
    for value in (2.5, torch.tensor(2.5, dtype=torch.float64),
                  torch.tensor(2.5, dtype=torch.float64, requires_grad=True)):
        p = [np.array([1.0, 2.0])]
        state = uo.setup(make(), p)
        state, p = uo.update(state, p, [np.array([0.5, -0.5])], value=value)
        out.append(p[0])
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])


def test_a_recorded_step_of_an_8_bit_state_is_refused() -> None:
    """A state kept in 8 bits is rounded to its codes at every step: the derivative through a
    recorded step of it was accepted, and came out about 0.1% off finite differences.
    Refused now, by the functional API in ``tracked()`` and by ``differentiable=True``,
    nothing written."""
    import uniopt.torch as ut
    from uniopt import backend

    p = [torch.linspace(-1, 1, 8, dtype=torch.float64)]
    state = uo.setup(uo.adam(lr=0.1), p, state_dtype="q8")
    with backend.tracked(), pytest.raises(ValueError, match=r"^a recorded step .* state kept "
                                                            r"in 8 bits \(state_dtype='q8'\)"):
        uo.update_(state, p, [torch.ones(8, dtype=torch.float64)])
    assert torch.equal(p[0], torch.linspace(-1, 1, 8, dtype=torch.float64)) and state.step == 0
    w = torch.linspace(-1, 1, 8, dtype=torch.float64)
    opt = ut.Adam([w], lr=0.1, differentiable=True, state_dtype="q8")
    w.grad = torch.ones(8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^param group 0: a recorded step"):
        opt.step()
    assert torch.equal(w, torch.linspace(-1, 1, 8, dtype=torch.float64)) and not opt.state
    # nothing is recorded (and nothing refused) under no_grad, or for arrays of another
    # library, which tracked() leaves as they are (a NumPy step there raised AttributeError,
    # 8-bit or not)
    with backend.tracked():
        with torch.no_grad():
            state = uo.update_(state, p, [torch.ones(8, dtype=torch.float64)])
        for dtype in (None, "q8"):
            a = [np.linspace(-1, 1, 8)]
            uo.update_(uo.setup(uo.adam(lr=0.1), a, state_dtype=dtype), a, [np.ones(8)])
            assert not np.array_equal(a[0], np.linspace(-1, 1, 8))
    assert state.step == 1
