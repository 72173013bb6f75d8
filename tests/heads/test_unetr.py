"""UNETRHead: shapes over pyramids of several strides, 2D and 3D, gradients, wiring, errors, Swin UNETR parity."""

import pytest
import torch
from torch import nn

from attnseg.errors import InputSizeError
from attnseg.heads.unetr import UNETRHead
from attnseg.layers.unet_blocks import UnetBasicBlock, UnetrBasicBlock, UnetrUpBlock
from attnseg.registry import HEADS


def _feats(channels, strides, size, dims=2, batch=1):
    return [torch.randn(batch, c, *([size // s] * dims)) for c, s in zip(channels, strides)]


@pytest.mark.parametrize("strides", [[4, 8, 16, 32], [2, 4, 8, 16, 32], [4, 8, 16], [2, 4]])
def test_2d_output_size_and_finite_gradients_on_every_parameter(strides):
    channels = [8 * (i + 1) for i in range(len(strides))]
    head = UNETRHead(channels, strides, num_classes=3, feature_size=12)
    out = head(_feats(channels, strides, 64, batch=2), torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3, 64, 64)
    out.square().mean().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert (head.stem2 is None) == (strides[0] == 2)
    assert head.size_divisor == strides[-1]


def test_module_names_follow_monai_by_stride():
    head = UNETRHead([8, 16, 32, 64], [4, 8, 16, 32], num_classes=2, feature_size=6)
    names = [n for n, _ in head.named_children()]
    assert names == ["encoder1", "stem2", "encoder3", "encoder4", "encoder5", "encoder10",
                     "decoder5", "decoder4", "decoder3", "decoder2", "decoder1", "out"]
    # channel plan fs * s / 2: adapters bring each level to it, decoders walk it back to fs
    assert [head.get_submodule(f"decoder{k}").transp_conv.conv.out_channels for k in (5, 4, 3, 2, 1)] == [48, 24, 12,
                                                                                                          6, 6]
    assert head.encoder10.layer.conv1.conv.out_channels == 96 and head.encoder3.layer.conv1.conv.in_channels == 8
    shallow = UNETRHead([8, 16, 32], [4, 8, 16], num_classes=2, feature_size=6)  # decodes from stride 16 (8 fs)
    assert shallow.encoder5.layer.conv1.conv.out_channels == 48 and not hasattr(shallow, "decoder5")


@pytest.mark.parametrize("strides", [[2, 4, 8, 16, 32], [4, 8, 16, 32]])
def test_3d_output_size(strides):
    channels = [4 * 2**i for i in range(len(strides))]
    head = UNETRHead(channels, strides, num_classes=2, spatial_dims=3, in_chans=1, feature_size=4)
    out = head(_feats(channels, strides, 32, dims=3), torch.randn(1, 1, 32, 32, 32))
    assert out.shape == (1, 2, 32, 32, 32)
    assert isinstance(head.decoder1.transp_conv.conv, nn.ConvTranspose3d)


def test_non_square_input():
    head = UNETRHead([8, 16, 32, 64], [4, 8, 16, 32], num_classes=1, feature_size=4)
    image = torch.randn(1, 3, 64, 96)
    feats = [torch.randn(1, c, 64 // s, 96 // s) for c, s in zip([8, 16, 32, 64], [4, 8, 16, 32])]
    out = head(feats, image)
    assert out.shape == (1, 1, 64, 96)
    mask = head.postprocess(out)
    assert mask.shape == (1, 64, 96) and mask.dtype == torch.long and torch.equal(mask, (out.sigmoid() > 0.5)[:, 0])


def test_postprocess_argmax():
    head = UNETRHead([8], [4], num_classes=3, feature_size=4)
    logits = torch.randn(2, 3, 5, 6)
    assert torch.equal(head.postprocess(logits), logits.argmax(1))


def test_raw_deep_skip_wiring():
    head = UNETRHead([24, 48, 96, 192], [4, 8, 16, 32], num_classes=2, feature_size=12, raw_deep_skip=True)
    assert isinstance(head.encoder5, nn.Identity)  # stride 16 already has the plan's 8 * fs = 96 channels
    assert isinstance(head.encoder10, UnetrBasicBlock) and isinstance(head.decoder5, UnetrUpBlock)
    projected = UNETRHead([24, 48, 80, 192], [4, 8, 16, 32], num_classes=2, feature_size=12, raw_deep_skip=True)
    assert isinstance(projected.encoder5, nn.Conv2d) and projected.encoder5.kernel_size == (1, 1)
    plain = UNETRHead([24, 48, 96, 192], [4, 8, 16, 32], num_classes=2, feature_size=12)
    assert isinstance(plain.encoder5, UnetrBasicBlock)
    # only the stride-16 adapter differs
    diff = {k.split(".")[0] for k in set(plain.state_dict()) ^ set(head.state_dict())}
    assert diff == {"encoder5"}
    out = projected(_feats([24, 48, 80, 192], [4, 8, 16, 32], 64), torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 2, 64, 64)


def test_basic_blocks_and_other_norms():
    head = UNETRHead([8, 16, 32, 64], [4, 8, 16, 32], num_classes=2, feature_size=8, res_block=False,
                     norm_name=["group", {"num_groups": 4}], dropout=0.1)
    assert isinstance(head.encoder1.layer, UnetBasicBlock) and isinstance(head.decoder1.conv_block, UnetBasicBlock)
    assert isinstance(head.decoder1.conv_block.norm1, nn.GroupNorm)
    assert head(_feats([8, 16, 32, 64], [4, 8, 16, 32], 64), torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_registered():
    assert HEADS.get("unetr") is UNETRHead and HEADS.owner_class("unetr") is UNETRHead


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(in_channels=[8, 8, 8], strides=[4, 16, 32]), r"double from level to level.*got strides=\[4, 16, 32\]"),
    (dict(in_channels=[8, 8], strides=[8, 16]), r"start at 2 or 4.*got strides=\[8, 16\]"),
    (dict(in_channels=[8] * 5, strides=[4, 8, 16, 32, 64]), r"at most 32.*got strides=\[4, 8, 16, 32, 64\]"),
    (dict(in_channels=[8, 8], strides=[4, 8, 16]), r"equal length.*in_channels=\[8, 8\], strides=\[4, 8, 16\]"),
    (dict(feature_size=0), "feature_size must be an int >= 1, got feature_size=0"),
    (dict(num_classes=0), "num_classes must be an int >= 1, got num_classes=0"),
    (dict(spatial_dims=4), "spatial_dims must be 2 or 3, got spatial_dims=4"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got dropout=1.0"),
    (dict(norm_name="instanse"), "unknown norm 'instanse'; did you mean 'instance'"),
    (dict(in_channels=[8, 8, 8], strides=[4, 8, 16], raw_deep_skip=True), r"raw_deep_skip.*strides=\[4, 8, 16\]"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    args = dict(in_channels=[8, 16], strides=[4, 8], num_classes=2) | kwargs
    with pytest.raises(ValueError, match=match):
        UNETRHead(**args)


def test_bad_inputs_are_explained():
    head = UNETRHead([8, 16], [4, 8], num_classes=2, feature_size=4)
    with pytest.raises(InputSizeError, match=r"divisible by 8.*got \[60, 64\]"):
        head(_feats([8, 16], [4, 8], 64), torch.randn(1, 3, 60, 64))
    with pytest.raises(InputSizeError, match=r"expects an image \[B, 3, H, W\], got \[1, 1, 64, 64\]"):
        head(_feats([8, 16], [4, 8], 64), torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="expects 2 pyramid levels"):
        head(_feats([8], [4], 64), torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"level 1 \(stride 8\) should be \[B, 16, 8, 8\].*got \[1, 16, 4, 4\]"):
        head([torch.randn(1, 8, 16, 16), torch.randn(1, 16, 4, 4)], torch.randn(1, 3, 64, 64))


class _FixedHidden(nn.Module):
    """Stands in for MONAI's ``swinViT``: returns given hidden states (the encoder is not under test here)."""

    def __init__(self, hidden):
        super().__init__()
        self.hidden = hidden

    def forward(self, x, normalize=True):
        return self.hidden


def _swin_unetr_parity(dims: int, size: int, in_chans: int):
    nets = pytest.importorskip("monai.networks.nets")
    fs = 12
    ref = nets.SwinUNETR(in_channels=in_chans, out_channels=3, feature_size=fs, spatial_dims=dims).eval()
    for p in ref.parameters():  # MONAI's IN is affine-free, so only conv weights matter; make them all non-trivial
        torch.nn.init.normal_(p, std=0.2)
    head = UNETRHead([fs, 2 * fs, 4 * fs, 8 * fs, 16 * fs], [2, 4, 8, 16, 32], num_classes=3, spatial_dims=dims,
                     in_chans=in_chans, feature_size=fs, raw_deep_skip=True).eval()
    decoder = {k: v for k, v in ref.state_dict().items() if not k.startswith("swinViT.")}
    head.load_state_dict(decoder, strict=True)  # MONAI's decoder keys, unrenamed
    x = torch.randn(1, in_chans, *[size] * dims)
    hidden = _feats([fs, 2 * fs, 4 * fs, 8 * fs, 16 * fs], [2, 4, 8, 16, 32], size, dims=dims)
    ref.swinViT = _FixedHidden(hidden)
    with torch.no_grad():
        # float rounding only: the up-steps' transposed convs run as one matmul each (non_overlapping_conv_transpose)
        torch.testing.assert_close(head(hidden, x), ref(x), rtol=1e-5, atol=1e-5)


def test_swin_unetr_decoder_parity_2d():
    _swin_unetr_parity(2, 64, in_chans=3)


def test_swin_unetr_decoder_parity_3d():
    _swin_unetr_parity(3, 64, in_chans=1)
