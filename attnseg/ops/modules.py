"""Neighborhood-attention modules with the NAT/DiNAT checkpoint layout (``qkv``, ``rpb``, ``proj``).

They compute what NATTEN 0.14-0.17's ``NeighborhoodAttention{1,2,3}D`` compute: qkv projection, query
scaling, logits with relative position bias, softmax, dropout, aggregation, output projection. Without
attention dropout (every NAT/DiNAT config) they run the fused op, which never materialises the weights;
with it, in training, the unfused ``qk``/``av`` pair.
Maps smaller than ``kernel_size * dilation`` on an axis are zero-padded at the far end to that size
before the projection and cropped afterwards, as NATTEN 0.14 did (the official NAT detection and
segmentation numbers relied on it); later NATTEN versions raise instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attnseg.ops.functional import _na_av, _na_fused, _na_qk

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


class NeighborhoodAttentionND(nn.Module):
    """Neighborhood attention over ``spatial_dims`` axes, channels-last ``[B, *spatial, dim]`` in and out.

    Args:
        dim: channels.
        num_heads: attention heads (``dim`` must be divisible).
        kernel_size, dilation: int or one per axis.
        qkv_bias: bias of the qkv projection.
        qk_scale: logit scale (default ``head_dim ** -0.5``).
        rel_pos_bias: learnable relative position bias ``rpb [heads, 2k-1, ...]``.
        attn_drop, proj_drop: dropout on the attention weights and the output.
    """

    spatial_dims = 2

    def __init__(self, dim: int, num_heads: int, kernel_size: int | Sequence[int], dilation: int | Sequence[int] = 1,
                 qkv_bias: bool = True, qk_scale: float | None = None, rel_pos_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        n = self.spatial_dims
        self.kernel_size = tuple(kernel_size) if not isinstance(kernel_size, int) else (kernel_size,) * n
        self.dilation = tuple(dilation) if not isinstance(dilation, int) else (dilation,) * n
        if len(self.kernel_size) != n or len(self.dilation) != n or min(self.kernel_size + self.dilation) < 1:
            raise ValueError(f"kernel_size and dilation need {n} values >= 1, got {kernel_size=}, {dilation=}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *(2 * k - 1 for k in self.kernel_size)))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.spatial_dims
        if x.ndim != n + 2:
            raise ValueError(f"{type(self).__name__} expects [B, {n} spatial axes, C], got {list(x.shape)}")
        spatial = x.shape[1:-1]
        window = [k * d for k, d in zip(self.kernel_size, self.dilation)]
        pad = [max(w - s, 0) for w, s in zip(window, spatial)]
        if any(pad):
            # F.pad lists the last axis first; channels (last) unpadded, then spatial axes reversed.
            x = F.pad(x, [0, 0, *[p for extra in reversed(pad) for p in (0, extra)]])
        batch, *padded, channels = x.shape
        qkv = self.qkv(x).reshape(batch, *padded, 3, self.num_heads, self.head_dim)
        if self.training and self.attn_drop.p > 0:  # dropout needs the explicit weights
            qkv = qkv.permute(n + 1, 0, n + 2, *range(1, n + 1), n + 3)  # [3, B, heads, *S, head_dim]
            q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
            attn = _na_qk(n, q, k, self.kernel_size, self.dilation, self.rpb, False, None, "natten")
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = _na_av(n, attn, v, self.kernel_size, self.dilation, False, None, "natten")  # [B, heads, *S, hd]
            out = out.permute(0, *range(2, n + 2), 1, n + 2)
        else:
            q, k, v = qkv.unbind(dim=n + 1)  # [B, *S, heads, head_dim]
            out = _na_fused(n, q, k, v, self.kernel_size, self.dilation, 1, False, self.rpb, self.scale, None, None,
                            False, None, "natten")
        out = out.reshape(batch, *padded, channels)
        if any(pad):
            out = out[(slice(None), *(slice(0, s) for s in spatial))]
        return self.proj_drop(self.proj(out))


class NeighborhoodAttention1D(NeighborhoodAttentionND):
    """1D neighborhood attention, ``[B, L, C]``."""

    spatial_dims = 1


class NeighborhoodAttention2D(NeighborhoodAttentionND):
    """2D neighborhood attention, ``[B, H, W, C]`` (NAT/DiNAT).

    Example::

        >>> NeighborhoodAttention2D(dim=32, num_heads=2, kernel_size=7)(torch.randn(1, 14, 10, 32)).shape
        torch.Size([1, 14, 10, 32])
    """

    spatial_dims = 2


class NeighborhoodAttention3D(NeighborhoodAttentionND):
    """3D neighborhood attention, ``[B, D, H, W, C]``."""

    spatial_dims = 3
