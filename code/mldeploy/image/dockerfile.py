"""Read a Dockerfile and a ``.dockerignore`` the way ``docker build`` does, without a Docker engine.

Enough of the syntax for this book's files: line continuations, comments, build stages, ``ARG``
substitution in ``FROM``, ``ENV`` expansion, exec-form ``CMD``/``HEALTHCHECK`` and ``COPY`` flags.
The contract test uses it to rebuild what the image would contain; the notebook to show the file.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

_VAR = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


class DockerfileError(ValueError):
    """The Dockerfile uses something this reader does not understand, or lacks a required line."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """Substitute ``$VAR``, ``${VAR}`` and ``${VAR:-default}`` as the Dockerfile frontend does."""

    def repl(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("plain")
        value = env.get(name, "")
        if not value and match.group("default") is not None:
            return match.group("default")
        return value

    return _VAR.sub(repl, text)


@dataclass(frozen=True)
class Instruction:
    """One logical line: keyword in upper case, its raw arguments, and the line it starts on."""

    keyword: str
    args: str
    line: int

    def flags(self) -> tuple[dict[str, str], str]:
        """Split leading flags (``COPY --from=x``, ``HEALTHCHECK --interval=…``) from the rest."""
        rest, found = self.args.strip(), {}
        while rest.startswith("--"):
            token, _, rest = rest.partition(" ")
            name, _, value = token[2:].partition("=")
            found[name] = value
            rest = rest.strip()
        return found, rest

    def exec_form(self) -> list[str]:
        """Arguments of an exec-form (JSON array) instruction; shell form is rejected on purpose."""
        _, rest = self.flags()
        if self.keyword == "HEALTHCHECK":
            if not rest.startswith("CMD "):
                raise DockerfileError(f"line {self.line}: HEALTHCHECK needs a CMD")
            rest = rest[4:].strip()
        try:
            argv = json.loads(rest)
        except json.JSONDecodeError:
            raise DockerfileError(
                f"line {self.line}: {self.keyword} is not in exec (JSON array) form"
            ) from None
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise DockerfileError(
                f"line {self.line}: {self.keyword} must be a non-empty list of strings"
            )
        return argv

    def text(self) -> str:
        return f"{self.keyword} {self.args}"


@dataclass
class Stage:
    """One ``FROM`` and the instructions under it."""

    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        """The effective instruction of a kind (Docker keeps the last ``CMD``, ``USER``, …)."""
        found = self.all(keyword)
        if not found:
            raise DockerfileError(f"stage {self.name or self.base!r} has no {keyword}")
        return found[-1]


@dataclass(frozen=True)
class CopySpec:
    """A ``COPY``: sources (context paths, or paths in stage ``from_stage`` if set) → dest."""

    sources: tuple[str, ...]
    dest: str
    from_stage: str | None
    line: int


@dataclass
class Dockerfile:
    """All stages in order; the last one is what ``docker build`` produces without ``--target``."""

    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise DockerfileError(f"no stage named {name!r}; stages: {[s.name for s in self.stages]}")

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def lineage(self, stage: Stage) -> list[Stage]:
        """The stage and the stages it is built ``FROM``, oldest first."""
        chain = [stage]
        names = {s.name for s in self.stages}
        while chain[0].base in names:
            chain.insert(0, self.stage(chain[0].base))
        return chain

    def env(self, stage: Stage, base_env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment a ``stage`` container starts with, on top of the base's ``base_env``."""
        env = dict(base_env or {})
        for part in self.lineage(stage):
            for instr in part.all("ENV"):
                env.update(parse_env(instr, env))
        return env

    def copies(self, stage: Stage) -> list[CopySpec]:
        """Every ``COPY`` of the stage (``ADD`` is refused: it can fetch URLs, unpack archives)."""
        if stage.all("ADD"):
            raise DockerfileError(f"line {stage.all('ADD')[0].line}: use COPY, not ADD")
        specs, workdir = [], self.workdir(stage, before=stage.line)
        for instr in stage.instructions:
            if instr.keyword == "WORKDIR":
                workdir = posixpath.join(workdir, instr.args.strip())
            if instr.keyword != "COPY":
                continue
            flags, rest = instr.flags()
            parts = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            if len(parts) < 2:
                raise DockerfileError(f"line {instr.line}: COPY needs a source and a destination")
            dest = posixpath.normpath(posixpath.join(workdir, parts[-1]))  # relative: under WORKDIR
            dest += (
                "/" if parts[-1].endswith("/") else ""
            )  # a trailing slash means "into this folder"
            specs.append(CopySpec(tuple(parts[:-1]), dest, flags.get("from"), instr.line))
        return specs

    def workdir(self, stage: Stage, before: int | None = None) -> str:
        """The working directory in effect at the end of ``stage`` (or before line ``before``)."""
        workdir = "/"
        for part in self.lineage(stage):
            for instr in part.all("WORKDIR"):
                if before is None or instr.line < before:
                    workdir = posixpath.join(workdir, instr.args.strip())
        return workdir


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Join continuation lines, drop comments and blank lines; yield (first line number, text)."""
    buffer, start = [], 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue  # comments vanish even inside a continued instruction, as in Docker
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        yield start, " ".join(part for part in buffer if part)
        buffer = []
    if buffer:
        raise DockerfileError(f"line {start}: the last instruction ends with a line continuation")


def parse_env(instr: Instruction, env: Mapping[str, str]) -> dict[str, str]:
    """``ENV A=1 B=$A`` (each value expanded with the variables set before this line)."""
    tokens = shlex.split(instr.args)
    if tokens and "=" not in tokens[0]:  # legacy form: ENV NAME value with spaces
        return {tokens[0]: expand(" ".join(tokens[1:]), env)}
    values: dict[str, str] = {}
    for token in tokens:
        name, sep, value = token.partition("=")
        if not sep:
            raise DockerfileError(f"line {instr.line}: ENV expects NAME=value, got {token!r}")
        values[name] = expand(value, env)
    return values


def parse(text: str) -> Dockerfile:
    """Parse Dockerfile text into stages; ``ARG``s before the first ``FROM`` apply to ``FROM``s."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in _logical_lines(text):
        keyword, _, args = line.partition(" ")
        instr = Instruction(keyword.upper(), args.strip(), number)
        if instr.keyword == "ARG" and not stages:
            name, _, default = instr.args.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
        elif instr.keyword == "FROM":
            words = expand(instr.args, global_args).split()
            words = [w for w in words if not w.startswith("--")]  # e.g. --platform
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, number))
        elif not stages:
            raise DockerfileError(f"line {number}: {instr.keyword} before the first FROM")
        else:
            stages[-1].instructions.append(instr)
    if not stages:
        raise DockerfileError("no FROM line: not a Dockerfile")
    return Dockerfile(global_args, stages)


