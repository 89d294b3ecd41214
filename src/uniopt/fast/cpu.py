# mypy: disable-error-code="call-arg"
"""The compiled CPU strategy: one pass over memory per step, with no per-tensor Python work.

An optimizer step is memory-bound, and what costs the peers on many small tensors is Python
bookkeeping per tensor. Here the rule's own kernels (the functions the reference path runs on
whole arrays) are compiled with numba and composed into one loop that walks every element of
every leaf once: read p, g and the slots, run the parts in order, write p and the slots.

Per step, Python does no per-leaf work at all: the compiled code is handed the address of each
list of leaves (params, grads, each slot) and walks the list's item array itself. Everything a
per-leaf loop would do (is it an ndarray, its dtype, shape, contiguity, alignment, writability,
does the gradient match its parameter) is read from NumPy's array struct, whose layout is part
of NumPy's stable C ABI, as is CPython's list layout; a self-test at import checks every offset
and disables this path if they ever disagree. The one-thread loop holds the GIL for the whole
call, so no other thread can change the lists meanwhile; the thread-pool loop releases it while
its threads run (numba's parallel wrapper does): another thread must not change a step's lists
during the step, as it must not change its arrays. Anything the loop does not handle (another
array library, a dtype other than float32/float64, a non-contiguous or read-only array, a
mismatch, a whole-tree part) sends the step to the engine's reference path, which
either raises the proper error or runs, after a one-time warning that names the reason. CPU
torch tensors come in as NumPy views of their memory (:func:`uniopt.backend.numpy_view`), and
are marked written afterwards so that autograd sees the change.

A rule with per-leaf parts (Muon, LAMB) runs as segments (:func:`segmented`): a compiled pass
per run of elementwise parts, each per-leaf part between them as the reference path runs it.

Work is split into chunks of at most ``CHUNK`` elements so that one large tensor still uses every
thread, and many small tensors cost one loop iteration each.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import inspect
import itertools
import math
import operator
import os
import platform
import sys
import threading
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types as nbtypes
from numba.extending import intrinsic, overload, register_jitable

from .. import backend, jitcache
from ..backend import Addressed
from ..base import Elementwise, PerLeaf, members, steady_from
from ..moments import fma, fused_multiply_add, lerp, select, unfolded

CHUNK = 1 << 15
PARALLEL_MIN = 1 << 16  # elements; below this a step runs on one thread
# a parallel step's runs of chunks, of equal element counts (_shares): a constant, not the
# pool's thread count, which compiled code cannot ask for and still be cached on disk. 64 runs
# give up to 64 threads equal work (within a run's 1.6% where 64 is not a multiple of their
# count), more than memory-bound loops use
RUNS = 64
# A step with fewer leaves and elements than these is small: it takes the compiled loop at once
# where the loop is compiled already (in this process, or on disk from an earlier one), else
# after COMPILE_AFTER small steps on the reference path of the rules that would run it. A
# compiled step of a small model saves about 150 us, and compiling costs about a second: worth
# it from some 7,000 steps on, so a training loop pays it once per loop and machine after its
# first 2,000 steps (0.3 s on the reference path), and a short script (say, `uniopt compare`)
# never. Rules that share a count (a dict in their memos under "cpu-small-shared", by loop
# key) count together: a uniopt.torch optimizer's groups, 100 one-parameter groups (layer-wise
# learning rates) a rule each, which counted apart ran 2,000 steps of the optimizer on the
# reference path (ten times torch's for-loop) before the first compiled.
MIN_LEAVES, MIN_SIZE = 16, 1 << 14
COMPILE_AFTER: int | None = 2000  # None: small steps always take the reference path


# machine code cached on disk is keyed by this module's source (the code generator and the
# scalar functions it inlines) and, per loop, by the source of every kernel it inlines
_VERSION = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:12]

# steps run by the compiled loop in this process (tests assert that it ran)
STEPS = 0

# offsets into PyArrayObject / PyArray_Descr (numpy/ndarraytypes.h), checked by _self_test
_TYPE, _DATA, _ND, _DIMS, _DESCR, _FLAGS = 8, 16, 24, 32, 56, 64
_DESCR_BYTEORDER, _DESCR_TYPENUM = 26, 28
# and into PyListObject (ob_size, ob_item): the compiled code walks the caller's lists itself,
# so Python does no per-leaf work at all
_LIST_SIZE, _LIST_ITEMS = 16, 24
_C_CONTIGUOUS, _ALIGNED, _WRITEABLE = 0x1, 0x100, 0x400

# reasons the compiled check can give, by code
REASONS = {
    1: "is not a NumPy ndarray",
    2: "has another dtype than the first leaf of its kind",
    3: "is not C-contiguous, aligned and in native byte order",
    4: "is read-only",
    5: "has another shape than its parameter",
    6: "has another number of leaves than the params",
}
_MISMATCH, _COUNT = 5, 6


@intrinsic
def _voidptr(typingctx: Any, addr: Any) -> Any:
    sig = nbtypes.voidptr(addr)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(nbtypes.voidptr))

    return sig, codegen

@numba.njit(inline="always")
def _i64(addr: int) -> int:
    return numba.carray(_voidptr(addr), (1,), np.int64)[0]

@numba.njit(inline="always")
def _i32(addr: int) -> int:
    return numba.carray(_voidptr(addr), (1,), np.int32)[0]

@numba.njit(inline="always")
def _i8(addr: int) -> int:
    return numba.carray(_voidptr(addr), (1,), np.int8)[0]

@numba.njit(inline="always")
def _item(lst: int, i: int) -> int:
    """The address of item ``i`` of the Python list at address ``lst``."""
    return _i64(_i64(lst + _LIST_ITEMS) + 8 * i)

@numba.njit(inline="always")
def _leaf(lst: int, i: int) -> int:
    """Where the numbers of leaf ``i`` are: ``lst`` is the address of a list of ndarrays, or
    minus that of a table of addresses (:class:`uniopt.backend.Addressed`, checked by whoever
    made it)."""
    return _i64(8 * i - lst) if lst < 0 else _i64(_item(lst, i) + _DATA)


# --- 16-bit storage: float16 and bfloat16 leaves are computed in float32, rounded once ---------


def target_features() -> frozenset[str]:
    """The CPU features numba compiles for, as numba reads them: ``NUMBA_CPU_FEATURES``, else
    the host's (without the AVX ones under ``NUMBA_ENABLE_AVX=0``); none for
    ``NUMBA_CPU_NAME=generic``. Code that picks instructions by the CPU asks this, not the host:
    IR for a feature the target lacks aborts LLVM, or makes machine code a cache then hands to
    the CPUs it was named for."""
    from numba.core import codegen, config

    given = getattr(config, "CPU_FEATURES", None)
    flags = given if given is not None else codegen.get_host_cpu_features()
    return frozenset(f[1:] for f in flags.split(",") if f.startswith("+"))


@intrinsic
def _f16_hw(typingctx: Any, bits: Any) -> Any:
    """IEEE half (its bits) to float32, exactly."""
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return nbtypes.float32(bits), codegen

@intrinsic
def _to_f16_hw(typingctx: Any, x: Any) -> Any:
    """float32 to IEEE half bits, rounded to nearest even (as NumPy and torch round)."""
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return nbtypes.uint16(x), codegen


# Without F16C (NUMBA_CPU_NAME=generic, older or small x86 CPUs) LLVM lowers the two
# conversions above to calls of compiler-rt's __extendhfsf2 and __truncsfhf2, which numba's
# JIT does not link: the process aborted at its first float16 step. There they are integer
# arithmetic, the same bits as F16C's for every input (each checked against it over all 2**16
# halves and all 2**32 floats, NaNs made quiet with their top payload bits kept).

@intrinsic
def _f32_of(typingctx: Any, bits: Any) -> Any:
    """The float32 whose bits are the low 32 of the integer ``bits``."""
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        v = args[0]
        if v.type.width != 32:
            v = builder.trunc(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return nbtypes.float32(bits), codegen

@numba.njit(inline="always")
def _f16_sw(bits: Any) -> Any:
    h = np.uint32(bits)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    if e == np.uint32(0x1F):  # infinity, NaN
        quiet = np.uint32(0x400000) if m != np.uint32(0) else np.uint32(0)
        return _f32_of(sign | np.uint32(0x7F800000) | quiet | (m << np.uint32(13)))
    if e == np.uint32(0):  # zero, subnormal: m * 2**-24, exact in float32
        mag = np.float32(m) * np.float32(5.960464477539063e-08)
        return -mag if sign else mag
    return _f32_of(sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13)))

@numba.njit(inline="always")
def _to_f16_sw(x: Any) -> Any:
    f = np.uint32(_f32_bits(x))
    sign = f & np.uint32(0x80000000)
    f = f ^ sign
    if f >= np.uint32(0x47800000):  # 2**16 and above (infinity), NaN
        o = (np.uint32(0x7E00) | ((f >> np.uint32(13)) & np.uint32(0x3FF))
             if f > np.uint32(0x7F800000) else np.uint32(0x7C00))
    elif f < np.uint32(0x38800000):  # below 2**-14, a subnormal half: 0.5 added rounds
        # at the half's last place, to nearest even, in float32's own addition
        o = np.uint32(_f32_bits(_f32_of(f) + np.float32(0.5))) - np.uint32(0x3F000000)
    else:  # the exponent rebiased, plus half an ulp less one, plus the kept bit's parity
        f = f + np.uint32(0xC8000FFF) + ((f >> np.uint32(13)) & np.uint32(1))
        o = f >> np.uint32(13)
    return np.uint16((o | (sign >> np.uint32(16))) & np.uint32(0xFFFF))


# (AArch64 converts halves in its base instruction set; elsewhere only x86's F16C is known)
_MACHINE = platform.machine().lower()
F16C = ("f16c" in target_features() if _MACHINE in ("x86_64", "amd64", "i386", "i686", "x86")
        else _MACHINE in ("aarch64", "arm64"))
_f16, _to_f16 = (_f16_hw, _to_f16_hw) if F16C else (_f16_sw, _to_f16_sw)

@intrinsic
def _bf16(typingctx: Any, bits: Any) -> Any:
    """bfloat16 (its bits) to float32, exactly: the high half of a float32."""
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return nbtypes.float32(bits), codegen

@intrinsic
def _f32_bits(typingctx: Any, x: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(32))

    return nbtypes.uint32(x), codegen

@numba.njit(inline="always")
def _to_bf16(x: Any) -> Any:
    """float32 to bfloat16 bits, rounded to nearest even, as torch's tensor conversion does
    (NaN to 0xFFFF, as its vectorised conversion writes it; its scalar one writes 0x7FC0)."""
    if x != x:
        return np.uint16(0xFFFF)
    bits: Any = _f32_bits(x)
    return np.uint16((bits + (((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)))
                     >> np.uint32(16))


@jitcache.njit()
def _check(lists: Any, writes: Any, ndarray_type: int, typenums: Any, sizes: Any) -> int:
    """Check every object in every list at the addresses ``lists`` against the first list (the
    params): as many items, each an ndarray of dtype ``typenums[list]``, C-contiguous, aligned,
    native, writeable where ``writes`` says, of its parameter's shape. Fills ``sizes``.
    Returns 0, or ``(list + 1) << 32 | item << 3 | reason``."""
    n = len(sizes)
    for k in range(len(lists)):
        lst = lists[k]
        if lst < 0:  # a table of addresses (backend.Addressed): checked where it was made
            continue
        if _i64(lst + _LIST_SIZE) != n:
            return ((k + 1) << 32) | _COUNT
        for i in range(n):
            obj = _item(lst, i)
            if _i64(obj + _TYPE) != ndarray_type:
                return ((k + 1) << 32) | (i << 3) | 1
            descr = _i64(obj + _DESCR)
            if _i32(descr + _DESCR_TYPENUM) != typenums[k]:
                return ((k + 1) << 32) | (i << 3) | 2
            flags = _i32(obj + _FLAGS)
            bo = _i8(descr + _DESCR_BYTEORDER)
            if (flags & 0x101) != 0x101 or not (bo == 61 or bo == 124):  # '=' or '|'
                return ((k + 1) << 32) | (i << 3) | 3
            if writes[k] and not (flags & _WRITEABLE):
                return ((k + 1) << 32) | (i << 3) | 4
            nd = _i32(obj + _ND)
            dims = _i64(obj + _DIMS)
            if k == 0:
                size = 1
                for d in range(nd):
                    size *= _i64(dims + 8 * d)
                sizes[i] = size
                continue
            r = _item(lists[0], i)
            if _i32(r + _ND) != nd:
                return ((k + 1) << 32) | (i << 3) | _MISMATCH
            rdims = _i64(r + _DIMS)
            for d in range(nd):
                if _i64(rdims + 8 * d) != _i64(dims + 8 * d):
                    return ((k + 1) << 32) | (i << 3) | _MISMATCH
    return 0


@jitcache.njit()
def _chunks(sizes: Any, chunk: int) -> tuple[Any, Any, Any, int]:
    """Each leaf in chunks of at most ``chunk`` elements (leaf, start, stop), and the total.
    (A function of its own, not in the body of :func:`_parallel`, where numba would run its
    sums as a reduction on the thread pool.)"""
    count = total = 0
    for n in sizes:
        count += (n + chunk - 1) // chunk
        total += n
    leaf = np.empty(count, np.int64)
    start = np.empty(count, np.int64)
    stop = np.empty(count, np.int64)
    j = 0
    for i in range(len(sizes)):
        for a in range(0, sizes[i], chunk):
            leaf[j], start[j], stop[j] = i, a, min(a + chunk, sizes[i])
            j += 1
    return leaf, start, stop, total


@jitcache.njit()
def _shares(start: Any, stop: Any, total: int, parts: int) -> Any:
    """Where each of ``parts`` runs of consecutive chunks (``start``, ``stop`` and their
    ``total`` element count: :func:`_chunks`) begins, and the last ends: runs of equal element
    counts to within one chunk, which the pool deals out to its threads in equal consecutive
    groups. A tree's leaves differ in size (a small CNN's from 1K to 64K elements: the first
    half of its chunks hold a quarter of its elements), so the runs are cut by elements, not by
    chunks. Each run is walked as the one-thread loop walks all of them: per chunk a few loads
    and no call, where a parallel loop over the chunks themselves cost a call and the pool's
    bookkeeping per chunk (10,000 leaves of 100 elements: 3.5 times the one-thread loop's time,
    on one thread). Each element's result is the same whichever thread computes it."""
    bounds = np.full(parts + 1, len(start), np.int64)
    bounds[0] = 0
    k, done = 1, 0
    for j in range(len(start)):
        done += stop[j] - start[j]
        while k < parts and done * parts >= k * total:
            bounds[k] = j + 1
            k += 1
    return bounds


