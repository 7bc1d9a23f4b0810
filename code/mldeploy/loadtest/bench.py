"""``make bench-serve``: start the service in child processes, drive it with wrk, print a table.

Everything is measured in one run, side by side, so the ratios hold on a noisy shared machine even
when the absolute numbers do not. ``python -m mldeploy.loadtest.bench --seconds 5``.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import math
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from mldeploy import serving
from mldeploy.loadtest import loadgen
from mldeploy.loadtest.background import BackgroundServer
from mldeploy.loadtest.cpu import loop_and_worker_cores, separate_cores
from mldeploy.loadtest.models import WIDE, two_moons_onnx, wide_onnx
from mldeploy.loadtest.scrape import metric
from mldeploy.paths import artifacts_dir
from mldeploy.runtime import make_session, median_seconds, run_session

BODY = json.dumps({"features": [0.5, -0.3]})
JOB = json.dumps({"items": [json.loads(BODY)]})  # /predict_batch with that one sample


@dataclass(frozen=True)
class Row:
    name: str
    measured: str
    target: str
    met: bool | None  # None: context, no target


def _server(model: str, batching: bool, **extra: str) -> BackgroundServer:
    env = {
        "MLDEPLOY_MODEL": model,
        "MLDEPLOY_BACKEND": "onnx",
        "MLDEPLOY_BATCHING": "1" if batching else "0",
        **extra,
    }
    return BackgroundServer(env=env)


def _wrk(url: str, connections: int, seconds: float) -> loadgen.WrkResult:
    """POST the sample body to ``url``; every answer must be a 200."""
    result = loadgen.run_wrk(url, connections=connections, seconds=seconds, body=BODY)
    if result.errors or set(result.codes) - {200}:
        raise RuntimeError(
            f"{url} at {connections} clients: socket errors {result.errors},"
            f" statuses {result.codes}"
        )
    return result


def single_call_ms(model: str, repeats: int = 200) -> float:
    """Median time of one single-sample model call, in this process (ms)."""
    session = make_session(model)
    x = np.array([[0.5, -0.3]], dtype=np.float32)
    return 1e3 * median_seconds(lambda: run_session(session, x), repeats=repeats)


def _paired(urls: dict, connections: int, seconds: float, rounds: int = 5) -> dict:
    """Alternate short runs on two targets (order flipped every round, so drifting background load
    hits both alike); return each target's runs."""
    runs: dict = {key: [] for key in urls}
    keys = list(urls)
    for i in range(rounds):
        for key in keys if i % 2 == 0 else keys[::-1]:
            runs[key].append(_wrk(urls[key], connections, max(1.0, seconds / rounds)))
    return runs


def _median_ratio(
    a: list[loadgen.WrkResult], b: list[loadgen.WrkResult], attr: str = "throughput"
) -> float:
    return float(np.median([getattr(x, attr) / getattr(y, attr) for x, y in zip(a, b)]))


def _median(runs: list[loadgen.WrkResult], attr: str) -> float:
    return float(np.median([getattr(r, attr) for r in runs]))


def keepalive_rows(seconds: float) -> list[Row]:
    """Keep-alive /predict latency of the clients people use, against wrk's 1-client p50, and the
    latency ``make demo`` reports."""
    import re

    from mldeploy import pipeline

    with _server(str(two_moons_onnx()), batching=True) as server:
        url = server.url + "/predict"
        _wrk(url, 8, 1.0)  # warm-up
        wrk_p50 = _wrk(url, 1, seconds).p50_ms
        medians = loadgen.keepalive_medians(url, BODY)
        size, model_ms = batch_stats(server.url)
    rows = [Row("two-moons /predict, wrk 1 client: p50", f"{wrk_p50:.2f} ms", "", None)]
    for client, ms in medians.items():
        rows.append(
            Row(
                f"keep-alive /predict median of 50, {client}",
                f"{ms:.2f} ms ({ms / wrk_p50:.1f}x wrk)",
                "≤ 2 ms and ≤ 3x wrk",
                ms <= 2.0 and ms <= 3 * wrk_p50,
            )
        )
    rows.append(
        Row(
            "two-moons /predict: mean batch size / time per model call",
            f"{size:.1f} / {model_ms:.2f} ms",
            "",
            None,
        )
    )
    out = pipeline.run_script(artifacts_dir("serving") / "demo") or ""
    found = re.search(r"API latency: +([\d.]+) ms", out)
    if found is None:
        raise RuntimeError("make demo did not report its API latency")
    demo_ms = float(found[1])
    rows.append(
        Row(
            "make demo: API latency (keep-alive, median of 50)",
            f"{demo_ms:.2f} ms",
            "≤ 2 ms",
            demo_ms <= 2.0,
        )
    )
    return rows


