"""The book's sources keep their promises: both languages everywhere, glossary links that land,
exercises with runnable solutions, and a generated verified-with stamp on every section."""

from __future__ import annotations

import ast
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


# Sections whose prose is not yet clean, with exactly what they still lack. Each entry names one
# finding; an entry that no longer matches anything fails the test too, so the list only shrinks.
NOT_YET_CLEAN: dict[str, set[str]] = {}
# Glossary entries added with the serving and containers vocabulary: a section written alongside
# them (5.6) may not link them yet; every other check applies to it in full.
NEW_TERMS = {
    "#parity",
    "#event-loop",
    "#back-pressure",
    "#deadline",
    "#graceful-shutdown",
    "#warm-up",
    "#admin-port",
    "#activation",
    "#dequantization",
    "#qdq",
    "#kl-divergence",
    "#rtn",
    "#group-wise",
    "#hessian",
    "#damping",
    "#embedding-table",
    "#super-block",
    "#ste",
    "#build-context",
    "#base-image",
    "#layer-cache",
    "#build-secret",
    "#contract-test",
    "#replica",
    "#startup-probe",
    "#hpa",
}


def allowed(path: Path) -> set[str]:
    """The allow-list entries for one section (5.6 files: only the new glossary terms)."""
    if path.name.startswith("5.6-"):
        return NEW_TERMS
    return NOT_YET_CLEAN.get(path.name, set())


@pytest.mark.parametrize("path", NOTEBOOKS + [SAMPLE], ids=ids(NOTEBOOKS + [SAMPLE]))
def test_first_use_of_each_term_links_to_the_glossary(path: Path) -> None:
    problems = bookcheck.first_use_problems(path, GLOSSARY)
    kinds = [a for a in allowed(path) if a.startswith("#")]
    problems = [p for p in problems if not any(p.endswith(a + ")") for a in kinds)]
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
    problems = [
        p
        for p in bookcheck.terminology_problems(path)
        if not any(a in p for a in allowed(path) if a.startswith("'"))
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS + [SAMPLE], ids=ids(NOTEBOOKS + [SAMPLE]))
def test_numbers_in_the_prose_come_from_the_outputs(path: Path) -> None:
    """Every measured-looking number in prose is in the outputs or cited; every comparison stands
    next to a printed verdict."""
    problems = [
        p
        for p in bookcheck.number_problems(path)
        if not any(a in p for a in allowed(path) if a.startswith("'"))
    ]
    assert not problems, "\n".join(problems)


def test_the_allow_list_names_only_findings_that_still_exist() -> None:
    stale = []
    for name, allowed in NOT_YET_CLEAN.items():
        path = REPO_ROOT / "notebooks" / name
        if not path.exists():
            continue  # a section still being written
        found = "\n".join(
            bookcheck.first_use_problems(path, GLOSSARY)
            + bookcheck.terminology_problems(path)
            + bookcheck.number_problems(path)
        )
        stale += [f"{name}: {a}" for a in allowed if a not in found]
    assert not stale, "fixed, remove from NOT_YET_CLEAN:\n" + "\n".join(stale)


@pytest.mark.parametrize("path", NOTEBOOKS + [SAMPLE], ids=ids(NOTEBOOKS + [SAMPLE]))
def test_solutions_are_folded_in_jupyterlab_too(path: Path) -> None:
    problems = bookcheck.solution_visibility_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS + [SAMPLE], ids=ids(NOTEBOOKS + [SAMPLE]))
def test_figures_have_alt_text_and_a_numbered_caption_in_both_languages(path: Path) -> None:
    problems = bookcheck.figure_problems(path)
    assert not problems, "\n".join(problems)


def test_figures_label_their_axes_with_symbols_the_caption_names() -> None:
    plotting = [
        p for p in (REPO_ROOT / "code" / "mldeploy").rglob("*.py") if "matplotlib" in p.read_text()
    ]
    assert len(plotting) >= 4, plotting  # the figure modules of 5.2, 5.3, 5.4 and 5.6
    problems = [
        bad for p in plotting for bad in bookcheck.figure_text_problems(p.name, p.read_text())
    ]
    for path in NOTEBOOKS:
        for i, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
            if cell["cell_type"] == "code":
                name = f"{path.name}, cell {i}"
                problems += bookcheck.figure_text_problems(name, "".join(cell["source"]))
    assert not problems, "\n".join(problems)


def test_figure_text_check_catches_english_words() -> None:
    source = 'ax.set_xlabel("position")\nax.set(ylabel="ms / token", xlabel="t")\n'
    source += 'ax.plot(x, y, label="no cache")\nax.set_title(f"t = {t}: {r:.0f}×")\n'
    problems = bookcheck.figure_text_problems("x.py", source)
    assert [p.split("words ")[1] for p in problems] == ["['position']", "['no']"]


