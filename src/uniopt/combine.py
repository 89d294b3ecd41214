"""Recipes by path: rules that run other rules on parts of the tree.

:func:`partition` hands each leaf to the rule its label names, :func:`masked` runs a rule on
some leaves and passes the others' updates through, :func:`freeze` keeps some leaves where they
are. Each member keeps its own state over its own leaves (so a frozen embedding keeps no
moments), and as a rule's only part each member steps its leaves in one engine call, on the
fast path where the member is elementwise.

Leaves are named by dotted paths: ``{"encoder": {"layers": [{"bias": ...}]}}`` has the leaf
``"encoder.layers.0.bias"``, as ``torch.nn.Module.named_parameters`` names a module's (a
namedtuple's or a dataclass's fields by their names). A mask or a label is a glob over those
paths (``"*.bias"``, ``"*norm*"``; ``fnmatch`` rules), a compiled regular expression
(``re.compile(r".*\\.bias$")``, matched in full), a list of either (any matches), a function of
the path and the leaf, or a tree like the params. A :func:`freeze` pattern that matches no leaf
is an error (a typo would train what was to stay still).
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import fnmatch
import functools
import inspect
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, cast

import numpy as np
import optree

from . import backend
from .base import COMBINATORS, Combinator, PerLeaf, Transform, adopted, chain, makes_step, members
from .engine import (
    NONE_HINT,
    _as_new_array,
    _member_keywords,
    _next_step,
    member_step,
    resolve,
    setup,
    update,
    update_,
)
from .hyper import _traced, check_integer
from .rules.schedule_free import scalar_like
from .state import State
from .transforms.mask import is_bool
from .transforms.scale import safe_sqrt
from .tree import NAMESPACE, flatten_leaves, named_paths, path_str, unflatten

# the params as their holder has them, where the engine is handed views of them (uniopt.torch
# steps NumPy views of CPU tensors, detached tensors on a device): a function that makes that
# tree, whose leaves label and mask functions see in place of the engine's at the same paths
HELD: contextvars.ContextVar[Callable[[], Any] | None] = contextvars.ContextVar(
    "uniopt.combine.HELD", default=None)


class Held:
    """``with Held(make):`` sets :data:`HELD` to ``make`` (a class: a step's cost is two
    calls, a generator's context manager some microseconds)."""

    __slots__ = ("make", "token")

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make

    def __enter__(self) -> None:
        self.token = HELD.set(self.make)

    def __exit__(self, *exc: object) -> None:
        HELD.reset(self.token)


def dotted(path: tuple[Any, ...]) -> str:
    """A leaf's path as masks and labels see it: ``"encoder.layers.0.bias"``."""
    return ".".join(str(k) for k in path)


@dataclasses.dataclass(frozen=True)
class set_to_zero(PerLeaf):
    """An update of zero: the leaves it is given stay where they are (optax's
    ``set_to_zero``). As a member of :func:`partition` its leaves are not stepped at all."""

    @staticmethod
    def apply(xp: Any, c: Any, p: Any, u: Any) -> tuple[Any, ...]:
        return (xp.zeros_like(u),)


@dataclasses.dataclass(frozen=True)
class _TreeSpec:
    """A tree of masks or labels, kept as its structure and its leaves (hashable, so a record
    holding one stays a static part of a jitted state)."""

    treedef: Any
    leaves: tuple[Any, ...]

    def __repr__(self) -> str:
        # the tree as it was given; a large one counted (a masked rule over a model of 4,000
        # leaves printed them all, and a state its rule: 80,000 characters at a REPL)
        if len(self.leaves) > 8:  # (counted by value: a recompile message tells two apart)
            counts = collections.Counter(self.leaves)
            return (f"<a tree of {len(self.leaves)} leaves: "
                    + ", ".join(f"{k!r} {n}" for k, n in sorted(counts.items(), key=repr)) + ">")
        return repr(unflatten(self.treedef, list(self.leaves)))


def _selector(owner: str, what: str, spec: Any, label: bool) -> Any:
    """``spec`` in the form a record keeps: a callable, patterns, or a :class:`_TreeSpec`."""
    if isinstance(spec, (str, re.Pattern)) and not label:
        return (spec,)  # (a label alone is a tree of one leaf: every leaf's label)
    if isinstance(spec, (list, tuple)) and all(
            isinstance(s, (str, re.Pattern)) for s in spec) and not label:
        return tuple(spec)  # ([]: no pattern, no leaf selected)
    # (a tree of JAX's node types, flax's FrozenDict or an equinox Module, which is callable,
    # is a tree: known to the flattening once adopted)
    leaves, treedef = flatten_leaves(spec)
    if callable(spec) and not isinstance(spec, (list, tuple, Mapping)) and len(leaves) == 1 \
            and leaves[0] is spec:
        return spec
    for x in leaves:
        ok = isinstance(x, str) if label else is_bool(x)
        if not ok:
            raise TypeError(
                f"{owner}: {what} must be a glob, a regular expression, a list of them, a "
                f"function of (path, leaf), or a tree like the params of "
                f"{'labels (str)' if label else 'bools'}; it holds {x!r}"
            )
    return _TreeSpec(treedef, tuple(bool(x) if not label else x for x in leaves))


def _matches(patterns: tuple[Any, ...], path: str) -> bool:
    return any(p.fullmatch(path) is not None if isinstance(p, re.Pattern)
               else fnmatch.fnmatchcase(path, p) for p in patterns)


def _evaluate(owner: str, what: str, spec: Any, treedef: Any, leaves: list[Any]) -> list[Any]:
    """The value of selector ``spec`` at each leaf of a tree ``treedef``."""
    paths = [dotted(p) for p in named_paths(treedef)]
    if isinstance(spec, _TreeSpec):
        if spec.treedef == treedef:
            return list(spec.leaves)
        try:
            within = _within(spec, treedef)
        except TypeError:  # a node whose metadata cannot be hashed
            within = _within.__wrapped__(spec, treedef)
        if within is None:
            raise ValueError(
                f"{owner}: the {what} tree has structure {spec.treedef}, the params "
                f"{treedef}: it must be the params' structure or a prefix of it (a value at "
                "an inner node holds for every leaf under it)"
            )
        return list(within)
    if isinstance(spec, tuple):
        return [_matches(spec, p) for p in paths]
    held = HELD.get()
    if held is not None:
        leaves = _held(held(), treedef, leaves)
    try:
        return [spec(p, x) for p, x in zip(paths, leaves, strict=True)]
    except TypeError:
        if not _one_argument(spec):
            raise
        # (optax's label and mask functions take the whole params tree)
        raise TypeError(
            f"{owner}: a {what} function is called as fn(path, leaf) for each leaf; "
            f"{getattr(spec, '__name__', spec)!r} takes one argument, as optax's take the "
            f"whole params tree: write it of (path, leaf), or give its result for these "
            f"params (a tree of them shaped like the params)") from None


def _held(tree: Any, treedef: Any, leaves: list[Any]) -> list[Any]:
    """``tree``'s leaves at the paths of ``treedef``'s (``tree``'s structure, or it with some
    leaves None: a member's), ``leaves``' where ``tree`` has none there."""
    own, own_def = flatten_leaves(tree)
    at = dict(zip(map(tuple, named_paths(own_def)), own, strict=True))
    return [at.get(tuple(p), x) for p, x in zip(named_paths(treedef), leaves, strict=True)]


def _one_argument(fn: Any) -> bool:
    """Whether ``fn`` takes exactly one positional argument."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    try:
        sig.bind(None)
    except TypeError:
        return False
    try:
        sig.bind(None, None)
    except TypeError:
        return True
    return False


@functools.lru_cache(maxsize=256)
def _within(spec: _TreeSpec, treedef: Any) -> tuple[Any, ...] | None:
    """``spec``'s values at the leaves of ``treedef``, where ``spec`` is a prefix of the
    params' structure (a value at an inner node holds for every leaf under it, as optax's
    masks and labels may be) or that structure itself, and ``treedef`` is the params' with
    some leaves None: a combinator's members see the params with the leaves it routes
    elsewhere so, and a mask or labels tree inside is shaped like the whole params (as in
    optax). None where ``spec`` is no such prefix."""
    marks = unflatten(treedef, [True] * treedef.num_leaves)
    try:
        values = optree.broadcast_prefix(unflatten(spec.treedef, list(spec.leaves)), marks,
                                         none_is_leaf=True, namespace=NAMESPACE)
    except ValueError:
        return None
    flat = optree.tree_leaves(marks, none_is_leaf=True, namespace=NAMESPACE)
    out = tuple(v for v, m in zip(values, flat, strict=True) if m is True)
    # (a None over a leaf the params have, a subtree's spread: no label, no mask; optax refuses
    # it too, and taken as one it stepped those leaves to 0)
    return None if any(v is None for v in out) else out


# how a combinator's members step: inside a chain (what comes out is their updates), or as a
# rule's only part, pure (the new params) or in place (nothing)
CHAIN, PURE, INPLACE = "chain", "pure", "inplace"


def _member(mode: str, state: State, ps: list[Any], gs: list[Any],
            extra: dict[str, Any]) -> tuple[Any, State]:
    """A member's step on its leaves: ``(out, state)``, ``out`` as ``mode`` says."""
    if mode == CHAIN:
        return member_step(state, ps, gs, extra)
    # as trees of the member's structure, so a combinator inside sees the leaves' paths
    p_tree, g_tree = unflatten(state.treedef, ps), unflatten(state.treedef, gs)
    extra = _member_keywords(state.rule, extra)
    if mode == PURE:
        new, out = update(state, p_tree, g_tree, **extra)
        return flatten_leaves(out)[0], new
    return None, update_(state, p_tree, g_tree, **extra)


