"""Parameter trees, through optree.

A params tree is any nesting of dicts, lists, tuples and namedtuples (and dataclasses once
registered with :func:`register_dataclass`, and any node type JAX knows: flax and equinox
modules, ``jax.tree_util.register_dataclass`` classes) whose leaves are arrays; ``None`` leaves
are allowed and hold nothing. :func:`trainables` lists the arrays in optree's order (JAX's too):
dict entries sorted by key, sequences and namedtuple/dataclass fields in order, depth first. A
flat list of gradients must follow that order.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import optree

from .backend import is_variable

NAMESPACE = "uniopt"


def flatten(tree: Any) -> tuple[list[Any], Any, list[tuple[Any, ...]]]:
    """``(leaves, treedef, paths)``; ``None`` is an empty subtree, not a leaf."""
    paths, leaves, treedef = optree.tree_flatten_with_path(tree, namespace=NAMESPACE)
    while again := _adopt_jax_nodes(leaves):  # a module may hold modules of other types
        if again is _UNWRAP:
            tree = _unwrapped(tree)
            if tree is None:
                break
        paths, leaves, treedef = optree.tree_flatten_with_path(tree, namespace=NAMESPACE)
    return leaves, treedef, paths


def flatten_leaves(tree: Any) -> tuple[list[Any], Any]:
    """``(leaves, treedef)``: :func:`flatten` without the paths."""
    leaves, treedef = optree.tree_flatten(tree, namespace=NAMESPACE)
    while again := _adopt_jax_nodes(leaves):
        if again is _UNWRAP:
            tree = _unwrapped(tree)
            if tree is None:
                break
        leaves, treedef = optree.tree_flatten(tree, namespace=NAMESPACE)
    return leaves, treedef


def _unwrapped(tree: Any) -> Any:
    """``tree`` with each of flax NNX's Variables that holds no array replaced by what it
    holds (see :func:`_adopt_jax_nodes`); None where JAX's flattening reaches none of them
    (inside a node only optree knows)."""
    import jax

    changed = []

    def open_(x: Any) -> Any:
        if _holds_no_array(x):
            changed.append(x)
            return x.get_value()
        return x

    out = jax.tree.map(open_, tree, is_leaf=_holds_no_array)
    return out if changed else None


def _holds_no_array(x: Any) -> bool:
    return is_variable(type(x)) and not hasattr(x.get_value(), "shape")


_UNWRAP = object()  # _adopt_jax_nodes: a Variable holds no array


def flatten_named(tree: Any) -> tuple[list[Any], Any, list[str]]:
    """``(leaves, treedef, names)``, each leaf's name as :func:`path_str` writes it: the
    names are made once per tree structure (a step's error messages use them)."""
    leaves, treedef = flatten_leaves(tree)
    return leaves, treedef, leaf_names(treedef)


def leaf_names(treedef: Any) -> list[str]:
    """Each leaf's name in ``treedef`` as :func:`path_str` writes it (``params['a']``)."""
    try:
        return _names(treedef)
    except TypeError:  # a node whose metadata cannot be hashed
        return _names.__wrapped__(treedef)


@functools.lru_cache(maxsize=256)
def _names(treedef: Any) -> list[str]:
    # (callers only read it)
    return [path_str(p) for p in optree.treespec_paths(treedef)]


_NOT_NODES: set[type] = set()  # leaf types JAX does not flatten


def _adopt_jax_nodes(leaves: list[Any]) -> Any:
    """Register with optree every type among ``leaves`` that JAX flattens (a module of flax or
    equinox, a ``jax.tree_util.register_dataclass``): JAX's own flattening, one level at a
    time, so the leaves come in JAX's order. Whether any was new (true: flatten again), or
    :data:`_UNWRAP` where a leaf is a flax NNX Variable holding no array: a label (a tree of
    them made by ``jax.tree.map`` over the model's Params), or optax's ``MaskedNode``
    (``optax.masked`` and ``multi_transform`` map over the Params NNX sets a rule up from),
    which the tree is flattened without. A Variable holding an array is a leaf, an array of
    its own: NNX sets a rule up from Params and steps their arrays."""
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    tu = jax.tree_util
    new: set[type] = set()
    for leaf in leaves:
        cls = type(leaf)
        if cls in _NOT_NODES or cls in new or hasattr(leaf, "__array_namespace__"):
            continue
        if is_variable(cls):
            # (flax NNX's Variable, an array's wrapper, is never made a node: one that held a
            # label made a node of its type for every later tree of the process, and the
            # Params NNX sets a rule up from no longer matched the arrays it steps)
            if _holds_no_array(leaf):
                return _UNWRAP
            continue
        if tu.treedef_is_leaf(tu.tree_structure(leaf)):
            _NOT_NODES.add(cls)
            continue

        def one_level(x: Any) -> tuple[list[Any], Any, list[Any]]:
            keyed, treedef = tu.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
            return [c for _, c in keyed], treedef, [_key(path[0]) for path, _ in keyed]

        optree.register_pytree_node(
            cls,
            one_level,
            lambda treedef, children: tu.tree_unflatten(treedef, children),
            namespace=NAMESPACE,
        )
        new.add(cls)
    return bool(new)


def _key(k: Any) -> Any:
    """The name or index inside a JAX key path entry (GetAttrKey, DictKey, SequenceKey...)."""
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def unflatten(treedef: Any, leaves: list[Any]) -> Any:
    return optree.tree_unflatten(treedef, leaves)


def named_paths(treedef: Any) -> list[tuple[Any, ...]]:
    """Each leaf's path in ``treedef``, a namedtuple's fields by their names (optree's paths
    index them, where a dataclass's are named): what masks and labels match."""
    return [tuple(e.field if isinstance(e, optree.NamedTupleEntry) else e.entry for e in a)
            for a in optree.treespec_accessors(treedef)]


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
