"""The FastAPI app: routes, error answers and the app factory.

Endpoints: ``POST /predict`` (one sample, micro-batched), ``POST /predict_batch`` (a bounded
list), ``POST /validate`` (parse and validate a sample without the model), ``GET /health``
(liveness), ``GET /ready`` (readiness), ``GET /metrics`` (Prometheus). The probes and metrics
are also served on the admin port (``hardening.AdminServer``), by the same ``Service`` methods.
"""

# no `from __future__ import annotations`: FastAPI must see the per-app BatchRequest class itself
import asyncio
import contextlib
import json
import logging
import math
import sys
from collections.abc import AsyncIterator, Callable
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import Field, create_model

from mldeploy.serving.batching import (
    ClientGone,
    DeadlineExceeded,
    MicroBatcher,
    ModelError,
    QueueFull,
    Unavailable,
)
from mldeploy.serving.hardening import OVERLOADED_DETAIL, BodySizeLimit
from mldeploy.serving.middleware import AccessLog, access_logger
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
from mldeploy.serving.service import Service
from mldeploy.settings import ServiceSettings

errors_log = logging.getLogger("mldeploy.errors")


class NotReady(Exception):
    """The model is not loaded yet: 503."""


# --- dependencies ------------------------------------------------------------------------------
async def get_service(request: Request) -> Service:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a hop to another thread
    # and back on every request (measured under load: a third of this service's throughput)
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def running(service: Service) -> MicroBatcher:
    """The batcher; 503 (NotReady) before the model is loaded. Called after the body is valid."""
    if service.batcher is None:
        raise NotReady
    return service.batcher


def client_gone(request: Request) -> Callable[[], bool] | None:
    """True once this request's client has disconnected (``hardening.ConnectionGuard``)."""
    return request.scope.get("extensions", {}).get("mldeploy.client_gone")


def _rounded(values: list[float], digits: int) -> list[float]:
    return [round(v, digits) for v in values]


# The error answers of the OpenAPI schema (``/docs``), beside FastAPI's own 422.
ERROR_RESPONSES: dict[int | str, dict] = {
    400: {"model": ErrorResponse, "description": "Body cannot be read (e.g. not UTF-8)"},
    413: {"model": ErrorResponse, "description": "Request body larger than the configured limit"},
    500: {"model": ErrorResponse, "description": "Server fault; quote `request_id` when reporting"},
    503: {
        "model": ErrorResponse,
        "description": "Queue full, model not loaded or shutting down; retry after `Retry-After`",
    },
    504: {"model": ErrorResponse, "description": "The request ran past the server's timeout"},
}


# --- routes --------------------------------------------------------------------------------------
async def predict(body: PredictRequest, request: Request, service: ServiceDep) -> dict:
    """Classify one sample. Concurrent requests are micro-batched into one model call."""
    result = await running(service).submit(body.features, client_gone(request))
    request.state.batch_size = result.batch_size  # for the access log
    return {
        "prediction": result.label,
        "probabilities": _rounded(result.probabilities, service.settings.digits),
        "model_format": service.predictor.model_format,
    }


def batch_route(max_items: int) -> Callable:
    """``/predict_batch``, whose bound on the list length is part of its (per-app) schema."""
    Body = create_model(
        "BatchRequest",
        __base__=BatchRequest,
        items=(list[PredictRequest], Field(..., min_length=1, max_length=max_items)),
    )

    async def predict_batch(body: Body, request: Request, service: ServiceDep) -> dict:
        """Classify a list of samples in one model call (at most ``max_batch_items``)."""
        x = np.asarray([item.features for item in body.items], dtype=np.float32)
        proba = await running(service).submit_job(x, client_gone(request))
        if not np.isfinite(proba).all():
            raise ModelError("non-finite output")
        request.state.batch_size = len(x)
        return {
            "predictions": proba.argmax(axis=1).tolist(),
            "probabilities": [_rounded(row, service.settings.digits) for row in proba.tolist()],
            "model_format": service.predictor.model_format,
        }

    return predict_batch


async def validate(body: PredictRequest) -> dict:
    """Parse and validate a sample like ``/predict`` does, without calling the model."""
    return {"valid": True, "n_features": len(body.features)}


def _probe(answer: tuple[int, dict]) -> JSONResponse:
    status, body = answer
    return JSONResponse(body, status, headers={"Retry-After": "1"} if status == 503 else None)


async def health(service: ServiceDep) -> JSONResponse:
    """Liveness: the process and its model worker run. ``model_loaded``: can it predict yet."""
    return _probe(service.health_probe())


