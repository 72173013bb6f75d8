"""Classifier: a backbone with its own classification head, sized to the task."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Classifier"]


class Classifier(nn.Module):
    """Wraps a backbone whose ``forward`` returns logits ``[B, num_classes]``.

    When the backbone's ``num_classes`` differs from ``num_classes`` its head is replaced through
    ``backbone.reset_classifier(num_classes)`` (a fresh, randomly initialised head); a backbone that cannot
    reset raises ``ValueError`` instead of silently giving logits of another size.

    Args:
        backbone: a backbone following the attnseg contract (``forward(x) -> logits``).
        num_classes: number of classes, >= 1.

    Example::

        >>> from attnseg.registry import BACKBONES
        >>> Classifier(BACKBONES.get("test_mambaout")(), num_classes=10)(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes=}")
        current = getattr(backbone, "num_classes", None)
        if current != num_classes:
            if not callable(getattr(backbone, "reset_classifier", None)):
                raise ValueError(f"{type(backbone).__name__} has num_classes={current} and no reset_classifier() to "
                                 f"resize its head to {num_classes}")
            backbone.reset_classifier(num_classes)
        self.backbone = backbone
        self.num_classes = num_classes
        self.in_chans = getattr(backbone, "in_chans", None)
        self.spatial_dims = getattr(backbone, "spatial_dims", 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class indices ``[B]`` (argmax of the logits), without gradients."""
        return self.forward(x).argmax(1)
