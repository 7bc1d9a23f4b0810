"""The admin listener in a process of its own, so probes stay fast while the service is saturated.

A thread in the service's process is not enough: under load the event loop holds the GIL, and a
probe waits up to the interpreter's switch interval (5 ms) each time it needs it — p99 of tens of
milliseconds at 64 clients (``make bench-serve``). Here a child process, forked before the
service loads its model or starts a thread, answers on the admin socket:

- ``/health`` and ``/ready`` from the state the service last sent down a pipe. A thread of the
  service sends it on every change (within ``POLL_S``) and at least every ``HEARTBEAT_S``. If no
  word arrives for ``STALE_S`` once the model is in (a process stuck holding the GIL), or the
  event loop has not turned for that long (a handler that blocks it), ``/health`` answers 503:
  the probe must not vouch for a service that cannot answer.
- ``/metrics`` by asking the service's own ``/metrics`` on the API port (a scrape may wait behind
  requests; no probe depends on it).

The child ends when the pipe closes (the service stopped or died), and ignores SIGINT and SIGTERM:
those are for the service, which drains first.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import IO, Any

log = logging.getLogger("mldeploy.server")

POLL_S = 0.05  # how often the service looks for a change to send
HEARTBEAT_S = 0.5  # the longest the service stays silent when nothing changes
STALE_S = 5.0  # silence after which /health fails


LOADING = {"live": True, "model_loaded": False, "ready": False}


def state_of(service: Any, loop_stalled: bool = False) -> dict[str, bool]:
    """What the probes need to know about a ``Service``: three booleans."""
    return {
        "live": service.live() and not loop_stalled,
        "model_loaded": service.batcher is not None,
        "ready": service.ready(),
    }


def health_answer(state: dict[str, bool]) -> tuple[int, dict]:
    """``/health``'s status and body for a state (the service's own, or as the child heard it)."""
    body = {"status": "ok" if state["live"] else "failing", "model_loaded": state["model_loaded"]}
    return (200 if state["live"] else 503), body


def ready_answer(state: dict[str, bool]) -> tuple[int, dict]:
    """``/ready``'s status and body for a state."""
    return (200, {"ready": True}) if state["ready"] else (503, {"ready": False})


class AdminServer:
    """/health, /ready and /metrics answered by threads of their own (standard library HTTP).

    In the service's process (``BackgroundServer`` in a thread) the probes do not queue behind
    requests on the event loop, but they still wait for the GIL; ``ProbeProcess`` runs this same
    listener in a child process, as ``python -m mldeploy.serving`` does."""

    def __init__(self, service: Any, sock: socket.socket, timeout_s: float = 5.0):
        handler = type("AdminHandler", (_AdminHandler,), {"service": service, "timeout": timeout_s})
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


class _AdminHTTPServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a prober that hung up is normal
            log.exception("admin listener: request from %s failed", client_address)


class _AdminHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body go out in two writes: without TCP_NODELAY the second waits for the
    # client's delayed ACK (about 40 ms on Linux), which once made every probe slow
    disable_nagle_algorithm = True
    service: Any = None

    def do_GET(self) -> None:
        path, headers = self.path.partition("?")[0], {}
        if path in ("/health", "/ready"):
            probe = self.service.health_probe if path == "/health" else self.service.ready_probe
            status, body = probe()
            payload, kind = json.dumps(body).encode(), "application/json"
            if status == 503:
                headers["Retry-After"] = "1"
        elif path == "/metrics":
            status, payload, kind = self.service.metrics_page()
        else:
            status, payload, kind = 404, b'{"detail":"Not Found"}', "application/json"
        self.send_response(status)
        for name, value in {
            "Content-Type": kind,
            "Content-Length": len(payload),
            **headers,
        }.items():
            self.send_header(name, str(value))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass  # probes every few seconds would drown the log


