"""The FastAPI app: a ``Service`` (state and lifespan), route functions, errors, middleware.

Endpoints: ``POST /predict`` (one sample, micro-batched), ``POST /predict_batch`` (a bounded
list), ``POST /validate`` (parse and validate a sample without the model), ``GET /health``
(liveness), ``GET /ready`` (readiness), ``GET /metrics`` (Prometheus). The probes and metrics
are also served on the admin listener (``probes``), which stays fast under load.
"""

# no `from __future__ import annotations`: FastAPI must see the per-app BatchRequest class itself
import asyncio
import contextlib
import json
import logging
import math
import sys
import time
import types
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import Field, create_model

from mldeploy.serving import probes
from mldeploy.serving.batching import (
    DeadlineExceeded,
    Hooks,
    MicroBatcher,
    ModelError,
    QueueFull,
    Unavailable,
)
from mldeploy.serving.metrics import ServiceMetrics
from mldeploy.serving.middleware import AccessLog, BodySizeLimit, FastPaths, access_logger
from mldeploy.serving.predictors import OnnxPredictor, Predictor, TorchScriptPredictor
from mldeploy.serving.schemas import (
    N_FEATURES,
    BatchRequest,
    BatchResponse,
    ErrorResponse,
    HealthResponse,
    PredictRequest,
    PredictResponse,
    ReadyResponse,
    ValidateResponse,
)
from mldeploy.settings import ServiceSettings

RETRY_AFTER_S = 1
errors_log = logging.getLogger("mldeploy.errors")


class NotReady(Exception):
    pass


class Service:
    """Everything one app holds while it runs: settings, metrics, the model, its worker."""

    def __init__(self, load_predictor: Callable[[], Predictor], settings: ServiceSettings):
        self.load_predictor, self.settings = load_predictor, settings
        self.metrics = ServiceMetrics(
            lambda: float(self.batcher.queue_depth if self.batcher else 0)
        )
        self.predictor: Predictor | None = None
        self.batcher: MicroBatcher | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.call_seconds: dict[int, float] = {}  # batch size -> its warm-up call (s)
        self.draining = False  # set on SIGTERM: /ready answers 503 while requests still flow

    # --- start-up and shutdown ---------------------------------------------------------------
    def load(self) -> None:
        """Load the model in the model thread, check it against the API and warm it up."""
        # one model thread: ONNX Runtime releases the GIL, so the event loop keeps serving
        self.executor = self.executor or ThreadPoolExecutor(1, thread_name_prefix="model")
        try:
            self.predictor = self.executor.submit(self._load_and_check).result()
        except Exception as exc:
            self.executor.shutdown(wait=False)
            self.executor = None
            raise RuntimeError(f"could not load the model: {exc}") from exc

    def _load_and_check(self) -> Predictor:
        model = self.load_predictor()
        if model.n_features not in (N_FEATURES, -1):
            raise ValueError(f"it takes {model.n_features} features, the API sends {N_FEATURES}")
        # warm-up: the first call of each size allocates and proves the output has the right shape
        for n in (1, self.settings.max_batch_size, self.settings.max_batch_items):
            x = np.zeros((n, N_FEATURES), np.float32)
            start = time.perf_counter()
            out = np.asarray(model.predict_proba(x))
            self.call_seconds[n] = time.perf_counter() - start
            if out.ndim != 2 or out.shape[0] != n or out.shape[1] < 2:
                raise ValueError(
                    f"for {n} samples it returned shape {out.shape}, not ({n}, classes)"
                )
            if not np.isfinite(out).all():
                raise ValueError("it returned non-finite probabilities for a zero input")
        return model

    def start(self) -> None:
        s = self.settings
        self.batcher = MicroBatcher(
            self.predictor.predict_proba,  # type: ignore[union-attr]
            self.executor,  # type: ignore[arg-type]
            max_batch_size=s.max_batch_size if s.batching else 1,
            max_wait_s=s.max_wait_ms / 1e3 if s.batching else 0.0,
            max_queue=s.max_queue,
            max_jobs=s.max_batch_jobs,
            timeout_s=s.request_timeout_s,
            hooks=Hooks(
                batch=self.metrics.observe_batch,
                queue_wait=self.metrics.queue_wait.observe,
                model_error=self.metrics.model_errors.inc,
                skipped=self.metrics.abandoned.inc,
            ),
        )
        self.batcher.start()

    async def stop(self) -> None:
        batcher, self.batcher, self.predictor = self.batcher, None, None
        if batcher is not None:
            await batcher.stop()  # every waiting request is answered 503
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None

    # --- probes (also used by the admin listener, from its own thread) ------------------------
    def live(self) -> bool:
        """False once the model worker has died: the orchestrator should restart the process."""
        return self.batcher is None or self.batcher.healthy

    def ready(self) -> bool:
        return self.batcher is not None and self.batcher.healthy and not self.draining

    def health_probe(self) -> tuple[int, dict]:
        return probes.health_answer(probes.state_of(self))

    def ready_probe(self) -> tuple[int, dict]:
        return probes.ready_answer(probes.state_of(self))

    def metrics_page(self) -> tuple[int, bytes, str]:
        return 200, self.metrics.render(), self.metrics.content_type

    def shed(self, path: str) -> bool:
        """Refuse before parsing the body when the queue this request needs is already full."""
        b = self.batcher
        if b is None:
            return False
        full = (path == "/predict" and b.queue_depth >= b.max_queue) or (
            path == "/predict_batch" and b.jobs_depth >= b.max_jobs
        )
        if full:
            self.metrics.shed.inc()
        return full


