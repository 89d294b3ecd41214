"""The documentation site's rule pages, generated from the registry (:mod:`uniopt.registry`).

Each rule gets one page: its docstring (formulas written ``$$ ... $$`` or ``\\( ... \\)`` render
as math on the site), its hyperparameters with their defaults and valid ranges (the ``hyper``
fields of the record), the paper, the implementations its tests hold it to, its conventions (the
rule's section of the conventions page, :func:`uniopt.conventions.page`) and a runnable example:
the registry's own hyperparameters solving the generic quadratic within the rule's budget. The
site's build hook (docs/hooks.py) writes them, so a new rule gets a page without a hand edit;
tests/test_docs.py runs the examples.

>>> from uniopt.tools import docs
>>> docs.rule_page("adam").splitlines()[0]
'# adam'
>>> docs.nav()[0]
'rules/index.md'
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from functools import cache
from typing import Any

from .. import registry
from ..base import PerLeaf, Rule, Transform

# the page of the rules' overview, and the folder of the rule pages, inside docs/
RULES_DIR = "rules"

# reST roles in docstrings (:class:`~uniopt.x.y`) become code, linked where they name a rule
_ROLE = re.compile(r":(?:class|func|data|mod|meth|attr|obj):`~?([^`]+)`")


def _code_ref(target: str, here: str, rules_dir: str) -> str:
    """A role's target as Markdown: ``name`` in code, a link to its page when it is a rule."""
    short = target.rsplit(".", 1)[-1]
    if short in registry.entries() and short != here:
        return f"[`{short}`]({rules_dir}{short}.md)"
    return f"`{short}`"


def markdown_docstring(doc: str, here: str = "", rules_dir: str = "") -> str:
    """A docstring as Markdown: roles as code (rules linked), doctest lines fenced as Python,
    ``$$`` display formulas set apart by blank lines (arithmatex takes them as blocks only so).
    ``here``: the rule whose page this is (not linked to itself); ``rules_dir``: the rule pages'
    folder as seen from the page."""
    text = _ROLE.sub(lambda m: _code_ref(m.group(1), here, rules_dir), inspect.cleandoc(doc))
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith(">>>"):
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i].strip() if lines[i].lstrip().startswith((">>>", "..."))
                             else lines[i])
                i += 1
            out += ["```python", *block, "", "```"]
        elif lines[i].strip() == "$$":  # a display formula: a block of its own, blank-lined
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "$$"), i)
            out += ["", *lines[i:end + 1], ""]
            i = end + 1
        else:
            # Markdown starts a list only after a blank line; docstrings often omit it
            if (lines[i].startswith("- ") and out and out[-1].strip()
                    and not out[-1].startswith(("- ", " "))):
                out.append("")
            out.append(lines[i])
            i += 1
    return "\n".join(out)


def _range(f: dataclasses.Field[Any]) -> str:
    for kind, what in (("hyper", "number or schedule"), ("static", "number")):
        if kind in f.metadata:
            return f"{what}, {f.metadata[kind]}"
    return "fixed value (not a schedule)"