def _still(mode: str, ps: list[Any], us: list[Any]) -> list[Any] | None:
    """What :func:`_member` gives for leaves that do not move."""
    if mode == CHAIN:
        return [backend.namespace(u).zeros_like(u) for u in us]
    if mode == PURE:
        return [_as_new_array(p, p, (p,)) for p in ps]
    return None


def _unmoved(mode: str, state: State) -> State:
    """A member's state after a step it does not take: in a pure step a copy of its arrays (a
    later in-place step of the new state must not write the caller's), else itself."""
    if mode != PURE:
        return state
    return cast(State, optree.tree_map(
        lambda x: _as_new_array(x, x, (x,)) if backend.is_array(x) else x, cast(Any, state),
        namespace=NAMESPACE))


def _validate(rule: Transform, state: State, ps: list[Any] | None = None,
              gs: list[Any] | None = None) -> None:
    """Raise what ``rule``'s in-place step from ``state`` would raise before it writes: a
    number invalid at that step (a schedule's value), and what each combinator in it checks
    first (:meth:`_Runs.precheck`), given the leaves ``ps`` and their gradients ``gs`` where
    the rule is that combinator alone (None: what it sees is not known here). A partition's
    members step one after another: each is checked so before the first writes anything."""
    moving, runs, alone = _checks(rule)
    if gs is not None and any(g is None for g in gs):
        _refuse_none(rule, state.treedef, gs)
    if moving:
        resolve(rule, state.step)
    for part, keys in runs:
        part.precheck(state.tree_states[keys[0]], state.treedef,
                      ps if alone else None, gs if alone else None)


