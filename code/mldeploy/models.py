"""Models of the chapter: SimpleMLP (2→64→32→2) and a small model with data-dependent control
flow."""

from __future__ import annotations

import torch
from torch import nn


class SimpleMLP(nn.Module):
    """Two-moons classifier: 2 → 64 → 32 → 2 with ReLU, returning logits."""

    def __init__(
        self, in_features: int = 2, hidden: tuple[int, int] = (64, 32), n_classes: int = 2
    ):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden[0]),
            nn.ReLU(),
            nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(),
            nn.Linear(hidden[1], n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def describe(self) -> str:
        sizes = [m.in_features for m in self.net if isinstance(m, nn.Linear)]
        sizes.append(self.net[-1].out_features)
        return "SimpleMLP (" + " -> ".join(map(str, sizes)) + ")"


class SignGate(nn.Module):
    """Doubles its input when the batch sum is positive, negates it otherwise.

    The branch depends on the *values* of the input, which is exactly what ``torch.jit.trace``
    cannot record: it follows one branch and freezes it into the graph.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return -x


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class SignGateCond(nn.Module):
    """``SignGate`` rewritten with ``torch.cond`` so ``torch.export`` captures both branches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda t: t * 2, lambda t: -t, (x,))
