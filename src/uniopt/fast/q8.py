# mypy: disable-error-code="call-arg"
"""The compiled CPU loop for 8-bit state (:mod:`uniopt.quant`): one pass over memory per step.

As :mod:`uniopt.fast.cpu`'s loop, with the slots kept as codes and block scales. For each block
of :data:`~uniopt.quant.BLOCK` elements, four simple loops over buffers of one block per slot
that stay in the L1 cache: the codes into float32 values; the rule's kernels on p, g and the
buffers, writing p; each buffer's largest magnitude (an integer maximum of the bits of ``|x|``,
which vectorizes), the block's new scale; and each new value's nearest code. Memory sees p, g
and one byte per slot read and written: 10 bytes per element for Adam in place, where float32
state moves 28. The step is bound by its arithmetic, not by memory, but the rule's loop reads p
and g faster than the CPU's prefetchers fetch them after the codes' loop: the codes are written
:data:`_PIECE` at a time, each piece followed by prefetches of its share of the next block's p,
g and codes (a one-thread step on W1: 13% less time).

Reading and writing codes are table look-ups: numba's compiler does not vectorize a loop that
reads a table at computed indices (a gather), and a scalar look-up per element, or a search, was
most of the step. The two loops are written in LLVM's IR with explicit vectors and linked into
each generated loop: with AVX-512 VBMI's byte permutes, 64 at a time (:func:`_ir_vbmi`), or
else with gathers, 16 at a time (:func:`_ir_gather`: ``llvm.masked.gather``, one instruction
where the CPU has AVX2/AVX-512, element by element where not), the same numbers either way.
A code's value: the map's float32 value at the code, times the block's scale.
A value's code: the nearest code of ``x / scale`` (the float32 quotient), found from the
magnitude's float32 bits (sign cleared, all above 1, NaN and infinity too, taken as 1); with
gathers by one look-up and one comparison: the bits shifted right by ``shift`` index a table
whose entry holds ``c0``, the number of the map's float32 midpoints below the values of that
index, and the low bits of the one midpoint at most among them (``shift`` is chosen so that
there is at most one; none: all ones, which no value of the index exceeds); the code is ``c0``,
plus one if the magnitude is above that midpoint. That is the index of the first midpoint at or
above it, as the reference path's search finds (a value exactly on a midpoint takes the smaller
magnitude). :func:`code_table` checks the table against the midpoints when it is built, and
tests/test_q8.py checks the codes against the search at every midpoint and either side of it;
the codes of every float32 were checked once. A negative value takes the negated code in the
signed map and code 0 in the unsigned one, by its sign bit (-0.0 and NaNs with the sign bit set
included).
"""

from __future__ import annotations

import hashlib
import os
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import types as nbtypes
from numba.core import cgutils
from numba.extending import intrinsic

from .. import backend, quant
from ..base import Elementwise
from . import cpu

# the generated loops inline this module's functions: their cached machine code is keyed by
# this module's source as well as cpu's
_VERSION = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:12]

# the midpoints' bits above which each map's table is indexed: the finest shifts (the smallest
# tables: 1,237 entries signed, 2,900 unsigned) that leave at most one midpoint per entry
SHIFT_S, SHIFT_U = 17, 16
# float32 bits of 1.0: a magnitude's bits are clamped to it (NaN and infinity take the last code)
_ONE = 0x3F800000


def code_table(mids: np.ndarray, shift: int) -> tuple[int, np.ndarray]:
    """The look-up table for the map whose float32 midpoints are ``mids`` (ascending, in
    (0, 1)), and its first index ``lo``: entry ``j`` is for the magnitudes whose bits shifted
    right by ``shift`` are ``lo + j`` (every smaller magnitude is taken as ``lo``'s, below the
    first midpoint), up to 1.0's. Each entry: ``c0 << shift | low``, ``c0`` the number of
    midpoints below the entry's smallest magnitude, ``low`` the low ``shift`` bits of the one
    midpoint of the entry (all ones where none). Raises ValueError where an entry would hold
    two midpoints."""
    bits = mids.view(np.uint32).astype(np.int64)
    lo = int(bits[0] >> shift) - 1
    index = np.arange(lo, (_ONE >> shift) + 1, dtype=np.int64)
    first = (index << shift).astype(np.uint32).view(np.float32).copy()
    first[0] = 0.0
    c0 = np.searchsorted(mids, first, side="left").astype(np.int64)
    at = (bits >> shift) - lo
    if len(np.unique(at)) != len(at):
        raise ValueError(f"shift {shift} leaves two midpoints in one entry")
    low = np.full(len(index), (1 << shift) - 1, np.int64)
    low[at] = bits & ((1 << shift) - 1)
    return lo, (c0 << shift) | low


# each code's value by its byte (a signed code's two's complement), so that codes read as
# unsigned bytes index it
VALUE_S = np.concatenate([quant.MAG_S, [-1.0], -quant.MAG_S[:0:-1]]).astype(np.float32)
VALUE_U = quant.MAG_U

_LANES = 16


def _splat(kind: str, value: int) -> str:
    return "<" + ", ".join([f"{kind} {value}"] * _LANES) + ">"


