"""The shape of the house: the import graph points down, kernels keep their contract, the
compiled loops' cache key is the kernels' own source, and every kind of part runs."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pytest

import uniopt as uo
from uniopt import fast
from uniopt.base import Part
from uniopt.fast import cpu
from uniopt.hyper import NONNEG, hyper

SRC = Path(uo.__file__).parent

# Layers, bottom up: a module may import modules of its own layer or below, never above.
LAYERS = [
    {"hyper", "schedules", "tree", "backend", "moments", "jitcache"},
    {"base"},
    {"state", "quant", "transforms", "rules"},
    {"interop.jax", "interop.dtensor", "fast"},
    {"engine"},
    {"interop.optax", "combine", "conventions", "registry", "memory"},
    {"checkpoint"},
    {"torch", "tools", "__init__", "__main__"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The uniopt modules ``name`` imports anywhere (function-level imports too)."""
    package = name.split(".") if path.name == "__init__.py" and name != "__init__" else \
        name.split(".")[:-1]
    if name == "__init__":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name[len("uniopt."):] for a in node.names
                       if a.name.startswith("uniopt.")]
            targets += ["__init__" for a in node.names if a.name == "uniopt"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
            elif node.module and (node.module == "uniopt" or node.module.startswith("uniopt.")):
                base = []
            else:
                continue
            mod = base + (node.module.split(".") if node.module else [])
            if mod and mod[0] == "uniopt" and not node.level:
                mod = mod[1:]
            for a in node.names:  # `from . import engine` imports a module
                sub = ".".join([*mod, a.name])
                targets.append(sub if sub in modules else (".".join(mod) or "__init__"))
        found.update(t for t in targets if t != name)
    return found


def _layer(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            if module == entry or module.startswith(entry + "."):
                return i
    raise AssertionError(f"uniopt.{module} is in no layer of this test: place it in LAYERS")


def test_import_graph_has_no_cycle_and_points_down() -> None:
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert "engine" in graph["interop.optax"] and "base" in graph["engine"]  # it sees imports
    upward = [f"uniopt.{m} imports uniopt.{t}" for m, ts in graph.items() for t in ts
              if _layer(t) > _layer(m)]
    assert not upward, upward
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t] if t in path else [m, t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_a_library_blocked_from_import_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sys.modules["jax"] = None`` is how a user (or a test) keeps JAX out: ``import uniopt``
    took the key for JAX imported, and failed importing it to tell it of a State."""
    from uniopt.interop import jax as interop

    monkeypatch.setitem(sys.modules, "jax", None)
    monkeypatch.setitem(sys.modules, "flax", None)
    # (each is cached after its first call: in their place, whether they are called at all)
    monkeypatch.setattr(interop, "_register_jax", lambda: pytest.fail("JAX told"))
    monkeypatch.setattr(interop, "_register_flax", lambda: pytest.fail("flax told"))
    interop.register_state()  # what import uniopt and every set-up run


def test_the_graph_check_sees_a_cycle(tmp_path: Path) -> None:
    """The checker itself: a function-level import of the engine from base is found."""
    fake = tmp_path / "base.py"
    fake.write_text("def f():\n    from .engine import setup\n")
    assert _imports("base", fake, _modules()) == {"engine"}


def _parts() -> list[type]:
    """Every elementwise block uniopt exports, and those its rules are made of."""
    seen: dict[type, None] = {}
    for value in vars(uo).values():
        if isinstance(value, type) and issubclass(value, uo.Elementwise) and \
                value is not uo.Elementwise:
            seen[value] = None
    for make in (uo.sgd(momentum=0.9, weight_decay=0.1), uo.sgd(momentum=0.9, nesterov=True),
                 uo.adagrad(eps_in_sqrt=True), uo.rmsprop(centered=True, momentum=0.5),
                 uo.adam(amsgrad=True), uo.optimistic_adam(lr=0.1), uo.adadelta(),
                 uo.rmsprop(centered=True, momentum=0.5, convention="keras"),
                 uo.rmsprop(momentum=0.5, convention="optax"), uo.adagrad(convention="flux")):
        for p in make.flat_parts:
            seen[type(p)] = None
    return list(seen)


@pytest.mark.parametrize("cls", _parts(), ids=lambda c: c.__name__)
def test_kernels_keep_the_contract(cls: type) -> None:
    """Named coefficients, no constants (they would change the compiled loop's precision),
    no branch on a coefficient (a flag picks a kernel)."""
    momentum = (uo.trace, uo.sutskever_trace, uo.keras_trace)
    instances = [cls()] if cls not in momentum else [cls(), cls(nesterov=True)]
    for part in instances:
        c = part.coeffs(0)
        assert hasattr(c, "_fields"), f"{cls.__name__}.coeffs returns {type(c).__name__}"
        kernel = part.kernel
        tree = ast.parse(textwrap.dedent(inspect.getsource(kernel)))
        fn = tree.body[0]
        assert isinstance(fn, ast.FunctionDef)
        body = fn.body[1:] if ast.get_docstring(fn) else fn.body
        # a comparison with 0 is exact in any precision; arithmetic with a literal is not
        compared = {id(n) for node in ast.walk(fn) if isinstance(node, ast.Compare)
                    for n in ast.walk(node)}
        for node in ast.walk(ast.Module(body=body, type_ignores=[])):
            assert not isinstance(node, (ast.If, ast.IfExp)), f"{kernel.__qualname__} branches"
            if isinstance(node, ast.Constant) and id(node) not in compared:
                raise AssertionError(f"{kernel.__qualname__} holds the constant {node.value!r}")
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
                assert node.value.id != fn.args.args[1].arg, (
                    f"{kernel.__qualname__} reads its coefficients by position")


def _declared_in(cls: type, name: str) -> type:
    return next(c for c in cls.__mro__ if name in vars(c))


def test_coefficients_are_steady_from_where_each_part_says() -> None:
    """Part.steady: a bound compiled step makes its coefficients once from that step on, so a
    part that says so must give the same numbers at every later step, whatever its values;
    and a subclass that computes its coefficients anew says again from when they are steady
    (else it would inherit its parent's word for another computation)."""
    instances = [part for cls in _parts() for part in (cls(), *(
        [cls(dampening=0.5)] if issubclass(cls, uo.trace) else
        [cls(bias_correction=True)] if "bias_correction" in cls.__dataclass_fields__ else
        [cls(lr_decay=0.1)] if "lr_decay" in cls.__dataclass_fields__ else []))]
    instances += [p for make in (uo.sgd(momentum=0.9, dampening=0.3, weight_decay=0.1),
                                 uo.adagrad(lr_decay=0.01), uo.rmsprop(centered=True),
                                 uo.lion(), uo.ftrl(), uo.signum())
                  for p in make.flat_parts]
    classes, todo = set(), [Part]
    while todo:  # (every part class, built or not)
        todo.extend(c for c in todo.pop().__subclasses__() if c not in classes)
        classes.update(todo)
    for cls in (c for c in classes if c.__module__.startswith("uniopt.")):  # (not tests')
        said, made = _declared_in(cls, "steady"), _declared_in(cls, "coeffs")
        assert said is Part or not issubclass(made, said) or made is said, (
            f"{made.__name__}.coeffs, below {said.__name__}.steady")
    steady = 0
    for part in instances:
        s = part.steady()
        if s is None:
            continue
        steady += 1
        first = tuple(part.coeffs(s))
        for k in (s + 1, s + 2, 10, 1000, 2**20):
            assert tuple(part.coeffs(k)) == first, (part, s, k)
    assert steady >= 10, steady  # (SGD's, RMSprop's, Adagrad's... parts say so)
    # and where they do move, they say so
    assert uo.trace(dampening=0.5).coeffs(0) != uo.trace(dampening=0.5).coeffs(1)
    assert uo.scale_by_adagrad(lr_decay=0.1).steady() is None
    assert all(p.steady() is None for p in uo.adam().flat_parts if p.slots)


def test_the_compiled_loops_cache_key_is_the_kernels_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Editing a kernel, or a helper it calls, changes the key; editing the CLI does not."""
    kernels = tuple((p.kernel, len(p.slots), None) for p in uo.adamw().flat_parts)
    records = tuple(cpu._record(p, p.coeffs(0)) for p in uo.adamw().flat_parts)
    key = cpu._digest(kernels, records)
    from uniopt import moments
    from uniopt.tools import cli

    real = inspect.getsource

    def edited(target: Any) -> Any:
        def getsource(obj: Any) -> str:
            return real(obj) + ("# edited\n" if obj is target else "")
        return getsource

    monkeypatch.setattr(cpu.inspect, "getsource", edited(cli.main))
    assert cpu._digest(kernels, records) == key
    monkeypatch.setattr(cpu.inspect, "getsource", edited(moments.lerp))
    assert cpu._digest(kernels, records) != key
    monkeypatch.setattr(cpu.inspect, "getsource", real)
    # coefficient records are part of it (adam is one part since it folds lr in: use another's)
    other = tuple(cpu._record(p, p.coeffs(0)) for p in uo.adamax().flat_parts)
    assert other != records and cpu._digest(kernels, other) != key
    finishing = (*kernels[:-1], (*kernels[-1][:2], uo.scale_by_lr.finish))
    assert cpu._digest(finishing, records) != key  # and the finish that writes the params


class _NormCoeffs(NamedTuple):
    target: Any


@dataclasses.dataclass(frozen=True)
class scale_to_norm(uo.PerLeaf):
    """A per-leaf part: each leaf's update rescaled to norm ``target``; counts its calls."""

    target: Any = hyper(1.0, NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("calls",)

    def coeffs(self, step: int) -> _NormCoeffs:
        return _NormCoeffs(target=self.target)

    @staticmethod
    def apply(xp: Any, c: Any, p: Any, u: Any, *slots: Any) -> tuple[Any, ...]:
        (calls,) = slots
        norm = xp.sqrt(xp.sum(u * u))
        return u * (c.target / norm), calls + 1


def test_a_per_leaf_part_runs_between_elementwise_parts() -> None:
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((20, 30)), "b": rng.standard_normal(5)}
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    opt = uo.chain(uo.weight_decay(0.1), scale_to_norm(target=2.0), uo.scale_by_lr(0.5))
    state = uo.setup(opt, params)
    assert state.rule.layout == (("scale_to_norm", ("calls",)),)
    state, new = uo.update(state, params, grads)
    for k in params:
        u = grads[k] + 0.1 * params[k]
        expected = params[k] - 0.5 * (u * (2.0 / np.sqrt(np.sum(u * u))))
        np.testing.assert_allclose(new[k], expected, rtol=1e-15, atol=1e-16)
        np.testing.assert_array_equal(state.slots["scale_to_norm.calls"][k == "w"], 1.0)
    state = uo.adjust(state, target=1.0)
    old = {k: v.copy() for k, v in new.items()}
    state = uo.update_(state, new, grads)
    assert state.step == 2
    for k in params:  # in place, with the adjusted target: each leaf moves by lr * target
        u = grads[k] + 0.1 * old[k]
        np.testing.assert_allclose(new[k], old[k] - 0.5 * u / np.sqrt(np.sum(u * u)),
                                   rtol=1e-15, atol=1e-16)
        np.testing.assert_array_equal(state.slots["scale_to_norm.calls"][k == "w"], 2.0)


def test_a_per_leaf_part_on_many_leaves_runs_beside_the_compiled_loop() -> None:
    """A per-leaf part of one's own runs as the reference path runs it, between the compiled
    passes of the elementwise parts around it; a rule of per-leaf parts only has nothing to
    compile, and takes the reference path after saying why."""
    leaves = [np.ones(cpu.MIN_SIZE, np.float32) for _ in range(2)]
    opt = uo.chain(scale_to_norm(target=1.0), uo.scale_by_lr(0.5))
    state = uo.setup(opt, leaves)
    before = cpu.STEPS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = uo.update_(state, leaves, [np.ones_like(x) for x in leaves])
    assert cpu.STEPS == before + 1
    np.testing.assert_allclose(leaves[0], 1.0 - 0.5 / np.sqrt(cpu.MIN_SIZE), rtol=1e-6)
    np.testing.assert_array_equal(state.slots["scale_to_norm.calls"][1], 1.0)
    # a slot of the per-leaf part that cannot be written: declined before any pass has run
    state.slots["scale_to_norm.calls"][1].flags.writeable = False
    old = [x.copy() for x in leaves]
    with pytest.raises(TypeError, match="cannot write the state's scale_to_norm.calls"):
        uo.update_(state, leaves, [np.ones_like(x) for x in leaves])
    for x, y in zip(leaves, old, strict=True):
        np.testing.assert_array_equal(x, y)
    alone = scale_to_norm(target=1.0)
    state = uo.setup(alone, leaves)
    fast._warned.clear()
    with pytest.warns(fast.FastPathUnavailable, match="no elementwise part"):
        state = uo.update_(state, leaves, [np.ones_like(x) for x in leaves])
    assert cpu.STEPS == before + 1
    np.testing.assert_allclose(leaves[0], 1.0 - 1.5 / np.sqrt(cpu.MIN_SIZE), rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        uo.update_(state, leaves, [np.ones_like(x) for x in leaves])  # reported once