@pytest.mark.parametrize("path", NOTEBOOKS + [SAMPLE], ids=ids(NOTEBOOKS + [SAMPLE]))
def test_exercises_have_solution_cells_that_run(path: Path) -> None:
    problems = bookcheck.exercise_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS + [SAMPLE], ids=ids(NOTEBOOKS + [SAMPLE]))
def test_code_cells_are_short_and_show_library_source_whole(path: Path) -> None:
    problems = bookcheck.code_cell_problems(path)
    assert not problems, "\n".join(problems)


def test_code_cell_check_catches_a_long_cell_and_cut_source(tmp_path: Path) -> None:
    at_limit = "\n".join(f"x{i} = {i}" for i in range(bookcheck.MAX_CODE_LINES)) + "\n\n"
    cells = [
        nbformat.v4.new_code_cell(at_limit),  # trailing blank lines are not counted
        nbformat.v4.new_code_cell(at_limit.rstrip() + "\nx = 0"),
        nbformat.v4.new_code_cell("source = inspect.getsource(f)\nprint(source[:10])"),
        nbformat.v4.new_code_cell("show(f)"),
    ]
    problems = bookcheck.code_cell_problems(write_notebook(tmp_path, *cells))
    assert [p.split(":")[0] for p in problems] == ["5.9-bad.ipynb, cell 1", "5.9-bad.ipynb, cell 2"]
    assert f"{bookcheck.MAX_CODE_LINES + 1} lines" in problems[0]


@pytest.mark.parametrize("path", NOTEBOOKS + [SAMPLE], ids=ids(NOTEBOOKS + [SAMPLE]))
def test_outputs_carry_a_verified_with_stamp(path: Path) -> None:
    problems = bookcheck.stamp_problems(path, PINS)
    assert not problems, "\n".join(problems)


def test_glossary_entries_are_complete() -> None:
    terms = bookcheck.glossary_terms(GLOSSARY)
    assert len(terms) >= 80
    assert NEW_TERMS <= {"#" + t.anchor for t in terms}
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
    # plain JSON in the notebook file: strings only, read back unchanged, and a real UTC date
    assert all(isinstance(v, str) for v in verified.values())
    assert json.loads(json.dumps(verified)) == verified
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", verified["date"])


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


def prose_number_problems(folder: Path, zh: str, en: str, printed: str) -> list[str]:
    """``bookcheck.number_problems`` of a notebook: a code cell that printed ``printed``, then a
    bilingual prose cell (cell 1)."""
    code = nbformat.v4.new_code_cell("print(...)")
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text=printed)]
    prose = nbformat.v4.new_markdown_cell(
        f'<div lang="zh">\n\n{zh}\n\n</div>\n<div lang="en">\n\n{en}\n\n</div>'
    )
    return bookcheck.number_problems(write_notebook(folder, code, prose))


def test_number_check_compares_prose_with_outputs(tmp_path: Path) -> None:
    problems = prose_number_problems(
        tmp_path,
        "文件约 10.6 KiB，准确率 0.9975，比 5.1 节小 3.9 倍。",
        "The file is about 10.6 KiB, accuracy 0.9975, 2.5× smaller than in section 5.1.",
        "ONNX 10.56 KiB\naccuracy 0.9975\nratio 3.91x\n",
    )
    assert problems == [
        "5.9-bad.ipynb, cell 1: '2.5×' in the prose matches no number in the outputs"
    ], problems


def test_comparison_check_wants_a_printed_verdict_or_a_citation(tmp_path: Path) -> None:
    zh = "误差持续下降，延迟约 44 ms。"
    en = (
        "The error keeps falling; one request takes 44 ms.\n\n"
        "Published: 3.25× faster on an A100 (arXiv:2210.17323), about the same in PR #1684."
    )
    problems = prose_number_problems(tmp_path, zh, en, "error 5.6e-03 2.7e-03\n")
    assert problems == [
        "5.9-bad.ipynb, cell 1: the comparison '持续下降' has no computed verdict printed next to "
        "it (print one, or cite the source)",
        "5.9-bad.ipynb, cell 1: the comparison 'keeps falling' has no computed verdict printed "
        "next to it (print one, or cite the source)",
        "5.9-bad.ipynb, cell 1: '44 ms' in the prose matches no number in the outputs",
        "5.9-bad.ipynb, cell 1: '44 ms' in the prose matches no number in the outputs",
    ], problems
    verdict = "fc1: falls overall (0.0056 → 0.0027)\nlatency 44 ms\n"
    assert prose_number_problems(tmp_path, zh, en, verdict) == []


