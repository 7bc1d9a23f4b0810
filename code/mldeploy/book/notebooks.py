"""Notebook housekeeping: re-execute notebooks in place (``make refresh``) and turn a
percent-format script into a notebook when writing a new section.

    python -m mldeploy.book.notebooks refresh notebooks/5.1-model-export.ipynb
    python -m mldeploy.book.notebooks from-script draft.py notebooks/5.x-name.ipynb
    python -m mldeploy.book.notebooks hide-answers notebooks/*.ipynb

``hide-answers`` closes every exercise solution until the reader asks for it, in JupyterLab and in
the book: a solution code cell (first line ``# Solution N``) gets the ``hide-cell`` tag (the book
folds its source and outputs under one toggle) and ``jupyter.source_hidden``/``outputs_hidden``
(JupyterLab folds both); an answer cell (``**答案 N**`` / ``**Answer N**``) is wrapped in
``<details>`` with a ``答案 N · Answer N`` summary. It changes nothing else and is idempotent.

A percent-format script separates cells with ``# %%`` (code) and ``# %% [markdown]`` lines; the
markdown cell's lines start with ``# ``. Cell tags go in brackets: ``# %% tags=["hide-input"]``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

KERNEL = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
_HEADER = re.compile(r"^# %%(?P<md> \[markdown\])?(?: tags=(?P<tags>\[.*\]))?\s*$")


def from_script(text: str) -> nbformat.NotebookNode:
    """Build a notebook from percent-format text."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = KERNEL
    nb.metadata["language_info"] = {"name": "python"}
    kind, tags, lines = None, [], []

    def flush() -> None:
        if kind is None:
            return
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(
                line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.split("\n")
            )
            cell = nbformat.v4.new_markdown_cell(body)
        else:
            cell = nbformat.v4.new_code_cell(body)
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)

    for line in text.split("\n"):
        match = _HEADER.match(line)
        if match:
            flush()
            kind = "markdown" if match.group("md") else "code"
            tags = json.loads(match.group("tags")) if match.group("tags") else []
            lines = []
        elif kind is not None:
            lines.append(line)
    flush()
    return nb


SOLUTION = re.compile(r"^# Solution \d+")
ANSWER = re.compile(r"\*\*(?:答案|Answer) (\d+)\*\*")
HIDE_TAG = "hide-cell"  # myst-nb folds the source and the outputs under one closed toggle
LAB_HIDDEN = {"source_hidden": True, "outputs_hidden": True}


def is_solution(cell: dict) -> bool:
    """A code cell whose first line is ``# Solution N…``."""
    return cell["cell_type"] == "code" and bool(SOLUTION.match(_text(cell["source"])))


def answer_numbers(cell: dict) -> list[str]:
    """The exercise numbers a markdown cell answers (``**答案 N**`` / ``**Answer N**``)."""
    if cell["cell_type"] != "markdown":
        return []
    return list(dict.fromkeys(ANSWER.findall(_text(cell["source"]))))


def _text(source: str | list[str]) -> str:
    return source if isinstance(source, str) else "".join(source)


def _is_wrapped(source: str) -> bool:
    text = source.strip()
    return text.startswith("<details") and text.endswith("</details>")


def wrap_answer(source: str, numbers: list[str]) -> str:
    """The answer inside a closed ``<details>`` whose summary names it in both languages."""
    zh = "、".join(numbers)
    en = ", ".join(numbers)
    summary = f"答案 {zh} · Answer{'s' if len(numbers) > 1 else ''} {en}"
    return (
        f'<details class="answer">\n<summary>{summary}</summary>\n\n{source.strip()}\n\n</details>'
    )


def hide_answers(nb: nbformat.NotebookNode) -> list[str]:
    """Fold every solution and answer of a notebook until asked; return what changed."""
    changes = []
    for number, cell in enumerate(nb.cells):
        if is_solution(cell):
            tags = [
                t for t in cell.metadata.get("tags", []) if t not in ("hide-input", "hide-output")
            ]
            if HIDE_TAG not in tags:
                tags.append(HIDE_TAG)
            lab = {**cell.metadata.get("jupyter", {}), **LAB_HIDDEN}
            if tags != cell.metadata.get("tags") or lab != cell.metadata.get("jupyter"):
                cell.metadata["tags"], cell.metadata["jupyter"] = tags, lab
                changes.append(f"cell {number}: solution folded")
        elif (numbers := answer_numbers(cell)) and not _is_wrapped(cell.source):
            cell.source = wrap_answer(cell.source, numbers)
            changes.append(f"cell {number}: answer {', '.join(numbers)} closed")
    return changes


