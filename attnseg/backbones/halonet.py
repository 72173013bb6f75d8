"""HaloNet: ResNet-style networks with blocked local self-attention ("halo" attention).

Paper: Ashish Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual Backbones", CVPR 2021
(arXiv 2103.12731). There is no official code or released weight: the reference implementation, and the
only trained weights, are timm's (huggingface/pytorch-image-models v1.0.31: ``timm/layers/halo_attn.py`` and
the ``byoanet.py`` configurations built by ``byobnet.py``), which are hybrids of bottleneck and halo blocks
rather than the paper's H0-H7. This file implements those networks itself, with timm's parameter names, so
timm checkpoints load unchanged and outputs equal timm's (tests compare against timm and the parity fixture).

Halo attention (per block of ``b x b`` queries): queries, and keys/values from the block's ``(b + 2h)^2``
window (the feature map zero-padded by the halo ``h`` after the projection, so border windows see zero keys,
unmasked, as in timm); logits ``q k^T * d_qk^-0.5`` plus relative-position logits from per-axis tables
``height_rel``/``width_rel [2(b+2h) - 1, d_qk]`` (row ``(win - 1) + j - i`` for query index ``i`` in the block and
key index ``j`` in the window); softmax over the window. A stride-2 layer with an even block strides the
query projection; with an odd block (haloregnetz_b) it attends at full resolution and average-pools.

Any input size: timm asserts that each attention layer's input is a multiple of its block size (inputs of
multiples of 256, or 224 for haloregnetz_b). Here a layer whose input is not a multiple zero-pads its input at
the bottom/right to the next multiple and crops the output back to ``ceil(size / stride)`` (what the strided
convs of the same network give). The padded positions are zero keys and values, exactly like the halo, so at
multiples of the block size the outputs are timm's; at other sizes they are what timm would give on the
zero-padded map, cropped; border pixels then see up to ``b - 1`` more zero keys than interior ones.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from attnseg.backbones._common import check_image_input, pretrained_cfg_factory
from attnseg.layers import DropPath, drop_path_rates
from attnseg.registry import BACKBONES, suggest

__all__ = ["HaloNet", "HaloAttn", "HaloStage", "HaloNetCfg", "MODEL_CFGS", "PAPER_ROWS", "interleave", "paper_cfg"]


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Nearest multiple of ``divisor`` (at least ``divisor``), not below ``round_limit * v`` (timm's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


_ACTS = {"relu": nn.ReLU, "silu": nn.SiLU}


def _act(name: str) -> nn.Module:
    if name not in _ACTS:
        raise ValueError(f"unknown activation '{name}'{suggest(name, _ACTS)} (known: {', '.join(_ACTS)})")
    return _ACTS[name](inplace=True)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by an activation (or none); the BatchNorm's parameter names, as timm's."""

    def __init__(self, channels: int, act: str | None) -> None:
        super().__init__(channels)
        self.act = _act(act) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class ConvNormAct(nn.Module):
    """Conv (no bias, symmetric padding ``((stride - 1) + (k - 1)) // 2``), BatchNorm, activation."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 act: str | None = "relu") -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, ((stride - 1) + (kernel_size - 1)) // 2,
                              groups=groups, bias=False)
        self.bn = BatchNormAct2d(out_chs, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: mean -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid gate (timm's ``SEModule``)."""

    def __init__(self, channels: int, rd_ratio: float = 1 / 16) -> None:
        super().__init__()
        rd = make_divisible(channels * rd_ratio, 8, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))


class EfficientChannelAttention(nn.Module):
    """ECA: a 1D conv across the pooled channels (kernel from the channel count), sigmoid gate (timm's ``EcaModule``)."""

    def __init__(self, channels: int, gamma: float = 2, beta: float = 1) -> None:
        super().__init__()
        t = int(abs(math.log(channels, 2) + beta) / gamma)
        k = max(t if t % 2 else t + 1, 3)
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.mean((2, 3))[:, None, :])  # [B, 1, C]
        return x * torch.sigmoid(y).view(x.shape[0], -1, 1, 1)


