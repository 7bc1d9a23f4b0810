"""A small, seeded training loop for classifiers on in-memory arrays, and the chapter's one
two-moons model (``train_two_moons``) that every section, the demo and the tests share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mldeploy import data, models
from mldeploy.reproducibility import single_thread

TWO_MOONS_EPOCHS = 60  # enough for the two-moons MLP to reach its plateau (test accuracy ≈ 0.99)


def set_seed(seed: int) -> None:
    """Seed PyTorch and NumPy's global generators so model initialisation is reproducible."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def train_classifier(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 60,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train with Adam and cross-entropy; return the mean loss of every epoch.

    ``on_epoch(epoch, loss)`` is called after each epoch (1-based) so callers can show progress.
    It runs on one thread: the batches are tiny, and two threads of one process waiting on each
    other at every step are many times slower whenever another process holds a core.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be positive")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    # fused: its sqrt rounds alike on every CPU, unlike MKL's (see mldeploy.reproducibility)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    loss_fn = nn.CrossEntropyLoss()
    history: list[float] = []
    model.train()
    with single_thread():
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(xs), generator=generator)
            total = 0.0
            for start in range(0, len(xs), batch_size):
                idx = order[start : start + batch_size]
                optimizer.zero_grad()
                loss = loss_fn(model(xs[idx]), ys[idx])
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
            history.append(total / len(xs))
            if on_epoch is not None:
                on_epoch(epoch, history[-1])
    model.eval()
    return history


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits of a PyTorch model for a float32 array, in eval mode."""
    model.eval()
    return model(torch.from_numpy(np.asarray(x, dtype=np.float32))).numpy()


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose arg-max equals the label."""
    return float((np.asarray(logits).argmax(axis=1) == np.asarray(y)).mean())


@dataclass
class TwoMoons:
    """The trained two-moons classifier, the split it saw, and its loss per epoch."""

    model: models.SimpleMLP
    split: data.Split
    losses: list[float]

    @property
    def test_accuracy(self) -> float:
        return accuracy(predict_logits(self.model, self.split.x_test), self.split.y_test)


def train_two_moons(
    *,
    epochs: int = TWO_MOONS_EPOCHS,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> TwoMoons:
    """The chapter's model: ``SimpleMLP`` trained (seeded) on ``data.load_moons``'s split."""
    split = data.load_moons(seed=seed)
    set_seed(seed)
    model = models.SimpleMLP()
    losses = train_classifier(
        model, split.x_train, split.y_train, epochs=epochs, seed=seed, on_epoch=on_epoch
    )
    return TwoMoons(model.eval(), split, losses)
