"""mkdocs hooks (``hooks:`` in mkdocs.yml): the rule pages, generated from the registry at build
time (:mod:`uniopt.tools.docs`), the API reference's entries, generated from the public modules'
``__all__``, and MathJax copied into the site so the math renders offline.

A new rule gets its page and its place in the navigation with no hand edit: declaring its
``info`` puts it in the registry, and the registry is all this reads.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the checkout's uniopt, installed or not

from uniopt.tools import docs  # noqa: E402

# the files of MathJax's tex-chtml component the pages load (the rest loads on demand)
_MATHJAX = ("tex-chtml.js", "input/tex/extensions", "output/chtml/fonts/woff-v2", "ui")


def on_config(config: Any) -> Any:
    for entry in config["nav"]:
        if isinstance(entry, dict) and "Rules" in entry:
            entry["Rules"] = [e for e in entry["Rules"] if e != "rules/index.md"]
            entry["Rules"][1:1] = [{"Every rule": docs.nav()[0]}, *docs.nav()[1:]]
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for path, text in docs.pages().items():
        files.append(File.generated(config, path, content=text))
    return files


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri == "api.md":
        return docs.api_page(markdown)
    return markdown


def _mathjax_root() -> Path:
    try:
        import mathjax  # django-static-mathjax: MathJax 3's files in a wheel
    except ImportError as e:
        raise RuntimeError("the site's math needs MathJax: pip install -e '.[docs]' "
                           "(django-static-mathjax)") from e
    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"


def on_post_build(config: Any) -> None:
    src, dst = _mathjax_root(), Path(config["site_dir"]) / "assets" / "mathjax"
    for part in _MATHJAX:
        if (src / part).is_dir():
            shutil.copytree(src / part, dst / part, dirs_exist_ok=True)
        else:
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / part, dst / part)
