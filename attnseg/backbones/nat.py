"""NAT and DiNAT: hierarchical transformers of (dilated) neighborhood attention.

Papers: Ali Hassani et al., "Neighborhood Attention Transformer", CVPR 2023 (arXiv 2204.07143); Ali Hassani
and Humphrey Shi, "Dilated Neighborhood Attention Transformer", arXiv 2209.15001.
Official code: SHI-Labs/Neighborhood-Attention-Transformer @ d334f5b, ``classification/{nat,dinat,dinats,isotropic}.py``
(MIT) and the dense versions in ``segmentation/`` and ``detection/``. The official code needs NATTEN
0.14.5-0.17.5 (relative position bias was removed in 0.20); this port runs on :mod:`attnseg.ops`.

Three layouts, one block:

- :class:`NAT` (also DiNAT, which is NAT with dilations): a conv tokenizer (two stride-2 3x3 convs, then a
  LayerNorm), levels of NA blocks each ending in a stride-2 3x3 conv downsampler. Keys ``patch_embed.*``,
  ``levels.{i}.blocks.{j}.*``, ``levels.{i}.downsample.*``, ``norm.*``, ``head.*`` as in the official
  checkpoints, which load unchanged.
- :class:`DiNATs` (the official ``DiNAT_s``): Swin's layout with NA in place of window attention; a 4x4 patch
  embedding (input padded on the right/bottom to a multiple of 4), levels ``layers.{i}`` ending in a 2x2
  patch merging (LayerNorm + linear, odd sizes padded first).
- :class:`NATIsotropic` (``classification/isotropic.py``): the DiNAT paper's isotropic models, 16x16 patches
  and ``layers.{i}`` blocks at one resolution; NA, NA alternating with dilated NA, or (ViT-RPB) global
  attention with a relative position bias. Dense use goes through ViTDet's simple feature pyramid.

Each block is pre-norm: ``x + gamma1 * NA(LN(x))`` then ``x + gamma2 * MLP(LN(x))``, ``gamma`` (layer scale)
only where the variant has it. NA has a relative position bias ``attn.rpb [heads, 2k-1, 2k-1]`` indexed in
dilated steps, exactly as NATTEN 0.14-0.17 (checked against the parity fixtures produced with the official code
and NATTEN 0.17.5).

Faithfulness and additions:

- ``forward`` returns the official logits (final LayerNorm, mean over tokens, linear head).
- :meth:`forward_pyramid` returns the pre-downsample output of each level through its own LayerNorm
  ``norm{i}``, NCHW, as the official segmentation/detection backbones do (these norms are new parameters,
  absent from ImageNet checkpoints; mm-style dense checkpoints carry them as ``backbone.norm{i}``).
- Kernel size per level and dilation per layer are arguments, so dense configs re-dilate ImageNet weights
  (dilation changes no parameter shape); named schedules in :data:`DILATION_SCHEDULES`.
- Any input size: maps smaller than ``kernel_size * dilation`` are zero-padded before the qkv projection and
  cropped after, as NATTEN 0.14 did (the official COCO/ADE numbers relied on it; NATTEN >= 0.17 raises). The
  stem and downsamplers give ``ceil(H / 2)`` per step, so 97x131 gives 25x33, 13x17, 7x9 and 4x5 maps.
  ``min_input_size = 32`` keeps the stride-32 map at least one pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from attnseg.backbones._common import (
    check_image_input,
    check_isotropic_args,
    init_linear_layernorm,
    pretrained_cfg_factory,
    reset_norm_linear_head,
)
from attnseg.layers import (
    DropPath,
    Mlp,
    SimpleFeaturePyramid,
    drop_path_rates,
    plain_feature_info,
    relative_position_bias_2d,
)
from attnseg.ops import NeighborhoodAttention2D
from attnseg.registry import BACKBONES, suggest

__all__ = ["NAT", "DiNATs", "NATIsotropic", "NATLayer", "GlobalAttentionRPB", "DILATION_SCHEDULES", "resolve_dilations"]

# Per-level dilation patterns, repeated to each level's depth (reference/backbones_b.md §3.2; the official
# classification factories and dense configs). Dilation must not exceed map_size / kernel_size at the
# training resolution, hence one schedule per setting.
DILATION_SCHEDULES: dict[str, list[list[int]]] = {
    "none": [[1], [1], [1], [1]],
    "classification_224": [[1, 8], [1, 4], [1, 2], [1]],
    "classification_384": [[1, 13], [1, 6], [1, 3], [1]],
    "ade20k_512": [[1, 16], [1, 4, 1, 8], [1, 2, 1, 3, 1, 4], [1, 2]],
    "coco": [[1, 28], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7], [1, 3]],
}


def resolve_dilations(dilations: str | Sequence[int | Sequence[int]] | None,
                      depths: Sequence[int]) -> list[list[int]]:
    """Per-layer dilations ``[level][layer]`` from a schedule name, per-level values or explicit lists.

    A level given as an int uses it for every layer; a named schedule's patterns repeat to each depth. An
    explicit list must have one value per layer.

    Example::

        >>> resolve_dilations("classification_224", [3, 4, 6, 2])
        [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1]]
    """
    if dilations is None:
        return [[1] * d for d in depths]
    if isinstance(dilations, str):
        if dilations not in DILATION_SCHEDULES:
            raise ValueError(f"unknown dilation schedule '{dilations}'{suggest(dilations, DILATION_SCHEDULES)} "
                             f"(known: {', '.join(DILATION_SCHEDULES)})")
        patterns = DILATION_SCHEDULES[dilations]
        return [[patterns[i][j % len(patterns[i])] for j in range(d)] for i, d in enumerate(depths)]
    levels = list(dilations)
    if len(levels) != len(depths):
        raise ValueError(f"dilations need one entry per level ({len(depths)}), got {len(levels)}: {levels}")
    out = []
    for i, (level, depth) in enumerate(zip(levels, depths)):
        values = [int(level)] * depth if isinstance(level, int) else [int(v) for v in level]
        if len(values) != depth or min(values) < 1:
            raise ValueError(f"level {i}: dilations need {depth} values >= 1 (one per layer), got {level}")
        out.append(values)
    return out


class GlobalAttentionRPB(nn.Module):
    """Self-attention over the whole map with a 2D relative position bias (the official ViT-RPB ``MHSARPB``).

    ``[B, H, W, C] -> [B, H, W, C]``. The bias table ``rpb [heads, 2L-1, 2L-1]`` covers the offsets of an
    ``L x L`` map (``L = table_size``, the training resolution in patches) and is indexed key minus query, as the
    official index buffer does (its ``flipud(fliplr(...))`` of Swin's query-minus-key index). The official module
    raises on any other map size; here smaller maps index the table exactly and larger ones use it bicubically
    resized (:func:`attnseg.layers.relpos.relative_position_bias_2d`), so the model runs at any input size. The
    official ``relative_position_index`` buffer is not kept (it is a function of ``L``; the converter drops it).
    """

    def __init__(self, dim: int, num_heads: int, table_size: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads or table_size < 1:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) and table_size >= 1, "
                             f"got {table_size=}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * table_size - 1, 2 * table_size - 1))
        nn.init.trunc_normal_(self.rpb, std=0.02)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, head_dim]
        bias = relative_position_bias_2d(self.rpb, H, W).to(q.dtype)  # [heads, N, N]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None], scale=self.scale,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, H, W, C)))


class NATLayer(nn.Module):
    """Pre-norm NA block on channels-last maps ``[B, H, W, C] -> [B, H, W, C]`` (the official ``NATLayer``).

    ``kernel_size=None`` makes it the official ViT-RPB block: attention over the whole map with a relative
    position bias table sized for ``table_size x table_size`` maps (:class:`GlobalAttentionRPB`).
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int | None = 7, dilation: int = 1,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, layer_scale: float | None = None,
                 table_size: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if kernel_size is None:
            if table_size is None:
                raise ValueError("global attention (kernel_size=None) needs table_size, the map side it is built for")
            self.attn = GlobalAttentionRPB(dim, num_heads, table_size, qkv_bias, qk_scale, attn_drop, drop)
        else:
            self.attn = NeighborhoodAttention2D(dim, num_heads, kernel_size, dilation, qkv_bias=qkv_bias,
                                                qk_scale=qk_scale, rel_pos_bias=True, attn_drop=attn_drop,
                                                proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn(self.norm1(x))
        x = x + self.drop_path(attn if self.gamma1 is None else self.gamma1 * attn)
        mlp = self.mlp(self.norm2(x))
        return x + self.drop_path(mlp if self.gamma2 is None else self.gamma2 * mlp)


class ConvTokenizer(nn.Module):
    """NAT's stem: two stride-2 3x3 convs (no norm or activation between), then a LayerNorm.

    ``[B, C_in, H, W] -> [B, ceil(H/4), ceil(W/4), C]``.
    """

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_chans, embed_dim // 2, 3, 2, 1), nn.Conv2d(embed_dim // 2, embed_dim, 3, 2, 1))
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """NAT's downsampler: stride-2 3x3 conv to twice the channels (no bias), then a LayerNorm; channels-last."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class PatchEmbed(nn.Module):
    """DiNAT_s stem: 4x4 patches (input zero-padded right/bottom to a multiple of 4), then a LayerNorm."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 4) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        x = F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Swin's 2x2 merge (odd sizes zero-padded first): LayerNorm(4C) then linear to 2C; channels-last."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        # gather order (0,0), (1,0), (0,1), (1,1): rows first, as the official code
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class NATLevel(nn.Module):
    """NA blocks then an optional downsampler; returns ``(level output, downsampled)``."""

    def __init__(self, blocks: list[NATLayer], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x, (self.downsample(x) if self.downsample is not None else None)


class _NATBase(nn.Module):
    """What both layouts share: blocks, pyramid norms, head, input checks and the forward methods."""

    family = "nat"
    min_input_size = 32
    output_fmt = "NHWC"  # of forward_features / forward_intermediates; forward_pyramid gives NCHW
    head_key_prefixes = ("head.", "norm.")
    _levels_attr = "levels"

    def __init__(self, stem: nn.Module, downsample: type[nn.Module], in_chans: int, num_classes: int, embed_dim: int,
                 depths: Sequence[int], num_heads: Sequence[int], mlp_ratio: float,
                 kernel_size: int | Sequence[int], dilations: str | Sequence[Any] | None,
                 layer_scale: float | None, qkv_bias: bool, qk_scale: float | None, drop_rate: float,
                 attn_drop_rate: float, drop_path_rate: float, out_indices: Sequence[int], pyramid_norm: bool) -> None:
        super().__init__()
        depths, num_heads, out_indices = list(depths), list(num_heads), tuple(out_indices)
        n = len(depths)
        if num_classes < 0 or in_chans < 1:
            raise ValueError(f"in_chans must be >= 1 and num_classes >= 0, got {in_chans=}, {num_classes=}")
        if not depths or len(num_heads) != n or min(depths) < 1:
            raise ValueError(f"depths (>= 1 each) and num_heads need one value per level, got {depths=}, {num_heads=}")
        kernels = [kernel_size] * n if isinstance(kernel_size, int) else list(kernel_size)
        if len(kernels) != n or min(kernels) < 2:
            raise ValueError(f"kernel_size must be an int or one value per level, each >= 2, got {kernel_size}")
        dims = [embed_dim * 2**i for i in range(n)]
        for i, (dim, heads) in enumerate(zip(dims, num_heads)):
            if heads < 1 or dim % heads:
                raise ValueError(f"level {i}: {dim} channels are not divisible by num_heads={heads}")
        if not out_indices or sorted(set(out_indices)) != list(out_indices) or not all(0 <= i < n for i in out_indices):
            raise ValueError(f"out_indices must be increasing level indices in 0..{n - 1}, got {out_indices}")
        per_layer = resolve_dilations(dilations, depths)
        rates = drop_path_rates(depths, drop_path_rate)
        self.in_chans, self.num_classes, self.dims, self.out_indices = in_chans, num_classes, dims, out_indices
        self.kernel_sizes, self.dilations = kernels, per_layer
        self.num_features = dims[-1]

        self.patch_embed = stem
        self.pos_drop = nn.Dropout(drop_rate)
        levels = nn.ModuleList(
            NATLevel([NATLayer(dims[i], num_heads[i], kernels[i], per_layer[i][j], mlp_ratio, qkv_bias, qk_scale,
                               drop_rate, attn_drop_rate, rates[i][j], layer_scale) for j in range(depths[i])],
                     downsample(dims[i]) if i < n - 1 else None)
            for i in range(n))
        setattr(self, self._levels_attr, levels)
        for i in out_indices if pyramid_norm else ():
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))  # the dense versions' per-output norms
        self.pyramid_norm = pyramid_norm
        self.norm = nn.LayerNorm(dims[-1]) if num_classes else None
        self.head = nn.Linear(dims[-1], num_classes) if num_classes else None
        self.feature_info = [{"num_chs": dims[i], "reduction": 2 ** (i + 2), "module": f"{self._levels_attr}.{i}"}
                             for i in out_indices]
        self.apply(self._init_weights)

    @property
    def new_key_prefixes(self) -> tuple[str, ...]:
        """Own keys that classification checkpoints lack (the pyramid norms)."""
        return tuple(f"norm{i}." for i in self.out_indices) if self.pyramid_norm else ()

    _init_weights = staticmethod(init_linear_layernorm)  # the official init; convs keep PyTorch's default

    # -- timm-style utilities -----------------------------------------------------------------------
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter-name rules grouping the stem and each level (or each block when not ``coarse``)."""
        name = self._levels_attr
        return {"stem": r"^patch_embed", "blocks": rf"^{name}\.(\d+)" if coarse else [
            (rf"^{name}\.(\d+)\.downsample", (0,)), (rf"^{name}\.(\d+)\.blocks\.(\d+)", None)]}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (same outputs, less memory)."""
        for level in getattr(self, self._levels_attr):
            level.grad_checkpointing = enable

    def no_weight_decay_keywords(self) -> set[str]:
        """Parameter names containing these get no weight decay (the official ``{'rpb'}``)."""
        return {"rpb"}

    def get_classifier(self) -> nn.Module | None:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new linear classifier (``num_classes > 0``, the final norm kept or created) or none at all (``0``)."""
        reset_norm_linear_head(self, num_classes, nn.LayerNorm)

    # -- forward ------------------------------------------------------------------------------------

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every level's output before its downsampler, channels-last ``[B, H_i, W_i, C_i]`` (no pyramid norm)."""
        check_image_input(self, x)
        x = self.pos_drop(self.patch_embed(x))
        outs = []
        for level in getattr(self, self._levels_attr):
            out, x = level(x)
            outs.append(out)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last level output, channels-last ``[B, ceil(H/32), ceil(W/32), C]`` (before the final norm)."""
        return self.forward_intermediates(x)[-1]

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """NCHW maps ``[B, C_i, H_i, W_i]`` at strides ``4 * 2**i`` for ``i`` in ``out_indices``, each through
        its LayerNorm ``norm{i}`` when ``pyramid_norm`` is on (the official dense backbones' outputs)."""
        feats = self.forward_intermediates(x)
        outs = []
        for i in self.out_indices:
            f = getattr(self, f"norm{i}")(feats[i]) if self.pyramid_norm else feats[i]
            outs.append(f.permute(0, 3, 1, 2).contiguous())
        return outs

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``[B, H, W, C]`` -> logits: final LayerNorm, mean over all tokens, linear."""
        if self.head is None:
            raise RuntimeError(f"this {type(self).__name__} has no classifier (num_classes=0); use forward_pyramid")
        x = self.norm(x).mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> logits ``[B, num_classes]``, as the official model's ``forward``."""
        return self.forward_head(self.forward_features(x))


class NAT(_NATBase):
    """NAT / DiNAT backbone and classifier (the official ``NAT`` and ``DiNAT`` classes).

    Args:
        in_chans: input channels.
        num_classes: classifier outputs; 0 removes the final norm and the head (dense use).
        embed_dim: channels of level 0 (level ``i`` has ``embed_dim * 2**i``, stride ``4 * 2**i``).
        depths, num_heads: blocks and attention heads per level.
        mlp_ratio: MLP hidden width over the channels.
        kernel_size: NA kernel, one for all levels or one per level (>= 2; changes the rpb shape).
        dilations: None (NAT), a name in :data:`DILATION_SCHEDULES`, or per level an int or one value per layer.
        layer_scale: initial value of the per-channel residual scales ``gamma1/gamma2``; None: no layer scale.
        qkv_bias, qk_scale: qkv projection bias; logit scale (default ``head_dim ** -0.5``).
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout, last block's stochastic depth.
        out_indices: levels returned by :meth:`forward_pyramid` (and listed in ``feature_info``).
        pyramid_norm: the dense versions' LayerNorm ``norm{i}`` on each pyramid output (new parameters).

    Example::

        >>> m = test_nat(num_classes=0)
        >>> [tuple(f.shape[1:]) for f in m.forward_pyramid(torch.randn(1, 3, 97, 131))]
        [(16, 25, 33), (32, 13, 17), (64, 7, 9), (128, 4, 5)]
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 64,
                 depths: Sequence[int] = (3, 4, 6, 5), num_heads: Sequence[int] = (2, 4, 8, 16), mlp_ratio: float = 3.0,
                 kernel_size: int | Sequence[int] = 7, dilations: str | Sequence[Any] | None = None,
                 layer_scale: float | None = None, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.2,
                 out_indices: Sequence[int] = (0, 1, 2, 3), pyramid_norm: bool = True) -> None:
        super().__init__(ConvTokenizer(in_chans, embed_dim), ConvDownsampler, in_chans, num_classes, embed_dim, depths,
                         num_heads, mlp_ratio, kernel_size, dilations, layer_scale, qkv_bias, qk_scale, drop_rate,
                         attn_drop_rate, drop_path_rate, out_indices, pyramid_norm)


class DiNATs(_NATBase):
    """DiNAT_s: Swin's layout (4x4 patch embedding, patch merging, ``layers.*`` keys) with NA / dilated NA.

    Arguments as :class:`NAT` (no layer scale; the official defaults are the Tiny widths, mlp_ratio 4).
    """

    _levels_attr = "layers"

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24), mlp_ratio: float = 4.0,
                 kernel_size: int | Sequence[int] = 7, dilations: str | Sequence[Any] | None = None,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.2, out_indices: Sequence[int] = (0, 1, 2, 3),
                 pyramid_norm: bool = True) -> None:
        super().__init__(PatchEmbed(in_chans, embed_dim), PatchMerging, in_chans, num_classes, embed_dim, depths,
                         num_heads, mlp_ratio, kernel_size, dilations, None, qkv_bias, qk_scale, drop_rate,
                         attn_drop_rate, drop_path_rate, out_indices, pyramid_norm)


class NATIsotropic(nn.Module):
    """Isotropic NAT / DiNAT and ViT-RPB: one resolution throughout (the official ``NATIsotropic``).

    The DiNAT paper's isotropic comparison (classification/isotropic.py): a 16x16 patch embedding (input padded
    on the right/bottom to whole patches) + LayerNorm, ``depth`` blocks at stride 16 (keys ``layers.{i}.*``),
    final LayerNorm, mean over tokens, linear head. Blocks alternate NA (even layers) and NA with ``dilation``
    (odd layers); ``kernel_size=None`` gives ViT-RPB, global self-attention with a relative position bias table
    built for ``img_size // patch_size`` patches a side (:class:`GlobalAttentionRPB`; larger maps use the table
    bicubically resized). The official model reshapes the patch grid to ``img_size // patch_size`` and so runs
    only at ``img_size``; this one runs at any size of at least one patch.

    For dense heads, :meth:`forward_pyramid` turns the last stride-16 map into strides 4/8/16/32 with ViTDet's
    simple feature pyramid (``pyramid.*``, new parameters; the official code has no dense version). With
    ``pyramid=False`` it returns the stride-16 map alone.

    Args:
        img_size: training resolution; sets the ViT-RPB table size (unused by NA blocks).
        patch_size: patch side (the stride of every block).
        depth: number of blocks; the other arguments as :class:`NAT`.
        kernel_size: NA kernel, or None for global attention (ViT-RPB).
        dilation: dilation of the odd blocks (None or 1: all plain NA).
        out_indices: pyramid levels (0..3: strides 4, 8, 16, 32) built and returned by :meth:`forward_pyramid`.
        pyramid: build the simple feature pyramid.

    Example::

        >>> m = NATIsotropic(embed_dim=32, depth=2, num_heads=2, num_classes=0)
        >>> [tuple(f.shape[1:]) for f in m.forward_pyramid(torch.randn(1, 3, 97, 131))]
        [(8, 25, 33), (16, 13, 17), (32, 7, 9), (32, 4, 5)]
    """

    family = "nat"
    output_fmt = "NHWC"
    head_key_prefixes = ("head.", "norm.")

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, img_size: int = 224, patch_size: int = 16,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 kernel_size: int | None = 7, dilation: int | None = 2, qkv_bias: bool = True,
                 qk_scale: float | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, out_indices: Sequence[int] = (0, 1, 2, 3), pyramid: bool = True) -> None:
        super().__init__()
        check_isotropic_args(in_chans, num_classes, depth, patch_size, embed_dim, num_heads, img_size)
        if kernel_size is not None and kernel_size < 2:
            raise ValueError(f"kernel_size must be >= 2 or None (global attention), got {kernel_size}")
        dilation = dilation or 1
        self.in_chans, self.num_classes, self.num_features = in_chans, num_classes, embed_dim
        self.min_input_size = patch_size
        self.kernel_size, self.table_size = kernel_size, img_size // patch_size
        self.dilations = [1 if i % 2 == 0 else dilation for i in range(depth)]
        rates = drop_path_rates([depth], drop_path_rate)[0]

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.pos_drop = nn.Dropout(drop_rate)
        self.layers = nn.Sequential(*(
            NATLayer(embed_dim, num_heads, kernel_size, self.dilations[i], mlp_ratio, qkv_bias, qk_scale, drop_rate,
                     attn_drop_rate, rates[i], table_size=self.table_size) for i in range(depth)))
        self.grad_checkpointing = False
        self.pyramid = SimpleFeaturePyramid(embed_dim, out_indices) if pyramid else None
        self.out_indices = tuple(out_indices) if pyramid else (2,)
        self.feature_info = plain_feature_info(self.pyramid, embed_dim, patch_size, "layers")
        self.norm = nn.LayerNorm(embed_dim) if num_classes else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else None
        self.apply(self._init_weights)

    _init_weights = staticmethod(init_linear_layernorm)

    @property
    def new_key_prefixes(self) -> tuple[str, ...]:
        """Own keys that the official checkpoints lack (the simple feature pyramid)."""
        return ("pyramid.",) if self.pyramid is not None else ()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter-name rules grouping the patch embedding and each block."""
        return {"stem": r"^patch_embed", "blocks": r"^layers\.(\d+)"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (same outputs, less memory)."""
        self.grad_checkpointing = enable

    def no_weight_decay_keywords(self) -> set[str]:
        """Parameter names containing these get no weight decay (the official ``{'rpb'}``)."""
        return {"rpb"}

    def get_classifier(self) -> nn.Module | None:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new linear classifier (``num_classes > 0``, the final norm kept or created) or none at all (``0``)."""
        reset_norm_linear_head(self, num_classes, nn.LayerNorm)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last block's output, channels-last ``[B, ceil(H/p), ceil(W/p), C]`` (before the final norm)."""
        check_image_input(self, x)
        x = self.pos_drop(self.patch_embed(x))
        for block in self.layers:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and torch.is_grad_enabled() \
                else block(x)
        return x

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """NCHW maps at the strides of ``feature_info``: ``[B, C_i, ceil(H/s_i), ceil(W/s_i)]``."""
        feats = self.forward_features(x).permute(0, 3, 1, 2)  # [B, h, w, C] -> [B, C, h, w]
        if self.pyramid is None:
            return [feats.contiguous()]
        return self.pyramid(feats, size=x.shape[-2:])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``[B, h, w, C]`` -> logits: final LayerNorm, mean over all tokens, linear."""
        if self.head is None:
            raise RuntimeError(f"this {type(self).__name__} has no classifier (num_classes=0); use forward_pyramid")
        x = self.norm(x).mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> logits ``[B, num_classes]``, as the official model's ``forward``."""
        return self.forward_head(self.forward_features(x))


# -- variants ----------------------------------------------------------------------------------------------------
# Parameter counts at num_classes=1000 without pyramid norms; ImageNet-1k top-1 at 224 from the official README.

def _create(cls: type[_NATBase], variant: dict[str, Any], kwargs: dict[str, Any]) -> _NATBase:
    return cls(**{**variant, **kwargs})


_MINI = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0, drop_path_rate=0.2)
_TINY = dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0, drop_path_rate=0.2)
_SMALL = dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2.0, drop_path_rate=0.3)
_BASE = dict(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2.0, drop_path_rate=0.5)
# The official Large factories use heads 4/8/16/32 (head dim 48), not the 6/12/24/48 of the paper's table.
_LARGE = dict(embed_dim=192, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2.0, drop_path_rate=0.35)


