"""DANet's position and channel attention modules (PAM, CAM).

Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019 (arXiv 1809.02983); official code
junfu1115/DANet ``encoding/nn/da_att.py`` (``PAM_Module``, ``CAM_Module``). The same two modules are copied
verbatim by the multi-scale guided attention head (sinAshish/Multi-Scale-Attention@96d76f2
``src/models/attention.py``) and by DconnNet's SDE module (Zyun-Y/DconnNet@e55ac71), so they live here.

Parameter names follow the official code (``query_conv``, ``key_conv``, ``value_conv``, ``gamma``), so an official
``PAM_Module``/``CAM_Module`` state_dict loads 1:1. Both modules accept any number of spatial axes (the maps are
flattened to ``N = prod(spatial)`` positions); ``spatial_dims`` picks the 1x1 convolution type of PAM.

Memory: PAM builds a ``[B, N, N]`` attention matrix (``B * N * N`` elements, e.g. 1 GiB in fp32 for one 128x128
map). :func:`position_attention_bytes` estimates it; PAM raises :class:`MemoryError` before allocating beyond
``max_attention_bytes`` (``None``: no limit) so a too-large input fails with a message instead of an OOM kill.

Example::

    >>> pam, cam = PositionAttention(64), ChannelAttention()
    >>> x = torch.randn(2, 64, 16, 20)
    >>> pam(x).shape, cam(x).shape
    (torch.Size([2, 64, 16, 20]), torch.Size([2, 64, 16, 20]))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnseg.layers.dims import conv_type

__all__ = ["PositionAttention", "ChannelAttention", "position_attention_bytes"]


def position_attention_bytes(batch: int, positions: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one ``[batch, positions, positions]`` PAM attention matrix (energy and softmax each take this)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return batch * positions * positions * itemsize


class PositionAttention(nn.Module):
    """DANet position attention (PAM, after SAGAN): every position attends to every position.

    ``q, k = conv1x1(x) -> C // reduction`` channels, ``v = conv1x1(x) -> C``;
    ``A = softmax_j(q_i . k_j)`` over the ``N`` positions; ``out = gamma * (v A^T) + x``. ``gamma`` starts at 0
    (the module is the identity at initialisation), as in the official code.

    Args:
        in_channels: channels ``C`` of the input (and output).
        reduction: query/key width is ``C // reduction`` (official: 8).
        spatial_dims: 1, 2 or 3 (type of the 1x1 convolutions).
        max_attention_bytes: refuse (``MemoryError``) inputs whose attention matrix would exceed this many bytes;
            ``None`` (default) never refuses.

    Shapes: ``[B, C, *S] -> [B, C, *S]``.
    """

    def __init__(self, in_channels: int, reduction: int = 8, spatial_dims: int = 2,
                 max_attention_bytes: int | None = None, **dd: Any) -> None:
        super().__init__()
        if in_channels // reduction < 1:
            raise ValueError(f"PositionAttention: in_channels {in_channels} // reduction {reduction} is 0; "
                             "use more channels or a smaller reduction")
        conv = conv_type(spatial_dims)
        self.in_channels = in_channels
        self.max_attention_bytes = max_attention_bytes
        self.query_conv = conv(in_channels, in_channels // reduction, kernel_size=1, **dd)
        self.key_conv = conv(in_channels, in_channels // reduction, kernel_size=1, **dd)
        self.value_conv = conv(in_channels, in_channels, kernel_size=1, **dd)
        self.gamma = nn.Parameter(torch.zeros(1, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        n = x[0, 0].numel()
        if self.max_attention_bytes is not None:
            need = position_attention_bytes(b, n, x.dtype)
            if need > self.max_attention_bytes:
                raise MemoryError(
                    f"PositionAttention: a {tuple(x.shape[2:])} map (N={n} positions, batch {b}) needs a "
                    f"{need / 2**30:.2f} GiB attention matrix, above max_attention_bytes "
                    f"({self.max_attention_bytes / 2**30:.2f} GiB); run the attention on a coarser map "
                    "(e.g. the MSGA head's attention_stride) or raise the limit")
        query = self.query_conv(x).flatten(2).transpose(1, 2)  # [B, N, C']
        key = self.key_conv(x).flatten(2)  # [B, C', N]
        attention = torch.softmax(torch.bmm(query, key), dim=-1)  # [B, N, N], rows = queries
        value = self.value_conv(x).flatten(2)  # [B, C, N]
        out = torch.bmm(value, attention.transpose(1, 2)).view(b, c, *x.shape[2:])  # [B, C, *S]
        return self.gamma * out + x


class ChannelAttention(nn.Module):
    """DANet channel attention (CAM): every channel attends to every channel; no convolutions.

    ``E = X X^T`` (``[B, C, C]`` over the flattened positions); ``A = softmax_j(max_j E_ij - E_ij)`` (the
    official "max minus energy" form, which favours *dissimilar* channels); ``out = gamma * (A X) + x``,
    ``gamma`` initialised to 0.

    Args:
        in_channels: accepted for symmetry with :class:`PositionAttention` (CAM has no channel-dependent weights).

    Shapes: ``[B, C, *S] -> [B, C, *S]``.
    """

    def __init__(self, in_channels: int | None = None, **dd: Any) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.gamma = nn.Parameter(torch.zeros(1, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)  # [B, C, N]
        energy = torch.bmm(flat, flat.transpose(1, 2))  # [B, C, C]
        energy = energy.amax(dim=-1, keepdim=True) - energy
        attention = torch.softmax(energy, dim=-1)
        out = torch.bmm(attention, flat).view_as(x)  # [B, C, *S]
        return self.gamma * out + x
