"""mldeploy.book.bilingual: one table, both languages, marked so the book can show either."""

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
