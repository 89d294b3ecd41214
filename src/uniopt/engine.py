"""setup / update / update_ / adjust: walk the tree, resolve hyperparameters once, run the parts.

The engine knows nothing of any particular algorithm: it asks the rule for its elementwise
parts, resolves each part's schedules for the current step (the one place that happens),
validates everything, and only then touches an array, so a bad input never half-updates.
Pure and in-place updates share one loop; only the final write differs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, cast

import optree

from . import backend, fused
from .base import (
    Elementwise,
    Part,
    Transform,
    WholeTree,
    carry_complements,
    hyper_leaves,
    rebuild,
)
from .combine import chain
from .hyper import _traced
from .tree import NAMESPACE, flatten, path_str, unflatten


@dataclasses.dataclass(frozen=True)
class State:
    """An optimizer's state: the rule, the number of updates applied, and per-leaf slots.

    ``slots`` maps ``"<part>.<slot>"`` (e.g. ``"scale_by_adam.exp_avg"``) to one array per
    trainable leaf, in :func:`uniopt.trainables` order; ``tree_states`` holds the state of each
    whole-tree part (an optax transformation in the chain) by name. A state is a pytree whose
    leaves are ``step``, the slot arrays and the tree states; ``rule`` and the params' tree
    structure are static (under ``jax.jit`` the rule's numbers are leaves too).
    """

    rule: Transform
    step: int
    slots: dict[str, list[Any]]
    treedef: Any
    # mixed precision: the dtype (a name, e.g. "float32") the slots are kept and the step is
    # computed in, when it differs from the params' (set by ``setup(..., state_dtype=...)``)
    state_dtype: str | None = None
    tree_states: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        trees = f", tree_states={sorted(self.tree_states)}" if self.tree_states else ""
        return f"State(rule={self.rule!r}, step={self.step}, slots={sorted(self.slots)}{trees})"


def _flatten_state(s: State) -> tuple[tuple[Any, ...], tuple[Any, ...], tuple[str, ...]]:
    children = (s.step, s.slots, s.tree_states)
    return children, (s.rule, s.treedef, s.state_dtype), ("step", "slots", "tree_states")


def _unflatten_state(aux: tuple[Any, ...], children: tuple[Any, ...]) -> State:
    return State(aux[0], children[0], children[1], aux[1], aux[2], children[2])


optree.register_pytree_node(
    State,  # type: ignore[arg-type]
    _flatten_state,  # type: ignore[arg-type]
    _unflatten_state,  # type: ignore[arg-type]
    namespace=NAMESPACE,
)


@functools.cache
def _register_with_jax() -> None:
    """Make State a JAX pytree, so ``jax.jit(uniopt.update)`` carries it; done on the first
    setup with JAX arrays, so JAX is never imported otherwise.

    The leaves are the step, the slots and the rule's numeric hyperparameters; the rule's
    skeleton (types, flags, schedules, which optional blocks are on) is static. So a run under
    jit compiles once, and again only when :func:`adjust` changes the skeleton: a schedule for a
    number, or a value to or from zero where zero removes a block."""
    import jax

    def flatten(s: State) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        values, skeleton = hyper_leaves(s.rule)
        return (s.step, s.slots, s.tree_states, values), (skeleton, s.treedef, s.state_dtype)

    def unflatten(aux: tuple[Any, ...], children: tuple[Any, ...]) -> State:
        step, slots, trees, values = children
        return State(rebuild(aux[0], values), step, slots, aux[1], aux[2], trees)

    jax.tree_util.register_pytree_node(State, flatten, unflatten)


def _plan(rule: Transform) -> list[tuple[Part, tuple[str, ...]]]:
    """Each part with the state keys of its slots (a whole-tree part: of its tree state)."""
    names, trees = iter(rule.layout), iter(rule.tree_layout)
    out = []
    for part in rule.flat_parts:
        keys: tuple[str, ...] = ()
        if isinstance(part, WholeTree):
            keys = (next(trees),)
        elif part.slot_names():
            prefix, slots = next(names)
            keys = tuple(f"{prefix}.{s}" for s in slots)
        out.append((part, keys))
    return out


def _leaves(params: Any, what: str = "params") -> tuple[list[Any], Any, list[str]]:
    leaves, treedef, paths = flatten(params)
    names = [path_str(p) for p in paths]
    first = None
    for leaf, name in zip(leaves, names, strict=True):
        if not backend.is_array(leaf):
            raise TypeError(
                f"{name} is a {type(leaf).__name__}, not an array: {what} leaves must be arrays "
                "(or None)"
            )
        lib = backend.library(leaf)
        if first is None:
            first = (lib, name)
        elif lib != first[0]:
            raise TypeError(
                f"{name} is a {lib} array but {first[1]} is a {first[0]} array: the {what} of "
                "one optimizer must come from one array library"
            )
        xp = backend.namespace(leaf)
        if not xp.isdtype(leaf.dtype, "real floating"):
            raise TypeError(f"{name} has dtype {leaf.dtype}; uniopt updates real floating arrays")
    return leaves, treedef, names


def setup(rule: Transform, params: Any, *, state_dtype: str | None = None) -> State:
    """The initial state of ``rule`` for ``params`` (any pytree of arrays).

    ``state_dtype`` (e.g. ``"float32"``) keeps the slots in that dtype and computes each step in
    it, rounding only the new parameters to their own dtype: float16/bfloat16 parameters with
    float32 moments, without overflow in ``g**2``.

    >>> import numpy as np, uniopt as uo
    >>> state = uo.setup(uo.adam(), {"w": np.zeros(3)})
    >>> state.step, sorted(state.slots)
    (0, ['scale_by_adam.exp_avg', 'scale_by_adam.exp_avg_sq'])
    """
    if not isinstance(rule, Transform):
        raise TypeError(f"setup: expected a uniopt rule or transform, got {rule!r}")
    leaves, treedef, _ = _leaves(params)
    if any(backend.is_jax(p) for p in leaves):
        _register_with_jax()
    if state_dtype is not None and state_dtype not in ("float32", "float64"):
        raise ValueError(f"setup: state_dtype must be 'float32' or 'float64', got {state_dtype!r}")
    slots: dict[str, list[Any]] = {}
    trees: dict[str, Any] = {}
    for part, keys in _plan(rule):
        if isinstance(part, WholeTree):
            _tree_library(leaves, part)
            trees[keys[0]] = part.init_tree(params)
        elif keys:
            per_leaf = [
                part.init_slots(_compute(p, state_dtype), backend.namespace(p)) for p in leaves
            ]
            for k, key in enumerate(keys):
                slots[key] = [s[k] for s in per_leaf]
    return State(rule, 0, slots, treedef, state_dtype, trees)


def _tree_library(leaves: list[Any], part: WholeTree) -> None:
    if leaves and not (backend.is_jax(leaves[0]) or backend.is_numpy(leaves[0])):
        raise TypeError(
            f"{part.name} runs optax, on JAX or NumPy arrays; these params are "
            f"{backend.library(leaves[0])} arrays"
        )


def _compute(x: Any, state_dtype: str | None) -> Any:
    """``x`` in the dtype the step is computed in."""
    if state_dtype is None:
        return x
    xp = backend.namespace(x)
    return xp.astype(x, getattr(xp, state_dtype))


def _align_grads(grads: Any, treedef: Any, names: list[str], params: list[Any]) -> list[Any]:
    """Gradient leaves in trainables order, from a tree like params or a flat list."""
    g_leaves, g_def, _ = flatten(grads)
    if g_def != treedef:
        if not isinstance(grads, (list, tuple)) or any(
            not backend.is_array(g) for g in grads
        ):
            raise ValueError(
                "grads must be a tree with the structure of params or a flat list of arrays "
                f"aligned with uniopt.trainables(params); params are {treedef}, grads are {g_def}"
            )
        if len(grads) != len(params):
            raise ValueError(
                f"flat gradient list has {len(grads)} arrays but params have {len(params)} "
                "trainable arrays (see uniopt.trainables)"
            )
        g_leaves = list(grads)
    for name, p, g in zip(names, params, g_leaves, strict=True):
        if not backend.is_array(g):
            raise TypeError(f"gradient for {name} is a {type(g).__name__}, not an array")
        if backend.library(g) != backend.library(p):
            raise TypeError(
                f"gradient for {name} is a {backend.library(g)} array but its parameter is a "
                f"{backend.library(p)} array"
            )
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(
                f"gradient for {name} has shape {tuple(g.shape)}, its parameter "
                f"{tuple(p.shape)}"
            )
        if g.dtype != p.dtype:
            raise ValueError(f"gradient for {name} has dtype {g.dtype}, its parameter {p.dtype}")
    return g_leaves


def _check_state(state: Any, treedef: Any, names: list[str], params: list[Any]) -> None:
    if not isinstance(state, State):
        raise TypeError(f"expected a uniopt State (from uniopt.setup), got {type(state).__name__}")
    if sorted(state.tree_states) != sorted(state.rule.tree_layout):
        raise ValueError(
            f"this state holds tree states {sorted(state.tree_states)} but its rule has "
            f"whole-tree parts {list(state.rule.tree_layout)}"
        )
    if treedef != state.treedef:
        raise ValueError(
            "params do not have the tree structure this state was set up for: "
            f"state has {state.treedef}, params are {treedef}"
        )
    for key, arrays in state.slots.items():
        for name, p, s in zip(names, params, arrays, strict=True):
            dtype = p.dtype
            if state.state_dtype is not None:
                dtype = getattr(backend.namespace(p), state.state_dtype)
            if tuple(s.shape) != tuple(p.shape) or s.dtype != dtype:
                raise ValueError(
                    f"{name} has shape {tuple(p.shape)} and dtype {p.dtype}, but the state's "
                    f"{key} for it has shape {tuple(s.shape)} and dtype {s.dtype}: this state "
                    "was set up for other params"
                )


Resolved = list[tuple[Any, tuple[Any, ...], tuple[str, ...]]]


def _resolve(rule: Transform, step: int) -> Resolved:
    """Every part resolved and validated for this step, with its coefficients."""
    out: Resolved = []
    for part, keys in _plan(rule):
        if isinstance(part, WholeTree):
            out.append((part, (), keys))
            continue
        try:
            resolved = cast(Elementwise, part.at(step))
        except (ValueError, TypeError) as e:
            raise type(e)(f"{rule.name}: {e}") from None
        out.append((resolved, resolved.coeffs(step), keys))
    return out


def _deltas(
    state: State, params: list[Any], grads: list[Any]
) -> tuple[list[Any], dict[str, list[Any]], dict[str, Any]]:
    """The update ``u`` of every leaf (``p_new = p - u``), the new slots and tree states.

    Part by part over every leaf: a global norm or a whole-tree part needs every leaf's ``u``
    before it can go on."""
    plan = _resolve(state.rule, state.step)
    xps = [backend.namespace(p) for p in params]
    ps = [_compute(p, state.state_dtype) for p in params]
    us = [_compute(g, state.state_dtype) for g in grads]
    new_slots: dict[str, list[Any]] = {}
    new_trees: dict[str, Any] = {}
    for part, c, keys in plan:
        if isinstance(part, WholeTree):
            us, new_trees[keys[0]] = _apply_tree(part, us, state.tree_states[keys[0]], ps, state)
            continue
        if part.needs_norm:
            c = part.norm_coeffs(_norm(us, xps))
        outs = [
            part.kernel(xp, c, p, u, *(state.slots[k][i] for k in keys))
            for i, (xp, p, u) in enumerate(zip(xps, ps, us, strict=True))
        ]
        us = [o[0] for o in outs]
        for j, k in enumerate(keys):
            new_slots[k] = [o[j + 1] for o in outs]
    return us, new_slots, new_trees


def _apply_tree(part: WholeTree, us: list[Any], st: Any, ps: list[Any], state: State) -> Any:
    """A whole-tree part on every leaf's ``u``; its outputs as arrays of the params' library."""
    out, st = part.apply(unflatten(state.treedef, us), st, unflatten(state.treedef, ps))
    leaves, treedef, _ = flatten(out)
    if treedef != state.treedef:
        raise ValueError(
            f"{part.name} returned updates of structure {treedef}, the params are "
            f"{state.treedef}"
        )
    # optax hands back JAX arrays; setup admits only JAX or NumPy params beside it
    return [x if backend.library(x) == backend.library(u) else backend.to_numpy(x, u.dtype)
            for x, u in zip(leaves, us, strict=True)], st


def _norm(us: list[Any], xps: list[Any]) -> Any:
    """The global norm of every leaf's ``u``."""
    total: Any = 0.0
    for xp, u in zip(xps, us, strict=True):
        # float64 sums where the library has it (JAX only with x64 enabled)
        wide = u.dtype if backend.is_jax(u) else xp.float64
        part = xp.sum(xp.astype(u, wide) ** 2)
        total = total + (part if _traced(part) else float(part))
    return total**0.5


def _as_new_array(x: Any, like: Any, inputs: tuple[Any, ...]) -> Any:
    """Results of pure updates: arrays (NumPy turns 0-d results into scalars) that alias none
    of the caller's inputs."""
    xp = backend.namespace(like)
    if not backend.is_array(x) or backend.is_numpy_scalar(x):
        return xp.asarray(x, dtype=like.dtype)
    if x.dtype != like.dtype:  # a step computed in a wider state_dtype
        return xp.astype(x, like.dtype)
    return backend.fresh(x, xp) if any(x is a for a in inputs) else x


@functools.lru_cache(maxsize=64)
def _flat_list_def(n: int) -> Any:
    return optree.tree_structure([0] * n, namespace=NAMESPACE)  # type: ignore[arg-type]


def _fast(state: Any, params: Any, grads: Any, inplace: bool) -> Any:
    """The compiled path's result, or the reason it could not run (None: not worth a word).

    Only cheap whole-tree work happens here; every per-leaf check is compiled."""
    if not fused.AVAILABLE or not isinstance(state, State):
        return None
    if state.tree_states:
        return None  # an optax transform in the chain: JAX runs it, on the whole tree
    if type(params) is list and state.treedef == _flat_list_def(len(params)):
        leaves = params
    else:
        leaves, treedef = optree.tree_flatten(params, namespace=NAMESPACE)
        if treedef != state.treedef:
            return None
    if type(grads) is list and len(grads) == len(leaves):
        g_leaves = grads
    else:
        g_leaves, g_def = optree.tree_flatten(grads, namespace=NAMESPACE)
        if g_def != state.treedef:
            return None
    if not leaves:
        return None
    slots, tensors = state.slots, backend.is_torch(leaves[0])
    originals = leaves
    if tensors:  # CPU tensors run as NumPy views of their memory; anything else says no here
        views = backend.numpy_views([leaves, g_leaves, *slots.values()])
        if views is None:
            return None
        leaves, g_leaves = views[0], views[1]
        slots = dict(zip(slots, views[2:], strict=True))
    if not backend.is_numpy(leaves[0]):
        return None
    if len(leaves) < fused.MIN_LEAVES and (
        not all(backend.is_numpy(x) for x in leaves)
        or sum(x.size for x in leaves) < fused.MIN_SIZE
    ):
        return None  # a tiny step: compiling a loop for it would cost more than it saves
    out = fused.run(_resolve(state.rule, state.step), leaves, g_leaves, slots, inplace)
    if isinstance(out, str):
        return out
    new_params, slots = out
    if tensors and inplace:
        slots = state.slots  # written through the views
    elif tensors:
        new_params = [backend.like_leaf(backend.from_numpy(x), p)
                      for x, p in zip(new_params, originals, strict=True)]
        slots = {k: [backend.from_numpy(x) for x in v] for k, v in slots.items()}
    new_state = dataclasses.replace(state, step=state.step + 1, slots=slots)
    return new_state if inplace else (new_state, unflatten(state.treedef, new_params))


def update(state: State, params: Any, grads: Any) -> tuple[State, Any]:
    """One step, pure: returns ``(new_state, new_params)`` and leaves every input untouched.

    ``grads`` is a tree shaped like ``params`` or a flat list aligned with
    :func:`uniopt.trainables`.
    """
    fast = _fast(state, params, grads, inplace=False)
    if isinstance(fast, tuple):
        return fast
    p_leaves, treedef, names = _leaves(params)
    _check_state(state, treedef, names, p_leaves)
    g_leaves = _align_grads(grads, treedef, names, p_leaves)
    with backend.outside_autograd(p_leaves):
        deltas, slots, trees = _deltas(state, p_leaves, g_leaves)
        new_p = [
            backend.like_leaf(_as_new_array(p - u, p, (p, g)), p)
            for p, g, u in zip(p_leaves, g_leaves, deltas, strict=True)
        ]
    for key, arrays in slots.items():
        slots[key] = [
            _as_new_array(s, old, (p, g, old))
            for s, p, g, old in zip(arrays, p_leaves, g_leaves, state.slots[key], strict=True)
        ]
    if fast:
        fused.warn_once(fast)
    new = dataclasses.replace(state, step=state.step + 1, slots=slots, tree_states=trees)
    return new, unflatten(treedef, new_p)


def update_(state: State, params: Any, grads: Any) -> State:
    """One step in place: the arrays of ``params`` and of the state are written, and the state
    with its step advanced is returned. Bit for bit the same numbers as :func:`update`."""
    fast = _fast(state, params, grads, inplace=True)
    if isinstance(fast, State):
        return fast
    p_leaves, treedef, names = _leaves(params)
    _check_state(state, treedef, names, p_leaves)
    g_leaves = _align_grads(grads, treedef, names, p_leaves)
    for name, p in zip(names, p_leaves, strict=True):
        reason = backend.immutable_reason(p)
        if reason:
            raise TypeError(f"update_ cannot write {name} in place: {reason}")
    for key, arrays in state.slots.items():
        for name, s in zip(names, arrays, strict=True):
            reason = backend.immutable_reason(s)
            if reason:
                raise TypeError(f"update_ cannot write the state's {key} of {name}: {reason}")
    with backend.outside_autograd(p_leaves):
        deltas, slots, trees = _deltas(state, p_leaves, g_leaves)
    for p, u in zip(p_leaves, deltas, strict=True):
        backend.assign(p, p - u)
    for key, arrays in slots.items():
        for old, new in zip(state.slots[key], arrays, strict=True):
            backend.assign(old, new)
    if fast:
        fused.warn_once(fast)
    return dataclasses.replace(state, step=state.step + 1, tree_states=trees)


def optax_update(rule: Transform, grads: Any, state: State, params: Any) -> tuple[Any, State]:
    """The optax protocol for any uniopt transform: updates are to be *added* to params."""
    if (
        not isinstance(state, State)
        or type(state.rule) is not type(rule)
        or state.rule.layout != rule.layout
    ):
        raise ValueError(
            f"this state was not set up for {rule!r}: its rule is "
            f"{getattr(state, 'rule', state)!r}"
        )
    if params is None:
        if any(isinstance(p, Elementwise) and p.uses_params for p in rule.flat_parts):
            raise ValueError(f"{rule.name}: its update needs params (weight decay reads them)")
        g_leaves, treedef, names = _leaves(grads, "grads")
        p_leaves = g_leaves
    else:
        p_leaves, treedef, names = _leaves(params)
        g_leaves = _align_grads(grads, treedef, names, p_leaves)
    _check_state(state, treedef, names, p_leaves)
    with backend.outside_autograd(p_leaves):
        deltas, slots, trees = _deltas(dataclasses.replace(state, rule=rule), p_leaves, g_leaves)
    updates = [_as_new_array(-u, g, ()) for u, g in zip(deltas, g_leaves, strict=True)]
    for key, arrays in slots.items():
        slots[key] = [
            _as_new_array(s, old, (g, p, old))
            for s, g, p, old in zip(arrays, g_leaves, p_leaves, state.slots[key], strict=True)
        ]
    new = State(rule, state.step + 1, slots, state.treedef, state.state_dtype, trees)
    return unflatten(treedef, updates), new


def _set(t: Transform, path: list[str], value: Any, where: str) -> tuple[Transform, list[str]]:
    """``t`` with hyperparameter ``path[-1]`` set in the member ``path[:-1]`` names, and where
    it was found."""
    if isinstance(t, chain):
        if len(path) > 1:
            if not path[0].isdigit():
                raise ValueError(
                    f"adjust: {'.'.join(path)!r}: a member of a chain is named by its position "
                    f"(an integer), got {path[0]!r}"
                )
            i = int(path[0])
            if not 0 <= i < len(t.transforms):
                raise ValueError(f"adjust: chain has no member {i}")
            new, found = _set(t.transforms[i], path[1:], value, f"{where}{i}.")
            members = list(t.transforms)
            members[i] = new
            return chain(*members), found
        members, found = [], []
        for i, m in enumerate(t.transforms):
            new, f = _set(m, path, value, f"{where}{i}.")
            members.append(new)
            found += f
        return chain(*members), found
    if len(path) == 1 and path[0] in t.hyperparameters():
        new = carry_complements(t, dataclasses.replace(t, **{path[0]: value}), path[0])
        return new, [f"{where}{path[0]} ({t.name})"]
    return t, []


def adjust(state: State, **hyperparameters: Any) -> State:
    """The state with hyperparameters changed (numbers or schedules); slots untouched.

    ``adjust(state, lr=1e-4)`` sets ``lr`` wherever it is defined; if more than one member of a
    chain defines it, name the member by its position: ``adjust(state, **{"1.lr": 1e-4})``.
    Flags that decide the state's layout (``amsgrad``, ``centered``...) cannot be adjusted.

    >>> import numpy as np, uniopt as uo
    >>> state = uo.adjust(uo.setup(uo.adam(lr=1e-3), [np.zeros(2)]), lr=1e-4)
    >>> state.rule.lr
    0.0001
    """
    if not isinstance(state, State):
        raise TypeError(f"adjust: expected a uniopt State, got {type(state).__name__}")
    rule = state.rule
    for key, value in hyperparameters.items():
        rule, found = _set(rule, key.split("."), value, "")
        if not found:
            names = sorted({n for p in _members(rule) for n in p.hyperparameters()})
            raise ValueError(
                f"adjust: {key!r} is not a hyperparameter of {state.rule.name}; "
                f"its hyperparameters are {names}"
            )
        if len(found) > 1:
            raise ValueError(
                f"adjust: {key!r} is a hyperparameter of {len(found)} members of this chain "
                f"({', '.join(found)}); name one by its position, e.g. "
                f"adjust(state, **{{{found[0].split(' ')[0]!r}: ...}})"
            )
    if rule.layout != state.rule.layout:
        raise ValueError(
            f"adjust: {hyperparameters} would change the optimizer's slots from "
            f"{state.rule.layout} to {rule.layout}; that needs a new uniopt.setup (set the "
            "hyperparameter to a non-zero value or a schedule at set-up to keep its slot)"
        )
    return dataclasses.replace(state, rule=rule)


def _members(t: Transform) -> list[Transform]:
    return [m for x in t.transforms for m in _members(x)] if isinstance(t, chain) else [t]
