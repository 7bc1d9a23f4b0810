"""The LLM server (section 5.6d): batched decode parity, continuous vs static scheduling,
streaming, cancellation, bad requests and back-pressure. A small random model; no timings."""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from mldeploy.llm.generation import generate
from mldeploy.llm.kv_cache import KVCache
from mldeploy.llm.model import Llama, LlamaConfig
from mldeploy.llm.serving import loadgen
from mldeploy.llm.serving.api import create_app
from mldeploy.llm.serving.engine import Engine, QueueFull, SlotPool, decode_step
from mldeploy.serving import BackgroundServer
from mldeploy.settings import ServiceSettings

CFG = LlamaConfig(
    vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=256
)


class CharTokenizer:
    """One token per character (a-z and space), enough to drive the API with a random model."""

    ALPHABET = "abcdefghijklmnopqrstuvwxyz "

    def encode(self, text: str) -> list[int]:
        return [3 + self.ALPHABET.index(c) for c in text.lower() if c in self.ALPHABET]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.ALPHABET[i % len(self.ALPHABET)] for i in ids)


@pytest.fixture(scope="module")
def net() -> Llama:
    torch.manual_seed(0)
    return Llama(CFG).eval()


@pytest.fixture
def server(net):
    """A continuous-batching server on a free loopback port; always stopped."""
    with BackgroundServer(create_app(net, CharTokenizer(), max_running=4)) as srv:
        yield srv


@torch.no_grad()
def test_batched_decode_step_equals_the_model_row_by_row(net):
    pool = SlotPool(CFG, 6)
    owned = [pool.acquire() for _ in range(6)]
    rows = [owned[i] for i in (4, 0, 2, 5)]  # slots out of order; slots 1 and 3 stay unused
    tokens = [5, 9, 11, 40]
    for (_, cache), n in zip(rows, (1, 4, 9, 17)):  # rows at different positions
        prompt = torch.randint(
            0, CFG.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)
        )
        net(prompt, cache)
    caches = [cache for _, cache in rows]
    expected = [net(torch.tensor([[t]]), copy.deepcopy(c))[0, -1] for t, c in zip(tokens, caches)]
    got = decode_step(net, tokens, pool, [s for s, _ in rows], [c.length for c in caches])
    for row, want in zip(got, expected, strict=True):
        # measured: 7e-8 here; batched matmuls may sum in another order than one row
        torch.testing.assert_close(row, want, atol=1e-5, rtol=1e-5)
    for layer in range(CFG.n_layers):  # a step writes only its own rows' slots
        assert not pool.keys[layer][[1, 3]].any() and not pool.values[layer][[1, 3]].any()


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_engine_output_equals_generate(net, batching):
    prompts = [[3, 4, 5], [7] * 11, [9, 8]]
    engine = Engine(net, batching=batching, max_running=2)
    seqs = [engine.submit(p, 5 + 3 * i) for i, p in enumerate(prompts)]
    engine.run_until_idle()
    for p, seq in zip(prompts, seqs):
        assert seq.generated == generate(net, p, seq.max_tokens)
    sampled = engine.submit([3, 4, 5], 8, temperature=0.8, seed=7)
    engine.run_until_idle()
    assert sampled.generated == generate(net, [3, 4, 5], 8, temperature=0.8, seed=7)


def _schedule(net, batching: str) -> tuple[list[list[int]], int]:
    """A long request, a short one, and a third that arrives after the first step."""
    engine = Engine(net, batching=batching, max_running=2)
    long, short = engine.submit([3, 4], 8), engine.submit([5], 2)
    engine.step()
    late = engine.submit([6, 7], 3)
    engine.run_until_idle()
    assert (long.id, short.id, late.id) == (0, 1, 2)
    return list(engine.step_log), engine.steps


def test_continuous_admits_while_others_run_static_does_not(net):
    log, steps = _schedule(net, "continuous")
    assert any({0, 2} <= set(ids) for ids in log)  # the late request joined the long one
    assert max(len(ids) for ids in log) <= 2  # the cap on running sequences
    assert steps == 8
    log, steps = _schedule(net, "static")
    assert not any({0, 2} <= set(ids) for ids in log)  # it waited for the whole batch
    assert steps == 8 + 3


def test_tokens_in_flight_cap(net):
    engine = Engine(net, max_running=8, max_tokens_in_flight=20)
    for _ in range(4):
        engine.submit([3] * 5, 5)  # 10 positions each: two fit
    engine.run_until_idle()
    assert max(len(ids) for ids in engine.step_log) == 2


