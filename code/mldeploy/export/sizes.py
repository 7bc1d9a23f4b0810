"""File sizes of exported artifacts, counting an ONNX external-data sidecar when present."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def artifact_bytes(path: str | Path) -> int:
    """Bytes on disk of a model file plus its ``<name>.data`` sidecar, if the exporter wrote one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    sidecar = path.with_name(path.name + ".data")
    return path.stat().st_size + (sidecar.stat().st_size if sidecar.is_file() else 0)


def format_kib(n_bytes: int) -> str:
    """Human size in KiB (1 KiB = 1024 bytes) with two decimals."""
    return f"{n_bytes / 1024:.2f} KiB"


def size_table(paths: Mapping[str, str | Path], indent: str = "") -> str:
    """A two-column text table 'format | size', in the order given."""
    width = max(30, *(len(name) for name in paths))
    lines = [f"{indent}{'Format':<{width}} {'Size':>11}", f"{indent}{'-' * width} {'-' * 11}"]
    for name, path in paths.items():
        lines.append(f"{indent}{name:<{width}} {format_kib(artifact_bytes(path)):>11}")
    return "\n".join(lines)