def _refuse_none(rule: Transform, treedef: Any, gs: list[Any]) -> None:
    """Raise what a step of member ``rule`` raises for gradients ``gs`` with a None among them
    (a combinator that steps every leaf together, a chain with whole-tree parts), before an
    earlier member of its partition writes."""
    parts = rule.flat_parts
    lone = parts[0] if len(parts) == 1 and isinstance(parts[0], _Runs) else None
    if lone is not None and not lone.routes:
        i = next(i for i, g in enumerate(gs) if g is None)
        raise ValueError(
            f"{lone.name}: the gradient of {path_str(optree.treespec_paths(treedef)[i])} is "
            f"None; it steps every leaf together. {NONE_HINT}")
    if lone is None and rule.tree_layout:
        raise ValueError(
            f"{rule.name}: a gradient is None, but whole-tree parts "
            f"({', '.join(rule.tree_layout)}) see every leaf at once. {NONE_HINT}")


def _checks(rule: Transform) -> tuple[bool, list[tuple[Any, Any]], bool]:
    """What :func:`_validate` looks at in ``rule`` (a record never changes: kept in its memo):
    whether a number moves, its combinators, and whether one of them is its only part."""
    hit = rule.memo.get("combine.checks")
    if hit is None:
        hit = rule.memo["combine.checks"] = (
            not all(part.fixed for part in rule.flat_parts),
            [(p, k) for p, k in rule.keyed_parts if isinstance(p, _Runs)],
            len(rule.keyed_parts) == 1)
    return hit


@dataclasses.dataclass(frozen=True)
class _Runs(Combinator):
    """A combinator written once for the three ways it is run (:data:`CHAIN`, :data:`PURE`,
    :data:`INPLACE`): its ``_step`` gets flat lists of leaves."""

    def _step(self, tree: Any, treedef: Any, ps: list[Any], gs: list[Any],
              mode: str, extra: dict[str, Any]) -> tuple[Any, list[Any] | None]:
        raise NotImplementedError

    # the step's extra arguments (the loss) go on to the members, whose parts may read them
    reads_value: ClassVar[bool] = True

    def precheck(self, tree: Any, treedef: Any, ps: list[Any] | None,
                 gs: list[Any] | None) -> None:
        """Raise what an in-place step of leaves ``ps`` with gradients ``gs`` (None: not known
        here) would raise before it writes (see :func:`_validate`); the members' numbers at
        their steps where they will step."""
        for name, member in self.inner.items():
            if not _frozen(member):
                _validate(member, tree[name])

    @property
    def uses_params(self) -> bool:  # type: ignore[override]
        return any(p.uses_params for m in self.inner.values() for p in m.flat_parts)

    @property
    def makes_step(self) -> bool:  # type: ignore[override]
        return any(map(makes_step, self.inner.values()))

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any,
                   **extra: Any) -> tuple[Any, Any]:
        us, treedef = flatten_leaves(u)
        tree, out = self._step(state, treedef, flatten_leaves(params)[0], us, CHAIN, extra)
        assert out is not None
        return unflatten(treedef, out), tree

    def run(self, tree: Any, treedef: Any, params: list[Any], grads: list[Any],
            inplace: bool, **extra: Any) -> tuple[Any, Any]:
        if not self.routes and any(g is None for g in grads):
            i = next(i for i, g in enumerate(grads) if g is None)
            raise ValueError(
                f"{self.name}: the gradient of {path_str(optree.treespec_paths(treedef)[i])} "
                f"is None; it steps every leaf together. {NONE_HINT}"
            )
        return self._step(tree, treedef, params, grads, INPLACE if inplace else PURE, extra)

    # whether each leaf goes to one member alone, which then takes its None gradients
    routes: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class _Routed(_Runs):
    """What :func:`partition`, :func:`masked` and :func:`freeze` share: each leaf goes to one
    member, by its label."""

    routes = True
    reads_every_leaf = False

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return ()  # (the members' states alone)

    def _labels(self, treedef: Any, leaves: list[Any]) -> list[str]:
        raise NotImplementedError

    def leaves_of(self, treedef: Any, leaves: list[Any]) -> dict[str, tuple[int, ...]]:
        return self.route(treedef, leaves)

    def route(self, treedef: Any, leaves: list[Any]) -> dict[str, tuple[int, ...]]:
        """The leaves (their positions) each member takes, raising where a label names none.
        Kept per tree structure, shapes and dtypes (what a label function may read): a step
        asks again and gets the same answer."""
        key = ("route", treedef, tuple((tuple(x.shape), x.dtype) for x in leaves))
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        labels = self._labels(treedef, leaves)
        names = list(self.inner)
        out: dict[str, list[int]] = {n: [] for n in names}
        paths = optree.treespec_paths(treedef)
        for i, (label, path) in enumerate(zip(labels, paths, strict=True)):
            if label not in out:
                raise ValueError(
                    f"{self.name}: {path_str(path)} is labelled {label!r}, which names none of "
                    f"its rules {names}"
                )
            out[label].append(i)
        for n, ix in out.items():
            if 0 < len(ix) < len(leaves):
                _routable(self.name, self.inner[n])
        routed = self.memo[key] = {n: tuple(ix) for n, ix in out.items()}
        return routed

    def init_tree(self, params: Any, state_dtype: str | None = None) -> Any:
        leaves, treedef = flatten_leaves(params)
        routes = self.route(treedef, leaves)
        # each member's state is for the params' tree with the other leaves None: its leaves
        # keep their paths (for a partition or mask inside it)
        return {n: setup(m, unflatten(treedef, [x if i in set(routes[n]) else None
                                                for i, x in enumerate(leaves)]),
                         state_dtype=state_dtype)
                for n, m in self.inner.items()}

    def placeholder_tree(self, params: Any, member: Callable[[Transform], Any]) -> Any:
        return {n: member(m) for n, m in self.inner.items()}

    def precheck(self, tree: Any, treedef: Any, ps: list[Any] | None,
                 gs: list[Any] | None) -> None:
        routes = None
        # (a None gradient: each member that steps every leaf together refuses it here)
        none = ps is not None and gs is not None and any(g is None for g in gs)
        for name, member in self.inner.items():
            moving, runs, _ = _checks(member)
            if not (moving or runs or none) or _frozen(member):
                continue
            if (runs or none) and ps is not None and routes is None:
                routes = self.route(treedef, ps)
            if routes is None or ps is None or gs is None:
                _validate(member, tree[name])
            else:
                _validate(member, tree[name], [ps[i] for i in routes[name]],
                          [gs[i] for i in routes[name]])

    def _step(self, tree: Any, treedef: Any, ps: list[Any], gs: list[Any],
              mode: str, extra: dict[str, Any]) -> tuple[Any, list[Any] | None]:
        routes = self.route(treedef, ps)
        out: list[Any] | None = None if mode == INPLACE else [None] * len(ps)
        if mode == INPLACE:  # (pure, or in a chain, the members write nothing of the caller's)
            self.precheck(tree, treedef, ps, gs)
        new = {}
        for name, member in self.inner.items():
            idx = routes[name]
            sub_p, sub_g = [ps[i] for i in idx], [gs[i] for i in idx]
            st = dataclasses.replace(tree[name], rule=member)
            if _frozen(member):
                new[name], moved = _unmoved(mode, st), _still(mode, sub_p, sub_g)
            elif not idx:  # a label no leaf carries: its count moves, nothing else (under jit
                # its parts' host branches on an empty tree's numbers met traced ones)
                new[name] = dataclasses.replace(_unmoved(mode, st), step=_next_step(st.step))
                moved = []
            else:
                moved, new[name] = _member(mode, st, sub_p, sub_g, extra)
            if out is not None:
                assert moved is not None
                for i, x in zip(idx, moved, strict=True):
                    out[i] = x
        return new, out


