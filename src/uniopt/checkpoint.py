"""Checkpoints: a :class:`~uniopt.State` (and its params, if asked) in one file that is never
lost to a crash while it is written and never runs code while it is read.

The file is a safetensors file: an 8-byte little-endian header length, a JSON header naming
each tensor's dtype, shape and byte range, then the tensors' bytes. Its ``__metadata__`` holds
the format's name and version and, as JSON, everything that is not an array: the rule (every
record by its type name and fields, schedules too, from a registry of uniopt's types), the
params' leaf paths, and where each of the state's leaves went. Nothing is pickled, nothing is
evaluated: a record is rebuilt by calling its own constructor, which validates it.

:func:`save` writes a temporary file in the same directory, syncs it, renames it over the
target and syncs the directory, so a crash at any moment leaves the old checkpoint or the new
one, whole. :func:`load` checks the whole file against what it is loaded into (``like``) before
it reads an array: leaves are matched by path, and every difference is an error that names it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import re
import stat
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import numpy as np
import optree

from . import backend, schedules
from .base import Elementwise, PerLeaf, Transform, WholeTree, assemble, chain
from .combine import _TreeSpec, by_path, partition
from .engine import _same_form, setup
from .hyper import Complemented, DeviceNumber, HostFacts, _traced, on_host, with_article
from .interop import dtensor
from .interop.jax import adjusted, batched, flatten_rule, wrapped
from .interop.optax import is_optax
from .state import State
from .transforms.mask import Mask
from .tree import NAMESPACE, _adopt_jax_nodes, flatten_leaves, path_str

__all__ = ["CheckpointError", "load", "register", "save"]

if TYPE_CHECKING:
    import torch

    _TorchOptimizer = TypeVar("_TorchOptimizer", bound=torch.optim.Optimizer)

FORMAT = "uniopt.checkpoint"
VERSION = 1
MAX_HEADER = 100_000_000  # safetensors' own bound on the header
MAX_DEPTH = 64  # records and containers nested in a rule
MAX_RANK = 32
MAX_EMPTY = 1 << 48  # bytes an empty tensor's other sizes may declare (256 TiB)

# safetensors' dtypes that a state or params hold; complex arrays are stored as their real
# pairs along a new last axis (safetensors has no complex128)
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
          "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
          "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool"}
CODES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
COMPLEX = {"complex64": "float32", "complex128": "float64"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read, or does not fit what it is loaded into;
    the message says what and where."""


# --- the registry: the records a checkpoint may name ------------------------------------------

_REGISTERED: dict[str, type] = {}