def _channel_attn(kind: str | None, channels: int, kwargs: dict[str, Any]) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "se":
        return SqueezeExcite(channels, **kwargs)
    if kind == "eca":
        return EfficientChannelAttention(channels, **kwargs)
    raise ValueError(f"unknown channel attention '{kind}'{suggest(kind, ['se', 'eca'])} (known: se, eca)")


class PosEmbedRel(nn.Module):
    """Relative-position logits of halo attention from per-axis tables ``[2 * win - 1, d_qk]``."""

    def __init__(self, block_size: int, win_size: int, dim_head: int, scale: float) -> None:
        super().__init__()
        self.block_size, self.win_size = block_size, win_size
        self.height_rel = nn.Parameter(torch.empty(2 * win_size - 1, dim_head))
        self.width_rel = nn.Parameter(torch.empty(2 * win_size - 1, dim_head))
        nn.init.trunc_normal_(self.height_rel, std=scale)
        nn.init.trunc_normal_(self.width_rel, std=scale)
        # table row of (query index i in the block, key index j in the window): (win - 1) + j - i
        rows = (win_size - 1) + torch.arange(win_size)[None, :] - torch.arange(block_size)[:, None]
        self.register_buffer("rows", rows, persistent=False)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """``q [..., b*b, d]`` (block pixels row-major) -> ``[..., b*b, win*win]`` (window pixels row-major)."""
        b, win = self.block_size, self.win_size
        q = q.unflatten(-2, (b, b))  # [..., b_h, b_w, d]
        rows = self.rows
        along_w = (q @ self.width_rel.T).gather(-1, rows.expand(*q.shape[:-1], win))  # [..., b_h, b_w, win_w]
        rows_h = rows[:, None, :].expand(b, b, win)  # indexed by the query's height position
        along_h = (q @ self.height_rel.T).gather(-1, rows_h.expand(*q.shape[:-1], win))  # [..., b_h, b_w, win_h]
        return (along_h[..., :, None] + along_w[..., None, :]).flatten(-4, -3).flatten(-2)