@BACKBONES.register(cls=NAT)
def nat_mini(**kwargs: Any) -> NAT:
    """NAT-Mini: 20.0M parameters, 81.8% top-1."""
    return _create(NAT, _MINI, kwargs)


@BACKBONES.register(cls=NAT)
def nat_tiny(**kwargs: Any) -> NAT:
    """NAT-Tiny: 27.9M parameters, 83.2% top-1."""
    return _create(NAT, _TINY, kwargs)


@BACKBONES.register(cls=NAT)
def nat_small(**kwargs: Any) -> NAT:
    """NAT-Small: 50.7M parameters, 83.7% top-1 (layer scale 1e-5)."""
    return _create(NAT, {**_SMALL, "layer_scale": 1e-5}, kwargs)


@BACKBONES.register(cls=NAT)
def nat_base(**kwargs: Any) -> NAT:
    """NAT-Base: 89.8M parameters, 84.3% top-1 (layer scale 1e-5)."""
    return _create(NAT, {**_BASE, "layer_scale": 1e-5}, kwargs)


@BACKBONES.register(cls=NAT)
def dinat_mini(**kwargs: Any) -> NAT:
    """DiNAT-Mini: 20.0M parameters, 81.8% top-1; dilations 8/4/2/1 alternating with NA."""
    return _create(NAT, {**_MINI, "dilations": "classification_224"}, kwargs)


