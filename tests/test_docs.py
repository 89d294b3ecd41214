"""The documentation site (docs/, mkdocs.yml): every Python block of every page runs, the rule
pages generated from the registry exist for every rule and their examples run, and no internal
link or anchor is broken.

A page's ```python blocks run in order in one namespace per page, as the README's run in one
doctest: a block with ``>>>`` prompts is a doctest (its output compared), any other Python
block is executed; blocks in other languages (bash, text, julia) are not run. The site build
itself (``mkdocs build --strict``, which checks the same links) is in .ci/run, not here.
"""

from __future__ import annotations

import doctest
import importlib.util
import posixpath
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from uniopt import registry
from uniopt.tools import docs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))

# a fenced block at any indentation: its language and its body
FENCE = re.compile(r"^( *)```(\w*)[^\n]*\n(.*?)^\1```", re.M | re.S)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """Each ```python block of ``text``: its first line's number and its dedented body."""
    out = []
    for m in FENCE.finditer(text):
        if m.group(2) in ("python", "py", "pycon"):
            indent = len(m.group(1))
            body = "\n".join(line[indent:] for line in m.group(3).splitlines())
            out.append((text.count("\n", 0, m.start()) + 2, body + "\n"))
    return out


def run_blocks(name: str, text: str) -> None:
    """Runs ``text``'s Python blocks in one namespace; fails with the doctest's report."""
    globs: dict[str, Any] = {"__name__": f"docs.{name}"}
    parser = doctest.DocTestParser()
    for line, body in python_blocks(text):
        where = f"{name}:{line}"
        if ">>>" in body:
            test = parser.get_doctest(body, globs, where, name, line)
            report: list[str] = []
            result = doctest.DocTestRunner(verbose=False).run(test, out=report.append,
                                                              clear_globs=False)
            assert result.failed == 0, f"{where}:\n" + "".join(report)
            globs = test.globs
        else:
            exec(compile(body, where, "exec"), globs)


# pages whose blocks import torch, keras, flax, equinox or orbax and compile JAX programs: 5 to
# 20 s each on a 2-core machine, most of it the imports
SLOW_PAGES = {"jax.md", "recipes.md", "torch.md", "optax.md", "coming-from/torch.md",
              "coming-from/optax.md",
              "coming-from/keras.md"}


@pytest.fixture
def framework_settings() -> Any:
    """Puts back what a page may set for its own comparisons: JAX's x64, keras's backend."""
    import os

    backend = os.environ.get("KERAS_BACKEND")
    jax = sys.modules.get("jax")
    x64 = bool(jax.config.jax_enable_x64) if jax else False
    yield
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_enable_x64", x64)
    if backend is None:
        os.environ.pop("KERAS_BACKEND", None)
    else:
        os.environ["KERAS_BACKEND"] = backend


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES
                                  else p for p in PAGES])
def test_page_code_runs(page: str, framework_settings: Any) -> None:
    try:
        run_blocks(page, (DOCS / page).read_text(encoding="utf-8"))
    except ModuleNotFoundError as e:  # (the core alone: .ci/run's oldest-dependencies run)
        root = (e.name or "").split(".")[0]
        if root in EXTRAS and importlib.util.find_spec(root) is None:
            pytest.skip(f"{page} uses {root}, which is not installed")
        raise


# what pages import beyond the core: a page using one that is missing is skipped, not failed
EXTRAS = {"torch", "jax", "optax", "flax", "equinox", "orbax", "keras", "lightning",
          "transformers", "accelerate", "matplotlib", "rich", "safetensors", "scipy"}


def test_blocks_are_found_and_other_languages_skipped() -> None:
    text = ("x\n```python\n>>> 1 + 1\n2\n\n```\n```bash\nexit 1\n```\n"
            "- item\n\n    ```python\n    y = 3\n    ```\n")
    blocks = python_blocks(text)
    assert [b for _, b in blocks] == [">>> 1 + 1\n2\n\n", "y = 3\n"]
    assert [line for line, _ in blocks] == [3, 13]
    run_blocks("t.md", text)


def test_a_failing_block_fails_with_its_place() -> None:
    with pytest.raises(AssertionError, match=r"t\.md:3"):
        run_blocks("t.md", "x\n```python\n>>> 1 + 1\n3\n```\n")
    with pytest.raises(ZeroDivisionError):
        run_blocks("t.md", "```python\n1 / 0\n```\n")


