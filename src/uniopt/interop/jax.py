"""A State as a JAX pytree, so ``jax.jit(uniopt.update)`` carries it.

The leaves are the step, the slots, the whole-tree states and one array of the rule's numbers,
each number followed by its complement ``1 - x`` computed on the host in double precision
(under ``jax.jit`` without x64 a traced number is float32, where ``1 - 0.999`` keeps two
digits). One array, whatever the rule: a jitted step's arguments do not grow with its
hyperparameters (each argument costs microseconds a call). The rule's skeleton (types, flags,
schedules, which optional blocks exist) is static: a run compiles once, and again only when
:func:`uniopt.adjust` changes the skeleton (a schedule for a number, or a value to or from zero
where zero removes a block).

A rule rebuilt from the leaves is assembled without validation (the values were checked before
they went in, and may be traced) and keeps the complements and the block decisions as
:class:`~uniopt.hyper.HostFacts`. Inside ``jax.jit`` its numbers are elements of the traced
array; coming out, they are :class:`~uniopt.hyper.DeviceNumber` s of the output array, read only
when used on the host, so a jitted loop never reads a value back from the device, and the next
step passes the array on as it came.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import backend, quant
from ..backend import is_variable, placed, placement
from ..base import Transform, assemble, chain, held_nonzero
from ..hyper import Complemented, DeviceNumber, HostFacts, _traced, on_host
from ..state import State


def _members_of(v: Any) -> tuple[Transform, ...] | None:
    if isinstance(v, Transform):
        return (v,)
    if isinstance(v, tuple) and v and all(isinstance(m, Transform) for m in v):
        return v
    return None


def flatten_rule(t: Transform) -> tuple[list[Any], Any]:
    """``t``'s numbers (its members' too), each followed by its complement, and a hashable
    skeleton of the rest: two rules with equal skeletons have the same parts and slots."""
    leaves: list[Any] = []
    fields = []
    known = t.host.complements if t.host is not None else {}
    for f in dataclasses.fields(t):
        if not f.init:
            continue
        v = getattr(t, f.name)
        members = _members_of(v)
        if members is not None:
            subs = [flatten_rule(m) for m in members]
            for sub_leaves, _ in subs:
                leaves += sub_leaves
            fields.append((f.name, "member" if isinstance(v, Transform) else "members",
                           tuple(sk for _, sk in subs)))
        elif "hyper" in f.metadata:
            xs = v if isinstance(v, tuple) else (v,)
            for i, x in enumerate(xs):
                if isinstance(x, Complemented):  # (a part made by a rule rebuilt from a state)
                    leaves += [x.value, x.one_minus]
                elif not callable(x):
                    c = known.get(f.name if not isinstance(v, tuple) else (f.name, i))
                    leaves += [x, 1.0 - x if c is None else c]
            fields.append((f.name, "tuple" if isinstance(v, tuple) else "one",
                           tuple(x if callable(x) else None for x in xs)))
        else:
            fields.append((f.name, "fixed", v))
    on = frozenset(n for n in t.optional if t.on(n))
    if t.host is not None and t.host.on is not None:  # decided before: what it knew then
        nonzero = t.host.nonzero & on
    else:
        nonzero = frozenset(n for n in on if held_nonzero(t, n))
    return leaves, (type(t), tuple(fields), on, nonzero)


def unflatten_rule(skeleton: Any, leaves: Any) -> Transform:
    """The inverse of :func:`flatten_rule`."""
    rule, _ = _builder(skeleton)(leaves, 0)
    return rule


@functools.lru_cache(maxsize=256)
def _builder(skeleton: Any) -> Callable[[Any, int], tuple[Transform, int]]:
    """A function building the record ``skeleton`` describes from ``numbers[k:]``, returning it
    and the next ``k``: the skeleton is read once, and a state coming out of every jitted step
    is rebuilt with no more than the assignments (JAX requires skeletons to be hashable)."""
    cls, spec, on, nonzero = skeleton
    fixed: dict[str, Any] = {}
    plan: list[tuple[str, str, Any]] = []
    for name, kind, sub in spec:
        if kind == "fixed":
            fixed[name] = sub
        elif kind in ("member", "members"):
            plan.append((name, kind, tuple(_builder(m) for m in sub)))
        else:
            plan.append((name, kind, sub))

    def build(numbers: Any, k: int) -> tuple[Transform, int]:
        values = dict(fixed)
        complements: dict[Any, Any] = {}
        for name, kind, sub in plan:
            if kind == "one":
                x = sub[0]
                if x is None:
                    x, complements[name] = numbers[k], numbers[k + 1]
                    k += 2
                values[name] = x
            elif kind == "tuple":
                xs = []
                for i, x in enumerate(sub):
                    if x is None:
                        x, complements[(name, i)] = numbers[k], numbers[k + 1]
                        k += 2
                    xs.append(x)
                values[name] = tuple(xs)
            else:
                members = []
                for b in sub:
                    m, k = b(numbers, k)
                    members.append(m)
                values[name] = members[0] if kind == "member" else tuple(members)
        if cls is chain:
            return chain(*values["transforms"]), k
        return assemble(cls, values, HostFacts(complements, on, nonzero)), k

    return build


def _pack(values: list[Any]) -> Any:
    """The numbers as one array: NumPy where every one is on the host (a JAX state hands jit
    them put on its device, :func:`_flatten_state`), else one JAX array built from them
    (inside a trace, or after an adjust)."""
    if not any(hasattr(v, "dtype") or isinstance(v, DeviceNumber) for v in values):
        return np.asarray(values, dtype=np.float64)
    import jax.numpy as jnp

    return jnp.stack([jnp.asarray(on_host(v), dtype=jnp.result_type(float)) for v in values])


def _numbers(packed: Any, n: int) -> list[Any]:
    """The numbers in ``packed``: traced elements inside a trace, else device numbers."""
    if _traced(packed):
        return [packed[i] for i in range(n)]
    return [DeviceNumber(packed, i) for i in range(n)]


def register_state() -> None:
    """Make State a JAX pytree (and a flax-serialisable state) once JAX (flax) is imported:
    called when uniopt is imported and at every set-up, so whatever the leaves (JAX arrays,
    flax ``Variable``s, NNX ``Param``s) a state meets JAX knowing its type, and JAX is never
    imported by uniopt itself."""
    # (a key that holds None is a library blocked from import, as a test or a user blocks one)
    if sys.modules.get("jax") is not None:
        _register_jax()
    if sys.modules.get("flax") is not None:
        _register_flax()


class _Static:
    """A state's static part, beside its leaves: the rule's skeleton and count of numbers, the
    params' structure, the state dtype. JAX hashes it at every jitted call (the call's
    signature), so the hash is computed once; a state coming out of a step hands on the one
    it came in with, which then compares by identity."""

    __slots__ = ("skeleton", "treedef", "state_dtype", "_hash")

    def __init__(self, skeleton: Any, treedef: Any, state_dtype: str | None) -> None:
        self.skeleton, self.treedef, self.state_dtype = skeleton, treedef, state_dtype
        self._hash = hash((skeleton, treedef, state_dtype))

    def __eq__(self, other: object) -> bool:
        # no comparison of hashes first: AnyParams is equal to every structure
        return self is other or (isinstance(other, _Static)
                                 and (self.skeleton, self.treedef, self.state_dtype)
                                 == (other.skeleton, other.treedef, other.state_dtype))

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        # what a recompile's message (JAX's "seen ... but now given ...") must tell apart: the
        # rule's schedules and fixed values, beside its class (its numbers are leaves)
        return (f"_Static({self.skeleton[0][0].__name__}, {self.treedef}, {self.state_dtype}, "
                f"fixed: {_fixed(self.skeleton[0])})")


def _fixed(skeleton: Any) -> str:
    """The schedules and fixed values in a rule's skeleton, ``name=value`` by field."""
    out = []
    for field in skeleton[1] if len(skeleton) > 1 and isinstance(skeleton[1], tuple) else ():
        if not (isinstance(field, tuple) and len(field) == 3 and isinstance(field[0], str)):
            out.append(repr(field))
            continue
        name, kind, value = field
        values = value if isinstance(value, tuple) else (value,)
        if kind == "fixed" or any(v is not None for v in values):
            out.append(f"{name}={value!r}")
    return ", ".join(out)


