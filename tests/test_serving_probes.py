"""The admin listener in its own process: fast under load, truthful about a stuck service."""

from __future__ import annotations

import json
import os
import socket
import time

import httpx

from mldeploy.serving import probes
from mldeploy.serving.server import listen


class FakeService:
    batcher = object()

    def __init__(self):
        self.is_live, self.is_ready = True, True

    def live(self):
        return self.is_live

    def ready(self):
        return self.is_ready


def _started(monkeypatch):
    # start() refuses to fork beside other threads; threads earlier tests left behind are idle
    monkeypatch.setattr(probes.threading, "active_count", lambda: 1)
    api = listen("127.0.0.1", 0)  # nobody answers /metrics on it
    admin = listen("127.0.0.1", 0)
    port = admin.getsockname()[1]
    proc = probes.ProbeProcess(admin, f"http://127.0.0.1:{api.getsockname()[1]}/metrics", 1.0)
    return proc, api, f"http://127.0.0.1:{port}"


def _wait_for(url, status, seconds=3.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        answer = httpx.get(url, timeout=1)
        if answer.status_code == status:
            return answer
        time.sleep(0.02)
    raise AssertionError(f"{url} never answered {status}")


def test_child_answers_from_the_state_the_service_sends_and_exits_with_it(monkeypatch):
    proc, api, url = _started(monkeypatch)
    proc.start(close_in_child=(api,))
    try:
        loading = httpx.get(url + "/health").json()
        assert loading == {"status": "ok", "model_loaded": False}
        assert httpx.get(url + "/ready").status_code == 503
        service = FakeService()
        proc.attach(service)
        assert _wait_for(url + "/ready", 200).json() == {"ready": True}
        service.is_ready = False  # draining: sent within a poll
        assert _wait_for(url + "/ready", 503).headers["retry-after"] == "1"
        service.is_live = False  # the model worker died
        assert _wait_for(url + "/health", 503).json()["status"] == "failing"
        metrics = httpx.get(url + "/metrics")  # the service's own /metrics is not answering
        assert metrics.status_code == 503 and "metrics unavailable" in metrics.text
    finally:
        pid = proc.pid
        proc.stop()
        api.close()
    assert proc.pid is None
    try:
        os.kill(pid, 0)
        raise AssertionError("the probe process outlived stop()")
    except ProcessLookupError:
        pass
    with socket.socket() as probe:  # the listener went with it
        assert probe.connect_ex(("127.0.0.1", int(url.rsplit(":", 1)[1]))) != 0


def test_a_stalled_event_loop_fails_liveness(monkeypatch):
    monkeypatch.setattr(probes, "STALE_S", 0.3)
    proc, api, url = _started(monkeypatch)
    proc.start(close_in_child=(api,))
    try:
        stuck_since = time.monotonic()
        proc.attach(FakeService(), last_tick=lambda: stuck_since)
        answer = _wait_for(url + "/health", 503)
        assert answer.json() == {"status": "failing", "model_loaded": True}
    finally:
        proc.stop()
        api.close()


def test_a_silent_service_fails_liveness_once_serving(monkeypatch):
    service = probes.RelayedService("http://127.0.0.1:9/metrics", 1.0)
    monkeypatch.setattr(probes, "STALE_S", 0.05)
    service.update(json.dumps({"live": True, "model_loaded": False, "ready": False}))
    time.sleep(0.1)
    assert service.health_probe()[0] == 200  # still loading: a long load may hold the GIL
    service.update(json.dumps({"live": True, "model_loaded": True, "ready": True}))
    assert service.health_probe()[0] == 200 and service.ready_probe()[0] == 200
    time.sleep(0.1)
    assert service.health_probe() == (503, {"status": "failing", "model_loaded": True})
    assert service.ready_probe()[0] == 503


def test_start_refuses_to_fork_beside_other_threads():
    import threading

    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    admin = listen("127.0.0.1", 0)
    try:
        proc = probes.ProbeProcess(admin, "http://127.0.0.1:9/metrics", 1.0)
        try:
            proc.start()
            raise AssertionError("forked beside another thread")
        except RuntimeError as exc:
            assert "before any other thread" in str(exc)
    finally:
        stop.set()
        other.join()
        admin.close()
