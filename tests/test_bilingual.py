"""mldeploy.book.bilingual: one table, both languages, marked so the book can show either."""

import pytest

from mldeploy.book import bilingual


def test_table_marks_each_language_and_reads_as_text() -> None:
    t = bilingual.table(
        [("格式", "Format"), ("大小", "Size")],
        [["ONNX", "10.56 KiB"], [("状态字典", "state dict"), "12.25 KiB"]],
        align="lr",
    )
    html = t._repr_html_()
    assert '<th style="text-align: left"><span lang="zh">格式</span>' in html
    assert (
        '<span lang="en">Size</span></th>' in html
        and '<td style="text-align: right">10.56 KiB</td>' in html
    )
    assert (
        '<span lang="zh">状态字典</span><span class="lang-sep" aria-hidden="true"> · </span>'
        '<span lang="en">state dict</span>' in html
    )
    assert repr(t).split("\n") == [
        "格式 · Format          大小 · Size",  # Chinese characters are two columns wide
        "---------------------  -----------",
        "ONNX                     10.56 KiB",
        "状态字典 · state dict    12.25 KiB",
    ]
    assert (
        '<td style="text-align: left">x&amp;y</td>'
        in bilingual.table([("甲<乙", "a<b")], [["x&y"]])._repr_html_()
    )


def test_lines_mark_each_language_and_print_both() -> None:
    shown = bilingual.lines([("甲<乙", "a<b"), ("丙", "c")])
    html = shown._repr_html_()
    assert '<p lang="zh">甲&lt;乙<br>丙</p>' in html and '<p lang="en">a&lt;b<br>c</p>' in html
    assert repr(shown) == "甲<乙\n  a<b\n丙\n  c"


def test_trend_names_the_steps_that_rise_and_ignores_noise() -> None:
    from mldeploy.quant import verdict

    assert verdict.trend("e", [1, 2, 3], [3.0, 2.0, 1.0])[0] == (
        "e: falls, no step rising by more than 5% (3 → 1)"
    )
    en, zh = verdict.trend("fc1", [16, 64, 256, 1024], [5.57e-3, 5.97e-3, 6.82e-3, 2.71e-3])
    assert en == "fc1: falls overall (0.00557 → 0.00271) but rises by more than 5% at 16→64, 64→256"
    assert zh == "fc1：总体下降（0.00557 → 0.00271），但在 16→64, 64→256 处上升超过 5%"
    # a 2 % wobble is not a rise, and a curve that never leaves ±5 % is flat
    assert "rises" not in verdict.trend("head", [1, 2, 3], [3e-3, 1.49e-4, 1.52e-4])[0]
    assert "stays within ±5%" in verdict.trend("ppl", [1, 2, 3], [10.19, 10.166, 10.169])[0]
    assert "does not fall overall" in verdict.trend("x", [1, 2], [1.0, 1.5])[0]
    with pytest.raises(ValueError):
        verdict.trend("x", [1], [1.0])


def test_the_principles_table_of_5_4_reads_the_dockerfile_and_footprints() -> None:
    from mldeploy.image import dockerfile, footprint, principles
    from mldeploy.paths import REPO_ROOT

    parsed = dockerfile.parse((REPO_ROOT / "Dockerfile").read_text(encoding="utf-8"))
    reqs = footprint.read_requirements(REPO_ROOT / "requirements-serve.txt")
    table = principles.principles_table(parsed, reqs, *_fake_footprints(len(reqs) + 3))
    text = repr(table)
    assert "依赖 2 MB，而不是 9 MB · deps 2 MB instead of 9 MB" in text, text
    assert f"{len(reqs)}/{len(reqs)} direct requirements with ==" in text
    assert "3 个传递依赖未固定 · 3 transitive unpinned" in text


def _fake_footprints(packages: int):
    from types import SimpleNamespace

    onnx = SimpleNamespace(total=2e6, sizes={f"p{i}": 1 for i in range(packages)})
    return onnx, SimpleNamespace(total=9e6, sizes={})
