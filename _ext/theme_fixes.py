"""Two small fixes to the jupyter-book 1.0 theme stack, found by the browser tests.

- sphinx-thebe and sphinx-togglebutton register their inline scripts twice; the second
  ``const THEBE_JS_URL`` is a SyntaxError on every page. Keep the first copy of each script.
- The theme's colour mode defaults to "" and logs "Got invalid theme mode" on a first visit.
"""

from __future__ import annotations

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


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", default_mode)
    # early: the event stops at the first handler that returns a template name
    app.connect("html-page-context", dedupe_scripts, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