@BACKBONES.register(cls=NAT)
def dinat_tiny(**kwargs: Any) -> NAT:
    """DiNAT-Tiny: 27.9M parameters, 82.7% top-1."""
    return _create(NAT, {**_TINY, "dilations": "classification_224"}, kwargs)


@BACKBONES.register(cls=NAT)
def dinat_small(**kwargs: Any) -> NAT:
    """DiNAT-Small: 50.7M parameters, 83.8% top-1 (no layer scale, unlike NAT-Small)."""
    return _create(NAT, {**_SMALL, "dilations": "classification_224"}, kwargs)


@BACKBONES.register(cls=NAT)
def dinat_base(**kwargs: Any) -> NAT:
    """DiNAT-Base: 89.8M parameters, 84.4% top-1 (layer scale 1e-5)."""
    return _create(NAT, {**_BASE, "dilations": "classification_224", "layer_scale": 1e-5}, kwargs)


@BACKBONES.register(cls=NAT)
def dinat_large(**kwargs: Any) -> NAT:
    """DiNAT-Large (ImageNet-22k pretraining): 86.6% top-1 at 224."""
    return _create(NAT, {**_LARGE, "dilations": "classification_224"}, kwargs)


@BACKBONES.register(cls=NAT)
def dinat_large_384(**kwargs: Any) -> NAT:
    """DiNAT-Large at 384 (dilations 13/6/3/1): 87.4% top-1."""
    return _create(NAT, {**_LARGE, "dilations": "classification_384"}, kwargs)


