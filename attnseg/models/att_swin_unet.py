"""Att-SwinU-Net as published: Swin-Unet's Swin encoder (Microsoft layout) + the CCA token decoder.

Paper: Ehsan Khodapanah Aghdam, Reza Azad, Maral Zarvani, Dorit Merhof, "Attention Swin U-Net: Cross-Contextual
Attention Mechanism for Skin Lesion Segmentation", ISBI 2023 (arXiv 2210.16898). Reference code:
NITR098/AttSwinUNet @ 4b14f37 (``model/attention_swin_unet.py:SwinAttentionUnet``, ``model/encoder.py``), written
anew on :mod:`attnseg.layers.swin` and the decoder head :mod:`attnseg.heads.att_swin_unet` (whose docstring
describes the decoder, the two CCA modes and the input-size rule).

The encoder (:class:`SwinUnetEncoder`, the official ``encoder``): a 4x4 patch embedding with LayerNorm, then four
stages of Swin blocks (every second one shifted by half a window), each but the last followed by Microsoft's
PatchMerging. Its pyramid is what Swin-Unet's decoder consumes, not the usual stage outputs: the skips are the
**stage inputs** (the patch embedding and the first two merged maps: ``C, 2C, 4C`` at strides 4, 8, 16) and the
deepest level is ``LN(stage-4 output)`` (``8C`` at stride 32). It is registered as a backbone
(``swin_unet_encoder_tiny``), so configs pair it with the ``att_swin_unet`` head, and the head also runs over any
other backbone.

The model (:class:`AttSwinUNet`, factories ``att_swin_unet_tiny`` and the CI-sized ``test_att_swin_unet``) is a
:class:`~attnseg.models.Segmentor` of the two, which pads any input to a multiple of 32 and crops back. Like the
official forward, a 1-channel image is repeated to the 3 input channels. ``num_classes`` is honoured (the official
model always has 9 outputs; :func:`attnseg.convert.att_swin_unet.from_official` builds 9 to reproduce it).
``img_size`` (default 224, the official fixed size) makes the shifted blocks keep that size's attention masks as
``attn_mask`` buffers, so official checkpoints load strictly; other sizes compute their masks.

Checkpoints: :mod:`attnseg.convert.att_swin_unet` maps official state_dicts (``{'model_weights': ...}`` files) and
Swin-T ImageNet weights (Swin-Unet's initialisation) onto this model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from attnseg.backbones._common import init_linear_layernorm, pretrained_cfg_factory
from attnseg.errors import InputSizeError
from attnseg.heads.att_swin_unet import AttSwinUNetHead, swin_layer
from attnseg.layers.drop import drop_path_rates
from attnseg.layers.swin import PatchEmbed, PatchMerging, check_swin_stages
from attnseg.models.segmentor import Segmentor
from attnseg.registry import BACKBONES, MODELS

__all__ = ["SwinUnetEncoder", "AttSwinUNet", "att_swin_unet_tiny", "test_att_swin_unet"]


class EncoderStage(nn.Module):
    """Swin's ``BasicLayer``: ``blocks`` then an optional ``downsample`` (PatchMerging):
    ``[B, H, W, C] -> [B, H, W, C]`` or ``[B, ceil(H/2), ceil(W/2), 2C]`` channels-last."""

    def __init__(self, blocks: nn.ModuleList, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = blocks
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class SwinUnetEncoder(nn.Module):
    """Swin-Unet's encoder (official ``encoder`` of ``SwinAttentionUnet``), a backbone with Swin-Unet's pyramid.

    Args:
        in_chans: input channels.
        embed_dim: ``C``; stage ``i`` runs at ``C * 2**i``.
        depths: Swin blocks per stage (the published lite model: 2, 2, 2, 2).
        num_heads: heads per stage; each must divide its stage width.
        window_size: window side.
        mlp_ratio, qkv_bias, qk_scale: block options.
        drop_rate: dropout after the patch embedding and in the blocks; ``attn_drop_rate`` on attention weights.
        drop_path_rate: stochastic depth rising linearly over all blocks (the official code fixes it at 0.1).
        patch_norm: LayerNorm after the patch embedding (the official encoder always has it).
        img_size: the official fixed input size (int or ``(H, W)``) whose attention masks the shifted blocks keep as
            ``attn_mask`` buffers (used at that size only); None: no buffers.
        num_classes: must be 0 (no classifier; accepted for the backbone contract).

    ``forward_pyramid(x [B, in_chans, H, W])`` -> ``[B, C * 2**i, ceil(H / 2**(i+2)), ...]`` for ``i = 0..3``: the
    inputs of stages 1-3 and ``LN(stage 4 output)``; any ``H, W`` (the patch embedding and the mergings pad on the
    far side, the blocks pad to whole windows).

    Example::

        >>> enc = SwinUnetEncoder(embed_dim=8, num_heads=(1, 2, 4, 8), img_size=None)
        >>> [tuple(f.shape[1:]) for f in enc.forward_pyramid(torch.randn(1, 3, 64, 96))]
        [(8, 16, 24), (16, 8, 12), (32, 4, 6), (64, 2, 3)]
    """

    family = "att_swin_unet"
    input_conv_keys = ("patch_embed.proj.weight",)

    def __init__(self, in_chans: int = 3, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, patch_norm: bool = True,
                 img_size: int | Sequence[int] | None = 224, num_classes: int = 0) -> None:
        super().__init__()
        depths, num_heads = [int(d) for d in depths], [int(h) for h in num_heads]
        if len(depths) < 2 or len(depths) != len(num_heads) or min(depths) < 1 or min(num_heads) < 1:
            raise ValueError(f"depths and num_heads need one positive value per stage (at least 2 stages, as many "
                             f"heads as depths), got {depths=}, {num_heads=}")
        for name, value in (("in_chans", in_chans), ("embed_dim", embed_dim), ("window_size", window_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
        check_swin_stages("embed_dim", embed_dim, num_heads, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate)
        n = len(depths)
        fixed = None
        if img_size is not None:
            fixed = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
            if len(fixed) != 2 or any(s < 1 or s % (4 * 2 ** (n - 1)) for s in fixed):
                raise ValueError(f"img_size must be one or two sizes divisible by {4 * 2 ** (n - 1)} (the deepest "
                                 f"stride), got {img_size=}")
        if num_classes != 0:
            raise ValueError(f"SwinUnetEncoder has no classifier; num_classes must be 0, got {num_classes}")

        self.in_chans, self.embed_dim, self.num_classes = in_chans, embed_dim, 0
        self.spatial_dims = 2
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size=4, spatial_dims=2, norm=patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = drop_path_rates(depths, drop_path_rate)
        self.layers = nn.ModuleList()
        for i in range(n):
            dim = embed_dim * 2**i
            size = None if fixed is None else tuple(s // (4 * 2**i) for s in fixed)
            blocks = swin_layer(dim, depths[i], num_heads[i], window_size, rates[i], mlp_ratio, qkv_bias, qk_scale,
                                drop_rate, attn_drop_rate, size)
            self.layers.append(EncoderStage(blocks, PatchMerging(dim, spatial_dims=2) if i < n - 1 else None))
        self.norm = nn.LayerNorm(embed_dim * 2 ** (n - 1))
        self.feature_info = [{"num_chs": embed_dim * 2**i, "reduction": 4 * 2**i,
                              "module": "patch_embed" if i == 0 else ("norm" if i == n - 1 else f"layers.{i - 1}")}
                             for i in range(n)]
        self.apply(init_linear_layernorm)

    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter-name rules grouping the patch embedding and each stage (layer-wise lr decay)."""
        return {"stem": r"^patch_embed", "blocks": r"^layers\.(\d+)"}

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The official encoder's outputs, channels-last: ``(LN(last stage output) [B, h, w, C_last], stage inputs)``
        (the official ``x_downsample``: one ``[B, H_i, W_i, C_i]`` map per stage)."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise InputSizeError(f"SwinUnetEncoder expects [B, {self.in_chans}, H, W], got {list(x.shape)}")
        x = self.pos_drop(self.patch_embed(x))  # [B, H/4, W/4, C]
        inputs = []
        for stage in self.layers:
            inputs.append(x)
            x = stage(x)
        return self.norm(x), inputs

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[B, in_chans, H, W]`` -> the stage inputs but the last, and ``LN(last stage output)``, NCHW."""
        bottleneck, inputs = self.forward_tokens(x)
        return [m.movedim(-1, 1).contiguous() for m in (*inputs[:-1], bottleneck)]

    forward = forward_pyramid


class AttSwinUNet(Segmentor):
    """The published Att-SwinU-Net: :class:`SwinUnetEncoder` + :class:`~attnseg.heads.att_swin_unet.AttSwinUNetHead`.

    A :class:`~attnseg.models.Segmentor` (any input size: padded to a multiple of the deepest stride, cropped back)
    that, like the official forward, repeats a 1-channel image over its 3 input channels.
    """

    family = "att_swin_unet"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.shape[1] == 1 and self.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)  # the official x.repeat(1, 3, 1, 1)
        return super().forward(x)


# Hyper-parameters of the published configurations (the model's data, not code).
_VARIANTS: dict[str, dict[str, Any]] = {
    # configs/swin_tiny_patch4_window7_224_lite.yaml + configs/swin_attention_unet.py (official: 32.69 M with CCA)
    "tiny": {"embed_dim": 96, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24), "window_size": 7},
    # the parity fixture's reduced model
    "test": {"embed_dim": 8, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8), "window_size": 7},
}
_SHARED = ("embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "qkv_bias", "qk_scale", "drop_rate",
           "attn_drop_rate", "drop_path_rate", "img_size")
_HEAD_ONLY = ("cca_mode", "skip_levels", "cca_depth", "cca_heads", "cca_head_dim")


def _create_att_swin_unet(variant: str, in_chans: int, num_classes: int, kwargs: dict[str, Any]) -> AttSwinUNet:
    args = {"mlp_ratio": 4.0, "qkv_bias": True, "qk_scale": None, "drop_rate": 0.0, "attn_drop_rate": 0.0,
            "drop_path_rate": 0.1, "img_size": 224, **_VARIANTS[variant], **kwargs}
    unknown = sorted(set(args) - {*_SHARED, *_HEAD_ONLY, "patch_norm"})
    if unknown:
        raise TypeError(f"att_swin_unet got unexpected arguments {unknown} (accepted: "
                        f"{', '.join((*_SHARED, *_HEAD_ONLY, 'patch_norm'))})")
    encoder = SwinUnetEncoder(in_chans=in_chans, patch_norm=args.get("patch_norm", True),
                              **{k: args[k] for k in _SHARED})
    n = len(encoder.feature_info)
    head_args = {k: args[k] for k in _SHARED if k not in ("embed_dim", "depths", "num_heads")}
    head = AttSwinUNetHead([f["num_chs"] for f in encoder.feature_info], [f["reduction"] for f in encoder.feature_info],
                           num_classes=num_classes, in_chans=in_chans, embed_dim=args["embed_dim"],
                           depths=list(args["depths"])[:n - 1], num_heads=list(args["num_heads"])[:n - 1],
                           **head_args, **{k: args[k] for k in _HEAD_ONLY if k in args})
    return AttSwinUNet(encoder, head)


@MODELS.register()
def att_swin_unet_tiny(in_chans: int = 3, num_classes: int = 1, **kwargs: Any) -> AttSwinUNet:
    """Att-SwinU-Net, the published lite Swin-T configuration (embed 96, depths 2-2-2-2, heads 3-6-12-24, window 7;
    32.68 M parameters with 9 classes: the official model's 32.69 M less its unused second patch embedding and
    decoder norm).

    ``kwargs``: ``cca_mode`` (``"faithful"`` default / ``"broadcast"``), ``skip_levels`` (0-3, default 3),
    ``img_size`` (default 224; None for no mask buffers), ``drop_path_rate`` (default 0.1, as the official code),
    and the other :class:`SwinUnetEncoder` / head options. Default ``num_classes=1``: binary skin-lesion masks.

    Example::

        >>> model = att_swin_unet_tiny(num_classes=2, cca_mode="broadcast")
        >>> model(torch.randn(1, 1, 97, 131)).shape
        torch.Size([1, 2, 97, 131])
    """
    return _create_att_swin_unet("tiny", in_chans, num_classes, kwargs)


@MODELS.register()
def test_att_swin_unet(in_chans: int = 3, num_classes: int = 9, **kwargs: Any) -> AttSwinUNet:
    """The parity fixture's reduced Att-SwinU-Net for CI: embed 8, heads 1-2-4-8, window 7, 9 classes."""
    return _create_att_swin_unet("test", in_chans, num_classes, kwargs)


