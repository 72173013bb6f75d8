"""Segmentor: backbone + adapter + head, for any input size.

Padding rule: the input is padded with zeros on the far side of every spatial axis (bottom/right, and back in
3D) up to a multiple of the size divisor (the least common multiple of the backbone's strides and the head's
``size_divisor``), and at least to the backbone's ``min_input_size`` when it declares one; the logits are
cropped back to the input size. Zeros, not reflection: reflection cannot pad more than the input size minus
one (a 20-pixel axis cannot reach 32), and on normalised inputs zero is the dataset mean. The top-left
origin stays where it is, so a pixel of the output is the pixel of the input at the same index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attnseg.errors import InputSizeError
from attnseg.heads._common import HeadOutput, class_probabilities, label_map
from attnseg.layers.dims import conv_type

__all__ = ["Adapter", "Segmentor"]


class Adapter(nn.Module):
    """Optional 1x1 projections (with bias) that bring each pyramid level to the width a head wants.

    Args:
        in_channels: channels of each backbone level.
        strides: stride of each level (unchanged by the adapter; kept so the adapter publishes the contract).
        out_channels: wanted channels per level; ``None`` passes the features through unchanged. A level whose
            width already matches is passed through too.
        spatial_dims: 2 or 3.

    Example::

        >>> ad = Adapter([32, 64], [4, 8], [16, 16])
        >>> [f.shape[1] for f in ad([torch.randn(1, 32, 8, 8), torch.randn(1, 64, 4, 4)])]
        [16, 16]
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], out_channels: Sequence[int] | None = None,
                 spatial_dims: int = 2) -> None:
        super().__init__()
        in_channels, strides = list(in_channels), list(strides)
        if len(in_channels) != len(strides):
            raise ValueError(f"in_channels and strides need one value per level, got {in_channels=}, {strides=}")
        if out_channels is not None:
            out_channels = list(out_channels)
            if len(out_channels) != len(in_channels) or any(int(o) < 1 for o in out_channels):
                raise ValueError(f"out_channels needs one positive value per level ({len(in_channels)}), got "
                                 f"{out_channels}")
        conv = conv_type(spatial_dims)
        self.in_channels = in_channels
        self.strides = strides
        self.out_channels = out_channels if out_channels is not None else list(in_channels)
        self.projs = (
            nn.ModuleList(conv(c, o, 1) if c != o else nn.Identity() for c, o in zip(in_channels, out_channels))
            if out_channels is not None else None
        )

    @property
    def feature_info(self) -> list[dict]:
        """The adapted pyramid: ``num_chs`` and ``reduction`` per level."""
        return [{"num_chs": c, "reduction": s, "module": f"projs.{i}"}
                for i, (c, s) in enumerate(zip(self.out_channels, self.strides))]

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.strides):
            raise ValueError(f"Adapter expects {len(self.strides)} pyramid levels, got {len(features)}")
        if self.projs is None:
            return list(features)
        return [proj(f) for proj, f in zip(self.projs, features)]


def _head_divisor(head: nn.Module, strides: list[int]) -> int:
    required = getattr(head, "required_divisor", None)
    if callable(required):
        return int(required(strides))
    return int(getattr(head, "size_divisor", 1))