@BACKBONES.register(cls=NAT)
def dinat_large_384_11x11(**kwargs: Any) -> NAT:
    """DiNAT-Large at 384 with 11x11 kernels (dilations 8/4/2/1): 87.5% top-1."""
    return _create(NAT, {**_LARGE, "kernel_size": 11, "dilations": "classification_224"}, kwargs)


# The ImageNet-22k checkpoints (21841 classes) before fine-tuning; the official factories default to 1000 classes
# and are called with num_classes=21841 for these weights, which is the default here.
@BACKBONES.register(cls=NAT)
def dinat_large_21k(**kwargs: Any) -> NAT:
    """DiNAT-Large, ImageNet-22k pretraining (224, k7; drop path 0.2)."""
    return _create(NAT, {**_LARGE, "drop_path_rate": 0.2, "num_classes": 21841, "dilations": "classification_224"},
                   kwargs)


@BACKBONES.register(cls=NAT)
def dinat_large_21k_11x11(**kwargs: Any) -> NAT:
    """DiNAT-Large, ImageNet-22k weights with the rpb bicubically interpolated to 11x11 kernels."""
    return _create(NAT, {**_LARGE, "drop_path_rate": 0.2, "num_classes": 21841, "kernel_size": 11,
                         "dilations": "classification_224"}, kwargs)


