"""The container's health check: exit 0 if the service answers ``/health`` with the model loaded.

    python -m mldeploy.serving.healthcheck            # http://127.0.0.1:$UVICORN_PORT/health (default 8888)

Standard library only, so it runs in the slim image without curl or httpx. Docker reads the
exit code: 0 healthy, 1 unhealthy; one line on stdout says why.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

DEFAULT_PORT = "8888"


def health_url(environ: dict[str, str] | None = None) -> str:
    """The URL to probe, from the same ``UVICORN_PORT`` variable that tells uvicorn where to listen."""
    env = os.environ if environ is None else environ
    port = env.get("UVICORN_PORT", DEFAULT_PORT)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"UVICORN_PORT must be a port number, got {port!r}")
    return f"http://127.0.0.1:{int(port)}/health"


def check(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    """Probe ``url``; healthy means HTTP 200 and ``model_loaded`` true in the JSON body."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        return False, f"unhealthy: HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"unhealthy: no answer ({reason})"
    except ValueError:
        return False, "unhealthy: /health did not return JSON"
    if not isinstance(body, dict) or body.get("model_loaded") is not True:
        return False, "unhealthy: model not loaded"
    return True, "healthy"


def main() -> int:
    try:
        url = health_url()
    except ValueError as exc:
        print(f"unhealthy: {exc}")
        return 1
    ok, message = check(url)
    print(message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
