import pytest
import torch

import attnseg.convert as convert
from attnseg.convert import mambaout as conv
from attnseg.errors import CheckpointError
from tests.conftest import load_fixture

FIXTURE = "mambaout_tiny_cfg.pt"


# -- dispatch -------------------------------------------------------------------------------------------------

def test_families_are_discovered_and_imported_lazily():
    assert "mambaout" in convert.families()
    assert convert.get_converter("mambaout") is conv


def test_unknown_family_lists_known_ones_with_a_suggestion():
    with pytest.raises(ValueError, match=r"no converter for family 'mamba_out'; did you mean 'mambaout'\? "
                                         r"\(known: .*mambaout"):
        convert.get_converter("mamba_out")
    with pytest.raises(ValueError, match="no converter for family 'resnet'"):
        convert.from_official("resnet", {"name": "ResNet"}, {})


# -- key map --------------------------------------------------------------------------------------------------

def test_official_keys_map_exactly_as_timm_does_and_back():
    fx = load_fixture(FIXTURE)
    sd = fx["state_dict"]
    ours = convert.convert_state_dict("mambaout", sd)
    assert list(ours) == [fx["timm_key_map"][k] for k in sd]
    assert all(ours[fx["timm_key_map"][k]] is v for k, v in sd.items())
    assert list(conv.to_official(ours)) == list(sd)


def test_layout_detection():
    fx = load_fixture(FIXTURE)
    assert conv.detect_layout(fx["state_dict"]) == "official" and conv.is_official(fx["state_dict"])
    timm_sd = {fx["timm_key_map"][k]: v for k, v in fx["state_dict"].items()}
    assert conv.detect_layout(timm_sd) == "attnseg" and not conv.is_official(timm_sd)
    assert conv.convert_state_dict(timm_sd) == timm_sd
    assert conv.detect_layout({"encoder.weight": torch.zeros(1)}) is None
    with pytest.raises(CheckpointError, match="mixes the official layout"):
        conv.detect_layout({"downsample_layers.0.conv1.weight": torch.zeros(1), "stem.conv1.weight": torch.zeros(1)})


@pytest.mark.parametrize("sd,match", [
    ({"downsample_layers.0.conv1.weight": torch.zeros(1), "mystery.weight": torch.zeros(1)},
     r"1 key\(s\) of a official MambaOut state_dict have no place .*: mystery.weight"),
    ({"downsample_layers.0.conv.weight": torch.zeros(1)}, "downsample_layers.0.conv.weight"),
    ({"stem.conv1.weight": torch.zeros(1), "stages.0.blocks.0.ls.gamma": torch.zeros(1)},
     r"LayerScale keys: a timm \*_rw variant"),
    ({"encoder.weight": torch.zeros(1)}, "not a MambaOut state_dict"),
])
def test_every_source_key_must_be_placed(sd, match):
    with pytest.raises(CheckpointError, match=match):
        conv.convert_state_dict(sd)


def test_pyramid_norms_have_no_official_counterpart():
    with pytest.raises(CheckpointError, match="pyramid_norms.0.weight"):
        conv.to_official({"stem.conv1.weight": torch.zeros(1), "pyramid_norms.0.weight": torch.zeros(1)})


# -- from_official ----------------------------------------------------------------------------------------------

def test_from_official_refuses_what_it_cannot_build():
    fx = load_fixture(FIXTURE)
    kwargs = fx["constructor"]["kwargs"]
    with pytest.raises(ValueError, match=r"unknown official MambaOut constructor 'MambaOutt'; did you mean 'MambaOut'"):
        conv.from_official({"name": "MambaOutt", "kwargs": kwargs}, fx["state_dict"])
    with pytest.raises(ValueError, match=r"arguments \['head_fn'\] are not supported"):
        conv.from_official({"name": "MambaOut", "kwargs": {**kwargs, "head_fn": "MlpHead"}}, fx["state_dict"])
    with pytest.raises(CheckpointError, match=r"shape \(checkpoint vs model\) .*stem.conv1.weight: \[8, 3, 3, 3\]"):
        conv.from_official({"name": "MambaOut", "kwargs": {**kwargs, "dims": [32, 32, 48, 64]}}, fx["state_dict"])
    partial = {k: v for k, v in fx["state_dict"].items() if not k.startswith("head.")}
    with pytest.raises(CheckpointError, match=r"missing \(6\): head.pre_logits.fc.weight"):
        conv.from_official(fx["constructor"], partial)


def test_from_official_single_stage_int_arguments():
    model = conv.from_official(
        {"name": "MambaOut", "kwargs": {"depths": 1, "dims": 16, "num_classes": 3}},
        conv.to_official(conv.MambaOut(depths=[1], dims=[16], num_classes=3, out_indices=(0,), pyramid_norm=False).state_dict()),
    )
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert model.feature_info == [{"num_chs": 16, "reduction": 4, "module": "stages.0"}]


def test_docstring_examples():
    import doctest

    result = doctest.testmod(convert, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
