import pytest
import torch

from attnseg.heads.unetr import UNETRHead
from attnseg.layers import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock


def _feats(channels, strides, size, dims=2):
    return [torch.randn(1, c, *([size // s] * dims)) for c, s in zip(channels, strides)]


@pytest.mark.parametrize("strides", [[4, 8, 16, 32], [2, 4, 8, 16, 32], [4, 8, 16]])
def test_2d_output_size_and_gradients(strides):
    channels = [8 * (i + 1) for i in range(len(strides))]
    head = UNETRHead(channels, strides, num_classes=3, feature_size=12)
    out = head(_feats(channels, strides, 64), torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 3, 64, 64)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    assert (head.stem2 is None) == (strides[0] == 2)


def test_3d_output_size():
    head = UNETRHead([8, 16, 32, 64], [2, 4, 8, 16], num_classes=2, spatial_dims=3, in_chans=1, feature_size=6)
    out = head(_feats([8, 16, 32, 64], [2, 4, 8, 16], 32, dims=3), torch.randn(1, 1, 32, 32, 32))
    assert out.shape == (1, 2, 32, 32, 32)


def test_raw_deep_skip_wiring():
    head = UNETRHead([24, 48, 96, 192], [4, 8, 16, 32], num_classes=2, feature_size=12, raw_deep_skip=True)
    assert isinstance(head.adapters[2], torch.nn.Identity)  # stride 16 with plan 8*fs = 96 channels
    assert isinstance(head.adapters[3], UnetrBasicBlock)
    head2 = UNETRHead([24, 48, 80, 192], [4, 8, 16, 32], num_classes=2, feature_size=12, raw_deep_skip=True)
    assert isinstance(head2.adapters[2], torch.nn.Conv2d)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"double from level to level.*got \[4, 16, 32\]"):
        UNETRHead([8, 8, 8], [4, 16, 32], 2)
    with pytest.raises(ValueError, match="feature_size must be >= 1, got 0"):
        UNETRHead([8], [4], 2, feature_size=0)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3, got 4"):
        UNETRHead([8], [4], 2, spatial_dims=4)


@pytest.mark.parametrize("dims", [2, 3])
def test_blocks_load_monai_weights_and_match(dims):
    blocks = pytest.importorskip("monai.networks.blocks")
    pairs = [
        (blocks.UnetrUpBlock(dims, 16, 8, 3, 2, "instance", res_block=True), UnetrUpBlock(dims, 16, 8),
         (torch.randn(1, 16, *[4] * dims), torch.randn(1, 8, *[8] * dims))),
        (blocks.UnetrBasicBlock(dims, 3, 8, 3, 1, "instance", res_block=True), UnetrBasicBlock(dims, 3, 8),
         (torch.randn(1, 3, *[8] * dims),)),
        (blocks.UnetOutBlock(dims, 8, 3), UnetOutBlock(dims, 8, 3), (torch.randn(1, 8, *[8] * dims),)),
    ]
    for ref, ours, args in pairs:
        ours.load_state_dict(ref.state_dict(), strict=True)
        assert torch.equal(ref(*args), ours(*args))
