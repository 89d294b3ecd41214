"""Every rule uniopt has, as data: each rule's :class:`~uniopt.base.Info` (family, paper, the
implementations it is held to, whether it needs a closure or takes complex numbers, its parity
tolerance, hyperparameters for the generic problems) and the state slots its parts keep.

The generic test suite, the README's rule table and ``uniopt rules`` read this, so a new rule is
listed, documented and tested by declaring its ``info``, never by a special case by name.

>>> from uniopt import registry
>>> registry.entry("adam").references[:1]
('torch.optim.Adam',)
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import cache
from typing import Any

from . import rules as _rules_package
from .base import Info, Part, Rule, Transform, declared
from .hyper import did_you_mean

__all__ = ["Entry", "as_dict", "entries", "entry", "names", "notes", "table"]


@dataclass(frozen=True)
class Entry:
    """A rule's :class:`~uniopt.base.Info` with its name, class, and what its example's parts
    declare (``Info.example``, the instance the registry's tests run: SGD's, with momentum,
    keeps a momentum buffer, where ``uo.sgd()`` keeps none): their ``slots``, the step's
    extra arguments they must be handed (``step_args``: ``"value"``, the loss at params;
    ``"grad"``, its gradient; ``"value_fn"``, the objective; ``"hvp"``, Hessian-vector
    products), and the array API's ``linalg`` functions they call (``"eigh"``), which an
    array-API library without them (dask's) is refused for at set-up."""

    name: str
    rule: type[Rule]
    info: Info
    slots: tuple[str, ...]
    step_args: tuple[str, ...]
    linalg: tuple[str, ...]

    def __getattr__(self, field: str) -> Any:
        return getattr(self.info, field)  # entry.family, entry.paper, ...


def _slots(t: Transform) -> tuple[str, ...]:
    if isinstance(t, Part):
        return tuple(t.slots)
    return tuple(s for p in t.parts() for s in _slots(p))


@cache
def entries() -> dict[str, Entry]:
    """Every rule with an ``info``, by name, in the order of ``uniopt.rules``' modules."""
    found: dict[str, Entry] = {}
    for module in pkgutil.iter_modules(_rules_package.__path__):
        mod = importlib.import_module(f"{_rules_package.__name__}.{module.name}")
        for obj in vars(mod).values():
            if (isinstance(obj, type) and issubclass(obj, Rule) and obj.__module__ == mod.__name__
                    and obj.info is not None):
                example = obj(**obj.info.example)
                found[obj.__name__] = Entry(obj.__name__, obj, obj.info, _slots(example),
                                            declared(example, "step_args"),
                                            declared(example, "linalg"))
    return found


def entry(name: str) -> Entry:
    """The registry's entry for the rule called ``name``; a KeyError naming the closest names."""
    table = entries()
    if name not in table:
        raise KeyError(f"no rule named {name!r}{did_you_mean(name, table)}")
    return table[name]


def names() -> list[str]:
    return list(entries())


# the array libraries a rule runs on unless its info says fewer
ALL_BACKENDS: tuple[str, ...] = Info(family="", paper="").backends


def notes(e: Entry) -> str:
    """What sets a rule apart from the run of them, in words: a closure, real params only, no
    ``jax.jit``, array libraries it does not run on."""
    out = []
    if e.needs_closure:
        out.append("closure (`minimize_step`)")
    if not e.complex:
        out.append("real only")
    if not e.jit:
        out.append("no `jax.jit`")
    missing = [b for b in ALL_BACKENDS if b not in e.backends]
    if missing:
        out.append(f"not on {', '.join(missing)}")
    if e.linalg and "array_api" in e.backends:
        out.append(f"on array_api, a library with `linalg.{'`, `linalg.'.join(e.linalg)}`")
    return "; ".join(out)


def table() -> str:
    """The README's rule table (Markdown), generated from the registry."""
    rows = ["| rule | family | paper | held to | state slots | notes |",
            "|---|---|---|---|---|---|"]
    for e in entries().values():
        held = ", ".join(f"`{r}`" for r in e.references) or "—"
        rows.append(f"| `{e.name}` | {e.family} | {e.paper} | {held} | "
                    f"{', '.join(e.slots) or '—'} | {notes(e) or '—'} |")
    return "\n".join(rows)


def _plain(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return repr(v)  # a schedule: its record, as Python would build it


def as_dict(e: Entry) -> dict[str, Any]:
    """``e`` as plain data (JSON): the info's fields, what the example's parts declare, and
    the rule's module; a schedule among the example's values as its ``repr``."""
    import dataclasses

    info = {f.name: _plain(getattr(e.info, f.name)) for f in dataclasses.fields(e.info)}
    info["example"] = {k: _plain(v) for k, v in e.info.example.items()}
    return {"name": e.name, "module": e.rule.__module__, **info, "slots": list(e.slots),
            "step_args": list(e.step_args), "linalg": list(e.linalg), "notes": notes(e)}
