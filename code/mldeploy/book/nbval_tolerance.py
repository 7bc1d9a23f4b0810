"""nbval with a declared numeric tolerance: numbers within it, text and structure exactly.

nbval compares stored and fresh outputs as strings; its sanitize file can mask a value but cannot
say "equal within 0.1 %". Some outputs legitimately move in the last digits between CPUs (ONNX
Runtime's kernels dispatch on AVX-512, AVX2 and VNNI and have no switch to pin them). A cell, or a
whole notebook, declares how much, and why, in its metadata::

    cell.metadata["tolerance"] = {"rel": 0.002, "abs": 0, "reason": "ONNX Runtime INT8 kernels ..."}
    notebook.metadata["mldeploy"]["tolerance"] = {...}          # default for every cell

A fresh output then passes when it has the stored output's text with every number ``a`` in place
of the stored ``b`` such that ``|a - b| <= abs + rel * |b|``, where ``abs`` applies only to numbers
printed in fixed decimals: a number in e-notation (``8.6e-06``) spans many orders of magnitude and
is compared relatively, ``|a - b| <= rel * |b|``. Anything else fails as nbval reports it. Runs of
spaces are compared as one space (a wider number shifts table padding).

``python -m mldeploy.book.nbval_tolerance audit notebooks/*.ipynb`` counts the stored numbers each
declared tolerance lets move by more than 5 %.

Registered as a pytest plugin (entry point ``mldeploy_nbval``); it changes nothing unless nbval
runs. Then it pins the compute path (``reproducibility.pin_compute_path``) for the kernels nbval
starts, and with ``MLDEPLOY_DRIFT_REPORT=path.json`` it also writes, per notebook, the largest
relative difference seen between stored and fresh numbers — the measured drift between two
machines. Under pytest-xdist each worker merges what its notebooks measured into that one file.
"""

from __future__ import annotations

import copy
import fcntl
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import pytest

from mldeploy import settings, timeouts
from mldeploy.reproducibility import pin_compute_path

NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?(?![\w])")
TEXT_KEYS = ("text/plain", "text/html", "text/markdown", "text/latex")


class ToleranceError(ValueError):
    """A tolerance declared without a reason, or with values that are not small non-negatives."""


@dataclass(frozen=True)
class Tolerance:
    rel: float = 0.0
    abs: float = 0.0
    reason: str = ""

    @classmethod
    def parse(cls, raw: Any, where: str) -> Tolerance:
        if not isinstance(raw, dict) or not str(raw.get("reason", "")).strip():
            raise ToleranceError(f"{where}: a tolerance needs rel/abs and a one-line 'reason'")
        rel, abs_ = float(raw.get("rel", 0.0)), float(raw.get("abs", 0.0))
        if not (0 <= rel < 0.5 and 0 <= abs_ and math.isfinite(abs_)):
            raise ToleranceError(f"{where}: tolerance rel must be in [0, 0.5) and abs >= 0")
        return cls(rel, abs_, str(raw["reason"]))

    def allowance(self, stored: float, token: str = "") -> float:
        """How far a number printed as ``token`` (value ``stored``) may move."""
        return (0.0 if is_scientific(token) else self.abs) + self.rel * abs(stored)

    def accepts(self, fresh: float, stored: float, token: str = "") -> bool:
        return abs(fresh - stored) <= self.allowance(stored, token)


def is_scientific(token: str) -> bool:
    """Whether a number is printed in e-notation."""
    return "e" in token.lower()


def _to_float(token: str) -> float:
    return float(token.replace(",", ""))


def split_numbers(text: str) -> tuple[list[str], list[float]]:
    """The text between numbers (spaces collapsed) and the numbers themselves."""
    parts = NUMBER.split(text)
    skeleton = [re.sub(r"[ \t]+", " ", part) for part in parts]
    return skeleton, [_to_float(m) for m in NUMBER.findall(text)]


