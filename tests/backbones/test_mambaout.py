import pytest
import torch

from attnseg.backbones.mambaout import MambaOut
from attnseg.convert import from_official
from attnseg.convert.mambaout import convert_state_dict
from attnseg.errors import InputSizeError
from attnseg.registry import BACKBONES
from tests.conftest import load_fixture

FIXTURE = "mambaout_tiny_cfg.pt"


def test_parity_with_official_fixture():
    fx = load_fixture(FIXTURE)
    model = from_official("mambaout", fx["constructor"], fx["state_dict"])
    with torch.no_grad():
        out = model(fx["input"])
        feats = model.forward_intermediates(fx["input"])
    tol = fx["tolerance"]
    assert torch.allclose(out, fx["output"], **tol)
    assert len(feats) == len(fx["features"])
    for ours, ref in zip(feats, fx["features"]):
        assert ours.shape == ref.shape  # NHWC stage outputs
        assert torch.allclose(ours, ref, **tol)


def test_timm_layout_loads_to_the_same_outputs():
    fx = load_fixture(FIXTURE)
    timm_sd = {fx["timm_key_map"][k]: v for k, v in fx["state_dict"].items()}
    model = from_official("mambaout", fx["constructor"], timm_sd)
    with torch.no_grad():
        assert torch.allclose(model(fx["input"]), fx["output"], **fx["tolerance"])


def test_matches_timm_implementation_with_shared_weights():
    timm = pytest.importorskip("timm")
    ref = timm.create_model("mambaout_femto", pretrained=False, num_classes=7).eval()
    ours = BACKBONES.get("mambaout_femto")(num_classes=7, pyramid_norm=False).eval()
    ours.load_state_dict(convert_state_dict(ref.state_dict()), strict=True)
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_official_converter_refuses_unknown_keys():
    with pytest.raises(KeyError, match="unexpected key"):
        convert_state_dict({"downsample_layers.0.conv1.weight": torch.zeros(1), "mystery.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    "name,millions", [("mambaout_femto", 7.30), ("mambaout_kobe", 9.14), ("mambaout_tiny", 26.55),
                      ("mambaout_small", 48.49), ("mambaout_base", 84.81)],
)
def test_published_parameter_counts(name, millions):
    with torch.device("meta"):
        model = BACKBONES.get(name)(pyramid_norm=False)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.01)


def test_any_input_size_pyramid_matches_feature_info():
    model = BACKBONES.get("mambaout_femto")(num_classes=0).eval()
    with torch.no_grad():
        feats = model.forward_pyramid(torch.randn(1, 3, 225, 231))
    assert [tuple(f.shape[2:]) for f in feats] == [(57, 58), (29, 29), (15, 15), (8, 8)]
    assert [f.shape[1] for f in feats] == [i["num_chs"] for i in model.feature_info] == [48, 96, 192, 288]
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    # the pyramid norms (fresh: weight 1, bias 0) normalise each pixel over channels
    assert feats[0].mean(1).abs().max() < 1e-4
    sub = BACKBONES.get("test_mambaout")(out_indices=(1, 3), num_classes=0)
    assert [i["reduction"] for i in sub.feature_info] == [8, 32]
    assert len(sub.forward_pyramid(torch.randn(1, 3, 64, 64))) == 2


def test_bad_inputs_and_arguments():
    model = BACKBONES.get("test_mambaout")()
    with pytest.raises(InputSizeError, match=r"expects input \[B, 3, H, W\], got \[1, 1, 64, 64\]"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(InputSizeError, match="H and W >= 32, got 16x64"):
        model(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match="out_indices"):
        MambaOut(out_indices=(5,))
    with pytest.raises(ValueError, match="drop_path_rate"):
        MambaOut(drop_path_rate=1.5)


def test_grad_checkpointing_same_output_and_backward():
    model = BACKBONES.get("test_mambaout")(num_classes=5, drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    assert torch.allclose(ref, out, atol=1e-6)
    out.sum().backward()
    used = [(n, p) for n, p in model.named_parameters() if not n.startswith("pyramid_norms")]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in used)


def test_reset_classifier():
    model = BACKBONES.get("test_mambaout")(num_classes=5)
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.reset_classifier(0)
    assert model.head is None
    with pytest.raises(RuntimeError, match="no classifier"):
        model(torch.randn(1, 3, 64, 64))
