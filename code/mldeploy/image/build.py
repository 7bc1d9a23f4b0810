"""``make image``: build the serving image with Docker or Podman and report its size and layers.

    python -m mldeploy.image.build          # build ml-server:0.1.0 (target runtime) and report
    python -m mldeploy.image.build --check  # one line: which engine would build, or why none can

Without a registry the Podman path builds a stand-in for the ``FROM`` image once (Debian bookworm
with its python3, made by mmdebstrap, cached in ``artifacts/cache/image/``) and imports it under
the ``FROM`` name, so the Dockerfile builds unchanged. The CA bundle this machine's pip trusts is
passed to the build as a secret (a mount during ``RUN``, never a layer of the image).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mldeploy import settings
from mldeploy.image import dockerfile
from mldeploy.image.engine import CACHE, Engine, EngineError, EngineUnavailable, find, last_line
from mldeploy.paths import REPO_ROOT

TAG = "ml-server:0.1.0"  # the name deploy/k8s/deployment.yaml runs
TARGET = "runtime"
IMAGE_CACHE = CACHE / "image"
BUILD_LOG = IMAGE_CACHE / "build.log"
STAND_IN_LABEL = "org.mldeploy.stand-in-base"
STAND_IN_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
DEBIAN_SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# like debian:bookworm-slim, which the official python image starts from:
# no manuals, docs or translations
SLIM_DPKG = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
)
CONTEXT_FILES = ("artifacts/serve/model.onnx", "artifacts/serve/model.onnx.sha256")

Say = Callable[[str], None]


def say_stdout(line: str) -> None:
    print(line, flush=True)


def base_image() -> str:
    """The ``FROM`` image of every stage (the Dockerfile's ``PYTHON_IMAGE`` argument)."""
    return dockerfile.load(REPO_ROOT / "Dockerfile").global_args["PYTHON_IMAGE"]


def ca_bundle() -> Path | None:
    """The CA bundle this machine's pip and requests trust, if any (proxies that re-sign HTTPS).

    These variables are pip's, requests' and OpenSSL's own, read here as those tools read them
    (the first that names a file wins); ``mldeploy.settings`` holds only the project's settings.
    """
    for name in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = os.environ.get(name)
        if value and Path(value).is_file():
            return Path(value)
    return None


def _stream(
    cmd: list[str],
    env: dict[str, str],
    log: Path,
    show: Callable[[str], bool],
    say: Say,
    timeout: float,
    label: str,
) -> None:
    """Run ``cmd``, writing all its output to ``log``; echo what ``show`` picks, and a heartbeat."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    last_said = [start]
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            cwd=REPO_ROOT,
        )
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        tail: list[str] = []
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                out.write(line)
                tail = (tail + [line.rstrip()])[-5:]
                now = time.monotonic()
                if show(line) or now - last_said[0] > 30:
                    text = line.rstrip() if show(line) else f"... still {label}"
                    say(f"[{now - start:5.0f} s] {text[:150]}")
                    last_said[0] = now
            code = proc.wait()
        finally:
            timer.cancel()
    if code != 0:
        why = "timed out" if time.monotonic() - start >= timeout else f"exit code {code}"
        last, where = last_line("\n".join(tail)), log.relative_to(REPO_ROOT)
        raise EngineError(f"{label} failed ({why}): {last}; full log in {where}")


def stand_in_base(engine: Engine, name: str, say: Say = say_stdout) -> None:
    """Build (once) a Debian bookworm + python3 root fs with mmdebstrap, import it as ``name``."""
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    tar = IMAGE_CACHE / "stand-in-base-bookworm.tar"
    if not tar.is_file():
        say(
            "no registry image: building a stand-in base (Debian bookworm, python3) with mmdebstrap"
        )
        partial = tar.with_suffix(".partial.tar")
        cmd = [
            "mmdebstrap",
            "--variant=minbase",
            "--include=" + ",".join(STAND_IN_PACKAGES),
            *(f"--dpkgopt={opt}" for opt in SLIM_DPKG),
            "--format=tar",
            "bookworm",
            str(partial),
            *DEBIAN_SOURCES,
        ]
        if os.geteuid() != 0:
            cmd.insert(1, "--mode=unshare")
        _stream(
            cmd,
            dict(os.environ),
            IMAGE_CACHE / "stand-in-base.log",
            lambda l: l.startswith("I: "),
            say,
            timeout=1800,
            label="building the stand-in base",
        )
        partial.rename(tar)
    say(f"importing the stand-in base as {name}")
    engine.run(
        "import",
        "--change",
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--change",
        "ENV LANG=C.UTF-8",
        "--change",
        f"LABEL {STAND_IN_LABEL}=debian-bookworm-python3-mmdebstrap",
        "--change",
        'CMD ["python3"]',
        str(tar),
        name,
        timeout=600,
    )


def ensure_base(engine: Engine, say: Say = say_stdout) -> str:
    """Make the ``FROM`` image available to Podman (Docker pulls it); return how it got there."""
    name = base_image()
    if engine.name == "docker":
        return "pulled by docker build"
    if engine.run("image", "exists", name, check=False).returncode == 0:
        labels = engine.run("image", "inspect", "--format", "{{json .Labels}}", name).stdout
        return "stand-in (cached)" if STAND_IN_LABEL in labels else "registry image (cached)"
    if settings.tools().pull_base:  # MLDEPLOY_PULL_BASE=1: where a registry is reachable and wanted
        engine.run("pull", name, timeout=900)
        return "registry image (pulled)"
    stand_in_base(engine, name, say)
    return "stand-in (built now)"


def build_image(
    engine: Engine, tag: str = TAG, target: str = TARGET, say: Say = say_stdout
) -> float:
    """Build ``target`` of the Dockerfile as ``tag``; returns the seconds it took."""
    missing = [f for f in CONTEXT_FILES if not (REPO_ROOT / f).is_file()]
    if missing:
        raise EngineError(f"{missing[0]} is missing from the build context: run `make artifacts`")
    args = ["build", "--target", target, "--tag", tag]
    bundle = ca_bundle()
    if bundle:
        args += ["--secret", f"id=pip-ca,src={bundle}"]
    if engine.name == "podman":
        # the docker format keeps HEALTHCHECK
        args += ["--format", "docker", "--pull=never", "--layers"]
        shown = re.compile(r"\[\d+/\d+\] (STEP|COMMIT)|Successfully (installed|tagged)")
    else:
        args += ["--progress", "plain"]
        shown = re.compile(r"#\d+ \[[^\]]+\] [A-Z]|#\d+ naming to")

    def show(line: str) -> bool:
        return bool(shown.match(line))

    start = time.monotonic()
    _stream(
        engine.cmd(*args, "."),
        engine.environ(),
        BUILD_LOG,
        show,
        say,
        timeout=1800,
        label="building the image",
    )
    return time.monotonic() - start


STEP_LINE = re.compile(
    r"\[\d+/\d+\] (STEP|COMMIT)|#\d+ \[[^\]]+\] [A-Z]"
)  # Podman | Docker BuildKit


def log_excerpt(path: Path = BUILD_LOG) -> list[str]:
    """The build steps of the last build's log, image ids masked (they change with every build)."""
    lines = (
        path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    )
    steps = [
        re.sub(r"\b[0-9a-f]{12,64}\b", "<id>", re.sub(r"\s+", " ", line.strip()))
        for line in lines
        if STEP_LINE.match(line)
    ]
    return sorted(steps, key=_step_order)


def _step_order(line: str) -> tuple[float, float]:
    """Podman builds independent stages in parallel, so their lines interleave differently from
    build to build: order them by stage, then step (a COMMIT ends its stage); others keep place."""
    found = re.match(r"\[(\d+)/\d+\] (?:STEP (\d+)/\d+|COMMIT)", line)
    if not found:
        return (float("inf"), 0.0)
    return (float(found.group(1)), float(found.group(2)) if found.group(2) else float("inf"))


@dataclass(frozen=True)
class Layer:
    size: int
    created_by: str


@dataclass(frozen=True)
class ImageReport:
    """What an engine says about a built image."""

    tag: str
    size: int
    layers: tuple[Layer, ...]
    user: str
    healthcheck: tuple[str, ...]
    stand_in_base: bool

    def largest(self, n: int = 5) -> list[Layer]:
        return sorted(self.layers, key=lambda layer: -layer.size)[:n]


def _history(engine: Engine, tag: str) -> list[Layer]:
    if engine.name == "podman":
        rows = json.loads(engine.run("history", "--no-trunc", "--format", "json", tag).stdout)
        return [
            Layer(int(r.get("size", 0)), r.get("CreatedBy", r.get("createdBy", ""))) for r in rows
        ]
    out = engine.run("history", "--no-trunc", "--human=false", "--format", "{{json .}}", tag).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [Layer(int(r["Size"]), r["CreatedBy"]) for r in rows]


def inspect(engine: Engine, tag: str = TAG) -> ImageReport:
    """Size, layers, user, health check and base of a built image."""
    (info,) = json.loads(engine.run("image", "inspect", tag).stdout)
    config = info.get("Config") or {}
    health = (config.get("Healthcheck") or info.get("Healthcheck") or {}).get(
        "Test"
    ) or []  # Docker | Podman
    labels = config.get("Labels") or info.get("Labels") or {}
    return ImageReport(
        tag,
        int(info["Size"]),
        tuple(_history(engine, tag)),
        config.get("User", ""),
        tuple(health),
        STAND_IN_LABEL in labels,
    )


def summary(engine: Engine, image: ImageReport) -> list[str]:
    """Which engine, base and Python built ``image``, then the build steps that did the work."""
    where = engine.run(
        "run", "--rm", image.tag, "python", "-c",
        "import os, sys; print(sys.version.split()[0], os.path.realpath(sys.executable))",
    ).stdout.split()  # fmt: skip
    base = "stand-in (Debian bookworm, mmdebstrap)" if image.stand_in_base else base_image()
    steps = log_excerpt()
    worked = [s for s in steps[3:] if "STEP 4/4" in s or "COPY" in s or "COMMIT" in s]
    return [
        f"engine: {engine.name}; base: {base}; Python {where[0]} at {where[1]}",
        *steps[:3],
        "...",
        *worked,
    ]


def describe_layer(created_by: str) -> str:
    """A short name for a layer: its Dockerfile instruction without the shell prefix."""
    text = re.sub(r"^/bin/sh -c (#\(nop\) )?", "", created_by.strip())
    text = re.sub(
        r"\b(dir|file|multi):[0-9a-f]{64} in ", "", text
    )  # Podman names the copied content by hash
    text = re.sub(r" # buildkit$", "", text)
    if text == "ADD /":
        text = "ADD / (the base image's file system)"
    text = re.sub(r"\s+", " ", text)
    return text if len(text) <= 70 else text[:67] + "..."


def report_lines(report: ImageReport, n: int = 5) -> list[str]:
    lines = [
        f"image {report.tag}: {report.size / 1e6:.0f} MB, {len(report.layers)} history entries",
        "largest layers:",
    ]
    lines += [
        f"  {layer.size / 1e6:8.1f} MB  {describe_layer(layer.created_by)}"
        for layer in report.largest(n)
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the serving image with Docker or Podman and report its size."
    )
    parser.add_argument(
        "--check", action="store_true", help="only say which engine would build, or why none can"
    )
    parser.add_argument(
        "--reset",
        action="store_true",
        help="remove every image and container of this repository's Podman storage",
    )
    parser.add_argument("--tag", default=TAG, help=f"image name (default {TAG})")
    args = parser.parse_args(argv)
    try:
        if args.check:
            engine = find(install=False)
            print(f"container engine: {engine.name}")
            return 0
        if args.reset:
            engine = find(install=False)
            if (
                engine.name == "podman"
            ):  # also releases the storage's own mounts, so artifacts/cache can be deleted
                engine.run("system", "reset", "--force", timeout=300)
            print(
                f"{engine.name}: storage of this repository reset"
                if engine.name == "podman"
                else "docker: nothing to reset"
            )
            return 0
        start = time.monotonic()
        engine = find(install=True)
        print(f"container engine: {engine.name}", flush=True)
        base = ensure_base(engine)
        print(f"base image {base_image()}: {base}", flush=True)
        build_image(engine, args.tag)
        for line in report_lines(inspect(engine, args.tag)):
            print(line)
        print(f"make image took {time.monotonic() - start:.0f} s")
    except (EngineUnavailable, EngineError, settings.SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
