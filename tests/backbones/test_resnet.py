"""ResNet/ResNeXt backbones (the MSGA and DconnNet encoders): torchvision's and timm's weights and outputs."""

import pytest
import timm
import torch
import torchvision

from attnseg import load_pretrained
from attnseg.registry import BACKBONES


@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d"])
def test_equals_torchvision_with_its_weights(arch):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, arch)().eval()
    model = BACKBONES.get(arch)().eval()
    model.load_state_dict(ref.state_dict())  # torchvision's layout, strictly
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        stem = ref.relu(ref.bn1(ref.conv1(x)))
        l1 = ref.layer1(ref.maxpool(stem))
        l4 = ref.layer4(ref.layer3(ref.layer2(l1)))
        taps = BACKBONES.get(arch)(num_classes=0, out_indices=(0, 1, 4))
        taps.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")})
        got = taps.eval().forward_pyramid(x)
    for a, b in zip(got, [stem, l1, l4]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_timm_resnet_weights_load_unchanged():
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False).eval()
    model = BACKBONES.get("resnet18")().eval()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_one_channel_input_from_three_channel_weights(tmp_path):
    torch.manual_seed(0)
    ref = BACKBONES.get("test_resnet")(num_classes=0)
    torch.save(ref.state_dict(), tmp_path / "rgb.pth")
    model = BACKBONES.get("test_resnet")(in_chans=1, num_classes=0)
    load_pretrained(model, tmp_path / "rgb.pth")
    # A grey image through the summed first conv equals the RGB model on the image repeated over 3 channels.
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x), ref.eval().forward_features(x.repeat(1, 3, 1, 1)),
                                   rtol=1e-4, atol=1e-4)


def test_feature_info_and_published_sizes():
    m = BACKBONES.get("resnext101_32x8d")(in_chans=1, num_classes=0, out_indices=(0, 1, 2, 3, 4))
    assert [(f["num_chs"], f["reduction"]) for f in m.feature_info] == [(64, 2), (256, 4), (512, 8), (1024, 16),
                                                                         (2048, 32)]
    # reference/heads.md 3.2: the MSGA encoder has 86.74 M parameters
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 2) == 86.74
    r34 = BACKBONES.get("resnet34")(num_classes=0, out_indices=(0, 1, 2, 3, 4))
    assert [f["num_chs"] for f in r34.feature_info] == [64, 64, 128, 256, 512]


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = BACKBONES.get("test_resnet")(num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="out_indices"):
        BACKBONES.get("resnet18")(out_indices=(2, 1))
    with pytest.raises(ValueError, match="unknown ResNet arch 'resnet19'"):
        from attnseg.backbones.resnet import ResNet

        ResNet("resnet19")