# Every generated loop is one C function of this signature, ``walk(L, CO, nco, leaf, start,
# stop, first, last, sums)``: the addresses of the lists' table, of the coefficients (and their
# count), of the chunk table, the range of chunks to walk, and where a loop that sums writes
# each chunk's sum. The drivers below call it by address; they are compiled once per machine
# for every rule. (numba links a jitted callee into each caller and optimises it again there:
# a loop called by its own one-thread and thread-pool drivers was compiled three times over.)
SIGNATURE = nbtypes.float64(*[nbtypes.int64] * 9)


@intrinsic
def _call(typingctx: Any, fn: Any, L: Any, CO: Any, leaf: Any, start: Any, stop: Any,
          first: Any, last: Any, sums: Any) -> Any:
    """Call the loop at address ``fn`` with ``(L, CO, leaf, start, stop, first, last, sums)``:
    an array passes its data's address (``CO`` its length after it), an integer itself."""
    sig = nbtypes.float64(fn, L, CO, leaf, start, stop, first, last, sums)

    def codegen(context: Any, builder: Any, signature: Any, values: Any) -> Any:
        i64 = ir.IntType(64)
        out = []
        for k, (ty, v) in enumerate(zip(signature.args[1:], values[1:], strict=True)):
            if isinstance(ty, nbtypes.Array):
                ary = context.make_array(ty)(context, builder, v)
                out.append(builder.ptrtoint(ary.data, i64))
                if k == 1:  # CO: its count too
                    out.append(ary.nitems)
            else:
                out.append(context.cast(builder, v, ty, nbtypes.int64))
        fnty = ir.FunctionType(ir.DoubleType(), [i64] * len(out))
        target = builder.inttoptr(context.cast(builder, values[0], signature.args[0],
                                               nbtypes.int64), fnty.as_pointer())
        return builder.call(target, out)

    return sig, codegen


@jitcache.njit()
def _serial(fn: int, L: Any, CO: Any, SIZES: Any) -> float:
    """The loop at ``fn`` over every chunk, on this thread."""
    leaf, start, stop, _ = _chunks(SIZES, CHUNK)
    return _call(fn, L, CO, leaf, start, stop, 0, len(leaf), 0)


# compiled at its first call, by the first step of PARALLEL_MIN elements or more: a parallel
# function costs several times a plain one to compile, and small steps never use it
@jitcache.njit(parallel=True)
def _parallel(fn: int, L: Any, CO: Any, SIZES: Any) -> float:
    """The loop at ``fn`` over every chunk, on the thread pool, one call per run of chunks
    (:func:`_shares`)."""
    leaf, start, stop, size = _chunks(SIZES, CHUNK)
    bounds = _shares(start, stop, size, RUNS)
    for k in numba.prange(len(bounds) - 1):
        _call(fn, L, CO, leaf, start, stop, bounds[k], bounds[k + 1], 0)
    return 0.0


@jitcache.njit()
def _sums(fn: int, each: bool, L: Any, CO: Any, SIZES: Any) -> Any:
    """The sums the loop at ``fn`` (one that reads only) makes, on this thread: each leaf's
    where ``each``, else one, in an array."""
    leaf, start, stop, _ = _chunks(SIZES, CHUNK)
    sums = np.zeros(len(leaf))
    _call(fn, L, CO, leaf, start, stop, 0, len(leaf), sums)
    return _added(sums, leaf, len(SIZES), each)


@jitcache.njit(parallel=True)
def _sums_parallel(fn: int, each: bool, L: Any, CO: Any, SIZES: Any) -> Any:
    """:func:`_sums` on the thread pool: each chunk's sum in its own place, added up in the
    chunks' order as on one thread, so the sums are the same bits on any number of threads."""
    leaf, start, stop, size = _chunks(SIZES, CHUNK)
    sums = np.zeros(len(leaf))
    bounds = _shares(start, stop, size, RUNS)
    for k in numba.prange(len(bounds) - 1):
        _call(fn, L, CO, leaf, start, stop, bounds[k], bounds[k + 1], sums)
    return _added(sums, leaf, len(SIZES), each)


@jitcache.njit()
def _added(sums: Any, leaf: Any, n: int, each: bool) -> Any:
    total = np.zeros(n if each else 1)
    for j in range(len(sums)):
        total[leaf[j] if each else 0] += sums[j]
    return total


def _prologue(lists: int, compute: str, sums: bool) -> list[str]:
    """The first lines of a generated loop: its decorator, its signature and arrays over the
    addresses it is given (``lists`` lists of leaves, coefficients of dtype ``compute``, and,
    where it sums, each chunk's sum)."""
    return [
        '@cfunc(SIGNATURE, cache=CACHE, error_model="numpy")',
        "def walk(Lp, COp, nco, leafp, startp, stopp, first, last, sumsp):",
        f"    L = numba.carray(_voidptr(Lp), ({lists},), np.int64)",
        f"    CO = numba.carray(_voidptr(COp), (nco,), {compute})",
        *[f"    {name} = numba.carray(_voidptr({name}p), (last,), np.int64)"
          for name in ("leaf", "start", "stop")],
        *(["    sums = numba.carray(_voidptr(sumsp), (last,), np.float64)"] if sums else []),
        "    for j in range(first, last):",
        "        t, a, b = leaf[j], start[j], stop[j]",
    ]


