"""The shared math of the kernels: every adaptive rule is written with these.

Each works on arrays of any library and, compiled, on single elements; each keeps torch's
operation order, with the fused multiply-adds of torch's vectorised CPU kernels (``lerp``,
``addcmul``, ``add(x, alpha=a)``, each rounded once), so a rule written with them rounds as
torch's for-loop does: on torch tensors they are torch's own operations; on NumPy arrays and
on the compiled path, ``fma`` is one hardware fused multiply-add (LLVM's ``llvm.fma``); on
other libraries (JAX) ``a*b + c`` as the library rounds it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from llvmlite import ir
from numba.extending import intrinsic

from .backend import is_torch
from .hyper import _traced


@intrinsic
def fused_multiply_add(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """``a*b + c`` rounded once, for numba code: three numbers of one float type."""
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.fma", [t], ir.FunctionType(t, [t, t, t]))
        return builder.call(fn, args)

    t = typingctx.unify_types(a, b, c)
    return t(t, t, t), codegen


@functools.cache
def _fma_ufunc() -> Any:
    from . import jitcache

    def kernel(a, b, c):
        return fused_multiply_add(a, b, c)

    # NumPy's ufunc of the two compiled loops, not numba's wrapper: that adds a Python call
    # that looks for arguments overriding ufuncs, which NumPy's own call does too
    return jitcache.ufunc(kernel, ["float32(float32, float32, float32)",
                                   "float64(float64, float64, float64)"])


_NUMPY = (np.ndarray, np.floating)


class Batch:
    """Many arrays computed as one operand (the lists of tensors of
    :mod:`uniopt.fast.foreach`): the helpers below hand a batch to its own fused forms, so a
    kernel runs unchanged on it and rounds as it does on each array."""

    __slots__ = ()

    def fma(self, a: Any, b: Any) -> Any:
        """``self + a*b`` rounded as :func:`fma` rounds it."""
        raise NotImplementedError

    def lerp(self, end: Any, w: Any) -> Any:
        """``self + w (end - self)`` rounded as :func:`lerp` rounds it."""
        raise NotImplementedError


def fma(a: Any, b: Any, c: Any) -> Any:
    """``a*b + c`` rounded once (``a`` a number or an array like ``b``), in the dtype of ``b``
    and ``c``: torch's ``add(c, b, alpha=a)`` and ``addcmul(c, a, b)``."""
    if isinstance(b, _NUMPY):  # 0-d arrays compute to NumPy scalars
        if b.dtype.char in "fd":
            dtype = np.dtype(b.dtype.char)  # native: a big-endian one is no ufunc loop's
            if not (isinstance(c, _NUMPY) and c.dtype.char == dtype.char):
                dtype = np.result_type(b, c).newbyteorder("=")
            return _fma_ufunc()(a if isinstance(a, _NUMPY) else np.asarray(a, dtype), b, c,
                                dtype=dtype)
    elif is_torch(b):
        import torch

        if isinstance(a, torch.Tensor):
            return torch.addcmul(c, a, b)
        return torch.add(c, b, alpha=a)
    elif isinstance(c, Batch):
        return c.fma(a, b)
    return a * b + c


def lerp(a: Any, b: Any, w: Any) -> Any:
    """``a + w (b - a)``, an exponential moving average step, as torch's ``lerp``: one fused
    multiply-add from ``a`` where ``|w| < 0.5``, else from ``b`` (``b + (w - 1)(b - a)``),
    ``w`` rounded to the arrays' precision first."""
    if isinstance(a, _NUMPY):
        if a.dtype.char in "fd" and isinstance(w, (int, float, np.floating)):
            w = a.dtype.type(w)
            return fma(w, b - a, a) if abs(w) < 0.5 else fma(w - 1, b - a, b)
    elif is_torch(a):
        import torch

        return torch.lerp(a, b, w)
    elif isinstance(a, Batch):
        return a.lerp(b, w)
    # elsewhere (JAX, array-API libraries) optax's convex form: exact at both ends as torch's
    # two sides are (from a alone, a weight near 1, a beta of 0, lost b to a's rounding where a
    # is much the larger), in as many operations per element as one side (choosing a side per
    # element cost S2's jitted Adam step 4-5%), and eager as under jax.jit: the two sides there
    # made an infinite moment NaN eagerly (inf - inf) and not under jit (RAdam, signum), and
    # Adafactor's first step, of weight 1, NaN where optax's is infinite
    return (1 - w) * a + w * b


