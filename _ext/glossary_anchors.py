"""Let ``[推理](../chapters/glossary.md#inference)`` resolve in the book.

The glossary marks each term with a plain ``<a id="inference"></a>`` so the same link also lands on
the entry on GitHub. MyST only knows heading slugs as link targets, so register these ids too.
"""

from __future__ import annotations

import re

from docutils import nodes
from sphinx.application import Sphinx

ANCHOR = re.compile(r'<a\s+id="([A-Za-z0-9_-]+)"\s*>')  # MyST hands over the opening tag alone


def register_html_anchors(app: Sphinx, doctree: nodes.document) -> None:
    """Add every ``<a id>`` of a page to the slugs MyST resolves ``file.md#id`` links against."""
    slugs = app.env.metadata[app.env.docname].setdefault("myst_slugs", {})
    for raw in doctree.findall(nodes.raw):
        if raw.get("format") != "html":
            continue
        for anchor in ANCHOR.findall(raw.astext()):
            slugs.setdefault(anchor, (raw.line, anchor, anchor))


def setup(app: Sphinx) -> dict:
    app.connect("doctree-read", register_html_anchors)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