# --- the generated rule pages -------------------------------------------------------------------


def test_every_rule_has_a_page_in_the_nav() -> None:
    pages = docs.pages()
    for name in registry.names():
        page = pages[f"rules/{name}.md"]
        assert page.startswith(f"# {name}\n")
        for part in ("## The update", "## Arguments", "## Held to", "## Frameworks", "## Example"):
            assert part in page, (name, part)
    in_nav = {p for family in docs.nav()[1:] for group in family.values() for e in group
              for p in e.values()}
    assert in_nav == {f"rules/{n}.md" for n in registry.names()}


def test_docstring_formulas_are_closed() -> None:
    """Every ``$$`` that opens a display formula in a rule's docstring closes it: an unclosed
    one would swallow the rest of the page into the formula."""
    for name in registry.names():
        doc = registry.entry(name).rule.__doc__ or ""
        fences = [line for line in doc.splitlines() if line.strip() == "$$"]
        assert len(fences) % 2 == 0, name


def test_rule_page_lists_ranges_and_conventions() -> None:
    page = docs.rule_page("adam")
    assert "| `betas` | `(0.9, 0.999)` | number or schedule, in [0, 1) |" in page
    assert "| `amsgrad` | `False` | fixed value (not a schedule) |" in page
    assert "`uo.adam(convention='keras')`" in page
    assert "`Optimisers.Adam`'s formula" in page
    assert "One form" in docs.rule_page("fromage")


def test_docstring_roles_become_code_and_rule_links() -> None:
    text = docs.markdown_docstring(
        """A :class:`~uniopt.rules.adam.adamw` or :func:`uniopt.setup`.

        >>> 1 + 1
        2
        """, here="adam")
    assert "[`adamw`](adamw.md)" in text and "`setup`" in text
    assert "```python\n>>> 1 + 1\n2\n\n```" in text
    assert "[`adam`]" not in docs.markdown_docstring(":class:`adam`", here="adam")
    # the API reference (docs/griffe_markdown.py) links from the site's root
    assert docs.markdown_docstring(":class:`adam`", rules_dir="rules/") == "[`adam`](rules/adam.md)"
    listed = docs.markdown_docstring("Options:\n- ``a``: one,\n  two.\n- ``b``.")
    assert listed == "Options:\n\n- ``a``: one,\n  two.\n- ``b``."
    math = docs.markdown_docstring("Where\n$$\nx^2\n$$\nafter.")
    assert math == "Where\n\n$$\nx^2\n$$\n\nafter."


@pytest.mark.parametrize("name", ["adam", "lbfgs", "lbfgs_linesearch", "radam", "sam"])
def test_rule_page_runs(name: str) -> None:
    """The whole page, its example to the end of the budget, for one of each way a rule is
    driven: update, minimize_step, the step's extra arguments; a schedule and a rule among
    the example's hyperparameters. That every rule's example converges within its budget is
    tests/test_registry.py's convergence test, on the same problem."""
    run_blocks(f"rules/{name}.md", docs.rule_page(name))


def test_every_rule_example_starts() -> None:
    """Every rule's example builds its rule and takes two steps (the code of every page)."""
    for name in registry.names():
        run_blocks(f"rules/{name}.md", f"```python\n{docs.example(name, steps=2)}\n\n```\n")


def test_a_rule_no_leaf_fits_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    monkeypatch.setattr(docs, "PerLeaf", SimpleNamespace)
    picky = SimpleNamespace(check_shape=lambda shape: "takes no leaf")
    rule = SimpleNamespace(name="picky", flat_parts=[picky])
    with pytest.raises(ValueError, match="picky takes neither a vector nor a matrix of 10"):
        docs._leaf_shape(rule, 10)  # type: ignore[arg-type]


def test_an_unknown_rule_has_no_page() -> None:
    with pytest.raises(KeyError, match="no rule named 'adamx'"):
        docs.rule_page("adamx")


# --- the API reference ---------------------------------------------------------------------------


def api_page() -> str:
    return docs.api_page((DOCS / "api.md").read_text(encoding="utf-8"))