def _form(skeleton: Any) -> str:
    """A rule's form as text a msgpack holds: its class, and by field each number as ``#``
    (the state's numbers fill them in order), each schedule and fixed value as it is, each
    block switched on, each member's form. Two rules of one form read the same numbers in the
    same places."""
    cls, spec, on, nonzero = skeleton

    def shown(v: Any) -> str:
        if isinstance(v, tuple | list):
            return f"({', '.join(shown(x) for x in v)})"
        if v is None or isinstance(v, bool | int | float | str):
            return repr(v)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):  # (a schedule)
            fields = [f"{f.name}={shown(getattr(v, f.name))}"
                      for f in dataclasses.fields(v) if f.repr]
            return f"{type(v).__name__}({', '.join(fields)})"
        # (a function's repr holds its address, another in the process that restores)
        return f"<{type(v).__module__}.{type(v).__qualname__}>"

    def hyper(v: Any) -> str:
        return "#" if v is None else shown(v)  # (None: a number, among the state's)

    out = []
    for name, kind, sub in spec:
        if kind in ("member", "members"):
            out.append(f"{name}=[{', '.join(_form(m) for m in sub)}]")
        elif kind == "one":
            out.append(f"{name}={hyper(sub[0])}")
        elif kind == "tuple":
            out.append(f"{name}=({', '.join(hyper(x) for x in sub)})")
        else:
            out.append(f"{name}={shown(sub)}")
    blocks = f"; on={sorted(on)}, nonzero={sorted(nonzero)}" if on else ""
    return f"{cls.__name__}({', '.join(out)}{blocks})"


