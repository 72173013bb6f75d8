"""The UNETR CNN decoder of Swin UNETR, over any backbone pyramid, in 2D and 3D.

Papers: Hatamizadeh et al., "UNETR: Transformers for 3D Medical Image Segmentation" (WACV 2022) and
"Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors in MRI Images" (BrainLes 2021).
Reference implementation: Project-MONAI/MONAI ``monai/networks/nets/swin_unetr.py`` (decoder part).

The decoder follows a channel plan ``[fs, 2fs, 4fs, 8fs, 16fs]`` at strides 2/4/8/16/32 plus a
full-resolution block on the image (``encoder1``). Each backbone level is brought to its plan width by a
residual block (Swin UNETR's ``encoder2/3/4/10``; with matching widths this is exactly the original), each
decoder step is a transposed conv k2 s2 + concat + residual block, and a 1x1 conv gives the logits.
Generalisations (heads.md §6.1):

- a pyramid without a stride-2 level (most backbones start at 4) gets one synthesized by a stride-2
  residual block on the image (``stem2``), keeping the five up-steps of the original;
- pyramids with fewer levels (e.g. strides 4/8/16) decode from their deepest level;
- ``raw_deep_skip=True`` feeds the stride-16 level to its decoder step without a residual block, as
  Swin UNETR does (identity when widths match, else a 1x1 projection).

The input must be divisible by the deepest stride so that every up-step doubles exactly;
:class:`~attnseg.models.Segmentor` pads and crops back, so callers can pass any size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from attnseg.layers.dims import conv_type
from attnseg.layers.unet_blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from attnseg.registry import HEADS

__all__ = ["UNETRHead"]


class UNETRHead(nn.Module):
    """UNETR decoder head.

    Args:
        in_channels: channels of each pyramid level, shallow to deep.
        strides: stride of each level; consecutive powers of two starting at 2 or 4 (e.g. 4, 8, 16, 32).
        num_classes: output channels (1 = binary with sigmoid).
        spatial_dims: 2 or 3.
        in_chans: image channels (for the full-resolution and synthesized stride-2 blocks).
        feature_size: ``fs`` of the channel plan.
        norm_name: norm of every block (``instance``, ``batch``, ``group``, ...).
        raw_deep_skip: use the stride-16 level without a residual block (Swin UNETR's wiring).
        dropout: dropout inside the residual blocks.

    Forward: ``features`` (list of ``[B, C_i, *S / s_i]``) and the ``image`` ``[B, in_chans, *S]`` ->
    logits ``[B, num_classes, *S]``.

    Example::

        >>> head = UNETRHead([48, 96, 192, 288], [4, 8, 16, 32], num_classes=3, feature_size=12)
        >>> feats = [torch.randn(1, c, 64 // s, 64 // s) for c, s in zip([48, 96, 192, 288], [4, 8, 16, 32])]
        >>> head(feats, torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 3, 64, 64])
        >>> head3d = UNETRHead([16, 32], [2, 4], num_classes=2, spatial_dims=3, in_chans=1, feature_size=8)
        >>> head3d([torch.randn(1, 16, 16, 16, 16), torch.randn(1, 32, 8, 8, 8)], torch.randn(1, 1, 32, 32, 32)).shape
        torch.Size([1, 2, 32, 32, 32])
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        spatial_dims: int = 2,
        in_chans: int = 3,
        feature_size: int = 48,
        norm_name: str = "instance",
        raw_deep_skip: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_channels, strides = list(in_channels), list(strides)
        if len(in_channels) != len(strides) or not strides:
            raise ValueError(f"in_channels and strides must be non-empty and of equal length, got {in_channels=}, "
                             f"{strides=}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if feature_size < 1:
            raise ValueError(f"feature_size must be >= 1, got {feature_size}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if strides[0] not in (2, 4) or any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(
                f"UNETRHead needs pyramid strides that double from level to level and start at 2 or 4 "
                f"(e.g. [4, 8, 16, 32]), got {strides}"
            )
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        self.strides = strides
        self.size_divisor = strides[-1]
        self.synthesize_stride2 = strides[0] == 4
        # Channel plan: stride 2**k gets fs * 2**(k-1).
        level_strides = ([2] if self.synthesize_stride2 else []) + strides
        plan = [feature_size * s // 2 for s in level_strides]

        self.encoder1 = UnetrBasicBlock(spatial_dims, in_chans, feature_size, norm_name=norm_name, dropout=dropout)
        self.stem2 = (UnetrBasicBlock(spatial_dims, in_chans, feature_size, stride=2, norm_name=norm_name,
                                      dropout=dropout) if self.synthesize_stride2 else None)
        offset = len(plan) - len(strides)
        self.raw_deep_skip = raw_deep_skip and 16 in strides[:-1]
        adapters = []
        for i, (c, s) in enumerate(zip(in_channels, strides)):
            width = plan[offset + i]
            if self.raw_deep_skip and s == 16:
                adapters.append(nn.Identity() if c == width else conv_type(spatial_dims)(c, width, 1))
            else:
                adapters.append(UnetrBasicBlock(spatial_dims, c, width, norm_name=norm_name, dropout=dropout))
        self.adapters = nn.ModuleList(adapters)
        # decoders[j] upsamples from plan level j+1 to level j; the last one goes to full resolution.
        self.decoders = nn.ModuleList(
            UnetrUpBlock(spatial_dims, plan[j + 1], plan[j], norm_name=norm_name, dropout=dropout)
            for j in range(len(plan) - 1)
        )
        self.decoder1 = UnetrUpBlock(spatial_dims, plan[0], feature_size, norm_name=norm_name, dropout=dropout)
        self.out = UnetOutBlock(spatial_dims, feature_size, num_classes)

    def forward(self, features: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        if len(features) != len(self.adapters):
            raise ValueError(f"UNETRHead expects {len(self.adapters)} pyramid levels, got {len(features)}")
        skips = [adapter(f) for adapter, f in zip(self.adapters, features)]
        if self.stem2 is not None:
            skips.insert(0, self.stem2(image))
        x = skips[-1]
        for j in range(len(skips) - 2, -1, -1):
            x = self.decoders[j](x, skips[j])
        x = self.decoder1(x, self.encoder1(image))
        return self.out(x)

    def postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """Label map ``[B, *S]``: argmax over classes, or sigmoid > 0.5 for one channel."""
        return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


HEADS.register("unetr", cls=UNETRHead)(UNETRHead)