@BACKBONES.register(cls=DiNATs)
def dinat_s_tiny(**kwargs: Any) -> DiNATs:
    """DiNAT_s-Tiny: 28.3M parameters, 81.8% top-1."""
    return _create(DiNATs, dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2,
                                dilations="classification_224"), kwargs)


@BACKBONES.register(cls=DiNATs)
def dinat_s_small(**kwargs: Any) -> DiNATs:
    """DiNAT_s-Small: 49.6M parameters, 83.5% top-1."""
    return _create(DiNATs, dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3,
                                dilations="classification_224"), kwargs)


@BACKBONES.register(cls=DiNATs)
def dinat_s_base(**kwargs: Any) -> DiNATs:
    """DiNAT_s-Base: 87.8M parameters, 83.8% top-1."""
    return _create(DiNATs, dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5,
                                dilations="classification_224"), kwargs)


@BACKBONES.register(cls=DiNATs)
def dinat_s_large(**kwargs: Any) -> DiNATs:
    """DiNAT_s-Large (ImageNet-22k pretraining): 86.5% top-1 at 224."""
    return _create(DiNATs, dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.35,
                                dilations="classification_224"), kwargs)


@BACKBONES.register(cls=DiNATs)
def dinat_s_large_384(**kwargs: Any) -> DiNATs:
    """DiNAT_s-Large at 384 (dilations 13/6/3/1): 87.4% top-1."""
    return _create(DiNATs, dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.35,
                                dilations="classification_384"), kwargs)


