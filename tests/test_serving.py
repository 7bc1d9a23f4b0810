"""The inference service: answers, validation (never a 500), limits, batching over HTTP, logs,
metrics, readiness, and servers that leave nothing behind."""

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from mldeploy.loadtest import loadgen
from mldeploy.loadtest.scrape import metric, read_metrics
from mldeploy.runtime import make_session, run_session, softmax
from mldeploy.serving import (
    BackgroundServer,
    DelayedPredictor,
    OnnxPredictor,
    ServiceSettings,
    TorchScriptPredictor,
    create_app,
)


@pytest.fixture(scope="module")
def onnx_path(exported):
    return exported["ONNX (.onnx)"]


@pytest.fixture(scope="module")
def client(onnx_path):
    with TestClient(create_app(lambda: OnnxPredictor(onnx_path))) as c:
        yield c


def _expected(onnx_path, x) -> np.ndarray:
    return softmax(run_session(make_session(onnx_path), np.asarray(x, dtype=np.float32)))


def SlowPredictor(path, delay: float = 0.01) -> DelayedPredictor:
    """The real ONNX model plus a fixed delay per call, so concurrent requests must queue up."""
    return DelayedPredictor(OnnxPredictor(path), delay)


def test_predict_and_predict_batch_match_the_model(client, onnx_path):
    points = [[0.5, -0.3], [1.2, 0.8], [-1.0, -0.5]]
    expected = _expected(onnx_path, points)
    one = client.post("/predict", json={"features": points[0]})
    assert one.status_code == 200
    body = one.json()
    assert body["model_format"] == "ONNX" and body["prediction"] == int(expected[0].argmax())
    np.testing.assert_allclose(body["probabilities"], expected[0], atol=1e-5)
    batch = client.post("/predict_batch", json={"items": [{"features": p} for p in points]}).json()
    assert batch["predictions"] == [int(i) for i in expected.argmax(axis=1)]
    np.testing.assert_allclose(batch["probabilities"], expected, atol=1e-5)


def test_validate_health_ready_and_docs(client):
    assert client.post("/validate", json={"features": [1, 2]}).json() == {
        "valid": True,
        "n_features": 2,
    }
    assert client.get("/health").json() == {"status": "ok", "model_loaded": True}
    assert client.get("/ready").status_code == 200
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    responses = schema["paths"]["/predict"]["post"]["responses"]
    assert {"200", "413", "422", "503"} <= set(responses)
    assert schema["paths"]["/predict_batch"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]


