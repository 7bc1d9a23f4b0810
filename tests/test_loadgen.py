"""The course's load generator: wrk paced to a fixed rate (open loop) and honoring Retry-After,
the Python client with backoff and jitter, against tiny stand-in servers, and the per-thread
CPU reading that says which thread bounds a server."""

from __future__ import annotations

import asyncio
import http.server
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from mldeploy.loadtest import bench, cpu, loadgen
from mldeploy.loadtest.cpu import loop_and_worker_cores

needs_wrk = pytest.mark.skipif(not loadgen.have_wrk(), reason="wrk is not installed")


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Answers every POST with 503 and ``Retry-After: 1``, or 200 once ``refusals`` are spent."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are two writes: no 40 ms delayed-ACK wait
    refusals = 10**9
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        with self.lock:
            type(self).refusals -= 1
            refused = type(self).refusals >= 0
        self.send_response(503 if refused else 200)
        if refused:
            self.send_header("Retry-After", "1")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 would leave wrk's connections waiting on SYN retries

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # wrk resets when it stops
            super().handle_error(request, client_address)


@pytest.fixture()
def refusing():
    handler = type("Handler", (_Refusing,), {"refusals": 10**9})
    server = _Server(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


@needs_wrk
@pytest.mark.parametrize("rate", [50, 200])
def test_paced_wrk_offers_the_rate_asked(refusing, rate):
    url, _ = refusing
    result = loadgen.run_wrk(url + "/x", connections=8, seconds=3, body="{}", rate=rate)
    assert 0.9 * rate <= result.requests / result.seconds <= 1.1 * rate


@needs_wrk
def test_wrk_honors_retry_after_and_plain_wrk_does_not(refusing):
    url, _ = refusing
    polite = loadgen.run_wrk(url + "/x", connections=4, seconds=3, body="{}", retry_after=True)
    rude = loadgen.run_wrk(url + "/x", connections=4, seconds=3, body="{}")
    # each connection waits 0.5–1.5 s after every refusal: at most 1 + 3 / 0.5 requests in 3 s
    assert polite.codes == {503: polite.requests} and polite.requests <= 4 * 7
    assert rude.requests > 20 * polite.requests


def test_post_with_retries_backs_off_with_jitter_then_succeeds(refusing, monkeypatch):
    url, handler = refusing
    handler.refusals = 2
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(base_url=url) as client:
            monkeypatch.setattr(loadgen.asyncio, "sleep", fake_sleep)
            return await loadgen.post_with_retries(client, "/x", {}, rng=random.Random(0))

    answer = asyncio.run(run())
    assert answer.status_code == 200
    assert len(waits) == 2 and 0.5 <= waits[0] < 1.5 and 1.0 <= waits[1] < 3.0  # doubled
    assert waits[1] / waits[0] != 2.0  # jittered, not a fixed schedule


def test_post_with_retries_gives_up_after_its_tries(refusing):
    url, _ = refusing

    async def run() -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(base_url=url) as client:
            start = time.perf_counter()
            answer = await loadgen.post_with_retries(client, "/x", {}, tries=1)
            return answer, time.perf_counter() - start

    answer, seconds = asyncio.run(run())
    assert answer.status_code == 503 and seconds < 0.5  # no wait after the last try


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:  # CPU time, so a crowded machine still spins this long
        pass


@pytest.mark.parametrize("busy", ["loop", "worker"])
def test_the_busy_thread_is_the_one_reported_busy(busy):
    """The benchmark names the thread that bounds throughput: the main thread (the event loop) or
    another (the model worker). Spin one of them, let the other wait, and read both."""
    done, finish = threading.Event(), threading.Event()

    def work() -> None:  # stays alive until read: /proc forgets a thread once it ends
        _spin(0.4) if busy == "worker" else time.sleep(0.4)
        done.set()
        finish.wait()

    worker = threading.Thread(target=work)
    with loop_and_worker_cores(os.getpid()) as cores:
        worker.start()
        if busy == "loop":
            _spin(0.4)
        done.wait()
    finish.set()
    worker.join()
    idle = "worker" if busy == "loop" else "loop"
    assert cores[busy] >= 0.2, cores
    assert cores[idle] <= 0.05, cores


def test_without_proc_the_split_is_empty_not_an_error(monkeypatch):
    """macOS has no /proc: the benchmark prints "n/a" instead of failing."""
    missing = cpu.Path("/nonexistent/proc/task")
    monkeypatch.setattr(cpu, "Path", lambda _: missing)
    assert cpu.thread_cpu_seconds(os.getpid()) == {}
    with loop_and_worker_cores(os.getpid()) as cores:
        pass
    assert cores == {}
    assert bench._cores_row("open loop", cores).measured == "n/a (needs Linux /proc)"


@needs_wrk
def test_the_floor_server_answers_with_the_services_canned_503_and_its_cost_is_measured():
    """bench-serve's floor under a refusal: a bare asyncio server writing the service's own 503."""
    from mldeploy.loadtest.background import BackgroundServer
    from mldeploy.serving.hardening import OVERLOADED

    with BackgroundServer(env={}, module="mldeploy.loadtest.floor") as bare:
        answer = httpx.post(bare.url + "/predict", content=b"{}")
        assert (answer.status_code, answer.headers["retry-after"]) == (503, "1")
        assert answer.content == OVERLOADED.partition(b"\r\n\r\n")[2]
        assert 0 < bench._loop_us_per_answer(bare, "/predict", "{}", 1.0, rate=300) < 1e6


def test_a_thread_that_always_wants_a_cpu_is_on_one_or_waiting_for_one():
    """The wait for a CPU, read beside the CPU time: a spinning main thread is always runnable,
    so the two add up to its whole time. It shares its one CPU with a spinning process niced by
    5, which the scheduler weighs about a third as much: it runs about three quarters of the
    time and waits the rest (so a reading that took the run for the wait would fail)."""
    if cpu.waiting_seconds(os.getpid()) is None:
        pytest.skip("this kernel does not report the run delay (/proc/PID/task/PID/schedstat)")
    allowed = os.sched_getaffinity(0)
    one = min(allowed)

    def pin_and_nice() -> None:
        os.sched_setaffinity(0, {one})
        os.nice(5)

    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=pin_and_nice)
    os.sched_setaffinity(0, {one})  # this thread only
    try:
        time.sleep(0.3)
        with loop_and_worker_cores(os.getpid()) as cores:
            _spin(1.0)
    finally:
        os.sched_setaffinity(0, allowed)
        hog.kill()
        hog.wait()
    assert 0.1 <= cores["loop_waiting"] <= 0.4, cores
    assert 0.8 <= cores["loop"] + cores["loop_waiting"] <= 1.1, cores