def _frozen(member: Transform) -> bool:
    parts = member.flat_parts
    return bool(parts) and all(isinstance(p, set_to_zero) for p in parts)


def _routable(owner: str, rule: Transform) -> None:
    """Raise where ``rule``, a member of ``owner`` handed some of the leaves, evaluates the
    objective over every leaf (a line search). It was handed the whole tree's ``grad=`` (a
    ValueError comparing the two trees), and given only its own leaves' it called
    ``value_fn`` with None in place of the others."""
    for _, m in members(rule):
        part = next((q for q in m.flat_parts if getattr(q, "whole_objective", False)), None)
        if part is not None:
            whose = part.name if part is m else f"{m.name}'s {part.name}"
            raise ValueError(
                f"{owner}: {whose} evaluates the objective over every leaf "
                f"(value_fn at trial params, grad= of the whole tree), and a member of {owner} "
                "steps only its own leaves: make it the whole rule, and keep leaves still "
                "through the objective itself (a function of the leaves it trains)")


@dataclasses.dataclass(frozen=True, init=False)
class partition(_Routed):
    """Each leaf stepped by the rule its label names (optax's ``multi_transform``; torch's
    param groups, chosen by path). ``rules`` maps labels to rules (None: the leaves stay
    where they are); ``labels`` gives each leaf's label: a function of (dotted path, leaf),
    a tree like the params, or :func:`by_path`'s table of globs. A leaf whose label names no
    rule is an error, never skipped.

    >>> import numpy as np, uniopt as uo
    >>> params = {"w": np.ones((2, 2)), "norm": {"scale": np.ones(2)}, "b": np.zeros(2)}
    >>> opt = uo.partition(
    ...     {"decay": uo.adamw(lr=1e-3, weight_decay=0.1), "plain": uo.adam(lr=1e-3)},
    ...     uo.by_path({"b": "plain", "*norm*": "plain", "*": "decay"}))
    >>> state = uo.setup(opt, params)
    >>> members = state.tree_states["partition"]
    >>> {k: len(s.slots["scale_by_adam.exp_avg"]) for k, s in members.items()}
    {'decay': 1, 'plain': 2}
    """

    rules: tuple[Transform, ...]
    names: tuple[str, ...]
    labels: Any

    def __init__(self, rules: Mapping[str, Any], labels: Any) -> None:
        if not isinstance(rules, Mapping) or not rules:
            raise TypeError(f"partition: rules must be a non-empty dict of label -> rule, "
                            f"got {rules!r}")
        for k in rules:
            if not isinstance(k, str):
                raise TypeError(f"partition: labels must be strings, got {k!r}")
        object.__setattr__(self, "rules", tuple(
            set_to_zero() if v is None else adopted("partition", f"rules[{k!r}]", v)
            for k, v in rules.items()))
        object.__setattr__(self, "names", tuple(rules))
        object.__setattr__(self, "labels", _selector("partition", "labels", labels, True))
        object.__setattr__(self, "host", None)

    def __repr__(self) -> str:  # (as it is called)
        return f"partition({self.inner!r}, {self.labels!r})"

    @property
    def inner(self) -> dict[str, Transform]:
        return dict(zip(self.names, self.rules, strict=True))

    def with_inner(self, name: str, member: Transform) -> Combinator:
        rules = dict(self.inner)
        rules[name] = member
        return _rebuilt(self, rules=tuple(rules.values()))

    def _labels(self, treedef: Any, leaves: list[Any]) -> list[str]:
        labels = _evaluate(self.name, "labels", self.labels, treedef, leaves)
        for label, path in zip(labels, optree.treespec_paths(treedef), strict=True):
            if not isinstance(label, str):
                raise TypeError(f"partition: the label of {path_str(path)} is {label!r}, "
                                "not a string")
        return labels