def test_cancel_frees_the_slot_within_one_step(net):
    engine = Engine(net, max_running=1)
    first, second = engine.submit([3, 4], 50), engine.submit([5], 3)
    engine.step()
    engine.cancel(first)
    engine.step()
    assert engine.step_log[-1] == [second.id]  # the very next step runs the waiting one
    assert first.finish_reason == "cancelled" and first.cache is None


def test_a_sequence_leaves_the_queues_only_once_it_is_counted(net):
    """Other threads (``/metrics``, a draining server, a test) read ``running``, ``waiting``
    and ``stats`` without the lock: a sequence gone from both queues is already counted and
    its slot is back. The finish signal is the last moment to look, so it still sees it queued."""
    engine = Engine(net, max_running=1)
    seen = []

    def on_token(seq, token):
        if token is None:
            queued = seq in engine.running or seq in engine.waiting
            seen.append((seq.id, seq.finish_reason, queued))

    running, waiting, short = (
        engine.submit(p, n, on_token=on_token) for p, n in (([3, 4], 50), ([5], 50), ([6], 2))
    )
    engine.step()  # one runs, two wait
    engine.cancel(running)
    engine.cancel(waiting)
    engine.run_until_idle()
    assert seen == [(0, "cancelled", True), (1, "cancelled", True), (2, "length", True)]
    assert engine.stats.cancelled == 2 and engine.stats.finished == 1


def _live_caches() -> int:
    return sum(type(o) is KVCache for o in gc.get_objects())


def test_1000_cancelled_requests_leak_nothing(net):
    engine = Engine(net, max_running=8, max_waiting=1_000)
    pool_bytes, caches_before = engine.pool.nbytes, _live_caches()
    seqs = [engine.submit([3, 4, 5], 40) for _ in range(1_000)]
    for _ in range(3):
        engine.step()
    assert len(engine.running) == 8 and not engine.pool.free  # every slot taken
    for seq in seqs:
        engine.cancel(seq)
    engine.step()
    assert not engine.running and not engine.waiting and engine.tokens_in_flight == 0
    assert engine.stats.cancelled == 1_000 and len(engine.pool.free) == 8
    assert all(s.cache is None and s.slot is None for s in seqs)
    assert engine.pool.nbytes == pool_bytes  # the KV memory is allocated once, never grows
    assert _live_caches() <= caches_before  # no per-sequence cache survives its sequence


def test_1000_disconnected_streams_leak_nothing(server):
    """Clients that hang up after their first token: every slot comes back."""
    body = {"model": "tiny-llama", "prompt": "abc", "max_tokens": 200, "stream": True}

    async def hang_up(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", "/v1/completions", json=body) as answer:
            async for _ in answer.aiter_lines():
                break  # one event, then close the connection

    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            for _ in range(1_000 // 8):
                await asyncio.gather(*(hang_up(client) for _ in range(8)))

    engine = server.app.state.engine
    asyncio.run(main())
    deadline = time.monotonic() + 10
    while (engine.running or engine.waiting) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats.cancelled + engine.stats.finished == 1_000
    assert engine.stats.cancelled >= 900  # a few may finish before their hang-up is seen
    assert not engine.running and len(engine.pool.free) == engine.max_running


def _events(answer: httpx.Response) -> list[dict | str]:
    out = []
    for line in answer.iter_lines():
        if line.startswith("data: "):
            out.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
    return out


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_streamed_text_equals_non_streamed(server, temperature):
    body = {"model": "tiny-llama", "prompt": "hello world", "max_tokens": 12, "seed": 3}
    body["temperature"] = temperature
    with httpx.Client(base_url=server.url, timeout=30) as client:
        whole = client.post("/v1/completions", json=body).json()
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as answer:
            assert answer.headers["content-type"].startswith("text/event-stream")
            events = _events(answer)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert text == whole["choices"][0]["text"] and len(text) == 12
    assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert whole["usage"] == {"prompt_tokens": 11, "completion_tokens": 12, "total_tokens": 23}


def test_models_health_metrics(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-llama"
        client.post(
            "/v1/completions", json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 3}
        )
        metrics = client.get("/metrics").json()
    assert metrics["tokens_generated"] >= 3 and metrics["running"] == 0
    assert metrics["waiting"] == 0 and metrics["ttft_ms_p50"] is not None


def test_the_served_command_answers_completions_and_probes_in_a_process_of_its_own():
    # `python -m mldeploy.llm.serving` as make bench-llm runs it; it loads 5.6a's trained model
    from mldeploy.llm import training

    training.train_or_load()  # built here if missing, so that the child only loads it
    args = ["--batching", "static", "--max-running", "2"]
    with BackgroundServer(env={}, module="mldeploy.llm.serving", args=args) as server:
        assert httpx.get(server.admin_url + "/ready").json() == {"ready": True}
        body = {"model": "tiny-llama", "prompt": "def", "max_tokens": 4}
        answer = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        metrics = httpx.get(server.admin_url + "/metrics").json()
        server.proc.send_signal(signal.SIGINT)  # Ctrl+C
        assert server.proc.wait(timeout=30) == 0
        assert "Traceback" not in server.stderr()
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"]
    assert metrics["tokens_generated"] == 4 and metrics["running"] == 0


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max-running", "0", "positive whole number"),
        ("--max-running", "-3", "positive whole number"),
        ("--max-waiting", "0", "positive whole number"),
        ("--request-timeout-s", "-1", "seconds above 0"),
        ("--request-timeout-s", "nan", "seconds above 0"),
    ],
)
def test_the_served_command_rejects_bad_limits_before_it_loads_anything(flag, value, message):
    proc = subprocess.run(
        [sys.executable, "-m", "mldeploy.llm.serving", flag, value],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert flag in proc.stderr and "serving" not in proc.stdout


def test_engine_and_app_refuse_limits_that_could_serve_nothing(net):
    for limits in ({"max_running": 0}, {"max_waiting": 0}, {"max_tokens_in_flight": 0}):
        with pytest.raises(ValueError, match=">= 1"):
            Engine(net, **limits)
    for seconds in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="request_timeout_s"):
            create_app(net, CharTokenizer(), request_timeout_s=seconds)