def register(cls: type) -> type:
    """Let checkpoints hold instances of ``cls``, a frozen dataclass of your own (a schedule
    with ``__call__``, or a rule), by its module and name; usable as a decorator. Register it
    in the process that saves and in the one that loads: a checkpoint names the type, never
    its code.

    >>> import dataclasses, uniopt as uo
    >>> @uo.checkpoint.register
    ... @dataclasses.dataclass(frozen=True)
    ... class halving:
    ...     init: float
    ...     def __call__(self, step):
    ...         return self.init * 0.5 ** step
    """
    params = getattr(cls, "__dataclass_params__", None)
    if not isinstance(cls, type) or params is None or not params.frozen:
        raise TypeError(f"checkpoint.register: {cls!r} is not a frozen dataclass")
    _REGISTERED[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


_ABSTRACT = {"Transform", "Rule", "Part", "Elementwise", "PerLeaf", "WholeTree", "Minimizer",
             "Combinator"}


def _own() -> dict[str, type]:
    """uniopt's records by name: every public rule, block and schedule type. Walked again only
    where a module was imported since (it defines them), not once per record decoded (a file
    of many records took minutes)."""
    if _OWN and _OWN[0] == len(sys.modules):
        return _OWN[1]
    out = _walk_own()
    _OWN[:] = [len(sys.modules), out]
    return out


_OWN: list[Any] = []


def _walk_own() -> dict[str, type]:
    out: dict[str, type] = {"by_path": by_path}
    todo: list[type] = [Transform, schedules._Record]
    while todo:
        c: type
        for c in todo.pop().__subclasses__():
            todo.append(c)
            if c.__module__.startswith("uniopt.") and not c.__name__.startswith("_") and \
                    c.__name__ not in _ABSTRACT and not _partial(c):
                out[c.__name__] = c
    return out


def _partial(cls: type) -> bool:
    """A base its subclasses complete (no kernel, no ``apply``, no tree state of its own)."""
    return (issubclass(cls, Elementwise) and not hasattr(cls, "kernel")) or \
        (issubclass(cls, PerLeaf) and cls.apply is PerLeaf.apply) or \
        (issubclass(cls, WholeTree) and cls.init_tree is WholeTree.init_tree)


def _type_name(cls: type) -> str | None:
    if _own().get(cls.__name__) is cls:
        return cls.__name__
    name = f"{cls.__module__}.{cls.__qualname__}"
    return name if _REGISTERED.get(name) is cls else None


# --- values as data: what JSON (and torch's weights_only loader) holds --------------------------

def _number(x: Any, at: str) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        raise CheckpointError(f"{at} is {x!r}; a checkpoint stores finite numbers only")
    return x


def _plain_tree(treedef: Any, at: str) -> None:
    """Raise unless a tree of masks or labels is of containers a checkpoint holds (dicts,
    lists, tuples, registered records): a namedtuple's, a FrozenDict's or a module's was
    refused deeper down, with advice that led nowhere (an equinox Module is no frozen
    dataclass to register)."""
    others, stack = set(), [treedef]
    while stack:
        t = stack.pop()
        if t.type is not None and (t.type not in (dict, list, tuple, type(None)) or hasattr(
                t.type, "_fields")) and _type_name(t.type) is None:
            others.add(t.type.__qualname__)
        stack.extend(t.children())
    if others:
        raise CheckpointError(
            f"{at} is a tree of masks or labels with containers of type "
            f"{', '.join(sorted(others))}, which a checkpoint cannot hold: select the leaves "
            "by their dotted paths instead, uo.by_path({glob: label, ...}) for labels, a list "
            "of globs for a mask")


class _Encode:
    """A value as data: None, bools, numbers, strings, lists (tuples), and dicts tagged by
    ``"$"``: ``list``, ``dict`` (key-value pairs), ``record`` (type and fields), ``regex``,
    ``optax`` (a transformation, which no file can hold); with ``tensor`` (arrays to
    references), also ``state`` (a member's) and ``namedtuple`` (optax's states).
    ``strict=False`` describes what cannot be stored instead of refusing it."""

    def __init__(self, strict: bool = True,
                 tensor: Callable[[Any, str], dict[str, Any]] | None = None):
        self.strict, self.tensor = strict, tensor

    def __call__(self, x: Any, at: str) -> Any:
        if isinstance(x, (DeviceNumber, Complemented)):
            x = x.read() if isinstance(x, DeviceNumber) else x.value
        if _traced(x):
            raise CheckpointError(f"{at} is traced by jax.jit: save outside the jitted step")
        if isinstance(x, np.generic):
            if self.tensor is None:  # a rule's number
                x = x.item()
            elif x.dtype.name in CODES:  # a state's: NumPy's scalars compute as NumPy's
                return {"$": "scalar", "dtype": x.dtype.name, "value": self(x.item(), at)}
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            if self.tensor is not None and not math.isfinite(x):
                return {"$": "float", "value": repr(x)}
            return _number(x, at)
        if backend.is_array(x):
            if self.tensor is not None:
                return self.tensor(x, at)
            if tuple(x.shape) == ():  # a number held as a 0-d array (a jitted rule's)
                return self(x.item(), at)
        if self.tensor is not None and isinstance(x, State):  # a member's, in a tree state
            return {"$": "state", "fields": {k: self(getattr(x, k), f"{at}.{k}")
                                             for k in ("step", "slots", "tree_states", "counts")}}
        if self.tensor is not None and isinstance(x, tuple) and hasattr(x, "_fields"):
            return {"$": "namedtuple", "type": type(x).__qualname__,
                    "items": [self(v, f"{at}.{k}") for k, v in zip(x._fields, x, strict=True)]}
        if is_optax(x) and not isinstance(x, type):
            return {"$": "optax", "type": type(x).__qualname__}
        if isinstance(x, (_TreeSpec, Mask)):  # a tree of masks or labels: the tree itself
            _plain_tree(x.treedef, at)
            return self(optree.tree_unflatten(x.treedef, list(x.leaves)), at)
        if isinstance(x, tuple) and not hasattr(x, "_fields"):
            return [self(v, f"{at}[{i}]") for i, v in enumerate(x)]
        if type(x) is list:
            return {"$": "list", "items": [self(v, f"{at}[{i}]") for i, v in enumerate(x)]}
        if type(x) is dict:
            return {"$": "dict", "items": [[self(k, at), self(v, f"{at}[{k!r}]")]
                                           for k, v in x.items()]}
        if isinstance(x, re.Pattern):
            return {"$": "regex", "pattern": x.pattern, "flags": int(x.flags)}
        name = _type_name(type(x)) if dataclasses.is_dataclass(x) else None
        if name is not None:
            return self._record(x, name, at)
        if not self.strict:
            return {"$": "unstorable", "repr": repr(x)[:200]}
        if dataclasses.is_dataclass(x):
            t = type(x)
            raise CheckpointError(
                f"{at} is {with_article(t.__qualname__)} (from {t.__module__}), not one of "
                f"uniopt's records: register it with uniopt.checkpoint.register("
                f"{t.__qualname__}) in the process that saves and in the one that loads")
        if callable(x):
            raise CheckpointError(
                f"{at} is {x!r}, a Python function: a checkpoint stores no code. Use a "
                "uniopt.schedules record, or write yours as a frozen dataclass with __call__ "
                "and register it with uniopt.checkpoint.register")
        raise CheckpointError(
            f"{at} is {with_article(type(x).__name__)}, which a checkpoint cannot hold")

    def _record(self, x: Any, name: str, at: str) -> dict[str, Any]:
        fields = {f.name: self(getattr(x, f.name), f"{at}.{f.name}")
                  for f in dataclasses.fields(x) if f.init}
        out = {"$": "record", "type": name, "fields": fields}
        host = getattr(x, "host", None) if isinstance(x, Transform) else None
        if host is not None:  # through jax.jit: its numbers' complements, its blocks
            facts: dict[str, Any] = {
                "complements": [[self(k, at), self(c, f"{at} (complement of {k})")]
                                for k, c in host.complements.items()],
                "on": None if host.on is None else sorted(host.on)}
            if host.nonzero:  # a loaded state then compiles the same program as before
                facts["nonzero"] = sorted(host.nonzero)
            out["host"] = facts
        return out


def to_data(x: Any, at: str = "value") -> Any:
    """``x`` (a rule, a schedule, numbers, containers of them) as plain data: JSON's types,
    which torch's ``weights_only`` loader also accepts. A function is refused."""
    return _Encode()(x, at)


_UNSET = object()


@functools.cache
def _var_positional(cls: type) -> str | None:
    """The field a record's constructor takes as ``*name``, or None."""
    return next((p.name for p in inspect.signature(cls).parameters.values()
                 if p.kind is inspect.Parameter.VAR_POSITIONAL), None)


class _Decode:
    """The inverse of :class:`_Encode`: records are rebuilt by their constructors (which
    validate them), only from the registry; an optax transformation is taken from ``like``
    (the value at the same place of the rule the caller holds); regular expressions only where
    the caller's rule has them too (a stranger's could take forever to match)."""

    def __init__(self, tensor: Callable[[str, str, bool], Any] | None = None,
                 patterns: bool = True):
        self.tensor, self.patterns = tensor, patterns

    def __call__(self, d: Any, at: str, like: Any = _UNSET, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise CheckpointError(f"{at}: nested more than {MAX_DEPTH} levels deep")
        if d is None or isinstance(d, (bool, int, float, str)):
            return d
        if isinstance(d, list):
            return tuple(self(v, f"{at}[{i}]", _item(like, i), depth + 1)
                         for i, v in enumerate(d))
        if not isinstance(d, dict) or not isinstance(d.get("$"), str):
            raise CheckpointError(f"{at}: expected a value, got {_short(d)}")
        tag = d["$"]
        if tag == "list":
            items = _get(d, "items", list, at, {"$", "items"})
            return [self(v, f"{at}[{i}]", _item(like, i), depth + 1) for i, v in enumerate(items)]
        if tag == "dict":
            out: dict[Any, Any] = {}
            for i, kv in enumerate(_get(d, "items", list, at, {"$", "items"})):
                if not isinstance(kv, list) or len(kv) != 2:
                    raise CheckpointError(f"{at}: entry {i} is {_short(kv)}, not a key-value pair")
                k = self(kv[0], f"{at} key {i}", _UNSET, depth + 1)
                try:
                    hash(k)
                except TypeError:
                    raise CheckpointError(f"{at}: key {i} is {_short(kv[0])}, not hashable") \
                        from None
                if k in out:
                    raise CheckpointError(f"{at}: the key {k!r} appears twice")
                sub = like.get(k, _UNSET) if isinstance(like, dict) else _UNSET
                out[k] = self(kv[1], f"{at}[{k!r}]", sub, depth + 1)
            return out
        if tag == "regex":
            pattern = _get(d, "pattern", str, at, {"$", "pattern", "flags"})
            flags = _get(d, "flags", int, at, {"$", "pattern", "flags"})
            if not self.patterns:
                raise CheckpointError(
                    f"{at}: the checkpoint's rule matches paths with the regular expression "
                    f"{pattern!r}, which is loaded only beside a rule of your own "
                    "(like=(rule, params) or like=state): a stranger's could take forever to "
                    "match")
            try:
                return re.compile(pattern, flags)
            except (re.error, ValueError, OverflowError) as e:
                raise CheckpointError(f"{at}: {pattern!r} is not a regular expression: {e}") \
                    from None
        if tag == "tensor":
            if self.tensor is None:
                raise CheckpointError(f"{at}: a tensor where the rule holds none")
            name = _get(d, "name", str, at, {"$", "name", "complex"})
            if d.get("complex", True) is not True:
                raise CheckpointError(f"{at}: complex is {_short(d['complex'])}")
            return self.tensor(name, at, "complex" in d)
        if tag == "optax":
            _get(d, "type", str, at, {"$", "type"})
            if like is _UNSET or not is_optax(like):
                raise CheckpointError(
                    f"{at}: the checkpoint's rule holds an optax transformation, which no file "
                    "can hold (it is code); load it with like=(rule, params) or like=state, "
                    "whose rule holds it")
            return like
        if tag == "record":
            return self._record(d, at, like, depth)
        raise CheckpointError(f"{at}: unknown entry {tag!r}")

    def _record(self, d: dict[str, Any], at: str, like: Any, depth: int) -> Any:
        keys = {"$", "type", "fields", "host"}
        name = _get(d, "type", str, at, keys)
        cls = _own().get(name) or _REGISTERED.get(name)
        if cls is None:
            raise CheckpointError(
                f"{at}: unknown record type {name!r}: not one of uniopt's, nor registered "
                "(a type of your own: uniopt.checkpoint.register it before loading)")
        fields = _get(d, "fields", dict, at, keys)
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(fields) - init)
        if unknown:
            raise CheckpointError(f"{at}: {name} has no field {unknown[0]!r} (its fields are "
                                  f"{sorted(init)})")
        same = type(like) is cls
        values = {k: self(v, f"{at}.{k}", getattr(like, k) if same else _UNSET, depth + 1)
                  for k, v in fields.items()}
        obj: Any
        try:
            if cls is chain:
                obj = chain(*values.get("transforms", ()))
            elif cls is partition:
                obj = partition(dict(zip(values["names"], values["rules"], strict=True)),
                                values["labels"])
            elif cls is by_path:
                obj = by_path(dict(values["table"]))
            else:
                many = _var_positional(cls)  # (schedules.product(*factors))
                obj = (cls(**values) if many is None or many not in values else
                       cls(*values.pop(many), **values))
        except Exception as e:  # a constructor's validation, whatever it raises
            raise CheckpointError(f"{at}: {name}: {type(e).__name__}: {e}") from None
        if "host" in d:
            obj = self._host(obj, d["host"], f"{at}.host", depth)
        return obj

    def _host(self, obj: Any, d: Any, at: str, depth: int) -> Any:
        if not isinstance(obj, Transform) or isinstance(obj, chain):
            raise CheckpointError(f"{at}: only a rule's records carry host facts")
        keys = {"complements", "on", "nonzero"}
        pairs = _get(d, "complements", list, at, keys)
        on = _get(d, "on", (list, type(None)), at, keys)
        nonzero = _get(d, "nonzero", list, at, keys) if "nonzero" in d else []
        complements: dict[Any, Any] = {}
        for kv in pairs:
            k = self(kv[0], at, _UNSET, depth + 1) if isinstance(kv, list) and len(kv) == 2 \
                else None
            ok = isinstance(k, str) or (isinstance(k, tuple) and len(k) == 2 and
                                        isinstance(k[0], str) and type(k[1]) is int)
            if not ok or type(kv[1]) not in (int, float) or not math.isfinite(kv[1]):
                raise CheckpointError(f"{at}: {_short(kv)} is not a (name, complement) pair")
            complements[k] = float(kv[1])
        if on is not None and not all(isinstance(n, str) for n in on):
            raise CheckpointError(f"{at}: on must list names, got {_short(on)}")
        if on is not None:
            # a block may be on for a 0 (a jitted step adjusted to 0 keeps its program), never
            # off for a number that is not 0 or a schedule: the step would leave it out
            optional = tuple(getattr(obj, "optional", ()))
            for n in on:
                if n not in optional:
                    raise CheckpointError(f"{at}: on lists {n!r}, which is not an optional "
                                          f"block of {type(obj).__name__} ({list(optional)})")
            for n in optional:
                v = getattr(obj, n, None)
                if n not in on and (callable(v) or (isinstance(v, (int, float)) and v != 0)):
                    raise CheckpointError(f"{at}: on leaves out {n!r}, which is "
                                          f"{_short(v)}: its block would not run")
        for n in nonzero:
            # a program compiled for a number known not to be 0 computes wrongly with a 0
            if not (isinstance(n, str) and on is not None and n in on
                    and isinstance(v := getattr(obj, n, None), (int, float)) and v != 0):
                raise CheckpointError(f"{at}: nonzero lists {_short(n)}, which is not a "
                                      "non-zero number of an optional block that is on")
        for k, c in complements.items():
            # the complement the host computed of the number before jit rounded it to float32:
            # 1 - the number to float32's rounding, else the file was edited (it would step
            # with another beta than the one it shows, and compare equal to the user's rule)
            v = _field_number(obj, k)
            if v is None or abs(c - (1.0 - v)) > 2.0 ** -22 * (1.0 + abs(v)):
                raise CheckpointError(f"{at}: the complement {_short(c)} of {_short(k)} is "
                                      f"not 1 - {_short(v)}")
        cached = {n for n in dir(type(obj))
                  if isinstance(getattr(type(obj), n, None), functools.cached_property)}
        fields = {k: v for k, v in vars(obj).items() if k != "host" and k not in cached}
        return assemble(type(obj), fields, HostFacts(
            complements, None if on is None else frozenset(on), frozenset(nonzero)))


def _field_number(obj: Any, key: Any) -> float | None:
    """The number a host complement's key names in ``obj``: field ``key``, or item ``i`` of
    field ``name`` for ``(name, i)`` (Adam's betas); None where it names no number."""
    name, i = (key, None) if isinstance(key, str) else key
    v = getattr(obj, name, None)
    if i is not None:
        v = v[i] if isinstance(v, tuple) and 0 <= i < len(v) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def from_data(d: Any, at: str = "value") -> Any:
    """The inverse of :func:`to_data` (no tensors; regular expressions allowed: for data the
    caller made itself, as ``uniopt.torch``'s state dicts)."""
    return _Decode()(d, at)


def _item(like: Any, i: int) -> Any:
    return like[i] if isinstance(like, (list, tuple)) and i < len(like) else _UNSET


def _get(d: dict[str, Any], key: str, kind: Any, at: str, allowed: set[str]) -> Any:
    extra = sorted(set(d) - allowed)
    if extra:
        raise CheckpointError(f"{at}: unexpected entry {extra[0]!r}")
    v = d.get(key, _UNSET)
    if v is _UNSET or not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise CheckpointError(f"{at}: {key} is {'missing' if v is _UNSET else _short(v)}")
    return v


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 80 else s[:77] + "..."


def _diff(a: Any, b: Any, at: str, lenient: bool = False) -> str | None:
    """Where data ``a`` (the checkpoint's) and ``b`` (like's) first differ, or None. Where
    either's record went through jax.jit (``lenient``), a number equals the other's rounded to
    float32, which is all that jit kept of it (a jitted run's file and a fresh rule's like, or
    an eager run's file and a jitted run's state as like)."""
    if isinstance(a, dict) and isinstance(b, dict) and a.get("$") == b.get("$") == "record":
        if a.get("type") != b.get("type"):
            return f"{at} is {a.get('type')} in the checkpoint, {b.get('type')} in like"
        lenient = "host" in a or "host" in b
        fa, fb = a.get("fields"), b.get("fields")
        if not isinstance(fa, dict) or not isinstance(fb, dict):
            return f"{at}'s fields are {_short(fa)} in the checkpoint"
        for k in sorted(set(fa) | set(fb)):
            if k in fb and k not in fa and _is_default(b.get("type"), k, fb[k]):
                continue  # (a field added since the file was written, at its default)
            if k not in fa or k not in fb:
                return f"{at}.{k} is only in {'like' if k in fb else 'the checkpoint'}"
            found = _diff(fa[k], fb[k], f"{at}.{k}", lenient)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _diff(x, y, f"{at}[{i}]", lenient)
            if found:
                return found
        return None
    if isinstance(a, dict) and isinstance(b, dict) and set(a) == set(b):
        for k in a:
            found = _diff(a[k], b[k], at if k in ("$", "items") else f"{at}.{k}", lenient)
            if found:
                return found
        return None
    if type(a) is type(b) and a == b:
        return None
    if {type(a), type(b)} == {int, float} and a == b:
        return None  # (6 and 6.0 are one number: schedules keep an int as given, rules a float)
    # (a float jit rounded, beside the other's number; jit keeps an int field an int, exact)
    if lenient and (type(a) is float or type(b) is float) and type(a) in (int, float) and \
            type(b) in (int, float) and (float(np.float32(b)) == a or float(np.float32(a)) == b):
        return None
    return f"{at} is {_show_data(a)} in the checkpoint, {_show_data(b)} in like"


def _is_default(name: Any, field: str, value: Any) -> bool:
    """Whether ``value`` (data) is record type ``name``'s default for ``field``: what a file
    written before the field existed stands for (loaded, the record is made with it)."""
    cls = _own().get(name) or _REGISTERED.get(name) if isinstance(name, str) else None
    f = next((f for f in dataclasses.fields(cls) if f.name == field), None) if cls else None
    if f is None or f.default is dataclasses.MISSING:
        return False
    return _diff(_Encode(strict=False)(f.default, field), value, field) is None


def _show_data(d: Any) -> str:
    if isinstance(d, dict) and d.get("$") == "record":
        return f"{d.get('type')}(...)"
    if isinstance(d, dict) and d.get("$") == "unstorable":
        return str(d.get("repr"))
    return _short(d)


# --- arrays -------------------------------------------------------------------------------------

def _stored(x: Any, at: str) -> tuple[str, list[int], bool]:
    """How array ``x`` is stored: its safetensors dtype, its shape, whether it is complex."""
    name = backend.dtype_name(x.dtype)
    real = COMPLEX.get(name)
    code = CODES.get(real or name)
    if code is None:
        raise CheckpointError(f"{at} has dtype {name}, which a checkpoint cannot hold")
    shape = [int(d) for d in x.shape]
    return code, shape + [2] if real else shape, real is not None


def _host_bytes(x: Any) -> np.ndarray:
    """``x``'s bytes in C order, little-endian, as a flat uint8 NumPy array (a view where the
    array is already that, on the host)."""
    if backend.is_torch(x):
        t = x.detach().resolve_conj().resolve_neg()
        if t.device.type != "cpu":
            t = t.cpu()
        a = backend.numpy_view(t.contiguous())
    elif backend.is_numpy(x):
        a = x
    else:
        try:
            a = np.asarray(x)
        except (TypeError, ValueError, RuntimeError):
            a = np.from_dlpack(x)
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big"):
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.reshape(-1).view(np.uint8)


# --- writing ------------------------------------------------------------------------------------

_NAME = re.compile(r"[^\x00-\x1f\x7f\\]{1,1024}")


def _ok_name(name: str) -> bool:
    """A tensor name a checkpoint may hold: printable, at most 1024 characters, no backslash,
    and nothing that reads as a path out of a directory (a leading ``/``, a ``..`` part)."""
    return bool(_NAME.fullmatch(name)) and not name.startswith("/") and \
        ".." not in name.split("/")


class _Tensors:
    """The arrays a checkpoint holds, each under a unique name."""

    def __init__(self) -> None:
        self.arrays: list[tuple[str, Any, str, list[int]]] = []
        self.names: set[str] = set()

    def add(self, x: Any, at: str, name: str) -> dict[str, Any]:
        """A reference to array ``x``, stored under ``name`` if it is free and valid."""
        code, shape, cplx = _stored(x, at)
        if not _ok_name(name) or name in self.names:
            name = f"tensor{len(self.arrays)}"
        self.names.add(name)
        self.arrays.append((name, x, code, shape))
        return {"$": "tensor", "name": name, **({"complex": True} if cplx else {})}


def _key(k: Any) -> Any:
    return k if type(k) is int or isinstance(k, str) else str(k)


def _flat(tree: Any) -> tuple[list[tuple[Any, ...]], list[Any], Any]:
    """Every leaf of ``tree`` (None ones too) with its path, as uniopt flattens trees."""
    while True:
        paths, leaves, treedef = optree.tree_flatten_with_path(tree, none_is_leaf=True,
                                                                namespace=NAMESPACE)
        if not _adopt_jax_nodes(leaves):
            return paths, leaves, treedef


def _at(path: tuple[Any, ...], params: list[list[Any]]) -> list[Any]:
    """A state leaf's place: its path, with a slot's position among the params replaced by
    that param's path (so a state is matched to params by path, not by position)."""
    if len(path) >= 3 and path[0] == "slots":  # an 8-bit slot: its codes and its scales
        return ["slots", path[1], params[path[2]], *path[3:]]
    return [_key(k) for k in path]


def _show(at: list[Any]) -> str:
    if len(at) >= 3 and at[0] == "slots" and isinstance(at[2], list):
        part = "".join(f".{k}" for k in at[3:])
        return f"slots[{at[1]!r}]{part} of {path_str(tuple(at[2]))}"
    if len(at) == 2 and at[0] == "params" and isinstance(at[1], list):
        return path_str(tuple(at[1]))
    return "state" + "".join(f"[{k!r}]" for k in at)


def _param_paths(treedef: Any, where: str) -> list[list[Any]]:
    """Each leaf's path as a checkpoint writes it; raises where two leaves' are written alike
    (a key neither int nor str is written as its str(): a tuple key ``(1, 2)`` beside the
    string ``"(1, 2)"``), which no load could tell apart."""
    given = optree.treespec_paths(treedef)
    paths = [[_key(k) for k in p] for p in given]
    seen: dict[str, int] = {}
    for i, p in enumerate(paths):
        j = seen.setdefault(json.dumps(p), i)
        if j != i:
            raise CheckpointError(
                f"{where}: the params' leaves {path_str(given[j])} and {path_str(given[i])} are "
                f"both written as {path_str(tuple(p))} (a key that is neither a str nor an int "
                "is written as its str()): give one of them another key"
                + ("; nothing was written" if where == "save" else ""))
    return paths


def _state_doc(state: State, params: Any, tensors: _Tensors) -> dict[str, Any]:
    paths = _param_paths(state.treedef, "save")
    entries = []
    for path, leaf in zip(*_flat(state)[:2], strict=True):
        if path[0] != "tree_states":
            at = _at(path, paths)
            entries.append([at, _entry(leaf, at, tensors)])
    if params is not None:
        leaves, treedef = flatten_leaves(params)
        if treedef != state.treedef:
            raise CheckpointError(f"save: params have the structure {treedef}, the state was "
                                  f"set up for {state.treedef}")
        for p, leaf in zip(paths, leaves, strict=True):
            entries.append([["params", p], _entry(leaf, ["params", p], tensors)])
    # set by uniopt.adjust: the optax protocol then steps with the state's numbers
    flag = {"adjusted": True} if on_host(adjusted(state.rule)) else {}
    # where the whole-tree parts' arrays live: a state set up fresh for like may hold none (an
    # L-BFGS history grows as it runs), and its arrays are then made in this library
    grown: list[Any] = optree.tree_leaves(state.tree_states)  # type: ignore[arg-type]
    some = next((x for x in grown if backend.is_array(x) and not backend.is_numpy(x)), None)
    where = {} if some is None else {"library": {"name": backend.library(some),
                                                 "device": str(backend.device(some))}}
    return {"kind": "state", "rule": _Encode()(state.rule, "rule"), **flag, **where,
            "state_dtype": state.state_dtype, "paths": paths, "entries": entries,
            "tree_states": _Encode(tensor=functools.partial(_named, tensors))(
                state.tree_states, "tree_states"),
            "params": params is not None}


def _named(tensors: _Tensors, x: Any, at: str) -> dict[str, Any]:
    """A reference to ``x``, named by its keys: ``tree_states/partition/decay.slots/...``."""
    return tensors.add(x, at, re.sub(r"\['?([^'\]]*)'?\]", r"/\1", at).lstrip("/"))


def _entry(leaf: Any, at: list[Any], tensors: _Tensors) -> Any:
    if leaf is None:
        return None
    if isinstance(leaf, np.generic):
        leaf = leaf.item()
    if isinstance(leaf, (bool, int, float)):
        return {"value": _number(leaf, _show(at))}
    if not backend.is_array(leaf):
        raise CheckpointError(f"save: {_show(at)} is {with_article(type(leaf).__name__)}, "
                              "neither an array nor a number")
    if _traced(leaf):
        raise CheckpointError(f"save: {_show(at)} is traced by jax.jit: save outside the step")
    name = "/".join(str(k) if not isinstance(k, list) else ".".join(map(str, k)) for k in at)
    ref = tensors.add(leaf, _show(at), name)
    return {"tensor": ref["name"], **({"complex": True} if "complex" in ref else {})}


def _torch_doc(opt: Any, tensors: _Tensors) -> dict[str, Any]:
    sharded = [t for g in opt.param_groups for t in g["params"]]
    sharded += [v for st in opt.state.values() if isinstance(st, dict) for v in st.values()]
    if dtensor.any_dtensor(sharded):
        # a file holds one process's tensors, and each rank holds shards: the ranks' files
        # would each be a part that loads on its own layout alone, and gathering whole
        # tensors is a collective every rank must enter, which save() on one rank would hang
        raise CheckpointError(
            "save: the optimizer's parameters or state are DTensors (FSDP2, tensor parallel), "
            "each rank holding shards, and a uniopt checkpoint holds one process's tensors: "
            "save and load a sharded optimizer with torch.distributed.checkpoint, which "
            "writes every rank's shards and reshards them on load (model_sd, optim_sd = "
            "get_state_dict(model, opt); dcp.save({'model': model_sd, 'optim': optim_sd}, "
            "checkpoint_id=path)); nothing was written")
    encode = _Encode(tensor=functools.partial(_named, tensors))
    return {"kind": "torch", "state_dict": encode(opt.state_dict(), "")}


def _is_torch_optimizer(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.optim.Optimizer)


def save(path: str | os.PathLike[str], state: Any, params: Any = None) -> None:
    """Write ``state`` (a :class:`~uniopt.State`, or a ``torch.optim.Optimizer`` such as a
    ``uniopt.torch`` one: its ``state_dict``) to ``path``, with ``params`` beside it if given.

    Atomic: the file is written beside ``path`` under a temporary name, synced, renamed over
    ``path``, and the directory synced; a crash at any moment leaves the old checkpoint or the
    new one, whole (an interrupted save may leave its temporary file, ``.<name>.*.tmp``). A
    file replaced keeps its permission bits; a ``path`` that is a symbolic link is written
    through, its target replaced and the link kept (as ``open(path, "wb")`` writes). A
    schedule or mask that is a Python function is refused: a checkpoint holds no code.

    >>> import numpy as np, tempfile, os, uniopt as uo
    >>> params = {"w": np.ones(3)}
    >>> state = uo.setup(uo.adam(lr=uo.schedules.cosine(1e-3, steps=100)), params)
    >>> state, params = uo.update(state, params, {"w": np.full(3, 0.5)})
    >>> path = os.path.join(tempfile.mkdtemp(), "opt.safetensors")
    >>> uo.save(path, state, params=params)
    >>> back, p = uo.load(path, like=params, params=True)
    >>> back.step, back.rule == state.rule, np.array_equal(p["w"], params["w"])
    (1, True, True)
    """
    tensors = _Tensors()
    if isinstance(state, State):
        shape = batched(state)
        if shape is not None:
            raise CheckpointError(
                f"save: this state's numbers are a batch, shape {shape} (a state made under "
                "jax.vmap: one rule per model), which a checkpoint of one rule cannot hold; "
                "save each model's (jax.tree.map(lambda x: x[i], state)), or the whole with "
                "orbax")
        doc = _state_doc(state, params, tensors)
    elif _is_torch_optimizer(state):
        if params is not None:
            raise TypeError("save: params= goes with a uniopt State; a torch optimizer's "
                            "parameters are the model's (save them with it)")
        doc = _torch_doc(state, tensors)
    else:
        raise TypeError(f"save: expected a uniopt State or a torch optimizer, got "
                        f"{type(state).__name__}{_save_hint(state)}")
    _write(os.fspath(path), doc, tensors.arrays)


def _save_hint(state: Any) -> str:
    """What :func:`save` was likely meant to be given, for a ``state`` it cannot take."""
    def optax(x: Any) -> bool:
        return type(x).__module__.split(".")[0] == "optax"

    if isinstance(state, dict) and {"state", "param_groups"} <= set(state):
        return ("; a torch optimizer's state_dict() is saved by passing the optimizer itself: "
                "uo.save(path, opt)")
    if not isinstance(state, (tuple, list)):
        return ""
    if (len(state) == 2 and isinstance(state[0], State) and not isinstance(state[1], State)
            and not optax(state[1])):
        return "; a state and its params: uo.save(path, state, params=params)"
    if any(isinstance(x, State) or optax(x) for x in state):
        # (an optax chain's state, a uniopt State among its members: a tree of optax's
        # classes, which uniopt's format does not name; or the user's own list of States)
        return ("; an optax state (optax.chain's, a uniopt rule among its members or not) is "
                "saved with orbax or flax.serialization, or write the chain as uo.chain (optax "
                "members inside it: docs/optax.md), whose State this saves; several States, "
                "each to a file of its own")
    return ""


def _write(path: str, doc: dict[str, Any], arrays: list[tuple[str, Any, str, list[int]]]) -> None:
    lazy = [i for i, a in enumerate(arrays) if backend.is_lazy(a[1])]
    if lazy:
        # computed together: a lazy state's arrays share their history (every step's graph),
        # which computing each apart computes again for each (the cost: the whole state in
        # memory at once, where one array at a time was)
        import dask

        values = dask.compute(*(arrays[i][1] for i in lazy))
        arrays = list(arrays)
        for i, v in zip(lazy, values, strict=True):
            arrays[i] = (arrays[i][0], v, *arrays[i][2:])
    meta = {"format": FORMAT, "version": str(VERSION),
            "uniopt": json.dumps(doc, allow_nan=False, separators=(",", ":"))}
    header: dict[str, Any] = {"__metadata__": meta}
    # widest first: each tensor then starts at a multiple of its item size, as safetensors
    # writes them (a reader may map the file)
    order = sorted(arrays, key=lambda a: -ITEMSIZE[a[2]])
    offset = 0
    for name, _, code, shape in order:
        n = math.prod(shape) * ITEMSIZE[code]
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data 8-byte aligned, as safetensors pads it
    if os.path.islink(path):
        # written through to the link's target, as open(path, "wb") and torch.save write:
        # the link (latest -> step100) stays, the target is replaced atomically
        path = os.path.realpath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:  # (no file yet: the new one has the permissions open() gives)
        mode = None
    fd, tmp = _new_file(folder, os.path.basename(path))
    try:
        with open(fd, "wb") as f:
            if mode is not None and hasattr(os, "fchmod"):
                # the file replaced kept its permissions (a checkpoint made private stays so),
                # as it does written in place
                os.fchmod(f.fileno(), mode)
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for _, x, _, _ in order:
                f.write(memoryview(_host_bytes(x)))  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # the rename itself survives a crash once the directory is synced
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _new_file(folder: str, stem: str) -> tuple[int, str]:
    """A new file ``.<stem>.<random>.tmp`` in ``folder``, open for writing, with the
    permissions ``open`` gives (``tempfile.mkstemp`` makes its files private); ``stem`` cut
    where the name would be longer than the folder's file names may be (a name the file
    system takes, within 19 bytes of its limit, failed with ENAMETOOLONG)."""
    try:
        most = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # (no pathconf, or no limit told)
        most = 255
    most = most if most > 0 else 255  # (-1: no limit told)
    stem = stem[:most]
    while stem and len(os.fsencode(stem)) + 19 > most:
        stem = stem[:-1]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        name = os.path.join(folder, f".{stem}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue


# --- reading ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Info:
    code: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclasses.dataclass
class _File:
    """An open checkpoint, its header checked: every tensor's bytes lie in the file, one
    after the other, and its structure (``doc``)."""

    f: Any  # a binary file
    name: str
    tensors: dict[str, _Info]
    doc: dict[str, Any]
    start: int  # where the data begins
    used: set[str] = dataclasses.field(default_factory=set)

    def info(self, name: str, at: str) -> _Info:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.name}: {at} names the tensor {name!r}, which the "
                                  "file does not hold")
        if name in self.used:
            raise CheckpointError(f"{self.name}: the tensor {name!r} is named twice")
        self.used.add(name)
        return info

    def read_into(self, info: _Info, out: np.ndarray) -> None:
        view = memoryview(out.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        assert len(view) == info.end - info.begin
        self.f.seek(self.start + info.begin)
        got = 0
        while got < len(view):
            n = self.f.readinto(view[got:])
            if not n:
                raise CheckpointError(f"{self.name}: the file ended inside a tensor (it was "
                                      "truncated while being read)")
            got += n
        if _big_endian(out.dtype):  # (the file's bytes are little-endian: the values swapped in)
            out.byteswap(inplace=True)


def _big_endian(dtype: np.dtype) -> bool:
    """Whether ``dtype``'s elements are laid out big-endian (a NumPy ``">f8"``, or a native
    one on a big-endian machine)."""
    order = dtype.byteorder
    return order == ">" or (order == "=" and sys.byteorder == "big")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointError(f"the JSON names {k!r} twice")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise CheckpointError(f"the JSON holds {name}, which a checkpoint never writes")


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where} is not valid JSON: {e}") from None


