"""docs/coming-from/optax.md's map of every optax name, read from the page and held to the
installed optax: each optimizer, block and wrapper ``optax`` and ``optax.contrib`` export has
a row; each optimizer's rule is one whose registry entry names that optax function (so the
registry's parity tests hold it to optax); each pair of blocks gives optax's updates.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import uniopt as uo  # noqa: E402
from helpers import rel_diff  # noqa: E402
from uniopt import registry  # noqa: E402

PAGE = Path(__file__).resolve().parents[1] / "docs" / "coming-from" / "optax.md"

# optax's modules of optimizers, blocks and wrappers (its losses, schedules, tree and linear
# algebra helpers are not rules)
MODULES = ("optax._src.alias", "optax._src.transform", "optax._src.factorized",
           "optax._src.lookahead", "optax._src.linesearch", "optax.schedules._inject")
BASE = ("identity", "set_to_zero", "stateless", "stateless_with_tree_map")


def _exported() -> set[str]:
    """The installed optax's optimizers, blocks and wrappers, contrib's as ``contrib.name``."""
    names = set(BASE)
    for n in dir(optax):
        obj = getattr(optax, n)
        mod = getattr(obj, "__module__", "") or ""
        if n.startswith("_") or not callable(obj) or n[0].isupper() and n != "MultiSteps":
            continue
        if (mod in MODULES or mod.startswith("optax.transforms")
                or mod == "functools" and n in ("nadam", "nadamw")):
            names.add(n)
    contrib = importlib.import_module("optax.contrib")
    names |= {f"contrib.{n}" for n in dir(contrib) if not n.startswith("_")
              and callable(getattr(contrib, n)) and n[0].islower()}
    return names


def _table(title: str) -> list[tuple[str, str]]:
    """The rows of the page's table under ``### title``: (optax cell, uniopt cell)."""
    text = PAGE.read_text(encoding="utf-8")
    section = text[text.index(f"### {title}\n"):]
    section = section[:section.find("\n### ", 1)] if "\n### " in section[1:] else section
    rows = []
    for line in section.splitlines():
        if line.startswith("| `"):
            optax_cell, ours = line[2:-2].split(" | ", 1)
            rows.append((optax_cell, ours))
    return rows


def _names(cell: str) -> list[str]:
    return re.findall(r"`([\w.]+)`", cell)


def test_every_optax_name_has_a_row() -> None:
    rows = {n for title in ("Optimizers", "Everything else") for cell, _ in _table(title)
            for n in _names(cell)}
    rows |= {re.match(r"`optax\.(?:chain\(optax\.)?([\w.]+)\(", cell).group(1)  # type: ignore[union-attr]
             for cell, _ in _table("Blocks of the same arithmetic")}
    assert _exported() - rows == set()


@pytest.mark.parametrize(("name", "cell"), _table("Optimizers"), ids=lambda x: str(x)[:30])
def test_each_optimizer_row_is_a_rule_held_to_that_optax_function(name: str, cell: str) -> None:
    """The row's rule is the one the registry's parity tests hold to optax: a class whose entry
    names that optax function, built as those tests build it (optax's convention where the
    rule has one, nothing else but the learning rate)."""
    [expr] = re.findall(r"`(uo\.[^`]*)`", cell)[:1]
    rule = eval(expr, {"uo": uo, "lr": 0.1, "optimism": 0.05})
    optax_name = name.strip("`")
    if optax_name in ("optimistic_adam", "contrib.sam"):  # held below; a rule of a rule
        return
    cls = type(rule)
    assert f"optax.{optax_name}" in registry.entry(cls.__name__).references, (cls, optax_name)
    conventions = getattr(cls, "conventions", None) or {}
    kwargs: dict[str, Any] = {"convention": "optax"} if "optax" in conventions else {}
    if "lr" in cls.__dataclass_fields__ and "(lr" in expr:
        kwargs["lr"] = 0.1
    assert rule == cls(**kwargs), f"{expr} is not {cls.__name__}({kwargs})"


def test_the_other_rows_name_what_uniopt_has() -> None:
    """Every ``uo.<name>`` the last table writes is uniopt's."""
    written = {n for _, cell in _table("Everything else")
               for n in re.findall(r"`uo\.(\w+)", cell)}
    assert written and sorted(n for n in written if not hasattr(uo, n)) == []


def test_optaxs_first_optimistic_adam_is_the_rows_rule(jx: Any) -> None:
    """``optax.optimistic_adam(lr, optimism)`` (its first form, without a learning-rate
    multiplier after the optimistic block), 100 jitted steps in float64."""
    from free_run import TOL, run_optax, run_ours, worst_of

    lr, optimism = 0.02, 0.05
    ours = uo.optimistic_adam(1.0, alpha=lr, beta=optimism, convention="optax")
    assert worst_of(run_ours(ours, 4, steps=100),
                    run_optax(jx, optax.optimistic_adam(lr, optimism), 4, steps=100)) < TOL
    ours = uo.optimistic_adam(1.0, alpha=lr, beta=lr, convention="optax")  # optimism: lr
    assert worst_of(run_ours(ours, 5, steps=100),
                    run_optax(jx, optax.optimistic_adam(lr), 5, steps=100)) < TOL


@pytest.mark.parametrize(("theirs", "ours"), _table("Blocks of the same arithmetic"),
                         ids=lambda x: str(x)[:50])
def test_each_pair_of_blocks_gives_optaxs_updates(jx: Any, theirs: str, ours: str) -> None:
    """Ten steps of random gradients through optax's protocol (the params moved by optax's
    updates), NumPy float64 against optax's JAX, and the same keywords where optax's block
    and the row's uniopt block name them alike."""
    importlib.import_module("optax.contrib")
    [t_expr], [o_expr] = re.findall(r"`([^`]*)`", theirs)[:1], re.findall(r"`([^`]*)`", ours)[:1]
    t, o = eval(t_expr, {"optax": optax}), eval(o_expr, {"uo": uo})
    rng = np.random.default_rng(0)
    shapes = {"a": (3,), "b": (4, 5), "c": (6, 4)}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    jnp = jx.numpy
    s_t, s_o = t.init({k: jnp.asarray(v) for k, v in params.items()}), o.init(params)
    update = jx.jit(t.update)
    for _ in range(10):
        g = {k: rng.standard_normal(s) for k, s in shapes.items()}
        mine, s_o = o.update(g, s_o, params)
        want, s_t = update({k: jnp.asarray(v) for k, v in g.items()}, s_t,
                           {k: jnp.asarray(v) for k, v in params.items()})
        for k in g:
            assert rel_diff(np.asarray(mine[k]), np.asarray(want[k])) <= 1e-12, k
        params = {k: params[k] + np.asarray(want[k]) for k in g}
    # keywords: where the row builds both with defaults, each of optax's keywords is a field
    # of the block's, or the row names it (a keyword of another name, one not offered)
    if o_expr.endswith("()") and t_expr.endswith("()"):
        theirs_kw = set(inspect.signature(eval(t_expr[:-2], {"optax": optax})).parameters)
        fields = set(getattr(type(o), "__dataclass_fields__", {}))
        said = set(re.findall(r"`(\w+)`", ours))
        missing = theirs_kw - fields - said - {"mu_dtype"} if fields else set()
        assert not missing, f"{o_expr} has no field for optax's {sorted(missing)}"