def _flatten_state(s: State) -> tuple[tuple[Any, ...], _Static]:
    lazy = s.__dict__.get("_lazy_rule")
    if lazy is not None:  # out of a jitted step, its rule unbuilt: its leaves as they came
        _, static, packed = lazy
        return (s.step, s.slots, s.tree_states, packed, s.counts), static
    # the rule's memo keeps its skeleton and its array: a state passed from one jitted step
    # to the next is flattened with no work on its numbers
    hit = s.rule.memo.get("jax")
    if hit is None:
        values, skeleton = flatten_rule(s.rule)
        # and last, whether uniopt.adjust set the numbers (a number, not the skeleton's: the
        # first adjust compiles nothing anew)
        flag = adjusted(s.rule)
        flag = float(flag) if isinstance(flag, bool) else flag
        hit = (_pack([*values, flag]), (skeleton, len(values)))
        if not _traced(hit[0]):
            # (one made inside a trace, a cond's branch handing the state back after an
            # adjust: the trace's own value, which the next step would read after it ended)
            s.rule.memo["jax"] = hit
    packed, skeleton = hit
    if isinstance(packed, np.ndarray) and backend.is_jax(s.step) and not _traced(s.step):
        # a JAX state's numbers as a jitted step hands them back: JAX's default float, placed
        # as the step counter. NumPy float64 would be a signature a jitted loop sees once,
        # whose second call misses jit's fast dispatch (and compiles again beside committed
        # params). Once per state, placement and float (x64 on or off), in the state's own
        # array: states set up from one rule share its record, and a jitted step that donates
        # one state's arrays would delete an array they shared (the other state's next step,
        # or a new set-up of the rule, raised "Array has been deleted")
        import jax
        import jax.numpy as jnp

        dtype = jnp.result_type(float)
        key = (placement(s.step), dtype)
        numbers = s.__dict__.get("_numbers")
        if numbers is None or numbers[0] != key:
            # cast on the host and put, as jit puts an argument: a cast on the device, or
            # jnp.asarray while jit flattens its arguments, compiles a program of its own
            numbers = s.__dict__["_numbers"] = (
                key, placed(jax.device_put(packed.astype(dtype)), s.step))
        packed = numbers[1]
    return (s.step, s.slots, s.tree_states, packed, s.counts), _Static(skeleton, s.treedef,
                                                                       s.state_dtype)


