# mypy: disable-error-code="call-arg"
"""The compiled CPU loop for 8-bit state (:mod:`uniopt.quant`): one pass over memory per step.

As :mod:`uniopt.fast.cpu`'s loop, with the slots kept as codes and block scales. For each block
of :data:`~uniopt.quant.BLOCK` elements, four simple loops (the last three vectorize) over buffers
of one block per slot that stay in the L1 cache: the codes into float32 values (a table of 256
values times the block's scale); the rule's kernels on p, g and the buffers, writing p; each
buffer's largest magnitude (an integer maximum of the bits of ``|x|``), the block's new scale;
and each new value's nearest code. Memory sees p, g and one byte per slot read and written: 10
bytes per element for Adam in place, where float32 state moves 28.

The nearest code without a search, and without a table (a look-up per element keeps a loop
from vectorizing: it was most of the step): the piece of the map a magnitude falls in (the
code of 0, one of the decades, the code of 1) from comparisons with the float32 midpoints
between pieces, then, the codes of a decade being equally spaced, the count of its midpoints
below the magnitude from a linear formula in float64 (:func:`_coder_source`). The same code
as the reference path's search, bit for bit: checked over every float32 once, and by
tests/test_q8.py at every midpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types as nbtypes
from numba.extending import intrinsic

from .. import backend, quant
from ..base import Elementwise
from . import cpu

# the generated loops inline this module's functions: their cached machine code is keyed by
# this module's source as well as cpu's
_VERSION = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:12]


def _coder_source(mids: np.ndarray, bits: int) -> str:
    """The source of ``_code(b)``: the code of the magnitude whose float32 bits (sign cleared)
    are ``b``, the index of the first of ``mids`` (the map's float32 midpoints) at or above it.

    Pieces ``k`` = 0..``bits``: piece k holds the codes 2**k - 1 .. 2**(k+1) - 2 (piece 0 the
    code of 0, the last the code of 1, piece k in between the 2**k codes of decade k - 1, whose
    top is 10 / p). The piece: how many of the midpoints between pieces are below the
    magnitude ``a`` (float32 comparisons, exact). In a decade the midpoints are equally spaced,
    those below ``a`` number ``ceil(s) - 1``, ``s`` linear in ``a``, clamped to the piece;
    ``s`` is taken at ``h``, half-way between ``a`` and the float32 below it, in float64: a
    float32 midpoint is below ``a`` when its float64 value (the table's, rounded) is below
    ``h``. Every step is monotone in ``a``, so the count agrees with the search everywhere if
    it does at each midpoint and at the float32 above it (tests/test_q8.py checks those; every
    non-negative float32 was checked once, NaN and infinities included: they take the last
    code, as the search puts them). Branch-free and table-free: the loops calling it
    vectorize."""
    decades = bits - 1
    cuts = [float(mids[2 ** i - 2]) for i in range(1, decades + 2)]
    # the decade's scale: its top is 10 / p
    scale = [10.0 ** (decades + 1 - k) for k in range(1, decades + 1)]
    # in float32 but for s (integers and powers of ten below 2**24 are exact): numba widens
    # integer arithmetic to 64 bits, half the lanes of 32; s needs float64, its integer
    # crossings finer than a float32 step of a
    lines = [
        "def _code(b):",
        "    b = min(b, np.uint32(0x3F800000))",  # NaN (any magnitude above 1): the last code
        "    a = from_bits(b)",
        f"    m = a > np.float32({cuts[0]!r})",
        "    two = np.float32(2.0) if m else np.float32(1.0)",
        f"    p = np.float32({0.5 * scale[0]!r})",  # halved: h below is twice the half-way point
    ]
    for i in range(1, decades + 1):
        # the last piece (the code of 1) takes p = 0: s < 0, clamped to its one code
        lines += [f"    m = a > np.float32({cuts[i]!r})",
                  f"    two = np.float32({2.0 ** (i + 1)!r}) if m else two",
                  f"    p = np.float32({0.5 * scale[i] if i < decades else 0.0!r}) if m else p"]
    lines += [
        "    h = np.float64(a) + np.float64(from_bits(max(b, np.uint32(1)) - np.uint32(1)))",
        "    s = (h * np.float64(p) - 1.0) * (np.float64(two) * (1.0 / 9.0))",
        "    c = np.float32(np.ceil(s)) - np.float32(1.0)",
        "    top = two - np.float32(1.0)",
        "    return top + min(max(c, np.float32(0.0)), top)",
    ]
    return "\n".join(lines)


def _coder(mids: np.ndarray, bits: int) -> Any:
    """``_code`` for the map with midpoints ``mids``, compiled (inlined where it is called)."""
    g: dict[str, Any] = {"np": np, "from_bits": from_bits}
    exec(compile(_coder_source(mids, bits), f"<uniopt 8-bit code, {bits} bits>", "exec"), g)
    return numba.njit(inline="always")(g["_code"])


@intrinsic
def _f32(typingctx: Any, bits: Any) -> Any:
    """The float32 whose bits are ``bits`` (a uint32)."""
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())

    return nbtypes.float32(bits), codegen


@numba.njit(inline="always")
def from_bits(bits: Any) -> Any:
    return _f32(np.uint32(bits))


magnitude_code_s = _coder(quant.MID_S, 7)
magnitude_code_u = _coder(quant.MID_U, 8)


@numba.njit(cache=True)
def magnitude_codes(bits: Any, signed: bool) -> Any:
    """The code of each magnitude (float32 bits, sign cleared) in ``bits`` (for the tests)."""
    out = np.empty(len(bits), np.int32)
    for i in range(len(bits)):
        out[i] = magnitude_code_s(bits[i]) if signed else magnitude_code_u(bits[i])
    return out


@numba.njit(inline="always")
def code_s(y: Any) -> Any:
    """The signed code of ``y`` (a float32 in [-1, 1]), as its byte."""
    bits: Any = cpu._f32_bits(y)
    c = magnitude_code_s(bits & np.uint32(0x7FFFFFFF))
    # negated where the sign bit is set (-0.0 codes as 0 either way)
    return np.uint8(np.int32(-c if bits >> np.uint32(31) else c) & np.int32(0xFF))


@numba.njit(inline="always")
def code_u(y: Any) -> Any:
    """The unsigned code of ``y`` (a float32 in [-1, 1]; a negative one codes as 0)."""
    bits: Any = cpu._f32_bits(y)
    c = magnitude_code_u(bits & np.uint32(0x7FFFFFFF))
    # zero where the sign bit is set (a negative number; -0.0 codes as 0 either way), in
    # integer operations: a float comparison here kept the loop from vectorizing
    return np.uint8(np.int32(np.float32(0.0) if bits >> np.uint32(31) else c))


@numba.njit(inline="always")
def abs_bits(x: Any) -> Any:
    """The bits of ``|x|``: ordered as the magnitudes (NaN above every number), so the largest
    is an integer maximum, which vectorizes."""
    return cpu._f32_bits(x) & np.uint32(0x7FFFFFFF)


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
        f"# generated by uniopt {cpu._VERSION}-{_VERSION} (8-bit state) for kernels {digest}; "
        "safe to delete",
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
