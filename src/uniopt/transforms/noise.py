"""Annealed Gaussian gradient noise (Neelakantan et al., 2015), from a generator whose state
lives in the optimizer's state."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import array_api_compat as aac
import numpy as np

from .. import backend
from ..base import WholeTree
from ..hyper import NONNEG, check_integer, hyper
from ..tree import flatten_leaves, unflatten

SEEDS = 1 << 32  # JAX takes a larger seed modulo 2**32 without x64: refused here instead


class Noise(NamedTuple):
    std: Any  # sqrt(eta / t^gamma) for update number t


@dataclass(frozen=True)
class add_noise(WholeTree):
    """``u <- u + sqrt(eta / t^gamma) * z``, ``z`` standard normal, ``t`` the update's number
    (1, 2, ...); as optax's ``add_noise(eta, gamma, key=seed)``.

    The generator's state is the tree state of this part (``State.tree_states``), so it is
    saved with the rest, and ``jax.jit`` carries it. On JAX it is optax's key, split as optax
    splits it (the same noise, leaf by leaf in :func:`uniopt.trainables` order, which is
    JAX's); on NumPy, NumPy's default generator (PCG64) seeded with ``seed``; on torch,
    torch's generator of the tensors' device, ``manual_seed(seed)``; on another array
    library, NumPy's, converted.

    >>> import numpy as np, uniopt as uo
    >>> p = [np.zeros(10_000)]
    >>> state, p = uo.update(uo.setup(uo.add_noise(eta=4.0, gamma=0.55, seed=0), p), p,
    ...                      [np.zeros(10_000)])
    >>> round(float(np.std(p[0])), 1)  # sqrt(4 / 1^0.55)
    2.0
    """

    real_only = True

    eta: Any = hyper(0.01, NONNEG)
    gamma: Any = hyper(0.55, NONNEG)
    seed: int = 0

    def check(self) -> None:
        object.__setattr__(self, "seed", check_integer(self.name, "seed", self.seed, 0, SEEDS))

    def coeffs(self, step: Any) -> Noise:
        variance = self.eta / (step + 1) ** self.gamma
        if isinstance(variance, float):
            return Noise(std=math.sqrt(variance))
        return Noise(std=aac.array_namespace(variance).sqrt(variance))  # a JAX step

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return ()  # (a generator's state: a few numbers)

    def init_tree(self, params: Any) -> Any:
        return seeded_state(flatten_leaves(params)[0], self.seed)

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any,
                   **extra: Any) -> tuple[Any, Any]:
        leaves, treedef = flatten_leaves(u)
        first = leaves[0] if leaves else np.zeros(0)
        kind = _kind(state)
        lib = "jax" if backend.is_jax(first) else "torch" if backend.is_torch(first) else "numpy"
        if kind != lib:
            raise TypeError(f"{self.name}: its state holds a {kind} generator, the updates are "
                            f"{backend.library(first)} arrays: set the state up for these params")
        z, state = _DRAW[kind](state, leaves)
        return unflatten(treedef, [x + c.std * n for x, n in zip(leaves, z, strict=True)]), state


def _kind(state: Any) -> str:
    if isinstance(state, np.ndarray):
        return "numpy"
    return "torch" if backend.is_torch(state) else "jax"


def _draw_jax(state: Any, leaves: list[Any]) -> tuple[list[Any], Any]:
    import jax

    key, sample = jax.random.split(jax.random.wrap_key_data(state))
    keys = jax.random.split(sample, len(leaves))
    z = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return z, jax.random.key_data(key)


def _draw_torch(state: Any, leaves: list[Any]) -> tuple[list[Any], Any]:
    import torch

    if not leaves:
        return [], state
    if leaves[0].device.type == "meta":  # shapes only: nothing to draw, the state as it was
        return [torch.empty_like(x) for x in leaves], state
    g = torch.Generator(leaves[0].device)
    # torch's load_state_dict moves a state's tensors to their parameter's device and dtype:
    # the generator's bytes, 0 to 255, come back exactly from any float
    g.set_state(state if state.dtype == torch.uint8 else state.to("cpu", torch.uint8))
    z = [torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device) for x in leaves]
    return z, g.get_state()


def _draw_numpy(state: Any, leaves: list[Any]) -> tuple[list[Any], Any]:
    gen = _pcg_generator(state)
    z = []
    for x in leaves:
        n = gen.standard_normal(tuple(x.shape), dtype=_normal_dtype(x))
        z.append(n if isinstance(x, np.ndarray) else _to(x, n))
    return z, _pcg_state(gen.bit_generator)


def _normal_dtype(x: Any) -> Any:
    return np.float32 if np.dtype(backend.dtype_name(x.dtype)) == np.float32 else np.float64


def _to(like: Any, x: np.ndarray) -> Any:
    """``x`` as an array of ``like``'s library, dtype and device (array-api-strict...)."""
    xp = backend.namespace(like)
    return xp.astype(xp.asarray(x, device=backend.device(like)), like.dtype)


def seeded_state(leaves: list[Any], seed: int) -> Any:
    """A generator's state seeded with ``seed``, in the library of ``leaves`` (a JAX key's data,
    a torch generator's bytes on their device, or NumPy's PCG64 as :func:`_pcg_state`'s
    words): what a rule that draws keeps in its state."""
    first = leaves[0] if leaves else np.zeros(0)
    held = backend.jax_array_of(first)  # (a flax NNX Param's array: nnx.Optimizer's init)
    if held is not None:
        first = held
    if backend.is_jax(first):
        import jax

        return backend.placed(jax.random.key_data(jax.random.key(seed)), first)
    if backend.is_torch(first):
        import torch

        # (the meta device has no generator: a CPU one's state, the bytes any device's is)
        device = "cpu" if str(first.device) == "meta" else first.device
        return torch.Generator(device).manual_seed(seed).get_state()
    return _pcg_state(np.random.PCG64(seed))


def _pcg_generator(words: Any) -> np.random.Generator:
    """A NumPy generator from PCG64's state as :func:`_pcg_state` writes it (or its bits as
    signed 64-bit words, as a torch state keeps them)."""
    w = [int(x) & (1 << 64) - 1 for x in words]
    bits = np.random.PCG64(0)
    bits.state = {"bit_generator": "PCG64",
                  "state": {"state": w[0] << 64 | w[1], "inc": w[2] << 64 | w[3]},
                  "has_uint32": w[4], "uinteger": w[5]}
    return np.random.Generator(bits)


def _pcg_state(bits: Any) -> np.ndarray:
    """PCG64's state as six unsigned 64-bit words: its 128-bit state and increment, high word
    first, and the half of a 64-bit draw it keeps for the next 32-bit one."""
    s = bits.state
    words = [s["state"]["state"] >> 64, s["state"]["state"] & (1 << 64) - 1,
             s["state"]["inc"] >> 64, s["state"]["inc"] & (1 << 64) - 1,
             s["has_uint32"], s["uinteger"]]
    return np.array(words, dtype=np.uint64)


_DRAW = {"jax": _draw_jax, "torch": _draw_torch, "numpy": _draw_numpy}
