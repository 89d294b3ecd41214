# mypy: disable-error-code="call-arg"
"""The compiled CPU loop for 8-bit state (:mod:`uniopt.quant`): one pass over memory per step.

As :mod:`uniopt.fast.cpu`'s loop, with the slots kept as codes and block scales. For each block
of :data:`~uniopt.quant.BLOCK` elements, four simple loops that each vectorize, over buffers of
one block per slot that stay in the L1 cache: the codes into float32 values (a table of 256
values times the block's scale); the rule's kernels on p, g and the buffers, writing p; each
buffer's largest magnitude (an integer maximum of the bits of ``|x|``), the block's new scale;
and each new value's nearest code. Memory sees p, g and one byte per slot read and written: 10
bytes per element for Adam in place, where float32 state moves 28.

The nearest code without a search: the magnitude's float32 bits shifted right by
:data:`SHIFT` (from the bucket of 2**-25 up: 13 KB a map) index a table that holds the code of
the bucket's smallest magnitude and the low bits of the one midpoint inside the bucket, if any
(checked when the table is made): one look-up and one integer comparison give the first
midpoint at or above the magnitude, the code the reference path's search finds, bit for bit.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types as nbtypes
from numba.extending import intrinsic

from .. import backend, quant
from ..base import Elementwise
from . import cpu

SHIFT = 16
# the bucket of 1.0: a larger magnitude (NaN, inf) is clamped to it, and codes as the largest,
# as the reference path's search puts NaN after every midpoint
LAST = 0x3F800000 >> SHIFT
# the first bucket: magnitudes from 2**-25 (below the smallest midpoint of either map), so
# that the tables (13 KB each) stay in the L1 cache
BASE = LAST - 25 * (1 << (23 - SHIFT))


def _starts(mids: np.ndarray) -> np.ndarray:
    """For each bucket of magnitudes sharing their leading bits (``bits >> SHIFT``, from
    :data:`BASE` up): the code of its smallest, shifted left 16 bits, or'ed with the low 16 bits
    of the one midpoint in the bucket (0xFFFF where it has none, so that no magnitude is above
    it). Every magnitude below the first bucket is below the first midpoint: code 0."""
    buckets = np.arange(BASE, LAST + 1, dtype=np.uint32)
    first = np.searchsorted(mids, (buckets << SHIFT).view(np.float32),
                            side="left").astype(np.uint32)
    bits = mids.view(np.uint32)
    bucket = (bits >> SHIFT) - BASE
    assert bits.min() >> SHIFT > BASE and first[0] == 0, "a midpoint below the first bucket"
    assert np.bincount(bucket).max() <= 1, "a bucket holds two midpoints"
    low = np.full(len(buckets), 0xFFFF, np.uint32)
    low[bucket] = bits & 0xFFFF
    return (first << 16) | low


START_S = _starts(quant.MID_S)
START_U = _starts(quant.MID_U)


@numba.njit(inline="always")
def _magnitude_code(bits: Any, start: Any) -> Any:
    """The code of the magnitude whose bits (sign cleared) are ``bits``."""
    e = start[min(max(bits >> np.uint32(SHIFT), np.uint32(BASE)), np.uint32(LAST))
              - np.uint32(BASE)]
    return (e >> np.uint32(16)) + np.uint32((bits & np.uint32(0xFFFF)) > (e & np.uint32(0xFFFF)))


@numba.njit(inline="always")
def code_s(y: Any) -> Any:
    """The signed code of ``y`` (a float32 in [-1, 1]), as its byte."""
    c = np.int32(_magnitude_code(cpu._f32_bits(y) & np.uint32(0x7FFFFFFF), START_S))
    return np.uint8((-c if y < 0 else c) & 0xFF)


@numba.njit(inline="always")
def code_u(y: Any) -> Any:
    """The unsigned code of ``y`` (a float32 in [-1, 1]; a negative one codes as 0)."""
    bits: Any = cpu._f32_bits(y)
    c = _magnitude_code(bits & np.uint32(0x7FFFFFFF), START_U)
    # zero where the sign bit is set (a negative number; -0.0 codes as 0 either way), in
    # integer operations: a float comparison here kept the loop from vectorizing
    return np.uint8(c * (np.uint32(1) - (bits >> np.uint32(31))))


@numba.njit(inline="always")
def abs_bits(x: Any) -> Any:
    """The bits of ``|x|``: ordered as the magnitudes (NaN above every number), so the largest
    is an integer maximum, which vectorizes."""
    return cpu._f32_bits(x) & np.uint32(0x7FFFFFFF)


@intrinsic
def _f32(typingctx: Any, bits: Any) -> Any:
    """The float32 whose bits are ``bits`` (a uint32)."""
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())

    return nbtypes.float32(bits), codegen


@numba.njit(inline="always")
def from_bits(bits: Any) -> Any:
    return _f32(np.uint32(bits))


# each code's value by its byte (a signed code's two's complement), so that the loop reads
# codes as unsigned bytes and indexes with no check for a negative index
VALUE_S = np.concatenate([quant.MAG_S, [-1.0], -quant.MAG_S[:0:-1]]).astype(np.float32)
VALUE_U = quant.MAG_U


def _source(kernels: tuple[cpu.LoopPart, ...], signs: tuple[bool, ...], kp: str,
            by_import: bool, mode: str, records: tuple[Any, ...], digest: str = "") -> str:
    """A module defining ``serial(L, CO, SIZES)`` and ``parallel(L, CO, SIZES)`` as
    :func:`uniopt.fast.cpu._source`'s, its slots 8-bit (``signs``: each slot's map). ``L``:
    in place p, g, then each slot's codes and scales; pure p, p out, g, then each slot's codes,
    codes out, scales, scales out."""
    inplace = mode == "inplace"
    pt = "np.float32" if kp == "f4" else "np.float64"
    head = [
        f"# generated by uniopt {cpu._VERSION} (8-bit state) for kernels {digest}; safe to "
        "delete",
        "import collections",
        "import numba",
        "import numpy as np",
        "from uniopt.fast.cpu import CHUNK, _chunks, _i64, _item, _voidptr, kernel_for",
        "from uniopt.fast.cpu import scalar_xp as XP",
        "from uniopt.fast.q8 import VALUE_S, VALUE_U, abs_bits, code_s, code_u, from_bits",
        f"PT = {pt}",
        f"BLOCK = {quant.BLOCK}",
    ]
    lists: list[str] = []

    def view(name: str, dtype: str, size: str = "b") -> str:
        lists.append(name)
        return (f"{name} = numba.carray(_voidptr(_i64(_item(L[{len(lists) - 1}], t) + 16)), "
                f"({size},), {dtype})")

    nb = "(b + BLOCK - 1) // BLOCK"
    loads = [view("p", "PT")]
    if not inplace:
        loads.append(view("po", "PT"))
    loads.append(view("g", "PT"))
    body, ends, co, s = [], [], 0, 0
    end = "x - u"
    for k, ((kernel, nslots, finish), (_, _, fields, _)) in enumerate(
            zip(kernels, records, strict=True)):
        if by_import:
            head.append(f"from {kernel.__module__} import {kernel.__qualname__.split('.')[0]}")
            head.append(f"K{k} = kernel_for({kernel.__qualname__})")
        else:
            head.append(f"K{k} = kernel_for(_K{k})")
        if finish is not None and by_import:
            head.append(f"from {finish.__module__} import {finish.__qualname__.split('.')[0]}")
            head.append(f"F{k} = kernel_for({finish.__qualname__})")
        elif finish is not None:
            head.append(f"F{k} = kernel_for(_F{k})")
        width = len(fields) if isinstance(fields, tuple) else fields
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
            loads.append(view(f"c{n}", "np.uint8"))  # a signed code as its byte
            if not inplace:
                loads.append(view(f"co{n}", "np.uint8"))
            loads.append(view(f"m{n}", "np.float32", nb))
            if not inplace:
                loads.append(view(f"mo{n}", "np.float32", nb))
            loads.append(f"w{n} = np.empty(BLOCK, np.float32)")
            reads.append(f"w{n}[i - ulo]")
        if finish is not None:  # the last part writes p from its input: keep it
            body.append("v = u")
            end = f"F{k}(XP, C{k}, x, v{''.join(f', r[{j + 1}]' for j in range(nslots))})"
        body.append(f"r = K{k}(XP, C{k}, x, u{''.join(', ' + r for r in reads)})")
        body.append("u = r[0]")
        for j, n in enumerate(names):
            body.append(f"w{n}[i - ulo] = r[{j + 1}]")
    body.append(f"{'p' if inplace else 'po'}[i] = PT({end})")
    starts, finals = [], []
    for n in range(s):
        # each loop simple enough to vectorize: codes to values, the kernels, the maximum,
        # values to codes (the block's buffers stay in the L1 cache between them)
        value = "VALUE_S" if signs[n] else "VALUE_U"
        starts += [f"f{n} = m{n}[lo // BLOCK]",
                   "for i in range(ulo, uhi):",
                   f"    w{n}[i - ulo] = {value}[c{n}[i]] * f{n}"]
        out = ("c", "m") if inplace else ("co", "mo")
        code = "code_s" if signs[n] else "code_u"
        finals += [
            f"a{n} = np.uint32(0)",
            "for i in range(ulo, uhi):",
            f"    a{n} = max(a{n}, np.uint32(abs_bits(w{n}[i - ulo])))",
            f"e{n} = from_bits(a{n})",
            f"{out[1]}{n}[lo // BLOCK] = e{n}",
            f"d{n} = e{n} if e{n} > 0 else np.float32(1)",
            "for i in range(ulo, uhi):",
            f"    {out[0]}{n}[i] = {code}(w{n}[i - ulo] / d{n})",
        ]
    ends += finals
    return "\n".join([
        *head,
        "",
        "",
        '@numba.njit(cache=CACHE, error_model="numpy")',
        "def chunk(L, CO, t, a, b):",
        *[f"    {line}" for line in loads],
        "    for lo in range(a, b, BLOCK):",
        "        hi = min(lo + BLOCK, b)",
        "        ulo, uhi = np.uint64(lo), np.uint64(hi)",
        *[f"        {line}" for line in starts],
        "        for i in range(ulo, uhi):",
        "            x = np.float32(p[i])",
        "            u = np.float32(g[i])",
        *[f"            {line}" for line in body],
        *[f"        {line}" for line in ends],
        "    return 0.0",
        "",
        "",
        '@numba.njit(cache=CACHE, error_model="numpy")',
        "def serial(L, CO, SIZES):",
        "    leaf, start, stop, size = _chunks(SIZES, CHUNK)",
        *[line.format(loop="range") for line in cpu._SUM],
        "",
        "",
        '@numba.njit(parallel=True, cache=CACHE, error_model="numpy")',
        "def parallel(L, CO, SIZES):",
        "    leaf, start, stop, size = _chunks(SIZES, CHUNK)",
        *[line.format(loop="numba.prange") for line in cpu._SUM],
        "",
    ])


_LOOPS: dict[Any, Any] = {}


def _loop(plan: list[tuple[Any, Any, tuple[str, ...]]], signs: tuple[bool, ...], kp: str,
          mode: str, memo: dict[Any, Any]) -> Any:
    """The compiled loops (serial, parallel) for ``plan``: found once per rule (``memo``),
    compiled once per process, cached on disk as :mod:`uniopt.fast.cpu`'s are."""
    key = ("q8", signs, kp, mode, *[type(c) for _, c, _ in plan])
    hit = memo.get(key)
    if hit is not None:
        return hit
    kernels = cpu._parts(plan, mode)
    records = tuple(cpu._record(part, c) for part, c, _ in plan)
    full = (kernels, signs, kp, mode, records)
    if full in _LOOPS:
        memo[key] = _LOOPS[full]
        return memo[key]
    where = cpu._cache_dir() if all(cpu._importable(k) and (f is None or cpu._importable(f))
                                    for k, _, f in kernels) else None
    digest = cpu._digest(kernels, records) if where is not None else ""
    src = _source(kernels, signs, kp, where is not None, mode, records, digest)
    if where is None:
        g: dict[str, Any] = {"CACHE": False}
        for k, (kernel, _, finish) in enumerate(kernels):
            g[f"_K{k}"], g[f"_F{k}"] = kernel, finish
        exec(compile(src, "<uniopt 8-bit loop>", "exec"), g)
        _LOOPS[full] = g["serial"], g["parallel"]
    else:
        path = where / f"uniopt_q8_{hashlib.sha1(src.encode()).hexdigest()[:16]}.py"
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(src.replace("cache=CACHE", "cache=True"))
            os.replace(tmp, path)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        _LOOPS[full] = module.serial, module.parallel
    memo[key] = _LOOPS[full]
    return memo[key]


