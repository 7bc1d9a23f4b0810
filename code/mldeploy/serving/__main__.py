"""``python -m mldeploy.serving``: the inference service as it ships (``make serve``, the image).

Settings come from ``MLDEPLOY_*`` (``mldeploy.settings``); ``--host``/``--port``/``--admin-port``
override them. Every bad setting stops start-up with one line and a non-zero exit, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading

from mldeploy import settings as settings_module
from mldeploy.cli import socket_fd
from mldeploy.serving import server


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mldeploy.serving", description=__doc__)
    parser.add_argument("--host", help="address to listen on (MLDEPLOY_HOST)")
    parser.add_argument("--port", help="port for the API (MLDEPLOY_PORT)")
    parser.add_argument("--admin-port", help="port for probes and metrics (MLDEPLOY_ADMIN_PORT)")
    parser.add_argument(
        "--fd", type=socket_fd, help="serve the API on this inherited, bound socket"
    )
    parser.add_argument("--admin-fd", type=socket_fd, help="and the admin listener on this one")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    settings = settings_module.load(host=args.host, port=args.port, admin_port=args.admin_port)
    errors = logging.getLogger("mldeploy.errors")
    if not errors.handlers:  # server faults: one JSON line each on stderr (tracebacks included)
        errors.addHandler(logging.StreamHandler(sys.stderr))
    if args.fd is not None:  # family and type are read from the descriptor
        sock = socket.socket(fileno=args.fd)
        admin = socket.socket(fileno=args.admin_fd) if args.admin_fd is not None else None
    else:
        sock = server.listen(settings.host, settings.port)
        admin = server.listen(settings.host, settings.admin_port)
    from mldeploy.serving.app import create_app_from_env  # FastAPI only once settings are good

    app = create_app_from_env(settings)
    # probes answer from now on: /health 200 and /ready 503 while the model loads
    probes = server.admin_server(app, admin) if admin is not None else None
    if probes is not None:
        probes.start()
    try:
        app.state.service.load()  # a bad model is one line, not a traceback
    except RuntimeError as exc:
        if probes is not None:
            probes.stop()
        raise SystemExit(f"error: {str(exc).splitlines()[0]}") from None
    try:
        started = server.serve(app, sock, probes)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after its graceful stop
        started = True
    # a model call that never returns must not keep the process alive past its shutdown bound
    from mldeploy.serving.service import MODEL_THREAD

    stuck = [t for t in threading.enumerate() if t.name.startswith(MODEL_THREAD) and t.is_alive()]
    for thread in stuck:
        thread.join(timeout=2)
    if any(t.is_alive() for t in stuck):
        print("stopped; a model call was still running and was abandoned", file=sys.stderr)
        sys.stderr.flush()
        os._exit(0 if started else 1)
    if started:
        print("server stopped cleanly", file=sys.stderr)
    return 0 if started else 1


if __name__ == "__main__":
    sys.exit(main())
