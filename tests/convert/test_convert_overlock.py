import pytest
import torch

import attnseg.convert as convert
from attnseg.checkpoint import load_pretrained
from attnseg.convert import overlock as conv
from attnseg.errors import CheckpointError
from attnseg.registry import BACKBONES
from tests.conftest import load_fixture

CLS, REPARAM, SEG, DET = ("overlock_cls_tiny_cfg.pt", "overlock_cls_tiny_cfg_reparam.pt", "overlock_seg_tiny_cfg.pt",
                          "overlock_det_tiny_cfg.pt")


def test_family_is_discovered():
    assert "overlock" in convert.families()
    assert convert.get_converter("overlock") is conv


@pytest.mark.parametrize("fixture", [CLS, REPARAM, SEG, DET])
def test_every_official_key_is_placed_unchanged(fixture):
    sd = load_fixture(fixture)["state_dict"]
    out = convert.convert_state_dict("overlock", sd)
    assert list(out) == list(sd) and all(out[k] is sd[k] for k in sd)
    assert conv.is_deploy_form(sd) == (fixture == REPARAM)
    assert not conv.is_official(sd)


def test_fuse_state_dict_gives_the_official_reparam_weights():
    fx, fused = load_fixture(CLS), load_fixture(REPARAM)
    merged = conv.fuse_state_dict(fx["state_dict"])
    assert set(merged) == set(fused["state_dict"])
    for key, value in fused["state_dict"].items():
        assert torch.allclose(merged[key], value, atol=1e-5, rtol=1e-5), key
    assert conv.fuse_state_dict(fused["state_dict"]).keys() == fused["state_dict"].keys()  # already merged: kept


def test_deploy_constructor_with_train_form_weights_is_merged_on_the_fly():
    fx, fused = load_fixture(CLS), load_fixture(REPARAM)
    model = conv.from_official(fused["constructor"], fx["state_dict"])
    with torch.no_grad():
        assert torch.allclose(model(fx["input"]), fused["output"], **fused["tolerance"])


def test_merged_weights_refuse_a_train_form_model():
    fx, fused = load_fixture(CLS), load_fixture(REPARAM)
    with pytest.raises(CheckpointError, match="merged .* form; build the model with deploy=True"):
        conv.from_official(fx["constructor"], fused["state_dict"])


@pytest.mark.parametrize("wrapper", ["bare", "model", "state_dict", "state_dict_ema"])
def test_load_pretrained_unwraps_official_classification_files(tmp_path, wrapper):
    fx = load_fixture(CLS)
    path = tmp_path / "overlock.pth"
    torch.save(fx["state_dict"] if wrapper == "bare" else {wrapper: fx["state_dict"]}, path)
    model = BACKBONES.get("test_overlock")(num_classes=10, pyramid_norm=None)
    load_pretrained(model, path)
    with torch.no_grad():
        assert torch.allclose(model.eval()(fx["input"]), fx["output"], **fx["tolerance"])


@pytest.mark.parametrize("fixture,kind", [(SEG, "seg"), (DET, "det")])
def test_load_pretrained_strips_the_mm_backbone_prefix(tmp_path, fixture, kind):
    fx = load_fixture(fixture)
    sd = {f"backbone.{k}": v for k, v in fx["state_dict"].items()}
    sd["decode_head.conv_seg.weight"] = torch.zeros(3, 8, 1, 1)
    path = tmp_path / "dense.pth"
    torch.save({"state_dict": sd, "meta": {"epoch": 1}}, path)
    model = BACKBONES.get("test_overlock")(num_classes=0, pyramid_norm=kind)
    load_pretrained(model, path)
    with torch.no_grad():
        for ours, ref in zip(model.eval().forward_pyramid(fx["input"]), fx["output"]):
            assert torch.allclose(ours, ref, **fx["tolerance"])


def test_imagenet_weights_into_a_dense_model_leave_only_the_dense_keys_fresh(tmp_path):
    fx = load_fixture(CLS)
    path = tmp_path / "in1k.pth"
    torch.save({"model": fx["state_dict"]}, path)
    model = BACKBONES.get("test_overlock")(num_classes=0, pyramid_norm="det")
    report = load_pretrained(model, path)
    assert not report.missing and not report.unexpected
    assert {k.split(".")[0] for k in report.initialized} == {"extra_norm", "h_proj"}
    assert {k.split(".")[0] for k in report.dropped} == {"head", "aux_head"}
    assert torch.equal(model.patch_embed1[0].weight, fx["state_dict"]["patch_embed1.0.weight"])


@pytest.mark.parametrize("sd,match", [
    ({"patch_embed1.0.weight": torch.zeros(1), "mystery.weight": torch.zeros(1)}, r"1 key\(s\) .*: mystery.weight"),
    ({"backbone.patch_embed1.0.weight": torch.zeros(1)}, "strip the wrapper prefix"),
    ({"weight_value.weight": torch.zeros(1)}, "plug-and-play"),
])
def test_unknown_keys_are_listed(sd, match):
    with pytest.raises(CheckpointError, match=match):
        conv.convert_state_dict(sd)


def test_from_official_refuses_what_it_cannot_build():
    fx = load_fixture(CLS)
    kwargs = fx["constructor"]["kwargs"]
    with pytest.raises(ValueError, match=r"unknown official OverLoCK constructor 'OverLoCKK'; did you mean 'OverLoCK'"):
        conv.from_official({"name": "OverLoCKK", "kwargs": kwargs}, fx["state_dict"])
    with pytest.raises(ValueError, match=r"arguments \['foo'\] are not supported"):
        conv.from_official({"name": "OverLoCK", "kwargs": {**kwargs, "foo": 1}}, fx["state_dict"])
    with pytest.raises(ValueError, match="num_classes=0"):
        conv.from_official({"name": "OverLoCK", "kwargs": {**kwargs, "num_classes": 0}}, fx["state_dict"])
    partial = {k: v for k, v in fx["state_dict"].items() if not k.startswith("aux_head.")}
    with pytest.raises(CheckpointError, match=r"missing \(7\): aux_head"):
        conv.from_official(fx["constructor"], partial)
