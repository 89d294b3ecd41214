"""8-bit state: each slot kept as one byte per element, in blocks with one float32 scale each.

The idea of bitsandbytes' 8-bit optimizers (Dettmers et al., 2022, "8-bit Optimizers via
Block-wise Quantization"): a slot is cut into blocks of :data:`BLOCK` elements (of the leaf
raveled in C order, the last block short); each block keeps its largest magnitude ``absmax``
as a float32 and every element as a code of one byte, the index of the nearest value of a
fixed map of 256 numbers in [-1, 1] (or [0, 1]) that ``x / absmax`` is rounded to. A step
reads a slot as ``map[code] * absmax`` (float32), runs the rule's kernels in float32, and
writes the new values back as codes and scales, the scales taken from the new values.

The map is dynamic-tree quantisation (the paper's, not linear): the magnitudes are 0, 1 and,
in each of the decades [1e-k, 1e-(k-1)] from the smallest up, the midpoints of 2, 4, 8, ...
equal parts of it. A linear map (x/absmax rounded to multiples of 1/127) loses what is small
beside the block's largest: the second moment spans orders of magnitude within a block and a
linear code rounds most of it to zero, where Adam's ``m / (sqrt(v) + eps)`` then divides by eps
(the paper's ablation: linear 8-bit Adam is unstable). The dynamic map keeps about two
significant digits over six (signed) or seven (unsigned) decades.

- The **signed** map (a slot that may be negative, Adam's first moment): an int8 code, its sign
  the value's sign and its magnitude (0..127) the index into the 128 magnitudes of six decades.
  Symmetric: zero is exact and ``-x`` codes as ``-code(x)``; -128 is never written.
- The **unsigned** map (a slot that is never negative, Adam's second moment): a uint8 code
  (0..255) into the 256 magnitudes of seven decades; a negative value rounds to code 0.

Rounding is to the nearest code: the index of the first midpoint between neighbouring map
values (as float32) that is at least the magnitude, so a value exactly halfway goes to the
smaller magnitude. The same float32 comparisons on every library give the same codes.

Which map a slot gets is decided at set-up by its name (:data:`NONNEGATIVE`, the slots that
rules keep as squares or maxima of magnitudes); every other slot takes the signed map, which is
right for any slot, if coarser for a non-negative one.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import numpy as np
import optree

from . import backend
from .hyper import _traced
from .tree import NAMESPACE

BLOCK = 2048

# slot names that every rule keeping them keeps non-negative (sums and averages of squares,
# maxima of magnitudes): they take the unsigned map, one more bit of precision
NONNEGATIVE = frozenset({"exp_avg_sq", "max_exp_avg_sq", "exp_inf", "square_avg", "acc_delta",
                         "sum"})


def magnitudes(bits: int) -> np.ndarray:
    """The ``2**bits`` magnitudes of the dynamic map, ascending, in float64: 0, then in each
    of ``bits - 1`` decades (the smallest first) the midpoints of 2, 4, 8... equal parts of
    it, then 1."""
    decades = bits - 1
    out = [0.0]
    for i in range(decades):
        edges = np.linspace(0.1, 1.0, 2 ** (i + 1) + 1)
        out.extend(10.0 ** (i + 1 - decades) * (edges[:-1] + edges[1:]) / 2)
    out.append(1.0)
    return np.array(out)


def _tables(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The map's magnitudes as float32, and the float32 midpoints between neighbours."""
    m = magnitudes(bits)
    return m.astype(np.float32), ((m[:-1] + m[1:]) / 2).astype(np.float32)


