"""What every rule is made of.

A :class:`Transform` is a frozen record of hyperparameters. The ones that do arithmetic are
:class:`Elementwise`: they name their per-leaf slots, compute a few host-side coefficients once
per step (bias corrections, first-step switches) and run a pure ``kernel`` that maps the incoming
update ``u`` of one array to the outgoing one. Whole optimizers (:class:`Rule`) are recipes: a
record of the user's hyperparameters whose :meth:`~Transform.parts` lists the elementwise
building blocks, so AdamW is Adam's blocks plus a decay block, never a second copy of Adam.

Sign convention: an update ``u`` is *subtracted* from the parameter, ``p <- p - u`` (torch,
Optimisers.jl and the papers write it so). The optax protocol negates it on the way out.

A kernel uses only arithmetic and ``xp.sqrt`` / ``xp.maximum`` / ``xp.minimum`` of the array
namespace it is given, so the same function runs on NumPy, torch or JAX arrays, and element by
element under a compiler. Every constant, ``1 - beta`` included, comes from ``coeffs`` (computed
in double precision on the host, rounded to the array's precision where it meets an array), so a
compiled kernel computes in the array's precision exactly as the reference does.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

from .hyper import Interval, _traced, check, resolve

Kernel = Callable[..., tuple[Any, ...]]
# set while the parts of a rule rebuilt from a JAX pytree are made: nothing to check again
_REBUILT: contextvars.ContextVar[bool] = contextvars.ContextVar("uniopt_rebuilt", default=False)


@dataclasses.dataclass(frozen=True)
class Transform:
    """Base of every rule and building block: hyperparameters as fields, nothing else."""

    def __post_init__(self) -> None:
        self._validate()

    @property
    def name(self) -> str:
        return type(self).__name__

    def hyperparameters(self) -> dict[str, Any]:
        """The fields that accept a number or a schedule, by name."""
        fields = dataclasses.fields(self)
        return {f.name: getattr(self, f.name) for f in fields if "hyper" in f.metadata}

    def _validate(self, where: str = "", resolved: bool = False) -> None:
        """Check every hyperparameter and store numbers as Python floats (tuples as tuples).

        ``resolved``: the values came from schedules, so each must be a number."""
        if _REBUILT.get():
            return
        for f in dataclasses.fields(self):
            valid = f.metadata.get("hyper") or f.metadata.get("static")
            if valid is None:
                continue
            value = getattr(self, f.name)
            schedulable = "hyper" in f.metadata and not resolved

            def number(label: str, v: Any, ok: Interval = valid, sched: bool = schedulable) -> Any:
                return v if sched and callable(v) else check(self.name, label, v, ok, where)

            if isinstance(f.default, tuple):
                if not isinstance(value, (tuple, list)):
                    raise TypeError(
                        f"{self.name}: {f.name} must be a tuple of {len(f.default)} numbers or "
                        f"schedules, got {value!r}{where}"
                    )
                if len(value) != len(f.default):
                    raise ValueError(
                        f"{self.name}: {f.name} must be a tuple of {len(f.default)} numbers or "
                        f"schedules, got {value!r}{where}"
                    )
                value = tuple(number(f"{f.name}[{i}]", v) for i, v in enumerate(value))
            else:
                value = number(f.name, value)
            object.__setattr__(self, f.name, value)
        if any(_traced(v) for v in _numbers(self)):
            return  # under jax.jit (adjust-able hyperparameters): nothing to compare yet
        try:
            self.check()
        except ValueError as e:
            raise ValueError(f"{e}{where}") from None

    def check(self) -> None:
        """Constraints between fields; runs on construction and on every resolved step."""

    def at(self, step: int) -> Transform:
        """This record with every schedule replaced by its value for ``step``, validated."""
        hp = self.hyperparameters()
        try:
            values = {k: resolve(v, step) for k, v in hp.items() if _has_schedule(v)}
        except Exception as e:
            if not _traced(step):
                raise
            raise TypeError(
                f"{self.name}: a schedule could not be traced by jax.jit ({type(e).__name__}: "
                f"{str(e).splitlines()[0]}); write it with array operations (jax.numpy) or "
                "use uniopt.schedules, which trace"
            ) from e
        if not values:
            return self
        new = object.__new__(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(new, f.name, values.get(f.name, getattr(self, f.name)))
        kept = {k: c for k, c in self.__dict__.get("_one_minus", {}).items() if k not in values}
        object.__setattr__(new, "_one_minus", kept)
        new._validate(f" (the value of its schedule at step {step})", resolved=True)
        return new

    def parts(self) -> tuple[Part, ...]:
        """The building blocks this transform runs, in order."""
        raise NotImplementedError

    # hyperparameters whose value decides whether a block exists (zero: no block, no slot)
    optional: ClassVar[tuple[str, ...]] = ()

    def on(self, name: str) -> bool:
        """Whether the optional block that hyperparameter ``name`` drives is needed (a schedule
        may become non-zero later). Under ``jax.jit`` the values are traced, so the decision
        made on the host travels with the state (see :func:`rebuild`)."""
        assert name in self.optional, f"{self.name}.optional does not list {name!r}"
        fixed = self.__dict__.get("_on_fixed")
        if fixed is not None:
            return name in fixed
        v = getattr(self, name)
        return callable(v) or v != 0

    def one_minus(self, name: str) -> Any:
        """``1 - self.<name>``, computed in double precision on the host. Under ``jax.jit`` the
        value is a traced float32 (without x64), where ``1 - 0.999`` would lose 5 digits, so the
        host's complement travels with it as a leaf of the state (see :func:`hyper_leaves`)."""
        c = self.__dict__.get("_one_minus", {}).get(name)
        return 1.0 - getattr(self, name) if c is None else c

    @functools.cached_property
    def flat_parts(self) -> tuple[Part, ...]:
        complements = self.__dict__.get("_complements")
        # rebuilt from a JAX pytree: the values were checked before they went in, and may be
        # traced or on a device, so the parts take them as they are (see rebuild)
        token = _REBUILT.set(True) if complements is not None else None
        try:
            out: list[Part] = []
            for p in self.parts():
                out.extend([p] if isinstance(p, (Elementwise, WholeTree)) else p.flat_parts)
        finally:
            if token is not None:
                _REBUILT.reset(token)
        if complements:  # parts pass the rule's values through: match them by identity
            for part in out:
                own = {}
                for name, v in part.hyperparameters().items():
                    hit = complements.get(id(v))
                    if hit is not None and hit[0] is v:
                        own[name] = hit[1]
                object.__setattr__(part, "_one_minus", own)
        return tuple(out)

    @functools.cached_property
    def tree_layout(self) -> tuple[str, ...]:
        """Names of the whole-tree parts, each with one state entry (``from_optax``...)."""
        seen: dict[str, int] = {}
        out = []
        for p in self.flat_parts:
            if isinstance(p, WholeTree):
                n = seen[p.name] = seen.get(p.name, -1) + 1
                out.append(p.name if n == 0 else f"{p.name}#{n}")
        return tuple(out)

    @functools.cached_property
    def layout(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Names of the slot-carrying parts and their slots: what a state must match."""
        seen: dict[str, int] = {}
        out = []
        for p in self.flat_parts:
            if isinstance(p, WholeTree) or not p.slot_names():
                continue
            n = seen[p.name] = seen.get(p.name, -1) + 1
            out.append((p.name if n == 0 else f"{p.name}#{n}", p.slot_names()))
        return tuple(out)

    # --- the optax protocol: updates are to be *added* -------------------------------------
    def init(self, params: Any) -> Any:
        """optax protocol: the state for ``params`` (same as ``uniopt.setup(self, params)``)."""
        from .engine import setup

        return setup(self, params)

    def update(self, grads: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        """optax protocol: ``(updates, state)`` where ``params + updates`` is the new params."""
        from .engine import optax_update

        return optax_update(self, grads, state, params)


def _numbers(t: Transform) -> list[Any]:
    return [x for v in t.hyperparameters().values() for x in (v if isinstance(v, tuple) else (v,))
            if not callable(x)]


def hyper_leaves(t: Transform) -> tuple[list[Any], Any]:
    """``t``'s numeric hyperparameters (members' too), each followed by its complement
    ``1 - x`` computed on the host, and a hashable skeleton of the rest.

    The skeleton holds the type, the fixed fields, the schedules and every ``on`` decision, so
    two rules with equal skeletons have the same parts and slots: under ``jax.jit`` the numbers
    are traced inputs and :func:`uniopt.adjust` does not recompile."""
    leaves: list[Any] = []
    fields = []
    known = t.__dict__.get("_one_minus", {})
    for f in dataclasses.fields(t):
        v = getattr(t, f.name)
        if isinstance(v, Transform) or (isinstance(v, tuple) and v and all(
                isinstance(m, Transform) for m in v)):
            subs = [hyper_leaves(m) for m in (v if isinstance(v, tuple) else (v,))]
            for sub_leaves, _ in subs:
                leaves += sub_leaves
            fields.append((f.name, "members" if isinstance(v, tuple) else "member",
                           tuple(sk for _, sk in subs)))
        elif "hyper" in f.metadata:
            xs = v if isinstance(v, tuple) else (v,)
            for i, x in enumerate(xs):
                if not callable(x):
                    key = f.name if not isinstance(v, tuple) else (f.name, i)
                    c = known.get(key)
                    leaves += [x, 1.0 - x if c is None else c]
            fields.append((f.name, "tuple" if isinstance(v, tuple) else "one",
                           tuple(x if callable(x) else None for x in xs)))
        else:
            fields.append((f.name, "fixed", v))
    on = frozenset(n for n in t.optional if t.on(n))
    return leaves, (type(t), tuple(fields), on)


def rebuild(skeleton: Any, leaves: Any) -> Transform:
    """Inverse of :func:`hyper_leaves`. The values may be traced, so nothing is validated, the
    ``on`` decisions come from the skeleton, and each part is handed the complements of the
    values it was built from."""
    it = iter(leaves)
    complements: dict[int, tuple[Any, Any]] = {}

    def build(sk: Any) -> Transform:
        cls, fields, on = sk
        t = object.__new__(cls)
        known: dict[Any, Any] = {}
        for name, kind, spec in fields:
            if kind == "fixed":
                v = spec
            elif kind in ("member", "members"):
                v = tuple(build(m) for m in spec)
                v = v[0] if kind == "member" else v
            else:
                xs = []
                for i, x in enumerate(spec):
                    if x is None:
                        x, c = next(it), next(it)
                        known[name if kind == "one" else (name, i)] = c
                        complements[id(x)] = (x, c)
                    xs.append(x)
                v = xs[0] if kind == "one" else tuple(xs)
            object.__setattr__(t, name, v)
        object.__setattr__(t, "_on_fixed", on)
        object.__setattr__(t, "_one_minus", known)
        return t

    rule = build(skeleton)
    # the parts are made when first asked for (flat_parts), not here: making them validates
    # the values, and concrete JAX values would each be copied to the host, after every step
    object.__setattr__(rule, "_complements", complements)
    return rule


def carry_complements(old: Transform, new: Transform, changed: str) -> Transform:
    """``new`` (``old`` with field ``changed`` replaced) keeps the host complements ``old``
    holds for its other fields (values that came back from ``jax.jit`` are float32)."""
    kept = {k: c for k, c in old.__dict__.get("_one_minus", {}).items()
            if k != changed and not (isinstance(k, tuple) and k[0] == changed)}
    if kept:
        object.__setattr__(new, "_one_minus", kept)
    return new


def _has_schedule(v: Any) -> bool:
    return any(callable(x) for x in v) if isinstance(v, tuple) else callable(v)


@dataclasses.dataclass(frozen=True)
class Elementwise(Transform):
    """A building block that acts on each array on its own: ``kernel(xp, c, p, u, *slots)``."""

    slots: ClassVar[tuple[str, ...]] = ()
    uses_params: ClassVar[bool] = False
    # a part that needs the global norm of its input over every leaf (clip_by_global_norm):
    # the engine computes it in one extra read pass and asks norm_coeffs for the coefficients
    needs_norm: ClassVar[bool] = False

    def parts(self) -> tuple[Elementwise, ...]:
        return (self,)

    def slot_names(self) -> tuple[str, ...]:
        return self.slots

    def init_slots(self, p: Any, xp: Any) -> tuple[Any, ...]:
        return tuple(xp.zeros_like(p) for _ in self.slot_names())

    def coeffs(self, step: int) -> tuple[float, ...]:
        """Plain Python numbers for this step (self is already resolved)."""
        return ()

    def norm_coeffs(self, norm: Any) -> tuple[Any, ...]:
        """For ``needs_norm`` parts: the coefficients, given the global norm of the input."""
        raise NotImplementedError

    kernel: ClassVar[Kernel]


@dataclasses.dataclass(frozen=True)
class WholeTree(Transform):
    """A building block that sees every leaf's ``u`` at once, as a tree shaped like the params
    (an optax transformation): the engine runs the elementwise parts before it on every leaf,
    hands it the tree, and keeps its state, any pytree, in ``State.tree_states``."""

    def parts(self) -> tuple[Part, ...]:
        return (self,)

    def slot_names(self) -> tuple[str, ...]:
        return ()

    def init_tree(self, params: Any) -> Any:
        """The state for the params tree."""
        raise NotImplementedError

    def apply(self, u: Any, state: Any, params: Any) -> tuple[Any, Any]:
        """``(u, state)`` for the tree ``u`` of incoming updates (to be subtracted)."""
        raise NotImplementedError


Part = Elementwise | WholeTree


@dataclasses.dataclass(frozen=True)
class Rule(Transform):
    """A whole optimizer: a record of the user's hyperparameters and a recipe of parts."""


def static(default: Any, valid: Interval) -> Any:
    """A dataclass field that is a fixed number (not schedulable), e.g. an initial value."""
    return dataclasses.field(default=default, metadata={"static": valid})


# --- shared moment helpers: the math every adaptive rule is written with -----------------------


def lerp(a: Any, b: Any, w: float) -> Any:
    """``a + w (b - a)``: an exponential moving average step, in torch's operation order."""
    return a + w * (b - a)


def ema_sq(v: Any, g: Any, decay: float, weight: float) -> Any:
    """``decay v + weight g^2`` (``weight = 1 - decay``), in torch's ``mul_ + addcmul_`` order."""
    return v * decay + weight * g * g


def select(xp: Any, cond: Any, a: Any, b: Any) -> Any:
    """``a`` where ``cond`` else ``b``, exactly. ``cond`` is a host bool, or a traced one under
    ``jax.jit`` (a step-dependent switch such as "first update"); the compiled path has its
    own scalar version."""
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
