"""The service under hostile clients, faults and shutdown: slow and idle connections are closed,
the connection cap refuses fast, floods are shed, server faults are 500s with a request id and
the worker carries on, deadlines hold, SIGTERM drains without resetting a request, and every bad
setting stops start-up with one line. Loopback only, free ports, every server stopped."""

import asyncio
import fcntl
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import httptools
import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mldeploy.loadtest import loadgen
from mldeploy.loadtest.scrape import metric
from mldeploy.serving import (
    BackgroundServer,
    DelayedPredictor,
    OnnxPredictor,
    ServiceSettings,
    create_app,
    hardening,
)
from mldeploy.serving.hardening import whole_request
from mldeploy.serving.server import _connection_waits

SAMPLE = {"features": [0.5, -0.3]}


@pytest.fixture(scope="module")
def onnx_path(exported):
    return exported["ONNX (.onnx)"]


class FlakyPredictor:
    """The real model, failing on demand with an internal message that must not reach clients."""

    def __init__(self, path, delay: float = 0.0):
        self.inner, self.delay = OnnxPredictor(path), delay
        self.model_format, self.n_features = "ONNX", 2
        self.fail, self.calls = False, 0

    def predict_proba(self, x):
        self.calls += 1
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : internal detail")
        return self.inner.predict_proba(x)


def test_slow_and_silent_clients_are_closed_within_the_timeout(onnx_path, scaled):
    settings = ServiceSettings(header_timeout_s=1.0)
    with BackgroundServer(create_app(lambda: OnnxPredictor(onnx_path), settings)) as server:
        result = asyncio.run(
            loadgen.slow_clients(server.url, dripping=10, silent=5, seconds=1 + scaled(4))
        )
        # the server still serves everyone else
        assert httpx.post(server.url + "/predict", json=SAMPLE).status_code == 200
        text = httpx.get(server.admin_url + "/metrics").text
    assert result.still_open == 0 and result.closed_within(1.0 + scaled(1.5)), result
    assert min(result.dripping + result.silent) >= 0.9  # not before the timeout either
    assert metric(text, "mldeploy_connections_timed_out_total") == 15


def test_connections_over_the_cap_are_refused_at_once(onnx_path):
    settings = ServiceSettings(max_connections=4)
    with BackgroundServer(create_app(lambda: OnnxPredictor(onnx_path), settings)) as server:
        held = [socket.create_connection((server.host, server.port)) for _ in range(4)]
        try:
            time.sleep(0.2)
            with socket.create_connection((server.host, server.port), timeout=5) as extra:
                start = time.perf_counter()
                answer = extra.recv(4096)  # the refusal comes before the client sends anything
                waited = time.perf_counter() - start
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)
        ok = httpx.post(server.url + "/predict", json=SAMPLE)  # room again
        text = httpx.get(server.admin_url + "/metrics").text
    assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer
    assert waited < 1.0 and ok.status_code == 200
    assert metric(text, "mldeploy_connections_refused_total") == 1


async def _flood(url: str, batch_clients: int, single_clients: int) -> tuple[list, list]:
    items = {"items": [SAMPLE] * 64}
    async with httpx.AsyncClient(
        base_url=url, timeout=60, limits=httpx.Limits(max_connections=200)
    ) as c:
        batches = [c.post("/predict_batch", json=items) for _ in range(batch_clients)]
        singles = [c.post("/predict", json=SAMPLE) for _ in range(single_clients)]
        answers = await asyncio.gather(*batches, *singles)
    return list(answers[:batch_clients]), list(answers[batch_clients:])


class GatedPredictor:
    """The real model, held at a gate while ``hold`` is set: a test decides when it answers."""

    def __init__(self, path):
        self.inner, self.model_format, self.n_features = OnnxPredictor(path), "ONNX", 2
        self.hold, self.gate = threading.Event(), threading.Event()

    def predict_proba(self, x):
        if self.hold.is_set():
            self.gate.wait(30)
        return self.inner.predict_proba(x)


