"""The service on free loopback ports, always stopped: for tests, notebooks, the benchmark and the
demo. Not part of the service (the image does not need it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from mldeploy.serving.hardening import AdminServer, ASGIApp
from mldeploy.serving.server import DrainingServer, admin_server, draining_server, listen


class BackgroundServer:
    """The service on free loopback ports, always stopped: in a thread of this process
    (``BackgroundServer(app)``) or in a child process (``BackgroundServer(env={...})``, the
    service configured by ``MLDEPLOY_*`` as ``python -m mldeploy.serving`` runs it; ``module``
    and ``args`` run another server the same way, e.g. ``mldeploy.llm.serving``).

    The sockets are bound here before the server starts (port 0: the OS picks), so there is no
    race between choosing a port and using it.
    """

    def __init__(
        self,
        app: ASGIApp | None = None,
        *,
        env: dict[str, str] | None = None,
        module: str = "mldeploy.serving",
        args: Sequence[str] = (),
        start_timeout: float = 60.0,
    ):
        if (app is None) == (env is None):
            raise ValueError("give either an app (thread) or env (child process)")
        self.app, self.env, self._start_timeout = app, env, start_timeout
        self.command = [sys.executable, "-m", module, *args]
        self._sock, self._admin_sock = listen("127.0.0.1", 0), listen("127.0.0.1", 0)
        self.host, self.port = self._sock.getsockname()[:2]
        self.admin_port = self._admin_sock.getsockname()[1]
        self.proc: subprocess.Popen | None = None
        self._server: DrainingServer | None = None
        self._admin: AdminServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    def start(self) -> BackgroundServer:
        if self.app is not None:
            self._start_thread()
        else:
            self._start_process()
        return self

    def _start_thread(self) -> None:
        self._server = draining_server(self.app)
        self._admin = admin_server(self.app, self._admin_sock)
        if self._admin is not None:
            self._admin.last_tick = lambda: self._server.last_tick  # type: ignore[union-attr]
            self._admin.start()
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"server on {self.url} did not start within {self._start_timeout:.0f} s"
                )
            time.sleep(0.01)

    def _start_process(self) -> None:
        fds = [self._sock.fileno(), self._admin_sock.fileno()]
        cmd = [*self.command, "--fd", str(fds[0]), "--admin-fd", str(fds[1])]
        # stderr to a file, not a pipe: nobody reads a pipe while the server runs
        self._stderr = tempfile.TemporaryFile()
        env = {**os.environ, "MLDEPLOY_ACCESS_LOG": "0", **(self.env or {})}
        self.proc = subprocess.Popen(
            cmd,
            pass_fds=fds,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,
        )
        # the child owns the listeners now: once it closes them, connections must be refused
        self._sock.close()
        self._admin_sock.close()
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self.proc.poll() is not None:
                err = self.stderr()
                self.stop()
                raise RuntimeError(f"server exited with code {self.proc.returncode}: {err[-2000:]}")
            try:  # urllib, not httpx: this module ships in the image, which has no httpx
                with urllib.request.urlopen(self.admin_url + "/ready", timeout=1.0) as answer:
                    if answer.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server on {self.url} not ready in {self._start_timeout:.0f} s")
            time.sleep(0.05)

    def stderr(self) -> str:
        """What the child process wrote to stderr so far."""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()

    def terminate(self) -> None:
        """What Kubernetes does to stop a pod: SIGTERM (in a thread: start draining)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
        elif self._server is not None:
            self._server.begin_drain()

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)  # stop without the drain period
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self._stderr.close()
        if self._server is not None:
            self._server.should_exit = True
            if self._thread is not None and self._thread.is_alive():
                self._thread.join(timeout=timeout)
        if self._admin is not None:
            self._admin.stop()
        self._sock.close()
        self._admin_sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
