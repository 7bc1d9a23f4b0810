"""Load generation against a running service: ``wrk`` (a real load generator, separate process),
a small raw-socket probe that records each response's status and latency, and an
``httpx.AsyncClient`` load test for notebooks. Targets must be loopback addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.client
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

WRK_INSTALL_HINT = (
    "wrk is not installed: install it with `apt-get install -y wrk` (Debian/Ubuntu)"
    " or `brew install wrk`"
)

# Counts responses by status in every wrk thread and prints one JSON line at the end. Two optional
# behaviors, set by the environment:
# - WRK_INTERVAL_MS: pace each wrk thread to one request per interval (an open loop: the offered
#   rate stays fixed whatever the answers, as long as enough connections are free to send);
# - WRK_RETRY_AFTER=1: after a 503 with Retry-After, a connection waits that many seconds, scaled
#   by a random factor in [0.5, 1.5) (jitter, so refused clients do not all come back together).
_WRK_SCRIPT = r"""
local ffi = require("ffi")
ffi.cdef[[
  typedef struct { long s; long ns; } mldeploy_ts;
  int clock_gettime(int, mldeploy_ts *);
]]
local ts = ffi.new("mldeploy_ts")
local function now_ms()  -- CLOCK_MONOTONIC, in milliseconds
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.s) * 1e3 + tonumber(ts.ns) / 1e6
end
wrk.method = os.getenv("WRK_METHOD")
wrk.body = os.getenv("WRK_BODY")
if wrk.body ~= "" then wrk.headers["Content-Type"] = "application/json" else wrk.body = nil end
local interval = tonumber(os.getenv("WRK_INTERVAL_MS") or "") or 0
local honor = os.getenv("WRK_RETRY_AFTER") == "1"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) codes = {}; owed = {}; slot = nil; math.randomseed(math.floor(now_ms())) end
function delay()
  if #owed > 0 then return table.remove(owed) end
  if interval <= 0 then return 0 end
  local t = now_ms()
  if slot == nil or slot < t then slot = t end
  local wait = slot - t
  slot = slot + interval
  return math.floor(wait)
end
function response(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
  local after = tonumber(headers["retry-after"] or headers["Retry-After"] or "")
  if honor and status == 503 and after then
    table.insert(owed, math.floor(1e3 * after * (0.5 + math.random())))
  end
end
function done(summary, latency, requests)
  local parts = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("codes")) do parts[k] = (parts[k] or 0) + v end
  end
  local codes_json = {}
  for k, v in pairs(parts) do table.insert(codes_json, string.format('"%d":%d', k, v)) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
      .. '"errors":%d,"codes":{%s}}\n',
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, table.concat(codes_json, ",")))
end
"""


def require_loopback(url: str) -> None:
    """Load tests may only target this machine."""
    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"load tests target only the loopback interface, not {host!r}")


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run measured (latencies in milliseconds)."""

    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    codes: dict[int, int]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    @property
    def ok(self) -> int:
        return self.codes.get(200, 0)


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def start_wrk(
    url: str,
    *,
    connections: int,
    seconds: float,
    method: str = "POST",
    body: str = "",
    rate: float | None = None,
    retry_after: bool = False,
) -> subprocess.Popen:
    """Start wrk against ``url`` in the background; finish it with :func:`finish_wrk`.

    ``rate``: offer this many requests per second in all (an open loop) instead of sending again
    as soon as an answer arrives; ``retry_after``: clients honor ``Retry-After`` on a 503."""
    require_loopback(url)
    if not have_wrk():
        raise RuntimeError(WRK_INSTALL_HINT)
    script = Path(tempfile.gettempdir()) / f"mldeploy-wrk-{os.getpid()}.lua"
    script.write_text(_WRK_SCRIPT)
    threads = 1 if connections < 8 else 2
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    env = {**os.environ, "WRK_METHOD": method, "WRK_BODY": body}
    env["WRK_INTERVAL_MS"] = f"{1e3 * threads / rate:.4f}" if rate else "0"
    env["WRK_RETRY_AFTER"] = "1" if retry_after else "0"
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish_wrk(proc: subprocess.Popen) -> WrkResult:
    out, err = proc.communicate(timeout=120)
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {err.strip() or out.strip()}")
    d = json.loads(line[len("WRKJSON ") :])
    return WrkResult(
        d["requests"],
        d["duration_us"] / 1e6,
        d["p50_us"] / 1e3,
        d["p90_us"] / 1e3,
        d["p99_us"] / 1e3,
        d["errors"],
        {int(k): v for k, v in d["codes"].items()},
    )