def batch_stats(url: str) -> tuple[float, float]:
    """Mean batch size and mean time per batched model call (ms), from the server's /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    batches = metric(text, "mldeploy_batch_size_count") or 1.0
    model_s = metric(text, "mldeploy_model_seconds_sum")
    return metric(text, "mldeploy_batch_size_sum") / batches, 1e3 * model_s / batches


def batching_rows(seconds: float) -> tuple[list[Row], dict]:
    """Batched vs unbatched on the wide model: 64 and 1 clients, probes under load, overloads."""
    model = str(wide_onnx())
    call_ms = single_call_ms(model)
    rows = [
        Row(  # context: the cost that batching shares out (0.26–0.59 ms on the course machines)
            f"wide MLP {WIDE['hidden']}x{WIDE['layers']}: one single-sample call",
            f"{call_ms:.2f} ms",
            "",
            None,
        )
    ]
    measured: dict = {}
    # the servers run side by side (an idle one costs nothing: no spinning threads)
    with (
        _server(model, batching=True) as batched,
        _server(model, batching=False) as unbatched,
        _server(
            model, batching=True, MLDEPLOY_GC_FREEZE="0", MLDEPLOY_GC_THRESHOLD="700"
        ) as gc_defaults,
    ):
        urls = {True: batched.url + "/predict", False: unbatched.url + "/predict"}
        for url in [*urls.values(), gc_defaults.url + "/predict"]:
            _wrk(url, 64, 1.0)  # warm-up
        at64 = _paired(urls, 64, 2 * seconds)
        at1 = _paired(urls, 1, 2 * seconds)
        measured["gc"] = _paired(
            {True: urls[True], False: gc_defaults.url + "/predict"}, 64, seconds
        )
        load = loadgen.start_wrk(
            batched.url + "/predict", connections=64, seconds=seconds, body=BODY
        )
        time.sleep(0.5)  # let /predict saturate first
        measured["health"] = loadgen.run_wrk(
            batched.admin_url + "/health", connections=1, seconds=(seconds - 1) / 2, method="GET"
        )
        # read the threads here, not above: there the admin port's handler thread is busy too
        # (and could pass for the model thread); one /health client adds little to the loop
        with loop_and_worker_cores(batched.proc.pid) as measured["cores"]:
            measured["health_api"] = loadgen.run_wrk(
                batched.url + "/health", connections=1, seconds=(seconds - 1) / 2, method="GET"
            )
        measured["health_load"] = loadgen.finish_wrk(load)
        capacity = _median(at64[True], "throughput")
        measured["overload"], measured["probe"] = _overload(batched.url, seconds)
        measured["polite"] = _overload(batched.url, seconds, retry_after=True)[0]
        with loop_and_worker_cores(batched.proc.pid) as measured["open_cores"]:
            measured["open"] = _overload(batched.url, seconds, rate=2 * capacity)
        with separate_cores(batched.proc.pid) as measured["own_cores"]:
            if measured["own_cores"] is not None:
                measured["own"] = _overload_on_own_cores(batched.url, seconds)
        measured["flood"] = _batch_flood(batched.url, seconds)
        with loop_and_worker_cores(batched.proc.pid) as measured["closed_cores"]:
            measured["closed"] = _wrk(urls[True], 64, seconds / 2)
    wrk, _ = measured["open"]  # refuse as many a second as the open loop did
    refused = max(1000.0, wrk.codes.get(503, 0) / wrk.seconds)
    measured["refusal_us"], measured["refusal_alone_us"] = _loop_us_per_refusal(
        model, seconds / 2, rate=refused
    )
    measured["floor_us"] = _floor_us_per_answer(seconds / 2, rate=refused)
    measured.update(at64=at64, at1=at1)
    speedup = _median_ratio(at64[True], at64[False])
    p99 = {k: _median(at64[k], "p99_ms") for k in (True, False)}
    p50_1 = {k: _median(at1[k], "p50_ms") for k in (True, False)}
    rows += [
        Row(
            "unbatched, 64 clients: throughput",
            f"{_median(at64[False], 'throughput'):,.0f} req/s",
            "",
            None,
        ),
        Row(
            "batched, 64 clients: throughput",
            f"{_median(at64[True], 'throughput'):,.0f} req/s",
            "",
            None,
        ),
        Row(
            "batched ÷ unbatched throughput, 64 clients (median of 5 paired runs)",
            f"{speedup:.1f}x",
            "≥ 2x",
            speedup >= 2,
        ),
        Row(
            "64 clients p50: batched / unbatched",
            f"{_median(at64[True], 'p50_ms'):.2f} ms / {_median(at64[False], 'p50_ms'):.2f} ms",
            "",
            None,
        ),
        Row(
            "64 clients p99 (median of 5): batched / unbatched",
            f"{p99[True]:.2f} ms / {p99[False]:.2f} ms",
            "batched ≤ unbatched",
            p99[True] <= p99[False],
        ),
        Row(
            "1 client p50 (median of 5): batched / unbatched",
            f"{p50_1[True]:.3f} ms / {p50_1[False]:.3f} ms",
            "within 0.3 ms",
            abs(p50_1[True] - p50_1[False]) <= 0.3,
        ),
        _cores_row("batched, 64 clients", measured["cores"]),
        Row(
            "/health p50 / p99 (admin port) while /predict is saturated (64 clients)",
            f"{measured['health'].p50_ms:.2f} ms / {measured['health'].p99_ms:.2f} ms",
            "p99 ≤ 250 ms (¼ of the 1 s probe timeout)",
            measured["health"].p99_ms <= 250,
        ),
        Row(
            "/health p50 / p99 on the API port, same load (for comparison)",
            f"{measured['health_api'].p50_ms:.2f} ms / {measured['health_api'].p99_ms:.2f} ms",
            "",
            None,
        ),
    ]
    rows += _gc_rows(measured["gc"])
    rows += _overload_rows(measured["overload"], measured["probe"], p99[True])
    rows += _polite_rows(measured["polite"], capacity)
    rows += _open_loop_rows(
        "on the load generators' cores",
        *measured["open"],
        capacity,
        _median(at1[True], "p99_ms"),
        seconds,
        targets=False,
    )
    rows.append(_cores_row("open loop at 2× capacity", measured["open_cores"]))
    rows += _own_cores_rows(measured, seconds)
    rows.append(_loop_cost_row(measured, seconds))
    rows.append(
        Row(
            "a refusal at the door, the same paced stream alone: loop CPU per refusal, the service"
            " / a bare asyncio server writing the same canned 503 (the floor)",
            f"{measured['refusal_alone_us']:.0f} µs / {measured['floor_us']:.0f} µs"
            if not math.isnan(measured["floor_us"])
            else "n/a (needs Linux /proc)",
            "",
            None,
        )
    )
    rows += _flood_rows(*measured["flood"])
    return rows, measured


def _cores_row(load: str, cores: dict[str, float]) -> Row:
    """Which thread bounds the throughput: the one near a whole core; and how long the event loop
    waited for a CPU that other threads had (the load generators', the model's)."""
    waiting = f"{cores['loop_waiting']:.2f}" if "loop_waiting" in cores else "n/a"
    return Row(
        f"{load}: cores used by the event loop / the model thread; the loop waiting for a CPU",
        f"{cores['loop']:.2f} / {cores['worker']:.2f}; {waiting}"
        if cores
        else "n/a (needs Linux /proc)",
        "",
        None,
    )


FLOOD_BODY = json.dumps({"items": [{"features": [0.5, -0.3]}] * 256})


def _batch_flood(url: str, seconds: float) -> tuple[loadgen.WrkResult, loadgen.ProbeResult]:
    """128 wrk clients send 256-sample batches; 16 probe clients send /predict meanwhile."""
    load = loadgen.start_wrk(
        url + "/predict_batch", connections=128, seconds=seconds, body=FLOOD_BODY
    )
    time.sleep(0.5)
    probe = loadgen.probe(url + "/predict", BODY.encode(), connections=16, seconds=seconds - 1)
    return loadgen.finish_wrk(load), probe


def _flood_rows(wrk: loadgen.WrkResult, probe: loadgen.ProbeResult) -> list[Row]:
    ok = probe.latencies(200) * 1e3
    rate = len(ok) / max(1e-9, sum(t for _, t in probe.samples))  # per busy probe-second
    p99 = float(np.percentile(ok, 99)) if len(ok) else float("inf")
    return [
        Row(
            "batch flood (128 clients × 256 samples): /predict_batch 200 / 503 / other",
            f"{wrk.codes.get(200, 0):,} / {wrk.codes.get(503, 0):,} / "
            f"{sum(n for c, n in wrk.codes.items() if c not in (200, 503))}",
            "shed: 503s, nothing else",
            wrk.codes.get(503, 0) > 0 and set(wrk.codes) <= {200, 503} and wrk.errors == 0,
        ),
        Row(
            "batch flood: /predict_batch p50 / p99 (wrk, all answers)",
            f"{wrk.p50_ms:.2f} ms / {wrk.p99_ms:.2f} ms",
            "",
            None,
        ),
        Row(
            "batch flood: 16 /predict clients answered 200 / p99",
            f"{len(ok):,} ({rate:,.0f} per client-second) / {p99:.2f} ms",
            "not starved: p99 ≤ 1 s",
            len(ok) > 0 and p99 <= 1000,
        ),
    ]


def hygiene_rows() -> list[Row]:
    """Slow and silent clients against the default header timeout; a SIGTERM under load."""
    model = str(two_moons_onnx())
    with _server(model, batching=True) as server:
        timeout = 5.0  # ServiceSettings().header_timeout_s
        slow = asyncio.run(
            loadgen.slow_clients(server.url, dripping=200, silent=100, seconds=timeout + 3)
        )
    with _server(model, batching=True, MLDEPLOY_DRAIN_S="2") as server:
        drain = asyncio.run(loadgen.drain_under_load(server, BODY.encode(), clients=32))
    closed = [t for t in slow.dripping + slow.silent if t is not None]
    order = (
        drain.ready_503_after is not None
        and drain.listener_closed_after is not None
        and drain.ready_503_after < drain.listener_closed_after
    )
    return [
        Row(
            "200 dripping + 100 silent clients: still open after timeout (5 s) + 3 s",
            f"{slow.still_open} of 300 (closed after {min(closed):.2f} s – {max(closed):.2f} s)"
            if closed
            else "300 of 300",
            "0",
            slow.still_open == 0,
        ),
        Row(
            "SIGTERM, 32 keep-alive clients: /ready 503 after / listener closed after (drain 2 s)",
            f"{(drain.ready_503_after or 0) * 1e3:.0f} ms"
            f" / {drain.listener_closed_after or 0:.2f} s",
            "503 first, ≤ 0.5 s",
            order and drain.ready_503_after <= 0.5,
        ),
        Row(
            "SIGTERM: answered during the drain / requests reset / process exited after",
            f"{drain.answered_in_drain:,} / {drain.reset} / {drain.exited_after or 0:.2f} s",
            "0 reset, exit ≤ drain + 10 s",
            drain.reset == 0 and drain.exited_after is not None and drain.exited_after <= 12,
        ),
    ]


def _overload(
    url: str, seconds: float, *, rate: float | None = None, retry_after: bool = False
) -> tuple[loadgen.WrkResult, loadgen.ProbeResult]:
    """512 wrk clients (closed loop, or paced to ``rate`` in all: an open loop) plus 16 probe
    clients that record each answer's status and latency."""
    load = loadgen.start_wrk(
        url + "/predict",
        connections=512,
        seconds=seconds,
        body=BODY,
        rate=rate,
        retry_after=retry_after,
    )
    time.sleep(0.5)
    probe = loadgen.probe(url + "/predict", BODY.encode(), connections=16, seconds=seconds - 1)
    return loadgen.finish_wrk(load), probe