def test_separate_cores_gives_the_server_and_the_load_cpus_of_their_own():
    """bench-serve's open loop on cores of its own: every thread of the server on one half of the
    CPUs, this process and the load generators it starts on the other; all as before after."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs 2 CPUs")
    code = "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); "
    server = subprocess.Popen([sys.executable, "-c", code + "time.sleep(60)"])

    def threads() -> list[int]:
        return [int(t) for t in os.listdir(f"/proc/{server.pid}/task")]

    try:
        deadline = time.monotonic() + 10
        while len(threads()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        with cpu.separate_cores(server.pid) as split:
            assert split is not None
            server_cpus, load_cpus = split
            assert server_cpus and load_cpus and not server_cpus & load_cpus
            assert server_cpus | load_cpus == allowed
            assert [os.sched_getaffinity(t) for t in threads()] == [server_cpus] * 2
            assert os.sched_getaffinity(0) == load_cpus
            show = "import os; print(sorted(os.sched_getaffinity(0)))"
            child = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True)
            assert child.stdout.strip() == str(sorted(load_cpus))  # as wrk inherits it
        assert os.sched_getaffinity(0) == allowed
        assert [os.sched_getaffinity(t) for t in threads()] == [allowed] * 2
    finally:
        server.kill()
        server.wait()


def test_where_the_server_cannot_be_pinned_separate_cores_says_so(monkeypatch):
    """A system that refuses to pin another process: no rows claim separate cores."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs 2 CPUs")
    real = os.sched_setaffinity

    def refuse_others(pid: int, cpus: set[int]) -> None:
        if pid != 0:
            raise PermissionError("not allowed")
        real(pid, cpus)

    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        monkeypatch.setattr(cpu.os, "sched_setaffinity", refuse_others)
        with cpu.separate_cores(server.pid) as split:
            assert split is None
            assert os.sched_getaffinity(0) == allowed
    finally:
        monkeypatch.undo()
        server.kill()
        server.wait()


def test_on_one_cpu_separate_cores_changes_nothing_and_the_rows_say_why(monkeypatch):
    before = os.sched_getaffinity(0)
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0})
    with cpu.separate_cores(os.getpid()) as split:
        assert split is None
    monkeypatch.undo()
    assert os.sched_getaffinity(0) == before
    rows = bench._own_cores_rows({"own_cores": None}, 5.0)
    assert [(r.measured, r.met) for r in rows] == [
        ("n/a (the server could not be pinned: needs 2 CPUs and CPU affinity)", None)
    ]


@needs_wrk
def test_without_proc_the_refusal_alone_is_nan_not_an_error(monkeypatch):
    """macOS has no /proc: bench-serve's floor row then prints "n/a" instead of failing."""
    from mldeploy.loadtest.background import BackgroundServer

    with BackgroundServer(env={}, module="mldeploy.loadtest.floor") as bare:
        missing = cpu.Path("/nonexistent/proc/task")
        monkeypatch.setattr(cpu, "Path", lambda _: missing)
        assert math.isnan(bench._loop_us_per_answer(bare, "/predict", "{}", 0.5, rate=200))


def test_async_load_counts_refusals_as_failures_and_rounds_pool(refusing):
    url, handler = refusing
    handler.refusals = 3
    body = {"features": [0.5, -0.3]}
    runs = [asyncio.run(loadgen.async_load(url, [body] * 5, concurrency=2)) for _ in range(2)]
    assert [(len(r.latencies), r.failures) for r in runs] == [(2, 3), (5, 0)]
    pooled = loadgen.LoadResult.pooled(runs)
    assert (len(pooled.latencies), pooled.failures) == (7, 3)
    assert pooled.seconds == runs[0].seconds + runs[1].seconds
    assert pooled.throughput == 7 / pooled.seconds


def test_async_load_raises_when_it_cannot_connect_rather_than_waiting():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    load = loadgen.async_load(url, [{"features": [0.5, -0.3]}], concurrency=3)
    with pytest.raises(httpx.ConnectError):
        asyncio.run(asyncio.wait_for(load, timeout=10))