def run_wrk(url: str, *, connections: int, seconds: float, **options: object) -> WrkResult:
    """Run wrk for ``seconds`` with ``connections`` keep-alive clients; return its measurements
    (``options``: those of :func:`start_wrk`)."""
    return finish_wrk(start_wrk(url, connections=connections, seconds=seconds, **options))


@dataclass
class ProbeResult:
    """Per-response (status, latency in seconds) pairs from :func:`probe`."""

    samples: list[tuple[int, float]] = field(default_factory=list)

    def latencies(self, status: int) -> np.ndarray:
        return np.array([t for s, t in self.samples if s == status])


async def _probe_connection(
    host: str, port: int, request: bytes, until: float, out: ProbeResult, seed: int
) -> None:
    rng = random.Random(seed)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < until:
            # a random pause breaks phase-locking with the server's batch cycle, which would
            # otherwise make a probe land always just after (or just before) a batch frees room
            await asyncio.sleep(rng.uniform(0, 0.02))
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(ln.split(b":")[1])
                for ln in head.split(b"\r\n")
                if ln.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            out.samples.append((int(head[9:12]), time.perf_counter() - start))
    finally:
        writer.close()


async def _probe(url: str, body: bytes, connections: int, seconds: float) -> ProbeResult:
    parts = urlsplit(url)
    request = http_request(url, body)
    out = ProbeResult()
    until = time.perf_counter() + seconds
    await asyncio.gather(
        *(
            _probe_connection(parts.hostname, parts.port, request, until, out, i)
            for i in range(connections)
        )
    )
    return out


def probe(url: str, body: bytes, *, connections: int = 8, seconds: float = 5.0) -> ProbeResult:
    """Closed-loop keep-alive clients on raw sockets recording each response's status and latency
    (wrk reports latency over all responses; this splits it by status)."""
    require_loopback(url)
    return asyncio.run(_probe(url, body, connections, seconds))


@dataclass(frozen=True)
class LoadResult:
    """An ``httpx.AsyncClient`` load test: latencies (s) of successful requests and wall time."""

    concurrency: int
    latencies: np.ndarray
    seconds: float
    failures: int

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1e3)

    @classmethod
    def pooled(cls, runs: list[LoadResult]) -> LoadResult:
        """Several runs at one concurrency as one: every latency, the time of all of them."""
        return cls(
            runs[0].concurrency,
            np.concatenate([r.latencies for r in runs]),
            sum(r.seconds for r in runs),
            sum(r.failures for r in runs),
        )


async def async_load(
    url: str, payloads: list[dict], *, concurrency: int, path: str = "/predict"
) -> LoadResult:
    """Send every payload once from ``concurrency`` closed-loop workers, each with its own
    ``httpx.AsyncClient`` and connection (one shared pool scans all its connections for every
    request, which makes the client itself the bottleneck at high concurrency)."""
    require_loopback(url)
    queue = list(reversed(payloads))
    latencies: list[float] = []
    failures = 0

    async def worker() -> None:
        nonlocal failures
        async with httpx.AsyncClient(
            base_url=url, timeout=30.0, limits=httpx.Limits(max_connections=1)
        ) as client:
            try:
                await client.get("/health")  # connect before the clock starts
            finally:
                connected.release()  # connected, or failed: gather below raises its error
            await ready.wait()
            while queue:
                payload = queue.pop()
                start = time.perf_counter()
                response = await client.post(path, json=payload)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    failures += 1

    connected, ready = asyncio.Semaphore(0), asyncio.Event()
    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    for _ in tasks:
        await connected.acquire()
    # The client's garbage collector stops every worker at once (a full collection of a
    # notebook kernel takes tens of ms, 5.2.7), and its pause would be measured as the server's.
    collecting = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        ready.set()
        await asyncio.gather(*tasks)
        seconds = time.perf_counter() - start
    finally:
        if collecting:
            gc.enable()
    return LoadResult(concurrency, np.array(latencies), seconds, failures)


