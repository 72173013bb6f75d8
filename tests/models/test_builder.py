"""build_model wires a registered backbone and head into a Segmentor / Classifier (integration)."""

import pytest
import torch

from attnseg.config import validate_config
from attnseg.errors import ConfigError
from attnseg.models import Adapter, Classifier, Segmentor
from attnseg.models.builder import build_model


def _cfg(**model):
    return validate_config({
        "model": {"backbone": {"name": "test_mambaout"}, "head": {"name": "unetr", "feature_size": 8},
                  "num_classes": 3, **model},
        "data": {"dataset": {"name": "synthetic2d"}},
    })


@pytest.mark.parametrize("size", [(97, 75), (64, 64)])
def test_built_segmentor_any_input_size(size):
    model = build_model(_cfg()).eval()
    assert isinstance(model, Segmentor) and model.backbone.head is None  # no unused classifier params
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 3, *size) and model.postprocess(out).shape == (1, *size)


def test_head_kwargs_from_config():
    model = build_model(_cfg(head={"name": "unetr", "feature_size": 8, "norm_name": ["group", {"num_groups": 4}],
                                   "res_block": False}))
    assert isinstance(model.head.decoder1.conv_block.norm1, torch.nn.GroupNorm)
    with pytest.raises(ConfigError, match="feature_size"):
        build_model(_cfg(head={"name": "unetr", "feature_size": 0}))


def test_adapter_from_config():
    model = build_model(_cfg(adapter_channels=[8, 8, 16, 16]))
    assert isinstance(model.adapter, Adapter)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ConfigError, match="adapter_channels has 2 values; the backbone gives 4"):
        build_model(_cfg(adapter_channels=[8, 8]))


def test_classification_task_builds_classifier():
    cls = build_model(validate_config({"task": "classification",
                                       "model": {"backbone": {"name": "test_mambaout"}, "num_classes": 7},
                                       "data": {"dataset": {"name": "synthetic2d"}}}))
    assert isinstance(cls, Classifier) and cls(torch.randn(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("layout", ["classification", "dense_mm"])
def test_segmentor_backbone_loads_classification_and_dense_checkpoints(tmp_path, layout):
    """``model.backbone.pretrained``: an ImageNet-style file (its classifier dropped) and an mm-style dense file
    (``backbone.`` keys, no classifier) both load strictly into the segmentor's backbone."""
    from attnseg.registry import BACKBONES

    torch.manual_seed(1)
    source = BACKBONES.get("test_mambaout")(num_classes=10)
    if layout == "classification":
        state = {"model": source.state_dict()}
    else:
        state = {"state_dict": {f"backbone.{k}": v for k, v in source.state_dict().items() if not k.startswith("head.")}
                 | {"decode_head.conv_seg.weight": torch.zeros(3, 8, 1, 1)}}
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    model = build_model(_cfg(backbone={"name": "test_mambaout", "pretrained": str(path)}))
    loaded = model.backbone.state_dict()
    assert loaded and all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.items())