@BACKBONES.register(cls=DiNATs)
def dinat_s_large_21k(**kwargs: Any) -> DiNATs:
    """DiNAT_s-Large, ImageNet-22k pretraining (224; 21841 classes by default, drop path 0.2)."""
    return _create(DiNATs, dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.2,
                                num_classes=21841, dilations="classification_224"), kwargs)


# Isotropic models: parameters and ImageNet-1k top-1 at 224 from the official DiNAT.md.
_ISO_SMALL = dict(embed_dim=384, depth=12, num_heads=12, drop_path_rate=0.1)
_ISO_BASE = dict(embed_dim=768, depth=12, num_heads=24, drop_path_rate=0.4)


@BACKBONES.register(cls=NATIsotropic)
def vitrpb_small(**kwargs: Any) -> NATIsotropic:
    """ViT-RPB-Small (isotropic, global attention with relative position bias): 22M parameters, 81.2% top-1."""
    return _create(NATIsotropic, {**_ISO_SMALL, "kernel_size": None, "dilation": None}, kwargs)


@BACKBONES.register(cls=NATIsotropic)
def nat_isotropic_small(**kwargs: Any) -> NATIsotropic:
    """NAT-Small isotropic (k7): 22M parameters, 80.0% top-1."""
    return _create(NATIsotropic, {**_ISO_SMALL, "kernel_size": 7, "dilation": 1}, kwargs)