class HaloAttn(nn.Module):
    """Blocked local self-attention with a halo; ``[B, C, H, W] -> [B, C, ceil(H/stride), ceil(W/stride)]``.

    Args:
        dim: input and output channels; stride: 1 or 2; num_heads: heads.
        dim_head: query/key channels per head (default ``make_divisible(dim * qk_ratio, 8) // num_heads``).
        block_size, halo_size: ``b`` and ``h`` (window ``b + 2h``); qk_ratio: query/key width over ``dim``.
    """

    def __init__(self, dim: int, stride: int = 1, num_heads: int = 8, dim_head: int | None = None,
                 block_size: int = 8, halo_size: int = 3, qk_ratio: float = 1.0) -> None:
        super().__init__()
        if dim % num_heads or stride not in (1, 2):
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) and stride 1 or 2, got {stride}")
        self.num_heads, self.block_size, self.halo_size, self.stride = num_heads, block_size, halo_size, stride
        self.dim_head_qk = dim_head or make_divisible(dim * qk_ratio, 8) // num_heads
        self.dim_head_v = dim // num_heads
        self.scale = self.dim_head_qk**-0.5
        self.win_size = block_size + 2 * halo_size
        # stride 2 strides the queries when the block halves evenly, else attends at full size and pools
        self.pooled = stride > 1 and block_size % stride != 0
        self.block_stride = 1 if self.pooled or stride == 1 else stride
        self.block_size_ds = block_size // self.block_stride
        self.q = nn.Conv2d(dim, num_heads * self.dim_head_qk, 1, stride=self.block_stride, bias=False)
        self.kv = nn.Conv2d(dim, num_heads * (self.dim_head_qk + self.dim_head_v), 1, bias=False)
        self.pos_embed = PosEmbedRel(self.block_size_ds, self.win_size, self.dim_head_qk, self.scale)
        for conv in (self.q, self.kv):
            nn.init.trunc_normal_(conv.weight, std=dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        b, h, m = self.block_size, self.halo_size, self.num_heads
        x = F.pad(x, (0, -width % b, 0, -height % b))  # to whole blocks; cropped below
        nh, nw = x.shape[2] // b, x.shape[3] // b
        bd = self.block_size_ds
        q = self.q(x).reshape(batch * m, self.dim_head_qk, nh, bd, nw, bd)
        q = q.permute(0, 2, 4, 3, 5, 1).reshape(batch * m, nh * nw, bd * bd, self.dim_head_qk)
        kv = F.pad(self.kv(x), (h, h, h, h))
        win = self.win_size
        kv = kv.unfold(2, win, b).unfold(3, win, b)  # [B, m*(dqk+dv), nh, nw, win, win]
        kv = kv.reshape(batch * m, self.dim_head_qk + self.dim_head_v, nh * nw, win * win).permute(0, 2, 3, 1)
        k, v = kv.split([self.dim_head_qk, self.dim_head_v], dim=-1)
        attn = (q @ k.transpose(-1, -2)) * self.scale + self.pos_embed(q)  # [B*m, blocks, bd^2, win^2]
        out = attn.softmax(-1) @ v  # [B*m, blocks, bd^2, dv]
        out = out.view(batch, m, nh, nw, bd, bd, self.dim_head_v).permute(0, 1, 6, 2, 4, 3, 5)
        out = out.reshape(batch, m * self.dim_head_v, nh * bd, nw * bd)
        if self.pooled:
            out = F.avg_pool2d(out, 2)
        return out[:, :, :-(-height // self.stride), :-(-width // self.stride)]


class BottleneckBlock(nn.Module):
    """1x1 -> kxk (stride, groups) -> [SE/ECA] -> 1x1 residual block (timm's ``BottleneckBlock``)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, bottle_ratio: float, group_size: int | None,
                 downsample: bool, act: str, attn: str | None = None, attn_kwargs: dict | None = None,
                 bottle_in: bool = False, linear_out: bool = False, drop_path: float = 0.0, **_: Any) -> None:
        super().__init__()
        mid = make_divisible((in_chs if bottle_in else out_chs) * bottle_ratio)
        self.shortcut = _shortcut(in_chs, out_chs, stride, downsample, act)
        self.conv1_1x1 = ConvNormAct(in_chs, mid, 1, act=act)
        self.conv2_kxk = ConvNormAct(mid, mid, 3, stride, groups=mid // group_size if group_size else 1, act=act)
        self.attn = _channel_attn(attn, mid, attn_kwargs or {})
        self.conv3_1x1 = ConvNormAct(mid, out_chs, 1, act=None)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.act = nn.Identity() if linear_out else _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop_path(self.conv3_1x1(self.attn(self.conv2_kxk(self.conv1_1x1(x)))))
        return self.act(y if self.shortcut is None else y + self.shortcut(x))


class SelfAttnBlock(nn.Module):
    """1x1 -> halo attention (stride) -> BN+act -> 1x1 residual block (timm's ``SelfAttnBlock``)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, bottle_ratio: float, downsample: bool, act: str,
                 halo: dict[str, Any], bottle_in: bool = False, linear_out: bool = False, drop_path: float = 0.0,
                 **_: Any) -> None:
        super().__init__()
        mid = make_divisible((in_chs if bottle_in else out_chs) * bottle_ratio)
        self.shortcut = _shortcut(in_chs, out_chs, stride, downsample, act)
        self.conv1_1x1 = ConvNormAct(in_chs, mid, 1, act=act)
        self.self_attn = HaloAttn(mid, stride=stride, **halo)
        self.post_attn = BatchNormAct2d(mid, act)
        self.conv3_1x1 = ConvNormAct(mid, out_chs, 1, act=None)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.act = nn.Identity() if linear_out else _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop_path(self.conv3_1x1(self.post_attn(self.self_attn(self.conv1_1x1(x)))))
        return self.act(y if self.shortcut is None else y + self.shortcut(x))


def _shortcut(in_chs: int, out_chs: int, stride: int, downsample: bool, act: str) -> nn.Module | None:
    """Identity, a strided 1x1 conv + BN where the shape changes, or nothing there (``downsample=False``)."""
    if in_chs == out_chs and stride == 1:
        return nn.Identity()
    return ConvNormAct(in_chs, out_chs, 1, stride, act=None) if downsample else None


# -- configuration ----------------------------------------------------------------------------------------


def interleave(depth: int, every: int | Sequence[int] = 1) -> tuple[str, ...]:
    """Block types of a stage mixing bottleneck and halo blocks (timm's ``interleave_blocks``).

    ``every`` as an int makes blocks ``every, 2 * every + 1, ...`` attention (the last block if none); as a list
    it names the attention blocks. Example: ``interleave(3, [2]) == ('bottle', 'bottle', 'self_attn')``.
    """
    if isinstance(every, int):
        idx = list(range(every, depth, every + 1)) or [depth - 1]
    else:
        idx = list(every)
    return tuple("self_attn" if i in idx else "bottle" for i in range(depth))


@dataclass(frozen=True)
class StageCfg:
    """One stage: block types, output channels, stride of the first block, group size, bottleneck ratio."""

    types: tuple[str, ...]
    channels: int
    stride: int
    group_size: int | None = None
    bottle_ratio: float = 0.25
    halo: dict[str, Any] | None = None  # overrides HaloNetCfg.halo for this stage


@dataclass(frozen=True)
class HaloNetCfg:
    """A HaloNet variant as data (timm's ``ByoModelCfg`` for the halo models)."""

    stages: tuple[StageCfg, ...]
    stem_type: str = "tiered"  # tiered (3 convs 3x3), 7x7, or 3x3 (one conv)
    stem_pool: bool = True  # 3x3 max pool after the stem (else its last conv is strided)
    stem_chs: int = 64
    act: str = "relu"
    attn: str | None = None  # channel attention in bottleneck blocks: se, eca
    attn_kwargs: dict[str, Any] = field(default_factory=dict)
    halo: dict[str, Any] = field(default_factory=dict)
    bottle_in: bool = False
    linear_out: bool = False
    downsample: bool = True  # 1x1 conv shortcut where the shape changes (False: no shortcut there)
    num_features: int = 0  # final 1x1 conv width (0: none)


def _stage(types: tuple[str, ...] | str, depth: int, channels: int, stride: int, **kw: Any) -> StageCfg:
    return StageCfg(types if isinstance(types, tuple) else (types,) * depth, channels, stride, **kw)


def paper_cfg(b: int, h: int, rv: float, rb: float, l3: int, df: int = 0) -> HaloNetCfg:
    """A row of the paper's HaloNet table (H0-H7): block ``b``, halo ``h``, value width ``rv`` and block width ``rb``
    multipliers, stage-3 depth ``l3``, final 1x1 conv width ``df``; halo blocks everywhere, ResNet 7x7 stem.

    As in timm's ``halonet_h1`` (the H1 row): stage widths ``(64, 128, 256, 512) * rb``, attention width
    ``(64, 128, 256, 512) * rv``, depths ``(3, 3, l3, 3)``. The paper's networks were never released; these are
    its hyper-parameters in timm's block design, untrained.
    """
    stages = tuple(_stage("self_attn", d, make_divisible(base * rb), 1 if i == 0 else 2, bottle_ratio=rv / rb)
                   for i, (d, base) in enumerate(zip((3, 3, l3, 3), (64, 128, 256, 512))))
    return HaloNetCfg(stages=stages, stem_type="7x7", halo=dict(block_size=b, halo_size=h), num_features=df)


# The paper's table (image sizes 256, 256, 256, 320, 384, 448, 512, 600 for H0-H7).
PAPER_ROWS = {
    "halonet_h0": dict(b=8, h=3, rv=1.0, rb=0.5, l3=7), "halonet_h2": dict(b=8, h=3, rv=1.0, rb=1.25, l3=11),
    "halonet_h3": dict(b=10, h=3, rv=1.0, rb=1.5, l3=12, df=1024),
    "halonet_h4": dict(b=12, h=2, rv=1.0, rb=3.0, l3=12, df=1280),
    "halonet_h5": dict(b=14, h=2, rv=2.5, rb=2.0, l3=23, df=1536),
    "halonet_h6": dict(b=8, h=4, rv=3.0, rb=2.75, l3=24, df=1536),
    "halonet_h7": dict(b=10, h=3, rv=4.0, rb=3.5, l3=26, df=2048),
}

MODEL_CFGS: dict[str, HaloNetCfg] = {
    "halonet_h1": HaloNetCfg(
        stages=(_stage("self_attn", 3, 64, 1, bottle_ratio=1.0), _stage("self_attn", 3, 128, 2, bottle_ratio=1.0),
                _stage("self_attn", 10, 256, 2, bottle_ratio=1.0), _stage("self_attn", 3, 512, 2, bottle_ratio=1.0)),
        stem_type="7x7", halo=dict(block_size=8, halo_size=3)),
    "halonet26t": HaloNetCfg(
        stages=(_stage("bottle", 2, 256, 1), _stage("bottle", 2, 512, 2), _stage(interleave(2), 2, 1024, 2),
                _stage("self_attn", 2, 2048, 2)),
        halo=dict(block_size=8, halo_size=2)),
    "sehalonet33ts": HaloNetCfg(
        stages=(_stage("bottle", 2, 256, 1), _stage(interleave(3, [2]), 3, 512, 2),
                _stage(interleave(3, [2]), 3, 1024, 2), _stage("self_attn", 2, 1536, 2, bottle_ratio=0.333)),
        stem_pool=False, act="silu", attn="se", num_features=1280, halo=dict(block_size=8, halo_size=3)),
    "halonet50ts": HaloNetCfg(
        stages=(_stage("bottle", 3, 256, 1),
                _stage(interleave(4, 4), 4, 512, 2, halo=dict(block_size=8, halo_size=3, num_heads=4)),
                _stage(interleave(6), 6, 1024, 2), _stage(interleave(3), 3, 2048, 2)),
        act="silu", halo=dict(block_size=8, halo_size=3)),
    "eca_halonext26ts": HaloNetCfg(
        stages=(_stage("bottle", 2, 256, 1, group_size=16), _stage("bottle", 2, 512, 2, group_size=16),
                _stage(interleave(2), 2, 1024, 2, group_size=16), _stage("self_attn", 2, 2048, 2, group_size=16)),
        act="silu", attn="eca", halo=dict(block_size=8, halo_size=2, dim_head=16)),
    "haloregnetz_b": HaloNetCfg(
        stages=(_stage("bottle", 2, 48, 2, group_size=16, bottle_ratio=3),
                _stage("bottle", 6, 96, 2, group_size=16, bottle_ratio=3),
                _stage(interleave(12, 3), 12, 192, 2, group_size=16, bottle_ratio=3),
                _stage("self_attn", 2, 288, 2, group_size=16, bottle_ratio=3)),
        stem_type="3x3", stem_pool=False, stem_chs=32, act="silu", attn="se", attn_kwargs=dict(rd_ratio=0.25),
        bottle_in=True, linear_out=True, downsample=False, num_features=1536,
        halo=dict(block_size=7, halo_size=2, qk_ratio=0.33)),
    **{name: paper_cfg(**row) for name, row in PAPER_ROWS.items()},
}


# -- network ----------------------------------------------------------------------------------------------


class Stem(nn.Module):
    """The stem; ``forward`` returns ``(stride-4 output, stride-2 tap)``.

    tiered: 3x3 convs to 3c/8, c/2, c (the first strided; the last too when there is no pool) and a 3x3 max
    pool; 7x7: one strided 7x7 conv and the pool; 3x3 without pool: one strided 3x3 conv (stride 2 overall,
    the first stage strides again). Keys as timm's ``stem.conv{i}.*`` (``stem.conv.*``/``stem.bn.*`` for 3x3).
    """

    def __init__(self, in_chans: int, out_chs: int, stem_type: str, pool: bool, act: str) -> None:
        super().__init__()
        if stem_type == "3x3":
            if pool:
                raise ValueError("a 3x3 stem with a pool is not a published HaloNet layout")
            self.conv = nn.Conv2d(in_chans, out_chs, 3, 2, 1, bias=False)
            self.bn = BatchNormAct2d(out_chs, act)
            self.stride, self.tap, self.tap_chs = 2, None, out_chs
            return
        if stem_type == "tiered":
            chs = (3 * out_chs // 8, out_chs // 2, out_chs)
            strides = [2, 1, 1 if pool else 2]
            kernel = 3
        elif stem_type == "7x7":
            chs, strides, kernel = (out_chs,), [2], 7
            if not pool:
                raise ValueError("a 7x7 stem without a pool is not a published HaloNet layout")
        else:
            raise ValueError(f"unknown stem_type '{stem_type}'{suggest(stem_type, ['tiered', '7x7', '3x3'])}")
        prev = in_chans
        for i, (ch, s) in enumerate(zip(chs, strides)):
            self.add_module(f"conv{i + 1}", ConvNormAct(prev, ch, kernel, s, act=act))
            prev = ch
        self.pool = nn.MaxPool2d(3, 2, 1) if pool else None
        self.stride = 4
        # the stride-2 tap: the conv before the second stride (the pool, or a strided last conv)
        self.tap = len(chs) if pool else len(chs) - 1
        self.tap_chs = chs[self.tap - 1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tap is None:
            x = self.bn(self.conv(x))
            return x, x
        tap = x
        for i, conv in enumerate(m for name, m in self.named_children() if name.startswith("conv")):
            x = conv(x)
            if i + 1 == self.tap:
                tap = x
        return (self.pool(x) if self.pool is not None else x), tap


class HaloStage(nn.Sequential):
    """The blocks of one stage (``stages.{i}.{j}`` keys)."""

    grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and torch.is_grad_enabled() \
                else block(x)
        return x


class HaloNet(nn.Module):
    """HaloNet backbone and classifier from a :class:`HaloNetCfg` (timm's halo ``ByobNet``).

    Args:
        cfg: a name in :data:`MODEL_CFGS` or a :class:`HaloNetCfg`.
        in_chans, num_classes: input channels; classifier outputs (0: no head).
        drop_rate: dropout before the classifier; drop_path_rate: stochastic depth of the last block.
        out_indices: taps of :meth:`forward_pyramid`: 0 = stride-2 stem feature, 1-3 = stages 1-3 (strides 4-16),
            4 = the last stage through the final conv (stride 32); timm's ``features_only`` taps.

    Example::

        >>> m = test_halonet(num_classes=0)
        >>> [tuple(f.shape[1:]) for f in m.forward_pyramid(torch.randn(1, 3, 97, 131))]
        [(32, 25, 33), (64, 13, 17), (128, 7, 9), (256, 4, 5)]
    """

    family = "halonet"
    min_input_size = 32
    output_fmt = "NCHW"
    head_key_prefixes = ("head.",)

    def __init__(self, cfg: str | HaloNetCfg = "halonet26t", in_chans: int = 3, num_classes: int = 1000,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, out_indices: Sequence[int] = (1, 2, 3, 4)) -> None:
        super().__init__()
        if isinstance(cfg, str):
            if cfg not in MODEL_CFGS:
                raise ValueError(f"unknown HaloNet cfg '{cfg}'{suggest(cfg, MODEL_CFGS)} (known: {', '.join(MODEL_CFGS)})")
            cfg = MODEL_CFGS[cfg]
        out_indices = tuple(out_indices)
        if not out_indices or sorted(set(out_indices)) != list(out_indices) or not all(0 <= i <= 4 for i in out_indices):
            raise ValueError(f"out_indices must be increasing tap indices in 0..4, got {out_indices}")
        if num_classes < 0 or in_chans < 1:
            raise ValueError(f"in_chans must be >= 1 and num_classes >= 0, got {in_chans=}, {num_classes=}")
        self.cfg, self.in_chans, self.num_classes, self.out_indices = cfg, in_chans, num_classes, out_indices
        self.stem = Stem(in_chans, cfg.stem_chs, cfg.stem_type, cfg.stem_pool, cfg.act)
        rates = drop_path_rates([len(s.types) for s in cfg.stages], drop_path_rate)
        prev, stages = cfg.stem_chs, []
        for i, stage in enumerate(cfg.stages):
            blocks = []
            for j, kind in enumerate(stage.types):
                kw = dict(in_chs=prev, out_chs=stage.channels, stride=stage.stride if j == 0 else 1,
                          bottle_ratio=stage.bottle_ratio, group_size=stage.group_size, downsample=cfg.downsample,
                          act=cfg.act, bottle_in=cfg.bottle_in, linear_out=cfg.linear_out, drop_path=rates[i][j])
                if kind == "bottle":
                    blocks.append(BottleneckBlock(**kw, attn=cfg.attn, attn_kwargs=cfg.attn_kwargs))
                elif kind == "self_attn":
                    blocks.append(SelfAttnBlock(**kw, halo=stage.halo if stage.halo is not None else cfg.halo))
                else:
                    raise ValueError(f"stage {i}: unknown block type '{kind}' (bottle or self_attn)")
                prev = stage.channels
            stages.append(HaloStage(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = cfg.num_features or prev
        self.final_conv = ConvNormAct(prev, cfg.num_features, 1, act=cfg.act) if cfg.num_features else nn.Identity()
        self.drop_rate = drop_rate
        self.head = self._make_head(num_classes) if num_classes else None
        taps, stride = [(self.stem.tap_chs, 2, "stem")], self.stem.stride
        for i, stage in enumerate(cfg.stages):
            stride *= stage.stride
            taps.append((stage.channels, stride, f"stages.{i}"))
        taps[-1] = (self.num_features, stride, "final_conv")
        self.feature_info = [{"num_chs": c, "reduction": r, "module": m} for c, r, m in (taps[i] for i in out_indices)]
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's init: conv weights N(0, sqrt(2 / fan_out)) (halo projections: trunc-normal by fan-in), BN at
        # identity, the last BN of each residual branch zero.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, HaloAttn):
                for conv in (m.q, m.kv):
                    nn.init.trunc_normal_(conv.weight, std=conv.weight.shape[1] ** -0.5)
            if isinstance(m, (BottleneckBlock, SelfAttnBlock)) and m.shortcut is not None:
                nn.init.zeros_(m.conv3_1x1.bn.weight)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^stem", "blocks": [(r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)", None),
                                             (r"^final_conv", (99999,))]}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module | None:
        return self.head.fc if self.head is not None else None

    def _make_head(self, num_classes: int, **dd: Any) -> nn.Sequential:
        """timm's classifier head after global average pooling: ``head.drop``, ``head.fc``."""
        return nn.Sequential(OrderedDict(drop=nn.Dropout(self.drop_rate),
                                         fc=nn.Linear(self.num_features, num_classes, **dd)))

    def reset_classifier(self, num_classes: int) -> None:
        """A new linear classifier (``num_classes > 0``) or none (``0``)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        ref = next(self.parameters())
        self.num_classes = num_classes
        self.head = self._make_head(num_classes, device=ref.device, dtype=ref.dtype) if num_classes else None

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All five taps, NCHW: stride-2 stem feature, stages 1-3 (strides 4, 8, 16), final conv (stride 32)."""
        check_image_input(self, x)
        x, tap = self.stem(x.contiguous(memory_format=torch.channels_last))  # mkldnn convs are faster channels-last
        outs = [tap]
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        outs[-1] = self.final_conv(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The stride-32 map after the final conv ``[B, num_features, ceil(H/32), ceil(W/32)]``."""
        return self.forward_intermediates(x)[-1]

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """NCHW maps of ``out_indices`` (default strides 4/8/16/32); no extra norms (no official dense version)."""
        feats = self.forward_intermediates(x)
        return [feats[i] for i in self.out_indices]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("this HaloNet has no classifier (num_classes=0); use forward_pyramid")
        x = self.head.drop(x.mean((2, 3)))
        return x if pre_logits else self.head.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> logits ``[B, num_classes]`` (timm's outputs)."""
        return self.forward_head(self.forward_features(x))


# -- variants ---------------------------------------------------------------------------------------------------
# timm's trained weights (ImageNet-1k top-1 from timm's results tables); halonet_h1 has none.

def _create(name: str, kwargs: dict[str, Any]) -> HaloNet:
    return HaloNet(MODEL_CFGS[name], **kwargs)


@BACKBONES.register(cls=HaloNet)
def halonet_h1(**kwargs: Any) -> HaloNet:
    """timm's attempt at the paper's H1 (halo attention everywhere; untrained, slow): 8.1M parameters."""
    return _create("halonet_h1", kwargs)


@BACKBONES.register(cls=HaloNet)
def halonet26t(**kwargs: Any) -> HaloNet:
    """ResNet-26-T with halo blocks in the last two stages: 12.5M parameters, 79.1% top-1 at 256."""
    return _create("halonet26t", kwargs)


@BACKBONES.register(cls=HaloNet)
def sehalonet33ts(**kwargs: Any) -> HaloNet:
    """ResNet-33-TS with SE and halo blocks, SiLU, final 1x1 conv to 1280: 13.7M parameters, 81.0% top-1 at 256."""
    return _create("sehalonet33ts", kwargs)


@BACKBONES.register(cls=HaloNet)
def halonet50ts(**kwargs: Any) -> HaloNet:
    """ResNet-50-TS with halo blocks interleaved from stage 2, SiLU: 22.7M parameters, 81.6% top-1 at 256."""
    return _create("halonet50ts", kwargs)


@BACKBONES.register(cls=HaloNet)
def eca_halonext26ts(**kwargs: Any) -> HaloNet:
    """ResNeXt-26-TS (group size 16) with ECA and halo blocks: 10.8M parameters, 79.5% top-1 at 256."""
    return _create("eca_halonext26ts", kwargs)


@BACKBONES.register(cls=HaloNet)
def haloregnetz_b(**kwargs: Any) -> HaloNet:
    """RegNetZ-B-like with SE and halo blocks (block 7): 11.7M parameters, 81.1% top-1 at 224 (mean/std 0.5)."""
    return _create("haloregnetz_b", kwargs)


def _paper_factory(name: str) -> Any:
    def factory(**kwargs: Any) -> HaloNet:
        return _create(name, kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"HaloNet-{name[-2:].upper()}, the paper's table row {PAPER_ROWS[name]} (no weights exist)."
    return factory


for _name in PAPER_ROWS:  # the paper's H0, H2-H7 (H1 is timm's halonet_h1 above)
    BACKBONES.register(_name, cls=HaloNet)(_paper_factory(_name))


@BACKBONES.register(cls=HaloNet)
def test_halonet(**kwargs: Any) -> HaloNet:
    """A tiny HaloNet for CI (no published weights)."""
    cfg = replace(MODEL_CFGS["halonet26t"], stem_chs=16, stages=(
        _stage("bottle", 1, 32, 1), _stage("bottle", 1, 64, 2), _stage(interleave(2), 2, 128, 2),
        _stage("self_attn", 1, 256, 2)), halo=dict(block_size=4, halo_size=1, num_heads=4))
    return HaloNet(cfg, **kwargs)


# -- pretrained configurations (timm's weights, timm's data settings) --------------------------------------------------
# HaloNet has no official code or weights; timm's are the reference (Apache-2.0). The paper rows H0-H7 have no weights
# and take the paper's training sizes.
_cfg = pretrained_cfg_factory(paper="2103.12731", origin="https://github.com/huggingface/pytorch-image-models",
                              license="apache-2.0", first_conv="stem.conv1.conv", classifier="head.fc",
                              input_size=(3, 256, 256), crop_pct=0.95)

default_cfgs: dict[str, dict[str, Any]] = {
    "halonet_h1": _cfg(),
    "halonet26t": _cfg(checkpoints=("halonet26t_a1h_256-3083328c.pth",)),
    "sehalonet33ts": _cfg(crop_pct=0.94, checkpoints=("sehalonet33ts_256-87e053f9.pth",)),
    "halonet50ts": _cfg(crop_pct=0.94, checkpoints=("halonet50ts_a1h2_256-f3a3daee.pth",)),
    "eca_halonext26ts": _cfg(crop_pct=0.94, checkpoints=("eca_halonext26ts_c_256-06906299.pth",)),
    "haloregnetz_b": _cfg(input_size=(3, 224, 224), crop_pct=0.94, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                          first_conv="stem.conv", checkpoints=("haloregnetz_c_raa_256-c8ad7616.pth",)),
    **{name: _cfg(input_size=(3, size, size)) for name, size in (
        ("halonet_h0", 256), ("halonet_h2", 256), ("halonet_h3", 320), ("halonet_h4", 384), ("halonet_h5", 448),
        ("halonet_h6", 512), ("halonet_h7", 600))},
}