# --- dependencies ----------------------------------------------------------------------------
# The inference routes call these directly rather than through FastAPI's Depends: resolving a
# dependency costs a measurable share of a tiny model's request (see the benchmark).
async def get_service(request: Request) -> Service:
    return request.app.state.service


def running(request: Request) -> tuple[Service, MicroBatcher]:
    """The service and its batcher; 503 (NotReady) before the model is loaded."""
    service: Service = request.app.state.service
    if service.batcher is None:
        raise NotReady
    return service, service.batcher


def client_gone(request: Request) -> Callable[[], bool] | None:
    """Set by ``server.GuardedHttpProtocol``: True once this request's client has disconnected."""
    return request.scope.get("extensions", {}).get("mldeploy.client_gone")


ServiceDep = Annotated[Service, Depends(get_service)]


# --- route functions ---------------------------------------------------------------------------
def _json(body: dict) -> Response:
    # The declared response_model documents the shape; returning a Response skips re-validating
    # a dict this module built itself (a measurable share of a tiny model's request time).
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


async def predict(body: PredictRequest, request: Request) -> Response:
    """Classify one sample. Concurrent requests are micro-batched into one model call."""
    service, batcher = running(request)
    model_format = service.predictor.model_format
    result = await batcher.submit(body.features, client_gone(request))
    # read by the access log (cheaper than request.state, which wraps the dict in an object)
    request.scope.setdefault("state", {})["batch_size"] = result.batch_size
    digits = service.settings.digits
    return _json(
        {
            "prediction": result.label,
            "probabilities": [round(p, digits) for p in result.probabilities],
            "model_format": model_format,
        }
    )


async def predict_batch(body: BatchRequest, request: Request) -> Response:
    """Classify a list of samples in one model call (at most ``max_batch_items``)."""
    service, batcher = running(request)
    x = np.asarray([item.features for item in body.items], dtype=np.float32)
    model_format = service.predictor.model_format
    proba = await batcher.submit_job(x, client_gone(request))
    if not np.isfinite(proba).all():
        raise ModelError("non-finite output")
    request.scope.setdefault("state", {})["batch_size"] = len(x)
    digits = service.settings.digits
    return _json(
        {
            "predictions": proba.argmax(axis=1).tolist(),
            "probabilities": [[round(p, digits) for p in row] for row in proba.tolist()],
            "model_format": model_format,
        }
    )


async def validate(body: PredictRequest) -> Response:
    """Parse and validate a sample like ``/predict`` does, without calling the model."""
    return _json({"valid": True, "n_features": len(body.features)})


# Both probes are answered by FastPaths before FastAPI runs; these routes document them and
# answer the same way if the app is mounted without its middleware.
async def health(service: ServiceDep) -> JSONResponse:
    """Liveness: the process and its model worker run. ``model_loaded``: can it predict yet."""
    status, body = service.health_probe()
    return JSONResponse(body, status_code=status)


async def ready(service: ServiceDep) -> JSONResponse:
    """Readiness: 200 once the model is loaded and warm, 503 before that and while draining."""
    status, body = service.ready_probe()
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


async def prometheus_metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type=service.metrics.content_type)


# --- errors ------------------------------------------------------------------------------------
def _request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