def _overload_rows(
    wrk: loadgen.WrkResult, probe: loadgen.ProbeResult, p99_at_64: float
) -> list[Row]:
    total = sum(wrk.codes.values())
    shed = wrk.codes.get(503, 0) / total if total else 0.0
    other = {code: n for code, n in wrk.codes.items() if code not in (200, 503)}
    ok, rejected = probe.latencies(200) * 1e3, probe.latencies(503) * 1e3
    rows = [
        Row(
            "512 clients: answers 200 / 503 / other",
            f"{wrk.codes.get(200, 0):,} / {wrk.codes.get(503, 0):,} / {sum(other.values())}",
            "no other status, no socket error",
            not other and wrk.errors == 0,
        ),
        Row("512 clients: share of 503", f"{shed:.0%}", "", None),
        Row(
            "512 clients: accepted throughput",
            f"{wrk.codes.get(200, 0) / wrk.seconds:,.0f} req/s",
            "",
            None,
        ),
        Row(
            "512 clients: all answers p50 / p90 / p99 (wrk)",
            f"{wrk.p50_ms:.2f} ms / {wrk.p90_ms:.2f} ms / {wrk.p99_ms:.2f} ms",
            "",
            None,
        ),
        Row("512 clients: probe answers 200 / 503", f"{len(ok)} / {len(rejected)}", "", None),
    ]
    if len(rejected):
        fast = len(ok) == 0 or np.percentile(rejected, 50) <= np.percentile(ok, 50)
        rows.append(
            Row(
                "512 clients: 503 latency p50 / p99 (probe)",
                f"{np.percentile(rejected, 50):.2f} ms / {np.percentile(rejected, 99):.2f} ms",
                "fast: p50 ≤ accepted p50",
                fast,
            )
        )
    if len(ok) and shed >= 0.2:
        # with a share s ≥ 20% of 503s, their median is at most the overall percentile 1 - s/2 ≤ p90
        rows.append(
            Row(
                "512 clients: 503 p50, bounded by wrk's p90 of all answers",
                f"≤ {wrk.p90_ms:.2f} ms",
                "fast: ≤ accepted p50",
                wrk.p90_ms <= np.percentile(ok, 50),
            )
        )
    if len(ok):
        p99_ok = float(np.percentile(ok, 99))
        rows.append(
            Row(
                "512 clients: accepted p50 / p99 (probe)",
                f"{np.percentile(ok, 50):.2f} ms / {p99_ok:.2f} ms",
                "bounded: p99 ≤ 10 × batched 64-client p99",
                p99_ok <= 10 * p99_at_64,
            )
        )
    return rows


