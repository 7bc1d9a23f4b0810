"""The chapter's inference service (section 5.2): FastAPI + ONNX Runtime, dynamic micro-batching.

Imports no torch (the slim serving image has none); ``TorchScriptPredictor`` imports it lazily.
``python -m mldeploy.serving`` serves the model named by the environment (``mldeploy.settings``).
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use: ``python -m mldeploy.serving.healthcheck`` runs in the image's HEALTHCHECK
# and must not pay for (or need) FastAPI and ONNX Runtime.
_EXPORTS = {
    "Admission": "mldeploy.serving.hardening",
    "AdminServer": "mldeploy.serving.hardening",
    "BackgroundServer": "mldeploy.loadtest.background",
    "BodySizeLimit": "mldeploy.serving.hardening",
    "ConnectionGuard": "mldeploy.serving.hardening",
    "BatchRequest": "mldeploy.serving.schemas",
    "BatchResponse": "mldeploy.serving.schemas",
    "BatchResult": "mldeploy.serving.batching",
    "DeadlineExceeded": "mldeploy.serving.batching",
    "DelayedPredictor": "mldeploy.loadtest.models",
    "DrainingServer": "mldeploy.serving.server",
    "MicroBatcher": "mldeploy.serving.batching",
    "ModelError": "mldeploy.serving.batching",
    "OnnxPredictor": "mldeploy.serving.predictors",
    "PredictRequest": "mldeploy.serving.schemas",
    "PredictResponse": "mldeploy.serving.schemas",
    "Predictor": "mldeploy.serving.predictors",
    "QueueFull": "mldeploy.serving.batching",
    "Service": "mldeploy.serving.service",
    "ServiceSettings": "mldeploy.settings",
    "TorchScriptPredictor": "mldeploy.serving.predictors",
    "Unavailable": "mldeploy.serving.batching",
    "create_app": "mldeploy.serving.app",
    "create_app_from_env": "mldeploy.serving.app",
    "enable_access_log": "mldeploy.serving.app",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mldeploy.serving' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