# --- the service's side ---------------------------------------------------------------------
class ProbeProcess:
    """The admin listener in a child process forked from this one, kept informed of the service.

    ``start`` forks; it must run while this process has a single thread (before the model and
    the server start theirs), so the child inherits no lock held by another thread and needs no
    new interpreter. ``attach`` hands over the service once it exists; ``publish`` sends its
    state at once (the drain calls it, so ``/ready`` turns 503 without waiting for a poll).
    """

    def __init__(self, sock: socket.socket, metrics_url: str, timeout_s: float):
        self._sock, self.metrics_url, self.timeout_s = sock, metrics_url, timeout_s
        self.service: Any = None
        self._last_tick: Callable[[], float | None] = lambda: None
        self.pid: int | None = None
        self._pipe: IO[str] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._sent: dict[str, bool] | None = None
        self._sent_at = 0.0
        self._thread = threading.Thread(target=self._run, name="probe-publisher", daemon=True)

    def start(self, close_in_child: tuple[socket.socket, ...] = ()) -> ProbeProcess:
        """Fork the child; it closes ``close_in_child`` (the API listener: only the service may
        hold it, or it would stay open after the drain)."""
        if threading.active_count() != 1:
            raise RuntimeError("start the probe process before any other thread")
        self._sock.listen(128)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: serve the probes until the pipe closes, then exit
            os.close(write_fd)
            for other in close_in_child:
                other.close()
            _serve_probes(self._sock, read_fd, self.metrics_url, self.timeout_s)
        os.close(read_fd)
        self.pid, self._pipe = pid, os.fdopen(write_fd, "w")
        self._sock.close()  # the child owns the listener now
        self.publish()
        self._thread.start()
        return self

    def attach(self, service: Any, last_tick: Callable[[], float | None] = lambda: None) -> None:
        """From now on, report ``service``; ``last_tick`` says when the event loop last turned
        (``time.monotonic``): a loop stuck for ``STALE_S`` fails liveness, as a silent process
        does."""
        self.service, self._last_tick = service, last_tick
        self.publish()

    def _loop_stalled(self) -> bool:
        tick = self._last_tick()
        return tick is not None and time.monotonic() - tick > STALE_S

    def publish(self, force: bool = True) -> None:
        """Send the service's state (if ``force``, changed, or due for a heartbeat)."""
        if self.service is None:
            state = dict(LOADING)
        else:
            state = state_of(self.service, self._loop_stalled())
        with self._lock:
            due = time.monotonic() - self._sent_at >= HEARTBEAT_S
            if self._pipe is None or not (force or due or state != self._sent):
                return
            try:
                self._pipe.write(json.dumps(state) + "\n")
                self._pipe.flush()
            except (BrokenPipeError, ValueError):  # the child died: probes go unanswered
                log.error("the probe process has exited; /health and /ready are down")
                self._pipe = None
                return
            self._sent, self._sent_at = state, time.monotonic()

    def _run(self) -> None:
        while not self._stopping.wait(POLL_S):
            self.publish(force=False)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        if self.pid is None:
            self._sock.close()
            return
        with self._lock:
            pipe, self._pipe = self._pipe, None
            if pipe is not None:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()  # end of input: the child closes its listener and exits
        deadline = time.monotonic() + 5
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                break
            time.sleep(0.01)
        self.pid = None


def _serve_probes(sock: socket.socket, read_fd: int, metrics_url: str, timeout_s: float) -> None:
    """The child's whole life; never returns."""
    code = 0
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):  # for the service, which drains first
            signal.signal(sig, signal.SIG_IGN)
        service = RelayedService(metrics_url, timeout_s)
        admin = AdminServer(service, sock, timeout_s).start()
        with os.fdopen(read_fd) as pipe:
            for line in pipe:
                service.update(line)
        admin.stop()
    except BaseException:  # report, then leave without running the parent's cleanup
        log.exception("probe process failed")
        code = 1
    finally:
        os._exit(code)


# --- the child's side -----------------------------------------------------------------------
class RelayedService:
    """The service as the child sees it; quacks like ``app.Service`` for the admin handler."""

    def __init__(self, metrics_url: str, timeout_s: float):
        self.metrics_url, self.timeout_s = metrics_url, timeout_s
        self._state = dict(LOADING)
        self._heard = time.monotonic()

    def update(self, line: str) -> None:
        self._state, self._heard = json.loads(line), time.monotonic()

    def _current(self) -> dict[str, bool]:
        # silence while loading may be a long model load holding the GIL; once serving, it is not
        if self._state["model_loaded"] and time.monotonic() - self._heard > STALE_S:
            return {**self._state, "live": False, "ready": False}
        return self._state

    def health_probe(self) -> tuple[int, dict]:
        return health_answer(self._current())

    def ready_probe(self) -> tuple[int, dict]:
        return ready_answer(self._current())

    def metrics_page(self) -> tuple[int, bytes, str]:
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=self.timeout_s) as answer:
                return 200, answer.read(), answer.headers.get("content-type", "text/plain")
        except (OSError, urllib.error.URLError) as exc:
            body = json.dumps({"detail": f"metrics unavailable: {exc}"}).encode()
            return 503, body, "application/json"
