"""The chapter's inference service (section 5.2): FastAPI + ONNX Runtime with dynamic micro-batching.

Imports no torch (the slim serving image has none); ``TorchScriptPredictor`` imports it lazily.
``uvicorn --factory mldeploy.serving:create_app_from_env`` serves the model named by the environment.
"""

from mldeploy.serving.app import ServiceSettings, create_app, create_app_from_env, enable_access_log
from mldeploy.serving.batching import BatchResult, MicroBatcher, QueueFull, SampleRejected
from mldeploy.serving.predictors import DelayedPredictor, OnnxPredictor, Predictor, TorchScriptPredictor
from mldeploy.serving.schemas import BatchRequest, BatchResponse, PredictRequest, PredictResponse
from mldeploy.serving.server import BackgroundServer

__all__ = [
    "BackgroundServer", "BatchRequest", "DelayedPredictor", "BatchResponse", "BatchResult", "MicroBatcher", "OnnxPredictor",
    "PredictRequest", "PredictResponse", "Predictor", "QueueFull", "SampleRejected", "ServiceSettings",
    "TorchScriptPredictor", "create_app", "create_app_from_env", "enable_access_log",
]