def _drivers(fn: int, mode: str) -> tuple[Any, Any]:
    """The one-thread and thread-pool calls of the loop at address ``fn``, taking ``(L, CO,
    SIZES)``: ``sumsq``'s return the sum in an array of one, ``leafsq``'s each leaf's."""
    if mode in ("sumsq", "leafsq"):
        each = mode == "leafsq"
        return (functools.partial(_sums, fn, each),
                functools.partial(_pooled, _sums_parallel, _sums, fn, each))
    return functools.partial(_serial, fn), functools.partial(_pooled, _parallel, _serial, fn)


# One pool step at a time in a process: numba's parallel wrapper releases the GIL while its
# threads run, and its workqueue threading layer aborts the process when two threads enter it.
_POOL = threading.Lock()
# Whether this process was forked: it runs the one-thread loop (the same bits, :func:`_shares`),
# since a thread pool does not survive fork(). numba's (GNU OpenMP's) killed a child that
# entered it and hung a fork Pool's workers; after the parent's torch had started its OpenMP
# threads, a child entering numba's pool hung even where the parent never had (a DataLoader's
# workers after a forward pass). Counting the parent's threads at fork() does not tell which
# pool is there (NumPy's OpenBLAS starts threads at import and stops them for fork()): every
# forked child, the same rule.
_FORKED = False


def _pooled(parallel: Any, serial: Any, *args: Any) -> Any:
    """``parallel(*args)`` under :data:`_POOL`, or ``serial(*args)`` in a forked child."""
    if _FORKED:
        return serial(*args)
    with _POOL:
        if _STARTED:
            return parallel(*args)
        return _first_pooled(parallel, args)


# Whether numba's thread pool has run in this process. Its OpenMP layer, as it starts, sets the
# process's OpenMP thread count to numba's own; torch, where it shares the OpenMP runtime (its
# CPU wheels on Linux), reads that count as its own: a program that pinned torch to one thread
# (for reproducible sums, or one rank per core) had two after its first large step, its forward
# pass's sums changed. numba's later launches leave the count as they find it.
_STARTED = False


def _first_pooled(parallel: Any, args: tuple[Any, ...]) -> Any:
    """The pool's first run, torch's thread count (where torch is loaded) put back after it."""
    global _STARTED
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        return parallel(*args)
    finally:
        _STARTED = True
        if torch is not None and torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _forked() -> None:
    global _POOL, _FORKED
    _POOL = threading.Lock()  # (the parent's may be held by a thread the child does not have)
    _FORKED = True
    for fd in list(_LOCK_FDS):  # (the parent's compile locks: see _LOCK_FDS)
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):  # (not on Windows, which has no fork)
    os.register_at_fork(after_in_child=_forked)


# the namespace kernels see when compiled: scalar functions with NumPy's semantics
scalar_xp = types.ModuleType("uniopt_scalar_xp")

@numba.njit(inline="always")
def _sqrt(x: Any) -> Any:
    return np.sqrt(x)

@numba.njit(inline="always")
def _maximum(a: Any, b: Any) -> Any:  # NaN-propagating, as np.maximum
    return a if (a != a or a > b) else b

@numba.njit(inline="always")
def _minimum(a: Any, b: Any) -> Any:
    return a if (a != a or a < b) else b

@numba.njit(inline="always")
def _sign(x: Any) -> Any:  # NumPy's: +0.0 for either zero, NaN kept
    return np.sign(x) if x != 0 else x - x

scalar_xp.sqrt = _sqrt  # type: ignore[attr-defined]
scalar_xp.sign = _sign  # type: ignore[attr-defined]
scalar_xp.maximum = _maximum  # type: ignore[attr-defined]
scalar_xp.minimum = _minimum  # type: ignore[attr-defined]


def _register_callees(fn: Callable[..., Any]) -> None:
    """Let numba compile the plain Python functions ``fn`` calls by global name (the shared
    moment helpers); they stay ordinary functions for Python callers."""
    for name in fn.__code__.co_names:
        obj = fn.__globals__.get(name)
        if isinstance(obj, types.FunctionType) and obj not in _REGISTERED:
            _REGISTERED.add(obj)
            register_jitable(obj)
            _register_callees(obj)


def _jit(fn: Callable[..., Any], cache: dict[Any, Any]) -> Any:
    if fn not in cache:
        _register_callees(fn)
        cache[fn] = numba.njit(inline="always", error_model="numpy")(fn)
    return cache[fn]


_REGISTERED: set[Any] = set()


@overload(select)
def _select_scalar(xp, cond, a, b):  # numba wants the unannotated signature of select
    def impl(xp, cond, a, b):  # one element: a plain branch
        return a if cond else b

    return impl


_REGISTERED.add(select)


@overload(unfolded)
def _unfolded_scalar(xp, x):  # numba's LLVM keeps IEEE arithmetic as written
    def impl(xp, x):
        return x

    return impl


_REGISTERED.add(unfolded)


@overload(fma)
def _fma_scalar(a, b, c):  # one hardware fused multiply-add, as the reference's on NumPy
    def impl(a, b, c):
        return fused_multiply_add(a, b, c)

    return impl


@overload(lerp)
def _lerp_scalar(a, b, w):  # torch's lerp: the fused multiply-add from the nearer end
    one = np.float32(1) if w == nbtypes.float32 else 1.0  # w - 1 stays in w's precision

    def impl(a, b, w):
        d = b - a
        return fused_multiply_add(w, d, a) if abs(w) < 0.5 else fused_multiply_add(w - one, d, b)

    return impl


_REGISTERED.update((fma, lerp))
_JITTED: dict[Any, Any] = {}
_FUSED: dict[Any, Any] = {}


def kernel_for(fn: Callable[..., Any]) -> Any:
    """The compiled form of a rule's kernel (imported by generated modules)."""
    return _jit(fn, _JITTED)


