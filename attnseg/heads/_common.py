"""What the heads share: the check of ``forward(features, image)`` against the declared pyramid, and label maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from attnseg.errors import InputSizeError

__all__ = ["check_head_inputs", "label_map"]


def check_head_inputs(head: nn.Module, features: Sequence[torch.Tensor], image: torch.Tensor,
                      in_chans: int | None = None) -> None:
    """Raise a named error unless ``image`` is ``[B, in_chans, *S]`` with ``head.spatial_dims`` axes, ``S`` divisible by
    ``head.size_divisor``, and level ``i`` of ``features`` is ``[B, head.in_channels[i], *S / head.strides[i]]``.

    ``in_chans=None`` accepts any channel count (a head that uses the image only for its size).
    """
    name, dims = type(head).__name__, head.spatial_dims
    if image.dim() != dims + 2 or (in_chans is not None and image.shape[1] != in_chans):
        axes = ", ".join("DHW"[-dims:])
        raise InputSizeError(f"{name} expects an image [B, {in_chans if in_chans is not None else 'C'}, {axes}], got "
                             f"{list(image.shape)}")
    size = tuple(image.shape[2:])
    if any(n % head.size_divisor for n in size):
        raise InputSizeError(f"{name} needs image sizes divisible by {head.size_divisor} (its deepest stride), got "
                             f"{list(size)}; a Segmentor pads any size to fit")
    if len(features) != len(head.strides):
        raise ValueError(f"{name} expects {len(head.strides)} pyramid levels (strides {head.strides}), got "
                         f"{len(features)}")
    for i, (f, c, s) in enumerate(zip(features, head.in_channels, head.strides)):
        want = [c, *(n // s for n in size)]
        if list(f.shape[1:]) != want:
            raise ValueError(f"pyramid level {i} (stride {s}) should be [B, {', '.join(map(str, want))}] for an image "
                             f"of size {list(size)}, got {list(f.shape)}")


def label_map(logits: torch.Tensor) -> torch.Tensor:
    """``[B, C, *S]`` logits -> ``[B, *S]`` int64 labels: argmax over classes, or sigmoid > 0.5 for one channel."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