def _open(f: Any, name: str) -> _File:
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):  # (a device, a pipe: /dev/zero has no size to check)
        raise CheckpointError(f"{name} is not a regular file")
    size = st.st_size
    head = f.read(8)
    n = int.from_bytes(head, "little")
    if len(head) < 8 or n > size - 8:  # not a safetensors file: say what it is, if we know
        if head.startswith(b"PK\x03\x04"):
            raise CheckpointError(f"{name} is a zip archive (NumPy's .npz, or torch.save's "
                                  "around a pickle), not a uniopt checkpoint; uniopt never "
                                  "unpickles")
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            raise CheckpointError(f"{name} is a pickle, not a uniopt checkpoint; uniopt never "
                                  "unpickles")
    if len(head) < 8:
        raise CheckpointError(f"{name}: {size} bytes, too short for a checkpoint (it begins "
                              "with an 8-byte header length)")
    if n > size - 8:
        raise CheckpointError(f"{name}: the header length says {n} bytes, but only {size - 8} "
                              "follow (a truncated file, or not a checkpoint)")
    if n > MAX_HEADER:
        raise CheckpointError(f"{name}: a header of {n} bytes, more than the {MAX_HEADER} a "
                              "checkpoint may have")
    raw = f.read(n)
    if len(raw) != n:
        raise CheckpointError(f"{name}: the file ended inside its header")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{name}: the header is not UTF-8 ({e})") from None
    header = _json(text, f"{name}: the header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: the header is {_short(header)}, not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{name}: a safetensors file, but not a uniopt checkpoint (its "
                              f"metadata's format is {_short(got)}, not {FORMAT!r})")
    version = meta.get("version")
    if version != str(VERSION):
        newer = isinstance(version, str) and version.isdigit() and int(version) > VERSION
        raise CheckpointError(
            f"{name}: checkpoint format version {version!r}; this uniopt reads version "
            f"{str(VERSION)!r}" + (" (the file is from a newer uniopt)" if newer else
                                   " (written as a string)" if version == VERSION else ""))
    if not isinstance(meta.get("uniopt"), str):
        raise CheckpointError(f"{name}: the metadata lacks the structure ('uniopt')")
    doc = _json(meta["uniopt"], f"{name}: the structure")
    if not isinstance(doc, dict) or doc.get("kind") not in ("state", "torch"):
        raise CheckpointError(f"{name}: the structure is not a state's nor a torch "
                              "optimizer's")
    data = size - 8 - n
    tensors: dict[str, _Info] = {}
    for tname, d in header.items():
        at = f"{name}: tensor {_short(tname)}"
        if not _ok_name(tname):
            raise CheckpointError(f"{at}: not a name a checkpoint writes (control characters, "
                                  "a backslash, a leading '/' or a '..' part)")
        if not isinstance(d, dict) or set(d) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{at}: expected dtype, shape and data_offsets, got "
                                  f"{_short(d)}")
        code, shape, offsets = d["dtype"], d["shape"], d["data_offsets"]
        if not isinstance(code, str) or code not in ITEMSIZE:
            raise CheckpointError(f"{at}: unknown dtype {_short(code)}")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or \
                not all(type(s) is int and s >= 0 for s in shape):
            raise CheckpointError(f"{at}: shape {_short(shape)} is not a list of at most "
                                  f"{MAX_RANK} sizes")
        if not isinstance(offsets, list) or len(offsets) != 2 or \
                not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]:
            raise CheckpointError(f"{at}: data_offsets {_short(offsets)} are not a range")
        if offsets[1] > data:
            raise CheckpointError(f"{at}: its bytes end at {offsets[1]}, past the "
                                  f"{data} bytes of data the file holds")
        nbytes = math.prod(shape) * ITEMSIZE[code]
        if 0 in shape and math.prod(s for s in shape if s) * ITEMSIZE[code] > MAX_EMPTY:
            # (an empty tensor's other sizes cost nothing in the file, but NumPy and torch
            # refuse to make one past what a machine could hold, each with its own error)
            raise CheckpointError(f"{at}: shape {_short(shape)} declares sizes no array has")
        if nbytes != offsets[1] - offsets[0]:
            raise CheckpointError(f"{at}: shape {shape} of {code} is {nbytes} bytes, its data "
                                  f"{offsets[1] - offsets[0]}")
        tensors[tname] = _Info(code, tuple(shape), offsets[0], offsets[1])
    at_byte = 0
    for tname, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != at_byte:
            what = "overlap" if info.begin < at_byte else "leave a gap"
            raise CheckpointError(f"{name}: the tensors' bytes {what} at byte {info.begin} "
                                  f"({_short(tname)})")
        at_byte = info.end
    if at_byte != data:
        raise CheckpointError(f"{name}: {data - at_byte} bytes after the last tensor belong to "
                              "none")
    return _File(f, name, tensors, doc, 8 + n)