@BACKBONES.register(cls=NATIsotropic)
def dinat_isotropic_small(**kwargs: Any) -> NATIsotropic:
    """DiNAT-Small isotropic (k7, dilation 2 on every other block): 22M parameters, 80.8% top-1."""
    return _create(NATIsotropic, {**_ISO_SMALL, "kernel_size": 7, "dilation": 2}, kwargs)


@BACKBONES.register(cls=NATIsotropic)
def vitrpb_base(**kwargs: Any) -> NATIsotropic:
    """ViT-RPB-Base: 86M parameters, 82.5% top-1."""
    return _create(NATIsotropic, {**_ISO_BASE, "kernel_size": None, "dilation": None}, kwargs)


@BACKBONES.register(cls=NATIsotropic)
def nat_isotropic_base(**kwargs: Any) -> NATIsotropic:
    """NAT-Base isotropic (k7): 86M parameters, 81.6% top-1."""
    return _create(NATIsotropic, {**_ISO_BASE, "kernel_size": 7, "dilation": 1}, kwargs)


@BACKBONES.register(cls=NATIsotropic)
def dinat_isotropic_base(**kwargs: Any) -> NATIsotropic:
    """DiNAT-Base isotropic (k7, dilation 2 on every other block): 86M parameters, 82.1% top-1."""
    return _create(NATIsotropic, {**_ISO_BASE, "kernel_size": 7, "dilation": 2}, kwargs)


