"""The site's entry page ``index.html`` forwards to the book's first page with the link's query
and fragment: a shared ``/?lang=en`` opens the book in English (``_static/lang-switch.js`` reads
the query on the page it lands on). Without JavaScript a plain refresh still forwards."""

from __future__ import annotations

import html
import json
from pathlib import Path

from sphinx.application import Sphinx

PAGE = """<!DOCTYPE html>
<html lang="{lang}">
<head>
<meta charset="utf-8">
<title>{title}</title>
<script>window.location.replace({target} + window.location.search + window.location.hash);</script>
<noscript><meta http-equiv="refresh" content="0; url={href}"></noscript>
</head>
<body><p><a href="{href}">{title}</a></p></body>
</html>
"""


def redirect_page(target: str, title: str, lang: str = "en") -> str:
    """An entry page that forwards to ``target``, keeping ``?query`` and ``#fragment``."""
    return PAGE.format(
        lang=html.escape(lang),
        title=html.escape(title),
        href=html.escape(target),
        target=json.dumps(target),
    )


def write_entry_page(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html" or app.config.root_doc == "index":
        return
    target = app.builder.get_target_uri(app.config.root_doc)
    page = redirect_page(target, app.config.html_title or app.config.project, app.config.language)
    Path(app.outdir, "index.html").write_text(page, encoding="utf-8")


def setup(app: Sphinx) -> dict:
    # after sphinx-external-toc, which writes a bare <meta refresh> that drops the query
    app.connect("build-finished", write_entry_page, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