def ema_sq(v: Any, g: Any, decay: Any, weight: Any) -> Any:
    """``decay v + weight g^2`` (``weight = 1 - decay``), in torch's ``mul_ + addcmul_`` order:
    ``(weight g) g + (v decay)`` with one rounding for the multiply-add."""
    return fma(weight * g, g, v * decay)


def unfolded(xp: Any, x: Any) -> Any:
    """``x``, kept from the compiler's algebra: under ``jax.jit`` XLA simplifies ``(x + m) -
    m`` to ``x`` and ``(p + y) - p`` to ``y``, which undoes a rounding done in arithmetic (a
    float16 subnormal's, Kahan's compensation); elsewhere, and on the compiled path (its own
    scalar version), ``x`` itself."""
    if _traced(x):
        import jax

        return jax.lax.optimization_barrier(x)
    return x


def select(xp: Any, cond: Any, a: Any, b: Any) -> Any:
    """``a`` where ``cond`` else ``b``, exactly. ``cond`` is a switch that depends on the step
    (the first update, momentum on at this step), a host bool, or a traced one under
    ``jax.jit``; the compiled path has its own scalar version."""
    if isinstance(cond, (bool, int, float)):
        return a if cond else b
    return xp.where(cond, a, b)


def bias_correction(decay: Any, one_minus: Any, step: Any) -> Any:
    """``1 - decay^t`` for the update numbered ``t = step + 1`` (``one_minus = 1 - decay``).

    On the host, torch's formula in double precision. Traced (``jax.jit``, float32 without
    x64) it is ``-expm1(t log1p(-(1 - decay)))`` from the host's complement: ``1 - decay^t``
    from a float32 ``decay = 0.999`` would be off by 1e-5 at t = 1."""
    if isinstance(decay, float) and isinstance(step, int):
        return 1.0 - decay ** (step + 1)
    import array_api_compat as aac

    if isinstance(one_minus, float):  # a step counted on a device (a captured torch step)
        # decay 0 (schedule-free's b2 = 0): log(0) is -inf, and 1 - 0^t is 1
        log_decay = math.log1p(-one_minus) if one_minus < 1.0 else -math.inf
        return -aac.array_namespace(step).expm1((step + 1) * log_decay)

    xp = aac.array_namespace(*(x for x in (one_minus, step) if not isinstance(x, (int, float))))
    return -xp.expm1((step + 1) * xp.log1p(-one_minus))


def addmm(xp: Any, beta: Any, m: Any, alpha: Any, a: Any, b: Any) -> Any:
    """``beta m + alpha (a @ b)`` for matrices or stacks of them: on torch tensors torch's
    ``addmm``/``baddbmm``, which round once (bfloat16 products accumulate in float32), as torch's
    Muon computes its Newton-Schulz steps; on other arrays, as written."""
    if is_torch(m):
        import torch

        fused = torch.addmm if m.ndim == 2 else torch.baddbmm
        return fused(m, a, b, beta=beta, alpha=alpha)
    return beta * m + alpha * (a @ b)


def frobenius(xp: Any, x: Any) -> Any:
    """The Frobenius norm of each matrix of ``x`` (the last two axes), kept as 1x1: on torch
    tensors torch's norm (bfloat16 squares summed in float32, as torch's Muon normalises); on
    other arrays ``sqrt(sum(x*x))``, which sums a stack of matrices as it sums each alone."""
    if is_torch(x):
        import torch

        return torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    return xp.sqrt(xp.sum(x * x, axis=(-2, -1), keepdims=True))
