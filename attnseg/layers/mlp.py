"""The transformer MLP (``fc1 -> act -> drop -> fc2 -> drop``) with timm's parameter names."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["Mlp"]


class Mlp(nn.Module):
    """Two linear layers with an activation between, on the last axis (``[..., in] -> [..., out]``).

    Parameter names ``fc1``/``fc2`` match timm and most official transformer checkpoints.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0, bias: bool = True, **dd: Any) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
