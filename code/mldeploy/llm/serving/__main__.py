"""``python -m mldeploy.llm.serving --port 8001 --batching continuous|static``: serve the model.

Runs with 5.2's ``serve``: on SIGTERM /ready turns 503 and new completions are refused while
running streams finish (``--drain-s``, then uvicorn's graceful shutdown). ``MLDEPLOY_*``
environment variables set 5.2's connection settings (header and keep-alive timeouts, connection
cap, body limit, shutdown bound); the flags set the address, the batching and the request timeout,
longer than 5.2's because a stream of tokens takes seconds.
"""

from __future__ import annotations

import argparse
import socket

import torch

from mldeploy.cli import positive_int, positive_seconds, socket_fd
from mldeploy.llm.serving.api import create_app
from mldeploy.llm.training import train_or_load
from mldeploy.serving.server import admin_server, listen, serve
from mldeploy.settings import ServiceSettings, load


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--batching", choices=("continuous", "static"), default="continuous")
    parser.add_argument("--max-running", type=positive_int, default=8)
    parser.add_argument("--max-waiting", type=positive_int, default=64)
    parser.add_argument("--request-timeout-s", type=positive_seconds, default=60.0)
    parser.add_argument("--drain-s", type=float, default=None, help="default: MLDEPLOY_DRAIN_S")
    parser.add_argument("--fd", type=socket_fd, help="serve on this inherited, bound socket")
    parser.add_argument("--admin-fd", type=socket_fd, help="and answer probes on this one")
    args = parser.parse_args(argv)
    # no admin port of its own (probes only on --admin-fd): 0, so that no --port can clash with it
    settings = load(
        ServiceSettings, host=args.host, port=args.port, admin_port=0, drain_s=args.drain_s
    )
    torch.set_num_threads(1)
    if args.fd is not None:  # family and type are read from the descriptor
        sock = socket.socket(fileno=args.fd)
    else:
        sock = listen(settings.host, settings.port)  # a clear one-line error if the port is taken
    trained = train_or_load()
    app = create_app(
        trained.model,
        trained.tokenizer,
        batching=args.batching,
        max_running=args.max_running,
        max_waiting=args.max_waiting,
        request_timeout_s=args.request_timeout_s,
        max_body_bytes=settings.max_body_bytes,
        settings=settings,
    )
    host, port = sock.getsockname()[:2]
    print(f"serving {args.batching} batching on http://{host}:{port}", flush=True)
    probes = None
    if args.admin_fd is not None:
        probes = admin_server(app, socket.socket(fileno=args.admin_fd))
        probes.start()  # type: ignore[union-attr]
    try:
        started = serve(app, sock, probes)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after its graceful stop
        started = True
    if not started:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
