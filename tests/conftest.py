"""Shared fixtures: one trained two-moons model and its exports, built once per test session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mldeploy import data, export, models, training


@pytest.fixture(scope="session")
def split() -> data.Split:
    return data.load_moons()


@pytest.fixture(scope="session")
def trained_model(split: data.Split) -> models.SimpleMLP:
    return training.train_two_moons().model


@pytest.fixture(scope="session")
def exported(
    trained_model: models.SimpleMLP, split: data.Split, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    return export.export_all(trained_model, torch.from_numpy(split.x_train[:8]), out)


def timeout_factor() -> float:
    """``MLDEPLOY_TIMEOUT_FACTOR`` (default 1): stretches every test timeout on a loaded machine."""
    text = os.environ.get("MLDEPLOY_TIMEOUT_FACTOR", "1")
    try:
        factor = float(text)
    except ValueError:
        raise pytest.UsageError(f"MLDEPLOY_TIMEOUT_FACTOR={text!r} is not a number") from None
    if not 0 < factor <= 100:
        raise pytest.UsageError(f"MLDEPLOY_TIMEOUT_FACTOR={text!r} must be in (0, 100]")
    return factor


@pytest.fixture(scope="session")
def scaled() -> Callable[[float], float]:
    """``scaled(seconds)``: a timeout stretched by ``MLDEPLOY_TIMEOUT_FACTOR``."""
    factor = timeout_factor()
    return lambda seconds: seconds * factor