def _rebuilt(t: Transform, **changes: Any) -> Any:
    new = object.__new__(type(t))
    new.__dict__.update({**t.fields(), **changes, "host": None})
    return new


@dataclasses.dataclass(frozen=True, init=False)
class _Selects(_Routed):
    """What :func:`masked` and :func:`freeze` share: ``rule`` and a selector (the field
    ``selector`` names), whose picked leaves and the others go to the two members."""

    rule: Transform
    selector: ClassVar[str]
    picked: ClassVar[str]  # the label of the leaves the selector picks
    others: ClassVar[str]

    def _set(self, rule: Any, spec: Any) -> None:
        object.__setattr__(self, "rule", adopted(self.name, "rule", rule))
        object.__setattr__(self, self.selector, _selector(self.name, self.selector, spec, False))
        object.__setattr__(self, "host", None)

    def with_inner(self, name: str, member: Transform) -> Combinator:
        return _rebuilt(self, rule=member)

    def _labels(self, treedef: Any, leaves: list[Any]) -> list[str]:
        spec = getattr(self, self.selector)
        return [self.picked if bool(x) else self.others
                for x in _evaluate(self.name, self.selector, spec, treedef, leaves)]


@dataclasses.dataclass(frozen=True, init=False)
class masked(_Selects):
    """``rule`` on the leaves ``mask`` selects; the other leaves' updates pass through as they
    come (optax's ``masked``: at the head of a rule that is the raw gradient, so to keep
    leaves still use :func:`freeze`). ``mask``: globs over dotted paths, regular
    expressions, a function of (path, leaf) or a tree of bools like the params."""

    mask: Any
    selector, picked, others = "mask", "masked", "unmasked"

    def __init__(self, rule: Any, mask: Any) -> None:
        self._set(rule, mask)

    @property
    def inner(self) -> dict[str, Transform]:
        return {"masked": self.rule, "unmasked": chain()}


@dataclasses.dataclass(frozen=True, init=False)
class freeze(_Selects):
    """``rule`` on every leaf but those ``paths`` selects, which stay where they are and keep
    no state. ``paths``: globs over dotted paths, regular expressions, a function of (path,
    leaf) or a tree of bools like the params."""

    paths: Any
    selector, picked, others = "paths", "frozen", "trainable"

    def __init__(self, rule: Any, paths: Any) -> None:
        self._set(rule, paths)

    @property
    def inner(self) -> dict[str, Transform]:
        return {"trainable": self.rule, "frozen": set_to_zero()}

    def _labels(self, treedef: Any, leaves: list[Any]) -> list[str]:
        # a pattern that freezes nothing is a typo that would train what was to stay still
        if isinstance(self.paths, tuple):
            paths = [dotted(p) for p in named_paths(treedef)]
            for pattern in self.paths:
                if not any(_matches((pattern,), p) for p in paths):
                    shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
                    raise ValueError(f"freeze: {pattern!r} matches no leaf of these params "
                                     f"(their paths: {shown})")
        return super()._labels(treedef, leaves)


@dataclasses.dataclass(frozen=True)
class by_path:
    """Labels from a table of patterns, the first that matches a leaf's dotted path winning:
    ``by_path({"*.bias": "no_decay", "*norm*": "no_decay", "*": "decay"})``. A leaf no
    pattern matches is an error that names it."""

    table: tuple[tuple[Any, str], ...]

    def __init__(self, table: Mapping[Any, str]) -> None:
        for k, v in table.items():
            if not isinstance(k, (str, re.Pattern)) or not isinstance(v, str):
                raise TypeError(f"by_path: the table maps globs or regular expressions to "
                                f"labels (str); got {k!r}: {v!r}")
        object.__setattr__(self, "table", tuple(table.items()))

    def __repr__(self) -> str:  # (as it is called)
        return f"by_path({dict(self.table)!r})"

    def __call__(self, path: str, leaf: Any) -> str:
        for pattern, label in self.table:
            if _matches((pattern,), path):
                return label
        raise ValueError(f"by_path: {path!r} matches none of {[p for p, _ in self.table]}")



def _where(cond: Any, a: list[Any] | None, b: list[Any] | None) -> list[Any] | None:
    """``a`` where the (JAX) scalar ``cond`` holds, else ``b``, leaf by leaf."""
    if a is None or b is None:
        return None
    return [backend.namespace(x).where(cond, x, y) for x, y in zip(a, b, strict=True)]


def _select(cond: Any, new: State, old: State) -> State:
    """State ``new`` where the (JAX) scalar ``cond`` holds, else ``old`` (same structure)."""
    import jax

    jnp = jax.numpy
    # in the old leaf's dtype as JAX holds it (a host float64 array is float32 without x64)
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y).astype(jnp.asarray(y).dtype),
                        new, old)


def _count(leaves: list[Any]) -> Any:
    """A counter's zero: a JAX int32 array for JAX leaves (a Python int would be static to
    equinox's filter_jit and weakly typed to jax.jit), else a Python int."""
    first = backend.jax_array_of(leaves[0]) if leaves else None  # (an NNX Param's too)
    if first is not None:
        xp = backend.namespace(first)
        # placed as the params (a sharded tree's counter uncommitted beside them compiled
        # the jitted step twice)
        return backend.placed(xp.asarray(0, dtype=xp.int32), first)
    return 0