def test_every_public_name_is_in_the_api_reference() -> None:
    """Each name of ``uniopt.__all__`` (a rule: a link to its page), and each name of the
    ``__all__`` of uniopt's public modules and of uniopt.torch, has its entry in the API
    reference (a name that is also uniopt's, ``uniopt.checkpoint.save``, as ``uniopt.save``)."""
    import inspect

    import uniopt

    page = api_page()
    missing = []
    modules = {n: getattr(uniopt, n) for n in uniopt.__all__
               if inspect.ismodule(getattr(uniopt, n))}
    assert set(modules) >= {"schedules", "checkpoint", "conventions", "memory", "registry"}
    for name in uniopt.__all__:
        if name in modules:
            continue
        entry = (f"[`{name}`](rules/{name}.md)" if name in registry.names()
                 else f"::: uniopt.{name}\n")
        if entry not in page + "\n":
            missing.append(f"uniopt.{name}")
    public = [(m, n) for m, mod in modules.items() for n in mod.__all__]
    public += [("torch", n) for n in docs.static_all("uniopt.torch")]  # without importing torch
    for module, name in public:
        also_top = (name in uniopt.__all__
                    and getattr(uniopt, name) is getattr(modules.get(module), name, None))
        path = f"uniopt.{name}" if also_top else f"uniopt.{module}.{name}"
        if f"::: {path}\n" not in page + "\n":
            missing.append(f"uniopt.{module}.{name}")
    assert missing == []
    assert "::: uniopt.torch.Optimizer\n" in page and "::: uniopt.schedules.cosine\n" in page


def test_static_all_reads_a_modules_all() -> None:
    from uniopt import schedules

    assert docs.static_all("uniopt.schedules") == schedules.__all__


def test_api_page_needs_a_place_for_every_section() -> None:
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match=r"no place for section \['memory'\]"):
        docs.api_page(text.replace("<!-- api: memory -->", ""))
    with pytest.raises(ValueError, match=r"no section \['nowhere'\]"):
        docs.api_page(text + "\n<!-- api: nowhere -->\n")


def test_a_public_name_from_an_unknown_module_is_refused() -> None:
    with pytest.raises(ValueError, match=r"uniopt.thing \(from uniopt.elsewhere\)"):
        docs._home("thing", type("thing", (), {"__module__": "uniopt.elsewhere"}))


# --- links -------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """Python-Markdown's toc anchor of a heading."""
    import unicodedata

    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(text: str) -> set[str]:
    outside = FENCE.sub("", text)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", outside, re.M)}


def all_pages() -> dict[str, str]:
    out = {p: (DOCS / p).read_text(encoding="utf-8") for p in PAGES}
    out["api.md"] = docs.api_page(out["api.md"])  # as the build hook expands it
    return out | docs.pages()