async def ready(service: ServiceDep) -> JSONResponse:
    """Readiness: 200 once the model is loaded and warm, 503 before that and while draining."""
    return _probe(service.ready_probe())


async def prometheus_metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type=service.metrics.content_type)


# --- errors --------------------------------------------------------------------------------------
# Every server-side refusal and fault: its status and the one line the client sees.
ERRORS: dict[type[Exception], tuple[int, str]] = {
    NotReady: (503, "model not loaded yet"),
    QueueFull: (503, OVERLOADED_DETAIL),  # the same words as a refusal at the door
    Unavailable: (503, "service unavailable (shutting down); retry later"),
    ClientGone: (503, "client disconnected"),  # nobody reads it; the access log records it
    DeadlineExceeded: (504, "request timed out in the server; retry later"),
    ModelError: (500, "internal server error (the model failed)"),
}


async def on_error(request: Request, exc: Exception) -> JSONResponse:
    status, detail = ERRORS[type(exc)]
    request_id = request.scope.get("state", {}).get("request_id", "")
    metrics = request.app.state.service.metrics
    if isinstance(exc, QueueFull):
        metrics.shed.inc()
    elif isinstance(exc, DeadlineExceeded):
        metrics.timed_out.inc()
    elif isinstance(exc, ModelError):  # a server fault: details go to the log, never the client
        fault = {"request_id": request_id, "path": request.url.path, "error": str(exc)}
        errors_log.error(json.dumps(fault))
    retry = {"Retry-After": "1"} if status != 500 else None
    return JSONResponse({"detail": detail, "request_id": request_id}, status, headers=retry)


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


async def on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [
        {k: _json_safe(v, limit=8 if k == "input" else None) for k, v in error.items()}
        for error in exc.errors()
    ]
    return JSONResponse({"detail": errors}, status_code=422)


def routes(max_batch_items: int) -> APIRouter:
    """Every endpoint of the service, in one router (``/predict_batch``'s bound is per app)."""
    router = APIRouter()
    post, get = router.post, router.get
    post("/predict", response_model=PredictResponse, responses=ERROR_RESPONSES)(predict)
    post("/predict_batch", response_model=BatchResponse, responses=ERROR_RESPONSES)(
        batch_route(max_batch_items)
    )
    limits = {400: ERROR_RESPONSES[400], 413: ERROR_RESPONSES[413]}
    post("/validate", response_model=ValidateResponse, responses=limits)(validate)
    get("/health", response_model=HealthResponse)(health)
    get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})(ready)
    get("/metrics", include_in_schema=False)(prometheus_metrics)
    return router


# --- the app -------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    if service.predictor is None:  # `python -m mldeploy.serving` loads before it listens
        await asyncio.to_thread(service.load)
    service.start()
    try:
        yield
    finally:
        await service.stop()


def create_app(
    load_predictor: Callable[[], Predictor], settings: ServiceSettings | None = None
) -> FastAPI:
    """Build the app; ``load_predictor`` runs once, at start-up, never per request."""
    settings = settings or ServiceSettings()
    service = Service(load_predictor, settings)
    router = routes(settings.max_batch_items)
    app = FastAPI(
        title="Two-moons classifier",
        version="0.4.0",
        description="Inference service of the course chapter 5.2 (micro-batched ONNX Runtime).",
        lifespan=lifespan,
        routes=router.routes,  # the router's own routes, so that app.routes lists every endpoint
    )
    app.state.service = service
    app.add_exception_handler(RequestValidationError, on_invalid)
    for exc in ERRORS:
        app.add_exception_handler(exc, on_error)
    # innermost first: the body limit, then the access log around it all (load shedding sits
    # outside the app, at the door: ``server.draining_server``)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    known = {route.path for route in app.routes}
    app.add_middleware(
        AccessLog, observe=service.metrics.observe_request, known_paths=known, service=service
    )
    return app


def load_predictor(settings: ServiceSettings) -> Callable[[], Predictor]:
    """The backend the settings name, as a loader the service calls once."""
    path, threads = settings.model_path, settings.model_threads
    if not path.is_file():
        raise SystemExit(f"no model file at {path}: run `make demo` (or set MLDEPLOY_MODEL)")
    cls = OnnxPredictor if settings.backend == "onnx" else TorchScriptPredictor
    return lambda: cls(path, threads=threads)


def create_app_from_env(settings: ServiceSettings | None = None) -> FastAPI:
    """The service as configured by ``MLDEPLOY_*`` (see ``mldeploy.settings``)."""
    from mldeploy import settings as settings_module

    settings = settings or settings_module.load()
    if settings.access_log:
        enable_access_log(sys.stdout)
    return create_app(load_predictor(settings), settings)


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
