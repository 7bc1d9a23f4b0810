"""Load generation against a running service: ``wrk`` (a real load generator, separate process),
a small raw-socket probe that records each response's status and latency, and an
``httpx.AsyncClient`` load test for notebooks. Targets must be loopback addresses.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

WRK_INSTALL_HINT = "wrk is not installed: install it with `apt-get install -y wrk` (Debian/Ubuntu) or `brew install wrk`"

# Counts responses by status in every wrk thread and prints one JSON line at the end.
_WRK_SCRIPT = r"""
wrk.method = os.getenv("WRK_METHOD")
wrk.body = os.getenv("WRK_BODY")
if wrk.body ~= "" then wrk.headers["Content-Type"] = "application/json" else wrk.body = nil end
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) codes = {} end
function response(status, headers, body) codes[status] = (codes[status] or 0) + 1 end
function done(summary, latency, requests)
  local parts = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("codes")) do parts[k] = (parts[k] or 0) + v end
  end
  local codes_json = {}
  for k, v in pairs(parts) do table.insert(codes_json, string.format('"%d":%d', k, v)) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"errors":%d,"codes":{%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
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
    url: str, *, connections: int, seconds: float, method: str = "POST", body: str = ""
) -> subprocess.Popen:
    """Start wrk against ``url`` in the background; finish it with :func:`finish_wrk`."""
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


def run_wrk(
    url: str, *, connections: int, seconds: float, method: str = "POST", body: str = ""
) -> WrkResult:
    """Run wrk for ``seconds`` with ``connections`` keep-alive clients; return its measurements."""
    return finish_wrk(
        start_wrk(url, connections=connections, seconds=seconds, method=method, body=body)
    )


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
            # otherwise make a probe land always just after (or always just before) a batch frees room
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
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
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
            await client.get("/health")  # connect before the clock starts
            await ready.wait()
            while queue:
                payload = queue.pop()
                start = time.perf_counter()
                response = await client.post(path, json=payload)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    failures += 1

    ready = asyncio.Event()
    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    await asyncio.sleep(0.2)
    start = time.perf_counter()
    ready.set()
    await asyncio.gather(*tasks)
    return LoadResult(concurrency, np.array(latencies), time.perf_counter() - start, failures)


class ServerProcess:
    """The service (``create_app_from_env`` under uvicorn) in a child process on a free loopback
    port. The parent binds the socket and hands it over: no race between choosing and using a port."""

    def __init__(self, env: dict[str, str], start_timeout: float = 60.0):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(2048)
        self.port = self._sock.getsockname()[1]
        self._env = {**os.environ, **env}
        self._start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        fd = self._sock.fileno()
        cmd = [sys.executable, "-m", "mldeploy.serving.server", "--fd", str(fd)]
        # stderr to a file, not a pipe: nobody reads a pipe while the server runs, and a full one blocks it
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            cmd,
            pass_fds=[fd],
            env=self._env,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,
        )
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self.proc.poll() is not None:
                self._stderr.seek(0)
                err = self._stderr.read().decode(errors="replace").strip()
                self.stop()
                raise RuntimeError(f"server exited with code {self.proc.returncode}: {err[-2000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"server on {self.url} not ready within {self._start_timeout:.0f} s"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # graceful: lifespan shutdown drains the batcher
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._stderr.close()
        self._sock.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
