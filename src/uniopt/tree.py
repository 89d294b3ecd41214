"""Parameter trees, through optree.

A params tree is any nesting of dicts, lists, tuples and namedtuples (and dataclasses once
registered with :func:`register_dataclass`) whose leaves are arrays; ``None`` leaves are allowed
and hold nothing. :func:`trainables` lists the arrays in optree's order: dict entries sorted by
key, sequences and namedtuple/dataclass fields in order, depth first. A flat list of gradients
must follow that order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optree

NAMESPACE = "uniopt"


def flatten(tree: Any) -> tuple[list[Any], Any, list[tuple[Any, ...]]]:
    """``(leaves, treedef, paths)``; ``None`` is an empty subtree, not a leaf."""
    paths, leaves, treedef = optree.tree_flatten_with_path(tree, namespace=NAMESPACE)
    return leaves, treedef, paths


def unflatten(treedef: Any, leaves: list[Any]) -> Any:
    return optree.tree_unflatten(treedef, leaves)


def path_str(path: tuple[Any, ...]) -> str:
    """``params['layer'][0]``: how error messages name a leaf."""
    return "params" + "".join(f"[{k!r}]" for k in path)


def trainables(params: Any) -> list[Any]:
    """The arrays of ``params``, in the order a flat gradient list must follow.

    >>> import numpy as np, uniopt as uo
    >>> [a.tolist() for a in uo.trainables({"b": np.zeros(1), "a": [np.ones(2), None]})]
    [[1.0, 1.0], [0.0]]
    """
    return flatten(params)[0]


def register_dataclass(cls: type) -> type:
    """Make instances of a dataclass ``cls`` a node of params trees; returns ``cls``.

    Every field is a child, in declaration order. Usable as a decorator.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"register_dataclass: {cls!r} is not a dataclass")
    names = tuple(f.name for f in dataclasses.fields(cls))

    def flat(x: Any) -> tuple[tuple[Any, ...], None, tuple[str, ...]]:
        return tuple(getattr(x, n) for n in names), None, names

    def unflat(_: None, children: Any) -> Any:
        return cls(**dict(zip(names, children, strict=True)))

    optree.register_pytree_node(
        cls,  # type: ignore[arg-type]
        flat,
        unflat,  # type: ignore[arg-type]
        path_entry_type=optree.GetAttrEntry,
        namespace=NAMESPACE,
    )
    return cls
