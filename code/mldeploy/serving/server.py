"""Running the service: uvicorn with connection hygiene, graceful draining and an admin listener.

- ``GuardedHttpProtocol``: uvicorn's own HTTP protocol (httptools) plus what uvicorn lacks, a
  deadline for a whole request to arrive (a slow or silent client is closed) and a connection cap
  answered with an immediate 503. It plugs into uvicorn's documented ``http=`` setting.
- ``DrainingServer``: on SIGTERM, /ready turns 503 at once while traffic still flows for
  ``drain_s``; then uvicorn closes the listener, finishes in-flight requests (bounded by
  ``shutdown_timeout_s``) and the process exits 0.
- ``serve``: what ``python -m mldeploy.serving`` runs; /health, /ready and /metrics answer on a
  port of their own, from a child process (``probes.ProbeProcess``), so the probes stay fast while
  the event loop is saturated.
- ``BackgroundServer``: the service on free loopback ports, in a thread or in a child process
  (tests, notebooks, the benchmark, the demo); always stopped.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mldeploy.serving.middleware import ASGIApp
from mldeploy.serving.probes import AdminServer, ProbeProcess
from mldeploy.settings import ServiceSettings

log = logging.getLogger("mldeploy.server")


def _refusal() -> bytes:
    body = json.dumps({"detail": "too many connections; retry later"}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with a request deadline and a connection cap.

    uvicorn arms no timer on a new connection and resets its keep-alive timer on every byte, so a
    client that sends nothing, or one header byte a second, holds its socket forever. Here a whole
    request (headers and body) must arrive within ``header_timeout_s`` of the connection opening
    or of the previous response; the timer is not reset by data. Configure with :func:`guarded`.
    """

    header_timeout_s: float = 5.0
    max_connections: int = 1024
    on_refused: Any = staticmethod(lambda: None)
    on_timed_out: Any = staticmethod(lambda: None)
    _deadline: Any = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        nodelay(transport)
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.on_refused()
            transport.write(_REFUSAL)  # refuse fast, before reading: no parsing, no app
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.scope is self.scope:
            # lets the service skip work for a client that has gone (see app.client_gone)
            extensions = self.scope.setdefault("extensions", {})  # type: ignore[typeddict-item]
            extensions["mldeploy.client_gone"] = functools.partial(
                getattr, self.cycle, "disconnected"
            )

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()  # the request is in: from here on, the request timeout applies

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # waiting for the next request on this keep-alive connection

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.on_timed_out()
            self.transport.close()


_REFUSAL = _refusal()


def guarded(settings: ServiceSettings, metrics: Any = None) -> type[GuardedHttpProtocol]:
    """A ``GuardedHttpProtocol`` class with these limits, counting into ``metrics`` if given."""
    hooks = {}
    if metrics is not None:
        hooks = {
            "on_refused": staticmethod(metrics.connections_refused.inc),
            "on_timed_out": staticmethod(metrics.connections_timed_out.inc),
        }
    return type(
        "GuardedHttpProtocol",
        (GuardedHttpProtocol,),
        {
            "header_timeout_s": settings.header_timeout_s,
            "max_connections": settings.max_connections,
            **hooks,
        },
    )


