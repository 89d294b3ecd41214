"""The shared math of the kernels: every adaptive rule is written with these.

Each works on arrays of any library and, compiled, on single elements; each keeps torch's
operation order, so a rule written with them rounds as torch's for-loop does.
"""

from __future__ import annotations

from typing import Any

from .backend import is_torch


def lerp(a: Any, b: Any, w: Any) -> Any:
    """``a + w (b - a)``: an exponential moving average step, in torch's operation order."""
    return a + w * (b - a)


def ema_sq(v: Any, g: Any, decay: Any, weight: Any) -> Any:
    """``decay v + weight g^2`` (``weight = 1 - decay``), in torch's ``mul_ + addcmul_`` order."""
    return v * decay + weight * g * g


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