def _unflatten_state(static: _Static, children: tuple[Any, ...]) -> State:
    """A state from any leaves, as JAX requires of a pytree (None, ShapeDtypeStruct, tracers,
    other dtypes): nothing is read from the numbers until a step needs them, and the rule is
    built only when asked for (:class:`~uniopt.state.State` builds it then)."""
    step, slots, trees, packed, counts = children
    s = object.__new__(State)
    s.__dict__.update(step=step, slots=slots, treedef=static.treedef,
                      state_dtype=static.state_dtype, tree_states=trees, counts=counts,
                      _lazy_rule=(_rule_of, static, packed))
    return s


def _rule_of(static: _Static, packed: Any) -> Transform:
    """The rule of a state rebuilt from leaves, its numbers those of ``packed``."""
    skeleton, n = static.skeleton
    rule = unflatten_rule(skeleton, _numbers(packed, n))
    memo = rule.__dict__["memo"] = {"jax": (packed, static.skeleton)}  # a new record's memo
    # (a state saved before the flag was kept has none; a mapped state's may be no array)
    if len(getattr(packed, "shape", ())) == 1 and packed.shape[0] > n:
        memo["adjusted"] = packed[n] if _traced(packed) else DeviceNumber(packed, n)
    return rule


def rewrapped(old: State, new: State) -> State:
    """``new``, the state :func:`uniopt.adjust` made of ``old``, with its numbers held as
    ``old``'s were where a framework rebuilt ``old`` from leaves of its own (an NNX
    ``Optimizer``'s ``opt_state``: ``OptArray`` variables, each with ``replace``): assigned
    back, a bare array among them failed the next update (flax: "Cannot set key 3 on
    immutable node of type State")."""
    lazy = old.__dict__.get("_lazy_rule")
    if lazy is None or not _wrapper(lazy[2]):
        return new
    (step, slots, trees, numbers, counts), static = _flatten_state(new)
    return _unflatten_state(static, (step, slots, trees, lazy[2].replace(value=numbers),
                                     counts))


def rewrapped_as(like: State, new: State) -> State:
    """``new`` (a state :func:`uniopt.load` made like ``like``) with each array held as
    ``like``'s is where a framework rebuilt ``like`` from leaves of its own (an NNX
    ``Optimizer``'s ``opt_state``); else ``new``. Where a part of the two differs in structure,
    that part as ``new`` has it."""
    import jax

    lazy = like.__dict__.get("_lazy_rule")
    if lazy is None or not _wrapper(lazy[2]):
        return new
    (step, slots, trees, numbers, counts), static = _flatten_state(new)

    def wrap(old: Any, fresh: Any) -> Any:
        olds = jax.tree.leaves(old, is_leaf=_wrapper)
        news, treedef = jax.tree.flatten(fresh)
        if len(olds) != len(news):
            return fresh
        return jax.tree.unflatten(treedef, [o.replace(value=n) if _wrapper(o) else n
                                            for o, n in zip(olds, news, strict=True)])

    return _unflatten_state(static, (
        wrap(like.step, step), wrap(like.slots, slots), wrap(like.tree_states, trees),
        lazy[2].replace(value=numbers), wrap(like.counts, counts)))


def batched(state: State, traced: bool = False) -> tuple[int, ...] | None:
    """The shape of a state's numbers where they are a batch of rules' (a state made under
    ``jax.vmap``, one rule per model of an ensemble), outside a trace (``traced``: inside one
    too, where under ``jax.vmap`` each model's are a row, so a batch is a state outside it);
    else None."""
    lazy = state.__dict__.get("_lazy_rule")
    if lazy is None:
        return None
    shape = tuple(getattr(lazy[2], "shape", ()))
    return shape if len(shape) > 1 and (traced or not _traced(lazy[2])) else None


