"""Keep-alive clients get an answer in about a millisecond, not after a delayed ACK (~40 ms).

uvicorn writes a response's head and body in two writes; on a connection without ``TCP_NODELAY``
Nagle's algorithm holds the body until the client acknowledges the head, and Linux clients delay
that ACK by about 40 ms. These tests use the clients people use, each reusing one connection,
against the real server: in a thread (``BackgroundServer(app)``) and as ``python -m
mldeploy.serving`` in a child process. A median of 20 requests under 15 ms holds on a busy
machine and fails at the delayed-ACK floor.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

import httpx
import pytest
import requests

from mldeploy import settings
from mldeploy.loadtest import loadgen
from mldeploy.serving import BackgroundServer, OnnxPredictor, create_app
from mldeploy.serving.server import listen

BODY = json.dumps({"features": [0.5, -0.3]})
N = 20
BOUND_MS = 15.0
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def onnx_path(exported):
    return exported["ONNX (.onnx)"]


@pytest.fixture(scope="module", params=["thread", "process"])
def server(request, onnx_path):
    if request.param == "thread":
        background = BackgroundServer(create_app(lambda: OnnxPredictor(onnx_path)))
    else:
        background = BackgroundServer(env={"MLDEPLOY_MODEL": str(onnx_path)})
    with background:
        yield background


def _median_ms(call) -> float:
    call()  # the connection opens here; the timed requests reuse it
    times = []
    for _ in range(N):
        start = time.perf_counter()
        call()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def test_httpx_client(server):
    with httpx.Client(base_url=server.url) as client:

        def call() -> None:
            client.post("/predict", content=BODY, headers=JSON).raise_for_status()

        assert _median_ms(call) < BOUND_MS


def test_requests_session(server):
    with requests.Session() as session:

        def call() -> None:
            session.post(f"{server.url}/predict", data=BODY, headers=JSON).raise_for_status()

        assert _median_ms(call) < BOUND_MS


def test_http_client(server):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)

    def call() -> None:
        conn.request("POST", "/predict", body=BODY, headers=JSON)
        response = conn.getresponse()
        response.read()
        assert response.status == 200

    try:
        assert _median_ms(call) < BOUND_MS
    finally:
        conn.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_reusing_one_connection(server):
    # one curl invocation, N + 1 URLs (--next resets the options): curl keeps one connection open
    args = ["curl", "-s"]
    for _ in range(N + 1):
        args += ["-o", "/dev/null", "-H", "Content-Type: application/json", "-d", BODY]
        args += ["-w", "%{http_code} %{time_total} %{num_connects}\\n", f"{server.url}/predict"]
        args.append("--next")
    out = subprocess.run(args[:-1], capture_output=True, text=True, timeout=60, check=True)
    rows = [line.split() for line in out.stdout.split("\n") if line]
    assert len(rows) == N + 1
    assert [code for code, _, _ in rows] == ["200"] * (N + 1)
    assert [int(connects) for _, _, connects in rows[1:]] == [0] * N  # one connection, reused
    assert statistics.median(1e3 * float(seconds) for _, seconds, _ in rows[1:]) < BOUND_MS


def test_listening_sockets_are_tcp():
    sock = listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_make_serve_command_answers_keep_alive_clients_fast(onnx_path):
    # the command `make serve` and the image run, on ports it binds itself
    port, admin = listen("127.0.0.1", 0), listen("127.0.0.1", 0)
    ports = [str(s.getsockname()[1]) for s in (port, admin)]
    port.close(), admin.close()
    cmd = [sys.executable, "-m", "mldeploy.serving", "--host", "127.0.0.1"]
    cmd += ["--port", ports[0], "--admin-port", ports[1]]
    env = {**os.environ, "MLDEPLOY_MODEL": str(onnx_path)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{ports[0]}", timeout=10) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.post("/predict", content=BODY, headers=JSON).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)

            def call() -> None:
                client.post("/predict", content=BODY, headers=JSON).raise_for_status()

            assert _median_ms(call) < BOUND_MS
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_benchmark_measures_every_keep_alive_client(server):
    medians = loadgen.keepalive_medians(server.url + "/predict", BODY, n=N)
    expected = {"httpx.Client", "requests.Session", "http.client"}
    assert expected | ({"curl"} if shutil.which("curl") else set()) == set(medians)
    assert all(ms < BOUND_MS for ms in medians.values()), medians


def test_chromium_fetch_reusing_one_connection(server):
    chromium = "/usr/bin/chromium"
    if not os.path.exists(chromium):
        message = f"{chromium} is missing: apt-get install -y chromium (.ci/run does it)"
        if settings.tools().ci:
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    timing = """async ([n, body]) => {
        const post = () => fetch("/predict", {method: "POST", body,
            headers: {"Content-Type": "application/json"}}).then(r => r.json());
        await post();  // the connection opens here; the timed requests reuse it
        const times = [];
        for (let i = 0; i < n; i++) {
            const start = performance.now();
            await post();
            times.push(performance.now() - start);
        }
        return times.sort((a, b) => a - b)[Math.floor(n / 2)];
    }"""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            page.goto(server.url + "/health")  # a page of the service's origin: same-origin fetch
            median = page.evaluate(timing, [N, BODY])
        finally:
            browser.close()
    assert median < BOUND_MS, f"chromium fetch median {median:.1f} ms"
