"""Export a PyTorch model to the deployment formats compared in section 5.1.

Each function writes one file and returns its path. TorchScript (``torch.jit``) is the legacy
path and warns that it is deprecated; ``torch.export`` (``.pt2``) and ONNX are current.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
from torch import nn

MAX_BATCH = 4096  # upper bound of the dynamic batch dimension in exported graphs


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Silence deprecation chatter and the ONNX exporter's 'torchvision is not installed' lines."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _forward_arg_name(model: nn.Module) -> str:
    """Name of the first argument of ``model.forward`` (``dynamic_shapes`` is keyed by it)."""
    params = list(inspect.signature(model.forward).parameters)
    if not params:
        raise ValueError(f"{type(model).__name__}.forward takes no tensor argument")
    return params[0]


def _dynamic_batch(
    model: nn.Module, example: torch.Tensor
) -> dict[str, dict[int, torch.export.Dim]]:
    """``dynamic_shapes`` that make dimension 0 (the batch) dynamic, from 1 to ``MAX_BATCH``."""
    if example.shape[0] < 2:
        # torch.export treats sizes 0 and 1 as constants, so a batch of one would be baked in.
        raise ValueError(
            f"export a dynamic batch from an example of at least 2 rows, got {example.shape[0]}"
        )
    return {_forward_arg_name(model): {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}


def save_state_dict(model: nn.Module, path: str | Path) -> Path:
    """Native PyTorch checkpoint: only the weights; loading needs the model's Python class."""
    path = Path(path)
    torch.save(model.state_dict(), path)
    return path


def contains_text(path: str | Path, text: str) -> bool:
    """Whether a model file holds ``text`` anywhere, inside (compressed) zip archives too."""
    needle = text.encode()
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(needle in archive.read(name) for name in archive.namelist())
    return needle in path.read_bytes()


def strip_torchscript_debug(path: str | Path) -> int:
    """Remove the ``*.debug_pkl`` records (source ranges with absolute paths) from a TorchScript
    archive in place; return how many were removed. The module loads and runs the same without them.
    """
    path = Path(path)
    with zipfile.ZipFile(path) as src:
        kept = [
            (info, src.read(info.filename))
            for info in src.infolist()
            if not info.filename.endswith(".debug_pkl")
        ]
        removed = len(src.infolist()) - len(kept)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as dst:
        for info, payload in kept:
            dst.writestr(info, payload)
    tmp.replace(path)
    return removed


def export_torchscript(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    method: str = "trace",
    strip_debug: bool = True,
) -> Path:
    """Legacy TorchScript export by ``trace`` (records one run) or ``script`` (compiles the source).

    With ``strip_debug`` the debug records, which embed this machine's file paths, are removed.
    """
    if method not in ("trace", "script"):
        raise ValueError(f"method must be 'trace' or 'script', got {method!r}")
    path = Path(path)
    model.eval()
    with quiet_export():
        module = torch.jit.trace(model, example) if method == "trace" else torch.jit.script(model)
        module.save(str(path))
    if strip_debug:
        strip_torchscript_debug(path)
    return path


def export_program(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    dynamic_batch: bool = True,
    strip_debug: bool = True,
) -> Path:
    """Current path: ``torch.export`` captures a whole-graph ``ExportedProgram`` saved as ``.pt2``.

    With ``strip_debug`` the per-node Python stack traces (absolute file paths) are not saved.
    """
    path = Path(path)
    model.eval()
    shapes = _dynamic_batch(model, example) if dynamic_batch else None
    with quiet_export():
        program = torch.export.export(model, (example,), dynamic_shapes=shapes)
        if strip_debug:
            for node in program.graph.nodes:
                node.meta.pop("stack_trace", None)
        torch.export.save(program, path)
    return path


def explain_export_failure(model: nn.Module, example: torch.Tensor) -> str | None:
    """Try ``torch.export`` quietly: a one-line reason if it fails, ``None`` if it succeeds."""
    with (
        quiet_export(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        try:
            torch.export.export(model, (example,))
        except (
            Exception
        ) as exc:  # the exporter raises several error types; all mean "cannot capture"
            first_sentence = str(exc).strip().splitlines()[0].split(" (")[0].rstrip(".")
            name, error = type(model).__name__, type(exc).__name__
            return f"torch.export cannot capture {name}: {error}: {first_sentence}"
    return None


def strip_onnx_metadata(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the exporter's debug metadata: Python stack traces with local paths, FX node names.

    It is useless at inference time, leaks the build machine's file paths, and makes the file
    size depend on where the export ran.
    """
    for graph in [proto.graph]:
        for item in [
            *graph.node,
            *graph.value_info,
            *graph.initializer,
            *graph.input,
            *graph.output,
        ]:
            del item.metadata_props[:]
    for function in proto.functions:
        for node in function.node:
            del node.metadata_props[:]
    return proto


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    input_name: str = "input",
    output_name: str = "logits",
    strip_debug: bool = True,
) -> Path:
    """Export with the torch.export-based ONNX exporter into one self-contained ``.onnx`` file.

    The batch dimension is dynamic (``dynamic_shapes``, the successor of ``dynamic_axes``); weights
    are kept inside the file (``external_data=False``) and the result passes ``onnx.checker``.
    With ``strip_debug`` the exporter's debug metadata is removed (see :func:`strip_onnx_metadata`).
    """
    path = Path(path)
    model.eval()
    shapes = _dynamic_batch(model, example) if dynamic_batch else None
    with quiet_export():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes=shapes,
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    proto = onnx.load(str(path))
    if strip_debug:
        onnx.save(strip_onnx_metadata(proto), str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path


def export_all(model: nn.Module, example: torch.Tensor, out_dir: str | Path) -> dict[str, Path]:
    """Write every format of the comparison table; keys are human-readable format names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "Native PyTorch (.pt)": save_state_dict(model, out / "model_state_dict.pt"),
        "TorchScript trace (.pt)": export_torchscript(
            model, example, out / "model_ts_trace.pt", "trace"
        ),
        "TorchScript script (.pt)": export_torchscript(
            model, example, out / "model_ts_script.pt", "script"
        ),
        "torch.export (.pt2)": export_program(model, example, out / "model.pt2"),
        "ONNX (.onnx)": export_onnx(model, example, out / "model.onnx"),
    }