async def post_with_retries(
    client: httpx.AsyncClient,
    path: str,
    body: dict,
    *,
    tries: int = 5,
    rng: random.Random | None = None,
) -> httpx.Response:
    """POST ``body``; after a 503, wait and try again, at most ``tries`` times in all.

    The wait is the server's ``Retry-After`` (1 s if it sends none), doubled after each refusal
    (exponential backoff), times a random factor in [0.5, 1.5) (jitter: clients refused together
    come back spread out, not as one wave that is refused together again)."""
    rng = rng or random.Random()
    for attempt in range(tries):
        response = await client.post(path, json=body)
        if response.status_code != 503 or attempt == tries - 1:
            break
        try:
            retry_after = float(response.headers.get("retry-after", "1"))
        except ValueError:  # an HTTP date instead of seconds: wait the default
            retry_after = 1.0
        await asyncio.sleep(retry_after * 2**attempt * rng.uniform(0.5, 1.5))
    return response


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Status and whether the server will close the connection, of one HTTP/1.1 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(ln.split(b":")[1]) for ln in lines if ln.startswith(b"content-length:"))
    await reader.readexactly(length)
    return int(head[9:12]), any(ln == b"connection: close" for ln in lines)


def http_request(url: str, body: bytes = b"", method: str = "POST") -> bytes:
    """The raw bytes of one HTTP/1.1 request with a JSON body."""
    parts = urlsplit(url)
    return (
        f"{method} {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@dataclass
class SlowClientsResult:
    """Connections that dripped bytes or stayed silent, and when the server closed each (s)."""

    dripping: list[float | None]
    silent: list[float | None]

    def closed_within(self, seconds: float) -> bool:
        return all(t is not None and t <= seconds for t in self.dripping + self.silent)

    @property
    def still_open(self) -> int:
        return sum(t is None for t in self.dripping + self.silent)


async def _slow_client(host: str, port: int, drip: bytes, seconds: float) -> float | None:
    """Open a connection, send ``drip`` one byte a second (or nothing); seconds until the server
    closed it, None if it was still open after ``seconds``."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for i in range(int(seconds) + 1):
            if drip:
                writer.write(drip[i % len(drip) : i % len(drip) + 1])
            try:
                data = await asyncio.wait_for(reader.read(1024), 1.0)
            except TimeoutError:
                continue
            except ConnectionError:
                return time.perf_counter() - start
            if not data:  # EOF: the server closed the connection
                return time.perf_counter() - start
        return None
    finally:
        writer.close()


async def slow_clients(
    url: str, *, dripping: int = 20, silent: int = 10, seconds: float = 10.0
) -> SlowClientsResult:
    """Slowloris-style clients: ``dripping`` send a request one header byte a second, ``silent``
    send nothing; each waits up to ``seconds`` for the server to close it."""
    require_loopback(url)
    parts = urlsplit(url)
    drip = http_request(url + "/predict", b'{"features": [0.5, -0.3]}')
    tasks = [_slow_client(parts.hostname, parts.port, drip, seconds) for _ in range(dripping)]
    tasks += [_slow_client(parts.hostname, parts.port, b"", seconds) for _ in range(silent)]
    times = await asyncio.gather(*tasks)
    return SlowClientsResult(list(times[:dripping]), list(times[dripping:]))


@dataclass
class DrainResult:
    """What clients saw while the server was stopped with SIGTERM (times in s after the signal)."""

    ready_503_after: float | None  # /ready (admin port) first answered 503
    listener_closed_after: float | None  # a new connection was first refused
    exited_after: float | None
    answered_in_drain: int = 0  # complete responses received after the signal
    newcomers_served: int = 0  # new connections opened after the signal and answered
    moved: int = 0  # keep-alive clients told `Connection: close` (they go to another replica)
    reset: int = 0  # requests written whose response never came
    statuses: dict[int, int] = field(default_factory=dict)


async def _one_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, out: DrainResult
) -> bool | None:
    """Send one request; True if the server asked to close, None if the answer never came."""
    writer.write(request)
    try:
        status, closing = await asyncio.wait_for(_read_response(reader), 30)
    except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
        out.reset += 1
        return None
    out.statuses[status] = out.statuses.get(status, 0) + 1
    return closing


async def _keep_alive_client(
    host: str, port: int, request: bytes, t0: list[float], out: DrainResult
) -> None:
    """A client on one keep-alive connection until the server tells it to go."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            closing = await _one_exchange(reader, writer, request, out)
            if closing is None:
                return
            if t0:
                out.answered_in_drain += 1
            if closing:
                out.moved += 1
                return
            await asyncio.sleep(0.002)
    finally:
        writer.close()


async def _newcomers(host: str, port: int, request: bytes, t0: list[float], out: DrainResult):
    """After the signal, a new client every 50 ms (traffic still routed here during the drain)."""
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except ConnectionError:
            out.listener_closed_after = time.perf_counter() - t0[0]
            return
        try:
            if await _one_exchange(reader, writer, request, out) is not None:
                out.newcomers_served += 1
                out.answered_in_drain += 1
        finally:
            writer.close()
        await asyncio.sleep(0.05)


async def drain_under_load(
    server: object, body: bytes, *, clients: int = 32, warmup: float = 1.0, limit: float = 60.0
) -> DrainResult:
    """``clients`` keep-alive clients POST ``body`` to ``server`` (a child-process
    ``BackgroundServer``) when it gets SIGTERM; new clients keep arriving during the drain and a
    watcher polls /ready on the admin port. Ends when the process has exited."""
    url = server.url + "/predict"  # type: ignore[attr-defined]
    require_loopback(url)
    parts, request = urlsplit(url), http_request(url, body)
    out, t0 = DrainResult(None, None, None), []
    tasks = [
        asyncio.ensure_future(_keep_alive_client(parts.hostname, parts.port, request, t0, out))
        for _ in range(clients)
    ]
    await asyncio.sleep(warmup)
    proc = server.proc  # type: ignore[attr-defined]
    async with httpx.AsyncClient(base_url=server.admin_url, timeout=2) as admin:  # type: ignore[attr-defined]
        server.terminate()  # type: ignore[attr-defined]
        t0.append(time.perf_counter())
        tasks.append(
            asyncio.ensure_future(_newcomers(parts.hostname, parts.port, request, t0, out))
        )
        while proc.poll() is None and time.perf_counter() - t0[0] < limit:
            if out.ready_503_after is None:
                with contextlib.suppress(httpx.HTTPError):
                    if (await admin.get("/ready")).status_code == 503:
                        out.ready_503_after = time.perf_counter() - t0[0]
            await asyncio.sleep(0.02)
    if proc.poll() is not None:
        out.exited_after = time.perf_counter() - t0[0]
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    return out


def _median_ms(call: Callable[[], object], n: int) -> float:
    """The median time (ms) of ``n`` calls, after one that is not counted (it opens the
    connection)."""
    call()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(1e3 * (time.perf_counter() - start))
    return float(np.median(times))


def keepalive_median_ms(
    url: str, n: int = 20, method: str = "GET", body: str | None = None, headers: dict | None = None
) -> float:
    """The median time (ms) of ``n`` requests over one keep-alive ``http.client`` connection."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)

    def request() -> None:
        conn.request(method, parts.path or "/", body=body, headers=headers or {})
        conn.getresponse().read()

    try:
        return _median_ms(request, n)
    finally:
        conn.close()


def keepalive_medians(url: str, body: str, n: int = 50) -> dict[str, float]:
    """Median ``POST url`` time (ms) of ``n`` requests for curl, httpx, requests and http.client,
    each reusing one connection (the first request, which opens it, is not counted)."""
    import statistics

    import requests

    headers = {"Content-Type": "application/json"}

    medians = {}
    with httpx.Client(headers=headers) as client:
        medians["httpx.Client"] = _median_ms(
            lambda: client.post(url, content=body).raise_for_status(), n
        )
    with requests.Session() as session:
        medians["requests.Session"] = _median_ms(
            lambda: session.post(url, data=body, headers=headers).raise_for_status(), n
        )
    medians["http.client"] = keepalive_median_ms(url, n, "POST", body, headers)
    if shutil.which("curl"):  # one invocation, n + 1 URLs: curl reuses its connection
        args = ["curl", "-s"]
        for _ in range(n + 1):
            args += ["-o", "/dev/null", "-H", "Content-Type: application/json", "-d", body]
            args += ["-w", "%{time_total}\\n", url, "--next"]
        out = subprocess.run(args[:-1], capture_output=True, text=True, timeout=60, check=True)
        seconds = [float(x) for x in out.stdout.split()][1:]
        medians["curl"] = statistics.median(1e3 * s for s in seconds)
    return medians
