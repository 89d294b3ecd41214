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


def pack(tree: Any) -> tuple[Any, Any]:
    """``(flat, views)``: the arrays of ``tree`` copied into one contiguous 1-D buffer, and the
    same tree whose leaves are views into that buffer.

    Opt in to it when the model can hold the views: set up and update with ``[flat]`` (and the
    gradients packed the same way), and one update is one pass over one buffer, whatever the
    number of tensors. Writing through a view writes the buffer, and the reverse.

    >>> import numpy as np, uniopt as uo
    >>> flat, views = uo.pack({"w": np.ones((2, 2)), "b": np.zeros(3)})
    >>> flat.shape, views["w"].base is flat
    ((7,), True)
    """
    from .backend import namespace

    leaves, treedef, _ = flatten(tree)
    if not leaves:
        raise ValueError("pack: the tree holds no arrays")
    xp = namespace(leaves[0])
    dtypes = {str(x.dtype) for x in leaves}
    if len(dtypes) > 1:
        raise ValueError(f"pack: every array must have one dtype, got {sorted(dtypes)}")
    flat = xp.concat([xp.reshape(x, (-1,)) for x in leaves])
    views, start = [], 0
    for x in leaves:
        n = 1
        for d in x.shape:
            n *= int(d)
        views.append(xp.reshape(flat[start : start + n], tuple(x.shape)))
        start += n
    return flat, unflatten(treedef, views)
