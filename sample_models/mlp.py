"""A plain multi-layer perceptron: ``layers.0`` ... ``layers.{depth-1}`` then ``head``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
    """ReLU multi-layer perceptron.

    Parameter names: ``layers.{i}.weight``/``layers.{i}.bias`` for ``i`` in ``range(depth)``
    (the first maps ``in_features -> hidden``, the rest ``hidden -> hidden``), then
    ``head.weight``/``head.bias`` (``hidden -> out_features``).
    """

    def __init__(
        self,
        in_features: int = 16,
        hidden: int = 32,
        out_features: int = 4,
        depth: int = 2,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        widths = [in_features] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(widths[i], widths[i + 1]) for i in range(depth))
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(..., in_features)`` to ``(..., out_features)``."""
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


def make_mlp(**kw: Any) -> MLP:
    """Factory for :class:`MLP`; keyword arguments are passed through unchanged."""
    return MLP(**kw)
