"""Print the whole built book as PDF with chromium: one file per language mode.

``make pdf`` builds the HTML book (with links to the PDFs) and runs this on it:

    python tests/bookpdf.py _build/html        # writes _build/html/pdf/mldeploy-{both,zh,en}.pdf

Every page of the table of contents, in reading order, is appended to the first page's article
(solutions unfolded, the language switch applied) and printed once, so page numbers run through
the book. The first page carries the whole book's contents in the PDF's language, and the PDF an
outline (bookmarks) of its headings. The print styles in _static/lang-switch.css keep code and
tables from being cut.
"""

from __future__ import annotations

import re
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
MODES = {"both": "双语 · bilingual", "zh": "中文", "en": "English"}
PDF_NAME = "mldeploy-{mode}.pdf"

COMBINE = r"""async (pages) => {
  const article = document.querySelector('article.bd-article');
  for (const url of pages) {
    const html = await (await fetch(url)).text();
    const doc = new DOMParser().parseFromString(html, 'text/html');
    const part = doc.querySelector('article.bd-article');
    const holder = document.createElement('div');
    holder.className = 'book-print-page';
    holder.innerHTML = part.innerHTML;
    article.appendChild(holder);
    window.bookLanguage.refresh(holder);
  }
  document.querySelectorAll('details').forEach(d => d.open = true);
  // the book's contents (every page's title and sections), in place of the theme's list of the
  // first page's sections under an English "Contents"; each entry links to its heading
  const toc = document.querySelector('#jb-print-toc');
  if (toc) {
    const list = document.createElement('ol');
    list.className = 'book-print-toc';
    article.querySelectorAll('h1, h2').forEach((h, i) => {
      h.id = h.id || `book-print-h${i}`;
      const link = document.createElement('a');
      link.href = '#' + h.id;
      link.textContent = Array.from(h.childNodes)
        .filter(n => !(n.classList && n.classList.contains('headerlink')))
        .map(n => n.textContent).join('').trim();
      const item = document.createElement('li');
      item.className = 'book-print-toc__' + h.tagName.toLowerCase();
      item.appendChild(link);
      list.appendChild(item);
    });
    toc.innerHTML = '<h2 class="book-print-toc__title">目录 · Contents</h2>';
    toc.appendChild(list);
    window.bookLanguage.refresh(toc);
  }
  // each heading becomes its visible words in the PDF's language (the bookmarks are made from the
  // headings' text: the hidden language half and the headerlink must not be part of it)
  article.parentElement.querySelectorAll('h1, h2, h3').forEach(h => {
    const words = h.innerText.replace(/[#¶]\s*$/, '').replace(/\s+/g, ' ').trim();
    if (words) h.textContent = words;
  });
  await document.fonts.ready;
  const headings = Array.from(document.querySelectorAll('h1, h2, h3, h4, h5, h6'))
    .filter(h => h.checkVisibility()).map(h => h.textContent);
  return {pages: document.querySelectorAll('.book-print-page').length, headings};
}"""


