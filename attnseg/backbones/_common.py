"""What every 2D backbone family shares: the input check of its ``forward_*`` methods."""

from __future__ import annotations

import torch
from torch import nn

from attnseg.errors import InputSizeError

__all__ = ["check_image_input"]


def check_image_input(model: nn.Module, x: torch.Tensor) -> None:
    """Raise :class:`InputSizeError` naming the rule unless ``x`` is ``[B, model.in_chans, H, W]`` with
    ``H, W >= model.min_input_size``."""
    name = type(model).__name__
    if x.ndim != 4 or x.shape[1] != model.in_chans:
        raise InputSizeError(f"{name} expects input [B, {model.in_chans}, H, W], got {list(x.shape)}")
    if min(x.shape[-2:]) < model.min_input_size:
        raise InputSizeError(f"{name} needs H and W >= {model.min_input_size}, got {x.shape[-2]}x{x.shape[-1]}")
