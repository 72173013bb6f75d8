"""Official DconnNet (Zyun-Y/DconnNet @ e55ac71) state_dicts -> attnseg."""

import re

import pytest
import torch

from attnseg import load_pretrained
from attnseg.convert import from_official
from attnseg.convert.dconnnet import DROPPED_KEYS, OfficialDconnNet, convert_state_dict, is_official
from attnseg.errors import CheckpointError
from attnseg.models.dconnnet import DconnNet, dconnnet_resnet34
from tests.conftest import load_fixture


def _tol(fx):
    return {"atol": fx["tolerance"]["atol"], "rtol": fx["tolerance"]["rtol"]}


@pytest.fixture(scope="module")
def fixture():
    return load_fixture("dconnnet_model.pt")


@pytest.fixture(scope="module")
def official(fixture):
    return from_official("dconnnet", fixture["constructor"], fixture["state_dict"])


def test_parity_with_the_official_model_fixture(fixture, official):
    assert isinstance(official, OfficialDconnNet) and not official.training
    assert fixture["constructor"] == {"name": "DconnNet", "import": fixture["constructor"]["import"],
                                      "kwargs": {"num_class": 1}}
    with torch.no_grad():
        logits, aux = official(fixture["input"])  # the official forward's (cls_pred, mapped_c5)
    ref = fixture["output"]
    assert logits.shape == ref["logits"].shape == (1, 8, 96, 128)
    assert torch.allclose(logits, ref["logits"], **_tol(fixture))
    assert torch.allclose(aux, ref["aux_directional_prior"], **_tol(fixture))
    # the Segmentor in eval mode returns the same logits; postprocess is DconnNet's binarize-then-vote rule
    model = official.model
    assert isinstance(model, DconnNet) and model.head.decode == "binarize"
    with torch.no_grad():
        assert torch.equal(model(fixture["input"]), logits)


def test_parameter_count_is_the_official_less_the_unused_modules(fixture, official):
    sd = fixture["state_dict"]
    dropped = sum(v.numel() for k, v in sd.items() if any(re.fullmatch(p, k) for p in DROPPED_KEYS)
                  and not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert fixture["extras"]["num_parameters"] == 28382912
    assert sum(p.numel() for p in official.parameters()) == 28382912 - dropped == 25491128


def test_every_key_is_placed_or_dropped_by_name(fixture):
    sd = fixture["state_dict"]
    out = convert_state_dict(sd)
    dropped = [k for k in sd if any(re.fullmatch(p, k) for p in DROPPED_KEYS)]
    assert sorted(dropped)[:3] == ["backbone.fc.bias", "backbone.fc.weight", "cls_pred_conv.bias"]
    assert all(k.startswith("fb5.conv_3x3.") for k in dropped if not k.startswith(("backbone.fc", "cls_pred_conv.")))
    assert len(out) == len(sd) - len(dropped)
    assert "head.classifier.weight" in out and "head.sde_module.att8.sa.query_conv.weight" in out
    assert is_official(sd) and not is_official(out)
    with pytest.raises(CheckpointError, match="1 keys have no place.*decoder.extra.weight"):
        convert_state_dict({**sd, "decoder.extra.weight": torch.zeros(1)})


def test_from_official_rejects_other_constructors(fixture):
    with pytest.raises(ValueError, match="builds the official 'DconnNet' class"):
        from_official("dconnnet", {"name": "BiconNet", "kwargs": {}}, fixture["state_dict"])
    with pytest.raises(ValueError, match="takes num_class only"):
        from_official("dconnnet", {"name": "DconnNet", "kwargs": {"num_class": 1, "size": 3}}, fixture["state_dict"])


def test_load_pretrained_detects_the_official_layout(fixture, official, tmp_path):
    path = tmp_path / "dconnnet_official.pth"
    torch.save({k: v.contiguous() for k, v in fixture["state_dict"].items()}, path)
    model = dconnnet_resnet34()
    load_pretrained(model, path)
    loaded, expected = model.state_dict(), official.model.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in loaded)


def test_official_file_into_the_config_built_model(fixture, official, tmp_path):
    """``model.checkpoint`` of a config: a plain Segmentor (no family of its own) finds the converter through its
    head, while backbone-only checkpoints still go to the backbone."""
    from attnseg.config import load_config
    from attnseg.models.builder import build_model

    path = tmp_path / "dconnnet_official.pth"
    torch.save({k: v.contiguous() for k, v in fixture["state_dict"].items()}, path)
    cfg = load_config("configs/connectivity/dconnnet_resnet34_isic_binary.yaml", [f"model.checkpoint={path}"])
    model = build_model(cfg).eval()
    assert type(model).__name__ == "Segmentor"
    with torch.no_grad():
        torch.testing.assert_close(model(fixture["input"].float()), fixture["output"]["logits"], **_tol(fixture))
    backbone_file = tmp_path / "resnet34.pth"
    torch.save(official.model.backbone.state_dict(), backbone_file)
    report = load_pretrained(build_model(load_config("configs/connectivity/dconnnet_resnet34_isic_binary.yaml")),
                             backbone_file, strict=False)
    assert report.converted is None and not report.unexpected
