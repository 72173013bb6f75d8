"""Normalisation layers shared by the backbone families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm2d"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a channels-first map (ConvNeXt's ``LayerNorm2d``).

    Each pixel is normalised over its ``C`` channels: ``[B, C, *spatial] -> [B, C, *spatial]`` for 2D and
    3D maps alike. Arguments as :class:`torch.nn.LayerNorm` with ``normalized_shape = C``; the parameters
    (``weight``, ``bias`` of shape ``[C]``) are those of an ``nn.LayerNorm(C)``, so weights move freely
    between a channels-last ``nn.LayerNorm`` and this layer.

    Example::

        >>> norm = LayerNorm2d(8, eps=1e-6)
        >>> y = norm(torch.randn(2, 8, 5, 7))
        >>> y.shape, bool(y.mean(1).abs().max() < 1e-5)
        (torch.Size([2, 8, 5, 7]), True)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(1, -1)  # [B, C, ...] -> [B, ..., C]
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)  # [B, ..., C] -> [B, C, ...]