# signed: 7 bits of magnitude, unsigned: 8
MAG_S, MID_S = _tables(7)
MAG_U, MID_U = _tables(8)
# the value of each signed code, at index code + 128 (-128, never written, reads as -1)
VALUE_S = np.concatenate([[-1.0], -MAG_S[:0:-1], MAG_S]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Q8:
    """One slot of one leaf in 8 bits: ``codes`` (int8: the signed map, uint8: the unsigned
    map) shaped as the slot, and ``absmax`` (float32, one per block of :data:`BLOCK`
    elements). A pytree of its two arrays (optree's and, once JAX is imported, JAX's)."""

    codes: Any
    absmax: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def signed(self) -> bool:
        return backend.dtype_name(self.codes.dtype) == "int8"

    def __repr__(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        return f"Q8({kind}, shape={self.shape})"


def _flatten(q: Q8) -> tuple[tuple[Any, Any], None, tuple[str, str]]:
    return (q.codes, q.absmax), None, ("codes", "absmax")


def _unflatten(_: Any, children: Any) -> Q8:
    return Q8(*children)


optree.register_pytree_node(
    Q8,  # type: ignore[arg-type]
    _flatten,  # type: ignore[arg-type]
    _unflatten,  # type: ignore[arg-type]
    namespace=NAMESPACE,
)


def register_jax() -> None:
    """Make :class:`Q8` a JAX pytree, once (JAX is never imported here)."""
    jax = sys.modules.get("jax")
    if jax is None or getattr(register_jax, "done", False):
        return
    jax.tree_util.register_pytree_with_keys(
        Q8,
        lambda q: (((jax.tree_util.GetAttrKey("codes"), q.codes),
                    (jax.tree_util.GetAttrKey("absmax"), q.absmax)), None),
        lambda _, children: Q8(*children),
        lambda q: ((q.codes, q.absmax), None),
    )
    register_jax.done = True  # type: ignore[attr-defined]


def blocks(size: int) -> int:
    """How many blocks a slot of ``size`` elements has (at least one)."""
    return max(1, math.ceil(size / BLOCK))


def _padded(xp: Any, flat: Any, size: int) -> Any:
    """``flat`` (``size`` elements) with zeros to a whole number of blocks, as (blocks, BLOCK)."""
    nb = blocks(size)
    pad = nb * BLOCK - size
    if pad:
        flat = xp.concat([flat, xp.zeros(pad, dtype=flat.dtype, device=backend.device(flat))])
    return xp.reshape(flat, (nb, BLOCK))


# the elements quantised at a time outside jax.jit (whole blocks): the search's temporaries
# take some 30 bytes an element, which for a whole leaf (an embedding table's) came to several
# times what its float32 slots take, at set-up, where 8 bits are chosen to save memory
PIECE = 512 * BLOCK


def quantise(xp: Any, x: Any, signed: bool) -> Q8:
    """``x`` (float32) in 8 bits: each block's absmax, each element's nearest code."""
    shape, size = tuple(x.shape), math.prod(x.shape)
    if size > PIECE and not _traced(x):
        flat = xp.reshape(x, (-1,))
        pieces = [_quantised(xp, flat[i:i + PIECE], signed) for i in range(0, size, PIECE)]
        return Q8(xp.reshape(xp.concat([q.codes for q in pieces]), shape),
                  xp.concat([q.absmax for q in pieces]))
    return _quantised(xp, x, signed)


def _quantised(xp: Any, x: Any, signed: bool) -> Q8:
    """:func:`quantise` of ``x`` at once."""
    shape, size = tuple(x.shape), math.prod(x.shape)
    dev = backend.device(x)
    grid = _padded(xp, xp.reshape(x, (-1,)), size)
    absmax = xp.max(xp.abs(grid), axis=1)
    # a block holding a NaN has a NaN scale, as NumPy's maximum and the compiled loop give it:
    # XLA's CPU row reduction drops NaNs (jax 0.10: the max of rows [1, ..., 1, nan] is -inf)
    absmax = xp.where(xp.any(xp.isnan(grid), axis=1), xp.full_like(absmax, xp.nan), absmax)
    # an all-zero block codes as zeros with any scale: divided by one, not by zero
    scale = xp.where(absmax > 0, absmax, xp.ones_like(absmax))
    y = xp.reshape(grid / scale[:, None], (-1,))
    mids = xp.asarray(MID_S if signed else MID_U, device=dev)
    mag = xp.searchsorted(mids, xp.abs(y), side="left")
    # the sign is the sign bit, a NaN's too, as the compiled loop reads it: a negative value
    # takes the negated code (signed) or 0 (unsigned), -0.0 and a negative NaN included
    neg = xp.signbit(y)
    mag = xp.where(neg, -mag, mag) if signed else xp.where(neg, xp.zeros_like(mag), mag)
    codes = xp.astype(mag, xp.int8 if signed else xp.uint8)
    return Q8(xp.reshape(codes[:size], shape), absmax)


def dequantise(xp: Any, q: Q8) -> Any:
    """``q``'s values, float32, shaped as its slot."""
    shape = q.shape
    size = math.prod(shape)
    dev = backend.device(q.codes)
    flat = xp.reshape(q.codes, (-1,))
    if q.signed:
        table = xp.asarray(VALUE_S, device=dev)
        idx = xp.astype(flat, xp.int32) + 128
    else:
        table = xp.asarray(MAG_U, device=dev)
        idx = xp.astype(flat, xp.int32)
    values = _padded(xp, xp.take(table, idx), size) * q.absmax[:, None]
    return xp.reshape(xp.reshape(values, (-1,))[:size], shape)


def zeros(xp: Any, like: Any, signed: bool) -> Q8:
    """The 8-bit slot of zeros for a leaf shaped as ``like``, on its device."""
    dev = backend.device(like)
    shape = tuple(like.shape)
    return Q8(xp.zeros(shape, dtype=xp.int8 if signed else xp.uint8, device=dev),
              xp.zeros(blocks(math.prod(shape)), dtype=xp.float32, device=dev))


def nbytes(q: Q8) -> int:
    """The bytes ``q`` holds: its codes and its scales."""
    return math.prod(q.shape) + 4 * math.prod(q.absmax.shape)
