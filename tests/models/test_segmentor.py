"""Segmentor (pad, run, crop) and Classifier over dummy backbones honouring the contract, and over MambaOut."""

import pytest
import torch
from torch import nn

from attnseg.errors import InputSizeError
from attnseg.heads.unetr import UNETRHead
from attnseg.models import Adapter, Classifier, Segmentor
from attnseg.registry import BACKBONES


class DummyBackbone(nn.Module):
    """Stride-2 3x3 convs (ceil division, like most backbones: 225 -> 113 -> 57 ...) with the feature contract."""

    def __init__(self, spatial_dims=2, in_chans=3, channels=(8, 16, 24, 32), strides=(4, 8, 16, 32), num_classes=5):
        super().__init__()
        conv = (nn.Conv2d, nn.Conv3d)[spatial_dims - 2]
        self.in_chans, self.spatial_dims, self.num_classes = in_chans, spatial_dims, num_classes
        self.out_strides = list(strides)
        self.feature_info = [{"num_chs": c, "reduction": s, "module": f"convs.{i}"}
                             for i, (c, s) in enumerate(zip(channels, strides))]
        self.convs, widths, stride, c_prev = nn.ModuleList(), dict(zip(strides, channels)), 1, in_chans
        while stride < strides[-1]:
            stride *= 2
            c = widths.get(stride, 8)
            self.convs.append(nn.Sequential(conv(c_prev, c, 3, 2, 1), nn.GELU()))
            c_prev = c
        self.num_features = c_prev
        self.head = nn.Linear(c_prev, num_classes)

    def forward_pyramid(self, x):
        out, stride = [], 1
        for conv in self.convs:
            x, stride = conv(x), stride * 2
            if stride in self.out_strides:
                out.append(x)
        return out

    def forward_features(self, x):
        return self.forward_pyramid(x)[-1]

    def forward(self, x):
        return self.head(self.forward_features(x).flatten(2).mean(-1))

    def reset_classifier(self, num_classes):
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)


def _segmentor(spatial_dims=2, in_chans=3, strides=(4, 8, 16, 32), num_classes=3, **head_kwargs):
    bb = DummyBackbone(spatial_dims, in_chans, channels=[8 * (i + 1) for i in range(len(strides))], strides=strides)
    head = UNETRHead([f["num_chs"] for f in bb.feature_info], list(strides), num_classes=num_classes,
                     spatial_dims=spatial_dims, in_chans=in_chans, feature_size=4, **head_kwargs)
    return Segmentor(bb, head)


def test_dummy_backbone_ceil_divides():
    shapes = [f.shape[-2:] for f in DummyBackbone().forward_pyramid(torch.randn(1, 3, 225, 231))]
    assert [tuple(s) for s in shapes] == [(57, 58), (29, 29), (15, 15), (8, 8)]


@pytest.mark.parametrize("size", [(97, 75), (333, 517), (64, 64), (5, 3)])
def test_2d_any_input_size_gives_logits_of_input_size(size):
    model = _segmentor().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 3, *size)
    assert model.postprocess(out).shape == (1, *size) and model.predict(torch.randn(1, 3, *size)).shape == (1, *size)


@pytest.mark.parametrize("strides", [(2, 4, 8, 16, 32), (4, 8, 16)])
def test_2d_other_pyramids_and_training_gradients(strides):
    model = _segmentor(strides=strides).train()
    out = model(torch.randn(2, 3, 45, 38))
    assert out.shape == (2, 3, 45, 38)
    out.square().mean().backward()
    for name, p in model.head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.size_divisor == strides[-1]


@pytest.mark.parametrize("strides", [(2, 4, 8, 16, 32), (4, 8, 16, 32)])
def test_3d_odd_size(strides):
    model = _segmentor(spatial_dims=3, in_chans=1, strides=strides, num_classes=2).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 40, 36, 44))
    assert out.shape == (1, 2, 40, 36, 44)
    assert model.spatial_dims == 3 and model.num_classes == 2 and model.in_chans == 1


def test_padding_is_zero_on_the_far_side():
    """The backbone sees the input at the top-left corner and zeros after it."""
    model = _segmentor().eval()
    seen = []
    original = model.backbone.forward_pyramid
    model.backbone.forward_pyramid = lambda x: (seen.append(x), original(x))[1]
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        a = model(x)
        b = model(nn.functional.pad(x, (0, 26, 0, 14)))[..., :50, :70]  # the same padded image, given explicitly
    assert seen[0].shape == (1, 3, 64, 96) and torch.equal(seen[0][..., :50, :70], x)
    assert seen[0][..., 50:, :].abs().sum() == 0 and seen[0][..., 70:].abs().sum() == 0
    torch.testing.assert_close(a, b)


