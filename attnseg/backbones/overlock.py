"""OverLoCK: an Overview-first, Look-Closely-next ConvNet with context-mixing dynamic kernels (ContMix).

Paper: Meng Lou and Yizhou Yu, "OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic
Kernels", CVPR 2025, arXiv 2502.20087. Official code: LMMMEng/OverLoCK @ 2c8ab3b (``models/overlock.py`` for
classification, ``segmentation/models/overlock.py`` and ``detection/models/overlock.py`` for the mm backbones).
This is a re-implementation written from the paper and that code; the state_dict layout is the official one, so
released checkpoints (plain, ``*_reparam`` and mm-style dense files) load without renaming.

The network reads like the paper's figure:

- **Base-Net**: a stem (stride 4) and three stages of :class:`RepConvBlock` (strides 4, 8, 16).
- **Overview-Net**: one more downsampling and :class:`RepConvBlock` stage (stride 32) whose output ``ctx`` is
  the coarse "overview" of the image (and the input of the auxiliary classifier).
- **Focus-Net**: :class:`DynamicConvBlock` (ContMix) stages at strides 16 and 32, guided top-down by ``ctx``
  (projected to ``C4 / 4`` channels, upsampled to stride 16). Each ContMix block builds, for every pixel, a
  small (5x5) and a large (KxK) depthwise kernel from its affinity to 7x7 pooled context tokens, and applies
  them with neighborhood aggregation (:func:`aggregate`: :func:`attnseg.ops.na2d_av` semantics, windows clamped
  inside the map, NATTEN's relative-position-bias rule; small maps take a dense scatter + matmul path).

Faithfulness: with official weights, logits and every named intermediate equal the official model's
(``tests/backbones/test_overlock.py`` checks the four parity fixtures: classification, its reparameterized form,
the segmentation and the detection backbones). Deviations, all additive:

- ``forward`` always returns logits; the official model returns ``dict(main, aux)`` in train mode.
  :meth:`OverLoCK.forward_aux` gives both (the auxiliary head, loss weight 0.4 in the paper's recipe).
- One class serves classification and dense prediction: :meth:`OverLoCK.forward_pyramid` is the official
  mm backbone's forward. With ``pyramid_norm="seg"`` (default) it is the segmentation backbone (``extra_norm.0-3``),
  with ``"det"`` the detection backbone (also ``extra_norm.4`` and ``h_proj``, added to P5). As in the official
  dense code the *normed* stride-8 map feeds the stride-16 stage there, so the pyramid path differs from the
  classification path; ``pyramid_norm=None`` returns the un-normed maps of the classification path.
- ``num_classes=0`` removes both heads (dense use); ``forward`` then raises.
- :meth:`OverLoCK.set_grad_checkpointing` takes the stages to checkpoint (stages 2 and 3 include their Focus blocks);
  the official ``use_checkpoint`` counts blocks per stage.
- Inputs are checked (:class:`~attnseg.errors.InputSizeError`). Any size from 32 pixels up runs: every
  stride-2 conv gives ``ceil(H / 2)``; a ContMix stage whose map is smaller than its kernel bilinearly
  upsamples the map so that its short side equals the kernel, aggregates, and average-pools back, as the
  official code does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from attnseg.backbones._common import check_image_input, pretrained_cfg_factory
from attnseg.layers import DropPath, LayerNorm2d, drop_path_rates
from attnseg.ops import na2d_av
from attnseg.ops.windows import rpb_table, window_table
from attnseg.registry import BACKBONES

__all__ = ["OverLoCK", "RepConvBlock", "DynamicConvBlock", "DilatedReparamBlock", "overlock_xt", "overlock_t",
           "overlock_s", "overlock_b", "overlock_xt_reparam", "overlock_t_reparam", "overlock_s_reparam",
           "overlock_b_reparam"]

_EPS = 1e-6  # every LayerNorm2d of the official model


def _norm(dim: int) -> LayerNorm2d:
    return LayerNorm2d(dim, eps=_EPS)


# -- small blocks ---------------------------------------------------------------------------------------------


def _stem(in_chans: int, dim: int) -> nn.Sequential:
    """Four 3x3 convs (strides 2, 1, 2, 1) with BN, GELU between: ``[B, in, H, W] -> [B, dim, H/4, W/4]``."""
    half = dim // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, half, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, half, 3, padding=1, bias=False), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, dim, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(dim), nn.GELU(),
        nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim),
    )


def _downsample(in_dim: int, out_dim: int) -> nn.Sequential:
    """Stride-2 3x3 conv (no bias) + BN: ``[B, in, H, W] -> [B, out, ceil(H/2), ceil(W/2)]``."""
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_dim))


class ResDWConv(nn.Conv2d):
    """``x + depthwise_conv(x)`` (3x3, with bias); the parameters are the conv's own."""

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class LayerScale(nn.Module):
    """Per-channel scale **and bias**: ``x * weight + bias`` (weight ``[C, 1, 1, 1]`` as the official 1x1 dwconv)."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim, 1, 1, 1), float(init_value)))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class GRN(nn.Module):
    """Global response normalisation (ConvNeXt V2): ``(gamma * N(x) + 1) * x + beta``, ``N`` = spatial L2 norm
    over its channel mean. ``[B, C, H, W]`` in and out; ``gamma``/``beta`` are ``[1, C, 1, 1]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(-1, -2), keepdim=True)  # [B, C, 1, 1]
        nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
        return (self.gamma * nx + 1) * x + self.beta


