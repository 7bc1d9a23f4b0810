"""The FastAPI app: endpoints, validation errors, micro-batched ``/predict``, metrics and logs.

Endpoints: ``POST /predict`` (one sample, micro-batched), ``POST /predict_batch`` (a bounded
list), ``POST /validate`` (parse and validate a sample without the model), ``GET /health``
(liveness), ``GET /ready`` (readiness: is the model loaded), ``GET /metrics`` (Prometheus).
"""

# no `from __future__ import annotations`: FastAPI must see the per-app BatchRequest class itself
import asyncio
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import Field, create_model

from mldeploy.serving.batching import MicroBatcher, QueueFull, SampleRejected
from mldeploy.serving.metrics import ServiceMetrics
from mldeploy.serving.middleware import AccessLog, BodySizeLimit, FastPaths, access_logger
from mldeploy.serving.predictors import OnnxPredictor, Predictor, TorchScriptPredictor
from mldeploy.serving.schemas import (
    BatchRequest,
    BatchResponse,
    ErrorResponse,
    HealthResponse,
    PredictRequest,
    PredictResponse,
    ReadyResponse,
    ValidateResponse,
)

RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and batching knobs; ``from_env`` reads them from ``MLDEPLOY_*`` variables."""

    batching: bool = True
    max_batch_size: int = 32
    max_wait_ms: float = 2.0
    max_queue: int = 64  # two full batches: a sample waits at most about two model calls
    max_body_bytes: int = 64 * 1024
    max_batch_items: int = 256
    model_threads: int = 1
    digits: int = 6

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "batching" and (
                isinstance(value, bool) or not value >= (0 if f.name == "max_wait_ms" else 1)
            ):
                raise ValueError(f"{f.name} must be a positive number, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "ServiceSettings":
        """Read ``MLDEPLOY_BATCHING``, ``MLDEPLOY_MAX_BATCH_SIZE``, ... (upper-case field names)."""
        values: dict[str, object] = {}
        for f in fields(cls):
            key = "MLDEPLOY_" + f.name.upper()
            if key not in environ:
                continue
            text = environ[key].strip().lower()
            try:
                if f.name == "batching":
                    if text not in ("0", "1", "true", "false", "yes", "no"):
                        raise ValueError
                    values[f.name] = text in ("1", "true", "yes")
                else:
                    values[f.name] = float(text) if f.type in (float, "float") else int(text)
            except ValueError:
                raise ValueError(
                    f"{key}={environ[key]!r} is not a valid {'boolean' if f.name == 'batching' else 'number'}"
                ) from None
        return cls(**values)


class _NotReady(Exception):
    pass


def _error(status: int, detail: str, retry: bool = False) -> JSONResponse:
    return JSONResponse(
        {"detail": detail},
        status_code=status,
        headers={"Retry-After": str(RETRY_AFTER_S)} if retry else None,
    )


def _json(body: dict) -> Response:
    # The declared response_model documents the shape; returning a Response skips re-validating
    # a dict this module built itself (a measurable share of a tiny model's request time).
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


def _json_safe(value: object, limit: int | None = None) -> object:
    """Errors echo the input; NaN/Infinity there would make the 422 itself unserialisable (a 500),
    and an oversized batch need not be echoed back whole (lists beyond ``limit`` are summarised)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if limit is not None and len(value) > limit:
            return f"<list of {len(value)} items>"
        return [_json_safe(v, limit) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _validation_errors(errors: Sequence[dict]) -> list[dict]:
    return [
        {k: _json_safe(v, limit=8 if k == "input" else None) for k, v in error.items()}
        for error in errors
    ]


def _rejected(detail: str) -> JSONResponse:
    # same shape as FastAPI's own 422 errors, so clients parse one format
    return JSONResponse(
        {"detail": [{"loc": ["body", "features"], "msg": detail, "type": "model_rejected"}]},
        status_code=422,
    )


SHED = {
    400: {"model": ErrorResponse, "description": "Body cannot be read (e.g. not UTF-8)"},
    413: {"model": ErrorResponse, "description": "Request body larger than the configured limit"},
    503: {
        "model": ErrorResponse,
        "description": "Queue full or model not loaded; retry after `Retry-After` seconds",
    },
}


def create_app(
    load_predictor: Callable[[], Predictor], settings: ServiceSettings | None = None
) -> FastAPI:
    """Build the app; ``load_predictor`` runs once, in the lifespan handler, never per request."""
    settings = settings or ServiceSettings()
    state: dict[str, object] = {}  # predictor, executor, batcher: set while the app is running

    def queue_depth() -> float:
        batcher = state.get("batcher")
        return float(batcher.queue_depth) if isinstance(batcher, MicroBatcher) else 0.0

    metrics = ServiceMetrics(queue_depth)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # one model thread: ONNX Runtime releases the GIL, so the event loop keeps serving meanwhile
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        try:
            predictor = await asyncio.get_running_loop().run_in_executor(executor, load_predictor)
        except Exception as exc:
            executor.shutdown(wait=False)
            raise RuntimeError(f"could not load the model: {type(exc).__name__}: {exc}") from exc
        state.update(predictor=predictor, executor=executor)
        if settings.batching:
            batcher = MicroBatcher(
                predictor.predict_proba,
                executor,
                max_batch_size=settings.max_batch_size,
                max_wait_s=settings.max_wait_ms / 1e3,
                max_queue=settings.max_queue,
                on_batch=metrics.observe_batch,
            )
            batcher.start()
            state["batcher"] = batcher
        try:
            yield
        finally:
            batcher = state.pop("batcher", None)
            state.clear()  # not ready from here on: /ready answers 503 while draining
            if isinstance(batcher, MicroBatcher):
                await batcher.stop()
            executor.shutdown(wait=True)

    app = FastAPI(
        title="Two-moons classifier",
        version="0.2.0",
        description="Inference service of the course chapter 5.2 (micro-batched ONNX Runtime / TorchScript).",
        lifespan=lifespan,
    )
    app.state.settings, app.state.metrics = settings, metrics

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_errors(exc.errors())}, status_code=422)

    @app.exception_handler(_NotReady)
    async def not_ready(_: Request, __: _NotReady) -> JSONResponse:
        return _error(503, "model not loaded yet", retry=True)

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        metrics.shed.inc()
        return _error(503, f"server overloaded ({exc}); retry later", retry=True)

    def predictor() -> Predictor:
        model = state.get("predictor")
        if model is None:
            raise _NotReady
        return model  # type: ignore[return-value]

    def as_dict(proba: np.ndarray, model: Predictor) -> dict:
        return {
            "prediction": int(proba.argmax()),
            "probabilities": [round(float(p), settings.digits) for p in proba],
            "model_format": model.model_format,
        }

    async def run_model(x: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(state["executor"], predictor().predict_proba, x)  # type: ignore[arg-type]

    @app.post("/predict", response_model=PredictResponse, responses=SHED)
    async def predict(body: PredictRequest, request: Request) -> Response:
        """Classify one sample. Concurrent requests are micro-batched into one model call."""
        model = predictor()
        x = np.asarray(body.features, dtype=np.float32)
        batcher = state.get("batcher")
        try:
            if isinstance(batcher, MicroBatcher):
                result = await batcher.submit(x)
                proba, size = result.probabilities, result.batch_size
            else:
                proba, size = (await run_model(x[None, :]))[0], 1
        except SampleRejected as exc:
            return _rejected(str(exc))
        if not np.isfinite(proba).all():
            return _rejected("the model produced a non-finite output for this sample")
        request.state.batch_size = size
        return _json(as_dict(proba, model))

    limited_batch = create_model(
        "BatchRequest",
        __base__=BatchRequest,
        items=(list[PredictRequest], Field(..., min_length=1, max_length=settings.max_batch_items)),
    )

    @app.post("/predict_batch", response_model=BatchResponse, responses=SHED)
    async def predict_batch(body: limited_batch, request: Request) -> Response:  # type: ignore[valid-type]
        """Classify a list of samples in one model call (at most ``max_batch_items``)."""
        model = predictor()
        x = np.asarray([item.features for item in body.items], dtype=np.float32)
        proba = await run_model(x)
        bad = [i for i, row in enumerate(proba) if not np.isfinite(row).all()]
        if bad:
            return _rejected(f"the model produced non-finite outputs for items {bad}")
        request.state.batch_size = len(x)
        rows = [as_dict(row, model) for row in proba]
        return _json(
            {
                "predictions": [r["prediction"] for r in rows],
                "probabilities": [r["probabilities"] for r in rows],
                "model_format": model.model_format,
            }
        )

    @app.post(
        "/validate", response_model=ValidateResponse, responses={400: SHED[400], 413: SHED[413]}
    )
    async def validate(body: PredictRequest) -> Response:
        """Parse and validate a sample like ``/predict`` does, without calling the model."""
        return _json({"valid": True, "n_features": len(body.features)})

    def health_probe() -> tuple[int, dict]:
        return 200, {"status": "ok", "model_loaded": "predictor" in state}

    def ready_probe() -> tuple[int, dict]:
        return (200, {"ready": True}) if "predictor" in state else (503, {"ready": False})

    # Both probes are answered by FastPaths before FastAPI runs; these routes document them and
    # answer the same way if the app is mounted without its middleware.
    @app.get("/health", response_model=HealthResponse)
    async def health() -> JSONResponse:
        """Liveness: the process answers. ``model_loaded`` tells whether it can predict yet."""
        return JSONResponse(health_probe()[1])

    @app.get(
        "/ready",
        response_model=ReadyResponse,
        responses={503: {"model": ReadyResponse, "description": "Model not loaded"}},
    )
    async def ready() -> JSONResponse:
        """Readiness: 200 once the model is loaded, 503 before that and while shutting down."""
        status, body = ready_probe()
        return JSONResponse(
            body,
            status_code=status,
            headers={"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None,
        )

    def shed(path: str) -> bool:
        batcher = state.get("batcher")
        if (
            path == "/predict"
            and isinstance(batcher, MicroBatcher)
            and batcher.queue_depth >= batcher.max_queue
        ):
            metrics.shed.inc()
            return True
        return False

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    known = {route.path for route in app.routes} | {"/docs", "/openapi.json"}
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        FastPaths,
        probes={"/health": health_probe, "/ready": ready_probe},
        shed=shed,
        retry_after_s=RETRY_AFTER_S,
    )
    app.add_middleware(
        AccessLog, observe=metrics.observe_request, known_paths=known
    )  # outermost: sees 413s too
    return app


def create_app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory mldeploy.serving:create_app_from_env``.

    ``MLDEPLOY_MODEL`` is the model file (default ``artifacts/demo/model.onnx``), ``MLDEPLOY_BACKEND``
    is ``onnx`` (default) or ``torchscript``; ``MLDEPLOY_ACCESS_LOG=0`` silences the JSON access log;
    the limits are read by :meth:`ServiceSettings.from_env`. Bad settings stop with a clear message.
    """
    backend = os.environ.get("MLDEPLOY_BACKEND", "onnx").lower()
    default = {
        "onnx": "artifacts/demo/model.onnx",
        "torchscript": "artifacts/demo/model_ts_script.pt",
    }
    if backend not in default:
        raise SystemExit(f"MLDEPLOY_BACKEND must be 'onnx' or 'torchscript', got {backend!r}")
    path = Path(os.environ.get("MLDEPLOY_MODEL", default[backend]))
    if not path.is_file():
        raise SystemExit(f"no model file at {path}: run `make demo` (or set MLDEPLOY_MODEL)")
    try:
        settings = ServiceSettings.from_env()
    except ValueError as exc:
        raise SystemExit(f"bad setting: {exc}") from None
    if os.environ.get("MLDEPLOY_ACCESS_LOG", "1").strip().lower() not in ("0", "false", "no"):
        enable_access_log(sys.stdout)
    cls = OnnxPredictor if backend == "onnx" else TorchScriptPredictor
    return create_app(lambda: cls(path, threads=settings.model_threads), settings)


def enable_access_log(stream: object = sys.stdout) -> logging.Handler:
    """Write the access log's JSON lines to ``stream`` (once per stream); return the handler."""
    for handler in access_logger.handlers:
        if getattr(handler, "stream", None) is stream:
            return handler
    handler = logging.StreamHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_logger.addHandler(handler)
    access_logger.setLevel(logging.INFO)
    access_logger.propagate = False
    return handler
