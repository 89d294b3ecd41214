"""Putting transforms together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Part, Transform, WholeTree


@dataclass(frozen=True, init=False)
class chain(Transform):
    """Apply transforms one after another; the output of each is the input of the next.

    ``chain(weight_decay(5e-4), adam(lr=1e-3))`` is torch's ``Adam(weight_decay=5e-4)``.
    Hyperparameters of the members are reached by name through :func:`uniopt.adjust`. An optax
    ``GradientTransformation`` is a member as :func:`uniopt.from_optax` wraps it.
    """

    transforms: tuple[Transform, ...]

    def __init__(self, *transforms: Any) -> None:
        members = []
        for i, t in enumerate(transforms):
            if not isinstance(t, Transform) and _is_optax(t):
                t = from_optax(t)
            if not isinstance(t, Transform):
                raise TypeError(
                    f"chain: argument {i} is neither a uniopt transform nor an optax "
                    f"GradientTransformation: {t!r}"
                )
            members.append(t)
        object.__setattr__(self, "transforms", tuple(members))

    def parts(self) -> tuple[Part, ...]:
        out: list[Part] = []
        for t in self.transforms:
            out.extend(t.flat_parts)
        return tuple(out)


def _is_optax(t: Any) -> bool:
    """An optax GradientTransformation, by its protocol (optax is never imported here)."""
    return (
        not isinstance(t, (type, Transform))  # uo.adam (the class) has init and update too
        and callable(getattr(t, "init", None))
        and callable(getattr(t, "update", None))
    )


@dataclass(frozen=True)
class from_optax(WholeTree):
    """An optax ``GradientTransformation`` as a part of a uniopt chain.

    It receives the chain's updates so far as a tree shaped like the params and returns the
    new ones; its state lives in the uniopt state. Inside a uniopt chain updates are
    *subtracted* (``p <- p - u``), the frame of gradients, which is also the frame every optax
    ``scale_by_*``, ``clip*`` or ``add_decayed_weights`` works in, so those go in as they are:
    ``uo.chain(optax.clip_by_global_norm(1.0), uo.adam(lr=1e-3))``. A whole optax optimizer
    (``optax.adam(1e-3)`` ends in ``scale(-lr)``) returns updates to be *added*: wrap it as
    ``from_optax(tx, negate=True)``.

    optax computes with JAX: on NumPy params its outputs are converted back to NumPy (and
    without ``jax_enable_x64`` JAX computes float64 inputs in float32).
    """

    tx: Any
    negate: bool = False

    def __post_init__(self) -> None:
        if not _is_optax(self.tx):
            raise TypeError(f"from_optax: {self.tx!r} is not an optax GradientTransformation")
        super().__post_init__()

    def init_tree(self, params: Any) -> Any:
        return self.tx.init(params)

    def apply(self, u: Any, state: Any, params: Any) -> tuple[Any, Any]:
        out, state = self.tx.update(u, state, params)
        if self.negate:
            out = _neg(out)
        return out, state


def _neg(tree: Any) -> Any:
    import jax

    return jax.tree.map(lambda x: -x, tree)
