"""Run an ASGI app with uvicorn in a background thread of this process (tests, notebooks, the demo)."""

from __future__ import annotations

import os
import socket
import threading
import time

import uvicorn

from mldeploy.serving.middleware import ASGIApp


class BackgroundServer:
    """Run an ASGI app with uvicorn in a thread, on a free loopback port, and always stop it.

    The socket is bound before uvicorn starts (port 0 → the OS picks a free port), so there is
    no race between choosing a port and using it.
    """

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", start_timeout: float = 20.0):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self.host, self.port = self._sock.getsockname()
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self._start_timeout = start_timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"server on {self.url} did not start within {self._start_timeout:.0f} s"
                )
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_inherited_socket(fd: int) -> None:
    """Serve ``create_app_from_env()`` on an already-bound listening socket inherited as ``fd``.

    (``uvicorn --fd`` assumes a Unix socket, so TCP_NODELAY would never be set and small
    responses would wait for Nagle's algorithm: ~40 ms each.)
    """
    from mldeploy.serving.app import create_app_from_env

    sock = socket.socket(fileno=fd)  # family and type are read from the descriptor
    # asyncio's own loop, not uvloop: under saturation uvloop left new connections unaccepted for
    # seconds (measured in 5.2), so health probes and newcomers starved; MLDEPLOY_LOOP overrides.
    loop = os.environ.get("MLDEPLOY_LOOP", "asyncio")
    config = uvicorn.Config(
        create_app_from_env(), log_level="warning", access_log=False, lifespan="on", loop=loop
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="Serve the model named by MLDEPLOY_* on an inherited socket."
    )
    parser.add_argument(
        "--fd", type=int, required=True, help="file descriptor of a bound, listening TCP socket"
    )
    serve_inherited_socket(parser.parse_args().fd)