def _polite_rows(wrk: loadgen.WrkResult, capacity: float) -> list[Row]:
    accepted = wrk.ok / wrk.seconds
    return [
        Row(
            "512 clients honoring Retry-After (with jitter): answers 200 / 503 / other",
            f"{wrk.ok:,} / {wrk.codes.get(503, 0):,} / "
            f"{sum(n for c, n in wrk.codes.items() if c not in (200, 503)) + wrk.errors}",
            "",
            None,
        ),
        Row(
            "512 clients honoring Retry-After: accepted ÷ 64-client throughput",
            f"{accepted:,.0f} ÷ {capacity:,.0f} req/s = {accepted / capacity:.2f}",
            "≥ 0.5",
            accepted / capacity >= 0.5,
        ),
    ]


def _gc_rows(runs: dict) -> list[Row]:
    """The service as it ships (start-up objects frozen, young threshold raised) against the
    same service with Python's garbage-collector defaults."""
    p99 = {k: _median(runs[k], "p99_ms") for k in (True, False)}
    return [
        Row(
            "64 clients, gc as the service sets it ÷ Python's defaults: throughput (median of 5)",
            f"{_median_ratio(runs[True], runs[False]):.2f}x",
            "",
            None,
        ),
        Row(
            "64 clients p99 (median of 5), gc as the service sets it / Python's defaults",
            f"{p99[True]:.2f} ms / {p99[False]:.2f} ms",
            "service's < defaults",
            p99[True] < p99[False],
        ),
    ]


