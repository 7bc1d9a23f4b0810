"""The chapter's inference service (section 5.2): FastAPI + ONNX Runtime, dynamic micro-batching.

``python -m mldeploy.serving`` serves the model named by the environment (``mldeploy.settings``).
Names are imported on first use: the image's HEALTHCHECK (``mldeploy.serving.healthcheck``) must
not pay for FastAPI and ONNX Runtime, nor the slim image for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "mldeploy.serving.app": "create_app create_app_from_env enable_access_log",
    "mldeploy.serving.batching": "BatchResult DeadlineExceeded MicroBatcher ModelError QueueFull"
    " Unavailable",
    "mldeploy.serving.hardening": "Admission AdminServer BodySizeLimit ConnectionGuard",
    "mldeploy.serving.predictors": "OnnxPredictor Predictor TorchScriptPredictor",
    "mldeploy.serving.schemas": "BatchRequest BatchResponse PredictRequest PredictResponse",
    "mldeploy.serving.server": "DrainingServer",
    "mldeploy.serving.service": "Service",
    "mldeploy.settings": "ServiceSettings",
    "mldeploy.loadtest.background": "BackgroundServer",
    "mldeploy.loadtest.models": "DelayedPredictor",
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names.split()}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mldeploy.serving' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
