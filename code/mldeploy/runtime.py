"""ONNX Runtime inference and its parity check against PyTorch.

Imports no torch at module level: the serving image runs this module without PyTorch installed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:  # the serving image has no torch; only the parity check takes a torch model
    import torch


def make_session(
    path: str | Path, *, threads: int = 1, spinning: bool = False
) -> ort.InferenceSession:
    """A CPU session with a fixed thread count; spinning off so idle threads do not burn CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_session(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """First output of the session for one float32 input batch."""
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


@dataclass(frozen=True)
class ParityRow:
    batch_size: int
    max_abs_diff: float
    largest_expected: float  # the largest |logit| PyTorch computed for this batch
    share: float  # the largest |Δ| / (atol + rtol·|expected|): 1.0 uses the whole allowance


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def check_parity(
    model: torch.nn.Module,
    session: ort.InferenceSession,
    batch_sizes: Sequence[int],
    *,
    n_features: int = 2,
    atol: float = 1e-5,
    rtol: float = 1.3e-6,
    seed: int = 0,
) -> list[ParityRow]:
    """Compare PyTorch and ONNX Runtime on random batches; raise if any element differs by more
    than ``atol + rtol·|expected|`` (``torch.testing.assert_close``'s float32 defaults: one float32
    step is 7.6e-6 for a logit of 100, so an absolute bound alone fails on rounding noise)."""
    import torch

    rng = np.random.default_rng(seed)
    rows = []
    model.eval()
    for batch in batch_sizes:
        x = rng.normal(size=(batch, n_features)).astype(np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        diff = np.abs(run_session(session, x) - expected)
        share = float((diff / (atol + rtol * np.abs(expected))).max())
        rows.append(ParityRow(batch, float(diff.max()), float(np.abs(expected).max()), share))
        if not share <= 1.0:
            raise AssertionError(
                f"ONNX Runtime differs from PyTorch by {diff.max():.3g} at batch size {batch},"
                f" {share:.1f} times the allowance atol {atol:g} + rtol {rtol:g}·|expected|"
            )
    return rows


def median_seconds(fn: Callable[[], object], *, repeats: int = 50, warmup: int = 5) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls (noise-robust)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Silence the quantization tools' INFO chatter; one of them configures the *root* logger at
    INFO when imported, after which every tool's progress lines would land on stderr."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def require_model(path: str | Path) -> Path:
    """The path of an existing model file, or a clear error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {path}")
    return path