def _default_of(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`"
    if f.default_factory is not dataclasses.MISSING:
        return f"`{f.default_factory()!r}`"
    return "required"


def hyperparameter_table(cls: type[Rule]) -> str:
    """Each field of the rule: its default and what it takes (the valid range of a number)."""
    rows = ["| argument | default | takes |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.init:
            rows.append(f"| `{f.name}` | {_default_of(f)} | {_range(f)} |")
    return "\n".join(rows)


@cache
def _conventions_sections() -> dict[str, str]:
    from ..conventions import page

    out = {}
    for chunk in page().split("\n## ")[1:]:
        title, _, body = chunk.partition("\n")
        out[title.strip()] = body.strip()
    return out


def conventions_section(name: str) -> str | None:
    """The rule's section of the conventions page (None for a rule of one form)."""
    return _conventions_sections().get(name)


def _reference(ref: str) -> str:
    if ref == "formula":
        return "the paper's algorithm, written in the test itself"
    if ref.startswith("formula:"):
        return f"`{ref[len('formula:'):]}`'s formula, written in the test itself"
    return f"`{ref}`"


def _leaf_shape(rule: Rule, n: int) -> tuple[int, ...]:
    """A leaf of ``n`` elements the rule takes: a vector, else one row of a matrix."""
    for shape in [(n,), (1, n)]:
        if all(p.check_shape(shape) is None for p in rule.flat_parts if isinstance(p, PerLeaf)):
            return shape
    raise ValueError(f"{rule.name} takes neither a vector nor a matrix of {n}")


def _schedule_names(example: dict[str, Any]) -> list[str]:
    """The names of :mod:`uniopt.schedules` that the example's schedules are built from."""
    from .. import schedules

    found = re.findall(r"([A-Za-z_]\w*)\(", " ".join(repr(v) for v in example.values()
                                                      if callable(v)))
    return sorted({n for n in found if hasattr(schedules, n)})


def _argument(v: Any) -> str:
    """An example's value as Python: a rule as the call that builds it (``uo.sgd(lr=0.1)``),
    a schedule as its record (its names imported), anything else as its ``repr``."""
    if isinstance(v, Transform):
        from ..conventions import call

        return call(v) if isinstance(v, Rule) else f"uo.{v!r}"
    return repr(v)


def example(name: str, steps: int | None = None) -> str:
    """A doctest: the registry's example hyperparameters of ``name`` solving the generic
    quadratic (curvatures 1..100, minimum at 1) to 1e-4 of its initial loss within the
    rule's budget, stepped as the rule is driven (``update``, its extra arguments, or
    ``minimize_step``). ``steps``: that many steps instead, and no check of the loss."""
    e = registry.entry(name)
    args = ", ".join(f"{k}={_argument(v)}" for k, v in e.example.items())
    uses = _schedule_names(e.example)
    shape = _leaf_shape(e.rule(**e.example), 10)
    lines = [
        ">>> import numpy as np",
        ">>> import uniopt as uo",
        *([f">>> from uniopt.schedules import {', '.join(uses)}"] if uses else []),
        ">>> d = np.linspace(1.0, 100.0, 10)  # curvatures: condition number 100",
        ">>> def loss_and_grad(p):",
        "...     x = p['x'].ravel()",
        "...     g = (d * (x - 1.0)).reshape(p['x'].shape)",
        "...     return 0.5 * np.sum(d * (x - 1.0) ** 2), {'x': g}",
        f">>> params = {{'x': np.zeros({shape})}}",
        ">>> start, _ = loss_and_grad(params)",
        f">>> state = uo.setup(uo.{name}({args}), params)",
        *([">>> def hvp(v):  # Hessian-vector products: the quadratic's Hessian is diag(d)",
           "...     return {'x': (d * v['x'].ravel()).reshape(v['x'].shape)}"]
          if "hvp" in e.step_args else []),
        f">>> for _ in range({e.budget if steps is None else steps}):",
    ]
    if e.needs_closure:
        lines.append("...     state, params, loss = uo.minimize_step(state, params, loss_and_grad)")
    else:
        lines.append("...     loss, grads = loss_and_grad(params)")
        given = {"value": "value=loss", "grad": "grad=grads", "value_fn": "value_fn=loss_and_grad",
                 "hvp": "hvp=hvp"}
        extra = "".join(f", {given[k]}" for k in e.step_args)
        lines.append(f"...     state, params = uo.update(state, params, grads{extra})")
    if steps is None:
        lines += [">>> bool(loss_and_grad(params)[0] <= 1e-4 * start)", "True"]
    return "\n".join(lines)


def _signature(cls: type[Rule]) -> str:
    args = []
    for f in dataclasses.fields(cls):
        if f.init:
            args.append(f.name if f.default is dataclasses.MISSING else f"{f.name}={f.default!r}")
    one_line = f"uo.{cls.__name__}({', '.join(args)})"
    if len(one_line) <= 88:
        return one_line
    return "\n".join([f"uo.{cls.__name__}(", *(f"    {a}," for a in args), ")"])


def _facts(e: registry.Entry) -> list[str]:
    backends = ", ".join(e.backends)
    facts = [
        f"- **family**: {e.family}; **paper**: {e.paper}",
        f"- **state slots**: {', '.join(f'`{s}`' for s in e.slots) or 'none'}",
        f"- **runs on**: {backends}"
        + ("" if e.jit else "; its step does not trace under `jax.jit`"),
        f"- **parameters**: {'real and complex' if e.complex else 'real only'}",
    ]
    if e.needs_closure:
        facts.append("- **stepped with** `uo.minimize_step(state, params, closure)`: the rule "
                     "evaluates the objective itself")
    if e.step_args:
        facts.append("- **the step reads** " + ", ".join(f"`{a}=`" for a in e.step_args)
                     + " besides the gradient (`uo.update(state, params, grads, ...)`)")
    return facts


def rule_page(name: str) -> str:
    """The Markdown page of the rule called ``name``."""
    e = registry.entry(name)
    cls = e.rule
    doc = markdown_docstring(cls.__doc__ or "", here=name)
    held = [f"- {_reference(r)}" for r in e.references] or ["- none yet"]
    tol = ("to 1e-12 relative in float64" if e.rtol <= 1e-12
           else f"to {e.rtol:g} relative in float64 (the reason is written beside it in the test)")
    out = [
        f"# {name}",
        "",
        f"<!-- Generated from uniopt.registry by docs/hooks.py (uniopt.tools.docs): edit "
        f"the docstring of {cls.__module__}.{name} or its info, not this page. -->",
        "",
        *_facts(e),
        "",
        "```text",
        _signature(cls),
        "```",
        "",
        "## The update",
        "",
        doc,
        "",
        "## Arguments",
        "",
        "A number or schedule argument takes a number or a schedule (`uo.schedules`); its "
        "range is checked when the rule is built and on every value a schedule produces.",
        "",
        hyperparameter_table(cls),
        "",
        "## Held to",
        "",
        f"Its parity tests compare it, {tol}, with:",
        "",
        *held,
        "",
    ]
    section = conventions_section(name)
    out += ["## Frameworks", ""]
    if section:
        out += [f"As on the [conventions page](../conventions.md#{name}):", "",
                section.replace("](", "](../"), ""]
    else:
        out += ["One form: no second framework's form is recorded "
                "(see the [conventions page](../conventions.md)).", ""]
    out += [
        "## Example",
        "",
        f"The registry's example hyperparameters, `{e.example}`, solve an ill-conditioned "
        f"quadratic within the rule's budget of {e.budget} steps:",
        "",
        "```python",
        example(name),
        "",
        "```",
        "",
    ]
    return "\n".join(out)