def _accepted_per_s(wrk: loadgen.WrkResult, probe: loadgen.ProbeResult, seconds: float) -> float:
    """Requests answered 200 per second, wrk's and the probe clients' (they run ``seconds - 1``)."""
    return wrk.ok / wrk.seconds + len(probe.latencies(200)) / (seconds - 1)


def _open_loop_rows(
    where: str,
    wrk: loadgen.WrkResult,
    probe: loadgen.ProbeResult,
    capacity: float,
    p99_unloaded: float,
    seconds: float,
    targets: bool = True,
) -> list[Row]:
    """The open loop at 2× ``capacity`` (measured ``where``); its targets only with ``targets``."""
    offered = wrk.requests / wrk.seconds + len(probe.samples) / (seconds - 1)
    accepted = _accepted_per_s(wrk, probe, seconds)
    ok = probe.latencies(200) * 1e3
    p99 = float(np.percentile(ok, 99)) if len(ok) else float("inf")
    return [
        Row(
            f"open loop at 2× capacity, {where} ({2 * capacity:,.0f} req/s asked) + 16 probe"
            " clients: offered / accepted",
            f"{offered:,.0f} / {accepted:,.0f} req/s"
            f" ({wrk.codes.get(503, 0) + len(probe.latencies(503)):,} answered 503)",
            "",
            None,
        ),
        Row(
            f"open loop at 2× capacity, {where}: accepted ÷ capacity (64-client throughput)",
            f"{accepted / capacity:.2f}",
            "≥ 0.8" if targets else "",
            accepted / capacity >= 0.8 if targets else None,
        ),
        Row(
            f"open loop at 2× capacity, {where}: accepted p99 (probe) vs 1-client p99",
            f"{p99:.2f} ms vs {p99_unloaded:.2f} ms ({p99 / p99_unloaded:.1f}×)",
            "≤ 10×" if targets else "",
            p99 <= 10 * p99_unloaded if targets else None,
        ),
    ]


