"""Defenses for a service that faces the network, each a named piece beside the core.

- ``ConnectionGuard``: a header/idle timeout (a whole request must arrive within
  ``header_timeout_s``), a connection cap refused with a canned 503 before anything is parsed,
  and ``TCP_NODELAY`` on every connection. It wraps uvicorn's own protocol (``http=`` setting).
- ``BodySizeLimit``: 413 for a request body over the limit, declared or streamed; 400 for a
  broken ``Content-Length``.
- ``LoadShedding``: 503 with ``Retry-After`` before the body is read, while the queue that the
  request needs is full.
- ``AdminServer``: ``/health``, ``/ready`` and ``/metrics`` on a port of their own, answered by a
  thread, so probes never queue behind requests; ``/health`` fails if the event loop stalls.

Production often puts the first two in a proxy or ingress too (nginx ``client_header_timeout``).
"""

from __future__ import annotations

import asyncio
import contextvars
import http.server
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RETRY_AFTER = [(b"retry-after", b"1")]
STALE_S = 5.0  # an event loop that has not turned for this long fails liveness
log = logging.getLogger("mldeploy.server")


async def send_json(send: Send, status: int, body: dict, headers: list = ()) -> None:
    """Send a complete JSON response straight from middleware."""
    payload = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": status, "headers": [*head, *headers]})
    await send({"type": "http.response.body", "body": payload})


def nodelay(transport: asyncio.BaseTransport) -> None:
    """Turn off Nagle's algorithm: uvicorn writes a response's head and body separately, and
    without ``TCP_NODELAY`` the body waits for the client's delayed ACK (~40 ms per request)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --- header/idle timeout, connection cap, cheap refusal --------------------------------------
_REFUSAL_BODY = b'{"detail": "too many connections; retry later"}'
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY)
)
# The connection whose bytes uvicorn is parsing: uvicorn starts a request's task inside
# data_received, and a task starts with a copy of the current context, so it sees its connection.
_connection: contextvars.ContextVar[Connection | None] = contextvars.ContextVar("connection")


class ConnectionGuard:
    """What uvicorn lacks: a deadline for a whole request to arrive, and a connection cap.

    uvicorn arms no timer on a new connection and resets its keep-alive timer on every byte, so
    a client that sends nothing, or one byte a second, holds a socket forever. Here a request's
    headers and body must arrive within ``header_timeout_s`` of the connection opening or of the
    previous response; arriving bytes do not reset the clock. Serve ``wrap(app)`` with
    ``http=guard.protocol``: the protocol owns the timer, the app side says when a request is
    in (disarm) and when its response is out (arm again)."""

    def __init__(self, header_timeout_s: float, max_connections: int, metrics: Any = None):
        self.header_timeout_s, self.max_connections = header_timeout_s, max_connections
        self.metrics = metrics  # counts refused and timed-out connections, if given
        self.open: set[Connection] = set()

    def protocol(self, **uvicorn_args: Any) -> Connection:
        return Connection(self, AutoHTTPProtocol(**uvicorn_args))

    def wrap(self, app: ASGIApp) -> ASGIApp:
        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            conn = _connection.get(None)
            if scope["type"] != "http" or conn is None:  # e.g. lifespan, or a test client
                await app(scope, receive, send)
                return
            headers = dict(scope["headers"])
            if headers.get(b"content-length", b"0") == b"0" and b"transfer-encoding" not in headers:
                conn.disarm()  # no body: the request is in

            async def receive_() -> Message:
                message = await receive()
                if message["type"] == "http.request" and not message.get("more_body"):
                    conn.disarm()  # the whole body is in: from here on, the request timeout
                return message

            async def send_(message: Message) -> None:
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    conn.arm()  # waiting for the next request on this keep-alive connection

            # lets the batcher skip work for a client that has gone
            scope.setdefault("extensions", {})["mldeploy.client_gone"] = conn.gone
            await app(scope, receive_, send_)

        return guarded


class Connection(asyncio.Protocol):
    """One client connection: uvicorn's protocol inside, a deadline timer around it."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol):
        self.guard, self.inner = guard, inner
        self.transport: Any = None
        self.timer: asyncio.TimerHandle | None = None
        self.closed = self.refused = False

    def gone(self) -> bool:
        return self.closed

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        nodelay(transport)
        if len(self.guard.open) >= self.guard.max_connections:
            self.refused = True  # refuse fast, before reading: no parsing, no app
            if self.guard.metrics is not None:
                self.guard.metrics.connections_refused.inc()
            transport.write(REFUSAL)
            transport.close()
            return
        self.guard.open.add(self)
        self.inner.connection_made(transport)
        self.arm()

    def data_received(self, data: bytes) -> None:
        if not self.refused:
            _connection.set(self)
            self.inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return None if self.refused else self.inner.eof_received()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.disarm()
        if not self.refused:
            self.guard.open.discard(self)
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def arm(self) -> None:
        self.disarm()
        if not self.closed:
            self.timer = asyncio.get_running_loop().call_later(
                self.guard.header_timeout_s, self._too_slow
            )

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _too_slow(self) -> None:
        self.timer = None
        if not self.transport.is_closing():
            if self.guard.metrics is not None:
                self.guard.metrics.connections_timed_out.inc()
            self.transport.close()


