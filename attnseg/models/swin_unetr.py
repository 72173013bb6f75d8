"""Swin UNETR: a Swin Transformer encoder in MONAI's layout with the UNETR CNN decoder, 2D and 3D, v1 and v2.

Papers: Ali Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors in MRI
Images", BrainLes 2021 (arXiv 2201.01266); Yucheng Tang et al., "Self-Supervised Pre-Training of Swin
Transformers for 3D Medical Image Analysis", CVPR 2022 (arXiv 2111.14791); Yufan He et al., "SwinUNETR-V2:
Stronger Swin Transformers with Stagewise Convolutions for 3D Medical Image Segmentation", MICCAI 2023. Reference code: Project-MONAI/MONAI @
d388d1c ``monai/networks/nets/swin_unetr.py`` (``SwinUNETR``, ``SwinTransformer``), written anew on
:mod:`attnseg.layers.swin` and the UNETR head (:mod:`attnseg.heads.unetr`).

The encoder (:class:`SwinViT`, MONAI's ``swinViT``): a ``patch_size`` patch embedding (conv with bias; the input
zero-padded on the far side to whole patches; optional LayerNorm), then four stages ``layers1..4``, each
``depths[i]`` Swin blocks (every second one shifted by half a window) **followed by a patch merging, including
the last stage** (unlike Microsoft's Swin, MONAI#5076). The five maps returned (strides 2, 4, 8, 16, 32 for
patch 2: the patch embedding and each stage's merged output) pass through a parameter-free LayerNorm over
channels when ``normalize`` is on; the un-normalised maps flow on. v2 (``use_v2``) adds a residual conv block
``layers{i}c`` (3x3 conv, InstanceNorm, LeakyReLU, residual) before each stage.

The model (:func:`swin_unetr`) is a :class:`~attnseg.models.Segmentor`: this encoder + the UNETR head with the
stride-16 map fed raw to its decoder step (``raw_deep_skip``), which is MONAI's wiring exactly. The Segmentor
pads any input to a multiple of 32 and crops back, where MONAI raises; on sizes MONAI accepts the outputs are
MONAI's (tested against MONAI and the parity fixtures).

**3D patch merging order.** MONAI concatenates the eight stride-2 sub-grids in an order that changed in 1.5.0
(#8285): the 0.9-1.4 ("legacy") order repeats two sub-grids and never sees two others; every published 3D
checkpoint (BTCV, BraTS, the self-supervised weights) was trained with it. ``merge_order`` selects it for
``downsample="merging"`` in 3D: ``"legacy"`` (the default, right for published weights and MONAI <= 1.4
models) or ``"current"`` (MONAI >= 1.5 models; use it, or ``downsample="mergingv2"``, to train from scratch).
The state_dicts look the same, so the order cannot be read from a checkpoint. 2D is unaffected.

**Checkpoints.** :mod:`attnseg.convert.swin_unetr` maps MONAI state_dicts and the published BTCV/BraTS files
(``{'state_dict': ...}``) onto this model, and the self-supervised encoder weights (``model_swinvit.pt``, CVPR
2022; MONAI's ``load_from``) and the disruptive-autoencoder weights (``ssl_pretrained_weights.pth``) onto its
encoder: ``attnseg.load_pretrained(model, path, strict=False)`` (the decoder, or its output layer, keeps its
initialisation and is listed in the report) or ``load_pretrained(model.backbone, path)``.

**Deviation.** Maps with a single element (a 32³ crop reaches 1x1x1 at stride 32) train without MONAI's
InstanceNorm error: the decoder's InstanceNorm returns 0 there, its eval-mode value (attnseg.layers.dims).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from attnseg.backbones._common import init_linear_layernorm, pretrained_cfg_factory
from attnseg.errors import InputSizeError
from attnseg.heads.unetr import UNETRHead
from attnseg.layers.dims import NormSpec
from attnseg.layers.drop import drop_path_rates
from attnseg.layers.swin import (
    PatchEmbed,
    PatchMerging,
    SwinBlock,
    check_swin_stages,
    clip_window,
    shifted_window_mask,
)
from attnseg.layers.unet_blocks import UnetrBasicBlock
from attnseg.models.segmentor import Segmentor
from attnseg.registry import BACKBONES, MODELS, suggest

__all__ = ["SwinViT", "swin_unetr", "channel_layer_norm"]


def channel_layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free LayerNorm over the channels of ``[B, C, *S]`` (MONAI's ``proj_out(x, normalize=True)``)."""
    return F.layer_norm(x.movedim(1, -1), x.shape[1:2]).movedim(-1, 1)


