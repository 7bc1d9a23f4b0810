"""Request and response models (Pydantic v2); they also define the OpenAPI schema at ``/docs``."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

N_FEATURES = 2
FEATURE_LIMIT = 1e6  # far outside the data, far inside float32: no overflow to inf in the model

# strict: "1.5" (a string) and true (a bool) are not numbers; allow_inf_nan=False: NaN/Infinity
# are rejected (Pydantic accepts them by default).
Feature = Annotated[
    float, Field(strict=True, allow_inf_nan=False, ge=-FEATURE_LIMIT, le=FEATURE_LIMIT)
]


class PredictRequest(BaseModel):
    """One sample: exactly two finite numbers."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"features": [0.5, -0.3]}]}
    )
    features: list[Feature] = Field(..., min_length=N_FEATURES, max_length=N_FEATURES)


class PredictResponse(BaseModel):
    prediction: int
    probabilities: list[float]
    model_format: str


class BatchRequest(BaseModel):
    """A list of samples; its maximum length is set per app (``max_batch_items``)."""

    model_config = ConfigDict(extra="forbid")
    items: list[PredictRequest] = Field(..., min_length=1)


class BatchResponse(BaseModel):
    predictions: list[int]
    probabilities: list[list[float]]
    model_format: str


class ValidateResponse(BaseModel):
    valid: bool
    n_features: int


class HealthResponse(BaseModel):
    status: str
    model_loaded: bool


class ReadyResponse(BaseModel):
    ready: bool


class ErrorResponse(BaseModel):
    detail: str
    request_id: str | None = None  # on server faults: quote it when reporting, it is in the log
