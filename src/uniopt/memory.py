"""How many bytes a rule's state takes on each rank, read from the rule's declared slots.

:func:`footprint` asks the rule (``Transform.slot_shapes_of``) which slots a leaf of each shape
keeps and of what shape (Adam: two of the leaf's shape; Adafactor: a row and a column factor
of a matrix), so a new rule is counted without being listed here; and :func:`state_bytes`
measures a state that exists (the slots' arrays, 8-bit ones as codes plus scales), which is
what the tests hold :func:`footprint` to.

Strategies, per rank of ``world_size`` (the optimizer's share; activations and buffers of the
framework not counted):

* ``"ddp"``: every rank keeps the parameters, the gradients and the whole state.
* ``"zero1"``: every rank keeps the parameters and gradients; the state is split between the
  ranks (ZeRO stage 1, ``torch.distributed.optim.ZeroRedundancyOptimizer``).
* ``"fsdp2"``: parameters, gradients and state are all split (FSDP2: each tensor along its
  first dimension).

A split is counted as FSDP2 cuts a tensor, ``ceil(rows / world_size)`` rows on the first rank
(the fullest), for the state under ZeRO-1 too: torch's ZeroRedundancyOptimizer assigns whole
tensors to ranks greedily by size, so its fullest rank can hold more than an even share;
:func:`footprint` of the shapes a rank was given is that rank's exact count.

State dtypes: ``"float32"``, ``"float64"``, ``"bfloat16"``, ``"float16"`` (slots in that
dtype; ``bfloat16``/``float16`` are what a rule keeps for parameters of that dtype, as uniopt
keeps slots in the parameters' dtype unless ``setup(..., state_dtype=...)``) and ``"q8"`` (one
byte per element and a float32 scale per block of :data:`uniopt.quant.BLOCK` elements of each
slot, :mod:`uniopt.quant`). The step counter and the rule's numbers (a few bytes) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

from . import quant
from .base import Transform
from .engine import state_dtype_refusal
from .tree import flatten_leaves

__all__ = ["Footprint", "footprint", "state_bytes", "table"]

STRATEGIES = ("ddp", "zero1", "fsdp2")
ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
STATE_DTYPES = (*ITEMSIZE, "q8")


class Footprint(NamedTuple):
    """Bytes on one rank: the parameters, their gradients and the optimizer's state."""

    params: int
    grads: int
    state: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.state


def _shapes(params: Any) -> list[tuple[int, ...]]:
    """The leaves' shapes: ``params`` is a number of parameters (one vector), a list of
    shapes, or a tree of anything with a ``shape`` (arrays, ``jax.ShapeDtypeStruct``, torch
    meta tensors)."""
    if isinstance(params, int) and not isinstance(params, bool):
        if params < 0:
            raise ValueError(f"footprint: the number of parameters must be >= 0, got {params}")
        return [(params,)]
    if isinstance(params, Iterable) and not hasattr(params, "shape") \
            and not isinstance(params, dict):
        items = list(params)
        if items and all(isinstance(s, tuple) for s in items):
            for s in items:
                if not all(isinstance(d, int) and d >= 0 for d in s):
                    raise ValueError(f"footprint: a shape is a tuple of sizes >= 0, got {s!r}")
            return items
        params = items
    leaves, _ = flatten_leaves(params)
    if not leaves or not all(hasattr(x, "shape") for x in leaves):
        raise TypeError("footprint: params must be a number of parameters, a list of shapes or "
                        f"a tree of arrays (anything with a shape), got {params!r}")
    return [tuple(int(d) for d in x.shape) for x in leaves]


def _local(shape: tuple[int, ...], world_size: int) -> tuple[int, ...]:
    """The fullest rank's share of a tensor split along its first dimension."""
    if not shape:
        return shape  # a scalar is not split: every rank keeps it
    return (-(-shape[0] // world_size), *shape[1:])


def _slot_bytes(rule: Transform, shapes: list[tuple[int, ...]], state_dtype: str) -> int:
    total = 0
    for shape in shapes:
        for s in rule.slot_shapes_of(shape).values():
            if s is None:
                continue
            n = math.prod(s)
            total += n + 4 * quant.blocks(n) if state_dtype == "q8" else n * ITEMSIZE[state_dtype]
    return total


def footprint(rule: Transform, params: Any, *, world_size: int = 1, strategy: str = "ddp",
              state_dtype: str = "float32", param_dtype: str = "float32") -> Footprint:
    """The bytes one rank keeps for ``params`` trained by ``rule``: parameters and gradients in
    ``param_dtype``, the state's slots in ``state_dtype``, split as ``strategy`` splits them
    between ``world_size`` ranks (the fullest rank's count).

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
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"footprint: state_dtype must be one of {STATE_DTYPES}, got "
                         f"{state_dtype!r}")
    if param_dtype not in ITEMSIZE:
        raise ValueError(f"footprint: param_dtype must be one of {tuple(ITEMSIZE)}, got "
                         f"{param_dtype!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"footprint: world_size must be an integer >= 1, got {world_size!r}")
    if rule.tree_layout:
        raise ValueError(
            f"footprint: {rule.name} has whole-tree parts ({', '.join(rule.tree_layout)}) whose "
            "state is not declared per leaf; count each member rule on its own leaves")
    # (as uo.setup refuses them: a footprint of a state no set-up makes would mislead)
    refused = state_dtype_refusal(rule, state_dtype, param_dtype == "float64")
    if refused is not None:
        raise ValueError(f"footprint: uo.setup refuses state_dtype={state_dtype!r} for "
                         f"{rule.name} on {param_dtype} params ({refused[0].name}: "
                         f"{refused[1]})")
    shapes = _shapes(params)
    local = [_local(s, world_size) for s in shapes]
    kept = local if strategy == "fsdp2" else shapes
    n = sum(math.prod(s) for s in kept)
    state = _slot_bytes(rule, shapes if strategy == "ddp" else local, state_dtype)
    size = ITEMSIZE[param_dtype]
    return Footprint(params=n * size, grads=n * size, state=state)


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
