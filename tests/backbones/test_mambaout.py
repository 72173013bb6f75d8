import pytest
import torch

from attnseg.backbones.mambaout import MambaOut
from attnseg.convert import from_official
from attnseg.errors import InputSizeError
from attnseg.registry import BACKBONES
from tests.conftest import load_fixture

FIXTURE = "mambaout_tiny_cfg.pt"


def _build(name, **kwargs):
    return BACKBONES.get(name)(**kwargs)


# -- parity with the official code (fixture) and with timm ----------------------------------------------------

def test_parity_with_official_fixture():
    fx = load_fixture(FIXTURE)
    model = from_official("mambaout", fx["constructor"], fx["state_dict"])
    assert not model.training and model.pyramid_norms is None
    tol = fx["tolerance"]
    with torch.no_grad():
        out = model(fx["input"])
        feats = model.forward_intermediates(fx["input"])
    assert out.shape == fx["output"].shape == (1, 10)
    assert torch.allclose(out, fx["output"], **tol)
    assert len(feats) == len(fx["features"]) == 4
    for ours, ref in zip(feats, fx["features"]):
        assert ours.shape == ref.shape  # NHWC stage outputs
        assert torch.allclose(ours, ref, **tol)


def test_pyramid_without_norms_is_the_official_stage_outputs_in_nchw():
    fx = load_fixture(FIXTURE)
    model = from_official("mambaout", fx["constructor"], fx["state_dict"])
    with torch.no_grad():
        pyramid = model.forward_pyramid(fx["input"])
    for ours, ref in zip(pyramid, fx["features"]):
        assert ours.is_contiguous()
        assert torch.allclose(ours, ref.permute(0, 3, 1, 2), **fx["tolerance"])


def test_timm_layout_loads_to_the_same_outputs():
    fx = load_fixture(FIXTURE)
    timm_sd = {fx["timm_key_map"][k]: v for k, v in fx["state_dict"].items()}
    assert set(timm_sd) != set(fx["state_dict"])
    model = from_official("mambaout", fx["constructor"], timm_sd)
    with torch.no_grad():
        assert torch.allclose(model(fx["input"]), fx["output"], **fx["tolerance"])
        for ours, ref in zip(model.forward_intermediates(fx["input"]), fx["features"]):
            assert torch.allclose(ours, ref, **fx["tolerance"])


def test_factory_constructor_record():
    fx = load_fixture(FIXTURE)
    constructor = {"name": "mambaout_tiny", "kwargs": {"depths": [1, 1, 2, 1], "dims": [16, 32, 48, 64],
                                                       "num_classes": 10, "pretrained": False}}
    model = from_official("mambaout", constructor, fx["state_dict"])
    with torch.no_grad():
        assert torch.allclose(model(fx["input"]), fx["output"], **fx["tolerance"])


def _randomize(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("direction", ["timm_to_attnseg", "attnseg_to_timm"])
def test_matches_timm_femto_with_weights_copied(direction):
    timm = pytest.importorskip("timm")
    ref = timm.create_model("mambaout_femto", pretrained=False, num_classes=7).eval()
    ours = _build("mambaout_femto", num_classes=7, pyramid_norm=False).eval()
    if direction == "timm_to_attnseg":
        _randomize(ref)
        ours.load_state_dict(ref.state_dict(), strict=True)
    else:
        _randomize(ours)
        ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 65, 47)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        theirs = ref.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        for a, b in zip(ours.forward_intermediates(x), theirs):
            assert a.shape == b.shape
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


# -- variants ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name,millions", [("mambaout_femto", 7.30), ("mambaout_kobe", 9.14), ("mambaout_tiny", 26.55),
                      ("mambaout_small", 48.49), ("mambaout_base", 84.81)],
)
def test_published_parameter_counts(name, millions):
    with torch.device("meta"):
        model = _build(name, pyramid_norm=False)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.005)


def test_base_truncates_the_hidden_width_like_the_official_code():
    with torch.device("meta"):
        model = _build("mambaout_base")
    block = model.stages[0].blocks[0]
    assert block.fc1.weight.shape == (682, 128)  # 2 * int(8 / 3 * 128) = 2 * 341
    assert block.fc2.weight.shape == (128, 341)
    assert block.split_sizes == (341, 213, 128)


def test_registered_variants_and_defaults():
    for name in ("mambaout_femto", "mambaout_kobe", "mambaout_tiny", "mambaout_small", "mambaout_base",
                 "test_mambaout"):
        assert BACKBONES.owner_class(name) is MambaOut
    with torch.device("meta"):
        assert MambaOut().dims == [96, 192, 384, 576]  # the official class defaults (Tiny widths)
        assert _build("mambaout_femto", dims=(16, 32, 48, 64)).dims == [16, 32, 48, 64]  # kwargs win


def test_device_and_dtype_are_threaded_through():
    model = _build("test_mambaout", dtype=torch.float64, num_classes=3)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64
    model.reset_classifier(4)
    assert model.head.fc.weight.dtype == torch.float64


