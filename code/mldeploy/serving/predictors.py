"""Model backends behind one small interface: ``predict_proba`` on an (n, features) float32 array.

ONNX Runtime is the default. TorchScript (``MLDEPLOY_BACKEND=torchscript``) imports torch only
when constructed, so this module (and the slim serving image) works without PyTorch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from mldeploy.runtime import make_session, run_session, softmax


class Predictor(Protocol):
    """Anything that turns an (n, features) float32 array into (n, classes) probabilities."""

    model_format: str
    n_features: int

    def predict_proba(self, x: np.ndarray) -> np.ndarray: ...


class OnnxPredictor:
    """ONNX Runtime backend, configured for serving.

    One intra-op thread and no spinning: the server already runs requests concurrently, and
    spinning threads would burn a core while idle and steal it from the event loop.
    """

    model_format = "ONNX"

    def __init__(self, path: str | Path, threads: int = 1):
        self._session = make_session(path, threads=threads, spinning=False)
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ValueError(
                f"the model has {len(inputs)} inputs and {len(outputs)} outputs; the service"
                " feeds exactly one input and reads the first output"
            )
        shape = inputs[0].shape
        if inputs[0].type != "tensor(float)" or len(shape) != 2:
            raise ValueError(f"the model's input is {inputs[0].type} {shape}, not a float matrix")
        self.n_features = int(shape[-1]) if isinstance(shape[-1], int) else -1  # -1: not declared

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(run_session(self._session, x))


class TorchScriptPredictor:
    """TorchScript backend: the ``.pt`` file of section 5.1 (torch is imported lazily)."""

    model_format = "TorchScript"
    n_features = 2

    def __init__(self, path: str | Path, threads: int = 1):
        import torch  # lazy: the serving image has no torch

        torch.set_num_threads(threads)
        self._torch = torch
        self._module = torch.jit.load(str(path), map_location="cpu").eval()

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            logits = self._module(self._torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return softmax(logits.numpy())
