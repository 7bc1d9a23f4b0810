"""The admin port: probes that tell the truth (loading, ready, draining, a dead worker, a stuck
event loop) and answer well inside Kubernetes' probe timeouts while /predict is saturated."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from fastapi.responses import JSONResponse

from mldeploy.loadtest import loadgen
from mldeploy.serving import BackgroundServer, OnnxPredictor, create_app, hardening

BODY = json.dumps({"features": [0.5, -0.3]})


@pytest.fixture(scope="module")
def onnx_path(exported):
    return exported["ONNX (.onnx)"]


def _wait_for(url, status, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        answer = httpx.get(url, timeout=2)
        if answer.status_code == status:
            return answer
        time.sleep(0.02)
    raise AssertionError(f"{url} never answered {status}")


def test_probes_follow_the_service_from_loading_to_a_dead_worker(onnx_path, monkeypatch):
    monkeypatch.setattr(hardening, "STALE_S", 0.3)  # a long load must not count as a stuck loop
    loading = threading.Event()

    def slow_load():
        loading.set()
        time.sleep(1.0)
        return OnnxPredictor(onnx_path)

    app = create_app(slow_load)
    server = BackgroundServer(app)
    runner = threading.Thread(target=server.start)
    runner.start()
    try:
        loading.wait(10)
        time.sleep(0.5)  # longer than STALE_S
        health, ready = (
            httpx.get(server.admin_url + "/health"),
            httpx.get(server.admin_url + "/ready"),
        )
        assert (health.status_code, health.json()) == (200, {"status": "ok", "model_loaded": False})
        assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
        runner.join()
        assert _wait_for(server.admin_url + "/ready", 200).json() == {"ready": True}
        server.terminate()  # SIGTERM's first step: draining
        assert _wait_for(server.admin_url + "/ready", 503).headers["retry-after"] == "1"
        assert httpx.get(server.admin_url + "/health").status_code == 200  # draining is alive
        batcher = app.state.service.batcher  # the model worker dies
        asyncio.run_coroutine_threadsafe(batcher.stop(), batcher._task.get_loop()).result(5)
        failing = _wait_for(server.admin_url + "/health", 503)
        assert failing.json() == {"status": "failing", "model_loaded": True}
        assert failing.headers["retry-after"] == "1"
        assert httpx.get(server.admin_url + "/metrics").status_code == 200
    finally:
        runner.join()
        server.stop()
    with socket.socket() as probe:  # the admin listener went with the server
        assert probe.connect_ex(("127.0.0.1", server.admin_port)) != 0


def test_a_stalled_event_loop_fails_liveness_on_the_admin_port(onnx_path, monkeypatch):
    monkeypatch.setattr(hardening, "STALE_S", 0.3)
    app = create_app(lambda: OnnxPredictor(onnx_path))

    @app.get("/block")
    async def block() -> JSONResponse:  # a handler that blocks the event loop
        time.sleep(1.5)
        return JSONResponse({})

    with BackgroundServer(app) as server:
        assert _wait_for(server.admin_url + "/health", 200).json()["status"] == "ok"
        stuck = threading.Thread(target=httpx.get, args=(server.url + "/block",))
        stuck.start()
        try:
            failing = _wait_for(server.admin_url + "/health", 503, seconds=1.4)
            assert failing.json() == {"status": "failing", "model_loaded": True}
        finally:
            stuck.join()
        assert _wait_for(server.admin_url + "/health", 200).json()["status"] == "ok"


@pytest.mark.skipif(not loadgen.have_wrk(), reason="wrk is not installed")
def test_health_answers_quickly_while_predict_is_saturated(onnx_path, scaled):
    with BackgroundServer(env={"MLDEPLOY_MODEL": str(onnx_path)}) as server:
        load = loadgen.start_wrk(server.url + "/predict", connections=64, seconds=4, body=BODY)
        try:
            time.sleep(0.5)  # let /predict saturate first
            health = loadgen.run_wrk(
                server.admin_url + "/health", connections=1, seconds=2, method="GET"
            )
        finally:
            saturating = loadgen.finish_wrk(load)
    assert saturating.ok > 0 and health.codes == {200: health.requests}
    # Kubernetes allows 1 s (readiness) and 5 s (liveness); the target is far inside that
    assert health.p99_ms <= scaled(250), health
