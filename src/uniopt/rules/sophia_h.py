"""Sophia-H (Liu et al., 2023): Sophia with its Hutchinson estimate of the Hessian's diagonal
drawn by the optimizer, from Hessian-vector products the caller supplies.

uniopt never differentiates: a step is handed the gradient, and here also ``hvp``, a function
``v -> H v`` at the params of the step (a tree shaped like the params in, one out, or a flat
list in :func:`uniopt.trainables` order). With JAX, ``jax.jvp(jax.grad(loss), (params,),
(v,))[1]``; with torch, ``torch.autograd.grad(grads, params, grad_outputs=v)`` of gradients
taken with ``create_graph=True`` (:class:`uniopt.torch.SophiaH` does it for a closure). The
random probe vectors come from a generator whose state is in the optimizer's state, so a run
is reproducible and a checkpoint resumes the same draws.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .. import backend
from ..base import Info, Rule, Transform, WholeTree
from ..hyper import NONNEG, UNIT_OPEN, _traced, check_integer, hyper
from ..moments import lerp
from ..transforms.decay import decoupled_weight_decay, weight_decay
from ..transforms.noise import (
    SEEDS,
    _kind,
    _normal_dtype,
    _pcg_generator,
    _pcg_state,
    _to,
    seeded_state,
)
from ..transforms.scale import scale_by_lr
from ..tree import flatten_leaves, leaf_names, unflatten
from .matrix import ema_momentum

DISTRIBUTIONS = ("gaussian", "rademacher")


class SophiaHCoeffs(NamedTuple):
    one_minus_b2: Any
    eps: Any
    clip: Any
    neg_clip: Any
    refresh: Any  # whether this step draws a new Hessian-diagonal estimate: step % k == 0
    weight: Any  # 1/num_samples


@dataclass(frozen=True)
class scale_by_hutchinson_sophia(WholeTree):
    """Sophia-H's preconditioning of the momentum ``u = m``: every ``update_period`` steps
    (at steps 0, k, 2k, ... counted from 0), before this step's update,
    ``d = (1/n) sum_{i<n} z_i * H z_i`` with ``n = num_samples`` probe vectors ``z`` drawn
    ``distribution``-wise (standard normal, or +-1 with equal odds) and ``H z`` from the step's
    ``hvp``, and ``h <- b2*h + (1-b2)*d`` (``h`` from 0); then, every step,
    ``u <- clip(m / max(h, eps), -clip_threshold, clip_threshold)``.

    The tree state holds ``hessian_moment`` (``h``, one array per leaf) and ``generator``: on
    NumPy, PCG64 seeded with ``seed``; on torch, ``torch.Generator().manual_seed(seed)`` of the
    tensors' device (``z`` as ``torch.randn_like`` / ``torch.randint_like(p, 0, 2)*2 - 1``
    draw them, leaf after leaf, sample after sample); on JAX, ``jax.random.key(seed)``, split
    once per sample and once per leaf. Under ``jax.jit`` the draw runs under ``lax.cond``.
    """

    real_only = True

    b2: Any = hyper(0.99, UNIT_OPEN)
    eps: Any = hyper(1e-12, NONNEG)
    clip_threshold: Any = hyper(1e-2, NONNEG)
    update_period: int = 10
    num_samples: int = 1
    distribution: str = "gaussian"
    seed: int = 0
    like_params: ClassVar[tuple[str, ...]] = ("hessian_moment",)
    reads_value: ClassVar[bool] = True
    step_args: ClassVar[tuple[str, ...]] = ("hvp",)

    def check(self) -> None:
        _check_statics(self)

    def coeffs(self, step: Any) -> SophiaHCoeffs:
        return SophiaHCoeffs(one_minus_b2=self.one_minus("b2"), eps=self.eps,
                             clip=self.clip_threshold, neg_clip=-self.clip_threshold,
                             refresh=step % self.update_period == 0,
                             weight=1.0 / self.num_samples)

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return (tuple(shape),) * len(self.like_params)

    def init_tree(self, params: Any) -> Any:
        leaves = flatten_leaves(params)[0]
        gen = seeded_state(leaves, self.seed)
        h = [backend.namespace(p).zeros_like(p) for p in leaves]
        return {"hessian_moment": h, "generator": gen}

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any,
                   **extra: Any) -> tuple[Any, Any]:
        leaves, treedef = flatten_leaves(u)
        gen = state["generator"]
        first = leaves[0] if leaves else np.zeros(0)
        kind = _kind(gen)
        lib = "jax" if backend.is_jax(first) else "torch" if backend.is_torch(first) else "numpy"
        if kind != lib:
            raise TypeError(f"{self.name}: its state holds a {kind} generator, the updates are "
                            f"{backend.library(first)} arrays: set the state up for these params")
        # read in the step's dtype (wider than 16-bit params), as a slot is: the engine keeps
        # the state in its own, and under jax.lax.cond both branches hand back h alike
        stored = state["hessian_moment"]  # (in the params' dtype)
        h = [m if m.dtype == x.dtype else backend.namespace(x).astype(m, x.dtype)
             for m, x in zip(stored, leaves, strict=True)]
        hvp = extra.get("hvp")
        traced = _traced(c.refresh)
        if (traced or bool(c.refresh)) and not callable(hvp):
            raise TypeError(
                f"{self.name}: this step draws a Hessian-diagonal estimate (every "
                f"update_period={self.update_period} steps, from step 0): pass hvp=, a "
                f"function v -> H v at the params (a tree like them), got {hvp!r}")

        def refresh(h_gen: tuple[list[Any], Any]) -> tuple[list[Any], Any]:
            h, gen = h_gen
            d = None
            for _ in range(self.num_samples):
                z, gen = _DRAW[kind](gen, leaves, self.distribution)
                # the probes in the params' own dtype (16-bit params step in float32), which a
                # Hessian-vector product at the params takes (jax.jvp refuses another), and the
                # product read back in the step's
                z = [_in(zi, m.dtype) for zi, m in zip(z, stored, strict=True)]
                hz = _leaves_of(self.name, hvp(unflatten(treedef, z)), leaves, treedef)  # type: ignore[misc]
                z = [_in(zi, x.dtype) for zi, x in zip(z, leaves, strict=True)]
                # (a product wider than the params, a float64 Hessian's, is taken as it came)
                hz = [_in(a, x.dtype) if a.dtype == m.dtype else a
                      for a, m, x in zip(hz, stored, leaves, strict=True)]
                # pytorch-optimizer's d.addcmul_(H z, z, value=1/n) from d = 0, rounded alike
                zhz = [(c.weight * a) * b for a, b in zip(hz, z, strict=True)]
                d = zhz if d is None else [x + y for x, y in zip(d, zhz, strict=True)]
            assert d is not None
            # as arrays (NumPy makes a 0-d leaf's arithmetic a scalar), in h's dtype whatever
            # the dtype of hvp's result
            return [backend.namespace(m).asarray(lerp(m, x, c.one_minus_b2), dtype=m.dtype)
                    for m, x in zip(h, d, strict=True)], gen

        if traced:
            import jax

            h, gen = jax.lax.cond(c.refresh, refresh, lambda s: s, (h, gen))
        elif bool(c.refresh):
            h, gen = refresh((h, gen))
        xp = backend.namespace(first) if leaves else np
        out = [xp.asarray(xp.minimum(xp.maximum(m / xp.maximum(v, c.eps), c.neg_clip), c.clip))
               for m, v in zip(leaves, h, strict=True)]
        return unflatten(treedef, out), {"hessian_moment": h, "generator": gen}


def _check_statics(t: Any) -> None:
    for name, least, below in (("update_period", 1, None), ("num_samples", 1, None),
                               ("seed", 0, SEEDS)):
        object.__setattr__(t, name, check_integer(t.name, name, getattr(t, name), least, below))
    if t.distribution not in DISTRIBUTIONS:
        raise ValueError(f"{t.name}: distribution must be one of "
                         f"{', '.join(map(repr, DISTRIBUTIONS))}, got {t.distribution!r}")


def _in(x: Any, dtype: Any) -> Any:
    """``x`` in ``dtype`` (itself where it is in it already)."""
    return x if x.dtype == dtype else backend.namespace(x).astype(x, dtype)


def _leaves_of(owner: str, hz: Any, like: list[Any], treedef: Any) -> list[Any]:
    out = hz if isinstance(hz, list) else flatten_leaves(hz)[0]
    for i, x in enumerate(out[:len(like)]):
        if not backend.is_array(x) or backend.array_library(x) != backend.array_library(
                like[i]) or not backend.kind(x).floating or backend.kind(x).complex:
            raise TypeError(f"{owner}: hvp must return {backend.library(like[i])} arrays of "
                            f"real floats like the params; got {type(x).__name__} of dtype "
                            f"{getattr(x, 'dtype', None)} for {leaf_names(treedef)[i]}")
    if len(out) != len(like) or any(tuple(a.shape) != tuple(b.shape)
                                    for a, b in zip(out, like, strict=True)):
        raise ValueError(
            f"{owner}: hvp must return a tree shaped like the params: got shapes "
            f"{[tuple(a.shape) for a in out]}, expected {[tuple(b.shape) for b in like]}")
    return out


def _draw_jax(state: Any, leaves: list[Any], dist: str) -> tuple[list[Any], Any]:
    import jax

    key, sample = jax.random.split(jax.random.wrap_key_data(state))
    keys = jax.random.split(sample, len(leaves))
    draw = jax.random.normal if dist == "gaussian" else jax.random.rademacher
    z = [draw(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return z, jax.random.key_data(key)


def _draw_torch(state: Any, leaves: list[Any], dist: str) -> tuple[list[Any], Any]:
    import torch

    if not leaves:
        return [], state
    g = torch.Generator(leaves[0].device)
    g.set_state(state if state.dtype == torch.uint8 else state.to("cpu", torch.uint8))
    if dist == "gaussian":
        z = [torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device) for x in leaves]
    else:  # torch.randint_like(p, 0, 2) * 2.0 - 1.0, as pytorch-optimizer draws it
        z = [torch.randint(0, 2, x.shape, generator=g, dtype=x.dtype, device=x.device) * 2.0
             - 1.0 for x in leaves]
    return z, g.get_state()


def _draw_numpy(state: Any, leaves: list[Any], dist: str) -> tuple[list[Any], Any]:
    gen = _pcg_generator(state)
    z = []
    for x in leaves:
        dtype = _normal_dtype(x)
        if dist == "gaussian":
            n = gen.standard_normal(tuple(x.shape), dtype=dtype)
        else:
            n = (gen.integers(0, 2, tuple(x.shape)) * 2 - 1).astype(dtype)
        z.append(n if isinstance(x, np.ndarray) else _to(x, n))
    return z, _pcg_state(gen.bit_generator)


_DRAW: dict[str, Callable[[Any, list[Any], str], tuple[list[Any], Any]]] = {
    "jax": _draw_jax, "torch": _draw_torch, "numpy": _draw_numpy}


@dataclass(frozen=True)
class sophia_h(Rule):
    """Sophia-H (Liu et al., 2023): Sophia with the Hutchinson estimate of the Hessian's
    diagonal, as ``pytorch_optimizer.SophiaH`` writes it (its names and defaults; its ``p`` is
    ``clip_threshold``, its ``betas`` are ``b1``, ``b2``, its ``hessian_distribution`` is
    ``distribution``). A step takes ``hvp=``, a function ``v -> H v`` at the step's params
    (``uo.update(state, params, grads, hvp=hvp)``), called ``num_samples`` times at steps 0,
    k, 2k, ... (``k = update_period``) and not otherwise.

    At a refreshing step, ``d = (1/n) sum_i z_i * H z_i`` over ``n = num_samples`` probes
    ``z`` (``distribution="gaussian"``: standard normal, the authors' Sophia-H and
    pytorch-optimizer's default; ``"rademacher"``: +-1) and ``h <- b2*h + (1-b2)*d`` (``h``
    from 0, no bias correction). Every step::

        m <- b1*m + (1-b1)*g
        p <- p - lr*clip(m / max(h, eps), -clip_threshold, clip_threshold)

    Weight decay: ``weight_decouple=True`` (default) ``p <- p*(1 - lr*wd)`` first
    (``fixed_decay=True``: ``p*(1 - wd)``); ``False``: ``g <- g + wd*p`` (L2).

    The probes are drawn from a generator in the state, seeded with ``seed`` (see
    :class:`scale_by_hutchinson_sophia`): on torch, ``torch.manual_seed(seed)`` before
    pytorch-optimizer's first step draws the same probes, so their runs agree to rounding.
    Sophia-G (the Gauss-Newton-Bartlett estimate from labels sampled from the model) needs the
    model, not only ``H v``: fold it in with :func:`uniopt.sophia_hessian` on
    :class:`uniopt.sophia` instead.

    >>> import numpy as np, uniopt as uo
    >>> hvp = lambda v: {"w": np.array([4.0, 100.0]) * v["w"]}  # f = 2 w0^2 + 50 w1^2
    >>> rule = uo.sophia_h(lr=0.1, clip_threshold=1.0, distribution="rademacher", b2=0.5)
    >>> p = {"w": np.array([1.0, 1.0])}
    >>> state, p = uo.update(uo.setup(rule, p), p, {"w": np.array([4.0, 100.0])}, hvp=hvp)
    >>> p["w"]  # m = 0.04 g, h = 0.5 diag(H): each coordinate moves 0.1*0.08
    array([0.992, 0.992])
    """

    lr: Any = hyper(6e-2, NONNEG)
    b1: Any = hyper(0.96, UNIT_OPEN)
    b2: Any = hyper(0.99, UNIT_OPEN)
    weight_decay: Any = hyper(0.0, NONNEG)
    weight_decouple: bool = True
    fixed_decay: bool = False
    clip_threshold: Any = hyper(1e-2, NONNEG)
    update_period: int = 10
    num_samples: int = 1
    distribution: str = "gaussian"
    eps: Any = hyper(1e-12, NONNEG)
    seed: int = 0

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="second-order",
        paper="Liu et al. (2023)",
        references=("pytorch_optimizer.SophiaH", "formula"),
        # Rademacher probes on a diagonal Hessian give it exactly (z*(Dz) = D), so every
        # array library agrees though each draws from its own generator
        example={"lr": 0.5, "b1": 0.9, "clip_threshold": 1.0, "distribution": "rademacher"},
        budget=1000,
        complex=False,
    )

    def check(self) -> None:
        _check_statics(self)

    def parts(self) -> tuple[Transform, ...]:
        steps: tuple[Transform, ...] = (
            ema_momentum(momentum=self.b1, nesterov=False),
            scale_by_hutchinson_sophia(
                b2=self.b2, eps=self.eps, clip_threshold=self.clip_threshold,
                update_period=self.update_period, num_samples=self.num_samples,
                distribution=self.distribution, seed=self.seed),
            scale_by_lr(lr=self.lr))
        if not self.on("weight_decay"):
            return steps
        if not self.weight_decouple:
            return (weight_decay(wd=self.weight_decay), *steps)
        lr = 1.0 if self.fixed_decay else self.lr
        return (*steps, decoupled_weight_decay(lr=lr, wd=self.weight_decay))
