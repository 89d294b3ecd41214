"""Kahan-compensated parameter writes: updates that a low-precision parameter rounds away are
kept and handed to the next step, not lost.

A bfloat16 weight of 1.0 has a spacing of 2^-7 around it: an update smaller than half of that
leaves it unchanged, every step, however many steps add up to more ("stale weights",
Zamirai et al., "Revisiting BFloat16 Training", 2020). Their remedy is Kahan summation of the
updates into the weight, with a compensation buffer of the weight's shape. It is the paper's
Algorithm 2, with ``delta = -u`` the step a rule makes::

    y = delta - c          # this step's change, with what the last write lost
    t = w + y              # rounded to the parameter's dtype
    c = (t - w) - y        # what this write lost (in the computation's dtype)
    w = t

The rounding to the parameter's dtype is done in the arithmetic of the step itself (float32 for
16-bit parameters), so every path (the compiled loop, the multi-tensor path, the reference path
on NumPy, torch and JAX) computes the same bits: Veltkamp's split ``s*x - (s*x - x)`` with ``s =
2^16 + 1`` rounds a float32 to the 8 significant bits of bfloat16, to nearest with ties to even
as torch's conversion does (checked against it on every float32 of a binade, ties included,
and on a sixteenth of them negated and near the ends of the range); with ``s = 2^13 + 1`` to
float16's 11, and below float16's smallest normal number a float32 sum with ``0.75`` rounds to
its subnormal spacing, 2^-24. The
written value ``t`` is then exactly a value of the parameter's dtype. For float32 and float64
parameters ``s = 0``: ``t`` is the sum as computed, and ``c`` the classic Kahan compensation of
that rounding. Magnitudes past 2^100 are not rounded (no bfloat16 parameter is that large; it
keeps the split from overflowing), and infinities and NaNs pass through as without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..backend import dtype_name, is_bfloat16_bits_dtype
from ..base import Elementwise
from ..moments import select, unfolded

# past this magnitude values are not rounded: the split's product stays finite
_BIG = 2.0**100
# the split factor, the number that rounds to the subnormal spacing, and the magnitude below
# which it does, per stored dtype; other dtypes: no rounding (the computed sum itself)
_ROUNDING = {"bfloat16": (65537.0, 0.0, 0.0), "float16": (8193.0, 0.75, 2.0**-14)}


class Compensation(NamedTuple):
    # (numbers here, not in the kernel: a literal would be float64 in the compiled loop)
    split: Any  # Veltkamp's 2^k + 1 for the stored dtype's precision; 0: no rounding
    magic: Any  # a number whose float32 spacing is float16's subnormal spacing (0: none)
    tiny: Any  # float16's smallest normal magnitude: below it, magic rounds (0: never)
    big: Any  # past this magnitude nothing is rounded


def _stored(dtype: Any) -> str:
    """The name of ``dtype`` as the parameter stores it: a bfloat16 tensor's NumPy view of its
    bits (:data:`uniopt.backend.BFLOAT16_BITS`) is bfloat16."""
    return "bfloat16" if is_bfloat16_bits_dtype(dtype) else dtype_name(dtype)


def _rounded(xp: Any, c: Compensation, x: Any) -> Any:
    """``x`` rounded to the stored dtype (to nearest, ties to even), in ``x``'s arithmetic."""
    xc = xp.minimum(xp.maximum(x, -c.big), c.big)  # finite: the products below stay finite
    s = c.split * xc
    normal = s - unfolded(xp, s - xc)  # Veltkamp's split: xc to the stored dtype's significant bits
    subnormal = unfolded(xp, xc + c.magic) - c.magic
    r = select(xp, abs(xc) < c.tiny, subnormal, normal)
    return r + (x - xc)  # x itself past 2^100 (an infinity too), NaN as NaN


def kahan_kernel(xp, c, p, u, comp):
    y = -u - comp
    t = unfolded(xp, _rounded(xp, c, p + y))  # (under jax.jit, (t - p) - y is not taken for 0)
    # the engine writes p - (p - t): t itself wherever p - t is exact in float32 (p and t
    # within a factor of 2, or of 2^16 for bfloat16's 8 bits: every step short of a jump
    # across many binades)
    return p - t, (t - p) - y


@dataclass(frozen=True)
class kahan_summation(Elementwise):
    """The parameter written with Kahan-compensated summation: what rounding to its dtype
    takes from a step is kept in a slot (``compensation``, shaped as the parameter) and added
    to the next step, so updates too small for a bfloat16 (or float16) weight add up instead of
    being lost. Last in a chain: ``chain(adamw(lr=1e-4), kahan_summation())``.

    The written parameter is ``t = round(p - u - c)`` and ``c <- (t - p) - (-u - c)``, the
    paper's Algorithm 2 (see :mod:`uniopt.transforms.kahan`), with the rounding to the
    parameter's dtype done in the step's own float32 arithmetic, so every path writes the same
    bits. The slot is kept in the parameters' dtype (as in the paper), or wider with
    ``state_dtype="float32"``, which keeps each step's loss exactly; for float32 and float64
    parameters it compensates their own rounding.

    >>> import numpy as np, uniopt as uo
    >>> p = [np.ones(1, np.float16)]
    >>> state = uo.setup(uo.chain(uo.sgd(lr=1e-4), uo.kahan_summation()), p)
    >>> for _ in range(100):  # each step 1e-4: under half float16's spacing at 1.0 (2^-10)
    ...     state = uo.update_(state, p, [np.ones(1, np.float16)])
    >>> p[0]  # without it: still 1.0
    array([0.99], dtype=float16)
    """

    slots: ClassVar[tuple[str, ...]] = ("compensation",)
    by_dtype = True
    # (it rounds what is written, p - u to the bit: an average before it is of p - u)
    after_average: ClassVar[bool] = True

    def coeffs(self, step: Any) -> Compensation:
        return Compensation(split=0.0, magic=0.0, tiny=0.0, big=_BIG)

    def for_dtype(self, c: Any, dtype: Any) -> Any:
        values = _ROUNDING.get(_stored(dtype))
        return c if values is None else Compensation(*values, big=_BIG)

    kernel = staticmethod(kahan_kernel)