def broken_links(pages: dict[str, str]) -> list[str]:
    bad = []
    for page, text in pages.items():
        for target in LINK.findall(FENCE.sub("", text)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = posixpath.normpath(posixpath.join(posixpath.dirname(page), path)) \
                if path else page
            if dest not in pages:
                bad.append(f"{page}: {target} (no page {dest})")
            elif anchor and anchor not in anchors(pages[dest]):
                bad.append(f"{page}: {target} (no heading #{anchor} in {dest})")
    return bad


def test_no_broken_internal_links() -> None:
    assert broken_links(all_pages()) == []


def test_broken_links_are_found() -> None:
    pages = {"a.md": "# Top\n[x](b.md#nowhere) [y](c.md) [z](#top) [w](https://e.org/q)",
             "b.md": "# B\n```python\n# not a heading\n```\n"}
    assert broken_links(pages) == ["a.md: b.md#nowhere (no heading #nowhere in b.md)",
                                   "a.md: c.md (no page c.md)"]


def test_no_two_pages_share_an_address() -> None:
    """With directory URLs ``a.md`` and ``a/index.md`` are both ``a/``: one would be lost."""
    urls: dict[str, str] = {}
    for page in all_pages():
        url = page.removesuffix(".md").removesuffix("index").rstrip("/")
        assert url not in urls, f"{page} and {urls[url]} are both served at {url}/"
        urls[url] = page


def test_nav_names_every_page() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in PAGES:
        if not page.startswith("_"):
            assert f" {page}" in nav, f"{page} is not in mkdocs.yml's nav"


# --- the build hook ------------------------------------------------------------------------------


def _hooks() -> Any:
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hook_puts_the_rules_in_the_nav() -> None:
    config = {"nav": [{"Home": "index.md"}, {"Rules": [{"Overview": "rules-overview.md"}]}]}
    rules = _hooks().on_config(config)["nav"][1]["Rules"]
    assert rules[:2] == [{"Overview": "rules-overview.md"}, {"Every rule": "rules/index.md"}]
    assert len(rules) == 2 + len(docs.families())


def test_hook_without_mathjax_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mathjax", None)
    with pytest.raises(RuntimeError, match=r"\.\[docs\]"):
        _hooks()._mathjax_root()


# --- the README: what a newcomer needs first, and links to the site ------------------------------


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_and_getting_started_agree_on_installing() -> None:
    """The install commands and the paragraph after them are the same text in both (the
    README's links go into docs/)."""
    def install(text: str) -> str:
        found = re.search(r"^```bash\npip install .*?^Requires Python.*?\n\n", text, re.M | re.S)
        assert found, "no install commands and requirements paragraph"
        return found.group(0).replace("](docs/", "](")

    assert install(readme()) == install((DOCS / "getting-started.md").read_text(encoding="utf-8"))


def test_readme_keeps_the_set_up_commands_and_the_rule_table() -> None:
    text = readme()
    first = FENCE.search(text)
    assert first and first.group(2) == "bash"
    commands = [line.split("#")[0].strip() for line in first.group(3).splitlines()]
    assert commands == ["pip install . && uniopt compare", 'pip install -e ".[test]" && pytest']
    found = re.search(r"<!-- rules:start -->\n(.*?)\n<!-- rules:end -->", text, re.S)
    assert found and found.group(1).strip() == registry.table(), (
        "the README's rule table is stale: paste `uniopt rules` between its markers")


def test_readme_links_resolve_from_the_root() -> None:
    """Its links are written for the repository's root, where it stands."""
    text = readme()
    bad = []
    for target in LINK.findall(FENCE.sub("", text)):
        path, _, anchor = target.partition("#")
        if re.match(r"[a-z]+:", target) or not path:
            continue
        if not (ROOT / path).exists():
            bad.append(target)
        elif anchor and path.endswith(".md"):
            if anchor not in anchors((ROOT / path).read_text(encoding="utf-8")):
                bad.append(target)
    assert bad == []


def test_the_keras_page_maps_every_keras_optimizer() -> None:
    """Every class ``keras.optimizers`` exports (the installed keras's, so a new one fails
    here) has a row in docs/coming-from/keras.md, and the rule each row writes is made as
    written."""
    import uniopt as uo
    from helpers import keras_on_jax

    keras = keras_on_jax()
    page = (DOCS / "coming-from" / "keras.md").read_text(encoding="utf-8")
    table = page[page.index("Every optimizer in `keras.optimizers`"):]
    rows = {}
    for line in table.splitlines():
        cells = line.split(" | ")
        if line.startswith("| `") and len(cells) == 2:
            for name in re.findall(r"`(\w+)`", cells[0]):
                rows[name] = cells[1]
    exported = {n for n, obj in vars(keras.optimizers).items()
                if isinstance(obj, type) and n[0].isupper() and n != "Optimizer"}
    assert exported - set(rows) == set()
    for name, cell in rows.items():
        made = re.match(r"`(uo\.\w+\([^`]*\))`", cell)
        if made and "..." not in made.group(1):
            assert isinstance(eval(made.group(1), {"uo": uo}), uo.Transform), name


def test_the_public_names_are_listed_once_and_exist() -> None:
    # (from_optax was listed twice; the public modules offered their imports, np, os, json...,
    # to tab completion)
    import uniopt.checkpoint
    import uniopt.memory
    import uniopt.registry

    modules = [uniopt, uniopt.checkpoint, uniopt.memory, uniopt.registry]
    if importlib.util.find_spec("torch") is not None:  # (the oldest-dependencies leg has none)
        import uniopt.torch

        modules.append(uniopt.torch)
    for module in modules:
        names = module.__all__
        assert len(names) == len(set(names)), module.__name__
        assert all(hasattr(module, n) for n in names), module.__name__
    assert {"np", "os", "json"}.isdisjoint(uniopt.checkpoint.__all__)
