"""Structured access logging (JSON lines) as pure ASGI middleware.

Pure ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware wraps every
request and response in extra tasks and streams. The defenses (body limit, load shedding, ...)
live in ``hardening``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Collection
from typing import Any

from mldeploy.serving.hardening import ASGIApp, Message, Receive, Scope, Send, send_json

access_logger = logging.getLogger("mldeploy.access")
errors_logger = logging.getLogger("mldeploy.errors")


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
