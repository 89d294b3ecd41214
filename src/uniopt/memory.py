"""How many bytes a rule's state takes on each rank, read from the rule's declared slots.

:func:`footprint` asks each part of the rule which arrays a leaf of each shape keeps and of
what shape (``Part.slot_shapes``: Adam two of the leaf's shape, Adafactor a row and a column
factor of a matrix; ``WholeTree.state_shapes``: Prodigy's moments, schedule-free's ``z``, a
combinator's members on the leaves each takes), so a new rule is counted without being listed
here; and :func:`state_bytes` measures a state that exists (the slots' arrays, 8-bit ones as
codes plus scales), which is what the tests hold :func:`footprint` to.

Strategies, per rank of ``world_size`` (the optimizer's share; activations and buffers of the
framework not counted):

* ``"ddp"``: every rank keeps the parameters, the gradients and the whole state.
* ``"zero1"``: every rank keeps the parameters and gradients; the state is split between the
  ranks as ZeRO stage 1 (``torch.distributed.optim.ZeroRedundancyOptimizer``) splits it:
  whole tensors, assigned largest first each to the rank with the fewest parameters so far.
  The count is its fullest rank's state; a number of parameters, one vector, which ZeRO
  would not split, counts as an even share (what ZeRO's ranks come near with many tensors).
* ``"fsdp2"``: parameters, gradients and state are split, each tensor along its first
  dimension, ``ceil(rows / world_size)`` rows on the first rank (the fullest); a slot of
  another shape than its parameter (Adafactor's factors, Shampoo's and SOAP's
  preconditioners, SM3's accumulators) is kept whole on every rank, as uniopt keeps it.

State dtypes: None (the slots in each parameter's dtype, as ``uo.setup`` keeps them),
``"float32"``, ``"float64"`` and ``"q8"`` (one byte per element and a float32 scale per block
of :data:`uniopt.quant.BLOCK` elements of each slot, :mod:`uniopt.quant`), as
``uo.setup(..., state_dtype=...)`` takes them; ``"bfloat16"``/``"float16"`` name the
parameters' own dtype, for parameters of that dtype. What ``uo.setup`` (or uniopt on shards,
or under ZeRO) refuses is refused here too. The step counter and the numbers a rule keeps for
the whole tree (a few bytes) are left out.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

from . import backend, quant
from .base import Combinator, PerLeaf, Transform, WholeTree, every_leaf_parts
from .engine import STATE_DTYPES as SETUP_STATE_DTYPES
from .engine import check_complex, check_state_dtype
from .interop import dtensor
from .tree import flatten_leaves, unflatten

__all__ = ["Footprint", "footprint", "state_bytes", "table"]

STRATEGIES = ("ddp", "zero1", "fsdp2")
ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
STATE_DTYPES = (*ITEMSIZE, "q8")
# a complex parameter's slots are made for the real pairs of its parts, in this dtype
COMPLEX = {"complex64": "float32", "complex128": "float64"}
PARAM_DTYPES = (*ITEMSIZE, *COMPLEX)
_BYTES = {**ITEMSIZE, "complex64": 8, "complex128": 16}


class Footprint(NamedTuple):
    """Bytes on one rank: the parameters, their gradients and the optimizer's state."""

    params: int
    grads: int
    state: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.state


class _Leaf:
    """A parameter known by its shape and dtype alone (of a count or a list of shapes): what
    the parts and a combinator's labels are asked about in its place."""

    def __init__(self, shape: tuple[int, ...], dtype: str) -> None:
        self.shape = shape
        try:
            self.dtype: Any = np.dtype(dtype)
        except TypeError:  # (bfloat16, where no library has made it NumPy's)
            self.dtype = dtype
        self.ndim = len(shape)
        self.size = math.prod(shape)

    def __repr__(self) -> str:
        return f"<a {self.dtype} parameter of shape {self.shape}>"


class _Array(NamedTuple):
    """An array a state keeps for a leaf: its shape, whether it is shaped as the leaf (FSDP2
    splits it as the leaf), and its dtype ("q8": 8-bit codes and scales)."""

    shape: tuple[int, ...]
    as_leaf: bool
    dtype: str


def _size(d: Any) -> int:
    if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0:
        raise ValueError
    return operator.index(d)