def _like(xs: list[Any], ps: list[Any]) -> list[Any]:
    """``xs`` in the dtypes of ``ps`` (an accumulator kept in a wider ``state_dtype`` hands
    the rule gradients as the params are)."""
    return [x if x.dtype == p.dtype else backend.namespace(x).astype(x, p.dtype)
            for x, p in zip(xs, ps, strict=True)]


@dataclasses.dataclass(frozen=True, init=False)
class _Wraps(_Runs):
    """What :func:`accumulate` and :func:`skip_nonfinite` share: one rule, stepped whole."""

    rule: Transform

    @property
    def inner(self) -> dict[str, Transform]:
        return {"inner": self.rule}

    def with_inner(self, name: str, member: Transform) -> Combinator:
        return _rebuilt(self, rule=member)


@dataclasses.dataclass(frozen=True, init=False)
class accumulate(_Wraps):
    """Gradient accumulation (optax's ``MultiSteps``): the mean of ``every`` micro-batch
    gradients goes to ``rule`` once, and only then do the params move and ``rule`` (its step
    count, its schedules) advance. ``every`` is an int or a schedule of ``rule``'s step.

    The running mean is optax's, ``acc + (g - acc) / (n + 1)``. After each real step the
    accumulator is set to zero, not multiplied by it, so a non-finite micro-batch spoils one
    step at most: wrapped around it, :func:`skip_nonfinite` drops that micro-batch
    (``skip_nonfinite(accumulate(rule, k))``, the order to prefer); inside it, it drops the
    whole step (``accumulate(skip_nonfinite(rule), k)``)."""

    every: Any
    like_params: ClassVar[tuple[str, ...]] = ("acc",)
    reads_every_leaf = False  # (a count; each leaf's own mean)
    arrays_dtype: ClassVar[str] = "state"  # (the running mean in setup's state_dtype)

    def __init__(self, rule: Any, every: Any) -> None:
        every = check_integer("accumulate", "every", every, 1, schedulable=True)
        object.__setattr__(self, "rule", adopted("accumulate", "rule", rule))
        object.__setattr__(self, "every", every)
        object.__setattr__(self, "host", None)

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return (tuple(shape),)

    def init_tree(self, params: Any, state_dtype: str | None = None) -> Any:
        leaves = flatten_leaves(params)[0]
        xp = backend.namespace(leaves[0]) if leaves else None
        acc = [xp.zeros_like(x, dtype=None if state_dtype is None else getattr(xp, state_dtype))
               for x in leaves] if xp else []
        return {"mini": _count(leaves), "acc": acc,
                "inner": setup(self.rule, params, state_dtype=state_dtype)}

    def placeholder_tree(self, params: Any, member: Callable[[Transform], Any]) -> Any:
        return {"mini": 0, "acc": params, "inner": member(self.rule)}

    def _every(self, step: Any) -> Any:
        if not callable(self.every):
            return self.every
        # (as a hyperparameter's schedule is: one that cannot trace says so, and what to write)
        k = self._evaluate(self.every, step)
        if not _traced(k) and (int(k) != k or k < 1):
            raise ValueError(f"accumulate: every is {k!r} at step {step}; it must be an "
                             "int >= 1")
        return k

    def precheck(self, tree: Any, treedef: Any, ps: list[Any] | None,
                 gs: list[Any] | None) -> None:
        if tree["mini"] + 1 >= self._every(tree["inner"].step):  # (the mean: no leaves here)
            _validate(self.rule, tree["inner"])

    def _step(self, tree: Any, treedef: Any, ps: list[Any], gs: list[Any],
              mode: str, extra: dict[str, Any]) -> tuple[Any, list[Any] | None]:
        inner = dataclasses.replace(tree["inner"], rule=self.rule)
        mini, k = tree["mini"], self._every(inner.step)
        with np.errstate(invalid="ignore"):  # a NaN micro-batch: a guard inside handles it
            acc = [a + (g - a) / (mini + 1) for a, g in zip(tree["acc"], gs, strict=True)]
        # (a 0-d leaf's NumPy arithmetic hands back a scalar: the state and members take arrays)
        acc = [np.asarray(a) if backend.is_numpy_scalar(a) else a for a in acc]
        zeros = [backend.namespace(a).zeros_like(a) for a in acc]
        if not (ps and backend.is_jax(ps[0])):
            if mini + 1 < k:
                if mode == INPLACE:
                    for old, new in zip(tree["acc"], acc, strict=True):
                        backend.assign(old, new)
                    acc = tree["acc"]
                return ({"mini": mini + 1, "acc": acc, "inner": _unmoved(mode, inner)},
                        _still(mode, ps, gs))
            out, inner = _member(mode, inner, ps, _like(acc, ps), extra)
            if mode == INPLACE:
                for old, zero in zip(tree["acc"], zeros, strict=True):
                    backend.assign(old, zero)
                zeros = tree["acc"]
            return {"mini": 0, "acc": zeros, "inner": inner}, out
        # JAX (traced or not): both outcomes, the one that holds selected, as optax does
        emit = mini + 1 >= k
        out, new_inner = _member(mode, inner, ps, _like(acc, ps), extra)
        xp = backend.namespace(ps[0])
        return ({"mini": xp.where(emit, 0, mini + 1).astype(mini.dtype),
                 "acc": _where(emit, zeros, acc), "inner": _select(emit, new_inner, inner)},
                _where(emit, out, _still(mode, ps, gs)))


