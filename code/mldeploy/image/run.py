"""Run the serving image on a free loopback port, hardened as in production; always remove it."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from mldeploy.image.engine import Engine, EngineError, last_line

# what `docker run` flags the chapter recommends: read-only root, no capabilities, no setuid gains
HARDENING = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")
_names = itertools.count()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unique_name(prefix: str = "mldeploy") -> str:
    return f"{prefix}-{os.getpid()}-{next(_names)}"


@dataclass(frozen=True)
class Container:
    engine: Engine
    name: str
    url: str

    def exec(self, *args: str, timeout: float = 60):
        """``exec`` in the container; leading ``--user 0``-style flags go before the name."""
        flags = list(args[:2]) if args[:1] == ("--user",) else []
        return self.engine.run(
            "exec", *flags, self.name, *args[len(flags) :], check=False, timeout=timeout
        )

    def healthcheck(self) -> tuple[int, str]:
        """Run the image's HEALTHCHECK once (Docker has no command for it: run the same command)."""
        if self.engine.name == "podman":  # prints nothing when healthy, "unhealthy" otherwise
            proc = self.engine.run("healthcheck", "run", self.name, check=False, timeout=60)
            return proc.returncode, proc.stdout.strip() or "healthy"
        proc = self.exec("python", "-m", "mldeploy.serving.healthcheck")
        return proc.returncode, proc.stdout.strip()

    def uids(self) -> str:
        """The ``Uid:`` line of process 1: real, effective, saved and file-system UID."""
        status = self.exec("cat", "/proc/1/status").stdout.splitlines()
        return " ".join(next(line for line in status if line.startswith("Uid")).split())

    def logs(self) -> str:
        proc = self.engine.run("logs", self.name, check=False, timeout=60)
        return proc.stdout + proc.stderr

    def state(self) -> dict:
        return json.loads(
            self.engine.run("inspect", "--format", "{{json .State}}", self.name).stdout
        )


def get(url: str, timeout: float = 2.0) -> tuple[int, dict]:
    """GET a JSON endpoint with the standard library; (status, body), also for 4xx/5xx answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def post(url: str, body: dict, timeout: float = 5.0) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@contextlib.contextmanager
def running(
    engine: Engine,
    image: str,
    *,
    command: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
    wait: bool = True,
    timeout: float = 60,
) -> Iterator[Container]:
    """``run -d`` the image hardened, published on 127.0.0.1 only; await /health; then remove it."""
    name, port = unique_name(), free_port()
    args = [
        "run",
        "-d",
        "--name",
        name,
        *HARDENING,
        "-p",
        f"127.0.0.1:{port}:8888",
        *extra,
        image,
        *command,
    ]
    proc = engine.run(*args, check=False, timeout=120)
    try:
        if proc.returncode != 0:
            raise EngineError(f"{engine.name} run failed: {last_line(proc.stderr)}")
        container = Container(engine, name, f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + timeout
        while wait:
            try:
                if get(container.url + "/health", timeout=1.0)[0] == 200:
                    break
            except (OSError, ValueError):
                pass
            if not container.state().get("Running", False):
                raise EngineError(f"the container exited: {last_line(container.logs())}")
            if time.monotonic() > deadline:
                raise EngineError(
                    f"no answer on /health within {timeout:.0f} s: {last_line(container.logs())}"
                )
            time.sleep(0.3)
        yield container
    finally:
        engine.run("rm", "--force", "--time", "5", name, check=False, timeout=120)
