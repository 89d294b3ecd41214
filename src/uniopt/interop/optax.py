"""optax both ways: every uniopt transform speaks the optax protocol, and an optax
``GradientTransformation`` stands inside a uniopt chain (:class:`from_optax`).

optax is imported only by :func:`to_optax`: a transformation is recognised by its protocol.
The protocol's ``init``/``update`` methods live on :class:`uniopt.Transform`, which delegates to
the functions registered at the end of this module (the engine sits above ``base``, so ``base``
cannot call it directly).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import backend
from ..base import OPTAX_PROTOCOL, Combinator, Transform, WholeTree
from ..engine import optax_update, setup
from ..state import AnyParams, State
from ..tree import trainables
from .jax import register_state


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
    without ``jax_enable_x64`` JAX computes float64 inputs in float32). A transformation whose
    ``update`` takes extra keyword arguments (optax's ``GradientTransformationExtraArgs``)
    receives the step's: ``uo.update(state, params, grads, value=loss)`` reaches
    ``optax.contrib.reduce_on_plateau`` in the chain.
    """

    tx: Any
    negate: bool = False
    libraries: ClassVar[tuple[str, ...]] = ("jax", "numpy")
    takes_complex: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not is_optax(self.tx):
            raise TypeError(f"from_optax: {self.tx!r} is not an optax GradientTransformation")
        super().__post_init__()

    # Read from the fields, never stored beside them: a record rebuilt without its constructor
    # (jax.jit's) kept the class's values, and a whole optax optimizer's steps came back with
    # their sign flipped, an ascent.
    @functools.cached_property
    def makes_step(self) -> bool:  # type: ignore[override]
        """A whole optax optimizer (``negate=True``) hands back steps."""
        return self.negate

    @functools.cached_property
    def reads_value(self) -> bool:  # type: ignore[override]
        return _takes_extra_args(self.tx.update)

    @property
    def takes_any_keyword(self) -> bool:
        """optax's extra arguments may have any name: uniopt's step refuses none then."""
        return self.reads_value

    def init_tree(self, params: Any) -> Any:
        leaves = trainables(params)
        if leaves and backend.is_array(leaves[0]) and \
                backend.array_library(leaves[0]) not in self.libraries:
            raise TypeError(f"{self.name} runs optax, on JAX or NumPy arrays; these params are "
                            f"{backend.library(leaves[0])} arrays")
        return self.tx.init(params)

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any,
                   **extra: Any) -> tuple[Any, Any]:
        out, state = self.tx.update(u, state, params, **extra)
        if self.negate:
            import jax

            out = jax.tree.map(lambda x: -x, out)
        return out, state


def _takes_extra_args(update: Any) -> bool:
    try:
        kinds = [p.kind for p in inspect.signature(update).parameters.values()]
    except (TypeError, ValueError):  # no signature to read: optax's plain protocol
        return False
    return inspect.Parameter.VAR_KEYWORD in kinds


def to_optax(t: Transform, *, state_dtype: str | None = None) -> Any:
    """``t`` as an optax ``GradientTransformationExtraArgs``: ``optax.chain`` hands the extra
    arguments of its update (``value=loss``) only to such members, so a uniopt transform that
    reads them (:class:`uniopt.reduce_on_plateau`) goes into an optax chain wrapped by this.

    ``state_dtype`` (``"float32"``, ``"float64"`` or ``"q8"``) is :func:`uniopt.setup`'s: its
    ``init`` keeps the slots so, for code that calls ``init`` itself (flax NNX's
    ``nnx.Optimizer``, an ``optax.chain``). A rule stepping bfloat16 or float16 params then
    hands back float32 updates (optax's own ``mu_dtype=jnp.float32`` does too), made so that
    ``optax.apply_updates`` stores the params :func:`uniopt.update` would.

    >>> import optax, uniopt as uo
    >>> tx = optax.chain(optax.adam(1e-3), uo.to_optax(uo.reduce_on_plateau(patience=5)))
    >>> tx = uo.to_optax(uo.adamw(lr=1e-3), state_dtype="float32")
    """
    if not isinstance(t, Transform):
        raise TypeError(f"to_optax: expected a uniopt transform, got {t!r}")
    if state_dtype is not None and state_dtype not in ("float32", "float64", "q8"):
        raise ValueError(f"to_optax: state_dtype must be 'float32', 'float64' or 'q8', got "
                         f"{state_dtype!r}")
    import optax

    init = t.init if state_dtype is None else functools.partial(optax_init, t,
                                                                 state_dtype=state_dtype)
    return optax.GradientTransformationExtraArgs(init, t.update)


def _placeholder(params: Any) -> bool:
    """Whether ``params`` is the stand-in ``optax.tree.map_params`` sets up with."""
    cls = type(params)
    return cls.__name__ == "_ParamsPlaceholder" and cls.__module__.startswith("optax.")


def optax_init(rule: Transform, params: Any, state_dtype: str | None = None) -> State:
    """The optax protocol's ``init``: :func:`uniopt.setup`, and for the placeholder of
    ``optax.tree.map_params`` the state that marks where the params stand: each slot (a copy of
    the params, one array per leaf) and each optax member's own placeholder state."""
    if not _placeholder(params):
        return setup(rule, params, state_dtype=state_dtype)
    register_state()
    trees = {keys[0]: _placeholder_tree(part, params, state_dtype)
             for part, keys in rule.keyed_parts if isinstance(part, WholeTree)}
    return State(rule, 0, {key: params for key, _ in rule.slot_keys}, AnyParams(), state_dtype,
                 trees)


# the leaf shape a whole-tree part is set up on to learn the layout of its state
_PROBE = (3, 2)


def _placeholder_tree(part: WholeTree, params: Any, state_dtype: str | None) -> Any:
    """The tree state of ``part`` for the placeholder ``params``: the placeholder where the
    state keeps one array per leaf shaped as it (its ``like_params`` entries), any leaf (0)
    where it keeps something else, and each member's placeholder state."""
    if isinstance(part, from_optax):
        return part.init_tree(params)  # (optax's own answer to its placeholder)
    if isinstance(part, Combinator):
        return part.placeholder_tree(params, lambda m: optax_init(m, params, state_dtype))
    # the layout of its state, from a set-up on one leaf: sound where each leaf's arrays are
    # its like_params entries alone (any other follows the leaves in a layout of its own)
    shapes = part.state_shapes(_PROBE)
    if shapes is not None and all(s == _PROBE for s in shapes):
        import jax

        try:
            probe = part.init_tree([jax.numpy.zeros(_PROBE, jax.numpy.float32)])
        except Exception:  # noqa: BLE001 (a part that takes no such leaf: said below)
            probe = None
        if isinstance(probe, dict) and \
                sum(isinstance(probe.get(k), list) for k in part.like_params) == len(shapes):
            return {k: params if k in part.like_params and isinstance(v, list)
                    else jax.tree.map(lambda _: 0, v) for k, v in probe.items()}
        if shapes == () and probe is not None:
            return jax.tree.map(lambda _: 0, probe)
    raise TypeError(
        f"optax.tree.map_params: {part.name} keeps arrays for the params in a layout of its "
        "own, which its state made from optax's placeholder cannot mark; map the state "
        "itself with jax.tree.map (each slot and tree-state entry is a list in "
        "uo.trainables order)")


OPTAX_PROTOCOL.update(
    init=optax_init,
    update=optax_update,
    adopt=lambda t: from_optax(t) if is_optax(t) else None,
)
