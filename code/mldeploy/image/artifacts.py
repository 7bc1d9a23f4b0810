"""``make artifacts``: train the chapter's model and write exactly what the serving image copies.

    python -m mldeploy.image.artifacts [--out artifacts/serve] [--epochs 60] [--seed 0]

Writes ``model.onnx`` (the default image) and ``model_ts_script.pt`` (the TorchScript variant),
each with a ``.sha256`` file that the Docker build checks with ``sha256sum --check``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from mldeploy.cli import positive_int
from mldeploy.image.checksums import verify_checksum, write_checksum

ONNX_NAME = "model.onnx"
TORCHSCRIPT_NAME = "model_ts_script.pt"


@dataclass(frozen=True)
class ServeArtifacts:
    """The files the image needs, and the accuracy of the model they hold."""

    onnx: Path
    torchscript: Path
    test_accuracy: float

    def files(self) -> list[Path]:
        """Every file a COPY line may name: the two models and their checksums."""
        return [
            p
            for model in (self.onnx, self.torchscript)
            for p in (model, model.with_name(model.name + ".sha256"))
        ]


def train_and_export(out_dir: str | Path, *, epochs: int = 60, seed: int = 0) -> ServeArtifacts:
    """Train the two-moons model, export ONNX and TorchScript, write and re-check the checksums."""
    import torch  # only the build needs torch; the image that serves the result does not

    from mldeploy import export, training

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained = training.train_two_moons(epochs=epochs, seed=seed)
    model, split, accuracy = trained.model, trained.split, trained.test_accuracy
    example = torch.from_numpy(split.x_train[:8])
    onnx_path = export.export_onnx(model, example, out / ONNX_NAME)
    ts_path = export.export_torchscript(model, example, out / TORCHSCRIPT_NAME, method="script")
    for path in (onnx_path, ts_path):
        write_checksum(path)
        verify_checksum(path)
    return ServeArtifacts(onnx_path, ts_path, accuracy)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    from mldeploy.paths import REPO_ROOT

    parser = argparse.ArgumentParser(
        description="Write the serving image's model files and checksums."
    )
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "artifacts" / "serve", help="output folder"
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=60, help="training epochs (default 60)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        print(f"error: {args.out} exists and is not a folder", file=sys.stderr)
        return 2
    try:
        result = train_and_export(args.out, epochs=args.epochs, seed=args.seed)
    except OSError as exc:
        print(f"error: cannot write the artifacts to {args.out}: {exc}", file=sys.stderr)
        return 2
    print(f"test accuracy {result.test_accuracy:.4f}; wrote into {args.out.name}/:")
    for path in result.files():
        print(f"  {path.name:<28} {path.stat().st_size:>7} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def ensure(out_dir: str | Path, **kwargs: int) -> ServeArtifacts | None:
    """Build the artifacts unless both models are already there and match their checksums.

    Returns the new build, or ``None`` when the existing files were kept (their accuracy is not
    re-measured).
    """
    from mldeploy.image.checksums import ChecksumError

    out = Path(out_dir)
    try:
        for name in (ONNX_NAME, TORCHSCRIPT_NAME):
            verify_checksum(out / name)
    except ChecksumError:
        return train_and_export(out, **kwargs)
    return None
