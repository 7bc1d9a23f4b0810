"""Defenses for a service that faces the network, each a named piece beside the core:
``ConnectionGuard`` (header/idle timeout, connection cap, ``TCP_NODELAY``, refusal at the door),
``Admission`` (load shedding with ``Retry-After``), ``BodySizeLimit`` (413) and ``AdminServer``
(probes and metrics answered by a thread). Production often puts the first in a proxy too.
"""

from __future__ import annotations

import asyncio
import contextvars
import http.server
import json
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

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
def canned_503(detail: str, close: bool) -> bytes:
    """A whole 503 response with ``Retry-After``, written straight to the socket."""
    body = json.dumps({"detail": detail}).encode()
    head = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1"
    head += "\r\nconnection: close" if close else ""
    return b"%s\r\ncontent-length: %d\r\n\r\n%s" % (head.encode(), len(body), body)


TOO_MANY_CONNECTIONS = canned_503("too many connections; retry later", close=True)
OVERLOADED_DETAIL = "server overloaded (queue full); retry later"
OVERLOADED = canned_503(OVERLOADED_DETAIL, close=False)


def whole_request(data: bytes) -> str | None:
    """The path of ``data`` if it is exactly one whole HTTP/1.1 request, its body as long as its
    one ``Content-Length`` says (no chunked body, no ``Expect``, no ``Connection: close``), its
    path plain: ``/`` first (not ``http://host/path``) and no percent-encoding, either of which
    uvicorn would read as another path than these bytes say. Query and fragment are dropped."""
    head_end, line_end = data.find(b"\r\n\r\n"), data.find(b"\r\n")
    method_path_version = data[:line_end].split(b" ")
    if head_end < 0 or len(method_path_version) != 3 or method_path_version[2] != b"HTTP/1.1":
        return None
    length = None
    for line in data[line_end + 2 : head_end].split(b"\r\n"):
        name, _, value = line.partition(b":")
        name, value = name.lower(), value.strip()
        if name == b"content-length" and length is None and value.isdigit():
            length = int(value)
        elif name in (b"content-length", b"transfer-encoding", b"expect"):
            return None
        elif name == b"connection" and b"close" in value.lower():
            return None
    path = method_path_version[1].partition(b"?")[0].partition(b"#")[0]
    if len(data) != head_end + 4 + (length or 0) or b"%" in path or not path.startswith(b"/"):
        return None
    return path.decode("latin-1")


# The connection whose bytes uvicorn is parsing: uvicorn starts a request's task inside
# data_received, and a task starts with a copy of the current context, so it sees its connection.
_connection: contextvars.ContextVar[Connection | None] = contextvars.ContextVar("connection")


class ConnectionGuard:
    """What uvicorn lacks: a deadline for a whole request to arrive, a connection cap, and a
    refusal that costs less than parsing the request.

    uvicorn arms no timer on a new connection and resets its keep-alive timer on every byte, so
    a client that sends nothing, or one byte a second, holds a socket forever. Here a request's
    headers and body must arrive within ``timeout_s`` of the connection opening or of the
    previous response; arriving bytes do not reset the clock. This is also the idle timeout of a
    keep-alive connection (give uvicorn none of its own: it never sees the requests refused at
    the door). Serve ``wrap(app)`` with ``http=guard.protocol``: each connection holds its
    deadline, the app side says when a request is in (disarm) and when its response is out (arm
    again), and one watch, every ``WATCH_S``, closes the connections past theirs.

    With an ``admission``, a request that arrives whole in one read (the usual case) is admitted
    or refused at the door, before uvicorn parses it; any other request is admitted in ``wrap``,
    before the app reads its body."""

    # how often the watch runs: a connection closes up to this long after its deadline
    WATCH_S = 0.1

    def __init__(
        self,
        timeout_s: float,
        max_connections: int,
        metrics: Any = None,
        admission: Admission | None = None,
    ):
        self.timeout_s, self.max_connections = timeout_s, max_connections
        self.metrics = metrics  # counts refused and timed-out connections, if given
        self.admission = admission
        self.open: set[Connection] = set()
        self.watching = False

    def protocol(self, **uvicorn_args: Any) -> Connection:
        if not self.watching:  # the first connection starts the watch, on the server's loop
            self.watching = True
            self.close_expired()
        return Connection(self, AutoHTTPProtocol(**uvicorn_args))

    def close_expired(self) -> None:
        """Close the connections past their deadline, and come back in ``WATCH_S``. One timer for
        all connections: a deadline is a number each response sets, where a timer per connection
        would be scheduled and cancelled on every request, each refusal at the door included."""
        now = time.monotonic()
        for conn in [conn for conn in self.open if conn.deadline < now]:
            conn.too_slow()
        asyncio.get_running_loop().call_later(self.WATCH_S, self.close_expired)

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
            admitted, conn.admitted = conn.admitted, None  # the door admitted this request
            if admitted is not None and admitted != scope["path"]:  # uvicorn read another path
                self.admission.leave(admitted)  # type: ignore[union-attr]
                admitted = None
            try:
                if admitted is None and self.admission is not None:  # it came in pieces
                    if not self.admission.enter(scope["path"]):
                        await send_json(send_, 503, {"detail": OVERLOADED_DETAIL}, RETRY_AFTER)
                        return
                    admitted = scope["path"]
                await app(scope, receive_, send_)
            finally:
                conn.busy = False
                if admitted is not None and self.admission is not None:
                    self.admission.leave(admitted)

        return guarded