# the float dtypes that hold every value of each exactly
_WIDER = {"bfloat16": ("float32", "float64"), "float16": ("float32", "float64"),
          "float32": ("float64",)}


def _as_host(info: _Info) -> tuple[np.dtype, tuple[int, ...]]:
    """The NumPy dtype and shape a tensor is read into (bfloat16 as its bits)."""
    name = DTYPES[info.code]
    return np.dtype(np.uint16 if name == "bfloat16" else name).newbyteorder("<"), info.shape


@overload
def load(path: str | os.PathLike[str], like: _TorchOptimizer, *,
         params: Literal[False] = False) -> _TorchOptimizer: ...


@overload
def load(path: str | os.PathLike[str], like: Any, *,
         params: Literal[True]) -> tuple[State, Any]: ...


@overload
def load(path: str | os.PathLike[str], like: Any, *, params: Literal[False] = False) -> State: ...


@overload
def load(path: str | os.PathLike[str], like: Any, *,
         params: bool = False) -> State | tuple[State, Any]: ...


def load(path: str | os.PathLike[str], like: Any, *, params: bool = False) -> Any:
    """The state saved at ``path``, loaded into the arrays, library and device of ``like``:

    * ``like=state``: a :class:`~uniopt.State` set up for the same rule and params;
    * ``like=(rule, params)``: the state ``uniopt.setup(rule, params)`` would make;
    * ``like=params``: the same, with the checkpoint's own rule;
    * ``like=optimizer``: a torch optimizer (a ``uniopt.torch`` one) saved by :func:`save`,
      loaded in place through its ``load_state_dict``; returns it.

    Leaves are matched to ``like``'s by path; a missing or extra leaf, a shape or dtype that
    differs, or a rule that differs from ``like``'s raises :class:`CheckpointError` naming
    it, before any array is read, and nothing of ``like`` is changed (a file saved after
    :func:`uniopt.adjust` loads into a rule that differs from its own in numbers only, with
    the file's numbers, as a run resumes). ``params=True`` returns
    ``(state, params)``, the params saved beside the state, like ``like``'s params. A NumPy
    checkpoint loads into torch (any device) or JAX, and the reverse; arrays are read straight
    into the new state's memory. The file is never unpickled and nothing in it is run:
    a file that is not a checkpoint is a :class:`CheckpointError`.
    """
    with open(os.fspath(path), "rb") as f:
        ck = _open(f, os.path.basename(os.fspath(path)))
        if _is_torch_optimizer(like):
            if params:
                raise TypeError("load: params=True goes with a uniopt State")
            _load_torch(ck, like)
            return like
        if ck.doc["kind"] != "state":
            raise CheckpointError(f"{ck.name} holds a torch optimizer's state_dict: load it "
                                  "with like=optimizer (into uo.setup's state: fill its slots "
                                  "from the optimizer's by rule.slot_keys, which pair each "
                                  "with torch's name; the docs' 'Coming from torch.optim' shows "
                                  "how)")
        out = _load_state(ck, like, params)
    if isinstance(like, State) and "_lazy_rule" in like.__dict__:
        # a state a framework rebuilt from leaves of its own (an NNX Optimizer's opt_state:
        # OptArray variables): the loaded arrays held as like's were, as uo.adjust hands
        # them back (assigned bare, the next opt.update failed inside flax)
        from .interop.jax import rewrapped_as

        return (rewrapped_as(like, out[0]), out[1]) if params else rewrapped_as(like, out)
    return out