class DrainingServer(uvicorn.Server):
    """uvicorn that drains before it stops: the first SIGTERM only marks the service as draining
    (readiness 503, ``Connection: close`` on answers) for ``drain_s``; then it stops as uvicorn
    does. SIGINT (Ctrl+C) or a second SIGTERM stops without the drain period."""

    def __init__(self, config: uvicorn.Config, service: Any = None, drain_s: float = 0.0):
        super().__init__(config)
        self.service, self.drain_s = service, drain_s
        self.drain_started: float | None = None
        self.on_drain: Any = None  # called once the service is marked as draining
        self.last_tick: float | None = None  # when the event loop last ran on_tick (~10 Hz)

    def handle_exit(self, sig: int, frame: Any) -> None:
        first = self.drain_started is None and not self.should_exit
        if sig == signal.SIGTERM and first and self.drain_s > 0:
            self.begin_drain()
        else:
            super().handle_exit(sig, frame)

    def begin_drain(self) -> None:
        if self.service is not None:
            self.service.draining = True
        if self.on_drain is not None:
            self.on_drain()
        self.drain_started = time.monotonic()
        print(f"SIGTERM: draining for {self.drain_s:g} s (/ready answers 503)", file=sys.stderr)

    async def on_tick(self, counter: int) -> bool:
        self.last_tick = time.monotonic()
        if self.drain_started is not None and time.monotonic() - self.drain_started >= self.drain_s:
            self.should_exit = True
        return await super().on_tick(counter)


def nodelay(transport: Any) -> None:
    """Turn off Nagle's algorithm on a connection: uvicorn writes a response's head and body
    separately, and without ``TCP_NODELAY`` the body waits for the client's delayed ACK (~40 ms
    per keep-alive request)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket; a clear one-line error when that is impossible."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only for TCP sockets
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, OverflowError) as exc:
        raise SystemExit(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def build(
    app: ASGIApp, sock: socket.socket, admin_sock: socket.socket | None = None
) -> tuple[DrainingServer, AdminServer | None]:
    """The uvicorn server (not started) for ``app`` on ``sock``, and its admin listener."""
    state = getattr(app, "state", None)
    service = getattr(state, "service", None)
    settings = service.settings if service is not None else ServiceSettings()
    config = uvicorn.Config(
        app,
        http=guarded(settings, service.metrics if service else None),
        loop=settings.loop,
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        backlog=2048,
    )
    server = DrainingServer(config, service, settings.drain_s)
    admin = None
    if admin_sock is not None and service is not None:
        admin = AdminServer(service, admin_sock, settings.header_timeout_s)
    return server, admin


def serve(app: ASGIApp, sock: socket.socket, probes: ProbeProcess | None = None) -> bool:
    """Serve until SIGTERM/SIGINT (drained) or a failed start-up; True if it started.

    ``probes``: the admin listener, already started (``python -m mldeploy.serving`` forks it
    before loading the model); it is told about the service here and stopped at the end."""
    server, _ = build(app, sock)
    if probes is not None:
        probes.attach(app.state.service, lambda: server.last_tick)  # type: ignore[attr-defined]
        server.on_drain = probes.publish  # /ready turns 503 now, not at the next poll
    try:
        server.run(sockets=[sock])
    finally:
        if probes is not None:
            probes.stop()
    return server.started


def local_url(sock: socket.socket) -> str:
    """The URL a process on this machine reaches ``sock``'s listener at."""
    host, port = sock.getsockname()[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _loopback_socket() -> socket.socket:
    return listen("127.0.0.1", 0)


class BackgroundServer:
    """The service on free loopback ports, always stopped: in a thread of this process
    (``BackgroundServer(app)``) or in a child process (``BackgroundServer(env={...})``, the
    service configured by ``MLDEPLOY_*`` as ``python -m mldeploy.serving`` runs it).

    The sockets are bound here before the server starts (port 0: the OS picks), so there is no
    race between choosing a port and using it.
    """

    def __init__(
        self,
        app: ASGIApp | None = None,
        *,
        env: dict[str, str] | None = None,
        start_timeout: float = 60.0,
    ):
        if (app is None) == (env is None):
            raise ValueError("give either an app (thread) or env (child process)")
        self.app, self.env, self._start_timeout = app, env, start_timeout
        self._sock, self._admin_sock = _loopback_socket(), _loopback_socket()
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
        self._server, self._admin = build(self.app, self._sock, self._admin_sock)
        if self._admin is not None:
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
        cmd = [sys.executable, "-m", "mldeploy.serving", "--fd", str(fds[0])]
        cmd += ["--admin-fd", str(fds[1])]
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