def _error(request: Request, status: int, detail: str, retry: bool = False) -> JSONResponse:
    return JSONResponse(
        {"detail": detail, "request_id": _request_id(request)},
        status_code=status,
        headers={"Retry-After": str(RETRY_AFTER_S)} if retry else None,
    )


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


async def on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": _validation_errors(exc.errors())}, status_code=422)


async def on_not_ready(request: Request, _: Exception) -> JSONResponse:
    return _error(request, 503, "model not loaded yet", retry=True)


async def on_queue_full(request: Request, _: Exception) -> JSONResponse:
    request.app.state.service.metrics.shed.inc()
    return _error(request, 503, "server overloaded (queue full); retry later", retry=True)


async def on_unavailable(request: Request, _: Exception) -> JSONResponse:
    return _error(request, 503, "service unavailable (shutting down); retry later", retry=True)


async def on_deadline(request: Request, _: Exception) -> JSONResponse:
    request.app.state.service.metrics.timed_out.inc()
    return _error(request, 504, "request timed out in the server; retry later", retry=True)


async def on_model_error(request: Request, exc: Exception) -> JSONResponse:
    # a server fault: the details go to the log under the request id, never to the client
    errors_log.error(
        json.dumps(
            {"request_id": _request_id(request), "path": request.url.path, "error": str(exc)}
        )
    )
    return _error(request, 500, "internal server error (the model failed)")


SHED = {
    400: {"model": ErrorResponse, "description": "Body cannot be read (e.g. not UTF-8)"},
    413: {"model": ErrorResponse, "description": "Request body larger than the configured limit"},
    500: {"model": ErrorResponse, "description": "Server fault; quote `request_id` when reporting"},
    503: {
        "model": ErrorResponse,
        "description": "Queue full, model not loaded or shutting down; retry after `Retry-After`",
    },
    504: {"model": ErrorResponse, "description": "The request ran past the server's timeout"},
}


# --- the app -----------------------------------------------------------------------------------
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
    app = FastAPI(
        title="Two-moons classifier",
        version="0.3.0",
        description="Inference service of the course chapter 5.2 (micro-batched ONNX Runtime).",
        lifespan=lifespan,
        # FastAPI's OpenTelemetry hooks: off, as no provider is configured; checking for one
        # on every request cost more than the model call (the service has its own metrics)
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.service, app.state.settings, app.state.metrics = service, settings, service.metrics
    # the per-app bound on the batch length is part of the schema, so it is a per-app class
    limited = create_model(
        "BatchRequest",
        __base__=BatchRequest,
        items=(list[PredictRequest], Field(..., min_length=1, max_length=settings.max_batch_items)),
    )
    app.post("/predict", response_model=PredictResponse, responses=SHED)(predict)
    batch_route = _with_body(predict_batch, limited)
    app.post("/predict_batch", response_model=BatchResponse, responses=SHED)(batch_route)
    app.post(
        "/validate", response_model=ValidateResponse, responses={400: SHED[400], 413: SHED[413]}
    )(validate)
    app.get("/health", response_model=HealthResponse)(health)
    app.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})(
        ready
    )
    app.get("/metrics", include_in_schema=False)(prometheus_metrics)
    for exc, handler in (
        (RequestValidationError, on_invalid),
        (NotReady, on_not_ready),
        (QueueFull, on_queue_full),
        (Unavailable, on_unavailable),
        (DeadlineExceeded, on_deadline),
        (ModelError, on_model_error),
    ):
        app.add_exception_handler(exc, handler)
    known = {route.path for route in app.routes} | {"/docs", "/openapi.json"}
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    probes = {"/health": service.health_probe, "/ready": service.ready_probe}
    app.add_middleware(FastPaths, probes=probes, shed=service.shed, retry_after_s=RETRY_AFTER_S)
    # outermost: sees 413s too, names every request, turns unexpected exceptions into a clean 500
    app.add_middleware(
        AccessLog, observe=service.metrics.observe_request, known_paths=known, service=service
    )
    return app


def _with_body(route: Callable, body: type) -> Callable:
    """A copy of ``route`` whose ``body`` parameter has the type ``body`` (FastAPI reads it)."""
    copy = types.FunctionType(route.__code__, route.__globals__, route.__name__)
    copy.__annotations__ = {**route.__annotations__, "body": body}
    copy.__doc__ = route.__doc__
    return copy


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
