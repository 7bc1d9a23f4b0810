"""The two models the serving section measures: the course's two-moons MLP (cheap: HTTP overhead
dominates) and a wide MLP whose single-sample call is costly enough for batching to matter."""

from __future__ import annotations

from pathlib import Path

from mldeploy.paths import artifacts_dir
from mldeploy.wide_mlp import build_wide_mlp

WIDE = {"hidden": 1024, "layers": 5}


def two_moons_onnx(out_dir: Path | None = None, *, epochs: int = 20, seed: int = 0) -> Path:
    """Train the two-moons SimpleMLP (seeded) and export it to ONNX; reuse the file if present."""
    out_dir = out_dir or artifacts_dir("serving")
    path = out_dir / "two_moons.onnx"
    if path.is_file():
        return path
    import torch  # only needed to build the file, never to serve it

    from mldeploy import data, export, models, training

    split = data.load_moons(seed=seed)
    training.set_seed(seed)
    model = models.SimpleMLP()
    training.train_classifier(model, split.x_train, split.y_train, epochs=epochs, seed=seed)
    return export.export_onnx(model, torch.from_numpy(split.x_train[:8]), path)


def wide_onnx(out_dir: Path | None = None, *, hidden: int = WIDE["hidden"], layers: int = WIDE["layers"]) -> Path:
    """A wide MLP (seeded random weights) as ONNX; reuse the file if present."""
    out_dir = out_dir or artifacts_dir("serving")
    path = out_dir / f"wide_mlp_{hidden}x{layers}.onnx"
    return path if path.is_file() else build_wide_mlp(path, hidden=hidden, layers=layers)
