"""Bare asyncio servers that measure what the stack itself costs. ``TwoWrites`` answers in two
writes, as uvicorn does: with and without ``TCP_NODELAY`` it shows the delayed-ACK wait (5.2.8).

The floor under a refusal: a bare asyncio server that answers every read with the service's
canned 503 (``hardening.OVERLOADED``), parsing nothing and counting nothing. What a request costs
it is what any asyncio server on this machine pays to read a request and write an answer;
``make bench-serve`` sets it beside what a refusal at the service's door costs.

``python -m mldeploy.loadtest.floor --fd N --admin-fd M`` (as ``BackgroundServer`` starts a
server): 503 on the first socket, a canned 200 on the second (its readiness probe)."""

from __future__ import annotations

import argparse
import asyncio
import socket

from mldeploy.cli import socket_fd
from mldeploy.serving.hardening import OVERLOADED

READY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class Canned(asyncio.Protocol):
    """Every read of a connection is answered with the same bytes."""

    def __init__(self, answer: bytes):
        self.answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(self.answer)  # type: ignore[attr-defined]


class TwoWrites(asyncio.Protocol):
    """Answers each request (a GET: no body) as uvicorn does, the head and the body in two writes;
    with ``nodelay`` False, Nagle's algorithm holds the body until the client acknowledges the
    head (5.2.8)."""

    def __init__(self, nodelay: bool) -> None:
        self.nodelay = nodelay

    def connection_made(self, transport: asyncio.Transport) -> None:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(self.nodelay))
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for _ in range(data.count(b"\r\n\r\n")):  # one answer per request
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
            self.transport.write(b"{}")


async def serve(api: socket.socket, admin: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: Canned(OVERLOADED), sock=api)
    await loop.create_server(lambda: Canned(READY), sock=admin)
    await asyncio.Event().wait()  # until the process is stopped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mldeploy.loadtest.floor")
    parser.add_argument("--fd", type=socket_fd, required=True)
    parser.add_argument("--admin-fd", type=socket_fd, required=True)
    args = parser.parse_args(argv)
    api, admin = socket.socket(fileno=args.fd), socket.socket(fileno=args.admin_fd)
    try:
        asyncio.run(serve(api, admin))
    except KeyboardInterrupt:  # BackgroundServer stops it with SIGINT
        pass


if __name__ == "__main__":
    main()
