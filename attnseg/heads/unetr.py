"""The UNETR CNN decoder of Swin UNETR, over any backbone pyramid, in 2D and 3D.

Papers: Hatamizadeh et al., "UNETR: Transformers for 3D Medical Image Segmentation" (WACV 2022,
arXiv 2103.10504) and "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors in MRI
Images" (BrainLes 2021, arXiv 2201.01266). Reference code: Project-MONAI/MONAI
``monai/networks/nets/swin_unetr.py`` (the decoder half of ``SwinUNETR``), written anew here.

The decoder has a channel plan ``fs * s / 2`` at stride ``s`` (``[fs, 2fs, 4fs, 8fs, 16fs]`` at strides
2/4/8/16/32) plus a full-resolution residual block on the image (``encoder1``). Each backbone level is brought
to its plan width by a residual block (Swin UNETR's ``encoder2/3/4/10``; with matching widths this is exactly
the original), each decoder step is a transposed conv k2 s2 + concat with the skip + residual block, and a
1x1 conv gives the logits. Generalisations (reference/heads.md §6.1):

- a pyramid without a stride-2 level (most backbones start at 4) gets one synthesized by a stride-2
  residual block on the image (``stem2``), keeping the five up-steps of the original;
- a pyramid with fewer levels (e.g. strides 4/8/16) decodes from its deepest level, with the same plan;
- ``raw_deep_skip=True`` feeds the stride-16 level to its decoder step without a residual block, as
  Swin UNETR does (identity when its width is ``8 * fs``, else a 1x1 projection ``encoder5``).

Modules are named as in MONAI's ``SwinUNETR``, by stride: ``encoder1`` (s1), ``encoder2`` (s2), ``encoder3``
(s4), ``encoder4`` (s8), ``encoder5`` (s16, absent in the original), ``encoder10`` (s32); ``decoder{k}``
outputs stride ``2**(k-1)``; ``out``. So with strides 2..32, widths equal to the plan and ``raw_deep_skip=True``,
the decoder keys of a MONAI ``SwinUNETR`` state_dict (all but ``swinViT.*``) load into this head as they are,
and the head fed MONAI's ``swinViT`` hidden states reproduces ``SwinUNETR.forward`` exactly (tested).

Forward contract: ``forward(features, image)``. The raw (padded) image is part of the contract because
``encoder1`` (and ``stem2``) run on it at full resolution. Every spatial size of ``image`` must be divisible
by ``size_divisor`` (the deepest stride) so that every up-step doubles exactly, and level ``i`` must be
``image_size / strides[i]``; :class:`~attnseg.models.Segmentor` pads and crops back, so its callers can pass
any size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from attnseg.heads._common import check_head_inputs, label_map
from attnseg.layers.dims import NormSpec, conv_type
from attnseg.layers.unet_blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from attnseg.registry import HEADS

__all__ = ["UNETRHead", "unetr_module_name"]

MAX_STRIDE = 32


def unetr_module_name(stride: int) -> str:
    """MONAI ``SwinUNETR``'s name for the encoder-side block at ``stride`` (``encoder10`` at 32)."""
    return "encoder10" if stride == 32 else f"encoder{stride.bit_length()}"


def _check_strides(strides: list[int]) -> None:
    rule = ("UNETRHead needs pyramid strides that start at 2 or 4 and double from level to level, up to at most "
            f"{MAX_STRIDE} (e.g. [4, 8, 16, 32], [2, 4, 8, 16, 32] or [4, 8, 16])")
    ok = (
        bool(strides)
        and strides[0] in (2, 4)
        and all(b == 2 * a for a, b in zip(strides, strides[1:]))
        and strides[-1] <= MAX_STRIDE
    )
    if not ok:
        raise ValueError(f"{rule}, got strides={strides}")