def _ir_gather(tag: str) -> str:
    """The IR of ``uniopt_q8_{codes,values}_{s,u}_<tag>(src, dst, n, scale)``: ``n`` codes at
    ``src`` to values at ``dst`` (times ``scale``), or ``n`` values at ``src`` to codes at
    ``dst`` (of the value over ``scale``), 16 at a time by gathers (any CPU). The codes' last
    16 are read and written under a mask; the values' buffer holds whole 16s (64s for
    :func:`_ir_vbmi`'s: a block's buffer, 2,048, does)."""
    v16 = _LANES
    lanes = "<" + ", ".join(f"i64 {j}" for j in range(v16)) + ">"
    on = "<" + ", ".join(["i1 true"] * v16) + ">"
    out = [
        f"declare <{v16} x i32> @llvm.masked.gather.v{v16}i32.v{v16}p0"
        f"(<{v16} x ptr>, i32, <{v16} x i1>, <{v16} x i32>)",
        f"declare <{v16} x float> @llvm.masked.gather.v{v16}f32.v{v16}p0"
        f"(<{v16} x ptr>, i32, <{v16} x i1>, <{v16} x float>)",
        f"declare <{v16} x i8> @llvm.masked.load.v{v16}i8.p0(ptr, i32, <{v16} x i1>, <{v16} x i8>)",
        f"declare void @llvm.masked.store.v{v16}i8.p0(<{v16} x i8>, ptr, i32, <{v16} x i1>)",
        f"declare <{v16} x i32> @llvm.umin.v{v16}i32(<{v16} x i32>, <{v16} x i32>)",
        f"declare <{v16} x i32> @llvm.umax.v{v16}i32(<{v16} x i32>, <{v16} x i32>)",
    ]
    for k, mids, shift, values in (("s", quant.MID_S, SHIFT_S, VALUE_S),
                                   ("u", quant.MID_U, SHIFT_U, VALUE_U)):
        lo, table = code_table(mids, shift)
        floats = ", ".join(f"float 0x{np.float64(x).view(np.uint64):016X}" for x in values)
        out += [
            f"@table_{k} = private unnamed_addr constant [{len(table)} x i32] ["
            + ", ".join(f"i32 {int(x)}" for x in table) + "]",
            f"@value_{k} = private unnamed_addr constant [256 x float] [{floats}]",
        ]
        # a negative value (its sign bit): the negated code (signed), code 0 (unsigned)
        sign = ("  %negated = sub <16 x i32> zeroinitializer, %code\n"
                "  %r = select <16 x i1> %neg, <16 x i32> %negated, <16 x i32> %code"
                if k == "s" else
                "  %r = select <16 x i1> %neg, <16 x i32> zeroinitializer, <16 x i32> %code")
        out.append(f"""
define void @uniopt_q8_codes_{k}_{tag}(ptr noalias nocapture readonly %w, ptr noalias nocapture %c,
                                    i64 %n, float %d) {{
entry:
  %d0 = insertelement <16 x float> poison, float %d, i64 0
  %dv = shufflevector <16 x float> %d0, <16 x float> poison, <16 x i32> zeroinitializer
  br label %loop
loop:
  %i = phi i64 [0, %entry], [%next, %latch]
  %rem = sub i64 %n, %i
  %more = icmp sgt i64 %rem, 0
  br i1 %more, label %body, label %done
body:
  %pw = getelementptr float, ptr %w, i64 %i
  %x = load <16 x float>, ptr %pw, align 4
  %y = fdiv <16 x float> %x, %dv
  %b = bitcast <16 x float> %y to <16 x i32>
  %neg = icmp slt <16 x i32> %b, zeroinitializer
  %mag = and <16 x i32> %b, {_splat("i32", 0x7FFFFFFF)}
  %a = call <16 x i32> @llvm.umin.v16i32(<16 x i32> %mag, <16 x i32> {_splat("i32", _ONE)})
  %h0 = lshr <16 x i32> %a, {_splat("i32", shift)}
  %h = call <16 x i32> @llvm.umax.v16i32(<16 x i32> %h0, <16 x i32> {_splat("i32", lo)})
  %j = sub <16 x i32> %h, {_splat("i32", lo)}
  %pe = getelementptr i32, ptr @table_{k}, <16 x i32> %j
  %e = call <16 x i32> @llvm.masked.gather.v16i32.v16p0(<16 x ptr> %pe, i32 4, <16 x i1> {on},
                                                       <16 x i32> poison)
  %low = and <16 x i32> %e, {_splat("i32", (1 << shift) - 1)}
  %high = shl <16 x i32> %h, {_splat("i32", shift)}
  %mid = or <16 x i32> %high, %low
  %above = icmp ugt <16 x i32> %a, %mid
  %one = zext <16 x i1> %above to <16 x i32>
  %c0 = lshr <16 x i32> %e, {_splat("i32", shift)}
  %code = add <16 x i32> %c0, %one
{sign}
  %r8 = trunc <16 x i32> %r to <16 x i8>
  %pc = getelementptr i8, ptr %c, i64 %i
  %whole = icmp sge i64 %rem, 16
  br i1 %whole, label %all, label %part
all:
  store <16 x i8> %r8, ptr %pc, align 1
  br label %latch
part:
  %r0 = insertelement <16 x i64> poison, i64 %rem, i64 0
  %rv = shufflevector <16 x i64> %r0, <16 x i64> poison, <16 x i32> zeroinitializer
  %mask = icmp slt <16 x i64> {lanes}, %rv
  call void @llvm.masked.store.v16i8.p0(<16 x i8> %r8, ptr %pc, i32 1, <16 x i1> %mask)
  br label %latch
latch:
  %next = add i64 %i, 16
  br label %loop
done:
  ret void
}}

define void @uniopt_q8_values_{k}_{tag}(ptr noalias nocapture readonly %c, ptr noalias nocapture %w,
                                     i64 %n, float %f) {{
entry:
  %f0 = insertelement <16 x float> poison, float %f, i64 0
  %fv = shufflevector <16 x float> %f0, <16 x float> poison, <16 x i32> zeroinitializer
  br label %loop
loop:
  %i = phi i64 [0, %entry], [%next, %read]
  %rem = sub i64 %n, %i
  %more = icmp sgt i64 %rem, 0
  br i1 %more, label %body, label %done
body:
  %pc = getelementptr i8, ptr %c, i64 %i
  %whole = icmp sge i64 %rem, 16
  br i1 %whole, label %all, label %part
all:
  %ca = load <16 x i8>, ptr %pc, align 1
  br label %read
part:
  %r0 = insertelement <16 x i64> poison, i64 %rem, i64 0
  %rv = shufflevector <16 x i64> %r0, <16 x i64> poison, <16 x i32> zeroinitializer
  %mask = icmp slt <16 x i64> {lanes}, %rv
  %cp = call <16 x i8> @llvm.masked.load.v16i8.p0(ptr %pc, i32 1, <16 x i1> %mask,
                                                   <16 x i8> zeroinitializer)
  br label %read
read:
  %cb = phi <16 x i8> [%ca, %all], [%cp, %part]
  %z = zext <16 x i8> %cb to <16 x i32>
  %pv = getelementptr float, ptr @value_{k}, <16 x i32> %z
  %v = call <16 x float> @llvm.masked.gather.v16f32.v16p0(<16 x ptr> %pv, i32 4, <16 x i1> {on},
                                                         <16 x float> poison)
  %x = fmul <16 x float> %v, %fv
  %pw = getelementptr float, ptr %w, i64 %i
  store <16 x float> %x, ptr %pw, align 4
  %next = add i64 %i, 16
  br label %loop
done:
  ret void
}}""")
    return "\n".join(out)



