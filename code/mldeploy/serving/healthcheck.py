"""The container's health check: exit 0 if the service answers ``/health`` with the model loaded.

    python -m mldeploy.serving.healthcheck     # http://127.0.0.1:$MLDEPLOY_ADMIN_PORT/health

It asks the admin listener (a thread of its own, fast even when the API is saturated) and reads
the port from the same settings object the service uses. Needs neither FastAPI nor ONNX Runtime,
nor curl in the image. Docker reads the exit code: 0 healthy, 1 unhealthy; one line says why.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

from pydantic import ValidationError


def health_url() -> str:
    """The URL to probe: the admin port the service listens on (``MLDEPLOY_ADMIN_PORT``)."""
    from mldeploy.settings import PathSettings, ServiceSettings, describe

    class Probe(ServiceSettings):  # only the admin port matters here
        model_config = {**PathSettings.model_config, "extra": "ignore"}

    try:
        settings = Probe()
    except ValidationError as exc:
        raise ValueError("; ".join(describe(exc))) from None
    if settings.admin_port == 0:
        raise ValueError("MLDEPLOY_ADMIN_PORT=0: the health check needs the port the service uses")
    return f"http://127.0.0.1:{settings.admin_port}/health"


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
