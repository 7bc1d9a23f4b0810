"""The chapter's end-to-end demo: train → export → compare → ONNX Runtime → INT8 → serve → check.

``code/serve_model.py`` (and ``make demo``) run :func:`main`. Every number printed is measured in
this run; a failing step stops the demo with a message naming the step and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from mldeploy import data, export, models, reproducibility, runtime, serving, training
from mldeploy.cli import positive_int
from mldeploy.export import sizes
from mldeploy.paths import REPO_ROOT, artifacts_dir
from mldeploy.quant import int8_ptq
from mldeploy.settings import SettingsError

N_STEPS = 8
RULE = "=" * 65
PAD = " " * 7
SAMPLE_POINTS = [[1.2, 0.8], [-1.0, -0.5], [0.0, 1.2], [-0.8, -1.0], [1.5, -0.2]]


class StepFailed(RuntimeError):
    """A pipeline step raised; carries the step number and title for the error message."""

    def __init__(self, number: int, title: str, cause: BaseException):
        super().__init__(
            f"step {number}/{N_STEPS} ({title}) failed: {type(cause).__name__}: {cause}"
        )
        self.number = number


@dataclass
class DemoResult:
    """Everything the demo measured, for the summary block and for notebooks."""

    test_accuracy: float = 0.0
    sizes: dict[str, int] = field(default_factory=dict)
    onnx_accuracy: float = 0.0
    onnx_max_abs_diff: float = 0.0
    onnx_latency_us: float = 0.0
    int8_bytes: int = 0
    int8_accuracy: float = 0.0
    api_latency_ms: float = 0.0
    api_format: str = ""
    batch_predictions: list[int] = field(default_factory=list)


@contextlib.contextmanager
def _step(number: int, title: str) -> Iterator[None]:
    print(f"\n[{number}/{N_STEPS}] {title}...", flush=True)
    try:
        yield
    except Exception as exc:  # every failure becomes one clear message naming the step
        raise StepFailed(number, title, exc) from exc


def _kib(n_bytes: int) -> str:
    return sizes.format_kib(n_bytes)


def run_demo(
    out_dir: Path, *, epochs: int = 60, seed: int = 0, backend: str = "onnx"
) -> DemoResult:
    """Run the eight steps, printing progress in the chapter's format; return the measurements."""
    result = DemoResult()
    print(RULE + "\n  ML Model Deployment Pipeline Demo\n" + RULE)

    with _step(1, "Generating synthetic data (two moons)"):
        split = data.load_moons(seed=seed)
        print(f"{PAD}Train: {len(split.x_train)} samples, Test: {len(split.x_test)} samples")

    with _step(2, "Training simple MLP classifier"):
        report = {1, epochs} | set(range(10, epochs + 1, 10))

        def show(epoch: int, loss: float) -> None:
            if epoch in report:
                print(f"  Epoch {epoch:>3}/{epochs}  loss={loss:.6f}", flush=True)

        model = training.train_two_moons(epochs=epochs, seed=seed, on_epoch=show).model
        train_acc = training.accuracy(training.predict_logits(model, split.x_train), split.y_train)
        result.test_accuracy = training.accuracy(
            training.predict_logits(model, split.x_test), split.y_test
        )
        print(
            f"\n{PAD}Train accuracy: {train_acc:.4f}"
            f"\n{PAD}Test accuracy:  {result.test_accuracy:.4f}"
        )

    with _step(3, "Exporting models"):
        paths = export.export_all(model, torch.from_numpy(split.x_train[:8]), out_dir)
        print(f"{PAD}into {_shown(out_dir)}/")
        for name, path in paths.items():
            print(f"{PAD}{name:<28} -> {path.name}")

    with _step(4, "Model size comparison"):
        print(sizes.size_table(paths, indent=PAD))
        result.sizes = {name: sizes.artifact_bytes(path) for name, path in paths.items()}

    onnx_path = paths["ONNX (.onnx)"]
    with _step(5, "ONNX Runtime inference test"):
        session = runtime.make_session(onnx_path)
        logits = runtime.run_session(session, split.x_test)
        result.onnx_accuracy = training.accuracy(logits, split.y_test)
        result.onnx_max_abs_diff = float(
            np.abs(logits - training.predict_logits(model, split.x_test)).max()
        )
        if result.onnx_max_abs_diff > 1e-4:
            raise AssertionError(
                f"ONNX Runtime and PyTorch disagree by {result.onnx_max_abs_diff:.2e}"
            )
        batch = split.x_test[:32]
        result.onnx_latency_us = 1e6 * runtime.median_seconds(
            lambda: runtime.run_session(session, batch), repeats=200
        )
        n = len(split.x_test)
        print(f"{PAD}ONNX Runtime accuracy ({n} samples): {result.onnx_accuracy:.4f}")
        print(f"{PAD}Max |ONNX - PyTorch| ({n} samples): {result.onnx_max_abs_diff:.1e}")
        print(
            f"{PAD}Inference time (32 samples):        "
            f"{result.onnx_latency_us:.1f} µs (median of 200)"
        )

    with _step(6, "Post-training INT8 quantization"):
        int8_path = int8_ptq.quantize_int8_qdq(
            onnx_path, out_dir / "model_int8.onnx", split.x_train[:256]
        )
        result.int8_bytes = sizes.artifact_bytes(int8_path)
        result.int8_accuracy = training.accuracy(
            runtime.run_session(runtime.make_session(int8_path), split.x_test), split.y_test
        )
        fp32_bytes = result.sizes["ONNX (.onnx)"]
        print(f"{PAD}INT8 model size:  {_kib(result.int8_bytes)}")
        print(f"{PAD}FP32 model size:  {_kib(fp32_bytes)}")
        print(f"{PAD}INT8 file ÷ FP32 file: {result.int8_bytes / fp32_bytes:.3f}")
        print(f"{PAD}INT8 accuracy ({n} samples):    {result.int8_accuracy:.4f}")
        print(f"{PAD}FP32 accuracy ({n} samples):    {result.onnx_accuracy:.4f}")

    with _step(7, "Starting FastAPI server"):
        if backend == "torchscript":
            load = lambda: serving.TorchScriptPredictor(paths["TorchScript script (.pt)"])  # noqa: E731
        else:
            load = lambda: serving.OnnxPredictor(onnx_path)  # noqa: E731
        server = serving.BackgroundServer(serving.create_app(load)).start()
        print(f"{PAD}Listening on {server.url} (a free loopback port)")

    try:
        with _step(8, "Testing /health, /predict and /predict_batch with httpx"):
            _check_endpoints(server.url, result)
    finally:
        server.stop()
        print(f"{PAD}Server stopped; port {server.port} released.")

    _print_summary(model, result)
    return result


