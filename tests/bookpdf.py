"""Print the whole built book as PDF with chromium: one file per language mode.

``make pdf`` builds the HTML book (with links to the PDFs) and runs this on it:

    python tests/bookpdf.py _build/html        # writes _build/html/pdf/mldeploy-{both,zh,en}.pdf

Every page of the table of contents, in reading order, is appended to the first page's article
(solutions unfolded, the language switch applied) and printed once, so page numbers run through
the book. The print styles in _static/lang-switch.css keep code and tables from being cut.
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

COMBINE = """async (pages) => {
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
  await document.fonts.ready;
  return document.querySelectorAll('.book-print-page').length;
}"""


def toc_pages(toc_file: Path = REPO / "_toc.yml") -> list[str]:
    toc = yaml.safe_load(toc_file.read_text(encoding="utf-8"))
    files = [toc["root"]] + [c["file"] for c in toc.get("chapters", [])]
    return [f + ".html" for f in files]


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def print_book(site: Path, out: Path, pages: list[str] | None = None) -> dict[str, Path]:
    """Write one PDF per language mode into ``out``; return {mode: path}."""
    from playwright.sync_api import sync_playwright

    pages = pages or toc_pages()
    out.mkdir(parents=True, exist_ok=True)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(site)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}/"
    written = {}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
            )
            for mode in MODES:
                tab = browser.new_page()
                tab.goto(base + pages[0] + f"?lang={mode}", wait_until="load")
                tab.evaluate(COMBINE, [base + p for p in pages[1:]])
                tab.emulate_media(media="print")
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
                )
                tab.close()
                written[mode] = path
            browser.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
    return written


def page_count(pdf: Path) -> int:
    """Pages in a PDF written by chromium (each page object is /Type /Page)."""
    return len(re.findall(rb"/Type\s*/Page(?!s)", pdf.read_bytes()))


def main(argv: list[str]) -> int:
    site = Path(argv[0]) if argv else REPO / "_build" / "html"
    for mode, path in print_book(site, site / "pdf").items():
        megabytes = path.stat().st_size / 1e6
        print(f"{MODES[mode]:<18} {path}  {page_count(path)} pages, {megabytes:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