def _overload_on_own_cores(url: str, seconds: float) -> dict:
    """Capacity (64 clients), the 1-client p99 and the open loop at 2× that capacity, all with
    the server on cores the load generators do not use (``cpu.separate_cores``)."""
    at64 = [_wrk(url + "/predict", 64, max(1.0, seconds / 5)) for _ in range(5)]
    at1 = [_wrk(url + "/predict", 1, max(1.0, seconds / 5)) for _ in range(5)]
    capacity = _median(at64, "throughput")
    return {
        "capacity": capacity,
        "p99_64": _median(at64, "p99_ms"),
        "p99_1": _median(at1, "p99_ms"),
        "open": _overload(url, seconds, rate=2 * capacity),
    }


def _own_cores_rows(measured: dict, seconds: float) -> list[Row]:
    """The open loop again, the server on cores of its own: what the server does with overload,
    without the load generators taking its CPU (they send twice as much as at capacity)."""
    cpus = measured["own_cores"]
    if cpus is None:
        return [
            Row(
                "open loop, server on cores of its own",
                "n/a (the server could not be pinned: needs 2 CPUs and CPU affinity)",
                "",
                None,
            )
        ]
    own = measured["own"]
    where = f"server on {len(cpus[0])} core(s) of its own, load on {len(cpus[1])}"
    rows = [
        Row(
            f"{where}: capacity (64 clients) / its p99 vs 1-client p99",
            f"{own['capacity']:,.0f} req/s / {own['p99_64']:.2f} ms vs {own['p99_1']:.2f} ms"
            f" ({own['p99_64'] / own['p99_1']:.1f}×)",
            "",
            None,
        )
    ]
    return rows + _open_loop_rows(
        where, *own["open"], own["capacity"], own["p99_1"], seconds, targets=True
    )