class UNETRHead(nn.Module):
    """UNETR decoder head over a backbone pyramid.

    Args:
        in_channels: channels of each pyramid level, shallow to deep.
        strides: stride of each level: starting at 2 or 4, doubling, at most 32 (e.g. ``[4, 8, 16, 32]``).
        num_classes: output channels (1 = binary, thresholded by sigmoid > 0.5 in :meth:`postprocess`).
        spatial_dims: 2 or 3.
        in_chans: image channels (input of ``encoder1`` and of the synthesized ``stem2``).
        feature_size: ``fs`` of the channel plan (> 0; MONAI's multiple-of-12 rule concerns its Swin encoder only).
        norm_name: norm of every block (``instance``, ``instance_affine``, ``batch``, ``group``, ``layer`` or
            MONAI's ``(name, {kwargs})`` pair, e.g. ``("group", {"num_groups": 4})``).
        res_block: residual blocks (``True``, Swin UNETR) or plain two-conv blocks (MONAI's ``res_block=False``).
        raw_deep_skip: pass the stride-16 level to its decoder step without a residual block (Swin UNETR's wiring;
            needs a stride-16 level that is not the deepest).
        dropout: element dropout after every conv of the blocks, in ``[0, 1)``.

    Forward: ``features`` (list of ``[B, C_i, *S / s_i]``) and ``image`` ``[B, in_chans, *S]`` -> logits
    ``[B, num_classes, *S]``; ``S`` divisible by ``size_divisor``.

    Example::

        >>> head = UNETRHead([48, 96, 192, 288], [4, 8, 16, 32], num_classes=3, feature_size=12)
        >>> feats = [torch.randn(1, c, 64 // s, 64 // s) for c, s in zip([48, 96, 192, 288], [4, 8, 16, 32])]
        >>> head(feats, torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 3, 64, 64])
        >>> head3d = UNETRHead([16, 32], [2, 4], num_classes=2, spatial_dims=3, in_chans=1, feature_size=8)
        >>> head3d([torch.randn(1, 16, 16, 16, 16), torch.randn(1, 32, 8, 8, 8)], torch.randn(1, 1, 32, 32, 32)).shape
        torch.Size([1, 2, 32, 32, 32])
    """

    reads_image = True  # encoder1 / stem2 convolve the image itself, not only its size

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        spatial_dims: int = 2,
        in_chans: int = 3,
        feature_size: int = 48,
        norm_name: NormSpec = "instance",
        res_block: bool = True,
        raw_deep_skip: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_channels, strides = [int(c) for c in in_channels], [int(s) for s in strides]
        if len(in_channels) != len(strides) or not strides:
            raise ValueError(f"in_channels and strides must be non-empty and of equal length, got {in_channels=}, "
                             f"{strides=}")
        if any(c < 1 for c in in_channels):
            raise ValueError(f"in_channels must all be >= 1, got {in_channels=}")
        _check_strides(strides)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims=}")
        for name, value in (("num_classes", num_classes), ("in_chans", in_chans), ("feature_size", feature_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout=}")
        if raw_deep_skip and 16 not in strides[:-1]:
            raise ValueError(f"raw_deep_skip=True needs a stride-16 level below the deepest one, got {strides=}")

        self.in_channels = in_channels
        self.strides = strides
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self.feature_size = feature_size
        self.raw_deep_skip = raw_deep_skip
        self.size_divisor = strides[-1]
        # Decoder levels by stride, full resolution first: 1, 2, 4, ..., strides[-1].
        self.level_strides = [1, *([2] if strides[0] == 4 else []), *strides]

        def plan(s: int) -> int:
            return feature_size * max(s // 2, 1)  # s1 and s2 both have fs channels

        blocks = dict(spatial_dims=spatial_dims, norm_name=norm_name, res_block=res_block, dropout=dropout)
        self.encoder1 = UnetrBasicBlock(in_channels=in_chans, out_channels=feature_size, **blocks)  # s1, on the image
        self.stem2 = (UnetrBasicBlock(in_channels=in_chans, out_channels=feature_size, stride=2, **blocks)
                      if strides[0] == 4 else None)  # synthesized s2 level, on the image
        for c, s in zip(in_channels, strides):
            if raw_deep_skip and s == 16:
                adapter = nn.Identity() if c == plan(16) else conv_type(spatial_dims)(c, plan(16), 1)
            else:
                adapter = UnetrBasicBlock(in_channels=c, out_channels=plan(s), **blocks)
            self.add_module(unetr_module_name(s), adapter)
        # decoder{k} upsamples from level k to level k-1 (stride 2**(k-1)); decoder1 ends at full resolution.
        for k in range(len(self.level_strides) - 1, 0, -1):
            s = self.level_strides[k - 1]
            self.add_module(f"decoder{k}", UnetrUpBlock(in_channels=plan(2 * s), out_channels=plan(s), **blocks))
        self.out = UnetOutBlock(spatial_dims, feature_size, num_classes)

    def forward(self, features: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        check_head_inputs(self, features, image, self.in_chans)
        skips = [self.encoder1(image)]  # [B, fs, *S]
        if self.stem2 is not None:
            skips.append(self.stem2(image))  # [B, fs, *S/2]
        skips += [self.get_submodule(unetr_module_name(s))(f) for s, f in zip(self.strides, features)]
        x = skips[-1]  # deepest level, [B, fs * s_max / 2, *S / s_max]
        for k in range(len(skips) - 1, 0, -1):
            x = self.get_submodule(f"decoder{k}")(x, skips[k - 1])  # [B, plan(s_{k-1}), *S / s_{k-1}]
        return self.out(x)

    def postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """Label map ``[B, *S]`` (int64): argmax over classes, or sigmoid > 0.5 when there is one channel."""
        return label_map(logits)


HEADS.register("unetr", cls=UNETRHead)(UNETRHead)
