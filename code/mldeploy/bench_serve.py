"""``make bench-serve``: start the service in child processes, drive it with wrk, print a table.

Everything is measured in one run, side by side, so the ratios hold on a noisy shared machine even
when the absolute numbers do not. ``python -m mldeploy.bench_serve --seconds 5``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import numpy as np

from mldeploy import loadgen
from mldeploy.paths import artifacts_dir
from mldeploy.runtime import make_session, median_seconds, run_session
from mldeploy.serving_models import WIDE, two_moons_onnx, wide_onnx

BODY = json.dumps({"features": [0.5, -0.3]})


@dataclass(frozen=True)
class Row:
    name: str
    measured: str
    target: str
    met: bool | None  # None: context, no target


def _server(model: str, batching: bool, **extra: str) -> loadgen.ServerProcess:
    env = {"MLDEPLOY_MODEL": model, "MLDEPLOY_BACKEND": "onnx", "MLDEPLOY_BATCHING": "1" if batching else "0", **extra}
    return loadgen.ServerProcess(env)


def _wrk(url: str, connections: int, seconds: float, path: str = "/predict") -> loadgen.WrkResult:
    result = loadgen.run_wrk(url + path, connections=connections, seconds=seconds, body=BODY)
    if result.errors or set(result.codes) - {200}:
        raise RuntimeError(f"{path} at {connections} clients: socket errors {result.errors}, statuses {result.codes}")
    return result


def single_call_ms(model: str, repeats: int = 200) -> float:
    """Median time of one single-sample model call, in this process (ms)."""
    session = make_session(model)
    x = np.array([[0.5, -0.3]], dtype=np.float32)
    return 1e3 * median_seconds(lambda: run_session(session, x), repeats=repeats)


def overhead_rows(seconds: float) -> list[Row]:
    """/predict vs /validate (same body, same server, no model) on the cheap two-moons model."""
    model = str(two_moons_onnx())
    with _server(model, batching=True) as server:
        _wrk(server.url, 64, 1.0)  # warm-up
        runs = {"/validate": [], "/predict": []}
        for _ in range(2):  # interleaved, so drifting background load hits both alike
            for path in runs:
                runs[path].append(_wrk(server.url, 64, seconds / 2, path).throughput)
    validate, predict = (float(np.mean(runs[p])) for p in ("/validate", "/predict"))
    ratio = predict / validate
    return [
        Row("two-moons /validate (no model), 64 clients", f"{validate:,.0f} req/s", "", None),
        Row("two-moons /predict, 64 clients", f"{predict:,.0f} req/s", "", None),
        Row("/predict ÷ /validate throughput", f"{ratio:.2f}x", "≥ 0.80x", ratio >= 0.8),
    ]


def _interleaved(urls: dict[bool, str], connections: int, seconds: float, rounds: int = 3) -> dict[bool, loadgen.WrkResult]:
    """Alternate short runs on two servers; keep each one's median-throughput run."""
    runs: dict[bool, list[loadgen.WrkResult]] = {key: [] for key in urls}
    for _ in range(rounds):
        for key, url in urls.items():
            runs[key].append(_wrk(url, connections, max(1.0, seconds / rounds)))
    return {key: sorted(rs, key=lambda r: r.throughput)[len(rs) // 2] for key, rs in runs.items()}


def batching_rows(seconds: float) -> tuple[list[Row], dict]:
    """Batched vs unbatched on the wide model: 64 clients, 1 client, /health under load, overload."""
    model = str(wide_onnx())
    call_ms = single_call_ms(model)
    rows = [Row(f"wide MLP {WIDE['hidden']}x{WIDE['layers']}: one single-sample call", f"{call_ms:.2f} ms", "≥ 0.5 ms", call_ms >= 0.5)]
    measured: dict = {}
    # both servers run side by side (an idle one costs nothing: no spinning threads)
    with _server(model, batching=True) as batched, _server(model, batching=False) as unbatched:
        urls = {True: batched.url, False: unbatched.url}
        for url in urls.values():
            _wrk(url, 64, 1.0)  # warm-up
        at64 = _interleaved(urls, 64, 2 * seconds)
        at1 = _interleaved(urls, 1, 2 * seconds)
        load = loadgen.start_wrk(batched.url + "/predict", connections=64, seconds=seconds, body=BODY)
        time.sleep(0.5)  # let /predict saturate first
        measured["health"] = loadgen.run_wrk(batched.url + "/health", connections=1, seconds=seconds - 1, method="GET")
        measured["health_load"] = loadgen.finish_wrk(load)
        measured["overload"], measured["probe"] = _overload(batched.url, seconds)
    b64, u64, b1, u1 = at64[True], at64[False], at1[True], at1[False]
    measured.update(b64=b64, u64=u64, b1=b1, u1=u1)
    speedup = b64.throughput / u64.throughput
    rows += [
        Row("unbatched, 64 clients: throughput", f"{u64.throughput:,.0f} req/s", "", None),
        Row("batched, 64 clients: throughput", f"{b64.throughput:,.0f} req/s", "", None),
        Row("batched ÷ unbatched throughput, 64 clients", f"{speedup:.1f}x", "≥ 2x", speedup >= 2),
        Row("64 clients p50: batched | unbatched", f"{b64.p50_ms:.2f} ms | {u64.p50_ms:.2f} ms", "", None),
        Row("64 clients p99: batched | unbatched", f"{b64.p99_ms:.2f} ms | {u64.p99_ms:.2f} ms", "batched ≤ unbatched",
            b64.p99_ms <= u64.p99_ms),
        Row("1 client p50: batched | unbatched", f"{b1.p50_ms:.3f} ms | {u1.p50_ms:.3f} ms", "within 0.3 ms",
            abs(b1.p50_ms - u1.p50_ms) <= 0.3),
        Row("/health p99 while /predict is saturated", f"{measured['health'].p99_ms:.2f} ms", "≤ 5 ms",
            measured["health"].p99_ms <= 5),
    ]
    rows += _overload_rows(measured["overload"], measured["probe"], b64)
    return rows, measured


def _overload(url: str, seconds: float) -> tuple[loadgen.WrkResult, loadgen.ProbeResult]:
    """512 wrk clients plus 8 probe clients that record each answer's status and latency."""
    load = loadgen.start_wrk(url + "/predict", connections=512, seconds=seconds, body=BODY)
    time.sleep(0.5)
    probe = loadgen.probe(url + "/predict", BODY.encode(), connections=8, seconds=seconds - 1)
    return loadgen.finish_wrk(load), probe


def _overload_rows(wrk: loadgen.WrkResult, probe: loadgen.ProbeResult, b64: loadgen.WrkResult) -> list[Row]:
    total = sum(wrk.codes.values())
    shed = wrk.codes.get(503, 0) / total if total else 0.0
    other = {code: n for code, n in wrk.codes.items() if code not in (200, 503)}
    ok, rejected = probe.latencies(200) * 1e3, probe.latencies(503) * 1e3
    rows = [
        Row("512 clients: answers 200 | 503 | other", f"{wrk.codes.get(200, 0):,} | {wrk.codes.get(503, 0):,} | {sum(other.values())}",
            "no other status, no socket error", not other and wrk.errors == 0),
        Row("512 clients: share of 503", f"{shed:.0%}", "", None),
        Row("512 clients: accepted throughput", f"{wrk.codes.get(200, 0) / wrk.seconds:,.0f} req/s", "", None),
    ]
    if len(rejected) and len(ok):
        p50_503, p99_503, p99_ok = np.percentile(rejected, 50), np.percentile(rejected, 99), np.percentile(ok, 99)
        rows += [
            Row("512 clients: 503 latency p50 | p99 (probe)", f"{p50_503:.2f} ms | {p99_503:.2f} ms",
                "fast: p50 ≤ accepted p50", p50_503 <= np.percentile(ok, 50)),
            Row("512 clients: accepted p50 | p99 (probe)", f"{np.percentile(ok, 50):.2f} ms | {p99_ok:.2f} ms",
                "bounded: p99 ≤ 10 × batched 64-client p99", p99_ok <= 10 * b64.p99_ms),
        ]
    else:
        rows.append(Row("512 clients: probe answers 200 | 503", f"{len(ok)} | {len(rejected)}", "both seen", False))
    return rows


def format_table(rows: list[Row]) -> str:
    """Markdown table: measurement, value, target, met."""
    mark = {True: "yes", False: "**no**", None: ""}
    lines = ["| measurement | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.measured} | {r.target} | {mark[r.met]} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the inference service with wrk and print a table.")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each load phase (default 5, at least 3)")
    args = parser.parse_args(argv)
    if not args.seconds >= 3:
        parser.error(f"--seconds must be at least 3, got {args.seconds}")
    if not loadgen.have_wrk():
        print(f"error: {loadgen.WRK_INSTALL_HINT}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        rows = overhead_rows(args.seconds)
        more, _ = batching_rows(args.seconds)
        rows += more
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    table = format_table(rows)
    print(table)
    (artifacts_dir("serving") / "bench_serve.md").write_text(table + "\n")
    missed = [r.name for r in rows if r.met is False]
    print(f"\n{len(rows) - len(missed) - sum(r.met is None for r in rows)} targets met, {len(missed)} missed"
          f" ({time.perf_counter() - start:.0f} s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