def _template(ck: _File, like: Any) -> tuple[State, Transform, Any, bool]:
    """The state to load into, the rule it gets, like's params (or None), and whether the
    template's arrays are this load's own (then they are read into)."""
    doc = ck.doc
    state_dtype = doc.get("state_dtype")
    if state_dtype not in (None, "float32", "float64", "q8"):
        raise CheckpointError(f"{ck.name}: state_dtype {_short(state_dtype)}")
    if isinstance(like, State):
        tmpl, like_rule, like_params = like, like.rule, None
    elif isinstance(like, tuple) and len(like) == 2 and isinstance(like[0], Transform):
        tmpl, (like_rule, like_params) = None, like
    else:
        tmpl, like_rule, like_params = None, None, like
    found = None if like_rule is None else \
        _diff(doc.get("rule"), _Encode(strict=False)(like_rule, "rule"), "rule")
    if found and doc.get("adjusted") is not True:
        raise CheckpointError(f"{ck.name}: a state for another rule: {found}")
    try:
        rule = _Decode(patterns=like_rule is not None)(doc.get("rule"), "rule",
                                                       _UNSET if like_rule is None else like_rule)
    except CheckpointError:
        if not found:
            raise
        rule = None  # (refused below, by its first difference)
    if found and not (isinstance(rule, Transform) and _one_form(rule, like_rule)):
        # a run adjusted before it saved, its numbers not the fresh rule's, loads with them
        # (below); one whose adjust changed the rule's form (a schedule for a number) runs
        # another program than like's rule, which an optax step would run
        nnx = wrapped(like)
        how = ("opt.opt_state = uo.adjust(opt.opt_state, ...) to the checkpoint's" if nnx
               else "adjust like's to the same")
        other = "" if nnx else ", or load with like=params for the checkpoint's own rule"
        raise CheckpointError(
            f"{ck.name}: a state for another rule: {found}; the checkpoint's rule was adjusted "
            f"(uo.adjust, or a group's numbers) to another form: {how} schedules or numbers "
            f"before loading{other}")
    if not isinstance(rule, Transform):
        raise CheckpointError(f"{ck.name}: the rule is {_short(rule)}, not a uniopt rule")
    if doc.get("adjusted") is True:
        rule.memo["adjusted"] = True
    if tmpl is not None:
        if tmpl.state_dtype != state_dtype:
            raise CheckpointError(f"{ck.name}: state_dtype is {state_dtype!r} in the checkpoint, "
                                  f"{tmpl.state_dtype!r} in like")
        return tmpl, rule, None, False
    try:
        tmpl = setup(rule, like_params, state_dtype=state_dtype)
    except Exception as e:  # whatever the file's rule raises on like's params
        raise CheckpointError(f"{ck.name}: the checkpoint's rule does not fit like's params: "
                              f"{e}") from None
    return tmpl, rule, like_params, True


def _one_form(a: Transform, b: Any) -> bool:
    """Whether rules ``a`` and ``b`` differ at most in numbers: one program, as the optax
    protocol compares a state's adjusted rule with the transformation's."""
    x, y = flatten_rule(a)[1], flatten_rule(b)[1]
    return bool(x == y) or _same_form(x, y)


