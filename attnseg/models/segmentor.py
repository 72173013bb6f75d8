"""Segmentor: backbone + adapter + head, for any input size at or above the backbone's minimum."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attnseg.errors import InputSizeError
from attnseg.layers.dims import conv_type

__all__ = ["Adapter", "Segmentor"]


class Adapter(nn.Module):
    """Optional 1x1 projections that bring each pyramid level to the width a head wants.

    Args:
        in_channels: channels of each backbone level.
        strides: strides of each level (kept for the feature contract).
        out_channels: wanted channels per level; ``None`` passes the features through unchanged.
        spatial_dims: 2 or 3.
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], out_channels: Sequence[int] | None = None,
                 spatial_dims: int = 2) -> None:
        super().__init__()
        if out_channels is not None and len(out_channels) != len(in_channels):
            raise ValueError(f"out_channels needs one value per level ({len(in_channels)}), got {list(out_channels)}")
        self.strides = list(strides)
        self.out_channels = list(out_channels) if out_channels is not None else list(in_channels)
        conv = conv_type(spatial_dims)
        self.projs = (
            nn.ModuleList(conv(c, o, 1) if c != o else nn.Identity() for c, o in zip(in_channels, out_channels))
            if out_channels is not None else None
        )

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.projs is None:
            return list(features)
        return [proj(f) for proj, f in zip(self.projs, features)]


class Segmentor(nn.Module):
    """A backbone's pyramid, adapted, decoded by a head into per-pixel (per-voxel) logits.

    The input is padded on the far side of every spatial axis (zeros, i.e. the normalised mean when
    inputs are normalised) to a multiple of the deepest stride, and the logits are cropped back, so any
    size at or above the backbone's minimum gives logits of exactly the input size.

    Example::

        >>> from attnseg.registry import BACKBONES, HEADS
        >>> bb = BACKBONES.get("test_mambaout")(num_classes=0)
        >>> head = HEADS.get("unetr")([f["num_chs"] for f in bb.feature_info], [f["reduction"] for f in bb.feature_info],
        ...                           num_classes=3, feature_size=8)
        >>> Segmentor(bb, head)(torch.randn(1, 3, 97, 75)).shape
        torch.Size([1, 3, 97, 75])
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, adapter: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        self.head = head
        strides = [int(f["reduction"]) for f in backbone.feature_info]
        self.size_divisor = max([*strides, int(getattr(head, "size_divisor", 1))])
        self.spatial_dims = int(getattr(head, "spatial_dims", 2))
        self.num_classes = int(getattr(head, "num_classes", 0))
        self.in_chans = int(getattr(backbone, "in_chans", 0)) or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise InputSizeError(f"expected a {self.spatial_dims}D input [B, C, {', '.join('DHW'[-self.spatial_dims:])}]"
                                 f", got shape {list(x.shape)}")
        if self.in_chans is not None and x.shape[1] != self.in_chans:
            raise InputSizeError(f"the model expects {self.in_chans} input channels, got {x.shape[1]}")
        size = x.shape[2:]
        d = self.size_divisor
        pad = [(-s) % d for s in size]
        if any(pad):
            # F.pad lists the last axis first: (W_left, W_right, H_left, H_right, ...).
            x = F.pad(x, [p for extra in reversed(pad) for p in (0, extra)])
        features = self.backbone.forward_pyramid(x)
        if self.adapter is not None:
            features = self.adapter(features)
        logits = self.head(features, x)
        if any(pad):
            logits = logits[(..., *(slice(0, s) for s in size))]
        return logits

    def postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """Label map ``[B, *S]`` from logits (the head's rule)."""
        post = getattr(self.head, "postprocess", None)
        if post is not None:
            return post(logits)
        return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