# --- body limits -------------------------------------------------------------------------------
class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Answer 413 to a request body over ``max_bytes`` (FastAPI has no limit of its own).

    A declared ``Content-Length`` is checked before reading anything; a chunked body is counted
    as it streams in, so a client cannot get around the limit by not declaring a length."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            await send_json(send, 400, {"detail": "invalid Content-Length header"})
            return
        if declared is not None and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        received, rejected = 0, False

        async def counting_receive() -> Message:
            nonlocal received, rejected
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # answer now: the framework would make it a 400
                rejected = True
                await self._reject(send)
                raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            if not rejected:  # after our 413, drop whatever the app still tries to send
                await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            pass

    async def _reject(self, send: Send) -> None:
        await send_json(send, 413, {"detail": f"request body larger than {self.max_bytes} bytes"})


# --- load shedding -----------------------------------------------------------------------------
class LoadShedding:
    """503 with ``Retry-After`` before the body is read while ``full(path)`` says the queue this
    request needs is full: under overload, time spent on a request that will be refused is taken
    from the ones that will be served."""

    def __init__(self, app: ASGIApp, full: Callable[[str], bool]):
        self.app, self.full = app, full

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self.full(scope["path"]):
            detail = {"detail": "server overloaded (queue full); retry later"}
            await send_json(send, 503, detail, RETRY_AFTER)
            return
        await self.app(scope, receive, send)


# --- probes ------------------------------------------------------------------------------------
class AdminServer:
    """``/health``, ``/ready`` and ``/metrics`` on their own listener, answered by a thread.

    ``service`` gives ``health_probe()``, ``ready_probe()`` (each ``(status, body)``) and
    ``metrics_page()``. ``last_tick()`` says when the event loop last turned: a probe must not
    vouch for a service whose loop has been stuck for ``STALE_S`` (a handler blocking it)."""

    def __init__(self, service: Any, sock: socket.socket, timeout_s: float = 5.0):
        self.service = service
        self.last_tick: Callable[[], float | None] = lambda: None
        handler = type("AdminHandler", (_AdminHandler,), {"admin": self, "timeout": timeout_s})
        self._httpd = _AdminHTTPServer(sock.getsockname()[:2], handler, bind_and_activate=False)
        self._httpd.socket.close()
        self._httpd.socket = sock
        self._httpd.daemon_threads = True
        sock.listen(128)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )

    def start(self) -> AdminServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()

    def answer(self, path: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            return self.service.metrics_page()
        if path == "/health":
            status, body = self.service.health_probe()
            tick = self.last_tick()
            if tick is not None and time.monotonic() - tick > STALE_S:
                status, body = 503, {**body, "status": "failing"}
        elif path == "/ready":
            status, body = self.service.ready_probe()
        else:
            status, body = 404, {"detail": "Not Found"}
        return status, json.dumps(body).encode(), "application/json"


class _AdminHTTPServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a prober that hung up is normal
            log.exception("admin listener: request from %s failed", client_address)


class _AdminHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body go out in two writes (see ``nodelay``)
    admin: AdminServer

    def do_GET(self) -> None:
        status, payload, kind = self.admin.answer(self.path.partition("?")[0])
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        if status == 503:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass  # probes every few seconds would drown the log
