"""Post-training INT8 quantization of ONNX models with ONNX Runtime."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds a float32 array to the calibrator in fixed-size batches, once."""

    def __init__(self, input_name: str, x: np.ndarray, batch_size: int = 64):
        if len(x) == 0:
            raise ValueError("calibration data is empty")
        self._batches = [
            {input_name: np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)}
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


def quantize_int8_static(
    fp32_path: str | Path,
    int8_path: str | Path,
    calibration_x: np.ndarray,
    *,
    input_name: str = "input",
    per_channel: bool = True,
    method: CalibrationMethod = CalibrationMethod.MinMax,
) -> Path:
    """Static INT8 PTQ in QDQ format: weights and activations INT8, ranges from calibration data.

    The model first goes through ``quant_pre_process`` (shape inference and graph clean-up),
    which ONNX Runtime recommends before quantizing.
    """
    int8_path = Path(int8_path)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            model_input=str(prepared),
            model_output=str(int8_path),
            calibration_data_reader=ArrayCalibrationReader(input_name, calibration_x),
            quant_format=QuantFormat.QDQ,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QInt8,
            per_channel=per_channel,
            calibrate_method=method,
        )
    return int8_path
