"""The optimizer state: a pytree of the step counter, the per-leaf slots and the whole-tree
parts' states, with the rule and the params' structure alongside."""

from __future__ import annotations

import dataclasses
from typing import Any

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

    def __repr__(self) -> str:
        trees = f", tree_states={sorted(self.tree_states)}" if self.tree_states else ""
        return f"State(rule={self.rule!r}, step={self.step}, slots={sorted(self.slots)}{trees})"


def _flatten(s: State) -> tuple[tuple[Any, ...], tuple[Any, ...], tuple[str, ...]]:
    children = (s.step, s.slots, s.tree_states)
    return children, (s.rule, s.treedef, s.state_dtype), ("step", "slots", "tree_states")


def _unflatten(aux: tuple[Any, ...], children: tuple[Any, ...]) -> State:
    return State(aux[0], children[0], children[1], aux[1], aux[2], children[2])


optree.register_pytree_node(
    State,  # type: ignore[arg-type]
    _flatten,  # type: ignore[arg-type]
    _unflatten,  # type: ignore[arg-type]
    namespace=NAMESPACE,
)