# -- the encoder as a backbone (configs pair it with the att_swin_unet head) --------------------------------------

@BACKBONES.register(cls=SwinUnetEncoder)
def swin_unet_encoder_tiny(**kwargs: Any) -> SwinUnetEncoder:
    """Swin-Unet's encoder at Swin-T width with the lite depths (embed 96, depths 2-2-2-2, heads 3-6-12-24)."""
    return SwinUnetEncoder(**{**_VARIANTS["tiny"], **kwargs})


@BACKBONES.register(cls=SwinUnetEncoder)
def test_swin_unet_encoder(**kwargs: Any) -> SwinUnetEncoder:
    """The parity fixture's reduced encoder for CI (embed 8, heads 1-2-4-8, window 7)."""
    return SwinUnetEncoder(**{**_VARIANTS["test"], **kwargs})


# -- pretrained configurations (NITR098/AttSwinUNet) -------------------------------------------------------------------
# Licence unknown: the official repository has no LICENSE file in our sources. Its checkpoints are whole Att-SwinU-Nets
# (they load into the ``att_swin_unet`` model, not this encoder alone). Fixed 224 input, ImageNet normalisation.
_cfg = pretrained_cfg_factory(paper="2210.16898", origin="https://github.com/NITR098/AttSwinUNet", license="unknown",
                              first_conv="patch_embed.proj", classifier=None, num_classes=0, crop_pct=1.0)

default_cfgs: dict[str, dict[str, Any]] = {"swin_unet_encoder_tiny": _cfg()}