@dataclasses.dataclass(frozen=True, init=False)
class skip_nonfinite(_Wraps):
    """Skip a step whose gradients are not all finite (optax's ``apply_if_finite``): params
    and ``rule``'s state stay as they were, and the state counts it (``notfinite_count`` in a
    row, ``total_notfinite``, ``last_finite``). More than ``max_consecutive`` in a row is an
    error that names the first leaf at fault, raised before anything is written. Under JAX
    nothing can be raised inside a traced step: on JAX arrays, jitted or eager (one program
    either way), the update is then applied, as optax does (what it spreads is the
    gradient's own NaN or inf)."""

    max_consecutive: int

    def __init__(self, rule: Any, max_consecutive: int = 10) -> None:
        max_consecutive = check_integer("skip_nonfinite", "max_consecutive", max_consecutive, 0)
        object.__setattr__(self, "rule", adopted("skip_nonfinite", "rule", rule))
        object.__setattr__(self, "max_consecutive", max_consecutive)
        object.__setattr__(self, "host", None)

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return ()  # (its counts; the rule's state)

    def init_tree(self, params: Any, state_dtype: str | None = None) -> Any:
        leaves = flatten_leaves(params)[0]
        zero = _count(leaves)
        # (each its own array: jax.jit's donate_argnums refuses one buffer donated twice)
        return {"notfinite_count": zero, "total_notfinite": _count(leaves),
                "last_finite": True if isinstance(zero, int) else zero == 0,
                "inner": setup(self.rule, params, state_dtype=state_dtype)}

    def placeholder_tree(self, params: Any, member: Callable[[Transform], Any]) -> Any:
        return {"notfinite_count": 0, "total_notfinite": 0, "last_finite": 0,
                "inner": member(self.rule)}

    def _too_many(self, count: int, treedef: Any, bad: int) -> FloatingPointError:
        return FloatingPointError(
            f"skip_nonfinite: {count} steps in a row with non-finite gradients "
            f"(max_consecutive={self.max_consecutive}); this one's first is "
            f"{path_str(optree.treespec_paths(treedef)[bad])}")

    def precheck(self, tree: Any, treedef: Any, ps: list[Any] | None,
                 gs: list[Any] | None) -> None:
        if gs is None or ps is None or (ps and backend.is_jax(ps[0])):
            return  # (whether the rule steps is not known here; under JAX nothing raises)
        bad = next((i for i, g in enumerate(gs) if not bool(
            backend.namespace(g).all(backend.namespace(g).isfinite(g)))), None)
        if bad is None:
            _validate(self.rule, tree["inner"], ps, gs)
        elif tree["notfinite_count"] + 1 > self.max_consecutive:
            raise self._too_many(tree["notfinite_count"] + 1, treedef, bad)

    def _step(self, tree: Any, treedef: Any, ps: list[Any], gs: list[Any],
              mode: str, extra: dict[str, Any]) -> tuple[Any, list[Any] | None]:
        inner = dataclasses.replace(tree["inner"], rule=self.rule)
        finite = [backend.namespace(g).all(backend.namespace(g).isfinite(g)) for g in gs]
        if not (ps and backend.is_jax(ps[0])):
            bad = next((i for i, f in enumerate(finite) if not bool(f)), None)
            if bad is None:
                out, inner = _member(mode, inner, ps, gs, extra)
                return {**tree, "notfinite_count": 0, "last_finite": True, "inner": inner}, out
            count = tree["notfinite_count"] + 1
            if count > self.max_consecutive:
                raise self._too_many(count, treedef, bad)
            return ({"notfinite_count": count, "total_notfinite": tree["total_notfinite"] + 1,
                     "last_finite": False, "inner": _unmoved(mode, inner)}, _still(mode, ps, gs))
        xp = backend.namespace(ps[0])
        ok = xp.all(xp.stack(finite)) if finite else xp.asarray(True)
        count = xp.where(ok, 0, tree["notfinite_count"] + 1).astype(xp.int32)
        take = ok | (count > self.max_consecutive)
        out, new_inner = _member(mode, inner, ps, gs, extra)
        return ({"notfinite_count": count, "last_finite": ok,
                 "total_notfinite": (tree["total_notfinite"] + (~ok)).astype(xp.int32),
                 "inner": _select(take, new_inner, inner)},
                _where(take, out, _still(mode, ps, gs)))


COMBINATORS["partition"] = partition
def _tree_sum(xp: Any, terms: list[Any], dtype: Any) -> Any:
    # (a number beside the leaves: on their device, replicated over a JAX mesh they span)
    total = backend.number(xp, 0.0, dtype, terms[0]) if terms else xp.zeros((), dtype=dtype)
    for t in terms:
        total = total + xp.sum(xp.astype(t, dtype))
    return total


