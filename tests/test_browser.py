"""The built book in a real browser (Debian's chromium driven by playwright, headless).

A temporary copy of the book, with the sample section tests/fixtures/5.0-sample.ipynb added, is
built once and served from a loopback port. For every page: the language switch hides and shows
the right prose, the choice survives navigation, reloads and ?lang= links, nothing 404s and the
console stays clean. Screenshots of each page in the three modes at desktop and phone width land
in _build/screenshots/ (git-ignored) for a human to look at.

Outside CI a missing chromium skips these tests; with CI=true it fails them. How the notebooks
themselves look in JupyterLab and nbconvert is tests/test_notebook_views.py.
"""

from __future__ import annotations

import concurrent.futures
import functools
import gzip
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from functools import partial
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

import bookpdf
import browsing
from browsing import SAMPLE, SAVE_SCREENSHOTS, SCREENSHOTS, require_chromium
from mldeploy import settings, timeouts
from mldeploy.paths import REPO_ROOT

pytestmark = pytest.mark.book

BOOK_FILES = ["_config.yml", "_static", "_ext", "chapters", "notebooks"]


def _toc_files(toc: dict) -> list[str]:
    files = [toc["root"]]
    for entry in toc.get("chapters", []) + [
        c for part in toc.get("parts", []) for c in part.get("chapters", [])
    ]:
        files.append(entry["file"])
    return files


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build a copy of the book plus the sample section; return its html folder."""
    book = tmp_path_factory.mktemp("book")
    for name in BOOK_FILES:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(
                source,
                book / name,
                ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"),
            )
        elif source.exists():
            shutil.copy2(source, book / name)
    (book / "notebooks").mkdir(exist_ok=True)
    shutil.copy2(SAMPLE, book / "notebooks" / SAMPLE.name)
    toc = yaml.safe_load((REPO_ROOT / "_toc.yml").read_text(encoding="utf-8"))
    # with_suffix would eat "5.1-model-export" after the dot: append instead
    present = [
        f
        for f in _toc_files(toc)[1:]
        if any((book / (f + s)).exists() for s in ("", ".md", ".ipynb"))
    ]
    sample = f"notebooks/{SAMPLE.stem}"
    chapters = (
        [f for f in present if f.startswith("notebooks/")]
        + [sample]
        + [f for f in present if not f.startswith("notebooks/")]
    )
    (book / "_toc.yml").write_text(
        yaml.safe_dump(
            {"format": "jb-book", "root": toc["root"], "chapters": [{"file": f} for f in chapters]}
        ),
        encoding="utf-8",
    )
    jb = Path(sys.executable).with_name("jupyter-book")
    proc = subprocess.run(
        [
            str(jb),
            "build",
            str(book),
            "--builder",
            "html",
            "--warningiserror",
            "--keep-going",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=timeouts.scaled(900),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return book / "_build" / "html"


@pytest.fixture(scope="session")
def pages(site: Path) -> list[str]:
    """Every content page, relative to the site root (search and index pages excluded)."""
    skip = {"search.html", "genindex.html"}
    return sorted(
        p.relative_to(site).as_posix()
        for p in site.rglob("*.html")
        if not p.relative_to(site).parts[0].startswith("_")
        and p.name not in skip
        and p.name != "index.html"
    )


class _Quiet(SimpleHTTPRequestHandler):
    failures: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if str(code).isdigit() and int(code) >= 400:
            self.failures.append(f"{code} {self.path}")


@pytest.fixture(scope="session")
def server(site: Path):
    """A static HTTP server for the site on a free loopback port; yields (base URL, failures)."""
    failures: list[str] = []
    handler = type("Handler", (_Quiet,), {"failures": failures})
    httpd = bookpdf.SiteServer(("127.0.0.1", 0), partial(handler, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", failures
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def page(browser, server):
    """A fresh browser context (empty localStorage) that records console errors and 404s."""
    base, failures = server
    context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    context.set_default_timeout(timeouts.scaled(60_000))  # a loaded runner renders slowly
    tab = context.new_page()
    errors: list[str] = []
    tab.on(
        "console",
        lambda msg: (
            errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None
        ),
    )
    tab.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    tab.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    tab.base = base
    yield tab
    context.close()
    assert not errors, "\n".join(errors + failures)
    assert not failures, "\n".join(failures)


def visible_texts(tab, lang: str) -> list[bool]:
    """Visibility of each prose block of one language inside the article."""
    return tab.eval_on_selector_all(
        f'article [lang|="{lang}"]',
        # text inside something folded (a solution toggle's other label) does not count
        "els => els.filter(e => e.parentElement.checkVisibility())"
        ".map(e => e.offsetParent !== null || e.getClientRects().length > 0)",
    )


def shared_content_visible(tab) -> None:
    """Headings, code, outputs, tables and figures outside the language blocks never hide."""
    selectors = [
        "article h1",
        "article h2",
        "article .cell:not(.tag_hide-cell) .cell_input",
        "article .cell:not(.tag_hide-cell) .cell_output",
        "article table",
        "article img",
    ]
    for selector in selectors:
        hidden = tab.eval_on_selector_all(
            selector,
            "els => els.filter(e => !e.parentElement.closest('article [lang]'))"
            ".filter(e => !(e.offsetParent !== null || e.getClientRects().length > 0))"
            ".map(e => e.outerHTML.slice(0, 80))",
        )
        assert not hidden, f"{selector} hidden on {tab.url}: {hidden}"


def test_choice_survives_navigation(page, pages) -> None:
    root = yaml.safe_load((REPO_ROOT / "_toc.yml").read_text(encoding="utf-8"))["root"]
    page.goto(page.base + root + ".html")
    page.get_by_role("button", name="English", exact=True).click()
    for _ in range(len(pages) - 1):  # walk the whole book in reading order
        page.locator("a.right-next").first.click()  # the "next page" link at the bottom
        page.wait_for_load_state()
        assert page.get_attribute("html", "data-lang-mode") == "en", page.url
        assert not any(visible_texts(page, "zh")), page.url


def test_lang_url_parameter_sets_and_keeps_the_choice(page, pages) -> None:
    glossary = next(p for p in pages if p.endswith("glossary.html"))
    page.goto(page.base + glossary + "?lang=en")
    assert page.get_attribute("html", "data-lang-mode") == "en"
    assert not any(visible_texts(page, "zh"))
    page.get_by_role("button", name="中文", exact=True).click()
    assert "lang=zh" in page.url  # a reload of the shared link keeps the reader's new choice
    page.goto(page.base + pages[0])
    assert page.get_attribute("html", "data-lang-mode") == "zh"
    page.goto(page.base + pages[0] + "?lang=bogus")
    assert page.get_attribute("html", "data-lang-mode") == "zh"


def test_glossary_links_and_stamp_render(page, pages) -> None:
    sample = next(p for p in pages if SAMPLE.stem in p)
    page.goto(page.base + sample)
    stamp = page.locator(".verified-stamp").inner_text()
    assert re.search(
        r"验证环境：Verified with Python 3\.\d+\.\d+ · torch \S+ · onnxruntime \S+ · "
        r"输出生成于 outputs produced \d{4}-\d\d-\d\d$",
        stamp,
    ), stamp
    page.get_by_role("button", name="English", exact=True).click()
    assert page.locator(".verified-stamp").inner_text().startswith("Verified with Python")
    # the reader can download the notebook itself
    assert page.locator(f'a[href$="_sources/notebooks/{SAMPLE.name}"]').count() == 1
    # the solution's source and output wait behind one toggle, which opens both
    solution = page.locator("article .cell.tag_hide-cell").first
    assert not solution.locator(".cell_input pre").first.is_visible()
    assert not solution.locator(".cell_output").first.is_visible()
    solution.locator("summary").first.click()
    assert solution.locator(".cell_input pre").first.is_visible()
    assert solution.locator(".cell_output").first.is_visible()
    page.locator('article a[href$="glossary.html#inference"]:visible').first.click()
    page.wait_for_load_state()
    assert page.url.endswith("glossary.html#inference")
    assert page.locator("#inference").count() == 1


# a query of several Chinese words, or an English word, and a page it must find
SEARCHES = {
    "推理": "glossary",
    "推理服务": "5.2-inference-service",
    "微批处理": "5.2-inference-service",
    "优雅停机": "5.2-inference-service",
    "困惑度": "5.3c-quantization-gguf-qat-curves",
    "量化感知训练": "5.3c-quantization-gguf-qat-curves",
    "inference": "glossary",
    "microbatching": "5.2-inference-service",
}
SEARCH_BOX = """() => [...document.querySelectorAll('form.bd-search')]
  .filter(f => f.checkVisibility()).map(f => {
    const icon = f.querySelector('i').getBoundingClientRect();
    const input = f.querySelector('input'), box = input.getBoundingClientRect();
    const style = getComputedStyle(input);
    const textStart = box.left + parseFloat(style.borderLeftWidth) + parseFloat(style.paddingLeft);
    return {iconRight: icon.right, textStart};
  })"""


def test_search_finds_chinese_and_english_words(page) -> None:
    """Both languages are searchable; results follow the mode; the icon leaves the query clear."""
    for query, expected in SEARCHES.items():
        page.goto(page.base + f"search.html?q={query}&lang=en")
        page.wait_for_selector("#search-results li", timeout=timeouts.scaled(60_000))
        assert expected in page.locator("#search-results").inner_html(), query
        titles = page.locator("#search-results li > a").all_inner_texts()
        assert titles and not any(CJK.search(t) for t in titles), titles  # English mode
        page.wait_for_selector("#search-results li p.context", timeout=timeouts.scaled(60_000))
        snippets = page.locator("#search-results li p.context").all_inner_texts()
        assert not any(CJK.search(s) for s in snippets), snippets  # the page's English text only
    page.goto(page.base + "search.html?q=服务推理")  # the pairs of a word that is not in the book
    page.wait_for_function(  # the search is finished when its summary says how it went
        "() => /did not match|found/.test("
        "document.querySelector('#search-results p.search-summary')?.textContent || '')"
    )
    assert page.locator("#search-results li").count() == 0
    boxes = page.evaluate(SEARCH_BOX)
    page.keyboard.press("Control+k")  # the search dialog
    boxes += page.evaluate(SEARCH_BOX)
    assert boxes and all(b["iconRight"] <= b["textStart"] for b in boxes), boxes


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(values["id"])
        for key in ("href", "src"):
            if values.get(key) and not (
                tag == "link" and values.get("rel") in ("preconnect", "dns-prefetch")
            ):
                self.targets.append(values[key])


def test_every_local_link_and_image_resolves(site: Path) -> None:
    parsed: dict[Path, _Links] = {}
    for html in site.rglob("*.html"):
        if html.relative_to(site).parts[0] == "_static":  # theme template fragments, not pages
            continue
        links = _Links()
        links.feed(html.read_text(encoding="utf-8"))
        parsed[html] = links
    broken = []
    for html, links in parsed.items():
        for target in links.targets:
            parts = urlsplit(target)
            if (
                parts.scheme
                or parts.netloc
                or target.startswith(("mailto:", "javascript:", "data:"))
            ):
                continue
            path = (html.parent / unquote(parts.path)).resolve() if parts.path else html
            if path.is_dir():
                path = path / "index.html"
            if not path.exists():
                broken.append(f"{html.relative_to(site)}: {target}")
            elif (
                parts.fragment
                and path.suffix == ".html"
                and path in parsed
                and unquote(parts.fragment) not in parsed[path].ids
            ):
                broken.append(f"{html.relative_to(site)}: {target} (no such anchor)")
    assert not broken, "\n".join(sorted(set(broken)))
    borrowed = [
        str(h.relative_to(site))
        for h in parsed
        if "executablebooks/jupyter-book" in h.read_text(encoding="utf-8")
    ]
    assert not borrowed, f"links to jupyter-book's repository instead of this book's: {borrowed}"


# Bytes a first visit to one page may transfer (uncompressed)... The theme alone is ~0.65 MB (its
# CSS 0.4 MB; the icon fonts keep only the icons the site shows, _ext/icon_font.py); the longest
# sections add 0.2-0.3 MB of HTML and figures.
PAGE_BUDGET = 1_000_000
MATHJAX = "/_static/mathjax/"  # ...besides MathJax (1.2 MB), which only pages with formulas load


# --- every page whole, at desktop and phone widths ---------------------------------------------

WIDTHS = {"desktop": (1280, 900), "phone": (390, 844)}
LAYOUT = """() => {
  const article = document.querySelector('article.bd-article');
  const main = document.querySelector('.bd-main');
  const width = window.innerWidth;
  const box = article.getBoundingClientRect();
  // content that fell out of the article (a section closed inside a language block did this)
  const chrome = '.bd-sidebar-secondary, .prev-next-area, .bd-footer-content, '
    + '.bd-header-article, .bd-footer-article';
  const outside = [...main.querySelectorAll('section, .cell, p, table, figure, img')]
    .filter(e => !e.closest('article.bd-article') && !e.closest(chrome))
    .map(e => e.tagName + '.' + e.className).slice(0, 5);
  // anything wider than the viewport that is not inside a scrolling box
  const wide = [...document.body.querySelectorAll('*')].filter(e => {
    const r = e.getBoundingClientRect();
    if (r.width === 0 || r.right <= width + 1 || !e.checkVisibility()) return false;
    for (let a = e.parentElement; a; a = a.parentElement) {
      const o = getComputedStyle(a).overflowX;
      if (o === 'auto' || o === 'scroll' || o === 'hidden') {
        return a.getBoundingClientRect().right > width + 1;
      }
    }
    return true;
  }).map(e => e.tagName + (e.id ? '#' + e.id : '') + '.' + String(e.className).split(' ')[0]
    + ' ' + Math.round(e.getBoundingClientRect().right) + 'px').slice(0, 5);
  const scrollWidth = document.documentElement.scrollWidth;
  return {article: box.width, scrollWidth, width, outside, wide};
}"""


# --- each language complete on its own ---------------------------------------------------------

VISIBLE_TEXT = """(mode) => {
  const skip = 'pre, code, kbd, samp, .cell_output, .output, .lang-switch, [data-lang-keep], '
    + 'mjx-container, .MathJax, script, style';
  const blocks = 'h1,h2,h3,h4,h5,h6,th,td,li,figcaption,summary,nav,header,footer,p,a';
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const found = [];
  while (walker.nextNode()) {
    const node = walker.currentNode, el = node.parentElement;
    const text = node.data.replace(/\\s+/g, ' ').trim();
    if (!text || !el || (el.closest(skip) && !el.closest('figcaption'))) continue;
    if (!el.checkVisibility({checkOpacity: true, checkVisibilityCSS: true})) continue;
    const rect = el.getBoundingClientRect();
    if (rect.width === 0 || rect.height === 0) continue;
    // glossary headwords keep both names and their IPA on purpose
    const heading = el.closest('h1, h2, h3, h4, h5, h6');
    const headword = heading && heading.textContent.replace(/[#¶]\\s*$/, '').trim();
    if (headword && /\\/[^\\/]+\\/\\s*#?$/.test(headword)) continue;
    const where = el.closest(blocks) || el;
    const kind = where.className ? '.' + String(where.className).split(' ')[0] : '';
    found.push([where.tagName.toLowerCase() + kind, text]);
  }
  return {texts: found, title: document.title};
}"""
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# English prose: three or more words in a row (names such as "ONNX Runtime" are shorter)
ENGLISH_PROSE = re.compile(
    r"[A-Za-z][a-z]+(?:[-'][a-z]+)*(?:[ ,;:]+[A-Za-z][a-z]+(?:[-'][a-z]+)*){2,}"
)


def test_headings_titles_and_navigation_follow_the_mode(page, pages) -> None:
    sample = next(p for p in pages if SAMPLE.stem in p)
    page.goto(page.base + sample + "?lang=en")
    assert not CJK.search(page.title()), page.title()
    h1 = page.locator("article h1").first.inner_text()
    assert not CJK.search(h1) and re.match(r"5\.0 \S", h1), h1
    assert not CJK.search(page.locator("nav.bd-docs-nav").inner_text())
    page.get_by_role("button", name="中文", exact=True).click()
    assert CJK.search(page.title()) and not re.search(
        r"[A-Za-z]{4}", page.title().split(" — ")[0]
    ), page.title()
    assert not re.search(r"[a-z]{3} [a-z]{3}", page.locator("article h1").first.inner_text())
    page.get_by_role("button", name="双语", exact=True).click()
    assert " · " in page.locator("article h1").first.inner_text() and " · " in page.title()


# --- accessibility: axe-core, offline -----------------------------------------------------------

AXE = REPO_ROOT / "node_modules" / "axe-core" / "axe.min.js"


def _axe_missing() -> str | None:
    if AXE.exists():
        return None
    message = f"{AXE.relative_to(REPO_ROOT)} is missing: run `make axe` (npm install axe-core)"
    if settings.tools().ci:
        pytest.fail(message)
    return message


# --- every page, rendered once per width and language mode, every check on that render ----------

# whole pages as JPEG: half the time of a PNG for a page 20,000 px long, and still sharp to read
SHOT = {"full_page": True, "type": "jpeg", "quality": 85}
MODE_BUTTONS = {"both": "双语", "en": "English", "zh": "中文"}
HTML_LANG = {"both": "en", "en": "en", "zh": "zh-CN"}
# axe runs where the earlier audit ran: both and en at desktop width, zh at phone width
AXE_RENDERS = {("both", "desktop"), ("en", "desktop"), ("zh", "phone")}
FOLDED = """() => {
  // exercise solutions (a toggle over source and outputs) and answers (<details>) stay closed
  const open = [...document.querySelectorAll('article details')].filter(d => d.open)
    .map(d => d.className || 'details');
  const shown = [...document.querySelectorAll(
      'article .cell.tag_hide-cell .cell_input, article .cell.tag_hide-cell .cell_output, '
      + 'article details.answer > div[lang]')]
    .filter(e => e.checkVisibility()).map(e => e.className || e.tagName);
  const toggles = document.querySelectorAll('article .cell.tag_hide-cell').length;
  const answers = document.querySelectorAll('article details.answer').length;
  return {open, shown, toggles, answers};
}"""


class Render:
    """Problems found on every page, by check; filled once by the `rendered` fixture."""

    def __init__(self) -> None:
        self.problems: dict[str, list[str]] = {}
        self.weight: list[str] = []
        self.over_budget: list[str] = []
        self.weight_of: dict[str, str] = {}  # page -> its line of the weight table
        self.axe_ran = False

    def add(self, check: str, problems: list[str]) -> None:
        self.problems.setdefault(check, []).extend(problems)

    def of(self, check: str) -> list[str]:
        return self.problems.get(check, [])


def _check_mode(tab, render: Render, name: str, mode: str, size: str, width: int) -> None:
    """Every check of one page in one mode at one width, on the page as it is shown."""
    where = f"{name} [{mode}, {size}]"
    switch = []
    if tab.get_attribute("html", "data-lang-mode") != mode:
        switch.append(f"{where}: mode {tab.get_attribute('html', 'data-lang-mode')!r}")
    if tab.get_attribute("html", "lang") != HTML_LANG[mode]:
        switch.append(f"{where}: html lang {tab.get_attribute('html', 'lang')!r}")
    pressed = tab.get_attribute(f'.lang-switch button[data-mode="{mode}"]', "aria-pressed")
    if pressed != "true":
        switch.append(f"{where}: the {mode} button is not pressed")
    if tab.locator(".lang-switch button").all_inner_texts() != ["中文", "English", "双语"]:
        switch.append(
            f"{where}: switch buttons {tab.locator('.lang-switch button').all_inner_texts()}"
        )
    try:
        shared_content_visible(tab)
    except AssertionError as exc:
        switch.append(f"{where}: {exc}")
    # answers wait to be asked: closed, then opened for the language and layout checks below
    folded = tab.evaluate(FOLDED)
    if folded["open"] or folded["shown"]:
        render.add("answers", [f"{where}: open {folded['open']}, shown {folded['shown'][:3]}"])
    # axe audits the page as a reader first sees it (answers closed)
    if (mode, size) in AXE_RENDERS and render.axe_ran:
        tab.add_script_tag(path=str(AXE))
        result = tab.evaluate("() => axe.run(document, {resultTypes: ['violations']})")
        render.add(
            "axe",
            [
                f"{where} {v['impact']}: {v['id']} ({len(v['nodes'])}) "
                f"{[', '.join(n['target']) for n in v['nodes']][:3]}"
                for v in result["violations"]
            ],
        )
    stem = f"{name.replace('/', '_')[:-5]}-{mode}-{size}"
    if SAVE_SCREENSHOTS:
        tab.screenshot(path=str(SCREENSHOTS / f"{stem}.jpg"), **SHOT)
    if folded["answers"] or folded["toggles"]:
        tab.evaluate(
            "() => document.querySelectorAll('article details').forEach(d => d.open = true)"
        )
    for lang in ("zh", "en"):
        shown = visible_texts(tab, lang)
        should_show = mode in ("both", lang)
        if not shown or (should_show and not all(shown)) or (not should_show and any(shown)):
            switch.append(f"{where}: {lang} prose {'hidden' if should_show else 'visible'}")
    answers_shown = folded["answers"] or folded["toggles"]
    if SAVE_SCREENSHOTS and answers_shown and size == "desktop" and mode == "en":
        tab.screenshot(path=str(SCREENSHOTS / f"{stem}-answers.jpg"), **SHOT)
    render.add("switch", switch)
    # each language whole on its own (answers included)
    if mode != "both":
        got = tab.evaluate(VISIBLE_TEXT, mode)
        leaks = []
        for place, text in got["texts"] + [["title", got["title"]]]:
            if mode == "en" and CJK.search(text):
                leaks.append(f"{name} [en] {place}: {text[:70]!r}")
            # English names in parentheses after a Chinese term are the book's convention
            if mode == "zh" and ENGLISH_PROSE.search(re.sub(r"（[^）]*）|\([^)]*\)", "", text)):
                leaks.append(f"{name} [zh] {place}: {text[:70]!r}")
        render.add("leaks", leaks)
    # the page whole at this width
    got = tab.evaluate(LAYOUT)
    layout = []
    narrowest = 600 if size == "desktop" else 0.85 * width
    if got["article"] < narrowest:
        layout.append(f"{where}: article only {got['article']:.0f} px wide")
    if got["scrollWidth"] > width:
        layout.append(
            f"{where}: page {got['scrollWidth']} px wide in a {width} px window: {got['wide']}"
        )
    if got["outside"]:
        layout.append(f"{where}: content outside the article: {got['outside']}")
    render.add("layout", layout)
    tab.evaluate("() => document.querySelectorAll('article details').forEach(d => d.open = false)")


def _figures(tab, name: str) -> list[str]:
    problems = []
    for img in tab.locator("article img").all():
        alt = img.get_attribute("alt") or ""
        if not alt or re.search(r"\.(png|svg|jpe?g)$|_images/", alt):
            problems.append(f"{name}: image without real alt text ({alt!r})")
    for figure in tab.locator("article figure").all():
        caption = (
            figure.locator("figcaption").inner_text()
            if figure.locator("figcaption").count()
            else ""
        )
        if not re.match(r"图 \d+", caption) or not re.search(r"Fig\. \d+", caption):
            problems.append(
                f"{name}: figure without a numbered caption in both languages ({caption[:60]!r})"
            )
    return problems


RENDER_THREADS = 2  # pages rendered at once, each thread with a chromium of its own


def _render_page(browser, base: str, name: str, render: Render, gzipped: Callable) -> None:
    """One page at desktop and phone width, switched through the three modes; all checks."""
    for size, (width, height) in WIDTHS.items():
        context = browser.new_context(
            viewport={"width": width, "height": height}, device_scale_factor=1
        )
        context.set_default_timeout(timeouts.scaled(60_000))
        tab = context.new_page()
        errors: list[str] = []
        responses: list[tuple[str, int]] = []
        tab.on(
            "console",
            lambda msg, into=errors: (
                into.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None
            ),
        )
        tab.on("pageerror", lambda exc, into=errors: into.append(f"page error: {exc}"))

        def record(response, into=responses, errs=errors):  # bound now: new lists each time
            into.append((response.url, int(response.headers.get("content-length", 0))))
            if response.status >= 400:
                errs.append(f"{response.status} {response.url}")

        tab.on("response", record)
        try:
            if size == "desktop":
                tab.goto(base + name, wait_until="networkidle")
                first = "both"
                raw = sum(n for _, n in responses)
                packed = sum(gzipped(u) for u, _ in responses)
                maths = sum(n for u, n in responses if MATHJAX in u)
                note = f"  (MathJax {maths / 1e6:.2f} MB)" if maths else ""
                line = f"{raw / 1e6:6.2f} MB {packed / 1e6:6.2f} MB  {len(responses):6d}    "
                render.weight_of[name] = line + f"{name}{note}"
                if raw - maths > PAGE_BUDGET:
                    render.over_budget.append(render.weight_of[name])
                render.add("figures", _figures(tab, name))
            else:
                tab.goto(base + name + "?lang=zh")
                first = "zh"
                if "lang=zh" not in tab.url:
                    render.add("entry", [f"{name}: ?lang=zh dropped ({tab.url})"])
            order = [first] + [m for m in ("en", "zh", "both") if m != first]
            for mode in order:
                if mode != first:
                    tab.get_by_role("button", name=MODE_BUTTONS[mode], exact=True).click()
                    tab.mouse.move(0, height - 1)  # the button at rest, not hovered
                    tab.wait_for_function(  # colour transitions finished
                        "() => document.getAnimations().every(a => a.playState !== 'running')"
                    )
                _check_mode(tab, render, name, mode, size, width)
                if size == "desktop" and mode == "zh":  # the choice survives a reload
                    tab.reload()
                    if tab.get_attribute("html", "data-lang-mode") != "zh":
                        render.add("switch", [f"{name}: choice lost on reload"])
        finally:
            context.close()
        render.add("errors", [f"{name} [{size}]: {e}" for e in errors])


@pytest.fixture(scope="module")
def rendered(browser, server, pages, site: Path) -> Render:
    """Each page at desktop and phone width, in a fresh browser (empty cache and storage): loaded
    once per width, then switched through the three modes with the buttons; all checks run on
    each of these six renders, and a screenshot of each lands in _build/screenshots/.

    The desktop visit comes with no ?lang= (the default mode, and the bytes of a first visit);
    the phone visit opens a shared ?lang=zh link, which must set and keep the mode.
    Pages are shared among ``RENDER_THREADS`` threads: most of a render is chromium's work
    (layout, axe), which runs in chromium's processes while Python waits for it.
    """
    base, failures = server
    render = Render()
    render.axe_ran = _axe_missing() is None
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    @functools.cache
    def gzipped(url: str) -> int:  # what a web server that compresses would send
        path = site / unquote(urlsplit(url).path).lstrip("/")
        return len(gzip.compress(path.read_bytes(), 6)) if path.is_file() else 0

    todo = list(pages)
    claim = threading.Lock()

    def render_some(own_browser) -> None:  # playwright's sync API: one instance per thread
        while True:
            with claim:
                if not todo:
                    return
                name = todo.pop(0)
            _render_page(own_browser, base, name, render, gzipped)

    def in_a_thread() -> None:
        with browsing.chromium() as own:
            render_some(own)

    with concurrent.futures.ThreadPoolExecutor(RENDER_THREADS - 1) as pool:
        helpers = [pool.submit(in_a_thread) for _ in range(RENDER_THREADS - 1)]
        render_some(browser)
        for helper in helpers:
            helper.result()
    render.weight = ["     raw   gzipped  requests  page (first visit, empty cache)"] + [
        render.weight_of[name] for name in pages if name in render.weight_of
    ]
    render.add("errors", list(failures))
    return render


def test_switch_hides_the_other_language_on_every_page(rendered: Render) -> None:
    """In each mode only that mode's prose shows (answers opened included), the buttons say which
    mode is on, html lang follows, shared content never hides, a reload keeps the choice."""
    assert not rendered.of("switch"), "\n".join(rendered.of("switch"))


def test_every_page_is_whole_at_desktop_and_phone_width(rendered: Render) -> None:
    """The article is wide, nothing overflows sideways, and all content sits inside the article."""
    assert not rendered.of("layout"), "\n".join(rendered.of("layout"))


def test_each_single_language_mode_shows_one_language(rendered: Render) -> None:
    """English mode shows no Chinese outside glossary headwords; Chinese mode no English prose
    outside code, outputs and names — headings, page titles, navigation, tables, captions,
    labels and the opened answers included."""
    leaks = rendered.of("leaks")
    assert not leaks, f"{len(leaks)} leaks:\n" + "\n".join(leaks)


def test_answers_wait_to_be_asked_in_the_book(rendered: Render) -> None:
    """No exercise solution (source or outputs) and no answer shows before its toggle is opened."""
    assert not rendered.of("answers"), "\n".join(rendered.of("answers"))


def test_axe_finds_no_violation(rendered: Render) -> None:
    """axe-core (npm, installed by `make axe`) on every page in each mode and at phone width:
    no violation of any impact (moderate and minor included)."""
    if not rendered.axe_ran:
        pytest.skip(_axe_missing() or "axe did not run")
    found = rendered.of("axe")
    out = REPO_ROOT / "_build" / "axe.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(found) + "\n", encoding="utf-8")
    assert not found, "\n".join(found)


def test_figures_have_alt_text_and_numbered_captions(rendered: Render) -> None:
    assert not rendered.of("figures"), "\n".join(rendered.of("figures"))


def test_pages_load_cleanly(rendered: Render) -> None:
    """No console error, page error or failed request on any render."""
    assert not rendered.of("errors"), "\n".join(rendered.of("errors"))


def test_page_weight(rendered: Render, site: Path) -> None:
    """Bytes a first visit to each page transfers (cold cache), and the whole site on disk.

    Written to _build/page-weight.txt; `make page-weight` prints it.
    """
    total = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
    html_files = sum(1 for f in site.rglob("*.html"))
    lines = rendered.weight + [
        f"{total / 1e6:6.2f} MB  whole site on disk ({html_files} HTML files)"
    ]
    report = REPO_ROOT / "_build" / "page-weight.txt"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n" + "\n".join(lines))
    over = rendered.over_budget
    assert not over, f"over the {PAGE_BUDGET / 1e6:.1f} MB budget:\n" + "\n".join(over)


def test_every_entry_page_keeps_the_lang_query(page, pages, rendered: Render) -> None:
    """A shared link keeps its language: the site root and index.html forward with the query and
    the fragment, and every page opened with ?lang=zh kept it (checked on the phone renders)."""
    assert not rendered.of("entry"), "\n".join(rendered.of("entry"))
    root = yaml.safe_load((REPO_ROOT / "_toc.yml").read_text(encoding="utf-8"))["root"]
    for entry in ("", "index.html"):
        for mode in ("en", "zh"):
            page.goto(page.base + entry + f"?lang={mode}#why-deployment")
            page.wait_for_url(
                re.compile(re.escape(f"/{root}.html?lang={mode}#why-deployment") + "$")
            )
            assert page.get_attribute("html", "data-lang-mode") == mode, (entry, page.url)
            hidden = "zh" if mode == "en" else "en"
            assert not any(visible_texts(page, hidden)), (entry, mode)


def test_printed_book_gives_every_page_its_title_and_stamp(page) -> None:
    # what `make pdf` prints: every page appended to the first, in print media
    order = bookpdf.toc_pages()
    page.goto(page.base + order[0] + "?lang=en")
    page.emulate_media(media="print")
    page.evaluate(bookpdf.COMBINE, [page.base + name for name in order[1:]])
    # the first page lists the whole book in the PDF's language
    contents = page.locator("#jb-print-toc")
    assert contents.locator("h2").inner_text().strip() == "Contents"
    entries = [e.strip() for e in contents.locator("li.book-print-toc__h1").all_inner_texts()]
    titles = [h.strip() for h in page.locator(".book-print-page h1").all_inner_texts()]
    assert entries[0].startswith("Chapter 5") and entries[1:] == titles, (entries, titles)
    assert not any(CJK.search(e) for e in contents.locator("li").all_inner_texts())
    problems = page.evaluate(
        """() => Array.from(document.querySelectorAll('.book-print-page')).flatMap((part, i) => {
          const h1 = part.querySelector('h1');
          const out = [];
          if (!h1 || getComputedStyle(h1).display === 'none' || !h1.offsetHeight)
            out.push(`appended page ${i + 1}: title hidden in print`);
          const stamp = part.querySelector('.verified-stamp');
          if (stamp && getComputedStyle(stamp).breakInside !== 'avoid')
            out.push(`appended page ${i + 1}: the stamp may be cut by a page break`);
          return out;
        })"""
    )
    appended = page.locator(".book-print-page").count()
    assert appended == len(order) - 1 and not problems, "\n".join(problems)


def test_pdfs_have_their_language_contents_and_an_outline(
    browser, site: Path, tmp_path: Path
) -> None:
    """What `make pdf` writes: each PDF's bookmarks name every page of the book in its language."""
    require_chromium()
    titles = {
        "zh": ["第5章", "5.1 模型导出", "5.2 推理服务", "术语表"],
        "en": ["Chapter 5", "5.1 Model Export", "5.2 Inference Service", "Glossary"],
    }
    written = bookpdf.print_book(site, tmp_path, modes=("zh", "en"), browser=browser)
    for mode, path in written.items():
        outline = bookpdf.outline(path)
        top = [title for depth, title in outline if depth == 0]
        assert len(top) == len(bookpdf.toc_pages()), top
        assert all(any(t.startswith(w) for t in top) for w in titles[mode]), top
        assert ("目录" if mode == "zh" else "Contents") in [t for _, t in outline]
        other = CJK if mode == "en" else re.compile(r"\b(?:the|and|of)\b")
        assert not [t for d, t in outline if d <= 1 and other.search(t)], (mode, outline[:10])
        assert sum(depth == 1 for depth, _ in outline) > len(top)  # the sections under each page
        assert bookpdf.page_count(path) > 50