def _load_state(ck: _File, like: Any, want_params: bool) -> Any:
    doc = ck.doc
    tmpl, rule, like_params, own = _template(ck, like)
    if want_params and like_params is None:
        raise TypeError("load: params=True needs like=(rule, params) or like=params, whose "
                        "arrays the params are loaded like")
    paths = _param_paths(tmpl.treedef, "load")
    perm = _match_paths(ck, paths)
    entries: dict[str, tuple[list[Any], Any]] = {}
    stored: dict[str, tuple[list[Any], Any]] = {}  # the params'
    raw = doc.get("entries")
    if not isinstance(raw, list):
        raise CheckpointError(f"{ck.name}: entries is {_short(raw)}, not a list")
    for e in raw:
        if not isinstance(e, list) or len(e) != 2 or not isinstance(e[0], list) or not e[0]:
            raise CheckpointError(f"{ck.name}: entry {_short(e)} is not [path, value]")
        key = json.dumps(e[0])
        if key in entries or key in stored:
            raise CheckpointError(f"{ck.name}: {_show(e[0])} appears twice")
        (stored if e[0][0] == "params" else entries)[key] = (e[0], e[1])

    t_paths, t_leaves, t_def = _flat(tmpl)
    arrays = [x for x in t_leaves if backend.is_array(x)]
    if not arrays and not own and tmpl.tree_states:
        arrays = _saved_library(ck)
    reader = _Reader(ck, own, flatten_leaves(like_params)[0] if own else [], arrays)
    jobs: list[Callable[[], Any]] = []
    for path, leaf in zip(t_paths, t_leaves, strict=True):
        if path[0] == "tree_states":
            jobs.append(functools.partial(lambda x: x, leaf))  # replaced below, whole
            continue
        at = _at(path, paths)
        found = entries.pop(json.dumps(at), None)
        spec = None if found is None else found[1]
        if path == ("counts",):
            jobs.append(reader.counts(spec, at, tmpl, perm))
        elif found is None:
            raise CheckpointError(f"{ck.name}: the checkpoint has no {_show(at)} (missing leaf)")
        else:
            jobs.append(reader.leaf(spec, leaf, at))
    if entries:
        at = next(iter(entries.values()))[0]
        raise CheckpointError(f"{ck.name}: the checkpoint holds {_show(at)}, which like has not "
                              "(extra leaf)")
    if tmpl.tree_states and perm != sorted(perm):
        raise CheckpointError(f"{ck.name}: like's params come in another order than the "
                              "checkpoint's, and the whole-tree parts' states keep theirs by "
                              "position")
    # a part's state may have gained entries as it ran, but the parts are like's: one the rule
    # has not is no state of it
    parts = [k for k, _ in _pairs(ck, doc.get("tree_states"), ["tree_states"])
             if k not in tmpl.tree_states]
    if parts:
        raise CheckpointError(f"{ck.name}: the checkpoint holds {_show(['tree_states', parts[0]])}"
                              f", the state of a whole-tree part like's rule has not (extra leaf)")
    trees = reader.walk(tmpl.tree_states, doc.get("tree_states"), ["tree_states"])
    if want_params:
        if doc.get("params") is not True:
            raise CheckpointError(f"{ck.name} holds no params (it was saved without params=)")
        for p, leaf in zip(paths, flatten_leaves(like_params)[0], strict=True):
            found = stored.pop(json.dumps(["params", p]), None)
            if found is None:
                raise CheckpointError(f"{ck.name}: the checkpoint has no {path_str(tuple(p))} "
                                      "(missing leaf)")
            jobs.append(reader.leaf(found[1], leaf, ["params", p], own=False))
    for _, spec in stored.values():  # not read, but accounted for
        if isinstance(spec, dict) and isinstance(spec.get("tensor"), str):
            ck.used.add(spec["tensor"])
    unnamed = sorted(set(ck.tensors) - ck.used)
    if unnamed:
        raise CheckpointError(f"{ck.name}: the tensor {unnamed[0]!r} belongs to no leaf")
    values = [job() for job in jobs]  # every check passed: only now is anything read
    n = len(t_leaves)
    state: Any = optree.tree_unflatten(t_def, values[:n])
    state = dataclasses.replace(state, rule=rule, tree_states=trees())
    if like_params is not None:  # what per-leaf shapes cannot tell (L-BFGS's flat vectors)
        leaves = flatten_leaves(like_params)[0]
        for part, keys in rule.keyed_parts:
            said = part.check_tree(state.tree_states[keys[0]], leaves) \
                if isinstance(part, WholeTree) else None
            if said:
                raise CheckpointError(f"{ck.name}: its state of {keys[0]} is for other params: "
                                      f"{said}")
    if not want_params:
        return state
    # (each a leaf that requires grad where like's did, as uniopt.update hands params back)
    loaded = list(map(backend.like_leaf, values[n:], flatten_leaves(like_params)[0]))
    return state, optree.tree_unflatten(tmpl.treedef, loaded)


def _saved_library(ck: _File) -> list[Any]:
    """An empty array of the library (on the device) the checkpoint's whole-tree arrays were
    saved from, where it is not NumPy: like=state of a fresh state has none of its own."""
    lib = ck.doc.get("library")
    if lib is None:
        return []
    if not isinstance(lib, dict) or set(lib) != {"name", "device"} or not all(
            isinstance(v, str) for v in lib.values()):
        raise CheckpointError(f"{ck.name}: library is {_short(lib)}, not a name and a device")
    name, device = lib["name"], lib["device"]
    try:
        if name == "torch":
            import torch

            return [torch.empty(0, device=device)]
        if name == "jax":
            import jax

            found = [d for d in jax.devices() if str(d) == device]
            return [jax.device_put(jax.numpy.zeros(0), found[0] if found else None)]
    except (ImportError, RuntimeError) as e:
        raise CheckpointError(f"{ck.name}: its state's arrays are {name}'s, on {device}, "
                              f"which cannot be had here ({e})") from None
    raise CheckpointError(f"{ck.name}: its state's arrays are {name}'s, and like=state holds "
                          "no array to make them like: load with like=(rule, params)")


def _match_paths(ck: _File, paths: list[list[Any]]) -> list[int]:
    """For each of like's params (by path), its position in the checkpoint; raises naming
    the leaves only one of them has."""
    file_paths = ck.doc.get("paths")
    if not isinstance(file_paths, list) or not all(
            isinstance(p, list) and all(type(k) is int or isinstance(k, str) for k in p)
            for p in file_paths):
        raise CheckpointError(f"{ck.name}: paths is {_short(file_paths)}, not a list of paths")
    index = {json.dumps(p): i for i, p in enumerate(file_paths)}
    if len(index) != len(file_paths):
        raise CheckpointError(f"{ck.name}: the checkpoint names a leaf twice")
    mine = [json.dumps(p) for p in paths]
    missing = [p for p, k in zip(paths, mine, strict=True) if k not in index]
    ours = set(mine)
    extra = [p for p in file_paths if json.dumps(p) not in ours]
    if missing or extra:
        said = []
        if missing:
            said.append("it has no state for " + ", ".join(path_str(tuple(p))
                                                            for p in missing[:5])
                        + " (missing leaf)")
        if extra:
            said.append("it holds state for " + ", ".join(path_str(tuple(p)) for p in extra[:5])
                        + ", which like lacks (extra leaf)")
        raise CheckpointError(f"{ck.name}: the params differ: {'; '.join(said)}")
    return [index[k] for k in mine]


class _Reader:
    """Checks the checkpoint's values against like's leaves, and returns for each a function
    that reads it: nothing is read until every check has passed. Arrays are read into the
    template's own where they are this load's (``own``, never like's params, each once)."""

    def __init__(self, ck: _File, own: bool, params: list[Any], arrays: list[Any]) -> None:
        self.ck, self.own = ck, own
        self.taken = {id(x) for x in params}
        # where arrays no template has (a whole-tree part's state that grew) are made
        self.exemplar = arrays[0] if arrays else (params[0] if params else None)

    def leaf(self, spec: Any, leaf: Any, at: list[Any], own: bool = True) -> Callable[[], Any]:
        mine = own and self.own and id(leaf) not in self.taken
        if backend.is_array(leaf):
            self.taken.add(id(leaf))
        return _leaf(self.ck, spec, leaf, at, mine)

    def counts(self, spec: Any, at: list[Any], owner: State,
               perm: list[int] | None) -> Callable[[], Any]:
        """Each leaf's own step count, as the checkpoint has it (None: every leaf's is
        ``step``), in ``owner``'s counter type (JAX's int32, else NumPy's int64)."""
        ck = self.ck
        if spec is None:
            return lambda: None
        info = _tensor(ck, spec, at)
        n = owner.treedef.num_leaves
        if info.code[0] not in "IU" or info.shape != (n,):
            raise CheckpointError(f"{ck.name}: {_show(at)} is {info.code} of shape "
                                  f"{info.shape}; like's state counts {n} leaves in integers")
        jax = backend.is_jax(owner.step)

        def read() -> Any:
            out = np.empty(*reversed(_as_host(info)))
            ck.read_into(info, out)
            out = out if perm is None else out[perm]
            if out.size and out.min() < 0:
                raise CheckpointError(f"{ck.name}: {_show(at)} holds {out.min()}: a step "
                                      "count is >= 0")
            if jax:
                xp = backend.namespace(owner.step)
                return xp.asarray(_fit(out, np.int32, ck, at), dtype=xp.int32)
            return _fit(out, np.int64, ck, at)

        return read

    def walk(self, t: Any, d: Any, at: list[Any], strict: bool = False) -> Callable[[], Any]:
        """The whole-tree parts' states, where like's (the template ``t``) and the checkpoint's
        (data ``d``) are walked together: a dict may have gained entries and a list grown as
        the part ran (L-BFGS's history), and those come from the checkpoint alone (not where
        ``strict``: a member's step and slots)."""
        ck, where = self.ck, f"{self.ck.name}: {_show(at)}"
        if len(at) > MAX_DEPTH:
            raise CheckpointError(f"{where}: nested more than {MAX_DEPTH} levels deep")
        tag = d.get("$") if isinstance(d, dict) else None
        if isinstance(t, State):
            f = _fields(ck, d, "state", at)
            if not isinstance(f, dict) or set(f) != {"step", "slots", "tree_states", "counts"}:
                raise CheckpointError(f"{where}: a member's state lacks step, slots, "
                                      "tree_states or counts")
            parts = {k: self.walk(getattr(t, k), f[k], [*at, k], strict=k != "tree_states")
                     for k in ("step", "slots", "tree_states")}
            counts = self.counts(_ref(f["counts"]), [*at, "counts"], t, None)
            return lambda: dataclasses.replace(t, counts=counts(),
                                               **{k: v() for k, v in parts.items()})
        if isinstance(t, tuple) and hasattr(t, "_fields"):
            items = _fields(ck, d, "namedtuple", at)
            if d.get("type") != type(t).__qualname__ or len(items) != len(t):
                raise CheckpointError(f"{where} is {_short(d.get('type'))} of {len(items)} "
                                      f"fields in the checkpoint, {type(t).__qualname__} of "
                                      f"{len(t)} in like")
            subs = [self.walk(x, v, [*at, k], strict) for k, x, v in zip(t._fields, t, items,
                                                                         strict=True)]
            return lambda: type(t)(*(f() for f in subs))
        if type(t) is dict:
            items = dict(_pairs(ck, d, at))
            missing = [k for k in t if k not in items]
            if missing:
                raise CheckpointError(f"{ck.name}: the checkpoint has no "
                                      f"{_show([*at, missing[0]])} (missing leaf)")
            extra = [k for k in items if k not in t]
            if strict and extra:
                raise CheckpointError(f"{ck.name}: the checkpoint holds "
                                      f"{_show([*at, extra[0]])}, which like has not (extra "
                                      "leaf)")
            named = {k: self.walk(t.get(k, _UNSET), v, [*at, k], strict)
                     for k, v in items.items()}
            return lambda: {k: f() for k, f in named.items()}
        if isinstance(t, (list, tuple)):
            items = d if isinstance(d, list) and isinstance(t, tuple) else \
                _fields(ck, d, "list", at) if isinstance(t, list) else None
            if not isinstance(items, list) or strict and len(items) != len(t):
                raise CheckpointError(f"{where} is {_short(d)} in the checkpoint, a "
                                      f"{type(t).__name__} of {len(t)} in like")
            subs = [self.walk(t[i] if i < len(t) else _UNSET, v, [*at, i], strict)
                    for i, v in enumerate(items)]
            return lambda: type(t)(f() for f in subs)
        if t is _UNSET:
            return self.free(d, at)
        if tag in ("scalar", "float") or isinstance(t, np.generic):
            v = _scalar_data(ck, d, at)
            if type(v) is not type(t):
                raise CheckpointError(f"{where} is {_short(v)} in the checkpoint, a "
                                      f"{type(t).__name__} in like")
            return lambda: v
        if tag == "tensor":
            return self.leaf(_ref(d), t, at)
        return self.leaf(None if d is None else {"value": d}, t, at)

    def free(self, d: Any, at: list[Any]) -> Callable[[], Any]:
        """A value no template has: plain containers, numbers, and arrays in the library
        (and on the device) of like's."""
        ck = self.ck
        if len(at) > MAX_DEPTH:
            raise CheckpointError(f"{ck.name}: {_show(at)}: nested more than {MAX_DEPTH} "
                                  "levels deep")
        if d is None or isinstance(d, (bool, int, float, str)):
            return lambda: d
        tag = d.get("$") if isinstance(d, dict) else None
        if tag in ("scalar", "float"):
            v = _scalar_data(ck, d, at)
            return lambda: v
        if isinstance(d, list) or tag == "list":
            items = d if isinstance(d, list) else _fields(ck, d, "list", at)
            subs = [self.free(v, [*at, i]) for i, v in enumerate(items)]
            kind = tuple if isinstance(d, list) else list
            return lambda: kind(f() for f in subs)
        if tag == "dict":
            subs2 = {k: self.free(v, [*at, k]) for k, v in _pairs(ck, d, at)}
            return lambda: {k: f() for k, f in subs2.items()}
        if tag != "tensor":
            raise CheckpointError(f"{ck.name}: {_show(at)} is {_short(d)}, where like has "
                                  "nothing to load it into")
        spec = _ref(d)
        info = _tensor(ck, spec, at)
        like = self.exemplar
        if DTYPES[info.code] == "bfloat16" and (like is None or backend.is_numpy(like)):
            raise CheckpointError(f"{ck.name}: {_show(at)} is bfloat16, which NumPy lacks")

        def read() -> Any:
            host = np.empty(*reversed(_as_host(info)))
            ck.read_into(info, host)
            if spec.get("complex"):
                host = host.view(np.complex64 if info.code == "F32" else np.complex128)[..., 0]
            return host if like is None else _to_library(host, like, DTYPES[info.code])

        return read


