"""Find a container engine that can build and run the serving image, and talk to it.

Docker where a daemon answers (an instructor's CI runner, a laptop with Docker Desktop); otherwise
Podman, configured by ``deploy/podman/containers.conf`` with its storage under ``artifacts/cache/``,
so the machine's own container configuration is left as it is. ``MLDEPLOY_ENGINE=docker|podman``
forces one (read by ``mldeploy.settings.ToolSettings``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mldeploy import settings
from mldeploy.paths import REPO_ROOT

CACHE = REPO_ROOT / "artifacts" / "cache"
PODMAN_CONF = REPO_ROOT / "deploy" / "podman" / "containers.conf"
# What the Podman path needs from Debian: the engine, the runtime that works on hybrid cgroups,
# container networking, and mmdebstrap for the stand-in base image.
DEBIAN_PACKAGES = ("podman", "runc", "netavark", "aardvark-dns", "iptables", "uidmap", "mmdebstrap")


class EngineUnavailable(RuntimeError):
    """No engine can build here; the message says why in one line."""


@dataclass(frozen=True)
class Engine:
    """A container engine's command line (``docker``/``podman`` + global flags) and environment."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict, repr=False)

    def cmd(self, *args: str) -> list[str]:
        return [*self.argv, *args]

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def run(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run an engine command, capture its output; ``check`` raises with the engine's message."""
        proc = subprocess.run(
            self.cmd(*args), env=self.environ(), capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise EngineError(
                f"{self.name} {args[0]} failed: {last_line(proc.stderr or proc.stdout)}"
            )
        return proc


class EngineError(RuntimeError):
    """An engine command failed; the message carries the engine's last line of output."""


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def podman_engine(program: str) -> Engine:
    """Podman with the repo's containers.conf and private storage in ``artifacts/cache/podman``."""
    state = CACHE / "podman"
    state.mkdir(parents=True, exist_ok=True)
    # run-time state holds sockets whose paths must stay short (108 bytes):
    # keep it out of the repository
    base = (
        Path("/run")
        if os.geteuid() == 0 and os.access("/run", os.W_OK)
        else Path(tempfile.gettempdir())
    )
    # one run directory per storage (a copy of the repository may link to this one's storage)
    run_dir = base / f"mldeploy-podman-{os.geteuid()}-{_short_hash(str(state.resolve()))}"
    storage_conf = state / "storage.conf"
    text = (
        "# written by mldeploy.image.engine: image storage of this repository only\n[storage]\n"
        f'driver = "overlay"\ngraphroot = "{state / "storage"}"\n'
        f'runroot = "{run_dir / "storage"}"\n'
    )
    if not storage_conf.is_file() or storage_conf.read_text() != text:
        storage_conf.write_text(text)
    env = {
        "CONTAINERS_CONF": str(PODMAN_CONF),
        "CONTAINERS_STORAGE_CONF": str(storage_conf),
        "BUILDAH_ISOLATION": "chroot",  # builds need no nested container runtime
    }
    return Engine("podman", (program, "--tmpdir", str(run_dir / "libpod")), env)


def _docker_answers(program: str) -> bool:
    try:
        proc = subprocess.run(
            [program, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and bool(proc.stdout.strip())


def _privilege_prefix() -> list[str] | None:
    """``[]`` as root, ``["sudo", "-n"]`` where sudo needs no password, else ``None``."""
    if os.geteuid() == 0:
        return []
    if (
        shutil.which("sudo")
        and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0
    ):
        return ["sudo", "-n"]
    return None


def missing_packages() -> list[str]:
    """The Debian packages of the Podman path that are not installed."""
    if not shutil.which("dpkg-query"):
        return list(DEBIAN_PACKAGES)
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *DEBIAN_PACKAGES],
        capture_output=True,
        text=True,
    )
    installed = {
        line.split()[0] for line in proc.stdout.splitlines() if line.endswith(" installed")
    }
    return [name for name in DEBIAN_PACKAGES if name not in installed]


def install_packages(packages: list[str], say=print) -> None:
    """apt-get install the packages, as root or through ``sudo -n``; one clear error otherwise."""
    prefix = _privilege_prefix()
    if not shutil.which("apt-get") or prefix is None:
        raise EngineUnavailable(
            "no container engine: start Docker, or install Podman "
            f"({' '.join(packages)}; needs apt-get and root)"
        )
    say(f"installing Debian packages: {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *packages]):
        proc = subprocess.run(
            [*prefix, *args], env=env, capture_output=True, text=True, timeout=900
        )
        if proc.returncode != 0:
            raise EngineUnavailable(
                f"{' '.join(args[:2])} failed: {last_line(proc.stderr or proc.stdout)}"
            )


def find(install: bool = False, say=print) -> Engine:
    """The engine to use; with ``install``, install Podman's Debian packages if there is none."""
    try:
        forced = settings.tools().engine or ""
    except settings.SettingsError as exc:  # e.g. MLDEPLOY_ENGINE=dokcer: say so, in one line
        raise EngineUnavailable(str(exc)) from None
    docker = shutil.which("docker")
    if forced in ("", "docker") and docker and _docker_answers(docker):
        return Engine("docker", (docker,), {"DOCKER_BUILDKIT": "1"})
    if forced == "docker":
        raise EngineUnavailable(
            "MLDEPLOY_ENGINE=docker, but no Docker daemon answers `docker info`"
        )
    missing = (
        missing_packages()
        if shutil.which("apt-get")
        else ([] if shutil.which("podman") else ["podman"])
    )
    if missing and install:
        install_packages(missing, say)
        missing = missing_packages()
    podman = shutil.which("podman")
    if not podman or (missing and not shutil.which("runc")):
        hint = (
            "`make image` installs Podman when run as root"
            if shutil.which("apt-get")
            else "install Docker or Podman"
        )
        raise EngineUnavailable(
            f"no container engine: no Docker daemon answers and Podman is not installed ({hint})"
        )
    engine = podman_engine(podman)
    proc = engine.run("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
    if proc.returncode != 0:
        raise EngineUnavailable(
            f"podman is installed but does not run here: {last_line(proc.stderr)}"
        )
    return engine


def available() -> Engine | None:
    """The engine or ``None`` (no installing), for tests and notebooks using only what is there."""
    try:
        return find(install=False)
    except EngineUnavailable:
        return None
