"""The models the serving section measures: the course's two-moons MLP (cheap: HTTP overhead
dominates), a wide MLP whose single-sample call is costly enough for batching to matter, and
``DelayedPredictor``, any model made slower by a fixed delay."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mldeploy.paths import artifacts_dir
from mldeploy.quant.cache import atomic_output
from mldeploy.serving.predictors import Predictor

WIDE = {"hidden": 1024, "layers": 5}


# The source files the two-moons ONNX file depends on: an edit to any of them builds a new file.
TWO_MOONS_SOURCES = ("training.py", "models.py", "data.py", "export/formats.py")


def two_moons_onnx(out_dir: Path | None = None, *, seed: int = 0) -> Path:
    """The chapter's two-moons model (``training.train_two_moons``) as ONNX; reuses the file
    while the code that trains and exports it is unchanged."""
    digest = hashlib.sha256(f"seed={seed}".encode())
    for name in TWO_MOONS_SOURCES:
        digest.update((Path(__file__).parents[1] / name).read_bytes())
    folder = (out_dir or artifacts_dir("serving")) / f"two-moons-{digest.hexdigest()[:12]}"
    path = folder / "two_moons.onnx"
    if path.is_file():
        return path
    import torch  # only needed to build the file, never to serve it

    from mldeploy import export, training

    trained = training.train_two_moons(seed=seed)
    with atomic_output(path) as tmp:  # a notebook and a test may build it at the same time
        export.export_onnx(trained.model, torch.from_numpy(trained.split.x_train[:8]), tmp)
    return path


def wide_onnx(
    out_dir: Path | None = None, *, hidden: int = WIDE["hidden"], layers: int = WIDE["layers"]
) -> Path:
    """A wide MLP (seeded random weights) as ONNX; reuse the file if present."""
    out_dir = out_dir or artifacts_dir("serving")
    path = out_dir / f"wide_mlp_{hidden}x{layers}.onnx"
    return path if path.is_file() else build_wide_mlp(path, hidden=hidden, layers=layers)


def build_wide_mlp(
    path: str | Path,
    *,
    hidden: int = 1024,
    layers: int = 3,
    n_features: int = 2,
    n_classes: int = 2,
    seed: int = 0,
) -> Path:
    """Write ``n_features → hidden (× layers, ReLU) → n_classes`` to ``path`` (He-initialised)."""
    if hidden < 1 or layers < 1:
        raise ValueError("hidden and layers must be positive")
    rng = np.random.default_rng(seed)
    sizes = [n_features] + [hidden] * layers + [n_classes]
    nodes, inits, x = [], [], "input"
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
        ]
        x = f"a{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "wide_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_classes])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="mldeploy"
    )
    onnx.checker.check_model(model)
    path = Path(path)
    with atomic_output(path) as tmp:
        onnx.save(model, tmp)
    return path


class DelayedPredictor:
    """Wraps a predictor and adds a fixed delay to every call: a stand-in for a heavier model in
    demos and tests (``time.sleep`` releases the GIL, as ONNX Runtime does while it computes)."""

    def __init__(self, inner: Predictor, delay_s: float):
        self.inner, self.delay_s = inner, delay_s
        self.model_format, self.n_features = inner.model_format, inner.n_features

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        time.sleep(self.delay_s)
        return self.inner.predict_proba(x)
