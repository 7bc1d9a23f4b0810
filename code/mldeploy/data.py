"""The seeded two-moons data set used throughout the chapter (no download needed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    """Train and test arrays: features are float32 of shape (n, 2), labels int64 of shape (n,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def make_moons(
    n_samples: int = 2000, noise: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaving half circles with Gaussian noise; class 0 on top, class 1 below."""
    if n_samples < 2:
        raise ValueError(f"n_samples must be at least 2, got {n_samples}")
    rng = np.random.default_rng(seed)
    n_top = n_samples // 2
    n_bottom = n_samples - n_top
    t_top = np.linspace(0.0, np.pi, n_top)
    t_bottom = np.linspace(0.0, np.pi, n_bottom)
    top = np.stack([np.cos(t_top), np.sin(t_top)], axis=1)
    bottom = np.stack([1.0 - np.cos(t_bottom), 0.5 - np.sin(t_bottom)], axis=1)
    x = np.concatenate([top, bottom]) + rng.normal(scale=noise, size=(n_samples, 2))
    y = np.concatenate([np.zeros(n_top), np.ones(n_bottom)]).astype(np.int64)
    order = rng.permutation(n_samples)
    return x[order].astype(np.float32), y[order]


def load_moons(
    n_samples: int = 2000, test_fraction: float = 0.2, noise: float = 0.1, seed: int = 0
) -> Split:
    """The chapter's standard split: 2000 samples, 1600 for training and 400 for testing."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = make_moons(n_samples, noise=noise, seed=seed)
    n_test = int(round(n_samples * test_fraction))
    return Split(x[n_test:], y[n_test:], x[:n_test], y[:n_test])
