"""The residual conv blocks of the UNETR decoder (Hatamizadeh et al.), for 2D and 3D.

Module and parameter names follow MONAI's ``UnetResBlock``, ``UnetrBasicBlock``, ``UnetrUpBlock`` and
``UnetOutBlock`` (``conv1.conv.weight``, ``transp_conv.conv.weight``, ``conv_block.*``, ``conv.conv.*``),
so MONAI SwinUNETR decoder weights load without renaming. Semantics as MONAI's: bias-free 3x3 convs,
norm (affine-free InstanceNorm by default), LeakyReLU(0.01), 1x1 conv + norm on the residual when the
width or stride changes, transposed conv k2 s2 for upsampling.
"""

from __future__ import annotations

import torch
from torch import nn

from attnseg.layers.dims import conv_transpose_type, conv_type, norm_layer

__all__ = ["UnetResBlock", "UnetrBasicBlock", "UnetrUpBlock", "UnetOutBlock"]


class _Conv(nn.Module):
    """A conv under the attribute ``conv`` (MONAI's Convolution wrapper keeps this extra level)."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1,
                 bias: bool = False, transposed: bool = False) -> None:
        super().__init__()
        if transposed:
            self.conv = conv_transpose_type(spatial_dims)(in_ch, out_ch, kernel_size, stride=stride, bias=bias)
        else:
            self.conv = conv_type(spatial_dims)(in_ch, out_ch, kernel_size, stride=stride,
                                                padding=(kernel_size - 1) // 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UnetResBlock(nn.Module):
    """``LReLU(norm(conv(LReLU(norm(conv(x))))) + residual)``; residual = 1x1 conv + norm when needed.

    ``[B, C_in, *S] -> [B, C_out, *S / stride]``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, norm_name: str = "instance", dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = _Conv(spatial_dims, in_channels, out_channels, kernel_size, stride)
        self.conv2 = _Conv(spatial_dims, out_channels, out_channels, kernel_size, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.01, inplace=True)
        self.norm1 = norm_layer(norm_name, spatial_dims, out_channels)
        self.norm2 = norm_layer(norm_name, spatial_dims, out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.downsample = in_channels != out_channels or stride != 1
        if self.downsample:
            self.conv3 = _Conv(spatial_dims, in_channels, out_channels, 1, stride)
            self.norm3 = norm_layer(norm_name, spatial_dims, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.lrelu(self.norm1(self.dropout(self.conv1(x))))
        out = self.norm2(self.dropout(self.conv2(out)))
        if self.downsample:
            residual = self.norm3(self.conv3(residual))
        return self.lrelu(out + residual)


class UnetrBasicBlock(nn.Module):
    """One :class:`UnetResBlock` under ``layer`` (MONAI's ``res_block=True`` form)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, norm_name: str = "instance", dropout: float = 0.0) -> None:
        super().__init__()
        self.layer = UnetResBlock(spatial_dims, in_channels, out_channels, kernel_size, stride, norm_name, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class UnetrUpBlock(nn.Module):
    """Transposed conv (k2 s2) to ``out_channels``, concat with the skip, then a residual block.

    ``x [B, C_in, *S]``, ``skip [B, C_out, *2S] -> [B, C_out, *2S]``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3,
                 upsample_kernel_size: int = 2, norm_name: str = "instance", dropout: float = 0.0) -> None:
        super().__init__()
        self.transp_conv = _Conv(spatial_dims, in_channels, out_channels, upsample_kernel_size,
                                 upsample_kernel_size, transposed=True)
        self.conv_block = UnetResBlock(spatial_dims, 2 * out_channels, out_channels, kernel_size, 1, norm_name,
                                       dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat((self.transp_conv(x), skip), dim=1))


class UnetOutBlock(nn.Module):
    """1x1 conv with bias to the class logits."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = _Conv(spatial_dims, in_channels, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
