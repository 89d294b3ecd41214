"""A griffe extension (mkdocs.yml, mkdocstrings' ``extensions``): the API reference reads each
docstring as the rule pages do (:func:`uniopt.tools.docs.markdown_docstring`): reST roles as
code, rules linked to their pages, doctest lines as Python blocks."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import griffe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from uniopt.tools.docs import markdown_docstring  # noqa: E402


class MarkdownDocstrings(griffe.Extension):
    def on_instance(self, *, node: Any, obj: Any, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value, rules_dir="rules/")
