"""INT8 post-training quantization (PTQ) of an exported model with ONNX Runtime: dynamic
(weights only, activations quantized on the fly) and static QDQ with calibrated activation ranges.

Works for any model whose one input is an integer or float array (the character LM takes int64
windows, the two-moons classifier float32 features).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from mldeploy.quant import cache
from mldeploy.runtime import quiet_logs, require_model

# Weights in 7 bits (−64…64) instead of 8. ONNX Runtime multiplies u8 activations by s8 weights;
# on CPUs without VNNI (AVX2 only) its kernel adds pairs of products in 16 bits, which saturate for
# full-range weights, so the same file gave held-out perplexity 9.692 on a VNNI CPU and 9.704 on an
# emulated AVX2 Haswell (KL to FP32 0.00012 vs 0.00068; the README's Reproducibility section).
# With 7-bit weights no sum can saturate, and both CPUs compute identical results (checked by
# ``make second-machine``); the price is a coarser step for every weight.
REDUCE_RANGE = True

CALIBRATION_METHODS = {
    "MinMax": CalibrationMethod.MinMax,
    "Entropy": CalibrationMethod.Entropy,
    "Percentile": CalibrationMethod.Percentile,
}


class BatchReader(CalibrationDataReader):
    """Feeds an array to the calibrator in fixed-size batches, keeping its dtype."""

    def __init__(self, input_name: str, x: np.ndarray, batch_size: int = 512):
        if len(x) == 0:
            raise ValueError("calibration data is empty")
        self._batches = [
            {input_name: np.ascontiguousarray(x[i : i + batch_size])}
            for i in range(0, len(x), batch_size)
        ]
        self._position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._position >= len(self._batches):
            return None
        self._position += 1
        return self._batches[self._position - 1]

    def rewind(self) -> None:
        self._position = 0


@contextlib.contextmanager
def _prepared(fp32_path: str | Path) -> Iterator[Path]:
    """``quant_pre_process`` (shape inference, graph clean-up) into a temporary file."""
    require_model(fp32_path)
    with quiet_logs(), tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        yield prepared


def activation_scales(path: str | Path) -> dict[str, float]:
    """Scale of every ``QuantizeLinear`` of a QDQ model, keyed by the tensor it quantizes."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    return {
        node.input[0]: float(numpy_helper.to_array(inits[node.input[1]]))
        for node in proto.graph.node
        if node.op_type == "QuantizeLinear" and node.input[1] in inits
    }


def quantize_int8_dynamic(fp32_path: str | Path, out_path: str | Path) -> Path:
    """Dynamic INT8: INT8 weights per output channel; activation ranges per batch at run time."""
    out_path = Path(out_path)
    with _prepared(fp32_path) as prepared, cache.atomic_output(out_path) as tmp:
        quantize_dynamic(
            str(prepared),
            str(tmp),
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=REDUCE_RANGE,
        )
    return out_path


def quantize_int8_qdq(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: np.ndarray,
    *,
    method: str = "MinMax",
    input_name: str = "input",
) -> Path:
    """Static INT8 in QDQ format: weights per channel, activation ranges from ``calibration`` by
    ``method`` (``MinMax``, ``Entropy`` or ``Percentile``)."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {sorted(CALIBRATION_METHODS)}, got {method!r}")
    out_path = Path(out_path)
    # The histogram calibrators print progress to stdout; keep notebooks quiet.
    with (
        _prepared(fp32_path) as prepared,
        cache.atomic_output(out_path) as tmp,
        contextlib.redirect_stdout(io.StringIO()),
    ):
        quantize_static(
            str(prepared),
            str(tmp),
            calibration_data_reader=BatchReader(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=REDUCE_RANGE,
            calibrate_method=CALIBRATION_METHODS[method],
            # Keep Gemm outputs in float: otherwise the logits themselves are rounded to 256 levels.
            extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]},
        )
    return out_path
