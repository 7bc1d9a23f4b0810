"""The book's small Sphinx extensions in _ext/, tested without building the book."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from mldeploy.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "_ext"))
import bilingual_search
import entry_redirect
import repository_links
import verified_stamp


def configured(tmp_path, monkeypatch, env: dict[str, str], url: str = "") -> dict:
    for key in (
        "BOOK_REPOSITORY_URL",
        "BOOK_REPOSITORY_BRANCH",
        "BOOK_JUPYTERHUB_URL",
        "GITHUB_SERVER_URL",
        "GITHUB_REPOSITORY",
    ):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    options = {"repository_url": url, "launch_buttons": {"binderhub_url": "https://mybinder.org"}}
    repository_links.configure(
        SimpleNamespace(srcdir=str(tmp_path)), SimpleNamespace(html_theme_options=options)
    )
    return options


def test_no_repository_means_no_repository_or_launch_buttons(tmp_path, monkeypatch) -> None:
    options = configured(tmp_path, monkeypatch, {}, url=repository_links.JUPYTER_BOOK_DEFAULT)
    assert (
        options["repository_url"] == ""
    )  # jupyter-book's own default is not this book's repository
    assert options["use_repository_button"] is False and options["launch_buttons"] == {}


@pytest.mark.parametrize(
    "env",
    [
        {"BOOK_REPOSITORY_URL": "https://github.com/org/course/"},
        {"GITHUB_SERVER_URL": "https://github.com", "GITHUB_REPOSITORY": "org/course"},
    ],
)
def test_repository_comes_from_the_environment(tmp_path, monkeypatch, env) -> None:
    options = configured(
        tmp_path, monkeypatch, {**env, "BOOK_JUPYTERHUB_URL": "https://hub.example.edu"}
    )
    assert options["repository_url"] == "https://github.com/org/course"
    assert options["use_repository_button"] is True and options["use_issues_button"] is True
    assert options["launch_buttons"] == {
        "binderhub_url": "https://mybinder.org",
        "jupyterhub_url": "https://hub.example.edu",
    }


def test_stamp_line_names_versions_and_date() -> None:
    line = verified_stamp.stamp_text(
        {"python": "3.11.7", "torch": "2.13.0+cpu", "onnxruntime": "1.32.0", "date": "2026-11-24"}
    )
    assert "Python 3.11.7" in line and "torch 2.13.0+cpu" in line and "onnxruntime 1.32.0" in line
    assert line.endswith("2026-11-24")
    html = verified_stamp.stamp_html(
        {"python": "3.11.7", "torch": "2.13.0+cpu", "onnxruntime": "1.32.0", "date": "2026-11-24"}
    )
    assert (
        '<span lang="en">Verified with </span>Python 3.11.7 · torch 2.13.0+cpu · onnxruntime 1.32.0'
        in html
    )


def test_a_missing_browser_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path) -> None:
    import browsing

    monkeypatch.setattr(browsing, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        browsing.require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        browsing.require_chromium()


def test_search_cuts_pages_and_queries_into_the_same_terms() -> None:
    search = bilingual_search.BilingualSearch({})
    # a Chinese run becomes its overlapping pairs, English words stay words
    assert search.split("推理服务（inference service）") == [
        "推理",
        "理服",
        "服务",
        "inference",
        "service",
    ]
    assert search.split("量") == ["量"] and search.word_filter("量")
    assert not search.word_filter("a")  # a single Latin letter is no word
    assert search.stem("服务") == "服务" and search.stem("services") == "servic"
    # the browser's splitter is the same cut, written in JavaScript
    assert "run.slice(i, i + 2)" in search.js_splitter_code


def test_entry_page_forwards_with_the_query_and_fragment() -> None:
    page = entry_redirect.redirect_page("chapters/overview.html", "书 · Book <1>", "en")
    assert 'window.location.replace("chapters/overview.html" + window.location.search' in page
    assert "window.location.hash" in page
    # without JavaScript a refresh still forwards; the title is escaped
    assert '<meta http-equiv="refresh" content="0; url=chapters/overview.html">' in page
    assert "书 · Book &lt;1&gt;" in page