def _params(params: Any, param_dtype: str | None) -> tuple[list[Any], Any, list[str], bool]:
    """The leaves (stand-ins where ``params`` is a count or a list of shapes), their tree's
    structure, their dtypes and whether ``params`` was a count. ``params`` is a number of
    parameters (one vector), a list of shapes, or a tree of anything with a ``shape`` (arrays,
    ``jax.ShapeDtypeStruct``, torch meta tensors), whose dtypes are the leaves'."""
    given = param_dtype or "float32"
    if isinstance(params, numbers.Integral) and not isinstance(params, (bool, np.bool_)):
        n = operator.index(params)
        if n < 0:
            raise ValueError(f"footprint: the number of parameters must be >= 0, got {params}")
        leaves = [_Leaf((n,), given)]
        return leaves, flatten_leaves(leaves)[1], [given], True
    if isinstance(params, Iterable) and not hasattr(params, "shape") \
            and not isinstance(params, dict):
        items = list(params)
        if items and all(isinstance(s, tuple) for s in items):
            made: dict[tuple[Any, ...], _Leaf] = {}  # (a model's many leaves of one shape)
            leaves = []
            for s in items:
                key = (s, tuple(map(type, s)))  # (True == 1: a bool is no size)
                if key not in made:
                    try:
                        made[key] = _Leaf(tuple(map(_size, s)), given)
                    except (ValueError, TypeError):
                        raise ValueError(f"footprint: a shape is a tuple of sizes >= 0, got "
                                         f"{s!r}") from None
                leaves.append(made[key])
            return leaves, flatten_leaves(leaves)[1], [given] * len(leaves), False
        params = items
    leaves, treedef = flatten_leaves(params)
    if not leaves or not all(hasattr(x, "shape") for x in leaves):
        raise TypeError("footprint: params must be a number of parameters, a list of shapes or "
                        f"a tree of arrays (anything with a shape), got {params!r}")
    dtypes = []
    for x in leaves:
        dtype = getattr(x, "dtype", None)
        name = given if dtype is None else backend.dtype_name(dtype)
        if name not in PARAM_DTYPES:
            raise ValueError(f"footprint: a leaf of dtype {name} (shape {tuple(x.shape)}) is no "
                             f"parameter uniopt trains; their dtypes: {PARAM_DTYPES}")
        if param_dtype is not None and name != param_dtype:
            raise ValueError(f"footprint: param_dtype={param_dtype!r}, but a leaf (shape "
                             f"{tuple(x.shape)}) is {name}: the arrays' own dtypes are counted "
                             "(leave param_dtype out)")
        dtypes.append(name)
    return leaves, treedef, dtypes, False


