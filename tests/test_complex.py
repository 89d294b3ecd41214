"""Complex parameters, as torch takes them: a complex number is the pair of its real and
imaginary parts, each updated as a real parameter (torch's ``view_as_real``); the slots stay
complex, as torch keeps them. Every rule torch runs on complex parameters, through the functional
API on NumPy, torch and JAX arrays (in place and pure), against torch's class for 20 steps in
complex128: the same arithmetic on the same pairs, so float64 rounding (1e-12 of the largest
entry) is the tolerance. uniopt.torch's classes on complex tensors: tests/test_torch_optim_db.py.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import uniopt as uo  # noqa: E402

# (uniopt rule, torch class, the values both take); initial_accumulator_value fills both parts
RULES = [
    (uo.sgd, "SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    (uo.adam, "Adam", {"lr": 0.1, "weight_decay": 0.1, "amsgrad": True}),
    (uo.adamw, "AdamW", {"lr": 0.1}),
    (uo.adagrad, "Adagrad", {"lr": 0.1, "initial_accumulator_value": 0.5, "lr_decay": 0.01}),
    (uo.rmsprop, "RMSprop", {"lr": 0.01, "centered": True, "momentum": 0.5}),
    (uo.adadelta, "Adadelta", {"lr": 0.5, "weight_decay": 0.1}),
    (uo.adamax, "Adamax", {"lr": 0.05}),
    (uo.nadam, "NAdam", {"lr": 0.05, "decoupled_weight_decay": True, "weight_decay": 0.1}),
    (uo.radam, "RAdam", {"lr": 0.05}),
    (uo.asgd, "ASGD", {"lr": 0.05, "t0": 5.0}),
]


def _library(name: str) -> Any:
    if name == "torch":
        return torch.tensor
    if name == "jax":
        jax = pytest.importorskip("jax")
        if not jax.config.read("jax_enable_x64"):
            pytest.skip("complex128 needs jax_enable_x64")
        return jax.numpy.asarray
    return np.array


@pytest.fixture(scope="module", autouse=True)
def _double() -> Any:
    """complex128 on JAX needs x64; torch computes NAdam's and ASGD's per-parameter numbers in
    its default dtype, which float64 makes as exact as uniopt's (test_parity_torch does so)."""
    jax = None
    try:
        import jax
    except ImportError:
        pass
    x64 = jax is not None and jax.config.read("jax_enable_x64")
    if jax is not None:
        jax.config.update("jax_enable_x64", True)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)
    if jax is not None:
        jax.config.update("jax_enable_x64", x64)


@pytest.mark.parametrize("library", ["numpy", "torch", "jax"])
@pytest.mark.parametrize(("rule", "cls", "kw"), RULES, ids=[r[1] for r in RULES])
def test_complex_params_step_as_torchs_classes(rule: Any, cls: str, kw: dict[str, Any],
                                               library: str) -> None:
    conv = _library(library)
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal((3, 4)) + 1j * rng.standard_normal((3, 4))
    params = {"w": conv(p0), "b": conv(rng.standard_normal(4))}  # a real leaf beside it
    theirs = [torch.nn.Parameter(torch.tensor(np.asarray(v))) for v in params.values()]
    opt = getattr(torch.optim, cls)(theirs, **kw)
    state = uo.setup(rule(**kw), params)
    assert state.slots and all(s.dtype == params["w"].dtype
                               for v in state.slots.values() for s in v[1:])
    for k in range(20):
        g = {"w": rng.standard_normal((3, 4)) + 1j * rng.standard_normal((3, 4)),
             "b": rng.standard_normal(4)}
        if library == "jax" or k % 2:
            state, params = uo.update(state, params, {n: conv(x) for n, x in g.items()})
        else:
            state = uo.update_(state, params, {n: conv(x) for n, x in g.items()})
        for t, x in zip(theirs, g.values(), strict=True):
            t.grad = torch.tensor(x)
        opt.step()
        for t, v in zip(theirs, params.values(), strict=True):
            ref = t.detach().numpy()
            assert np.asarray(v).dtype == ref.dtype
            assert np.abs(np.asarray(v) - ref).max() <= 1e-12 * np.abs(ref).max(), (cls, k)


