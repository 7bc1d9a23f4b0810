"""Pure ASGI middleware: a request-body size limit and structured (JSON lines) access logging.

Pure ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware wraps every
request and response in extra tasks and streams, which costs a large share of throughput.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_logger = logging.getLogger("mldeploy.access")
errors_logger = logging.getLogger("mldeploy.errors")


async def send_json(
    send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()
) -> None:
    """Send a complete JSON response straight from middleware."""
    payload = json.dumps(body).encode()
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": payload})


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Answer 413 to a request body over ``max_bytes`` (FastAPI has no limit of its own).

    A declared ``Content-Length`` is checked before reading anything; a chunked body is counted
    as it streams in, so a client cannot get around the limit by not declaring a length.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    await send_json(send, 400, {"detail": "invalid Content-Length header"})
                    return
                if int(value) > self.max_bytes:
                    await self._reject(send)
                    return
        received = 0
        rejected = False

        async def counting_receive() -> Message:
            nonlocal received, rejected
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # answer now: the framework would turn an error raised while reading into a 400
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


class AccessLog:
    """The outermost layer: names, times and logs every HTTP request, and keeps faults server-side.

    - Every request gets an id (the client's ``X-Request-ID`` if it is short and plain, else a new
      one), echoed in the ``x-request-id`` response header and in error bodies.
    - One JSON line per request and ``observe(method, path, status, seconds)``; endpoints can add
      fields (e.g. ``batch_size``) on ``request.state``. Unknown paths count as ``other``.
    - An exception nobody handled becomes a generic 500 with the id; the traceback goes to the
      ``mldeploy.errors`` log, never to the client.
    - While the service drains (``service.draining``), responses carry ``Connection: close`` so
      keep-alive clients move to another replica before the listener closes.
    """

    def __init__(
        self,
        app: ASGIApp,
        observe: Callable[[str, str, int, float], None] | None = None,
        known_paths: Collection[str] = (),
        logger: logging.Logger = access_logger,
        service: Any = None,
    ):
        self.app, self.observe, self.logger = app, observe, logger
        self.known_paths, self.service = frozenset(known_paths), service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = _request_id(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        status = 0
        draining = self.service is not None and self.service.draining

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-request-id", request_id.encode())]
                if draining:
                    extra.append((b"connection", b"close"))
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except Exception:
            errors_logger.exception(
                json.dumps({"request_id": request_id, "path": scope["path"], "error": "unhandled"})
            )
            if status == 0:  # nothing sent yet: answer for the app
                body = {"detail": "internal server error", "request_id": request_id}
                await send_json(recording_send, 500, body)
            status = status or 500
        finally:
            seconds = time.perf_counter() - start
            path = scope["path"] if scope["path"] in self.known_paths else "other"
            status = status or 500
            if self.observe is not None:
                self.observe(scope["method"], path, status, seconds)
            if self.logger.isEnabledFor(logging.INFO):  # skip building the line if nobody reads it
                record = {
                    "method": scope["method"],
                    "path": path,
                    "status": status,
                    "latency_ms": round(seconds * 1e3, 3),
                    "request_id": request_id,
                }
                batch_size = scope["state"].get("batch_size")
                if batch_size is not None:
                    record["batch_size"] = batch_size
                self.logger.info(json.dumps(record))


def _request_id(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id" and 0 < len(value) <= 64 and value.isascii():
            text = value.decode()
            if text.replace("-", "").replace("_", "").isalnum():
                return text
    return os.urandom(8).hex()


class FastPaths:
    """Answer cheap requests before the framework runs: probes and load shedding.

    ``probes`` maps a GET path to a function returning ``(status, body)``: health checks stay
    cheap however busy the app is. ``shed(path)`` returning True answers 503 with ``Retry-After``
    before the body is even parsed: under overload, every microsecond spent on a request that
    will be refused is stolen from the ones that will be served.
    """

    def __init__(
        self,
        app: ASGIApp,
        probes: dict[str, Callable[[], tuple[int, dict]]],
        shed: Callable[[str], bool] = lambda path: False,
        retry_after_s: int = 1,
    ):
        self.app, self.probes, self.shed = app, probes, shed
        self.retry = [(b"retry-after", str(retry_after_s).encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            probe = self.probes.get(scope["path"]) if scope["method"] == "GET" else None
            if probe is not None:
                status, body = probe()
                await send_json(send, status, body, self.retry if status == 503 else [])
                return
            if scope["method"] == "POST" and self.shed(scope["path"]):
                await send_json(
                    send, 503, {"detail": "server overloaded (queue full); retry later"}, self.retry
                )
                return
        await self.app(scope, receive, send)