def toc_pages(toc_file: Path = REPO / "_toc.yml") -> list[str]:
    toc = yaml.safe_load(toc_file.read_text(encoding="utf-8"))
    files = [toc["root"]] + [c["file"] for c in toc.get("chapters", [])]
    return [f + ".html" for f in files]


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class SiteServer(ThreadingHTTPServer):
    """Serves the built site; a browser that drops a request it no longer needs is no error."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def print_book(
    site: Path,
    out: Path,
    pages: list[str] | None = None,
    modes: tuple[str, ...] = tuple(MODES),
    browser=None,
) -> dict[str, Path]:
    """Write one PDF per language mode into ``out``; return {mode: path}.

    ``browser``: a running playwright chromium to print with (else one is launched).
    """
    from playwright.sync_api import sync_playwright

    pages = pages or toc_pages()
    out.mkdir(parents=True, exist_ok=True)
    httpd = SiteServer(("127.0.0.1", 0), partial(_Quiet, directory=str(site)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}/"
    try:
        if browser is not None:
            return _print(browser, base, pages, modes, out)
        with sync_playwright() as pw:
            launched = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
            )
            try:
                return _print(launched, base, pages, modes, out)
            finally:
                launched.close()
    finally:
        httpd.shutdown()
        httpd.server_close()


def _print(browser, base: str, pages: list[str], modes: tuple[str, ...], out: Path) -> dict:
    written = {}
    for mode in modes:
        tab = browser.new_page()
        tab.goto(base + pages[0] + f"?lang={mode}", wait_until="load")
        tab.emulate_media(media="print")  # headings' words as printed (innerText)
        headings = tab.evaluate(COMBINE, [base + p for p in pages[1:]])["headings"]
        path = out / PDF_NAME.format(mode=mode)
        tab.pdf(
            path=str(path),
            format="A4",
            print_background=True,
            display_header_footer=True,
            header_template="<span></span>",
            footer_template='<div style="font-size:8px;width:100%;text-align:center">'
            '<span class="pageNumber"></span> / <span class="totalPages"></span></div>',
            margin={"top": "14mm", "bottom": "16mm", "left": "14mm", "right": "14mm"},
            outline=True,  # bookmarks from the headings (a tagged PDF carries them)
            tagged=True,
        )
        tab.context.close()  # browser.new_page made a context of its own
        if not retitle_outline(path, headings):
            print(f"{path.name}: bookmarks keep chromium's titles", file=sys.stderr)
        written[mode] = path
    return written


def page_count(pdf: Path) -> int:
    """Pages in a PDF written by chromium (each page object is /Type /Page)."""
    return len(re.findall(rb"/Type\s*/Page(?!s)", pdf.read_bytes()))


_TITLE = re.compile(rb"/Title\s*(<[0-9A-Fa-f\s]*>|\((?:\\.|[^\\)])*\))")


def _pdf_string(token: bytes) -> str:
    """A PDF string object: <hex> or (literal), UTF-16 when it starts with a byte-order mark."""
    if token.startswith(b"<"):
        raw = bytes.fromhex(token[1:-1].decode("ascii"))
    else:
        raw = re.sub(rb"\\([()\\])", rb"\1", token[1:-1])
    if raw.startswith(b"\xfe\xff"):
        return raw[2:].decode("utf-16-be")
    return raw.decode("latin-1")


def _outline_items(data: bytes) -> list[tuple[int, int, str]]:
    """(object number, depth, title) of each bookmark in reading order: the outline tree from the
    catalog's /Outlines, each level followed through /First and /Next (the latest object wins)."""
    objects = {
        int(number): body
        for number, body in re.findall(rb"(\d+) 0 obj\s*<<(.*?)>>\s*endobj", data, re.S)
    }

    def ref(body: bytes, key: bytes) -> int | None:
        match = re.search(rb"/" + key + rb"\s+(\d+) 0 R", body)
        return int(match.group(1)) if match else None

    root = next((ref(b, b"Outlines") for b in objects.values() if b"/Catalog" in b), None)
    items: list[tuple[int, int, str]] = []

    def walk(number: int | None, depth: int) -> None:
        seen = set()
        while number is not None and number in objects and number not in seen:
            seen.add(number)
            body = objects[number]
            title = _TITLE.search(body)
            items.append((number, depth, _pdf_string(title.group(1)) if title else ""))
            walk(ref(body, b"First"), depth + 1)
            number = ref(body, b"Next")

    if root is not None and root in objects:
        walk(ref(objects[root], b"First"), 0)
    return items


def outline(pdf: Path) -> list[tuple[int, str]]:
    """A PDF's bookmarks in reading order as (depth, title)."""
    return [(depth, title) for _, depth, title in _outline_items(pdf.read_bytes())]


def retitle_outline(pdf: Path, titles: list[str]) -> bool:
    """Give the bookmarks the headings' words, one title per bookmark in reading order.

    chromium names a bookmark after the heading's laid-out text, which repeats a heading moved to
    the next page and drops the space at a line break; the words are known exactly from the page.
    Written as an incremental update (new versions of the outline items appended, with their own
    cross-reference section), so the rest of the file stays byte for byte. False, and nothing
    written, when the bookmarks and the headings do not pair up one to one.
    """
    data = pdf.read_bytes()
    items = _outline_items(data)
    startxref = re.findall(rb"startxref\s+(\d+)", data)
    trailer = re.findall(rb"trailer\s*<<(.*?)>>", data, re.S)
    if not items or len(items) != len(titles) or not startxref or not trailer:
        return False
    bodies = dict(re.findall(rb"(\d+) 0 obj\s*<<(.*?)>>\s*endobj", data, re.S))
    update = bytearray(b"\n")
    offsets = {}
    for (number, _, _), title in zip(items, titles, strict=True):
        hex_title = b"<FEFF" + title.encode("utf-16-be").hex().upper().encode() + b">"
        body = _TITLE.sub(b"/Title " + hex_title, bodies[str(number).encode()], count=1)
        offsets[number] = len(data) + len(update)
        update += b"%d 0 obj\n<<%s>>\nendobj\n" % (number, body)
    xref = len(data) + len(update)
    update += b"xref\n"
    for number in sorted(offsets):
        update += b"%d 1\n%010d 00000 n \n" % (number, offsets[number])
    old = trailer[-1]
    keep = b"".join(re.findall(rb"/(?:Size|Root|Info)\s+[^/]+", old))
    update += b"trailer\n<<%s /Prev %s>>\nstartxref\n%d\n%%%%EOF\n" % (
        keep.strip(),
        startxref[-1],
        xref,
    )
    pdf.write_bytes(data + bytes(update))
    return True


def main(argv: list[str]) -> int:
    site = Path(argv[0]) if argv else REPO / "_build" / "html"
    for mode, path in print_book(site, site / "pdf").items():
        megabytes = path.stat().st_size / 1e6
        bookmarks = len(outline(path))
        print(
            f"{MODES[mode]:<18} {path}  {page_count(path)} pages, {bookmarks} bookmarks, "
            f"{megabytes:.1f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