# --- the same functions with AVX-512 VBMI's byte permutes, 64 elements at a time ---------------
#
# A gather loads its 16 elements one by one on some CPUs (AMD's Zen 4: a 16-lane gather costs
# about as much as 16 loads), and was then most of the step. With VBMI, a table of 256 bytes is
# read for 64 indices by two two-register byte permutes (128 entries each) and a blend on the
# index's top bit; a table of 256 float32 is four such byte tables (one per byte of the
# float32), interleaved back into float32s. A code's value is that look-up. A value's code:
# the piece of the map (code 0, one decade, code 1) from the binade of the magnitude (its
# exponent: a binade holds at most one piece's end, so a 32-entry table of the piece below and
# the cut inside, and one comparison); in the piece, whose midpoints are equally spaced but for
# their float32 rounding, ``t = a / step + offset`` (float32), whose fraction at each midpoint
# is 1/2, whatever the rounding of a few units in the last place. Where no lane of 64 has t
# within :data:`_NEAR` of a midpoint's, the code is t rounded, held to the piece's codes. Else
# ``c' = floor(t)``, so held, is the code or the code less one, and the float32 midpoint at
# ``c'`` (the look-up above) says which: the code is ``c'``, plus one if the magnitude is above
# it. (The look-up was a third of the function's time, and is needed for about one vector in
# 30.) The same code as the gather's, for every float32 (checked once over all 2**32;
# tests/test_q8.py checks each piece's ends and every midpoint and either side of it).

# how near a midpoint (in t, whose step between codes is 1) a value takes the exact look-up: 16
# times t's largest error at a midpoint and the float32 values either side of it (1.5e-5, in t
# up to 255, whose float32 spacing is 1.5e-5); about one vector of 64 in 30 takes it
_NEAR = 2.0 ** -12
_LOW_BINADE = 96  # binades from 2**-31 up (2**-31 < every map's first midpoint); below: the first


def piece_tables(mids: np.ndarray, bits: int) -> tuple[list[int], list[float], list[float],
                                                          list[float], list[int]]:
    """For the map of ``2**bits`` magnitudes with float32 midpoints ``mids``: per binade
    (exponent ``_LOW_BINADE + j``, j < 32) the number of piece cuts below it and the cut inside
    it (2.0, above every magnitude, where none); per piece (code 0; the decades; code 1) the
    slope and offset of ``c'`` and its largest code. Raises ValueError where a binade holds two
    cuts."""
    decades = bits - 1
    cuts = np.array([mids[2 ** k - 2] for k in range(1, bits + 1)], np.float32)
    below, inside = [], []
    for j in range(32):
        low = np.uint32((_LOW_BINADE + j) << 23).view(np.float32) if j else np.float32(0.0)
        high = np.uint32((_LOW_BINADE + j + 1) << 23).view(np.float32)
        there = cuts[(cuts >= low) & (cuts < high)]
        if len(there) > 1:
            raise ValueError(f"binade {j} holds {len(there)} cuts")
        below.append(int(np.sum(cuts < low)))
        inside.append(float(there[0]) if len(there) else 2.0)
    last = 2 ** bits - 1
    # code 0's and code 1's pieces: t is a constant a quarter above the code (floor and
    # round both give it, and no lane there is near a midpoint)
    slope, offset = [0.0] * 16, [0.25] + [0.0] * 15
    most = [0] * 16
    for k in range(1, decades + 1):
        step = 0.9 * 10.0 ** (k - decades) / 2 ** k
        first = float(mids[2 ** k - 1])  # the piece's first midpoint: c' = 2**k - 1 + 1/2 there
        slope[k], offset[k] = 1.0 / step, 2 ** k - 1 + 0.5 - first / step
        most[k] = 2 ** (k + 1) - 2
    offset[bits], most[bits] = last + 0.25, last
    return below, inside, slope, offset, most


def _vector(kind: str, values: Any) -> str:
    if kind == "float":
        return "<" + ", ".join(f"float 0x{np.float64(np.float32(x)).view(np.uint64):016X}"
                               for x in values) + ">"
    if kind == "i8":
        values = np.asarray(values, np.uint8).view(np.int8)
    return "<" + ", ".join(f"{kind} {int(x)}" for x in values) + ">"


def _unpack(half: int, lane: int) -> str:
    """The mask of AVX-512's unpack within 128-bit lanes of two vectors of ``4 * lane``
    elements: each lane's low (``half`` 0) or high half of the first and the second,
    interleaved."""
    n, h = 4 * lane, lane // 2
    return "<" + ", ".join(f"i32 {lane * q + half * h + i + side * n}" for q in range(4)
                           for i in range(h) for side in (0, 1)) + ">"


# the unpacks below leave element 16 r + 4 q + j of their four results (r) in lane q, place j:
# the indices are put there first, so that the results come out in order
_SPREAD = "<" + ", ".join(f"i32 {16 * r + 4 * q + j}" for q in range(4) for r in range(4)
                          for j in range(4)) + ">"


def _lookup(name: str, index: str, table: np.ndarray) -> list[str]:
    """IR: ``%{name}`` (64 x i32) the float32 bits of ``table`` (256 float32, or 128: the
    indices are below 128) at the 64 byte indices ``%{index}``: each byte of the float32 from
    its own table, the four bytes then put together by unpacks."""
    planes = np.ascontiguousarray(table.astype(np.float32)).view(np.uint8).reshape(-1, 4)
    x = f"%{name}x"
    out = [f"  {x} = shufflevector <64 x i8> %{index}, <64 x i8> poison, <64 x i32> {_SPREAD}",
           f"  %{name}top = icmp slt <64 x i8> {x}, zeroinitializer"]
    for p in range(4):
        t = planes[:, p]
        out.append(f"  %{name}{'lo' if len(t) > 128 else 'p'}{p} = call <64 x i8> "
                   f"@llvm.x86.avx512.vpermi2var.qi.512(<64 x i8> {_vector('i8', t[0:64])}, "
                   f"<64 x i8> {x}, <64 x i8> {_vector('i8', t[64:128])})")
        if len(t) > 128:
            out += [f"  %{name}hi{p} = call <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512("
                    f"<64 x i8> {_vector('i8', t[128:192])}, <64 x i8> {x}, "
                    f"<64 x i8> {_vector('i8', t[192:256])})",
                    f"  %{name}p{p} = select <64 x i1> %{name}top, <64 x i8> %{name}hi{p}, "
                    f"<64 x i8> %{name}lo{p}"]
    for half in (0, 1):  # bytes 0, 1 and 2, 3 of each float32 as 16-bit halves
        for pair in ("01", "23"):
            out += [f"  %{name}b{pair}{half} = shufflevector <64 x i8> %{name}p{pair[0]}, "
                    f"<64 x i8> %{name}p{pair[1]}, <64 x i32> {_unpack(half, 16)}",
                    f"  %{name}w{pair}{half} = bitcast <64 x i8> %{name}b{pair}{half} "
                    "to <32 x i16>"]
    for r in range(4):  # result r: elements 16 r .. 16 r + 15
        out += [f"  %{name}d{r} = shufflevector <32 x i16> %{name}w01{r // 2}, "
                f"<32 x i16> %{name}w23{r // 2}, <32 x i32> {_unpack(r % 2, 8)}",
                f"  %{name}e{r} = bitcast <32 x i16> %{name}d{r} to <16 x i32>"]
    return out + _joined(f"{name}e", name)


