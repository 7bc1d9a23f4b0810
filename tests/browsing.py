"""What the browser tests share: the chromium they drive, the sample section, where screenshots go.

The ``browser`` fixture (tests/conftest.py) launches chromium through :func:`chromium`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from mldeploy import settings
from mldeploy.paths import REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SAMPLE = Path(__file__).parent / "fixtures" / "5.0-sample.ipynb"
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb")) + [SAMPLE]
SCREENSHOTS = REPO_ROOT / "_build" / "screenshots"
SAVE_SCREENSHOTS = settings.tools().screenshots  # pictures for people; every check runs anyway


def require_chromium() -> None:
    """Outside CI a missing chromium skips the test; with CI=true it fails it."""
    if CHROMIUM.exists():
        return
    message = f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does it)"
    if settings.tools().ci:
        pytest.fail(message)
    pytest.skip(message)


@contextlib.contextmanager
def chromium() -> Iterator:
    """Headless chromium driven by playwright."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield browser
        finally:
            browser.close()
