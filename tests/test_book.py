"""The book builds from the committed notebooks with zero Sphinx warnings, any number of times in
a row, and no notebook shows an exercise's solution or answer before the reader asks."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from mldeploy import timeouts
from mldeploy.book import notebooks
from mldeploy.paths import REPO_ROOT

pytestmark = pytest.mark.book

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


def book_command() -> list[str]:
    """The `make book` recipe's jupyter-book command, as the Makefile runs it."""
    recipe = (REPO_ROOT / "Makefile").read_text(encoding="utf-8").split("\nbook:")[1]
    line = next(x for x in recipe.split("\n")[1:] if "jupyter-book build" in x)
    words = shlex.split(line.strip())
    assert words[0] == "$(VENV)/bin/jupyter-book", line
    return [str(Path(sys.executable).with_name("jupyter-book")), *words[1:]]


def build(output: Path) -> subprocess.CompletedProcess:
    command = [str(REPO_ROOT) if w == "." else w for w in book_command()]
    return subprocess.run(
        [*command, "--path-output", str(output)],
        capture_output=True,
        text=True,
        timeout=timeouts.scaled(900),
    )


def test_book_builds_without_warnings_and_has_every_page(tmp_path):
    proc = build(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    html = tmp_path / "_build" / "html"
    for notebook in NOTEBOOKS:
        page = html / "notebooks" / (notebook.stem + ".html")
        assert page.is_file(), f"{page.name} missing from the book"
        text = page.read_text(encoding="utf-8")
        assert 'lang="zh"' in text and 'lang="en"' in text
        assert "cell_output" in text, f"{page.name} shows no stored outputs"
    # an author rebuilds after every edit: the second and third runs in the same folder pass too,
    # also after the built _static/ was deleted or a static file was edited
    static = html / "_static"
    for run, spoil in enumerate([lambda: None, lambda: shutil.rmtree(static)], start=2):
        spoil()
        proc = build(tmp_path)
        assert proc.returncode == 0, f"run {run}: " + proc.stdout[-3000:] + proc.stderr[-3000:]
        for name in ("lang-switch.js", "lang-switch.css"):
            copy = static / name
            assert copy.is_file(), f"run {run}: {name} missing from the built _static/"
            assert copy.read_bytes() == (REPO_ROOT / "_static" / name).read_bytes()
    shutil.rmtree(tmp_path / "_build", ignore_errors=True)


def test_static_files_are_recopied_when_they_change(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "_ext"))
    import static_refresh

    source, out = tmp_path / "src", tmp_path / "out"
    (source / "_static").mkdir(parents=True)
    (source / "_static" / "a.css").write_text("a {}")
    assert static_refresh.stale_static_files(source, out, ["_static"]) == ["a.css"]
    (out / "_static").mkdir(parents=True)
    (out / "_static" / "a.css").write_text("a {}")
    assert static_refresh.stale_static_files(source, out, ["_static"]) == []
    (source / "_static" / "a.css").write_text("a { color: red }")
    assert static_refresh.stale_static_files(source, out, ["_static"]) == ["a.css"]


# --- answers that wait to be asked ---------------------------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_solution_or_answer_is_visible_before_it_is_asked_for(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    problems = notebooks.visible_answers(nb)
    assert not problems, (
        f"{path.name}: " + "; ".join(problems) + " (run python -m mldeploy.book.notebooks "
        "hide-answers notebooks/*.ipynb)"
    )
    solutions = [c for c in nb.cells if notebooks.is_solution(c)]
    assert solutions, f"{path.name} has no '# Solution N' cell"
    for cell in solutions:  # nbval runs every solution: none is skipped or allowed to fail
        assert "NBVAL_SKIP" not in cell.source
        assert not {"raises-exception", "remove-cell"} & set(cell.metadata.get("tags", []))


def _exercise_notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("## 5.9.1 练习 · Exercises"),
        nbformat.v4.new_code_cell(
            "# Solution 1: the answer\nprint(1)", metadata={"tags": ["hide-input"]}
        ),
        nbformat.v4.new_markdown_cell(
            '<div lang="zh">\n\n**答案 1**：一。\n\n</div>\n<div lang="en">\n\n'
            "**Answer 1**: one.\n\n</div>"
        ),
        nbformat.v4.new_code_cell("print('not a solution')"),
    ]
    return nb


def test_hide_answers_closes_solutions_and_answers_idempotently() -> None:
    nb = _exercise_notebook()
    assert len(notebooks.visible_answers(nb)) == 3  # no tag, open in Lab, answer not folded
    changes = notebooks.hide_answers(nb)
    assert changes == ["cell 1: solution folded", "cell 2: answer 1 closed"]
    assert notebooks.visible_answers(nb) == []
    solution, answer, other = nb.cells[1], nb.cells[2], nb.cells[3]
    assert solution.metadata["tags"] == ["hide-cell"]
    assert solution.metadata["jupyter"] == {"source_hidden": True, "outputs_hidden": True}
    assert re.fullmatch(
        r'<details class="answer">\n<summary>答案 1 · Answer 1</summary>\n\n<div lang="zh">'
        r".*</div>\n\n</details>",
        answer.source,
        re.S,
    ), answer.source
    assert other.metadata == {}  # only solutions and answers change
    before = nbformat.writes(nb)
    assert notebooks.hide_answers(nb) == [] and nbformat.writes(nb) == before


def test_hide_answers_command(tmp_path: Path) -> None:
    path = tmp_path / "5.9-exercises.ipynb"
    nbformat.write(_exercise_notebook(), path)
    run = [sys.executable, "-m", "mldeploy.book.notebooks", "hide-answers"]
    first = subprocess.run([*run, str(path)], capture_output=True, text=True, check=True)
    assert "answer 1 closed" in first.stdout
    second = subprocess.run([*run, str(path)], capture_output=True, text=True, check=True)
    assert second.stdout.strip().endswith("nothing to change")
    missing = subprocess.run([*run, str(tmp_path / "nope.ipynb")], capture_output=True, text=True)
    assert missing.returncode == 2 and "no notebook at" in missing.stderr
    assert "Traceback" not in missing.stderr