def visible_answers(nb: dict) -> list[str]:
    """Solutions or answers a reader sees without asking, in JupyterLab or in the book."""
    problems = []
    for number, cell in enumerate(nb["cells"]):
        meta = cell.get("metadata", {})
        if is_solution(cell):
            if HIDE_TAG not in meta.get("tags", []):
                problems.append(f"cell {number}: solution without the {HIDE_TAG!r} tag (book)")
            hidden = meta.get("jupyter", {})
            if not all(hidden.get(key) for key in LAB_HIDDEN):
                problems.append(f"cell {number}: solution source or outputs shown in JupyterLab")
        elif answer_numbers(cell) and not _is_wrapped(_text(cell["source"])):
            problems.append(f"cell {number}: answer not inside <details>")
    return problems


def _coalesce_streams(outputs: list) -> list:
    """Merge consecutive stdout (or stderr) chunks: how a kernel splits a stream is timing noise."""
    merged: list = []
    for output in outputs:
        if (
            merged
            and output.output_type == "stream"
            and merged[-1].output_type == "stream"
            and merged[-1].name == output.name
        ):
            merged[-1].text += output.text
        else:
            merged.append(output)
    return merged


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop per-run metadata (timestamps, widget state) so re-running changes only real outputs."""
    nb.metadata.pop("widgets", None)
    for number, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            cell.outputs = _coalesce_streams(cell.outputs)
        cell.metadata.pop("execution", None)
        cell.metadata.pop("collapsed", None)
        cell.metadata.pop("scrolled", None)
        cell["id"] = f"cell-{number:03d}"  # stable ids: re-running must not churn the file
    nbformat.validator.normalize(nb)
    return nb


def stamp(nb: nbformat.NotebookNode) -> dict[str, str]:
    """Record in the notebook's metadata which versions produced its outputs, and when (UTC date).

    The book shows it under the title (``_ext/verified_stamp.py``); nbval never compares metadata.
    The kernel runs on this same interpreter, so these are the versions the outputs came from.
    """
    verified = {
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
        "onnxruntime": importlib.metadata.version("onnxruntime"),
        "date": datetime.datetime.now(datetime.UTC).date().isoformat(),
    }
    nb.metadata.setdefault("mldeploy", {})["verified"] = verified
    return verified


def execute(path: Path, timeout: int = 600) -> float:
    """Execute a notebook top to bottom in its own folder, write it back; return seconds taken."""
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    elapsed = time.perf_counter() - start
    nb = clean(nb)
    stamp(nb)
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    refresh = sub.add_parser("refresh", help="re-execute notebooks in place")
    refresh.add_argument("notebooks", nargs="+", type=Path)
    convert = sub.add_parser("from-script", help="percent-format script -> notebook (unexecuted)")
    convert.add_argument("script", type=Path)
    convert.add_argument("notebook", type=Path)
    hide = sub.add_parser("hide-answers", help="fold solutions and answers until asked")
    hide.add_argument("notebooks", nargs="+", type=Path)
    args = parser.parse_args(argv)
    missing = [p for p in getattr(args, "notebooks", []) if not p.is_file()]
    if missing:
        print(f"error: no notebook at {missing[0]}", file=sys.stderr)
        return 2
    if args.command == "hide-answers":
        for path in args.notebooks:
            nb = nbformat.read(path, as_version=4)
            changes = hide_answers(nb)
            if changes:
                nbformat.write(nb, path)
            print(f"{path}: " + ("; ".join(changes) or "nothing to change"))
        return 0
    if args.command == "from-script":
        nbformat.write(from_script(args.script.read_text(encoding="utf-8")), args.notebook)
        print(f"wrote {args.notebook}")
        return 0
    for path in args.notebooks:
        print(f"executing {path} ...", flush=True)
        print(f"  done in {execute(path):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