def _check_endpoints(url: str, result: DemoResult) -> None:
    with httpx.Client(base_url=url, timeout=10.0) as client:
        health = client.get("/health")
        health.raise_for_status()
        print(f"{PAD}GET /health  -> {health.status_code} {health.json()}")
        response = client.post("/predict", json={"features": [0.5, -0.3]})
        response.raise_for_status()
        body = response.json()
        result.api_format = body["model_format"]
        print(f"{PAD}POST /predict -> {response.status_code}")
        fields = ",\n".join(
            f"{PAD} {json.dumps(key)}: {json.dumps(value)}" for key, value in body.items()
        )
        print(f"{PAD}Response:       {{\n{fields}\n{PAD}}}")
        latencies = []
        for _ in range(50):
            start = time.perf_counter()
            client.post("/predict", json={"features": [0.5, -0.3]}).raise_for_status()
            latencies.append(time.perf_counter() - start)
        result.api_latency_ms = 1e3 * float(np.median(latencies))
        print(f"{PAD}API latency:    {result.api_latency_ms:.2f} ms (median of 50 requests)")
        batch = client.post(
            "/predict_batch", json={"items": [{"features": p} for p in SAMPLE_POINTS]}
        )
        batch.raise_for_status()
        answer = batch.json()
        result.batch_predictions = answer["predictions"]
        print(f"\n{PAD}Batch of {len(SAMPLE_POINTS)} predictions (POST /predict_batch):")
        for point, label, probs in zip(
            SAMPLE_POINTS, answer["predictions"], answer["probabilities"]
        ):
            shown = [round(p, 2) for p in probs]
            print(f"{PAD}  {str(point):<12} -> class={label}  probs={shown}")


