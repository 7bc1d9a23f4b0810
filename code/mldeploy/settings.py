"""The project's settings: every ``MLDEPLOY_*`` variable, and ``CI``, in typed, validated objects.

``MLDEPLOY_<FIELD>`` sets a field (``MLDEPLOY_MAX_QUEUE=128``); keyword arguments override the
environment. ``ServiceSettings`` configures the inference service, ``ToolSettings`` everything
around it (time limits, the compute-path pin, the container engine, nbval's drift report, ``CI``).
Imports only pydantic: the container's health check reads it without FastAPI.
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
    """Where generated files go (``MLDEPLOY_ARTIFACTS``); the service's settings extend it.

    Two folders stay under the repository's own ``artifacts/`` whatever this says: the serving
    image's files (``artifacts/serve``, which the Dockerfile copies from the build context, the
    repository) and the container engine's storage (``artifacts/cache``, ``image.engine``)."""

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
    loop: Literal["asyncio", "uvloop"] = "asyncio"  # under load uvloop starves new connections
    # garbage collection (5.2.7): start-up objects out of the collector's sight, and a young
    # collection every gc_threshold net new objects (Python's default: 700)
    gc_freeze: bool = True
    gc_threshold: Annotated[int, Field(ge=100, le=1_000_000)] = 10_000
    access_log: bool = True
    # batching and back-pressure
    batching: bool = True
    max_batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    max_wait_ms: Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)] = 2.0
    max_queue: Count = 64  # /predict samples waiting (two full batches); admitted: this + a batch
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


class ToolSettings(PathSettings):
    """Everything around the service: what tests, notebooks, the demo and the image build read.

    Read afresh by each call of ``tools()`` (cheap), so a changed environment takes effect.
    """

    model_config = SettingsConfigDict(
        env_prefix="MLDEPLOY_",
        frozen=True,
        extra="forbid",
        env_ignore_empty=True,
        populate_by_name=True,
    )

    # every wait in tests, the demo and notebooks is multiplied by this (3 on a busy runner)
    timeout_factor: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] = 1.0
    # 1: leave PyTorch, MKL and oneDNN on the CPU's fastest kernels (mldeploy.reproducibility)
    native_cpu: bool = False
    # docker or podman; unset: Docker where its daemon answers, else Podman
    engine: Literal["docker", "podman"] | None = None
    # 1: pull the Dockerfile's FROM image from a registry instead of building a stand-in
    pull_base: bool = False
    # nbval writes the largest drift per notebook to this JSON file
    drift_report: Path | None = None
    # 1: the browser tests save a screenshot of every page they render (_build/screenshots/);
    # `make test-browser` and the book workflow set it, `make test` skips the pictures, not a check
    screenshots: bool = False
    # CI=true (set by CI services): missing tools fail their tests instead of skipping them
    ci: bool = Field(False, validation_alias="CI")

    @field_validator("engine", mode="before")
    @classmethod
    def _engine(cls, value: object) -> object:
        return (value.strip().lower() or None) if isinstance(value, str) else value

    @field_validator("ci", mode="before")
    @classmethod
    def _ci(cls, value: object) -> object:
        # CI belongs to the CI service, not to us: only "true" counts, nothing is refused
        return value.strip().lower() == "true" if isinstance(value, str) else bool(value)


class SettingsError(ValueError):
    """Bad settings; the message has one ``bad setting: MLDEPLOY_X=value: reason`` line each."""


def tools(**overrides: object) -> ToolSettings:
    """The tool settings from the environment; ``SettingsError`` (one line per bad value) if any
    is invalid. Every reader of these variables goes through here, so all give the same error."""
    try:
        return ToolSettings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_lines(exc, ToolSettings)) from None


def env_name(cls: type[BaseSettings], field: str) -> str:
    """The environment variable that sets ``field`` (``MLDEPLOY_TIMEOUT_FACTOR``, ``CI``)."""
    info = cls.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, str):
        return info.validation_alias
    return f"{cls.model_config.get('env_prefix', '')}{field.upper()}"


def describe(
    error: ValidationError,
    cls: type[BaseSettings] = ServiceSettings,
    flags: dict[str, str] | None = None,
) -> list[str]:
    """One line per bad setting, naming where it came from: its command-line flag if ``flags``
    maps the field to one (``--port='99999': ...``), else its environment variable."""
    aliases = {
        info.validation_alias: name
        for name, info in cls.model_fields.items()
        if isinstance(info.validation_alias, str)
    }
    lines = []
    for e in error.errors():
        field = str(e["loc"][0]) if e["loc"] else ""
        field = aliases.get(field, field)
        value = e.get("input")
        shown = repr(value) if isinstance(value, (str, int, float)) else ""
        if isinstance(value, float) and not math.isfinite(value):
            shown = repr(str(value))
        message = e["msg"].removeprefix("Value error, ")
        if not field:  # a rule across fields: its message names the variables
            lines.append(message)
            continue
        name = (flags or {}).get(field) or env_name(cls, field)
        lines.append(f"{name}{'=' + shown if shown else ''}: {message}")
    return lines


def _lines(
    error: ValidationError, cls: type[BaseSettings], flags: dict[str, str] | None = None
) -> str:
    return "bad setting: " + "\nbad setting: ".join(describe(error, cls, flags))


def load(cls: type[ServiceSettings] = ServiceSettings, **overrides: object) -> ServiceSettings:
    """Read and validate the settings; bad ones stop the program, one line each, no traceback.

    ``overrides`` come from command-line flags (``port`` from ``--port``); an error names the
    flag."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return cls(**given)
    except ValidationError as exc:
        flags = {k: "--" + k.replace("_", "-") for k in given}
        raise SystemExit(_lines(exc, cls, flags)) from None