BODY = b'{"features": [0.5, -0.3]}'
REQUEST = (
    b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


class Responses:
    """Reads HTTP/1.1 responses off a socket one at a time, each to its Content-Length."""

    def __init__(self, sock: socket.socket):
        self.sock, self.data = sock, b""

    def _fill(self, enough) -> None:
        while not enough():
            chunk = self.sock.recv(65536)
            assert chunk, f"closed by the server after {self.data!r}"
            self.data += chunk

    def next(self) -> tuple[int, bytes, bytes]:
        """(status, head in lower case, body)."""
        self._fill(lambda: b"\r\n\r\n" in self.data)
        head, _, rest = self.data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        self.data = rest
        self._fill(lambda: len(self.data) >= length)
        body, self.data = self.data[:length], self.data[length:]
        return int(head.split()[1]), head.lower(), body


@pytest.mark.parametrize("how", ["whole", "split", "pipelined"])
def test_past_the_admission_limit_requests_are_refused_in_order_on_a_live_connection(
    onnx_path, how
):
    """/predict admits max_queue + max_batch_size requests at once (2 here); the next gets a 503
    with Retry-After, whether it came in one read (refused at the door, before uvicorn parses it),
    in pieces or pipelined (refused before the app). Answers keep their order, the keep-alive
    connection outlives the idle timeout while it is refused, and no slot leaks."""
    model = GatedPredictor(onnx_path)
    settings = ServiceSettings(max_queue=1, max_batch_size=1, header_timeout_s=1.0, keep_alive_s=1)
    app = create_app(lambda: model, settings)
    with (
        BackgroundServer(app) as server,
        socket.create_connection((server.host, server.port), timeout=10) as sock,
    ):
        responses = Responses(sock)
        sock.sendall(REQUEST)
        assert responses.next()[0] == 200  # a keep-alive connection, answered once
        model.hold.set()
        pool = ThreadPoolExecutor(2)
        held = [pool.submit(httpx.post, server.url + "/predict", json=SAMPLE, timeout=30)]
        time.sleep(0.3)  # the first is in the model: the second waits in the queue
        held.append(pool.submit(httpx.post, server.url + "/predict", json=SAMPLE, timeout=30))
        time.sleep(0.3)
        statuses = []
        for _ in range(6):  # 6 × 0.3 s: longer than the 1 s idle timeout
            if how == "split":
                sock.sendall(REQUEST[:40])
                time.sleep(0.05)
                sock.sendall(REQUEST[40:])
            else:
                sock.sendall(REQUEST * (2 if how == "pipelined" else 1))
            for _ in range(2 if how == "pipelined" else 1):
                status, head, body = responses.next()
                assert status == 503 and b"retry-after: 1" in head, head
                assert json.loads(body) == {"detail": "server overloaded (queue full); retry later"}
                statuses.append(status)
            time.sleep(0.3)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")  # probes are not limited
        assert responses.next()[0] == 200
        model.gate.set()
        assert [f.result().status_code for f in held] == [200, 200]
        sock.sendall(REQUEST)  # room again, on the same connection
        assert responses.next()[0] == 200
        metrics = httpx.get(server.admin_url + "/metrics").text
        time.sleep(0.2)
        assert app.state.service.admission.inflight == {"/predict": 0, "/predict_batch": 0}
    assert metric(metrics, "mldeploy_shed_total") == len(statuses)


UPGRADE = (
    b"GET /predict HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_a_websocket_upgrade_is_answered_as_http_and_leaks_nothing(onnx_path):
    """An upgraded connection would leave the guard: its admission slot and its place under the
    connection cap would never be given back. The service has no WebSockets: it answers as HTTP."""
    settings = ServiceSettings(max_queue=1, max_batch_size=1, max_connections=3)
    app = create_app(lambda: OnnxPredictor(onnx_path), settings)
    with BackgroundServer(app) as server:
        for _ in range(6):  # more than the admission limit (2) and the connection cap (3)
            with socket.create_connection((server.host, server.port), timeout=10) as sock:
                sock.sendall(UPGRADE)
                assert Responses(sock).next()[0] == 405  # GET /predict, as plain HTTP
        time.sleep(0.2)
        assert app.state.service.admission.inflight["/predict"] == 0
        assert httpx.post(server.url + "/predict", json=SAMPLE, timeout=10).status_code == 200


def _random_request(rng: random.Random) -> bytes:
    """A request with a random method, target, version, headers and body; sometimes a bare LF
    or a folded line in its head, sometimes cut short or sent twice."""
    body = rng.choice([b"", BODY, b"x" * rng.randint(1, 40)])
    length = rng.choice([b"%d" % len(body)] * 3 + [b"%d" % (len(body) + 1), b"+%d" % len(body)])
    heads = [b"Host: t"] + ([b"Content-Length: " + length] if rng.random() < 0.9 else [])
    for extra in (
        b"Content-Length: 3", b"Content-Length : 3", b"Transfer-Encoding: chunked", b"X-A: b",
        b"Connection: close", b"Connection: keep-alive", b"Expect: 100-continue",
        b"Connection: Upgrade\r\nUpgrade: websocket",
    ):  # fmt: skip
        if rng.random() < 0.12:
            heads.insert(rng.randrange(len(heads) + 1), extra)
    method = rng.choice([b"GET", b"POST", b"HEAD", b"OPTIONS"])
    target = rng.choice(
        [b"/predict", b"/predict?x=1", b"/predict#f", b"http://h/predict", b"*", b"/%70redict"]
        + [b"//predict", b"/predict/", b"/health", b"/predict?a#b"]
    )
    version = rng.choice([b"HTTP/1.1"] * 4 + [b"HTTP/1.0", b"http/1.1"])
    lines = [b"%s %s %s" % (method, target, version), *heads]
    if rng.random() < 0.15:  # a folded header line
        k = rng.randrange(1, len(lines))
        lines[k] = b" " + lines[k]
    ends = [rng.choice([b"\r\n"] * 6 + [b"\n"]) for _ in lines]
    data = b"".join(line + end for line, end in zip(lines, ends)) + b"\r\n" + body
    cut = rng.random()
    return data[: rng.randrange(len(data))] if cut < 0.1 else data * 2 if cut < 0.2 else data


def _uvicorn_reads(data: bytes) -> tuple[str | None, int] | None:
    """(path, whole requests) as uvicorn's parser (httptools) reads ``data``; None if it refuses."""
    seen = {"url": b"", "done": 0}
    callbacks = types.SimpleNamespace(
        on_url=lambda url: seen.update(url=seen["url"] + url),
        on_message_complete=lambda: seen.update(done=seen["done"] + 1),
    )
    try:
        httptools.HttpRequestParser(callbacks).feed_data(data)
    except httptools.HttpParserUpgrade:
        pass  # the service answers it as plain HTTP (ws="none")
    except httptools.HttpParserError:
        return None  # uvicorn answers 400 and closes: an admitted slot is given back
    path = httptools.parse_url(seen["url"]).path.decode("latin-1") if seen["url"] else None
    return path, seen["done"]


def test_the_door_reads_a_request_as_uvicorn_does():
    """Whenever the door takes bytes for one whole request to a path, uvicorn's parser reads
    exactly one request there, to that path (or refuses the bytes outright)."""
    rng, admitted = random.Random(0), 0
    for _ in range(5000):
        data = _random_request(rng)
        path = whole_request(data)
        if path is None:
            continue
        admitted += 1
        uvicorn = _uvicorn_reads(data)
        assert uvicorn in (None, (path, 1)), (data, path, uvicorn)
    assert admitted > 200  # the generator does reach the door's yes


def test_a_request_the_door_misreads_is_counted_under_the_path_uvicorn_routes(
    onnx_path, monkeypatch
):
    """Whatever path the door reads, a request is counted under the one uvicorn routes."""
    monkeypatch.setattr(hardening, "whole_request", lambda data: "/elsewhere")
    model = GatedPredictor(onnx_path)
    app = create_app(lambda: model, ServiceSettings(max_queue=1, max_batch_size=1))
    admission = app.state.service.admission
    with BackgroundServer(app) as server, ThreadPoolExecutor(2) as pool:
        model.hold.set()
        post = lambda: httpx.post(server.url + "/predict", json=SAMPLE, timeout=30)  # noqa: E731
        held = [pool.submit(post)]
        time.sleep(0.3)
        held.append(pool.submit(post))
        time.sleep(0.3)
        assert admission.inflight["/predict"] == 2  # read as /elsewhere, counted as /predict
        assert post().status_code == 503
        model.gate.set()
        assert [f.result().status_code for f in held] == [200, 200]
        time.sleep(0.2)
        assert admission.inflight["/predict"] == 0


@pytest.mark.parametrize(("batching", "admitted"), [(True, 64 + 32), (False, 64 + 1)])
def test_predict_admits_what_the_batcher_can_hold(onnx_path, batching, admitted):
    """A full queue plus the batch being computed: one sample at a time without batching."""
    app = create_app(lambda: OnnxPredictor(onnx_path), ServiceSettings(batching=batching))
    assert app.state.service.admission.limits["/predict"] == admitted


def test_a_request_sent_before_the_previous_answer_is_answered_after_it(onnx_path):
    """A client that sends its next request while the previous one is being served (pipelining
    over two writes) gets its answers in order: the door must not answer the second first."""
    model = GatedPredictor(onnx_path)
    app = create_app(lambda: model, ServiceSettings(max_queue=1, max_batch_size=1))
    with BackgroundServer(app) as server:
        model.hold.set()
        pool = ThreadPoolExecutor(1)
        held = pool.submit(httpx.post, server.url + "/predict", json=SAMPLE, timeout=30)
        time.sleep(0.3)  # one request in the model: room for one more
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(REQUEST)  # admitted: it waits for the model
            time.sleep(0.3)
            sock.sendall(REQUEST)  # over the limit now, but its answer must come second
            threading.Timer(0.5, model.gate.set).start()
            responses = Responses(sock)
            first, second = responses.next()[0], responses.next()[0]
        assert held.result().status_code == 200
    assert first == 200 and second in (200, 503)  # the second ran once the first had finished


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (REQUEST, "/predict"),
        (b"GET /health?x=1 HTTP/1.1\r\nHost: t\r\n\r\n", "/health"),
        (REQUEST[:-1], None),  # body not all here
        (REQUEST[:30], None),  # head not all here
        (REQUEST + REQUEST, None),  # pipelined
        (REQUEST.replace(b"HTTP/1.1", b"HTTP/1.0"), None),
        (REQUEST.replace(b"Host: t", b"Transfer-Encoding: chunked"), None),
        (REQUEST.replace(b"Host: t", b"Expect: 100-continue"), None),
        (REQUEST.replace(b"Host: t", b"Connection: close"), None),
        (REQUEST.replace(b"Host: t", b"Content-Length: 25"), None),  # two lengths
        (REQUEST.replace(b"Host: t", b"Connection: keep-alive"), "/predict"),
        (REQUEST.replace(b"/predict", b"/%70redict"), None),  # uvicorn decodes it to /predict
        (REQUEST.replace(b"/predict", b"http://t/predict"), None),  # uvicorn routes /predict
        (b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n", None),
        (REQUEST.replace(b"/predict", b"/predict#x"), "/predict"),  # the fragment is no path
    ],
)
def test_the_door_acts_only_on_one_whole_plain_request(data, path):
    assert whole_request(data) == path


def test_a_batch_flood_is_shed_and_predict_is_still_answered(onnx_path):
    settings = ServiceSettings(max_batch_jobs=2)
    app = create_app(lambda: DelayedPredictor(OnnxPredictor(onnx_path), 0.05), settings)
    with BackgroundServer(app) as server:
        batches, singles = asyncio.run(_flood(server.url, batch_clients=40, single_clients=10))
    codes = [r.status_code for r in batches]
    assert set(codes) == {200, 503} and codes.count(503) >= 20, codes
    assert all(r.headers["retry-after"] == "1" for r in batches if r.status_code == 503)
    assert [r.status_code for r in singles] == [200] * 10


def test_a_model_fault_is_a_500_with_a_request_id_on_every_path_and_the_worker_carries_on(
    onnx_path, caplog
):
    answers = {}
    for batching in (True, False):
        model = FlakyPredictor(onnx_path)
        app = create_app(lambda m=model: m, ServiceSettings(batching=batching))
        with BackgroundServer(app) as server, httpx.Client(base_url=server.url) as client:
            model.fail = True
            answers[batching, "/predict"] = client.post("/predict", json=SAMPLE)
            answers[batching, "/predict_batch"] = client.post(
                "/predict_batch", json={"items": [SAMPLE] * 3}
            )
            model.fail = False
            after = client.post("/predict", json=SAMPLE)
            health = httpx.get(server.admin_url + "/health")
            text = httpx.get(server.admin_url + "/metrics").text
        assert after.status_code == 200 and health.status_code == 200
        assert metric(text, "mldeploy_model_errors_total") == 2
    details = {r.json()["detail"] for r in answers.values()}
    assert {r.status_code for r in answers.values()} == {500} and len(details) == 1
    for r in answers.values():
        assert "ONNXRuntimeError" not in r.text and "Traceback" not in r.text
        assert r.json()["request_id"] == r.headers["x-request-id"]
    logged = caplog.text
    assert all(r.json()["request_id"] in logged for r in answers.values())
    assert "internal detail" in logged  # the details are in the server's log


class NanPredictor(FlakyPredictor):
    """The real model, whose output turns to NaN on demand (a model that diverged or overflowed)."""

    def predict_proba(self, x):
        proba = np.array(super().predict_proba(x), dtype=np.float32)
        if self.nan:
            proba[:] = np.nan
        return proba


def test_a_non_finite_output_is_a_500_on_both_paths_never_a_nan_in_the_body(onnx_path):
    model = NanPredictor(onnx_path)
    model.nan = False
    with BackgroundServer(create_app(lambda: model)) as server:
        with httpx.Client(base_url=server.url) as client:
            model.nan = True
            one = client.post("/predict", json=SAMPLE)
            batch = client.post("/predict_batch", json={"items": [SAMPLE] * 3})
            model.nan = False
            after = client.post("/predict_batch", json={"items": [SAMPLE] * 3})
    for r in (one, batch):
        assert r.status_code == 500, r.text
        assert "nan" not in r.text.lower() and r.json()["request_id"]
    assert after.status_code == 200 and len(after.json()["predictions"]) == 3


def test_a_request_past_its_deadline_gets_504(onnx_path, scaled):
    settings = ServiceSettings(request_timeout_s=0.2)
    model = FlakyPredictor(onnx_path)
    with BackgroundServer(create_app(lambda: model, settings)) as server:
        model.delay = 2.0  # slow from now on (not during the warm-up)
        start = time.perf_counter()
        r = httpx.post(server.url + "/predict", json=SAMPLE, timeout=10)
        waited = time.perf_counter() - start
        text = httpx.get(server.admin_url + "/metrics").text
    assert r.status_code == 504 and r.headers["retry-after"] == "1"
    assert waited < 0.2 + scaled(1.5)  # answered at its deadline, not after the 2 s model call
    assert metric(text, "mldeploy_timed_out_total") == 1


def _wait_for(condition, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds:.0f} s for {what}"
        time.sleep(0.01)


def test_work_for_a_client_that_left_is_not_computed(onnx_path):
    model, gate, entered = FlakyPredictor(onnx_path), threading.Event(), []
    inner = model.predict_proba

    def busy_until_the_gate_opens(x):
        entered.append(len(x))
        gate.wait(30)
        return inner(x)

    model.predict_proba = busy_until_the_gate_opens
    app = create_app(lambda: model, ServiceSettings(max_batch_size=1, max_wait_ms=0))
    gate.set()  # warm-up calls pass
    with BackgroundServer(app) as server:
        calls_before, entered_before = model.calls, len(entered)
        gate.clear()
        busy = threading.Thread(
            target=httpx.post, args=(server.url + "/predict",), kwargs={"json": SAMPLE}
        )
        busy.start()
        _wait_for(lambda: len(entered) > entered_before, "the model to take the first request")

        def queued() -> float:
            return metric(httpx.get(server.admin_url + "/metrics").text, "mldeploy_queue_depth")

        body = b'{"features": [1.0, 2.0]}'
        with socket.create_connection((server.host, server.port)) as gone:
            gone.sendall(loadgen.http_request(server.url + "/predict", body))
            _wait_for(lambda: queued() == 1, "the second request to wait behind the first")
        time.sleep(0.3)  # the client has left; the server sees the closed connection
        gate.set()
        busy.join()
        _wait_for(lambda: queued() == 0, "the queue to empty")
        text = httpx.get(server.admin_url + "/metrics").text
    assert model.calls - calls_before == 1
    assert metric(text, "mldeploy_abandoned_total") == 1


def test_sigterm_under_load_drains_without_resetting_a_request(onnx_path, scaled):
    env = {"MLDEPLOY_MODEL": str(onnx_path), "MLDEPLOY_DRAIN_S": "1.5"}
    with BackgroundServer(env=env) as server:
        result = asyncio.run(
            loadgen.drain_under_load(server, b'{"features": [0.5, -0.3]}', clients=16)
        )
        code = server.proc.wait(timeout=scaled(30))
    assert result.reset == 0 and set(result.statuses) == {200}, result
    assert result.ready_503_after is not None and result.ready_503_after < scaled(0.5)
    # traffic flowed during the drain, then the listener closed, then the process exited
    assert result.answered_in_drain > 0 and result.newcomers_served > 0
    assert result.moved == 16  # every keep-alive client was told to reconnect elsewhere
    assert 1.4 <= result.listener_closed_after < 1.5 + scaled(2)
    assert result.exited_after is not None and result.exited_after < 1.5 + scaled(10)
    assert code == 0


def test_a_connection_queued_while_the_server_stalls_at_the_end_of_its_drain_is_answered(
    onnx_path, scaled
):
    # the process is stopped across the end of its drain period (a stall: CPU starvation, a
    # long pause); meanwhile the kernel queues a new connection on the listener. Closing the
    # listener at once would reset it: the server must accept it and answer it first
    env = {"MLDEPLOY_MODEL": str(onnx_path), "MLDEPLOY_DRAIN_S": "0.6"}
    request = loadgen.http_request("http://x/predict", b'{"features": [0.5, -0.3]}')
    with BackgroundServer(env=env) as server:
        server.terminate()
        time.sleep(0.3)
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(0.6)  # past the end of the drain
            client = socket.create_connection((server.host, server.port), timeout=scaled(10))
            client.sendall(request)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        with client:
            answer = client.recv(4096)
        assert server.proc.wait(timeout=scaled(30)) == 0
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"connection: close" in answer.lower()


def test_the_drain_sees_a_queued_connection_on_a_listener_of_any_descriptor_number():
    # a process with many connections open can hold its listener above select's limit of 1,024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2100:
        pytest.skip(f"the descriptor limit ({hard}) is below the number this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2100), hard))
    try:
        with socket.create_server(("127.0.0.1", 0)) as sock:
            # the lowest free descriptor from 2048 on (dup2 would close one in use)
            listener = socket.socket(fileno=fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD, 2048))
            assert listener.fileno() >= 2048
            with listener, socket.create_connection(listener.getsockname()):
                _wait_for(lambda: _connection_waits(listener), "the connection to be queued")
                listener.accept()[0].close()
                assert not _connection_waits(listener)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _five_input_model(path) -> str:
    inputs = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, ["n", 2]) for i in range(5)]
    node = helper.make_node("Sum", [f"x{i}" for i in range(5)], ["y"])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])
    model = helper.make_model(
        helper.make_graph([node], "five", inputs, [out]),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    onnx.save(model, path)
    return str(path)


def _wrong_output_model(path) -> str:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    node = helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)
    model = helper.make_model(
        helper.make_graph([node], "flat", [x], [y]), opset_imports=[helper.make_opsetid("", 18)]
    )
    onnx.save(model, path)
    return str(path)


