"""The notebooks as students open them, in a real browser: JupyterLab as `make lab` starts it,
and nbconvert's lab template (the HTML a notebook is exported to). Markdown renders, both languages
show (JupyterLab drops the lang attributes), solutions and answers stay folded."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from browsing import NOTEBOOKS, SAVE_SCREENSHOTS, SCREENSHOTS
from mldeploy import timeouts
from mldeploy.book import notebooks
from mldeploy.paths import REPO_ROOT

pytestmark = pytest.mark.book


def test_nbconvert_lab_rendering_shows_no_raw_markup(browser, tmp_path: Path) -> None:
    """Each notebook rendered by nbconvert's lab template (as exported, and on many viewers)."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab")
    context = browser.new_context()
    try:
        tab = context.new_page()
        for notebook in NOTEBOOKS:
            body, _ = exporter.from_notebook_node(nbformat.read(notebook, as_version=4))
            out = tmp_path / (notebook.stem + ".html")
            out.write_text(body, encoding="utf-8")
            tab.goto(out.as_uri())
            text = tab.locator(".jp-MarkdownOutput").all_inner_texts()
            joined = "\n".join(text)
            assert "<div" not in joined and "</div>" not in joined, (
                f"{notebook.name}: raw markup visible"
            )
            assert re.search(r"[\u4e00-\u9fff]", joined) and re.search(
                r"\b(the|and|of)\b", joined
            ), notebook.name
            assert (
                tab.locator('.jp-MarkdownOutput div[lang="zh"]').count()
                == tab.locator('.jp-MarkdownOutput div[lang="en"]').count()
                > 0
            )
            raw_markdown = re.findall(r"(?m)^\s*(?:\*\*\S|#{1,6} )", joined)
            assert not raw_markdown, f"{notebook.name}: unrendered markdown {raw_markdown[:3]}"
    finally:
        context.close()


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory: pytest.TempPathFactory):
    """JupyterLab serving the repository on a free loopback port, no kernels; yields its URL."""
    home = tmp_path_factory.mktemp("lab")
    settings = home / "settings" / "@jupyterlab"
    (settings / "notebook-extension").mkdir(parents=True)
    (settings / "apputils-extension").mkdir(parents=True)
    # render every cell up front (JupyterLab 4 otherwise renders only what is on screen);
    # no news popup
    (settings / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        '{"windowingMode": "none"}'
    )
    (settings / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false"}'
    )
    # the settings `make lab` uses (Markdown opens rendered), and its root: the repository
    shutil.copytree(
        REPO_ROOT / ".jupyter" / "lab" / "user-settings", home / "settings", dirs_exist_ok=True
    )
    lab_recipe = (
        (REPO_ROOT / "Makefile").read_text(encoding="utf-8").split("\nlab:")[1].split("\n\n")[0]
    )
    assert "--ServerApp.root_dir=$(CURDIR)" in lab_recipe, "make lab must serve the repository root"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--allow-root",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--ServerApp.root_dir={REPO_ROOT}",
            "--IdentityProvider.token=",
            "--ServerApp.password=",
            "--KernelSpecManager.allowed_kernelspecs=none",  # reading needs no kernel: none starts
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + timeouts.scaled(120)
        while True:
            try:
                urllib.request.urlopen(url + "api", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("JupyterLab did not start within its time limit")
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_student_view_in_jupyterlab_shows_no_raw_markup(browser, jupyterlab) -> None:
    """What students see: each notebook opened in a real JupyterLab."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(timeouts.scaled(90_000))
    try:
        tab = context.new_page()
        for notebook in NOTEBOOKS:
            markdown = sum(
                c.cell_type == "markdown" for c in nbformat.read(notebook, as_version=4).cells
            )
            # ?reset: a fresh workspace, as a student opening one notebook has. Without it Lab
            # restores every notebook opened before, and renders them all again (twice the time)
            path = notebook.relative_to(REPO_ROOT).as_posix()
            tab.goto(jupyterlab + "lab/tree/" + path + "?reset")
            tab.wait_for_function(  # this notebook's tab is the current one
                "name => [...document.querySelectorAll('.lm-TabBar-tab.lm-mod-current')]"
                ".some(t => t.textContent.trim() === name)",
                arg=notebook.name,
            )
            tab.wait_for_function(  # every markdown cell rendered, with its text
                "n => { const r = [...document.querySelectorAll("
                "'.jp-MarkdownCell .jp-RenderedMarkdown')];"
                " return r.length >= n && r.every(e => e.textContent.trim().length > 0); }",
                arg=markdown,
            )
            dialog = tab.locator(
                ".jp-Dialog button", has_text="No Kernel"
            )  # asked because no kernel is allowed
            try:
                dialog.first.click(timeout=timeouts.scaled(5_000))
            except PlaywrightTimeout:
                pass
            texts = tab.locator(".jp-MarkdownCell .jp-RenderedMarkdown").all_inner_texts()
            joined = "\n".join(texts)
            assert "<div" not in joined and "</div>" not in joined, (
                f"{notebook.name}: raw markup visible in JupyterLab"
            )
            raw_markdown = re.findall(r"(?m)^\s*(?:\*\*\S|#{1,6} |</?\w+[^>]*>$)", joined)
            assert not raw_markdown, f"{notebook.name}: unrendered markdown {raw_markdown[:3]}"
            # JupyterLab's sanitizer drops the lang attributes: students always see both languages
            assert re.search(r"[\u4e00-\u9fff]{8}", joined) and re.search(
                r"\b(the|and|of)\b", joined
            ), notebook.name
            # solutions are folded, source and outputs (jupyter.source_hidden, outputs_hidden)
            hidden = sum(
                notebooks.is_solution(c) for c in nbformat.read(notebook, as_version=4).cells
            )
            count = (
                "() => [...document.querySelectorAll('.jp-CodeCell')].filter(c => "
                "c.querySelector('.jp-InputPlaceholder')?.checkVisibility() && "
                "(c.querySelector('.jp-OutputPlaceholder')?.checkVisibility() "
                "|| !c.querySelector('.jp-OutputArea-output'))).length"
            )
            try:  # the previous notebook's panel may still be visible for a moment
                tab.wait_for_function(
                    f"n => ({count})() === n", arg=hidden, timeout=timeouts.scaled(60_000)
                )
            except PlaywrightTimeout:
                pass  # the assertion below reports the count
            folded = tab.evaluate(count)
            assert folded == hidden, (
                f"{notebook.name}: {hidden} solutions, {folded} folded in JupyterLab"
            )
            # answers stay closed: no answer paragraph shows until its <details> is opened
            answers = tab.evaluate(
                "() => [...document.querySelectorAll('.jp-RenderedMarkdown details')]"
                ".filter(d => d.checkVisibility() && !d.open && d.querySelector('summary'))"
                ".length"
            )
            shown = tab.evaluate(
                "() => [...document.querySelectorAll('.jp-RenderedMarkdown details > div')]"
                ".filter(d => d.checkVisibility()).length"
            )
            expected = sum(
                bool(notebooks.answer_numbers(c))
                for c in nbformat.read(notebook, as_version=4).cells
            )
            assert answers == expected and shown == 0, (
                f"{notebook.name}: {expected} answers, {answers} closed, {shown} paragraphs shown"
            )
            if SAVE_SCREENSHOTS:
                tab.screenshot(path=str(SCREENSHOTS / f"jupyterlab-{notebook.stem}.png"))
    finally:
        context.close()


def test_glossary_links_open_in_jupyterlab(browser, jupyterlab) -> None:
    """`make lab` serves the repository root, so a notebook's ../chapters/glossary.md resolves."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(timeouts.scaled(90_000))
    failed: list[str] = []
    try:
        tab = context.new_page()
        tab.on(
            "response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None
        )
        notebook = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))[0]
        # ?reset: this notebook alone; the workspace the server saved from an earlier test (the
        # sample notebook in tests/fixtures, whose links resolve elsewhere) would come back too
        tab.goto(jupyterlab + "lab/tree/" + notebook.relative_to(REPO_ROOT).as_posix() + "?reset")
        links = tab.locator('.jp-RenderedMarkdown a[href*="glossary.md"]')
        links.first.wait_for(state="attached")
        # JupyterLab resolves the relative link against the notebook's folder on its server
        hrefs = sorted(set(links.evaluate_all("els => els.map(e => e.href)")))
        assert all("/files/chapters/glossary.md" in h for h in hrefs), hrefs[:3]
        for href in hrefs[:3]:
            response = tab.request.get(href)
            assert response.status == 200 and 'id="inference"' in response.text(), (
                href,
                response.status,
            )
        assert not [f for f in failed if "glossary" in f], failed
    finally:
        context.close()