def test_number_check_reads_numbers_written_as_words(tmp_path: Path) -> None:
    zh = "固定了六个版本，模型只有十几 KiB，镜像大了约三成。"
    en = "Six exact versions are pinned; the model is a dozen KiB, the image about a third more."
    problems = prose_number_problems(tmp_path, zh, en, "8/8 pinned\n")
    assert problems == [
        "5.9-bad.ipynb, cell 1: '十几 KiB' is a measurement in words; write the digits the "
        "outputs print",
        "5.9-bad.ipynb, cell 1: '三成' is a measurement in words; write the digits the outputs "
        "print",
        "5.9-bad.ipynb, cell 1: 'a dozen KiB' is a measurement in words; write the digits the "
        "outputs print",
        "5.9-bad.ipynb, cell 1: 'about a third' is a measurement in words; write the digits the "
        "outputs print",
        "5.9-bad.ipynb, cell 1: 'Six exact' counts 6, a number neither the code nor the outputs "
        "write",
        "5.9-bad.ipynb, cell 1: '六个' counts 6, a number neither the code nor the outputs write",
    ], problems
    zh = zh.replace("十几 KiB", "10.6 KiB").replace("约三成", "1.3 倍")
    en = en.replace("a dozen KiB", "10.6 KiB").replace("about a third more", "1.3×")
    assert prose_number_problems(tmp_path, zh, en, "6/6 pinned\n10.6 KiB, 1.3x\n") == []


def test_terminology_check_wants_american_spelling(tmp_path: Path) -> None:
    cell = nbformat.v4.new_markdown_cell(
        '<div lang="zh">\n\n留出集与保留集。\n\n</div>\n'
        '<div lang="en">\n\nIts behaviour is organised; the colorful behavior is fine.\n\n</div>'
    )
    joined = "\n".join(bookcheck.terminology_problems(write_notebook(tmp_path, cell)))
    assert "'behaviour'" in joined and "'organised'" in joined and "'保留集'" in joined, joined
    assert "'behavior'" not in joined and "'留出集'" not in joined


# Serving terms whose first use in 5.2 is not linked yet (see NOT_YET_CLEAN).
UNLINKED_FOR_NOW = {"event-loop", "deadline", "graceful-shutdown", "warm-up"}


def test_every_glossary_entry_is_linked_from_the_book() -> None:
    text = "".join(p.read_text(encoding="utf-8") for p in NOTEBOOKS + PAGES)
    unlinked = {
        t.anchor
        for t in bookcheck.glossary_terms(GLOSSARY)
        if f"glossary.md#{t.anchor})" not in text
    }
    assert unlinked <= UNLINKED_FOR_NOW, f"never linked: {sorted(unlinked - UNLINKED_FOR_NOW)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_summary_and_exercises_headings_are_the_same_in_every_notebook(path: Path) -> None:
    # one convention: numbered subsections, then "## 小结 · Summary" and "## 练习 · Exercises"
    cells = json.loads(path.read_text())["cells"]
    headings = [
        line.strip()
        for cell in cells
        if cell["cell_type"] == "markdown"
        for line in "".join(cell["source"]).splitlines()
        if line.startswith("## ") and ("Summary" in line or "Exercises" in line)
    ]
    assert headings == ["## 小结 · Summary", "## 练习 · Exercises"]


def _names(source: str) -> tuple[set[str], set[str]]:
    """The names a cell binds and the names it reads (top-level ``await`` allowed)."""
    flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    tree = compile(source, "<cell>", "exec", flags=flags)
    bound, read = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
    return bound, read


def test_every_cell_that_needs_the_image_is_skipped_with_it() -> None:
    """Without a container engine the cells tagged ``container-engine`` are skipped
    (``notebooks/conftest.py``); a cell that reads a name only those cells bind must carry the tag
    too, or it fails with a NameError on a machine without Docker or Podman."""
    nb = nbformat.read(REPO_ROOT / "notebooks" / "5.4-docker.ipynb", as_version=4)
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    tagged = {i for i, c in code if "container-engine" in c.metadata.get("tags", [])}
    names = {i: _names(c.source) for i, c in code}
    only_tagged = set().union(*(names[i][0] for i in tagged)) - set().union(
        *(names[i][0] for i, _ in code if i not in tagged)
    )
    untagged = {i: sorted(names[i][1] & only_tagged) for i, _ in code if i not in tagged}
    assert {i: n for i, n in untagged.items() if n} == {}
