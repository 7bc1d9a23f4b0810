"""Show under each notebook's title which versions produced its outputs, and when.

``make refresh`` (``mldeploy.book.notebooks.execute``) writes the facts into the notebook's metadata
under ``mldeploy.verified``; nothing here is typed by hand.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx


def stamp_text(verified: dict) -> str:
    """One line: versions first, then the date the outputs were produced."""
    return (
        f"验证环境 · Verified with Python {verified['python']} · torch {verified['torch']} · "
        f"onnxruntime {verified['onnxruntime']} · 输出生成于 · outputs produced {verified['date']}"
    )


def stamp_html(verified: dict) -> str:
    """The same line, its words marked by language so the language switch applies to them too."""
    versions = " · ".join(
        f"{name} {escape(str(verified[key]))}"
        for name, key in [("Python", "python"), ("torch", "torch"), ("onnxruntime", "onnxruntime")]
    )
    return (
        '<p class="verified-stamp"><span lang="zh">验证环境：</span>'
        '<span lang="en">Verified with </span>'
        f'{versions} · <span lang="zh">输出生成于 </span><span lang="en">outputs produced </span>'
        f"{escape(str(verified['date']))}</p>"
    )


def add_stamp(app: Sphinx, doctree: nodes.document) -> None:
    """Insert the stamp right after the first title of a notebook page that carries one."""
    source = Path(app.env.doc2path(app.env.docname))
    if source.suffix != ".ipynb":
        return
    verified = (
        json.loads(source.read_text(encoding="utf-8"))
        .get("metadata", {})
        .get("mldeploy", {})
        .get("verified")
    )
    section = next(iter(doctree.findall(nodes.section)), None)
    if not verified or section is None or not isinstance(section[0], nodes.title):
        return
    section.insert(1, nodes.raw("", stamp_html(verified), format="html"))


def setup(app: Sphinx) -> dict:
    app.connect("doctree-read", add_stamp)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