def _joined(name: str, out: str) -> list[str]:
    """IR: ``%{out}`` (64 x i32) the four quarters ``%{name}0`` .. ``%{name}3`` (16 x i32)."""
    return [
        f"  %{out}01 = shufflevector <16 x i32> %{name}0, <16 x i32> %{name}1, "
        f"<32 x i32> {_vector('i32', range(32))}",
        f"  %{out}23 = shufflevector <16 x i32> %{name}2, <16 x i32> %{name}3, "
        f"<32 x i32> {_vector('i32', range(32))}",
        f"  %{out} = shufflevector <32 x i32> %{out}01, <32 x i32> %{out}23, "
        f"<64 x i32> {_vector('i32', range(64))}",
    ]


def _ir_vbmi(tag: str) -> str:
    """:func:`_ir_gather`'s functions, 64 elements at a time with VBMI's byte permutes."""
    out = [
        "declare <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8>, <64 x i8>, <64 x i8>)",
        "declare <16 x i32> @llvm.x86.avx512.vpermi2var.d.512(<16 x i32>, <16 x i32>, "
        "<16 x i32>)",
        "declare <16 x float> @llvm.x86.avx512.vpermi2var.ps.512(<16 x float>, <16 x i32>, "
        "<16 x float>)",
        "declare <16 x float> @llvm.x86.avx512.permvar.sf.512(<16 x float>, <16 x i32>)",
        "declare <16 x i32> @llvm.x86.avx512.permvar.si.512(<16 x i32>, <16 x i32>)",
        "declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)",
        "declare <16 x float> @llvm.roundeven.v16f32(<16 x float>)",
        "declare <16 x float> @llvm.fabs.v16f32(<16 x float>)",
        "declare <16 x i32> @llvm.umax.v16i32(<16 x i32>, <16 x i32>)",
        "declare <16 x i32> @llvm.smin.v16i32(<16 x i32>, <16 x i32>)",
        "declare <64 x i32> @llvm.umin.v64i32(<64 x i32>, <64 x i32>)",
        "declare <64 x i8> @llvm.masked.load.v64i8.p0(ptr, i32, <64 x i1>, <64 x i8>)",
        "declare void @llvm.masked.store.v64i8.p0(<64 x i8>, ptr, i32, <64 x i1>)",
    ]
    lanes = _vector("i64", range(64))
    for k, mids, bits, values in (("s", quant.MID_S, 7, VALUE_S), ("u", quant.MID_U, 8, VALUE_U)):
        below, inside, slope, offset, most = piece_tables(mids, bits)
        # c' may be the last code: no midpoint above it (a signed c' is below 128)
        padded = np.full(len(mids) + 1, 2.0, np.float32)
        padded[:len(mids)] = mids
        body = []
        for j in range(4):  # the quarters, 16 lanes each: the piece, c'
            body += [
                f"  %a{j} = shufflevector <64 x i32> %a, <64 x i32> poison, "
                f"<16 x i32> {_vector('i32', range(16 * j, 16 * j + 16))}",
                f"  %af{j} = bitcast <16 x i32> %a{j} to <16 x float>",
                f"  %e{j} = lshr <16 x i32> %a{j}, {_splat('i32', 23)}",
                # the permutes read the low five bits: exponents 96..127 are entries 0..31
                f"  %ej{j} = call <16 x i32> @llvm.umax.v16i32(<16 x i32> %e{j}, "
                f"<16 x i32> {_splat('i32', _LOW_BINADE)})",
                f"  %pb{j} = call <16 x i32> @llvm.x86.avx512.vpermi2var.d.512(<16 x i32> "
                f"{_vector('i32', below[:16])}, <16 x i32> %ej{j}, <16 x i32> "
                f"{_vector('i32', below[16:])})",
                f"  %cut{j} = call <16 x float> @llvm.x86.avx512.vpermi2var.ps.512(<16 x float> "
                f"{_vector('float', inside[:16])}, <16 x i32> %ej{j}, <16 x float> "
                f"{_vector('float', inside[16:])})",
                f"  %past{j} = fcmp ogt <16 x float> %af{j}, %cut{j}",
                f"  %pz{j} = zext <16 x i1> %past{j} to <16 x i32>",
                f"  %pc{j} = add <16 x i32> %pb{j}, %pz{j}",
                f"  %sl{j} = call <16 x float> @llvm.x86.avx512.permvar.sf.512(<16 x float> "
                f"{_vector('float', slope)}, <16 x i32> %pc{j})",
                f"  %of{j} = call <16 x float> @llvm.x86.avx512.permvar.sf.512(<16 x float> "
                f"{_vector('float', offset)}, <16 x i32> %pc{j})",
                f"  %mo{j} = call <16 x i32> @llvm.x86.avx512.permvar.si.512(<16 x i32> "
                f"{_vector('i32', most)}, <16 x i32> %pc{j})",
                f"  %t{j} = call <16 x float> @llvm.fma.v16f32(<16 x float> %af{j}, "
                f"<16 x float> %sl{j}, <16 x float> %of{j})",
                # round(t), held to the piece's last code, is the code wherever t is not
                # within _NEAR of a midpoint (its t is c' + 1/2): in piece k, t > 2**k - 1.4
                # (its lower cut is 0.8 of a step below its first midpoint, 0.86 in the first
                # decade), and above the piece's last midpoint no code is higher
                f"  %rd{j} = call <16 x float> @llvm.roundeven.v16f32(<16 x float> %t{j})",
                f"  %df{j} = fsub <16 x float> %t{j}, %rd{j}",
                f"  %ad{j} = call <16 x float> @llvm.fabs.v16f32(<16 x float> %df{j})",
                f"  %nm{j} = fcmp ogt <16 x float> %ad{j}, "
                f"{_vector('float', [0.5 - _NEAR] * 16)}",
                f"  %nb{j} = bitcast <16 x i1> %nm{j} to i16",
                f"  %ri{j} = fptosi <16 x float> %rd{j} to <16 x i32>",
                f"  %f{j} = call <16 x i32> @llvm.smin.v16i32(<16 x i32> %ri{j}, "
                f"<16 x i32> %mo{j})",
            ]
        body += [
            "  %nb01 = or i16 %nb0, %nb1",
            "  %nb23 = or i16 %nb2, %nb3",
            "  %nball = or i16 %nb01, %nb23",
            "  %near = icmp ne i16 %nball, 0",
            "  br i1 %near, label %exact, label %rounded",
            "rounded:",
            *_joined("f", "cf"),
            "  br label %coded",
            # a lane near a midpoint: c' = floor(t) is the code or the code less one (t's
            # fraction at a midpoint is 1/2, whatever its rounding), and the float32 midpoint
            # at c' says which
            "exact:",
        ]
        for j in range(4):
            body += [f"  %ti{j} = fptosi <16 x float> %t{j} to <16 x i32>",
                     f"  %c{j} = call <16 x i32> @llvm.smin.v16i32(<16 x i32> %ti{j}, "
                     f"<16 x i32> %mo{j})"]
        body += [
            *_joined("c", "cq"),
            "  %cq8 = trunc <64 x i32> %cq to <64 x i8>",
            *_lookup("mid", "cq8", padded),
            # non-negative float32s compare as their bits
            "  %above = icmp sgt <64 x i32> %a, %mid",
            "  %one = zext <64 x i1> %above to <64 x i32>",
            "  %ce = add <64 x i32> %cq, %one",
            "  br label %coded",
            "coded:",
            "  %code = phi <64 x i32> [%cf, %rounded], [%ce, %exact]",
        ]
        sign = ("  %negated = sub <64 x i32> zeroinitializer, %code\n"
                "  %r = select <64 x i1> %neg, <64 x i32> %negated, <64 x i32> %code"
                if k == "s" else
                "  %r = select <64 x i1> %neg, <64 x i32> zeroinitializer, <64 x i32> %code")
        reads = "\n".join(_lookup("val", "cb", values))
        codes = "\n".join(body)
        out.append(f"""
define void @uniopt_q8_codes_{k}_{tag}(ptr noalias nocapture readonly %w, ptr noalias nocapture %c,
                                    i64 %n, float %d) {{
entry:
  %d0 = insertelement <64 x float> poison, float %d, i64 0
  %dv = shufflevector <64 x float> %d0, <64 x float> poison, <64 x i32> zeroinitializer
  br label %loop
loop:
  %i = phi i64 [0, %entry], [%next, %latch]
  %rem = sub i64 %n, %i
  %more = icmp sgt i64 %rem, 0
  br i1 %more, label %body, label %done
body:
  %pw = getelementptr float, ptr %w, i64 %i
  %x = load <64 x float>, ptr %pw, align 4
  %y = fdiv <64 x float> %x, %dv
  %b = bitcast <64 x float> %y to <64 x i32>
  %neg = icmp slt <64 x i32> %b, zeroinitializer
  %mag = and <64 x i32> %b, {_vector("i32", [0x7FFFFFFF] * 64)}
  %a = call <64 x i32> @llvm.umin.v64i32(<64 x i32> %mag, <64 x i32> {_vector("i32", [_ONE] * 64)})
{codes}
{sign}
  %r8 = trunc <64 x i32> %r to <64 x i8>
  %pc = getelementptr i8, ptr %c, i64 %i
  %whole = icmp sge i64 %rem, 64
  br i1 %whole, label %all, label %part
all:
  store <64 x i8> %r8, ptr %pc, align 1
  br label %latch
part:
  %r0 = insertelement <64 x i64> poison, i64 %rem, i64 0
  %rv = shufflevector <64 x i64> %r0, <64 x i64> poison, <64 x i32> zeroinitializer
  %mask = icmp slt <64 x i64> {lanes}, %rv
  call void @llvm.masked.store.v64i8.p0(<64 x i8> %r8, ptr %pc, i32 1, <64 x i1> %mask)
  br label %latch
latch:
  %next = add i64 %i, 64
  br label %loop
done:
  ret void
}}

define void @uniopt_q8_values_{k}_{tag}(ptr noalias nocapture readonly %c, ptr noalias nocapture %w,
                                     i64 %n, float %f) {{
entry:
  %f0 = insertelement <64 x float> poison, float %f, i64 0
  %fv = shufflevector <64 x float> %f0, <64 x float> poison, <64 x i32> zeroinitializer
  br label %loop
loop:
  %i = phi i64 [0, %entry], [%next, %read]
  %rem = sub i64 %n, %i
  %more = icmp sgt i64 %rem, 0
  br i1 %more, label %body, label %done
body:
  %pc = getelementptr i8, ptr %c, i64 %i
  %whole = icmp sge i64 %rem, 64
  br i1 %whole, label %all, label %part
all:
  %ca = load <64 x i8>, ptr %pc, align 1
  br label %read
part:
  %r0 = insertelement <64 x i64> poison, i64 %rem, i64 0
  %rv = shufflevector <64 x i64> %r0, <64 x i64> poison, <64 x i32> zeroinitializer
  %mask = icmp slt <64 x i64> {lanes}, %rv
  %cp = call <64 x i8> @llvm.masked.load.v64i8.p0(ptr %pc, i32 1, <64 x i1> %mask,
                                                   <64 x i8> zeroinitializer)
  br label %read
read:
  %cb = phi <64 x i8> [%ca, %all], [%cp, %part]
{reads}
  %vf = bitcast <64 x i32> %val to <64 x float>
  %x = fmul <64 x float> %vf, %fv
  %pw = getelementptr float, ptr %w, i64 %i
  store <64 x float> %x, ptr %pw, align 4
  %next = add i64 %i, 64
  br label %loop
done:
  ret void
}}""")
    return "\n".join(out)


