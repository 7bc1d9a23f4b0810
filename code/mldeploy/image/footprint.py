"""Installed size of a requirements file's dependency closure, read from an environment's metadata.

No download and no new install: the closure is resolved from the ``Requires-Dist`` metadata of the
distributions already installed (by default in the running interpreter's environment), and each
distribution's size is the sum of the files its ``RECORD`` lists, as they lie on disk, without
bytecode caches: a ``.pyc`` file embeds the path it was compiled at, so its size changes with the
folder the environment lives in (with caches: 195.49 MB in one checkout, 196 MB after rounding in
another), while the wheels' own files are the same bytes everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

_OPTION = re.compile(r"^-r\s+|^--requirement[ =]\s*")


def canonical(name: str) -> str:
    """PEP 503 normalised project name (``Foo_Bar`` → ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: str | Path) -> list[Requirement]:
    """Requirements of a pip requirements file, following ``-r other.txt`` includes."""
    path = Path(path)
    found: list[Requirement] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if _OPTION.match(line):
            found.extend(read_requirements(path.parent / _OPTION.sub("", line)))
        elif line.startswith("-"):
            raise ValueError(f"{path.name}: option {line.split()[0]} is not supported here")
        else:
            found.append(Requirement(line))
    return found


def _distributions(paths: list[str] | None) -> dict[str, metadata.Distribution]:
    dists = metadata.distributions(path=paths) if paths is not None else metadata.distributions()
    found: dict[str, metadata.Distribution] = {}
    for dist in dists:
        found.setdefault(
            canonical(dist.metadata["Name"]), dist
        )  # first on the path wins, as in import
    return found


def closure(
    requirements: Iterable[Requirement], paths: list[str] | None = None
) -> dict[str, metadata.Distribution]:
    """Every installed distribution the requirements pull in (honouring extras and env markers)."""
    installed = _distributions(paths)
    result: dict[str, metadata.Distribution] = {}
    todo = [(req, "") for req in requirements]
    seen: set[tuple[str, str]] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate(
            {**default_environment(), "extra": extra}
        ):
            continue
        name = canonical(req.name)
        if name not in installed:
            raise LookupError(f"{req.name} is required but not installed in this environment")
        for wanted in {""} | set(req.extras):
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            result[name] = installed[name]
            todo.extend((Requirement(dep), wanted) for dep in installed[name].requires or [])
    return result


def installed_bytes(dist: metadata.Distribution) -> int:
    """Bytes on disk of the files a distribution installed (its RECORD), without bytecode caches.

    Files listed but since removed are skipped.
    """
    total = 0
    for file in dist.files or []:
        located = Path(dist.locate_file(file))
        if located.suffix != ".pyc" and located.is_file():
            total += located.stat().st_size
    return total


@dataclass(frozen=True)
class Footprint:
    """Sizes of a requirements closure, per distribution, largest first."""

    sizes: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def top(self, n: int) -> list[tuple[str, int]]:
        return sorted(self.sizes.items(), key=lambda item: (-item[1], item[0]))[:n]


def measure(requirements_file: str | Path, paths: list[str] | None = None) -> Footprint:
    """Footprint of ``requirements_file``'s closure, in the environment on ``paths`` or this one."""
    dists = closure(read_requirements(requirements_file), paths)
    return Footprint({name: installed_bytes(dist) for name, dist in dists.items()})


MB = 1e6


def comparison(
    small: Footprint, large: Footprint, pinned: set[str], titles: tuple[str, str]
) -> list[str]:
    """Two footprints side by side in MB: each pinned package (largest first), the unpinned rest
    and the totals. Pinned packages are the same bytes on every machine; the rest may vary."""

    def cell(fp: Footprint, names: set[str]) -> str:
        sizes = [fp.sizes[n] for n in names if n in fp.sizes]
        return f"{sum(sizes) / MB:.1f} MB" if sizes else "—"

    rows = [f"{'package':<30}{titles[0]:>12}{titles[1]:>19}"]
    for name, _ in large.top(len(large.sizes)):
        if name in pinned:
            rows.append(f"{name:<30}{cell(small, {name}):>12}{cell(large, {name}):>19}")
    others = set(large.sizes) - pinned
    rows.append(
        f"{'others, pulled in (unpinned)':<30}{cell(small, others):>12}{cell(large, others):>19}"
    )
    rows.append(f"{'total':<30}{small.total / MB:>9.0f} MB{large.total / MB:>16.0f} MB")
    return rows


def figure(small: Footprint, large: Footprint, models: dict[str, int]):
    """Left: both footprints stacked by package (MB). Right: models and environments, log scale."""
    import matplotlib.pyplot as plt

    named = ["torch", "onnxruntime", "numpy", "sympy"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    for row, fp in enumerate([small, large]):
        sizes = {name: fp.sizes.get(name, 0) for name in named}
        sizes["other"] = fp.total - sum(sizes.values())
        start = 0.0
        for i, (name, size) in enumerate(sizes.items()):
            left.barh(row, size / MB, left=start, color=f"C{i}", label=name if row else None)
            start += size / MB
    left.set_yticks([0, 1], ["ONNX Runtime", "TorchScript"])
    left.set_xlabel("MB")
    left.legend(fontsize=8, loc="lower right")
    items = {**models, "venv: ONNX Runtime": small.total, "venv: + torch": large.total}
    right.barh(list(items), list(items.values()), color=["C5"] * len(models) + ["C1", "C0"])
    right.set_xscale("log")
    right.set_xlabel("B (log)")
    fig.tight_layout()
    return fig