class Connection(asyncio.Protocol):
    """One client connection: uvicorn's protocol inside, a deadline around it."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol):
        self.guard, self.inner = guard, inner
        self.transport: Any = None
        self.deadline = math.inf  # the guard's watch closes the connection once this has passed
        self.closed = self.refused = False
        # the door: while every read has been one whole request, and none is being served, a
        # request can be refused without uvicorn (whose answers would otherwise come out of order)
        self.whole, self.busy = True, False
        self.admitted: str | None = None  # counted by the door, not yet taken by ``wrap``

    def gone(self) -> bool:
        return self.closed

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        nodelay(transport)
        if len(self.guard.open) >= self.guard.max_connections:
            self.refused = True  # refuse fast, before reading: no parsing, no app
            if self.guard.metrics is not None:
                self.guard.metrics.connections_refused.inc()
            transport.write(TOO_MANY_CONNECTIONS)
            transport.close()
            return
        self.guard.open.add(self)
        self.inner.connection_made(transport)
        self.arm()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        admission = self.guard.admission
        if admission is not None and self.whole and not self.busy:
            path = whole_request(data)
            if path is None:
                self.whole = False  # from now on uvicorn alone reads this connection
            elif not admission.enter(path):
                self.transport.write(OVERLOADED)  # refused without parsing; the next may come
                self.arm()
                return
            else:
                self.busy, self.admitted = True, path
        else:
            self.whole = False
        _connection.set(self)
        self.inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return None if self.refused else self.inner.eof_received()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.disarm()
        if self.admitted is not None:  # admitted, but uvicorn never started it
            self.guard.admission.leave(self.admitted)  # type: ignore[union-attr]
            self.admitted = None
        if not self.refused:
            self.guard.open.discard(self)
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def arm(self) -> None:
        self.deadline = time.monotonic() + self.guard.timeout_s

    def disarm(self) -> None:
        self.deadline = math.inf

    def too_slow(self) -> None:
        self.disarm()
        if not self.transport.is_closing():
            if self.guard.metrics is not None:
                self.guard.metrics.connections_timed_out.inc()
            self.transport.close()


# --- body limits -------------------------------------------------------------------------------
class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Answer 413 to a request body over ``max_bytes``, inside the access log (FastAPI's own
    ``max_body_size`` wraps the whole app, so its 413s would never be logged).

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
class Admission:
    """At most ``limits[path]`` requests to each listed path inside the service at once, counted
    from admission to the end of the response; one more is refused (``enter`` is False).

    Bound every request in the server, not only the model's queue: a request the event loop has
    read but not yet queued waits too, and under overload most of the waiting happens there.
    Refusing early is what keeps serving: time spent on a request that will be refused is taken
    from the ones that will be served."""

    def __init__(self, limits: dict[str, int], on_refuse: Callable[[], None] = lambda: None):
        self.limits, self.on_refuse = limits, on_refuse
        self.inflight = dict.fromkeys(limits, 0)

    def enter(self, path: str) -> bool:
        if path not in self.limits:
            return True
        if self.inflight[path] >= self.limits[path]:
            self.on_refuse()
            return False
        self.inflight[path] += 1
        return True

    def leave(self, path: str) -> None:
        if path in self.limits:
            self.inflight[path] -= 1


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
