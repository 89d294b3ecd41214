"""The optimizer state: a pytree of the step counter, the per-leaf slots and the whole-tree
parts' states, with the rule and the params' structure alongside."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import optree

from .base import Transform
from .tree import NAMESPACE


class AnyParams:
    """The params structure of a state made for optax's placeholder params
    (``optax.tree.map_params`` sets up with a stand-in for them, maps over the state made and
    the state it is given together, and returns a state with the structure of the first):
    equal to every structure, so that the placeholder's state is a prefix of every state of
    its rule. The state that comes out takes the params' structure at its first step (its slots
    are checked against the params, as every state's are)."""

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "AnyParams()"


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
    step: Any
    slots: dict[str, list[Any]]
    treedef: Any
    # mixed precision: the dtype (a name, e.g. "float32") the slots are kept and the step is
    # computed in, when it differs from the params' (set by ``setup(..., state_dtype=...)``)
    state_dtype: str | None = None
    tree_states: dict[str, Any] = dataclasses.field(default_factory=dict)
    # each leaf's own step count, once a step has left some leaf out (its gradient was None):
    # an integer array (JAX's int32, else NumPy's int64); None while every leaf's is ``step``
    counts: Any = None

    if not TYPE_CHECKING:  # (for the type checker, no attribute is missing)
        def __getattr__(self, name: str) -> Any:
            # a state rebuilt from a JAX pytree's leaves (uniopt.interop.jax) builds its rule
            # when first asked: a jitted loop hands the state from step to step unlooked-at
            lazy = self.__dict__.get("_lazy_rule") if name == "rule" else None
            if lazy is None:
                raise AttributeError(f"'State' object has no attribute {name!r}")
            build, *args = lazy
            rule = self.__dict__["rule"] = build(*args)
            return rule

    def __getstate__(self) -> dict[str, Any]:
        # (not the JAX numbers' array that flattening keeps: a cache, made again when needed)
        return {"rule": self.rule, **{k: v for k, v in self.__dict__.items()
                                      if k not in ("_lazy_rule", "_numbers")}}

    def __repr__(self) -> str:
        trees = f", tree_states={sorted(self.tree_states)}" if self.tree_states else ""
        return f"State(rule={self.rule!r}, step={self.step}, slots={sorted(self.slots)}{trees})"


def stepped(s: State, step: Any, slots: dict[str, list[Any]]) -> State:
    """``s`` at count ``step`` with ``slots``, every other field as it is: the state a step
    returns, made without a frozen dataclass's setattr per field (a third of a microsecond
    where the whole of a small model's step is fifteen)."""
    new = object.__new__(State)
    new.__dict__.update(rule=s.rule, step=step, slots=slots, treedef=s.treedef,
                        state_dtype=s.state_dtype, tree_states=s.tree_states, counts=None)
    return new


def _flatten(s: State) -> tuple[tuple[Any, ...], tuple[Any, ...], tuple[str, ...]]:
    children = (s.step, s.slots, s.tree_states, s.counts)
    return children, (s.rule, s.treedef, s.state_dtype), ("step", "slots", "tree_states",
                                                          "counts")


def _unflatten(aux: tuple[Any, ...], children: tuple[Any, ...]) -> State:
    return State(aux[0], children[0], children[1], aux[1], aux[2], children[2], children[3])


optree.register_pytree_node(
    State,  # type: ignore[arg-type]
    _flatten,  # type: ignore[arg-type]
    _unflatten,  # type: ignore[arg-type]
    namespace=NAMESPACE,
)


def to_tree(state: State) -> dict[str, Any]:
    """``state`` as nested dicts and lists of its arrays and numbers (each whole-tree part's
    state, a member's :class:`State` included, likewise): what a checkpoint or a torch
    ``state_dict`` holds. The arrays are the state's own, not copies."""
    out = {"step": state.step, "slots": {k: list(v) for k, v in state.slots.items()},
           "tree_states": {k: _plain(v) for k, v in state.tree_states.items()}}
    return out if state.counts is None else {**out, "counts": state.counts}


def _plain(x: Any) -> Any:
    if isinstance(x, State):
        return to_tree(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def from_tree(template: State, tree: Any, load: Any, where: str = "state") -> State:
    """The state ``template`` (set up for the same rule and params) with the values of
    ``tree`` (from :func:`to_tree`): each array through ``load(value, like, where)``, which
    checks and converts it to the template's array ``like`` (an int: a step count, checked to
    be one; None: the per-leaf step counts, which a template has not). Raises, naming the
    entry, where the two differ in structure."""
    if not isinstance(tree, dict) or not {"step", "slots", "tree_states"} <= set(tree):
        got = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(f"{where}: expected a state (step, slots, tree_states), got {got}")

    def walk(t: Any, v: Any, at: str) -> Any:
        if isinstance(t, State):
            return from_tree(t, v, load, at)
        if isinstance(t, dict):
            if not isinstance(v, dict) or set(v) != set(t):
                got = sorted(v) if isinstance(v, dict) else type(v).__name__
                raise ValueError(f"{at}: expected the entries {sorted(t)}, got {got}")
            return {k: walk(t[k], v[k], f"{at}.{k}") for k in t}
        if isinstance(t, (list, tuple)):
            if not isinstance(v, (list, tuple)) or len(v) != len(t):
                raise ValueError(f"{at}: expected {len(t)} entries, got "
                                 f"{len(v) if isinstance(v, (list, tuple)) else type(v).__name__}")
            return [walk(a, b, f"{at}[{i}]") for i, (a, b) in enumerate(zip(t, v, strict=True))]
        if t is None:
            if v is not None:
                raise ValueError(f"{at}: expected nothing, got {type(v).__name__}")
            return None
        if isinstance(t, (bool, float)):
            return type(t)(v)
        return load(v, t, at)  # (a step count too: load checks it against the int)

    counts = tree.get("counts")
    if counts is not None:
        counts = load(counts, None, f"{where}.counts")
        held = np.asarray(counts)
        if held.dtype.kind not in "iu" or (held < 0).any():
            raise ValueError(f"{where}.counts: {_shown(counts)} are not whole numbers of steps "
                             ">= 0")
        n = template.treedef.num_leaves
        if held.shape != (n,):  # (the next step would refuse it, after the load went in)
            raise ValueError(f"{where}.counts: {_shown(counts)} counts steps for "
                             f"{held.size} leaves, the state's params are {n}")
    return dataclasses.replace(
        template, step=walk(template.step, tree["step"], f"{where}.step"),
        slots=walk(template.slots, tree["slots"], f"{where}.slots"),
        tree_states=walk(template.tree_states, tree["tree_states"], f"{where}.tree_states"),
        counts=counts)


def _shown(v: Any) -> str:
    """A loaded value as a message shows it: a tensor's or array's numbers, cut short."""
    s = repr(v.tolist() if hasattr(v, "tolist") else v)
    return s if len(s) <= 60 else s[:57] + "..."