def index_page() -> str:
    """The rules' index: every rule by family, with its paper and the peers it is held to."""
    out = ["# Every rule", "",
           "<!-- Generated from uniopt.registry by docs/hooks.py. -->", "",
           "Each rule has a page generated from its docstring and its registry entry; the "
           "[rules overview](../rules-overview.md) has the formulas side by side. \"held to\": the "
           "implementations its parity tests compare it with (`formula:` where the test writes "
           "the published algorithm itself).", ""]
    for family, names in families().items():
        out += [f"## {family}", "", "| rule | paper | held to | state slots | notes |",
                "|---|---|---|---|---|"]
        for n in names:
            e = registry.entry(n)
            held = ", ".join(f"`{r}`" for r in e.references) or "—"
            out.append(f"| [`{n}`]({n}.md) | {e.paper} | {held} | "
                       f"{', '.join(e.slots) or '—'} | {registry.notes(e) or '—'} |")
        out.append("")
    return "\n".join(out)


def families() -> dict[str, list[str]]:
    """The rules' names by family, families in alphabetical order."""
    out: dict[str, list[str]] = {}
    for n, e in registry.entries().items():
        out.setdefault(e.family, []).append(n)
    return {f: sorted(out[f]) for f in sorted(out)}


def nav() -> list[Any]:
    """The site navigation's entries under "Rules": the index, then each family's pages."""
    return [f"{RULES_DIR}/index.md",
            *({family: [{n: f"{RULES_DIR}/{n}.md"} for n in names]}
              for family, names in families().items())]


def pages() -> dict[str, str]:
    """Every generated page, by its path inside docs/."""
    out = {f"{RULES_DIR}/index.md": index_page()}
    out.update({f"{RULES_DIR}/{n}.md": rule_page(n) for n in registry.entries()})
    return out



