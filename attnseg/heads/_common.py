"""What the heads share: the check of ``forward(features, image)`` against the declared pyramid, and the default
rules from logits to label maps and class probabilities.

A head's ``forward`` returns logits ``[B, C, *S]`` or, for heads with auxiliary outputs, a dict (``HeadOutput``);
such a head declares ``output_kind`` (``"msga"``, ``"connectivity"``, ``"landmarks"``; plain heads ``"logits"``)
and ``default_loss``, and implements ``crop_output``, ``postprocess`` and ``class_probabilities``: see
:class:`~attnseg.models.Segmentor`. Inference averages the windows and flips of a head with its own
``class_probabilities`` as probabilities (:func:`attnseg.engine.inference.blends_probabilities`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import torch
from torch import nn

from attnseg.errors import InputSizeError

__all__ = ["HeadOutput", "check_head_inputs", "class_probabilities", "head_output_kind", "label_map",
           "label_map_of_probabilities"]

HeadOutput: TypeAlias = "torch.Tensor | dict[str, Any]"


def head_output_kind(head: Any) -> str:
    """What a head (class or instance) outputs: ``"logits"`` unless it declares another ``output_kind``."""
    return str(getattr(head, "output_kind", "logits"))


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


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """``[B, C, *S]`` logits -> probabilities: softmax over classes, or the sigmoid of a single channel."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def label_map_of_probabilities(probs: torch.Tensor) -> torch.Tensor:
    """``[B, K, *S]`` class probabilities -> ``[B, *S]`` int64 labels: argmax, or > 0.5 for one channel (the rule of
    :func:`label_map` on the probabilities a head's ``class_probabilities`` gives)."""
    return (probs[:, 0] > 0.5).long() if probs.shape[1] == 1 else probs.argmax(1)