BAD_BODIES = {
    "one feature": b'{"features": [0.5]}',
    "three features": b'{"features": [0.5, 1, 2]}',
    "a string": b'{"features": ["0.5", 1]}',
    "a bool": b'{"features": [true, 1]}',
    "null": b'{"features": [null, 1]}',
    "NaN": b'{"features": [NaN, 1]}',
    "Infinity": b'{"features": [Infinity, 1]}',
    "-Infinity": b'{"features": [1, -Infinity]}',
    "overflows float": b'{"features": [1e400, 1]}',
    "beyond the limit": b'{"features": [1e7, 1]}',
    "extra field": b'{"features": [1, 2], "x": 1}',
    "no features": b"{}",
    "not an object": b"[1, 2]",
    "broken JSON": b'{"features": [1, 2',
    "empty body": b"",
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
@pytest.mark.parametrize("path", ["/predict", "/validate"])
def test_bad_input_gets_a_clear_422(client, path, name):
    response = client.post(
        path, content=BAD_BODIES[name], headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail and all("msg" in d and "loc" in d for d in detail)


def test_bad_batches_get_clear_4xx(client):
    too_many = client.post("/predict_batch", json={"items": [{"features": [1, 2]}] * 257})
    assert too_many.status_code == 422 and "at most 256" in too_many.text
    assert len(too_many.content) < 1000  # the oversized input is not echoed back
    assert client.post("/predict_batch", json={"items": []}).status_code == 422
    one_bad = client.post(
        "/predict_batch", json={"items": [{"features": [1, 2]}, {"features": [1]}]}
    )
    assert one_bad.status_code == 422 and one_bad.json()["detail"][0]["loc"][:3] == [
        "body",
        "items",
        1,
    ]


def test_body_over_the_limit_gets_413_declared_or_streamed(onnx_path):
    app = create_app(lambda: OnnxPredictor(onnx_path), ServiceSettings(max_body_bytes=100))
    padded = b'{"features": [1, 2]' + b" " * 200 + b"}"
    with TestClient(app) as c:
        declared = c.post("/predict", content=padded, headers={"content-type": "application/json"})
        streamed = c.post(
            "/predict",
            content=iter([padded[:50], padded[50:]]),
            headers={"content-type": "application/json"},
        )
        small = c.post(
            "/predict",
            content=iter([b'{"features": ', b"[1, 2]}"]),
            headers={"content-type": "application/json"},
        )
    assert declared.status_code == 413 and streamed.status_code == 413
    assert "100 bytes" in declared.json()["detail"]
    assert small.status_code == 200


def test_not_ready_before_the_model_is_loaded(onnx_path):
    c = TestClient(
        create_app(lambda: OnnxPredictor(onnx_path))
    )  # no `with`: the lifespan never ran
    assert c.get("/health").json() == {"status": "ok", "model_loaded": False}
    for response in (c.get("/ready"), c.post("/predict", json={"features": [1, 2]})):
        assert response.status_code == 503 and response.headers["retry-after"] == "1"


def test_torchscript_backend_agrees_with_onnx(exported, onnx_path):
    with TestClient(
        create_app(lambda: TorchScriptPredictor(exported["TorchScript script (.pt)"]))
    ) as c:
        body = c.post("/predict", json={"features": [0.5, -0.3]}).json()
    assert body["model_format"] == "TorchScript"
    np.testing.assert_allclose(
        body["probabilities"], _expected(onnx_path, [[0.5, -0.3]])[0], atol=1e-5
    )


def test_serving_imports_no_torch(onnx_path):
    code = (
        "import sys; from fastapi.testclient import TestClient\n"
        "from mldeploy.serving import create_app, OnnxPredictor\n"
        f"c = TestClient(create_app(lambda: OnnxPredictor({str(onnx_path)!r})))\n"
        "with c: assert c.post('/predict', json={'features': [0.5, -0.3]}).status_code == 200\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("freeze", [True, False])
def test_the_served_process_tunes_its_garbage_collector(onnx_path, freeze):
    # serve() as `python -m mldeploy.serving` calls it, stopped where uvicorn would start serving
    code = (
        "import gc\n"
        "from mldeploy.serving import server\n"
        "from mldeploy.serving.app import create_app_from_env\n"
        "def run(self, sockets):\n"
        "    print(gc.get_freeze_count(), len(gc.get_objects()), gc.get_threshold()[0])\n"
        "server.DrainingServer.run = run\n"
        "server.serve(create_app_from_env(), server.listen('127.0.0.1', 0))\n"
    )
    env = {**os.environ, "MLDEPLOY_MODEL": str(onnx_path), "MLDEPLOY_GC_FREEZE": str(int(freeze))}
    if not freeze:  # Python's defaults, as the benchmark's comparison runs them
        env["MLDEPLOY_GC_THRESHOLD"] = "700"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    frozen, tracked, threshold = map(int, proc.stdout.split())
    if freeze:  # tens of thousands frozen, next to nothing left for a full collection to scan
        assert frozen > 20_000 and tracked < frozen / 100
        assert threshold == ServiceSettings().gc_threshold > 700
    else:
        assert (frozen, threshold) == (0, 700)


async def _fire(url: str, points: np.ndarray) -> list[httpx.Response]:
    async with httpx.AsyncClient(
        base_url=url, timeout=30, limits=httpx.Limits(max_connections=len(points))
    ) as c:
        return await asyncio.gather(
            *(c.post("/predict", json={"features": p.tolist()}) for p in points)
        )


def _max_batch(metrics_text: str) -> float:
    """Largest batch-size bucket that saw a batch (the warm-up calls are not counted)."""
    samples = read_metrics(metrics_text)
    counts = {
        float(key.split('le="')[1].split('"')[0]): n
        for key, n in samples.items()
        if key.startswith("mldeploy_batch_size_bucket")
    }
    total = samples["mldeploy_batch_size_count"]
    return min(le for le, n in counts.items() if n == total)


def test_concurrent_requests_are_batched_and_equal_unbatched_answers(onnx_path):
    points = np.random.default_rng(0).uniform(-2, 2, size=(48, 2)).astype(np.float32)
    answers = {}
    for batching in (True, False):
        app = create_app(
            lambda: SlowPredictor(onnx_path), ServiceSettings(batching=batching, max_batch_size=16)
        )
        with BackgroundServer(app) as server:
            responses = asyncio.run(_fire(server.url, points))
            metrics = httpx.get(server.url + "/metrics").text
        assert [r.status_code for r in responses] == [200] * len(points)
        answers[batching] = np.array([r.json()["probabilities"] for r in responses])
        if batching:
            assert 1 < _max_batch(metrics) <= 16  # batches formed, and never beyond the maximum
    np.testing.assert_allclose(answers[True], _expected(onnx_path, points), atol=1e-5)
    np.testing.assert_allclose(answers[True], answers[False], atol=1e-5)


def test_overload_is_refused_with_503_and_retry_after(onnx_path):
    settings = ServiceSettings(max_batch_size=2, max_queue=4)
    app = create_app(lambda: SlowPredictor(onnx_path, delay=0.05), settings)
    points = np.random.default_rng(1).uniform(-2, 2, size=(40, 2)).astype(np.float32)
    with BackgroundServer(app) as server:
        responses = asyncio.run(_fire(server.url, points))
        metrics = httpx.get(server.url + "/metrics").text
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 503} and codes.count(200) >= 4
    expected = _expected(onnx_path, points)
    for r, e in zip(responses, expected):
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and "overloaded" in r.json()["detail"]
        else:
            np.testing.assert_allclose(r.json()["probabilities"], e, atol=1e-5)
    assert metric(metrics, "mldeploy_shed_total") == codes.count(503)


def test_access_log_writes_one_json_line_per_request(client):
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("mldeploy.access")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        client.post("/predict", json={"features": [0.5, -0.3]})
        client.post("/predict", json={"features": [0.5]})
        client.get("/nowhere")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = [json.loads(r) for r in records]
    assert [(d["path"], d["status"]) for d in lines] == [
        ("/predict", 200),
        ("/predict", 422),
        ("other", 404),
    ]
    assert lines[0]["batch_size"] == 1 and "batch_size" not in lines[1]
    assert all(d["latency_ms"] >= 0 and d["method"] in ("GET", "POST") for d in lines)


def test_metrics_count_requests_by_path_and_status(onnx_path):
    with TestClient(create_app(lambda: OnnxPredictor(onnx_path))) as c:
        for _ in range(3):
            c.post("/predict", json={"features": [1, 2]})
        c.post("/predict", json={"features": "x"})
        text = c.get("/metrics").text
    ok = {"method": "POST", "path": "/predict"}
    assert metric(text, "mldeploy_requests_total", **ok, status="200") == 3
    assert metric(text, "mldeploy_requests_total", **ok, status="422") == 1
    assert metric(text, "mldeploy_batch_size_count") == 3
    assert metric(text, "mldeploy_request_seconds_count", path="/predict") == 4


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not a holder
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_background_server_stops_and_frees_its_port(onnx_path):
    server = BackgroundServer(create_app(lambda: OnnxPredictor(onnx_path))).start()
    assert httpx.get(server.url + "/ready").status_code == 200
    server.stop()
    assert not server._thread.is_alive()
    assert _port_is_free(server.port)


def test_server_process_leaves_no_process_or_port(onnx_path):
    with BackgroundServer(env={"MLDEPLOY_MODEL": str(onnx_path)}) as server:
        pid, port = server.proc.pid, server.port
        assert httpx.post(server.url + "/predict", json={"features": [1, 2]}).status_code == 200
    assert server.proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert _port_is_free(port) and _port_is_free(server.admin_port)


def test_settings_read_every_knob_from_the_environment(monkeypatch):
    monkeypatch.setenv("MLDEPLOY_BATCHING", "false")
    monkeypatch.setenv("MLDEPLOY_MAX_WAIT_MS", "0.5")
    monkeypatch.setenv("MLDEPLOY_MAX_QUEUE", "7")
    settings = ServiceSettings(max_batch_size=4)  # arguments override the environment
    assert (settings.batching, settings.max_wait_ms, settings.max_queue) == (False, 0.5, 7)
    assert settings.max_batch_size == 4


def test_load_tools_refuse_other_hosts():
    with pytest.raises(ValueError, match="loopback"):
        loadgen.require_loopback("http://example.com/predict")


def test_bench_without_wrk_says_how_to_install_it(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "mldeploy.loadtest.bench"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert (
        proc.returncode == 2
        and "apt-get install -y wrk" in proc.stderr
        and "Traceback" not in proc.stderr
    )
    for seconds in ("1", "inf", "nan"):
        bad = subprocess.run(
            [sys.executable, "-m", "mldeploy.loadtest.bench", "--seconds", seconds],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2 and "between 3 and 600" in bad.stderr


def test_response_names_the_request(client):
    r = client.post("/predict", json={"features": [0.5, -0.3]}, headers={"x-request-id": "abc-1"})
    assert r.headers["x-request-id"] == "abc-1"
    other = client.post("/predict", json={"features": [0.5, -0.3]}, headers={"x-request-id": "<x>"})
    assert re.fullmatch("[0-9a-f]{16}", other.headers["x-request-id"])  # not echoed: a new id


def test_many_errors_are_all_reported(client):
    items = [{"features": [True, False]}] * 12
    response = client.post("/predict_batch", json={"items": items})
    assert response.status_code == 422
    assert len(response.json()["detail"]) == 24  # one per bad number, none summarised away


def test_a_model_that_cannot_load_stops_start_up_with_its_reason(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(RuntimeError, match="could not load the model"):
        with TestClient(create_app(lambda: OnnxPredictor(broken))):
            pass


def test_requests_never_leave_the_event_loop_except_for_the_model(onnx_path):
    """FastAPI runs a plain ``def`` endpoint or dependency in its thread pool: a hop to another
    thread and back on every request. Only the model may run off the loop (in its own thread)."""
    app = create_app(lambda: OnnxPredictor(onnx_path))
    sample = {"features": [0.5, -0.3]}
    before = set(threading.enumerate())
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url) as http:
        for _ in range(5):
            assert http.post("/predict", json=sample).status_code == 200
            assert http.post("/predict_batch", json={"items": [sample] * 3}).status_code == 200
            assert http.post("/validate", json=sample).status_code == 200
            for path in ("/health", "/ready", "/metrics"):
                assert http.get(path).status_code == 200
        pool = [t.name for t in set(threading.enumerate()) - before if "AnyIO" in t.name]
    assert pool == []