def _has_vbmi() -> bool:
    """Whether the CPU numba compiles for has AVX-512 VBMI and BW (its features as numba reads
    them: ``NUMBA_ENABLE_AVX=0`` on such a host aborted LLVM on the VBMI IR)."""
    return {"avx512vbmi", "avx512bw"} <= cpu.target_features()


# which IR the loops link: VBMI's where the CPU has it; or UNIOPT_Q8_GATHER=1, the gathers
VBMI = _has_vbmi() and not os.environ.get("UNIOPT_Q8_GATHER")


def _ir(tag: str) -> str:
    return _ir_vbmi(tag) if VBMI else _ir_gather(tag)


# the functions' names carry a digest of their IR: a loop cached by an older version links
# its own copy, never another's of the same name
_TAG = hashlib.sha1(_ir("").encode()).hexdigest()[:12] + ("v" if VBMI else "g")
_LIBRARIES: dict[int, Any] = {}


def _library(context: Any) -> Any:
    """The IR of :func:`_ir` as a library of numba's code generator (made once per
    generator), to link into the functions that call it."""
    codegen = context.codegen()
    lib = _LIBRARIES.get(id(codegen))
    if lib is None:
        lib = codegen.create_library("uniopt_q8")
        text = str(lib.create_ir_module("uniopt_q8")) + "\n" + _ir(_TAG)
        module = llvm.parse_assembly(text)
        module.verify()
        lib.add_llvm_module(module)
        lib.finalize()
        _LIBRARIES[id(codegen)] = lib
    return lib