def test_drop_path_rates_rise_linearly_over_all_blocks():
    model = _build("test_mambaout", drop_path_rate=0.3, depths=(1, 2, 1, 1))
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.stages for b in s.blocks]
    assert rates == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3])


# -- sizes, features, errors ----------------------------------------------------------------------------------

def test_any_input_size_pyramid_matches_feature_info():
    model = _build("mambaout_femto", num_classes=0).eval()
    with torch.no_grad():
        feats = model.forward_pyramid(torch.randn(1, 3, 225, 231))
    assert [tuple(f.shape[2:]) for f in feats] == [(57, 58), (29, 29), (15, 15), (8, 8)]
    assert [f.shape[1] for f in feats] == [i["num_chs"] for i in model.feature_info] == [48, 96, 192, 288]
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    assert [i["module"] for i in model.feature_info] == ["stages.0", "stages.1", "stages.2", "stages.3"]
    # the pyramid norms (fresh: weight 1, bias 0) normalise each pixel over its channels
    assert feats[0].mean(1).abs().max() < 1e-4
    assert torch.allclose(feats[0].var(1, unbiased=False), torch.ones(()), atol=1e-3)


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (64, 95)])
def test_small_and_odd_sizes(size):
    model = _build("test_mambaout", num_classes=0).eval()
    with torch.no_grad():
        feats = model.forward_pyramid(torch.randn(2, 3, *size))
    for f, info in zip(feats, model.feature_info):
        r = info["reduction"]
        assert f.shape == (2, info["num_chs"], -(-size[0] // r), -(-size[1] // r))


def test_out_indices_subset_keeps_norms_keyed_by_stage():
    model = _build("test_mambaout", out_indices=(1, 3), num_classes=0)
    assert [(i["num_chs"], i["reduction"]) for i in model.feature_info] == [(24, 8), (48, 32)]
    assert sorted(k for k in model.state_dict() if k.startswith("pyramid_norms")) == [
        "pyramid_norms.1.bias", "pyramid_norms.1.weight", "pyramid_norms.3.bias", "pyramid_norms.3.weight"]
    feats = model.forward_pyramid(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 24, 8, 8), (1, 48, 2, 2)]


def test_forward_features_is_the_last_nhwc_stage():
    model = _build("test_mambaout", num_classes=4).eval()
    x = torch.randn(1, 3, 70, 64)
    with torch.no_grad():
        last = model.forward_features(x)
        assert last.shape == (1, 3, 2, 48)
        assert torch.equal(last, model.forward_intermediates(x)[-1])
        assert torch.equal(model.forward_head(last), model(x))
        assert model.forward_head(last, pre_logits=True).shape == (1, 4 * 48)


def test_bad_inputs_name_the_expected_value():
    model = _build("test_mambaout")
    with pytest.raises(InputSizeError, match=r"expects input \[B, 3, H, W\], got \[1, 1, 64, 64\]"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(InputSizeError, match=r"expects input \[B, 3, H, W\], got \[3, 64, 64\]"):
        model.forward_pyramid(torch.randn(3, 64, 64))
    with pytest.raises(InputSizeError, match="H and W >= 32, got 31x64"):
        model(torch.randn(1, 3, 31, 64))


@pytest.mark.parametrize("kwargs,match", [
    ({"out_indices": (5,)}, "out_indices"),
    ({"out_indices": (2, 1)}, "out_indices"),
    ({"drop_path_rate": 1.5}, "drop_path_rate"),
    ({"kernel_size": 6}, "kernel_size must be odd"),
    ({"conv_ratio": 3.0}, "conv_ratio"),
    ({"depths": (1, 1), "dims": (8, 16, 32)}, "one length"),
    ({"num_classes": -1}, "num_classes"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MambaOut(**kwargs)


# -- training utilities -------------------------------------------------------------------------------------

def test_grad_checkpointing_same_output_and_gradients():
    model = _build("test_mambaout", num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    ref.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    assert torch.allclose(ref, out, atol=1e-6)
    out.sum().backward()
    used = [n for n, _ in model.named_parameters() if not n.startswith("pyramid_norms")]
    assert sorted(grads) == sorted(used)
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(p.grad, grads[n], atol=1e-6), n


def test_backward_through_the_pyramid_reaches_every_backbone_parameter():
    model = _build("test_mambaout", num_classes=0, drop_path_rate=0.1).train()
    sum(f.square().mean() for f in model.forward_pyramid(torch.randn(2, 3, 48, 40))).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_reset_classifier_and_utilities():
    model = _build("test_mambaout", num_classes=5)
    assert model.get_classifier() is model.head.fc
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.reset_classifier(0)
    assert model.head is None and model.get_classifier() is None
    assert not any(k.startswith("head.") for k in model.state_dict())
    with pytest.raises(RuntimeError, match="no classifier"):
        model(torch.randn(1, 3, 64, 64))
    model.reset_classifier(2)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    assert model.no_weight_decay() == set()
    assert set(model.group_matcher()) == {"stem", "blocks"}