def test_complex_errors_name_the_problem() -> None:
    p = [np.ones((4, 4), complex)[:, ::2]]  # strided: no real view to write through
    state = uo.setup(uo.adam(), p)
    before = p[0].copy()
    with pytest.raises(TypeError, match=r"update_ cannot write params\[0\] in place: a complex "
                                        "array with strides .* has no real view"):
        uo.update_(state, p, [np.ones((4, 2), complex)])
    np.testing.assert_array_equal(p[0], before)
    state, new = uo.update(state, p, [np.ones((4, 2), complex)])  # pure: a copy serves
    assert new[0].dtype == complex and not np.array_equal(new[0], before)
    with pytest.raises(ValueError, match="state_dtype='float32' is for real params"):
        uo.setup(uo.adam(), [np.ones(2, np.complex64)], state_dtype="float32")
    with pytest.raises(TypeError, match="has dtype int64; uniopt updates floating arrays"):
        uo.setup(uo.adam(), [np.ones(2, np.int64)])


@pytest.mark.parametrize("library", ["numpy", "jax"])
def test_the_optax_protocol_steps_complex_params_as_update_does(library: str) -> None:
    """``rule.update`` (optax's protocol, as flax and equinox call it) takes a complex leaf as
    ``uo.update`` does, as the pair of its parts: the same numbers over several steps, slots
    included, a global norm over a chain too (it had updated no imaginary part for Adam)."""
    make = _library(library)
    rng = np.random.default_rng(7)
    p = {"z": make(rng.standard_normal(3) + 1j * rng.standard_normal(3)),
         "r": make(rng.standard_normal(2))}
    for rule in (uo.adam(lr=0.1, amsgrad=True), uo.rmsprop(lr=0.01, centered=True),
                 uo.lion(lr=0.1), uo.chain(uo.clip_by_global_norm(0.5), uo.adamw(lr=0.1))):
        ours, theirs = uo.setup(rule, p), rule.init(p)
        q, w = p, p
        for _ in range(4):
            g = {k: make(rng.standard_normal(v.shape) * (1 + 1j if k == "z" else 1))
                 for k, v in p.items()}
            ours, q = uo.update(ours, q, g)
            u, theirs = rule.update(g, theirs, w)
            w = {k: w[k] + u[k] for k in w}  # optax.apply_updates, staying NumPy on NumPy
        for k in p:
            assert w[k].dtype == q[k].dtype
            np.testing.assert_allclose(np.asarray(w[k]), np.asarray(q[k]), rtol=0, atol=1e-15)
        for key, slots in ours.slots.items():
            for a, b in zip(slots, theirs.slots[key], strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_optax_protocol_names_a_none_gradient() -> None:
    """optax's transforms refuse a None gradient too; the error names the leaf, and says that
    ``uo.update`` leaves such a leaf as it is."""
    p = {"w": np.ones(2), "b": np.ones(2)}
    for rule in (uo.adam(lr=0.1), uo.partition({"a": uo.sgd(lr=0.1), "b": uo.adam(lr=0.1)},
                                               {"w": "a", "b": "b"})):
        with pytest.raises(ValueError, match=r"the gradient of params\['b'\] is None; the optax "
                                             r"protocol updates every leaf"):
            rule.update({"w": np.ones(2), "b": None}, rule.init(p), p)


def _pair_tree(tree: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A tree's complex leaves as the real arrays of their pairs (torch's ``view_as_real``)."""
    return {k: (v.view(np.float64).reshape(*v.shape, 2) if np.iscomplexobj(v) else v).copy()
            for k, v in tree.items()}


COMBINED = {
    "partition": lambda: uo.partition({"a": uo.adam(lr=0.1), "s": uo.sgd(lr=0.1)},
                                      {"w": "a", "b": "s", "z": "a"}),
    "masked": lambda: uo.masked(uo.adam(lr=0.1), {"w": True, "b": False, "z": True}),
    "freeze": lambda: uo.freeze(uo.adamw(lr=0.1, weight_decay=0.1), ["b"]),
    "skip_nonfinite": lambda: uo.skip_nonfinite(uo.sgd(lr=0.1, momentum=0.9)),
    "accumulate": lambda: uo.accumulate(uo.adam(lr=0.1), 2),
    "nested": lambda: uo.skip_nonfinite(uo.partition(
        {"a": uo.accumulate(uo.adam(lr=0.1), 2), "s": uo.sgd(lr=0.1)},
        {"w": "a", "b": "s", "z": "s"})),
}


@pytest.mark.parametrize("inplace", [False, True], ids=["update", "update_"])
@pytest.mark.parametrize("name", list(COMBINED))
def test_combinators_route_complex_leaves_to_members_that_step_them_as_pairs(
        name: str, inplace: bool) -> None:
    """A combinator sees the params' tree, complex leaves and all (it routes them by their
    paths; the members were handed the flat list of the pairs, and failed on their own states,
    which hold complex slots); each member steps its leaves as their real pairs. Six steps
    equal the same rule's on the tree of pairs, bit for bit, pure and in place, and through
    the optax protocol (to an ulp: its ``p + (-u)`` against a finish that fuses ``p - u``)."""
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal(3) + 1j * rng.standard_normal(3),
              "b": rng.standard_normal(2),
              "z": rng.standard_normal((2, 2)) + 1j * rng.standard_normal((2, 2))}
    grads = [{k: rng.standard_normal(v.shape) + (1j * rng.standard_normal(v.shape)
                                                 if np.iscomplexobj(v) else 0)
              for k, v in params.items()} for _ in range(6)]
    state, pairs_state = uo.setup(COMBINED[name](), params), None
    pairs = _pair_tree(params)
    pairs_state = uo.setup(COMBINED[name](), pairs)
    protocol = COMBINED[name]()
    opt_state, opt_params = protocol.init(params), {k: v.copy() for k, v in params.items()}
    for g in grads:
        if inplace:
            state = uo.update_(state, params, g)
        else:
            state, params = uo.update(state, params, g)
        pairs_state, pairs = uo.update(pairs_state, pairs, _pair_tree(g))
        updates, opt_state = protocol.update(g, opt_state, opt_params)
        opt_params = {k: opt_params[k] + updates[k] for k in params}
    for k, v in _pair_tree(params).items():
        assert v.tobytes() == pairs[k].tobytes(), (name, k)
        np.testing.assert_allclose(_pair_tree(opt_params)[k], pairs[k], rtol=0, atol=1e-15)


def test_a_combinator_beside_other_parts_or_mechanize_refuses_complex_params_at_set_up() -> None:
    """Beside other parts a combinator would see the flat list of the pairs, not the params'
    tree; mechanize's inner products are of real vectors (complex ones gave NaN)."""
    params = {"w": np.ones(2) + 1j, "b": np.zeros(2)}
    mixed = uo.chain(uo.clip_by_global_norm(1.0), uo.partition(
        {"a": uo.adam(lr=0.1), "s": uo.sgd(lr=0.1)}, {"w": "a", "b": "s"}))
    with pytest.raises(TypeError, match=r"partition cannot take beside the chain's other parts"):
        uo.setup(mixed, params)
    with pytest.raises(TypeError, match=re.escape(
            "setup: mechanize takes real params only (Part.real_only); params['w'] is complex")):
        uo.setup(uo.mechanize(uo.adam(lr=0.1)), params)
    # (its own flag, read through a combinator that holds it: members() opens both)
    with pytest.raises(TypeError, match=r"mechanize takes real params only"):
        uo.setup(uo.partition({"m": uo.mechanize(uo.adam(lr=0.1)), "s": uo.sgd(lr=0.1)},
                              {"w": "m", "b": "s"}), params)
    uo.setup(mixed, {"w": np.ones(2), "b": np.zeros(2)})  # real params: as before


