"""ViTDet's simple feature pyramid: maps at strides 4, 8, 16 and 32 from the one stride-16 map of a plain ViT."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from attnseg.layers.norm import LayerNorm2d

__all__ = ["SimpleFeaturePyramid", "plain_feature_info"]


class SimpleFeaturePyramid(nn.Module):
    """The scale branches of ViTDet's simple feature pyramid (Li et al., ECCV 2022, arXiv 2203.16527, §3).

    From a stride-16 map ``[B, C, h, w]``: stride 4 by two 2x2 transposed convs (``C -> C/2 -> C/4``, LayerNorm2d
    and GELU between), stride 8 by one (``C -> C/2``), stride 16 as is, stride 32 by 2x2 max pooling. With
    ``out_channels``, each level then gets ViTDet's output convs (1x1 conv + LayerNorm2d, 3x3 conv + LayerNorm2d,
    no biases) to that width.

    Args:
        dim: channels of the stride-16 map (divisible by 4).
        out_indices: which of the four levels (0: stride 4 ... 3: stride 32) to build and return.
        out_channels: width of every returned level; None keeps ``C/4, C/2, C, C``.

    ``forward(x, size)`` crops level ``i`` to ``ceil(size / stride_i)`` when ``size`` (the input image's
    ``(H, W)``) is given: a backbone that padded its input to whole patches gets the maps of the unpadded image,
    as strided convs would give them (the stride-32 pooling rounds up, ``ceil_mode=True``).

    Example::

        >>> fpn = SimpleFeaturePyramid(32)
        >>> [tuple(m.shape[1:]) for m in fpn(torch.randn(1, 32, 7, 9), size=(97, 131))]
        [(8, 25, 33), (16, 13, 17), (32, 7, 9), (32, 4, 5)]
    """

    strides = (4, 8, 16, 32)

    def __init__(self, dim: int, out_indices: Sequence[int] = (0, 1, 2, 3), out_channels: int | None = None) -> None:
        super().__init__()
        out_indices = tuple(out_indices)
        if dim % 4:
            raise ValueError(f"SimpleFeaturePyramid needs dim divisible by 4, got {dim=}")
        if not out_indices or sorted(set(out_indices)) != list(out_indices) or not all(0 <= i < 4 for i in out_indices):
            raise ValueError(f"out_indices must be increasing levels in 0..3, got {out_indices}")
        self.out_indices = out_indices
        branches = {
            0: [nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2), nn.GELU(),
                nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)],
            1: [nn.ConvTranspose2d(dim, dim // 2, 2, 2)],
            2: [],
            3: [nn.MaxPool2d(2, 2, ceil_mode=True)],
        }
        widths = {0: dim // 4, 1: dim // 2, 2: dim, 3: dim}
        self.stages = nn.ModuleList()
        for i in out_indices:
            layers = branches[i]
            if out_channels is not None:
                layers += [nn.Conv2d(widths[i], out_channels, 1, bias=False), LayerNorm2d(out_channels),
                           nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
            self.stages.append(nn.Sequential(*layers))
        self.channels = [widths[i] if out_channels is None else out_channels for i in out_indices]
        self.reductions = [self.strides[i] for i in out_indices]

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> list[torch.Tensor]:
        outs = []
        for stage, stride in zip(self.stages, self.reductions):
            y = stage(x)
            if size is not None:
                y = y[..., : -(-size[0] // stride), : -(-size[1] // stride)]
            outs.append(y.contiguous())
        return outs


def plain_feature_info(pyramid: SimpleFeaturePyramid | None, dim: int, stride: int, module: str) -> list[dict]:
    """``feature_info`` of a plain (single-resolution) backbone: the levels of its simple feature pyramid, or, without
    one, the single stride-``stride`` map of ``dim`` channels that ``module`` outputs.

    Example::

        >>> [i["reduction"] for i in plain_feature_info(SimpleFeaturePyramid(32, (1, 3)), 32, 16, "blocks")]
        [8, 32]
    """
    if pyramid is None:
        return [{"num_chs": dim, "reduction": stride, "module": module}]
    return [{"num_chs": c, "reduction": r, "module": f"pyramid.stages.{j}"}
            for j, (c, r) in enumerate(zip(pyramid.channels, pyramid.reductions))]