def _local(shape: tuple[int, ...], world_size: int) -> tuple[int, ...]:
    """The fullest rank's share of a tensor split along its first dimension."""
    if not shape:
        return shape  # a scalar is not split: every rank keeps it
    return (-(-shape[0] // world_size), *shape[1:])


def _wider(dtype: str, state_dtype: str | None) -> str:
    """The dtype set-up hands a whole-tree part a leaf of ``dtype`` in (engine.tree_leaves)."""
    if state_dtype in ("float32", "float64") and _BYTES[state_dtype] > _BYTES[dtype]:
        return state_dtype
    return dtype


def _undeclared(rule: Transform, part: WholeTree) -> ValueError:
    return ValueError(
        f"footprint: {rule.name}'s whole-tree part {part.name} does not declare the arrays its "
        "state keeps per leaf (WholeTree.state_shapes); uniopt.memory.state_bytes(state) "
        "measures a state that exists (one that grows as it steps, after those steps)")


def _arrays(rule: Transform, treedef: Any, leaves: list[Any], keys: list[tuple[Any, str]],
            state_dtype: str | None) -> list[list[_Array]]:
    """The arrays ``uo.setup(rule, params, state_dtype=state_dtype)`` keeps for each leaf
    (``keys``: each one's shape and dtype): the slots, the whole-tree parts' arrays and a
    combinator's members' on the leaves each takes."""
    out: list[list[_Array]] = [[] for _ in leaves]
    for part in rule.flat_parts:
        if isinstance(part, Combinator):
            routes = part.leaves_of(treedef, leaves)
            for name, member in part.inner.items():
                # (set up as the combinator sets it up: the params with the others None)
                keep = set(routes[name])
                sub, subdef = flatten_leaves(unflatten(treedef, [
                    x if i in keep else None for i, x in enumerate(leaves)]))
                found = _arrays(member, subdef, sub, [keys[i] for i in routes[name]],
                                state_dtype)
                for i, arrays in zip(routes[name], found, strict=True):
                    out[i] += arrays
        memo: dict[tuple[Any, ...], list[_Array]] = {}
        for i, key in enumerate(keys):
            if key not in memo:
                memo[key] = _part_arrays(rule, part, key[0], key[1], state_dtype)
            out[i] += memo[key]
    return out


def _part_arrays(rule: Transform, part: Any, shape: tuple[int, ...], dtype: str,
                 state_dtype: str | None) -> list[_Array]:
    """The arrays ``part`` keeps for a leaf (a combinator: its own, beside its members')."""
    if isinstance(part, WholeTree):
        shapes = part.state_shapes(shape)
        if shapes is None:
            raise _undeclared(rule, part)
        kept = {"tree": _wider(dtype, state_dtype), "leaf": dtype,
                "state": state_dtype or dtype}[part.arrays_dtype]
        return [_Array(tuple(s), tuple(s) == shape, kept) for s in shapes]
    if isinstance(part, PerLeaf):
        reason = part.check_shape(shape)
        if reason:
            raise ValueError(f"footprint: {rule.name}: a leaf of shape {shape}: {reason}")
    # (a complex leaf's slots are made for the real pairs of its parts)
    seen = (*shape, 2) if dtype in COMPLEX else shape
    kept = state_dtype or COMPLEX.get(dtype, dtype)
    return [_Array(tuple(s), tuple(s) == seen, kept)
            for s in part.slot_shapes(seen) if s is not None]


def _bytes(a: _Array, shape: tuple[int, ...]) -> int:
    n = math.prod(shape)
    return n + 4 * quant.blocks(n) if a.dtype == "q8" else n * _BYTES[a.dtype]


def _zero_ranks(sizes: list[int], world_size: int) -> list[list[int]]:
    """The leaves (positions) each rank steps under ZeroRedundancyOptimizer (one param group):
    largest first (in their order where sizes tie), each to the rank with the fewest
    parameters so far (the first such rank)."""
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    held = [0] * world_size
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = held.index(min(held))
        ranks[r].append(i)
        held[r] += sizes[i]
    return ranks


def footprint(rule: Transform, params: Any, *, world_size: int = 1, strategy: str = "ddp",
              state_dtype: str | None = None, param_dtype: str | None = None) -> Footprint:
    """The bytes one rank keeps for ``params`` trained by ``rule``: the parameters and
    gradients, and the state ``uo.setup(rule, params, state_dtype=state_dtype)`` makes (None:
    the slots in the parameters' dtype), split as ``strategy`` splits them between
    ``world_size`` ranks (the fullest rank's count). A tree of arrays is counted in its own
    dtypes; ``param_dtype`` (float32 where not given) is that of a count or a list of shapes.

    >>> import uniopt as uo
    >>> from uniopt.memory import footprint
    >>> footprint(uo.adamw(), 10**9, world_size=8, strategy="zero1")
    Footprint(params=4000000000, grads=4000000000, state=1000000000)
    >>> footprint(uo.adamw(), [(4096, 4096)], state_dtype="q8").state  # codes + scales
    33619968
    """
    if not isinstance(rule, Transform):
        raise TypeError(f"footprint: expected a uniopt rule or transform, got {rule!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"footprint: strategy must be one of {STRATEGIES}, got {strategy!r}")
    if state_dtype is not None and state_dtype not in STATE_DTYPES:
        raise ValueError(f"footprint: state_dtype must be None or one of {STATE_DTYPES}, got "
                         f"{state_dtype!r}")
    if param_dtype is not None and param_dtype not in PARAM_DTYPES:
        raise ValueError(f"footprint: param_dtype must be None or one of {PARAM_DTYPES}, got "
                         f"{param_dtype!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"footprint: world_size must be an integer >= 1, got {world_size!r}")
    leaves, treedef, dtypes, count = _params(params, param_dtype)
    # what set-up takes: 16-bit slots are those of 16-bit params, kept in their own dtype
    kept = state_dtype
    if state_dtype in ("bfloat16", "float16"):
        if any(d != state_dtype for d in dtypes):
            raise ValueError(
                f"footprint: uo.setup keeps no {state_dtype} state for "
                f"{', '.join(sorted(set(dtypes) - {state_dtype}))} params (state_dtype takes "
                f"{SETUP_STATE_DTYPES}; the slots of {state_dtype} params are {state_dtype}: "
                f"give param_dtype={state_dtype!r} for a count or a list of shapes (a tree of "
                "arrays is counted in its own dtypes))")
        kept = None
    # (as uo.setup refuses them: a footprint of a state no set-up makes would mislead)
    complex_ = next((x for x, d in zip(leaves, dtypes, strict=True) if d in COMPLEX), None)
    if complex_ is not None:
        check_complex(rule, kept, f"a leaf of shape {tuple(complex_.shape)}", who="footprint")
    check_state_dtype(rule, kept, leaves, who="footprint")
    if strategy == "fsdp2":
        try:
            dtensor.check_rule(rule)
            if kept == "q8":
                dtensor.check_q8_rule(rule)
        except (TypeError, ValueError) as e:
            raise ValueError(f"footprint: strategy='fsdp2' (DTensor shards): "
                             f"{str(e).removeprefix('uniopt: ')}") from None
    if strategy == "zero1" and world_size > 1:
        parts = every_leaf_parts(rule)
        if parts:
            raise ValueError(
                f"footprint: strategy='zero1' on {world_size} ranks: {rule.name}'s "
                f"{', '.join(dict.fromkeys(p.name for p in parts))} reads every parameter at "
                "once, and ZeRO steps each rank's share alone (uniopt.torch refuses it there)")
    shapes = [tuple(int(d) for d in x.shape) for x in leaves]
    arrays = _arrays(rule, treedef, leaves, list(zip(shapes, dtypes, strict=True)), kept)
    split = strategy == "fsdp2" or (strategy == "zero1" and count)
    memo: dict[tuple[_Array, ...], int] = {}  # (a model's many leaves of one shape)
    state = []
    for kept_arrays in map(tuple, arrays):
        if kept_arrays not in memo:
            memo[kept_arrays] = sum(_bytes(a, _local(a.shape, world_size) if split and a.as_leaf
                                           else a.shape) for a in kept_arrays)
        state.append(memo[kept_arrays])
    if strategy == "zero1" and not count:
        total = max(sum(state[i] for i in rank)
                    for rank in _zero_ranks([math.prod(s) for s in shapes], world_size))
    else:
        total = sum(state)
    held = sum(math.prod(_local(s, world_size) if strategy == "fsdp2" else s) * _BYTES[d]
               for s, d in zip(shapes, dtypes, strict=True))
    return Footprint(params=held, grads=held, state=total)


def state_bytes(state: Any) -> int:
    """The bytes the slots of a :class:`~uniopt.State` (or any tree of arrays) hold, and the
    states of its whole-tree parts (Prodigy's moments, schedule-free's ``z``): each array's
    ``nbytes``, an 8-bit slot's codes and scales; the step counter and the numbers of the rule
    left out, as :func:`footprint` leaves them out."""
    from .state import State

    held = (state.slots, state.tree_states) if isinstance(state, State) else state
    leaves, _ = flatten_leaves(held)
    total = 0
    for x in leaves:
        if x is None or isinstance(x, (bool, int, float)):
            continue
        size = getattr(x, "nbytes", None)
        if size is None and not hasattr(x, "element_size"):
            continue  # (a noise draw's generator: no array)
        total += int(size) if size is not None else x.numel() * x.element_size()
    return total


SIZES = {"1B": 10**9, "7B": 7 * 10**9, "70B": 70 * 10**9}
WORLD = 8


def _table_rules() -> list[tuple[str, Transform, str, Any]]:
    from .rules.adafactor import adafactor
    from .rules.adam import adamw
    from .rules.sgd import sgd

    def matrices(n: int) -> list[tuple[int, ...]]:
        # Adafactor's factors depend on the shapes: the parameters as 4096 x 4096 matrices,
        # as many as come nearest to n
        return [(4096, 4096)] * round(n / 4096**2)

    return [
        ("`adamw`", adamw(), "float32", int),
        ("`adamw`", adamw(), "bfloat16", int),
        ("`adamw`", adamw(), "q8", int),
        ("`sgd(momentum=0.9)`", sgd(lr=0.1, momentum=0.9), "float32", int),
        ("`sgd(momentum=0.9)`", sgd(lr=0.1, momentum=0.9), "q8", int),
        ("`adafactor` (4096 × 4096 matrices)", adafactor(), "float32", matrices),
    ]


def _gb(n: int) -> str:
    x = n / 1e9
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def table() -> str:
    """The memory table of the docs' Scaling out page (docs/scaling-out.md), in Markdown:
    optimizer state and, after the slash, parameters + gradients + state, in GB per rank of 8,
    for 1B, 7B and 70B parameters."""
    names = {"ddp": "DDP", "zero1": "ZeRO-1", "fsdp2": "FSDP2"}
    head = ["rule", "state"] + [f"{size} {names[s]}" for size in SIZES for s in STRATEGIES]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, rule, dtype, shapes in _table_rules():
        param_dtype = "bfloat16" if dtype == "bfloat16" else "float32"
        cells = [label, dtype]
        for n in SIZES.values():
            for s in STRATEGIES:
                f = footprint(rule, shapes(n), world_size=WORLD, strategy=s, state_dtype=dtype,
                              param_dtype=param_dtype)
                cells.append(f"{_gb(f.state)} / {_gb(f.total)}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
