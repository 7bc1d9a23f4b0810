"""llama.cpp's own OpenAI-compatible server (``python -m llama_cpp.server``) on a GGUF file.

It runs as a child process on a free loopback port, with one thread (ggml's thread pool spin-waits
and collapses on a busy machine with more), and is always stopped. llama-cpp-python's server holds
one llama.cpp context and answers one request at a time: concurrent requests wait in line. The
same load generator that drives 5.6d's server drives this one: same endpoint, same workload.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(model: Path, alias: str = "tiny-llama", n_ctx: int = 512) -> Iterator[str]:
    """Start the server on ``model``; yield its URL once ``/v1/models`` answers; always stop."""
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model)]
    cmd += ["--model_alias", alias, "--n_ctx", str(n_ctx), "--n_threads", "1"]
    cmd += ["--n_threads_batch", "1", "--host", "127.0.0.1", "--port", str(port)]
    # by default a new request interrupts the stream in progress; queue them instead
    cmd += ["--interrupt_requests", "False", "--verbose", "False"]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"llama_cpp.server exited: {log.read().decode()[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("llama_cpp.server did not answer within 60 s")
                time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