def _calling(name: str) -> Any:
    """An intrinsic ``f(src, dst, n, scale)`` (addresses, a count, a float32) calling the
    function ``name`` of :func:`_ir`."""
    def typer(typingctx: Any, src: Any, dst: Any, n: Any, scale: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            context.add_linking_libs([_library(context)])
            ptr = ir.PointerType(ir.IntType(8))
            fnty = ir.FunctionType(ir.VoidType(), [ptr, ptr, ir.IntType(64), ir.FloatType()])
            fn = cgutils.get_or_insert_function(builder.module, fnty, f"{name}_{_TAG}")
            kinds = signature.args
            builder.call(fn, [builder.inttoptr(args[0], ptr), builder.inttoptr(args[1], ptr),
                              context.cast(builder, args[2], kinds[2], nbtypes.int64),
                              context.cast(builder, args[3], kinds[3], nbtypes.float32)])
            return context.get_dummy_value()

        return nbtypes.void(src, dst, n, scale), codegen

    typer.__name__ = name
    return intrinsic(typer)


codes_s = _calling("uniopt_q8_codes_s")
codes_u = _calling("uniopt_q8_codes_u")
values_s = _calling("uniopt_q8_values_s")
values_u = _calling("uniopt_q8_values_u")


@intrinsic
def _prefetch(typingctx: Any, address: Any) -> Any:
    """Ask for the cache line at ``address`` (an integer) to be loaded (``llvm.prefetch``)."""
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = ir.PointerType(ir.IntType(8))
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.inttoptr(args[0], ptr), ir.Constant(i32, 0),
                          ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return nbtypes.void(address), codegen


@numba.njit(inline="always")
def fetch(address: Any, lo: Any, hi: Any) -> None:
    """Prefetch bytes ``lo`` to ``hi`` past ``address``, a line of 64 at a time."""
    for k in range(lo, hi, 64):
        _prefetch(address + k)


@numba.njit(inline="always")
def from_bits(bits: Any) -> Any:
    return cpu._f32_of(np.uint32(bits))


# the tests' helpers, generated as the loops are: the IR they link differs with the CPU and
# UNIOPT_Q8_GATHER, which numba's cache of a function in this file would not see
_HELPERS = f"""# generated by uniopt {{version}} (8-bit state: the tests' helpers); safe to delete
import numba
import numpy as np
from uniopt.fast.q8 import codes_s, codes_u, values_s, values_u


@numba.njit(cache=CACHE)
def codes(x, scale, signed):
    out = np.empty(len(x), np.uint8)
    for a in range(0, len(x), {quant.BLOCK}):
        # the functions read whole 64s of their buffer: a copy of each block
        n = min({quant.BLOCK}, len(x) - a)
        buf = np.zeros({quant.BLOCK}, np.float32)
        buf[:n] = x[a:a + n]
        if signed:
            codes_s(buf.ctypes.data, out[a:].ctypes.data, n, scale)
        else:
            codes_u(buf.ctypes.data, out[a:].ctypes.data, n, scale)
    return out


@numba.njit(cache=CACHE)
def values(c, scale, signed):
    # the functions write whole 64s of values
    out = np.empty((len(c) + 63) // 64 * 64, np.float32)
    if signed:
        values_s(c.ctypes.data, out.ctypes.data, len(c), scale)
    else:
        values_u(c.ctypes.data, out.ctypes.data, len(c), scale)
    return out[:len(c)]
"""


def codes(x: Any, scale: Any, signed: bool) -> Any:
    """The codes (bytes) of the float32 values ``x`` over ``scale``, as the loop writes them
    (for the tests)."""
    return _module(_HELPERS.format(version=f"{cpu._VERSION}-{_VERSION}-{_TAG}")).codes(
        x, scale, signed)


def values(c: Any, scale: Any, signed: bool) -> Any:
    """The values of the codes ``c`` (bytes) times ``scale``, as the loop reads them (for the
    tests)."""
    return _module(_HELPERS.format(version=f"{cpu._VERSION}-{_VERSION}-{_TAG}")).values(
        c, scale, signed)


def _module(src: str, names: dict[str, Any] | None = None) -> Any:
    """The generated module ``src`` (its functions' ``cache=CACHE``), imported from the cache
    directory (a file named for its text, numba's machine code cached beside it), or, where
    there is none or ``names`` (globals no import reaches), run uncached."""
    key = hashlib.sha1(src.encode()).hexdigest()[:16]
    hit = _MODULES.get(key) if names is None else None
    if hit is not None:
        return hit
    where = cpu._cache_dir() if names is None else None
    if where is None:
        module = types.ModuleType(f"uniopt_q8_{key}")
        module.__dict__.update(names or {}, CACHE=False)
        exec(compile(src, "<uniopt 8-bit loop>", "exec"), module.__dict__)
    else:
        module = cpu._imported(src, _path(where, src))
    if names is None:  # the same text names the same functions
        _MODULES[key] = module
    return module


_MODULES: dict[str, Any] = {}


def _path(where: Path, src: str) -> Path:
    """The file of generated module ``src`` in cache directory ``where``: named for its text."""
    return where / f"uniopt_q8_{hashlib.sha1(src.encode()).hexdigest()[:16]}.py"


@numba.njit(inline="always")
def abs_bits(x: Any) -> Any:
    """The bits of ``|x|``: ordered as the magnitudes (NaN above every number), so the largest
    is an integer maximum, which vectorizes."""
    return cpu._f32_bits(x) & np.uint32(0x7FFFFFFF)


def _source(kernels: tuple[cpu.LoopPart, ...], signs: tuple[bool, ...], kp: str,
            by_import: bool, records: tuple[Any, ...], digest: str = "") -> str:
    """A module defining ``walk`` as :func:`uniopt.fast.cpu._source`'s, its slots 8-bit
    (``signs``: each slot's map). ``L``: p, g, then each slot's codes and scales, all written
    in place (a pure step runs it on copies)."""
    pt = "np.float32" if kp == "f4" else "np.float64"
    head = [
        f"# generated by uniopt {cpu._VERSION}-{_VERSION}-{_TAG} (8-bit state) for kernels "
        f"{digest}; "
        "safe to delete",
        "import collections",
        "import numba",
        "import numpy as np",
        "from uniopt.fast.cpu import SIGNATURE, _i64, _item, _voidptr",
        "from uniopt.jitcache import cfunc",
        "from uniopt.fast.cpu import kernel_for",
        "from uniopt.fast.cpu import scalar_xp as XP",
        "from uniopt.fast.q8 import abs_bits, codes_s, codes_u, fetch, from_bits, values_s, "
        "values_u",
        f"PT = {pt}",
        f"PB = {4 if kp == 'f4' else 8}",
        f"BLOCK = {quant.BLOCK}",
    ]
    lists: list[str] = []

    def address(name: str) -> str:
        lists.append(name)
        return f"_i64(_item(L[{len(lists) - 1}], t) + 16)"

    def view(name: str, dtype: str, size: str = "b") -> str:
        return f"{name} = numba.carray(_voidptr({address(name)}), ({size},), {dtype})"

    nb = "(b + BLOCK - 1) // BLOCK"
    loads = [view("p", "PT"), view("g", "PT"), "pa = p.ctypes.data", "ga = g.ctypes.data"]
    body, ends, co, s = [], [], 0, 0
    end = "x - u"
    for k, ((kernel, nslots, finish), (_, _, fields, _)) in enumerate(
            zip(kernels, records, strict=True)):
        head += cpu._bind_kernels(k, kernel, finish, by_import)
        width = cpu._width(fields)
        values = ", ".join(f"CO[{co + j}]" for j in range(width))
        co += width
        if isinstance(fields, tuple) and fields:
            head.append(f"R{k} = collections.namedtuple('R{k}', {fields!r})")
            loads.append(f"C{k} = R{k}({values})")
        else:
            loads.append(f"C{k} = ({values}{',' if width else ''})")
        names = list(range(s, s + nslots))
        s += nslots
        reads = []
        for n in names:
            # the codes' address (a signed code read as its byte)
            loads.append(f"c{n} = {address(f'c{n}')}")
            loads.append(view(f"m{n}", "np.float32", nb))
            loads.append(f"w{n} = np.empty(BLOCK, np.float32)")
            loads.append(f"wa{n} = w{n}.ctypes.data")
            reads.append(f"w{n}[i - ulo]")
        if finish is not None:  # the last part writes p from its input: keep it
            body.append("v = u")
            end = f"F{k}(XP, C{k}, x, v{''.join(f', r[{j + 1}]' for j in range(nslots))})"
        body.append(f"r = K{k}(XP, C{k}, x, u{''.join(', ' + r for r in reads)})")
        body.append("u = r[0]")
        for j, n in enumerate(names):
            # the block's maximum as its values are made (a max of integers: any order, the
            # same bits), not in a pass of its own
            body += [f"w{n}[i - ulo] = r[{j + 1}]",
                     f"a{n} = max(a{n}, np.uint32(abs_bits(w{n}[i - ulo])))"]
    body.append(f"p[i] = PT({end})")
    starts, finals = [], ["nxt = min(BLOCK, b - hi)"]
    for n in range(s):
        # each loop simple enough to vectorize: codes to values, the kernels and the maximum,
        # values to codes (the block's buffers stay in the L1 cache between them)
        value = "values_s" if signs[n] else "values_u"
        starts += [f"f{n} = m{n}[lo // BLOCK]",
                   f"{value}(c{n} + lo, wa{n}, hi - lo, f{n})",
                   f"a{n} = np.uint32(0)"]
        code = "codes_s" if signs[n] else "codes_u"
        finals += [
            f"e{n} = from_bits(a{n})",
            f"m{n}[lo // BLOCK] = e{n}",
            f"d{n} = e{n} if e{n} > 0 else np.float32(1)",
            f"for q in range(0, hi - lo, {_PIECE}):",
            f"    {code}(wa{n} + 4 * q, c{n} + lo + q, min({_PIECE}, hi - lo - q), d{n})",
            f"    k = ({n} * BLOCK + q) // {s}",
            f"    e = min(k + {_PIECE} // {s}, nxt)",
            "    fetch(pa + PB * hi, PB * k, PB * e)",
            "    fetch(ga + PB * hi, PB * k, PB * e)",
            f"    fetch(c{n} + hi, q, min(q + {_PIECE}, nxt))",
        ]
    ends += finals
    return "\n".join([
        *head,
        "",
        "",
        *cpu._prologue(len(lists), "np.float32", False),
        *[f"        {line}" for line in loads],
        "        for lo in range(a, b, BLOCK):",
        "            hi = min(lo + BLOCK, b)",
        "            ulo, uhi = np.uint64(lo), np.uint64(hi)",
        *[f"            {line}" for line in starts],
        "            for i in range(ulo, uhi):",
        "                x = np.float32(p[i])",
        "                u = np.float32(g[i])",
        *[f"                {line}" for line in body],
        *[f"            {line}" for line in ends],
        "    return 0.0",
        "",
    ])


_LOOPS: dict[Any, Any] = {}
# the codes written between two runs of prefetches: 4 of the functions' iterations
_PIECE = 256


Plan = list[tuple[Any, Any, tuple[str, ...]]]


def _memo_key(plan: Plan, signs: tuple[bool, ...], kp: str) -> tuple[Any, ...]:
    """The loop's key in a rule's memo."""
    return ("q8", signs, kp, *[type(c) for _, c, _ in plan])


def _identity(plan: Plan, signs: tuple[bool, ...], kp: str) -> tuple[Any, ...]:
    """The loop's key in this process (:data:`_LOOPS`): its parts' kernels, its slots' signs,
    the params' storage and the coefficient records."""
    records = tuple(cpu._record(part, c) for part, c, _ in plan)
    return cpu._parts(plan, "inplace"), signs, kp, records


def _text(full: tuple[Any, ...]) -> tuple[str, bool]:
    """The loop's source for identity ``full``, and whether its kernels are importable (so
    that it can be cached on disk)."""
    kernels, signs, kp, records = full
    importable = all(cpu._importable(k) and (f is None or cpu._importable(f))
                     for k, _, f in kernels)
    digest = cpu._digest(kernels, records) if importable else ""
    return _source(kernels, signs, kp, importable, records, digest), importable


def _loop(plan: Plan, signs: tuple[bool, ...], kp: str, memo: dict[Any, Any]) -> Any:
    """The one-thread and thread-pool calls (:func:`uniopt.fast.cpu._drivers`) of the loop for
    ``plan``: found once per rule (``memo``),
    compiled once per process, cached on disk as :mod:`uniopt.fast.cpu`'s are."""
    key = _memo_key(plan, signs, kp)
    hit = memo.get(key)
    if hit is not None:
        return hit
    full = _identity(plan, signs, kp)
    if full in _LOOPS:
        memo[key] = _LOOPS[full]
        return memo[key]
    src, importable = _text(full)
    names: dict[str, Any] | None = None
    if not importable:
        names = {}
        for k, (kernel, _, finish) in enumerate(full[0]):
            names[f"_K{k}"], names[f"_F{k}"] = kernel, finish
    module = _module(src, names)
    cpu._HELD.append(module.walk)  # called by address
    _LOOPS[full] = cpu._drivers(module.walk.address, "inplace")
    memo[key] = _LOOPS[full]
    return memo[key]


def _at_hand(plan: Plan, signs: tuple[bool, ...], kp: str, memo: dict[Any, Any]) -> bool:
    """Whether the loop for ``plan`` is loaded in this process or its module is on disk (looked
    for once per rule: the file's name costs the loop's source)."""
    key = _memo_key(plan, signs, kp)
    if key in memo:
        return True
    seen = memo.get(("q8 on disk", key))
    if seen is None:
        full = _identity(plan, signs, kp)
        seen = full in _LOOPS
        if not seen:
            src, importable = _text(full)
            where = cpu._cache_dir() if importable else None
            seen = where is not None and _path(where, src).exists()
        memo[("q8 on disk", key)] = seen
    return bool(seen)


_KP = {"f": "f4", "d": "f8"}
_F32, _I8, _U8 = np.dtype(np.float32).num, np.dtype(np.int8).num, np.dtype(np.uint8).num


def step(
    resolve: Callable[[], list[tuple[Any, Any, tuple[str, ...]]]],
    params: list[Any],
    grads: list[Any],
    slots: dict[str, list[Any]],
    inplace: bool,
    memo: dict[Any, Any] | None = None,
    per_leaf: Any = None,
) -> tuple[list[Any], dict[str, list[Any]]] | str | None:
    """The engine's strategy for 8-bit states, as :func:`uniopt.fast.cpu.step`: NumPy arrays
    or CPU tensors (float32 or float64 params), every part elementwise (``per_leaf``: unused),
    every slot the leaf's shape. Small steps (:data:`uniopt.fast.cpu.MIN_SIZE`) of NumPy
    arrays take the loop as :func:`uniopt.fast.cpu.step`'s do (at once where it is at hand,
    else after :data:`~uniopt.fast.cpu.COMPILE_AFTER` of them on the reference path); small
    steps of tensors the reference path."""
    if not cpu.AVAILABLE or not params:
        return None
    tensors = type(params[0]) is not np.ndarray and backend.is_torch(params[0])
    if not all(isinstance(q, quant.Q8) for v in slots.values() for q in v):
        return None  # a slot a leaf does not keep: the reference path
    codes = [[q.codes for q in v] for v in slots.values()]
    scales = [[q.absmax for q in v] for v in slots.values()]
    leaves, g_leaves = params, grads
    if tensors:
        views = backend.numpy_views([params, grads, *codes, *scales])
        if views is None:
            return None
        leaves, g_leaves = views[0], views[1]
        codes, scales = views[2:2 + len(codes)], views[2 + len(codes):]
    first = leaves[0]
    if type(first) is not np.ndarray:
        return None
    kp = _KP.get(first.dtype.char)
    if kp is None:
        return None
    memo = {} if memo is None else memo
    # a small step takes the loop as uniopt.fast.cpu's does: at once where it is at hand (this
    # process, or the disk), else after COMPILE_AFTER of them; torch tensors never (the
    # reference path's torch operations are not the loop's to the bit)
    small = len(leaves) < cpu.MIN_LEAVES and sum(x.size for x in leaves) < cpu.MIN_SIZE
    waited = memo.get("q8-small", 0)
    if small and (tensors or cpu.COMPILE_AFTER is None or 0 < waited < cpu.COMPILE_AFTER):
        if not tensors and cpu.COMPILE_AFTER is not None:
            memo["q8-small"] = waited + 1
        return None
    plan = resolve()
    if not all(isinstance(part, Elementwise) for part, _, _ in plan):
        return "a part that is not elementwise (per-leaf parts run on the reference path)"
    if any(part.needs_norm for part, _, _ in plan):
        return "a part that needs a norm, with 8-bit state"
    signs = tuple(bool(c) and c[0].dtype.num == _I8 for c in codes)
    n = len(leaves)
    params_l, grads_l = list(leaves), list(g_leaves)
    codes = [list(c) for c in codes]
    scales = [list(c) for c in scales]
    sizes = np.empty(n, np.int64)
    tn = first.dtype.num
    checked = _check([params_l, grads_l, *codes], [inplace, False, *[inplace] * len(codes)],
                     [tn, tn, *[_I8 if sg else _U8 for sg in signs]], sizes)
    if checked:
        return checked
    counts = np.empty(n, np.int64)
    for sc in scales:
        checked = _check([sc], [inplace], [_F32], counts)
        if checked:
            return checked
        if not np.array_equal(counts, np.maximum(1, -(-sizes // quant.BLOCK))):
            return "a slot's scales do not fit its leaf"
    if small and waited < (cpu.COMPILE_AFTER or 0):
        if not _at_hand(plan, signs, kp, memo):
            memo["q8-small"] = 1
            return None
        memo["q8-small"] = cpu.COMPILE_AFTER
    big = int(sizes.sum() >= cpu.PARALLEL_MIN)
    if not inplace:  # the in-place loop on copies, as uniopt.fast.cpu's pure step
        params_l = [p.copy() for p in params_l]
        codes = [[x.copy() for x in c] for c in codes]
        scales = [[x.copy() for x in m] for m in scales]
    lists = [params_l, grads_l]
    for c, m in zip(codes, scales, strict=True):
        lists += [c, m]
    loop = _loop(plan, signs, kp, memo)
    loop[big](cpu._addresses(lists), cpu._coefficients(plan, np.float32, n), sizes)
    cpu.STEPS += 1
    if tensors and inplace:  # autograd must see that the tensors changed
        backend.mark_written([*params, *(a for v in slots.values() for q in v
                                         for a in (q.codes, q.absmax))])
    if inplace:
        return params, slots
    new_params: list[Any] = params_l
    if tensors:
        new_params = [backend.like_leaf(backend.from_numpy(x, p.dtype), p)
                      for x, p in zip(params_l, params, strict=True)]
        codes = [[backend.from_numpy(x) for x in c] for c in codes]
        scales = [[backend.from_numpy(x) for x in m] for m in scales]
    out = {k: [quant.Q8(c, m) for c, m in zip(cs, ms, strict=True)]
           for k, cs, ms in zip(slots, codes, scales, strict=True)}
    return new_params, out


def _check(lists: list[list[Any]], writes: list[bool], typenums: list[int],
           sizes: Any) -> str | None:
    """:func:`uniopt.fast.cpu._check` on ``lists`` (the first the reference shapes), its
    finding said in words, or None."""
    code = cpu._check(cpu._addresses(lists), np.array(writes), cpu._NDARRAY,
                      np.array(typenums), sizes)
    if not code:
        return None
    k, i, why = code >> 32, (code >> 3) & 0x1FFFFFFF, code & 7
    return (f"list {k - 1} count" if why == cpu._COUNT
            else f"8-bit step: list {k - 1} leaf {i} {cpu.REASONS[why]}")