@pytest.mark.parametrize(
    "env, args, message",
    [
        ({"MLDEPLOY_BACKEND": "tensorflow"}, [], "MLDEPLOY_BACKEND='tensorflow': Input should be"),
        ({"MLDEPLOY_MODEL": "/nonexistent/model.onnx"}, [], "no model file"),
        ({"MLDEPLOY_MAX_QUEUE": "lots"}, [], "MLDEPLOY_MAX_QUEUE='lots': Input should be a valid"),
        (
            {"MLDEPLOY_MAX_BATCH_SIZE": "0"},
            [],
            "MLDEPLOY_MAX_BATCH_SIZE='0': Input should be greater",
        ),
        ({"MLDEPLOY_BATCHING": "maybe"}, [], "MLDEPLOY_BATCHING='maybe': Input should be a valid"),
        (
            {"MLDEPLOY_MAX_WAIT_MS": "inf"},
            [],
            "MLDEPLOY_MAX_WAIT_MS='inf': Input should be a finite",
        ),
        ({"MLDEPLOY_REQUEST_TIMEOUT_S": "nan"}, [], "MLDEPLOY_REQUEST_TIMEOUT_S='nan'"),
        ({}, ["--port", "99999"], "--port='99999': Input should be less than or equal"),
        ({}, ["--port", "9100", "--admin-port", "9100"], "MLDEPLOY_PORT and MLDEPLOY_ADMIN_PORT"),
        ({"MLDEPLOY_MODEL": "five"}, [], "the model has 5 inputs"),
        ({"MLDEPLOY_MODEL": "flat"}, [], "for 1 samples it returned shape"),
        ({"MLDEPLOY_MODEL": "garbage"}, [], "could not load the model"),
    ],
)
def test_bad_settings_stop_start_up_with_one_line(onnx_path, tmp_path, env, args, message):
    models = {
        "five": lambda: _five_input_model(tmp_path / "five.onnx"),
        "flat": lambda: _wrong_output_model(tmp_path / "flat.onnx"),
        "garbage": lambda: (
            (tmp_path / "g.onnx").write_bytes(b"not a model") and str(tmp_path / "g.onnx")
        ),
    }
    model = env.get("MLDEPLOY_MODEL", str(onnx_path))
    full = {**env, "MLDEPLOY_MODEL": models[model]() if model in models else model}
    proc = subprocess.run(
        [sys.executable, "-m", "mldeploy.serving", "--port", "0", "--admin-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, **full},
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert message in lines[0] and "Traceback" not in proc.stderr


def test_probes_are_on_the_admin_port_and_ready_waits_for_the_warm_up(onnx_path):
    loading, loaded = threading.Event(), threading.Event()

    def slow_load():  # loading until the test has asked both probes
        loading.set()
        loaded.wait(30)
        return OnnxPredictor(onnx_path)

    server = BackgroundServer(create_app(slow_load))
    runner = threading.Thread(target=server.start)
    runner.start()
    try:
        loading.wait(10)
        cold = httpx.get(server.admin_url + "/ready")
        health = httpx.get(server.admin_url + "/health")
        loaded.set()
        runner.join()
        warm = httpx.get(server.admin_url + "/ready")
        # two listeners: inference on the API port only, probes on the admin port
        on_api = httpx.post(server.url + "/predict", json=SAMPLE)
        on_admin = httpx.get(server.admin_url + "/predict")
    finally:
        runner.join()
        server.stop()
    assert cold.status_code == 503 and cold.headers["retry-after"] == "1"
    assert health.json() == {"status": "ok", "model_loaded": False}
    assert warm.status_code == 200 and warm.json() == {"ready": True}
    assert on_api.status_code == 200 and on_admin.status_code == 404