def _loop_us_per_refusal(
    model: str, seconds: float, rate: float, rounds: int = 4
) -> tuple[float, float]:
    """Event-loop time per request refused at the door (µs), refused as in the open loop: arriving
    at a fixed ``rate`` while the loop is saturated. The admission slots of /predict_batch are held
    by requests whose bodies never finish, so every paced /predict_batch request is refused, while
    64 clients keep /predict saturated. The /predict throughput the refusals take, times the loop
    time per request served, divided by the refusals a second (medians of paired rounds).
    Second: the loop's CPU per refusal of the same stream alone, nothing else running."""
    slow = {"MLDEPLOY_HEADER_TIMEOUT_S": "300", "MLDEPLOY_KEEP_ALIVE_S": "300"}
    runs: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    with _server(model, batching=True, **slow) as server:
        head = b"POST /predict_batch HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\n{"
        slots = serving.ServiceSettings().max_batch_jobs + 1  # ``Service``'s admission limit
        holders = [socket.create_connection((server.host, server.port)) for _ in range(slots)]
        try:
            for sock in holders:
                sock.sendall(head)
            time.sleep(0.3)  # all admitted, waiting for the rest of their bodies
            _wrk(server.url + "/predict", 64, 1.0)  # warm-up
            for _ in range(rounds):
                for refusing in (False, True):
                    runs[refusing].append(_beside_refusals(server, JOB, seconds, refusing, rate))
            alone = _loop_us_per_answer(server, "/predict_batch", JOB, seconds, rate)
        finally:
            for sock in holders:
                sock.close()
    served = {k: float(np.median([r[0] for r in v])) for k, v in runs.items()}
    loop_per_served = float(np.median([r[1] / r[0] for r in runs[False]]))
    refused = float(np.median([r[2] for r in runs[True]]))
    return 1e6 * (served[False] - served[True]) * loop_per_served / refused, alone


def _loop_us_per_answer(
    server: BackgroundServer, path: str, body: str, seconds: float, rate: float
) -> float:
    """The main thread's CPU per answer (µs) of a stream paced at ``rate`` over 256 connections,
    every answer a 503, nothing else running (the median of three runs); NaN without ``/proc``."""
    runs = []
    for _ in range(3):
        with loop_and_worker_cores(server.proc.pid) as cores:  # type: ignore[union-attr]
            stream = loadgen.run_wrk(
                server.url + path, connections=256, seconds=seconds, body=body, rate=rate
            )
        if set(stream.codes) != {503} or stream.errors:
            raise RuntimeError(f"the paced stream was answered {stream.codes}, {stream.errors}")
        if not cores:
            return math.nan
        runs.append(1e6 * cores["loop"] / (stream.codes[503] / stream.seconds))
    return float(np.median(runs))


def _floor_us_per_answer(seconds: float, rate: float) -> float:
    """``_loop_us_per_answer`` of a bare asyncio server writing the same canned 503
    (``loadtest.floor``): what reading a request and writing an answer costs any asyncio server."""
    with BackgroundServer(env={}, module="mldeploy.loadtest.floor") as bare:
        return _loop_us_per_answer(bare, "/predict_batch", JOB, seconds, rate)


