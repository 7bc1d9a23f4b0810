"""The book's sources keep their promises: both languages everywhere, glossary links that land,
exercises with runnable solutions, and a generated verified-with stamp on every section."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest

import bookcheck
from mldeploy.paths import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
PAGES = sorted((REPO_ROOT / "chapters").glob("*.md"))
GLOSSARY = REPO_ROOT / "chapters" / "glossary.md"
SAMPLE = Path(__file__).parent / "fixtures" / "5.0-sample.ipynb"  # a section as it should be
PINS = bookcheck.pinned_versions(REPO_ROOT / "requirements.txt")


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


@pytest.mark.parametrize(
    "path", NOTEBOOKS + PAGES + [SAMPLE], ids=ids(NOTEBOOKS + PAGES + [SAMPLE])
)
def test_every_prose_block_has_both_languages(path: Path) -> None:
    problems = bookcheck.bilingual_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "path", NOTEBOOKS + PAGES + [SAMPLE], ids=ids(NOTEBOOKS + PAGES + [SAMPLE])
)
def test_glossary_links_land_on_an_entry(path: Path) -> None:
    folder = REPO_ROOT / "notebooks" if path == SAMPLE else None
    problems = bookcheck.link_problems(path, GLOSSARY, folder)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS + [SAMPLE], ids=ids(NOTEBOOKS + [SAMPLE]))
def test_first_use_of_each_term_links_to_the_glossary(path: Path) -> None:
    problems = bookcheck.first_use_problems(path, GLOSSARY)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "path", NOTEBOOKS + PAGES + [SAMPLE], ids=ids(NOTEBOOKS + PAGES + [SAMPLE])
)
def test_no_glossary_link_inside_a_longer_word(path: Path) -> None:
    problems = bookcheck.mislink_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "path", NOTEBOOKS + PAGES + [SAMPLE], ids=ids(NOTEBOOKS + PAGES + [SAMPLE])
)
def test_one_vocabulary_american_ipa_and_no_drafts(path: Path) -> None:
    problems = bookcheck.terminology_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS + [SAMPLE], ids=ids(NOTEBOOKS + [SAMPLE]))
def test_numbers_in_the_prose_come_from_the_outputs(path: Path) -> None:
    problems = bookcheck.number_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS + [SAMPLE], ids=ids(NOTEBOOKS + [SAMPLE]))
def test_solutions_are_folded_in_jupyterlab_too(path: Path) -> None:
    problems = bookcheck.solution_visibility_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS + [SAMPLE], ids=ids(NOTEBOOKS + [SAMPLE]))
def test_figures_have_alt_text_and_a_numbered_caption_in_both_languages(path: Path) -> None:
    problems = bookcheck.figure_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS + [SAMPLE], ids=ids(NOTEBOOKS + [SAMPLE]))
def test_exercises_have_solution_cells_that_run(path: Path) -> None:
    problems = bookcheck.exercise_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS + [SAMPLE], ids=ids(NOTEBOOKS + [SAMPLE]))
def test_outputs_carry_a_verified_with_stamp(path: Path) -> None:
    problems = bookcheck.stamp_problems(path, PINS)
    assert not problems, "\n".join(problems)


def test_glossary_entries_are_complete() -> None:
    terms = bookcheck.glossary_terms(GLOSSARY)
    assert len(terms) >= 40
    assert not bookcheck.glossary_problems(GLOSSARY)
    # the pronunciations the chapter gives in its prose
    by_anchor = {t.anchor: t for t in terms}
    assert by_anchor["inference"].ipa == "/ˈɪnfərəns/"
    assert by_anchor["parameter"].ipa == "/pəˈræmɪtər/"
    assert by_anchor["tensor"].ipa == "/ˈtensər/"
    assert by_anchor["onnx"].ipa == "/ˈɑːnɪks/"  # American English throughout
    assert "/ˈkwɑːntaɪz/" in GLOSSARY.read_text(encoding="utf-8")


# --- the checks themselves fail on bad sources ------------------------------------------------

ZH, EN = (
    '<div lang="zh">\n\n中文段落。\n\n</div>',
    '<div lang="en">\n\nAn English paragraph.\n\n</div>',
)
BAD_CELLS = {
    "missing English": ZH,
    "missing Chinese": EN,
    "English first": EN + "\n" + ZH,
    "unmarked prose": "## 1.1 标题 · Title\n\nA paragraph in no language block.",
    "heading in one language": "## 1.1 只有中文的标题\n\n" + ZH + "\n" + EN,
    "no blank line inside div": '<div lang="zh">\n中文段落。\n</div>\n' + EN,
    "unclosed div": '<div lang="zh">\n\n中文段落。\n',
    "English in the zh block": '<div lang="zh">\n\nOnly English here.\n\n</div>\n' + EN,
    "Chinese-only list item": "- [5.1 模型导出](../notebooks/5.1.ipynb)\n- [5.2 Serving](x.ipynb)",
    "English-only list": "- one point\n- another point",
    "Chinese-only table cell": "| 格式 | size |\n|---|---|\n| ONNX | 8.0 |\n\n" + ZH + "\n" + EN,
    # Sphinx closes the section inside the div: the page's article collapses (it happened in 5.3a)
    "heading inside a language block": (
        '<div lang="zh">\n\n## 小结 · Summary\n\n中文段落。\n\n</div>\n' + EN
    ),
}


def write_notebook(
    folder: Path, *cells: nbformat.NotebookNode, metadata: dict | None = None
) -> Path:
    nb = nbformat.v4.new_notebook(cells=list(cells), metadata=metadata or {})
    path = folder / "5.9-bad.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize("bad", BAD_CELLS.values(), ids=BAD_CELLS.keys())
def test_bilingual_check_names_the_file_and_cell(tmp_path: Path, bad: str) -> None:
    good = nbformat.v4.new_markdown_cell("# 5.9 坏例子 · A Bad Example\n\n" + ZH + "\n" + EN)
    path = write_notebook(
        tmp_path, good, nbformat.v4.new_code_cell("print(1)"), nbformat.v4.new_markdown_cell(bad)
    )
    problems = bookcheck.bilingual_problems(path)
    assert problems and all(p.startswith("5.9-bad.ipynb, cell 2") for p in problems), problems


def test_bilingual_check_accepts_shared_content(tmp_path: Path) -> None:
    shared = nbformat.v4.new_markdown_cell(
        "## 1.1 大小 · Size\n\n| 格式 · format | KB |\n|---|---:|\n| ONNX | 8.0 |\n\n"
        "$$\ny = \\frac{x}{s}\n$$\n\n```python\nprint('code')\n```\n\n![](figure.png)\n\n"
        "- [5.1 模型导出 · Model Export](../notebooks/5.1-model-export.ipynb)\n\n" + ZH + "\n" + EN
    )
    assert bookcheck.bilingual_problems(write_notebook(tmp_path, shared)) == []


def test_link_checks_catch_a_wrong_anchor_and_a_missing_first_link(tmp_path: Path) -> None:
    cell = nbformat.v4.new_markdown_cell(
        '<div lang="zh">\n\n'
        "模型的[推理](../chapters/glossary.md#no-such-term)很快，推理延迟很低。\n\n</div>\n"
        '<div lang="en">\n\n'
        "The model's [inference](../chapters/glossary.md#inference) is fast.\n\n</div>"
    )
    path = write_notebook(tmp_path, cell)
    links = bookcheck.link_problems(path, GLOSSARY, REPO_ROOT / "notebooks")
    assert links == ["5.9-bad.ipynb, cell 0: [推理](…#no-such-term): no such glossary entry"]
    first = bookcheck.first_use_problems(path, GLOSSARY)
    assert any("first zh use of 'inference'" in p for p in first), first
    assert any("first zh use of 'latency'" in p for p in first), first
    assert not any("first en use of 'inference'" in p for p in first), first


def test_exercise_and_stamp_checks_catch_omissions(tmp_path: Path) -> None:
    exercises = nbformat.v4.new_markdown_cell("## 5.9.3 练习 · Exercises\n\n" + ZH + "\n" + EN)
    visible = nbformat.v4.new_code_cell("print('answer')")
    path = write_notebook(tmp_path, exercises, visible)
    assert "no solution code cell tagged 'hide-cell'" in bookcheck.exercise_problems(path)[0]
    assert (
        "no exercises section" in bookcheck.exercise_problems(write_notebook(tmp_path, visible))[0]
    )
    stale = {
        "mldeploy": {
            "verified": {
                "python": "3.11.7",
                "torch": "2.0.0",
                "onnxruntime": "1.32.0",
                "date": "2026-01-01",
            }
        }
    }
    problems = bookcheck.stamp_problems(
        write_notebook(tmp_path, visible, metadata=stale), {"torch": "2.13.0"}
    )
    assert problems == [
        "5.9-bad.ipynb: outputs were produced with torch 2.0.0, "
        "the pin is 2.13.0: run `make refresh`"
    ]


def test_refresh_writes_the_stamp_from_the_environment() -> None:
    from mldeploy.book import notebooks

    nb = nbformat.v4.new_notebook()
    verified = notebooks.stamp(nb)
    assert nb.metadata["mldeploy"]["verified"] == verified
    assert verified["torch"].split("+")[0] == PINS["torch"]
    assert verified["onnxruntime"] == PINS["onnxruntime"]
    assert json.dumps(verified)  # plain JSON in the notebook file


def test_first_uses_can_be_linked_automatically(tmp_path: Path) -> None:
    (tmp_path / "notebooks").mkdir()
    cell = nbformat.v4.new_markdown_cell(
        '<div lang="zh">\n\n**推理**很快；动态量化不是量化的第一次使用。量化。\n\n</div>\n'
        '<div lang="en">\n\n'
        "Inference is fast, see [ONNX Runtime](https://onnxruntime.ai) and `tensor`.\n\n</div>"
    )
    path = write_notebook(tmp_path / "notebooks", cell)
    glossary = tmp_path / "chapters" / "glossary.md"
    glossary.parent.mkdir()
    shutil.copy2(GLOSSARY, glossary)
    assert bookcheck.link_first_uses(path, glossary) == 4
    assert bookcheck.first_use_problems(path, glossary) == []
    text = nbformat.read(path, as_version=4).cells[0].source
    # the bold moves inside the link: `**[推理](…)**很快` would not close the bold in CommonMark
    assert "[**推理**](../chapters/glossary.md#inference)很快" in text
    from markdown_it import MarkdownIt

    assert "<strong>推理</strong></a>很快" in MarkdownIt("commonmark").render(text)
    assert (
        "[动态量化](../chapters/glossary.md#dynamic-quantization)不是[量化](../chapters/glossary.md#quantization)的"
        in text
    )
    assert (
        "[Inference](../chapters/glossary.md#inference) is fast, "
        "see [ONNX Runtime](https://onnxruntime.ai) and `tensor`." in text
    )


def test_linking_after_a_code_fence_edits_the_right_characters(tmp_path: Path) -> None:
    (tmp_path / "notebooks").mkdir()
    original = (
        '<div lang="zh">\n\n一条命令：\n\n```bash\nmake artifacts   # 写出模型\n```\n\n'
        "它调用 `mldeploy.image.artifacts.build`，导出 ONNX 和 TorchScript。\n\n</div>\n"
        '<div lang="en">\n\nOne command:\n\n```bash\nmake artifacts\n```\n\n'
        "It calls `mldeploy.image.artifacts.build` and exports TorchScript.\n\n</div>"
    )
    path = write_notebook(tmp_path / "notebooks", nbformat.v4.new_markdown_cell(original))
    glossary = tmp_path / "chapters" / "glossary.md"
    glossary.parent.mkdir()
    shutil.copy2(GLOSSARY, glossary)
    assert bookcheck.link_first_uses(path, glossary) > 0
    text = nbformat.read(path, as_version=4).cells[0].source
    assert "[TorchScript](../chapters/glossary.md#torchscript)。" in text
    assert "`mldeploy.image.artifacts.build`" in text  # the code span is untouched
    assert re.sub(r"\[([^\]]*)\]\([^)]*glossary\.md#[^)]*\)", r"\1", text) == original


def test_headings_are_lifted_out_of_language_blocks_idempotently(tmp_path: Path) -> None:
    bad = '<div lang="zh">\n\n## 小结 · Summary\n\n- 中文要点。\n\n</div>\n' + EN
    fixed = bookcheck.lift_headings(bad)
    assert fixed.startswith('## 小结 · Summary\n\n<div lang="zh">\n\n- 中文要点。\n\n</div>')
    assert bookcheck.lift_headings(fixed) == fixed
    solution = nbformat.v4.new_code_cell("print(1)", metadata={"tags": ["hide-cell"]})
    path = write_notebook(tmp_path, nbformat.v4.new_markdown_cell(bad), solution)
    assert bookcheck.bilingual_problems(path) and bookcheck.solution_visibility_problems(path)
    bookcheck.fix_structure(path)
    assert not bookcheck.bilingual_problems(path) and not bookcheck.solution_visibility_problems(
        path
    )
    assert bookcheck.fix_structure(path) == []  # a second run changes nothing
    assert nbformat.read(path, as_version=4).cells[1].metadata["jupyter"] == {"source_hidden": True}


# each mislink the linker once made: a term's name inside a longer word that means something else
MISLINKS = {
    "运行时间 is run time": (
        "**运行时间**：约 15 秒。程序的运行时就是 ONNX Runtime。",
        "运行时",
        "runtime",
        "运行时就是",
    ),
    "container runtime": (
        "Any machine with a container runtime runs it; the ONNX runtime differs.",
        "runtime",
        "runtime",
        "runtime differs",
    ),
    "shape inference": (
        "The checker's shape inference passes. Inference is fast.",
        "Inference",
        "inference",
        "Inference is fast",
    ),
    "Percentile calibration": (
        "Compare MinMax, Entropy and Percentile calibration. The 99th percentile of latency.",
        "percentile",
        "percentile",
        "percentile of",
    ),
    "lazy batches": (
        "The loader yields lazy batches. Each batch holds 32 rows.",
        "batch",
        "batch",
        "batch holds",
    ),
}


@pytest.mark.parametrize("case", MISLINKS.values(), ids=MISLINKS.keys())
def test_linker_links_whole_words_only(tmp_path: Path, case: tuple[str, str, str, str]) -> None:
    sentence, word, anchor, linked_context = case
    (tmp_path / "notebooks").mkdir()
    zh, en = (
        (sentence, "英文见下。")
        if re.search(r"[\u4e00-\u9fff]{4}", sentence)
        else ("中文见下。", sentence)
    )
    cell = nbformat.v4.new_markdown_cell(
        f'<div lang="zh">\n\n{zh}\n\n</div>\n<div lang="en">\n\n{en}\n\n</div>'
    )
    path = write_notebook(tmp_path / "notebooks", cell)
    glossary = tmp_path / "chapters" / "glossary.md"
    glossary.parent.mkdir()
    shutil.copy2(GLOSSARY, glossary)
    bookcheck.link_first_uses(path, glossary)
    text = nbformat.read(path, as_version=4).cells[0].source
    link = f"[{word}](../chapters/glossary.md#{anchor})"
    assert link + linked_context[len(word) :] in text, (
        text
    )  # the real use is linked, the compound is not
    assert text.count(f"#{anchor})") == 1, text
    assert bookcheck.mislink_problems(path) == []
    # a mislink written by an older linker is found, and `relink` moves the link to the real use
    plain = re.sub(r"\[([^\]]*)\]\([^)]*#" + anchor + r"\)", r"\1", text)
    x, y = bookcheck._not_uses(anchor, plain)[0]
    start = x + plain[x:y].lower().rfind(word.lower())
    end = start + len(word)
    stale = plain[:start] + f"[{plain[start:end]}](../chapters/glossary.md#{anchor})" + plain[end:]
    nb = nbformat.read(path, as_version=4)
    nb.cells[0].source = stale
    nbformat.write(nb, path)
    assert bookcheck.mislink_problems(path), stale
    assert bookcheck.unlink_mislinks(path) == 1 and bookcheck.link_first_uses(path, glossary) == 1
    assert nbformat.read(path, as_version=4).cells[0].source == text


def test_terminology_check_names_variants_british_ipa_and_drafts(tmp_path: Path) -> None:
    cell = nbformat.v4.new_markdown_cell(
        '<div lang="zh">\n\n'
        "两月牙数据，批大小为 8，量化（quantize /ˈkwɒntaɪz/），如草稿所示。\n\n</div>\n"
        '<div lang="en">\n\nAs the draft did, quantize /ˈkwɑːntaɪz/.\n\n</div>'
    )
    problems = bookcheck.terminology_problems(write_notebook(tmp_path, cell))
    joined = "\n".join(problems)
    for expected in ["'两月牙'", "'批大小'", "/ˈkwɒntaɪz/ is British", "草稿", "the draft"]:
        assert expected in joined, joined
    assert "/ˈkwɑːntaɪz/" not in joined


def test_number_check_compares_prose_with_outputs(tmp_path: Path) -> None:
    prose = nbformat.v4.new_markdown_cell(
        '<div lang="zh">\n\n文件约 10.6 KiB，准确率 0.9975，比 5.1 节小 3.9 倍。\n\n</div>\n'
        '<div lang="en">\n\n'
        "The file is about 10.6 KiB, accuracy 0.9975, 2.5× smaller than in section 5.1.\n\n</div>"
    )
    code = nbformat.v4.new_code_cell("print(...)")
    code.outputs = [
        nbformat.v4.new_output(
            "stream", name="stdout", text="ONNX 10.56 KiB\naccuracy 0.9975\nratio 3.91x\n"
        )
    ]
    problems = bookcheck.number_problems(write_notebook(tmp_path, code, prose))
    assert problems == [
        "5.9-bad.ipynb, cell 1: '2.5×' in the prose matches no number in the outputs"
    ], problems