class SEModule(nn.Module):
    """Squeeze-excitation: ``x * sigmoid(conv(GELU(conv(GAP(x)))))``, hidden ``max(16, C // 8)``."""

    def __init__(self, dim: int, reduction: int = 8) -> None:
        super().__init__()
        inner = max(16, dim // reduction)
        self.proj = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, inner, 1), nn.GELU(),
                                  nn.Conv2d(inner, dim, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.proj(x)


# -- the dilated re-parameterisable large-kernel conv (UniRepLKNet) ------------------------------------------

# kernel size -> (branch kernel sizes, branch dilations) of the parallel dilated depthwise convs
_DILATED_BRANCHES: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    19: ((5, 7, 9, 9, 3, 3, 3), (1, 1, 1, 2, 4, 5, 7)),
    17: ((5, 7, 9, 3, 3, 3), (1, 1, 2, 4, 5, 7)),
    15: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 5, 7)),
    13: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 4, 5)),
    11: ((5, 7, 5, 3, 3, 3), (1, 1, 2, 3, 4, 5)),
    9: ((5, 7, 5, 3, 3), (1, 1, 2, 3, 4)),
    7: ((5, 3, 3, 3), (1, 1, 2, 3)),
    5: ((3, 3), (1, 2)),
}


def _fuse_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: dict[str, torch.Tensor], eps: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm (``bn``: weight, bias, running_mean, running_var) into the conv before it."""
    std = (bn["running_var"] + eps).sqrt()
    scale = bn["weight"] / std
    conv_bias = 0 if bias is None else bias
    return weight * scale.reshape(-1, 1, 1, 1), bn["bias"] + (conv_bias - bn["running_mean"]) * scale


def _undilate(kernel: torch.Tensor, dilation: int, size: int) -> torch.Tensor:
    """A depthwise ``[C, 1, k, k]`` kernel with ``dilation`` as the equivalent dense kernel, centred in ``size``."""
    c, _, k, _ = kernel.shape
    span = dilation * (k - 1) + 1
    dense = kernel.new_zeros(c, 1, span, span)
    dense[:, :, ::dilation, ::dilation] = kernel
    pad = size // 2 - span // 2
    return F.pad(dense, [pad] * 4)


def merge_dilated_reparam(state: dict[str, torch.Tensor], kernel_size: int, eps: float = 1e-5
                          ) -> dict[str, torch.Tensor]:
    """One DilatedReparamBlock's train-form tensors (keys relative to the block) -> ``lk_origin.{weight,bias}``.

    ``out = BN(conv_K(x)) + sum_b BN_b(dilated_conv_b(x))`` is a single depthwise KxK conv with bias (eval mode).
    """
    weight, bias = _fuse_bn(state["lk_origin.weight"], None, _sub(state, "origin_bn."), eps)
    for k, r in zip(*_DILATED_BRANCHES[kernel_size]):
        w, b = _fuse_bn(state[f"dil_conv_k{k}_{r}.weight"], None, _sub(state, f"dil_bn_k{k}_{r}."), eps)
        weight = weight + _undilate(w, r, kernel_size)
        bias = bias + b
    return {"lk_origin.weight": weight, "lk_origin.bias": bias}


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class DilatedReparamBlock(nn.Module):
    """Depthwise KxK conv + BN plus parallel dilated depthwise convs + BN, summed (UniRepLKNet).

    ``deploy=True`` builds the merged form directly: one KxK depthwise conv with bias (``lk_origin``), which
    :meth:`reparam` turns the train form into (identical outputs in eval mode). ``[B, C, H, W]`` in and out.
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False) -> None:
        super().__init__()
        if kernel_size not in _DILATED_BRANCHES:
            raise ValueError(f"DilatedReparamBlock kernel_size must be one of {sorted(_DILATED_BRANCHES)}, "
                             f"got {kernel_size}")
        self.kernel_size = kernel_size
        self.branches = list(zip(*_DILATED_BRANCHES[kernel_size]))
        self.lk_origin = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels,
                                   bias=deploy)
        self.deploy = deploy
        if not deploy:
            self.origin_bn = nn.BatchNorm2d(channels)
            for k, r in self.branches:
                self.add_module(f"dil_conv_k{k}_{r}", nn.Conv2d(channels, channels, k, padding=(r * (k - 1) + 1) // 2,
                                                                dilation=r, groups=channels, bias=False))
                self.add_module(f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for k, r in self.branches:
            out = out + getattr(self, f"dil_bn_k{k}_{r}")(getattr(self, f"dil_conv_k{k}_{r}")(x))
        return out

    @torch.no_grad()
    def reparam(self) -> None:
        """Merge BN and the dilated branches into ``lk_origin`` (with bias); a no-op in deploy form."""
        if self.deploy:
            return
        merged = merge_dilated_reparam(dict(self.state_dict()), self.kernel_size, eps=self.origin_bn.eps)
        ref = self.lk_origin.weight
        conv = nn.Conv2d(ref.shape[0], ref.shape[0], self.kernel_size, padding=self.kernel_size // 2,
                         groups=ref.shape[0], bias=True, device=ref.device, dtype=ref.dtype)
        conv.weight.copy_(merged["lk_origin.weight"])
        conv.bias.copy_(merged["lk_origin.bias"])
        self.lk_origin = conv
        del self.origin_bn
        for k, r in self.branches:
            delattr(self, f"dil_conv_k{k}_{r}")
            delattr(self, f"dil_bn_k{k}_{r}")
        self.deploy = True


# -- Base-Net / Overview-Net block ------------------------------------------------------------------------------


class RepConvBlock(nn.Module):
    """``x = ResDW3x3(x)``; then ``LS(x) + proj(x)`` (``res_scale``: the layer scale sits on the identity path)
    or ``x + drop_path(LS(proj(x)))``, with ``proj`` = LN -> DilatedReparam(K) -> BN -> SE -> 1x1 (4C) -> GELU ->
    ResDW3x3 -> GRN -> 1x1 (C) [-> DropPath]. ``[B, C, H, W]`` in and out.
    """

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: float = 4, ls_init_value: float | None = None,
                 res_scale: bool = False, drop_path: float = 0.0, deploy: bool = False) -> None:
        super().__init__()
        self.res_scale = res_scale
        hidden = int(dim * mlp_ratio)
        self.dwconv = ResDWConv(dim, 3)
        self.proj = nn.Sequential(
            _norm(dim), DilatedReparamBlock(dim, kernel_size, deploy), nn.BatchNorm2d(dim), SEModule(dim),
            nn.Conv2d(dim, hidden, 1), nn.GELU(), ResDWConv(hidden, 3), GRN(hidden), nn.Conv2d(hidden, dim, 1),
            DropPath(drop_path) if drop_path > 0 else nn.Identity(),
        )
        self.ls = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dwconv(x)
        if self.res_scale:
            return self.ls(x) + self.proj(x)
        return x + self.proj[-1](self.ls(self.proj[:-1](x)))