class SwinStage(nn.Module):
    """MONAI's ``BasicLayer``: ``depth`` Swin blocks (odd ones shifted by half a window) and a patch merging.

    ``[B, *S, C] -> [B, *ceil(S / 2), 2C]`` channels-last. The shift mask is computed once per forward for the
    padded map and shared by the shifted blocks.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: Sequence[int], drop_path: Sequence[float],
                 mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float, spatial_dims: int,
                 merge_order: str | None) -> None:
        super().__init__()
        self.window_size = tuple(window_size)
        self.shift_size = tuple(w // 2 for w in window_size)
        no_shift = (0,) * spatial_dims
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, self.window_size, no_shift if i % 2 == 0 else self.shift_size, mlp_ratio,
                      qkv_bias, None, drop, attn_drop, drop_path[i]) for i in range(depth))
        self.downsample = PatchMerging(dim, spatial_dims, merge_order) if merge_order is not None else None
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[1:-1]
        window, shift = clip_window(size, self.window_size, self.shift_size)
        padded = [-(-n // w) * w for n, w in zip(size, window)]
        mask = shifted_window_mask(padded, window, shift, x.device) if any(shift) else None
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return self.downsample(x) if self.downsample is not None else x


class SwinViT(nn.Module):
    """The Swin UNETR encoder (MONAI's ``SwinTransformer``, attribute ``swinViT`` of ``SwinUNETR``).

    Args:
        in_chans: input channels.
        spatial_dims: 2 or 3.
        feature_size: embedding width ``fs``; stage ``i`` runs at ``fs * 2**i`` and returns ``fs * 2**(i+1)``.
        patch_size: patch embedding size and stride (MONAI's Swin UNETR decoder needs 2).
        depths: Swin blocks per stage (4 stages).
        num_heads: heads per stage; each must divide its stage width.
        window_size: window side (all axes).
        mlp_ratio, qkv_bias: block options.
        drop_rate: dropout after the patch embedding and in the blocks; ``attn_drop_rate`` on attention weights.
        drop_path_rate: stochastic depth, rising linearly over all blocks (MONAI's ``dropout_path_rate``).
        patch_norm: LayerNorm after the patch embedding.
        normalize: parameter-free channel LayerNorm on the returned maps (MONAI's ``normalize``).
        use_v2: SwinUNETR-V2's residual conv block before each stage.
        downsample: ``"merging"`` or ``"mergingv2"`` (MONAI's names; identical in 2D).
        merge_order: 3D ``"merging"`` sub-grid order: ``"legacy"`` (MONAI <= 1.4, every published checkpoint) or
            ``"current"`` (MONAI >= 1.5); see the module docstring.
        out_indices: which of the five maps :meth:`forward_pyramid` returns (0: the patch embedding).
        num_classes: must be 0 (the encoder has no classifier; accepted for the backbone contract).
        grad_checkpointing: recompute the Swin blocks in the backward pass (MONAI's ``use_checkpoint``): the same
            results with much less training memory, about a third more time.

    Example::

        >>> enc = SwinViT(in_chans=1, spatial_dims=3, feature_size=12, depths=(1, 1, 1, 1))
        >>> [tuple(f.shape[1:]) for f in enc.forward_pyramid(torch.randn(1, 1, 32, 32, 32))]
        [(12, 16, 16, 16), (24, 8, 8, 8), (48, 4, 4, 4), (96, 2, 2, 2), (192, 1, 1, 1)]
    """

    family = "swin_unetr"
    input_conv_keys = ("patch_embed.proj.weight",)  # the self-supervised weights have 1 input channel

    def __init__(self, in_chans: int = 1, spatial_dims: int = 3, feature_size: int = 48, patch_size: int = 2,
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, patch_norm: bool = False, normalize: bool = True, use_v2: bool = False,
                 downsample: str = "merging", merge_order: str = "legacy", out_indices: Sequence[int] = (0, 1, 2, 3, 4),
                 num_classes: int = 0, grad_checkpointing: bool = False) -> None:
        super().__init__()
        depths, num_heads = [int(d) for d in depths], [int(h) for h in num_heads]
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims=}")
        if len(depths) != 4 or len(num_heads) != 4 or min(depths) < 1 or min(num_heads) < 1:
            raise ValueError(f"depths and num_heads need 4 positive values (one per stage), got {depths=}, {num_heads=}")
        for name, value in (("in_chans", in_chans), ("feature_size", feature_size), ("patch_size", patch_size),
                            ("window_size", window_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
        check_swin_stages("feature_size", feature_size, num_heads, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate)
        if downsample not in ("merging", "mergingv2"):
            raise ValueError(f"downsample must be 'merging' or 'mergingv2', got {downsample!r}"
                             f"{suggest(downsample, ['merging', 'mergingv2'])}")
        if merge_order not in ("legacy", "current"):
            raise ValueError(f"merge_order must be 'legacy' (MONAI <= 1.4 and published 3D checkpoints) or 'current' "
                             f"(MONAI >= 1.5), got {merge_order!r}")
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or any(not 0 <= i <= 4 for i in out_indices) or sorted(set(out_indices)) != list(out_indices):
            raise ValueError(f"out_indices must be increasing values in 0..4, got {out_indices}")
        if num_classes != 0:
            raise ValueError(f"the Swin UNETR encoder has no classifier; num_classes must be 0, got {num_classes}")

        self.in_chans, self.spatial_dims, self.num_classes = in_chans, spatial_dims, 0
        self.feature_size, self.patch_size, self.normalize, self.use_v2 = feature_size, patch_size, normalize, use_v2
        self.merge_order = merge_order
        self.out_indices = out_indices
        order = "v2" if downsample == "mergingv2" else merge_order
        window = (window_size,) * spatial_dims
        rates = drop_path_rates(depths, drop_path_rate)

        self.patch_embed = PatchEmbed(in_chans, feature_size, patch_size, spatial_dims, patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        for i in range(4):
            dim = feature_size * 2**i
            if use_v2:
                self.add_module(f"layers{i + 1}c", nn.ModuleList([UnetrBasicBlock(
                    spatial_dims=spatial_dims, in_channels=dim, out_channels=dim, norm_name="instance")]))
            self.add_module(f"layers{i + 1}", nn.ModuleList([SwinStage(
                dim, depths[i], num_heads[i], window, rates[i], mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                spatial_dims, order)]))
        self.feature_info = [{"num_chs": feature_size * 2**i, "reduction": patch_size * 2**i,
                              "module": "patch_embed" if i == 0 else f"layers{i}"} for i in out_indices]
        self.apply(self._init_weights)
        self.set_grad_checkpointing(grad_checkpointing)

    _init_weights = staticmethod(init_linear_layernorm)  # MONAI's init is the same as NAT's and BiFormer's

    @property
    def stages(self) -> list[SwinStage]:
        return [self.get_submodule(f"layers{i}")[0] for i in range(1, 5)]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each Swin block in the backward pass (MONAI's ``use_checkpoint``; same outputs, less memory)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter-name rules grouping the patch embedding and each stage (layer-wise lr decay)."""
        return {"stem": r"^patch_embed", "blocks": r"^layers(\d)"}

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[B, in_chans, *S]`` -> maps ``[B, fs * 2**i, *ceil(S / (patch * 2**i))]`` for ``i`` in ``out_indices``."""
        dims = self.spatial_dims
        if x.dim() != dims + 2 or x.shape[1] != self.in_chans:
            raise InputSizeError(f"SwinViT expects [B, {self.in_chans}, {', '.join('DHW'[-dims:])}], got "
                                 f"{list(x.shape)}")
        x = self.pos_drop(self.patch_embed(x))  # [B, *S/p, fs], channels-last
        maps = [x]
        for i, stage in enumerate(self.stages):
            if self.use_v2:
                block = self.get_submodule(f"layers{i + 1}c")[0]
                x = block(x.movedim(-1, 1)).movedim(1, -1)  # the conv block is channels-first
            x = stage(x)
            maps.append(x)
        out = [maps[i].movedim(-1, 1) for i in self.out_indices]  # [B, *S_i, C_i] -> [B, C_i, *S_i]
        return [channel_layer_norm(m) if self.normalize else m.contiguous() for m in out]

    forward = forward_pyramid


def _swin_unetr(in_chans: int, num_classes: int, spatial_dims: int, feature_size: int, norm_name: NormSpec,
                encoder: dict[str, Any]) -> Segmentor:
    if encoder.get("patch_size", 2) != 2:
        raise ValueError(f"Swin UNETR's decoder needs patch_size 2 (strides 2..32), got {encoder['patch_size']}")
    backbone = SwinViT(in_chans=in_chans, spatial_dims=spatial_dims, feature_size=feature_size, **encoder)
    head = UNETRHead([f["num_chs"] for f in backbone.feature_info], [f["reduction"] for f in backbone.feature_info],
                     num_classes=num_classes, spatial_dims=spatial_dims, in_chans=in_chans, feature_size=feature_size,
                     norm_name=norm_name, raw_deep_skip=True)
    return Segmentor(backbone, head)


@MODELS.register()
def swin_unetr(in_chans: int = 1, num_classes: int = 14, spatial_dims: int = 3, feature_size: int = 48,
               norm_name: NormSpec = "instance", **encoder: Any) -> Segmentor:
    """Swin UNETR (MONAI's ``SwinUNETR(in_channels, out_channels, feature_size, spatial_dims, ...)``).

    ``encoder`` takes the other :class:`SwinViT` arguments (``depths``, ``num_heads``, ``use_v2``,
    ``merge_order``, ``drop_path_rate``, ...). Returns a :class:`~attnseg.models.Segmentor` whose ``forward``
    maps ``[B, in_chans, *S]`` (any ``S``) to logits ``[B, num_classes, *S]``. Published sizes: feature_size 48
    ("base", 62.2 M parameters in 3D), 24 ("small"), 12 ("tiny").

    Example::

        >>> model = swin_unetr(in_chans=1, num_classes=2, spatial_dims=3, feature_size=12)
        >>> model(torch.randn(1, 1, 40, 36, 33)).shape
        torch.Size([1, 2, 40, 36, 33])
    """
    return _swin_unetr(in_chans, num_classes, spatial_dims, feature_size, norm_name, encoder)


@MODELS.register()
def swin_unetr_v2(in_chans: int = 1, num_classes: int = 14, spatial_dims: int = 3, feature_size: int = 48,
                  norm_name: NormSpec = "instance", **encoder: Any) -> Segmentor:
    """SwinUNETR-V2: :func:`swin_unetr` with ``use_v2=True`` (a residual conv block before each Swin stage)."""
    return _swin_unetr(in_chans, num_classes, spatial_dims, feature_size, norm_name, {**encoder, "use_v2": True})


# -- encoders as backbones (UNETR or any other head over them; configs name these) -------------------------------

def _encoder(feature_size: int, kwargs: dict[str, Any]) -> SwinViT:
    return SwinViT(**{"feature_size": feature_size, **kwargs})


@BACKBONES.register(cls=SwinViT)
def swinvit_tiny(**kwargs: Any) -> SwinViT:
    """Swin UNETR's encoder at feature_size 12 (with the UNETR head: 4.0 M parameters in 3D)."""
    return _encoder(12, kwargs)


@BACKBONES.register(cls=SwinViT)
def swinvit_small(**kwargs: Any) -> SwinViT:
    """Swin UNETR's encoder at feature_size 24 (with the UNETR head: 15.7 M parameters in 3D)."""
    return _encoder(24, kwargs)


@BACKBONES.register(cls=SwinViT)
def swinvit_base(**kwargs: Any) -> SwinViT:
    """Swin UNETR's encoder at feature_size 48, the self-supervised weights' size (62.2 M with the head in 3D)."""
    return _encoder(48, kwargs)


@BACKBONES.register(cls=SwinViT)
def test_swinvit(**kwargs: Any) -> SwinViT:
    """A tiny encoder for CI: feature_size 12, one block per stage, window 4."""
    return SwinViT(**{"feature_size": 12, "depths": (1, 1, 1, 1), "window_size": 4, **kwargs})


# -- pretrained configurations (Project-MONAI/research-contributions, Apache-2.0) --------------------------------------
# CT intensities scaled to [0, 1] by the pipeline (no mean/std), 96^3 training crops, one input channel. The
# self-supervised encoder file (feature_size 48) loads into swinvit_base; the BTCV/BraTS files are whole Swin UNETRs.
_cfg = pretrained_cfg_factory(paper="2201.01266", origin="https://github.com/Project-MONAI/research-contributions",
                              license="apache-2.0", first_conv="patch_embed.proj", classifier=None, num_classes=0,
                              mean=(0.0,), std=(1.0,), input_size=(1, 96, 96, 96), crop_pct=1.0,
                              interpolation="trilinear")

default_cfgs: dict[str, dict[str, Any]] = {
    "swinvit_tiny": _cfg(),
    "swinvit_small": _cfg(),
    "swinvit_base": _cfg(paper="2111.14791", checkpoints=("model_swinvit.pt",)),
}
