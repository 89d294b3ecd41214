# mypy: disable-error-code="call-arg"
"""What a jitted many-leaf step would cost as XLA custom calls into compiled code (the design
docs/jax.md weighs and leaves): ``python benchmarks/jax_custom_call.py [N] [GROUP]``.

The step's arithmetic would be uniopt's compiled CPU loop, called by XLA through its FFI on
the buffers of every leaf's parameter, gradient and AdamW slots (the params and slots updated in
place: each output aliases its input, and the jitted function donates them). The handler here
does no arithmetic at all (it answers XLA's version query and returns), so what is timed is
XLA's own cost of such a program: tracing and lowering it, compiling it, and running it, for N
leaves of 100 float32 (default 3000), one custom call per GROUP leaves (default 25: one call
for all of them compiles in a time that grows faster than the square of its operand count).
Needs numba and jax; nothing of uniopt.
"""

from __future__ import annotations

import ctypes
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numba
import numpy as np
from numba import types as nbt

# offsets in XLA's FFI structs (xla/ffi/api/c_api.h): XLA_FFI_CallFrame.extension_start, an
# extension's type and, for the metadata extension, its XLA_FFI_Metadata
_EXTENSION, _EXT_TYPE, _EXT_METADATA, _METADATA = 8, 8, 24, 1


@numba.extending.intrinsic
def _ptr(typingctx: Any, addr: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(nbt.voidptr))

    return nbt.voidptr(addr), codegen


@numba.cfunc(nbt.intp(nbt.intp))
def _handler(frame: int) -> int:
    ext = numba.carray(_ptr(frame + _EXTENSION), (1,), np.int64)[0]
    if ext != 0 and numba.carray(_ptr(ext + _EXT_TYPE), (1,), np.int32)[0] == _METADATA:
        md = numba.carray(_ptr(ext + _EXT_METADATA), (1,), np.int64)[0]
        version = numba.carray(_ptr(md + 8), (2,), np.int64)  # struct_size, extension_start
        version[0], version[1] = 24, 0
        numbers = numba.carray(_ptr(md + 24), (3,), np.int32)  # major, minor, traits
        numbers[0], numbers[1], numbers[2] = 0, 1, 0
    return 0  # success (a null XLA_FFI_Error*); the execute stage does nothing


def main(n: int = 3000, group: int = 25) -> None:
    address = _handler.address
    assert address is not None
    fn = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(address)
    jax.ffi.register_ffi_target("uniopt_bench_noop", jax.ffi.pycapsule(fn), platform="cpu")

    def call(p: list[Any], g: list[Any], m: list[Any], v: list[Any]) -> Any:
        k = len(p)
        aliases = {**{i: i for i in range(k)}, **{2 * k + i: k + i for i in range(2 * k)}}
        out = jax.ffi.ffi_call(
            "uniopt_bench_noop", [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in p + m + v],
            input_output_aliases=aliases)(*p, *g, *m, *v)
        return out[:k], out[k:2 * k], out[2 * k:]

    def step(p: list[Any], g: list[Any], m: list[Any], v: list[Any]) -> Any:
        outs = [call(p[a:a + group], g[a:a + group], m[a:a + group], v[a:a + group])
                for a in range(0, len(p), group)]
        return tuple([x for o in outs for x in o[j]] for j in range(3))

    leaves = [[jnp.full(100, x, jnp.float32) for _ in range(n)] for x in (1.0, 0.5, 0.0, 0.0)]
    p, g, m, v = leaves
    jitted = jax.jit(step, donate_argnums=(0, 2, 3))
    t = time.perf_counter()
    lowered = jitted.lower(p, g, m, v)
    lower = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(8):
        t = time.perf_counter()
        p, m, v = compiled(p, g, m, v)
        jax.block_until_ready(p)
        times.append(time.perf_counter() - t)
    print(f"{n:6d} leaves, {group} a call: trace+lower {lower:6.2f} s, compile {compile_s:7.2f} s, "
          f"step {statistics.median(times[1:]) * 1e3:8.2f} ms (no arithmetic)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
