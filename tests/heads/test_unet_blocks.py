"""UNETR blocks and dimension lookups; MONAI's blocks are the oracle (strict state_dict load, equal outputs)."""

import pytest
import torch
from torch import nn

from attnseg.layers.dims import conv_transpose_type, conv_type, dropout_type, interp_mode, norm_layer, pool_type
from attnseg.layers.unet_blocks import (
    UnetBasicBlock,
    UnetOutBlock,
    UnetrBasicBlock,
    UnetResBlock,
    UnetrUpBlock,
    non_overlapping_conv_transpose,
)

monai_blocks = pytest.importorskip("monai.networks.blocks")
dynunet = pytest.importorskip("monai.networks.blocks.dynunet_block")


def _randomize_(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


def _pairs(dims: int):
    x8 = torch.randn(2, 3, *[8] * dims)
    return [
        # (MONAI block, ours, inputs)
        (monai_blocks.UnetrUpBlock(dims, 16, 8, 3, 2, "instance", res_block=True), UnetrUpBlock(dims, 16, 8),
         (torch.randn(2, 16, *[4] * dims), torch.randn(2, 8, *[8] * dims))),
        (monai_blocks.UnetrUpBlock(dims, 16, 8, 3, 2, "batch", res_block=False),
         UnetrUpBlock(dims, 16, 8, norm_name="batch", res_block=False),
         (torch.randn(2, 16, *[4] * dims), torch.randn(2, 8, *[8] * dims))),
        (monai_blocks.UnetrBasicBlock(dims, 3, 8, 3, 1, "instance", res_block=True), UnetrBasicBlock(dims, 3, 8), (x8,)),
        (monai_blocks.UnetrBasicBlock(dims, 8, 8, 3, 1, "instance", res_block=True),
         UnetrBasicBlock(dims, 8, 8), (torch.randn(2, 8, *[8] * dims),)),
        (monai_blocks.UnetrBasicBlock(dims, 3, 8, 3, 2, ("group", {"num_groups": 4}), res_block=True),
         UnetrBasicBlock(dims, 3, 8, stride=2, norm_name=("group", {"num_groups": 4})), (torch.randn(2, 3, *[7] * dims),)),
        (monai_blocks.UnetrBasicBlock(dims, 3, 8, 3, 1, "instance", res_block=False),
         UnetrBasicBlock(dims, 3, 8, res_block=False), (x8,)),
        (dynunet.UnetResBlock(dims, 3, 8, 3, 2, ("instance", {"affine": True})),
         UnetResBlock(dims, 3, 8, stride=2, norm_name="instance_affine"), (x8,)),
        (dynunet.UnetBasicBlock(dims, 3, 8, 3, 1, "instance"), UnetBasicBlock(dims, 3, 8), (x8,)),
        (monai_blocks.UnetOutBlock(dims, 3, 5), UnetOutBlock(dims, 3, 5), (x8,)),
    ]


@pytest.mark.parametrize("dims", [2, 3])
def test_blocks_load_monai_state_dict_strictly_and_match(dims):
    for ref, ours, args in _pairs(dims):
        _randomize_(ref).eval()
        ours.eval().load_state_dict(ref.state_dict(), strict=True)
        assert list(ours.state_dict()) == list(ref.state_dict()), type(ours).__name__
        with torch.no_grad():
            expected, got = ref(*[a.clone() for a in args]), ours(*args)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"{type(ours).__name__} ({dims}D)")


def test_dropout_follows_monai_placement_and_keeps_keys():
    ref = dynunet.UnetResBlock(2, 3, 8, 3, 1, "instance", dropout=0.2)
    ours = UnetResBlock(2, 3, 8, dropout=0.2)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert isinstance(ours.conv1.drop, nn.Dropout) and isinstance(ours.conv3.drop, nn.Dropout)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=0, atol=0)


def test_lookups():
    assert conv_type(2) is nn.Conv2d and conv_transpose_type(3) is nn.ConvTranspose3d
    assert pool_type("adaptive_avg", 3) is nn.AdaptiveAvgPool3d and dropout_type(2) is nn.Dropout2d
    assert interp_mode(3) == "trilinear"
    assert isinstance(norm_layer("instance", 3, 4), nn.InstanceNorm3d)
    assert not norm_layer("instance", 2, 4).affine and norm_layer("instance_affine", 2, 4).affine
    assert isinstance(norm_layer("batch", 2, 4), nn.BatchNorm2d)
    assert norm_layer(["group", {"num_groups": 2}], 2, 4).num_groups == 2  # a YAML list works like a tuple
    assert norm_layer("layer", 3, 4)(torch.randn(1, 4, 2, 3, 5)).shape == (1, 4, 2, 3, 5)


def test_lookup_errors_name_the_value():
    with pytest.raises(ValueError, match="unknown norm 'instanse'; did you mean 'instance'"):
        norm_layer("instanse", 2, 4)
    with pytest.raises(ValueError, match="num_groups=8 for 12 channels"):
        norm_layer("group", 2, 12)
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3, got 4"):
        conv_type(4)
    with pytest.raises(ValueError, match="unknown pooling 'mean'"):
        pool_type("mean", 2)
    with pytest.raises(ValueError, match="bad arguments for norm 'batch'"):
        norm_layer(("batch", {"groups": 2}), 2, 4)
    with pytest.raises(ValueError, match="kernel_size must be >= stride - 1"):
        UnetResBlock(2, 3, 4, kernel_size=1, stride=3)


@pytest.mark.parametrize("dims", [2, 3])
def test_instance_norm_accepts_one_spatial_element(dims):
    block = UnetrBasicBlock(dims, 4, 8).train()
    x = torch.randn(2, 4, *[1] * dims, requires_grad=True)
    out = block(x)
    assert out.shape == (2, 8, *[1] * dims) and torch.isfinite(out).all()
    out.sum().backward()
    norm = norm_layer("instance_affine", dims, 3)
    with torch.no_grad():
        norm.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    assert norm(torch.randn(1, 3, *[1] * dims)).flatten().tolist() == [1.0, 2.0, 3.0]


def test_dims_docstring_examples():
    import doctest

    import attnseg.layers.dims

    result = doctest.testmod(attnseg.layers.dims, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("dims, k", [(1, 2), (2, 2), (3, 2), (2, (2, 3)), (3, (1, 2, 2))])
def test_non_overlapping_transposed_conv_equals_pytorch(dims, k):
    ks = (k,) * dims if isinstance(k, int) else k
    x = torch.randn(2, 5, *[3 + i for i in range(dims)])
    w, b = torch.randn(5, 4, *ks), torch.randn(4)
    conv = getattr(torch.nn.functional, f"conv_transpose{dims}d")
    assert torch.allclose(non_overlapping_conv_transpose(x, w, b), conv(x, w, b, stride=ks), atol=1e-5)