def wrapped(state: Any) -> bool:
    """Whether ``state`` is one a framework rebuilt from leaves of its own (an NNX
    ``Optimizer``'s ``opt_state``), whose arrays :func:`rewrapped_as` holds as its."""
    lazy = state.__dict__.get("_lazy_rule") if isinstance(state, State) else None
    return lazy is not None and _wrapper(lazy[2])


def _wrapper(x: Any) -> bool:
    """Whether ``x`` is a framework's variable holding the state's array (NNX's ``OptArray``,
    which passes for the array it holds), :meth:`replace`-d with a new value."""
    return is_variable(type(x))


def adjusted(rule: Transform) -> Any:
    """Whether :func:`uniopt.adjust` set ``rule``'s numbers: a bool, or where the rule came from
    a JAX state's leaves, the number it kept (1.0: adjusted), traced under ``jax.jit``."""
    return rule.memo.get("adjusted", False)


@functools.cache
def _register_jax() -> None:
    import jax

    jax.tree_util.register_pytree_node(State, _flatten_state, _unflatten_state)


@functools.cache
def _register_flax() -> None:
    """flax.serialization (``to_bytes``/``from_bytes``, ``to_state_dict``, and the
    checkpointers built on them): a state as ``{step, slots, tree_states, numbers}``."""
    from flax import serialization

    def to_dict(s: State) -> dict[str, Any]:
        (step, slots, trees, numbers, counts), static = _flatten_state(s)
        # (the rule's form: a target of another form reads the numbers in other places)
        out = {"step": step, "slots": serialization.to_state_dict(slots),
               "tree_states": serialization.to_state_dict(trees), "numbers": numbers,
               "rule_form": _form(static.skeleton[0])}
        return out if counts is None else {**out, "counts": counts}

    def from_dict(target: State, d: dict[str, Any]) -> State:
        (_, slots, trees, _, _), aux = _flatten_state(target)
        missing = {"step", "slots", "tree_states", "numbers"} - set(d)
        if missing:
            raise ValueError(f"uniopt State: the state dict lacks {sorted(missing)}")
        form, n = _form(aux.skeleton[0]), aux.skeleton[1]
        saved = d.get("rule_form")
        # (a dict saved before the form was kept: its count of numbers, and the flag after)
        size = getattr(d["numbers"], "shape", (None,))[-1:]
        if saved is not None and saved != form or saved is None and size not in ((n,), (n + 1,)):
            got, mine = (saved, form) if saved is not None else (
                f"a rule of {size[0]} numbers", f"{form}, of {n + 1}")
            raise ValueError(
                f"uniopt State: the state dict is for {got}; the target's rule is {mine}: "
                "its numbers would be read in other places. Restore into a "
                "state set up with the rule it was saved with (then adjust it), or save with "
                "uniopt.save, whose load names what differs")
        return _unflatten_state(aux, (
            d["step"], serialization.from_state_dict(slots, d["slots"]),
            serialization.from_state_dict(trees, d["tree_states"]), d["numbers"],
            d.get("counts")))

    serialization.register_serialization_state(State, to_dict, from_dict)

    def q8_to_dict(q: quant.Q8) -> dict[str, Any]:
        return {"codes": q.codes, "absmax": q.absmax}

    def q8_from_dict(target: quant.Q8, d: dict[str, Any]) -> quant.Q8:
        missing = {"codes", "absmax"} - set(d)
        if missing:
            raise ValueError(f"uniopt Q8 (an 8-bit slot): the state dict lacks {sorted(missing)}")
        return quant.Q8(serialization.from_state_dict(target.codes, d["codes"]),
                        serialization.from_state_dict(target.absmax, d["absmax"]))

    # (a state_dtype="q8" state's slots: flax's to_bytes refused them, "can not serialize")
    serialization.register_serialization_state(quant.Q8, q8_to_dict, q8_from_dict)