def _scalar_data(ck: _File, d: Any, at: list[Any]) -> Any:
    """A NumPy scalar (``{"$": "scalar"}``) or a float that JSON has not (``{"$": "float"}``)."""
    where = f"{ck.name}: {_show(at)}"
    tag = d.get("$") if isinstance(d, dict) else None
    if tag == "float" and set(d) == {"$", "value"} and d["value"] in ("nan", "inf", "-inf"):
        return float(d["value"])
    if (tag != "scalar" or set(d) != {"$", "dtype", "value"} or not isinstance(d["dtype"], str)
            or d["dtype"] not in CODES):  # (a list or a dict is no key of CODES: unhashable)
        raise CheckpointError(f"{where} is {_short(d)}, not a number")
    v = d["value"]
    if isinstance(v, dict):
        v = _scalar_data(ck, v, at)
    kind = np.dtype(d["dtype"]).kind
    if type(v) not in ({bool} if kind == "b" else {int} if kind in "iu" else {int, float}):
        raise CheckpointError(f"{where} is {_short(v)}, not a {d['dtype']}")
    try:
        with np.errstate(over="raise"):
            return np.dtype(d["dtype"]).type(v)
    except (OverflowError, FloatingPointError) as e:
        raise CheckpointError(f"{where}: {v} is past {d['dtype']} ({e})") from None


def _ref(d: Any) -> Any:
    """A tensor reference in a tree state's data as an entry's spec (None stays None)."""
    if isinstance(d, dict) and d.get("$") == "tensor":
        return {k: v for k, v in d.items() if k != "$" and k != "name"} | {"tensor": d.get("name")}
    return d


def _fields(ck: _File, d: Any, tag: str, at: list[Any]) -> Any:
    key = "fields" if tag == "state" else "items"
    allowed = {"$", key} | ({"type"} if tag == "namedtuple" else set())
    if not isinstance(d, dict) or d.get("$") != tag or not set(d) <= allowed or key not in d:
        raise CheckpointError(f"{ck.name}: {_show(at)} is {_short(d)} in the checkpoint, a "
                              f"{tag} in like")
    if tag != "state" and not isinstance(d[key], list):
        raise CheckpointError(f"{ck.name}: {_show(at)}: {_short(d[key])} is not a list")
    return d[key]


def _pairs(ck: _File, d: Any, at: list[Any]) -> list[tuple[Any, Any]]:
    items = _fields(ck, d, "dict", at)
    out, seen = [], set()
    for kv in items:
        if not isinstance(kv, list) or len(kv) != 2 or not isinstance(kv[0], (str, int)) or \
                isinstance(kv[0], bool) or kv[0] in seen:
            raise CheckpointError(f"{ck.name}: {_show(at)}: {_short(kv)} is not a key-value "
                                  "pair with a new key")
        seen.add(kv[0])
        out.append((kv[0], kv[1]))
    return out


def _to_library(host: np.ndarray, like: Any, dtype: str) -> Any:
    """Host array ``host`` in ``like``'s library and on its device (bfloat16 from its bits)."""
    if backend.is_torch(like):
        import torch

        t = torch.from_numpy(host)
        t = t.view(torch.bfloat16) if dtype == "bfloat16" else t
        return t.to(like.device)
    if backend.is_jax(like):
        import jax.numpy as jnp

        return jnp.asarray(host.view(jnp.bfloat16) if dtype == "bfloat16" else host)
    if backend.is_numpy(like):
        return host
    xp = backend.namespace(like)
    return xp.asarray(host, device=backend.device(like), copy=True)


def _fit(a: np.ndarray, dtype: Any, ck: _File, at: list[Any]) -> np.ndarray:
    info = np.iinfo(dtype)
    if a.size and (a.min() < info.min or a.max() > info.max):
        raise CheckpointError(f"{ck.name}: {_show(at)} holds {a.max()}, past {np.dtype(dtype)}")
    return a.astype(dtype)


def _tensor(ck: _File, spec: Any, at: list[Any]) -> _Info:
    ok = isinstance(spec, dict) and isinstance(spec.get("tensor"), str) and \
        set(spec) <= {"tensor", "complex"} and spec.get("complex", True) is True
    if not ok:
        raise CheckpointError(f"{ck.name}: {_show(at)} is {_short(spec)}, not a tensor")
    return ck.info(spec["tensor"], _show(at))


def _leaf(ck: _File, spec: Any, leaf: Any, at: list[Any], own: bool) -> Callable[[], Any]:
    """Check the checkpoint's ``spec`` against like's ``leaf``; a function reading the value."""
    where = f"{ck.name}: {_show(at)}"
    if leaf is None:
        if spec is not None:
            raise CheckpointError(f"{where}: the checkpoint holds one, like keeps none (extra "
                                  "leaf)")
        return lambda: None
    if spec is None:
        raise CheckpointError(f"{where}: like keeps one, the checkpoint none (missing leaf)")
    if isinstance(leaf, np.generic):
        leaf = leaf.item()
    if isinstance(leaf, (bool, int, float)):
        return _scalar(ck, spec, type(leaf), at)
    if isinstance(spec, dict) and set(spec) == {"value"}:  # a counter a Python number held
        v = spec["value"]
        if isinstance(v, list) and tuple(leaf.shape) == (0, *v):
            # a shape kept as numbers, now as an empty array's (static under jax.jit: SAM's
            # leaf shapes): a checkpoint from before reads as like's array
            return lambda: leaf
        kind = backend.dtype_name(leaf.dtype)
        ok = (kind == "bool" and type(v) is bool) or \
            (kind.startswith(("int", "uint")) and type(v) is int)
        if tuple(leaf.shape) != () or not ok:
            raise CheckpointError(f"{where} is the number {_short(v)} in the checkpoint, an "
                                  f"array of {kind} and shape {tuple(leaf.shape)} in like")
        xp = backend.namespace(leaf)
        return lambda: _fit_scalar(xp, v, leaf, ck, at)
    info = _tensor(ck, spec, at)
    name = backend.dtype_name(leaf.dtype)
    real = COMPLEX.get(name)
    shape = tuple(int(d) for d in leaf.shape) + ((2,) if real else ())
    if bool(spec.get("complex")) != bool(real):
        raise CheckpointError(f"{where} is {'complex' if spec.get('complex') else 'real'} in "
                              f"the checkpoint, {name} in like")
    if info.shape != shape:
        raise CheckpointError(f"{where} has shape {_unpaired(info.shape, real)} in the "
                              f"checkpoint, {tuple(leaf.shape)} in like")
    stored = DTYPES[info.code]
    integral = name.startswith(("int", "uint")) and stored.startswith(("int", "uint"))
    # a whole-tree state saved narrower than like's is read into it, exactly: a file of a
    # version whose state_dtype did not reach such states (bfloat16 where float32 was asked)
    # (the innermost: a combinator member's slots sit under its tree state, and stay refused)
    inner = next((k for k in reversed(at) if k in ("slots", "tree_states")), None)
    widened = inner == "tree_states" and name in _WIDER.get(stored, ())
    if stored != (real or name) and not (integral or widened):
        raise CheckpointError(f"{where} is {stored if not real else 'complex of ' + stored} in "
                              f"the checkpoint, {name} in like")
    if at and at[-1] == "step" and integral and tuple(leaf.shape) == ():
        # (an array's step count, JAX's int32: >= 0 as a Python one is, in _scalar)
        return lambda: _counted(where, _read_leaf(ck, info, leaf, own, at), at)
    return lambda: _read_leaf(ck, info, leaf, own, at)