def test_backbone_minimum_size_is_padded_to():
    model = _segmentor()
    model.min_input_size = (64, 64)
    assert model.padded_size((20, 70)) == (64, 96)


def test_adapter_projects_levels():
    bb = DummyBackbone()
    adapter = Adapter([8, 16, 24, 32], [4, 8, 16, 32], [12, 16, 48, 96])
    assert isinstance(adapter.projs[1], nn.Identity) and isinstance(adapter.projs[0], nn.Conv2d)
    assert [f["num_chs"] for f in adapter.feature_info] == [12, 16, 48, 96]
    head = UNETRHead([12, 16, 48, 96], [4, 8, 16, 32], num_classes=2, feature_size=6, raw_deep_skip=True)
    model = Segmentor(bb, head, adapter)
    assert model(torch.randn(1, 3, 50, 40)).shape == (1, 2, 50, 40)
    assert Adapter([8, 16], [4, 8])([torch.ones(1)] * 2)[0] is not None  # identity without out_channels
    with pytest.raises(ValueError, match=r"one positive value per level \(2\), got \[8\]"):
        Adapter([8, 16], [4, 8], [8])


def test_mismatched_parts_are_refused():
    bb = DummyBackbone()
    with pytest.raises(ValueError, match=r"head expects pyramid channels \[8, 8, 8, 8\].*gives \[8, 16, 24, 32\]"):
        Segmentor(bb, UNETRHead([8] * 4, [4, 8, 16, 32], num_classes=2))
    with pytest.raises(ValueError, match=r"head expects pyramid strides \[2, 4, 8, 16\].*gives \[4, 8, 16, 32\]"):
        Segmentor(bb, UNETRHead([8, 16, 24, 32], [2, 4, 8, 16], num_classes=2))
    with pytest.raises(ValueError, match="backbone is 2D but the head is 3D"):
        Segmentor(bb, UNETRHead([8, 16, 24, 32], [4, 8, 16, 32], num_classes=2, spatial_dims=3))
    with pytest.raises(ValueError, match="publishes no feature_info"):
        Segmentor(nn.Conv2d(3, 3, 1), UNETRHead([8], [4], num_classes=2))


def test_input_checks_name_expected_and_got():
    model = _segmentor()
    with pytest.raises(InputSizeError, match="expects 3 input channels, got 1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(InputSizeError, match=r"expected a 2D input \[B, C, H, W\], got shape \[1, 3, 8, 64, 64\]"):
        model(torch.randn(1, 3, 8, 64, 64))


def test_classifier_resets_the_head_and_predicts():
    bb = DummyBackbone(num_classes=5)
    model = Classifier(bb, num_classes=7)
    assert bb.num_classes == 7 and model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert model.predict(torch.randn(2, 3, 64, 64)).shape == (2,)
    kept = DummyBackbone(num_classes=4)
    head = kept.head
    assert Classifier(kept, 4).backbone.head is head  # same size: the head is kept
    with pytest.raises(ValueError, match="num_classes must be an int >= 1, got num_classes=0"):
        Classifier(DummyBackbone(), 0)
    with pytest.raises(ValueError, match="no reset_classifier"):
        Classifier(nn.Conv2d(3, 3, 1), 3)


@pytest.mark.skipif("test_mambaout" not in BACKBONES, reason="MambaOut backbone not available")
def test_mambaout_segmentor_and_classifier():
    bb = BACKBONES.get("test_mambaout")(num_classes=0)
    head = UNETRHead([f["num_chs"] for f in bb.feature_info], [f["reduction"] for f in bb.feature_info],
                     num_classes=3, feature_size=8)
    model = Segmentor(bb, head).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 97, 75)).shape == (1, 3, 97, 75)
        assert model(torch.randn(1, 3, 20, 33)).shape == (1, 3, 20, 33)  # below MambaOut's minimum: padded to it
    cls = Classifier(BACKBONES.get("test_mambaout")(), num_classes=6)
    assert cls(torch.randn(2, 3, 64, 64)).shape == (2, 6)
