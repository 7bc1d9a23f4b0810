"""A FastAPI inference service for the two-moons classifier, and a helper to run it in-process.

Only numpy, onnxruntime, FastAPI and uvicorn are needed at import time (no torch), so the same
module runs in the slim serving image. Endpoints: ``GET /health`` (liveness and whether the model is loaded), ``POST /predict`` (one
sample) and ``POST /predict_batch`` (a bounded list). The model is loaded once, at start-up.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Protocol

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from mldeploy.runtime import make_session, run_session, softmax

N_FEATURES = 2
MAX_BATCH_ITEMS = 256

Feature = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class Predictor(Protocol):
    """Anything that turns an (n, 2) float32 array into (n, classes) probabilities."""

    model_format: str

    def predict_proba(self, x: np.ndarray) -> np.ndarray: ...


class OnnxPredictor:
    """ONNX Runtime backend (the default for serving)."""

    model_format = "ONNX"

    def __init__(self, path: str | Path, threads: int = 1):
        self._session = make_session(path, threads=threads)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(run_session(self._session, x))


class TorchScriptPredictor:
    """TorchScript backend, as in the chapter's first draft of the service."""

    model_format = "TorchScript"

    def __init__(self, path: str | Path):
        import torch

        self._torch = torch
        self._module = torch.jit.load(str(path), map_location="cpu").eval()

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            logits = self._module(self._torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return softmax(logits.numpy())


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    features: list[Feature] = Field(..., min_length=N_FEATURES, max_length=N_FEATURES)


class PredictResponse(BaseModel):
    prediction: int
    probabilities: list[float]
    model_format: str


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[PredictRequest] = Field(..., min_length=1, max_length=MAX_BATCH_ITEMS)


class BatchResponse(BaseModel):
    predictions: list[int]
    probabilities: list[list[float]]
    model_format: str


class HealthResponse(BaseModel):
    status: str
    model_loaded: bool


def create_app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory mldeploy.serving:create_app_from_env``.

    ``MLDEPLOY_MODEL`` is the model file (default ``artifacts/demo/model.onnx``) and
    ``MLDEPLOY_BACKEND`` is ``onnx`` (default) or ``torchscript``.
    """
    import os

    backend = os.environ.get("MLDEPLOY_BACKEND", "onnx").lower()
    default = {"onnx": "artifacts/demo/model.onnx", "torchscript": "artifacts/demo/model_ts_script.pt"}
    if backend not in default:
        raise SystemExit(f"MLDEPLOY_BACKEND must be 'onnx' or 'torchscript', got {backend!r}")
    path = Path(os.environ.get("MLDEPLOY_MODEL", default[backend]))
    if not path.is_file():
        raise SystemExit(f"no model file at {path}: run `make demo` (or set MLDEPLOY_MODEL)")
    if backend == "onnx":
        return create_app(lambda: OnnxPredictor(path))
    return create_app(lambda: TorchScriptPredictor(path))


def create_app(load_predictor: Callable[[], Predictor], digits: int = 4) -> FastAPI:
    """Build the app; ``load_predictor`` runs once in the lifespan handler, not per request."""
    state: dict[str, Predictor] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["predictor"] = load_predictor()
        yield
        state.clear()

    app = FastAPI(title="Two-moons classifier", version="0.1.0", lifespan=lifespan)

    def predictor() -> Predictor:
        if "predictor" not in state:
            raise HTTPException(status_code=503, detail="model not loaded")
        return state["predictor"]

    @app.get("/health", response_model=HealthResponse)
    def health() -> HealthResponse:
        return HealthResponse(status="ok", model_loaded="predictor" in state)

    @app.post("/predict", response_model=PredictResponse)
    def predict(request: PredictRequest) -> PredictResponse:
        model = predictor()
        proba = model.predict_proba(np.array([request.features], dtype=np.float32))[0]
        return PredictResponse(
            prediction=int(proba.argmax()),
            probabilities=[round(float(p), digits) for p in proba],
            model_format=model.model_format,
        )

    @app.post("/predict_batch", response_model=BatchResponse)
    def predict_batch(request: BatchRequest) -> BatchResponse:
        model = predictor()
        proba = model.predict_proba(np.array([item.features for item in request.items], dtype=np.float32))
        return BatchResponse(
            predictions=[int(i) for i in proba.argmax(axis=1)],
            probabilities=[[round(float(p), digits) for p in row] for row in proba],
            model_format=model.model_format,
        )

    return app


class BackgroundServer:
    """Run an ASGI app with uvicorn in a thread, on a free loopback port, and always stop it.

    The socket is bound before uvicorn starts (port 0 → the OS picks a free port), so there is
    no race between choosing a port and using it.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", start_timeout: float = 20.0):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self.host, self.port = self._sock.getsockname()
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._start_timeout = start_timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server on {self.url} did not start within {self._start_timeout:.0f} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