def load(path: str | Path) -> Dockerfile:
    return parse(Path(path).read_text(encoding="utf-8"))


# --- .dockerignore -------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's matching: ``*`` and ``?`` stay inside one path segment, ``**`` spans any number."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class IgnoreRule:
    pattern: str
    exclude: bool  # False for '!' exceptions
    regex: re.Pattern[str]


def parse_dockerignore(text: str) -> list[IgnoreRule]:
    """Rules in file order; the last rule that matches a path (or one of its parents) decides."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append(IgnoreRule(pattern, exclude, _pattern_regex(pattern)))
    return rules


def is_ignored(relpath: str, rules: list[IgnoreRule]) -> bool:
    """Whether ``docker build`` leaves ``relpath`` (POSIX, relative to the context) out of it."""
    parts = relpath.strip("/").split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    ignored = False
    for rule in rules:
        if any(rule.regex.match(prefix) for prefix in prefixes):
            ignored = rule.exclude
    return ignored


def _exception_inside(folder: str, rules: list[IgnoreRule]) -> bool:
    """Whether a ``!`` exception could re-include a path below ``folder`` (else skip walking it)."""
    depth = folder.count("/") + 1
    for rule in rules:
        segments = rule.pattern.split("/")
        if rule.exclude or len(segments) <= depth:
            continue
        if "**" in rule.pattern or _pattern_regex("/".join(segments[:depth])).match(folder):
            return True
    return False


def context_files(root: str | Path, rules: list[IgnoreRule]) -> list[str]:
    """Files sent to the builder, sorted; skips ignored folders unless an exception reaches in."""
    root = Path(root)
    kept = []
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root).as_posix()
        rel = "" if rel == "." else rel + "/"
        dirs[:] = sorted(
            d for d in dirs if not is_ignored(rel + d, rules) or _exception_inside(rel + d, rules)
        )
        kept.extend(rel + f for f in files if not is_ignored(rel + f, rules))
    return sorted(kept)


def stage_text(text: str, name: str) -> str:
    """The raw lines of one stage, from its ``FROM`` to the last instruction before the next stage.

    Comment blocks just above the next ``FROM`` belong to that stage, so they are left out.
    """
    parsed = parse(text)
    lines = text.splitlines()
    starts = [s.line for s in parsed.stages] + [len(lines) + 1]
    index = [s.name for s in parsed.stages].index(name)
    block = lines[starts[index] - 1 : starts[index + 1] - 1]
    while block and (not block[-1].strip() or block[-1].lstrip().startswith("#")):
        block.pop()
    return "\n".join(block)
