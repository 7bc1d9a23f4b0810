"""Keep ``_build/html/_static`` in step with ``_static/`` on incremental builds.

Sphinx copies static files only when some page is out of date: an edit to ``_static/`` alone, or a
deleted ``_build/html/_static``, would otherwise leave the built site with stale or missing files
(and myst-nb would fail writing its CSS into a missing folder). When a static file's copy is
missing or differs, the root page is marked out of date, so Sphinx writes the site and copies
every static file afresh. Any number of consecutive ``make book`` runs then pass.
"""

from __future__ import annotations

import filecmp
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment


def stale_static_files(confdir: Path, outdir: Path, static_paths: list[str]) -> list[str]:
    """Files of ``html_static_path`` whose copy under ``outdir/_static`` is missing or differs."""
    stale = []
    for entry in static_paths:
        source = confdir / entry
        files = (
            [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        )
        for path in files:
            relative = path.name if source.is_file() else path.relative_to(source).as_posix()
            copy = outdir / "_static" / relative
            if not copy.is_file() or not filecmp.cmp(path, copy, shallow=False):
                stale.append(relative)
    return stale


def refresh_static(
    app: Sphinx, env: BuildEnvironment, added: set, changed: set, removed: set
) -> list[str]:
    if app.builder.format != "html" or added or changed:
        return []  # pages are written anyway, and static files copied with them
    stale = stale_static_files(Path(app.confdir), Path(app.outdir), app.config.html_static_path)
    return [app.config.root_doc] if stale else []


def setup(app: Sphinx) -> dict:
    app.connect("env-get-outdated", refresh_static)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
