"""A backbone used for its feature pyramid, as dense-prediction frameworks see it."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FeaturePyramid"]


class FeaturePyramid(nn.Module):
    """``forward(x) -> list[Tensor]``: the backbone's NCHW pyramid (``forward_pyramid``), with timm's ``feature_info``.

    This is what the official dense versions of the backbones return from ``forward`` (mm-style backbones), and
    what ``timm.create_model(..., features_only=True)`` returns for attnseg models. Parameters live under
    ``backbone.``, the prefix of mm-style checkpoints.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        from timm.models._features import FeatureInfo

        self.backbone = backbone
        info = [dict(f) for f in backbone.feature_info]
        self.feature_info = FeatureInfo(info, tuple(range(len(info))))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.forward_pyramid(x)
