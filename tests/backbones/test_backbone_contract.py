"""The backbone contract, checked on every attention family's CI variant alike."""

import pytest
import torch

from attnseg.registry import BACKBONES

VARIANTS = ["test_nat", "test_nat_isotropic", "test_biformer", "test_halonet", "test_transnext", "test_overlock",
            "test_resnet", "test_karat", "test_sparsifiner"]


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("size", [(97, 131), (300, 500), (32, 33), (32, 40), (32, 45)])
def test_any_input_size_gives_ceil_stride_pyramids(name, size):
    model = BACKBONES.get(name)(num_classes=0).eval()
    with torch.no_grad():
        maps = model.forward_pyramid(torch.randn(1, 3, *size))
    expected = []
    h, w = size
    for i, info in enumerate(model.feature_info):
        h, w = -(-h // (4 if i == 0 else 2)), -(-w // (4 if i == 0 else 2))
        expected.append((info["num_chs"], h, w))
    assert [tuple(m.shape[1:]) for m in maps] == expected
    assert all(torch.isfinite(m).all() for m in maps)


@pytest.mark.parametrize("name", VARIANTS)
def test_reset_classifier(name):
    model = BACKBONES.get(name)(num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    model.reset_classifier(3)
    assert model(x).shape == (1, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model.get_classifier() is None and not any(k.startswith("head.") for k in model.state_dict())
    with pytest.raises(RuntimeError, match="no classifier"):
        model(x)
    model.reset_classifier(2)
    assert model(x).shape == (1, 2)
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        model.reset_classifier(-1)
