"""The book builds from the committed notebooks with zero Sphinx warnings."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mldeploy import timeouts
from mldeploy.paths import REPO_ROOT

pytestmark = pytest.mark.book


def test_book_builds_without_warnings_and_has_every_page(tmp_path):
    jb = Path(sys.executable).with_name("jupyter-book")
    proc = subprocess.run(
        [
            str(jb),
            "build",
            str(REPO_ROOT),
            "--path-output",
            str(tmp_path),
            "--builder",
            "html",
            "--warningiserror",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=timeouts.scaled(900),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    html = tmp_path / "_build" / "html"
    for notebook in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        page = html / "notebooks" / (notebook.stem + ".html")
        assert page.is_file(), f"{page.name} missing from the book"
        text = page.read_text(encoding="utf-8")
        assert 'lang="zh"' in text and 'lang="en"' in text
        assert "cell_output" in text, f"{page.name} shows no stored outputs"
    shutil.rmtree(tmp_path / "_build", ignore_errors=True)
