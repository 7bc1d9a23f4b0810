"""Cut the theme's Font Awesome fonts down to the icons the built site can show.

The solid icon font alone is 156 KB, the largest file of a first visit, for the few dozen icons the
theme and the book use. After the build, every icon the site can ask for is collected:

- the ``fa-NAME`` classes named in any HTML or JavaScript file (the JavaScript adds some, such as
  the colour-mode icons), looked up in the theme's CSS rules ``.fa-NAME:before{content:"\\f002"}``;
- every private-use character the theme's CSS draws directly (admonition and navigation icons set
  as ``--pst-icon-...`` variables or in ``content:`` rules that name no ``fa-`` class).

Each font keeps those characters (and drops the rest); a font file the site cannot use stays as
it is. Idempotent: a second run finds nothing more to remove.
"""

from __future__ import annotations

import re
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.util import logging

log = logging.getLogger(__name__)

BLOCK = re.compile(r"([^{}]+)\{([^{}]*)\}")
CONTENT = re.compile(r"content:\s*\"\\([0-9a-fA-F]{4,5})\"")
FA_CLASS = re.compile(r"\bfa-([a-z0-9]+(?:-[a-z0-9]+)*)")
PUA = re.compile("[\ue000-\uf8ff]")
ESCAPED_PUA = re.compile(r"\\([eEfF][0-9a-fA-F]{3})\b")


def icon_codepoints(site: Path) -> set[int]:
    """Every icon character the pages and their scripts and styles can display."""
    css = [p.read_text(encoding="utf-8", errors="replace") for p in site.rglob("*.css")]
    names: dict[str, int] = {}
    wanted: set[int] = set()
    for text in css:
        for selector, declarations in BLOCK.findall(text):
            for code in CONTENT.findall(declarations):
                found = FA_CLASS.findall(selector)
                for name in found:
                    names.setdefault(name, int(code, 16))
                if not found:  # a theme rule drawing an icon itself
                    wanted.add(int(code, 16))
        wanted |= {ord(c) for c in PUA.findall(text)}
        for block in re.findall(r"--pst-icon-[a-z-]+:\s*\"([^\"]*)\"", text):
            wanted |= {int(m, 16) for m in ESCAPED_PUA.findall(block)}
    used: set[str] = set()
    for page in [*site.rglob("*.html"), *site.rglob("*.js")]:
        used |= set(FA_CLASS.findall(page.read_text(encoding="utf-8", errors="replace")))
    return wanted | {names[n] for n in used if n in names}


def subset_font(font_file: Path, keep: set[int]) -> tuple[int, int] | None:
    """Keep only ``keep`` in ``font_file`` (woff2 or ttf, in place); (bytes before, after)."""
    from fontTools import subset
    from fontTools.ttLib import TTFont

    font = TTFont(str(font_file))
    present = set(font.getBestCmap()) & keep
    if not present or len(present) == len(font.getBestCmap()):
        return None  # nothing of it is used (the browser never loads it) or nothing to drop
    before = font_file.stat().st_size
    options = subset.Options()
    options.flavor = font.flavor  # woff2 stays woff2 (fontTools writes it with brotli)
    options.layout_features = ["*"]
    subsetter = subset.Subsetter(options)
    subsetter.populate(unicodes=sorted(present))
    subsetter.subset(font)
    font.save(str(font_file))
    return before, font_file.stat().st_size


def subset_icon_fonts(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    site = Path(app.outdir)
    keep = icon_codepoints(site)
    for font_file in sorted(site.glob("_static/vendor/fontawesome/webfonts/*")):
        if font_file.suffix not in (".woff2", ".ttf"):
            continue
        sizes = subset_font(font_file, keep)
        if sizes:
            log.info(f"icon font {font_file.name}: {sizes[0]:,} -> {sizes[1]:,} bytes")


def setup(app: Sphinx) -> dict:
    app.connect("build-finished", subset_icon_fonts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