def test_disconnecting_client_cancels_its_sequence(net):
    slow = copy.deepcopy(net)
    slow.lm_head.register_forward_pre_hook(lambda *_: time.sleep(0.01))  # ~2.5 s for 250 tokens
    body = {"model": "tiny-llama", "prompt": "abc", "max_tokens": 250, "stream": True}
    with BackgroundServer(create_app(slow, CharTokenizer())) as srv:
        engine = srv.app.state.engine
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            with client.stream("POST", "/v1/completions", json=body) as answer:
                next(answer.iter_lines())  # the first token arrived; now hang up
        deadline = time.monotonic() + 10
        while engine.stats.cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.stats.cancelled == 1 and engine.stats.finished == 0
        assert not engine.running


BAD = [
    ({"model": "tiny-llama", "prompt": "a" * 300}, 400, "prompt is 300 tokens"),
    ({"model": "tiny-llama", "prompt": "abc", "max_tokens": 0}, 422, "max_tokens"),
    ({"model": "tiny-llama", "prompt": "abc", "max_tokens": 254}, 400, "exceeds"),
    ({"model": "tiny-llama", "prompt": "abc", "max_tokens": "5"}, 422, "max_tokens"),
    ({"model": "tiny-llama", "prompt": 7}, 422, "prompt"),
    ({"model": "tiny-llama", "prompt": "abc", "temperature": -1}, 422, "temperature"),
    ({"model": "gpt-4", "prompt": "abc"}, 400, "unknown model"),
    ({"model": "tiny-llama", "prompt": ""}, 422, "prompt"),
    ({"model": "tiny-llama", "prompt": "!!!"}, 400, "no tokens"),
    ({"model": "tiny-llama", "prompt": "abc", "seed": -1}, 422, "seed"),
    ({"prompt": "abc"}, 422, "model"),
    ({"model": "tiny-llama", "prompt": "abc", "best_of": 2}, 422, "best_of"),
]


def test_bad_requests_get_one_clear_4xx(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for body, status, words in BAD:
            answer = client.post("/v1/completions", json=body)
            assert answer.status_code == status, (body, answer.text)
            assert words in answer.json()["error"]["message"], (body, answer.text)
        broken = client.post(
            "/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"}
        )
        assert broken.status_code == 422 and "JSON" in broken.json()["error"]["message"]
        tiny = {"model": "tiny-llama", "prompt": "abc", "max_tokens": 3, "temperature": 1e-30}
        assert client.post("/v1/completions", json=tiny).status_code == 200  # greedy, no NaN
        assert client.get("/health").status_code == 200  # still serving


