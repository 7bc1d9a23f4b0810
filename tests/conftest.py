"""Shared fixtures: one trained two-moons model and its exports, built once per test session."""

from __future__ import annotations

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
