"""What the ``uniopt`` command reads from its words: hyperparameter values, rules with their
hyperparameters (``adamw:lr=3e-4,weight_decay=0.1``) and schedule expressions
(``warmup(1000, cosine(3e-4, 100_000))``).

All of it goes through :mod:`ast` and a walk that accepts only literals (numbers, booleans,
``None``, strings, tuples, lists, dicts) and calls of uniopt's schedules by name: nothing the
user types is evaluated, imported or looked up anywhere else. A misspelled name is a
:class:`UsageError` that names the closest known ones.

>>> schedule("warmup(10, cosine(1e-3, 100))")
warmup(steps=10, then=cosine(init=0.001, steps=100, floor=0.0, exponent=1.0), init=0.0)
>>> value("(0.9, 0.99)"), value("False"), value("optax")
((0.9, 0.99), False, 'optax')
>>> [(r.name, r.hyper) for r in rules(["adamw:lr=3e-4,weight_decay=0.1,sgd"])]
[('adamw', {'lr': 0.0003, 'weight_decay': 0.1}), ('sgd', {})]
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import schedules as _schedules
from ..hyper import did_you_mean


class UsageError(Exception):
    """Bad input on the command line: the command prints the message and exits with 2."""


def unknown(kind: str, name: str, known: Iterable[str], listing: str = "") -> UsageError:
    """The error for a misspelled ``name`` of ``kind``: the closest names, then ``listing`` (a
    hint where the full list is) or, without one, every known name."""
    known = list(dict.fromkeys(known))
    tail = listing or f" (known: {', '.join(known)})"
    return UsageError(f"unknown {kind} {name!r}{did_you_mean(name, known)}{tail}")


# the schedules an expression may call, by name
SCHEDULES: dict[str, Callable[..., Any]] = {
    n: getattr(_schedules, n) for n in _schedules.__all__ if n not in ("Schedule", "as_schedule")
}
# ``uo.cosine(...)`` and ``uniopt.schedules.cosine(...)``, as copied from Python code
_PREFIXES = {"uo", "uniopt", "schedules"}


def split_top(text: str, sep: str = ",") -> list[str]:
    """``text`` split at each ``sep`` outside brackets and quotes, pieces stripped."""
    out, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    out.append(text[start:].strip())
    return out


def _call_name(node: ast.expr) -> str | None:
    """``cosine`` for ``cosine``, ``uo.cosine`` and ``uniopt.schedules.cosine``; else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = node.value
        while isinstance(base, ast.Attribute) and base.attr in _PREFIXES:
            base = base.value
        if isinstance(base, ast.Name) and base.id in _PREFIXES:
            return node.attr
    return None


def _convert(node: ast.expr, text: str) -> Any:
    """The value of a literal or schedule-call node; a UsageError for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float | str | None):
        return node.value  # bool is an int
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd)
            and isinstance(node.operand, ast.Constant)):
        v = node.operand.value
        if isinstance(v, int | float) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Tuple | ast.List):
        return tuple(_convert(e, text) for e in node.elts)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise UsageError(f"{text!r}: no ** in a dict")
        return {_convert(k, text): _convert(v, text)
                for k, v in zip(node.keys, node.values, strict=True) if k is not None}
    if isinstance(node, ast.Call):
        return _schedule_call(node, text)
    if isinstance(node, ast.Name):
        raise unknown("name", node.id, SCHEDULES, " (a value is a number, True/False/None, a "
                      "quoted string, a tuple or a schedule call)")
    what = ast.get_source_segment(text, node) or type(node).__name__
    raise UsageError(f"{text!r}: {what!r} is not a number, a tuple or a schedule call "
                     "(nothing is evaluated: write the value out)")


def _schedule_call(node: ast.Call, text: str) -> Any:
    name = _call_name(node.func)
    if name is None:
        what = ast.get_source_segment(text, node.func)
        raise UsageError(f"{text!r}: {what!r} is not a schedule (known: {', '.join(SCHEDULES)})")
    if name not in SCHEDULES:
        raise unknown("schedule", name, SCHEDULES)
    fn = SCHEDULES[name]
    params = inspect.signature(fn).parameters
    args = []
    for a in node.args:
        if isinstance(a, ast.Starred):
            raise UsageError(f"{text!r}: no * arguments")
        args.append(_convert(a, text))
    kwargs = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise UsageError(f"{text!r}: no ** arguments")
        if kw.arg not in params:
            raise unknown(f"argument of {name}", kw.arg, params)
        kwargs[kw.arg] = _convert(kw.value, text)
    try:
        return fn(*args, **kwargs)
    except ValueError as e:  # the schedule's own message, which names it
        raise UsageError(str(e)) from None
    except TypeError as e:  # missing or extra arguments: show the signature
        raise UsageError(f"{name}({', '.join(params)}): {e}") from None


def _expression(text: str) -> ast.expr:
    try:
        return ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise UsageError(f"{text!r} is not an expression: {e.msg}") from None


def schedule(text: str) -> Any:
    """The schedule that ``text`` writes as a call of uniopt's schedules, e.g.
    ``"warmup(1000, cosine(3e-4, 100_000))"``; a bare number is a constant schedule."""
    node = _expression(text)
    out = _convert(node, text)
    if isinstance(out, int | float) and not isinstance(out, bool):
        return _schedules.constant(float(out))
    if not callable(out):
        raise UsageError(f"{text!r} is not a schedule: write a call such as "
                         "'warmup(1000, cosine(3e-4, 100_000))'")
    return out


def value(text: str) -> Any:
    """A hyperparameter's value: a number, ``True``/``False``/``None``, a tuple, a schedule
    call, or else the text itself (``convention=optax``, ``shape=1-sqrt``)."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return text.strip()
    if isinstance(node, ast.Call):
        return _schedule_call(node, text)  # a schedule, or an error naming what is wrong
    try:
        return _convert(node, text)
    except UsageError:
        return text.strip()