def _beside_refusals(
    server: BackgroundServer, jobs: str, seconds: float, refusing: bool, rate: float
) -> tuple[float, float, float]:
    """/predict throughput and event-loop cores with 64 clients, and the refusals a second of a
    paced /predict_batch stream beside it (when ``refusing``)."""
    stream = None
    if refusing:
        url = server.url + "/predict_batch"
        stream = loadgen.start_wrk(url, connections=256, seconds=seconds + 1, body=jobs, rate=rate)
        time.sleep(0.5)
    with loop_and_worker_cores(server.proc.pid) as cores:
        served = _wrk(server.url + "/predict", 64, seconds)
    if stream is None:
        return served.throughput, cores.get("loop", 0.0), 0.0
    refusals = loadgen.finish_wrk(stream)
    if set(refusals.codes) != {503} or refusals.errors:
        raise RuntimeError(
            f"the refused stream was answered {refusals.codes}, {refusals.errors} errors"
        )
    return served.throughput, cores.get("loop", 0.0), refusals.codes[503] / refusals.seconds


def _loop_cost_row(measured: dict, seconds: float) -> Row:
    """Event-loop time per request served (closed loop of 64, and the open loop, its refusals
    taken out at the cost ``_loop_us_per_refusal`` measures) and per request refused at the door:
    what the open loop's share comes from."""
    closed, cores, refusal = measured["closed"], measured["closed_cores"], measured["refusal_us"]
    if not cores or not measured["open_cores"]:
        return Row("event-loop time per request", "n/a (needs Linux /proc)", "", None)
    wrk, probe = measured["open"]
    refused = wrk.codes.get(503, 0) / wrk.seconds + len(probe.latencies(503)) / (seconds - 1)
    open_s = measured["open_cores"]["loop"] - refused * refusal / 1e6
    served_open = 1e6 * open_s / _accepted_per_s(wrk, probe, seconds)
    return Row(
        "event-loop time per request: served (64 clients, closed loop) / served (open loop at"
        " 2×) / refused at the door (paced, beside 64 clients: as in the open loop)",
        f"{1e6 * cores['loop'] / closed.throughput:.0f} µs / ≈ {served_open:.0f} µs"
        f" / {refusal:.0f} µs",
        "",
        None,
    )


def library_lines() -> Row:
    """Lines of ``mldeploy/serving`` (the library, tests not included), and of them the lines of
    code (no blank line, comment or docstring)."""
    folder = Path(serving.__file__).parent
    sources = {p.name: p.read_text() for p in sorted(folder.glob("*.py"))}
    total = sum(len(text.splitlines()) for text in sources.values())
    code = sum(_code_lines(text) for text in sources.values())
    return Row(
        f"serving/ lines ({len(sources)} files): all / code only",
        f"{total:,} / {code:,}",
        "≤ 1,200 (all lines)",
        total <= 1200,
    )


def _code_lines(text: str) -> int:
    tree = ast.parse(text)
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = enumerate(text.splitlines(), 1)
    return sum(
        1
        for i, ln in lines
        if ln.strip() and not ln.lstrip().startswith("#") and i not in docstrings
    )


def format_table(rows: list[Row]) -> str:
    """Markdown table: measurement, value, target, met."""
    mark = {True: "yes", False: "**no**", None: ""}
    lines = ["| measurement | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.measured} | {r.target} | {mark[r.met]} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark the inference service with wrk and print a table."
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=5.0,
        help="duration of each load phase (default 5, 3 to 600)",
    )
    args = parser.parse_args(argv)
    if not 3 <= args.seconds <= 600:  # NaN fails too
        parser.error(f"--seconds must be between 3 and 600, got {args.seconds}")
    if not loadgen.have_wrk():
        print(f"error: {loadgen.WRK_INSTALL_HINT}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        rows = keepalive_rows(args.seconds)
        more, _ = batching_rows(args.seconds)
        rows += more
        rows += hygiene_rows()
        rows.append(library_lines())
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    table = format_table(rows)
    print(table)
    (artifacts_dir("serving") / "bench.md").write_text(table + "\n")
    missed = [r.name for r in rows if r.met is False]
    print(
        f"\n{len(rows) - len(missed) - sum(r.met is None for r in rows)} targets met,"
        f" {len(missed)} missed ({time.perf_counter() - start:.0f} s)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