class Segmentor(nn.Module):
    """A backbone's pyramid, optionally adapted, decoded by a head into per-pixel (per-voxel) logits.

    ``forward(x [B, C, *S]) -> logits [B, num_classes, *S]`` for any ``S``: the input is zero-padded on the far
    side to a multiple of ``size_divisor`` (see the module docstring), run through
    ``backbone.forward_pyramid`` -> ``adapter`` -> ``head(features, padded_image)``, and the logits are cropped
    back. ``postprocess(logits) -> [B, *S]`` labels by the head's rule. Heads with a structured output (a dict:
    MSGA's deep supervision in training, HybridGNet's landmarks) crop it with their ``crop_output(output, size)``.

    Args:
        backbone: a module with ``feature_info`` (``num_chs``, ``reduction`` per level) and ``forward_pyramid``.
        head: a module taking ``(features, image)`` with ``num_classes`` and ``spatial_dims`` attributes and a
            ``size_divisor`` attribute or ``required_divisor(strides)`` method.
        adapter: optional :class:`Adapter` between them.

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
        info = getattr(backbone, "feature_info", None)
        if not info:
            raise ValueError(f"{type(backbone).__name__} publishes no feature_info; a Segmentor needs its pyramid "
                             "channels and strides")
        self.backbone = backbone
        self.adapter = adapter
        self.head = head
        strides = [int(f["reduction"]) for f in info]
        channels = [int(f["num_chs"]) for f in info]
        if adapter is not None and hasattr(adapter, "out_channels"):
            channels = list(adapter.out_channels)
        head_channels = getattr(head, "in_channels", None)
        if head_channels is not None and list(head_channels) != channels:
            raise ValueError(f"the head expects pyramid channels {list(head_channels)}, the backbone"
                             f"{' + adapter' if adapter is not None else ''} gives {channels}")
        head_strides = getattr(head, "strides", None)
        if head_strides is not None and list(head_strides) != strides:
            raise ValueError(f"the head expects pyramid strides {list(head_strides)}, the backbone gives {strides}")
        self.strides = strides
        self.size_divisor = math.lcm(*strides, _head_divisor(head, strides))
        self.spatial_dims = int(getattr(head, "spatial_dims", getattr(backbone, "spatial_dims", 2)))
        backbone_dims = getattr(backbone, "spatial_dims", None)
        if backbone_dims is not None and int(backbone_dims) != self.spatial_dims:
            raise ValueError(f"the backbone is {backbone_dims}D but the head is {self.spatial_dims}D")
        self.num_classes = int(getattr(head, "num_classes", 0))
        in_chans = getattr(backbone, "in_chans", None) or getattr(head, "in_chans", None)
        self.in_chans = int(in_chans) if in_chans else None
        min_size = getattr(backbone, "min_input_size", None) or 1
        self.min_input_size = ((int(min_size),) * self.spatial_dims if isinstance(min_size, int)
                               else tuple(int(m) for m in min_size)[-self.spatial_dims:])

    def padded_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """The spatial size the backbone and head see for an input of ``size``."""
        d = self.size_divisor
        return tuple(-(-max(n, m) // d) * d for n, m in zip(size, self.min_input_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = self.spatial_dims
        if x.dim() != dims + 2:
            raise InputSizeError(f"expected a {dims}D input [B, C, {', '.join('DHW'[-dims:])}], got shape "
                                 f"{list(x.shape)}")
        if self.in_chans is not None and x.shape[1] != self.in_chans:
            raise InputSizeError(f"the model expects {self.in_chans} input channels, got {x.shape[1]} "
                                 f"(input shape {list(x.shape)})")
        size = tuple(x.shape[2:])
        padded = self.padded_size(size)
        check = getattr(self.head, "check_input_size", None)
        if check is not None:  # a head with a fixed input (HybridGNet's flattening latent) refuses before the backbone
            try:
                check(padded)
            except InputSizeError as e:
                if tuple(padded) == size:
                    raise
                raise InputSizeError(f"input of size {list(size)} (padded to {list(padded)}): {e}") from None
        pad = [p - n for p, n in zip(padded, size)]
        if any(pad):
            x = F.pad(x, [v for extra in reversed(pad) for v in (0, extra)])  # F.pad lists the last axis first
        features = self.backbone.forward_pyramid(x)
        if self.adapter is not None:
            features = self.adapter(features)
        output = self.head(features, x)
        if any(pad):
            if isinstance(output, torch.Tensor):
                output = output[(..., *(slice(0, n) for n in size))]
            else:  # a structured output (dict): only the head knows which entries are maps and which coordinates
                output = self.head.crop_output(output, size)
        return output

    def postprocess(self, output: HeadOutput) -> torch.Tensor:
        """Label map ``[B, *S]`` from the (eval) output, by the head's rule (default: argmax over classes, or
        sigmoid > 0.5 for one channel)."""
        post = getattr(self.head, "postprocess", None)
        return post(output) if callable(post) else label_map(output)

    def class_probabilities(self, output: HeadOutput) -> torch.Tensor:
        """Per-class probabilities ``[B, K, *S]`` from the (eval) output, by the head's rule (default: softmax
        over classes, or the sigmoid of a single channel); what sliding-window volume inference resamples."""
        probs = getattr(self.head, "class_probabilities", None)
        return probs(output) if callable(probs) else class_probabilities(output)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``postprocess(forward(x))`` without gradients."""
        return self.postprocess(self.forward(x))