_KP = {"f": "f4", "d": "f8"}
_F32, _I8, _U8 = np.dtype(np.float32).num, np.dtype(np.int8).num, np.dtype(np.uint8).num


def step(
    resolve: Callable[[], list[tuple[Any, Any, tuple[str, ...]]]],
    params: list[Any],
    grads: list[Any],
    slots: dict[str, list[Any]],
    inplace: bool,
    memo: dict[Any, Any] | None = None,
) -> tuple[list[Any], dict[str, list[Any]]] | str | None:
    """The engine's strategy for 8-bit states, as :func:`uniopt.fast.cpu.step`: NumPy arrays
    or CPU tensors (float32 or float64 params), every part elementwise, every slot the leaf's
    shape. Small steps (:data:`uniopt.fast.cpu.MIN_SIZE`) go to the reference path."""
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
    if len(leaves) < cpu.MIN_LEAVES and sum(x.size for x in leaves) < cpu.MIN_SIZE:
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
    memo = {} if memo is None else memo
    mode = "inplace" if inplace else "pure"
    big = int(sizes.sum() >= cpu.PARALLEL_MIN)
    if inplace:
        lists = [params_l, grads_l]
        for c, m in zip(codes, scales, strict=True):
            lists += [c, m]
        new_params, new_codes, new_scales = params_l, codes, scales
    else:
        new_params = [np.empty_like(p) for p in params_l]
        new_codes = [[np.empty_like(x) for x in c] for c in codes]
        new_scales = [[np.empty_like(x) for x in m] for m in scales]
        lists = [params_l, new_params, grads_l]
        for c, co, m, mo in zip(codes, new_codes, scales, new_scales, strict=True):
            lists += [c, co, m, mo]
    loop = _loop(plan, signs, kp, mode, memo)
    loop[big](cpu._addresses(lists), cpu._coefficients(plan, np.float32, n), sizes)
    cpu.STEPS += 1
    if tensors and inplace:  # autograd must see that the tensors changed
        backend.mark_written([*params, *(a for v in slots.values() for q in v
                                         for a in (q.codes, q.absmax))])
    if inplace:
        return params, slots
    if tensors:
        new_params = [backend.like_leaf(backend.from_numpy(x, p.dtype), p)
                      for x, p in zip(new_params, params, strict=True)]
        new_codes = [[backend.from_numpy(x) for x in c] for c in new_codes]
        new_scales = [[backend.from_numpy(x) for x in m] for m in new_scales]
    out = {k: [quant.Q8(c, m) for c, m in zip(cs, ms, strict=True)]
           for k, cs, ms in zip(slots, new_codes, new_scales, strict=True)}
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