def _print_summary(model: models.SimpleMLP, result: DemoResult) -> None:
    onnx_bytes = result.sizes["ONNX (.onnx)"]
    backend = {"ONNX": "ONNX Runtime"}.get(result.api_format, result.api_format)
    rows = [
        ("Model", model.describe()),
        ("Test accuracy", f"{result.test_accuracy:.4f}"),
        ("Native size", _kib(result.sizes["Native PyTorch (.pt)"])),
        ("TorchScript trace", _kib(result.sizes["TorchScript trace (.pt)"])),
        ("torch.export size", _kib(result.sizes["torch.export (.pt2)"])),
        ("ONNX FP32 size", _kib(onnx_bytes)),
        ("ONNX INT8 size", _kib(result.int8_bytes)),
        ("INT8 ÷ FP32 size", f"{result.int8_bytes / onnx_bytes:.2f}"),
        ("API format", f"FastAPI + {backend}"),
        ("API test", "PASSED (httpx client)"),
    ]
    print("\n" + RULE + "\n  Demo Summary\n" + RULE)
    for key, value in rows:
        print(f"  {key + ':':<20}{value}")
    print(RULE + "\n  All deployment steps completed successfully!\n" + RULE)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description="Run the chapter's end-to-end deployment demo.")
    parser.add_argument(
        "--epochs", type=positive_int, default=60, help="training epochs (default 60)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--backend", choices=["onnx", "torchscript"], default="onnx", help="serving backend"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="artifact folder (default artifacts/demo)"
    )
    args = parser.parse_args(argv)
    try:
        reproducibility.pin_compute_path()  # the demo's numbers match 5.5's stored output
    except (reproducibility.NotPinned, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        out_dir = args.out if args.out is not None else artifacts_dir("demo")
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot use {args.out} as the artifact folder: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        run_demo(out_dir, epochs=args.epochs, seed=args.seed, backend=args.backend)
    except StepFailed as exc:
        print(f"\nDEMO FAILED — {exc}", file=sys.stderr)
        return 1
    print(f"  Total time: {time.perf_counter() - start:.1f} s")
    return 0


def _shown(folder: Path) -> str:
    """``folder`` as a reader finds it: relative to the repository when inside it."""
    folder = Path(folder).resolve()
    return str(folder.relative_to(REPO_ROOT) if folder.is_relative_to(REPO_ROOT) else folder)


def run_script(out_dir: Path, *args: str, timeout: float = 300) -> str | None:
    """Run ``code/serve_model.py`` in a child process, as a reader would from a shell; return its
    output, or print one sentence and return ``None`` when it fails or runs out of time."""
    from mldeploy import timeouts

    limit = timeouts.scaled(timeout)
    command = [sys.executable, str(REPO_ROOT / "code" / "serve_model.py"), "--out", str(out_dir)]
    try:
        done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        print(
            f"The demo did not finish within {limit:.0f} s: the machine is busy or slow. "
            f"Close other programs, or set {timeouts.ENV}=3 before starting Jupyter, "
            "and run the cell again."
        )
        return None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        print(f"The demo stopped with exit code {done.returncode}: {last}")
        return None
    return done.stdout