def _counted(where: str, x: Any, at: list[Any]) -> Any:
    _count(where, int, int(np.asarray(x.cpu() if hasattr(x, "cpu") else x)), at)
    return x


def _unpaired(shape: tuple[int, ...], real: Any) -> tuple[int, ...]:
    return shape[:-1] if real and shape and shape[-1] == 2 else shape


def _scalar(ck: _File, spec: Any, kind: type, at: list[Any]) -> Callable[[], Any]:
    """A Python number of like's (a step count, a flag) from the checkpoint's number or 0-d
    array."""
    where = f"{ck.name}: {_show(at)}"
    if isinstance(spec, dict) and set(spec) == {"value"}:
        v = spec["value"]
        ok = type(v) is bool if kind is bool else type(v) is int if kind is int else \
            type(v) in (int, float)
        if not ok:
            raise CheckpointError(f"{where} is {_short(v)} in the checkpoint, a {kind.__name__} "
                                  "in like")
        _count(where, kind, v, at)
        return lambda: kind(v)
    info = _tensor(ck, spec, at)
    code = info.code
    ok = code == "BOOL" if kind is bool else code[0] in "IU" if kind is int else code != "BOOL"
    if info.shape != () or not ok:
        raise CheckpointError(f"{where} is {code} of shape {info.shape} in the checkpoint, a "
                              f"{kind.__name__} in like")

    def read() -> Any:
        dtype, shape = _as_host(info)
        out = np.empty(shape, dtype)
        ck.read_into(info, out)
        return _count(where, kind, kind(out.item()), at)

    return read


def _count(where: str, kind: type, v: Any, at: list[Any]) -> Any:
    """``v``, refused where it is a step count below 0 (a rule's or a member's)."""
    if kind is int and at and at[-1] == "step" and v < 0:
        raise CheckpointError(f"{where} is {v} in the checkpoint: a step count is >= 0")
    return v


def _fit_scalar(xp: Any, v: Any, leaf: Any, ck: _File, at: list[Any]) -> Any:
    if not isinstance(v, bool):
        _count(f"{ck.name}: {_show(at)}", int, v, at)
        info = np.iinfo(np.dtype(backend.dtype_name(leaf.dtype)))
        if not info.min <= v <= info.max:
            raise CheckpointError(f"{ck.name}: {_show(at)} is {v}, past {info.dtype}")
    return _put(xp.asarray(v, dtype=leaf.dtype), leaf)


def _read_leaf(ck: _File, info: _Info, leaf: Any, own: bool, at: list[Any]) -> Any:
    """A new array like ``leaf`` (library, dtype, device) holding the tensor ``info``, read
    straight into its memory where it is on the host: into ``leaf`` itself where it is
    this load's own (a NumPy or CPU torch template), else into a new one."""
    name = backend.dtype_name(leaf.dtype)
    stored = DTYPES[info.code]
    if stored != (COMPLEX.get(name) or name):  # an integer of another width, a narrower float
        dtype, shape = _as_host(info)
        host = np.empty(shape, dtype)
        ck.read_into(info, host)
        if name not in _WIDER.get(stored, ()):
            return _put(_fit(host, np.dtype(name), ck, at), leaf)
        if stored == "bfloat16":  # (its bits: the high half of a float32's)
            host = (host.astype(np.uint32) << 16).view(np.float32)
        return _put(host.astype(name), leaf)
    if backend.is_numpy(leaf):
        out = leaf if own and leaf.flags.writeable and leaf.flags.c_contiguous else \
            np.empty(leaf.shape, leaf.dtype)
        ck.read_into(info, out)
        return out
    if backend.is_torch(leaf):
        import torch

        cpu = leaf.device.type == "cpu"
        out = leaf if own and cpu and leaf.is_contiguous() and not leaf.requires_grad else \
            torch.empty(tuple(leaf.shape), dtype=leaf.dtype)
        ck.read_into(info, backend.numpy_view(out))
        return out if cpu else out.to(leaf.device)
    dtype = np.dtype(leaf.dtype) if backend.is_jax(leaf) else np.dtype(name)
    host = np.empty(tuple(leaf.shape), dtype)
    ck.read_into(info, host)
    return _put(host, leaf)


def _put(host: Any, leaf: Any) -> Any:
    """Host array ``host`` as an array of ``leaf``'s library, dtype and device."""
    if backend.is_numpy(leaf):
        return np.asarray(host, dtype=leaf.dtype)
    if backend.is_torch(leaf):
        import torch

        return torch.as_tensor(np.asarray(host)).to(device=leaf.device, dtype=leaf.dtype)
    if backend.is_jax(leaf):
        import jax

        if getattr(leaf, "committed", False):
            return jax.device_put(np.asarray(host, dtype=leaf.dtype), leaf.sharding)
        return jax.numpy.asarray(host, dtype=leaf.dtype)
    xp = backend.namespace(leaf)
    return xp.asarray(np.asarray(host), dtype=leaf.dtype, device=backend.device(leaf), copy=True)


def _load_torch(ck: _File, opt: Any) -> None:
    import torch

    if ck.doc["kind"] != "torch":
        raise CheckpointError(f"{ck.name} holds a uniopt State, not a torch optimizer's "
                              "state_dict: load it with like=state, (rule, params) or params "
                              "(into an optimizer: its state[p][name] from the slots, paired "
                              "by rule.slot_keys; the docs' 'Coming from torch.optim' shows how)")
    infos: list[tuple[_Info, Any]] = []

    def tensor(name: str, at: str, cplx: bool) -> Any:
        info = ck.info(name, at)
        if cplx and (info.code not in ("F32", "F64") or info.shape[-1:] != (2,)):
            raise CheckpointError(f"{ck.name}: {at}: a complex tensor stored as {info.code} of "
                                  f"shape {info.shape}")
        out = torch.empty(info.shape, dtype=getattr(torch, DTYPES[info.code]))
        infos.append((info, out))
        return torch.view_as_complex(out) if cplx else out

    sd = _Decode(tensor=tensor, patterns=False)(ck.doc.get("state_dict"), "state_dict")
    unnamed = sorted(set(ck.tensors) - ck.used)
    if unnamed:
        raise CheckpointError(f"{ck.name}: the tensor {unnamed[0]!r} belongs to no entry")
    if not isinstance(sd, dict) or not {"state", "param_groups"} <= set(sd):
        raise CheckpointError(f"{ck.name}: the state_dict lacks 'state' or 'param_groups'")
    for info, out in infos:
        ck.read_into(info, backend.numpy_view(out))
    # (a user's subclass of a uniopt.torch class is one of ours)
    ours = any(c.__module__.startswith("uniopt.") for c in type(opt).__mro__)
    if not ours:
        _only_ours(ck.name, sd, type(opt).__name__)
    # torch.optim's load builds the state and groups anew, then fixes them up (Adam's reads
    # each parameter's 'step' there): where that raises, the old ones are put back (uniopt's
    # classes check before they write)
    old = vars(opt).get("state"), vars(opt).get("param_groups")
    try:
        opt.load_state_dict(sd)
    except Exception as e:  # whatever torch's or uniopt's checks raise of it
        if not ours and old[0] is not None and old[1] is not None:
            opt.state, opt.param_groups = old
        raise CheckpointError(
            f"{ck.name} does not fit this optimizer: {e}" if ours else  # (says nothing loaded)
            f"{ck.name} does not fit this optimizer ({type(e).__name__}: {e}); nothing was "
            "loaded") from e


def _only_ours(name: str, sd: dict[str, Any], cls: str) -> None:
    """Raise where a state dict holds what only uniopt.torch's optimizers read: 8-bit slots,
    a group's one state, a uniopt schedule for a number (torch.optim would read the codes as
    the moments, or fail at its step with the state replaced)."""
    groups = sd["param_groups"] if isinstance(sd["param_groups"], list) else []
    for gi, g in enumerate(groups):
        if not isinstance(g, dict):
            continue
        kept = g.get("state_dtype")
        if kept is not None:
            why = ("it would take 8-bit codes for the moments" if kept == "q8" else
                   "it keeps each parameter's state in the parameter's dtype and would cast "
                   f"the saved {kept} state to it")
            raise CheckpointError(
                f"{name}: parameter group {gi} keeps its state as {kept!r} (state_dtype), "
                f"which {cls} does not read ({why}): load it into the uniopt.torch optimizer "
                "that saved it")
        held = [k for k, v in g.items() if k != "params" and _schedule_in(v)]
        if held:
            raise CheckpointError(
                f"{name}: parameter group {gi} holds a uniopt schedule for {held[0]!r}, which "
                f"{cls} cannot compute with: load it into a uniopt.torch optimizer")
    state = sd["state"] if isinstance(sd["state"], dict) else {}
    for k, st in state.items():
        if isinstance(st, dict) and "uniopt.group" in st:
            raise CheckpointError(
                f"{name}: the state of parameter {k} holds a uniopt group's state "
                f"('uniopt.group'), which {cls} does not keep: load it into the "
                "uniopt.torch.Optimizer that saved it")


# --- schedules in torch's state dicts ---------------------------------------------------------

def _schedule_in(value: Any) -> bool:
    """Whether a group's saved value is, or holds, a uniopt schedule (as data)."""
    if isinstance(value, (list, tuple)):
        return any(map(_schedule_in, value))
    return isinstance(value, dict) and value.get("$") == "record"


def plain_schedules(value: Any) -> Any:
    """``value`` (a param group's value) with each uniopt schedule (in a tuple too) replaced by
    its data: what torch's ``weights_only`` loader accepts. Anything else is left as it is, a
    schedule that holds what data cannot (a Python function: ``warmup(100, fn)``) too, as a
    function given alone is: ``state_dict()`` is torch's, which never refuses a group's value
    (the state dict copied in memory, a best-so-far checkpoint); ``torch.load`` of such a
    file then needs ``weights_only=False``, as for the function alone."""
    if isinstance(value, tuple):
        return tuple(plain_schedules(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, (type, Transform)) and \
            _type_name(type(value)) is not None:
        try:
            return to_data(value)
        except CheckpointError:
            return value
    return value


def schedules_from_plain(value: Any) -> Any:
    """The inverse of :func:`plain_schedules`."""
    if isinstance(value, (tuple, list)):
        return type(value)(schedules_from_plain(v) for v in value)
    if isinstance(value, dict) and value.get("$") == "record":
        return _Decode(patterns=False)(value, "a param group's schedule")
    return value
