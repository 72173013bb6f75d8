"""Shared building blocks used by more than one model family."""

from attnseg.layers.danet import ChannelAttention, PositionAttention, position_attention_bytes
from attnseg.layers.dims import conv_transpose_type, conv_type, norm_layer
from attnseg.layers.drop import DropPath, drop_path_rates
from attnseg.layers.mlp import Mlp
from attnseg.layers.norm import LayerNorm2d
from attnseg.layers.pyramid import SimpleFeaturePyramid, plain_feature_info
from attnseg.layers.relpos import relative_position_bias_2d, resize_rel_pos_table
from attnseg.layers.swin import PatchMerging, SwinBlock, WindowAttention
from attnseg.layers.unet_blocks import UnetOutBlock, UnetrBasicBlock, UnetResBlock, UnetrUpBlock

__all__ = ["DropPath", "drop_path_rates", "Mlp", "LayerNorm2d", "conv_type", "conv_transpose_type", "norm_layer",
           "UnetResBlock", "UnetrBasicBlock", "UnetrUpBlock", "UnetOutBlock", "SimpleFeaturePyramid",
           "plain_feature_info", "relative_position_bias_2d", "resize_rel_pos_table", "SwinBlock", "WindowAttention",
           "PatchMerging", "PositionAttention", "ChannelAttention", "position_attention_bytes"]
