"""What every rule is made of: the record, the three kinds of part, and :class:`chain`.

A :class:`Transform` is a frozen record of hyperparameters. Whole optimizers (:class:`Rule`) are
recipes: their :meth:`~Transform.parts` list building blocks, so AdamW is Adam's blocks plus a
decay block, never a second copy of Adam. The engine knows each part's kind, never the
algorithm:

* :class:`Elementwise`: a kernel over one element of ``p``, ``u`` and the slots. The engine runs
  it on whole arrays of any library (the reference path) and compiles runs of them into one
  loop (the fast path).
* :class:`PerLeaf`: sees one whole tensor (row/column factors, a per-tensor norm, a matrix
  iteration); the reference path runs it leaf by leaf, or, where it says it takes a batch,
  once per set of same-shaped leaves stacked. Its slots may have other shapes than the leaf
  (:meth:`Part.slot_shapes`).
* :class:`WholeTree`: sees every leaf at once (an optax member); a :class:`Minimizer` also
  evaluates the objective itself, through a closure (a line search, L-BFGS).

Sign convention: an update ``u`` is *subtracted* from the parameter, ``p <- p - u`` (torch,
Optimisers.jl and the papers write it so). The optax protocol negates it on the way out.

The kernel contract: ``coeffs(step)`` runs on the host and returns a named record (a
``NamedTuple``) of every number the kernel needs, ``1 - beta`` included, computed in double
precision; ``kernel(xp, c, p, u, *slots) -> (u, *slots)`` uses only arithmetic and
``xp.sqrt`` / ``xp.maximum`` / ``xp.minimum`` / ``xp.sign`` of the namespace it is given, and no
constants, so one function runs on NumPy, torch or JAX arrays, and element by element under
numba, in the array's precision. A kernel does not branch on its coefficients: a flag that
changes the arithmetic (Nesterov or not) picks another kernel, and a switch that depends on the
step (the first update) goes through :func:`uniopt.moments.select`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Collection, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Literal, cast

import array_api_compat as aac
import numpy as np

from . import backend
from .hyper import (
    Complemented,
    DeviceNumber,
    HostFacts,
    Interval,
    _jax_array,
    _traced,
    check,
    did_you_mean,
    on_host,
    resolve,
)

Kernel = Callable[..., tuple[Any, ...]]

# The optax protocol (``init``, ``update``, and ``adopt``: an optax transformation as a chain
# member) is the engine's work, one layer up: the module that implements it
# (uniopt.interop.optax, imported by ``import uniopt``) registers it here.
OPTAX_PROTOCOL: dict[str, Callable[..., Any]] = {}

# The combinators a rule may be made of (``muon(others="adamw")`` is a partition of Muon and
# AdamW): they run the engine, one layer up, so uniopt.combine registers them here by name.
COMBINATORS: dict[str, Callable[..., Any]] = {}


@dataclasses.dataclass(frozen=True)
class Transform:
    """Base of every rule and building block: hyperparameters as fields, nothing else."""

    # Set only on a record rebuilt from a JAX state (see uniopt.interop.jax) or resolved from
    # one, and on a record given a JAX array for a number that decides an optional block: the
    # host's complements of its numbers and its optional-block decisions.
    host: HostFacts | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )

    # hyperparameters whose value decides whether a block exists (zero: no block, no slot)
    optional: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # a switch is a bool: "no" is truthy
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name),
                                                          (bool, np.bool_)):
                raise ValueError(f"{self.name}: {f.name} must be True or False, "
                                 f"got {getattr(self, f.name)!r}")
        self._validate()

    @property
    def name(self) -> str:
        return type(self).__name__

    def hyperparameters(self) -> dict[str, Any]:
        """The fields that accept a number or a schedule, by name."""
        return {n: getattr(self, n) for n in _hyper_names(type(self))}

    def _validate(self, where: str = "", resolved: bool = False,
                  only: Collection[str] | None = None, foreign: bool = False) -> None:
        """Check every hyperparameter and store numbers as Python floats (tuples as tuples).

        ``resolved``: the values came from schedules, so each must be a number. ``only``: the
        fields to check (the others were checked when they entered a record), and ``foreign``
        whether one of the others holds a number the host cannot compare (see
        :attr:`_foreign`); the constraints between fields are checked whatever ``only`` holds."""
        # a JAX array where a number decides a block: the value may change with the record
        # kept (optax.inject_hyperparams passes every number so and rebuilds the record with
        # the array it holds, traced under jit), so the block is kept, as for a schedule
        dynamic = [n for n in self.optional if _jax_array(getattr(self, n))]
        checked = _checked_fields(type(self))
        for f in checked.values() if only is None else map(checked.__getitem__, only):
            valid = f.metadata.get("hyper") or f.metadata.get("static")
            value = getattr(self, f.name)
            schedulable = "hyper" in f.metadata and not resolved

            def number(label: str, v: Any, ok: Interval = valid, sched: bool = schedulable,
                       static: bool = "static" in f.metadata) -> Any:
                return v if sched and callable(v) else check(self.name, label, v, ok, where,
                                                             schedulable=not static)

            if isinstance(f.default, tuple):
                if not isinstance(value, (tuple, list)) or len(value) != len(f.default):
                    error = TypeError if not isinstance(value, (tuple, list)) else ValueError
                    raise error(
                        f"{self.name}: {f.name} must be a tuple of {len(f.default)} numbers or "
                        f"schedules, got {value!r}{where}"
                    )
                value = tuple(number(f"{f.name}[{i}]", v) for i, v in enumerate(value))
            else:
                value = number(f.name, value)
            object.__setattr__(self, f.name, value)
        if dynamic:
            on = frozenset(n for n in self.optional if n in dynamic or self.on(n))
            object.__setattr__(self, "host", HostFacts({}, on))
        numbers = _numbers(self) if only is None else [
            x for n in only for x in _flat(getattr(self, n)) if not callable(x)]
        if foreign or any(_traced(v) or isinstance(v, (Complemented, DeviceNumber))
                          for v in numbers):
            return  # from a JAX state: nothing to compare on the host
        try:
            self.check()
        except (ValueError, TypeError) as e:  # (a fixed number's kind: a TypeError)
            if not where:
                raise
            raise type(e)(f"{e}{where}") from None

    def check(self) -> None:
        """Constraints between fields; runs on construction and on every resolved step."""

    def replace(self, **changes: Any) -> Transform:
        """This record with some fields changed, validated; the host's complements of the
        other numbers, and the decisions of the blocks they drive, are kept (see
        :class:`~uniopt.hyper.HostFacts`)."""
        new = dataclasses.replace(self, **changes)
        if self.host is not None:
            kept = {k: c for k, c in self.host.complements.items()
                    if (k if isinstance(k, str) else k[0]) not in changes}
            on = self.host.on
            if on is not None:
                on = frozenset(n for n in self.optional
                               if (new.on(n) if n in changes else n in on))
            nonzero = frozenset(n for n in self.optional if (
                n in changes and on is not None and n in on and held_nonzero(new, n)
                or n not in changes and n in self.host.nonzero))
            object.__setattr__(new, "host", HostFacts(kept, on, nonzero))
        return new

    def at(self, step: Any) -> Transform:
        """This record as its kernel sees it at ``step``: every schedule replaced by its value
        (validated), every :class:`~uniopt.hyper.Complemented` pair by its value."""
        if self.fixed:
            return self
        if type(step) is int and self._read_on_host is not None:
            new = self._at_host(step)
            if new is not None:
                return new
        values: dict[str, Any] = {}
        complements: dict[Any, Any] = {}
        nonzero = set()
        scheduled: Any = False  # or what the first value that is no number's own was
        for name in self._moving:
            v = getattr(self, name)
            xs = v if isinstance(v, tuple) else (v,)
            out = []
            for i, x in enumerate(xs):
                if isinstance(x, Complemented):
                    complements[name if not isinstance(v, tuple) else (name, i)] = on_host(
                        x.one_minus)
                    if x.nonzero:
                        nonzero.add(name)
                    x = on_host(x.value)
                elif isinstance(x, DeviceNumber):
                    x = x.read()
                elif callable(x):
                    # a schedule's value, or one read where it is kept (a param group's)
                    scheduled = (getattr(x, "source", None) or scheduled
                                 or "the value of its schedule")
                    x = self._evaluate(x, step)
                out.append(x)
            values[name] = tuple(out) if isinstance(v, tuple) else out[0]
        if not values:
            return self
        facts = (HostFacts(complements, nonzero=frozenset(nonzero)) if complements or nonzero
                 else _NO_FACTS)
        new = assemble(type(self), {**self.fields(), **values}, facts)
        if scheduled:
            at = "the traced step" if _traced(step) else f"step {step}"
            new._validate(f" ({scheduled} at {at})", resolved=True, only=values,
                          foreign=self._foreign)
        return new

    def _at_host(self, step: int) -> Transform | None:
        """:meth:`at` where every value comes out a valid Python float and no pair or device
        number is in play (a torch lr_scheduler's, every step of a small model): the same
        record, without the general path's bookkeeping. None: take the general path, which
        normalises other values or raises naming the step."""
        values = self._host_values(step)
        if values is None:
            return None
        new = assemble(type(self), {**self.fields(), **values}, _NO_FACTS)
        if not self._foreign:
            try:
                new.check()
            except ValueError:
                return None
        return new

    def _host_values(self, step: int) -> dict[str, Any] | None:
        """Each moving field's value at host step ``step`` (:attr:`_read_on_host`); None where
        one is not a valid Python float in its range."""
        values: dict[str, Any] = {}
        assert self._read_on_host is not None
        for name, xs, valid in self._read_on_host:
            if type(xs) is tuple:
                v: Any = tuple(x(step) if callable(x) else x for x in xs)
                if not all(_checked_float(x, valid) for x in v):
                    return None
            else:
                v = xs(step)
                if not _checked_float(v, valid):
                    return None
            values[name] = v
        return values

    def _check_at(self, step: Any) -> None:
        """Raise what :meth:`at` raises where a value at ``step`` is out of this record's own
        ranges; on the host, each moving value read and compared, no record made."""
        if self.fixed or (type(step) is int and self._read_on_host is not None
                          and self._host_values(step) is not None):
            return
        self.at(step)  # (which checks them, and says what is wrong in the record's words)

    @functools.cached_property
    def _read_on_host(self) -> tuple[tuple[str, Any, Interval], ...] | None:
        """For :meth:`_at_host`, each moving field with its value and valid range; None where
        a moving value is a pair or a device number, or where a kept optional number is a JAX
        array (whose block the general path decides)."""
        moving = self._moving
        checked = _checked_fields(type(self))
        out = []
        for name in moving:
            v = getattr(self, name)
            if any(isinstance(x, (Complemented, DeviceNumber)) for x in _flat(v)):
                return None
            out.append((name, v, checked[name].metadata["hyper"]))
        if any(_jax_array(getattr(self, n)) for n in self.optional if n not in moving):
            return None
        return tuple(out)

    @functools.cached_property
    def _foreign(self) -> bool:
        """Whether a number :meth:`at` keeps as it is was traced by JAX: the constraints
        between the numbers of a resolved record cannot then be checked on the host."""
        moving = self._moving
        return any(_traced(x) or isinstance(x, (Complemented, DeviceNumber))
                   for n, v in self.hyperparameters().items() if n not in moving
                   for x in _flat(v))

    @functools.cached_property
    def _moving(self) -> tuple[str, ...]:
        """The hyperparameters :meth:`at` replaces: those holding a schedule or a complemented
        pair, or reading a number where it is."""
        return tuple(name for name, v in self.hyperparameters().items()
                     if any(callable(x) or isinstance(x, (Complemented, DeviceNumber))
                            for x in _flat(v)))

    @functools.cached_property
    def fixed(self) -> bool:
        """Whether :meth:`at` is this record at every step (no schedule, no complemented pair):
        a step then neither resolves nor validates it again."""
        return not self._moving

    @functools.cached_property
    def memo(self) -> dict[Any, Any]:
        """What the layers above derive from this record and keep while it lives (a step's
        plan, a strategy's compiled loop): a record is immutable, so none of it goes stale.
        Not copied with the record."""
        return {}

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "memo"}

    def _evaluate(self, schedule: Any, step: Any) -> Any:
        try:
            return resolve(schedule, step)
        except Exception as e:
            if not _traced(step):
                raise
            raise TypeError(
                f"{self.name}: a schedule could not be traced by jax.jit ({type(e).__name__}: "
                f"{str(e).splitlines()[0]}); write it with array operations (jax.numpy) or "
                "use uniopt.schedules, which trace"
            ) from e

    def fields(self) -> dict[str, Any]:
        """The record's own fields (those its constructor takes), by name."""
        return {n: getattr(self, n) for n in _init_names(type(self))}

    def parts(self) -> tuple[Transform, ...]:
        """The building blocks this transform runs, in order: parts, or transforms whose parts
        are run in their place. Build them with keywords, passing numbers through untouched
        (arithmetic belongs in ``coeffs``)."""
        raise NotImplementedError

    def on(self, name: str) -> bool:
        """Whether the optional block that hyperparameter ``name`` drives is needed (a schedule
        may become non-zero later, and so may a JAX array). Decided on the host: a record
        rebuilt from a JAX state carries the decision, since a traced value cannot be
        compared."""
        assert name in self.optional, f"{self.name}.optional does not list {name!r}"
        if self.host is not None and self.host.on is not None:
            return name in self.host.on
        v = getattr(self, name)
        return callable(v) or on_host(v.value if isinstance(v, Complemented) else v) != 0

    def kept(self, name: str) -> bool:
        """Whether the optional block that number ``name`` drives is kept at a value of 0: it
        came as a JAX array (``optax.inject_hyperparams``'s, set between steps)."""
        return (self.host is not None and self.host.on is not None and name in self.host.on
                and not callable(v := getattr(self, name)) and on_host(v) == 0)

    def nonzero(self, name: str) -> Any:
        """Whether number ``name`` is not 0: a bool where the host knows (a host number; one
        of a JAX state that drives an optional block the host kept for a non-zero value, which
        keeps a jitted step free of a switch per element), else a traced comparison."""
        if self.host is not None and name in self.host.nonzero:
            return True
        return getattr(self, name) != 0

    def one_minus(self, name: str) -> Any:
        """``1 - self.<name>``, computed in double precision on the host (for a number that
        went through ``jax.jit``, the complement the host computed before it went in)."""
        v = getattr(self, name)
        if isinstance(v, Complemented):
            return on_host(v.one_minus)
        c = None if self.host is None else self.host.complements.get(name)
        return 1.0 - on_host(v) if c is None else on_host(c)

    @functools.cached_property
    def flat_parts(self) -> tuple[Part, ...]:
        # rebuilt from a JAX state: the parts are made from the numbers paired with their
        # complements, so each part knows the complement of every number it was given
        source = self if self.host is None or not self.host.complements else self._paired()
        out: list[Part] = []
        for p in source.parts():
            # a part that is a member itself (of a chain) pairs its own numbers too
            own = p is source or p.host is None or not p.host.complements
            out.extend([p] if isinstance(p, PART_KINDS) and own else p.flat_parts)
        return tuple(out)

    def _paired(self) -> Transform:
        assert self.host is not None
        values = {}
        for name, v in self.hyperparameters().items():
            keys = [(name, i) for i in range(len(v))] if isinstance(v, tuple) else [name]
            xs = [self._pair(k, x) for k, x in zip(keys, v if isinstance(v, tuple) else (v,),
                                                   strict=True)]
            values[name] = tuple(xs) if isinstance(v, tuple) else xs[0]
        return assemble(type(self), {**self.fields(), **values}, self.host)

    def _pair(self, key: Any, x: Any) -> Any:
        assert self.host is not None
        c = self.host.complements.get(key)
        if c is None or callable(x):
            return x
        return Complemented(x, c, nonzero=key in self.host.nonzero)

    @functools.cached_property
    def keyed_parts(self) -> tuple[tuple[Part, tuple[str, ...]], ...]:
        """Each part with the state keys of its slots (a whole-tree part: of its tree state)."""
        slot_keys, trees = iter(self.slot_keys), iter(self.tree_layout)
        out = []
        for part in self.flat_parts:
            if isinstance(part, WholeTree):
                keys: tuple[str, ...] = (next(trees),)
            else:
                keys = tuple(next(slot_keys)[0] for _ in part.slots)
            out.append((part, keys))
        return tuple(out)

    @functools.cached_property
    def has_per_leaf(self) -> bool:
        """Whether a part sees whole leaves: the compiled strategies, which run elementwise
        parts, leave such a rule to the reference path."""
        return any(isinstance(p, PerLeaf) for p in self.flat_parts)

    @functools.cached_property
    def tree_layout(self) -> tuple[str, ...]:
        """Names of the whole-tree parts, each with one state entry (``from_optax``...)."""
        return tuple(name for name, p in _numbered(self.flat_parts) if isinstance(p, WholeTree))

    @functools.cached_property
    def layout(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Names of the slot-carrying parts and their slots: what a state must match."""
        return tuple(
            (name, p.slots)
            for name, p in _numbered(self.flat_parts)
            if not isinstance(p, WholeTree) and p.slots
        )

    def slot_shapes_of(self, shape: tuple[int, ...]) -> Mapping[str, tuple[int, ...] | None]:
        """The shape of each slot (by its key in ``State.slots``) of a leaf of ``shape``; None
        where such a leaf keeps none. (Kept in :attr:`memo`: every step checks the slots.)"""
        shape = tuple(shape)
        found = self.memo.get(("slot shapes", shape))
        if found is None:
            found = self.memo["slot shapes", shape] = MappingProxyType(
                {key: s for part, keys in self.keyed_parts if not isinstance(part, WholeTree)
                 for key, s in zip(keys, part.slot_shapes(shape), strict=True)})
        return found

    @functools.cached_property
    def slot_keys(self) -> tuple[tuple[str, str], ...]:
        """Each slot's key in ``State.slots``, ``"<part>.<slot>"``, with the slot's own name
        (torch's name, where torch has the algorithm)."""
        return tuple((f"{part}.{s}", s) for part, slots in self.layout for s in slots)

    # --- the optax protocol: updates are to be *added* -------------------------------------
    def init(self, params: Any) -> Any:  # (a State: base sits below uniopt.state)
        """optax protocol: the state for ``params`` (same as ``uniopt.setup(self, params)``)."""
        return OPTAX_PROTOCOL["init"](self, params)

    def update(self, grads: Any, state: Any, params: Any = None,
               **extra_args: Any) -> tuple[Any, Any]:
        """optax protocol: ``(updates, state)`` where ``params + updates`` is the new params.

        Extra keyword arguments (optax's ``GradientTransformationExtraArgs``: ``value=loss``)
        reach the parts that read them (:class:`~uniopt.reduce_on_plateau`, an optax member
        that takes them); the others ignore them, as optax's transformations do."""
        return OPTAX_PROTOCOL["update"](self, grads, state, params, **extra_args)


def _numbered(parts: tuple[Part, ...]) -> list[tuple[str, Part]]:
    """Each part with its state name: its type's name, ``#1``, ``#2``... for repeats of a kind
    that keeps state."""
    seen: dict[str, int] = {}
    out = []
    for p in parts:
        n = seen[p.name] = seen.get(p.name, -1) + 1
        out.append((p.name if n == 0 else f"{p.name}#{n}", p))
    return out


def assemble(cls: type[Transform], fields: dict[str, Any], host: HostFacts | None) -> Any:
    """A record of type ``cls`` from field values that need no validation (they were validated
    when they first entered a record, or they are traced)."""
    t = object.__new__(cls)
    t.__dict__.update(fields)  # frozen: bypasses __setattr__, as object.__setattr__ would
    t.__dict__["host"] = host
    return t


def held_nonzero(t: Transform, name: str) -> bool:
    """Whether optional number ``name`` of ``t`` is a number the host holds (not a schedule, a
    JAX array or a number of a JAX state) and is not 0: what :attr:`HostFacts.nonzero` lists."""
    v = getattr(t, name)
    return not (callable(v) or _jax_array(v) or isinstance(v, (Complemented, DeviceNumber))
                ) and on_host(v) != 0


def _by_class(make: Callable[[type], Any]) -> Callable[[type], Any]:
    """``make(cls)``, made once per class: what a record's fields are never changes. (A dict,
    not functools.cache, whose wrapper mypy will not give a dataclass type: frozen records
    hash by value.)"""
    made: dict[type, Any] = {}

    def of(cls: type) -> Any:
        found = made.get(cls)
        if found is None:
            found = made[cls] = make(cls)
        return found

    return of


@_by_class
def _checked_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The fields of ``cls`` that :meth:`Transform._validate` checks (numbers, schedules), by
    name, in the record's order."""
    return {f.name: f for f in dataclasses.fields(cls)
            if "hyper" in f.metadata or "static" in f.metadata}


@_by_class
def _init_names(cls: type) -> tuple[str, ...]:
    """The names of the fields the constructor of ``cls`` takes."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


@_by_class
def _hyper_names(cls: type) -> tuple[str, ...]:
    """The names of the fields of ``cls`` that accept a number or a schedule."""
    return tuple(f.name for f in dataclasses.fields(cls) if "hyper" in f.metadata)


# the host facts of a resolved record whose numbers were all the host's own (shared: a record
# never changes its facts)
_NO_FACTS = HostFacts(MappingProxyType({}), nonzero=frozenset())


def _checked_float(x: Any, valid: Interval) -> bool:
    """Whether ``x`` is a Python float that :func:`~uniopt.hyper.check` passes unchanged
    (finite, in ``valid``)."""
    return type(x) is float and math.isfinite(x) and x in valid


def _flat(v: Any) -> tuple[Any, ...]:
    """A hyperparameter's numbers: a tuple's elements, or the value alone."""
    return v if isinstance(v, tuple) else (v,)


def _values(t: Transform) -> list[Any]:
    return [x for v in t.hyperparameters().values() for x in _flat(v)]


def _numbers(t: Transform) -> list[Any]:
    return [x for x in _values(t) if not callable(x)]


class Part(Transform):
    """A building block the engine runs: it names its per-leaf ``slots`` (torch's
    ``state_dict`` names where torch has the algorithm) and computes its coefficients on the
    host once per step."""

    slots: ClassVar[tuple[str, ...]] = ()
    # why its slots cannot be kept in 8 bits (state_dtype="q8"), or None where they can
    no_q8: ClassVar[str | None] = None
    # why its slots must keep the params' own precision (a part that sets the parameter from a
    # slot: FTRL's), refusing a state_dtype narrower than the params, or None where they need not
    exact_state: ClassVar[str | None] = None
    # its input is the step to subtract (p - u), not a direction of either sign
    # (keep_params_nonnegative): through optax's protocol only after a part that makes the step
    reads_step: ClassVar[bool] = False
    # reads the parameter (weight decay): the optax protocol then needs params
    uses_params: ClassVar[bool] = False
    # applies the learning rate, so what comes out is a step, not a direction: under the optax
    # protocol a transform holding such a part hands back the step negated, to be added (optax
    # flips the sign in scale_by_learning_rate); any other hands back its direction as it is,
    # as optax's gradient transformations do
    makes_step: ClassVar[bool] = False
    # averages the parameters the step writes, p - u for the u it is given, and passes u on:
    # a part that changes u goes before it (:class:`chain` refuses one after it); and whether
    # it may come after one (an average, or what only rounds or syncs the written parameter)
    averages: ClassVar[bool] = False
    after_average: ClassVar[bool] = False
    # its arithmetic on the real pairs of a complex leaf's parts is not known to be right (a
    # row and column factor, a matrix iteration, a distance or a norm ratio, a draw of real
    # noise): set-up refuses complex params for any rule or chain that holds it, as for a
    # registry rule whose Info.complex is False
    real_only: ClassVar[bool] = False
    # its arithmetic on a complex leaf is that of the complex numbers, not of the real pairs of
    # their parts taken one by one as the engine hands them to the other parts (a mean or a norm
    # over some of the leaf's axes, a count of its elements): a per-leaf part's ``apply`` gets a
    # complex leaf (p, u and its slots) as complex arrays, an elementwise part's
    # ``norm_coeffs`` counts a complex number as one element. A step of such pairs takes the
    # reference path (the compiled strategies see the pairs only)
    complex_aware: ClassVar[bool] = False
    # the functions of the array API's optional linalg extension its step calls ("eigh"):
    # set-up refuses a library whose namespace lacks one (dask's has no eigh), where the
    # first step raised an AttributeError from inside the part
    linalg: ClassVar[tuple[str, ...]] = ()
    # the dtypes its step casts to by name (Muon's ns_dtype, "bfloat16"): set-up refuses a
    # library whose namespace lacks one (NumPy's has no bfloat16), where the first step raised
    casts_to: ClassVar[tuple[str, ...]] = ()
    # the step's extra arguments it must be handed ("hvp", "value", "grad", "value_fn": see
    # uniopt.update): a class whose step hands fewer (uniopt.torch.Optimizer's, the closure's
    # loss alone) refuses it when made, a bare part in a chain or combinator too, where the
    # first step failed
    step_args: ClassVar[tuple[str, ...]] = ()

    def parts(self) -> tuple[Part, ...]:
        return (self,)

    def slot_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...] | None, ...]:
        """Each slot's shape for a leaf of ``shape``: the leaf's own, unless a part keeps
        other statistics (Adafactor's row and column factors); None where a leaf of this shape
        keeps no such slot (Adafactor's ``variance`` of a matrix)."""
        return (tuple(shape),) * len(self.slots)

    def init_slots(self, p: Any, xp: Any) -> tuple[Any, ...]:
        shape = tuple(p.shape)
        # a slot of another shape (Adafactor's factors) cannot take a sharded parameter's
        # layout: as a jitted step lays it out on its mesh (backend.placed_slot), whole on an
        # explicit one, as torch keeps it beside a DTensor
        mesh = backend.mesh_of(p)
        return tuple(
            None if s is None else xp.zeros_like(p) if s == shape
            else backend.placed_slot(xp.zeros(s, dtype=p.dtype), p) if mesh is not None
            else xp.zeros(s, dtype=p.dtype, device=backend.device(p))
            for s in self.slot_shapes(shape)
        )

    def coeffs(self, step: Any) -> tuple[Any, ...]:
        """The numbers the kernel needs at ``step`` (self is already resolved), as a
        ``NamedTuple`` whose fields name the quantities of the math."""
        return ()

    def steady(self) -> int | None:
        """The first step from which :meth:`coeffs` gives the same numbers at every step, or
        None where they move with the step (a bias correction, a decaying lr): a compiled step
        bound to its leaves then makes them once, not at every step (:func:`steady_from`).
        Declared, not found: a record's numbers are read only by its own ``coeffs``."""
        return None


def steady_from(part: Part) -> int | None:
    """``part.steady()``, taken at its word only where the class that says it computes the
    coefficients too, or inherits them from a class above it (a subclass that computes them
    anew and says nothing, a user's block made from one of ours, is taken to move), and where
    the part holds only Python numbers (not an array a caller may write in place)."""
    mro = type(part).__mro__
    said = next(c for c in mro if "steady" in vars(c))
    made = next(c for c in mro if "coeffs" in vars(c))
    if not issubclass(said, made) or any(type(x) not in (int, float, bool)
                                         for x in _values(part)):
        return None
    return part.steady()


def _to_float16(x: float) -> float:
    """``x`` rounded to float16 (IEEE round to nearest even), as a Python float."""
    return float(np.float16(x))


@dataclasses.dataclass(frozen=True)
class Elementwise(Part):
    """Acts on each element on its own: ``kernel(xp, c, p, u, *slots) -> (u, *slots)``."""

    # a part that needs the 2-norm of its input over every leaf (clip_by_global_norm), or with
    # norm_per_leaf over each leaf on its own (clip_by_norm): the engine computes it in one
    # extra read pass (on DTensor shards, every rank's sums added: uniopt.interop.dtensor) and
    # asks norm_coeffs for the coefficients, per leaf where per leaf
    needs_norm: ClassVar[bool] = False
    norm_per_leaf: ClassVar[bool] = False

    def norm_coeffs(self, norm: Any, size: Any) -> Any:
        """For ``needs_norm`` parts: the coefficients, given the norm of the input and the
        number of elements it is over. Per leaf, the compiled path asks once for every leaf,
        ``norm`` and ``size`` then float64 NumPy arrays, and expects a record of arrays."""
        raise NotImplementedError

    # a static method or a function defined at a module's top level (so the compiled loop can
    # import it); a flag that changes the arithmetic may make it a property choosing between two
    kernel: ClassVar[Kernel]

    @functools.cached_property
    def by_dtype(self) -> bool:
        """Whether the coefficients depend on the dtype of the leaf they meet (the engine then
        asks :meth:`for_dtype` for each): Optimisers.jl's float16 eps floor, a part's
        ``eps_floor16`` option. Read from the fields, not set beside them at construction: a
        record rebuilt without its constructor (``jax.jit``'s, a resolved schedule's) keeps
        it. (Cached in the record: the compiled step reads it every step.)"""
        return bool(getattr(self, "eps_floor16", False))

    def for_dtype(self, c: Any, dtype: Any) -> Any:
        """The coefficients ``c`` for leaves of ``dtype``. With ``eps_floor16``, float16 leaves
        take Optimisers.jl's ``_eps``: ``max(Float16(1e-7), Float16(eps))``, 0 staying 0, so a
        float16 denominator never rounds eps away; other dtypes keep ``c``."""
        if not self.by_dtype or str(dtype) not in ("float16", "torch.float16"):
            return c
        if isinstance(c.eps, (int, float)):
            return c._replace(eps=0.0 if c.eps == 0 else max(2.0**-23, _to_float16(c.eps)))
        xp = aac.array_namespace(c.eps)  # a traced or device value: the same, as arrays
        e16 = xp.astype(xp.astype(c.eps, xp.float16), c.eps.dtype)
        return c._replace(eps=xp.where(c.eps == 0, c.eps, xp.maximum(e16, 2.0**-23)))

    # The last part of a rule may write the parameter itself, rounded in its peer's order:
    # torch's ``p.add_(u, alpha=-lr)`` is one fused multiply-add where ``p - lr*u`` rounds
    # twice. ``finish(xp, c, p, u, *slots) -> p_new`` takes the part's *input* ``u`` and its new
    # slots. Where the part ends the rule, the engine (every path) writes finish's value instead
    # of ``p - kernel's u``; elsewhere (inside a chain, a combinator's member, the optax
    # protocol) the kernel's ``u`` is the update, the same up to that last rounding.
    finish: ClassVar[Kernel | None] = None


@dataclasses.dataclass(frozen=True)
class PerLeaf(Part):
    """Sees one whole leaf: ``apply(xp, c, p, u, *slots) -> (u, *slots)`` on arrays, free to
    reduce over the leaf or reshape it (row/column statistics, a per-tensor norm, a matrix
    iteration). The reference path runs it leaf by leaf; a compiled strategy runs the
    elementwise parts around it. On shards of DTensors (FSDP2, tensor parallel) the engine
    all-gathers each leaf whole on every rank (``p``, ``u`` and the slots shaped as ``p``; other
    slots are whole already), runs ``apply`` on it and keeps each rank's shard of the results
    (:mod:`uniopt.interop.dtensor`)."""

    # ``apply`` takes leaves stacked along a new leading axis (a batch of one or more, the
    # trailing axes each leaf's own): the engine then stacks the leaves of one shape and dtype
    # into one call (Muon on a transformer's identical blocks: one batched matmul chain)
    batched: ClassVar[bool] = False

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        """Why this part cannot update a leaf of ``shape`` (Muon: it is not a matrix), or None.
        Asked at set-up and at every step, before anything is written."""
        return None

    def leaf_coeffs(self, c: Any, shape: tuple[int, ...]) -> Any:
        """The coefficients for a leaf of ``shape``, from the step's ``c`` (Muon's learning
        rate, adjusted to the matrix's aspect); the same for every leaf of one shape."""
        return c

    @staticmethod
    def apply(xp: Any, c: Any, p: Any, u: Any, *slots: Any) -> tuple[Any, ...]:
        raise NotImplementedError

    # As an elementwise part's: the last part of a rule may write the parameter itself, in its
    # peer's order (Adafactor's decay, then ``p.add_(update, alpha=-alpha/denom)``).
    # ``finish(xp, c, p, u, *slots) -> (p_new, *slots)`` is ``apply``'s twin, called in its
    # place (batched alike) where the part ends the rule; elsewhere ``apply``'s ``u`` is the
    # update, the same up to the last rounding.
    finish: ClassVar[Callable[..., tuple[Any, ...]] | None] = None


@dataclasses.dataclass(frozen=True)
class WholeTree(Part):
    """Sees every leaf's ``u`` at once, as a tree shaped like the params (an optax
    transformation, a random generator's draw): the engine runs the parts before it on every
    leaf, hands it the tree with the step's coefficients, and keeps its state, any pytree, in
    ``State.tree_states``."""

    # the array libraries it runs on (optax: JAX, and NumPy through JAX); None: any
    libraries: ClassVar[tuple[str, ...] | None] = None

    # reads the step's extra arguments (the loss, ``value=``, of ``uniopt.update`` and of the
    # optax protocol): ``apply_tree`` receives them as keywords
    reads_value: ClassVar[bool] = False

    # sees complex leaves as they are, where the engine hands every other part their real
    # pairs: a combinator routes them to members that step them as pairs, an optax
    # transformation keeps optax's own arithmetic
    takes_complex: ClassVar[bool] = False
    # the entries of its state (a dict) that hold one array per leaf, shaped as the leaf:
    # checked against the params at every step, as slots are
    like_params: ClassVar[tuple[str, ...]] = ()
    # evaluates the objective over every leaf (a line search: value_fn at trial params, the
    # whole tree's grad=): no combinator that routes leaves (partition, masked) may hold it
    whole_objective: ClassVar[bool] = False
    # whether its step reads every leaf at once (a sum or a norm over the tree, a test of
    # every gradient, the loss); False where each leaf steps as in any share of the leaves
    # (ZeRO's: uniopt.torch refuses the others there), its tree-wide numbers none but the
    # hyperparameters' and the step count's
    reads_every_leaf: ClassVar[bool] = True
    # the dtype of :meth:`state_shapes`' arrays: "tree", that of the leaf as set-up hands it
    # to init_tree (the wider of its own and setup's state_dtype: engine.tree_leaves); a
    # combinator, handed the params as they are, "leaf" (the leaf's own) or "state" (setup's
    # state_dtype where one is given, else the leaf's)
    arrays_dtype: ClassVar[str] = "tree"

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...] | None:
        """The shapes of the arrays its state keeps for a leaf of ``shape`` (Prodigy's four
        moments and copies, each shaped as the leaf), beside a few numbers for the whole tree
        (an estimate, a count, a generator's state); a combinator's own, its members' states
        counted on the leaves each takes. What :func:`uniopt.memory.footprint` counts; None
        where the part does not say (an optax member's state, L-BFGS's history, made as it
        steps), and footprint then refuses the rule."""
        return None

    def init_tree(self, params: Any) -> Any:
        """The state for the params tree."""
        raise NotImplementedError

    def check_tree(self, state: Any, leaves: list[Any]) -> str | None:
        """What makes ``state`` (one loaded from a checkpoint) no state of this part for params
        ``leaves``, or None: what a checkpoint's per-leaf shapes cannot tell."""
        return None

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any,
                   **extra: Any) -> tuple[Any, Any]:
        """``(u, state)`` for the tree ``u`` of incoming updates (to be subtracted), with the
        step's coefficients ``c`` (:meth:`~Part.coeffs`); a part that ``reads_value`` also
        takes the step's extra arguments as keywords."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Minimizer(WholeTree):
    """A whole-tree part that evaluates the objective itself: it is handed the params as one
    flat vector ``x`` (every leaf raveled, in :func:`uniopt.trainables` order) and
    ``evaluate(x) -> (loss, flat_grad)``, and returns the new ``x``. It runs only through
    :func:`uniopt.minimize_step` (which supplies the closure) and is its rule's only part:
    a part before it would see only the first gradient, one after it nothing.

    ``minimize(xp, x, state, evaluate) -> (x, state, loss)``: ``loss`` is the first
    evaluation's, as the closure returned it (torch's ``step(closure)`` returns it). A dict
    ``state`` is the minimizer's to write its entries into as it goes (never the arrays they
    hold): an in-place step hands it the state's own, so a closure reads them mid-step, and
    puts them back if the step fails; a pure step hands it a copy."""

    def minimize(self, xp: Any, x: Any, state: Any,
                 evaluate: Callable[[Any], tuple[Any, Any]]) -> tuple[Any, Any, Any]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Combinator(WholeTree):
    """A whole-tree part that runs whole rules of its own, its ``members``, each with its own
    :class:`~uniopt.state.State` kept in this part's tree state: on parts of the tree
    (:func:`uniopt.partition`), once every few steps (:func:`uniopt.accumulate`), or only when
    a test passes (:func:`uniopt.skip_nonfinite`). Inside a chain it is handed the updates
    like any whole-tree part; as a rule's only part it takes the step itself
    (:meth:`run`), so each member steps its leaves on the fast path.

    A member is reached as ``"<name>.<hyperparameter>"`` by :func:`uniopt.adjust`. The
    implementations run the engine on their members, so they live above it (uniopt.combine).
    """

    takes_complex: ClassVar[bool] = True
    # (reads_every_leaf: its own step, beside what its members read; False where it routes
    # each leaf to a member or counts steps)

    @property
    def inner(self) -> dict[str, Transform]:
        """The members, by name."""
        raise NotImplementedError

    def with_inner(self, name: str, member: Transform) -> Combinator:
        """This record with member ``name`` replaced (by :func:`uniopt.adjust`)."""
        raise NotImplementedError

    def init_tree(self, params: Any, state_dtype: str | None = None) -> Any:
        """Each member's state for its leaves (slots in ``state_dtype`` where given)."""
        raise NotImplementedError

    def placeholder_tree(self, params: Any, member: Callable[[Transform], Any]) -> Any:
        """Its tree state for the placeholder ``params`` of ``optax.tree.map_params``: the
        placeholder where it keeps one array per leaf, 0 for any other leaf, ``member(m)``
        for each member ``m``'s state."""
        raise TypeError(f"optax.tree.map_params: {self.name} cannot mark its state for optax's "
                        "placeholder; map the state itself with jax.tree.map")

    def leaves_of(self, treedef: Any, leaves: list[Any]) -> dict[str, tuple[int, ...]]:
        """The leaves (positions) each member's state covers: every one, unless the
        combinator routes them (:func:`uniopt.partition`)."""
        return {name: tuple(range(len(leaves))) for name in self.inner}

    def run(self, tree: Any, treedef: Any, params: list[Any], grads: list[Any],
            inplace: bool, **extra: Any) -> tuple[Any, Any]:
        """The step as a rule's only part: ``(tree, new_params)`` for the leaves of a params
        tree of structure ``treedef`` (``new_params`` a list, None in place). The inputs
        are checked; nothing is written yet."""
        raise NotImplementedError


PART_KINDS = (Elementwise, PerLeaf, WholeTree)


def global_norm(part: Any) -> bool:
    """Whether ``part`` is an elementwise part that scales by a norm over every leaf."""
    return isinstance(part, Elementwise) and part.needs_norm and not part.norm_per_leaf


def every_leaf_parts(rule: Transform) -> list[Any]:
    """The parts of ``rule``, its combinators' members' included, whose step reads every
    parameter of a group at once: a global norm, a whole-tree part (Prodigy's estimate, a
    line search), a combinator that tests or sums over every leaf (skip_nonfinite); not one
    that routes each leaf to a member or counts steps (partition, masked, accumulate), nor a
    whole-tree part that steps each leaf alone (schedule-free, GaLore: ``reads_every_leaf``).
    ZeRO-1 steps each rank's share of the parameters alone: uniopt.torch refuses such a rule
    there, and :func:`uniopt.memory.footprint` does."""
    out: list[Any] = []
    for part in rule.flat_parts:
        if isinstance(part, Combinator):
            if part.reads_every_leaf:
                out.append(part)
            for member in part.inner.values():
                out += every_leaf_parts(member)
        elif (isinstance(part, WholeTree) and part.reads_every_leaf) or global_norm(part):
            out.append(part)
    return out


def members(t: Transform, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Transform]]:
    """The transforms of ``t`` with nested chains and combinators opened (``t`` itself if it
    is neither), each with the positions or names :func:`uniopt.adjust` names it by
    (``"1.lr"``, ``"decay.lr"``)."""
    if isinstance(t, Combinator):
        return [m for k, x in t.inner.items() for m in members(x, (*path, k))]
    if not isinstance(t, chain):
        return [(path, t)]
    return [m for i, x in enumerate(t.transforms) for m in members(x, (*path, i))]


def declared(t: Transform, what: Literal["step_args", "linalg", "casts_to"]) -> tuple[str, ...]:
    """What the parts of ``t`` declare, each once, in order: the step's extra arguments they
    must be handed (:attr:`Part.step_args`), the array API's linalg functions they call
    (:attr:`Part.linalg`) or the dtypes they cast to by name (:attr:`Part.casts_to`); chains
    and combinators opened (:func:`members`). The registry's
    entries, set-up's check of an array-API library and uniopt.torch's refusals read it."""
    return tuple(dict.fromkeys(x for _, m in members(t) for p in m.flat_parts
                               for x in getattr(p, what)))


def reads_loss(t: Transform) -> str | None:
    """The name of the first member of ``t`` (:func:`members`) whose step reads the loss
    (``value=`` among its parts' :attr:`~Part.step_args`: Polyak's, Momo's), or None."""
    for _, m in members(t):
        if "value" in declared(m, "step_args"):
            return m.name
    return None


def makes_step(t: Transform) -> bool:
    """Whether what ``t`` hands out is a step rather than a direction (under the optax
    protocol a step is handed back negated, to be added): a rule, a whole optimizer, always
    does, wherever its parts apply the learning rate; a chain or combinator does when a member
    does; a part when it says so (``scale_by_lr``)."""
    return any(isinstance(m, Rule) or m.makes_step for _, m in members(t))  # type: ignore[attr-defined]


FRAMEWORKS = ("torch", "optax", "keras", "flux", "paper")


@dataclasses.dataclass(frozen=True)
class Info:
    """What the registry (:mod:`uniopt.registry`) and the generic test suite know about a
    rule, as data: a rule declares it once, as its ``info``, and every generic test, the
    README's rule table and ``uniopt rules`` read it, so nothing is special-cased by name.

    ``family``: a short word the table groups by ("sgd", "adaptive", "adam", "sign", ...).
    ``paper``: the reference, "Authors (year)". ``references``: the implementations the parity
    tests hold it to, as the peer's import path ("torch.optim.Adam", "optax.lion",
    "lion_pytorch.Lion"), or "formula" where the test writes the paper's algorithm itself.
    ``example``: hyperparameters with which the rule solves the generic problems within
    ``budget`` steps (tests/test_registry.py: the 10-D quadratic of curvatures 1..100 from 0 to
    1e-4 of its initial loss, and Rosenbrock from (-1.5, 2) to a loss of 0.1; a value may be a
    schedule, e.g. a warm-up). ``needs_closure``: the
    step evaluates the objective itself (L-BFGS, SAM). ``complex``: takes complex parameters
    (as pairs of real numbers). ``backends``: the array libraries it runs on. ``rtol``: the
    parity tolerance in float64 against ``references`` (1e-12 unless a reason is written next
    to a larger one). ``jit``: the example's step traces under ``jax.jit`` (False: the step
    computes something on the host from the step before, and refuses to be traced with a
    TypeError that says so). ``free_slots``: slots that the rule's solver fixes only up to a
    choice of its own (an eigenbasis's signs: LAPACK, torch and XLA choose differently),
    compared across libraries through the params they produce, not entry by entry.

    What the step must be handed beside the gradients, and the array API's linalg functions it
    calls, are not written here: its parts declare them (:attr:`Part.step_args`,
    :attr:`Part.linalg`), a part in a chain built by hand too, and the registry's entry reads
    them from the example's parts (:func:`declared`).
    """

    family: str
    paper: str
    references: tuple[str, ...] = ()
    example: dict[str, Any] = dataclasses.field(default_factory=dict)
    budget: int = 300
    needs_closure: bool = False
    complex: bool = True
    backends: tuple[str, ...] = ("numpy", "torch", "jax", "array_api")
    rtol: float = 1e-12
    jit: bool = True
    free_slots: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ByFields:
    """A convention's default that depends on other fields the caller gave: Optimisers.jl's
    ``Descent``, ``Momentum`` and ``Nesterov`` are one uniopt rule, each with its own
    default step size. ``pick(given)`` is the value; ``text`` says it on the conventions
    page."""

    pick: Callable[[Mapping[str, Any]], Any]
    text: str

    def __repr__(self) -> str:
        return self.text


def _convention_defaults(cls: Any, given: dict[str, Any]) -> dict[str, Any]:
    """The values ``cls``'s convention (the one in ``given``, else its field's default) sets
    for the fields ``given`` leaves out; {} for a rule with no conventions."""
    table = getattr(cls, "conventions", None)
    if not table:
        return {}
    name = given.get("convention", cls.__dataclass_fields__["convention"].default)
    if not isinstance(name, str) or name not in table:  # (a list is unhashable)
        raise (ValueError if isinstance(name, str) else TypeError)(
            f"{cls.__name__}: convention must be one of {', '.join(map(repr, table))}, "
            f"got {name!r}"
        )
    return {k: v.pick(given) if isinstance(v, ByFields) else v
            for k, v in table[name].items() if k not in given}


class _ConventionBound(inspect.BoundArguments):
    """Bound arguments whose defaults are the bound convention's (see _ConventionSignature)."""

    __slots__ = ()

    def apply_defaults(self) -> None:
        sig = self.signature
        assert isinstance(sig, _ConventionSignature)
        # given: what was bound, and what a functools.partial fixed (its convention among
        # them; a value equal to the field's default too, torch's for another convention)
        given = {k: sig.parameters[k].default for k in sig.fixed} | self.arguments
        try:
            self.arguments.update(_convention_defaults(sig.rule, given))
        except ValueError:
            pass  # an unknown convention: the constructor says so, as for a direct call
        super().apply_defaults()


class _ConventionSignature(inspect.Signature):
    """A rule's constructor signature, whose ``bind(...).apply_defaults()`` fills in the
    defaults of the convention bound, not the fields' own (torch's): optax.inject_hyperparams
    binds a call and applies the defaults before it builds the rule from them, every field
    then given, so a default it applied by the signature alone would overrule the
    convention."""

    __slots__ = ("rule", "fixed")
    rule: Any  # the rule's class
    # the parameters whose default a functools.partial set, by name
    fixed: frozenset[str]
    # (inspect's own hook: bind and bind_partial make their bound arguments of this class)
    _bound_arguments_cls = _ConventionBound

    def replace(self, **changes: Any) -> _ConventionSignature:
        # functools.partial's signature is a replaced one, each value it fixes a parameter's
        # new default (told by identity: an equal value is fixed too)
        new = super().replace(**changes)
        new.rule = self.rule
        new.fixed = self.fixed | {k for k, q in new.parameters.items() if k in self.parameters
                                  and q.default is not self.parameters[k].default}
        return new

    def __reduce__(self) -> Any:  # (pickle and copy keep the rule and the fixed names)
        cls, args, state = cast(tuple[Any, Any, dict[str, Any]], super().__reduce__())
        return cls, args, {**state, "rule": self.rule, "fixed": self.fixed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.rule, self.fixed = state.pop("rule"), state.pop("fixed")
        super().__setstate__(state)  # type: ignore[misc]


class _WithConventions(type):
    """Builds a rule with its convention's defaults for the fields the caller left out: a
    convention is a named set of the rule's own explicit options and hyperparameters (its
    ``conventions`` table), never a hidden code path. A field given, by name or by position,
    keeps the caller's value; a record rebuilt field by field (``dataclasses.replace``) keeps
    every value it had."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if getattr(cls, "conventions", None):
            fields = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
            given = dict(zip(fields, args, strict=False)) | kwargs  # by position or by name
            kwargs = {**_convention_defaults(cls, given), **kwargs}
        try:
            return super().__call__(*args, **kwargs)
        except TypeError as e:
            known = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
            unknown = [k for k in kwargs if k not in known]
            if not unknown or "unexpected keyword argument" not in str(e):
                raise
            # a port's spelling (optax's and keras's learning_rate) or a typo: the names it takes
            name = unknown[0]
            port = next((say for field, say in _PORTED.get(name, ()) if field in known), None)
            hint = ("; the learning rate is lr" if name == "learning_rate" and "lr" in known
                    else "; " + port.format(rule=cls.__name__) if port
                    else did_you_mean(name, known))
            raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {name!r}{hint} "
                            f"(its fields are {sorted(known)})") from None

    @property
    def __signature__(cls) -> inspect.Signature:
        # the constructor's, not this __call__'s (*args, **kwargs): callers that bind
        # arguments by signature (optax.inject_hyperparams) see the fields, and the defaults
        # they apply are the convention's
        sig = inspect.signature(cls.__init__)  # type: ignore[misc]
        if not getattr(cls, "conventions", None):
            return sig.replace(parameters=list(sig.parameters.values())[1:])
        ours = _ConventionSignature(list(sig.parameters.values())[1:])
        ours.rule, ours.fixed = cls, frozenset()
        return ours


# optax's and keras's names of numbers uniopt's rules name as torch does: the fields each may
# be, in the order tried, and how to say so (difflib took optax's rmsprop decay for
# decay_form, and sent optax's b1 nowhere)
_BETAS = "{rule} takes the pair as betas=(b1, b2)"
_PORTED: dict[str, tuple[tuple[str, str], ...]] = {
    **dict.fromkeys(("b1", "beta_1", "beta1"), (("betas", _BETAS), ("b1", "{rule}'s is b1"))),
    **dict.fromkeys(("b2", "beta_2", "beta2"), (("betas", _BETAS), ("b2", "{rule}'s is b2"))),
    "decay": (("alpha", "optax's rmsprop decay is {rule}'s alpha"),),
    "rho": (("alpha", "keras's RMSprop rho is {rule}'s alpha"),),
    "epsilon": (("eps", "{rule}'s epsilon is eps"),),
}


@dataclasses.dataclass(frozen=True)
class Rule(Transform, metaclass=_WithConventions):
    """A whole optimizer: a record of the user's hyperparameters and a recipe of parts.

    A rule that several frameworks write differently has a ``convention`` field and a
    ``conventions`` table: for each framework it names (see :data:`FRAMEWORKS`), the values of
    the rule's explicit options (``eps_in_sqrt``, ``momentum_form``, ...) and defaults that
    reproduce that framework's rule. ``adagrad(convention="keras")`` is ``adagrad`` with keras's
    options and defaults; any of them given by the caller is kept.
    """

    # framework -> {field: value}; "torch" (the field defaults) first where torch has the rule
    conventions: ClassVar[dict[str, dict[str, Any]]] = {}
    # what the registry knows about the rule (uniopt.registry); None: not listed there
    info: ClassVar[Info | None] = None


def _averaging_last(members: list[Transform]) -> None:
    """Refuse a member after one that averages the params (ema, polyak): it averages ``p - u``
    for the ``u`` it is given, the param the step writes only where nothing changes ``u``
    after it. (optax's ``ema`` of the updates, which a port may put first, is another
    transform.)"""
    flat: list[Transform] = []

    def add(ms: Any) -> None:
        for m in ms:
            if isinstance(m, chain):
                add(m.transforms)
            else:
                flat.append(m)

    add(members)
    averages = [getattr(m, "averages", False) for m in flat]  # (a part's class flags)
    first = averages.index(True) if True in averages else len(flat)
    after = [m for m in flat[first + 1:] if not getattr(m, "after_average", False)]
    if after:
        raise ValueError(
            f"chain: {flat[first].name} averages the parameters the step writes, so what changes "
            f"the update goes before it; got {after[0].name} after it (optax's ema of the "
            f"updates is uo.ema_momentum_bias_corrected(decay, nesterov=False))")


def adopted(owner: str, what: str, t: Any) -> Transform:
    """``t`` as a member of ``owner``: a uniopt transform, or an optax transformation adopted;
    else a TypeError in ``owner``'s words naming the member (``what``), a rule's class told to
    be called."""
    if not isinstance(t, Transform) and "adopt" in OPTAX_PROTOCOL:
        t = OPTAX_PROTOCOL["adopt"](t) or t
    if isinstance(t, Transform):
        return t
    if isinstance(t, type) and issubclass(t, Transform):
        raise TypeError(f"{owner}: {what} is the class {t.__name__}; call it: {t.__name__}()")
    raise TypeError(f"{owner}: {what} is neither a uniopt transform nor an optax "
                    f"GradientTransformation: {t!r}")


@dataclasses.dataclass(frozen=True, init=False)
class chain(Transform):
    """Apply transforms one after another; the output of each is the input of the next.

    ``chain(weight_decay(5e-4), adam(lr=1e-3))`` is torch's ``Adam(weight_decay=5e-4)``.
    Hyperparameters of the members are reached by name through :func:`uniopt.adjust`. An optax
    ``GradientTransformation`` is a member as :func:`uniopt.from_optax` wraps it.
    """

    transforms: tuple[Transform, ...]

    def __init__(self, *transforms: Any) -> None:
        members = [adopted("chain", f"argument {i}", t) for i, t in enumerate(transforms)]
        _averaging_last(members)
        object.__setattr__(self, "transforms", tuple(members))
        object.__setattr__(self, "host", None)

    def parts(self) -> tuple[Transform, ...]:
        return self.transforms

    def replace(self, **changes: Any) -> Transform:
        return chain(*changes.get("transforms", self.transforms))

    def __repr__(self) -> str:  # (as it is called)
        return f"chain({', '.join(map(repr, self.transforms))})"