def relative_drift(fresh: str, stored: str) -> float | None:
    """Largest relative difference between corresponding numbers, or None if the text differs."""
    fresh_text, fresh_nums = split_numbers(fresh)
    stored_text, stored_nums = split_numbers(stored)
    if fresh_text != stored_text or len(fresh_nums) != len(stored_nums):
        return None
    drift = 0.0
    for a, b in zip(fresh_nums, stored_nums):
        if a != b:
            drift = max(drift, abs(a - b) / max(abs(b), 1e-12))
    return drift


def reconcile(fresh: str, stored: str, tolerance: Tolerance | None) -> str:
    """``stored`` if ``fresh`` matches it within ``tolerance``; otherwise ``fresh`` unchanged."""
    if tolerance is None or fresh == stored:
        return fresh
    fresh_text, fresh_nums = split_numbers(fresh)
    stored_text, stored_nums = split_numbers(stored)
    if fresh_text != stored_text or len(fresh_nums) != len(stored_nums):
        return fresh
    tokens = NUMBER.findall(stored)
    if all(tolerance.accepts(a, b, t) for a, b, t in zip(fresh_nums, stored_nums, tokens)):
        return stored
    return fresh


@dataclass
class DriftLog:
    """Largest relative drift per notebook, and the cells that needed their tolerance."""

    path: Path | None
    drift: dict[str, float] = field(default_factory=dict)
    tolerated: dict[str, list[int]] = field(default_factory=dict)

    def note(self, notebook: str, cell: int, drift: float | None, used_tolerance: bool) -> None:
        if drift is not None:
            self.drift[notebook] = max(self.drift.get(notebook, 0.0), drift)
        if used_tolerance:
            self.tolerated.setdefault(notebook, []).append(cell)

    def write(self) -> None:
        """Merge this process's notebooks into the report (workers of one session share it)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old = json.loads(self.path.read_text()) if self.path.exists() else {}
            report = {
                "largest_relative_drift": old.get("largest_relative_drift", {}) | self.drift,
                "cells_within_tolerance": old.get("cells_within_tolerance", {}) | self.tolerated,
            }
            self.path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def _texts(output: dict) -> list[tuple[tuple[str, ...], str]]:
    """(location, text) of every string nbval compares in one output."""
    found = []
    if isinstance(output.get("text"), str):
        found.append((("text",), output["text"]))
    for key in TEXT_KEYS:
        value = output.get("data", {}).get(key)
        if isinstance(value, str):
            found.append((("data", key), value))
    return found


def _replace(output: dict, location: tuple[str, ...], value: str) -> None:
    target = output
    for key in location[:-1]:
        target = target[key]
    target[location[-1]] = value


def _cell_tolerance(item: Any) -> Tolerance | None:
    where = f"{item.fspath.basename} cell {item.cell_num}"
    raw = item.cell.metadata.get("tolerance")
    if raw is None:
        raw = item.parent.nb.metadata.get("mldeploy", {}).get("tolerance")
        where = f"{item.fspath.basename} notebook metadata"
    return None if raw is None else Tolerance.parse(raw, where)


def install(log: DriftLog) -> None:
    """Wrap nbval's comparison of one cell's outputs."""
    from nbval.plugin import IPyNbCell

    if getattr(IPyNbCell.compare_outputs, "_with_tolerance", False):
        return
    original = IPyNbCell.compare_outputs
    original_init = IPyNbCell.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        # nbval waits a fixed 5 s for a cell's last output message; a loaded runner can be slower.
        self.output_timeout = timeouts.scaled(30)

    def compare_outputs(self: Any, test: list, ref: list, skip_compare: Any = None) -> bool:
        tolerance = _cell_tolerance(self)
        used = False
        worst: float | None = 0.0
        test = [nbformat.from_dict(copy.deepcopy(output)) for output in test]
        for fresh, stored in zip(test, ref):
            stored_texts = dict(_texts(stored))
            for location, text in _texts(fresh):
                reference = stored_texts.get(location)
                if reference is None:
                    continue
                fresh_clean, stored_clean = self.sanitize(text), self.sanitize(reference)
                drift = relative_drift(fresh_clean, stored_clean)
                worst = None if drift is None or worst is None else max(worst, drift)
                if (
                    fresh_clean != stored_clean
                    and reconcile(fresh_clean, stored_clean, tolerance) == stored_clean
                ):
                    used = True
                    _replace(fresh, location, reference)
        log.note(self.fspath.basename, self.cell_num, worst, used)
        return original(self, test, ref, skip_compare)

    compare_outputs._with_tolerance = True  # type: ignore[attr-defined]
    IPyNbCell.compare_outputs = compare_outputs
    IPyNbCell.__init__ = __init__


def sanitizer(cfg: Path) -> Any:
    """The text nbval compares: the regexes of ``cfg`` applied in order, as nbval does. Read with
    nbval's own parser: configparser would strip a regex's leading space."""
    from nbval.plugin import get_sanitize_patterns

    rules = [(re.compile(r), s) for r, s in get_sanitize_patterns(cfg.read_text(encoding="utf-8"))]

    def sanitize(text: str) -> str:
        for pattern, replacement in rules:
            text = pattern.sub(replacement, text)
        return text

    return sanitize


def audit(
    paths: list[Path], limit: float = 0.05, sanitize_with: Path | None = None, verbose: bool = False
) -> dict[str, tuple[int, int]]:
    """Per notebook: (numbers compared, numbers the declared tolerance lets move by more than
    ``limit`` of their value) over the stored outputs of its code cells, after sanitizing."""
    sanitize = sanitizer(sanitize_with) if sanitize_with else (lambda text: text)
    result = {}
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        default = nb.metadata.get("mldeploy", {}).get("tolerance")
        compared = loose = 0
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            raw = cell.metadata.get("tolerance", default)
            tol = Tolerance.parse(raw, f"{path.name} cell {i}") if raw else Tolerance()
            for output in cell.get("outputs", []):
                for _, text in _texts(output):
                    for token in NUMBER.findall(sanitize(text)):
                        value = _to_float(token)
                        compared += 1
                        if tol.allowance(value, token) > limit * abs(value):
                            loose += 1
                            if verbose:
                                print(
                                    f"{path.name} cell {i}: {token} (rel {tol.rel}, abs {tol.abs})"
                                )
        result[path.name] = (compared, loose)
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="tolerance audit of stored notebook outputs")
    parser.add_argument("command", choices=["audit"])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--limit", type=float, default=0.05)
    parser.add_argument("--sanitize-with", type=Path, default=Path("tests/sanitize.cfg"))
    parser.add_argument("-v", "--verbose", action="store_true", help="list each loose number")
    args = parser.parse_args(argv)
    rows = audit(args.notebooks, args.limit, args.sanitize_with, args.verbose)
    for name, (compared, loose) in rows.items():
        print(f"{name:<42} {compared:>6} compared {loose:>5} may move > {args.limit:.0%}")
    total = [sum(col) for col in zip(*rows.values())]
    print(f"{'total':<42} {total[0]:>6} compared {total[1]:>5} may move > {args.limit:.0%}")
    return 0


_LOG = DriftLog(None)


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "nbval", False) or getattr(config.option, "nbval_lax", False):
        try:
            report = settings.tools().drift_report
        except settings.SettingsError as exc:
            raise pytest.UsageError(str(exc)) from None
        # Kernels that nbval starts inherit this process's environment: pin their compute path,
        # also for a notebook that does not pin it itself.
        pin_compute_path()
        _LOG.path = report
        if report is not None and "PYTEST_XDIST_WORKER" not in os.environ:
            report.unlink(missing_ok=True)  # a new session: workers merge into an empty report
        install(_LOG)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed cell shows what it printed: nbval names an unexpected stream ("Unexpected output
    fields from running code: {'stderr'}") but not its text, and the text is the cause."""
    outcome = yield
    report = outcome.get_result()
    outputs = getattr(item, "test_outputs", None)  # nbval's cells: the outputs of this run
    if report.failed and call.when == "call" and outputs:
        streams = [f"[{o.name}] {o.text}" for o in outputs if o.get("output_type") == "stream"]
        if streams:
            report.sections.append(("what the cell printed", "".join(streams)[-4000:]))


def pytest_sessionfinish(session: pytest.Session) -> None:
    _LOG.write()


if __name__ == "__main__":
    raise SystemExit(main())
