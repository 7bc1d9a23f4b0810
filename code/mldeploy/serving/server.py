"""Running the service: uvicorn behind the connection guard (``hardening``), a graceful drain
(``DrainingServer``), and probes on an admin port of their own (``hardening.AdminServer``).
"""

from __future__ import annotations

import gc
import logging
import select
import signal
import socket
import sys
import time
from typing import Any

import uvicorn

from mldeploy.serving.hardening import AdminServer, ASGIApp, ConnectionGuard
from mldeploy.settings import ServiceSettings


class DrainingServer(uvicorn.Server):
    """uvicorn that drains before it stops: the first SIGTERM only marks the service as draining
    (readiness 503; 5.2's ``AccessLog`` then adds ``Connection: close`` to answers) for
    ``drain_s``; then it closes its listeners (``close_listeners``) and stops as uvicorn does.
    SIGINT (Ctrl+C) or a second SIGTERM stops without the drain period."""

    LISTENER_WAIT_S = 1.0  # the longest a flood of new connections delays closing the listeners

    def __init__(self, config: uvicorn.Config, service: Any, settings: ServiceSettings):
        super().__init__(config)
        self.service, self.settings, self.drain_s = service, settings, settings.drain_s
        self.drain_started: float | None = None
        self.listeners_closed = False
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
        self.drain_started = time.monotonic()
        print(f"SIGTERM: draining for {self.drain_s:g} s (/ready answers 503)", file=sys.stderr)

    async def on_tick(self, counter: int) -> bool:
        self.last_tick = time.monotonic()
        if self.drain_started is not None and self.last_tick - self.drain_started >= self.drain_s:
            self.should_exit = self.should_exit or self.close_listeners()
        return await super().on_tick(counter)

    def close_listeners(self) -> bool:
        """Stop accepting, at a tick when no connection waits in a listener's queue: closing a
        listener resets the connections the kernel queued on it (a stalled loop can have some).
        True a tick later, when the connections accepted last have had their requests read:
        uvicorn's shutdown closes a connection whose request it has not read yet."""
        if self.listeners_closed:
            return True
        queued = any(_connection_waits(sock) for server in self.servers for sock in server.sockets)
        if queued and time.monotonic() - self.drain_started < self.drain_s + self.LISTENER_WAIT_S:
            return False  # the loop accepts them first
        for listener in self.servers:
            listener.close()
        self.listeners_closed = True
        return False


def _connection_waits(listener: Any) -> bool:
    """Whether the kernel has queued a connection on ``listener`` that nobody accepted yet
    (``poll``, not ``select``: it takes descriptors of any number)."""
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    return bool(poller.poll(0))


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


def draining_server(app: ASGIApp) -> DrainingServer:
    """The uvicorn server (not started) for ``app``, behind a ``ConnectionGuard`` that sheds
    load at the door for a service with an ``admission``: a refusal skips the whole app stack."""
    service = getattr(getattr(app, "state", None), "service", None)
    settings = service.settings if service is not None else ServiceSettings()
    guard = ConnectionGuard(
        min(settings.header_timeout_s, settings.keep_alive_s),
        settings.max_connections,
        getattr(service, "metrics", None),
        getattr(service, "admission", None),
    )
    config = uvicorn.Config(
        guard.wrap(app),
        http=guard.protocol,  # type: ignore[arg-type]
        # no WebSockets: an upgrade would take the connection, with its slots, out of the guard
        ws="none",
        loop=settings.loop,
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_keep_alive=24 * 3600,  # the guard's watch closes idle connections (see there)
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        backlog=2048,
    )
    logging.getLogger("uvicorn.error").addFilter(_no_websocket_hint)
    return DrainingServer(config, service, settings)


def _no_websocket_hint(record: logging.LogRecord) -> bool:
    """Drop uvicorn's advice to install a WebSocket library after an upgrade request: this
    service has none on purpose (it logs "Unsupported upgrade request." and answers as HTTP)."""
    return "WebSocket library" not in record.getMessage()


def admin_server(app: ASGIApp, sock: socket.socket) -> AdminServer | None:
    """The admin listener (not started) for ``app``'s service on ``sock``; None without one."""
    service = getattr(getattr(app, "state", None), "service", None)
    return (
        None if service is None else AdminServer(service, sock, service.settings.header_timeout_s)
    )


def serve(app: ASGIApp, sock: socket.socket, admin: AdminServer | None = None) -> bool:
    """Serve until SIGTERM/SIGINT (drained) or a failed start-up; True if it started.

    ``admin``: the admin listener, already started (``python -m mldeploy.serving`` starts it
    before loading the model); it learns when the event loop turns, and stops at the end."""
    server = draining_server(app)
    if server.settings.gc_freeze:
        # the objects alive now (modules, the model session, routes and schemas: tens of
        # thousands) live as long as the process; out of the garbage collector's sight, a full
        # collection no longer stops the event loop for 20-35 ms to scan them again (5.2.7)
        gc.collect()
        gc.freeze()
    # Python collects the young objects every 700 net new ones: under load hundreds of times a
    # second, each time walking the objects of every request in flight to find them alive
    gc.set_threshold(server.settings.gc_threshold)
    if admin is not None:
        admin.last_tick = lambda: server.last_tick
    try:
        server.run(sockets=[sock])
    finally:
        if admin is not None:
            admin.stop()
    return server.started
