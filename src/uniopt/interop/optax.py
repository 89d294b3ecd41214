"""optax both ways: every uniopt transform speaks the optax protocol, and an optax
``GradientTransformation`` stands inside a uniopt chain (:class:`from_optax`).

optax is never imported here: a transformation is recognised by its protocol. The protocol's
``init``/``update`` methods live on :class:`uniopt.Transform`, which delegates to the functions
registered at the end of this module (the engine sits above ``base``, so ``base`` cannot call it
directly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import OPTAX_PROTOCOL, Transform, WholeTree
from ..engine import optax_update, setup


def is_optax(t: Any) -> bool:
    """An optax GradientTransformation, by its protocol."""
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
    libraries: ClassVar[tuple[str, ...] | None] = ("jax", "numpy")

    def __post_init__(self) -> None:
        if not is_optax(self.tx):
            raise TypeError(f"from_optax: {self.tx!r} is not an optax GradientTransformation")
        super().__post_init__()
        # a whole optax optimizer (negate=True) hands back steps
        object.__setattr__(self, "makes_step", self.negate)

    def init_tree(self, params: Any) -> Any:
        return self.tx.init(params)

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any) -> tuple[Any, Any]:
        out, state = self.tx.update(u, state, params)
        if self.negate:
            import jax

            out = jax.tree.map(lambda x: -x, out)
        return out, state


OPTAX_PROTOCOL.update(
    init=setup,
    update=optax_update,
    adopt=lambda t: from_optax(t) if is_optax(t) else None,
)