@dataclasses.dataclass(frozen=True, init=False)
class mechanize(_Wraps):
    """Mechanic (Cutkosky, Defazio & Mehta, 2023) around ``rule``: the rule's updates ``u``
    are scaled by a learned factor ``sum(s)``, ``p = x0 - sum(s)*Delta``, ``Delta`` the sum
    of the rule's updates so far (``x0`` the params at set-up); ``s`` holds one estimate per
    decay ``beta_i = 1 - 0.1**i``, ``i = 1..num_betas``. With ``S = sum(s)``,
    ``g' = g + weight_decay*S*||g||/(||p|| + eps)*p`` and ``Delta = (x0 - p)/(S + eps)``:

    ``h = <g', Delta>``; ``m <- max(beta*m, |h| + eps)``; ``v <- beta^2*v + h^2``;
    ``r <- beta*r + clip(h, -m_old, m_old)*s``; ``W = s_init/num_betas*m + max(r, 0)``;
    ``s <- W/(sqrt(v) + eps)``; ``p <- x0 - sum(s)*(Delta + u)``.

    As ``optax.contrib.mechanize(base, weight_decay, eps, s_init, num_betas)``, with the rule
    as the base optimizer (``uo.adam(..., convention="optax")`` for ``optax.adam``). The
    rule's hyperparameters are reached as ``"inner.<name>"`` (or by their name alone) by
    :func:`uniopt.adjust`; Mechanic's own numbers are fixed when it is built, so
    ``adjust(state, weight_decay=...)`` sets the rule's weight decay where it has one. The
    tree state: the rule's state (``inner``), ``x0``, and ``m``, ``v``, ``r``, ``s`` (each
    ``num_betas`` numbers).
    """

    like_params: ClassVar[tuple[str, ...]] = ("x0",)
    arrays_dtype: ClassVar[str] = "leaf"  # (x0: a copy of the params)
    # (its inner products and norms are of real vectors: complex ones gave NaN)
    real_only: ClassVar[bool] = True

    weight_decay: float
    eps: float
    s_init: float
    num_betas: int

    def __init__(self, rule: Any, weight_decay: float = 1e-2, eps: float = 1e-8,
                 s_init: float = 1e-6, num_betas: int = 6) -> None:
        for name, v in (("weight_decay", weight_decay), ("eps", eps), ("s_init", s_init)):
            if callable(v):
                raise TypeError(f"mechanize: {name} is a number fixed when it is built; it "
                                f"takes no schedule, got {v!r}")
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"mechanize: {name} must be a number, got {v!r}")
            if not 0 <= v < np.inf:
                raise ValueError(f"mechanize: {name} must be a number >= 0, got {v!r}")
        num_betas = check_integer("mechanize", "num_betas", num_betas, 1)
        object.__setattr__(self, "rule", adopted("mechanize", "rule", rule))
        object.__setattr__(self, "weight_decay", float(weight_decay))
        object.__setattr__(self, "eps", float(eps))
        object.__setattr__(self, "s_init", float(s_init))
        object.__setattr__(self, "num_betas", num_betas)
        object.__setattr__(self, "host", None)

    @property
    def uses_params(self) -> bool:  # type: ignore[override]
        return True

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return (tuple(shape),)  # (and its num_betas estimates: a few numbers)

    def init_tree(self, params: Any, state_dtype: str | None = None) -> Any:
        leaves = flatten_leaves(params)[0]
        n = self.num_betas
        return {"inner": setup(self.rule, params, state_dtype=state_dtype),
                "x0": [backend.detached_copy(p) for p in leaves],
                "m": scalar_like(leaves, [0.0] * n), "v": scalar_like(leaves, [0.0] * n),
                "r": scalar_like(leaves, [0.0] * n), "s": scalar_like(leaves, [self.s_init] * n)}

    def placeholder_tree(self, params: Any, member: Callable[[Transform], Any]) -> Any:
        return {"inner": member(self.rule), "x0": params, "m": 0, "v": 0, "r": 0, "s": 0}

    def _step(self, tree: Any, treedef: Any, ps: list[Any], gs: list[Any],
              mode: str, extra: dict[str, Any]) -> tuple[Any, list[Any] | None]:
        inner = dataclasses.replace(tree["inner"], rule=self.rule)
        us, inner = member_step(inner, ps, gs, extra)
        m, v, r, s = tree["m"], tree["v"], tree["r"], tree["s"]
        xp, dtype = backend.namespace(s), s.dtype
        s_sum = xp.sum(s)
        grad_norm = xp.sqrt(_tree_sum(xp, [g * g for g in gs], dtype))
        param_norm = xp.sqrt(_tree_sum(xp, [p * p for p in ps], dtype))
        decay = self.weight_decay * s_sum * grad_norm / (param_norm + self.eps)
        deltas = [(x0 - p) / _as(s_sum + self.eps, p) for x0, p in zip(tree["x0"], ps,
                                                                         strict=True)]
        h = _tree_sum(xp, [(g + _as(decay, p) * p) * d
                           for g, p, d in zip(gs, ps, deltas, strict=True)], dtype)
        betas = 1.0 - 0.1 ** backend.number(xp, list(range(1, self.num_betas + 1)), dtype, h)
        clipped = xp.minimum(xp.maximum(h, -m), m)
        m = xp.maximum(betas * m, xp.abs(h) + self.eps)
        v = betas ** 2 * v + h ** 2
        r = betas * r + clipped * s
        wealth = self.s_init / self.num_betas * m + xp.maximum(r, xp.zeros_like(r))
        s = wealth / (safe_sqrt(xp, v) + self.eps)  # (v is 0 at the first step)
        scale_ = xp.sum(s)
        new = [x0 - _as(scale_, p) * (d + u)
               for x0, p, d, u in zip(tree["x0"], ps, deltas, us, strict=True)]
        x0 = tree["x0"] if mode != PURE else [_as_new_array(x, x, (x,)) for x in tree["x0"]]
        state = {"inner": inner, "x0": x0, "m": m, "v": v, "r": r, "s": s}
        if mode == CHAIN:
            return state, [p - n for p, n in zip(ps, new, strict=True)]
        if mode == PURE:
            # (a 16-bit leaf's inner update comes back float32: rounded once to the leaf's
            # dtype, as assign rounds it in place)
            return state, [_as_new_array(n, p, (p,)) for p, n in zip(ps, new, strict=True)]
        for p, n in zip(ps, new, strict=True):
            backend.assign(p, n)
        return state, None


def _as(x: Any, like: Any) -> Any:
    """A 0-d ``x`` in leaf ``like``'s dtype (NumPy would widen a float32 leaf)."""
    return x if x.dtype == like.dtype else backend.namespace(like).astype(x, like.dtype)
