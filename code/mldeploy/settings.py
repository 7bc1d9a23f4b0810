"""Every environment variable the library and the service read, in one typed, validated object.

``MLDEPLOY_<FIELD>`` sets a field (``MLDEPLOY_MAX_QUEUE=128``); keyword arguments override the
environment. Imports only pydantic: the container's health check reads it without FastAPI.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]

Seconds = Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)]
Port = Annotated[int, Field(ge=0, le=65535)]  # 0: let the OS choose a free port
Count = Annotated[int, Field(ge=1, le=1_000_000)]


class PathSettings(BaseSettings):
    """Where generated files go (``MLDEPLOY_ARTIFACTS``); the service's settings extend it."""

    model_config = SettingsConfigDict(env_prefix="MLDEPLOY_", frozen=True, extra="forbid")

    artifacts: Path = REPO_ROOT / "artifacts"


class ServiceSettings(PathSettings):
    """The inference service: model, listeners, batching, limits, timeouts and shutdown."""

    # the model
    backend: Literal["onnx", "torchscript"] = "onnx"
    model: Path | None = Field(None, description="model file; default: the demo's export")
    model_threads: Count = 1
    # listeners
    host: str = "127.0.0.1"
    port: Port = 8000
    admin_port: Port = 8081  # /health, /ready, /metrics on their own thread
    loop: Literal["asyncio", "uvloop"] = "asyncio"  # uvloop starved new connections in 5.2
    access_log: bool = True
    # batching and back-pressure
    batching: bool = True
    max_batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    max_wait_ms: Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)] = 2.0
    max_queue: Count = 64  # /predict samples waiting: two full batches
    max_batch_jobs: Count = 2  # /predict_batch requests waiting for the model
    max_batch_items: Annotated[int, Field(ge=1, le=4096)] = 256
    max_body_bytes: Annotated[int, Field(ge=64, le=64 * 1024 * 1024)] = 64 * 1024
    digits: Annotated[int, Field(ge=1, le=9)] = 6
    # connections and deadlines
    max_connections: Count = 1024
    header_timeout_s: Seconds = 5.0  # a request's headers and body must arrive within this
    keep_alive_s: Annotated[int, Field(ge=1, le=3600)] = 5
    request_timeout_s: Seconds = 10.0
    # shutdown
    drain_s: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = 5.0
    shutdown_timeout_s: Annotated[int, Field(ge=1, le=3600)] = 10

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("must be a host name or address")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ServiceSettings:
        if self.port and self.port == self.admin_port:
            raise ValueError("MLDEPLOY_PORT and MLDEPLOY_ADMIN_PORT must differ")
        if self.max_wait_ms / 1e3 >= self.request_timeout_s:
            raise ValueError("MLDEPLOY_MAX_WAIT_MS must be shorter than MLDEPLOY_REQUEST_TIMEOUT_S")
        return self

    @property
    def model_path(self) -> Path:
        if self.model is not None:
            return self.model
        name = "model.onnx" if self.backend == "onnx" else "model_ts_script.pt"
        return self.artifacts / "demo" / name


def describe(error: ValidationError, cls: type[BaseSettings] = ServiceSettings) -> list[str]:
    """One line per bad setting, naming its environment variable: ``MLDEPLOY_PORT=99999: ...``."""
    prefix = cls.model_config.get("env_prefix", "")
    lines = []
    for e in error.errors():
        field = str(e["loc"][0]) if e["loc"] else ""
        value = e.get("input")
        shown = repr(value) if isinstance(value, (str, int, float)) else ""
        if isinstance(value, float) and not math.isfinite(value):
            shown = repr(str(value))
        message = e["msg"].removeprefix("Value error, ")
        if not field:  # a rule across fields: its message names the variables
            lines.append(message)
            continue
        lines.append(f"{prefix}{field.upper()}{'=' + shown if shown else ''}: {message}")
    return lines


def load(cls: type[ServiceSettings] = ServiceSettings, **overrides: object) -> ServiceSettings:
    """Read and validate the settings; bad ones stop the program, one line each, no traceback."""
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise SystemExit("bad setting: " + "\nbad setting: ".join(describe(exc, cls))) from None
