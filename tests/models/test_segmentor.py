import pytest
import torch
from torch import nn

from attnseg.config import validate_config
from attnseg.errors import ConfigError, InputSizeError
from attnseg.models import Adapter, Classifier, Segmentor
from attnseg.models.builder import build_model


class Dummy3d(nn.Module):
    """A conv backbone with the feature contract, in 3D."""

    def __init__(self):
        super().__init__()
        self.in_chans = 1
        self.convs = nn.ModuleList([nn.Conv3d(1, 8, 3, 2, 1), nn.Conv3d(8, 16, 3, 2, 1)])
        self.feature_info = [{"num_chs": 8, "reduction": 2, "module": "convs.0"},
                             {"num_chs": 16, "reduction": 4, "module": "convs.1"}]

    def forward_pyramid(self, x):
        out = []
        for conv in self.convs:
            x = conv(x)
            out.append(x)
        return out


def _cfg(**model):
    return validate_config({
        "model": {"backbone": {"name": "test_mambaout"}, "head": {"name": "unetr", "feature_size": 8},
                  "num_classes": 3, **model},
        "data": {"dataset": {"name": "synthetic2d"}},
    })


@pytest.mark.parametrize("size", [(97, 75), (333, 517), (64, 64)])
def test_any_input_size_gives_logits_of_input_size(size):
    model = build_model(_cfg()).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 3, *size)
    assert model.postprocess(out).shape == (1, *size)


def test_padding_does_not_leak_into_cropped_result():
    """Logits of the top-left region do not depend on what lies outside the image (zero padding)."""
    model = build_model(_cfg()).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = model(x[..., :60, :60])
        b = model(torch.nn.functional.pad(x[..., :60, :60], (0, 4, 0, 4)))[..., :60, :60]
    assert torch.allclose(a, b, atol=1e-5)


def test_3d_segmentor_with_dummy_backbone():
    from attnseg.heads.unetr import UNETRHead

    bb = Dummy3d()
    head = UNETRHead([8, 16], [2, 4], num_classes=2, spatial_dims=3, in_chans=1, feature_size=4)
    out = Segmentor(bb, head)(torch.randn(1, 1, 37, 30, 41))
    assert out.shape == (1, 2, 37, 30, 41)


def test_adapter_projects_levels():
    model = build_model(_cfg(adapter_channels=[8, 8, 16, 16]))
    assert isinstance(model.adapter, Adapter)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ConfigError, match="adapter_channels has 2 values; the backbone gives 4"):
        build_model(_cfg(adapter_channels=[8, 8]))


def test_input_checks():
    model = build_model(_cfg())
    with pytest.raises(InputSizeError, match="expects 3 input channels, got 1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(InputSizeError, match="expected a 2D input"):
        model(torch.randn(1, 3, 8, 64, 64))


def test_segmentor_backbone_has_no_classifier_and_classifier_resets_head():
    model = build_model(_cfg())
    assert model.backbone.head is None
    cls = build_model(validate_config({"task": "classification", "model": {"backbone": {"name": "test_mambaout"},
                                                                          "num_classes": 7},
                                       "data": {"dataset": {"name": "synthetic2d"}}}))
    assert isinstance(cls, Classifier) and cls(torch.randn(2, 3, 64, 64)).shape == (2, 7)
