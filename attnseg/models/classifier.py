"""Classifier: a backbone with its own classification head, sized to the task."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Classifier"]


class Classifier(nn.Module):
    """Wraps a backbone whose ``forward`` returns logits; resets its classifier to ``num_classes``.

    Example::

        >>> from attnseg.registry import BACKBONES
        >>> Classifier(BACKBONES.get("test_mambaout")(), num_classes=10)(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if getattr(backbone, "num_classes", num_classes) != num_classes:
            if not hasattr(backbone, "reset_classifier"):
                raise ValueError(f"{type(backbone).__name__} has {backbone.num_classes} outputs and no reset_classifier")
            backbone.reset_classifier(num_classes)
        self.backbone = backbone
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class indices ``[B]``."""
        return self.forward(x).argmax(1)
