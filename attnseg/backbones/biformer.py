"""BiFormer: vision transformer with bi-level routing attention.

Paper: Lei Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023
(arXiv 2303.08810). Official code: rayleizhu/BiFormer @ 1697bbb, ``models/biformer.py`` with the legacy
operator ``ops/bra_legacy.py`` (used by every released checkpoint), ``models/_common.py`` (stage-4
``AttentionLePE``) and ``semantic_segmentation/models_mm/biformer_mm.py`` (dense version). Key names are
the official ones, so checkpoints load unchanged (``{'model': ...}`` and mm-style ``backbone.*`` files alike).

Bi-level routing attention, per layer (NHWC input ``[N, H, W, C]``): zero-pad the normed input at the bottom
and right to multiples of ``n_win``; cut ``n_win x n_win`` regions; project ``q`` (``qk_dim``) and ``k, v``;
region descriptors are the mean ``q`` and ``k`` of each region (detached); every query region routes to the
``topk`` regions with the largest descriptor dot products; its pixels attend the pixels of those regions
with ``scale = qk_dim ** -0.5`` (the full qk dim, not the head dim: a parity trap of the official code);
LePE, a depthwise 5x5 conv of ``v`` laid out as the image, is added; output projection ``wo``; crop.
The last stage (``topk == -2``) is global attention over all tokens with 8 heads and a LePE of the input.

Faithfulness and differences:

- The attention over routed regions is :func:`attnseg.ops.region_routed_attention`, which never makes the
  official ``topk``-fold copy of keys and values (issues #21, #50); outputs equal the official ones up to
  float rounding (parity tests use fixtures whose routing margins exceed that rounding). In inference, where a
  quarter or more of the regions are routed (stage 3: 16 of 49), it is computed instead as attention over all
  tokens with the routing as a mask (:func:`attnseg.ops.region_masked_attention`): same keys, no gathers.
- Padding is always on (the official classifier asserts divisible sizes; its dense version pads): any input
  works, and divisible inputs give exactly the official classifier's outputs. Padded pixels are not masked,
  as in the official code: they carry the projection biases into region means and attention.
- :meth:`forward_pyramid` is the official dense backbone's output: each stage through its own LayerNorm2d
  ``extra_norms.{i}`` (eps 1e-6), NCHW, strides 4/8/16/32 with ceil rounding for odd sizes.
- Only the released configuration of the routing is implemented (``kv_downsample_mode='identity'``, no
  routing parameters, hard non-differentiable routing, pre-norm); :mod:`attnseg.convert.biformer` refuses
  official records asking for the ablation modes.
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
    init_linear_layernorm,
    pretrained_cfg_factory,
    reset_norm_linear_head,
)
from attnseg.layers import DropPath, LayerNorm2d, drop_path_rates
from attnseg.ops.routing import prefers_masked_dense, region_masked_attention, region_routed_attention
from attnseg.registry import BACKBONES

__all__ = ["BiFormer", "BiLevelRoutingAttention", "AttentionLePE", "BiFormerBlock"]


class QKVLinear(nn.Module):
    """One linear to ``q`` (``qk_dim``) and ``kv`` (``qk_dim + dim``); the official ``qkv.qkv`` keys."""

    def __init__(self, dim: int, qk_dim: int) -> None:
        super().__init__()
        self.qk_dim = qk_dim
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, kv = self.qkv(x).split([self.qk_dim, x.shape[-1] + self.qk_dim], dim=-1)
        return q, kv


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention on ``[N, H, W, C]`` (any H, W: padded to multiples of ``n_win``).

    Args:
        dim: channels; num_heads: heads (``qk_dim`` and ``dim`` divisible); n_win: regions per side.
        qk_dim: query/key channels (default ``dim``); qk_scale: logit scale (default ``qk_dim ** -0.5``).
        topk: routed regions per query region; side_dwconv: LePE kernel (0: none).
    """

    def __init__(self, dim: int, num_heads: int = 8, n_win: int = 7, qk_dim: int | None = None,
                 qk_scale: float | None = None, topk: int = 4, side_dwconv: int = 5) -> None:
        super().__init__()
        self.dim, self.n_win, self.num_heads, self.topk = dim, n_win, num_heads, topk
        self.qk_dim = qk_dim or dim
        if self.qk_dim % num_heads or dim % num_heads:
            raise ValueError(f"qk_dim ({self.qk_dim}) and dim ({dim}) must be divisible by num_heads ({num_heads})")
        if not 1 <= topk <= n_win**2:
            raise ValueError(f"topk must be in [1, n_win^2 = {n_win ** 2}], got {topk}")
        self.scale = qk_scale or self.qk_dim**-0.5
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv else None
        self.qkv = QKVLinear(dim, self.qk_dim)
        self.wo = nn.Linear(dim, dim)

    def route(self, q_regions: torch.Tensor, k_regions: torch.Tensor) -> torch.Tensor:
        """Top-k key regions ``[N, S^2, topk]`` of each query region from descriptors ``[N, S^2, qk_dim]``."""
        logits = (q_regions.detach() * self.scale) @ k_regions.detach().transpose(-1, -2)
        return torch.topk(logits, k=self.topk, dim=-1).indices

    def forward(self, x: torch.Tensor, return_routing: bool = False) -> Any:
        n, h_in, w_in, _ = x.shape
        s = self.n_win
        if h_in % s or w_in % s:  # to whole regions (cropped at the end)
            x = F.pad(x, (0, 0, 0, -w_in % s, 0, -h_in % s))
        h, w = x.shape[1] // s, x.shape[2] // s  # region size
        q, kv = self.qkv(x)  # [N, H, W, qk], [N, H, W, qk + C]
        if not (torch.is_grad_enabled() and x.requires_grad) and prefers_masked_dense(s * s, self.topk, n,
                                                                                      h * w * s * s):
            out, index = self._masked_dense(q, kv, h, w)
        else:
            out, index = self._routed(q, kv, h, w)
        if self.lepe is not None:
            out = out + self.lepe(kv[..., self.qk_dim:].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.wo(out)[:, :h_in, :w_in]
        return (out, index) if return_routing else out

    def _masked_dense(self, q: torch.Tensor, kv: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference when most regions are routed: attention over all tokens with the routing as a mask."""
        n, s, m = q.shape[0], self.n_win, self.num_heads
        # region descriptors: mean query / key over each region's pixels, [N, S^2, qk_dim] (pooling the NHWC map
        # through its channels-last NCHW view, much faster than a mean over the strided region axes)
        def describe(t: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(t.permute(0, 3, 1, 2), (h, w)).permute(0, 2, 3, 1).reshape(n, s * s, -1)

        index = self.route(describe(q), describe(kv[..., :self.qk_dim]))

        def heads(t: torch.Tensor) -> torch.Tensor:  # [N, H, W, m*c] -> [N, m, H*W, c]
            return t.reshape(n, s * h * s * w, m, t.shape[-1] // m).transpose(1, 2)

        out = region_masked_attention(heads(q), heads(kv[..., :self.qk_dim]), heads(kv[..., self.qk_dim:]), index,
                                      (s, s), (h, w), self.scale)  # [N, m, H*W, c]
        return out.transpose(1, 2).reshape(n, s * h, s * w, self.dim), index

    def _routed(self, q: torch.Tensor, kv: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over the gathered routed regions (training, and inference when few regions are routed)."""
        n, s, m = q.shape[0], self.n_win, self.num_heads

        def regions(t: torch.Tensor) -> torch.Tensor:  # [N, S*h, S*w, m*c] -> [N, S^2, m, h*w, c], one copy
            t = t.reshape(n, s, h, s, w, m, t.shape[-1] // m).permute(0, 1, 3, 5, 2, 4, 6)
            return t.reshape(n, s * s, m, h * w, t.shape[-1])

        q_r, k_r, v_r = regions(q), regions(kv[..., :self.qk_dim]), regions(kv[..., self.qk_dim:])
        # region descriptors: mean query / key over each region's pixels, [N, S^2, qk_dim] (heads-major channels)
        index = self.route(q_r.mean(3).reshape(n, s * s, -1), k_r.mean(3).reshape(n, s * s, -1))
        out = region_routed_attention(q_r, k_r, v_r, index, self.scale)  # [N, S^2, m, h*w, c]
        return out.view(n, s, s, m, h, w, -1).permute(0, 1, 4, 2, 5, 3, 6).reshape(n, s * h, s * w, self.dim), index


class AttentionLePE(nn.Module):
    """Global multi-head attention (no qkv bias) plus a depthwise-conv LePE of the input; ``[N, H, W, C]``."""

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        q, k, v = self.qkv(x).reshape(n, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, h, w, c)
        if self.lepe is not None:
            out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)


class BiFormerBlock(nn.Module):
    """Conv position embedding, then pre-norm attention and MLP residuals; NCHW in and out."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = -1, topk: int = 4,
                 num_heads: int = 8, n_win: int = 7, qk_dim: int | None = None, qk_scale: float | None = None,
                 mlp_ratio: float = 4.0, side_dwconv: int = 5, before_attn_dwconv: int = 3) -> None:
        super().__init__()
        # the official conv uses padding 1 whatever its kernel (3 in every released model)
        self.pos_embed = nn.Conv2d(dim, dim, before_attn_dwconv, padding=1, groups=dim) if before_attn_dwconv else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(dim, num_heads, n_win, qk_dim, qk_scale, topk, side_dwconv)
        elif topk == -2:
            self.attn = AttentionLePE(dim, side_dwconv=side_dwconv)  # the official default of 8 heads
        else:
            raise ValueError(f"topk must be > 0 (routing) or -2 (global attention with LePE), got {topk}")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Identity(), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if layer_scale_init_value > 0:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        attn = self.attn(self.norm1(x))
        x = x + self.drop_path(attn if self.gamma1 is None else self.gamma1 * attn)
        mlp = self.mlp(self.norm2(x))
        x = x + self.drop_path(mlp if self.gamma2 is None else self.gamma2 * mlp)
        return x.permute(0, 3, 1, 2)


class BiFormer(nn.Module):
    """BiFormer backbone and classifier (the official ``BiFormer`` and ``BiFormer_mm``).

    Args:
        depth: blocks per stage; embed_dim: channels per stage; qk_dims: query/key channels per stage
            (default ``embed_dim``); head_dim: per-head channels of the routing attention (heads = qk_dim // head_dim).
        in_chans, num_classes: input channels; classifier outputs (0: no final BatchNorm and head).
        n_win: regions per side in every routing layer (7 for classification, 8 or 16 in the dense configs).
        topks: routed regions per stage; -2 = global attention with LePE (the released last stage).
        mlp_ratios: MLP widths; side_dwconv: LePE kernel; before_attn_dwconv: conv position embedding kernel.
        qk_scale: logit scale (default ``qk_dim ** -0.5``); layer_scale_init_value: > 0 adds gamma1/gamma2.
        drop_path_rate: stochastic depth of the last block.
        out_indices, pyramid_norm: stages of :meth:`forward_pyramid`; its LayerNorm2d ``extra_norms.{i}``.

    Example::

        >>> m = test_biformer(num_classes=0)
        >>> [tuple(f.shape[1:]) for f in m.forward_pyramid(torch.randn(1, 3, 97, 75))]
        [(16, 25, 19), (32, 13, 10), (64, 7, 5), (128, 4, 3)]
    """

    family = "biformer"
    min_input_size = 32
    output_fmt = "NCHW"
    head_key_prefixes = ("head.", "norm.")

    def __init__(self, depth: Sequence[int] = (2, 2, 8, 2), in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: Sequence[int] = (64, 128, 256, 512), head_dim: int = 32,
                 qk_dims: Sequence[int | None] = (None, None, None, None), qk_scale: float | None = None,
                 drop_path_rate: float = 0.0, n_win: int = 7, topks: Sequence[int] = (1, 4, 16, -2),
                 side_dwconv: int = 5, layer_scale_init_value: float = -1, mlp_ratios: Sequence[float] = (3, 3, 3, 3),
                 before_attn_dwconv: int = 3, out_indices: Sequence[int] = (0, 1, 2, 3),
                 pyramid_norm: bool = True) -> None:
        super().__init__()
        depth, embed_dim, out_indices = list(depth), list(embed_dim), tuple(out_indices)
        qk_dims = [q or d for q, d in zip(qk_dims, embed_dim)]
        if not len(depth) == len(embed_dim) == len(qk_dims) == len(topks) == len(mlp_ratios) == 4:
            raise ValueError("depth, embed_dim, qk_dims, topks and mlp_ratios need 4 values (one per stage)")
        if num_classes < 0 or in_chans < 1:
            raise ValueError(f"in_chans must be >= 1 and num_classes >= 0, got {in_chans=}, {num_classes=}")
        if not out_indices or sorted(set(out_indices)) != list(out_indices) or not all(0 <= i < 4 for i in out_indices):
            raise ValueError(f"out_indices must be increasing stage indices in 0..3, got {out_indices}")
        rates = drop_path_rates(depth, drop_path_rate)
        self.in_chans, self.num_classes, self.embed_dim, self.out_indices = in_chans, num_classes, embed_dim, out_indices
        self.num_features = embed_dim[-1]
        self.n_win = n_win

        stem = nn.Sequential(nn.Conv2d(in_chans, embed_dim[0] // 2, 3, 2, 1), nn.BatchNorm2d(embed_dim[0] // 2),
                             nn.GELU(), nn.Conv2d(embed_dim[0] // 2, embed_dim[0], 3, 2, 1), nn.BatchNorm2d(embed_dim[0]))
        self.downsample_layers = nn.ModuleList([stem] + [
            nn.Sequential(nn.Conv2d(embed_dim[i], embed_dim[i + 1], 3, 2, 1), nn.BatchNorm2d(embed_dim[i + 1]))
            for i in range(3)])
        self.stages = nn.ModuleList(
            nn.Sequential(*(BiFormerBlock(embed_dim[i], rates[i][j], layer_scale_init_value, topks[i],
                                          qk_dims[i] // head_dim, n_win, qk_dims[i], qk_scale, mlp_ratios[i],
                                          side_dwconv, before_attn_dwconv) for j in range(depth[i])))
            for i in range(4))
        self.extra_norms = nn.ModuleDict({str(i): LayerNorm2d(embed_dim[i], eps=1e-6) for i in out_indices}) \
            if pyramid_norm else None
        self.norm = nn.BatchNorm2d(embed_dim[-1]) if num_classes else None
        self.head = nn.Linear(embed_dim[-1], num_classes) if num_classes else None
        self.feature_info = [{"num_chs": embed_dim[i], "reduction": 2 ** (i + 2), "module": f"stages.{i}"}
                             for i in out_indices]
        self.grad_checkpointing = False
        self.apply(self._init_weights)

    @property
    def new_key_prefixes(self) -> tuple[str, ...]:
        """The dense LayerNorms, absent from classification checkpoints."""
        return ("extra_norms.",) if self.extra_norms is not None else ()

    _init_weights = staticmethod(init_linear_layernorm)  # the official init; convs keep PyTorch's default

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^downsample_layers\.0", "blocks": r"^(stages|downsample_layers)\.(\d+)" if coarse else [
            (r"^downsample_layers\.(\d+)", (0,)), (r"^stages\.(\d+)\.(\d+)", None)]}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module | None:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new linear classifier (the final BatchNorm kept or created) or none at all (``0``)."""
        reset_norm_linear_head(self, num_classes, nn.BatchNorm2d)

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage output, NCHW ``[B, C_i, ceil(H / 2**(i+2)), ...]`` (no extra norm)."""
        check_image_input(self, x)
        outs = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = down(x).contiguous(memory_format=torch.channels_last)  # blocks work channels-last: NHWC views are free
            for block in stage:
                x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and torch.is_grad_enabled() \
                    else block(x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage output ``[B, C, ceil(H/32), ceil(W/32)]`` (before the final BatchNorm)."""
        return self.forward_intermediates(x)[-1]

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """NCHW maps at strides 4/8/16/32 for ``out_indices``, each through ``extra_norms.{i}`` (the official
        dense backbone's outputs)."""
        feats = self.forward_intermediates(x)
        return [feats[i] if self.extra_norms is None else self.extra_norms[str(i)](feats[i]) for i in self.out_indices]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``[B, C, h, w]`` -> logits: BatchNorm, mean over positions, linear."""
        if self.head is None:
            raise RuntimeError("this BiFormer has no classifier (num_classes=0); use forward_pyramid")
        x = self.norm(x).flatten(2).mean(-1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> logits ``[B, num_classes]``, as the official model's ``forward``."""
        return self.forward_head(self.forward_features(x))


# -- variants ----------------------------------------------------------------------------------------------------
# Parameter counts and ImageNet-1k top-1 at 224 from the official README (reference/backbones_a.md §2.1).

def _create(variant: dict[str, Any], kwargs: dict[str, Any]) -> BiFormer:
    return BiFormer(**{**variant, **kwargs})


@BACKBONES.register(cls=BiFormer)
def biformer_tiny(**kwargs: Any) -> BiFormer:
    """BiFormer-T: 13.1M parameters, 81.4% top-1."""
    return _create(dict(depth=(2, 2, 8, 2), embed_dim=(64, 128, 256, 512), qk_dims=(64, 128, 256, 512)), kwargs)


@BACKBONES.register(cls=BiFormer)
def biformer_small(**kwargs: Any) -> BiFormer:
    """BiFormer-S: 25.5M parameters, 83.8% top-1 (trained with drop_path_rate 0.15)."""
    return _create(dict(depth=(4, 4, 18, 4), embed_dim=(64, 128, 256, 512), qk_dims=(64, 128, 256, 512)), kwargs)


@BACKBONES.register(cls=BiFormer)
def biformer_base(**kwargs: Any) -> BiFormer:
    """BiFormer-B: 56.8M parameters, 84.3% top-1."""
    return _create(dict(depth=(4, 4, 18, 4), embed_dim=(96, 192, 384, 768), qk_dims=(96, 192, 384, 768)), kwargs)


@BACKBONES.register(cls=BiFormer)
def test_biformer(**kwargs: Any) -> BiFormer:
    """A tiny BiFormer for CI (no published weights)."""
    return _create(dict(depth=(1, 1, 2, 1), embed_dim=(16, 32, 64, 128), qk_dims=(16, 32, 64, 128), head_dim=16),
                   kwargs)


# -- pretrained configurations (rayleizhu/BiFormer) --------------------------------------------------------------------
# Licence: MIT, as the official README states (its LICENSE file is not in our sources). Evaluation as DeiT's:
# resize 256, centre crop 224, bicubic.
_cfg = pretrained_cfg_factory(paper="2303.08810", origin="https://github.com/rayleizhu/BiFormer", license="mit",
                              first_conv="downsample_layers.0.0", classifier="head")

default_cfgs: dict[str, dict[str, Any]] = {
    name: _cfg(checkpoints=(f"{name}_in1k.pth",)) for name in ("biformer_tiny", "biformer_small", "biformer_base")
}
