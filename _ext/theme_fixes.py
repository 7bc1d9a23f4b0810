"""Small fixes to the jupyter-book 1.0 theme stack, found by the browser tests and audits.

- sphinx-thebe and sphinx-togglebutton register their inline scripts twice; the second
  ``const THEBE_JS_URL`` is a SyntaxError on every page. Keep the first copy of each script.
- The theme's colour mode defaults to "" and logs "Got invalid theme mode" on a first visit.
- Page weight: the theme's 1.5 MB ``fontawesome.js`` only redraws as SVG the icons its CSS already
  draws with the icon font, so it goes; the search index (and its scripts) is loaded only by the
  search page, not by every page in ``<head>``; MathJax only where a page has mathematics, and
  sphinx-design's styles and tab script only where a page uses its components.
- Accessibility: the book's title link in the sidebar gets a ``<nav>`` landmark (axe: region);
  the solution toggles' ``aria-label="Toggle hidden content"`` hid their visible
  label from screen readers (axe: label-content-name-mismatch); the label itself names them.
- Every page gets a ``<meta name="description">``: its first English paragraph.
- ``make pdf`` (BOOK_PDF=1) links the first page to the whole book printed as PDF.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.config import Config


def default_mode(app: Sphinx, config: Config) -> None:
    if not config.html_context.get("default_mode"):
        config.html_context["default_mode"] = "auto"  # read by the pydata theme's templates


def dedupe_scripts(
    app: Sphinx, pagename: str, templatename: str, context: dict, doctree: object
) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple] = set()
    unique = []
    for script in scripts:
        # the copies differ in filename (None vs "") and priority only
        key = (
            str(getattr(script, "filename", script) or ""),
            repr(sorted(getattr(script, "attributes", {}).items())),
        )
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique


def _description(doctree: nodes.document | None) -> str:
    """The first paragraph of the page's first English block, cut to about 160 characters."""
    if doctree is None:
        return ""
    english = False
    for node in doctree.findall(lambda n: isinstance(n, (nodes.raw, nodes.paragraph))):
        if isinstance(node, nodes.raw):
            english = english or '<div lang="en">' in node.astext()
        elif english:
            text = " ".join(node.astext().split())
            return text if len(text) <= 160 else text[:157].rsplit(" ", 1)[0] + "…"
    return ""


def add_pdf_links(
    app: Sphinx, pagename: str, templatename: str, context: dict, doctree: object
) -> None:
    """With BOOK_PDF=1 (``make pdf``, which prints them into pdf/), page one links the PDFs."""
    if not os.environ.get("BOOK_PDF") or pagename != app.config.root_doc or "body" not in context:
        return

    def link(mode: str, label: str) -> str:
        return f'<a href="{context["pathto"](f"pdf/mldeploy-{mode}.pdf", 1)}">{label}</a>'

    context["body"] += (
        '<p class="book-pdf-links"><span lang="zh">整本书的 PDF：</span>'
        '<span lang="en">The whole book as PDF: </span>'
        f"{link('both', '双语 · bilingual')} · {link('zh', '中文')} · {link('en', 'English')}</p>"
    )


def add_description(
    app: Sphinx, pagename: str, templatename: str, context: dict, doctree: object
) -> None:
    text = _description(doctree) or app.config.project
    escaped = text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
    context["metatags"] = (
        context.get("metatags", "") + f'\n<meta name="description" content="{escaped}" />'
    )


FONTAWESOME = re.compile(
    r'\s*<script defer src="[^"]*_static/scripts/fontawesome\.js[^"]*"></script>'
)
SEARCH_SCRIPTS = re.compile(
    r'\s*<script src="[^"]*'
    r"(?:_static/searchtools\.js|_static/language_data\.js|searchindex\.js)"
    r'"></script>'
)
MATHJAX = re.compile(
    r"\s*<script>window\.MathJax = .*?</script>"
    r'\s*<script defer="defer" src="[^"]*mathjax/tex-chtml\.js"></script>',
    re.S,
)
DESIGN = re.compile(
    r'\s*<link rel="stylesheet" type="text/css" href="[^"]*_static/sphinx-design\.min\.css[^"]*" />'
    r'|\s*<script data-sd-tabs-storage-prefix="[^"]*"'
    r' src="[^"]*_static/design-tabs\.js[^"]*"></script>'
)
# axe "region": the book's title link in the sidebar sat outside every landmark
BRAND = re.compile(
    r'(?<!<nav class="book-brand" aria-label="Book">)(<a class="navbar-brand logo".*?</a>)', re.S
)
# axe "scrollable-region-focusable": a table wider than a phone scrolls in its own box
# (lang-switch.css), so a keyboard user must be able to focus it; code listings are left alone
TABLE_TAG = re.compile(r"<table(?![^>]*\btabindex=)(?![^>]*\bhighlighttable\b)(?=[\s>])")
HAS_MATH = re.compile(r'class="[^"]*\bmath\b|\\\(|\\\[|\$\$')


def lighten(html: str, search_page: bool) -> str:
    """The page without what it does not use (see the module docstring); idempotent."""
    html = FONTAWESOME.sub("", html)
    if not search_page:
        html = SEARCH_SCRIPTS.sub("", html)
    body = html[html.find("<body") :]
    if not HAS_MATH.search(body):
        html = MATHJAX.sub("", html)
    if 'class="sd-' not in body:  # no sphinx-design component (cards, tabs) on the page
        html = DESIGN.sub("", html)
    html = BRAND.sub(r'<nav class="book-brand" aria-label="Book">\1</nav>', html)
    html = TABLE_TAG.sub('<table tabindex="0"', html)
    return html.replace('<summary aria-label="Toggle hidden content">', "<summary>")


def lighten_pages(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    out = Path(app.outdir)
    for page in out.rglob("*.html"):
        if page.relative_to(out).parts[0] == "_static":
            continue
        html = page.read_text(encoding="utf-8")
        light = lighten(html, search_page=page.relative_to(out).as_posix() == "search.html")
        if light != html:
            page.write_text(light, encoding="utf-8")


def setup(app: Sphinx) -> dict:
    app.connect("html-page-context", add_description)
    app.connect("html-page-context", add_pdf_links)
    app.connect("build-finished", lighten_pages)
    app.connect("config-inited", default_mode)
    # early: the event stops at the first handler that returns a template name
    app.connect("html-page-context", dedupe_scripts, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