def test_full_queue_answers_503_with_retry_after(net):
    app = create_app(net, CharTokenizer(), max_waiting=2)
    with BackgroundServer(app) as srv:
        engine = app.state.engine
        engine.stop()  # no worker: whatever is queued stays queued
        for _ in range(2):
            engine.submit([3, 4], 2)
        with pytest.raises(QueueFull):
            engine.submit([3, 4], 2)
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            body = {"model": "tiny-llama", "prompt": "abc", "max_tokens": 2}
            answer = client.post("/v1/completions", json=body)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"


def test_loadgen_workload_is_seeded_and_mixed():
    jobs = loadgen.workload(4, 3, seed=1)
    assert jobs == loadgen.workload(4, 3, seed=1) and len(jobs) == 12
    assert len({j.max_tokens for j in jobs}) > 3 and len({j.prompt for j in jobs}) > 3
    assert loadgen.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0


def test_loadgen_against_a_server(server):
    import asyncio

    jobs = loadgen.workload(3, 2, seed=0, max_tokens=(2, 6))
    report = asyncio.run(loadgen.run(server.url, jobs))
    assert report["requests"] == 6 and report["tokens"] == sum(j.max_tokens for j in jobs)


def _slow(net, seconds: float = 0.01) -> Llama:
    """A copy of ``net`` that sleeps in every forward: streams last long enough to act on."""
    slow = copy.deepcopy(net)
    slow.lm_head.register_forward_pre_hook(lambda *_: time.sleep(seconds))
    return slow


def test_deadline_drops_a_waiting_request_without_running_it(net):
    engine = Engine(net, max_running=1)
    running = engine.submit([3, 4], 5)
    late = engine.submit([5, 6], 5, deadline=time.perf_counter() - 1)
    engine.step()
    assert late.finish_reason == "timeout" and late.generated == [] and late.slot is None
    assert engine.step_log[-1] == [running.id] and engine.stats.timed_out == 1


def test_request_past_its_deadline_gets_504_and_frees_its_slot(net):
    app = create_app(_slow(net), CharTokenizer(), request_timeout_s=0.3)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        body = {"model": "tiny-llama", "prompt": "abc", "max_tokens": 200}
        answer = client.post("/v1/completions", json=body)
        assert answer.status_code == 504 and "deadline" in answer.json()["error"]["message"]
        engine = app.state.engine
        assert engine.stats.timed_out == 1 and len(engine.pool.free) == engine.max_running


def test_probes_tell_the_truth_and_the_body_limit_holds(net):
    app = create_app(net, CharTokenizer(), max_body_bytes=1024)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").json() == {"ready": True}
        big = {"model": "tiny-llama", "prompt": "a" * 2000, "max_tokens": 2}
        assert client.post("/v1/completions", json=big).status_code == 413
        app.state.engine.stop()  # the worker is gone: neither probe may say otherwise
        assert client.get("/health").status_code == 503
        assert client.get("/ready").status_code == 503


def test_sigterm_drains_running_streams_and_refuses_new_ones(net):
    settings = ServiceSettings(drain_s=1.0, shutdown_timeout_s=20)
    app = create_app(_slow(net), CharTokenizer(), settings=settings)
    body = {"model": "tiny-llama", "prompt": "abc", "max_tokens": 150, "stream": True}
    srv = BackgroundServer(app).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            with client.stream("POST", "/v1/completions", json=body) as answer:
                lines = answer.iter_lines()
                first = next(lines)  # the stream is running
                srv.terminate()  # what SIGTERM does to DrainingServer
                assert client.get("/ready").status_code == 503
                refused = client.post("/v1/completions", json={**body, "stream": False})
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                events = [first, *lines]
        data = [e for e in events if e.startswith("data: ")]
        assert data[-1] == "data: [DONE]" and len(data) == 150 + 2  # every token, final, DONE
        assert json.loads(data[-2][6:])["choices"][0]["finish_reason"] == "length"
        srv._thread.join(timeout=30)  # after the drain the server stops by itself
        assert not srv._thread.is_alive() and not app.state.engine.alive
    finally:
        srv.stop()


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(net):
    broken = copy.deepcopy(net)
    calls = {"n": 0}

    def fail_once(*_):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")

    broken.lm_head.register_forward_pre_hook(fail_once)
    with BackgroundServer(create_app(broken, CharTokenizer())) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            body = {"model": "tiny-llama", "prompt": "abc", "max_tokens": 3}
            failed = client.post("/v1/completions", json=body)
            assert failed.status_code == 500 and "engine failed" in failed.text
            assert client.post("/v1/completions", json=body).status_code == 200
            assert client.get("/health").status_code == 200
        assert len(srv.app.state.engine.pool.free) == srv.app.state.engine.max_running