# -- Focus-Net block: ContMix -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _rpb_index(height: int, width: int, kernel: int) -> torch.Tensor:
    """``[H*W, K*K]`` flat index into a ``[2K-1, 2K-1]`` bias table for NATTEN's clamped windows (CPU, cached)."""
    return rpb_table((height, width), (kernel, kernel), (1, 1), (1, 1), (False, False))


@functools.lru_cache(maxsize=64)
def _window_keys(height: int, width: int, kernel: int) -> torch.Tensor:
    """``[H*W, K*K]`` flat key index of each query's clamped window (NATTEN rule, CPU, cached)."""
    return window_table((height, width), (kernel, kernel), (1, 1), (1, 1), (False, False))[0]


# Dense aggregation while H*W <= max(6 * K*K, 256): measured on one CPU thread, 19x faster than the gathered
# windows at 14x14 with K=13, 2.5x at 14x14 with K=5, slower from about 40x40 (K=13) or 20x20 (K=5) on.
_DENSE_MAX_TOKENS_PER_SLOT, _DENSE_MIN_TOKENS = 6, 256
_DENSE_CHUNK_ELEMENTS = 2**23  # weights of one dense chunk: [chunk, N, N] (32 MiB in fp32)


def aggregate(attn: torch.Tensor, value: torch.Tensor, kernel: int) -> torch.Tensor:
    """Neighborhood aggregation with clamped windows: :func:`attnseg.ops.na2d_av` semantics, faster on small maps.

    ``attn [B, G, H, W, K*K]``, ``value [B, G, H, W, D]`` -> ``[B, G, H, W, D]``. On maps of at most
    ``max(6 * K*K, 256)`` pixels (every Focus-stage map of the released models at 224) the window weights are scattered into
    a dense ``[N, N]`` matrix and applied with one matmul per (batch, group) chunk; larger maps use
    :func:`~attnseg.ops.na2d_av` (gathered windows, bounded memory). Both are differentiable and agree to fp rounding.
    """
    b, g, h, w, kk = attn.shape
    n = h * w
    if n > max(_DENSE_MAX_TOKENS_PER_SLOT * kk, _DENSE_MIN_TOKENS):
        return na2d_av(attn, value, kernel)
    keys = _window_keys(h, w, kernel).to(attn.device)
    attn = attn.reshape(b * g, n, kk)
    value = value.reshape(b * g, n, -1)
    step = max(1, _DENSE_CHUNK_ELEMENTS // (n * n))
    outs = []
    for i in range(0, b * g, step):
        a = attn[i:i + step]
        dense = a.new_zeros(a.shape[0], n, n).scatter(-1, keys.expand(a.shape[0], n, kk), a)  # [chunk, N, N]
        outs.append(dense @ value[i:i + step])  # [chunk, N, D]
    return torch.cat(outs).view(b, g, h, w, -1)


def _attention_size(height: int, width: int, kernel: int) -> tuple[int, int]:
    """Map size ContMix aggregates on: unchanged, or (when a side is below ``kernel``) short side = ``kernel``,
    long side scaled and truncated exactly as the official float expression."""
    if min(height, width) >= kernel:
        return height, width
    if height < width:
        return kernel, int(kernel / height * width)
    return int(kernel / width * height), kernel


class DynamicConvBlock(nn.Module):
    """A Focus-Net block: context-mixing dynamic convolution (ContMix) + ConvFFN, guided by a context map.

    Args:
        dim: channels ``C`` of the features.
        ctx_dim: channels of the Overview-Net output ``C4``; the context carried here has ``C4 // 4``.
        kernel_size: large dynamic kernel ``K`` (and the LEPE DilatedReparam kernel); the small one is ``smk_size``.
        num_heads: the kernels are shared within ``2 * num_heads`` groups (half small, half large).
        is_first: the first block takes the context as is; later ones mix it with the top-down context
            (``x_scale(h_x) + h_scale(h_r)``).
        is_last: return the whole ``C + C4 // 4`` map instead of splitting it.

    ``forward(x [B, C, H, W], h_x [B, Ch, H, W], h_r [B, Ch, H, W]) -> (x, h_x)`` (or ``(x_full, None)`` if last).
    """

    def __init__(self, dim: int, ctx_dim: int, kernel_size: int = 7, smk_size: int = 5, num_heads: int = 2,
                 mlp_ratio: float = 4, ls_init_value: float | None = None, res_scale: bool = False,
                 drop_path: float = 0.0, is_first: bool = False, is_last: bool = False, deploy: bool = False) -> None:
        super().__init__()
        ctx_dim = ctx_dim // 4
        out_dim = dim + ctx_dim
        hidden = int(dim * mlp_ratio)
        self.dim, self.ctx_dim = dim, ctx_dim
        self.kernel_size, self.smk_size = kernel_size, smk_size
        self.groups = num_heads * 2
        if dim % (2 * self.groups) or (dim // 2) % self.groups:
            raise ValueError(f"ContMix needs dim divisible by 4 * num_heads, got {dim=}, {num_heads=}")
        self.scale = (dim // self.groups) ** -0.5  # the official scale: C/G, not the per-group query width
        self.res_scale, self.is_first, self.is_last = res_scale, is_first, is_last

        if not is_first:
            self.x_scale = LayerScale(ctx_dim, 1)
            self.h_scale = LayerScale(ctx_dim, 1)
        self.dwconv1 = ResDWConv(out_dim, 3)
        self.norm1 = _norm(out_dim)
        self.fusion = nn.Sequential(nn.Conv2d(out_dim, out_dim, 3, padding=1, groups=out_dim), nn.BatchNorm2d(out_dim),
                                    nn.GELU(), nn.Conv2d(out_dim, dim, 1), GRN(dim))
        self.weight_query = nn.Sequential(nn.Conv2d(dim, dim // 2, 1, bias=False), nn.BatchNorm2d(dim // 2))
        self.weight_key = nn.Sequential(nn.AdaptiveAvgPool2d(7), nn.Conv2d(ctx_dim, dim // 2, 1, bias=False),
                                        nn.BatchNorm2d(dim // 2))
        self.weight_proj = nn.Conv2d(49, kernel_size ** 2 + smk_size ** 2, 1)  # 49 pooled tokens -> kernel slots
        self.dyconv_proj = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim))
        self.lepe = nn.Sequential(DilatedReparamBlock(dim, kernel_size, deploy), nn.BatchNorm2d(dim))
        self.se_layer = SEModule(dim)
        self.gate = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.SiLU())
        self.proj = nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, out_dim, 1))
        self.dwconv2 = ResDWConv(out_dim, 3)
        self.norm2 = _norm(out_dim)
        self.mlp = nn.Sequential(nn.Conv2d(out_dim, hidden, 1), nn.GELU(), ResDWConv(hidden, 3), GRN(hidden),
                                 nn.Conv2d(hidden, out_dim, 1))
        self.ls1 = LayerScale(out_dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ls2 = LayerScale(out_dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        # relative position biases of the small and the large kernels, per group (NATTEN <= 0.17 layout)
        self.rpb1 = nn.Parameter(torch.zeros(self.groups, 2 * smk_size - 1, 2 * smk_size - 1))
        self.rpb2 = nn.Parameter(torch.zeros(self.groups, 2 * kernel_size - 1, 2 * kernel_size - 1))

    def _kernel_weights(self, logits: torch.Tensor, rpb: torch.Tensor, kernel: int) -> torch.Tensor:
        """``logits [B, G, h, w, k*k]`` + the relative position bias of each clamped window slot, softmaxed."""
        b, g, h, w, _ = logits.shape
        index = _rpb_index(h, w, kernel).to(rpb.device)
        bias = rpb.flatten(1)[:, index].view(1, g, h, w, kernel * kernel)  # [G, h*w, k*k] -> [1, G, h, w, k*k]
        return torch.softmax(logits + bias, dim=-1)

    def contmix(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """The dynamic convolution: kernels from ``f`` (``[B, C + Ch, H, W]``, normed), applied to ``x`` (``[B, C, H, W]``)."""
        size = x.shape[-2:]
        h, w = _attention_size(*size, self.kernel_size)
        if (h, w) != tuple(size):  # too small for the large kernel: aggregate on an upsampled map
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
            f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
        b, g = x.shape[0], self.groups
        query = self.weight_query(f[:, :self.dim]) * self.scale  # [B, C/2, h, w]
        key = self.weight_key(f[:, self.dim:])  # [B, C/2, 7, 7]
        query = query.view(b, g, -1, h * w)  # [B, G, C/(2G), N]
        key = key.view(b, g, -1, 49)  # [B, G, C/(2G), 49]
        affinity = query.transpose(-1, -2) @ key  # [B, G, N, 49]
        proj = self.weight_proj
        logits = F.linear(affinity, proj.weight.flatten(1), proj.bias)  # [B, G, N, s*s + K*K]
        logits = logits.view(b, g, h, w, -1)
        small, large = logits.split([self.smk_size ** 2, self.kernel_size ** 2], dim=-1)
        small = self._kernel_weights(small, self.rpb1, self.smk_size)
        large = self._kernel_weights(large, self.rpb2, self.kernel_size)
        value = x.view(b, 2, g, -1, h, w).permute(1, 0, 2, 4, 5, 3)  # [2, B, G, h, w, C/(2G)]: [small, large]
        out = torch.cat([aggregate(small, value[0], self.smk_size),
                         aggregate(large, value[1], self.kernel_size)], dim=1)  # [B, 2G, h, w, C/(2G)]
        out = out.permute(0, 1, 4, 2, 3).reshape(b, -1, h, w)  # -> [B, C, h, w], group-major channels
        if (h, w) != tuple(size):
            out = F.adaptive_avg_pool2d(out, size)
        return out

    def forward(self, x: torch.Tensor, h_x: torch.Tensor, h_r: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.is_first:
            h_x = self.x_scale(h_x) + self.h_scale(h_r)
        f = self.dwconv1(torch.cat([x, h_x], dim=1))  # [B, C + Ch, H, W]
        identity = f
        f = self.norm1(f)
        x = self.fusion(f)  # [B, C, H, W]
        gate = self.gate(x)
        lepe = self.lepe(x)
        x = self.dyconv_proj(self.contmix(x, f)) + lepe
        x = self.proj(gate * self.se_layer(x))  # -> [B, C + Ch, H, W]
        if self.res_scale:
            x = self.ls1(identity) + self.drop_path(x)
        else:
            x = identity + self.drop_path(self.ls1(x))
        x = self.dwconv2(x)
        if self.res_scale:
            x = self.ls2(x) + self.drop_path(self.mlp(self.norm2(x)))
        else:
            x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        if self.is_last:
            return x, None
        x, h_x = x.split([self.dim, self.ctx_dim], dim=1)
        return x, h_x


class CTXDownsample(nn.Module):
    """Stride-2 3x3 conv + BN on the features (``C3 -> C4``) and on the context (``C4/4 -> C4/4``)."""

    def __init__(self, dim: int, h_dim: int) -> None:
        super().__init__()
        self.x_proj = _downsample(dim, h_dim)
        self.h_proj = _downsample(h_dim // 4, h_dim // 4)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_proj(x), self.h_proj(ctx)


# -- the network ---------------------------------------------------------------------------------------------------


class OverLoCK(nn.Module):
    """OverLoCK classifier and dense backbone (official argument names).

    Args:
        depth: RepConvBlocks of the four Base/Overview stages.
        sub_depth: ContMix blocks of the two Focus stages (strides 16 and 32).
        in_chans: input channels.
        embed_dim: channels ``C1..C4``; the context carries ``C4 // 4``.
        kernel_size: large kernels of stages 1-4 (each in 5..19, odd); Focus stages use the 3rd and 4th.
        mlp_ratio, sub_mlp_ratio: hidden widths of the RepConv and ContMix FFNs.
        sub_num_heads: ContMix uses ``2 * sub_num_heads[i]`` kernel groups in Focus stage ``i``.
        ls_init_value: LayerScale init per stage (None: no LayerScale).
        res_scale: put LayerScale on the identity path (the released models).
        smk_size: small dynamic kernel.
        deploy: build the DilatedReparam convs merged (the ``*_reparam`` checkpoints); see :meth:`reparam`.
        use_ds: keep the auxiliary classifier on the Overview-Net output.
        drop_path_rate: stochastic depth, rising linearly over blocks1..4, sub_blocks3, sub_blocks4.
        projection: width of the main head's 1x1 projection.
        num_classes: classes; 0 removes both heads.
        out_indices: levels (0..3, strides 4/8/16/32) returned by :meth:`forward_pyramid`.
        pyramid_norm: ``"seg"`` (the official segmentation backbone), ``"det"`` (the detection backbone: P5 adds
            ``h_proj`` of the normed context) or None (un-normed maps of the classification path).

    Example::

        >>> m = test_overlock(num_classes=0)
        >>> [tuple(f.shape[1:]) for f in m.forward_pyramid(torch.randn(1, 3, 97, 131))]
        [(16, 25, 33), (24, 13, 17), (48, 7, 9), (80, 4, 5)]
        >>> [(f["num_chs"], f["reduction"]) for f in m.feature_info]
        [(16, 4), (24, 8), (48, 16), (80, 32)]
    """

    family = "overlock"
    min_input_size = 32
    head_key_prefixes = ("head.", "aux_head.")

    def __init__(
        self,
        depth: Sequence[int] = (2, 2, 2, 2),
        sub_depth: Sequence[int] = (4, 2),
        in_chans: int = 3,
        embed_dim: Sequence[int] = (96, 192, 384, 768),
        kernel_size: Sequence[int] = (7, 7, 7, 7),
        mlp_ratio: Sequence[float] = (4, 4, 4, 4),
        sub_mlp_ratio: Sequence[float] = (4, 4),
        sub_num_heads: Sequence[int] = (4, 8),
        ls_init_value: Sequence[float | None] = (None, None, 1, 1),
        res_scale: bool = True,
        smk_size: int = 5,
        deploy: bool = False,
        use_ds: bool = True,
        drop_path_rate: float = 0.0,
        projection: int = 1024,
        num_classes: int = 1000,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        pyramid_norm: str | None = "seg",
    ) -> None:
        super().__init__()
        depth, sub_depth, embed_dim = list(depth), list(sub_depth), list(embed_dim)
        kernel_size, out_indices = list(kernel_size), tuple(out_indices)
        if len(depth) != 4 or len(embed_dim) != 4 or len(kernel_size) != 4 or len(sub_depth) != 2:
            raise ValueError(f"OverLoCK has 4 stages and 2 Focus stages: got {depth=}, {embed_dim=}, {kernel_size=}, "
                             f"{sub_depth=}")
        if min(depth) < 1 or min(sub_depth) < 1:
            raise ValueError(f"every depth must be >= 1, got {depth=}, {sub_depth=}")
        if embed_dim[-1] % 4:
            raise ValueError(f"embed_dim[-1] must be divisible by 4 (the context has C4 // 4 channels), got {embed_dim}")
        if in_chans < 1 or num_classes < 0:
            raise ValueError(f"in_chans must be >= 1 and num_classes >= 0, got {in_chans=}, {num_classes=}")
        if smk_size < 1 or smk_size % 2 == 0 or smk_size > min(kernel_size[2:]):
            raise ValueError(f"smk_size must be odd and <= the Focus kernels, got {smk_size=}, {kernel_size=}")
        if pyramid_norm not in ("seg", "det", None):
            raise ValueError(f"pyramid_norm must be 'seg', 'det' or None, got {pyramid_norm!r}")
        if not out_indices or sorted(set(out_indices)) != list(out_indices) or not all(0 <= i < 4 for i in out_indices):
            raise ValueError(f"out_indices must be increasing stage indices in 0..3, got {out_indices}")
        rates = drop_path_rates([*depth, *sub_depth], drop_path_rate)  # blocks1..4, sub_blocks3, sub_blocks4
        c1, c2, c3, c4 = embed_dim
        ch = c4 // 4

        self.in_chans, self.num_classes, self.embed_dim = in_chans, num_classes, embed_dim
        self.projection, self.use_ds = projection, use_ds
        self.out_indices, self.pyramid_norm = out_indices, pyramid_norm
        self.num_features = c4 + ch
        self.grad_checkpointing = [False] * 4

        # Base-Net (strides 4, 8, 16) and Overview-Net (stride 32)
        self.patch_embed1 = _stem(in_chans, c1)
        self.patch_embed2 = _downsample(c1, c2)
        self.patch_embed3 = _downsample(c2, c3)
        self.patch_embed4 = _downsample(c3, c4)

        def rep_stage(i: int) -> nn.ModuleList:
            return nn.ModuleList(RepConvBlock(embed_dim[i], kernel_size[i], mlp_ratio[i], ls_init_value[i], res_scale,
                                              rate, deploy) for rate in rates[i])

        self.blocks1, self.blocks2, self.blocks3, self.blocks4 = (rep_stage(i) for i in range(4))

        # Focus-Net (strides 16 and 32), guided by the projected overview context
        self.high_level_proj = nn.Conv2d(c4, ch, 1)
        self.patch_embedx = CTXDownsample(c3, c4)
        self.sub_blocks3 = nn.ModuleList(
            DynamicConvBlock(c3, c4, kernel_size[2], smk_size, sub_num_heads[0], sub_mlp_ratio[0], ls_init_value[2],
                             res_scale, rate, is_first=j == 0, deploy=deploy) for j, rate in enumerate(rates[4]))
        self.sub_blocks4 = nn.ModuleList(
            DynamicConvBlock(c4, c4, kernel_size[3], smk_size, sub_num_heads[1], sub_mlp_ratio[1], ls_init_value[3],
                             res_scale, rate, is_last=j == sub_depth[1] - 1, deploy=deploy)
            for j, rate in enumerate(rates[5]))

        # dense-prediction norms (and the detection backbone's P5 context projection)
        if pyramid_norm is not None:
            self.extra_norm = nn.ModuleList([_norm(c1), _norm(c2), _norm(c3 + ch), _norm(c4 + ch)]
                                            + ([_norm(c4)] if pyramid_norm == "det" else []))
        else:
            self.extra_norm = None
        self.h_proj = nn.Sequential(nn.Conv2d(c4, c4 + ch, 1), LayerScale(c4 + ch, 1e-5)) \
            if pyramid_norm == "det" else None

        self.head = self.aux_head = None
        self._make_heads(num_classes)
        self.feature_info = [{"num_chs": [c1, c2, c3 + ch, c4 + ch][i], "reduction": 2 ** (i + 2),
                              "module": ["blocks1", "blocks2", "sub_blocks3", "sub_blocks4"][i]} for i in out_indices]
        self.apply(self._init_weights)

    def _make_heads(self, num_classes: int) -> None:
        if num_classes == 0:
            self.head = self.aux_head = None
            return
        c4 = self.embed_dim[-1]
        self.head = nn.Sequential(nn.Conv2d(self.num_features, self.projection, 1, bias=False),
                                  nn.BatchNorm2d(self.projection), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Conv2d(self.projection, num_classes, 1))
        self.aux_head = nn.Sequential(nn.BatchNorm2d(c4), nn.AdaptiveAvgPool2d(1), nn.Conv2d(c4, num_classes, 1)) \
            if self.use_ds else None

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # The official init: trunc_normal(0.02) conv weights, zero biases, unit norms (LayerScale/GRN/rpb: their own).
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def new_key_prefixes(self) -> tuple[str, ...]:
        """Keys of the dense backbone that ImageNet checkpoints lack (initialised fresh when loading those)."""
        return tuple(p for p, on in (("extra_norm.", self.extra_norm is not None), ("h_proj.", self.h_proj is not None))
                     if on)

    # -- timm-style utilities -------------------------------------------------------------------------------

    def reparam(self) -> OverLoCK:
        """Merge every DilatedReparamBlock into one KxK conv with bias (the deploy / ``*_reparam`` form).

        Eval-mode outputs are unchanged (BN statistics are folded in); returns ``self``.
        """
        for m in self.modules():
            if isinstance(m, DilatedReparamBlock):
                m.reparam()
        return self

    def set_grad_checkpointing(self, enable: bool = True, stages: Sequence[int] = (0, 1, 2, 3)) -> None:
        """Recompute the blocks of ``stages`` in the backward pass (stage 2 and 3 include their Focus blocks)."""
        for i in stages:
            if not 0 <= i < 4:
                raise ValueError(f"stages are 0..3, got {i}")
            self.grad_checkpointing[i] = enable

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter-name rules: the stem, then the stages in network order."""
        return {"stem": r"^patch_embed1", "blocks": [
            (r"^(?:patch_embed|blocks)(\d+)" if coarse else r"^blocks(\d+)\.(\d+)", None),
            (r"^(?:high_level_proj|sub_blocks3|patch_embedx|sub_blocks4)", (5,)),
            (r"^(?:extra_norm|h_proj|head|aux_head)", (6,))]}

    def no_weight_decay(self) -> set[str]:
        """The relative position biases (as for NAT-style models)."""
        return {n for n, _ in self.named_parameters() if n.endswith(("rpb1", "rpb2"))}

    def get_classifier(self) -> nn.Module | None:
        """The last main-head layer (``head.4``), or None without a head."""
        return self.head[-1] if self.head is not None else None

    def reset_classifier(self, num_classes: int) -> None:
        """New last layers of the main and auxiliary heads (``num_classes > 0``) or no heads at all (``0``)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        ref = self.patch_embed1[0].weight
        self.num_classes = num_classes
        if num_classes == 0 or self.head is None:
            self._make_heads(num_classes)
            for module in (self.head, self.aux_head):
                if module is not None:
                    module.to(device=ref.device, dtype=ref.dtype).apply(self._init_weights)
                    module.train(self.training)
            return
        self.head[-1] = nn.Conv2d(self.projection, num_classes, 1, device=ref.device, dtype=ref.dtype)
        self._init_weights(self.head[-1])
        if self.aux_head is not None:
            self.aux_head[-1] = nn.Conv2d(self.embed_dim[-1], num_classes, 1, device=ref.device, dtype=ref.dtype)
            self._init_weights(self.aux_head[-1])

    # -- forward --------------------------------------------------------------------------------------------

    def _run(self, stage: int, block: nn.Module, *args: Any) -> Any:
        if self.grad_checkpointing[stage] and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _forward_all(self, x: torch.Tensor, dense: bool) -> dict[str, torch.Tensor]:
        """Every named map of the network; ``dense`` takes the official dense backbone's path (normed P3 onward)."""
        check_image_input(self, x)
        norms = self.extra_norm if dense else None
        out: dict[str, torch.Tensor] = {}
        # Base-Net
        x = self.patch_embed1(x)
        for blk in self.blocks1:
            x = self._run(0, blk, x)
        out["blocks1"] = x
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = self._run(1, blk, x)
        out["blocks2"] = x
        if norms is not None:
            x = norms[1](x)  # the dense backbones feed the normed stride-8 map onward
        x = self.patch_embed3(x)
        for blk in self.blocks3:
            x = self._run(2, blk, x)
        out["blocks3"] = x
        # Overview-Net
        ctx = self.patch_embed4(x)
        for blk in self.blocks4:
            ctx = self._run(3, blk, ctx)
        out["blocks4"] = ctx_cls = ctx
        # Focus-Net
        ctx_ori = self.high_level_proj(ctx)  # [B, C4/4, H/32, W/32]
        ctx_up = F.interpolate(ctx_ori, size=x.shape[2:], mode="bilinear", align_corners=False)
        ctx = ctx_up
        for blk in self.sub_blocks3:
            x, ctx = self._run(2, blk, x, ctx, ctx_up)
        out["sub_blocks3_x"], out["sub_blocks3_ctx"] = x, ctx
        x, ctx = self.patch_embedx(x, ctx)
        for blk in self.sub_blocks4:
            x, ctx = self._run(3, blk, x, ctx, ctx_ori)
        out["sub_blocks4"] = x  # [B, C4 + C4/4, H/32, W/32]
        out["ctx_cls"] = ctx_cls
        return out

    def forward_intermediates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named maps of the classification path (NCHW): ``blocks1..4``, ``sub_blocks3_x``, ``sub_blocks3_ctx``,
        ``sub_blocks4`` (what the head consumes) and ``ctx_cls`` (= ``blocks4``, the auxiliary head's input)."""
        return self._forward_all(x, dense=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C4 + C4/4, ceil(H/32), ceil(W/32)]``: the last Focus block's output (before the head)."""
        return self._forward_all(x, dense=False)["sub_blocks4"]

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """NCHW maps at strides 4/8/16/32 for ``out_indices`` (channels ``C1, C2, C3 + C4/4, C4 + C4/4``).

        With ``pyramid_norm`` this is the official dense backbone's output (``"det"``: P5 also gets
        ``h_proj(extra_norm[4](ctx))``); with None, the un-normed maps of the classification path.
        """
        f = self._forward_all(x, dense=self.extra_norm is not None)
        maps = [f["blocks1"], f["blocks2"], torch.cat([f["sub_blocks3_x"], f["sub_blocks3_ctx"]], dim=1),
                f["sub_blocks4"]]
        if self.extra_norm is not None:
            maps = [norm(m) for norm, m in zip(self.extra_norm, maps)]
            if self.h_proj is not None:
                maps[3] = maps[3] + self.h_proj(self.extra_norm[4](f["ctx_cls"]))
        return [maps[i] for i in self.out_indices]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``[B, C4 + C4/4, h, w]`` -> logits ``[B, num_classes]`` (or pooled ``[B, projection]``)."""
        if self.head is None:
            raise RuntimeError("this OverLoCK has no classifier (num_classes=0); use forward_pyramid")
        x = self.head[:-1](x)  # 1x1 -> BN -> SiLU -> GAP: [B, projection, 1, 1]
        return x.flatten(1) if pre_logits else self.head[-1](x).flatten(1)

    def forward_aux(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"main": logits, "aux": auxiliary logits}`` (the official train-mode output; needs ``use_ds``)."""
        if self.aux_head is None:
            raise RuntimeError("this OverLoCK has no auxiliary head (use_ds=False or num_classes=0)")
        f = self._forward_all(x, dense=False)
        return {"main": self.forward_head(f["sub_blocks4"]), "aux": self.aux_head(f["ctx_cls"]).flatten(1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> logits ``[B, num_classes]`` (the official eval-mode output)."""
        return self.forward_head(self.forward_features(x))


# -- variants ------------------------------------------------------------------------------------------------------
# Parameters at num_classes=1000 in deploy form without the aux head; top-1 at 224 from the official README.

_COMMON = dict(kernel_size=(17, 15, 13, 7), mlp_ratio=(4, 4, 4, 4), sub_mlp_ratio=(3, 3))


def _create(variant: dict[str, Any], kwargs: dict[str, Any]) -> OverLoCK:
    return OverLoCK(**{**_COMMON, **variant, **kwargs})


_XT = dict(depth=(2, 2, 3, 2), sub_depth=(6, 2), embed_dim=(56, 112, 256, 336), sub_num_heads=(4, 6))
_T = dict(depth=(4, 4, 6, 2), sub_depth=(12, 2), embed_dim=(64, 128, 256, 512), sub_num_heads=(4, 8))
_S = dict(depth=(6, 6, 8, 3), sub_depth=(16, 3), embed_dim=(64, 128, 320, 512), sub_num_heads=(8, 16))
_B = dict(depth=(8, 8, 10, 4), sub_depth=(20, 4), embed_dim=(80, 160, 384, 576), sub_num_heads=(6, 9))


@BACKBONES.register(cls=OverLoCK)
def overlock_xt(**kwargs: Any) -> OverLoCK:
    """OverLoCK-XT: 16.45M parameters (deploy), 82.7% ImageNet-1k top-1 (drop_path_rate 0.1)."""
    return _create(_XT, kwargs)


@BACKBONES.register(cls=OverLoCK)
def overlock_t(**kwargs: Any) -> OverLoCK:
    """OverLoCK-T: 33.47M parameters (deploy), 84.2% ImageNet-1k top-1 (drop_path_rate 0.15)."""
    return _create(_T, kwargs)


@BACKBONES.register(cls=OverLoCK)
def overlock_s(**kwargs: Any) -> OverLoCK:
    """OverLoCK-S: 56.16M parameters (deploy), 84.8% ImageNet-1k top-1 (drop_path_rate 0.4)."""
    return _create(_S, kwargs)


@BACKBONES.register(cls=OverLoCK)
def overlock_b(**kwargs: Any) -> OverLoCK:
    """OverLoCK-B: 94.94M parameters (deploy), 85.1% ImageNet-1k top-1 (drop_path_rate 0.5)."""
    return _create(_B, kwargs)


@BACKBONES.register(cls=OverLoCK)
def overlock_xt_reparam(**kwargs: Any) -> OverLoCK:
    """OverLoCK-XT in deploy form (loads ``overlock_xt_in1k_224_reparam.pth``)."""
    return _create({**_XT, "deploy": True}, kwargs)


@BACKBONES.register(cls=OverLoCK)
def overlock_t_reparam(**kwargs: Any) -> OverLoCK:
    """OverLoCK-T in deploy form (loads ``overlock_t_in1k_224_reparam.pth``)."""
    return _create({**_T, "deploy": True}, kwargs)


@BACKBONES.register(cls=OverLoCK)
def overlock_s_reparam(**kwargs: Any) -> OverLoCK:
    """OverLoCK-S in deploy form (loads ``overlock_s_in1k_224_reparam.pth``)."""
    return _create({**_S, "deploy": True}, kwargs)


@BACKBONES.register(cls=OverLoCK)
def overlock_b_reparam(**kwargs: Any) -> OverLoCK:
    """OverLoCK-B in deploy form (loads ``overlock_b_in1k_224_reparam.pth``)."""
    return _create({**_B, "deploy": True}, kwargs)


@BACKBONES.register(cls=OverLoCK)
def test_overlock(**kwargs: Any) -> OverLoCK:
    """A tiny OverLoCK for CI (the parity fixtures' configuration; no published weights)."""
    return _create(dict(depth=(1, 1, 2, 1), sub_depth=(2, 2), embed_dim=(16, 24, 32, 64), sub_num_heads=(2, 2),
                        projection=64), kwargs)


# -- pretrained configurations (LMMMEng/OverLoCK) ----------------------------------------------------------------------
# Licence unknown: the official repository has no LICENSE file in our sources and its README names none. The official
# data settings (models/overlock.py) are not in our sources either: crop_pct is timm's default.
_cfg = pretrained_cfg_factory(paper="2502.20087", origin="https://github.com/LMMMEng/OverLoCK", license="unknown",
                              first_conv="patch_embed1.0", classifier="head.4")

default_cfgs: dict[str, dict[str, Any]] = {
    **{f"overlock_{size}": _cfg(checkpoints=(f"overlock_{size}_in1k_224.pth",)) for size in ("xt", "t", "s", "b")},
    **{f"overlock_{size}_reparam": _cfg(checkpoints=(f"overlock_{size}_in1k_224_reparam.pth",))
       for size in ("xt", "t", "s", "b")},
}