# --- the API reference ---------------------------------------------------------------------------

# docs/api.md holds the prose; each `<!-- api: section -->` line of it becomes that section's
# entries (api_page, called by the build hook), so a name added to a public ``__all__`` gets its
# entry with no hand edit. uniopt's public modules, each with the section of its ``__all__``:
API_MODULES = {"schedules": "schedules", "checkpoint": "checkpoints",
               "conventions": "conventions", "memory": "memory", "registry": "registry",
               "torch": "torch"}
# the section of a name of ``uniopt.__all__`` that is not a rule, by the module defining it: the
# first prefix that matches
_HOMES = (("uniopt.engine", "stepping"), ("uniopt.state", "stepping"), ("uniopt.tree", "stepping"),
          ("uniopt.combine", "combinators"), ("uniopt.transforms.average", "combinators"),
          ("uniopt.transforms.", "transforms"), ("uniopt.rules.", "building-blocks"),
          ("uniopt.base", "parts"), ("uniopt.checkpoint", "checkpoints"),
          ("uniopt.conventions", "conventions"), ("uniopt.interop.", "interop"))
_MARKER = re.compile(r"^<!-- api: ([\w-]+) -->$", re.M)


def static_all(module: str) -> list[str]:
    """A uniopt module's ``__all__``, read from its source without importing it (uniopt.torch
    would import torch, which building the site does not need)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if (isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)):
            return list(ast.literal_eval(node.value))
    raise ValueError(f"{module} has no __all__")


def _home(name: str, obj: Any) -> str:
    if name in registry.entries():
        return "rules"
    if name == "chain":  # base's one function: the combinator every other builds on
        return "combinators"
    where = getattr(obj, "__module__", "")
    for prefix, section in _HOMES:
        if where == prefix or (prefix.endswith(".") and where.startswith(prefix)):
            return section
    raise ValueError(f"uniopt.{name} (from {where}) has no section in the API reference: "
                     "add its module to uniopt.tools.docs._HOMES")


def api_sections() -> dict[str, list[str]]:
    """Every public name's dotted path by the API reference's section: ``uniopt.__all__`` (its
    rules in "rules", the rest by the module that defines them) and each public module's
    ``__all__`` (:data:`API_MODULES`). A module's name that is also a name of ``uniopt`` (``save``
    is ``uniopt.checkpoint.save``) is listed once, as ``uniopt``'s; in a section the names go
    by their defining module, then alphabetically."""
    import importlib

    import uniopt

    out: dict[str, list[tuple[str, str]]] = {}
    top = {}
    for name in uniopt.__all__:
        obj = getattr(uniopt, name)
        if inspect.ismodule(obj):
            continue  # its names are listed under its own section
        top[id(obj)] = name
        out.setdefault(_home(name, obj), []).append((getattr(obj, "__module__", ""), name))
    for module, section in API_MODULES.items():
        names = static_all(f"uniopt.{module}")
        objs = (importlib.import_module(f"uniopt.{module}") if module != "torch" else None)
        for name in names:
            if objs is not None and id(getattr(objs, name)) in top:
                continue
            out.setdefault(section, []).append((f"uniopt.{module}", f"{module}.{name}"))
    return {s: [f"uniopt.{n}" for _, n in sorted(v)] for s, v in out.items()}


def _api_entries(section: str, paths: list[str]) -> str:
    if section == "rules":
        return "\n".join(f"- **{family}**: " + ", ".join(f"[`{n}`]({RULES_DIR}/{n}.md)"
                                                         for n in names)
                         for family, names in families().items())
    return "\n\n".join(f"::: {p}" for p in paths)


def api_page(text: str) -> str:
    """docs/api.md with each ``<!-- api: section -->`` line replaced by the section's entries:
    a ``::: path`` (mkdocstrings) per name, or for "rules" a link to each rule's page."""
    sections = api_sections()
    named = _MARKER.findall(text)
    unknown = sorted(set(named) - set(sections) - {"rules"})
    missing = sorted(set(sections) - set(named))
    if unknown or missing:
        raise ValueError(f"docs/api.md: no section {unknown}; no place for section {missing}")
    return _MARKER.sub(lambda m: _api_entries(m.group(1), sections.get(m.group(1), [])), text)