def short(obj: Any) -> str:
    """A schedule as a short call: the required fields by position, the others only where
    they differ from their defaults (``cosine(0.03, 1000)``); anything else as its repr."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return repr(obj)
    args = []
    starred = {n for n, p in inspect.signature(type(obj)).parameters.items()
               if p.kind is p.VAR_POSITIONAL}  # product(*factors)
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        shown = short(v) if dataclasses.is_dataclass(v) else (
            "(" + ", ".join(short(x) for x in v) + ("," if len(v) == 1 else "") + ")"
            if isinstance(v, tuple) else repr(v))
        if f.name in starred:
            args += [short(x) for x in v]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            args.append(shown)
        elif v != f.default:
            args.append(f"{f.name}={shown}")
    return f"{type(obj).__name__}({', '.join(args)})"


@dataclass(frozen=True)
class RuleSpec:
    """A rule as written on the command line: its name, the hyperparameters given and the text
    that shows it in tables (``adamw:lr=0.0003,weight_decay=0.1``)."""

    name: str
    hyper: dict[str, Any] = field(default_factory=dict)
    texts: tuple[str, ...] = ()  # each KEY=VALUE as typed, spaces dropped

    @property
    def label(self) -> str:
        return self.name if not self.texts else f"{self.name}:{','.join(self.texts)}"


def given_twice(keys: list[str]) -> str:
    """The keys named more than once, sorted and joined ("" where none is)."""
    return ", ".join(sorted({k for k in keys if keys.count(k) > 1}))


def _assignment(text: str, where: str) -> tuple[str, Any, str]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise UsageError(f"{where}: expected KEY=VALUE, got {text!r}")
    return key, value(raw), f"{key}={''.join(raw.split())}"


def rules(texts: Sequence[str]) -> list[RuleSpec]:
    """Rule specs from ``--rules`` words: comma-separated rules, each ``NAME`` or
    ``NAME:KEY=VALUE,KEY=VALUE`` (a ``KEY=VALUE`` piece belongs to the rule before it)."""
    out: list[tuple[str, list[tuple[str, Any, str]]]] = []
    for text in texts:
        for piece in split_top(text):
            if not piece:
                continue
            head, colon, rest = piece.partition(":")
            if colon and "=" not in head:
                out.append((head.strip(), [_assignment(rest, head.strip())]))
            elif "=" in piece:
                if not out:
                    raise UsageError(f"{piece!r} comes before any rule: write NAME:{piece}")
                out[-1][1].append(_assignment(piece, out[-1][0]))
            else:
                out.append((piece, []))
    if not out:
        raise UsageError(f"no rule named in {' '.join(texts)!r}")
    specs = []
    for name, assigned in out:
        twice = given_twice([k for k, _, _ in assigned])
        if twice:
            raise UsageError(f"{name}: {twice} given twice")
        specs.append(RuleSpec(name, {k: v for k, v, _ in assigned},
                              tuple(t for _, _, t in assigned)))
    return specs