@BACKBONES.register(cls=NAT)
def test_nat(**kwargs: Any) -> NAT:
    """A tiny DiNAT for CI (no published weights)."""
    return _create(NAT, dict(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8), mlp_ratio=2.0,
                             dilations=[[1], [1, 2], [2], [1]], layer_scale=1e-5, drop_path_rate=0.0), kwargs)


@BACKBONES.register(cls=NATIsotropic)
def test_nat_isotropic(**kwargs: Any) -> NATIsotropic:
    """A tiny isotropic DiNAT for CI (no published weights)."""
    return _create(NATIsotropic, dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, kernel_size=7, dilation=2,
                                      drop_path_rate=0.0), kwargs)


# -- pretrained configurations (SHI-Labs/Neighborhood-Attention-Transformer, MIT) --------------------------------------
# NAT 2204.07143, DiNAT 2209.15001. File names from the official NAT.md / DiNAT.md. The official training and
# validation scripts are timm's with no data settings of their own: timm's defaults (crop 0.875, bicubic), and no
# crop at 384.
_ORIGIN = "https://github.com/SHI-Labs/Neighborhood-Attention-Transformer"
_nat = pretrained_cfg_factory(paper="2204.07143", origin=_ORIGIN, license="mit", first_conv="patch_embed.proj.0",
                              classifier="head")
_dinat = pretrained_cfg_factory(paper="2209.15001", origin=_ORIGIN, license="mit", first_conv="patch_embed.proj.0",
                                classifier="head")
_dinat_s = pretrained_cfg_factory(paper="2209.15001", origin=_ORIGIN, license="mit", first_conv="patch_embed.proj",
                                  classifier="head")
_384 = dict(input_size=(3, 384, 384), crop_pct=1.0)

default_cfgs: dict[str, dict[str, Any]] = {
    **{f"nat_{size}": _nat(checkpoints=(f"nat_{size}.pth",)) for size in ("mini", "tiny", "small", "base")},
    **{f"dinat_{size}": _dinat(checkpoints=(f"dinat_{size}_in1k_224.pth",))
       for size in ("mini", "tiny", "small", "base")},
    "dinat_large": _dinat(checkpoints=("dinat_large_in22k_in1k_224.pth",)),
    "dinat_large_384": _dinat(**_384, checkpoints=("dinat_large_in22k_in1k_384.pth",)),
    "dinat_large_384_11x11": _dinat(**_384, checkpoints=("dinat_large_in22k_in1k_384_11x11.pth",)),
    "dinat_large_21k": _dinat(num_classes=21841, checkpoints=("dinat_large_in22k_224.pth",)),
    "dinat_large_21k_11x11": _dinat(num_classes=21841, checkpoints=("dinat_large_in22k_224_11x11interp.pth",)),
    **{f"dinat_s_{size}": _dinat_s(checkpoints=(f"dinat_s_{size}_1k_224.pth",)) for size in ("tiny", "small", "base")},
    "dinat_s_large": _dinat_s(checkpoints=("dinat_s_large_1k_224.pth",)),
    "dinat_s_large_384": _dinat_s(**_384, checkpoints=("dinat_s_large_1k_384.pth",)),
    "dinat_s_large_21k": _dinat_s(num_classes=21841, checkpoints=("dinat_s_large_in22k_224.pth",)),
    **{f"{kind}_{size}": _dinat_s(checkpoints=(f"{kind}_{size}_in1k_224.pth",))
       for kind in ("vitrpb", "nat_isotropic", "dinat_isotropic") for size in ("small", "base")},
}