def test_a_lazily_conjugated_torch_gradient_steps_as_its_resolved_values() -> None:
    """A gradient carrying torch's conjugate bit (``g.conj()``) steps as its resolved values,
    pure and in place, as ``torch.optim.SGD`` takes it (``view_as_real`` refused it, in
    torch's words); a conjugated parameter, which an in-place step would write through, is
    refused saying so."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, dtype=torch.complex128, generator=g)
    grad = torch.randn(4, dtype=torch.complex128, generator=g).conj()
    assert grad.is_conj()
    w = w0.clone().requires_grad_()
    theirs = torch.optim.SGD([w], lr=0.1)
    w.grad = grad
    theirs.step()
    rule = uo.sgd(lr=0.1)
    _, [pure] = uo.update(uo.setup(rule, [w0.clone()]), [w0.clone()], [grad])
    inplace = [w0.clone()]
    uo.update_(uo.setup(rule, inplace), inplace, [grad])
    assert torch.equal(pure, w.detach()) and torch.equal(inplace[0], w.detach())
    conj = [w0.clone().conj()]
    with pytest.raises(TypeError, match=r"a conjugated complex tensor .* has no real view to "
                                        r"write"):
        uo.update_(uo.setup(rule, conj), conj, [grad.resolve_conj()])


@pytest.mark.parametrize("make", [lambda: uo.adam(lr=0.1), lambda: uo.sgd(lr=0.1, momentum=0.9),
                                  lambda: uo.chain(uo.clip_by_global_norm(1.0), uo.adam(lr=0.1))],
                         ids=["adam", "sgd", "clip-adam"])
def test_a_0d_complex_numpy_param_steps_as_a_torch_one(make: Any) -> None:
    """A 0-d complex NumPy parameter failed every rule's first step (NumPy changes no 0-d
    array's itemsize, so it had no real view); as a torch tensor it stepped. Both ways, pure
    and in place, to the same numbers."""
    p, g = np.array(1.0 + 2.0j), np.array(0.5 - 1.0j)
    t = [torch.tensor(p)]
    st = uo.setup(make(), t)
    for _ in range(3):
        st, t = uo.update(st, t, [torch.tensor(g)])
    for pure in (True, False):
        q = [p.copy()]
        st = uo.setup(make(), q)
        for _ in range(3):
            if pure:
                st, q = uo.update(st, q, [g])
            else:
                st = uo.update_(st, q, [g])
        assert q[0].shape == () and q[0].dtype == np.complex128
        np.testing.assert_allclose(q[0], t[0].numpy(), rtol=1e-15, atol=0)


# parts whose arithmetic on a leaf is not that of its numbers one by one (a mean over some axes,
# a unit's norm, a count of elements), and optax's, which computes on the complex numbers
WHOLE_LEAF = {
    "centralize": (uo.centralize, "centralize", ()),
    "clip_by_block_rms": (uo.clip_by_block_rms, "clip_by_block_rms", (0.5,)),
    "adaptive_grad_clip": (uo.adaptive_grad_clip, "adaptive_grad_clip", (0.05, 1e-2)),
}


@pytest.mark.parametrize("way", ["numpy", "numpy-update_", "torch", "torch-update_", "jax-jit",
                                 "uniopt.torch", "protocol", "partition"])
@pytest.mark.parametrize("name", list(WHOLE_LEAF))
def test_parts_that_see_a_leaf_whole_take_a_complex_one_as_optax(name: str, way: str) -> None:
    """centralize, clip_by_block_rms and adaptive_grad_clip take a complex leaf as its complex
    numbers, as optax's do: the mean over a matrix's rows of complex numbers (a complex vector
    passes unchanged), the RMS over its numbers, each unit's norm over its own axes; the other
    parts see the pairs of their parts, as torch takes them. They had taken the pairs' axis
    as data: a complex vector centralized over its parts, the RMS over twice the elements, the
    units chosen from the pairs' shape. Three steps of each part before SGD, on every path
    (pure and in place, NumPy, torch, jitted JAX, the torch class, the optax protocol, a
    partition's member), equal optax's to float64 rounding; a real leaf beside them too."""
    optax = pytest.importorskip("optax")
    jax = pytest.importorskip("jax")
    make, theirs, args = WHOLE_LEAF[name]
    rng = np.random.default_rng(11)
    shapes = {"v": (3,), "m": (2, 3), "c": (2, 1, 2, 3), "x": (1, 2, 1, 1, 3), "s": (), "r": (2, 2)}

    def draw(k: str, s: tuple[int, ...]) -> np.ndarray:
        x = rng.standard_normal(s)
        return x if k == "r" else x + 1j * rng.standard_normal(s)

    p0 = {k: draw(k, s) for k, s in shapes.items()}
    grads = [{k: draw(k, s) * 3 for k, s in shapes.items()} for _ in range(3)]
    rule = uo.chain(make(*args), uo.sgd(lr=0.1))
    ref = optax.chain(getattr(optax, theirs)(*args), optax.sgd(0.1))
    w = {k: jax.numpy.asarray(v) for k, v in p0.items()}
    opt_state = ref.init(w)
    for g in grads:
        u, opt_state = ref.update({k: jax.numpy.asarray(v) for k, v in g.items()}, opt_state, w)
        w = optax.apply_updates(w, u)
    if way.startswith(("numpy", "torch")):
        conv = torch.tensor if way.startswith("torch") else np.array
        q = {k: conv(v) for k, v in p0.items()}
        state = uo.setup(rule, q)
        for g in grads:
            if way.endswith("update_"):
                state = uo.update_(state, q, {k: conv(v) for k, v in g.items()})
            else:
                state, q = uo.update(state, q, {k: conv(v) for k, v in g.items()})
    elif way == "jax-jit":
        q = {k: jax.numpy.asarray(v) for k, v in p0.items()}
        step = jax.jit(lambda s, p, g: uo.update(s, p, g))  # (its own cache)
        state = uo.setup(rule, q)
        for g in grads:
            state, q = step(state, q, {k: jax.numpy.asarray(v) for k, v in g.items()})
        assert step._cache_size() == 1
    elif way == "uniopt.torch":
        ts = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in p0.items()}
        import uniopt.torch as ut

        opt = ut.Optimizer(list(ts.values()), rule)
        for g in grads:
            for k, t in ts.items():
                t.grad = torch.tensor(g[k])
            opt.step()
        q = {k: t.detach() for k, t in ts.items()}
    elif way == "protocol":
        q = {k: v.copy() for k, v in p0.items()}
        opt_state = rule.init(q)
        for g in grads:
            u, opt_state = rule.update(g, opt_state, q)
            q = {k: q[k] + u[k] for k in q}
    else:
        part = uo.partition({"a": rule, "b": uo.sgd(lr=0.1)}, lambda path, _: "a")
        q = {k: v.copy() for k, v in p0.items()}
        state = uo.setup(part, q)
        for g in grads:
            state, q = uo.update(state, q, g)
    for k in shapes:
        ours, want = np.asarray(q[k]), np.asarray(w[k])
        assert ours.dtype == want.dtype, k
        np.testing.assert_allclose(ours, want, rtol=0, atol=1e-14, err_msg=f"{name} {way} {k}")


def test_whole_leaf_parts_on_complex_leaves_give_optaxs_numbers() -> None:
    """The numbers by hand: a complex vector passes centralize unchanged and a matrix loses
    each row's complex mean; the RMS of ``[3+4j]`` is 5; a vector is one unit of norm 5."""
    def step(part: Any, p: np.ndarray, g: np.ndarray) -> np.ndarray:
        state = uo.setup(uo.chain(part, uo.sgd(lr=1.0)), [p])
        return p - uo.update(state, [p.copy()], [g])[1][0]

    v = np.array([1 + 2j, 3, -1 - 1j])
    np.testing.assert_array_equal(step(uo.centralize(), np.zeros(3, complex), v), v)
    m = np.array([[1 + 1j, 3 + 5j], [2, 2 + 2j]])
    np.testing.assert_array_equal(step(uo.centralize(), np.zeros((2, 2), complex), m),
                                  [[-1 - 2j, 1 + 2j], [-1j, 1j]])
    np.testing.assert_allclose(step(uo.clip_by_block_rms(1.0), np.zeros(1, complex),
                                    np.array([3 + 4j])), [0.6 + 0.8j], rtol=1e-15)
    np.testing.assert_allclose(step(uo.adaptive_grad_clip(0.01, eps=1e-3), np.array([1, 0j]),
                                    np.array([3 + 4j, 0])), [0.006 + 0.008j, 0], rtol=1e-15)