def _importable(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` can be named by import in a generated module (so the loop can be
    cached on disk): defined at a module's top level, or as a method of a top-level class."""
    mod = sys.modules.get(fn.__module__)
    if mod is None or fn.__module__ == "__main__" or not getattr(mod, "__file__", None):
        return False
    obj: Any = mod
    for part in fn.__qualname__.split("."):
        obj = getattr(obj, part, None)
    return obj is fn


def _callees(fn: Callable[..., Any], seen: dict[Any, None]) -> dict[Any, None]:
    """``fn`` and the functions it or a function defined in it (an overload's implementation)
    calls by global name, transitively, in order: plain ones, and the definitions of numba
    intrinsics (whose code generation is the arithmetic: moments.fused_multiply_add)."""
    if fn not in seen:
        seen[fn] = None
        for name in _names(fn.__code__):
            obj = fn.__globals__.get(name)
            if type(obj) is _INTRINSIC:
                obj = obj._defn
            if isinstance(obj, types.FunctionType):
                _callees(obj, seen)
    return seen


_INTRINSIC = type(_voidptr)


def _names(code: types.CodeType) -> Iterator[str]:
    """The global names ``code`` and the code nested in it read."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names(const)


# a part as the loop runs it: its kernel, its slot count, and the finish that writes p (or None)
LoopPart = tuple[Callable[..., Any], int, Callable[..., Any] | None]


def _parts(plan: list[tuple[Any, Any, tuple[str, ...]]], mode: str) -> tuple[LoopPart, ...]:
    """Each part's kernel, slot count and, for the last where the loop writes the params,
    its ``finish`` (None: the params become ``p - u``)."""
    last = len(plan) - 1
    return tuple((part.kernel, len(keys),
                  part.finish if j == last and mode == "inplace" else None)
                 for j, (part, _, keys) in enumerate(plan))


def _callees_of(kernels: tuple[LoopPart, ...]) -> dict[Any, None]:
    seen: dict[Any, None] = {}
    for kernel, _, finish in kernels:
        _callees(kernel, seen)
        if finish is not None:
            _callees(finish, seen)
    return seen


def _digest(kernels: tuple[LoopPart, ...], records: tuple[Any, ...]) -> str:
    """What the machine code of a loop depends on beyond this module: the source of every
    kernel it inlines and of the helpers and intrinsics they call, the fields of each coefficient
    record (read by position once compiled), and what the moment helpers' compiled forms (the
    overloads above) call from other modules (moments.fused_multiply_add). Editing anything
    else in the package keeps the cache."""
    h = hashlib.sha1()
    seen = _callees_of(kernels)
    for impl in (_select_scalar, _unfolded_scalar, _fma_scalar, _lerp_scalar):
        _callees(impl, seen)
    for fn in seen:
        h.update(f"{fn.__module__}.{fn.__qualname__}\n".encode())
        h.update(inspect.getsource(fn).encode())
    h.update(repr(records).encode())
    return h.hexdigest()[:16]


# storage kinds: how a list's leaves hold their numbers, and how the loop reads and writes them
_STORAGE = {"f4": "np.float32", "f8": "np.float64", "f2": "np.uint16", "b2": "np.uint16"}
_READ = {"f4": "{}", "f8": "{}", "f2": "_f16({})", "b2": "_bf16({})"}
_WRITE = {"f4": "{}", "f8": "{}", "f2": "_to_f16({})", "b2": "_to_bf16({})"}



def _width(fields: Any) -> int:
    """How many coefficients a part's record holds (its fields, or a count)."""
    return len(fields) if isinstance(fields, tuple) else fields


def _bind_kernels(k: int, kernel: Any, finish: Any, by_import: bool) -> list[str]:
    """The generated module's lines binding part ``k``'s kernel as ``K{k}`` (and its finish as
    ``F{k}``): imported by name where the module is cached on disk, else handed in."""
    lines = []
    if by_import:
        lines.append(f"from {kernel.__module__} import {kernel.__qualname__.split('.')[0]}")
        lines.append(f"K{k} = kernel_for({kernel.__qualname__})")
    else:
        lines.append(f"K{k} = kernel_for(_K{k})")
    if finish is not None and by_import:
        lines.append(f"from {finish.__module__} import {finish.__qualname__.split('.')[0]}")
        lines.append(f"F{k} = kernel_for({finish.__qualname__})")
    elif finish is not None:
        lines.append(f"F{k} = kernel_for(_F{k})")
    return lines


def _source(
    kernels: tuple[LoopPart, ...], storage: tuple[str, str],
    by_import: bool, mode: str, records: tuple[Any, ...], digest: str = "",
) -> str:
    """A module defining ``walk``, a C function (:data:`SIGNATURE`) that runs every part in
    order over a range of chunks of the leaves; :func:`_drivers` run it over all of them, on the
    calling thread or on the thread pool.

    ``L`` holds the addresses of the lists of leaves, ``CO`` every part's coefficients in
    order (each part's record is rebuilt from it); the drivers add each leaf's element count:
    three arguments whatever the rule, so a call costs the same for every rule. ``storage``: the
    kinds of the params (and grads) and of the slots (``f4``, ``f8``, or ``f2``/``b2`` for
    float16/bfloat16, read into float32 and rounded once when written). Kernels are named by
    import (so the module stands alone and numba can cache it) or, for kernels defined where no
    import reaches, taken from globals ``_K0, _K1, ...``. Modes: ``inplace``: each operand is
    one array read and written (so the compiler sees fewer pointers that might alias, and
    vectorizes; a pure step runs it on copies); ``update``:
    the slots as ``inplace``, and in place of ``p`` the final ``u`` into ``uo`` (the list after
    ``g``): a run of elementwise parts that a per-leaf part follows; ``sumsq``: writes nothing
    and sums the squares of the final ``u`` (a global norm's one extra read pass), each chunk's
    into ``sums``; ``leafsq``: the same, the drivers adding them per leaf. Steps under
    ``PARALLEL_MIN`` elements stay on the calling thread, without waking the thread pool (it
    costs more than a small step).

    A part whose record is per leaf (its last field in ``records``: a per-leaf norm's
    coefficients) reads its numbers from a table after the others' in ``CO``, one row per
    leaf."""
    reads_only = mode in ("sumsq", "leafsq")
    kp, ks = storage
    head = [
        f"# generated by uniopt {_VERSION} for kernels {digest}; safe to delete",
        "import collections",
        "import numba",
        "import numpy as np",
        "from uniopt.fast.cpu import SIGNATURE, _leaf, _voidptr",
        "from uniopt.fast.cpu import _bf16, _f16, _to_bf16, _to_f16, kernel_for",
        "from uniopt.fast.cpu import scalar_xp as XP",
        "from uniopt.jitcache import cfunc",
        f"PT = {_STORAGE[kp]}",
        f"ST = {_STORAGE[ks]}",
    ]
    lists: list[str] = []

    def view(name: str) -> str:
        lists.append(name)
        return (f"{name} = numba.carray(_voidptr(_leaf(L[{len(lists) - 1}], t)), "
                f"(b,), {'PT' if name[0] in 'pgu' else 'ST'})")

    loads = [view("p"), view("g")]
    if mode == "update":
        loads.append(view("uo"))
    body, co, s = [], 0, 0
    end = "x - u"

    shared = sum(_width(r[2]) for r in records if not r[3])  # then the table of rows
    row = sum(_width(r[2]) for r in records if r[3])
    at_row = 0
    for k, ((kernel, nslots, finish), (_, _, fields, leafwise)) in enumerate(
            zip(kernels, records, strict=True)):
        head += _bind_kernels(k, kernel, finish, by_import)
        width = _width(fields)
        if leafwise:
            values = ", ".join(f"CO[{shared + at_row + j} + t * {row}]" for j in range(width))
            at_row += width
        else:
            values = ", ".join(f"CO[{co + j}]" for j in range(width))
            co += width
        if isinstance(fields, tuple) and fields:
            head.append(f"R{k} = collections.namedtuple('R{k}', {fields!r})")
            loads.append(f"C{k} = R{k}({values})")
        else:
            loads.append(f"C{k} = ({values}{',' if width else ''})")
        names = list(range(s, s + nslots))
        s += nslots
        loads += [view(f"s{n}") for n in names]
        reads = "".join(", " + _READ[ks].format(f"s{n}[i]") for n in names)
        if finish is not None:  # the last part writes p from its input: keep it
            body.append("v = u")
            end = f"F{k}(XP, C{k}, x, v{''.join(f', r[{j + 1}]' for j in range(nslots))})"
        body.append(f"r = K{k}(XP, C{k}, x, u{reads})")
        body.append("u = r[0]")
        if not reads_only:
            body += [f"s{n}[i] = {_WRITE[ks].format(f'r[{j + 1}]')}"
                     for j, n in enumerate(names)]
    if reads_only:
        body.append("acc += np.float64(u) * np.float64(u)")
    elif mode == "update":
        body.append("uo[i] = u")
    else:
        body.append(f"p[i] = {_WRITE[kp].format(end)}")
    one_chunk = [
        *loads,
        "acc = 0.0",
        "# unsigned indices: no negative-index wraparound, so the loop vectorizes",
        "for i in range(np.uint64(a), np.uint64(b)):",
        f"    x = {_READ[kp].format('p[i]')}",
        f"    u = {_READ[kp].format('g[i]')}",
        *[f"    {line}" for line in body],
        *(["sums[j] = acc"] if reads_only else []),
    ]
    return "\n".join([
        *head,
        "",
        "",
        *_prologue(len(lists), "np.float64" if kp == "f8" else "np.float32", reads_only),
        *[f"        {line}" for line in one_chunk],
        "    return 0.0",
        "",
    ])


def _cache_dir() -> Path | None:
    """Where generated loops live, so numba can cache their machine code between runs."""
    path = (Path(jitcache.root())
            / f"fused-{_VERSION}-numba{numba.__version__}-numpy{np.__version__}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        jitcache.uncached(path, e)
        return None
    if not os.access(path, os.W_OK):
        jitcache.uncached(path, "not writable")
        return None
    return path


def _record(part: Any, c: Any) -> Any:
    """The type and field names of a coefficient record, and whether it is one per leaf: part
    of a compiled loop's identity."""
    return (type(c).__module__, type(c).__qualname__, getattr(c, "_fields", len(c)),
            _per_leaf(part))


def _per_leaf(part: Any) -> bool:
    """Whether ``part``'s coefficients are one record per leaf (a norm of each leaf's own)."""
    return bool(part.needs_norm and part.norm_per_leaf)


def _module(
    kernels: tuple[LoopPart, ...], storage: tuple[str, str], mode: str,
    records: tuple[Any, ...],
) -> tuple[Path | None, str, Path | None]:
    """The cache directory (None: kernels no import reaches), the source and the file of the
    loop for these parts."""
    where = _cache_dir() if all(_importable(k) and (f is None or _importable(f))
                                for k, _, f in kernels) else None
    digest = _digest(kernels, records) if where is not None else ""
    src = _source(kernels, storage, by_import=where is not None, mode=mode, records=records,
                  digest=digest)
    if where is None:
        return None, src, None
    return where, src, where / f"uniopt_fused_{hashlib.sha1(src.encode()).hexdigest()[:16]}.py"


def _loop_key(plan: list[tuple[Any, Any, tuple[str, ...]]],
              storage: tuple[str | None, str | None], mode: str, seg: int = 0
              ) -> tuple[Any, ...]:
    """The key of ``plan``'s loop in its rule's memo (:func:`_loop`)."""
    return ("cpu", storage, mode, seg, *[type(c) for _, c, _ in plan])


def _waited(memo: dict[Any, Any]) -> int:
    """How many small steps the rules that share ``memo``'s count (``memo["cpu-small-shared"]``)
    have had on the reference path with its loop (``memo["cpu-small-key"]``) before this one,
    which it counts."""
    shared, key = memo["cpu-small-shared"], memo["cpu-small-key"]
    n = shared.get(key, 0)
    shared[key] = n + 1
    return int(n)


def _compiled(memo: dict[Any, Any], plan: list[tuple[Any, Any, tuple[str, ...]]],
              storage: tuple[str, str], mode: str, seg: int = 0) -> bool:
    """Whether the loop for ``plan`` (segment ``seg`` of its rule) is at hand without
    compiling: loaded in this process, or its module on disk (written by the process that
    compiled it)."""
    key = _loop_key(plan, storage, mode, seg)
    if key in memo:
        return True
    seen = memo.get(("on disk", key))  # looked for once per rule
    if seen is None:
        parts = _parts(plan, mode)
        records = tuple(_record(part, c) for part, c, _ in plan)
        full = (parts, storage, mode, records)
        seen = full in _FUSED
        if not seen:
            # the file's name costs the loop's source (milliseconds): found once per process,
            # not once per rule (torch's NAdam and ASGD have a new rule at every step)
            path = _PATHS[full] if full in _PATHS else _PATHS.setdefault(
                full, _module(parts, storage, mode, records)[2])
            seen = path is not None and path.exists()
        memo[("on disk", key)] = seen
    return bool(seen)


# the cache file of each loop looked for, by its parts, storage, mode and records
_PATHS: dict[tuple[Any, ...], Path | None] = {}


def fused_kernel(
    kernels: tuple[LoopPart, ...], storage: tuple[str, str], mode: str,
    records: tuple[Any, ...],
) -> Any:
    """The one-thread and thread-pool calls (:func:`_drivers`) of the loop for parts
    ``kernels`` (each: the kernel, its slot count and the finish that writes p), whose
    coefficient records are described by ``records`` (see :func:`_record`), over params and
    slots stored as ``storage`` says (see :func:`_source`).

    Compiling costs a second or two; the machine code is cached on disk (in
    ``$UNIOPT_CACHE_DIR``, default ``$XDG_CACHE_HOME/uniopt``, else ``~/.cache/uniopt``:
    :func:`uniopt.jitcache.root`) whenever every kernel is importable,
    so later processes load it in milliseconds."""
    key = (kernels, storage, mode, records)
    if key in _FUSED:
        return _FUSED[key]
    walk = _load(*_module(kernels, storage, mode, records)[1:],
                {f"_{x}{k}": f for k, (kernel, _, finish) in enumerate(kernels)
                 for x, f in (("K", kernel), ("F", finish))})
    _FUSED[key] = _drivers(walk.address, mode)
    return _FUSED[key]


def _load(src: str, path: Path | None, names: dict[str, Any]) -> Any:
    """The ``walk`` of generated module ``src``: imported from ``path`` in the cache directory
    (:func:`_imported`), or, with no path (kernels defined in __main__ or a notebook),
    compiled in memory from ``src`` with ``names`` as its globals. Held for the life of the
    process: the drivers call it by address."""
    if path is None:
        g: dict[str, Any] = {"CACHE": False, **names}
        exec(compile(src, "<uniopt fused loop>", "exec"), g)
        walk = g["walk"]
    else:
        walk = _imported(src, path).walk
    _HELD.append(walk)
    return walk


def _imported(src: str, path: Path) -> Any:
    """Generated module ``src`` (its functions' ``cache=CACHE``) imported from ``path`` in the
    cache directory, written there first if new or damaged; numba caches its machine code
    beside it. Where it cannot be written (a full disk), run uncached, with a warning."""
    name = path.stem
    text = src.replace("cache=CACHE", "cache=True")
    data = text.encode()  # (bytes: no newline or encoding of the platform's between)
    # checked, written, compiled and imported by one process at a time: the ranks of a job on
    # one machine (or a test suite's workers) that meet a loop new to the cache together
    # compile it once, and the others load its machine code, in milliseconds, when the lock is
    # theirs. The check is inside the lock too: numba 0.62 keys its cache by the file's time
    # stamp (later releases by its hash), and a process that found no file before another
    # wrote it, and wrote it again after that one compiled, made the other's machine code
    # stale to itself
    with _locked(path.with_suffix(".lock")):
        try:
            written = path.read_bytes() == data
        except OSError:
            written = False
        if not written:  # new, or damaged: its name is a hash of its text
            # under a name of this writer's own (threads share a PID), then renamed: atomic,
            # a reader where there are no locks sees all of it or none. (Machine code numba
            # cached from damaged text is not loaded for this: numba keys it by the
            # function's bytecode too.)
            tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:16]}.tmp")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
            except OSError as e:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                jitcache.uncached(path.parent, e)
                module = types.ModuleType(name)
                module.__dict__["CACHE"] = False  # (as _load's and q8's loops no import reaches)
                exec(compile(src, f"<{name}>", "exec"), module.__dict__)
                return module
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # numba's cache finds the module by name when it loads
        # the text checked above, not Python's .pyc of the file: one file less to be damaged
        exec(compile(text, str(path), "exec"), module.__dict__)
    return module


_HELD: list[Any] = []


_locked, _LOCK_FDS = jitcache.locked, jitcache.LOCK_FDS


def _self_test() -> bool:
    """Whether the struct offsets above are those of the NumPy we run with."""
    a = np.ones((3, 4), np.float32)
    base = id(a)

    def read(off: int, t: Any = ctypes.c_int64) -> int:
        return int(t.from_address(base + off).value)

    descr = read(_DESCR)
    items = [a, descr]
    head = id(items)
    list_ok = (
        ctypes.c_ssize_t.from_address(head + _LIST_SIZE).value == 2
        and ctypes.c_int64.from_address(
            ctypes.c_int64.from_address(head + _LIST_ITEMS).value + 8
        ).value
        == id(descr)
    )
    return (
        list_ok and
        read(_TYPE) == id(np.ndarray)
        and read(_DATA) == a.__array_interface__["data"][0]
        and read(_ND, ctypes.c_int32) == 2
        and ctypes.c_int64.from_address(read(_DIMS) + 8).value == 4
        and read(_FLAGS, ctypes.c_int32) & 0x501 == 0x501
        and ctypes.c_int32.from_address(descr + _DESCR_TYPENUM).value == a.dtype.num
        and chr(ctypes.c_char.from_address(descr + _DESCR_BYTEORDER).value[0]) == "="
    )


AVAILABLE = _self_test()


def _loop(
    memo: dict[Any, Any], plan: list[tuple[Any, Any, tuple[str, ...]]], storage: tuple[str, str],
    mode: str, seg: int = 0,
) -> Any:
    """The compiled loop for ``plan``'s parts, found once per rule (in the rule's ``memo``) and
    by the records' types and segment ``seg`` (a run of elementwise parts between per-leaf
    ones: two runs may hold records of one type): a step looks it up in one small dict."""
    key = _loop_key(plan, storage, mode, seg)
    loop = memo.get(key)
    if loop is None:
        parts = _parts(plan, mode)
        loop = memo[key] = fused_kernel(parts, storage, mode,
                                        tuple(_record(part, c) for part, c, _ in plan))
    return loop


def _coefficients(plan: list[tuple[Any, Any, tuple[str, ...]]], dtype: Any, n: int) -> Any:
    """Every part's coefficients in order, in the precision of the computation (flags too: the
    compiled select tests them as numbers); then those that are one per leaf, a row for each
    of the ``n`` leaves."""
    shared: list[Any] = []
    columns: list[Any] = []
    for part, c, _ in plan:  # no Python-level call per part: a small step counts them
        (columns if part.needs_norm and part.norm_per_leaf else shared).extend(c)
    if not columns:
        return np.array(shared, dtype)
    table = np.empty((n, len(columns)), dtype)
    for j, x in enumerate(columns):
        table[:, j] = x
    return np.concatenate([np.array(shared, dtype), table.ravel()])


_WRITES = {(inplace, n): np.array([inplace, False, *[inplace] * n]) for inplace in (True, False)
           for n in range(8)}
_KINDS = {"f": "f4", "d": "f8", "e": "f2"}
_TYPENUMS: dict[tuple[int, int, int], Any] = {}


def _kind(dtype: Any) -> str | None:
    """The storage kind of NumPy ``dtype``: float32/64, float16, or bfloat16 (the bits of a
    bfloat16 tensor, :data:`uniopt.backend.BFLOAT16_BITS`, or ml_dtypes' bfloat16)."""
    md = dtype.metadata
    if md is not None and md.get("uniopt") == "bfloat16":
        return "b2"
    kind = _KINDS.get(dtype.char)
    return "b2" if kind is None and dtype.name == "bfloat16" else kind


def _addresses(lists: list[Any]) -> Any:
    """The address of each list (of a table of addresses, negated: :func:`_leaf`)."""
    out = np.array(list(map(id, lists)), np.int64)
    if Addressed in map(type, lists):  # (no Python call where there is none: small steps)
        for k, x in enumerate(lists):
            if type(x) is Addressed:
                out[k] = x.address
    return out


def run(
    plan: list[tuple[Any, Any, tuple[str, ...]]],
    params: list[Any],
    grads: list[Any],
    slots: dict[str, list[Any]],
    inplace: bool,
    memo: dict[Any, Any] | None = None,
    small: bool = False,
    shards: Any = None,
) -> tuple[list[Any], dict[str, list[Any]]] | str | None:
    """One step of ``plan`` (resolved parts, coefficients, slot keys) over the leaves.

    In place, writes params and slots and returns them; otherwise returns new arrays (copies,
    stepped in place by the same loop). If the compiled path cannot run the step, returns the
    reason and has written nothing. ``memo`` (the rule's) keeps the loop found for it.
    ``small`` (see :data:`MIN_LEAVES`): returns None, having written nothing, where the loop
    would have to be compiled for it, until the rule has had :data:`COMPILE_AFTER` such steps.
    ``shards`` (:func:`uniopt.backend.shards_of`): the leaves are local shards of bigger
    tensors, whose norms are summed across the ranks.

    float16/bfloat16 params are computed in float32, with slots of their own dtype or float32,
    and rounded once when stored, as the reference path does."""
    n = len(params)
    if n == 0:
        return "no leaves"
    first = params[0]
    kp = None if type(first) is not np.ndarray else _kind(first.dtype)
    if kp is None:
        return f"leaves of type {type(first).__name__} and dtype {getattr(first, 'dtype', '?')}"
    some = next(iter(slots.values()), None)
    ks = kp if not some else _kind(getattr(some[0], "dtype", first.dtype))
    if ks != kp and not (ks == "f4" and kp in ("f2", "b2")):
        return f"params stored as {first.dtype} and state as {some[0].dtype}"  # type: ignore[index]
    storage = (kp, ks)
    memo = {} if memo is None else memo
    # the compiled code reads these lists by address: they must be lists, alive and unchanged
    # for the call (the one-thread loop holds the GIL; the pool's releases it while it runs)
    if type(params) is not list:
        params = list(params)
    if type(grads) is Addressed:  # checked by its maker, but for its count and dtype
        if len(grads.tensors) != n or grads.dtype != first.dtype:
            grads = grads.arrays()  # _check says what is wrong
    elif type(grads) is not list:
        grads = list(grads)
    if not all(map(operator.is_, map(type, slots.values()), itertools.repeat(list))):
        slots = {k: list(v) for k, v in slots.items()}
    # in the plan's order, as the loop reads them: one table of addresses for the check and
    # the loop (a step's state may hold its slots in another order, sorted by a checkpoint)
    keys = [key for _, _, ks in plan for key in ks]
    ordered = len(keys) == len(slots)  # (every slot one a part reads: the loop's lists)
    if not ordered:
        keys = list(slots)
    inputs = [params, grads, *map(slots.__getitem__, keys)]
    sizes = np.empty(n, np.int64)
    writes = _WRITES.get((inplace, len(slots)))
    if writes is None:
        writes = np.array([inplace, False, *[inplace] * len(slots)])
    kinds = (first.dtype.num, some[0].dtype.num if some else first.dtype.num, len(slots))
    typenums = _TYPENUMS.get(kinds)
    if typenums is None:  # made once per dtypes and slot count, as _WRITES
        typenums = _TYPENUMS[kinds] = np.array([kinds[0], kinds[0], *[kinds[1]] * kinds[2]])
    table = _addresses(inputs)
    code = _check(table, writes, _NDARRAY, typenums, sizes)
    if code:
        k, i, why = code >> 32, (code >> 3) & 0x1FFFFFFF, code & 7
        what = ["params", "grads", *(f"state slot {key}" for key in keys)][k - 1]
        return f"{what} count" if why == _COUNT else f"{what} leaf {i} {REASONS[why]}"
    if small and memo.get("cpu-small", 0) < (COMPILE_AFTER or 0):
        if not _compiled(memo, plan, storage, "inplace"):
            shared = memo.get("cpu-small-shared")
            if shared is not None:
                memo["cpu-small-key"] = _loop_key(plan, storage, "inplace")
            if shared is None or _waited(memo) < (COMPILE_AFTER or 0):
                memo["cpu-small"] = memo.get("cpu-small", 0) + 1  # step() counts the next ones
                return None
        memo["cpu-small"] = COMPILE_AFTER  # at hand: every small step takes it
    if not inplace:
        # a pure step is the in-place loop run on copies: one compiled loop serves both
        # (half the compiling), and the copies cost little beside the new memory a pure step
        # writes anyway (its pages faulted in: most of its time)
        params = [p.copy() for p in params]
        slots = {k: [x.copy() for x in v] for k, v in slots.items()}
    _pass(plan, params, grads, slots, params, "inplace", memo, storage, sizes, shards,
          table=table if inplace and ordered else None)
    return params, slots


def _pass(
    plan: list[tuple[Any, Any, tuple[str, ...]]], params: list[Any], grads: list[Any],
    slots: dict[str, list[Any]], out: list[Any], mode: str,
    memo: dict[Any, Any], storage: tuple[str, str], sizes: Any, shards: Any = None,
    seg: int = 0, table: Any = None,
) -> None:
    """One compiled pass of ``plan`` over checked leaves, writing ``params`` and ``slots`` in
    place (``inplace``), or the slots in place and the final ``u`` to ``out`` (``update``).
    ``table``: the addresses of the lists the loop reads (``params``, ``grads``, the slots in
    the plan's order), where the caller made it for its check and holds the lists; else made
    here."""
    n, first = len(params), params[0]
    compute = np.float64 if storage[0] == "f8" else np.float32
    # the loop on the thread pool, or on this thread (a sum of Python ints: NumPy's costs more)
    big = int(sum(sizes.tolist()) >= PARALLEL_MIN)
    for part, _, _ in plan:  # a loop, not any(): no generator's frame on every step
        if getattr(part, "by_dtype", False):  # every leaf here has first's dtype
            plan = [(p, p.for_dtype(c, first.dtype) if getattr(p, "by_dtype", False) else c, k)
                    for p, c, k in plan]
            break
    for j, (part, _, _) in enumerate(plan):
        if part.needs_norm:  # one extra read pass: the norm of what reaches this part
            plan = list(plan)
            prefix = plan[:j]
            each = _per_leaf(part)
            sumsq = _loop(memo, prefix, storage,
                          "leafsq" if each or shards is not None else "sumsq", seg)
            reads = [params, grads, *(slots[key] for _, _, keys in prefix for key in keys)]
            total = sumsq[big](_addresses(reads), _coefficients(prefix, compute, n), sizes)
            counts = sizes
            if shards is not None:  # each leaf's sum over its whole tensor, every rank's added
                total, counts = shards.sums(total), shards.sizes(sizes)
                if not each:
                    total = math.fsum(total)
            if each:
                c = part.norm_coeffs(np.sqrt(total), counts.astype(np.float64))
            else:  # (the squares of every group where the engine steps leaves by their count)
                squares, size, shared = backend.global_squares(
                    float(total if shards is not None else total[0]), int(counts.sum()))
                c = (part if shared is None else shared).norm_coeffs(float(np.sqrt(squares)), size)
            plan[j] = (part, c, plan[j][2])
    if table is None:
        # in the plan's order (a state's dict of slots may come back sorted), held for the call
        lists = [params, grads, *([out] if mode == "update" else []),
                 *[slots[key] for _, _, keys in plan for key in keys]]
        table = _addresses(lists)
    loop = _loop(memo, plan, storage, mode, seg)
    loop[big](table, _coefficients(plan, compute, n), sizes)


class Fixed:
    """The coefficients of a rule of fixed parts (:func:`uniopt.engine.fixed_parts`) at a step
    count, as the compiled loop reads them. Where every part says from which step they stop
    moving (:func:`uniopt.base.steady_from`: SGD's from its second, after torch's undamped
    first), those of a step from there are made once and serve every later step: SGD's took
    1.5 us of a 20 us step on S1."""

    __slots__ = ("methods", "dtype", "start", "made")

    def __init__(self, parts: list[Any], dtype: Any) -> None:
        self.methods = [part.coeffs for part in parts]
        self.dtype = dtype
        starts = [s for s in map(steady_from, parts) if s is not None]
        self.start = max(starts, default=0) if len(starts) == len(parts) else None
        self.made: Any = None

    def __call__(self, step: int) -> Any:
        start, made = self.start, self.made
        # (a count before the steady one: a state loaded from an earlier step, another state
        # of the same rule)
        if start is None or step < start or made is None:
            made = np.array([x for f in self.methods for x in f(step)], self.dtype)
            if start is not None and step >= start:
                self.made = made
        return made


class Bound:
    """The compiled in-place step of a rule, bound to params and slots that stay the same
    objects from step to step (a ``uniopt.torch`` plan's NumPy views of its tensors, which the
    plan re-checks by identity and address before every step). They are checked once, when
    bound; a step checks only its gradients, computes its coefficients and calls the loop:
    about a third of :func:`run`'s Python work, which is most of a small model's step."""

    __slots__ = ("params", "grads", "seen", "held", "lists", "pair", "sizes", "scratch",
                 "typenums", "dtype", "memo", "storage", "compute", "big", "fixed", "key",
                 "loop")

    def __init__(self, plan: list[tuple[Any, Any, tuple[str, ...]]], params: list[Any],
                 slots: dict[str, list[Any]], memo: dict[Any, Any], fixed: bool) -> None:
        first = params[0]
        self.params, self.grads, self.memo = params, list(params), memo
        # the list of gradient arrays last checked, held (so no other list takes its address):
        # a list the caller reuses unchanged, as uniopt.torch's of gradients it has seen
        self.seen: list[Any] | None = None
        kp = _kind(first.dtype)
        some = next(iter(slots.values()), None)
        self.storage = (kp, kp if not some else _kind(some[0].dtype))
        self.compute = np.float64 if kp == "f8" else np.float32
        self.dtype = first.dtype
        # the gradients' list is this object's own, refilled at every step: its address stays;
        # the lists the loop reads by address are held here, alive while it may read them
        self.held = [params, self.grads, *(slots[key] for _, _, keys in plan for key in keys)]
        self.lists = _addresses(self.held)
        self.pair = self.lists[:2].copy()
        self.sizes = np.array([p.size for p in params], np.int64)
        self.scratch = np.empty_like(self.sizes)
        self.typenums = np.array([first.dtype.num] * 2)
        self.big = int(sum(self.sizes.tolist()) >= PARALLEL_MIN)
        # the loop's key in the memo, and the loop once found, for a plan of fixed parts (the
        # same parts at every step, so the same types of coefficients)
        self.key = _loop_key(plan, self.storage, "inplace")
        self.loop: Any = None
        # a rule of fixed parts (engine.fixed_parts: no schedule, each part its own at every
        # step): their coefficients, which a step given as a count makes for itself (the
        # engine's resolve, a list of every part, is most of a small step's own Python work)
        self.fixed = Fixed([part for part, _, _ in plan], self.compute) if fixed else None

    def __call__(self, plan: list[tuple[Any, Any, tuple[str, ...]]] | int, grads: Any,
                 keep: bool = True) -> bool:
        """One step of ``plan`` (resolved as :func:`bind`'s; or, where :attr:`fixed`, the step
        count it is resolved at) with gradients ``grads`` (a list
        of NumPy arrays or an :class:`~uniopt.backend.Addressed`); False, having written
        nothing, where they are not the params' kind or the loop is not at hand (the caller's
        engine step then runs it, or says what is wrong). The list of the last step, passed
        again, is not checked again: a caller reuses a list only while it holds the same
        arrays (uniopt.torch's of gradients it has seen, its own). ``keep``: whether the
        caller may pass this list again; if not, it is let go after the step, and with it the
        gradients its views hold (a model's worth of memory past ``zero_grad()``)."""
        if type(grads) is Addressed:
            if len(grads.tensors) != len(self.params) or grads.dtype != self.dtype:
                return False
            self.lists[1] = grads.address
        elif grads is not self.seen:  # (the caller's list of last step: its arrays checked)
            self.grads[:] = grads
            self.lists[1] = self.pair[1]
            self.seen = None
            if _check(self.pair, _READS, _NDARRAY, self.typenums, self.scratch):
                self.grads.clear()
                return False
            if keep:
                self.seen = grads
        else:
            self.lists[1] = self.pair[1]
        if isinstance(plan, int):
            assert self.fixed is not None
            coefficients = self.fixed(plan)
            loop = self.loop
            if loop is None:
                loop = self.loop = self.memo.get(self.key)
        else:
            coefficients = _coefficients(plan, self.compute, len(self.params))
            loop = self.memo.get(_loop_key(plan, self.storage, "inplace"))
        if loop is None:
            self.grads.clear()
            self.seen = None
            return False
        loop[self.big](self.lists, coefficients, self.sizes)
        if not keep:
            self.grads.clear()
        global STEPS
        STEPS += 1
        return True


def bind(plan: list[tuple[Any, Any, tuple[str, ...]]], params: Any, slots: Any,
         memo: dict[Any, Any], fixed: bool = False) -> Bound | None:
    """A :class:`Bound` step of ``plan`` on ``params`` and ``slots`` (lists of NumPy arrays,
    the params written in place), where :func:`run` takes them as they are (``fixed``: the
    plan is of a rule whose parts are fixed, :func:`uniopt.engine.fixed_parts`, and the bound
    step may be given its count in place of the plan); None for a plan
    with a norm's extra pass or coefficients by dtype, or leaves the loop does not take."""
    if (not AVAILABLE or type(params) is not list or not params
            or any(part.needs_norm or getattr(part, "by_dtype", False) for part, _, _ in plan)
            or not all(type(v) is list for v in slots.values())):
        return None
    first = params[0]
    if type(first) is not np.ndarray or _kind(first.dtype) is None:
        return None
    bound = Bound(plan, params, slots, memo, fixed)
    some = next(iter(slots.values()), None)
    if bound.storage[1] is None or bound.storage[0] != bound.storage[1] and not (
            bound.storage == ("f2", "f4") or bound.storage == ("b2", "f4")):
        return None
    lists = [params, params, *(slots[key] for _, _, keys in plan for key in keys)]
    typenums = np.array([first.dtype.num, first.dtype.num,
                         *[(some[0].dtype.num if some else first.dtype.num)] * (len(lists) - 2)])
    writes = np.array([True, False, *[True] * (len(lists) - 2)])
    if _check(_addresses(lists), writes, _NDARRAY, typenums, bound.scratch):
        return None
    return bound


class Lane:
    """What a rule's last in-place step on NumPy leaves found out that holds while the leaves
    keep their dtype and the state its slots (the slots' keys in the plan's order, no norm's
    extra pass, no coefficients by dtype): a later step of the same rule builds the table of
    addresses, checks every leaf with one compiled call (:func:`_check`, as :func:`run` does:
    types, dtypes, layout, shapes, writeable), resolves and runs the loop, with none of
    :func:`run`'s per-call working out. Kept in the rule's memo; it holds no array (the table
    is filled from the caller's lists at each step, which hold them for the call). Anything
    else (a small step whose loop is not yet due, another count of leaves, a leaf the check
    refuses) goes the whole way, which says what is wrong. One per dtype of the leaves (a rule
    may step float32 and float64 trees in turn: uniopt.torch's runs of a mixed group)."""

    __slots__ = ("keys", "writes", "typenums", "storage", "compute", "fixed", "loop")

    def __init__(self, keys: list[str], storage: tuple[str, str], dtype: Any,
                 fixed: list[Any] | None, loop: Any) -> None:
        self.keys = keys
        self.writes = np.array([True, False, *[True] * len(keys)])
        self.typenums = np.array([dtype.num] * (2 + len(keys)))
        self.storage = storage
        self.compute = np.float64 if storage[0] == "f8" else np.float32
        # a rule of fixed parts (engine.fixed_parts): their coefficients, made at the step count
        # resolve holds (its args, as every strategy reads it), and the one loop
        self.fixed = None if fixed is None else Fixed(fixed, self.compute)
        self.loop = loop

    def __call__(self, resolve: Callable[[], list[tuple[Any, Any, tuple[str, ...]]]],
                 params: list[Any], grads: Any, slots: dict[str, list[Any]],
                 memo: dict[Any, Any]) -> bool:
        """One step, True; False where it wrote nothing and the whole way must run."""
        if type(grads) is not list or len(slots) != len(self.keys):
            return False
        # the coefficients first: a schedule is the user's code, which may change the lists
        # (a leaf put in their place), and nothing may run between the check and the loop
        step = resolve.args[1] if type(resolve) is functools.partial else None
        if self.fixed is not None and type(step) is int:
            coefficients = self.fixed(step)
            loop = self.loop
        else:
            plan = resolve()
            coefficients = _coefficients(plan, self.compute, len(params))
            loop = memo.get(_loop_key(plan, self.storage, "inplace"))
        try:
            lists = [params, grads, *map(slots.__getitem__, self.keys)]
        except KeyError:
            return False
        # (the compiled check reads each of them as a list: nothing else may reach it)
        if loop is None or not all(map(operator.is_, map(type, lists), itertools.repeat(list))):
            return False
        # (the table and sizes are this call's own: two threads may step with one rule)
        n, sizes, table = len(params), np.empty(len(params), np.int64), np.array(
            list(map(id, lists)), np.int64)
        if _check(table, self.writes, _NDARRAY, self.typenums, sizes):
            return False
        total = sum(sizes.tolist())
        if n < MIN_LEAVES and total < MIN_SIZE and (
                COMPILE_AFTER is None or memo.get("cpu-small", 0) < COMPILE_AFTER):
            return False  # (run's and step's count of small steps decide)
        loop[int(total >= PARALLEL_MIN)](table, coefficients, sizes)
        return True


def _lane(resolve: Any, plan: list[tuple[Any, Any, tuple[str, ...]]], params: list[Any],
          slots: dict[str, list[Any]], memo: dict[Any, Any]) -> Lane | bool | None:
    """A :class:`Lane` for the rule of ``plan`` (resolved by ``resolve``), after a compiled
    in-place step of it on NumPy ``params``, where a lane can take its later steps; None where
    these leaves cannot (16-bit ones, slots of another dtype), but others of the rule may;
    False where no step of the rule can (a norm's extra pass, coefficients by dtype)."""
    if any(part.needs_norm or getattr(part, "by_dtype", False) for part, _, _ in plan):
        return False
    keys = [key for _, _, ks in plan for key in ks]
    first = params[0]
    kind = _kind(first.dtype)
    if (kind not in ("f4", "f8") or len(keys) != len(slots)
            or any(getattr(v[0], "dtype", None) != first.dtype for v in slots.values() if v)):
        return None
    rule = resolve.args[0] if type(resolve) is functools.partial else None
    fixed = None
    if rule is not None and rule.fixed and all(m.fixed for _, m in members(rule)) and all(
            getattr(part, "fixed", False) for part, _ in rule.keyed_parts):
        # (engine.resolve's steps of such a rule: each part's coefficients, nothing validated)
        fixed = [part for part, _ in rule.keyed_parts]
    return Lane(keys, (kind, kind), first.dtype, fixed,
                memo.get(_loop_key(plan, (kind, kind), "inplace")))


_READS = np.zeros(2, bool)
_NDARRAY = id(np.ndarray)
_SIZE = operator.attrgetter("size")

# A plan as segments: runs of elementwise parts (True, [entries]) and per-leaf parts, each
# alone (False, [entry]).
Segments = list[tuple[bool, list[tuple[Any, Any, tuple[str, ...]]]]]


def _segments(plan: list[tuple[Any, Any, tuple[str, ...]]]) -> Segments:
    out: Segments = []
    for entry in plan:
        if isinstance(entry[0], Elementwise) and out and out[-1][0]:
            out[-1][1].append(entry)
        else:
            out.append((isinstance(entry[0], Elementwise), [entry]))
    return out


def segmented(
    plan: list[tuple[Any, Any, tuple[str, ...]]],
    params: list[Any],
    grads: list[Any],
    slots: dict[str, list[Any]],
    inplace: bool,
    per_leaf: Callable[..., list[tuple[Any, ...]]],
    memo: dict[Any, Any] | None = None,
    small: bool = False,
) -> tuple[list[Any], dict[str, list[Any]]] | str | None:
    """One step of a plan of elementwise and per-leaf parts (see :func:`run`, whose contract
    it keeps): each run of elementwise parts is one compiled pass, each per-leaf part runs as
    the reference path runs it, ``per_leaf(part, c, slots, xps, ps, us, finish)`` (the
    engine's: one call per leaf or per stack of same-shaped leaves). The update flows between
    them through arrays of its own (one per leaf): a run followed by a per-leaf part writes
    ``u`` there in place of the params (mode ``update``), and the next run reads it as its
    gradient. Only the last segment writes the params; a global norm in a run is that of the
    ``u`` reaching it. NumPy float32/float64 leaves, their slots of their dtype."""
    n = len(params)
    if n == 0:
        return "no leaves"
    first = params[0]
    kp = None if type(first) is not np.ndarray else _kind(first.dtype)
    if kp not in ("f4", "f8"):
        return (f"per-leaf parts with leaves of dtype {getattr(first, 'dtype', '?')} run on the "
                "reference path")
    memo = {} if memo is None else memo
    segments = _segments(plan)
    if not any(compiled for compiled, _ in segments):
        return "no elementwise part (per-leaf parts run on the reference path)"
    # lists of our own: the per-leaf parts release the GIL between the compiled passes, which
    # read the lists checked here by address
    params, grads = list(params), list(grads)
    slots = {k: list(v) for k, v in slots.items()}
    looped = [key for compiled, seg in segments if compiled for _, _, keys in seg
              for key in keys]
    sizes = np.empty(n, np.int64)
    tn = first.dtype.num
    code = _check(_addresses([params, grads, *(slots[k] for k in looped)]),
                  np.array([inplace, False, *[inplace] * len(looped)]), _NDARRAY,
                  np.array([tn] * (2 + len(looped))), sizes)
    if code:
        k, i, why = code >> 32, (code >> 3) & 0x1FFFFFFF, code & 7
        what = ["params", "grads", *(f"state slot {key}" for key in looped)][k - 1]
        return f"{what} count" if why == _COUNT else f"{what} leaf {i} {REASONS[why]}"
    for compiled, seg in segments:  # before anything is written: the reference path says why
        if not compiled:
            reason = _leaf_slots_reason(seg[0][0], seg[0][2], params, slots, inplace)
            if reason:
                return reason
    storage = (kp, kp)
    modes = ["update"] * (len(segments) - 1) + ["inplace"]
    if small and memo.get("cpu-small", 0) < (COMPILE_AFTER or 0):
        if not all(_compiled(memo, seg, storage, mode, j) for j, ((compiled, seg), mode)
                   in enumerate(zip(segments, modes, strict=True)) if compiled):
            memo["cpu-small"] = memo.get("cpu-small", 0) + 1  # step() counts the next ones
            return None
        memo["cpu-small"] = COMPILE_AFTER  # at hand: every small step takes it
    new_params = params
    new_slots = slots if inplace else {}
    us = grads
    xps = [backend.namespace(first)] * n  # the reference path's, for the per-leaf parts
    for j, ((compiled, seg), mode) in enumerate(zip(segments, modes, strict=True)):
        keys = [key for _, _, ks in seg for key in ks]
        if compiled:
            now = {k: slots[k] for k in keys}
            if mode == "update":
                out = [np.empty_like(p) for p in params]
                if not inplace:  # the caller's slots stay as they are
                    now = {k: [x.copy() for x in v] for k, v in now.items()}
                    new_slots.update(now)
                _pass(seg, params, us, now, out, mode, memo, storage, sizes, seg=j)
                us = out
            elif inplace:
                _pass(seg, params, us, now, params, mode, memo, storage, sizes, seg=j)
            else:  # the in-place loop on copies, as run's pure step
                new_params = [p.copy() for p in params]
                made = {k: [x.copy() for x in v] for k, v in now.items()}
                _pass(seg, new_params, us, made, new_params, mode, memo, storage, sizes,
                      seg=j)
                new_slots.update(made)
            continue
        ((part, c, ks),) = seg
        last = mode != "update"
        with backend.quiet():
            outs = per_leaf(part, c, [[slots[k][i] for k in ks] for i in range(n)], xps,
                            params, us, last and part.finish is not None)
        for at, key in enumerate(ks, 1):
            olds = slots[key]
            if inplace:
                for old, new in zip(olds, (o[at] for o in outs), strict=True):
                    if old is not None and new is not old:
                        old[...] = new
            else:  # new arrays: a slot handed back as it came, or a view of it, is copied
                # (and a 0-d leaf's, which NumPy's arithmetic makes a scalar, made an array)
                new_slots[key] = [x.copy() if x is not None and (
                    x is old or x is p or x is g or x.base is not None and any(
                        x.base is backend.owner(a) for a in (old, p, g) if a is not None))
                    else np.asarray(x) if backend.is_numpy_scalar(x) else x
                    for x, old, p, g in zip((o[at] for o in outs), olds, params, grads,
                                            strict=True)]
        if not last:
            us = [_update_array(o[0], p, part) for o, p in zip(outs, params, strict=True)]
            continue
        news = ([o[0] for o in outs] if part.finish is not None
                else [p - u for p, u in zip(params, us, strict=True)])
        if inplace:
            for p, x in zip(params, news, strict=True):
                p[...] = x
        else:
            new_params = [np.array(x, p.dtype, copy=True if x is p or x is g else None)
                          for x, p, g in zip(news, params, grads, strict=True)]
    return new_params, (new_slots if inplace else {k: new_slots[k] for k in slots})


def _update_array(u: Any, p: Any, part: Any) -> Any:
    """A per-leaf part's ``u`` as the next run reads it: a C-contiguous array of ``p``'s
    shape and dtype (a transposed view, say, laid out anew)."""
    if tuple(np.shape(u)) != p.shape:
        raise ValueError(f"{part.name} returned an update of shape {np.shape(u)} for a leaf of "
                         f"shape {p.shape}")
    return np.array(u, p.dtype, copy=None, order="C")


def _leaf_slots_reason(part: Any, keys: tuple[str, ...], params: list[Any],
                       slots: dict[str, list[Any]], inplace: bool) -> str | None:
    """Why per-leaf ``part`` cannot run on these leaves and slots (its shape check, a slot of
    another shape or dtype than its own, a read-only one to be written), or None."""
    want: dict[tuple[int, ...], Any] = {}
    for i, p in enumerate(params):
        shape = p.shape
        if shape not in want:
            if part.check_shape(shape):
                return f"params leaf {i} has a shape {part.name} does not take"
            want[shape] = part.slot_shapes(shape)
        for k, s in zip(keys, want[shape], strict=True):
            x = slots[k][i]
            if s is None and x is None:
                continue
            if type(x) is not np.ndarray or x.shape != s or x.dtype != p.dtype:
                return f"state slot {k} leaf {i} is not as {part.name} keeps it"
            if inplace and not x.flags.writeable:
                return f"state slot {k} leaf {i} {REASONS[4]}"
    return None


def step(
    resolve: Callable[[], list[tuple[Any, Any, tuple[str, ...]]]],
    params: list[Any],
    grads: list[Any],
    slots: dict[str, list[Any]],
    inplace: bool,
    memo: dict[Any, Any] | None = None,
    per_leaf: Callable[..., list[tuple[Any, ...]]] | None = None,
) -> tuple[list[Any], dict[str, list[Any]]] | str | None:
    """The engine's strategy entry: one step of the resolved plan ``resolve()`` over leaves
    (NumPy arrays, or CPU tensors as NumPy views of their memory), results in the caller's
    library; None where these arrays are not this strategy's kind; a string, the reason, where
    it declined and wrote nothing. ``memo``: the rule's, where the loop found for it is kept.
    ``per_leaf``: the engine's runner of a per-leaf part (see :func:`segmented`); without it,
    or on tensors, a rule with per-leaf parts is declined."""
    if not AVAILABLE:
        return None
    global STEPS
    if inplace and memo is not None and type(params) is list and params and type(
            params[0]) is np.ndarray:
        lanes = memo.get("cpu-lanes")  # (by the leaves' dtype: a rule may step several)
        lane = lanes.get(params[0].dtype.num) if lanes else None
        if lane is not None and lane(resolve, params, grads, slots, memo):
            STEPS += 1
            return params, slots
    shards = backend.shards_of(params)  # before views: the leaves are known by identity
    tensors = type(params[0]) is not np.ndarray and backend.is_torch(params[0])
    leaves, g_leaves, slots_in = params, grads, slots
    if tensors:
        views = backend.numpy_views([params, grads, *slots.values()])
        if views is None:
            return None
        leaves, g_leaves = views[0], views[1]
        slots = dict(zip(slots, views[2:], strict=True))
    if type(leaves[0]) is not np.ndarray:
        return None
    for held in slots.values():  # a state of another library's arrays: the engine names it
        first_slot = held[0] if held else None
        if not (first_slot is None or isinstance(first_slot, np.ndarray)
                or hasattr(first_slot, "codes")):  # (8-bit slots: their codes' arrays)
            return None
    small = False
    # (shards: never small, every rank takes the compiled loop, so a replicated leaf's norm is
    # summed in one order on every rank and its replicas stay equal)
    if (len(leaves) < MIN_LEAVES and not backend.is_bfloat16_bits(leaves[0])
            and shards is None):
        # (C calls only here and below: no generator's frame per leaf)
        if not all(map(operator.is_, map(type, leaves), itertools.repeat(np.ndarray))):
            return None  # the reference path says what is wrong
        # (bfloat16 bits have no reference path on NumPy: never small)
        small = sum(map(_SIZE, leaves)) < MIN_SIZE
        if small and tensors:
            # the reference path's torch operations at every step: its sqrt is not the loop's
            # (an ulp apart), so a small model's numbers would change where the loop comes to
            # hand (after COMPILE_AFTER steps, or at once from the disk cache), and a run
            # resumed in another process would leave the one that never stopped
            return None
        if small and memo is not None:
            # a rule whose loop is not at hand yet: count the step, with no more work than that
            # (where the loop's count is due, run resolves and compiles it)
            waited = memo.get("cpu-small", 0)
            if COMPILE_AFTER is None or 0 < waited < COMPILE_AFTER and (
                    "cpu-small-key" not in memo or _waited(memo) < (COMPILE_AFTER or 0)):
                memo["cpu-small"] = waited + 1
                return None
    plan = resolve()
    if memo is None or "cpu" not in memo:
        kind = ("elementwise" if all(isinstance(part, Elementwise) for part, _, _ in plan)
                else "segments" if all(isinstance(part, (Elementwise, PerLeaf))
                                       for part, _, _ in plan) else "whole tree")
        if memo is not None:
            memo["cpu"] = kind
    else:
        kind = memo["cpu"]
    if type(g_leaves) is Addressed and kind != "elementwise":
        g_leaves = g_leaves.arrays()
    if kind == "elementwise":
        out = run(plan, leaves, g_leaves, slots, inplace, memo, small, shards)
    elif kind == "segments" and tensors:
        return None  # per-leaf parts on tensors: the reference path, torch's own reductions
    elif kind == "segments" and per_leaf is not None and shards is None:
        out = segmented(plan, leaves, g_leaves, slots, inplace, per_leaf, memo, small)
    else:
        return "a part that is not elementwise (per-leaf parts run on the reference path)"
    if out is None or isinstance(out, str):
        return out
    STEPS += 1
    new_params, new_slots = out
    if (inplace and memo is not None and not tensors and kind == "elementwise"
            and shards is None and type(params) is list):
        lanes = memo.get("cpu-lanes")
        if lanes is None or lanes is not False and params[0].dtype.num not in lanes:
            made = _lane(resolve, plan, params, slots, memo)
            if made is False:  # (no step of the rule has one)
                memo["cpu-lanes"] = False
            elif made is not None:
                memo.setdefault("cpu-lanes", {})[params[0].dtype.num] = made
    if tensors and inplace:  # autograd must see that the tensors changed
        backend.mark_written([*params, *(t for ts in slots_in.values() for t in ts)])
        return params, slots_in
    if tensors:
        new_params = [backend.like_leaf(backend.from_numpy(x, p.dtype), p)
                      for x, p in zip(new_params, params, strict=True)]
        new_slots = {k: [backend.from_numpy(x, s.dtype) for x, s in zip(v, slots_in[k],
                                                                          strict=True)]
                     for k, v in new_slots.items()}
    return new_params, new_slots
