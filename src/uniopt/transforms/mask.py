"""A stateless block on some leaves only, chosen as optax chooses them (a tree of bools or a
function of the params)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import optree

from .. import backend
from ..base import Elementwise, PerLeaf, Transform, WholeTree
from ..tree import NAMESPACE, flatten_leaves, unflatten


@dataclass(frozen=True)
class Mask:
    """A tree of bools kept as its structure and its leaves: hashable, so a record that holds
    one can be static data for ``jax.jit``."""

    treedef: Any
    leaves: tuple[bool, ...]

    def tree(self) -> Any:
        return unflatten(self.treedef, list(self.leaves))


def is_bool(x: Any) -> bool:
    """Whether ``x`` is a bool: Python's, NumPy's, or a 0-d array of bools (JAX's, torch's)."""
    return isinstance(x, bool) or (getattr(x, "dtype", None) is not None
                                   and getattr(x, "shape", None) == ()
                                   and str(x.dtype) in ("bool", "torch.bool"))


def frozen_mask(owner: str, what: str, mask: Any) -> Any:
    """``mask`` as a record keeps it: None, True and functions as they are, a tree of bools as
    a :class:`Mask`; any other leaf (a glob, a number) is a TypeError naming ``owner``'s field
    ``what`` and the leaf, where ``bool()`` would take it silently."""
    if mask is None or mask is True or callable(mask) or isinstance(mask, Mask):
        return mask
    leaves, treedef = flatten_leaves(mask)
    for x in leaves:
        if not is_bool(x):
            raise TypeError(
                f"{owner}: {what} must be None, a tree of bools like the params (or a prefix of "
                f"it) or a function of the params that returns one; it holds {x!r}")
    return Mask(treedef, tuple(bool(x) for x in leaves))


@dataclass(frozen=True)
class masked_block(WholeTree):
    """``block`` on the leaves ``mask`` selects; the others' updates pass through as they come:
    optax's ``masked`` of a stateless transformation (the ``mask=`` of its
    ``add_decayed_weights``, LARS's ``trust_ratio_mask``). ``block`` is an elementwise or
    per-leaf part that keeps no slots (a weight decay, a trust ratio); ``mask`` is a tree of
    bools shaped like the params or a prefix of it, or a function of the params that returns
    one, as optax takes it; a leaf that is no bool (a glob, a number) is refused.
    (:func:`uniopt.masked` runs a whole rule on some leaves, and selects them by path too.)"""

    block: Any = None
    mask: Any = True
    uses_params: ClassVar[bool] = True

    def check(self) -> None:
        object.__setattr__(self, "mask", frozen_mask(self.name, "mask", self.mask))
        if not isinstance(self.block, (Elementwise, PerLeaf)) or self.block.slots or (
                isinstance(self.block, Elementwise) and self.block.needs_norm):
            raise TypeError(f"{self.name}: block must be an elementwise or per-leaf part that "
                            f"keeps no slots and needs no norm, got {self.block!r}")

    def coeffs(self, step: Any) -> Any:
        return self.block.at(step).coeffs(step)

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return ()

    def init_tree(self, params: Any) -> Any:
        return {}

    def selected(self, params: Any, u: Any) -> list[bool]:
        """Whether each leaf (in :func:`uniopt.trainables` order) is the block's."""
        mask = (self.mask(params) if callable(self.mask) else
                self.mask.tree() if isinstance(self.mask, Mask) else self.mask)
        try:
            flags = optree.tree_broadcast_prefix(mask, u, namespace=NAMESPACE)
        except ValueError as e:
            raise ValueError(f"{self.name}: the mask is not shaped like the params (or a prefix "
                             f"of them): {e}") from None
        leaves = flatten_leaves(flags)[0]
        for x in leaves:
            if not is_bool(x):  # (a function's answer: bool() would take a glob as True)
                raise TypeError(f"{self.name}: the mask function must return a tree of bools; "
                                f"it holds {x!r}")
        return [bool(x) for x in leaves]

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any,
                   **extra: Any) -> tuple[Any, Any]:
        leaves, treedef = flatten_leaves(u)
        ps = flatten_leaves(params)[0]
        out = []
        for x, p, on in zip(leaves, ps, self.selected(params, u), strict=True):
            if on:
                xp = backend.namespace(x)
                if isinstance(self.block, PerLeaf):
                    lc = self.block.leaf_coeffs(c, tuple(x.shape))
                    if self.block.batched:  # a batch of one leaf
                        one = self.block.apply(xp, lc, xp.expand_dims(p, axis=0),
                                               xp.expand_dims(x, axis=0))
                        x = one[0][0, ...]
                    else:
                        x = self.block.apply(xp, lc, p, x)[0]
                else:
                    x = self.block.kernel(xp, c, p, x)[0]
            out.append(x)
        return unflatten(treedef, out), state


def masked_by(block: Transform, mask: Any) -> Transform:
    """``block`` where ``mask`` selects every leaf (None or True), else :class:`masked_block`."""
    if mask is None or mask is True:
        return block
    return masked_block(block=block, mask=mask)
