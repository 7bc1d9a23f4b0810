"""Repository button and launch buttons (Binder, Colab, JupyterHub) from the real repository.

The book names no repository by hand. The URL comes, in this order, from ``BOOK_REPOSITORY_URL``,
from GitHub Actions (``GITHUB_SERVER_URL``/``GITHUB_REPOSITORY``) or from ``git remote get-url
origin``; without one the buttons are simply left out. ``BOOK_JUPYTERHUB_URL`` names a course hub.
"""

from __future__ import annotations

import os
import re
import subprocess

from sphinx.application import Sphinx
from sphinx.config import Config


def _git(*args: str, cwd: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def repository_url(srcdir: str) -> str:
    """The book's repository as an https URL, or '' when it cannot be known."""
    if os.environ.get("BOOK_REPOSITORY_URL"):
        return os.environ["BOOK_REPOSITORY_URL"].rstrip("/")
    if os.environ.get("GITHUB_SERVER_URL") and os.environ.get("GITHUB_REPOSITORY"):
        return f"{os.environ['GITHUB_SERVER_URL']}/{os.environ['GITHUB_REPOSITORY']}"
    remote = _git("remote", "get-url", "origin", cwd=srcdir)
    # git@github.com:org/repo.git -> https://github.com/org/repo
    remote = re.sub(r"^git@([^:]+):", r"https://\1/", remote)
    return re.sub(r"\.git$", "", remote) if remote.startswith("https://") else ""


JUPYTER_BOOK_DEFAULT = "https://github.com/executablebooks/jupyter-book"  # not this book's


def configure(app: Sphinx, config: Config) -> None:
    options = config.html_theme_options
    url = options.get("repository_url", "")
    if not url or url.rstrip("/") == JUPYTER_BOOK_DEFAULT:
        url = repository_url(app.srcdir)
    options["repository_url"] = url
    if not url:
        # the theme cannot build these links without a repository (launch buttons would crash it)
        for key in (
            "use_repository_button",
            "use_issues_button",
            "use_edit_page_button",
            "use_source_button",
        ):
            options[key] = False
        options["launch_buttons"] = {}
        return
    if os.environ.get("BOOK_REPOSITORY_BRANCH"):
        options["repository_branch"] = os.environ["BOOK_REPOSITORY_BRANCH"]
    options["use_repository_button"] = True
    options["use_issues_button"] = (
        "github.com/" in url
    )  # the theme builds issue links for GitHub only
    hub = os.environ.get("BOOK_JUPYTERHUB_URL", "")
    if hub:
        options.setdefault("launch_buttons", {})["jupyterhub_url"] = hub


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", configure)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
